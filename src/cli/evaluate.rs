//! `cpa-stream evaluate`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use cpa_stream_pipeline::evaluate::{
    DEFAULT_BATCH_SIZE, DEFAULT_MIN_CELLS, EvalSplit, EvaluateOptions, render_table, run_evaluate,
};

use super::progress::CliProgress;

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// Training run directory (its model/ is used) or model directory.
    #[arg(long)]
    model: PathBuf,
    /// The store the model was trained on (its split is recomputed from the model's record).
    #[arg(long)]
    store: PathBuf,
    /// Cells evaluated: train, valid, test, ood or all.
    #[arg(long, default_value = "test")]
    split: String,
    /// Truth table of a synthetic atlas [default: the store's truth.parquet, if any].
    #[arg(long)]
    truth: Option<PathBuf>,
    /// DEG table (group, rank, gene) [default: the store's degs.parquet, else computed].
    #[arg(long)]
    degs: Option<PathBuf>,
    /// Output directory: metrics.parquet, summary.json, degs.parquet, plots/.
    #[arg(long)]
    out: PathBuf,
    /// Conditions with fewer evaluated cells are skipped.
    #[arg(long, default_value_t = DEFAULT_MIN_CELLS)]
    min_cells: u64,
    /// Do not write the per-condition SVG plots.
    #[arg(long)]
    no_plots: bool,
    /// Replace an existing evaluation at --out (a directory holding other files is refused).
    #[arg(long)]
    overwrite: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Control cells decoded per batch.
    #[arg(long, value_parser = super::parse_batch_size, default_value_t = DEFAULT_BATCH_SIZE)]
    batch_size: usize,
    /// libtorch threads [default: on the CPU, the usable CPUs not busy with other processes].
    #[arg(long, value_parser = super::parse_threads)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvaluateArgs) -> anyhow::Result<ExitCode> {
    let (device, _) = super::model_device(&args.device, args.threads, None)?;
    let options = EvaluateOptions {
        split: EvalSplit::parse(&args.split)?,
        truth: args.truth.clone(),
        degs: args.degs.clone(),
        device,
        batch_size: args.batch_size,
        min_cells: args.min_cells,
        plots: !args.no_plots,
        overwrite: args.overwrite,
        ..EvaluateOptions::new(&args.model, &args.store, &args.out)
    };
    let progress = CliProgress::new();
    let report = run_evaluate(&options, &progress)
        .with_context(|| format!("evaluating {} on {}", args.model.display(), args.store.display()))?;
    if args.json {
        jsonln!(&report);
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{} conditions evaluated on the {} split of {} (R2 over genes, log1p means; ctrl_bl: the control mean as the prediction)",
        report.conditions.len(),
        report.split,
        args.store.display()
    );
    out!("{}", render_table(&report));
    outln!(
        "written: {}/metrics.parquet, summary.json, degs.parquet{}",
        args.out.display(),
        if args.no_plots { "" } else { ", plots/" }
    );
    super::print_report(&report.report)?;
    Ok(ExitCode::SUCCESS)
}
