#!/usr/bin/env python3
"""The table of scripts/bench-peers.sh: medians over repetitions of cells/s per loader, store,
batch size and output, with ratios to annbatch's best setting on its lz4 store at the same batch
size and output; the same ratios paired by repetition (each taken within one repetition, whose
runs were interleaved, then their median and range: a machine that slows down between
repetitions moves both sides of a paired ratio); conversions; cold epochs. Writes
DIR/results/table.md and prints it."""

import glob
import json
import os
import statistics
import sys

directory, tag = sys.argv[1], sys.argv[2]
res = os.path.join(directory, "results")
rows = {}  # (loader, store, batch, out) -> [cells/s]
by_rep = {}  # (loader, store, batch, out) -> {repetition: cells/s}


def add(key, value, rep):
    rows.setdefault(key, []).append(value)
    by_rep.setdefault(key, {})[rep] = value


for line in open(os.path.join(res, "ours.jsonl")):
    r = json.loads(line)
    add(("cpa-stream", r["store_name"], r["batch_size"], r["out"]), r["cells_per_s"], r["rep"])
for path in sorted(glob.glob(os.path.join(res, "peers-*.json"))):
    rep = int(os.path.basename(path)[len("peers-"):-len(".json")])
    for r in json.load(open(path))["results"]:
        if "error" in r:
            continue
        if r["loader"] == "annbatch":
            store = f"{r['params'].split(',')[-1]} chunk {r['chunk_size']} preload {r['preload_nchunks']}"
        else:
            store = f"h5ad {r['params']}"
        add((r["loader"], store, r["batch_size"], r["output"]), r["cells_per_s"], rep)

med = {k: statistics.median(v) for k, v in rows.items()}
out = []
out.append(f"Loader throughput on {tag} (cells/s, median of {max(len(v) for v in rows.values())} repetitions)\n")
out.append("| loader | store / setting | batch | out | cells/s | vs best annbatch lz4 |")
out.append("|---|---|---:|---|---:|---:|")
for key in sorted(med, key=lambda k: (k[2], k[3], k[0] != "cpa-stream", k[0], k[1])):
    loader, store, batch, o = key
    best = max((v for (l, s, b, oo), v in med.items() if l == "annbatch" and s.startswith("lz4") and b == batch and oo == o),
               default=None)
    ratio = f"{med[key] / best:.2f}x" if best else "-"
    out.append(f"| {loader} | {store} | {batch} | {o} | {med[key]:,.0f} | {ratio} |")



def best_annbatch_lz4(batch, o):
    """annbatch's faster setting on its lz4 store at this batch size and output, by medians."""
    keys = [k for k in med if k[0] == "annbatch" and k[1].startswith("lz4") and k[2] == batch and k[3] == o]
    return max(keys, key=lambda k: med[k], default=None)


def paired(numerator, denominator):
    """Median and range of the ratio within each repetition both ran in; None without one."""
    a, b = by_rep.get(numerator, {}), by_rep.get(denominator, {})
    ratios = [a[rep] / b[rep] for rep in sorted(set(a) & set(b)) if b[rep] > 0]
    if not ratios:
        return None
    return statistics.median(ratios), min(ratios), max(ratios)


def fmt(ratio, suffix=""):
    return "-" if ratio is None else f"{ratio[0]:.2f}{suffix} ({ratio[1]:.2f}-{ratio[2]:.2f})"


shapes = sorted({(k[2], k[3]) for k in med if k[0] == "cpa-stream"})
if shapes:
    out.append("\nPaired by repetition (each ratio within one repetition; median, then range)\n")
    out.append("| batch | out | zstd / raw | raw / annbatch lz4 | zstd / annbatch lz4 |")
    out.append("|---:|---|---:|---:|---:|")
    for batch, o in shapes:
        ours = {store: ("cpa-stream", store, batch, o) for store in ("raw", "zstd")}
        best = best_annbatch_lz4(batch, o)
        vs = {store: paired(key, best) if best else None for store, key in ours.items()}
        out.append(f"| {batch} | {o} | {fmt(paired(ours['zstd'], ours['raw']))} | {fmt(vs['raw'], 'x')} | "
                   f"{fmt(vs['zstd'], 'x')} |")

times = []
for name in ("import", "convert", "annbatch-lz4", "annbatch-raw"):
    path = os.path.join(res, f"{name}.time")
    if os.path.exists(path):
        t = json.load(open(path))
        times.append(f"| {name} | {t['seconds']:.1f} | {t['peak_rss_kb'] / 2**20:.2f} |")
if times:
    out.append("\nConversions of the same .h5ad (GNU time: wall seconds, peak RSS)\n")
    out.append("| step | seconds | peak RSS GiB |")
    out.append("|---|---:|---:|")
    out += times

cold_path = os.path.join(res, "cold.jsonl")
if os.path.exists(cold_path):
    cold = {}
    for line in open(cold_path):
        r = json.loads(line)
        key = (r["store_name"], r["batch_size"], r.get("advice", "-"))
        cold.setdefault(key, []).append(r)
    out.append("\nCold first epoch from disk (page cache dropped before each; medians)\n")
    out.append("| store | batch | advice | cells/s | MB/s from disk | disk sequential MB/s |")
    out.append("|---|---:|---|---:|---:|---:|")
    for key in sorted(cold, key=lambda k: (k[1], k[0], k[2])):
        rs = cold[key]
        c = statistics.median(r["cells_per_s"] for r in rs)
        d = [r["disk_mb_per_s"] for r in rs if r.get("disk_mb_per_s") is not None]
        s = [r["disk_sequential_mb_per_s"] for r in rs if r.get("disk_sequential_mb_per_s") is not None]
        disk = f"{statistics.median(d):.0f}" if d else "-"
        sequential = f"{statistics.median(s):.0f}" if s else "-"
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {c:,.0f} | {disk} | {sequential} |")

text = "\n".join(out)
open(os.path.join(res, "table.md"), "w").write(text + "\n")
print(text)
