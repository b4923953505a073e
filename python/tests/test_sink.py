"""The prediction file's encodings (issue 51): every profile, written on any number of encoding
threads, reads the same in every reader the project supports (pyarrow, polars, DuckDB, pandas)."""

from __future__ import annotations

import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest


@pytest.mark.parametrize("profile", ["small", "fast"])
def test_every_profile_reads_the_same_in_every_reader(cli, run, store, tmp_path, profile):
    import duckdb
    import pandas as pd
    import polars as pl

    written = {}
    for threads in (1, 2):
        out = tmp_path / f"{profile}-{threads}.parquet"
        subprocess.run(
            [cli, "predict", "--model", str(run.path), "--store", str(store.path), "--target", "MAP2K6",
             "--source", "all", "--threads", "1", "--workers", "1", "--row-group-rows", "1000",
             "--sink-threads", str(threads), "--sink-profile", profile, "--out", str(out)],
            check=True, capture_output=True,
        )
        written[threads] = out
    table = pq.read_table(written[1])
    assert pq.ParquetFile(written[1]).metadata.num_row_groups > 1
    # The same rows whatever the thread count.
    assert pq.read_table(written[2]).equals(table)
    means = np.stack(table.column("mean").to_numpy(zero_copy_only=False))
    frames = {
        "polars": pl.read_parquet(written[1]),
        "pandas": pd.read_parquet(written[1]),
        "duckdb": duckdb.sql(f"select * from '{written[1]}'").df(),
    }
    for name, frame in frames.items():
        assert len(frame) == table.num_rows, name
        column = frame["mean"].to_list() if name == "polars" else list(frame["mean"])
        np.testing.assert_array_equal(np.stack([np.asarray(v, dtype=np.float32) for v in column]), means, name)
    codec = pq.ParquetFile(written[1]).metadata.row_group(0).column(0).compression
    assert codec == ("UNCOMPRESSED" if profile == "fast" else "ZSTD")


def test_parts_from_python_read_whole_in_every_reader(run, store, tmp_path):
    """``predict_to_parquet(parts=True)``: a directory of part files that polars, pandas,
    pyarrow and DuckDB read as one table, the single file's rows in order."""
    import duckdb
    import pandas as pd
    import polars as pl

    keywords = dict(source="all", targets=["MAP2K6"], threads=1, row_group_rows=1000, sink_threads=2)
    single = tmp_path / "single.parquet"
    run.predict_to_parquet(single, store, **keywords)
    parts = tmp_path / "parts"
    report = run.predict_to_parquet(parts, store, parts=True, **keywords)
    names = sorted(p.name for p in parts.iterdir())
    assert report["output"]["files"] == len(names) > 1, names
    assert all(n.startswith("part-") and n.endswith(f"-of-{len(names)}.parquet") for n in names), names
    table = pq.read_table(single)
    assert pq.read_table(parts).equals(table)
    assert pl.read_parquet(parts).equals(pl.read_parquet(single))
    assert list(pd.read_parquet(parts)["cell_id"]) == table.column("cell_id").to_pylist()
    assert duckdb.sql(f"select count(*) from read_parquet('{parts}/*.parquet')").fetchall()[0][0] == table.num_rows
    with pytest.raises(Exception, match="shard"):
        run.predict_to_parquet(tmp_path / "both", store, parts=True, shard="0/2", **keywords)


def test_aggregates_from_python_equal_the_cells_grouped_in_polars(run, store, tmp_path):
    """``aggregate=`` on the Arrow stream and on ``predict_to_parquet``: one row per target and
    group, equal to the per-cell predictions grouped afterwards (polars, ddof 1)."""
    import polars as pl

    keywords = dict(source="all", targets=["MAP2K6"], threads=1)
    cells = pl.DataFrame(run.predict(store, **keywords))
    groups = pl.DataFrame(run.predict(store, aggregate="mean,var", **keywords))
    outputs = ("condition", "dose", "n_cells", "n_anchored", "mean", "mean_var", "anchored", "anchored_var")
    covariates = [c for c in groups.columns if c not in outputs]
    assert groups.columns[:2] == ["condition", "dose"] and len(covariates) >= 1, groups.columns
    keys = ["condition", "dose", *covariates]
    values = np.stack(cells["mean"].to_numpy())
    anchored, is_anchored = np.stack(cells["anchored"].to_numpy()), cells["is_anchored"].to_numpy()
    labels = cells.select(pl.col(k).cast(pl.String) for k in keys).rows()
    assert len(groups) == len(set(labels))
    for row in groups.with_columns(pl.col(k).cast(pl.String) for k in keys).iter_rows(named=True):
        members = np.array([label == tuple(row[k] for k in keys) for label in labels])
        assert row["n_cells"] == members.sum()
        np.testing.assert_allclose(row["mean"], values[members].mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row["mean_var"], values[members].var(axis=0, ddof=1), rtol=1e-4, atol=1e-6)
        # The anchored prediction (the default with targets): its mean, and the anchored cells counted.
        assert row["n_anchored"] == is_anchored[members].sum()
        np.testing.assert_allclose(row["anchored"], anchored[members].mean(axis=0), rtol=1e-5, atol=1e-5)

    out = tmp_path / "groups.parquet"
    report = run.predict_to_parquet(out, store, aggregate=["mean"], group_by=[], **keywords)
    assert report["aggregated"] and report["output"]["rows"] == 1, report
    table = pq.read_table(out)
    assert table.column_names == ["condition", "dose", "n_cells", "n_anchored", "mean", "anchored"]
    assert table.column("n_cells")[0].as_py() == len(cells)
    with pytest.raises(Exception, match="group_by"):
        run.predict(store, group_by="cell_type", **keywords)


def test_float16_values_read_in_every_reader_within_half_precision(cli, run, store, tmp_path):
    """``--values f16`` (Parquet FLOAT16): pyarrow, pandas, polars and DuckDB read it, each value
    within half precision of the float32 file's."""
    import duckdb
    import pandas as pd
    import polars as pl

    files = {}
    for values in ("f32", "f16"):
        files[values] = tmp_path / f"{values}.parquet"
        subprocess.run(
            [cli, "predict", "--model", str(run.path), "--store", str(store.path), "--target", "MAP2K6",
             "--threads", "1", "--values", values, "--out", str(files[values])],
            check=True, capture_output=True,
        )
    single = np.stack(pq.read_table(files["f32"]).column("mean").to_numpy(zero_copy_only=False)).astype(np.float64)
    assert files["f16"].stat().st_size < 0.75 * files["f32"].stat().st_size
    read = {
        "pyarrow": pq.read_table(files["f16"]).column("mean").to_numpy(zero_copy_only=False),
        "pandas": pd.read_parquet(files["f16"])["mean"].to_numpy(),
        "polars": pl.read_parquet(files["f16"])["mean"].to_numpy(),
        "duckdb": duckdb.sql(f"select mean from '{files['f16']}'").df()["mean"].to_numpy(),
    }
    for name, column in read.items():
        half = np.stack([np.asarray(v, dtype=np.float64) for v in column])
        assert half.shape == single.shape, name
        bound = np.maximum(np.abs(single) * 2.0**-11, 2.0**-25)
        assert (np.abs(half - single) <= bound).all(), name


def test_polars_scans_shards_and_parts_lazily_with_the_schema_types(cli, run, store, tmp_path):
    """What a polars user writes to read predictions out of core: ``pl.scan_parquet`` of a
    shard directory (``--shard k/n``, its ``genes.parquet`` beside the parts left out by the
    pattern) and of a ``--parts`` directory, filtered before anything is read; ``mean`` reads as
    ``Array(Float32, genes)``, the labels as ``Categorical``, ``--values f16`` as ``Float16``.
    (The Rust crate linked polars for this until issue 79; the test moved here with the use.)"""
    import polars as pl

    def predict(*args: str) -> None:
        subprocess.run([cli, "predict", "--model", str(run.path), "--store", str(store.path), "--target", "MAP2K6",
                        "--threads", "1", *args], check=True, capture_output=True)

    controls = int((store.obs["condition"].astype(str) == "control").sum())
    genes = store.n_vars
    shards = tmp_path / "shards"
    for k in range(2):
        predict("--latents", "z_basal", "--shard", f"{k}/2", "--out", str(shards))
    assert sorted(p.name for p in shards.iterdir()) == ["genes.parquet", "part-0-of-2.parquet", "part-1-of-2.parquet"]
    lazy = pl.scan_parquet(shards / "part-*.parquet")
    schema = lazy.collect_schema()
    assert schema["mean"] == pl.Array(pl.Float32, genes)
    assert isinstance(schema["condition"], pl.Categorical), schema["condition"]
    assert schema["cell_id"] == pl.String
    assert isinstance(schema["z_basal"], pl.Array) and schema["z_basal"].inner == pl.Float32
    frame = lazy.filter(pl.col("condition").cast(pl.String) == "MAP2K6").collect()
    assert frame.height == controls, "both shards, every control cell"

    parts = tmp_path / "parts"
    predict("--parts", "--source", "all", "--row-group-rows", "1000", "--out", str(parts))
    assert len(list(parts.iterdir())) > 1
    assert pl.scan_parquet(parts).select(pl.len()).collect().item() == store.n_obs

    half = tmp_path / "f16.parquet"
    predict("--values", "f16", "--out", str(half))
    assert pl.scan_parquet(half).collect_schema()["mean"] == pl.Array(pl.Float16, genes)
