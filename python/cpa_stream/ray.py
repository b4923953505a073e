"""Ray: prediction of an atlas that outgrows one machine, fanned out as Ray tasks
(:func:`predict`), and data-parallel training on a Ray cluster's workers (:func:`train`).

The store's cells are cut into ``shards`` contiguous ranges (``cpa-stream predict --shard k/n``);
each range is one Ray task that streams its predictions to ``out/part-k-of-n.parquet``, so the
dataset directory ``out`` is one Parquet dataset (``pyarrow.dataset.dataset(out)``,
``polars.scan_parquet(out / "part-*.parquet")``, DuckDB's ``read_parquet``). Every node must
see the run and the store at the same paths (a shared file system) and have ``cpa_stream``
installed; Ray schedules the tasks, retries failed ones and reports progress.

    import ray, cpa_stream.ray
    ray.init(address="auto")
    reports = cpa_stream.ray.predict("run/", "atlas.store", "predictions/", shards=64,
                                     targets="condition=A+B", cpus_per_task=8)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ._run import Targets, _target_specs
from ._store import PathLike, Store


def _predict_shard(run: str, store: str, out: str, shard: str, options: dict[str, Any]) -> dict[str, Any]:
    from ._run import Run

    return Run(run).predict_to_parquet(out, store, shard=shard, progress=False, **options)


def predict(
    run: Any,
    store: Store | PathLike,
    out: PathLike,
    *,
    shards: int,
    targets: Targets = None,
    source: str | None = None,
    genes: list[str] | None = None,
    top_deg: int | None = None,
    latents: list[str] | tuple[str, ...] = (),
    ensemble: Sequence[Any] = (),
    wide: bool = False,
    overwrite: bool = False,
    cpus_per_task: int = 1,
    gpus_per_task: float = 0,
    max_retries: int = 3,
) -> list[dict[str, Any]]:
    """Predicts ``shards`` contiguous cell ranges of ``store`` as Ray tasks (``cpus_per_task``
    CPUs, and ``gpus_per_task`` GPUs, each: a task with a GPU runs on ``cuda``), all writing into
    the dataset directory ``out``; returns the per-shard reports in shard order. Arguments as
    :meth:`cpa_stream.Run.predict_to_parquet` (``ensemble``: other runs whose predictions each task
    averages with this run's). Raises the first task's error after all ended."""
    import ray

    if shards < 1:
        raise ValueError("shards must be at least 1")
    run_path = os.path.abspath(os.fspath(run))
    store_path = os.path.abspath(os.fspath(store))
    out_path = os.path.abspath(os.fspath(out))
    os.makedirs(out_path, exist_ok=True)
    if isinstance(ensemble, (str, os.PathLike)):
        raise TypeError("ensemble: expected a list of runs or run directories, got one; wrap it in a list")
    members = [os.path.abspath(os.fspath(r)) for r in ensemble]
    options = dict(
        targets=_target_specs(targets), source=source, genes=genes, top_deg=top_deg, latents=list(latents),
        ensemble=members, wide=wide, overwrite=overwrite, device="cuda" if gpus_per_task else "cpu",
        threads=cpus_per_task,
    )
    task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=max_retries)(_predict_shard)
    refs = [task.remote(run_path, store_path, out_path, f"{k}/{shards}", options) for k in range(shards)]
    return ray.get(refs)


def _train_worker(config: dict[str, Any]) -> None:
    from ._run import train as train_run

    kwargs = dict(config["kwargs"])
    if config["use_gpu"]:
        import ray.train.torch

        kwargs["device"] = str(ray.train.torch.get_device())
    # Ray Train made the process group (gloo, or NCCL with GPUs): cpa_stream.train joins it.
    train_run(config["store"], config["out"], **kwargs)


def train(
    store: Store | PathLike,
    out: PathLike,
    *,
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: int = 1,
    storage_path: PathLike | None = None,
    **kwargs: Any,
) -> Any:
    """Trains on ``store`` into the run directory ``out`` as ``num_workers`` ranks of data-parallel
    training on a Ray cluster (Ray Train's ``TorchTrainer``, which makes the process group: gloo,
    or NCCL with ``use_gpu``, a GPU per worker) and returns the :class:`~cpa_stream.Run`. Every
    worker must see ``store`` and ``out`` at the same paths (a shared file system); rank 0 writes
    the run. ``kwargs`` are :func:`cpa_stream.train`'s (``batch_size`` is the whole step's,
    shared by the workers; ``threads`` defaults to ``cpus_per_worker``). ``storage_path`` is
    where Ray Train keeps its own records (default a directory beside ``out``)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ._run import Run

    if num_workers < 1:
        raise ValueError("num_workers must be at least 1")
    if "device" in kwargs:
        raise TypeError("device: each Ray worker trains on its own (use_gpu=True for a GPU each)")
    kwargs.setdefault("threads", cpus_per_worker)
    kwargs.setdefault("progress", False)
    out_path = os.path.abspath(os.fspath(out))
    records = os.path.abspath(os.fspath(storage_path)) if storage_path else os.path.join(
        os.path.dirname(out_path), f".{os.path.basename(out_path)}.ray")
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "store": os.path.abspath(os.fspath(store)),
            "out": out_path,
            "use_gpu": use_gpu,
            "kwargs": kwargs,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(storage_path=records, name="train"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return Run(out_path)
