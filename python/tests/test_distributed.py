"""Data-parallel training: ranks started as a launcher starts them (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), two processes on this CPU with gloo over loopback, against one process
training on the whole batches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import COMPUTE, LABELS

#: The training every test starts from (cpa-tools' names); batch 256 is the whole step's.
TRAIN = dict(**LABELS, holdout=["MAP2K3+MAP2K6"], seed=1, batch_size=256, progress=False, checkpoint_every=0, **COMPUTE)

#: How much two runs that do the same arithmetic in another order may differ. Their difference
#: grows epoch by epoch as the rounding compounds; measured over 1, 2 and 3 epochs of the first
#: test below since the likelihood became one autograd node: the adversary's loss 2e-6, 7e-6 and
#: 1.8e-5 relative apart, the farthest weight tensor 0.3%, 0.8% and 1.4% of its norm (the batch
#: normalisations' biases: their gradient is float noise that Adam scales to whole steps). One
#: process on 2 libtorch threads against one on 1 differs by up to 0.7% after 3 epochs. Before batch
#: normalisation was synchronised, such biases differed by 39%.
LOSS_RTOL = 5e-5
WEIGHT_RTOL = 2e-2

RANK_SCRIPT = """
import json, sys
import cpa_stream as cs
store, out, kwargs = json.loads(sys.argv[1])
cs.train(store, out, **kwargs)
print("trained", flush=True)
"""


def _gloo_or_skip() -> None:
    try:
        import torch.distributed as dist
    except ImportError as e:
        pytest.skip(f"PyTorch's torch.distributed is not importable here ({e})")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this PyTorch has no gloo backend: data-parallel training on the CPU cannot be tried")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(store, out: Path, world: int = 2, **kwargs) -> list[subprocess.Popen]:
    """`world` processes training `store` into `out` as the ranks of one run."""
    port = _free_port()
    args = json.dumps([os.fspath(store.path if hasattr(store, "path") else store), os.fspath(out), {**TRAIN, **kwargs}])
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CPA_STREAM_ISOLATE": "0"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs: list[subprocess.Popen], limit: float = 600) -> list[tuple[int, str, str]]:
    done = []
    for p in procs:
        out, err = p.communicate(timeout=limit)
        done.append((p.returncode, out, err))
    return done


def _train_ranks(store, out: Path, world: int = 2, **kwargs) -> None:
    results = _wait(_ranks(store, out, world, **kwargs))
    for rank, (code, _out, err) in enumerate(results):
        if code != 0 and "no process groups" in err:
            pytest.skip(f"this build has no process groups: {err.strip().splitlines()[-1]}")
        assert code == 0, f"rank {rank} failed:\n{err[-3000:]}"


def _weights(run: Path) -> dict[str, np.ndarray]:
    """A model's tensors, read from its safetensors file (an 8-byte header length, a JSON header
    of dtypes, shapes and offsets, then the bytes)."""
    raw = (run / "model" / "weights.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    dtypes = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "BF16": np.uint16}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(raw[8 + size + start:8 + size + end], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
    return out


def _assert_same_training(one: Path, ranks: Path) -> None:
    a, b = pd.read_parquet(one / "metrics.parquet"), pd.read_parquet(ranks / "metrics.parquet")
    assert len(a) == len(b)
    for column in ("recon_loss", "adv_loss", "val_recon_loss"):
        np.testing.assert_allclose(b[column], a[column], rtol=LOSS_RTOL, err_msg=column)
    wa, wb = _weights(one), _weights(ranks)
    assert wa.keys() == wb.keys()
    for name, w in wa.items():
        if w.size:
            gap = np.linalg.norm(wb[name] - w) / max(np.linalg.norm(w), 1e-12)
            assert gap < WEIGHT_RTOL, f"{name}: {gap:.2e} of its norm apart"


def test_two_ranks_train_as_one_process_on_the_whole_batches(store, fresh):
    """The defaults: batch normalisation in the encoder and the adversaries, the adversaries'
    dropout, the gradient penalty."""
    _gloo_or_skip()
    import cpa_stream as cs

    cs.train(store, fresh / "one", max_epochs=3, **TRAIN)
    _train_ranks(store, fresh / "two", max_epochs=3)
    _assert_same_training(fresh / "one", fresh / "two")
    state = json.loads((fresh / "two" / "checkpoint" / "trainer.json").read_text())
    alone = json.loads((fresh / "one" / "checkpoint" / "trainer.json").read_text())
    assert state["world_size"] == 2
    assert "world_size" not in alone
    # The run's cells and steps, not rank 0's share.
    assert (state["cells_seen"], state["global_step"]) == (alone["cells_seen"], alone["global_step"])


def test_mixup_dropout_sampling_and_two_covariates_train_as_one_process(adata, fresh):
    _gloo_or_skip()
    import cpa_stream as cs

    a = adata.copy()
    a.obs["donor"] = pd.Categorical(np.random.default_rng(0).choice(["d1", "d2", "d3"], a.n_obs))
    store = cs.import_h5ad(a, fresh / "donors.store", progress=False)
    config = {"training": {"mixup_alpha": 0.2},
              "model": {"dropout_rate_encoder": 0.1, "dropout_rate_decoder": 0.1, "variational": True}}
    kwargs = dict(max_epochs=3, config=config, categorical_covariate_keys=["cell_type", "donor"])
    cs.train(store, fresh / "one", **{**TRAIN, **kwargs})
    _train_ranks(store, fresh / "two", **kwargs)
    _assert_same_training(fresh / "one", fresh / "two")


def test_three_ranks_share_batches_that_do_not_divide(store, fresh):
    """Batches of 100 over three ranks (34, 33, 33 cells) train as one process does."""
    _gloo_or_skip()
    import cpa_stream as cs

    cs.train(store, fresh / "one", **{**TRAIN, "max_epochs": 2, "batch_size": 100})
    _train_ranks(store, fresh / "three", world=3, max_epochs=2, batch_size=100)
    _assert_same_training(fresh / "one", fresh / "three")


def test_a_rank_that_dies_ends_the_others_and_the_run_resumes_exactly(store, fresh):
    _gloo_or_skip()
    epochs = 400
    procs = _ranks(store, fresh / "killed", max_epochs=epochs)
    state = fresh / "killed" / "checkpoint" / "trainer.json"
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    if procs[0].poll() is not None:
        code, _out, err = _wait(procs)[0]
        if "no process groups" in err:
            pytest.skip(f"this build has no process groups: {err.strip().splitlines()[-1]}")
        pytest.fail(f"rank 0 ended before its first checkpoint (exit {code}):\n{err[-3000:]}")
    assert state.exists(), "no checkpoint in 300 s"
    procs[1].send_signal(signal.SIGKILL)
    (code0, _, err0), (code1, _, _) = _wait(procs, limit=300)
    assert code1 == -signal.SIGKILL
    assert code0 != 0, "rank 0 went on without rank 1"
    assert "rank 0 of 2" in err0 and "another rank most likely ended" in err0, err0[-3000:]
    # The run resumes from rank 0's last checkpoint, on two ranks, as if never stopped.
    reached = json.loads(state.read_text())["epoch"]
    assert 0 < reached < epochs
    _train_ranks(store, fresh / "killed", max_epochs=reached + 2, resume=True)
    _train_ranks(store, fresh / "whole", max_epochs=reached + 2)
    wa, wb = _weights(fresh / "whole"), _weights(fresh / "killed")
    for name, w in wa.items():
        np.testing.assert_array_equal(wb[name], w, err_msg=name)


def test_the_command_line_under_torchrun_trains_as_the_package_does(store, fresh, cli):
    _gloo_or_skip()
    python = Path(sys.executable)
    flags = ["--perturbation-key", "condition", "--dose-key", "dose", "--control", "control", "--covariates",
             "cell_type", "--holdout", "MAP2K3+MAP2K6", "--epochs", "2", "--seed", "1", "--batch-size", "256",
             "--threads", "1", "--workers", "1", "--checkpoint-every", "0"]
    env = {**os.environ, "CPA_STREAM_PYTHON": str(python), "CPA_STREAM_ISOLATE": "0"}
    port = _free_port()
    done = subprocess.run(
        [str(python), "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), "--no-python",
         str(cli), "train", "--store", os.fspath(store.path), "--out", os.fspath(fresh / "cli"), *flags],
        env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "no process groups" in done.stderr:
        pytest.skip("this build has no process groups")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    _train_ranks(store, fresh / "package", max_epochs=2)
    wa, wb = _weights(fresh / "package"), _weights(fresh / "cli")
    for name, w in wa.items():
        np.testing.assert_array_equal(wb[name], w, err_msg=name)


def test_a_batch_smaller_than_the_ranks_is_refused(store, fresh):
    _gloo_or_skip()
    results = _wait(_ranks(store, fresh / "tiny", world=3, max_epochs=1, batch_size=2))
    code, _out, err = results[0]
    if "no process groups" in err:
        pytest.skip("this build has no process groups")
    assert code != 0
    assert "a batch needs at least one cell per process" in err
    assert not (fresh / "tiny" / "checkpoint").exists()
