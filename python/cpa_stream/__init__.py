"""cpa-stream from Python: the Compositional Perturbation Autoencoder (CPA) on single-cell atlases
larger than memory.

The workflow of a cpa-tools user, out of core::

    import cpa_stream as cs

    store = cs.import_h5ad(adata, "atlas.store")           # an AnnData (in memory or backed) or a path
    run = cs.train(store, "run", perturbation_key="condition", dosage_key="dose",
                   control_group="ctrl", categorical_covariate_keys=["cell_type"], max_epochs=50)
    run.history                                            # per-epoch losses and validation scores
    adata.obsm["X_cpa_basal"] = run.latents(store)["z_basal"]
    reader = run.predict(store, targets="condition=A+B,dose=1+1")   # a pyarrow.RecordBatchReader
    pred = run.predict_anndata(store, targets=["A+B"])     # an AnnData, when it fits in memory
    run.evaluate(store)                                    # the metrics as a DataFrame
    cs.export_h5ad(store, "atlas.h5ad")                    # back to AnnData, streamed

Every command of the ``cpa-stream`` command line is here with the same settings as keywords
(``cs.synth``, ``cs.convert``, ``cs.export_h5ad``, ``cs.import_h5ad``, ``cs.train``,
``Run.predict_to_parquet``, ``Run.evaluate``, ``Run.dose_response``, ``cs.score``); ``cpa-stream COMMAND
--print-request`` prints the request a command line makes, the same JSON these keywords build.

Everything runs in the Rust library the `cpa-stream` command line uses; the same request gives
the same model through either. libtorch is PyTorch's own, loaded by the native module from the
``torch`` package installed beside it without importing torch's Python side (a second of start);
``import torch`` before or after finds the same libraries already loaded, so one libtorch serves
both.
"""

# libtorch's OpenMP runtime reads its wait policy when it is loaded, here with the native module:
# on busy CPUs, passive (see _openmp).
from . import _openmp


def _dependencies() -> None:
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401


_openmp.prepare(meanwhile=_dependencies)

from ._native import CpaStreamError  # noqa: E402
from ._store import Store, convert, export_h5ad, import_h5ad, synth  # noqa: E402
from ._run import Run, train  # noqa: E402
from ._score import score  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CpaStreamError", "Run", "Store", "convert", "export_h5ad", "import_h5ad", "score", "synth", "train",
    "__version__",
]
