//! The Compositional Perturbation Autoencoder in libtorch.
//!
//! - [`config`], [`vocab`]: the configuration and vocabularies (from
//!   [`cpa_stream_stages::model`], which describes a model without libtorch).
//! - [`batch`]: host batches and their device form.
//! - [`network`]: the model itself ([`CpaModel`]).
//! - [`likelihood`]: NB, ZINB and Gaussian log-likelihoods; [`fused_nb`]: the NB's as one autograd node.
//! - [`files`]: saving and loading a model directory.
//!
//! Training lives in [`crate::trainer`].

pub mod batch;
pub mod files;
pub mod fused_nb;
pub mod import;
pub mod layers;
pub mod likelihood;
pub mod network;

pub use batch::{DeviceBatch, DevicePerts, ToDevice};
pub use cpa_stream_stages::model::files::read_model_file;
pub use cpa_stream_stages::model::{CpaConfig, HostBatch, PerturbationCsr, Vocabulary, config, vocab};
pub use files::{load_model, load_model_for, save_model};
pub use network::CpaModel;
