#!/usr/bin/env python
"""What learning rate cpa-tools 0.8.8 actually trains with, epoch by epoch: a small cpa-tools model
on 1,300 cells of the bundled data with `step_size_lr` 2, the autoencoder optimizer's rate read
after batches 0, 4 and 9 of every epoch. Run with cpa-tools' venv (scripts/fidelity.sh installs it):

    $CPA_STREAM_CACHE/cpa-peer/bin/python scripts/peer_lr_probe.py

Seen: 5e-4 through epoch 4, 4.5e-4 from epoch 5, 4.05e-4 from epoch 9: constant within epochs
and one decay every step_size_lr^2 = 4 epochs (its StepLR(step_size=2) is stepped after epochs
2, 4, 6, ...), which is cpa-stream's `lr_schedule = "reference"`."""
import os
import warnings

warnings.filterwarnings("ignore")

import anndata  # noqa: E402
import cpa  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
here = os.path.dirname(os.path.abspath(__file__))
adata = anndata.read_h5ad(os.path.join(here, "..", "examples", "data", "perturbench_devel_cpa.h5ad"))
adata = adata[np.random.default_rng(0).choice(adata.n_obs, 1300, replace=False)].copy()
adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
for column in ["condition", "cell_type"]:
    adata.obs[column] = adata.obs[column].astype(str).astype("category")
cpa.CPA.setup_anndata(adata, perturbation_key="condition", control_group="control", dosage_key="dose",
                      categorical_covariate_keys=["cell_type"], is_count_data=True, max_comb_len=2)
model = cpa.CPA(adata=adata, n_latent=16, n_hidden_encoder=32, n_hidden_decoder=32)


class Rates(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = pl_module.optimizers()[0]
        optimizer = getattr(optimizer, "optimizer", optimizer)
        if batch_idx in (0, 4, 9):
            print(f"epoch {trainer.current_epoch} batch {batch_idx}: lr {optimizer.param_groups[0]['lr']:.3e}",
                  flush=True)


model.train(max_epochs=13, use_gpu=False, batch_size=128, plan_kwargs={"step_size_lr": 2, "n_epochs_pretrain_ae": 0},
            early_stopping_patience=1000, check_val_every_n_epoch=5, save_path=False, callbacks=[Rates()],
            enable_progress_bar=False)
