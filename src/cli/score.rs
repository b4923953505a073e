//! `cpa-stream score`: a counts prediction scored with cell-eval2's `vcc2026` metrics.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use cpa_stream_pipeline::score::{self, ScoreOptions, ScoreReport, TargetGenes};

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// The prediction: an .h5ad of raw counts per cell (`predict --counts --out pred.h5ad`), an
    /// obs column of perturbations, the reference's genes in its order.
    #[arg(long, value_name = "H5AD")]
    prediction: PathBuf,
    /// The real cells: an .h5ad of raw counts, the control cells among them.
    #[arg(long, value_name = "H5AD")]
    reference: PathBuf,
    /// obs column of the perturbation, in both files.
    #[arg(long, default_value = "condition")]
    perturbation_key: String,
    /// Label of the control cells.
    #[arg(long, default_value = "control")]
    control: String,
    /// The perturbations have no target gene (drugs, cytokines): none is left out of the
    /// comparison. By default a perturbation whose label is a gene id leaves that gene out, as
    /// cell-eval2 does.
    #[arg(long)]
    no_target_genes: bool,
    /// A real bundle written by `cell-eval2 prep-real-bundle` for this reference (its
    /// baseline_agg.csv and anchor_agg.parquet): each member is also scaled between the
    /// mean-response baseline (0) and the split-half replicate (1), as the challenge scores.
    #[arg(long, value_name = "DIR")]
    real_bundle: Option<PathBuf>,
    /// Directory written: results.parquet (perturbation, metric, value: cell-eval2's
    /// results.csv) and summary.json (the aggregates).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Accept counts that are not whole numbers (a baseline arm of mean counts, as cell-eval2's
    /// baseline writes it); the challenge's scoring refuses them.
    #[arg(long)]
    allow_fractional_counts: bool,
    /// Replace a score directory written before (a directory holding other files is refused).
    #[arg(long)]
    overwrite: bool,
    /// Threads of the pass over the cells [default: the usable CPUs].
    #[arg(long)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let mut options = ScoreOptions::new(&args.prediction, &args.reference);
    options.perturbation_key = args.perturbation_key;
    options.control = args.control;
    options.target_genes = if args.no_target_genes { TargetGenes::None } else { TargetGenes::ByName };
    options.out = args.out;
    options.real_bundle = args.real_bundle;
    options.allow_fractional_counts = args.allow_fractional_counts;
    options.overwrite = args.overwrite;
    if let Some(t) = args.threads {
        options.threads = t.max(1);
    }
    let progress = super::progress::CliProgress::new();
    let report = score::run(&options, &cpa_stream_pipeline::RunContext::new(&progress))
        .with_context(|| format!("scoring {}", args.prediction.display()))?;
    if args.json {
        jsonln!(&report);
        return Ok(ExitCode::SUCCESS);
    }
    print(&report)?;
    super::print_report(&report.report)?;
    Ok(ExitCode::SUCCESS)
}

fn print(report: &ScoreReport) -> anyhow::Result<()> {
    outln!(
        "{} perturbations, {} genes; {} predicted and {} real cells (cell-eval2 0.20.0's vcc2026 definitions)",
        report.perturbations.len(),
        report.genes,
        report.predicted_cells,
        report.real_cells
    );
    if report.n_unresolved_targets > 0 {
        outln!(
            "note: {} perturbation label{} no gene (such as {:?}): scored with every gene; if they have no \
             target gene, say so with --no-target-genes",
            report.n_unresolved_targets,
            if report.n_unresolved_targets == 1 { " names" } else { "s name" },
            report.unresolved_targets
        );
    }
    let width = report.aggregates.keys().map(String::len).max().unwrap_or(0);
    for (name, value) in &report.aggregates {
        let how = match name.as_str() {
            "expr_mse_unbiased_capped_norm" => "ratio of sums; 0 perfect, 1 the control predicted",
            "pds_cosine" => "mean; 1 best, 0.5 chance",
            _ => "mean",
        };
        outln!("  {name:<width$}  {value:>10.6}  ({how})");
    }
    if let Some(scaled) = &report.scaled {
        outln!("scaled against {} (0 the mean-response baseline):", scaled.bundle.display());
        outln!(
            "  {:<width$}  {:>10}  {:>10}  {:>10}  {:>13}  {:>14}",
            "metric",
            "value",
            "baseline",
            "replicate",
            "from_baseline",
            "from_replicate"
        );
        for m in &scaled.members {
            outln!(
                "  {:<width$}  {:>10.6}  {:>10.6}  {:>10.6}  {:>13.6}  {:>14.6}",
                m.metric,
                m.value,
                m.baseline,
                m.replicate,
                m.from_baseline,
                m.from_replicate
            );
        }
        outln!(
            "  {:<width$}  {:>10}  {:>10}  {:>10}  {:>13.6}  {:>14.6}",
            "avg_score",
            "",
            "",
            "",
            scaled.avg_from_baseline,
            scaled.avg_from_replicate
        );
    }
    if let Some(out) = &report.out {
        outln!("wrote {}", out.display());
    }
    Ok(())
}
