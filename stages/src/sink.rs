//! The Parquet sink: writes record batches to a Parquet file that appears complete or not at all.
//!
//! Rows go to a temporary sibling (`.NAME.tmp-PID-N`); [`ParquetSink::finish`] closes it (the
//! footer makes a Parquet file valid) and renames it into place. A sink dropped before `finish`
//! (an error upstream, a panic, Ctrl-C) removes its temporary file, so no reader ever sees a
//! half-written output. Row groups are bounded in rows and bytes, pages are zstd-compressed, and
//! float columns (plain or inside `FixedSizeList` vectors) are written without dictionaries and
//! with the BYTE_STREAM_SPLIT encoding, which compresses float32 expression values well.

use crate::output::OutputKind;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::error::{Error, Result};

/// Rows per row group at most, unless set otherwise.
pub const DEFAULT_ROW_GROUP_ROWS: usize = 8_192;
/// Bytes per row group at most, unless set otherwise (64 MiB).
pub const DEFAULT_ROW_GROUP_BYTES: usize = 64 << 20;
/// zstd level of the pages, unless set otherwise.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// How the sink lays out its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkOptions {
    /// Rows per row group at most (the writer buffers one row group in memory); default
    /// [`DEFAULT_ROW_GROUP_ROWS`].
    pub row_group_rows: usize,
    /// Bytes per row group at most (estimated by the writer), bounding memory for wide rows;
    /// default [`DEFAULT_ROW_GROUP_BYTES`].
    pub row_group_bytes: usize,
    /// zstd level of the pages; default [`DEFAULT_ZSTD_LEVEL`].
    pub zstd_level: i32,
    /// Replace an existing regular file at the path; default false (an existing file is an
    /// error, see [`crate::output`]).
    pub overwrite: bool,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
            row_group_bytes: DEFAULT_ROW_GROUP_BYTES,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            overwrite: false,
        }
    }
}

/// What a finished sink wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SinkSummary {
    /// The final path.
    pub path: PathBuf,
    /// Rows written.
    pub rows: u64,
    /// Size of the finished file.
    pub bytes: u64,
    /// Row groups.
    pub row_groups: usize,
}

/// A Parquet file being written. Nothing appears at its path until [`finish`](Self::finish):
///
/// ```
/// use std::sync::Arc;
///
/// use arrow::array::{Float32Array, RecordBatch, StringArray};
/// use arrow::datatypes::{DataType, Field, Schema};
/// use cpa_stream_stages::sink::{ParquetSink, SinkOptions};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("out.parquet");
/// let schema = Arc::new(Schema::new(vec![
///     Field::new("cell_id", DataType::Utf8, false),
///     Field::new("score", DataType::Float32, false),
/// ]));
/// let batch = RecordBatch::try_new(
///     Arc::clone(&schema),
///     vec![Arc::new(StringArray::from(vec!["a", "b"])), Arc::new(Float32Array::from(vec![0.5, 2.0]))],
/// )?;
/// let mut sink = ParquetSink::create(&path, schema, &SinkOptions::default())?;
/// sink.write(&batch)?;
/// assert!(!path.exists(), "still a temporary file");
/// let summary = sink.finish()?;
/// assert_eq!((summary.rows, summary.row_groups), (2, 1));
/// assert!(path.exists());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ParquetSink {
    writer: Option<ArrowWriter<BufWriter<File>>>,
    tmp: PathBuf,
    overwrite: bool,
    path: PathBuf,
    rows: u64,
    /// Held until the file is published or abandoned (dropped after `Drop::drop`).
    _lock: crate::output::OutputLock,
}

impl std::fmt::Debug for ParquetSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetSink").field("path", &self.path).field("rows", &self.rows).finish_non_exhaustive()
    }
}

static SINK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The writer properties of a sink for `schema`.
pub fn writer_properties(schema: &SchemaRef, options: &SinkOptions) -> Result<WriterProperties> {
    let level = ZstdLevel::try_new(options.zstd_level)
        .map_err(|e| Error::InvalidInput(format!("zstd level {}: {e}", options.zstd_level)))?;
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(options.row_group_rows.max(1)))
        .set_max_row_group_bytes(Some(options.row_group_bytes.max(1)))
        .set_key_value_metadata(crate::provenance::key_values(schema));
    for field in schema.fields() {
        let leaf = match field.data_type() {
            DataType::Float32 | DataType::Float64 => Some(ColumnPath::new(vec![field.name().clone()])),
            DataType::FixedSizeList(item, _) | DataType::List(item)
                if matches!(item.data_type(), DataType::Float32 | DataType::Float64) =>
            {
                Some(ColumnPath::new(vec![field.name().clone(), "list".to_owned(), item.name().clone()]))
            }
            _ => None,
        };
        if let Some(path) = leaf {
            props = props
                .set_column_dictionary_enabled(path.clone(), false)
                .set_column_encoding(path.clone(), Encoding::BYTE_STREAM_SPLIT)
                .set_column_statistics_enabled(path, EnabledStatistics::None);
        }
    }
    Ok(props.build())
}

impl ParquetSink {
    /// Starts writing `path` (its directory must exist). Nothing appears at `path` until
    /// [`finish`](Self::finish).
    pub fn create(path: &Path, schema: SchemaRef, options: &SinkOptions) -> Result<ParquetSink> {
        let lock = crate::output::claim_output(path, OutputKind::File, options.overwrite)?;
        let name =
            path.file_name().ok_or_else(|| Error::InvalidInput(format!("{}: not a file name", path.display())))?;
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(Error::InvalidInput(format!("{}: no such directory", parent.display())));
        }
        let n = SINK_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = parent.join(format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id()));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let props = writer_properties(&schema, options)?;
        let writer = ArrowWriter::try_new(BufWriter::with_capacity(1 << 20, file), schema, Some(props))
            .map_err(|e| Error::parquet(path, e));
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        Ok(ParquetSink {
            writer: Some(writer),
            tmp,
            path: path.to_owned(),
            rows: 0,
            overwrite: options.overwrite,
            _lock: lock,
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Row groups written to the file so far (the buffered one not counted).
    pub fn row_groups_written(&self) -> usize {
        self.writer.as_ref().map_or(0, |w| w.flushed_row_groups().len())
    }

    /// Bytes held in the writer's buffered row group (its memory).
    pub fn buffered_bytes(&self) -> usize {
        self.writer.as_ref().map_or(0, ArrowWriter::memory_size)
    }

    /// Appends a batch (its schema must be the sink's).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let writer = self.writer.as_mut().ok_or_else(|| Error::InvalidInput("sink already finished".into()))?;
        writer.write(batch).map_err(|e| Error::parquet(&self.path, e))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Writes the footer, flushes the file to disk and renames it into place.
    pub fn finish(mut self) -> Result<SinkSummary> {
        let writer = self.writer.take().ok_or_else(|| Error::InvalidInput("sink already finished".into()))?;
        let buffered = writer.into_inner().map_err(|e| Error::parquet(&self.path, e))?;
        let file = buffered.into_inner().map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        let metadata = parquet::file::reader::SerializedFileReader::new(
            File::open(&self.tmp).map_err(|e| Error::io(&self.tmp, e))?,
        )
        .map_err(|e| Error::parquet(&self.tmp, e))?;
        let row_groups = parquet::file::reader::FileReader::metadata(&metadata).num_row_groups();
        if let Err(e) = crate::output::publish(&self.tmp, &self.path, OutputKind::File, self.overwrite) {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(e);
        }
        let bytes = std::fs::metadata(&self.path).map_err(|e| Error::io(&self.path, e))?.len();
        Ok(SinkSummary { path: self.path.clone(), rows: self.rows, bytes, row_groups })
    }
}

impl Drop for ParquetSink {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float32Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("x", DataType::Float32, false),
        ]));
        let columns: Vec<arrow::array::ArrayRef> =
            vec![Arc::new(StringArray::from(vec!["a", "b"])), Arc::new(Float32Array::from(vec![1.0, 2.5]))];
        RecordBatch::try_new(schema, columns).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn output_appears_only_after_finish() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let path = dir.path().join("out.parquet");
        let b = batch();
        let mut sink =
            ParquetSink::create(&path, b.schema(), &SinkOptions { row_group_rows: 1, ..Default::default() })?;
        sink.write(&b)?;
        assert!(!path.exists(), "nothing at the final path before finish");
        let summary = sink.finish()?;
        assert_eq!((summary.rows, summary.row_groups), (2, 2));
        assert!(path.exists());
        let leftovers = std::fs::read_dir(dir.path()).map_err(|e| Error::io(dir.path(), e))?.count();
        assert_eq!(leftovers, 1, "no temporary file left");
        Ok(())
    }

    #[test]
    fn a_dropped_sink_leaves_nothing() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let path = dir.path().join("out.parquet");
        let b = batch();
        let mut sink = ParquetSink::create(&path, b.schema(), &SinkOptions::default())?;
        sink.write(&b)?;
        drop(sink);
        assert_eq!(std::fs::read_dir(dir.path()).map_err(|e| Error::io(dir.path(), e))?.count(), 0);
        Ok(())
    }
}
