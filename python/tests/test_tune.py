"""Hyper-parameter search on Ray Tune (issue 50 item 4): trials of cpa-stream training on a local
Ray cluster started by the test, ASHA over the validation score each trial reports, a table of
trials, the best configuration and the best run directory. Skipped without Ray Tune."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (scripts/python.sh tries to install it)")
try:
    from ray import tune as ray_tune
except ImportError as error:  # Ray without its Tune extra (pydantic and others)
    pytest.skip(f"Ray Tune is not usable: {error}", allow_module_level=True)

import cpa_stream as cs  # noqa: E402
from conftest import LABELS  # noqa: E402
from cpa_stream.tune import main, space_from_json, tune  # noqa: E402

SMALL = {"model": {"n_hidden_encoder": 32, "n_hidden_decoder": 32, "n_layers_encoder": 1, "n_layers_decoder": 1}}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small_store(adata, tmp_path_factory):
    return cs.import_h5ad(adata[:1500].copy(), tmp_path_factory.mktemp("tune") / "small.store", progress=False)


def test_trials_report_each_epoch_and_the_best_run_is_kept(cluster, small_store, tmp_path):
    space = {"model": {"n_latent": ray_tune.choice([4, 16])}, "training": {"lr": ray_tune.loguniform(1e-4, 3e-3)}}
    result = tune(small_store, tmp_path / "search", search_space=space, **LABELS, config=SMALL, num_samples=4,
                  max_epochs=4, grace_period=1, reduction_factor=2, max_concurrent_trials=1, seed=0)
    table = result.table
    assert len(table) == 4 and set(table["status"]) <= {"completed", "stopped"}
    assert {"model.n_latent", "training.lr", "val_score", "epochs", "best_epoch"} <= set(table.columns)
    assert set(table["model.n_latent"]) <= {4, 16} and table["training.lr"].between(1e-4, 3e-3).all()
    assert (table["epochs"] >= 1).all() and (table["epochs"] <= 4).all()
    assert (table.loc[table["status"] == "completed", "epochs"] == 4).all()
    # Each trial's run holds what its settings say, and a validation per reported epoch.
    for row in table.itertuples():
        run = cs.Run(row.run)
        history = run.history
        assert len(history) == row.epochs and history["val_score"].notna().all()
        assert run.config["model"]["n_latent"] == table.loc[row.Index, "model.n_latent"]
        assert math.isclose(run.config["training"]["lr"], table.loc[row.Index, "training.lr"])
        assert run.config["model"]["n_hidden_encoder"] == 32  # the fixed tables reach every trial
    best = table.iloc[0]
    assert best["val_score"] == table["val_score"].max()
    assert result.best_config == {"model": {"n_latent": int(best["model.n_latent"])},
                                  "training": {"lr": float(best["training.lr"])}}
    pd.testing.assert_frame_equal(result.best_run.history, cs.Run(best["run"]).history)
    assert result.best_run.perturbations and (tmp_path / "search" / "trials.parquet").is_file()
    assert json.loads((tmp_path / "search" / "best_config.json").read_text()) == result.best_config
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tune(small_store, tmp_path / "search", search_space=space, **LABELS, num_samples=1, max_epochs=1)


def test_bad_spaces_are_errors_and_the_shell_entry_point_runs(cluster, small_store, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown table 'modle'"):
        tune(small_store, tmp_path / "x", search_space={"modle": {"n_latent": 4}}, **LABELS)
    with pytest.raises(ValueError, match="training.lr: expected one of"):
        space_from_json({"training": {"lr": {"logunif": [1e-4, 1e-2]}}})
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"model": {"n_latent": {"choice": [4, 8]}, "n_hidden_encoder": 32}}))
    code = main(["--store", str(small_store.path), "--out", str(tmp_path / "cli"), "--space", str(space),
                 "--perturbation-key", "condition", "--dose-key", "dose", "--control", "control",
                 "--covariates", "cell_type", "--samples", "2", "--epochs", "2", "--seed", "1",
                 "--max-concurrent", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "best:" in printed and "model.n_latent" in printed
    assert cs.Run(tmp_path / "cli" / "best").config["model"]["n_hidden_encoder"] == 32


def test_tune_trains_where_train_does_by_default():
    # Issue 75: tune() defaulted to device="cuda" where train() defaults to the CPU.
    import inspect

    import cpa_stream as cs

    assert inspect.signature(tune).parameters["device"].default == inspect.signature(cs.train).parameters[
        "device"].default == "cpu"
