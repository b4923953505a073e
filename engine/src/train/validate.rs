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
use crate::torch::{TorchResult, torch_error};
use cpa_stream_pipeline::batcher::{LoaderOptions, PlanOptions, PoolStats, Shard, spawn_loader};
use cpa_stream_pipeline::encoder::{CellLabels, Split};
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::stats::r2_score;
use cpa_stream_pipeline::telemetry::StageStats;

/// Classes with fewer validation cells are left out of the R2 averages.
pub const MIN_CELLS_PER_CONDITION: f64 = 2.0;

/// Genes per condition in [`ValidationScore::r2_mean_deg`]: the top 20, as the field reports.
pub const DEG_GENES: usize = 20;

/// Neighbours of the k-NN purity (cpa-tools' 30, fewer in a smaller batch).
pub const KNN_NEIGHBOURS: i64 = 30;

/// Most cells among which neighbours are sought: a larger device batch is scored in pieces of
/// this size, so the distance matrix stays at 16 MiB whatever the batch size.
pub const KNN_MAX_CELLS: i64 = 2048;

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
    /// cpa-tools' disentanglement of the basal latent: the k-NN purity of the condition plus
    /// that of each covariate of more than one value, averaged over validation batches (lower:
    /// the basal state tells them apart less).
    pub disnt_basal: f64,
    /// The same in the full latent (basal + perturbation + covariates).
    pub disnt_after: f64,
    /// The score early stopping keeps the weights that maximise: by `training.validation_score`,
    /// `r2_mean + 0.5 * r2_var` (the reference's score without its k-NN disentanglement term),
    /// `r2_mean + r2_mean_deg`, or cpa-tools' `r2_mean + 0.5 * r2_var + exp(disnt_after -
    /// disnt_basal)`.
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
    // Sums over validation pieces of the k-NN purities (basal, after) and the pieces counted.
    let (mut knn_basal, mut knn_after, mut knn_pieces) = (0.0f64, 0.0f64, 0u64);
    // The labels of the purity: the condition, and each covariate of more than one value.
    let scored_covariates: Vec<usize> =
        labels.vocab.covariates.iter().enumerate().filter(|(_, c)| c.categories.len() > 1).map(|(i, _)| i).collect();
    let mut noise = Noise::new(Xoshiro256PlusPlus::seed_from_u64(0), device);
    // Validation reads every validation cell, whatever part of the training batches this
    // process trains on.
    let plan = PlanOptions { shuffle: false, shard: Shard::WHOLE, ..plan.clone() };
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
                    let mut label_sets = vec![b.conditions.shallow_clone()];
                    label_sets.extend(
                        scored_covariates.iter().filter_map(|&i| b.covariates.get(i)).map(|c| c.shallow_clone()),
                    );
                    for (basal, after) in knn_purities(&latents.z_basal, &latents.z, &label_sets)? {
                        knn_basal += basal;
                        knn_after += after;
                        knn_pieces += 1;
                    }
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
    let (disnt_basal, disnt_after) = if knn_pieces == 0 {
        (f64::NAN, f64::NAN)
    } else {
        (knn_basal / knn_pieces as f64, knn_after / knn_pieces as f64)
    };
    let score = match model.config().training.validation_score {
        _ if used == 0 => -recon,
        ValidationScoreKind::Degs if used_deg > 0 => r2_mean + r2_mean_deg,
        ValidationScoreKind::ReferenceKnn if knn_pieces > 0 => {
            r2_mean + 0.5 * r2_var + (disnt_after - disnt_basal).exp()
        }
        _ => r2_mean + 0.5 * r2_var,
    };
    Ok(ValidationScore { recon_loss: recon, r2_mean, r2_var, r2_mean_deg, disnt_basal, disnt_after, score, cells })
}

/// cpa-tools' disentanglement of one device batch, in pieces of at most [`KNN_MAX_CELLS`]
/// cells: for each piece of two cells or more, the k-NN purity of every label set summed, in
/// the basal latent and in the full latent.
fn knn_purities(basal: &Tensor, after: &Tensor, label_sets: &[Tensor]) -> cpa_stream_stages::Result<Vec<(f64, f64)>> {
    let n = basal.size().first().copied().unwrap_or(0);
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = KNN_MAX_CELLS.min(n - start);
        if len >= 2 {
            let piece = |t: &Tensor| t.f_narrow(0, start, len).torch();
            let labels = label_sets.iter().map(piece).collect::<cpa_stream_stages::Result<Vec<_>>>()?;
            let (b, a) = (knn_purity(&piece(basal)?, &labels)?, knn_purity(&piece(after)?, &labels)?);
            out.push((b, a));
        }
        start += len;
    }
    Ok(out)
}

/// The k-NN purity of `points` (cells x dims) for each label vector in `label_sets`, summed: for
/// each cell, the share of its k nearest other cells (Euclidean, k = min(cells - 1, 30)) that
/// carry its label; averaged within each label present, then over the labels (cpa-tools'
/// `knn_purity`, which scikit-learn computes; a cell is never its own neighbour).
fn knn_purity(points: &Tensor, label_sets: &[Tensor]) -> cpa_stream_stages::Result<f64> {
    let n = points.size().first().copied().unwrap_or(0);
    let k = KNN_NEIGHBOURS.min(n - 1);
    let points = points.f_to_kind(Kind::Float).torch()?;
    // Compute mode 2: exact differences, not the matrix-product expansion (whose rounding
    // reorders near neighbours).
    let distances = Tensor::f_cdist(&points, &points, 2.0, Some(2)).torch()?;
    let eye = Tensor::f_eye(n, (Kind::Bool, points.device())).torch()?;
    let distances = distances.f_masked_fill(&eye, f64::INFINITY).torch()?;
    let (_, neighbours) = distances.f_topk(k, 1, false, true).torch()?;
    let flat = neighbours.f_flatten(0, -1).torch()?;
    let mut total = 0.0;
    for labels in label_sets {
        let labels = labels.f_to_kind(Kind::Int64).torch()?;
        let theirs = labels.f_index_select(0, &flat).torch()?.f_view([n, k]).torch()?;
        let same = theirs.f_eq_tensor(&labels.f_unsqueeze(1).torch()?).torch()?;
        let per_cell = same.f_to_kind(Kind::Double).torch()?.f_mean_dim(1, false, Kind::Double).torch()?;
        let classes = labels.f_max().torch()?.int64_value(&[]) + 1;
        let zeros = Tensor::f_zeros([classes], (Kind::Double, points.device())).torch()?;
        let sums = zeros.f_index_add(0, &labels, &per_cell).torch()?;
        let ones = Tensor::f_ones([n], (Kind::Double, points.device())).torch()?;
        let counts = zeros.f_index_add(0, &labels, &ones).torch()?;
        let present = counts.f_gt(0.0).torch()?;
        let purity =
            sums.f_masked_select(&present).torch()?.f_div(&counts.f_masked_select(&present).torch()?).torch()?;
        total += purity.f_mean(Kind::Double).torch()?.double_value(&[]);
    }
    Ok(total)
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

    /// cpa-tools' k-NN purity computed the slow way: sorted distances to every other cell.
    fn purity_by_hand(points: &[[f64; 3]], labels: &[i64]) -> f64 {
        let n = points.len();
        let k = 30.min(n - 1);
        let mut per_cell = Vec::new();
        for i in 0..n {
            let mut others: Vec<(f64, usize)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| ((0..3).map(|d| (points[i][d] - points[j][d]).powi(2)).sum::<f64>(), j))
                .collect();
            others.sort_by(|a, b| a.0.total_cmp(&b.0));
            per_cell.push(others[..k].iter().filter(|(_, j)| labels[*j] == labels[i]).count() as f64 / k as f64);
        }
        let mut classes: Vec<i64> = labels.to_vec();
        classes.sort_unstable();
        classes.dedup();
        let means = classes.iter().map(|c| {
            let mine: Vec<f64> = (0..n).filter(|&i| labels[i] == *c).map(|i| per_cell[i]).collect();
            mine.iter().sum::<f64>() / mine.len() as f64
        });
        means.sum::<f64>() / classes.len() as f64
    }

    #[test]
    fn knn_purity_is_cpa_tools_per_label_mean_of_like_neighbours() -> cpa_stream_stages::Result<()> {
        // 90 points from a fixed sequence in three loose clusters; labels: the cluster, and a
        // label that ignores the clusters (missing label 3 in between: codes need not be dense).
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let points: Vec<[f64; 3]> = (0..90).map(|i| [(i % 3) as f64 * 1.5 + next(), next(), next()]).collect();
        let clusters: Vec<i64> = (0..90).map(|i| (i % 3) as i64).collect();
        let other: Vec<i64> = (0..90).map(|i| if i % 5 == 0 { 4 } else { (i / 7 % 2) as i64 }).collect();
        let flat: Vec<f32> = points.iter().flatten().map(|&v| v as f32).collect();
        let tensor = Tensor::from_slice(&flat).view([90, 3]);
        for labels in [&clusters, &other] {
            let got = knn_purity(&tensor, &[Tensor::from_slice(labels)])?;
            let want = purity_by_hand(&points, labels);
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        let both = knn_purity(&tensor, &[Tensor::from_slice(&clusters), Tensor::from_slice(&other)])?;
        assert!((both - purity_by_hand(&points, &clusters) - purity_by_hand(&points, &other)).abs() < 1e-9);
        // Well separated clusters are pure; a batch is scored in pieces, each of two cells or more.
        assert!(purity_by_hand(&points, &clusters) > 0.9);
        let pieces = knn_purities(&tensor, &tensor, &[Tensor::from_slice(&clusters)])?;
        assert_eq!(pieces.len(), 1);
        Ok(())
    }

    #[test]
    fn top_changes_rank_by_absolute_change_then_gene_order() {
        let control = [1.0, 1.0, 1.0, 1.0, 1.0];
        let condition = [1.5, 0.0, 1.0, 2.0, 0.5];
        assert_eq!(top_changes(&condition, &control, 3), [1, 3, 0]);
        assert_eq!(top_changes(&condition, &control, 10), [1, 3, 0, 4, 2]);
    }
}
