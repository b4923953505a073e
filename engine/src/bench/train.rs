//! Training benchmark: the model trained through the pipeline against the same model stepping
//! on batches already in memory, in alternating passes of the same run, so that the ratio says
//! whether the loader ever holds the trainer up.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::device::{DeviceMemory, memory as device_memory};
use crate::model::config::CpaConfig;
use crate::model::{CpaModel, HostBatch};
use crate::trainer::Trainer;
use cpa_stream_stages::store::Store;
use serde::Serialize;
use tch::Device;

use crate::Stage;
use crate::train::upload::Feed;
use cpa_stream_pipeline::batcher::{self, LoaderOptions, PlanOptions, PoolStats, spawn_loader};
use cpa_stream_pipeline::encoder::{CellLabels, EncoderOptions, Split, SplitSpec};
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::telemetry::{MemorySampler, RunReport, StageStats, release_free_memory};

pub use cpa_stream_pipeline::model_flags::TRAIN_BENCH_PRELOAD_MIB as DEFAULT_PRELOAD_MIB;

/// Options of [`bench_training`].
#[derive(Debug, Clone)]
pub struct TrainingBenchOptions {
    /// The store to train on.
    pub store: PathBuf,
    /// Its split is ignored: every cell trains.
    pub encoder: EncoderOptions,
    /// Batch size, precision, seed and `shuffle_run_cells` (0: chosen as training chooses).
    pub config: CpaConfig,
    /// Where the model runs.
    pub device: Device,
    /// The batcher's threads and depth.
    pub loader: LoaderOptions,
    /// Rounds: one epoch through the pipeline and as many steps on the preloaded batches.
    pub epochs: u32,
    /// The most payload (counts' indices and values) the preloaded batches may hold; they are
    /// an epoch's first batches, stepped through in turn as often as an epoch needs.
    pub preload_bytes: u64,
}

/// One round of [`bench_training`].
#[derive(Debug, Clone, Serialize)]
pub struct TrainingRound {
    /// The round.
    pub epoch: u64,
    /// Batches of the pipeline's epoch (the preloaded pass steps as many).
    pub batches: u64,
    /// Cells per second through the pipeline.
    pub pipeline_cells_per_s: f64,
    /// Cells per second on the preloaded batches.
    pub preloaded_cells_per_s: f64,
    /// Pipeline over preloaded: 1 when the loader never holds the trainer up.
    pub ratio: f64,
    /// Seconds the trainer waited for the loader during the pipeline's epoch.
    pub trainer_blocked_s: f64,
}

/// What [`bench_training`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingBench {
    /// The store benchmarked.
    pub store: String,
    /// Its cells.
    pub cells: u64,
    /// Its genes.
    pub genes: u64,
    /// Cells per batch.
    pub batch_size: usize,
    /// The shuffle's run length.
    pub run_cells: usize,
    /// Batcher worker threads.
    pub workers: usize,
    /// The device.
    pub device: String,
    /// The precision.
    pub precision: String,
    /// libtorch's intra-op threads.
    pub threads: i32,
    /// Batches and cells held in memory for the preloaded passes.
    pub preloaded_batches: usize,
    /// Cells in the preloaded batches.
    pub preloaded_cells: u64,
    /// Over all rounds: total cells over total time of each kind of pass.
    pub pipeline_cells_per_s: f64,
    /// Cells per second on the preloaded batches, over all rounds.
    pub preloaded_cells_per_s: f64,
    /// The pipeline over the preloaded batches: 1 when the loader never holds the trainer up.
    pub ratio: f64,
    /// Every round.
    pub rounds: Vec<TrainingRound>,
    /// Stages, wall time and peak memory.
    pub report: RunReport,
    /// The CUDA caching allocator's peaks (`None` on the CPU).
    pub device_memory: Option<DeviceMemory>,
}

/// The state the passes of a training benchmark share.
struct Bench {
    store: Arc<Store>,
    labels: Arc<CellLabels>,
    plan: PlanOptions,
    loader: LoaderOptions,
    pool: PoolStats,
    upload_stats: Arc<StageStats>,
    train_stats: Arc<StageStats>,
    stop: Arc<AtomicBool>,
}

impl Bench {
    /// Copies of an epoch's first batches, up to `limit` payload bytes (at least one).
    fn preload(&self, limit: u64) -> Result<Vec<HostBatch>> {
        let (mut preloaded, mut bytes) = (Vec::new(), 0u64);
        let stats = PoolStats::planned(self.loader.workers);
        let mut loaded = spawn_loader(
            &self.store,
            &self.labels,
            Split::Train,
            u64::MAX,
            0,
            &self.plan,
            self.loader,
            stats,
            Arc::clone(&self.stop),
        )?;
        let ignored = StageStats::new(Stage::Bench, 1);
        while let Some(gathered) = loaded.next(&ignored) {
            let batch = gathered?.batch;
            let size = batch.counts.byte_size();
            if !preloaded.is_empty() && bytes + size > limit {
                break;
            }
            bytes += size;
            preloaded.push(batch.clone());
            loaded.recycle(batch);
        }
        Ok(preloaded)
    }

    /// One epoch through the pipeline: batches, cells, time (device synchronised).
    fn through_pipeline(&self, trainer: &mut Trainer, epoch: u64) -> Result<(u64, u64, Duration)> {
        let (mut batches, mut cells) = (0u64, 0u64);
        let start = Instant::now();
        let loaded = spawn_loader(
            &self.store,
            &self.labels,
            Split::Train,
            epoch,
            0,
            &self.plan,
            self.loader,
            self.pool.clone(),
            Arc::clone(&self.stop),
        )?;
        // As `train` feeds its trainer: on CUDA, uploaded a batch ahead.
        let mut feed = Feed::new(loaded, trainer.model().device(), &self.upload_stats)?;
        while let Some(fed) = feed.next(&self.train_stats) {
            let fed = fed?;
            let n = fed.cells();
            self.train_stats.add(n, fed.bytes());
            self.train_stats.busy(|| feed.step(trainer, fed)).map_err(Error::stage(Stage::Trainer))?;
            (batches, cells) = (batches + 1, cells + n);
        }
        drop(feed);
        sync(trainer)?;
        let elapsed = start.elapsed();
        trainer.end_epoch().map_err(Error::stage(Stage::Trainer))?;
        Ok((batches, cells, elapsed))
    }
}

/// `batches` steps over the preloaded batches in turn: cells, time (device synchronised).
fn from_memory(trainer: &mut Trainer, preloaded: &[HostBatch], batches: u64) -> Result<(u64, Duration)> {
    let start = Instant::now();
    let mut cells = 0u64;
    for batch in preloaded.iter().cycle().take(batches as usize) {
        trainer.step(batch).map_err(Error::stage(Stage::Trainer))?;
        cells += batch.n_cells() as u64;
    }
    sync(trainer)?;
    let elapsed = start.elapsed();
    trainer.end_epoch().map_err(Error::stage(Stage::Trainer))?;
    Ok((cells, elapsed))
}

/// Waits for the device: reading the running metrics synchronises it.
fn sync(trainer: &Trainer) -> Result<()> {
    trainer.running_metrics().map(drop).map_err(Error::stage(Stage::Trainer))
}

/// The labels of every cell of the store (all in training), and the encoder's stats.
fn label_cells(options: &TrainingBenchOptions, store: &Store) -> Result<(Arc<CellLabels>, Arc<StageStats>)> {
    let encoder = EncoderOptions { split: SplitSpec::all_training(), ..options.encoder.clone() };
    let encoder_stats = StageStats::new(Stage::Encoder, 1);
    let labels = Arc::new(encoder_stats.busy(|| CellLabels::from_store(store, &encoder))?);
    encoder_stats.add(labels.n_cells(), labels.heap_bytes() as u64);
    release_free_memory();
    if labels.split_counts[0] == 0 {
        return Err(Error::InvalidInput(format!("{}: no cells to train on", options.store.display())));
    }
    Ok((labels, encoder_stats))
}

/// Trains a fresh model on every cell of a store for `epochs` rounds. A round is two passes, each
/// a trainer epoch of its own: one through the pipeline (gather workers, trainer on
/// bounded channels, as `train` runs) and the same number of steps over batches held in memory.
/// Both then run the same sequence of autoencoder and adversary batches (an autoencoder step
/// costs several adversary steps), and they take turns going first. One untimed warm-up pass
/// over the preloaded batches comes before. Cells/s counts the cells stepped over the time of the
/// pass, with the device synchronised at its end.
pub fn bench_training(options: &TrainingBenchOptions) -> Result<TrainingBench> {
    let wall = Instant::now();
    let sampler = MemorySampler::start();
    let store = Arc::new(Store::open(&options.store).map_err(Error::stage(Stage::Reader))?);
    let (labels, encoder_stats) = label_cells(options, &store)?;
    let mut config = options.config.clone();
    // The schedule after pre-training, the one most of a run trains with: autoencoder and
    // adversary batches alternating from the first batch of each epoch.
    config.training.n_epochs_pretrain_ae = 0;
    let clustering = batcher::group_clustering(&labels, Split::Train);
    config.training.shuffle_run_cells = batcher::run_cells_for(config.training.shuffle_run_cells, clustering);
    let plan = PlanOptions {
        batch_size: config.training.batch_size,
        run_cells: config.training.shuffle_run_cells,
        seed: config.training.seed,
        ..PlanOptions::default()
    };
    device_memory::reset_peak(options.device);
    let model = CpaModel::new(&config, &labels.vocab, None, options.device, config.training.seed)
        .map_err(Error::stage(Stage::Trainer))?;
    let mut trainer = Trainer::new(model).map_err(Error::stage(Stage::Trainer))?;
    let bench = Bench {
        store: Arc::clone(&store),
        labels: Arc::clone(&labels),
        plan: plan.clone(),
        loader: options.loader,
        pool: PoolStats::planned(options.loader.workers),
        upload_stats: StageStats::new(Stage::Uploader, 1),
        train_stats: StageStats::new(Stage::Trainer, 1),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let preloaded = bench.preload(options.preload_bytes)?;
    let preloaded_cells: u64 = preloaded.iter().map(|b| b.n_cells() as u64).sum();
    // Warm-up: the allocator's blocks and libtorch's kernels, outside every clock.
    from_memory(&mut trainer, &preloaded, preloaded.len() as u64)?;

    let mut rounds = Vec::new();
    let (mut pipeline_time, mut preloaded_time) = (Duration::ZERO, Duration::ZERO);
    let (mut pipeline_cells, mut preloaded_total) = (0u64, 0u64);
    // Both passes step an epoch's batches: its plan cuts the cells into full batches and one last
    // partial one.
    let epoch_batches = labels.split_counts[0].div_ceil(plan.batch_size.max(1) as u64);
    for epoch in 0..u64::from(options.epochs.max(1)) {
        let blocked_before = bench.train_stats.report().blocked_in;
        // Pipeline first in even rounds, preloaded first in odd ones, so that neither gains from
        // its place in the round.
        let ((batches, cells, through_pipeline), (stepped, in_memory)) = if epoch % 2 == 0 {
            let pipeline = bench.through_pipeline(&mut trainer, epoch)?;
            (pipeline, from_memory(&mut trainer, &preloaded, epoch_batches)?)
        } else {
            let memory = from_memory(&mut trainer, &preloaded, epoch_batches)?;
            (bench.through_pipeline(&mut trainer, epoch)?, memory)
        };
        let blocked = bench.train_stats.report().blocked_in.saturating_sub(blocked_before);
        let rate = |cells: u64, time: Duration| cells as f64 / time.as_secs_f64().max(1e-9);
        let (pipeline_rate, preloaded_rate) = (rate(cells, through_pipeline), rate(stepped, in_memory));
        rounds.push(TrainingRound {
            epoch,
            batches,
            pipeline_cells_per_s: pipeline_rate,
            preloaded_cells_per_s: preloaded_rate,
            ratio: pipeline_rate / preloaded_rate,
            trainer_blocked_s: blocked.as_secs_f64(),
        });
        tracing::info!(
            "round {epoch}: pipeline {pipeline_rate:.0} cells/s, preloaded {preloaded_rate:.0} cells/s ({:.2}); \
             trainer waited {:.2} s for batches",
            pipeline_rate / preloaded_rate,
            blocked.as_secs_f64()
        );
        (pipeline_time, preloaded_time) = (pipeline_time + through_pipeline, preloaded_time + in_memory);
        (pipeline_cells, preloaded_total) = (pipeline_cells + cells, preloaded_total + stepped);
    }
    let pipeline_cells_per_s = pipeline_cells as f64 / pipeline_time.as_secs_f64().max(1e-9);
    let preloaded_cells_per_s = preloaded_total as f64 / preloaded_time.as_secs_f64().max(1e-9);
    let uploader = options.device.is_cuda().then(|| bench.upload_stats.report());
    let stages = [encoder_stats.report()]
        .into_iter()
        .chain(bench.pool.reports())
        .chain(uploader)
        .chain([bench.train_stats.report()]);
    Ok(TrainingBench {
        store: options.store.display().to_string(),
        cells: labels.n_cells(),
        genes: store.n_vars(),
        batch_size: plan.batch_size,
        run_cells: plan.run_cells,
        workers: options.loader.workers,
        device: format!("{:?}", options.device).to_lowercase(),
        precision: format!("{:?}", config.training.precision).to_lowercase(),
        threads: tch::get_num_threads(),
        preloaded_batches: preloaded.len(),
        preloaded_cells,
        pipeline_cells_per_s,
        preloaded_cells_per_s,
        ratio: pipeline_cells_per_s / preloaded_cells_per_s,
        rounds,
        report: RunReport { wall: wall.elapsed(), stages: stages.collect(), memory: sampler.finish() },
        device_memory: device_memory::stats(options.device),
    })
}
