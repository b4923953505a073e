//! Bounded, seeded samples of cells for the metrics that need cells rather than pseudobulks: the
//! energy distance of the predicted to the real cells of a condition, and Wilcoxon rank-sum DE
//! tests (real and predicted cells against the control cells) whose significant genes are
//! compared as cell-eval 0.8.2 compares them (its pdex DE: Mann-Whitney U, Benjamini-Hochberg,
//! log2 fold change of the expm1 of log1p means; checked against cell-eval's numbers on a stored
//! fixture, `tests/fixtures/cell_eval/reference_cells.json`). Each sample is a reservoir (algorithm R) of at most
//! `cap` dense rows, `cap` chosen so that all samples together stay within [`BUDGET_BYTES`]:
//! memory does not grow with the cells.

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use super::field::{pearson, spearman};
use cpa_stream_pipeline::stats::{average_precision, benjamini_hochberg, energy_distance, rank_sum_p, roc_auc};
use std::io;

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

/// A reservoir of at most `cap` rows: which offered rows are kept, and where each kept row lies
/// in its [`Samples`]' spill file.
#[derive(Debug, Clone)]
pub(super) struct Reservoir {
    cap: usize,
    seen: u64,
    /// Slots handed out (rows may be put later, in the order they were offered).
    assigned: usize,
    /// Byte offset and length of each kept row in the spill file.
    rows: Vec<(u64, u32)>,
}

impl Reservoir {
    pub(super) fn new(cap: usize) -> Reservoir {
        Reservoir { cap, seen: 0, assigned: 0, rows: Vec::new() }
    }

    /// Where the next offered row goes: `Some(slot)` or `None` when it is not kept. Rows are
    /// [`put`](Samples::put) in the order they were offered, at once or after several offers.
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

    /// Rows kept.
    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }
}

/// A pass's samples: one [`Reservoir`] per group, the kept rows written to an unnamed temporary
/// file (sparse where that is smaller) and read back one condition at a time, so that the host
/// memory of the samples does not depend on how full they are. A replaced row's bytes stay in the
/// file: it grows with the rows ever kept, about `cap * (1 + ln(cells / cap))` per group.
pub(super) struct Samples {
    width: usize,
    file: Option<std::fs::File>,
    end: u64,
    reservoirs: Vec<Reservoir>,
    encoded: Vec<u8>,
}

/// An error of the samples' temporary file (in the temporary directory, `TMPDIR`), saying so.
fn spill_error(e: io::Error, doing: &str) -> io::Error {
    io::Error::new(e.kind(), format!("sampled cells for the cell-level metrics: {doing}: {e}"))
}

/// Marks a row written dense (`width` values) instead of as `(gene, value)` pairs.
const DENSE: u32 = u32::MAX;

impl Samples {
    /// `groups` reservoirs of at most `cap` rows of `width` values; the file is made on the
    /// first row kept.
    pub(super) fn new(groups: usize, cap: usize, width: usize) -> Samples {
        Samples { width, file: None, end: 0, reservoirs: vec![Reservoir::new(cap); groups], encoded: Vec::new() }
    }

    /// Offers the next row of `group` (see [`Reservoir::offer`]).
    pub(super) fn offer(&mut self, group: usize, rng: &mut Xoshiro256PlusPlus) -> Option<usize> {
        self.reservoirs.get_mut(group)?.offer(rng)
    }

    /// Rows kept for `group`.
    pub(super) fn len(&self, group: usize) -> usize {
        self.reservoirs.get(group).map_or(0, Reservoir::len)
    }

    /// Puts a dense row of `width` values in `slot` of `group`.
    pub(super) fn put(&mut self, group: usize, slot: usize, row: &[f32]) -> io::Result<()> {
        let nonzero = row.iter().filter(|&&v| v != 0.0).count();
        self.encoded.clear();
        if nonzero * 2 < row.len() {
            self.encoded.extend_from_slice(&(nonzero as u32).to_le_bytes());
            for (g, &v) in row.iter().enumerate().filter(|(_, v)| **v != 0.0) {
                self.encoded.extend_from_slice(&(g as u32).to_le_bytes());
                self.encoded.extend_from_slice(&v.to_le_bytes());
            }
        } else {
            self.encoded.extend_from_slice(&DENSE.to_le_bytes());
            self.encoded.extend(row.iter().flat_map(|v| v.to_le_bytes()));
        }
        self.write(group, slot)
    }

    /// Puts a sparse row (`genes`, `values` through `f`) in `slot` of `group`.
    pub(super) fn put_sparse(
        &mut self,
        group: usize,
        slot: usize,
        genes: &[u32],
        values: &[f32],
        f: impl Fn(f32) -> f32,
    ) -> io::Result<()> {
        self.encoded.clear();
        self.encoded.extend_from_slice(&(genes.len() as u32).to_le_bytes());
        for (&g, &v) in genes.iter().zip(values) {
            self.encoded.extend_from_slice(&g.to_le_bytes());
            self.encoded.extend_from_slice(&f(v).to_le_bytes());
        }
        self.write(group, slot)
    }

    fn write(&mut self, group: usize, slot: usize) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = match &mut self.file {
            Some(f) => f,
            none => none.insert(tempfile::tempfile().map_err(|e| spill_error(e, "making a temporary file"))?),
        };
        file.write_all_at(&self.encoded, self.end).map_err(|e| spill_error(e, "writing to the temporary file"))?;
        let at = (self.end, self.encoded.len() as u32);
        self.end += self.encoded.len() as u64;
        let rows = &mut self.reservoirs[group].rows;
        if slot >= rows.len() {
            rows.push(at);
        } else {
            rows[slot] = at;
        }
        Ok(())
    }

    /// The rows of `groups`, in turn, at most `limit` in all, dense.
    pub(super) fn rows(&self, groups: &[usize], limit: usize) -> io::Result<Vec<Vec<f32>>> {
        use std::os::unix::fs::FileExt;
        let mut out = Vec::new();
        let mut bytes = Vec::new();
        for &g in groups {
            for &(offset, len) in self.reservoirs.get(g).map_or(&[][..], |r| &r.rows) {
                if out.len() >= limit {
                    return Ok(out);
                }
                let Some(file) = &self.file else { break };
                bytes.resize(len as usize, 0);
                file.read_exact_at(&mut bytes, offset).map_err(|e| spill_error(e, "reading the temporary file"))?;
                out.push(self.decode_row(&bytes));
            }
        }
        Ok(out)
    }

    fn decode_row(&self, bytes: &[u8]) -> Vec<f32> {
        let word = |i: usize| -> [u8; 4] {
            let mut w = [0u8; 4];
            w.copy_from_slice(bytes.get(i * 4..i * 4 + 4).unwrap_or(&[0; 4]));
            w
        };
        let head = u32::from_le_bytes(word(0));
        if head == DENSE {
            return (0..self.width).map(|i| f32::from_le_bytes(word(1 + i))).collect();
        }
        let mut row = vec![0f32; self.width];
        for k in 0..head as usize {
            let g = u32::from_le_bytes(word(1 + 2 * k)) as usize;
            if let Some(v) = row.get_mut(g) {
                *v = f32::from_le_bytes(word(2 + 2 * k));
            }
        }
        row
    }

    /// Bytes written to the spill file (replaced rows included).
    pub(super) fn spilled_bytes(&self) -> u64 {
        self.end
    }
}

/// log2 of the ratio of two log1p means taken back to counts (pdex's fold change with no
/// pseudocount): 0 where both are 0, infinite where only one is.
fn log2_fold_change(mean: f64, reference: f64) -> f64 {
    let v = (mean.exp_m1() / reference.exp_m1()).log2();
    if v.is_nan() { 0.0 } else { v }
}

/// cell-eval's summaries across conditions: `pearson_edistance`, the Pearson correlation of the
/// real and the predicted change's energy distance to the control cells, and `de_spearman_sig`,
/// the Spearman correlation of the real and predicted numbers of DE genes over the conditions
/// with at least one real DE gene (NaN where fewer than two conditions qualify).
pub fn across_conditions<'a>(metrics: impl IntoIterator<Item = &'a SampleMetrics>) -> [(&'static str, f64); 2] {
    let (mut ed_real, mut ed_pred, mut n_real, mut n_pred) = (vec![], vec![], vec![], vec![]);
    for m in metrics {
        if m.energy_distance_control.is_finite() && m.energy_distance_predicted_control.is_finite() {
            ed_real.push(m.energy_distance_control);
            ed_pred.push(m.energy_distance_predicted_control);
        }
        if m.de_n_real > 0.0 && m.de_n_predicted.is_finite() {
            n_real.push(m.de_n_real);
            n_pred.push(m.de_n_predicted);
        }
    }
    [("pearson_edistance", pearson(&ed_real, &ed_pred)), ("de_spearman_sig", spearman(&n_real, &n_pred))]
}

/// The seeded generator of a pass's reservoirs.
pub(super) fn sampler(stream: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(0x5A4D_504C ^ stream)
}

/// The real cells' Wilcoxon rank-sum tests against the control cells, per gene.
#[derive(Debug, Clone, PartialEq)]
pub struct RankSumTests {
    /// p-values.
    pub pvalue: Vec<f64>,
    /// Benjamini-Hochberg q-values.
    pub qvalue: Vec<f64>,
}

/// The sample metrics of one condition (NaN where a sample is missing or too small).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SampleMetrics {
    /// Cells in the real / predicted / control samples.
    pub cells: (usize, usize, usize),
    /// Energy distance of the predicted to the real cells (0 best).
    pub energy_distance: f64,
    /// Energy distance of the control to the real cells (the baseline; the real change's size).
    pub energy_distance_control: f64,
    /// Energy distance of the predicted to the control cells (the predicted change's size;
    /// cell-eval's `pearson_edistance` correlates it with the real one across conditions).
    pub energy_distance_predicted_control: f64,
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
    /// cell-eval's `overlap_at_N`: of the n real DE genes, the share among the n predicted DE
    /// genes with the largest |log2 fold change|.
    pub de_overlap_at_n: f64,
    /// cell-eval's `precision_at_N`: of the m predicted DE genes, the share among the m real DE
    /// genes with the largest |log2 fold change|.
    pub de_precision_at_n: f64,
    /// Spearman correlation of the real and predicted log2 fold changes on the real DE genes
    /// (cell-eval's `de_spearman_lfc_sig`).
    pub de_spearman_lfc: f64,
    /// How well the predicted q-values rank the real DE genes among all genes: average precision
    /// and ROC AUC of -log10 q (cell-eval's `pr_auc`, `roc_auc`).
    pub de_pr_auc: f64,
    /// See [`de_pr_auc`](Self::de_pr_auc).
    pub de_roc_auc: f64,
}

impl SampleMetrics {
    /// Every metric NaN.
    pub fn missing() -> SampleMetrics {
        SampleMetrics {
            cells: (0, 0, 0),
            energy_distance: f64::NAN,
            energy_distance_control: f64::NAN,
            energy_distance_predicted_control: f64::NAN,
            de_n_real: f64::NAN,
            de_n_predicted: f64::NAN,
            de_recall: f64::NAN,
            de_precision: f64::NAN,
            de_direction_match: f64::NAN,
            de_overlap_at_n: f64::NAN,
            de_precision_at_n: f64::NAN,
            de_spearman_lfc: f64::NAN,
            de_pr_auc: f64::NAN,
            de_roc_auc: f64::NAN,
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
        if enough(predicted) && enough(control) {
            out.energy_distance_predicted_control = energy_distance(predicted, control);
        }
        if !(enough(real) && enough(predicted) && enough(control)) {
            return (out, None);
        }
        let genes = real[0].len();
        let column = |s: &[Vec<f32>], g: usize| -> Vec<f32> { s.iter().map(|r| r[g]).collect() };
        let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let (mut p_real, mut p_pred) = (Vec::with_capacity(genes), Vec::with_capacity(genes));
        let (mut lfc_real, mut lfc_pred) = (Vec::with_capacity(genes), Vec::with_capacity(genes));
        for g in 0..genes {
            let (r, p, c) = (column(real, g), column(predicted, g), column(control, g));
            p_real.push(rank_sum_p(&r, &c));
            p_pred.push(rank_sum_p(&p, &c));
            let mc = mean(&c);
            lfc_real.push(log2_fold_change(mean(&r), mc));
            lfc_pred.push(log2_fold_change(mean(&p), mc));
        }
        let (q_real, q_pred) = (benjamini_hochberg(&p_real), benjamini_hochberg(&p_pred));
        let significant = |q: &[f64]| -> Vec<usize> { (0..genes).filter(|&g| q[g] < SIGNIFICANCE).collect() };
        let (s_real, s_pred) = (significant(&q_real), significant(&q_pred));
        let is_pred: Vec<bool> = (0..genes).map(|g| q_pred[g] < SIGNIFICANCE).collect();
        let both = s_real.iter().filter(|&&g| is_pred[g]).count();
        let ratio = |a: usize, b: usize| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
        out.de_n_real = s_real.len() as f64;
        out.de_n_predicted = s_pred.len() as f64;
        out.de_recall = ratio(both, s_real.len());
        out.de_precision = ratio(both, s_pred.len());
        let sign = |v: f64| {
            if v > 0.0 {
                1
            } else if v < 0.0 {
                -1
            } else {
                0
            }
        };
        let matched = s_real.iter().filter(|&&g| sign(lfc_real[g]) == sign(lfc_pred[g])).count();
        out.de_direction_match = ratio(matched, s_real.len());
        // overlap_at_N / precision_at_N: each side's DE genes ranked by |log2 fold change|, the
        // top min(n, its count) of one side against the other's list cut to the same length.
        let ranked = |genes: &[usize], lfc: &[f64]| -> Vec<usize> {
            let mut v = genes.to_vec();
            v.sort_by(|&a, &b| lfc[b].abs().total_cmp(&lfc[a].abs()).then(a.cmp(&b)));
            v
        };
        let (top_real, top_pred) = (ranked(&s_real, &lfc_real), ranked(&s_pred, &lfc_pred));
        let overlap = |k: usize| -> f64 {
            let (a, b) = (&top_real[..k.min(top_real.len())], &top_pred[..k.min(top_pred.len())]);
            if k == 0 { 0.0 } else { a.iter().filter(|g| b.contains(g)).count() as f64 / k as f64 }
        };
        let any = !(s_real.is_empty() || s_pred.is_empty());
        out.de_overlap_at_n = if any { overlap(top_real.len()) } else { 0.0 };
        out.de_precision_at_n = if any { overlap(top_pred.len()) } else { 0.0 };
        if s_real.len() >= 2 {
            let on = |lfc: &[f64]| -> Vec<f64> { s_real.iter().map(|&g| lfc[g]).collect() };
            out.de_spearman_lfc = spearman(&on(&lfc_real), &on(&lfc_pred));
        }
        let labels: Vec<bool> = (0..genes).map(|g| q_real[g] < SIGNIFICANCE).collect();
        let scores: Vec<f64> =
            q_pred.iter().map(|&q| -(if q.is_nan() { 1.0 } else { q.clamp(1e-10, 1.0) }).log10()).collect();
        out.de_pr_auc = if s_real.len() < genes { average_precision(&labels, &scores) } else { f64::NAN };
        out.de_roc_auc = roc_auc(&labels, &scores);
        (out, Some(RankSumTests { pvalue: p_real, qvalue: q_real }))
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
            let mut r = Samples::new(1, 3, 1);
            for i in 0..10u32 {
                if let Some(slot) = r.offer(0, &mut rng) {
                    r.put(0, slot, &[i as f32]).unwrap_or_else(|e| panic!("{e}"));
                }
            }
            let rows = r.rows(&[0], usize::MAX).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(rows.len(), 3);
            for row in &rows {
                counts[row[0] as usize] += 1;
            }
        }
        // Each of the 10 rows kept with probability 3/10: 600 of 2000 draws, give or take.
        assert!(counts.iter().all(|&c| (480..=720).contains(&c)), "{counts:?}");
        assert_eq!(sample_cap(1, 100), SAMPLE_CELLS);
        assert_eq!(sample_cap(1_000_000, 5000), 0, "too many samples for the budget: none");
    }

    #[test]
    fn spilled_rows_come_back_as_they_went_in() {
        let mut samples = Samples::new(2, 2, 6);
        let dense = [1.0, 2.0, 0.0, 3.0, 4.0, 5.0];
        let sparse = [0.0, 0.0, 7.5, 0.0, 0.0, -1.0];
        samples.put(0, 0, &dense).unwrap_or_else(|e| panic!("{e}"));
        samples.put(1, 0, &sparse).unwrap_or_else(|e| panic!("{e}"));
        samples.put_sparse(1, 1, &[1, 4], &[1.0, 3.0], |v| v * 2.0).unwrap_or_else(|e| panic!("{e}"));
        // Replacing a row: the new one is read back, the old one's bytes stay behind.
        samples.put(0, 0, &sparse).unwrap_or_else(|e| panic!("{e}"));
        let got = |groups: &[usize], limit| samples.rows(groups, limit).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got(&[0], 10), vec![sparse.to_vec()]);
        assert_eq!(got(&[1], 10), vec![sparse.to_vec(), vec![0.0, 2.0, 0.0, 0.0, 6.0, 0.0]]);
        assert_eq!(got(&[0, 1], 2).len(), 2);
        assert_eq!((samples.len(0), samples.len(1)), (1, 2));
        // Sparse rows take 4 + 8 bytes per value; the dense one 4 + 4 per gene.
        assert_eq!(samples.spilled_bytes(), (4 + 6 * 4) + (4 + 2 * 8) + (4 + 2 * 8) + (4 + 2 * 8));
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

    /// The cell-level definitions against cell-eval 0.8.2's own numbers on a seeded fixture
    /// (`tests/fixtures/cell_eval/make_reference.py` wrote `reference_cells.json` with cell-eval
    /// and pdex installed): pdex's p-values and FDR per gene, and every DE metric per perturbation.
    #[test]
    fn agree_with_cell_eval_to_1e5() {
        use serde_json::Value;
        let path = crate::test_fixture("cell_eval/reference_cells.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let r: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        let cells = |v: &Value| -> Vec<Vec<f32>> {
            let rows = v.as_array().map(Vec::as_slice).unwrap_or_default();
            rows.iter()
                .map(|row| {
                    row.as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(Value::as_f64)
                        .map(|x| x as f32)
                        .collect()
                })
                .collect()
        };
        let numbers = |v: &Value| -> Vec<f64> {
            v.as_array().map(Vec::as_slice).unwrap_or_default().iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect()
        };
        let control = cells(&r["control"]);
        let perts: Vec<String> = r["real"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        assert_eq!((control.len(), perts.len()), (40, 5));
        let close = |what: &str, ours: f64, theirs: f64| {
            let same = (ours.is_nan() && theirs.is_nan()) || (ours - theirs).abs() <= 1e-5 || ours == theirs;
            assert!(same, "{what}: ours {ours}, cell-eval {theirs}");
        };

        // pdex's test of the first perturbation, gene by gene (its genes come sorted by name).
        let first = &r["pdex_first"];
        let name = first["perturbation"].as_str().unwrap_or_default();
        let real = cells(&r["real"][name]);
        let genes: Vec<String> = first["genes"]
            .as_array()
            .map(|a| a.iter().filter_map(|g| g.as_str().map(|g| g.to_owned())).collect())
            .unwrap_or_default();
        let column = |s: &[Vec<f32>], g: usize| -> Vec<f32> { s.iter().map(|row| row[g]).collect() };
        // Gene names of the fixture: G0..G29 with G3 named PA and G11 named PC.
        let index = |g: &str| -> usize {
            match g {
                "PA" => 3,
                "PC" => 11,
                _ => g[1..].parse().unwrap_or_else(|e| panic!("{g}: {e}")),
            }
        };
        let p_ours: Vec<f64> =
            genes.iter().map(|g| rank_sum_p(&column(&real, index(g)), &column(&control, index(g)))).collect();
        let q_ours = benjamini_hochberg(&p_ours);
        for (i, g) in genes.iter().enumerate() {
            close(&format!("p-value of {name} {g}"), p_ours[i], numbers(&first["p_value"])[i]);
            close(&format!("FDR of {name} {g}"), q_ours[i], numbers(&first["fdr"])[i]);
            let mean = |s: &[Vec<f32>]| column(s, index(g)).iter().map(|&x| f64::from(x)).sum::<f64>() / s.len() as f64;
            close(
                &format!("log2 fold change of {name} {g}"),
                log2_fold_change(mean(&real), mean(&control)),
                numbers(&first["log2_fold_change"])[i],
            );
        }

        let mut all = Vec::new();
        for p in &perts {
            let m = SampleMetrics::compute(&cells(&r["real"][p]), &cells(&r["pred"][p]), &control);
            let theirs = |metric: &str| r["metrics"][metric][p].as_f64().unwrap_or(f64::NAN);
            for (metric, ours) in [
                ("n_sig_real", m.de_n_real),
                ("n_sig_pred", m.de_n_predicted),
                ("de_sig_genes_recall", m.de_recall),
                ("overlap_at_N", m.de_overlap_at_n),
                ("precision_at_N", m.de_precision_at_n),
                ("de_direction_match", m.de_direction_match),
                ("de_spearman_lfc_sig", m.de_spearman_lfc),
                ("pr_auc", m.de_pr_auc),
                ("roc_auc", m.de_roc_auc),
            ] {
                close(&format!("{metric} of {p}"), ours, theirs(metric));
            }
            all.push(m);
        }
        for (metric, ours) in across_conditions(&all) {
            close(metric, ours, r["summary"][metric].as_f64().unwrap_or(f64::NAN));
        }
    }
}
