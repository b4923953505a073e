//! An import as its users ask for it (the CLI's `import` flags, the Python package's
//! `import_h5ad` keywords), resolved into [`ImportOptions`] in one place.

use std::path::PathBuf;

use cpa_stream_stages::h5ad::ExternalData;
use serde::{Deserialize, Serialize};

use super::{DEFAULT_CHUNK_ROWS, DEFAULT_MAX_OPEN_BUCKETS, DEFAULT_MEMORY_BUDGET, ImportOptions};
use crate::error::{Error, Result};
use crate::limits::MAX_BATCH_SIZE;
use crate::request::{CodecName, Naming, choose_one};

/// An import request. `None` takes the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImportRequest {
    /// The `.h5ad` file.
    pub input: PathBuf,
    /// The store written.
    pub out: PathBuf,
    /// Import `layers/NAME` instead of `X`.
    pub layer: Option<String>,
    /// Import `adata.raw` instead of `X`.
    pub use_raw: bool,
    /// Keep only these genes (var index entries), in this order.
    pub genes: Option<Vec<String>>,
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

impl ImportRequest {
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
                let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
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
        Ok(ImportOptions {
            input: self.input.clone(),
            out: self.out.clone(),
            layer: self.layer.clone(),
            use_raw: self.use_raw,
            genes,
            chunk_rows,
            memory_budget,
            max_open_buckets,
            codec: n.codec(self.codec, self.zstd_level, self.block_rows)?,
            overwrite: self.overwrite,
            deg_uns_key: self.deg_uns_key.clone(),
            external: if self.allow_external { ExternalData::SameDirectory } else { ExternalData::Refuse },
        })
    }
}
