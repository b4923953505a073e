"""Data-parallel training over several processes, on torch.distributed.

:func:`cpa_stream.train` trains as one rank of a data-parallel run when it is launched as one
process of several: by ``torchrun --nproc-per-node N``, by Slurm's ``srun`` (``SLURM_PROCID`` /
``SLURM_STEP_NUM_TASKS``: the tasks of an ``srun`` step, not of the allocation), by any launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
``MASTER_PORT``, or inside a process group made beforehand (Ray Train's ``TorchTrainer``, a
notebook's own ``init_process_group``). Each rank trains on its share of every batch (the
configuration's batch size is the whole step's), the gradients of every step are summed over the
ranks by libtorch's own collectives (gloo on the CPU, NCCL on CUDA), rank 0 validates and writes
the run directory, and the others return the same :class:`~cpa_stream.Run` once rank 0 has
published it.

The Rust trainer finds the group by its name in libtorch's registry, which it shares with
PyTorch's Python module (the package is built against PyTorch's libtorch).

``cpa-stream train`` launched as several processes runs ``python -m cpa_stream._rank`` with its
request: the process group is made by torch.distributed, in Python.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

#: Variables of a launch with several processes, in the order they are looked for.
RANK_VARS = ("RANK", "SLURM_PROCID")
WORLD_VARS = ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID")


@dataclass(frozen=True)
class Place:
    """This process's place in data-parallel training."""

    #: The process group's name, which the trainer looks up (``None``: training alone).
    group: str | None
    rank: int
    world: int
    #: The device this rank trains on (``cuda`` becomes ``cuda:LOCAL_RANK``).
    device: str


def _env_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip():
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected a whole number") from None
    return None


def launched_world() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    return max(_env_int(WORLD_VARS) or 1, 1)


def join(device: str = "cpu", *, timeout_s: float | None = None) -> Place:
    """This process's place: the torch.distributed default group when there is one of more than
    one process (made here from the launcher's variables where none exists yet: gloo for
    ``device="cpu"``, NCCL for CUDA), else training alone. ``timeout_s`` bounds each collective
    of a group made here (default torch's, 30 minutes for gloo)."""
    world = launched_world()
    if world <= 1 and "torch.distributed" not in sys.modules:
        # No launcher and no group made here: alone, without importing torch.
        return Place(None, 0, 1, device)
    try:
        import torch.distributed as dist
    except ImportError as e:
        if world > 1:
            raise RuntimeError(
                f"WORLD_SIZE={world}: data-parallel training needs PyTorch's torch.distributed ({e})"
            ) from e
        return Place(None, 0, 1, device)
    if not dist.is_available():
        if world > 1:
            raise RuntimeError(f"WORLD_SIZE={world}: this PyTorch was built without torch.distributed")
        return Place(None, 0, 1, device)
    if not dist.is_initialized():
        if world <= 1:
            return Place(None, 0, 1, device)
        rank = _env_int(RANK_VARS)
        if rank is None:
            raise RuntimeError(f"WORLD_SIZE={world} but no RANK (or SLURM_PROCID): which process is this?")
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise RuntimeError(
                f"{' and '.join(missing)} not set: the ranks meet at rank 0's address and a free port (torchrun sets "
                "them; under srun export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) and "
                "MASTER_PORT=29500)"
            )
        backend = "nccl" if device.startswith("cuda") else "gloo"
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            from datetime import timedelta

            kwargs["timeout"] = timedelta(seconds=timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world, init_method="env://", **kwargs)
    world = dist.get_world_size()
    rank = dist.get_rank()
    if world <= 1:
        return Place(None, 0, 1, device)
    if device == "cuda":
        device = f"cuda:{_env_int(LOCAL_RANK_VARS) or 0}"
    return Place(dist.group.WORLD.group_name, rank, world, device)


def barrier() -> None:
    """Waits until every rank is here (after training: rank 0 has published the run)."""
    import torch.distributed as dist

    dist.barrier()

