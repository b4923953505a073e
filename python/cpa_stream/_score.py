"""``score``: a prediction of raw counts scored as the Virtual Cell Challenge 2026 scores it
(cell-eval2 0.20.0's ``vcc2026`` metrics), as ``cpa-stream score`` does."""

from __future__ import annotations

import json
import os
from os import PathLike

import pandas as pd

from . import _args, _native, _progress


def score(
    prediction: PathLike | str,
    reference: PathLike | str,
    *,
    perturbation_key: str | None = None,
    control: str | None = None,
    no_target_genes: bool = False,
    real_bundle: PathLike | str | None = None,
    baseline: bool = False,
    baseline_seed: int | None = None,
    replicate: bool = False,
    replicate_seed: int | None = None,
    context_key: str | None = None,
    out: PathLike | str | None = None,
    allow_fractional_counts: bool = False,
    overwrite: bool = False,
    de_engine: str | None = None,
    threads: int | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Scores ``prediction`` (an ``.h5ad`` of raw counts per cell, as ``Run.predict_to_parquet``
    with ``counts=True`` and an ``.h5ad`` path writes it) against ``reference`` (the real cells,
    raw counts, the same genes in the same order) with cell-eval2 0.20.0's ``vcc2026`` metrics,
    out of core, as ``cpa-stream score`` does (docs/evaluation.md, "Scored as the Virtual Cell
    Challenge 2026 scores").

    Returns one row per perturbation (and ``context``, with ``context_key``): its cell counts and
    every metric. ``attrs["contexts"]``: per context, the aggregates (cell-eval2's
    ``agg_results.csv`` means), and with ``baseline`` the mean-response baseline arm's, with
    ``replicate`` the split-half replicate's, with both (or ``real_bundle``) the scaled scores
    (``scaled``: ``from_baseline``, ``from_replicate``, ``avg_from_replicate``);
    ``attrs["report"]``: the whole report. ``baseline`` and ``replicate`` draw their cells as
    cell-eval2 draws them (``baseline_seed``, ``replicate_seed``: its seeds, default 0).
    ``perturbation_key`` defaults to ``"condition"``, ``control`` to ``"control"``.
    ``no_target_genes``: the perturbations have no target gene (drugs, cytokines). ``out``: a
    directory written as the command writes it (``results.parquet``, ``summary.json``).
    ``de_engine``: whose Wilcoxon p-values, cell-eval2's ``"scanpy"`` engine (the default) or
    its ``"pdex"`` engine (which cell-eval2 runs where pdex is installed)."""
    path = lambda p: None if p is None else os.fspath(p)  # noqa: E731
    request = {
        "prediction": os.fspath(prediction), "reference": os.fspath(reference),
        "perturbation_key": perturbation_key, "control": control, "no_target_genes": no_target_genes,
        "real_bundle": path(real_bundle), "baseline": baseline, "baseline_seed": baseline_seed,
        "replicate": replicate, "replicate_seed": replicate_seed, "context_key": context_key,
        "out": path(out), "allow_fractional_counts": allow_fractional_counts, "overwrite": overwrite,
        "de_engine": de_engine, "threads": threads, "naming": "keywords",
    }
    report = json.loads(_native.run("score", _args.request(request), _progress.make(progress, "score")))
    rows = []
    for context in report["contexts"]:
        for p in context["perturbations"]:
            row = {"context": context["context"]} if context_key is not None else {}
            row.update(perturbation=p["perturbation"], predicted_cells=p["predicted_cells"],
                       real_cells=p["real_cells"], **p["metrics"])
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["contexts"] = [
        {k: c[k] for k in ("context", "aggregates", "baseline", "replicate", "scaled", "scale_error")}
        for c in report["contexts"]
    ]
    for c in frame.attrs["contexts"]:
        if c["baseline"] is not None:
            c["baseline"] = {"seed": c["baseline"]["seed"], "aggregates": c["baseline"]["aggregates"]}
    frame.attrs["report"] = report
    return frame
