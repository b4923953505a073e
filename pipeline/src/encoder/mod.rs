//! The perturbation encoder: one pass over a store's obs table builds the vocabularies, the
//! label groups (condition, doses, covariates) and each cell's group and split.
//!
//! Per cell it keeps one `u32` (group id and split), so host memory grows by 4 bytes per cell,
//! not by the cell's labels. The perturbation rows the model reads are built from a group's
//! parts by [`PerturbationCsr`](cpa_stream_stages::model::PerturbationCsr), the one CSR builder of
//! training, validation, prediction and evaluation.

mod key;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use arrow::datatypes::Schema;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_schemas::tables::{CELL_ID, categories_of};
use cpa_stream_stages::model::config::DEFAULT_MAX_COMB_LEN;
use cpa_stream_stages::model::vocab::{Covariate, DataSpec, Vocabulary, canonical_condition, split_condition};
pub use cpa_stream_stages::model::vocab::{SplitSpec, Stratify};
use cpa_stream_stages::store::{Store, read_table, table_schema};
pub(crate) use key::GroupKey;

use crate::error::{Error, Result};
use crate::obs::{TextColumn, column_strings, gene_names};

/// The obs column of the perturbation condition, unless another is named.
pub const DEFAULT_PERTURBATION_KEY: &str = "condition";
/// The control condition's name, unless another is named.
pub const DEFAULT_CONTROL: &str = "control";
/// Fraction of each label group's cells kept for validation (a fraction split).
pub const DEFAULT_VALIDATION_FRACTION: f64 = 0.1;
/// Fraction of each label group's cells kept for testing (a fraction split).
pub const DEFAULT_TEST_FRACTION: f64 = 0.1;

/// How the encoder reads obs.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderOptions {
    /// The perturbation column (`drugA+drugB`); default [`DEFAULT_PERTURBATION_KEY`].
    pub perturbation_key: String,
    /// Dose column (`0.1+1` for combinations); `None` gives dose 1 to every part.
    pub dose_key: Option<String>,
    /// The control condition; default [`DEFAULT_CONTROL`].
    pub control: String,
    /// Categorical covariate columns.
    pub covariate_keys: Vec<String>,
    /// A batch covariate, left out of the corrected latents.
    pub batch_key: Option<String>,
    /// How cells are split; default: [`DEFAULT_VALIDATION_FRACTION`] and
    /// [`DEFAULT_TEST_FRACTION`] of each group, seed 0, nothing held out.
    pub split: SplitSpec,
    /// Most parts of a combination; default the model's [`DEFAULT_MAX_COMB_LEN`].
    pub max_comb_len: usize,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        EncoderOptions {
            perturbation_key: DEFAULT_PERTURBATION_KEY.to_owned(),
            dose_key: None,
            control: DEFAULT_CONTROL.to_owned(),
            covariate_keys: Vec::new(),
            batch_key: None,
            split: SplitSpec::fractions(DEFAULT_VALIDATION_FRACTION, DEFAULT_TEST_FRACTION, 0, Vec::new()),
            max_comb_len: DEFAULT_MAX_COMB_LEN,
        }
    }
}

impl EncoderOptions {
    /// The covariate columns, the batch key last when it is not among them.
    pub fn all_covariate_keys(&self) -> Vec<String> {
        let mut keys = self.covariate_keys.clone();
        if let Some(b) = &self.batch_key
            && !keys.contains(b)
        {
            keys.push(b.clone());
        }
        keys
    }
}

/// The split of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Trained on.
    Train = 0,
    /// Scored after epochs (early stopping, best weights).
    Valid = 1,
    /// Kept for evaluation.
    Test = 2,
    /// Held out entirely (out of distribution).
    Ood = 3,
}

impl Split {
    /// Every split, in code order.
    pub const ALL: [Split; 4] = [Split::Train, Split::Valid, Split::Test, Split::Ood];

    fn from_bits(bits: u32) -> Split {
        Split::ALL[(bits & 3) as usize]
    }

    /// The split's name (`train`, `valid`, `test`, `ood`).
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
            Split::Ood => "ood",
        }
    }

    /// A split column's value (`train`/`training`, `valid`/`validation`/`val`, `test`, `ood`,
    /// any case).
    pub fn parse(value: &str) -> Option<Split> {
        match value.to_ascii_lowercase().as_str() {
            "train" | "training" => Some(Split::Train),
            "valid" | "validation" | "val" => Some(Split::Valid),
            "test" => Some(Split::Test),
            "ood" => Some(Split::Ood),
            _ => None,
        }
    }
}

/// The labels of one group of cells (same condition, doses and covariates).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Perturbation ids and doses.
    pub parts: Vec<(u32, f32)>,
    /// Category code of each covariate.
    pub covariates: Vec<u32>,
    /// Condition class (the adversary's label).
    pub class: u32,
}

const GROUP_BITS: u32 = 30;
const GROUP_MASK: u32 = (1 << GROUP_BITS) - 1;

/// Vocabularies, label groups and every cell's group and split.
#[derive(Debug, Clone)]
pub struct CellLabels {
    /// Genes, perturbations, covariates and condition classes.
    pub vocab: Vocabulary,
    groups: Vec<Group>,
    cells: Vec<u32>,
    /// Cells per split (train, valid, test, ood).
    pub split_counts: [u64; 4],
}

impl CellLabels {
    /// Cells labelled.
    pub fn n_cells(&self) -> u64 {
        self.cells.len() as u64
    }

    /// The label groups, indexed by group id.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The group of cell `cell`.
    pub fn group(&self, cell: u64) -> &Group {
        &self.groups[(self.cells[cell as usize] & GROUP_MASK) as usize]
    }

    /// The index into [`groups`](Self::groups) of cell `cell`'s group.
    pub fn group_id(&self, cell: u64) -> u32 {
        self.cells[cell as usize] & GROUP_MASK
    }

    /// The split of cell `cell`.
    pub fn split(&self, cell: u64) -> Split {
        Split::from_bits(self.cells[cell as usize] >> GROUP_BITS)
    }

    /// Heap bytes held (4 per cell plus the groups).
    pub fn heap_bytes(&self) -> usize {
        self.cells.capacity() * 4 + self.groups.len() * std::mem::size_of::<Group>()
    }

    /// Labels from parts: each cell's (group, split). For tests and callers that encode obs
    /// themselves.
    pub fn from_parts(vocab: Vocabulary, groups: Vec<Group>, cells: &[(u32, Split)]) -> Result<CellLabels> {
        let mut split_counts = [0u64; 4];
        let mut packed = Vec::with_capacity(cells.len());
        for &(g, split) in cells {
            if g as usize >= groups.len() || g > GROUP_MASK {
                return Err(Error::InvalidInput(format!("group {g} of {}", groups.len())));
            }
            split_counts[split as usize] += 1;
            packed.push(g | ((split as u32) << GROUP_BITS));
        }
        Ok(CellLabels { vocab, groups, cells: packed, split_counts })
    }

    /// Builds the labels of `store` in one pass over its obs table.
    pub fn from_store(store: &Store, options: &EncoderOptions) -> Result<CellLabels> {
        let obs_path = store.file_path(StoreFiles::OBS);
        let origin = obs_path.display().to_string();
        let schema = table_schema(&obs_path).map_err(Error::stage("encoder"))?;
        check_columns(&schema, options, &origin)?;
        let covariate_keys = options.all_covariate_keys();
        let mut scan = Scan::new(options, store.n_obs(), &origin)?;
        for batch in read_table(&obs_path).map_err(Error::stage("encoder"))? {
            let batch = batch.map_err(Error::stage("encoder"))?;
            let col = |name: &str| column_strings(&batch, name, &origin);
            let columns = Columns {
                ids: col(CELL_ID).ok(),
                perts: col(&options.perturbation_key)?,
                doses: options.dose_key.as_deref().map(col).transpose()?,
                covariates: covariate_keys.iter().map(|k| col(k)).collect::<Result<_>>()?,
                splits: match &options.split {
                    SplitSpec::Column(c) => Some(col(c)?),
                    SplitSpec::Fraction { .. } => None,
                },
            };
            for i in 0..batch.num_rows() {
                scan.push(&columns, i, &covariate_keys)?;
            }
        }
        if scan.row != store.n_obs() {
            return Err(scan.bad(format!("{} obs rows for {} cells", scan.row, store.n_obs())));
        }
        scan.check_holdout()?;
        // Covariate categories: the column's declared categories, else the sorted distinct values.
        let covariates = covariate_keys
            .iter()
            .zip(&scan.seen_values)
            .map(|(k, seen)| {
                let declared = schema.field_with_name(k).ok().and_then(categories_of);
                let categories = declared.unwrap_or_else(|| {
                    let mut v = seen.clone();
                    v.sort();
                    v
                });
                Covariate { name: k.clone(), categories, is_batch: options.batch_key.as_deref() == Some(k.as_str()) }
            })
            .collect();
        scan.finish(covariates, gene_names(store)?, options)
    }
}

/// The label columns of one obs batch, as text.
struct Columns {
    ids: Option<TextColumn>,
    perts: TextColumn,
    doses: Option<TextColumn>,
    covariates: Vec<TextColumn>,
    splits: Option<TextColumn>,
}

/// A label group as obs writes it, before the vocabularies exist.
struct RawGroup {
    names: Vec<(String, f32)>,
    condition: String,
    covariates: Vec<String>,
}

/// The state of the pass over obs.
struct Scan<'a> {
    options: &'a EncoderOptions,
    origin: &'a str,
    groups: Vec<RawGroup>,
    lookup: HashMap<String, u32>,
    cells: Vec<u32>,
    /// Cells of each group seen so far (the stratified split's counter).
    group_seen: Vec<u64>,
    seen_values: Vec<Vec<String>>,
    key: GroupKey,
    holdout: Vec<String>,
    fractions: Option<Fractions>,
    row: u64,
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
    fn new(options: &'a EncoderOptions, n_obs: u64, origin: &'a str) -> Result<Scan<'a>> {
        let bad = |msg: String| Error::InvalidInput(format!("{origin}: {msg}"));
        let (holdout, fractions) = match &options.split {
            SplitSpec::Fraction { validation, test, seed, holdout, method } => {
                if !(0.0..1.0).contains(validation) || !(0.0..1.0).contains(test) || validation + test >= 1.0 {
                    return Err(bad(format!(
                        "validation fraction {validation} and test fraction {test} must be >= 0 and sum below 1"
                    )));
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
            row: 0,
        })
    }

    fn bad(&self, msg: String) -> Error {
        Error::InvalidInput(format!("{}: {msg}", self.origin))
    }

    /// Labels row `i` of a batch: its group (new groups are parsed once) and its split.
    fn push(&mut self, columns: &Columns, i: usize, covariate_keys: &[String]) -> Result<()> {
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
                self.new_group(key, names, condition, &values)?
            }
        };
        let split = match (&columns.splits, self.fractions) {
            (Some(s), _) => s.get(i).and_then(Split::parse).ok_or_else(|| {
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
                    }
                }
            }
            (None, None) => Split::Train,
        };
        self.cells.push(group | ((split as u32) << GROUP_BITS));
        self.row += 1;
        Ok(())
    }

    fn new_group(&mut self, key: String, names: Vec<(&str, f32)>, condition: &str, values: &[&str]) -> Result<u32> {
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
        });
        self.group_seen.push(0);
        self.lookup.insert(key, g);
        Ok(g)
    }

    /// Every held-out condition must occur.
    fn check_holdout(&self) -> Result<()> {
        let SplitSpec::Fraction { holdout, .. } = &self.options.split else { return Ok(()) };
        for (written, key) in holdout.iter().zip(&self.holdout) {
            if !self.groups.iter().any(|g| g.condition == *key) {
                return Err(self.bad(format!(
                    "held-out condition {written:?} does not occur in {}",
                    self.options.perturbation_key
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
    fn finish(
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
            .map_err(Error::stage("encoder"))?;
        vocab.data = Some(DataSpec {
            perturbation_key: options.perturbation_key.clone(),
            dose_key: options.dose_key.clone(),
            split: options.split.clone(),
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
            groups.push(Group { parts, covariates, class });
        }
        let mut cells = self.cells;
        cells.shrink_to_fit();
        Ok(CellLabels { vocab, groups, cells, split_counts })
    }
}

/// Every label column the options name must be in obs.
fn check_columns(schema: &Schema, options: &EncoderOptions, origin: &str) -> Result<()> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let need = |key: &str| -> Result<()> {
        if names.contains(&key) {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!("{origin}: no obs column {key:?} (columns: {})", names.join(", "))))
        }
    };
    need(&options.perturbation_key)?;
    if let Some(d) = &options.dose_key {
        need(d)?;
    }
    for k in options.all_covariate_keys() {
        need(&k)?;
    }
    if let SplitSpec::Column(c) = &options.split {
        need(c)?;
    }
    if options.max_comb_len == 0 {
        return Err(Error::InvalidInput(format!("{origin}: max_comb_len must be at least 1")));
    }
    Ok(())
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
fn stratified(seed: u64, group: u32, k: u64, validation: f64, test: f64) -> Split {
    let mut x = seed ^ u64::from(group).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let offset = (x >> 11) as f64 / (1u64 << 53) as f64;
    let u = (offset + k as f64 * 0.618_033_988_749_894_9).fract();
    if u < validation {
        Split::Valid
    } else if u < validation + test {
        Split::Test
    } else {
        Split::Train
    }
}
