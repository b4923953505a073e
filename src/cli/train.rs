//! `cpa-stream train`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Args;
use cpa_stream_engine::train::request::{ConfigSource, TrainRequest};
use cpa_stream_engine::train::{self, TrainOptions};
use cpa_stream_pipeline::RunContext;
use cpa_stream_pipeline::batcher::{DEFAULT_BUFFER_BYTES, DEFAULT_PREFETCH, DEFAULT_SHUFFLE_BLOCKS};
use cpa_stream_pipeline::request::{Compute, Naming};

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
    /// Drugs as SMILES: a table (CSV, TSV or Parquet: a perturbation name column and a SMILES
    /// column) whose molecules' features the model projects, as with --perturbation-features, so
    /// that drugs without cells are predicted from their molecules. The features (RDKit's Morgan
    /// fingerprints, or its 2-D descriptors: --smiles-features) are computed by the Python
    /// package's `cpa_stream.chem` (pip install 'cpa-stream[chem]'), run with $CPA_STREAM_PYTHON,
    /// else python3.
    #[arg(long, value_name = "TABLE", conflicts_with = "perturbation_features")]
    perturbation_smiles: Option<PathBuf>,
    /// The molecule features of --perturbation-smiles: `morgan` (2,048 bits, radius 2, as
    /// cpa-tools' use_rdkit_embeddings) or `descriptors` (RDKit's 2-D descriptors, standardised).
    #[arg(long, value_parser = ["morgan", "descriptors"], default_value = "morgan", requires = "perturbation_smiles")]
    smiles_features: String,
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

/// The features of `--perturbation-smiles`, computed into a file next to the run (removed when
/// dropped: the run keeps its own copy of the features).
struct SmilesFeatures(PathBuf);

impl Drop for SmilesFeatures {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Computes the molecule features of a SMILES table with the Python package (`python -m
/// cpa_stream.chem`), into a temporary Parquet file beside `out`.
fn smiles_features(table: &std::path::Path, kind: &str, out: &std::path::Path) -> anyhow::Result<SmilesFeatures> {
    let python = std::env::var_os("CPA_STREAM_PYTHON").unwrap_or_else(|| "python3".into());
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent)?;
    let path = parent.join(format!(".{name}.smiles-{}.parquet", std::process::id()));
    let features = SmilesFeatures(path);
    let done = std::process::Command::new(&python)
        .args(["-m", "cpa_stream.chem"])
        .arg(table)
        .arg("-o")
        .arg(&features.0)
        .args(["--kind", kind, "--overwrite"])
        .stdout(std::process::Stdio::null())
        .output();
    let shown = std::path::Path::new(&python).display().to_string();
    let advice = "the molecule features of --perturbation-smiles come from the Python package with RDKit                   (pip install 'cpa-stream[chem]'; CPA_STREAM_PYTHON names its interpreter), or compute them with                   `python -m cpa_stream.chem TABLE -o features.parquet` and pass --perturbation-features";
    match done {
        Ok(done) if done.status.success() => Ok(features),
        Ok(done) => {
            let said = String::from_utf8_lossy(&done.stderr);
            let said = said.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            anyhow::bail!(
                "--perturbation-smiles {}: {shown} -m cpa_stream.chem failed: {said}; {advice}",
                table.display()
            )
        }
        Err(e) => anyhow::bail!("--perturbation-smiles {}: cannot run {shown}: {e}; {advice}", table.display()),
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    let what = || format!("training on {}", args.store.display());
    let mut request = args.request();
    let _features = match &args.perturbation_smiles {
        Some(table) if !super::printing_request() => {
            let features = smiles_features(table, &args.smiles_features, &args.out)?;
            request.perturbation_features = Some(features.0.clone());
            Some(features)
        }
        _ => None,
    };
    let run = |options: &TrainOptions, ctx: &RunContext| {
        // Signals stop the run from the start of the training, not while the request is read.
        if let Err(e) = super::signals::stop_on_signals(Arc::clone(&stop)) {
            return Err(cpa_stream_pipeline::Error::InvalidInput(e.to_string()));
        }
        train::run(options, &ctx.with_stop(&stop))
    };
    // `--json` is printed below: the exit code depends on the report either way.
    let Some(report) = super::run_request(&request, TrainRequest::options, run, false, what)? else {
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
