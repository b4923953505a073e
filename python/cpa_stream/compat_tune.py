"""cpa-tools' ``run_autotune`` on :func:`cpa_stream.tune.tune` (``cpa.run_autotune``).

The search space is cpa-tools': ``{"model_args": {...}, "train_args": {...}}``, each value a Ray
Tune distribution (searched) or a plain value (fixed). Every trial turns its cpa-tools arguments
into cpa-stream's configuration with :func:`cpa_stream.translate.translate`, as ``CPA.train``
does, and trains on the store of the AnnData (imported once, not once per trial as cpa-tools
does). The result is a :class:`cpa_stream.tune.TuneResult` (the trials' table, the best
configuration, the best run), not scvi-tools' ``AutotuneExperiment``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The constructor arguments of ``CPA`` that are not module keys (fixed, never searched).
_CONSTRUCTOR = ("split_key", "train_split", "valid_split", "test_split", "use_rdkit_embeddings", "molecule_features")
#: cpa-tools' metric names that are cpa-stream's validation score (``val_score``).
_METRICS = ("cpa_metric", "val_score")


def _is_domain(value: Any) -> bool:
    """A Ray Tune search specification (a distribution or a grid), not a fixed value."""
    from ray.tune.search.sample import Domain

    return isinstance(value, Domain) or (isinstance(value, Mapping) and set(value) == {"grid_search"})


def run_autotune(
    model_cls: Any,
    data: Any,
    metrics: str | Sequence[str],
    mode: str,
    search_space: Mapping[str, Mapping[str, Any]],
    num_samples: int,
    scheduler: str = "asha",
    searcher: str = "hyperopt",
    seed: int | None = None,
    resources: Mapping[str, float] | None = None,
    experiment_name: str | None = None,
    logging_dir: str | None = None,
    scheduler_kwargs: Mapping[str, Any] | None = None,
    searcher_kwargs: Mapping[str, Any] | None = None,
    adata_path: str | None = None,
    sub_sample: float | None = None,
    setup_anndata_kwargs: Mapping[str, Any] | None = None,
    use_wandb: bool = False,
    wandb_name: str = "cpa_tune",
    plan_kwargs_keys: Sequence[str] = (),
) -> Any:
    """cpa-tools' ``run_autotune``: ``num_samples`` trainings of ``model_cls`` on ``data`` with
    settings drawn from ``search_space``, stopped early by ASHA on the validation score
    (cpa-tools' ``cpa_metric``, cpa-stream's ``val_score``: ``metrics`` must name it, ``mode``
    ``"max"``). ``train_args`` must fix ``max_epochs``; a ``train_args`` key named in
    ``plan_kwargs_keys`` goes to ``plan_kwargs``, as in cpa-tools. The trials' runs and table are
    written under ``logging_dir/experiment_name`` (default ``./cpa_autotune_<time>``). Returns
    :class:`cpa_stream.tune.TuneResult`. ``searcher="hyperopt"`` needs hyperopt installed;
    ``"random"`` needs nothing more. Refused, each with its reason: other schedulers than
    ``"asha"``, ``use_wandb``, ``adata_path`` (trials read the store the AnnData is imported into)."""
    import numpy as np

    from .tune import tune

    primary = [metrics] if isinstance(metrics, str) else list(metrics)
    if not primary or primary[0] not in _METRICS:
        raise ValueError(f"metrics {primary!r}: the primary metric must be one of {', '.join(_METRICS)} "
                         "(cpa-tools' cpa_metric is cpa-stream's validation score)")
    if mode != "max":
        raise ValueError(f"mode {mode!r}: the validation score is better when higher; use 'max'")
    if scheduler != "asha":
        raise NotImplementedError(f"scheduler {scheduler!r}: cpa-stream's search stops trials with ASHA ('asha')")
    if use_wandb:
        raise NotImplementedError("use_wandb=True: trials write their metrics to their run's metrics.parquet instead")
    if adata_path is not None:
        raise NotImplementedError("adata_path: pass the AnnData as data; it is imported once into a store")
    unknown = [k for k in search_space if k not in ("model_args", "train_args")]
    if unknown:
        raise ValueError(f"search_space key {unknown[0]!r}: expected 'model_args' and 'train_args'")
    model_args = dict(search_space.get("model_args", {}))
    train_args = dict(search_space.get("train_args", {}))
    fixed_model = {k: v for k, v in model_args.items() if not _is_domain(v)}
    fixed_train = {k: v for k, v in train_args.items() if not _is_domain(v)}
    searched = {"model_args": {k: v for k, v in model_args.items() if _is_domain(v)},
                "train_args": {k: v for k, v in train_args.items() if _is_domain(v)}}
    for key in _CONSTRUCTOR:
        if key in searched["model_args"]:
            raise ValueError(f"model_args {key!r}: a constructor argument is fixed, not searched")
    max_epochs = fixed_train.get("max_epochs")
    if max_epochs is None:
        raise ValueError("train_args: fix max_epochs (the length of each trial and of ASHA's schedule)")
    if setup_anndata_kwargs:
        model_cls.setup_anndata(data, **setup_anndata_kwargs)
    if sub_sample is not None:
        if not 0 < sub_sample <= 1:
            raise ValueError(f"sub_sample={sub_sample}: expected a fraction in (0, 1]")
        keep = np.sort(np.random.default_rng(seed).choice(data.n_obs, max(1, int(sub_sample * data.n_obs)), replace=False))
        data = data[keep].copy()
    constructor = {k: fixed_model.pop(k) for k in list(fixed_model) if k in _CONSTRUCTOR}
    model = model_cls(data, **constructor, **fixed_model)
    _, store = model._store_of(None)
    s = model._setup
    labels: dict[str, Any] = {
        "perturbation_key": s["perturbation_key"], "dosage_key": s.get("dosage_key"),
        "control_group": s["control_group"], "categorical_covariate_keys": s.get("categorical_covariate_keys", []),
        "batch_key": s.get("batch_key"),
    }
    if model.split_key is not None:
        from .compat import SPLIT_COLUMN

        labels["split_key"] = SPLIT_COLUMN
    name = experiment_name or f"cpa_autotune_{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(logging_dir or ".") / name
    search_alg = None
    if searcher == "hyperopt":
        try:
            from ray.tune.search.hyperopt import HyperOptSearch
        except ImportError as error:
            raise ImportError("searcher='hyperopt' needs hyperopt (pip install hyperopt), or pass "
                              "searcher='random'") from error
        search_alg = HyperOptSearch(random_state_seed=seed, **dict(searcher_kwargs or {}))
    elif searcher != "random":
        raise ValueError(f"searcher {searcher!r}: expected 'hyperopt' or 'random'")
    asha = dict(scheduler_kwargs or {})
    extra = [k for k in asha if k not in ("grace_period", "reduction_factor")]
    if extra:
        raise ValueError(f"scheduler_kwargs {extra[0]!r}: ASHA here takes grace_period and reduction_factor")
    return tune(
        store, out, search_space={k: v for k, v in searched.items() if v}, num_samples=num_samples,
        max_epochs=int(max_epochs), grace_period=int(asha.pop("grace_period", 2)),
        reduction_factor=int(asha.pop("reduction_factor", 3)), resources=resources, seed=seed,
        search_alg=search_alg, **labels,
        _cpa_tools={"model_args": {**model.hyper_params, **fixed_model}, "train_args": fixed_train,
                    "plan_kwargs_keys": list(plan_kwargs_keys), "max_comb_len": int(s.get("max_comb_len", 2))},
        _train={"preset": "reference", "allow_non_counts": not s.get("is_count_data", True)},
    )
