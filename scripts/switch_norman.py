"""cpa-tools' Norman tutorial (examples/cpa-tools/norman.py's code: its parameters, training call
and scores) on the bundled K562 cells, two combinations held out, through one tool per run (`cpa`
or `compat`, as scripts/switch_kang.py). Prints one RESULT line of JSON per run.

usage: python switch_norman.py TOOL SEED EPOCHS OUT"""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "cpa-tools"))
import numpy as np, pandas as pd
from sklearn.metrics import r2_score
from _data import norman_like
tool, seed, epochs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if tool == "cpa":
    import cpa
else:
    import cpa_stream.compat as cpa
HELD_OUT = ['MAP2K3+MAP2K6', 'CBL+CNN1']
adata = norman_like()
adata.X = adata.layers['counts'].copy()
cpa.CPA.setup_anndata(adata, perturbation_key='cond_harm', control_group='ctrl', dosage_key='dose_value',
                      categorical_covariate_keys=['cell_type'], is_count_data=True, deg_uns_key='rank_genes_groups_cov',
                      deg_uns_cat_key='cov_cond', max_comb_len=2)
model_params = {"n_latent": 32, "recon_loss": "nb", "doser_type": "linear", "n_hidden_encoder": 256, "n_layers_encoder": 4,
    "n_hidden_decoder": 256, "n_layers_decoder": 2, "use_batch_norm_encoder": True, "use_layer_norm_encoder": False,
    "use_batch_norm_decoder": False, "use_layer_norm_decoder": False, "dropout_rate_encoder": 0.2,
    "dropout_rate_decoder": 0.0, "variational": False, "seed": seed}
trainer_params = {"n_epochs_kl_warmup": None, "n_epochs_adv_warmup": 50, "n_epochs_mixup_warmup": 10,
    "n_epochs_pretrain_ae": 10, "mixup_alpha": 0.1, "lr": 0.0001, "wd": 3.2170178270865573e-06, "adv_steps": 3,
    "reg_adv": 10.0, "pen_adv": 20.0, "adv_lr": 0.0001, "adv_wd": 7.051355554517135e-06, "n_layers_adv": 2,
    "n_hidden_adv": 128, "use_batch_norm_adv": True, "use_layer_norm_adv": False, "dropout_rate_adv": 0.3,
    "step_size_lr": 25, "do_clip_grad": False, "adv_loss": "cce", "gradient_clip_value": 5.0}
rng = np.random.default_rng(0)
adata.obs['split'] = rng.choice(['train', 'valid'], size=adata.n_obs, p=[0.85, 0.15])
adata.obs.loc[adata.obs['cond_harm'].isin(HELD_OUT), 'split'] = 'ood'
model = cpa.CPA(adata=adata, split_key='split', train_split='train', valid_split='valid', test_split='ood', **model_params)
# SWITCH_THREADS: libtorch threads of both tools (default: compat 1, the harness's; cpa-tools
# its own default, the usable CPUs), for timings at equal threads.
threads = int(os.environ["SWITCH_THREADS"]) if os.environ.get("SWITCH_THREADS") else None
if tool == "cpa" and threads:
    import torch; torch.set_num_threads(threads)
kw = dict(threads=threads or 1) if tool != "cpa" else {}
t0 = time.time()
model.train(max_epochs=epochs, use_gpu=False, batch_size=2048, plan_kwargs=trainer_params, early_stopping_patience=5,
            check_val_every_n_epoch=5, save_path=out, **kw)
train_s = time.time() - t0
h = model.epoch_history
n_epochs = int(h[h["mode"] == "train"]["epoch"].max()) + 1
model.predict(adata, batch_size=2048)
ctrl = adata[adata.obs['cond_harm'] == 'ctrl']
x_ctrl = np.log1p(ctrl.layers['counts'].toarray())
rows = {}
for condition in adata.obs['cond_harm'].unique():
    if condition == 'ctrl':
        continue
    m = (adata.obs['cond_harm'] == condition).to_numpy()
    xt = np.log1p(adata.layers['counts'][m].toarray()); xp = np.log1p(np.asarray(adata.obsm['CPA_pred'])[m])
    deg_list = adata.uns['rank_genes_groups_cov'][f'K562_{condition}']
    r = {}
    for n in (10, 20, None):
        idx = np.where(np.isin(adata.var_names, deg_list[:n]))[0] if n else np.arange(adata.n_vars)
        r[f"r2_{n or 'all'}"] = float(r2_score(xt[:, idx].mean(0), xp[:, idx].mean(0)))
    r["lfc_all"] = float(r2_score(xt.mean(0) - x_ctrl.mean(0), xp.mean(0) - x_ctrl.mean(0)))
    rows[condition] = r
print("RESULT", json.dumps({"tool": tool, "seed": seed, "epochs": epochs, "trained_epochs": n_epochs, "batch": 2048,
      "train_s": train_s, "held_out": HELD_OUT, "rows": rows}))
