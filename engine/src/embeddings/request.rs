//! Embeddings as their users ask for them, resolved into [`EmbeddingsOptions`] in one place.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::EmbeddingsOptions;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::request::Naming;

/// The embeddings as their users ask for them (the CLI's `embeddings` flags; the Python
/// package's `Run.perturbation_embeddings` and `covariate_embeddings`, which read them without
/// an `out`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddingsRequest {
    /// A run directory (its `model/` is used) or a model directory.
    pub model: PathBuf,
    /// The directory written by [`run`](super::run): `perturbations.parquet`, `covariates.parquet`.
    pub out: Option<PathBuf>,
    /// Replace an existing embeddings directory.
    pub overwrite: bool,
    /// How messages name the settings.
    pub naming: Naming,
}

impl EmbeddingsRequest {
    /// The options of the request (nothing to resolve but the model's directory, checked).
    pub fn options(&self) -> Result<EmbeddingsOptions> {
        if self.model.as_os_str().is_empty() {
            return Err(Error::InvalidInput(format!("{}: no model given", self.naming.name("--model"))));
        }
        Ok(EmbeddingsOptions { model: self.model.clone(), out: self.out.clone(), overwrite: self.overwrite })
    }
}
