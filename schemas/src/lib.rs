//! Schemas shared by every cpa-stream crate: the store manifest (`manifest.json`) and the Arrow
//! schemas of the store's tables (`obs.parquet`, `var.parquet`, `truth.parquet`).
//!
//! Every file cpa-stream writes has its schema defined here, once; tests compare written files
//! against these definitions.

#![warn(missing_docs)]

mod manifest;
pub mod tables;

pub use manifest::{
    BlockChecksum, ChecksumAlgorithm, Codec, DEFAULT_ZSTD_BLOCK_ROWS, DEFAULT_ZSTD_LEVEL, FileEntry, MANIFEST_FILE,
    MAX_MANIFEST_BYTES, Manifest, ManifestError, MatrixDtypes, Planes, STORE_FORMAT, STORE_FORMAT_VERSION,
    STORE_FORMAT_VERSION_APPENDED, StoreFiles, Version,
};
