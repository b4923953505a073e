//! The Compositional Perturbation Autoencoder in libtorch.
//!
//! - [`config`]: the typed configuration (`cpa.toml`) and its documented defaults.
//! - [`vocab`]: genes, perturbations, covariates and condition classes; parsing of obs conditions.
//! - [`batch`]: host batches (CSR counts and doses, covariate codes) and their device form.
//! - [`network`]: the model itself ([`CpaModel`]).
//! - [`likelihood`]: NB, ZINB and Gaussian log-likelihoods.
//! - [`files`]: saving and loading a model directory.
//!
//! Training lives in [`crate::trainer`].

pub mod batch;
pub mod config;
pub mod files;
pub mod layers;
pub mod likelihood;
pub mod network;
pub mod vocab;

pub use batch::{DeviceBatch, DevicePerts, HostBatch, PerturbationCsr};
pub use config::CpaConfig;
pub use files::{load_model, load_model_for, read_model_file, save_model};
pub use network::CpaModel;
pub use vocab::Vocabulary;
