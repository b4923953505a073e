/// Result of pipeline runs.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The first error of a run, with the stage it came from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{stage}: {source}")]
    Stage {
        stage: &'static str,
        #[source]
        source: cpa_stream_stages::Error,
    },
    #[error("{stage}: a worker thread panicked: {message}")]
    Panic { stage: &'static str, message: String },
    #[error("{0}")]
    InvalidInput(String),
}

impl Error {
    pub(crate) fn stage(stage: &'static str) -> impl FnOnce(cpa_stream_stages::Error) -> Error {
        move |source| Error::Stage { stage, source }
    }

    /// Turns a thread's panic payload into an error.
    pub(crate) fn panic(stage: &'static str, payload: Box<dyn std::any::Any + Send>) -> Error {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic payload".to_owned());
        Error::Panic { stage, message }
    }
}
