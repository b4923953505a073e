"""AnnData zarr stores (issue 49 item 3, from Python): ``import_h5ad`` of a directory
``AnnData.write_zarr`` wrote, zarr format 2 and 3, CSR, CSC and dense X, layers, raw,
categoricals, nullable columns, gives the same store as the ``.h5ad`` twin of the same AnnData
(through the same native reader as the command line: tests/integration/zarr.rs checks the bytes)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cpa_stream as cs

ad = pytest.importorskip("anndata")
pytest.importorskip("zarr", reason="zarr is not installed")


def _adata(dense: bool = False):
    rng = np.random.default_rng(0)
    x = sp.random(300, 40, density=0.2, format="csr", dtype=np.float32, random_state=1)
    x.data = np.round(x.data * 20)
    obs = pd.DataFrame({
        "condition": pd.Categorical(rng.choice(["control", "A", "B", "A+B"], 300)),
        "dose": pd.Categorical(["1"] * 300),
        "count": pd.array([None if i % 7 == 0 else i for i in range(300)], dtype="Int64"),
        "flag": pd.array([None if i % 5 == 0 else bool(i % 2) for i in range(300)], dtype="boolean"),
        "label": [f"L{i % 9}" for i in range(300)],
        "score": rng.normal(size=300),
    }, index=[f"cell{i}" for i in range(300)])
    var = pd.DataFrame({"symbol": [f"S{i}" for i in range(40)]}, index=[f"g{i}" for i in range(40)])
    a = ad.AnnData(X=x.toarray() if dense else x, obs=obs, var=var)
    a.layers["counts"] = (x * 2).tocsr()
    a.raw = a[:, :30].copy()
    return a


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
def test_a_zarr_anndata_imports_as_its_h5ad_twin(tmp_path, fmt, dense):
    adata = _adata(dense)
    zarr_path, h5ad_path = tmp_path / "a.zarr", tmp_path / "a.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = ad.settings.zarr_write_format
        ad.settings.zarr_write_format = fmt
        try:
            adata.write_zarr(zarr_path)
        finally:
            ad.settings.zarr_write_format = previous
    adata.write_h5ad(h5ad_path)
    for kwargs, name in [({}, "x"), ({"layer": "counts"}, "layer"), ({"use_raw": True}, "raw")]:
        from_zarr = cs.import_h5ad(zarr_path, tmp_path / f"z-{name}.store", chunk_rows=64, progress=False, **kwargs)
        from_h5ad = cs.import_h5ad(h5ad_path, tmp_path / f"h-{name}.store", progress=False, **kwargs)
        pd.testing.assert_frame_equal(from_zarr.obs, from_h5ad.obs)
        pd.testing.assert_frame_equal(from_zarr.var, from_h5ad.var)
        # The matrices, read back through the package, and against anndata's own reader.
        za = ad.io.read_zarr(zarr_path) if hasattr(ad, "io") else ad.read_zarr(zarr_path)
        want = {"x": za.X, "layer": za.layers["counts"], "raw": za.raw.X if za.raw is not None else None}[name]
        back_path = tmp_path / f"z-{name}.h5ad"
        cs.export_h5ad(from_zarr, back_path, progress=False)
        got = ad.read_h5ad(back_path).X
        np.testing.assert_array_equal(sp.csr_matrix(got).toarray(), sp.csr_matrix(want).toarray())
        assert list(from_zarr.obs.index) == list(za.obs_names)
        assert from_zarr.obs["condition"].cat.categories.tolist() == za.obs["condition"].cat.categories.tolist()


def test_zarr_inputs_join_a_collection_and_bad_ones_are_clear_errors(tmp_path):
    adata = _adata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata[:150].write_zarr(tmp_path / "one.zarr")
    second = adata[150:].copy()
    second.write_h5ad(tmp_path / "two.h5ad")
    store = cs.import_h5ad([tmp_path / "one.zarr", tmp_path / "two.h5ad"], tmp_path / "both.store", progress=False)
    assert store.n_obs == 300 and set(store.obs["source_file"].unique()) == {"one", "two"}
    csc = adata.copy()
    csc.X = csc.X.tocsc()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csc.write_zarr(tmp_path / "csc.zarr")
    csc.write_h5ad(tmp_path / "csc.h5ad")
    from_csc = cs.import_h5ad(tmp_path / "csc.zarr", tmp_path / "csc.store", progress=False)
    twin = cs.import_h5ad(tmp_path / "csc.h5ad", tmp_path / "csc-twin.store", progress=False)
    pd.testing.assert_frame_equal(from_csc.obs, twin.obs)
    assert (tmp_path / "csc.store" / "X" / "data").read_bytes() == (tmp_path / "csc-twin.store" / "X" / "data").read_bytes()
    # Genes picked by name, as from a file.
    picked = cs.import_h5ad(tmp_path / "one.zarr", tmp_path / "picked.store", genes=["g3", "g1"], progress=False)
    assert list(picked.var.index) == ["g3", "g1"]
    with pytest.raises(ValueError, match="no layer .nope."):
        cs.import_h5ad(tmp_path / "one.zarr", tmp_path / "x.store", layer="nope", progress=False)


def test_the_package_takes_a_zarr_path_wherever_it_takes_a_store(tmp_path, monkeypatch):
    monkeypatch.setenv("CPA_STREAM_CACHE", str(tmp_path / "cache"))
    adata = _adata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_zarr(tmp_path / "a.zarr")
    run = cs.train(tmp_path / "a.zarr", tmp_path / "run", perturbation_key="condition",
                   control_group="control", max_epochs=1, threads=1, progress=False)
    stores = list((tmp_path / "cache" / "stores").glob("zarr-*.store"))
    assert len(stores) == 1
    latents = run.latents(tmp_path / "a.zarr", threads=1)
    assert list(latents["cell_id"]) == list(adata.obs_names)
    assert list((tmp_path / "cache" / "stores").glob("zarr-*.store")) == stores, "found again, not imported again"
