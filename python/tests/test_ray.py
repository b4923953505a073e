"""Prediction fanned out as Ray tasks on a local cluster: one Parquet dataset equal to a single
run's predictions."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import cpa_stream.ray as cs_ray

ray = pytest.importorskip("ray", reason="ray is not installed (scripts/python.sh tries to install it)")

TARGET = "condition=SGK1,dose=1,cell_type=k562"


def test_ray_shards_make_one_dataset_equal_to_a_single_run(run, store, fresh):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        reports = cs_ray.predict(run, store, fresh / "parts", shards=3, source="all", targets=TARGET,
                                 genes=None, top_deg=None)
    finally:
        ray.shutdown()
    assert len(reports) == 3
    parts = sorted(p.name for p in (fresh / "parts").glob("part-*.parquet"))
    assert parts == [f"part-{k}-of-3.parquet" for k in range(3)]
    fanned = ds.dataset(sorted((fresh / "parts").glob("part-*.parquet"))).to_table()
    run.predict_to_parquet(fresh / "single.parquet", store, source="all", targets=TARGET, threads=1, workers=1)
    single = pq.read_table(fresh / "single.parquet")
    assert fanned.num_rows == single.num_rows == store.n_obs
    assert fanned.column("cell_id").to_pylist() == single.column("cell_id").to_pylist()
    # Batches are cut at other cells (shard starts), and a matrix product's rounding may follow
    # the batch's size: equal to float32 rounding.
    a = np.stack(fanned.column("mean").to_numpy(zero_copy_only=False))
    b = np.stack(single.column("mean").to_numpy(zero_copy_only=False))
    assert np.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ray_shards_predict_an_ensemble_as_one_process_does(run, store, fresh):
    import cpa_stream as cs

    from conftest import COMPUTE, LABELS

    other = cs.train(store, fresh / "other", **LABELS, holdout=["MAP2K3+MAP2K6"], max_epochs=2, seed=3,
                     split_seed=1, progress=False, **COMPUTE)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        with pytest.raises(TypeError, match="wrap it in a list"):
            cs_ray.predict(run, store, fresh / "parts", shards=2, targets=TARGET, ensemble=other)
        cs_ray.predict(run, store, fresh / "parts", shards=2, source="all", targets=TARGET, ensemble=[other])
    finally:
        ray.shutdown()
    fanned = ds.dataset(sorted((fresh / "parts").glob("part-*.parquet"))).to_table()
    run.predict_to_parquet(fresh / "single.parquet", store, source="all", targets=TARGET, ensemble=[other],
                           threads=1, workers=1)
    single = pq.read_table(fresh / "single.parquet")
    assert b"cpa_stream.ensemble" in single.schema.metadata
    assert fanned.column("cell_id").to_pylist() == single.column("cell_id").to_pylist()
    a = np.stack(fanned.column("mean").to_numpy(zero_copy_only=False))
    b = np.stack(single.column("mean").to_numpy(zero_copy_only=False))
    assert np.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ray_train_workers_train_as_ranks_launched_otherwise(store, fresh):
    """Two Ray Train workers (gloo) give the run that two ranks launched by hand give."""
    pytest.importorskip("ray.train.torch", reason="Ray Train's torch integration is not installed")
    import test_distributed as td

    td._gloo_or_skip()
    kwargs = {k: v for k, v in td.TRAIN.items() if k not in ("progress", "threads")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        run = cs_ray.train(store, fresh / "ray", num_workers=2, max_epochs=2, storage_path=fresh / "records", **kwargs)
    finally:
        ray.shutdown()
    assert len(run.history) == 2
    td._train_ranks(store, fresh / "ranks", max_epochs=2)
    wa, wb = td._weights(fresh / "ranks"), td._weights(fresh / "ray")
    for name, w in wa.items():
        np.testing.assert_array_equal(wb[name], w, err_msg=name)
