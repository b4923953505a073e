"""Stores from AnnData objects (in memory, CSR / CSC / dense, backed) and files, equal to what
`cpa-stream import` writes from the same data."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

import cpa_stream as cs

from conftest import BUNDLED


def matrix_files(path):
    return {name: (path / name).read_bytes() for name in ("X/indptr", "X/indices", "X/data")}


def same_table(a, b):
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.schema.equals(tb.schema, check_metadata=False), f"{ta.schema}\n!=\n{tb.schema}"
    for field_a, field_b in zip(ta.schema, tb.schema):
        assert field_a.metadata == field_b.metadata, field_a.name
    assert ta.equals(tb)


def test_in_memory_anndata_gives_the_store_the_cli_writes_from_its_file(adata, store, cli, scratch):
    from_file = scratch / "from-file.store"
    subprocess.run([cli, "import", BUNDLED, "--out", from_file, "--quiet"], check=True)
    assert matrix_files(store.path) == matrix_files(from_file)
    same_table(store.path / "obs.parquet", from_file / "obs.parquet")
    same_table(store.path / "var.parquet", from_file / "var.parquet")
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert manifest["n_obs"] == adata.n_obs and manifest["n_vars"] == adata.n_vars
    assert "in memory" in manifest.get("source", "")


@pytest.mark.parametrize("form", ["csc", "dense"])
def test_csc_and_dense_matrices_give_the_same_store_as_csr(adata, store, fresh, form):
    copy = adata.copy()
    copy.X = sp.csc_matrix(adata.X) if form == "csc" else adata.X.toarray()
    other = cs.import_h5ad(copy, fresh / f"{form}.store", chunk_rows=333, progress=False)
    assert matrix_files(other.path) == matrix_files(store.path)


def test_a_layer_a_zstd_codec_and_a_backed_file(adata, fresh):
    layer = cs.import_h5ad(adata, fresh / "counts.store", layer="counts", codec="zstd", progress=False)
    assert layer.shape == adata.shape
    assert layer.manifest["codec"] != "raw"
    backed_data = __import__("anndata").read_h5ad(BUNDLED, backed="r")
    backed = cs.import_h5ad(backed_data, fresh / "backed.store", progress=False)
    assert matrix_files(backed.path) == matrix_files(cs.import_h5ad(adata, fresh / "mem.store", progress=False).path)
    with pytest.raises(ValueError, match="no layer 'nope'.*counts"):
        cs.import_h5ad(adata, fresh / "x.store", layer="nope", progress=False)


def test_store_tables_read_as_pandas_with_ordered_categories(adata, store):
    assert store.shape == adata.shape
    obs = store.obs
    assert list(obs.index[:3]) == list(adata.obs_names[:3])
    assert isinstance(obs["condition"].dtype, pd.CategoricalDtype)
    assert list(obs["condition"].cat.categories) == list(adata.obs["condition"].cat.categories)
    assert (obs["condition"].astype(str).values == adata.obs["condition"].astype(str).values).all()
    assert np.allclose(obs["ncounts_orig"].values, adata.obs["ncounts_orig"].values)
    assert list(store.var.index) == list(adata.var_names)
    assert store.obs_polars().height == adata.n_obs
    assert store.degs is None


def test_degs_from_uns_are_imported_and_the_key_is_recorded(adata, fresh):
    copy = adata[:200].copy()
    genes = list(copy.var_names[:5])
    copy.uns["rank_genes_groups_cov"] = {"k562_SGK1": np.array(genes), "k562_KLF1": np.array(genes[::-1])}
    copy.uns["other"] = {"note": "not DEGs", "n": 3}
    imported = cs.import_h5ad(copy, fresh / "degs.store", deg_uns_key="rank_genes_groups_cov", progress=False)
    degs = imported.degs
    assert degs.attrs["uns_key"] == "rank_genes_groups_cov"
    assert list(degs[degs.group == "k562_KLF1"].sort_values("rank").gene) == genes[::-1]
    with pytest.raises(ValueError, match="deg_uns_key 'missing'"):
        cs.import_h5ad(copy, fresh / "x.store", deg_uns_key="missing", progress=False)


def test_bad_values_and_columns_are_errors_naming_them(adata, fresh):
    copy = adata[:50].copy()
    copy.X = copy.X.toarray()
    copy.X[7, 3] = -1.0
    with pytest.raises(ValueError, match="cell 7"):
        cs.import_h5ad(copy, fresh / "neg.store", progress=False)
    assert not (fresh / "neg.store").exists(), "a failed import leaves no store"
    copy = adata[:50].copy()
    copy.obs["when"] = pd.Timestamp("2024-01-01")
    with pytest.raises(ValueError, match="obs column 'when'"):
        cs.import_h5ad(copy, fresh / "dt.store", progress=False)


def test_an_existing_store_is_refused_unless_overwrite(adata, fresh):
    small = adata[:100].copy()
    cs.import_h5ad(small, fresh / "s.store", progress=False)
    with pytest.raises(FileExistsError, match="s.store"):
        cs.import_h5ad(small, fresh / "s.store", progress=False)
    again = cs.import_h5ad(small, fresh / "s.store", overwrite=True, progress=False)
    assert again.n_obs == 100
    with pytest.raises(FileNotFoundError):
        cs.Store(fresh / "absent.store")


def test_export_writes_the_cells_a_selection_picks(adata, store, fresh):
    """`export --cells`: the cells an expression over obs selects, in the store's order, as
    anndata reads them; a selection of no cell is an error that writes nothing."""
    import anndata as ad

    select = "cell_type == k562 and condition in (MAPK1+TGFBR2, control)"
    part = ad.read_h5ad(cs.export_h5ad(store, fresh / "part.h5ad", cells=select, progress=False))
    obs = adata.obs
    mask = ((obs["cell_type"] == "k562") & obs["condition"].isin(["MAPK1+TGFBR2", "control"])).to_numpy()
    assert 0 < mask.sum() < len(mask)
    want = adata[mask]
    assert list(part.obs_names) == list(want.obs_names)
    assert list(part.var_names) == list(adata.var_names)
    np.testing.assert_array_equal(part.X.toarray(), want.X.toarray())
    for column in ("condition", "dose", "cell_type"):
        assert list(part.obs[column].astype(str)) == list(want.obs[column].astype(str)), column
        # No empty category: scanpy's tests (cell-eval2's) refuse a group without cells.
        kept = [c for c in adata.obs[column].cat.categories if c in set(want.obs[column])]
        assert list(part.obs[column].cat.categories) == kept, column

    with pytest.raises(ValueError, match=r'selects no cell.*no value "contrl".*"control"'):
        cs.export_h5ad(store, fresh / "none.h5ad", cells="condition == contrl", progress=False)
    assert not (fresh / "none.h5ad").exists(), "an export of no cell leaves no file"
    with pytest.raises(ValueError, match=r"obs column \"cel_type\".*\"cell_type\""):
        cs.export_h5ad(store, fresh / "col.h5ad", cells="cel_type == k562", progress=False)
