//! Sufficient statistics of cells (streamed, bounded memory) and the scores computed from them,
//! shared by validation and evaluation.

/// sklearn's R2 of `pred` against `truth` (1 when the truth is constant and matched, else 0 for a
/// constant truth).
pub fn r2_score(pred: &[f64], truth: &[f64]) -> f64 {
    let n = truth.len().max(1) as f64;
    let mean = truth.iter().sum::<f64>() / n;
    let ss_res: f64 = pred.iter().zip(truth).map(|(p, t)| (t - p).powi(2)).sum();
    let ss_tot: f64 = truth.iter().map(|t| (t - mean).powi(2)).sum();
    if ss_tot == 0.0 {
        return if ss_res == 0.0 { 1.0 } else { 0.0 };
    }
    1.0 - ss_res / ss_tot
}

/// Count, per-gene sums and sums of squares of a set of cells.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// Cells.
    pub n: f64,
    /// Per-gene sums.
    pub sum: Vec<f64>,
    /// Per-gene sums of squares.
    pub sq: Vec<f64>,
}

impl Moments {
    /// No cells, `genes` genes.
    pub fn new(genes: usize) -> Moments {
        Moments { n: 0.0, sum: vec![0.0; genes], sq: vec![0.0; genes] }
    }

    /// Moments from their sums.
    pub fn from_sums(n: f64, sum: Vec<f64>, sq: Vec<f64>) -> Moments {
        Moments { n, sum, sq }
    }

    /// Adds one cell given by its non-zero entries (`log1p` of them for count data; zeros add
    /// nothing either way).
    pub fn add_sparse(&mut self, genes: &[u32], values: &[f32], log1p: bool) {
        self.n += 1.0;
        for (&g, &v) in genes.iter().zip(values) {
            let v = if log1p { f64::from(v).ln_1p() } else { f64::from(v) };
            self.sum[g as usize] += v;
            self.sq[g as usize] += v * v;
        }
    }

    /// Adds another set's cells.
    pub fn merge(&mut self, other: &Moments) {
        self.n += other.n;
        self.sum.iter_mut().zip(&other.sum).for_each(|(a, b)| *a += b);
        self.sq.iter_mut().zip(&other.sq).for_each(|(a, b)| *a += b);
    }

    /// Per-gene means (NaN without cells).
    pub fn mean(&self) -> Vec<f64> {
        self.sum.iter().map(|s| s / self.n).collect()
    }

    /// Per-gene variances over cells (population, as numpy's default `var`).
    pub fn var(&self) -> Vec<f64> {
        self.sum.iter().zip(&self.sq).map(|(s, q)| (q / self.n - (s / self.n).powi(2)).max(0.0)).collect()
    }

    /// Per-gene sample variances (n - 1 in the denominator).
    pub fn sample_var(&self) -> Vec<f64> {
        let scale = if self.n > 1.0 { self.n / (self.n - 1.0) } else { f64::NAN };
        self.var().into_iter().map(|v| v * scale).collect()
    }
}

/// Welch's t statistic of every gene, `a` against `b`: `(mean_a - mean_b) / sqrt(s2_a / n_a +
/// s2_b / n_b)` with sample variances. A gene constant in both groups scores 0 when the means
/// agree and +-infinity when they differ.
pub fn welch_t(a: &Moments, b: &Moments) -> Vec<f64> {
    let (ma, mb, va, vb) = (a.mean(), b.mean(), a.sample_var(), b.sample_var());
    (0..ma.len())
        .map(|g| {
            let diff = ma[g] - mb[g];
            let se = (va[g] / a.n + vb[g] / b.n).sqrt();
            if se > 0.0 {
                diff / se
            } else if diff == 0.0 || diff.is_nan() {
                0.0
            } else {
                diff.signum() * f64::INFINITY
            }
        })
        .collect()
}

/// Welch's two-sided test of every gene, `a` against `b`: the t statistic ([`welch_t`]) and its
/// p-value from Student's t with the Welch-Satterthwaite degrees of freedom (scipy's
/// `ttest_ind(equal_var=False)`). A gene constant in both groups has p 1 when the means agree and
/// 0 when they differ.
pub fn welch_test(a: &Moments, b: &Moments) -> (Vec<f64>, Vec<f64>) {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    let t = welch_t(a, b);
    let (va, vb) = (a.sample_var(), b.sample_var());
    let p = t
        .iter()
        .enumerate()
        .map(|(g, &t)| {
            let (sa, sb) = (va[g] / a.n, vb[g] / b.n);
            let df = (sa + sb).powi(2) / (sa * sa / (a.n - 1.0) + sb * sb / (b.n - 1.0));
            if t.is_infinite() {
                return 0.0;
            }
            let spread = sa + sb;
            if t == 0.0 && (spread.is_nan() || spread <= 0.0) {
                return 1.0;
            }
            match StudentsT::new(0.0, 1.0, df) {
                Ok(dist) if df.is_finite() && df > 0.0 => (2.0 * dist.sf(t.abs())).min(1.0),
                _ => f64::NAN,
            }
        })
        .collect();
    (t, p)
}

/// Benjamini-Hochberg adjusted p-values (q-values), as scipy's `false_discovery_control` (the
/// same operations: `p * (m / i)`, then the running minimum from the largest); a NaN p-value
/// counts as 1 and stays NaN.
pub fn benjamini_hochberg(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let value = |i: usize| if p[i].is_nan() { 1.0 } else { p[i] };
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| value(a).total_cmp(&value(b)).then(a.cmp(&b)));
    let mut q = vec![f64::NAN; m];
    let mut running = 1.0f64;
    for (rank, &i) in order.iter().enumerate().rev() {
        running = running.min(value(i) * (m as f64 / (rank + 1) as f64));
        q[i] = if p[i].is_nan() { f64::NAN } else { running.min(1.0) };
    }
    q
}

/// Two-sided p-value of the Wilcoxon rank-sum (Mann-Whitney U) test of `x` against `y`: the
/// normal approximation with the tie correction and a continuity correction, as scipy's
/// `mannwhitneyu(x, y, method="asymptotic")`. NaN when either sample is empty or every value
/// is tied.
pub fn rank_sum_p(x: &[f32], y: &[f32]) -> f64 {
    let (n1, n2) = (x.len() as f64, y.len() as f64);
    if x.is_empty() || y.is_empty() {
        return f64::NAN;
    }
    let mut all: Vec<(f32, bool)> = x.iter().map(|&v| (v, true)).chain(y.iter().map(|&v| (v, false))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = all.len();
    let (mut rank_sum_x, mut ties) = (0.0f64, 0.0f64);
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && all[j].0 == all[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j share their mean.
        let rank = (i + 1 + j) as f64 / 2.0;
        let t = (j - i) as f64;
        ties += t * t * t - t;
        rank_sum_x += rank * all[i..j].iter().filter(|e| e.1).count() as f64;
        i = j;
    }
    let u = rank_sum_x - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let total = n1 + n2;
    let var = n1 * n2 / 12.0 * ((total + 1.0) - ties / (total * (total - 1.0)));
    if var <= 0.0 {
        return f64::NAN;
    }
    let z = ((u - mean).abs() - 0.5).max(0.0) / var.sqrt();
    (2.0 * normal_sf(z)).min(1.0)
}

/// The standard normal survival function.
fn normal_sf(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

/// The energy distance of two samples of rows (Euclidean, the V-statistic as `dcor`'s
/// `energy_distance`): `2 E|X - Y| - E|X - X'| - E|Y - Y'|`, 0 for equal distributions. NaN when
/// a sample is empty.
pub fn energy_distance(x: &[Vec<f32>], y: &[Vec<f32>]) -> f64 {
    if x.is_empty() || y.is_empty() {
        return f64::NAN;
    }
    let dist = |a: &[f32], b: &[f32]| -> f64 {
        a.iter().zip(b).map(|(p, q)| (f64::from(*p) - f64::from(*q)).powi(2)).sum::<f64>().sqrt()
    };
    let mean_between = |a: &[Vec<f32>], b: &[Vec<f32>]| -> f64 {
        let total: f64 = a.iter().map(|r| b.iter().map(|s| dist(r, s)).sum::<f64>()).sum();
        total / (a.len() * b.len()) as f64
    };
    2.0 * mean_between(x, y) - mean_between(x, x) - mean_between(y, y)
}

/// Groups of equal scores, highest first: `(positives, negatives)` per distinct score (NaN
/// scores count as the lowest).
fn tied_groups(labels: &[bool], scores: &[f64]) -> Vec<(f64, f64)> {
    let key = |i: usize| if scores[i].is_nan() { f64::NEG_INFINITY } else { scores[i] };
    let mut order: Vec<usize> = (0..labels.len().min(scores.len())).collect();
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
    let mut groups: Vec<(f64, f64)> = Vec::new();
    let mut last = None;
    for i in order {
        if last != Some(key(i)) {
            groups.push((0.0, 0.0));
            last = Some(key(i));
        }
        if let Some(g) = groups.last_mut() {
            if labels[i] { g.0 += 1.0 } else { g.1 += 1.0 }
        }
    }
    groups
}

/// Average precision of `scores` ranking the `labels` (the area under the precision-recall
/// curve as a step sum over the distinct thresholds, scikit-learn's `average_precision_score`).
/// NaN without positives.
pub fn average_precision(labels: &[bool], scores: &[f64]) -> f64 {
    let groups = tied_groups(labels, scores);
    let positives: f64 = groups.iter().map(|g| g.0).sum();
    if positives == 0.0 {
        return f64::NAN;
    }
    let (mut tp, mut fp, mut ap) = (0.0, 0.0, 0.0);
    for (pos, neg) in groups {
        tp += pos;
        fp += neg;
        ap += pos / positives * (tp / (tp + fp));
    }
    ap
}

/// Area under the ROC curve of `scores` ranking the `labels` (trapezoids over the distinct
/// thresholds, scikit-learn's `roc_curve` + `auc`: ties count half). NaN unless both classes occur.
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> f64 {
    let groups = tied_groups(labels, scores);
    let (positives, negatives): (f64, f64) = groups.iter().fold((0.0, 0.0), |a, g| (a.0 + g.0, a.1 + g.1));
    if positives == 0.0 || negatives == 0.0 {
        return f64::NAN;
    }
    let (mut tp, mut area) = (0.0, 0.0);
    for (pos, neg) in groups {
        area += neg * (tp + pos / 2.0);
        tp += pos;
    }
    area / (positives * negatives)
}

/// Indices of the `k` largest `|score|`, largest first (ties by index, NaN as 0).
pub fn top_by_abs(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let key = |i: usize| if scores[i].is_nan() { 0.0 } else { scores[i].abs() };
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(cells: &[&[f64]]) -> Moments {
        let genes = cells[0].len();
        let mut m = Moments::new(genes);
        for c in cells {
            let (idx, val): (Vec<u32>, Vec<f32>) =
                c.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(g, v)| (g as u32, *v as f32)).unzip();
            m.add_sparse(&idx, &val, false);
        }
        m
    }

    #[test]
    fn moments_give_numpy_means_and_variances() {
        let m = moments(&[&[1.0, 0.0], &[3.0, 2.0], &[5.0, 4.0]]);
        assert_eq!(m.mean(), [3.0, 2.0]);
        // numpy: np.var([1, 3, 5]) = 8/3, np.var([0, 2, 4]) = 8/3; ddof=1: 4.
        assert!((m.var()[0] - 8.0 / 3.0).abs() < 1e-12);
        assert!((m.sample_var()[1] - 4.0).abs() < 1e-12);
        let mut log = Moments::new(1);
        log.add_sparse(&[0], &[1.0], true);
        assert!((log.sum[0] - 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn welch_p_values_and_q_values_match_scipy() {
        // scipy.stats.ttest_ind([1, 2, 3, 4], [2, 4, 6, 9, 7], equal_var=False):
        // statistic -2.2629143880251155, pvalue 0.06457258080137228.
        let a = moments(&[&[1.0, 5.0], &[2.0, 5.0], &[3.0, 5.0], &[4.0, 5.0]]);
        let b = moments(&[&[2.0, 5.0], &[4.0, 5.0], &[6.0, 5.0], &[9.0, 5.0], &[7.0, 5.0]]);
        let (t, p) = welch_test(&a, &b);
        assert!((t[0] + 2.2629143880251155).abs() < 1e-9, "{t:?}");
        assert!((p[0] - 0.06457258080137228).abs() < 1e-9, "{p:?}");
        assert_eq!(p[1], 1.0, "constant and equal in both groups");
        // scipy.stats.false_discovery_control([0.01, 0.04, 0.03, 0.2, 0.5]).
        let q = benjamini_hochberg(&[0.01, 0.04, 0.03, 0.2, 0.5]);
        let want = [0.05, 0.06666666666666667, 0.06666666666666667, 0.25, 0.5];
        assert!(q.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{q:?}");
        assert!(benjamini_hochberg(&[f64::NAN, 0.01])[0].is_nan());
    }

    #[test]
    fn rank_sum_matches_scipy_and_energy_distance_by_hand() {
        // scipy.stats.mannwhitneyu(x, y, method="asymptotic").pvalue (scipy 1.17.1; ties included).
        let x = [1.0f32, 2.0, 2.0, 3.0, 5.0, 8.0];
        let y = [2.0f32, 4.0, 6.0, 7.0, 9.0, 9.0, 10.0];
        let p = rank_sum_p(&x, &y);
        assert!((p - 0.072_160_113).abs() < 1e-8, "{p}");
        // Identical samples: p = 1; all tied: NaN; empty: NaN.
        assert!((rank_sum_p(&x, &x) - 1.0).abs() < 1e-12);
        assert!(rank_sum_p(&[1.0, 1.0], &[1.0]).is_nan());
        assert!(rank_sum_p(&[], &y).is_nan());
        // Energy distance of {0} and {3} (1-d): 2*3 - 0 - 0 = 6; of {0, 2} and {1}: 2*1 - 1 - 0 = 1.
        assert!((energy_distance(&[vec![0.0]], &[vec![3.0]]) - 6.0).abs() < 1e-12);
        assert!((energy_distance(&[vec![0.0], vec![2.0]], &[vec![1.0]]) - 1.0).abs() < 1e-12);
        let a = vec![vec![0.0f32, 1.0], vec![1.0, 1.0]];
        assert!(energy_distance(&a, &a).abs() < 1e-12);
        // scipy.stats.energy_distance (1-D only; it returns the square root of this statistic):
        // energy_distance([0.5, 1.5, 2, 4, 4.5], [1, 3, 3.5, 6]) ** 2 = 0.5325 (scipy 1.17.1).
        let rows = |v: &[f32]| v.iter().map(|&x| vec![x]).collect::<Vec<_>>();
        let e = energy_distance(&rows(&[0.5, 1.5, 2.0, 4.0, 4.5]), &rows(&[1.0, 3.0, 3.5, 6.0]));
        assert!((e - 0.5325).abs() < 1e-12, "{e}");
    }

    #[test]
    fn welch_t_matches_scipy() {
        // scipy.stats.ttest_ind([1, 2, 3, 4], [2, 4, 6], equal_var=False).statistic
        //   = (2.5 - 4) / sqrt(1.6667 / 4 + 4 / 3) = -1.1338934190276817
        let a = moments(&[&[1.0, 1.0], &[2.0, 1.0], &[3.0, 1.0], &[4.0, 1.0]]);
        let b = moments(&[&[2.0, 1.0], &[4.0, 1.0], &[6.0, 1.0]]);
        let t = welch_t(&a, &b);
        assert!((t[0] - -1.1338934190276817).abs() < 1e-12, "{}", t[0]);
        assert_eq!(t[1], 0.0, "constant and equal: no difference");
        let c = moments(&[&[0.0, 2.0], &[0.0, 2.0]]);
        assert_eq!(welch_t(&c, &moments(&[&[0.0, 1.0], &[0.0, 1.0]]))[1], f64::INFINITY);
    }

    #[test]
    fn top_by_abs_ranks_by_magnitude() {
        assert_eq!(top_by_abs(&[0.5, -3.0, f64::NAN, 2.0, -2.0], 4), [1, 3, 4, 0]);
    }

    #[test]
    fn r2_is_sklearns() {
        // sklearn.metrics.r2_score([3, -0.5, 2, 7], [2.5, 0.0, 2, 8]) = 0.9486081370449679
        let r2 = r2_score(&[2.5, 0.0, 2.0, 8.0], &[3.0, -0.5, 2.0, 7.0]);
        assert!((r2 - 0.9486081370449679).abs() < 1e-12, "{r2}");
    }

    #[test]
    fn average_precision_and_roc_auc_by_hand() {
        // Scores 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-): AP = 1/2 * 1 + 1/2 * 2/3; AUC: 3 of 4 pairs.
        let labels = [true, false, true, false];
        let scores = [0.9, 0.8, 0.7, 0.1];
        assert!((average_precision(&labels, &scores) - (0.5 + 1.0 / 3.0)).abs() < 1e-12);
        assert!((roc_auc(&labels, &scores) - 0.75).abs() < 1e-12);
        // All tied: AP is the share of positives, AUC one half.
        assert!((average_precision(&labels, &[1.0; 4]) - 0.5).abs() < 1e-12);
        assert!((roc_auc(&labels, &[1.0; 4]) - 0.5).abs() < 1e-12);
        // One class only: undefined.
        assert!(roc_auc(&[true, true], &[0.1, 0.2]).is_nan());
        assert!(average_precision(&[false, false], &[0.1, 0.2]).is_nan());
    }
}
