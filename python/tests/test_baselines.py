"""The baselines of ``evaluate`` (issue 52 item 5) against a computation by hand: the additive
baseline of a combination and the other-covariates baseline of an unseen cell type, built from the
training cells only and scored as the model is."""

from __future__ import annotations

import numpy as np
import pytest

import cpa_stream as cs


def r2(pred: np.ndarray, truth: np.ndarray) -> float:
    return 1.0 - float(((truth - pred) ** 2).sum()) / float(((truth - truth.mean()) ** 2).sum())


def transfer_slope(shifts: dict) -> float:
    """The transfer slope by hand: each training shift (``shifts[(condition, cell_type)]``)
    regressed through the origin on the mean of its condition's shifts in the other cell types,
    pooled over conditions, cell types and genes."""
    xy = xx = 0.0
    for (condition, cell_type), y in shifts.items():
        elsewhere = [s for (q, o), s in shifts.items() if q == condition and o != cell_type]
        if elsewhere:
            x = np.mean(elsewhere, axis=0)
            xy, xx = xy + float(x @ y), xx + float(x @ x)
    return xy / xx


def synthetic(tmp_path, **params):
    """A synthetic atlas (``cs.synth`` with ``params``) as an AnnData, through an .h5ad."""
    ad = pytest.importorskip("anndata")
    synth = cs.synth(tmp_path / "synth.store", genes=40, doses=1, progress=False, **params)
    cs.export_h5ad(synth, tmp_path / "synth.h5ad")
    return ad.read_h5ad(tmp_path / "synth.h5ad")


def trained(adata, tmp_path, max_epochs: int, split_key: str | None = "split"):
    """``adata`` imported and a model trained on it (one thread, seed 1): the store and the run."""
    store = cs.import_h5ad(adata, tmp_path / "data.store", progress=False)
    run = cs.train(store, tmp_path / "run", perturbation_key="condition", dosage_key="dose",
                   categorical_covariate_keys=["cell_type"], split_key=split_key, max_epochs=max_epochs, seed=1,
                   threads=1, progress=False)
    return store, run


def log1p_counts(adata) -> np.ndarray:
    """log1p of the counts, dense, as ``evaluate`` takes means of them."""
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    return np.log1p(x.astype(np.float64))


def test_the_additive_and_other_covariates_baselines_equal_a_computation_by_hand(tmp_path):
    adata = synthetic(tmp_path, cells=4000, perturbations=3, cell_types=3, combinations=1, seed=4)
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
    store, run = trained(adata, tmp_path, max_epochs=2)
    metrics = run.evaluate(store, split="ood", threads=1)

    x = log1p_counts(adata)
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

    # The transfer slope: each training shift regressed through the origin on the mean of its
    # perturbation's training shifts in the other cell types, pooled; the scaled baseline's factor.
    shifts = {(c, ct): s for c in sorted(set(condition) - {"control"}) for ct in cell_types
              if (s := shift(c, ct)) is not None}
    slope = transfer_slope(shifts)
    assert metrics.attrs["transfer"]["slope"] == pytest.approx(slope, rel=1e-9)

    # The context's mean response: the control mean plus the mean training shift of every other
    # perturbed condition of the cell type (cell-eval2's mean-response baseline, training cells).
    trained_shifts = dict(shifts)

    def context(cond: str, ct: str) -> np.ndarray:
        others = [s for (c, o), s in trained_shifts.items() if o == ct and c != cond]
        assert others
        return np.mean(others, axis=0)

    def calibration(cond: str, ct: str, real_cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The calibrated metrics' weights and reference: |t| of the condition's evaluated cells
        against the other perturbed cells of the cell type (every split; the rest's variance over
        the condition's cells), min-max scaled, squared, summing to 1; the mean of the perturbed
        conditions' means."""
        groups = [(c, (condition == c) & (cell_type == ct)) for c in sorted(set(condition) - {"control"})]
        groups = [(c, m) for c, m in groups if m.any()]
        rest = np.zeros(adata.n_obs, dtype=bool)
        for c, m in groups:
            rest |= m if c != cond else False
        own, other, n = x[real_cells], x[rest], real_cells.sum()
        t = (own.mean(0) - other.mean(0)) / np.sqrt((own.var(0, ddof=1) + other.var(0, ddof=1)) / n)
        t = np.where(np.isfinite(t), np.abs(t), 0.0)
        w = ((t - t.min()) / (t.max() - t.min())) ** 2
        return w / w.sum(), np.mean([x[m].mean(0) for _, m in groups], axis=0)

    def weighted_r2(pred: np.ndarray, truth: np.ndarray, w: np.ndarray) -> float:
        mean = (w * truth).sum() / w.sum()
        return 1.0 - float((w * (truth - pred) ** 2).sum()) / float((w * (truth - mean) ** 2).sum())

    def second_half(rows: np.ndarray) -> np.ndarray:
        """evaluate's fixed halves: splitmix64 of the store row, its lowest bit."""
        z = rows.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return ((z ^ (z >> np.uint64(31))) & np.uint64(1)) == 1

    def bh(p: np.ndarray) -> np.ndarray:
        """Benjamini-Hochberg, a NaN p ranked as 1 and kept NaN."""
        filled = np.where(np.isnan(p), 1.0, p)
        order = np.argsort(filled, kind="stable")
        q = filled[order] * len(p) / np.arange(1, len(p) + 1)
        q = np.minimum.accumulate(q[::-1])[::-1]
        out = np.empty_like(q)
        out[order] = np.minimum(q, 1.0)
        return np.where(np.isnan(p), np.nan, out)

    def interpolated(cells: np.ndarray, controls: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The interpolated duplicate and the first half's means."""
        from scipy import stats

        rows = np.flatnonzero(cells)
        second = second_half(rows)
        duplicate = x[rows[second]]
        with np.errstate(all="ignore"):
            p = stats.ttest_ind(duplicate, x[controls], equal_var=False).pvalue
        a = 1.0 - np.nan_to_num(bh(p), nan=1.0)
        return a * duplicate.mean(0) + (1.0 - a) * base, x[rows[~second]].mean(0)

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
        centroid = control + context(row["condition"], ct)
        assert row["context_mean_r2_mean"] == pytest.approx(r2(centroid, real), abs=1e-9)
        assert row["beats_context_mean"] in (0.0, 1.0)
        # Held out: no training cells of the condition there, so no perturbation-matched mean.
        assert np.isnan(row["matched_mean_r2_mean"]) and np.isnan(row["beats_matched_mean"])
        real_cells = (split == "ood") & (condition == row["condition"]) & (cell_type == ct)
        w, reference = calibration(row["condition"], ct, real_cells)
        assert row["context_mean_weighted_mse"] == pytest.approx(float((w * (centroid - real) ** 2).sum()), rel=1e-9)
        collapsed = weighted_r2(centroid - reference, real - reference, w)
        assert row["context_mean_weighted_r2_delta"] == pytest.approx(collapsed, abs=1e-9)
        assert np.isfinite(row["weighted_mse"]) and np.isfinite(row["weighted_r2_delta"])
        assert -1.0 <= row["pearson_delta_perturbed"] <= 1.0
        guess, first = interpolated(real_cells, (condition == "control") & (cell_type == ct), centroid)
        assert row["interpolated_r2_mean"] == pytest.approx(r2(guess, first), abs=1e-7)
        # Two held-out conditions in the unseen cell type: each is a hit or a miss there.
        alone = (metrics["cell_type"] == ct).sum() < 2
        assert np.isnan(row["centroid_accuracy"]) if alone else row["centroid_accuracy"] in (0.0, 1.0)
        assert row["pearson_delta_perturbed"] != pytest.approx(row["pearson_delta"], abs=1e-6)
        if row["condition"] == combination:
            shifts = [shift(p, ct) for p in combination.split("+")]
            if any(s is None for s in shifts):
                # A part without training cells in these covariates: no additive baseline.
                assert np.isnan(row["additive_r2_mean"]) and np.isnan(row["beats_additive"])
            else:
                assert np.isnan(row["knn_r2_mean"]), "a combination has no nearest-perturbations baseline"
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
            scaled = control + slope * np.mean(others, axis=0)
            assert row["other_covariates_scaled_r2_mean"] == pytest.approx(r2(scaled, real), abs=1e-9)
            assert abs(slope - 1.0) > 0.01, "a slope of 1 would not tell the two baselines apart"
            assert row["beats_other_covariates_scaled"] in (0.0, 1.0)
            # The nearest: the other cell type whose training controls' mean is closest to the
            # unseen one's control mean; two others, so it is not the average.
            assert len(others) == 2
            train_control = {o: mean((split == "train") & (condition == "control") & (cell_type == o))
                             for o in cell_types if o != unseen}
            near = min(train_control, key=lambda o: np.linalg.norm(train_control[o] - control))
            alone = control + shift(single, near)
            assert row["nearest_covariates_r2_mean"] == pytest.approx(r2(alone, real), abs=1e-9)
            assert row["nearest_covariates_r2_mean"] != pytest.approx(row["other_covariates_r2_mean"], abs=1e-9)
            assert row["beats_nearest_covariates"] in (0.0, 1.0)
            assert np.isnan(row["additive_r2_mean"]), "a single perturbation has no additive baseline"
            # The nearest perturbations: the other singles with training cells in this cell type,
            # nearest to it by cosine in the model's perturbation embedding, up to five, averaged.
            embeddings = run.perturbation_embeddings().drop(columns="is_control")
            unit = lambda p: embeddings.loc[p].to_numpy() / np.linalg.norm(embeddings.loc[p].to_numpy())  # noqa: E731
            candidates = [p for p in perturbations if p != single and shift(p, ct) is not None]
            near = sorted(candidates, key=lambda p: -float(unit(p) @ unit(single)))[:5]
            knn = control + np.mean([shift(p, ct) for p in near], axis=0)
            assert row["knn_r2_mean"] == pytest.approx(r2(knn, real), abs=1e-9)
            assert row["beats_knn"] in (0.0, 1.0)
            checked += 1
    assert checked >= 2, metrics[["cell_type", "condition"]]
    # The perturbation-matched mean of a seen condition: the single perturbation's validation
    # cells of the seen cell type against its own training cells' mean.
    valid = run.evaluate(store, split="valid", threads=1)
    row = valid[(valid["condition"] == single) & (valid["cell_type"] == cell_types[0])].iloc[0]
    control = mean((condition == "control") & (cell_type == cell_types[0]))
    real = mean((split == "valid") & (condition == single) & (cell_type == cell_types[0]))
    matched = mean((split == "train") & (condition == single) & (cell_type == cell_types[0]))
    assert row["matched_mean_r2_mean"] == pytest.approx(r2(matched, real), abs=1e-9)
    assert row["context_mean_r2_mean"] == pytest.approx(r2(control + context(single, cell_types[0]), real), abs=1e-9)
    summary = metrics.attrs["summary"]
    assert "additive_r2_mean" in summary and "beats_other_covariates" in summary and "beats_linear" in summary
    assert "beats_context_mean" in summary and "pearson_delta_perturbed" in summary
    assert "beats_nearest_covariates" in summary and "beats_other_covariates_scaled" in summary


def test_the_linear_baseline_on_perturbation_features_predicts_an_unseen_perturbation_as_numpy_does(tmp_path):
    """A perturbation without any training cell: the indicator ridge cannot place it, the ridge on
    the model's perturbation features (the synthetic atlas's own table) can; repeated in numpy."""
    import polars as pl

    adata = synthetic(tmp_path, cells=3000, perturbations=5, cell_types=2, combinations=0, seed=11)
    obs = adata.obs
    condition, cell_type = obs["condition"].to_numpy(), obs["cell_type"].to_numpy()
    unseen = sorted(set(condition) - {"control"})[-1]
    split = np.where(condition == unseen, "ood", "train").astype(object)
    adata.obs["split"] = split
    features = tmp_path / "synth.store" / "perturbation_features.parquet"
    store = cs.import_h5ad(adata, tmp_path / "data.store", progress=False)
    run = cs.train(store, tmp_path / "run", perturbation_key="condition", dosage_key="dose",
                   categorical_covariate_keys=["cell_type"], split_key="split", max_epochs=2, seed=1, threads=1,
                   perturbation_features=features, progress=False)
    metrics = run.evaluate(store, split="ood", threads=1)
    x = log1p_counts(adata)
    table = pl.read_parquet(features)
    names = table.get_column(table.columns[0]).to_list()
    values = table.drop(table.columns[0]).to_numpy().astype(np.float32).astype(np.float64)
    row_of = {n: values[i] for i, n in enumerate(names)}
    cell_types = sorted(set(cell_type))

    def design(cond: str, ct: str) -> np.ndarray:
        onehot = np.array([1.0 if ct == c else 0.0 for c in cell_types])
        return np.concatenate([row_of[cond], onehot, [1.0]])

    train = split == "train"
    rows, changes = [], []
    for cond in sorted(set(condition) - {"control", unseen}):
        for ct in cell_types:
            treated = train & (condition == cond) & (cell_type == ct)
            control = train & (condition == "control") & (cell_type == ct)
            if treated.any() and control.any():
                rows.append(design(cond, ct))
                changes.append(x[treated].mean(0) - x[control].mean(0))
    a, y = np.array(rows), np.array(changes)
    weights = a.T @ np.linalg.solve(a @ a.T + np.eye(len(a)), y) if a.shape[1] > len(a) else \
        np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ y)
    assert len(metrics) == len(cell_types)
    for _, row in metrics.iterrows():
        ct = row["cell_type"]
        control = x[(condition == "control") & (cell_type == ct)].mean(0)
        real = x[(split == "ood") & (condition == unseen) & (cell_type == ct)].mean(0)
        linear = control + design(unseen, ct) @ weights
        assert row["linear_features_r2_mean"] == pytest.approx(r2(linear, real), abs=1e-7)
        assert row["beats_linear_features"] in (0.0, 1.0)


def test_whether_effects_carry_over_between_cell_types_equals_a_computation_by_hand(tmp_path):
    """``attrs["transfer"]``: the Pearson correlation of two conditions' training shifts (training
    cells minus the training controls of their cell type) in different cell types, averaged over
    the pairs of the same perturbation and over those of different ones."""
    adata = synthetic(tmp_path, cells=3000, perturbations=4, cell_types=3, combinations=0, seed=7)
    obs = adata.obs
    cell_types = sorted(obs["cell_type"].unique())
    split = np.where(np.random.default_rng(1).random(adata.n_obs) < 0.8, "train", "valid").astype(object)
    # One perturbation has no training cells in one cell type: it has no shift there.
    perturbations = sorted(c for c in obs["condition"].unique() if c != "control")
    dropped = (obs["condition"] == perturbations[0]).to_numpy() & (obs["cell_type"] == cell_types[2]).to_numpy()
    split[dropped] = "valid"
    adata.obs["split"] = split
    store, run = trained(adata, tmp_path, max_epochs=1)
    metrics = run.evaluate(store, split="valid", threads=1)
    transfer = metrics.attrs["transfer"]
    # attrs["reproducibility"] counts the metrics' change_reproducibility (checked by hand in
    # tests/integration/predict.rs): the synthetic atlas's changes are real.
    r = metrics["change_reproducibility"].dropna()
    counted = metrics.attrs["reproducibility"]
    assert counted["conditions"] == len(r) > 0
    assert counted["not_reproduced"] == int((r < counted["noise_r"]).sum()) < len(r) / 2
    assert counted["median_r"] == pytest.approx(float(np.median(r)), abs=1e-12)

    x = log1p_counts(adata)
    condition, cell_type = obs["condition"].to_numpy(), obs["cell_type"].to_numpy()
    train = split == "train"
    shifts = {}
    for p in perturbations:
        for ct in cell_types:
            treated = train & (condition == p) & (cell_type == ct)
            if treated.any():
                shifts[(p, ct)] = x[treated].mean(0) - x[train & (condition == "control") & (cell_type == ct)].mean(0)
    same, other = [], []
    keys = list(shifts)
    for i, (p1, c1) in enumerate(keys):
        for p2, c2 in keys[i + 1:]:
            if c1 != c2:
                (same if p1 == p2 else other).append(np.corrcoef(shifts[(p1, c1)], shifts[(p2, c2)])[0, 1])
    assert len(same) == 3 * 3 + 1  # three perturbations in 3 cell types, one in 2
    assert transfer["same_pairs"] == len(same) and transfer["other_pairs"] == len(other)
    assert transfer["same_perturbation_r"] == pytest.approx(np.mean(same), abs=1e-9)
    assert transfer["other_perturbations_r"] == pytest.approx(np.mean(other), abs=1e-9)
    assert transfer["carries_over"] == (np.mean(same) - np.mean(other) >= 0.05)
    assert transfer["slope"] == pytest.approx(transfer_slope(shifts), rel=1e-9)
    # cpa_stream.metrics.transfer, given the same shifts, is evaluate's computation (the fidelity
    # harness's transfer slope).
    from cpa_stream import metrics as m

    again = m.transfer([(p, ct, s) for (p, ct), s in shifts.items()])
    for key in ("same_pairs", "other_pairs", "carries_over"):
        assert again[key] == transfer[key], key
    for key in ("same_perturbation_r", "other_perturbations_r", "slope"):
        assert again[key] == pytest.approx(transfer[key], rel=1e-9, abs=1e-12), key
    # The synthetic atlas gives a perturbation one latent effect in every cell type.
    assert transfer["carries_over"], transfer


def test_a_perturbation_that_changes_nothing_does_not_reproduce_a_change(tmp_path):
    """``change_reproducibility`` end to end: control cells relabelled as a perturbation that
    changes nothing reproduce no change between halves of their cells and of the controls; the
    atlas's perturbations do, and ``attrs["reproducibility"]`` counts the one that does not."""
    ad = pytest.importorskip("anndata")
    synth = cs.synth(tmp_path / "synth.store", genes=200, doses=1, cells=4000, perturbations=2, cell_types=1,
                     combinations=0, seed=5, progress=False)
    cs.export_h5ad(synth, tmp_path / "synth.h5ad")
    adata = ad.read_h5ad(tmp_path / "synth.h5ad")
    condition = adata.obs["condition"].astype(str).to_numpy().copy()
    controls = np.flatnonzero(condition == "control")
    condition[np.random.default_rng(2).choice(controls, size=len(controls) // 2, replace=False)] = "NOOP"
    adata.obs["condition"] = condition
    store, run = trained(adata, tmp_path, max_epochs=1, split_key=None)
    metrics = run.evaluate(store, split="all", threads=1)
    r = metrics.set_index("condition")["change_reproducibility"]
    assert set(r.index) == {"NOOP", "PERT01", "PERT02"}
    assert abs(r["NOOP"]) < 0.1, r
    assert (r.drop("NOOP") > 0.5).all(), r
    counted = metrics.attrs["reproducibility"]
    assert (counted["conditions"], counted["not_reproduced"]) == (3, 1)
