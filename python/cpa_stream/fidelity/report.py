"""Results as tables: means and spreads over seeds, paired differences against cpa-tools, and the
protocol that judges variants over deciding and confirming data sets."""

from __future__ import annotations

import json
import os
import statistics
import sys

from ..metrics import NOISE_REPRODUCIBILITY
from .data import PAIRED_METRICS, PROTOCOL_METRICS, peer_defaults, read_meta, translate
from .scores import change_reproducibility


def best_epoch(history):
    """The epoch whose weights the run kept: the best validation score (cpa-stream's history calls
    it ``val_score``; ``score`` in histories written before it), the first of equals."""
    column = next((c for c in ("val_score", "score") if c in history.columns), None)
    if column is None:
        return None
    valid = history.dropna(subset=[column])
    if valid.empty:
        return None
    return int(valid.loc[valid[column].idxmax(), "epoch"])


def print_result(r):
    m = r["mean"]
    print(f"fidelity: {r['variant']:>22s} e{r['epochs']} s{r['seed']}: cf all {m['cf_all']:.3f} "
          f"deg {m['cf_deg']:.3f} change {m['cf_change']:.3f} | recon all {m['recon_all']:.3f} "
          f"| control mean all {m['ctrl_all']:.3f} deg {m['ctrl_deg']:.3f} | {r['train_cpu_s']:.0f} CPU-s")


def table(a):
    import glob

    results = []
    for path in sorted(glob.glob(os.path.join(a.dir, "results", "*", "score.json"))):
        results.append(json.load(open(path)))
    if not results:
        sys.exit(f"fidelity: no results under {a.dir}/results")
    meta = read_meta(a.dir)
    metrics = [("cf_all", "cf all"), ("cf_deg", "cf top-20 DEG"), ("cf_change", "cf change"),
               ("recon_all", "recon all"), ("recon_deg", "recon top-20 DEG")]
    by = {}
    for r in results:
        by.setdefault((r["epochs"], r["variant"]), []).append(r)
    lines = [f"Fidelity on {os.path.basename(meta['source'])} (split {meta['split']}, "
             f"{meta['cells']['test']} test cells); R2 of log1p group means, mean ± sd over seeds", "",
             "| epochs | tool / variant | seeds | " + " | ".join(n for _, n in metrics) + " | CPU-s / epoch | peak RSS MiB |",
             "|---:|---|---:|" + "---:|" * len(metrics) + "---:|---:|"]

    def cell(values):
        if len(values) > 1:
            return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
        return f"{values[0]:.3f}"

    for epochs in sorted({k[0] for k in by}):
        variants = sorted({k[1] for k in by if k[0] == epochs}, key=lambda v: (v != "cpa-tools", v))
        for v in variants:
            rs = by[(epochs, v)]
            cols = [cell([r["mean"][k] for r in rs]) for k, _ in metrics]
            cpu = statistics.median(r["train_cpu_s"] / r["epochs"] for r in rs)
            rss = statistics.median(r["peak_rss_mib"] for r in rs)
            lines.append(f"| {epochs} | {v} | {len(rs)} | " + " | ".join(cols) + f" | {cpu:.2f} | {rss:.0f} |")
        base = by[(epochs, variants[0])]
        lines.append(f"| {epochs} | control mean | | {cell([r['mean']['ctrl_all'] for r in base])} | "
                     f"{cell([r['mean']['ctrl_deg'] for r in base])} | {cell([r['mean']['ctrl_change'] for r in base])} | | | | |")
        if base[0].get("held_out_mean"):
            for v in variants:
                rs = by[(epochs, v)]
                cols = [cell([r["held_out_mean"][k] for r in rs]) for k, _ in metrics]
                lines.append(f"| {epochs} | {v}, held-out conditions only | {len(rs)} | " + " | ".join(cols) + " | | |")
            lines.append(f"| {epochs} | control mean, held-out conditions only | | "
                         + " | ".join(cell([r["held_out_mean"][k] for r in base]) for k in ("ctrl_all", "ctrl_deg", "ctrl_change"))
                         + " | | | | |")
            # The baselines from other covariate values' training cells (results scored before
            # the nearest value's shift existed lack it).
            for name, label in (("shift", "shift baseline (mean shift in the other values)"),
                                ("nearest", "nearest value's shift (the closest control mean's)")):
                if all(f"{name}_all" in r["held_out_mean"] for r in base):
                    lines.append(f"| {epochs} | {label}, held-out conditions only | | "
                                 + " | ".join(cell([r["held_out_mean"][f"{name}_{k}"] for r in base])
                                              for k in ("all", "deg", "change"))
                                 + " | | | | |")
    lines += reproducibility_lines(a.dir, meta, results[0]["groups"])
    lines += paired_lines(by)
    loads = [x for r in results for x in r["loadavg"]]
    lines += ["", f"Load average during the runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs."]
    model, plan = peer_defaults()
    _, unexpressed = translate(model, plan, batch_size=128, check_val_every=5, max_comb_len=meta["max_comb_len"],
                               epochs=1, seed=0)
    lines += ["", "Not expressed by the translation:"] + [f"- {u}" for u in unexpressed]
    variants = sorted({(r["variant"], tuple(r.get("set") or []), r.get("preset")) for r in results if r["tool"] == "cpa-stream"})
    def describe(v, sets, p):
        if v.endswith("-last"):
            return f"the last epoch's weights of {v[:-5]}'s training"
        ways = {"-elog": "the expected log1p of the predicted counts", "-allctrl": "every control cell decoded once",
                "-delta": "the predicted change added to the observed control mean"}
        base, found = v, []
        while any(base.endswith(k) for k in ways):
            k = next(k for k in ways if base.endswith(k))
            found.insert(0, ways[k])
            base = base[: -len(k)]
        if found:
            return f"the weights of {base}, scored with " + "; ".join(found)
        return ", ".join(([f"preset {p}"] if p else []) + list(sets)) or "as translated"

    lines += ["", "cpa-stream variants (over the translation):"] + [f"- {v}: {describe(v, sets, p)}"
                                                                   for v, sets, p in variants]
    text = "\n".join(lines)
    with open(os.path.join(a.dir, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)


def reproducibility_lines(directory, meta, groups):
    """The table's line on whether the scored groups' changes are measured at all
    ([`change_reproducibility`]), for all of them and for the held-out ones."""
    import numpy as np

    rs = change_reproducibility(directory, meta)

    def describe(names):
        r = [rs[n] for n in names if n in rs]
        if not r:
            return "none with 2 cells in each half"
        return f"median r {np.median(r):.2f}, {sum(x < NOISE_REPRODUCIBILITY for x in r)} of {len(r)} under {NOISE_REPRODUCIBILITY}"

    scored = [g["group"] for g in groups]
    held = [g["group"] for g in groups if g["held_out"]]
    line = (f"Do the scored groups' changes reproduce between disjoint halves of their cells and controls "
            f"(`evaluate`'s change_reproducibility, mean of 20 halvings; near 0: noise, and no score of the "
            f"change tells predictions apart)? All: {describe(scored)}")
    if held:
        line += f"; held-out: {describe(held)}"
    return ["", line + "."]


def protocol(a):
    """The protocol's verdict: every variant paired with the baseline by seed on each data set
    (ROLE=DIR, ROLE `decide` or `confirm`) and epoch count. The deciding sets decide: the one of
    the two ahead on average on every deciding set, metric and epoch count is chosen (else the
    question is undecided). The confirming sets confirm: the choice stands confirmed where it is
    nowhere behind by more than two standard errors; each exception is named. A data set and epoch
    count where the two give the same numbers on every seed (a variant that changes nothing there,
    such as a rule that keeps the baseline's setting) neither decides nor confirms; it is counted
    as identical."""
    import glob

    import numpy as np

    sets = []
    for entry in a.sets:
        role, _, directory = entry.partition("=")
        if role not in ("decide", "confirm") or not directory:
            sys.exit(f"fidelity: protocol: {entry!r}: expected decide=DIR or confirm=DIR")
        results = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(directory, "results", "*", "score.json")))]
        if not results:
            sys.exit(f"fidelity: protocol: no results under {directory}/results")
        sets.append((role, os.path.basename(directory.rstrip("/")), results))
    variants = sorted({r["variant"] for _, _, rs in sets for r in rs if r["variant"] != a.baseline
                       and not any(r["variant"].endswith(k) for k in ("-delta", "-elog", "-last", "-allctrl"))})
    if a.variant:
        # Named variants, rescored ones (VARIANT-delta: the anchored prediction) among them.
        variants = list(a.variant)
    lines = [f"Protocol: each variant minus {a.baseline}, paired by seed (mean ± standard error; seeds ahead)", ""]
    header = "| variant | data set | role | epochs | " + " | ".join(
        f"{n} ({a.baseline})" for _, n in PROTOCOL_METRICS) + " | " + " | ".join(f"{n}, difference" for _, n in PROTOCOL_METRICS) + " |"
    lines += [header, "|---|---|---|---:|" + "---:|" * (2 * len(PROTOCOL_METRICS))]
    verdicts = []
    for v in variants:
        cells = []  # (role, data set, epochs, metric, mean difference, standard error)
        identical = []  # (role, data set, epochs) where every seed's numbers are the same
        for role, name, results in sets:
            for epochs in sorted({r["epochs"] for r in results}):
                base = {r["seed"]: r for r in results if r["variant"] == a.baseline and r["epochs"] == epochs}
                other = {r["seed"]: r for r in results if r["variant"] == v and r["epochs"] == epochs}
                seeds = sorted(set(base) & set(other))
                if not seeds:
                    continue
                absolute, shown, here = [], [], []
                for key, label in PROTOCOL_METRICS:
                    d = np.array([other[s]["mean"][key] - base[s]["mean"][key] for s in seeds])
                    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
                    absolute.append(f"{np.mean([base[s]['mean'][key] for s in seeds]):.3f}")
                    shown.append(f"{d.mean():+.3f} ± {se:.3f} ({int((d > 0).sum())}/{len(d)})")
                    here.append((role, name, epochs, label, float(d.mean()), float(se), bool(np.all(d == 0))))
                if all(c[6] for c in here):
                    identical.append((role, name, epochs))
                else:
                    cells += [c[:6] for c in here]
                lines.append(f"| {v} | {name} | {role} | {epochs} | " + " | ".join(absolute) + " | " + " | ".join(shown) + " |")
        same = (f" (identical on {len(identical)}: "
                + ", ".join(f"{n} {e} epochs" for _, n, e in identical) + ")") if identical else ""
        deciding = [c for c in cells if c[0] == "decide"]
        if not deciding:
            verdicts.append(f"- {v} against {a.baseline}: no deciding set measured both with different results{same}")
            continue
        if all(c[4] > 0 for c in deciding):
            chosen, sign = v, 1
        elif all(c[4] < 0 for c in deciding):
            chosen, sign = a.baseline, -1
        else:
            verdicts.append(f"- {v} against {a.baseline}: undecided (each is ahead somewhere on the deciding sets){same}")
            continue
        against = [c for c in cells if c[0] == "confirm" and sign * c[4] < -2 * c[5]]
        # Every cell where the choice is behind on average, whatever the margin.
        behind = [c for c in cells if sign * c[4] < 0]
        confirmed = [c for c in cells if c[0] == "confirm"]
        if not confirmed:
            verdicts.append(f"- {v} against {a.baseline}: {chosen} decided; no confirming set measured both{same}")
        elif not against:
            verdicts.append(f"- {v} against {a.baseline}: {chosen} decided, and confirmed on every confirming set, "
                            f"metric and epoch count ({len(confirmed)}){same}")
        else:
            named = "; ".join(f"{n} {e} epochs {m} ({sign * d:+.3f} ± {se:.3f})" for _, n, e, m, d, se in against)
            verdicts.append(f"- {v} against {a.baseline}: {chosen} decided; confirmed on {len(confirmed) - len(against)} "
                            f"of {len(confirmed)} confirming cells, behind by more than two standard errors on: {named}{same}")
        if behind:
            verdicts.append(f"  {chosen} is behind on average, by any margin, on {len(behind)} of {len(cells)} cells: "
                            + "; ".join(f"{n} ({r}) {e} epochs {m} ({sign * d:+.3f} ± {se:.3f})"
                                        for r, n, e, m, d, se in behind))
    lines += [""] + verdicts
    lines += ["", "Decided: ahead on average on every deciding set, metric and epoch count. Confirmed: on no",
              "confirming set, metric and epoch count behind by more than two standard errors. Identical:",
              "the same numbers on every seed (left out of both)."]
    print("\n".join(lines))


def paired(stream, peer, resamples=2000):
    """cpa-stream against cpa-tools on the seeds both ran (a seed fixes both tools' control-cell
    draws, so the seeds pair them), per metric: the mean difference and its standard error, and the
    ratio of the spreads (sd over seeds) with a 90% interval from resampling the seeds (pairs kept
    together, a fixed generator). None when fewer than 3 seeds are shared."""
    import numpy as np

    a = {r["seed"]: r for r in stream}
    b = {r["seed"]: r for r in peer}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 3:
        return None
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
    out = {"seeds": len(seeds)}
    for key, _ in PAIRED_METRICS:
        x = np.array([a[s]["mean"][key] for s in seeds])
        y = np.array([b[s]["mean"][key] for s in seeds])
        d = x - y
        ratio = x.std(ddof=1) / y.std(ddof=1) if y.std(ddof=1) > 0 else float("inf")
        sx, sy = x[picks].std(axis=1, ddof=1), y[picks].std(axis=1, ddof=1)
        keep = sy > 0  # a resample of one repeated seed has no spread to compare
        lo, hi = np.quantile(sx[keep] / sy[keep], [0.05, 0.95]) if keep.any() else (float("nan"),) * 2
        out[key] = {"diff": float(d.mean()), "diff_se": float(d.std(ddof=1) / np.sqrt(len(d))),
                    "ahead": int((d >= 0).sum()), "sd_ratio": float(ratio), "sd_ratio_90": (float(lo), float(hi))}
    return out


def paired_lines(by):
    """The table's paired section: each cpa-stream variant against cpa-tools at equal epochs."""
    rows = []
    for epochs, variant in sorted(by):
        # Like for like only: plain against plain, anchored (-delta, the draws, log1p of the mean)
        # against cpa-tools anchored; scorings cpa-tools has no counterpart of are left out.
        if variant.startswith("cpa-tools") or "-elog" in variant or "-allctrl" in variant:
            continue
        peer = "cpa-tools-delta" if variant.endswith("-delta") else "cpa-tools"
        if (epochs, peer) not in by:
            continue
        p = paired(by[(epochs, variant)], by[(epochs, peer)])
        if p is None:
            continue
        cells = []
        for key, _ in PAIRED_METRICS:
            m = p[key]
            lo, hi = m["sd_ratio_90"]
            cells.append(f"{m['diff']:+.3f} ± {m['diff_se']:.3f} ({m['ahead']}/{p['seeds']}); "
                         f"{m['sd_ratio']:.2f} [{lo:.2f}, {hi:.2f}]")
        rows.append(f"| {epochs} | {variant} vs {peer} | {p['seeds']} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "Paired by seed against cpa-tools (a seed fixes both tools' control-cell draws): mean "
            "difference ± its standard error (seeds ahead or level / seeds); ratio of the spreads "
            "(sd over seeds, cpa-stream / cpa-tools) [90% interval, seeds resampled in pairs]. That spread "
            "mixes training with the draws; `cpa_stream.fidelity draws DIR --against cpa-tools --epochs E` splits it.", "",
            "| epochs | variant | seeds | " + " | ".join(n for _, n in PAIRED_METRICS) + " |",
            "|---:|---|---:|" + "---|" * len(PAIRED_METRICS)] + rows
