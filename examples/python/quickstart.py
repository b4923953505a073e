"""cpa-stream from Python on the bundled data: import an AnnData, train CPA, predict a held-out
combination, a UMAP of the basal latents, evaluate.

    scripts/python.sh                      # builds and installs the package into the cache's venv
    ~/.cache/cpa-stream/venv/bin/python examples/python/quickstart.py [OUT [EPOCHS]]

The bundled data (examples/data/perturbench_devel_cpa.h5ad) is a 5,961-cell x 500-gene subset of
Norman et al. 2019 (K562, CRISPRa pairs) and McFaline-Figueroa et al. 2023; see its README.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import scanpy as sc  # noqa: E402

import cpa_stream as cs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "out" / "python-quickstart"
# Training epochs (the demo, which has trained the same model from the command line, runs 30).
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 100
out.mkdir(parents=True, exist_ok=True)

# 1. An AnnData in memory, as a notebook has it; written to a store without a temporary .h5ad.
adata = ad.read_h5ad(REPO / "examples" / "data" / "perturbench_devel_cpa.h5ad")
store = cs.import_h5ad(adata, out / "bundled.store", overwrite=True)
print(store)

# 2. Train with cpa-tools' vocabulary; the pair MAPK1+TGFBR2 is never seen in training.
run = cs.train(
    store,
    out / "run",
    perturbation_key="condition",
    dosage_key="dose",
    control_group="control",
    categorical_covariate_keys=["cell_type"],
    holdout=["MAPK1+TGFBR2"],
    max_epochs=epochs,
    overwrite=True,
)
print(run.history[["epoch", "recon_loss", "adv_loss", "val_r2_mean"]].tail(3).to_string(index=False))

# 3. The held-out pair predicted from K562 control cells: an AnnData (it fits in memory here;
#    run.predict_to_parquet streams any number of rows to a file instead).
pred = run.predict_anndata(
    store,
    source="condition == control and cell_type == k562",
    targets="condition=MAPK1+TGFBR2,dose=1+1,cell_type=k562",
    latents=["z_basal"],
)
print(pred)
real = adata[adata.obs["condition"] == "MAPK1+TGFBR2"]
print(f"{pred.n_obs} counterfactual cells for {real.n_obs} real ones of MAPK1+TGFBR2")

# 4. The basal latents of every cell into obsm, a UMAP of them coloured by condition type.
adata.obsm["X_cpa_basal"] = run.latents(store)["z_basal"]
sc.pp.neighbors(adata, use_rep="X_cpa_basal", random_state=0)
sc.tl.umap(adata, random_state=0)
sc.pl.umap(adata, color=["cell_type", "perturbation_type"], show=False, save=None)
matplotlib.pyplot.savefig(out / "umap_z_basal.png", dpi=120, bbox_inches="tight")
print(f"UMAP of z_basal: {out / 'umap_z_basal.png'}")

# 5. Evaluate on the held-out pair and on the test split.
#    r2_mean: R2 over genes of the predicted vs real log1p means; r2_mean_control: the control
#    cells' mean as the prediction (the baseline to beat). The prediction scored is the anchored
#    one (the default: the control cells' observed log1p counts moved by the predicted change);
#    anchored=False scores the plain one, log1p of the decoded mean (cpa-tools' prediction).
for split, anchored in (("ood", None), ("ood", False), ("test", None)):
    metrics = run.evaluate(store, split=split, anchored=anchored)
    summary = metrics.attrs["summary"]
    print(
        f"{split}, {'plain' if anchored is False else 'anchored'}: {len(metrics)} conditions, "
        f"mean R2 {summary['r2_mean']:.3f} (control mean {summary['r2_mean_control']:.3f}), "
        f"top-20 DEGs {summary['r2_mean_top20']:.3f} (control mean {summary['r2_mean_control_top20']:.3f})"
    )
print(metrics[["cell_type", "condition", "n_cells", "r2_mean", "r2_mean_control"]].head().to_string(index=False))
