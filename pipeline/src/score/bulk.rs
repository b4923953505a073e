//! One side of a scoring (the prediction or the reference) reduced to what cell-eval2's
//! expression metrics read, in two streaming passes over the file: per group of cells (one
//! perturbation), the count sums of every gene and, from them, the group's pseudobulk
//! `log1p(TS * sum_g / sum)` and the delete-1 jackknife of that pseudobulk (cell-eval2 0.20.0,
//! `moments.jackknife_correction` and `_loo_bulk`). Memory holds three `groups x genes` arrays
//! of f64 and one chunk of cells, whatever the number of cells.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;

use super::cells::Cells;
use crate::context::RunContext;
use crate::error::{Error, Result};
use cpa_stream_stages::CsrBatch;

/// The largest count total of a cell cell-eval2's `vcc2026` preset accepts
/// (`max_counts_per_cell`).
pub const MAX_CELL_TOTAL: f64 = 1e6;

/// One file's groups: labels in sorted order (numpy's `unique`, as cell-eval2 orders them), their
/// cell counts, count sums, pseudobulks and jackknife corrections.
#[derive(Debug, Clone)]
pub struct SideBulk {
    /// The file.
    pub path: PathBuf,
    /// Group labels, sorted.
    pub labels: Vec<String>,
    /// Cells per group.
    pub cells: Vec<u64>,
    /// Genes.
    pub n_genes: usize,
    /// Per group, the count sums of every gene.
    pub sums: Vec<Vec<f64>>,
    /// Per group, the pseudobulk `log1p(TS * sums / total)` (all zero for a group without counts).
    pub means: Vec<Vec<f64>>,
    /// Per group, the delete-1 jackknife correction `C_p` (0 below two cells).
    pub jackknife: Vec<f64>,
}

impl SideBulk {
    /// The row of `label`, if the file has that group.
    pub fn row(&self, label: &str) -> Option<usize> {
        self.labels.binary_search_by(|l| l.as_str().cmp(label)).ok()
    }
}

/// Group sums of the first pass, groups in the order first seen.
struct Sums {
    index: HashMap<String, usize>,
    labels: Vec<String>,
    cells: Vec<u64>,
    sums: Vec<Vec<f64>>,
    /// The largest count total of a cell of the group.
    max_library: Vec<f64>,
}

impl Sums {
    /// Each of `labels`' group, groups first seen added.
    fn codes(&mut self, labels: &[&str], n_genes: usize) -> Vec<usize> {
        labels
            .iter()
            .map(|&label| {
                let next = self.labels.len();
                let g = *self.index.entry(label.to_owned()).or_insert(next);
                if g == next {
                    self.labels.push(label.to_owned());
                    self.cells.push(0);
                    self.sums.push(vec![0.0; n_genes]);
                    self.max_library.push(0.0);
                }
                g
            })
            .collect()
    }
}

/// Reads the cells of `source` twice and reduces them per group.
/// `target_sum` is the pseudobulk's total (`bulk_target_sum`, 5e4 in `vcc2026`); `fractional`
/// accepts counts that are not whole (a baseline arm of means). `threads` share the jackknife's
/// genes.
pub fn side_bulk(
    source: &Cells,
    target_sum: f64,
    fractional: bool,
    threads: usize,
    ctx: &RunContext,
) -> Result<SideBulk> {
    let path = source.path();
    let origin = source.origin();
    let n_genes = source.n_genes();
    let n_obs = source.n_cells();
    if n_obs == 0 {
        return Err(Error::InvalidInput(format!("{origin}: no cells")));
    }
    let progress = ctx.progress();
    // Pass 1: count sums per group, every count checked.
    let mut first = Sums {
        index: HashMap::new(),
        labels: Vec::new(),
        cells: Vec::new(),
        sums: Vec::new(),
        max_library: Vec::new(),
    };
    progress.begin("cells (sums)", n_obs);
    source.scan(|rows, batch, labels| {
        let codes = first.codes(labels, n_genes);
        for (r, &g) in codes.iter().enumerate() {
            first.cells[g] += 1;
            let (cols, values) = batch.row(r);
            let mut total = 0.0f64;
            let sums = &mut first.sums[g];
            for (&c, &v) in cols.iter().zip(values) {
                let v = f64::from(v);
                check_count(&origin, rows.start + r as u64, c, v, fractional)?;
                sums[c as usize] += v;
                total += v;
            }
            first.max_library[g] = first.max_library[g].max(total);
            if total > MAX_CELL_TOTAL {
                return Err(Error::InvalidInput(format!(
                    "{origin}: cell {} holds {total} counts, more than the {MAX_CELL_TOTAL} a cell may hold in \
                     cell-eval2's vcc2026 scoring (max_counts_per_cell)",
                    rows.start + r as u64
                )));
            }
        }
        progress.advance(rows.end - rows.start);
        ctx.check_stopped()
    })?;
    progress.end();
    // Sorted group order (numpy's unique), and each group's pseudobulk.
    let mut order: Vec<usize> = (0..first.labels.len()).collect();
    order.sort_by(|&a, &b| first.labels[a].cmp(&first.labels[b]));
    let mut rank = vec![0usize; order.len()];
    for (r, &g) in order.iter().enumerate() {
        rank[g] = r;
    }
    let labels: Vec<String> = order.iter().map(|&g| first.labels[g].clone()).collect();
    let cells: Vec<u64> = order.iter().map(|&g| first.cells[g]).collect();
    let sums: Vec<Vec<f64>> = order.iter().map(|&g| std::mem::take(&mut first.sums[g])).collect();
    let totals: Vec<f64> = sums.iter().map(|s| s.iter().sum()).collect();
    let means: Vec<Vec<f64>> = sums.iter().zip(&totals).map(|(s, &t)| bulk_log1p(s, t, target_sum)).collect();

    // Pass 2: the jackknife, per gene `sum_i (v_ig - b_g)` and its squares over each group's
    // cells. Where no cell holds more than `SERIES_MAX_SHARE` of its group's counts, the terms of
    // a cell's zero counts come from power sums of the cells' shares (`series`), and only its
    // non-zero counts are visited; elsewhere every count is (`accumulate_jackknife`).
    let series: Vec<bool> = order
        .iter()
        .zip(&totals)
        .map(|(&g, &total)| total > 0.0 && first.max_library[g] <= SERIES_MAX_SHARE * total)
        .collect();
    let mut powers = vec![[0.0f64; 2 * SERIES_TERMS]; labels.len()];
    let mut s1 = vec![vec![0.0f64; n_genes]; labels.len()];
    let mut s2 = vec![vec![0.0f64; n_genes]; labels.len()];
    let mut dense = Vec::new();
    progress.begin("cells (jackknife)", n_obs);
    source.scan(|rows, batch, labels| {
        let codes = first.codes(labels, n_genes);
        let groups = codes
            .iter()
            .map(|&g| rank.get(g).copied())
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| Error::InvalidInput(format!("{origin}: changed while it was read")))?;
        dense.clear();
        let (mut dense_groups, mut remainders, mut series_cells) = (Vec::new(), Vec::new(), Vec::new());
        for (r, &g) in groups.iter().enumerate() {
            let (cols, values) = batch.row(r);
            let library: f64 = values.iter().map(|&v| f64::from(v)).sum();
            if series[g] {
                let share = library / totals[g];
                add_powers(&mut powers[g], share);
                series_cells.push(SeriesCell {
                    row: r,
                    group: g,
                    share,
                    scale: target_sum / (totals[g] - library),
                    zero_term: (-share).ln_1p(),
                });
            } else {
                let start = dense.len();
                dense.resize(start + n_genes, 0.0f64);
                for (&c, &v) in cols.iter().zip(values) {
                    dense[start + c as usize] += f64::from(v);
                }
                dense_groups.push(g);
                remainders.push(totals[g] - library);
            }
        }
        let group_sums = Bulks { sums: &sums, totals: &totals, means: &means, target_sum };
        accumulate_series(batch, &series_cells, &group_sums, threads, &mut s1, &mut s2)?;
        accumulate_jackknife(&dense, &dense_groups, &remainders, &sums, &means, target_sum, threads, &mut s1, &mut s2)?;
        progress.advance(rows.end - rows.start);
        ctx.check_stopped()
    })?;
    progress.end();
    for g in (0..labels.len()).filter(|&g| series[g]) {
        add_series(&powers[g], &means[g], &mut s1[g], &mut s2[g]);
    }
    let jackknife = (0..labels.len())
        .map(|g| {
            let n = cells[g] as f64;
            if cells[g] < 2 || totals[g] <= 0.0 {
                return 0.0;
            }
            let q: f64 = s1[g].iter().zip(&s2[g]).map(|(&a, &b)| b - a * a / n).sum();
            (((n - 1.0) / n) * q).max(0.0)
        })
        .collect();
    Ok(SideBulk { path: path.to_owned(), labels, cells, n_genes, sums, means, jackknife })
}

/// The terms of the series of a zero count's jackknife term (see [`add_series`]).
const SERIES_TERMS: usize = 12;
/// The largest share of its group's counts a cell may hold for the series (`0.05^13 / 13`: the
/// terms left out are below 2e-17 of the first).
const SERIES_MAX_SHARE: f64 = 0.05;

/// Adds `share^j`, `j = 1..=2K`, to a group's power sums.
fn add_powers(powers: &mut [f64; 2 * SERIES_TERMS], share: f64) {
    let mut x = share;
    for p in powers.iter_mut() {
        *p += x;
        x *= share;
    }
}

/// Adds to a group's jackknife sums the terms of every cell at every gene as if its count there
/// were zero (the non-zero counts were corrected as they passed). For a cell holding the share
/// `e` of its group's total `S`, a zero count's leave-one-out pseudobulk less the group's is
/// `log1p(TS P / (S (1 - e))) - log1p(TS P / S) = log(1 - e u) - log(1 - e)` with
/// `u = 1 / (1 + TS P / S) = exp(-b)`, which is `sum_k c_k e^k` with `c_k = (1 - u^k) / k`: its sum
/// over the cells is `sum_k c_k M_k` and its square's `sum_kl c_k c_l M_(k+l)`, where `M_j` is the
/// cells' sum of `e^j`. Exact to the terms left out (`SERIES_MAX_SHARE`).
fn add_series(powers: &[f64; 2 * SERIES_TERMS], means: &[f64], s1: &mut [f64], s2: &mut [f64]) {
    let mut c = [0.0f64; SERIES_TERMS];
    for ((b, a), q) in means.iter().zip(s1.iter_mut()).zip(s2.iter_mut()) {
        for (k, ck) in c.iter_mut().enumerate() {
            // 1 - u^k without cancelling: -expm1(-k b).
            let k1 = (k + 1) as f64;
            *ck = -(-k1 * b).exp_m1() / k1;
        }
        let mut first = 0.0f64;
        let mut second = 0.0f64;
        for k in 0..SERIES_TERMS {
            first += c[k] * powers[k];
            for l in 0..SERIES_TERMS {
                second += c[k] * c[l] * powers[k + l + 1];
            }
        }
        *a += first;
        *q += second;
    }
}

/// `log1p(TS * sums / total)`; zeros for a group without counts.
fn bulk_log1p(sums: &[f64], total: f64, target_sum: f64) -> Vec<f64> {
    let scale = if total > 0.0 { target_sum / total } else { 0.0 };
    sums.iter().map(|&s| (s * scale).ln_1p()).collect()
}

/// A count must be a non-negative number, whole unless `fractional`.
fn check_count(origin: &str, cell: u64, gene: u32, value: f64, fractional: bool) -> Result<()> {
    if value.is_finite() && value >= 0.0 && (fractional || value.fract() == 0.0) {
        return Ok(());
    }
    Err(Error::InvalidInput(format!(
        "{origin}: cell {cell}, gene {gene} holds {value}; cell-eval2's vcc2026 scoring reads raw counts (whole, \
         non-negative numbers): give the counts, not normalised or log values (--allow-fractional-counts \
         accepts counts that are not whole, such as a baseline of means)"
    )))
}

/// A cell of a group whose zero counts the series accounts for (`add_series`).
struct SeriesCell {
    /// Its row in the chunk.
    row: usize,
    group: usize,
    /// Its share of the group's counts.
    share: f64,
    /// `TS` over the group's counts without the cell's.
    scale: f64,
    /// `log1p(-share)`.
    zero_term: f64,
}

/// The groups' count sums, totals and pseudobulks.
struct Bulks<'a> {
    sums: &'a [Vec<f64>],
    totals: &'a [f64],
    means: &'a [Vec<f64>],
    target_sum: f64,
}

/// Runs `work` on the genes of every group's jackknife sums shared among at most `threads`
/// threads (ranges of at least 256 genes): each call gets its range and, per group, the sums of
/// that range.
fn on_gene_ranges(
    s1: &mut [Vec<f64>],
    s2: &mut [Vec<f64>],
    n_genes: usize,
    threads: usize,
    work: impl Fn(Range<usize>, &mut [(&mut [f64], &mut [f64])]) + Sync,
) -> Result<()> {
    let threads = threads.clamp(1, n_genes.div_ceil(256).max(1));
    let per = n_genes.div_ceil(threads);
    let mut parts: Vec<Vec<(&mut [f64], &mut [f64])>> = (0..threads).map(|_| Vec::new()).collect();
    for (a, b) in s1.iter_mut().zip(s2.iter_mut()) {
        let mut a_rest: &mut [f64] = a;
        let mut b_rest: &mut [f64] = b;
        for part in parts.iter_mut() {
            let take = per.min(a_rest.len());
            let (a_head, a_tail) = a_rest.split_at_mut(take);
            let (b_head, b_tail) = b_rest.split_at_mut(take);
            part.push((a_head, b_head));
            a_rest = a_tail;
            b_rest = b_tail;
        }
    }
    if threads == 1 {
        work(0..n_genes, &mut parts[0]);
        return Ok(());
    }
    let work = &work;
    std::thread::scope(|scope| -> Result<()> {
        let mut crew = crate::crew::Crew::new();
        for (t, mut part) in parts.into_iter().enumerate() {
            let genes = (t * per).min(n_genes)..((t + 1) * per).min(n_genes);
            if genes.is_empty() {
                continue;
            }
            crew.spawn_in(scope, crate::Stage::Score, format!("{}-{t}", crate::Stage::Score), move || {
                work(genes, &mut part)
            })?;
        }
        crew.join()
    })
}

/// Adds the non-zero counts of the chunk's series cells to the jackknife sums: each one's exact
/// term less the zero count's term the series adds for it. The genes are shared among
/// `threads`, each gene's sums taken in cell order whatever the number of threads.
fn accumulate_series(
    batch: &CsrBatch,
    cells: &[SeriesCell],
    groups: &Bulks,
    threads: usize,
    s1: &mut [Vec<f64>],
    s2: &mut [Vec<f64>],
) -> Result<()> {
    let n_genes = groups.sums.first().map_or(0, Vec::len);
    if n_genes == 0 || cells.is_empty() {
        return Ok(());
    }
    on_gene_ranges(s1, s2, n_genes, threads, |genes: std::ops::Range<usize>, part: &mut [(&mut [f64], &mut [f64])]| {
        for cell in cells {
            let g = cell.group;
            let (a, b) = &mut part[g];
            let (sums, mean) = (&groups.sums[g], &groups.means[g]);
            let (cols, values) = batch.row(cell.row);
            for (&c, &v) in cols.iter().zip(values) {
                let c = c as usize;
                if !genes.contains(&c) {
                    continue;
                }
                let (m, share_of_bulk) = (mean[c], sums[c] * groups.target_sum / groups.totals[g]);
                let exact = (cell.scale * (sums[c] - f64::from(v))).ln_1p() - m;
                let as_zero = (-cell.share / (1.0 + share_of_bulk)).ln_1p() - cell.zero_term;
                a[c - genes.start] += exact - as_zero;
                b[c - genes.start] += exact * exact - as_zero * as_zero;
            }
        }
    })
}

/// Adds the chunk's cells to the jackknife sums: for cell `i` of group `p` with the remainder
/// `r_i = S_p - lib_i`, `v_ig - b_g` where `v_ig = log1p(TS * (P_pg - y_ig) / r_i)` (0 when
/// `r_i` is 0: the cell holds all of the group's counts) and `b_g` the group's pseudobulk. The
/// genes are shared among `threads`, each gene's sums taken in cell order whatever the number of
/// threads, so the result does not depend on it.
#[allow(clippy::too_many_arguments, reason = "the pass's arrays, named as the formula names them")]
fn accumulate_jackknife(
    dense: &[f64],
    groups: &[usize],
    remainders: &[f64],
    sums: &[Vec<f64>],
    means: &[Vec<f64>],
    target_sum: f64,
    threads: usize,
    s1: &mut [Vec<f64>],
    s2: &mut [Vec<f64>],
) -> Result<()> {
    let n_genes = sums.first().map_or(0, Vec::len);
    if n_genes == 0 || groups.is_empty() {
        return Ok(());
    }
    on_gene_ranges(s1, s2, n_genes, threads, |genes, part| {
        for (r, &g) in groups.iter().enumerate() {
            let (a, b) = &mut part[g];
            let row = &dense[r * n_genes + genes.start..r * n_genes + genes.end];
            let p = &sums[g][genes.clone()];
            let m = &means[g][genes.clone()];
            let rem = remainders[r];
            if rem > 0.0 {
                let scale = target_sum / rem;
                for k in 0..row.len() {
                    let d = (scale * (p[k] - row[k])).ln_1p() - m[k];
                    a[k] += d;
                    b[k] += d * d;
                }
            } else {
                for k in 0..row.len() {
                    let d = -m[k];
                    a[k] += d;
                    b[k] += d * d;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jackknife_is_the_leave_one_out_variance_of_the_pseudobulk() {
        // Two groups of cells (rows) over four genes, one cell holding all of its group's counts
        // in one gene, whatever the number of threads.
        let cells: [(usize, [f64; 4]); 7] = [
            (0, [3.0, 0.0, 1.0, 5.0]),
            (1, [0.0, 2.0, 0.0, 0.0]),
            (0, [1.0, 1.0, 0.0, 2.0]),
            (0, [0.0, 4.0, 2.0, 0.0]),
            (1, [0.0, 0.0, 7.0, 0.0]),
            (0, [2.0, 0.0, 0.0, 1.0]),
            (1, [1.0, 0.0, 0.0, 3.0]),
        ];
        let ts = 5e4;
        let mut sums = vec![vec![0.0; 4]; 2];
        for (g, y) in &cells {
            for k in 0..4 {
                sums[*g][k] += y[k];
            }
        }
        let totals: Vec<f64> = sums.iter().map(|s| s.iter().sum()).collect();
        let means: Vec<Vec<f64>> = sums.iter().zip(&totals).map(|(s, &t)| bulk_log1p(s, t, ts)).collect();
        for threads in [1, 3] {
            let (mut s1, mut s2) = (vec![vec![0.0; 4]; 2], vec![vec![0.0; 4]; 2]);
            let dense: Vec<f64> = cells.iter().flat_map(|(_, y)| y.iter().copied()).collect();
            let groups: Vec<usize> = cells.iter().map(|(g, _)| *g).collect();
            let remainders: Vec<f64> = cells.iter().map(|(g, y)| totals[*g] - y.iter().sum::<f64>()).collect();
            accumulate_jackknife(&dense, &groups, &remainders, &sums, &means, ts, threads, &mut s1, &mut s2)
                .unwrap_or_else(|e| panic!("{e}"));
            for g in 0..2 {
                let members: Vec<&[f64; 4]> = cells.iter().filter(|(c, _)| *c == g).map(|(_, y)| y).collect();
                let n = members.len() as f64;
                // Each leave-one-out pseudobulk, then (n - 1) / n times the sum of their squared
                // deviations from their mean.
                let loo: Vec<Vec<f64>> = members
                    .iter()
                    .map(|y| {
                        let rest: Vec<f64> = (0..4).map(|k| sums[g][k] - y[k]).collect();
                        bulk_log1p(&rest, rest.iter().sum(), ts)
                    })
                    .collect();
                let mut want = 0.0;
                for k in 0..4 {
                    let mean = loo.iter().map(|v| v[k]).sum::<f64>() / n;
                    want += loo.iter().map(|v| (v[k] - mean).powi(2)).sum::<f64>();
                }
                want *= (n - 1.0) / n;
                let q: f64 = s1[g].iter().zip(&s2[g]).map(|(&a, &b)| b - a * a / n).sum();
                let got = ((n - 1.0) / n) * q;
                assert!((got - want).abs() < 1e-12 * want.max(1.0), "group {g}, {threads} threads: {got} vs {want}");
            }
        }
    }

    #[test]
    fn the_series_gives_the_exact_jackknife_whatever_the_number_of_threads() {
        // 60 cells of one group over 600 genes (three threads' ranges), no cell above 5% of the
        // group's counts: the series pass against the exact pass.
        let (n_cells, n_genes, ts) = (60usize, 600usize, 5e4);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut draw = move || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        let mut batch = CsrBatch::new(n_genes as u32);
        let mut dense = vec![0.0f64; n_cells * n_genes];
        for r in 0..n_cells {
            let (mut cols, mut data) = (Vec::new(), Vec::new());
            for c in 0..n_genes {
                if draw() % 3 == 0 {
                    let v = (1 + draw() % 6) as f32;
                    cols.push(c as u32);
                    data.push(v);
                    dense[r * n_genes + c] = f64::from(v);
                }
            }
            batch.push_row(&cols, &data);
        }
        let mut sums = vec![vec![0.0f64; n_genes]];
        for r in 0..n_cells {
            for c in 0..n_genes {
                sums[0][c] += dense[r * n_genes + c];
            }
        }
        let totals = vec![sums[0].iter().sum::<f64>()];
        let means = vec![bulk_log1p(&sums[0], totals[0], ts)];
        let libraries: Vec<f64> = (0..n_cells).map(|r| dense[r * n_genes..(r + 1) * n_genes].iter().sum()).collect();
        assert!(libraries.iter().all(|&l| l <= SERIES_MAX_SHARE * totals[0]));

        let (mut e1, mut e2) = (vec![vec![0.0; n_genes]], vec![vec![0.0; n_genes]]);
        let remainders: Vec<f64> = libraries.iter().map(|l| totals[0] - l).collect();
        accumulate_jackknife(&dense, &vec![0; n_cells], &remainders, &sums, &means, ts, 1, &mut e1, &mut e2)
            .unwrap_or_else(|e| panic!("{e}"));

        let bulks = Bulks { sums: &sums, totals: &totals, means: &means, target_sum: ts };
        let mut runs = Vec::new();
        for threads in [1, 3] {
            let mut powers = [0.0f64; 2 * SERIES_TERMS];
            let cells: Vec<SeriesCell> = libraries
                .iter()
                .enumerate()
                .map(|(row, &l)| {
                    let share = l / totals[0];
                    add_powers(&mut powers, share);
                    SeriesCell { row, group: 0, share, scale: ts / (totals[0] - l), zero_term: (-share).ln_1p() }
                })
                .collect();
            let (mut s1, mut s2) = (vec![vec![0.0; n_genes]], vec![vec![0.0; n_genes]]);
            accumulate_series(&batch, &cells, &bulks, threads, &mut s1, &mut s2).unwrap_or_else(|e| panic!("{e}"));
            add_series(&powers, &means[0], &mut s1[0], &mut s2[0]);
            for c in 0..n_genes {
                assert!((s1[0][c] - e1[0][c]).abs() < 1e-10, "gene {c}: {} vs {}", s1[0][c], e1[0][c]);
                assert!((s2[0][c] - e2[0][c]).abs() < 1e-10 * e2[0][c].abs().max(1e-6), "gene {c}");
            }
            runs.push((s1, s2));
        }
        assert_eq!(runs[0], runs[1], "the threads' sums differ from one thread's");
    }
}
