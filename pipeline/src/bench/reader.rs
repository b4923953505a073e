//! Reader benchmark: sequential and random-gather throughput of a store, against a memcpy bound
//! measured in the same run on the same bytes.

use std::time::{Duration, Instant};

use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::store::{Access, Store, consecutive_runs};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use crate::Stage;
use crate::crew::Crew;
use crate::error::{Error, Result};

/// Bytes copied per memcpy call in the bound (large enough to run at full bandwidth).
const MEMCPY_CHUNK: usize = 8 << 20;

/// Rows per batch of the reader benchmark, unless set otherwise.
pub const DEFAULT_READER_BATCH_SIZE: usize = 1024;
/// Repetitions of each reader measurement (the best is kept), unless set otherwise.
pub const DEFAULT_REPEATS: usize = 3;

/// Options of [`bench_reader`].
#[derive(Debug, Clone)]
pub struct ReaderBenchOptions {
    /// Rows per batch. Default [`DEFAULT_READER_BATCH_SIZE`].
    pub batch_size: usize,
    /// Reader threads. Default: available cores.
    pub threads: usize,
    /// Seed of the random order.
    pub seed: u64,
    /// Repetitions of each measurement; the best is kept. Default [`DEFAULT_REPEATS`].
    pub repeats: usize,
    /// Rows read by the random-gather pass, drawn without replacement. Default: all rows of a
    /// raw store, [`DEFAULT_RANDOM_ROWS_COMPRESSED`] of a compressed one (each random row there
    /// decompresses a whole block).
    pub random_rows: Option<u64>,
}

/// Default rows of the random-gather pass on a compressed store.
pub const DEFAULT_RANDOM_ROWS_COMPRESSED: u64 = 2_048;

impl Default for ReaderBenchOptions {
    fn default() -> Self {
        ReaderBenchOptions {
            batch_size: DEFAULT_READER_BATCH_SIZE,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            seed: 0,
            repeats: DEFAULT_REPEATS,
            random_rows: None,
        }
    }
}

/// One measured pass.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Seconds of the pass.
    pub seconds: f64,
    /// Cells per second.
    pub cells_per_s: f64,
    /// Payload gigabytes per second.
    pub gb_per_s: f64,
}

impl Throughput {
    fn new(elapsed: Duration, cells: u64, bytes: u64) -> Throughput {
        let s = elapsed.as_secs_f64().max(1e-9);
        Throughput { seconds: s, cells_per_s: cells as f64 / s, gb_per_s: bytes as f64 / 1e9 / s }
    }
}

/// Results of [`bench_reader`].
#[derive(Debug, Clone, Serialize)]
pub struct ReaderBench {
    /// The store benchmarked.
    pub store: String,
    /// Its codec.
    pub codec: String,
    /// Its cells.
    pub cells: u64,
    /// Its genes.
    pub n_vars: u64,
    /// Reader threads.
    pub threads: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// Payload bytes (indices + values) per cell, on average.
    pub bytes_per_cell: f64,
    /// Copying the payload with memcpy from the page-cached maps, with the same threads.
    pub memcpy: Throughput,
    /// memcpy's bytes/s expressed as cells/s.
    pub memcpy_cells_per_s: f64,
    /// Rows in store order.
    pub sequential: Throughput,
    /// Contiguous runs of `batch_size` rows in a random order of runs (block shuffle).
    pub block_shuffled: Throughput,
    /// Single rows in a random order, `random_rows` of them.
    pub random: Throughput,
    /// Rows read by the random pass.
    pub random_rows: u64,
    /// Sequential reads over the memcpy bound.
    pub sequential_vs_memcpy: f64,
    /// Block-shuffled reads over the memcpy bound.
    pub block_shuffled_vs_memcpy: f64,
    /// Random reads over the memcpy bound.
    pub random_vs_memcpy: f64,
}

// Long: the passes of one measurement, interleaved on purpose, with their figures.
/// Measures a store's read paths. The store's pages are touched first so that all passes read
/// from the page cache.
pub fn bench_reader(store: &Store, options: &ReaderBenchOptions) -> Result<ReaderBench> {
    let threads = options.threads.max(1);
    let batch = options.batch_size.max(1);
    let cells = store.n_obs();
    let payload_bytes = store.nnz() * 8;
    let stage = Error::stage(Stage::Bench);
    store.advise(Access::WillNeed);

    // Warm the page cache (and the copies' destination buffers) once.
    let memcpy_once = || memcpy_pass(store, threads);
    memcpy_once()?;
    let best = |f: &dyn Fn() -> Result<Duration>| -> Result<Duration> {
        let mut best = Duration::MAX;
        for _ in 0..options.repeats.max(1) {
            best = best.min(f()?);
        }
        Ok(best)
    };
    let memcpy = Throughput::new(best(&memcpy_once)?, cells, payload_bytes);

    store.advise(Access::Sequential);
    let sequential = Throughput::new(
        best(&|| {
            timed_threads(threads, |t| {
                let rows = partition(cells, threads, t);
                let mut cursor = store.cursor().map_err(stage)?;
                let mut out = CsrBatch::new(store.n_vars() as u32);
                let mut start = rows.start;
                while start < rows.end {
                    let end = (start + batch as u64).min(rows.end);
                    out.clear();
                    cursor.read_range(start..end, &mut out).map_err(stage)?;
                    std::hint::black_box(out.nnz());
                    start = end;
                }
                Ok(())
            })
        })?,
        cells,
        payload_bytes,
    );

    let mut rng = Xoshiro256PlusPlus::seed_from_u64(options.seed);
    let mut runs: Vec<u64> = (0..cells.div_ceil(batch as u64)).collect();
    runs.shuffle(&mut rng);
    let block_shuffled = Throughput::new(
        best(&|| {
            timed_threads(threads, |t| {
                let part = partition(runs.len() as u64, threads, t);
                let mut cursor = store.cursor().map_err(stage)?;
                let mut out = CsrBatch::new(store.n_vars() as u32);
                for &run in &runs[part.start as usize..part.end as usize] {
                    let start = run * batch as u64;
                    out.clear();
                    cursor.read_range(start..(start + batch as u64).min(cells), &mut out).map_err(stage)?;
                    std::hint::black_box(out.nnz());
                }
                Ok(())
            })
        })?,
        cells,
        payload_bytes,
    );

    store.advise(Access::Random);
    let compressed = store.raw_rows(0..0).is_none();
    let random_rows =
        options.random_rows.unwrap_or(if compressed { DEFAULT_RANDOM_ROWS_COMPRESSED } else { cells }).min(cells);
    let mut order: Vec<u64> = (0..cells).collect();
    order.shuffle(&mut rng);
    order.truncate(random_rows as usize);
    let indptr = store.indptr();
    let random_bytes: u64 = order.iter().map(|&r| (indptr[r as usize + 1] - indptr[r as usize]) * 8).sum();
    let random = Throughput::new(
        best(&|| {
            timed_threads(threads, |t| {
                let part = partition(random_rows, threads, t);
                let rows = &order[part.start as usize..part.end as usize];
                let mut cursor = store.cursor().map_err(stage)?;
                let mut out = CsrBatch::new(store.n_vars() as u32);
                for chunk in rows.chunks(batch) {
                    out.clear();
                    cursor.gather(chunk, &mut out).map_err(stage)?;
                    std::hint::black_box(out.nnz());
                }
                Ok(())
            })
        })?,
        random_rows,
        random_bytes,
    );

    let bytes_per_cell = payload_bytes as f64 / cells.max(1) as f64;
    let memcpy_cells_per_s = if bytes_per_cell > 0.0 { memcpy.gb_per_s * 1e9 / bytes_per_cell } else { f64::INFINITY };
    Ok(ReaderBench {
        store: store.path().display().to_string(),
        codec: store.manifest().codec.name().to_owned(),
        cells,
        n_vars: store.n_vars(),
        threads,
        batch_size: batch,
        bytes_per_cell,
        sequential_vs_memcpy: sequential.cells_per_s / memcpy_cells_per_s,
        block_shuffled_vs_memcpy: block_shuffled.cells_per_s / memcpy_cells_per_s,
        random_vs_memcpy: random.cells_per_s / memcpy_cells_per_s,
        random_rows,
        block_shuffled,
        memcpy_cells_per_s,
        memcpy,
        sequential,
        random,
    })
}

/// Copies the payload of every row with `threads` threads, in large chunks. For a compressed
/// store the bound is the same number of plain bytes copied from a buffer.
pub fn memcpy_pass(store: &Store, threads: usize) -> Result<Duration> {
    let n = store.n_obs();
    timed_threads(threads, |t| {
        let rows = partition(n, threads, t);
        let mut dst = vec![0u8; MEMCPY_CHUNK];
        match store.raw_rows(rows.clone()) {
            Some(view) => {
                for src in [bytemuck::cast_slice::<u32, u8>(view.indices), bytemuck::cast_slice::<f32, u8>(view.data)] {
                    for chunk in src.chunks(MEMCPY_CHUNK) {
                        dst[..chunk.len()].copy_from_slice(chunk);
                        std::hint::black_box(&dst);
                    }
                }
            }
            None => {
                let indptr = store.indptr();
                let bytes = (indptr[rows.end as usize] - indptr[rows.start as usize]) as usize * 8;
                let src = vec![1u8; MEMCPY_CHUNK];
                let mut left = bytes;
                while left > 0 {
                    let k = left.min(MEMCPY_CHUNK);
                    dst[..k].copy_from_slice(&src[..k]);
                    std::hint::black_box(&dst);
                    left -= k;
                }
            }
        }
        Ok(())
    })
}

/// One destination batch of the bounds: indices and values.
type Destination = (Vec<u32>, Vec<f32>);

/// `buffers` destinations of `width` entries, dealt to `threads` threads (as many per thread,
/// rounded up), and that count per thread. They exist (and are mapped) before a bound's clock
/// starts, as the loader's recycled batches do in steady state.
fn destination_pools(threads: usize, buffers: usize, width: usize) -> (Vec<std::sync::Mutex<Vec<Destination>>>, usize) {
    let per_thread = buffers.div_ceil(threads).max(1);
    let pools = (0..threads)
        .map(|_| std::sync::Mutex::new((0..per_thread).map(|_| (vec![0u32; width], vec![0f32; width])).collect()))
        .collect();
    (pools, per_thread)
}

/// Copies the payload of every row, in store order, into batch-shaped destinations: the indices
/// and the values of each run of `batch_size` rows go, with one memcpy each, into one of
/// `buffers` destination batches that circulate over the threads, as the loader's pool of batches
/// does. This is the loader's copy with the shuffle taken out: the same bytes into the same
/// number of buffers of the same size. When those buffers exceed the last-level cache, the
/// destinations are written back to memory, as the loader's are; a single reused buffer (as
/// [`memcpy_pass`] uses) stays in cache and measures read bandwidth alone. For a compressed
/// store the source is a plain buffer of the same bytes.
pub fn memcpy_into_batches(store: &Store, threads: usize, batch_size: usize, buffers: usize) -> Result<Duration> {
    let n = store.n_obs();
    let indptr = store.indptr();
    let batch = batch_size.max(1) as u64;
    // The widest run of `batch` rows sizes every destination.
    let widest = (0..n.div_ceil(batch))
        .map(|b| indptr[((b + 1) * batch).min(n) as usize] - indptr[(b * batch) as usize])
        .max()
        .unwrap_or(0) as usize;
    let (pools, per_thread) = destination_pools(threads, buffers, widest);
    let plain = store.raw_rows(0..0).is_none().then(|| (vec![1u32; widest], vec![1f32; widest]));
    timed_threads(threads, |t| {
        // Whole batches per thread, so that every run is one the widest destination holds.
        let batches = partition(n.div_ceil(batch), threads, t);
        let mut pool = pools[t].lock().map_err(|_| Error::Panic {
            stage: Stage::Bench,
            message: "another bench thread panicked holding its buffers".into(),
        })?;
        for (k, b) in batches.enumerate() {
            let (start, end) = (b * batch, ((b + 1) * batch).min(n));
            let (s, e) = (indptr[start as usize] as usize, indptr[end as usize] as usize);
            let (src_indices, src_values) = match &plain {
                Some((i, v)) => (&i[..e - s], &v[..e - s]),
                None => store.raw_rows(start..end).map(|view| (view.indices, view.data)).ok_or_else(|| {
                    Error::InvalidInput(format!("{}: rows {start}..{end} unreadable", store.path().display()))
                })?,
            };
            let (dst_indices, dst_values) = &mut pool[k % per_thread];
            dst_indices[..src_indices.len()].copy_from_slice(src_indices);
            dst_values[..src_values.len()].copy_from_slice(src_values);
            std::hint::black_box((&dst_indices, &dst_values));
        }
        Ok(())
    })
}

/// Copies the rows of `order`, cut into batches of `batch_size` as the loader's plan cuts them,
/// into `buffers` batch-sized destinations with plain memcpy: one per run of consecutive rows per
/// array, batch `b` on thread `b % threads` as the loader deals batches to its workers, the rows
/// of each batch sorted (as its workers sort them) before the clock starts. This is the loader's
/// access pattern with nothing else: no planner, no channels, no labels, no prefetch hints. Its
/// distance from [`memcpy_into_batches`] is the cost of reading scattered rows on this machine;
/// the loader's distance from it is the loader's own overhead. `None` for a compressed store,
/// whose scattered rows cost block decompressions rather than copies.
pub fn gather_into_batches(
    store: &Store,
    threads: usize,
    order: &mut [u64],
    batch_size: usize,
    buffers: usize,
) -> Result<Option<Duration>> {
    let Some(all) = store.raw_rows(0..store.n_obs()) else { return Ok(None) };
    let (indices, values, indptr) = (all.indices, all.data, all.indptr);
    let batch = batch_size.max(1);
    let n_obs = store.n_obs();
    if let Some(&row) = order.iter().find(|&&r| r >= n_obs) {
        return Err(Error::InvalidInput(format!(
            "{}: row {row} out of range, the store has {n_obs} rows",
            store.path().display()
        )));
    }
    let width =
        |rows: &[u64]| -> usize { rows.iter().map(|&r| (indptr[r as usize + 1] - indptr[r as usize]) as usize).sum() };
    let mut widest = 0;
    for rows in order.chunks_mut(batch) {
        rows.sort_unstable();
        widest = widest.max(width(rows));
    }
    let order = &*order;
    let (pools, per_thread) = destination_pools(threads, buffers, widest);
    let elapsed = timed_threads(threads, |t| {
        let mut pool = pools[t].lock().map_err(|_| Error::Panic {
            stage: Stage::Bench,
            message: "another bench thread panicked holding its buffers".into(),
        })?;
        for (k, rows) in order.chunks(batch).skip(t).step_by(threads).enumerate() {
            let (dst_indices, dst_values) = &mut pool[k % per_thread];
            let mut at = 0;
            for (i, j) in consecutive_runs(rows) {
                let (s, e) = (indptr[rows[i] as usize] as usize, indptr[rows[j - 1] as usize + 1] as usize);
                dst_indices[at..at + e - s].copy_from_slice(&indices[s..e]);
                dst_values[at..at + e - s].copy_from_slice(&values[s..e]);
                at += e - s;
            }
            std::hint::black_box((&dst_indices, &dst_values));
        }
        Ok(())
    })?;
    Ok(Some(elapsed))
}

fn partition(n: u64, parts: usize, i: usize) -> std::ops::Range<u64> {
    let per = n.div_ceil(parts as u64);
    let start = (i as u64 * per).min(n);
    start..(start + per).min(n)
}

fn timed_threads(threads: usize, work: impl Fn(usize) -> Result<()> + Sync) -> Result<Duration> {
    let start = Instant::now();
    let failed: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        let (work, failed) = (&work, &failed);
        let mut crew = Crew::new();
        for t in 0..threads {
            crew.spawn_in(scope, Stage::Bench, format!("{}-{t}", Stage::Bench), move || {
                if let Err(e) = work(t) {
                    failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                }
            })?;
        }
        crew.join()
    })?;
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(start.elapsed()),
    }
}
