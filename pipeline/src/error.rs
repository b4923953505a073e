//! The pipeline's one error type: the first error of a run, with the stage or file it came from.

use std::io;
use std::path::{Path, PathBuf};

use crate::Stage;
use arrow_schema::ArrowError;
use parquet::errors::ParquetError;

/// Result of pipeline runs.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The first error of a run, with the stage or file it came from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A stage (reader, encoder, batcher, trainer, predictor, sink, ...) failed.
    #[error("{stage}: {source}")]
    Stage {
        /// The stage, as the design names it.
        stage: Stage,
        /// What went wrong there.
        #[source]
        source: cpa_stream_stages::Error,
    },
    /// A worker thread of a stage panicked; the run stopped.
    #[error("{stage}: a worker thread panicked: {message}")]
    Panic {
        /// The stage whose thread panicked.
        stage: Stage,
        /// The panic's message.
        message: String,
    },
    /// Reading or writing a file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
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
    /// The operating system refused to start a worker thread.
    #[error("{name}: cannot start a thread: {source}")]
    Thread {
        /// The thread's name (its stage and number).
        name: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An output, options or input data that cannot be used; the message says which and why.
    #[error("{0}")]
    InvalidInput(String),
    /// The caller asked the run to stop ([`RunContext`](crate::RunContext)'s stop flag);
    /// nothing was published.
    #[error("interrupted; nothing was published")]
    Interrupted,
}

impl Error {
    /// Wraps a stage's error with the stage's name (`map_err(Error::stage(Stage::Reader))`).
    pub fn stage(stage: Stage) -> impl Fn(cpa_stream_stages::Error) -> Error + Copy {
        move |source| Error::Stage { stage, source }
    }

    /// An I/O error on `path` (`map_err(Error::io(&path))`).
    pub fn io(path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> Error {
        let path = path.as_ref().to_owned();
        move |source| Error::Io { path, source }
    }

    /// An Arrow error while doing `context`.
    pub fn arrow(context: impl Into<String>) -> impl FnOnce(ArrowError) -> Error {
        let context = context.into();
        move |source| Error::Arrow { context, source }
    }

    /// Turns a thread's panic payload into an error naming its stage.
    pub fn panic(stage: Stage, payload: Box<dyn std::any::Any + Send>) -> Error {
        Error::Panic { stage, message: cpa_stream_stages::crew::panic_message(payload.as_ref()) }
    }
}
