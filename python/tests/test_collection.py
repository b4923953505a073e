"""Many AnnData files into one store (issue 49): the store equals ``anndata.concat`` of the same
files (inner and outer joins, labels, ``index_unique``), with genes in other orders and subsets,
obs columns that only some files have, categories that differ and integer beside float counts;
mistakes (an id in two files, genes that do not match, counts beside other values) are errors
naming the file."""

from __future__ import annotations

import shutil
import subprocess

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cpa_stream as cs
from conftest import BUNDLED


def make(seed: int, n_obs: int, genes: list[str], prefix: str, extra: dict | None = None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.7, size=(n_obs, len(genes))).astype(dtype)
    dense[rng.random(dense.shape) < 0.5] = 0
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(rng.choice([f"drug{seed}", "ctrl", "drugX"], n_obs)),
            "dose": rng.choice([0.1, 1.0, 10.0], n_obs),
        },
        index=[f"{prefix}{i}" for i in range(n_obs)],
    )
    for name, values in (extra or {}).items():
        obs[name] = values(rng, n_obs)
    return ad.AnnData(sp.csr_matrix(dense), obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture
def files(tmp_path):
    genes = [f"G{i:03d}" for i in range(40)]
    rng = np.random.default_rng(0)
    # The second file holds its genes in another order and lacks five; the third has five more
    # and stores its counts as integers, in CSC.
    second = list(rng.permutation(genes[5:]))
    third = list(rng.permutation(genes + [f"N{i}" for i in range(5)]))
    adatas = [
        make(1, 30, genes, "a", {"batch": lambda r, n: pd.Categorical(r.choice(["b1", "b2"], n))}),
        make(2, 25, second, "b", {"plate": lambda r, n: r.integers(1, 4, n)}),
        make(3, 20, third, "c", {"batch": lambda r, n: pd.Categorical(r.choice(["b2", "b3"], n))}, np.int64),
    ]
    adatas[2].X = sp.csc_matrix(adatas[2].X)
    paths = []
    for k, adata in enumerate(adatas):
        path = tmp_path / f"plate{k}.h5ad"
        adata.write_h5ad(path)
        paths.append(path)
    return paths


def read_back(store, tmp_path, name):
    out = tmp_path / f"{name}.h5ad"
    cs.export_h5ad(store, out)
    return ad.read_h5ad(out)


def dense(adata):
    return adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)


def same_as_concat(ours, theirs, source_key="source_file"):
    """The store's cells, genes and values are anndata.concat's (genes matched by name)."""
    assert list(ours.obs_names) == list(theirs.obs_names)
    assert set(ours.var_names) == set(theirs.var_names)
    theirs = theirs[:, list(ours.var_names)]
    np.testing.assert_array_equal(dense(ours), dense(theirs).astype(np.float32))
    for column in theirs.obs.columns:
        mine, want = ours.obs[column], theirs.obs[column]
        if isinstance(want.dtype, pd.CategoricalDtype) or isinstance(mine.dtype, pd.CategoricalDtype):
            assert list(mine.astype(object).where(mine.notna(), None)) == list(
                want.astype(object).where(want.notna(), None)
            ), column
        else:
            np.testing.assert_array_equal(mine.to_numpy(dtype=float), want.to_numpy(dtype=float), err_msg=column)
    # obs holds the union of the files' columns whatever the join of the genes (anndata's inner
    # join keeps only the columns every file has).
    assert set(ours.obs.columns) >= set(theirs.obs.columns)


@pytest.mark.parametrize("join", ["inner", "outer"])
def test_many_files_make_the_store_anndata_concat_makes(files, tmp_path, join):
    labels = ["p0", "p1", "p2"]
    store = cs.import_h5ad(files, tmp_path / f"{join}.store", join=join, labels=labels, make_unique=True)
    ours = read_back(store, tmp_path, join)
    theirs = ad.concat(
        [ad.read_h5ad(p) for p in files], join=join, label="source_file", keys=labels, index_unique="-"
    )
    same_as_concat(ours, theirs)
    assert store.n_vars == (35 if join == "inner" else 45)
    # The first file's genes keep its order; genes new in later files follow.
    first = list(ad.read_h5ad(files[0]).var_names)
    assert [g for g in ours.var_names if g in first] == [g for g in first if g in set(ours.var_names)]
    # A column that a file lacks is missing in its cells; categories merge in the order met.
    assert ours.obs["batch"].cat.categories.tolist() == ["b1", "b2", "b3"]
    assert ours.obs.loc[ours.obs["source_file"] == "p1", "batch"].isna().all()
    assert ours.obs["source_file"].cat.categories.tolist() == labels


def test_a_list_of_paths_and_anndata_objects_imports_as_the_cli_does(files, tmp_path, cli):
    objects = [ad.read_h5ad(files[0]), files[1], ad.read_h5ad(files[2], backed="r")]
    store = cs.import_h5ad(objects, tmp_path / "mixed.store", labels=["plate0", "plate1", "plate2"])
    listing = tmp_path / "inputs.txt"
    listing.write_text("# the plates\nplate1.h5ad\n\nplate2.h5ad\n")
    listed = tmp_path / "cli.store"
    subprocess.run(
        [cli, "import", str(files[0]), "--inputs-from", str(listing), "--out", str(listed)],
        check=True,
        capture_output=True,
    )
    pattern = tmp_path / "glob.store"
    command = [cli, "import", str(tmp_path / "plate?.h5ad"), "--out", str(pattern)]
    subprocess.run(command, check=True, capture_output=True)
    want = read_back(store, tmp_path, "mixed")
    for other in (listed, pattern):
        got = read_back(cs.Store(other), tmp_path, other.stem)
        assert list(got.obs_names) == list(want.obs_names)
        assert list(got.var_names) == list(want.var_names)
        np.testing.assert_array_equal(dense(got), dense(want))
        pd.testing.assert_frame_equal(got.obs, want.obs)


def test_a_shuffled_import_holds_the_same_cells_in_a_seeded_order(files, tmp_path):
    plain = read_back(cs.import_h5ad(files, tmp_path / "plain.store"), tmp_path, "plain")
    orders = []
    for k, seed in enumerate([7, 7, 8]):
        got = read_back(cs.import_h5ad(files, tmp_path / f"s{k}.store", shuffle=seed), tmp_path, f"s{k}")
        assert sorted(got.obs_names) == sorted(plain.obs_names)
        again = plain[list(got.obs_names)]
        np.testing.assert_array_equal(dense(got), dense(again))
        for column in again.obs.columns:
            pd.testing.assert_series_equal(got.obs[column], again.obs[column], obj=column)
        orders.append(list(got.obs_names))
    assert orders[0] == orders[1] and orders[0] != orders[2]
    assert orders[0] != list(plain.obs_names)


def test_genes_matched_by_a_var_column(files, tmp_path):
    # Each file names its genes by symbols of its own, but has the shared ids in a column.
    adatas = [ad.read_h5ad(p) for p in files[:2]]
    for k, adata in enumerate(adatas):
        adata.var["gene_ids"] = [f"ENSG{g[1:]}" for g in adata.var_names]
        adata.var_names = [f"sym{k}_{g}" for g in adata.var_names]
    paths = [tmp_path / "k0.h5ad", tmp_path / "k1.h5ad"]
    for adata, path in zip(adatas, paths):
        adata.write_h5ad(path)
    with pytest.raises(ValueError, match="k1.h5ad: none of its 35 genes is a gene of the files before it"):
        cs.import_h5ad(paths, tmp_path / "never.store")
    store = cs.import_h5ad(paths, tmp_path / "keyed.store", gene_key="gene_ids")
    assert store.n_vars == 35
    assert store.var.index[0].startswith("ENSG")
    assert store.var["var_index"].iloc[0].startswith("sym0_")


def test_mistakes_name_the_file(files, tmp_path):
    shared = r'cell id "a\d+" is in .*plate0.h5ad \(cell \d+\) and in .*plate0b.h5ad \(cell \d+\), and about 29 more'
    with pytest.raises(ValueError, match=shared):
        twin = tmp_path / "plate0b.h5ad"
        twin.write_bytes(files[0].read_bytes())
        cs.import_h5ad([files[0], twin], tmp_path / "dup.store")
    assert not (tmp_path / "dup.store").exists()
    normalised = ad.read_h5ad(files[1])
    normalised.X = normalised.X.multiply(0.37).tocsr()
    path = tmp_path / "normalised.h5ad"
    normalised.write_h5ad(path)
    with pytest.raises(ValueError, match=r"normalised.h5ad: X holds values that are not counts"):
        cs.import_h5ad([files[0], path], tmp_path / "mixed.store")
    with pytest.raises(ValueError, match="same label"):
        other = tmp_path / "again"
        other.mkdir()
        (other / "plate0.h5ad").write_bytes(files[1].read_bytes())
        cs.import_h5ad([files[0], other / "plate0.h5ad"], tmp_path / "label.store")
    with pytest.raises(ValueError, match="--labels|labels: 1 labels for 2"):
        cs.import_h5ad(files[:2], tmp_path / "l.store", labels=["one"])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), list(tmp_path.iterdir())


def cell_table(adata, path, vocabulary: dict[str, int], marker: bool):
    """``adata`` as a Parquet cell table (Tahoe-100M's layout: a row per cell, token ids and counts
    as lists, a marker entry of count -2 first), with its obs columns beside."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    X = sp.csr_matrix(adata.X)
    genes, counts = [], []
    for r in range(adata.n_obs):
        cols, vals = X.indices[X.indptr[r] : X.indptr[r + 1]], X.data[X.indptr[r] : X.indptr[r + 1]]
        ids = [vocabulary[adata.var_names[c]] for c in cols]
        # Lists in another order than the vocabulary's: the reader sorts them.
        order = np.argsort(ids)[::-1]
        ids, vals = [ids[k] for k in order], [float(vals[k]) for k in order]
        genes.append(([0] if marker else []) + ids)
        counts.append(([-2.0] if marker else []) + vals)
    table = pa.table(
        {
            "genes": pa.array(genes, pa.list_(pa.int64())),
            "expressions": pa.array(counts, pa.list_(pa.float32())),
            "BARCODE_SUB_LIB_ID": list(adata.obs_names),
            "drug": list(adata.obs["condition"].astype(str)),
            "dose": adata.obs["dose"].to_numpy(),
        }
    )
    pq.write_table(table, path, row_group_size=7)


def test_parquet_cell_tables_import_as_their_h5ad_twins(files, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    adatas = [ad.read_h5ad(p) for p in files[:2]]
    names = sorted(set(adatas[0].var_names) | set(adatas[1].var_names))
    vocabulary = {g: 10 + 3 * k for k, g in enumerate(names)}
    vocabulary["<cls>"] = 0
    pq.write_table(
        pa.table({"token_id": list(vocabulary.values()), "gene_symbol": list(vocabulary.keys())}),
        tmp_path / "gene_metadata.parquet",
    )
    tables = [tmp_path / "shard0.parquet", tmp_path / "shard1.parquet"]
    for adata, path in zip(adatas, tables):
        cell_table(adata, path, vocabulary, marker=True)
    common = dict(labels=["p0", "p1"], join="outer")
    store = cs.import_h5ad(
        tables, tmp_path / "cells.store", var_table=tmp_path / "gene_metadata.parquet", marker_value=-2,
        cell_id_column="BARCODE_SUB_LIB_ID", **common,
    )
    # The twins: the same cells as .h5ad files, their obs named as the tables name them.
    twins = []
    for k, adata in enumerate(adatas):
        twin = ad.AnnData(adata.X, obs=pd.DataFrame({"drug": adata.obs["condition"].astype(str).to_numpy(),
                                                     "dose": adata.obs["dose"].to_numpy()}, index=adata.obs_names),
                          var=pd.DataFrame(index=adata.var_names))
        twins.append(twin)
    want = ad.concat(twins, join="outer", label="source_file", keys=["p0", "p1"])
    got = read_back(store, tmp_path, "cells")
    assert store.n_vars == len(vocabulary)
    assert list(got.obs_names) == list(want.obs_names)
    np.testing.assert_array_equal(dense(got[:, list(want.var_names)]), dense(want).astype(np.float32))
    assert dense(got[:, ["<cls>"]]).sum() == 0
    assert list(got.obs["drug"]) == list(want.obs["drug"])
    np.testing.assert_array_equal(got.obs["dose"].to_numpy(), want.obs["dose"].to_numpy())
    assert list(got.obs["source_file"]) == list(want.obs["source_file"])
    # Without the marker's count, its token is a gene the vocabulary names (<cls>, count -2):
    # refused as a negative count, naming the file and cell.
    with pytest.raises(ValueError, match=r"shard0.parquet: expressions: cell 0, .*negative.*--marker-value"):
        cs.import_h5ad(tables, tmp_path / "never.store", var_table=tmp_path / "gene_metadata.parquet")
    # An id the vocabulary lacks names the cell and the vocabulary.
    vocabulary.pop(names[0])
    pq.write_table(
        pa.table({"token_id": list(vocabulary.values()), "gene_symbol": list(vocabulary.keys())}),
        tmp_path / "short.parquet",
    )
    with pytest.raises(ValueError, match=r"shard0.parquet: cell \d+: gene id 10 is not in the vocabulary"):
        cs.import_h5ad(tables, tmp_path / "never.store", var_table=tmp_path / "short.parquet", marker_value=-2)
    assert not (tmp_path / "never.store").exists()


def test_appending_adds_cells_as_a_new_version_that_the_old_model_predicts_on(files, tmp_path, run, store):
    path = tmp_path / "a.store"
    cs.import_h5ad(files[:2], path, labels=["p0", "p1"])
    cs.import_h5ad([files[2]], path, append=True, labels=["p2"])
    got = read_back(cs.Store(path), tmp_path, "appended")
    want = ad.concat([ad.read_h5ad(p) for p in files], join="inner", label="source_file", keys=["p0", "p1", "p2"])
    # The store's genes, in its order (the third file has them all and five more, left out).
    assert list(got.var_names) == [g for g in ad.read_h5ad(files[0]).var_names if g in set(want.var_names)]
    same_as_concat(got, want)
    # A file without the store's genes is refused, and the store stays as it was.
    before = sorted(p.name for p in path.iterdir())
    lacking = ad.read_h5ad(files[1])
    lacking.obs_names = [f"x{i}" for i in range(lacking.n_obs)]
    lacking[:, lacking.var_names[3:]].write_h5ad(tmp_path / "lacking.h5ad")
    with pytest.raises(ValueError, match=r"lacking.h5ad: 3 gene\(s\) of .*a.store are not among its genes"):
        cs.import_h5ad([tmp_path / "lacking.h5ad"], path, append=True)
    assert sorted(p.name for p in path.iterdir()) == before
    assert cs.Store(path).n_obs == 75
    # A model trained on a store predicts on the store with cells appended (the bundled cells
    # again, their ids made unique).
    grown = tmp_path / "grown.store"
    shutil.copytree(store.path, grown)
    cs.import_h5ad([BUNDLED], grown, append=True, make_unique=True, labels=["again"])
    assert cs.Store(grown).n_obs == 2 * store.n_obs
    # The store's cells keep their ids; the cells added take their file's label.
    ids, theirs = list(cs.Store(grown).obs.index), list(store.obs.index)
    assert ids == theirs + [f"{i}-again" for i in theirs]
    table = run.predict(cs.Store(grown), targets=["MAP2K6"], threads=1, workers=1).read_all()
    assert table.num_rows > 0


def test_inputs_without_cells_are_an_error_unless_allowed(files, tmp_path):
    empty = ad.read_h5ad(files[0])[:0].copy()
    empty.write_h5ad(tmp_path / "empty.h5ad")
    for data in (tmp_path / "empty.h5ad", empty, [tmp_path / "empty.h5ad", empty]):
        with pytest.raises(ValueError, match="no cells; nothing was written"):
            cs.import_h5ad(data, tmp_path / "never.store")
        assert not (tmp_path / "never.store").exists()
    assert cs.import_h5ad(tmp_path / "empty.h5ad", tmp_path / "empty.store", allow_empty=True).n_obs == 0
    # A file without cells beside others is no error.
    assert cs.import_h5ad([tmp_path / "empty.h5ad", files[0]], tmp_path / "some.store").n_obs == 30
