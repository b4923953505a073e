//! The counts' CSR: an owned batch of a matrix's sparse rows (cells x genes), reused between
//! batches. (The perturbations' CSR is `model::batch::PerturbationCsr`.)

/// Rows of a sparse matrix in CSR layout: `indptr` (starting at 0, one more entry than rows),
/// column `indices` sorted within each row, and `data`.
///
/// Buffers are kept on [`clear`](CsrBatch::clear), so a batch recycled between stages allocates
/// only while it grows.
///
/// ```
/// use cpa_stream_stages::CsrBatch;
/// let mut batch = CsrBatch::new(4);
/// batch.push_row(&[0, 3], &[1.0, 2.0]);
/// batch.push_row(&[], &[]);
/// assert_eq!(batch.n_rows(), 2);
/// assert_eq!(batch.row(0), (&[0u32, 3][..], &[1.0f32, 2.0][..]));
/// assert_eq!(batch.validate(), Ok(()));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CsrBatch {
    n_cols: u32,
    indptr: Vec<u64>,
    indices: Vec<u32>,
    data: Vec<f32>,
}

impl CsrBatch {
    /// An empty batch of rows with `n_cols` columns.
    pub fn new(n_cols: u32) -> CsrBatch {
        CsrBatch { n_cols, indptr: vec![0], indices: Vec::new(), data: Vec::new() }
    }

    /// An empty batch with room for `rows` rows and `nnz` entries.
    pub fn with_capacity(n_cols: u32, rows: usize, nnz: usize) -> CsrBatch {
        let mut indptr = Vec::with_capacity(rows + 1);
        indptr.push(0);
        CsrBatch { n_cols, indptr, indices: Vec::with_capacity(nnz), data: Vec::with_capacity(nnz) }
    }

    /// Removes all rows, keeping the allocations.
    /// Makes room for `rows` more rows with `nnz` more entries in total. When the buffers must
    /// grow they grow to an eighth over what is asked, not to the next power of two: a recycled
    /// batch then holds little more than the largest batch it carries and, since batches of a
    /// stream are of similar size, stops reallocating after a few of them.
    pub fn reserve(&mut self, rows: usize, nnz: usize) {
        fn grow<T>(v: &mut Vec<T>, more: usize) {
            if v.capacity() - v.len() < more {
                let more = more.saturating_add(more / 8);
                v.reserve_exact(more);
            }
        }
        grow(&mut self.indptr, rows);
        grow(&mut self.indices, nnz);
        grow(&mut self.data, nnz);
    }

    /// Removes every row, keeping the buffers.
    pub fn clear(&mut self) {
        self.indptr.truncate(1);
        self.indices.clear();
        self.data.clear();
    }

    /// Appends one row. Panics if `indices` and `data` differ in length (a programming error);
    /// use [`validate`](CsrBatch::validate) for content checks on untrusted data.
    pub fn push_row(&mut self, indices: &[u32], data: &[f32]) {
        assert_eq!(indices.len(), data.len(), "a row needs one value per index");
        self.indices.extend_from_slice(indices);
        self.data.extend_from_slice(data);
        self.indptr.push(self.indices.len() as u64);
    }

    /// Appends consecutive rows given as CSR with absolute offsets: `indptr` (one more entry than
    /// rows, non-decreasing) indexes `indices` and `data`, which hold entries
    /// `indptr[0]..indptr[last]`. One copy per array instead of one per row.
    pub fn push_rows(&mut self, indptr: &[u64], indices: &[u32], data: &[f32]) {
        let (Some(&first), Some(&last)) = (indptr.first(), indptr.last()) else { return };
        assert_eq!(indices.len() as u64, last - first, "entries must match the offsets");
        assert_eq!(indices.len(), data.len(), "a row needs one value per index");
        let base = self.indices.len() as u64;
        self.indices.extend_from_slice(indices);
        self.data.extend_from_slice(data);
        self.indptr.extend(indptr[1..].iter().map(|&p| p - first + base));
    }

    /// Appends one row whose entries were written with [`entries_mut`](CsrBatch::entries_mut).
    pub(crate) fn close_row(&mut self) {
        debug_assert_eq!(self.indices.len(), self.data.len());
        self.indptr.push(self.indices.len() as u64);
    }

    /// The index and value buffers, for appending the entries of the row being built.
    pub(crate) fn entries_mut(&mut self) -> (&mut Vec<u32>, &mut Vec<f32>) {
        (&mut self.indices, &mut self.data)
    }

    /// Columns (genes).
    pub fn n_cols(&self) -> u32 {
        self.n_cols
    }

    /// Rows (cells).
    pub fn n_rows(&self) -> usize {
        self.indptr.len() - 1
    }

    /// Stored entries.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.n_rows() == 0
    }

    /// Row offsets, one more than rows.
    pub fn indptr(&self) -> &[u64] {
        &self.indptr
    }

    /// Column indices of every entry.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// Values of every entry.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Row `i`'s column indices and values.
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (start, end) = (self.indptr[i] as usize, self.indptr[i + 1] as usize);
        (&self.indices[start..end], &self.data[start..end])
    }

    /// Bytes of the payload (indptr, indices and data), the measure stages report.
    pub fn byte_size(&self) -> u64 {
        (self.indptr.len() * 8 + self.indices.len() * 4 + self.data.len() * 4) as u64
    }

    /// Appends the rows of `other` with their columns mapped through `map` (old column ->
    /// new column, `None` = dropped); rows are re-sorted when the map reorders columns.
    pub fn push_remapped(&mut self, other: &CsrBatch, map: &[Option<u32>]) {
        let mut pairs: Vec<(u32, f32)> = Vec::new();
        for r in 0..other.n_rows() {
            let (idx, val) = other.row(r);
            pairs.clear();
            pairs.extend(
                idx.iter().zip(val).filter_map(|(&c, &v)| map.get(c as usize).copied().flatten().map(|n| (n, v))),
            );
            if pairs.windows(2).any(|w| w[0].0 > w[1].0) {
                pairs.sort_unstable_by_key(|p| p.0);
            }
            self.indices.extend(pairs.iter().map(|p| p.0));
            self.data.extend(pairs.iter().map(|p| p.1));
            self.indptr.push(self.indices.len() as u64);
        }
    }

    /// Checks every row with [`check_row`]. The error names the row (within the batch) and
    /// column.
    pub fn validate(&self) -> Result<(), String> {
        for r in 0..self.n_rows() {
            let (indices, data) = self.row(r);
            check_row(indices, data, self.n_cols).map_err(|e| format!("row {r}{e}"))?;
        }
        Ok(())
    }
}

/// The rule for every stored row: column indices strictly increasing and below `n_cols`,
/// values finite and >= 0 (counts or normalised expression). A fast pass (what every reader runs
/// on what it gathers); the error (`: column ...`, to follow a row's name) is worked out only when
/// the pass fails.
pub fn check_row(indices: &[u32], data: &[f32], n_cols: u32) -> Result<(), String> {
    let ordered = indices.windows(2).all(|w| w[0] < w[1]) && indices.last().is_none_or(|&c| c < n_cols);
    // `v >= 0 && v < inf` is false for NaN too.
    let valid = data.iter().all(|v| (0.0..f32::INFINITY).contains(v));
    if ordered && valid && indices.len() == data.len() {
        return Ok(());
    }
    if indices.len() != data.len() {
        return Err(format!(": {} column indices for {} values", indices.len(), data.len()));
    }
    let mut prev: Option<u32> = None;
    for (&c, &v) in indices.iter().zip(data) {
        if c >= n_cols {
            return Err(format!(": column index {c} out of range, expected < {n_cols}"));
        }
        if prev.is_some_and(|p| p >= c) {
            return Err(format!(": column indices not strictly increasing at column {c}"));
        }
        if !v.is_finite() {
            return Err(format!(", column {c}: value {v} is not finite"));
        }
        if v < 0.0 {
            return Err(format!(
                ", column {c}: value {v} is negative (expected counts or normalised expression, >= 0)"
            ));
        }
        prev = Some(c);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remapping_drops_and_reorders_columns() {
        let mut b = CsrBatch::new(4);
        b.push_row(&[0, 1, 3], &[1.0, 2.0, 4.0]);
        b.push_row(&[2], &[3.0]);
        let mut out = CsrBatch::new(3);
        // keep genes 3, 0, 1 in that order; drop 2
        out.push_remapped(&b, &[Some(1), Some(2), None, Some(0)]);
        assert_eq!(out.row(0), (&[0u32, 1, 2][..], &[4.0f32, 1.0, 2.0][..]));
        assert_eq!(out.row(1), (&[][..], &[][..]));
        assert_eq!(out.validate(), Ok(()));
    }

    #[test]
    fn validate_names_row_and_column() {
        let mut b = CsrBatch::new(3);
        b.push_row(&[0, 2], &[1.0, 1.0]);
        b.push_row(&[1, 3], &[1.0, 1.0]);
        assert_eq!(b.validate().unwrap_err(), "row 1: column index 3 out of range, expected < 3");
        b.clear();
        b.push_row(&[2, 1], &[1.0, 1.0]);
        assert!(b.validate().unwrap_err().contains("not strictly increasing"));
        b.clear();
        b.push_row(&[1], &[f32::NAN]);
        assert!(b.validate().unwrap_err().contains("not finite"));
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.byte_size(), 8);
    }
}
