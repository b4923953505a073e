//! cell-eval2 0.20.0's two expression members of the `vcc2026` profile, on the pseudobulks of
//! [`super::bulk`]: `pds_cosine` (`metrics/discrimination.py`, `distances.py`) and
//! `expr_mse_unbiased_capped_norm` with its components (`metrics/delta.py`). The functions
//! follow cell-eval2's definitions step by step; where it names an issue for a rule, the comment
//! here names it too.

use std::collections::HashMap;

use super::bulk::SideBulk;
use super::targets::{self, TargetGenes};
use crate::error::{Error, Result};

/// `PRED_TRACE_CAP_K` of cell-eval2 (issue #247): the prediction's sampling correction is
/// capped at this multiple of the reference's.
const PRED_TRACE_CAP_K: f64 = 1.0;

/// One value per perturbation, in the order of the perturbations' labels.
pub type PerPerturbation = Vec<(String, f64)>;

/// The expression metrics of a prediction against a reference.
#[derive(Debug, Clone, Default)]
pub struct ExpressionScores {
    /// Rank of the true perturbation among all by cosine of the effects (1 best, 0.5 chance).
    pub pds_cosine: PerPerturbation,
    /// `expr_mse_unbiased`: sampling-corrected squared error of the pseudobulks, uncapped (a
    /// diagnostic).
    pub mse_unbiased: PerPerturbation,
    /// `expr_mse_unbiased_capped`: the same with the prediction's correction capped (#247) and
    /// bounded by its spread across perturbations (#348): the numerator of the scored ratio.
    pub mse_unbiased_capped: PerPerturbation,
    /// `expr_distance_unbiased`: the reference's own corrected distance of each perturbation
    /// from the control: the denominator.
    pub distance_unbiased: PerPerturbation,
    /// `expr_mse_unbiased_capped_norm`: sum of the numerators over sum of the denominators (0
    /// perfect, 1 the control predicted).
    pub mse_unbiased_capped_norm: f64,
    /// Labels of the prediction that name no gene (scored with every gene), at most five.
    pub unresolved_targets: Vec<String>,
    /// How many perturbations name no gene.
    pub n_unresolved_targets: usize,
}

/// Scores `pred` against `real`, whose group `control` is the control cells; `genes` the gene
/// ids of both. `own_control`: the predicted effects are taken against the prediction's own
/// control cells (cell-eval2's `control_source="pred"`, the replicate's) rather than the
/// reference's (`"real"`, `vcc2026`'s).
pub fn score(
    pred: &SideBulk,
    real: &SideBulk,
    control: &str,
    genes: &[String],
    target_genes: TargetGenes,
    own_control: bool,
) -> Result<ExpressionScores> {
    let origin = real.path.display().to_string();
    let ci = real.row(control).ok_or_else(|| {
        Error::InvalidInput(format!(
            "{origin}: no cells of the control {control:?}; its groups: {}",
            crate::suggest::listing(control, real.labels.iter().map(String::as_str), 8)
        ))
    })?;
    let real_rows: Vec<usize> = (0..real.labels.len()).filter(|&j| j != ci).collect();
    if real_rows.is_empty() {
        return Err(Error::InvalidInput(format!("{origin}: no perturbed cells, only the control {control:?}")));
    }
    let pred_rows: Vec<usize> = (0..pred.labels.len()).filter(|&i| pred.labels[i] != control).collect();
    let mut aligned = Vec::with_capacity(pred_rows.len());
    for &i in &pred_rows {
        let label = &pred.labels[i];
        let j = real.row(label).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{}: perturbation {label:?} has no cells in the reference {origin}; its perturbations: {}",
                pred.path.display(),
                crate::suggest::listing(label, real_rows.iter().map(|&j| real.labels[j].as_str()), 8)
            ))
        })?;
        aligned.push(j);
    }
    if pred_rows.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{}: no predicted perturbation (only the control {control:?})",
            pred.path.display()
        )));
    }
    // Both components of the scored ratio cover the same perturbations (cell-eval2 refuses a
    // prediction that leaves some of the reference's out: it would choose its own denominator).
    if pred_rows.len() != real_rows.len() {
        let predicted: std::collections::HashSet<&str> = pred_rows.iter().map(|&i| pred.labels[i].as_str()).collect();
        let missing: Vec<&str> =
            real_rows.iter().map(|&j| real.labels[j].as_str()).filter(|l| !predicted.contains(l)).take(5).collect();
        return Err(Error::InvalidInput(format!(
            "{}: predicts {} of the reference's {} perturbations (missing {missing:?}...); cell-eval2 scores a \
             prediction of every perturbation of the reference",
            pred.path.display(),
            pred_rows.len(),
            real_rows.len()
        )));
    }
    let positions = targets::gene_positions(genes, &origin)?;
    let real_labels: Vec<&str> = real_rows.iter().map(|&j| real.labels[j].as_str()).collect();
    let pred_labels: Vec<&str> = pred_rows.iter().map(|&i| pred.labels[i].as_str()).collect();
    let pred_excluded =
        targets::resolve(&pred_labels, &positions, target_genes, &real_labels, "expr_mse_unbiased_capped_norm")?;
    let real_excluded =
        targets::resolve(&real_labels, &positions, target_genes, &real_labels, "expr_distance_unbiased")?;

    let pred_control = if own_control {
        let i = pred.row(control).ok_or_else(|| {
            Error::InvalidInput(format!("{}: no cells of the control {control:?}", pred.path.display()))
        })?;
        &pred.means[i]
    } else {
        &real.means[ci]
    };
    let pds_cosine = discrimination(pred, real, ci, pred_control, &pred_rows, &aligned, &real_rows, &real_excluded)?;
    let mse_unbiased = numerator(pred, real, &pred_rows, &aligned, &pred_excluded.columns, false);
    let mse_unbiased_capped = numerator(pred, real, &pred_rows, &aligned, &pred_excluded.columns, true);
    let distance_unbiased = distance(real, ci, &real_rows, &real_excluded.columns);
    let mse_unbiased_capped_norm = ratio_of_sums(&mse_unbiased_capped, &distance_unbiased, &origin)?;
    Ok(ExpressionScores {
        pds_cosine,
        mse_unbiased,
        mse_unbiased_capped,
        distance_unbiased,
        mse_unbiased_capped_norm,
        unresolved_targets: pred_excluded.unresolved,
        n_unresolved_targets: pred_excluded.n_unresolved,
    })
}

/// `pds_cosine` under `vcc2026` (control from the reference, every perturbation's target gene
/// left out of the whole panel (#343), ties at their midrank (#282), rank over n - 1): for each
/// predicted effect (prediction minus the reference's control), the rank of the true
/// perturbation's reference effect among all reference effects by cosine distance; `1 - rank /
/// (n - 1)`.
#[allow(clippy::too_many_arguments, reason = "the two sides' rows and controls, each named")]
fn discrimination(
    pred: &SideBulk,
    real: &SideBulk,
    ci: usize,
    pred_control: &[f64],
    pred_rows: &[usize],
    aligned: &[usize],
    real_rows: &[usize],
    real_excluded: &targets::Resolved,
) -> Result<PerPerturbation> {
    let n_genes = real.n_genes;
    let mut keep = vec![true; n_genes];
    for &col in real_excluded.columns.values() {
        keep[col] = false;
    }
    if !keep.iter().any(|&k| k) {
        return Err(Error::InvalidInput(format!(
            "{}: every one of the {n_genes} genes is the target of some perturbation, so pds_cosine, which leaves \
             them out, has nothing to compare",
            real.path.display()
        )));
    }
    let effect = |means: &[f64], control: &[f64]| -> Vec<f64> {
        means.iter().zip(control).zip(&keep).filter(|(_, k)| **k).map(|((m, c), _)| m - c).collect()
    };
    let real_effects: Vec<Vec<f64>> = real_rows.iter().map(|&j| effect(&real.means[j], &real.means[ci])).collect();
    let real_norms: Vec<f64> = real_effects.iter().map(|e| dot(e, e).sqrt()).collect();
    let position: HashMap<usize, usize> = real_rows.iter().enumerate().map(|(k, &j)| (j, k)).collect();
    let denominator = real_rows.len() as f64 - 1.0;
    let mut out = Vec::with_capacity(pred_rows.len());
    let mut distances = vec![0.0f64; real_rows.len()];
    for (&i, &j) in pred_rows.iter().zip(aligned) {
        let e = effect(&pred.means[i], pred_control);
        let norm = dot(&e, &e).sqrt();
        for (d, (r, rn)) in distances.iter_mut().zip(real_effects.iter().zip(&real_norms)) {
            let denom = norm * rn;
            let cosine = if denom != 0.0 { dot(&e, r) / denom } else { 0.0 };
            *d = (1.0 - cosine).clamp(0.0, 2.0);
        }
        let matched = distances[position[&j]];
        let (less, equal) = if matched.is_nan() {
            let less = distances.iter().filter(|d| !d.is_nan()).count();
            (less, distances.len() - less)
        } else {
            (distances.iter().filter(|&&d| d < matched).count(), distances.iter().filter(|&&d| d == matched).count())
        };
        let rank = less as f64 + (equal as f64 - 1.0) / 2.0;
        let score = if denominator <= 0.0 { 1.0 } else { 1.0 - rank / denominator };
        out.push((pred.labels[i].clone(), score));
    }
    Ok(out)
}

/// `expr_mse_unbiased` (`cap` false) or `expr_mse_unbiased_capped`: per perturbation, the squared
/// distance of the pseudobulks summed over the genes but its own, less both sampling corrections
/// (the prediction's capped at the reference's, #247, and all of them scaled down together to the
/// prediction's own spread across perturbations, #348), over the genes summed.
fn numerator(
    pred: &SideBulk,
    real: &SideBulk,
    pred_rows: &[usize],
    aligned: &[usize],
    excluded: &std::collections::BTreeMap<usize, usize>,
    cap: bool,
) -> PerPerturbation {
    let n_genes = pred.n_genes;
    let mut terms: Vec<f64> = pred_rows.iter().map(|&i| pred.jackknife[i]).collect();
    if cap {
        for (t, &j) in terms.iter_mut().zip(aligned) {
            *t = t.min(PRED_TRACE_CAP_K * real.jackknife[j]);
        }
        let weights = row_weights(pred_rows.len(), n_genes, excluded);
        let claim: f64 = terms.iter().zip(&weights).map(|(t, w)| t * w).sum();
        if claim > 0.0 {
            let rows: Vec<&[f64]> = pred_rows.iter().map(|&i| pred.means[i].as_slice()).collect();
            let ratio = across_perturbation_budget(&rows, excluded, &weights) / claim;
            if ratio < 1.0 {
                for t in &mut terms {
                    *t *= ratio;
                }
            }
        }
    }
    pred_rows
        .iter()
        .zip(aligned)
        .enumerate()
        .map(|(k, (&i, &j))| {
            let (p, r) = (&pred.means[i], &real.means[j]);
            let mut summed = squared_distance(p, r) - terms[k] - real.jackknife[j];
            let mut n_row = n_genes as f64;
            if let Some(&col) = excluded.get(&k) {
                summed -= (p[col] - r[col]).powi(2);
                n_row -= 1.0;
            }
            (pred.labels[i].clone(), per_gene(summed, n_row))
        })
        .collect()
}

/// `expr_distance_unbiased`: per reference perturbation, its corrected squared distance from the
/// reference's control over the genes but its own, over the genes summed.
fn distance(
    real: &SideBulk,
    ci: usize,
    real_rows: &[usize],
    excluded: &std::collections::BTreeMap<usize, usize>,
) -> PerPerturbation {
    let control = &real.means[ci];
    real_rows
        .iter()
        .enumerate()
        .map(|(k, &j)| {
            let m = &real.means[j];
            let mut summed = squared_distance(m, control) - real.jackknife[j] - real.jackknife[ci];
            let mut n_row = real.n_genes as f64;
            if let Some(&col) = excluded.get(&k) {
                summed -= (m[col] - control[col]).powi(2);
                n_row -= 1.0;
            }
            (real.labels[j].clone(), per_gene(summed, n_row))
        })
        .collect()
}

/// `1 / |G_p|` per row: the genes a row sums (all, or all but its target).
fn row_weights(n_rows: usize, n_genes: usize, excluded: &std::collections::BTreeMap<usize, usize>) -> Vec<f64> {
    (0..n_rows)
        .map(|k| {
            let n = if excluded.contains_key(&k) { n_genes as f64 - 1.0 } else { n_genes as f64 };
            if n > 0.0 { 1.0 / n } else { 0.0 }
        })
        .collect()
}

/// cell-eval2's `_across_pert_budget` (#348): per gene, the weighted centred sum of squares of
/// the predicted pseudobulks across the perturbations that score that gene (a row's own target
/// left out), summed over the genes with two such rows or more; a gene's negative rounding counts
/// as 0.
fn across_perturbation_budget(
    rows: &[&[f64]],
    excluded: &std::collections::BTreeMap<usize, usize>,
    weights: &[f64],
) -> f64 {
    let n_rows = rows.len();
    let n_genes = rows.first().map_or(0, |r| r.len());
    let mut mean = vec![0.0f64; n_genes];
    for r in rows {
        for (m, v) in mean.iter_mut().zip(r.iter()) {
            *m += v;
        }
    }
    for m in &mut mean {
        *m /= n_rows as f64;
    }
    let mut s1 = vec![0.0f64; n_genes];
    let mut s2 = vec![0.0f64; n_genes];
    for (r, &w) in rows.iter().zip(weights) {
        for g in 0..n_genes {
            let d = r[g] - mean[g];
            s1[g] += d * w;
            s2[g] += d * d * w;
        }
    }
    let total_weight: f64 = weights.iter().sum();
    let mut weight = vec![total_weight; n_genes];
    let mut count = vec![n_rows as f64; n_genes];
    for (&k, &col) in excluded {
        let d = rows[k][col] - mean[col];
        s1[col] -= weights[k] * d;
        s2[col] -= weights[k] * d * d;
        weight[col] -= weights[k];
        count[col] -= 1.0;
    }
    (0..n_genes)
        .filter(|&g| count[g] >= 2.0 && weight[g] > 0.0)
        .map(|g| (s2[g] - s1[g] * s1[g] / weight[g]).max(0.0))
        .sum()
}

/// `Σ numerators / Σ denominators` over the perturbations finite in both.
fn ratio_of_sums(numerators: &PerPerturbation, denominators: &PerPerturbation, origin: &str) -> Result<f64> {
    let den: HashMap<&str, f64> = denominators.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    let (mut n_sum, mut d_sum) = (0.0f64, 0.0f64);
    for (label, n) in numerators {
        if let Some(&d) = den.get(label.as_str())
            && n.is_finite()
            && d.is_finite()
        {
            n_sum += n;
            d_sum += d;
        }
    }
    if d_sum.is_nan() || d_sum <= 0.0 {
        return Err(Error::InvalidInput(format!(
            "{origin}: the reference's perturbations differ from its control by {d_sum} in all (the sum of \
             expr_distance_unbiased, once each group's sampling noise is taken out): the reference carries no \
             measurable effect at its depth, so expr_mse_unbiased_capped_norm is undefined"
        )));
    }
    Ok(n_sum / d_sum)
}

/// The sum of the squared differences.
fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `summed / n`, NaN when no gene is left.
fn per_gene(summed: f64, n: f64) -> f64 {
    if n > 0.0 { summed / n } else { f64::NAN }
}
