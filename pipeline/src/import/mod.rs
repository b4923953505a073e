//! `import`: `.h5ad` reader -> store writer, in row chunks.
//!
//! CSR and dense matrices are read by row ranges. CSC matrices are transposed out of core: one
//! pass over column ranges scatters entries into row-range bucket files next to the output (each
//! bucket sized to fit [`ImportOptions::memory_budget`]), then each bucket is counting-sorted
//! into CSR rows. Entries arrive in column order, so rows come out sorted.

mod request;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{RecordBatch, UInt32Array};
use cpa_stream_schemas::Codec;
use cpa_stream_stages::h5ad::{DEG_FILE, ExternalData, H5adReader, MatrixLayout, MatrixSource};
use cpa_stream_stages::store::{StoreWriter, StoreWriterOptions, write_table};
use cpa_stream_stages::{CsrBatch, Error as StageError, Result as StageResult};
use crossbeam_channel::{Receiver, bounded};
use serde::Serialize;

pub use request::ImportRequest;

use crate::Stage;
use crate::context::RunContext;
use crate::error::{Error, Result};
use crate::telemetry::{MemorySampler, RunReport, StageStats};
use crate::two_stage::{Emitter, two_stage};

/// Default rows per chunk read from the file. Small enough that the batches in flight (channel
/// depth + 2, recycled) stay a few tens of MB on wide atlases; at 4,096 rows and 5,000 genes they
/// were 28 MB each and peak RssAnon of a 1M-cell import reached 870 MB.
pub const DEFAULT_CHUNK_ROWS: usize = 1024;
/// Default size of one CSC transposition bucket file (entries x 12 bytes). Turning a bucket into
/// rows holds it about 2.5 times (file bytes, then indices, values and the CSR rows).
pub const DEFAULT_MEMORY_BUDGET: usize = 128 << 20;
/// Stored entries (values plus indices) read per HDF5 call: a chunk of CSR rows, of CSC columns
/// or of dense rows ends where they would exceed it (about 48 MB of i64 indices + f32 values, or
/// 16 MB of dense f32), whatever the file declares; a single row holds at most as many entries
/// as there are genes (checked before it is read).
const ENTRIES_PER_READ: u64 = 4 << 20;
/// Chunks queued between reader and writer.
const CHANNEL_DEPTH: usize = 4;

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The `.h5ad` file [`run`] reads ([`run_chunks`] is given its data instead).
    pub input: PathBuf,
    /// The store written.
    pub out: PathBuf,
    /// Import `layers/<layer>` instead of `X`.
    pub layer: Option<String>,
    /// Import `adata.raw` (its matrix and genes) instead of `X`; excludes `layer`.
    pub use_raw: bool,
    /// Keep only these genes (by `var` index), in this order.
    pub genes: Option<Vec<String>>,
    /// Rows per chunk. Default [`DEFAULT_CHUNK_ROWS`].
    pub chunk_rows: usize,
    /// Bytes of one CSC transposition bucket. Default [`DEFAULT_MEMORY_BUDGET`].
    pub memory_budget: usize,
    /// CSC transposition buckets open at once; more buckets take more passes over the columns.
    /// Default [`DEFAULT_MAX_OPEN_BUCKETS`].
    pub max_open_buckets: usize,
    /// Matrix codec of the store.
    pub codec: Codec,
    /// Replace an existing store.
    pub overwrite: bool,
    /// The `uns` entry with the DEG lists; `None`: the first entry that holds DEG lists.
    pub deg_uns_key: Option<String>,
    /// Whether the file may read data from other files (HDF5 external storage, external links,
    /// virtual datasets). Default [`ExternalData::Refuse`]: an imported file is untrusted.
    pub external: ExternalData,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            input: PathBuf::new(),
            out: PathBuf::new(),
            layer: None,
            use_raw: false,
            genes: None,
            chunk_rows: DEFAULT_CHUNK_ROWS,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_open_buckets: DEFAULT_MAX_OPEN_BUCKETS,
            codec: Codec::Raw,
            overwrite: false,
            deg_uns_key: None,
            external: ExternalData::Refuse,
        }
    }
}

/// The outcome of an import.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The store's manifest.
    pub manifest: cpa_stream_schemas::Manifest,
    /// The file's matrix layout (`csr`, `csc`, `dense`).
    pub layout: String,
    /// `uns` key and rows of the imported DEG table, if any.
    pub degs: Option<(String, usize)>,
    /// Cells imported per second.
    pub cells_per_s: f64,
    /// Stored bytes of the input file read per second.
    pub input_mb_per_s: f64,
    /// Stages, wall time and peak memory.
    pub report: RunReport,
}

// Long: the wiring of the reader thread and the writer with their report, read top to bottom
// as the data flows.
/// Imports the `.h5ad` file `options.input` into a new store at `options.out`.
pub fn run(options: &ImportOptions, ctx: &RunContext) -> Result<ImportReport> {
    let (input, out, progress) = (options.input.as_path(), options.out.as_path(), ctx.progress());
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let read = StageStats::new(Stage::Read, 1);
    let write = StageStats::new(Stage::Write, 1);
    let source = match (&options.layer, options.use_raw) {
        (Some(l), false) => MatrixSource::Layer(l),
        (None, true) => MatrixSource::Raw,
        (None, false) => MatrixSource::X,
        (Some(l), true) => {
            return Err(Error::InvalidInput(format!("import: layer {l:?} and adata.raw both asked for; choose one")));
        }
    };
    let h5 = H5adReader::open_matrix_with(input, source, options.external).map_err(Error::stage(Stage::Read))?;
    let var_all = h5.read_var().map_err(Error::stage(Stage::Read))?;
    let (var, map) = select_genes(input, &h5, &var_all, options.genes.as_deref())?;
    let n_vars = var.num_rows() as u32;
    let writer_options = StoreWriterOptions {
        codec: options.codec,
        overwrite: options.overwrite,
        source: Some(format!(
            "imported from {}{}",
            input.display(),
            if h5.element() == "X" { String::new() } else { format!(" ({})", h5.element()) }
        )),
        ..StoreWriterOptions::default()
    };
    let mut writer =
        StoreWriter::create(out, &var, h5.obs_schema(), writer_options).map_err(Error::stage(Stage::Write))?;
    let degs = match h5.read_degs(options.deg_uns_key.as_deref()).map_err(Error::stage(Stage::Read))? {
        Some((key, table)) => Some(write_degs(&writer, &key, &table)?),
        None => None,
    };
    let layout = h5.layout();
    let chunk_rows = options.chunk_rows.max(1) as u64;
    let tmp_dir = bucket_dir(out);
    progress.begin("cells", h5.n_obs());
    // Written batches go back to the reader, so steady state allocates no batch buffers.
    let (recycle_tx, recycle_rx) = bounded::<CsrBatch>(CHANNEL_DEPTH + 2);
    let result = two_stage(
        Stage::Read,
        &read,
        &write,
        CHANNEL_DEPTH,
        |out| {
            crate::fault::point(Stage::Read);
            let sink = ChunkSink { out, recycled: &recycle_rx, stats: &read, n_vars };
            let result = match layout {
                MatrixLayout::Csc => read_csc(&h5, &map, chunk_rows, options, &tmp_dir, &sink),
                _ => read_by_rows(&h5, &map, chunk_rows, &sink),
            };
            let _ = fs::remove_dir_all(&tmp_dir);
            result
        },
        |(rows, obs): (CsrBatch, RecordBatch)| {
            // The store's rule for values (finite, >= 0), reported against the input file.
            for r in 0..rows.n_rows() {
                let (indices, values) = rows.row(r);
                cpa_stream_stages::csr::check_row(indices, values, n_vars).map_err(|e| {
                    let (file, matrix) = (input.display(), h5.element());
                    let others = h5.other_matrices();
                    let hint = match others.is_empty() {
                        true => String::new(),
                        false => format!("; this file has other matrices: {}", others.join(", ")),
                    };
                    Error::InvalidInput(format!("{file}: {matrix}: cell {}{e}{hint}", writer.n_obs() + r as u64))
                })?;
            }
            write.busy(|| writer.push_rows(&rows, &obs)).map_err(Error::stage(Stage::Write))?;
            write.add(rows.n_rows() as u64, rows.byte_size());
            progress.advance(rows.n_rows() as u64);
            ctx.check_stopped()?;
            let _ = recycle_tx.try_send(rows);
            Ok(())
        },
    );
    progress.end();
    result?;
    if writer.n_obs() != h5.n_obs() {
        return Err(Error::InvalidInput(format!(
            "{}: read {} of {} cells",
            input.display(),
            writer.n_obs(),
            h5.n_obs()
        )));
    }
    let manifest = write.busy(|| writer.finish()).map_err(Error::stage(Stage::Write))?;
    let wall = started.elapsed();
    let input_bytes = fs::metadata(input).map(|m| m.len()).unwrap_or(0);
    Ok(ImportReport {
        cells_per_s: manifest.n_obs as f64 / wall.as_secs_f64().max(1e-9),
        input_mb_per_s: input_bytes as f64 / 1e6 / wall.as_secs_f64().max(1e-9),
        manifest,
        layout: format!("{layout:?}").to_lowercase(),
        degs,
        report: RunReport { wall, stages: vec![read.report(), write.report()], memory: sampler.finish() },
    })
}

/// The `var` table of the kept genes and the map from file columns to store columns.
fn select_genes(
    input: &Path,
    h5: &H5adReader,
    var: &RecordBatch,
    genes: Option<&[String]>,
) -> Result<(RecordBatch, Vec<Option<u32>>)> {
    let n = h5.n_vars() as usize;
    let Some(genes) = genes else {
        return Ok((var.clone(), (0..n as u32).map(Some).collect()));
    };
    let ids = h5.gene_ids().map_err(Error::stage(Stage::Read))?;
    let position: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, g)| (g.as_str(), i)).collect();
    let mut map = vec![None; n];
    let mut take = Vec::with_capacity(genes.len());
    let mut missing = Vec::new();
    for (new, g) in genes.iter().enumerate() {
        match position.get(g.as_str()) {
            Some(&old) if map[old].is_some() => {
                return Err(Error::InvalidInput(format!("--genes: gene {g:?} is listed twice")));
            }
            Some(&old) => {
                map[old] = Some(new as u32);
                take.push(old as u32);
            }
            None => missing.push(g.as_str()),
        }
    }
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(10).copied().collect();
        return Err(Error::InvalidInput(format!(
            "--genes: {} gene(s) not in the var index of {}: {}{}",
            missing.len(),
            input.display(),
            shown.join(", "),
            if missing.len() > 10 { ", ..." } else { "" }
        )));
    }
    let indices = UInt32Array::from(take);
    let columns = var
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, &indices, None))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Error::arrow("--genes: var table"))?;
    let var = RecordBatch::try_new(var.schema(), columns).map_err(Error::arrow("--genes: var table"))?;
    Ok((var, map))
}

/// Where the reader sends chunks; hands out recycled batches.
struct ChunkSink<'a> {
    out: &'a Emitter<'a, (CsrBatch, RecordBatch)>,
    recycled: &'a Receiver<CsrBatch>,
    stats: &'a StageStats,
    n_vars: u32,
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

    /// Sends a chunk; `false` when the writer is gone.
    fn send(&self, rows: CsrBatch, obs: RecordBatch) -> bool {
        self.stats.add(rows.n_rows() as u64, rows.byte_size());
        self.out.send((rows, obs))
    }
}

fn read_by_rows(h5: &H5adReader, map: &[Option<u32>], chunk_rows: u64, out: &ChunkSink) -> StageResult<()> {
    let identity = map.len() == out.n_vars as usize && map.iter().enumerate().all(|(i, m)| *m == Some(i as u32));
    let mut file_rows = CsrBatch::new(h5.n_vars() as u32);
    let mut start = 0;
    while start < h5.n_obs() {
        // A chunk is bounded by its entries too, whatever the file declares.
        let chunk = out.stats.busy(|| -> StageResult<(CsrBatch, RecordBatch, u64)> {
            let end = h5.lines_within(start, chunk_rows, ENTRIES_PER_READ)?;
            let mut rows = out.batch();
            if identity {
                h5.read_rows(start..end, &mut rows)?;
            } else {
                file_rows.clear();
                h5.read_rows(start..end, &mut file_rows)?;
                rows.push_remapped(&file_rows, map);
            }
            Ok((rows, h5.read_obs(start..end)?, end))
        })?;
        if !out.send(chunk.0, chunk.1) {
            return Ok(());
        }
        start = chunk.2;
    }
    Ok(())
}

fn bucket_dir(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!(".{name}.import-{}", std::process::id()))
}

/// Default bucket files open at once during the CSC transposition (file handles and 64 KiB
/// buffers).
pub const DEFAULT_MAX_OPEN_BUCKETS: usize = 256;

/// One transposition entry: row within its bucket, store column, value.
const ENTRY_BYTES: usize = 12;

// Long: its two passes per group of buckets share the bucket files, the column map and the
// output; each pass is marked below.
fn read_csc(
    h5: &H5adReader,
    map: &[Option<u32>],
    chunk_rows: u64,
    options: &ImportOptions,
    dir: &Path,
    out: &ChunkSink,
) -> StageResult<()> {
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
                if !out.send(chunk.0, chunk.1) {
                    return Ok(());
                }
                start = end;
            }
        }
    }
    Ok(())
}

/// Writes a DEG table into the store being written, its `uns` key in the table's metadata;
/// returns the key and its rows.
fn write_degs(writer: &StoreWriter, key: &str, table: &RecordBatch) -> Result<(String, usize)> {
    let rows = table.num_rows();
    let metadata = HashMap::from([("uns_key".to_owned(), key.to_owned())]);
    let schema = Arc::new(table.schema().as_ref().clone().with_metadata(metadata));
    let table = table.clone().with_schema(Arc::clone(&schema)).map_err(Error::arrow("DEG table"))?;
    write_table(&writer.extra_file_path(DEG_FILE), schema, [table]).map_err(Error::stage(Stage::Write))?;
    Ok((key.to_owned(), rows))
}

/// Tables of an in-memory dataset (an AnnData in a Python process), in the store's schemas.
#[derive(Debug, Clone)]
pub struct Tables {
    /// The cells: first column `cell_id` (Utf8, not null), categoricals as
    /// [`categorical_field`](cpa_stream_schemas::tables::categorical_field)s.
    pub obs: RecordBatch,
    /// The genes: first column `gene_id` (Utf8, not null).
    pub var: RecordBatch,
    /// A DEG table ([`deg_schema`](cpa_stream_schemas::tables::deg_schema)) and the name of its
    /// source (an `uns` key), if any.
    pub degs: Option<(String, RecordBatch)>,
}

/// Imports a matrix given as chunks of CSR rows, in cell order, with its [`Tables`], into a new
/// store at `options.out`: the path of data already in memory (no `.h5ad` written in between).
/// `what` names the data in messages (`"AnnData (in memory)"`). Every row is checked as [`run`]
/// checks a file's (sorted column indices inside the genes, values finite and >= 0), and the
/// chunks must hold exactly the cells of `obs`.
pub fn run_chunks(
    what: &str,
    tables: &Tables,
    mut chunks: impl Iterator<Item = Result<CsrBatch>>,
    options: &ImportOptions,
    ctx: &RunContext,
) -> Result<ImportReport> {
    let (out, progress) = (options.out.as_path(), ctx.progress());
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let read = StageStats::new(Stage::Read, 1);
    let write = StageStats::new(Stage::Write, 1);
    let n_vars = u32::try_from(tables.var.num_rows())
        .map_err(|_| Error::InvalidInput(format!("{what}: {} genes exceed the u32 range", tables.var.num_rows())))?;
    let n_obs = tables.obs.num_rows() as u64;
    if let Some((_, degs)) = &tables.degs {
        cpa_stream_schemas::tables::same_schema(&cpa_stream_schemas::tables::deg_schema(), degs.schema_ref())
            .map_err(|e| Error::InvalidInput(format!("{what}: DEG table: {e}")))?;
    }
    let writer_options = StoreWriterOptions {
        codec: options.codec,
        overwrite: options.overwrite,
        source: Some(format!("imported from {what}")),
        ..StoreWriterOptions::default()
    };
    let mut writer = StoreWriter::create(out, &tables.var, tables.obs.schema(), writer_options)
        .map_err(Error::stage(Stage::Write))?;
    let degs = tables.degs.as_ref().map(|(key, table)| write_degs(&writer, key, table)).transpose()?;
    progress.begin("cells", n_obs);
    let result = (|| {
        while let Some(rows) = read.busy(|| chunks.next()) {
            let rows = rows?;
            read.add(rows.n_rows() as u64, rows.byte_size());
            let first = writer.n_obs();
            if rows.n_cols() != n_vars {
                return Err(Error::InvalidInput(format!(
                    "{what}: cells {first}..: a chunk of {} columns for {n_vars} genes",
                    rows.n_cols()
                )));
            }
            let end = first + rows.n_rows() as u64;
            if end > n_obs {
                return Err(Error::InvalidInput(format!(
                    "{what}: the matrix has more rows than the {n_obs} cells of obs"
                )));
            }
            for r in 0..rows.n_rows() {
                let (indices, values) = rows.row(r);
                cpa_stream_stages::csr::check_row(indices, values, n_vars)
                    .map_err(|e| Error::InvalidInput(format!("{what}: cell {}{e}", first + r as u64)))?;
            }
            let obs = tables.obs.slice(first as usize, rows.n_rows());
            write.busy(|| writer.push_rows(&rows, &obs)).map_err(Error::stage(Stage::Write))?;
            write.add(rows.n_rows() as u64, rows.byte_size());
            progress.advance(rows.n_rows() as u64);
            ctx.check_stopped()?;
        }
        Ok(())
    })();
    progress.end();
    result?;
    if writer.n_obs() != n_obs {
        return Err(Error::InvalidInput(format!("{what}: the matrix has {} rows for {n_obs} cells", writer.n_obs())));
    }
    let manifest = write.busy(|| writer.finish()).map_err(Error::stage(Stage::Write))?;
    let wall = started.elapsed();
    let bytes = read.report().bytes;
    Ok(ImportReport {
        cells_per_s: manifest.n_obs as f64 / wall.as_secs_f64().max(1e-9),
        input_mb_per_s: bytes as f64 / 1e6 / wall.as_secs_f64().max(1e-9),
        manifest,
        layout: "csr".to_owned(),
        degs,
        report: RunReport { wall, stages: vec![read.report(), write.report()], memory: sampler.finish() },
    })
}
