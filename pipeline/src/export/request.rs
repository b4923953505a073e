//! An export as its users ask for it (the CLI's `export` flags, the Python package's
//! `export_h5ad` keywords), resolved into [`ExportOptions`] in one place.

use std::path::PathBuf;

use cpa_stream_stages::h5ad::{DEFAULT_GZIP_LEVEL, H5adCompression};
use serde::{Deserialize, Serialize};

use super::ExportOptions;
use crate::error::{Error, Result};
use crate::request::Naming;

/// Dataset compression of an exported file, as asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportCompression {
    /// None (anndata's default).
    #[default]
    None,
    /// gzip (deflate), at `gzip_level`.
    Gzip,
    /// LZF: fast, light.
    Lzf,
}

impl std::str::FromStr for ExportCompression {
    type Err = Error;

    fn from_str(text: &str) -> Result<ExportCompression> {
        match text {
            "none" => Ok(ExportCompression::None),
            "gzip" => Ok(ExportCompression::Gzip),
            "lzf" => Ok(ExportCompression::Lzf),
            other => Err(Error::InvalidInput(format!("compression {other:?}: expected none, gzip or lzf"))),
        }
    }
}

/// An export request. `None` takes the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportRequest {
    /// The store read.
    pub store: PathBuf,
    /// The AnnData file written.
    pub out: PathBuf,
    /// Compression of the written datasets.
    pub compression: ExportCompression,
    /// gzip level, 0-9 [default: [`DEFAULT_GZIP_LEVEL`]].
    pub gzip_level: Option<u8>,
    /// Replace an existing file.
    pub overwrite: bool,
    /// Only the cells this expression over obs columns selects [default: every cell].
    pub cells: Option<String>,
    /// How messages name the settings.
    pub naming: Naming,
}

impl ExportRequest {
    /// The options of the export, validated.
    pub fn options(&self) -> Result<ExportOptions> {
        let n = self.naming;
        let compression = match (self.compression, self.gzip_level) {
            (ExportCompression::Gzip, level) => {
                let level = level.unwrap_or(DEFAULT_GZIP_LEVEL);
                if level > 9 {
                    return Err(Error::InvalidInput(format!("{} must be 0-9", n.name("--gzip-level"))));
                }
                H5adCompression::Gzip(level)
            }
            (other, Some(_)) => {
                return Err(Error::InvalidInput(format!(
                    "{} is for {} gzip, not {}",
                    n.name("--gzip-level"),
                    n.name("--compression"),
                    serde_json::to_value(other).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
                )));
            }
            (ExportCompression::None, None) => H5adCompression::None,
            (ExportCompression::Lzf, None) => H5adCompression::Lzf,
        };
        let cells = match &self.cells {
            None => None,
            Some(text) => {
                let given = format!("{} {text:?}", n.name("--cells"));
                let expr = text.parse().map_err(|e| match e {
                    Error::InvalidInput(why) => Error::InvalidInput(format!("{}: {why}", n.name("--cells"))),
                    other => other,
                })?;
                Some(super::CellSelection { expr, given })
            }
        };
        Ok(ExportOptions {
            store: self.store.clone(),
            out: self.out.clone(),
            compression,
            overwrite: self.overwrite,
            cells,
        })
    }
}
