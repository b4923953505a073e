//! The perturbation encoder: one pass over a store's obs table builds the vocabularies, the
//! label groups (condition, doses, covariates) and each cell's group and split.
//!
//! Per cell it keeps one `u32` (group id and split), so host memory grows by 4 bytes per cell,
//! not by the cell's labels. The perturbation rows the model reads are built from a group's
//! parts by [`PerturbationCsr`](cpa_stream_stages::model::PerturbationCsr), the one CSR builder of
//! training, validation, prediction and evaluation.

mod key;
mod scan;
#[cfg(test)]
mod tests;

use std::path::Path;

use arrow_schema::Schema;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_schemas::tables::{CELL_ID, categories_of};
use cpa_stream_stages::model::config::DEFAULT_MAX_COMB_LEN;
use cpa_stream_stages::model::vocab::{Covariate, Vocabulary};
pub use cpa_stream_stages::model::vocab::{SplitSpec, Stratify};
use cpa_stream_stages::store::Store;
pub use key::GroupKey;

use crate::Stage;
use crate::error::{Error, Result};
use crate::obs::{column_strings, gene_names};
use scan::{Columns, Scan};

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
    /// The options a model recorded (obs keys, control, covariates and batch key, split with its
    /// seed), to label a store's cells as the model was trained. The covariates come back in
    /// the model's order: the batch key leaves the covariate list only where training put it
    /// (last, when it was not among the covariates). `origin` names the model in errors.
    pub fn recorded(vocab: &Vocabulary, max_comb_len: usize, origin: &Path) -> Result<EncoderOptions> {
        let data = vocab.data.as_ref().ok_or_else(|| {
            Error::InvalidInput(format!(
                "{}: the model records no obs keys or split (a model built from parts; train it with cpa-stream \
                 train, or give them as flags)",
                origin.display()
            ))
        })?;
        let batch = vocab.covariates.iter().find(|c| c.is_batch).map(|c| c.name.clone());
        let mut covariate_keys: Vec<String> = vocab.covariates.iter().map(|c| c.name.clone()).collect();
        if batch.is_some() && vocab.covariates.last().is_some_and(|c| c.is_batch) {
            covariate_keys.pop();
        }
        Ok(EncoderOptions {
            perturbation_key: data.perturbation_key.clone(),
            dose_key: data.dose_key.clone(),
            control: vocab.control().to_owned(),
            covariate_keys,
            batch_key: batch,
            split: data.split.clone(),
            max_comb_len,
        })
    }

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

impl From<cpa_stream_stages::model::vocab::IdSplit> for Split {
    fn from(split: cpa_stream_stages::model::vocab::IdSplit) -> Split {
        use cpa_stream_stages::model::vocab::IdSplit;
        match split {
            IdSplit::Train => Split::Train,
            IdSplit::Validation => Split::Valid,
            IdSplit::Test => Split::Test,
        }
    }
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
}

impl std::str::FromStr for Split {
    type Err = Error;

    /// A split column's value (`train`/`training`, `valid`/`validation`/`val`, `test`, `ood`,
    /// any case).
    fn from_str(value: &str) -> Result<Split> {
        match value.to_ascii_lowercase().as_str() {
            "train" | "training" => Ok(Split::Train),
            "valid" | "validation" | "val" => Ok(Split::Valid),
            "test" => Ok(Split::Test),
            "ood" => Ok(Split::Ood),
            _ => Err(Error::InvalidInput(format!("split {value:?}: expected train, valid, test or ood"))),
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
    /// The condition as obs spells it (first cell of the group).
    pub condition: String,
    /// The dose as obs spells it; `None` without a dose column.
    pub dose: Option<String>,
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

    /// The labels with `extra` perturbations (without cells) added to the vocabulary in its order
    /// (the control, then every other name sorted), the groups' perturbation ids renumbered.
    pub fn with_perturbations(mut self, extra: &[String]) -> CellLabels {
        use cpa_stream_stages::model::vocab::CONTROL_ID;
        let old = self.vocab.perturbations.clone();
        let mut others: Vec<String> = old[CONTROL_ID + 1..].iter().chain(extra).cloned().collect();
        others.sort();
        others.dedup();
        let mut all: Vec<String> = old[..=CONTROL_ID].to_vec();
        all.extend(others);
        let id_of: std::collections::HashMap<&str, u32> =
            all.iter().enumerate().map(|(i, n)| (n.as_str(), i as u32)).collect();
        let renumber: Vec<u32> = old.iter().map(|n| id_of[n.as_str()]).collect();
        for group in &mut self.groups {
            for part in &mut group.parts {
                part.0 = renumber[part.0 as usize];
            }
        }
        self.vocab.perturbations = all;
        self
    }

    /// Builds the labels of `store` in one pass over its obs table.
    pub fn from_store(store: &Store, options: &EncoderOptions) -> Result<CellLabels> {
        let obs_path = store.file_path(StoreFiles::OBS);
        let origin = obs_path.display().to_string();
        let schema = store.table_schema(StoreFiles::OBS).map_err(Error::stage(Stage::Encoder))?;
        check_columns(&schema, options, &origin)?;
        let covariate_keys = options.all_covariate_keys();
        let mut scan = Scan::new(options, store.n_obs(), &origin)?;
        for batch in store.table(StoreFiles::OBS).map_err(Error::stage(Stage::Encoder))? {
            let batch = batch.map_err(Error::stage(Stage::Encoder))?;
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
        scan.check_control()?;
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

/// Every label column the options name must be in obs.
fn check_columns(schema: &Schema, options: &EncoderOptions, origin: &str) -> Result<()> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let need = |key: &str| -> Result<()> {
        if names.contains(&key) {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "{origin}: no obs column {key:?} (closest first: {})",
                crate::suggest::listing(key, names.iter().copied(), 12)
            )))
        }
    };
    let mut keys = options.covariate_keys.clone();
    keys.sort();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidInput(format!("covariate {:?} is named twice", w[0])));
    }
    if options.covariate_keys.contains(&options.perturbation_key) {
        return Err(Error::InvalidInput(format!(
            "{:?} is the perturbation column; it cannot be a covariate too",
            options.perturbation_key
        )));
    }
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
