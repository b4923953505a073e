//! `cpa-stream evaluate`, `embeddings` and `dose-response`: their flags.

use std::path::PathBuf;

use clap::Args;
use cpa_stream_pipeline::model_flags::{DOSE_RESPONSE_CELLS, MetricSet};

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// Training run directory (its model/ is used) or model directory.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Further training runs (or model directories) whose predictions are averaged with
    /// --model's, as `predict --ensemble` averages them (repeat the flag or separate with commas);
    /// the runs must share the store's genes, perturbations and covariates.
    #[arg(long, value_delimiter = ',', value_name = "RUN")]
    pub(crate) ensemble: Vec<PathBuf>,
    /// The store the model was trained on (its split is recomputed from the model's record).
    #[arg(long)]
    pub(crate) store: PathBuf,
    /// Cells evaluated: train, valid, test, ood or all.
    #[arg(long, default_value = "test")]
    pub(crate) split: String,
    /// Truth table of a synthetic atlas [default: the store's truth.parquet, if any].
    #[arg(long)]
    pub(crate) truth: Option<PathBuf>,
    /// DEG table (group, rank, gene) [default: the store's degs.parquet, else computed].
    #[arg(long)]
    pub(crate) degs: Option<PathBuf>,
    /// Output directory: metrics.parquet, summary.json, degs.parquet, plots/.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Conditions with fewer evaluated cells are skipped [default: 5; 2 with --definitions
    /// reference].
    #[arg(long)]
    pub(crate) min_cells: Option<u64>,
    /// Whose definitions: `default`, or `reference` for cpa-tools' tutorial scoring (every
    /// control cell of the covariates as source and control mean, DEGs by the difference of
    /// means over all cells; docs/evaluation.md).
    #[arg(long, default_value = "default", value_parser = ["default", "reference"])]
    pub(crate) definitions: String,
    /// Score the expected log1p of the predicted counts (nb models) instead of log1p of the
    /// predicted mean: what the real cells' mean of log1p counts estimates (docs/fidelity.md).
    #[arg(long)]
    pub(crate) expected_log1p: bool,
    /// Score the anchored prediction, as `predict` writes it by default: each control cell's
    /// observed log1p counts moved by the model's change from the cell's own condition to the
    /// condition's (the values themselves for a Gaussian model). The default (this flag only
    /// says so).
    #[arg(long, conflicts_with_all = ["expected_log1p", "plain"])]
    pub(crate) anchored: bool,
    /// Score the plain prediction, log1p of the predicted means (`predict --plain`'s `mean`),
    /// as cpa-tools predicts (with --definitions reference: cpa-tools' tutorial numbers).
    #[arg(long)]
    pub(crate) plain: bool,
    /// The metrics printed: `default` (R2 of means with its control-mean baseline and the data's
    /// split-half ceiling, on all genes and the top 20 DEGs, Pearson of the change, L1
    /// discrimination rank) or `all`; metrics.parquet holds every metric either way.
    #[arg(long, default_value = "default")]
    pub(crate) metrics: MetricSet,
    /// Do not write the per-condition SVG plots.
    #[arg(long)]
    pub(crate) no_plots: bool,
    /// Replace an existing evaluation at --out (a directory holding other files is refused).
    #[arg(long)]
    pub(crate) overwrite: bool,
    #[command(flatten)]
    pub(crate) device: super::DeviceArgs,
    /// Control cells decoded per batch [default: 128 on the CPU, where larger batches only hold
    /// more memory, 1024 on a GPU].
    #[arg(long, value_parser = super::parse_batch_size)]
    pub(crate) batch_size: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub struct EmbeddingsArgs {
    /// Training run directory (its model/ is used) or model directory.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Output directory: perturbations.parquet (name, is_control, embedding) and
    /// covariates.parquet (covariate, name, embedding).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Replace an existing embeddings directory at --out.
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub struct DoseResponseArgs {
    /// Training run directory (its model/ is used) or model directory.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// The store the model was trained on: its control cells are decoded over the dose grid
    /// (without it, only the latent curves).
    #[arg(long)]
    pub(crate) store: Option<PathBuf>,
    /// Output directory: latent.parquet, decoded.parquet, genes.parquet, summary.json,
    /// dose_response.svg and .png.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Perturbations to draw, comma-separated [default: every one but the control].
    #[arg(long, value_delimiter = ',')]
    pub(crate) perturbations: Vec<String>,
    /// Dose grid, comma-separated (e.g. 0,0.1,0.5,1) [default: 0 to the largest dose the store
    /// has for each perturbation in 25 steps, plus every dose it has].
    #[arg(long, value_delimiter = ',')]
    pub(crate) doses: Option<Vec<f64>>,
    /// Genes whose curves go to genes.parquet, comma-separated [default: the 5 largest changes
    /// at the top dose of each curve].
    #[arg(long, value_delimiter = ',')]
    pub(crate) genes: Vec<String>,
    /// Decode only these covariate values, `KEY=VALUE` (repeat; values of one key are
    /// alternatives), e.g. `--covariate cell_type=K562` [default: every combination with control
    /// cells].
    #[arg(long, value_parser = parse_key_value)]
    pub(crate) covariate: Vec<(String, String)>,
    /// Control cells sampled per covariate combination.
    #[arg(long, default_value_t = DOSE_RESPONSE_CELLS)]
    pub(crate) cells: usize,
    /// Seed of the control-cell sample.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Do not draw dose_response.svg and .png.
    #[arg(long)]
    pub(crate) no_plots: bool,
    /// Replace an existing dose-response directory at --out.
    #[arg(long)]
    pub(crate) overwrite: bool,
    #[command(flatten)]
    pub(crate) device: super::DeviceArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `KEY=VALUE`.
fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("{text:?}: expected KEY=VALUE, e.g. cell_type=K562")),
    }
}
