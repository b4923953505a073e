//! `convert`: store reader -> store writer, to change the codec (raw <-> zstd) of a store, and
//! optionally the order of its cells (a seeded shuffle, once, so that training can read runs of
//! neighbouring cells without taking them from one condition).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::UInt64Array;
use arrow::compute::take_record_batch;
use arrow::record_batch::RecordBatch;
use cpa_stream_schemas::{Codec, Manifest, StoreFiles};
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::store::{Access, Store, StoreWriter, StoreWriterOptions, read_small_table, table_schema};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_xoshiro::Xoshiro256PlusPlus;

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
/// extra tables (truth, DEGs: per condition, not per cell) are copied as they are. With
/// `shuffle_seed`, the cells are written in a random order drawn from that seed (see
/// [`copy_shuffled`]).
pub fn run_convert(
    input: &Store,
    out: &Path,
    codec: Codec,
    shuffle_seed: Option<u64>,
    overwrite: bool,
    progress: &dyn Progress,
) -> Result<(Manifest, RunReport)> {
    if shuffle_seed.is_some() && input.raw_rows(0..0).is_none() {
        return Err(Error::InvalidInput(format!(
            "{}: shuffling reads the cells in a random order, which a compressed store would \
             decompress a block for each; convert it to raw first",
            input.path().display()
        )));
    }
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let read = StageStats::new("read", 1);
    let write = StageStats::new("write", 1);
    let var = read_small_table(&input.file_path(StoreFiles::VAR)).map_err(Error::stage("read"))?;
    let obs_path = input.file_path(StoreFiles::OBS);
    let obs_schema = table_schema(&obs_path).map_err(Error::stage("read"))?;
    let shuffled = shuffle_seed.map(|seed| format!(", cells shuffled with seed {seed}")).unwrap_or_default();
    let options = StoreWriterOptions {
        codec,
        overwrite,
        source: Some(format!("converted from {}{shuffled}", input.path().display())),
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
    progress.begin("cells", input.n_obs());
    if let Some(seed) = shuffle_seed {
        let result = copy_shuffled(input, &mut writer, seed, (&read, &write), progress);
        progress.end();
        result?;
        let manifest = write.busy(|| writer.finish()).map_err(Error::stage("write"))?;
        let report = RunReport {
            wall: started.elapsed(),
            stages: vec![read.report(), write.report()],
            memory: sampler.finish(),
        };
        return Ok((manifest, report));
    }
    input.advise(Access::Sequential);
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

/// Writes the cells of a raw store in a random order drawn from `seed`, in windows of
/// [`BATCH_ROWS`]. The permutation (8 bytes a cell) and the obs table are held in memory (about
/// 100 MB at a million cells); the matrix rows are read in the new order through the page
/// cache, a few rows at a time.
fn copy_shuffled(
    input: &Store,
    writer: &mut StoreWriter,
    seed: u64,
    (read, write): (&StageStats, &StageStats),
    progress: &dyn Progress,
) -> Result<()> {
    let obs_path = input.file_path(StoreFiles::OBS);
    let obs = read.busy(|| read_small_table(&obs_path)).map_err(Error::stage("read"))?;
    if obs.num_rows() as u64 != input.n_obs() {
        return Err(Error::InvalidInput(format!(
            "{}: {} rows, the matrix has {}",
            obs_path.display(),
            obs.num_rows(),
            input.n_obs()
        )));
    }
    let mut order: Vec<u64> = (0..input.n_obs()).collect();
    order.shuffle(&mut Xoshiro256PlusPlus::seed_from_u64(seed));
    input.advise(Access::Random);
    let mut cursor = input.cursor().map_err(Error::stage("read"))?;
    let mut rows = CsrBatch::new(input.n_vars() as u32);
    for window in order.chunks(BATCH_ROWS) {
        let part = read.busy(|| -> Result<RecordBatch> {
            rows.clear();
            cursor.gather(window, &mut rows).map_err(Error::stage("read"))?;
            take_record_batch(&obs, &UInt64Array::from(window.to_vec()))
                .map_err(|e| Error::InvalidInput(format!("{}: {e}", obs_path.display())))
        })?;
        read.add(rows.n_rows() as u64, rows.byte_size());
        write.busy(|| writer.push_rows(&rows, &part)).map_err(Error::stage("write"))?;
        write.add(rows.n_rows() as u64, rows.byte_size());
        progress.advance(rows.n_rows() as u64);
    }
    Ok(())
}
