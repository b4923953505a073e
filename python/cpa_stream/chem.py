"""Drugs from SMILES: molecule features for the model's trained projection (``perturbation_features``).

::

    from cpa_stream import chem

    smiles = chem.smiles_of(adata.obs, perturbation_key="drug", smiles_key="SMILES", control_group="DMSO")
    features = chem.molecule_features(smiles)                 # Morgan fingerprints, a DataFrame
    cs.train(store, "run", perturbation_key="drug", ..., perturbation_features=features)

or from a shell, for ``cpa-stream train --perturbation-features``::

    python -m cpa_stream.chem smiles.csv -o features.parquet [--kind descriptors]

Morgan fingerprints (radius 2, 2,048 bits, as cpa-tools' ``use_rdkit_embeddings``) or RDKit's 2-D
descriptors (every descriptor of ``rdkit.Chem.Descriptors``, standardised over the molecules given,
a descriptor RDKit cannot compute for a molecule set to the mean). Unlike cpa-tools, whose
fingerprint projection no optimizer holds, the model trains its projection, so a drug whose cells
were held out of training is placed by its molecule. RDKit is an optional dependency
(``pip install 'cpa-stream[chem]'``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["KINDS", "molecule_features", "smiles_of", "main"]

#: The kinds of features: ``morgan`` fingerprints or ``descriptors``.
KINDS = ("morgan", "descriptors")
#: cpa-tools' fingerprint: radius 2, 2,048 bits.
MORGAN_RADIUS = 2
MORGAN_BITS = 2048
#: How cpa-tools separates the SMILES of a combination's drugs in one obs value.
COMBINATION_SEPARATOR = ".."


def _rdkit() -> Any:
    try:
        from rdkit import Chem, RDLogger
    except ImportError as error:
        raise ImportError(
            "molecule features need RDKit: pip install 'cpa-stream[chem]' (or pip install rdkit)"
        ) from error
    RDLogger.DisableLog("rdApp.*")
    return Chem


def smiles_of(obs: pd.DataFrame, perturbation_key: str, smiles_key: str, control_group: str | None = None) -> dict[str, str]:
    """Each perturbation's SMILES from the obs columns ``perturbation_key`` (conditions,
    ``"A+B"`` for combinations) and ``smiles_key`` (a molecule per cell; for a combination the
    molecules joined by ``".."`` in the same order, as cpa-tools reads them). The control needs
    none. A perturbation given two different SMILES is an error naming both."""
    for key in (perturbation_key, smiles_key):
        if key not in obs.columns:
            raise ValueError(f"obs has no column {key!r}; it has {', '.join(map(str, obs.columns))}")
    pairs = obs[[perturbation_key, smiles_key]].astype(str).drop_duplicates()
    found: dict[str, str] = {}
    for condition, smiles in pairs.itertuples(index=False):
        parts = condition.split("+")
        molecules = smiles.split(COMBINATION_SEPARATOR) if len(parts) > 1 else [smiles]
        if len(molecules) != len(parts):
            raise ValueError(
                f"{smiles_key} {smiles!r} of {perturbation_key} {condition!r}: {len(molecules)} molecule(s) for "
                f"{len(parts)} perturbation(s) (a combination's SMILES are joined by {COMBINATION_SEPARATOR!r})"
            )
        for part, molecule in zip(parts, molecules):
            if part == control_group:
                continue
            known = found.setdefault(part, molecule)
            if known != molecule:
                raise ValueError(f"perturbation {part!r} has two SMILES in {smiles_key}: {known!r} and {molecule!r}")
    return found


def molecule_features(
    smiles: Mapping[str, str] | pd.Series,
    kind: str = "morgan",
    *,
    radius: int = MORGAN_RADIUS,
    n_bits: int = MORGAN_BITS,
) -> pd.DataFrame:
    """One row per perturbation (the index, named ``perturbation``), one float32 column per
    feature: Morgan fingerprint bits (``kind="morgan"``, ``radius`` and ``n_bits``) or RDKit's
    2-D descriptors standardised over these molecules (``kind="descriptors"``). A SMILES that
    RDKit cannot parse is an error naming the perturbation."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not len(smiles):
        raise ValueError("molecule_features: no SMILES given")
    chem = _rdkit()
    names, molecules = [], []
    for name, text in dict(smiles).items():
        molecule = chem.MolFromSmiles(str(text)) if isinstance(text, str) and text else None
        if molecule is None:
            raise ValueError(f"perturbation {name!r}: RDKit cannot read the SMILES {text!r}")
        names.append(str(name))
        molecules.append(molecule)
    index = pd.Index(names, name="perturbation")
    if kind == "morgan":
        from rdkit.Chem import rdFingerprintGenerator

        generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
        bits = np.vstack([generator.GetFingerprintAsNumPy(m) for m in molecules]).astype(np.float32)
        return pd.DataFrame(bits, index=index, columns=[f"morgan_{i}" for i in range(n_bits)])
    from rdkit.Chem import Descriptors

    rows = [Descriptors.CalcMolDescriptors(m) for m in molecules]
    frame = pd.DataFrame(rows, index=index).astype(np.float64)
    frame = frame.replace([np.inf, -np.inf], np.nan)
    mean, sd = frame.mean(), frame.std(ddof=0)
    keep = sd.gt(0) & sd.notna()
    frame = ((frame.loc[:, keep] - mean[keep]) / sd[keep]).fillna(0.0)
    frame.columns = [f"rdkit_{c}" for c in frame.columns]
    return frame.astype(np.float32)


def write(features: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Writes a features table (index: the perturbations) as ``cpa-stream train
    --perturbation-features`` reads it: Parquet with a ``perturbation`` column, then the
    features; written to a temporary name and renamed, so it appears complete or not at all."""
    path = Path(path)
    table = features.copy()
    table.index = table.index.astype(str).rename("perturbation")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table.reset_index().to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if name.endswith((".tsv", ".tab")):
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m cpa_stream.chem``: a SMILES table (CSV, TSV or Parquet; a name column and a
    SMILES column) to the features table ``cpa-stream train --perturbation-features`` reads."""
    parser = argparse.ArgumentParser(
        prog="python -m cpa_stream.chem",
        description="Molecule features from SMILES for cpa-stream train --perturbation-features.",
    )
    parser.add_argument("table", type=Path, help="CSV, TSV or Parquet with a name column and a SMILES column")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the features table to write (.parquet)")
    parser.add_argument("--kind", choices=KINDS, default="morgan", help="Morgan fingerprints or RDKit 2-D descriptors")
    parser.add_argument("--name-column", default=None, help="default: perturbation, name, drug, else the first column")
    parser.add_argument("--smiles-column", default=None, help="default: smiles (any case), else the second column")
    parser.add_argument("--radius", type=int, default=MORGAN_RADIUS, help="Morgan radius (default 2)")
    parser.add_argument("--bits", type=int, default=MORGAN_BITS, help="Morgan bits (default 2048)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        table = _read_table(args.table)
        if table.shape[1] < 2:
            raise ValueError(f"{args.table}: expected a name column and a SMILES column")
        lower = {str(c).lower(): c for c in table.columns}
        name = args.name_column or next(
            (lower[c] for c in ("perturbation", "name", "drug") if c in lower), table.columns[0]
        )
        smiles = args.smiles_column or lower.get("smiles", table.columns[1])
        for column in (name, smiles):
            if column not in table.columns:
                raise ValueError(f"{args.table}: no column {column!r}; it has {', '.join(map(str, table.columns))}")
        duplicated = table[name][table[name].duplicated()]
        if len(duplicated):
            raise ValueError(f"{args.table}: perturbation {duplicated.iloc[0]!r} is listed twice")
        if args.out.exists() and not args.overwrite:
            raise ValueError(f"{args.out}: exists (--overwrite replaces it)")
        if args.out.exists() and not args.out.is_file():
            raise ValueError(f"{args.out}: exists and is not a regular file")
        features = molecule_features(
            dict(zip(table[name].astype(str), table[smiles])), args.kind, radius=args.radius, n_bits=args.bits
        )
        write(features, args.out)
    except (ValueError, OSError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {features.shape[0]} molecules x {features.shape[1]} features ({args.kind})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
