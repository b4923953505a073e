//! `cpa-stream synth`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use cpa_stream_pipeline::request::{CodecName, Naming};
use cpa_stream_pipeline::synth::{self, DEFAULT_CHANNEL_DEPTH, SynthRequest};
use cpa_stream_schemas::{DEFAULT_ZSTD_BLOCK_ROWS, DEFAULT_ZSTD_LEVEL};
use cpa_stream_stages::synth::{
    DEFAULT_CELL_TYPES, DEFAULT_COMBINATIONS, DEFAULT_CONTROL_FRACTION, DEFAULT_DOSES, DEFAULT_HIDDEN,
    DEFAULT_INTERACTION, DEFAULT_LATENT_DIM, DEFAULT_LIBRARY_LOG_SD, DEFAULT_LIBRARY_SIZE, DEFAULT_TRUTH_SAMPLES,
};

/// Matrix codec of a store written by the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CodecArg {
    /// Plain little-endian arrays, read without copying.
    Raw,
    /// zstd-compressed blocks of rows, for disk-bound atlases.
    Zstd,
}

impl From<CodecArg> for CodecName {
    fn from(codec: CodecArg) -> CodecName {
        match codec {
            CodecArg::Raw => CodecName::Raw,
            CodecArg::Zstd => CodecName::Zstd,
        }
    }
}

/// Codec options shared by the commands that write stores.
#[derive(Debug, Clone, Args)]
pub struct CodecArgs {
    /// Matrix codec.
    #[arg(long, value_enum, default_value_t = CodecArg::Raw)]
    pub codec: CodecArg,
    #[arg(long, allow_negative_numbers = true, help = format!(
        "zstd level (codec zstd) [default: {DEFAULT_ZSTD_LEVEL}]"
    ))]
    pub zstd_level: Option<i32>,
    #[arg(long, help = format!("Rows per compressed block (codec zstd) [default: {DEFAULT_ZSTD_BLOCK_ROWS}]"))]
    pub block_rows: Option<u32>,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Number of cells.
    #[arg(long)]
    cells: u64,
    /// Number of genes.
    #[arg(long)]
    genes: u32,
    /// Number of single perturbations.
    #[arg(long)]
    perturbations: u32,
    /// Dose levels, log-spaced from 0.01 to 1.
    #[arg(long, default_value_t = DEFAULT_DOSES)]
    doses: u32,
    /// Number of cell types.
    #[arg(long, default_value_t = DEFAULT_CELL_TYPES)]
    cell_types: u32,
    /// Two-perturbation combinations present in the cells.
    #[arg(long, default_value_t = DEFAULT_COMBINATIONS)]
    combinations: u32,
    /// Combinations present only in truth.parquet [default: 1 if --combinations > 0 and pairs remain].
    #[arg(long)]
    heldout_combinations: Option<u32>,
    /// Strength of the combination interaction term in latent space (0: additive).
    #[arg(long, default_value_t = DEFAULT_INTERACTION)]
    interaction: f32,
    /// Fraction of control cells.
    #[arg(long, default_value_t = DEFAULT_CONTROL_FRACTION)]
    control_fraction: f64,
    /// Median total counts per cell.
    #[arg(long, default_value_t = DEFAULT_LIBRARY_SIZE)]
    library_size: f64,
    /// Standard deviation of log library size.
    #[arg(long, default_value_t = DEFAULT_LIBRARY_LOG_SD)]
    library_log_sd: f64,
    /// Latent dimension of the true model.
    #[arg(long, default_value_t = DEFAULT_LATENT_DIM)]
    latent_dim: u32,
    /// Hidden width of the true decoder.
    #[arg(long, default_value_t = DEFAULT_HIDDEN)]
    hidden: u32,
    /// Monte-Carlo draws per group for truth.parquet.
    #[arg(long, default_value_t = DEFAULT_TRUTH_SAMPLES)]
    truth_samples: u32,
    /// Random seed; the same seed gives the same atlas on any number of threads.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output store directory (NAME.store).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    codec: CodecArgs,
    /// Generator threads [default: available cores].
    #[arg(long, value_parser = super::parse_threads)]
    threads: Option<usize>,
    /// Chunks of 1,024 cells queued per generator thread.
    #[arg(long, default_value_t = DEFAULT_CHANNEL_DEPTH)]
    channel_depth: usize,
    /// Replace an existing store at --out.
    #[arg(long)]
    overwrite: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl SynthArgs {
    /// The request these flags make.
    fn request(&self) -> SynthRequest {
        SynthRequest {
            cells: self.cells,
            genes: self.genes,
            perturbations: self.perturbations,
            doses: self.doses,
            cell_types: self.cell_types,
            combinations: self.combinations,
            heldout_combinations: self.heldout_combinations,
            interaction: self.interaction,
            control_fraction: self.control_fraction,
            library_size: self.library_size,
            library_log_sd: self.library_log_sd,
            latent_dim: self.latent_dim,
            hidden: self.hidden,
            truth_samples: self.truth_samples,
            seed: self.seed,
            out: self.out.clone(),
            codec: self.codec.codec.into(),
            zstd_level: self.codec.zstd_level,
            block_rows: self.codec.block_rows,
            threads: self.threads,
            channel_depth: self.channel_depth,
            overwrite: self.overwrite,
            naming: Naming::Flags,
        }
    }
}

pub fn run(args: SynthArgs) -> anyhow::Result<ExitCode> {
    let what = || format!("synth into {}", args.out.display());
    let Some(summary) = super::run_request(&args.request(), SynthRequest::options, synth::run, args.json, what)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let m = &summary.manifest;
    outln!(
        "wrote {}: {} cells x {} genes, nnz {} (density {:.3}), codec {}, {:.1} MB, {} truth groups",
        args.out.display(),
        m.n_obs,
        m.n_vars,
        m.nnz,
        m.nnz as f64 / (m.n_obs.max(1) * m.n_vars.max(1)) as f64,
        m.codec.name(),
        m.total_bytes() as f64 / 1e6,
        summary.truth_groups
    );
    outln!("cells/s {:.0}, matrix MB/s {:.1}", summary.cells_per_s, summary.mb_per_s);
    super::print_report(&summary.report)?;
    Ok(ExitCode::SUCCESS)
}
