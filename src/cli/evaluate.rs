//! `cpa-stream evaluate`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use cpa_stream_engine::dose_response::{self, DoseResponseRequest};
use cpa_stream_engine::embeddings::{self, EmbeddingsRequest};
use cpa_stream_engine::evaluate::{self, EvaluateRequest, MetricSet, render_table};
use cpa_stream_pipeline::request::{Compute, Naming};

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
    /// Conditions with fewer evaluated cells are skipped [default: 5; 2 with --definitions
    /// reference].
    #[arg(long)]
    min_cells: Option<u64>,
    /// Whose definitions: `default`, or `reference` for cpa-tools' tutorial scoring (every
    /// control cell of the covariates as source and control mean, DEGs by the difference of
    /// means over all cells; docs/evaluation.md).
    #[arg(long, default_value = "default", value_parser = ["default", "reference"])]
    definitions: String,
    /// Score the expected log1p of the predicted counts (nb models) instead of log1p of the
    /// predicted mean: what the real cells' mean of log1p counts estimates (docs/fidelity.md).
    #[arg(long)]
    expected_log1p: bool,
    /// The metrics printed: `default` (R2 of means with its control-mean baseline and the data's
    /// split-half ceiling, on all genes and the top 20 DEGs, Pearson of the change, L1
    /// discrimination rank) or `all`; metrics.parquet holds every metric either way.
    #[arg(long, default_value = "default")]
    metrics: MetricSet,
    /// Do not write the per-condition SVG plots.
    #[arg(long)]
    no_plots: bool,
    /// Replace an existing evaluation at --out (a directory holding other files is refused).
    #[arg(long)]
    overwrite: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Control cells decoded per batch [default: 128 on the CPU, where larger batches only hold
    /// more memory, 1024 on a GPU].
    #[arg(long, value_parser = super::parse_batch_size)]
    batch_size: Option<usize>,
    /// libtorch threads [default: on the CPU, the usable CPUs not busy with other processes].
    #[arg(long, value_parser = super::parse_threads)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

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
            plots: !self.no_plots,
            overwrite: self.overwrite,
            batch_size: self.batch_size,
            compute: Compute { device: self.device.clone(), threads: self.threads, workers: None },
            naming: Naming::Flags,
        }
    }
}

pub fn run(args: EvaluateArgs) -> anyhow::Result<ExitCode> {
    let what = || format!("evaluating {} on {}", args.model.display(), args.store.display());
    let Some(report) = super::run_request(&args.request(), EvaluateRequest::options, evaluate::run, args.json, what)?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    outln!(
        "{} conditions evaluated on the {} split of {} (log1p means; R2 over genes; ctrl_bl, top20_bl: the control mean \
         as the prediction; lin_bl: the linear baseline; ceiling: half the real cells predicting the other half; p_delta: Pearson of the change \
         from the control; disc_l1: rank of the true condition, 0 best)",
        report.conditions.len(),
        report.split,
        args.store.display()
    );
    out!("{}", render_table(&report, args.metrics));
    if args.metrics == MetricSet::All {
        outln!(
            "cos_lfc, rk_rmse: PerturBench's cosine of log fold changes and rank by RMSE (0 best); energy, en_bl: \
             energy distance of the predicted and of the control cells to the real ones; de_rec, de_prec, de_auc: \
             cell-eval's DE agreement (Wilcoxon on sampled cells; recall, precision, ROC AUC); uncert: distance to \
             the training conditions (docs/evaluation.md has every column)"
        );
    }
    outln!("DEGs: {}", deg_sources(&report));
    outln!(
        "written: {}/metrics.parquet, summary.json, degs.parquet{}",
        args.out.display(),
        if args.no_plots { "" } else { ", plots/, overview.svg and overview.png" }
    );
    super::print_report(&report.report)?;
    Ok(ExitCode::SUCCESS)
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

#[derive(Debug, Args)]
pub struct EmbeddingsArgs {
    /// Training run directory (its model/ is used) or model directory.
    #[arg(long)]
    model: PathBuf,
    /// Output directory: perturbations.parquet (name, is_control, embedding) and
    /// covariates.parquet (covariate, name, embedding).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing embeddings directory at --out.
    #[arg(long)]
    overwrite: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn embeddings(args: EmbeddingsArgs) -> anyhow::Result<ExitCode> {
    let request = EmbeddingsRequest {
        model: args.model.clone(),
        out: Some(args.out.clone()),
        overwrite: args.overwrite,
        naming: Naming::Flags,
    };
    let what = || format!("embeddings of {}", args.model.display());
    let Some(report) = super::run_request(&request, EmbeddingsRequest::options, embeddings::run, args.json, what)?
    else {
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

#[derive(Debug, Args)]
pub struct DoseResponseArgs {
    /// Training run directory (its model/ is used) or model directory.
    #[arg(long)]
    model: PathBuf,
    /// The store the model was trained on: its control cells are decoded over the dose grid
    /// (without it, only the latent curves).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Output directory: latent.parquet, decoded.parquet, genes.parquet, summary.json,
    /// dose_response.svg and .png.
    #[arg(long)]
    out: PathBuf,
    /// Perturbations to draw, comma-separated [default: every one but the control].
    #[arg(long, value_delimiter = ',')]
    perturbations: Vec<String>,
    /// Dose grid, comma-separated (e.g. 0,0.1,0.5,1) [default: 0 to the largest dose the store
    /// has for each perturbation in 25 steps, plus every dose it has].
    #[arg(long, value_delimiter = ',')]
    doses: Option<Vec<f64>>,
    /// Genes whose curves go to genes.parquet, comma-separated [default: the 5 largest changes
    /// at the top dose of each curve].
    #[arg(long, value_delimiter = ',')]
    genes: Vec<String>,
    /// Decode only these covariate values, `KEY=VALUE` (repeat; values of one key are
    /// alternatives), e.g. `--covariate cell_type=K562` [default: every combination with control
    /// cells].
    #[arg(long, value_parser = parse_key_value)]
    covariate: Vec<(String, String)>,
    /// Control cells sampled per covariate combination.
    #[arg(long, default_value_t = cpa_stream_engine::dose_response::DEFAULT_CELLS)]
    cells: usize,
    /// Seed of the control-cell sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not draw dose_response.svg and .png.
    #[arg(long)]
    no_plots: bool,
    /// Replace an existing dose-response directory at --out.
    #[arg(long)]
    overwrite: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch threads [default: on the CPU, the usable CPUs not busy with other processes].
    #[arg(long, value_parser = super::parse_threads)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
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
            compute: Compute { device: self.device.clone(), threads: self.threads, workers: None },
            naming: Naming::Flags,
        }
    }
}

pub fn dose_response(args: DoseResponseArgs) -> anyhow::Result<ExitCode> {
    let what = || format!("dose response of {}", args.model.display());
    let Some(report) =
        super::run_request(&args.request(), DoseResponseRequest::options, dose_response::run, args.json, what)?
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

/// `KEY=VALUE`.
fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("{text:?}: expected KEY=VALUE, e.g. cell_type=K562")),
    }
}
