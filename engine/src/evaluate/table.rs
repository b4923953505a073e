//! The table `cpa-stream evaluate` prints: one line per condition and the means. The default set
//! is short (R2 of means against the control-mean baseline and the data's split-half ceiling, on
//! all genes and the top 20 DEGs, the change's Pearson, the L1 discrimination rank and whether the
//! model beats the baseline, and whether the data measure its change at all); `all`
//! adds the variances, the change's R2, the rest of the field's metrics, the energy distance (with
//! the control cells' as its baseline), the Wilcoxon DE recall and precision and the uncertainty.
//! Every metric is in
//! `metrics.parquet` either way.

use std::fmt::Write as _;

use super::{ConditionMetrics, EvaluateReport, NOISE_REPRODUCIBILITY};

pub use cpa_stream_pipeline::model_flags::MetricSet;

/// A column of the table: its header and its value of a condition, or of the summary.
struct Column {
    header: &'static str,
    value: fn(&ConditionMetrics) -> f64,
    summary: &'static str,
}

fn top(c: &ConditionMetrics, k: usize, f: fn(&super::TopMetrics) -> f64) -> f64 {
    c.top.iter().find(|t| t.k == k).map_or(f64::NAN, f)
}

fn listed<T: PartialEq + Copy>(pairs: &[(T, f64)], key: T) -> f64 {
    pairs.iter().find(|(k, _)| *k == key).map_or(f64::NAN, |p| p.1)
}

fn columns(set: MetricSet, truth: bool) -> Vec<Column> {
    let mut out = vec![
        Column { header: "r2_mean", value: |c| c.r2_mean, summary: "r2_mean" },
        Column { header: "ctrl_bl", value: |c| c.r2_mean_control, summary: "r2_mean_control" },
        Column { header: "ceiling", value: |c| c.field.ceiling_r2_mean, summary: "ceiling_r2_mean" },
        Column { header: "top20", value: |c| top(c, 20, |t| t.r2_mean), summary: "r2_mean_top20" },
        Column { header: "top20_bl", value: |c| top(c, 20, |t| t.r2_mean_control), summary: "r2_mean_control_top20" },
        Column { header: "lin_bl", value: |c| c.baselines.linear_r2_mean, summary: "linear_r2_mean" },
        Column { header: "p_delta", value: |c| c.field.pearson_delta, summary: "pearson_delta" },
        Column { header: "disc_l1", value: |c| listed(&c.field.discrimination, "l1"), summary: "discrimination_l1" },
    ];
    if set == MetricSet::All {
        out.extend([
            Column { header: "r2_var", value: |c| c.r2_var, summary: "r2_var" },
            Column { header: "r2_delta", value: |c| c.r2_delta, summary: "r2_delta" },
            Column { header: "cos_dlt", value: |c| c.field.cosine_delta, summary: "cosine_delta" },
            Column { header: "cos_lfc", value: |c| c.field.cosine_logfc, summary: "cosine_logfc" },
            Column { header: "rk_rmse", value: |c| c.field.rank_rmse, summary: "rank_rmse" },
            Column { header: "mse", value: |c| c.field.mse, summary: "mse" },
            Column { header: "mae_dlt", value: |c| c.field.mae_delta, summary: "mae_delta" },
            Column { header: "ovl@20", value: |c| listed(&c.field.deg_overlap, 20), summary: "deg_overlap_at20" },
            Column { header: "dir20", value: |c| c.field.direction_match_top20, summary: "direction_match_top20" },
            Column { header: "spear20", value: |c| c.field.spearman_delta_top20, summary: "spearman_delta_top20" },
            Column {
                header: "disc_cos",
                value: |c| listed(&c.field.discrimination, "cosine"),
                summary: "discrimination_cosine",
            },
            Column { header: "energy", value: |c| c.samples.energy_distance, summary: "energy_distance" },
            Column {
                header: "en_bl",
                value: |c| c.samples.energy_distance_control,
                summary: "energy_distance_control",
            },
            Column { header: "de_rec", value: |c| c.samples.de_recall, summary: "de_recall" },
            Column { header: "de_prec", value: |c| c.samples.de_precision, summary: "de_precision" },
            Column { header: "de_auc", value: |c| c.samples.de_roc_auc, summary: "de_roc_auc" },
            Column { header: "uncert", value: |c| c.uncertainty_euclidean, summary: "uncertainty_euclidean" },
            Column { header: "add_bl", value: |c| c.baselines.additive_r2_mean, summary: "additive_r2_mean" },
            Column {
                header: "cov_bl",
                value: |c| c.baselines.other_covariates_r2_mean,
                summary: "other_covariates_r2_mean",
            },
            Column {
                header: "scl_bl",
                value: |c| c.baselines.other_covariates_scaled_r2_mean,
                summary: "other_covariates_scaled_r2_mean",
            },
            Column {
                header: "near_bl",
                value: |c| c.baselines.nearest_covariates_r2_mean,
                summary: "nearest_covariates_r2_mean",
            },
            Column { header: "lin_bl20", value: |c| c.baselines.linear_r2_mean_top20, summary: "linear_r2_mean_top20" },
            Column { header: "repro", value: |c| c.field.change_reproducibility, summary: "change_reproducibility" },
        ]);
    }
    if truth {
        out.push(Column {
            header: "truth",
            value: |c| c.truth.map_or(f64::NAN, |t| t.r2_mean),
            summary: "truth_r2_mean",
        });
    }
    out
}

/// A condition's `beats_*` flag of one baseline.
type Beats = fn(&ConditionMetrics) -> f64;

/// The simple baselines ([`super::BaselineMetrics`]) by name and their `beats_*` flag.
const BASELINES: [(&str, Beats); 9] = [
    ("context mean", |c| c.baselines.beats_context_mean),
    ("matched mean", |c| c.baselines.beats_matched_mean),
    ("additive", |c| c.baselines.beats_additive),
    ("other covariates", |c| c.baselines.beats_other_covariates),
    ("scaled other covariates", |c| c.baselines.beats_other_covariates_scaled),
    ("nearest covariates", |c| c.baselines.beats_nearest_covariates),
    ("linear", |c| c.baselines.beats_linear),
    ("nearest perturbations", |c| c.baselines.beats_knn),
    ("linear on features", |c| c.baselines.beats_linear_features),
];

/// How many conditions the model beats each simple baseline on (all genes and the top 20 DEGs),
/// of those that have it; `None` where no condition has one.
fn baselines_line(report: &EvaluateReport) -> Option<String> {
    let counts: Vec<String> = BASELINES
        .iter()
        .filter_map(|(name, beats)| {
            let flags: Vec<f64> = report.conditions.iter().map(beats).filter(|v| v.is_finite()).collect();
            let beaten = flags.iter().filter(|&&v| v == 1.0).count();
            (!flags.is_empty()).then(|| format!("{name} {beaten} of {}", flags.len()))
        })
        .collect();
    (!counts.is_empty()).then(|| {
        format!(
            "the model beats the simple baselines (on all genes and the top-20 DEGs; beats_* in metrics.parquet) on: {}",
            counts.join(", ")
        )
    })
}

/// The printed table: one line per condition, `<` after the conditions where the model does not
/// beat the control mean and `~` after those whose change the data do not measure
/// ([`NOISE_REPRODUCIBILITY`]), and the means.
pub fn render_table(report: &EvaluateReport, set: MetricSet) -> String {
    let truth = report.conditions.iter().any(|c| c.truth.is_some());
    let columns = columns(set, truth);
    let mut out = String::new();
    let f = |v: f64| if v.is_finite() { format!(" {v:>8.3}") } else { format!(" {:>8}", "-") };
    let _ = write!(out, "{:<28} {:<16} {:>6} {:>6}", "condition", "covariates", "cells", "ctrl");
    for c in &columns {
        let _ = write!(out, " {:>8}", c.header);
    }
    out.push('\n');
    for c in &report.conditions {
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
        let _ = write!(out, "{name:<28} {covs:<16} {:>6} {:>6}", c.n_cells, c.n_control);
        for column in &columns {
            out.push_str(&f((column.value)(c)));
        }
        if c.field.beats_control == 0.0 {
            out.push_str(" <");
        }
        if c.field.change_reproducibility < NOISE_REPRODUCIBILITY {
            out.push_str(" ~");
        }
        out.push('\n');
    }
    let m = |k: &str| report.summary.get(k).copied().unwrap_or(f64::NAN);
    let _ = write!(out, "{:<28} {:<16} {:>6} {:>6}", "mean", "", "", "");
    for column in &columns {
        out.push_str(&f(m(column.summary)));
    }
    out.push('\n');
    if m("beats_control").is_finite() {
        let _ = writeln!(
            out,
            "the model beats the control mean (r2_mean > ctrl_bl) on {:.0}% of the conditions; `<` marks the others",
            100.0 * m("beats_control")
        );
    }
    if let Some(line) = baselines_line(report) {
        let _ = writeln!(out, "{line}");
    }
    if report.conditions.iter().any(|c| c.field.change_reproducibility < NOISE_REPRODUCIBILITY) {
        let _ = writeln!(
            out,
            "`~` marks the conditions whose change does not reproduce between halves of their cells \
             (change_reproducibility < {NOISE_REPRODUCIBILITY}): its scores measure noise"
        );
    }
    out
}
