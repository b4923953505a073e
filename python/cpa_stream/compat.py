"""cpa-tools' API on cpa-stream: a cpa-tools notebook runs by changing its import line.

::

    import cpa_stream.compat as cpa      # instead of: import cpa

    cpa.CPA.setup_anndata(adata, perturbation_key="condition", control_group="ctrl",
                          dosage_key="dose", categorical_covariate_keys=["cell_type"])
    model = cpa.CPA(adata, split_key="split", train_split="train", valid_split="valid",
                    test_split="ood", n_latent=64, recon_loss="nb", doser_type="linear")
    model.train(max_epochs=100, batch_size=512, plan_kwargs={"reg_adv": 20.0, "lr": 3e-4})
    cpa.pl.plot_history(model)
    latents = model.get_latent_representation(adata)     # dict of AnnData
    model.predict(adata)                                  # adata.obsm["CPA_pred"]

The calls, argument names, defaults and returned shapes are cpa-tools 0.8.8's (the ones its
tutorials use); the work runs on cpa-stream's out-of-core engine: the AnnData (in memory or
backed) is written to a store by the streaming writer, and results come back in cpa-tools'
shapes. The model's keys, ``plan_kwargs`` and ``train``'s arguments become cpa-stream's
configuration through :mod:`cpa_stream.translate`, which sets every key as cpa-tools 0.8.8 uses
it (its defaults where a key is left out); a key that cannot be honoured is an error naming it,
one without effect here a warning. What differs on purpose
(docs/python.md, "Coming from cpa-tools"):

- the setup belongs to the model (``CPA(adata)`` copies it from ``adata.uns``), not to class
  attributes, so two datasets never share encoders;
- ``train`` writes files only where ``save_path`` says (cpa-tools writes into the working
  directory when it is not given);
- the per-cell DEG masks (``obsm['deg_mask']``, ``['deg_mask_r2']``) are sparse, and
  ``deg_mask_r2`` holds the first ``n_deg_r2`` DEGs (cpa-tools writes the full mask twice);
- ``pl.mean_plot`` leaves ``adata.X`` as it is (cpa-tools densifies it in place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from . import _args, _run, _store, translate
from ._run import Run, _vectors
from .compat_api import PAD, ComPertAPI, _dose_text
from .compat_views import HISTORY_COLUMNS, _AnnDataManager, _epoch_history, _ModuleView
from .compat_plots import pl
from .compat_tune import run_autotune

__all__ = ["CPA", "ComPertAPI", "pl", "run_autotune"]

#: Where :meth:`CPA.setup_anndata` records its arguments in ``adata.uns``.
SETUP_KEY = "_cpa_stream_setup"
#: The obs column of the split the store is given (cpa-stream's names: train, valid, test, ood).
SPLIT_COLUMN = "_cpa_stream_split"
#: The file :meth:`CPA.save` writes beside the run.
SAVED = "cpa_stream_compat.json"


def _device(use_gpu: Any, accelerator: Any) -> str:
    """cpa-tools' ``use_gpu`` / Lightning's ``accelerator`` as a device: CUDA when asked for and
    present, else the CPU with a warning."""
    wanted = use_gpu not in (None, False) or (isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda"))
    if not wanted:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        warnings.warn("use_gpu: no CUDA device is visible; training on the CPU", stacklevel=3)
        return "cpu"
    if isinstance(use_gpu, int) and not isinstance(use_gpu, bool):
        return f"cuda:{use_gpu}"
    if isinstance(use_gpu, str) and use_gpu.startswith("cuda"):
        return use_gpu
    return "cuda"


class CPA:
    """cpa-tools' ``CPA`` model on cpa-stream's engine (arguments as cpa-tools 0.8.8's).

    ``CPA(adata, split_key=None, train_split="train", valid_split="test", test_split="ood",
    use_rdkit_embeddings=False, **hyper_params)``: ``adata`` must have been set up with
    :meth:`setup_anndata`; ``split_key`` names an obs column whose values ``train_split``,
    ``valid_split`` and ``test_split`` (a value or a list) select training, validation and
    held-out cells (cells in none of them are held out too); without it, :meth:`train` splits at
    random by ``train_size``. ``hyper_params`` are cpa-tools' module keys (``n_latent``,
    ``recon_loss``, ``doser_type``, ``n_hidden_encoder``, ..., ``seed``).

    ``use_rdkit_embeddings=True`` (with ``setup_anndata(smiles_key=...)``) gives each drug the
    features of its molecule (:mod:`cpa_stream.chem`; ``molecule_features="morgan"``, cpa-tools'
    2,048-bit fingerprints, or ``"descriptors"``, RDKit's 2-D descriptors) through a projection
    that is trained (cpa-tools' is not), so drugs whose cells are all held out (``test_split``)
    are predicted from their molecules."""

    def __init__(
        self,
        adata: Any,
        split_key: str | None = None,
        train_split: str | Sequence[str] = "train",
        valid_split: str | Sequence[str] = "test",
        test_split: str | Sequence[str] = "ood",
        use_rdkit_embeddings: bool = False,
        molecule_features: str = "morgan",
        **hyper_params: Any,
    ) -> None:
        setup = adata.uns.get(SETUP_KEY) if hasattr(adata, "uns") else None
        if not isinstance(setup, Mapping):
            raise ValueError("CPA(adata): call cpa.CPA.setup_anndata(adata, ...) first")
        self.adata = adata
        self._setup: dict[str, Any] = {k: _plain(v) for k, v in setup.items()}
        #: The molecules' features the model projects (``use_rdkit_embeddings=True``), one row per drug.
        self.drug_features: pd.DataFrame | None = None
        self.use_rdkit_embeddings = bool(use_rdkit_embeddings)
        self.molecule_features = molecule_features
        if use_rdkit_embeddings:
            from . import chem

            if self._setup.get("smiles_key") is None:
                raise ValueError("use_rdkit_embeddings=True needs setup_anndata(..., smiles_key=...)")
            smiles = chem.smiles_of(
                adata.obs, self._setup["perturbation_key"], self._setup["smiles_key"], self._setup["control_group"]
            )
            self.pert_smiles_map = smiles
            self.drug_features = chem.molecule_features(smiles, molecule_features)
        else:
            self.pert_smiles_map = None
        self.split_key = split_key
        self._splits = {
            "train": _values(train_split), "valid": _values(valid_split), "test": _values(test_split),
        }
        if split_key is not None and split_key not in adata.obs.columns:
            raise ValueError(f"split_key {split_key!r} is not an obs column; obs has {', '.join(map(str, adata.obs.columns))}")
        self.hyper_params = dict(hyper_params)
        # An unknown key fails here, as cpa-tools' constructor does; the whole translation is
        # made by `train`, which has the rest of cpa-tools' parameters.
        translate.module_tables(hyper_params)
        self.pert_encoder = _pert_encoder(adata.obs[self._setup["perturbation_key"]], self._setup["control_group"])
        self.covars_encoder = {
            key: {str(c): i for i, c in enumerate(_categories(adata.obs[key]))}
            for key in self._setup.get("categorical_covariate_keys", [])
        }
        self.drugs = list(self.pert_encoder)
        self.covars = {k: list(v) for k, v in self.covars_encoder.items()}
        if self.split_key is not None:
            labels = adata.obs[self.split_key].astype(str)
            self.train_indices = np.flatnonzero(labels.isin(self._splits["train"]).to_numpy())
            self.valid_indices = np.flatnonzero(labels.isin(self._splits["valid"]).to_numpy())
            self.test_indices = np.flatnonzero(labels.isin(self._splits["test"]).to_numpy())
        else:
            self.train_indices = self.valid_indices = self.test_indices = None
        self.epoch_history: pd.DataFrame | None = None
        self.is_trained_ = False
        self.run: Run | None = None
        self._scratch = tempfile.mkdtemp(prefix="cpa-stream-compat-")
        weakref.finalize(self, shutil.rmtree, self._scratch, True)
        self._stores: dict[tuple, str] = {}
        #: libtorch threads of this model's commands (``train(threads=...)``; default planned).
        self.threads: int | None = None
        self._device = "cpu"

    # -- scvi-tools' model attributes that notebooks read ----------------------------------------

    @property
    def is_trained(self) -> bool:
        """Whether the model has been trained (scvi-tools' ``is_trained``)."""
        return bool(self.is_trained_)

    @property
    def validation_indices(self) -> np.ndarray | None:
        """The validation cells' positions in ``adata`` (scvi-tools' ``validation_indices``)."""
        return self.valid_indices

    @property
    def device(self) -> Any:
        """The ``torch.device`` the model last trained on."""
        import torch

        return torch.device(self._device)

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """scvi-tools' ``history``: per logged metric, a frame indexed by ``epoch`` with one column
        of that name (cpa-tools' keys: ``recon``, ``adv_loss``, ``acc_pert`` of the training,
        ``val_recon``, ``val_r2_mean``, ``val_r2_var``, ``disnt_basal``, ``disnt_after`` and
        ``cpa_metric`` of the validations)."""
        if not self.is_trained_ or self.run is None or not (self.run.path / "metrics.parquet").exists():
            return {}
        h = self.run.history
        columns = {
            "recon": "recon_loss", "adv_loss": "adv_loss", "acc_pert": "acc_perts", "val_recon": "val_recon_loss",
            "val_r2_mean": "val_r2_mean", "val_r2_var": "val_r2_var", "disnt_basal": "val_disnt_basal",
            "disnt_after": "val_disnt_after", "cpa_metric": "val_score",
        }
        out = {}
        for name, column in columns.items():
            if column in h.columns:
                part = h[["epoch", column]].dropna().rename(columns={column: name}).set_index("epoch")
                out[name] = part
        return out

    @property
    def module(self) -> _ModuleView:
        """cpa-tools' ``model.module`` as far as a notebook reads it: the module's settings
        (``n_latent``, ``recon_loss``, ``doser_type``, ``variational``, ... as given or
        cpa-tools' defaults; ``n_genes``, ``n_perts``, ``covars_encoder``) and
        ``state_dict()`` (the trained weights as numpy arrays under cpa-stream's names). It is
        not a ``torch.nn.Module``: the network lives in cpa-stream's engine."""
        return _ModuleView(self)

    @property
    def adata_manager(self) -> _AnnDataManager:
        """scvi-tools' ``adata_manager`` as far as a notebook reads it: ``adata``, ``registry``
        (``setup_args``: the arguments of :meth:`setup_anndata`), ``view_registry()`` and
        ``get_from_registry(key)``."""
        return _AnnDataManager(self)

    def view_anndata_setup(self, adata: Any | None = None) -> None:
        """Prints how the AnnData is read (the arguments of :meth:`setup_anndata`) and the
        model's perturbation and covariate vocabularies (scvi-tools' summary, in plain text)."""
        target = self.adata if adata is None else adata
        setup = target.uns.get(SETUP_KEY, self._setup) if hasattr(target, "uns") else self._setup
        print(f"AnnData of {target.n_obs:,} cells x {target.n_vars:,} genes, set up with:")
        for key, value in setup.items():
            print(f"  {key}: {value}")
        print(f"  perturbations ({len(self.pert_encoder) - 1}): {', '.join(list(self.pert_encoder)[1:][:20])}"
              + (" ..." if len(self.pert_encoder) > 21 else ""))
        for key, values in self.covars_encoder.items():
            print(f"  {key} ({len(values)}): {', '.join(list(values)[:20])}" + (" ..." if len(values) > 20 else ""))

    def __repr__(self) -> str:
        state = f"trained ({self.run})" if self.is_trained_ else "not trained"
        return f"CPA(cpa_stream.compat; {self.adata.n_obs:,} cells x {self.adata.n_vars:,} genes; {state})"

    # -- setup ----------------------------------------------------------------------------------

    @classmethod
    def setup_anndata(
        cls,
        adata: Any,
        perturbation_key: str,
        control_group: str,
        dosage_key: str | None = None,
        batch_key: str | None = None,
        layer: str | None = None,
        smiles_key: str | None = None,
        is_count_data: bool = True,
        categorical_covariate_keys: Sequence[str] | None = None,
        deg_uns_key: str | None = None,
        deg_uns_cat_key: str | None = None,
        max_comb_len: int = 2,
        **kwargs: Any,
    ) -> None:
        """Records how ``adata`` is read (in ``adata.uns['_cpa_stream_setup']``, which the model
        copies) and writes cpa-tools' obs/obsm fields: ``CPA_cat`` (batch, covariates and
        perturbation joined by ``_``), ``CPA_<control_group>`` (1 for control cells),
        ``CPA_dose_val`` when no ``dosage_key`` is given (``"1.0"`` per ``+``-part), and obsm
        ``perts`` / ``perts_doses`` (cells x ``max_comb_len``, padding index 0) and, with
        ``deg_uns_key`` and ``deg_uns_cat_key``, the sparse masks ``deg_mask`` (each cell's DEGs)
        and ``deg_mask_r2`` (the first ``n_deg_r2``, default 10). The engine reads the DEG lists
        from ``uns[deg_uns_key]``."""
        n_deg_r2 = int(kwargs.pop("n_deg_r2", 10))
        if kwargs:
            raise TypeError(f"setup_anndata(): unexpected keyword {next(iter(kwargs))!r}")
        if max_comb_len < 1:
            raise ValueError(f"setup_anndata: max_comb_len={max_comb_len}: expected at least 1")
        # A view becomes an AnnData of its own at the first column written (anndata's rule):
        # everything is read from this frame first, then written.
        obs = adata.obs
        covariates = _args.names("categorical_covariate_keys", categorical_covariate_keys)
        for what, key in [("perturbation_key", perturbation_key), ("dosage_key", dosage_key),
                          ("batch_key", batch_key), ("smiles_key", smiles_key), ("deg_uns_cat_key", deg_uns_cat_key),
                          *[("categorical_covariate_keys", k) for k in covariates]]:
            if key is not None and key not in obs.columns:
                raise ValueError(
                    f"setup_anndata: {what} {key!r} is not an obs column; obs has {', '.join(map(str, obs.columns))}"
                )
        if layer is not None and layer not in adata.layers:
            raise ValueError(f"setup_anndata: no layer {layer!r}; the AnnData has {sorted(adata.layers.keys()) or 'none'}")
        if deg_uns_key is not None and deg_uns_key not in adata.uns:
            raise ValueError(f"setup_anndata: deg_uns_key {deg_uns_key!r} is not in adata.uns")
        # An AnnData without control cells is set up too: cpa-tools' counterfactual idiom copies
        # control cells, relabels them with the perturbations to predict and sets them up again;
        # only training needs control cells (`train` says so).
        conditions = obs[perturbation_key].astype(str)
        if dosage_key is None:
            print('Warning: dosage_key is not set. Setting it to "1.0" for all cells')
            codes, uniques = pd.factorize(conditions)
            dose_values = pd.Series(np.asarray([_dose_text(u) for u in uniques], dtype=object)[codes], index=obs.index)
        else:
            dose_values = obs[dosage_key].astype(str)
        keys = ([batch_key] if batch_key is not None else []) + covariates + [perturbation_key]
        joined = obs[keys[0]].astype(str)
        for key in keys[1:]:
            joined = joined + "_" + obs[key].astype(str)
        encoder = _pert_encoder(obs[perturbation_key], control_group)
        perts, doses = _perts_matrices(conditions, dose_values, encoder, max_comb_len, perturbation_key)
        controls = (conditions == control_group).astype(int).to_numpy()
        if dosage_key is None:
            adata.obs["CPA_dose_val"] = dose_values.to_numpy()
        adata.obs["CPA_cat"] = joined.to_numpy()
        adata.obs[f"CPA_{control_group}"] = controls
        adata.obsm["perts"] = perts
        adata.obsm["perts_doses"] = doses
        if deg_uns_key is not None and deg_uns_cat_key is not None:
            masks = _deg_masks(adata, adata.uns[deg_uns_key], obs[deg_uns_cat_key].astype(str), n_deg_r2)
            if masks is not None:
                adata.obsm["deg_mask"], adata.obsm["deg_mask_r2"] = masks
        setup = {
            "perturbation_key": perturbation_key, "control_group": control_group, "dosage_key": dosage_key,
            "batch_key": batch_key, "layer": layer, "smiles_key": smiles_key, "is_count_data": bool(is_count_data),
            "categorical_covariate_keys": covariates, "deg_uns_key": deg_uns_key,
            "deg_uns_cat_key": deg_uns_cat_key, "max_comb_len": int(max_comb_len),
        }
        # Only values an .h5ad can hold (no None), so the AnnData can still be written.
        adata.uns[SETUP_KEY] = {k: v for k, v in setup.items() if v is not None}

    # -- the store ------------------------------------------------------------------------------

    def _obs(self, adata: Any) -> pd.DataFrame:
        """The obs columns the engine reads, and the split in cpa-stream's names."""
        s = self._setup
        keys = [s["perturbation_key"], s.get("dosage_key"), s.get("batch_key"), s.get("deg_uns_cat_key"),
                *s.get("categorical_covariate_keys", [])]
        columns = list(dict.fromkeys(k for k in keys if k is not None))
        missing = [k for k in columns if k not in adata.obs.columns]
        if missing:
            raise ValueError(f"the AnnData lacks the obs column(s) the model was set up with: {', '.join(missing)}")
        obs = adata.obs[columns].copy()
        if self.split_key is not None and self.split_key in adata.obs.columns:
            labels = adata.obs[self.split_key].astype(str)
            split = np.full(len(labels), "test", dtype=object)
            for name in ("test", "valid", "train"):
                split[labels.isin(self._splits[name]).to_numpy()] = name
            # cpa-tools' held-out value "ood" is cpa-stream's held-out conditions.
            split[(split == "test") & (labels == "ood").to_numpy()] = "ood"
            obs[SPLIT_COLUMN] = split
        return obs

    def _store_of(self, adata: Any | None, indices: Sequence[int] | None = None) -> tuple[Any, str]:
        """``adata`` (default the model's) or its cells at ``indices``, and a store of it. The
        store is made again when the matrix or the obs columns changed (the Norman tutorial
        replaces ``X`` by control cells before predicting)."""
        adata = self.adata if adata is None else adata
        if indices is not None:
            adata = adata[np.asarray(indices)]
        obs = self._obs(adata)
        key = (id(adata), _matrix_key(adata, self._setup.get("layer")),
               int(pd.util.hash_pandas_object(obs.astype(str), index=True).sum()))
        found = self._stores.get(key)
        if found is not None and _store._is_store(found):
            return adata, found
        out = Path(tempfile.mkdtemp(prefix="store-", dir=self._scratch)) / "store"
        _store.import_matrix(
            adata, obs, out, layer=self._setup.get("layer"), deg_uns_key=self._setup.get("deg_uns_key"), progress=False,
        )
        self._stores[key] = os.fspath(out)
        return adata, os.fspath(out)

    def _trained(self) -> Run:
        if not self.is_trained_ or self.run is None:
            raise RuntimeError("Please train the model first.")
        return self.run

    # -- training -------------------------------------------------------------------------------

    def train(
        self,
        max_epochs: int | None = None,
        use_gpu: bool | str | int | None = None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        batch_size: int = 128,
        plan_kwargs: Mapping[str, Any] | None = None,
        save_path: str | os.PathLike | None = None,
        check_val_every_n_epoch: int = 10,
        early_stopping_patience: int = 10,
        **trainer_kwargs: Any,
    ) -> None:
        """Trains as cpa-tools' ``train`` does, on cpa-stream's engine (the configuration
        :func:`cpa_stream.translate.translate` makes of the model's keys, ``plan_kwargs`` and
        these arguments). ``max_epochs`` defaults to
        cpa-tools' rule ``min(round(20000 / cells * 400), 400)``; early stopping and the best
        weights follow the validation score every ``check_val_every_n_epoch`` epochs.
        ``use_gpu`` (or ``accelerator="gpu"``) trains on CUDA when there is one, else on the CPU
        with a warning. With ``save_path`` the model is saved there (as :meth:`save` with
        ``overwrite=True``); without, nothing is written outside a temporary directory.
        ``threads`` (cpa-stream's) sets libtorch's threads; other Lightning keywords warn."""
        if max_epochs is not None and (isinstance(max_epochs, bool) or int(max_epochs) != max_epochs or max_epochs < 1):
            raise ValueError(
                f"train(max_epochs={max_epochs!r}): expected a whole number of epochs, at least 1 (left out, "
                "cpa-tools' rule min(round(20000 / cells * 400), 400) applies); nothing was trained"
            )
        accelerator = trainer_kwargs.pop("accelerator", None)
        self.threads = trainer_kwargs.pop("threads", self.threads)
        trainer_kwargs.pop("devices", None)
        for key in trainer_kwargs:
            warnings.warn(f"train(): Lightning keyword {key!r} has no counterpart in cpa-stream; ignored", stacklevel=2)
        s = self._setup
        conditions = self.adata.obs[s["perturbation_key"]].astype(str)
        if not (conditions == s["control_group"]).any():
            values = ", ".join(sorted(set(conditions.unique()))[:10])
            raise ValueError(
                f"train(): no cell of the AnnData has {s['perturbation_key']} == {s['control_group']!r} (values "
                f"include {values}); CPA learns perturbations against control cells. (An AnnData without them "
                "is fine for predict(): relabelled control cells predict their new labels.)"
            )
        device = _device(use_gpu, accelerator)
        self._device = device
        config = translate.translate(
            self.hyper_params, plan_kwargs or {}, n_cells=self.adata.n_obs, max_epochs=max_epochs,
            batch_size=batch_size, check_val_every_n_epoch=check_val_every_n_epoch,
            early_stopping_patience=early_stopping_patience,
        )
        config["model"]["max_comb_len"] = int(self._setup.get("max_comb_len", 2))
        epochs = config["training"]["max_epochs"]
        split: dict[str, Any] = {}
        if self.split_key is not None:
            split["split_key"] = SPLIT_COLUMN
        else:
            if not 0 < train_size <= 1:
                raise ValueError(f"train_size={train_size}: expected a fraction in (0, 1]")
            valid = validation_size if validation_size is not None else 1.0 - train_size
            split["validation_fraction"] = float(valid)
            split["test_fraction"] = float(max(0.0, 1.0 - train_size - valid))
        _, store = self._store_of(None)
        if self.is_trained_ and self.run is not None and (self.run.path / "checkpoint").is_dir():
            # As in cpa-tools, training again goes on from the trained weights: the run is
            # resumed for `max_epochs` more, with the settings it was started with.
            done = len(self.run.history)
            changed = _changed_keys(self.run.config, config)
            if changed:
                warnings.warn(
                    "train() again continues the training with the settings it started with; not applied: "
                    + ", ".join(changed),
                    stacklevel=2,
                )
            with _engine_errors():
                self.run = _run.train(store, self.run.path, max_epochs=done + epochs, resume=True, device=device,
                                      threads=self.threads)
            self.epoch_history = _epoch_history(self.run.history, self.covars_encoder)
            if save_path is not None:
                self.save(save_path, overwrite=True)
            return
        out = Path(save_path) / "run" if save_path is not None else Path(self._scratch) / "run"
        if save_path is not None:
            _check_save_dir(Path(save_path), overwrite=True)
        with _engine_errors():
            self.run = _run.train(
                store, out, perturbation_key=s["perturbation_key"], dosage_key=s.get("dosage_key"),
                control_group=s["control_group"], categorical_covariate_keys=s.get("categorical_covariate_keys", []),
                batch_key=s.get("batch_key"), config=config, preset="reference", device=device, threads=self.threads,
                overwrite=True, allow_non_counts=not s.get("is_count_data", True),
                perturbation_features=self.drug_features, **split,
            )
        self.is_trained_ = True
        self.epoch_history = _epoch_history(self.run.history, self.covars_encoder)
        if save_path is not None:
            self.save(save_path, overwrite=True)

    # -- outputs --------------------------------------------------------------------------------

    def _check_samples(self, n_samples: int, return_mean: bool) -> None:
        model = self._trained().config["model"]
        if model.get("variational"):
            if not return_mean:
                raise NotImplementedError("return_mean=False: cpa-stream returns the mean over the draws")
            if n_samples != model.get("n_samples"):
                warnings.warn(
                    f"n_samples={n_samples}: the model averages its configured {model.get('n_samples')} draws",
                    stacklevel=3,
                )

    def evaluate(self, adata: Any | None = None, split: str = "ood", anchored: bool | None = None,
                 **kwargs: Any) -> pd.DataFrame:
        """Not in cpa-tools: cpa-stream's evaluation of this model (:meth:`cpa_stream.Run.evaluate`)
        on ``adata`` (default the model's) with its splits (``"ood"``: the held-out cells; also
        ``"train"``, ``"valid"``, ``"test"``, ``"all"``): per condition the R2 of log1p means on
        all genes and the top DEGs, with the control-mean and linear baselines. ``anchored``
        (default: anchored) as in :meth:`cpa_stream.Run.evaluate`; ``anchored=False`` scores the
        plain mean that :meth:`predict` writes, cpa-tools' prediction."""
        _, store = self._store_of(adata)
        with _engine_errors():
            return self._trained().evaluate(store, split=split, anchored=anchored, threads=self.threads, **kwargs)

    def predict(
        self,
        adata: Any | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = 32,
        n_samples: int = 20,
        return_mean: bool = True,
    ) -> None:
        """Each cell's expression predicted from its own ``X`` under its own perturbation, dose
        and covariates (the predicted means), written to ``adata.obsm['CPA_pred']`` (cells x
        genes, float32). For counterfactuals, replace ``X`` by control cells first (keeping the
        truth in a layer), as cpa-tools' tutorials do. With ``indices``, those cells' rows are
        filled and the others are NaN. For more cells than memory holds, use
        :meth:`cpa_stream.Run.predict_to_parquet` on ``model.run``."""
        self._check_samples(n_samples, return_mean)
        full = self.adata if adata is None else adata
        sub, store = self._store_of(full, indices)
        means, ids = [], []
        n_genes = len(self.run.vocabulary["genes"])
        with _engine_errors():
            # cpa-tools' prediction: the decoded mean, never anchored (docs/python.md).
            reader = self._trained().predict(
                store, source="all", batch_size=batch_size, threads=self.threads, anchored=False
            )
            for batch in reader:
                means.append(_vectors(batch.column("mean"), n_genes))
                ids.append(batch.column("cell_id").to_numpy(zero_copy_only=False))
        x = _in_order(means, ids, sub.obs_names, n_genes)
        if indices is not None:
            filled = np.full((full.n_obs, n_genes), np.nan, dtype=np.float32)
            filled[np.asarray(indices)] = x
            x = filled
        full.obsm[f"{type(self).__name__}_pred"] = x

    def get_latent_representation(
        self, adata: Any | None = None, indices: Sequence[int] | None = None, batch_size: int | None = 32,
    ) -> dict[str, Any]:
        """The latents of the cells under their own conditions, a dict of AnnData (``X`` the
        latent, ``obs`` a copy of the cells' obs): ``latent_basal`` (z_basal), ``latent_after``
        (z, what the decoder reads) and ``latent_corrected`` (z without the batch)."""
        sub, store = self._store_of(adata, indices)
        kinds = {"latent_corrected": "z_corrected", "latent_basal": "z_basal", "latent_after": "z"}
        with _engine_errors():
            found = self._trained().latents(
                store, list(kinds.values()), source="all", batch_size=batch_size, threads=self.threads
            )
        return {name: _latent_anndata(found[kind], found["cell_id"], sub) for name, kind in kinds.items()}

    def custom_predict(
        self,
        covars_to_add: Sequence[str] | None = None,
        basal: bool = False,
        add_batch: bool = True,
        add_pert: bool = True,
        adata: Any | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = 32,
        n_samples: int = 20,
        return_mean: bool = True,
    ) -> dict[str, Any]:
        """cpa-tools' ``custom_predict``: a dict of AnnData, ``latent_x_pred`` (the predicted
        means) and ``latent_z``, ``latent_z_corrected``, ``latent_z_no_pert``,
        ``latent_z_no_pert_corrected``, ``latent_z_basal``. ``add_batch=False`` decodes without
        the batch covariate (the batch-correction tutorial). Decoding without the perturbation
        (``add_pert=False``), from the basal state alone (``basal=True``) or with some
        covariates (``covars_to_add``) is not available and is an error naming the argument."""
        self._check_samples(n_samples, return_mean)
        run = self._trained()
        covariates = list(self.covars_encoder)
        if covars_to_add is not None and sorted(covars_to_add) != sorted(covariates):
            unknown = [c for c in covars_to_add if c not in covariates]
            if unknown:
                raise ValueError(f"covars_to_add: covariate {unknown[0]!r} not found in learned covariates")
            raise NotImplementedError(
                f"covars_to_add={list(covars_to_add)!r}: cpa-stream decodes with all covariates ({covariates})"
            )
        if basal:
            raise NotImplementedError("basal=True: cpa-stream does not decode the basal latent alone")
        if not add_pert:
            raise NotImplementedError("add_pert=False: cpa-stream does not decode without the perturbation")
        sub, store = self._store_of(adata, indices)
        kinds = ["z", "z_corrected", "z_no_pert", "z_no_pert_corrected", "z_basal"]
        # Without a batch key there is no batch to leave out: z_no_batch is z, as in cpa-tools.
        corrected = not add_batch and self._setup.get("batch_key") is not None
        n_genes = len(run.vocabulary["genes"])
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ["mean", *kinds]}
        ids = []
        with _engine_errors():
            reader = run.predict(
                store, source="all", latents=kinds, batch_size=batch_size, batch_corrected=corrected,
                threads=self.threads, anchored=False,
            )
            for batch in reader:
                parts["mean"].append(_vectors(batch.column("mean"), n_genes))
                for k in kinds:
                    column = batch.column(k)
                    parts[k].append(_vectors(column, column.type.list_size))
                ids.append(batch.column("cell_id").to_numpy(zero_copy_only=False))
        out = {"latent_x_pred": _latent_anndata(np.concatenate(parts["mean"]), np.concatenate(ids), sub)}
        for k in kinds:
            out[f"latent_{k}"] = _latent_anndata(np.concatenate(parts[k]), np.concatenate(ids), sub)
        return out

    def get_pert_embeddings(self, dosage: float = 1.0, pert: str | None = None) -> Any:
        """The perturbations' latent shifts at ``dosage`` (embedding times the learned dose
        response), an AnnData with ``obs['pert_name']``: every perturbation of cpa-tools'
        vocabulary (``<PAD>`` a zero row), or ``pert`` alone."""
        import anndata as ad

        if not isinstance(dosage, float):
            raise NotImplementedError("dosage: one float (cpa-tools takes no other)")
        run = self._trained()
        table = run.perturbation_embeddings()
        vectors = table.drop(columns="is_control")
        names = [pert] if pert is not None else list(self.pert_encoder)
        unknown = [n for n in names if n != PAD and n not in vectors.index]
        if unknown:
            raise ValueError(f"pert {unknown[0]!r}: not a perturbation of the model; it knows {', '.join(vectors.index[:10])}")
        response = run.dose_response(doses=[dosage], plots=False, progress=False, threads=self.threads)["latent"]
        scale = dict(zip(response["perturbation"], response["response"]))
        rows = []
        for name in names:
            if name == PAD:
                rows.append(np.zeros(vectors.shape[1], np.float32))
            else:
                rows.append(vectors.loc[name].to_numpy(np.float32) * np.float32(scale.get(name, dosage)))
        out = ad.AnnData(X=np.vstack(rows))
        out.obs["pert_name"] = names
        return out

    def get_covar_embeddings(self, covariate: str, covariate_value: str | None = None) -> Any:
        """A covariate's embeddings, an AnnData with ``obs[covariate]`` (every value, or
        ``covariate_value``)."""
        import anndata as ad

        if covariate not in self.covars_encoder:
            raise ValueError(f"covariate {covariate} not found in learned covariates")
        table = self._trained().covariate_embeddings().loc[covariate]
        values = [covariate_value] if covariate_value is not None else list(table.index)
        unknown = [v for v in values if v not in table.index]
        if unknown:
            raise ValueError(f"covariate_value {unknown[0]!r}: {covariate} has {', '.join(map(str, table.index))}")
        out = ad.AnnData(X=table.loc[values].to_numpy(np.float32))
        out.obs[covariate] = values
        return out

    # -- saving ---------------------------------------------------------------------------------

    def save(self, dir_path: str | os.PathLike, overwrite: bool = False, save_anndata: bool = False,
             **anndata_write_kwargs: Any) -> None:
        """Saves the model into ``dir_path``: the cpa-stream run (``run/``, which the command
        line also reads), the setup and split (``cpa_stream_compat.json``), ``history.csv`` and,
        with ``save_anndata``, ``adata.h5ad``. An existing directory is replaced only with
        ``overwrite`` and only when it holds a model saved here (or is empty)."""
        run = self._trained()
        target = Path(dir_path)
        _check_save_dir(target, overwrite)
        target.mkdir(parents=True, exist_ok=True)
        if run.path.resolve() != (target / "run").resolve():
            tmp = Path(tempfile.mkdtemp(prefix=".run-", dir=target))
            shutil.copytree(run.path, tmp / "run")
            if (target / "run").exists():
                shutil.rmtree(target / "run")
            os.replace(tmp / "run", target / "run")
            shutil.rmtree(tmp, ignore_errors=True)
            self.run = Run(target / "run")
        state = {
            "setup": self._setup, "split_key": self.split_key, "splits": self._splits,
            "hyper_params": self.hyper_params, "pert_encoder": self.pert_encoder,
            "use_rdkit_embeddings": self.use_rdkit_embeddings, "molecule_features": self.molecule_features,
            "pert_smiles_map": self.pert_smiles_map,
            "covars_encoder": self.covars_encoder,
        }
        _write_atomic(target / SAVED, json.dumps(state, indent=1, default=_plain))
        if self.epoch_history is not None:
            self.epoch_history.to_csv(target / "history.csv", index=False)
        if save_anndata:
            self.adata.write_h5ad(target / "adata.h5ad", **anndata_write_kwargs)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: Any | None = None, use_gpu: Any = None) -> CPA:
        """The model saved in ``dir_path``, for ``adata`` (set up again as it was saved) or the
        AnnData saved with it."""
        import anndata as ad

        path = Path(dir_path)
        saved = path / SAVED
        if not saved.is_file() and (path / "model.pt").exists():
            return cls._load_cpa_tools(path, adata)
        if not saved.is_file():
            raise FileNotFoundError(
                f"{path}: no model saved by cpa_stream.compat ({SAVED} is missing) nor by cpa-tools (model.pt)"
            )
        state = json.loads(saved.read_text())
        if adata is None:
            if not (path / "adata.h5ad").is_file():
                raise ValueError(f"{path}: no adata.h5ad saved with the model; pass adata")
            adata = ad.read_h5ad(path / "adata.h5ad")
        if not isinstance(adata.uns.get(SETUP_KEY), Mapping):
            setup = {k: v for k, v in state["setup"].items() if k in _SETUP_ARGS}
            cls.setup_anndata(adata, **setup)
        splits = state["splits"]
        model = cls(adata, split_key=state["split_key"], train_split=splits["train"], valid_split=splits["valid"],
                    test_split=splits["test"], use_rdkit_embeddings=state.get("use_rdkit_embeddings", False),
                    molecule_features=state.get("molecule_features", "morgan"), **state["hyper_params"])
        model.run = Run(path / "run")
        model.is_trained_ = True
        model.epoch_history = _epoch_history(model.run.history, model.covars_encoder)
        return model


    @classmethod
    def _load_cpa_tools(cls, path: Path, adata: Any | None) -> CPA:
        """A model saved by cpa-tools 0.8.8, converted (:mod:`cpa_stream.cpa_tools_model`)."""
        from . import cpa_tools_model

        if adata is None:
            raise ValueError(f"{path}: a model saved by cpa-tools is loaded with the AnnData it was set up with: "
                             "CPA.load(dir_path, adata)")
        scratch = tempfile.mkdtemp(prefix="cpa-stream-compat-")
        run = Path(scratch) / "run"
        run.mkdir()
        try:
            converted = cpa_tools_model.convert(path, run / "model")
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        setup = {k: v for k, v in converted["setup"].items() if k in _SETUP_ARGS and v is not None}
        if not isinstance(adata.uns.get(SETUP_KEY), Mapping):
            cls.setup_anndata(adata, **setup)
        split = converted["split"]
        model = cls(adata, split_key=split.get("split_key") if split.get("split_key") in adata.obs.columns else None,
                    train_split=split.get("train_split") or "train", valid_split=split.get("valid_split") or "test",
                    test_split=split.get("test_split") or "ood", **converted["hyper_params"])
        shutil.rmtree(model._scratch, ignore_errors=True)
        model._scratch = scratch
        weakref.finalize(model, shutil.rmtree, scratch, True)
        model.run = Run(run)
        model.is_trained_ = True
        model.epoch_history = pd.DataFrame(columns=HISTORY_COLUMNS)
        #: What the conversion did (tensors copied, the adversaries' left as initialised).
        model.converted_from = {"path": str(path), **converted["summary"]}
        return model


_SETUP_ARGS = (
    "perturbation_key", "control_group", "dosage_key", "batch_key", "layer", "smiles_key", "is_count_data",
    "categorical_covariate_keys", "deg_uns_key", "deg_uns_cat_key", "max_comb_len",
)


@contextlib.contextmanager
def _engine_errors():
    """Errors of the engine about the store made from an AnnData, as ``ValueError`` about the
    AnnData (an error met while the predictions stream arrives as pyarrow's ``ArrowInvalid``)."""
    try:
        yield
    except (pa.ArrowInvalid, ValueError) as error:
        raise ValueError(_about_anndata(str(error).removeprefix("External error: "))) from error


def _changed_keys(trained: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``table.key`` of the settings in ``wanted`` that differ from a trained run's (the epoch
    count aside)."""
    out = []
    for table, keys in wanted.items():
        for key, value in keys.items():
            if key == "max_epochs":
                continue
            have = trained.get(table, {}).get(key)
            if have != value and not (isinstance(have, float) and isinstance(value, (int, float)) and have == value):
                out.append(f"{table}.{key}={value!r} (kept {have!r})")
    return out


def _about_anndata(message: str) -> str:
    """An engine message about the store made from an AnnData, told about the AnnData: the
    temporary store's obs table is the AnnData's obs."""
    import re

    return re.sub(r"\S*/cpa-stream-compat-[^/\s]+/store-[^/\s]+/store/obs\.parquet", "adata.obs", message)


def _check_save_dir(target: Path, overwrite: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a directory")
    entries = [e for e in target.iterdir() if not e.name.startswith(".run-")]
    if not entries:
        return
    if not (target / SAVED).is_file() and not (target / "run").is_dir():
        raise FileExistsError(f"{target}: a directory with other files; save into a new or empty directory")
    if not overwrite:
        raise FileExistsError(f"{target}: a model is saved there; pass overwrite=True to replace it")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """uns values (numpy arrays and scalars after an .h5ad round trip) as plain Python."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _values(split: str | Sequence[str]) -> list[str]:
    return [split] if isinstance(split, str) else [str(s) for s in split]


def _categories(column: pd.Series) -> list[Any]:
    if isinstance(column.dtype, pd.CategoricalDtype):
        return list(column.cat.categories)
    return sorted(column.astype(str).unique())


#: The most mask entries ``setup_anndata`` writes (a cell's mask is all genes when its category
#: has no DEG list, so the masks can be as large as a dense matrix of the data).
DEG_MASK_LIMIT = 200_000_000


def _deg_masks(adata: Any, degs: Mapping[str, Any], categories: pd.Series, n_deg_r2: int) -> tuple[Any, Any] | None:
    """cpa-tools' ``obsm['deg_mask']`` / ``['deg_mask_r2']``: per cell, 1 for the DEGs of its
    category (all of them / the first ``n_deg_r2``; every gene where the category has no list),
    as sparse uint8 matrices. None, with a warning, beyond :data:`DEG_MASK_LIMIT` entries."""
    import scipy.sparse as sp

    names = pd.Index(adata.var_names)
    codes, uniques = pd.factorize(categories)
    every = np.arange(len(names))
    rows_full, rows_top = [], []
    for category in uniques:
        if category in degs:
            positions = names.get_indexer(list(degs[category]))
            positions = positions[positions >= 0]
            rows_full.append(np.unique(positions))
            rows_top.append(np.unique(positions[:n_deg_r2]))
        else:
            rows_full.append(every)
            rows_top.append(every)
    counts = np.bincount(codes, minlength=len(uniques))
    entries = int(sum(len(r) * c for r, c in zip(rows_full, counts)))
    if entries > DEG_MASK_LIMIT:
        warnings.warn(
            f"setup_anndata: obsm['deg_mask'] not written ({entries:,} entries: categories without a DEG list "
            "mask every gene); cpa-stream reads the DEG lists from uns", stacklevel=3,
        )
        return None

    def matrix(rows: list[np.ndarray]) -> Any:
        lengths = np.array([len(r) for r in rows])[codes]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.concatenate([rows[c] for c in codes]) if len(codes) else np.zeros(0, np.int64)
        return sp.csr_matrix((np.ones(len(indices), np.uint8), indices, indptr), shape=(len(codes), len(names)))

    return matrix(rows_full), matrix(rows_top)


def _pert_encoder(conditions: pd.Series, control: str) -> dict[str, int]:
    """cpa-tools' perturbation vocabulary: ``<PAD>``, the control, then the other perturbations
    (the ``+``-parts of the conditions) sorted."""
    parts = {p for c in conditions.astype(str).unique() for p in c.split("+") if p != control}
    return {name: i for i, name in enumerate([PAD, control, *sorted(parts)])}


def _perts_matrices(conditions: pd.Series, doses: pd.Series, encoder: Mapping[str, int], max_comb_len: int,
                    key: str) -> tuple[np.ndarray, np.ndarray]:
    """obsm ``perts`` / ``perts_doses``: per cell the perturbations' indices and doses, padded
    with 0 to ``max_comb_len``; computed once per distinct (condition, dose)."""
    pairs = pd.MultiIndex.from_arrays([conditions.to_numpy(), doses.to_numpy()])
    codes, uniques = pd.factorize(pairs)
    perts = np.zeros((len(uniques), max_comb_len), dtype=np.int64)
    values = np.zeros((len(uniques), max_comb_len), dtype=np.float64)
    for i, (condition, dose) in enumerate(uniques):
        names = str(condition).split("+")
        amounts = str(dose).split("+")
        if len(names) > max_comb_len:
            raise ValueError(f"setup_anndata: {key} {condition!r} has {len(names)} parts; max_comb_len is {max_comb_len}")
        for j, name in enumerate(names):
            perts[i, j] = encoder[name]
        for j, amount in enumerate(amounts[:max_comb_len]):
            try:
                values[i, j] = float(amount)
            except ValueError:
                raise ValueError(f"setup_anndata: dose {dose!r} of condition {condition!r} is not a number") from None
    return perts[codes], values[codes]


def _matrix_key(adata: Any, layer: str | None) -> tuple:
    """What identifies an AnnData's matrix as it is now: its file for a backed AnnData, else the
    object and a checksum of its values (so an X changed in place is seen)."""
    import hashlib

    import scipy.sparse as sp

    if getattr(adata, "isbacked", False):
        path = Path(adata.filename)
        stat = path.stat()
        return ("file", os.path.realpath(path), stat.st_size, stat.st_mtime_ns, layer)
    matrix = adata.layers[layer] if layer is not None else adata.X
    digest = hashlib.blake2b(digest_size=16)
    if sp.issparse(matrix):
        for part in (matrix.data, matrix.indices, matrix.indptr):
            digest.update(np.ascontiguousarray(part).view(np.uint8))
    else:
        digest.update(np.ascontiguousarray(np.asarray(matrix)).view(np.uint8))
    return ("memory", id(matrix), matrix.shape, layer, digest.hexdigest())


def _in_order(parts: list[np.ndarray], ids: list[np.ndarray], names: pd.Index, width: int) -> np.ndarray:
    """Rows in the order of ``names`` (the AnnData's cells) from batches keyed by cell id."""
    x = np.concatenate(parts) if parts else np.zeros((0, width), np.float32)
    got = pd.Index(np.concatenate(ids) if ids else np.array([], dtype=object))
    if len(got) == len(names) and (got == names.astype(str)).all():
        return x
    position = got.get_indexer(names.astype(str))
    if (position < 0).any():
        raise RuntimeError(f"prediction lacks {(position < 0).sum()} of the AnnData's cells")
    return x[position]


def _latent_anndata(x: np.ndarray, ids: np.ndarray, adata: Any) -> Any:
    import anndata as ad

    names = adata.obs_names
    x = _in_order([x], [ids], names, x.shape[1] if x.ndim == 2 else 0)
    out = ad.AnnData(X=x, obs=adata.obs.copy())
    out.obs_names = names
    return out
