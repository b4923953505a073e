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

use arrow_array::{Array, ArrayRef, RecordBatch, RecordBatchReader, StringArray};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int64Type};
use arrow_cast::cast;
use arrow_schema::{DataType, Field, FieldRef, Schema, SchemaRef};
use cpa_stream_schemas::tables::{CELL_ID, GENE_ID};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use crate::counts_csr::CsrBatch;
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
    /// The column whose values the gene lists hold (ids, or names).
    id_column: String,
    /// The file's name of the column of gene names (`gene_id` in [`Vocabulary::var`]).
    name_column: String,
}

/// How a gene list names a gene.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum GeneRef {
    Id(i64),
    Name(String),
}

impl std::fmt::Display for GeneRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GeneRef::Id(id) => write!(f, "id {id}"),
            GeneRef::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// The values of a gene id column (of a vocabulary, or a cell table's flattened gene lists),
/// read as they are stored: nothing is cast into another gene. Integer ids are exact; float ids
/// must be whole numbers; unsigned 64-bit ids must fit a signed one.
enum GeneKeys {
    Ints(arrow_array::Int64Array),
    UInts(arrow_array::UInt64Array),
    Floats(arrow_array::Float64Array),
    Names(StringArray),
}

impl GeneKeys {
    /// The keys of `values`; `Err` says why the type cannot hold gene ids.
    fn of(values: &ArrayRef) -> std::result::Result<GeneKeys, String> {
        let widen = |to: &DataType| cast(values, to).map_err(|e| format!("cannot read as {to}: {e}"));
        Ok(match values.data_type() {
            DataType::UInt64 => GeneKeys::UInts(values.as_primitive::<arrow_array::types::UInt64Type>().clone()),
            // Every other integer type widens to i64 exactly.
            t if t.is_integer() => GeneKeys::Ints(widen(&DataType::Int64)?.as_primitive::<Int64Type>().clone()),
            t if t.is_floating() => {
                GeneKeys::Floats(widen(&DataType::Float64)?.as_primitive::<arrow_array::types::Float64Type>().clone())
            }
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                GeneKeys::Names(widen(&DataType::Utf8)?.as_string::<i32>().clone())
            }
            DataType::Dictionary(_, v) if matches!(**v, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => {
                GeneKeys::Names(widen(&DataType::Utf8)?.as_string::<i32>().clone())
            }
            DataType::Null => return Err("holds only nulls, no gene ids".to_owned()),
            other => return Err(format!("holds {other} values; gene ids are integers or names")),
        })
    }

    fn len(&self) -> usize {
        match self {
            GeneKeys::Ints(a) => a.len(),
            GeneKeys::UInts(a) => a.len(),
            GeneKeys::Floats(a) => a.len(),
            GeneKeys::Names(a) => a.len(),
        }
    }

    /// Whether the keys are names rather than numeric ids.
    fn are_names(&self) -> bool {
        matches!(self, GeneKeys::Names(_))
    }

    /// The key at `k`; `Err` says why it is no gene id.
    fn get(&self, k: usize) -> std::result::Result<GeneRef, String> {
        let present = |array: &dyn Array| match array.is_null(k) {
            true => Err("no gene id (null)".to_owned()),
            false => Ok(()),
        };
        match self {
            GeneKeys::Ints(a) => present(a).map(|()| GeneRef::Id(a.value(k))),
            GeneKeys::UInts(a) => {
                present(a)?;
                i64::try_from(a.value(k))
                    .map(GeneRef::Id)
                    .map_err(|_| format!("id {} is beyond the largest gene id, 2^63 - 1", a.value(k)))
            }
            GeneKeys::Floats(a) => {
                present(a)?;
                let v = a.value(k);
                // 2^63 is exactly representable; whole numbers below it convert exactly.
                if v.is_finite() && v.fract() == 0.0 && v.abs() < 9_223_372_036_854_775_808.0 {
                    Ok(GeneRef::Id(v as i64))
                } else {
                    Err(format!("id {v} is not a whole number"))
                }
            }
            GeneKeys::Names(a) => present(a).map(|()| GeneRef::Name(a.value(k).to_owned())),
        }
    }
}

impl Vocabulary {
    /// Reads the vocabulary table `path` (Parquet): genes are named by `name_column` (default:
    /// `gene_id`, `gene_symbol`, `gene_name` or `ensembl_id`, the first there is) and lists
    /// refer to them by `id_column` (default: `token_id` if there is one, else the names).
    pub fn read(path: &Path, name_column: Option<&str>, id_column: Option<&str>) -> Result<Vocabulary> {
        let reader = builder(path)?.build().map_err(|e| Error::parquet(path, e))?;
        let schema = reader.schema();
        // The reader panics on some damaged pages: that is this file's error.
        let batches = crate::store::guarded(path, || {
            reader.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| Error::arrow(path.display().to_string(), e))
        })?;
        let table = arrow_select::concat::concat_batches(&schema, &batches)
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
        let gene_name = |row: usize| gene_names.as_string::<i32>().value(row);
        let mut first_row: HashMap<&str, usize> = HashMap::with_capacity(table.num_rows());
        for row in 0..table.num_rows() {
            if let Some(earlier) = first_row.insert(gene_name(row), row) {
                return Err(Error::InvalidInput(format!(
                    "{}: gene {:?} is named twice (rows {earlier} and {row}); a store's genes are unique",
                    context(name_at),
                    gene_name(row)
                )));
            }
        }
        let mut ids = HashMap::with_capacity(table.num_rows());
        let mut add = |key: GeneRef, row: usize| -> Result<()> {
            match ids.insert(key.clone(), row as u32) {
                Some(earlier) => Err(Error::InvalidInput(format!(
                    "{}: {} is the id of two genes ({:?}, row {earlier}, and {:?}, row {row})",
                    path.display(),
                    key,
                    gene_name(earlier as usize),
                    gene_name(row)
                ))),
                None => Ok(()),
            }
        };
        match id_at {
            Some(c) => match GeneKeys::of(table.column(c)).map_err(|why| {
                Error::InvalidInput(format!("{}: {why} (--var-id names the column of the ids)", context(c)))
            })? {
                keys @ (GeneKeys::Ints(_) | GeneKeys::UInts(_) | GeneKeys::Floats(_)) => {
                    for row in 0..table.num_rows() {
                        let key = keys.get(row).map_err(|why| {
                            Error::InvalidInput(format!("{}: gene {:?} (row {row}): {why}", context(c), gene_name(row)))
                        })?;
                        add(key, row)?;
                    }
                }
                GeneKeys::Names(names) => {
                    for (row, name) in names.iter().enumerate() {
                        let name = name.ok_or_else(|| {
                            Error::InvalidInput(format!(
                                "{}: gene {:?} (row {row}) has no id",
                                context(c),
                                gene_name(row)
                            ))
                        })?;
                        add(GeneRef::Name(name.to_owned()), row)?;
                    }
                }
            },
            None => {
                for row in 0..table.num_rows() {
                    add(GeneRef::Name(gene_name(row).to_owned()), row)?;
                }
            }
        }
        let id_column = id_at.map_or_else(|| names[name_at].to_owned(), |c| names[c].to_owned());
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
        Ok(Vocabulary { path: path.to_owned(), var, ids, id_column, name_column: names[name_at].to_owned() })
    }

    /// Checks that a cell table's gene lists (`keys`, of column `column` of `table`) refer to
    /// genes as this vocabulary does, numbers or names, and says which `--var-id` would match
    /// where they do not.
    fn check_keys(&self, keys: &GeneKeys, table: &Path, column: &str) -> Result<()> {
        let by_name = self.ids.keys().next().is_some_and(|k| matches!(k, GeneRef::Name(_)));
        let vocabulary = self.path.display();
        let first = (0..keys.len()).find_map(|k| keys.get(k).ok());
        match (keys.are_names(), by_name) {
            (true, false) => {
                let Some(GeneRef::Name(first)) = first else { return Ok(()) };
                let holding =
                    self.var.schema().fields().iter().zip(self.var.columns()).enumerate().find_map(|(at, (f, c))| {
                        let names = c.as_string_opt::<i32>()?;
                        // The first column is the names, renamed gene_id: the file calls it otherwise.
                        let column = if at == 0 { self.name_column.clone() } else { f.name().clone() };
                        names.iter().any(|n| n == Some(first.as_str())).then_some(column)
                    });
                let hint = match holding {
                    Some(c) => format!("--var-id {c} names the vocabulary's column that holds such names"),
                    None => "no column of the vocabulary holds that name".to_owned(),
                };
                Err(Error::InvalidInput(format!(
                    "{}: column {column:?} holds gene names (the first: {first:?}), but the vocabulary {vocabulary} \
                     refers to genes by the numbers of its column {:?}; {hint}",
                    table.display(),
                    self.id_column
                )))
            }
            (false, true) => {
                let numeric: Vec<String> = (self.var.schema().fields().iter())
                    .filter(|f| f.data_type().is_integer())
                    .map(|f| f.name().clone())
                    .collect();
                let hint = match numeric.as_slice() {
                    [] => "it has no column of numbers".to_owned(),
                    some => format!("--var-id names its column of ids (of numbers: {})", some.join(", ")),
                };
                Err(Error::InvalidInput(format!(
                    "{}: column {column:?} holds numeric gene ids{}, but the vocabulary {vocabulary} names genes by \
                     its column {:?}; {hint}",
                    table.display(),
                    first.map(|f| format!(" (the first: {f})")).unwrap_or_default(),
                    self.id_column
                )))
            }
            _ => Ok(()),
        }
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

/// A list column as a `LargeList` of its own item type (offsets widened, no value cast).
fn large_list(column: &ArrayRef) -> std::result::Result<arrow_array::LargeListArray, String> {
    let item = match column.data_type() {
        DataType::List(f) | DataType::LargeList(f) | DataType::ListView(f) | DataType::LargeListView(f) => {
            f.data_type().clone()
        }
        other => return Err(format!("is {other}, expected a list")),
    };
    let large =
        cast(column, &DataType::LargeList(Arc::new(Field::new("item", item, true)))).map_err(|e| e.to_string())?;
    Ok(large.as_list::<i64>().clone())
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
        let batch = crate::store::guarded(&self.path, || {
            reader
                .next()
                .ok_or_else(|| Error::InvalidInput(format!("{}: no cell {row}", self.path.display())))?
                .map_err(|e| Error::arrow(self.path.display().to_string(), e))
        })?;
        let ids =
            cast(batch.column(0), &DataType::Utf8).map_err(|e| Error::arrow(self.path.display().to_string(), e))?;
        Ok(ids.as_string::<i32>().value(0).to_owned())
    }

    /// The cells in batches of at most `rows` (a row group is read at a time). A damaged file
    /// on which the Parquet reader panics yields that as an error, and nothing after it.
    pub fn batches(&self, rows: usize) -> Result<CellBatches> {
        let builder = builder(&self.path)?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), self.read.iter().copied());
        let reader = crate::store::guarded(&self.path, || {
            builder
                .with_projection(mask)
                .with_batch_size(rows.max(1))
                .build()
                .map_err(|e| Error::parquet(&self.path, e))
        })?;
        Ok(CellBatches { reader: Some(reader) })
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
        let genes = large_list(column(&self.genes)?)
            .map_err(|why| Error::InvalidInput(format!("{}: {why}", context(&self.genes))))?;
        let counts = large_list(column(&self.counts)?)
            .map_err(|why| Error::InvalidInput(format!("{}: {why}", context(&self.counts))))?;
        let keys = GeneKeys::of(genes.values())
            .map_err(|why| Error::InvalidInput(format!("{}: {why}", context(&self.genes))))?;
        vocabulary.check_keys(&keys, &self.path, &self.genes)?;
        let values = counts.values();
        if !(values.data_type().is_integer() || values.data_type().is_floating()) {
            return Err(Error::InvalidInput(format!(
                "{}: holds {} values; counts are numbers (integers or floats)",
                context(&self.counts),
                values.data_type()
            )));
        }
        let values = cast(values, &DataType::Float32).map_err(|e| Error::arrow(context(&self.counts), e))?;
        let values = values.as_primitive::<Float32Type>();
        let (gene_offsets, count_offsets) = (genes.value_offsets(), counts.value_offsets());
        let mut pairs: Vec<(u32, f32)> = Vec::new();
        for r in 0..batch.num_rows() {
            let row = first + r as u64;
            let (g, c) = (
                gene_offsets[r] as usize..gene_offsets[r + 1] as usize,
                count_offsets[r] as usize..count_offsets[r + 1] as usize,
            );
            let (g_len, c_len) =
                (if genes.is_null(r) { 0 } else { g.len() }, if counts.is_null(r) { 0 } else { c.len() });
            if genes.is_null(r) != counts.is_null(r) || g_len != c_len {
                return Err(Error::InvalidInput(format!(
                    "{}: cell {row}: {g_len} genes and {c_len} counts",
                    self.path.display(),
                )));
            }
            pairs.clear();
            for k in 0..g_len {
                let (at, value_at) = (g.start + k, c.start + k);
                if values.is_null(value_at) {
                    return Err(Error::InvalidInput(format!(
                        "{}: cell {row}: count {k} of its list is null (missing); a count is a number",
                        context(&self.counts)
                    )));
                }
                let value = values.value(value_at);
                if self.marker.is_some_and(|m| m == value) {
                    continue;
                }
                let key = keys.get(at).map_err(|why| {
                    Error::InvalidInput(format!("{}: cell {row}: gene {k} of its list: {why}", context(&self.genes)))
                })?;
                let Some(&column) = vocabulary.ids.get(&key) else {
                    return Err(Error::InvalidInput(format!(
                        "{}: cell {row}: gene {key} is not in the vocabulary {}{}",
                        self.path.display(),
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

/// A cell table's batches ([`CellTable::batches`]): the Parquet reader's, with its panics on
/// damaged pages turned into errors.
pub struct CellBatches {
    reader: Option<ParquetRecordBatchReader>,
}

impl Iterator for CellBatches {
    type Item = std::result::Result<RecordBatch, arrow_schema::ArrowError>;

    fn next(&mut self) -> Option<Self::Item> {
        let reader = self.reader.as_mut()?;
        match crate::crew::catch_quietly(|| reader.next()) {
            Ok(next) => next,
            Err(message) => {
                self.reader = None;
                Some(Err(arrow_schema::ArrowError::ParquetError(format!("damaged Parquet file ({message})"))))
            }
        }
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
    let file = open_regular(path)?;
    crate::store::guarded(path, || ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::types::{Float32Type as F32, Float64Type as F64, Int64Type as I64, UInt64Type as U64};
    use arrow_array::{BooleanArray, Float64Array, Int32Array, ListArray, UInt64Array};

    /// Writes `columns` as one Parquet file.
    fn write(path: &Path, columns: Vec<(&str, ArrayRef)>) {
        let batch = RecordBatch::try_from_iter(columns).unwrap_or_else(|e| panic!("{e}"));
        let file = File::create(path).unwrap_or_else(|e| panic!("{e}"));
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap_or_else(|e| panic!("{e}"));
        writer.write(&batch).unwrap_or_else(|e| panic!("{e}"));
        writer.close().unwrap_or_else(|e| panic!("{e}"));
    }

    /// A vocabulary of three genes: token ids 10, 11, 12 (as `ids`), symbols SYM0..SYM2.
    fn vocabulary(dir: &Path, ids: ArrayRef) -> Result<Vocabulary> {
        let path = dir.join("vocab.parquet");
        let symbols: ArrayRef = Arc::new(StringArray::from(vec!["SYM0", "SYM1", "SYM2"]));
        write(&path, vec![("token_id", ids), ("gene_symbol", symbols)]);
        Vocabulary::read(&path, None, None)
    }

    fn int_vocabulary(dir: &Path) -> Vocabulary {
        vocabulary(dir, Arc::new(arrow_array::Int64Array::from(vec![10, 11, 12]))).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Imports one cell (`genes`, `counts`: lists of one row) against `vocabulary`: its row.
    fn import(dir: &Path, vocabulary: &Vocabulary, genes: ArrayRef, counts: ArrayRef) -> Result<(Vec<u32>, Vec<f32>)> {
        let path = dir.join("cells.parquet");
        write(&path, vec![("genes", genes), ("expressions", counts)]);
        let table = CellTable::open(&path, &CellTableLayout::default())?;
        let mut out = CsrBatch::new(vocabulary.len() as u32);
        for batch in table.batches(16)? {
            let batch = batch.map_err(|e| Error::arrow("test", e))?;
            table.split(&batch, 0, vocabulary, &mut out)?;
        }
        let (indices, values) = out.row(0);
        Ok((indices.to_vec(), values.to_vec()))
    }

    fn list<T: arrow_array::ArrowPrimitiveType>(values: Vec<Option<T::Native>>) -> ArrayRef {
        Arc::new(ListArray::from_iter_primitive::<T, _, _>([Some(values)]))
    }

    fn counts(n: usize) -> ArrayRef {
        list::<F32>((0..n).map(|k| Some(k as f32 + 1.0)).collect())
    }

    fn message<T: std::fmt::Debug>(result: Result<T>) -> String {
        match result {
            Ok(v) => panic!("accepted: {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn gene_ids_of_any_integer_type_or_whole_floats_map_to_their_genes() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let v = int_vocabulary(dir.path());
        let want = (vec![0, 2], vec![2.0, 1.0]);
        for genes in [
            list::<I64>(vec![Some(12), Some(10)]),
            list::<arrow_array::types::Int32Type>(vec![Some(12), Some(10)]),
            list::<U64>(vec![Some(12), Some(10)]),
            list::<F64>(vec![Some(12.0), Some(10.0)]),
        ] {
            let t = genes.data_type().clone();
            assert_eq!(import(dir.path(), &v, genes, counts(2)).unwrap_or_else(|e| panic!("{t}: {e}")), want);
        }
        // Names against a vocabulary of names (--var-id gene_symbol).
        let path = dir.path().join("vocab.parquet");
        let by_name = Vocabulary::read(&path, None, Some("gene_symbol")).unwrap_or_else(|e| panic!("{e}"));
        let names: ArrayRef = Arc::new(arrow_array::ListArray::new(
            Arc::new(Field::new("item", DataType::Utf8, true)),
            arrow_buffer::OffsetBuffer::new(vec![0, 2].into()),
            Arc::new(StringArray::from(vec!["SYM2", "SYM0"])),
            None,
        ));
        assert_eq!(import(dir.path(), &by_name, names, counts(2)).unwrap_or_else(|e| panic!("{e}")), want);
    }

    #[test]
    fn gene_ids_are_checked_not_cast_into_other_genes() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let v = int_vocabulary(dir.path());
        for (id, why) in [
            (1.5, "id 1.5 is not a whole number"),
            (f64::NAN, "id NaN is not a whole number"),
            (-0.5, "id -0.5 is not a whole number"),
            (1e30, "id 1000000000000000000000000000000 is not a whole number"),
        ] {
            let err = message(import(dir.path(), &v, list::<F64>(vec![Some(10.0), Some(id)]), counts(2)));
            assert!(
                err.contains("cells.parquet: column \"genes\": cell 0: gene 1 of its list") && err.contains(why),
                "{err}"
            );
        }
        let err = message(import(dir.path(), &v, list::<U64>(vec![Some(1 << 63)]), counts(1)));
        assert!(err.contains("id 9223372036854775808 is beyond the largest gene id"), "{err}");
        let err = message(import(dir.path(), &v, list::<I64>(vec![Some(10), None]), counts(2)));
        assert!(err.contains("gene 1 of its list: no gene id (null)"), "{err}");
        // Names against integer ids: which --var-id would match.
        let names: ArrayRef = Arc::new(arrow_array::ListArray::new(
            Arc::new(Field::new("item", DataType::Utf8, true)),
            arrow_buffer::OffsetBuffer::new(vec![0, 1].into()),
            Arc::new(StringArray::from(vec!["SYM1"])),
            None,
        ));
        let err = message(import(dir.path(), &v, names, counts(1)));
        assert!(err.contains("holds gene names (the first: \"SYM1\")"), "{err}");
        assert!(err.contains("--var-id gene_symbol names the vocabulary's column"), "{err}");
        // Integer ids against a vocabulary of names.
        let path = dir.path().join("vocab.parquet");
        let by_name = Vocabulary::read(&path, None, Some("gene_symbol")).unwrap_or_else(|e| panic!("{e}"));
        let err = message(import(dir.path(), &by_name, list::<I64>(vec![Some(10)]), counts(1)));
        assert!(err.contains("holds numeric gene ids (the first: id 10)") && err.contains("token_id"), "{err}");
    }

    #[test]
    fn counts_are_numbers_and_never_missing() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let v = int_vocabulary(dir.path());
        let err =
            message(import(dir.path(), &v, list::<I64>(vec![Some(10), Some(11)]), list::<F32>(vec![Some(1.0), None])));
        assert!(err.contains("column \"expressions\": cell 0: count 1 of its list is null"), "{err}");
        let strings: ArrayRef = Arc::new(arrow_array::ListArray::new(
            Arc::new(Field::new("item", DataType::Utf8, true)),
            arrow_buffer::OffsetBuffer::new(vec![0, 1].into()),
            Arc::new(StringArray::from(vec!["7"])),
            None,
        ));
        let err = message(import(dir.path(), &v, list::<I64>(vec![Some(10)]), strings));
        assert!(err.contains("column \"expressions\": holds Utf8 values; counts are numbers"), "{err}");
        let booleans: ArrayRef = Arc::new(arrow_array::ListArray::new(
            Arc::new(Field::new("item", DataType::Boolean, true)),
            arrow_buffer::OffsetBuffer::new(vec![0, 1].into()),
            Arc::new(BooleanArray::from(vec![true])),
            None,
        ));
        let err = message(import(dir.path(), &v, list::<I64>(vec![Some(10)]), booleans));
        assert!(err.contains("holds Boolean values; counts are numbers"), "{err}");
    }

    #[test]
    fn a_vocabulary_needs_whole_unique_ids_and_unique_names() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let err = message(vocabulary(dir.path(), Arc::new(Float64Array::from(vec![10.0, 1000.5, 12.0]))));
        assert!(err.contains("column \"token_id\": gene \"SYM1\" (row 1): id 1000.5 is not a whole number"), "{err}");
        let err = message(vocabulary(dir.path(), Arc::new(UInt64Array::from(vec![10, u64::MAX, 12]))));
        assert!(err.contains("gene \"SYM1\" (row 1): id 18446744073709551615 is beyond the largest gene id"), "{err}");
        let err = message(vocabulary(dir.path(), Arc::new(Int32Array::from(vec![Some(10), None, Some(12)]))));
        assert!(err.contains("gene \"SYM1\" (row 1): no gene id (null)"), "{err}");
        let err = message(vocabulary(dir.path(), Arc::new(Int32Array::from(vec![10, 12, 12]))));
        assert!(err.contains("id 12 is the id of two genes (\"SYM1\", row 1, and \"SYM2\", row 2)"), "{err}");
        let err = message(vocabulary(dir.path(), Arc::new(BooleanArray::from(vec![true, false, true]))));
        assert!(err.contains("holds Boolean values; gene ids are integers or names (--var-id"), "{err}");
        // A gene named twice.
        let path = dir.path().join("twice.parquet");
        let ids: ArrayRef = Arc::new(Int32Array::from(vec![1, 2]));
        let names: ArrayRef = Arc::new(StringArray::from(vec!["TP53", "TP53"]));
        write(&path, vec![("token_id", ids), ("gene_symbol", names)]);
        let err = message(Vocabulary::read(&path, None, None));
        assert!(err.contains("gene \"TP53\" is named twice (rows 0 and 1)"), "{err}");
    }
}
