//! What the Compositional Perturbation Autoencoder is described by, without libtorch: its typed
//! configuration, its vocabularies, the host batches the loader fills and the description of a
//! saved model. The model itself, its training and its saved weights are in the
//! `cpa-stream-engine` crate (`cpa_stream_engine::model`), which the commands that need no model
//! do not link.
//!
//! - [`config`]: the typed configuration (`cpa.toml`) and its documented defaults.
//! - [`vocab`]: genes, perturbations, covariates and condition classes; parsing of obs conditions.
//! - [`batch`]: host batches (CSR counts and doses, covariate codes).
//! - [`files`]: a model directory's description (`model.json`) and its atomic publication.

pub mod batch;
pub mod config;
pub mod files;
pub mod vocab;

pub use batch::{HostBatch, PerturbationCsr};
pub use config::CpaConfig;
pub use files::read_model_file;
pub use vocab::Vocabulary;
