//! What AnnData's encoding says regardless of the container (an `.h5ad`'s HDF5 or a zarr
//! store), shared by the two readers ([`crate::h5ad`], [`crate::zarr`]): which matrix is read, how
//! a dataframe's columns become Arrow fields, how a sparse matrix's offsets are checked and its
//! rows assembled, and the DEG table. [`crate::input`] opens either reader.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_array::{ArrayRef, DictionaryArray, Float64Array, Int32Array, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use cpa_stream_schemas::tables::{SOURCE_NAME_KEY, categorical_field, deg_schema, renamed_column, with_order};

use crate::counts_csr::CsrBatch;
use crate::error::{Error, Result};

/// Storage of the matrix being imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixLayout {
    /// A `csr_matrix` group.
    Csr,
    /// A `csc_matrix` group (read by column ranges and transposed by the importer).
    Csc,
    /// A dense 2-D array.
    Dense,
}

/// Which matrix of an AnnData file to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatrixSource<'a> {
    /// `X`.
    #[default]
    X,
    /// `layers/<name>`.
    Layer(&'a str),
    /// `raw.X` with the genes of `raw.var` (`adata.raw`: often the counts before filtering or
    /// scaling; stored as `raw/X` and `raw/var`, or `raw.X` and `raw.var` by anndata <= 0.6).
    Raw,
}

/// What a dataframe column holds, whatever the container: the Arrow field it becomes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ColumnType<'a> {
    /// Codes into `categories` (-1 missing).
    Categorical { categories: &'a [String], ordered: bool },
    /// Strings.
    Text,
    /// Signed integers of any width.
    Int,
    /// Unsigned integers of any width.
    UInt,
    /// Floats of any width.
    Float,
    /// Booleans.
    Bool,
    /// `nullable-integer`: values and a mask.
    NullableInt,
    /// `nullable-boolean`.
    NullableBool,
    /// `nullable-string-array`.
    NullableText,
}

/// The Arrow schema of a dataframe: the index as `id_column` (Utf8, first), then each column as
/// its type says; a column named like `id_column` is renamed (its name kept in the field's
/// metadata, for export).
pub(crate) fn dataframe_schema(id_column: &str, columns: &[(&str, ColumnType<'_>)]) -> SchemaRef {
    let mut fields = vec![Field::new(id_column, DataType::Utf8, false)];
    let taken = |n: &str| n == id_column || columns.iter().any(|(c, _)| *c == n);
    for (col, kind) in columns {
        let out_name = if *col == id_column { renamed_column(col, &taken) } else { (*col).to_owned() };
        let field = match kind {
            ColumnType::Categorical { categories, ordered } => {
                with_order(categorical_field(&out_name, categories, true), *ordered)
            }
            ColumnType::Text => Field::new(&out_name, DataType::Utf8, false),
            ColumnType::Int => Field::new(&out_name, DataType::Int64, false),
            ColumnType::UInt => Field::new(&out_name, DataType::UInt64, false),
            ColumnType::Float => Field::new(&out_name, DataType::Float64, false),
            ColumnType::Bool => Field::new(&out_name, DataType::Boolean, false),
            ColumnType::NullableInt => Field::new(&out_name, DataType::Int64, true),
            ColumnType::NullableBool => Field::new(&out_name, DataType::Boolean, true),
            ColumnType::NullableText => Field::new(&out_name, DataType::Utf8, true),
        };
        fields.push(match out_name == *col {
            true => field,
            false => {
                let mut metadata = field.metadata().clone();
                metadata.insert(SOURCE_NAME_KEY.to_owned(), (*col).to_owned());
                field.with_metadata(metadata)
            }
        });
    }
    Arc::new(Schema::new(fields))
}

/// Refuses a categorical whose categories repeat (`[A, A]`): its cells of either code would
/// become one group (anndata refuses to read such a column too). `column` names it.
pub(crate) fn check_unique_categories(path: &Path, column: &str, categories: &[String]) -> Result<()> {
    let mut seen = std::collections::HashMap::with_capacity(categories.len());
    for (code, category) in categories.iter().enumerate() {
        if let Some(first) = seen.insert(category.as_str(), code) {
            return Err(Error::corrupt(
                path,
                format!(
                    "{column}: category {category:?} appears twice (codes {first} and {code}); its cells would be \
                     merged into one group (anndata refuses such a column too)"
                ),
            ));
        }
    }
    Ok(())
}

/// A dictionary array of `categories` from codes (-1 missing), checked against their number.
pub(crate) fn categorical_array(
    path: &Path,
    codes: Vec<i32>,
    categories: &[String],
    first_row: u64,
    ctx: impl Fn() -> String,
) -> Result<ArrayRef> {
    if let Some(bad) = codes.iter().position(|&c| c >= categories.len() as i32 || c < -1) {
        return Err(Error::corrupt(
            path,
            format!(
                "{}: row {}: code {} outside {} categories",
                ctx(),
                first_row + bad as u64,
                codes[bad],
                categories.len()
            ),
        ));
    }
    let keys = Int32Array::from_iter(codes.iter().map(|&c| (c >= 0).then_some(c)));
    let values: ArrayRef = Arc::new(StringArray::from_iter_values(categories));
    Ok(Arc::new(DictionaryArray::try_new(keys, values).map_err(|e| Error::arrow(ctx(), e))?))
}

/// A sparse matrix being read: where it is, for messages, and its shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SparseShape<'a> {
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
    pub(crate) fn offsets(&self, raw: &[i64], range: Range<u64>) -> Result<Vec<u64>> {
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
    pub(crate) fn push_rows(
        &self,
        out: &mut CsrBatch,
        first_row: u64,
        offsets: &[u64],
        idx: &[i64],
        val: &[f32],
    ) -> Result<()> {
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
    pub(crate) fn row_indices(&self, rows: &[i64]) -> Result<Vec<u64>> {
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
pub(crate) fn lines_fitting(start: u64, offsets: &[u64], max_entries: u64) -> u64 {
    let fit = offsets.partition_point(|&o| o - offsets[0] <= max_entries);
    start + (fit as u64).saturating_sub(1).max(1)
}

/// Appends dense rows (`n_cols` values each, row-major) to `out`, zeros dropped.
pub(crate) fn push_dense_rows(out: &mut CsrBatch, values: &[f32], n_cols: usize) {
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

/// The DEG table from its columns (`group`, `rank`, `gene`, `score`, `pvalue`, `qvalue`).
pub(crate) fn deg_table(
    groups: Vec<String>,
    ranks: Vec<u32>,
    genes: Vec<String>,
    scores: Vec<Option<f64>>,
    (pvalues, qvalues): (Vec<Option<f64>>, Vec<Option<f64>>),
) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(groups)),
        Arc::new(UInt32Array::from(ranks)),
        Arc::new(StringArray::from(genes)),
        Arc::new(Float64Array::from(scores)),
        Arc::new(Float64Array::from(pvalues)),
        Arc::new(Float64Array::from(qvalues)),
    ];
    RecordBatch::try_new(deg_schema(), columns).map_err(|e| Error::arrow("DEG table", e))
}

/// A DEG dict's lists (CPA's `deg_uns_key`: group -> ranked gene names) as the DEG table.
pub(crate) fn deg_lists(lists: Vec<(String, Vec<String>)>) -> Result<RecordBatch> {
    let (mut groups, mut ranks, mut genes) = (Vec::new(), Vec::new(), Vec::new());
    for (group, list) in lists {
        for (rank, gene) in list.into_iter().enumerate() {
            groups.push(group.clone());
            ranks.push(rank as u32);
            genes.push(gene);
        }
    }
    let none = vec![None; genes.len()];
    deg_table(groups, ranks, genes, none.clone(), (none.clone(), none))
}
