//! Batches of cells: the host form the loader fills (CSR counts, CSR doses, covariate codes) and
//! the device form the model reads (counts densified on the device).

use std::ops::Range;

use sprs::CsMatViewI;
use tch::{Device, Kind, Tensor};

use super::likelihood::Entries;
use super::vocab::{PADDING_ID, Vocabulary};
use crate::csr::CsrBatch;
use crate::error::{Error, Result};

/// The perturbations of a run of cells as a CSR matrix of doses, cells x perturbation
/// vocabulary: `offsets` has one more entry than cells, and each cell's entries (`ids` with their
/// `doses`) are sorted by perturbation id, whatever the order of the parts in obs ("A+B" with
/// "0.1+1" and "B+A" with "1+0.1" give the same row).
///
/// The one builder of perturbation rows: training and validation batches, prediction targets and
/// evaluation's counterfactuals all fill one of these, and [`to_device`](Self::to_device) hands it
/// to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct PerturbationCsr {
    /// Entry offsets, one more than cells.
    pub offsets: Vec<i64>,
    /// Perturbation id of each entry.
    pub ids: Vec<i64>,
    /// Dose of each entry.
    pub doses: Vec<f32>,
}

impl Default for PerturbationCsr {
    fn default() -> Self {
        PerturbationCsr { offsets: vec![0], ids: Vec::new(), doses: Vec::new() }
    }
}

impl PerturbationCsr {
    /// An empty matrix (no cells).
    pub fn new() -> PerturbationCsr {
        PerturbationCsr::default()
    }

    /// Removes every cell, keeping the buffers.
    pub fn clear(&mut self) {
        self.offsets.truncate(1);
        self.ids.clear();
        self.doses.clear();
    }

    /// Cells (rows).
    pub fn n_rows(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Appends one cell's parts (perturbation id, dose), stored sorted by id.
    pub fn push(&mut self, parts: &[(u32, f32)]) {
        let start = self.ids.len();
        for &(id, dose) in parts {
            // Insertion sort: a cell has at most max_comb_len parts.
            let mut at = self.ids.len();
            while at > start && self.ids[at - 1] > i64::from(id) {
                at -= 1;
            }
            self.ids.insert(at, i64::from(id));
            self.doses.insert(at, dose);
        }
        self.offsets.push(self.ids.len() as i64);
    }

    /// Appends `n` cells with the same parts (a target applied to a run of source cells).
    pub fn push_repeated(&mut self, parts: &[(u32, f32)], n: usize) {
        if n == 0 {
            return;
        }
        let start = self.ids.len();
        self.push(parts);
        let end = self.ids.len();
        for _ in 1..n {
            self.ids.extend_from_within(start..end);
            self.doses.extend_from_within(start..end);
            self.offsets.push(self.ids.len() as i64);
        }
    }

    /// The doses as a sparse matrix (a view of the buffers), after sprs's structural checks:
    /// offsets monotone and consistent, ids in range, sorted and distinct within each cell.
    pub fn matrix(&self, n_perturbations: usize) -> Result<CsMatViewI<'_, f32, i64>> {
        CsMatViewI::try_new((self.n_rows(), n_perturbations), &self.offsets[..], &self.ids[..], &self.doses[..])
            .map_err(|(_, _, _, e)| Error::InvalidInput(format!("batch: perturbation doses: {e}")))
    }

    /// The matrix on `device`, as the model reads it.
    pub fn to_device(&self, device: Device) -> Result<DevicePerts> {
        let to = |t: Tensor| -> Result<Tensor> { Ok(t.f_to_device(device)?) };
        Ok(DevicePerts {
            ids: to(Tensor::f_from_slice(&self.ids)?)?,
            offsets: to(Tensor::f_from_slice(&self.offsets)?)?,
            doses: to(Tensor::f_from_slice(&self.doses)?)?,
        })
    }
}

/// One batch of cells as the loader hands it to the trainer. Its buffers are kept by
/// [`clear`](HostBatch::clear), so a recycled batch allocates only while it grows.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// Counts (or values, for `gauss`), cells x genes.
    pub counts: CsrBatch,
    /// The perturbation doses of each cell.
    pub perts: PerturbationCsr,
    /// Category codes, one vector per covariate of the vocabulary.
    pub covariates: Vec<Vec<i64>>,
    /// Condition class of each cell (the perturbation adversary's label).
    pub conditions: Vec<i64>,
}

impl HostBatch {
    /// An empty batch for `n_genes` genes and `n_covariates` covariates.
    pub fn new(n_genes: u32, n_covariates: usize) -> HostBatch {
        HostBatch {
            counts: CsrBatch::new(n_genes),
            perts: PerturbationCsr::new(),
            covariates: vec![Vec::new(); n_covariates],
            conditions: Vec::new(),
        }
    }

    /// Removes every cell, keeping the buffers.
    pub fn clear(&mut self) {
        self.counts.clear();
        self.perts.clear();
        self.covariates.iter_mut().for_each(Vec::clear);
        self.conditions.clear();
    }

    /// Cells in the batch.
    pub fn n_cells(&self) -> usize {
        self.conditions.len()
    }

    /// Whether the batch holds no cell.
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// Appends a cell's perturbations, covariate codes and class; its counts go to `counts`
    /// separately (the loader copies them straight from the store).
    pub fn push_labels(&mut self, parts: &[(u32, f32)], covariates: &[u32], class: u32) {
        self.perts.push(parts);
        for (codes, &c) in self.covariates.iter_mut().zip(covariates) {
            codes.push(i64::from(c));
        }
        self.conditions.push(i64::from(class));
    }

    /// The doses as a cells x perturbation-vocabulary CSR matrix ([`PerturbationCsr::matrix`]).
    pub fn dose_matrix(&self, n_perturbations: usize) -> Result<CsMatViewI<'_, f32, i64>> {
        self.perts.matrix(n_perturbations)
    }

    /// Checks the batch against a vocabulary: shapes agree, ids and codes are in range, doses
    /// finite and non-negative. Errors name the cell (row of the batch).
    pub fn check(&self, vocab: &Vocabulary) -> Result<()> {
        let n = self.n_cells();
        let bad = |msg: String| Err(Error::InvalidInput(format!("batch: {msg}")));
        if self.counts.n_rows() != n || self.perts.n_rows() != n {
            return bad(format!(
                "{} count rows and {} perturbation rows for {n} cells",
                self.counts.n_rows(),
                self.perts.n_rows()
            ));
        }
        if self.counts.n_cols() as usize != vocab.n_genes() {
            return bad(format!("{} genes, the model has {}", self.counts.n_cols(), vocab.n_genes()));
        }
        if self.covariates.len() != vocab.covariates.len() || self.covariates.iter().any(|c| c.len() != n) {
            return bad(format!("covariate codes do not match the model's {} covariates", vocab.covariates.len()));
        }
        let doses = self.dose_matrix(vocab.n_perturbations())?;
        for (row, cell) in doses.outer_iterator().enumerate() {
            for (id, &d) in cell.iter() {
                if id == PADDING_ID {
                    return bad(format!("cell {row}: the padding id {PADDING_ID} is not a perturbation"));
                }
                if !d.is_finite() || d < 0.0 {
                    return bad(format!("cell {row}: dose {d} is not a finite number >= 0"));
                }
            }
        }
        for row in 0..n {
            let class = self.conditions[row];
            if class < 0 || class as usize >= vocab.conditions.len() {
                return bad(format!("cell {row}: condition class {class} outside 0..{}", vocab.conditions.len()));
            }
            for (cov, codes) in vocab.covariates.iter().zip(&self.covariates) {
                let c = codes[row];
                if c < 0 || c as usize >= cov.categories.len() {
                    return bad(format!("cell {row}: {} code {c} outside 0..{}", cov.name, cov.categories.len()));
                }
            }
        }
        Ok(())
    }
}

/// The perturbations of a batch on the device: CSR over the perturbation vocabulary.
#[derive(Debug)]
pub struct DevicePerts {
    /// Perturbation id of each entry (int64).
    pub ids: Tensor,
    /// Entry offsets, one more than cells (int64).
    pub offsets: Tensor,
    /// Dose of each entry (float32).
    pub doses: Tensor,
}

/// A batch on the model's device.
#[derive(Debug)]
pub struct DeviceBatch {
    /// Cells.
    pub n_cells: i64,
    /// Dense counts, cells x genes, float32.
    pub x: Tensor,
    /// The non-zero entries of `x`.
    pub entries: Entries,
    /// The cells' perturbations.
    pub perts: DevicePerts,
    /// One int64 code vector per covariate.
    pub covariates: Vec<Tensor>,
    /// Condition classes, int64.
    pub conditions: Tensor,
}

impl DeviceBatch {
    /// Uploads a host batch and densifies its counts on `device` (the host never holds the dense
    /// matrix). The batch should have passed [`HostBatch::check`].
    pub fn upload(batch: &HostBatch, device: Device) -> Result<DeviceBatch> {
        let n = batch.n_cells() as i64;
        let genes = i64::from(batch.counts.n_cols());
        let (x, entries) = densify_with_entries(&batch.counts, device)?;
        let to = |t: Tensor| -> Result<Tensor> { Ok(t.f_to_device(device)?) };
        let perts = batch.perts.to_device(device)?;
        let covariates = batch.covariates.iter().map(|c| to(Tensor::f_from_slice(c)?)).collect::<Result<Vec<_>>>()?;
        let conditions = to(Tensor::f_from_slice(&batch.conditions)?)?;
        debug_assert_eq!(x.size(), [n, genes]);
        Ok(DeviceBatch { n_cells: n, x, entries, perts, covariates, conditions })
    }
}

/// CSR rows to a dense float32 matrix on `device`: the CSR arrays are copied (values float32,
/// column indices int32), the row of each entry is expanded and the entries scattered there.
pub fn densify(rows: &CsrBatch, device: Device) -> Result<Tensor> {
    Ok(densify_with_entries(rows, device)?.0)
}

/// [`densify`], also returning the non-zero entries (row, column, value) on the device.
pub fn densify_with_entries(rows: &CsrBatch, device: Device) -> Result<(Tensor, Entries)> {
    densify_range(rows, 0..rows.n_rows(), device)
}

/// [`densify_with_entries`] of the rows `range` of `rows` (row numbers of the result and of the
/// entries start at 0).
pub fn densify_range(rows: &CsrBatch, range: Range<usize>, device: Device) -> Result<(Tensor, Entries)> {
    if range.start > range.end || range.end > rows.n_rows() {
        return Err(Error::InvalidInput(format!("rows {range:?} of a batch of {} rows", rows.n_rows())));
    }
    if rows.n_cols() > i32::MAX as u32 {
        return Err(Error::InvalidInput(format!("{} genes: at most {} are supported", rows.n_cols(), i32::MAX)));
    }
    let (n, genes) = (range.len() as i64, i64::from(rows.n_cols()));
    let indptr = &rows.indptr()[range.start..=range.end];
    let (first, last) = (indptr[0] as usize, indptr[indptr.len() - 1] as usize);
    let nnz = (last - first) as i64;
    let mut dense = Tensor::f_zeros([n, genes], (Kind::Float, device))?;
    if nnz == 0 {
        let empty = |kind| Tensor::f_zeros([0], (kind, device));
        return Ok((
            dense,
            Entries { rows: empty(Kind::Int64)?, cols: empty(Kind::Int64)?, values: empty(Kind::Float)? },
        ));
    }
    let values = Tensor::f_from_slice(&rows.data()[first..last])?.f_to_device(device)?;
    let col: &[i32] = bytemuck::cast_slice(&rows.indices()[first..last]);
    let col = Tensor::f_from_slice(col)?.f_to_device(device)?.f_to_kind(Kind::Int64)?;
    let indptr: &[i64] = bytemuck::cast_slice(indptr);
    let lengths = Tensor::f_from_slice(indptr)?.f_to_device(device)?.f_diff(1, 0, None::<&Tensor>, None::<&Tensor>)?;
    let row = Tensor::f_repeat_interleave(&lengths, nnz)?;
    // In place: the zeros are fresh, and a copy would double the largest tensor of the step.
    let _ = dense.f_index_put_(&[Some(row.shallow_clone()), Some(col.shallow_clone())], &values, false)?;
    Ok((dense, Entries { rows: row, cols: col, values }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doses_are_stored_sorted_and_checked_as_csr() -> Result<()> {
        let mut b = HostBatch::new(3, 0);
        b.counts.push_row(&[], &[]);
        b.push_labels(&[(3, 1.0), (2, 0.1)], &[], 0);
        assert_eq!((b.perts.ids.as_slice(), b.perts.doses.as_slice()), (&[2i64, 3][..], &[0.1f32, 1.0][..]));
        let m = b.dose_matrix(4)?;
        assert_eq!(m.get(0, 2), Some(&0.1));
        assert!(b.dose_matrix(3).is_err(), "id 3 outside a vocabulary of 3");
        b.counts.push_row(&[], &[]);
        b.push_labels(&[(2, 1.0), (2, 0.5)], &[], 0);
        let err = b.dose_matrix(4).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with("batch: perturbation doses:"), "{err}");
        Ok(())
    }

    #[test]
    fn densify_places_every_entry() -> Result<()> {
        let mut rows = CsrBatch::new(5);
        rows.push_row(&[0, 3], &[1.0, 7.0]);
        rows.push_row(&[], &[]);
        rows.push_row(&[4], &[2.5]);
        let dense = densify(&rows, Device::Cpu)?;
        let got = Vec::<f32>::try_from(&dense.f_flatten(0, -1)?)?;
        assert_eq!(got, [1.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.5]);
        Ok(())
    }

    #[test]
    fn densify_range_is_the_slice_of_the_whole() -> Result<()> {
        let mut rows = CsrBatch::new(4);
        rows.push_row(&[1], &[3.0]);
        rows.push_row(&[0, 2], &[1.0, 2.0]);
        rows.push_row(&[], &[]);
        rows.push_row(&[3], &[9.0]);
        let whole = densify(&rows, Device::Cpu)?;
        for (a, b) in [(0, 4), (1, 3), (2, 3), (3, 4), (2, 2)] {
            let (part, entries) = densify_range(&rows, a..b, Device::Cpu)?;
            assert!(part.f_equal(&whole.f_narrow(0, a as i64, (b - a) as i64)?)?, "rows {a}..{b}");
            let nnz = (rows.indptr()[b] - rows.indptr()[a]) as i64;
            assert_eq!(entries.values.size(), [nnz], "rows {a}..{b}");
        }
        assert!(densify_range(&rows, 3..5, Device::Cpu).is_err());
        Ok(())
    }
}
