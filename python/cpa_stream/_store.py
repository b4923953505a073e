"""Stores: importing AnnData (files or objects) and reading a store's tables."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import _args, _native, _progress

if TYPE_CHECKING:
    import anndata
    import polars

#: Field metadata key of a categorical column's ordered categories (the store's schema).
CATEGORIES_KEY = b"cpa_stream.categories"
#: Field metadata key marking an ordered categorical (``b"true"``).
ORDERED_KEY = b"cpa_stream.ordered"
#: Field metadata key of a column's name in its source when the store renamed it.
SOURCE_NAME_KEY = b"cpa_stream.source_name"
#: Rows of an in-memory matrix written per chunk.
DEFAULT_CHUNK_ROWS = 1024

PathLike = str | os.PathLike


class Store:
    """A cpa-stream store: the cells x genes matrix (memory-mapped, raw or zstd blocks) with its
    ``obs`` and ``var`` tables, as ``cpa-stream import`` writes it.

    ``Store(path)`` opens and checks an existing store; :func:`import_h5ad` makes one.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = json.loads(_native.store_manifest(str(self.path)))

    def __repr__(self) -> str:
        codec = self.manifest.get("codec")
        codec = codec if isinstance(codec, str) else next(iter(codec), "?")
        return f"Store({str(self.path)!r}: {self.n_obs:,} cells x {self.n_vars:,} genes, {codec})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def n_obs(self) -> int:
        """Cells."""
        return int(self.manifest["n_obs"])

    @property
    def n_vars(self) -> int:
        """Genes."""
        return int(self.manifest["n_vars"])

    @property
    def shape(self) -> tuple[int, int]:
        """``(cells, genes)``, as ``AnnData.shape``."""
        return (self.n_obs, self.n_vars)

    @property
    def obs(self) -> pd.DataFrame:
        """The cells' metadata, indexed by cell id; categorical columns keep their categories in
        their recorded order (unused ones included). Read from ``obs.parquet`` on each access."""
        return _frame(self.path / "obs.parquet")

    @property
    def var(self) -> pd.DataFrame:
        """The genes' metadata, indexed by gene id."""
        return _frame(self.path / "var.parquet")

    def obs_polars(self) -> polars.DataFrame:
        """``obs`` as a polars DataFrame (``cell_id`` a column)."""
        import polars as pl

        return pl.read_parquet(self.path / "obs.parquet")

    def var_polars(self) -> polars.DataFrame:
        """``var`` as a polars DataFrame (``gene_id`` a column)."""
        import polars as pl

        return pl.read_parquet(self.path / "var.parquet")

    @property
    def degs(self) -> pd.DataFrame | None:
        """The store's DEG lists (``group``, ``rank``, ``gene``, ``score``, ``pvalue``, ``qvalue``), imported from the
        AnnData's ``uns``; ``None`` when it has none. ``attrs["uns_key"]`` names their entry."""
        path = self.path / "degs.parquet"
        if not path.exists():
            return None
        table = pq.read_table(path)
        frame = table.to_pandas()
        key = (table.schema.metadata or {}).get(b"uns_key")
        frame.attrs["uns_key"] = key.decode() if key else None
        return frame


def _frame(path: Path) -> pd.DataFrame:
    table = pq.read_table(path)
    return table_to_pandas(table, index=table.schema.names[0])


def table_to_pandas(table: pa.Table, index: str | None = None) -> pd.DataFrame:
    """A table of the store's schemas as pandas: categorical columns with their recorded
    categories, in order, and ``index`` (a column) as the index."""
    frame = table.to_pandas()
    for field in table.schema:
        categories = (field.metadata or {}).get(CATEGORIES_KEY)
        if categories is not None or pa.types.is_dictionary(field.type):
            values = frame[field.name].astype(object)
            order = json.loads(categories) if categories is not None else None
            ordered = (field.metadata or {}).get(ORDERED_KEY) == b"true"
            frame[field.name] = pd.Categorical(values, categories=order, ordered=ordered)
    if index is not None:
        frame = frame.set_index(index)
        frame.index = frame.index.astype(str)
        frame.index.name = None
    return frame


def import_h5ad(
    data: anndata.AnnData | PathLike | Sequence[anndata.AnnData | PathLike],
    out: PathLike,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    genes: list[str] | None = None,
    join: str | None = None,
    gene_key: str | None = None,
    source_key: str | None = None,
    labels: list[str] | None = None,
    make_unique: bool | str | None = None,
    shuffle: int | None = None,
    var_table: PathLike | None = None,
    var_id: str | None = None,
    genes_column: str | None = None,
    counts_column: str | None = None,
    cell_id_column: str | None = None,
    marker_value: float | None = None,
    append: bool = False,
    allow_empty: bool = False,
    codec: str = "raw",
    zstd_level: int | None = None,
    block_rows: int | None = None,
    deg_uns_key: str | None = None,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    allow_external: bool = False,
    allow_missing_chunks: bool = False,
    progress: bool | None = None,
) -> Store:
    """Imports an AnnData into a new store at ``out`` and returns it.

    ``data`` is a path to an ``.h5ad`` file, a backed AnnData (read from its file, out of core,
    as ``cpa-stream import`` does) or an AnnData in memory, whose matrix (``X`` or
    ``layers[layer]``, or ``raw``; CSR, CSC or dense) is written through the streaming store
    writer in chunks of ``chunk_rows`` cells, with no temporary ``.h5ad``. The values must be
    finite and non-negative (counts, or normalised values for a Gaussian model).

    ``codec`` is ``"raw"`` (fastest to read) or ``"zstd"`` (several times smaller; blocks of
    ``block_rows`` cells, default 256, at ``zstd_level``, default 1). ``chunk_rows`` (default
    1,024) are read or written at a time. ``genes`` keeps those genes, in that order (files
    only). DEG lists come from ``uns`` (CPA's dict of group -> ranked genes, or scanpy's
    ``rank_genes_groups``): ``deg_uns_key`` picks the entry (an error when it is absent or not
    DEG lists), else the first found. An existing store at ``out`` is an error unless ``overwrite``.

    ``data`` may also be a list of paths and AnnData objects, mixed: they become one store in one
    streaming pass, as ``cpa-stream import A.h5ad B.h5ad ...`` (and ``anndata.concat``) makes it.
    Genes are matched by the var index, or by the var column ``gene_key``; ``join`` keeps the
    genes every file has (``"inner"``, the default) or any has (``"outer"``, zero where a file
    lacks one); ``genes`` lists them instead. obs columns are merged (missing where a file lacks
    one), and ``source_key`` (default ``"source_file"``) names each cell's file by its label
    (``labels``, default the file names without ``.h5ad``; ``adata0``, ``adata1``, ... for
    objects). A cell id in two files is an error unless ``make_unique`` (``True`` or a
    separator) appends the label to every id, as anndata's ``index_unique`` does. ``shuffle``
    (a seed) writes the cells in a random order. AnnData objects of a list are written to a
    temporary ``.h5ad`` next to ``out`` first (files and backed objects are read in place).

    A zarr AnnData (a directory ``AnnData.write_zarr`` wrote, zarr format 2 or 3, compressed or
    sharded) is read like an ``.h5ad`` file, alone or in a list, by the same native reader as
    ``cpa-stream import atlas.zarr``: its matrix (CSR, CSC or dense) ``chunk_rows`` cells at a
    time, obs and var as ``anndata.read_zarr`` reads them. DEG lists come from a dict of ranked
    gene names; scanpy's ``rank_genes_groups`` record arrays are not read from zarr.

    Paths ending in ``.parquet`` are cell tables (a row per cell, lists of gene ids and counts, as
    Hugging Face's Tahoe-100M): ``var_table`` names their gene vocabulary (a Parquet file, a row per
    gene, genes named by the column ``gene_key``), ``var_id`` its column the lists hold (default
    ``token_id``), ``genes_column``/``counts_column`` the list columns (default ``genes``,
    ``expressions``), ``cell_id_column`` the ids, ``marker_value`` a count that marks entries to
    leave out (Tahoe's -2).

    Inputs holding no cells are a ``ValueError`` (nothing is written) unless ``allow_empty=True``.

    ``append=True`` adds the cells of ``data`` to the existing store ``out`` (its genes kept: every
    file must have them) as a new version, which replaces it once complete: a kill leaves the store
    as it was, and readers that have it open go on reading it.

    A file is untrusted: importing it reads nothing but that file, so a file whose data lives in
    other files (HDF5 external storage, external links, virtual datasets) is a ``ValueError``
    naming the object; ``allow_external=True`` reads such data for a trusted collection, from
    regular files in the file's own folder only. A zarr store whose sparse matrix lacks chunks
    (a damaged or partial copy) is a ``ValueError`` too; ``allow_missing_chunks=True`` reads their
    entries as the array's fill value.
    """
    out = Path(out)
    if make_unique is True:
        make_unique = "-"
    request = {
        "out": os.fspath(out), "layer": layer, "use_raw": use_raw,
        "genes": _args.names("genes", genes) if genes is not None else None, "deg_uns_key": deg_uns_key,
        "join": join, "gene_key": gene_key, "source_key": source_key,
        "labels": _args.names("labels", labels) if labels is not None else None,
        "make_unique": make_unique or None, "shuffle": shuffle,
        "var_table": os.fspath(var_table) if var_table is not None else None, "var_id": var_id,
        "genes_column": genes_column, "counts_column": counts_column, "cell_id_column": cell_id_column,
        "marker_value": marker_value, "allow_empty": allow_empty,
        "chunk_rows": chunk_rows, "allow_external": allow_external,
        "allow_missing_chunks": allow_missing_chunks, "codec": codec, "zstd_level": zstd_level,
        "block_rows": block_rows, "overwrite": overwrite, "naming": "keywords",
    }
    if append:
        request["append"] = os.fspath(out)
    many = isinstance(data, (list, tuple))
    if many or append or var_table is not None or (shuffle is not None or gene_key is not None) and not isinstance(
        data, (str, os.PathLike)
    ):
        return _import_many(list(data) if many else [data], out, request, labels, progress)
    if isinstance(data, (str, os.PathLike)) or getattr(data, "isbacked", False) and not data.is_view:
        # A file, or a backed AnnData read from its file, out of core, as `cpa-stream import` does.
        request["inputs"] = [os.fspath(data if isinstance(data, (str, os.PathLike)) else data.filename)]
        _native.run("import", _args.request(request), _progress.make(progress, "import"))
        _remember(data, out)
        return Store(out)
    original = data
    # The matrix comes from Python; the request says where it goes and how.
    arrays = _args.request({k: v for k, v in request.items() if k in _ARRAY_REQUEST})
    chunk_rows = chunk_rows if chunk_rows is not None else DEFAULT_CHUNK_ROWS
    if getattr(data, "isbacked", False):
        # A view of a backed AnnData (``adata[:100]``): its cells only, read from the file chunk
        # by chunk through the view, never the whole file.
        store = _import_backed_view(data, out, layer, use_raw, genes, deg_uns_key, chunk_rows, progress, arrays)
        _remember(data, out)
        return store
    if genes is not None:
        data = data[:, genes]
    if use_raw:
        if layer is not None:
            raise ValueError(f"import: layer {layer!r} and adata.raw both asked for; choose one")
        if data.raw is None:
            raise ValueError("import: use_raw=True but the AnnData has no .raw")
        matrix, var = data.raw.X, data.raw.var
        what = "AnnData.raw (in memory)"
    elif layer is not None:
        if layer not in data.layers:
            raise ValueError(f"import: no layer {layer!r}; the AnnData has {sorted(data.layers.keys()) or 'none'}")
        matrix, var = data.layers[layer], data.var
        what = f"AnnData layer {layer!r} (in memory)"
    else:
        if data.X is None:
            raise ValueError("import: the AnnData has no X; give layer= or use_raw=True")
        matrix, var = data.X, data.var
        what = "AnnData (in memory)"
    obs = dataframe_to_arrow(data.obs, "cell_id", "obs")
    var = dataframe_to_arrow(var, "gene_id", "var")
    degs = _degs_from_uns(data.uns, deg_uns_key)
    _native.import_arrays(
        arrays, what, obs, var, _csr_chunks(matrix, chunk_rows), degs=degs, progress=_progress.make(progress, "import")
    )
    _remember(original, out)
    return Store(out)


def _import_many(
    items: list[Any], out: Path, request: dict[str, Any], labels: list[str] | None, progress: bool | None
) -> Store:
    """Imports files and AnnData objects, mixed, in one pass of the native import: objects in
    memory (or views) are written to a temporary ``.h5ad`` next to ``out`` first."""
    if not items:
        raise ValueError("import_h5ad: an empty list of inputs")
    import tempfile

    parent = out.parent if str(out.parent) else Path(".")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.anndata-", dir=parent) as scratch:
        paths, names = [], []
        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                paths.append(os.fspath(item))
                name = Path(item).name
                names.append(
                    next((name[: -len(x)] for x in (".h5ad", ".zarr", ".parquet", ".pq") if name.endswith(x)), name)
                )
            elif getattr(item, "isbacked", False) and not item.is_view:
                paths.append(os.fspath(item.filename))
                names.append(Path(item.filename).stem)
            elif hasattr(item, "obs") and hasattr(item, "var"):
                path = os.path.join(scratch, f"adata{i}.h5ad")
                (item.to_memory() if getattr(item, "isbacked", False) else item).write_h5ad(path)
                paths.append(path)
                names.append(f"adata{i}")
            else:
                raise TypeError(f"import_h5ad: input {i} is a {type(item).__name__}, not a path or an AnnData")
        request["inputs"] = paths
        if labels is None and len(paths) > 1:
            request["labels"] = names
        _native.run("import", _args.request(request), _progress.make(progress, "import"))
    return Store(out)


#: The fields of an import request that apply to a matrix given from Python (no file to read).
_ARRAY_REQUEST = ("out", "codec", "zstd_level", "block_rows", "overwrite", "allow_empty", "naming")


def export_h5ad(
    store: Store | PathLike,
    out: PathLike,
    *,
    compression: str = "none",
    gzip_level: int | None = None,
    overwrite: bool = False,
    cells: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Writes a store as an AnnData ``.h5ad`` file at ``out``, as ``cpa-stream export`` does
    (streamed: memory does not grow with the cells), and returns its path: CSR ``X``, ``obs``,
    ``var`` and the DEG lists in ``uns``. ``compression`` is ``"none"`` (anndata's default),
    ``"gzip"`` (at ``gzip_level``, default 4) or ``"lzf"``. ``cells``: only the cells this
    expression over obs columns selects (``predict``'s ``source`` language, e.g.
    ``"split == ood or condition == control"``: a held-out split and the controls, the reference
    ``score`` takes); an expression that selects no cell is an error."""
    request = {
        "store": os.fspath(store.path if isinstance(store, Store) else store), "out": os.fspath(out),
        "compression": compression, "gzip_level": gzip_level, "overwrite": overwrite, "cells": cells,
        "naming": "keywords",
    }
    _native.run("export", _args.request(request), _progress.make(progress, "export"))
    return Path(out)


def convert(
    store: Store | PathLike,
    out: PathLike,
    *,
    codec: str = "raw",
    zstd_level: int | None = None,
    block_rows: int | None = None,
    shuffle: int | None = None,
    shuffle_memory_mib: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Store:
    """Copies a store into a new one at ``out`` with another ``codec`` (as ``import_h5ad``), as
    ``cpa-stream convert`` does, and returns it. ``shuffle`` (a seed) writes the cells in a
    random order drawn from it, in buckets of about ``shuffle_memory_mib`` MiB (default 256): a
    store sorted by condition can then be trained with runs of neighbouring cells."""
    request = {
        "store": os.fspath(store.path if isinstance(store, Store) else store), "out": os.fspath(out),
        "codec": codec, "zstd_level": zstd_level, "block_rows": block_rows, "shuffle": shuffle,
        "shuffle_memory_mib": shuffle_memory_mib, "overwrite": overwrite, "naming": "keywords",
    }
    _native.run("convert", _args.request(request), _progress.make(progress, "convert"))
    return Store(out)


def synth(
    out: PathLike,
    *,
    cells: int,
    genes: int,
    perturbations: int,
    doses: int | None = None,
    cell_types: int | None = None,
    combinations: int | None = None,
    heldout_combinations: int | None = None,
    interaction: float | None = None,
    control_fraction: float | None = None,
    library_size: float | None = None,
    library_log_sd: float | None = None,
    latent_dim: int | None = None,
    hidden: int | None = None,
    truth_samples: int | None = None,
    seed: int = 0,
    codec: str = "raw",
    zstd_level: int | None = None,
    block_rows: int | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Store:
    """Generates a CPA-shaped synthetic atlas with ground truth (``truth.parquet``: the true
    mean of every condition, held-out combinations included) into a store at ``out``, as
    ``cpa-stream synth`` does, and returns it. Settings left ``None`` take the CLI's defaults
    (``cpa-stream synth --help``); the same seed gives the same atlas on any number of
    ``threads``."""
    request = {
        "out": os.fspath(out), "cells": cells, "genes": genes, "perturbations": perturbations, "doses": doses,
        "cell_types": cell_types, "combinations": combinations, "heldout_combinations": heldout_combinations,
        "interaction": interaction, "control_fraction": control_fraction, "library_size": library_size,
        "library_log_sd": library_log_sd, "latent_dim": latent_dim, "hidden": hidden,
        "truth_samples": truth_samples, "seed": seed, "codec": codec, "zstd_level": zstd_level,
        "block_rows": block_rows, "threads": threads, "overwrite": overwrite, "naming": "keywords",
    }
    _native.run("synth", _args.request(request), _progress.make(progress, "synth"))
    return Store(out)


class _ViewRows:
    """The matrix of a view of a backed AnnData as row blocks: ``rows[a:b]`` reads those cells of
    the view from the file, so memory holds a chunk. (anndata does not index a backed view
    again: the blocks are views of the backed AnnData it is a view of, at the view's rows.)"""

    def __init__(self, view: Any, pick: Any) -> None:
        parent = view._adata_ref
        self.rows = np.arange(parent.n_obs)[view._oidx]
        self.columns = np.arange(parent.n_vars)[view._vidx]
        self.parent, self.pick = parent, pick
        self.shape = (len(self.rows), len(self.columns))

    def __getitem__(self, rows: slice) -> Any:
        return self.pick(self.parent[self.rows[rows], self.columns])


def is_zarr(path: PathLike) -> bool:
    """Whether ``path`` is a zarr group (v2: ``.zgroup``; v3: ``zarr.json``), as
    ``AnnData.write_zarr`` writes it."""
    p = Path(path)
    return p.is_dir() and ((p / ".zgroup").is_file() or (p / "zarr.json").is_file())


class _BackedRows:
    """The matrix of a backed AnnData (not a view) as row blocks read from its file."""

    def __init__(self, adata: Any, pick: Any) -> None:
        self.adata, self.pick = adata, pick
        self.shape = (adata.n_obs, adata.n_vars)

    def __getitem__(self, rows: slice) -> Any:
        return self.pick(self.adata[rows])


def import_matrix(
    adata: Any,
    obs: pd.DataFrame,
    out: PathLike,
    *,
    layer: str | None = None,
    deg_uns_key: str | None = None,
    overwrite: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool | None = None,
) -> Store:
    """Writes the matrix of ``adata`` (``X`` or ``layers[layer]``; in memory, backed, or a view of
    either) with the obs table ``obs`` (one row per cell, in the AnnData's order) into a new store
    at ``out``, chunk by chunk: a backed AnnData is read from its file ``chunk_rows`` cells at a
    time. For callers that import an AnnData with obs columns of their own (the cpa-tools layer)
    without changing the object."""
    if len(obs) != adata.n_obs:
        raise ValueError(f"import: obs has {len(obs)} rows, the AnnData {adata.n_obs} cells")
    if layer is not None:
        if layer not in adata.layers:
            raise ValueError(f"import: no layer {layer!r}; the AnnData has {sorted(adata.layers.keys()) or 'none'}")
        pick, what = (lambda a: a.layers[layer]), f"AnnData layer {layer!r}"
    else:
        pick, what = (lambda a: a.X), "AnnData"
    if getattr(adata, "isbacked", False):
        rows: Any = _ViewRows(adata, pick) if adata.is_view else _BackedRows(adata, pick)
        what += f" (backed by {adata.filename})"
    else:
        rows = pick(adata)
        if rows is None:
            raise ValueError("import: the AnnData has no X; give a layer")
        what += " (in memory)"
    request = _args.request({"out": os.fspath(out), "overwrite": overwrite, "naming": "keywords"})
    _native.import_arrays(
        request, what, dataframe_to_arrow(obs, "cell_id", "obs"), dataframe_to_arrow(adata.var, "gene_id", "var"),
        _csr_chunks(rows, chunk_rows), degs=_degs_from_uns(adata.uns, deg_uns_key),
        progress=_progress.make(progress, "import"),
    )
    return Store(out)


def _import_backed_view(
    view: Any, out: Path, layer: str | None, use_raw: bool, genes: list[str] | None, deg_uns_key: str | None,
    chunk_rows: int, progress: bool | None, request: str,
) -> Store:
    if genes is not None:
        positions = view.var_names.get_indexer(genes)
        if (positions < 0).any():
            missing = [g for g, p in zip(genes, positions) if p < 0]
            raise ValueError(f"--genes: {len(missing)} gene(s) not in var: {', '.join(missing[:10])}")
        view = view._adata_ref[view._oidx, np.arange(view._adata_ref.n_vars)[view._vidx][positions]]
    if use_raw:
        raise ValueError(
            "import: use_raw=True of a view of a backed AnnData is not supported; import the file with "
            "use_raw=True, or the view's cells from memory (view.to_memory())"
        )
    if layer is not None:
        if layer not in view.layers:
            raise ValueError(f"import: no layer {layer!r}; the AnnData has {sorted(view.layers.keys()) or 'none'}")
        pick, what = (lambda v: v.layers[layer]), f"AnnData layer {layer!r} (a view of {view.filename})"
    else:
        pick, what = (lambda v: v.X), f"AnnData (a view of {view.filename})"
    obs = dataframe_to_arrow(view.obs, "cell_id", "obs")
    var = dataframe_to_arrow(view.var, "gene_id", "var")
    degs = _degs_from_uns(view.uns, deg_uns_key)
    _native.import_arrays(
        request, what, obs, var, _csr_chunks(_ViewRows(view, pick), chunk_rows), degs=degs,
        progress=_progress.make(progress, "import"),
    )
    return Store(out)


def _number_text(value: Any) -> str:
    """A category as the store writes it, as the .h5ad importer does: integers plainly, floats as
    Python prints them (``1.0``, ``1e-05``, ``2.5e+16``), a float32 or float16 with the shortest
    digits of its own precision (``0.1``, as ``astype(str)`` gives, not ``0.10000000149011612``)."""
    if isinstance(value, (np.float32, np.float16)):
        if not np.isfinite(value):
            return repr(float(value))
        return repr(float(np.format_float_positional(value, unique=True, trim="-")))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def dataframe_to_arrow(frame: pd.DataFrame, id_column: str, what: str) -> pa.Table:
    """A pandas obs/var frame in the store's schema: the index as ``id_column`` (first, not
    null), categoricals as dictionaries with their ordered categories recorded, integers Int64,
    floats Float64, booleans, strings; a column named like the id becomes ``<id>_column`` (or
    ``<id>_column_2``... when that is taken), its own name kept in its metadata for export, and
    an ordered categorical says so in its metadata."""
    fields: list[pa.Field] = []
    arrays: list[pa.Array] = []
    index = frame.index.astype(str)
    fields.append(pa.field(id_column, pa.string(), nullable=False))
    arrays.append(pa.array(np.asarray(index, dtype=object), type=pa.string()))
    taken = {id_column, *map(str, frame.columns)}
    for name, column in frame.items():
        name = str(name)
        out_name, meta = name, {}
        if name == id_column:
            out_name = f"{name}_column"
            k = 2
            while out_name in taken:
                out_name, k = f"{name}_column_{k}", k + 1
            meta[SOURCE_NAME_KEY] = name.encode()
        dtype = column.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            categories = [_number_text(c) for c in dtype.categories]
            codes = pa.array(np.asarray(column.cat.codes, dtype=np.int32), mask=np.asarray(column.cat.codes) < 0)
            array = pa.DictionaryArray.from_arrays(codes, pa.array(categories, type=pa.string()))
            meta[CATEGORIES_KEY] = json.dumps(categories, separators=(",", ":"), ensure_ascii=False).encode()
            if dtype.ordered:
                meta[ORDERED_KEY] = b"true"
            fields.append(pa.field(out_name, pa.dictionary(pa.int32(), pa.string()), nullable=True, metadata=meta))
            arrays.append(array)
            continue
        nullable = bool(column.isna().any())
        if pd.api.types.is_bool_dtype(dtype):
            array = pa.array(column, type=pa.bool_(), from_pandas=True)
        elif pd.api.types.is_unsigned_integer_dtype(dtype) and not nullable:
            array = pa.array(column, type=pa.uint64(), from_pandas=True)
        elif pd.api.types.is_integer_dtype(dtype):
            array = pa.array(column, type=pa.int64(), from_pandas=True)
        elif pd.api.types.is_float_dtype(dtype):
            # NaN stays a float NaN, as the .h5ad importer keeps it (not a null, which this
            # non-nullable column cannot hold): the command that reads the column names its cell.
            array = pa.array(np.asarray(column, dtype=np.float64), type=pa.float64())
            nullable = False
        elif pd.api.types.is_string_dtype(dtype) or dtype == object:
            values = [None if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v) for v in column]
            array = pa.array(values, type=pa.string())
        else:
            raise ValueError(
                f"{what} column {name!r}: dtype {dtype} is not supported "
                "(categorical, string, integer, float or boolean)"
            )
        fields.append(pa.field(out_name, array.type, nullable=nullable, metadata=meta or None))
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _csr_chunks(matrix: Any, chunk_rows: int) -> Iterator[tuple[bytes, bytes, bytes]]:
    """The matrix in chunks of CSR rows, as little-endian ``(indptr u64, indices u32, data f32)``
    bytes. CSC is converted to CSR once (row slices of CSC cost a pass over the matrix each);
    dense rows are made sparse chunk by chunk."""
    import scipy.sparse as sp

    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    if sp.issparse(matrix) and matrix.format == "csc":
        matrix = matrix.tocsr()
    elif sp.issparse(matrix) and matrix.format != "csr":
        matrix = sp.csr_matrix(matrix)
    n = matrix.shape[0]
    for start in range(0, n, chunk_rows):
        block = matrix[start : min(start + chunk_rows, n)]
        if sp.issparse(block):
            block = sp.csr_matrix(block, copy=False)
            if not block.has_canonical_format:
                block = block.copy()
                block.sum_duplicates()
        else:
            block = np.asarray(block)
            # scipy's sparse matrices hold no float16 (anndata writes such dense X).
            if block.dtype == np.float16:
                block = block.astype(np.float32)
            block = sp.csr_matrix(block)
        indptr = (block.indptr - block.indptr[0]).astype("<u8", copy=False)
        yield (
            indptr.tobytes(),
            np.asarray(block.indices).astype("<u4", copy=False).tobytes(),
            np.asarray(block.data).astype("<f4", copy=False).tobytes(),
        )


def _degs_from_uns(uns: Any, key: str | None) -> tuple[str, pa.Table] | None:
    """A DEG table from ``uns``: ``key``'s entry, or the first that is CPA's dict of group ->
    ranked gene names or scanpy's ``rank_genes_groups`` (record arrays ``names``, ``scores``)."""
    keys = [key] if key is not None else list(uns.keys())
    if key is not None and key not in uns:
        raise ValueError(f"deg_uns_key {key!r}: not in uns (keys: {', '.join(map(str, uns.keys())) or 'none'})")
    for k in keys:
        entry = uns[k]
        rows = _deg_rows(entry)
        if rows is None:
            if key is not None:
                raise ValueError(f"uns[{key!r}] is neither a dict of group -> genes nor rank_genes_groups")
            continue
        groups, ranks, genes, scores, pvalues, qvalues = rows
        table = pa.table(
            {"group": pa.array(groups, pa.string()), "rank": pa.array(ranks, pa.uint32()),
             "gene": pa.array(genes, pa.string()), "score": pa.array(scores, pa.float64()),
             "pvalue": pa.array(pvalues, pa.float64()), "qvalue": pa.array(qvalues, pa.float64())},
            schema=pa.schema([
                pa.field("group", pa.string(), nullable=False), pa.field("rank", pa.uint32(), nullable=False),
                pa.field("gene", pa.string(), nullable=False), pa.field("score", pa.float64()),
                pa.field("pvalue", pa.float64()), pa.field("qvalue", pa.float64()),
            ]),
        )
        return str(k), table
    return None


def _deg_rows(entry: Any) -> tuple[list, list, list, list, list, list] | None:
    """``(groups, ranks, genes, scores, pvalues, qvalues)`` of a DEG entry of ``uns``; ``None``
    when it is not one. scanpy's ``scores``, ``pvals`` and ``pvals_adj`` are kept where present."""
    groups: list[str] = []
    ranks: list[int] = []
    genes: list[str] = []
    scores: list[float | None] = []
    pvalues: list[float | None] = []
    qvalues: list[float | None] = []
    if not isinstance(entry, dict) or not entry:
        return None
    names = entry.get("names")
    if isinstance(names, np.ndarray) and names.dtype.names:
        def field(records: Any, group: str, rank: int) -> float | None:
            ok = isinstance(records, np.ndarray) and records.dtype.names and group in records.dtype.names
            return float(records[group][rank]) if ok else None

        for group in names.dtype.names:
            for rank, gene in enumerate(names[group]):
                groups.append(group)
                ranks.append(rank)
                genes.append(str(gene))
                scores.append(field(entry.get("scores"), group, rank))
                pvalues.append(field(entry.get("pvals"), group, rank))
                qvalues.append(field(entry.get("pvals_adj"), group, rank))
        return groups, ranks, genes, scores, pvalues, qvalues
    for group, listed in entry.items():
        values = np.asarray(listed)
        if values.ndim != 1 or values.dtype.kind not in "OUS":
            return None
        for rank, gene in enumerate(values):
            groups.append(str(group))
            ranks.append(rank)
            genes.append(str(gene))
            scores.append(None)
            pvalues.append(None)
            qvalues.append(None)
    return groups, ranks, genes, scores, pvalues, qvalues


# -- Finding the store of an AnnData or an .h5ad file ---------------------------------------------

#: In-process: ``id(adata)`` -> (a weak reference to it, its store), for AnnData objects imported
#: (AnnData objects refuse equality, so they cannot key a weak dictionary).
_ANNDATA_STORES: dict[int, tuple[Any, str]] = {}


def _cache_dir() -> Path:
    """Where stores made for files and AnnData objects live: ``$CPA_STREAM_CACHE/stores`` (default
    ``~/.cache/cpa-stream/stores``)."""
    root = os.environ.get("CPA_STREAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cpa-stream"
    )
    return Path(root) / "stores"


def _file_key(path: Path) -> str:
    """A file's identity as it is now: its real path, size and modification time."""
    import hashlib

    real = os.path.realpath(path)
    stat = os.stat(real)
    text = f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _zarr_key(path: Path) -> str:
    """A zarr directory's identity as it is now: its real path and every file's size and
    modification time (a chunk rewritten changes it)."""
    import hashlib

    digest = hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape"))
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            digest.update(f"\0{os.path.relpath(os.path.join(root, name), path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode(
                "utf-8", "surrogateescape"))
    return "zarr-" + digest.hexdigest()[:32]


def _is_store(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json"))


def _remember(data: Any, out: Path) -> None:
    """Records ``out`` as the store of ``data`` (an ``.h5ad`` path or an AnnData)."""
    import weakref

    if isinstance(data, (str, os.PathLike)):
        if not os.path.isfile(data):
            return
        entry = _cache_dir() / f"{_file_key(Path(data))}.json"
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"source": os.path.realpath(data), "store": os.path.abspath(out)}))
        os.replace(tmp, entry)
    elif _is_anndata(data):
        key = id(data)
        _ANNDATA_STORES[key] = (weakref.ref(data, lambda _ref, key=key: _ANNDATA_STORES.pop(key, None)),
                                os.path.abspath(out))


def _is_anndata(data: Any) -> bool:
    return all(hasattr(data, a) for a in ("obs", "var", "obs_names", "var_names", "X"))


def store_of(data: Any, progress: bool | None = None) -> str:
    """The store of ``data``: a :class:`Store` or a store's path as it is; an ``.h5ad`` path or an
    AnnData finds the store it was imported into (by :func:`import_h5ad`, or earlier by this
    function) or, the first time, imports it into the cache (``$CPA_STREAM_CACHE/stores``). A
    file's store is reused while the file is unchanged (same path, size and modification time);
    an AnnData's while the object lives in this process (after changing its obs or X, import it
    again)."""
    if isinstance(data, Store):
        return os.fspath(data)
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if is_zarr(path):
            # A zarr AnnData: imported once, found again while none of its files changed.
            key = _zarr_key(path)
            out = _cache_dir() / f"{key}.store"
            if not _is_store(out):
                import_h5ad(path, out, overwrite=out.exists(), progress=progress)
            return os.fspath(out)
        if not path.is_file():
            # A store's directory (or a path the library's error names).
            return os.fspath(path)
        entry = _cache_dir() / f"{_file_key(path)}.json"
        if entry.is_file():
            known = json.loads(entry.read_text()).get("store")
            if known and _is_store(known):
                return known
        out = _cache_dir() / f"{_file_key(path)}.store"
        if not _is_store(out):
            import_h5ad(path, out, overwrite=out.exists(), progress=progress)
        _remember(path, out)
        return os.fspath(out)
    if _is_anndata(data):
        found = _ANNDATA_STORES.get(id(data))
        if found is not None and found[0]() is data and _is_store(found[1]):
            return found[1]
        if getattr(data, "isbacked", False) and not data.is_view and data.filename is not None:
            out = store_of(Path(data.filename), progress)
            _remember(data, Path(out))
            return out
        import tempfile
        import weakref

        _cache_dir().mkdir(parents=True, exist_ok=True)
        directory = tempfile.mkdtemp(prefix="anndata-", dir=_cache_dir())
        out = Path(directory) / "store"
        import_h5ad(data, out, progress=progress)
        # The store made here goes with the object.
        import shutil

        weakref.finalize(data, shutil.rmtree, directory, True)
        return os.fspath(out)
    raise TypeError(
        f"expected a Store, a store's path, an .h5ad path or an AnnData; got {type(data).__name__}"
    )
