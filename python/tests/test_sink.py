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
