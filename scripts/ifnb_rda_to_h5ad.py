#!/usr/bin/env python3
"""A Seurat object of Kang et al. 2018's PBMCs (control and IFN-beta stimulated, with the
`stim` and `seurat_annotations` columns SeuratData's `ifnb` has), saved in an R `.rda` file, as an
`.h5ad` that the fidelity harness reads: raw counts of the most variable genes and the obs
columns the harness keys on:

- `condition`: `control` for `CTRL`, `IFNb` for `STIM`;
- `dose`: `1.0` for every cell;
- `cell_type`: the annotation (`seurat_annotations`).

Made for seuratTools' `data/ifnb1k.rda` (github.com/hjames1/seuratTools: 832 cells of six cell
types, 14,053 genes), which is public and small; docs/fidelity.md, "Unseen cell types on real
PBMCs", uses it. Reading `.rda` needs the `rdata` package, which the project does not install:

    python3 -m venv /tmp/rvenv && /tmp/rvenv/bin/pip install rdata anndata scanpy
    /tmp/rvenv/bin/python scripts/ifnb_rda_to_h5ad.py ifnb1k.rda kang-ifnb1k.h5ad
"""
import argparse
import sys


def read_seurat(path, name):
    """Counts (cells x genes, CSR), gene names and the meta data of the Seurat object `name`."""
    import warnings

    import numpy as np
    import rdata
    import scipy.sparse as sp

    with warnings.catch_warnings():
        # rdata has no constructor for Seurat's S4 classes; their slots come back as namespaces.
        warnings.simplefilter("ignore")
        objects = rdata.conversion.convert(rdata.parser.parse_file(path))
    if name not in objects:
        sys.exit(f"ifnb_rda_to_h5ad: {path}: no object {name!r} (found: {', '.join(map(str, objects))})")
    seurat = objects[name]
    counts = seurat.assays["RNA"].counts
    n_genes, n_cells = (int(v) for v in counts.Dim)
    matrix = sp.csc_matrix(
        (np.asarray(counts.x, dtype=np.float32), np.asarray(counts.i), np.asarray(counts.p)), shape=(n_genes, n_cells)
    )
    genes, cells = ([str(x) for x in names] for names in counts.Dimnames)
    meta = getattr(seurat, "meta.data")
    if [str(c) for c in meta.index] != cells:
        sys.exit(f"ifnb_rda_to_h5ad: {path}: the meta data's cells are not the counts' cells")
    return matrix.T.tocsr(), genes, cells, meta


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rda")
    p.add_argument("out")
    p.add_argument("--object", default="ifnb1k", help="the Seurat object's name in the file")
    p.add_argument("--genes", type=int, default=2000, help="keep this many highly variable genes")
    a = p.parse_args()

    import anndata as ad
    import numpy as np
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp

    x, genes, cells, meta = read_seurat(a.rda, a.object)
    for column in ("stim", "seurat_annotations"):
        if column not in meta.columns:
            sys.exit(f"ifnb_rda_to_h5ad: {a.rda}: no meta data column {column!r} (found: {list(meta.columns)})")
    stim = meta["stim"].astype(str).values
    if set(stim) != {"CTRL", "STIM"}:
        sys.exit(f"ifnb_rda_to_h5ad: {a.rda}: stim has {sorted(set(stim))}, expected CTRL and STIM")
    obs = pd.DataFrame(
        {"condition": np.where(stim == "STIM", "IFNb", "control"), "dose": "1.0",
         "cell_type": meta["seurat_annotations"].astype(str).values},
        index=cells,
    )
    data = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes))
    # Highly variable genes on normalised log counts (Seurat's dispersion method); counts are kept.
    normalised = data.copy()
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    sc.pp.highly_variable_genes(normalised, n_top_genes=a.genes, flavor="seurat")
    data = data[:, normalised.var["highly_variable"].values].copy()
    data.X = sp.csr_matrix(data.X)
    # cpa-tools' anndata (0.9) cannot read the nullable string arrays a newer anndata writes for
    # pandas' string indices and columns ("/obs/_index"): plain object indices and categorical
    # columns it can.
    data.obs.index = pd.Index(data.obs.index.astype(str).tolist(), dtype=object)
    data.var.index = pd.Index(data.var.index.astype(str).tolist(), dtype=object)
    for column in data.obs.columns:
        data.obs[column] = pd.Categorical(data.obs[column].astype(str).tolist())
    data.write_h5ad(a.out)
    print(f"{a.out}: {data.n_obs} cells x {data.n_vars} genes; "
          + ", ".join(f"{k}: {v}" for k, v in obs.groupby(["cell_type", "condition"]).size().items()))


if __name__ == "__main__":
    main()
