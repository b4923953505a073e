//! The cells of one side of a scoring, read the same way whatever they are: every cell of an
//! `.h5ad` file grouped by an obs column, or cell-eval2's mean-response baseline arm, emitted
//! from the reference's control cells as `cell-eval2 baseline` emits it (never written out).

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::h5ad::H5adReader;

use super::numpy_random::Generator;
use super::targets::{self, TargetGenes};
use crate::context::RunContext;
use crate::error::{Error, Result};
use crate::obs::column_strings;

/// Cells handed over at a time.
const CHUNK_ROWS: u64 = 512;

/// One side's cells.
#[derive(Clone, Copy)]
pub enum Cells<'a> {
    /// Every cell of a file, grouped by the obs column `group_by`.
    File {
        /// The file.
        reader: &'a H5adReader,
        /// The obs column of the groups (perturbations).
        group_by: &'a str,
        /// Only these of its cells (a half of the replicate).
        subset: Option<Subset<'a>>,
    },
    /// The baseline arm of a reference.
    Baseline(&'a BaselineArm),
}

/// Some of a file's cells: those whose entry of `membership` (one per cell) is `side`.
#[derive(Clone, Copy)]
pub struct Subset<'a> {
    /// One entry per cell of the file.
    pub membership: &'a [u8],
    /// The entry of the cells taken.
    pub side: u8,
    /// What the cells are called in messages.
    pub name: &'a str,
}

/// Where each group's cells are: labels sorted (numpy's `unique`), their cell counts and, for a
/// file, their runs of consecutive rows.
#[derive(Debug, Clone)]
pub struct Groups {
    /// Labels, sorted.
    pub labels: Vec<String>,
    /// Cells per label.
    pub cells: Vec<u64>,
    /// Per label, its row ranges in the file (empty for the baseline arm).
    runs: Vec<Vec<Range<u64>>>,
}

impl Groups {
    /// The cells of `subset` among these, groups without one left out.
    fn within(self, subset: Subset) -> Groups {
        let mut out = Groups { labels: Vec::new(), cells: Vec::new(), runs: Vec::new() };
        for (label, runs) in self.labels.into_iter().zip(self.runs) {
            let mut kept: Vec<Range<u64>> = Vec::new();
            for row in runs.into_iter().flatten() {
                if subset.membership[row as usize] != subset.side {
                    continue;
                }
                match kept.last_mut() {
                    Some(run) if run.end == row => run.end = row + 1,
                    _ => kept.push(row..row + 1),
                }
            }
            let n: u64 = kept.iter().map(|r| r.end - r.start).sum();
            if n > 0 {
                out.labels.push(label);
                out.cells.push(n);
                out.runs.push(kept);
            }
        }
        out
    }

    /// The rows of group `i`, ascending.
    pub fn rows(&self, i: usize) -> Vec<u64> {
        self.runs[i].iter().flat_map(|r| r.clone()).collect()
    }

    /// The position of `label`.
    pub fn position(&self, label: &str) -> Option<usize> {
        self.labels.binary_search_by(|l| l.as_str().cmp(label)).ok()
    }
}

impl<'a> Cells<'a> {
    /// The file the cells are (the reference, for the baseline arm).
    pub fn path(&self) -> &'a Path {
        match *self {
            Cells::File { reader, .. } => reader.path(),
            Cells::Baseline(arm) => &arm.reference,
        }
    }

    /// How the cells are named in messages.
    pub fn origin(&self) -> String {
        match self {
            Cells::File { reader, subset: None, .. } => reader.path().display().to_string(),
            Cells::File { reader, subset: Some(s), .. } => format!("{} of {}", s.name, reader.path().display()),
            Cells::Baseline(arm) => format!("the mean-response baseline arm of {}", arm.reference.display()),
        }
    }

    /// Genes.
    pub fn n_genes(&self) -> usize {
        match self {
            Cells::File { reader, .. } => reader.n_vars() as usize,
            Cells::Baseline(arm) => arm.scale.len(),
        }
    }

    /// Cells.
    pub fn n_cells(&self) -> u64 {
        match self {
            Cells::File { reader, subset: None, .. } => reader.n_obs(),
            Cells::File { subset: Some(s), .. } => s.membership.iter().filter(|&&m| m == s.side).count() as u64,
            Cells::Baseline(arm) => arm.cells.iter().sum(),
        }
    }

    /// Hands every cell over in chunks: the cells' index range, their counts and their labels.
    pub fn scan(&self, mut visit: impl FnMut(Range<u64>, &CsrBatch, &[&str]) -> Result<()>) -> Result<()> {
        let mut batch = CsrBatch::new(self.n_genes() as u32);
        match *self {
            Cells::File { reader, group_by, subset } => {
                let n_obs = reader.n_obs();
                let origin = reader.path().display().to_string();
                let mut kept = CsrBatch::new(self.n_genes() as u32);
                let mut first = 0u64;
                for k in 0..n_obs.div_ceil(CHUNK_ROWS) {
                    let rows = k * CHUNK_ROWS..((k + 1) * CHUNK_ROWS).min(n_obs);
                    batch.clear();
                    reader.matrix().read_rows(rows.clone(), &mut batch).map_err(Error::stage(crate::Stage::Read))?;
                    let obs = reader.read_obs(rows.clone()).map_err(Error::stage(crate::Stage::Read))?;
                    let column = column_strings(&obs, group_by, &origin).map_err(|e| match e {
                        Error::InvalidInput(_) if obs.column_by_name(group_by).is_none() => {
                            let names: Vec<String> = obs.schema().fields().iter().map(|f| f.name().clone()).collect();
                            Error::InvalidInput(format!(
                                "{origin}: no obs column {group_by:?} (the perturbation column); obs has {}",
                                crate::suggest::listing(group_by, names.iter().map(String::as_str), 8)
                            ))
                        }
                        other => other,
                    })?;
                    let labels = (0..obs.num_rows())
                        .map(|i| {
                            column.get(i).ok_or_else(|| {
                                Error::InvalidInput(format!(
                                    "{origin}: cell {} has no {group_by:?} (a missing value); every cell needs its \
                                     perturbation",
                                    rows.start + i as u64
                                ))
                            })
                        })
                        .collect::<Result<Vec<&str>>>()?;
                    match subset {
                        None => visit(rows, &batch, &labels)?,
                        Some(s) => {
                            kept.clear();
                            let mut taken = Vec::with_capacity(labels.len());
                            for (r, &label) in labels.iter().enumerate() {
                                if s.membership[(rows.start + r as u64) as usize] == s.side {
                                    let (c, v) = batch.row(r);
                                    kept.push_row(c, v);
                                    taken.push(label);
                                }
                            }
                            let n = taken.len() as u64;
                            visit(first..first + n, &kept, &taken)?;
                            first += n;
                        }
                    }
                }
                Ok(())
            }
            Cells::Baseline(arm) => {
                let mut first = 0u64;
                for i in 0..arm.labels.len() {
                    let label = arm.labels[i].as_str();
                    arm.emit(i, &mut batch, |batch| {
                        let n = batch.n_rows() as u64;
                        let labels = vec![label; n as usize];
                        visit(first..first + n, batch, &labels)?;
                        first += n;
                        Ok(())
                    })?;
                }
                Ok(())
            }
        }
    }

    /// The groups and where their cells are.
    pub fn groups(&self) -> Result<Groups> {
        match *self {
            Cells::File { reader, group_by, subset } => {
                let groups = file_groups(reader, group_by)?;
                Ok(match subset {
                    None => groups,
                    Some(s) => groups.within(s),
                })
            }
            Cells::Baseline(arm) => Ok(Groups {
                labels: arm.labels.clone(),
                cells: arm.cells.clone(),
                runs: vec![Vec::new(); arm.labels.len()],
            }),
        }
    }

    /// Hands the cells of group `i` of `groups` over in chunks.
    pub fn scan_group(&self, groups: &Groups, i: usize, mut visit: impl FnMut(&CsrBatch) -> Result<()>) -> Result<()> {
        let mut batch = CsrBatch::new(self.n_genes() as u32);
        match *self {
            Cells::File { reader, .. } => {
                for run in &groups.runs[i] {
                    let mut start = run.start;
                    while start < run.end {
                        let end = (start + 8 * CHUNK_ROWS).min(run.end);
                        batch.clear();
                        reader.matrix().read_rows(start..end, &mut batch).map_err(Error::stage(crate::Stage::Read))?;
                        visit(&batch)?;
                        start = end;
                    }
                }
                Ok(())
            }
            Cells::Baseline(arm) => {
                let j = arm.labels.binary_search(&groups.labels[i]).map_err(|_| {
                    Error::InvalidInput(format!("the baseline arm has no group {:?}", groups.labels[i]))
                })?;
                arm.emit(j, &mut batch, visit)
            }
        }
    }
}

/// Reads `reader`'s obs column `key` and records where each value's cells are.
fn file_groups(reader: &H5adReader, key: &str) -> Result<Groups> {
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
    let runs: Vec<Vec<Range<u64>>> = order.iter().map(|&g| std::mem::take(&mut runs[g])).collect();
    Ok(Groups {
        labels: order.iter().map(|&g| labels[g].clone()).collect(),
        cells: runs.iter().map(|r| r.iter().map(|r| r.end - r.start).sum()).collect(),
        runs,
    })
}

/// A side's groups reduced to count sums: labels (sorted), cells and per-gene sums per group.
#[derive(Debug, Clone, Copy)]
pub struct GroupSums<'a> {
    /// Labels, sorted.
    pub labels: &'a [String],
    /// Cells per group.
    pub cells: &'a [u64],
    /// Count sums per group and gene.
    pub sums: &'a [Vec<f64>],
}

impl GroupSums<'_> {
    fn row(&self, label: &str) -> Option<usize> {
        self.labels.binary_search_by(|l| l.as_str().cmp(label)).ok()
    }
}

/// The seed `cell-eval2 baseline` emits its arm with by default.
pub const BASELINE_SEED: u64 = 0;

/// cell-eval2 0.20.0's mean-response baseline arm of a reference (`baseline.py`,
/// `build_generic_baseline` with `emit="dispersed"`): every perturbation predicted as the
/// average perturbation. The profile is the mean over the non-control perturbations of their
/// mean counts, each gene leaving out the perturbation that targets it; each perturbation's
/// cells are as many control cells drawn with replacement (`default_rng(seed).integers`, the
/// perturbations in sorted order), each count multiplied by the gene's profile over the
/// control's mean count (0 where the control has none) and rounded to f32; the control's rows
/// are the control's own cells. Memory: the control's cells and one group's draws.
#[derive(Debug)]
pub struct BaselineArm {
    reference: std::path::PathBuf,
    /// The reference's control cells.
    control: CsrBatch,
    /// Per gene, profile over the control's mean.
    scale: Vec<f64>,
    /// The reference's labels, sorted, the control among them.
    labels: Vec<String>,
    /// Cells per label (the reference's).
    cells: Vec<u64>,
    /// Per label, the generator as its draws begin (none for the control).
    starts: Vec<Option<Generator>>,
}

impl BaselineArm {
    /// The arm of `reference`, whose cells `groups` locates and `real` sums (its groups' labels,
    /// sorted, their cells and count sums per gene, as [`super::bulk::side_bulk`] reduced them),
    /// `control` its control's label.
    #[allow(clippy::too_many_arguments, reason = "the arm's inputs, each named")]
    pub fn build(
        reference: &H5adReader,
        groups: &Groups,
        real: GroupSums,
        control: &str,
        genes: &[String],
        target_genes: TargetGenes,
        seed: u64,
        ctx: &RunContext,
    ) -> Result<BaselineArm> {
        let origin = reference.path().display().to_string();
        let ci = real.row(control).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{origin}: no cells of the control {control:?}; the baseline arm is drawn from them"
            ))
        })?;
        let perturbed: Vec<usize> = (0..real.labels.len()).filter(|&j| j != ci).collect();
        if perturbed.is_empty() {
            return Err(Error::InvalidInput(format!(
                "{origin}: no perturbation besides the control {control:?}, so no mean response"
            )));
        }
        let n_genes = genes.len();
        let mut total = vec![0.0f64; n_genes];
        let mut count = vec![perturbed.len() as f64; n_genes];
        let means: Vec<Vec<f64>> = perturbed
            .iter()
            .map(|&j| {
                let n = real.cells[j] as f64;
                real.sums[j].iter().map(|&s| s / n).collect()
            })
            .collect();
        for m in &means {
            for (t, &v) in total.iter_mut().zip(m) {
                *t += v;
            }
        }
        let positions = targets::gene_positions(genes, &origin)?;
        let labels: Vec<&str> = perturbed.iter().map(|&j| real.labels[j].as_str()).collect();
        let resolved = targets::resolve(&labels, &positions, target_genes, &labels, "the mean-response baseline")?;
        if !resolved.columns.is_empty() && perturbed.len() < 2 {
            return Err(Error::InvalidInput(format!(
                "{origin}: one perturbation only; the mean-response baseline leaves each gene's own perturbation out of \
                 its mean, which would leave none (--no-target-genes averages it as it is)"
            )));
        }
        for (&row, &col) in &resolved.columns {
            total[col] -= means[row][col];
            count[col] -= 1.0;
        }
        if let Some(g) = count.iter().position(|&c| c <= 0.0) {
            return Err(Error::InvalidInput(format!(
                "{origin}: every perturbation targets gene {:?}, so its mean response is undefined",
                genes[g]
            )));
        }
        // The control's own cells, raw, and their mean count per gene (the emission's denominator).
        let gi = groups.position(control).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{origin}: no cells of the control {control:?}; the baseline arm is drawn from them"
            ))
        })?;
        let mut cells = CsrBatch::new(n_genes as u32);
        for run in &groups.runs[gi] {
            reference.matrix().read_rows(run.clone(), &mut cells).map_err(Error::stage(crate::Stage::Read))?;
            ctx.check_stopped()?;
        }
        let n_control = cells.n_rows() as f64;
        let mut control_sum = vec![0.0f64; n_genes];
        for r in 0..cells.n_rows() {
            let (cols, values) = cells.row(r);
            for (&c, &v) in cols.iter().zip(values) {
                control_sum[c as usize] += f64::from(v);
            }
        }
        let scale: Vec<f64> = (0..n_genes)
            .map(|g| {
                let control_mean = control_sum[g] / n_control;
                if control_mean <= 0.0 { 0.0 } else { (total[g] / count[g]) / control_mean }
            })
            .collect();
        // The generator as each perturbation's draws begin, in sorted order.
        let mut generator = Generator::new(seed);
        let mut starts = Vec::with_capacity(real.labels.len());
        for (j, &n) in real.cells.iter().enumerate() {
            if j == ci {
                starts.push(None);
                continue;
            }
            starts.push(Some(generator.clone()));
            generator.integers(cells.n_rows() as u64, n as usize);
        }
        Ok(BaselineArm {
            reference: reference.path().to_owned(),
            control: cells,
            scale,
            labels: real.labels.to_vec(),
            cells: real.cells.to_vec(),
            starts,
        })
    }

    /// Hands group `i`'s cells over in chunks, `batch` their buffer.
    fn emit(&self, i: usize, batch: &mut CsrBatch, mut visit: impl FnMut(&CsrBatch) -> Result<()>) -> Result<()> {
        let n_control = self.control.n_rows();
        let draws: Vec<usize> = match &self.starts[i] {
            None => (0..n_control).collect(),
            Some(start) => start
                .clone()
                .integers(n_control as u64, self.cells[i] as usize)
                .into_iter()
                .map(|d| d as usize)
                .collect(),
        };
        let scaled = self.starts[i].is_some();
        let (mut cols, mut values) = (Vec::new(), Vec::new());
        for chunk in draws.chunks(CHUNK_ROWS as usize) {
            batch.clear();
            for &d in chunk {
                let (c, v) = self.control.row(d);
                if !scaled {
                    batch.push_row(c, v);
                    continue;
                }
                cols.clear();
                values.clear();
                for (&c, &v) in c.iter().zip(v) {
                    let emitted = (f64::from(v) * self.scale[c as usize]) as f32;
                    if emitted != 0.0 {
                        cols.push(c);
                        values.push(emitted);
                    }
                }
                batch.push_row(&cols, &values);
            }
            visit(batch)?;
        }
        Ok(())
    }
}
