"""cpa-tools' combo-sciplex tutorials (theislab/cpa docs/tutorials/combosciplex.ipynb and, with
``--rdkit``, combosciplex_Rdkit_embeddings.ipynb): their calls in order, with
``import cpa_stream.compat as cpa`` and a synthetic drug x dose atlas with SMILES in the data
set's shape (examples/cpa-tools/_data.py). The notebooks were not available offline; the calls,
arguments and keys follow cpa-tools' API reference (../shared/reference/cpa-tools-api.md) and the
tutorials' published data layout. ``TUTORIAL_EPOCHS`` caps the epochs.
Run: python examples/cpa-tools/combosciplex.py [--rdkit] [OUT_DIR]"""

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import scanpy as sc

import cpa_stream.compat as cpa  # was: import cpa
from _data import combosciplex_like, epochs

RDKIT = "--rdkit" in sys.argv
args = [a for a in sys.argv[1:] if a != "--rdkit"]
save_path = args[0] if args else "cpa-tools-combosciplex"
scratch = Path(tempfile.mkdtemp(prefix="combosciplex-"))
atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # the generated atlas, not an output

adata = combosciplex_like(scratch)  # was: sc.read of combo_sciplex_prep_hvg_filtered.h5ad
adata.obs['split_1ct_MEC'].value_counts()

adata.X = adata.layers['counts'].copy()

cpa.CPA.setup_anndata(adata,
                      perturbation_key='condition_ID',
                      dosage_key='log_dose',
                      control_group='CHEMBL504',
                      batch_key=None,
                      smiles_key='smiles_rdkit' if RDKIT else None,
                      is_count_data=True,
                      categorical_covariate_keys=['cell_type'],
                      deg_uns_key='rank_genes_groups_cov',
                      deg_uns_cat_key='cov_drug',
                      max_comb_len=2,
                     )

ae_hparams = {
    "n_latent": 128,
    "recon_loss": "nb",
    "doser_type": "logsigm",
    "n_hidden_encoder": 512,
    "n_layers_encoder": 3,
    "n_hidden_decoder": 512,
    "n_layers_decoder": 3,
    "use_batch_norm_encoder": True,
    "use_layer_norm_encoder": False,
    "use_batch_norm_decoder": True,
    "use_layer_norm_decoder": False,
    "dropout_rate_encoder": 0.1,
    "dropout_rate_decoder": 0.1,
    "variational": False,
    "seed": 434,
}

trainer_params = {
    "n_epochs_kl_warmup": None,
    "n_epochs_pretrain_ae": 30,
    "n_epochs_adv_warmup": 50,
    "n_epochs_mixup_warmup": 3,
    "mixup_alpha": 0.1,
    "adv_steps": 2,
    "n_hidden_adv": 64,
    "n_layers_adv": 2,
    "use_batch_norm_adv": True,
    "use_layer_norm_adv": False,
    "dropout_rate_adv": 0.3,
    "reg_adv": 20.0,
    "pen_adv": 20.0,
    "lr": 0.0003,
    "wd": 4e-07,
    "adv_lr": 0.0003,
    "adv_wd": 4e-07,
    "adv_loss": "cce",
    "doser_lr": 0.0003,
    "doser_wd": 4e-07,
    "do_clip_grad": False,
    "gradient_clip_value": 1.0,
    "step_size_lr": 45,
}

model = cpa.CPA(adata=adata,
                split_key='split_1ct_MEC',
                train_split='train',
                valid_split='valid',
                test_split='ood',
                use_rdkit_embeddings=RDKIT,
                **ae_hparams,
               )

model.train(max_epochs=epochs(2000),
            use_gpu=True,
            batch_size=2048,
            plan_kwargs=trainer_params,
            early_stopping_patience=10,
            check_val_every_n_epoch=5,
            save_path=save_path,
           )

cpa.pl.plot_history(model)

model = cpa.CPA.load(dir_path=save_path,
                     adata=adata,
                     use_gpu=True)

latent_outputs = model.get_latent_representation(adata, batch_size=2048)

sc.pp.neighbors(latent_outputs['latent_basal'])
sc.tl.umap(latent_outputs['latent_basal'])

sc.pl.umap(latent_outputs['latent_basal'],
           color=['condition_ID'],
           frameon=False,
           wspace=0.2)

sc.pp.neighbors(latent_outputs['latent_after'])
sc.tl.umap(latent_outputs['latent_after'])

sc.pl.umap(latent_outputs['latent_after'],
           color=['condition_ID'],
           frameon=False,
           wspace=0.2)

model.predict(adata, batch_size=2048)

from sklearn.metrics import r2_score
from collections import defaultdict
from tqdm import tqdm
import pandas as pd

n_top_degs = [10, 20, 50, None]  # None means all genes

results = defaultdict(list)
ctrl_adata = adata[adata.obs['condition_ID'] == 'CHEMBL504'].copy()
for cat in tqdm(adata.obs['cov_drug_dose'].unique()):
    if 'CHEMBL504' not in cat:
        cat_adata = adata[adata.obs['cov_drug_dose'] == cat].copy()

        deg_cat = cat_adata.obs['cov_drug'].iloc[0]
        deg_list = adata.uns['rank_genes_groups_cov'][deg_cat]

        x_true = cat_adata.layers['counts'].toarray()
        x_pred = cat_adata.obsm['CPA_pred']
        x_ctrl = ctrl_adata.layers['counts'].toarray()

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
            r2_mean_lfc_deg = r2_score(x_true_deg.mean(0) - x_ctrl_deg.mean(0), x_pred_deg.mean(0) - x_ctrl_deg.mean(0))

            results['cov_drug_dose'].append(cat)
            results['n_top_deg'].append(n_top_deg)
            results['r2_mean_deg'].append(r2_mean_deg)
            results['r2_mean_lfc_deg'].append(r2_mean_lfc_deg)

df = pd.DataFrame(results)

for cat in adata[adata.obs['split_1ct_MEC'] == 'ood'].obs['cov_drug_dose'].unique():
    cat_adata = adata[adata.obs['cov_drug_dose'] == cat].copy()
    deg_list = adata.uns['rank_genes_groups_cov'][cat_adata.obs['cov_drug'].iloc[0]][:20]
    print(cat, cpa.pl.mean_plot(cat_adata, pred_obsm_key='CPA_pred', path_to_save=None, deg_list=deg_list,
                                show=False, verbose=True))

cpa_api = cpa.ComPertAPI(adata, model,
                         de_genes_uns_key='rank_genes_groups_cov',
                         pert_category_key='cov_drug_dose',
                         control_group='CHEMBL504',
                         )

cpa_plots = cpa.pl.CompertVisuals(cpa_api, fileprefix=None)

cpa_api.num_measured_points['train']

drug_adata = cpa_api.get_pert_embeddings()
drug_adata.shape

cpa_plots.plot_latent_embeddings(drug_adata.X, kind='perturbations', titlename='Drugs')

print(df.groupby('n_top_deg')[['r2_mean_deg', 'r2_mean_lfc_deg']].mean())
