//! An AnnData matrix (`X`, a layer or `raw/X`) read by row or column ranges, the same way
//! whatever holds it: the `.h5ad` and zarr readers each implement [`MatrixArray`] over their
//! container's arrays (HDF5 datasets, zarr arrays) and hand [`StoredMatrix`] the arrays they
//! opened and checked; the ranges, offsets and bounds are worked out here, once.

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::MatrixLayout;
use crate::counts_csr::CsrBatch;
use crate::error::{Error, Result};

/// One array of a stored matrix as a container reads it: a sparse matrix's `data`, `indices`
/// or `indptr` (1-D), or a dense matrix (2-D, read by whole rows).
pub(crate) trait MatrixArray: Send + Sync {
    /// Elements of its first dimension.
    fn len(&self) -> u64;
    /// Elements `range` as signed integers (offsets, indices); `what` names the read in errors.
    fn ints(&self, range: Range<u64>, what: &dyn Fn() -> String) -> Result<Vec<i64>>;
    /// Elements `range` as f32 (any number; booleans as 1 and 0); of a 2-D array, rows `range`,
    /// every column, row-major.
    fn floats(&self, range: Range<u64>, what: &dyn Fn() -> String) -> Result<Vec<f32>>;
}

/// The arrays of a stored matrix.
pub(crate) enum Arrays {
    /// A `csr_matrix` or `csc_matrix` group.
    Sparse {
        layout: MatrixLayout,
        data: Box<dyn MatrixArray>,
        indices: Box<dyn MatrixArray>,
        indptr: Box<dyn MatrixArray>,
    },
    /// A dense 2-D array.
    Dense(Box<dyn MatrixArray>),
}

/// The matrix of an AnnData file or store, opened and checked by its container's reader (the
/// arrays' types, `indptr`'s length against the shape, `indices` against `data`), read here by
/// ranges with every offset and index checked before anything is allocated from it.
pub struct StoredMatrix {
    path: PathBuf,
    element: String,
    arrays: Arrays,
    n_obs: u64,
    n_vars: u64,
    /// Elements of a dense matrix (its arrays know their first dimension only).
    dense_elements: u64,
}

impl std::fmt::Debug for StoredMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredMatrix")
            .field("path", &self.path)
            .field("element", &self.element)
            .field("layout", &self.layout())
            .field("n_obs", &self.n_obs)
            .field("n_vars", &self.n_vars)
            .finish()
    }
}

impl StoredMatrix {
    /// The matrix `element` of the file or store `path`, of `n_obs` rows and `n_vars` columns.
    pub(crate) fn new(path: &Path, element: &str, arrays: Arrays, (n_obs, n_vars): (u64, u64)) -> StoredMatrix {
        StoredMatrix {
            path: path.to_owned(),
            element: element.to_owned(),
            arrays,
            n_obs,
            n_vars,
            dense_elements: n_obs.saturating_mul(n_vars),
        }
    }

    /// Rows (cells).
    pub fn n_obs(&self) -> u64 {
        self.n_obs
    }

    /// Columns (genes).
    pub fn n_vars(&self) -> u64 {
        self.n_vars
    }

    /// The matrix's layout.
    pub fn layout(&self) -> MatrixLayout {
        match &self.arrays {
            Arrays::Sparse { layout, .. } => *layout,
            Arrays::Dense(_) => MatrixLayout::Dense,
        }
    }

    /// Stored entries of a sparse matrix (for a dense one: the number of elements).
    pub fn stored_entries(&self) -> u64 {
        match &self.arrays {
            Arrays::Sparse { data, .. } => data.len(),
            Arrays::Dense(_) => self.dense_elements,
        }
    }

    /// The sparse matrix's shape, for checking what is read of it.
    fn sparse(&self, data: &dyn MatrixArray, indptr: &dyn MatrixArray) -> SparseShape<'_> {
        SparseShape {
            path: &self.path,
            element: &self.element,
            layout: self.layout(),
            n_obs: self.n_obs,
            n_vars: self.n_vars,
            nnz: data.len(),
            indptr_len: indptr.len(),
        }
    }

    /// Offsets `range` of a sparse matrix's `indptr`, checked (see [`SparseShape::offsets`]).
    fn offsets(&self, data: &dyn MatrixArray, indptr: &dyn MatrixArray, range: Range<u64>) -> Result<Vec<u64>> {
        let raw = indptr.ints(range.clone(), &|| format!("{}/indptr", self.element))?;
        self.sparse(data, indptr).offsets(&raw, range)
    }

    /// The end of the longest run of rows (columns of a CSC matrix) from `start`, at most
    /// `max_lines` of them, whose entries number at most `max_entries` (at least one line, which
    /// holds at most as many entries as the matrix is wide). For a dense matrix, the run whose
    /// elements fit. Import reads by these runs, so that one read is bounded whatever the file
    /// declares.
    pub fn lines_within(&self, start: u64, max_lines: u64, max_entries: u64) -> Result<u64> {
        let (lines, minor) = match self.layout() {
            MatrixLayout::Csc => (self.n_vars, self.n_obs),
            _ => (self.n_obs, self.n_vars),
        };
        let end = start.saturating_add(max_lines.max(1)).min(lines);
        if start >= end {
            return Ok(end);
        }
        let Arrays::Sparse { data, indptr, .. } = &self.arrays else {
            return Ok(end.min(start + (max_entries / minor.max(1)).max(1)));
        };
        let offsets = self.offsets(data.as_ref(), indptr.as_ref(), start..end + 1)?;
        Ok(lines_fitting(start, &offsets, max_entries))
    }

    /// Appends rows `rows` of a CSR or dense matrix to `out` (values as f32, zeros dropped from
    /// dense rows). Indices are checked against the genes; a row with unsorted indices is
    /// sorted, one with a repeated index refused.
    pub fn read_rows(&self, rows: Range<u64>, out: &mut CsrBatch) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let ctx = || format!("{}: rows {}..{}", self.element, rows.start, rows.end);
        match &self.arrays {
            Arrays::Sparse { layout: MatrixLayout::Csr, data, indices, indptr } => {
                let offsets = self.offsets(data.as_ref(), indptr.as_ref(), rows.start..rows.end + 1)?;
                let entries = offsets[0]..offsets[offsets.len() - 1];
                let idx = indices.ints(entries.clone(), &ctx)?;
                let val = data.floats(entries, &ctx)?;
                self.sparse(data.as_ref(), indptr.as_ref()).push_rows(out, rows.start, &offsets, &idx, &val)
            }
            Arrays::Dense(x) => {
                push_dense_rows(out, &x.floats(rows.clone(), &ctx)?, self.n_vars as usize);
                Ok(())
            }
            Arrays::Sparse { layout, .. } => Err(Error::InvalidInput(format!(
                "{}: {layout:?} matrix cannot be read by rows; use read_columns",
                self.path.display()
            ))),
        }
    }

    /// For a CSC matrix: columns `cols` as (column offsets, row indices, values).
    pub fn read_columns(&self, cols: Range<u64>) -> Result<(Vec<u64>, Vec<u64>, Vec<f32>)> {
        let Arrays::Sparse { layout: MatrixLayout::Csc, data, indices, indptr } = &self.arrays else {
            return Err(Error::InvalidInput(format!("{}: not a CSC matrix", self.path.display())));
        };
        let ctx = || format!("{}: columns {}..{}", self.element, cols.start, cols.end);
        let offsets = self.offsets(data.as_ref(), indptr.as_ref(), cols.start..cols.end + 1)?;
        let entries = offsets[0]..offsets[offsets.len() - 1];
        let (rows, vals) = (indices.ints(entries.clone(), &ctx)?, data.floats(entries, &ctx)?);
        Ok((offsets, self.sparse(data.as_ref(), indptr.as_ref()).row_indices(&rows)?, vals))
    }
}

/// A sparse matrix being read: where it is, for messages, and its shape.
#[derive(Debug, Clone, Copy)]
struct SparseShape<'a> {
    /// The file or store.
    pub path: &'a Path,
    /// The matrix's element (`X`, `layers/counts`).
    pub element: &'a str,
    /// CSR or CSC.
    pub layout: MatrixLayout,
    /// Rows (cells) and columns (genes).
    pub n_obs: u64,
    pub n_vars: u64,
    /// Stored entries.
    pub nnz: u64,
    /// Entries of the whole `indptr`.
    pub indptr_len: u64,
}

impl SparseShape<'_> {
    /// Offsets `range` of the matrix's `indptr`, read as `raw`, checked and widened: from 0,
    /// never decreasing, at most `nnz`, and no row (column of a CSC matrix) holding more entries
    /// than the matrix has columns (rows): sizes are checked before anything is allocated from
    /// them.
    fn offsets(&self, raw: &[i64], range: Range<u64>) -> Result<Vec<u64>> {
        let (path, element, nnz) = (self.path, self.element, self.nnz);
        if range.start == 0 && raw.first().is_some_and(|&v| v != 0) {
            return Err(Error::corrupt(
                path,
                format!("{element}/indptr[0] = {}: expected 0 (scipy refuses such a matrix too)", raw[0]),
            ));
        }
        if range.end == self.indptr_len && raw.last().is_some_and(|&v| v as u64 != nnz) {
            return Err(Error::corrupt(
                path,
                format!(
                    "{element}/indptr[{}] = {}: expected {nnz}, the number of stored values",
                    self.indptr_len - 1,
                    raw[raw.len() - 1]
                ),
            ));
        }
        let (minor, line) = match self.layout {
            MatrixLayout::Csc => (self.n_obs, "column"),
            _ => (self.n_vars, "row"),
        };
        let mut out = Vec::with_capacity(raw.len());
        for (i, &v) in raw.iter().enumerate() {
            if v < 0 || v as u64 > nnz || out.last().is_some_and(|&p| (v as u64) < p) {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "{element}/indptr[{}] = {v}: expected non-decreasing offsets in 0..={nnz}",
                        range.start + i as u64
                    ),
                ));
            }
            if let Some(&p) = out.last()
                && v as u64 - p > minor
            {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "{element}/indptr: {line} {} holds {} entries, more than the matrix's {minor} {}s",
                        range.start + i as u64 - 1,
                        v as u64 - p,
                        if line == "row" { "column" } else { "row" }
                    ),
                ));
            }
            out.push(v as u64);
        }
        Ok(out)
    }

    /// Appends CSR rows to `out`: `offsets` (absolute, one more than rows, starting at entry
    /// `offsets[0]`), their column indices `idx` and values `val`. Indices are checked against
    /// the genes; a row with unsorted indices is sorted, one with a repeated index refused.
    fn push_rows(&self, out: &mut CsrBatch, first_row: u64, offsets: &[u64], idx: &[i64], val: &[f32]) -> Result<()> {
        let s = offsets[0] as usize;
        let mut row_idx: Vec<u32> = Vec::new();
        for (r, w) in offsets.windows(2).enumerate() {
            let (a, b) = (w[0] as usize - s, w[1] as usize - s);
            row_idx.clear();
            let mut sorted = true;
            for &c in &idx[a..b] {
                if c < 0 || c as u64 >= self.n_vars {
                    return Err(Error::corrupt(
                        self.path,
                        format!(
                            "{}/indices: row {}: column index {c} out of range, expected 0..{}",
                            self.element,
                            first_row + r as u64,
                            self.n_vars
                        ),
                    ));
                }
                sorted &= row_idx.last().is_none_or(|&p| p < c as u32);
                row_idx.push(c as u32);
            }
            if sorted {
                out.push_row(&row_idx, &val[a..b]);
            } else {
                push_sorted(out, &row_idx, &val[a..b]).map_err(|c| {
                    Error::corrupt(
                        self.path,
                        format!("{}/indices: row {}: column {c} appears twice", self.element, first_row + r as u64),
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Row indices of a CSC matrix's entries, checked against the cells.
    fn row_indices(&self, rows: &[i64]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(rows.len());
        for &r in rows {
            if r < 0 || r as u64 >= self.n_obs {
                return Err(Error::corrupt(
                    self.path,
                    format!("{}/indices: row index {r} out of range, expected 0..{}", self.element, self.n_obs),
                ));
            }
            out.push(r as u64);
        }
        Ok(out)
    }
}

/// The end of the longest run of lines (rows; columns of a CSC matrix) from `start` whose
/// entries, by `offsets` (read from `start`), number at most `max_entries`: at least one line.
fn lines_fitting(start: u64, offsets: &[u64], max_entries: u64) -> u64 {
    let fit = offsets.partition_point(|&o| o - offsets[0] <= max_entries);
    start + (fit as u64).saturating_sub(1).max(1)
}

/// Appends dense rows (`n_cols` values each, row-major) to `out`, zeros dropped.
fn push_dense_rows(out: &mut CsrBatch, values: &[f32], n_cols: usize) {
    let (mut idx, mut val) = (Vec::new(), Vec::new());
    for row in values.chunks(n_cols.max(1)) {
        idx.clear();
        val.clear();
        for (j, &v) in row.iter().enumerate() {
            if v != 0.0 {
                idx.push(j as u32);
                val.push(v);
            }
        }
        out.push_row(&idx, &val);
    }
}

/// Sorts a row's entries by column; `Err(column)` on a repeated column.
fn push_sorted(out: &mut CsrBatch, idx: &[u32], val: &[f32]) -> std::result::Result<(), u32> {
    let mut pairs: Vec<(u32, f32)> = idx.iter().copied().zip(val.iter().copied()).collect();
    pairs.sort_unstable_by_key(|p| p.0);
    if let Some(w) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(w[0].0);
    }
    let (i, v): (Vec<u32>, Vec<f32>) = pairs.into_iter().unzip();
    out.push_row(&i, &v);
    Ok(())
}
