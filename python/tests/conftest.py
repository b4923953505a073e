"""Fixtures of the Python package's tests: the bundled real data (examples/data), a store imported
from it and a short training run, shared by the session to keep the suite quick."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "examples" / "data" / "perturbench_devel_cpa.h5ad"
#: The labels of the bundled data, as cpa-tools names them.
LABELS = dict(perturbation_key="condition", dosage_key="dose", control_group="control",
              categorical_covariate_keys=["cell_type"])
#: The same as CLI flags.
LABEL_FLAGS = ["--perturbation-key", "condition", "--dose-key", "dose", "--control", "control",
               "--covariates", "cell_type"]
#: Fixed threads and workers: libtorch's results depend on its thread count.
COMPUTE = dict(threads=1, workers=1)
EPOCHS = 3

#: Why a test that needs cpa-tools itself skips: the peer environment (cpa-tools 0.8.8, installed
#: by the peer's INSTALL.sh into the cache) is not on this machine.
NO_PEER = "cpa-tools' peer environment is absent (set CPA_PEER_PYTHON, or install the peer cpa-tools 0.8.8 into the cache)"


def _worker_cache() -> None:
    """Under pytest-xdist, each worker imports the files it is given into a store cache of its
    own (two workers importing one file, the bundled data read backed, into the shared cache at
    once would meet at its output's lock), and plans threads as on an idle machine."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    # A peer environment in the shared cache (where the tutorials' comparison looks) is named,
    # so that moving the cache does not hide it; nothing else changes what runs.
    shared = os.environ.get("CPA_STREAM_CACHE", os.path.expanduser("~/.cache/cpa-stream"))
    peer = os.path.join(shared, "cpa-peer", "bin", "python")
    if os.access(peer, os.X_OK):
        os.environ.setdefault("CPA_PEER_PYTHON", peer)
    # The thread plan of work left to it (compat's tutorials) follows how busy the CPUs are, which
    # the other workers make them: each worker plans as on an idle machine, as a serial run does,
    # so that what a test computes does not depend on what runs beside it.
    os.environ.setdefault("CPA_STREAM_BUSY_CPUS", "0")
    import atexit
    import tempfile

    cache = tempfile.mkdtemp(prefix=f"cpa-stream-tests-{worker}-")
    os.environ["CPA_STREAM_CACHE"] = cache
    atexit.register(shutil.rmtree, cache, True)


def peer_python() -> str | None:
    """The Python of the peer environment with cpa-tools 0.8.8, if this machine has one."""
    cache = os.environ.get("CPA_STREAM_CACHE", os.path.expanduser("~/.cache/cpa-stream"))
    for candidate in (os.environ.get("CPA_PEER_PYTHON"), os.path.join(cache, "cpa-peer", "bin", "python"),
                      os.path.expanduser("~/.cache/cpa-peer/bin/python")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


_worker_cache()

#: The files whose tests take longest (30 s to 2 minutes each on 2 cores; `--durations=0` of
#: 2026-11-29), longest first: pytest-xdist hands files to its workers in the order they were
#: collected, and collected alphabetically the tutorials came last, one worker running them alone
#: while the other had nothing left. Longest first, the short files even the workers out at the end.
LONGEST_FIRST = (
    "test_distributed.py",
    "test_ray.py",
    "test_fidelity.py",
    "test_tutorials.py",
    "test_cpa_tools_model.py",
    "test_run.py",
    "test_tune.py",
    "test_score.py",
    "test_chem.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def cli() -> Path:
    """The `cpa-stream` binary of the same build (scripts/test.sh sets CPA_STREAM_BIN)."""
    path = os.environ.get("CPA_STREAM_BIN")
    if not path:
        target = os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache" / "cpa-stream" / "target"))
        path = str(Path(target) / "release" / "cpa-stream")
    if not Path(path).is_file():
        pytest.skip(f"the cpa-stream binary is not built at {path} (run scripts/build.sh)")
    return Path(path)


@pytest.fixture(scope="session")
def adata():
    import anndata as ad

    return ad.read_h5ad(BUNDLED)


@pytest.fixture(scope="session")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cpa")


@pytest.fixture(scope="session")
def store(adata, scratch):
    import cpa_stream as cs

    return cs.import_h5ad(adata, scratch / "bundled.store", progress=False)


@pytest.fixture(scope="session")
def run(store, scratch):
    import cpa_stream as cs

    return cs.train(store, scratch / "run", **LABELS, holdout=["MAP2K3+MAP2K6"], max_epochs=EPOCHS, seed=1,
                    progress=False, **COMPUTE)


@pytest.fixture
def fresh(tmp_path) -> Path:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)
