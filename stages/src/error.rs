use std::io;
use std::path::PathBuf;

use arrow::error::ArrowError;
use cpa_stream_schemas::ManifestError;
use parquet::errors::ParquetError;

/// Result of this crate's fallible operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the stages. Each names the file (and row, column or block where there is one) and
/// what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("{}: {what} is {actual}, expected {expected}", path.display())]
    SizeMismatch { path: PathBuf, what: String, expected: u64, actual: u64 },
    #[error("{}: checksum is {actual}, the manifest records {expected} (file modified or corrupt)", path.display())]
    ChecksumMismatch { path: PathBuf, expected: String, actual: String },
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Parquet {
        path: PathBuf,
        #[source]
        source: ParquetError,
    },
    #[error("{context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: ArrowError,
    },
    #[error("{}: already exists (remove it or choose another output)", path.display())]
    OutputExists { path: PathBuf },
    #[error("{}: {context}: {source}", path.display())]
    Hdf5 {
        path: PathBuf,
        context: String,
        #[source]
        source: hdf5::Error,
    },
    #[error("{}: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error("{0}")]
    InvalidInput(String),
    #[error("libtorch: {context}: {source}")]
    Torch {
        context: String,
        #[source]
        source: tch::TchError,
    },
}

impl From<tch::TchError> for Error {
    fn from(source: tch::TchError) -> Error {
        Error::Torch { context: "tensor operation".to_owned(), source }
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::Corrupt { path: path.into(), reason: reason.into() }
    }

    pub(crate) fn parquet(path: impl Into<PathBuf>, source: ParquetError) -> Error {
        Error::Parquet { path: path.into(), source }
    }

    pub(crate) fn hdf5(path: impl Into<PathBuf>, context: impl Into<String>) -> impl FnOnce(hdf5::Error) -> Error {
        let (path, context) = (path.into(), context.into());
        move |source| Error::Hdf5 { path, context, source }
    }

    pub(crate) fn torch(context: impl Into<String>, source: tch::TchError) -> Error {
        Error::Torch { context: context.into(), source }
    }

    pub(crate) fn arrow(context: impl Into<String>, source: ArrowError) -> Error {
        Error::Arrow { context: context.into(), source }
    }
}
