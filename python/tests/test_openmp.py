"""A Python process as fast as the command line on busy CPUs (issue 50, item 6): when the wait
policy libtorch's OpenMP runtime was loaded with does not suit the CPUs, work runs in a child
process. The child gives the same model, relays progress and raises errors as themselves."""

from __future__ import annotations

import json
import os
import time

import pytest

import cpa_stream as cs
from cpa_stream import _openmp
from conftest import COMPUTE, LABELS


def test_work_in_a_child_process_gives_the_same_model(store, tmp_path, monkeypatch):
    runs = {}
    for isolate in ("1", "0"):
        monkeypatch.setenv("CPA_STREAM_ISOLATE", isolate)
        runs[isolate] = cs.train(store, tmp_path / f"run{isolate}", **LABELS, max_epochs=2, seed=3, progress=False,
                                 **COMPUTE)
    weights = [(run.path / "checkpoint" / "weights.safetensors").read_bytes() for run in runs.values()]
    assert weights[0] == weights[1]
    # The same history but for the seconds each epoch took.
    assert runs["1"].history.drop(columns="seconds").equals(runs["0"].history.drop(columns="seconds"))


def test_a_child_relays_progress_and_raises_errors_as_themselves(store, tmp_path, monkeypatch):
    monkeypatch.setenv("CPA_STREAM_ISOLATE", "1")
    with pytest.raises(ValueError, match="nope"):
        cs.train(store, tmp_path / "bad", **{**LABELS, "perturbation_key": "nope"}, max_epochs=1, **COMPUTE)

    class Recorder:
        def __init__(self):
            self.events = []

        def __getattr__(self, name):
            return lambda *args: self.events.append((name, *args))

    recorder = Recorder()
    request = json.dumps({"out": str(tmp_path / "synth.store"), "cells": 300, "genes": 20, "perturbations": 2,
                          "naming": "keywords"})
    _openmp.run("synth", request, recorder)
    names = [e[0] for e in recorder.events]
    assert "begin" in names and "advance" in names and names[-1] == "end", names
    assert cs.Store(tmp_path / "synth.store").n_obs == 300


def test_the_policy_follows_the_cpus_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv("CPA_STREAM_ISOLATE", raising=False)
    monkeypatch.setattr(_openmp, "_USER_SET", False)
    monkeypatch.setattr(_openmp, "_PASSIVE", False)
    # (a second OpenMP runtime in this process, e.g. scikit-learn's, would decide by itself)
    monkeypatch.setattr(_openmp, "foreign_openmp", lambda: None)
    monkeypatch.setattr(_openmp, "_MEASURED", None)
    monkeypatch.setattr(_openmp, "busy_elsewhere", lambda sample=0.2: 1.7)
    assert _openmp.should_isolate()
    monkeypatch.setattr(_openmp, "_PASSIVE", True)
    assert not _openmp.should_isolate()
    monkeypatch.setattr(_openmp, "_MEASURED", None)
    monkeypatch.setattr(_openmp, "busy_elsewhere", lambda sample=0.2: 0.1)
    assert _openmp.should_isolate()
    monkeypatch.setattr(_openmp, "_USER_SET", True)
    assert not _openmp.should_isolate()


def test_a_fresh_measurement_is_reused_and_handed_to_the_thread_plan(monkeypatch):
    """The CPUs are watched once per call at most (0.2 s), not again by the Rust thread plan, and
    a call right after the import takes the import's measurement."""
    watched = []
    monkeypatch.setattr(_openmp, "busy_elsewhere", lambda sample=0.2: watched.append(sample) or 0.0)
    monkeypatch.setattr(_openmp, "_MEASURED", None)
    monkeypatch.delenv(_openmp.BUSY_VAR, raising=False)
    assert _openmp.busy_now() == 0.0 and _openmp.busy_now() == 0.0
    assert len(watched) == 1
    monkeypatch.setattr(_openmp, "_MEASURED", (time.monotonic() - 2 * _openmp.REUSE, 0.0))
    _openmp.busy_now()
    assert len(watched) == 2
    # During the native call the plan finds the measurement in its variable; after it, it is gone.
    seen = []
    monkeypatch.setattr(_openmp, "should_isolate", lambda threads=None: False)
    import cpa_stream._native as native

    monkeypatch.setattr(
        native, "run", lambda command, request, progress: seen.append(os.environ.get(_openmp.BUSY_VAR)) or "{}"
    )
    _openmp._remember(1.25)
    _openmp.compute("train", "{}", None)
    assert seen == ["1.25"]
    assert _openmp.BUSY_VAR not in os.environ


def test_numba_is_kept_off_a_second_openmp_runtime_and_one_loaded_anyway_moves_the_work(tmp_path):
    """numba's ``omp`` layer loads the system's libgomp beside libtorch's, and libtorch's parallel
    loops on other threads then do twice the work: imported first, cpa_stream points numba at its
    ``workqueue`` layer; a second runtime loaded anyway (numba told to use ``omp``) makes the work
    run in a child process."""
    import subprocess
    import sys

    pytest.importorskip("numba", reason="numba is not installed")
    probe = (
        "import cpa_stream, numba, numpy as np\n"
        "from cpa_stream import _openmp\n"
        "@numba.njit(parallel=True)\n"
        "def f(x):\n"
        "    s = 0.0\n"
        "    for i in numba.prange(x.shape[0]):\n"
        "        s += x[i]\n"
        "    return s\n"
        "f(np.ones(100000))\n"
        "print(numba.threading_layer(), _openmp.foreign_openmp() is not None, _openmp.should_isolate(2),\n"
        "      _openmp.should_isolate(1))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "CPA_STREAM_ISOLATE")}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    layer, foreign, _, _ = done.stdout.split()
    assert (layer, foreign) == ("workqueue", "False")
    forced = subprocess.run([sys.executable, "-c", probe], env=dict(env, NUMBA_THREADING_LAYER="omp"),
                            capture_output=True, text=True, timeout=300)
    if forced.returncode != 0 and "omp" in forced.stderr.lower() and "threading layer" in forced.stderr.lower():
        pytest.skip("numba's omp threading layer is not available here")
    assert forced.returncode == 0, forced.stderr[-2000:]
    # Two threads would run parallel loops: moved; one thread runs none: stays.
    assert forced.stdout.split() == ["omp", "True", "True", "False"]
