#!/usr/bin/env python
"""Helper of scripts/bench-collection.sh: makes a collection of .h5ad files (genes in a shuffled
order per file) and runs the two Python ways of making one training set of them.

    bench_collection.py make DIR --files 14 --cells 100000 --genes 5000 [--density 0.1]
    bench_collection.py concat OUT.h5ad FILE...      # anndata.concat in memory, shuffled, written
    bench_collection.py annbatch OUT.zarr FILE...    # annbatch's DatasetCollection.add_adatas

Each run prints one JSON line: wall seconds (of the work, not the interpreter's start), output
bytes. Peak memory is measured from outside (/usr/bin/time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np


def make(args: argparse.Namespace) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    os.makedirs(args.dir, exist_ok=True)
    genes = np.array([f"GENE{i:05d}" for i in range(args.genes)])
    for f in range(args.files):
        rng = np.random.default_rng(1000 + f)
        # Gene-specific detection rates around the density; counts 1 + negative binomial.
        rate = np.clip(rng.beta(0.5, 0.5 * (1 - args.density) / args.density, args.genes), 0, 0.95)
        rate *= args.density / rate.mean()
        mu = np.exp(rng.normal(0, 1, args.genes))
        blocks = []
        for start in range(0, args.cells, 10_000):
            n = min(10_000, args.cells - start)
            mask = rng.random((n, args.genes), dtype=np.float32) < rate[None, :]
            rows, cols = np.nonzero(mask)
            values = rng.negative_binomial(2, 2 / (2 + mu[cols])).astype(np.float32) + 1
            blocks.append(sp.csr_matrix((values, (rows, cols)), shape=(n, args.genes)))
        X = sp.vstack(blocks).tocsr()
        order = rng.permutation(args.genes)
        obs = pd.DataFrame(
            {
                "condition": pd.Categorical(rng.choice([f"drug{k}" for k in range(10)], args.cells)),
                "cell_type": pd.Categorical(rng.choice(["A", "B", "C"], args.cells)),
                "plate": pd.Categorical([f"plate{f:02d}"] * args.cells),
            },
            index=[f"p{f:02d}_{i}" for i in range(args.cells)],
        )
        adata = ad.AnnData(X[:, order], obs=obs, var=pd.DataFrame(index=genes[order]))
        adata.write_h5ad(os.path.join(args.dir, f"plate{f:02d}.h5ad"))
        print(f"plate{f:02d}.h5ad: {args.cells} cells, nnz {X.nnz}", file=sys.stderr)


def size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def concat(args: argparse.Namespace) -> None:
    import anndata as ad

    started = time.perf_counter()
    adatas = [ad.read_h5ad(p) for p in args.files]
    merged = ad.concat(adatas, join="inner", label="source_file", keys=[os.path.basename(p) for p in args.files])
    del adatas
    order = np.random.default_rng(0).permutation(merged.n_obs)
    merged = merged[order].copy()
    merged.write_h5ad(args.out)
    print(json.dumps({"wall_s": time.perf_counter() - started, "bytes": size(args.out)}))


def annbatch(args: argparse.Namespace) -> None:
    import anndata as ad
    import zarr
    from annbatch import DatasetCollection

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    if os.path.exists(args.out):
        shutil.rmtree(args.out)

    def load(path):
        # X lazily, obs in memory (annbatch's advice for many files).
        lazy = ad.experimental.read_lazy(path)
        return ad.AnnData(X=lazy.X, obs=lazy.obs.to_memory(), var=lazy.var.to_memory())

    started = time.perf_counter()
    DatasetCollection(args.out).add_adatas(args.files, load_adata=load, shuffle=True, rng=np.random.default_rng(0))
    print(json.dumps({"wall_s": time.perf_counter() - started, "bytes": size(args.out)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("--files", type=int, default=14)
    m.add_argument("--cells", type=int, default=100_000)
    m.add_argument("--genes", type=int, default=5_000)
    m.add_argument("--density", type=float, default=0.1)
    for name in ("concat", "annbatch"):
        p = sub.add_parser(name)
        p.add_argument("out")
        p.add_argument("files", nargs="+")
    args = parser.parse_args()
    {"make": make, "concat": concat, "annbatch": annbatch}[args.command](args)


if __name__ == "__main__":
    main()
