//! Parquet cell tables: one row per cell, its expressed genes and their counts as two list
//! columns beside the cell's metadata (the layout of Hugging Face single-cell datasets such as
//! Tahoe-100M: `genes` holds token ids of a gene vocabulary, `expressions` the counts), read by
//! row group in bounded memory.
//!
//! The genes' names come from a vocabulary table ([`Vocabulary`]): a Parquet file with a row per
//! gene, an id column that the lists refer to and a name column. Every other scalar column of
//! the cells becomes an `obs` column; list, struct and binary columns are left out (and named).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, RecordBatchReader, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Float32Type, Int64Type, Schema, SchemaRef};
use cpa_stream_schemas::tables::{CELL_ID, GENE_ID};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use crate::csr::CsrBatch;
use crate::error::{Error, Result};

/// How a cell table lays out its cells.
#[derive(Debug, Clone, PartialEq)]
pub struct CellTableLayout {
    /// The list column of each cell's genes (ids of the vocabulary, or gene names).
    pub genes: String,
    /// The list column of each cell's counts, one per gene.
    pub counts: String,
    /// The column of cell ids; `None`: `cell_id` if the table has one, else the row number.
    pub cell_id: Option<String>,
    /// Entries holding this count are markers, not genes, and are left out (Tahoe-100M opens
    /// every cell with a token whose count is -2).
    pub marker: Option<f32>,
}

impl Default for CellTableLayout {
    fn default() -> Self {
        CellTableLayout { genes: "genes".to_owned(), counts: "expressions".to_owned(), cell_id: None, marker: None }
    }
}

/// The genes of cell tables: the `var` table (first column `gene_id`), and the row of each id
/// that the tables' gene lists use.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    /// The file.
    pub path: PathBuf,
    /// One row per gene, first column `gene_id` (the name column), then the file's columns.
    pub var: RecordBatch,
    ids: HashMap<GeneRef, u32>,
}

/// How a gene list names a gene.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum GeneRef {
    Id(i64),
    Name(String),
}

impl Vocabulary {
    /// Reads the vocabulary table `path` (Parquet): genes are named by `name_column` (default:
    /// `gene_id`, `gene_symbol`, `gene_name` or `ensembl_id`, the first there is) and lists
    /// refer to them by `id_column` (default: `token_id` if there is one, else the names).
    pub fn read(path: &Path, name_column: Option<&str>, id_column: Option<&str>) -> Result<Vocabulary> {
        let reader = builder(path)?.build().map_err(|e| Error::parquet(path, e))?;
        let schema = reader.schema();
        let batches = reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::arrow(path.display().to_string(), e))?;
        let table = arrow::compute::concat_batches(&schema, &batches)
            .map_err(|e| Error::arrow(path.display().to_string(), e))?;
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let pick = |asked: Option<&str>, defaults: &[&str], what: &str| -> Result<Option<usize>> {
            match asked {
                Some(name) => schema.index_of(name).map(Some).map_err(|_| {
                    Error::InvalidInput(format!(
                        "{}: no {what} column {name:?}; its columns: {}",
                        path.display(),
                        names.join(", ")
                    ))
                }),
                None => Ok(defaults.iter().find_map(|d| schema.index_of(d).ok())),
            }
        };
        let name_at = pick(name_column, &[GENE_ID, "gene_symbol", "gene_name", "ensembl_id"], "gene name")?
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{}: which column names the genes? none of gene_id, gene_symbol, gene_name, ensembl_id; its \
                     columns: {} (--gene-key names it)",
                    path.display(),
                    names.join(", ")
                ))
            })?;
        let id_at = pick(id_column, &["token_id"], "gene id")?;
        let context = |c: usize| format!("{}: column {:?}", path.display(), names[c]);
        let gene_names = cast(table.column(name_at), &DataType::Utf8).map_err(|e| Error::arrow(context(name_at), e))?;
        if gene_names.null_count() > 0 {
            return Err(Error::InvalidInput(format!("{}: genes without a name", context(name_at))));
        }
        let mut ids = HashMap::with_capacity(table.num_rows());
        let mut add = |key: GeneRef, row: usize| -> Result<()> {
            match ids.insert(key.clone(), row as u32) {
                Some(_) => Err(Error::InvalidInput(format!("{}: gene {key:?} appears twice", path.display()))),
                None => Ok(()),
            }
        };
        match id_at {
            Some(c) => {
                let values = cast(table.column(c), &DataType::Int64).map_err(|e| Error::arrow(context(c), e))?;
                for (row, id) in values.as_primitive::<Int64Type>().iter().enumerate() {
                    let id = id.ok_or_else(|| Error::InvalidInput(format!("{}: gene {row} has no id", context(c))))?;
                    add(GeneRef::Id(id), row)?;
                }
            }
            None => {
                for (row, name) in gene_names.as_string::<i32>().iter().enumerate() {
                    add(GeneRef::Name(name.unwrap_or_default().to_owned()), row)?;
                }
            }
        }
        let mut fields: Vec<FieldRef> = vec![Arc::new(Field::new(GENE_ID, DataType::Utf8, false))];
        let mut columns: Vec<ArrayRef> = vec![gene_names];
        for (c, field) in schema.fields().iter().enumerate() {
            if c != name_at && field.name() != GENE_ID && scalar_type(field.data_type()).is_some() {
                let to = scalar_type(field.data_type()).unwrap_or(DataType::Utf8);
                fields.push(Arc::new(Field::new(field.name(), to.clone(), true)));
                columns.push(cast(table.column(c), &to).map_err(|e| Error::arrow(context(c), e))?);
            }
        }
        let var = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .map_err(|e| Error::arrow(path.display().to_string(), e))?;
        Ok(Vocabulary { path: path.to_owned(), var, ids })
    }

    /// Genes.
    pub fn len(&self) -> usize {
        self.var.num_rows()
    }

    /// Whether there is no gene.
    pub fn is_empty(&self) -> bool {
        self.var.num_rows() == 0
    }
}

/// The type an `obs` column of a cell table gets, `None` for a column left out.
fn scalar_type(data_type: &DataType) -> Option<DataType> {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Some(DataType::Utf8),
        DataType::Dictionary(_, values) if scalar_type(values) == Some(DataType::Utf8) => Some(DataType::Utf8),
        DataType::Boolean => Some(DataType::Boolean),
        t if t.is_integer() => Some(DataType::Int64),
        t if t.is_floating() => Some(DataType::Float64),
        _ => None,
    }
}

/// A Parquet cell table opened for import.
#[derive(Debug)]
pub struct CellTable {
    path: PathBuf,
    n_obs: u64,
    /// Positions in the file of the columns read: genes, counts, cell ids, then the obs columns.
    read: Vec<usize>,
    genes: String,
    counts: String,
    cell_id: Option<String>,
    /// obs columns: name and type in the store.
    columns: Vec<(String, DataType)>,
    obs_schema: SchemaRef,
    skipped: Vec<String>,
    marker: Option<f32>,
}

impl CellTable {
    /// Opens `path` (a regular file) and checks its columns against `layout`.
    pub fn open(path: &Path, layout: &CellTableLayout) -> Result<CellTable> {
        let builder = builder(path)?;
        let schema = Arc::clone(builder.schema());
        let n_obs = builder.metadata().file_metadata().num_rows().max(0) as u64;
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let column = |name: &str, what: &str| -> Result<usize> {
            schema.index_of(name).map_err(|_| {
                Error::InvalidInput(format!(
                    "{}: no {what} column {name:?}; its columns: {} (--genes-column, --counts-column name them)",
                    path.display(),
                    names.join(", ")
                ))
            })
        };
        let genes = column(&layout.genes, "gene list")?;
        let counts = column(&layout.counts, "count list")?;
        for (c, what) in [(genes, "gene list"), (counts, "count list")] {
            let field = schema.field(c);
            if !matches!(field.data_type(), DataType::List(_) | DataType::LargeList(_) | DataType::ListView(_)) {
                return Err(Error::InvalidInput(format!(
                    "{}: column {:?} ({what}) is {}, expected a list",
                    path.display(),
                    field.name(),
                    field.data_type()
                )));
            }
        }
        let cell_id = match &layout.cell_id {
            Some(name) => Some(column(name, "cell id")?),
            None => schema.index_of(CELL_ID).ok(),
        };
        let mut fields = vec![Field::new(CELL_ID, DataType::Utf8, false)];
        let (mut columns, mut skipped) = (Vec::new(), Vec::new());
        for (c, field) in schema.fields().iter().enumerate() {
            if c == genes || c == counts || Some(c) == cell_id {
                continue;
            }
            match scalar_type(field.data_type()) {
                Some(to) => {
                    fields.push(Field::new(field.name(), to.clone(), true));
                    columns.push((c, field.name().clone(), to));
                }
                None => skipped.push(format!("{} ({})", field.name(), field.data_type())),
            }
        }
        let mut read = vec![genes, counts];
        read.extend(cell_id);
        read.extend(columns.iter().map(|c| c.0));
        let name = |c: usize| schema.field(c).name().clone();
        Ok(CellTable {
            path: path.to_owned(),
            n_obs,
            read,
            genes: name(genes),
            counts: name(counts),
            cell_id: cell_id.map(name),
            columns: columns.into_iter().map(|(_, n, t)| (n, t)).collect(),
            obs_schema: Arc::new(Schema::new(fields)),
            skipped,
            marker: layout.marker,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cells.
    pub fn n_obs(&self) -> u64 {
        self.n_obs
    }

    /// The `obs` schema its cells become (first column `cell_id`).
    pub fn obs_schema(&self) -> SchemaRef {
        Arc::clone(&self.obs_schema)
    }

    /// Columns left out of `obs` (lists, structs, binary), with their types.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The id of the cell at `row` (its file read up to it: for messages, not for loops).
    pub fn cell_id(&self, row: u64) -> Result<String> {
        let Some(name) = &self.cell_id else { return Ok(row.to_string()) };
        let builder = builder(&self.path)?;
        let at = builder.schema().index_of(name).map_err(|e| Error::arrow(self.path.display().to_string(), e))?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), [at]);
        let reader = builder.with_projection(mask).with_offset(row as usize).with_limit(1);
        let mut reader = reader.build().map_err(|e| Error::parquet(&self.path, e))?;
        let batch = reader
            .next()
            .ok_or_else(|| Error::InvalidInput(format!("{}: no cell {row}", self.path.display())))?
            .map_err(|e| Error::arrow(self.path.display().to_string(), e))?;
        let ids =
            cast(batch.column(0), &DataType::Utf8).map_err(|e| Error::arrow(self.path.display().to_string(), e))?;
        Ok(ids.as_string::<i32>().value(0).to_owned())
    }

    /// The cells in batches of at most `rows` (a row group is read at a time).
    pub fn batches(&self, rows: usize) -> Result<ParquetRecordBatchReader> {
        let builder = builder(&self.path)?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), self.read.iter().copied());
        builder.with_projection(mask).with_batch_size(rows.max(1)).build().map_err(|e| Error::parquet(&self.path, e))
    }

    /// A batch read by [`batches`](Self::batches), of cells from row `first`, as matrix rows
    /// over the vocabulary's genes and `obs` rows.
    pub fn split(
        &self,
        batch: &RecordBatch,
        first: u64,
        vocabulary: &Vocabulary,
        out: &mut CsrBatch,
    ) -> Result<RecordBatch> {
        let path = self.path.display().to_string();
        let column = |name: &str| -> Result<&ArrayRef> {
            let at = batch.schema().index_of(name).map_err(|e| Error::arrow(path.clone(), e))?;
            Ok(batch.column(at))
        };
        let context = |what: &str| format!("{}: column {what:?}", self.path.display());
        let list_of = |t: DataType| DataType::LargeList(Arc::new(Field::new("item", t, true)));
        let by_id = vocabulary.ids.keys().next().is_none_or(|k| matches!(k, GeneRef::Id(_)));
        let genes = cast(column(&self.genes)?, &list_of(if by_id { DataType::Int64 } else { DataType::Utf8 }))
            .map_err(|e| Error::arrow(context(&self.genes), e))?;
        let counts = cast(column(&self.counts)?, &list_of(DataType::Float32))
            .map_err(|e| Error::arrow(context(&self.counts), e))?;
        let (genes, counts) = (genes.as_list::<i64>(), counts.as_list::<i64>());
        let mut pairs: Vec<(u32, f32)> = Vec::new();
        for r in 0..batch.num_rows() {
            let row = first + r as u64;
            let (g, c) = (genes.value(r), counts.value(r));
            if genes.is_null(r) != counts.is_null(r) || g.len() != c.len() {
                return Err(Error::InvalidInput(format!(
                    "{}: cell {row}: {} genes and {} counts",
                    self.path.display(),
                    g.len(),
                    c.len()
                )));
            }
            let c = c.as_primitive::<Float32Type>();
            pairs.clear();
            for k in 0..g.len() {
                let value = if c.is_null(k) { f32::NAN } else { c.value(k) };
                if self.marker.is_some_and(|m| m == value) {
                    continue;
                }
                let key = match by_id {
                    true => GeneRef::Id(g.as_primitive::<Int64Type>().value(k)),
                    false => GeneRef::Name(g.as_string::<i32>().value(k).to_owned()),
                };
                let Some(&column) = vocabulary.ids.get(&key) else {
                    return Err(Error::InvalidInput(format!(
                        "{}: cell {row}: gene {} is not in the vocabulary {}{}",
                        self.path.display(),
                        match &key {
                            GeneRef::Id(id) => format!("id {id}"),
                            GeneRef::Name(name) => format!("{name:?}"),
                        },
                        vocabulary.path.display(),
                        if k == 0 { " (a marker opening every cell? --marker-value names its count)" } else { "" }
                    )));
                };
                pairs.push((column, value));
            }
            pairs.sort_unstable_by_key(|p| p.0);
            if let Some(w) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
                let name = vocabulary.var.column(0).as_string::<i32>().value(w[0].0 as usize).to_owned();
                return Err(Error::InvalidInput(format!(
                    "{}: cell {row}: gene {name:?} is listed twice",
                    self.path.display()
                )));
            }
            let (indices, values): (Vec<u32>, Vec<f32>) = pairs.iter().copied().unzip();
            out.push_row(&indices, &values);
        }
        let ids: ArrayRef = match &self.cell_id {
            Some(name) => {
                let ids = cast(column(name)?, &DataType::Utf8).map_err(|e| Error::arrow(context(name), e))?;
                if ids.null_count() > 0 {
                    return Err(Error::InvalidInput(format!("{}: cells without an id", context(name))));
                }
                ids
            }
            None => {
                Arc::new(StringArray::from_iter_values((0..batch.num_rows()).map(|r| (first + r as u64).to_string())))
            }
        };
        let mut columns = vec![ids];
        for (name, to) in &self.columns {
            columns.push(cast(column(name)?, to).map_err(|e| Error::arrow(context(name), e))?);
        }
        RecordBatch::try_new(Arc::clone(&self.obs_schema), columns).map_err(|e| Error::arrow(path, e))
    }
}

/// Opens `path` without blocking (a FIFO or device given as input is refused, not waited on).
fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    if !file.metadata().map_err(|e| Error::io(path, e))?.is_file() {
        return Err(Error::Unsupported {
            path: path.to_owned(),
            reason: "not a regular file (a directory, FIFO, socket or device); expected a Parquet file".to_owned(),
        });
    }
    Ok(file)
}

fn builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    ParquetRecordBatchReaderBuilder::try_new(open_regular(path)?).map_err(|e| Error::parquet(path, e))
}
