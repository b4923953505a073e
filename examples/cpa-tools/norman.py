"""cpa-tools' Norman tutorial (theislab/cpa docs/tutorials/Norman.ipynb), its code cell by cell,
with two changes: the import line (``import cpa_stream.compat as cpa``) and the data loading (the
bundled K562 cells in Norman's shape, examples/cpa-tools/_data.py; one held-out combination the
bundled data lacks, DUSP9+ETS2, is replaced by MAP2K3+MAP2K6; ``TUTORIAL_EPOCHS`` caps the
epochs). Run: python examples/cpa-tools/norman.py [OUT_DIR]"""

import sys

import cpa_stream.compat as cpa  # was: import cpa
import scanpy as sc

from _data import epochs, norman_like

sc.settings.set_figure_params(dpi=100)
save_path = sys.argv[1] if len(sys.argv) > 1 else "cpa-tools-norman"
HELD_OUT = ['MAP2K3+MAP2K6', 'CBL+CNN1']  # was: ['DUSP9+ETS2', 'CBL+CNN1']

adata = norman_like()  # was: sc.read(data_path) of Norman2019_normalized_hvg.h5ad
adata

adata.X = adata.layers['counts'].copy()

cpa.CPA.setup_anndata(adata,
                      perturbation_key='cond_harm',
                      control_group='ctrl',
                      dosage_key='dose_value',
                      categorical_covariate_keys=['cell_type'],
                      is_count_data=True,
                      deg_uns_key='rank_genes_groups_cov',
                      deg_uns_cat_key='cov_cond',
                      max_comb_len=2,
                     )

model_params = {
    "n_latent": 32,
    "recon_loss": "nb",
    "doser_type": "linear",
    "n_hidden_encoder": 256,
    "n_layers_encoder": 4,
    "n_hidden_decoder": 256,
    "n_layers_decoder": 2,
    "use_batch_norm_encoder": True,
    "use_layer_norm_encoder": False,
    "use_batch_norm_decoder": False,
    "use_layer_norm_decoder": False,
    "dropout_rate_encoder": 0.2,
    "dropout_rate_decoder": 0.0,
    "variational": False,
    "seed": 8206,
}

trainer_params = {
    "n_epochs_kl_warmup": None,
    "n_epochs_adv_warmup": 50,
    "n_epochs_mixup_warmup": 10,
    "n_epochs_pretrain_ae": 10,
    "mixup_alpha": 0.1,
    "lr": 0.0001,
    "wd": 3.2170178270865573e-06,
    "adv_steps": 3,
    "reg_adv": 10.0,
    "pen_adv": 20.0,
    "adv_lr": 0.0001,
    "adv_wd": 7.051355554517135e-06,
    "n_layers_adv": 2,
    "n_hidden_adv": 128,
    "use_batch_norm_adv": True,
    "use_layer_norm_adv": False,
    "dropout_rate_adv": 0.3,
    "step_size_lr": 25,
    "do_clip_grad": False,
    "adv_loss": "cce",
    "gradient_clip_value": 5.0,
}

import numpy as np

adata.obs['split'] = np.random.choice(['train', 'valid'], size=adata.n_obs, p=[0.85, 0.15])
adata.obs.loc[adata.obs['cond_harm'].isin(HELD_OUT), 'split'] = 'ood'

adata.obs['split'].value_counts()

model = cpa.CPA(adata=adata,
                split_key='split',
                train_split='train',
                valid_split='valid',
                test_split='ood',
                **model_params,
               )

model.train(max_epochs=epochs(2000),
            use_gpu=True,
            batch_size=2048,
            plan_kwargs=trainer_params,
            early_stopping_patience=5,
            check_val_every_n_epoch=5,
            save_path=save_path,
           )

cpa.pl.plot_history(model)

# model = cpa.CPA.load(dir_path='/home/mohsen/projects/cpa/lightning_logs/Norman2019/',
#                      adata=adata,
#                      use_gpu=True)

latent_outputs = model.get_latent_representation(adata, batch_size=2048)

latent_outputs.keys()

sc.pp.neighbors(latent_outputs['latent_basal'])
sc.tl.umap(latent_outputs['latent_basal'])

groups = list(np.unique(adata[adata.obs['split'] == 'ood'].obs['cond_harm'].values))
len(groups)

sc.pl.umap(latent_outputs['latent_basal'],
           color='cond_harm',
           groups=groups,
           palette=sc.pl.palettes.godsnot_102,
           frameon=False)

sc.pl.umap(latent_outputs['latent_basal'],
           color='pathway',
           palette=sc.pl.palettes.godsnot_102,
           frameon=False)

sc.pp.neighbors(latent_outputs['latent_after'])
sc.tl.umap(latent_outputs['latent_after'])

sc.pl.umap(latent_outputs['latent_after'],
           color='cond_harm',
           groups=groups,
           palette=sc.pl.palettes.godsnot_102,
           frameon=False)

sc.pl.umap(latent_outputs['latent_after'],
           color='pathway',
           palette=sc.pl.palettes.godsnot_102,
           frameon=False)

adata.layers['X_true'] = adata.X.copy()

ctrl_adata = adata[adata.obs['cond_harm'] == 'ctrl'].copy()

adata.X = ctrl_adata.X[np.random.choice(ctrl_adata.n_obs, size=adata.n_obs, replace=True), :]

model.predict(adata, batch_size=2048)

adata.layers['CPA_pred'] = adata.obsm['CPA_pred'].copy()

sc.pp.normalize_total(adata, target_sum=1e4)
sc.pp.log1p(adata)

sc.pp.normalize_total(adata, target_sum=1e4, layer='CPA_pred')
sc.pp.log1p(adata, layer='CPA_pred')

adata.X.max(), adata.layers['CPA_pred'].max()

import numpy as np
import pandas as pd
from sklearn.metrics import r2_score
from collections import defaultdict
from tqdm import tqdm

n_top_degs = [10, 20, 50, None] # None means all genes

results = defaultdict(list)
ctrl_adata = adata[adata.obs['cond_harm'] == 'ctrl'].copy()
for condition in tqdm(adata.obs['cond_harm'].unique()):
    if condition != 'ctrl':
        cond_adata = adata[adata.obs['cond_harm'] == condition].copy()

        deg_cat = f'K562_{condition}'
        deg_list = adata.uns['rank_genes_groups_cov'][deg_cat]

        x_true = cond_adata.layers['counts'].toarray()
        x_pred = cond_adata.obsm['CPA_pred']
        x_ctrl = ctrl_adata.layers['counts'].toarray()

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

            r2_mean_lfc_deg = r2_score(x_true_deg.mean(0) - x_ctrl_deg.mean(0), x_pred_deg.mean(0) - x_ctrl_deg.mean(0))

            results['condition'].append(condition)
            results['n_top_deg'].append(n_top_deg)
            results['r2_mean_deg'].append(r2_mean_deg)
            results['r2_mean_lfc_deg'].append(r2_mean_lfc_deg)

df = pd.DataFrame(results)

print(df[df['condition'].isin(HELD_OUT)])

# Beyond the tutorial (cpa-stream only): the same model scored by cpa-stream on the held-out
# cells: its default, anchored prediction (each control cell's observed log1p counts moved by
# the model's predicted change) beside the plain one the tutorial scores (the decoded mean,
# cpa-tools' prediction) and the baselines (docs/prediction.md, "The anchored prediction").
# The tutorial replaced X by control cells above: the cells as measured are in layers['X_true'].
measured = adata.copy()
measured.X = measured.layers['X_true']
for anchored in (True, False):
    s = model.evaluate(measured, split='ood', anchored=anchored).attrs['summary']
    print(f"held out, {'anchored' if anchored else 'plain'}: R2 of log1p means {s['r2_mean']:.3f} "
          f"(top-20 DEGs {s['r2_mean_top20']:.3f}); control mean {s['r2_mean_control']:.3f} "
          f"({s['r2_mean_control_top20']:.3f}), linear baseline {s['linear_r2_mean']:.3f} "
          f"({s['linear_r2_mean_top20']:.3f})")
