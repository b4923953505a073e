"""What data-parallel training's collectives cost, measured on one device: training as the only rank
of a process group (world size 1: every step's all-reduce of the gradients runs, over NCCL on CUDA
or gloo on the CPU) against the same training alone (no group), interleaved, repeated; and the
time of one all-reduce of a buffer the size of the model's gradients (`--mib`; the default
model's at 5,000 genes is 14.1 MB) and of neighbouring sizes. With one device the all-reduce moves
no data between devices: it is the path's fixed cost (launch, NCCL's kernel, the buckets), which
docs/benchmarks.md's multi-GPU estimate adds to the bandwidth term.

    python scripts/bench_allreduce.py STORE OUT [--device cuda] [--reps 3] [--epochs 3] [--batch 32768]

Needs the cpa_stream package and PyTorch with torch.distributed. Prints one line per run and a
summary; the figures go to OUT/allreduce.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def epoch_seconds(run: Path) -> float:
    """The median seconds of a run's epochs after the first (the first pays for warming up)."""
    import pandas as pd

    seconds = pd.read_parquet(run / "metrics.parquet")["seconds"].tolist()
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def allreduce_ms(mib: float, device: str, repeats: int = 50) -> float:
    """Median milliseconds of one all-reduce (sum) of `mib` MiB of float32 on the default group."""
    import torch
    import torch.distributed as dist

    t = torch.ones(int(mib * 2**20 / 4), dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(5):
        dist.all_reduce(t)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dist.all_reduce(t)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32768)
    p.add_argument("--threads", type=int, default=None, help="libtorch threads [default: the package's plan]")
    p.add_argument("--mib", type=float, default=14.1 * 1e6 / 2**20, help="the gradients' size [14.1 MB]")
    p.add_argument("--labels", default='{"perturbation_key": "condition", "dosage_key": "dose", '
                   '"categorical_covariate_keys": ["cell_type"], "control_group": "control"}')
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    import torch.distributed as dist

    import cpa_stream as cs
    from cpa_stream import distributed

    backend = "nccl" if a.device.startswith("cuda") else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(backend, rank=0, world_size=1, init_method="env://")
    device = "cuda:0" if a.device == "cuda" else a.device
    alone = distributed.join

    def as_rank(device: str = "cpu", **_: object) -> distributed.Place:
        # The package trains alone at world size 1; here it trains as the group's one rank.
        return distributed.Place(dist.group.WORLD.group_name, 0, 1, device if device != "cuda" else "cuda:0")

    kwargs = {**json.loads(a.labels), "max_epochs": a.epochs, "batch_size": a.batch, "seed": 1, "progress": False,
              "overwrite": True, "checkpoint_every": 600, "device": a.device, "threads": a.threads,
              "validation_fraction": 0.0, "test_fraction": 0.0}
    rows = []
    for rep in range(a.reps):
        for grouped in ([False, True] if rep % 2 == 0 else [True, False]):
            run = a.out / ("group" if grouped else "alone")
            distributed.join = as_rank if grouped else alone
            try:
                start = time.monotonic()
                cs.train(a.store, run, **kwargs)
                wall = time.monotonic() - start
            finally:
                distributed.join = alone
            rows.append({"rep": rep, "group": grouped, "epoch_s": epoch_seconds(run), "wall_s": wall,
                         "load1": os.getloadavg()[0]})
            r = rows[-1]
            print(f"rep {rep}: {'one rank of a ' + backend + ' group' if grouped else 'alone'}: "
                  f"{r['epoch_s']:.3f} s an epoch, {wall:.1f} s in all (load {r['load1']:.2f})", flush=True)
    alone_s = statistics.median(r["epoch_s"] for r in rows if not r["group"])
    group_s = statistics.median(r["epoch_s"] for r in rows if r["group"])
    sizes = sorted({1.0, 4.0, round(a.mib, 2), 64.0})
    reduce = {str(mib): allreduce_ms(mib, device) for mib in sizes}
    print(f"median seconds an epoch: alone {alone_s:.3f}, one rank of a {backend} group {group_s:.3f}; "
          f"the group's path costs {100 * (group_s / alone_s - 1):+.1f}%")
    print(f"one all-reduce on {device} ({backend}, world size 1): "
          + ", ".join(f"{mib} MiB {ms:.3f} ms" for mib, ms in reduce.items()))
    (a.out / "allreduce.json").write_text(json.dumps(
        {"backend": backend, "device": device, "batch": a.batch, "rows": rows, "alone_epoch_s": alone_s,
         "group_epoch_s": group_s, "allreduce_ms": reduce}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
