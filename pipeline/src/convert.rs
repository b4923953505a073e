//! `convert`: store reader -> store writer, to change the codec (raw <-> zstd) of a store.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use cpa_stream_schemas::{Codec, Manifest, StoreFiles};
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::store::{Access, Store, StoreWriter, StoreWriterOptions, read_small_table, table_schema};

use crate::error::{Error, Result};
use crate::metrics::{MemorySampler, RunReport, StageStats};
use crate::progress::Progress;
use crate::stream::{send_store_rows, two_stage};

/// Batches queued between reader and writer.
const CHANNEL_DEPTH: usize = 4;
/// Rows per batch sent to the writer. Parquet yields obs in large batches; they are cut into
/// windows of this many rows (zero-copy slices) so that the matrix rows in flight stay small:
/// at 5,000 genes and 17% density a window is about 14 MB.
const BATCH_ROWS: usize = 2048;

/// Copies `input` into a new store at `out` with `codec`, streaming `obs` batches and their rows;
/// extra tables (truth, DEGs) are copied as they are.
pub fn run_convert(
    input: &Store,
    out: &Path,
    codec: Codec,
    overwrite: bool,
    progress: &dyn Progress,
) -> Result<(Manifest, RunReport)> {
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let read = StageStats::new("read", 1);
    let write = StageStats::new("write", 1);
    let var = read_small_table(&input.file_path(StoreFiles::VAR)).map_err(Error::stage("read"))?;
    let obs_path = input.file_path(StoreFiles::OBS);
    let obs_schema = table_schema(&obs_path).map_err(Error::stage("read"))?;
    let options = StoreWriterOptions {
        codec,
        overwrite,
        source: Some(format!("converted from {}", input.path().display())),
        ..StoreWriterOptions::default()
    };
    let mut writer = StoreWriter::create(out, &var, Arc::clone(&obs_schema), options).map_err(Error::stage("write"))?;
    for name in input.manifest().files.keys() {
        let matrix_or_table = name.starts_with("X/") || name == StoreFiles::OBS || name == StoreFiles::VAR;
        if !matrix_or_table {
            let dest = writer.extra_file_path(name);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Error::InvalidInput(format!("{}: {e}", parent.display())))?;
            }
            std::fs::copy(input.file_path(name), &dest)
                .map_err(|e| Error::InvalidInput(format!("copying {name}: {e}")))?;
        }
    }
    input.advise(Access::Sequential);
    progress.begin("cells", input.n_obs());
    let result = two_stage(
        "read",
        &read,
        &write,
        CHANNEL_DEPTH,
        |out| send_store_rows(input, BATCH_ROWS, &read, out),
        |(rows, obs): (CsrBatch, RecordBatch)| {
            write.busy(|| writer.push_rows(&rows, &obs)).map_err(Error::stage("write"))?;
            write.add(rows.n_rows() as u64, rows.byte_size());
            progress.advance(rows.n_rows() as u64);
            Ok(())
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
    let manifest = write.busy(|| writer.finish()).map_err(Error::stage("write"))?;
    let report =
        RunReport { wall: started.elapsed(), stages: vec![read.report(), write.report()], memory: sampler.finish() };
    Ok((manifest, report))
}
