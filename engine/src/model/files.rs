//! Saving and loading a model's weights (`weights.safetensors`) beside its description
//! (`model.json`, [`cpa_stream_stages::model::files`]), in a directory that appears complete or
//! not at all.

use std::path::Path;

pub use cpa_stream_stages::model::files::*;
use cpa_stream_stages::{Error, Result};
use tch::{Device, Tensor};

use super::network::CpaModel;
use crate::torch::TorchResult;

/// Writes `model.json` and the weights into `dir` (which must exist).
pub(crate) fn write_model_files(model: &CpaModel, dir: &Path) -> Result<()> {
    let weights = dir.join(WEIGHTS_FILE);
    model.var_store().save(&weights).map_err(|e| Error::torch(format!("writing {}", weights.display()), e))?;
    let file = ModelFile {
        format: MODEL_FORMAT.to_owned(),
        version: MODEL_VERSION,
        written_by: format!("cpa-stream {}", env!("CARGO_PKG_VERSION")),
        config: model.config().clone(),
        vocabulary: model.vocabulary().clone(),
        perturbation_features: model.perturbation_feature_width(),
        n_parameters: model.n_parameters(),
        weights_checksum: Some(weights_checksum(&weights)?),
        description_checksum: None,
    }
    .sealed()?;
    let path = dir.join(MODEL_FILE);
    let text = serde_json::to_string_pretty(&file).map_err(|e| Error::corrupt(&path, e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

/// Copies a saved tensor into a model's (or optimizer's) variable after checking that it is
/// the variable's: the same shape (libtorch would broadcast a [1] into a [120] silently), the
/// same element type, and finite values. `origin` names the file and `key` the tensor.
pub(crate) fn checked_copy(dst: &Tensor, src: &Tensor, origin: &str, key: &str) -> Result<()> {
    if src.size() != dst.size() {
        return Err(Error::InvalidInput(format!(
            "{origin}: tensor {key} has shape {:?}, the model needs {:?} (the weights are not this model's)",
            src.size(),
            dst.size()
        )));
    }
    if src.kind() != dst.kind() {
        return Err(Error::InvalidInput(format!(
            "{origin}: tensor {key} holds {:?} values, the model needs {:?}",
            src.kind(),
            dst.kind()
        )));
    }
    let finite = bool::try_from(src.f_isfinite().torch()?.f_all().torch()?).unwrap_or(false);
    if !finite {
        return Err(Error::InvalidInput(format!(
            "{origin}: tensor {key} holds NaN or infinite values (a diverged or damaged model)"
        )));
    }
    let mut dst = dst.shallow_clone();
    tch::no_grad(|| dst.f_copy_(src)).torch()?;
    Ok(())
}

/// Saves a model to `dir` atomically: everything is written to a temporary sibling that replaces
/// `dir` only when complete.
pub fn save_model(model: &CpaModel, dir: &Path) -> Result<()> {
    publish_dir(dir, |tmp| write_model_files(model, tmp))
}

/// Loads a model for prediction or further training on `device`.
pub fn load_model(dir: &Path, device: Device) -> Result<CpaModel> {
    let file = read_model_file(dir)?;
    let features = file
        .perturbation_features
        .map(|width| {
            tch::Tensor::f_zeros([file.vocabulary.n_perturbations() as i64, width], (tch::Kind::Float, device))
        })
        .transpose()
        .torch()?;
    let model = CpaModel::new(&file.config, &file.vocabulary, features.as_ref(), device, 0)?;
    let weights = dir.join(WEIGHTS_FILE);
    let model_bytes: u64 =
        model.var_store().variables().values().map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum();
    check_weights_file(&weights, model_bytes)?;
    if let Some(expected) = &file.weights_checksum {
        let actual = weights_checksum(&weights)?;
        if &actual != expected {
            return Err(Error::ChecksumMismatch {
                path: weights,
                expected: expected.clone(),
                actual: format!("{actual} (model.json records the weights it was written with)"),
            });
        }
    }
    fill_variables(&model, &weights, "the model of model.json", |_| false)?;
    Ok(model)
}

/// Copies every variable of `model` from the tensor of its name in the safetensors file
/// `weights` ([`checked_copy`]); `whose` names the model in errors. A variable without a tensor
/// is an error unless `may_lack(name)`; those are left as they are and returned. A tensor without
/// a variable is an error naming it.
pub(crate) fn fill_variables(
    model: &CpaModel,
    weights: &Path,
    whose: &str,
    may_lack: impl Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let origin = weights.display().to_string();
    let mut saved: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(weights)
        .map_err(|e| Error::corrupt(weights, format!("not a safetensors file of tensors: {e}")))?
        .into_iter()
        .collect();
    let mut variables: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let mut lacking = Vec::new();
    for (name, variable) in &variables {
        match saved.remove(name) {
            Some(src) => checked_copy(variable, &src, &origin, name)?,
            None if may_lack(name) => lacking.push(name.clone()),
            None => return Err(Error::InvalidInput(format!("{origin}: no tensor {name}, which {whose} needs"))),
        }
    }
    if !saved.is_empty() {
        let mut extra: Vec<&String> = saved.keys().collect();
        extra.sort();
        return Err(Error::InvalidInput(format!(
            "{origin}: tensors {whose} does not have: {}",
            extra.iter().take(5).map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(lacking)
}

/// Loads a model to run on data whose genes (var names, in column order) are `genes`; `what`
/// names that data in the error when the genes differ from the model's.
pub fn load_model_for(dir: &Path, genes: &[String], what: &str, device: Device) -> Result<CpaModel> {
    let file = read_model_file(dir)?;
    file.vocabulary.check_genes(genes, what)?;
    load_model(dir, device)
}
