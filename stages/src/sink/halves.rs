//! Columns of dense float vectors written as float16 (`--values f16`), page by page.
//!
//! The parquet crate writes FLOAT16 as 2-byte fixed-length byte arrays, each value its own
//! buffer: on a prediction of 5,000 genes that encoded about 90-120 MB/s of float32 a thread,
//! ten times slower than the float32 columns. The column is simple enough to lay out directly:
//! every row has the vector's length and no value is null, so the repetition levels are a 0
//! followed by 1s in every row and the definition levels all the deepest; both are run-length
//! runs, the same for every page of the same rows. The values are the float32 values rounded to
//! float16 in bulk (F16C where the CPU has it), stored plain. Pages are data pages (format
//! version 1, as the crate writes them) of at most the writer properties' page size, compressed
//! with the column's codec (none, or zstd for the small profile), and go through the crate's page
//! writer, which writes their headers. What the file's reader sees is what the crate's own
//! FLOAT16 column would hold: the same type, encoding, levels and values.

use std::sync::Arc;

use arrow_array::Array;

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_schema::{DataType, Field};
use bytes::Bytes;
use half::f16;
use half::slice::HalfFloatSliceExt;
use parquet::basic::{Compression, Encoding, Type as PhysicalType};
use parquet::column::page::{CompressedPage, Page, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::file::metadata::ColumnChunkMetaData;
use parquet::file::properties::WriterPropertiesPtr;
use parquet::file::writer::{SerializedPageWriter, TrackedWrite};
use parquet::schema::types::{ColumnDescPtr, ColumnDescriptor};

use crate::error::{Error, Result};

/// float16's largest finite value is 65504; a float32 from 65520 on rounds to infinity.
const OVERFLOW: f32 = 65_520.0;

/// The size of the vectors when file field `index` is a `FixedSizeList<Float16>` whose rows
/// arrive as `FixedSizeList<Float32>` without nulls in every batch (the predictor's means written
/// as float16), its leaf a repeated 2-byte fixed-length byte array.
pub(super) fn dense_halves(
    field: &Field,
    leaf: &ColumnDescriptor,
    index: usize,
    batches: &[RecordBatch],
) -> Option<usize> {
    let DataType::FixedSizeList(item, size) = field.data_type() else { return None };
    let size = usize::try_from(*size).ok().filter(|&s| s > 0)?;
    if item.data_type() != &DataType::Float16
        || leaf.physical_type() != PhysicalType::FIXED_LEN_BYTE_ARRAY
        || leaf.type_length() != 2
        || leaf.max_rep_level() != 1
    {
        return None;
    }
    let dense = batches.iter().all(|batch| {
        let column = batch.column(index);
        column.null_count() == 0
            && column.as_fixed_size_list_opt().is_some_and(|list| {
                list.value_length() as usize == size
                    && list.values().null_count() == 0
                    && list.values().data_type() == &DataType::Float32
            })
    });
    dense.then_some(size)
}

/// The writer of a [`dense_halves`] column: whole rows into pages of float16 values.
pub(super) struct DenseHalves<'a> {
    pages: SerializedPageWriter<'a, Vec<u8>>,
    leaf: ColumnDescPtr,
    name: Arc<str>,
    compression: Compression,
    size: usize,
    /// Rows a page holds.
    page_rows: usize,
    /// The page being filled: its values as float16 bytes, and its rows.
    values: Vec<u8>,
    rows: usize,
    halves: Vec<f16>,
    /// Reused for each page: its data before compression.
    data: Vec<u8>,
    /// The column chunk so far.
    rows_written: u64,
    values_written: i64,
    compressed: i64,
    uncompressed: i64,
    first_page: Option<u64>,
}

impl<'a> DenseHalves<'a> {
    pub(super) fn new(
        leaf: &ColumnDescPtr,
        props: &WriterPropertiesPtr,
        buffer: &'a mut TrackedWrite<Vec<u8>>,
        size: usize,
        name: &str,
    ) -> DenseHalves<'a> {
        let page_rows = (props.data_page_size_limit() / (2 * size)).max(1);
        DenseHalves {
            pages: SerializedPageWriter::new(buffer),
            leaf: Arc::clone(leaf),
            name: Arc::from(name),
            compression: props.compression(leaf.path()),
            size,
            page_rows,
            values: Vec::with_capacity(page_rows * size * 2),
            rows: 0,
            halves: Vec::new(),
            data: Vec::new(),
            rows_written: 0,
            values_written: 0,
            compressed: 0,
            uncompressed: 0,
            first_page: None,
        }
    }

    /// Appends the rows of a `FixedSizeList<Float32>` column.
    pub(super) fn write(&mut self, array: &dyn Array) -> Result<()> {
        let values = array
            .as_fixed_size_list_opt()
            .and_then(|list| list.values().as_primitive_opt::<Float32Type>())
            .ok_or_else(|| Error::InvalidInput(format!("column {}: a dense float column changed type", self.name)))?;
        let mut rest = values.values().as_ref();
        while !rest.is_empty() {
            let take = ((self.page_rows - self.rows) * self.size).min(rest.len());
            let (part, after) = rest.split_at(take);
            if let Some(v) = part.iter().find(|v| v.is_finite() && v.abs() >= OVERFLOW) {
                return Err(Error::InvalidInput(format!(
                    "column {}: value {v} is beyond float16's largest, 65504: write float32 values (--values f32)",
                    self.name
                )));
            }
            self.halves.resize(part.len(), f16::ZERO);
            self.halves.convert_from_f32_slice(part);
            if cfg!(target_endian = "little") {
                self.values.extend_from_slice(bytemuck::cast_slice(self.halves.reinterpret_cast()));
            } else {
                self.values.extend(self.halves.iter().flat_map(|h| h.to_le_bytes()));
            }
            self.rows += part.len() / self.size;
            rest = after;
            if self.rows == self.page_rows {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Writes the page being filled.
    fn flush(&mut self) -> Result<()> {
        if self.rows == 0 {
            return Ok(());
        }
        let context = |e: parquet::errors::ParquetError| Error::InvalidInput(format!("column {}: {e}", self.name));
        let rows = self.rows as u64;
        let count = rows * self.size as u64;
        self.data.clear();
        // Repetition levels: each row a 0 and then 1s (a single 0 run for vectors of one value).
        let runs = if self.size == 1 { vec![(rows, 0)] } else { vec![(1, 0), (self.size as u64 - 1, 1)] };
        let mut levels = Vec::new();
        for _ in 0..if self.size == 1 { 1 } else { rows } {
            for &(length, value) in &runs {
                push_run(&mut levels, length, value);
            }
        }
        push_section(&mut self.data, &levels);
        // Definition levels: every value present, at the deepest level.
        let deepest = self.leaf.max_def_level();
        if deepest > 0 {
            levels.clear();
            push_run(&mut levels, count, deepest as u8);
            push_section(&mut self.data, &levels);
        }
        self.data.extend_from_slice(&self.values);
        let uncompressed = self.data.len();
        let buf = match self.compression {
            Compression::UNCOMPRESSED => Bytes::copy_from_slice(&self.data),
            Compression::ZSTD(level) => Bytes::from(
                zstd::bulk::compress(&self.data, level.compression_level())
                    .map_err(|e| Error::InvalidInput(format!("column {}: zstd: {e}", self.name)))?,
            ),
            other => {
                return Err(Error::InvalidInput(format!("column {}: float16 pages with {other}", self.name)));
            }
        };
        let page = Page::DataPage {
            buf,
            num_values: u32::try_from(count)
                .map_err(|_| Error::InvalidInput(format!("column {}: a page of {count} values", self.name)))?,
            encoding: Encoding::PLAIN,
            def_level_encoding: Encoding::RLE,
            rep_level_encoding: Encoding::RLE,
            statistics: None,
        };
        let spec = self.pages.write_page(CompressedPage::new(page, uncompressed)).map_err(context)?;
        self.first_page.get_or_insert(spec.offset);
        self.compressed += spec.compressed_size as i64;
        self.uncompressed += spec.uncompressed_size as i64;
        self.rows_written += rows;
        self.values_written += count as i64;
        self.values.clear();
        self.rows = 0;
        Ok(())
    }

    /// Writes the last page and returns what the row group needs to place the chunk.
    pub(super) fn close(mut self) -> Result<ColumnCloseResult> {
        self.flush()?;
        let context = |e: parquet::errors::ParquetError| Error::InvalidInput(format!("column {}: {e}", self.name));
        self.pages.close().map_err(context)?;
        let metadata = ColumnChunkMetaData::builder(Arc::clone(&self.leaf))
            .set_compression(self.compression)
            .set_encodings(vec![Encoding::PLAIN, Encoding::RLE])
            .set_num_values(self.values_written)
            .set_total_compressed_size(self.compressed)
            .set_total_uncompressed_size(self.uncompressed)
            .set_data_page_offset(self.first_page.unwrap_or(0) as i64)
            .build()
            .map_err(context)?;
        Ok(ColumnCloseResult {
            bytes_written: self.compressed as u64,
            rows_written: self.rows_written,
            metadata,
            bloom_filter: None,
            column_index: None,
            offset_index: None,
        })
    }
}

/// Appends a run of the RLE/bit-packing hybrid: `length` times `value` (levels of at most 8 bits:
/// one byte).
fn push_run(out: &mut Vec<u8>, length: u64, value: u8) {
    let mut header = length << 1;
    while header >= 0x80 {
        out.push((header as u8 & 0x7f) | 0x80);
        header >>= 7;
    }
    out.push(header as u8);
    out.push(value);
}

/// Appends a level section of a version 1 data page: its length (4 bytes, little-endian), then it.
fn push_section(out: &mut Vec<u8>, levels: &[u8]) {
    out.extend_from_slice(&(levels.len() as u32).to_le_bytes());
    out.extend_from_slice(levels);
}
