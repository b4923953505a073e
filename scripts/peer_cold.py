#!/usr/bin/env python
"""annbatch's first epoch read from disk: the peer half of `scripts/bench-peers.sh --cold`.

Uses the harness of ../shared/peer/loader (run_bench.py's Annbatch loader class, unchanged) and
only adds what that harness does not do: drop the store's files from the page cache
(posix_fadvise DONTNEED on every file) before each timed epoch, and count the bytes the epoch
made the kernel read from storage (/proc/self/io). Prints one JSON object.

Usage: peer_cold.py HARNESS_DIR STORE --batch-size B [--chunk-size 512 --preload-nchunks 32]
       [--rounds 3]
"""

import argparse
import json
import os
import statistics
import sys
import time


def evict(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def read_bytes():
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("harness")
    ap.add_argument("store")
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--preload-nchunks", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import run_bench  # noqa: E402  (the peer harness, as it is)

    rounds = []
    for r in range(args.rounds):
        loader = run_bench.Annbatch(args.store, args.batch_size, r, "csr", args.chunk_size, args.preload_nchunks)
        # Opened (zarr metadata read) before the pages are dropped, as cpa-stream's store is.
        loader._ensure()
        size = evict(args.store)
        before = read_bytes()
        t0 = time.perf_counter()
        cells = 0
        for x in loader.batches():
            cells += x.shape[0]
        dt = time.perf_counter() - t0
        after = read_bytes()
        disk = (after - before) / 1e6 if before is not None and after is not None else None
        rounds.append({"cells_per_s": cells / dt, "seconds": dt, "disk_mb": disk,
                       "disk_mb_per_s": disk / dt if disk is not None else None})
    print(json.dumps({
        "store": args.store, "store_bytes": size, "batch_size": args.batch_size,
        "chunk_size": args.chunk_size, "preload_nchunks": args.preload_nchunks,
        "cells_per_s": statistics.median(r["cells_per_s"] for r in rounds),
        "disk_mb_per_s": statistics.median(r["disk_mb_per_s"] for r in rounds) if rounds[0]["disk_mb"] is not None else None,
        "rounds": rounds,
    }))


if __name__ == "__main__":
    main()
