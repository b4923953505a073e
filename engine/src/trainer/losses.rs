//! The losses of a training step: the adversaries' classification losses (mixed by mixup), their
//! gradient penalty, and the KL term of a variational encoder.

use tch::{Kind, Reduction, Tensor};

use crate::torch::TorchResult;
use cpa_stream_stages::{Error, Result};

/// `lambda * L(y) + (1 - lambda) * L(y_mix)` for cross-entropy or focal loss.
pub(super) fn mixed_loss(
    logits: &Tensor,
    target: &Tensor,
    target_mix: Option<&Tensor>,
    weights: Option<&Tensor>,
    focal: Option<f64>,
    lambda: f64,
) -> Result<Tensor> {
    let l = classification_loss(logits, target, weights, focal)?;
    match target_mix {
        Some(t) if lambda < 1.0 => {
            let m = classification_loss(logits, t, weights, focal)?;
            Ok(l.f_mul_scalar(lambda).torch()?.f_add(&m.f_mul_scalar(1.0 - lambda).torch()?).torch()?)
        }
        _ => Ok(l),
    }
}

/// Cross-entropy (weighted mean, as `nn.CrossEntropyLoss(weight=..)`) or focal loss
/// (`(1 - p_t)^gamma * w_t * -log p_t`, plain mean, as the reference's `FocalLoss`).
pub fn classification_loss(
    logits: &Tensor,
    target: &Tensor,
    weights: Option<&Tensor>,
    focal: Option<f64>,
) -> Result<Tensor> {
    match focal {
        None => Ok(logits.f_cross_entropy_loss(target, weights, Reduction::Mean, -100, 0.0).torch()?),
        Some(gamma) => {
            let log_p = logits.f_log_softmax(-1, Kind::Float).torch()?;
            let log_pt = log_p.f_gather(1, &target.f_unsqueeze(1).torch()?, false).torch()?.f_squeeze_dim(1).torch()?;
            let mut ce = log_pt.f_neg().torch()?;
            if let Some(w) = weights {
                ce = ce.f_mul(&w.f_index_select(0, target).torch()?).torch()?;
            }
            let focal_term = log_pt
                .f_exp()
                .torch()?
                .f_neg()
                .torch()?
                .f_add_scalar(1.0)
                .torch()?
                .f_pow_tensor_scalar(gamma)
                .torch()?;
            Ok(focal_term.f_mul(&ce).torch()?.f_mean(Kind::Float).torch()?)
        }
    }
}

/// The reference's gradient penalty of one classifier: the mean of the squared gradients of the
/// summed logits with respect to `z` (kept differentiable, for the classifier's update).
pub fn gradient_penalty(logits: &Tensor, z: &Tensor) -> Result<Tensor> {
    let sum = logits.f_sum(logits.kind()).torch()?;
    let grads = Tensor::f_run_backward(&[&sum], &[z], true, true).torch()?;
    let g = grads.into_iter().next().ok_or_else(|| Error::InvalidInput("no gradient for the penalty".into()))?;
    if !g.defined() {
        return Tensor::f_zeros([], (z.kind(), z.device())).torch();
    }
    g.f_square().torch()?.f_mean(g.kind()).torch()
}

/// KL(N(mean, var) || N(0, I)), summed over latent dimensions, averaged over cells.
pub(super) fn kl_standard_normal(mean: &Tensor, var: &Tensor) -> Result<Tensor> {
    let per_dim = var
        .f_add(&mean.f_square().torch()?)
        .torch()?
        .f_sub_scalar(1.0)
        .torch()?
        .f_sub(&var.f_log().torch()?)
        .torch()?
        .f_mul_scalar(0.5)
        .torch()?;
    per_dim.f_sum_dim_intlist(1, false, Kind::Float).torch()?.f_mean(Kind::Float).torch()
}
