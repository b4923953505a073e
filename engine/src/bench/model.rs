//! Model benchmark: training steps per second on preloaded batches of a synthetic atlas, i.e. the
//! model alone, without the loader. The training pipeline's figures are compared against it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::device::{DeviceMemory, memory as device_memory};
use crate::model::config::{CpaConfig, DEFAULT_BATCH_SIZE, Precision};
use crate::model::vocab::{Covariate, Vocabulary, canonical_condition, parse_condition};
use crate::model::{CpaModel, HostBatch};
use crate::train::upload::{self, Ahead, Preloaded};
use crate::trainer::Trainer;
use cpa_stream_stages::output::{OutputKind, claim_output, publish, temporary_sibling};
use cpa_stream_stages::synth::{SynthAtlas, SynthConfig};
use serde::Serialize;
use tch::Device;

use super::ops::{OpCounts, Threads, count_ops};
use super::profile::{Profile, profile};
use crate::Stage;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::obs::column_strings;
use cpa_stream_pipeline::telemetry::StageStats;

pub use cpa_stream_pipeline::model_flags::{
    MODEL_BENCH_CELLS as DEFAULT_MODEL_CELLS, MODEL_BENCH_EPOCHS as DEFAULT_MODEL_EPOCHS,
    MODEL_BENCH_GENES as DEFAULT_MODEL_GENES,
};

/// Options of [`bench_model`].
#[derive(Debug, Clone)]
pub struct ModelBenchOptions {
    /// Cells of the synthetic atlas (held in memory); default [`DEFAULT_MODEL_CELLS`].
    pub cells: u64,
    /// Genes of the synthetic atlas; default [`DEFAULT_MODEL_GENES`].
    pub genes: u32,
    /// Cells per batch; default the model's [`DEFAULT_BATCH_SIZE`].
    pub batch_size: usize,
    /// Timed epochs (after one untimed warm-up epoch).
    pub epochs: u32,
    /// Where the model runs; default the CPU.
    pub device: Device,
    /// Arithmetic of the matrix products; default fp32.
    pub precision: Precision,
    /// libtorch intra-op threads (0: libtorch's default).
    pub threads: usize,
    /// Model configuration; batch size and precision are taken from the fields above.
    pub config: CpaConfig,
    /// Seed of the atlas and the model; default 0.
    pub seed: u64,
    /// Counts the operators of one more epoch's steps after the timed ones ([`ModelBench::ops`]).
    pub count_ops: bool,
    /// Profiles one more epoch's steps after the timed ones ([`ModelBench::profile`]).
    pub profile: bool,
    /// With `profile`: where to save the profile as a Chrome trace (a regular file there is
    /// replaced once the trace is complete; anything else there is refused).
    pub trace: Option<PathBuf>,
}

impl Default for ModelBenchOptions {
    fn default() -> Self {
        ModelBenchOptions {
            cells: DEFAULT_MODEL_CELLS,
            genes: DEFAULT_MODEL_GENES,
            batch_size: DEFAULT_BATCH_SIZE,
            epochs: DEFAULT_MODEL_EPOCHS,
            device: Device::Cpu,
            precision: Precision::Fp32,
            threads: 0,
            config: CpaConfig::default(),
            seed: 0,
            count_ops: false,
            profile: false,
            trace: None,
        }
    }
}

/// What [`bench_model`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct ModelBench {
    /// Cells of the atlas.
    pub cells: u64,
    /// Genes of the atlas.
    pub genes: u32,
    /// Cells per batch.
    pub batch_size: usize,
    /// The device (`cpu`, `cuda(0)`).
    pub device: String,
    /// The precision (`fp32`, `bf16`).
    pub precision: String,
    /// libtorch's intra-op threads.
    pub threads: i32,
    /// Trainable parameters of the model.
    pub parameters: i64,
    /// Timed epochs.
    pub epochs: u32,
    /// Seconds of the timed epochs.
    pub seconds: f64,
    /// Cells trained per second.
    pub cells_per_s: f64,
    /// Milliseconds per batch.
    pub ms_per_batch: f64,
    /// Reconstruction loss of the last epoch.
    pub final_recon_loss: f64,
    /// The CUDA caching allocator's counts at the end, peaks over model and steps (`None` on the CPU).
    pub device_memory: Option<DeviceMemory>,
    /// Operators per training step, counted over an epoch after the timed ones, when asked.
    pub ops: Option<OpCounts>,
    /// Where a step's time went, over an epoch after the timed ones, when asked.
    pub profile: Option<Profile>,
}

/// Generates a synthetic atlas in memory and cuts it into training batches (with its vocabulary).
pub fn synthetic_batches(cells: u64, genes: u32, batch_size: usize, seed: u64) -> Result<(Vocabulary, Vec<HostBatch>)> {
    let stage = Error::stage(Stage::Synth);
    let atlas = SynthAtlas::new(SynthConfig::new(cells, genes, 10, 4, 3, 5, seed)).map_err(stage)?;
    let mut chunks = Vec::new();
    let mut counts: HashMap<String, u64> = HashMap::new();
    for k in 0..atlas.n_chunks() {
        let chunk = atlas.generate_chunk(k).map_err(stage)?;
        let conditions = column_strings(&chunk.obs, "condition", "synth obs")?;
        for i in 0..chunk.obs.num_rows() {
            *counts.entry(canonical_condition(conditions.get(i).unwrap_or_default())).or_default() += 1;
        }
        chunks.push(chunk);
    }
    let mut conditions: Vec<(String, u64)> = counts.into_iter().collect();
    conditions.sort();
    let covariates =
        vec![Covariate { name: "cell_type".into(), categories: atlas.cell_types.clone(), is_batch: false }];
    let gene_names = (0..genes).map(|g| format!("gene{g}")).collect();
    let vocab =
        Vocabulary::new(gene_names, "control", atlas.perturbations.clone(), covariates, conditions).map_err(stage)?;
    let (perts, classes) = (vocab.perturbation_index(), vocab.condition_index());
    let mut batches = Vec::new();
    let mut batch = HostBatch::new(genes, 1);
    for chunk in &chunks {
        let text = |name: &str| column_strings(&chunk.obs, name, "synth obs");
        let (conds, doses, types) = (text("condition")?, text("dose")?, text("cell_type")?);
        for i in 0..chunk.rows.n_rows() {
            let (cond, dose, ct_name) =
                (conds.get(i).unwrap_or_default(), doses.get(i), types.get(i).unwrap_or_default());
            let parsed = parse_condition(cond, dose, 2, &perts, &classes).map_err(Error::InvalidInput)?;
            let ct = atlas.cell_types.iter().position(|t| t == ct_name).unwrap_or(0) as u32;
            let (idx, val) = chunk.rows.row(i);
            batch.counts.push_row(idx, val);
            batch.push_labels(&parsed.parts, &[ct], parsed.class);
            if batch.n_cells() == batch_size {
                batches.push(std::mem::replace(&mut batch, HostBatch::new(genes, 1)));
            }
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    Ok((vocab, batches))
}

/// Times training epochs over preloaded batches.
pub fn bench_model(options: &ModelBenchOptions) -> Result<ModelBench> {
    crate::device::check(options.device).map_err(Error::stage(Stage::Trainer))?;
    if options.threads > 0 {
        tch::set_num_threads(options.threads as i32);
    }
    let stage = Error::stage(Stage::Trainer);
    // The trace's destination is claimed before the work (another process writing it, or a
    // directory, link or device there, is refused) and the trace published whole after it.
    let trace = options
        .trace
        .as_deref()
        .map(|dest| Ok((dest, claim_output(dest, OutputKind::File, true)?, temporary_sibling(dest)?)))
        .transpose()
        .map_err(stage)?;
    let (vocab, batches) = synthetic_batches(options.cells, options.genes, options.batch_size, options.seed)?;
    let batches = Arc::new(batches);
    let mut config = options.config.clone();
    config.training.batch_size = options.batch_size;
    config.training.precision = options.precision;
    device_memory::reset_peak(options.device);
    let model = CpaModel::new(&config, &vocab, None, options.device, config.training.seed).map_err(stage)?;
    let parameters = model.n_parameters();
    let mut trainer = Trainer::new(model).map_err(stage)?;
    // As `train` feeds its trainer: on CUDA, uploaded a batch ahead.
    let stats = StageStats::new(Stage::Uploader, 1);
    let run_epoch = |trainer: &mut Trainer| -> Result<f64> {
        if options.device.is_cuda() {
            let mut ahead = Ahead::start(Preloaded::new(&batches), options.device, &stats)?;
            while let Some(fed) = ahead.next(&stats) {
                upload::step(trainer, fed?).map_err(stage)?;
            }
        } else {
            for b in batches.iter() {
                trainer.step(b).map_err(stage)?;
            }
        }
        Ok(trainer.end_epoch().map_err(stage)?.recon_loss)
    };
    run_epoch(&mut trainer)?;
    let start = Instant::now();
    let mut recon = f64::NAN;
    for _ in 0..options.epochs {
        recon = run_epoch(&mut trainer)?;
    }
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    let cells = options.cells * u64::from(options.epochs);
    let device_memory = device_memory::stats(options.device);
    let ops = if options.count_ops {
        // The steps of one epoch; the epoch's end (one read of its metrics) is not a step's.
        let ((), tallies) =
            count_ops(Threads::All, || batches.iter().try_for_each(|b| trainer.step(b))).map_err(stage)?;
        trainer.end_epoch().map_err(stage)?;
        Some(OpCounts::per(batches.len() as u64, tallies))
    } else {
        None
    };
    let profile = if options.profile || trace.is_some() {
        let cuda = options.device.is_cuda();
        // After the count, so that the count is of the same epoch with or without a profile (a
        // schedule can change the step from one epoch to the next). The steps' wall, without the
        // profiler's start and its processing of the events.
        let staging = trace.as_ref().map(|(_, _, tmp)| tmp.as_path());
        let profiled = profile(cuda, staging, || {
            let start = Instant::now();
            batches.iter().try_for_each(|b| trainer.step(b))?;
            // The device's work of the steps, inside the profile and the wall.
            if let Device::Cuda(index) = options.device {
                tch::Cuda::synchronize(index as i64);
            }
            Ok(start.elapsed().as_secs_f64())
        })
        .map_err(stage);
        if let Some((dest, _lock, tmp)) = &trace {
            match &profiled {
                Ok(_) => publish(tmp, dest, OutputKind::File, true).map_err(stage)?,
                Err(_) => {
                    let _ = std::fs::remove_file(tmp);
                }
            }
        }
        let (wall, events) = profiled?;
        trainer.end_epoch().map_err(stage)?;
        Some(Profile::summarise(&events, batches.len() as u64, wall))
    } else {
        None
    };
    Ok(ModelBench {
        cells: options.cells,
        genes: options.genes,
        batch_size: options.batch_size,
        device: format!("{:?}", options.device).to_lowercase(),
        precision: format!("{:?}", options.precision).to_lowercase(),
        threads: tch::get_num_threads(),
        parameters,
        epochs: options.epochs,
        seconds,
        cells_per_s: cells as f64 / seconds,
        ms_per_batch: seconds * 1e3 / (batches.len() as f64 * f64::from(options.epochs)),
        final_recon_loss: recon,
        device_memory,
        ops,
        profile,
    })
}
