//! The linear baseline of an evaluation: ridge regression from a condition's perturbations and
//! covariates (one-hot, with an intercept) to its pseudobulk change from the training controls of
//! its covariates, fitted on the training cells of every perturbed condition. It predicts any
//! condition whose parts and covariates appear somewhere in training: a combination as the sum of
//! its parts' coefficients, a seen perturbation in another cell type as its coefficient plus that
//! cell type's. Given the model's perturbation features, the same fit on them instead of the
//! perturbations' indicators (a combination the sum of its parts' features): the linear model
//! on perturbation features, which also predicts a perturbation without training cells.

use std::collections::BTreeMap;

use crate::model::Vocabulary;
use crate::model::vocab::CONTROL_ID;
use tch::{Device, Kind, Tensor};

use cpa_stream_pipeline::condition::ConditionKey;

/// The ridge penalty on the coefficients (features are 0/1 indicators; the intercept is
/// penalised too, which the centred changes make harmless).
pub const RIDGE_LAMBDA: f64 = 1.0;
/// Above this many training conditions and features (both), the fit's matrix would be too large
/// for an evaluation's memory: no linear baseline.
pub const MAX_RIDGE_SIDE: usize = 4096;

/// Fitted coefficients: features x genes.
pub(super) struct Ridge {
    weights: Tensor,
    covariate_offsets: Vec<usize>,
    features: usize,
    /// Per perturbation its features (the rows of the model's table), or `None`: indicators.
    table: Option<Vec<Vec<f64>>>,
}

/// The feature row of a condition: its perturbations (indicators, or the sum of their rows of
/// `table`), its covariate values, the intercept.
fn features(key: &ConditionKey, offsets: &[usize], width: usize, table: Option<&[Vec<f64>]>) -> Vec<f64> {
    let mut x = vec![0.0; width];
    for &(id, _) in &key.parts {
        if id as usize == CONTROL_ID {
            continue;
        }
        match table {
            None => x[id as usize] = 1.0,
            Some(table) => {
                for (x, f) in x.iter_mut().zip(table.get(id as usize).map_or(&[][..], Vec::as_slice)) {
                    *x += f;
                }
            }
        }
    }
    for (k, &c) in key.covariates.iter().enumerate() {
        x[offsets[k] + c as usize] = 1.0;
    }
    x[width - 1] = 1.0;
    x
}

/// The ridge coefficients (`width` x `genes`) of the rows `x` (`n` x `width`) and targets `y`
/// (`n` x `genes`), row-major: from the `width`-sided normal equations, or (`dual`) from the
/// `n`-sided kernel form, the smaller of the two being the one to solve.
fn solve(x: &[f64], y: &[f64], (n, width, genes): (usize, usize, usize), dual: bool) -> tch::Result<Tensor> {
    let x = Tensor::f_from_slice(x)?.f_view([n as i64, width as i64])?;
    let y = Tensor::f_from_slice(y)?.f_view([n as i64, genes as i64])?;
    let options = (Kind::Double, Device::Cpu);
    if dual {
        let k = x.f_matmul(&x.f_tr()?)?.f_add(&Tensor::f_eye(n as i64, options)?.f_mul_scalar(RIDGE_LAMBDA)?)?;
        x.f_tr()?.f_matmul(&Tensor::f_linalg_solve(&k, &y, true)?)?.f_contiguous()
    } else {
        let a = x.f_tr()?.f_matmul(&x)?.f_add(&Tensor::f_eye(width as i64, options)?.f_mul_scalar(RIDGE_LAMBDA)?)?;
        Tensor::f_linalg_solve(&a, &x.f_tr()?.f_matmul(&y)?, true)?.f_contiguous()
    }
}

impl Ridge {
    /// Fits the changes `changes` (per training condition) of `genes` genes; `None` without
    /// training conditions or when the fit would be too large.
    pub(super) fn fit(vocab: &Vocabulary, changes: &BTreeMap<ConditionKey, Vec<f64>>, genes: usize) -> Option<Ridge> {
        Self::fit_on(vocab, changes, genes, None)
    }

    /// [`fit`](Self::fit) on the perturbations' rows of `table` (perturbations x features)
    /// instead of their indicators.
    pub(super) fn fit_on(
        vocab: &Vocabulary,
        changes: &BTreeMap<ConditionKey, Vec<f64>>,
        genes: usize,
        table: Option<Vec<Vec<f64>>>,
    ) -> Option<Ridge> {
        let mut offsets = Vec::with_capacity(vocab.covariates.len());
        let mut width = table.as_ref().map_or(vocab.perturbations.len(), |t| t.first().map_or(0, Vec::len));
        for c in &vocab.covariates {
            offsets.push(width);
            width += c.categories.len();
        }
        width += 1;
        let n = changes.len();
        if n == 0 || n.min(width) > MAX_RIDGE_SIDE {
            if n > 0 {
                tracing::warn!(
                    "{n} training conditions x {width} features: too large for the linear baseline; it is left out"
                );
            }
            return None;
        }
        let x: Vec<f64> = changes.keys().flat_map(|k| features(k, &offsets, width, table.as_deref())).collect();
        let y: Vec<f64> = changes.values().flatten().copied().collect();
        let fit = || solve(&x, &y, (n, width, genes), width > n);
        match fit() {
            Ok(weights) => Some(Ridge { weights, covariate_offsets: offsets, features: width, table }),
            Err(e) => {
                tracing::warn!("the linear baseline could not be fitted ({e}); it is left out");
                None
            }
        }
    }

    /// The predicted change of a condition.
    pub(super) fn change(&self, key: &ConditionKey) -> Option<Vec<f64>> {
        let x = features(key, &self.covariate_offsets, self.features, self.table.as_deref());
        let predict = || -> tch::Result<Vec<f64>> {
            let x = Tensor::f_from_slice(&x)?.f_view([1, self.features as i64])?;
            Vec::<f64>::try_from(x.f_matmul(&self.weights)?.f_view([-1])?)
        };
        predict().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dual_and_the_normal_equations_give_the_same_coefficients() -> tch::Result<()> {
        // 3 conditions, 5 features (more features than rows), 2 genes.
        let x = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0];
        let y = [0.5, -1.0, 2.0, 0.25, -0.75, 1.5];
        let primal = solve(&x, &y, (3, 5, 2), false)?;
        let dual = solve(&x, &y, (3, 5, 2), true)?;
        let (p, d) = (Vec::<f64>::try_from(primal.f_view([-1])?)?, Vec::<f64>::try_from(dual.f_view([-1])?)?);
        assert!(p.iter().zip(&d).all(|(a, b)| (a - b).abs() < 1e-12), "{p:?} vs {d:?}");
        // And the normal equations hold: (X'X + lambda I) W = X'Y.
        let xt = Tensor::f_from_slice(&x)?.f_view([3, 5])?;
        let lhs =
            xt.f_tr()?.f_matmul(&xt)?.f_add(&Tensor::f_eye(5, (Kind::Double, Device::Cpu))?)?.f_matmul(&primal)?;
        let rhs = xt.f_tr()?.f_matmul(&Tensor::f_from_slice(&y)?.f_view([3, 2])?)?;
        let gap = lhs.f_sub(&rhs)?.f_abs()?.f_max()?.f_double_value(&[])?;
        assert!(gap < 1e-12, "{gap}");
        Ok(())
    }
}
