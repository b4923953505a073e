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

use super::cells::{Cells, Groups};
use crate::context::RunContext;
use crate::error::{Error, Result};
use cpa_stream_stages::counts_csr::CsrBatch;

/// Which of cell-eval2's CPU engines (`de.backend`) the Wilcoxon p-values follow. They test the
/// same ranks against the same normal approximation with the same tie correction; pdex's
/// (`numba_mwu`, as `scipy.stats.mannwhitneyu` by default) moves `|U - n1 n2 / 2|` half a unit
/// toward the mean first (a continuity correction) and caps the p-value at 1. cell-eval2 takes
/// pdex where it is installed, scanpy otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// scanpy's `rank_genes_groups(method="wilcoxon", tie_correct=True)`.
    #[default]
    Scanpy,
    /// pdex 0.3's Mann-Whitney U (`numba_mwu`, continuity-corrected).
    Pdex,
}

impl Engine {
    /// The name cell-eval2's `de.backend` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Scanpy => "scanpy",
            Engine::Pdex => "pdex",
        }
    }
}

/// The CPM a cell's counts are scaled to (`target_sum` of the preset).
const TARGET_SUM: f64 = 1e6;
/// Added to both means of a fold change (`de.epsilon`).
const EPSILON: f64 = 1e-9;
/// A gene is tested when the control's mean CPM is above this (`filter_gene_min_cpm_cell`).
pub const MIN_CONTROL_CPM: f64 = 5.0;

/// A group's cells as `log1p(CPM)` per gene: each gene's non-zero values sorted, and the group's
/// mean CPM per gene.
struct GroupValues {
    cells: u64,
    /// Per gene, the non-zero `log1p(CPM)` values, ascending.
    values: Vec<Vec<f64>>,
    /// Per gene, the mean CPM over the group's cells.
    mean_cpm: Vec<f64>,
}

/// Counts below this whose `log1p(CPM)` a cell computes once.
const SMALL_COUNTS: usize = 64;

/// A group's cells gathered into [`GroupValues`], batch by batch.
struct Gather {
    values: Vec<Vec<f64>>,
    sums: Vec<f64>,
    cells: u64,
}

impl Gather {
    fn new(n_genes: usize) -> Gather {
        Gather { values: vec![Vec::new(); n_genes], sums: vec![0.0; n_genes], cells: 0 }
    }

    fn add(&mut self, batch: &CsrBatch) {
        for r in 0..batch.n_rows() {
            let (cols, data) = batch.row(r);
            // scanpy's normalize_total: the cell's total over the target sum, then each count
            // divided by it (a cell without counts stays zero).
            let library: f64 = data.iter().map(|&v| f64::from(v)).sum();
            let per = library / TARGET_SUM;
            // Most counts are small whole numbers that recur within a cell: their logarithm is
            // taken once per cell (the same arithmetic, so the same values).
            let mut small = [f64::NAN; SMALL_COUNTS];
            for (&c, &v) in cols.iter().zip(data) {
                if v == 0.0 {
                    continue;
                }
                let cpm = f64::from(v) / per;
                let log = match v as usize {
                    k if k < SMALL_COUNTS && k as f32 == v => {
                        if small[k].is_nan() {
                            small[k] = cpm.ln_1p();
                        }
                        small[k]
                    }
                    _ => cpm.ln_1p(),
                };
                self.sums[c as usize] += cpm;
                self.values[c as usize].push(log);
            }
        }
        self.cells += batch.n_rows() as u64;
    }

    fn finish(mut self) -> GroupValues {
        for v in &mut self.values {
            v.sort_by(f64::total_cmp);
        }
        let n = self.cells as f64;
        GroupValues { cells: self.cells, values: self.values, mean_cpm: self.sums.iter().map(|s| s / n).collect() }
    }
}

/// Reads the cells of group `i` and transposes them into [`GroupValues`].
fn read_group(cells: &Cells, groups: &Groups, i: usize, ctx: &RunContext) -> Result<GroupValues> {
    let mut gather = Gather::new(cells.n_genes());
    cells.scan_group(groups, i, |batch| {
        gather.add(batch);
        ctx.check_stopped()
    })?;
    Ok(gather.finish())
}

/// Reads the cells of group `i` into one batch.
fn copy_group(cells: &Cells, groups: &Groups, i: usize, ctx: &RunContext) -> Result<CsrBatch> {
    let mut rows = CsrBatch::new(cells.n_genes() as u32);
    cells.scan_group(groups, i, |batch| {
        for r in 0..batch.n_rows() {
            let (cols, data) = batch.row(r);
            rows.push_row(cols, data);
        }
        ctx.check_stopped()
    })?;
    Ok(rows)
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
    /// Reads the control cells `label` of `cells` (grouped as `groups`).
    pub fn read(cells: &Cells, groups: &Groups, label: &str, ctx: &RunContext) -> Result<ControlPool> {
        let i = groups
            .position(label)
            .ok_or_else(|| Error::InvalidInput(format!("{}: no cells of the control {label:?}", cells.origin())))?;
        let group = read_group(cells, groups, i, ctx)?;
        if group.cells < 2 {
            return Err(Error::InvalidInput(format!(
                "{}: the control {label:?} has {} cell; the Wilcoxon test needs at least 2",
                cells.origin(),
                group.cells
            )));
        }
        let ties = group.values.iter().map(|v| tie_sum(v)).collect();
        let kept = (0..group.mean_cpm.len()).filter(|&g| group.mean_cpm[g] > MIN_CONTROL_CPM).collect();
        Ok(ControlPool { group, ties, kept })
    }
}

/// `ln(f64::MAX)`: where the normal tail of scipy's `ndtr` (Cephes) underflows to 0.
const MAX_LOG: f64 = 709.782_712_893_384;

/// `2 P(Z > |z|)` as scanpy computes it (`2 * scipy.stats.norm.sf(|z|)`), 0 where scipy's
/// tail underflows to 0 (`|z| / sqrt(2)` squared above `ln(f64::MAX)`), so that the p-values
/// that order the genes tie where scipy's do.
fn two_sided_p(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    if x * x > MAX_LOG { 0.0 } else { libm::erfc(x) }
}

/// The two-sided p-value of pdex 0.3 (`numba_mwu._mwu_stats_from_rank_sum`, its arithmetic in
/// its order): the larger of the two U statistics less its mean and a half, over the
/// tie-corrected standard deviation; 1 where every value is equal.
fn pdex_p(rank_sum: f64, n1: f64, n2: f64, ties: f64) -> f64 {
    let n = n1 + n2;
    let u1 = rank_sum - n1 * (n1 + 1.0) / 2.0;
    let u = u1.max(n1 * n2 - u1);
    let mu = n1 * n2 / 2.0;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if variance <= 0.0 {
        return 1.0;
    }
    let z = (u - mu - 0.5) / variance.sqrt();
    // 2 ndtr(-z), ndtr(x) = erfc(-x / sqrt 2) / 2
    (0.5 * libm::erfc(z / std::f64::consts::SQRT_2) * 2.0).clamp(0.0, 1.0)
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

/// Tests every group of `groups` but `control` against `pool`; results by label, sorted.
///
/// With `threads` above 1 this thread reads the groups in turn and hands each, copied, to
/// `threads` workers that transpose and test it (memory: a group per worker and per place in
/// the channel between them); a group's result does not depend on which worker tests it.
pub fn test_groups(
    cells: &Cells,
    groups: &Groups,
    control: &str,
    pool: &ControlPool,
    engine: Engine,
    threads: usize,
    ctx: &RunContext,
) -> Result<Vec<(String, DeResult)>> {
    let tested: Vec<usize> = (0..groups.labels.len()).filter(|&i| groups.labels[i] != control).collect();
    if let Some(&i) = tested.iter().find(|&&i| groups.cells[i] < 2) {
        return Err(Error::InvalidInput(format!(
            "{}: perturbation {:?} has {} cell; the Wilcoxon test needs at least 2",
            cells.origin(),
            groups.labels[i],
            groups.cells[i]
        )));
    }
    let progress = ctx.progress();
    progress.begin("cells (Wilcoxon)", tested.iter().map(|&i| groups.cells[i]).sum());
    let threads = threads.clamp(1, tested.len().max(1));
    let mut results: Vec<Option<DeResult>> = vec![None; groups.labels.len()];
    if threads == 1 {
        for &i in &tested {
            let group = read_group(cells, groups, i, ctx)?;
            results[i] = Some(test(&group, pool, engine));
            progress.advance(group.cells);
        }
    } else {
        let n_genes = cells.n_genes();
        let (work, jobs) = crossbeam_channel::bounded::<(usize, CsrBatch)>(threads);
        let (done, finished) = crossbeam_channel::unbounded::<(usize, DeResult)>();
        std::thread::scope(|scope| -> Result<()> {
            let mut crew = crate::crew::Crew::new();
            for t in 0..threads {
                let (jobs, done) = (jobs.clone(), done.clone());
                crew.spawn_in(
                    scope,
                    crate::Stage::Score,
                    format!("{}-wilcoxon-{t}", crate::Stage::Score),
                    move || {
                        for (i, rows) in jobs {
                            let mut gather = Gather::new(n_genes);
                            gather.add(&rows);
                            drop(rows);
                            if done.send((i, test(&gather.finish(), pool, engine))).is_err() {
                                return;
                            }
                        }
                    },
                )?;
            }
            drop((jobs, done));
            let mut record = |(i, result): (usize, DeResult)| {
                progress.advance(groups.cells[i]);
                results[i] = Some(result);
            };
            let mut read = || -> Result<()> {
                for &i in &tested {
                    let rows = copy_group(cells, groups, i, ctx)?;
                    // A worker that panicked has dropped its end; the crew's join names it.
                    if work.send((i, rows)).is_err() {
                        return Ok(());
                    }
                    finished.try_iter().for_each(&mut record);
                }
                Ok(())
            };
            let read = read();
            // The workers end once `work` is gone, on an error as at the end.
            drop(work);
            finished.iter().for_each(record);
            crew.join()?;
            read
        })?;
    }
    progress.end();
    tested
        .into_iter()
        .map(|i| {
            let result = results[i].take().ok_or_else(|| Error::Panic {
                stage: crate::Stage::Score,
                message: format!("the Wilcoxon test of {:?} did not return", groups.labels[i]),
            })?;
            Ok((groups.labels[i].clone(), result))
        })
        .collect()
}

/// The test of `group` against the control, on the kept genes.
fn test(group: &GroupValues, pool: &ControlPool, engine: Engine) -> DeResult {
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
        p_value.push(match engine {
            Engine::Scanpy => {
                let tie_correction = 1.0 - ties / (size * size * size - size);
                // scanpy's arithmetic, in its order.
                let std_dev = (tie_correction * n1 * n2 * (n1 + n2 + 1.0) / 12.0).sqrt();
                let mut z = (rank_sum - n1 * ((n1 + n2 + 1.0) / 2.0)) / std_dev;
                if z.is_nan() {
                    z = 0.0;
                }
                two_sided_p(z)
            }
            Engine::Pdex => pdex_p(rank_sum, n1, n2, ties),
        });
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

/// Which of the prediction's tested genes is each of the reference's (by gene id), where the
/// two sides kept different genes (each side tested against its own control, as the replicate
/// is); the same positions where both were tested against the reference's control.
#[derive(Debug, Clone)]
pub struct Alignment {
    /// Per reference gene, the prediction's position of the same gene.
    pred_of_real: Vec<Option<usize>>,
    /// The prediction's genes, by id.
    pred_position: std::collections::HashMap<String, usize>,
}

impl Alignment {
    /// Both sides tested the same genes.
    pub fn same(n: usize) -> Alignment {
        Alignment { pred_of_real: (0..n).map(Some).collect(), pred_position: Default::default() }
    }

    /// The reference tested `real` and the prediction `pred` (gene ids).
    pub fn by_id(real: &[&str], pred: &[&str]) -> Alignment {
        let pred_position: std::collections::HashMap<String, usize> =
            pred.iter().enumerate().map(|(j, &g)| (g.to_owned(), j)).collect();
        Alignment { pred_of_real: real.iter().map(|g| pred_position.get(*g).copied()).collect(), pred_position }
    }

    /// The prediction's position of `gene`, given its reference position `real` if it has one.
    fn pred_gene(&self, real: Option<usize>, gene: Option<&str>) -> Option<usize> {
        if self.pred_position.is_empty() {
            return real;
        }
        gene.and_then(|g| self.pred_position.get(g).copied())
    }
}

/// The DE members of one perturbation from its real and predicted tests, the genes of each
/// matched by `alignment`, its own gene (`own`: its position among the reference's tested genes,
/// and its id) left out of both. Where a side did not test a gene, cell-eval2's joins decide:
/// the called sets are compared by gene id (`sig_jaccard`), the directions over the genes both
/// tested (an inner join), the fold changes over the reference's called genes with the
/// prediction's missing ones as 0 (a left join).
pub fn de_scores(
    real: &DeResult,
    pred: &DeResult,
    alignment: &Alignment,
    features: &[&str],
    own: (Option<usize>, Option<&str>),
) -> DeScores {
    let (own_real, own_id) = own;
    let own_pred = alignment.pred_gene(own_real, own_id);
    let genes: Vec<usize> = (0..real.lfc.len()).filter(|&k| Some(k) != own_real).collect();
    let at = |k: usize| alignment.pred_of_real[k];
    let real_called = |k: usize| real.p_adj[k] < ALPHA;
    let pred_called = |k: usize| at(k).is_some_and(|j| pred.p_adj[j] < ALPHA);
    let in_denom = |k: usize| defined(real.lfc[k]);
    let pred_lfc = |k: usize| at(k).map_or(f64::NAN, |j| pred.lfc[j]);
    let matches = |k: usize| in_denom(k) && defined(pred_lfc(k)) && real.lfc[k].signum() == pred_lfc(k).signum();

    // sig_jaccard
    let both = genes.iter().filter(|&&k| real_called(k) && pred_called(k)).count();
    let n_real = genes.iter().filter(|&&k| real_called(k)).count();
    let n_pred = (0..pred.p_adj.len()).filter(|&j| Some(j) != own_pred && pred.p_adj[j] < ALPHA).count();
    let either = n_real + n_pred - both;
    let sig_jaccard = if either == 0 { 1.0 } else { both as f64 / either as f64 };

    // direction_fidelity_yield_raw, over the genes both sides tested.
    let n_conf = n_real;
    let scored: Vec<usize> = genes.iter().copied().filter(|&k| pred_called(k) && in_denom(k)).collect();
    let right = scored.iter().filter(|&&k| matches(k)).count();
    let larger = scored.len().max(n_conf);
    let direction_fidelity_yield_raw = if larger == 0 { f64::NAN } else { right as f64 / larger as f64 };

    // direction_reach_raw: the real called genes the prediction tested, in its order of
    // confidence.
    let direction_reach_raw = if n_conf == 0 {
        f64::NAN
    } else {
        let rank_p = |p: f64| if p.is_nan() { f64::INFINITY } else { p };
        let abs_lfc = |l: f64| if l.is_nan() { f64::NEG_INFINITY } else { l.abs() };
        let p_adj = |k: usize| at(k).map_or(f64::NAN, |j| pred.p_adj[j]);
        let p_value = |k: usize| at(k).map_or(f64::NAN, |j| pred.p_value[j]);
        let mut order: Vec<usize> = genes.iter().copied().filter(|&k| real_called(k) && at(k).is_some()).collect();
        order.sort_by(|&a, &b| {
            pred_called(b)
                .cmp(&pred_called(a))
                .then(rank_p(p_adj(a)).total_cmp(&rank_p(p_adj(b))))
                .then(rank_p(p_value(a)).total_cmp(&rank_p(p_value(b))))
                .then(abs_lfc(pred_lfc(b)).total_cmp(&abs_lfc(pred_lfc(a))))
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
    let error = |k: usize| {
        let l = pred_lfc(k);
        ((if l.is_finite() { l } else { 0.0 }) - real.lfc[k]).abs()
    };
    let lfc_nmae = nmae(real, &genes, error);
    DeScores { direction_fidelity_yield_raw, direction_reach_raw, sig_jaccard, lfc_nmae }
}

/// The mean of `error` (an absolute difference of fold changes) over `mean |real|`, over the
/// reference's called genes among `genes` with a finite fold change, where there are at least
/// [`LFC_NMAE_MIN_GENES`] of them and the denominator is not 0 (`de_lfc_nmae`: `|predicted -
/// real|`; the replicate's `nmae_ref_raw`: `|half A - half B|`).
pub fn nmae(real: &DeResult, genes: &[usize], error: impl Fn(usize) -> f64) -> Option<f64> {
    let gate: Vec<usize> =
        genes.iter().copied().filter(|&k| real.p_adj[k] < ALPHA && real.lfc[k].is_finite()).collect();
    if gate.len() < LFC_NMAE_MIN_GENES {
        return None;
    }
    let n = gate.len() as f64;
    let num = gate.iter().map(|&k| error(k)).sum::<f64>() / n;
    let den = gate.iter().map(|&k| real.lfc[k].abs()).sum::<f64>() / n;
    (den.is_finite() && den != 0.0).then_some(num / den)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The combined sample's average ranks, as scipy's `rankdata`.
    fn ranks(all: &[f64]) -> Vec<f64> {
        let mut order: Vec<usize> = (0..all.len()).collect();
        order.sort_by(|&a, &b| all[a].total_cmp(&all[b]));
        let mut out = vec![0.0; all.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i + 1;
            while j < order.len() && all[order[j]] == all[order[i]] {
                j += 1;
            }
            for &k in &order[i..j] {
                out[k] = (i + j + 1) as f64 / 2.0;
            }
            i = j;
        }
        out
    }

    /// The group's values for one gene: zeros stay implicit, as a CSR row leaves them.
    fn values(cells: &[f64]) -> GroupValues {
        let mut nonzero: Vec<f64> = cells.iter().copied().filter(|&v| v != 0.0).collect();
        nonzero.sort_by(f64::total_cmp);
        GroupValues { cells: cells.len() as u64, values: vec![nonzero], mean_cpm: vec![10.0] }
    }

    #[test]
    fn the_streamed_rank_sum_is_the_rank_sum_of_the_combined_sample() {
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(7);
        for case in 0..200 {
            // Few distinct values, so that ties within and across the samples are common.
            let levels = 1 + case % 6;
            let mut draw = |n: usize| -> Vec<f64> {
                (0..n)
                    .map(|_| if rng.random_bool(0.4) { 0.0 } else { rng.random_range(1..=levels) as f64 * 0.7 })
                    .collect()
            };
            let (x, y) = (draw(2 + case % 9), draw(3 + case % 13));
            let control = values(&y);
            let pool = ControlPool {
                ties: control.values.iter().map(|v| tie_sum(v)).collect(),
                group: control,
                kept: vec![0],
            };
            let got = test(&values(&x), &pool, Engine::Scanpy).p_value[0];
            let got_pdex = test(&values(&x), &pool, Engine::Pdex).p_value[0];

            let all: Vec<f64> = x.iter().chain(&y).copied().collect();
            let r = ranks(&all);
            let rank_sum: f64 = r[..x.len()].iter().sum();
            let mut sorted = all.clone();
            sorted.sort_by(f64::total_cmp);
            let (mut ties, mut i) = (0.0, 0);
            while i < sorted.len() {
                let j = i + sorted[i..].iter().take_while(|&&v| v == sorted[i]).count();
                let t = (j - i) as f64;
                ties += t * t * t - t;
                i = j;
            }
            let (n1, n2) = (x.len() as f64, y.len() as f64);
            let size = n1 + n2;
            let sd = ((1.0 - ties / (size * size * size - size)) * n1 * n2 * (n1 + n2 + 1.0) / 12.0).sqrt();
            let mut z = (rank_sum - n1 * ((n1 + n2 + 1.0) / 2.0)) / sd;
            if z.is_nan() {
                z = 0.0;
            }
            let want = two_sided_p(z);
            assert_eq!(got, want, "case {case}: x {x:?} y {y:?}");
            assert_eq!(got_pdex, pdex_p(rank_sum, n1, n2, ties), "case {case}: x {x:?} y {y:?}");
        }
    }

    #[test]
    fn pdex_p_values_are_scipys_continuity_corrected_ones() {
        // scipy.stats.mannwhitneyu(x, y, use_continuity=True, method="asymptotic").pvalue, which
        // pdex's numba_mwu computes by the same formula.
        let cases: [(&[f64], &[f64], f64); 3] = [
            (
                &[0.0, 0.0, 1.4, 2.1, 2.1, 0.7, 3.5],
                &[0.0, 0.7, 0.7, 0.0, 1.4, 0.0, 0.0, 2.1, 0.7, 0.0],
                0.16795173942656516,
            ),
            (&[0.7, 0.0, 0.0], &[0.0, 0.0, 0.7, 0.0], 1.0),
            (
                &[5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
                &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0],
                0.00026209510359975676,
            ),
        ];
        for (x, y, want) in cases {
            let control = values(y);
            let pool = ControlPool {
                ties: control.values.iter().map(|v| tie_sum(v)).collect(),
                group: control,
                kept: vec![0],
            };
            let got = test(&values(x), &pool, Engine::Pdex).p_value[0];
            // erfc of another library: the last bits may differ.
            assert!((got - want).abs() <= 1e-13 * want, "x {x:?}: {got} vs scipy's {want}");
            let scanpy = test(&values(x), &pool, Engine::Scanpy).p_value[0];
            assert!(scanpy < got, "the correction makes the p-value larger: {scanpy} vs {got}");
        }
        // Every value equal: no evidence either way.
        let control = values(&[0.0, 0.0, 0.0]);
        let pool = ControlPool { ties: vec![0.0], group: control, kept: vec![0] };
        assert_eq!(test(&values(&[0.0, 0.0]), &pool, Engine::Pdex).p_value[0], 1.0);
    }

    #[test]
    fn p_values_underflow_where_scipys_do() {
        // scipy: 2 * norm.sf(37.6) = 2.1496e-309 (subnormal), 2 * norm.sf(38) = 0.
        let p = two_sided_p(37.6);
        assert!(p > 0.0 && (p / 2.149622499173733e-309 - 1.0).abs() < 1e-6, "{p}");
        assert_eq!(two_sided_p(-38.0), 0.0);
        assert_eq!(two_sided_p(0.0), 1.0);
        let p = two_sided_p(1.959963984540054);
        assert!((p - 0.05).abs() < 1e-16, "{p}");
    }

    fn result(lfc: &[f64], p_adj: &[f64]) -> DeResult {
        DeResult { lfc: lfc.to_vec(), p_value: p_adj.to_vec(), p_adj: p_adj.to_vec() }
    }

    #[test]
    fn the_de_members_count_as_cell_eval2_defines_them() {
        // Genes a..l; the perturbation's own gene is `a` (left out everywhere).
        let features: Vec<String> = (b'a'..=b'l').map(|c| (c as char).to_string()).collect();
        let features: Vec<&str> = features.iter().map(String::as_str).collect();
        let real = result(
            &[-5.0, 1.0, 1.0, -1.0, 2.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0],
            &[0.0, 0.01, 0.01, 0.01, 0.2, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
        );
        // Called: b c d e; directions right on b c, wrong on d; e is not called on the real side.
        let pred = result(
            &[-5.0, 2.0, 0.5, 1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            &[0.0, 0.001, 0.002, 0.003, 0.004, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
        );
        let same = Alignment::same(features.len());
        let s = de_scores(&real, &pred, &same, &features, (Some(0), Some("a")));
        // Real called (a left out): b c d f g h i j k l = 10; predicted called: b c d e.
        assert_eq!(s.sig_jaccard, 3.0 / 11.0);
        // Scored: predicted called with a real direction, called on the real side or not (b c d
        // e): right b c e = 3, over max(4, 10).
        assert_eq!(s.direction_fidelity_yield_raw, 3.0 / 10.0);
        // Real called genes in the prediction's order: b c d (right, right, wrong), then f..l by
        // p_adj, f wrong (-1 vs 1), g..l undirected predictions (0): purity 1, 1, 2/3... never
        // back to 0.9 after d, so the deepest prefix at 90% is 2 of 10.
        assert_eq!(s.direction_reach_raw, 2.0 / 10.0);
        // lfc_nmae over the 10 real called genes: |2-1| + |0.5-1| + |1+1| + |-1-1| + 6 * 1 = 11.5
        // over sum |real| = 10.
        assert!((s.lfc_nmae.unwrap() - 11.5 / 10.0).abs() < 1e-15);
        // Fewer than 10 genes called on the real side: no lfc_nmae.
        let few = de_scores(&real, &pred, &same, &features[..], (Some(11), Some("l")));
        assert!(few.lfc_nmae.is_some());
        let mut sparse = real.clone();
        sparse.p_adj[9] = 0.5;
        sparse.p_adj[10] = 0.5;
        assert_eq!(de_scores(&sparse, &pred, &same, &features, (Some(0), Some("a"))).lfc_nmae, None);
    }

    #[test]
    fn sides_that_tested_different_genes_are_joined_as_cell_eval2_joins_them() {
        // The reference tested a..l (its own gene `a`), the prediction b..e and x, y (say its
        // own control kept other genes).
        let features: Vec<String> = (b'a'..=b'l').map(|c| (c as char).to_string()).collect();
        let features: Vec<&str> = features.iter().map(String::as_str).collect();
        let pred_features = ["b", "c", "d", "e", "x", "y"];
        let real = result(
            &[-5.0, 1.0, 1.0, -1.0, 2.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0],
            &[0.0, 0.01, 0.01, 0.01, 0.2, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
        );
        // Called: b (right), c (right), d (wrong), x, y (not tested on the real side).
        let pred = result(&[2.0, 0.5, 1.0, 1.0, 3.0, 3.0], &[0.001, 0.002, 0.003, 0.5, 0.01, 0.02]);
        let alignment = Alignment::by_id(&features, &pred_features);
        let s = de_scores(&real, &pred, &alignment, &features, (Some(0), Some("a")));
        // Real called: b c d f..l = 10; predicted called: b c d x y = 5; both: b c d.
        assert_eq!(s.sig_jaccard, 3.0 / 12.0);
        // Directions over the genes both tested: scored b c d, right b c, over max(3, 10).
        assert_eq!(s.direction_fidelity_yield_raw, 2.0 / 10.0);
        // The real called genes the prediction tested, in its order: b c d: purity 1, 1, 2/3.
        assert_eq!(s.direction_reach_raw, 2.0 / 10.0);
        // Fold changes over the 10 real called genes, the untested ones (f..l) predicted as 0:
        // |2-1| + |0.5-1| + |1+1| + 7 * 1 = 10.5 over 10.
        assert!((s.lfc_nmae.unwrap() - 10.5 / 10.0).abs() < 1e-15);
        // The prediction's own gene is left out by id: with `b` as the perturbation's gene, its
        // predicted call goes too.
        let real_b = result(&real.lfc, &{
            let mut p = real.p_adj.clone();
            p[0] = 0.5;
            p
        });
        let without_b = de_scores(&real_b, &pred, &alignment, &features, (Some(1), Some("b")));
        // Real called: c d f..l = 9; predicted called: c d x y = 4; both: c d.
        assert_eq!(without_b.sig_jaccard, 2.0 / 11.0);
    }
}
