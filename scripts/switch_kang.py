"""cpa-tools' Kang tutorial (docs/tutorials/Kang.ipynb: its setup, parameters, training call and
scores) on Kang et al. 2018's PBMCs (scripts/ifnb_rda_to_h5ad.py's file; KANG_H5AD), stimulated B
cells held out, through one tool per run: `cpa` (cpa-tools 0.8.8, the peer environment's Python)
or `compat` (`import cpa_stream.compat as cpa`). Prints one RESULT line of JSON: per cell type,
the r2 of log1p means over all genes, the top 10 and 20 DEGs, and of the log fold change.
scripts/switch-ab.sh runs it for both tools and several seeds (docs/fidelity.md, "The switch").

usage: python switch_kang.py TOOL SEED EPOCHS OUT [BATCH]
AB_CONFIG='{"model": {...}}' overrides configuration keys of compat's run (ablations)."""
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, pandas as pd, scanpy as sc, anndata as ad
from sklearn.metrics import r2_score

tool, seed, epochs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
batch = int(sys.argv[5]) if len(sys.argv) > 5 else 512
if tool == "cpa":
    import cpa
else:
    import cpa_stream.compat as cpa
    import cpa_stream._run as _R
    _orig = _R.train
    def _patched(*args, **kw):
        for table, keys in json.loads(os.environ.get("AB_CONFIG", "{}")).items():
            kw["config"].setdefault(table, {}).update(keys)
        return _orig(*args, **kw)
    _R.train = _patched

a = ad.read_h5ad(os.environ.get("KANG_H5AD", "kang-ifnb1k.h5ad"))
a.obs["condition"] = a.obs["condition"].astype(str).map({"control": "ctrl", "IFNb": "stimulated"})
a.layers["counts"] = a.X.copy()
a.obs["cov_cond"] = a.obs["cell_type"].astype(str) + "_" + a.obs["condition"].astype(str)
norm = a.copy(); sc.pp.normalize_total(norm); sc.pp.log1p(norm)
degs = {}
for ct in a.obs["cell_type"].astype(str).unique():
    sub = norm[norm.obs["cell_type"].astype(str) == ct].copy()
    sc.tl.rank_genes_groups(sub, groupby="cov_cond", reference=f"{ct}_ctrl", groups=[f"{ct}_stimulated"], n_genes=50, method="wilcoxon")
    degs[f"{ct}_stimulated"] = list(sub.uns["rank_genes_groups"]["names"][f"{ct}_stimulated"])
a.uns["rank_genes_groups_cov"] = degs
rng = np.random.default_rng(0)
split = np.where(rng.random(a.n_obs) < 0.85, "train", "valid").astype(object)
split[(a.obs["cell_type"].astype(str) == "B").to_numpy() & (a.obs["condition"] == "stimulated").to_numpy()] = "ood"
a.obs["split_B"] = split
a.obs["dose"] = "1.0"
a.X = a.layers["counts"].copy()
cpa.CPA.setup_anndata(a, perturbation_key="condition", control_group="ctrl", dosage_key="dose",
                      categorical_covariate_keys=["cell_type"], is_count_data=True,
                      deg_uns_key="rank_genes_groups_cov", deg_uns_cat_key="cov_cond", max_comb_len=1)
model_params = {"n_latent": 64, "recon_loss": "nb", "doser_type": "linear", "n_hidden_encoder": 128,
    "n_layers_encoder": 2, "n_hidden_decoder": 512, "n_layers_decoder": 2, "use_batch_norm_encoder": True,
    "use_layer_norm_encoder": False, "use_batch_norm_decoder": False, "use_layer_norm_decoder": True,
    "dropout_rate_encoder": 0.0, "dropout_rate_decoder": 0.1, "variational": False, "seed": seed}
trainer_params = {"n_epochs_kl_warmup": None, "n_epochs_pretrain_ae": 30, "n_epochs_adv_warmup": 50,
    "n_epochs_mixup_warmup": 0, "mixup_alpha": 0.0, "adv_steps": None, "n_hidden_adv": 64, "n_layers_adv": 3,
    "use_batch_norm_adv": True, "use_layer_norm_adv": False, "dropout_rate_adv": 0.3, "reg_adv": 20.0,
    "pen_adv": 5.0, "lr": 0.0003, "wd": 4e-07, "adv_lr": 0.0003, "adv_wd": 4e-07, "adv_loss": "cce",
    "doser_lr": 0.0003, "doser_wd": 4e-07, "do_clip_grad": True, "gradient_clip_value": 1.0, "step_size_lr": 10}
for kv in os.environ.get("AB_SET", "").split(","):
    if kv:
        k, v = kv.split("="); trainer_params[k] = json.loads(v)
model = cpa.CPA(adata=a, split_key="split_B", train_split="train", valid_split="valid", test_split="ood", **model_params)
# SWITCH_THREADS: libtorch threads of both tools (default: compat 1, the harness's; cpa-tools
# its own default, the usable CPUs), for timings at equal threads.
threads = int(os.environ["SWITCH_THREADS"]) if os.environ.get("SWITCH_THREADS") else None
if tool == "cpa" and threads:
    import torch; torch.set_num_threads(threads)
kw = dict(threads=threads or 1) if tool != "cpa" else {}
import time; t0 = time.time()
model.train(max_epochs=epochs, use_gpu=False, batch_size=batch, plan_kwargs=trainer_params,
            early_stopping_patience=5, check_val_every_n_epoch=5, save_path=out, **kw)
train_s = time.time() - t0
h = model.epoch_history
trained_epochs = int(h[h["mode"] == "train"]["epoch"].max()) + 1
model.predict(a, batch_size=2048)
rows = {}
for cat in a.obs["cov_cond"].unique():
    if "ctrl" in cat:
        continue
    cov, cond = cat.split("_")
    m = (a.obs["cov_cond"] == cat).to_numpy(); c = (a.obs["cov_cond"] == f"{cov}_ctrl").to_numpy()
    X = a.layers["counts"]; X = X.toarray() if hasattr(X, "toarray") else X
    xt, xp, xc = np.log1p(X[m]), np.log1p(np.asarray(a.obsm["CPA_pred"])[m]), np.log1p(X[c])
    genes = list(a.var_names)
    r = {}
    for n in (10, 20, None):
        idx = [genes.index(g) for g in a.uns["rank_genes_groups_cov"][cat][:n]] if n else list(range(len(genes)))
        r[f"r2_{n or 'all'}"] = float(r2_score(xt[:, idx].mean(0), xp[:, idx].mean(0)))
    r["lfc_all"] = float(r2_score(xt.mean(0) - xc.mean(0), xp.mean(0) - xc.mean(0)))
    rows[cov] = r
print("RESULT", json.dumps({"tool": tool, "seed": seed, "epochs": epochs, "batch": batch, "train_s": train_s, "trained_epochs": trained_epochs,
      "set": os.environ.get("AB_SET", "") + os.environ.get("AB_CONFIG", ""), "rows": rows}))
if os.environ.get("AB_HIST"):
    h = model.epoch_history
    print(h[h["mode"] == "valid"][[c for c in ("epoch", "r2_mean", "r2_var", "disnt_basal", "disnt_after", "acc_perts") if c in h.columns]].to_string())
    if tool != "cpa":
        print("best", getattr(model.run, "best_epoch", None), model.run.path)
