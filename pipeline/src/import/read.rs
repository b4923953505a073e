//! The readers of `import`: a store, a cell table, and an `.h5ad` matrix by row ranges (CSR,
//! dense) or by transposing column ranges out of core (CSC), each sending row chunks on.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use arrow_array::RecordBatch;
use cpa_stream_stages::cell_table::{CellTable, CellTableLayout, Vocabulary};
use cpa_stream_stages::input::AnnDataReader;
use cpa_stream_stages::store::Store;
use cpa_stream_stages::{CsrBatch, Error as StageError, Result as StageResult};

use crossbeam_channel::Receiver;

use super::{Chunk, ENTRIES_PER_READ, ImportOptions};
use crate::telemetry::StageStats;
use crate::two_stage::Emitter;

/// Where the reader sends chunks; hands out recycled batches.
pub(super) struct ChunkSink<'a> {
    pub(super) out: &'a Emitter<'a, Chunk>,
    pub(super) recycled: &'a Receiver<CsrBatch>,
    pub(super) stats: &'a StageStats,
    pub(super) n_vars: u32,
    /// The file read.
    pub(super) part: usize,
}

impl ChunkSink<'_> {
    /// An empty batch of store rows: a recycled one when the writer has returned one.
    fn batch(&self) -> CsrBatch {
        match self.recycled.try_recv() {
            Ok(mut b) => {
                b.clear();
                b
            }
            Err(_) => CsrBatch::new(self.n_vars),
        }
    }

    /// Sends a chunk of the file's cells from row `first`; `false` when the writer is gone.
    fn send(&self, rows: CsrBatch, obs: RecordBatch, first: u64) -> bool {
        self.stats.add(rows.n_rows() as u64, rows.byte_size());
        self.out.send((rows, obs, self.part, first))
    }
}

/// A file's columns into the store's: rows read straight into the store's batch when the map is
/// the identity, else read into a batch of the file's columns and remapped.
pub(super) struct Remap<'a> {
    map: &'a [Option<u32>],
    identity: bool,
    file_rows: CsrBatch,
}

impl<'a> Remap<'a> {
    fn new(map: &'a [Option<u32>], store_columns: u32, file_columns: u32) -> Remap<'a> {
        let identity = map.len() == store_columns as usize && map.iter().enumerate().all(|(i, m)| *m == Some(i as u32));
        Remap { map, identity, file_rows: CsrBatch::new(file_columns) }
    }

    /// Appends to `rows` (in the store's columns) the rows that `read` appends to the batch it is
    /// given (in the file's columns).
    fn fill<T>(&mut self, rows: &mut CsrBatch, read: impl FnOnce(&mut CsrBatch) -> StageResult<T>) -> StageResult<T> {
        if self.identity {
            return read(rows);
        }
        self.file_rows.clear();
        let value = read(&mut self.file_rows)?;
        rows.push_remapped(&self.file_rows, self.map);
        Ok(value)
    }
}

/// Sends the cells of a store, in order; `false` when the writer is gone.
pub(super) fn read_store(path: &Path, map: &[Option<u32>], chunk_rows: u64, out: &ChunkSink) -> StageResult<bool> {
    let store = Store::open(path)?;
    if map.len() as u64 != store.n_vars() {
        return Err(StageError::InvalidInput(format!("{}: changed while it was imported", path.display())));
    }
    let mut columns = Remap::new(map, out.n_vars, store.n_vars() as u32);
    store.advise(cpa_stream_stages::store::Access::Sequential);
    let mut cursor = store.cursor()?;
    let mut row = 0u64;
    for obs in store.table(cpa_stream_schemas::StoreFiles::OBS)? {
        let obs = obs?;
        for offset in (0..obs.num_rows()).step_by(chunk_rows as usize) {
            let window = obs.slice(offset, (chunk_rows as usize).min(obs.num_rows() - offset));
            let n = window.num_rows() as u64;
            let rows = out.stats.busy(|| -> StageResult<CsrBatch> {
                let mut rows = out.batch();
                columns.fill(&mut rows, |into| cursor.read_range(row..row + n, into))?;
                store.release(row..row + n);
                Ok(rows)
            })?;
            if !out.send(rows, window, row) {
                return Ok(false);
            }
            row += n;
        }
    }
    if row != store.n_obs() {
        return Err(StageError::InvalidInput(format!(
            "{}: obs has {row} rows, the matrix {}",
            path.display(),
            store.n_obs()
        )));
    }
    Ok(true)
}

/// Sends the cells of a Parquet cell table, a batch of rows at a time; `false` when the writer is
/// gone.
pub(super) fn read_cell_table(
    path: &Path,
    layout: &CellTableLayout,
    vocabulary: &Vocabulary,
    map: &[Option<u32>],
    chunk_rows: u64,
    out: &ChunkSink,
) -> StageResult<bool> {
    let table = CellTable::open(path, layout)?;
    let mut columns = Remap::new(map, out.n_vars, vocabulary.len() as u32);
    let mut batches = table.batches(chunk_rows as usize)?;
    let mut first = 0u64;
    loop {
        let chunk = out.stats.busy(|| -> StageResult<Option<(CsrBatch, RecordBatch)>> {
            let Some(batch) = batches.next() else { return Ok(None) };
            let batch = batch.map_err(|e| StageError::InvalidInput(format!("{}: {e}", path.display())))?;
            let mut rows = out.batch();
            let obs = columns.fill(&mut rows, |into| table.split(&batch, first, vocabulary, into))?;
            Ok(Some((rows, obs)))
        })?;
        let Some((rows, obs)) = chunk else { break };
        let n = rows.n_rows() as u64;
        if !out.send(rows, obs, first) {
            return Ok(false);
        }
        first += n;
    }
    if first != table.n_obs() {
        return Err(StageError::InvalidInput(format!(
            "{}: read {first} cells, its metadata says {}",
            path.display(),
            table.n_obs()
        )));
    }
    Ok(true)
}

/// Sends the file's cells read by row ranges; `false` when the writer is gone.
pub(super) fn read_by_rows(
    h5: &AnnDataReader,
    map: &[Option<u32>],
    chunk_rows: u64,
    out: &ChunkSink,
) -> StageResult<bool> {
    let mut columns = Remap::new(map, out.n_vars, h5.n_vars() as u32);
    let mut start = 0;
    while start < h5.n_obs() {
        // A chunk is bounded by its entries too, whatever the file declares.
        let chunk = out.stats.busy(|| -> StageResult<(CsrBatch, RecordBatch, u64)> {
            let end = h5.lines_within(start, chunk_rows, ENTRIES_PER_READ)?;
            let mut rows = out.batch();
            columns.fill(&mut rows, |into| h5.read_rows(start..end, into))?;
            Ok((rows, h5.read_obs(start..end)?, end))
        })?;
        if !out.send(chunk.0, chunk.1, start) {
            return Ok(false);
        }
        start = chunk.2;
    }
    Ok(true)
}

/// Default bucket files open at once during the CSC transposition (file handles and 64 KiB
/// buffers).
pub const DEFAULT_MAX_OPEN_BUCKETS: usize = 256;

/// One transposition entry: row within its bucket, store column, value.
const ENTRY_BYTES: usize = 12;

// Long: its two passes per group of buckets share the bucket files, the column map and the
// output; each pass is marked below.
pub(super) fn read_csc(
    h5: &AnnDataReader,
    map: &[Option<u32>],
    chunk_rows: u64,
    options: &ImportOptions,
    dir: &Path,
    out: &ChunkSink,
) -> StageResult<bool> {
    let (memory_budget, max_open) = (options.memory_budget, options.max_open_buckets.max(1));
    let (stats, n_vars) = (out.stats, out.n_vars);
    let n_obs = h5.n_obs();
    let per_row = (h5.stored_entries() as f64 / n_obs.max(1) as f64).max(1.0);
    let rows_per_bucket = ((memory_budget / ENTRY_BYTES) as f64 / per_row).max(1.0) as u64;
    let n_buckets = n_obs.div_ceil(rows_per_bucket).max(1) as usize;
    let io = |path: &Path, source: std::io::Error| StageError::Io { path: path.to_owned(), source };
    fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let bucket_path = |b: usize| dir.join(format!("bucket-{b:05}"));
    // Buckets are processed in groups so that at most `max_open` files are open; each group
    // re-reads the columns (one pass for atlases up to `max_open` x the bucket budget).
    for first_bucket in (0..n_buckets).step_by(max_open) {
        let group = first_bucket..(first_bucket + max_open).min(n_buckets);
        // Pass 1: scatter entries by row range, columns in order.
        stats.busy(|| -> StageResult<()> {
            let mut buckets = group
                .clone()
                .map(|b| {
                    File::create(bucket_path(b))
                        .map(|f| BufWriter::with_capacity(64 << 10, f))
                        .map_err(|e| io(&bucket_path(b), e))
                })
                .collect::<StageResult<Vec<_>>>()?;
            let n_cols = h5.n_vars();
            let mut c0 = 0;
            while c0 < n_cols {
                let c1 = h5.lines_within(c0, (n_cols - c0).min(1 << 16), ENTRIES_PER_READ)?;
                let (offsets, rows, vals) = h5.read_columns(c0..c1)?;
                let base = offsets[0];
                for (k, w) in offsets.windows(2).enumerate() {
                    let Some(col) = map[(c0 + k as u64) as usize] else { continue };
                    for e in (w[0] - base) as usize..(w[1] - base) as usize {
                        let b = (rows[e] / rows_per_bucket) as usize;
                        if !group.contains(&b) {
                            continue;
                        }
                        let local = (rows[e] % rows_per_bucket) as u32;
                        let mut rec = [0u8; ENTRY_BYTES];
                        rec[..4].copy_from_slice(&local.to_le_bytes());
                        rec[4..8].copy_from_slice(&col.to_le_bytes());
                        rec[8..].copy_from_slice(&vals[e].to_le_bytes());
                        buckets[b - group.start].write_all(&rec).map_err(|e| io(&bucket_path(b), e))?;
                    }
                }
                c0 = c1;
            }
            for (b, w) in group.clone().zip(buckets) {
                w.into_inner().map_err(|e| io(&bucket_path(b), e.into_error()))?;
            }
            Ok(())
        })?;
        // Pass 2: each bucket to CSR rows, sent in chunks with their obs rows.
        for b in group {
            let first = b as u64 * rows_per_bucket;
            let last = (first + rows_per_bucket).min(n_obs);
            let path = bucket_path(b);
            let rows = stats.busy(|| -> StageResult<CsrBatch> {
                let mut bytes = Vec::new();
                BufReader::new(File::open(&path).map_err(|e| io(&path, e))?)
                    .read_to_end(&mut bytes)
                    .map_err(|e| io(&path, e))?;
                let _ = fs::remove_file(&path);
                let n = (last - first) as usize;
                let mut counts = vec![0u64; n + 1];
                for rec in bytes.chunks_exact(ENTRY_BYTES) {
                    counts[u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize + 1] += 1;
                }
                for i in 0..n {
                    counts[i + 1] += counts[i];
                }
                let nnz = counts[n] as usize;
                let mut idx = vec![0u32; nnz];
                let mut val = vec![0f32; nnz];
                let mut next = counts.clone();
                for rec in bytes.chunks_exact(ENTRY_BYTES) {
                    let r = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize;
                    let at = next[r] as usize;
                    idx[at] = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
                    val[at] = f32::from_le_bytes([rec[8], rec[9], rec[10], rec[11]]);
                    next[r] += 1;
                }
                let mut out = CsrBatch::with_capacity(n_vars, n, nnz);
                for r in 0..n {
                    let (s, e) = (counts[r] as usize, counts[r + 1] as usize);
                    let (ri, rv) = (&mut idx[s..e], &mut val[s..e]);
                    // Columns were scattered in increasing order unless --genes reordered them.
                    if ri.windows(2).any(|w| w[0] >= w[1]) {
                        let mut pairs: Vec<(u32, f32)> = ri.iter().copied().zip(rv.iter().copied()).collect();
                        pairs.sort_unstable_by_key(|p| p.0);
                        for (k, (c, v)) in pairs.into_iter().enumerate() {
                            ri[k] = c;
                            rv[k] = v;
                        }
                    }
                    out.push_row(ri, rv);
                }
                Ok(out)
            })?;
            let mut start = first;
            while start < last {
                let end = (start + chunk_rows).min(last);
                let chunk = stats.busy(|| -> StageResult<(CsrBatch, RecordBatch)> {
                    let mut part = out.batch();
                    for r in (start - first) as usize..(end - first) as usize {
                        let (i, v) = rows.row(r);
                        part.push_row(i, v);
                    }
                    Ok((part, h5.read_obs(start..end)?))
                })?;
                if !out.send(chunk.0, chunk.1, start) {
                    return Ok(false);
                }
                start = end;
            }
        }
    }
    Ok(true)
}
