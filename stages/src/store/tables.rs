//! Reading the store's Parquet tables (`obs`, `var`, extras) in bounded memory.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use arrow_array::{Array, DictionaryArray};

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type};
use arrow_schema::{DataType, SchemaRef};
use cpa_stream_schemas::StoreFiles;
use cpa_stream_schemas::tables::categories_of;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::reader::{ChunkReader, Length};

use super::Store;
use crate::error::{Error, Result};

/// A Parquet table to read: a file the user named, or a file of an open store (read from the
/// version of the store that was opened, see [`Store::open_file`]).
#[derive(Clone, Copy)]
pub enum TableFile<'a> {
    /// A file by its path.
    Path(&'a Path),
    /// A file of an open store, by its name in the manifest.
    Store(&'a Store, &'a str),
}

impl std::fmt::Debug for TableFile<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TableFile").field(&self.path()).finish()
    }
}

impl TableFile<'_> {
    /// The file's path, for messages.
    pub fn path(&self) -> std::path::PathBuf {
        match self {
            TableFile::Path(p) => p.to_path_buf(),
            TableFile::Store(s, name) => s.file_path(name),
        }
    }

    /// Whether there is such a table (a store's: listed in its manifest).
    pub fn exists(&self) -> bool {
        match self {
            TableFile::Path(p) => p.exists(),
            TableFile::Store(s, name) => s.has_file(name),
        }
    }

    /// Streams the table in batches.
    pub fn read(&self) -> Result<impl Iterator<Item = Result<RecordBatch>> + use<>> {
        match self {
            TableFile::Path(p) => read_table_of(p, File::open(p).map_err(|e| Error::io(p, e))?),
            TableFile::Store(s, name) => read_table_of(&s.file_path(name), s.open_file(name)?),
        }
    }

    /// The table's Arrow schema.
    pub fn schema(&self) -> Result<SchemaRef> {
        match self {
            TableFile::Path(p) => table_schema(p),
            TableFile::Store(s, name) => s.table_schema(name),
        }
    }

    /// The whole table as one batch (small tables).
    pub fn read_small(&self) -> Result<RecordBatch> {
        let schema = self.schema()?;
        let batches = self.read()?.collect::<Result<Vec<_>>>()?;
        arrow_select::concat::concat_batches(&schema, &batches)
            .map_err(|e| Error::arrow(self.path().display().to_string(), e))
    }
}

/// Rows per batch when scanning a table.
const SCAN_BATCH_ROWS: usize = 65_536;

/// Runs a Parquet library call on a file that may be damaged: the library asserts on some
/// malformed metadata (a negative column range, found by the damaged-store property test), and
/// such a panic becomes an error naming the file rather than ending the process.
pub(crate) fn guarded<T>(path: &Path, read: impl FnOnce() -> Result<T>) -> Result<T> {
    crate::crew::catch_quietly(read)
        .unwrap_or_else(|message| Err(Error::corrupt(path, format!("damaged Parquet file ({message})"))))
}

/// The Arrow schema stored in a Parquet file (field metadata included).
pub fn table_schema(path: &Path) -> Result<SchemaRef> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    table_schema_of(path, file)
}

/// [`table_schema`] of an open file (`path` names it in errors).
pub(crate) fn table_schema_of(path: &Path, file: File) -> Result<SchemaRef> {
    guarded(path, || {
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e))?;
        Ok(builder.schema().clone())
    })
}

/// Streams a Parquet table in batches of at most 65,536 rows.
pub fn read_table(path: &Path) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    read_table_from(path, file)
}

/// [`read_table`] of an open file (`path` names it in errors).
pub(crate) fn read_table_of(path: &Path, file: File) -> Result<impl Iterator<Item = Result<RecordBatch>> + use<>> {
    read_table_from(path, file)
}

/// [`read_table`] of a Parquet file already read into memory (`path` names it in errors), for
/// small files from users (a `--targets` table), read whole once instead of in many small reads.
pub fn read_table_from_bytes(path: &Path, bytes: Vec<u8>) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
    read_table_from(path, bytes::Bytes::from(bytes))
}

fn read_table_from<R: ChunkReader + 'static>(
    path: &Path,
    input: R,
) -> Result<impl Iterator<Item = Result<RecordBatch>> + use<R>> {
    let mut reader: ParquetRecordBatchReader = guarded(path, || {
        ParquetRecordBatchReaderBuilder::try_new(EndIsAnError(input))
            .and_then(|b| b.with_batch_size(SCAN_BATCH_ROWS).build())
            .map_err(|e| Error::parquet(path, e))
    })?;
    let path = path.to_owned();
    let mut failed = false;
    Ok(std::iter::from_fn(move || {
        if failed {
            return None;
        }
        let next = guarded(&path, || Ok(reader.next()))
            .and_then(|batch| batch.transpose().map_err(|e| Error::arrow(path.display().to_string(), e)));
        match next {
            Ok(batch) => batch.map(Ok),
            Err(e) => {
                failed = true;
                Some(Err(e))
            }
        }
    }))
}

/// A Parquet input whose streams fail when read past the end of the file.
///
/// The Parquet library (60.1) skips an unknown field of a page header by copying its bytes
/// into a sink, and a copy that meets the end of its input stops without an error; a damaged
/// header declaring a list of two billion 8-byte fields then spins through two billion empty
/// copies (found by the `targets` fuzz target: minutes per file). A stream that reports
/// reading past the end as an error ends the first such copy instead. No valid file reads past
/// its end: the footer and every page lie inside it.
struct EndIsAnError<R>(R);

impl<R: Length> Length for EndIsAnError<R> {
    fn len(&self) -> u64 {
        self.0.len()
    }
}

impl<R: ChunkReader> ChunkReader for EndIsAnError<R> {
    type T = EndIsAnErrorRead<R::T>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        self.0.get_read(start).map(EndIsAnErrorRead)
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        self.0.get_bytes(start, length)
    }
}

/// See [`EndIsAnError`].
struct EndIsAnErrorRead<R>(R);

impl<R: Read> Read for EndIsAnErrorRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf)? {
            0 if !buf.is_empty() => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "a page header runs past the end of the file",
            )),
            n => Ok(n),
        }
    }
}

/// Reads a whole Parquet table into one batch (for small tables: `var`, DEG lists).
pub fn read_small_table(path: &Path) -> Result<RecordBatch> {
    let schema = table_schema(path)?;
    let batches = read_table(path)?.collect::<Result<Vec<_>>>()?;
    arrow_select::concat::concat_batches(&schema, &batches).map_err(|e| Error::arrow(path.display().to_string(), e))
}

/// Writes `batches` (all with `schema`) as a Parquet table with the store's table properties
/// (zstd, bounded row groups), to a temporary name renamed into place on success.
/// The file's lock is held while it is written.
pub fn write_table(path: &Path, schema: SchemaRef, batches: impl IntoIterator<Item = RecordBatch>) -> Result<()> {
    // Replaced when it exists (tables rewritten as a run goes), but only a regular file.
    let lock = crate::output::claim_output(path, crate::output::OutputKind::File, true)?;
    write_table_locked(path, &lock, schema, batches)
}

/// [`write_table`] by a caller that holds `path`'s lock already (taken with
/// [`lock_output`](crate::output::lock_output), say to compare the file with what it would write).
pub fn write_table_locked(
    path: &Path,
    lock: &crate::output::OutputLock,
    schema: SchemaRef,
    batches: impl IntoIterator<Item = RecordBatch>,
) -> Result<()> {
    if crate::output::lock_path(path)? != lock.path() {
        return Err(Error::InvalidInput(format!("{}: written under another output's lock", path.display())));
    }
    crate::output::check_destination(path, crate::output::OutputKind::File, true)?;
    let tmp = crate::output::temporary_sibling(path)?;
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let props = super::table_properties(SCAN_BATCH_ROWS)
            .into_builder()
            .set_key_value_metadata(crate::provenance::key_values(&schema))
            .build();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| Error::parquet(&tmp, e))?;
        for batch in batches {
            writer.write(&batch).map_err(|e| Error::parquet(&tmp, e))?;
        }
        writer.close().map_err(|e| Error::parquet(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// What `inspect` shows of one `obs` column.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ColumnSummary {
    /// Column name.
    pub name: String,
    /// Arrow type.
    pub dtype: String,
    /// Null values.
    pub nulls: u64,
    /// Categorical columns: every category in order with its number of cells.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub categories: Option<Vec<(String, u64)>>,
    /// Numeric columns: smallest and largest value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<(f64, f64)>,
}

/// Scans `obs.parquet` once and summarises each column. Checks that every categorical value is
/// one of the column's recorded categories.
pub fn summarize_obs(store: &Store) -> Result<Vec<ColumnSummary>> {
    let path = store.file_path(StoreFiles::OBS);
    let schema = store.table_schema(StoreFiles::OBS)?;
    let mut summaries: Vec<ColumnSummary> = schema
        .fields()
        .iter()
        .map(|f| ColumnSummary {
            name: f.name().clone(),
            dtype: f.data_type().to_string(),
            nulls: 0,
            categories: categories_of(f).map(|c| c.into_iter().map(|c| (c, 0)).collect()),
            range: None,
        })
        .collect();
    let lookups: Vec<Option<HashMap<String, usize>>> = summaries
        .iter()
        .map(|s| s.categories.as_ref().map(|c| c.iter().enumerate().map(|(i, (name, _))| (name.clone(), i)).collect()))
        .collect();
    let mut row = 0u64;
    for batch in store.table(StoreFiles::OBS)? {
        let batch = batch?;
        for (col, summary) in summaries.iter_mut().enumerate() {
            let array = batch.column(col);
            summary.nulls += array.null_count() as u64;
            if let (Some(counts), Some(lookup)) = (summary.categories.as_mut(), &lookups[col]) {
                let dict: &DictionaryArray<Int32Type> = array.as_dictionary_opt().ok_or_else(|| {
                    Error::corrupt(&path, format!("column {:?} is not Dictionary(Int32, Utf8)", summary.name))
                })?;
                let values = dict.values().as_string_opt::<i32>().ok_or_else(|| {
                    Error::corrupt(&path, format!("column {:?} has non-string categories", summary.name))
                })?;
                let map: Vec<Option<usize>> = values.iter().map(|v| v.and_then(|v| lookup.get(v).copied())).collect();
                for (i, key) in dict.keys().iter().enumerate() {
                    let Some(key) = key else { continue };
                    match map.get(key as usize).copied().flatten() {
                        Some(c) => counts[c].1 += 1,
                        None => {
                            return Err(Error::corrupt(
                                &path,
                                format!(
                                    "row {}: column {:?} holds a value that is not one of its categories",
                                    row + i as u64,
                                    summary.name
                                ),
                            ));
                        }
                    }
                }
            } else if array.data_type().is_numeric() {
                let cast = arrow_cast::cast(array, &DataType::Float64)
                    .map_err(|e| Error::arrow(format!("{}: column {:?}", path.display(), summary.name), e))?;
                let values = cast.as_primitive::<Float64Type>();
                for v in values.iter().flatten() {
                    let (lo, hi) = summary.range.unwrap_or((v, v));
                    summary.range = Some((lo.min(v), hi.max(v)));
                }
            }
        }
        row += batch.num_rows() as u64;
    }
    Ok(summaries)
}
