//! The Parquet sink: writes record batches to a Parquet file that appears complete or not at all.
//!
//! Rows go to a temporary sibling (`.NAME.tmp-PID-N`); [`ParquetSink::finish`] closes it (the
//! footer makes a Parquet file valid) and renames it into place. A sink dropped before `finish`
//! (an error upstream, a panic, Ctrl-C) removes its temporary file, so no reader ever sees a
//! half-written output. Row groups are bounded in rows and bytes, pages are zstd-compressed, and
//! float columns (plain or inside `FixedSizeList` vectors) are written without dictionaries and
//! with the BYTE_STREAM_SPLIT encoding, which compresses float32 expression values well.
//!
//! Row groups are cut as rows arrive (at [`SinkOptions::row_group_rows`] rows, fewer for wide
//! rows) and encoded on [`SinkOptions::threads`] threads, each a whole row group at a time, then
//! written in order: the file's bytes are the same for any thread count, and memory holds at
//! most twice as many row groups as threads.
//!
//! With [`SinkOptions::parts`] the output is a directory of part files instead, one row group
//! each (`part-K-of-N.parquet`, in row order), each written by the thread that encoded it: the
//! kernel serialises writes into one file (ext4 holds its inode lock while it copies into the
//! page cache), so a single file takes its bytes at one thread's pace however many threads
//! encode, while parts are written side by side. The directory is built under a temporary name
//! and renamed into place when every part is complete; each part's bytes depend on its rows
//! only, so the directory is the same for any thread count.

use crate::crew::Crew;
use crate::output::OutputKind;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_array::{Array, ArrayRef, RecordBatch};

use arrow_array::cast::AsArray;
use arrow_schema::{DataType, Field, SchemaRef};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, unbounded};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::{ArrowColumnChunk, ArrowColumnWriter, ArrowRowGroupWriterFactory};
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::column::writer::ColumnCloseResult;
use parquet::data_type::FloatType;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterPropertiesPtr};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{ColumnDescPtr, ColumnPath};

use crate::error::{Error, Result};
use encode::{DenseLevels, encode};
use std::sync::Arc;

mod encode;
mod halves;

/// Rows per row group at most, unless set otherwise.
pub const DEFAULT_ROW_GROUP_ROWS: usize = 8_192;
/// Bytes per row group at most, unless set otherwise (64 MiB).
pub const DEFAULT_ROW_GROUP_BYTES: usize = 64 << 20;
/// zstd level of the pages, unless set otherwise.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// How the sink encodes its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkProfile {
    /// zstd pages, float columns BYTE_STREAM_SPLIT: the smallest files (the default).
    #[default]
    Small,
    /// Uncompressed pages, float columns PLAIN: faster to write and read, larger files (float
    /// values compress little with a fast codec: LZ4 measured no smaller and no faster). Every
    /// reader the project supports reads it (pyarrow, polars, DuckDB, pandas).
    Fast,
}

impl std::str::FromStr for SinkProfile {
    type Err = Error;

    fn from_str(text: &str) -> Result<SinkProfile> {
        match text {
            "small" => Ok(SinkProfile::Small),
            "fast" => Ok(SinkProfile::Fast),
            _ => Err(Error::InvalidInput(format!("sink profile {text:?}: expected small or fast"))),
        }
    }
}

/// The float type of the file's float columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Values {
    /// float32, as computed (the default).
    #[default]
    F32,
    /// Parquet's FLOAT16 logical type (IEEE half precision): half the bytes of float32, a relative
    /// error of at most 2^-11 (0.049%) from 6.1e-5 to 65,504 and an absolute error of at most
    /// 3e-8 below; a value above 65,504 is an error naming its column. pyarrow, pandas, polars
    /// and DuckDB read it. (bfloat16 has no Parquet or Arrow type that these readers decode.)
    F16,
}

impl std::str::FromStr for Values {
    type Err = Error;

    fn from_str(text: &str) -> Result<Values> {
        match text {
            "f32" | "float32" => Ok(Values::F32),
            "f16" | "float16" => Ok(Values::F16),
            "bf16" | "bfloat16" => Err(Error::InvalidInput(
                "values bf16: Parquet and Arrow have no bfloat16 type that pyarrow, polars, DuckDB and pandas \
                 decode; expected f32 or f16"
                    .to_owned(),
            )),
            _ => Err(Error::InvalidInput(format!("values {text:?}: expected f32 or f16"))),
        }
    }
}

/// The file's schema for rows of `schema` written as `values`: float32 columns, plain or inside
/// vectors, become float16 under [`Values::F16`].
pub fn file_schema(schema: &SchemaRef, values: Values) -> SchemaRef {
    if values == Values::F32 {
        return Arc::clone(schema);
    }
    let fields: Vec<arrow_schema::FieldRef> = schema
        .fields()
        .iter()
        .map(|f| match narrowed(f.data_type()) {
            Some(t) => Arc::new(f.as_ref().clone().with_data_type(t)),
            None => Arc::clone(f),
        })
        .collect();
    Arc::new(arrow_schema::Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// The float16 type of a float32 column or vector column (`None`: any other type).
fn narrowed(data_type: &DataType) -> Option<DataType> {
    match data_type {
        DataType::Float32 => Some(DataType::Float16),
        DataType::FixedSizeList(item, n) if item.data_type() == &DataType::Float32 => {
            Some(DataType::FixedSizeList(Arc::new(item.as_ref().clone().with_data_type(DataType::Float16)), *n))
        }
        _ => None,
    }
}

/// A float32 column cast to the type of its `field` in the file (float16); a finite value that
/// float16 cannot hold is an error naming its column.
fn narrow(column: &ArrayRef, field: &Field) -> Result<ArrayRef> {
    let cast = arrow_cast::cast(column, field.data_type())
        .map_err(|e| Error::InvalidInput(format!("column {}: float16: {e}", field.name())))?;
    let (before, after) = match (column.data_type(), cast.data_type()) {
        (DataType::FixedSizeList(..), _) => {
            (Arc::clone(column.as_fixed_size_list().values()), Arc::clone(cast.as_fixed_size_list().values()))
        }
        _ => (Arc::clone(column), Arc::clone(&cast)),
    };
    let half = after.as_primitive::<arrow_array::types::Float16Type>();
    let single = before.as_primitive::<arrow_array::types::Float32Type>();
    if let Some(i) = (0..half.len()).find(|&i| !half.value(i).is_finite() && single.value(i).is_finite()) {
        return Err(Error::InvalidInput(format!(
            "column {}: value {} is beyond float16's largest, 65504: write float32 values (--values f32)",
            field.name(),
            single.value(i)
        )));
    }
    Ok(cast)
}

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
    /// Threads that encode row groups; default 1 (encoded on the caller's thread). The file is
    /// the same for any count.
    pub threads: usize,
    /// Page encoding; default [`SinkProfile::Small`].
    pub profile: SinkProfile,
    /// The float type of the file's float columns; default [`Values::F32`].
    pub values: Values,
    /// Write a directory of part files, one row group each, written in parallel (see the
    /// module's documentation), instead of one file; default false.
    pub parts: bool,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
            row_group_bytes: DEFAULT_ROW_GROUP_BYTES,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            overwrite: false,
            threads: 1,
            profile: SinkProfile::Small,
            values: Values::F32,
            parts: false,
        }
    }
}

/// What a finished sink wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SinkSummary {
    /// The final path (with [`SinkOptions::parts`], the directory).
    pub path: PathBuf,
    /// Rows written.
    pub rows: u64,
    /// Size of the finished file (of every part together).
    pub bytes: u64,
    /// Row groups.
    pub row_groups: usize,
    /// Files written: 1, or the parts.
    pub files: usize,
}

/// A Parquet file being written. Nothing appears at its path until [`finish`](Self::finish):
///
/// ```
/// use std::sync::Arc;
///
/// use arrow_array::{Float32Array, RecordBatch, StringArray};
/// use arrow_schema::{DataType, Field, Schema};
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
    writer: Option<RowGroups>,
    /// The temporary file, or directory of parts.
    tmp: PathBuf,
    kind: OutputKind,
    overwrite: bool,
    path: PathBuf,
    rows: u64,
    /// Held until the output is published or abandoned (dropped after `Drop::drop`).
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
    let (compression, float_encoding) = match options.profile {
        SinkProfile::Small => (Compression::ZSTD(level), Encoding::BYTE_STREAM_SPLIT),
        SinkProfile::Fast => (Compression::UNCOMPRESSED, Encoding::PLAIN),
    };
    let mut props = WriterProperties::builder()
        .set_compression(compression)
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
                .set_column_encoding(path.clone(), float_encoding)
                .set_column_statistics_enabled(path, EnabledStatistics::None);
        }
        let half = match field.data_type() {
            DataType::Float16 => Some(ColumnPath::new(vec![field.name().clone()])),
            DataType::FixedSizeList(item, _) if item.data_type() == &DataType::Float16 => {
                Some(ColumnPath::new(vec![field.name().clone(), "list".to_owned(), item.name().clone()]))
            }
            _ => None,
        };
        if let Some(path) = half {
            // Plain: byte-stream-split of fixed-length byte arrays is newer than some readers.
            props = props
                .set_column_dictionary_enabled(path.clone(), false)
                .set_column_encoding(path.clone(), Encoding::PLAIN)
                .set_column_statistics_enabled(path, EnabledStatistics::None);
        }
    }
    Ok(props.build())
}

impl ParquetSink {
    /// Starts writing `path` (its directory must exist). Nothing appears at `path` until
    /// [`finish`](Self::finish). With [`SinkOptions::parts`], `path` is the directory of parts.
    pub fn create(path: &Path, schema: SchemaRef, options: &SinkOptions) -> Result<ParquetSink> {
        let kind = if options.parts { OutputKind::Directory } else { OutputKind::File };
        let name =
            path.file_name().ok_or_else(|| Error::InvalidInput(format!("{}: not a file name", path.display())))?;
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(Error::InvalidInput(format!("{}: no such directory", parent.display())));
        }
        let lock = crate::output::claim_output(path, kind, options.overwrite)?;
        if kind == OutputKind::Directory && path.is_dir() {
            // --overwrite replaces an earlier directory of parts, never a model, a store or a
            // user's folder given as --out.
            crate::output::check_replaceable(path, "a directory of prediction parts", |name, t| {
                t.is_file() && is_part_name(name)
            })?;
        }
        let n = SINK_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = parent.join(format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id()));
        let stored = file_schema(&schema, options.values);
        let props = writer_properties(&stored, options)?;
        let writer = match kind {
            OutputKind::File => parquet_file(&tmp, path, &stored, props).and_then(|(file, factory)| {
                let layout = Layout::new(stored, Arc::clone(file.properties()), options.profile)?;
                RowGroups::new(path, Target::File { file: Box::new(file), factory }, schema, layout, options)
            }),
            OutputKind::Directory => {
                std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
                Layout::new(stored, Arc::new(props), options.profile).and_then(|layout| {
                    let target = Target::Parts { dir: tmp.clone(), parts: Vec::new() };
                    RowGroups::new(path, target, schema, layout, options)
                })
            }
        };
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                remove_temporary(&tmp, kind);
                return Err(e);
            }
        };
        Ok(ParquetSink {
            writer: Some(writer),
            tmp,
            kind,
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

    /// Row groups written so far (those buffered or being encoded not counted).
    pub fn row_groups_written(&self) -> usize {
        self.writer.as_ref().map_or(0, |w| w.written)
    }

    /// Bytes of the rows held for the row group being filled (its memory; row groups being
    /// encoded not counted).
    pub fn buffered_bytes(&self) -> usize {
        self.writer.as_ref().map_or(0, |w| w.pending.iter().map(RecordBatch::get_array_memory_size).sum())
    }

    /// Appends a batch (its schema must be the sink's).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let writer = self.writer.as_mut().ok_or_else(|| Error::InvalidInput("sink already finished".into()))?;
        if batch.schema_ref().fields() != writer.schema.fields() {
            return Err(Error::InvalidInput(format!("{}: a batch of another schema", self.path.display())));
        }
        writer.write(batch)?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Writes the footer (every part's), flushes the output to disk and renames it into place.
    pub fn finish(mut self) -> Result<SinkSummary> {
        let writer = self.writer.take().ok_or_else(|| Error::InvalidInput("sink already finished".into()))?;
        let finished = writer.finish().and_then(|written| match written {
            Written::File(buffered) => {
                let file = buffered.into_inner().map_err(|e| Error::io(&self.tmp, e.into_error()))?;
                file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
                drop(file);
                let reader = File::open(&self.tmp).map_err(|e| Error::io(&self.tmp, e))?;
                let metadata = parquet::file::reader::SerializedFileReader::new(reader)
                    .map_err(|e| Error::parquet(&self.tmp, e))?;
                let row_groups = parquet::file::reader::FileReader::metadata(&metadata).num_row_groups();
                Ok((row_groups, 1))
            }
            Written::Parts(parts) => {
                for part in &parts {
                    let file = File::open(part).map_err(|e| Error::io(part, e))?;
                    file.sync_all().map_err(|e| Error::io(part, e))?;
                }
                let count = parts.len();
                for (index, part) in parts.iter().enumerate() {
                    let name = part_name(index, count);
                    std::fs::rename(part, self.tmp.join(&name)).map_err(|e| Error::io(part, e))?;
                }
                crate::output::sync_parent(&self.tmp.join("part"));
                // An empty output is one part without row groups: readers still find the schema.
                Ok((count.saturating_sub(usize::from(self.rows == 0)), count))
            }
        });
        let (row_groups, files) = match finished {
            Ok(counts) => counts,
            Err(e) => {
                remove_temporary(&self.tmp, self.kind);
                return Err(e);
            }
        };
        if let Err(e) = crate::output::publish(&self.tmp, &self.path, self.kind, self.overwrite) {
            remove_temporary(&self.tmp, self.kind);
            return Err(e);
        }
        let bytes = match self.kind {
            OutputKind::File => std::fs::metadata(&self.path).map_err(|e| Error::io(&self.path, e))?.len(),
            OutputKind::Directory => {
                let entries = std::fs::read_dir(&self.path).map_err(|e| Error::io(&self.path, e))?;
                entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
            }
        };
        Ok(SinkSummary { path: self.path.clone(), rows: self.rows, bytes, row_groups, files })
    }
}

/// The name of part `index` of `count`, numbered from 0 with as many digits as the last one:
/// names sort in row order.
pub fn part_name(index: usize, count: usize) -> String {
    let width = count.saturating_sub(1).max(1).ilog10() as usize + 1;
    format!("part-{index:0width$}-of-{count:0width$}.parquet")
}

/// Whether `name` is a part file's name ([`part_name`]): `part-I-of-N.parquet`, I < N.
pub fn is_part_name(name: &str) -> bool {
    let Some(numbers) = name.strip_prefix("part-").and_then(|n| n.strip_suffix(".parquet")) else { return false };
    let Some((index, count)) = numbers.split_once("-of-") else { return false };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match (index.parse::<u64>(), count.parse::<u64>()) {
        (Ok(i), Ok(n)) => digits(index) && digits(count) && i < n,
        _ => false,
    }
}

/// Removes a sink's temporary file or directory of parts.
fn remove_temporary(tmp: &Path, kind: OutputKind) {
    let _ = match kind {
        OutputKind::File => std::fs::remove_file(tmp),
        OutputKind::Directory => std::fs::remove_dir_all(tmp),
    };
}

/// A row group for an encoding thread.
enum Job {
    /// To encode into column chunks for the file: its index, rows, column writers and spare
    /// buffers for dense columns.
    Encode(usize, Vec<RecordBatch>, Vec<ArrowColumnWriter>, Vec<Vec<u8>>),
    /// To write as a part file: its index and rows.
    Part(usize, Vec<RecordBatch>),
}

impl Job {
    /// The row group's index.
    fn index(&self) -> usize {
        match self {
            Job::Encode(index, ..) | Job::Part(index, _) => *index,
        }
    }
}

/// What a thread made of a row group.
enum Output {
    /// The column chunks, for the file, and the rows of those left to write into it
    /// ([`Chunk::Direct`]).
    Chunks(Vec<Chunk>, Vec<RecordBatch>),
    /// A part file, complete.
    Part(PathBuf),
}

/// A row group done, by index.
type Done = (usize, Result<Output>);

/// An encoded column chunk of a row group.
enum Chunk {
    /// Encoded by the Arrow writer.
    Arrow(ArrowColumnChunk),
    /// A column of dense float vectors, encoded directly ([`dense_floats`]): its bytes and what
    /// closing its writer returned.
    Dense(Bytes, ColumnCloseResult),
    /// A column of dense float32 vectors not encoded yet: the field's index and the vectors'
    /// size, for [`write_part`] to write straight into the part's file.
    Direct(usize, usize),
}

/// What every encoding thread shares: the file's rows schema, its Parquet leaves and properties.
struct Layout {
    stored: SchemaRef,
    leaves: Vec<ColumnDescPtr>,
    props: WriterPropertiesPtr,
    /// Columns that may be dense (`FixedSizeList<Float32>`): the spare buffers a row group takes.
    dense_columns: usize,
    /// Whether dense float32 columns go straight into the file on the thread that writes it
    /// (the fast profile: copying their values is all their encoding costs, and a chunk buffer in
    /// between doubles the copies) rather than into chunks on the encoding threads (the small
    /// profile, whose compression is worth spreading).
    direct: bool,
}

impl Layout {
    fn new(stored: SchemaRef, props: WriterPropertiesPtr, profile: SinkProfile) -> Result<Layout> {
        let leaves = parquet::arrow::ArrowSchemaConverter::new()
            .with_coerce_types(props.coerce_types())
            .convert(&stored)
            .map_err(|e| Error::InvalidInput(format!("the Parquet schema of the rows: {e}")))?
            .columns()
            .to_vec();
        let dense_columns = stored
            .fields()
            .iter()
            .filter(
                |f| matches!(f.data_type(), DataType::FixedSizeList(item, _) if item.data_type() == &DataType::Float32),
            )
            .count();
        Ok(Layout { stored, leaves, props, dense_columns, direct: profile == SinkProfile::Fast })
    }

    /// Spare buffers for the next row group's dense columns, taken from `spare`.
    fn spare_buffers(&self, spare: &mut Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let keep = spare.len().saturating_sub(self.dense_columns);
        spare.split_off(keep)
    }
}

/// Where row groups go.
enum Target {
    /// One file, written in order by the caller's thread.
    File { file: Box<SerializedFileWriter<BufWriter<File>>>, factory: ArrowRowGroupWriterFactory },
    /// A directory of parts, each written by the thread that encoded it; the parts written so
    /// far, in order.
    Parts { dir: PathBuf, parts: Vec<PathBuf> },
}

/// What [`RowGroups::finish`] leaves: the file's buffer, or the parts in row order.
enum Written {
    File(BufWriter<File>),
    Parts(Vec<PathBuf>),
}

/// Cuts rows into row groups, encodes them (on threads when there are several) and writes them
/// in order.
struct RowGroups {
    path: PathBuf,
    /// Taken by `finish`.
    target: Option<Target>,
    /// The rows' schema; the file's (float16 columns where asked), leaves and properties.
    schema: SchemaRef,
    layout: Arc<Layout>,
    rows_per_group: usize,
    bytes_per_group: usize,
    /// Rows of the row group being filled.
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    /// The next row group's index, and the next one to write.
    next: usize,
    written: usize,
    /// Encoding threads (none when there is one thread: the caller's).
    jobs: Option<Sender<Job>>,
    done: Option<Receiver<Done>>,
    threads: Crew<'static, &'static str>,
    finished: BTreeMap<usize, Output>,
    /// Buffers of dense columns already written, kept for the next row groups: a fresh buffer of
    /// tens of MiB costs a page fault per 4 KiB as it fills.
    spare: Vec<Vec<u8>>,
    in_flight: usize,
    limit: usize,
}

impl RowGroups {
    fn new(path: &Path, target: Target, schema: SchemaRef, layout: Layout, options: &SinkOptions) -> Result<RowGroups> {
        let threads = options.threads.max(1);
        let mut groups = RowGroups {
            path: path.to_owned(),
            target: Some(target),
            rows_per_group: options.row_group_rows.max(1),
            bytes_per_group: options.row_group_bytes.max(1),
            pending: Vec::new(),
            pending_rows: 0,
            next: 0,
            written: 0,
            jobs: None,
            done: None,
            threads: Crew::new(),
            finished: BTreeMap::new(),
            in_flight: 0,
            limit: 2 * threads,
            spare: Vec::new(),
            schema,
            layout: Arc::new(layout),
        };
        if threads > 1 {
            let (jobs, job_rx) = crossbeam_channel::bounded::<Job>(threads);
            let (done_tx, done) = unbounded::<Done>();
            let dir = match &groups.target {
                Some(Target::Parts { dir, .. }) => Some(dir.clone()),
                _ => None,
            };
            for t in 0..threads {
                let (job_rx, done_tx, layout) = (job_rx.clone(), done_tx.clone(), Arc::clone(&groups.layout));
                let dir = dir.clone();
                let work = move || {
                    // A part's dense buffers stay with the thread that wrote it.
                    let mut spare = Vec::new();
                    for job in job_rx {
                        let index = job.index();
                        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            crate::fault::point("sink");
                            match (job, &dir) {
                                (Job::Encode(index, batches, writers, buffers), _) => {
                                    let chunks = encode(&layout, &batches, writers, buffers, layout.direct);
                                    (index, chunks.map(|chunks| Output::Chunks(chunks, batches)))
                                }
                                (Job::Part(index, batches), Some(dir)) => {
                                    (index, write_part(&layout, dir, index, &batches, &mut spare).map(Output::Part))
                                }
                                (Job::Part(index, _), None) => {
                                    (index, Err(Error::InvalidInput("a part without a directory".into())))
                                }
                            }
                        }));
                        match done {
                            Ok(done) => {
                                if done_tx.send(done).is_err() {
                                    break;
                                }
                            }
                            // The row group's result is the panic, so that the writer waiting for
                            // it ends with an error instead of waiting forever; then the thread
                            // ends as it would have, and its crew sees the panic too.
                            Err(payload) => {
                                let message = crate::crew::panic_message(payload.as_ref());
                                let failed = Error::InvalidInput(format!("a worker thread panicked: {message}"));
                                let _ = done_tx.send((index, Err(failed)));
                                std::panic::resume_unwind(payload);
                            }
                        }
                    }
                };
                groups.threads.spawn("sink", format!("sink-encode-{t}"), work).map_err(|e| Error::io(path, e))?;
            }
            groups.jobs = Some(jobs);
            groups.done = Some(done);
        }
        Ok(groups)
    }

    /// Adds rows, cutting a row group off whenever one is full.
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        // Wide rows make smaller row groups: at most `bytes_per_group` of Arrow data each.
        let row_bytes = batch.get_array_memory_size().div_ceil(batch.num_rows().max(1)).max(1);
        let cap = self.rows_per_group.min(self.bytes_per_group / row_bytes).max(1);
        let mut offset = 0;
        while offset < batch.num_rows() {
            let take = (cap.saturating_sub(self.pending_rows)).max(1).min(batch.num_rows() - offset);
            self.pending.push(batch.slice(offset, take));
            self.pending_rows += take;
            offset += take;
            if self.pending_rows >= cap {
                self.cut()?;
            }
        }
        Ok(())
    }

    /// Sends the row group being filled to be encoded, and writes those encoded in order.
    fn cut(&mut self) -> Result<()> {
        if self.pending_rows == 0 {
            return Ok(());
        }
        let batches = std::mem::take(&mut self.pending);
        self.pending_rows = 0;
        let index = self.next;
        self.next += 1;
        let finished = || Error::InvalidInput("sink already finished".into());
        let job = match self.target.as_ref().ok_or_else(finished)? {
            Target::File { factory, .. } => {
                let writers = factory.create_column_writers(index).map_err(|e| Error::parquet(&self.path, e))?;
                Job::Encode(index, batches, writers, Vec::new())
            }
            Target::Parts { .. } => Job::Part(index, batches),
        };
        let Some(jobs) = self.jobs.clone() else { return self.write_here(job) };
        while self.in_flight >= self.limit {
            self.collect(true)?;
        }
        let job = match job {
            Job::Encode(index, batches, writers, _) => {
                Job::Encode(index, batches, writers, self.layout.spare_buffers(&mut self.spare))
            }
            part => part,
        };
        jobs.send(job)
            .map_err(|_| Error::InvalidInput(format!("{}: an encoding thread ended", self.path.display())))?;
        self.in_flight += 1;
        self.collect(false)
    }

    /// One thread: the caller's encodes the row group and writes it, straight into the file (the
    /// same bytes as chunks appended) or as a part.
    fn write_here(&mut self, job: Job) -> Result<()> {
        let finished = || Error::InvalidInput("sink already finished".into());
        match (job, self.target.as_mut().ok_or_else(finished)?) {
            (Job::Encode(_, batches, writers, _), Target::File { file, .. }) => {
                let spare = self.layout.spare_buffers(&mut self.spare);
                let chunks = encode(&self.layout, &batches, writers, spare, true)?;
                write_row_group(file, &self.layout, &batches, chunks, &mut self.spare)
                    .map_err(|e| Error::parquet(&self.path, e))?;
                start_writeback(file.inner().get_ref());
            }
            (Job::Part(index, batches), Target::Parts { dir, parts }) => {
                parts.push(write_part(&self.layout, dir, index, &batches, &mut self.spare)?);
            }
            _ => return Err(Error::InvalidInput(format!("{}: a row group of another output", self.path.display()))),
        }
        self.written += 1;
        Ok(())
    }

    /// Takes finished row groups (waiting for one when `wait`) and puts those next in order.
    fn collect(&mut self, wait: bool) -> Result<()> {
        let Some(done) = &self.done else { return Ok(()) };
        let mut received = Vec::new();
        if wait {
            let first = done
                .recv()
                .map_err(|_| Error::InvalidInput(format!("{}: an encoding thread ended", self.path.display())))?;
            received.push(first);
        }
        received.extend(done.try_iter());
        for (index, output) in received {
            self.in_flight -= 1;
            self.finished.insert(index, output?);
        }
        while let Some(output) = self.finished.remove(&self.written) {
            self.put(output)?;
        }
        Ok(())
    }

    /// Puts the next row group in order: its chunks into the file, or its part in the list.
    fn put(&mut self, output: Output) -> Result<()> {
        let finished = || Error::InvalidInput("sink already finished".into());
        match (self.target.as_mut().ok_or_else(finished)?, output) {
            (Target::File { file, .. }, Output::Chunks(chunks, batches)) => {
                write_row_group(file, &self.layout, &batches, chunks, &mut self.spare)
                    .map_err(|e| Error::parquet(&self.path, e))?;
                start_writeback(file.inner().get_ref());
            }
            (Target::Parts { parts, .. }, Output::Part(part)) => parts.push(part),
            _ => return Err(Error::InvalidInput(format!("{}: a row group of another output", self.path.display()))),
        }
        self.written += 1;
        Ok(())
    }

    /// Encodes and writes what is left, and closes the output: the file's footer written, its
    /// buffer returned; or the parts (one without rows when there were no rows at all).
    fn finish(mut self) -> Result<Written> {
        self.cut()?;
        while self.in_flight > 0 {
            self.collect(true)?;
        }
        self.stop();
        match self.target.take().ok_or_else(|| Error::InvalidInput("sink already finished".into()))? {
            Target::File { file, .. } => {
                file.into_inner().map(Written::File).map_err(|e| Error::parquet(&self.path, e))
            }
            Target::Parts { dir, mut parts } => {
                if parts.is_empty() {
                    parts.push(write_part(&self.layout, &dir, 0, &[], &mut self.spare)?);
                }
                Ok(Written::Parts(parts))
            }
        }
    }

    fn stop(&mut self) {
        // Closing the jobs' channel ends the threads; a panic among them was already the error
        // of the row group it was encoding.
        self.jobs = None;
        let _ = self.threads.join();
    }
}

impl Drop for RowGroups {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a row group of `batches` into `file`: the chunks [`encode`] made (called with `direct`)
/// appended, and its [`Chunk::Direct`] columns written straight from the batches' values into
/// pages and on into the file (the page buffers stay in cache; no chunk of the whole row group is
/// made). The bytes are those of the chunks appended.
fn write_row_group<W: std::io::Write + Send>(
    file: &mut SerializedFileWriter<W>,
    layout: &Layout,
    batches: &[RecordBatch],
    chunks: Vec<Chunk>,
    spare: &mut Vec<Vec<u8>>,
) -> parquet::errors::Result<()> {
    let mut row_group = file.next_row_group()?;
    for chunk in chunks {
        match chunk {
            Chunk::Arrow(chunk) => chunk.append_to_row_group(&mut row_group)?,
            Chunk::Dense(bytes, close) => {
                row_group.append_column(&bytes, close)?;
                if let Ok(buffer) = bytes.try_into_mut() {
                    spare.push(Vec::from(buffer));
                }
            }
            Chunk::Direct(index, size) => {
                let more = || parquet::errors::ParquetError::General("more columns than the schema has".into());
                let mut column = row_group.next_column()?.ok_or_else(more)?;
                let mut levels = DenseLevels::new(&layout.leaves[index], size);
                for batch in batches {
                    levels.write(column.typed::<FloatType>(), batch.column(index).as_ref())?;
                }
                column.close()?;
            }
        }
    }
    row_group.close()?;
    Ok(())
}

/// A Parquet writer of rows of `stored` into a new file at `path` (errors of the Parquet layer name
/// `named`, the output the user asked for), and the factory of its row groups' column writers.
fn parquet_file(
    path: &Path,
    named: &Path,
    stored: &SchemaRef,
    props: WriterProperties,
) -> Result<(SerializedFileWriter<BufWriter<File>>, ArrowRowGroupWriterFactory)> {
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    ArrowWriter::try_new(BufWriter::with_capacity(1 << 20, file), Arc::clone(stored), Some(props))
        .and_then(ArrowWriter::into_serialized_writer)
        .map_err(|e| Error::parquet(named, e))
}

/// Starts writing `file`'s dirty pages to disk without waiting: the final `fsync` then finds
/// most of them written, and the page cache never holds more than a few row groups of the output
/// unwritten (Linux; elsewhere the system's own writeback).
pub fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: `file` is an open descriptor for the duration of the call, which only starts
        // the writeback of its pages (offset 0, length 0: to the end).
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Writes `batches` as part file `index` of `dir` (one row group, or none when there are no
/// rows), flushed to disk: its bytes depend on the rows only.
fn write_part(
    layout: &Layout,
    dir: &Path,
    index: usize,
    batches: &[RecordBatch],
    spare: &mut Vec<Vec<u8>>,
) -> Result<PathBuf> {
    let path = dir.join(format!("row-group-{index}.parquet"));
    let (mut writer, factory) = parquet_file(&path, &path, &layout.stored, layout.props.as_ref().clone())?;
    if !batches.is_empty() {
        let writers = factory.create_column_writers(0).map_err(|e| Error::parquet(&path, e))?;
        let chunks = encode(layout, batches, writers, layout.spare_buffers(spare), true)?;
        write_row_group(&mut writer, layout, batches, chunks, spare).map_err(|e| Error::parquet(&path, e))?;
    }
    let buffered = writer.into_inner().map_err(|e| Error::parquet(&path, e))?;
    let file = buffered.into_inner().map_err(|e| Error::io(&path, e.into_error()))?;
    start_writeback(&file);
    Ok(path)
}

impl Drop for ParquetSink {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            // Its threads end first: none is still writing a part into the directory.
            drop(writer);
            remove_temporary(&self.tmp, self.kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::{Float32Array, StringArray};
    use arrow_schema::{Field, Schema};

    use super::*;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("x", DataType::Float32, false),
        ]));
        let columns: Vec<arrow_array::ArrayRef> =
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

#[cfg(test)]
mod parallel_tests {
    use std::sync::Arc;

    use arrow_array::{FixedSizeListArray, Float32Array, StringArray};
    use arrow_buffer::NullBuffer;
    use arrow_schema::{Field, Schema};

    use super::*;

    /// Rows of ids and 50-gene vectors, in batches of uneven sizes.
    #[test]
    fn float16_values_read_back_within_half_precision_on_any_thread_count() -> Result<()> {
        use arrow_array::cast::AsArray;
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let all = batches();
        let mut files = Vec::new();
        for (threads, profile) in [(1, SinkProfile::Small), (3, SinkProfile::Small), (2, SinkProfile::Fast)] {
            let path = dir.path().join(format!("f16-{threads}-{profile:?}.parquet"));
            let options =
                SinkOptions { row_group_rows: 512, threads, profile, values: Values::F16, ..Default::default() };
            let mut sink = ParquetSink::create(&path, all[0].schema(), &options)?;
            for batch in &all {
                sink.write(batch)?;
            }
            sink.finish()?;
            files.push((profile, path));
        }
        let bytes = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p, e));
        assert_eq!(bytes(&files[0].1)?, bytes(&files[1].1)?, "the bytes differ between thread counts");
        let want =
            arrow_select::concat::concat_batches(&all[0].schema(), &all).map_err(|e| Error::arrow("concat", e))?;
        let want =
            want.column(1).as_fixed_size_list().values().as_primitive::<arrow_array::types::Float32Type>().clone();
        for (_, path) in &files {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 10_000)
                .map_err(|e| Error::parquet(path, e))?;
            let read: Vec<RecordBatch> =
                reader.collect::<std::result::Result<_, _>>().map_err(|e| Error::arrow("reading back", e))?;
            let got = arrow_select::concat::concat_batches(&read[0].schema(), &read)
                .map_err(|e| Error::arrow("concat", e))?;
            assert_eq!(got.num_rows(), 6761);
            let list = got.column(1).as_fixed_size_list();
            assert_eq!(list.value_type(), DataType::Float16, "{}", path.display());
            let half = list.values().as_primitive::<arrow_array::types::Float16Type>();
            for i in 0..want.len() {
                let (x, y) = (f64::from(want.value(i)), f64::from(half.value(i).to_f32()));
                // Half precision: 2^-11 relative in the normal range, 2^-25 absolute below it.
                assert!((x - y).abs() <= (x.abs() * 2f64.powi(-11)).max(2f64.powi(-25)), "value {i}: {x} as {y}");
                // Rounded as Arrow's cast rounds (to nearest, ties to even): the same bits.
                let cast = half::f16::from_f32(want.value(i));
                assert_eq!(half.value(i).to_bits(), cast.to_bits(), "value {i}: {x}");
            }
        }
        // A value float16 cannot hold: an error naming the column, and no file.
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let schema =
            Arc::new(Schema::new(vec![Field::new("mean", DataType::FixedSizeList(Arc::clone(&item), 2), false)]));
        let big = FixedSizeListArray::try_new(item, 2, Arc::new(Float32Array::from(vec![1.0, 70_000.0])), None)
            .map_err(|e| Error::arrow("batch", e))?;
        let batch =
            RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(big)]).map_err(|e| Error::arrow("batch", e))?;
        let path = dir.path().join("big.parquet");
        let options = SinkOptions { values: Values::F16, ..Default::default() };
        let mut sink = ParquetSink::create(&path, schema, &options)?;
        let err = sink.write(&batch).and_then(|()| sink.finish().map(|_| ())).err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("column mean") && err.contains("70000") && err.contains("65504"), "{err}");
        assert!(!path.exists());
        Ok(())
    }

    fn batches() -> Vec<RecordBatch> {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let schema = Arc::new(Schema::new(vec![
            Field::new("cell_id", DataType::Utf8, false),
            Field::new("mean", DataType::FixedSizeList(Arc::clone(&item), 50), false),
        ]));
        let mut first = 0usize;
        [700usize, 13, 2048, 1, 999, 3000]
            .iter()
            .map(|&n| {
                let ids = StringArray::from_iter_values((first..first + n).map(|i| format!("cell{i}")));
                let values =
                    Float32Array::from_iter_values((0..n * 50).map(|k| ((first * 50 + k) as f32 * 0.37).sin().abs()));
                first += n;
                let means = FixedSizeListArray::try_new(Arc::clone(&item), 50, Arc::new(values), None)
                    .unwrap_or_else(|e| panic!("{e}"));
                RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(ids), Arc::new(means)])
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect()
    }

    #[test]
    fn any_thread_count_writes_the_same_bytes_in_bounded_row_groups() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let mut files = Vec::new();
        for threads in [1, 2, 3, 8] {
            let path = dir.path().join(format!("t{threads}.parquet"));
            let options = SinkOptions { row_group_rows: 512, threads, ..Default::default() };
            let fast = SinkOptions { profile: SinkProfile::Fast, ..options };
            let fast_path = dir.path().join(format!("fast{threads}.parquet"));
            let all = batches();
            let mut sink = ParquetSink::create(&fast_path, all[0].schema(), &fast)?;
            for batch in &all {
                sink.write(batch)?;
            }
            sink.finish()?;
            let all = batches();
            let mut sink = ParquetSink::create(&path, all[0].schema(), &options)?;
            for batch in &all {
                sink.write(batch)?;
            }
            let summary = sink.finish()?;
            assert_eq!(summary.rows, 6761);
            assert_eq!(summary.row_groups, 6761usize.div_ceil(512), "{threads} threads");
            files.push(std::fs::read(&path).map_err(|e| Error::io(&path, e))?);
        }
        assert!(files.windows(2).all(|w| w[0] == w[1]), "the bytes differ between thread counts");
        let fast: Vec<Vec<u8>> = [1, 2, 3, 8]
            .iter()
            .map(|t| {
                let path = dir.path().join(format!("fast{t}.parquet"));
                std::fs::read(&path).map_err(|e| Error::io(&path, e))
            })
            .collect::<Result<_>>()?;
        assert!(fast.windows(2).all(|w| w[0] == w[1]), "the fast profile's bytes differ between thread counts");
        assert_ne!(fast[0], files[0], "the profiles write the same file");
        // And the files read back as written, rows in order.
        let all = batches();
        let want =
            arrow_select::concat::concat_batches(&all[0].schema(), &all).map_err(|e| Error::arrow("concat", e))?;
        for name in ["t8.parquet", "fast8.parquet"] {
            let path = dir.path().join(name);
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 10_000)
                .map_err(|e| Error::parquet(&path, e))?;
            let read: Vec<RecordBatch> =
                reader.collect::<std::result::Result<_, _>>().map_err(|e| Error::arrow("reading back", e))?;
            let got = arrow_select::concat::concat_batches(&read[0].schema(), &read)
                .map_err(|e| Error::arrow("concat", e))?;
            assert_eq!(got.columns(), want.columns(), "{name}");
        }
        Ok(())
    }

    /// Reads every row of a Parquet file.
    fn read_rows(path: &Path) -> Result<Vec<RecordBatch>> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 10_000)
            .map_err(|e| Error::parquet(path, e))?;
        reader.collect::<std::result::Result<_, _>>().map_err(|e| Error::arrow("reading back", e))
    }

    /// The files of a directory, by name.
    fn listing(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .map(|entry| {
                let path = entry.map_err(|e| Error::io(dir, e))?.path();
                let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
                Ok((path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), bytes))
            })
            .collect::<Result<_>>()?;
        files.sort();
        Ok(files)
    }

    /// A directory of parts: one row group a part, named in row order, the same bytes for any
    /// thread count and profile-for-profile, holding the rows of the single file in order.
    #[test]
    fn parts_are_the_same_for_any_thread_count_and_hold_the_rows_in_order() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let all = batches();
        let want =
            arrow_select::concat::concat_batches(&all[0].schema(), &all).map_err(|e| Error::arrow("concat", e))?;
        for (profile, values) in
            [(SinkProfile::Small, Values::F32), (SinkProfile::Fast, Values::F32), (SinkProfile::Fast, Values::F16)]
        {
            let mut listings = Vec::new();
            for threads in [1, 2, 3, 8] {
                let path = dir.path().join(format!("parts-{profile:?}-{values:?}-{threads}"));
                let options =
                    SinkOptions { row_group_rows: 512, threads, profile, values, parts: true, ..Default::default() };
                let mut sink = ParquetSink::create(&path, all[0].schema(), &options)?;
                for batch in &all {
                    sink.write(batch)?;
                }
                assert!(!path.exists(), "nothing at the final path before finish");
                let summary = sink.finish()?;
                let groups = 6761usize.div_ceil(512);
                assert_eq!((summary.rows, summary.row_groups, summary.files), (6761, groups, groups));
                let files = listing(&path)?;
                assert_eq!(summary.bytes, files.iter().map(|(_, b)| b.len() as u64).sum::<u64>());
                assert_eq!(files[0].0, "part-00-of-14.parquet");
                assert_eq!(files[13].0, "part-13-of-14.parquet");
                listings.push(files);
            }
            assert!(
                listings.windows(2).all(|w| w[0] == w[1]),
                "{profile:?} {values:?}: parts differ between thread counts"
            );
            if values == Values::F32 {
                let path = dir.path().join(format!("parts-{profile:?}-{values:?}-1"));
                let mut read = Vec::new();
                for (name, _) in &listings[0] {
                    let rows = read_rows(&path.join(name))?;
                    assert_eq!(
                        rows.iter().map(RecordBatch::num_rows).sum::<usize>(),
                        if name.starts_with("part-13") { 6761 - 13 * 512 } else { 512 }
                    );
                    read.extend(rows);
                }
                let got = arrow_select::concat::concat_batches(&read[0].schema(), &read)
                    .map_err(|e| Error::arrow("concat", e))?;
                assert_eq!(got.columns(), want.columns(), "{profile:?}: the parts' rows in order are the rows written");
            }
        }
        // No temporary left beside the outputs.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .map_err(|e| Error::io(dir.path(), e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("parts-")), "{names:?}");
        Ok(())
    }

    /// No rows: one part without row groups (readers find the schema); a dropped sink leaves
    /// nothing; an existing directory is replaced only when asked, a file never.
    #[test]
    fn parts_when_empty_dropped_or_in_the_way() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let all = batches();
        let options = SinkOptions { row_group_rows: 512, threads: 2, parts: true, ..Default::default() };
        let path = dir.path().join("empty");
        let summary = ParquetSink::create(&path, all[0].schema(), &options)?.finish()?;
        assert_eq!((summary.rows, summary.row_groups, summary.files), (0, 0, 1));
        let rows = read_rows(&path.join("part-0-of-1.parquet"))?;
        assert_eq!(rows.iter().map(RecordBatch::num_rows).sum::<usize>(), 0);

        let dropped = dir.path().join("dropped");
        let mut sink = ParquetSink::create(&dropped, all[0].schema(), &options)?;
        for batch in &all {
            sink.write(batch)?;
        }
        drop(sink);
        assert!(!dropped.exists());
        let left: Vec<_> = std::fs::read_dir(dir.path()).map_err(|e| Error::io(dir.path(), e))?.flatten().collect();
        assert_eq!(left.len(), 1, "only the empty output: {left:?}");

        // An existing directory: refused, then replaced with --overwrite.
        assert!(matches!(ParquetSink::create(&path, all[0].schema(), &options), Err(Error::OutputExists { .. })));
        let overwrite = SinkOptions { overwrite: true, ..options };
        let mut sink = ParquetSink::create(&path, all[0].schema(), &overwrite)?;
        sink.write(&all[0])?;
        assert_eq!(sink.finish()?.files, 2);
        assert_eq!(listing(&path)?.len(), 2, "the empty output's part is gone");
        // A regular file where the directory would go is never replaced.
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").map_err(|e| Error::io(&file, e))?;
        let refused = ParquetSink::create(&file, all[0].schema(), &overwrite);
        assert!(refused.is_err_and(|e| e.to_string().contains("is a regular file")));
        Ok(())
    }

    /// Float vectors take the direct path when dense (required or nullable fields alike) and the
    /// Arrow writer's when a row or a value is null; every column reads back as written, across
    /// row groups that cut batches.
    #[test]
    fn dense_and_null_float_vectors_read_back_as_written() -> Result<()> {
        let required = Arc::new(Field::new("item", DataType::Float32, false));
        let nullable = Arc::new(Field::new("item", DataType::Float32, true));
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::FixedSizeList(Arc::clone(&required), 7), false),
            Field::new("b", DataType::FixedSizeList(Arc::clone(&nullable), 3), true),
            Field::new("c", DataType::FixedSizeList(Arc::clone(&nullable), 2), true),
        ]));
        let list = |item: &Arc<Field>, size: usize, n: usize, seed: usize, nulls: Option<NullBuffer>| {
            let values = Float32Array::from_iter_values((0..n * size).map(|k| ((seed + k) as f32 * 0.61).cos()));
            FixedSizeListArray::try_new(Arc::clone(item), size as i32, Arc::new(values), nulls)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let batches: Vec<RecordBatch> = [300usize, 1, 517, 64]
            .iter()
            .enumerate()
            .map(|(b, &n)| {
                let c_nulls = (b == 2).then(|| NullBuffer::from_iter((0..n).map(|i| i % 5 != 0)));
                RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![
                        Arc::new(list(&required, 7, n, b * 1000, None)),
                        Arc::new(list(&nullable, 3, n, b * 2000, None)),
                        Arc::new(list(&nullable, 2, n, b * 3000, c_nulls)),
                    ],
                )
                .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let want = arrow_select::concat::concat_batches(&schema, &batches).map_err(|e| Error::arrow("concat", e))?;
        for (profile, threads) in [(SinkProfile::Fast, 1), (SinkProfile::Small, 3)] {
            let path = dir.path().join(format!("{profile:?}.parquet"));
            let options = SinkOptions { row_group_rows: 200, threads, profile, ..Default::default() };
            let mut sink = ParquetSink::create(&path, Arc::clone(&schema), &options)?;
            for batch in &batches {
                sink.write(batch)?;
            }
            sink.finish()?;
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 10_000)
                .map_err(|e| Error::parquet(&path, e))?;
            let read: Vec<RecordBatch> =
                reader.collect::<std::result::Result<_, _>>().map_err(|e| Error::arrow("reading back", e))?;
            let got = arrow_select::concat::concat_batches(&read[0].schema(), &read)
                .map_err(|e| Error::arrow("concat", e))?;
            assert_eq!(got.columns(), want.columns(), "{profile:?}");
            assert_eq!(got.column(2).null_count(), 517usize.div_ceil(5), "{profile:?}");
        }
        Ok(())
    }

    #[test]
    fn wide_rows_make_smaller_row_groups() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let path = dir.path().join("wide.parquet");
        // About 200 bytes of Arrow data a row, at most 64 KiB a row group: a few hundred rows.
        let options = SinkOptions { row_group_bytes: 64 << 10, threads: 2, ..Default::default() };
        let all = batches();
        let mut sink = ParquetSink::create(&path, all[0].schema(), &options)?;
        for batch in &all {
            sink.write(batch)?;
        }
        let summary = sink.finish()?;
        assert!(summary.row_groups >= 6761 * 200 / (64 << 10), "{} row groups", summary.row_groups);
        Ok(())
    }
}
