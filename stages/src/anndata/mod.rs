//! What AnnData's encoding says regardless of the container (an `.h5ad`'s HDF5 or a zarr
//! store), shared by the two readers ([`crate::h5ad`], [`crate::zarr`]): which matrix is read and
//! how it is read by ranges ([`StoredMatrix`]), how a dataframe's columns become Arrow fields, and
//! the DEG table. [`crate::input`] opens either reader.

use std::path::Path;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_array::{ArrayRef, DictionaryArray, Float64Array, Int32Array, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use cpa_stream_schemas::tables::{SOURCE_NAME_KEY, categorical_field, deg_schema, renamed_column, with_order};

use crate::error::{Error, Result};

mod matrix;

pub use matrix::StoredMatrix;
pub(crate) use matrix::{Arrays, MatrixArray};

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
