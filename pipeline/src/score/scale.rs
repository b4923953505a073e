//! The scaled scores of cell-eval2 0.20.0 (`scoring.score_one`, `score._replicate_entries`):
//! each scored member of `vcc2026` placed between the mean-response baseline `b` (0) and either
//! the metric's perfect value (`from_baseline`) or the split-half replicate `r`
//! (`from_replicate`, the competition's score), then averaged (`avg_score`). The two ends are
//! read from a real bundle that `cell-eval2 prep-real-bundle` wrote for the reference:
//! `baseline_agg.csv` (its `mean` row) and `anchor_agg.parquet` (`replicate`).

use std::collections::BTreeMap;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use serde::Serialize;

use crate::error::{Error, Result};

/// The exponent of the penalty below the baseline (`DEFAULT_PENALTY_EXPONENT`).
const PENALTY_EXPONENT: f64 = 2.0;
/// The floor of the penalised score (`DEFAULT_PENALTY_CAP`).
const PENALTY_CAP: f64 = 6.0;

/// How a member is scored (cell-eval2's `Scoring` of its catalog entry).
#[derive(Debug, Clone, Copy)]
struct Policy {
    /// Higher values are better.
    higher: bool,
    /// The perfect value (`from_baseline`'s far end).
    perfect: f64,
    /// Below the baseline a lower-is-better score follows the Box-Cox penalty.
    boxcox: bool,
    /// The lowest score (`-inf`: none).
    low: f64,
    /// The highest score.
    high: f64,
    /// What a missing value scores as, if the score has no floor.
    metric_min: Option<f64>,
}

/// `BOUNDED_UNFLOORED`: higher is better, perfect 1, no floor, a missing value scored as 0.
const UNFLOORED: Policy = Policy {
    higher: true,
    perfect: 1.0,
    boxcox: false,
    low: f64::NEG_INFINITY,
    high: f64::INFINITY,
    metric_min: Some(0.0),
};

/// The six scored members of `vcc2026` and their policies.
const MEMBERS: [(&str, Policy); 6] = [
    ("pds_cosine", UNFLOORED),
    (
        "expr_mse_unbiased_capped_norm",
        Policy { higher: false, perfect: 0.0, boxcox: true, low: 0.0, high: 1.0, metric_min: None },
    ),
    ("de_wilcoxon_direction_fidelity_yield_raw", UNFLOORED),
    ("de_wilcoxon_direction_reach_raw", UNFLOORED),
    ("de_wilcoxon_sig_jaccard", UNFLOORED),
    (
        "de_wilcoxon_lfc_nmae",
        Policy { higher: false, perfect: 0.0, boxcox: false, low: -6.0, high: f64::INFINITY, metric_min: None },
    ),
];

/// One member's ends and scores.
#[derive(Debug, Clone, Serialize)]
pub struct ScaledMember {
    /// The metric.
    pub metric: String,
    /// The prediction's aggregate.
    pub value: f64,
    /// The mean-response baseline's aggregate (`b`).
    pub baseline: f64,
    /// The split-half replicate's (`r`).
    pub replicate: f64,
    /// `(u - b) / (perfect - b)` (its penalty and clamps).
    pub from_baseline: f64,
    /// `(u - b) / (r - b)` (its penalty and clamps): the competition's.
    pub from_replicate: f64,
}

/// The scaled scores.
#[derive(Debug, Clone, Serialize)]
pub struct Scaled {
    /// The real bundle read (none: the ends computed here).
    pub bundle: Option<std::path::PathBuf>,
    /// Each scored member.
    pub members: Vec<ScaledMember>,
    /// The mean of `from_baseline`.
    pub avg_from_baseline: f64,
    /// The mean of `from_replicate`: the competition's score.
    pub avg_from_replicate: f64,
}

/// Whether `metric` is one of the six scored members.
pub fn is_scored(metric: &str) -> bool {
    MEMBERS.iter().any(|(m, _)| *m == metric)
}

/// Scores `aggregates` against the ends of the real bundle `bundle`.
pub fn scale(aggregates: &BTreeMap<String, f64>, bundle: &Path) -> Result<Scaled> {
    let baseline = read_baseline(&bundle.join("baseline_agg.csv"))?;
    let replicate = read_anchor(&bundle.join("anchor_agg.parquet"))?;
    scale_between(aggregates, &baseline, &replicate, Some(bundle), &bundle.display().to_string())
}

/// Scores `aggregates` between the `baseline` and `replicate` aggregates (from `bundle`, or
/// computed here); `origin` names where the ends come from in messages.
pub fn scale_between(
    aggregates: &BTreeMap<String, f64>,
    baseline: &BTreeMap<String, f64>,
    replicate: &BTreeMap<String, f64>,
    bundle: Option<&Path>,
    origin: &str,
) -> Result<Scaled> {
    let (baseline_file, replicate_file) = match bundle {
        Some(_) => ("baseline_agg.csv", "anchor_agg.parquet"),
        None => ("the baseline arm", "the split-half replicate"),
    };
    let mut members = Vec::with_capacity(MEMBERS.len());
    for (metric, policy) in MEMBERS {
        let end = |table: &BTreeMap<String, f64>, file: &str| {
            table.get(metric).copied().filter(|v| v.is_finite()).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{origin}: no finite {metric} in {file}, so the metric has no scale (cell-eval2 0.20.0's vcc2026 \
                     scale needs every member at both ends)"
                ))
            })
        };
        let b = end(baseline, baseline_file)?;
        let r = end(replicate, replicate_file)?;
        let u = aggregates.get(metric).copied().unwrap_or(f64::NAN);
        let to_replicate = Policy { perfect: r, ..policy };
        for (p, which) in [(policy, "the metric's perfect value"), (to_replicate, "the replicate")] {
            let headroom = if p.higher { p.perfect - b } else { b - p.perfect };
            if !(headroom.is_finite() && headroom > 0.0) {
                return Err(Error::InvalidInput(format!(
                    "{origin}: {metric}'s baseline {b} leaves no room below {which} ({}), so its scale is undefined",
                    p.perfect
                )));
            }
        }
        members.push(ScaledMember {
            metric: metric.to_owned(),
            value: u,
            baseline: b,
            replicate: r,
            from_baseline: score_one(u, b, policy),
            from_replicate: score_one(u, b, to_replicate),
        });
    }
    let mean = |f: fn(&ScaledMember) -> f64| members.iter().map(f).sum::<f64>() / members.len() as f64;
    Ok(Scaled {
        bundle: bundle.map(Path::to_path_buf),
        avg_from_baseline: mean(|m| m.from_baseline),
        avg_from_replicate: mean(|m| m.from_replicate),
        members,
    })
}

/// cell-eval2's `score_one`: the value between the baseline (0) and the perfect end (1), past
/// the baseline penalised (Box-Cox) or clamped; a missing value scores as the floor, or as the
/// metric's structural minimum where there is none.
fn score_one(u: f64, b: f64, p: Policy) -> f64 {
    let core = |u: f64| -> f64 {
        if p.higher {
            (u - b) / (p.perfect - b)
        } else {
            let ratio = (u - p.perfect) / (b - p.perfect);
            let s = 1.0 - ratio;
            if s < 0.0 && p.boxcox {
                let penalised = -(ratio.powf(PENALTY_EXPONENT) - 1.0) / PENALTY_EXPONENT;
                if penalised.is_finite() { penalised.max(-PENALTY_CAP) } else { -PENALTY_CAP }
            } else {
                s
            }
        }
    };
    let clip = |x: f64| {
        if x.is_nan() || x <= p.low {
            p.low
        } else if x >= p.high {
            p.high
        } else {
            x
        }
    };
    let unusable = || match p.metric_min {
        Some(min) if !p.low.is_finite() => clip(core(min)),
        _ => clip(f64::NEG_INFINITY),
    };
    if !u.is_finite() {
        return unusable();
    }
    let s = core(u);
    if !s.is_finite() { unusable() } else { clip(s) }
}

/// The `mean` row of a cell-eval2 wide aggregate (`baseline_agg.csv`), by metric.
fn read_baseline(path: &Path) -> Result<BTreeMap<String, f64>> {
    let text = read_small(path)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    if header.first() != Some(&"statistic") {
        return Err(Error::InvalidInput(format!(
            "{}: expected cell-eval2's aggregate (a first column `statistic`), found {:?}",
            path.display(),
            header.first().unwrap_or(&"")
        )));
    }
    let row = lines.find(|l| l.split(',').next() == Some("mean")).ok_or_else(|| {
        Error::InvalidInput(format!("{}: no `mean` row (cell-eval2's aggregate has one)", path.display()))
    })?;
    let values: Vec<&str> = row.split(',').collect();
    if values.len() != header.len() {
        return Err(Error::InvalidInput(format!(
            "{}: the `mean` row has {} fields, the header {}",
            path.display(),
            values.len(),
            header.len()
        )));
    }
    header[1..]
        .iter()
        .zip(&values[1..])
        .map(|(name, v)| {
            let value = match v.trim() {
                "" | "NaN" | "nan" => f64::NAN,
                text => text.parse::<f64>().map_err(|_| {
                    Error::InvalidInput(format!(
                        "{}: {name} of the `mean` row is {text:?}, not a number",
                        path.display()
                    ))
                })?,
            };
            Ok(((*name).to_owned(), value))
        })
        .collect()
}

/// `metric` -> `replicate` of a cell-eval2 anchor (`anchor_agg.parquet`).
fn read_anchor(path: &Path) -> Result<BTreeMap<String, f64>> {
    let batch: RecordBatch =
        cpa_stream_stages::store::read_small_table(path).map_err(Error::stage(crate::Stage::Read))?;
    let column = |name: &str| {
        batch.column_by_name(name).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{}: no column {name:?} (cell-eval2's anchor has metric, replicate)",
                path.display()
            ))
        })
    };
    let metrics = arrow_cast::cast(column("metric")?, &arrow_schema::DataType::Utf8)
        .map_err(Error::arrow(format!("{}: metric", path.display())))?;
    let values = arrow_cast::cast(column("replicate")?, &arrow_schema::DataType::Float64)
        .map_err(Error::arrow(format!("{}: replicate", path.display())))?;
    let (metrics, values) = (metrics.as_string::<i32>(), values.as_primitive::<arrow_array::types::Float64Type>());
    Ok((0..metrics.len())
        .filter(|&i| !metrics.is_null(i))
        .map(|i| (metrics.value(i).to_owned(), if values.is_null(i) { f64::NAN } else { values.value(i) }))
        .collect())
}

/// A small text file of a bundle (at most 16 MiB), read without following it anywhere.
fn read_small(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(Error::io(path))?;
    if !meta.is_file() || meta.len() > 16 << 20 {
        return Err(Error::InvalidInput(format!(
            "{}: expected a regular file of at most 16 MiB (a cell-eval2 aggregate)",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(Error::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_follow_cell_eval2s_policies() {
        let (pds, norm, nmae) = (MEMBERS[0].1, MEMBERS[1].1, MEMBERS[5].1);
        // Higher is better: the share of the way from the baseline to the far end.
        assert_eq!(score_one(0.8, 0.5, Policy { perfect: 0.9, ..pds }), (0.8 - 0.5) / (0.9 - 0.5));
        // Unfloored: past the baseline goes negative; a missing value scores as the metric's
        // minimum (0) would.
        assert_eq!(score_one(0.3, 0.5, pds), (0.3 - 0.5) / (1.0 - 0.5));
        assert_eq!(score_one(f64::NAN, 0.5, pds), (0.0 - 0.5) / (1.0 - 0.5));
        // Lower is better, clamped to [0, 1]: past the baseline is 0, past the far end 1.
        assert_eq!(score_one(0.25, 1.0, norm), 0.75);
        assert_eq!(score_one(2.0, 1.0, norm), 0.0);
        assert_eq!(score_one(-0.5, 1.0, Policy { perfect: -0.1, ..norm }), 1.0);
        // lfc_nmae: linear below the baseline down to -6, a missing value at the floor.
        assert_eq!(score_one(3.0, 1.0, Policy { perfect: 0.5, ..nmae }), 1.0 - (3.0 - 0.5) / (1.0 - 0.5));
        assert_eq!(score_one(100.0, 1.0, nmae), -6.0);
        assert_eq!(score_one(f64::NAN, 1.0, nmae), -6.0);
        // The Box-Cox penalty below the baseline, without the clamp that hides it in vcc2026.
        let penalised = Policy { low: -PENALTY_CAP, ..norm };
        assert_eq!(score_one(2.0, 1.0, penalised), -(2.0f64.powi(2) - 1.0) / 2.0);
        assert_eq!(score_one(50.0, 1.0, penalised), -PENALTY_CAP);
    }
}
