//! `cpa-stream train`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Args;
use cpa_stream_pipeline::RunContext;
use cpa_stream_pipeline::batcher::{DEFAULT_BUFFER_BYTES, DEFAULT_PREFETCH, DEFAULT_SHUFFLE_BLOCKS};
use cpa_stream_pipeline::request::{Compute, Naming};
use cpa_stream_pipeline::train::request::{ConfigSource, TrainRequest};
use cpa_stream_pipeline::train::{self, TrainOptions};

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
    /// Fixed perturbation features: a Parquet or CSV table with one row per perturbation (a name
    /// column named like the perturbation key, `perturbation`, `name` or `drug`, else the first;
    /// every other column a number, e.g. RDKit descriptors or fingerprint bits). The model
    /// projects them instead of learning a free embedding per perturbation; perturbations of the
    /// table without cells can then be predicted.
    #[arg(long)]
    perturbation_features: Option<PathBuf>,
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
    /// Model configuration (TOML; see examples/cpa.toml); with --preset, changes only the keys it
    /// sets.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Starting point of the configuration: `default`, or `reference` for cpa-tools 0.8.8's
    /// behaviour where the defaults differ from it (its learning-rate schedule; docs/fidelity.md).
    #[arg(long, value_parser = ["default", "reference"])]
    preset: Option<String>,
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
    #[arg(long, value_parser = super::parse_prefetch, help = format!(
        "Batches buffered ahead of the trainer, per worker [default: {DEFAULT_PREFETCH}]"
    ))]
    prefetch: Option<usize>,
    #[arg(long, value_parser = super::parse_shuffle_blocks, help = format!(
        "Blocks of 256 cells whose cells are shuffled together (the shuffle window): each batch draws from this \
         many random blocks. A compressed store decodes each block once per epoch [default: {DEFAULT_SHUFFLE_BLOCKS}]"
    ))]
    shuffle_blocks: Option<usize>,
    #[arg(long, value_parser = super::parse_buffer_mb, help = format!(
        "Most MiB of decoded blocks a compressed store's shuffle buffer holds; the window is narrowed to fit half \
         of it [default: {}]", DEFAULT_BUFFER_BYTES >> 20
    ))]
    shuffle_buffer_mb: Option<u64>,
    /// libtorch threads [default: on the CPU, the usable CPUs not busy with other processes].
    #[arg(long, value_parser = super::parse_threads)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

impl TrainArgs {
    /// The request these flags make.
    fn request(&self) -> TrainRequest {
        TrainRequest {
            store: self.store.clone(),
            out: self.out.clone(),
            perturbation_key: self.labels.perturbation_key.clone(),
            dose_key: self.labels.dose_key.clone(),
            control: self.labels.control.clone(),
            covariates: self.labels.covariates.clone(),
            batch_key: self.batch_key.clone(),
            split_key: self.split_key.clone(),
            holdout: self.holdout.clone(),
            validation_fraction: self.validation_fraction,
            test_fraction: self.test_fraction,
            preset: self.preset.clone(),
            config: self.config.clone().map_or(ConfigSource::Default, ConfigSource::File),
            epochs: self.epochs,
            batch_size: self.batch_size.clone(),
            shuffle_run_cells: self.shuffle_run_cells,
            seed: self.seed,
            resume: self.resume,
            overwrite: self.overwrite,
            allow_non_counts: self.allow_non_counts,
            prefetch: self.prefetch,
            shuffle_blocks: self.shuffle_blocks,
            shuffle_buffer_bytes: self.shuffle_buffer_mb.map(|mb| mb << 20),
            perturbation_features: self.perturbation_features.clone(),
            compute: Compute { device: self.device.clone(), threads: self.threads, workers: self.workers },
            naming: Naming::Flags,
        }
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    let what = || format!("training on {}", args.store.display());
    let run = |options: &TrainOptions, ctx: &RunContext| {
        // Signals stop the run from the start of the training, not while the request is read.
        if let Err(e) = super::signals::stop_on_signals(Arc::clone(&stop)) {
            return Err(cpa_stream_pipeline::Error::InvalidInput(e.to_string()));
        }
        train::run(options, &ctx.with_stop(&stop))
    };
    // `--json` is printed below: the exit code depends on the report either way.
    let Some(report) = super::run_request(&args.request(), TrainRequest::options, run, false, what)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let code = match report.interrupted {
        true => ExitCode::from(super::signals::interrupted_exit_code()),
        false => ExitCode::SUCCESS,
    };
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
        if report.interrupted {
            format!(", stopped by {} (resume with --resume)", super::signals::received_name())
        } else {
            String::new()
        }
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
