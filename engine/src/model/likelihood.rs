//! Log-likelihoods of the reconstruction, element-wise (cells x genes), as in scvi-tools
//! (`log_nb_positive`, `log_zinb_positive`, `Normal.log_prob`).

use tch::{Kind, Tensor};

use super::config::LOG_EPS;
use tch::Result;

/// Negative binomial log-likelihood of counts `x` with mean `mu` and inverse dispersion `theta`
/// (broadcast over cells). Finite for zero counts, zero means and very large counts.
pub fn log_nb(x: &Tensor, mu: &Tensor, theta: &Tensor) -> Result<Tensor> {
    let log_theta_mu = theta.f_add(mu)?.f_add_scalar(LOG_EPS)?.f_log()?;
    let a = theta.f_mul(&theta.f_add_scalar(LOG_EPS)?.f_log()?.f_sub(&log_theta_mu)?)?;
    let b = x.f_mul(&mu.f_add_scalar(LOG_EPS)?.f_log()?.f_sub(&log_theta_mu)?)?;
    let c = x.f_add(theta)?.f_lgamma()?.f_sub(&theta.f_lgamma()?)?.f_sub(&x.f_add_scalar(1.0)?.f_lgamma()?)?;
    a.f_add(&b)?.f_add(&c)
}

/// Zero-inflated negative binomial log-likelihood; `zi_logits` are the logits of the
/// zero-inflation probability.
pub fn log_zinb(x: &Tensor, mu: &Tensor, theta: &Tensor, zi_logits: &Tensor) -> Result<Tensor> {
    let softplus_pi = zi_logits.f_neg()?.f_softplus()?;
    let log_theta = theta.f_add_scalar(LOG_EPS)?.f_log()?;
    let log_theta_mu = theta.f_add(mu)?.f_add_scalar(LOG_EPS)?.f_log()?;
    let pi_theta_log = zi_logits.f_neg()?.f_add(&theta.f_mul(&log_theta.f_sub(&log_theta_mu)?)?)?;
    let case_zero = pi_theta_log.f_softplus()?.f_sub(&softplus_pi)?;
    let case_nonzero = softplus_pi
        .f_neg()?
        .f_add(&pi_theta_log)?
        .f_add(&x.f_mul(&mu.f_add_scalar(LOG_EPS)?.f_log()?.f_sub(&log_theta_mu)?)?)?
        .f_add(&x.f_add(theta)?.f_lgamma()?)?
        .f_sub(&theta.f_lgamma()?)?
        .f_sub(&x.f_add_scalar(1.0)?.f_lgamma()?)?;
    let zero = x.f_lt(LOG_EPS)?;
    case_zero.f_where_self(&zero, &case_nonzero)
}

/// The non-zero entries of a batch of counts: row, column and value of each.
#[derive(Debug)]
pub struct Entries {
    /// Row of each entry.
    pub rows: Tensor,
    /// Column of each entry.
    pub cols: Tensor,
    /// Value of each entry.
    pub values: Tensor,
}

impl Entries {
    /// The non-zero entries of a dense cells x genes matrix (mixup's blended counts), in row-major
    /// order. The number of entries is read on the host: on a GPU that waits for the device.
    pub fn of_dense(x: &Tensor) -> Result<Entries> {
        let genes = x.size().get(1).copied().unwrap_or(1).max(1);
        let flat = x.f_reshape([-1])?;
        let at = flat.f_nonzero()?.f_squeeze_dim(1)?;
        Ok(Entries {
            rows: at.f_div_scalar_mode(genes, "floor")?,
            cols: at.f_remainder(genes)?,
            values: flat.f_index_select(0, &at)?,
        })
    }
}

/// Per-cell NB or ZINB log-likelihood (summed over genes), equal to summing [`log_nb`] /
/// [`log_zinb`] over genes, with the terms that vanish where x = 0 computed on the non-zero
/// `entries` of `x` only: the gamma-function terms `lgamma(x + theta) - lgamma(theta) -
/// lgamma(x + 1)` (whose digamma gradients dominate the cost of the dense form on sparse data)
/// and, for the NB, `x log(mu)`.
pub fn count_log_likelihood_sparse(
    x: &Tensor,
    entries: &Entries,
    mu: &Tensor,
    theta: &Tensor,
    zi_logits: Option<&Tensor>,
) -> Result<Tensor> {
    let theta_at = theta.f_index_select(0, &entries.cols)?;
    let gammas = entries
        .values
        .f_add(&theta_at)?
        .f_lgamma()?
        .f_sub(&theta_at.f_lgamma()?)?
        .f_sub(&entries.values.f_add_scalar(1.0)?.f_lgamma()?)?;
    let log_theta = theta.f_add_scalar(LOG_EPS)?.f_log()?;
    if zi_logits.is_none() && theta.dim() == 1 {
        return nb_sparse(entries, mu, theta, &log_theta, &gammas);
    }
    let log_theta_mu = theta.f_add(mu)?.f_add_scalar(LOG_EPS)?.f_log()?;
    let theta_term = theta.f_mul(&log_theta.f_sub(&log_theta_mu)?)?;
    let x_term = x.f_mul(&mu.f_add_scalar(LOG_EPS)?.f_log()?.f_sub(&log_theta_mu)?)?;
    let dense = match zi_logits {
        None => theta_term.f_add(&x_term)?,
        Some(pi) => {
            let softplus_pi = pi.f_neg()?.f_softplus()?;
            let pi_theta_log = pi.f_neg()?.f_add(&theta_term)?;
            let case_zero = pi_theta_log.f_softplus()?.f_sub(&softplus_pi)?;
            let case_nonzero = softplus_pi.f_neg()?.f_add(&pi_theta_log)?.f_add(&x_term)?;
            case_zero.f_where_self(&x.f_lt(LOG_EPS)?, &case_nonzero)?
        }
    };
    let per_cell = dense.f_sum_dim_intlist(-1, false, Kind::Float)?;
    per_cell.f_index_add(0, &entries.rows, &gammas)
}

/// The NB of [`count_log_likelihood_sparse`] with one inverse dispersion per gene, rearranged
/// so that the dense work is one pass. Summed over genes, the terms `theta (log theta -
/// log(theta + mu))` and `x (log mu - log(theta + mu))` are: `sum theta log theta` (per gene,
/// the same for every cell), minus `log(theta + mu) . theta` (a matrix-vector product), plus
/// `x (log mu - log(theta + mu))` summed over the non-zero entries.
fn nb_sparse(entries: &Entries, mu: &Tensor, theta: &Tensor, log_theta: &Tensor, gammas: &Tensor) -> Result<Tensor> {
    let genes = mu.size().get(1).copied().unwrap_or(0);
    let log_theta_mu = mu.f_add(&theta.f_add_scalar(LOG_EPS)?)?.f_log()?;
    let constant = theta.f_mul(log_theta)?.f_sum(theta.kind())?;
    let per_cell = log_theta_mu.f_mv(theta)?.f_neg()?.f_add(&constant)?;
    let at = entries.rows.f_mul_scalar(genes)?.f_add(&entries.cols)?;
    let pick = |t: &Tensor| t.f_reshape([-1]).and_then(|flat| flat.f_index_select(0, &at));
    let log_mu_at = pick(mu)?.f_add_scalar(LOG_EPS)?.f_log()?;
    let x_term = entries.values.f_mul(&log_mu_at.f_sub(&pick(&log_theta_mu)?)?)?;
    per_cell.f_index_add(0, &entries.rows, &x_term.f_add(gammas)?)
}

/// Gaussian log-density of `x` with mean `mean` and variance `var`.
pub fn log_normal(x: &Tensor, mean: &Tensor, var: &Tensor) -> Result<Tensor> {
    let sq = x.f_sub(mean)?.f_square()?.f_div(&var.f_mul_scalar(2.0)?)?;
    let log_norm = var.f_mul_scalar(2.0 * std::f64::consts::PI)?.f_log()?.f_mul_scalar(0.5)?;
    sq.f_add(&log_norm)?.f_neg()
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn t(values: &[f64]) -> Result<Tensor> {
        Tensor::f_from_slice(values)?.f_to_kind(Kind::Double)
    }

    fn values(x: &Tensor) -> Result<Vec<f64>> {
        Vec::<f64>::try_from(&x.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)
    }

    /// log NB(k; mu, theta) by hand: log of prod_{j<k} (theta + j) / k! * p^theta * (1-p)^k with
    /// p = theta / (theta + mu), summed term by term in f64 (no gamma function).
    fn nb_by_hand(k: u64, mu: f64, theta: f64) -> f64 {
        let mut log_coef = 0.0;
        for j in 0..k {
            log_coef += (theta + j as f64).ln() - ((j + 1) as f64).ln();
        }
        let successes = if k == 0 { 0.0 } else { k as f64 * (mu / (theta + mu)).ln() };
        log_coef + theta * (theta / (theta + mu)).ln() + successes
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * (1.0 + b.abs())
    }

    #[test]
    fn negative_binomial_matches_hand_computed_values() -> Result<()> {
        // (count, mean, theta): zero, small, a zero-mean cell, and very large counts.
        let cases = [(0u64, 3.0, 2.0), (3, 3.0, 2.0), (1, 0.5, 0.3), (7, 12.0, 0.5), (100_000, 98_000.0, 4.0)];
        let x = t(&cases.map(|c| c.0 as f64))?;
        let mu = t(&cases.map(|c| c.1))?;
        let theta = t(&cases.map(|c| c.2))?;
        let got = values(&log_nb(&x, &mu, &theta)?)?;
        for (case, g) in cases.iter().zip(got) {
            let want = nb_by_hand(case.0, case.1, case.2);
            assert!(close(g, want, 1e-6), "NB{case:?}: {g} vs {want}");
        }
        // Exact small case: k = 3, theta = 2: Gamma(5) / (Gamma(2) 3!) = 4.
        let p: f64 = 2.0 / 5.0;
        assert!(close(nb_by_hand(3, 3.0, 2.0), (4.0 * p.powi(2) * (1.0 - p).powi(3)).ln(), 1e-12));
        // A cell whose mean is 0 (zero library): zeros have likelihood 1, no NaN.
        let zero = log_nb(&t(&[0.0])?, &t(&[0.0])?, &t(&[1.5])?)?;
        assert!(values(&zero)?[0].abs() < 1e-6);
        // float32, as in training: large counts stay finite and close.
        let f = |v: &[f64]| -> Result<Tensor> { t(v)?.f_to_kind(Kind::Float) };
        let big = log_nb(&f(&[50_000.0])?, &f(&[49_000.0])?, &f(&[3.0])?)?;
        let want = nb_by_hand(50_000, 49_000.0, 3.0);
        let g = values(&big)?[0];
        assert!(g.is_finite() && close(g, want, 1e-3), "{g} vs {want}");
        Ok(())
    }

    #[test]
    fn zero_inflated_negative_binomial_matches_the_mixture() -> Result<()> {
        let cases = [(0u64, 3.0, 2.0, 0.4), (0, 0.0, 1.0, -1.0), (5, 4.0, 1.5, 0.7), (20_000, 21_000.0, 2.5, -2.0)];
        let x = t(&cases.map(|c| c.0 as f64))?;
        let mu = t(&cases.map(|c| c.1))?;
        let theta = t(&cases.map(|c| c.2))?;
        let logits = t(&cases.map(|c| c.3))?;
        let got = values(&log_zinb(&x, &mu, &theta, &logits)?)?;
        for (case, g) in cases.iter().zip(got) {
            let pi = 1.0 / (1.0 + (-case.3).exp());
            let nb = nb_by_hand(case.0, case.1, case.2);
            let want = if case.0 == 0 { (pi + (1.0 - pi) * nb.exp()).ln() } else { (1.0 - pi).ln() + nb };
            assert!(close(g, want, 1e-6), "ZINB{case:?}: {g} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn the_sparse_form_equals_the_dense_sum() -> Result<()> {
        let mut rows = cpa_stream_stages::CsrBatch::new(4);
        rows.push_row(&[0, 2], &[3.0, 120.0]);
        rows.push_row(&[], &[]);
        rows.push_row(&[1, 2, 3], &[1.0, 7.0, 2.0]);
        let x = crate::model::batch::densify(&rows, Device::Cpu).expect("a valid batch");
        let entries = Entries {
            rows: Tensor::f_from_slice(&[0i64, 0, 2, 2, 2])?,
            cols: Tensor::f_from_slice(&[0i64, 2, 1, 2, 3])?,
            values: Tensor::f_from_slice(&[3.0f32, 120.0, 1.0, 7.0, 2.0])?,
        };
        let mu = Tensor::f_from_slice(&[2.0f32, 0.5, 80.0, 1.0, 0.0, 3.0, 1.0, 4.0, 1.0, 2.0, 9.0, 2.5])?
            .f_reshape([3, 4])?;
        let theta = Tensor::f_from_slice(&[0.7f32, 2.0, 5.0, 0.1])?;
        let logits = Tensor::f_from_slice(&[0.3f32, -1.0, 2.0, 0.0, 1.0, -0.5, 0.2, 0.1, -2.0, 0.0, 0.4, 1.5])?
            .f_reshape([3, 4])?;
        let dense_nb = log_nb(&x, &mu, &theta)?.f_sum_dim_intlist(-1, false, Kind::Float)?;
        let sparse_nb = count_log_likelihood_sparse(&x, &entries, &mu, &theta, None)?;
        assert!(dense_nb.f_allclose(&sparse_nb, 1e-5, 1e-4, false)?, "{dense_nb} vs {sparse_nb}");
        // The gradients too: the NB's sparse form is rearranged, not the dense sum restricted.
        let grads = |sparse: bool| -> Result<(Tensor, Tensor)> {
            let (m, t) = (mu.f_detach()?.f_set_requires_grad(true)?, theta.f_detach()?.f_set_requires_grad(true)?);
            let ll = if sparse {
                count_log_likelihood_sparse(&x, &entries, &m, &t, None)?
            } else {
                log_nb(&x, &m, &t)?.f_sum_dim_intlist(-1, false, Kind::Float)?
            };
            // Weighted per cell, so that a gradient landing on the wrong cell shows.
            let weights = Tensor::f_from_slice(&[1.0f32, 2.0, 3.0])?;
            let g = Tensor::f_run_backward(&[&ll.f_mul(&weights)?.f_sum(Kind::Float)?], &[&m, &t], false, false)?;
            Ok((g[0].shallow_clone(), g[1].shallow_clone()))
        };
        let ((dm, dt), (sm, st)) = (grads(false)?, grads(true)?);
        assert!(dm.f_allclose(&sm, 1e-5, 1e-5, false)?, "d/dmu: {dm} vs {sm}");
        assert!(dt.f_allclose(&st, 1e-5, 1e-4, false)?, "d/dtheta: {dt} vs {st}");
        let dense_zinb = log_zinb(&x, &mu, &theta, &logits)?.f_sum_dim_intlist(-1, false, Kind::Float)?;
        let sparse_zinb = count_log_likelihood_sparse(&x, &entries, &mu, &theta, Some(&logits))?;
        assert!(dense_zinb.f_allclose(&sparse_zinb, 1e-5, 1e-4, false)?, "{dense_zinb} vs {sparse_zinb}");
        Ok(())
    }

    #[test]
    fn gaussian_matches_the_density() -> Result<()> {
        let got = values(&log_normal(&t(&[0.0, 2.5, -1.0])?, &t(&[0.0, 1.0, 3.0])?, &t(&[1.0, 0.25, 4.0])?)?)?;
        let want = [
            -0.5 * (2.0 * std::f64::consts::PI).ln(),
            -0.5 * (2.0 * std::f64::consts::PI * 0.25).ln() - 1.5f64.powi(2) / 0.5,
            -0.5 * (2.0 * std::f64::consts::PI * 4.0).ln() - 16.0 / 8.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!(close(*g, w, 1e-12), "{g} vs {w}");
        }
        Ok(())
    }
}

/// Gauss-Legendre nodes and weights on [-1, 1] (Newton's iteration on the Legendre polynomial).
fn gauss_legendre(n: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
        let mut derivative = 1.0;
        for _ in 0..100 {
            let (mut p0, mut p1) = (1.0, x);
            for k in 2..=n {
                let k = k as f64;
                (p0, p1) = (p1, ((2.0 * k - 1.0) * x * p1 - (k - 1.0) * p0) / k);
            }
            derivative = n as f64 * (x * p1 - p0) / (x * x - 1.0);
            let step = p1 / derivative;
            x -= step;
            if step.abs() < 1e-15 {
                break;
            }
        }
        out.push((x, 2.0 / ((1.0 - x * x) * derivative * derivative)));
    }
    out
}

/// Nodes of [`expected_log1p_nb`].
pub const EXPECTED_LOG1P_NODES: usize = 48;

/// `E[log(1 + X)]` for `X ~ NB(mean mu, inverse dispersion theta)`, elementwise (theta broadcast
/// over cells): what a mean of `log1p` counts estimates, where `log1p(mu)` overstates it (Jensen).
/// From `log(1 + x) = int_0^inf (1 - e^(-t x)) e^(-t) / t dt` and the NB's Laplace transform,
/// `E[log(1 + X)] = int_0^1 (1 - (1 + mu u / theta)^(-theta)) / (-log(1 - u)) du`, by
/// Gauss-Legendre in `log u` over [1e-10, 1] (the rest is below `mu * 1e-10`). In double precision.
pub fn expected_log1p_nb(mu: &Tensor, theta: &Tensor) -> Result<Tensor> {
    let theta = theta.f_to_kind(Kind::Double)?;
    let scaled = mu.f_to_kind(Kind::Double)?.f_clamp_min(0.0)?.f_div(&theta)?;
    let minus_theta = theta.f_neg()?;
    let low = 1e-10f64.ln();
    let mut total = scaled.f_zeros_like()?;
    // One temporary for all nodes, updated in place (no allocation per node).
    let mut term = scaled.f_empty_like()?;
    for (x, w) in gauss_legendre(EXPECTED_LOG1P_NODES) {
        let u = ((x + 1.0) / 2.0 * -low + low).exp();
        let weight = w * -low / 2.0 * u / -(-u.min(1.0 - 1e-16)).ln_1p();
        // 1 - (1 + mu u / theta)^(-theta) = -expm1(-theta log1p(mu u / theta)), exact for small terms.
        let _ = scaled.f_mul_scalar_out(&term, u)?;
        let _ = term.f_log1p_()?.f_mul_(&minus_theta)?.f_expm1_()?;
        let _ = total.f_sub_(&term.f_mul_scalar_(weight)?)?;
    }
    Ok(total)
}

#[cfg(test)]
mod expected_log1p_tests {
    use super::*;

    /// `E[log1p X]` by the NB's probabilities, summed until their tail is negligible.
    fn by_pmf(mu: f64, theta: f64) -> f64 {
        let q = mu / (theta + mu);
        let mut p = (theta / (theta + mu)).powf(theta);
        let (mut total, mut mass) = (0.0, 0.0);
        for k in 0..5_000_000u64 {
            total += p * (k as f64).ln_1p();
            mass += p;
            if 1.0 - mass < 1e-12 && k as f64 > mu {
                break;
            }
            p *= (k as f64 + theta) / (k as f64 + 1.0) * q;
        }
        total
    }

    #[test]
    fn the_expected_log1p_of_a_negative_binomial_is_its_pmf_sum() -> Result<()> {
        let cases = [(0.01, 1.0), (0.5, 0.3), (3.0, 0.2), (40.0, 4.0), (200.0, 20.0), (1000.0, 0.5)];
        let mu = Tensor::f_from_slice(&cases.map(|c| c.0))?;
        let theta = Tensor::f_from_slice(&cases.map(|c| c.1))?;
        let got = Vec::<f64>::try_from(&expected_log1p_nb(&mu, &theta)?)?;
        for ((m, t), g) in cases.iter().zip(&got) {
            let exact = by_pmf(*m, *t);
            assert!((g - exact).abs() < 2e-3, "mu {m} theta {t}: quadrature {g}, pmf sum {exact}");
            assert!(*g < m.ln_1p(), "mu {m} theta {t}: {g} not below log1p(mu)");
        }
        Ok(())
    }
}

/// One draw from the negative binomial of mean `mu` and inverse dispersion `theta`, as the
/// gamma-Poisson mixture it is (a rate from Gamma(theta, mu / theta), then a Poisson count of
/// it): 0 where `mu` or `theta` is not a positive number.
pub fn draw_nb(mu: f64, theta: f64, rng: &mut impl rand::Rng) -> f64 {
    use rand_distr::{Distribution, Gamma, Poisson};
    let rate = match Gamma::new(theta, mu / theta) {
        Ok(g) if mu > 0.0 && theta > 0.0 => g.sample(rng),
        _ => 0.0,
    };
    if rate > 0.0 { Poisson::new(rate).map_or(0.0, |p| p.sample(rng)) } else { 0.0 }
}
