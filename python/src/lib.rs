//! `cpa_stream._native`: the Rust side of the `cpa_stream` Python package.
//!
//! Thin on purpose: every command is the library's own (`cpa_stream_pipeline`), called with the
//! same options the CLI builds, so that Python and the CLI train the same model from the same
//! request. What crosses the boundary:
//! - requests and reports as JSON text (the reports are the CLI's `--json`);
//! - tables as Arrow C streams (`__arrow_c_stream__` PyCapsules), both ways, without copies;
//! - matrix chunks of an in-memory AnnData as little-endian bytes (CSR arrays).
//!
//! Long work runs on the calling thread with the GIL released while a thread of its own shows
//! progress and watches for Ctrl-C: training then stops after the current step with a
//! checkpoint, as the CLI does (`shown`).

mod metrics;
mod shown;

use std::ffi::CStr;
use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::ffi_stream::{FFI_ArrowArrayStream, RecordBatchStreamReader};
use arrow_array::{RecordBatch, RecordBatchIterator, RecordBatchReader};
use cpa_stream_engine::dose_response::DoseResponseRequest;
use cpa_stream_engine::embeddings::EmbeddingsRequest;
use cpa_stream_engine::evaluate::EvaluateRequest;
use cpa_stream_engine::predict::PredictRequest;
use cpa_stream_engine::train::request::TrainRequest;
use cpa_stream_pipeline::convert::ConvertRequest;
use cpa_stream_pipeline::export::ExportRequest;
use cpa_stream_pipeline::import::{ImportRequest, Tables};
use cpa_stream_pipeline::request::Naming;
use cpa_stream_pipeline::score::ScoreRequest;
use cpa_stream_pipeline::synth::SynthRequest;
use cpa_stream_pipeline::{Error, Progress, RunContext, Stage};
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::store::Store;
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyCapsule};
use shown::{Event, OnInterrupt, Shown, run_shown};

pyo3::create_exception!(
    _native,
    CpaStreamError,
    PyRuntimeError,
    "A failure inside cpa-stream that is neither bad input (ValueError) nor a file (OSError)."
);

/// The capsule name of the Arrow C stream interface.
const STREAM_CAPSULE: &CStr = c"arrow_array_stream";

/// A library error as the Python exception a user would expect: bad input `ValueError`, files
/// `OSError` (`FileNotFoundError` for a missing one, `FileExistsError` for an output that exists,
/// damaged files of a store or model), anything else `CpaStreamError`.
fn to_py(err: Error) -> PyErr {
    use cpa_stream_stages::Error as StageError;
    let message = err.to_string();
    if matches!(err, Error::Interrupted) {
        return PyKeyboardInterrupt::new_err(message);
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    let mut invalid = matches!(err, Error::InvalidInput(_));
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
                std::io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(message),
                _ => PyOSError::new_err(message),
            };
        }
        match e.downcast_ref::<StageError>() {
            Some(StageError::OutputExists { .. }) => return PyFileExistsError::new_err(message),
            Some(
                StageError::Manifest { .. }
                | StageError::SizeMismatch { .. }
                | StageError::ChecksumMismatch { .. }
                | StageError::Corrupt { .. },
            ) => return PyOSError::new_err(message),
            Some(StageError::InvalidInput(_) | StageError::Unsupported { .. }) => invalid = true,
            _ => {}
        }
        cause = e.source();
    }
    if invalid { PyValueError::new_err(message) } else { CpaStreamError::new_err(message) }
}

fn json_err(what: &str) -> impl Fn(serde_json::Error) -> PyErr + '_ {
    move |e| PyValueError::new_err(format!("{what}: {e}"))
}

fn to_json<T: serde::Serialize>(value: &T) -> PyResult<String> {
    serde_json::to_string(value).map_err(|e| CpaStreamError::new_err(format!("report to JSON: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Arrow C streams, both ways.

/// A stream of record batches that Python reads through the Arrow PyCapsule interface
/// (`pyarrow.RecordBatchReader.from_stream`, `polars.DataFrame`, DuckDB). It can be exported
/// once; the batches are made as they are read (predictions are computed on demand).
#[pyclass(module = "cpa_stream._native")]
struct ArrowStream {
    reader: std::sync::Mutex<Option<Box<dyn RecordBatchReader + Send>>>,
}

/// An `FFI_ArrowArrayStream` that may move to the thread that drops the capsule (it owns its
/// private data; the release callback is thread-safe for our readers, which are `Send`).
#[allow(dead_code)] // read through the capsule pointer; held for its release on drop
struct SendStream(FFI_ArrowArrayStream);
// SAFETY: the stream wraps a `Box<dyn RecordBatchReader + Send>`; nothing in it is tied to a thread.
unsafe impl Send for SendStream {}

#[pymethods]
impl ArrowStream {
    /// Exports the stream as an `arrow_array_stream` PyCapsule (the Arrow PyCapsule interface).
    /// A requested schema other than the stream's own is not supported and is ignored, as the
    /// interface allows.
    #[pyo3(signature = (requested_schema = None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        let _ = requested_schema;
        let reader = self
            .reader
            .lock()
            .map_err(|_| CpaStreamError::new_err("the stream's lock was poisoned"))?
            .take()
            .ok_or_else(|| PyValueError::new_err("this stream was already read; ask for the predictions again"))?;
        let stream = SendStream(FFI_ArrowArrayStream::new(reader));
        // The capsule points at the stream (first field); a consumer moves it out and leaves a
        // released one, which dropping then ignores.
        PyCapsule::new_with_value(py, stream, STREAM_CAPSULE)
    }
}

impl ArrowStream {
    fn of(reader: impl RecordBatchReader + Send + 'static) -> ArrowStream {
        let serialized =
            Serialized { schema: reader.schema(), reader: Arc::new(std::sync::Mutex::new(Some(Box::new(reader)))) };
        ArrowStream { reader: std::sync::Mutex::new(Some(Box::new(serialized))) }
    }

    fn of_batch(batch: RecordBatch) -> ArrowStream {
        let schema = batch.schema();
        ArrowStream::of(RecordBatchIterator::new([Ok(batch)], schema))
    }
}

/// A reader that Python threads may share (pyarrow releases the GIL while it asks the stream
/// for the next batch, so two threads reading one `RecordBatchReader` call it at once): one
/// batch at a time, and after the end (or an error) only the end.
struct Serialized {
    schema: arrow_schema::SchemaRef,
    reader: Arc<std::sync::Mutex<Option<Box<dyn RecordBatchReader + Send>>>>,
}

impl Iterator for Serialized {
    type Item = Result<RecordBatch, arrow_schema::ArrowError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut reader = self.reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = reader.as_mut()?.next();
        if !matches!(next, Some(Ok(_))) {
            // Ended or failed: the stream's threads are released now, and later calls see the end.
            *reader = None;
        }
        next
    }
}

impl RecordBatchReader for Serialized {
    fn schema(&self) -> arrow_schema::SchemaRef {
        Arc::clone(&self.schema)
    }
}

/// Reads an object with `__arrow_c_stream__` (a pyarrow Table or RecordBatchReader, a polars
/// DataFrame, ...) into one record batch; `what` names it in errors.
fn read_table(what: &str, object: &Bound<'_, PyAny>) -> PyResult<RecordBatch> {
    let capsule = object.call_method0("__arrow_c_stream__").map_err(|_| {
        PyValueError::new_err(format!("{what}: expected an Arrow table (an object with __arrow_c_stream__)"))
    })?;
    let capsule = capsule.cast::<PyCapsule>().map_err(|_| PyValueError::new_err(format!("{what}: not a PyCapsule")))?;
    let pointer = capsule.pointer_checked(Some(STREAM_CAPSULE))?;
    // SAFETY: a live `arrow_array_stream` capsule points at a valid stream; `from_raw` moves it
    // out and leaves a released one for the capsule's destructor.
    let reader = unsafe { RecordBatchStreamReader::from_raw(pointer.as_ptr().cast()) }
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>().map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
    arrow_select::concat::concat_batches(&schema, &batches).map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Import.

/// A synchronous progress for work that runs on the calling thread with the GIL held.
struct Direct<'py>(Python<'py>, std::cell::RefCell<Shown>);

// SAFETY: only used on the thread that holds the GIL, inside one call (never shared).
unsafe impl Sync for Direct<'_> {}

impl Progress for Direct<'_> {
    fn begin(&self, phase: &str, total: u64) {
        self.1.borrow_mut().deliver(self.0, Event::Begin(phase.to_owned(), total));
    }
    fn advance(&self, n: u64) {
        self.1.borrow_mut().deliver(self.0, Event::Advance(n));
    }
    fn end(&self) {
        self.1.borrow_mut().deliver(self.0, Event::End);
    }
}

/// Little-endian bytes as a vector of `T` (the bytes of a NumPy array, any alignment).
fn pod_vec<T: bytemuck::Pod>(what: &str, bytes: &[u8]) -> PyResult<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return Err(PyValueError::new_err(format!(
            "{what}: {} bytes is not a whole number of {size}-byte values",
            bytes.len()
        )));
    }
    Ok(bytes.chunks_exact(size).map(bytemuck::pod_read_unaligned).collect())
}

/// One chunk of CSR rows from `(indptr u64, indices u32, data f32)` bytes, checked so that
/// building it cannot panic.
fn csr_chunk(n_vars: u32, item: &Bound<'_, PyAny>) -> PyResult<CsrBatch> {
    let (indptr, indices, data): (Bound<'_, PyBytes>, Bound<'_, PyBytes>, Bound<'_, PyBytes>) = item.extract()?;
    let indptr: Vec<u64> = pod_vec("indptr", indptr.as_bytes())?;
    let indices: Vec<u32> = pod_vec("indices", indices.as_bytes())?;
    let data: Vec<f32> = pod_vec("data", data.as_bytes())?;
    let first = indptr.first().copied().unwrap_or(0);
    let monotone = indptr.windows(2).all(|w| w[0] <= w[1]);
    if indptr.is_empty() || !monotone || indptr.last().copied() != Some(first + indices.len() as u64) {
        return Err(PyValueError::new_err(
            "a matrix chunk's indptr is not non-decreasing or does not match its entries",
        ));
    }
    if indices.len() != data.len() {
        return Err(PyValueError::new_err(format!(
            "a matrix chunk has {} indices and {} values",
            indices.len(),
            data.len()
        )));
    }
    let mut batch = CsrBatch::new(n_vars);
    batch.push_rows(&indptr, &indices, &data);
    Ok(batch)
}

/// Imports an in-memory matrix (chunks of CSR rows from `chunks`, an iterator of
/// `(indptr, indices, data)` bytes) with its obs and var tables into a store, as the JSON
/// [`ImportRequest`] says (its `out`, codec and `overwrite`; it has no input file); returns the
/// report as JSON.
#[pyfunction]
#[pyo3(signature = (request, what, obs, var, chunks, degs=None, progress=None))]
fn import_arrays(
    request: &str,
    what: &str,
    obs: &Bound<'_, PyAny>,
    var: &Bound<'_, PyAny>,
    chunks: &Bound<'_, PyAny>,
    degs: Option<(String, Bound<'_, PyAny>)>,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    let options = self::request::<ImportRequest>("import", request)?.options().map_err(to_py)?;
    let tables = Tables {
        obs: read_table("obs", obs)?,
        var: read_table("var", var)?,
        degs: degs.map(|(key, table)| Ok::<_, PyErr>((key, read_table("DEG table", &table)?))).transpose()?,
    };
    let n_vars = u32::try_from(tables.var.num_rows()).map_err(|_| PyValueError::new_err("too many genes"))?;
    // A Python error of the iterator (or a bad chunk) ends the import; it is raised as itself.
    let failed: std::cell::RefCell<Option<PyErr>> = std::cell::RefCell::new(None);
    let iter = chunks.try_iter()?;
    let rows = iter.map(|item| {
        let chunk = item.and_then(|item| csr_chunk(n_vars, &item));
        chunk.map_err(|e| {
            let message = e.to_string();
            failed.borrow_mut().replace(e);
            Error::InvalidInput(message)
        })
    });
    let progress = Direct(obs.py(), std::cell::RefCell::new(Shown { target: progress.map(Bound::unbind) }));
    match cpa_stream_pipeline::import::run_chunks(what, &tables, rows, &options, &RunContext::new(&progress)) {
        Ok(summary) => to_json(&summary),
        Err(e) => Err(failed.take().unwrap_or_else(|| to_py(e))),
    }
}

/// The manifest of the store at `path` (opened and checked) as JSON.
#[pyfunction]
fn store_manifest(path: PathBuf) -> PyResult<String> {
    let store = Store::open(&path).map_err(|e| to_py(Error::stage(Stage::Reader)(e)))?;
    to_json(store.manifest())
}

// ---------------------------------------------------------------------------------------------
// Train, predict, evaluate.

/// A request of the library's type `T` from the JSON Python built (unknown keys are errors
/// naming them, as for the CLI's flags).
fn request<T: serde::de::DeserializeOwned>(what: &str, json: &str) -> PyResult<T> {
    serde_json::from_str(json).map_err(json_err(what))
}

/// The commands `run` and `canonical_request` know: the command registry's that take a request,
/// as the CLI names them (a test holds both functions to the registry).
fn request_commands() -> String {
    cpa_stream_pipeline::commands::names(|k| k.takes_request)
}

/// The command registry: per command, its name and whether it runs in the engine, runs the
/// model and takes a request (`cpa_stream_pipeline::commands::COMMANDS`).
#[pyfunction]
fn commands() -> Vec<(&'static str, bool, bool, bool)> {
    cpa_stream_pipeline::commands::COMMANDS
        .iter()
        .map(|k| (k.name, k.in_engine, k.runs_model, k.takes_request))
        .collect()
}

/// Runs a command of the library as `cpa-stream COMMAND` runs it: `request` is its JSON request
/// (the library's `*Request`, as `cpa-stream COMMAND --print-request` prints it); returns its
/// report as JSON. Training returns its report with `interrupted` set after Ctrl-C; the other
/// commands publish nothing and raise `KeyboardInterrupt`.
#[pyfunction]
#[pyo3(signature = (command, request, progress=None))]
fn run(py: Python<'_>, command: &str, request: &str, progress: Option<Bound<'_, PyAny>>) -> PyResult<String> {
    use OnInterrupt::{Checkpoint, Raise};
    use cpa_stream_engine as e;
    use cpa_stream_pipeline as p;
    macro_rules! command {
        ($request:ty, $run:path, $on_interrupt:expr) => {{
            let options = self::request::<$request>(command, request)?.options().map_err(to_py)?;
            to_json(&run_shown(py, progress, $on_interrupt, move |ctx| $run(&options, ctx))?)
        }};
    }
    match command {
        "train" => command!(TrainRequest, e::train::run, Checkpoint),
        "predict" => command!(PredictRequest, e::predict::run, Raise),
        "evaluate" => command!(EvaluateRequest, e::evaluate::run, Raise),
        "dose-response" => command!(DoseResponseRequest, e::dose_response::run, Raise),
        "embeddings" => command!(EmbeddingsRequest, e::embeddings::run, Raise),
        "import" => command!(ImportRequest, p::import::run, Raise),
        "export" => command!(ExportRequest, p::export::run, Raise),
        "convert" => command!(ConvertRequest, p::convert::run, Raise),
        "synth" => command!(SynthRequest, p::synth::run, Raise),
        "score" => command!(ScoreRequest, p::score::run, Raise),
        other => Err(PyValueError::new_err(format!("command {other:?}: expected one of {}", request_commands()))),
    }
}

/// The request as the library reads it, written back as JSON with every field (defaults
/// filled in) and the CLI's naming: two requests that read the same compare equal. What the
/// tests compare the CLI's `--print-request` with.
#[pyfunction]
fn canonical_request(command: &str, request: &str) -> PyResult<String> {
    fn canonical<T: serde::de::DeserializeOwned + serde::Serialize>(
        command: &str,
        json: &str,
        naming: impl FnOnce(&mut T) -> &mut Naming,
    ) -> PyResult<String> {
        let mut value: T = self::request(command, json)?;
        *naming(&mut value) = Naming::Flags;
        to_json(&value)
    }
    match command {
        "train" => canonical(command, request, |r: &mut TrainRequest| &mut r.naming),
        "predict" => canonical(command, request, |r: &mut PredictRequest| &mut r.naming),
        "evaluate" => canonical(command, request, |r: &mut EvaluateRequest| &mut r.naming),
        "dose-response" => canonical(command, request, |r: &mut DoseResponseRequest| &mut r.naming),
        "embeddings" => canonical(command, request, |r: &mut EmbeddingsRequest| &mut r.naming),
        "import" => canonical(command, request, |r: &mut ImportRequest| &mut r.naming),
        "export" => canonical(command, request, |r: &mut ExportRequest| &mut r.naming),
        "convert" => canonical(command, request, |r: &mut ConvertRequest| &mut r.naming),
        "synth" => canonical(command, request, |r: &mut SynthRequest| &mut r.naming),
        "score" => canonical(command, request, |r: &mut ScoreRequest| &mut r.naming),
        other => Err(PyValueError::new_err(format!("command {other:?}: expected one of {}", request_commands()))),
    }
}

/// Opens the model and store of a JSON [`PredictRequest`] and returns the predictions as an
/// [`ArrowStream`], computed as they are read.
#[pyfunction]
fn predict_stream(py: Python<'_>, request: &str) -> PyResult<ArrowStream> {
    let options = self::request::<PredictRequest>("predict", request)?.options().map_err(to_py)?;
    shown::set_allocator();
    let stream = py.detach(|| cpa_stream_engine::predict::open(&options)).map_err(to_py)?;
    Ok(ArrowStream::of(stream))
}

/// The perturbation (`kind` "perturbation") or covariate ("covariate") embeddings of the model
/// of a JSON [`EmbeddingsRequest`].
#[pyfunction]
fn embeddings(py: Python<'_>, request: &str, kind: &str) -> PyResult<ArrowStream> {
    let options = self::request::<EmbeddingsRequest>("embeddings", request)?.options().map_err(to_py)?;
    let opened = py.detach(|| cpa_stream_engine::embeddings::open(&options)).map_err(to_py)?;
    let batch = match kind {
        "perturbation" => opened.perturbations,
        "covariate" => opened.covariates,
        other => return Err(PyValueError::new_err(format!("kind {other:?}: expected perturbation or covariate"))),
    };
    Ok(ArrowStream::of_batch(batch))
}

/// What a run recorded: `{"encoder": ..., "config": ...}` of its checkpoint, as JSON.
#[pyfunction]
fn run_settings(run: PathBuf) -> PyResult<String> {
    let (encoder, config) = cpa_stream_engine::train::recorded_settings(&run).map_err(to_py)?;
    let encoder = serde_json::json!({
        "perturbation_key": encoder.perturbation_key,
        "dose_key": encoder.dose_key,
        "control": encoder.control,
        "covariate_keys": encoder.covariate_keys,
        "batch_key": encoder.batch_key,
        "max_comb_len": encoder.max_comb_len,
    });
    to_json(&serde_json::json!({ "encoder": encoder, "config": config }))
}

/// The vocabulary of the model at `model` (a run or model directory) as JSON.
#[pyfunction]
fn model_vocabulary(model: PathBuf) -> PyResult<String> {
    let dir = cpa_stream_pipeline::run_dir::model_dir(&model).map_err(to_py)?;
    let file =
        cpa_stream_stages::model::files::read_model_file(&dir).map_err(|e| to_py(Error::stage(Stage::Predictor)(e)))?;
    to_json(&file.vocabulary)
}

/// Builds a cpa-stream model at `out` from another tool's trained weights: `config` and
/// `vocabulary` as JSON (a model file's tables), `weights` a safetensors file of the model's
/// variable names. Returns what was done, as JSON.
#[pyfunction]
fn import_model(py: Python<'_>, config: &str, vocabulary: &str, weights: PathBuf, out: PathBuf) -> PyResult<String> {
    let config: cpa_stream_stages::model::CpaConfig = serde_json::from_str(config).map_err(json_err("config"))?;
    let vocabulary: cpa_stream_stages::model::Vocabulary =
        serde_json::from_str(vocabulary).map_err(json_err("vocabulary"))?;
    let summary = py
        .detach(|| cpa_stream_engine::model::import::import_weights(&config, &vocabulary, &weights, &out))
        .map_err(|e| to_py(Error::stage(Stage::Predictor)(e)))?;
    to_json(&summary)
}

/// The native module's version.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // A library's panic on a damaged file becomes an exception naming it, without a panic line.
    cpa_stream_stages::crew::install_quiet_panic_hook();
    m.add("CpaStreamError", m.py().get_type::<CpaStreamError>())?;
    m.add_class::<ArrowStream>()?;
    m.add_function(wrap_pyfunction!(import_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(store_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_request, m)?)?;
    m.add_function(wrap_pyfunction!(commands, m)?)?;
    m.add_function(wrap_pyfunction!(predict_stream, m)?)?;
    m.add_function(wrap_pyfunction!(embeddings, m)?)?;
    m.add_function(wrap_pyfunction!(run_settings, m)?)?;
    m.add_function(wrap_pyfunction!(model_vocabulary, m)?)?;
    m.add_function(wrap_pyfunction!(import_model, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    metrics::register(m)?;
    Ok(())
}
