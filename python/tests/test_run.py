"""Training, prediction, latents, evaluation and embeddings through Python, and the same
results as the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cpa_stream as cs

from conftest import COMPUTE, EPOCHS, LABEL_FLAGS, LABELS

TARGET = "condition=MAP2K3+MAP2K6,dose=1+1,cell_type=k562"
SOURCE = "condition == control and cell_type == k562"


def test_python_and_the_cli_train_byte_identical_models_and_predict_the_same(store, run, cli, scratch):
    out = scratch / "cli-run"
    flags = ["--threads", str(COMPUTE["threads"]), "--workers", str(COMPUTE["workers"])]
    subprocess.run(
        [cli, "train", "--store", store.path, "--out", out, *LABEL_FLAGS, "--holdout", "MAP2K3+MAP2K6",
         "--epochs", str(EPOCHS), "--seed", "1", "--quiet", *flags],
        check=True,
    )
    for part in ("model", "best", "checkpoint"):
        ours = (run.path / part / "weights.safetensors").read_bytes()
        theirs = (out / part / "weights.safetensors").read_bytes()
        assert ours == theirs, f"{part}/weights.safetensors differs between Python and the CLI"
    assert run.history.drop(columns="seconds").equals(pq.read_table(out / "metrics.parquet").to_pandas().drop(columns="seconds"))

    parquet = scratch / "cli-pred.parquet"
    subprocess.run(
        [cli, "predict", "--model", out, "--store", store.path, "--source", SOURCE, "--target", TARGET,
         "--latents", "z_basal", "--out", parquet, "--quiet", *flags],
        check=True,
    )
    ours = run.predict(store, source=SOURCE, targets=TARGET, latents=["z_basal"], **COMPUTE).read_all()
    theirs = pq.read_table(parquet)
    assert ours.num_rows == theirs.num_rows > 0
    assert ours.column("mean").equals(theirs.column("mean"))
    assert ours.column("z_basal").equals(theirs.column("z_basal"))
    assert ours.column("cell_id").equals(theirs.column("cell_id"))


def test_history_config_vocabulary(run):
    history = run.history
    assert len(history) == EPOCHS and list(history.epoch) == list(range(EPOCHS))
    assert {"recon_loss", "adv_loss", "lr", "val_r2_mean"} <= set(history.columns)
    assert run.config["training"]["max_epochs"] == EPOCHS
    assert run.settings["dose_key"] == "dose"
    assert "MAP2K6" in run.perturbations and "control" in run.perturbations
    assert run.report["epochs"] and not run.interrupted


def test_predictions_stream_to_polars_and_duckdb(run, store):
    import duckdb
    import polars as pl

    reader = run.predict(store, source=SOURCE, targets=[TARGET, {"condition": "SGK1", "dose": "1"}], **COMPUTE)
    assert isinstance(reader, pa.RecordBatchReader)
    genes = json.loads(reader.schema.metadata[b"cpa_stream.genes"])
    assert len(genes) == store.n_vars
    frame = pl.DataFrame(reader)
    obs = store.obs
    n_source = int(((obs["condition"] == "control") & (obs["cell_type"] == "k562")).sum())
    assert frame.height == 2 * n_source
    assert frame.schema["mean"] == pl.Array(pl.Float32, store.n_vars)
    again = run.predict(store, source=SOURCE, targets=TARGET, genes=genes[:3], **COMPUTE)
    db = duckdb.connect()
    try:
        db.register("again", again)
        counted = db.sql("select count(*) as n, avg(len(mean)) as width from again").fetchall()
    finally:
        db.close()
    assert counted == [(n_source, 3)]


def test_predict_anndata_and_the_streaming_file_agree(run, store, fresh):
    adata = run.predict_anndata(store, source=SOURCE, targets=TARGET, latents=["z_basal"], **COMPUTE)
    n_latent = run.config["model"]["n_latent"]
    assert adata.n_vars == store.n_vars and list(adata.var_names) == list(store.var.index)
    assert adata.obsm["z_basal"].shape == (adata.n_obs, n_latent)
    assert isinstance(adata.obs["condition"].dtype, pd.CategoricalDtype)
    assert set(adata.obs["condition"]) == {"MAP2K3+MAP2K6"}
    assert adata.obs["cell_id"].is_unique
    report = run.predict_to_parquet(fresh / "p.parquet", store, source=SOURCE, targets=TARGET, **COMPUTE)
    assert report["output"]["rows"] == adata.n_obs
    written = pq.read_table(fresh / "p.parquet")
    means = np.stack(written.column("mean").to_numpy(zero_copy_only=False))
    assert np.array_equal(means, adata.X)


def test_expected_log1p_rides_beside_the_mean(run, store, fresh):
    adata = run.predict_anndata(store, source=SOURCE, targets=TARGET, expected_log1p=True, **COMPUTE)
    expected = adata.layers["expected_log1p"]
    assert expected.shape == adata.X.shape and expected.dtype == np.float32
    # E[log1p X] <= log1p(E[X]) (Jensen), and positive wherever the mean is.
    assert (expected >= 0).all() and (expected <= np.log1p(adata.X) + 1e-6).all()
    assert (expected[adata.X > 0.1] > 0).all()
    run.predict_to_parquet(fresh / "e.parquet", store, source=SOURCE, targets=TARGET, expected_log1p=True, **COMPUTE)
    written = pq.read_table(fresh / "e.parquet")
    assert written.column_names[-3:] == ["mean", "expected_log1p", "anchored"]
    assert np.array_equal(np.stack(written.column("expected_log1p").to_numpy(zero_copy_only=False)), expected)
    assert "expected_log1p" not in run.predict_anndata(store, source=SOURCE, targets=TARGET, **COMPUTE).layers
    # The change: under the target minus under the cells' own condition (0 for their own).
    both = run.predict_anndata(store, source=SOURCE, targets=TARGET, expected_log1p=True, change=True, **COMPUTE)
    own = run.predict_anndata(store, source=SOURCE, expected_log1p=True, change=True, **COMPUTE)
    assert (own.layers["change_log1p"] == 0).all()
    assert list(own.obs["cell_id"]) == list(both.obs["cell_id"])
    np.testing.assert_allclose(both.layers["change_log1p"],
                               both.layers["expected_log1p"] - own.layers["expected_log1p"], atol=1e-5)


def test_anchored_is_the_observed_log1p_moved_by_the_change_and_aggregates_to_the_recipe(run, store, adata):
    target = run.predict_anndata(store, source=SOURCE, targets=TARGET, anchored=True, **COMPUTE)
    own = run.predict_anndata(store, source=SOURCE, anchored=True, **COMPUTE)
    assert list(own.obs["cell_id"]) == list(target.obs["cell_id"])
    counts = adata[list(own.obs["cell_id"])].X
    observed = np.log1p(counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts))
    # Under its own condition the anchored prediction is what was observed; under the target,
    # that plus log1p of the predicted mean minus log1p of the reconstructed one.
    np.testing.assert_allclose(own.layers["anchored"], observed, atol=1e-5)
    np.testing.assert_allclose(target.layers["anchored"], observed + np.log1p(target.X) - np.log1p(own.X), atol=1e-4)
    # Aggregated: the recipe of docs/fidelity.md in one call (one group: k562 controls).
    groups = run.predict(store, source=SOURCE, targets=TARGET, anchored=True, aggregate="mean", **COMPUTE).read_all()
    assert groups.num_rows == 1 and groups.column("n_cells")[0].as_py() == len(observed)
    recipe = observed.mean(0) + np.log1p(target.X).mean(0) - np.log1p(own.X).mean(0)
    np.testing.assert_allclose(np.asarray(groups.column("anchored")[0].as_py()), recipe, atol=1e-4)


def test_predictions_and_evaluations_are_anchored_by_default_and_plain_on_request(run, store):
    every = run.predict_anndata(store, source=SOURCE, targets=TARGET, anchored=True, **COMPUTE)
    default = run.predict_anndata(store, source=SOURCE, targets=TARGET, **COMPUTE)
    # Control cells of the target's cell type: every row anchored, as anchored=True anchors them.
    assert default.obs["is_anchored"].all()
    np.testing.assert_allclose(default.layers["anchored"], every.layers["anchored"], atol=1e-5)
    plain = run.predict_anndata(store, source=SOURCE, targets=TARGET, anchored=False, **COMPUTE)
    assert "anchored" not in plain.layers and "is_anchored" not in plain.obs
    np.testing.assert_allclose(plain.X, default.X, rtol=1e-5, atol=1e-6)
    # Perturbed source cells are not anchored by default: their `anchored` is log1p(mean).
    mixed = run.predict(store, source="all", targets=TARGET, **COMPUTE).read_all()
    flags = np.asarray(mixed.column("is_anchored").to_pylist())
    assert flags.any() and not flags.all()
    means = np.stack(mixed.column("mean").to_numpy(zero_copy_only=False))[~flags]
    anchored = np.stack(mixed.column("anchored").to_numpy(zero_copy_only=False))[~flags]
    np.testing.assert_allclose(anchored, np.log1p(means), atol=1e-5)
    with pytest.raises(TypeError, match="anchored"):
        run.predict(store, targets=TARGET, anchored="yes", **COMPUTE)
    # evaluate: anchored by default (cpa-tools' definitions too), plain with anchored=False.
    scored = {
        "default": run.evaluate(store, split="ood", threads=1),
        "plain": run.evaluate(store, split="ood", anchored=False, threads=1),
        "reference": run.evaluate(store, split="ood", definitions="reference", threads=1),
    }
    predicted = {k: v.attrs["report"]["predicted"] for k, v in scored.items()}
    assert predicted == {"default": "anchored log1p", "plain": "log1p(mean)", "reference": "anchored log1p"}


def test_an_ensemble_averages_its_runs_predictions(run, store, scratch):
    # Another training seed, the first run's split (its split seed is its seed, 1).
    other = cs.train(store, scratch / "run-seed-2", **LABELS, holdout=["MAP2K3+MAP2K6"], max_epochs=EPOCHS, seed=2,
                     split_seed=1, progress=False, **COMPUTE)
    split = run.vocabulary["data"]["split"]
    assert other.vocabulary["data"]["split"] == split and split["fraction"]["seed"] == 1, split
    assert other.config["training"]["seed"] == 2
    kw = dict(source=SOURCE, targets=TARGET, anchored=True, **COMPUTE)
    first, second = run.predict_anndata(store, **kw), other.predict_anndata(store, **kw)
    # A Run or its directory, in a list.
    for ensemble in ([other], [str(other.path)]):
        both = run.predict_anndata(store, ensemble=ensemble, **kw)
        assert list(both.obs["cell_id"]) == list(first.obs["cell_id"])
        np.testing.assert_allclose(both.X, (first.X + second.X) / 2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(both.layers["anchored"], (first.layers["anchored"] + second.layers["anchored"]) / 2,
                                   rtol=1e-5, atol=1e-5)
    assert np.abs(first.X - second.X).max() > 1e-3, "two seeds predict differently"
    reader = run.predict(store, ensemble=[other], **kw)
    listed = json.loads(reader.schema.metadata[b"cpa_stream.ensemble"])
    assert [os.path.basename(os.path.dirname(m["model"])) for m in listed] == ["run", "run-seed-2"]
    reader.read_all()
    with pytest.raises(TypeError, match="wrap it in a list"):
        run.predict(store, ensemble=other, **kw)
    with pytest.raises(ValueError, match="latents"):
        run.predict(store, ensemble=[other], latents=["z_basal"], **kw)
    # `evaluate` scores the same ensemble, anchored (checked against `predict` by
    # tests/integration/predict.rs): a different prediction from the first run's alone.
    alone = run.evaluate(store, split="ood", threads=1)
    both = run.evaluate(store, split="ood", anchored=True, ensemble=[other], threads=1)
    report = both.attrs["report"]
    assert report["predicted"] == "anchored log1p"
    assert [os.path.basename(os.path.dirname(m["model"])) for m in report["ensemble"]] == ["run", "run-seed-2"]
    assert list(both["condition"]) == list(alone["condition"])
    assert np.abs(both["r2_mean"].to_numpy() - alone["r2_mean"].to_numpy()).max() > 1e-4
    with pytest.raises(TypeError, match="wrap it in a list"):
        run.evaluate(store, ensemble=other)


def test_latents_cover_every_cell_in_store_order(run, store):
    latents = run.latents(store, ["z_basal", "z"], **COMPUTE)
    assert latents["z_basal"].shape == (store.n_obs, run.config["model"]["n_latent"])
    assert latents["z"].shape == latents["z_basal"].shape
    assert list(latents["cell_id"]) == list(store.obs.index)
    assert np.isfinite(latents["z_basal"]).all()


def test_evaluate_returns_the_metrics(run, store, fresh):
    metrics = run.evaluate(store, split="ood", **{"threads": 1})
    assert len(metrics) >= 1 and "r2_mean" in " ".join(metrics.columns)
    assert metrics.attrs["summary"]
    kept = run.evaluate(store, split="test", out=fresh / "eval", plots=False, threads=1)
    assert (fresh / "eval" / "metrics.parquet").exists() and len(kept) > 0


def test_embeddings(run):
    perts = run.perturbation_embeddings()
    n_latent = run.config["model"]["n_latent"]
    assert perts.shape[1] == n_latent + 1 and "SGK1" in perts.index
    assert perts.loc["control", "is_control"]
    covs = run.covariate_embeddings()
    assert covs.shape[1] == n_latent
    assert ("cell_type", "k562") in covs.index


def test_errors_are_python_exceptions_with_the_message(run, store, fresh):
    with pytest.raises(ValueError, match="NOPE"):
        run.predict(store, targets="condition=NOPE", **COMPUTE).read_all()
    with pytest.raises(ValueError, match="k562"):
        run.predict(store, source="cell_type == K562", targets=TARGET, **COMPUTE).read_all()
    with pytest.raises(FileNotFoundError):
        run.predict(fresh / "nothing.store", **COMPUTE)
    with pytest.raises(ValueError, match="control_group|--control|control"):
        cs.train(store, fresh / "r", **{**LABELS, "control_group": "ctrl"}, max_epochs=1, progress=False, **COMPUTE)
    with pytest.raises(ValueError, match="resume"):
        cs.train(store, run.path, **LABELS, max_epochs=1, progress=False, **COMPUTE)


def _python(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, **kw)


@pytest.mark.parametrize("order", ["cpa_stream, torch", "torch, cpa_stream"])
def test_one_libtorch_whatever_the_import_order(order):
    done = _python(f"""
        import {order}
        maps = open("/proc/self/maps").read().split("\\n")
        libs = sorted({{line.split()[-1] for line in maps if "libtorch_cpu.so" in line}})
        print(libs)
        assert len(libs) == 1, libs
        x = torch.ones(3)
        print(float(x.sum()))
    """)
    assert done.returncode == 0, done.stderr
    assert "3.0" in done.stdout


def test_ctrl_c_checkpoints_and_the_run_resumes(store, fresh):
    script = f"""
        import cpa_stream as cs
        run = cs.train({str(store.path)!r}, {str(fresh / 'run')!r}, perturbation_key="condition",
                       dosage_key="dose", categorical_covariate_keys=["cell_type"], max_epochs=200,
                       threads=1, workers=1, progress=False)
        print("interrupted", run.interrupted, len(run.history), flush=True)
    """
    # Python's Ctrl-C handler put back in a child that inherited an ignored SIGINT (test_trust.py).
    armed = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    child = subprocess.Popen([sys.executable, "-c", armed + textwrap.dedent(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    metrics = fresh / "run" / "metrics.parquet"
    try:
        deadline = time.monotonic() + 120
        while not metrics.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.2)
        assert metrics.exists(), "no epoch finished"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:  # never left running past a failed test
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    assert out.startswith("interrupted True"), out + err
    epochs = int(out.split()[-1])
    assert 1 <= epochs < 200
    resumed = cs.train(store, fresh / "run", resume=True, max_epochs=epochs + 1, progress=False, threads=1, workers=1)
    assert len(resumed.history) == epochs + 1


def test_the_quickstart_notebook_is_the_script():
    from conftest import REPO

    sys.path.insert(0, str(REPO / "examples" / "python"))
    try:
        import notebook
    finally:
        sys.path.pop(0)
    assert (REPO / "examples" / "python" / "quickstart.ipynb").read_text() == notebook.render(), (
        "examples/python/quickstart.ipynb differs from quickstart.py: run python examples/python/notebook.py"
    )


def test_training_releases_the_gil(store, fresh):
    import threading

    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    started = time.monotonic()
    try:
        cs.train(store, fresh / "gil", **LABELS, max_epochs=2, progress=False, **COMPUTE)
    finally:
        stop.set()
        counter.join()
    seconds = time.monotonic() - started
    # A thread that ran only between polls would tick a few times; one that runs alongside
    # ticks about once per millisecond (slower on a loaded machine, never near zero).
    assert ticks > 50 * seconds, f"{ticks} ticks in {seconds:.1f} s"


def test_dose_response_and_batch_corrected_prediction(run, store, fresh):
    frames = run.dose_response(store, perturbations="SGK1", doses=[1, 0, 0.5], cells=20, out=fresh / "dose", threads=1)
    latent, decoded, genes = frames["latent"], frames["decoded"], frames["genes"]
    assert list(latent.dose) == [0.0, 0.5, 1.0] and set(latent.perturbation) == {"SGK1"}
    assert latent.response.iloc[0] == 0.0
    assert (decoded.cells <= 20).all() and set(decoded.cell_type) == set(store.obs.cell_type)
    assert (decoded[decoded.dose == 0].response.abs() < 1e-9).all()
    assert len(genes) == 5 * len(decoded) and {"predicted", "delta", "true_delta"} <= set(genes.columns)
    assert decoded.attrs["summary"]["perturbations"] == 1
    assert (fresh / "dose" / "summary.json").exists()
    one = run.dose_response(store, perturbations="SGK1", doses=[0, 1], covariates={"cell_type": "k562"}, cells=5, threads=1)
    assert set(one["decoded"].cell_type) == {"k562"} and len(one["decoded"]) == 2
    latent_only = run.dose_response(perturbations=["SGK1"], threads=1)
    assert set(latent_only) == {"latent"}
    with pytest.raises(ValueError, match="closest"):
        run.dose_response(perturbations=["SGK"], threads=1)
    # The run has no batch key: a batch-corrected prediction is refused with the reason.
    with pytest.raises(ValueError, match="batch key"):
        run.predict(store, targets=TARGET, batch_corrected=True, **COMPUTE)


def test_predict_anndata_takes_aggregates_a_deg_table_and_an_empty_source(run, store, scratch):
    """predict_anndata takes what the other predict calls take: aggregates (a row per group, every
    statistic a layer, a one-cell variance NaN), a DEG table for ``top_deg``, ``allow_empty``."""
    kw = dict(source="all", targets=TARGET, aggregate="mean,var", **COMPUTE)
    table = run.predict(store, **kw).read_all()
    groups = run.predict_anndata(store, **kw)
    assert groups.n_obs == table.num_rows >= 1
    assert list(groups.obs["n_cells"]) == table.column("n_cells").to_pylist()
    assert list(groups.obs["n_anchored"]) == table.column("n_anchored").to_pylist()
    np.testing.assert_array_equal(groups.X, np.stack(table.column("mean").to_numpy(zero_copy_only=False)))
    assert set(groups.layers) == {"mean_var", "anchored", "anchored_var"}
    assert groups.obs_names.is_unique and groups.obs_names[0].startswith("MAP2K3+MAP2K6_")
    # A DEG table from an evaluation of the same store picks the genes.
    evaluated = scratch / "eval-for-degs"
    run.evaluate(store, split="ood", out=evaluated, plots=False, overwrite=True, threads=1)
    picked = run.predict_anndata(store, source=SOURCE, targets=TARGET, top_deg=5, degs=evaluated / "degs.parquet",
                                 **COMPUTE)
    assert 1 <= picked.n_vars <= 5 and picked.n_obs > 0
    # A source that selects no cell: an empty AnnData with the genes, when asked for.
    empty = run.predict_anndata(store, source="condition == nothing", targets=TARGET, allow_empty=True, **COMPUTE)
    assert empty.n_obs == 0 and empty.n_vars == groups.n_vars
    with pytest.raises(Exception, match="selects no cell"):
        run.predict_anndata(store, source="condition == nothing", targets=TARGET, **COMPUTE)


def test_a_null_vector_row_reads_as_nan():
    column = pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32(), 2))
    got = cs._run._vectors(column, 2)
    np.testing.assert_array_equal(got, np.array([[1, 2], [np.nan, np.nan], [3, 4]], np.float32))


def test_the_same_model_under_torch_no_grad_and_from_another_thread(run, store, fresh):
    # The work runs on the calling thread (python/src/shown.rs), whose libtorch grad mode is the
    # caller's: training must not depend on it, nor on which thread calls.
    import threading

    import torch

    settings = dict(**LABELS, holdout=["MAP2K3+MAP2K6"], max_epochs=EPOCHS, seed=1, progress=False, **COMPUTE)
    with torch.no_grad():
        cs.train(store, fresh / "no-grad", **settings)
    assert torch.is_grad_enabled(), "the caller's grad mode was not put back"
    failed = []

    def train_here():
        try:
            cs.train(store, fresh / "thread", **settings)
        except BaseException as e:  # raised again below, on the test's thread
            failed.append(e)

    thread = threading.Thread(target=train_here)
    thread.start()
    thread.join()
    assert not failed, failed
    expected = (run.path / "model" / "weights.safetensors").read_bytes()
    for out in ("no-grad", "thread"):
        assert (fresh / out / "model" / "weights.safetensors").read_bytes() == expected, out
