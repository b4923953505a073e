//! `convert`: store reader -> store writer, to change the codec (raw <-> zstd) of a store.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use cpa_stream_schemas::{Codec, Manifest, StoreFiles};
use cpa_stream_stages::store::{Access, Store, StoreWriter, StoreWriterOptions, read_table, table_schema};
use cpa_stream_stages::{CsrBatch, Result as StageResult};
use crossbeam_channel::bounded;

use crate::error::{Error, Result};
use crate::metrics::{MemorySampler, RunReport, StageStats};
use crate::progress::Progress;

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
    let var_path = input.file_path(StoreFiles::VAR);
    let mut var_batches = Vec::new();
    for batch in read_table(&var_path).map_err(Error::stage("read"))? {
        var_batches.push(batch.map_err(Error::stage("read"))?);
    }
    let var_schema = table_schema(&var_path).map_err(Error::stage("read"))?;
    let var = arrow::compute::concat_batches(&var_schema, &var_batches)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", var_path.display())))?;
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
    let n_vars = input.n_vars() as u32;
    let result = std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = bounded::<StageResult<(CsrBatch, RecordBatch)>>(CHANNEL_DEPTH);
        let reader_stats = Arc::clone(&read);
        let reader = scope.spawn(move || {
            let mut row = 0u64;
            let batches = match read_table(&obs_path).and_then(|b| Ok((b, input.cursor()?))) {
                Ok(b) => b,
                Err(e) => {
                    reader_stats.send(&tx, Err(e));
                    return;
                }
            };
            let (obs_batches, mut cursor) = batches;
            for obs in obs_batches {
                let obs = match obs {
                    Ok(obs) => obs,
                    Err(e) => {
                        reader_stats.send(&tx, Err(e));
                        return;
                    }
                };
                for offset in (0..obs.num_rows()).step_by(BATCH_ROWS) {
                    let window = obs.slice(offset, BATCH_ROWS.min(obs.num_rows() - offset));
                    let item = reader_stats.busy(|| {
                        let n = window.num_rows() as u64;
                        let mut rows = CsrBatch::new(n_vars);
                        cursor.read_range(row..row + n, &mut rows)?;
                        input.release(row..row + n);
                        Ok((rows, window))
                    });
                    let failed = item.is_err();
                    if let Ok((rows, _)) = &item {
                        row += rows.n_rows() as u64;
                        reader_stats.add(rows.n_rows() as u64, rows.byte_size());
                    }
                    if !reader_stats.send(&tx, item) || failed {
                        return;
                    }
                }
            }
        });
        let written = (|| -> Result<()> {
            while let Some(item) = write.recv(&rx) {
                let (rows, obs) = item.map_err(Error::stage("read"))?;
                write.busy(|| writer.push_rows(&rows, &obs)).map_err(Error::stage("write"))?;
                write.add(rows.n_rows() as u64, rows.byte_size());
                progress.advance(rows.n_rows() as u64);
            }
            Ok(())
        })();
        drop(rx);
        reader.join().map_err(|p| Error::panic("read", p))?;
        written
    });
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
