//! AnnData dataframes (`obs`, `var`) of a zarr store, read by row ranges into the same Arrow
//! tables the `.h5ad` reader makes of the same data.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray, UInt64Array};
use arrow_schema::SchemaRef;

use super::Zarr;
use super::array::{Elements, ZArray};
use crate::anndata::{ColumnType, categorical_array, dataframe_schema};
use crate::error::{Error, Result};
use crate::h5ad::{float_text, float_text_f32};

/// Categories read at most (a categorical holds its categories whole).
const MAX_CATEGORIES: u64 = 1 << 26;

/// How one dataframe column is stored.
#[derive(Debug)]
enum Column {
    Categorical { codes: ZArray, categories: Vec<String>, ordered: bool },
    Strings(ZArray),
    Int(ZArray),
    UInt(ZArray),
    Float(ZArray),
    Bool(ZArray),
    NullableInt { values: ZArray, mask: ZArray },
    NullableBool { values: ZArray, mask: ZArray },
    NullableStrings { values: ZArray, mask: ZArray },
}

impl Column {
    fn len(&self) -> u64 {
        match self {
            Column::Categorical { codes: a, .. }
            | Column::Strings(a)
            | Column::Int(a)
            | Column::UInt(a)
            | Column::Float(a)
            | Column::Bool(a)
            | Column::NullableInt { values: a, .. }
            | Column::NullableBool { values: a, .. }
            | Column::NullableStrings { values: a, .. } => a.len(),
        }
    }

    fn column_type(&self) -> ColumnType<'_> {
        match self {
            Column::Categorical { categories, ordered, .. } => {
                ColumnType::Categorical { categories, ordered: *ordered }
            }
            Column::Strings(_) => ColumnType::Text,
            Column::Int(_) => ColumnType::Int,
            Column::UInt(_) => ColumnType::UInt,
            Column::Float(_) => ColumnType::Float,
            Column::Bool(_) => ColumnType::Bool,
            Column::NullableInt { .. } => ColumnType::NullableInt,
            Column::NullableBool { .. } => ColumnType::NullableBool,
            Column::NullableStrings { .. } => ColumnType::NullableText,
        }
    }
}

/// An AnnData dataframe group of a zarr store, read by row ranges.
#[derive(Debug)]
pub(super) struct Frame {
    root: PathBuf,
    name: String,
    index: ZArray,
    columns: Vec<(String, Column)>,
    schema: SchemaRef,
    n_rows: u64,
}

fn unsupported(root: &Path, reason: String) -> Error {
    Error::Unsupported { path: root.to_owned(), reason }
}

/// A categorical's categories as text: strings, or integers and floats printed as pandas would.
fn read_categories(array: &ZArray) -> Result<Vec<String>> {
    let n = array.len();
    if n > MAX_CATEGORIES {
        return Err(Error::Unsupported {
            path: PathBuf::new(),
            reason: format!("{}: {n} categories, more than the {MAX_CATEGORIES} read", array.name()),
        });
    }
    Ok(match array.elements() {
        Elements::Text => array.strings(0..n)?,
        Elements::Int | Elements::Bool => array.ints(0..n)?.iter().map(i64::to_string).collect(),
        Elements::UInt => array.uints(0..n)?.iter().map(u64::to_string).collect(),
        // Each in its stored precision: a float32 0.1 is "0.1", as numpy prints it.
        Elements::Float(8) => array.doubles(0..n)?.into_iter().map(float_text).collect(),
        Elements::Float(_) => array.doubles(0..n)?.into_iter().map(|v| float_text_f32(v as f32)).collect(),
        Elements::Other => {
            return Err(Error::Unsupported {
                path: PathBuf::new(),
                reason: format!("{}: categories of type {}", array.name(), array.type_name()),
            });
        }
    })
}

fn column(zarr: &Zarr, frame: &str, name: &str) -> Result<Column> {
    let full = format!("{frame}/{name}");
    let root = &zarr.root;
    if zarr.is_group(&full) {
        let attributes = zarr.group_attributes(&full)?;
        let encoding = attributes.get("encoding-type").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let array = |n: &str| zarr.array(&format!("{full}/{n}"));
        return Ok(match encoding.as_str() {
            "categorical" => {
                let categories = read_categories(&array("categories")?).map_err(|e| with_root(e, root))?;
                crate::anndata::check_unique_categories(root, &full, &categories)?;
                let ordered = attributes.get("ordered").and_then(|v| v.as_bool()).unwrap_or(false);
                Column::Categorical { codes: array("codes")?, categories, ordered }
            }
            "nullable-integer" => Column::NullableInt { values: array("values")?, mask: array("mask")? },
            "nullable-boolean" => Column::NullableBool { values: array("values")?, mask: array("mask")? },
            "nullable-string-array" => Column::NullableStrings { values: array("values")?, mask: array("mask")? },
            other => return Err(unsupported(root, format!("{full}: column encoding {other:?} is not supported"))),
        });
    }
    let array = zarr.array(&full)?;
    if array.shape().len() != 1 {
        return Err(unsupported(root, format!("{full}: {}-dimensional column, expected 1", array.shape().len())));
    }
    Ok(match array.elements() {
        Elements::Text => Column::Strings(array),
        Elements::Int => Column::Int(array),
        Elements::UInt => Column::UInt(array),
        Elements::Float(_) => Column::Float(array),
        Elements::Bool => Column::Bool(array),
        Elements::Other => {
            return Err(unsupported(root, format!("{full}: column of type {} is not supported", array.type_name())));
        }
    })
}

/// An error of a piece read without knowing the store, given the store's path.
fn with_root(error: Error, root: &Path) -> Error {
    match error {
        Error::Unsupported { path, reason } if path.as_os_str().is_empty() => {
            Error::Unsupported { path: root.to_owned(), reason }
        }
        other => other,
    }
}

impl Frame {
    /// Opens dataframe group `name`; its index becomes column `id_column` (first, Utf8).
    pub(super) fn open(zarr: &Zarr, name: &str, id_column: &str) -> Result<Frame> {
        let root = &zarr.root;
        if !zarr.is_group(name) {
            return Err(unsupported(root, format!("no {name:?} dataframe (a group): not an AnnData store")));
        }
        let attributes = zarr.group_attributes(name)?;
        let encoding = attributes.get("encoding-type").and_then(|v| v.as_str());
        if encoding != Some("dataframe") {
            return Err(unsupported(root, format!("{name}: encoding-type {encoding:?}, expected \"dataframe\"")));
        }
        let index_name = attributes.get("_index").and_then(|v| v.as_str()).unwrap_or("_index");
        let index = zarr.array(&format!("{name}/{index_name}"))?;
        if index.elements() != Elements::Text || index.shape().len() != 1 {
            return Err(unsupported(
                root,
                format!(
                    "{name}/{index_name} (the index): {} of shape {:?}, expected strings",
                    index.type_name(),
                    index.shape()
                ),
            ));
        }
        let n_rows = index.len();
        let order: Vec<String> = match attributes.get("column-order") {
            Some(serde_json::Value::Array(names)) => names
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_owned).ok_or_else(|| {
                        Error::corrupt(root, format!("{name}: column-order holds {v}, expected column names"))
                    })
                })
                .collect::<Result<_>>()?,
            None => Vec::new(),
            Some(other) => {
                return Err(Error::corrupt(root, format!("{name}: column-order is {other}, expected a list")));
            }
        };
        let mut columns = Vec::with_capacity(order.len());
        for col in order {
            let kind = column(zarr, name, &col)?;
            if kind.len() != n_rows {
                return Err(Error::SizeMismatch {
                    path: root.to_owned(),
                    what: format!("length of {name}/{col}"),
                    expected: n_rows,
                    actual: kind.len(),
                });
            }
            columns.push((col, kind));
        }
        let types: Vec<(&str, ColumnType<'_>)> = columns.iter().map(|(c, k)| (c.as_str(), k.column_type())).collect();
        let schema = dataframe_schema(id_column, &types);
        Ok(Frame { root: root.to_owned(), name: name.to_owned(), index, columns, schema, n_rows })
    }

    pub(super) fn n_rows(&self) -> u64 {
        self.n_rows
    }

    /// Refuses an index with missing chunks: their ids would read as empty, and no cell (or gene)
    /// could be told apart.
    pub(super) fn check_index_chunks(&self) -> Result<()> {
        if self.index.missing_chunks() == 0 {
            return Ok(());
        }
        Err(Error::corrupt(
            &self.root,
            format!(
                "{} (the index): {} of its {} chunks have no file, so their ids would read as empty; a damaged or \
                 partial copy",
                self.index.name(),
                self.index.missing_chunks(),
                self.index.chunks()
            ),
        ))
    }

    /// Every array it reads (the index, then each column's).
    pub(super) fn arrays(&self) -> Vec<&ZArray> {
        let mut out = vec![&self.index];
        for (_, column) in &self.columns {
            match column {
                Column::Categorical { codes: a, .. }
                | Column::Strings(a)
                | Column::Int(a)
                | Column::UInt(a)
                | Column::Float(a)
                | Column::Bool(a) => out.push(a),
                Column::NullableInt { values, mask }
                | Column::NullableBool { values, mask }
                | Column::NullableStrings { values, mask } => out.extend([values, mask]),
            }
        }
        out
    }

    pub(super) fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// Rows `rows` as a record batch with [`schema`](Self::schema).
    pub(super) fn read(&self, rows: Range<u64>) -> Result<RecordBatch> {
        let root = &self.root;
        let ids = self.index.strings(rows.clone())?;
        if let Some(at) = ids.iter().position(String::is_empty) {
            return Err(Error::corrupt(
                root,
                format!(
                    "{}: row {}: an empty id (the index names every row)",
                    self.index.name(),
                    rows.start + at as u64
                ),
            ));
        }
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(StringArray::from(ids))];
        for (col, kind) in &self.columns {
            let ctx = || format!("{}/{col}: rows {}..{}", self.name, rows.start, rows.end);
            let r = || rows.clone();
            let masked = |mask: &ZArray| mask.bools(r());
            let array: ArrayRef = match kind {
                Column::Categorical { codes, categories, .. } => {
                    let codes = codes.ints(r())?.into_iter().map(|c| i32::try_from(c).unwrap_or(i32::MAX)).collect();
                    categorical_array(root, codes, categories, rows.start, ctx)?
                }
                Column::Strings(a) => Arc::new(StringArray::from(a.strings(r())?)),
                Column::Int(a) => Arc::new(Int64Array::from(a.ints(r())?)),
                Column::UInt(a) => Arc::new(UInt64Array::from(a.uints(r())?)),
                Column::Float(a) => Arc::new(Float64Array::from(a.doubles(r())?)),
                Column::Bool(a) => Arc::new(BooleanArray::from(a.bools(r())?)),
                Column::NullableInt { values, mask } => {
                    let (v, m) = (values.ints(r())?, masked(mask)?);
                    Arc::new(Int64Array::from_iter(v.iter().zip(&m).map(|(&v, &missing)| (!missing).then_some(v))))
                }
                Column::NullableBool { values, mask } => {
                    let (v, m) = (values.bools(r())?, masked(mask)?);
                    Arc::new(BooleanArray::from_iter(v.iter().zip(&m).map(|(&v, &missing)| (!missing).then_some(v))))
                }
                Column::NullableStrings { values, mask } => {
                    let (v, m) = (values.strings(r())?, masked(mask)?);
                    Arc::new(StringArray::from_iter(v.iter().zip(&m).map(|(v, &missing)| (!missing).then_some(v))))
                }
            };
            arrays.push(array);
        }
        RecordBatch::try_new(self.schema(), arrays)
            .map_err(|e| Error::arrow(format!("{}: {}", root.display(), self.name), e))
    }
}
