//! An import as its users ask for it (the CLI's `import` flags, the Python package's
//! `import_h5ad` keywords), resolved into [`ImportOptions`] in one place.

use std::path::PathBuf;

use cpa_stream_stages::cell_table::CellTableLayout;
use cpa_stream_stages::h5ad::ExternalData;
use serde::{Deserialize, Serialize};

use super::{DEFAULT_CHUNK_ROWS, DEFAULT_MAX_OPEN_BUCKETS, DEFAULT_MEMORY_BUDGET, GeneJoin, ImportOptions};
use crate::error::{Error, Result};
use crate::limits::MAX_BATCH_SIZE;
use crate::request::{CodecName, Naming, choose_one};
use crate::shuffle::{DEFAULT_SHUFFLE_BUCKET_BYTES, Shuffle};

/// An import request. `None` takes the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImportRequest {
    /// The `.h5ad` files, in order (a glob pattern stands for the files it matches, sorted); one
    /// path is read as a list of one.
    #[serde(alias = "input", deserialize_with = "one_or_many")]
    pub inputs: Vec<PathBuf>,
    /// A file listing more inputs, one path per line (relative paths from the list's folder;
    /// blank lines and lines starting with `#` skipped).
    pub inputs_from: Option<PathBuf>,
    /// The store written.
    pub out: PathBuf,
    /// Import `layers/NAME` instead of `X`.
    pub layer: Option<String>,
    /// Import `adata.raw` instead of `X`.
    pub use_raw: bool,
    /// Keep only these genes (var index entries, or values of `gene_key`), in this order.
    pub genes: Option<Vec<String>>,
    /// Of many files, keep the genes all of them have (`inner`, the default) or any has
    /// (`outer`, zero where a file lacks one).
    pub join: Option<JoinName>,
    /// The var column that identifies genes across files [default: the var index].
    pub gene_key: Option<String>,
    /// The obs column naming each cell's file [default: `source_file` of many files, none of one].
    pub source_key: Option<String>,
    /// Each file's label in `source_key` and `make_unique` [default: file names without `.h5ad`].
    pub labels: Option<Vec<String>>,
    /// Append this separator and the file's label to every cell id (anndata's `index_unique`).
    pub make_unique: Option<String>,
    /// Write the cells in a random order drawn from this seed.
    pub shuffle: Option<u64>,
    /// Append the inputs' cells to this store (its genes kept: every input must have them); the
    /// store is also the output, replaced atomically once the new version is complete.
    pub append: Option<PathBuf>,
    /// The gene vocabulary of Parquet cell tables (a Parquet file with a row per gene).
    pub var_table: Option<PathBuf>,
    /// The vocabulary's column that gene lists refer to [default: `token_id`, else the names].
    pub var_id: Option<String>,
    /// The cell tables' list column of genes [default: `genes`].
    pub genes_column: Option<String>,
    /// The cell tables' list column of counts [default: `expressions`].
    pub counts_column: Option<String>,
    /// The cell tables' column of cell ids [default: `cell_id`, else the row number].
    pub cell_id_column: Option<String>,
    /// Entries of cell tables with this count are markers, not genes, and are left out.
    pub marker_value: Option<f32>,
    /// Write a store of no cells when the inputs hold none (else an error).
    pub allow_empty: bool,
    /// A file with one gene per line (instead of `genes`).
    pub genes_file: Option<PathBuf>,
    /// The `uns` entry with the DEG lists [default: the first such entry].
    pub deg_uns_key: Option<String>,
    /// Rows read per chunk [default: [`DEFAULT_CHUNK_ROWS`]].
    pub chunk_rows: Option<usize>,
    /// MiB of one CSC transposition bucket [default: [`DEFAULT_MEMORY_BUDGET`]].
    pub csc_budget_mib: Option<usize>,
    /// Bucket files open at once [default: [`DEFAULT_MAX_OPEN_BUCKETS`]].
    pub csc_max_open_buckets: Option<usize>,
    /// Read data the file keeps in other files, from regular files in its own folder only.
    pub allow_external: bool,
    /// Read a zarr store whose sparse matrix lacks chunks, as the fill value.
    pub allow_missing_chunks: bool,
    /// The store's matrix codec.
    pub codec: CodecName,
    /// zstd level (codec zstd).
    pub zstd_level: Option<i32>,
    /// Rows per compressed block (codec zstd).
    pub block_rows: Option<u32>,
    /// Replace an existing store.
    pub overwrite: bool,
    /// How messages name the settings.
    pub naming: Naming,
}

/// Which genes a store of many files keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinName {
    /// The genes every file has.
    Inner,
    /// The genes any file has.
    Outer,
}

/// Default name of the column naming each cell's file, when there are many.
pub const DEFAULT_SOURCE_KEY: &str = "source_file";

fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(path) => vec![path],
        OneOrMany::Many(paths) => paths,
    })
}

impl ImportRequest {
    /// The input files: the paths given, each glob pattern replaced by the files it matches
    /// (sorted), then those listed in `inputs_from`.
    pub fn input_files(&self) -> Result<Vec<PathBuf>> {
        let n = self.naming;
        let mut files = Vec::new();
        for path in &self.inputs {
            let text = path.to_string_lossy();
            let pattern = text.contains(['*', '?', '[']) && !path.exists();
            if !pattern {
                files.push(path.clone());
                continue;
            }
            let matches = glob::glob(&text).map_err(|e| {
                Error::InvalidInput(format!("input {text:?}: not a valid pattern ({e}) and no such file"))
            })?;
            let mut found: Vec<PathBuf> = matches.filter_map(|m| m.ok()).filter(|p| p.is_file()).collect();
            if found.is_empty() {
                return Err(Error::InvalidInput(format!("input {text:?}: no file matches the pattern")));
            }
            found.sort();
            files.extend(found);
        }
        if let Some(list) = &self.inputs_from {
            let text = cpa_stream_stages::regular::read_text(list, "a list of input paths", 256 << 20)
                .map_err(Error::stage(crate::Stage::Read))?;
            let folder = list.parent().unwrap_or(std::path::Path::new(""));
            let before = files.len();
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                files.push(folder.join(line));
            }
            if files.len() == before {
                return Err(Error::InvalidInput(format!("{} {}: no paths", n.name("--inputs-from"), list.display())));
            }
        }
        // None is for `run_chunks` (data given from memory); `run` refuses it.
        Ok(files)
    }

    /// The options of the import, validated.
    pub fn options(&self) -> Result<ImportOptions> {
        let n = self.naming;
        if self.use_raw && self.layer.is_some() {
            return Err(choose_one(n, "--layer", "--use-raw"));
        }
        let genes = match (&self.genes, &self.genes_file) {
            (Some(_), Some(_)) => return Err(choose_one(n, "--genes", "--genes-file")),
            (Some(list), None) if list.is_empty() => {
                return Err(Error::InvalidInput(format!("{}: an empty list of genes", n.name("--genes"))));
            }
            (Some(list), None) => Some(list.clone()),
            (None, Some(path)) => {
                let text = cpa_stream_stages::regular::read_text(path, "a list of gene names", 256 << 20)
                    .map_err(Error::stage(crate::Stage::Read))?;
                let list: Vec<String> =
                    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
                if list.is_empty() {
                    return Err(Error::InvalidInput(format!(
                        "{} {}: no gene names",
                        n.name("--genes"),
                        path.display()
                    )));
                }
                Some(list)
            }
            (None, None) => None,
        };
        let chunk_rows = match self.chunk_rows {
            Some(rows) => n.bounded("--chunk-rows", rows, 1, MAX_BATCH_SIZE, "rows per chunk")?,
            None => DEFAULT_CHUNK_ROWS,
        };
        let memory_budget = match self.csc_budget_mib {
            Some(mib) => n.bounded("--csc-budget-mib", mib, 1, 1 << 20, "MiB")? << 20,
            None => DEFAULT_MEMORY_BUDGET,
        };
        let max_open_buckets = match self.csc_max_open_buckets {
            Some(b) => n.bounded("--csc-max-open-buckets", b, 1, 1 << 16, "open bucket files")?,
            None => DEFAULT_MAX_OPEN_BUCKETS,
        };
        let mut inputs = self.input_files()?;
        let join = match (genes, self.join) {
            (Some(_), Some(_)) => return Err(choose_one(n, "--genes LIST", "--genes inner|outer")),
            (Some(_), None) | (None, Some(_)) if self.append.is_some() => {
                return Err(Error::InvalidInput(format!(
                    "{}: a store appended to keeps its genes; {} does not apply",
                    n.name("--append"),
                    n.name("--genes")
                )));
            }
            (Some(list), None) => GeneJoin::List(list),
            (None, Some(JoinName::Outer)) => GeneJoin::Outer,
            (None, _) if self.append.is_some() => GeneJoin::First,
            (None, _) => GeneJoin::Inner,
        };
        let (out, overwrite) = match &self.append {
            Some(store) => {
                if !self.out.as_os_str().is_empty() && self.out != *store {
                    return Err(Error::InvalidInput(format!(
                        "{} {}: the store appended to is the output; {} {} does not apply",
                        n.name("--append"),
                        store.display(),
                        n.name("--out"),
                        self.out.display()
                    )));
                }
                if !store.join(cpa_stream_schemas::MANIFEST_FILE).is_file() {
                    return Err(Error::InvalidInput(format!(
                        "{} {}: not a store (no manifest.json)",
                        n.name("--append"),
                        store.display()
                    )));
                }
                inputs.insert(0, store.clone());
                (store.clone(), true)
            }
            None => (self.out.clone(), self.overwrite),
        };
        if self.make_unique.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(Error::InvalidInput(format!("{}: an empty separator", n.name("--make-unique"))));
        }
        let source_key = match (&self.source_key, inputs.len()) {
            (Some(key), _) if key.is_empty() || key == cpa_stream_schemas::tables::CELL_ID => {
                return Err(Error::InvalidInput(format!(
                    "{} {key:?}: not a column name to add",
                    n.name("--source-key")
                )));
            }
            (Some(key), _) => Some(key.clone()),
            (None, 1) => None,
            (None, _) => Some(DEFAULT_SOURCE_KEY.to_owned()),
        };
        let shuffle = self.shuffle.map(|seed| Shuffle { seed, bucket_bytes: DEFAULT_SHUFFLE_BUCKET_BYTES });
        if self.marker_value.is_some_and(|m| !m.is_finite()) {
            return Err(Error::InvalidInput(format!("{}: not a finite number", n.name("--marker-value"))));
        }
        let defaults = CellTableLayout::default();
        // Appending keeps the store's codec unless another is asked for.
        let codec = match &self.append {
            Some(store) if self.codec == CodecName::Raw && self.zstd_level.is_none() && self.block_rows.is_none() => {
                let opened = cpa_stream_stages::store::Store::open(store).map_err(Error::stage(crate::Stage::Read))?;
                opened.manifest().codec
            }
            _ => n.codec(self.codec, self.zstd_level, self.block_rows)?,
        };
        Ok(ImportOptions {
            inputs,
            out,
            append: self.append.clone(),
            layer: self.layer.clone(),
            use_raw: self.use_raw,
            join,
            gene_key: self.gene_key.clone(),
            source_key,
            labels: self.labels.clone(),
            index_unique: self.make_unique.clone(),
            shuffle,
            chunk_rows,
            memory_budget,
            max_open_buckets,
            codec,
            overwrite,
            deg_uns_key: self.deg_uns_key.clone(),
            external: if self.allow_external { ExternalData::SameDirectory } else { ExternalData::Refuse },
            allow_missing_chunks: self.allow_missing_chunks,
            cell_table: CellTableLayout {
                genes: self.genes_column.clone().unwrap_or(defaults.genes),
                counts: self.counts_column.clone().unwrap_or(defaults.counts),
                cell_id: self.cell_id_column.clone(),
                marker: self.marker_value,
            },
            var_table: self.var_table.clone(),
            var_id: self.var_id.clone(),
            allow_empty: self.allow_empty,
        })
    }
}
