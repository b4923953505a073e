"""A Python process as fast as the command line on busy CPUs (issue 50, item 6): when the wait
policy libtorch's OpenMP runtime was loaded with does not suit the CPUs, work runs in a child
process. The child gives the same model, relays progress and raises errors as themselves."""

from __future__ import annotations

import json

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
    monkeypatch.setattr(_openmp, "busy_elsewhere", lambda sample=0.2: 1.7)
    assert _openmp.should_isolate()
    monkeypatch.setattr(_openmp, "_PASSIVE", True)
    assert not _openmp.should_isolate()
    monkeypatch.setattr(_openmp, "busy_elsewhere", lambda sample=0.2: 0.1)
    assert _openmp.should_isolate()
    monkeypatch.setattr(_openmp, "_USER_SET", True)
    assert not _openmp.should_isolate()
