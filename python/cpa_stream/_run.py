"""Training runs: ``train`` and what a run can do (history, predictions, latents, evaluation,
embeddings)."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import _args, _native, _openmp, _progress, distributed
from ._store import PathLike, Store, store_of, table_to_pandas

if TYPE_CHECKING:
    import anndata

#: Latents a prediction can carry (``latents=``).
LATENTS = ("z_basal", "z", "z_corrected", "z_no_pert", "z_no_pert_corrected")
#: Schema metadata key of the predicted genes (a JSON list).
GENES_KEY = b"cpa_stream.genes"
#: The column of ``expected_log1p=True``: E[log1p(x)] of each predicted count distribution.
EXPECTED_LOG1P = "expected_log1p"
#: The column of ``change=True``: E[log1p(x)] under the target minus under the cell's own condition.
CHANGE_LOG1P = "change_log1p"
#: The column of the anchored prediction (with targets, by default): a control source cell's
#: observed log1p counts plus the model's predicted change; ``log1p(mean)`` where not anchored.
ANCHORED = "anchored"
#: The Boolean column saying, per row, whether ``anchored`` is anchored on its source cell.
IS_ANCHORED = "is_anchored"

Targets = str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]] | pd.DataFrame | None


def _path(p: Store | PathLike | Any) -> str:
    """A store argument: a Store, a store's path, an .h5ad path or an AnnData (whose store is
    found or made, :func:`cpa_stream._store.store_of`)."""
    return store_of(p)


def _compute(device: str, threads: int | None, workers: int | None = None) -> dict[str, Any]:
    """Where a command runs, as the requests' ``compute`` field."""
    return {"device": device, "threads": threads, "workers": workers}


def _plots(plots: bool | None, out: PathLike | None) -> bool | None:
    """``plots`` of a request: the library's default (drawn) when the caller keeps the files,
    none drawn into a temporary directory nobody reads."""
    if plots is None:
        return None if out is not None else False
    return bool(plots)


def train(
    store: Store | PathLike | anndata.AnnData,
    out: PathLike,
    *,
    perturbation_key: str | None = None,
    dosage_key: str | None = None,
    control_group: str | None = None,
    categorical_covariate_keys: Sequence[str] = (),
    batch_key: str | None = None,
    split_key: str | None = None,
    holdout: Sequence[str] = (),
    validation_fraction: float | None = None,
    test_fraction: float | None = None,
    split_seed: int | None = None,
    config: Mapping[str, Any] | PathLike | None = None,
    preset: str | None = None,
    perturbation_features: PathLike | pd.DataFrame | None = None,
    max_epochs: int | None = None,
    batch_size: int | str | None = None,
    seed: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    allow_non_counts: bool = False,
    checkpoint_every: float | None = None,
    progress: bool | None = None,
) -> Run:
    """Trains CPA on ``store`` into the run directory ``out`` and returns the :class:`Run`.

    ``store`` is a :class:`Store`, a store's path, an ``.h5ad`` path or an AnnData (in memory or
    backed): an AnnData or file already imported with :func:`import_h5ad` trains on that store,
    others are imported once into ``$CPA_STREAM_CACHE/stores`` and found there again (the same
    holds for every method of :class:`Run` that takes a store).

    The obs columns (cpa-tools' names): ``perturbation_key`` (conditions such as ``"A+B"``,
    default ``"condition"``), ``dosage_key`` (``"0.1+1"``; without it every dose is 1),
    ``control_group`` (default ``"control"``), ``categorical_covariate_keys`` and ``batch_key``
    (left out of the corrected latents). The split: ``split_key`` (an obs column of
    train / valid / test / ood), else ``validation_fraction`` and ``test_fraction`` of each
    condition (0.1 each) with the conditions in ``holdout`` held out entirely, drawn with
    ``split_seed`` (default: ``seed``; runs given the same one split alike whatever their
    ``seed``, as the runs of an ensemble, :meth:`Run.predict`'s ``ensemble``, should).

    ``config`` is a dict of the TOML file's tables (``{"model": {...}, "training": {...}}``;
    missing keys take the defaults), a path to such a file, or ``None`` for the defaults.
    ``preset`` changes the defaults the configuration starts from: ``"reference"`` behaves as
    cpa-tools 0.8.8 where the defaults differ from it (its module defaults, its learning-rate
    schedule, no weight averaging); ``"unseen-covariates"`` adds the perturbation skip, a latent
    of 128 and the dose response chosen from the data (log-sigmoid where perturbations have
    several doses, linear with one), for cell types whose perturbed cells training never saw: ahead
    of the defaults on each of six held-out cell types of real PBMCs and on two synthetic drug x
    dose atlases (docs/fidelity.md, "Unseen cell types with several doses").
    ``max_epochs``, ``batch_size`` (or ``"auto"`` on CUDA) and ``seed`` override it.

    ``perturbation_features`` is a Parquet or CSV table with one row per perturbation (a name
    column, then numbers: e.g. RDKit descriptors or fingerprint bits), or such a DataFrame indexed
    by perturbation (:func:`cpa_stream.chem.molecule_features` makes one from SMILES); the model
    projects them instead of learning a free embedding per perturbation, and perturbations of the
    table without cells can then be predicted (cpa-tools' drug embeddings, trained here).

    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``threads`` libtorch's threads (note:
    libtorch's thread count is per process, so this also sets PyTorch's) and ``workers`` the
    batcher's, planned from the usable CPUs when ``None``. With the same seed, threads and
    workers, the weights are byte-identical to the CLI's.

    An existing run at ``out`` is an error unless ``overwrite`` (start again) or ``resume``
    (continue from its checkpoint with its recorded settings; settings given must agree). The
    checkpoint is written after the first epoch that ends ``checkpoint_every`` seconds after the
    last one (default 10; 0: after every epoch), after the last epoch, at an early stop and on
    an interruption; a run killed outright resumes from it exactly.
    Runs on the calling thread with the GIL released; a progress bar shows in Jupyter and on a
    terminal. Ctrl-C (KeyboardInterrupt) stops after the current step with a checkpoint, as the
    CLI does, and returns the run with ``interrupted`` set (continue with ``resume=True``).
    """
    if isinstance(config, Mapping):
        config_value: Any = dict(config)
    elif config is None:
        config_value = None
    else:
        config_value = os.fspath(config)
    if isinstance(batch_size, int):
        batch_size = str(batch_size)
    if isinstance(perturbation_features, pd.DataFrame):
        from . import chem

        # The run keeps the features in its checkpoint: the table is only read at the start.
        with tempfile.TemporaryDirectory(prefix="cpa-stream-features-") as scratch:
            table = chem.write(perturbation_features, Path(scratch) / "features.parquet")
            return train(
                store, out, perturbation_key=perturbation_key, dosage_key=dosage_key, control_group=control_group,
                categorical_covariate_keys=categorical_covariate_keys, batch_key=batch_key, split_key=split_key,
                holdout=holdout, validation_fraction=validation_fraction, test_fraction=test_fraction,
                split_seed=split_seed, config=config, preset=preset, perturbation_features=table, max_epochs=max_epochs,
                batch_size=batch_size, seed=seed, device=device, threads=threads, workers=workers, resume=resume,
                overwrite=overwrite, allow_non_counts=allow_non_counts, checkpoint_every=checkpoint_every,
                progress=progress,
            )
    place = distributed.join(device)
    request = {
        "store": _path(store),
        "out": os.fspath(out),
        "perturbation_key": perturbation_key,
        "dose_key": dosage_key,
        "control": control_group,
        "covariates": _args.names("categorical_covariate_keys", categorical_covariate_keys),
        "batch_key": batch_key,
        "split_key": split_key,
        "holdout": _args.names("holdout", holdout),
        "validation_fraction": validation_fraction,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "preset": preset,
        "perturbation_features": os.fspath(perturbation_features) if perturbation_features is not None else None,
        "epochs": max_epochs,
        "batch_size": batch_size,
        "seed": seed,
        "resume": resume,
        "overwrite": overwrite,
        "allow_non_counts": allow_non_counts,
        "checkpoint_every": checkpoint_every,
        "compute": _compute(place.device, threads, workers),
        "process_group": place.group,
        "naming": "keywords",
    }
    if config_value is not None:
        request["config"] = config_value
    as_json = _args.request(request, {"covariates": "categorical_covariate_keys", "epochs": "max_epochs"})
    # The other ranks show no progress of their own: rank 0's bar is the run's.
    report = json.loads(_openmp.compute("train", as_json, _progress.make(progress if place.rank == 0 else False, "train")))
    if place.group is not None:
        # Rank 0 publishes the run after the others have stepped their last batch.
        distributed.barrier()
    run = Run(out)
    run.report = report
    if report.get("interrupted"):
        warnings.warn(
            f"{os.fspath(out)}: training interrupted after {len(report.get('epochs', []))} epoch(s); "
            "the checkpoint is kept (continue with resume=True)",
            stacklevel=2,
        )
    return run


def _target_specs(targets: Targets) -> list[str]:
    """Targets as the CLI's ``--target`` strings: ``"A+B"``, ``"condition=A+B,dose=1+1,cell_type=K562"``,
    a dict of the same keys, a list of either, or a DataFrame with one target per row."""
    if targets is None:
        return []
    if isinstance(targets, pd.DataFrame):
        targets = targets.to_dict("records")
    if isinstance(targets, (str, Mapping)):
        targets = [targets]
    specs = []
    for t in targets:
        if isinstance(t, str):
            specs.append(t)
        elif isinstance(t, Mapping):
            for k, v in t.items():
                if any(c in str(v) for c in ",=") or any(c in str(k) for c in ",="):
                    raise ValueError(f"target {dict(t)!r}: keys and values may not contain ',' or '='")
            specs.append(",".join(f"{k}={v}" for k, v in t.items()))
        else:
            raise ValueError(f"target {t!r}: expected a string or a dict")
    return specs



def _ensemble_paths(ensemble: Sequence[Run | PathLike]) -> list[str]:
    """An ensemble's further runs as the paths the library reads; one run given alone is an error
    (a string would be read as a list of characters)."""
    if isinstance(ensemble, (str, os.PathLike, Run)):
        raise TypeError("ensemble: expected a list of runs or run directories, got one; wrap it in a list")
    return [str(r.path) if isinstance(r, Run) else os.fspath(r) for r in ensemble]

class Run:
    """A training run directory (``checkpoint/``, ``best/``, ``model/``, ``metrics.parquet``,
    ``config.toml``), as ``train`` (here or on the command line) writes it."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such training run")
        #: The training report when this run was just trained (epochs, timings, stages).
        self.report: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def interrupted(self) -> bool:
        """Whether the training that returned this run was stopped by Ctrl-C."""
        return bool(self.report and self.report.get("interrupted"))

    @property
    def history(self) -> pd.DataFrame:
        """One row per epoch: losses, accuracy, learning rate, cells, seconds and validation."""
        return pq.read_table(self.path / "metrics.parquet").to_pandas()

    @property
    def config(self) -> dict[str, Any]:
        """The configuration the run trained with (the TOML file's tables)."""
        return json.loads(_native.run_settings(str(self.path)))["config"]

    @property
    def settings(self) -> dict[str, Any]:
        """The obs keys, control and covariates the run recorded."""
        return json.loads(_native.run_settings(str(self.path)))["encoder"]

    @property
    def vocabulary(self) -> dict[str, Any]:
        """The model's vocabulary: genes, perturbations, covariates with their categories,
        conditions."""
        return json.loads(_native.model_vocabulary(str(self.path)))

    @property
    def perturbations(self) -> list[str]:
        """The perturbations the model knows (the control included)."""
        return [p for p in self.vocabulary["perturbations"] if p != "<pad>"]

    def _request(self, store: Store | PathLike, *, out: PathLike | None = None, device: str = "cpu",
                 threads: int | None = None, workers: int | None = None, wide: bool = False, **kw: Any) -> str:
        """The library's ``PredictRequest`` for these keywords, as JSON."""
        genes = kw.pop("genes", None)
        degs = kw.pop("degs", None)
        ensemble = _ensemble_paths(kw.pop("ensemble", ()))
        aggregate = kw.pop("aggregate", None)
        if isinstance(aggregate, str):
            aggregate = [part.strip() for part in aggregate.split(",")]
        group_by = kw.pop("group_by", None)
        anchored = kw.pop("anchored", None)
        if anchored is not None and not isinstance(anchored, bool):
            raise TypeError(f"anchored={anchored!r}: expected None (the default), True or False")
        kw["anchored"], kw["plain"] = anchored is True, anchored is False
        if aggregate:
            kw["aggregate"] = _args.names("aggregate", aggregate)
        if group_by is not None:
            kw["group_by"] = _args.names("group_by", group_by)
        request = {
            "degs": os.fspath(degs) if degs is not None else None,
            "model": str(self.path),
            "ensemble": ensemble,
            "store": _path(store),
            "out": os.fspath(out) if out is not None else None,
            "targets": _target_specs(kw.pop("targets", None)),
            "genes": _args.names("genes", genes) if genes is not None else None,
            "latents": _args.names("latents", kw.pop("latents", ())),
            "layout": "wide" if wide else "long",
            **kw,
            "compute": _compute(device, threads, workers),
            "naming": "keywords",
        }
        return _args.request(request)

    def predict(
        self,
        store: Store | PathLike | anndata.AnnData,
        *,
        source: str | None = None,
        targets: Targets = None,
        ensemble: Sequence[Run | PathLike] = (),
        genes: Sequence[str] | None = None,
        top_deg: int | None = None,
        degs: PathLike | None = None,
        latents: Sequence[str] = (),
        batch_size: int | None = None,
        seed: int = 0,
        allow_empty: bool = False,
        batch_corrected: bool = False,
        expected_log1p: bool = False,
        change: bool = False,
        counts: bool = False,
        anchored: bool | None = None,
        aggregate: str | Sequence[str] | None = None,
        group_by: str | Sequence[str] | None = None,
        device: str = "cpu",
        threads: int | None = None,
        workers: int | None = None,
    ) -> pa.RecordBatchReader:
        """Counterfactual predictions as a ``pyarrow.RecordBatchReader``, computed as it is read
        (zero-copy, through the Arrow PyCapsule stream interface): polars
        (``pl.DataFrame(reader)``) and DuckDB (``duckdb.sql("from reader")``) read it directly.

        ``source`` selects the source cells (``"condition == control and cell_type == K562"``,
        ``"all"``; default the control cells); ``targets`` are the conditions predicted for each
        (``"A+B"``, ``"condition=A+B,dose=0.1+1,cell_type=K562"``, dicts of the same keys, a list,
        or a DataFrame with one target per row; none: each cell reconstructed under its own).
        Columns: ``cell_id``, the target's labels, ``mean`` (a list per row: the predicted means
        of ``genes``, default all, or the union of the targets' ``top_deg`` DEGs, from the store's
        DEG table or the table at ``degs``) and each of
        ``latents`` (:data:`LATENTS`). The genes are in ``schema.metadata[b"cpa_stream.genes"]``.
        ``batch_corrected`` decodes without the batch covariate's embedding (cpa-tools'
        ``custom_predict(add_batch=False)``; the model needs a batch key). ``expected_log1p``
        adds a column of the same name: E[log1p(x)] of each predicted count distribution (nb
        models), what a mean of log-normalised counts estimates (``log1p(mean)`` overstates it).
        ``change`` adds ``change_log1p``: that expectation under the target minus under the cell's
        own condition, the model's predicted change of that expectation. ``counts`` adds
        ``counts``: per cell and target, whole counts drawn from the model's count distribution
        (nb, zinb: a negative binomial of the predicted mean at the source cell's library size,
        zero with the zero-inflation probability), seeded by ``seed``; a cell's draws do not
        depend on the batch size, the shard or the other targets.

        With targets, the prediction is anchored by default (``anchored=None``): the column
        ``anchored`` holds, for a source cell that is a control cell of the target's covariates,
        its observed log1p counts plus the model's predicted change, ``log1p(mean)`` under the
        target minus under the cell's own condition (values and means for a Gaussian model), and
        ``log1p(mean)`` for any other source cell; the Boolean column ``is_anchored`` says which.
        With ``aggregate="mean"`` each group's observed mean moved by the model's change, and
        ``n_anchored`` counts the group's anchored cells. On every held-out data set of
        docs/fidelity.md the anchored prediction is ahead of the plain mean. ``anchored=True``
        anchors every row on its own source cell, whatever its condition (reconstructions too);
        ``anchored=False`` writes the model's ``mean`` only (cpa-tools' prediction).

        ``aggregate`` (``"mean"``, ``"var"`` or both, a list or ``"mean,var"``) writes, instead of a
        row per cell, a row per target and group of source cells: ``n_cells``, and per predicted
        column its mean (``mean``, ...) and sample variance (``mean_var``, ..., ddof 1, null for a
        group of one cell), computed where the model runs as the cells pass. ``group_by`` names the
        obs columns that group the source cells (default: the model's covariates; a covariate's
        group is its value in the output).

        ``ensemble`` (other runs, or their directories) averages every predicted column over this
        run's model and theirs: runs trained on the same store with the same keys, say one recipe
        with other seeds (docs/prediction.md, "Ensembles"); latents cannot be asked for with it.
        """
        request = self._request(
            store, source=source, targets=targets, ensemble=ensemble, genes=genes, top_deg=top_deg, degs=degs,
            latents=latents, batch_size=batch_size, seed=seed, allow_empty=allow_empty, batch_corrected=batch_corrected,
            expected_log1p=expected_log1p, change=change, counts=counts, anchored=anchored, aggregate=aggregate, group_by=group_by,
            device=device, threads=threads, workers=workers,
        )
        stream = _native.predict_stream(request)
        return pa.RecordBatchReader.from_stream(stream)

    def predict_to_parquet(
        self,
        out: PathLike,
        store: Store | PathLike | anndata.AnnData,
        *,
        source: str | None = None,
        targets: Targets = None,
        ensemble: Sequence[Run | PathLike] = (),
        genes: Sequence[str] | None = None,
        top_deg: int | None = None,
        degs: PathLike | None = None,
        latents: Sequence[str] = (),
        shard: str | None = None,
        wide: bool = False,
        batch_size: int | None = None,
        seed: int = 0,
        allow_empty: bool = False,
        batch_corrected: bool = False,
        expected_log1p: bool = False,
        change: bool = False,
        counts: bool = False,
        anchored: bool | None = None,
        aggregate: str | Sequence[str] | None = None,
        group_by: str | Sequence[str] | None = None,
        values: str | None = None,
        sink_threads: int | None = None,
        sink_profile: str | None = None,
        parts: bool = False,
        row_group_rows: int | None = None,
        zstd_level: int | None = None,
        prefetch: int | None = None,
        overwrite: bool = False,
        device: str = "cpu",
        threads: int | None = None,
        workers: int | None = None,
        progress: bool | None = None,
    ) -> dict[str, Any]:
        """Writes the predictions to a Parquet file at ``out`` as ``cpa-stream predict`` does
        (streamed: memory does not grow with the cells) and returns its report. With ``shard``
        (``"k/n"``) ``out`` is a dataset directory that receives ``part-k-of-n.parquet`` and
        ``genes.parquet``. ``wide`` writes one column per gene. ``values="f16"`` writes the float columns
        as Parquet FLOAT16 (half the bytes; relative error at most 0.049%, a value above 65504 an
        error). ``parts=True`` writes ``out`` as a directory of part files written side by side
        (``part-k-of-n.parquet`` in row order; faster with several ``sink_threads``), read as one
        table by ``polars.scan_parquet(out)`` or ``pandas.read_parquet(out)``. ``sink_threads``,
        ``sink_profile`` (``"small"`` or ``"fast"``), ``row_group_rows``, ``zstd_level`` and
        ``prefetch`` are the CLI's flags of the same names. With ``counts=True`` and an ``out``
        ending in ``.h5ad``, the file is an AnnData of raw counts as cell-eval2 scores it: the
        drawn rows, then the control cells among the source cells as observed.
        The way for predictions that do not fit in memory; read them back lazily with ``polars.scan_parquet`` or DuckDB."""
        request = self._request(
            store, source=source, targets=targets, ensemble=ensemble, genes=genes, top_deg=top_deg, degs=degs,
            latents=latents, out=out, shard=shard, wide=wide, batch_size=batch_size, seed=seed, allow_empty=allow_empty,
            batch_corrected=batch_corrected, expected_log1p=expected_log1p, change=change, counts=counts, anchored=anchored,
            aggregate=aggregate, group_by=group_by, values=values, sink_threads=sink_threads, sink_profile=sink_profile, parts=parts,
            row_group_rows=row_group_rows, zstd_level=zstd_level, prefetch=prefetch, overwrite=overwrite,
            device=device, threads=threads, workers=workers,
        )
        return json.loads(_openmp.compute("predict", request, _progress.make(progress, "predict")))

    def predict_anndata(
        self,
        store: Store | PathLike | anndata.AnnData,
        *,
        source: str | None = None,
        targets: Targets = None,
        ensemble: Sequence[Run | PathLike] = (),
        genes: Sequence[str] | None = None,
        top_deg: int | None = None,
        degs: PathLike | None = None,
        latents: Sequence[str] = (),
        batch_size: int | None = None,
        seed: int = 0,
        allow_empty: bool = False,
        batch_corrected: bool = False,
        expected_log1p: bool = False,
        change: bool = False,
        counts: bool = False,
        anchored: bool | None = None,
        aggregate: str | Sequence[str] | None = None,
        group_by: str | Sequence[str] | None = None,
        device: str = "cpu",
        threads: int | None = None,
        workers: int | None = None,
    ) -> anndata.AnnData:
        """The predictions as an AnnData, for results that fit in memory: ``X`` the predicted
        means (float32), ``obs`` the source cell id and the target's labels (categoricals),
        ``var`` the genes, ``obsm`` each latent, ``layers["expected_log1p"]`` with
        ``expected_log1p``, ``layers["change_log1p"]`` with ``change``, ``layers["counts"]`` with ``counts`` and, where the prediction is
        anchored (with targets, by default), ``layers["anchored"]`` and ``obs["is_anchored"]``.
        With ``aggregate``, a row per target and group: ``obs`` the labels, the group-by columns,
        ``n_cells`` (and ``n_anchored``), ``X`` the groups' mean of ``mean`` (with ``"var"`` alone,
        ``mean_var``), every other statistic a layer (``mean_var``, ``anchored``, ...; a variance
        of one cell NaN) or, for latents, an ``obsm`` entry; obs names join the labels.
        Arguments as :meth:`predict`. For more rows than
        memory holds use :meth:`predict_to_parquet` (or :meth:`predict` batch by batch)."""
        import anndata as ad

        reader = self.predict(
            store, source=source, targets=targets, ensemble=ensemble, genes=genes, top_deg=top_deg, degs=degs,
            latents=latents, batch_size=batch_size, seed=seed, allow_empty=allow_empty,
            batch_corrected=batch_corrected, expected_log1p=expected_log1p, change=change, counts=counts, anchored=anchored,
            aggregate=aggregate, group_by=group_by, device=device, threads=threads, workers=workers,
        )
        schema = reader.schema
        genes_json = (schema.metadata or {}).get(GENES_KEY)
        gene_names = json.loads(genes_json) if genes_json else []
        vectors = [f.name for f in schema if pa.types.is_fixed_size_list(f.type)]
        # Latents (and their variances) are per row in their own width: obsm; the rest are genes.
        in_obsm = [n for n in vectors if n in LATENTS or (n.endswith("_var") and n[: -len("_var")] in LATENTS)]
        label_names = [n for n in schema.names if n not in vectors]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in vectors}
        labels: list[pa.Table] = []
        for batch in reader:
            for n in vectors:
                column = batch.column(n)
                parts[n].append(_vectors(column, column.type.list_size))
            labels.append(pa.Table.from_batches([batch.select(label_names)]))
        arrays = {
            n: np.concatenate(v) if v else np.zeros((0, schema.field(n).type.list_size), np.float32)
            for n, v in parts.items()
        }
        if labels:
            obs = table_to_pandas(pa.concat_tables(labels))
        else:
            obs = table_to_pandas(pa.schema([schema.field(n) for n in label_names]).empty_table())
        obs.index = _prediction_names(obs)
        x_name = next((n for n in ("mean", "mean_var") if n in arrays), None)
        x = arrays.pop(x_name) if x_name else np.zeros((len(obs), len(gene_names)), np.float32)
        layers = {n: a for n, a in arrays.items() if n not in in_obsm}
        obsm = {n: arrays[n] for n in in_obsm}
        return ad.AnnData(
            X=x, obs=obs, var=pd.DataFrame(index=pd.Index(gene_names, dtype=str)), obsm=obsm, layers=layers
        )

    def latents(
        self,
        store: Store | PathLike | anndata.AnnData,
        kinds: Sequence[str] | str = ("z_basal",),
        *,
        source: str = "all",
        batch_size: int | None = None,
        device: str = "cpu",
        threads: int | None = None,
        workers: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Latents of the store's cells under their own conditions, ``kinds`` of :data:`LATENTS`,
        as arrays with one row per selected cell in store order: for a store imported from an
        AnnData, ready for ``adata.obsm["X_cpa_basal"] = run.latents(store)["z_basal"]``. The key
        ``"cell_id"`` holds the cells' ids."""
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        unknown = [k for k in kinds if k not in LATENTS]
        if unknown or not kinds:
            raise ValueError(f"latents {unknown or kinds!r}: expected some of {', '.join(LATENTS)}")
        first_gene = self.vocabulary["genes"][:1]
        reader = self.predict(
            store, source=source, genes=first_gene, latents=kinds, batch_size=batch_size,
            device=device, threads=threads, workers=workers,
        )
        parts: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
        ids: list[np.ndarray] = []
        for batch in reader:
            for k in kinds:
                column = batch.column(k)
                parts[k].append(_vectors(column, column.type.list_size))
            ids.append(batch.column("cell_id").to_numpy(zero_copy_only=False))
        out: dict[str, np.ndarray] = {k: np.concatenate(v) for k, v in parts.items()}
        out["cell_id"] = np.concatenate(ids) if ids else np.array([], dtype=object)
        return out

    def evaluate(
        self,
        store: Store | PathLike | anndata.AnnData,
        *,
        split: str = "test",
        out: PathLike | None = None,
        truth: PathLike | None = None,
        degs: PathLike | None = None,
        min_cells: int | None = None,
        definitions: str = "default",
        expected_log1p: bool = False,
        anchored: bool | None = None,
        ensemble: Sequence[Run | PathLike] = (),
        plots: bool | None = None,
        overwrite: bool = False,
        batch_size: int | None = None,
        device: str = "cpu",
        threads: int | None = None,
        progress: bool | None = None,
    ) -> pd.DataFrame:
        """Evaluates the model as ``cpa-stream evaluate`` does and returns the per-condition
        metrics as a DataFrame (``attrs["summary"]``: the summary, ``attrs["transfer"]``: whether
        perturbations' effects carry over between covariate values in the training cells, or None;
        ``attrs["reproducibility"]``: how many conditions' changes reproduce between halves of
        their cells, or None; ``attrs["report"]``: the whole report): the CPA paper's R2 family with the control-mean baseline (``r2_mean_control``)
        and the data's split-half ceiling (``ceiling_r2_mean``), and the field's metrics
        (``pearson_delta``, ``mse``/``mae`` and their ``_delta``, ``deg_overlap_at*``,
        ``deg_precision_at*``, ``discrimination_*``, ``beats_control``; docs/evaluation.md). ``split``: ``train``, ``valid``, ``test``, ``ood`` or ``all``. ``definitions="reference"``
        scores with cpa-tools' tutorial definitions (every control cell of the covariates, DEGs
        by the difference of means, conditions of 2 cells or more). ``expected_log1p`` scores the
        expected log1p of the predicted counts (nb models) instead of log1p of the predicted mean.
        The anchored prediction is scored by default (:meth:`predict`'s ``anchored``: the control
        cells' observed log1p counts moved by the model's change), except with ``expected_log1p``
        (a plain prediction); ``anchored=False`` scores log1p of the predicted means, cpa-tools'
        prediction (with ``definitions="reference"``, its tutorials' numbers). ``ensemble`` (other runs, or
        their directories) averages the predictions of this run's model and theirs, as
        :meth:`predict`'s ``ensemble`` does. With ``out`` the
        files (``metrics.parquet``, ``summary.json``, ``degs.parquet``, ``plots/``) are kept
        there; without, they go to a temporary directory. ``plots`` defaults to the CLI's: drawn
        when there is an ``out`` to keep them in."""
        with tempfile.TemporaryDirectory(prefix="cpa-stream-eval-") as scratch:
            target = Path(out) if out is not None else Path(scratch) / "eval"
            request = {
                "model": str(self.path), "store": _path(store), "out": str(target), "split": split,
                "truth": os.fspath(truth) if truth is not None else None,
                "degs": os.fspath(degs) if degs is not None else None,
                "min_cells": min_cells, "definitions": definitions, "expected_log1p": expected_log1p,
                "anchored": anchored is True, "plain": anchored is False, "ensemble": _ensemble_paths(ensemble),
                "plots": _plots(plots, out), "overwrite": overwrite, "batch_size": batch_size,
                "compute": _compute(device, threads), "naming": "keywords",
            }
            shown = _progress.make(progress, "evaluate")
            report = json.loads(_openmp.compute("evaluate", _args.request(request), shown))
            frame = table_to_pandas(pq.read_table(target / "metrics.parquet"))
        frame.attrs["summary"] = report.get("summary", {})
        frame.attrs["transfer"] = report.get("transfer")
        frame.attrs["reproducibility"] = report.get("reproducibility")
        frame.attrs["report"] = report
        return frame

    def dose_response(
        self,
        store: Store | PathLike | anndata.AnnData | None = None,
        *,
        perturbations: Sequence[str] | None = None,
        doses: Sequence[float] | None = None,
        genes: Sequence[str] | None = None,
        covariates: Mapping[str, str | Sequence[str]] | None = None,
        cells: int = 100,
        seed: int = 0,
        out: PathLike | None = None,
        plots: bool | None = None,
        overwrite: bool = False,
        device: str = "cpu",
        threads: int | None = None,
        progress: bool | None = None,
    ) -> dict[str, pd.DataFrame]:
        """Dose-response curves as ``cpa-stream dose-response`` computes them (cpa-tools'
        ``latent_dose_response`` and ``get_response``): ``"latent"``, each perturbation's learned
        dose scaling ``response`` = s(d) and the latent shift's length ``norm``; with a ``store``,
        ``"decoded"``, per covariate combination the length of the change of the mean predicted
        expression of up to ``cells`` sampled control cells from dose 0 (``response``), and
        ``"genes"``, the per-gene curves (``predicted``, ``delta``) of ``genes`` (default the 5
        largest changes of each curve), in the covariate combinations ``covariates`` allows
        (``{"cell_type": "K562"}`` or a list of values; default all). A synthetic atlas's truth fills ``true_response`` and
        ``true_delta``. ``doses`` default: 0 to the largest dose the store has for each
        perturbation, plus every dose it has. ``attrs["summary"]`` of each frame holds the report
        (R2 against the truth included). With ``out`` the files (and, unless ``plots=False``,
        ``dose_response.svg``/``.png``) are kept there."""
        with tempfile.TemporaryDirectory(prefix="cpa-stream-dose-") as scratch:
            target = Path(out) if out is not None else Path(scratch) / "dose"
            request = {
                "model": str(self.path), "out": str(target),
                "store": _path(store) if store is not None else None,
                "perturbations": _args.names("perturbations", perturbations),
                "doses": [float(d) for d in doses] if doses is not None else None,
                "genes": _args.names("genes", genes), "cells": cells, "seed": seed,
                "plots": _plots(plots, out),
                "covariates": [
                    [k, v] for k, vs in (covariates or {}).items() for v in ([vs] if isinstance(vs, str) else vs)
                ],
                "overwrite": overwrite,
                "compute": _compute(device, threads), "naming": "keywords",
            }
            shown = _progress.make(progress, "dose-response")
            report = json.loads(_openmp.compute("dose-response", _args.request(request), shown))
            frames = {}
            for name in ("latent", "decoded", "genes"):
                path = target / f"{name}.parquet"
                if path.exists():
                    frames[name] = table_to_pandas(pq.read_table(path))
                    frames[name].attrs["summary"] = report
        return frames

    def _embeddings_request(self) -> str:
        return _args.request({"model": str(self.path), "naming": "keywords"})

    def perturbation_embeddings(self) -> pd.DataFrame:
        """The learned perturbation embeddings: one row per perturbation (index), one column per
        latent dimension, and ``is_control``."""
        table = pa.RecordBatchReader.from_stream(_native.embeddings(self._embeddings_request(), "perturbation")).read_all()
        vectors = _vectors(table.column("embedding").combine_chunks(), table.schema.field("embedding").type.list_size)
        frame = pd.DataFrame(vectors, index=pd.Index(table.column("name").to_pylist(), name="perturbation"))
        frame.insert(0, "is_control", table.column("is_control").to_numpy(zero_copy_only=False))
        return frame

    def covariate_embeddings(self) -> pd.DataFrame:
        """The learned covariate embeddings: one row per (covariate, category) (a MultiIndex),
        one column per latent dimension."""
        table = pa.RecordBatchReader.from_stream(_native.embeddings(self._embeddings_request(), "covariate")).read_all()
        vectors = _vectors(table.column("embedding").combine_chunks(), table.schema.field("embedding").type.list_size)
        index = pd.MultiIndex.from_arrays(
            [table.column("covariate").to_pylist(), table.column("name").to_pylist()], names=["covariate", "category"]
        )
        return pd.DataFrame(vectors, index=index)


def _prediction_names(obs: pd.DataFrame) -> pd.Index:
    """obs names of predicted rows: the source cells' ids where each appears once (one target),
    else ``<cell id>_<condition>`` (and ``_<dose>`` where doses tell targets apart), else row
    numbers."""
    if len(obs) == 0:
        return obs.index.astype(str)
    if "cell_id" not in obs.columns:
        # Aggregates: the labels and groups joined (`MAPK1_1_k562`), where that names each row once.
        text = [c for c in obs.columns if c not in ("n_cells", "n_anchored", IS_ANCHORED)]
        if text:
            names = obs[text[0]].astype(str)
            for column in text[1:]:
                names = names + "_" + obs[column].astype(str)
            if names.is_unique:
                return pd.Index(names.to_numpy(), dtype=str)
        return obs.index.astype(str)
    ids = obs["cell_id"].astype(str)
    if ids.is_unique:
        return pd.Index(ids.to_numpy(), dtype=str)
    labels = [c for c in obs.columns if c != "cell_id"]
    for n in (1, 2):
        if len(labels) < n:
            break
        names = ids
        for column in labels[:n]:
            names = names + "_" + obs[column].astype(str)
        if names.is_unique:
            return pd.Index(names.to_numpy(), dtype=str)
    return obs.index.astype(str)


def _vectors(column: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """A fixed-size list column of float32 as a (rows, width) array, without copying where the
    column has no offset."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, width), np.float32)
    if column.null_count:
        # A null row (an aggregate's variance of one cell) is NaN.
        out = np.full((len(column), width), np.nan, np.float32)
        valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False))
        out[valid] = column.drop_null().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        return out
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), width)

