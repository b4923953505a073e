"""The scanpy round trip of a notebook user: an in-memory AnnData in, latents into obsm, a UMAP
of them, and a counterfactual that scanpy's DE test accepts."""

from __future__ import annotations

import numpy as np
import pytest

import cpa_stream as cs

from conftest import COMPUTE, LABELS

sc = pytest.importorskip("scanpy", reason="scanpy is not installed (scripts/python.sh installs it)")


def test_scanpy_round_trip(adata, fresh):
    data = adata.copy()
    store = cs.import_h5ad(data, fresh / "a.store", progress=False)
    run = cs.train(store, fresh / "run", **LABELS, max_epochs=2, seed=0, progress=False, **COMPUTE)
    latents = run.latents(store, "z_basal", **COMPUTE)
    assert list(latents["cell_id"]) == list(data.obs_names)
    data.obsm["X_cpa_basal"] = latents["z_basal"]
    sc.pp.neighbors(data, use_rep="X_cpa_basal", n_neighbors=10, random_state=0)
    sc.tl.umap(data, random_state=0)
    assert data.obsm["X_umap"].shape == (data.n_obs, 2) and np.isfinite(data.obsm["X_umap"]).all()

    source = "condition == control and cell_type == k562"
    counterfactual = run.predict_anndata(
        store, source=source, targets=["condition=SGK1,dose=1,cell_type=k562", "condition=control,dose=1,cell_type=k562"],
        **COMPUTE,
    )
    assert counterfactual.n_obs > 0
    sc.pp.log1p(counterfactual)
    sc.tl.rank_genes_groups(counterfactual, groupby="condition", reference="control", method="wilcoxon")
    names = counterfactual.uns["rank_genes_groups"]["names"]["SGK1"]
    assert len(names) == counterfactual.n_vars
