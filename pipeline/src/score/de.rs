//! The differential expression cell-eval2 0.20.0 computes on the CPU for its `vcc2026` DE
//! members (`de_compute.compute_de` with the scanpy backend): per perturbation and gene, the
//! Wilcoxon rank-sum test of the perturbation's cells against the reference's control cells on
//! `log1p(CPM)` (scanpy's `rank_genes_groups(method="wilcoxon", tie_correct=True)`: the normal
//! approximation, tie-corrected, no continuity correction), the log2 fold change of the mean CPMs
//! (`log2((mean + 1e-9) / (control mean + 1e-9))`), the genes whose control mean is above 5 CPM
//! kept, and Benjamini-Hochberg within each perturbation over the kept genes.
//!
//! Out of core: the rank sum of a perturbation's cells is `U + n1 (n1 + 1) / 2`, where `U` adds
//! over its cells each value's count of smaller control values plus half the equal ones, so a
//! perturbation needs only the control's sorted values per gene and its own cells, read group by
//! group. Memory holds the control's non-zero values and one perturbation's cells.

use std::collections::HashMap;
use std::ops::Range;

use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::h5ad::H5adReader;

use crate::context::RunContext;
use crate::error::{Error, Result};
use crate::obs::column_strings;

/// The CPM a cell's counts are scaled to (`target_sum` of the preset).
const TARGET_SUM: f64 = 1e6;
/// Added to both means of a fold change (`de.epsilon`).
const EPSILON: f64 = 1e-9;
/// A gene is tested when the control's mean CPM is above this (`filter_gene_min_cpm_cell`).
pub const MIN_CONTROL_CPM: f64 = 5.0;
/// Cells read at a time from a group's rows.
const READ_ROWS: u64 = 4096;

/// Where each group's cells are: sorted labels and, per label, its runs of consecutive rows.
#[derive(Debug, Clone)]
pub struct GroupRows {
    /// Labels, sorted.
    pub labels: Vec<String>,
    /// Per label, the row ranges of its cells, in row order.
    pub runs: Vec<Vec<Range<u64>>>,
}

impl GroupRows {
    /// The runs of `label`.
    fn runs_of(&self, label: &str) -> Option<&[Range<u64>]> {
        self.labels.binary_search_by(|l| l.as_str().cmp(label)).ok().map(|i| self.runs[i].as_slice())
    }

    fn cells(&self, i: usize) -> u64 {
        self.runs[i].iter().map(|r| r.end - r.start).sum()
    }
}

/// Reads `reader`'s obs column `key` and records where each value's cells are.
pub fn group_rows(reader: &H5adReader, key: &str) -> Result<GroupRows> {
    let origin = reader.path().display().to_string();
    let n_obs = reader.n_obs();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut labels: Vec<String> = Vec::new();
    let mut runs: Vec<Vec<Range<u64>>> = Vec::new();
    let mut start = 0u64;
    while start < n_obs {
        let end = (start + 65_536).min(n_obs);
        let obs = reader.read_obs(start..end).map_err(Error::stage(crate::Stage::Read))?;
        let column = column_strings(&obs, key, &origin)?;
        for i in 0..obs.num_rows() {
            let row = start + i as u64;
            let label = column
                .get(i)
                .ok_or_else(|| Error::InvalidInput(format!("{origin}: cell {row} has no {key:?} (a missing value)")))?;
            let next = labels.len();
            let g = *index.entry(label.to_owned()).or_insert(next);
            if g == next {
                labels.push(label.to_owned());
                runs.push(Vec::new());
            }
            match runs[g].last_mut() {
                Some(run) if run.end == row => run.end = row + 1,
                _ => runs[g].push(row..row + 1),
            }
        }
        start = end;
    }
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by(|&a, &b| labels[a].cmp(&labels[b]));
    Ok(GroupRows {
        labels: order.iter().map(|&g| labels[g].clone()).collect(),
        runs: order.iter().map(|&g| std::mem::take(&mut runs[g])).collect(),
    })
}

/// A group's cells as `log1p(CPM)` per gene: each gene's non-zero values sorted, and the group's
/// mean CPM per gene.
struct GroupValues {
    cells: u64,
    /// Per gene, the non-zero `log1p(CPM)` values, ascending.
    values: Vec<Vec<f64>>,
    /// Per gene, the mean CPM over the group's cells.
    mean_cpm: Vec<f64>,
}

/// Reads the cells of `runs` and transposes them into [`GroupValues`].
fn read_group(reader: &H5adReader, runs: &[Range<u64>], ctx: &RunContext) -> Result<GroupValues> {
    let n_genes = reader.n_vars() as usize;
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); n_genes];
    let mut sums = vec![0.0f64; n_genes];
    let mut cells = 0u64;
    let mut batch = CsrBatch::new(n_genes as u32);
    for run in runs {
        let mut start = run.start;
        while start < run.end {
            let end = (start + READ_ROWS).min(run.end);
            batch.clear();
            reader.matrix().read_rows(start..end, &mut batch).map_err(Error::stage(crate::Stage::Read))?;
            for r in 0..batch.n_rows() {
                let (cols, data) = batch.row(r);
                // scanpy's normalize_total: the cell's total over the target sum, then each count
                // divided by it (a cell without counts stays zero).
                let library: f64 = data.iter().map(|&v| f64::from(v)).sum();
                let per = library / TARGET_SUM;
                for (&c, &v) in cols.iter().zip(data) {
                    if v == 0.0 {
                        continue;
                    }
                    let cpm = f64::from(v) / per;
                    sums[c as usize] += cpm;
                    values[c as usize].push(cpm.ln_1p());
                }
            }
            cells += (end - start) as u64;
            start = end;
            ctx.check_stopped()?;
        }
    }
    for v in &mut values {
        v.sort_by(f64::total_cmp);
    }
    let n = cells as f64;
    Ok(GroupValues { cells, values, mean_cpm: sums.iter().map(|s| s / n).collect() })
}

/// The reference's control cells, as every test needs them.
pub struct ControlPool {
    group: GroupValues,
    /// Per gene, `sum (t^3 - t)` over the control's blocks of equal non-zero values.
    ties: Vec<f64>,
    /// The genes tested: the control's mean CPM above [`MIN_CONTROL_CPM`].
    pub kept: Vec<usize>,
}

impl ControlPool {
    /// Reads the control cells `label` of `reader` (grouped by `rows`).
    pub fn read(reader: &H5adReader, rows: &GroupRows, label: &str, ctx: &RunContext) -> Result<ControlPool> {
        let runs = rows.runs_of(label).ok_or_else(|| {
            Error::InvalidInput(format!("{}: no cells of the control {label:?}", reader.path().display()))
        })?;
        let group = read_group(reader, runs, ctx)?;
        if group.cells < 2 {
            return Err(Error::InvalidInput(format!(
                "{}: the control {label:?} has {} cell; the Wilcoxon test needs at least 2",
                reader.path().display(),
                group.cells
            )));
        }
        let ties = group.values.iter().map(|v| tie_sum(v)).collect();
        let kept = (0..group.mean_cpm.len()).filter(|&g| group.mean_cpm[g] > MIN_CONTROL_CPM).collect();
        Ok(ControlPool { group, ties, kept })
    }
}

/// `sum (t^3 - t)` over the blocks of equal values of a sorted slice.
fn tie_sum(sorted: &[f64]) -> f64 {
    let mut total = 0.0f64;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i + 1;
        while j < sorted.len() && sorted[j] == sorted[i] {
            j += 1;
        }
        let t = (j - i) as f64;
        total += t * t * t - t;
        i = j;
    }
    total
}

/// One perturbation's test over the kept genes, in the order of [`ControlPool::kept`].
#[derive(Debug, Clone)]
pub struct DeResult {
    /// log2 fold change of the mean CPMs against the control's.
    pub lfc: Vec<f64>,
    /// Two-sided p-value.
    pub p_value: Vec<f64>,
    /// Benjamini-Hochberg within the perturbation, over the kept genes.
    pub p_adj: Vec<f64>,
}

/// Tests every group of `rows` but `control` against `pool`; results by label, sorted.
pub fn test_groups(
    reader: &H5adReader,
    rows: &GroupRows,
    control: &str,
    pool: &ControlPool,
    ctx: &RunContext,
) -> Result<Vec<(String, DeResult)>> {
    let progress = ctx.progress();
    let total: u64 = (0..rows.labels.len()).filter(|&i| rows.labels[i] != control).map(|i| rows.cells(i)).sum();
    progress.begin("cells (Wilcoxon)", total);
    let mut out = Vec::new();
    for (i, label) in rows.labels.iter().enumerate() {
        if label == control {
            continue;
        }
        let group = read_group(reader, &rows.runs[i], ctx)?;
        if group.cells < 2 {
            return Err(Error::InvalidInput(format!(
                "{}: perturbation {label:?} has {} cell; the Wilcoxon test needs at least 2",
                reader.path().display(),
                group.cells
            )));
        }
        out.push((label.clone(), test(&group, pool)));
        progress.advance(group.cells);
    }
    progress.end();
    Ok(out)
}

/// The test of `group` against the control, on the kept genes.
fn test(group: &GroupValues, pool: &ControlPool) -> DeResult {
    let control = &pool.group;
    let (n1, n2) = (group.cells as f64, control.cells as f64);
    let size = n1 + n2;
    let mut lfc = Vec::with_capacity(pool.kept.len());
    let mut p_value = Vec::with_capacity(pool.kept.len());
    for &g in &pool.kept {
        let (x, y) = (&group.values[g], &control.values[g]);
        let (zeros_x, zeros_y) = (n1 - x.len() as f64, n2 - y.len() as f64);
        // U: each group value's smaller control values plus half the equal ones (zeros below
        // every non-zero value); ties: the blocks of the combined sample.
        let mut u = zeros_x * 0.5 * zeros_y;
        let t0 = zeros_x + zeros_y;
        let mut ties = t0 * t0 * t0 - t0 + pool.ties[g];
        let mut i = 0;
        while i < x.len() {
            let v = x[i];
            let mut j = i + 1;
            while j < x.len() && x[j] == v {
                j += 1;
            }
            let a = (j - i) as f64;
            let below = y.partition_point(|&w| w < v);
            let equal = y[below..].partition_point(|&w| w == v);
            let b = equal as f64;
            u += a * (zeros_y + below as f64 + 0.5 * b);
            let t = a + b;
            ties += (t * t * t - t) - (b * b * b - b);
            i = j;
        }
        let rank_sum = u + n1 * (n1 + 1.0) / 2.0;
        let tie_correction = 1.0 - ties / (size * size * size - size);
        // scanpy's arithmetic, in its order.
        let std_dev = (tie_correction * n1 * n2 * (n1 + n2 + 1.0) / 12.0).sqrt();
        let mut z = (rank_sum - n1 * ((n1 + n2 + 1.0) / 2.0)) / std_dev;
        if z.is_nan() {
            z = 0.0;
        }
        p_value.push(statrs::function::erf::erfc(z.abs() / std::f64::consts::SQRT_2));
        lfc.push(((group.mean_cpm[g] + EPSILON) / (control.mean_cpm[g] + EPSILON)).log2());
    }
    let mut p_adj = crate::stats::benjamini_hochberg(&p_value);
    // A fold change that is not a number says nothing: its gene is not called (nan_lfc_policy
    // "mask").
    for (q, l) in p_adj.iter_mut().zip(&lfc) {
        if l.is_nan() {
            *q = 1.0;
        }
    }
    DeResult { lfc, p_value, p_adj }
}

/// `REACH_PURITY_FLOOR` of cell-eval2: the share of right directions the deepest scored prefix
/// of `direction_reach_raw` keeps.
const REACH_PURITY_FLOOR: f64 = 0.9;
/// `p_adj_threshold`: a gene is called below it.
const ALPHA: f64 = 0.05;
/// `de_lfc_nmae` scores a perturbation with at least this many genes called on the real side.
const LFC_NMAE_MIN_GENES: usize = 10;

/// The four DE members of one perturbation (NaN where cell-eval2 has none; `lfc_nmae` `None`
/// where it omits the perturbation).
#[derive(Debug, Clone, Copy)]
pub struct DeScores {
    /// `de_wilcoxon_direction_fidelity_yield_raw`: right directions among the called genes
    /// over the larger of the predicted and the real number of called genes (min of precision
    /// and recall).
    pub direction_fidelity_yield_raw: f64,
    /// `de_wilcoxon_direction_reach_raw`: the deepest prefix of the real called genes, ordered by
    /// the prediction's confidence, whose directions are right at 90%, over the real number.
    pub direction_reach_raw: f64,
    /// `de_wilcoxon_sig_jaccard`: Jaccard of the called gene sets.
    pub sig_jaccard: f64,
    /// `de_wilcoxon_lfc_nmae`: mean absolute error of the fold changes over the real called
    /// genes, over their mean absolute real fold change.
    pub lfc_nmae: Option<f64>,
}

/// A value that is a direction: not NaN, not zero.
fn defined(x: f64) -> bool {
    !x.is_nan() && x != 0.0
}

/// The DE members of one perturbation from its real and predicted tests over the kept genes
/// (`features`: their gene ids), its own gene (a position among them) left out.
pub fn de_scores(real: &DeResult, pred: &DeResult, features: &[&str], own: Option<usize>) -> DeScores {
    let genes: Vec<usize> = (0..features.len()).filter(|&k| Some(k) != own).collect();
    let real_called = |k: usize| real.p_adj[k] < ALPHA;
    let pred_called = |k: usize| pred.p_adj[k] < ALPHA;
    let in_denom = |k: usize| defined(real.lfc[k]);
    let matches = |k: usize| in_denom(k) && defined(pred.lfc[k]) && real.lfc[k].signum() == pred.lfc[k].signum();

    // sig_jaccard
    let both = genes.iter().filter(|&&k| real_called(k) && pred_called(k)).count();
    let either = genes.iter().filter(|&&k| real_called(k) || pred_called(k)).count();
    let sig_jaccard = if either == 0 { 1.0 } else { both as f64 / either as f64 };

    // direction_fidelity_yield_raw
    let n_conf = genes.iter().filter(|&&k| real_called(k)).count();
    let scored: Vec<usize> = genes.iter().copied().filter(|&k| pred_called(k) && in_denom(k)).collect();
    let right = scored.iter().filter(|&&k| matches(k)).count();
    let larger = scored.len().max(n_conf);
    let direction_fidelity_yield_raw = if larger == 0 { f64::NAN } else { right as f64 / larger as f64 };

    // direction_reach_raw: the real called genes in the prediction's order of confidence.
    let direction_reach_raw = if n_conf == 0 {
        f64::NAN
    } else {
        let rank_p = |p: f64| if p.is_nan() { f64::INFINITY } else { p };
        let abs_lfc = |l: f64| if l.is_nan() { f64::NEG_INFINITY } else { l.abs() };
        let mut order: Vec<usize> = genes.iter().copied().filter(|&k| real_called(k)).collect();
        order.sort_by(|&a, &b| {
            pred_called(b)
                .cmp(&pred_called(a))
                .then(rank_p(pred.p_adj[a]).total_cmp(&rank_p(pred.p_adj[b])))
                .then(rank_p(pred.p_value[a]).total_cmp(&rank_p(pred.p_value[b])))
                .then(abs_lfc(pred.lfc[b]).total_cmp(&abs_lfc(pred.lfc[a])))
                .then(features[a].cmp(features[b]))
        });
        let (mut n_denom, mut n_match, mut deepest) = (0usize, 0usize, 0usize);
        for &k in &order {
            n_denom += usize::from(in_denom(k));
            n_match += usize::from(matches(k));
            if n_denom > 0 && n_match as f64 / n_denom as f64 >= REACH_PURITY_FLOOR {
                deepest = deepest.max(n_denom);
            }
        }
        deepest as f64 / n_conf as f64
    };

    // lfc_nmae over the real called genes with a finite fold change.
    let gate: Vec<usize> = genes.iter().copied().filter(|&k| real_called(k) && real.lfc[k].is_finite()).collect();
    let lfc_nmae = (gate.len() >= LFC_NMAE_MIN_GENES)
        .then(|| {
            let predicted = |k: usize| if pred.lfc[k].is_finite() { pred.lfc[k] } else { 0.0 };
            let n = gate.len() as f64;
            let num = gate.iter().map(|&k| (predicted(k) - real.lfc[k]).abs()).sum::<f64>() / n;
            let den = gate.iter().map(|&k| real.lfc[k].abs()).sum::<f64>() / n;
            (den.is_finite() && den != 0.0).then_some(num / den)
        })
        .flatten();
    DeScores { direction_fidelity_yield_raw, direction_reach_raw, sig_jaccard, lfc_nmae }
}
