"""The package's own API takes AnnData objects and .h5ad paths wherever it takes a store (issue
50 item 7): an imported AnnData finds its store, a file or object never imported is imported once
into the cache and found again, and predictions come back named by the source cells' ids."""

from __future__ import annotations

import numpy as np
import pytest

import cpa_stream as cs
from conftest import COMPUTE, LABELS


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPA_STREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "stores"


def test_an_imported_anndata_trains_predicts_and_evaluates_by_itself(adata, tmp_path, cache):
    small = adata[:1500].copy()
    store = cs.import_h5ad(small, tmp_path / "small.store", progress=False)
    run = cs.train(small, tmp_path / "run", **LABELS, max_epochs=2, seed=1, progress=False, **COMPUTE)
    assert not cache.exists() or not any(cache.glob("anndata-*")), "the imported store was not found"
    assert run.settings  # trained
    # Latents and predictions of the AnnData itself, aligned with its obs names.
    latents = run.latents(small, threads=1)
    assert list(latents["cell_id"]) == list(small.obs_names)
    assert latents["z_basal"].shape[0] == small.n_obs
    predicted = run.predict_anndata(small, source="all", threads=1)
    assert list(predicted.obs_names) == list(small.obs_names)
    target = run.perturbations[0]
    two = run.predict_anndata(small, source="all", targets=[target, run.perturbations[1]], threads=1)
    assert two.obs_names.is_unique and two.obs_names[0].startswith(str(small.obs_names[0]))
    evaluation = run.evaluate(small, split="valid", threads=1)
    assert evaluation is not None
    assert store.n_obs == small.n_obs


def test_a_file_or_object_never_imported_is_imported_once_into_the_cache(adata, tmp_path, cache):
    small = adata[:800].copy()
    path = tmp_path / "small.h5ad"
    small.write_h5ad(path)
    first = cs._store.store_of(path)
    assert first.startswith(str(cache)) and cs.Store(first).n_obs == 800
    assert cs._store.store_of(path) == first, "the file's store is found again"
    # A changed file is another file.
    small[:400].copy().write_h5ad(path)
    second = cs._store.store_of(path)
    assert second != first and cs.Store(second).n_obs == 400
    # An object: imported once, found again while it lives.
    obj = adata[:300].copy()
    made = cs._store.store_of(obj)
    assert cs._store.store_of(obj) == made and cs.Store(made).n_obs == 300
    np.testing.assert_array_equal(cs.Store(made).obs.index.to_numpy(), obj.obs_names.to_numpy())
    with pytest.raises(TypeError, match="AnnData"):
        cs._store.store_of(42)
