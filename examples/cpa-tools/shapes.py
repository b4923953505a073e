"""One small cpa-tools session, run through cpa-tools itself or through cpa_stream.compat
(``--compat``), that prints a JSON description of everything it returns: the keys, shapes,
obs/var names and dtypes a notebook's next line would rely on.
``python/tests/test_tutorials.py`` runs it through both and compares (where cpa-tools is installed).
Run: python shapes.py [--compat] OUT_DIR"""

import hashlib
import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np

COMPAT = "--compat" in sys.argv
if COMPAT:
    import cpa_stream.compat as cpa
else:
    import cpa

out = Path([a for a in sys.argv[1:] if a != "--compat"][0])
data = Path(__file__).resolve().parents[1] / "data" / "perturbench_devel_cpa.h5ad"
adata = ad.read_h5ad(data)
adata = adata[adata.obs["cell_type"] == "k562"].copy()
adata.X = adata.layers["counts"].copy()
rng = np.random.default_rng(0)
adata.obs["split"] = rng.choice(["train", "valid"], size=adata.n_obs, p=[0.85, 0.15])
adata.obs.loc[adata.obs["condition"] == "MAP2K3+MAP2K6", "split"] = "ood"


def names(index) -> str:
    return hashlib.sha256("\0".join(map(str, index)).encode()).hexdigest()[:16]


def describe(value):
    if isinstance(value, dict):
        return {"dict": {str(k): describe(v) for k, v in sorted(value.items())}}
    if isinstance(value, ad.AnnData):
        return {"AnnData": {"shape": list(value.shape), "X_dtype": str(np.asarray(value.X).dtype),
                            "obs_names": names(value.obs_names), "var_names": names(value.var_names),
                            "obs": sorted(c for c in value.obs.columns if not c.startswith("_scvi"))}}
    if isinstance(value, np.ndarray):
        return {"ndarray": {"shape": list(value.shape), "dtype": str(value.dtype)}}
    return {type(value).__name__: None}


found = {}
setup = cpa.CPA.setup_anndata(adata, perturbation_key="condition", control_group="control", dosage_key="dose",
                              categorical_covariate_keys=["cell_type"], max_comb_len=2)
found["setup_anndata"] = describe(setup)
found["setup_obs"] = sorted(c for c in adata.obs.columns if not c.startswith("_scvi"))
found["setup_obsm"] = {k: describe(np.asarray(v)) for k, v in sorted(adata.obsm.items())}
model = cpa.CPA(adata, split_key="split", train_split="train", valid_split="valid", test_split="ood",
                n_latent=16, n_hidden_encoder=64, n_layers_encoder=2, n_hidden_decoder=64, n_layers_decoder=2,
                doser_type="linear", seed=0)
model.train(max_epochs=2, batch_size=256, check_val_every_n_epoch=1, early_stopping_patience=5,
            plan_kwargs={"n_epochs_pretrain_ae": None, "n_epochs_adv_warmup": None}, save_path=str(out))
found["get_latent_representation"] = describe(model.get_latent_representation(adata, batch_size=256))
model.predict(adata, batch_size=256)
found["predict"] = describe(adata.obsm["CPA_pred"])
found["custom_predict"] = describe(model.custom_predict(adata=adata, batch_size=256))
perts = model.get_pert_embeddings()
found["get_pert_embeddings"] = describe(perts)
found["pert_name"] = [str(p) for p in perts.obs["pert_name"]]
try:
    found["get_covar_embeddings"] = describe(model.get_covar_embeddings("cell_type"))
except Exception as error:  # cpa-tools 0.8.8 builds a 3-D X here and anndata refuses it
    found["get_covar_embeddings"] = {"error": f"{type(error).__name__}: {error}"}
found["epoch_history_type"] = type(model.epoch_history).__name__
found["epoch_history_columns"] = [str(c) for c in model.epoch_history.columns]
found["epoch_history_modes"] = [str(m) for m in model.epoch_history["mode"]]
print("SHAPES " + json.dumps(found, sort_keys=True))
