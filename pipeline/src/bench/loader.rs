//! `bench loader`: the pipeline without the model (encoder and batcher workers over every cell,
//! the consumer only handing batches back), against a memcpy bound and a gather bound measured
//! in the same rounds.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::store::{Access, BlockCacheReport, Store};
use serde::Serialize;

use super::reader::{gather_into_batches, memcpy_into_batches, memcpy_pass};
use crate::Stage;
use crate::batcher::{self, EpochPlan, LoaderOptions, PlanOptions, PoolStats, spawn_loader};
use crate::encoder::{CellLabels, EncoderOptions, Split, SplitSpec};
use crate::error::{Error, Result};
use crate::telemetry::{MemorySampler, RunReport, StageStats};

/// Cells per batch of the loader benchmark, unless set otherwise.
pub const DEFAULT_LOADER_BATCH_SIZE: usize = 1024;
/// Rounds (epochs, each after its bounds) of the loader and training benchmarks, unless set
/// otherwise.
pub const DEFAULT_ROUNDS: u32 = 3;

/// One round of [`bench_loader`]: the bounds measured right before one loader epoch, so that the
/// ratios compare runs under the same load on a shared machine.
#[derive(Debug, Clone, Serialize)]
pub struct LoaderRound {
    /// The round (epoch).
    pub epoch: u64,
    /// The loader's cells per second in this epoch.
    pub cells_per_s: f64,
    /// The memcpy bound measured just before it.
    pub memcpy_cells_per_s: f64,
    /// The loader over the memcpy bound.
    pub vs_memcpy: f64,
    /// The gather bound measured just before it (`None` for a compressed store).
    pub gather_bound_cells_per_s: Option<f64>,
    /// The loader over the gather bound.
    pub vs_gather_bound: Option<f64>,
}

/// What [`bench_loader`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoaderBench {
    /// The store benchmarked.
    pub store: String,
    /// Its cells.
    pub cells: u64,
    /// Its genes.
    pub genes: u64,
    /// Batcher worker threads.
    pub workers: usize,
    /// Cells per batch.
    pub batch_size: usize,
    /// Batches that circulate ([`LoaderOptions::pool_size`]), and the payload bytes they hold at
    /// the store's mean cells: the bounds copy into as many buffers. Where these fit in the
    /// last-level cache, writes stay there and the memcpy bound rises (on the development
    /// machine, 32 MB of cache: 8 buffers are 6.9 MB at batch 128 and 54 MB at 1,024).
    pub pool_batches: usize,
    /// Payload bytes those batches hold at the store's mean cell.
    pub pool_bytes: u64,
    /// The in-buffer shuffle's run length: the one asked for, or the one chosen when asked for 0 (auto).
    pub run_cells: usize,
    /// [`batcher::group_clustering`] of the store's cells.
    pub group_clustering: f64,
    /// Whether the consumer wrote each batch out dense on the host (cells x genes f32, as a
    /// loader handing numpy arrays does) instead of taking it as CSR.
    pub dense: bool,
    /// The store's codec (`raw` or `zstd`).
    pub codec: String,
    /// Blocks in the shuffle window, after fitting a compressed store's window to the buffer.
    pub shuffle_blocks: usize,
    /// The shuffle buffer's limit in bytes (compressed stores).
    pub buffer_bytes: u64,
    /// Compressed blocks of the store (0 for a raw store).
    pub store_blocks: u64,
    /// Over all rounds: blocks decoded (ideally `store_blocks` per round), the bytes they
    /// decoded to, blocks dropped early for the buffer's limit, and the most decoded bytes held.
    pub blocks: BlockCacheReport,
    /// Host batches allocated over all rounds: at most `pool_batches`, since each round after
    /// the first fills the batches of the one before.
    pub host_batches_allocated: u64,
    /// Seconds of the loader's epochs (the bounds' time not included).
    pub seconds: f64,
    /// The loader's cells per second over all rounds.
    pub cells_per_s: f64,
    /// The memcpy bound: the same payload bytes, in store order, copied with the same number of
    /// threads into as many batch-sized buffers as the loader circulates (page-cached source),
    /// over all rounds. `vs_memcpy` is the loader's total time over the bound's.
    pub memcpy_cells_per_s: f64,
    /// The loader over the memcpy bound.
    pub vs_memcpy: f64,
    /// Read bandwidth: the same bytes copied into one reused cache-resident buffer per thread,
    /// the bound of `bench reader`, measured once before the rounds. No loader that hands batches
    /// on can write its output there.
    pub read_bound_cells_per_s: f64,
    /// The loader over the read bound.
    pub vs_read_bound: f64,
    /// The gather bound: each epoch's plan, in its batches, copied with plain memcpy into the same
    /// number of buffers (the cost of the access pattern alone; `None` for a compressed store),
    /// over all rounds. `vs_memcpy` is this bound's ratio times the loader's ratio to it.
    pub gather_bound_cells_per_s: Option<f64>,
    /// The loader over the gather bound.
    pub vs_gather_bound: Option<f64>,
    /// Per epoch: the bounds, then the loader.
    pub rounds: Vec<LoaderRound>,
    /// Stages, wall time and peak memory.
    pub report: RunReport,
}

// Long: a round measures both bounds and then the loader, on purpose in one place.
/// The pipeline without the model: shuffled epochs of the encoder and batcher workers
/// over every cell, the consumer only handing batches back. Each epoch is a round that first
/// measures the memcpy and gather bounds, so each ratio compares runs made seconds apart (on a
/// shared machine the bandwidth drifts between minutes). `plan.run_cells` 0 chooses as training
/// does.
pub fn bench_loader(
    store_path: &Path,
    encoder: &EncoderOptions,
    plan: &PlanOptions,
    loader: LoaderOptions,
    epochs: u32,
    dense: bool,
) -> Result<LoaderBench> {
    let batch_size = plan.batch_size;
    let wall = Instant::now();
    let sampler = MemorySampler::start();
    let store = Arc::new(Store::open(store_path).map_err(Error::stage(Stage::Reader))?);
    let encoder_stats = StageStats::new(Stage::Encoder, 1);
    let encoder = EncoderOptions { split: SplitSpec::all_training(), ..encoder.clone() };
    let labels = Arc::new(encoder_stats.busy(|| CellLabels::from_store(&store, &encoder))?);
    let group_clustering = batcher::group_clustering(&labels, Split::Train);
    let plan = &PlanOptions { run_cells: batcher::run_cells_for(plan.run_cells, group_clustering), ..plan.clone() }
        .fitted(&store, loader.buffer_bytes);
    store.advise(Access::WillNeed);
    let threads = loader.workers.max(1);
    memcpy_pass(&store, threads)?;
    let read_bound = memcpy_pass(&store, threads)?;
    let (pool, consumer) = (PoolStats::planned(loader.workers), StageStats::new(Stage::Consumer, 1));
    let stop = Arc::new(AtomicBool::new(false));
    let rate = |cells: u64, time: Duration| cells as f64 / time.as_secs_f64().max(1e-9);
    let mut dense_rows = Vec::new();
    let (mut rounds, mut cells) = (Vec::new(), 0u64);
    let (mut loader_time, mut memcpy_time, mut gather_time) = (Duration::ZERO, Duration::ZERO, Some(Duration::ZERO));
    for epoch in 0..u64::from(epochs.max(1)) {
        let memcpy = memcpy_into_batches(&store, threads, batch_size, loader.pool_size())?;
        let gather = {
            // The epoch's plan, 8 bytes per cell, freed before the loader runs.
            let mut order: Vec<u64> = EpochPlan::new(&labels, Split::Train, epoch, plan).flatten().collect();
            gather_into_batches(&store, threads, &mut order, batch_size, loader.pool_size())?
        };
        let start = Instant::now();
        let mut epoch_cells = 0u64;
        let mut loaded =
            spawn_loader(&store, &labels, Split::Train, epoch, 0, plan, loader, pool.clone(), Arc::clone(&stop))?;
        while let Some(gathered) = loaded.next(&consumer) {
            let batch = gathered?.batch;
            if dense {
                consumer.busy(|| densify(&batch.counts, &mut dense_rows));
            }
            epoch_cells += batch.n_cells() as u64;
            consumer.add(batch.n_cells() as u64, batch.counts.byte_size());
            loaded.recycle(batch);
        }
        drop(loaded);
        let elapsed = start.elapsed();
        let (loader_rate, memcpy_rate) = (rate(epoch_cells, elapsed), rate(store.n_obs(), memcpy));
        let gather_rate = gather.map(|g| rate(labels.split_counts[0], g));
        rounds.push(LoaderRound {
            epoch,
            cells_per_s: loader_rate,
            memcpy_cells_per_s: memcpy_rate,
            vs_memcpy: loader_rate / memcpy_rate,
            gather_bound_cells_per_s: gather_rate,
            vs_gather_bound: gather_rate.map(|g| loader_rate / g),
        });
        (cells, loader_time, memcpy_time) = (cells + epoch_cells, loader_time + elapsed, memcpy_time + memcpy);
        gather_time = gather_time.zip(gather).map(|(total, g)| total + g);
    }
    let n_rounds = rounds.len() as u64;
    let cells_per_s = rate(cells, loader_time);
    let memcpy_cells_per_s = rate(store.n_obs() * n_rounds, memcpy_time);
    let read_bound_cells_per_s = rate(store.n_obs(), read_bound);
    let gather_bound_cells_per_s = gather_time.map(|g| rate(labels.split_counts[0] * n_rounds, g));
    Ok(LoaderBench {
        store: store_path.display().to_string(),
        cells: store.n_obs(),
        genes: store.n_vars(),
        workers: loader.workers,
        batch_size,
        pool_batches: loader.pool_size(),
        pool_bytes: (store.nnz() * 8).div_ceil(store.n_obs().max(1)) * (batch_size * loader.pool_size()) as u64,
        run_cells: plan.run_cells,
        group_clustering,
        dense,
        codec: store.manifest().codec.name().to_owned(),
        shuffle_blocks: plan.shuffle_blocks,
        buffer_bytes: loader.buffer_bytes,
        store_blocks: store.n_blocks(),
        blocks: pool.block_report(),
        host_batches_allocated: pool.batches().1,
        seconds: loader_time.as_secs_f64(),
        cells_per_s,
        memcpy_cells_per_s,
        vs_memcpy: cells_per_s / memcpy_cells_per_s,
        read_bound_cells_per_s,
        vs_read_bound: cells_per_s / read_bound_cells_per_s,
        gather_bound_cells_per_s,
        vs_gather_bound: gather_bound_cells_per_s.map(|g| cells_per_s / g),
        rounds,
        report: RunReport {
            wall: wall.elapsed(),
            stages: [encoder_stats.report()].into_iter().chain(pool.reports()).chain([consumer.report()]).collect(),
            memory: sampler.finish(),
        },
    })
}

/// Writes `rows` as a dense row-major cells x genes matrix into `out` (resized). Each row is
/// zeroed right before its values are scattered into it, while it is in the cache: zeroing the
/// whole batch first (82 MB at 4,096 x 5,000) and scattering after writes it to memory twice.
fn densify(rows: &CsrBatch, out: &mut Vec<f32>) {
    let genes = rows.n_cols() as usize;
    out.resize(rows.n_rows() * genes, 0.0);
    for (r, dense) in out.chunks_exact_mut(genes.max(1)).enumerate().take(rows.n_rows()) {
        dense.fill(0.0);
        let (indices, values) = rows.row(r);
        for (&g, &v) in indices.iter().zip(values) {
            dense[g as usize] = v;
        }
    }
    std::hint::black_box(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn densify_overwrites_every_cell_of_a_reused_buffer() {
        let mut rows = CsrBatch::new(4);
        rows.push_row(&[1, 3], &[2.0, 5.0]);
        rows.push_row(&[], &[]);
        rows.push_row(&[0], &[7.0]);
        // A buffer left over from a larger batch, full of other values.
        let mut out = vec![9.0f32; 20];
        densify(&rows, &mut out);
        assert_eq!(out, [0.0, 2.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0]);
    }
}
