"""The baselines of ``evaluate`` (issue 52 item 5) against a computation by hand: the additive
baseline of a combination and the other-covariates baseline of an unseen cell type, built from the
training cells only and scored as the model is."""

from __future__ import annotations

import numpy as np
import pytest

import cpa_stream as cs


def r2(pred: np.ndarray, truth: np.ndarray) -> float:
    return 1.0 - float(((truth - pred) ** 2).sum()) / float(((truth - truth.mean()) ** 2).sum())


def test_the_additive_and_other_covariates_baselines_equal_a_computation_by_hand(tmp_path):
    ad = pytest.importorskip("anndata")
    synth = cs.synth(tmp_path / "synth.store", cells=4000, genes=40, perturbations=3, doses=1, cell_types=2,
                     combinations=1, seed=4, progress=False)
    cs.export_h5ad(synth, tmp_path / "synth.h5ad")
    adata = ad.read_h5ad(tmp_path / "synth.h5ad")
    obs = adata.obs
    combination = sorted(c for c in obs["condition"].unique() if "+" in c)[0]
    single = combination.split("+")[0]
    cell_types = sorted(obs["cell_type"].unique())
    unseen = cell_types[1]
    split = np.full(adata.n_obs, "train", dtype=object)
    split[(obs["condition"] == combination).to_numpy()] = "ood"
    split[((obs["condition"] == single) & (obs["cell_type"] == unseen)).to_numpy()] = "ood"
    # Some of the single perturbation's cells of the seen cell type validate: baselines use
    # training cells only, so these must not count.
    seen = np.flatnonzero(((obs["condition"] == single) & (obs["cell_type"] == cell_types[0])).to_numpy())
    split[np.random.default_rng(0).choice(seen, size=len(seen) // 3, replace=False)] = "valid"
    adata.obs["split"] = split
    store = cs.import_h5ad(adata, tmp_path / "split.store", progress=False)
    run = cs.train(store, tmp_path / "run", perturbation_key="condition", dosage_key="dose",
                   categorical_covariate_keys=["cell_type"], split_key="split", max_epochs=2, seed=1, threads=1,
                   progress=False)
    metrics = run.evaluate(store, split="ood", threads=1)

    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    x = np.log1p(x.astype(np.float64))
    condition, cell_type = obs["condition"].to_numpy(), obs["cell_type"].to_numpy()

    def mean(mask: np.ndarray) -> np.ndarray:
        assert mask.any()
        return x[mask].mean(axis=0)

    def shift(part: str, ct: str) -> np.ndarray | None:
        train = split == "train"
        treated = train & (condition == part) & (cell_type == ct)
        if not treated.any():
            return None
        return mean(treated) - mean(train & (condition == "control") & (cell_type == ct))

    # The linear baseline: ridge (lambda 1) from perturbation and cell-type indicators and an
    # intercept to each training condition's change from its training controls.
    perturbations = sorted({p for c in condition if c != "control" for p in c.split("+")})
    columns = [*perturbations, *cell_types, "intercept"]

    def features(cond: str, ct: str) -> np.ndarray:
        x = np.zeros(len(columns))
        for p in cond.split("+"):
            x[columns.index(p)] = 1.0
        x[columns.index(ct)] = 1.0
        x[-1] = 1.0
        return x

    rows, changes = [], []
    for cond in sorted(set(condition) - {"control"}):
        for ct in cell_types:
            change = shift(cond, ct)
            if change is not None:
                rows.append(features(cond, ct))
                changes.append(change)
    design, target = np.array(rows), np.array(changes)
    weights = np.linalg.solve(design.T @ design + np.eye(len(columns)), design.T @ target)

    checked = 0
    for _, row in metrics.iterrows():
        ct = row["cell_type"]
        # No control cell is held out: the evaluation decodes all of the covariates' controls.
        assert row["control_source"] == "all", row["control_source"]
        control = mean((condition == "control") & (cell_type == ct))
        real = mean((split == "ood") & (condition == row["condition"]) & (cell_type == ct))
        linear = control + features(row["condition"], ct) @ weights
        assert row["linear_r2_mean"] == pytest.approx(r2(linear, real), abs=1e-9)
        assert row["beats_linear"] in (0.0, 1.0)
        if row["condition"] == combination:
            shifts = [shift(p, ct) for p in combination.split("+")]
            if any(s is None for s in shifts):
                # A part without training cells in these covariates: no additive baseline.
                assert np.isnan(row["additive_r2_mean"]) and np.isnan(row["beats_additive"])
            else:
                additive = control + sum(shifts)
                assert row["additive_r2_mean"] == pytest.approx(r2(additive, real), abs=1e-9)
                assert np.isfinite(row["additive_r2_mean_top20"])
                assert row["beats_additive"] in (0.0, 1.0)
                checked += 1
        if row["condition"] == single and ct == unseen:
            others = [shift(single, other) for other in cell_types if other != unseen]
            assert all(o is not None for o in others)
            baseline = control + np.mean(others, axis=0)
            assert row["other_covariates_r2_mean"] == pytest.approx(r2(baseline, real), abs=1e-9)
            assert np.isnan(row["additive_r2_mean"]), "a single perturbation has no additive baseline"
            checked += 1
    assert checked >= 2, metrics[["cell_type", "condition"]]
    summary = metrics.attrs["summary"]
    assert "additive_r2_mean" in summary and "beats_other_covariates" in summary and "beats_linear" in summary
