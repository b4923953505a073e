//! A model made from another tool's trained weights (cpa-tools' `model.pt`, translated by the
//! Python package): the network the configuration describes, its variables filled from a
//! safetensors file of cpa-stream's names, checked one by one, and saved as a cpa-stream model.

use std::path::Path;

use serde::Serialize;
use tch::Device;

use super::files::{check_weights_file, fill_variables, save_model};
use super::network::{CpaModel, GROUP_ADV};
use cpa_stream_stages::Result;
use cpa_stream_stages::model::{CpaConfig, Vocabulary};

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportSummary {
    /// Variables filled from the file.
    pub copied: usize,
    /// Variables the file has no tensor for, left as initialised: the adversaries' (the other
    /// tool does not save them; they matter only to further training).
    pub initialised: Vec<String>,
    /// Parameters of the model.
    pub n_parameters: i64,
}

/// Builds the model of `config` and `vocabulary`, fills every variable from the tensor of the
/// same name in `weights` (a safetensors file), and saves it to `out` (complete or not at all).
/// A variable without a tensor is an error unless it belongs to the adversaries; a tensor without
/// a variable, or of another shape, is an error naming it.
pub fn import_weights(
    config: &CpaConfig,
    vocabulary: &Vocabulary,
    weights: &Path,
    out: &Path,
) -> Result<ImportSummary> {
    let model = CpaModel::new(config, vocabulary, None, Device::Cpu, config.training.seed)?;
    let model_bytes: u64 =
        model.var_store().variables().values().map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum();
    // A regular file whose header describes exactly its bytes, and no more than the model holds.
    check_weights_file(weights, model_bytes)?;
    let adversary = format!("{GROUP_ADV}.");
    let initialised = fill_variables(&model, weights, "the converted model", |name| name.starts_with(&adversary))?;
    let copied = model.var_store().variables().len() - initialised.len();
    save_model(&model, out)?;
    Ok(ImportSummary { copied, initialised, n_parameters: model.n_parameters() })
}
