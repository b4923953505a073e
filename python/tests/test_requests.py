"""The command line and the Python package make the same request for the same settings: each
command's request is built both ways (``cpa-stream COMMAND ... --print-request`` and the Python
keywords, caught where they cross into the native module) and compared after the library has
read both. A request becomes options in one place (the library's ``*Request.options``), so the
same request is the same run; a default that drifts on one side, or a keyword that stops
reaching the library, fails here."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import cpa_stream as cs
from cpa_stream import _native


class _Caught(Exception):
    """Raised by the stand-in for the native module once it has the request."""


def python_request(monkeypatch, call: Callable[[], object]) -> tuple[str, dict]:
    """The command and request that `call` hands to the native module (which is not run)."""
    seen: dict = {}

    def run(command: str, request: str, progress: object = None) -> str:
        seen["command"], seen["request"] = command, request
        raise _Caught

    monkeypatch.setattr(_native, "run", run)
    # In this process, never in a child (which would run the request for real).
    monkeypatch.setenv("CPA_STREAM_ISOLATE", "0")
    with pytest.raises(_Caught):
        call()
    return seen["command"], canonical(seen["command"], seen["request"])


def cli_request(cli: Path, command: str, args: list[str]) -> dict:
    """The request `cpa-stream COMMAND ARGS` makes (nothing is run)."""
    out = subprocess.run([str(cli), command, *args, "--print-request"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return canonical(command, out.stdout)


def canonical(command: str, request: str) -> dict:
    """The request as the library reads it: every field, defaults filled in, the same naming."""
    return json.loads(_native.canonical_request(command, request))


def test_every_command_gets_the_same_request_from_flags_and_keywords(cli, monkeypatch, tmp_path):
    d = tmp_path
    run = cs.Run(d)  # a directory is enough: nothing is loaded before the request is made
    model, store, out = str(d), str(d / "s.store"), str(d / "out")
    config, features, truth, degs = (str(d / n) for n in ("cpa.toml", "features.csv", "truth.parquet", "degs.parquet"))
    cases = [
        (
            "synth",
            ["--cells", "1000", "--genes", "50", "--perturbations", "4", "--doses", "2", "--cell-types", "2",
             "--combinations", "2", "--heldout-combinations", "1", "--interaction", "0.5", "--control-fraction",
             "0.2", "--library-size", "3000", "--library-log-sd", "0.3", "--latent-dim", "6", "--hidden", "16",
             "--truth-samples", "32", "--seed", "5", "--out", out, "--codec", "zstd", "--zstd-level", "4",
             "--block-rows", "64", "--threads", "2", "--overwrite"],
            lambda: cs.synth(out, cells=1000, genes=50, perturbations=4, doses=2, cell_types=2, combinations=2,
                             heldout_combinations=1, interaction=0.5, control_fraction=0.2, library_size=3000,
                             library_log_sd=0.3, latent_dim=6, hidden=16, truth_samples=32, seed=5, codec="zstd",
                             zstd_level=4, block_rows=64, threads=2, overwrite=True, progress=False),
        ),
        ("synth", ["--cells", "10", "--genes", "5", "--perturbations", "2", "--out", out],
         lambda: cs.synth(out, cells=10, genes=5, perturbations=2, progress=False)),
        (
            "import",
            [store, "--out", out, "--layer", "counts", "--deg-uns-key", "rank_genes_groups", "--chunk-rows", "333",
             "--allow-external", "--codec", "zstd", "--zstd-level", "3", "--block-rows", "128", "--overwrite"],
            lambda: cs.import_h5ad(store, out, layer="counts", deg_uns_key="rank_genes_groups", chunk_rows=333,
                                   allow_external=True, codec="zstd", zstd_level=3, block_rows=128, overwrite=True,
                                   progress=False),
        ),
        ("import", [store, "--out", out, "--use-raw"], lambda: cs.import_h5ad(store, out, use_raw=True, progress=False)),
        (
            "export",
            [store, "--out", out, "--compression", "gzip", "--gzip-level", "6", "--overwrite"],
            lambda: cs.export_h5ad(store, out, compression="gzip", gzip_level=6, overwrite=True, progress=False),
        ),
        ("export", [store, "--out", out], lambda: cs.export_h5ad(store, out, progress=False)),
        (
            "export",
            [store, "--out", out, "--cells", "condition == control or cell_type == k562"],
            lambda: cs.export_h5ad(store, out, cells="condition == control or cell_type == k562", progress=False),
        ),
        (
            "score",
            ["--prediction", truth, "--reference", degs, "--perturbation-key", "gene", "--control", "ntc",
             "--no-target-genes", "--baseline", "--baseline-seed", "7", "--replicate", "--replicate-seed", "3",
             "--context-key", "cell_line", "--out", out, "--allow-fractional-counts", "--overwrite", "--de-engine", "pdex",
             "--threads", "2"],
            lambda: cs.score(truth, degs, perturbation_key="gene", control="ntc", no_target_genes=True, baseline=True,
                             baseline_seed=7, replicate=True, replicate_seed=3, context_key="cell_line", out=out,
                             allow_fractional_counts=True, overwrite=True, de_engine="pdex", threads=2,
                             progress=False),
        ),
        ("score", ["--prediction", truth, "--reference", degs, "--real-bundle", model],
         lambda: cs.score(truth, degs, real_bundle=model, progress=False)),
        (
            "convert",
            [store, "--out", out, "--codec", "zstd", "--zstd-level", "5", "--block-rows", "64", "--shuffle", "9",
             "--shuffle-memory-mib", "32", "--overwrite"],
            lambda: cs.convert(store, out, codec="zstd", zstd_level=5, block_rows=64, shuffle=9,
                               shuffle_memory_mib=32, overwrite=True, progress=False),
        ),
        (
            "train",
            ["--store", store, "--out", out, "--perturbation-key", "drug", "--dose-key", "dose", "--control", "DMSO",
             "--covariates", "cell_type,donor", "--batch-key", "batch", "--holdout", "A+B,C",
             "--validation-fraction", "0.2", "--test-fraction", "0.05", "--preset", "reference", "--config", config,
             "--epochs", "7", "--batch-size", "64", "--seed", "3", "--overwrite", "--allow-non-counts",
             "--perturbation-features", features, "--device", "cpu", "--threads", "2", "--workers", "1",
             "--checkpoint-every", "2.5"],
            lambda: cs.train(store, out, perturbation_key="drug", dosage_key="dose", control_group="DMSO",
                             categorical_covariate_keys=["cell_type", "donor"], batch_key="batch",
                             holdout=["A+B", "C"], validation_fraction=0.2, test_fraction=0.05, preset="reference",
                             config=config, max_epochs=7, batch_size=64, seed=3, overwrite=True,
                             allow_non_counts=True, perturbation_features=features, device="cpu", threads=2,
                             workers=1, checkpoint_every=2.5, progress=False),
        ),
        ("train", ["--store", store, "--out", out, "--split-key", "split", "--resume", "--batch-size", "auto"],
         lambda: cs.train(store, out, split_key="split", resume=True, batch_size="auto", progress=False)),
        (
            "predict",
            ["--model", model, "--store", store, "--out", out, "--source", "condition == control", "--target", "A",
             "--target", "condition=B,dose=0.5", "--genes", "top-deg:5", "--degs", degs, "--latents",
             "z_basal,z", "--layout", "wide", "--shard", "1/4", "--batch-size", "256", "--seed", "2",
             "--allow-empty", "--batch-corrected", "--expected-log1p", "--change", "--overwrite", "--threads", "2",
             "--workers", "1"],
            lambda: run.predict_to_parquet(out, store, source="condition == control",
                                           targets=["A", {"condition": "B", "dose": "0.5"}], top_deg=5, degs=degs,
                                           latents=["z_basal", "z"], wide=True, shard="1/4", batch_size=256, seed=2,
                                           allow_empty=True, batch_corrected=True, expected_log1p=True, change=True,
                                           overwrite=True, threads=2, workers=1, progress=False),
        ),
        ("predict", ["--model", model, "--store", store, "--out", out],
         lambda: run.predict_to_parquet(out, store, progress=False)),
        (
            "predict",
            ["--model", model, "--store", store, "--out", out, "--aggregate", "mean,var", "--group-by", "cell_type",
             "--values", "f16", "--sink-threads", "3", "--sink-profile", "fast", "--row-group-rows", "100",
             "--zstd-level", "5", "--prefetch", "2"],
            lambda: run.predict_to_parquet(out, store, aggregate="mean,var", group_by=["cell_type"], values="f16",
                                           sink_threads=3, sink_profile="fast", row_group_rows=100, zstd_level=5,
                                           prefetch=2, progress=False),
        ),
        (
            "evaluate",
            ["--model", model, "--store", store, "--out", out, "--split", "ood", "--truth", truth, "--degs", degs,
             "--min-cells", "3", "--definitions", "reference", "--expected-log1p", "--no-plots", "--overwrite",
             "--batch-size", "64", "--threads", "2"],
            lambda: run.evaluate(store, split="ood", out=out, truth=truth, degs=degs, min_cells=3,
                                 definitions="reference", expected_log1p=True, plots=False, overwrite=True,
                                 batch_size=64, threads=2, progress=False),
        ),
        # The defaults: plots are drawn by both (Python once drew none).
        ("evaluate", ["--model", model, "--store", store, "--out", out],
         lambda: run.evaluate(store, out=out, progress=False)),
        (
            "dose-response",
            ["--model", model, "--store", store, "--out", out, "--perturbations", "A,B", "--doses", "0,0.5,1",
             "--genes", "G1,G2", "--covariate", "cell_type=k562", "--covariate", "cell_type=a549", "--cells", "50",
             "--seed", "4", "--no-plots", "--overwrite", "--threads", "2"],
            lambda: run.dose_response(store, perturbations=["A", "B"], doses=[0, 0.5, 1], genes=["G1", "G2"],
                                      covariates={"cell_type": ["k562", "a549"]}, cells=50, seed=4, out=out,
                                      plots=False, overwrite=True, threads=2),
        ),
        ("dose-response", ["--model", model, "--out", out], lambda: run.dose_response(out=out)),
    ]
    for command, flags, call in cases:
        named, from_python = python_request(monkeypatch, call)
        assert named == command
        from_cli = cli_request(cli, command, flags)
        differ = {k: (from_cli.get(k), from_python.get(k)) for k in from_cli.keys() | from_python.keys()
                  if from_cli.get(k) != from_python.get(k)}
        assert not differ, f"{command} {' '.join(flags)}: (CLI, Python) differ in {differ}"


def test_a_request_the_library_cannot_read_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="unknown field `colour`"):
        _native.canonical_request("export", json.dumps({"store": "s", "out": "o", "colour": "red"}))
    with pytest.raises(ValueError, match='command "fly"'):
        _native.canonical_request("fly", "{}")


def test_messages_name_the_setting_as_the_caller_spelled_it(cli, tmp_path):
    store = tmp_path / "s.store"
    cs.synth(store, cells=200, genes=10, perturbations=2, progress=False)
    with pytest.raises(ValueError, match="block_rows must be at least 1"):
        cs.convert(store, tmp_path / "z.store", codec="zstd", block_rows=0, progress=False)
    out = subprocess.run([str(cli), "convert", str(store), "--out", str(tmp_path / "z.store"), "--codec", "zstd",
                          "--block-rows", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "--block-rows must be at least 1" in out.stderr, out.stderr
    assert not (tmp_path / "z.store").exists()


def test_print_request_is_refused_where_a_command_takes_none(cli, tmp_path):
    out = subprocess.run([str(cli), "inspect", str(tmp_path), "--print-request"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "takes no request" in out.stderr, out.stderr


def test_errors_of_keywords_name_the_keywords(tmp_path):
    import cpa_stream as cs

    with pytest.raises(ValueError, match="perturbations must be at least 1") as refused:
        cs.synth(tmp_path / "s.store", cells=10, genes=5, perturbations=0)
    assert "--" not in str(refused.value)
    cs.synth(tmp_path / "s.store", cells=200, genes=10, perturbations=2, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every -1: expected seconds, 0 or more"):
        cs.train(tmp_path / "s.store", tmp_path / "run", checkpoint_every=-1, progress=False)
    assert not (tmp_path / "run").exists()


def test_the_module_runs_exactly_the_registrys_commands_that_take_a_request():
    from cpa_stream import _native

    registry = _native.commands()
    names = [name for name, _engine, _model, _request in registry]
    assert names[:3] == ["info", "synth", "inspect"] and "dose-response" in names
    for name, _in_engine, _runs_model, takes_request in registry:
        try:
            _native.canonical_request(name, "{}")
            known = True
        except ValueError as e:
            known = "expected one of" not in str(e)
        assert known == takes_request, name
    with pytest.raises(ValueError, match="expected one of synth, convert, import, export, train"):
        _native.run("transform", "{}")
