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
//! The two shifts of a pair come from different covariate values, so no control cell enters both.
//! A change common to every perturbation in every covariate value (a generic response to being
//! perturbed, or a batch between the control and the treated cells) raises the two averages
//! equally, so the difference is what a perturbation carries over. With a single perturbation (the classic unseen-cell-type
//! data: one stimulation in several cell types) there is no pair of different perturbations; the
//! reference is then 0, what unrelated changes correlate on average.
//!
//! A correlation says whether the effects are alike, not how large the part that carries over is.
//! The transfer slope says that: each condition's training shift regressed, through the origin
//! and pooled over conditions and genes, on the mean of the same perturbation's shifts in the
//! other covariate values. Near 1 a value's shift repeats the others' at full size (what the
//! other-covariates baseline assumes), near 0 none of it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use cpa_stream_pipeline::condition::ConditionKey;

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
    /// Whether `same_perturbation_r` exceeds `other_perturbations_r` (0 without a pair of
    /// different perturbations) by [`CARRY_OVER_MARGIN`].
    pub carries_over: bool,
    /// The least-squares slope through the origin of each condition's training shift on the mean
    /// of the same perturbation's shifts in its other covariate values, over every such condition
    /// and gene: the share of the others' shift that a value's shift repeats (NaN where those
    /// means are all zero).
    pub slope: f64,
}

/// Measures [`Transfer`] over `keys` (conditions; controls and conditions without covariates are
/// skipped), `shift` giving a condition's training shift (`None` without training cells of it or
/// of its covariates' controls). `None` when no perturbation has a shift in two covariate values.
pub fn measure(keys: &[&ConditionKey], shift: impl Fn(&ConditionKey) -> Option<Vec<f64>>) -> Option<Transfer> {
    // The conditions with a shift, by perturbation and by covariate value. Pairs are enumerated
    // within these groups, never over all pairs of conditions: an atlas of many perturbations in
    // many cell types has too many of those.
    let mut by_parts: BTreeMap<&[(u32, u32)], Vec<&ConditionKey>> = BTreeMap::new();
    let mut by_covariates: BTreeMap<&[u32], Vec<&ConditionKey>> = BTreeMap::new();
    let keys: BTreeSet<&ConditionKey> = keys.iter().copied().collect();
    for k in keys {
        if !k.is_control() && !k.covariates.is_empty() && shift(k).is_some() {
            by_parts.entry(&k.parts).or_default().push(k);
            by_covariates.entry(&k.covariates).or_default().push(k);
        }
    }
    // Two conditions of one perturbation differ in their covariates (the keys are distinct).
    let same_pairs: usize = by_parts.values().map(|g| g.len() * g.len().saturating_sub(1) / 2).sum();
    if same_pairs == 0 {
        return None;
    }
    let groups: Vec<&Vec<&ConditionKey>> = by_covariates.values().collect();
    let across: usize =
        groups.iter().enumerate().map(|(i, a)| groups[i + 1..].iter().map(|b| a.len() * b.len()).sum::<usize>()).sum();
    let other_pairs = across.saturating_sub(same_pairs);

    let mut same = Mean::default();
    let step = same_pairs.div_ceil(MAX_PAIRS).max(1);
    let mut index = 0usize;
    for group in by_parts.values() {
        for (i, a) in group.iter().enumerate() {
            for b in &group[i + 1..] {
                if index.is_multiple_of(step) {
                    same.add(&shift, a, b);
                }
                index += 1;
            }
        }
    }
    // Different perturbations: every step-th pair of the pairs across two covariate values (in
    // the order of the values, then of their conditions), skipping those of one perturbation.
    let mut other = Mean::default();
    let step = across.div_ceil(MAX_PAIRS).max(1);
    let (mut next, mut start) = (0usize, 0usize);
    for (i, a) in groups.iter().enumerate() {
        for b in &groups[i + 1..] {
            let size = a.len() * b.len();
            while next < start + size {
                let r = next - start;
                let (x, y) = (a[r / b.len()], b[r % b.len()]);
                if x.parts != y.parts {
                    other.add(&shift, x, y);
                }
                next += step;
            }
            start += size;
        }
    }
    let (same_perturbation_r, other_perturbations_r) = (same.value(), other.value());
    let reference = if other_perturbations_r.is_finite() { other_perturbations_r } else { 0.0 };
    Some(Transfer {
        same_perturbation_r,
        same_pairs,
        other_perturbations_r,
        other_pairs,
        carries_over: same_perturbation_r - reference >= CARRY_OVER_MARGIN,
        slope: slope(by_parts.values(), &shift),
    })
}

/// [`Transfer::slope`] over the groups of one perturbation's conditions (in distinct covariate
/// values); linear in the conditions, one group's shifts in memory at a time.
fn slope<'k>(
    groups: impl Iterator<Item = &'k Vec<&'k ConditionKey>>,
    shift: &impl Fn(&ConditionKey) -> Option<Vec<f64>>,
) -> f64 {
    let (mut xy, mut xx) = (0.0f64, 0.0f64);
    for group in groups {
        let shifts: Vec<Vec<f64>> = group.iter().filter_map(|k| shift(k)).collect();
        let Some(first) = shifts.first() else { continue };
        if shifts.len() < 2 {
            continue;
        }
        let mut total = vec![0.0f64; first.len()];
        for s in &shifts {
            for (t, v) in total.iter_mut().zip(s) {
                *t += v;
            }
        }
        let others = (shifts.len() - 1) as f64;
        for s in &shifts {
            for (t, y) in total.iter().zip(s) {
                let x = (t - y) / others;
                xy += x * y;
                xx += x * x;
            }
        }
    }
    if xx > 0.0 { xy / xx } else { f64::NAN }
}

/// A running mean of the correlations of pairs of shifts (pairs without a finite one left out).
#[derive(Default)]
struct Mean {
    sum: f64,
    n: usize,
}

impl Mean {
    fn add(&mut self, shift: &impl Fn(&ConditionKey) -> Option<Vec<f64>>, a: &ConditionKey, b: &ConditionKey) {
        let (Some(x), Some(y)) = (shift(a), shift(b)) else { return };
        let r = pearson(&x, &y);
        if r.is_finite() {
            self.sum += r;
            self.n += 1;
        }
    }

    fn value(&self) -> f64 {
        if self.n == 0 { f64::NAN } else { self.sum / self.n as f64 }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::vocab::CONTROL_ID;

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
        assert!(t.slope > 0.9 && t.slope < 1.05, "{t:?}");

        // Unrelated: every (cell type, perturbation) has an effect of its own.
        let unrelated: HashMap<ConditionKey, Vec<f64>> = (0..3)
            .flat_map(|c| (0..4).map(move |p| (key(c, p), noise(5000 + 10 * c as u64 + p as u64, genes))))
            .collect();
        let t = measured(&unrelated).expect("pairs");
        assert!(t.same_perturbation_r.abs() < 0.1 && t.other_perturbations_r.abs() < 0.1, "{t:?}");
        assert!(!t.carries_over);
        assert!(t.slope.abs() < 0.1, "{t:?}");
    }

    #[test]
    fn the_slope_is_the_share_of_the_other_values_shift_that_repeats() {
        // One perturbation in three cell types, its shift halved in the third: each shift against
        // the mean of the other two, by hand.
        let s = [vec![1.0, 2.0, 0.0, -1.0], vec![1.0, 2.0, 0.0, -1.0], vec![0.5, 1.0, 0.0, -0.5]];
        let mut shifts: HashMap<ConditionKey, Vec<f64>> =
            s.iter().enumerate().map(|(c, v)| (key(c as u32, 0), v.clone())).collect();
        let (mut xy, mut xx) = (0.0, 0.0);
        for (i, own) in s.iter().enumerate() {
            for (g, y) in own.iter().enumerate() {
                let x = (0..3).filter(|&j| j != i).map(|j| s[j][g]).sum::<f64>() / 2.0;
                xy += x * y;
                xx += x * x;
            }
        }
        // (0.75 * 1 + 0.75 * 1 + 1 * 0.5) / (0.75^2 + 0.75^2 + 1) on the first gene, and so on.
        assert!((xy / xx - 2.0 / 2.125).abs() < 1e-12);
        let t = measured(&shifts).expect("pairs");
        assert!((t.slope - xy / xx).abs() < 1e-12, "{t:?}");
        // A second perturbation in two cell types pools with the first; a shift that is zero
        // adds nothing to the sums of the other's regression but its own x.
        shifts.insert(key(0, 1), vec![2.0, 0.0, 0.0, 0.0]);
        shifts.insert(key(1, 1), vec![0.0; 4]);
        let t = measured(&shifts).expect("pairs");
        assert!((t.slope - xy / (xx + 4.0)).abs() < 1e-12, "{t:?}");
        // No shift to regress on: no slope.
        let zero: HashMap<ConditionKey, Vec<f64>> = (0..2).map(|c| (key(c, 0), vec![0.0; 4])).collect();
        assert!(measured(&zero).expect("pairs").slope.is_nan());
    }

    #[test]
    fn one_perturbation_in_several_cell_types_is_measured_against_zero() {
        // One stimulation in four cell types (no pair of different perturbations): its shared
        // effect carries over, its unrelated effects do not.
        let genes = 400;
        let one = |shared: f64| -> HashMap<ConditionKey, Vec<f64>> {
            (0..4)
                .map(|c| {
                    let (effect, own) = (noise(7, genes), noise(70 + c as u64, genes));
                    (key(c, 0), effect.iter().zip(&own).map(|(e, o)| shared * e + o).collect())
                })
                .collect()
        };
        let t = measured(&one(2.0)).expect("pairs");
        assert_eq!((t.same_pairs, t.other_pairs), (6, 0));
        assert!(t.other_perturbations_r.is_nan() && t.same_perturbation_r > 0.5 && t.carries_over, "{t:?}");
        let t = measured(&one(0.0)).expect("pairs");
        assert!(t.same_perturbation_r.abs() < 0.1 && !t.carries_over, "{t:?}");
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
        // In any order, and a key given twice counts once.
        let mut keys: Vec<&ConditionKey> = shifts.keys().collect();
        keys.extend(shifts.keys());
        assert_eq!(measure(&keys, |k| shifts.get(k).cloned()), Some(t));
    }

    #[test]
    fn an_atlas_of_many_perturbations_in_many_cell_types_is_counted_from_its_groups() {
        // 3,000 perturbations in 20 cell types: 60,000 conditions, 1.8e9 pairs of them.
        let keys: Vec<ConditionKey> = (0..20).flat_map(|c| (0..3000).map(move |p| key(c, p))).collect();
        let refs: Vec<&ConditionKey> = keys.iter().collect();
        let t = measure(&refs, |k| Some(noise(u64::from(k.parts[0].0), 8))).expect("pairs");
        let same = 3000 * (20 * 19 / 2);
        assert_eq!((t.same_pairs, t.other_pairs), (same, (20 * 19 / 2) * 3000 * 3000 - same));
        assert!((t.same_perturbation_r - 1.0).abs() < 1e-12 && t.carries_over, "{t:?}");
    }
}
