//! A conversion as its users ask for it (the CLI's `convert` flags, the Python package's
//! `convert` keywords), resolved into [`ConvertOptions`] in one place.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConvertOptions, DEFAULT_SHUFFLE_BUCKET_BYTES, Shuffle};
use crate::error::Result;
use crate::request::{CodecName, Naming};

/// A conversion request. `None` takes the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConvertRequest {
    /// The store read.
    pub store: PathBuf,
    /// The store written.
    pub out: PathBuf,
    /// The written store's matrix codec.
    pub codec: CodecName,
    /// zstd level (codec zstd).
    pub zstd_level: Option<i32>,
    /// Rows per compressed block (codec zstd).
    pub block_rows: Option<u32>,
    /// Write the cells in a random order drawn from this seed.
    pub shuffle: Option<u64>,
    /// MiB of one bucket of the shuffle [default: [`DEFAULT_SHUFFLE_BUCKET_BYTES`]].
    pub shuffle_memory_mib: Option<u64>,
    /// Replace an existing store.
    pub overwrite: bool,
    /// How messages name the settings.
    pub naming: Naming,
}

impl ConvertRequest {
    /// The options of the conversion, validated.
    pub fn options(&self) -> Result<ConvertOptions> {
        let n = self.naming;
        let bucket_bytes = match self.shuffle_memory_mib {
            Some(mib) => (n.bounded("--shuffle-memory-mib", mib as usize, 1, 1 << 30, "MiB")? as u64) << 20,
            None => DEFAULT_SHUFFLE_BUCKET_BYTES,
        };
        Ok(ConvertOptions {
            store: self.store.clone(),
            out: self.out.clone(),
            codec: n.codec(self.codec, self.zstd_level, self.block_rows)?,
            shuffle: self.shuffle.map(|seed| Shuffle { seed, bucket_bytes }),
            overwrite: self.overwrite,
        })
    }
}
