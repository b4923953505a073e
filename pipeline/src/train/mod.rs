//! Training through the streaming pipeline: store reader -> perturbation encoder -> batcher
//! (gather workers, each planning the epoch) -> trainer (the one thread that owns the model).
//!
//! A run directory holds `checkpoint/` (every epoch, for `--resume`), `best/` (the weights with
//! the best validation score), `model/` (the final model: the best weights, or the last ones
//! when there was no validation), `metrics.parquet` (one row per epoch) and `config.toml`.

pub mod batcher;
pub mod bench;
pub mod encoder;
pub mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float64Array, RecordBatch, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use cpa_stream_stages::device_memory::{self, DeviceMemory};
use cpa_stream_stages::model::config::CpaConfig;
use cpa_stream_stages::model::files::publish_dir;
use cpa_stream_stages::model::{CpaModel, save_model};
use cpa_stream_stages::store::{Store, write_table};
use cpa_stream_stages::trainer::{EpochMetrics, Trainer};
use serde::Serialize;
use tch::Device;

use crate::error::{Error, Result};
use crate::metrics::{MemorySampler, RunReport, StageStats, release_free_memory};
use crate::progress::Progress;
use batcher::{EpochPlan, LoaderOptions, PlanOptions, spawn_loader};
use encoder::{CellLabels, EncoderOptions, Split};
use validate::{ValidationScore, validate};

pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const BEST_DIR: &str = "best";
pub const MODEL_DIR: &str = "model";
pub const METRICS_FILE: &str = "metrics.parquet";
pub const CONFIG_FILE: &str = "config.toml";

/// What `cpa-stream train` does.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub store: PathBuf,
    pub out: PathBuf,
    pub encoder: EncoderOptions,
    pub config: CpaConfig,
    pub device: Device,
    /// Continue from `out/checkpoint`.
    pub resume: bool,
    /// Epochs in all (a resumed run keeps its checkpoint's configuration, so this is how it is
    /// extended); `None` takes the configuration's.
    pub epochs: Option<u32>,
    /// Probe the batch size (`--batch-size auto`) instead of the configuration's.
    pub auto_batch_size: bool,
    pub workers: usize,
    pub prefetch: usize,
    pub block_cells: u64,
    pub shuffle_blocks: usize,
}

/// One epoch's row of `metrics.parquet`.
#[derive(Debug, Clone, Serialize)]
pub struct EpochRecord {
    pub train: EpochMetrics,
    pub seconds: f64,
    pub validation: Option<ValidationScore>,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub epochs: Vec<EpochRecord>,
    pub best_epoch: Option<u32>,
    pub stopped_early: bool,
    pub interrupted: bool,
    pub train_cells: u64,
    pub valid_cells: u64,
    pub cells_per_s: f64,
    pub report: RunReport,
    /// The CUDA caching allocator's counts at the end, peaks over the training (`None` on the CPU).
    pub device_memory: Option<DeviceMemory>,
}

/// Trains a model on a store through the pipeline. `stop` (e.g. set by Ctrl-C) ends the run
/// after the current optimizer step (the current batch, unless gradients accumulate over
/// several) with a checkpoint of that point: `--resume` continues within the epoch, exactly as
/// the uninterrupted run would on the CPU.
pub fn run_train(options: &TrainOptions, progress: &dyn Progress, stop: Arc<AtomicBool>) -> Result<TrainReport> {
    let wall = Instant::now();
    let sampler = MemorySampler::start();
    let stage = |stage: &'static str| move |source| Error::Stage { stage, source };
    let store = Store::open(&options.store).map_err(stage("reader"))?;
    let encoder_stats = StageStats::new("encoder", 1);
    let labels = encoder_stats.busy(|| CellLabels::from_store(&store, &options.encoder))?;
    encoder_stats.add(labels.n_cells(), labels.heap_bytes() as u64);
    // Reading obs's columns takes memory in proportion to the cells (about 100 MB at a million);
    // it is freed now, but glibc would keep it resident under the whole run.
    release_free_memory();
    let [train_cells, valid_cells, _, _] = labels.split_counts;
    if train_cells == 0 {
        return Err(Error::InvalidInput(format!("{}: no training cells", options.store.display())));
    }
    std::fs::create_dir_all(&options.out)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", options.out.display())))?;
    let checkpoint = options.out.join(CHECKPOINT_DIR);
    let clustering = batcher::group_clustering(&labels, Split::Train);
    let mut trainer = if options.resume {
        let t = Trainer::resume(&checkpoint, options.device).map_err(stage("trainer"))?;
        if t.model().vocabulary() != &labels.vocab {
            return Err(Error::InvalidInput(format!(
                "{}: the checkpoint's vocabularies or genes differ from this store's",
                checkpoint.display()
            )));
        }
        t
    } else {
        let mut config = options.config.clone();
        if options.auto_batch_size {
            let nnz_per_cell = (store.nnz() / store.n_obs().max(1)) as usize;
            config.training.batch_size = probe_batch_size(&config, &labels, options.device, nnz_per_cell)?;
            tracing::info!("batch size {} (probed on {:?})", config.training.batch_size, options.device);
        }
        if config.training.shuffle_run_cells == 0 {
            let runs = batcher::run_cells_for(0, clustering);
            config.training.shuffle_run_cells = runs;
            if runs > 1 {
                tracing::info!(
                    "the training cells are in random order of their labels ({clustering:.2}x the stretches of one \
                     label group expected of a random order): the loader shuffles runs of {runs} neighbouring cells"
                );
            } else {
                tracing::info!(
                    "the training cells lie together by label group ({clustering:.2}x the stretches of one group \
                     expected of a random order): the loader shuffles single cells; a copy written by \
                     `cpa-stream convert --shuffle SEED` would train with runs of {} cells, faster",
                    batcher::AUTO_RUN_CELLS
                );
            }
        }
        let model = CpaModel::new(&config, &labels.vocab, None, options.device, config.training.seed)
            .map_err(stage("trainer"))?;
        Trainer::new(model).map_err(stage("trainer"))?
    };
    // Peak device memory counts from here: the model, optimizer state and training steps.
    device_memory::reset_peak(options.device);
    let config = trainer.model().config().clone();
    let text = config.to_toml().map_err(stage("trainer"))?;
    let config_path = options.out.join(CONFIG_FILE);
    std::fs::write(&config_path, text).map_err(|e| Error::InvalidInput(format!("{}: {e}", config_path.display())))?;

    let epochs = options.epochs.unwrap_or_else(|| config.training.epochs_for(train_cells));
    let plan = PlanOptions {
        batch_size: config.training.batch_size,
        block_cells: options.block_cells,
        shuffle_blocks: options.shuffle_blocks,
        // 0 only in checkpoints from before the setting, which shuffled single cells.
        run_cells: config.training.shuffle_run_cells.max(1),
        seed: config.training.seed,
        shuffle: true,
    };
    let loader = LoaderOptions { workers: options.workers.max(1), prefetch: options.prefetch.max(1) };
    if plan.run_cells > 1 && clustering > batcher::CLUSTERED {
        tracing::warn!(
            "{}: the training cells of each condition, dose and covariates lie together ({clustering:.0}x a \
             random order), so each run of {} neighbouring cells (shuffle_run_cells) will mostly be one \
             condition; shuffle the store once (cpa-stream convert --shuffle SEED) or train with single cells",
            options.store.display(),
            plan.run_cells
        );
    }
    let (plan_stats, gather_stats, train_stats) = (
        StageStats::new("planner", loader.workers),
        StageStats::new("batcher", loader.workers),
        StageStats::new("trainer", 1),
    );
    let mut records = read_metrics(&options.out.join(METRICS_FILE), trainer.state().epoch)?;
    let mut stopped_early = false;
    let mut interrupted = false;
    let trained_start = Instant::now();
    let mut trained_cells = 0u64;
    // The loader's own stop: set by the trainer once it has decided to stop (after an interruption
    // it may still need the rest of an accumulation's batches) or on an error.
    let halt = Arc::new(AtomicBool::new(false));
    let resumed_cells = trainer.batches_in_epoch().saturating_mul(plan.batch_size as u64).min(train_cells);
    progress.begin(
        "train",
        (u64::from(epochs.saturating_sub(trainer.state().epoch)) * train_cells).saturating_sub(resumed_cells),
    );
    while trainer.state().epoch < epochs {
        let epoch = trainer.state().epoch;
        let started = Instant::now();
        // An epoch resumed from a checkpoint taken within it counts its time before the stop.
        let seconds_before = trainer.epoch_seconds_before_resume();
        std::thread::scope(|scope| -> Result<()> {
            let mut loaded = spawn_loader(
                scope,
                &store,
                &labels,
                Split::Train,
                u64::from(epoch),
                trainer.batches_in_epoch(),
                &plan,
                loader,
                (Arc::clone(&plan_stats), Arc::clone(&gather_stats)),
                Arc::clone(&halt),
            );
            while let Some(batch) = loaded.next(&train_stats) {
                let batch = batch?;
                train_stats.busy(|| trainer.step(&batch)).map_err(stage("trainer"))?;
                let n = batch.n_cells() as u64;
                train_stats.add(n, batch.counts.byte_size());
                trained_cells += n;
                progress.advance(n);
                loaded.recycle(batch);
                if stop.load(Ordering::Relaxed) && trainer.can_checkpoint() {
                    interrupted = true;
                    halt.store(true, Ordering::Relaxed);
                    return Ok(());
                }
            }
            Ok(())
        })
        .inspect_err(|_| halt.store(true, Ordering::Relaxed))?;
        if interrupted {
            train_stats.busy(|| trainer.save_checkpoint(&checkpoint)).map_err(stage("trainer"))?;
            tracing::warn!(
                "interrupted in epoch {epoch} after {} batches; checkpoint written (continue with --resume)",
                trainer.batches_in_epoch()
            );
            break;
        }
        let train_metrics = train_stats.busy(|| trainer.end_epoch()).map_err(stage("trainer"))?;
        let last = trainer.state().epoch >= epochs;
        let due = trainer.state().epoch.is_multiple_of(config.training.check_val_every_n_epoch);
        let validation = if valid_cells > 0 && (due || last) {
            let score = train_stats
                .busy(|| validate(trainer.model(), &store, &labels, Split::Valid, &plan, loader, Arc::clone(&halt)))?;
            let state = trainer.state_mut();
            if state.best_score.is_none_or(|b| score.score > b) {
                state.best_score = Some(score.score);
                state.best_epoch = Some(epoch);
                state.validations_without_improvement = 0;
                save_model(trainer.model(), &options.out.join(BEST_DIR)).map_err(stage("trainer"))?;
            } else {
                state.validations_without_improvement += 1;
            }
            Some(score)
        } else {
            None
        };
        let seconds = seconds_before + started.elapsed().as_secs_f64();
        records.push(EpochRecord { train: train_metrics, seconds, validation });
        write_metrics(&options.out.join(METRICS_FILE), &records)?;
        trainer.save_checkpoint(&checkpoint).map_err(stage("trainer"))?;
        tracing::info!(
            "epoch {}: recon {:.3}, adv {:.3}, acc_perts {:.3}{}",
            epoch,
            train_metrics.recon_loss,
            train_metrics.adv_loss,
            train_metrics.acc_perts,
            validation.map(|v| format!(", val score {:.4} (r2 mean {:.4})", v.score, v.r2_mean)).unwrap_or_default()
        );
        if trainer.state().validations_without_improvement >= config.training.early_stopping_patience {
            stopped_early = true;
            break;
        }
        if stop.load(Ordering::Relaxed) && trainer.state().epoch < epochs {
            // Interrupted during the epoch's last accumulation or its validation: the epoch's
            // checkpoint is the place to stop.
            interrupted = true;
            tracing::warn!("interrupted after epoch {epoch}; checkpoint written (continue with --resume)");
            break;
        }
    }
    progress.end();
    // The final model: the best validated weights, else the last ones.
    let best = options.out.join(BEST_DIR);
    let final_model = options.out.join(MODEL_DIR);
    if !interrupted {
        if trainer.state().best_epoch.is_some() && best.exists() {
            publish_dir(&final_model, |tmp| copy_dir(&best, tmp)).map_err(stage("trainer"))?;
        } else {
            save_model(trainer.model(), &final_model).map_err(stage("trainer"))?;
        }
    }
    let seconds = trained_start.elapsed().as_secs_f64().max(1e-9);
    let device_memory = device_memory::stats(options.device);
    let report = RunReport {
        wall: wall.elapsed(),
        stages: vec![encoder_stats.report(), plan_stats.report(), gather_stats.report(), train_stats.report()],
        memory: sampler.finish(),
    };
    Ok(TrainReport {
        best_epoch: trainer.state().best_epoch,
        epochs: records,
        stopped_early,
        interrupted,
        train_cells,
        valid_cells,
        cells_per_s: trained_cells as f64 / seconds,
        report,
        device_memory,
    })
}

fn copy_dir(from: &Path, to: &Path) -> cpa_stream_stages::Result<()> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |e| cpa_stream_stages::Error::InvalidInput(format!("{}: {e}", p.display()))
    };
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        std::fs::copy(entry.path(), to.join(entry.file_name())).map_err(io(&entry.path()))?;
    }
    Ok(())
}

fn metrics_schema() -> Arc<Schema> {
    let f = |n: &str, t: DataType, null: bool| Field::new(n, t, null);
    Arc::new(Schema::new(vec![
        f("epoch", DataType::UInt32, false),
        f("recon_loss", DataType::Float64, true),
        f("kl", DataType::Float64, true),
        f("adv_loss", DataType::Float64, true),
        f("penalty_adv", DataType::Float64, true),
        f("acc_perts", DataType::Float64, true),
        f("lr", DataType::Float64, false),
        f("cells", DataType::UInt64, false),
        f("autoencoder_batches", DataType::UInt64, false),
        f("adversary_batches", DataType::UInt64, false),
        f("seconds", DataType::Float64, false),
        f("val_recon_loss", DataType::Float64, true),
        f("val_r2_mean", DataType::Float64, true),
        f("val_r2_var", DataType::Float64, true),
        f("val_score", DataType::Float64, true),
        f("val_cells", DataType::UInt64, true),
    ]))
}

/// Writes every epoch's metrics to `path` (temporary name, then rename).
fn write_metrics(path: &Path, records: &[EpochRecord]) -> Result<()> {
    let num = |v: f64| v.is_finite().then_some(v);
    let col = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from(records.iter().map(f).collect::<Vec<_>>()))
    };
    let batch = RecordBatch::try_new(
        metrics_schema(),
        vec![
            Arc::new(UInt32Array::from(records.iter().map(|r| r.train.epoch).collect::<Vec<_>>())),
            col(&|r| num(r.train.recon_loss)),
            col(&|r| num(r.train.kl)),
            col(&|r| num(r.train.adv_loss)),
            col(&|r| num(r.train.penalty_adv)),
            col(&|r| num(r.train.acc_perts)),
            Arc::new(Float64Array::from(records.iter().map(|r| r.train.lr).collect::<Vec<_>>())),
            Arc::new(UInt64Array::from(records.iter().map(|r| r.train.cells).collect::<Vec<_>>())),
            Arc::new(UInt64Array::from(records.iter().map(|r| r.train.autoencoder_batches).collect::<Vec<_>>())),
            Arc::new(UInt64Array::from(records.iter().map(|r| r.train.adversary_batches).collect::<Vec<_>>())),
            Arc::new(Float64Array::from(records.iter().map(|r| r.seconds).collect::<Vec<_>>())),
            col(&|r| r.validation.and_then(|v| num(v.recon_loss))),
            col(&|r| r.validation.and_then(|v| num(v.r2_mean))),
            col(&|r| r.validation.and_then(|v| num(v.r2_var))),
            col(&|r| r.validation.and_then(|v| num(v.score))),
            Arc::new(UInt64Array::from(records.iter().map(|r| r.validation.map(|v| v.cells)).collect::<Vec<_>>())),
        ],
    )
    .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?;
    write_table(path, metrics_schema(), [batch]).map_err(|source| Error::Stage { stage: "metrics", source })
}

/// Reads back the metrics of epochs before `epochs` (for `--resume`); none if there is no file.
fn read_metrics(path: &Path, epochs: u32) -> Result<Vec<EpochRecord>> {
    if epochs == 0 || !path.exists() {
        return Ok(Vec::new());
    }
    let batch =
        cpa_stream_stages::store::read_small_table(path).map_err(|source| Error::Stage { stage: "metrics", source })?;
    let f64s = |name: &str| -> Vec<Option<f64>> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    };
    let get = |v: &[Option<f64>], i: usize| v.get(i).copied().flatten();
    let epoch: Vec<u32> = batch
        .column_by_name("epoch")
        .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
        .map(|a| a.values().to_vec())
        .unwrap_or_default();
    // Columns added later (batch counts, validation cells) read as 0 from older files.
    let u64s = |name: &str| -> Vec<Option<u64>> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    };
    let count = |v: &[Option<u64>], i: usize| v.get(i).copied().flatten().unwrap_or(0);
    let (cells, ae_batches, adv_batches, val_cells) =
        (u64s("cells"), u64s("autoencoder_batches"), u64s("adversary_batches"), u64s("val_cells"));
    let (recon, kl, adv, pen, acc, lr, secs) = (
        f64s("recon_loss"),
        f64s("kl"),
        f64s("adv_loss"),
        f64s("penalty_adv"),
        f64s("acc_perts"),
        f64s("lr"),
        f64s("seconds"),
    );
    let (vrec, vmean, vvar, vscore) =
        (f64s("val_recon_loss"), f64s("val_r2_mean"), f64s("val_r2_var"), f64s("val_score"));
    let mut out = Vec::new();
    for (i, &e) in epoch.iter().enumerate().filter(|(_, e)| **e < epochs) {
        let nan = f64::NAN;
        let validation = get(&vscore, i).map(|score| ValidationScore {
            recon_loss: get(&vrec, i).unwrap_or(nan),
            r2_mean: get(&vmean, i).unwrap_or(nan),
            r2_var: get(&vvar, i).unwrap_or(nan),
            score,
            cells: count(&val_cells, i),
        });
        out.push(EpochRecord {
            train: EpochMetrics {
                epoch: e,
                recon_loss: get(&recon, i).unwrap_or(nan),
                kl: get(&kl, i).unwrap_or(nan),
                adv_loss: get(&adv, i).unwrap_or(nan),
                penalty_adv: get(&pen, i).unwrap_or(nan),
                acc_perts: get(&acc, i).unwrap_or(nan),
                autoencoder_batches: count(&ae_batches, i),
                adversary_batches: count(&adv_batches, i),
                cells: count(&cells, i),
                lr: get(&lr, i).unwrap_or(nan),
            },
            seconds: get(&secs, i).unwrap_or(nan),
            validation,
        });
    }
    Ok(out)
}

/// One round of [`bench_loader`]: the bounds measured right before one loader epoch, so that the
/// ratios compare runs under the same load on a shared machine.
#[derive(Debug, Clone, Serialize)]
pub struct LoaderRound {
    pub epoch: u64,
    pub cells_per_s: f64,
    pub memcpy_cells_per_s: f64,
    pub vs_memcpy: f64,
    pub gather_bound_cells_per_s: Option<f64>,
    pub vs_gather_bound: Option<f64>,
}

/// What [`bench_loader`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoaderBench {
    pub store: String,
    pub cells: u64,
    pub genes: u64,
    pub workers: usize,
    pub batch_size: usize,
    /// Batches that circulate ([`LoaderOptions::pool_size`]), and the payload bytes they hold at
    /// the store's mean cells: the bounds copy into as many buffers. Where these fit in the
    /// last-level cache, writes stay there and the memcpy bound rises (on the development
    /// machine, 32 MB of cache: 8 buffers are 6.9 MB at batch 128 and 54 MB at 1,024).
    pub pool_batches: usize,
    pub pool_bytes: u64,
    /// The in-buffer shuffle's run length: the one asked for, or the one chosen when asked for 0 (auto).
    pub run_cells: usize,
    /// [`batcher::group_clustering`] of the store's cells.
    pub group_clustering: f64,
    /// Seconds of the loader's epochs (the bounds' time not included).
    pub seconds: f64,
    pub cells_per_s: f64,
    /// The memcpy bound: the same payload bytes, in store order, copied with the same number of
    /// threads into as many batch-sized buffers as the loader circulates (page-cached source),
    /// over all rounds. `vs_memcpy` is the loader's total time over the bound's.
    pub memcpy_cells_per_s: f64,
    pub vs_memcpy: f64,
    /// Read bandwidth: the same bytes copied into one reused cache-resident buffer per thread,
    /// the bound of `bench reader`, measured once before the rounds. No loader that hands batches
    /// on can write its output there.
    pub read_bound_cells_per_s: f64,
    pub vs_read_bound: f64,
    /// The gather bound: each epoch's plan, in its batches, copied with plain memcpy into the same
    /// number of buffers (the cost of the access pattern alone; `None` for a compressed store),
    /// over all rounds. `vs_memcpy` is this bound's ratio times the loader's ratio to it.
    pub gather_bound_cells_per_s: Option<f64>,
    pub vs_gather_bound: Option<f64>,
    /// Per epoch: the bounds, then the loader.
    pub rounds: Vec<LoaderRound>,
    pub report: RunReport,
}

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
) -> Result<LoaderBench> {
    let batch_size = plan.batch_size;
    let wall = Instant::now();
    let sampler = MemorySampler::start();
    let store = Store::open(store_path).map_err(|source| Error::Stage { stage: "reader", source })?;
    let encoder_stats = StageStats::new("encoder", 1);
    let encoder = EncoderOptions {
        split: encoder::SplitSpec::Fraction { validation: 0.0, test: 0.0, seed: 0, holdout: Vec::new() },
        ..encoder.clone()
    };
    let labels = encoder_stats.busy(|| CellLabels::from_store(&store, &encoder))?;
    let group_clustering = batcher::group_clustering(&labels, Split::Train);
    let plan = &PlanOptions { run_cells: batcher::run_cells_for(plan.run_cells, group_clustering), ..plan.clone() };
    store.advise(cpa_stream_stages::store::Access::WillNeed);
    let threads = loader.workers.max(1);
    crate::bench::memcpy_pass(&store, threads)?;
    let read_bound = crate::bench::memcpy_pass(&store, threads)?;
    let (plan_stats, gather_stats, consumer) = (
        StageStats::new("planner", loader.workers),
        StageStats::new("batcher", loader.workers),
        StageStats::new("consumer", 1),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let rate = |cells: u64, time: Duration| cells as f64 / time.as_secs_f64().max(1e-9);
    let (mut rounds, mut cells) = (Vec::new(), 0u64);
    let (mut loader_time, mut memcpy_time, mut gather_time) = (Duration::ZERO, Duration::ZERO, Some(Duration::ZERO));
    for epoch in 0..u64::from(epochs.max(1)) {
        let memcpy = crate::bench::memcpy_into_batches(&store, threads, batch_size, loader.pool_size())?;
        let gather = {
            // The epoch's plan, 8 bytes per cell, freed before the loader runs.
            let mut order: Vec<u64> = EpochPlan::new(&labels, Split::Train, epoch, plan).flatten().collect();
            crate::bench::gather_into_batches(&store, threads, &mut order, batch_size, loader.pool_size())?
        };
        let start = Instant::now();
        let mut epoch_cells = 0u64;
        std::thread::scope(|scope| -> Result<()> {
            let mut loaded = spawn_loader(
                scope,
                &store,
                &labels,
                Split::Train,
                epoch,
                0,
                plan,
                loader,
                (Arc::clone(&plan_stats), Arc::clone(&gather_stats)),
                Arc::clone(&stop),
            );
            while let Some(batch) = loaded.next(&consumer) {
                let batch = batch?;
                epoch_cells += batch.n_cells() as u64;
                consumer.add(batch.n_cells() as u64, batch.counts.byte_size());
                loaded.recycle(batch);
            }
            Ok(())
        })?;
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
            stages: vec![encoder_stats.report(), plan_stats.report(), gather_stats.report(), consumer.report()],
            memory: sampler.finish(),
        },
    })
}

/// Largest batch `--batch-size auto` probes.
pub const AUTO_BATCH_MAX: usize = 1 << 16;

/// The batch size for `--batch-size auto`: on CUDA, the largest power of two (from 256 up to
/// [`AUTO_BATCH_MAX`]) whose training step runs on the device, halved for margin (probed with a
/// scratch model and synthetic batches of `nnz_per_cell` entries per cell, not guessed); on the
/// CPU, the configuration's batch size.
pub fn probe_batch_size(config: &CpaConfig, labels: &CellLabels, device: Device, nnz_per_cell: usize) -> Result<usize> {
    if !device.is_cuda() {
        return Ok(config.training.batch_size);
    }
    let stage = |source| Error::Stage { stage: "batch-size probe", source };
    let genes = labels.vocab.n_genes() as u32;
    let mut probe = config.clone();
    probe.training.accumulate_batches = 1;
    probe.adversary.adv_steps = 0; // both steps on every batch: the largest memory footprint
    let model = CpaModel::new(&probe, &labels.vocab, None, device, 0).map_err(stage)?;
    let mut trainer = Trainer::new(model).map_err(stage)?;
    let group = labels.groups().first().ok_or_else(|| Error::InvalidInput("no label groups".into()))?;
    let step = nnz_per_cell.clamp(1, genes as usize);
    let indices: Vec<u32> = (0..step as u32).map(|k| (k as u64 * genes as u64 / step as u64) as u32).collect();
    let values = vec![3.0f32; indices.len()];
    let mut best = None;
    let mut size = 256usize;
    while size <= AUTO_BATCH_MAX {
        let mut batch = cpa_stream_stages::model::HostBatch::new(genes, labels.vocab.covariates.len());
        for _ in 0..size {
            batch.counts.push_row(&indices, &values);
            batch.push_labels(&group.parts, &group.covariates, group.class);
        }
        // Two steps: the second runs with the optimizer state allocated.
        let fits = trainer.step(&batch).and_then(|_| trainer.step(&batch)).is_ok();
        if !fits {
            break;
        }
        best = Some(size);
        size *= 2;
    }
    // The probe's blocks stay in the allocator's cache: give them back before training.
    drop(trainer);
    device_memory::empty_cache(device);
    let best = best.ok_or_else(|| Error::InvalidInput(format!("not even a batch of 256 cells fits on {device:?}")))?;
    Ok((best / 2).max(256))
}
