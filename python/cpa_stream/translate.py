"""cpa-tools' parameters as cpa-stream's configuration: the one translation.

cpa-tools 0.8.8 takes its settings in three places: the model's keyword arguments
(``CPA(adata, n_latent=..., ...)``, its ``CPAModule``), ``plan_kwargs`` (its
``CPATrainingPlan``) and the arguments of ``CPA.train``. :func:`translate` turns the three into
the ``[model]``, ``[adversary]`` and ``[training]`` tables of a cpa-stream configuration that
trains what cpa-tools trains with them: every key cpa-tools determines is set, from the caller's
value or cpa-tools' own default, as cpa-tools uses it (read from cpa-tools 0.8.8 and scvi-tools
0.20.3, not from their docstrings). ``cpa_stream.compat`` trains with it, ``python -m cpa_stream.fidelity``
compares the two tools with it, and docs/python.md's table is :func:`markdown_table`.

Where cpa-tools' behaviour cannot be reproduced, or is a defect that is not reproduced, the
difference is in :data:`PARAMETERS`' notes and :data:`DIFFERENCES`; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "DIFFERENCES", "MODULE_DEFAULTS", "PARAMETERS", "PLAN_DEFAULTS", "TRAIN_DEFAULTS", "Parameter",
    "markdown_table", "module_tables", "plan_tables", "train_tables", "translate",
]

#: ``CPAModule.__init__``'s defaults (what ``CPA(adata, **hyper_params)`` fills in).
MODULE_DEFAULTS: dict[str, Any] = {
    "n_latent": 128, "recon_loss": "nb", "doser_type": "logsigm",
    "n_hidden_encoder": 256, "n_layers_encoder": 3, "n_hidden_decoder": 256, "n_layers_decoder": 3,
    "n_hidden_doser": 128, "n_layers_doser": 2,
    "use_batch_norm_encoder": True, "use_layer_norm_encoder": False,
    "use_batch_norm_decoder": True, "use_layer_norm_decoder": False,
    "dropout_rate_encoder": 0.0, "dropout_rate_decoder": 0.0, "variational": False, "seed": 0,
}

#: ``CPATrainingPlan.__init__``'s defaults (what ``plan_kwargs`` overrides).
PLAN_DEFAULTS: dict[str, Any] = {
    "lr": 5e-4, "wd": 1e-6,
    "n_steps_pretrain_ae": None, "n_epochs_pretrain_ae": None,
    "n_steps_kl_warmup": None, "n_epochs_kl_warmup": None,
    "n_steps_adv_warmup": None, "n_epochs_adv_warmup": None,
    "n_epochs_mixup_warmup": None, "n_epochs_verbose": 10, "mixup_alpha": 0.0,
    "adv_steps": 3, "reg_adv": 1.0, "pen_adv": 1.0,
    "n_hidden_adv": 64, "n_layers_adv": 3, "use_batch_norm_adv": True, "use_layer_norm_adv": False,
    "dropout_rate_adv": 0.1, "adv_lr": 3e-4, "adv_wd": 4e-7, "doser_lr": 3e-4, "doser_wd": 4e-7,
    "step_size_lr": 45, "do_clip_grad": False, "gradient_clip_value": 3.0, "adv_loss": "cce",
}

#: ``CPA.train``'s defaults.
TRAIN_DEFAULTS: dict[str, Any] = {
    "max_epochs": None, "use_gpu": None, "train_size": 0.9, "validation_size": None, "batch_size": 128,
    "plan_kwargs": None, "save_path": None, "check_val_every_n_epoch": 10, "early_stopping_patience": 10,
}


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One of cpa-tools' parameters: where it is given, what it becomes in cpa-stream and how."""

    #: The name cpa-tools' users write.
    name: str
    #: ``model`` (``CPA(adata, ...)``), ``plan`` (``plan_kwargs``) or ``train`` (``CPA.train``).
    where: str
    #: The cpa-stream keys it sets, ``table.key``; empty where it sets none.
    keys: tuple[str, ...]
    #: What cpa-tools does with it, and so what cpa-stream is given.
    rule: str
    #: ``same``: cpa-stream does what cpa-tools does; ``differs``: see the rule.
    status: str = "same"


def _p(name: str, where: str, keys: str | tuple[str, ...], rule: str, status: str = "same") -> Parameter:
    return Parameter(name, where, (keys,) if isinstance(keys, str) else keys, rule, status)


#: Every parameter of cpa-tools' model, training plan and ``train``, in the order of docs' table.
PARAMETERS: tuple[Parameter, ...] = (
    _p("n_latent", "model", "model.n_latent", "as given"),
    _p("recon_loss", "model", "model.recon_loss", "as given, in lower case (cpa-tools lowers it too)"),
    _p("doser_type", "model", "model.doser_type", "as given"),
    _p("n_hidden_encoder", "model", "model.n_hidden_encoder", "as given"),
    _p("n_layers_encoder", "model", "model.n_layers_encoder", "as given"),
    _p("n_hidden_decoder", "model", "model.n_hidden_decoder", "as given"),
    _p("n_layers_decoder", "model", "model.n_layers_decoder", "as given"),
    _p("n_hidden_doser", "model", "model.n_hidden_doser", "as given (used by the `mlp` doser)"),
    _p("n_layers_doser", "model", "model.n_layers_doser", "as given (used by the `mlp` doser)"),
    _p("use_batch_norm_encoder, use_layer_norm_encoder", "model", "model.norm_encoder",
       "`batch`, `layer` or `none`; both at once (cpa-tools stacks the two) is refused", "differs"),
    _p("use_batch_norm_decoder, use_layer_norm_decoder", "model", "model.norm_decoder",
       "`batch`, `layer` or `none`; both at once is refused", "differs"),
    _p("dropout_rate_encoder", "model", "model.dropout_rate_encoder", "as given"),
    _p("dropout_rate_decoder", "model", "model.dropout_rate_decoder",
       "0 for `nb`/`zinb`: cpa-tools builds scvi's `DecoderSCVI` without it, so its decoder has no "
       "dropout whatever is given; as given for `gauss`"),
    _p("variational", "model", "model.variational", "as given"),
    _p("seed", "model", "training.seed",
       "as given; cpa-tools seeds torch's global generator, cpa-stream its own streams, so one number "
       "draws other initial weights, batches and dropout masks in the two tools", "differs"),
    _p("lr, wd", "plan", ("training.lr", "training.wd"), "as given (Adam, L2 weight decay)"),
    _p("doser_lr, doser_wd", "plan", ("training.doser_lr", "training.doser_wd"), "as given"),
    _p("adv_lr, adv_wd", "plan", ("training.adv_lr", "training.adv_wd"), "as given"),
    _p("n_epochs_pretrain_ae", "plan", "training.n_epochs_pretrain_ae",
       "None is 0. cpa-tools starts the adversarial term after epoch N (`current_epoch > N`) with a "
       "warm-up weight of (epoch - N) / warm-up: epoch N trains without it in both tools"),
    _p("n_epochs_kl_warmup", "plan", "training.n_epochs_kl_warmup",
       "None is 0 (KL weight 1 from the start); the ramp epoch / N (variational models only)"),
    _p("n_epochs_adv_warmup", "plan", "training.n_epochs_adv_warmup",
       "None is 0 (`reg_adv` from the start); the ramp reg_adv * (epoch - pretrain) / N"),
    _p("n_epochs_mixup_warmup", "plan", "training.n_epochs_mixup_warmup",
       "None is 0. With `n_epochs_pretrain_ae` also set, cpa-tools' ramp subtracts the epoch from "
       "itself and stays at 0 for good: no mixup at all, and so `mixup_alpha` becomes 0 here"),
    _p("mixup_alpha", "plan", "training.mixup_alpha",
       "as given, or 0 where cpa-tools' warm-up keeps it off (above)"),
    _p("adv_steps", "plan", "adversary.adv_steps",
       "None is 0: the autoencoder and then the adversary on every batch; k: batches whose index in "
       "the epoch is not a multiple of k train the adversary, the others the autoencoder"),
    _p("reg_adv, pen_adv", "plan", ("adversary.reg_adv", "adversary.pen_adv"), "as given"),
    _p("n_hidden_adv, n_layers_adv, dropout_rate_adv", "plan",
       ("adversary.n_hidden", "adversary.n_layers", "adversary.dropout_rate"), "as given"),
    _p("use_batch_norm_adv, use_layer_norm_adv", "plan", "adversary.norm",
       "`batch`, `layer` or `none`; both at once is refused", "differs"),
    _p("adv_loss", "plan", "adversary.loss", "`cce` or `focal` (gamma 2, cpa-tools' fixed value)"),
    _p("step_size_lr", "plan", ("training.step_size_lr", "training.lr_schedule"),
       "`lr_schedule = \"reference\"`: cpa-tools calls its `StepLR(step_size=step_size_lr, gamma=0.9)` "
       "every step_size_lr epochs, so the rates fall by 0.9 every step_size_lr^2 epochs. None "
       "(cpa-tools fails at epoch 2 with it) is no decay", "differs"),
    _p("do_clip_grad, gradient_clip_value", "plan", ("training.do_clip_grad", "training.gradient_clip_value"),
       "as given: the norm of each optimizer's gradients (autoencoder, dosers, adversaries) clipped apart"),
    _p("n_epochs_verbose", "plan", (), "changes only what cpa-tools prints; ignored with a warning", "differs"),
    _p("n_steps_pretrain_ae, n_steps_kl_warmup, n_steps_adv_warmup", "plan", (),
       "refused: cpa-stream counts warm-ups in epochs (give the `n_epochs_` key)", "differs"),
    _p("max_epochs", "train", "training.max_epochs",
       "as given; None is cpa-tools' rule min(round(20000 / cells * 400), 400)"),
    _p("batch_size", "train", "training.batch_size", "as given (the validation's batches too)"),
    _p("check_val_every_n_epoch", "train", "training.check_val_every_n_epoch", "as given"),
    _p("early_stopping_patience", "train", ("training.early_stopping_patience", "training.validation_score"),
       "as given, on cpa-tools' score `r2_mean + 0.5 r2_var + exp(disnt_after - disnt_basal)` "
       "(`validation_score = \"reference-knn\"`); the weights of the best validation are kept, as "
       "cpa-tools' `SaveBestState` restores them"),
    _p("train_size, validation_size", "train", (),
       "the random split where the model has no `split_key` (compat's store split)"),
    _p("use_gpu", "train", (), "the device: CUDA when asked for and present, else the CPU with a warning"),
    _p("save_path", "train", (), "where the model is saved after training (nothing is written without it)",
       "differs"),
)

#: What cpa-stream does otherwise than cpa-tools with every translation, and why.
DIFFERENCES: tuple[str, ...] = (
    "adversary class weights: cpa-tools weighs each condition by N / n_c - 1 counting every cell of the "
    "AnnData (held-out ones too); cpa-stream counts the training cells, the ones the adversary sees",
    "k-NN disentanglement: cpa-tools computes it per validation batch; cpa-stream too, on pieces of at most "
    "2,048 cells of a larger batch",
    "random streams: the same seed draws other numbers in the two tools (see `seed`)",
    "the last batch of an epoch: scvi-tools drops one of fewer than 3 cells; cpa-stream trains on it",
)

# cpa-stream keys that cpa-tools has no parameter for, set to what cpa-tools does.
_FIXED: dict[str, dict[str, Any]] = {
    "model": {"perturbation_skip": False, "dispersion_init": "random"},
    "adversary": {"focal_gamma": 2.0},
    "training": {
        "optimizer": "adam", "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "lr_decay": 0.9,
        "lr_schedule": "reference", "accumulate_batches": 1, "shuffle_run_cells": 1, "ema_decay": 0.0,
        "precision": "fp32", "validation_score": "reference-knn",
    },
}

_NORMS = {
    "encoder": ("use_batch_norm_encoder", "use_layer_norm_encoder"),
    "decoder": ("use_batch_norm_decoder", "use_layer_norm_decoder"),
}
_STEP_KEYS = ("n_steps_pretrain_ae", "n_steps_kl_warmup", "n_steps_adv_warmup")
_DISPLAY_KEYS = ("n_epochs_verbose",)


def _tables() -> dict[str, dict[str, Any]]:
    return {"model": {}, "adversary": {}, "training": {}}


def _norm(values: Mapping[str, Any], batch_key: str, layer_key: str) -> str:
    batch, layer = bool(values[batch_key]), bool(values[layer_key])
    if batch and layer:
        raise ValueError(
            f"{batch_key}=True and {layer_key}=True: cpa-tools stacks both norms, cpa-stream normalises a "
            "layer one way; choose one"
        )
    return "batch" if batch else "layer" if layer else "none"


def _none_is_zero(name: str, value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or int(value) != value:
        raise ValueError(f"{name}={value!r}: expected a whole number of epochs or None")
    return int(value)


def module_tables(hyper_params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The model's keyword arguments (``CPA(adata, **hyper_params)``) over cpa-tools' defaults, as
    cpa-stream's tables; an unknown key is a ``TypeError`` naming it, as cpa-tools raises."""
    unknown = [k for k in hyper_params if k not in MODULE_DEFAULTS]
    if unknown:
        raise TypeError(
            f"CPA(): unexpected keyword {unknown[0]!r}; the module keys are {', '.join(sorted(MODULE_DEFAULTS))}"
        )
    v = {**MODULE_DEFAULTS, **hyper_params}
    recon = str(v["recon_loss"]).lower()
    tables = _tables()
    m = tables["model"]
    for key in ("n_latent", "doser_type", "n_hidden_encoder", "n_layers_encoder", "n_hidden_decoder",
                "n_layers_decoder", "n_hidden_doser", "n_layers_doser", "dropout_rate_encoder", "variational"):
        m[key] = v[key]
    m["recon_loss"] = recon
    for part, (b, ln) in _NORMS.items():
        m[f"norm_{part}"] = _norm(v, b, ln)
    m["dropout_rate_decoder"] = 0.0 if recon in ("nb", "zinb") else v["dropout_rate_decoder"]
    tables["training"]["seed"] = v["seed"]
    return tables


def plan_tables(plan_kwargs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``plan_kwargs`` over cpa-tools' defaults, as cpa-stream's tables. Keys counted in steps are
    refused (cpa-stream counts epochs); display-only keys warn; an unknown key is an error."""
    for key in plan_kwargs:
        if key in _STEP_KEYS and plan_kwargs[key] is not None:
            raise ValueError(
                f"plan_kwargs[{key!r}]: cpa-stream counts warm-ups in epochs; give "
                f"{key.replace('n_steps_', 'n_epochs_')!r} instead"
            )
        if key in _DISPLAY_KEYS:
            warnings.warn(f"plan_kwargs[{key!r}] only changes cpa-tools' printing; ignored", stacklevel=3)
        elif key not in PLAN_DEFAULTS:
            raise ValueError(f"plan_kwargs: unknown key {key!r}; the keys are {', '.join(sorted(PLAN_DEFAULTS))}")
    v = {**PLAN_DEFAULTS, **plan_kwargs}
    for key in ("lr", "wd", "doser_lr", "doser_wd", "adv_lr", "adv_wd", "reg_adv", "pen_adv", "mixup_alpha",
                "gradient_clip_value", "dropout_rate_adv", "n_hidden_adv", "n_layers_adv", "adv_loss"):
        if v[key] is None:
            raise ValueError(f"plan_kwargs[{key!r}] = None: expected a value")
    tables = _tables()
    a, t = tables["adversary"], tables["training"]
    a.update({
        "n_hidden": v["n_hidden_adv"], "n_layers": v["n_layers_adv"], "dropout_rate": v["dropout_rate_adv"],
        "loss": str(v["adv_loss"]).lower(), "reg_adv": v["reg_adv"], "pen_adv": v["pen_adv"],
        "norm": _norm(v, "use_batch_norm_adv", "use_layer_norm_adv"),
    })
    steps = v["adv_steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"plan_kwargs['adv_steps'] = {steps!r}: expected None or a whole number, at least 1")
    a["adv_steps"] = 0 if steps is None else steps
    for key in ("lr", "wd", "doser_lr", "doser_wd", "adv_lr", "adv_wd", "do_clip_grad", "gradient_clip_value"):
        t[key] = v[key]
    t["do_clip_grad"] = bool(t["do_clip_grad"])
    pretrain = _none_is_zero("n_epochs_pretrain_ae", v["n_epochs_pretrain_ae"])
    mixup_warmup = _none_is_zero("n_epochs_mixup_warmup", v["n_epochs_mixup_warmup"])
    t["n_epochs_pretrain_ae"] = pretrain
    t["n_epochs_kl_warmup"] = _none_is_zero("n_epochs_kl_warmup", v["n_epochs_kl_warmup"])
    t["n_epochs_adv_warmup"] = _none_is_zero("n_epochs_adv_warmup", v["n_epochs_adv_warmup"])
    t["n_epochs_mixup_warmup"] = mixup_warmup
    # cpa-tools' `alpha_mixup`: with both a pre-training and a mixup warm-up, its epoch count is
    # the epoch minus itself, 0, and the ramp never leaves 0.
    t["mixup_alpha"] = 0.0 if pretrain and mixup_warmup else v["mixup_alpha"]
    t["step_size_lr"] = _none_is_zero("step_size_lr", v["step_size_lr"])
    return tables


def train_tables(
    *, n_cells: int | None = None, max_epochs: int | None = None, batch_size: int = TRAIN_DEFAULTS["batch_size"],
    check_val_every_n_epoch: int = TRAIN_DEFAULTS["check_val_every_n_epoch"],
    early_stopping_patience: int = TRAIN_DEFAULTS["early_stopping_patience"],
) -> dict[str, dict[str, Any]]:
    """``CPA.train``'s arguments as cpa-stream's ``[training]`` keys; ``max_epochs`` None takes
    cpa-tools' rule from ``n_cells``."""
    if max_epochs is None:
        if n_cells is None:
            raise ValueError("max_epochs=None needs the number of cells (cpa-tools' rule)")
        max_epochs = int(min(round(20000 / max(n_cells, 1) * 400), 400))
    for name, value, least in (("max_epochs", max_epochs, 1), ("batch_size", batch_size, 1),
                               ("check_val_every_n_epoch", check_val_every_n_epoch, 1),
                               ("early_stopping_patience", early_stopping_patience, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < least:
            raise ValueError(f"train({name}={value!r}): expected a whole number, at least {least}")
    tables = _tables()
    tables["training"].update({
        "max_epochs": int(max_epochs), "batch_size": int(batch_size),
        "check_val_every_n_epoch": int(check_val_every_n_epoch),
        "early_stopping_patience": int(early_stopping_patience),
    })
    return tables


def translate(
    model_params: Mapping[str, Any] | None = None,
    plan_kwargs: Mapping[str, Any] | None = None,
    *,
    n_cells: int | None = None,
    max_epochs: int | None = None,
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    check_val_every_n_epoch: int = TRAIN_DEFAULTS["check_val_every_n_epoch"],
    early_stopping_patience: int = TRAIN_DEFAULTS["early_stopping_patience"],
) -> dict[str, dict[str, Any]]:
    """The cpa-stream configuration that trains what cpa-tools 0.8.8 trains with these model
    parameters, ``plan_kwargs`` and ``train`` arguments: every key of the three tables that
    cpa-tools determines. (``model.max_comb_len`` comes from ``setup_anndata``, not from here.)

    >>> config = translate({"n_latent": 64, "recon_loss": "nb", "dropout_rate_decoder": 0.1},
    ...                    {"adv_steps": None, "step_size_lr": 10}, max_epochs=40, batch_size=512)
    >>> config["model"]["dropout_rate_decoder"], config["adversary"]["adv_steps"]
    (0.0, 0)
    >>> config["training"]["lr_schedule"], config["training"]["validation_score"]
    ('reference', 'reference-knn')
    """
    config = _tables()
    for part in (
        _FIXED,
        module_tables(model_params or {}),
        plan_tables(plan_kwargs or {}),
        train_tables(n_cells=n_cells, max_epochs=max_epochs, batch_size=batch_size,
                     check_val_every_n_epoch=check_val_every_n_epoch, early_stopping_patience=early_stopping_patience),
    ):
        for table, keys in part.items():
            config[table].update(keys)
    return config


def markdown_table(escape: Callable[[str], str] = lambda s: s.replace("|", "\\|")) -> str:
    """:data:`PARAMETERS` as the Markdown table of docs/python.md."""
    lines = ["| cpa-tools | given to | cpa-stream | what it does | |", "| --- | --- | --- | --- | --- |"]
    for p in PARAMETERS:
        keys = ", ".join(f"`{k}`" for k in p.keys) or "-"
        where = {"model": "`CPA(adata, ...)`", "plan": "`plan_kwargs`", "train": "`train()`"}[p.where]
        names = ", ".join(f"`{n}`" for n in p.name.split(", "))
        lines.append(f"| {names} | {where} | {keys} | {escape(p.rule)} | {p.status} |")
    return "\n".join(lines)
