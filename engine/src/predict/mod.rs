//! Counterfactual prediction: obs selection -> batcher (gather workers) -> predictor (the
//! thread that owns the model) -> consumer (the Parquet sink, or a library caller through
//! [`PredictionStream`], a `RecordBatchReader`).
//!
//! Source cells (by default the control cells) are encoded, keep their `z_basal`, get each
//! target's perturbations, doses and covariates added, and are decoded with their own library
//! size. Without targets, each cell is reconstructed under its own condition. Every stage holds
//! a bounded number of batches: host memory depends on batch size, prefetch depth, genes and
//! targets, never on the number of cells.

mod h5ad;
mod request;
mod select;
mod stream;
mod wide;

use std::path::Path;
use std::time::Instant;

use crate::device::{DeviceMemory, memory as device_memory};
use arrow_schema::ArrowError;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_stages::sink::{ParquetSink, SinkSummary};
pub use request::PredictRequest;
use serde::Serialize;
pub use stream::{PredictStats, PredictionStream};

use crate::Stage;
use crate::predictor::aggregate::N_ANCHORED;
use crate::predictor::{Layout, PredictOptions, Predictor};
use cpa_stream_pipeline::context::RunContext;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::telemetry::{MemorySampler, RunReport, StageStats, release_free_memory};
use cpa_stream_schemas::tables::predictions::IS_ANCHORED;

/// The predictions of `options` as a stream of record batches, computed as they are read.
pub fn open(options: &PredictOptions) -> Result<PredictionStream> {
    Predictor::open(options)?.stream()
}

/// What [`run`] did.
#[derive(Debug, Clone, Serialize)]
pub struct PredictReport {
    /// The file written.
    pub output: SinkSummary,
    /// Source cells selected.
    pub source_cells: u64,
    /// Passes per source cell: the targets, or 1 for a reconstruction.
    pub targets: usize,
    /// Genes of the `mean` column.
    pub genes: usize,
    /// Models whose predictions each row averages: 1, or an ensemble's (`--ensemble`) count.
    pub models: usize,
    /// Whether the rows are aggregates of groups of cells (`--aggregate`) rather than cells.
    pub aggregated: bool,
    /// Whether the output is a directory of parts (`--parts`).
    pub parts: bool,
    /// Rows (with aggregates, cells) whose `anchored` values are anchored on their source cell;
    /// `None` where no `anchored` column is written.
    pub anchored_rows: Option<u64>,
    /// With an `.h5ad` output (drawn counts), the observed control cells written after the
    /// predicted rows; `None` for Parquet.
    pub observed_controls: Option<u64>,
    /// Seconds from the model's load to the file's rename.
    pub seconds: f64,
    /// Source cells per second (each decoded into every target).
    pub cells_per_s: f64,
    /// Rows predicted per second: source cells x targets (with aggregates, the cells' rows that
    /// were folded into them).
    pub rows_per_s: f64,
    /// Bytes of the file per row.
    pub bytes_per_row: f64,
    /// The same predicted values (means, expected log1p, latents) as raw float32, per row.
    pub raw_f32_bytes_per_row: f64,
    /// Stages, wall time and peak memory.
    pub report: RunReport,
    /// The CUDA caching allocator's counts at the end, peaks since the model loaded (`None` on
    /// the CPU).
    pub device_memory: Option<DeviceMemory>,
}

/// Runs a prediction into a Parquet file (`options.out`; with a shard, `out` is a dataset
/// directory and the file is the shard's part). The file appears only when complete.
pub fn run(options: &PredictOptions, ctx: &RunContext) -> Result<PredictReport> {
    let out = options.out.as_deref().ok_or_else(|| {
        Error::InvalidInput("predict: no output file given (a stream is read with `predict::open`)".to_owned())
    })?;
    if options.aggregate.is_some() && options.shard.is_some() {
        return Err(Error::InvalidInput(
            "aggregates of a shard would be partial groups: predict --aggregate runs on the whole store (or a \
             --source selection), not with --shard"
                .to_owned(),
        ));
    }
    let models =
        std::iter::once(&options.model).chain(&options.ensemble).map(|m| cpa_stream_pipeline::run_dir::model_input(m));
    let inputs = models.chain([options.store.clone()]).chain(options.degs.clone());
    cpa_stream_stages::output::check_not_an_input(out, inputs).map_err(Error::stage(Stage::Sink))?;
    let progress = ctx.progress();
    let wall = Instant::now();
    let sampler = MemorySampler::start();
    let path = match options.shard {
        Some(shard) => {
            std::fs::create_dir_all(out).map_err(Error::io(out))?;
            out.join(shard.file_name())
        }
        None => out.to_owned(),
    };
    let anndata = h5ad::is_h5ad(out);
    let f16 = options.sink.values != cpa_stream_stages::sink::Values::default();
    if anndata && (options.shard.is_some() || options.sink.parts || options.layout == Layout::Wide || f16) {
        return Err(Error::InvalidInput(format!(
            "{}: an .h5ad prediction is one AnnData file of per-cell counts; --shard, --parts, --layout wide and \
             --values f16 are for Parquet outputs",
            out.display()
        )));
    }
    let predictor = Predictor::open(options)?;
    device_memory::reset_peak(options.device);
    let (genes, targets) = (predictor.genes().len(), predictor.targets().len().max(1));
    // The floats of a row: each vector column's width (means, expected log1p, latents).
    let floats_per_row: usize = predictor
        .schema()
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            arrow_schema::DataType::FixedSizeList(_, n) => usize::try_from(*n).unwrap_or(0),
            _ => 0,
        })
        .sum();
    let rows = predictor.rows();
    let aggregated = predictor.aggregates();
    let (source, store) = (predictor.source().clone(), std::sync::Arc::clone(predictor.store()));
    let widen = match options.layout {
        Layout::Long => None,
        Layout::Wide => Some(wide::Widen::new(&predictor.schema(), predictor.genes())?),
    };
    let schema = widen.as_ref().map_or_else(|| predictor.schema(), wide::Widen::schema);
    let schema = cpa_stream_stages::provenance::stamp(&schema);
    if options.shard.is_some() {
        write_genes_table(&predictor, &out.join(GENES_FILE))?;
    }
    let mut sink = match anndata {
        true => Output::AnnData(Box::new(h5ad::CountsFile::create(&path, &predictor, options.sink.overwrite)?)),
        false => Output::Parquet(Box::new(
            ParquetSink::create(&path, schema, &options.sink).map_err(Error::stage(Stage::Sink))?,
        )),
    };
    let sink_stats = StageStats::new(Stage::Sink, 1);
    let start = Instant::now();
    progress.begin("predict", rows.end - rows.start);
    let counted = if aggregated { N_ANCHORED } else { IS_ANCHORED };
    let mut anchored_rows = predictor.schema().column_with_name(counted).map(|_| 0u64);
    let mut stream = predictor.stream()?.without_empty_check();
    let mut written_cells = 0u64;
    let mut reported = 0u64;
    loop {
        let next = sink_stats.blocked_in(|| stream.next());
        let Some(batch) = next else { break };
        let batch = batch.map_err(pipeline_error)?;
        if let Some(n) = &mut anchored_rows {
            *n += anchored_in(&batch, aggregated)?;
        }
        let batch = match &widen {
            Some(w) => sink_stats.busy(|| w.apply(&batch))?,
            None => batch,
        };
        match &mut sink {
            Output::Parquet(sink) => {
                let flushed = sink.row_groups_written();
                sink_stats.busy(|| sink.write(&batch)).map_err(Error::stage(Stage::Sink))?;
                if sink.row_groups_written() > flushed {
                    sink_stats.busy(release_free_memory);
                }
            }
            Output::AnnData(file) => sink_stats.busy(|| file.write(&batch))?,
        }
        sink_stats.add(batch.num_rows() as u64, batch.get_array_memory_size() as u64);
        written_cells += match aggregated {
            true => aggregate_cells(&batch)?,
            false => batch.num_rows() as u64,
        };
        let done = stream.rows_done();
        progress.advance(done.saturating_sub(reported));
        reported = reported.max(done);
        // Dropping the sink removes its temporary file: nothing is published.
        ctx.check_stopped()?;
    }
    progress.advance((rows.end - rows.start).saturating_sub(reported));
    let source_cells = stream.source_cells();
    let stats = stream.stats().clone();
    drop(stream);
    if source_cells == 0 {
        let selection = match &options.source {
            Some(text) => format!("the source {text:?}"),
            None => "the default source (the control cells)".to_owned(),
        };
        let shard = options
            .shard
            .map(|s| format!(" in shard {}/{} (rows {}..{})", s.index, s.count, rows.start, rows.end))
            .unwrap_or_default();
        let why = source.explain_no_match(cpa_stream_stages::store::TableFile::Store(&store, StoreFiles::OBS))?;
        if !options.allow_empty {
            return Err(Error::InvalidInput(format!(
                "{selection} selects no cell{shard}: {why}. {} was not written (--allow-empty, in Python allow_empty=True, writes an empty file)",
                path.display()
            )));
        }
        tracing::warn!("{selection} selects no cell{shard}: {why}; writing an empty {}", path.display());
    }
    // Every stage ended cleanly; the file must still hold every row it promises before it
    // appears (the sink removes its temporary file when dropped).
    let expected = source_cells.saturating_mul(targets as u64);
    if written_cells != expected {
        return Err(Error::InvalidInput(format!(
            "{}: {written_cells} {} predicted for {source_cells} source cells x {targets} target(s) = {expected}; \
             the file was not written",
            path.display(),
            if aggregated { "cells aggregated" } else { "rows" },
        )));
    }
    let mut observed_controls = None;
    let output = match sink {
        Output::Parquet(sink) => sink_stats.busy(|| sink.finish()).map_err(Error::stage(Stage::Sink))?,
        Output::AnnData(mut file) => {
            let controls = sink_stats.busy(|| file.write_observed_controls(ctx))?;
            if controls == 0 {
                tracing::warn!(
                    "{}: no control cell among the source cells, so the file holds no control group (a benchmark \
                     that scores against the predictions' own controls needs one; select control cells with --source)",
                    path.display()
                );
            }
            observed_controls = Some(controls);
            sink_stats.busy(|| file.finish())?
        }
    };
    progress.end();
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    let report = RunReport {
        wall: wall.elapsed(),
        stages: vec![stats.source.report(), stats.batcher.report(), stats.predictor.report(), sink_stats.report()],
        memory: sampler.finish(),
    };
    let rows_out = output.rows.max(1) as f64;
    Ok(PredictReport {
        bytes_per_row: output.bytes as f64 / rows_out,
        raw_f32_bytes_per_row: floats_per_row as f64 * 4.0,
        output,
        source_cells,
        targets,
        genes,
        models: 1 + options.ensemble.len(),
        aggregated,
        parts: options.sink.parts,
        anchored_rows,
        observed_controls,
        seconds,
        cells_per_s: source_cells as f64 / seconds,
        rows_per_s: written_cells as f64 / seconds,
        report,
        device_memory: device_memory::stats(options.device),
    })
}

/// Where a prediction goes: a Parquet file (or directory of parts), or an `.h5ad` of counts.
enum Output {
    Parquet(Box<ParquetSink>),
    AnnData(Box<h5ad::CountsFile>),
}

/// The var table of a sharded dataset's genes, beside its parts.
pub const GENES_FILE: &str = "genes.parquet";

/// Writes the store's var rows of the predicted genes, in the order of the `mean` column (or the
/// wide layout's gene columns), as `path`: what the dataset's gene columns are, for readers
/// that do not see the Parquet metadata. Every shard of a job array computes the same table:
/// the first writes it, shards running meanwhile wait for it under its lock, and a shard that
/// finds it written leaves it alone when its rows are the same (another table, say from other
/// genes, replaces it).
fn write_genes_table(predictor: &Predictor, path: &Path) -> Result<()> {
    let table = genes_var_table(predictor)?;
    let lock = cpa_stream_stages::output::lock_output(path, cpa_stream_stages::output::Wait::Yes)
        .map_err(Error::stage(Stage::Sink))?;
    if path.is_file()
        && let Ok(written) = cpa_stream_stages::store::read_small_table(path)
        && written.columns() == table.columns()
    {
        return Ok(());
    }
    let schema = cpa_stream_stages::provenance::stamp(table.schema_ref());
    let table = table.with_schema(std::sync::Arc::clone(&schema)).map_err(Error::arrow("genes table"))?;
    cpa_stream_stages::store::write_table_locked(path, &lock, schema, [table]).map_err(Error::stage(Stage::Sink))
}

/// The store's var rows of the predicted genes, in the order of the `mean` column.
fn genes_var_table(predictor: &Predictor) -> Result<arrow_array::RecordBatch> {
    let var_path = predictor.store().file_path(StoreFiles::VAR);
    let var = predictor.store().small_table(StoreFiles::VAR).map_err(Error::stage(Stage::Reader))?;
    let ids = arrow_cast::cast(var.column(0), &arrow_schema::DataType::Utf8)
        .map_err(Error::arrow(format!("{}: gene ids", var_path.display())))?;
    let ids = arrow_array::cast::AsArray::as_string::<i32>(ids.as_ref());
    let row_of: std::collections::HashMap<&str, u32> =
        ids.iter().enumerate().filter_map(|(i, g)| Some((g?, i as u32))).collect();
    let rows: Vec<u32> = predictor
        .genes()
        .iter()
        .map(|g| {
            row_of.get(g.as_str()).copied().ok_or_else(|| {
                Error::InvalidInput(format!("{}: gene {g:?} of the predictions is not in var", var_path.display()))
            })
        })
        .collect::<Result<_>>()?;
    arrow_select::take::take_record_batch(&var, &arrow_array::UInt32Array::from(rows))
        .map_err(Error::arrow("genes table"))
}

/// The cells x targets an aggregate batch sums up (its `n_cells` column).
fn aggregate_cells(batch: &arrow_array::RecordBatch) -> Result<u64> {
    use arrow_array::cast::AsArray as _;
    let column = batch
        .column_by_name(crate::predictor::aggregate::N_CELLS)
        .and_then(|c| c.as_primitive_opt::<arrow_array::types::UInt64Type>())
        .ok_or_else(|| Error::InvalidInput("aggregates without their n_cells column".to_owned()))?;
    Ok(column.values().iter().sum())
}

/// The rows of a prediction batch whose `anchored` values are anchored (`is_anchored`), or the
/// cells an aggregate batch says are (`n_anchored`).
fn anchored_in(batch: &arrow_array::RecordBatch, aggregated: bool) -> Result<u64> {
    use arrow_array::cast::AsArray as _;
    let missing = || Error::InvalidInput("predictions without their is_anchored column".to_owned());
    if aggregated {
        let column =
            batch.column_by_name(N_ANCHORED).and_then(|c| c.as_primitive_opt::<arrow_array::types::UInt64Type>());
        return Ok(column.ok_or_else(missing)?.values().iter().sum());
    }
    let column = batch.column_by_name(IS_ANCHORED).and_then(|c| c.as_boolean_opt()).ok_or_else(missing)?;
    Ok(column.true_count() as u64)
}

/// The pipeline's error back out of the Arrow error a `RecordBatchReader` carries it in.
fn pipeline_error(e: ArrowError) -> Error {
    match e {
        ArrowError::ExternalError(inner) => match inner.downcast::<Error>() {
            Ok(e) => *e,
            Err(other) => Error::InvalidInput(other.to_string()),
        },
        other => Error::Arrow { context: "prediction stream".to_owned(), source: other },
    }
}
