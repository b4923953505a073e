//! `export`: store reader -> `.h5ad` writer (CSR `X`, `obs`, `var`, DEG lists in `uns`).

mod request;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{BooleanArray, RecordBatch};
use arrow_schema::{Field, Schema, SchemaRef};
use cpa_stream_schemas::StoreFiles;
use cpa_stream_schemas::tables::{CATEGORIES_KEY, categories_of};
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::h5ad::{DEG_FILE, H5adCompression, H5adWriter};
use cpa_stream_stages::store::{Access, Store, TableFile};

use serde::Serialize;

pub use request::{ExportCompression, ExportRequest};

use crate::Stage;
use crate::context::RunContext;
use crate::error::{Error, Result};
use crate::obs::expr::Expr;
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
    /// Only the cells this selects; default every cell.
    pub cells: Option<CellSelection>,
}

/// The cells an export writes: an expression over the obs columns (`--source`'s language).
#[derive(Debug, Clone)]
pub struct CellSelection {
    /// The parsed expression.
    pub expr: Expr,
    /// The setting as the user wrote it (`--cells "..."`), for messages.
    pub given: String,
}

impl ExportOptions {
    /// Options with every default, from `store` to `out`.
    pub fn new(store: impl Into<PathBuf>, out: impl Into<PathBuf>) -> ExportOptions {
        ExportOptions {
            store: store.into(),
            out: out.into(),
            compression: H5adCompression::None,
            overwrite: false,
            cells: None,
        }
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
    let origin = options.store.display().to_string();
    let obs_schema = match &options.cells {
        None => obs_schema,
        Some(cells) => {
            let names: Vec<&str> = obs_schema.fields().iter().map(|f| f.name().as_str()).collect();
            if let Some(missing) = cells.expr.columns().into_iter().find(|c| !names.contains(c)) {
                return Err(Error::InvalidInput(format!(
                    "{origin}: {} reads the obs column {missing:?}, which the store does not have (closest: {})",
                    cells.given,
                    crate::suggest::listing(missing, names.iter().copied(), 5)
                )));
            }
            let (schema, selected) = selected_schema(&store, &obs_schema, &cells.expr, &origin)?;
            if selected == 0 {
                let why = cells.expr.explain_no_match(TableFile::Store(&store, StoreFiles::OBS))?;
                return Err(Error::InvalidInput(format!(
                    "{origin}: {} selects no cell: {why}; nothing was written",
                    cells.given
                )));
            }
            schema
        }
    };
    let mut writer = H5adWriter::create(out, &var, &obs_schema, store.nnz(), options.compression, options.overwrite)
        .map_err(Error::stage(Stage::Write))?;
    store.advise(Access::Sequential);
    progress.begin("cells", store.n_obs());
    let mut written = 0u64;
    let result = two_stage(
        Stage::Read,
        &read,
        &write,
        CHANNEL_DEPTH,
        |out| send_store_rows(&store, BATCH_ROWS, &read, out),
        |(rows, obs): (CsrBatch, RecordBatch)| {
            let n_read = rows.n_rows() as u64;
            let (rows, obs) = match &options.cells {
                None => (rows, obs),
                Some(cells) => {
                    let mask = cells.expr.select(&obs, &origin)?;
                    keep(rows, obs, &mask, &obs_schema)?
                }
            };
            if rows.n_rows() > 0 {
                write.busy(|| writer.append(&rows, &obs)).map_err(Error::stage(Stage::Write))?;
            }
            write.add(rows.n_rows() as u64, rows.byte_size());
            written += rows.n_rows() as u64;
            progress.advance(n_read);
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
        cells: written,
        genes: store.n_vars(),
        bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
        report,
    })
}

/// The rows of a chunk and of its obs that `mask` keeps, the obs under `schema` (the store's with
/// the selected cells' categories).
fn keep(rows: CsrBatch, obs: RecordBatch, mask: &[bool], schema: &SchemaRef) -> Result<(CsrBatch, RecordBatch)> {
    let context = "keeping the selected cells' obs rows";
    let (rows, obs) = if mask.iter().all(|&k| k) {
        (rows, obs)
    } else {
        let mut kept = CsrBatch::new(rows.n_cols());
        for (r, _) in mask.iter().enumerate().filter(|(_, k)| **k) {
            let (cols, data) = rows.row(r);
            kept.push_row(cols, data);
        }
        let obs = arrow_select::filter::filter_record_batch(&obs, &BooleanArray::from(mask.to_vec()))
            .map_err(Error::arrow(context))?;
        (kept, obs)
    };
    let obs = RecordBatch::try_new(Arc::clone(schema), obs.columns().to_vec()).map_err(Error::arrow(context))?;
    Ok((rows, obs))
}

/// The obs schema of the cells `select` picks: each categorical column's categories cut to the
/// values those cells hold, in their order (a category without cells would be an empty group,
/// which scanpy's tests, and so cell-eval2, refuse); and how many cells it picks. Reads the obs
/// table once.
fn selected_schema(store: &Store, schema: &SchemaRef, select: &Expr, origin: &str) -> Result<(SchemaRef, u64)> {
    let categorical: Vec<(usize, Vec<String>)> =
        schema.fields().iter().enumerate().filter_map(|(i, f)| Some((i, categories_of(f)?))).collect();
    let mut used: Vec<HashSet<String>> = vec![HashSet::new(); categorical.len()];
    let mut selected = 0u64;
    for batch in TableFile::Store(store, StoreFiles::OBS).read().map_err(Error::stage(Stage::Read))? {
        let batch = batch.map_err(Error::stage(Stage::Read))?;
        let mask = select.select(&batch, origin)?;
        selected += mask.iter().filter(|&&k| k).count() as u64;
        for ((i, _), seen) in categorical.iter().zip(&mut used) {
            let column = crate::obs::column_strings(&batch, schema.field(*i).name(), origin)?;
            for row in (0..batch.num_rows()).filter(|&r| mask[r]) {
                if let Some(v) = column.get(row)
                    && !seen.contains(v)
                {
                    seen.insert(v.to_owned());
                }
            }
        }
    }
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    for ((i, categories), seen) in categorical.iter().zip(&used) {
        let kept: Vec<&String> = categories.iter().filter(|c| seen.contains(c.as_str())).collect();
        let mut metadata = fields[*i].metadata().clone();
        metadata.insert(CATEGORIES_KEY.to_owned(), serde_json::to_string(&kept).unwrap_or_default());
        fields[*i] = fields[*i].clone().with_metadata(metadata);
    }
    Ok((Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())), selected))
}
