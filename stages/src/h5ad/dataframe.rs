//! AnnData dataframes (`obs`, `var`) read by row ranges into Arrow, and written from Arrow.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray, UInt64Array};

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type, UInt64Type};
use arrow_schema::{DataType, Schema, SchemaRef};
use cpa_stream_schemas::tables::{categories_of, is_ordered, source_name};
use hdf5::types::{FixedAscii, FixedUnicode, TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::{Dataset, Group, Location};

use super::records::{self, Scalar, Values};
use super::watchdog;
use crate::anndata::{ColumnType, categorical_array, dataframe_schema};
use crate::error::{Error, Result};

/// Reads a string attribute (variable- or fixed-length).
pub(super) fn attr_string(path: &Path, loc: &Location, name: &str) -> Result<Option<String>> {
    if !loc.attr_names().map_err(Error::hdf5(path, format!("{}: attributes", loc.name())))?.iter().any(|n| n == name) {
        return Ok(None);
    }
    let attr = loc.attr(name).map_err(Error::hdf5(path, format!("{}: attribute {name}", loc.name())))?;
    let _watch = watchdog::guard(|| format!("{}: {}: reading attribute {name}", path.display(), loc.name()));
    let ctx = || format!("{}: attribute {name:?} is not a string", loc.name());
    let desc = attr.dtype().and_then(|t| t.to_descriptor()).map_err(Error::hdf5(path, ctx()))?;
    let value = match desc {
        TypeDescriptor::VarLenUnicode => attr.read_scalar::<VarLenUnicode>().map(|s| s.as_str().to_owned()),
        TypeDescriptor::VarLenAscii => attr.read_scalar::<VarLenAscii>().map(|s| s.as_str().to_owned()),
        // numpy bytes (`np.bytes_`), as older writers stored attributes: HDF5 pads them to the
        // larger size on read.
        TypeDescriptor::FixedAscii(n) if n <= 1024 => {
            attr.read_scalar::<FixedAscii<1024>>().map(|s| s.as_str().to_owned())
        }
        TypeDescriptor::FixedUnicode(n) if n <= 1024 => {
            attr.read_scalar::<FixedUnicode<1024>>().map(|s| s.as_str().to_owned())
        }
        _ => return Err(Error::Unsupported { path: path.to_owned(), reason: ctx() }),
    };
    value.map(Some).map_err(Error::hdf5(path, ctx()))
}

/// Reads a string-array attribute; an empty numeric array (h5py's empty list) is an empty list.
pub(super) fn attr_strings(path: &Path, loc: &Location, name: &str) -> Result<Vec<String>> {
    let attr = loc.attr(name).map_err(Error::hdf5(path, format!("{}: attribute {name}", loc.name())))?;
    let _watch = watchdog::guard(|| format!("{}: {}: reading attribute {name}", path.display(), loc.name()));
    if attr.size() == 0 {
        return Ok(Vec::new());
    }
    let ctx = || format!("{}: attribute {name:?} is not an array of strings", loc.name());
    match attr.dtype().and_then(|t| t.to_descriptor()).map_err(Error::hdf5(path, ctx()))? {
        TypeDescriptor::VarLenUnicode => attr
            .read_raw::<VarLenUnicode>()
            .map(|v| v.iter().map(|s| s.as_str().to_owned()).collect())
            .map_err(Error::hdf5(path, ctx())),
        TypeDescriptor::VarLenAscii => attr
            .read_raw::<VarLenAscii>()
            .map(|v| v.iter().map(|s| s.as_str().to_owned()).collect())
            .map_err(Error::hdf5(path, ctx())),
        _ => Err(Error::Unsupported { path: path.to_owned(), reason: ctx() }),
    }
}

/// Reads strings `rows` of a 1-D string dataset.
pub(super) fn read_strings(path: &Path, ds: &Dataset, rows: Range<u64>) -> Result<Vec<String>> {
    let ctx = || format!("{}: rows {}..{}", ds.name(), rows.start, rows.end);
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let sel = rows.start as usize..rows.end as usize;
    let _watch =
        watchdog::guard(|| format!("{}: {}: reading rows {}..{}", path.display(), ds.name(), rows.start, rows.end));
    match ds.dtype().and_then(|t| t.to_descriptor()).map_err(Error::hdf5(path, ctx()))? {
        TypeDescriptor::VarLenUnicode => ds
            .read_slice_1d::<VarLenUnicode, _>(sel)
            .map(|a| a.iter().map(|s| s.as_str().to_owned()).collect())
            .map_err(Error::hdf5(path, ctx())),
        TypeDescriptor::VarLenAscii => ds
            .read_slice_1d::<VarLenAscii, _>(sel)
            .map(|a| a.iter().map(|s| s.as_str().to_owned()).collect())
            .map_err(Error::hdf5(path, ctx())),
        TypeDescriptor::FixedAscii(_) | TypeDescriptor::FixedUnicode(_) => {
            super::records::read_text(path, ds, None, rows)
        }
        other => Err(Error::Unsupported {
            path: path.to_owned(),
            reason: format!("{}: strings stored as {other}, expected strings", ds.name()),
        }),
    }
}

/// How one dataframe column is stored.
#[derive(Debug, Clone)]
enum ColumnKind {
    Categorical {
        codes: Dataset,
        categories: Vec<String>,
        ordered: bool,
    },
    Strings(Dataset),
    Int(Dataset),
    UInt(Dataset),
    Float(Dataset),
    Bool(Dataset),
    NullableInt {
        values: Dataset,
        mask: Dataset,
    },
    NullableBool {
        values: Dataset,
        mask: Dataset,
    },
    NullableStrings {
        values: Dataset,
        mask: Dataset,
    },
    /// A field of an anndata <= 0.6 record-array dataframe; integer codes become a categorical
    /// when `uns/<field>_categories` names their categories (as anndata reads them).
    Record {
        field: String,
        kind: Scalar,
        categories: Option<Vec<String>>,
    },
}

/// An AnnData dataframe group, read by row ranges.
#[derive(Debug, Clone)]
pub(super) struct DataFrameReader {
    path: PathBuf,
    name: String,
    /// The index: a string dataset, or (anndata <= 0.6) the record-array dataframe itself, whose
    /// first field is the index; then `records` names that field and every column is a field.
    index: Dataset,
    records: Option<String>,
    columns: Vec<(String, ColumnKind)>,
    schema: SchemaRef,
    n_rows: u64,
}

fn member_kind(path: &Path, group: &Group, name: &str) -> Result<ColumnKind> {
    let full = format!("{}/{name}", group.name());
    let unsupported = |what: String| Error::Unsupported { path: path.to_owned(), reason: format!("{full}: {what}") };
    if let Ok(sub) = group.group(name) {
        let encoding = attr_string(path, &sub, "encoding-type")?.unwrap_or_default();
        let ds = |n: &str| sub.dataset(n).map_err(Error::hdf5(path, format!("{full}/{n}")));
        return Ok(match encoding.as_str() {
            "categorical" => {
                let categories = read_categories(path, &ds("categories")?, &format!("{full}/categories"))?;
                crate::anndata::check_unique_categories(path, &full, &categories)?;
                let ordered = attr_flag(&sub, "ordered");
                ColumnKind::Categorical { codes: ds("codes")?, categories, ordered }
            }
            "nullable-integer" => ColumnKind::NullableInt { values: ds("values")?, mask: ds("mask")? },
            "nullable-boolean" => ColumnKind::NullableBool { values: ds("values")?, mask: ds("mask")? },
            "nullable-string-array" => ColumnKind::NullableStrings { values: ds("values")?, mask: ds("mask")? },
            other => return Err(unsupported(format!("column encoding {other:?} is not supported"))),
        });
    }
    let ds = group.dataset(name).map_err(Error::hdf5(path, full.clone()))?;
    if ds.ndim() != 1 {
        return Err(unsupported(format!("{}-dimensional column, expected 1", ds.ndim())));
    }
    // anndata 0.7: a categorical is its integer codes with an attribute `categories`, an object
    // reference to the categories, which anndata 0.7 always writes as `__categories/NAME` of
    // the same dataframe (read from there; anndata reads the same dataset through the reference).
    if ds.attr("categories").is_ok() {
        let at = format!("{}/__categories/{name}", group.name());
        let categories = group.dataset(&format!("__categories/{name}")).map_err(|_| {
            unsupported(format!(
                "a categorical in the anndata 0.7 layout (codes with a `categories` reference) whose categories \
                 are not at {at}"
            ))
        })?;
        let ordered = attr_flag(&ds, "ordered");
        let categories = read_categories(path, &categories, &at)?;
        crate::anndata::check_unique_categories(path, &full, &categories)?;
        return Ok(ColumnKind::Categorical { codes: ds, categories, ordered });
    }
    let desc = ds.dtype().and_then(|t| t.to_descriptor()).map_err(Error::hdf5(path, full.clone()))?;
    Ok(match desc {
        TypeDescriptor::VarLenUnicode | TypeDescriptor::VarLenAscii => ColumnKind::Strings(ds),
        TypeDescriptor::Integer(_) => ColumnKind::Int(ds),
        TypeDescriptor::Unsigned(_) => ColumnKind::UInt(ds),
        TypeDescriptor::Float(_) => ColumnKind::Float(ds),
        TypeDescriptor::Boolean => ColumnKind::Bool(ds),
        // h5py stores numpy booleans as an enum {FALSE: 0, TRUE: 1}.
        TypeDescriptor::Enum(e)
            if e.members.len() == 2 && e.members.iter().all(|m| m.name == "FALSE" || m.name == "TRUE") =>
        {
            ColumnKind::Bool(ds)
        }
        other => return Err(unsupported(format!("column of type {other} is not supported"))),
    })
}

/// A boolean attribute (h5py writes numpy's as an enum, anndata's `ordered` flag among them);
/// `false` when absent or not a boolean.
fn attr_flag(loc: &Location, name: &str) -> bool {
    let Ok(attr) = loc.attr(name) else { return false };
    attr.read_scalar::<bool>().or_else(|_| attr.read_scalar::<i64>().map(|v| v != 0)).unwrap_or(false)
}

/// A categorical's categories as text: strings, or integers and floats printed as pandas would.
fn read_categories(path: &Path, ds: &Dataset, full: &str) -> Result<Vec<String>> {
    let n = ds.size() as u64;
    match ds.dtype().and_then(|t| t.to_descriptor()) {
        Ok(
            TypeDescriptor::VarLenUnicode
            | TypeDescriptor::VarLenAscii
            | TypeDescriptor::FixedAscii(_)
            | TypeDescriptor::FixedUnicode(_),
        ) => read_strings(path, ds, 0..n),
        Ok(TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_)) => Ok(ds
            .read_raw::<i64>()
            .map_err(Error::hdf5(path, full.to_owned()))?
            .iter()
            .map(|v| v.to_string())
            .collect()),
        Ok(TypeDescriptor::Float(size)) => {
            let values = ds.read_raw::<f64>().map_err(Error::hdf5(path, full.to_owned()))?;
            // Each in its stored precision: a float32 0.1 is "0.1", as numpy prints it.
            let single = !matches!(size, hdf5::types::FloatSize::U8);
            Ok(values.into_iter().map(|v| if single { float_text_f32(v as f32) } else { float_text(v) }).collect())
        }
        Ok(other) => {
            Err(Error::Unsupported { path: path.to_owned(), reason: format!("{full}: categories of type {other}") })
        }
        Err(e) => Err(Error::hdf5(path, full.to_owned())(e)),
    }
}

/// A float as Python and pandas print it (`str(1.0)` is `1.0`, `str(1e-05)` is `1e-05`): the
/// shortest digits that read back as the same value, positional from 1e-4 up to 1e16, else
/// scientific with a signed exponent of at least two digits; `nan`, `inf`, `-inf`.
pub fn float_text(value: f64) -> String {
    layout_float(value.is_nan(), value.is_infinite(), value.is_sign_negative(), format!("{:e}", value.abs()))
}

/// [`float_text`] of a float32, with the shortest digits of its own precision (as numpy's
/// `astype(str)` of a float32 column: 0.1, not 0.10000000149011612).
pub fn float_text_f32(value: f32) -> String {
    layout_float(value.is_nan(), value.is_infinite(), value.is_sign_negative(), format!("{:e}", value.abs()))
}

/// Lays out Rust's shortest scientific form (`"1.25e-5"`) of a non-negative value as Python does.
fn layout_float(nan: bool, infinite: bool, negative: bool, scientific: String) -> String {
    if nan {
        return "nan".to_owned();
    }
    let sign = if negative { "-" } else { "" };
    if infinite {
        return format!("{sign}inf");
    }
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((scientific.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if digits.bytes().all(|b| b == b'0') {
        return format!("{sign}0.0");
    }
    if (-4..16).contains(&exponent) {
        // Positional: the point goes after digit `exponent + 1`.
        let point = exponent + 1;
        let text = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        return format!("{sign}{text}");
    }
    let mantissa = match digits.len() {
        1 => digits,
        _ => format!("{}.{}", &digits[..1], &digits[1..]),
    };
    format!("{sign}{mantissa}e{}{:02}", if exponent < 0 { '-' } else { '+' }, exponent.abs())
}

/// anndata <= 0.6's categories: `uns/<column>_categories` datasets by column name (anndata
/// derives the name by deleting every `_categories` from the key).
fn legacy_categories(path: &Path, file: &Group) -> Result<HashMap<String, Dataset>> {
    let Ok(uns) = file.group("uns") else { return Ok(HashMap::new()) };
    let names = uns.member_names().map_err(Error::hdf5(path, "uns"))?;
    Ok(names
        .iter()
        .filter(|k| k.ends_with("_categories"))
        .filter_map(|k| Some((k.replace("_categories", ""), uns.dataset(k).ok()?)))
        .filter(|(_, ds)| ds.ndim() <= 1)
        .collect())
}

/// Whether every code of integer field `field` is below `n_categories` (anndata's test for
/// applying `uns` categories); codes below -1 are corrupt, as pandas rejects them.
fn codes_fit(path: &Path, records: &Dataset, field: &str, n_rows: u64, n_categories: usize) -> Result<bool> {
    const CHUNK: u64 = 1 << 20;
    let mut start = 0;
    while start < n_rows {
        let end = (start + CHUNK).min(n_rows);
        let codes = match records::read(path, records, Some(field), start..end)? {
            Values::Int(v) => v,
            Values::UInt(v) => v.into_iter().map(|c| i64::try_from(c).unwrap_or(i64::MAX)).collect(),
            _ => return Ok(false),
        };
        if let Some(bad) = codes.iter().position(|&c| c < -1) {
            return Err(Error::corrupt(
                path,
                format!("{}/{field}: row {}: categorical code {}", records.name(), start + bad as u64, codes[bad]),
            ));
        }
        if codes.iter().any(|&c| c >= n_categories as i64) {
            return Ok(false);
        }
        start = end;
    }
    Ok(true)
}

impl DataFrameReader {
    /// Opens dataframe group `name`; its index becomes column `id_column` (first, Utf8).
    pub(super) fn open(path: &Path, file: &Group, name: &str, id_column: &str) -> Result<DataFrameReader> {
        if let Ok(records) = file.dataset(name) {
            return DataFrameReader::open_records(path, file, name, id_column, records);
        }
        let group = file.group(name).map_err(Error::hdf5(path, format!("no {name:?} dataframe")))?;
        let encoding = attr_string(path, &group, "encoding-type")?;
        if encoding.as_deref() != Some("dataframe") {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: format!("{name}: encoding-type {encoding:?}, expected \"dataframe\""),
            });
        }
        let index_name = attr_string(path, &group, "_index")?.unwrap_or_else(|| "_index".to_owned());
        let index = group.dataset(&index_name).map_err(Error::hdf5(path, format!("{name}/{index_name} (index)")))?;
        let n_rows = index.size() as u64;
        let order = attr_strings(path, &group, "column-order")?;
        let mut columns = Vec::new();
        for col in order {
            let kind = member_kind(path, &group, &col)?;
            let len = match &kind {
                ColumnKind::Record { .. } => n_rows as usize,
                ColumnKind::Categorical { codes, .. } => codes.size(),
                ColumnKind::Strings(d)
                | ColumnKind::Int(d)
                | ColumnKind::UInt(d)
                | ColumnKind::Float(d)
                | ColumnKind::Bool(d) => d.size(),
                ColumnKind::NullableInt { values, .. }
                | ColumnKind::NullableBool { values, .. }
                | ColumnKind::NullableStrings { values, .. } => values.size(),
            } as u64;
            if len != n_rows {
                return Err(Error::SizeMismatch {
                    path: path.to_owned(),
                    what: format!("length of {name}/{col}"),
                    expected: n_rows,
                    actual: len,
                });
            }
            columns.push((col, kind));
        }
        Ok(DataFrameReader::new(path, name, id_column, index, None, columns, n_rows))
    }

    fn new(
        path: &Path,
        name: &str,
        id_column: &str,
        index: Dataset,
        records: Option<String>,
        columns: Vec<(String, ColumnKind)>,
        n_rows: u64,
    ) -> DataFrameReader {
        let types: Vec<(&str, ColumnType<'_>)> = columns
            .iter()
            .map(|(col, kind)| {
                let kind = match kind {
                    ColumnKind::Categorical { categories, ordered, .. } => {
                        ColumnType::Categorical { categories, ordered: *ordered }
                    }
                    ColumnKind::Record { categories: Some(categories), .. } => {
                        ColumnType::Categorical { categories, ordered: false }
                    }
                    ColumnKind::Strings(_)
                    | ColumnKind::Record { kind: Scalar::FixedText { .. } | Scalar::VarText { .. }, .. } => {
                        ColumnType::Text
                    }
                    ColumnKind::Int(_) | ColumnKind::Record { kind: Scalar::Int, .. } => ColumnType::Int,
                    ColumnKind::UInt(_) | ColumnKind::Record { kind: Scalar::UInt, .. } => ColumnType::UInt,
                    ColumnKind::Float(_) | ColumnKind::Record { kind: Scalar::Float, .. } => ColumnType::Float,
                    ColumnKind::Bool(_) | ColumnKind::Record { kind: Scalar::Bool, .. } => ColumnType::Bool,
                    ColumnKind::NullableInt { .. } => ColumnType::NullableInt,
                    ColumnKind::NullableBool { .. } => ColumnType::NullableBool,
                    ColumnKind::NullableStrings { .. } => ColumnType::NullableText,
                };
                (col.as_str(), kind)
            })
            .collect();
        let schema = dataframe_schema(id_column, &types);
        DataFrameReader { path: path.to_owned(), name: name.to_owned(), index, records, columns, schema, n_rows }
    }

    /// The layout anndata <= 0.6 wrote: the dataframe is one record-array dataset whose first
    /// field is the index, and a categorical column is its integer codes with the categories in
    /// `uns/<column>_categories`. Read as anndata reads it: codes become categories when every
    /// code is below the number of categories (-1 is missing), otherwise they stay integers.
    fn open_records(
        path: &Path,
        file: &Group,
        name: &str,
        id_column: &str,
        records: Dataset,
    ) -> Result<DataFrameReader> {
        let unsupported = |what: String| Error::Unsupported {
            path: path.to_owned(),
            reason: format!("{name} (a record-array dataframe, the layout anndata <= 0.6 wrote): {what}"),
        };
        if records.ndim() != 1 {
            return Err(unsupported(format!("{}-dimensional, expected 1", records.ndim())));
        }
        let fields = records::fields(path, &records).map_err(|e| unsupported(e.to_string()))?;
        let Some(((index_field, index_kind), rest)) = fields.split_first() else {
            return Err(unsupported("no fields, expected the index first".to_owned()));
        };
        if !index_kind.is_some_and(Scalar::is_text) {
            return Err(unsupported(format!("its first field {index_field:?} (the index) does not hold strings")));
        }
        let n_rows = records.size() as u64;
        let uns_categories = legacy_categories(path, file)?;
        let mut columns = Vec::new();
        for (field, kind) in rest {
            let Some(kind) = *kind else {
                let ty = records.dtype().and_then(|t| t.to_descriptor()).map(|d| d.to_string()).unwrap_or_default();
                return Err(unsupported(format!("field {field:?} has a type this build does not read (record {ty})")));
            };
            let mut categories = None;
            if let (Scalar::Int | Scalar::UInt, Some(cats)) = (kind, uns_categories.get(field.as_str())) {
                let cats = read_categories(path, cats, &cats.name())?;
                if codes_fit(path, &records, field, n_rows, cats.len())? {
                    categories = Some(cats);
                }
            }
            columns.push((field.clone(), ColumnKind::Record { field: field.clone(), kind, categories }));
        }
        Ok(DataFrameReader::new(path, name, id_column, records, Some(index_field.clone()), columns, n_rows))
    }

    pub(super) fn n_rows(&self) -> u64 {
        self.n_rows
    }

    pub(super) fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// The index (ids) of rows `rows`.
    pub(super) fn read_index(&self, rows: Range<u64>) -> Result<Vec<String>> {
        if let Some(field) = &self.records {
            return records::read_text(&self.path, &self.index, Some(field), rows);
        }
        read_strings(&self.path, &self.index, rows)
    }

    /// Rows `rows` as a record batch with [`schema`](Self::schema).
    pub(super) fn read(&self, rows: Range<u64>) -> Result<RecordBatch> {
        let path = &self.path;
        let n = (rows.end - rows.start) as usize;
        let sel = rows.start as usize..rows.end as usize;
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(StringArray::from(self.read_index(rows.clone())?))];
        for (col, kind) in &self.columns {
            let ctx = || format!("{}/{col}: rows {}..{}", self.name, rows.start, rows.end);
            let num = |d: &Dataset| -> Result<ArrayRef> {
                Ok(match d.dtype().and_then(|t| t.to_descriptor()).map_err(Error::hdf5(path, ctx()))? {
                    TypeDescriptor::Float(_) => Arc::new(Float64Array::from(read_vec::<f64>(path, d, &sel, n, ctx)?)),
                    TypeDescriptor::Unsigned(_) => Arc::new(UInt64Array::from(read_vec::<u64>(path, d, &sel, n, ctx)?)),
                    _ => Arc::new(Int64Array::from(read_vec::<i64>(path, d, &sel, n, ctx)?)),
                })
            };
            let mask = |m: &Dataset| read_vec::<bool>(path, m, &sel, n, ctx);
            let array: ArrayRef = match kind {
                ColumnKind::Categorical { codes, categories, .. } => {
                    categorical_array(path, read_vec::<i32>(path, codes, &sel, n, ctx)?, categories, rows.start, ctx)?
                }
                ColumnKind::Record { field, kind: _, categories } => {
                    let values = records::read(path, &self.index, Some(field), rows.clone())?;
                    match (values, categories) {
                        (Values::Int(codes), Some(categories)) => {
                            let codes = codes.into_iter().map(|c| i32::try_from(c).unwrap_or(i32::MAX)).collect();
                            categorical_array(path, codes, categories, rows.start, ctx)?
                        }
                        (Values::UInt(codes), Some(categories)) => {
                            let codes = codes.into_iter().map(|c| i32::try_from(c).unwrap_or(i32::MAX)).collect();
                            categorical_array(path, codes, categories, rows.start, ctx)?
                        }
                        (Values::Text(v), _) => Arc::new(StringArray::from(v)),
                        (Values::Int(v), _) => Arc::new(Int64Array::from(v)),
                        (Values::UInt(v), _) => Arc::new(UInt64Array::from(v)),
                        (Values::Float(v), _) => Arc::new(Float64Array::from(v)),
                        (Values::Bool(v), _) => Arc::new(BooleanArray::from(v)),
                    }
                }
                ColumnKind::Strings(d) => Arc::new(StringArray::from(read_strings(path, d, rows.clone())?)),
                ColumnKind::Int(d) | ColumnKind::UInt(d) | ColumnKind::Float(d) => num(d)?,
                ColumnKind::Bool(d) => Arc::new(BooleanArray::from(read_vec::<bool>(path, d, &sel, n, ctx)?)),
                ColumnKind::NullableInt { values, mask: m } => {
                    let (v, m) = (read_vec::<i64>(path, values, &sel, n, ctx)?, mask(m)?);
                    Arc::new(Int64Array::from_iter(v.iter().zip(&m).map(|(&v, &missing)| (!missing).then_some(v))))
                }
                ColumnKind::NullableBool { values, mask: m } => {
                    let (v, m) = (read_vec::<bool>(path, values, &sel, n, ctx)?, mask(m)?);
                    Arc::new(BooleanArray::from_iter(v.iter().zip(&m).map(|(&v, &missing)| (!missing).then_some(v))))
                }
                ColumnKind::NullableStrings { values, mask: m } => {
                    let (v, m) = (read_strings(path, values, rows.clone())?, mask(m)?);
                    Arc::new(StringArray::from_iter(v.iter().zip(&m).map(|(v, &missing)| (!missing).then_some(v))))
                }
            };
            arrays.push(array);
        }
        RecordBatch::try_new(self.schema(), arrays)
            .map_err(|e| Error::arrow(format!("{}: {}", path.display(), self.name), e))
    }
}

/// Reads `sel` of a 1-D dataset as `T` (HDF5 converts numeric types).
pub(super) fn read_vec<T: hdf5::H5Type + Clone>(
    path: &Path,
    ds: &Dataset,
    sel: &Range<usize>,
    n: usize,
    ctx: impl Fn() -> String,
) -> Result<Vec<T>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    // A freshly read 1-D array is standard-layout with offset 0: its buffer is the vector.
    ds.read_slice_1d::<T, _>(sel.clone()).map(|a| a.into_raw_vec_and_offset().0).map_err(Error::hdf5(path, ctx()))
}

/// Writes an Arrow table as an AnnData dataframe group, appending rows chunk by chunk.
pub(super) struct DataFrameWriter {
    path: PathBuf,
    group: Group,
    columns: Vec<(String, WriterColumn)>,
    rows: usize,
}

enum WriterColumn {
    Index(Dataset),
    Categorical(Dataset),
    Strings(Dataset),
    Int(Dataset),
    UInt(Dataset),
    Float(Dataset),
    Bool(Dataset),
    Nullable { values: Dataset, mask: Dataset },
}

pub(super) const CHUNK_ROWS: usize = 16_384;

fn string_attr(path: &Path, loc: &Location, name: &str, value: &str) -> Result<()> {
    let v: VarLenUnicode = value.parse().map_err(|e| Error::InvalidInput(format!("{name}: {e:?}")))?;
    loc.new_attr::<VarLenUnicode>()
        .create(name)
        .and_then(|a| a.write_scalar(&v))
        .map_err(Error::hdf5(path, format!("{}: attribute {name}", loc.name())))
}

pub(super) fn encoding(path: &Path, loc: &Location, kind: &str, version: &str) -> Result<()> {
    string_attr(path, loc, "encoding-type", kind)?;
    string_attr(path, loc, "encoding-version", version)
}

pub(super) fn strings_to_h5(values: impl IntoIterator<Item = impl AsRef<str>>) -> Result<Vec<VarLenUnicode>> {
    values
        .into_iter()
        .map(|s| {
            s.as_ref()
                .parse::<VarLenUnicode>()
                .map_err(|e| Error::InvalidInput(format!("string {:?}: {e:?}", s.as_ref())))
        })
        .collect()
}

/// A resizable, chunked 1-D dataset of `T`, optionally compressed.
pub(super) fn appendable<T: hdf5::H5Type>(
    path: &Path,
    group: &Group,
    name: &str,
    compression: super::H5adCompression,
) -> Result<Dataset> {
    let mut builder = group.new_dataset::<T>().chunk(CHUNK_ROWS).shape(0..);
    builder = match compression {
        super::H5adCompression::None => builder,
        super::H5adCompression::Gzip(level) => builder.deflate(level),
        super::H5adCompression::Lzf => builder.lzf(),
    };
    builder.create(name).map_err(Error::hdf5(path, format!("{}/{name}", group.name())))
}

/// Appends `values` at row `at` of a resizable 1-D dataset.
pub(super) fn append<T: hdf5::H5Type>(path: &Path, ds: &Dataset, at: usize, values: &[T]) -> Result<()> {
    if values.is_empty() {
        return Ok(());
    }
    let ctx = || format!("{}: rows {}..{}", ds.name(), at, at + values.len());
    ds.resize(at + values.len()).map_err(Error::hdf5(path, ctx()))?;
    ds.write_slice(values, at..at + values.len()).map_err(Error::hdf5(path, ctx()))
}

impl DataFrameWriter {
    /// Creates dataframe group `name` for `schema` (first column = index).
    pub(super) fn create(
        path: &Path,
        parent: &Group,
        name: &str,
        schema: &Schema,
        compression: super::H5adCompression,
    ) -> Result<DataFrameWriter> {
        let group = parent.create_group(name).map_err(Error::hdf5(path, format!("create {name}")))?;
        encoding(path, &group, "dataframe", "0.2.0")?;
        string_attr(path, &group, "_index", "_index")?;
        let mut columns = Vec::new();
        let mut order = Vec::new();
        for (i, field) in schema.fields().iter().enumerate() {
            let col_name = if i == 0 { "_index".to_owned() } else { source_name(field).to_owned() };
            let column = if i == 0 {
                let ds = appendable::<VarLenUnicode>(path, &group, "_index", compression)?;
                encoding(path, &ds, "string-array", "0.2.0")?;
                WriterColumn::Index(ds)
            } else {
                order.push(col_name.clone());
                match (field.data_type(), categories_of(field)) {
                    (DataType::Dictionary(_, _), Some(categories)) => {
                        let g =
                            group.create_group(&col_name).map_err(Error::hdf5(path, format!("{name}/{col_name}")))?;
                        encoding(path, &g, "categorical", "0.2.0")?;
                        g.new_attr::<bool>()
                            .create("ordered")
                            .and_then(|a| a.write_scalar(&is_ordered(field)))
                            .map_err(Error::hdf5(path, format!("{name}/{col_name}: ordered")))?;
                        let cats = strings_to_h5(&categories)?;
                        let cds = g
                            .new_dataset::<VarLenUnicode>()
                            .shape(cats.len())
                            .create("categories")
                            .map_err(Error::hdf5(path, format!("{name}/{col_name}/categories")))?;
                        if !cats.is_empty() {
                            cds.write_raw(&cats).map_err(Error::hdf5(path, format!("{name}/{col_name}/categories")))?;
                        }
                        encoding(path, &cds, "string-array", "0.2.0")?;
                        let codes = appendable::<i32>(path, &g, "codes", compression)?;
                        encoding(path, &codes, "array", "0.2.0")?;
                        WriterColumn::Categorical(codes)
                    }
                    (DataType::Utf8 | DataType::LargeUtf8, _) if field.is_nullable() => {
                        nullable::<VarLenUnicode>(path, &group, &col_name, "nullable-string-array", compression)?
                    }
                    (DataType::Boolean, _) if field.is_nullable() => {
                        nullable::<bool>(path, &group, &col_name, "nullable-boolean", compression)?
                    }
                    (
                        DataType::Int8
                        | DataType::Int16
                        | DataType::Int32
                        | DataType::Int64
                        | DataType::UInt8
                        | DataType::UInt16
                        | DataType::UInt32,
                        _,
                    ) if field.is_nullable() => {
                        nullable::<i64>(path, &group, &col_name, "nullable-integer", compression)?
                    }
                    (DataType::Utf8 | DataType::LargeUtf8, _) => {
                        let ds = appendable::<VarLenUnicode>(path, &group, &col_name, compression)?;
                        encoding(path, &ds, "string-array", "0.2.0")?;
                        WriterColumn::Strings(ds)
                    }
                    (DataType::Boolean, _) => WriterColumn::Bool(plain::<bool>(path, &group, &col_name, compression)?),
                    (DataType::UInt64, _) => WriterColumn::UInt(plain::<u64>(path, &group, &col_name, compression)?),
                    (DataType::Float16 | DataType::Float32 | DataType::Float64, _) => {
                        WriterColumn::Float(plain::<f64>(path, &group, &col_name, compression)?)
                    }
                    (t, _) if t.is_integer() => WriterColumn::Int(plain::<i64>(path, &group, &col_name, compression)?),
                    (t, _) => {
                        return Err(Error::Unsupported {
                            path: path.to_owned(),
                            reason: format!("{name} column {col_name:?} of type {t} cannot be written to .h5ad"),
                        });
                    }
                }
            };
            columns.push((col_name, column));
        }
        let order_h5 = strings_to_h5(&order)?;
        let attr = group
            .new_attr::<VarLenUnicode>()
            .shape(order_h5.len())
            .create("column-order")
            .map_err(Error::hdf5(path, format!("{name}: column-order")))?;
        if !order_h5.is_empty() {
            attr.write_raw(&order_h5).map_err(Error::hdf5(path, format!("{name}: column-order")))?;
        }
        Ok(DataFrameWriter { path: path.to_owned(), group, columns, rows: 0 })
    }

    /// Appends the rows of `batch` (same schema as at creation).
    pub(super) fn append(&mut self, batch: &RecordBatch) -> Result<()> {
        let path = self.path.clone();
        let at = self.rows;
        for ((name, column), array) in self.columns.iter().zip(batch.columns()) {
            let bad = |what: &str| Error::InvalidInput(format!("{}/{name}: {what}", self.group.name()));
            match column {
                WriterColumn::Index(ds) | WriterColumn::Strings(ds) => {
                    let a = cast(array, &DataType::Utf8)?;
                    let s = a.as_string::<i32>();
                    if s.null_count() > 0 {
                        return Err(bad("null strings need a nullable column"));
                    }
                    append(&path, ds, at, &strings_to_h5(s.iter().map(|v| v.unwrap_or("")))?)?;
                }
                WriterColumn::Categorical(ds) => {
                    let dict = array
                        .as_dictionary_opt::<Int32Type>()
                        .ok_or_else(|| bad("expected Dictionary(Int32, Utf8)"))?;
                    let field = batch.schema_ref().field_with_name(name).ok().cloned();
                    let categories = field.as_ref().and_then(categories_of).unwrap_or_default();
                    let lookup: HashMap<&str, i32> =
                        categories.iter().enumerate().map(|(i, c)| (c.as_str(), i as i32)).collect();
                    let values = dict.values().as_string_opt::<i32>().ok_or_else(|| bad("non-string categories"))?;
                    let map: Vec<i32> =
                        values.iter().map(|v| v.and_then(|v| lookup.get(v).copied()).unwrap_or(-1)).collect();
                    let codes: Vec<i32> = dict.keys().iter().map(|k| k.map_or(-1, |k| map[k as usize])).collect();
                    append(&path, ds, at, &codes)?;
                }
                WriterColumn::Int(ds) => {
                    let a = cast(array, &DataType::Int64)?;
                    append(&path, ds, at, a.as_primitive::<Int64Type>().values())?;
                }
                WriterColumn::UInt(ds) => {
                    append(&path, ds, at, cast(array, &DataType::UInt64)?.as_primitive::<UInt64Type>().values())?
                }
                WriterColumn::Float(ds) => {
                    let a = cast(array, &DataType::Float64)?;
                    let v: Vec<f64> = a.as_primitive::<Float64Type>().iter().map(|v| v.unwrap_or(f64::NAN)).collect();
                    append(&path, ds, at, &v)?;
                }
                WriterColumn::Bool(ds) => {
                    let v: Vec<bool> = array.as_boolean().iter().map(|v| v.unwrap_or(false)).collect();
                    append(&path, ds, at, &v)?;
                }
                WriterColumn::Nullable { values, mask } => {
                    let m: Vec<bool> = (0..array.len()).map(|i| array.is_null(i)).collect();
                    match array.data_type() {
                        DataType::Boolean => {
                            let v: Vec<bool> = array.as_boolean().iter().map(|v| v.unwrap_or(false)).collect();
                            append(&path, values, at, &v)?;
                        }
                        DataType::Utf8 | DataType::LargeUtf8 => {
                            let a = cast(array, &DataType::Utf8)?;
                            append(
                                &path,
                                values,
                                at,
                                &strings_to_h5(a.as_string::<i32>().iter().map(|v| v.unwrap_or("")))?,
                            )?;
                        }
                        _ => {
                            let a = cast(array, &DataType::Int64)?;
                            let v: Vec<i64> = a.as_primitive::<Int64Type>().iter().map(|v| v.unwrap_or(0)).collect();
                            append(&path, values, at, &v)?;
                        }
                    }
                    append(&path, mask, at, &m)?;
                }
            }
        }
        self.rows += batch.num_rows();
        Ok(())
    }
}

fn cast(array: &ArrayRef, to: &DataType) -> Result<ArrayRef> {
    arrow_cast::cast(array, to).map_err(|e| Error::arrow(format!("converting a column to {to}"), e))
}

fn plain<T: hdf5::H5Type>(
    path: &Path,
    group: &Group,
    name: &str,
    compression: super::H5adCompression,
) -> Result<Dataset> {
    let ds = appendable::<T>(path, group, name, compression)?;
    encoding(path, &ds, "array", "0.2.0")?;
    Ok(ds)
}

fn nullable<T: hdf5::H5Type>(
    path: &Path,
    group: &Group,
    name: &str,
    kind: &str,
    compression: super::H5adCompression,
) -> Result<WriterColumn> {
    let g = group.create_group(name).map_err(Error::hdf5(path, format!("{}/{name}", group.name())))?;
    encoding(path, &g, kind, "0.1.0")?;
    // Its arrays carry their own encoding, as anndata writes them (it warns of an old format
    // where they do not).
    let values = plain::<T>(path, &g, "values", compression)?;
    let mask = plain::<bool>(path, &g, "mask", compression)?;
    Ok(WriterColumn::Nullable { values, mask })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_printed_as_python_and_numpy_print_them() {
        // Values and spellings from `str(x)` (float64) and `np.float32(x).astype(str)`.
        for (value, text) in [
            (1.0, "1.0"),
            (1e-05, "1e-05"),
            (0.5, "0.5"),
            (2.5e16, "2.5e+16"),
            (0.1, "0.1"),
            (100.0, "100.0"),
            (123456789.0, "123456789.0"),
            (1e16, "1e+16"),
            (9999999999999998.0, "9999999999999998.0"),
            (0.0001, "0.0001"),
            (0.00012, "0.00012"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (-2.5, "-2.5"),
            (1.5e300, "1.5e+300"),
            (5e-324, "5e-324"),
            (f64::NAN, "nan"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            assert_eq!(float_text(value), text, "{value:e}");
        }
        for (value, text) in [(0.1f32, "0.1"), (1e-05, "1e-05"), (1.0, "1.0"), (0.3, "0.3")] {
            assert_eq!(float_text_f32(value), text, "{value:e}");
        }
    }
}
