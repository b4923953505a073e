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

Everything runs in the Rust library the `cpa-stream` command line uses; the same request gives
the same model through either. libtorch is PyTorch's own: this package imports ``torch`` first,
so one libtorch serves both.
"""

# The native module links PyTorch's libtorch; importing torch first loads it once for both.
import torch as _torch  # noqa: F401

from ._native import CpaStreamError
from ._store import Store, import_h5ad
from ._run import Run, train

__version__ = "0.1.0"

__all__ = ["CpaStreamError", "Run", "Store", "import_h5ad", "train", "__version__"]
