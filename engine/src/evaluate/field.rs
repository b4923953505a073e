//! The field's metrics beside the CPA paper's R2 family, computed from each condition's
//! pseudobulks (means over cells, held per condition: memory grows with conditions x genes, never
//! with cells), with cell-eval's definitions where it has them:
//!
//! - `pearson_delta`: Pearson correlation of the predicted and the real change from the control
//!   pseudobulk (cell-eval `pearson_delta`), on all genes and on the top-k DEGs;
//! - `mse`, `mae` of the pseudobulks and `mse_delta`, `mae_delta` of the changes (cell-eval);
//! - `cosine_delta`: cosine similarity of the changes (on log1p means, the change is a log fold
//!   change of `1 + x`);
//! - `deg_overlap_at_k`: the share of the k genes with the largest predicted change that are among
//!   the condition's top k DEGs;
//! - `direction_match_top20`, `spearman_delta_top20`: on the top 20 DEGs, the share whose change
//!   has the real sign, and the Spearman correlation of the predicted and real changes;
//! - `discrimination_{l1,l2,cosine}`: the normalised rank (0 best, 1 worst) of the condition's
//!   own real change among the real changes of every condition of the same covariates, by
//!   distance to its predicted change, genes named by the condition left out (cell-eval's
//!   `discrimination_score_*` is `1 -` this);
//! - `beats_control`: 1 when `r2_mean` beats the control mean's (`r2_mean_control`), else 0;
//! - with DEGs computed here (Welch's test, Benjamini-Hochberg over genes): `n_significant` (q <
//!   0.05, cell-eval's threshold) and `deg_precision_at_k`, the share of the k genes with the
//!   largest predicted change that are significant real DEGs.

use std::collections::HashMap;

/// Pearson correlation; NaN when either side is constant or empty.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return f64::NAN;
    }
    let (ma, mb) = (a[..n].iter().sum::<f64>() / n as f64, b[..n].iter().sum::<f64>() / n as f64);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 { f64::NAN } else { sab / (saa * sbb).sqrt() }
}

/// Ranks from 1, ties sharing their mean rank (as scipy's `rankdata`).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut out = vec![0.0; v.len()];
    let mut start = 0;
    while start < idx.len() {
        let mut end = start + 1;
        while end < idx.len() && v[idx[end]] == v[idx[start]] {
            end += 1;
        }
        let mean_rank = (start + end + 1) as f64 / 2.0;
        for &i in &idx[start..end] {
            out[i] = mean_rank;
        }
        start = end;
    }
    out
}

/// Spearman correlation: Pearson of the ranks, ties averaged.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

/// Cosine similarity; NaN when either vector is zero.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let (na, nb) = (a.iter().map(|x| x * x).sum::<f64>().sqrt(), b.iter().map(|x| x * x).sum::<f64>().sqrt());
    if na == 0.0 || nb == 0.0 { f64::NAN } else { dot / (na * nb) }
}

/// Mean squared error.
pub fn mse(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len().max(1) as f64
}

/// Mean absolute error.
pub fn mae(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len().max(1) as f64
}

/// The share of `predicted`'s first k that are among `real`'s first k; NaN when either has
/// fewer than k.
pub fn overlap_at(predicted: &[usize], real: &[usize], k: usize) -> f64 {
    if k == 0 || predicted.len() < k || real.len() < k {
        return f64::NAN;
    }
    let real: std::collections::HashSet<usize> = real[..k].iter().copied().collect();
    predicted[..k].iter().filter(|g| real.contains(g)).count() as f64 / k as f64
}

/// The share of `predicted`'s first k that are in `significant` (a condition's significant real
/// DEGs); NaN when fewer than k are predicted or nothing is significant.
pub fn precision_at(predicted: &[usize], significant: &[usize], k: usize) -> f64 {
    if k == 0 || predicted.len() < k || significant.is_empty() {
        return f64::NAN;
    }
    let set: std::collections::HashSet<usize> = significant.iter().copied().collect();
    predicted[..k].iter().filter(|g| set.contains(g)).count() as f64 / k as f64
}

/// The share of `genes` where the predicted and the real change have the same sign (a zero
/// change matches only zero).
pub fn direction_match(pred_delta: &[f64], real_delta: &[f64], genes: &[usize]) -> f64 {
    if genes.is_empty() {
        return f64::NAN;
    }
    let same = genes.iter().filter(|&&g| pred_delta[g].signum() == real_delta[g].signum()).count();
    same as f64 / genes.len() as f64
}

/// Distances between two changes for the discrimination ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distance {
    /// Sum of absolute differences.
    L1,
    /// Euclidean.
    L2,
    /// One minus the cosine similarity.
    Cosine,
}

impl Distance {
    /// Every distance, in the order of the metric columns.
    pub const ALL: [Distance; 3] = [Distance::L1, Distance::L2, Distance::Cosine];

    /// The metric column's suffix.
    pub fn name(self) -> &'static str {
        match self {
            Distance::L1 => "l1",
            Distance::L2 => "l2",
            Distance::Cosine => "cosine",
        }
    }

    fn between(self, a: &[f64], b: &[f64], keep: &[bool]) -> f64 {
        let pairs = a.iter().zip(b).zip(keep).filter(|(_, k)| **k).map(|(p, _)| p);
        match self {
            Distance::L1 => pairs.map(|(x, y)| (x - y).abs()).sum(),
            Distance::L2 => pairs.map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt(),
            Distance::Cosine => {
                let (mut dot, mut na, mut nb) = (0.0, 0.0, 0.0);
                for (x, y) in pairs {
                    dot += x * y;
                    na += x * x;
                    nb += y * y;
                }
                // scikit-learn's cosine distance treats a zero vector as distance 1.
                if na == 0.0 || nb == 0.0 { 1.0 } else { 1.0 - dot / (na * nb).sqrt() }
            }
        }
    }
}

/// One condition as the discrimination ranks see it.
pub struct Effects<'a> {
    /// Conditions are ranked only against conditions of the same group (covariates).
    pub group: &'a [String],
    /// The predicted change from the control pseudobulk.
    pub predicted: &'a [f64],
    /// The real change; `None` without real cells (such a condition is neither ranked nor a
    /// candidate).
    pub real: Option<&'a [f64]>,
    /// Genes left out of its distances (those named by its perturbations).
    pub exclude: Vec<usize>,
}

/// For each condition, its real change's normalised rank (0 best: `rank / n`, with n the
/// conditions of its group that have real cells) among the real changes of its group by
/// `distance` to its predicted change; NaN without real cells. Ties keep the order of the
/// conditions (as a stable sort of cell-eval's distances). NaN for a condition alone in its group.
pub fn discrimination_ranks(effects: &[Effects<'_>], distance: Distance) -> Vec<f64> {
    let mut groups: HashMap<&[String], Vec<usize>> = HashMap::new();
    for (i, e) in effects.iter().enumerate() {
        if e.real.is_some() {
            groups.entry(e.group).or_default().push(i);
        }
    }
    effects
        .iter()
        .enumerate()
        .map(|(i, e)| {
            // Alone in its group, a condition has nothing to be told apart from.
            let Some(members) = e.real.and(groups.get(e.group)).filter(|m| m.len() >= 2) else { return f64::NAN };
            let mut keep = vec![true; e.predicted.len()];
            for &g in &e.exclude {
                if let Some(k) = keep.get_mut(g) {
                    *k = false;
                }
            }
            let distances: Vec<(usize, f64)> = members
                .iter()
                .map(|&j| (j, distance.between(effects[j].real.unwrap_or(&[]), e.predicted, &keep)))
                .collect();
            let own = distances.iter().find(|(j, _)| *j == i).map_or(f64::NAN, |d| d.1);
            // The position of its own among the distances sorted ascending (stable: an earlier
            // condition with the same distance comes first).
            let rank = distances.iter().filter(|(j, d)| *d < own || (*d == own && *j < i)).count();
            rank as f64 / members.len() as f64
        })
        .collect()
}

/// PerturBench's pseudocount of its log fold changes.
pub const PERTURBENCH_PSEUDOCOUNT: f64 = 0.1;

/// PerturBench's `logfc` pseudobulk: `log2(mean + 0.1) - log2(control + 0.1)` per gene, of the
/// pseudobulks as they are (log1p means for count models).
pub fn perturbench_logfc(mean: &[f64], control: &[f64]) -> Vec<f64> {
    let l = |v: f64| (v + PERTURBENCH_PSEUDOCOUNT).log2();
    mean.iter().zip(control).map(|(&m, &c)| l(m) - l(c)).collect()
}

/// One condition as PerturBench's rank metrics see it: a predicted and (with real cells) a real
/// vector, compared within its group.
pub struct Ranked<'a> {
    /// Conditions are ranked only against conditions of the same group (covariates).
    pub group: &'a [String],
    /// The predicted vector.
    pub predicted: &'a [f64],
    /// The real vector; `None` without real cells (neither ranked nor a candidate).
    pub real: Option<&'a [f64]>,
}

/// PerturBench's rank metric: for each condition with real cells, the position of its own
/// prediction among the predictions of its group's conditions with real cells, ordered by
/// `score(prediction, its real vector)` best first (`higher_is_better` for similarities), over
/// their number (0 best). Ties keep the conditions' order (PerturBench shuffles them). NaN
/// without real cells or alone in its group.
pub fn perturbench_ranks(
    conditions: &[Ranked<'_>],
    score: impl Fn(&[f64], &[f64]) -> f64,
    higher_is_better: bool,
) -> Vec<f64> {
    let mut groups: HashMap<&[String], Vec<usize>> = HashMap::new();
    for (i, c) in conditions.iter().enumerate() {
        if c.real.is_some() {
            groups.entry(c.group).or_default().push(i);
        }
    }
    conditions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (Some(real), Some(members)) = (c.real, groups.get(c.group)) else { return f64::NAN };
            if members.len() < 2 {
                return f64::NAN;
            }
            let key = |j: usize| {
                let v = score(conditions[j].predicted, real);
                if higher_is_better { -v } else { v }
            };
            let own = key(i);
            let rank = members.iter().filter(|&&j| key(j) < own || (key(j) == own && j < i)).count();
            rank as f64 / members.len() as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12 || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn correlations_and_errors_by_hand() {
        // x = 1,2,3 ; y = 2,4,7: means 2 and 13/3; cov terms: (-1)(-7/3) + 0 + (1)(8/3) = 5;
        // sxx = 2, syy = 49/9 + 1/9 + 64/9 = 114/9; r = 5 / sqrt(2 * 114/9).
        let r = pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 7.0]);
        assert!(close(r, 5.0 / (2.0f64 * 114.0 / 9.0).sqrt()), "{r}");
        assert!(pearson(&[1.0, 1.0], &[1.0, 2.0]).is_nan(), "constant side");
        assert!(close(spearman(&[1.0, 2.0, 3.0], &[2.0, 4.0, 7.0]), 1.0));
        // Ties share the mean rank: [1, 2.5, 2.5] against [1, 2, 3].
        assert!(close(spearman(&[0.0, 5.0, 5.0], &[1.0, 2.0, 3.0]), pearson(&[1.0, 2.5, 2.5], &[1.0, 2.0, 3.0])));
        assert!(close(cosine(&[1.0, 0.0], &[1.0, 1.0]), 1.0 / 2f64.sqrt()));
        assert!(cosine(&[0.0, 0.0], &[1.0, 1.0]).is_nan());
        assert!(close(mse(&[1.0, 2.0], &[2.0, 4.0]), 2.5));
        assert!(close(mae(&[1.0, 2.0], &[2.0, 4.0]), 1.5));
    }

    #[test]
    fn overlaps_and_directions_by_hand() {
        assert!(close(overlap_at(&[3, 1, 2, 9], &[1, 3, 7, 8], 2), 1.0));
        assert!(close(overlap_at(&[3, 1, 2, 9], &[1, 3, 7, 8], 4), 0.5));
        assert!(overlap_at(&[3], &[1, 3], 2).is_nan(), "too few predicted genes");
        assert!(close(precision_at(&[3, 1, 2, 9], &[9, 3], 2), 0.5));
        assert!(close(precision_at(&[3, 1, 2, 9], &[9, 3], 4), 0.5));
        assert!(precision_at(&[3, 1], &[], 2).is_nan(), "nothing significant");
        let (pred, real) = ([1.0, -2.0, 0.5, 0.0], [2.0, 1.0, 0.1, -1.0]);
        assert!(close(direction_match(&pred, &real, &[0, 1, 2]), 2.0 / 3.0));
        assert!(close(direction_match(&pred, &real, &[3]), 0.0), "no change where there is one");
    }

    #[test]
    fn discrimination_ranks_by_hand() {
        let group = vec!["k562".to_owned()];
        let other = vec!["a549".to_owned()];
        let real = [vec![1.0, 0.0], vec![0.0, 1.0], vec![5.0, 5.0]];
        // Condition 0 predicted close to its own real change: rank 0. Condition 1 predicted close
        // to condition 0's: rank 1 of 3 (only 0 is closer). Condition 2: farthest from its own
        // among three: rank 2 of 3. Condition 3 is alone in its group and 4 has no real cells:
        // neither has a rank.
        let predicted = [vec![0.9, 0.1], vec![1.0, 0.1], vec![-5.0, -5.0], vec![1.0, 1.0], vec![1.0, 1.0]];
        let effects: Vec<Effects> = (0..5)
            .map(|i| Effects {
                group: if i == 3 { &other } else { &group },
                predicted: &predicted[i],
                real: match i {
                    0..=2 => Some(&real[i][..]),
                    3 => Some(&real[0][..]),
                    _ => None,
                },
                exclude: Vec::new(),
            })
            .collect();
        let l1 = discrimination_ranks(&effects, Distance::L1);
        assert!(close(l1[0], 0.0) && close(l1[1], 1.0 / 3.0) && close(l1[2], 2.0 / 3.0), "{l1:?}");
        assert!(l1[3].is_nan() && l1[4].is_nan(), "alone, or without cells: {l1:?}");
        // Leaving out gene 0, condition 1's prediction (0.1) is 0.1 from condition 0's change
        // (0.0), 0.9 from its own (1.0) and 4.9 from condition 2's: still rank 1.
        let mut excluded = effects;
        excluded[1].exclude = vec![0];
        let l1 = discrimination_ranks(&excluded, Distance::L1);
        assert!(close(l1[1], 1.0 / 3.0), "{l1:?}");
        // Cosine: condition 2's prediction (-5, -5) is 1.707 from conditions 0 and 1 and 2 (the
        // largest) from its own (5, 5).
        let cos = discrimination_ranks(&excluded, Distance::Cosine);
        assert!(close(cos[2], 2.0 / 3.0), "{cos:?}");
    }

    /// The stored fixture `tests/fixtures/cell_eval/reference.json`.
    fn reference() -> serde_json::Value {
        let path = crate::test_fixture("cell_eval/reference.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A JSON array of numbers.
    fn vector(v: &serde_json::Value) -> Vec<f64> {
        v.as_array().map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect()).unwrap_or_default()
    }

    /// A JSON array of strings.
    fn names(v: &serde_json::Value) -> Vec<String> {
        v.as_array().map(|a| a.iter().filter_map(|g| g.as_str().map(str::to_owned)).collect()).unwrap_or_default()
    }

    /// The definitions against cell-eval 0.8.2's own numbers on a seeded fixture
    /// (tests/fixtures/cell_eval/make_reference.py made reference.json with cell-eval installed).
    #[test]
    fn agree_with_cell_eval_to_1e5() {
        let r = reference();
        let genes = names(&r["genes"]);
        let perts = names(&r["perturbations"]);
        assert_eq!(perts.len(), 5);
        let (ctrl_real, ctrl_pred) = (vector(&r["control_real"]), vector(&r["control_pred"]));
        let minus = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
        let real: Vec<Vec<f64>> = perts.iter().map(|p| vector(&r["real"][p])).collect();
        let pred: Vec<Vec<f64>> = perts.iter().map(|p| vector(&r["pred"][p])).collect();
        let real_delta: Vec<Vec<f64>> = real.iter().map(|m| minus(m, &ctrl_real)).collect();
        let pred_delta: Vec<Vec<f64>> = pred.iter().map(|m| minus(m, &ctrl_pred)).collect();
        let expect = |metric: &str, p: &str| r["metrics"][metric][p].as_f64().unwrap_or(f64::NAN);
        let check = |metric: &str, p: &str, ours: f64| {
            let theirs = expect(metric, p);
            assert!((ours - theirs).abs() <= 1e-5, "{metric} of {p}: ours {ours}, cell-eval {theirs}");
        };
        for (i, p) in perts.iter().enumerate() {
            check("pearson_delta", p, pearson(&pred_delta[i], &real_delta[i]));
            check("mse", p, mse(&pred[i], &real[i]));
            check("mae", p, mae(&pred[i], &real[i]));
            check("mse_delta", p, mse(&pred_delta[i], &real_delta[i]));
            check("mae_delta", p, mae(&pred_delta[i], &real_delta[i]));
        }
        let group = vec!["one cell line".to_owned()];
        let effects: Vec<Effects> = perts
            .iter()
            .enumerate()
            .map(|(i, p)| Effects {
                group: &group,
                predicted: &pred_delta[i],
                real: Some(&real_delta[i]),
                exclude: genes.iter().enumerate().filter(|(_, g)| *g == p).map(|(j, _)| j).collect(),
            })
            .collect();
        for distance in Distance::ALL {
            let ranks = discrimination_ranks(&effects, distance);
            for (i, p) in perts.iter().enumerate() {
                // cell-eval's score is 1 - the normalised rank.
                check(&format!("discrimination_score_{}", distance.name()), p, 1.0 - ranks[i]);
            }
        }
    }

    /// PerturBench's metrics by its formulas (no package on PyPI; `make_reference.py` writes the
    /// numbers from its definitions), on the same fixture, as predicted and with the predictions
    /// rotated by one perturbation (ranks not all 0).
    #[test]
    fn agree_with_perturbench_formulas() {
        let r = reference();
        let perts = names(&r["perturbations"]);
        let control = vector(&r["control_real"]);
        let real: Vec<Vec<f64>> = perts.iter().map(|p| vector(&r["real"][p])).collect();
        let pred: Vec<Vec<f64>> = perts.iter().map(|p| vector(&r["pred"][p])).collect();
        let rotated: Vec<Vec<f64>> = (0..perts.len()).map(|i| pred[(i + 1) % perts.len()].clone()).collect();
        let group: Vec<String> = Vec::new();
        for (key, pred) in [("perturbench", &pred), ("perturbench_rotated", &rotated)] {
            let expect = |metric: &str, p: &str| r[key][metric][p].as_f64().unwrap_or(f64::NAN);
            let plfc: Vec<Vec<f64>> = pred.iter().map(|m| perturbench_logfc(m, &control)).collect();
            let rlfc: Vec<Vec<f64>> = real.iter().map(|m| perturbench_logfc(m, &control)).collect();
            fn conditions<'a>(group: &'a [String], p: &'a [Vec<f64>], q: &'a [Vec<f64>]) -> Vec<Ranked<'a>> {
                p.iter().zip(q).map(|(p, q)| Ranked { group, predicted: p, real: Some(q) }).collect()
            }
            let rank_cosine = perturbench_ranks(&conditions(&group, &plfc, &rlfc), cosine, true);
            let rank_rmse = perturbench_ranks(&conditions(&group, pred, &real), |a, b| mse(a, b).sqrt(), false);
            for (i, p) in perts.iter().enumerate() {
                for (metric, ours) in [
                    ("cosine_logfc", cosine(&plfc[i], &rlfc[i])),
                    ("rmse_average", mse(&pred[i], &real[i]).sqrt()),
                    ("rank_cosine_logfc", rank_cosine[i]),
                    ("rank_rmse_average", rank_rmse[i]),
                ] {
                    let theirs = expect(metric, p);
                    assert!((ours - theirs).abs() <= 1e-9, "{key} {metric} of {p}: ours {ours}, PerturBench {theirs}");
                }
            }
        }
    }
}
