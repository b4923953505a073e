#!/usr/bin/env python3
"""Marginal seconds per epoch of each tool in scripts/switch-epoch.sh's results, repetition by
repetition, and their ratio (cpa-tools over compat): the medians and the median ratio."""
import json
import statistics as st
import sys
from collections import defaultdict

for path in sys.argv[1:]:
    runs = defaultdict(dict)
    loads = []
    for line in open(path):
        row = json.loads(line)
        r = row["result"]
        runs[(row["rep"], r["tool"])][r["epochs"]] = (r["train_s"], r["trained_epochs"])
        loads.append(row["load"])
    per_epoch = defaultdict(dict)
    for (rep, tool), by_epochs in runs.items():
        if len(by_epochs) != 2:
            continue
        (t1, n1), (t2, n2) = (by_epochs[e] for e in sorted(by_epochs))
        if n2 > n1:
            per_epoch[rep][tool] = (t2 - t1) / (n2 - n1)
    pairs = sorted((rep, p) for rep, p in per_epoch.items() if len(p) == 2)
    print(f"{path}: load average {min(loads):.2f}-{max(loads):.2f}")
    for rep, p in pairs:
        print(f"  repetition {rep}: compat {p['compat']:.3f} s, cpa-tools {p['cpa']:.3f} s, {p['cpa'] / p['compat']:.2f}x")
    if pairs:
        compat = [p["compat"] for _, p in pairs]
        cpa = [p["cpa"] for _, p in pairs]
        ratios = sorted(p["cpa"] / p["compat"] for _, p in pairs)
        print(
            f"  medians: compat {st.median(compat):.3f} s ({min(compat):.3f}-{max(compat):.3f}), cpa-tools "
            f"{st.median(cpa):.3f} s ({min(cpa):.3f}-{max(cpa):.3f}); ratio of the medians "
            f"{st.median(cpa) / st.median(compat):.2f}x, median ratio {st.median(ratios):.2f}x "
            f"({ratios[0]:.2f}-{ratios[-1]:.2f}x)"
        )
