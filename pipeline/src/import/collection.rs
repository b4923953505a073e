//! Many `.h5ad` files planned as one store: which genes the store keeps and where each file's
//! columns go, and one `obs` and `var` schema that every file's rows are adapted to as they
//! stream (`anndata.concat(join=...)`'s rules where it has them; the differences are in
//! docs/store.md).
//!
//! Nothing here reads a matrix: planning reads each file's `var` table and `obs` schema once,
//! then the import streams the files one after another with the [`Part`]s made here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, DictionaryArray, Int32Array, RecordBatch, StringArray, new_null_array};

use arrow_array::cast::AsArray;
use arrow_array::types::Int32Type;
use arrow_cast::cast;
use arrow_schema::{DataType, Field, FieldRef, Schema, SchemaRef};
use arrow_select::interleave::interleave;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_schemas::tables::{
    CATEGORIES_KEY, GENE_ID, ORDERED_KEY, categorical_field, categorical_type, categories_of, is_ordered,
};
use cpa_stream_stages::cell_table::{CellTable, CellTableLayout, Vocabulary};
use cpa_stream_stages::h5ad::MatrixSource;
use cpa_stream_stages::input::{AnnDataReader, InputPolicy, is_zarr};
use cpa_stream_stages::store::Store;

use crate::Stage;
use crate::error::{Error, Result};

/// Which genes a store made of many files keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeneJoin {
    /// The genes every file has, in the first file's order (`anndata.concat(join="inner")`).
    Inner,
    /// The genes of any file: the first file's in its order, then each later file's new genes in
    /// its order; a cell of a file without a gene holds zero for it.
    Outer,
    /// These genes, in this order; every file must have each of them.
    List(Vec<String>),
    /// The first input's genes (a store appended to), which every other file must have.
    First,
}

/// How the files become one store.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// The matrix read of each file.
    pub source: MatrixSource<'a>,
    /// What reading the files may trust (data in other files, missing zarr chunks).
    pub policy: InputPolicy,
    /// Which genes are kept.
    pub join: &'a GeneJoin,
    /// The `var` column that identifies genes across files; `None`: the var index.
    pub gene_key: Option<&'a str>,
    /// The `obs` column naming each cell's file, and the label of each file; `None`: no column.
    pub source_key: Option<(&'a str, &'a [String])>,
    /// Separator of a cell id and its file's label (anndata's `index_unique`); `None`: ids kept.
    pub index_unique: Option<&'a str>,
    /// The first input is a store appended to: its cell ids stay as they are.
    pub appending: bool,
    /// How Parquet cell tables lay out their cells, and their genes (needed when an input is one).
    pub cells: Option<(&'a CellTableLayout, &'a Vocabulary)>,
}

/// A directory given as an input must be a store or an AnnData zarr store; any other directory
/// is refused with what was expected.
fn check_is_store(path: &Path) -> Result<()> {
    if path.join(cpa_stream_schemas::MANIFEST_FILE).is_file() {
        return Ok(());
    }
    Err(Error::InvalidInput(format!(
        "{}: a directory that is neither a store (no {}) nor a zarr store (no zarr.json or .zgroup); expected an \
         AnnData .h5ad file or zarr store, a Parquet cell table or a store",
        path.display(),
        cpa_stream_schemas::MANIFEST_FILE
    )))
}

/// Whether `path` names a Parquet cell table (by its extension) rather than an `.h5ad` file.
pub fn is_cell_table(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet") || e.eq_ignore_ascii_case("pq"))
}

/// What an input file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An AnnData `.h5ad` file.
    H5ad,
    /// An AnnData zarr store (a directory).
    Zarr,
    /// A Parquet cell table.
    Cells,
    /// A store (a directory).
    Store,
}

/// One input file as the import streams it.
#[derive(Debug)]
pub struct Part {
    /// The file.
    pub path: PathBuf,
    /// What it is.
    pub kind: Kind,
    /// Cells.
    pub n_obs: u64,
    /// Stored entries of its matrix (of a cell table, estimated from the file's size).
    pub entries: u64,
    /// Store column of each of the file's columns (`None`: not kept); cell tables of one
    /// vocabulary share one.
    pub map: Arc<Vec<Option<u32>>>,
    /// The file's genes kept in the store.
    pub kept_genes: usize,
    /// Turns the file's `obs` rows into the store's.
    pub obs: Adapter,
    /// With a gene key, the key of each var index entry (DEG lists name genes by the index).
    pub gene_names: Option<HashMap<String, String>>,
    /// The file's other matrices (named when its values are refused).
    pub other_matrices: Vec<String>,
    /// Columns of a cell table left out of `obs` (lists, structs, binary), with their types.
    pub skipped: Vec<String>,
    /// Arrays of a zarr store that lack chunks, read as their fill value (one line each).
    pub missing_chunks: Vec<String>,
}

/// The files, planned.
#[derive(Debug)]
pub struct Collection {
    /// The files in order.
    pub parts: Vec<Part>,
    /// The store's genes.
    pub var: RecordBatch,
    /// The store's `obs` schema.
    pub obs_schema: SchemaRef,
}

/// Opens each file once and plans the store: genes, their columns in each file, and the `obs`
/// and `var` schemas every file's rows are adapted to.
pub fn plan(inputs: &[PathBuf], plan: &Plan) -> Result<Collection> {
    let mut files = Vec::with_capacity(inputs.len());
    let all_tables = inputs.iter().all(|p| is_cell_table(p));
    let vocabulary_ids = match plan.cells {
        Some((_, vocabulary)) if inputs.iter().any(|p| is_cell_table(p)) => {
            let ids = key_values(&vocabulary.path, &vocabulary.var, 0, GENE_ID)?;
            if !all_tables {
                check_unique_genes(&vocabulary.path, &ids, plan.gene_key)?;
            }
            Some(Arc::new(ids))
        }
        _ => None,
    };
    for path in inputs {
        if is_cell_table(path) {
            let Some((layout, vocabulary)) = plan.cells else {
                return Err(Error::InvalidInput(format!(
                    "{}: a Parquet cell table needs its genes: --var-table names the vocabulary (a Parquet file with \
                     a row per gene)",
                    path.display()
                )));
            };
            let table = CellTable::open(path, layout).map_err(Error::stage(Stage::Read))?;
            let ids = Arc::clone(vocabulary_ids.as_ref().unwrap_or(&Arc::new(Vec::new())));
            // An estimate: about 12 bytes a stored entry (an id and a count) in the file.
            let entries = std::fs::metadata(path).map_or(0, |m| m.len() / 12);
            files.push(FileTables {
                path: path.clone(),
                kind: Kind::Cells,
                n_obs: table.n_obs(),
                entries,
                var: vocabulary.var.clone(),
                ids,
                obs: table.obs_schema(),
                gene_names: None,
                other_matrices: Vec::new(),
                skipped: table.skipped().to_vec(),
                missing_chunks: Vec::new(),
            });
            continue;
        }
        let (kind, var, n_obs, entries, obs, other_matrices, missing_chunks) = if path.is_dir() && !is_zarr(path) {
            check_is_store(path)?;
            let store = Store::open(path).map_err(Error::stage(Stage::Read))?;
            let var = store.small_table(StoreFiles::VAR).map_err(Error::stage(Stage::Read))?;
            let obs = store.table_schema(StoreFiles::OBS).map_err(Error::stage(Stage::Read))?;
            let kept = keyed_var(path, var, plan.gene_key)?;
            (Kind::Store, kept, store.n_obs(), store.nnz(), obs, Vec::new(), Vec::new())
        } else {
            let h5 = AnnDataReader::open(path, plan.source, plan.policy).map_err(Error::stage(Stage::Read))?;
            let missing_chunks = h5.missing_chunks();
            let var = keyed_var(path, h5.read_var().map_err(Error::stage(Stage::Read))?, plan.gene_key)?;
            let entries = h5.stored_entries();
            let kind = if matches!(h5, AnnDataReader::Zarr(_)) { Kind::Zarr } else { Kind::H5ad };
            (kind, var, h5.n_obs(), entries, h5.obs_schema(), h5.other_matrices(), missing_chunks)
        };
        let ids = key_values(path, &var, 0, GENE_ID)?;
        // Of one file too: two columns of one name would be one column of the store, the values
        // of both merged into it.
        check_unique_genes(path, &ids, plan.gene_key)?;
        let gene_names = match plan.gene_key {
            Some(_) => {
                let index = key_values(path, &var, var.num_columns() - 1, "var_index")?;
                Some(index.into_iter().zip(ids.iter().cloned()).collect())
            }
            None => None,
        };
        let (ids, skipped) = (Arc::new(ids), Vec::new());
        files.push(FileTables {
            path: path.clone(),
            kind,
            n_obs,
            entries,
            var,
            ids,
            obs,
            gene_names,
            other_matrices,
            skipped,
            missing_chunks,
        });
    }
    // Cell tables alone share one vocabulary: its genes, in its order (unique, as read).
    let (var, maps) = if all_tables && !matches!(plan.join, GeneJoin::List(_)) {
        let identity = Arc::new((0..files[0].ids.len() as u32).map(Some).collect::<Vec<_>>());
        (files[0].var.clone(), files.iter().map(|_| Arc::clone(&identity)).collect::<Vec<_>>())
    } else {
        let genes = join_genes(&files, plan.join)?;
        let position: HashMap<&str, u32> = genes.iter().enumerate().map(|(i, g)| (g.as_str(), i as u32)).collect();
        let maps: Vec<Vec<Option<u32>>> =
            files.iter().map(|f| f.ids.iter().map(|g| position.get(g.as_str()).copied()).collect()).collect();
        let var = merged_var(&files, &genes, &maps)?;
        (var, maps.into_iter().map(Arc::new).collect())
    };
    let stores: Vec<bool> = files.iter().map(|f| f.kind == Kind::Store).collect();
    let obs_schema = merged_schema(files.iter().map(|f| f.obs.as_ref()).collect(), &stores, plan.source_key)?;
    let mut parts = Vec::with_capacity(files.len());
    for (i, (file, map)) in files.into_iter().zip(maps).enumerate() {
        let label = plan.source_key.map(|(_, labels)| labels[i].as_str());
        let suffix = plan.index_unique.zip(plan.source_key).map(|(sep, (_, labels))| format!("{sep}{}", labels[i]));
        let suffix = suffix.filter(|_| !(plan.appending && i == 0));
        let obs = Adapter::new(&file.path, &file.obs, &obs_schema, label, suffix)?;
        parts.push(Part {
            kept_genes: map.iter().filter(|m| m.is_some()).count(),
            kind: file.kind,
            path: file.path,
            n_obs: file.n_obs,
            entries: file.entries,
            map,
            obs,
            gene_names: file.gene_names,
            other_matrices: file.other_matrices,
            skipped: file.skipped,
            missing_chunks: file.missing_chunks,
        });
    }
    Ok(Collection { parts, var, obs_schema })
}

/// What planning keeps of a file.
struct FileTables {
    path: PathBuf,
    kind: Kind,
    entries: u64,
    n_obs: u64,
    /// `var`, first column the gene key.
    var: RecordBatch,
    ids: Arc<Vec<String>>,
    obs: SchemaRef,
    gene_names: Option<HashMap<String, String>>,
    other_matrices: Vec<String>,
    skipped: Vec<String>,
    missing_chunks: Vec<String>,
}

/// A file's `var` table with the gene key as its first column: the index itself, or with
/// `gene_key`, that column's values, the index then kept as column `var_index`.
fn keyed_var(path: &Path, var: RecordBatch, gene_key: Option<&str>) -> Result<RecordBatch> {
    let Some(key) = gene_key else { return Ok(var) };
    let Some(column) = var.schema().fields().iter().position(|f| f.name() == key) else {
        let schema = var.schema();
        let names: Vec<&str> = schema.fields().iter().skip(1).map(|f| f.name().as_str()).collect();
        return Err(Error::InvalidInput(format!(
            "{}: --gene-key {key:?}: no such var column; its var columns: {}",
            path.display(),
            if names.is_empty() { "none (only the index)".to_owned() } else { names.join(", ") }
        )));
    };
    let ids = key_values(path, &var, column, key)?;
    let mut fields: Vec<FieldRef> = vec![Arc::new(Field::new(GENE_ID, DataType::Utf8, false))];
    let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(ids))];
    for (field, column) in var.schema().fields().iter().zip(var.columns()).skip(1) {
        fields.push(Arc::clone(field));
        columns.push(Arc::clone(column));
    }
    let index_name = "var_index";
    if fields.iter().any(|f| f.name() == index_name) {
        return Err(Error::InvalidInput(format!(
            "{}: --gene-key keeps the var index as column {index_name:?}, which the file already has",
            path.display()
        )));
    }
    fields.push(Arc::new(Field::new(index_name, DataType::Utf8, false)));
    columns.push(Arc::clone(var.column(0)));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(Error::arrow("var table"))
}

/// The values of column `column` of `var` as gene identifiers: text, none missing.
fn key_values(path: &Path, var: &RecordBatch, column: usize, name: &str) -> Result<Vec<String>> {
    let text = cast(var.column(column), &DataType::Utf8).map_err(Error::arrow(format!("var column {name:?}")))?;
    let text = text.as_string::<i32>();
    if let Some(row) = (0..text.len()).find(|&r| text.is_null(r)) {
        return Err(Error::InvalidInput(format!(
            "{}: var column {name:?}: gene {row} has no value; genes need an identifier to be matched",
            path.display()
        )));
    }
    Ok(text.iter().map(|v| v.unwrap_or_default().to_owned()).collect())
}

fn check_unique_genes(path: &Path, ids: &[String], gene_key: Option<&str>) -> Result<()> {
    let mut seen = HashSet::with_capacity(ids.len());
    for (row, id) in ids.iter().enumerate() {
        if !seen.insert(id.as_str()) {
            let by = gene_key.map_or("the var index".to_owned(), |k| format!("var column {k:?}"));
            return Err(Error::InvalidInput(format!(
                "{}: gene {id:?} appears twice in {by} (again at gene {row}): a store's genes are unique (the \
                 two columns would be merged into one); --gene-key names a var column of unique identifiers \
                 (gene_ids, for one)",
                path.display()
            )));
        }
    }
    Ok(())
}

/// The store's genes.
fn join_genes(files: &[FileTables], join: &GeneJoin) -> Result<Vec<String>> {
    let first = &files[0];
    // Every file after the first shares genes with those before it: identifiers of another kind
    // (symbols beside Ensembl ids) or of another species are a mistake, whatever the join.
    let mut seen: HashSet<&str> = first.ids.iter().map(String::as_str).collect();
    for file in &files[1..] {
        if !file.ids.iter().any(|g| seen.contains(g.as_str())) {
            let examples = |ids: &[String]| ids.iter().take(4).map(|g| format!("{g:?}")).collect::<Vec<_>>().join(", ");
            return Err(Error::InvalidInput(format!(
                "{}: none of its {} genes is a gene of the files before it (its genes: {}, ...; {}: {}, ...): are they \
                 identifiers of another kind? --gene-key names the var column to match genes by",
                file.path.display(),
                file.ids.len(),
                examples(&file.ids),
                first.path.display(),
                examples(&first.ids),
            )));
        }
        seen.extend(file.ids.iter().map(String::as_str));
    }
    let genes: Vec<String> = match join {
        GeneJoin::Inner => {
            let sets: Vec<HashSet<&str>> =
                files[1..].iter().map(|f| f.ids.iter().map(String::as_str).collect()).collect();
            first.ids.iter().filter(|g| sets.iter().all(|s| s.contains(g.as_str()))).cloned().collect()
        }
        GeneJoin::Outer => {
            let mut taken = HashSet::new();
            files.iter().flat_map(|f| f.ids.iter()).filter(|g| taken.insert(g.as_str())).cloned().collect()
        }
        GeneJoin::First => {
            for file in &files[1..] {
                let has: HashSet<&str> = file.ids.iter().map(String::as_str).collect();
                let missing: Vec<&str> = first.ids.iter().map(String::as_str).filter(|g| !has.contains(g)).collect();
                if !missing.is_empty() {
                    let shown: Vec<&str> = missing.iter().take(10).copied().collect();
                    return Err(Error::InvalidInput(format!(
                        "{}: {} gene(s) of {} are not among its genes: {}{}; a store appended to keeps its genes \
                         (a model trained on it predicts on the cells added), so every file added must have them",
                        file.path.display(),
                        missing.len(),
                        first.path.display(),
                        shown.join(", "),
                        if missing.len() > 10 { ", ..." } else { "" }
                    )));
                }
            }
            first.ids.to_vec()
        }
        GeneJoin::List(list) => {
            let mut listed = HashSet::new();
            if let Some(twice) = list.iter().find(|g| !listed.insert(g.as_str())) {
                return Err(Error::InvalidInput(format!("--genes: gene {twice:?} is listed twice")));
            }
            for file in files {
                let has: HashSet<&str> = file.ids.iter().map(String::as_str).collect();
                let missing: Vec<&str> = list.iter().map(String::as_str).filter(|g| !has.contains(g)).collect();
                if !missing.is_empty() {
                    let shown: Vec<&str> = missing.iter().take(10).copied().collect();
                    return Err(Error::InvalidInput(format!(
                        "--genes: {} gene(s) not in the genes of {}: {}{}",
                        missing.len(),
                        file.path.display(),
                        shown.join(", "),
                        if missing.len() > 10 { ", ..." } else { "" }
                    )));
                }
            }
            list.clone()
        }
    };
    if genes.is_empty() {
        return Err(Error::InvalidInput(format!(
            "no gene is in every one of the {} files (--genes inner); --genes outer keeps the genes of any",
            files.len()
        )));
    }
    Ok(genes)
}

/// The store's `var`: each gene's row from the first file that has it, in the merged schema.
fn merged_var(files: &[FileTables], genes: &[String], maps: &[Vec<Option<u32>>]) -> Result<RecordBatch> {
    let schema = merged_schema(files.iter().map(|f| f.var.schema_ref().as_ref()).collect(), &[], None)?;
    let adapted = files
        .iter()
        .map(|f| Adapter::new(&f.path, f.var.schema_ref(), &schema, None, None)?.apply(&f.var))
        .collect::<Result<Vec<_>>>()?;
    let mut from = vec![None; genes.len()];
    for (file, map) in maps.iter().enumerate() {
        for (row, column) in map.iter().enumerate() {
            if let Some(c) = column
                && from[*c as usize].is_none()
            {
                from[*c as usize] = Some((file, row));
            }
        }
    }
    let from: Vec<(usize, usize)> = from.into_iter().map(|f| f.unwrap_or_default()).collect();
    let columns = (0..schema.fields().len())
        .map(|c| {
            let arrays: Vec<&dyn Array> = adapted.iter().map(|b| b.column(c).as_ref()).collect();
            interleave(&arrays, &from)
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Error::arrow("var table"))?;
    RecordBatch::try_new(schema, columns).map_err(Error::arrow("var table"))
}

/// One schema for tables of the files' schemas: the first column (the index) as the first file
/// has it, then every column of any file in the order met, with the source column last. A
/// column that some file lacks may be null; categories are merged in the order met (ordered
/// only where every file has the same ordered categories); other differing types become the
/// type that holds both (Int64 for integers, Float64 for numbers, text otherwise).
/// A store among the files (`stores[i]`) may have the source column already (from the import
/// that made it): its labels come first among the column's categories.
fn merged_schema(schemas: Vec<&Schema>, stores: &[bool], source: Option<(&str, &[String])>) -> Result<SchemaRef> {
    let key = source.map(|(key, _)| key);
    let mut names: Vec<&str> = Vec::new();
    for schema in &schemas {
        for field in schema.fields().iter().skip(1) {
            if !names.contains(&field.name().as_str()) && Some(field.name().as_str()) != key {
                names.push(field.name());
            }
        }
    }
    let mut fields = vec![schemas[0].field(0).clone()];
    for name in names {
        let present: Vec<Option<&Field>> = schemas.iter().map(|s| s.field_with_name(name).ok()).collect();
        fields.push(merged_field(name, &present));
    }
    if let Some((key, labels)) = source {
        let mut categories: Vec<String> = Vec::new();
        for (i, schema) in schemas.iter().enumerate() {
            let theirs = match schema.field_with_name(key) {
                Ok(field) if stores.get(i) == Some(&true) && categories_of(field).is_some() => categories_of(field),
                Ok(_) => {
                    return Err(Error::InvalidInput(format!(
                        "--source-key {key:?}: the files already have an obs column of that name; choose another"
                    )));
                }
                Err(_) => None,
            };
            for label in theirs.unwrap_or_else(|| vec![labels[i].clone()]) {
                if !categories.contains(&label) {
                    categories.push(label);
                }
            }
        }
        if fields.iter().any(|f| f.name() == key) {
            return Err(Error::InvalidInput(format!(
                "--source-key {key:?}: the files already have an obs column of that name; choose another"
            )));
        }
        fields.push(categorical_field(key, &categories, false));
    }
    Ok(Arc::new(Schema::new_with_metadata(fields, schemas[0].metadata().clone())))
}

fn merged_field(name: &str, present: &[Option<&Field>]) -> Field {
    let found: Vec<&Field> = present.iter().flatten().copied().collect();
    let nullable = found.len() < present.len() || found.iter().any(|f| f.is_nullable());
    let first = found[0];
    if found.iter().all(|f| *f == first) {
        return first.clone().with_nullable(nullable);
    }
    let categories: Vec<Option<Vec<String>>> = found.iter().map(|f| categories_of(f)).collect();
    if categories.iter().all(Option::is_some) {
        let lists: Vec<Vec<String>> = categories.into_iter().flatten().collect();
        let mut merged: Vec<String> = Vec::new();
        let mut taken = HashSet::new();
        for category in lists.iter().flatten() {
            if taken.insert(category.as_str()) {
                merged.push(category.clone());
            }
        }
        let ordered = found.iter().all(|f| is_ordered(f)) && lists.iter().all(|l| *l == lists[0]);
        let mut metadata = first.metadata().clone();
        metadata.remove(ORDERED_KEY);
        let field = categorical_field(name, &merged, nullable);
        metadata.insert(CATEGORIES_KEY.to_owned(), field.metadata()[CATEGORIES_KEY].clone());
        if ordered {
            metadata.insert(ORDERED_KEY.to_owned(), "true".to_owned());
        }
        return field.with_metadata(metadata);
    }
    let types: Vec<&DataType> = found.iter().map(|f| f.data_type()).collect();
    let data_type = if types.iter().all(|t| *t == types[0]) {
        types[0].clone()
    } else if types.iter().all(|t| t.is_integer()) {
        DataType::Int64
    } else if types.iter().all(|t| t.is_numeric()) {
        DataType::Float64
    } else {
        DataType::Utf8
    };
    let mut metadata = first.metadata().clone();
    metadata.remove(CATEGORIES_KEY);
    metadata.remove(ORDERED_KEY);
    Field::new(name, data_type, nullable).with_metadata(metadata)
}

/// Where a column of the merged schema comes from in one file.
#[derive(Debug)]
enum Column {
    /// The file's column at this position, as it is.
    Same(usize),
    /// The file's column at this position, cast.
    Cast(usize),
    /// The file's categorical column at this position, its codes mapped to the merged categories.
    Recode(usize),
    /// A column the file lacks: null.
    Missing,
    /// The source column: this file's label.
    Label(i32),
}

/// Turns batches of one file's table into the merged schema.
#[derive(Debug)]
pub struct Adapter {
    schema: SchemaRef,
    columns: Vec<Column>,
    /// Merged categories of each merged categorical column, by position.
    categories: HashMap<usize, (ArrayRef, HashMap<String, i32>)>,
    /// Appended to every id of the first column (anndata's `index_unique`).
    suffix: Option<String>,
    identity: bool,
}

impl Adapter {
    fn new(
        path: &Path,
        file: &SchemaRef,
        merged: &SchemaRef,
        label: Option<&str>,
        suffix: Option<String>,
    ) -> Result<Adapter> {
        let mut columns = Vec::with_capacity(merged.fields().len());
        let mut categories = HashMap::new();
        for (i, field) in merged.fields().iter().enumerate() {
            let column = match file.index_of(field.name()) {
                _ if i == 0 => Column::Same(0),
                Ok(at) => {
                    let theirs = file.field(at);
                    if let Some(list) = categories_of(field) {
                        if categories_of(theirs).is_none() {
                            return Err(Error::InvalidInput(format!(
                                "{}: obs column {:?} is not categorical where other files have it categorical",
                                path.display(),
                                field.name()
                            )));
                        }
                        let lookup = list.iter().enumerate().map(|(k, c)| (c.clone(), k as i32)).collect();
                        categories.insert(i, (Arc::new(StringArray::from(list)) as ArrayRef, lookup));
                        if theirs == field.as_ref() { Column::Same(at) } else { Column::Recode(at) }
                    } else if theirs.data_type() == field.data_type() {
                        Column::Same(at)
                    } else {
                        Column::Cast(at)
                    }
                }
                Err(_) => match label {
                    Some(label) if i == merged.fields().len() - 1 => {
                        let list = categories_of(field).unwrap_or_default();
                        let code = list.iter().position(|c| c == label).unwrap_or_default() as i32;
                        categories.insert(i, (Arc::new(StringArray::from(list)) as ArrayRef, HashMap::new()));
                        Column::Label(code)
                    }
                    _ => Column::Missing,
                },
            };
            columns.push(column);
        }
        let identity = suffix.is_none()
            && file.fields().len() == merged.fields().len()
            && columns.iter().enumerate().all(|(i, c)| matches!(c, Column::Same(at) if *at == i))
            && file.fields() == merged.fields();
        Ok(Adapter { schema: Arc::clone(merged), columns, categories, suffix, identity })
    }

    /// What is appended to every cell id (anndata's `index_unique` and the file's label).
    pub fn suffix(&self) -> Option<&str> {
        self.suffix.as_deref()
    }

    /// `batch` (a batch of the file's table) in the merged schema.
    pub fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        if self.identity {
            return Ok(batch.clone());
        }
        let rows = batch.num_rows();
        let mut out: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
        for (i, (column, field)) in self.columns.iter().zip(self.schema.fields()).enumerate() {
            let array = match column {
                Column::Same(0) if i == 0 => match &self.suffix {
                    Some(suffix) => {
                        let ids = batch.column(0).as_string::<i32>();
                        Arc::new(ids.iter().map(|id| id.map(|id| format!("{id}{suffix}"))).collect::<StringArray>())
                    }
                    None => Arc::clone(batch.column(0)),
                },
                Column::Same(at) => Arc::clone(batch.column(*at)),
                Column::Cast(at) => cast(batch.column(*at), field.data_type())
                    .map_err(Error::arrow(format!("obs column {:?}", field.name())))?,
                Column::Recode(at) => self.recode(i, batch.column(*at), field)?,
                Column::Missing => new_null_array(field.data_type(), rows),
                Column::Label(k) => {
                    let values = Arc::clone(&self.categories[&i].0);
                    Arc::new(DictionaryArray::<Int32Type>::new(Int32Array::from(vec![*k; rows]), values))
                }
            };
            out.push(array);
        }
        RecordBatch::try_new(Arc::clone(&self.schema), out).map_err(Error::arrow("obs table"))
    }

    /// A categorical column's codes mapped to the merged categories.
    fn recode(&self, i: usize, column: &ArrayRef, field: &Field) -> Result<ArrayRef> {
        let context = || format!("obs column {:?}", field.name());
        let column = cast(column, &categorical_type()).map_err(Error::arrow(context()))?;
        let dictionary = column.as_dictionary::<Int32Type>();
        let (values, lookup) = &self.categories[&i];
        let theirs = cast(dictionary.values(), &DataType::Utf8).map_err(Error::arrow(context()))?;
        let code: Vec<Option<i32>> =
            theirs.as_string::<i32>().iter().map(|c| c.and_then(|c| lookup.get(c).copied())).collect();
        let keys: Int32Array =
            dictionary.keys().iter().map(|k| k.and_then(|k| code.get(k as usize).copied().flatten())).collect();
        Ok(Arc::new(DictionaryArray::<Int32Type>::try_new(keys, Arc::clone(values)).map_err(Error::arrow(context()))?))
    }
}
