"""Offline stand-ins for the cpa-tools tutorials' data sets, made from the bundled data
(examples/data) or a synthetic drug x dose atlas: the only place the tutorial scripts differ
from cpa-tools' notebooks besides the import line.

``TUTORIAL_EPOCHS`` (environment) caps ``max_epochs`` for a quick run (the test sets it); the
tutorials' own value is used otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "perturbench_devel_cpa.h5ad"


def epochs(tutorial_value: int) -> int:
    return int(os.environ.get("TUTORIAL_EPOCHS", tutorial_value))


def rank_genes_groups_cov(adata, covariate: str, condition: str, control: str, n_genes: int = 50) -> dict:
    """DEGs per covariate value and condition against that value's controls (scanpy's
    t-test), keyed ``<covariate>_<condition>`` as the tutorials' ``rank_genes_groups_cov``."""
    import scanpy as sc

    degs = {}
    for value in adata.obs[covariate].unique():
        sub = adata[adata.obs[covariate] == value].copy()
        sc.pp.normalize_total(sub, target_sum=1e4)
        sc.pp.log1p(sub)
        groups = [g for g in sub.obs[condition].unique() if g != control]
        sc.tl.rank_genes_groups(sub, groupby=condition, reference=control, groups=groups, n_genes=n_genes,
                                method="t-test")
        names = sub.uns["rank_genes_groups"]["names"]
        for group in groups:
            degs[f"{value}_{group}"] = np.asarray(names[group]).tolist()
    return degs


def kang_like():
    """The Kang tutorial's shape from the bundled glioma lines: single perturbations in three
    cell types, counts in ``layers['counts']``, ``cov_cond``, DEGs in ``uns``, and ``split_B``
    holding one cell type's cells of one perturbation out (Kang holds out stimulated B cells)."""
    import anndata as ad

    adata = ad.read_h5ad(BUNDLED)
    adata = adata[adata.obs["cell_type"] != "k562"].copy()
    adata.obs["condition"] = adata.obs["condition"].astype(str).replace({"control": "ctrl"})
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs["cov_cond"] = adata.obs["cell_type"] + "_" + adata.obs["condition"]
    rng = np.random.default_rng(0)
    split = rng.choice(["train", "valid"], size=adata.n_obs, p=[0.85, 0.15]).astype(object)
    split[(adata.obs["cell_type"] == "U87MG").to_numpy() & (adata.obs["condition"] == "SGK1").to_numpy()] = "ood"
    adata.obs["split_B"] = split
    adata.uns["rank_genes_groups_cov"] = rank_genes_groups_cov(adata, "cell_type", "condition", "ctrl")
    # Kang's file holds its counts dense (the tutorial takes means of np.log1p of them).
    adata.layers["counts"] = adata.layers["counts"].toarray()
    return adata


def norman_like():
    """The Norman tutorial's shape from the bundled K562 cells: single and double CRISPRa
    perturbations, ``cond_harm``, ``dose_value``, cell type ``K562``, DEGs keyed ``K562_<cond>``."""
    import anndata as ad

    adata = ad.read_h5ad(BUNDLED)
    adata = adata[adata.obs["cell_type"] == "k562"].copy()
    adata.obs["cond_harm"] = adata.obs["condition"].astype(str).replace({"control": "ctrl"})
    adata.obs["dose_value"] = adata.obs["cond_harm"].map(lambda c: "+".join("1.0" for _ in c.split("+")))
    adata.obs["cell_type"] = "K562"
    adata.obs["cov_cond"] = "K562_" + adata.obs["cond_harm"]
    # Norman's file annotates each perturbation's pathway; here: single, double or control.
    adata.obs["pathway"] = adata.obs["cond_harm"].map(
        lambda c: "ctrl" if c == "ctrl" else ("double" if "+" in c else "single")
    )
    adata.uns["rank_genes_groups_cov"] = rank_genes_groups_cov(adata, "cell_type", "cond_harm", "ctrl")
    return adata


#: Molecules standing in for the combo-sciplex drugs (one per synthetic perturbation).
SMILES = ["CCO", "CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1", "c1ccc2ccccc2c1", "CC(C)Cc1ccc(C(C)C(=O)O)cc1",
          "O=C(O)c1ccccc1O", "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc21", "CC(=O)Nc1ccc(O)cc1"]


def combosciplex_atlas(path: Path) -> Path:
    """The synthetic drug x dose atlas behind [`combosciplex_like`], written to ``path`` (an
    ``.h5ad``; made by cpa-stream, so that cpa-tools' own run of the tutorial reads the same file
    through ``TUTORIAL_COMBO_H5AD``)."""
    import cpa_stream as cs

    store = cs.synth(path.with_suffix(".store"), cells=4000, genes=300, perturbations=8, doses=3, cell_types=2,
                     combinations=6, seed=0, overwrite=True, progress=False)
    cs.export_h5ad(store, path, overwrite=True, progress=False)
    return path


def combosciplex_like(scratch: Path):
    """A synthetic drug x dose atlas in the combo-sciplex tutorial's shape: drug combinations at
    doses in two cell lines, ``condition_ID``, ``log_dose``, ``smiles_rdkit`` (a combination's
    SMILES joined by ``..``), ``cov_drug_dose``, DEGs, a control ``CHEMBL504`` and ``split_1ct_MEC``
    holding one combination out. ``TUTORIAL_COMBO_H5AD`` (environment) names a file
    [`combosciplex_atlas`] wrote, read instead of making one."""
    import anndata as ad

    adata = ad.read_h5ad(os.environ.get("TUTORIAL_COMBO_H5AD") or combosciplex_atlas(scratch / "combo.h5ad"))
    adata.layers["counts"] = adata.X.copy()
    drugs = sorted({p for c in adata.obs["condition"].astype(str) for p in c.split("+") if p != "control"})
    names = {d: f"CHEMBL{1000 + i}" for i, d in enumerate(drugs)} | {"control": "CHEMBL504"}
    molecules = {names[d]: SMILES[i % len(SMILES)] for i, d in enumerate(drugs)} | {"CHEMBL504": "CS(C)=O"}
    condition = adata.obs["condition"].astype(str).map(lambda c: "+".join(names[p] for p in c.split("+")))
    adata.obs["condition_ID"] = condition
    adata.obs["smiles_rdkit"] = condition.map(lambda c: "..".join(molecules[p] for p in c.split("+")))
    adata.obs["log_dose"] = adata.obs["dose"].astype(str).map(
        lambda d: "+".join(f"{np.log10(float(x) * 1000 + 1):.3f}" for x in d.split("+"))
    )
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs["cov_drug_dose"] = adata.obs["cell_type"] + "_" + condition + "_" + adata.obs["log_dose"]
    adata.obs["cov_drug"] = adata.obs["cell_type"] + "_" + condition
    combos = sorted(c for c in condition.unique() if "+" in c)
    split = np.where(np.random.default_rng(0).random(adata.n_obs) < 0.15, "valid", "train").astype(object)
    split[(condition == combos[0]).to_numpy()] = "ood"
    adata.obs["split_1ct_MEC"] = split
    adata.uns["rank_genes_groups_cov"] = rank_genes_groups_cov(adata, "cell_type", "condition_ID", "CHEMBL504")
    return adata


__all__ = ["BUNDLED", "combosciplex_atlas", "combosciplex_like", "epochs", "kang_like", "norman_like"]
