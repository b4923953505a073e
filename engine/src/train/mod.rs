//! Training through the streaming pipeline: store reader -> perturbation encoder -> batcher
//! (gather workers, each planning the epoch) -> trainer (the one thread that owns the model).
//!
//! A run directory ([`cpa_stream_pipeline::run_dir`]) holds `checkpoint/` (for `--resume`; see [`TrainOptions::checkpoint_every`]),
//! `best/` (the weights with the best validation score), `model/` (the final model: the best
//! weights, or the last ones when there was no validation), `metrics.parquet` (one row per epoch,
//! [`history`]) and `config.toml`.

pub mod dispersion;
pub mod features;
pub mod history;
pub mod probe;
pub mod request;
pub(crate) mod upload;
pub mod validate;

use cpa_stream_stages::output::{OutputKind, OutputLock, claim_output};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::collective::Collective;
use crate::device::{DeviceMemory, memory as device_memory};
use crate::model::config::{CpaConfig, DispersionInit, DoserType};
use crate::model::files::publish_dir;
use crate::model::{CpaModel, save_model};
use crate::trainer::{EpochMetrics, Trainer};
use cpa_stream_stages::store::Store;
use serde::Serialize;
use tch::Device;

use crate::Stage;
use cpa_stream_pipeline::batcher::{self, LoaderOptions, PlanOptions, PoolStats, Shard, spawn_loader};
use cpa_stream_pipeline::context::RunContext;
use cpa_stream_pipeline::encoder::{CellLabels, EncoderOptions, Split};
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::run_dir::{
    BEST_DIR, CHECKPOINT_DIR, CONFIG_FILE, HISTORY_STEM, METRICS_FILE, MODEL_DIR, RUN_ENTRIES, check_replaceable,
    copy_files, is_nonempty_dir, remove_entries,
};
use cpa_stream_pipeline::telemetry::{MemorySampler, RunReport, StageStats, release_free_memory};
pub use history::EpochRecord;
use history::{read_history, write_history};
pub use probe::{AUTO_BATCH_MAX, probe_batch_size};
pub use request::{ConfigSource, TrainRequest};
use upload::Feed;
use validate::{ValidationScore, validate};

/// Seconds of training between two checkpoints by default: a checkpoint of a small model takes
/// milliseconds to write but its epochs can too (cpa-tools' tutorials' data), so short epochs
/// share one; a run killed outright loses at most this much work, and none of its exactness.
pub const DEFAULT_CHECKPOINT_SECONDS: f64 = 10.0;

/// What `cpa-stream train` does.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The store to train on.
    pub store: PathBuf,
    /// The run directory.
    pub out: PathBuf,
    /// Which obs columns label the cells, and how they are split.
    pub encoder: EncoderOptions,
    /// The model and its training schedule (a resumed run keeps its checkpoint's).
    pub config: CpaConfig,
    /// Where the model runs; default the CPU.
    pub device: Device,
    /// Continue from `out/checkpoint`; default false.
    pub resume: bool,
    /// Train a count likelihood (`nb`, `zinb`) on values that are not whole numbers, with a
    /// warning instead of the error; default false.
    pub allow_non_counts: bool,
    /// Replace an existing run at `out` (only a run: a directory holding other files is
    /// refused); default false, and an existing run is an error unless resumed.
    pub overwrite: bool,
    /// Training time between two checkpoints: `checkpoint/` (and `metrics.parquet`) is written
    /// after the first epoch that ends this long after the last checkpoint, and always after the
    /// last epoch, at an early stop and on an interruption; zero: after every epoch. Default
    /// [`DEFAULT_CHECKPOINT_SECONDS`].
    pub checkpoint_every: Duration,
    /// Epochs in all (a resumed run keeps its checkpoint's configuration, so this is how it is
    /// extended); `None` (the default) takes the configuration's.
    pub epochs: Option<u32>,
    /// Probe the batch size (`--batch-size auto`) instead of the configuration's; default false.
    pub auto_batch_size: bool,
    /// Train as one rank of the torch.distributed process group of this name (made in this
    /// process by the caller; [`crate::collective`]): each rank trains on its share of every
    /// batch (the configuration's batch size is the whole step's), rank 0 validates and writes
    /// the run directory, the others write nothing. Default `None`: alone.
    pub process_group: Option<String>,
    /// The batcher's threads and depth.
    pub loader: LoaderOptions,
    /// Fixed perturbation features ([`features::FeatureTable`]) the model projects instead of
    /// learning free embeddings; perturbations of the table without cells join the vocabulary.
    /// A resumed run keeps its checkpoint's. Default none.
    pub perturbation_features: Option<PathBuf>,
    /// How batches are drawn: its `block_cells` and `shuffle_blocks` are used as they are; the
    /// batch size, run length and seed are the configuration's `[training]` values (so that the
    /// run records them), and training always shuffles.
    pub plan: PlanOptions,
}

impl Default for TrainOptions {
    /// Options with every default; `store` and `out` are empty and must be set.
    fn default() -> Self {
        TrainOptions {
            store: PathBuf::new(),
            out: PathBuf::new(),
            encoder: EncoderOptions::default(),
            config: CpaConfig::default(),
            perturbation_features: None,
            device: Device::Cpu,
            resume: false,
            overwrite: false,
            allow_non_counts: false,
            checkpoint_every: Duration::from_secs_f64(DEFAULT_CHECKPOINT_SECONDS),
            epochs: None,
            auto_batch_size: false,
            process_group: None,
            loader: LoaderOptions::default(),
            plan: PlanOptions::default(),
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Every epoch recorded (a resumed run: those before the resume too).
    pub epochs: Vec<EpochRecord>,
    /// The epoch whose weights `model/` holds, when there was validation.
    pub best_epoch: Option<u32>,
    /// Early stopping ended the run.
    pub stopped_early: bool,
    /// The context's stop ended the run (a checkpoint was written; continue with `--resume`).
    pub interrupted: bool,
    /// Cells of the training split.
    pub train_cells: u64,
    /// Cells of the validation split.
    pub valid_cells: u64,
    /// Training cells per second over this run's epochs.
    pub cells_per_s: f64,
    /// Stages, wall time and peak memory.
    pub report: RunReport,
    /// The CUDA caching allocator's counts at the end, peaks over the training (`None` on the CPU).
    pub device_memory: Option<DeviceMemory>,
}

/// Trains a model on a store through the pipeline. The context's stop flag (e.g. set by Ctrl-C)
/// ends the run after the current optimizer step (the current batch, unless gradients accumulate
/// over several) with a checkpoint of that point: `--resume` continues within the epoch,
/// exactly as the uninterrupted run would on the CPU.
pub fn run(options: &TrainOptions, ctx: &RunContext) -> Result<TrainReport> {
    let wall = Instant::now();
    let sampler = MemorySampler::start();
    let collective =
        options.process_group.as_deref().map(Collective::join).transpose().map_err(Error::stage(Stage::Trainer))?;
    if collective.as_ref().is_some_and(|c| c.rank() > 0) {
        // The run directory is rank 0's.
        return train_claimed(options, ctx, wall, sampler, collective);
    }
    if options.auto_batch_size && collective.is_some() {
        return Err(Error::InvalidInput(
            "--batch-size auto probes one device; in data-parallel training give the batch size of a whole step \
             (each rank trains on its share of it)"
                .to_owned(),
        ));
    }
    // Held for the whole run: a second command on this run (a training, a --resume) is refused.
    let _lock = claim_run_dir(options)?;
    let created = !options.out.exists();
    let result = train_claimed(options, ctx, wall, sampler, collective);
    // A new run that fails before its first checkpoint leaves nothing behind (its configuration
    // alone is no run: a full disk left a config.toml that --resume could not continue).
    if result.is_err() && !options.resume && !options.out.join(CHECKPOINT_DIR).exists() {
        let _ = remove_entries(&options.out, &RUN_ENTRIES);
        if created {
            let _ = std::fs::remove_dir(&options.out);
        }
    }
    result
}

fn train_claimed(
    options: &TrainOptions,
    ctx: &RunContext,
    wall: Instant,
    sampler: MemorySampler,
    collective: Option<Collective>,
) -> Result<TrainReport> {
    let leader = collective.as_ref().is_none_or(|c| c.rank() == 0);
    let store = Arc::new(Store::open(&options.store).map_err(Error::stage(Stage::Reader))?);
    let encoder_stats = StageStats::new(Stage::Encoder, 1);
    let labels = encoder_stats.busy(|| CellLabels::from_store(&store, &options.encoder))?;
    let (labels, features) = with_features(options, labels)?;
    let labels = Arc::new(labels);
    encoder_stats.add(labels.n_cells(), labels.heap_bytes() as u64);
    // Reading obs's columns takes memory in proportion to the cells (about 100 MB at a million);
    // it is freed now, but glibc would keep it resident under the whole run.
    release_free_memory();
    let [train_cells, valid_cells, _, _] = labels.split_counts;
    if train_cells == 0 {
        return Err(Error::InvalidInput(format!("{}: no training cells", options.store.display())));
    }
    if options.epochs == Some(0) {
        return Err(Error::InvalidInput(
            "--epochs 0 trains nothing; no model was written (give at least 1, or leave it to the configuration)"
                .to_owned(),
        ));
    }
    let mut trainer = start_trainer(options, &store, &labels, features.as_ref())?;
    if trainer.model().config().model.recon_loss.is_count() {
        check_counts(&store, options.allow_non_counts)?;
    }
    let world = collective.as_ref().map_or(1, Collective::world);
    let recorded = trainer.state().world_size.map_or(1, |w| w as usize);
    if options.resume && recorded != world && leader {
        tracing::warn!(
            "{}: trained on {recorded} process(es) until its checkpoint, continued on {world}: the run goes on, but \
             not exactly as an uninterrupted run on either would",
            options.out.display(),
        );
    }
    let shard = match collective {
        None => {
            trainer.state_mut().world_size = None;
            Shard::WHOLE
        }
        Some(c) => {
            let batch = trainer.model().config().training.batch_size;
            if batch < c.world() || (train_cells as usize) < c.world() {
                return Err(Error::InvalidInput(format!(
                    "{} processes, but batches of {batch} cells and {train_cells} training cells: every process \
                     trains on a share of every batch, so a batch needs at least one cell per process",
                    c.world()
                )));
            }
            let shard = Shard { rank: c.rank(), world: c.world() };
            trainer.join(c).map_err(Error::stage(Stage::Trainer))?;
            shard
        }
    };
    if leader {
        std::fs::create_dir_all(&options.out).map_err(Error::io(&options.out))?;
    }
    // Peak device memory counts from here: the model, optimizer state and training steps.
    device_memory::reset_peak(options.device);
    let config = trainer.model().config().clone();
    if leader {
        let config_path = options.out.join(CONFIG_FILE);
        let text = config.to_toml().map_err(Error::stage(Stage::Trainer))?;
        // Whole or absent: written beside, then renamed.
        let tmp = cpa_stream_stages::output::temporary_sibling(&config_path).map_err(Error::stage(Stage::Trainer))?;
        std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &config_path)).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&config_path)(e)
        })?;
    }
    let plan = PlanOptions {
        batch_size: config.training.batch_size,
        // 0 only in checkpoints from before the setting, which shuffled single cells.
        run_cells: config.training.shuffle_run_cells.max(1),
        seed: config.training.seed,
        shuffle: true,
        shard,
        ..options.plan.clone()
    };
    let loader = LoaderOptions {
        workers: options.loader.workers.max(1),
        prefetch: options.loader.prefetch.max(1),
        ..options.loader
    };
    warn_if_clustered(options, &labels, &plan);
    let epochs = options.epochs.unwrap_or_else(|| config.training.epochs_for(train_cells));
    let covariates: Vec<String> = trainer.model().vocabulary().covariates.iter().map(|c| c.name.clone()).collect();
    let records = if leader {
        read_history(&options.out.join(METRICS_FILE), trainer.state().epoch, &covariates)?
    } else {
        Vec::new()
    };
    let mut run = Run {
        leader,
        options,
        store,
        labels,
        plan,
        loader,
        trainer,
        pool: PoolStats::planned(loader.workers),
        upload_stats: StageStats::new(Stage::Uploader, 1),
        train_stats: StageStats::new(Stage::Trainer, 1),
        records,
        halt: Arc::new(AtomicBool::new(false)),
        trained_cells: 0,
    };
    let trained_start = Instant::now();
    let end = run.epochs(epochs, ctx)?;
    if !end.interrupted && leader {
        run.publish_model()?;
    }
    let seconds = trained_start.elapsed().as_secs_f64().max(1e-9);
    let Run { trainer, records, pool, upload_stats, train_stats, trained_cells, .. } = run;
    // A picture is no reason to fail a run: a warning when it cannot be drawn.
    let title = format!("training history of {}", options.out.display());
    if leader && let Err(e) = history::plot_history(&options.out.join(HISTORY_STEM), &title, &records) {
        tracing::warn!("{e}");
    }
    // The uploader is a stage of CUDA runs only (elsewhere the trainer uploads).
    let uploader = options.device.is_cuda().then(|| upload_stats.report());
    let stages = [encoder_stats.report()]
        .into_iter()
        .chain(pool.reports())
        .chain(uploader)
        .chain([train_stats.report()])
        .collect();
    Ok(TrainReport {
        best_epoch: trainer.state().best_epoch,
        epochs: records,
        stopped_early: end.stopped_early,
        interrupted: end.interrupted,
        train_cells,
        valid_cells,
        cells_per_s: trained_cells as f64 / seconds,
        report: RunReport { wall: wall.elapsed(), stages, memory: sampler.finish() },
        device_memory: device_memory::stats(options.device),
    })
}

/// Rows sampled by [`check_counts`], evenly spread over the store.
const COUNT_SAMPLE_ROWS: u64 = 2000;

/// A count likelihood on a log-normalised or scaled layer trains without complaint and models
/// nonsense, so the values of a sample of cells must be whole numbers (as cpa-tools checks).
fn check_counts(store: &Store, allow: bool) -> Result<()> {
    let n = store.n_obs();
    let step = (n / COUNT_SAMPLE_ROWS).max(1);
    let rows: Vec<u64> = (0..n).step_by(step as usize).take(COUNT_SAMPLE_ROWS as usize).collect();
    let mut batch = cpa_stream_stages::CsrBatch::new(u32::try_from(store.n_vars()).unwrap_or(u32::MAX));
    store.cursor().and_then(|mut c| c.gather(&rows, &mut batch)).map_err(Error::stage(Stage::Reader))?;
    for (r, &row) in rows.iter().enumerate() {
        let (genes, values) = batch.row(r);
        if let Some((g, v)) = genes.iter().zip(values).find(|(_, v)| v.fract() != 0.0) {
            let message = format!(
                "{}: the likelihood (model.recon_loss nb or zinb) models counts, but cell {row} holds {v} at gene \
                 {g}: a normalised or log-transformed layer? Import the raw counts (import --layer counts), or set \
                 model.recon_loss = \"gauss\" in the configuration",
                store.path().display()
            );
            if allow {
                tracing::warn!("{message}; training anyway (--allow-non-counts / allow_non_counts=True)");
                return Ok(());
            }
            return Err(Error::InvalidInput(format!(
                "{message} (--allow-non-counts, in Python allow_non_counts=True, trains anyway)"
            )));
        }
    }
    Ok(())
}

/// One rule for the run directory: locked for this command (one writer per run), a new run needs
/// an empty or absent one; an existing run is continued (`resume`) or replaced (`overwrite`,
/// which removes its files first, and only when the directory holds nothing but a run's files).
fn claim_run_dir(options: &TrainOptions) -> Result<OutputLock> {
    let out = &options.out;
    if options.resume && options.overwrite {
        return Err(Error::InvalidInput("--resume continues a run and --overwrite replaces it: give one".to_owned()));
    }
    cpa_stream_stages::output::check_not_an_input(
        out,
        [&options.store].into_iter().chain(&options.perturbation_features),
    )
    .map_err(Error::stage(Stage::Trainer))?;
    let lock = claim_output(out, OutputKind::Directory, true).map_err(Error::stage(Stage::Trainer))?;
    if !is_nonempty_dir(out) {
        if options.resume {
            return Err(Error::InvalidInput(format!("{}: no run to resume", out.display())));
        }
        return Ok(lock);
    }
    check_replaceable(out, &RUN_ENTRIES, "a training run")?;
    if options.resume {
        // What a killed run of this one left half-written (under the lock, nobody else's).
        for name in RUN_ENTRIES {
            cpa_stream_stages::output::remove_stale_temporaries(&out.join(name));
        }
        return Ok(lock);
    }
    if !options.overwrite {
        let finished = out.join(MODEL_DIR).exists();
        return Err(Error::InvalidInput(format!(
            "{}: already holds a training run{}; --resume continues it, --overwrite replaces it",
            out.display(),
            if finished { " with a finished model/" } else { "" }
        )));
    }
    remove_entries(out, &RUN_ENTRIES)?;
    for name in RUN_ENTRIES {
        cpa_stream_stages::output::remove_stale_temporaries(&out.join(name));
    }
    Ok(lock)
}

/// The trainer of a run: resumed from its checkpoint, or a new model (with the batch size and
/// run length chosen here when the configuration leaves them to the run).
fn start_trainer(
    options: &TrainOptions,
    store: &Store,
    labels: &CellLabels,
    features: Option<&tch::Tensor>,
) -> Result<Trainer> {
    let checkpoint = options.out.join(CHECKPOINT_DIR);
    if options.resume {
        let t = Trainer::resume(&checkpoint, options.device).map_err(Error::stage(Stage::Trainer))?;
        // A run continues on the cells it started with (in any order): another store would
        // train on cells the split had put elsewhere.
        let cells = |v: &crate::model::Vocabulary| v.data.as_ref().and_then(|d| d.cells);
        if let (Some(trained), Some(here)) = (cells(t.model().vocabulary()), cells(&labels.vocab))
            && trained != here
        {
            return Err(Error::InvalidInput(format!(
                "{}: holds {} cells, not the {} the run in {} trained on; --resume continues on the store the run \
                 started with (a shuffled copy of it is fine)",
                options.store.display(),
                here.cells,
                trained.cells,
                options.out.display()
            )));
        }
        let without_cells = |v: &crate::model::Vocabulary| {
            let mut v = v.clone();
            if let Some(d) = v.data.as_mut() {
                d.cells = None;
            }
            v
        };
        if without_cells(t.model().vocabulary()) != without_cells(&labels.vocab) {
            return Err(Error::InvalidInput(format!(
                "{}: the checkpoint's vocabularies or genes differ from this store's",
                checkpoint.display()
            )));
        }
        return Ok(t);
    }
    let mut config = options.config.clone();
    if config.training.batch_size == 0 {
        let [train_cells, ..] = labels.split_counts;
        let epochs = options.epochs.unwrap_or_else(|| config.training.epochs_for(train_cells));
        config.training.batch_size = config.training.batch_size_for(train_cells, epochs);
        tracing::info!("batch size {} for {epochs} epochs of {train_cells} training cells", config.training.batch_size);
    }
    if config.model.doser_type == DoserType::Auto {
        let several = several_doses(labels);
        config.model.doser_type = if several { DoserType::Logsigm } else { DoserType::Linear };
        tracing::info!(
            "dose response {} (doser_type auto: {} training cells' perturbations)",
            if several { "logsigm" } else { "linear" },
            if several { "several doses among the" } else { "one dose for each of the" }
        );
    }
    if options.auto_batch_size {
        let nnz_per_cell = (store.nnz() / store.n_obs().max(1)) as usize;
        config.training.batch_size = probe_batch_size(&config, labels, options.device, nnz_per_cell)?;
        tracing::info!("batch size {} (probed on {:?})", config.training.batch_size, options.device);
    }
    if config.training.shuffle_run_cells == 0 {
        let clustering = batcher::group_clustering(labels, Split::Train);
        let runs = batcher::run_cells_for(0, clustering);
        config.training.shuffle_run_cells = runs;
        if runs > 1 {
            tracing::info!("store in random label order: shuffling runs of {runs} neighbouring cells");
            tracing::debug!(
                "the training cells are in random order of their labels ({clustering:.2}x the stretches of one \
                 label group expected of a random order): the loader shuffles runs of {runs} neighbouring cells"
            );
        } else {
            tracing::info!("store sorted by label: shuffling single cells (convert --shuffle trains faster)");
            tracing::debug!(
                "the training cells lie together by label group ({clustering:.2}x the stretches of one group \
                 expected of a random order): the loader shuffles single cells; a copy written by \
                 `cpa-stream convert --shuffle SEED` would train with runs of {} cells, faster",
                batcher::AUTO_RUN_CELLS
            );
        }
    }
    let mut model = CpaModel::new(&config, &labels.vocab, features, options.device, config.training.seed)
        .map_err(Error::stage(Stage::Trainer))?;
    if config.model.dispersion_init == DispersionInit::Moments && config.model.recon_loss.is_count() {
        let estimate = dispersion::moment_log_theta(store, labels).map_err(Error::stage(Stage::Reader))?;
        tracing::debug!(
            "inverse dispersion starts from moments: {} training cells in {} label groups, {} of {} genes estimated",
            estimate.cells,
            estimate.groups,
            estimate.genes_estimated,
            estimate.log_theta.len()
        );
        model.set_log_theta(&estimate.log_theta).map_err(Error::stage(Stage::Trainer))?;
    }
    Trainer::new(model).map_err(Error::stage(Stage::Trainer))
}

/// Whether some perturbation (not the control) has training cells at two or more doses.
fn several_doses(labels: &CellLabels) -> bool {
    let control = cpa_stream_stages::model::vocab::CONTROL_ID as u32;
    let mut trained = vec![false; labels.groups().len()];
    for cell in 0..labels.n_cells() {
        if labels.split(cell) == Split::Train {
            trained[labels.group_id(cell) as usize] = true;
        }
    }
    let mut first_dose: std::collections::HashMap<u32, f32> = std::collections::HashMap::new();
    for (group, _) in labels.groups().iter().zip(&trained).filter(|(_, t)| **t) {
        for &(perturbation, dose) in group.parts.iter().filter(|(p, _)| *p != control) {
            if *first_dose.entry(perturbation).or_insert(dose) != dose {
                return true;
            }
        }
    }
    false
}

/// The labels and features of a run with perturbation features: the table's perturbations
/// without cells added to the vocabulary, and the features in its order. A resumed run takes
/// its checkpoint's vocabulary (its features are in the checkpoint's weights).
fn with_features(options: &TrainOptions, labels: CellLabels) -> Result<(CellLabels, Option<tch::Tensor>)> {
    if options.resume {
        if options.perturbation_features.is_some() {
            return Err(Error::InvalidInput(
                "--perturbation-features with --resume: a resumed run keeps the features of its checkpoint \
                 (leave it out)"
                    .to_owned(),
            ));
        }
        let checkpoint = options.out.join(CHECKPOINT_DIR);
        let file = crate::model::files::read_model_file(&checkpoint).map_err(Error::stage(Stage::Trainer))?;
        if file.perturbation_features.is_none() {
            return Ok((labels, None));
        }
        let known = labels.vocab.perturbation_index();
        let extra: Vec<String> =
            file.vocabulary.perturbations.iter().filter(|p| !known.contains_key(p.as_str())).cloned().collect();
        drop(known);
        return Ok((labels.with_perturbations(&extra), None));
    }
    let Some(path) = &options.perturbation_features else { return Ok((labels, None)) };
    let table = features::FeatureTable::read(path, &options.encoder.perturbation_key)?;
    let extra = table.extra(&labels.vocab);
    let labels = labels.with_perturbations(&extra);
    let tensor = table.tensor(&labels.vocab)?;
    tracing::info!(
        "perturbation features: {} columns from {} for {} perturbations ({} without cells, predicted from their \
         features)",
        table.columns.len(),
        path.display(),
        labels.vocab.perturbations.len() - 1,
        extra.len()
    );
    Ok((labels, Some(tensor)))
}

/// Runs of neighbouring cells on a store sorted by label group make batches of one condition.
fn warn_if_clustered(options: &TrainOptions, labels: &CellLabels, plan: &PlanOptions) {
    let clustering = batcher::group_clustering(labels, Split::Train);
    if plan.run_cells > 1 && clustering > batcher::CLUSTERED {
        tracing::warn!(
            "{}: the training cells of each condition, dose and covariates lie together ({clustering:.0}x a \
             random order), so each run of {} neighbouring cells (shuffle_run_cells) will mostly be one \
             condition; shuffle the store once (cpa-stream convert --shuffle SEED) or train with single cells",
            options.store.display(),
            plan.run_cells
        );
    }
}

/// How the epochs ended.
#[derive(Debug, Clone, Copy, Default)]
struct End {
    stopped_early: bool,
    interrupted: bool,
}

/// A run in progress: the wiring of the stages and what they have done so far.
struct Run<'a> {
    /// Alone, or rank 0 of data-parallel training: validates and writes the run directory.
    leader: bool,
    options: &'a TrainOptions,
    store: Arc<Store>,
    labels: Arc<CellLabels>,
    plan: PlanOptions,
    loader: LoaderOptions,
    trainer: Trainer,
    pool: PoolStats,
    /// The uploader's counters (CUDA: batches go to the device ahead of the trainer).
    upload_stats: Arc<StageStats>,
    train_stats: Arc<StageStats>,
    records: Vec<EpochRecord>,
    /// The loader's own stop: set by the trainer once it has decided to stop (after an
    /// interruption it may still need the rest of an accumulation's batches) or on an error.
    halt: Arc<AtomicBool>,
    trained_cells: u64,
}

impl Run<'_> {
    /// Trains up to `epochs` epochs, validating, recording and checkpointing after each.
    fn epochs(&mut self, epochs: u32, ctx: &RunContext) -> Result<End> {
        let progress = ctx.progress();
        let train_cells = self.labels.split_counts[Split::Train as usize];
        let valid_cells = self.labels.split_counts[Split::Valid as usize];
        let config = self.trainer.model().config().clone();
        let checkpoint = self.options.out.join(CHECKPOINT_DIR);
        let resumed_cells =
            self.trainer.batches_in_epoch().saturating_mul(self.plan.batch_size as u64).min(train_cells);
        let remaining = u64::from(epochs.saturating_sub(self.trainer.state().epoch)) * train_cells;
        progress.begin("train", remaining.saturating_sub(resumed_cells));
        progress.epochs(train_cells.max(1), resumed_cells, self.trainer.state().epoch, epochs);
        let mut end = End::default();
        let mut last_checkpoint = Instant::now();
        while self.trainer.state().epoch < epochs {
            let epoch = self.trainer.state().epoch;
            let started = Instant::now();
            // An epoch resumed from a checkpoint taken within it counts its time before the stop.
            let seconds_before = self.trainer.epoch_seconds_before_resume();
            let trained = self.train_epoch(u64::from(epoch), ctx);
            if trained.is_err() {
                self.halt.store(true, Ordering::Relaxed);
            }
            if trained? {
                // Alone only: data-parallel training stops between epochs.
                end.interrupted = true;
                self.save(&checkpoint)?;
                tracing::warn!(
                    "interrupted in epoch {epoch} after {} batches; checkpoint written (continue with --resume)",
                    self.trainer.batches_in_epoch()
                );
                break;
            }
            let train_metrics =
                self.train_stats.busy(|| self.trainer.end_epoch()).map_err(Error::stage(Stage::Trainer))?;
            let last = self.trainer.state().epoch >= epochs;
            let due = self.trainer.state().epoch.is_multiple_of(config.training.check_val_every_n_epoch);
            let validation =
                if self.leader && valid_cells > 0 && (due || last) { Some(self.validate()?) } else { None };
            let seconds = seconds_before + started.elapsed().as_secs_f64();
            progress.note(&epoch_summary(epoch, &train_metrics, validation.as_ref()));
            log_epoch(epoch, &train_metrics, validation.as_ref());
            self.records.push(EpochRecord { train: train_metrics, seconds, validation });
            let mut stop_early =
                self.trainer.state().validations_without_improvement >= config.training.early_stopping_patience;
            let mut interrupted = ctx.stopped() && self.trainer.state().epoch < epochs;
            if let Some(c) = self.trainer.collective() {
                // Rank 0's validation decides the early stop; any rank's Ctrl-C stops them all.
                let device = self.options.device;
                stop_early = c
                    .any(stop_early, device, &format!("the early stop after epoch {epoch}"))
                    .map_err(Error::stage(Stage::Trainer))?;
                interrupted = c
                    .any(interrupted, device, &format!("the stop after epoch {epoch}"))
                    .map_err(Error::stage(Stage::Trainer))?;
            }
            let due = last || stop_early || interrupted || last_checkpoint.elapsed() >= self.options.checkpoint_every;
            if due && self.leader {
                self.save(&checkpoint)?;
                last_checkpoint = Instant::now();
            }
            if stop_early {
                end.stopped_early = true;
                break;
            }
            if interrupted {
                // Interrupted during the epoch's last accumulation or its validation: the epoch's
                // checkpoint is the place to stop.
                end.interrupted = true;
                tracing::warn!("interrupted after epoch {epoch}; checkpoint written (continue with --resume)");
                break;
            }
        }
        progress.end();
        Ok(end)
    }

    /// Writes the history of the epochs so far, then the checkpoint (a resumed run reads the
    /// history up to its checkpoint's epoch, so the history is never behind it).
    fn save(&mut self, checkpoint: &Path) -> Result<()> {
        let covariates: Vec<String> =
            self.trainer.model().vocabulary().covariates.iter().map(|c| c.name.clone()).collect();
        write_history(&self.options.out.join(METRICS_FILE), &self.records, &covariates)?;
        self.train_stats.busy(|| self.trainer.save_checkpoint(checkpoint)).map_err(Error::stage(Stage::Trainer))
    }

    /// One epoch's batches through the trainer; `true` when the context's stop ended it early
    /// (at a point where a checkpoint can be taken).
    fn train_epoch(&mut self, epoch: u64, ctx: &RunContext) -> Result<bool> {
        let loaded = spawn_loader(
            &self.store,
            &self.labels,
            Split::Train,
            epoch,
            self.trainer.batches_in_epoch(),
            &self.plan,
            self.loader,
            self.pool.clone(),
            Arc::clone(&self.halt),
        )?;
        let mut feed = Feed::new(loaded, self.options.device, &self.upload_stats)?;
        while let Some(fed) = feed.next(&self.train_stats) {
            let fed = fed?;
            let (cells, bytes) = (fed.cells(), fed.bytes());
            let trainer = &mut self.trainer;
            self.train_stats.busy(|| feed.step(trainer, fed)).map_err(Error::stage(Stage::Trainer))?;
            self.train_stats.add(cells, bytes);
            // The run's cells (in data-parallel training, every rank's share of the batch).
            let whole = if cells == 0 { 0 } else { self.trainer.last_batch_cells() };
            self.trained_cells += whole;
            ctx.progress().advance(whole);
            if ctx.stopped() && self.trainer.can_checkpoint() {
                self.halt.store(true, Ordering::Relaxed);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Scores the validation cells and records the score for early stopping; the best weights
    /// so far go to `best/`.
    fn validate(&mut self) -> Result<ValidationScore> {
        let (store, labels, plan, loader, halt) = (&self.store, &self.labels, &self.plan, self.loader, &self.halt);
        let trainer = &mut self.trainer;
        let score = self.train_stats.busy(|| {
            trainer
                .with_published_weights(|model| {
                    validate(model, store, labels, Split::Valid, plan, loader, Arc::clone(halt))
                })
                .map_err(Error::stage(Stage::Trainer))?
        })?;
        if !score.score.is_finite() {
            return Err(Error::InvalidInput(format!(
                "validation after epoch {}: the score is {} (reconstruction loss {}, r2 of means {}): a \
                 validation cell holds a non-finite value or the model diverged; nothing of this epoch was saved",
                self.trainer.state().epoch.saturating_sub(1),
                score.score,
                score.recon_loss,
                score.r2_mean
            )));
        }
        let patience = self.trainer.model().config().training.early_stopping_patience;
        if self.trainer.record_validation(score.score, patience).improved {
            let best = self.options.out.join(BEST_DIR);
            self.trainer
                .with_published_weights(|model| save_model(model, &best))
                .map_err(Error::stage(Stage::Trainer))?
                .map_err(Error::stage(Stage::Trainer))?;
        }
        Ok(score)
    }

    /// The final model: the best validated weights, else the last ones.
    fn publish_model(&mut self) -> Result<()> {
        let best = self.options.out.join(BEST_DIR);
        let final_model = self.options.out.join(MODEL_DIR);
        if self.trainer.state().best_epoch.is_some() && best.exists() {
            publish_dir(&final_model, |tmp| copy_files(&best, tmp)).map_err(Error::stage(Stage::Trainer))
        } else {
            let saved = self.trainer.with_published_weights(|model| save_model(model, &final_model));
            saved.map_err(Error::stage(Stage::Trainer))?.map_err(Error::stage(Stage::Trainer))
        }
    }
}

fn log_epoch(epoch: u32, train: &EpochMetrics, validation: Option<&ValidationScore>) {
    tracing::info!("{}", epoch_summary(epoch, train, validation));
}

/// `epoch 3: recon 465.8, adv 2.13, acc_perts 0.45; val r2_mean 0.21, r2_var -1.14, top-20 DEGs
/// 0.05 (score -0.36)`.
fn epoch_summary(epoch: u32, train: &EpochMetrics, validation: Option<&ValidationScore>) -> String {
    format!(
        "epoch {}: recon {}, adv {}, acc_perts {:.2}{}",
        epoch,
        figures(train.recon_loss),
        figures(train.adv_loss),
        train.acc_perts,
        validation
            .map(|v| {
                let degs = if v.r2_mean_deg.is_finite() {
                    format!(", top-20 DEGs {:.3}", v.r2_mean_deg)
                } else {
                    String::new()
                };
                format!("; val r2_mean {:.3}, r2_var {:.3}{degs} (score {:.3})", v.r2_mean, v.r2_var, v.score)
            })
            .unwrap_or_default()
    )
}

/// A loss with four significant figures (`465.8`, `2.132`, `0.01234`).
fn figures(v: f64) -> String {
    if !v.is_finite() || v == 0.0 {
        return format!("{v}");
    }
    let decimals = (3 - v.abs().log10().floor() as i64).clamp(0, 8) as usize;
    format!("{v:.decimals$}")
}

/// What a run recorded of its labels in its checkpoint (obs keys, control, covariates and batch
/// key, split with its seed) and its configuration: `--resume` trains on with these, so no flag
/// needs repeating.
pub fn recorded_settings(run: &Path) -> Result<(EncoderOptions, CpaConfig)> {
    // Read only: a reader never moves or removes what a writer (another process, perhaps on
    // another node) may be in the middle of; `train --resume` recovers a killed write under the
    // run's lock.
    // A run without a checkpoint (a model imported from cpa-tools is a `model/` alone) records
    // the same settings in its model.
    let checkpoint = crate::model::files::readable_dir(&run.join(CHECKPOINT_DIR))
        .or_else(|| crate::model::files::readable_dir(&run.join(cpa_stream_pipeline::run_dir::MODEL_DIR)))
        .ok_or_else(|| Error::InvalidInput(format!("{}: no checkpoint/ to resume", run.display())))?;
    let file = crate::model::files::read_model_file(&checkpoint).map_err(Error::stage(Stage::Trainer))?;
    let encoder = EncoderOptions::recorded(&file.vocabulary, file.config.model.max_comb_len, &checkpoint)?;
    Ok((encoder, file.config))
}
