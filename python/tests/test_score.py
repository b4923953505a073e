"""`cpa-stream score` against cell-eval2 0.20.0 on the same files: every vcc2026 metric per
perturbation, the aggregates, and the scaled scores of a real bundle, to 1e-6. Skipped with the
reason where cell-eval2 is not installed (scripts/python.sh --tests installs it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_counts import cell_eval2

METRICS = [
    "pds_cosine",
    "expr_mse_unbiased",
    "expr_mse_unbiased_capped",
    "expr_distance_unbiased",
    "de_wilcoxon_direction_fidelity_yield_raw",
    "de_wilcoxon_direction_reach_raw",
    "de_wilcoxon_sig_jaccard",
    "de_wilcoxon_lfc_nmae",
]
# cpa-stream computes the DE of cell-eval2's scanpy engine, which cell-eval2 picks on a CPU only
# where pdex is not installed; named, so that an environment with pdex compares the same engine.
PRESET = ["--preset", "vcc2026", "--pert-col", "condition", "--control", "control", "--set", "de.backend=scanpy"]
PERTURBATIONS = ["G3", "G7", "G11", "G20", "NOTAGENE", "G50", "G51", "G90"]


def write_panel(path: Path, blocks, genes, reorder: bool = False) -> None:
    """An .h5ad of the blocks of cells; `reorder`: the label's categories in reverse order
    (pandas groups a categorical column in its categories' order)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    labels = [label for label, x in blocks for _ in range(len(x))]
    categories = sorted(set(labels), reverse=reorder)
    obs = pd.DataFrame(
        {"condition": pd.Categorical(labels, categories=categories)}, index=[f"c{i}" for i in range(len(labels))]
    )
    matrix = sp.csr_matrix(np.vstack([x for _, x in blocks]))
    ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)


def panel(tmp: Path, kind: str, seed: int = 1, reorder: bool = False, cells: int = 70) -> tuple[Path, Path]:
    """A reference of eight knock-downs (one of a label that is no gene) and a prediction of
    `kind`: a model's (effects partly right), the control for everything, one block of cells
    pasted for every perturbation (no spread: the bound of #348 binds), or few shallow cells
    (the cap of #247 binds)."""
    rng = np.random.default_rng(seed)
    n_genes = 150
    genes = [f"G{i}" for i in range(n_genes)]
    base = rng.gamma(0.6, 2.0, n_genes)
    effects = {}
    for p in PERTURBATIONS:
        f = np.ones(n_genes)
        idx = rng.choice(n_genes, 12, replace=False)
        f[idx] = rng.lognormal(0, 1.0, 12)
        if p in genes:
            f[genes.index(p)] = 0.1
        effects[p] = f

    def draw(mu, n, depth=2000.0):
        library = rng.lognormal(np.log(depth), 0.3, n)
        m = mu / mu.sum() * library[:, None]
        return rng.negative_binomial(5, 5 / (5 + m)).astype(np.float32)

    real = tmp / "real.h5ad"
    write_panel(
        real, [("control", draw(base, 150))] + [(p, draw(base * effects[p], cells)) for p in PERTURBATIONS], genes, reorder
    )
    if kind == "model":
        pred = [(p, draw(base * effects[p] ** rng.uniform(0.3, 1.0), 60)) for p in PERTURBATIONS]
    elif kind == "control":
        pred = [(p, draw(base, 60)) for p in PERTURBATIONS]
    elif kind == "pinned":
        block = draw(base, 60)
        pred = [(p, block) for p in PERTURBATIONS]
    else:
        pred = [(p, draw(base * effects[p], 8, depth=300.0)) for p in PERTURBATIONS]
    path = tmp / f"pred-{kind}.h5ad"
    write_panel(path, [("control", draw(base, 120))] + pred, genes)
    return real, path


def score(cli: Path, pred: Path, real: Path, out: Path, *extra: str) -> dict:
    done = subprocess.run(
        [str(cli), "-q", "score", "--prediction", str(pred), "--reference", str(real), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads((out / "summary.json").read_text())


def refused(cli: Path, pred: Path, real: Path) -> str:
    """The error of `score` on `pred`, which must fail."""
    done = subprocess.run(
        [str(cli), "score", "--prediction", str(pred), "--reference", str(real)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0, done.stdout
    return done.stderr


def ce(*args: str) -> None:
    """Runs cell-eval2's command line with `args` (the test skips with the reason where it is not
    installed), in this process: its entry point is the command's own (`cell_eval2.cli.main`),
    and its imports (seconds of scanpy, anndata and its metrics) are paid once per worker rather
    than once per call. Its own warnings (scanpy's, anndata's on its inputs) stay its own, as
    they did in a process of its own."""
    import warnings

    cell_eval2()
    from cell_eval2.cli import main

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main(list(args))
    except SystemExit as stop:
        assert stop.code in (None, 0), f"cell-eval2 {' '.join(args)}: {stop.code}"


def compare(ce_dir: Path, ours: Path, results: str = "results.csv", agg: str = "agg_results.csv") -> None:
    import pandas as pd

    theirs = pd.read_csv(ce_dir / results)
    theirs = theirs[theirs["metric"].isin(METRICS)]
    mine = pd.read_parquet(ours / "results.parquet")
    both = theirs.merge(mine, on=["perturbation", "metric"], how="outer", suffixes=("_ce", "_cs"), indicator=True)
    only = both[both["_merge"] != "both"]
    assert only.empty, f"rows of one tool only:\n{only}"
    np.testing.assert_allclose(both["value_cs"], both["value_ce"], rtol=0, atol=1e-6)
    means = pd.read_csv(ce_dir / agg).set_index("statistic").loc["mean"]
    summary = json.loads((ours / "summary.json").read_text())["aggregates"]
    for metric, value in summary.items():
        assert value == pytest.approx(float(means[metric]), abs=1e-6, nan_ok=True), metric


@pytest.mark.parametrize("kind", ["model", "control", "pinned", "shallow"])
def test_every_vcc2026_metric_agrees_with_cell_eval2(cli, tmp_path, kind):
    real, pred = panel(tmp_path, kind)
    ce("run", "-ap", str(pred), "-ar", str(real), *PRESET, "-o", str(tmp_path / "ce"))
    score(cli, pred, real, tmp_path / "cs")
    compare(tmp_path / "ce", tmp_path / "cs")


def test_no_target_genes_agrees_with_cell_eval2(cli, tmp_path):
    real, pred = panel(tmp_path, "model", seed=4)
    ce("run", "-ap", str(pred), "-ar", str(real), *PRESET, "--no-target-genes", "-o", str(tmp_path / "ce"))
    score(cli, pred, real, tmp_path / "cs", "--no-target-genes")
    compare(tmp_path / "ce", tmp_path / "cs")


def test_the_pdex_engine_agrees_with_cell_eval2_on_pdex(cli, tmp_path):
    """Where pdex is installed cell-eval2 tests with it (continuity-corrected p-values);
    `--de-engine pdex` computes those."""
    cell_eval2()
    pytest.importorskip("pdex", reason="pdex is not installed (scripts/python.sh --tests installs it)")
    # Few shallow cells: p-values near the threshold, where the two engines call different genes.
    real, pred = panel(tmp_path, "shallow", seed=6)
    ce("run", "-ap", str(pred), "-ar", str(real), *PRESET[:-1], "de.backend=pdex", "-o", str(tmp_path / "ce"))
    summary = score(cli, pred, real, tmp_path / "cs", "--de-engine", "pdex")
    assert summary["de_backend"] == "pdex"
    compare(tmp_path / "ce", tmp_path / "cs")
    # The default engine's values are not these.
    score(cli, pred, real, tmp_path / "scanpy")
    with pytest.raises(AssertionError):
        compare(tmp_path / "ce", tmp_path / "scanpy")


def test_the_scaled_scores_of_a_real_bundle_agree_with_cell_eval2(cli, tmp_path):
    """The baseline arm cell-eval2 builds scored by both tools alike, and a prediction scaled
    between the bundle's baseline and replicate as `cell-eval2 score` scales it."""
    import pandas as pd

    cell_eval2()
    real, pred = panel(tmp_path, "model", seed=2)
    base = tmp_path / "base.h5ad"
    ce("baseline", "-ar", str(real), *PRESET, "-o", str(tmp_path / "base_out"), "--save-pred", str(base))
    ce("prep-real-bundle", "--real", str(real), "--baseline", str(base), *PRESET, "-o", str(tmp_path / "bundle"))
    ce("run", "-ap", str(pred), "-ar", str(real), *PRESET, "-o", str(tmp_path / "run"))
    ce("score", "--user-agg", str(tmp_path / "run" / "agg_results.csv"), "--real-bundle", str(tmp_path / "bundle"),
       "-o", str(tmp_path / "score.csv"))
    # The baseline arm holds mean counts, not whole ones.
    score(cli, base, real, tmp_path / "cs_base", "--allow-fractional-counts")
    compare(tmp_path / "base_out", tmp_path / "cs_base", "baseline_results.csv", "baseline_agg.csv")

    summary = score(cli, pred, real, tmp_path / "cs", "--real-bundle", str(tmp_path / "bundle"))
    theirs = pd.read_csv(tmp_path / "score.csv").set_index("metric")
    scaled = summary["scaled"]
    assert {m["metric"] for m in scaled["members"]} | {"avg_score"} == set(theirs.index)
    for member in scaled["members"]:
        for column in ("from_baseline", "from_replicate"):
            assert member[column] == pytest.approx(theirs.loc[member["metric"], column], abs=1e-6), member
    assert scaled["avg_from_baseline"] == pytest.approx(theirs.loc["avg_score", "from_baseline"], abs=1e-6)
    assert scaled["avg_from_replicate"] == pytest.approx(theirs.loc["avg_score", "from_replicate"], abs=1e-6)


@pytest.mark.parametrize("variant", ["defaults", "reordered"])
def test_the_baseline_and_replicate_computed_here_are_cell_eval2s(cli, tmp_path, variant):
    """`score --baseline --replicate` draws the baseline arm and splits the halves as
    cell-eval2 does (numpy's generators, pandas' group order), so its two ends and the scaled
    scores are cell-eval2's to 1e-6, without a real bundle. `reordered`: the categories out of
    sorted order, no target genes, other seeds, and an odd number of cells per perturbation (the
    arm's draws then start on the half of a 64-bit draw the previous perturbation left)."""
    import pandas as pd

    cell_eval2()
    defaults = variant == "defaults"
    real, pred = panel(tmp_path, "model", seed=2 if defaults else 5, reorder=not defaults, cells=70 if defaults else 71)
    targets = [] if defaults else ["--no-target-genes"]

    base = tmp_path / "base.h5ad"
    ce("baseline", "-ar", str(real), *PRESET, *targets, *([] if defaults else ["--seed", "7"]),
       "-o", str(tmp_path / "base_out"), "--save-pred", str(base))
    ce("prep-real-bundle", "--real", str(real), "--baseline", str(base), *PRESET, *targets,
       *([] if defaults else ["--anchor-base-seed", "3"]), "-o", str(tmp_path / "bundle"))
    ce("run", "-ap", str(pred), "-ar", str(real), *PRESET, *targets, "-o", str(tmp_path / "run"))
    ce("score", "--user-agg", str(tmp_path / "run" / "agg_results.csv"), "--real-bundle", str(tmp_path / "bundle"),
       "-o", str(tmp_path / "score.csv"))

    seeds = [] if defaults else ["--baseline-seed", "7", "--replicate-seed", "3"]
    out = tmp_path / "cs"
    summary = score(cli, pred, real, out, "--baseline", "--replicate", *targets, *seeds)
    compare(tmp_path / "run", out)

    # The baseline arm, per perturbation and aggregated.
    theirs = pd.read_csv(tmp_path / "base_out" / "baseline_results.csv")
    theirs = theirs[theirs["metric"].isin(METRICS)]
    mine = pd.read_parquet(out / "baseline_results.parquet")
    both = theirs.merge(mine, on=["perturbation", "metric"], how="outer", suffixes=("_ce", "_cs"), indicator=True)
    assert (both["_merge"] == "both").all(), both[both["_merge"] != "both"]
    np.testing.assert_allclose(both["value_cs"], both["value_ce"], rtol=0, atol=1e-6)
    means = pd.read_csv(tmp_path / "bundle" / "baseline_agg.csv").set_index("statistic").loc["mean"]
    for metric, value in summary["baseline"]["aggregates"].items():
        assert value == pytest.approx(float(means[metric]), abs=1e-6), metric

    # The replicate: every member the anchor holds, the five splits' seeds.
    anchor = pd.read_parquet(tmp_path / "bundle" / "anchor_agg.parquet").set_index("metric")["replicate"]
    replicate = summary["replicate"]
    for metric, value in replicate["aggregates"].items():
        assert value == pytest.approx(float(anchor[metric]), abs=1e-6), metric
    meta = json.loads((tmp_path / "bundle" / "anchor_meta.json").read_text())
    assert replicate["seeds"] == meta["derived_seeds"]

    # The scaled scores.
    scored = pd.read_csv(tmp_path / "score.csv").set_index("metric")
    scaled = summary["scaled"]
    assert scaled["bundle"] is None
    for member in scaled["members"]:
        for column in ("from_baseline", "from_replicate"):
            assert member[column] == pytest.approx(scored.loc[member["metric"], column], abs=1e-6), member
    assert scaled["avg_from_replicate"] == pytest.approx(scored.loc["avg_score", "from_replicate"], abs=1e-6)


def test_each_context_is_scored_as_its_own_files_are(cli, tmp_path):
    """`--context-key`: two cell lines in one pair of files score, line by line, exactly as
    each line's own pair of files does (with its baseline and replicate), and a prediction that
    leaves a line out is refused naming it. No cell-eval2 needed: the files of one line are what
    the tests above hold to cell-eval2."""
    import anndata as ad
    import pandas as pd

    lines = {}
    for line, seed in (("K1", 11), ("K2", 12)):
        folder = tmp_path / line
        folder.mkdir()
        real, pred = panel(folder, "model", seed=seed)
        lines[line] = (ad.read_h5ad(real), ad.read_h5ad(pred), real, pred)

    def both(which: int, path: Path) -> Path:
        parts = []
        for line, files in lines.items():
            part = files[which].copy()
            part.obs["cell_line"] = line
            part.obs_names = [f"{line}-{n}" for n in part.obs_names]
            parts.append(part)
        merged = ad.concat(parts)
        merged.obs["condition"] = merged.obs["condition"].astype("category")
        merged.write_h5ad(path)
        return path

    real, pred = both(0, tmp_path / "real.h5ad"), both(1, tmp_path / "pred.h5ad")
    extra = ["--baseline", "--replicate"]
    summary = score(cli, pred, real, tmp_path / "cs", "--context-key", "cell_line", *extra)
    assert summary["context_key"] == "cell_line"
    assert [c["context"] for c in summary["contexts"]] == ["K1", "K2"]
    results = pd.read_parquet(tmp_path / "cs" / "results.parquet")
    baseline = pd.read_parquet(tmp_path / "cs" / "baseline_results.parquet")
    avg = []
    for context in summary["contexts"]:
        line = context["context"]
        alone = score(cli, lines[line][3], lines[line][2], tmp_path / f"cs-{line}", *extra)
        assert context["aggregates"] == pytest.approx(alone["aggregates"], abs=1e-12, nan_ok=True), line
        assert context["baseline"]["aggregates"] == pytest.approx(alone["baseline"]["aggregates"], abs=1e-12)
        assert context["replicate"]["aggregates"] == pytest.approx(alone["replicate"]["aggregates"], abs=1e-12)
        assert context["scaled"]["avg_from_replicate"] == pytest.approx(alone["scaled"]["avg_from_replicate"], abs=1e-12)
        avg.append(alone["scaled"]["avg_from_replicate"])
        for mine, theirs in ((results, "results.parquet"), (baseline, "baseline_results.parquet")):
            own = pd.read_parquet(tmp_path / f"cs-{line}" / theirs)
            part = mine[mine["context"] == line].drop(columns="context").reset_index(drop=True)
            merged = part.merge(own, on=["perturbation", "metric"], suffixes=("_ctx", "_alone"))
            assert len(merged) == len(own) == len(part)
            np.testing.assert_allclose(merged["value_ctx"], merged["value_alone"], rtol=0, atol=1e-12)
    assert summary["avg_from_replicate"] == pytest.approx(sum(avg) / 2, abs=1e-12)

    # A prediction of one line only.
    only = ad.read_h5ad(pred)
    only = only[only.obs["cell_line"] == "K1"].copy()
    only.write_h5ad(tmp_path / "pred-K1.h5ad")
    done = subprocess.run(
        [str(cli), "score", "--prediction", str(tmp_path / "pred-K1.h5ad"), "--reference", str(real),
         "--context-key", "cell_line"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0 and "no cells of context \"K2\"" in done.stderr, done.stderr


def test_python_scores_as_the_command_line_does(cli, tmp_path):
    """`cs.score` runs the command's request in the library: the same values per perturbation,
    aggregates, ends and scaled scores as `cpa-stream score`."""
    import cpa_stream as cs

    real, pred = panel(tmp_path, "model", seed=3)
    summary = score(cli, pred, real, tmp_path / "cs", "--baseline", "--replicate")
    frame = cs.score(pred, real, baseline=True, replicate=True, progress=False)
    assert list(frame.columns[:3]) == ["perturbation", "predicted_cells", "real_cells"]
    assert set(frame["perturbation"]) == set(PERTURBATIONS)
    import pandas as pd

    mine = pd.read_parquet(tmp_path / "cs" / "results.parquet")
    long = frame.melt(id_vars=["perturbation"], value_vars=[m for m in METRICS if m in frame.columns],
                      var_name="metric").dropna()
    both = long.merge(mine, on=["perturbation", "metric"], suffixes=("_py", "_cli"))
    assert len(both) == len(mine)
    np.testing.assert_array_equal(both["value_py"], both["value_cli"])
    (context,) = frame.attrs["contexts"]
    assert context["aggregates"] == summary["aggregates"]
    assert context["baseline"]["aggregates"] == summary["baseline"]["aggregates"]
    assert context["replicate"]["aggregates"] == summary["replicate"]["aggregates"]
    assert context["scaled"]["avg_from_replicate"] == summary["scaled"]["avg_from_replicate"]
    with pytest.raises(ValueError, match="real_bundle reads the baseline"):
        cs.score(pred, real, baseline=True, real_bundle=tmp_path, progress=False)


def test_a_prediction_that_is_not_counts_is_refused_naming_the_cell(cli, tmp_path):
    import anndata as ad

    real, pred = panel(tmp_path, "model")
    data = ad.read_h5ad(pred)
    data.X = data.X.astype(np.float32) * 0.5
    data.write_h5ad(tmp_path / "halves.h5ad")
    message = refused(cli, tmp_path / "halves.h5ad", real)
    assert "halves.h5ad: cell" in message and "raw counts" in message, message


def test_a_prediction_missing_a_perturbation_is_refused_naming_it(cli, tmp_path):
    import anndata as ad

    real, pred = panel(tmp_path, "model")
    data = ad.read_h5ad(pred)
    data[data.obs["condition"] != "G90"].copy().write_h5ad(tmp_path / "short.h5ad")
    message = refused(cli, tmp_path / "short.h5ad", real)
    assert "G90" in message and "7 of the reference's 8" in message, message
