#!/usr/bin/env python3
"""Means and standard errors over seeds of scripts/switch-ab.sh's results, per tool and epochs:
held-out cells (Kang: B cells; Norman: the held-out combinations) and the training ones."""
import json
import statistics as st
import sys
from collections import defaultdict

for path in sys.argv[1:]:
    runs = [json.loads(line.split("RESULT ", 1)[1]) for line in open(path) if "RESULT" in line]
    by = defaultdict(list)
    for r in runs:
        by[(r["tool"], r["epochs"], r.get("set", ""))].append(r)
    print(path)
    for key, rs in sorted(by.items()):
        held = lambda r: r.get("held_out", ["B"])  # noqa: E731
        out = []
        for metric in ("r2_all", "r2_10", "r2_20", "lfc_all"):
            ho = [st.mean(r["rows"][c][metric] for c in held(r)) for r in rs]
            tr = [st.mean(v[metric] for c, v in r["rows"].items() if c not in held(r)) for r in rs]
            se = st.stdev(ho) / len(ho) ** 0.5 if len(ho) > 1 else float("nan")
            out.append(f"{metric} held-out {st.mean(ho):.3f}±{se:.3f} training {st.mean(tr):.3f}")
        per_epoch = st.median(r["train_s"] / r.get("trained_epochs", r["epochs"]) for r in rs)
        print(f"  {key} n={len(rs)} train() {per_epoch:.2f} s/epoch | " + " | ".join(out))
