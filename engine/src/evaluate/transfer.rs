//! Whether a perturbation's effect carries over between covariate values in the training cells.
//!
//! A condition's training shift is the mean of its training cells minus the training controls of
//! its covariates (log1p means, as everything `evaluate` scores). For two conditions in different
//! covariate values, the Pearson correlation of their shifts over the genes measures how alike the
//! two effects are. Averaged over the pairs of the *same* perturbation (same parts and doses) and,
//! as the reference, over pairs of *different* perturbations, it says whether the training data hold
//! anything a covariate value without training cells of a perturbation could inherit: where the
//! two averages are level, the shift seen elsewhere is no better a guess of the change than another
//! perturbation's, and neither a model nor the other-covariates baseline can predict that change;
//! the control mean is the baseline to beat there.
//!
//! Both averages share one correlated term: the controls' own sampling noise, which enters every
//! shift of one covariate value alike. It raises the two averages equally, so the difference is
//! what a perturbation carries over.

use serde::Serialize;

use crate::condition::ConditionKey;

use super::field::pearson;

/// Pairs of each kind correlated at most; above it, every k-th pair in a fixed order.
pub const MAX_PAIRS: usize = 4096;

/// The same perturbation's shifts must correlate by at least this much more than different
/// perturbations' for its effect to count as carrying over between covariate values.
pub const CARRY_OVER_MARGIN: f64 = 0.05;

/// The two averages and their pair counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Transfer {
    /// Mean Pearson correlation of the same perturbation's training shifts in two covariate values.
    pub same_perturbation_r: f64,
    /// The pairs of the same perturbation in different covariate values (all, before sampling).
    pub same_pairs: usize,
    /// Mean Pearson correlation of two different perturbations' shifts in two covariate values.
    pub other_perturbations_r: f64,
    /// The pairs of different perturbations in different covariate values (all, before sampling).
    pub other_pairs: usize,
    /// Whether `same_perturbation_r` exceeds `other_perturbations_r` by [`CARRY_OVER_MARGIN`].
    pub carries_over: bool,
}

/// Measures [`Transfer`] over `keys` (conditions; controls and conditions without covariates are
/// skipped), `shift` giving a condition's training shift (`None` without training cells of it or
/// of its covariates' controls). `None` when no perturbation has a shift in two covariate values.
pub(super) fn measure(keys: &[&ConditionKey], shift: impl Fn(&ConditionKey) -> Option<Vec<f64>>) -> Option<Transfer> {
    let shifted: Vec<&ConditionKey> =
        keys.iter().copied().filter(|k| !k.is_control() && !k.covariates.is_empty() && shift(k).is_some()).collect();
    let shifted = &shifted;
    let pairs = |same: bool| {
        shifted.iter().enumerate().flat_map(move |(i, a)| {
            shifted[i + 1..]
                .iter()
                .filter(move |b| a.covariates != b.covariates && (a.parts == b.parts) == same)
                .map(move |b| (*a, *b))
        })
    };
    let same_pairs = pairs(true).count();
    if same_pairs == 0 {
        return None;
    }
    let other_pairs = pairs(false).count();
    let mean_r = |same: bool, count: usize| -> f64 {
        let step = count.div_ceil(MAX_PAIRS).max(1);
        let (mut sum, mut n) = (0.0, 0usize);
        for (a, b) in pairs(same).step_by(step) {
            let (Some(x), Some(y)) = (shift(a), shift(b)) else { continue };
            let r = pearson(&x, &y);
            if r.is_finite() {
                sum += r;
                n += 1;
            }
        }
        if n == 0 { f64::NAN } else { sum / n as f64 }
    };
    let same_perturbation_r = mean_r(true, same_pairs);
    let other_perturbations_r = mean_r(false, other_pairs);
    Some(Transfer {
        same_perturbation_r,
        same_pairs,
        other_perturbations_r,
        other_pairs,
        carries_over: same_perturbation_r - other_perturbations_r >= CARRY_OVER_MARGIN,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::vocab::CONTROL_ID;

    /// Perturbation `perturbation` (0-based; id 0 is the control) in covariate value `covariate`.
    /// Perturbation `perturbation` (0-based) in covariate value `covariate`; vocabulary ids start
    /// after the padding and the control.
    fn key(covariate: u32, perturbation: u32) -> ConditionKey {
        let id = perturbation + CONTROL_ID as u32 + 1;
        ConditionKey { covariates: vec![covariate], parts: vec![(id, 1.0f32.to_bits())] }
    }

    /// A pseudo-random vector (a fixed linear congruential sequence), the same for the same seed.
    fn noise(seed: u64, genes: usize) -> Vec<f64> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..genes)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect()
    }

    fn measured(shifts: &HashMap<ConditionKey, Vec<f64>>) -> Option<Transfer> {
        let mut keys: Vec<&ConditionKey> = shifts.keys().collect();
        keys.sort_by(|a, b| (&a.covariates, &a.parts).cmp(&(&b.covariates, &b.parts)));
        measure(&keys, |k| shifts.get(k).cloned())
    }

    #[test]
    fn an_effect_shared_by_the_covariate_values_carries_over_and_unrelated_ones_do_not() {
        let genes = 400;
        // Shared: each perturbation's effect is the same in three cell types, plus a little noise.
        let shared: HashMap<ConditionKey, Vec<f64>> = (0..3)
            .flat_map(|c| (0..4).map(move |p| (c, p)))
            .map(|(c, p)| {
                let effect = noise(100 + p as u64, genes);
                let own = noise(1000 + 10 * c as u64 + p as u64, genes);
                (key(c, p), effect.iter().zip(&own).map(|(e, o)| e + 0.2 * o).collect())
            })
            .collect();
        let t = measured(&shared).expect("pairs");
        assert_eq!((t.same_pairs, t.other_pairs), (4 * 3, 4 * 3 * 3));
        assert!(t.same_perturbation_r > 0.9, "{t:?}");
        assert!(t.other_perturbations_r.abs() < 0.1, "{t:?}");
        assert!(t.carries_over);

        // Unrelated: every (cell type, perturbation) has an effect of its own.
        let unrelated: HashMap<ConditionKey, Vec<f64>> = (0..3)
            .flat_map(|c| (0..4).map(move |p| (key(c, p), noise(5000 + 10 * c as u64 + p as u64, genes))))
            .collect();
        let t = measured(&unrelated).expect("pairs");
        assert!(t.same_perturbation_r.abs() < 0.1 && t.other_perturbations_r.abs() < 0.1, "{t:?}");
        assert!(!t.carries_over);
    }

    #[test]
    fn nothing_to_say_without_a_perturbation_in_two_covariate_values() {
        let genes = 50;
        let mut shifts: HashMap<ConditionKey, Vec<f64>> = HashMap::new();
        shifts.insert(key(0, 1), noise(1, genes));
        shifts.insert(key(1, 2), noise(2, genes));
        assert_eq!(measured(&shifts), None);
        // A perturbation in two covariate values, but without training cells in one of them.
        let keys = [key(0, 1), key(1, 1)];
        let refs: Vec<&ConditionKey> = keys.iter().collect();
        assert_eq!(measure(&refs, |k| (k.covariates[0] == 0).then(|| noise(3, genes))), None);
        // Controls are not perturbations.
        let control = |c: u32| ConditionKey { covariates: vec![c], parts: vec![(CONTROL_ID as u32, 1.0f32.to_bits())] };
        let controls = [control(0), control(1)];
        let refs: Vec<&ConditionKey> = controls.iter().collect();
        assert_eq!(measure(&refs, |_| Some(noise(4, genes))), None);
    }

    #[test]
    fn many_pairs_are_sampled_evenly_and_counted_whole() {
        let genes = 20;
        // 130 perturbations in 2 cell types: 130 same pairs, 130 * 129 other pairs (over MAX_PAIRS).
        let shifts: HashMap<ConditionKey, Vec<f64>> =
            (0..2).flat_map(|c| (0..130).map(move |p| (key(c, p), noise(p as u64, genes)))).collect();
        let t = measured(&shifts).expect("pairs");
        assert_eq!((t.same_pairs, t.other_pairs), (130, 130 * 129));
        assert!((t.same_perturbation_r - 1.0).abs() < 1e-12, "{t:?}");
        assert!(t.other_perturbations_r.abs() < 0.1, "{t:?}");
    }
}
