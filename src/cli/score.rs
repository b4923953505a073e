//! `cpa-stream score`: a counts prediction scored with cell-eval2's `vcc2026` metrics.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use cpa_stream_pipeline::request::Naming;
use cpa_stream_pipeline::score::{self, ContextScores, ScoreReport, ScoreRequest};

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// The prediction: an .h5ad of raw counts per cell (`predict --counts --out pred.h5ad`), an
    /// obs column of perturbations, the reference's genes in its order.
    #[arg(long, value_name = "H5AD")]
    prediction: PathBuf,
    /// The real cells: an .h5ad of raw counts, the control cells among them.
    #[arg(long, value_name = "H5AD")]
    reference: PathBuf,
    /// obs column of the perturbation, in both files [default: condition].
    #[arg(long)]
    perturbation_key: Option<String>,
    /// Label of the control cells [default: control].
    #[arg(long)]
    control: Option<String>,
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
    /// Also score cell-eval2's mean-response baseline arm of the reference (what `cell-eval2
    /// baseline` builds: every perturbation predicted as the average perturbation, drawn from
    /// the control cells), emitted here without writing it, and show each metric beside it.
    #[arg(long, conflicts_with = "real_bundle")]
    baseline: bool,
    /// Seed of the baseline arm's draws (cell-eval2's `--seed`; the same seed draws the same
    /// cells as cell-eval2) [default: 0].
    #[arg(long, requires = "baseline")]
    baseline_seed: Option<u64>,
    /// Also compute cell-eval2's split-half technical replicate of the reference (the anchor
    /// of `cell-eval2 prep-real-bundle`: five splits of its cells into two halves, one scored
    /// as a prediction of the other). With --baseline, each metric is then scaled between the
    /// two as the challenge scores, without a real bundle.
    #[arg(long, conflicts_with = "real_bundle")]
    replicate: bool,
    /// Seed the replicate's five split seeds come from (cell-eval2's `base_seed`; the same
    /// seed splits the same cells as cell-eval2) [default: 0].
    #[arg(long, requires = "replicate")]
    replicate_seed: Option<u64>,
    /// Directory written: results.parquet (perturbation, metric, value: cell-eval2's
    /// results.csv), summary.json (the aggregates) and, with --baseline, baseline_results.parquet.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Accept counts that are not whole numbers (a baseline arm of mean counts, as cell-eval2's
    /// baseline writes it); the challenge's scoring refuses them.
    #[arg(long)]
    allow_fractional_counts: bool,
    /// Replace a score directory written before (a directory holding other files is refused).
    #[arg(long)]
    overwrite: bool,
    /// An obs column of both files whose values (cell lines, say) are scored each on its own,
    /// with its own control, baseline and replicate, as the challenge scores its contexts;
    /// results.parquet gains a `context` column and summary.json a `contexts` list.
    #[arg(long, value_name = "KEY")]
    context_key: Option<String>,
    /// Whose Wilcoxon p-values the DE members use: cell-eval2's `scanpy` engine (what `pip
    /// install cell-eval2` runs on a CPU) or its `pdex` engine (what it runs where pdex is
    /// installed: continuity-corrected, so the DE members differ in the third decimal)
    /// [default: scanpy].
    #[arg(long, value_name = "ENGINE", value_parser = ["scanpy", "pdex"])]
    de_engine: Option<String>,
    /// Threads of the passes over the cells and of the tests [default: the usable CPUs].
    #[arg(long)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let request = ScoreRequest {
        prediction: args.prediction.clone(),
        reference: args.reference,
        perturbation_key: args.perturbation_key,
        control: args.control,
        no_target_genes: args.no_target_genes,
        real_bundle: args.real_bundle,
        baseline: args.baseline,
        baseline_seed: args.baseline_seed,
        replicate: args.replicate,
        replicate_seed: args.replicate_seed,
        context_key: args.context_key,
        out: args.out,
        allow_fractional_counts: args.allow_fractional_counts,
        overwrite: args.overwrite,
        de_engine: args.de_engine.as_deref().map(|e| match e {
            "pdex" => score::DeEngine::Pdex,
            _ => score::DeEngine::Scanpy,
        }),
        threads: args.threads,
        naming: Naming::Flags,
    };
    let what = || format!("scoring {}", args.prediction.display());
    let Some(report) = super::run_request(&request, ScoreRequest::options, score::run, args.json, what)? else {
        return Ok(ExitCode::SUCCESS);
    };
    print(&report)?;
    super::print_report(&report.report)?;
    Ok(ExitCode::SUCCESS)
}

fn print(report: &ScoreReport) -> anyhow::Result<()> {
    for c in &report.contexts {
        let context = c.context.as_ref().map(|name| format!("context {name:?}: ")).unwrap_or_default();
        let n = c.perturbations.len();
        outln!(
            "{context}{n} perturbation{}, {} genes; {} predicted and {} real cells (cell-eval2 0.20.0's vcc2026 \
             definitions)",
            if n == 1 { "" } else { "s" },
            report.genes,
            c.predicted_cells,
            c.real_cells
        );
        print_context(c)?;
    }
    if report.contexts.len() > 1
        && let Some(avg) = report.avg_from_replicate
    {
        outln!("avg_score from the replicate over the {} contexts: {avg:.6}", report.contexts.len());
    }
    if let Some(out) = &report.out {
        outln!("wrote {}", out.display());
    }
    Ok(())
}

/// What a metric's number means.
fn how(name: &str) -> &'static str {
    match name {
        "expr_mse_unbiased_capped_norm" => "ratio of sums; 0 perfect, 1 the control predicted",
        "pds_cosine" => "mean; 1 best, 0.5 chance",
        "expr_distance_unbiased" => "mean; the reference's own effect size",
        "de_wilcoxon_lfc_nmae" | "expr_mse_unbiased" | "expr_mse_unbiased_capped" => "mean; lower is better",
        _ => "mean; higher is better",
    }
}

/// One context's tables.
fn print_context(c: &ContextScores) -> anyhow::Result<()> {
    if c.n_unresolved_targets > 0 {
        outln!(
            "note: {} perturbation label{} no gene (such as {:?}): scored with every gene; if they have no \
             target gene, say so with --no-target-genes",
            c.n_unresolved_targets,
            if c.n_unresolved_targets == 1 { " names" } else { "s name" },
            c.unresolved_targets
        );
    }
    let width = c.aggregates.keys().map(String::len).max().unwrap_or(0);
    match &c.baseline {
        None => {
            for (name, value) in &c.aggregates {
                outln!("  {name:<width$}  {value:>10.6}  ({})", how(name));
            }
        }
        Some(baseline) => {
            outln!("  {:<width$}  {:>10}  {:>10}", "metric", "value", "baseline");
            let mut behind = Vec::new();
            for (name, value) in &c.aggregates {
                let b = baseline.aggregates.get(name).copied().unwrap_or(f64::NAN);
                let verdict = match score::better(name) {
                    Some(higher) if value.is_finite() && b.is_finite() => {
                        let ahead = if higher { *value > b } else { *value < b };
                        if !ahead {
                            behind.push(name.as_str());
                        }
                        if ahead { "beats the baseline" } else { "does NOT beat the baseline" }
                    }
                    Some(_) => "not comparable",
                    None => "",
                };
                let sep = if verdict.is_empty() { "" } else { "; " };
                outln!("  {name:<width$}  {value:>10.6}  {b:>10.6}  {verdict}{sep}{}", how(name));
            }
            if behind.is_empty() {
                outln!("the prediction beats the mean-response baseline (seed {}) on every metric", baseline.seed);
            } else {
                outln!(
                    "the prediction does not beat the mean-response baseline (seed {}) on {}",
                    baseline.seed,
                    behind.join(", ")
                );
            }
        }
    }
    if let Some(replicate) = &c.replicate
        && c.scaled.is_none()
    {
        if let Some(reason) = &c.scale_error {
            outln!("no scaled score: {reason}");
        }
        outln!(
            "split-half replicate of the reference (mean of {} splits, seed {}):",
            replicate.splits.len(),
            replicate.base_seed
        );
        for (name, value) in &replicate.aggregates {
            outln!("  {name:<width$}  {value:>10.6}");
        }
    }
    if let Some(scaled) = &c.scaled {
        let width = width.max("avg_score".len());
        match &scaled.bundle {
            Some(bundle) => outln!("scaled against {} (0 the mean-response baseline):", bundle.display()),
            None => outln!(
                "scaled between the mean-response baseline (0) and the split-half replicate (1), both computed from \
                 the reference:"
            ),
        }
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
    Ok(())
}
