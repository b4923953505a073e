//! `convert`: store reader -> store writer, to change the codec (raw <-> zstd) of a store, and
//! optionally the order of its cells (a seeded shuffle, once, so that training can read runs of
//! neighbouring cells without taking them from one condition).

mod request;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use cpa_stream_schemas::{Codec, Manifest, StoreFiles};
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::store::{Access, Store, StoreWriter, StoreWriterOptions};

pub use crate::shuffle::{DEFAULT_SHUFFLE_BUCKET_BYTES, Shuffle};
pub use request::ConvertRequest;
use serde::Serialize;

use crate::Stage;
use crate::context::RunContext;
use crate::error::{Error, Result};
use crate::shuffle::copy_shuffled;
use crate::telemetry::{MemorySampler, RunReport, StageStats};
use crate::two_stage::{send_store_rows, two_stage};

/// Batches queued between reader and writer.
const CHANNEL_DEPTH: usize = 4;
/// Rows per batch sent to the writer. Parquet yields obs in large batches; they are cut into
/// windows of this many rows (zero-copy slices) so that the matrix rows in flight stay small:
/// at 5,000 genes and 17% density a window is about 14 MB.
const BATCH_ROWS: usize = 2048;

/// What `convert` writes.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The store read.
    pub store: PathBuf,
    /// The store written.
    pub out: PathBuf,
    /// The written store's matrix codec.
    pub codec: Codec,
    /// Write the cells in a seeded random order; default none (the input's order).
    pub shuffle: Option<Shuffle>,
    /// Replace an existing store; default false.
    pub overwrite: bool,
}

impl ConvertOptions {
    /// A copy of `store` at `out` with `codec`, in the same order.
    pub fn new(store: impl Into<PathBuf>, out: impl Into<PathBuf>, codec: Codec) -> ConvertOptions {
        ConvertOptions { store: store.into(), out: out.into(), codec, shuffle: None, overwrite: false }
    }
}

/// What a conversion wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    /// The written store's manifest.
    pub manifest: Manifest,
    /// Bytes of the input store's files.
    pub input_bytes: u64,
    /// Stages, wall time and peak memory.
    pub report: RunReport,
}

/// Copies the store `options.store` into a new store at `options.out` with `options.codec`,
/// streaming `obs` batches and their rows; extra tables (truth, DEGs: per condition, not per
/// cell) are copied as they are. With `shuffle`, the cells are written in a random order drawn
/// from its seed (see `copy_shuffled`).
pub fn run(options: &ConvertOptions, ctx: &RunContext) -> Result<ConvertReport> {
    cpa_stream_stages::output::check_not_an_input(&options.out, [&options.store])
        .map_err(Error::stage(Stage::Write))?;
    let input = &Store::open(&options.store).map_err(Error::stage(Stage::Read))?;
    let (out, progress, codec, shuffle) = (options.out.as_path(), ctx.progress(), options.codec, options.shuffle);
    let report = |manifest: Manifest, report: RunReport| ConvertReport {
        manifest,
        input_bytes: input.manifest().total_bytes(),
        report,
    };
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let read = StageStats::new(Stage::Read, 1);
    let write = StageStats::new(Stage::Write, 1);
    let var = input.small_table(StoreFiles::VAR).map_err(Error::stage(Stage::Read))?;
    let obs_schema = input.table_schema(StoreFiles::OBS).map_err(Error::stage(Stage::Read))?;
    let shuffled = shuffle.map(|s| format!(", cells shuffled with seed {}", s.seed)).unwrap_or_default();
    let writer_options = StoreWriterOptions {
        codec,
        overwrite: options.overwrite,
        source: Some(format!("converted from {}{shuffled}", input.path().display())),
        ..StoreWriterOptions::default()
    };
    let mut writer =
        StoreWriter::create(out, &var, Arc::clone(&obs_schema), writer_options).map_err(Error::stage(Stage::Write))?;
    for name in input.manifest().files.keys() {
        let matrix_or_table = name.starts_with("X/") || name == StoreFiles::OBS || name == StoreFiles::VAR;
        if !matrix_or_table {
            let dest = writer.extra_file_path(name);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
            }
            let from = input.file_path(name);
            let mut source = input.open_file(name).map_err(Error::stage(Stage::Read))?;
            let mut target = std::fs::File::create(&dest).map_err(Error::io(&dest))?;
            std::io::copy(&mut source, &mut target).map_err(Error::io(&from))?;
        }
    }
    if let Some(shuffle) = shuffle {
        let scatter = StageStats::new(Stage::Scatter, 1);
        let result = copy_shuffled(input, &mut writer, shuffle, out, [&read, &scatter, &write], progress);
        if result.is_err() {
            // Close the bar of the phase that failed.
            progress.end();
        }
        result?;
        let manifest = write.busy(|| writer.finish()).map_err(Error::stage(Stage::Write))?;
        let stages = vec![read.report(), scatter.report(), write.report()];
        return Ok(report(manifest, RunReport { wall: started.elapsed(), stages, memory: sampler.finish() }));
    }
    input.advise(Access::Sequential);
    progress.begin("cells", input.n_obs());
    let result = two_stage(
        Stage::Read,
        &read,
        &write,
        CHANNEL_DEPTH,
        |out| send_store_rows(input, BATCH_ROWS, &read, out),
        |(rows, obs): (CsrBatch, RecordBatch)| {
            write.busy(|| writer.push_rows(&rows, &obs)).map_err(Error::stage(Stage::Write))?;
            write.add(rows.n_rows() as u64, rows.byte_size());
            progress.advance(rows.n_rows() as u64);
            ctx.check_stopped()
        },
    );
    progress.end();
    result?;
    if writer.n_obs() != input.n_obs() {
        return Err(Error::InvalidInput(format!(
            "{}: obs has {} rows, the matrix {}",
            input.path().display(),
            writer.n_obs(),
            input.n_obs()
        )));
    }
    let manifest = write.busy(|| writer.finish()).map_err(Error::stage(Stage::Write))?;
    let run =
        RunReport { wall: started.elapsed(), stages: vec![read.report(), write.report()], memory: sampler.finish() };
    Ok(report(manifest, run))
}
