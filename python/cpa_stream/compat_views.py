"""What a :mod:`cpa_stream.compat` model shows of itself as cpa-tools' does: ``epoch_history``
(from the run's ``metrics.parquet``), ``module`` and ``adata_manager``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import translate

if TYPE_CHECKING:
    from .compat import CPA

#: cpa-tools 0.8.8's ``epoch_history`` columns, in its order.
HISTORY_COLUMNS = [
    "recon_loss", "KL", "disnt_basal", "disnt_after", "r2_mean", "r2_var", "adv_loss", "penalty_adv", "adv_perts",
    "acc_perts", "penalty_perts", "epoch", "mode",
]


def _epoch_history(history: pd.DataFrame, covariates: dict | None = None) -> pd.DataFrame:
    """cpa-tools' ``epoch_history``: per epoch a ``valid`` row (when the epoch was validated) and
    a ``train`` row, with cpa-tools' columns, and ``adv_<covariate>``, ``penalty_<covariate>``,
    ``acc_<covariate>`` for each covariate of more than one value (cpa-tools' order: after its
    metrics, before ``epoch`` and ``mode``). The training rows hold the training R2 and each
    adversary's figures as the engine records them (``metrics.parquet``); the validation rows
    hold no adversary figures (NaN, as cpa-tools' do)."""
    heads = [k for k, v in (covariates or {}).items() if len(v) > 1]

    def named(prefix: str, key: str) -> str:
        # `covariate_` before a name that would repeat a column (the engine names it so too).
        plain = f"{prefix}_{key}"
        return f"{prefix}_covariate_{key}" if plain in HISTORY_COLUMNS else plain

    head_columns = [named(p, k) for k in heads for p in ("adv", "penalty", "acc")]
    columns = HISTORY_COLUMNS[:-2] + head_columns + HISTORY_COLUMNS[-2:]
    rows = []
    for _, r in history.iterrows():
        if "val_score" in r and pd.notna(r.get("val_score")):
            rows.append({
                "recon_loss": r.get("val_recon_loss"), "r2_mean": r.get("val_r2_mean"), "r2_var": r.get("val_r2_var"),
                "disnt_basal": r.get("val_disnt_basal"), "disnt_after": r.get("val_disnt_after"),
                "epoch": int(r["epoch"]), "mode": "valid",
            })
        row = {name: r.get(name) for name in (
            "recon_loss", "adv_loss", "penalty_adv", "acc_perts", "r2_mean", "r2_var", "adv_perts", "penalty_perts")}
        for key in heads:
            for prefix in ("adv", "penalty", "acc"):
                renamed = f"{prefix}_covariate_{key}"
                row[named(prefix, key)] = r.get(renamed) if renamed in r.index else r.get(f"{prefix}_{key}")
        rows.append({**row, "KL": r.get("kl"), "epoch": int(r["epoch"]), "mode": "train"})
    frame = pd.DataFrame(rows, columns=columns)
    numeric = [c for c in columns if c not in ("epoch", "mode")]
    frame[numeric] = frame[numeric].astype(float)
    return frame


class _ModuleView:
    """What ``CPA.module`` offers (see there)."""

    def __init__(self, model: CPA) -> None:
        settings = {**translate.MODULE_DEFAULTS, **model.hyper_params}
        for key, value in settings.items():
            setattr(self, key, value)
        self.n_genes = model.adata.n_vars
        self.n_perts = len(model.pert_encoder)
        self.covars_encoder = {k: dict(v) for k, v in model.covars_encoder.items()}
        self._model = model

    def eval(self) -> _ModuleView:
        return self

    def train(self, mode: bool = True) -> _ModuleView:
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """The trained weights (``model/weights.safetensors`` of the run), name to array."""
        run = self._model._trained()
        return _read_safetensors(run.path / "model" / "weights.safetensors")

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={getattr(self, k)!r}" for k in translate.MODULE_DEFAULTS)
        return f"CPAModule view (cpa-stream engine; {keys})"


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays (its 8-byte header length, JSON header, then the
    tensors' bytes; little-endian)."""
    kinds = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1", "I8": "i1"}
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in kinds:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which this reader does not decode")
        start, end = entry["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=kinds[entry["dtype"]]).reshape(entry["shape"]).copy()
    return out


class _AnnDataManager:
    """What ``CPA.adata_manager`` offers (see there)."""

    def __init__(self, model: CPA) -> None:
        self.adata = model.adata
        self._setup = dict(model._setup)
        self.registry = {"model_name": "CPA", "setup_method_name": "setup_anndata", "setup_args": dict(model._setup)}

    def view_registry(self, hide_state_registries: bool = False) -> None:
        print("setup_anndata arguments:")
        for key, value in self._setup.items():
            print(f"  {key}: {value}")

    def get_from_registry(self, registry_key: str) -> Any:
        """The data behind a key: ``X`` (the matrix the model reads: the layer of the setup or
        ``X``), an obs column named in the setup, or an obsm key (``perts``, ``perts_doses``)."""
        if registry_key == "X":
            layer = self._setup.get("layer")
            return self.adata.layers[layer] if layer else self.adata.X
        if registry_key in self.adata.obsm:
            return self.adata.obsm[registry_key]
        named = [self._setup.get(k) for k in ("perturbation_key", "dosage_key", "batch_key", "deg_uns_cat_key")]
        named += list(self._setup.get("categorical_covariate_keys", []))
        if registry_key in named and registry_key in self.adata.obs:
            return self.adata.obs[registry_key].to_numpy()
        raise KeyError(f"{registry_key!r}: not in the registry; it has X, {', '.join(str(k) for k in named if k)}"
                       f", {', '.join(self.adata.obsm)}")

