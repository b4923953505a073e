"""Data-parallel training against one process on the same store and machine: one process with T
libtorch threads against T processes with one thread each (gloo over loopback), interleaved,
repeated; per-epoch seconds from each run's metrics (the median of the epochs after the first).

    python scripts/bench_distributed.py STORE OUT [--reps 3] [--epochs 4] [--batch 512] [--threads 2]

Prints one line per run and a summary; the figures go to OUT/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

RANK = """
import json, sys
import cpa_stream as cs
store, out, kwargs = json.loads(sys.argv[1])
cs.train(store, out, **kwargs)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(store: str, out: Path, ranks: int, threads: int, kwargs: dict) -> float:
    args = json.dumps([store, os.fspath(out), {**kwargs, "threads": threads}])
    env = {**os.environ, "CPA_STREAM_ISOLATE": "0"}
    if ranks > 1:
        env.update(WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", RANK, args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(ranks)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{ranks} rank(s) failed: {codes}")
    return time.monotonic() - started


def epoch_seconds(run: Path) -> float:
    import pandas as pd

    seconds = pd.read_parquet(run / "metrics.parquet")["seconds"].tolist()
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    p.add_argument("out", type=Path)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--labels", default='{"perturbation_key": "condition", "dosage_key": "dose", '
                   '"categorical_covariate_keys": ["cell_type"], "control_group": "control"}')
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    kwargs = {**json.loads(a.labels), "max_epochs": a.epochs, "batch_size": a.batch, "seed": 1, "workers": 1,
              "progress": False, "overwrite": True, "checkpoint_every": 60}
    rows = []
    for rep in range(a.reps):
        order = [(1, a.threads), (a.threads, 1)] if rep % 2 == 0 else [(a.threads, 1), (1, a.threads)]
        for ranks, threads in order:
            run = a.out / f"r{ranks}t{threads}"
            wall = launch(a.store, run, ranks, threads, kwargs)
            per_epoch = epoch_seconds(run)
            load = os.getloadavg()[0]
            rows.append({"rep": rep, "ranks": ranks, "threads": threads, "wall_s": wall, "epoch_s": per_epoch,
                         "load1": load})
            print(f"rep {rep}: {ranks} rank(s) x {threads} thread(s): {per_epoch:.3f} s an epoch, {wall:.1f} s in all "
                  f"(load {load:.2f})", flush=True)
    one = statistics.median(r["epoch_s"] for r in rows if r["ranks"] == 1)
    many = statistics.median(r["epoch_s"] for r in rows if r["ranks"] > 1)
    print(f"median seconds an epoch: 1 rank x {a.threads} threads {one:.3f}, {a.threads} ranks x 1 thread {many:.3f}; "
          f"ratio {one / many:.2f} (above 1: the ranks are faster)")
    (a.out / "bench.json").write_text(json.dumps({"rows": rows, "one": one, "ranks": many}, indent=1))


if __name__ == "__main__":
    main()
