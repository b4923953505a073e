#!/usr/bin/env python3
"""An L1000 GCT file (version 1.3: row and column metadata in the file) as an `.h5ad` that the
fidelity harness reads: one observation per sample, the 978 landmark genes (or every row), values
as stored (log2 expression, so `--not-counts`: a Gaussian likelihood), and the obs columns the
harness keys on:

- `condition`: the compound's name (`pert_iname`), `control` for the vehicle (`ctl_vehicle`);
- `dose`: the dose in the file's unit (`pert_dose`, one unit required), `0` for the vehicle;
- `cell_type`: the cell line (`cell_id`).

Made for cmap/cmapPy's functional test file `test_l1000.gct` (59 compounds x 6 doses in A375,
26 DMSO wells), which is public and small; any GCT 1.3 file with these fields converts.

    python3 scripts/l1000_to_h5ad.py test_l1000.gct l1000.h5ad
"""
import argparse
import sys

VEHICLE = "ctl_vehicle"
MISSING = "-666"


def read_gct(path):
    """Data (genes x samples), row metadata and column metadata of a GCT 1.3 file."""
    import pandas as pd

    with open(path) as f:
        version = f.readline().strip()
        dims = f.readline().split("\t")
    if version != "#1.3":
        sys.exit(f"l1000_to_h5ad: {path}: version line {version!r}, expected '#1.3'")
    try:
        n_rows, n_cols, n_row_meta, n_col_meta = (int(x) for x in dims[:4])
    except ValueError:
        sys.exit(f"l1000_to_h5ad: {path}: line 2 should hold four counts (rows, columns, row and "
                 f"column metadata fields), found {dims!r}")
    table = pd.read_csv(path, sep="\t", skiprows=2, index_col=0, dtype=str, keep_default_na=False)
    if table.shape != (n_col_meta + n_rows, n_row_meta + n_cols):
        sys.exit(f"l1000_to_h5ad: {path}: the header declares {n_rows} rows x {n_cols} samples with "
                 f"{n_row_meta} + {n_col_meta} metadata fields; the table is {table.shape}")
    col_meta = table.iloc[:n_col_meta, n_row_meta:].T
    row_meta = table.iloc[n_col_meta:, :n_row_meta]
    data = table.iloc[n_col_meta:, n_row_meta:].astype("float64")
    return data, row_meta, col_meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gct")
    ap.add_argument("out")
    ap.add_argument("--all-rows", action="store_true", help="keep every row, not only the landmark genes")
    a = ap.parse_args()

    import anndata
    import numpy as np
    import pandas as pd

    data, row_meta, col_meta = read_gct(a.gct)
    for field in ("pert_iname", "pert_type", "pert_dose", "cell_id"):
        if field not in col_meta:
            sys.exit(f"l1000_to_h5ad: {a.gct}: no column field {field!r} (fields: {', '.join(col_meta.columns)})")
    if not a.all_rows and "pr_is_lmark" in row_meta:
        keep = row_meta["pr_is_lmark"].str.upper().isin(["1", "Y", "TRUE"])
        data, row_meta = data[keep], row_meta[keep]
    vehicle = (col_meta["pert_type"] == VEHICLE).values
    if not vehicle.any():
        sys.exit(f"l1000_to_h5ad: {a.gct}: no vehicle samples (pert_type {VEHICLE!r}): nothing to predict from")
    units = set(col_meta.loc[~vehicle, "pert_dose_unit"]) if "pert_dose_unit" in col_meta else set()
    if len(units - {MISSING}) > 1:
        sys.exit(f"l1000_to_h5ad: {a.gct}: doses in several units {sorted(units)}; convert to one first")
    dose = pd.to_numeric(col_meta["pert_dose"].where(~vehicle, "0"), errors="coerce")
    if dose.isna().any():
        bad = col_meta.index[dose.isna().values][0]
        sys.exit(f"l1000_to_h5ad: {a.gct}: sample {bad}: pert_dose {col_meta.loc[bad, 'pert_dose']!r} is not a number")
    obs = pd.DataFrame(index=pd.Index(col_meta.index.astype(str), name="sample"))
    obs["condition"] = np.where(vehicle, "control", col_meta["pert_iname"].values)
    obs["dose"] = [f"{d:g}" for d in dose.values]
    obs["cell_type"] = col_meta["cell_id"].values
    obs["pert_type"] = col_meta["pert_type"].values
    for c in ("condition", "dose", "cell_type", "pert_type"):
        obs[c] = obs[c].astype("category")
    symbols = row_meta["pr_gene_symbol"] if "pr_gene_symbol" in row_meta else pd.Series(data.index, index=data.index)
    var = pd.DataFrame({"gene_symbol": symbols.values}, index=pd.Index(data.index.astype(str), name="gene"))
    adata = anndata.AnnData(X=data.T.values.astype(np.float32), obs=obs, var=var)
    adata.write_h5ad(a.out)
    print(f"l1000_to_h5ad: {a.out}: {adata.n_obs} samples x {adata.n_vars} genes, "
          f"{obs['condition'].nunique() - 1} compounds, {int(vehicle.sum())} vehicle samples")


if __name__ == "__main__":
    main()
