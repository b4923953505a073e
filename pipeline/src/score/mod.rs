//! `score`: a prediction of raw counts (`.h5ad`, as `predict --counts` writes it) scored against
//! the real cells (`.h5ad`) with the metrics of cell-eval2 0.20.0's `vcc2026` preset, the
//! Virtual Cell Challenge 2026's, out of core: each file is read twice in chunks of cells and
//! reduced to per-perturbation sums, so memory holds `perturbations x genes` numbers and one
//! chunk, whatever the number of cells.
//!
//! Computed here: the two expression members, `pds_cosine` and `expr_mse_unbiased_capped_norm`
//! (with its components `expr_mse_unbiased_capped` and `expr_distance_unbiased`, and the
//! diagnostic `expr_mse_unbiased`), and the four Wilcoxon DE members, as cell-eval2's `run`
//! computes them; the two ends each member is scaled between, the mean-response baseline arm
//! ([`cells::BaselineArm`], `cell-eval2 baseline`) and the split-half replicate ([`replicate`],
//! `prep-real-bundle`'s anchor), drawn from the reference with numpy's own generator so that they
//! are cell-eval2's; and the scaled scores (`cell-eval2 score`), from those ends or from a real
//! bundle.

mod bulk;
mod cells;
mod contexts;
mod de;
mod expression;
mod numpy_random;
mod replicate;
mod request;
mod scale;
mod targets;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use cpa_stream_stages::h5ad::H5adReader;
use cpa_stream_stages::output::{OutputKind, check_replaceable, claim_output, publish, temporary_sibling};
use serde::Serialize;

pub use bulk::MAX_CELL_TOTAL;
pub use cells::BASELINE_SEED;
pub use de::Engine as DeEngine;
pub use replicate::BASE_SEED as REPLICATE_SEED;
pub use request::ScoreRequest;
pub use scale::{Scaled, ScaledMember};
pub use targets::TargetGenes;

use cells::Cells;

use crate::Stage;
use crate::context::RunContext;
use crate::error::{Error, Result};
use crate::telemetry::{MemorySampler, RunReport};

/// `bulk_target_sum` of the `vcc2026` preset: the total each pseudobulk is scaled to.
pub const BULK_TARGET_SUM: f64 = 5e4;
/// The per-perturbation values: `perturbation`, `metric`, `value` (cell-eval2's `results.csv`).
pub const RESULTS_FILE: &str = "results.parquet";
/// The aggregates and what was scored.
pub const SUMMARY_FILE: &str = "summary.json";
/// The baseline arm's per-perturbation values (with `baseline`; cell-eval2's
/// `baseline_results.csv`).
pub const BASELINE_RESULTS_FILE: &str = "baseline_results.parquet";

/// Whether higher values of the aggregate `metric` are better (`Some(true)`), lower
/// (`Some(false)`), or it is not a measure of the prediction (`expr_distance_unbiased`: the
/// reference's own effects).
pub fn better(metric: &str) -> Option<bool> {
    match metric {
        "expr_distance_unbiased" => None,
        "expr_mse_unbiased" | "expr_mse_unbiased_capped" | "expr_mse_unbiased_capped_norm" | "de_wilcoxon_lfc_nmae" => {
            Some(false)
        }
        _ => Some(true),
    }
}

/// What `score` reads and writes.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// The predicted cells: raw counts, an obs column of perturbations, the control among them.
    pub prediction: PathBuf,
    /// The real cells, the same genes in the same order.
    pub reference: PathBuf,
    /// The obs column of the perturbations [default: `condition`].
    pub perturbation_key: String,
    /// The control's label [default: `control`].
    pub control: String,
    /// Where each perturbation's target gene comes from.
    pub target_genes: TargetGenes,
    /// The directory written (`results.parquet`, `summary.json`); none: only the report.
    pub out: Option<PathBuf>,
    /// A real bundle of cell-eval2 (`prep-real-bundle`) for the reference: the baseline and
    /// replicate ends each member is scaled between.
    pub real_bundle: Option<PathBuf>,
    /// Also score cell-eval2's mean-response baseline arm of the reference (`cell-eval2
    /// baseline`), emitted here from the reference's control cells, beside the prediction.
    pub baseline: bool,
    /// The seed of the baseline arm's draws [default: 0, cell-eval2's].
    pub baseline_seed: u64,
    /// Also compute cell-eval2's split-half replicate of the reference (`cell-eval2
    /// prep-real-bundle`'s anchor) and, with `baseline`, scale each member between the two.
    pub replicate: bool,
    /// The seed the replicate's five split seeds come from [default: 0, cell-eval2's].
    pub replicate_seed: u64,
    /// Accept counts that are not whole numbers (cell-eval2's `allow_fractional_counts`: a
    /// baseline arm of mean counts); by default a fraction is an error, as in `vcc2026`.
    pub allow_fractional_counts: bool,
    /// Replace a score directory written before.
    pub overwrite: bool,
    /// An obs column of both files whose values (cell lines, say) are scored each on its own,
    /// with its own control, baseline and replicate, as the challenge scores its contexts.
    pub context_key: Option<String>,
    /// Whose Wilcoxon p-values: cell-eval2's scanpy engine (the default) or its pdex engine.
    pub de_engine: de::Engine,
    /// Threads of the jackknife pass and of the tests [default: the usable CPUs].
    pub threads: usize,
}

impl ScoreOptions {
    /// Options with every default.
    pub fn new(prediction: impl Into<PathBuf>, reference: impl Into<PathBuf>) -> ScoreOptions {
        ScoreOptions {
            prediction: prediction.into(),
            reference: reference.into(),
            perturbation_key: "condition".to_owned(),
            control: "control".to_owned(),
            target_genes: TargetGenes::ByName,
            out: None,
            real_bundle: None,
            baseline: false,
            baseline_seed: BASELINE_SEED,
            replicate: false,
            replicate_seed: replicate::BASE_SEED,
            allow_fractional_counts: false,
            overwrite: false,
            context_key: None,
            de_engine: de::Engine::Scanpy,
            threads: crate::threads::cpus(),
        }
    }
}

/// One perturbation's values.
#[derive(Debug, Clone, Serialize)]
pub struct PerturbationScores {
    /// The label.
    pub perturbation: String,
    /// Predicted cells.
    pub predicted_cells: u64,
    /// Real cells.
    pub real_cells: u64,
    /// Metric -> value.
    pub metrics: BTreeMap<String, f64>,
}

/// The mean-response baseline arm's scores.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// The seed of its draws.
    pub seed: u64,
    /// Its aggregates (cell-eval2's `baseline_agg.csv`, `mean` row).
    pub aggregates: BTreeMap<String, f64>,
    /// Its values per perturbation.
    pub perturbations: Vec<PerturbationScores>,
}

/// What a scoring found.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    /// The prediction scored.
    pub prediction: PathBuf,
    /// The reference.
    pub reference: PathBuf,
    /// The directory written, if any.
    pub out: Option<PathBuf>,
    /// Genes compared.
    pub genes: usize,
    /// Cells of the prediction.
    pub predicted_cells: u64,
    /// Cells of the reference.
    pub real_cells: u64,
    /// The obs column of the contexts, each scored on its own (with `context_key`).
    pub context_key: Option<String>,
    /// Whose Wilcoxon p-values (cell-eval2's `de.backend`).
    pub de_engine: de::Engine,
    /// Each context's scores, in sorted order (one, unnamed, without `context_key`).
    pub contexts: Vec<ContextScores>,
    /// The mean over the contexts of their `avg_from_replicate` (the challenge's score of a
    /// prediction of several contexts), where every context was scaled.
    pub avg_from_replicate: Option<f64>,
    /// Wall time and peak memory.
    pub report: RunReport,
}

/// One context's scores (the whole files without `context_key`).
#[derive(Debug, Clone, Serialize)]
pub struct ContextScores {
    /// The context's value of `context_key` (none: the whole files).
    pub context: Option<String>,
    /// Predicted cells of the context.
    pub predicted_cells: u64,
    /// Real cells of the context.
    pub real_cells: u64,
    /// The aggregates, cell-eval2's `agg_results.csv` means (`expr_mse_unbiased_capped_norm`:
    /// the ratio of the sums).
    pub aggregates: BTreeMap<String, f64>,
    /// Every perturbation's values.
    pub perturbations: Vec<PerturbationScores>,
    /// The mean-response baseline arm scored as the prediction is (with `baseline`).
    pub baseline: Option<Baseline>,
    /// The split-half replicate (with `replicate`).
    pub replicate: Option<Replicate>,
    /// Why the members could not be scaled between the baseline and the replicate computed
    /// here (a member whose replicate is not better than its baseline).
    pub scale_error: Option<String>,
    /// The members scaled between the baseline and the replicate (with `real_bundle`, or
    /// `baseline` and `replicate`).
    pub scaled: Option<Scaled>,
    /// Perturbations whose label names no gene (scored with every gene), at most five.
    pub unresolved_targets: Vec<String>,
    /// How many perturbations name no gene.
    pub n_unresolved_targets: usize,
}

/// Scores `options.prediction` against `options.reference`.
pub fn run(options: &ScoreOptions, ctx: &RunContext) -> Result<ScoreReport> {
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let lock = match &options.out {
        Some(out) => {
            cpa_stream_stages::output::check_not_an_input(out, [&options.prediction, &options.reference])
                .map_err(Error::stage(Stage::Write))?;
            let lock =
                claim_output(out, OutputKind::Directory, options.overwrite).map_err(Error::stage(Stage::Write))?;
            if out.exists() {
                check_replaceable(out, "a score directory", ours).map_err(Error::stage(Stage::Write))?;
            }
            Some(lock)
        }
        None => None,
    };
    if let Some(bundle) = &options.real_bundle
        && !bundle.is_dir()
    {
        return Err(Error::InvalidInput(format!(
            "{}: not a directory (a real bundle of `cell-eval2 prep-real-bundle`)",
            bundle.display()
        )));
    }
    let open = |path: &Path| H5adReader::open(path, None).map_err(Error::stage(Stage::Read));
    let (pred_file, real_file) = (open(&options.prediction)?, open(&options.reference)?);
    let genes = pred_file.gene_ids().map_err(Error::stage(Stage::Read))?;
    let real_genes = real_file.gene_ids().map_err(Error::stage(Stage::Read))?;
    same_genes(&genes, &real_genes, options)?;
    let contexts = match &options.context_key {
        None => vec![score_context(&pred_file, &real_file, &genes, None, options, ctx)?],
        Some(key) => {
            let split = contexts::split(&pred_file, &real_file, key, options)?;
            let mut out = Vec::with_capacity(split.names.len());
            for (k, name) in split.names.iter().enumerate() {
                let (pred_in, real_in) = (split.membership(&split.pred, k), split.membership(&split.real, k));
                let label = format!("context {name:?}");
                let subsets = (
                    cells::Subset { membership: &pred_in, side: 1, name: &label },
                    cells::Subset { membership: &real_in, side: 1, name: &label },
                );
                let mut scores = score_context(&pred_file, &real_file, &genes, Some(subsets), options, ctx)?;
                scores.context = Some(name.clone());
                out.push(scores);
            }
            out
        }
    };
    let avg: Option<Vec<f64>> = contexts.iter().map(|c| c.scaled.as_ref().map(|s| s.avg_from_replicate)).collect();
    let report = ScoreReport {
        prediction: options.prediction.clone(),
        reference: options.reference.clone(),
        out: options.out.clone(),
        genes: genes.len(),
        predicted_cells: pred_file.n_obs(),
        real_cells: real_file.n_obs(),
        context_key: options.context_key.clone(),
        de_engine: options.de_engine,
        avg_from_replicate: avg.map(|v| v.iter().sum::<f64>() / v.len() as f64),
        contexts,
        report: RunReport { wall: started.elapsed(), stages: Vec::new(), memory: sampler.finish() },
    };
    if let (Some(out), Some(_lock)) = (&options.out, &lock) {
        write(out, &report, options.overwrite)?;
    }
    Ok(report)
}

/// Scores the prediction against the reference, both whole or both restricted to one context
/// (`subsets`: the prediction's and the reference's cells of it).
fn score_context(
    pred_file: &H5adReader,
    real_file: &H5adReader,
    genes: &[String],
    subsets: Option<(cells::Subset, cells::Subset)>,
    options: &ScoreOptions,
    ctx: &RunContext,
) -> Result<ContextScores> {
    let key = options.perturbation_key.as_str();
    let (pred_subset, real_subset) = subsets.map_or((None, None), |(p, r)| (Some(p), Some(r)));
    let real_cells = Cells::File { reader: real_file, group_by: key, subset: real_subset };
    let pred_cells = Cells::File { reader: pred_file, group_by: key, subset: pred_subset };
    let reference = Reference::read(real_cells, options, ctx)?;
    let plain = Scoring { fractional: options.allow_fractional_counts, own_control: false };
    let scored = score_side(&pred_cells, &reference, genes, options, plain, ctx)?;
    let baseline = if options.baseline {
        let arm = cells::BaselineArm::build(
            real_file,
            &reference.groups,
            cells::GroupSums {
                labels: &reference.bulk.labels,
                cells: &reference.bulk.cells,
                sums: &reference.bulk.sums,
            },
            &options.control,
            genes,
            options.target_genes,
            options.baseline_seed,
            ctx,
        )?;
        Some(score_side(
            &Cells::Baseline(&arm),
            &reference,
            genes,
            options,
            Scoring { fractional: true, own_control: false },
            ctx,
        )?)
    } else {
        None
    };
    let anchor = if options.replicate {
        Some(split_half_replicate(real_file, &reference, genes, real_subset.map(|s| s.name), options, ctx)?)
    } else {
        None
    };
    // An undefined scale of ends computed here is a finding about the reference, reported beside
    // the ends rather than in place of them; a bundle's is an error, as `cell-eval2 score` has it.
    let (scaled, scale_error) = match (&options.real_bundle, &baseline, &anchor) {
        (Some(bundle), _, _) => (Some(scale::scale(&scored.aggregates, bundle)?), None),
        (None, Some(b), Some(r)) => {
            let origin = reference.cells.origin();
            match scale::scale_between(&scored.aggregates, &b.aggregates, &r.aggregates, None, &origin) {
                Ok(scaled) => (Some(scaled), None),
                Err(Error::InvalidInput(reason)) => (None, Some(reason)),
                Err(other) => return Err(other),
            }
        }
        _ => (None, None),
    };
    Ok(ContextScores {
        context: None,
        predicted_cells: pred_cells.n_cells(),
        real_cells: reference.cells.n_cells(),
        aggregates: scored.aggregates,
        perturbations: scored.perturbations,
        baseline: baseline.map(|b| Baseline {
            seed: options.baseline_seed,
            aggregates: b.aggregates,
            perturbations: b.perturbations,
        }),
        replicate: anchor,
        scaled,
        scale_error,
        unresolved_targets: scored.unresolved_targets,
        n_unresolved_targets: scored.n_unresolved_targets,
    })
}

/// The reference reduced once for every side scored against it: its pseudobulks, where its
/// groups are, its control cells for the tests, and its own tests.
struct Reference<'a> {
    cells: Cells<'a>,
    bulk: bulk::SideBulk,
    groups: cells::Groups,
    pool: de::ControlPool,
    tests: Vec<(String, de::DeResult)>,
}

impl Reference<'_> {
    /// The ids of the genes its tests tested.
    fn features<'g>(&self, genes: &'g [String]) -> Vec<&'g str> {
        self.pool.kept.iter().map(|&g| genes[g].as_str()).collect()
    }
}

impl<'a> Reference<'a> {
    fn read(cells: Cells<'a>, options: &ScoreOptions, ctx: &RunContext) -> Result<Reference<'a>> {
        let bulk =
            bulk::side_bulk(&cells, BULK_TARGET_SUM, options.allow_fractional_counts, options.threads.max(1), ctx)?;
        let groups = cells.groups()?;
        let pool = de::ControlPool::read(&cells, &groups, &options.control, ctx)?;
        let tests =
            de::test_groups(&cells, &groups, &options.control, &pool, options.de_engine, options.threads.max(1), ctx)?;
        Ok(Reference { cells, bulk, groups, pool, tests })
    }
}

/// One side's scores against the reference.
struct SideScores {
    aggregates: BTreeMap<String, f64>,
    /// The side's own tests and the genes tested.
    tests: Tests,
    perturbations: Vec<PerturbationScores>,
    unresolved_targets: Vec<String>,
    n_unresolved_targets: usize,
}

/// How a side is scored against the reference.
#[derive(Debug, Clone, Copy)]
struct Scoring {
    /// Counts that are not whole are accepted (a baseline arm).
    fractional: bool,
    /// The side's effects and tests are against its own control cells (the replicate's
    /// `control_source="pred"`), not the reference's.
    own_control: bool,
}

/// Scores the cells `pred` against `reference`.
fn score_side(
    pred_cells: &Cells,
    reference: &Reference,
    genes: &[String],
    options: &ScoreOptions,
    how: Scoring,
    ctx: &RunContext,
) -> Result<SideScores> {
    let pred = bulk::side_bulk(pred_cells, BULK_TARGET_SUM, how.fractional, options.threads.max(1), ctx)?;
    let real = &reference.bulk;
    let scores = expression::score(&pred, real, &options.control, genes, options.target_genes, how.own_control)?;
    let (de, pred_tests) = differential_expression(pred_cells, reference, genes, options, how.own_control, ctx)?;

    let mut per: BTreeMap<String, PerturbationScores> = BTreeMap::new();
    let columns = [
        ("pds_cosine", &scores.pds_cosine),
        ("expr_mse_unbiased", &scores.mse_unbiased),
        ("expr_mse_unbiased_capped", &scores.mse_unbiased_capped),
        ("expr_distance_unbiased", &scores.distance_unbiased),
    ];
    let mut aggregates = BTreeMap::new();
    for (name, values) in columns {
        for (label, v) in values {
            let row = per.entry(label.clone()).or_insert_with(|| PerturbationScores {
                perturbation: label.clone(),
                predicted_cells: pred.row(label).map_or(0, |i| pred.cells[i]),
                real_cells: real.row(label).map_or(0, |j| real.cells[j]),
                metrics: BTreeMap::new(),
            });
            row.metrics.insert(name.to_owned(), *v);
        }
        let finite: Vec<f64> = values.iter().map(|(_, v)| *v).filter(|v| v.is_finite()).collect();
        aggregates.insert(name.to_owned(), finite.iter().sum::<f64>() / finite.len().max(1) as f64);
    }
    type Read = fn(&de::DeScores) -> Option<f64>;
    let de_columns: [(&str, Read); 4] = [
        ("de_wilcoxon_direction_fidelity_yield_raw", |s| Some(s.direction_fidelity_yield_raw)),
        ("de_wilcoxon_direction_reach_raw", |s| Some(s.direction_reach_raw)),
        ("de_wilcoxon_sig_jaccard", |s| Some(s.sig_jaccard)),
        ("de_wilcoxon_lfc_nmae", |s| s.lfc_nmae),
    ];
    for (name, read) in de_columns {
        let mut finite = Vec::new();
        for (label, s) in &de {
            if let (Some(v), Some(row)) = (read(s), per.get_mut(label)) {
                row.metrics.insert(name.to_owned(), v);
                if v.is_finite() {
                    finite.push(v);
                }
            }
        }
        let mean = if finite.is_empty() { f64::NAN } else { finite.iter().sum::<f64>() / finite.len() as f64 };
        aggregates.insert(name.to_owned(), mean);
    }
    aggregates.insert("expr_mse_unbiased_capped_norm".to_owned(), scores.mse_unbiased_capped_norm);
    Ok(SideScores {
        aggregates,
        perturbations: per.into_values().collect(),
        tests: pred_tests,
        unresolved_targets: scores.unresolved_targets,
        n_unresolved_targets: scores.n_unresolved_targets,
    })
}

/// A side's tests: per perturbation (sorted), over the genes tested (their ids).
struct Tests {
    results: BTreeMap<String, de::DeResult>,
    features: Vec<String>,
}

/// The Wilcoxon tests of the predicted perturbations against the reference's control cells (or
/// their own, `own_control`), and the four DE members of each perturbation.
fn differential_expression(
    pred_cells: &Cells,
    reference: &Reference,
    genes: &[String],
    options: &ScoreOptions,
    own_control: bool,
    ctx: &RunContext,
) -> Result<(Vec<(String, de::DeScores)>, Tests)> {
    let pred_groups = pred_cells.groups()?;
    let own_pool;
    let pred_pool = if own_control {
        own_pool = de::ControlPool::read(pred_cells, &pred_groups, &options.control, ctx)?;
        &own_pool
    } else {
        &reference.pool
    };
    let real_tests = &reference.tests;
    let pred_tests: BTreeMap<String, de::DeResult> = de::test_groups(
        pred_cells,
        &pred_groups,
        &options.control,
        pred_pool,
        options.de_engine,
        options.threads.max(1),
        ctx,
    )?
    .into_iter()
    .collect();
    let features: Vec<&str> = reference.pool.kept.iter().map(|&g| genes[g].as_str()).collect();
    let pred_features: Vec<&str> = pred_pool.kept.iter().map(|&g| genes[g].as_str()).collect();
    let alignment =
        if own_control { de::Alignment::by_id(&features, &pred_features) } else { de::Alignment::same(features.len()) };
    let column = replicate::positions(&features);
    let own = |label: &str| match options.target_genes {
        TargetGenes::ByName => column.get(label).copied(),
        TargetGenes::None => None,
    };
    let by_name = options.target_genes == TargetGenes::ByName;
    if options.target_genes == TargetGenes::ByName
        && !real_tests.is_empty()
        && real_tests.iter().all(|(label, _)| own(label).is_none())
    {
        let sample: Vec<&str> = real_tests.iter().take(5).map(|(l, _)| l.as_str()).collect();
        return Err(Error::InvalidInput(format!(
            "{}: the DE metrics leave each perturbation's own gene out, but no perturbation label (such as \
             {sample:?}) names one of the {} genes tested (gene ids with a control mean above {} CPM): if the \
             perturbations have no target gene, say so with --no-target-genes; if the labels name genes \
             differently, rename them to the gene ids",
            reference.cells.origin(),
            features.len(),
            de::MIN_CONTROL_CPM
        )));
    }
    let scores = real_tests
        .iter()
        .map(|(label, real)| {
            let pred = pred_tests.get(label).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{}: no cells of perturbation {label:?}, which the reference has",
                    pred_cells.origin()
                ))
            })?;
            Ok((
                label.clone(),
                de::de_scores(real, pred, &alignment, &features, (own(label), by_name.then_some(label.as_str()))),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let features = pred_features.iter().map(|&f| f.to_owned()).collect();
    Ok((scores, Tests { results: pred_tests, features }))
}

/// The entries a score directory holds.
fn ours(name: &str, kind: std::fs::FileType) -> bool {
    kind.is_file() && (name == RESULTS_FILE || name == SUMMARY_FILE || name == BASELINE_RESULTS_FILE)
}

/// The two files must have the same gene ids in the same order.
fn same_genes(pred: &[String], real: &[String], options: &ScoreOptions) -> Result<()> {
    if pred.len() != real.len() {
        return Err(Error::InvalidInput(format!(
            "{} has {} genes and {} has {}: the prediction must have the reference's genes, in its order",
            options.prediction.display(),
            pred.len(),
            options.reference.display(),
            real.len()
        )));
    }
    if let Some(k) = pred.iter().zip(real).position(|(a, b)| a != b) {
        return Err(Error::InvalidInput(format!(
            "{}: gene {k} is {:?} where the reference {} has {:?}: the prediction must have the reference's genes, \
             in its order",
            options.prediction.display(),
            pred[k],
            options.reference.display(),
            real[k]
        )));
    }
    Ok(())
}

/// Writes `results.parquet` and `summary.json` into a temporary sibling of `out`, then publishes it.
fn write(out: &Path, report: &ScoreReport, overwrite: bool) -> Result<()> {
    let tmp = temporary_sibling(out).map_err(Error::stage(Stage::Write))?;
    std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
    let written = (|| {
        let by_context = report.context_key.is_some();
        let rows = report.contexts.iter().map(|c| (c.context.as_deref(), c.perturbations.as_slice()));
        write_results(&tmp.join(RESULTS_FILE), by_context, rows)?;
        if report.contexts.iter().all(|c| c.baseline.is_some()) {
            let baselines = report
                .contexts
                .iter()
                .filter_map(|c| c.baseline.as_ref().map(|b| (c.context.as_deref(), b.perturbations.as_slice())));
            write_results(&tmp.join(BASELINE_RESULTS_FILE), by_context, baselines)?;
        }
        let context_json = |c: &ContextScores| {
            serde_json::json!({
                "context": c.context,
                "predicted_cells": c.predicted_cells,
                "real_cells": c.real_cells,
                "aggregates": c.aggregates,
                "baseline": c.baseline.as_ref().map(|b| serde_json::json!({
                    "seed": b.seed,
                    "aggregates": b.aggregates,
                })),
                "replicate": c.replicate,
                "scaled": c.scaled,
                "scale_error": c.scale_error,
                "unresolved_targets": c.unresolved_targets,
                "n_unresolved_targets": c.n_unresolved_targets,
            })
        };
        let mut summary = serde_json::json!({
            "prediction": report.prediction,
            "reference": report.reference,
            "preset": "vcc2026",
            "cell_eval2": "0.20.0",
            "de_backend": report.de_engine.name(),
            "genes": report.genes,
            "predicted_cells": report.predicted_cells,
            "real_cells": report.real_cells,
        });
        let fields = summary.as_object_mut().expect("an object");
        match (&report.context_key, report.contexts.as_slice()) {
            (None, [only]) => {
                if let serde_json::Value::Object(one) = context_json(only) {
                    fields.extend(one.into_iter().filter(|(k, _)| k != "context"));
                }
            }
            (key, all) => {
                fields.insert("context_key".to_owned(), serde_json::json!(key));
                fields.insert("contexts".to_owned(), all.iter().map(context_json).collect());
                fields.insert("avg_from_replicate".to_owned(), serde_json::json!(report.avg_from_replicate));
            }
        }
        let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::InvalidInput(e.to_string()))?;
        std::fs::write(tmp.join(SUMMARY_FILE), text + "\n").map_err(Error::io(tmp.join(SUMMARY_FILE)))?;
        publish(&tmp, out, OutputKind::Directory, overwrite).map_err(Error::stage(Stage::Write))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// Writes per-perturbation values as `perturbation`, `metric`, `value` (cell-eval2's
/// `results.csv`), after a `context` column with `by_context`.
fn write_results<'a>(
    path: &Path,
    by_context: bool,
    parts: impl Iterator<Item = (Option<&'a str>, &'a [PerturbationScores])>,
) -> Result<()> {
    let (mut contexts, mut labels, mut metrics, mut values) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (context, perturbations) in parts {
        for p in perturbations {
            for (m, v) in &p.metrics {
                contexts.push(context.unwrap_or_default());
                labels.push(p.perturbation.as_str());
                metrics.push(m.as_str());
                values.push(*v);
            }
        }
    }
    let mut fields = vec![
        Field::new("perturbation", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
    ];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(labels)),
        Arc::new(StringArray::from(metrics)),
        Arc::new(Float64Array::from(values)),
    ];
    if by_context {
        fields.insert(0, Field::new("context", DataType::Utf8, false));
        columns.insert(0, Arc::new(StringArray::from(contexts)));
    }
    let schema = Arc::new(Schema::new(fields));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(Error::arrow(name))?;
    cpa_stream_stages::store::write_table(path, schema, [batch]).map_err(Error::stage(Stage::Write))
}

/// The split-half replicate's aggregates ([`replicate`]), each split's and their means.
fn split_half_replicate(
    real_file: &H5adReader,
    reference: &Reference,
    genes: &[String],
    context: Option<&str>,
    options: &ScoreOptions,
    ctx: &RunContext,
) -> Result<Replicate> {
    let key = options.perturbation_key.as_str();
    let origin = reference.cells.origin();
    let of_context = context.map(|c| format!(" of {c}")).unwrap_or_default();
    let order = replicate::group_order(real_file, key, &reference.groups)?;
    let full_features = reference.features(genes);
    let seeds = replicate::split_seeds(options.replicate_seed, replicate::SPLITS);
    let mut splits = Vec::with_capacity(seeds.len());
    for (k, &seed) in seeds.iter().enumerate() {
        let membership = replicate::halves(real_file.n_obs(), &reference.groups, &order, seed, &origin)?;
        let names = [format!("half A of split {k}{of_context}"), format!("half B of split {k}{of_context}")];
        let half_a = Cells::File {
            reader: real_file,
            group_by: key,
            subset: Some(cells::Subset { membership: &membership, side: replicate::HALF_A, name: &names[0] }),
        };
        let half_b = Cells::File {
            reader: real_file,
            group_by: key,
            subset: Some(cells::Subset { membership: &membership, side: replicate::HALF_B, name: &names[1] }),
        };
        let half_a = Reference::read(half_a, options, ctx)?;
        let scored = score_side(
            &half_b,
            &half_a,
            genes,
            options,
            Scoring { fractional: options.allow_fractional_counts, own_control: true },
            ctx,
        )?;
        let mut aggregates = scored.aggregates;
        // de_wilcoxon_lfc_nmae's replicate: the two halves' fold changes over the whole
        // reference's called genes.
        let a_features = half_a.features(genes);
        let a_at = replicate::positions(&a_features);
        let b_features: Vec<&str> = scored.tests.features.iter().map(String::as_str).collect();
        let b_at = replicate::positions(&b_features);
        let a_tests: BTreeMap<&str, &de::DeResult> = half_a.tests.iter().map(|(l, t)| (l.as_str(), t)).collect();
        let own_column = replicate::positions(&full_features);
        let mut raws = Vec::new();
        for (label, full) in &reference.tests {
            let (Some(a), Some(b)) = (a_tests.get(label.as_str()), scored.tests.results.get(label)) else {
                return Err(Error::InvalidInput(format!(
                    "{origin}: perturbation {label:?} is missing from a half of split {k}"
                )));
            };
            let own = match options.target_genes {
                TargetGenes::ByName => own_column.get(label.as_str()).copied(),
                TargetGenes::None => None,
            };
            let kept: Vec<usize> = (0..full_features.len()).filter(|&g| Some(g) != own).collect();
            let lfc = |tests: &de::DeResult, at: &HashMap<&str, usize>, g: usize| {
                at.get(full_features[g]).map_or(0.0, |&j| if tests.lfc[j].is_finite() { tests.lfc[j] } else { 0.0 })
            };
            let raw = de::nmae(full, &kept, |g| (lfc(a, &a_at, g) - lfc(b, &b_at, g)).abs());
            if let Some(raw) = raw {
                raws.push(raw);
            }
        }
        if raws.is_empty() {
            return Err(Error::InvalidInput(format!(
                "{origin}: no perturbation has 10 genes called in the reference, so de_wilcoxon_lfc_nmae has no \
                 replicate (split {k})"
            )));
        }
        aggregates.insert("de_wilcoxon_lfc_nmae".to_owned(), raws.iter().sum::<f64>() / raws.len() as f64);
        if let Some((metric, _)) = aggregates.iter().find(|(m, v)| scale::is_scored(m) && !v.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "{origin}: split {k} of the replicate (seed {seed}) gives no value of {metric}, so the metric has no \
                 replicate end"
            )));
        }
        splits.push(aggregates);
    }
    let mut aggregates = BTreeMap::new();
    for metric in splits[0].keys() {
        let mean = splits.iter().map(|s| s[metric]).sum::<f64>() / splits.len() as f64;
        aggregates.insert(metric.clone(), mean);
    }
    Ok(Replicate { base_seed: options.replicate_seed, seeds, splits, aggregates })
}

/// The split-half replicate's aggregates.
#[derive(Debug, Clone, Serialize)]
pub struct Replicate {
    /// The seed the splits' seeds come from.
    pub base_seed: u64,
    /// The splits' seeds.
    pub seeds: Vec<u64>,
    /// Each split's aggregates.
    pub splits: Vec<BTreeMap<String, f64>>,
    /// Their means (cell-eval2's anchor `replicate`).
    pub aggregates: BTreeMap<String, f64>,
}
