//! Vocabularies a model is trained with: genes, perturbations, covariates and condition classes,
//! and the parsing of a cell's `condition` / `dose` obs values into perturbation ids and doses.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Id of the padding entry of the perturbation vocabulary (never a real perturbation).
pub const PADDING_ID: usize = 0;
/// Id of the control group in the perturbation vocabulary.
pub const CONTROL_ID: usize = 1;
/// Name of the padding entry.
pub const PADDING_NAME: &str = "<pad>";
/// Separator of the parts of a combination (`drugA+drugB`, doses `0.1+1`).
pub const COMBINATION_SEPARATOR: char = '+';

/// A categorical covariate: its obs column, categories in code order, and whether it is the batch
/// covariate (left out of the corrected latents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Covariate {
    /// The obs column.
    pub name: String,
    /// Categories in code order.
    pub categories: Vec<String>,
    /// Whether it is the batch covariate.
    pub is_batch: bool,
}

/// Everything a model's inputs and outputs are indexed by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vocabulary {
    /// Gene (var) names, in input column order.
    pub genes: Vec<String>,
    /// Perturbations: `<pad>` (id 0), the control (id 1), then the others sorted by name.
    pub perturbations: Vec<String>,
    /// Categorical covariates.
    pub covariates: Vec<Covariate>,
    /// Classes of the perturbation adversary: whole conditions (parts sorted by name, `+`-joined).
    pub conditions: Vec<String>,
    /// Training cells per condition class (the adversary's class weights `N / n_c - 1`).
    pub condition_counts: Vec<u64>,
    /// The obs columns and the split the model was trained with, so that prediction and
    /// evaluation read a store the same way (absent for models built from parts).
    #[serde(default)]
    pub data: Option<DataSpec>,
}

/// Which obs columns hold a cell's perturbations and doses, and how cells were split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// The obs column of the perturbation condition.
    pub perturbation_key: String,
    /// `None`: every part has dose 1.
    pub dose_key: Option<String>,
    /// How cells were split.
    pub split: SplitSpec,
    /// The cells the model was trained from (absent in models from before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cells: Option<CellSet>,
}

/// A set of cells by their ids, order aside: how many, and the sum of a hash of each id. Two
/// stores with the same cells (say one a shuffled copy of the other) have the same; a filtered,
/// concatenated or other store has another, almost surely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CellSet {
    /// Cells.
    pub cells: u64,
    /// Wrapping sum of the XXH3-64 of every cell id (as hexadecimal text in JSON, whose numbers
    /// some readers hold as doubles).
    #[serde(with = "hex_u64")]
    pub id_hash: u64,
}

impl CellSet {
    /// Adds a cell by its id.
    pub fn add(&mut self, id: &str) {
        self.cells += 1;
        self.id_hash = self.id_hash.wrapping_add(xxhash_rust::xxh3::xxh3_64(id.as_bytes()));
    }
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{value:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

/// Which cells a run trains on, validates on, tests on, and holds out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SplitSpec {
    /// An obs column with values `train`, `valid`/`validation`/`val`, `test` and `ood`.
    Column(String),
    /// Seeded fractions, stratified by condition and covariates; `holdout` conditions (as written
    /// in obs, any part order) are held out entirely (`ood`).
    Fraction {
        /// Fraction of each label group's cells for validation.
        validation: f64,
        /// Fraction of each label group's cells for testing.
        test: f64,
        /// Seed of the assignment.
        seed: u64,
        /// Conditions held out entirely.
        holdout: Vec<String>,
        /// How cells are assigned (absent in models from before the setting: the sequence).
        #[serde(default)]
        method: Stratify,
    },
}

impl SplitSpec {
    /// Seeded fractions assigned by cell id (what new runs record).
    pub fn fractions(validation: f64, test: f64, seed: u64, holdout: Vec<String>) -> SplitSpec {
        SplitSpec::Fraction { validation, test, seed, holdout, method: Stratify::CellId }
    }

    /// Every cell in training, none held out.
    pub fn all_training() -> SplitSpec {
        SplitSpec::fractions(0.0, 0.0, 0, Vec::new())
    }
}

/// How a fraction split assigns the cells of a label group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stratify {
    /// The k-th cell of a group by a seeded low-discrepancy sequence, decided as the cell is
    /// read: fractions met to within a few cells. Models trained before `exact` record none and
    /// are read with this one, so that their evaluation recomputes their split.
    #[default]
    Sequence,
    /// `round(fraction x cells)` of each group, exactly, chosen by a seeded permutation of the
    /// group's cells (decided once the group's size is known). A function of the cells' order:
    /// on a reordered copy of the store other cells are tested (models trained before
    /// `cell_id` record it).
    Exact,
    /// A function of the cell's id and the seed alone: a cell goes to validation when a seeded
    /// hash of its id, read as a fraction, is below the validation fraction, to test when below
    /// the two together. The same cell is in the same split in any store that holds it (a
    /// shuffled, filtered or concatenated copy); a group's fractions are met on average
    /// (binomially: a group of 1,000 cells and a 10 % test fraction has about 100 ± 9 tested).
    CellId,
}

/// Where [`Stratify::CellId`] puts a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSplit {
    /// Training.
    Train,
    /// Validation.
    Validation,
    /// Test.
    Test,
}

/// The split of the cell with id `id` by [`Stratify::CellId`].
pub fn split_of_cell_id(id: &str, seed: u64, validation: f64, test: f64) -> IdSplit {
    let u = (xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), seed) >> 11) as f64 / (1u64 << 53) as f64;
    split_by_fraction(u, validation, test)
}

/// Where a cell drawn at `u` in [0, 1) goes: validation below `validation`, test below the two
/// together, else training.
pub fn split_by_fraction(u: f64, validation: f64, test: f64) -> IdSplit {
    if u < validation {
        IdSplit::Validation
    } else if u < validation + test {
        IdSplit::Test
    } else {
        IdSplit::Train
    }
}

/// A cell's perturbations: vocabulary ids and doses, in the order written in obs.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCondition {
    /// Perturbation ids and doses.
    pub parts: Vec<(u32, f32)>,
    /// The condition class id (the adversary's label).
    pub class: u32,
}

impl Vocabulary {
    /// Builds a vocabulary. `perturbations` are the distinct perturbation names (in any order,
    /// the control may be among them); `conditions` the canonical condition classes with their
    /// training counts.
    pub fn new(
        genes: Vec<String>,
        control: &str,
        perturbations: impl IntoIterator<Item = String>,
        covariates: Vec<Covariate>,
        conditions: Vec<(String, u64)>,
    ) -> Result<Vocabulary> {
        let mut names: Vec<String> = perturbations.into_iter().filter(|p| p != control).collect();
        names.sort();
        names.dedup();
        let mut all = Vec::with_capacity(names.len() + 2);
        all.push(PADDING_NAME.to_owned());
        all.push(control.to_owned());
        all.extend(names);
        let (conditions, condition_counts) = conditions.into_iter().unzip();
        let vocab = Vocabulary { genes, perturbations: all, covariates, conditions, condition_counts, data: None };
        vocab.validate()?;
        Ok(vocab)
    }

    /// Checks the invariants a model relies on; errors name the offending entry.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidInput(format!("vocabulary: {msg}")));
        if self.genes.is_empty() {
            return bad("no genes".to_owned());
        }
        if self.perturbations.len() < 2 || self.perturbations[PADDING_ID] != PADDING_NAME {
            return bad(format!("perturbations must start with {PADDING_NAME:?} and the control"));
        }
        for (kind, names) in
            [("gene", &self.genes), ("perturbation", &self.perturbations), ("condition", &self.conditions)]
        {
            if let Some(dup) = first_duplicate(names) {
                return bad(format!("{kind} {dup:?} appears twice"));
            }
        }
        if let Some(p) = self.perturbations[1..].iter().find(|p| p.is_empty() || p.contains(COMBINATION_SEPARATOR)) {
            return bad(format!("perturbation name {p:?} is empty or contains '{COMBINATION_SEPARATOR}'"));
        }
        if self.conditions.is_empty() {
            return bad("no condition classes".to_owned());
        }
        if self.conditions.len() != self.condition_counts.len() {
            return bad(format!("{} conditions but {} counts", self.conditions.len(), self.condition_counts.len()));
        }
        for cov in &self.covariates {
            if cov.categories.is_empty() {
                return bad(format!("covariate {:?} has no categories", cov.name));
            }
            if let Some(dup) = first_duplicate(&cov.categories) {
                return bad(format!("covariate {:?}: category {dup:?} appears twice", cov.name));
            }
        }
        if self.covariates.iter().filter(|c| c.is_batch).count() > 1 {
            return bad("more than one batch covariate".to_owned());
        }
        Ok(())
    }

    /// Genes.
    pub fn n_genes(&self) -> usize {
        self.genes.len()
    }

    /// Perturbation vocabulary size, padding included.
    pub fn n_perturbations(&self) -> usize {
        self.perturbations.len()
    }

    /// The control condition's name.
    pub fn control(&self) -> &str {
        &self.perturbations[CONTROL_ID]
    }

    /// Class weights of the perturbation adversary, `N / n_c - 1` (0 for classes without cells).
    pub fn condition_weights(&self) -> Vec<f32> {
        let total: u64 = self.condition_counts.iter().sum();
        self.condition_counts
            .iter()
            .map(|&n| if n == 0 { 0.0 } else { (total as f64 / n as f64 - 1.0) as f32 })
            .collect()
    }

    /// Perturbations (by id) that no training cell has, alone or in a combination: the model
    /// learns nothing about them, and a freshly built model gives them a zero embedding (no
    /// effect). Empty when the vocabulary counts no training cells at all (built from parts).
    pub fn untrained_perturbations(&self) -> Vec<u32> {
        if self.condition_counts.iter().all(|&n| n == 0) {
            return Vec::new();
        }
        let index = self.perturbation_index();
        let mut trained = vec![false; self.perturbations.len()];
        for (condition, _) in self.conditions.iter().zip(&self.condition_counts).filter(|(_, n)| **n > 0) {
            for part in condition.split(COMBINATION_SEPARATOR) {
                if let Some(&id) = index.get(part) {
                    trained[id as usize] = true;
                }
            }
        }
        (0..self.perturbations.len() as u32).filter(|&id| id as usize != PADDING_ID && !trained[id as usize]).collect()
    }

    /// A lookup from perturbation name to id.
    pub fn perturbation_index(&self) -> HashMap<&str, u32> {
        self.perturbations.iter().enumerate().skip(1).map(|(i, p)| (p.as_str(), i as u32)).collect()
    }

    /// A lookup from canonical condition to class id.
    pub fn condition_index(&self) -> HashMap<&str, u32> {
        self.conditions.iter().enumerate().map(|(i, c)| (c.as_str(), i as u32)).collect()
    }

    /// Checks that `genes` are the model's genes in the same order.
    pub fn check_genes(&self, genes: &[String], what: &str) -> Result<()> {
        if genes == self.genes.as_slice() {
            return Ok(());
        }
        if genes.len() != self.genes.len() {
            return Err(Error::InvalidInput(format!(
                "{what} has {} genes, the model was trained on {}",
                genes.len(),
                self.genes.len()
            )));
        }
        match genes.iter().zip(&self.genes).enumerate().find(|(_, (a, b))| a != b) {
            Some((i, (a, b))) => Err(Error::InvalidInput(format!(
                "{what}: gene {i} is {a:?}, the model's gene {i} is {b:?} (same genes in the same order expected)"
            ))),
            None => Ok(()),
        }
    }
}

fn first_duplicate(names: &[String]) -> Option<&str> {
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    names.iter().find(|n| !seen.insert(n.as_str())).map(String::as_str)
}

/// The canonical form of a condition: parts sorted by name and `+`-joined, so that `B+A` and
/// `A+B` are one class.
pub fn canonical_condition(condition: &str) -> String {
    let mut parts: Vec<&str> = condition.split(COMBINATION_SEPARATOR).collect();
    parts.sort_unstable();
    parts.join("+")
}

/// Splits a condition and its dose string into (name, dose) parts, keeping the written order.
/// `dose` `None` means dose 1 for every part. Errors (without the cell, which the caller adds)
/// for empty parts, duplicate parts, more than `max_comb_len` parts, a dose count that differs
/// from the part count, and doses that are not finite non-negative numbers.
pub fn split_condition<'a>(
    condition: &'a str,
    dose: Option<&str>,
    max_comb_len: usize,
) -> std::result::Result<Vec<(&'a str, f32)>, String> {
    let names: Vec<&str> = condition.split(COMBINATION_SEPARATOR).collect();
    if names.iter().any(|n| n.is_empty()) {
        return Err(format!("condition {condition:?} has an empty part"));
    }
    if names.len() > max_comb_len {
        return Err(format!(
            "condition {condition:?} has {} parts, more than max_comb_len = {max_comb_len}",
            names.len()
        ));
    }
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(format!("condition {condition:?} names {n:?} twice"));
        }
    }
    let doses: Vec<f32> = match dose {
        None => vec![1.0; names.len()],
        Some(text) => {
            let parts: Vec<&str> = text.split(COMBINATION_SEPARATOR).collect();
            if parts.len() != names.len() {
                return Err(format!(
                    "condition {condition:?} has {} parts but dose {text:?} has {}",
                    names.len(),
                    parts.len()
                ));
            }
            let mut doses = Vec::with_capacity(parts.len());
            for p in parts {
                match p.trim().parse::<f32>() {
                    Ok(d) if d.is_finite() && d >= 0.0 => doses.push(d),
                    _ => return Err(format!("dose {p:?} in {text:?} is not a finite number >= 0")),
                }
            }
            doses
        }
    };
    Ok(names.into_iter().zip(doses).collect())
}

/// Parses one cell's condition and dose against a vocabulary's lookups.
pub fn parse_condition(
    condition: &str,
    dose: Option<&str>,
    max_comb_len: usize,
    perturbations: &HashMap<&str, u32>,
    conditions: &HashMap<&str, u32>,
) -> std::result::Result<ParsedCondition, String> {
    let named = split_condition(condition, dose, max_comb_len)?;
    let mut parts = Vec::with_capacity(named.len());
    for (name, d) in named {
        match perturbations.get(name) {
            Some(&id) => parts.push((id, d)),
            None => return Err(format!("perturbation {name:?} is not in the model's vocabulary")),
        }
    }
    let canonical = canonical_condition(condition);
    let class = conditions
        .get(canonical.as_str())
        .copied()
        .ok_or_else(|| format!("condition {condition:?} is not among the model's condition classes"))?;
    Ok(ParsedCondition { parts, class })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Result<Vocabulary> {
        Vocabulary::new(
            vec!["g1".into(), "g2".into()],
            "ctrl",
            ["B".to_owned(), "ctrl".to_owned(), "A".to_owned()],
            vec![Covariate { name: "cell_type".into(), categories: vec!["t1".into(), "t2".into()], is_batch: false }],
            vec![("ctrl".into(), 6), ("A".into(), 2), ("A+B".into(), 1)],
        )
    }

    #[test]
    fn perturbations_without_training_cells_are_named() -> Result<()> {
        let v = Vocabulary::new(
            vec!["g1".into()],
            "ctrl",
            ["A", "B", "C", "D", "ctrl"].map(String::from),
            vec![],
            // B is trained within a combination only; C and D only in conditions without cells.
            vec![("ctrl".into(), 6), ("A".into(), 2), ("A+B".into(), 1), ("C".into(), 0), ("C+D".into(), 0)],
        )?;
        let names: Vec<&str> =
            v.untrained_perturbations().iter().map(|&id| v.perturbations[id as usize].as_str()).collect();
        assert_eq!(names, ["C", "D"]);
        let parts = Vocabulary::new(vec!["g1".into()], "ctrl", ["A".to_owned()], vec![], vec![("A".into(), 0)])?;
        assert!(parts.untrained_perturbations().is_empty());
        Ok(())
    }

    #[test]
    fn control_is_one_and_the_rest_sorted() -> Result<()> {
        let v = vocab()?;
        assert_eq!(v.perturbations, ["<pad>", "ctrl", "A", "B"]);
        assert_eq!(v.condition_weights(), [9.0 / 6.0 - 1.0, 9.0 / 2.0 - 1.0, 8.0]);
        Ok(())
    }

    #[test]
    fn doses_stay_with_their_perturbation_in_either_order() -> Result<()> {
        let v = vocab()?;
        let (p, c) = (v.perturbation_index(), v.condition_index());
        let ab = parse_condition("A+B", Some("0.1+1"), 2, &p, &c);
        let ba = parse_condition("B+A", Some("1+0.1"), 2, &p, &c);
        assert_eq!(ab, Ok(ParsedCondition { parts: vec![(2, 0.1), (3, 1.0)], class: 2 }));
        assert_eq!(ba, Ok(ParsedCondition { parts: vec![(3, 1.0), (2, 0.1)], class: 2 }));
        assert_eq!(parse_condition("ctrl", None, 2, &p, &c), Ok(ParsedCondition { parts: vec![(1, 1.0)], class: 0 }));
        Ok(())
    }

    #[test]
    fn malformed_conditions_are_rejected_with_the_reason() -> Result<()> {
        let v = vocab()?;
        let (p, c) = (v.perturbation_index(), v.condition_index());
        let err = |cond: &str, dose: Option<&str>, max: usize| parse_condition(cond, dose, max, &p, &c).err();
        assert_eq!(err("A+A", None, 2).as_deref(), Some("condition \"A+A\" names \"A\" twice"));
        assert_eq!(
            err("A+B+ctrl", None, 2).as_deref(),
            Some("condition \"A+B+ctrl\" has 3 parts, more than max_comb_len = 2")
        );
        assert_eq!(err("A+B", Some("0.1"), 2).as_deref(), Some("condition \"A+B\" has 2 parts but dose \"0.1\" has 1"));
        assert_eq!(err("A", Some("x"), 2).as_deref(), Some("dose \"x\" in \"x\" is not a finite number >= 0"));
        assert_eq!(err("A", Some("-1"), 2).as_deref(), Some("dose \"-1\" in \"-1\" is not a finite number >= 0"));
        assert_eq!(err("A+", None, 2).as_deref(), Some("condition \"A+\" has an empty part"));
        assert_eq!(err("C", None, 2).as_deref(), Some("perturbation \"C\" is not in the model's vocabulary"));
        assert_eq!(err("B", None, 2).as_deref(), Some("condition \"B\" is not among the model's condition classes"));
        Ok(())
    }

    #[test]
    fn gene_mismatch_names_the_first_difference() -> Result<()> {
        let v = vocab()?;
        assert!(v.check_genes(&["g1".into(), "g2".into()], "store").is_ok());
        let e = v.check_genes(&["g1".into(), "gX".into()], "store S").err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("store S: gene 1 is \"gX\", the model's gene 1 is \"g2\" (same genes in the same order expected)")
        );
        let e = v.check_genes(&["g1".into()], "store S").err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("store S has 1 genes, the model was trained on 2"));
        Ok(())
    }
}
