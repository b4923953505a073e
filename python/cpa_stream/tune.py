"""Hyper-parameter search on Ray Tune: cpa-stream trainings as Tune trials, stopped early by ASHA
on the validation score they report as they train.

::

    import ray
    from ray import tune
    import cpa_stream as cs
    from cpa_stream.tune import tune as search

    ray.init()                                      # or ray.init(address="auto") on a cluster
    result = search(
        "atlas.store", "tuning/",
        perturbation_key="condition", dosage_key="dose", control_group="control",
        categorical_covariate_keys=["cell_type"],
        search_space={"model": {"n_latent": tune.choice([32, 64, 128])},
                      "adversary": {"reg_adv": tune.loguniform(1, 50)},
                      "training": {"lr": tune.loguniform(1e-4, 1e-2)}},
        num_samples=20, max_epochs=50, resources={"cpu": 1},
    )
    result.table            # one row per trial: its settings, score, epochs, status
    result.best_config      # the configuration tables of the best trial
    result.best_run         # a cs.Run: tuning/best, a copy of the best trial's run

From a shell: ``python -m cpa_stream.tune --store S --out D --space space.json [...]`` with the
space as JSON (``{"training": {"lr": {"loguniform": [1e-4, 1e-2]}}}``; ``choice``, ``uniform``,
``loguniform``, ``randint``, ``grid``).

Each trial trains in its own run directory (``out/trials/<trial>/run``) ``report_every`` epochs at
a time (``resume`` extends the run: the weights, optimizer and data order go on exactly as one
uninterrupted training would), reports ``val_score`` (the run's validation score, higher is
better) and the validation R2s after each step, and is stopped when ASHA says so. Every node must
see the store and ``out`` at the same paths (a shared file system) and have ``cpa_stream``
installed. Ray is optional: ``pip install 'cpa-stream[tune]'``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ._run import Run
from ._store import PathLike, store_of

__all__ = ["TuneResult", "tune", "main"]

#: What trials report and ASHA compares: the validation score of the run (higher is better).
METRIC = "val_score"
#: The configuration tables a search space may set.
TABLES = ("model", "adversary", "training")


@dataclass
class TuneResult:
    """What :func:`tune` found."""

    #: One row per trial: ``trial``, each searched key (``table.key``), ``val_score`` (its best),
    #: ``epochs`` trained, ``best_epoch``, ``status`` (``completed`` / ``stopped`` by ASHA /
    #: ``error``) and its run directory.
    table: pd.DataFrame
    #: The best trial's searched settings, as configuration tables.
    best_config: dict[str, dict[str, Any]]
    #: The best trial's run, copied to ``out/best``.
    best_run: Run


def _ray() -> Any:
    try:
        import ray
        from ray import tune as ray_tune
    except ImportError as error:
        raise ImportError("hyper-parameter search needs Ray Tune: pip install 'cpa-stream[tune]'") from error
    return ray, ray_tune


def _check_space(space: Mapping[str, Any]) -> None:
    unknown = [t for t in space if t not in TABLES]
    if unknown:
        raise ValueError(f"search_space: unknown table {unknown[0]!r}; the tables are {', '.join(TABLES)}")
    for table, keys in space.items():
        if not isinstance(keys, Mapping) or not keys:
            raise ValueError(f"search_space[{table!r}]: expected a dict of keys to search")


#: The tables of a search space: cpa-stream's configuration tables, or cpa-tools' two
#: (``cpa.run_autotune``).
SPACE_TABLES = (*TABLES, "model_args", "train_args")


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{t}.{k}": v for t, keys in config.items() if t in SPACE_TABLES for k, v in keys.items()}


def _best(history: pd.DataFrame) -> tuple[float, int | None]:
    scores = history.get(METRIC)
    if scores is None or scores.dropna().empty:
        return (-math.inf, None)
    i = scores.idxmax()
    return (float(scores[i]), int(history.loc[i, "epoch"]))


def _trial(config: dict[str, Any], settings: dict[str, Any]) -> None:
    """One Tune trial: a cpa-stream training extended ``report_every`` epochs at a time, each
    step's validation reported."""
    from ray import tune as ray_tune

    from ._run import train

    context = ray_tune.get_context()
    run_dir = Path(settings["out"]) / "trials" / context.get_trial_id() / "run"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if settings.get("cpa_tools") is not None:
        base = _translated(config, settings["cpa_tools"], settings["max_epochs"])
    else:
        base = json.loads(json.dumps(settings["config"] or {}))
        for table in TABLES:
            if table in config:
                base.setdefault(table, {}).update(config[table])
    resources = context.get_trial_resources()
    cpus = int(resources.required_resources.get("CPU", 1) or 1)
    # A trial given a GPU trains on it (``device`` names which CUDA device form), the others on the CPU.
    gpu = resources.required_resources.get("GPU", 0)
    device = (settings["device"] if settings["device"].startswith("cuda") else "cuda") if gpu else "cpu"
    step, last = settings["report_every"], settings["max_epochs"]
    trained = 0
    for epochs in [*range(step, last, step), last]:
        # A resumed run keeps its checkpoint's configuration: given once, at the start.
        run = train(
            settings["store"], run_dir, config=base if trained == 0 else None, max_epochs=epochs, resume=trained > 0,
            overwrite=trained == 0, threads=cpus, workers=1, device=device, progress=False,
            **(settings.get("train", {}) if trained == 0 else {}), **settings["labels"],
        )
        history = run.history
        done = int(history["epoch"].max()) + 1 if len(history) else 0
        last_row = history.iloc[-1]
        metrics = {
            METRIC: float(last_row.get(METRIC)) if pd.notna(last_row.get(METRIC)) else -math.inf,
            "val_r2_mean": float(last_row.get("val_r2_mean", math.nan)),
            "epoch": done, "recon_loss": float(last_row.get("recon_loss", math.nan)),
        }
        ray_tune.report(metrics)
        if done <= trained or done < epochs:
            # cpa-stream's own early stopping ended the run.
            break
        trained = done


def _translated(config: Mapping[str, Any], fixed: Mapping[str, Any], max_epochs: int) -> dict[str, Any]:
    """A trial's configuration from cpa-tools' arguments (``run_autotune``): the sampled
    ``model_args`` / ``train_args`` over the fixed ones, through :func:`cpa_stream.translate.translate`."""
    from . import translate

    model_args = {**fixed["model_args"], **config.get("model_args", {})}
    train_args = {**fixed["train_args"], **config.get("train_args", {})}
    plan = dict(train_args.pop("plan_kwargs", None) or {})
    for key in fixed["plan_kwargs_keys"]:
        if key in train_args:
            plan[key] = train_args.pop(key)
    train_args.pop("max_epochs", None)
    known = ("batch_size", "check_val_every_n_epoch", "early_stopping_patience")
    unknown = [k for k in train_args if k not in known]
    if unknown:
        raise ValueError(
            f"train_args key {unknown[0]!r}: not one of CPA.train's tuned arguments ({', '.join(known)}, max_epochs); "
            "a plan_kwargs key goes in plan_kwargs_keys"
        )
    base = translate.translate(model_args, plan, max_epochs=max_epochs, **{k: train_args[k] for k in known if k in train_args})
    base["model"]["max_comb_len"] = fixed["max_comb_len"]
    return base


def tune(
    store: Any,
    out: PathLike,
    *,
    search_space: Mapping[str, Mapping[str, Any]],
    perturbation_key: str | None = None,
    dosage_key: str | None = None,
    control_group: str | None = None,
    categorical_covariate_keys: Sequence[str] = (),
    batch_key: str | None = None,
    split_key: str | None = None,
    holdout: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    num_samples: int = 10,
    max_epochs: int = 50,
    report_every: int = 1,
    grace_period: int = 2,
    reduction_factor: int = 3,
    resources: Mapping[str, float] | None = None,
    device: str = "cpu",
    max_concurrent_trials: int | None = None,
    search_alg: Any = None,
    seed: int | None = None,
    overwrite: bool = False,
    _cpa_tools: Mapping[str, Any] | None = None,
    _train: Mapping[str, Any] | None = None,
) -> TuneResult:
    """Runs ``num_samples`` trials of cpa-stream training on Ray Tune (ASHA, like cpa-tools'
    ``run_autotune``) and returns the table of trials, the best configuration and the best run
    (copied to ``out/best``).

    ``search_space`` holds Tune distributions per configuration table: ``{"model": {"n_latent":
    tune.choice([32, 64])}, "adversary": {"reg_adv": tune.loguniform(1, 50)}, "training": {"lr":
    tune.loguniform(1e-4, 1e-2)}}`` (any key of docs/model.md); ``config`` the fixed tables the
    trials start from. The labels (``perturbation_key``, ...) and split are :func:`cpa_stream.train`'s.
    Each trial trains up to ``max_epochs`` and reports its validation score every
    ``report_every`` epochs; ASHA stops the worse trials at rungs from ``grace_period`` with
    ``reduction_factor``. ``resources`` per trial: ``{"cpu": 1}`` (the default; the trial's
    libtorch threads) or a GPU fraction ``{"cpu": 1, "gpu": 0.25}``: trials with a GPU train on
    it (``device``, ``"cpu"`` by default as in :func:`cpa_stream.train`, then means ``"cuda"``),
    the others on the CPU.
    ``search_alg`` is any Tune searcher (default random search; ``seed`` seeds it and each
    trial's training). Ray must be initialised (``ray.init()``) or is started locally.
    ``out`` must not exist unless ``overwrite``."""
    ray, ray_tune = _ray()
    from ray.tune.schedulers import ASHAScheduler

    if _cpa_tools is None:
        _check_space(search_space)
    if max_epochs < 1 or report_every < 1:
        raise ValueError("max_epochs and report_every must be at least 1")
    out = Path(out).absolute()
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out}: exists; pass overwrite=True to replace a previous search")
        if not (out / "trials.parquet").is_file() and any(out.iterdir()):
            raise FileExistsError(f"{out}: a directory with other files; tune into a new or empty directory")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    fixed = json.loads(json.dumps(dict(config or {})))
    if seed is not None:
        fixed.setdefault("training", {})["seed"] = int(seed)
    settings = {
        "store": os.path.abspath(store_of(store)), "out": str(out), "config": fixed, "device": device,
        "max_epochs": int(max_epochs), "report_every": int(report_every),
        "labels": {
            "perturbation_key": perturbation_key, "dosage_key": dosage_key, "control_group": control_group,
            "categorical_covariate_keys": list(categorical_covariate_keys), "batch_key": batch_key,
            "split_key": split_key, "holdout": list(holdout),
        },
        "cpa_tools": dict(_cpa_tools) if _cpa_tools is not None else None,
        "train": dict(_train or {}),
    }
    wanted = {k.upper() if k in ("cpu", "gpu") else k: v for k, v in (resources or {"cpu": 1}).items()}
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    if search_alg is None:
        from ray.tune.search import BasicVariantGenerator

        # Random search (Tune's default), seeded, and limited here: Tune ignores
        # max_concurrent_trials with a generator instance.
        search_alg = BasicVariantGenerator(
            random_state=int(seed) if seed is not None else None, max_concurrent=max_concurrent_trials or 0
        )
        max_concurrent_trials = None
    scheduler = ASHAScheduler(
        time_attr="training_iteration", max_t=-(-max_epochs // report_every), grace_period=grace_period,
        reduction_factor=reduction_factor,
    )
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(_trial, settings=settings), {k.lower(): v for k, v in wanted.items()}
    )
    tuner = ray_tune.Tuner(
        trainable,
        param_space={t: dict(keys) for t, keys in search_space.items()},
        tune_config=ray_tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, num_samples=num_samples, search_alg=search_alg,
            max_concurrent_trials=max_concurrent_trials,
        ),
        run_config=ray_tune.RunConfig(name="ray", storage_path=str(out), verbose=0),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        trial = str(result.metrics.get("trial_id")) if result.metrics else None
        trial_dir = out / "trials" / str(trial) / "run"
        row: dict[str, Any] = {"trial": trial, **_flat(result.config or {})}
        history = Run(trial_dir).history if (trial_dir / "metrics.parquet").is_file() else pd.DataFrame()
        score, best_epoch = _best(history)
        row.update({METRIC: score, "epochs": len(history), "best_epoch": best_epoch})
        row["status"] = "error" if result.error else ("completed" if len(history) >= max_epochs else "stopped")
        row["run"] = str(trial_dir)
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(METRIC, ascending=False, ignore_index=True)
    table.to_parquet(out / "trials.parquet", index=False)
    usable = table[(table["status"] != "error") & table[METRIC].gt(-math.inf)]
    if usable.empty:
        errors = [str(r.error) for r in grid if r.error]
        raise RuntimeError(f"tune: no trial produced a validation score{': ' + errors[0] if errors else ''}")
    best = usable.iloc[0]
    best_config: dict[str, dict[str, Any]] = {}
    for column in table.columns:
        if "." in column and column.split(".", 1)[0] in SPACE_TABLES:
            t, k = column.split(".", 1)
            value = best[column]
            best_config.setdefault(t, {})[k] = value.item() if hasattr(value, "item") else value
    tmp = out / ".best.tmp"
    shutil.copytree(best["run"], tmp)
    os.replace(tmp, out / "best")
    (out / "best_config.json").write_text(json.dumps(best_config, indent=1))
    return TuneResult(table=table, best_config=best_config, best_run=Run(out / "best"))


_DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")


def space_from_json(space: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A search space written as JSON (``{"training": {"lr": {"loguniform": [1e-4, 1e-2]}}}``) as
    Tune distributions; a plain value is fixed."""
    _, ray_tune = _ray()
    makers = {
        "choice": lambda v: ray_tune.choice(v), "uniform": lambda v: ray_tune.uniform(*v),
        "loguniform": lambda v: ray_tune.loguniform(*v), "randint": lambda v: ray_tune.randint(*v),
        "grid": lambda v: ray_tune.grid_search(v),
    }
    out: dict[str, dict[str, Any]] = {}
    for table, keys in space.items():
        for key, value in keys.items():
            if isinstance(value, Mapping):
                if len(value) != 1 or next(iter(value)) not in makers:
                    raise ValueError(
                        f"{table}.{key}: expected one of {', '.join(_DISTRIBUTIONS)} as the only key, got {list(value)}"
                    )
                kind, args = next(iter(value.items()))
                out.setdefault(table, {})[key] = makers[kind](args)
            else:
                out.setdefault(table, {})[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m cpa_stream.tune``: a search from the shell; prints the trials and the best."""
    parser = argparse.ArgumentParser(prog="python -m cpa_stream.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="a store, or an .h5ad file")
    parser.add_argument("--out", required=True, type=Path, help="the search's directory (trials/, best/)")
    parser.add_argument("--space", required=True, type=Path, help="the search space as JSON")
    parser.add_argument("--perturbation-key")
    parser.add_argument("--dose-key")
    parser.add_argument("--control")
    parser.add_argument("--covariates", nargs="*", default=[])
    parser.add_argument("--batch-key")
    parser.add_argument("--split-key")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--report-every", type=int, default=1)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--cpus-per-trial", type=float, default=1)
    parser.add_argument("--gpus-per-trial", type=float, default=0)
    parser.add_argument("--address", help="a Ray cluster to join (default: start one here)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        space = space_from_json(json.loads(args.space.read_text()))
        ray, _ = _ray()
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        resources = {"cpu": args.cpus_per_trial}
        if args.gpus_per_trial:
            resources["gpu"] = args.gpus_per_trial
        result = tune(
            args.store, args.out, search_space=space, perturbation_key=args.perturbation_key,
            dosage_key=args.dose_key, control_group=args.control, categorical_covariate_keys=args.covariates,
            batch_key=args.batch_key, split_key=args.split_key, num_samples=args.samples, max_epochs=args.epochs,
            report_every=args.report_every, grace_period=args.grace_period, reduction_factor=args.reduction_factor,
            resources=resources, seed=args.seed, max_concurrent_trials=args.max_concurrent, overwrite=args.overwrite,
        )
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(result.table.drop(columns="run").to_string(index=False))
    print(f"best: {json.dumps(result.best_config)} -> {result.best_run.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
