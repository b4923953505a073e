//! The perturbation encoder: one pass over a store's obs table builds the vocabularies, the
//! label groups (condition, doses, covariates) and each cell's group and split.
//!
//! Per cell it keeps one `u32` (group id and split), so host memory grows by 4 bytes per cell,
//! not by the cell's labels.

use std::collections::HashMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::DataType;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_schemas::tables::{CELL_ID, categories_of};
pub use cpa_stream_stages::model::vocab::SplitSpec;
use cpa_stream_stages::model::vocab::{Covariate, DataSpec, Vocabulary, canonical_condition, split_condition};
use cpa_stream_stages::store::{Store, read_small_table, read_table, table_schema};

use crate::error::{Error, Result};

/// How the encoder reads obs.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderOptions {
    pub perturbation_key: String,
    /// Dose column (`0.1+1` for combinations); `None` gives dose 1 to every part.
    pub dose_key: Option<String>,
    pub control: String,
    pub covariate_keys: Vec<String>,
    /// A batch covariate, left out of the corrected latents.
    pub batch_key: Option<String>,
    pub split: SplitSpec,
    pub max_comb_len: usize,
}

/// The split of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train = 0,
    Valid = 1,
    Test = 2,
    /// Held out entirely (out of distribution).
    Ood = 3,
}

impl Split {
    fn from_bits(bits: u32) -> Split {
        match bits & 3 {
            0 => Split::Train,
            1 => Split::Valid,
            2 => Split::Test,
            _ => Split::Ood,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
            Split::Ood => "ood",
        }
    }
}

/// The labels of one group of cells (same condition, doses and covariates).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Perturbation ids and doses.
    pub parts: Vec<(u32, f32)>,
    pub covariates: Vec<u32>,
    /// Condition class (the adversary's label).
    pub class: u32,
}

const GROUP_BITS: u32 = 30;
const GROUP_MASK: u32 = (1 << GROUP_BITS) - 1;

/// Vocabularies, label groups and every cell's group and split.
#[derive(Debug, Clone)]
pub struct CellLabels {
    pub vocab: Vocabulary,
    groups: Vec<Group>,
    cells: Vec<u32>,
    /// Cells per split (train, valid, test, ood).
    pub split_counts: [u64; 4],
}

impl CellLabels {
    pub fn n_cells(&self) -> u64 {
        self.cells.len() as u64
    }

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
        let bad = |msg: String| Error::InvalidInput(format!("{origin}: {msg}"));
        let schema = table_schema(&obs_path).map_err(|source| Error::Stage { stage: "encoder", source })?;
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let need = |key: &str| -> Result<()> {
            if names.contains(&key) {
                Ok(())
            } else {
                Err(bad(format!("no obs column {key:?} (columns: {})", names.join(", "))))
            }
        };
        need(&options.perturbation_key)?;
        if let Some(d) = &options.dose_key {
            need(d)?;
        }
        let mut covariate_keys = options.covariate_keys.clone();
        if let Some(b) = &options.batch_key
            && !covariate_keys.contains(b)
        {
            covariate_keys.push(b.clone());
        }
        for k in &covariate_keys {
            need(k)?;
        }
        if let SplitSpec::Column(c) = &options.split {
            need(c)?;
        }
        if options.max_comb_len == 0 {
            return Err(bad("max_comb_len must be at least 1".into()));
        }
        // Covariate categories: the column's declared categories, else the sorted distinct values.
        let mut categories: Vec<Option<Vec<String>>> =
            covariate_keys.iter().map(|k| schema.field_with_name(k).ok().and_then(categories_of)).collect();
        let mut seen_values: Vec<Vec<String>> = vec![Vec::new(); covariate_keys.len()];

        struct RawGroup {
            names: Vec<(String, f32)>,
            condition: String,
            covariates: Vec<String>,
        }
        let mut raw_groups: Vec<RawGroup> = Vec::new();
        let mut lookup: HashMap<String, u32> = HashMap::new();
        let mut cells: Vec<u32> = Vec::with_capacity(store.n_obs() as usize);
        let mut group_seen: Vec<u64> = Vec::new();
        let mut key = String::new();
        let (holdout, fractions) = match &options.split {
            SplitSpec::Fraction { validation, test, seed, holdout } => {
                if !(0.0..1.0).contains(validation) || !(0.0..1.0).contains(test) || validation + test >= 1.0 {
                    return Err(bad(format!(
                        "validation fraction {validation} and test fraction {test} must be >= 0 and sum below 1"
                    )));
                }
                let h: Vec<String> = holdout.iter().map(|c| canonical_condition(c)).collect();
                (h, Some((*validation, *test, *seed)))
            }
            SplitSpec::Column(_) => (Vec::new(), None),
        };
        let mut row = 0u64;
        for batch in read_table(&obs_path).map_err(|source| Error::Stage { stage: "encoder", source })? {
            let batch = batch.map_err(|source| Error::Stage { stage: "encoder", source })?;
            let col = |name: &str| column_strings(&batch, name, &origin);
            let ids = col(CELL_ID).ok();
            let perts = col(&options.perturbation_key)?;
            let doses = options.dose_key.as_deref().map(col).transpose()?;
            let covs: Vec<TextColumn> = covariate_keys.iter().map(|k| col(k)).collect::<Result<_>>()?;
            let splits = match &options.split {
                SplitSpec::Column(c) => Some(col(c)?),
                SplitSpec::Fraction { .. } => None,
            };
            for i in 0..batch.num_rows() {
                let cell = || match ids.as_ref().and_then(|v| v.get(i)) {
                    Some(id) => format!("row {row} (cell {id:?})"),
                    None => format!("row {row}"),
                };
                let condition =
                    perts.get(i).ok_or_else(|| bad(format!("{}: {} is missing", cell(), options.perturbation_key)))?;
                let dose = match &doses {
                    Some(d) => Some(d.get(i).ok_or_else(|| bad(format!("{}: dose is missing", cell())))?),
                    None => None,
                };
                key.clear();
                key.push_str(condition);
                key.push('\u{1f}');
                key.push_str(dose.unwrap_or(""));
                for (k, c) in covariate_keys.iter().zip(&covs) {
                    let v = c.get(i).ok_or_else(|| bad(format!("{}: {k} is missing", cell())))?;
                    key.push('\u{1f}');
                    key.push_str(v);
                }
                let group = match lookup.get(key.as_str()) {
                    Some(&g) => g,
                    None => {
                        let names = split_condition(condition, dose, options.max_comb_len)
                            .map_err(|reason| bad(format!("{}: {reason}", cell())))?;
                        let covariates: Vec<String> =
                            covs.iter().map(|c| c.get(i).unwrap_or_default().to_owned()).collect();
                        for (seen, v) in seen_values.iter_mut().zip(&covariates) {
                            if !seen.contains(v) {
                                seen.push(v.clone());
                            }
                        }
                        let g = raw_groups.len() as u32;
                        if g > GROUP_MASK {
                            return Err(bad("more than 2^30 distinct label groups".into()));
                        }
                        raw_groups.push(RawGroup {
                            names: names.into_iter().map(|(n, d)| (n.to_owned(), d)).collect(),
                            condition: canonical_condition(condition),
                            covariates,
                        });
                        group_seen.push(0);
                        lookup.insert(key.clone(), g);
                        g
                    }
                };
                let split = match (&splits, fractions) {
                    (Some(s), _) => parse_split(s.get(i)).ok_or_else(|| {
                        bad(format!("{}: split {:?} is not train, valid, test or ood", cell(), s.get(i)))
                    })?,
                    (None, Some((validation, test, seed))) => {
                        let g = &raw_groups[group as usize];
                        if holdout.contains(&g.condition) {
                            Split::Ood
                        } else {
                            let k = group_seen[group as usize];
                            group_seen[group as usize] += 1;
                            stratified(seed, group, k, validation, test)
                        }
                    }
                    (None, None) => Split::Train,
                };
                cells.push(group | ((split as u32) << GROUP_BITS));
                row += 1;
            }
        }
        if row != store.n_obs() {
            return Err(bad(format!("{row} obs rows for {} cells", store.n_obs())));
        }
        for (i, key) in holdout.iter().enumerate() {
            if !raw_groups.iter().any(|g| g.condition == *key) {
                let what = match &options.split {
                    SplitSpec::Fraction { holdout, .. } => holdout[i].clone(),
                    SplitSpec::Column(_) => key.clone(),
                };
                return Err(bad(format!("held-out condition {what:?} does not occur in {}", options.perturbation_key)));
            }
        }

        // Vocabularies.
        for (cats, seen) in categories.iter_mut().zip(&seen_values) {
            if cats.is_none() {
                let mut v = seen.clone();
                v.sort();
                *cats = Some(v);
            }
        }
        let covariates: Vec<Covariate> = covariate_keys
            .iter()
            .zip(categories)
            .map(|(k, c)| Covariate {
                name: k.clone(),
                categories: c.unwrap_or_default(),
                is_batch: options.batch_key.as_deref() == Some(k.as_str()),
            })
            .collect();
        let mut split_counts = [0u64; 4];
        let mut train_per_group = vec![0u64; raw_groups.len()];
        for &c in &cells {
            let split = (c >> GROUP_BITS) as usize;
            split_counts[split] += 1;
            if split == Split::Train as usize {
                train_per_group[(c & GROUP_MASK) as usize] += 1;
            }
        }
        let mut condition_counts: HashMap<&str, u64> = HashMap::new();
        for (g, n) in raw_groups.iter().zip(&train_per_group) {
            *condition_counts.entry(g.condition.as_str()).or_default() += n;
        }
        let mut conditions: Vec<(String, u64)> = condition_counts.into_iter().map(|(c, n)| (c.to_owned(), n)).collect();
        conditions.sort();
        let perturbations: Vec<String> =
            raw_groups.iter().flat_map(|g| g.names.iter().map(|(n, _)| n.clone())).collect();
        let genes = gene_names(store)?;
        let mut vocab = Vocabulary::new(genes, &options.control, perturbations, covariates, conditions)
            .map_err(|source| Error::Stage { stage: "encoder", source })?;
        vocab.data = Some(DataSpec {
            perturbation_key: options.perturbation_key.clone(),
            dose_key: options.dose_key.clone(),
            split: options.split.clone(),
        });
        let (pert_index, class_index) = (vocab.perturbation_index(), vocab.condition_index());
        let mut groups = Vec::with_capacity(raw_groups.len());
        for g in &raw_groups {
            let parts = g.names.iter().map(|(n, d)| (pert_index.get(n.as_str()).copied().unwrap_or(0), *d)).collect();
            let covariates =
                vocab
                    .covariates
                    .iter()
                    .zip(&g.covariates)
                    .map(|(cov, v)| {
                        cov.categories.iter().position(|c| c == v).map(|p| p as u32).ok_or_else(|| {
                            bad(format!("{}: value {v:?} is not among its declared categories", cov.name))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
            let class = class_index.get(g.condition.as_str()).copied().unwrap_or(0);
            groups.push(Group { parts, covariates, class });
        }
        cells.shrink_to_fit();
        Ok(CellLabels { vocab, groups, cells, split_counts })
    }
}

/// Exact stratified assignment: the k-th cell of a group goes to validation or test following a
/// seeded low-discrepancy sequence, so each group's fractions are met to within one cell.
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

fn parse_split(value: Option<&str>) -> Option<Split> {
    match value?.to_ascii_lowercase().as_str() {
        "train" | "training" => Some(Split::Train),
        "valid" | "validation" | "val" => Some(Split::Valid),
        "test" => Some(Split::Test),
        "ood" => Some(Split::Ood),
        _ => None,
    }
}

/// A column read as text without a string per row: categories through their dictionary,
/// strings as they are, other types (numbers) formatted once per row.
pub(crate) enum TextColumn {
    Dictionary { keys: Vec<Option<usize>>, values: arrow::array::StringArray },
    Strings(arrow::array::StringArray),
    Formatted(Vec<Option<String>>),
}

impl TextColumn {
    pub(crate) fn get(&self, i: usize) -> Option<&str> {
        match self {
            TextColumn::Dictionary { keys, values } => keys.get(i).copied().flatten().map(|k| values.value(k)),
            TextColumn::Strings(s) => (i < s.len() && !s.is_null(i)).then(|| s.value(i)),
            TextColumn::Formatted(v) => v.get(i).and_then(|s| s.as_deref()),
        }
    }
}

/// A column of `batch` as text (categorical, string or numeric columns).
pub(crate) fn column_strings(batch: &RecordBatch, name: &str, origin: &str) -> Result<TextColumn> {
    let col =
        batch.column_by_name(name).ok_or_else(|| Error::InvalidInput(format!("{origin}: no obs column {name:?}")))?;
    let unreadable = |e: arrow::error::ArrowError| {
        Error::InvalidInput(format!("{origin}: obs column {name:?} cannot be read as text: {e}"))
    };
    if let Some(dict) = col.as_any_dictionary_opt() {
        let values = arrow::compute::cast(dict.values(), &DataType::Utf8).map_err(unreadable)?;
        let keys = arrow::compute::cast(dict.keys(), &DataType::Int64).map_err(unreadable)?;
        let keys = keys.as_primitive::<arrow::datatypes::Int64Type>();
        let n_values = values.len();
        let keys = (0..keys.len())
            .map(|i| {
                (!keys.is_null(i))
                    .then(|| keys.value(i))
                    .filter(|&k| k >= 0 && (k as usize) < n_values)
                    .map(|k| k as usize)
            })
            .collect();
        return Ok(TextColumn::Dictionary { keys, values: values.as_string::<i32>().clone() });
    }
    if let Some(s) = col.as_string_opt::<i32>() {
        return Ok(TextColumn::Strings(s.clone()));
    }
    let utf8 = arrow::compute::cast(col, &DataType::Utf8).map_err(unreadable)?;
    let strings = utf8.as_string::<i32>();
    Ok(TextColumn::Formatted(
        (0..strings.len()).map(|i| (!strings.is_null(i)).then(|| strings.value(i).to_owned())).collect(),
    ))
}

/// The store's gene names (var `gene_id`, else the first column).
pub fn gene_names(store: &Store) -> Result<Vec<String>> {
    let path = store.file_path(StoreFiles::VAR);
    let var = read_small_table(&path).map_err(|source| Error::Stage { stage: "encoder", source })?;
    let col = var
        .column_by_name(cpa_stream_schemas::tables::GENE_ID)
        .or_else(|| (var.num_columns() > 0).then(|| var.column(0)))
        .ok_or_else(|| Error::InvalidInput(format!("{}: no gene names", path.display())))?;
    let utf8 = arrow::compute::cast(col, &DataType::Utf8)
        .map_err(|e| Error::InvalidInput(format!("{}: gene names: {e}", path.display())))?;
    let s = utf8.as_string::<i32>();
    Ok((0..s.len()).map(|i| s.value(i).to_owned()).collect())
}
