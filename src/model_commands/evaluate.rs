//! `cpa-stream evaluate`, `embeddings` and `dose-response`: the requests their flags make, the runs
//! and their reports.

use std::process::ExitCode;

use cpa_stream_engine::dose_response::{self, DoseResponseRequest};
use cpa_stream_engine::embeddings::{self, EmbeddingsRequest};
use cpa_stream_engine::evaluate::{self, EvaluateRequest, MetricSet, render_table};
use cpa_stream_pipeline::request::Naming;

use crate::cli;
use crate::cli::evaluate::{DoseResponseArgs, EmbeddingsArgs, EvaluateArgs};

impl EvaluateArgs {
    /// The request these flags make.
    pub fn request(&self) -> EvaluateRequest {
        EvaluateRequest {
            model: self.model.clone(),
            store: self.store.clone(),
            out: self.out.clone(),
            split: self.split.clone(),
            truth: self.truth.clone(),
            degs: self.degs.clone(),
            min_cells: self.min_cells,
            definitions: self.definitions.clone(),
            expected_log1p: self.expected_log1p,
            ensemble: self.ensemble.clone(),
            anchored: self.anchored,
            plain: self.plain,
            plots: !self.no_plots,
            overwrite: self.overwrite,
            batch_size: self.batch_size,
            compute: self.device.compute(),
            naming: Naming::Flags,
        }
    }
}

pub fn run(args: EvaluateArgs) -> anyhow::Result<ExitCode> {
    let what = || format!("evaluating {} on {}", args.model.display(), args.store.display());
    let Some(report) = cli::run_request(&args.request(), EvaluateRequest::options, evaluate::run, args.json, what)?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    let scored = match report.predicted.as_str() {
        "anchored log1p" | "anchored mean" => {
            "anchored: the controls' observed log1p means moved by the predicted change"
        }
        _ => "log1p means",
    };
    let models = match report.ensemble.len() {
        0 | 1 => String::new(),
        k => format!(", each prediction the mean of {k} models"),
    };
    let n = report.conditions.len();
    outln!(
        "{n} condition{} evaluated on the {} split of {}{models} ({scored}; R2 over genes; ctrl_bl, top20_bl: the control mean \
         as the prediction; lin_bl: the linear baseline; ceiling: half the real cells predicting the other half; p_delta: Pearson of the change \
         from the control; disc_l1: rank of the true condition, 0 best)",
        if n == 1 { "" } else { "s" },
        report.split,
        args.store.display()
    );
    out!("{}", render_table(&report, args.metrics));
    if args.metrics == MetricSet::All {
        outln!(
            "cos_lfc, rk_rmse: PerturBench's cosine of log fold changes and rank by RMSE (0 best); energy, en_bl: \
             energy distance of the predicted and of the control cells to the real ones; de_rec, de_prec, de_auc: \
             cell-eval's DE agreement (Wilcoxon on sampled cells; recall, precision, ROC AUC); uncert: distance to \
             the training conditions; add_bl, cov_bl, scl_bl, near_bl, lin_bl20: the additive, other-covariates, \
             scaled other-covariates (times the transfer slope), nearest-covariates and linear baselines \
             (docs/evaluation.md has every column)"
        );
    }
    if let Some(line) = small_anchor_line(&report) {
        outln!("{line}");
    }
    outln!("DEGs: {}", deg_sources(&report));
    let reproducibility = report.reproducibility.filter(|r| r.not_reproduced > 0);
    if let Some(r) = &reproducibility {
        outln!("{}", reproducibility_line(r));
    }
    if let Some(t) = &report.transfer {
        let mostly_noise = reproducibility.is_some_and(|r| 2 * r.not_reproduced > r.conditions);
        outln!("{}", transfer_line(t, mostly_noise));
    } else if report.conditions.iter().any(|c| c.baselines.other_covariates_r2_mean.is_finite()) {
        outln!(
            "Across covariate values: no perturbation was trained in two of them, so nothing in the training cells \
             says whether an effect carries over to a value it was not trained in"
        );
    }
    outln!(
        "written: {}/metrics.parquet, summary.json, degs.parquet{}",
        args.out.display(),
        if args.no_plots { "" } else { ", plots/, overview.svg and overview.png" }
    );
    cli::print_report(&report.report)?;
    Ok(ExitCode::SUCCESS)
}

/// A note where the anchored prediction of some scored condition rests on few control cells:
/// their observed mean, noise included, is its starting point.
fn small_anchor_line(report: &evaluate::EvaluateReport) -> Option<String> {
    if !report.predicted.starts_with("anchored") {
        return None;
    }
    let scored = report.conditions.iter().filter(|c| c.n_cells > 0);
    let few: Vec<u64> = scored.filter(|c| c.n_control < evaluate::ANCHOR_CONTROLS).map(|c| c.n_control).collect();
    let fewest = few.iter().min()?;
    Some(format!(
        "Anchored on few control cells: {} scored condition(s) start from the observed mean of fewer than {} \
         controls (as few as {fewest}), whose noise is in the prediction; --plain decodes them instead (n_control \
         in metrics.parquet)",
        few.len(),
        evaluate::ANCHOR_CONTROLS
    ))
}

/// The conditions whose change the data do not measure, counted.
fn reproducibility_line(r: &evaluate::Reproducibility) -> String {
    format!(
        "Changes the data do not measure: {} of {} conditions' changes from the control do not reproduce between \
         two disjoint halves of their cells and controls (r < {:.2}; median r over the {}: {:.2}). At this many \
         cells their change is noise, and no score of it, the model's or a baseline's, tells predictions apart \
         (change_reproducibility in metrics.parquet)",
        r.not_reproduced, r.conditions, r.noise_r, r.conditions, r.median_r
    )
}

/// What the training cells say of predicting a perturbation in a covariate value it was not
/// trained in: whether its effect carries over between the values it was trained in.
/// `mostly_noise`: most evaluated conditions' changes do not reproduce.
fn transfer_line(t: &cpa_stream_engine::evaluate::transfer::Transfer, mostly_noise: bool) -> String {
    let reference = if t.other_pairs > 0 && t.other_perturbations_r.is_finite() {
        format!("different perturbations' r = {:.2} ({} pairs)", t.other_perturbations_r, t.other_pairs)
    } else {
        "no pair of different perturbations (compared with 0)".to_owned()
    };
    let slope = if t.slope.is_finite() {
        format!("; a value's change repeats {:.2} of the mean change in the others (transfer slope)", t.slope)
    } else {
        String::new()
    };
    let measured = format!(
        "Across covariate values (training cells): the same perturbation's changes correlate r = {:.2} ({} pairs), \
         {reference}{slope}",
        t.same_perturbation_r, t.same_pairs
    );
    if t.carries_over {
        format!("{measured}: effects carry over between covariate values")
    } else if mostly_noise {
        format!(
            "{measured}: nothing carries over between covariate values, and most changes do not reproduce even \
             within one (above): these data hold too little effect to carry over, so the change predicted for a \
             value a perturbation was not trained in is a guess; the control mean is the baseline to beat there"
        )
    } else {
        format!(
            "{measured}: a perturbation's effect does not carry over between covariate values in these data, so \
             the change predicted for a value it was not trained in (the model's, or other_covariates') is a guess; \
             the control mean is the baseline to beat there"
        )
    }
}

/// Where each condition's DEGs came from, counted: an evaluation always says which DEGs it used.
fn deg_sources(report: &cpa_stream_engine::evaluate::EvaluateReport) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for c in &report.conditions {
        *counts.entry(c.deg_source.as_str()).or_default() += 1;
    }
    let what = |source: &str| match source {
        "store" => "the store's DEG table (imported from the .h5ad's uns)",
        "file" => "the --degs table",
        "computed" => "computed here (Welch t of the condition's cells against the controls)",
        "truth" => "the synthetic atlas's true changes",
        "mean difference" => "the reference's (difference of the condition's mean from the control mean)",
        _ => "none (no DEG metrics)",
    };
    counts.iter().map(|(s, n)| format!("{} for {n} condition(s)", what(s))).collect::<Vec<_>>().join("; ")
}

pub fn embeddings(args: EmbeddingsArgs) -> anyhow::Result<ExitCode> {
    let request = EmbeddingsRequest {
        model: args.model.clone(),
        out: Some(args.out.clone()),
        overwrite: args.overwrite,
        naming: Naming::Flags,
    };
    let what = || format!("embeddings of {}", args.model.display());
    let Some(report) = cli::run_request(&request, EmbeddingsRequest::options, embeddings::run, args.json, what)? else {
        return Ok(ExitCode::SUCCESS);
    };
    outln!(
        "{}: {} perturbations and {} covariate categories, {} latent dimensions each \
         (perturbations.parquet, covariates.parquet)",
        args.out.display(),
        report.perturbations,
        report.covariate_categories,
        report.width
    );
    Ok(ExitCode::SUCCESS)
}

impl DoseResponseArgs {
    /// The request these flags make.
    pub fn request(&self) -> DoseResponseRequest {
        DoseResponseRequest {
            model: self.model.clone(),
            out: self.out.clone(),
            store: self.store.clone(),
            perturbations: self.perturbations.clone(),
            doses: self.doses.clone(),
            genes: self.genes.clone(),
            covariates: self.covariate.clone(),
            cells: self.cells,
            seed: self.seed,
            plots: !self.no_plots,
            overwrite: self.overwrite,
            compute: self.device.compute(),
            naming: Naming::Flags,
        }
    }
}

pub fn dose_response(args: DoseResponseArgs) -> anyhow::Result<ExitCode> {
    let what = || format!("dose response of {}", args.model.display());
    let Some(report) =
        cli::run_request(&args.request(), DoseResponseRequest::options, dose_response::run, args.json, what)?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    outln!(
        "{}: latent curves of {} perturbations ({} points){}",
        args.out.display(),
        report.perturbations,
        report.latent_points,
        if report.decoded_points > 0 {
            format!(
                "; decoded curves in {} covariate combination(s) ({} points, {} of the sampled control cells)",
                report.covariate_combinations, report.decoded_points, report.space
            )
        } else {
            String::new()
        }
    );
    if report.truth_curves > 0 {
        outln!(
            "against the truth table ({} curves): R2 of the per-gene changes {:.3}, of the response length {:.3}",
            report.truth_curves,
            report.r2_truth_delta,
            report.r2_truth_response
        );
    }
    Ok(ExitCode::SUCCESS)
}
