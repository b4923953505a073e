//! What an evaluation writes: `metrics.parquet` (one row per condition, schema
//! [`evaluation_metrics_schema`]), `summary.json` (the means and every condition), `degs.parquet`
//! (the DEGs used, [`evaluation_deg_schema`], reusable with `predict --degs`) and `plots/*.svg`.

use cpa_stream_stages::output::{OutputKind, OutputLock, check_destination, publish, temporary_sibling};

use cpa_stream_pipeline::run_dir::check_replaceable;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::model::Vocabulary;
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use cpa_stream_schemas::tables::{degs, evaluation_deg_schema, evaluation_metrics_schema};
use cpa_stream_stages::store::write_table;

use super::{ConditionMetrics, EvaluateOptions, EvaluateReport, TruthMetrics, plot, samples};
use crate::Stage;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::obs::ObsKeys;

/// File of the per-condition metrics.
pub const METRICS_FILE: &str = "metrics.parquet";
/// File of the means and every condition's figures.
pub const SUMMARY_FILE: &str = "summary.json";
/// Directory of the per-condition plots.
pub const PLOTS_DIR: &str = "plots";

/// One DEG the evaluation used, a row of `degs.parquet` (NaN: none).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DegRow {
    /// The DEG table's group name of the condition.
    pub(super) group: String,
    /// 0-based rank.
    pub(super) rank: usize,
    pub(super) gene: String,
    /// Welch's t of the condition's cells against the controls.
    pub(super) score: f64,
    pub(super) welch_p: f64,
    pub(super) welch_q: f64,
    /// The Wilcoxon rank-sum test on sampled cells.
    pub(super) wilcoxon_p: f64,
    pub(super) wilcoxon_q: f64,
}

/// Every metric of a condition, by column name, in column order.
pub(super) fn metric_columns(c: &ConditionMetrics) -> Vec<(String, f64)> {
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
    let f = &c.field;
    out.push(("pearson_delta".to_owned(), f.pearson_delta));
    out.extend(f.pearson_delta_top.iter().map(|(k, v)| (format!("pearson_delta_top{k}"), *v)));
    out.push(("cosine_delta".to_owned(), f.cosine_delta));
    out.push(("mse".to_owned(), f.mse));
    out.push(("mae".to_owned(), f.mae));
    out.push(("mse_delta".to_owned(), f.mse_delta));
    out.push(("mae_delta".to_owned(), f.mae_delta));
    out.extend(f.deg_overlap.iter().map(|(k, v)| (format!("deg_overlap_at{k}"), *v)));
    out.push(("direction_match_top20".to_owned(), f.direction_match_top20));
    out.push(("spearman_delta_top20".to_owned(), f.spearman_delta_top20));
    out.extend(f.discrimination.iter().map(|(d, v)| (format!("discrimination_{d}"), *v)));
    out.push(("beats_control".to_owned(), f.beats_control));
    let b = &c.baselines;
    out.push(("additive_r2_mean".to_owned(), b.additive_r2_mean));
    out.push(("additive_r2_mean_top20".to_owned(), b.additive_r2_mean_top20));
    out.push(("beats_additive".to_owned(), b.beats_additive));
    out.push(("other_covariates_r2_mean".to_owned(), b.other_covariates_r2_mean));
    out.push(("other_covariates_r2_mean_top20".to_owned(), b.other_covariates_r2_mean_top20));
    out.push(("beats_other_covariates".to_owned(), b.beats_other_covariates));
    out.push(("other_covariates_scaled_r2_mean".to_owned(), b.other_covariates_scaled_r2_mean));
    out.push(("other_covariates_scaled_r2_mean_top20".to_owned(), b.other_covariates_scaled_r2_mean_top20));
    out.push(("beats_other_covariates_scaled".to_owned(), b.beats_other_covariates_scaled));
    out.push(("nearest_covariates_r2_mean".to_owned(), b.nearest_covariates_r2_mean));
    out.push(("nearest_covariates_r2_mean_top20".to_owned(), b.nearest_covariates_r2_mean_top20));
    out.push(("beats_nearest_covariates".to_owned(), b.beats_nearest_covariates));
    out.push(("linear_r2_mean".to_owned(), b.linear_r2_mean));
    out.push(("linear_r2_mean_top20".to_owned(), b.linear_r2_mean_top20));
    out.push(("beats_linear".to_owned(), b.beats_linear));
    out.push(("context_mean_r2_mean".to_owned(), b.context_mean_r2_mean));
    out.push(("context_mean_r2_mean_top20".to_owned(), b.context_mean_r2_mean_top20));
    out.push(("beats_context_mean".to_owned(), b.beats_context_mean));
    out.push(("matched_mean_r2_mean".to_owned(), b.matched_mean_r2_mean));
    out.push(("matched_mean_r2_mean_top20".to_owned(), b.matched_mean_r2_mean_top20));
    out.push(("beats_matched_mean".to_owned(), b.beats_matched_mean));
    out.push(("pearson_delta_perturbed".to_owned(), f.pearson_delta_perturbed));
    out.push(("weighted_mse".to_owned(), f.weighted_mse));
    out.push(("weighted_r2_delta".to_owned(), f.weighted_r2_delta));
    out.push(("centroid_accuracy".to_owned(), f.centroid_accuracy));
    out.push(("interpolated_r2_mean".to_owned(), f.interpolated_r2_mean));
    out.push(("interpolated_r2_mean_top20".to_owned(), f.interpolated_r2_mean_top20));
    out.push(("context_mean_weighted_mse".to_owned(), b.context_mean_weighted_mse));
    out.push(("context_mean_weighted_r2_delta".to_owned(), b.context_mean_weighted_r2_delta));
    out.push(("knn_r2_mean".to_owned(), b.knn_r2_mean));
    out.push(("knn_r2_mean_top20".to_owned(), b.knn_r2_mean_top20));
    out.push(("beats_knn".to_owned(), b.beats_knn));
    out.push(("linear_features_r2_mean".to_owned(), b.linear_features_r2_mean));
    out.push(("linear_features_r2_mean_top20".to_owned(), b.linear_features_r2_mean_top20));
    out.push(("beats_linear_features".to_owned(), b.beats_linear_features));
    out.push(("n_significant".to_owned(), f.n_significant));
    out.extend(f.deg_precision.iter().map(|(k, v)| (format!("deg_precision_at{k}"), *v)));
    out.push(("cosine_logfc".to_owned(), f.cosine_logfc));
    out.push(("rmse".to_owned(), f.rmse));
    out.push(("rank_cosine_logfc".to_owned(), f.rank_cosine_logfc));
    out.push(("rank_rmse".to_owned(), f.rank_rmse));
    out.push(("ceiling_r2_mean".to_owned(), f.ceiling_r2_mean));
    out.push(("ceiling_pearson_delta".to_owned(), f.ceiling_pearson_delta));
    out.push(("change_reproducibility".to_owned(), f.change_reproducibility));
    out.push(("uncertainty_cosine".to_owned(), c.uncertainty_cosine));
    out.push(("uncertainty_euclidean".to_owned(), c.uncertainty_euclidean));
    let m = &c.samples;
    out.push(("energy_distance".to_owned(), m.energy_distance));
    out.push(("energy_distance_control".to_owned(), m.energy_distance_control));
    out.push(("de_n_real".to_owned(), m.de_n_real));
    out.push(("de_n_predicted".to_owned(), m.de_n_predicted));
    out.push(("de_recall".to_owned(), m.de_recall));
    out.push(("de_precision".to_owned(), m.de_precision));
    out.push(("de_direction_match".to_owned(), m.de_direction_match));
    out.push(("energy_distance_predicted_control".to_owned(), m.energy_distance_predicted_control));
    out.push(("de_overlap_at_n".to_owned(), m.de_overlap_at_n));
    out.push(("de_precision_at_n".to_owned(), m.de_precision_at_n));
    out.push(("de_spearman_lfc".to_owned(), m.de_spearman_lfc));
    out.push(("de_pr_auc".to_owned(), m.de_pr_auc));
    out.push(("de_roc_auc".to_owned(), m.de_roc_auc));
    out
}

/// The mean of each metric over the conditions where it is defined, and cell-eval's two
/// correlations across conditions ([`samples::across_conditions`]).
pub(super) fn summarize(conditions: &[ConditionMetrics]) -> BTreeMap<String, f64> {
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
    let mut out: BTreeMap<String, f64> =
        sums.into_iter().map(|(k, (s, n))| (k, if n == 0 { f64::NAN } else { s / n as f64 })).collect();
    out.extend(samples::across_conditions(conditions.iter().map(|c| &c.samples)).map(|(k, v)| (k.to_owned(), v)));
    out
}

/// The one-page overview of an evaluation (`.svg` and `.png`).
pub const OVERVIEW_STEM: &str = "overview";

/// What an evaluation directory holds.
const ENTRIES: [&str; 6] = [METRICS_FILE, degs::FILE, SUMMARY_FILE, PLOTS_DIR, "overview.svg", "overview.png"];

/// Claimed before the work: `out` is locked for this command, and may be written (not a file,
/// `-` or a link; an existing evaluation only with `overwrite`, and only if it holds nothing
/// else). Keep the lock until [`write_outputs`] has published.
pub(super) fn claim_output(options: &EvaluateOptions) -> Result<OutputLock> {
    let lock = cpa_stream_stages::output::claim_output(&options.out, OutputKind::Directory, options.overwrite)
        .map_err(Error::stage(Stage::Evaluate))?;
    check_output(options)?;
    Ok(lock)
}

fn check_output(options: &EvaluateOptions) -> Result<()> {
    let out = &options.out;
    let models =
        std::iter::once(&options.model).chain(&options.ensemble).map(|m| cpa_stream_pipeline::run_dir::model_input(m));
    let inputs = models.chain([options.store.clone()]).chain(options.truth.clone()).chain(options.degs.clone());
    cpa_stream_stages::output::check_not_an_input(out, inputs).map_err(Error::stage(Stage::Evaluate))?;
    check_destination(out, OutputKind::Directory, options.overwrite).map_err(Error::stage(Stage::Evaluate))?;
    if out.exists() {
        check_replaceable(out, &ENTRIES, "an evaluation")?;
    }
    Ok(())
}

/// Writes every output into a temporary sibling of `options.out`, published whole (an old
/// evaluation there is replaced, none of its files left beside the new ones), under the lock
/// that [`claim_output`] took.
pub(super) fn write_outputs(
    _lock: &OutputLock,
    report: &EvaluateReport,
    deg_rows: &[DegRow],
    vocab: &Vocabulary,
    options: &EvaluateOptions,
) -> Result<()> {
    let out = &options.out;
    let tmp = temporary_sibling(out).map_err(Error::stage(Stage::Evaluate))?;
    std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
    let written = (|| {
        write_metrics(&tmp.join(METRICS_FILE), &report.conditions, vocab)?;
        write_degs(&tmp.join(degs::FILE), deg_rows)?;
        write_summary(&tmp.join(SUMMARY_FILE), report)?;
        if options.plots {
            write_plots(&tmp.join(PLOTS_DIR), &report.conditions)?;
            // Which prediction is scored, where it is not one model's plain one.
            let anchored = if report.predicted.starts_with("anchored") { ", anchored" } else { "" };
            let models = match report.ensemble.len() {
                0 | 1 => String::new(),
                k => format!(", mean of {k} models"),
            };
            let title = format!("{} split{anchored}{models}", report.split);
            plot::overview(&tmp.join(OVERVIEW_STEM), &title, &report.conditions)?;
        }
        check_output(options)?;
        publish(&tmp, out, OutputKind::Directory, options.overwrite).map_err(Error::stage(Stage::Evaluate))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// `metrics.parquet`: labels, sources, counts, then every metric.
fn write_metrics(path: &Path, rows: &[ConditionMetrics], vocab: &Vocabulary) -> Result<()> {
    let keys = ObsKeys::of(vocab);
    let mut labels: Vec<String> = vocab.covariates.iter().map(|c| c.name.clone()).collect();
    labels.extend([keys.perturbation.clone(), keys.dose_output.clone()]);
    let per_row: Vec<Vec<(String, f64)>> = rows.iter().map(metric_columns).collect();
    let metric_names: Vec<String> =
        rows.first().map(|r| metric_columns(r).into_iter().map(|(n, _)| n).collect()).unwrap_or_default();
    let schema = evaluation_metrics_schema(&labels, &metric_names)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?;
    let text = |f: &dyn Fn(&ConditionMetrics) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let mut columns: Vec<ArrayRef> = (0..vocab.covariates.len()).map(|i| text(&|r| r.covariates[i].as_str())).collect();
    columns.push(text(&|r| r.condition.as_str()));
    columns.push(text(&|r| r.dose.as_str()));
    columns.push(text(&|r| r.control_source.as_str()));
    columns.push(text(&|r| r.deg_source.as_str()));
    columns.push(Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.n_cells))));
    columns.push(Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.n_control))));
    columns.push(text(&|r| r.closest_condition.as_str()));
    for m in 0..metric_names.len() {
        columns.push(Arc::new(Float64Array::from_iter(per_row.iter().map(|r| Some(r[m].1).filter(|v| v.is_finite())))));
    }
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns).map_err(Error::arrow(path.display().to_string()))?;
    write_table(path, schema, [batch]).map_err(Error::stage(Stage::Evaluate))
}

/// `degs.parquet`, in the store's DEG table layout with the Wilcoxon values beside.
fn write_degs(path: &Path, rows: &[DegRow]) -> Result<()> {
    let finite = |v: f64| Some(v).filter(|v| v.is_finite());
    let schema = evaluation_deg_schema();
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.group.as_str()))),
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.rank as u32))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.gene.as_str()))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| finite(r.score)))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| finite(r.welch_p)))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| finite(r.welch_q)))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| finite(r.wilcoxon_p)))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| finite(r.wilcoxon_q)))),
        ],
    )
    .map_err(Error::arrow(path.display().to_string()))?;
    write_table(path, schema, [batch]).map_err(Error::stage(Stage::Evaluate))
}

/// `summary.json`: the run, the means, and every condition (temporary name, then rename).
fn write_summary(path: &Path, report: &EvaluateReport) -> Result<()> {
    let finite = |v: f64| if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null };
    let mut summary = serde_json::json!({
        "model": report.model,
        "store": report.store,
        "split": report.split,
        "definitions": report.definitions,
        "predicted": report.predicted,
        "conditions": report.conditions.len(),
        "mean": report.summary.iter().map(|(k, v)| (k.clone(), finite(*v))).collect::<serde_json::Map<_, _>>(),
        "transfer": report.transfer,
        "reproducibility": report.reproducibility,
        "per_condition": report.conditions,
    });
    if let (false, Some(fields)) = (report.ensemble.is_empty(), summary.as_object_mut()) {
        fields.insert("ensemble".to_owned(), serde_json::json!(report.ensemble));
    }
    let text =
        serde_json::to_string_pretty(&summary).map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?;
    let tmp = path.with_file_name(format!(".{SUMMARY_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(Error::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io(path))
}

/// One scatter plot per condition with DEGs.
fn write_plots(dir: &Path, rows: &[ConditionMetrics]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    for c in rows.iter().filter(|c| !c.plot.genes.is_empty()) {
        let mut name: Vec<String> = c.covariates.clone();
        name.push(c.condition.clone());
        name.push(c.dose.clone());
        let file = dir.join(format!("{}.svg", plot::file_stem(&name.join("_"))));
        let title = format!("{} {} ({})", c.condition, c.dose, c.covariates.join(", "));
        let truth_label = if c.n_cells == 0 { "true mean (truth table)" } else { "real mean" };
        plot::scatter(&file, &title, truth_label, &c.plot, c.r2_mean)?;
    }
    Ok(())
}
