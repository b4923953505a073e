"""What a user of the Python package can get wrong, or do at the same time (issue 47, item 15):
thread counts out of range, two threads reading one prediction reader, a view of a backed
AnnData, one string where a list is expected, NaN in a request, Ctrl-C while an output is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import cpa_stream as cs
from conftest import BUNDLED, COMPUTE, LABELS


@pytest.mark.parametrize(
    "keywords, named",
    [
        (dict(threads=20000), "threads 20000"),
        (dict(threads=0), "threads 0"),
        (dict(workers=0), "workers 0"),
        (dict(workers=5000), "workers 5000"),
        (dict(batch_size=0), "batch_size 0"),
    ],
)
def test_thread_and_batch_counts_have_the_clis_bounds(run, store, keywords, named):
    with pytest.raises(ValueError, match=named):
        run.predict(store, targets=["MAP2K6"], **{**COMPUTE, **keywords})
    # The process is fine afterwards (threads=20000 after an earlier predict used to crash it).
    table = run.predict(store, targets=["MAP2K6"], **COMPUTE).read_all()
    assert table.num_rows > 0


def test_two_threads_reading_one_prediction_reader_share_its_batches(run, store):
    expected = run.predict(store, source="all", targets=["MAP2K6"], batch_size=64, **COMPUTE).read_all().num_rows
    for _ in range(3):
        reader = run.predict(store, source="all", targets=["MAP2K6"], batch_size=64, **COMPUTE)
        rows = [0, 0]

        def drain(k: int) -> None:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                rows[k] += batch.num_rows

        threads = [threading.Thread(target=drain, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a reader thread hangs"
        assert sum(rows) == expected


def test_a_view_of_a_backed_anndata_imports_its_own_cells(fresh):
    import anndata as ad

    backed = ad.read_h5ad(BUNDLED, backed="r")
    try:
        for name, view in [("first100", backed[:100]), ("k562", backed[backed.obs["cell_type"] == "k562"])]:
            store = cs.import_h5ad(view, fresh / f"{name}.store", progress=False, chunk_rows=64)
            assert store.n_obs == view.n_obs, name
            assert list(store.obs.index) == list(view.obs_names), name
            memory = view.to_memory()
            x = memory.X.toarray() if hasattr(memory.X, "toarray") else np.asarray(memory.X)
            expected = cs.import_h5ad(memory, fresh / f"{name}-memory.store", progress=False)
            assert (store.path / "X" / "data").read_bytes() == (expected.path / "X" / "data").read_bytes(), name
            assert np.isclose(float(x.sum()), float(np.frombuffer((store.path / "X" / "data").read_bytes(), "<f4").sum()))
    finally:
        backed.file.close()


def test_one_string_is_one_name_and_nan_is_named(store, fresh):
    run = cs.train(store, fresh / "run", perturbation_key="condition", dosage_key="dose",
                   categorical_covariate_keys="cell_type", holdout="MAP2K3+MAP2K6", max_epochs=1, seed=1,
                   progress=False, **COMPUTE)
    assert run.settings["covariate_keys"] == ["cell_type"]
    assert run.vocabulary["data"]["split"]["fraction"]["holdout"] == ["MAP2K3+MAP2K6"]
    with pytest.raises(ValueError, match=r"validation_fraction=nan: expected a finite number"):
        cs.train(store, fresh / "nan", **LABELS, validation_fraction=float("nan"), max_epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"doses\[1\]=inf: expected a finite number"):
        run.dose_response(store, perturbations="MAP2K6", doses=[0.5, float("inf")])
    with pytest.raises(TypeError, match="genes: expected names"):
        run.predict(store, targets=["MAP2K6"], genes=[3, 4], **COMPUTE)


# A child inherits an ignored SIGINT (a non-interactive shell's background job, `cmd &`, ignores
# it, and so may a CI runner's), and Python then never raises KeyboardInterrupt: the child's first
# line puts Python's Ctrl-C handler back.
CTRL_C_ARMED = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


def _interrupt_when(script: str, ready: Path) -> subprocess.CompletedProcess:
    """Runs `script` in a child Python and sends it Ctrl-C (SIGINT) once `ready` exists (the
    work has started: its output's lock or temporary file is on disk). The child runs with
    `CPA_STREAM_FAULT=hold`: its command waits at its first check for a stop, after its output's
    lock and temporary exist, until the Ctrl-C comes, so the work cannot end first however fast
    or slow the machine is."""
    env = dict(os.environ, CPA_STREAM_FAULT="hold")
    child = subprocess.Popen([sys.executable, "-c", CTRL_C_ARMED + textwrap.dedent(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert child.poll() is None, f"the work ended before it was interrupted: {child.communicate()}"
    child.send_signal(signal.SIGINT)
    try:
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:  # never left running past a failed test
            child.kill()
            child.communicate()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_ctrl_c_while_an_output_is_written_publishes_nothing(run, store, fresh):
    path = BUNDLED
    cases = [
        (f"cs.import_h5ad({str(path)!r}, {str(fresh / 'i.store')!r}, progress=False)", fresh / ".i.store.lock",
         fresh / "i.store"),
        (f"cs.Run({str(run.path)!r}).predict_to_parquet({str(fresh / 'p.parquet')!r}, {str(store.path)!r}, "
         "source='all', targets=['MAP2K6', 'KLF1', 'CEBPE'], progress=False, threads=1, workers=1)",
         fresh / ".p.parquet.lock", fresh / "p.parquet"),
        (f"cs.Run({str(run.path)!r}).evaluate({str(store.path)!r}, split='all', out={str(fresh / 'e')!r}, "
         "progress=False, threads=1)", fresh / ".e.lock", fresh / "e"),
    ]
    for call, ready, output in cases:
        script = f"""
            import cpa_stream as cs
            try:
                {call}
            except KeyboardInterrupt:
                print("KeyboardInterrupt", flush=True)
                raise SystemExit(130)
            print("finished", flush=True)
        """
        done = _interrupt_when(script, ready)
        assert done.returncode == 130 and "KeyboardInterrupt" in done.stdout, (call, done.stdout, done.stderr)
        assert not output.exists(), f"{output} was published after Ctrl-C"
        leftovers = [p.name for p in fresh.iterdir() if p.name.startswith(f".{output.name}.")]
        assert not leftovers, f"temporaries left: {leftovers}"


def test_what_compat_and_import_got_wrong_is_right_or_named(tmp_path):
    """Issue 73 items 7 and 14: cpa-tools' calls given a string, a view, zero epochs, a NaN
    dose, a float16 matrix."""
    import anndata as ad

    import cpa_stream.compat as cpa

    adata = ad.read_h5ad(BUNDLED)
    adata.X = adata.layers["counts"].copy()
    # One covariate key as a string is one key, not its characters.
    cpa.CPA.setup_anndata(adata, perturbation_key="condition", control_group="control", dosage_key="dose",
                          categorical_covariate_keys="cell_type")
    assert adata.uns[cpa.SETUP_KEY]["categorical_covariate_keys"] == ["cell_type"]
    # A view (of a subset) is set up as anndata sets up any view written to: it becomes its own.
    view = adata[:300]
    assert view.is_view
    cpa.CPA.setup_anndata(view, perturbation_key="condition", control_group="control")
    assert list(view.obs["CPA_dose_val"][:3]) == [
        "+".join("1.0" for _ in c.split("+")) for c in view.obs["condition"][:3]
    ]
    # Zero epochs trains nothing: an error, not cpa-tools' default of hundreds.
    model = cpa.CPA(adata)
    for epochs in (0, -3, 2.5):
        with pytest.raises(ValueError, match=rf"max_epochs={epochs!r}.*nothing was trained"):
            model.train(max_epochs=epochs, threads=1)
    assert not model.is_trained_
    # A NaN in a float dose column: named by the engine, not an Arrow error without a row.
    singles = ~adata.obs["condition"].astype(str).str.contains("+", regex=False)
    nan_dose = adata[singles.to_numpy()][:400].copy()
    nan_dose.obs["dose"] = nan_dose.obs["dose"].astype(str).astype(float)
    nan_dose.obs.iloc[7, nan_dose.obs.columns.get_loc("dose")] = np.nan
    store = cs.import_h5ad(nan_dose, tmp_path / "nan.store", progress=False)
    assert np.isnan(store.obs["dose"].iloc[7])
    with pytest.raises(ValueError, match=r"obs.parquet: row 7 \(cell .*\): dose \"NaN\" .* is not a finite number"):
        cs.train(store, tmp_path / "run", perturbation_key="condition", dosage_key="dose", max_epochs=1,
                 progress=False, **COMPUTE)
    # A dense float16 matrix imports, as the CLI imports it.
    half = ad.AnnData(X=np.asarray(adata.X[:50].toarray(), dtype=np.float16), obs=adata.obs[:50].copy(),
                      var=adata.var.copy())
    store = cs.import_h5ad(half, tmp_path / "half.store", progress=False)
    assert store.n_obs == 50
    half.write_h5ad(tmp_path / "half.h5ad")
    from_file = cs.import_h5ad(tmp_path / "half.h5ad", tmp_path / "half-file.store", progress=False)
    assert from_file.n_obs == 50
    # Two genes of one name in one file: refused naming the gene (the store would merge them).
    twice = adata[:50].copy()
    names = list(twice.var_names)
    names[5] = names[2]
    twice.var_names = names
    twice.write_h5ad(tmp_path / "twice.h5ad")
    with pytest.raises(ValueError, match=rf"gene \"{names[2]}\" appears twice in the var index \(again at gene 5\)"):
        cs.import_h5ad(tmp_path / "twice.h5ad", tmp_path / "twice.store", progress=False)
    assert not (tmp_path / "twice.store").exists()
