//! Validation: reconstruction of held-out cells under their own condition, scored like the
//! reference's training metric (R2 of per-condition gene means and variances, log1p space for
//! count models), from sufficient statistics accumulated on the device.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::model::config::ValidationScoreKind;
use crate::model::layers::Noise;
use crate::model::{CpaModel, DeviceBatch};
use cpa_stream_stages::store::Store;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::Stage;
use crate::batcher::{LoaderOptions, PlanOptions, PoolStats, spawn_loader};
use crate::encoder::{CellLabels, Split};
use crate::error::{Error, Result};
use crate::stats::r2_score;
use crate::telemetry::StageStats;
use crate::torch::{TorchResult, torch_error};

/// Classes with fewer validation cells are left out of the R2 averages.
pub const MIN_CELLS_PER_CONDITION: f64 = 2.0;

/// Genes per condition in [`ValidationScore::r2_mean_deg`]: the top 20, as the field reports.
pub const DEG_GENES: usize = 20;

/// Validation figures of one pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ValidationScore {
    /// Negative log-likelihood per cell.
    pub recon_loss: f64,
    /// Mean over conditions of the R2 (over genes) of predicted vs observed gene means.
    pub r2_mean: f64,
    /// The same for gene variances.
    pub r2_var: f64,
    /// Mean over the perturbed conditions of the R2 of the means of each one's top
    /// [`DEG_GENES`] genes by change from the validation controls (NaN without control cells).
    pub r2_mean_deg: f64,
    /// The score early stopping keeps the weights that maximise: by `training.validation_score`,
    /// `r2_mean + 0.5 * r2_var` (the reference's score without its k-NN disentanglement term) or
    /// `r2_mean + r2_mean_deg`.
    pub score: f64,
    /// Cells scored.
    pub cells: u64,
}

// Long: the accumulation on the device and the scores from it share a dozen tensors.
/// Scores `model` on the cells of `split`.
pub fn validate(
    model: &CpaModel,
    store: &Arc<Store>,
    labels: &Arc<CellLabels>,
    split: Split,
    plan: &PlanOptions,
    loader: LoaderOptions,
    stop: Arc<AtomicBool>,
) -> Result<ValidationScore> {
    let device = model.device();
    let torch = Error::stage(Stage::Validation);
    let classes = labels.vocab.conditions.len() as i64;
    let genes = labels.vocab.n_genes() as i64;
    let zeros = || Tensor::f_zeros([classes, genes], (Kind::Float, device)).map_err(|e| torch(torch_error(e)));
    let (mut sum_t, mut sum_p, mut sq_t, mut sq_p) = (zeros()?, zeros()?, zeros()?, zeros()?);
    let mut counts = Tensor::f_zeros([classes], (Kind::Float, device)).map_err(|e| torch(torch_error(e)))?;
    let mut recon = Tensor::f_zeros([], (Kind::Float, device)).map_err(|e| torch(torch_error(e)))?;
    let mut cells = 0u64;
    let mut noise = Noise::new(Xoshiro256PlusPlus::seed_from_u64(0), device);
    let plan = PlanOptions { shuffle: false, ..plan.clone() };
    let consumer = StageStats::new(Stage::Validation, 1);
    let count_model = model.config().model.recon_loss.is_count();
    {
        let stats = PoolStats::planned(loader.workers);
        let mut loaded = spawn_loader(store, labels, split, 0, 0, &plan, loader, stats, stop)?;
        while let Some(gathered) = loaded.next(&consumer) {
            let batch = gathered?.batch;
            let mut step = || -> cpa_stream_stages::Result<()> {
                tch::no_grad(|| -> cpa_stream_stages::Result<()> {
                    let b = DeviceBatch::upload(&batch, device)?;
                    let (x_in, library) = model.input(&b.x)?;
                    let encoded = model.encode(&x_in, false, false, &mut noise)?;
                    let z_pert = model.perturbation_latent(&b.perts)?;
                    let covs = model.covariate_latents(&b.covariates)?;
                    let latents = model.compose(&encoded.z_basal, &z_pert, &covs)?;
                    let generative = model.decode(&latents.z, &latents.z_pert, library.as_ref(), false, &mut noise)?;
                    let ll = model.log_likelihood(&b.x, Some(&b.entries), &generative)?;
                    recon = recon.f_sub(&ll.f_sum(Kind::Float).torch()?).torch()?;
                    let (t, p) = if count_model {
                        (b.x.f_log1p().torch()?, generative.mean().f_log1p().torch()?)
                    } else {
                        (b.x.shallow_clone(), generative.mean().shallow_clone())
                    };
                    let c = &b.conditions;
                    sum_t = sum_t.f_index_add(0, c, &t).torch()?;
                    sum_p = sum_p.f_index_add(0, c, &p).torch()?;
                    sq_t = sq_t.f_index_add(0, c, &t.f_square().torch()?).torch()?;
                    sq_p = sq_p.f_index_add(0, c, &p.f_square().torch()?).torch()?;
                    counts = counts
                        .f_index_add(0, c, &Tensor::f_ones([b.n_cells], (Kind::Float, device)).torch()?)
                        .torch()?;
                    Ok(())
                })
            };
            step().map_err(torch)?;
            cells += batch.n_cells() as u64;
            loaded.recycle(batch);
        }
    }
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        let t =
            t.f_to_kind(Kind::Double).and_then(|t| t.f_to_device(Device::Cpu)).map_err(|e| torch(torch_error(e)))?;
        Vec::<f64>::try_from(&t.f_flatten(0, -1).map_err(|e| torch(torch_error(e)))?).map_err(|e| torch(torch_error(e)))
    };
    let (st, sp, qt, qp, n) = (host(&sum_t)?, host(&sum_p)?, host(&sq_t)?, host(&sq_p)?, host(&counts)?);
    let recon = host(&recon)?.first().copied().unwrap_or(f64::NAN) / cells.max(1) as f64;
    let g = genes as usize;
    let means = |sums: &[f64], c: usize| -> Vec<f64> { sums[c * g..(c + 1) * g].iter().map(|s| s / n[c]).collect() };
    // The validation controls' true means, the reference for each condition's DEGs.
    let vocab = &labels.vocab;
    let control = vocab
        .conditions
        .iter()
        .position(|c| c == vocab.control())
        .filter(|&c| n[c] >= MIN_CELLS_PER_CONDITION)
        .map(|c| means(&st, c));
    let (mut r2m, mut r2v, mut used) = (0.0, 0.0, 0usize);
    let (mut r2d, mut used_deg) = (0.0, 0usize);
    for (c, &n_c) in n.iter().enumerate().take(classes as usize) {
        if n_c < MIN_CELLS_PER_CONDITION {
            continue;
        }
        let (mt, mp) = (means(&st, c), means(&sp, c));
        let vt: Vec<f64> = means(&qt, c).iter().zip(&mt).map(|(q, m)| (q - m * m).max(0.0)).collect();
        let vp: Vec<f64> = means(&qp, c).iter().zip(&mp).map(|(q, m)| (q - m * m).max(0.0)).collect();
        r2m += r2_score(&mp, &mt);
        r2v += r2_score(&vp, &vt);
        used += 1;
        if let Some(control) = control.as_ref().filter(|_| vocab.conditions[c] != vocab.control()) {
            let degs = top_changes(&mt, control, DEG_GENES);
            let pick = |v: &[f64]| degs.iter().map(|&i| v[i]).collect::<Vec<f64>>();
            r2d += r2_score(&pick(&mp), &pick(&mt));
            used_deg += 1;
        }
    }
    let (r2_mean, r2_var) = if used == 0 { (f64::NAN, f64::NAN) } else { (r2m / used as f64, r2v / used as f64) };
    let r2_mean_deg = if used_deg == 0 { f64::NAN } else { r2d / used_deg as f64 };
    let score = match model.config().training.validation_score {
        _ if used == 0 => -recon,
        ValidationScoreKind::Degs if used_deg > 0 => r2_mean + r2_mean_deg,
        _ => r2_mean + 0.5 * r2_var,
    };
    Ok(ValidationScore { recon_loss: recon, r2_mean, r2_var, r2_mean_deg, score, cells })
}

/// The indices of the `k` largest `|a - b|`, ties in gene order.
fn top_changes(a: &[f64], b: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..a.len()).collect();
    order.sort_by(|&i, &j| (a[j] - b[j]).abs().total_cmp(&(a[i] - b[i]).abs()).then(i.cmp(&j)));
    order.truncate(k);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_changes_rank_by_absolute_change_then_gene_order() {
        let control = [1.0, 1.0, 1.0, 1.0, 1.0];
        let condition = [1.5, 0.0, 1.0, 2.0, 0.5];
        assert_eq!(top_changes(&condition, &control, 3), [1, 3, 0]);
        assert_eq!(top_changes(&condition, &control, 10), [1, 3, 0, 4, 2]);
    }
}
