//! Batches of cells as the loader fills them: CSR counts, CSR doses, covariate codes. Their device
//! form, which the model reads, is `cpa_stream_engine::model::batch`.

use sprs::CsMatViewI;

use super::vocab::{PADDING_ID, Vocabulary};
use crate::counts_csr::CsrBatch;
use crate::error::{Error, Result};

/// The perturbations of a run of cells as a CSR matrix of doses, cells x perturbation
/// vocabulary: `offsets` has one more entry than cells, and each cell's entries (`ids` with their
/// `doses`) are sorted by perturbation id, whatever the order of the parts in obs ("A+B" with
/// "0.1+1" and "B+A" with "1+0.1" give the same row).
///
/// The one builder of perturbation rows: training and validation batches, prediction targets and
/// evaluation's counterfactuals all fill one of these, and the engine hands it to the model.
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
}
