//! What an epoch of training reports: the running sums the trainer keeps on the device (their
//! layout), the epoch's means ([`EpochMetrics`]), and cpa-tools' per-batch training R2.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::torch::TorchResult;
use cpa_stream_stages::Result;

/// Slots of the running sums before the covariates' (see [`Sums`]).
const FIXED: usize = 9;
/// Sums of checkpoints written before the training R2 and the per-adversary figures were kept:
/// recon, kl, adversary loss, penalty, perturbation accuracy (the first five of today's).
pub const OLD_SUMS: usize = 5;

/// The layout of the running sums: recon, kl (per autoencoder batch), adversary loss, penalty,
/// perturbation accuracy (per adversary batch), training `r2_mean`, `r2_var` (per autoencoder
/// batch), the perturbation adversary's loss and penalty (per adversary batch), then each
/// covariate adversary's loss, penalty and accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sums {
    covariates: usize,
}

impl Sums {
    /// Sums for a model of `covariates` covariates.
    pub fn new(covariates: usize) -> Sums {
        Sums { covariates }
    }

    /// How many sums there are.
    pub fn slots(self) -> usize {
        FIXED + 3 * self.covariates
    }

    /// An autoencoder batch's row: its losses and training R2, zeros elsewhere.
    pub fn autoencoder_row(self, recon: &Tensor, kl: &Tensor, r2: &(Tensor, Tensor)) -> Result<Tensor> {
        self.row(recon, &[(0, recon), (1, kl), (5, &r2.0), (6, &r2.1)])
    }

    /// An adversary batch's row: the summed loss and penalty, the perturbation accuracy, and each
    /// adversary's own figures, zeros elsewhere (and for a covariate with no adversary).
    pub fn adversary_row(self, out: &Heads) -> Result<Tensor> {
        let total = |f: fn(&HeadTensors) -> &Tensor| -> Result<Tensor> {
            let mut sum = f(&out.perts).f_detach().torch()?;
            for head in out.covariates.iter().flatten() {
                sum = sum.f_add(f(head)).torch()?;
            }
            Ok(sum)
        };
        let (loss, penalty) = (total(|h| &h.loss)?, total(|h| &h.penalty)?);
        let mut values = vec![(2, &loss), (3, &penalty), (4, &out.perts.accuracy)];
        values.extend([(7, &out.perts.loss), (8, &out.perts.penalty)]);
        for (i, head) in out.covariates.iter().enumerate() {
            let Some(head) = head else { continue };
            let at = FIXED + 3 * i;
            values.extend([(at, &head.loss), (at + 1, &head.penalty), (at + 2, &head.accuracy)]);
        }
        self.row(&out.perts.loss, &values)
    }

    /// A row of the sums holding `values` at their slots, zeros elsewhere.
    fn row(self, like: &Tensor, values: &[(usize, &Tensor)]) -> Result<Tensor> {
        let zero = Tensor::f_zeros([], (Kind::Float, like.device())).torch()?;
        let mut row: Vec<Tensor> = (0..self.slots()).map(|_| zero.shallow_clone()).collect();
        for (slot, value) in values {
            row[*slot] = value.f_detach().torch()?.f_to_kind(Kind::Float).torch()?.f_reshape([]).torch()?;
        }
        Tensor::f_stack(&row, 0).torch()
    }

    /// Epoch `epoch`'s means from the sums read back and their counts (autoencoder batches,
    /// adversary batches, cells), at learning rate `lr`; `has_adversary[i]` says whether
    /// covariate `i` has an adversary (one of a single value has none: its figures are NaN).
    pub fn means(
        self,
        sums: &[f32],
        counts: (u64, u64, u64),
        has_adversary: &[bool],
        epoch: u32,
        lr: f64,
    ) -> EpochMetrics {
        let (ae, adv, cells) = counts;
        let mean = |slot: usize, n: u64| match sums.get(slot) {
            Some(s) if n > 0 => f64::from(*s) / n as f64,
            _ => f64::NAN,
        };
        let covariates = (0..self.covariates)
            .map(|i| {
                let at = FIXED + 3 * i;
                if has_adversary.get(i).copied().unwrap_or(false) {
                    HeadMetrics { adv: mean(at, adv), penalty: mean(at + 1, adv), acc: mean(at + 2, adv) }
                } else {
                    HeadMetrics::ABSENT
                }
            })
            .collect();
        EpochMetrics {
            epoch,
            recon_loss: mean(0, ae),
            kl: mean(1, ae),
            adv_loss: mean(2, adv),
            penalty_adv: mean(3, adv),
            acc_perts: mean(4, adv),
            r2_mean: mean(5, ae),
            r2_var: mean(6, ae),
            adv_perts: mean(7, adv),
            penalty_perts: mean(8, adv),
            covariates,
            autoencoder_batches: ae,
            adversary_batches: adv,
            cells,
            lr,
        }
    }

    /// Sums saved by a checkpoint, as this layout holds them: today's as they are; an older
    /// checkpoint's five with NaN for what it did not keep, so that the figures of the resumed
    /// epoch it lacks read as unknown rather than as a mean of fewer batches. `None`: neither.
    pub fn restore(self, saved: &[f32]) -> Option<Vec<f32>> {
        if saved.len() == self.slots() {
            Some(saved.to_vec())
        } else if saved.len() == OLD_SUMS {
            let mut all = saved.to_vec();
            all.resize(self.slots(), f32::NAN);
            Some(all)
        } else {
            None
        }
    }
}

/// One adversary's figures on a batch (scalars on the device).
#[derive(Debug)]
pub struct HeadTensors {
    /// Its classification loss.
    pub loss: Tensor,
    /// Its gradient penalty (zero when not computed).
    pub penalty: Tensor,
    /// Its accuracy.
    pub accuracy: Tensor,
}

/// The adversaries' figures on a batch.
#[derive(Debug)]
pub struct Heads {
    /// The perturbation adversary (zeros when there is one condition only).
    pub perts: HeadTensors,
    /// Each covariate's adversary, `None` for a covariate of one value.
    pub covariates: Vec<Option<HeadTensors>>,
}

/// One covariate adversary's means over an epoch's adversary batches.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeadMetrics {
    /// Classification loss (`adv_<covariate>`).
    pub adv: f64,
    /// Gradient penalty (`penalty_<covariate>`).
    pub penalty: f64,
    /// Accuracy on the basal state (`acc_<covariate>`; lower is better disentangled).
    pub acc: f64,
}

impl HeadMetrics {
    /// A covariate without an adversary.
    pub const ABSENT: HeadMetrics = HeadMetrics { adv: f64::NAN, penalty: f64::NAN, acc: f64::NAN };
}

/// Means of the training losses over an epoch (or since its start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// The epoch (0-based).
    pub epoch: u32,
    /// Negative log-likelihood per cell (summed over genes).
    pub recon_loss: f64,
    /// KL divergence per cell (variational encoder).
    pub kl: f64,
    /// Adversary classification loss (perturbation + covariates).
    pub adv_loss: f64,
    /// The adversaries' gradient penalty.
    pub penalty_adv: f64,
    /// Accuracy of the perturbation adversary on the basal state (lower is better disentangled).
    pub acc_perts: f64,
    /// cpa-tools' training `r2_mean`: per autoencoder batch, the R2 over genes of the predicted
    /// against the observed mean of each category (condition and covariates) in the batch,
    /// averaged over its categories (log1p counts for nb/zinb); the mean over batches.
    pub r2_mean: f64,
    /// The same of the variances over each category's cells.
    pub r2_var: f64,
    /// The perturbation adversary's loss (`adv_loss` is it plus the covariates' adversaries').
    pub adv_perts: f64,
    /// The perturbation adversary's gradient penalty.
    pub penalty_perts: f64,
    /// Each covariate's adversary, in the model's covariate order (NaN figures for a covariate
    /// of one value, which has no adversary).
    pub covariates: Vec<HeadMetrics>,
    /// Batches that stepped the autoencoder.
    pub autoencoder_batches: u64,
    /// Batches that stepped the adversaries.
    pub adversary_batches: u64,
    /// Cells trained.
    pub cells: u64,
    /// The autoencoder's learning rate.
    pub lr: f64,
}

/// The key of each cell's category (its condition and covariates) as one int64, in mixed radix
/// over the vocabulary's sizes `radices` (condition first), and how many keys there can be (the
/// product of the sizes). Errors where that product does not fit an int64.
pub fn category_codes(keys: &[&Tensor], radices: &[i64]) -> Result<(Tensor, i64)> {
    let mut span: i64 = 1;
    let mut code: Option<Tensor> = None;
    for (key, &radix) in keys.iter().zip(radices) {
        code = Some(match code {
            None => key.shallow_clone(),
            Some(c) => c.f_mul_scalar(radix.max(1)).torch()?.f_add(key).torch()?,
        });
        span = span.checked_mul(radix.max(1)).ok_or_else(|| {
            cpa_stream_stages::Error::InvalidInput(
                "the conditions and covariate values have too many combinations for the training R2".into(),
            )
        })?;
    }
    let code = code.ok_or_else(|| cpa_stream_stages::Error::InvalidInput("no keys for the training R2".into()))?;
    Ok((code, span))
}

/// cpa-tools' training `r2_mean` and `r2_var` of one batch (its `r2_metric` in mode "direct"):
/// for each category present (cells of one code of [`category_codes`], of which there are at
/// most `span`), the R2 over genes of the predicted mean against the observed mean (`target`:
/// log1p counts for nb/zinb, values for gauss; `predicted`: log1p of the predicted means, or the
/// Gaussian means), and of the variances (`predicted_var`: the Gaussian's variances, averaged
/// over the category's cells; `None`: the variance over its cells of `predicted`), each R2 that
/// is not finite counted as 0 (a category of one cell has no variance), averaged over
/// categories. R2 is torchmetrics': `1 - sum (t - p)^2 / sum (t - mean t)^2` with `t` the
/// observed side.
///
/// Static shapes only (no device-to-host read): cells are summed into one row per possible
/// code where there are no more codes than cells (the usual case: a few conditions times a few
/// cell types), else into one row per distinct code of the batch, found by sorting the codes;
/// the empty rows are left out of the average.
pub fn batch_r2(
    target: &Tensor,
    predicted: &Tensor,
    predicted_var: Option<&Tensor>,
    codes: &Tensor,
    span: i64,
) -> Result<(Tensor, Tensor)> {
    let n = codes.size().first().copied().unwrap_or(0);
    let genes = target.size().get(1).copied().unwrap_or(0);
    let device = target.device();
    let target = target.f_detach().torch()?.f_to_kind(Kind::Float).torch()?;
    let predicted = predicted.f_detach().torch()?.f_to_kind(Kind::Float).torch()?;
    let (group, rows) = if span <= n { (codes.shallow_clone(), span) } else { (ranks(codes)?, n) };
    let cells = Tensor::f_zeros([rows], (Kind::Float, device))
        .torch()?
        .f_index_add(0, &group, &Tensor::f_ones([n], (Kind::Float, device)).torch()?)
        .torch()?;
    let per_group = |v: &Tensor| -> Result<Tensor> {
        Tensor::f_zeros([rows, genes], (Kind::Float, device)).torch()?.f_index_add(0, &group, v).torch()
    };
    let n_col = cells.f_clamp_min(1.0).torch()?.f_unsqueeze(1).torch()?;
    let mean = |v: &Tensor| -> Result<Tensor> { per_group(v)?.f_div(&n_col).torch() };
    // Unbiased variance over a group's cells, as torch's `var(0)`: NaN for one cell.
    let variance = |v: &Tensor, m: &Tensor| -> Result<Tensor> {
        let squares = mean(&v.f_square().torch()?)?;
        let spread = squares.f_sub(&m.f_square().torch()?).torch()?.f_clamp_min(0.0).torch()?;
        spread.f_mul(&n_col.f_div(&n_col.f_sub_scalar(1.0).torch()?).torch()?).torch()
    };
    let target_mean = mean(&target)?;
    let predicted_mean = mean(&predicted)?;
    let target_var = variance(&target, &target_mean)?;
    let predicted_var = match predicted_var {
        Some(var) => mean(&var.f_detach().torch()?.f_to_kind(Kind::Float).torch()?)?,
        None => variance(&predicted, &predicted_mean)?,
    };
    let present = cells.f_gt(0.0).torch()?.f_to_kind(Kind::Float).torch()?;
    let groups = present.f_sum(Kind::Float).torch()?.f_clamp_min(1.0).torch()?;
    let averaged = |t: &Tensor, p: &Tensor| -> Result<Tensor> {
        let residual = t.f_sub(p).torch()?.f_square().torch()?.f_sum_dim_intlist(1, false, Kind::Float).torch()?;
        let centred = t.f_sub(&t.f_mean_dim(1, true, Kind::Float).torch()?).torch()?;
        let total = centred.f_square().torch()?.f_sum_dim_intlist(1, false, Kind::Float).torch()?;
        let r2 = residual.f_div(&total).torch()?.f_neg().torch()?.f_add_scalar(1.0).torch()?;
        let finite = r2.f_isfinite().torch()?;
        let r2 = r2.f_where_self(&finite, &r2.f_zeros_like().torch()?).torch()?;
        r2.f_mul(&present).torch()?.f_sum(Kind::Float).torch()?.f_div(&groups).torch()
    };
    Ok((averaged(&target_mean, &predicted_mean)?, averaged(&target_var, &predicted_var)?))
}

/// The rank of each code among the distinct codes of `codes` (0 for the smallest), by a stable
/// sort: static shapes, no device-to-host read.
fn ranks(codes: &Tensor) -> Result<Tensor> {
    let n = codes.size().first().copied().unwrap_or(0);
    let device = codes.device();
    let order = codes.f_argsort_stable(true, 0, false).torch()?;
    let sorted = codes.f_index_select(0, &order).torch()?;
    let starts = sorted
        .f_slice(0, 1, n, 1)
        .torch()?
        .f_ne_tensor(&sorted.f_slice(0, 0, n - 1, 1).torch()?)
        .torch()?
        .f_to_kind(Kind::Int64)
        .torch()?;
    let ranks = Tensor::f_cat(&[Tensor::f_zeros([1], (Kind::Int64, device)).torch()?, starts], 0)
        .torch()?
        .f_cumsum(0, Kind::Int64)
        .torch()?;
    Tensor::f_zeros([n], (Kind::Int64, device)).torch()?.f_scatter(0, &order, &ranks).torch()
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn r2(t: &[f64], p: &[f64]) -> f64 {
        let m = t.iter().sum::<f64>() / t.len() as f64;
        let res: f64 = t.iter().zip(p).map(|(a, b)| (a - b).powi(2)).sum();
        let tot: f64 = t.iter().map(|a| (a - m).powi(2)).sum();
        let r = 1.0 - res / tot;
        if r.is_finite() { r } else { 0.0 }
    }

    fn column_stats(rows: &[&[f64]]) -> (Vec<f64>, Vec<f64>) {
        let n = rows.len() as f64;
        let genes = rows[0].len();
        let mean: Vec<f64> = (0..genes).map(|g| rows.iter().map(|r| r[g]).sum::<f64>() / n).collect();
        let var = (0..genes).map(|g| rows.iter().map(|r| (r[g] - mean[g]).powi(2)).sum::<f64>() / (n - 1.0)).collect();
        (mean, var)
    }

    #[test]
    fn the_batch_r2_is_the_mean_over_categories_of_r2_of_means_and_variances() -> Result<()> {
        // Five cells in two categories (codes 7 and 3, interleaved), and a third of one cell.
        let target = [
            [1.0, 2.0, 0.0, 4.0],
            [2.0, 0.5, 1.0, 3.0],
            [0.0, 1.0, 2.0, 2.0],
            [1.5, 2.5, 0.5, 5.0],
            [3.0, 1.0, 1.0, 1.0],
            [0.2, 0.1, 0.4, 0.3],
        ];
        let predicted = [
            [1.2, 1.5, 0.3, 3.5],
            [1.8, 1.0, 0.8, 2.5],
            [0.5, 0.8, 1.5, 2.5],
            [1.0, 2.0, 0.7, 4.0],
            [2.5, 1.2, 1.1, 1.5],
            [0.3, 0.2, 0.2, 0.5],
        ];
        let flat = |m: &[[f64; 4]; 6]| Tensor::f_from_slice(&m.concat()).and_then(|t| t.f_reshape([6, 4]));
        // The same three categories by the possible codes (span 6 <= 6 cells, one row each) and
        // by the batch's distinct codes (span 8 > 6 cells, found by sorting).
        for (codes, span) in [([5i64, 3, 3, 5, 3, 4], 6), ([7, 3, 3, 7, 3, 5], 8)] {
            let (mean, var) = batch_r2(
                &flat(&target).torch()?,
                &flat(&predicted).torch()?,
                None,
                &Tensor::f_from_slice(&codes).torch()?,
                span,
            )?;
            let mut want = (0.0, 0.0);
            for (i, code) in [codes[0], codes[1], codes[5]].into_iter().enumerate() {
                fn pick<'a>(m: &'a [[f64; 4]; 6], codes: &[i64], code: i64) -> Vec<&'a [f64]> {
                    codes.iter().zip(m).filter(|(c, _)| **c == code).map(|(_, r)| r.as_slice()).collect()
                }
                let (tm, tv) = column_stats(&pick(&target, &codes, code));
                let (pm, pv) = column_stats(&pick(&predicted, &codes, code));
                want.0 += r2(&tm, &pm) / 3.0;
                // One cell (the third category): its variances are NaN, so is its R2, counted as 0.
                want.1 += if i == 2 { 0.0 } else { r2(&tv, &pv) / 3.0 };
            }
            let got = (mean.f_double_value(&[]).torch()?, var.f_double_value(&[]).torch()?);
            assert!((got.0 - want.0).abs() < 1e-5 && (got.1 - want.1).abs() < 1e-4, "span {span}: {got:?} vs {want:?}");
            assert_eq!(mean.device(), Device::Cpu);
        }
        Ok(())
    }

    #[test]
    fn category_codes_tell_every_combination_apart_and_refuse_an_overflow() -> Result<()> {
        let condition = Tensor::f_from_slice(&[0i64, 1, 1, 2]).torch()?;
        let cell_type = Tensor::f_from_slice(&[1i64, 0, 1, 1]).torch()?;
        let (codes, span) = category_codes(&[&condition, &cell_type], &[3, 2])?;
        assert_eq!((Vec::<i64>::try_from(&codes).torch()?, span), (vec![1, 2, 3, 5], 6));
        assert!(category_codes(&[&condition, &cell_type], &[i64::MAX, 3]).is_err());
        Ok(())
    }

    #[test]
    fn an_older_checkpoints_sums_read_as_unknown_where_it_kept_none() {
        let sums = Sums::new(2);
        assert_eq!(sums.slots(), 15);
        let old = sums.restore(&[1.0, 2.0, 3.0, 4.0, 0.5]).expect("five sums are an older checkpoint's");
        let means = sums.means(&old, (2, 2, 10), &[true, false], 0, 1e-3);
        assert_eq!((means.recon_loss, means.acc_perts), (0.5, 0.25));
        assert!(means.r2_mean.is_nan() && means.adv_perts.is_nan() && means.covariates[0].adv.is_nan());
        assert!(means.covariates[1].acc.is_nan());
        assert!(sums.restore(&[0.0; 7]).is_none());
    }
}
