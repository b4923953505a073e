//! `predict --counts`: whole counts drawn per cell from the model's count distribution, what a
//! benchmark scored on raw counts (cell-eval2's `vcc2026`) takes as a prediction.
//!
//! Each row's counts are drawn on the host from the predicted means the predictor has already
//! copied there: per gene a negative binomial of that mean and the gene's inverse dispersion
//! (zero with the zero-inflation probability for a zinb model). A row's draws come from a
//! stream of its own, fixed by the seed, the target (its labels, not its place in the list) and
//! the source cell's store row, so the counts do not depend on the batch size, the workers, the
//! shard or the other targets.

use rand::Rng as _;

use crate::model::likelihood::draw_nb;
use cpa_stream_pipeline::error::{Error, Result};

/// The stream family of the counts' draws ([`cpa_stream_stages::rng::seeded`]'s `stream`).
const COUNTS_STREAM: u64 = 0x636f_756e_7473;

/// The largest count a float32 holds exactly (2^24).
const MAX_EXACT: f64 = 16_777_216.0;

/// Draws counts from a count model's predictions.
#[derive(Debug, Clone)]
pub(crate) struct CountSampler {
    /// The inverse dispersion of each written gene.
    theta: Vec<f64>,
    seed: u64,
}

impl CountSampler {
    /// A sampler for the written genes' inverse dispersions `theta` (finite and positive: a
    /// model whose dispersion is not cannot be sampled, named by `model`).
    pub(crate) fn new(theta: &[f32], genes: &[String], seed: u64, model: &str) -> Result<CountSampler> {
        if let Some((g, t)) = theta.iter().enumerate().find(|(_, t)| !(t.is_finite() && **t > 0.0)) {
            let gene = genes.get(g).map_or("?", String::as_str);
            return Err(Error::InvalidInput(format!(
                "{model}: the inverse dispersion of gene {gene:?} is {t}; counts are drawn from a negative binomial, \
                 which needs a finite positive one (a damaged or diverged model)"
            )));
        }
        Ok(CountSampler { theta: theta.iter().map(|&t| f64::from(t)).collect(), seed })
    }

    /// Fills `out` (rows x genes) with one draw per entry from the negative binomial of mean
    /// `mean` (rows x genes), zero with probability `zero` where given (zinb); row `r` draws from
    /// the stream of (seed, `target`, `store_rows[r]`), `target` a [`target_key`](Self::target_key).
    /// `cell_ids` name a row in an error.
    pub(crate) fn draw(
        &self,
        mean: &[f32],
        zero: Option<&[f32]>,
        store_rows: &[u64],
        target: u64,
        cell_ids: &[String],
        out: &mut [f32],
    ) -> Result<()> {
        let genes = self.theta.len().max(1);
        if mean.len() != out.len() || mean.len() != store_rows.len() * self.theta.len() {
            return Err(Error::InvalidInput(format!(
                "counts: {} means and {} outputs for {} rows of {} genes",
                mean.len(),
                out.len(),
                store_rows.len(),
                self.theta.len()
            )));
        }
        for (r, (means, counts)) in mean.chunks(genes).zip(out.chunks_mut(genes)).enumerate() {
            let mut rng = cpa_stream_stages::rng::seeded(self.seed, COUNTS_STREAM ^ target, store_rows[r]);
            let zero = zero.map(|z| &z[r * genes..(r + 1) * genes]);
            for (g, (&mu, count)) in means.iter().zip(counts.iter_mut()).enumerate() {
                let mu = f64::from(mu);
                if !mu.is_finite() || mu < 0.0 {
                    return Err(self.bad_row(cell_ids, r, g, format!("a predicted mean of {mu}")));
                }
                // The zero-inflation draw comes first, so that a zero leaves the stream where a
                // count would (each entry takes one uniform value more in a zinb model).
                if let Some(zero) = zero
                    && rng.random::<f64>() < f64::from(zero[g])
                {
                    *count = 0.0;
                    continue;
                }
                let drawn = draw_nb(mu, self.theta[g], &mut rng);
                if drawn > MAX_EXACT {
                    return Err(self.bad_row(cell_ids, r, g, format!("a count of {drawn}, over 2^24")));
                }
                *count = drawn as f32;
            }
        }
        Ok(())
    }

    /// The key of a target's draws: FNV-1a of its condition, doses and covariate codes (0 for
    /// a reconstruction, each cell under its own condition).
    pub(crate) fn target_key(target: Option<&super::targets::Target>) -> u64 {
        let Some(t) = target else { return 0 };
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(t.condition.as_bytes());
        eat(&[0]);
        eat(t.dose.as_bytes());
        for c in &t.covariates {
            eat(&[0]);
            eat(&c.map_or(u32::MAX, |c| c).to_le_bytes());
        }
        hash | 1
    }

    fn bad_row(&self, cell_ids: &[String], row: usize, gene: usize, what: String) -> Error {
        let cell = cell_ids.get(row).map_or("?", String::as_str);
        Error::InvalidInput(format!(
            "predict --counts: cell {cell:?}, gene {gene} of the written genes: {what}; counts are whole numbers a \
             float32 holds exactly (under 2^24), drawn from finite non-negative means"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(theta: &[f32], seed: u64) -> CountSampler {
        let genes: Vec<String> = (0..theta.len()).map(|g| format!("g{g}")).collect();
        CountSampler::new(theta, &genes, seed, "model").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn counts_are_whole_non_negative_and_their_means_match_the_predicted_means() -> Result<()> {
        // 4,000 rows of three genes: means 0, 0.3 and 40 at inverse dispersions 2, 0.5 and 10.
        let s = sampler(&[2.0, 0.5, 10.0], 7);
        let rows = 4_000usize;
        let mean: Vec<f32> = (0..rows).flat_map(|_| [0.0, 0.3, 40.0]).collect();
        let store_rows: Vec<u64> = (0..rows as u64).collect();
        let ids = vec![String::new(); rows];
        let mut out = vec![0.0f32; mean.len()];
        s.draw(&mean, None, &store_rows, 0, &ids, &mut out)?;
        assert!(out.iter().all(|&c| c >= 0.0 && c.fract() == 0.0), "whole and non-negative");
        for (g, (mu, theta)) in [(0.0f64, 2.0f64), (0.3, 0.5), (40.0, 10.0)].into_iter().enumerate() {
            let values: Vec<f64> = out.iter().skip(g).step_by(3).map(|&c| f64::from(c)).collect();
            let m = values.iter().sum::<f64>() / rows as f64;
            let var = values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (rows - 1) as f64;
            // The negative binomial's variance mu + mu^2 / theta; the mean within 4 standard errors.
            let se = ((mu + mu * mu / theta) / rows as f64).sqrt();
            assert!((m - mu).abs() <= 4.0 * se + 1e-12, "gene {g}: mean {m} against {mu} (se {se})");
            if mu > 0.0 {
                let want = mu + mu * mu / theta;
                assert!((var / want - 1.0).abs() < 0.15, "gene {g}: variance {var} against {want}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_row_draws_the_same_counts_whatever_rows_it_comes_with_and_other_seeds_or_targets_differ() -> Result<()> {
        let s = sampler(&[1.0; 50], 3);
        let mean = vec![5.0f32; 3 * 50];
        let ids = vec![String::new(); 3];
        let mut all = vec![0.0f32; 150];
        s.draw(&mean, None, &[10, 11, 12], 0, &ids, &mut all)?;
        let mut one = vec![0.0f32; 50];
        s.draw(&mean[..50], None, &[11], 0, &ids[..1], &mut one)?;
        assert_eq!(one, all[50..100], "row 11 alone draws what it drew among others");
        let mut again = vec![0.0f32; 150];
        s.draw(&mean, None, &[10, 11, 12], 0, &ids, &mut again)?;
        assert_eq!(again, all, "the same seed draws the same counts");
        let mut other_pass = vec![0.0f32; 150];
        s.draw(&mean, None, &[10, 11, 12], 1, &ids, &mut other_pass)?;
        assert_ne!(other_pass, all, "another target draws other counts");
        let mut other_seed = vec![0.0f32; 150];
        sampler(&[1.0; 50], 4).draw(&mean, None, &[10, 11, 12], 0, &ids, &mut other_seed)?;
        assert_ne!(other_seed, all, "another seed draws other counts");
        Ok(())
    }

    #[test]
    fn zero_inflation_zeroes_its_share_of_entries() -> Result<()> {
        let rows = 5_000usize;
        let s = sampler(&[1e6], 1);
        // Mean 50 with an (almost) Poisson spread: a zero is nearly always the inflation's.
        let mean = vec![50.0f32; rows];
        let zero = vec![0.3f32; rows];
        let store_rows: Vec<u64> = (0..rows as u64).collect();
        let mut out = vec![0.0f32; rows];
        s.draw(&mean, Some(&zero), &store_rows, 0, &vec![String::new(); rows], &mut out)?;
        let zeros = out.iter().filter(|&&c| c == 0.0).count() as f64 / rows as f64;
        let se = (0.3f64 * 0.7 / rows as f64).sqrt();
        assert!((zeros - 0.3).abs() < 4.0 * se, "share of zeros {zeros}");
        let kept: Vec<f64> = out.iter().filter(|&&c| c > 0.0).map(|&c| f64::from(c)).collect();
        let m = kept.iter().sum::<f64>() / kept.len() as f64;
        assert!((m - 50.0).abs() < 4.0 * (50.0 / kept.len() as f64).sqrt(), "mean of the kept counts {m}");
        Ok(())
    }

    #[test]
    fn bad_means_and_dispersions_are_refused_naming_the_cell_or_gene() {
        let genes = vec!["CD3E".to_owned()];
        let err = CountSampler::new(&[f32::NAN], &genes, 0, "run/model").unwrap_err().to_string();
        assert!(err.contains("run/model") && err.contains("\"CD3E\""), "{err}");
        let s = sampler(&[1.0], 0);
        let mut out = vec![0.0f32; 1];
        let err = s.draw(&[f32::INFINITY], None, &[0], 0, &["cell-7".to_owned()], &mut out).unwrap_err().to_string();
        assert!(err.contains("\"cell-7\"") && err.contains("inf"), "{err}");
        let err =
            sampler(&[1e6], 0).draw(&[1e9], None, &[0], 0, &["cell-8".to_owned()], &mut out).unwrap_err().to_string();
        assert!(err.contains("\"cell-8\"") && err.contains("2^24"), "{err}");
    }
}
