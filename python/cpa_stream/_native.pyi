"""Type stubs of the native module (Rust, PyO3). The public API is in ``cpa_stream``; these
functions take and return JSON text and Arrow streams."""

from collections.abc import Iterable
from typing import Any, Protocol

class CpaStreamError(RuntimeError):
    """A failure inside cpa-stream that is neither bad input (ValueError) nor a file (OSError)."""

class _Progress(Protocol):
    def begin(self, phase: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def end(self) -> None: ...
    def epochs(self, cells_per_epoch: int, resumed: int, first: int, last: int) -> None: ...
    def note(self, text: str) -> None: ...

class ArrowStream:
    """Record batches exported once through the Arrow PyCapsule stream interface."""

    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object: ...

def import_h5ad(
    path: str,
    out: str,
    layer: str | None = None,
    use_raw: bool = False,
    genes: list[str] | None = None,
    deg_uns_key: str | None = None,
    codec_name: str = "raw",
    zstd_level: int = 1,
    block_rows: int = 256,
    overwrite: bool = False,
    allow_external: bool = False,
    progress: _Progress | None = None,
) -> str: ...
def import_arrays(
    what: str,
    obs: Any,
    var: Any,
    chunks: Iterable[tuple[bytes, bytes, bytes]],
    out: str,
    degs: tuple[str, Any] | None = None,
    codec_name: str = "raw",
    zstd_level: int = 1,
    block_rows: int = 256,
    overwrite: bool = False,
    progress: _Progress | None = None,
) -> str: ...
def store_manifest(path: str) -> str: ...
def train(request: str, compute: str, progress: _Progress | None = None) -> str: ...
def predict_stream(request: str, compute: str) -> ArrowStream: ...
def predict_file(
    request: str, compute: str, out: str, overwrite: bool = False, progress: _Progress | None = None
) -> str: ...
def evaluate(request: str, compute: str, progress: _Progress | None = None) -> str: ...
def embeddings(model: str, kind: str) -> ArrowStream: ...
def dose_response(request: str, compute: str) -> str: ...
def run_settings(run: str) -> str: ...
def model_vocabulary(model: str) -> str: ...
def version() -> str: ...
