"""`cpa_stream.fidelity`, the harness beside cpa-tools: its scorer against a computation by hand, its
control draws against run_peer.py's, and its translation of cpa-tools' hyper-parameters as a
configuration cpa-stream trains with."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np
import pytest

from conftest import COMPUTE, LABELS, REPO

from cpa_stream import metrics

RUN_PEER = REPO.parent / "shared" / "peer" / "cpa-tools" / "run_peer.py"


@pytest.fixture(scope="module")
def fidelity():
    # The peer harness beside the repository, wherever pytest runs from (skipped where absent).
    os.environ.setdefault("CPA_FIDELITY_PEER", str(RUN_PEER.parent))
    from cpa_stream import fidelity as module

    return module


@pytest.fixture(scope="module")
def prepared(fidelity, adata, tmp_path_factory):
    """The bundled data with the harness's split column."""
    directory = tmp_path_factory.mktemp("fidelity")
    path = directory / "in.h5ad"
    adata.write_h5ad(path)
    args = ["prepare", str(path), str(directory / "d")]
    sys.argv = ["cpa_stream.fidelity", *args]
    fidelity.main()
    return directory / "d"


def test_the_split_is_stratified_and_recorded(prepared):
    import anndata as ad

    meta = json.loads((prepared / "meta.json").read_text())
    data = ad.read_h5ad(prepared / "data.h5ad")
    split = data.obs["fidelity_split"].astype(str)
    assert meta["cells"] == {s: int((split == s).sum()) for s in ["train", "valid", "test"]}
    # Every group of 3 cells or more has test cells.
    group = data.obs["cell_type"].astype(str) + "|" + data.obs["condition"].astype(str)
    sizes = group.value_counts()
    tested = set(group[split == "test"])
    assert all(g in tested for g, n in sizes.items() if n >= 3)


def prepared_cells(fidelity, prepared):
    """The prepared data as the scorer sees it: meta, the AnnData, log1p counts, each cell's group
    key, and which cells are test cells and which are controls."""
    import anndata as ad

    meta = fidelity.read_meta(prepared)
    data = ad.read_h5ad(prepared / "data.h5ad")
    values = np.log1p(np.asarray(data.X.todense(), dtype=np.float64))
    group = fidelity.group_keys(data.obs, meta)
    test = data.obs["fidelity_split"].astype(str).values == "test"
    ctrl = data.obs["condition"].astype(str).values == "control"
    return meta, data, values, group, test, ctrl


def test_the_scorer_equals_r2_by_hand(fidelity, prepared):
    meta, data, values, group, test, ctrl = prepared_cells(fidelity, prepared)
    cov = data.obs["cell_type"].astype(str).values
    # A prediction: the group's true test mean plus a fixed perturbation on one gene.
    predictions = {}
    for g in np.unique(group[test & ~ctrl]):
        m = test & (group == g)
        shifted = values[m].mean(0).copy()
        shifted[0] += 0.5
        predictions[g] = {"cf": shifted, "recon": values[m].mean(0)}
    result = fidelity.score(str(prepared), predictions, 0)
    rows = {r["group"]: r for r in result["groups"]}
    g = next(iter(rows))
    m = test & (group == g)
    t = values[m].mean(0)
    c = values[ctrl & (cov == cov[np.argmax(m)])].mean(0)
    p = predictions[g]["cf"]
    r2 = lambda a, b: 1 - ((a - b) ** 2).sum() / ((a - a.mean()) ** 2).sum()  # noqa: E731
    deg = np.argsort(-np.abs(values[group == g].mean(0) - c))[:20]
    assert rows[g]["cf_all"] == pytest.approx(r2(t, p))
    assert rows[g]["cf_deg"] == pytest.approx(r2(t[deg], p[deg]))
    assert rows[g]["cf_change"] == pytest.approx(r2(t - c, p - c))
    assert rows[g]["recon_all"] == pytest.approx(1.0)
    assert rows[g]["ctrl_all"] == pytest.approx(r2(t, c))
    assert result["mean"]["recon_all"] == pytest.approx(1.0)


@pytest.mark.skipif(not RUN_PEER.exists(), reason=f"no {RUN_PEER} (the peer harness)")
def test_the_translation_trains(fidelity, store, tmp_path):
    import cpa_stream as cs

    model, plan = fidelity.peer_defaults()
    config, unexpressed = fidelity.translate(model, plan, batch_size=128, check_val_every=5, max_comb_len=2,
                                             epochs=1, seed=0)
    assert config["model"]["dropout_rate_decoder"] == 0.0 and unexpressed
    path = tmp_path / "cpa.toml"
    path.write_text(fidelity.toml_text(config))
    run = cs.train(store, tmp_path / "run", **LABELS, config=path, progress=False, **COMPUTE)
    trained = run.config
    assert trained["model"]["n_hidden_decoder"] == model["n_hidden_decoder"]
    assert trained["adversary"]["reg_adv"] == plan["reg_adv"]
    assert trained["training"]["n_epochs_pretrain_ae"] == 2


@pytest.mark.skipif(not RUN_PEER.exists(), reason=f"no {RUN_PEER} (the peer harness)")
def test_the_control_draws_are_run_peers(fidelity, prepared):
    """run_peer.py draws, per test cell in order, rng.choice over the control cells of its
    covariates with default_rng(seed); the harness must decode the same cells."""
    import anndata as ad

    meta = fidelity.read_meta(prepared)
    data = ad.read_h5ad(prepared / "data.h5ad")
    test_idx = np.where(data.obs["fidelity_split"].astype(str).values == "test")[0]
    drawn = fidelity.cf_draws(data.obs, meta, test_idx, 3)
    source = RUN_PEER.read_text()
    assert "src[i] = rng.choice(pool)" in source and "rng = np.random.default_rng(a.seed)" in source
    rng = np.random.default_rng(3)
    ctrl = data.obs["condition"].astype(str).values == "control"
    cov = data.obs["cell_type"].astype(str).values
    expected = [rng.choice(np.where(ctrl & (cov == cov[i]))[0]) for i in test_idx]
    assert list(drawn) == expected


def test_the_reference_preset_and_definitions_from_python(store, run, tmp_path):
    import cpa_stream as cs

    trained = cs.train(store, tmp_path / "ref", **LABELS, preset="reference", config={"training": {"lr": 1e-3}},
                       max_epochs=1, progress=False, **COMPUTE)
    assert trained.config["training"]["lr_schedule"] == "reference"
    assert trained.config["training"]["lr"] == 1e-3
    with pytest.raises(ValueError, match="unseen-covariates"):
        cs.train(store, tmp_path / "bad", **LABELS, preset="paper", max_epochs=1, progress=False, **COMPUTE)
    unseen = cs.train(store, tmp_path / "unseen", **LABELS, preset="unseen-covariates", max_epochs=1, progress=False,
                      **COMPUTE)
    assert unseen.config["model"]["perturbation_skip"] is True
    assert unseen.config["model"]["n_latent"] == 128
    # The preset's doser_type "auto" is resolved from the data: the bundled data have one dose.
    assert (unseen.config["model"]["doser_type"], unseen.config["training"]["mixup_alpha"]) == ("linear", 0.0)
    frame = run.evaluate(store, definitions="reference", progress=False)
    assert set(frame["deg_source"]) == {"mean difference"}
    assert set(frame["control_source"]) == {"all"}


def test_the_expected_log1p_of_a_negative_binomial_is_exact(fidelity):
    from scipy.stats import nbinom

    for mu, theta in [(0.05, 0.3), (0.5, 1.0), (3.0, 0.2), (40.0, 4.0), (200.0, 20.0)]:
        k = np.arange(0, 200_000)
        pmf = nbinom.pmf(k, theta, theta / (theta + mu))
        exact = float((pmf * np.log1p(k)).sum())
        got = float(fidelity.expected_log1p_nb(np.array([mu]), np.array([theta]))[0])
        assert got == pytest.approx(exact, abs=2e-3), (mu, theta)
        assert got < np.log1p(mu)  # Jensen: log1p of the mean overstates it


def test_the_draws_split_the_spread_between_models_and_draws(fidelity, tmp_path, monkeypatch, capsys):
    """`cpa_stream.fidelity draws`: model seed i scored with draw seed j; here the score is 0.1 i + 0.01 j
    (a fake prediction and scorer), so the spread over models is 10 times that over draws."""
    for seed in (0, 1, 2):
        (tmp_path / "results" / f"v-e5-s{seed}" / "run").mkdir(parents=True)
    # Patched where `draws` looks them up (its module).
    monkeypatch.setattr(fidelity.tools, "read_meta", lambda directory: {})
    monkeypatch.setattr(fidelity.tools, "predict_groups", lambda d, meta, run, draw: (run, draw))
    def fake_score(directory, predictions, draw):
        run, _ = predictions
        model = int(run.split("-s")[-1].split("/")[0])
        value = 0.1 * model + 0.01 * draw
        return {"mean": {"cf_all": value, "cf_deg": value, "cf_change": value}}
    monkeypatch.setattr(fidelity.tools, "score", fake_score)
    monkeypatch.setattr(sys, "argv", ["cpa_stream.fidelity", "draws", str(tmp_path), "--variant", "v", "--epochs", "5"])
    fidelity.main()
    out = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines()}
    assert "0.100 / 0.100 / 0.100" in lines["sd over models, draws fixed"]
    assert "0.010 / 0.010 / 0.010" in lines["sd over draws, model fixed"]
    # The harness's own pairing (model seed = draw seed): 0, 0.11, 0.22.
    assert "mean 0.110 / 0.110 / 0.110, sd 0.110 / 0.110 / 0.110" in lines["model seed = draw seed (the harness)"]


def test_the_paired_comparison_pairs_seeds_and_bounds_the_spread_ratio(fidelity):
    def result(seed, value):
        return {"seed": seed, "mean": {k: value for k, _ in fidelity.PAIRED_METRICS}}

    peer_values = [0.70, 0.74, 0.79, 0.72, 0.77]  # mean 0.744
    # cpa-stream: half the deviations about a mean 0.01 higher, seed by seed; seed 9 unpaired.
    stream = [result(s, 0.754 + (v - 0.744) / 2) for s, v in enumerate(peer_values)] + [result(9, 0.0)]
    peer = [result(s, v) for s, v in enumerate(peer_values)]
    p = fidelity.paired(stream, peer)
    assert p["seeds"] == 5
    for key, _ in fidelity.PAIRED_METRICS:
        m = p[key]
        d = np.array([0.754 + (v - 0.744) / 2 - v for v in peer_values])
        assert m["diff"] == pytest.approx(d.mean())
        assert m["diff_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(5))
        assert m["ahead"] == 3  # seeds 0, 1 and 3 (differences 0.032, 0.012, 0.022; -0.013, -0.003)
        assert m["sd_ratio"] == pytest.approx(0.5)
        # The deviations are proportional in every resample, so the interval is the ratio itself.
        assert m["sd_ratio_90"] == pytest.approx((0.5, 0.5))
    assert fidelity.paired(stream[:2], peer[:2]) is None

    by = {(10, "cpa-tools"): peer, (10, "cpa-stream"): stream, (10, "cpa-stream-elog"): stream}
    lines = fidelity.paired_lines(by)
    rows = [line for line in lines if line.startswith("| 10 |")]
    assert len(rows) == 1 and "cpa-stream vs cpa-tools" in rows[0] and "0.50 [0.50, 0.50]" in rows[0]


def test_the_peer_draw_grid_scores_each_model_with_each_draw(fidelity, prepared, capsys):
    """cpa-tools keeps no model, so its draws grid is read from what peer_anchor.py wrote: each
    model's group means for every seed's draws (draws.npz) and its reconstruction (groups.npz).
    Cell [i, j] must be the scorer's result for model i's predictions under draw seed j, and a
    model whose own draws no longer score as its run did is refused."""
    from types import SimpleNamespace

    meta, data, values, group, test, ctrl = prepared_cells(fidelity, prepared)
    groups = np.array([g for g in np.unique(group[test & ~ctrl]) if (test & (group == g)).sum() >= 2])
    truth = np.stack([values[test & (group == g)].mean(0) for g in groups])
    seeds = [0, 1, 2]
    # Model i under draw j: the truth off by a pattern of its own on the first genes.
    off = lambda i, j: np.concatenate([[0.3 * (i + 1), -0.2 * (j + 1), 0.1 * i * j], np.zeros(truth.shape[1] - 3)])  # noqa: E731
    for i in seeds:
        out = prepared / "results" / f"cpa-tools-e5-s{i}"
        out.mkdir(parents=True)
        np.savez(out / "groups.npz", groups=groups, pred_recon=truth, pred_cf=truth + off(i, i))
        np.savez(out / "draws.npz", groups=groups, seeds=np.array(seeds),
                 pred_cf=np.stack([truth + off(i, j) for j in seeds]))
    got, grid = fidelity.draw_grid(str(prepared), meta, "cpa-tools", 5)
    assert got == seeds
    for i in seeds:
        for j in seeds:
            preds = {str(g): {"cf": truth[k] + off(i, j), "recon": truth[k]} for k, g in enumerate(groups)}
            want = fidelity.score(str(prepared), preds, j)["mean"]
            assert list(grid[i, j]) == pytest.approx([want[k] for k in fidelity.DRAW_METRICS])
    # Different models and draws score differently: the grid is not one number repeated.
    assert len({round(v, 9) for v in grid[:, :, 0].ravel()}) == 9

    fidelity.draws(SimpleNamespace(dir=str(prepared), variant="cpa-tools", against=None, epochs=5, verbose=False))
    printed = capsys.readouterr().out
    averaged = grid.mean(1)
    assert f"each model over all draws:            mean {averaged[:, 0].mean():.3f}" in printed
    assert f"sd over draws, model fixed:           {grid.std(1, ddof=1).mean(0)[0]:.3f}" in printed
    # Against itself every ratio is 1 and every difference 0.
    fidelity.draws(SimpleNamespace(dir=str(prepared), variant="cpa-tools", against="cpa-tools", epochs=5, verbose=False))
    printed = capsys.readouterr().out
    assert "over all draws, mean difference:      +0.000 ± 0.000 (3/3)" in printed
    one = r"1\.00 \[1\.00, 1\.00\]"
    for name in ("training", "draws", "any pair"):
        assert re.search(rf"spread ratio, {name}:\s+{one} / ", printed), name

    kept = {"mean": {k: float(grid[1, 1, n]) + (0.01 if k == "cf_deg" else 0.0)
                     for n, k in enumerate(fidelity.DRAW_METRICS)}}
    (prepared / "results" / "cpa-tools-e5-s1" / "score.json").write_text(json.dumps(kept))
    with pytest.raises(SystemExit, match="s1: its own draws score"):
        fidelity.draw_grid(str(prepared), meta, "cpa-tools", 5)


def test_the_best_epoch_is_read_from_the_runs_validation_score(fidelity, run):
    """score.json's ``best_epoch`` (issue 52 item 6): the epoch of the best ``val_score``, not null."""
    history = run.history
    assert "val_score" in history.columns
    best = fidelity.best_epoch(history)
    scored = history.dropna(subset=["val_score"])
    assert best is not None and best in set(scored["epoch"])
    assert scored.loc[scored["epoch"] == best, "val_score"].iloc[0] == scored["val_score"].max()
    assert fidelity.best_epoch(history.drop(columns=["val_score"])) is None


def test_the_celltype_split_holds_out_one_values_shared_conditions_and_scores_its_baselines(fidelity, adata, tmp_path):
    """``--split celltype`` (issue 52 item 4): the held-out value's perturbed cells of conditions
    another value has are test cells and nothing else is; the scorer's other-covariates baseline
    equals its computation by hand from training cells."""
    import anndata as ad

    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    sys.argv = ["cpa_stream.fidelity", "prepare", str(path), str(tmp_path / "d"), "--split", "celltype"]
    fidelity.main()
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    data = ad.read_h5ad(tmp_path / "d" / "data.h5ad")
    obs = data.obs
    split = obs["fidelity_split"].astype(str).values
    cov, condition = obs["cell_type"].astype(str).values, obs["condition"].astype(str).values
    unseen = meta["heldout_value"]
    perturbed = condition != "control"
    elsewhere = set(condition[perturbed & (cov != unseen)])
    expected = perturbed & (cov == unseen) & np.isin(condition, list(elsewhere))
    assert expected.any()
    # Those cells are all test cells (none trained on); the other groups split as `random` does.
    assert (split[expected] == "test").all()
    assert set(meta["held_out_conditions"]) == {f"{unseen}|{c}" for c in np.unique(condition[expected])}

    values = np.log1p(np.asarray(data.X.todense(), dtype=np.float64))
    group = fidelity.group_keys(obs, meta)
    test, ctrl = split == "test", condition == "control"
    predictions = {g: {"cf": values[test & (group == g)].mean(0), "recon": values[test & (group == g)].mean(0)}
                   for g in np.unique(group[test])}
    result = fidelity.score(str(tmp_path / "d"), predictions, 0)
    held_rows = [r for r in result["groups"] if r["held_out"]]
    assert held_rows and all(r["group"].startswith(f"{unseen}|") for r in held_rows)
    row = held_rows[0]
    m = test & (group == row["group"])
    p = condition[np.argmax(m)]
    train = split == "train"
    shifts = [values[train & (condition == p) & (cov == o)].mean(0) - values[train & ctrl & (cov == o)].mean(0)
              for o in np.unique(cov) if o != unseen and (train & (condition == p) & (cov == o)).any()]
    base = values[ctrl & (cov == unseen)].mean(0) + np.mean(shifts, axis=0)
    t = values[m].mean(0)
    r2 = lambda a, b: 1 - ((a - b) ** 2).sum() / ((a - a.mean()) ** 2).sum()  # noqa: E731
    assert row["shift_all"] == pytest.approx(r2(t, base))
    assert np.isnan(row["additive_all"]) or "+" in p
    # The nearest value's shift: the value whose training controls' mean is closest to the
    # unseen value's control mean, by hand.
    own = values[ctrl & (cov == unseen)].mean(0)
    candidates = [o for o in np.unique(cov) if o != unseen and (train & (condition == p) & (cov == o)).any()]
    near = min(candidates, key=lambda o: np.linalg.norm(values[train & ctrl & (cov == o)].mean(0) - own))
    assert row["nearest_value"] == near
    alone = own + values[train & (condition == p) & (cov == near)].mean(0) - values[train & ctrl & (cov == near)].mean(0)
    assert row["nearest_all"] == pytest.approx(r2(t, alone))
    assert row["nearest_deg"] != row["shift_deg"] or len(candidates) == 1
    assert np.isfinite(result["held_out_mean"]["shift_all"])


def prepared_celltype(fidelity, adata, tmp_path):
    """The bundled data prepared with ``--split celltype`` in ``tmp_path/d``, its store imported."""
    import cpa_stream as cs

    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    d = tmp_path / "d"
    sys.argv = ["cpa_stream.fidelity", "prepare", str(path), str(d), "--split", "celltype"]
    fidelity.main()
    cs.import_h5ad(d / "data.h5ad", d / "data.store", progress=False)
    return d


def test_slopes_score_the_anchored_prediction_and_the_shift_baseline_as_the_scorer_does(
        fidelity, adata, run, tmp_path, capsys):
    """``cpa_stream.fidelity slopes``: per test group of the held-out cell type, the shift baseline's
    top-20 DEG R2 is the scorer's; the model's R2 is that of its anchored group mean, and its
    slope is the regression of that prediction's change on the real change, by hand."""
    import anndata as ad
    import cpa_stream as cs

    d = prepared_celltype(fidelity, adata, tmp_path)
    (d / "results" / "v-e3-s0").mkdir(parents=True)
    os.symlink(run.path, d / "results" / "v-e3-s0" / "run")
    got = fidelity.slopes(argparse.Namespace(dir=str(d), variant="v", epochs=3, seed=0, covariate=None))
    assert "slope model / shift" in capsys.readouterr().out
    meta = json.loads((d / "meta.json").read_text())
    data = ad.read_h5ad(d / "data.h5ad")
    obs = data.obs
    group = fidelity.group_keys(obs, meta)
    test = obs["fidelity_split"].astype(str).values == "test"
    zeros = {"cf": np.zeros(data.n_vars), "recon": np.zeros(data.n_vars)}
    result = fidelity.score(str(d), {g: zeros for g in np.unique(group[test])}, 0)
    rows = {r["group"]: r for r in result["groups"]}
    held = [g for g in got if rows[g]["held_out"]]
    assert held and all(g.startswith(meta["heldout_value"] + "|") for g in got)
    for g in held:
        assert got[g]["shift_deg"] == pytest.approx(rows[g]["shift_deg"])
    # The model's numbers from the anchored aggregate, recomputed from two plain predictions.
    g = held[0]
    values = np.log1p(np.asarray(data.X.todense(), dtype=np.float64))
    cov, condition = obs["cell_type"].astype(str).values, obs["condition"].astype(str).values
    ctrl = condition == "control"
    unseen = meta["heldout_value"]
    source = f'condition == "control" and cell_type == "{unseen}"'
    p, dose = g.split("|")[1], g.split("|")[2]
    target = {"condition": p, "dose": dose, "cell_type": unseen}
    decoded = cs.Run(run.path).predict_anndata(d / "data.store", source=source, targets=target, threads=1, workers=1)
    own = cs.Run(run.path).predict_anndata(d / "data.store", source=source, threads=1, workers=1)
    cmean = values[ctrl & (cov == unseen)].mean(0)
    model = cmean + np.log1p(decoded.X).mean(0) - np.log1p(own.X).mean(0)
    t = values[test & (group == g)].mean(0)
    deg = np.argsort(-np.abs(values[group == g].mean(0) - cmean))[:fidelity.N_TOP_DEG]
    real = (t - cmean)[deg]
    assert got[g]["model_slope"] == pytest.approx(((model - cmean)[deg] @ real) / (real @ real), abs=1e-4)
    assert got[g]["model_deg"] == pytest.approx(fidelity.r2(t[deg], model[deg]), abs=1e-4)


def test_an_ensemble_scores_the_mean_of_its_seeds_predictions(fidelity, adata, store, run, tmp_path, capsys):
    """``cpa_stream.fidelity ensemble``: cpa-stream's ensemble (``predict --ensemble``, anchored) scores
    as the two seeds' anchored group predictions averaged, and so does ``--variant v+w`` (one
    seed's runs of two variants); cpa-tools' as its saved group means averaged, plain and
    anchored."""
    import cpa_stream as cs

    d = prepared_celltype(fidelity, adata, tmp_path)
    other = cs.train(store, tmp_path / "other", **LABELS, holdout=["MAP2K3+MAP2K6"], max_epochs=3, seed=2,
                     split_seed=1, progress=False, **COMPUTE)
    for seed, model in ((0, run.path), (1, other.path)):
        (d / "results" / f"v-e3-s{seed}").mkdir(parents=True)
        os.symlink(model, d / "results" / f"v-e3-s{seed}" / "run")
        (d / "results" / f"v-e3-s{seed}" / "score.json").write_text(json.dumps({"tool": "cpa-stream", "train_cpu_s": 1.0}))
    fidelity.ensemble(argparse.Namespace(dir=str(d), variant="v", epochs=3, seeds="0,1", size=2, anchor=True))
    got = json.loads((d / "results" / "v-ens2-delta-e3-s0" / "score.json").read_text())
    assert got["seeds"] == [0, 1] and got["variant"] == "v-ens2-delta" and got["train_cpu_s"] == 2.0
    meta = fidelity.read_meta(str(d))
    one, two = (fidelity.predict_groups(str(d), meta, str(m), 0, "mean", "drawn", True) for m in (run.path, other.path))
    assert one.keys() == two.keys()
    averaged = {g: {"cf": (one[g]["cf"] + two[g]["cf"]) / 2, "recon": one[g]["recon"]} for g in one}
    assert max(np.abs(one[g]["cf"] - two[g]["cf"]).max() for g in one) > 1e-3, "two seeds differ"
    expected = fidelity.score(str(d), averaged, 0)["held_out_mean"]
    for key in ("cf_all", "cf_deg", "cf_change"):
        assert got["held_out_mean"][key] == pytest.approx(expected[key], abs=1e-5), key

    # Two recipes averaged seed by seed (`--variant v+w`): seed 0 of each variant.
    (d / "results" / "w-e3-s0").mkdir(parents=True)
    os.symlink(other.path, d / "results" / "w-e3-s0" / "run")
    (d / "results" / "w-e3-s0" / "score.json").write_text(json.dumps({"tool": "cpa-stream", "train_cpu_s": 3.0}))
    fidelity.ensemble(argparse.Namespace(dir=str(d), variant="v+w", epochs=3, seeds="0", size=2, anchor=True))
    mixed = json.loads((d / "results" / "v+w-ens2-delta-e3-s0" / "score.json").read_text())
    assert mixed["seeds"] == [0, 0] and mixed["train_cpu_s"] == 4.0
    for key in ("cf_all", "cf_deg", "cf_change"):
        assert mixed["held_out_mean"][key] == pytest.approx(expected[key], abs=1e-5), key

    # cpa-tools: its saved group means, averaged here.
    groups = sorted(one)
    rng = np.random.default_rng(0)
    saved = []
    for seed in (0, 1):
        out = d / "results" / f"cpa-tools-e3-s{seed}"
        out.mkdir(parents=True)
        cf, own, recon = (rng.uniform(0, 2, (len(groups), adata.n_vars)) for _ in range(3))
        np.savez(out / "groups.npz", groups=np.array(groups), pred_cf=cf, pred_recon=recon)
        np.savez(out / "own.npz", pred_own=own)
        (out / "score.json").write_text(json.dumps({"tool": "cpa-tools", "train_cpu_s": 1.0}))
        saved.append((cf, own, recon))
    fidelity.ensemble(argparse.Namespace(dir=str(d), variant="cpa-tools", epochs=3, seeds="0,1", size=2, anchor=False))
    observed = fidelity.control_means(str(d), meta)
    plain = {g: {"cf": (saved[0][0][i] + saved[1][0][i]) / 2, "recon": (saved[0][2][i] + saved[1][2][i]) / 2}
             for i, g in enumerate(groups)}
    anchored = {g: {"cf": observed[fidelity.group_covariates(g, meta)]
                    + ((saved[0][0][i] - saved[0][1][i]) + (saved[1][0][i] - saved[1][1][i])) / 2,
                    "recon": plain[g]["recon"]} for i, g in enumerate(groups)}
    for variant, predictions in (("cpa-tools-ens2", plain), ("cpa-tools-ens2-delta", anchored)):
        got = json.loads((d / "results" / f"{variant}-e3-s0" / "score.json").read_text())
        expected = fidelity.score(str(d), predictions, 0)
        assert got["mean"]["cf_all"] == pytest.approx(expected["mean"]["cf_all"]), variant
        assert got["mean"]["recon_all"] == pytest.approx(expected["mean"]["recon_all"]), variant
    assert "ens2" in capsys.readouterr().out


def test_change_reproducibility_separates_a_real_change_from_noise(fidelity, tmp_path):
    """``change_reproducibility``: a group whose cells differ from the controls on 100 genes
    reproduces its change between disjoint halves; a group drawn like the controls does not, and
    a group without 2 cells in each half is left out."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(3)
    genes, base = 300, rng.uniform(1, 20, 300)
    moved = base.copy()
    moved[:100] *= rng.choice([0.25, 4.0], 100)
    sizes = {"control": 120, "moved": 60, "same": 60, "few": 3}
    rows = [rng.poisson(moved if name == "moved" else base, (n, genes)) for name, n in sizes.items()]
    obs = pd.DataFrame({"condition": np.repeat(list(sizes), list(sizes.values())), "cell_type": "A", "dose": "1.0"})
    obs["fidelity_split"] = np.where(obs["condition"] == "control", "train", "test")
    obs.index = obs.index.astype(str)
    directory = tmp_path / "d"
    directory.mkdir()
    ad.AnnData(np.vstack(rows).astype(np.float32), obs=obs).write_h5ad(directory / "data.h5ad")
    meta = {"perturbation_key": "condition", "dose_key": "dose", "control": "control", "covariates": ["cell_type"],
            "counts": True}
    rs = fidelity.change_reproducibility(str(directory), meta)
    assert set(rs) == {"A|moved|1.0", "A|same|1.0"}
    assert rs["A|moved|1.0"] > 0.9, rs
    assert abs(rs["A|same|1.0"]) < metrics.NOISE_REPRODUCIBILITY, rs


def test_the_calibrated_baseline_scales_the_shift_by_its_transfer_slope_in_training(fidelity, tmp_path, capsys):
    """``cpa_stream.fidelity calibrated``: the transfer slope regresses each training value's shift on the
    other training values' mean shift (through the origin, pooled), leaving the held-out value
    out; the calibrated baseline is the held-out controls' mean plus the shift baseline's shift
    times that slope; the generic shift adds the mean of every condition's training shift in the
    other values. Values as given (``counts`` false), so every number is known by hand."""
    import anndata as ad
    import pandas as pd

    genes = 4
    control = {"c0": [1.0, 1.0, 1.0, 1.0], "c1": [2.0, 2.0, 2.0, 2.0], "c2": [3.0, 1.0, 2.0, 5.0]}
    shift = {"c0": [1.0, 2.0, 0.0, 0.0], "c1": [2.0, 4.0, 0.0, 1.0], "c2": [0.5, 3.0, -1.0, 0.0]}
    drug2 = [0.0, -3.0, 4.0, 0.0]
    rows, labels = [], []
    for value in ("c0", "c1", "c2"):
        base = np.array(control[value])
        # Cells scattered symmetrically about each mean, so the means are exact.
        for sign in (-1.0, 1.0):
            rows.append(base + sign * 0.1)
            labels.append((value, "control", "train"))
            rows.append(base + np.array(shift[value]) + sign * 0.2)
            labels.append((value, "drug", "test" if value == "c2" else "train"))
        # A second drug in c0's training cells only: in the generic shift, not in the slope (no
        # other value to regress it on).
        if value == "c0":
            for sign in (-1.0, 1.0):
                rows.append(base + np.array(drug2) + sign * 0.2)
                labels.append((value, "drug2", "train"))
        # One cell of another condition, a test cell: a group under min_test_cells, left out.
        rows.append(base + 5.0)
        labels.append((value, "other", "test"))
    obs = pd.DataFrame(labels, columns=["cell_type", "condition", "fidelity_split"])
    obs["dose"] = "1.0"
    obs.index = obs.index.astype(str)
    directory = tmp_path / "d"
    directory.mkdir()
    ad.AnnData(np.array(rows, dtype=np.float32), obs=obs).write_h5ad(directory / "data.h5ad")
    meta = {"perturbation_key": "condition", "dose_key": "dose", "control": "control", "covariates": ["cell_type"],
            "counts": False, "heldout_value": "c2", "min_test_cells": 2}
    (directory / "meta.json").write_text(json.dumps(meta))

    got = fidelity.calibrated(argparse.Namespace(dirs=[str(directory)]))[str(directory)]
    s0, s1 = np.array(shift["c0"]), np.array(shift["c1"])
    beta = 2 * (s0 @ s1) / (s0 @ s0 + s1 @ s1)  # (1*2 + 2*4 + 0 + 0) * 2 / (5 + 21) = 20 / 26
    assert got["beta"] == pytest.approx(beta, rel=1e-6)
    assert got["groups"] == 1
    cmean, real = np.array(control["c2"]), np.array(control["c2"]) + np.array(shift["c2"])

    def r2(pred):
        return 1 - ((real - pred) ** 2).sum() / ((real - real.mean()) ** 2).sum()

    # 4 genes: the top-20 DEGs are all of them, so both scores are the same R2.
    for name, pred in (("shift", cmean + (s0 + s1) / 2), ("calibrated", cmean + beta * (s0 + s1) / 2),
                       ("generic", cmean + (s0 + s1 + np.array(drug2)) / 3), ("control", cmean)):
        assert got[name] == pytest.approx((r2(pred), r2(pred)), rel=1e-5), name
    assert got["calibrated"][0] != pytest.approx(got["shift"][0])
    assert "transfer slope 0.769" in capsys.readouterr().out

    # A split whose held-out value has one other value: no slope, said so.
    keep = obs["cell_type"].isin(["c0", "c2"]).values
    other = tmp_path / "e"
    other.mkdir()
    ad.AnnData(np.array(rows, dtype=np.float32)[keep], obs=obs[keep]).write_h5ad(other / "data.h5ad")
    (other / "meta.json").write_text(json.dumps(meta))
    assert fidelity.calibrated(argparse.Namespace(dirs=[str(other)]))[str(other)] == {"beta": None}
    assert "no transfer slope" in capsys.readouterr().out


MAKE_SYNTH = REPO.parent / "shared" / "peer" / "cpa-tools" / "make_synth.py"


@pytest.mark.skipif(not MAKE_SYNTH.exists(), reason=f"no {MAKE_SYNTH} (the peer harness's generator)")
def test_the_synthetic_oracle_replays_the_generator_and_scores_its_true_means(fidelity, tmp_path):
    """scripts/synth_oracle.py: the generator's draws replayed match the file's counts (a file whose
    counts differ is refused), and its true means score as the generating model does: E[log1p x]
    under the true NB, and the observed controls moved by the true change, nearer the real group
    means than log1p of the true mean, on all genes."""
    import subprocess

    import anndata as ad

    path = tmp_path / "synth.h5ad"
    subprocess.run([sys.executable, str(MAKE_SYNTH), "--out", str(path), "--seed", "5", "--n-cells", "1500",
                    "--n-genes", "300", "--n-drugs", "2", "--n-de-genes", "40"], check=True, capture_output=True)
    sys.argv = ["cpa_stream.fidelity", "prepare", str(path), str(tmp_path / "d"), "--split", "celltype"]
    fidelity.main()
    oracle = [sys.executable, str(REPO / "scripts" / "synth_oracle.py"), str(tmp_path / "d"), "--seed", "0"]
    out = subprocess.run(oracle, check=True, capture_output=True, text=True).stdout
    scores = {}
    for line in out.splitlines():
        found = re.match(r"\s+true means, (\w+)\s+held-out groups\s+([-\d.]+) / ([-\d.]+)", line)
        if found:
            scores[found.group(1)] = (float(found.group(2)), float(found.group(3)))
    shift = re.search(r"baseline shift\s+held-out groups\s+([-\d.]+)", out)
    assert set(scores) == {"plain", "expected", "anchored"} and shift, out
    # The generator's own means on all genes: under the shift baseline scored as the tools'
    # plain predictions are, over it as the expectation of log1p and anchored on the observed
    # controls (docs/fidelity.md, "What the synthetic unseen cell types allow").
    assert scores["expected"][0] > float(shift.group(1)) > scores["plain"][0] > 0.5, out
    assert scores["anchored"][0] > float(shift.group(1)), out
    assert scores["expected"][1] > 0.5 and scores["anchored"][1] > 0.5, out

    data = ad.read_h5ad(tmp_path / "d" / "data.h5ad")
    data.X = data.X.copy()
    data.X[0, 0] = data.X[0, 0] + 1
    data.write_h5ad(tmp_path / "d" / "data.h5ad")
    refused = subprocess.run(oracle, capture_output=True, text=True)
    assert refused.returncode != 0 and "differ from the file's" in refused.stderr, refused.stderr
