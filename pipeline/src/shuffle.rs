//! A store's cells written in a seeded random order, out of core (`convert --shuffle`, `import
//! --shuffle`): every order of the cells is equally likely, whatever the store's size.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_array::UInt64Array;
use arrow_select::take::take_record_batch;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::store::{Access, Store, StoreWriter};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::Stage;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::telemetry::StageStats;

/// Cells read and written per batch.
const BATCH_ROWS: usize = 2048;
/// Default memory for one bucket of [`Shuffle`]: 256 MiB.
pub const DEFAULT_SHUFFLE_BUCKET_BYTES: u64 = 256 << 20;
/// Most bucket files of a shuffle open at once.
const MAX_SHUFFLE_BUCKETS: u64 = 4096;
/// Write buffer of each bucket file.
const BUCKET_BUFFER: usize = 256 << 10;

/// Writing the cells in a seeded random order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shuffle {
    /// Seed of the random order.
    pub seed: u64,
    /// Payload bytes of the cells that one bucket holds in memory (about; bucket sizes vary a
    /// little at random).
    pub bucket_bytes: u64,
}

/// Writes the cells of `input` in a random order drawn from `shuffle.seed`, reading the store
/// sequentially only (an atlas larger than memory is never read at random): an external shuffle
/// in two passes ([`Scatter`]). Memory: one bucket, the obs table (about 100 MB at a million
/// cells) and a write buffer per bucket.
pub fn copy_shuffled(
    input: &Store,
    writer: &mut StoreWriter,
    shuffle: Shuffle,
    out: &Path,
    [read, scatter, write]: [&StageStats; 3],
    progress: &dyn Progress,
) -> Result<()> {
    let obs_path = input.file_path(StoreFiles::OBS);
    let obs = read.busy(|| input.small_table(StoreFiles::OBS)).map_err(Error::stage(Stage::Read))?;
    let n = input.n_obs();
    if obs.num_rows() as u64 != n {
        return Err(Error::InvalidInput(format!(
            "{}: {} rows, the matrix has {n}",
            obs_path.display(),
            obs.num_rows()
        )));
    }
    let mut buckets = Scatter::new(out, shuffle, Scatter::record_bytes(n, input.nnz()))?;
    // Pass 1: the store in order, each cell to a random bucket.
    input.advise(Access::Sequential);
    let mut cursor = input.cursor().map_err(Error::stage(Stage::Read))?;
    let mut rows = CsrBatch::new(input.n_vars() as u32);
    progress.begin("scatter", n);
    for start in (0..n).step_by(BATCH_ROWS) {
        let end = (start + BATCH_ROWS as u64).min(n);
        read.busy(|| {
            rows.clear();
            let read = cursor.read_range(start..end, &mut rows);
            // Read once: its pages need not stay resident (the process's RSS stays flat).
            input.release(start..end);
            read
        })
        .map_err(Error::stage(Stage::Read))?;
        read.add(rows.n_rows() as u64, rows.byte_size());
        scatter.busy(|| buckets.push(&rows))?;
        scatter.add(rows.n_rows() as u64, rows.byte_size());
        progress.advance(rows.n_rows() as u64);
    }
    progress.end();
    buckets.write_out(&obs, &obs_path.display().to_string(), writer, [scatter, write], progress)
}

/// An external shuffle of cells given in order: each cell, with its row number, goes to one of
/// the scratch files (buckets) drawn at random as it comes ([`push`](Self::push)); then each
/// bucket in turn is read into memory, its cells shuffled and written with their obs rows
/// ([`write_out`](Self::write_out)). Drawing a bucket per cell and shuffling within buckets
/// gives every order the same chance. The scratch files, as large as the payload, lie next to
/// the output (`.NAME.shuffle-PID`) and are removed as they are used, and on error.
pub struct Scatter {
    scratch: Scratch,
    files: Vec<BufWriter<File>>,
    rng: Xoshiro256PlusPlus,
    /// Cells pushed.
    cells: u64,
}

impl Scatter {
    /// Bytes of the records of `cells` cells holding `nnz` entries: row number (8 bytes),
    /// entries (4), indices and values (8 per entry).
    pub fn record_bytes(cells: u64, nnz: u64) -> u64 {
        nnz * 8 + cells * 12
    }

    /// Buckets next to `out` for about `record_bytes` of cells ([`record_bytes`](Self::record_bytes)),
    /// each about `shuffle.bucket_bytes`; refused when the filesystem has not room for them.
    pub fn new(out: &Path, shuffle: Shuffle, record_bytes: u64) -> Result<Scatter> {
        let buckets = record_bytes.div_ceil(shuffle.bucket_bytes.max(1)).clamp(1, MAX_SHUFFLE_BUCKETS) as usize;
        let scratch = Scratch::create(out)?;
        // The scratch files hold every cell until pass 2 writes them bucket by bucket, deleting
        // each bucket once written: at the peak, the records plus about one bucket of output.
        let needed = record_bytes.saturating_add(record_bytes.div_ceil(buckets as u64));
        if let Some(free) = free_bytes(&scratch.0)
            && free < needed
        {
            return Err(Error::InvalidInput(format!(
                "{}: the shuffle needs about {:.2} GB of scratch space next to the output (a copy of every cell \
                 until it is written), but only {:.2} GB are free there",
                scratch.0.display(),
                needed as f64 / 1e9,
                free as f64 / 1e9
            )));
        }
        let files = (0..buckets)
            .map(|b| {
                let path = scratch.bucket(b);
                File::create(&path).map(|f| BufWriter::with_capacity(BUCKET_BUFFER, f)).map_err(Error::io(&path))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Scatter { scratch, files, rng: Xoshiro256PlusPlus::seed_from_u64(shuffle.seed), cells: 0 })
    }

    /// Sends the cells of `rows`, the next in order, to buckets drawn at random.
    pub fn push(&mut self, rows: &CsrBatch) -> Result<()> {
        let buckets = self.files.len();
        for r in 0..rows.n_rows() {
            let b = self.rng.random_range(0..buckets);
            let (indices, values) = rows.row(r);
            let record = [
                &(self.cells + r as u64).to_le_bytes()[..],
                &(indices.len() as u32).to_le_bytes(),
                bytemuck::cast_slice(indices),
                bytemuck::cast_slice(values),
            ];
            for part in record {
                self.files[b].write_all(part).map_err(Error::io(self.scratch.bucket(b)))?;
            }
        }
        self.cells += rows.n_rows() as u64;
        Ok(())
    }

    /// Pass 2: each bucket shuffled in memory and written to `writer` with its rows of `obs`
    /// (the obs rows of every cell pushed, in order; `obs_name` names it in messages).
    pub fn write_out(
        mut self,
        obs: &RecordBatch,
        obs_name: &str,
        writer: &mut StoreWriter,
        [scatter, write]: [&StageStats; 2],
        progress: &dyn Progress,
    ) -> Result<()> {
        let n = self.cells;
        if obs.num_rows() as u64 != n {
            return Err(Error::InvalidInput(format!("{obs_name}: {} rows for {n} cells", obs.num_rows())));
        }
        let buckets = self.files.len();
        for (b, file) in std::mem::take(&mut self.files).into_iter().enumerate() {
            scatter
                .busy(|| file.into_inner().map_err(|e| e.into_error()))
                .map_err(Error::io(self.scratch.bucket(b)))?;
        }
        progress.begin("write", n);
        let mut rows = CsrBatch::new(writer.n_vars());
        let (mut indices, mut values) = (Vec::new(), Vec::new());
        let mut written = 0u64;
        for b in 0..buckets {
            let path = self.scratch.bucket(b);
            let bytes = scatter.busy(|| std::fs::read(&path)).map_err(Error::io(&path))?;
            // (row number, offset of its entries, entries) of every cell of the bucket.
            let mut cells: Vec<(u64, usize, usize)> = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                let field = |from: usize, len: usize| bytes.get(from..from + len).ok_or_else(|| truncated(&path));
                let row = u64::from_le_bytes(field(at, 8)?.try_into().map_err(|_| truncated(&path))?);
                let nnz = u32::from_le_bytes(field(at + 8, 4)?.try_into().map_err(|_| truncated(&path))?) as usize;
                field(at + 12, nnz * 8)?;
                cells.push((row, at + 12, nnz));
                at += 12 + nnz * 8;
            }
            cells.shuffle(&mut self.rng);
            for chunk in cells.chunks(BATCH_ROWS) {
                let part = write.busy(|| -> Result<RecordBatch> {
                    rows.clear();
                    for &(_, offset, nnz) in chunk {
                        let (idx, val) = bytes[offset..offset + nnz * 8].split_at(nnz * 4);
                        indices.clear();
                        values.clear();
                        indices.extend(idx.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
                        values.extend(val.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
                        rows.push_row(&indices, &values);
                    }
                    let ids = UInt64Array::from_iter_values(chunk.iter().map(|c| c.0));
                    take_record_batch(obs, &ids).map_err(Error::arrow(obs_name.to_owned()))
                })?;
                write.busy(|| writer.push_rows(&rows, &part)).map_err(Error::stage(Stage::Write))?;
                write.add(rows.n_rows() as u64, rows.byte_size());
                written += rows.n_rows() as u64;
                progress.advance(rows.n_rows() as u64);
            }
            drop(bytes);
            std::fs::remove_file(&path).map_err(Error::io(&path))?;
        }
        progress.end();
        if written != n {
            let dir = self.scratch.0.display();
            return Err(Error::InvalidInput(format!("{dir}: the shuffle wrote {written} cells of {n}")));
        }
        Ok(())
    }
}

fn truncated(path: &Path) -> Error {
    Error::InvalidInput(format!("{}: a scratch file of the shuffle ends within a cell", path.display()))
}

/// Bytes that an unprivileged writer may still use on the filesystem holding `dir`; `None` where
/// that cannot be told.
#[cfg(unix)]
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and outlives the call; `stat` is valid for writes of a
    // `statvfs`, which the call fills when it returns 0.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `stat`.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    Some(u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> Option<u64> {
    None
}

/// A scratch directory next to a store being written, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn bucket(&self, b: usize) -> PathBuf {
        self.0.join(format!("bucket-{b}"))
    }

    fn create(out: &Path) -> Result<Scratch> {
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "store".to_owned());
        let dir = out.with_file_name(format!(".{name}.shuffle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(unix)]
    fn free_bytes_asks_the_filesystem_of_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let free = free_bytes(dir.path());
        assert!(free.is_some_and(|f| f > 0), "free space of {}: {free:?}", dir.path().display());
        assert_eq!(free_bytes(&dir.path().join("absent")), None);
    }
}
