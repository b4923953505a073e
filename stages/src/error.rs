use std::io;
use std::path::PathBuf;

use arrow_schema::ArrowError;
use cpa_stream_schemas::ManifestError;
use parquet::errors::ParquetError;

/// Result of this crate's fallible operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the stages. Each names the file (and row, column or block where there is one) and
/// what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A store's `manifest.json` is not one this build reads.
    #[error("{}: {source}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ManifestError,
    },
    /// A file or array has another size than its description says.
    #[error("{}: {what} is {actual}, expected {expected}", path.display())]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// What was measured.
        what: String,
        /// The size expected.
        expected: u64,
        /// The size found.
        actual: u64,
    },
    /// A file's checksum is not the one the manifest records.
    #[error("{}: checksum is {actual}, the manifest records {expected} (file modified or corrupt)", path.display())]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// The recorded checksum.
        expected: String,
        /// The computed checksum.
        actual: String,
    },
    /// A file's content breaks the format (the reason names the row, column or block).
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        reason: String,
    },
    /// Reading or writing a Parquet file failed.
    #[error("{}: {source}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The Parquet library's error.
        #[source]
        source: ParquetError,
    },
    /// Building or reading an Arrow table failed.
    #[error("{context}: {source}")]
    Arrow {
        /// What was being built or read.
        context: String,
        /// The Arrow library's error.
        #[source]
        source: ArrowError,
    },
    /// The output already exists.
    #[error("{}: already exists (remove it or choose another output)", path.display())]
    OutputExists {
        /// The output.
        path: PathBuf,
    },
    /// An HDF5 (`.h5ad`) operation failed.
    #[error("{}: {context}: {source}", path.display())]
    Hdf5 {
        /// The file.
        path: PathBuf,
        /// The element and the operation.
        context: String,
        /// The HDF5 library's error.
        #[source]
        source: hdf5::Error,
    },
    /// A file uses an encoding this build does not read.
    #[error("{}: {reason}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Which encoding, and where.
        reason: String,
    },
    /// Options or data that cannot be used; the message says which and why.
    #[error("{0}")]
    InvalidInput(String),
    /// Training produced a loss that is NaN or infinite: the model diverged, or a batch held a
    /// non-finite value. Nothing after it is saved.
    #[error(
        "epoch {epoch}, batch {batch}: a training loss is not finite (NaN or infinite); the model diverged \
         (lower lr or adv_lr, or keep do_clip_grad on) or the batch holds a non-finite value (`cpa-stream verify`)"
    )]
    Diverged {
        /// The epoch (0-based).
        epoch: u32,
        /// The batch of the epoch (0-based).
        batch: u64,
    },
    /// A libtorch operation failed.
    #[error("libtorch: {context}: {source}")]
    Torch {
        /// What the model was doing.
        context: String,
        /// libtorch's error (`tch::TchError`; boxed so that this crate does not link libtorch).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }

    /// A file whose content breaks the format, and why.
    pub fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::Corrupt { path: path.into(), reason: reason.into() }
    }

    /// A Parquet error on `path`.
    pub fn parquet(path: impl Into<PathBuf>, source: ParquetError) -> Error {
        Error::Parquet { path: path.into(), source }
    }

    pub(crate) fn hdf5(path: impl Into<PathBuf>, context: impl Into<String>) -> impl FnOnce(hdf5::Error) -> Error {
        let (path, context) = (path.into(), context.into());
        move |source| Error::Hdf5 { path, context, source }
    }

    /// A libtorch error with what the model was doing.
    pub fn torch(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Torch { context: context.into(), source: Box::new(source) }
    }

    /// An Arrow error while building or reading `context`.
    pub fn arrow(context: impl Into<String>, source: ArrowError) -> Error {
        Error::Arrow { context: context.into(), source }
    }
}
