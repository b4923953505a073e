//! The generative model of a synthetic atlas: latent shifts and a nonlinear decoder.

use rand::Rng;
use rand_distr::StandardNormal;

/// Standard deviation of cell-type latent effects.
const CELL_TYPE_SCALE: f32 = 0.8;
/// Standard deviation of perturbation latent effects (at full dose response).
const PERTURBATION_SCALE: f32 = 1.5;
/// Standard deviation of per-gene baseline logits: a heavy-tailed expression profile.
const BASELINE_SCALE: f32 = 1.5;
/// Decoder output weight scale (times 1/sqrt(hidden)).
const DECODER_SCALE: f32 = 1.5;
/// Median and log-scale spread of the per-gene NB inverse dispersion.
const THETA_MEDIAN: f64 = 3.0;
const THETA_LOG_SD: f64 = 0.7;
/// Range of dose-response EC50s (log-uniform) and Hill slopes (uniform).
const EC50_RANGE: (f64, f64) = (0.02, 0.5);
const HILL_RANGE: (f64, f64) = (1.0, 2.5);

/// Parameters of the generative model, drawn once from the seed.
#[derive(Debug, Clone)]
pub(crate) struct TrueModel {
    pub latent: usize,
    pub hidden: usize,
    pub genes: usize,
    cell_type_effect: Vec<f32>,
    pert_effect: Vec<f32>,
    ec50: Vec<f64>,
    hill: Vec<f64>,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    baseline: Vec<f32>,
    pub theta: Vec<f64>,
}

fn normals<R: Rng>(rng: &mut R, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.sample::<f32, _>(StandardNormal) * scale).collect()
}

impl TrueModel {
    pub(crate) fn draw<R: Rng>(
        rng: &mut R,
        latent: usize,
        hidden: usize,
        genes: usize,
        cell_types: usize,
        perts: usize,
    ) -> Self {
        let cell_type_effect = normals(rng, cell_types * latent, CELL_TYPE_SCALE);
        let pert_effect = normals(rng, perts * latent, PERTURBATION_SCALE);
        let (lo, hi) = (EC50_RANGE.0.ln(), EC50_RANGE.1.ln());
        let ec50 = (0..perts).map(|_| rng.random_range(lo..hi).exp()).collect();
        let hill = (0..perts).map(|_| rng.random_range(HILL_RANGE.0..HILL_RANGE.1)).collect();
        let w1 = normals(rng, latent * hidden, 1.0 / (latent as f32).sqrt());
        let b1 = normals(rng, hidden, 0.1);
        let w2 = normals(rng, hidden * genes, DECODER_SCALE / (hidden as f32).sqrt());
        let baseline = normals(rng, genes, BASELINE_SCALE);
        let theta = (0..genes)
            .map(|_| (THETA_MEDIAN.ln() + THETA_LOG_SD * rng.sample::<f64, _>(StandardNormal)).exp())
            .collect();
        TrueModel { latent, hidden, genes, cell_type_effect, pert_effect, ec50, hill, w1, b1, w2, baseline, theta }
    }

    /// The latent effect of perturbation `p` at full dose response.
    pub(crate) fn effect(&self, p: usize) -> &[f32] {
        &self.pert_effect[p * self.latent..(p + 1) * self.latent]
    }

    /// Dose response of perturbation `p` at dose `d` (a Hill curve in [0, 1)).
    pub(crate) fn response(&self, p: usize, dose: f64) -> f64 {
        if dose <= 0.0 {
            return 0.0;
        }
        1.0 / (1.0 + (self.ec50[p] / dose).powf(self.hill[p]))
    }

    /// The latent shift of a group: cell type effect plus dose-scaled perturbation effects,
    /// plus `interaction * s_a * s_b * extra` for a pair with an interaction vector.
    pub(crate) fn shift(
        &self,
        cell_type: usize,
        parts: &[(usize, f64)],
        interaction: Option<(&[f32], f32)>,
    ) -> Vec<f32> {
        let l = self.latent;
        let mut z = self.cell_type_effect[cell_type * l..(cell_type + 1) * l].to_vec();
        let mut product = 1.0f32;
        for &(p, dose) in parts {
            let s = self.response(p, dose) as f32;
            product *= s;
            for (zi, ei) in z.iter_mut().zip(&self.pert_effect[p * l..(p + 1) * l]) {
                *zi += s * ei;
            }
        }
        if let Some((vector, strength)) = interaction
            && parts.len() > 1
        {
            for (zi, vi) in z.iter_mut().zip(vector) {
                *zi += strength * product * vi;
            }
        }
        z
    }

    /// Decodes `n` latent rows `z` (n x latent) to expected counts `mu` (n x genes), given each
    /// row's library size. `hidden` is scratch (n x hidden).
    pub(crate) fn decode(&self, z: &[f32], library: &[f32], hidden: &mut Vec<f32>, mu: &mut Vec<f32>) {
        let n = library.len();
        let (l, h, g) = (self.latent, self.hidden, self.genes);
        hidden.clear();
        hidden.resize(n * h, 0.0);
        for i in 0..n {
            let out = &mut hidden[i * h..(i + 1) * h];
            out.copy_from_slice(&self.b1);
            for (k, &zk) in z[i * l..(i + 1) * l].iter().enumerate() {
                axpy(zk, &self.w1[k * h..(k + 1) * h], out);
            }
            out.iter_mut().for_each(|x| *x = x.tanh());
        }
        mu.clear();
        mu.resize(n * g, 0.0);
        for i in 0..n {
            let out = &mut mu[i * g..(i + 1) * g];
            out.copy_from_slice(&self.baseline);
            for (k, &hk) in hidden[i * h..(i + 1) * h].iter().enumerate() {
                axpy(hk, &self.w2[k * g..(k + 1) * g], out);
            }
            let max = out.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0.0f32;
            for x in out.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let scale = library[i] / sum;
            out.iter_mut().for_each(|x| *x *= scale);
        }
    }
}

/// `y += a * x`, written so the compiler vectorises it.
#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    use super::*;

    #[test]
    fn decode_gives_library_sized_positive_means() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        let m = TrueModel::draw(&mut rng, 4, 8, 50, 2, 3);
        let z = normals(&mut rng, 2 * 4, 1.0);
        let (mut h, mut mu) = (Vec::new(), Vec::new());
        m.decode(&z, &[1000.0, 10.0], &mut h, &mut mu);
        let sums: Vec<f32> = mu.chunks(50).map(|r| r.iter().sum()).collect();
        assert!((sums[0] - 1000.0).abs() < 0.1 && (sums[1] - 10.0).abs() < 0.01, "{sums:?}");
        assert!(mu.iter().all(|&x| x > 0.0));
    }

    #[test]
    fn responses_rise_with_dose_and_vanish_at_zero() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        let m = TrueModel::draw(&mut rng, 4, 8, 5, 1, 2);
        assert_eq!(m.response(0, 0.0), 0.0);
        assert!(m.response(0, 0.01) < m.response(0, 0.1) && m.response(0, 0.1) < m.response(0, 1.0));
        let a = m.shift(0, &[(0, 1.0), (1, 0.1)], None);
        let b = m.shift(0, &[(1, 0.1), (0, 1.0)], None);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "combination order must not matter");
        }
    }
}
