//! Evaluation of counterfactual predictions, as in the CPA paper and tutorials, from streaming
//! sufficient statistics.
//!
//! For each condition (covariates + perturbation + doses) with enough cells in the evaluated
//! split, held-out control cells of the same covariates are decoded into the condition and the
//! predicted per-gene means and variances (over cells, of `log1p` of the decoded means for count
//! models) are compared with those of the real cells: R2 (sklearn's, over genes) on all genes
//! and on the condition's top-k DEGs, and R2 of the change against the control mean. With a
//! synthetic atlas's truth table, the predictions are also scored against the true means, and
//! conditions that have no cells at all (held-back combinations) are evaluated against the truth.
//!
//! Two passes over the store, each in store order and in bounded memory: one accumulating
//! per-group, per-split sums and sums of squares of every gene (`moments.rs`; memory: groups x
//! genes, not cells), one decoding the control cells into their covariates' conditions
//! (`decode.rs`, through the batcher). Then `score.rs` scores each condition and [`outputs`]
//! writes the files.

pub(crate) mod conditions;
mod decode;
pub mod field;
mod metrics;
mod moments;
pub mod outputs;
pub mod plot;
mod request;
mod ridge;
pub mod samples;
mod score;
mod table;
pub mod transfer;

pub mod uncertainty;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use crate::model::{CpaModel, Vocabulary};
pub use conditions::ANCHOR_CONTROLS;
use cpa_stream_stages::h5ad::DEG_FILE;
use cpa_stream_stages::store::{Store, TableFile};
/// Control cells an anchored prediction prefers to start from ([`EvaluateOptions::anchored`]).
pub use metrics::{
    BaselineMetrics, ConditionMetrics, DEG_OVERLAP_K, Effects, FieldMetrics, NOISE_REPRODUCIBILITY, PlotData,
    Reproducibility, TopMetrics, TruthMetrics,
};
pub use moments::in_second_half;
pub use request::EvaluateRequest;
use serde::Serialize;
pub use table::{MetricSet, render_table};
use tch::Device;

use crate::Stage;
use crate::opened::{Labelled, Opened};
use crate::predictor::targets::Target;
use crate::predictor::{Members, open_members};
use crate::torch::torch_error;
use conditions::SourceSplits;
use cpa_stream_pipeline::batcher::LoaderOptions;
use cpa_stream_pipeline::condition::{ConditionKey, MappedGroup, TruthRow, dropped, map_groups, read_truth};
use cpa_stream_pipeline::context::RunContext;
use cpa_stream_pipeline::degs::read_deg_lists;
use cpa_stream_pipeline::encoder::{CellLabels, Split};
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::obs::ObsKeys;
use cpa_stream_pipeline::stats::Moments;
use cpa_stream_pipeline::telemetry::{MemorySampler, RunReport, StageStats};
use decode::{Decode, DecodeStats};
use moments::GroupMoments;

/// Top-k DEG sets every condition is scored on.
pub const TOP_K: [usize; 3] = [10, 20, 50];

/// The reference scores groups of at least 2 cells.
pub const REFERENCE_MIN_CELLS: u64 = 2;

/// Control cells decoded per batch on the CPU, unless set otherwise: the decoder's step
/// (128 rows), since larger batches there only hold more memory in flight.
pub const DEFAULT_BATCH_SIZE: usize = decode::CPU_STEP_ROWS;

/// Control cells decoded per batch on a GPU (one step per batch), unless set otherwise.
pub const DEFAULT_GPU_BATCH_SIZE: usize = 1024;

/// While it lives, glibc's malloc serves every allocation of 1 MiB or more from its own mapping,
/// returned to the system when freed. By default glibc raises that threshold to the largest
/// block freed so far (up to 32 MiB), after which the evaluation's transient buffers (a pass's
/// chunk of cells, decoded means) land in the heap and fragment it: peak memory at 1M cells x
/// 5,000 genes was 430 MiB instead of 242 MiB (10k cells: 224-281 MiB). [`run`] holds
/// one, for every caller (the CLI, Python, a library). Not for training: its per-batch tensors
/// would fault in fresh pages every step (measured 40% slower at 5,000 genes), so when dropped
/// the threshold becomes 32 MiB, where glibc's own adjustment ends up for such allocations
/// (setting the threshold turns the adjustment off for good). The setting is process-wide.
/// Does nothing off glibc.
struct LargeBuffersReturned;

impl LargeBuffersReturned {
    fn for_this_run() -> LargeBuffersReturned {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes a malloc parameter.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
        LargeBuffersReturned
    }
}

impl Drop for LargeBuffersReturned {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
    }
}

/// The default batch size on `device`.
pub fn default_batch_size(device: Device) -> usize {
    if device.is_cuda() { DEFAULT_GPU_BATCH_SIZE } else { DEFAULT_BATCH_SIZE }
}

/// Conditions with fewer evaluated cells are skipped, unless set otherwise.
pub const DEFAULT_MIN_CELLS: u64 = 5;

/// Which cells are evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSplit {
    /// The cells of one split.
    One(Split),
    /// Every cell, whatever its split.
    All,
}

impl std::str::FromStr for EvalSplit {
    type Err = Error;

    /// `train`, `valid` (`validation`), `test`, `ood` or `all`.
    fn from_str(text: &str) -> Result<EvalSplit> {
        Ok(match text {
            "train" => EvalSplit::One(Split::Train),
            "valid" | "validation" => EvalSplit::One(Split::Valid),
            "test" => EvalSplit::One(Split::Test),
            "ood" => EvalSplit::One(Split::Ood),
            "all" => EvalSplit::All,
            _ => return Err(Error::InvalidInput(format!("split {text:?}: expected train, valid, test, ood or all"))),
        })
    }
}

impl EvalSplit {
    /// Whether cells of `split` are evaluated.
    pub fn contains(self, split: Split) -> bool {
        match self {
            EvalSplit::All => true,
            EvalSplit::One(s) => s == split,
        }
    }

    /// The name `parse` reads.
    pub fn name(self) -> &'static str {
        match self {
            EvalSplit::All => "all",
            EvalSplit::One(s) => s.name(),
        }
    }
}

/// Definitions of the scores' ingredients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Definitions {
    /// This project's: the evaluated split's control cells (then every held-out split's, then
    /// all), DEGs from the store's table or a Welch t-test.
    #[default]
    Default,
    /// The reference's scoring (cpa-tools' tutorials, `../shared/peer/cpa-tools/run_peer.py`):
    /// every control cell of the covariates, whatever its split, as the decoded source and the
    /// control mean; DEGs ranked by the absolute difference of the condition's mean (all its
    /// cells) from that control mean, whatever DEG table the store has. With `min_cells` 2, the
    /// numbers are the reference's but for its random draw of control cells (here each control
    /// cell is decoded once, the expectation of that draw).
    Reference,
}

impl std::str::FromStr for Definitions {
    type Err = Error;

    /// `default` or `reference`.
    fn from_str(name: &str) -> Result<Definitions> {
        match name {
            "default" => Ok(Definitions::Default),
            "reference" => Ok(Definitions::Reference),
            other => Err(Error::InvalidInput(format!("definitions {other:?}: expected \"default\" or \"reference\""))),
        }
    }
}

impl Definitions {
    /// The fewest evaluated cells a condition needs under these definitions, unless set.
    pub fn min_cells(self) -> u64 {
        match self {
            Definitions::Default => DEFAULT_MIN_CELLS,
            Definitions::Reference => REFERENCE_MIN_CELLS,
        }
    }
}

/// What `cpa-stream evaluate` does.
#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    /// A run directory (its `model/` is used) or a model directory.
    pub model: PathBuf,
    /// The store the model was trained on (its split is recomputed from the model's record).
    pub store: PathBuf,
    /// The cells evaluated; default the test split.
    pub split: EvalSplit,
    /// A synthetic atlas's `truth.parquet` (default: the store's, when it has one).
    pub truth: Option<PathBuf>,
    /// DEG table (`group`, `rank`, `gene`) instead of the store's or computed ones.
    pub degs: Option<PathBuf>,
    /// The output directory.
    pub out: PathBuf,
    /// Where the model runs; default the CPU.
    pub device: Device,
    /// Control cells decoded per batch; default (`None`) [`default_batch_size`] of the device:
    /// [`DEFAULT_BATCH_SIZE`] on the CPU, [`DEFAULT_GPU_BATCH_SIZE`] on a GPU.
    pub batch_size: Option<usize>,
    /// Conditions with fewer evaluated cells are skipped (unless scored against the truth);
    /// default [`DEFAULT_MIN_CELLS`].
    pub min_cells: u64,
    /// Whose definitions score the predictions: this project's, or the reference's.
    pub definitions: Definitions,
    /// For an `nb` model, score the expected log1p of the predicted counts instead of log1p of
    /// the predicted mean; default false (the tutorials' log1p of the mean).
    pub expected_log1p: bool,
    /// Write one SVG plot per condition; default true.
    pub plots: bool,
    /// Replace an existing evaluation at `out` (only one: a directory holding other files is
    /// refused); default false.
    pub overwrite: bool,
    /// Further runs (or model directories) whose predictions are averaged with `model`'s, as
    /// `predict --ensemble` averages them; default none.
    pub ensemble: Vec<PathBuf>,
    /// Score the anchored prediction (`predict`'s default `anchored`): each control cell's
    /// observed log1p counts moved by the model's change from its own condition to the target's;
    /// default true. The controls (under the default definitions the evaluated split's, else
    /// every held-out split's, else all) are then the first set with at least
    /// [`ANCHOR_CONTROLS`] cells, or all: their observed mean is the prediction's start. `false` scores the plain prediction, log1p of the predicted means (or their
    /// expected log1p, `expected_log1p`, which needs it false).
    pub anchored: bool,
}

impl EvaluateOptions {
    /// Options with every default, for `model`, `store` and `out`.
    pub fn new(model: impl Into<PathBuf>, store: impl Into<PathBuf>, out: impl Into<PathBuf>) -> EvaluateOptions {
        EvaluateOptions {
            model: model.into(),
            store: store.into(),
            split: EvalSplit::One(Split::Test),
            truth: None,
            degs: None,
            out: out.into(),
            device: Device::Cpu,
            batch_size: None,
            min_cells: DEFAULT_MIN_CELLS,
            definitions: Definitions::Default,
            expected_log1p: false,
            plots: true,
            overwrite: false,
            ensemble: Vec::new(),
            anchored: true,
        }
    }
}

/// Everything an evaluation produced.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluateReport {
    /// The model directory.
    pub model: String,
    /// The store.
    pub store: String,
    /// The split evaluated.
    pub split: String,
    /// The definitions scored with.
    pub definitions: Definitions,
    /// What the predicted side is: `log1p(mean)` (count models), `expected log1p` or `mean`;
    /// `anchored ...` for the anchored prediction.
    pub predicted: String,
    /// The models whose predictions are averaged (`ensemble`): each one's directory and weights
    /// hash, the first model first; empty for one model.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ensemble: Vec<EnsembleMember>,
    /// Every evaluated condition.
    pub conditions: Vec<ConditionMetrics>,
    /// Mean of each metric over the conditions where it is defined.
    pub summary: BTreeMap<String, f64>,
    /// Whether perturbations' effects carry over between covariate values in the training cells
    /// ([`transfer`]); `None` without a perturbation trained in two covariate values.
    pub transfer: Option<transfer::Transfer>,
    /// How many conditions' changes reproduce between halves of their cells; `None` where no
    /// condition has 2 cells in each half.
    pub reproducibility: Option<Reproducibility>,
    /// Cells the store holds and the model cannot label (perturbations or covariate values it
    /// was not trained with): left out of every score, each label with its cells.
    pub dropped: Vec<(String, u64)>,
    /// Why the store is not the one the run trained on, when it is not (its cells differ).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_store: Option<String>,
    /// Wall seconds.
    pub seconds: f64,
    /// Stages, wall time and peak memory.
    pub report: RunReport,
}

/// One model of an evaluated ensemble.
#[derive(Debug, Clone, Serialize)]
pub struct EnsembleMember {
    /// The model directory.
    pub model: String,
    /// The hash of its weights, `xxh3-64:HEX`.
    pub model_id: String,
}

/// What is evaluated: the conditions with enough cells (or a truth row), their real moments,
/// the control cells decoded into each covariate combination, and the targets they decode into.
struct Plan {
    truth: HashMap<ConditionKey, TruthRow>,
    conditions: BTreeMap<ConditionKey, conditions::Condition>,
    evaluated: Vec<(ConditionKey, Moments)>,
    control_groups: HashMap<Vec<u32>, Vec<usize>>,
    sources: HashMap<Vec<u32>, (SourceSplits, Moments)>,
    targets: Vec<(ConditionKey, Target)>,
    /// Per label group: its covariates and the splits decoded, for the control groups used.
    source_of_group: Vec<Option<(Vec<u32>, SourceSplits)>>,
}

impl Plan {
    fn new(
        options: &EvaluateOptions,
        store: &Store,
        vocab: &Vocabulary,
        groups: &[Option<MappedGroup>],
        moments: &GroupMoments,
    ) -> Result<Plan> {
        let truth_table = match &options.truth {
            Some(p) => Some(TableFile::Path(p)),
            None => Some(TableFile::Store(store, cpa_stream_schemas::StoreFiles::TRUTH)).filter(TableFile::exists),
        };
        let truth = truth_table.map(|t| read_truth(t, vocab)).transpose()?.unwrap_or_default();
        let conditions = conditions::collect(groups, &truth);
        let evaluated_split = |s: Split| options.split.contains(s);
        let mut evaluated: Vec<(ConditionKey, Moments)> = conditions
            .iter()
            .map(|(key, c)| (key.clone(), moments.of_groups(&c.groups, evaluated_split)))
            .filter(|(key, real)| real.n >= options.min_cells as f64 || truth.contains_key(key))
            .collect();
        let control_groups = conditions::control_groups(groups);
        let sources = conditions::control_sources(
            evaluated.iter().map(|(key, _)| &key.covariates),
            &control_groups,
            moments,
            options.split,
            (options.min_cells, if options.anchored { conditions::ANCHOR_CONTROLS } else { 0 }),
            options.definitions,
        );
        evaluated.retain(|(key, _)| sources.contains_key(&key.covariates));
        let targets = evaluated
            .iter()
            .map(|(key, _)| {
                let c = &conditions[key];
                let target = Target {
                    condition: c.condition.clone(),
                    dose: c.dose.clone(),
                    parts: c.parts.clone(),
                    covariates: c.covariates.iter().map(|&v| Some(v)).collect(),
                };
                (key.clone(), target)
            })
            .collect();
        let source_of_group = groups
            .iter()
            .map(|g| {
                let g = g.as_ref().filter(|g| g.is_control)?;
                sources.get(&g.key.covariates).map(|(s, _)| (g.key.covariates.clone(), *s))
            })
            .collect();
        Ok(Plan { truth, conditions, evaluated, control_groups, sources, targets, source_of_group })
    }
}

/// DEG lists by group, and where they came from.
pub(crate) struct DegLists {
    /// Each group's genes, in rank order.
    pub(crate) lists: HashMap<String, Vec<String>>,
    /// `file` (`--degs`) or `store` (the store's DEG table).
    pub(crate) source: &'static str,
}

/// The DEG table to rank genes by: `--degs`, else the store's, else none (computed per condition).
fn deg_table(options: &EvaluateOptions, store: &Store) -> Result<Option<DegLists>> {
    Ok(match &options.degs {
        Some(p) => Some(DegLists { lists: read_deg_lists(TableFile::Path(p))?, source: "file" }),
        None => {
            let table = TableFile::Store(store, DEG_FILE);
            match table.exists() {
                true => Some(DegLists { lists: read_deg_lists(table)?, source: "store" }),
                false => None,
            }
        }
    })
}

/// Warns of the cells whose labels the model cannot map (`dropped`); an error when that is
/// every cell.
fn warn_dropped(store: &std::path::Path, labels: &CellLabels, dropped: &[(String, u64)]) -> Result<()> {
    if dropped.is_empty() {
        return Ok(());
    }
    let cells: u64 = dropped.iter().map(|(_, n)| n).sum();
    let shown: Vec<String> = dropped.iter().take(8).map(|(label, n)| format!("{label} ({n})")).collect();
    let message = format!(
        "{}: {cells} of {} cells have labels the model was not trained with, and are left out: {}{}",
        store.display(),
        labels.n_cells(),
        shown.join(", "),
        if dropped.len() > 8 { ", ..." } else { "" }
    );
    if cells == labels.n_cells() {
        return Err(Error::InvalidInput(format!("{message}; nothing is left to evaluate")));
    }
    tracing::warn!("{message}");
    Ok(())
}

/// The inverse dispersions of an nb model, for the expected log1p of its predicted counts.
fn expected_log1p_theta(model: &CpaModel, dir: &std::path::Path) -> Result<tch::Tensor> {
    let theta = model.nb_theta().map_err(Error::stage(Stage::Predictor))?;
    theta.ok_or_else(|| {
        Error::InvalidInput(format!(
            "{}: the expected log1p of the predicted counts needs an nb model; this one is {:?}",
            dir.display(),
            model.config().model.recon_loss
        ))
    })
}

/// Scores every evaluated condition that was decoded: its metrics (with the sampled cells'
/// metrics and its distance to the training conditions) and the DEG rows it used.
fn score_conditions(
    scoring: &score::Scoring<'_>,
    plan: &Plan,
    model: &CpaModel,
    groups: &[Option<MappedGroup>],
    predicted: &decode::Decoded,
) -> Result<(Vec<ConditionMetrics>, Vec<outputs::DegRow>)> {
    let moments = scoring.moments;
    let mut deg_rows = Vec::new();
    let gene_index: HashMap<&str, usize> = scoring.genes.iter().enumerate().map(|(i, g)| (g.as_str(), i)).collect();
    let queried: Vec<(ConditionKey, Vec<(u32, f32)>)> =
        plan.targets.iter().map(|(key, target)| (key.clone(), target.parts.clone())).collect();
    let distances = uncertainty::uncertainties(model, groups, moments, &queried)?;
    let mut results: Vec<ConditionMetrics> = Vec::with_capacity(plan.targets.len());
    for (((key, real), (_, target)), distance) in plan.evaluated.iter().zip(&plan.targets).zip(&distances) {
        let Some((pred, t)) = predicted.conditions.get(key) else { continue };
        let first_row = deg_rows.len();
        let mut metrics = scoring.score(key, target, real, pred, &mut deg_rows);
        let (sampled, tests) = sample_metrics(plan, moments, key, &predicted.samples, *t)?;
        metrics.samples = sampled;
        if let Some(tests) = tests {
            for row in &mut deg_rows[first_row..] {
                if let Some(&g) = gene_index.get(row.gene.as_str()) {
                    (row.wilcoxon_p, row.wilcoxon_q) = (tests.pvalue[g], tests.qvalue[g]);
                }
            }
        }
        if let Some(d) = distance {
            metrics.uncertainty_cosine = d.cosine;
            metrics.uncertainty_euclidean = d.euclidean;
            metrics.closest_condition.clone_from(&d.closest);
        }
        results.push(metrics);
    }
    Ok((results, deg_rows))
}

/// Evaluates a model on a store.
pub fn run(options: &EvaluateOptions, ctx: &RunContext) -> Result<EvaluateReport> {
    if options.anchored && options.expected_log1p {
        return Err(Error::InvalidInput(
            "evaluate: the anchored prediction moves the observed log1p counts by the change in log1p of the \
             means, and the expected log1p is a plain prediction; set anchored to false to score it"
                .to_owned(),
        ));
    }
    let progress = ctx.progress();
    let lock = outputs::claim_output(options)?;
    let _allocator = LargeBuffersReturned::for_this_run();
    let wall = Instant::now();
    let sampler = MemorySampler::start();
    let encoder_stats = StageStats::new(Stage::Encoder, 1);
    let opened = Opened::open(&options.model, &options.store, options.device, Stage::Evaluate)?;
    let Labelled { labels, other_store } = opened.label(&encoder_stats)?;
    let Opened { dir, model, store, genes } = opened;
    let vocab = model.vocabulary().clone();
    let groups = map_groups(&labels, &vocab);
    let dropped = dropped(&labels, &groups);
    warn_dropped(&options.store, &labels, &dropped)?;
    let count_model = model.config().model.recon_loss.is_count();
    let Members { ids, models: members } = match options.ensemble.is_empty() {
        true => Members { ids: Vec::new(), models: Vec::new() },
        false => open_members(&model, &dir, &options.ensemble, &options.store, options.device, Stage::Evaluate)?,
    };
    let dirs = std::iter::once(dir.as_path()).chain(ids.iter().skip(1).map(|(d, _)| d.as_path()));
    let decoders = std::iter::once(&model)
        .chain(&members)
        .zip(dirs)
        .map(|(m, d)| {
            Ok(decode::Decoder {
                model: m,
                theta: if options.expected_log1p { Some(expected_log1p_theta(m, d)?) } else { None },
                sample_theta: if count_model && !options.anchored { nb_theta_host(m)? } else { None },
                effectless: m.effectless_perturbations().map_err(Error::stage(Stage::Predictor))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    // Samples of cells for the energy distance and the Wilcoxon tests, within a fixed budget.
    let is_control: Vec<bool> = groups.iter().map(|g| g.as_ref().is_some_and(|g| g.is_control)).collect();
    let real_cap = samples::sample_cap(groups.len(), genes.len());

    // Pass 1: moments of every group and split.
    let moments_stats = StageStats::new(Stage::Moments, 1);
    progress.begin("evaluate: statistics", store.n_obs());
    let evaluated = |s: Split| options.split.contains(s);
    let moments = moments_stats.busy(|| {
        GroupMoments::read(&store, &labels, genes.len(), count_model, evaluated, &is_control, real_cap, ctx)
    })?;
    moments_stats.add(store.n_obs(), store.nnz() * 8);
    progress.end();
    let plan = Plan::new(options, &store, &vocab, &groups, &moments)?;

    // Pass 2: decode the control cells into every condition of their covariates.
    let loader = LoaderOptions::default();
    let decode_stats = DecodeStats::new(loader);
    progress.begin("evaluate: counterfactuals", store.n_obs());
    let predicted = Decode {
        models: &decoders,
        store: &store,
        labels: &labels,
        source_of_group: &plan.source_of_group,
        parts_of_group: &groups.iter().map(|g| g.as_ref().map(|g| g.parts.clone())).collect::<Vec<_>>(),
        targets: &plan.targets,
        split: options.split,
        batch_size: options.batch_size.unwrap_or_else(|| default_batch_size(options.device)),
        loader,
        count_model,
        anchored: options.anchored,
        sample_cap: samples::sample_cap(plan.targets.len(), genes.len()),
    }
    .run(&decode_stats, ctx)?;
    progress.end();

    tracing::debug!(
        "sampled cells: {:.1} MiB written to temporary files (real {:.1}, predicted {:.1})",
        (moments.samples.spilled_bytes() + predicted.samples.spilled_bytes()) as f64 / 1048576.0,
        moments.samples.spilled_bytes() as f64 / 1048576.0,
        predicted.samples.spilled_bytes() as f64 / 1048576.0
    );

    // DEGs and scores.
    let deg_table = deg_table(options, &store)?;
    let keys = ObsKeys::of(&vocab);
    let scoring = score::Scoring {
        vocab: &vocab,
        keys: &keys,
        genes: &genes,
        options,
        moments: &moments,
        conditions: &plan.conditions,
        control_groups: &plan.control_groups,
        sources: &plan.sources,
        truth: &plan.truth,
        deg_table: deg_table.as_ref(),
        ridge: None,
        feature_ridge: None,
        transfer: None,
        shifts: BTreeMap::new(),
        context: HashMap::new(),
        perturbed: HashMap::new(),
        embeddings: score::host_embeddings(&model),
    };
    let (shifts, context) = scoring.training_shifts();
    let perturbed = scoring.perturbed_cells();
    let scoring = score::Scoring { shifts, context, perturbed, ..scoring };
    let scoring = score::Scoring {
        ridge: scoring.fit_ridge(),
        feature_ridge: scoring.fit_feature_ridge(score::host_features(&model)),
        transfer: scoring.measure_transfer(),
        ..scoring
    };
    let (mut results, deg_rows) = score_conditions(&scoring, &plan, &model, &groups, &predicted)?;
    let transfer = scoring.transfer;
    if real_cap == 0 {
        tracing::warn!(
            "{} label groups x {} genes: too many for samples of {} cells within {} MiB; the energy distance and \
             the Wilcoxon DE metrics are left out",
            groups.len(),
            genes.len(),
            samples::MIN_SAMPLE_CELLS,
            samples::BUDGET_BYTES >> 20
        );
    }
    discriminate(&mut results);
    let mut stages = vec![encoder_stats.report(), moments_stats.report(), decode_stats.planner.report()];
    stages.extend(decode_stats.pool.reports());
    stages.push(decode_stats.predictor.report());
    let report = EvaluateReport {
        model: dir.display().to_string(),
        store: options.store.display().to_string(),
        split: options.split.name().to_owned(),
        definitions: options.definitions,
        predicted: match (options.anchored, count_model, options.expected_log1p) {
            (true, true, _) => "anchored log1p",
            (true, false, _) => "anchored mean",
            (false, true, true) => "expected log1p",
            (false, true, false) => "log1p(mean)",
            (false, false, _) => "mean",
        }
        .to_owned(),
        ensemble: ids
            .into_iter()
            .map(|(d, model_id)| EnsembleMember { model: d.display().to_string(), model_id })
            .collect(),
        summary: outputs::summarize(&results),
        transfer,
        reproducibility: Reproducibility::of(results.iter().map(|c| c.field.change_reproducibility)),
        conditions: results,
        dropped,
        other_store,
        seconds: wall.elapsed().as_secs_f64(),
        report: RunReport { wall: wall.elapsed(), stages, memory: sampler.finish() },
    };
    outputs::write_outputs(&lock, &report, &deg_rows, &vocab, options)?;
    Ok(report)
}

/// An `nb` model's inverse dispersions on the host (`None` for other likelihoods).
fn nb_theta_host(model: &CpaModel) -> Result<Option<Vec<f64>>> {
    let torch = Error::stage(Stage::Predictor);
    let Some(theta) = model.nb_theta().map_err(torch)? else { return Ok(None) };
    let theta = theta
        .f_to_kind(tch::Kind::Double)
        .and_then(|t| t.f_to_device(Device::Cpu))
        .map_err(|e| torch(torch_error(e)))?;
    Ok(Some(
        Vec::<f64>::try_from(&theta.f_flatten(0, -1).map_err(|e| torch(torch_error(e)))?)
            .map_err(|e| torch(torch_error(e)))?,
    ))
}

/// The sample metrics of the condition `key`: its real cells' samples (all its label groups),
/// its covariates' control cells' samples, and the predicted sample (`target` of `predicted`),
/// each at most the cap, read back from the samples' files one condition at a time.
fn sample_metrics(
    plan: &Plan,
    moments: &GroupMoments,
    key: &ConditionKey,
    predicted: &samples::Samples,
    target: usize,
) -> Result<(samples::SampleMetrics, Option<samples::RankSumTests>)> {
    let spill = |source| Error::Io { path: std::env::temp_dir(), source };
    let predicted = predicted.rows(&[target], usize::MAX).map_err(spill)?;
    let gather = |groups: &[usize]| -> std::io::Result<Vec<Vec<f32>>> {
        let cap = groups.iter().map(|&g| moments.samples.len(g)).max().unwrap_or(0).max(predicted.len());
        moments.samples.rows(groups, cap.max(1))
    };
    let real = plan.conditions.get(key).map(|c| gather(&c.groups)).transpose().map_err(spill)?.unwrap_or_default();
    let control =
        plan.control_groups.get(&key.covariates).map(|g| gather(g)).transpose().map_err(spill)?.unwrap_or_default();
    Ok(samples::SampleMetrics::compute_with_tests(&real, &predicted, &control))
}

/// Fills each condition's discrimination ranks: against every condition of the same covariates.
fn discriminate(results: &mut [ConditionMetrics]) {
    let ranks: Vec<Vec<f64>> = {
        let effects: Vec<field::Effects<'_>> = results
            .iter()
            .map(|c| field::Effects {
                group: &c.covariates,
                predicted: &c.effects.predicted,
                real: c.effects.real.as_deref(),
                exclude: c.effects.exclude.clone(),
            })
            .collect();
        field::Distance::ALL.iter().map(|&d| field::discrimination_ranks(&effects, d)).collect()
    };
    let perturbench = |predicted: fn(&Effects) -> &[f64], real: fn(&Effects) -> Option<&[f64]>| {
        let conditions: Vec<field::Ranked<'_>> = results
            .iter()
            .map(|c| field::Ranked { group: &c.covariates, predicted: predicted(&c.effects), real: real(&c.effects) })
            .collect();
        conditions
    };
    let by_logfc = perturbench(|e| &e.predicted_logfc, |e| e.real_logfc.as_deref());
    let rank_cosine_logfc = field::perturbench_ranks(&by_logfc, field::cosine, true);
    // Within a group the control is the same, so the RMSE of the means is that of the changes.
    let by_delta = perturbench(|e| &e.predicted, |e| e.real.as_deref());
    let rank_rmse = field::perturbench_ranks(&by_delta, |a, b| field::mse(a, b).sqrt(), false);
    for (i, c) in results.iter_mut().enumerate() {
        c.field.discrimination = field::Distance::ALL.iter().zip(&ranks).map(|(d, r)| (d.name(), r[i])).collect();
        c.field.rank_cosine_logfc = rank_cosine_logfc[i];
        c.field.rank_rmse = rank_rmse[i];
    }
    let accuracy = centroid_accuracy(results);
    for (c, a) in results.iter_mut().zip(accuracy) {
        c.field.centroid_accuracy = a;
    }
}

/// Systema's centroid accuracy of each condition ([`FieldMetrics::centroid_accuracy`]).
fn centroid_accuracy(results: &[ConditionMetrics]) -> Vec<f64> {
    let conditions: Vec<Centred<'_>> = results
        .iter()
        .map(|c| Centred {
            group: &c.covariates,
            predicted: &c.effects.predicted,
            real: c.effects.real.as_deref(),
            centroid: c.effects.centroid.as_deref(),
            exclude: &c.effects.exclude,
        })
        .collect();
    centroid_hits(&conditions)
}

/// A condition's changes from the control and its covariates' perturbed centroid (minus the
/// control), as [`centroid_hits`] takes them.
struct Centred<'a> {
    group: &'a [String],
    predicted: &'a [f64],
    real: Option<&'a [f64]>,
    centroid: Option<&'a [f64]>,
    exclude: &'a [usize],
}

/// Per condition, 1 when its own real change from the centroid is the nearest by cosine to its
/// predicted one among the conditions of its group with real cells, 0 when another is, NaN
/// alone, without real cells or without a centroid.
fn centroid_hits(conditions: &[Centred<'_>]) -> Vec<f64> {
    let from = |v: &[f64], o: &[f64]| -> Vec<f64> { v.iter().zip(o).map(|(a, b)| a - b).collect() };
    let centred: Vec<(Vec<f64>, Option<Vec<f64>>)> = conditions
        .iter()
        .map(|c| match c.centroid {
            Some(o) => (from(c.predicted, o), c.real.map(|r| from(r, o))),
            None => (c.predicted.to_vec(), None),
        })
        .collect();
    let effects: Vec<field::Effects<'_>> = conditions
        .iter()
        .zip(&centred)
        .map(|(c, (predicted, real))| field::Effects {
            group: c.group,
            predicted,
            real: real.as_deref(),
            exclude: c.exclude.to_vec(),
        })
        .collect();
    field::discrimination_ranks(&effects, field::Distance::Cosine)
        .into_iter()
        .map(|rank| if rank.is_nan() { f64::NAN } else { f64::from(u8::from(rank == 0.0)) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centroid_accuracy_tells_conditions_apart_by_their_changes_from_the_perturbed_centroid() {
        // Two perturbations sharing a large change from the control (+5 on gene 0) and each its
        // own (+1 on gene 1, +1 on gene 2). From the control, every prediction points along gene
        // 0 and cosine hardly tells them apart; from the perturbed centroid (5, 0.5, 0.5) only
        // the own change is left.
        let group = vec!["K562".to_owned()];
        let (a_real, b_real) = ([5.0, 1.0, 0.0], [5.0, 0.0, 1.0]);
        let centroid = [5.0, 0.5, 0.5];
        let (a_pred, b_pred) = ([5.0, 0.6, 0.4], [5.0, 0.7, 0.3]);
        let conditions = [
            Centred { group: &group, predicted: &a_pred, real: Some(&a_real), centroid: Some(&centroid), exclude: &[] },
            Centred { group: &group, predicted: &b_pred, real: Some(&b_real), centroid: Some(&centroid), exclude: &[] },
        ];
        // a's prediction leans to gene 1 (its own), b's too: a is a hit, b a miss.
        assert_eq!(centroid_hits(&conditions), vec![1.0, 0.0]);
        // Without a centroid, or alone in its group: NaN.
        let alone = [Centred { group: &group, predicted: &a_pred, real: Some(&a_real), centroid: None, exclude: &[] }];
        assert!(centroid_hits(&alone)[0].is_nan());
    }

    #[test]
    fn reproducibility_counts_the_changes_under_the_noise_level_and_takes_the_median() {
        let r = Reproducibility::of([0.8, f64::NAN, 0.02, -0.1, 0.5]).unwrap_or_else(|| panic!("defined"));
        assert_eq!((r.conditions, r.not_reproduced), (4, 2));
        assert!((r.median_r - 0.26).abs() < 1e-12, "{}", r.median_r);
        let odd = Reproducibility::of([0.3, 0.05, 0.9]).unwrap_or_else(|| panic!("defined"));
        assert_eq!((odd.conditions, odd.not_reproduced, odd.median_r), (3, 1, 0.3));
        assert_eq!(Reproducibility::of([f64::NAN]), None);
    }
}
