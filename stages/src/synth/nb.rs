//! Negative-binomial sampling with mean `mu` and inverse dispersion `theta`
//! (variance `mu + mu^2 / theta`), the count model CPA fits.

use rand::Rng;
use rand_distr::{Distribution, Gamma, Poisson};

/// Means up to this use sequential inversion (a few steps, no special functions beyond one
/// `exp`/`ln_1p`); larger means use the Gamma-Poisson mixture.
const INVERSION_MAX_MEAN: f64 = 32.0;

/// Draws one NB(mu, theta) count.
pub(crate) fn sample_nb<R: Rng + ?Sized>(rng: &mut R, mu: f64, theta: f64) -> u32 {
    if mu.is_nan() || mu <= 0.0 {
        return 0;
    }
    if mu > INVERSION_MAX_MEAN {
        let Ok(gamma) = Gamma::new(theta, mu / theta) else { return 0 };
        let lambda: f64 = gamma.sample(rng);
        return match Poisson::new(lambda) {
            Ok(poisson) => {
                let k: f64 = poisson.sample(rng);
                k.min(f64::from(u32::MAX)) as u32
            }
            Err(_) => 0,
        };
    }
    // P(0) = (theta / (theta + mu))^theta; P(k+1) = P(k) * (k + theta) / (k + 1) * mu / (mu + theta).
    let ratio = mu / (mu + theta);
    let mut pk = (-theta * (mu / theta).ln_1p()).exp();
    let mut cdf = pk;
    let u: f64 = rng.random();
    let mut k = 0u32;
    while u > cdf && pk > 0.0 {
        pk *= (f64::from(k) + theta) / f64::from(k + 1) * ratio;
        k += 1;
        cdf += pk;
    }
    k
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    use super::*;

    fn moments(mu: f64, theta: f64, n: usize) -> (f64, f64, f64) {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let draws: Vec<f64> = (0..n).map(|_| f64::from(sample_nb(&mut rng, mu, theta))).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let zeros = draws.iter().filter(|&&x| x == 0.0).count() as f64 / n as f64;
        (mean, var, zeros)
    }

    #[test]
    fn matches_nb_moments_on_both_paths() {
        for (mu, theta) in [(0.05, 2.0), (1.5, 0.7), (10.0, 5.0), (200.0, 3.0)] {
            let (mean, var, zeros) = moments(mu, theta, 200_000);
            let want_var = mu + mu * mu / theta;
            assert!((mean - mu).abs() < 0.02 * mu + 0.005, "mu {mu}: mean {mean}");
            assert!((var - want_var).abs() < 0.06 * want_var + 0.01, "mu {mu}: var {var} vs {want_var}");
            let p0 = (theta / (theta + mu)).powf(theta);
            assert!((zeros - p0).abs() < 0.01, "mu {mu}: P(0) {zeros} vs {p0}");
        }
    }

    #[test]
    fn degenerate_means_give_zero() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        assert_eq!(sample_nb(&mut rng, 0.0, 1.0), 0);
        assert_eq!(sample_nb(&mut rng, f64::NAN, 1.0), 0);
        assert_eq!(sample_nb(&mut rng, -1.0, 1.0), 0);
    }
}
