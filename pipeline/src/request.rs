//! What every command's request shares: how its messages name settings (the CLI's flags or the
//! Python package's keywords), and where its model runs.
//!
//! A command is asked for once, as a request type of its module (`TrainRequest`,
//! `PredictRequest`, `EvaluateRequest`, ...): serde (unknown fields refused), every setting
//! optional, resolved in one place into the command's options (defaults, a run's record,
//! validation, process-wide settings). The CLI only parses flags into a request and Python only
//! passes keywords into one, so that both run the same command from the same request.

use cpa_stream_schemas::{Codec, DEFAULT_ZSTD_BLOCK_ROWS, DEFAULT_ZSTD_LEVEL};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits::{MAX_BATCH_SIZE, MAX_PREFETCH, check};

/// How messages name a request's settings: as the CLI's flags or as keyword arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Naming {
    /// `--batch-key`.
    #[default]
    Flags,
    /// `batch_key`.
    Keywords,
}

impl Naming {
    /// A setting's name, given as its flag (`--batch-key`), as the caller spells it.
    pub fn name(self, flag: &str) -> String {
        match self {
            Naming::Flags => flag.to_owned(),
            Naming::Keywords => flag.trim_start_matches("--").replace('-', "_"),
        }
    }

    /// `value` when in `min..=max`, else an error naming the setting as the caller spells it.
    pub fn bounded(self, flag: &str, value: usize, min: usize, max: usize, what: &str) -> Result<usize> {
        check(&self.name(flag), value, min, max, what)
    }

    /// A batch size given (`--batch-size`), checked.
    pub fn batch_size(self, value: Option<usize>) -> Result<Option<usize>> {
        value.map(|b| self.bounded("--batch-size", b, 1, MAX_BATCH_SIZE, "cells per batch")).transpose()
    }

    /// Batches in flight given (`--prefetch`), checked.
    pub fn prefetch(self, value: Option<usize>) -> Result<Option<usize>> {
        value.map(|p| self.bounded("--prefetch", p, 1, MAX_PREFETCH, "batches in flight")).transpose()
    }
}

/// Where a model command runs: the device and the threads (libtorch's and the batcher's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Compute {
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// libtorch threads; `None`: planned from the usable CPUs.
    pub threads: Option<usize>,
    /// Gather workers; `None`: planned with the threads.
    pub workers: Option<usize>,
}

impl Default for Compute {
    fn default() -> Self {
        Compute { device: "cpu".to_owned(), threads: None, workers: None }
    }
}

/// The matrix codec of a store a command writes (`import`, `convert`, `synth`), as asked for:
/// the codec's name and, for zstd, its level and rows per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecName {
    /// Plain little-endian arrays, read without copying.
    #[default]
    Raw,
    /// zstd-compressed blocks of rows, for disk-bound atlases.
    Zstd,
}

impl std::str::FromStr for CodecName {
    type Err = Error;

    fn from_str(text: &str) -> Result<CodecName> {
        match text {
            "raw" => Ok(CodecName::Raw),
            "zstd" => Ok(CodecName::Zstd),
            other => Err(Error::InvalidInput(format!("codec {other:?}: expected raw or zstd"))),
        }
    }
}

impl Naming {
    /// The codec of `name` with zstd's `level` and `block_rows` (defaults
    /// [`DEFAULT_ZSTD_LEVEL`], [`DEFAULT_ZSTD_BLOCK_ROWS`]), checked.
    pub fn codec(self, name: CodecName, level: Option<i32>, block_rows: Option<u32>) -> Result<Codec> {
        let (level, block_rows) = (level.unwrap_or(DEFAULT_ZSTD_LEVEL), block_rows.unwrap_or(DEFAULT_ZSTD_BLOCK_ROWS));
        match name {
            CodecName::Raw => Ok(Codec::Raw),
            CodecName::Zstd if block_rows == 0 => {
                Err(Error::InvalidInput(format!("{} must be at least 1", self.name("--block-rows"))))
            }
            CodecName::Zstd if !(-7..=22).contains(&level) => {
                Err(Error::InvalidInput(format!("{} must be in -7..=22", self.name("--zstd-level"))))
            }
            CodecName::Zstd => Ok(Codec::zstd_with(level, block_rows)),
        }
    }
}

/// An error for two settings given together where one is asked for.
pub fn choose_one(naming: Naming, a: &str, b: &str) -> Error {
    Error::InvalidInput(format!("{} and {} both given; choose one", naming.name(a), naming.name(b)))
}
