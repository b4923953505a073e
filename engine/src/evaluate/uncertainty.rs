//! How far each evaluated condition lies from what the model was trained on (cpa-tools'
//! `compute_uncertainty`): the condition's latent shift (perturbation latent plus covariate
//! embeddings) against those of every training condition with enough training cells; the
//! smallest cosine and Euclidean distances, and the closest condition. Large values flag
//! predictions to trust less (an unseen combination, a perturbation in a new cell type).

use std::collections::BTreeMap;

use crate::model::{CpaModel, PerturbationCsr};
use tch::{Device, Kind, Tensor};

use super::moments::GroupMoments;
use crate::Stage;
use crate::model::ToDevice as _;
use crate::torch::TorchResult;
use cpa_stream_pipeline::condition::{ConditionKey, MappedGroup};
use cpa_stream_pipeline::encoder::Split;
use cpa_stream_pipeline::error::{Error, Result};

/// Training conditions with fewer training cells are not compared with (cpa-tools' threshold).
pub const MIN_TRAINING_CELLS: f64 = 30.0;

/// A condition as the shifts are computed from it: covariate codes and perturbation parts.
type ConditionParts<'a> = (&'a [u32], &'a [(u32, f32)]);

/// A condition's distances to the closest training condition.
#[derive(Debug, Clone)]
pub struct Uncertainty {
    /// Smallest cosine distance (1 - cosine similarity).
    pub cosine: f64,
    /// Smallest Euclidean distance.
    pub euclidean: f64,
    /// The training condition closest by Euclidean distance (`condition dose (covariates)`;
    /// cosine distances tie between the doses of one perturbation, whose shifts are parallel).
    pub closest: String,
}

/// The distances of each of `keys` (with its perturbation parts) to the training conditions
/// among `groups`; `None` for every key when no condition has enough training cells.
pub(super) fn uncertainties(
    model: &CpaModel,
    groups: &[Option<MappedGroup>],
    moments: &GroupMoments,
    keys: &[(ConditionKey, Vec<(u32, f32)>)],
) -> Result<Vec<Option<Uncertainty>>> {
    // Training conditions: label groups merged by condition (any part order), with their cells.
    let mut training: BTreeMap<ConditionKey, (f64, &MappedGroup)> = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        let Some(group) = group else { continue };
        let n = moments.of(g, |s| s == Split::Train).n;
        training.entry(group.key.clone()).or_insert((0.0, group)).0 += n;
    }
    training.retain(|_, (n, _)| *n > MIN_TRAINING_CELLS);
    if training.is_empty() || keys.is_empty() {
        return Ok(vec![None; keys.len()]);
    }
    let names: Vec<String> = training.values().map(|(_, g)| label(model, g)).collect();
    let train_shifts: Vec<ConditionParts<'_>> =
        training.iter().map(|(k, (_, g))| (k.covariates.as_slice(), g.parts.as_slice())).collect();
    let query: Vec<ConditionParts<'_>> =
        keys.iter().map(|(k, parts)| (k.covariates.as_slice(), parts.as_slice())).collect();
    let (a, b) = tch::no_grad(|| -> cpa_stream_stages::Result<(Tensor, Tensor)> {
        Ok((shifts(model, &query)?, shifts(model, &train_shifts)?))
    })
    .map_err(Error::stage(Stage::Predictor))?;
    let (cosine, euclidean) = tch::no_grad(|| -> cpa_stream_stages::Result<(Vec<f64>, Vec<f64>)> {
        let unit = |t: &Tensor| -> cpa_stream_stages::Result<Tensor> {
            let norm = t.f_norm_scalaropt_dim(2, [1i64].as_slice(), true).torch()?.f_clamp_min(1e-12).torch()?;
            t.f_div(&norm).torch()
        };
        let cos = Tensor::f_ones([1], (Kind::Double, Device::Cpu))
            .torch()?
            .f_sub(&unit(&a)?.f_matmul(&unit(&b)?.f_t_().torch()?).torch()?)
            .torch()?;
        let euc = Tensor::f_cdist(&a, &b, 2.0, None::<i64>).torch()?;
        let flat = |t: Tensor| -> cpa_stream_stages::Result<Vec<f64>> {
            Vec::<f64>::try_from(&t.f_flatten(0, -1).torch()?).torch()
        };
        Ok((flat(cos)?, flat(euc)?))
    })
    .map_err(Error::stage(Stage::Predictor))?;
    let t = names.len();
    Ok((0..keys.len())
        .map(|i| {
            let row = |v: &[f64]| v[i * t..(i + 1) * t].to_vec();
            let (cos, euc) = (row(&cosine), row(&euclidean));
            let best = (0..t).min_by(|&x, &y| euc[x].total_cmp(&euc[y]))?;
            // Rounding leaves ~1e-16 where a condition meets itself.
            let cosine = cos.iter().copied().fold(f64::INFINITY, f64::min);
            Some(Uncertainty {
                cosine: if cosine < 1e-12 { 0.0 } else { cosine },
                euclidean: euc[best],
                closest: names[best].clone(),
            })
        })
        .collect())
}

/// The latent shift of each (covariates, parts): `z_pert` plus the covariate embeddings, one row
/// each (float64, on the CPU).
fn shifts(model: &CpaModel, conditions: &[ConditionParts<'_>]) -> cpa_stream_stages::Result<Tensor> {
    let device = model.device();
    let mut perts = PerturbationCsr::new();
    for (_, parts) in conditions {
        perts.push(parts);
    }
    let z_pert = model.perturbation_latent(&perts.to_device(device)?)?;
    let n_covs = model.vocabulary().covariates.len();
    let codes: Vec<Tensor> = (0..n_covs)
        .map(|c| {
            let column: Vec<i64> = conditions.iter().map(|(covs, _)| i64::from(covs[c])).collect();
            Tensor::f_from_slice(&column).torch()?.f_to_device(device).torch()
        })
        .collect::<cpa_stream_stages::Result<_>>()?;
    let mut z = z_pert;
    for emb in model.covariate_latents(&codes)? {
        z = z.f_add(&emb).torch()?;
    }
    z.f_to_kind(Kind::Double).torch()?.f_to_device(Device::Cpu).torch()
}

/// `condition dose (covariate values)` of a label group.
fn label(model: &CpaModel, group: &MappedGroup) -> String {
    let covs: Vec<&str> = group
        .key
        .covariates
        .iter()
        .zip(&model.vocabulary().covariates)
        .map(|(&c, cov)| cov.categories.get(c as usize).map_or("?", String::as_str))
        .collect();
    if covs.is_empty() {
        format!("{} {}", group.condition, group.dose)
    } else {
        format!("{} {} ({})", group.condition, group.dose, covs.join(", "))
    }
}
