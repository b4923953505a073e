//! Bounded, seeded samples of cells for the metrics that need cells rather than pseudobulks: the
//! energy distance of the predicted to the real cells of a condition, and Wilcoxon rank-sum DE
//! tests (real and predicted cells against the control cells) whose significant genes are
//! compared as cell-eval compares them. Each sample is a reservoir (algorithm R) of at most
//! `cap` dense rows, `cap` chosen so that all samples together stay within [`BUDGET_BYTES`]:
//! memory does not grow with the cells.

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use crate::stats::{benjamini_hochberg, energy_distance, rank_sum_p};

/// Cells per sample at most.
pub const SAMPLE_CELLS: usize = 100;
/// Bytes of the real samples at most, and the same again for the predicted ones.
pub const BUDGET_BYTES: usize = 128 << 20;
/// Fewer cells per sample than this and the sample metrics are not computed (NaN).
pub const MIN_SAMPLE_CELLS: usize = 10;
/// The q-value under which a gene counts as differentially expressed (cell-eval's).
pub const SIGNIFICANCE: f64 = 0.05;

/// The cells per sample for `samples` samples of `genes` values each (0: none taken).
pub(super) fn sample_cap(samples: usize, genes: usize) -> usize {
    let per_row = genes.max(1) * std::mem::size_of::<f32>();
    let cap = (BUDGET_BYTES / per_row / samples.max(1)).min(SAMPLE_CELLS);
    if cap < MIN_SAMPLE_CELLS { 0 } else { cap }
}

/// A reservoir of at most `cap` rows.
#[derive(Debug, Clone)]
pub(super) struct Reservoir {
    cap: usize,
    seen: u64,
    /// Slots handed out (rows may be put later, in the order they were offered).
    assigned: usize,
    pub(super) rows: Vec<Vec<f32>>,
}

impl Reservoir {
    pub(super) fn new(cap: usize) -> Reservoir {
        Reservoir { cap, seen: 0, assigned: 0, rows: Vec::new() }
    }

    /// Where the next offered row goes: `Some(slot)` or `None` when it is not kept. Rows are
    /// [`put`](Self::put) in the order they were offered, at once or after several offers.
    pub(super) fn offer(&mut self, rng: &mut Xoshiro256PlusPlus) -> Option<usize> {
        if self.cap == 0 {
            return None;
        }
        self.seen += 1;
        if self.assigned < self.cap {
            self.assigned += 1;
            return Some(self.assigned - 1);
        }
        let j = rng.random_range(0..self.seen);
        (j < self.cap as u64).then_some(j as usize)
    }

    /// Puts `row` in `slot` (from [`offer`](Self::offer)).
    pub(super) fn put(&mut self, slot: usize, row: Vec<f32>) {
        if slot >= self.rows.len() {
            self.rows.push(row);
        } else {
            self.rows[slot] = row;
        }
    }
}

/// The seeded generator of a pass's reservoirs.
pub(super) fn sampler(stream: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(0x5A4D_504C ^ stream)
}

/// The real cells' Wilcoxon p- and q-values per gene against the control cells.
pub type RankSumTests = (Vec<f64>, Vec<f64>);

/// The sample metrics of one condition (NaN where a sample is missing or too small).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SampleMetrics {
    /// Cells in the real / predicted / control samples.
    pub cells: (usize, usize, usize),
    /// Energy distance of the predicted to the real cells (0 best).
    pub energy_distance: f64,
    /// Energy distance of the control to the real cells (the baseline).
    pub energy_distance_control: f64,
    /// Genes significant (Wilcoxon, BH q < 0.05) in real cells against control cells.
    pub de_n_real: f64,
    /// The same in predicted cells against control cells.
    pub de_n_predicted: f64,
    /// Share of the real DE genes also DE in the predicted cells (recall).
    pub de_recall: f64,
    /// Share of the predicted DE genes that are real DE genes (precision).
    pub de_precision: f64,
    /// Share of the real DE genes whose predicted change has the real sign.
    pub de_direction_match: f64,
}

impl SampleMetrics {
    /// Every metric NaN.
    pub fn missing() -> SampleMetrics {
        SampleMetrics {
            cells: (0, 0, 0),
            energy_distance: f64::NAN,
            energy_distance_control: f64::NAN,
            de_n_real: f64::NAN,
            de_n_predicted: f64::NAN,
            de_recall: f64::NAN,
            de_precision: f64::NAN,
            de_direction_match: f64::NAN,
        }
    }

    /// The metrics of real, predicted and control samples (rows of equal width).
    pub fn compute(real: &[Vec<f32>], predicted: &[Vec<f32>], control: &[Vec<f32>]) -> SampleMetrics {
        Self::compute_with_tests(real, predicted, control).0
    }

    /// [`compute`](Self::compute), and the real cells' Wilcoxon p- and q-values per gene against
    /// the control cells (`None` when the samples are too small).
    pub fn compute_with_tests(
        real: &[Vec<f32>],
        predicted: &[Vec<f32>],
        control: &[Vec<f32>],
    ) -> (SampleMetrics, Option<RankSumTests>) {
        let cells = (real.len(), predicted.len(), control.len());
        let enough = |s: &[Vec<f32>]| s.len() >= MIN_SAMPLE_CELLS;
        let mut out = SampleMetrics { cells, ..SampleMetrics::missing() };
        if enough(real) && enough(predicted) {
            out.energy_distance = energy_distance(predicted, real);
        }
        if enough(real) && enough(control) {
            out.energy_distance_control = energy_distance(control, real);
        }
        if !(enough(real) && enough(predicted) && enough(control)) {
            return (out, None);
        }
        let genes = real[0].len();
        let column = |s: &[Vec<f32>], g: usize| -> Vec<f32> { s.iter().map(|r| r[g]).collect() };
        let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let (mut p_real, mut p_pred) = (Vec::with_capacity(genes), Vec::with_capacity(genes));
        let mut same_sign = Vec::with_capacity(genes);
        for g in 0..genes {
            let (r, p, c) = (column(real, g), column(predicted, g), column(control, g));
            p_real.push(rank_sum_p(&r, &c));
            p_pred.push(rank_sum_p(&p, &c));
            let mc = mean(&c);
            same_sign.push((mean(&r) - mc).signum() == (mean(&p) - mc).signum());
        }
        let (q_real, q_pred) = (benjamini_hochberg(&p_real), benjamini_hochberg(&p_pred));
        let sig = |q: &[f64]| -> Vec<bool> { q.iter().map(|&v| v < SIGNIFICANCE).collect() };
        let (s_real, s_pred) = (sig(&q_real), sig(&q_pred));
        let n_real = s_real.iter().filter(|&&s| s).count();
        let n_pred = s_pred.iter().filter(|&&s| s).count();
        let both = s_real.iter().zip(&s_pred).filter(|(a, b)| **a && **b).count();
        let ratio = |a: usize, b: usize| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
        out.de_n_real = n_real as f64;
        out.de_n_predicted = n_pred as f64;
        out.de_recall = ratio(both, n_real);
        out.de_precision = ratio(both, n_pred);
        let matched = (0..genes).filter(|&g| s_real[g] && same_sign[g]).count();
        out.de_direction_match = ratio(matched, n_real);
        (out, Some((p_real, q_real)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservoirs_keep_at_most_cap_rows_uniformly() {
        let mut rng = sampler(1);
        let mut counts = [0u32; 10];
        for _ in 0..2000 {
            let mut r = Reservoir::new(3);
            for i in 0..10u32 {
                if let Some(slot) = r.offer(&mut rng) {
                    r.put(slot, vec![i as f32]);
                }
            }
            assert_eq!(r.rows.len(), 3);
            for row in &r.rows {
                counts[row[0] as usize] += 1;
            }
        }
        // Each of the 10 rows kept with probability 3/10: 600 of 2000 draws, give or take.
        assert!(counts.iter().all(|&c| (480..=720).contains(&c)), "{counts:?}");
        assert_eq!(sample_cap(1, 100), SAMPLE_CELLS);
        assert_eq!(sample_cap(1_000_000, 5000), 0, "too many samples for the budget: none");
    }

    #[test]
    fn sample_metrics_by_hand() {
        // 12 control cells at 0, real cells up by 5 on gene 0 only, predictions the same: gene 0
        // is DE in both, recall/precision/direction 1, energy distance 0 for the prediction.
        let control: Vec<Vec<f32>> = (0..12).map(|i| vec![(i % 3) as f32 * 0.1, (i % 2) as f32]).collect();
        let real: Vec<Vec<f32>> = control.iter().map(|r| vec![r[0] + 5.0, r[1]]).collect();
        let m = SampleMetrics::compute(&real, &real, &control);
        assert_eq!((m.de_n_real, m.de_n_predicted), (1.0, 1.0));
        assert_eq!((m.de_recall, m.de_precision, m.de_direction_match), (1.0, 1.0, 1.0));
        assert!(m.energy_distance.abs() < 1e-9);
        assert!(m.energy_distance_control > 9.0, "{}", m.energy_distance_control);
        // Predicting the control: nothing DE, precision undefined, recall 0.
        let m = SampleMetrics::compute(&real, &control, &control);
        assert_eq!((m.de_n_predicted, m.de_recall), (0.0, 0.0));
        assert!(m.de_precision.is_nan());
        assert!((m.energy_distance - m.energy_distance_control).abs() < 1e-9);
        // Too few cells: NaN.
        assert!(SampleMetrics::compute(&real[..5], &real, &control).energy_distance.is_nan());
    }
}
