//! The split-half technical replicate of cell-eval2 0.20.0 (`anchor.compute_replicate_anchor`,
//! `ceiling._disjoint_halves`): the reference's cells split five times into two disjoint halves
//! of `floor(n / 2)` cells per group (control included; the odd cell left out), half B scored as
//! a prediction of half A with each half's effects and tests against its own control cells
//! (`control_source="pred"`), and each member's aggregate averaged over the five splits; for
//! `de_wilcoxon_lfc_nmae` the split's value is `nmae_ref_raw` instead
//! (`lfc_nmae_ref.compute_lfc_nmae_reference`): over each perturbation's genes called in the
//! whole reference (its own gene left out), `mean |lfc_A - lfc_B| / mean |lfc|`, a fold change a
//! half did not test counted as 0, perturbations with fewer than 10 such genes left out.
//!
//! The splits are numpy's: seeds `SeedSequence(0).generate_state(5)`, each split's generator
//! `default_rng(seed)` permuting each group's rows (in ascending order) in the order pandas'
//! `groupby(observed=True)` visits the groups (the categories' order for a categorical column,
//! sorted otherwise), so the halves are the cells cell-eval2 splits.

use std::collections::HashMap;

use cpa_stream_stages::h5ad::H5adReader;

use super::cells::Groups;
use super::numpy_random::{self, Generator};
use crate::error::{Error, Result};
use crate::obs::TextColumn;

/// Splits (`n_splits` of the anchor).
pub const SPLITS: usize = 5;
/// The seed the five split seeds come from (`base_seed`).
pub const BASE_SEED: u64 = 0;
/// Half A's cells (the reference of a split) in a membership.
pub const HALF_A: u8 = 1;
/// Half B's cells (its prediction).
pub const HALF_B: u8 = 2;

/// The seeds of the splits (`SeedSequence(base).generate_state(n)`).
pub fn split_seeds(base: u64, n: usize) -> Vec<u64> {
    numpy_random::generate_state(base, n).into_iter().map(u64::from).collect()
}

/// The order pandas' `groupby(observed=True)` visits the labels of obs column `key` in: a
/// categorical column's categories in their order, others sorted.
pub fn group_order(reader: &H5adReader, key: &str, groups: &Groups) -> Result<Vec<usize>> {
    let origin = reader.path().display().to_string();
    let head = reader.read_obs(0..reader.n_obs().min(1)).map_err(Error::stage(crate::Stage::Read))?;
    let column = crate::obs::column_strings(&head, key, &origin)?;
    let sorted: Vec<usize> = (0..groups.labels.len()).collect();
    Ok(match column {
        TextColumn::Dictionary { values, .. } => {
            let mut order = Vec::with_capacity(groups.labels.len());
            for category in values.iter().flatten() {
                if let Some(i) = groups.position(category) {
                    order.push(i);
                }
            }
            if order.len() != groups.labels.len() {
                return Err(Error::InvalidInput(format!(
                    "{origin}: obs column {key:?} has labels outside its categories"
                )));
            }
            order
        }
        TextColumn::Strings(_) => sorted,
        TextColumn::Formatted(_) => {
            // Numbers sort as numbers (pandas sorts the values, not their text).
            let numbers: Option<Vec<f64>> = groups.labels.iter().map(|l| l.parse::<f64>().ok()).collect();
            match numbers {
                Some(numbers) => {
                    let mut order = sorted;
                    order.sort_by(|&a, &b| numbers[a].total_cmp(&numbers[b]));
                    order
                }
                None => sorted,
            }
        }
    })
}

/// One split's membership of every cell of the file (`HALF_A`, `HALF_B` or 0), from the
/// groups of the whole file visited in `order`.
pub fn halves(n_cells: u64, groups: &Groups, order: &[usize], seed: u64, origin: &str) -> Result<Vec<u8>> {
    let mut membership = vec![0u8; n_cells as usize];
    let mut generator = Generator::new(seed);
    for &i in order {
        let rows = groups.rows(i);
        let perm = generator.permutation(&rows);
        let h = perm.len() / 2;
        if h < 2 {
            return Err(Error::InvalidInput(format!(
                "{origin}: group {:?} has {} cell(s); the split-half replicate needs at least 4 per group, so that each \
                 half holds two for its Wilcoxon tests",
                groups.labels[i],
                perm.len()
            )));
        }
        for &r in &perm[..h] {
            membership[r as usize] = HALF_A;
        }
        for &r in &perm[h..2 * h] {
            membership[r as usize] = HALF_B;
        }
    }
    Ok(membership)
}

/// Positions of gene ids.
pub fn positions<'a>(features: &[&'a str]) -> HashMap<&'a str, usize> {
    features.iter().enumerate().map(|(k, &f)| (f, k)).collect()
}
