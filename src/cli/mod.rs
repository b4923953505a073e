//! Subcommands of the `cpa-stream` binary.

/// `println!` that returns an error instead of panicking when stdout is closed (`| head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// `print!` that returns an error instead of panicking when stdout is closed.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}

mod bench;
mod evaluate;
mod h5ad;
mod info;
mod predict;
mod progress;
mod store;
mod synth;
mod train;

use std::process::ExitCode;

use cpa_stream_pipeline::encoder::{DEFAULT_CONTROL, DEFAULT_PERTURBATION_KEY, EncoderOptions, SplitSpec};

/// The obs columns that label the cells for the model: `train`, `bench loader`, `bench train`.
#[derive(Debug, clap::Args)]
pub struct LabelArgs {
    /// obs column of the perturbation condition (`drugA+drugB`) [default: condition].
    #[arg(long)]
    perturbation_key: Option<String>,
    /// obs column of the doses (`0.1+1`); without it every part has dose 1.
    #[arg(long)]
    dose_key: Option<String>,
    /// Name of the control condition [default: control].
    #[arg(long)]
    control: Option<String>,
    /// Categorical covariates (comma-separated obs columns).
    #[arg(long, value_delimiter = ',')]
    covariates: Vec<String>,
}

impl LabelArgs {
    /// The encoder's options for these columns.
    fn encoder(self, batch_key: Option<String>, split: SplitSpec, max_comb_len: usize) -> EncoderOptions {
        EncoderOptions {
            perturbation_key: self.perturbation_key.unwrap_or_else(|| DEFAULT_PERTURBATION_KEY.to_owned()),
            dose_key: self.dose_key,
            control: self.control.unwrap_or_else(|| DEFAULT_CONTROL.to_owned()),
            covariate_keys: self.covariates,
            batch_key,
            split,
            max_comb_len,
        }
    }

    /// Each flag given that differs from what a resumed run recorded, as `(flag, given, recorded)`.
    fn differences(&self, recorded: &EncoderOptions) -> Vec<(&'static str, String, String)> {
        let mut out = Vec::new();
        let mut check = |flag, given: Option<String>, had: String| {
            if let Some(g) = given.filter(|g| *g != had) {
                out.push((flag, g, had));
            }
        };
        check("--perturbation-key", self.perturbation_key.clone(), recorded.perturbation_key.clone());
        check("--dose-key", self.dose_key.clone(), recorded.dose_key.clone().unwrap_or_else(|| "(none)".into()));
        check("--control", self.control.clone(), recorded.control.clone());
        let covariates = (!self.covariates.is_empty()).then(|| self.covariates.join(","));
        check("--covariates", covariates, recorded.covariate_keys.join(","));
        out
    }

    /// Every cell in training, none held out (the benchmarks).
    fn all_training(self, max_comb_len: usize) -> EncoderOptions {
        self.encoder(None, SplitSpec::all_training(), max_comb_len)
    }
}

use clap::{Parser, Subcommand};

/// Train and run the Compositional Perturbation Autoencoder on atlases larger than memory.
#[derive(Debug, Parser)]
#[command(name = "cpa-stream", version, about, propagate_version = true)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print libtorch, CUDA and build information.
    Info(info::InfoArgs),
    /// Generate a CPA-shaped synthetic atlas with ground truth.
    Synth(synth::SynthArgs),
    /// Show a store's shape, sizes and obs columns.
    Inspect(store::InspectArgs),
    /// Check a store's checksums and structure; exit 1 naming the first problem.
    Verify(store::VerifyArgs),
    /// Copy a store with another codec (raw or zstd).
    Convert(store::ConvertArgs),
    /// Convert an AnnData .h5ad file into a store, in bounded memory.
    Import(h5ad::ImportArgs),
    /// Write a store as an AnnData .h5ad file.
    Export(h5ad::ExportArgs),
    /// Train CPA on a store through the streaming pipeline.
    Train(train::TrainArgs),
    /// Counterfactual predictions of a trained model into a Parquet file.
    Predict(predict::PredictArgs),
    /// R2 of counterfactual means and variances per condition (paper metrics), with plots.
    Evaluate(evaluate::EvaluateArgs),
    /// Measure throughput.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Runs a parsed command line.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Info(a) => info::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Inspect(a) => store::inspect(a),
        Command::Verify(a) => store::verify(a),
        Command::Convert(a) => store::convert(a),
        Command::Import(a) => h5ad::import(a),
        Command::Export(a) => h5ad::export(a),
        Command::Train(a) => train::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Evaluate(a) => evaluate::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// `--shuffle-run-cells`: `auto` (0, chosen from the store's order) or a run length of at least 1.
fn parse_run_cells(value: &str) -> Result<usize, String> {
    if value == "auto" {
        return Ok(0);
    }
    match value.parse::<usize>() {
        Ok(k) if k >= 1 => Ok(k),
        _ => Err(format!("{value:?}: expected `auto` or a whole number of cells, at least 1")),
    }
}

/// Most libtorch and worker threads a flag takes.
const MAX_THREADS: usize = 1024;
/// Most gather workers.
const MAX_WORKERS: usize = 256;
/// Most batches in flight between two stages.
const MAX_PREFETCH: usize = 1024;
/// Most cells in one batch.
const MAX_BATCH_SIZE: usize = 1 << 20;

/// A whole number in `min..=max` for flag values that size threads, queues and buffers: a typo
/// (`--threads 0`, `--prefetch 1e9`) is an error before any work, not a panic or an allocation
/// failure.
fn bounded(value: &str, min: usize, max: usize, what: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{value:?}: expected {what}, a whole number from {min} to {max}")),
    }
}

fn parse_threads(value: &str) -> Result<usize, String> {
    bounded(value, 1, MAX_THREADS, "threads")
}

fn parse_workers(value: &str) -> Result<usize, String> {
    bounded(value, 1, MAX_WORKERS, "gather workers")
}

fn parse_prefetch(value: &str) -> Result<usize, String> {
    bounded(value, 1, MAX_PREFETCH, "batches in flight")
}

fn parse_batch_size(value: &str) -> Result<usize, String> {
    bounded(value, 1, MAX_BATCH_SIZE, "cells per batch")
}

/// The device named on the command line, checked to exist, with libtorch's thread count set when
/// given (train, predict and evaluate).
fn model_device(name: &str, threads: Option<usize>) -> anyhow::Result<tch::Device> {
    let device = cpa_stream_stages::device::parse(name)?;
    cpa_stream_stages::device::check(device)?;
    if let Some(t) = threads {
        let t = i32::try_from(t).map_err(|_| anyhow::anyhow!("--threads {t}: too many"))?;
        tch::set_num_threads(t);
    }
    Ok(device)
}

/// Logs go to stderr; `CPA_STREAM_LOG` (or `RUST_LOG`) sets the filter, default `info`. Colours
/// only on a terminal (and not with `NO_COLOR` set), so that logs written to files stay plain.
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("CPA_STREAM_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .with_target(false)
        .with_ansi(colour)
        .try_init();
}

/// stderr for log lines, quiet when stderr is closed (`... 2>&1 | head -1`): tracing reports a
/// failed write with `eprintln!`, which panics on the same closed stream.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::io::stderr().write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(buf.len()),
            other => other,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match std::io::stderr().flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    }
}
