"""cpa-tools' Kang tutorial (theislab/cpa docs/tutorials/Kang.ipynb), its code cell by cell, with
two changes: the import line (``import cpa_stream.compat as cpa``) and the data loading (the
bundled data in Kang's shape, examples/cpa-tools/_data.py; ``TUTORIAL_EPOCHS`` caps the epochs).
Run: python examples/cpa-tools/kang.py [OUT_DIR]"""

import sys

import cpa_stream.compat as cpa  # was: import cpa
import scanpy as sc

from _data import epochs, kang_like

sc.settings.set_figure_params(dpi=100)
save_path = sys.argv[1] if len(sys.argv) > 1 else "cpa-tools-kang"

adata = kang_like()  # was: sc.read(data_path) of kang_normalized_hvg.h5ad
adata

adata.X = adata.layers['counts'].copy()

adata.obs['dose'] = adata.obs['condition'].apply(lambda x: '+'.join(['1.0' for _ in x.split('+')]))

adata.obs['cell_type'].value_counts()

adata.obs['condition'].value_counts()

cpa.CPA.setup_anndata(adata,
                      perturbation_key='condition',
                      control_group='ctrl',
                      dosage_key='dose',
                      categorical_covariate_keys=['cell_type'],
                      is_count_data=True,
                      deg_uns_key='rank_genes_groups_cov',
                      deg_uns_cat_key='cov_cond',
                      max_comb_len=1,
                     )

model_params = {
    "n_latent": 64,
    "recon_loss": "nb",
    "doser_type": "linear",
    "n_hidden_encoder": 128,
    "n_layers_encoder": 2,
    "n_hidden_decoder": 512,
    "n_layers_decoder": 2,
    "use_batch_norm_encoder": True,
    "use_layer_norm_encoder": False,
    "use_batch_norm_decoder": False,
    "use_layer_norm_decoder": True,
    "dropout_rate_encoder": 0.0,
    "dropout_rate_decoder": 0.1,
    "variational": False,
    "seed": 6977,
}

trainer_params = {
    "n_epochs_kl_warmup": None,
    "n_epochs_pretrain_ae": 30,
    "n_epochs_adv_warmup": 50,
    "n_epochs_mixup_warmup": 0,
    "mixup_alpha": 0.0,
    "adv_steps": None,
    "n_hidden_adv": 64,
    "n_layers_adv": 3,
    "use_batch_norm_adv": True,
    "use_layer_norm_adv": False,
    "dropout_rate_adv": 0.3,
    "reg_adv": 20.0,
    "pen_adv": 5.0,
    "lr": 0.0003,
    "wd": 4e-07,
    "adv_lr": 0.0003,
    "adv_wd": 4e-07,
    "adv_loss": "cce",
    "doser_lr": 0.0003,
    "doser_wd": 4e-07,
    "do_clip_grad": True,
    "gradient_clip_value": 1.0,
    "step_size_lr": 10,
}

model = cpa.CPA(adata=adata,
                split_key='split_B',
                train_split='train',
                valid_split='valid',
                test_split='ood',
                **model_params,
               )

model.train(max_epochs=epochs(2000),
            use_gpu=True,
            batch_size=512,
            plan_kwargs=trainer_params,
            early_stopping_patience=5,
            check_val_every_n_epoch=5,
            save_path=save_path,
           )

cpa.pl.plot_history(model)

# model = cpa.CPA.load(dir_path='/home/mohsen/projects/cpa/lightning_logs/Kang/',
#                      adata=adata,
#                      use_gpu=True)

latent_outputs = model.get_latent_representation(adata, batch_size=2048)

latent_outputs.keys()

sc.pp.neighbors(latent_outputs['latent_basal'])
sc.tl.umap(latent_outputs['latent_basal'])

sc.pl.umap(latent_outputs['latent_basal'],
           color=['condition', 'cell_type'],
           frameon=False,
           wspace=0.3)

sc.pp.neighbors(latent_outputs['latent_after'])
sc.tl.umap(latent_outputs['latent_after'])

sc.pl.umap(latent_outputs['latent_after'],
           color=['condition', 'cell_type'],
           frameon=False,
           wspace=0.3)

model.predict(adata, batch_size=2048)

import numpy as np
import pandas as pd
from sklearn.metrics import r2_score
from collections import defaultdict
from tqdm import tqdm

n_top_degs = [10, 20, 50, None] # None means all genes

results = defaultdict(list)
for cat in tqdm(adata.obs['cov_cond'].unique()):
    if 'ctrl' not in cat:
        cov, condition = cat.split('_')
        cat_adata = adata[adata.obs['cov_cond'] == cat].copy()
        ctrl_adata = adata[adata.obs['cov_cond'] == f'{cov}_ctrl'].copy()

        deg_cat = f'{cat}'
        deg_list = adata.uns['rank_genes_groups_cov'][deg_cat]

        x_true = cat_adata.layers['counts']
        x_pred = cat_adata.obsm['CPA_pred']
        x_ctrl = ctrl_adata.layers['counts']

        x_true = np.log1p(x_true)
        x_pred = np.log1p(x_pred)
        x_ctrl = np.log1p(x_ctrl)

        for n_top_deg in n_top_degs:
            if n_top_deg is not None:
                degs = np.where(np.isin(adata.var_names, deg_list[:n_top_deg]))[0]
            else:
                degs = np.arange(adata.n_vars)
                n_top_deg = 'all'

            x_true_deg = x_true[:, degs]
            x_pred_deg = x_pred[:, degs]
            x_ctrl_deg = x_ctrl[:, degs]

            r2_mean_deg = r2_score(x_true_deg.mean(0), x_pred_deg.mean(0))
            r2_var_deg = r2_score(x_true_deg.var(0), x_pred_deg.var(0))

            r2_mean_lfc_deg = r2_score(x_true_deg.mean(0) - x_ctrl_deg.mean(0), x_pred_deg.mean(0) - x_ctrl_deg.mean(0))
            r2_var_lfc_deg = r2_score(x_true_deg.var(0) - x_ctrl_deg.var(0), x_pred_deg.var(0) - x_ctrl_deg.var(0))

            results['condition'].append(condition)
            results['cell_type'].append(cov)
            results['n_top_deg'].append(n_top_deg)
            results['r2_mean_deg'].append(r2_mean_deg)
            results['r2_var_deg'].append(r2_var_deg)
            results['r2_mean_lfc_deg'].append(r2_mean_lfc_deg)
            results['r2_var_lfc_deg'].append(r2_var_lfc_deg)

df = pd.DataFrame(results)

df
print(df.groupby('n_top_deg')[['r2_mean_deg', 'r2_mean_lfc_deg']].mean())

# Beyond the tutorial (cpa-stream only): the same model scored by cpa-stream on the held-out
# cells: its default, anchored prediction (each control cell's observed log1p counts moved by
# the model's predicted change) beside the plain one the tutorial scores (the decoded mean,
# cpa-tools' prediction) and the baselines (docs/prediction.md, "The anchored prediction").
for anchored in (True, False):
    s = model.evaluate(split='ood', anchored=anchored).attrs['summary']
    print(f"held out, {'anchored' if anchored else 'plain'}: R2 of log1p means {s['r2_mean']:.3f} "
          f"(top-20 DEGs {s['r2_mean_top20']:.3f}); control mean {s['r2_mean_control']:.3f} "
          f"({s['r2_mean_control_top20']:.3f}), linear baseline {s['linear_r2_mean']:.3f} "
          f"({s['linear_r2_mean_top20']:.3f})")
