//! Encoding a row group's rows into column chunks: dense float vector columns by hand (their
//! levels made once, the values written straight from the Arrow buffers), the others with the
//! Arrow writer.

use std::sync::Arc;

use arrow_array::{Array, RecordBatch};

use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_schema::{DataType, Field};
use bytes::Bytes;
use parquet::arrow::arrow_writer::{ArrowColumnChunk, ArrowColumnWriter, compute_leaves};
use parquet::basic::Type as PhysicalType;
use parquet::column::writer::{ColumnCloseResult, ColumnWriterImpl, get_column_writer, get_typed_column_writer};
use parquet::data_type::FloatType;
use parquet::file::properties::WriterPropertiesPtr;
use parquet::file::writer::{SerializedPageWriter, TrackedWrite};
use parquet::schema::types::{ColumnDescPtr, ColumnDescriptor};

use super::{Chunk, Layout, narrow};
use crate::error::{Error, Result};

/// Encodes one row group's rows into its column chunks: columns of dense float vectors directly
/// ([`dense_floats`]), the others with the Arrow writer.
///
/// With `direct`, dense float32 columns are left for the caller to write straight into its file
/// ([`Chunk::Direct`]): no chunk buffer holds their values in between.
pub(super) fn encode(
    layout: &Layout,
    batches: &[RecordBatch],
    writers: Vec<ArrowColumnWriter>,
    mut spare: Vec<Vec<u8>>,
    direct: bool,
) -> Result<Vec<Chunk>> {
    let context = |e: parquet::errors::ParquetError| Error::InvalidInput(format!("encoding a row group: {e}"));
    let fields = layout.stored.fields();
    // One Parquet leaf per field (no structs or maps): the leaves line up with the fields.
    let aligned = layout.leaves.len() == fields.len() && writers.len() == fields.len();
    // Columns of dense float vectors, written as they are (float32) or rounded (float16).
    let dense: Vec<Dense> = fields
        .iter()
        .enumerate()
        .map(|(i, field)| {
            if !aligned {
                return Dense::No;
            }
            if let Some(size) = dense_floats(field, &layout.leaves[i], i, batches) {
                return if direct { Dense::Direct(size) } else { Dense::Floats(size) };
            }
            super::halves::dense_halves(field, &layout.leaves[i], i, batches).map_or(Dense::No, Dense::Halves)
        })
        .collect();
    // A dense column's chunk is its values plus page headers and levels (run-length encoded:
    // a few bytes a row): sized once, so that it never grows by copying.
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let mut buffers: Vec<TrackedWrite<Vec<u8>>> = dense
        .iter()
        .filter_map(|d| match *d {
            Dense::Floats(size) => Some(size * 4),
            Dense::Halves(size) => Some(size * 2),
            Dense::No | Dense::Direct(_) => None,
        })
        .map(|row_bytes| {
            let mut buffer = spare.pop().unwrap_or_default();
            buffer.clear();
            buffer.reserve(rows * (row_bytes + 16) + (64 << 10));
            TrackedWrite::new(buffer)
        })
        .collect();
    let mut free = buffers.iter_mut();
    let mut columns = Vec::with_capacity(writers.len());
    for (i, writer) in writers.into_iter().enumerate() {
        let kind = dense.get(i).copied().unwrap_or(Dense::No);
        columns.push(match kind {
            Dense::No => Column::Arrow(Box::new(writer)),
            Dense::Direct(size) => Column::Direct(i, size),
            Dense::Floats(size) | Dense::Halves(size) => {
                let lost = || Error::InvalidInput("encoding a row group: a lost buffer".into());
                let buffer = free.next().ok_or_else(lost)?;
                let (leaf, props) = (&layout.leaves[i], &layout.props);
                if kind == Dense::Floats(size) {
                    Column::Dense(Box::new(DenseFloats::new(leaf, props, buffer, size)))
                } else {
                    Column::Halves(Box::new(super::halves::DenseHalves::new(
                        leaf,
                        props,
                        buffer,
                        size,
                        fields[i].name(),
                    )))
                }
            }
        });
    }
    for batch in batches {
        let mut columns = columns.iter_mut();
        let more_leaves = || Error::InvalidInput("encoding a row group: more leaves than writers".into());
        for (field, array) in fields.iter().zip(batch.columns()) {
            let dense_next =
                matches!(columns.as_slice().first(), Some(Column::Dense(_) | Column::Halves(_) | Column::Direct(..)));
            if aligned && dense_next {
                match columns.next() {
                    Some(Column::Dense(dense)) => dense.write(array).map_err(context)?,
                    Some(Column::Halves(halves)) => halves.write(array)?,
                    Some(Column::Direct(..)) => {}
                    _ => return Err(more_leaves()),
                }
                continue;
            }
            // Cast here, on the encoding thread: float16 output costs the writer no time.
            let narrowed;
            let array = if array.data_type() == field.data_type() {
                array
            } else {
                narrowed = narrow(array, field)?;
                &narrowed
            };
            for leaf in compute_leaves(field, array).map_err(context)? {
                let Some(Column::Arrow(writer)) = columns.next() else { return Err(more_leaves()) };
                writer.write(&leaf).map_err(context)?;
            }
        }
    }
    // Closing a dense column ends its borrow of its buffer; the buffers become chunks after.
    let mut closed = Vec::with_capacity(columns.len());
    for column in columns {
        closed.push(match column {
            Column::Arrow(writer) => Closed::Arrow(writer.close().map_err(context)?),
            Column::Dense(dense) => Closed::Dense(dense.writer.close().map_err(context)?),
            Column::Halves(halves) => Closed::Dense(halves.close()?),
            Column::Direct(index, size) => Closed::Direct(index, size),
        });
    }
    let mut buffers = buffers.into_iter();
    closed
        .into_iter()
        .map(|column| match column {
            Closed::Arrow(chunk) => Ok(Chunk::Arrow(chunk)),
            Closed::Direct(index, size) => Ok(Chunk::Direct(index, size)),
            Closed::Dense(close) => {
                let buffer =
                    buffers.next().ok_or_else(|| Error::InvalidInput("encoding a row group: a lost buffer".into()))?;
                Ok(Chunk::Dense(Bytes::from(buffer.into_inner().map_err(context)?), close))
            }
        })
        .collect()
}

/// How a column is encoded: by the Arrow writer, or as dense float vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dense {
    No,
    /// [`dense_floats`]: vectors of this size.
    Floats(usize),
    /// [`halves::dense_halves`]: vectors of this size, written as float16.
    Halves(usize),
    /// [`dense_floats`], left to the caller to write into its file ([`Chunk::Direct`]).
    Direct(usize),
}

/// A column of a row group being encoded.
enum Column<'a> {
    Arrow(Box<ArrowColumnWriter>),
    Dense(Box<DenseFloats<'a>>),
    Halves(Box<super::halves::DenseHalves<'a>>),
    /// Field index and vector size of a column left to the caller.
    Direct(usize, usize),
}

/// A column of a row group encoded, its writer closed.
enum Closed {
    Arrow(ArrowColumnChunk),
    Dense(ColumnCloseResult),
    Direct(usize, usize),
}

/// The size of the vectors when field `index` is a `FixedSizeList<Float32>` without nulls in
/// every batch (the predictor's means): its Parquet leaf is a repeated float whose levels are the
/// same for every row, so they are written once and its values go to the column writer as they
/// are, without the Arrow writer's per-value level computation (most of its time on such a column).
fn dense_floats(field: &Field, leaf: &ColumnDescriptor, index: usize, batches: &[RecordBatch]) -> Option<usize> {
    let DataType::FixedSizeList(item, size) = field.data_type() else { return None };
    let size = usize::try_from(*size).ok().filter(|&s| s > 0)?;
    if item.data_type() != &DataType::Float32
        || leaf.physical_type() != PhysicalType::FLOAT
        || leaf.max_rep_level() != 1
    {
        return None;
    }
    let dense = batches.iter().all(|batch| {
        let column = batch.column(index);
        column.null_count() == 0 && column.as_fixed_size_list_opt().is_some_and(|list| list.values().null_count() == 0)
    });
    dense.then_some(size)
}

/// Values per call of the column writer on a [`dense_floats`] column (whole rows, at least one):
/// the levels of that many values are made once and shared by every call.
const DENSE_CHUNK_VALUES: usize = 1 << 16;

/// The column writer of a [`dense_floats`] column, with the levels of a chunk of rows.
struct DenseFloats<'a> {
    writer: ColumnWriterImpl<'a, FloatType>,
    levels: DenseLevels,
}

impl<'a> DenseFloats<'a> {
    fn new(
        leaf: &ColumnDescPtr,
        props: &WriterPropertiesPtr,
        buffer: &'a mut TrackedWrite<Vec<u8>>,
        size: usize,
    ) -> DenseFloats<'a> {
        let pages = Box::new(SerializedPageWriter::new(buffer));
        let writer =
            get_typed_column_writer::<FloatType>(get_column_writer(Arc::clone(leaf), Arc::clone(props), pages));
        DenseFloats { writer, levels: DenseLevels::new(leaf, size) }
    }

    fn write(&mut self, array: &dyn Array) -> parquet::errors::Result<()> {
        self.levels.write(&mut self.writer, array)
    }
}

/// The levels of a chunk of rows of a [`dense_floats`] column, made once, and the writing of its
/// values with them into any column writer.
pub(super) struct DenseLevels {
    /// Values per call: whole rows.
    chunk: usize,
    definition: Vec<i16>,
    repetition: Vec<i16>,
}

impl DenseLevels {
    pub(super) fn new(leaf: &ColumnDescriptor, size: usize) -> DenseLevels {
        let chunk = (DENSE_CHUNK_VALUES / size).max(1) * size;
        // Every value is present (the deepest level); a row's first value starts a new record.
        let definition = vec![leaf.max_def_level(); chunk];
        let repetition = (0..chunk).map(|k| if k % size == 0 { 0 } else { leaf.max_rep_level() }).collect();
        DenseLevels { chunk, definition, repetition }
    }

    pub(super) fn write(
        &mut self,
        writer: &mut ColumnWriterImpl<'_, FloatType>,
        array: &dyn Array,
    ) -> parquet::errors::Result<()> {
        let values = array
            .as_fixed_size_list_opt()
            .and_then(|list| list.values().as_primitive_opt::<Float32Type>())
            .ok_or_else(|| parquet::errors::ParquetError::General("a dense float column changed type".into()))?;
        for part in values.values().chunks(self.chunk) {
            let n = part.len();
            writer.write_batch(part, Some(&self.definition[..n]), Some(&self.repetition[..n]))?;
        }
        Ok(())
    }
}
