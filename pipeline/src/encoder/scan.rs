//! The pass over obs: each row's label group (parsed once per group) and split.

use std::collections::HashMap;

use cpa_stream_stages::model::vocab::{
    CellSet, Covariate, DataSpec, SplitSpec, Stratify, Vocabulary, canonical_condition, split_by_fraction,
    split_condition, split_of_cell_id,
};

use super::key::GroupKey;
use super::{CellLabels, EncoderOptions, GROUP_BITS, GROUP_MASK, Group, Split};
use crate::Stage;
use crate::error::{Error, Result};
use crate::obs::TextColumn;

/// The label columns of one obs batch, as text.
pub(super) struct Columns {
    pub(super) ids: Option<TextColumn>,
    pub(super) perts: TextColumn,
    pub(super) doses: Option<TextColumn>,
    pub(super) covariates: Vec<TextColumn>,
    pub(super) splits: Option<TextColumn>,
}

/// A label group as obs writes it, before the vocabularies exist.
struct RawGroup {
    names: Vec<(String, f32)>,
    condition: String,
    covariates: Vec<String>,
    /// The condition and dose as obs spells them.
    obs_text: (String, Option<String>),
}

/// The state of the pass over obs.
pub(super) struct Scan<'a> {
    options: &'a EncoderOptions,
    origin: &'a str,
    groups: Vec<RawGroup>,
    lookup: HashMap<String, u32>,
    cells: Vec<u32>,
    /// Cells of each group seen so far (the stratified split's counter).
    group_seen: Vec<u64>,
    pub(super) seen_values: Vec<Vec<String>>,
    key: GroupKey,
    holdout: Vec<String>,
    fractions: Option<Fractions>,
    /// The cells read, by id.
    cell_set: CellSet,
    pub(super) row: u64,
}

/// A fraction split's settings.
#[derive(Debug, Clone, Copy)]
struct Fractions {
    validation: f64,
    test: f64,
    seed: u64,
    method: Stratify,
}

impl<'a> Scan<'a> {
    pub(super) fn new(options: &'a EncoderOptions, n_obs: u64, origin: &'a str) -> Result<Scan<'a>> {
        let bad = |msg: String| Error::InvalidInput(format!("{origin}: {msg}"));
        let (holdout, fractions) = match &options.split {
            SplitSpec::Fraction { validation, test, seed, holdout, method } => {
                if !(0.0..1.0).contains(validation) || !(0.0..1.0).contains(test) || validation + test >= 1.0 {
                    return Err(bad(format!(
                        "validation fraction {validation} and test fraction {test} must be >= 0 and sum below 1"
                    )));
                }
                let control = canonical_condition(&options.control);
                if let Some(c) = holdout.iter().find(|c| canonical_condition(c) == control) {
                    return Err(bad(format!(
                        "the control {c:?} cannot be held out: every prediction starts from control cells"
                    )));
                }
                let mut sorted: Vec<String> = holdout.iter().map(|c| canonical_condition(c)).collect();
                sorted.sort();
                if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                    return Err(bad(format!("held-out condition {:?} is named twice", w[0])));
                }
                let fractions = Fractions { validation: *validation, test: *test, seed: *seed, method: *method };
                (holdout.iter().map(|c| canonical_condition(c)).collect(), Some(fractions))
            }
            SplitSpec::Column(_) => (Vec::new(), None),
        };
        Ok(Scan {
            options,
            origin,
            groups: Vec::new(),
            lookup: HashMap::new(),
            cells: Vec::with_capacity(usize::try_from(n_obs).unwrap_or(0)),
            group_seen: Vec::new(),
            seen_values: vec![Vec::new(); options.all_covariate_keys().len()],
            key: GroupKey::default(),
            holdout,
            fractions,
            cell_set: CellSet::default(),
            row: 0,
        })
    }

    pub(super) fn bad(&self, msg: String) -> Error {
        Error::InvalidInput(format!("{}: {msg}", self.origin))
    }

    /// Labels row `i` of a batch: its group (new groups are parsed once) and its split.
    pub(super) fn push(&mut self, columns: &Columns, i: usize, covariate_keys: &[String]) -> Result<()> {
        let row = self.row;
        let cell = || match columns.ids.as_ref().and_then(|v| v.get(i)) {
            Some(id) => format!("row {row} (cell {id:?})"),
            None => format!("row {row}"),
        };
        let condition = columns
            .perts
            .get(i)
            .ok_or_else(|| self.bad(format!("{}: {} is missing", cell(), self.options.perturbation_key)))?;
        let dose = match &columns.doses {
            Some(d) => Some(d.get(i).ok_or_else(|| self.bad(format!("{}: dose is missing", cell())))?),
            None => None,
        };
        let mut values = Vec::with_capacity(covariate_keys.len());
        for (k, c) in covariate_keys.iter().zip(&columns.covariates) {
            values.push(c.get(i).ok_or_else(|| self.bad(format!("{}: {k} is missing", cell())))?);
        }
        let key = self.key.of(condition, dose, &values);
        let group = match self.lookup.get(key) {
            Some(&g) => g,
            None => {
                let key = key.to_owned();
                let names = split_condition(condition, dose, self.options.max_comb_len)
                    .map_err(|reason| self.bad(format!("{}: {reason}", cell())))?;
                self.new_group(key, names, (condition, dose), &values)?
            }
        };
        let id = columns.ids.as_ref().and_then(|v| v.get(i));
        if let Some(id) = id {
            self.cell_set.add(id);
        }
        let split = match (&columns.splits, self.fractions) {
            (Some(s), _) => s.get(i).and_then(|v| v.parse::<Split>().ok()).ok_or_else(|| {
                self.bad(format!("{}: split {:?} is not train, valid, test or ood", cell(), s.get(i)))
            })?,
            (None, Some(f)) => {
                if self.holdout.contains(&self.groups[group as usize].condition) {
                    Split::Ood
                } else {
                    let k = self.group_seen[group as usize];
                    self.group_seen[group as usize] += 1;
                    match f.method {
                        Stratify::Sequence => stratified(f.seed, group, k, f.validation, f.test),
                        // Decided once every group's size is known (`assign_exact`).
                        Stratify::Exact => Split::Train,
                        Stratify::CellId => {
                            let id = id.ok_or_else(|| self.bad(format!("{}: no cell id to split by", cell())))?;
                            Split::from(split_of_cell_id(id, f.seed, f.validation, f.test))
                        }
                    }
                }
            }
            (None, None) => Split::Train,
        };
        self.cells.push(group | ((split as u32) << GROUP_BITS));
        self.row += 1;
        Ok(())
    }

    fn new_group(
        &mut self,
        key: String,
        names: Vec<(&str, f32)>,
        (condition, dose): (&str, Option<&str>),
        values: &[&str],
    ) -> Result<u32> {
        for (seen, v) in self.seen_values.iter_mut().zip(values) {
            if !seen.iter().any(|s| s == v) {
                seen.push((*v).to_owned());
            }
        }
        let g = u32::try_from(self.groups.len()).unwrap_or(u32::MAX);
        if g > GROUP_MASK {
            return Err(self.bad("more than 2^30 distinct label groups".into()));
        }
        self.groups.push(RawGroup {
            names: names.into_iter().map(|(n, d)| (n.to_owned(), d)).collect(),
            condition: canonical_condition(condition),
            covariates: values.iter().map(|v| (*v).to_owned()).collect(),
            obs_text: (condition.to_owned(), dose.map(str::to_owned)),
        });
        self.group_seen.push(0);
        self.lookup.insert(key, g);
        Ok(g)
    }

    /// The control must occur: without it there is nothing to decode counterfactuals from, and
    /// the real control would silently train as one more perturbation.
    pub(super) fn check_control(&self) -> Result<()> {
        let control = canonical_condition(&self.options.control);
        if self.groups.iter().any(|g| g.condition == control) {
            return Ok(());
        }
        Err(self.bad(format!(
            "control {:?} does not occur in obs column {:?}; its values, closest first: {} (set it with --control)",
            self.options.control,
            self.options.perturbation_key,
            crate::suggest::listing(&self.options.control, self.groups.iter().map(|g| g.condition.as_str()), 12)
        )))
    }

    /// Every held-out condition must occur.
    pub(super) fn check_holdout(&self) -> Result<()> {
        let SplitSpec::Fraction { holdout, .. } = &self.options.split else { return Ok(()) };
        for (written, key) in holdout.iter().zip(&self.holdout) {
            if !self.groups.iter().any(|g| g.condition == *key) {
                return Err(self.bad(format!(
                    "held-out condition {written:?} does not occur in {}; closest first: {}",
                    self.options.perturbation_key,
                    crate::suggest::listing(key, self.groups.iter().map(|g| g.condition.as_str()), 8)
                )));
            }
        }
        Ok(())
    }

    /// The exact assignment: in each group of `n` cells (held-out conditions aside),
    /// `round(validation x n)` go to validation and `round(test x n)` to test, those whose place
    /// in a seeded affine permutation of `0..n` comes first.
    fn assign_exact(&mut self, f: Fractions) {
        let counts: Vec<(u64, u64, u64, u64)> = self
            .group_seen
            .iter()
            .enumerate()
            .map(|(g, &n)| {
                let valid = ((f.validation * n as f64).round() as u64).min(n);
                let test = ((f.test * n as f64).round() as u64).min(n - valid);
                let (a, b) = affine_permutation(f.seed, g as u32, n);
                (valid, test, a, b)
            })
            .collect();
        let mut k = vec![0u64; self.group_seen.len()];
        for cell in &mut self.cells {
            if Split::from_bits(*cell >> GROUP_BITS) == Split::Ood {
                continue;
            }
            let g = (*cell & GROUP_MASK) as usize;
            let (n, (valid, test, a, b)) = (self.group_seen[g], counts[g]);
            let place = ((u128::from(a) * u128::from(k[g]) + u128::from(b)) % u128::from(n.max(1))) as u64;
            k[g] += 1;
            let split = if place < valid {
                Split::Valid
            } else if place < valid + test {
                Split::Test
            } else {
                Split::Train
            };
            *cell = (g as u32) | ((split as u32) << GROUP_BITS);
        }
    }

    /// The vocabularies and the groups in their ids.
    pub(super) fn finish(
        mut self,
        covariates: Vec<Covariate>,
        genes: Vec<String>,
        options: &EncoderOptions,
    ) -> Result<CellLabels> {
        if let Some(f) = self.fractions.filter(|f| f.method == Stratify::Exact) {
            self.assign_exact(f);
        }
        let mut split_counts = [0u64; 4];
        let mut train_per_group = vec![0u64; self.groups.len()];
        for &c in &self.cells {
            let split = (c >> GROUP_BITS) as usize;
            split_counts[split] += 1;
            if split == Split::Train as usize {
                train_per_group[(c & GROUP_MASK) as usize] += 1;
            }
        }
        let mut condition_counts: HashMap<&str, u64> = HashMap::new();
        for (g, n) in self.groups.iter().zip(&train_per_group) {
            *condition_counts.entry(g.condition.as_str()).or_default() += n;
        }
        let mut conditions: Vec<(String, u64)> = condition_counts.into_iter().map(|(c, n)| (c.to_owned(), n)).collect();
        conditions.sort();
        let perturbations: Vec<String> =
            self.groups.iter().flat_map(|g| g.names.iter().map(|(n, _)| n.clone())).collect();
        let mut vocab = Vocabulary::new(genes, &options.control, perturbations, covariates, conditions)
            .map_err(Error::stage(Stage::Encoder))?;
        vocab.data = Some(DataSpec {
            perturbation_key: options.perturbation_key.clone(),
            dose_key: options.dose_key.clone(),
            split: options.split.clone(),
            cells: Some(self.cell_set),
        });
        let (pert_index, class_index) = (vocab.perturbation_index(), vocab.condition_index());
        let mut groups = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let parts = g.names.iter().map(|(n, d)| (pert_index.get(n.as_str()).copied().unwrap_or(0), *d)).collect();
            let covariates = vocab
                .covariates
                .iter()
                .zip(&g.covariates)
                .map(|(cov, v)| {
                    cov.categories.iter().position(|c| c == v).map(|p| p as u32).ok_or_else(|| {
                        self.bad(format!("{}: value {v:?} is not among its declared categories", cov.name))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let class = class_index.get(g.condition.as_str()).copied().unwrap_or(0);
            let (condition, dose) = g.obs_text.clone();
            groups.push(Group { parts, covariates, class, condition, dose });
        }
        let mut cells = self.cells;
        cells.shrink_to_fit();
        Ok(CellLabels { vocab, groups, cells, split_counts })
    }
}

/// A seeded bijection `k -> (a k + b) mod n` of `0..n` (`a` coprime with `n`), different for
/// every (seed, group).
fn affine_permutation(seed: u64, group: u32, n: u64) -> (u64, u64) {
    if n <= 1 {
        return (1, 0);
    }
    let mix = |mut x: u64| {
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    };
    let h = mix(seed ^ u64::from(group).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut a = 1 + mix(h) % (n - 1);
    while gcd(a, n) != 1 {
        a = a % (n - 1) + 1;
    }
    (a, mix(h ^ 0x5851_F42D_4C95_7F2D) % n)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The sequence assignment ([`Stratify::Sequence`], models trained before the exact one): the
/// k-th cell of a group goes to validation or test following a seeded low-discrepancy sequence,
/// decided as it is read; each group's fractions are met to within a few cells.
pub(super) fn stratified(seed: u64, group: u32, k: u64, validation: f64, test: f64) -> Split {
    let mut x = seed ^ u64::from(group).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let offset = (x >> 11) as f64 / (1u64 << 53) as f64;
    let u = (offset + k as f64 * 0.618_033_988_749_894_9).fract();
    Split::from(split_by_fraction(u, validation, test))
}
