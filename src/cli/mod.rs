//! The command line of both binaries: `cpa-stream`, the front, runs the commands that need no
//! model and hands the others (`crate::model_commands`) to `cpa-stream-engine`, which runs every
//! command with libtorch loaded. Both parse the same command line (this module), so help, usage
//! errors and `--version` are the same, and immediate, from the front.

/// `println!` of a result line: nothing with `--quiet`, and an error instead of a panic when
/// stdout is closed (`| head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if !$crate::cli::quiet() {
            writeln!(std::io::stdout().lock(), $($arg)*)?
        }
    }};
}

/// `print!` of results, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if !$crate::cli::quiet() {
            write!(std::io::stdout().lock(), $($arg)*)?
        }
    }};
}

/// `--json` output: printed even with `--quiet` (it is what the caller asked for).
macro_rules! jsonln {
    ($value:expr) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), "{}", serde_json::to_string_pretty($value)?)?
    }};
}

pub(crate) mod bench;
pub(crate) mod evaluate;
mod h5ad;
mod import_model;
pub(crate) mod info;
pub(crate) mod predict;
mod progress;
mod score;
pub mod start;
mod store;
mod synth;
pub(crate) mod train;

use std::process::ExitCode;

use cpa_stream_pipeline::encoder::{DEFAULT_CONTROL, DEFAULT_PERTURBATION_KEY, EncoderOptions, SplitSpec};

/// Where a model command computes, declared once for every command that runs the model on a
/// device: `evaluate`, `dose-response` (and, with the batcher's workers, [`ComputeArgs`]). The
/// benchmarks declare their own (their defaults differ: libtorch's choice, or predict's).
#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// libtorch threads [default: on the CPU, the usable CPUs not busy with other processes].
    #[arg(long, value_parser = parse_threads)]
    pub(crate) threads: Option<usize>,
}

/// [`DeviceArgs`] and the batcher's worker threads: `train`, `predict`.
#[derive(Debug, clap::Args)]
pub struct ComputeArgs {
    #[command(flatten)]
    pub(crate) device: DeviceArgs,
    /// Batcher worker threads (reading and gathering cells) [default: planned with --threads
    /// from the usable CPUs].
    #[arg(long, value_parser = parse_workers)]
    pub(crate) workers: Option<usize>,
}

/// The obs columns that label the cells for the model: `train`, `bench loader`, `bench train`.
#[derive(Debug, clap::Args)]
pub struct LabelArgs {
    /// obs column of the perturbation condition (`drugA+drugB`) [default: condition].
    #[arg(long)]
    pub(crate) perturbation_key: Option<String>,
    /// obs column of the doses (`0.1+1`); without it every part has dose 1.
    #[arg(long)]
    pub(crate) dose_key: Option<String>,
    /// Name of the control condition [default: control].
    #[arg(long)]
    pub(crate) control: Option<String>,
    /// Categorical covariates (comma-separated obs columns).
    #[arg(long, value_delimiter = ',')]
    pub(crate) covariates: Vec<String>,
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

    /// Every cell in training, none held out (the benchmarks).
    pub(crate) fn all_training(self, max_comb_len: usize) -> EncoderOptions {
        self.encoder(None, SplitSpec::all_training(), max_comb_len)
    }
}

use clap::{Parser, Subcommand};

/// `--version`: the crate version, the git revision built and the libtorch linked.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("CPA_STREAM_GIT_REVISION"),
    ")\nlibtorch ",
    env!("CPA_STREAM_LIBTORCH_BUILD_VERSION"),
    " (tch ",
    env!("CPA_STREAM_TCH_VERSION"),
    ")"
);

/// The version stamped on output files: the crate version and the git revision built.
pub const VERSION_LINE: &str = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("CPA_STREAM_GIT_REVISION"), ")");

/// Exit codes, the same for every command (also in `--help` and docs/cli.md).
const EXIT_CODES: &str = "Exit codes: 0 success, 1 error (the message names the file, row or column), 2 usage error, \
130 interrupted (Ctrl-C); `train` stops at the next step with a checkpoint for --resume on Ctrl-C, SIGTERM \
(exit 143) or SIGHUP (129), and quits at once on a second. CPA_STREAM_LOG sets the log filter \
(default info; e.g. warn, debug, cpa_stream=debug); a filter that does not parse is an error.";

/// Train and run the Compositional Perturbation Autoencoder on atlases larger than memory.
#[derive(Debug, Parser)]
#[command(name = "cpa-stream", version, long_version = LONG_VERSION, about, propagate_version = true)]
#[command(after_help = EXIT_CODES)]
pub struct Args {
    /// Also print each stage's report (rows, MB, busy and blocked seconds, memory) and detailed
    /// logs.
    #[arg(long, short, global = true, conflicts_with = "quiet")]
    pub verbose: bool,
    /// Print errors only (and `--json` output when asked for).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Print the command's request as JSON and exit without running it: the settings as given,
    /// in the form the library (`cpa_stream::*Request`) and the Python package take, defaults
    /// left to the command (commands that write files or train).
    #[arg(long, global = true)]
    pub print_request: bool,
    #[command(subcommand)]
    command: Command,
}

/// How much a command prints: 0 quiet, 1 results (default), 2 verbose.
static OUTPUT_LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    OUTPUT_LEVEL.load(std::sync::atomic::Ordering::Relaxed) == 0
}

/// Whether `--verbose` was given.
pub fn verbose() -> bool {
    OUTPUT_LEVEL.load(std::sync::atomic::Ordering::Relaxed) == 2
}

/// Whether `--print-request` was given.
static PRINT_REQUEST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this command line only prints its request (`--print-request`).
#[allow(dead_code, reason = "read by the engine's train; the front hands train over")]
pub(crate) fn printing_request() -> bool {
    PRINT_REQUEST.load(std::sync::atomic::Ordering::Relaxed)
}

/// A command as every command runs: with `--print-request`, `request` printed as JSON and
/// nothing run; else the request resolved into options (`options`) and run (`run`) with
/// progress shown, errors with the context `what` says. With `json` the report is printed as
/// JSON. `Some(report)` when there is text to print; `None` when the command is done.
pub(crate) fn run_request<R: serde::Serialize, O, T: serde::Serialize>(
    request: &R,
    options: impl FnOnce(&R) -> cpa_stream_pipeline::Result<O>,
    run: impl FnOnce(&O, &cpa_stream_pipeline::RunContext) -> cpa_stream_pipeline::Result<T>,
    json: bool,
    what: impl FnOnce() -> String,
) -> anyhow::Result<Option<T>> {
    use anyhow::Context as _;
    if PRINT_REQUEST.load(std::sync::atomic::Ordering::Relaxed) {
        jsonln!(request);
        return Ok(None);
    }
    let options = options(request)?;
    let progress = progress::CliProgress::new();
    let report = run(&options, &cpa_stream_pipeline::RunContext::new(&progress)).with_context(what)?;
    if json {
        jsonln!(&report);
        return Ok(None);
    }
    Ok(Some(report))
}

/// The end of a command's results: with `--verbose` every stage's report; otherwise one line of
/// time and peak memory, and the stage table only when a feeding stage held the run up (busy
/// for most of a run of some length), with one line saying so.
pub(crate) fn print_report(report: &cpa_stream_pipeline::RunReport) -> anyhow::Result<()> {
    if verbose() {
        out!("{}", report.render());
        return Ok(());
    }
    let wall = report.wall.as_secs_f64();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    outln!(
        "done in {}; peak memory {:.0} MiB (+{:.0} MiB of mapped files)",
        human_seconds(wall),
        mib(report.memory.rss_anon),
        mib(report.memory.rss_file)
    );
    if let Some(b) = report.holdup() {
        outln!(
            "note: the {} stage was busy {:.0}% of the run and held the rest up; its report:",
            b.name,
            100.0 * b.utilisation(report.wall)
        );
        out!("{}", report.render());
    }
    Ok(())
}

/// `12.3 s`, `4 min 05 s`, `1 h 02 min`.
fn human_seconds(s: f64) -> String {
    match s {
        s if s < 60.0 => format!("{s:.1} s"),
        s if s < 3600.0 => format!("{} min {:02.0} s", (s / 60.0) as u64, s % 60.0),
        s => format!("{} h {:02} min", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64),
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print libtorch, CUDA and build information.
    #[command(after_help = "Example:\n  cpa-stream info --json")]
    Info(info::InfoArgs),
    /// Generate a CPA-shaped synthetic atlas with ground truth.
    #[command(after_help = "Example:\n  cpa-stream synth --cells 20000 --genes 2000 --perturbations 8 --doses 3 \
                            --cell-types 3 --combinations 4 --out atlas.store")]
    Synth(synth::SynthArgs),
    /// Show a store's shape, sizes and obs columns.
    #[command(after_help = "Example:\n  cpa-stream inspect atlas.store")]
    Inspect(store::InspectArgs),
    /// Check a store's checksums and structure; exit 1 naming the first problem.
    #[command(after_help = "Example:\n  cpa-stream verify atlas.store")]
    Verify(store::VerifyArgs),
    /// Copy a store with another codec (raw or zstd).
    #[command(after_help = "Examples:\n  cpa-stream convert atlas.store --codec zstd --out atlas-zstd.store\n  \
                            cpa-stream convert sorted.store --codec raw --shuffle 0 --out shuffled.store")]
    Convert(store::ConvertArgs),
    /// Convert an AnnData .h5ad file into a store, in bounded memory.
    #[command(after_help = "Examples:\n  cpa-stream import adata.h5ad --out atlas.store\n  \
                            cpa-stream import adata.h5ad --layer counts --codec zstd --out atlas.store\n  \
                            cpa-stream import old_scanpy.h5ad --use-raw --out atlas.store")]
    Import(h5ad::ImportArgs),
    /// Write a store as an AnnData .h5ad file.
    #[command(after_help = "Example:\n  cpa-stream export atlas.store --out atlas.h5ad --compression gzip")]
    Export(h5ad::ExportArgs),
    /// Train CPA on a store through the streaming pipeline.
    #[command(after_help = "Examples:\n  cpa-stream train --store atlas.store --dose-key dose --covariates cell_type \
                            --holdout \"MAP2K3+MAP2K6\" --epochs 100 --out run/\n  \
                            cpa-stream train --store atlas.store --out run/ --resume      (after Ctrl-C)\n  \
                            torchrun --nproc-per-node 8 --no-python cpa-stream train --store atlas.store \
                            --out run/ --device cuda --batch-size 4096\n\n\
                            Launched as several processes (torchrun, srun, RANK/WORLD_SIZE), it trains as one \
                            rank of a data-parallel run\n(through the Python package's torch.distributed; \
                            --batch-size is the whole step's): docs/training.md.")]
    Train(train::TrainArgs),
    /// Counterfactual predictions of a trained model into a Parquet file.
    #[command(after_help = "Example:\n  cpa-stream predict --model run/ --store atlas.store \
                            --source \"condition == control and cell_type == k562\" \
                            --target \"condition=MAP2K3+MAP2K6,dose=1+1\" --out pred.parquet")]
    Predict(predict::PredictArgs),
    /// Per-condition scores of counterfactual means: the CPA paper's R2 family and the field's
    /// (cell-eval's Pearson of the change, errors, DEG overlap, discrimination), with plots.
    #[command(after_help = "Example:\n  cpa-stream evaluate --model run/ --store atlas.store --split ood --out eval/")]
    Evaluate(evaluate::EvaluateArgs),
    /// The learned perturbation and covariate embeddings of a model, to Parquet.
    #[command(after_help = "Example:\n  cpa-stream embeddings --model run/ --out embeddings/")]
    Embeddings(evaluate::EmbeddingsArgs),
    /// Dose-response curves of a model: the learned dose scaling of each perturbation and the
    /// decoded change of expression over a dose grid (cpa-tools' latent_dose_response and
    /// get_response), to Parquet, with a plot.
    #[command(after_help = "Examples:\n  cpa-stream dose-response --model run/ --store atlas.store --out dose/\n  \
                            cpa-stream dose-response --model run/ --store atlas.store --perturbations drug_1,drug_2 \
                            --doses 0,0.01,0.1,1 --genes GATA1,HBG2 --out dose/")]
    DoseResponse(evaluate::DoseResponseArgs),
    /// Convert a model saved by cpa-tools 0.8.8 (`model.save(dir)`: model.pt) into a cpa-stream
    /// model directory that predict, evaluate, embeddings and dose-response read.
    #[command(after_help = "Example:\n  cpa-stream import-model saved_cpa_tools_model/ --out model/\n  \
                            cpa-stream predict --model model/ --store atlas.store --target \"condition=IFNb\" \
                            --out pred.parquet")]
    ImportModel(import_model::ImportModelArgs),
    /// Score a prediction of raw counts against the real cells with the Virtual Cell Challenge
    /// 2026's metrics (cell-eval2 0.20.0's vcc2026 preset), out of core: so far its expression
    /// members, pds_cosine and expr_mse_unbiased_capped_norm.
    #[command(after_help = "Example:\n  cpa-stream predict --model run/ --store atlas.store --target A --target B \
                            --counts --out pred.h5ad\n  \
                            cpa-stream score --prediction pred.h5ad --reference real.h5ad --out scores/")]
    Score(score::ScoreArgs),
    /// Measure throughput.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  cpa-stream completions bash > ~/.local/share/bash-completion/completions/cpa-stream\n  \
                            cpa-stream completions zsh > ~/.zfunc/_cpa-stream\n  \
                            cpa-stream completions fish > ~/.config/fish/completions/cpa-stream.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the command-line reference as Markdown (docs/cli-reference.md is this output).
    #[command(hide = true)]
    MarkdownHelp,
}

#[cfg(test)]
use cpa_stream_pipeline::commands::COMMANDS;
pub use cpa_stream_pipeline::commands::command_kind;

impl Command {
    /// The command's name as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Info(_) => "info",
            Command::Synth(_) => "synth",
            Command::Inspect(_) => "inspect",
            Command::Verify(_) => "verify",
            Command::Convert(_) => "convert",
            Command::Import(_) => "import",
            Command::Export(_) => "export",
            Command::Train(_) => "train",
            Command::Predict(_) => "predict",
            Command::Evaluate(_) => "evaluate",
            Command::Embeddings(_) => "embeddings",
            Command::DoseResponse(_) => "dose-response",
            Command::ImportModel(_) => "import-model",
            Command::Score(_) => "score",
            Command::Bench(_) => "bench",
            Command::Completions { .. } => "completions",
            Command::MarkdownHelp => "markdown-help",
        }
    }
}

/// Runs a parsed command line.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let level = if args.quiet {
        0
    } else if args.verbose {
        2
    } else {
        1
    };
    OUTPUT_LEVEL.store(level, std::sync::atomic::Ordering::Relaxed);
    PRINT_REQUEST.store(args.print_request, std::sync::atomic::Ordering::Relaxed);
    let has_request = command_kind(args.command.name()).is_some_and(|k| k.takes_request);
    if args.print_request && !has_request {
        let those = cpa_stream_pipeline::commands::names(|k| k.takes_request);
        anyhow::bail!("--print-request: this command takes no request (those that do: {those})");
    }
    match args.command {
        Command::Info(a) => crate::model_commands::info(a),
        Command::Synth(a) => synth::run(a),
        Command::Inspect(a) => store::inspect(a),
        Command::Verify(a) => store::verify(a),
        Command::Convert(a) => store::convert(a),
        Command::Import(a) => h5ad::import(a),
        Command::Export(a) => h5ad::export(a),
        Command::Train(a) => crate::model_commands::train(a),
        Command::Predict(a) => crate::model_commands::predict(a),
        Command::Evaluate(a) => crate::model_commands::evaluate(a),
        Command::Embeddings(a) => crate::model_commands::embeddings(a),
        Command::DoseResponse(a) => crate::model_commands::dose_response(a),
        Command::ImportModel(a) => import_model::run(a),
        Command::Score(a) => score::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Completions { shell } => {
            let mut command = <Args as clap::CommandFactory>::command();
            // Into memory first: clap_complete panics when a write fails (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "cpa-stream", &mut script);
            let mut out = std::io::stdout().lock();
            std::io::Write::write_all(&mut out, &script)?;
            std::io::Write::flush(&mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::MarkdownHelp => {
            let options = clap_markdown::MarkdownOptions::new()
                .title("cpa-stream command-line reference".to_owned())
                .show_footer(false);
            out!("{}", clap_markdown::help_markdown_custom::<Args>(&options));
            Ok(ExitCode::SUCCESS)
        }
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

use cpa_stream_pipeline::limits::{
    MAX_BATCH_SIZE, MAX_BUFFER_MB, MAX_PREFETCH, MAX_SHUFFLE_BLOCKS, MAX_THREADS, MAX_WORKERS,
};

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

fn parse_sink_threads(value: &str) -> Result<usize, String> {
    bounded(value, 1, MAX_THREADS, "encoding threads")
}

fn parse_row_group_rows(value: &str) -> Result<usize, String> {
    bounded(value, 1, usize::MAX, "rows per row group")
}

fn parse_zstd_level(value: &str) -> Result<i32, String> {
    bounded(value, 1, 22, "a zstd level").map(|level| level as i32)
}

fn parse_workers(value: &str) -> Result<usize, String> {
    bounded(value, 1, MAX_WORKERS, "gather workers")
}

fn parse_prefetch(value: &str) -> Result<usize, String> {
    bounded(value, 1, MAX_PREFETCH, "batches in flight")
}

fn parse_shuffle_blocks(value: &str) -> Result<usize, String> {
    bounded(value, 1, MAX_SHUFFLE_BLOCKS, "blocks in the shuffle window")
}

fn parse_buffer_mb(value: &str) -> Result<u64, String> {
    bounded(value, 1, MAX_BUFFER_MB, "MiB of shuffle buffer").map(|v| v as u64)
}

fn parse_batch_size(value: &str) -> Result<usize, String> {
    bounded(value, 1, MAX_BATCH_SIZE, "cells per batch")
}

/// The log levels a filter directive may name.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Parses a log filter: comma-separated directives, each a level (`warn`) or `TARGET=LEVEL`
/// (`cpa_stream_pipeline=debug`). tracing's own parser takes any word as a target, so a typo
/// such as `CPA_STREAM_LOG=verbose` would silence every log; here it is an error.
fn log_filter(var: &str, text: &str) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    let level_ok = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        anyhow::ensure!(
            level_ok(level),
            "{var}={text:?}: {directive:?} is not a log level or TARGET=LEVEL; levels: {}",
            LEVELS.join(", ")
        );
    }
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| anyhow::anyhow!("{var}={text:?}: {e}"))
}

/// Logs go to stderr; `CPA_STREAM_LOG` (or `RUST_LOG`) sets the filter, default `info`; a filter
/// that does not parse is an error. Colours only on a terminal (and not with `NO_COLOR` set), so
/// that logs written to files stay plain.
pub fn init_logging(args: &Args) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let default = match (args.quiet, args.verbose) {
        (true, _) => "error",
        (_, true) => "info,cpa_stream=debug,cpa_stream_pipeline=debug,cpa_stream_stages=debug",
        _ => "info",
    };
    let filter = match ["CPA_STREAM_LOG", "RUST_LOG"].iter().find_map(|v| Some((*v, std::env::var(v).ok()?))) {
        Some((var, text)) => log_filter(var, &text)?,
        None => EnvFilter::new(default),
    };
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .with_target(false)
        .with_ansi(colour)
        .try_init();
    Ok(())
}

/// stderr for log lines, quiet when stderr is closed (`... 2>&1 | head -1`): tracing reports a
/// failed write with `eprintln!`, which panics on the same closed stream.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match progress::above_bar(|| std::io::stderr().write(buf)) {
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

/// The program after its start-up (`start`): the command line parsed and run, an error printed.
pub fn main() -> ExitCode {
    let args = Args::parse();
    // Arguments are OS strings (a path may hold any byte but NUL); provenance records them
    // lossily, with U+FFFD where a byte is not UTF-8.
    cpa_stream_stages::provenance::set(
        VERSION_LINE,
        &cpa_stream_stages::provenance::shell_words(std::env::args_os().map(|a| a.to_string_lossy().into_owned())),
    );
    if let Err(err) = init_logging(&args) {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "error: {err}");
        // A usage error, as clap reports a bad flag.
        return ExitCode::from(2);
    }
    cpa_stream_stages::store::explain_sigbus();
    // A library's panic on a damaged file is caught and reported as an error naming the file;
    // the hook says nothing of it.
    cpa_stream_stages::crew::install_quiet_panic_hook();
    // A damaged .h5ad can make the HDF5 library loop forever: end with an error instead.
    cpa_stream_stages::h5ad::watchdog::install(None);
    match run(args) {
        Ok(code) => code,
        // A closed stdout (`cpa-stream inspect S | head`) ends the output, not the program's success.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            // Not `eprintln!`: it panics when stderr is closed (`... 2>&1 | head -1`).
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "error: {}", message(&err));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().filter_map(|e| e.downcast_ref::<std::io::Error>()).any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The error and its causes, each cause only once: library errors already carry their source's
/// text, which anyhow's `{:#}` would repeat.
fn message(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_list_of_commands_is_the_parsers_in_its_order() {
        let parser = super::Args::command();
        let parsed: Vec<&str> = parser.get_subcommands().map(|c| c.get_name()).collect();
        let listed: Vec<&str> = super::COMMANDS.iter().map(|k| k.name).collect();
        assert_eq!(parsed, listed);
        // Every command handed to the engine that computes with the model gets its OpenMP setting.
        for name in ["train", "predict", "evaluate", "embeddings", "dose-response", "bench"] {
            assert!(super::command_kind(name).is_some_and(|k| k.runs_model), "{name}");
        }
    }
}
