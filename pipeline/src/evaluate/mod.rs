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
//! per-group, per-split sums and sums of squares of every gene (memory: groups x genes, not
//! cells), one decoding the control cells into their covariates' conditions.

pub mod plot;
pub mod stats;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Float32Type, Schema};
use cpa_stream_schemas::tables::truth;
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::h5ad::{DEG_FILE, DEG_GENE, DEG_GROUP, DEG_RANK, DEG_SCORE};
use cpa_stream_stages::model::batch::{DevicePerts, densify};
use cpa_stream_stages::model::layers::Noise;
use cpa_stream_stages::model::vocab::{CONTROL_ID, split_condition};
use cpa_stream_stages::model::{CpaModel, Vocabulary, load_model_for, read_model_file};
use cpa_stream_stages::store::{Store, read_small_table, write_table};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::metrics::{MemorySampler, RunReport, StageStats};
use crate::predict::targets::Target;
use crate::predict::{ObsKeys, deg_keys, model_dir, read_deg_lists};
use crate::progress::Progress;
use crate::train::encoder::{CellLabels, EncoderOptions, Split, gene_names};
use stats::{Moments, r2_score, top_by_abs, welch_t};

/// Top-k DEG sets every condition is scored on.
pub const TOP_K: [usize; 3] = [10, 20, 50];

/// Which cells are evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSplit {
    One(Split),
    /// Every cell, whatever its split.
    All,
}

impl EvalSplit {
    pub fn parse(text: &str) -> Result<EvalSplit> {
        Ok(match text {
            "train" => EvalSplit::One(Split::Train),
            "valid" | "validation" => EvalSplit::One(Split::Valid),
            "test" => EvalSplit::One(Split::Test),
            "ood" => EvalSplit::One(Split::Ood),
            "all" => EvalSplit::All,
            _ => return Err(Error::InvalidInput(format!("--split {text:?}: expected train, valid, test, ood or all"))),
        })
    }

    fn contains(self, split: Split) -> bool {
        match self {
            EvalSplit::All => true,
            EvalSplit::One(s) => s == split,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EvalSplit::All => "all",
            EvalSplit::One(s) => s.name(),
        }
    }
}

/// What `cpa-stream evaluate` does.
#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    pub model: PathBuf,
    pub store: PathBuf,
    pub split: EvalSplit,
    /// A synthetic atlas's `truth.parquet` (default: the store's, when it has one).
    pub truth: Option<PathBuf>,
    /// DEG table (`group`, `rank`, `gene`) instead of the store's or computed ones.
    pub degs: Option<PathBuf>,
    pub out: PathBuf,
    pub device: Device,
    pub batch_size: usize,
    /// Conditions with fewer evaluated cells are skipped (unless scored against the truth).
    pub min_cells: u64,
    /// Write one SVG plot per condition.
    pub plots: bool,
}

impl EvaluateOptions {
    pub fn new(model: impl Into<PathBuf>, store: impl Into<PathBuf>, out: impl Into<PathBuf>) -> EvaluateOptions {
        EvaluateOptions {
            model: model.into(),
            store: store.into(),
            split: EvalSplit::One(Split::Test),
            truth: None,
            degs: None,
            out: out.into(),
            device: Device::Cpu,
            batch_size: 1024,
            min_cells: 5,
            plots: true,
        }
    }
}

/// A condition's key: covariate codes and the sorted (perturbation id, dose bits) parts.
type ConditionKey = (Vec<u32>, Vec<(u32, u32)>);

fn key_of(covariates: &[u32], parts: &[(u32, f32)]) -> ConditionKey {
    let mut p: Vec<(u32, u32)> = parts.iter().map(|&(id, d)| (id, d.to_bits())).collect();
    p.sort_unstable();
    (covariates.to_vec(), p)
}

/// One evaluated condition's figures (NaN where not computable).
#[derive(Debug, Clone, Serialize)]
pub struct ConditionMetrics {
    pub covariates: Vec<String>,
    pub condition: String,
    pub dose: String,
    /// Real cells of the condition in the evaluated split.
    pub n_cells: u64,
    /// Control cells decoded into it.
    pub n_control: u64,
    /// Which control cells were decoded: the evaluated split's, every held-out split's, or all.
    pub control_source: String,
    /// Where the DEGs came from: `store`, `file`, `computed` (Welch t) or `truth`.
    pub deg_source: String,
    pub r2_mean: f64,
    pub r2_var: f64,
    pub r2_delta: f64,
    /// The control mean as the prediction (the baseline to beat).
    pub r2_mean_control: f64,
    /// `r2_mean_top{k}`, `r2_var_top{k}`, `r2_delta_top{k}` for k in [`TOP_K`].
    pub top: Vec<TopMetrics>,
    pub truth: Option<TruthMetrics>,
    /// Top-k DEG names (the largest k) and the predicted / real / control means there (plots).
    #[serde(skip)]
    pub plot: PlotData,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct TopMetrics {
    pub k: usize,
    pub r2_mean: f64,
    pub r2_var: f64,
    pub r2_delta: f64,
    pub r2_mean_control: f64,
}

/// Scores against a synthetic atlas's true means (`mean_log1p`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TruthMetrics {
    pub r2_mean: f64,
    pub r2_delta: f64,
    pub r2_mean_control: f64,
    pub r2_mean_top20: f64,
    pub r2_mean_control_top20: f64,
}

#[derive(Debug, Clone, Default)]
pub struct PlotData {
    pub genes: Vec<String>,
    pub predicted: Vec<f64>,
    pub real: Vec<f64>,
    pub control: Vec<f64>,
}

/// Everything an evaluation produced.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluateReport {
    pub model: String,
    pub store: String,
    pub split: String,
    pub conditions: Vec<ConditionMetrics>,
    /// Mean of each metric over the conditions where it is defined.
    pub summary: BTreeMap<String, f64>,
    pub seconds: f64,
    pub report: RunReport,
}

/// Per-(group, split) moments of every gene, from one pass over the store.
struct GroupMoments {
    genes: usize,
    moments: Vec<Moments>,
}

impl GroupMoments {
    fn slot(group: usize, split: Split) -> usize {
        group * 4 + split as usize
    }

    /// Moments of `group` over the splits `splits` accepts.
    fn of(&self, group: usize, splits: impl Fn(Split) -> bool) -> Moments {
        let mut out = Moments::new(self.genes);
        for split in [Split::Train, Split::Valid, Split::Test, Split::Ood] {
            if splits(split) {
                out.merge(&self.moments[Self::slot(group, split)]);
            }
        }
        out
    }
}

/// Evaluates a model on a store.
pub fn run_evaluate(options: &EvaluateOptions, progress: &dyn Progress) -> Result<EvaluateReport> {
    let wall = Instant::now();
    let sampler = MemorySampler::start();
    let stage = |stage: &'static str| move |source| Error::Stage { stage, source };
    let dir = model_dir(&options.model)?;
    let file = read_model_file(&dir).map_err(stage("evaluate"))?;
    let store = Store::open(&options.store).map_err(stage("reader"))?;
    let genes = gene_names(&store)?;
    let model = load_model_for(&dir, &genes, &options.store.display().to_string(), options.device)
        .map_err(stage("evaluate"))?;
    let vocab = model.vocabulary().clone();
    let keys = ObsKeys::of(&vocab);
    let data = vocab.data.clone().ok_or_else(|| {
        Error::InvalidInput(format!(
            "{}: the model records no obs keys or split (train it with cpa-stream train)",
            dir.display()
        ))
    })?;
    let batch_key = vocab.covariates.iter().find(|c| c.is_batch).map(|c| c.name.clone());
    let encoder = EncoderOptions {
        perturbation_key: data.perturbation_key.clone(),
        dose_key: data.dose_key.clone(),
        control: vocab.control().to_owned(),
        covariate_keys: vocab.covariates.iter().filter(|c| !c.is_batch).map(|c| c.name.clone()).collect(),
        batch_key,
        split: data.split.clone(),
        max_comb_len: file.config.model.max_comb_len,
    };
    let labels_stats = StageStats::new("encoder", 1);
    let labels = labels_stats.busy(|| CellLabels::from_store(&store, &encoder))?;
    labels_stats.add(labels.n_cells(), labels.heap_bytes() as u64);
    let groups = map_groups(&labels, &vocab);
    let n_genes = genes.len();
    let count_model = model.config().model.recon_loss.is_count();

    // Pass 1: moments of every group and split.
    let moments_stats = StageStats::new("moments", 1);
    progress.begin("evaluate: statistics", store.n_obs());
    let moments = moments_stats.busy(|| group_moments(&store, &labels, n_genes, count_model, progress))?;
    moments_stats.add(store.n_obs(), store.nnz() * 8);
    progress.end();

    // Conditions to evaluate.
    let truth_path = options.truth.clone().or_else(|| {
        let p = store.file_path(cpa_stream_schemas::StoreFiles::TRUTH);
        p.exists().then_some(p)
    });
    let truth_rows = truth_path.as_deref().map(|p| read_truth(p, &vocab)).transpose()?.unwrap_or_default();
    let mut conditions: BTreeMap<ConditionKey, Condition> = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        let Some(group) = group else { continue };
        if group.is_control {
            continue;
        }
        let c = conditions.entry(group.key.clone()).or_insert_with(|| Condition::new(group));
        c.groups.push(g);
    }
    for (key, t) in &truth_rows {
        if key.1.iter().all(|&(id, _)| id as usize == CONTROL_ID) {
            continue;
        }
        let c = conditions.entry(key.clone()).or_insert_with(|| Condition {
            covariates: key.0.clone(),
            parts: key.1.iter().map(|&(id, d)| (id, f32::from_bits(d))).collect(),
            condition: t.condition.clone(),
            dose: t.dose.clone(),
            groups: Vec::new(),
        });
        c.condition.clone_from(&t.condition);
    }
    let splits_eval = |s: Split| options.split.contains(s);
    let mut evaluated = Vec::new();
    for (key, c) in &conditions {
        let mut real = Moments::new(n_genes);
        for &g in &c.groups {
            real.merge(&moments.of(g, splits_eval));
        }
        let has_truth = truth_rows.contains_key(key);
        if real.n >= options.min_cells as f64 || has_truth {
            evaluated.push((key.clone(), real));
        }
    }

    // Control cells per covariate combination: the evaluated split's, else every held-out
    // split's, else all.
    let control_groups: HashMap<Vec<u32>, Vec<usize>> =
        groups.iter().enumerate().fold(HashMap::new(), |mut m, (g, grp)| {
            if let Some(grp) = grp
                && grp.is_control
            {
                m.entry(grp.key.0.clone()).or_default().push(g);
            }
            m
        });
    let mut sources: HashMap<Vec<u32>, (SourceSplits, Moments)> = HashMap::new();
    for (key, _) in &evaluated {
        if sources.contains_key(&key.0) {
            continue;
        }
        let groups_c = control_groups.get(&key.0).cloned().unwrap_or_default();
        let pick = |choice: SourceSplits| {
            let mut m = Moments::new(n_genes);
            for &g in &groups_c {
                m.merge(&moments.of(g, |s| choice.contains(options.split, s)));
            }
            m
        };
        let mut chosen = None;
        for choice in [SourceSplits::Evaluated, SourceSplits::HeldOut, SourceSplits::All] {
            let m = pick(choice);
            if m.n >= options.min_cells.max(1) as f64 {
                chosen = Some((choice, m));
                break;
            }
        }
        if let Some(c) = chosen {
            sources.insert(key.0.clone(), c);
        }
    }
    evaluated.retain(|(key, _)| sources.contains_key(&key.0));

    // Pass 2: decode the control cells into every condition of their covariates.
    let predict_stats = StageStats::new("predictor", 1);
    let targets: Vec<(ConditionKey, Target)> = evaluated
        .iter()
        .map(|(key, _)| {
            let c = &conditions[key];
            (
                key.clone(),
                Target {
                    condition: c.condition.clone(),
                    dose: c.dose.clone(),
                    parts: c.parts.clone(),
                    covariates: c.covariates.iter().map(|&v| Some(v)).collect(),
                },
            )
        })
        .collect();
    let source_of_group: Vec<Option<(Vec<u32>, SourceSplits)>> = groups
        .iter()
        .map(|g| {
            g.as_ref().filter(|g| g.is_control).and_then(|g| sources.get(&g.key.0).map(|(s, _)| (g.key.0.clone(), *s)))
        })
        .collect();
    progress.begin("evaluate: counterfactuals", store.n_obs());
    let predicted = predict_stats.busy(|| {
        decode_controls(&model, &store, &labels, &source_of_group, &targets, options, count_model, progress)
    })?;
    progress.end();
    predict_stats.add(predicted.values().map(|m| m.n as u64).sum(), 0);

    // DEGs.
    let deg_table = match &options.degs {
        Some(p) => Some((read_deg_lists(p)?, "file")),
        None => {
            let p = store.file_path(DEG_FILE);
            if p.exists() { Some((read_deg_lists(&p)?, "store")) } else { None }
        }
    };
    let mut all_controls: HashMap<Vec<u32>, Moments> = HashMap::new();
    let mut results = Vec::new();
    let mut deg_rows: Vec<(String, usize, String, f64)> = Vec::new();
    for ((key, real), (_, target)) in evaluated.iter().zip(&targets) {
        let (choice, control) = &sources[&key.0];
        let Some(pred) = predicted.get(key) else { continue };
        let truth = truth_rows.get(key);
        let control_all = all_controls.entry(key.0.clone()).or_insert_with(|| {
            let mut m = Moments::new(n_genes);
            for &g in control_groups.get(&key.0).map(Vec::as_slice).unwrap_or(&[]) {
                m.merge(&moments.of(g, |_| true));
            }
            m
        });
        let cond = &conditions[key];
        let mut treated_all = Moments::new(n_genes);
        for &g in &cond.groups {
            treated_all.merge(&moments.of(g, |_| true));
        }
        let ctrl_mean = control.mean();
        // DEGs: a table's list, else a Welch t-test over all cells, else the truth's change.
        let listed = deg_table.as_ref().and_then(|(lists, source)| {
            deg_keys(target, &vocab, &keys).into_iter().find_map(|k| lists.get(&k)).map(|l| (l, *source))
        });
        let (ranked, deg_source): (Vec<usize>, &str) = match listed {
            Some((list, source)) => {
                let position: HashMap<&str, usize> = genes.iter().enumerate().map(|(i, g)| (g.as_str(), i)).collect();
                (list.iter().filter_map(|g| position.get(g.as_str()).copied()).collect(), source)
            }
            None if treated_all.n >= 2.0 && control_all.n >= 2.0 => {
                let scores = welch_t(&treated_all, control_all);
                (top_by_abs(&scores, n_genes), "computed")
            }
            None => match truth {
                Some(t) => {
                    let change: Vec<f64> = t.mean_log1p.iter().zip(&ctrl_mean).map(|(a, b)| a - b).collect();
                    (top_by_abs(&change, n_genes), "truth")
                }
                None => (Vec::new(), "none"),
            },
        };
        let group_name = deg_keys(target, &vocab, &keys).into_iter().next().unwrap_or_default();
        let scores_for_table = if deg_source == "computed" { Some(welch_t(&treated_all, control_all)) } else { None };
        for (rank, &g) in ranked.iter().take(TOP_K[TOP_K.len() - 1]).enumerate() {
            let score = scores_for_table.as_ref().map_or(f64::NAN, |s| s[g]);
            deg_rows.push((group_name.clone(), rank, genes[g].clone(), score));
        }
        let (pred_mean, pred_var) = (pred.mean(), pred.var());
        let (real_mean, real_var) = (real.mean(), real.var());
        let has_real = real.n >= 1.0;
        let delta = |v: &[f64]| -> Vec<f64> { v.iter().zip(&ctrl_mean).map(|(a, b)| a - b).collect() };
        let r2_on = |p: &[f64], t: &[f64], idx: Option<&[usize]>| -> f64 {
            match idx {
                None => r2_score(p, t),
                Some(idx) => {
                    let (p, t): (Vec<f64>, Vec<f64>) = idx.iter().map(|&i| (p[i], t[i])).unzip();
                    r2_score(&p, &t)
                }
            }
        };
        let nan_unless = |ok: bool, v: f64| if ok { v } else { f64::NAN };
        let (pd, rd) = (delta(&pred_mean), delta(&real_mean));
        let top = TOP_K
            .iter()
            .map(|&k| {
                let idx = (ranked.len() >= k).then(|| &ranked[..k]);
                let score = |p: &[f64], t: &[f64]| idx.map_or(f64::NAN, |i| r2_on(p, t, Some(i)));
                TopMetrics {
                    k,
                    r2_mean: nan_unless(has_real, score(&pred_mean, &real_mean)),
                    r2_var: nan_unless(real.n >= 2.0, score(&pred_var, &real_var)),
                    r2_delta: nan_unless(has_real, score(&pd, &rd)),
                    r2_mean_control: nan_unless(has_real, score(&ctrl_mean, &real_mean)),
                }
            })
            .collect();
        let truth_metrics = truth.map(|t| {
            let td = delta(&t.mean_log1p);
            let top20 = (ranked.len() >= 20).then(|| &ranked[..20]);
            TruthMetrics {
                r2_mean: r2_score(&pred_mean, &t.mean_log1p),
                r2_delta: r2_score(&pd, &td),
                r2_mean_control: r2_score(&ctrl_mean, &t.mean_log1p),
                r2_mean_top20: top20.map_or(f64::NAN, |i| r2_on(&pred_mean, &t.mean_log1p, Some(i))),
                r2_mean_control_top20: top20.map_or(f64::NAN, |i| r2_on(&ctrl_mean, &t.mean_log1p, Some(i))),
            }
        });
        let plot_genes: Vec<usize> = ranked.iter().take(TOP_K[TOP_K.len() - 1]).copied().collect();
        let reference = if has_real { &real_mean } else { truth.map_or(&real_mean, |t| &t.mean_log1p) };
        results.push(ConditionMetrics {
            covariates: key
                .0
                .iter()
                .zip(&vocab.covariates)
                .map(|(&c, cov)| cov.categories[c as usize].clone())
                .collect(),
            condition: target.condition.clone(),
            dose: target.dose.clone(),
            n_cells: real.n as u64,
            n_control: control.n as u64,
            control_source: choice.name(options.split).to_owned(),
            deg_source: deg_source.to_owned(),
            r2_mean: nan_unless(has_real, r2_on(&pred_mean, &real_mean, None)),
            r2_var: nan_unless(real.n >= 2.0, r2_on(&pred_var, &real_var, None)),
            r2_delta: nan_unless(has_real, r2_on(&pd, &rd, None)),
            r2_mean_control: nan_unless(has_real, r2_on(&ctrl_mean, &real_mean, None)),
            top,
            truth: truth_metrics,
            plot: PlotData {
                genes: plot_genes.iter().map(|&g| genes[g].clone()).collect(),
                predicted: plot_genes.iter().map(|&g| pred_mean[g]).collect(),
                real: plot_genes.iter().map(|&g| reference[g]).collect(),
                control: plot_genes.iter().map(|&g| ctrl_mean[g]).collect(),
            },
        });
    }
    let summary = summarize(&results);
    let report = EvaluateReport {
        model: dir.display().to_string(),
        store: options.store.display().to_string(),
        split: options.split.name().to_owned(),
        conditions: results,
        summary,
        seconds: wall.elapsed().as_secs_f64(),
        report: RunReport {
            wall: wall.elapsed(),
            stages: vec![labels_stats.report(), moments_stats.report(), predict_stats.report()],
            memory: sampler.finish(),
        },
    };
    write_outputs(&report, &deg_rows, &vocab, options)?;
    Ok(report)
}

/// A condition's labels and the label groups (same condition in other part orders) it covers.
#[derive(Debug, Clone)]
struct Condition {
    covariates: Vec<u32>,
    parts: Vec<(u32, f32)>,
    condition: String,
    dose: String,
    groups: Vec<usize>,
}

impl Condition {
    fn new(group: &MappedGroup) -> Condition {
        Condition {
            covariates: group.key.0.clone(),
            parts: group.parts.clone(),
            condition: group.condition.clone(),
            dose: group.dose.clone(),
            groups: Vec::new(),
        }
    }
}

/// A label group of the store in the model's vocabulary (`None`: it uses a perturbation or
/// covariate value the model does not know).
#[derive(Debug, Clone)]
struct MappedGroup {
    key: ConditionKey,
    parts: Vec<(u32, f32)>,
    condition: String,
    dose: String,
    is_control: bool,
}

fn map_groups(labels: &CellLabels, vocab: &Vocabulary) -> Vec<Option<MappedGroup>> {
    let index = vocab.perturbation_index();
    let own = &labels.vocab;
    labels
        .groups()
        .iter()
        .map(|g| {
            let parts: Option<Vec<(u32, f32)>> = g
                .parts
                .iter()
                .map(|&(id, d)| index.get(own.perturbations.get(id as usize)?.as_str()).map(|&m| (m, d)))
                .collect();
            let parts = parts?;
            let covariates: Option<Vec<u32>> = g
                .covariates
                .iter()
                .zip(own.covariates.iter().zip(&vocab.covariates))
                .map(|(&c, (mine, theirs))| {
                    let value = mine.categories.get(c as usize)?;
                    theirs.categories.iter().position(|v| v == value).map(|p| p as u32)
                })
                .collect();
            let covariates = covariates?;
            let names: Vec<&str> = g.parts.iter().map(|&(id, _)| own.perturbations[id as usize].as_str()).collect();
            let doses: Vec<String> = g.parts.iter().map(|&(_, d)| format_dose(d)).collect();
            Some(MappedGroup {
                key: key_of(&covariates, &parts),
                is_control: parts.iter().all(|&(id, _)| id as usize == CONTROL_ID),
                parts,
                condition: names.join("+"),
                dose: doses.join("+"),
            })
        })
        .collect()
}

fn format_dose(d: f32) -> String {
    let s = format!("{d}");
    s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
}

/// Which control cells are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceSplits {
    Evaluated,
    HeldOut,
    All,
}

impl SourceSplits {
    fn contains(self, evaluated: EvalSplit, split: Split) -> bool {
        match self {
            SourceSplits::Evaluated => evaluated.contains(split),
            SourceSplits::HeldOut => split != Split::Train,
            SourceSplits::All => true,
        }
    }

    fn name(self, evaluated: EvalSplit) -> &'static str {
        match self {
            SourceSplits::Evaluated => evaluated.name(),
            SourceSplits::HeldOut => "held-out",
            SourceSplits::All => "all",
        }
    }
}

/// Pass 1: per (group, split) moments of `log1p(x)` (count models) or `x`, in store order.
fn group_moments(
    store: &Store,
    labels: &CellLabels,
    genes: usize,
    count_model: bool,
    progress: &dyn Progress,
) -> Result<GroupMoments> {
    let mut moments: Vec<Moments> = (0..labels.groups().len() * 4).map(|_| Moments::new(genes)).collect();
    let mut cursor = store.cursor().map_err(|source| Error::Stage { stage: "reader", source })?;
    let mut batch = CsrBatch::new(genes as u32);
    let chunk = 4096u64;
    let mut start = 0u64;
    while start < store.n_obs() {
        let end = (start + chunk).min(store.n_obs());
        batch.clear();
        cursor.read_range(start..end, &mut batch).map_err(|source| Error::Stage { stage: "reader", source })?;
        for (i, cell) in (start..end).enumerate() {
            let group = labels.group_id(cell) as usize;
            let slot = GroupMoments::slot(group, labels.split(cell));
            let (idx, val) = batch.row(i);
            moments[slot].add_sparse(idx, val, count_model);
        }
        store.release(start..end);
        progress.advance(end - start);
        start = end;
    }
    Ok(GroupMoments { genes, moments })
}

/// Pass 2: decodes every source control cell into each target of its covariates; the moments
/// of the predicted `log1p(mean)` per target.
#[allow(clippy::too_many_arguments)] // the evaluation's state, passed once
fn decode_controls(
    model: &CpaModel,
    store: &Store,
    labels: &CellLabels,
    source_of_group: &[Option<(Vec<u32>, SourceSplits)>],
    targets: &[(ConditionKey, Target)],
    options: &EvaluateOptions,
    count_model: bool,
    progress: &dyn Progress,
) -> Result<HashMap<ConditionKey, Moments>> {
    let torch = |source| Error::Stage { stage: "predictor", source };
    let device = model.device();
    let genes = model.vocabulary().n_genes();
    let mut by_covariates: HashMap<Vec<u32>, Vec<usize>> = HashMap::new();
    for (i, (key, _)) in targets.iter().enumerate() {
        by_covariates.entry(key.0.clone()).or_default().push(i);
    }
    let mut sums: Vec<Option<(Tensor, Tensor)>> = (0..targets.len()).map(|_| None).collect();
    let mut counts = vec![0u64; targets.len()];
    let mut pending: HashMap<Vec<u32>, Vec<u64>> = HashMap::new();
    let mut cursor = store.cursor().map_err(|source| Error::Stage { stage: "reader", source })?;
    let mut noise = Noise::new(Xoshiro256PlusPlus::seed_from_u64(0), device);
    let mut counts_batch = CsrBatch::new(genes as u32);
    let batch_size = options.batch_size.max(1);
    let mut run = |covs: &Vec<u32>, rows: &[u64], cursor: &mut cpa_stream_stages::store::RowCursor<'_>| -> Result<()> {
        counts_batch.clear();
        cursor.gather(rows, &mut counts_batch).map_err(|source| Error::Stage { stage: "reader", source })?;
        let n = rows.len() as i64;
        let work = || -> cpa_stream_stages::Result<()> {
            let x = densify(&counts_batch, device)?;
            for &t in by_covariates.get(covs).map(Vec::as_slice).unwrap_or(&[]) {
                let target = &targets[t].1;
                let mut parts = target.parts.clone();
                parts.sort_by_key(|p| p.0);
                let k = parts.len() as i64;
                let ids: Vec<i64> = (0..n).flat_map(|_| parts.iter().map(|p| i64::from(p.0))).collect();
                let doses: Vec<f32> = (0..n).flat_map(|_| parts.iter().map(|p| p.1)).collect();
                let offsets: Vec<i64> = (0..=n).map(|i| i * k).collect();
                let to = |t: Tensor| -> cpa_stream_stages::Result<Tensor> { Ok(t.f_to_device(device)?) };
                let perts = DevicePerts {
                    ids: to(Tensor::f_from_slice(&ids)?)?,
                    offsets: to(Tensor::f_from_slice(&offsets)?)?,
                    doses: to(Tensor::f_from_slice(&doses)?)?,
                };
                let covariates = covs
                    .iter()
                    .map(|&c| to(Tensor::f_full([n], i64::from(c), (Kind::Int64, Device::Cpu))?))
                    .collect::<cpa_stream_stages::Result<Vec<_>>>()?;
                let mean = model.counterfactual(&x, &perts, &covariates, &mut noise)?.f_to_kind(Kind::Double)?;
                let v = if count_model { mean.f_log1p()? } else { mean };
                let (s, q) = (
                    v.f_sum_dim_intlist(0, false, Kind::Double)?,
                    v.f_square()?.f_sum_dim_intlist(0, false, Kind::Double)?,
                );
                sums[t] = Some(match sums[t].take() {
                    None => (s, q),
                    Some((a, b)) => (a.f_add(&s)?, b.f_add(&q)?),
                });
                counts[t] += n as u64;
            }
            Ok(())
        };
        tch::no_grad(work).map_err(torch)
    };
    let chunk = 4096u64;
    let mut start = 0u64;
    while start < store.n_obs() {
        let end = (start + chunk).min(store.n_obs());
        for cell in start..end {
            let Some((covs, choice)) = &source_of_group[labels.group_id(cell) as usize] else { continue };
            if !choice.contains(options.split, labels.split(cell)) {
                continue;
            }
            let rows = pending.entry(covs.clone()).or_default();
            rows.push(cell);
            if rows.len() == batch_size {
                let rows = std::mem::take(rows);
                run(covs, &rows, &mut cursor)?;
            }
        }
        progress.advance(end - start);
        start = end;
    }
    for (covs, rows) in pending {
        if !rows.is_empty() {
            run(&covs, &rows, &mut cursor)?;
        }
    }
    let mut out = HashMap::new();
    for (t, (key, _)) in targets.iter().enumerate() {
        let Some((s, q)) = sums[t].take() else { continue };
        let host = |t: &Tensor| -> Result<Vec<f64>> {
            let t = t.f_to_device(Device::Cpu).map_err(|e| torch(e.into()))?;
            Vec::<f64>::try_from(&t).map_err(|e| torch(e.into()))
        };
        out.insert(key.clone(), Moments::from_sums(counts[t] as f64, host(&s)?, host(&q)?));
    }
    Ok(out)
}

/// A truth table row: labels as written and the true `E[log1p x]` per gene.
#[derive(Debug, Clone)]
struct TruthRow {
    condition: String,
    dose: String,
    mean_log1p: Vec<f64>,
}

/// Reads `truth.parquet`; rows whose labels the model does not know are skipped.
fn read_truth(path: &Path, vocab: &Vocabulary) -> Result<HashMap<ConditionKey, TruthRow>> {
    let origin = path.display().to_string();
    let table = read_small_table(path).map_err(|source| Error::Stage { stage: "truth", source })?;
    let text = |name: &str| crate::train::encoder::column_strings(&table, name, &origin);
    let (conditions, doses) = (text(truth::CONDITION)?, text(truth::DOSE)?);
    let covariates = vocab
        .covariates
        .iter()
        .map(|c| {
            text(&c.name)
                .map_err(|_| Error::InvalidInput(format!("{origin}: no column {:?} for the model's covariate", c.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let means = table
        .column_by_name(truth::MEAN_LOG1P)
        .and_then(|c| c.as_fixed_size_list_opt())
        .ok_or_else(|| Error::InvalidInput(format!("{origin}: no FixedSizeList column {:?}", truth::MEAN_LOG1P)))?;
    let width = means.value_length() as usize;
    if width != vocab.n_genes() {
        return Err(Error::InvalidInput(format!("{origin}: {width} genes per row, the model has {}", vocab.n_genes())));
    }
    let values = means
        .values()
        .as_primitive_opt::<Float32Type>()
        .ok_or_else(|| Error::InvalidInput(format!("{origin}: {} is not Float32", truth::MEAN_LOG1P)))?;
    let index = vocab.perturbation_index();
    let mut out = HashMap::new();
    for row in 0..table.num_rows() {
        let (Some(condition), Some(dose)) = (conditions.get(row), doses.get(row)) else { continue };
        let Ok(parts) = split_condition(condition, Some(dose), usize::MAX) else { continue };
        let Some(parts) = parts.iter().map(|&(n, d)| index.get(n).map(|&id| (id, d))).collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let covs: Option<Vec<u32>> = covariates
            .iter()
            .zip(&vocab.covariates)
            .map(|(col, cov)| col.get(row).and_then(|v| cov.categories.iter().position(|c| c == v)).map(|p| p as u32))
            .collect();
        let Some(covs) = covs else { continue };
        let start = row * width;
        let mean_log1p = (start..start + width).map(|i| f64::from(values.value(i))).collect();
        out.insert(
            key_of(&covs, &parts),
            TruthRow { condition: condition.to_owned(), dose: dose.to_owned(), mean_log1p },
        );
    }
    Ok(out)
}

fn metric_columns(c: &ConditionMetrics) -> Vec<(String, f64)> {
    let mut out = vec![
        ("r2_mean".to_owned(), c.r2_mean),
        ("r2_var".to_owned(), c.r2_var),
        ("r2_delta".to_owned(), c.r2_delta),
        ("r2_mean_control".to_owned(), c.r2_mean_control),
    ];
    for t in &c.top {
        out.push((format!("r2_mean_top{}", t.k), t.r2_mean));
        out.push((format!("r2_var_top{}", t.k), t.r2_var));
        out.push((format!("r2_delta_top{}", t.k), t.r2_delta));
        out.push((format!("r2_mean_control_top{}", t.k), t.r2_mean_control));
    }
    let truth = c.truth;
    let t = |f: fn(&TruthMetrics) -> f64| truth.as_ref().map_or(f64::NAN, f);
    out.push(("truth_r2_mean".to_owned(), t(|t| t.r2_mean)));
    out.push(("truth_r2_delta".to_owned(), t(|t| t.r2_delta)));
    out.push(("truth_r2_mean_control".to_owned(), t(|t| t.r2_mean_control)));
    out.push(("truth_r2_mean_top20".to_owned(), t(|t| t.r2_mean_top20)));
    out.push(("truth_r2_mean_control_top20".to_owned(), t(|t| t.r2_mean_control_top20)));
    out
}

fn summarize(conditions: &[ConditionMetrics]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for c in conditions {
        for (name, v) in metric_columns(c) {
            let e = sums.entry(name).or_default();
            if v.is_finite() {
                e.0 += v;
                e.1 += 1;
            }
        }
    }
    sums.into_iter().map(|(k, (s, n))| (k, if n == 0 { f64::NAN } else { s / n as f64 })).collect()
}

/// `eval/metrics.parquet`, `eval/summary.json`, `eval/degs.parquet` and `eval/plots/*.svg`.
fn write_outputs(
    report: &EvaluateReport,
    deg_rows: &[(String, usize, String, f64)],
    vocab: &Vocabulary,
    options: &EvaluateOptions,
) -> Result<()> {
    let out = &options.out;
    let io = |p: &Path, e: std::io::Error| Error::InvalidInput(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let stage = |source| Error::Stage { stage: "evaluate", source };
    let arrow_err = |e: arrow::error::ArrowError| Error::InvalidInput(format!("evaluation table: {e}"));

    // metrics.parquet: labels, counts, sources, then every metric.
    let rows = &report.conditions;
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (i, cov) in vocab.covariates.iter().enumerate() {
        fields.push(Field::new(&cov.name, DataType::Utf8, false));
        columns.push(Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.covariates[i].as_str()))));
    }
    let keys = ObsKeys::of(vocab);
    let text_cols: Vec<(&str, Vec<&str>)> = vec![
        (keys.perturbation.as_str(), rows.iter().map(|r| r.condition.as_str()).collect()),
        (keys.dose_output.as_str(), rows.iter().map(|r| r.dose.as_str()).collect()),
        ("control_source", rows.iter().map(|r| r.control_source.as_str()).collect()),
        ("deg_source", rows.iter().map(|r| r.deg_source.as_str()).collect()),
    ];
    for (name, values) in text_cols {
        fields.push(Field::new(name, DataType::Utf8, false));
        columns.push(Arc::new(StringArray::from_iter_values(values)));
    }
    fields.push(Field::new("n_cells", DataType::UInt64, false));
    columns.push(Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.n_cells))));
    fields.push(Field::new("n_control", DataType::UInt64, false));
    columns.push(Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.n_control))));
    let metric_names: Vec<String> =
        rows.first().map(|r| metric_columns(r).into_iter().map(|(n, _)| n).collect()).unwrap_or_default();
    let per_row: Vec<Vec<(String, f64)>> = rows.iter().map(metric_columns).collect();
    for (m, name) in metric_names.iter().enumerate() {
        fields.push(Field::new(name, DataType::Float64, true));
        columns.push(Arc::new(Float64Array::from_iter(per_row.iter().map(|r| Some(r[m].1).filter(|v| v.is_finite())))));
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns).map_err(arrow_err)?;
    write_table(&out.join("metrics.parquet"), schema, [batch]).map_err(stage)?;

    // degs.parquet, in the store's DEG table layout (reusable with predict --degs).
    let deg_schema = Arc::new(Schema::new(vec![
        Field::new(DEG_GROUP, DataType::Utf8, false),
        Field::new(DEG_RANK, DataType::UInt32, false),
        Field::new(DEG_GENE, DataType::Utf8, false),
        Field::new(DEG_SCORE, DataType::Float32, true),
    ]));
    let deg_batch = RecordBatch::try_new(
        Arc::clone(&deg_schema),
        vec![
            Arc::new(StringArray::from_iter_values(deg_rows.iter().map(|r| r.0.as_str()))),
            Arc::new(arrow::array::UInt32Array::from_iter_values(deg_rows.iter().map(|r| r.1 as u32))),
            Arc::new(StringArray::from_iter_values(deg_rows.iter().map(|r| r.2.as_str()))),
            Arc::new(arrow::array::Float32Array::from_iter(
                deg_rows.iter().map(|r| Some(r.3 as f32).filter(|v| v.is_finite())),
            )),
        ],
    )
    .map_err(arrow_err)?;
    write_table(&out.join(DEG_FILE), deg_schema, [deg_batch]).map_err(stage)?;

    // summary.json: the run, the means, and every condition.
    let summary = serde_json::json!({
        "model": report.model,
        "store": report.store,
        "split": report.split,
        "conditions": report.conditions.len(),
        "mean": report.summary.iter().map(|(k, v)| (k.clone(), if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null })).collect::<serde_json::Map<_, _>>(),
        "per_condition": report.conditions,
    });
    let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::InvalidInput(format!("summary: {e}")))?;
    let summary_path = out.join("summary.json");
    let tmp = out.join(".summary.json.tmp");
    std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &summary_path).map_err(|e| io(&summary_path, e))?;

    if options.plots {
        let dir = out.join("plots");
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        for c in rows.iter().filter(|c| !c.plot.genes.is_empty()) {
            let mut name: Vec<String> = c.covariates.clone();
            name.push(c.condition.clone());
            name.push(c.dose.clone());
            let file = dir.join(format!("{}.svg", plot::file_stem(&name.join("_"))));
            let title = format!("{} {} ({})", c.condition, c.dose, c.covariates.join(", "));
            let truth_label = if c.n_cells == 0 { "true mean (truth table)" } else { "real mean" };
            let svg = plot::scatter_svg(&title, truth_label, &c.plot, c.r2_mean);
            std::fs::write(&file, svg).map_err(|e| io(&file, e))?;
        }
    }
    Ok(())
}

/// The printed table: one line per condition.
pub fn render_table(report: &EvaluateReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let f = |v: f64| if v.is_finite() { format!("{v:>8.3}") } else { format!("{:>8}", "-") };
    let _ = writeln!(
        out,
        "{:<28} {:<16} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "condition", "covariates", "cells", "ctrl", "r2_mean", "top20", "r2_var", "r2_delta", "ctrl_bl", "truth"
    );
    for c in &report.conditions {
        let top20 = c.top.iter().find(|t| t.k == 20).map_or(f64::NAN, |t| t.r2_mean);
        let mut name = format!("{} {}", c.condition, c.dose);
        if name.len() > 28 {
            name.truncate(27);
            name.push('~');
        }
        let mut covs = c.covariates.join(",");
        if covs.len() > 16 {
            covs.truncate(15);
            covs.push('~');
        }
        let _ = writeln!(
            out,
            "{name:<28} {covs:<16} {:>6} {:>6} {} {} {} {} {} {}",
            c.n_cells,
            c.n_control,
            f(c.r2_mean),
            f(top20),
            f(c.r2_var),
            f(c.r2_delta),
            f(c.r2_mean_control),
            f(c.truth.map_or(f64::NAN, |t| t.r2_mean))
        );
    }
    let m = |k: &str| report.summary.get(k).copied().unwrap_or(f64::NAN);
    let _ = writeln!(
        out,
        "{:<28} {:<16} {:>6} {:>6} {} {} {} {} {} {}",
        "mean",
        "",
        "",
        "",
        f(m("r2_mean")),
        f(m("r2_mean_top20")),
        f(m("r2_var")),
        f(m("r2_delta")),
        f(m("r2_mean_control")),
        f(m("truth_r2_mean"))
    );
    out
}
