//! `cpa-stream train`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::Args;
use cpa_stream_pipeline::batcher::{
    DEFAULT_BLOCK_CELLS, DEFAULT_BUFFER_BYTES, DEFAULT_PREFETCH, DEFAULT_SHUFFLE_BLOCKS, LoaderOptions, PlanOptions,
};
use cpa_stream_pipeline::encoder::{DEFAULT_TEST_FRACTION, DEFAULT_VALIDATION_FRACTION, EncoderOptions, SplitSpec};
use cpa_stream_pipeline::train::{TrainOptions, recorded_settings, run_train};
use cpa_stream_stages::model::config::CpaConfig;

use super::progress::CliProgress;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Store directory (see `cpa-stream import` / `synth`).
    #[arg(long)]
    store: PathBuf,
    #[command(flatten)]
    labels: super::LabelArgs,
    /// A batch covariate (left out of the corrected latents).
    #[arg(long)]
    batch_key: Option<String>,
    /// obs column with train / valid / test / ood per cell.
    #[arg(long, conflicts_with_all = ["holdout", "validation_fraction", "test_fraction"])]
    split_key: Option<String>,
    /// Conditions held out entirely (comma-separated, as written in obs).
    #[arg(long, value_delimiter = ',')]
    holdout: Vec<String>,
    /// Fraction of each condition's cells used for validation (without --split-key) [default: 0.1].
    #[arg(long)]
    validation_fraction: Option<f64>,
    /// Fraction of each condition's cells kept for testing (without --split-key) [default: 0.1].
    #[arg(long)]
    test_fraction: Option<f64>,
    /// Model configuration (TOML; see examples/cpa.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory (checkpoint/, best/, model/, metrics.parquet).
    #[arg(long)]
    out: PathBuf,
    /// Epochs [default: the configuration's, or the reference's rule].
    #[arg(long)]
    epochs: Option<u32>,
    /// Cells per batch, or `auto` (on CUDA the largest power of two that fits, halved for margin;
    /// on the CPU the configuration's) [default: the configuration's].
    #[arg(long)]
    batch_size: Option<String>,
    /// Consecutive store cells the shuffle keeps together (block sampling: faster reads, less
    /// mixed batches on a store sorted by condition), or `auto`: runs of 8 on a store in random
    /// order of its labels, single cells otherwise [default: the configuration's, auto].
    #[arg(long, value_parser = super::parse_run_cells)]
    shuffle_run_cells: Option<usize>,
    /// Continue from RUN/checkpoint, with the obs keys, control, covariates, split and
    /// configuration the run recorded (flags given must agree).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Replace an existing run at --out (a directory holding other files is refused).
    #[arg(long)]
    overwrite: bool,
    /// Train the count likelihoods (nb, zinb) on values that are not whole numbers (a warning
    /// instead of the error).
    #[arg(long)]
    allow_non_counts: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed [default: the configuration's].
    #[arg(long)]
    seed: Option<u64>,
    /// Batcher worker threads [default: planned with --threads from the usable CPUs].
    #[arg(long, value_parser = super::parse_workers)]
    workers: Option<usize>,
    /// Batches buffered ahead of the trainer, per worker.
    #[arg(long, value_parser = super::parse_prefetch, default_value_t = DEFAULT_PREFETCH)]
    prefetch: usize,
    /// Blocks of 256 cells whose cells are shuffled together (the shuffle window): each batch
    /// draws from this many random blocks. A compressed store decodes each block once per epoch.
    #[arg(long, value_parser = super::parse_shuffle_blocks, default_value_t = DEFAULT_SHUFFLE_BLOCKS)]
    shuffle_blocks: usize,
    /// Most MiB of decoded blocks a compressed store's shuffle buffer holds; the window is
    /// narrowed to fit half of it.
    #[arg(long, value_parser = super::parse_buffer_mb, default_value_t = DEFAULT_BUFFER_BYTES >> 20)]
    shuffle_buffer_mb: u64,
    /// libtorch threads [default: on the CPU, the usable CPUs not busy with other processes].
    #[arg(long, value_parser = super::parse_threads)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The settings a resumed run recorded, after checking that every flag given agrees.
fn resumed(args: &TrainArgs) -> anyhow::Result<(EncoderOptions, CpaConfig)> {
    let (encoder, recorded) = recorded_settings(&args.out)?;
    let mut differ = args.labels.differences(&encoder);
    let mut check = |flag: &'static str, given: Option<String>, had: String| {
        if let Some(g) = given.filter(|g| *g != had) {
            differ.push((flag, g, had));
        }
    };
    check("--batch-key", args.batch_key.clone(), encoder.batch_key.clone().unwrap_or_else(|| "(none)".into()));
    check("--seed", args.seed.map(|s| s.to_string()), recorded.training.seed.to_string());
    match &encoder.split {
        SplitSpec::Column(c) => check("--split-key", args.split_key.clone(), c.clone()),
        SplitSpec::Fraction { validation, test, holdout, .. } => {
            check("--split-key", args.split_key.clone(), "(none)".into());
            check("--validation-fraction", args.validation_fraction.map(|v| v.to_string()), validation.to_string());
            check("--test-fraction", args.test_fraction.map(|v| v.to_string()), test.to_string());
            let given = (!args.holdout.is_empty()).then(|| args.holdout.join(","));
            check("--holdout", given, holdout.join(","));
        }
    }
    if let Some(path) = &args.config {
        let mut given = CpaConfig::from_file(path)?;
        // What a resume may change: the epochs, the batch and run lengths, the seed.
        given.training.max_epochs = recorded.training.max_epochs;
        given.training.batch_size = recorded.training.batch_size;
        given.training.shuffle_run_cells = recorded.training.shuffle_run_cells;
        given.training.seed = recorded.training.seed;
        if given.to_toml()? != recorded.to_toml()? {
            differ.push(("--config", path.display().to_string(), "the configuration in checkpoint/model.json".into()));
        }
    }
    if let Some((flag, given, had)) = differ.first() {
        anyhow::bail!(
            "{}: {flag} {given} differs from the run's recorded {had:?}; a resumed run keeps its settings \
             (leave the flag out, or start a new run with --overwrite)",
            args.out.display()
        );
    }
    Ok((encoder, recorded))
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let recorded = if args.resume { Some(resumed(&args)?) } else { None };
    let mut config = match (&recorded, &args.config) {
        (Some((_, c)), _) => c.clone(),
        (None, Some(path)) => CpaConfig::from_file(path)?,
        (None, None) => CpaConfig::default(),
    };
    if let Some(e) = args.epochs {
        config.training.max_epochs = e;
    }
    let auto_batch_size = args.batch_size.as_deref() == Some("auto");
    if let Some(b) = args.batch_size.as_deref().filter(|b| *b != "auto") {
        config.training.batch_size =
            b.parse().map_err(|_| anyhow::anyhow!("--batch-size {b:?}: expected a number of cells or auto"))?;
    }
    if let Some(s) = args.seed {
        config.training.seed = s;
    }
    if let Some(k) = args.shuffle_run_cells {
        config.training.shuffle_run_cells = k;
    }
    config.validate().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    let (device, workers) = super::model_device(&args.device, args.threads, args.workers)?;
    let split = match args.split_key {
        Some(k) => SplitSpec::Column(k),
        None => SplitSpec::fractions(
            args.validation_fraction.unwrap_or(DEFAULT_VALIDATION_FRACTION),
            args.test_fraction.unwrap_or(DEFAULT_TEST_FRACTION),
            config.training.seed,
            args.holdout,
        ),
    };
    let options = TrainOptions {
        store: args.store.clone(),
        out: args.out.clone(),
        encoder: match recorded {
            Some((encoder, _)) => encoder,
            None => args.labels.encoder(args.batch_key, split, config.model.max_comb_len),
        },
        config,
        device,
        resume: args.resume,
        overwrite: args.overwrite,
        allow_non_counts: args.allow_non_counts,
        epochs: args.epochs,
        auto_batch_size,
        loader: LoaderOptions { workers, prefetch: args.prefetch, buffer_bytes: args.shuffle_buffer_mb << 20 },
        plan: PlanOptions {
            block_cells: DEFAULT_BLOCK_CELLS,
            shuffle_blocks: args.shuffle_blocks,
            ..PlanOptions::default()
        },
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
        tracing::warn!("interrupted: stopping after this step with a checkpoint (Ctrl-C again to quit at once)");
    })
    .context("installing the Ctrl-C handler")?;
    let progress = CliProgress::new();
    let report =
        run_train(&options, &progress, stop).with_context(|| format!("training on {}", args.store.display()))?;
    let code = if report.interrupted { ExitCode::from(130) } else { ExitCode::SUCCESS };
    if args.json {
        jsonln!(&report);
        return Ok(code);
    }
    outln!(
        "{}: {} training cells, {} validation cells, {} epochs recorded{}{}",
        args.out.display(),
        report.train_cells,
        report.valid_cells,
        report.epochs.len(),
        if report.stopped_early { ", stopped early" } else { "" },
        if report.interrupted { ", interrupted (resume with --resume)" } else { "" }
    );
    if let Some(last) = report.epochs.last() {
        outln!(
            "last epoch {}: recon {:.3}, adversary {:.3}, acc_perts {:.3}",
            last.train.epoch,
            last.train.recon_loss,
            last.train.adv_loss,
            last.train.acc_perts
        );
    }
    if let Some(best) = report.best_epoch {
        let scored = report.epochs.iter().find(|e| e.train.epoch == best).and_then(|e| e.validation);
        match scored {
            Some(v) => outln!(
                "best epoch {best}: validation r2_mean {:.3}, r2_var {:.3} (score r2_mean + 0.5 r2_var = {:.3}); \
                 model/ holds its weights",
                v.r2_mean,
                v.r2_var,
                v.score
            ),
            None => outln!("best validation epoch: {best} (model/ holds its weights)"),
        }
    }
    outln!("training {:.0} cells/s", report.cells_per_s);
    super::print_report(&report.report)?;
    if let Some(memory) = report.device_memory {
        outln!("{memory}");
    }
    Ok(code)
}
