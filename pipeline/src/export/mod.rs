//! `export`: store reader -> `.h5ad` writer (CSR `X`, `obs`, `var`, DEG lists in `uns`).

mod request;

use std::path::PathBuf;
use std::time::Instant;

use arrow_array::RecordBatch;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::h5ad::{DEG_FILE, H5adCompression, H5adWriter};
use cpa_stream_stages::store::{Access, Store};

use serde::Serialize;

pub use request::{ExportCompression, ExportRequest};

use crate::Stage;
use crate::context::RunContext;
use crate::error::{Error, Result};
use crate::telemetry::{MemorySampler, RunReport, StageStats};
use crate::two_stage::{send_store_rows, two_stage};

/// Rows per chunk sent to the writer (about 7 MB of rows at 5,000 genes and 17% density).
const BATCH_ROWS: usize = 1024;
/// Chunks queued between reader and writer.
const CHANNEL_DEPTH: usize = 4;
/// `uns` key of exported DEG lists when the store does not record one.
pub const DEFAULT_DEG_KEY: &str = "rank_genes_groups_cov";

/// What `export` writes.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The store read.
    pub store: PathBuf,
    /// The AnnData file written.
    pub out: PathBuf,
    /// Compression of the written datasets; default none (anndata's).
    pub compression: H5adCompression,
    /// Replace an existing file; default false.
    pub overwrite: bool,
}

impl ExportOptions {
    /// Options with every default, from `store` to `out`.
    pub fn new(store: impl Into<PathBuf>, out: impl Into<PathBuf>) -> ExportOptions {
        ExportOptions { store: store.into(), out: out.into(), compression: H5adCompression::None, overwrite: false }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The file written.
    pub out: PathBuf,
    /// Cells written.
    pub cells: u64,
    /// Genes written.
    pub genes: u64,
    /// Bytes of the file.
    pub bytes: u64,
    /// Stages, wall time and peak memory.
    pub report: RunReport,
}

/// Writes the store `options.store` as an AnnData file at `options.out`.
pub fn run(options: &ExportOptions, ctx: &RunContext) -> Result<ExportReport> {
    cpa_stream_stages::output::check_not_an_input(&options.out, [&options.store])
        .map_err(Error::stage(Stage::Write))?;
    let store = Store::open(&options.store).map_err(Error::stage(Stage::Read))?;
    let (out, progress) = (options.out.as_path(), ctx.progress());
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let read = StageStats::new(Stage::Read, 1);
    let write = StageStats::new(Stage::Write, 1);
    let var = store.small_table(StoreFiles::VAR).map_err(Error::stage(Stage::Read))?;
    let obs_schema = store.table_schema(StoreFiles::OBS).map_err(Error::stage(Stage::Read))?;
    let mut writer = H5adWriter::create(out, &var, &obs_schema, store.nnz(), options.compression, options.overwrite)
        .map_err(Error::stage(Stage::Write))?;
    store.advise(Access::Sequential);
    progress.begin("cells", store.n_obs());
    let result = two_stage(
        Stage::Read,
        &read,
        &write,
        CHANNEL_DEPTH,
        |out| send_store_rows(&store, BATCH_ROWS, &read, out),
        |(rows, obs): (CsrBatch, RecordBatch)| {
            write.busy(|| writer.append(&rows, &obs)).map_err(Error::stage(Stage::Write))?;
            write.add(rows.n_rows() as u64, rows.byte_size());
            progress.advance(rows.n_rows() as u64);
            ctx.check_stopped()
        },
    );
    progress.end();
    result?;
    if store.has_file(DEG_FILE) {
        let table = store.small_table(DEG_FILE).map_err(Error::stage(Stage::Read))?;
        let key = table.schema().metadata().get("uns_key").cloned().unwrap_or_else(|| DEFAULT_DEG_KEY.to_owned());
        writer.write_degs(&key, &table).map_err(Error::stage(Stage::Write))?;
    }
    write.busy(|| writer.finish()).map_err(Error::stage(Stage::Write))?;
    let report =
        RunReport { wall: started.elapsed(), stages: vec![read.report(), write.report()], memory: sampler.finish() };
    Ok(ExportReport {
        out: out.to_owned(),
        cells: store.n_obs(),
        genes: store.n_vars(),
        bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
        report,
    })
}
