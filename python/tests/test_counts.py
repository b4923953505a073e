"""Drawn counts (`counts=True`): the Parquet column, the `.h5ad` of raw counts in the layout
cell-eval2 scores, and cell-eval2 0.20.0 scoring that file where it is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import COMPUTE

TARGETS = ["SGK1", "MAPK1"]


def test_an_h5ad_prediction_holds_the_drawn_counts_then_the_control_cells_as_observed(run, store, adata, fresh):
    import anndata as ad
    import polars as pl
    import scipy.sparse as sp

    out = fresh / "pred.h5ad"
    report = run.predict_to_parquet(out, store, targets=TARGETS, counts=True, seed=3, progress=False, **COMPUTE)
    controls = int((adata.obs["condition"] == "control").sum())
    assert report["observed_controls"] == controls
    pred = ad.read_h5ad(out)
    assert pred.n_obs == len(TARGETS) * controls + controls
    assert list(pred.var_names) == list(adata.var_names)
    assert sp.issparse(pred.X) and pred.X.dtype == np.float32
    assert np.all(pred.X.data == np.round(pred.X.data)) and pred.X.data.min() > 0, "whole positive stored counts"
    assert list(pred.obs.columns) == ["condition", "dose", "cell_type", "source_cell_id", "observed"]
    observed = pred.obs["observed"].to_numpy()
    assert observed.sum() == controls and (pred.obs["condition"][observed] == "control").all()
    assert set(pred.obs["condition"][~observed]) == set(TARGETS)
    # The observed rows are the control cells' own counts.
    cells = pred.obs["source_cell_id"][observed].to_numpy()
    np.testing.assert_array_equal(pred.X[observed].toarray(), adata[cells].X.toarray())
    # The drawn rows are the Parquet file's `counts` for the same seed, in the same order.
    run.predict_to_parquet(fresh / "pred.parquet", store, targets=TARGETS, counts=True, seed=3, progress=False,
                           **COMPUTE)
    table = pl.read_parquet(fresh / "pred.parquet")
    drawn = np.stack(table["counts"].to_numpy())
    np.testing.assert_array_equal(drawn, pred.X[~observed].toarray())
    assert table["cell_id"].to_list() == pred.obs["source_cell_id"][~observed].tolist()
    # Their means over the cells follow the predicted means: within 5 standard errors, the
    # variance at least the mean's (a negative binomial's is mu + mu^2 / theta).
    mean = np.stack(table["mean"].to_numpy()).astype(np.float64)
    for target in TARGETS:
        rows = (table["condition"] == target).to_numpy()
        n, m = rows.sum(), mean[rows].mean(0)
        gap = np.abs(drawn[rows].mean(0) - m)
        assert np.all(gap <= 5 * np.sqrt(np.maximum(drawn[rows].var(0, ddof=1), m) / n)), target


def test_an_h5ad_prediction_is_refused_without_counts(run, store, fresh):
    with pytest.raises(ValueError, match="counts=True"):
        run.predict_to_parquet(fresh / "pred.h5ad", store, targets=TARGETS, progress=False, **COMPUTE)
    assert not (fresh / "pred.h5ad").exists()


def cell_eval2() -> Path:
    """The cell-eval2 command beside this Python, or a skip with the reason."""
    pytest.importorskip("cell_eval2", reason="cell-eval2 is not installed (scripts/python.sh --tests installs it)")
    command = Path(sys.executable).parent / "cell-eval2"
    found = command if command.exists() else shutil.which("cell-eval2")
    if not found:
        pytest.skip("cell-eval2's command is not on this environment's PATH")
    return Path(found)


def test_cell_eval2_scores_a_counts_prediction_with_its_vcc2026_preset(run, store, adata, fresh):
    import polars as pl

    command = cell_eval2()
    pred = fresh / "pred.h5ad"
    run.predict_to_parquet(pred, store, targets=TARGETS, counts=True, progress=False, **COMPUTE)
    real = fresh / "real.h5ad"
    adata[adata.obs["condition"].isin([*TARGETS, "control"]).to_numpy()].copy().write_h5ad(real)
    done = subprocess.run(
        [str(command), "run", "-ap", str(pred), "-ar", str(real), "--preset", "vcc2026", "--pert-col", "condition",
         "--control", "control", "--no-target-genes", "-o", str(fresh / "scores")],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = pl.read_csv(fresh / "scores" / "results.csv")
    assert set(results["perturbation"]) == set(TARGETS)
    assert {"pds_cosine", "de_wilcoxon_sig_jaccard", "expr_mse_unbiased_capped"} <= set(results["metric"])
