"""Models saved by cpa-tools load (issue 74 item 3): ``cpa.CPA.load(dir, adata)`` on a directory
written by cpa-tools 0.8.8's ``save()`` converts it and predicts what cpa-tools predicts from it
(per-cell means within 1e-4 relative on the CPU). The checked-in fixture was written by cpa-tools
itself (tests/fixtures/cpa_tools_model/make.py); where the peer environment is present, models of
every convertible part are trained afresh and checked too. Reading model.pt runs no code from it;
networks cpa-stream cannot express are refused naming the part."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cpa_stream.compat as cpa
from cpa_stream import cpa_tools_model
from conftest import BUNDLED, NO_PEER, peer_python

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "cpa_tools_model"


def _predicts_as_cpa_tools(directory: Path, tmp_path: Path) -> float:
    import anndata as ad

    adata = ad.read_h5ad(directory / "cells.h5ad")
    model = cpa.CPA.load(directory, adata=adata)
    assert model.is_trained_ and model.converted_from["copied"] > 0
    model.predict(adata, batch_size=64)
    ours, theirs = np.asarray(adata.obsm["CPA_pred"]), np.load(directory / "expected.npy")
    assert ours.shape == theirs.shape
    relative = np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-6)
    assert relative.max() < 1e-4, f"largest relative difference {relative.max():.2e}"
    return float(relative.max())


def test_a_model_saved_by_cpa_tools_predicts_what_cpa_tools_predicted(tmp_path):
    directory = tmp_path / "saved"
    shutil.copytree(FIXTURE / "nb-logsigm", directory)
    _predicts_as_cpa_tools(directory, tmp_path)
    # The directory is read, not changed.
    assert sorted(p.name for p in directory.iterdir()) == ["CPA_info.json", "cells.h5ad", "expected.npy", "model.pt"]


@pytest.mark.parametrize("variant", ["nb-logsigm", "zinb-sigm"])
def test_models_cpa_tools_trains_now_convert_part_by_part(variant, tmp_path):
    peer = peer_python()
    if peer is None:
        pytest.skip(NO_PEER)
    made = subprocess.run([peer, str(FIXTURE / "make.py"), str(BUNDLED), str(tmp_path), variant],
                          capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-2000:]
    _predicts_as_cpa_tools(tmp_path / variant, tmp_path)


def _edited(tmp_path: Path, edit) -> Path:
    """A copy of the fixture whose model.pt's pickle is rewritten by `edit(saved_dict)`."""
    import torch

    directory = tmp_path / "edited"
    shutil.copytree(FIXTURE / "nb-logsigm", directory)
    saved = torch.load(directory / "model.pt", map_location="cpu", pickle_module=cpa_tools_model._SafePickle,
                       weights_only=False)
    edit(saved)
    torch.save(saved, directory / "model.pt")
    return directory


def test_networks_cpa_stream_cannot_express_are_refused_naming_the_part(tmp_path):
    import anndata as ad

    adata = ad.read_h5ad(FIXTURE / "nb-logsigm" / "cells.h5ad")

    def hyper(**changes):
        def edit(saved):
            saved["attr_dict"]["init_params_"]["kwargs"]["hyper_params"].update(changes)
        return edit

    for changes, message in (({"doser_type": "mlp"}, "doser_type 'mlp'"),
                             ({"variational": True}, "variational model"),
                             ({"recon_loss": "gauss"}, "recon_loss 'gauss'"),
                             ({"n_layers_encoder": 3}, "encoder.network.fc_layers.Layer 2")):
        directory = _edited(tmp_path / message.replace(" ", "_").replace("'", ""), hyper(**changes))
        with pytest.raises(ValueError, match=message):
            cpa.CPA.load(directory, adata=adata.copy())

    def widen(saved):
        state = saved["model_state_dict"]
        state["encoder.z.weight"] = state["encoder.z.weight"].repeat(2, 1)
    directory = _edited(tmp_path / "wide", widen)
    with pytest.raises(ValueError, match="ae.encoder.mean.weight has shape"):
        cpa.CPA.load(directory, adata=adata.copy())


def test_reading_model_pt_runs_no_code_from_it(tmp_path):
    # A model.pt whose pickle calls os.system: read by pickle it would run the command.
    directory = tmp_path / "crafted"
    shutil.copytree(FIXTURE / "nb-logsigm", directory)
    marker = tmp_path / "ran"

    class Attack:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model_state_dict": {}, "attr_dict": Attack()}, protocol=2))
        z.writestr("archive/version", "3\n")
    (directory / "model.pt").write_bytes(buffer.getvalue())
    import anndata as ad

    with pytest.raises(ValueError, match="model.pt"):
        cpa.CPA.load(directory, adata=ad.read_h5ad(directory / "cells.h5ad"))
    assert not marker.exists(), "reading model.pt ran a command from it"
    # Not a file at all, or not a torch.save archive: named.
    (directory / "model.pt").unlink()
    os.mkfifo(directory / "model.pt")
    with pytest.raises(ValueError, match="must be a regular file"):
        cpa_tools_model.read_saved(directory)
    (directory / "model.pt").unlink()
    (directory / "model.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a torch.save file"):
        cpa_tools_model.read_saved(directory)


def test_the_cli_imports_a_cpa_tools_model_that_predict_reads(cli, tmp_path):
    """``cpa-stream import-model DIR --out MODEL`` (issue 74 item 3, the CLI route): the model
    directory it writes predicts, through ``cpa-stream predict --model``, what cpa-tools predicted;
    it is written whole, replaced only with ``--overwrite`` and only over a model directory."""
    import anndata as ad
    import pyarrow.parquet as pq

    import cpa_stream as cs

    # The Python the tests run in has the package being tested.
    env = {**os.environ, "CPA_STREAM_PYTHON": sys.executable}
    model = tmp_path / "model"
    done = subprocess.run([cli, "import-model", str(FIXTURE / "nb-logsigm"), "--out", str(model), "--json"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["copied"] > 0 and report["model"] == str(model)
    assert sorted(p.name for p in model.iterdir()) == ["imported.json", "model.json", "weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "nothing left beside it"

    adata = ad.read_h5ad(FIXTURE / "nb-logsigm" / "cells.h5ad")
    store = cs.import_h5ad(adata, tmp_path / "cells.store", progress=False)
    out = tmp_path / "pred.parquet"
    predicted = subprocess.run([cli, "predict", "--model", str(model), "--store", str(store.path), "--source", "all",
                                "--threads", "1", "--out", str(out)], capture_output=True, text=True)
    assert predicted.returncode == 0, predicted.stderr
    table = pq.read_table(out)
    order = {name: i for i, name in enumerate(adata.obs_names)}
    means = np.stack(table.column("mean").to_numpy(zero_copy_only=False))
    ours = np.empty_like(means)
    ours[[order[c] for c in table.column("cell_id").to_pylist()]] = means
    theirs = np.load(FIXTURE / "nb-logsigm" / "expected.npy")
    assert (np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-6)).max() < 1e-4

    again = subprocess.run([cli, "import-model", str(FIXTURE / "nb-logsigm"), "--out", str(model)],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert subprocess.run([cli, "import-model", str(FIXTURE / "nb-logsigm"), "--out", str(model), "--overwrite"],
                          capture_output=True, env=env).returncode == 0
    other = tmp_path / "not-a-model"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = subprocess.run([cli, "import-model", str(FIXTURE / "nb-logsigm"), "--out", str(other), "--overwrite"],
                             capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and "not a model directory import-model wrote" in refused.stderr
    assert (other / "keep.txt").read_text() == "mine"
    # A trained run's model directory (model.json, not written by import-model) is not replaced either.
    run_model = tmp_path / "run-model"
    run_model.mkdir()
    (run_model / "model.json").write_text("{}")
    refused = subprocess.run([cli, "import-model", str(FIXTURE / "nb-logsigm"), "--out", str(run_model),
                              "--overwrite"], capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and "not a model directory import-model wrote" in refused.stderr
    assert (run_model / "model.json").read_text() == "{}"
    missing = subprocess.run([cli, "import-model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2")],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
