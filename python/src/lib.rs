//! `cpa_stream._native`: the Rust side of the `cpa_stream` Python package.
//!
//! Thin on purpose: every command is the library's own (`cpa_stream_pipeline`), called with the
//! same options the CLI builds, so that Python and the CLI train the same model from the same
//! request. What crosses the boundary:
//! - requests and reports as JSON text (the reports are the CLI's `--json`);
//! - tables as Arrow C streams (`__arrow_c_stream__` PyCapsules), both ways, without copies;
//! - matrix chunks of an in-memory AnnData as little-endian bytes (CSR arrays).
//!
//! Long work runs on a thread of its own while the calling thread, with the GIL released between
//! polls, shows progress and watches for Ctrl-C: training then stops after the current step
//! with a checkpoint, as the CLI does.

use std::ffi::CStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow::array::{RecordBatch, RecordBatchIterator, RecordBatchReader};
use arrow::ffi_stream::{FFI_ArrowArrayStream, RecordBatchStreamReader};
use cpa_stream_pipeline::evaluate::{Definitions, EvalSplit, EvaluateOptions, run_evaluate};
use cpa_stream_pipeline::import::{ImportOptions, Tables, import_chunks, run_import};
use cpa_stream_pipeline::predict::targets::parse_target_spec;
use cpa_stream_pipeline::predict::{GeneSelection, Layout, PredictOptions, Shard, run_predict};
use cpa_stream_pipeline::predictor::Predictor;
use cpa_stream_pipeline::train::request::TrainRequest;
use cpa_stream_pipeline::train::run_train;
use cpa_stream_pipeline::{Error, Progress};
use cpa_stream_schemas::Codec;
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::sink::SinkOptions;
use cpa_stream_stages::store::Store;
use crossbeam_channel::{RecvTimeoutError, Sender, unbounded};
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyCapsule};
use serde::Deserialize;

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
// Progress: events from the working thread, shown by a Python object on the calling thread.

/// What a run reports, sent from its thread to the thread that holds the GIL.
enum Event {
    Begin(String, u64),
    Advance(u64),
    End,
    Epochs(u64, u64, u32, u32),
    Note(String),
}

/// Progress sent to the calling thread, and Ctrl-C seen there as a request to stop.
struct ChannelProgress(Sender<Event>, Arc<AtomicBool>);

impl Progress for ChannelProgress {
    fn begin(&self, phase: &str, total: u64) {
        let _ = self.0.send(Event::Begin(phase.to_owned(), total));
    }
    fn advance(&self, n: u64) {
        let _ = self.0.send(Event::Advance(n));
    }
    fn end(&self) {
        let _ = self.0.send(Event::End);
    }
    fn epochs(&self, cells_per_epoch: u64, resumed: u64, first: u32, last: u32) {
        let _ = self.0.send(Event::Epochs(cells_per_epoch, resumed, first, last));
    }
    fn note(&self, text: &str) {
        let _ = self.0.send(Event::Note(text.to_owned()));
    }
    fn cancelled(&self) -> bool {
        self.1.load(Ordering::Relaxed)
    }
}

/// Calls the Python progress object (methods `begin`, `advance`, `end`, `epochs`, `note`); a
/// failing one is reported once as unraisable and then left alone, never failing the run.
struct Shown<'py> {
    target: Option<Bound<'py, PyAny>>,
}

impl<'py> Shown<'py> {
    fn deliver(&mut self, event: Event) {
        let Some(target) = &self.target else { return };
        let called = match event {
            Event::Begin(phase, total) => target.call_method1("begin", (phase, total)),
            Event::Advance(n) => target.call_method1("advance", (n,)),
            Event::End => target.call_method0("end"),
            Event::Epochs(cells, resumed, first, last) => target.call_method1("epochs", (cells, resumed, first, last)),
            Event::Note(text) => target.call_method1("note", (text,)),
        };
        if let Err(e) = called
            && let Some(target) = self.target.take()
        {
            e.write_unraisable(target.py(), Some(&target));
        }
    }
}

/// Runs `work` on a thread of its own and shows its progress on this one, with the GIL released
/// while waiting. Ctrl-C sets `stop` where there is one (training: the run ends at its next step
/// with a checkpoint, as the CLI's first Ctrl-C); otherwise it asks the work to stop
/// ([`Progress::cancelled`]: nothing is published) and is raised as `KeyboardInterrupt` once the
/// work has ended. Returns what the work returned and whether Ctrl-C was pressed.
fn run_shown<T: Send + 'static>(
    py: Python<'_>,
    progress: Option<Bound<'_, PyAny>>,
    stop: Option<Arc<AtomicBool>>,
    work: impl FnOnce(&dyn Progress) -> cpa_stream_pipeline::Result<T> + Send + 'static,
) -> PyResult<(T, bool)> {
    let (tx, rx) = unbounded::<Event>();
    let cancel = Arc::new(AtomicBool::new(false));
    let cancelled = Arc::clone(&cancel);
    let thread = std::thread::Builder::new()
        .name("cpa-stream".to_owned())
        .spawn(move || work(&ChannelProgress(tx, cancelled)))
        .map_err(|e| PyOSError::new_err(format!("starting a thread: {e}")))?;
    let mut shown = Shown { target: progress };
    let (mut interrupted, mut pending): (bool, Option<PyErr>) = (false, None);
    loop {
        match py.detach(|| rx.recv_timeout(Duration::from_millis(100))) {
            Ok(event) => {
                shown.deliver(event);
                while let Ok(event) = rx.try_recv() {
                    shown.deliver(event);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if let Err(e) = py.check_signals() {
            if e.is_instance_of::<PyKeyboardInterrupt>(py) {
                interrupted = true;
                match &stop {
                    Some(flag) => {
                        flag.store(true, Ordering::Relaxed);
                        shown.deliver(Event::Note("interrupted: stopping after this step with a checkpoint".into()));
                    }
                    None => {
                        cancel.store(true, Ordering::Relaxed);
                        pending = Some(e);
                    }
                }
            } else {
                pending.get_or_insert(e);
            }
        }
    }
    let result = py
        .detach(|| thread.join())
        .map_err(|payload| CpaStreamError::new_err(format!("a worker thread panicked: {}", panic_text(&payload))))?;
    if let Some(e) = pending {
        return Err(e);
    }
    Ok((result.map_err(to_py)?, interrupted))
}

fn panic_text(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
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
    schema: arrow::datatypes::SchemaRef,
    reader: Arc<std::sync::Mutex<Option<Box<dyn RecordBatchReader + Send>>>>,
}

impl Iterator for Serialized {
    type Item = Result<RecordBatch, arrow::error::ArrowError>;

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
    fn schema(&self) -> arrow::datatypes::SchemaRef {
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
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Import.

fn codec(name: &str, level: i32, block_rows: u32) -> PyResult<Codec> {
    match name {
        "raw" => Ok(Codec::Raw),
        "zstd" if block_rows == 0 => Err(PyValueError::new_err("block_rows must be at least 1")),
        "zstd" if !(-7..=22).contains(&level) => Err(PyValueError::new_err("zstd_level must be in -7..=22")),
        "zstd" => Ok(Codec::zstd_with(level, block_rows)),
        other => Err(PyValueError::new_err(format!("codec {other:?}: expected \"raw\" or \"zstd\""))),
    }
}

/// Imports an `.h5ad` file into a store; returns the summary as JSON.
#[pyfunction]
#[pyo3(signature = (path, out, layer=None, use_raw=false, genes=None, deg_uns_key=None, codec_name="raw", zstd_level=1, block_rows=256, overwrite=false, allow_external=false, progress=None))]
#[allow(clippy::too_many_arguments)]
fn import_h5ad(
    py: Python<'_>,
    path: PathBuf,
    out: PathBuf,
    layer: Option<String>,
    use_raw: bool,
    genes: Option<Vec<String>>,
    deg_uns_key: Option<String>,
    codec_name: &str,
    zstd_level: i32,
    block_rows: u32,
    overwrite: bool,
    allow_external: bool,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    use cpa_stream_stages::h5ad::ExternalData;
    let options = ImportOptions {
        layer,
        use_raw,
        genes,
        deg_uns_key,
        codec: codec(codec_name, zstd_level, block_rows)?,
        overwrite,
        external: if allow_external { ExternalData::SameDirectory } else { ExternalData::Refuse },
        ..ImportOptions::default()
    };
    let (summary, _) = run_shown(py, progress, None, move |p| run_import(&path, &out, &options, p))?;
    to_json(&summary)
}

/// A synchronous progress for work that runs on the calling thread with the GIL held.
struct Direct<'py>(std::cell::RefCell<Shown<'py>>);

// SAFETY: only used on the thread that holds the GIL, inside one call (never shared).
unsafe impl Sync for Direct<'_> {}

impl Progress for Direct<'_> {
    fn begin(&self, phase: &str, total: u64) {
        self.0.borrow_mut().deliver(Event::Begin(phase.to_owned(), total));
    }
    fn advance(&self, n: u64) {
        self.0.borrow_mut().deliver(Event::Advance(n));
    }
    fn end(&self) {
        self.0.borrow_mut().deliver(Event::End);
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
/// `(indptr, indices, data)` bytes) with its obs and var tables into a store; returns the
/// summary as JSON.
#[pyfunction]
#[pyo3(signature = (what, obs, var, chunks, out, degs=None, codec_name="raw", zstd_level=1, block_rows=256, overwrite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
fn import_arrays(
    what: &str,
    obs: &Bound<'_, PyAny>,
    var: &Bound<'_, PyAny>,
    chunks: &Bound<'_, PyAny>,
    out: PathBuf,
    degs: Option<(String, Bound<'_, PyAny>)>,
    codec_name: &str,
    zstd_level: i32,
    block_rows: u32,
    overwrite: bool,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    let tables = Tables {
        obs: read_table("obs", obs)?,
        var: read_table("var", var)?,
        degs: degs.map(|(key, table)| Ok::<_, PyErr>((key, read_table("DEG table", &table)?))).transpose()?,
    };
    let n_vars = u32::try_from(tables.var.num_rows()).map_err(|_| PyValueError::new_err("too many genes"))?;
    let options =
        ImportOptions { codec: codec(codec_name, zstd_level, block_rows)?, overwrite, ..ImportOptions::default() };
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
    let progress = Direct(std::cell::RefCell::new(Shown { target: progress }));
    match import_chunks(what, &tables, rows, &out, &options, &progress) {
        Ok(summary) => to_json(&summary),
        Err(e) => Err(failed.take().unwrap_or_else(|| to_py(e))),
    }
}

/// The manifest of the store at `path` (opened and checked) as JSON.
#[pyfunction]
fn store_manifest(path: PathBuf) -> PyResult<String> {
    let store = Store::open(&path).map_err(|e| to_py(Error::stage("reader")(e)))?;
    to_json(store.manifest())
}

// ---------------------------------------------------------------------------------------------
// Train, predict, evaluate.

/// Threads and device of a model command, as the CLI plans them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Compute {
    #[serde(default = "cpu")]
    device: String,
    #[serde(default)]
    threads: Option<usize>,
    #[serde(default)]
    workers: Option<usize>,
}

fn cpu() -> String {
    "cpu".to_owned()
}

impl Compute {
    fn configure(&self) -> PyResult<(tch::Device, usize)> {
        cpa_stream_pipeline::threads::configure(&self.device, self.threads, self.workers).map_err(to_py)
    }
}

/// Trains a model; `request` is a JSON `TrainRequest`, `compute` JSON `{device, threads,
/// workers}`. Returns the report as JSON (with `interrupted` true after Ctrl-C).
#[pyfunction]
#[pyo3(signature = (request, compute, progress=None))]
fn train(py: Python<'_>, request: &str, compute: &str, progress: Option<Bound<'_, PyAny>>) -> PyResult<String> {
    let request: TrainRequest = serde_json::from_str(request).map_err(json_err("train"))?;
    let compute: Compute = serde_json::from_str(compute).map_err(json_err("train"))?;
    let (device, workers) = compute.configure()?;
    let options = request.options(device, workers).map_err(to_py)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let (report, _) = run_shown(py, progress, Some(stop), move |p| run_train(&options, p, flag))?;
    to_json(&report)
}

/// What to predict, as JSON from Python.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    model: PathBuf,
    store: PathBuf,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    targets: Vec<String>,
    #[serde(default)]
    genes: Option<Vec<String>>,
    #[serde(default)]
    top_deg: Option<usize>,
    #[serde(default)]
    degs: Option<PathBuf>,
    #[serde(default)]
    latents: Vec<String>,
    #[serde(default)]
    shard: Option<String>,
    #[serde(default)]
    batch_size: Option<usize>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    allow_empty: bool,
    #[serde(default)]
    wide: bool,
    #[serde(default)]
    batch_corrected: bool,
    #[serde(default)]
    expected_log1p: bool,
    #[serde(default)]
    change: bool,
}

impl PredictRequest {
    fn options(&self, compute: &Compute) -> PyResult<PredictOptions> {
        let (device, workers) = compute.configure()?;
        let genes = match (&self.genes, self.top_deg) {
            (Some(_), Some(_)) => return Err(PyValueError::new_err("genes and top_deg both given; choose one")),
            (Some(names), None) if names.is_empty() => return Err(PyValueError::new_err("genes: an empty list")),
            (Some(names), None) => GeneSelection::Names(names.clone()),
            (None, Some(0)) => return Err(PyValueError::new_err("top_deg must be at least 1")),
            (None, Some(k)) => GeneSelection::TopDeg(k),
            (None, None) => GeneSelection::All,
        };
        let mut options = PredictOptions::new(&self.model, &self.store);
        options.source = self.source.clone();
        options.targets = self.targets.iter().map(|t| parse_target_spec(t)).collect::<Result<_, _>>().map_err(to_py)?;
        options.genes = genes;
        options.degs = self.degs.clone();
        options.latents = self.latents.clone();
        options.shard = self.shard.as_deref().map(Shard::parse).transpose().map_err(to_py)?;
        options.device = device;
        if let Some(b) = self.batch_size {
            use cpa_stream_pipeline::limits::{MAX_BATCH_SIZE, check};
            options.batch_size = check("batch_size", b, 1, MAX_BATCH_SIZE, "cells per batch").map_err(to_py)?;
        }
        options.loader.workers = workers;
        options.seed = self.seed;
        options.allow_empty = self.allow_empty;
        options.layout = if self.wide { Layout::Wide } else { Layout::Long };
        options.batch_corrected = self.batch_corrected;
        options.expected_log1p = self.expected_log1p;
        options.change = self.change;
        Ok(options)
    }
}

/// Opens the model and store and returns the predictions as an [`ArrowStream`], computed as
/// they are read.
#[pyfunction]
fn predict_stream(py: Python<'_>, request: &str, compute: &str) -> PyResult<ArrowStream> {
    let request: PredictRequest = serde_json::from_str(request).map_err(json_err("predict"))?;
    let compute: Compute = serde_json::from_str(compute).map_err(json_err("predict"))?;
    let options = request.options(&compute)?;
    let stream = py.detach(|| Predictor::open(&options).and_then(Predictor::stream)).map_err(to_py)?;
    Ok(ArrowStream::of(stream))
}

/// Writes the predictions to a Parquet file (with a shard: into a dataset directory), as
/// `cpa-stream predict` does; returns the report as JSON.
#[pyfunction]
#[pyo3(signature = (request, compute, out, overwrite=false, progress=None))]
fn predict_file(
    py: Python<'_>,
    request: &str,
    compute: &str,
    out: PathBuf,
    overwrite: bool,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    let request: PredictRequest = serde_json::from_str(request).map_err(json_err("predict"))?;
    let compute: Compute = serde_json::from_str(compute).map_err(json_err("predict"))?;
    let options = request.options(&compute)?;
    let sink = SinkOptions { overwrite, ..SinkOptions::default() };
    let (report, _) = run_shown(py, progress, None, move |p| run_predict(&options, &out, &sink, p))?;
    to_json(&report)
}

/// An evaluation request, as JSON from Python.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvaluateRequest {
    model: PathBuf,
    store: PathBuf,
    out: PathBuf,
    #[serde(default = "test_split")]
    split: String,
    #[serde(default)]
    truth: Option<PathBuf>,
    #[serde(default)]
    degs: Option<PathBuf>,
    #[serde(default)]
    min_cells: Option<u64>,
    #[serde(default)]
    definitions: Option<String>,
    #[serde(default)]
    expected_log1p: bool,
    #[serde(default)]
    plots: bool,
    #[serde(default)]
    overwrite: bool,
    #[serde(default)]
    batch_size: Option<usize>,
}

fn test_split() -> String {
    "test".to_owned()
}

/// Evaluates a model as `cpa-stream evaluate` does; returns the report as JSON.
#[pyfunction]
#[pyo3(signature = (request, compute, progress=None))]
fn evaluate(py: Python<'_>, request: &str, compute: &str, progress: Option<Bound<'_, PyAny>>) -> PyResult<String> {
    let request: EvaluateRequest = serde_json::from_str(request).map_err(json_err("evaluate"))?;
    let compute: Compute = serde_json::from_str(compute).map_err(json_err("evaluate"))?;
    let (device, _) = compute.configure()?;
    let mut options = EvaluateOptions::new(&request.model, &request.store, &request.out);
    options.split = EvalSplit::parse(&request.split).map_err(to_py)?;
    options.truth = request.truth;
    options.degs = request.degs;
    options.device = device;
    options.plots = request.plots;
    options.overwrite = request.overwrite;
    if let Some(d) = &request.definitions {
        options.definitions = Definitions::parse(d).map_err(to_py)?;
    }
    options.min_cells = request.min_cells.unwrap_or(options.definitions.min_cells());
    options.expected_log1p = request.expected_log1p;
    if let Some(b) = request.batch_size {
        use cpa_stream_pipeline::limits::{MAX_BATCH_SIZE, check};
        options.batch_size = Some(check("batch_size", b, 1, MAX_BATCH_SIZE, "cells per batch").map_err(to_py)?);
    }
    let (report, _) = run_shown(py, progress, None, move |p| run_evaluate(&options, p))?;
    to_json(&report)
}

/// A dose-response request, as JSON from Python.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DoseResponseRequest {
    model: PathBuf,
    out: PathBuf,
    #[serde(default)]
    store: Option<PathBuf>,
    #[serde(default)]
    perturbations: Vec<String>,
    #[serde(default)]
    doses: Option<Vec<f64>>,
    #[serde(default)]
    genes: Vec<String>,
    #[serde(default)]
    covariates: Vec<(String, String)>,
    #[serde(default)]
    cells: Option<usize>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    plots: bool,
    #[serde(default)]
    overwrite: bool,
}

/// Dose-response curves as `cpa-stream dose-response` computes them; returns the report as JSON.
#[pyfunction]
fn dose_response(py: Python<'_>, request: &str, compute: &str) -> PyResult<String> {
    use cpa_stream_pipeline::dose_response::{DoseResponseOptions, run_dose_response};
    let request: DoseResponseRequest = serde_json::from_str(request).map_err(json_err("dose_response"))?;
    let compute: Compute = serde_json::from_str(compute).map_err(json_err("dose_response"))?;
    let (device, _) = compute.configure()?;
    let mut options = DoseResponseOptions::new(&request.model, &request.out);
    options.store = request.store;
    options.perturbations = request.perturbations;
    options.doses = request.doses;
    options.genes = request.genes;
    options.covariates = request.covariates;
    options.cells = request.cells.unwrap_or(options.cells);
    options.seed = request.seed;
    options.plots = request.plots;
    options.overwrite = request.overwrite;
    options.device = device;
    let report = py.detach(|| run_dose_response(&options)).map_err(to_py)?;
    to_json(&report)
}

/// The model's perturbation (`kind` "perturbation") or covariate ("covariate") embeddings.
#[pyfunction]
fn embeddings(py: Python<'_>, model: PathBuf, kind: &str) -> PyResult<ArrowStream> {
    use cpa_stream_pipeline::embeddings::{covariate_embeddings, perturbation_embeddings};
    let batch = match kind {
        "perturbation" => py.detach(|| perturbation_embeddings(&model)),
        "covariate" => py.detach(|| covariate_embeddings(&model)),
        other => return Err(PyValueError::new_err(format!("kind {other:?}: expected perturbation or covariate"))),
    };
    Ok(ArrowStream::of_batch(batch.map_err(to_py)?))
}

/// What a run recorded: `{"encoder": ..., "config": ...}` of its checkpoint, as JSON.
#[pyfunction]
fn run_settings(run: PathBuf) -> PyResult<String> {
    let (encoder, config) = cpa_stream_pipeline::train::recorded_settings(&run).map_err(to_py)?;
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
        cpa_stream_stages::model::files::read_model_file(&dir).map_err(|e| to_py(Error::stage("predictor")(e)))?;
    to_json(&file.vocabulary)
}

/// The native module's version.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CpaStreamError", m.py().get_type::<CpaStreamError>())?;
    m.add_class::<ArrowStream>()?;
    m.add_function(wrap_pyfunction!(import_h5ad, m)?)?;
    m.add_function(wrap_pyfunction!(import_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(store_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(predict_stream, m)?)?;
    m.add_function(wrap_pyfunction!(predict_file, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(embeddings, m)?)?;
    m.add_function(wrap_pyfunction!(dose_response, m)?)?;
    m.add_function(wrap_pyfunction!(run_settings, m)?)?;
    m.add_function(wrap_pyfunction!(model_vocabulary, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
