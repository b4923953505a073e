//! Conditions as the model knows them: a condition's key (covariate codes and perturbation
//! parts with their doses, in any part order), the store's label groups mapped into a model's
//! vocabulary, and the truth table of a synthetic atlas keyed the same way. Shared by the
//! commands that compare a model's conditions with the store's (evaluate, dose-response).

mod truth;

use cpa_stream_stages::model::Vocabulary;
use cpa_stream_stages::model::vocab::CONTROL_ID;

pub use truth::{TruthRow, read_truth};

use crate::encoder::CellLabels;

/// A condition's key: covariate codes and the sorted (perturbation id, dose bits) parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConditionKey {
    /// Per covariate of the model, the category code.
    pub covariates: Vec<u32>,
    /// (perturbation id, dose as `f32` bits), sorted.
    pub parts: Vec<(u32, u32)>,
}

impl ConditionKey {
    /// The key of a condition with these covariate codes and parts (any part order).
    pub fn of(covariates: &[u32], parts: &[(u32, f32)]) -> ConditionKey {
        let mut p: Vec<(u32, u32)> = parts.iter().map(|&(id, d)| (id, d.to_bits())).collect();
        p.sort_unstable();
        ConditionKey { covariates: covariates.to_vec(), parts: p }
    }

    /// Whether every part is the control.
    pub fn is_control(&self) -> bool {
        self.parts.iter().all(|&(id, _)| id as usize == CONTROL_ID)
    }

    /// The parts with their doses as numbers.
    pub fn doses(&self) -> Vec<(u32, f32)> {
        self.parts.iter().map(|&(id, d)| (id, f32::from_bits(d))).collect()
    }
}

/// A label group of the store in the model's vocabulary (`None` where it uses a perturbation or
/// covariate value the model does not know).
#[derive(Debug, Clone)]
pub struct MappedGroup {
    /// The group's condition with its covariates, as the model's codes.
    pub key: ConditionKey,
    /// Perturbation ids and doses.
    pub parts: Vec<(u32, f32)>,
    /// The condition as obs writes it.
    pub condition: String,
    /// The dose as obs writes it.
    pub dose: String,
    /// Whether the group is of control cells.
    pub is_control: bool,
}

/// The store's label groups in the model's vocabulary.
pub fn map_groups(labels: &CellLabels, vocab: &Vocabulary) -> Vec<Option<MappedGroup>> {
    let index = vocab.perturbation_index();
    let own = &labels.vocab;
    labels
        .groups()
        .iter()
        .map(|g| {
            let parts: Option<Vec<(u32, f32)>> = g
                .parts
                .iter()
                .map(|&(id, d)| index.get(own.perturbations.get(id as usize)?.as_str()).map(|&m| (m, d)))
                .collect();
            let parts = parts?;
            let covariates: Option<Vec<u32>> = g
                .covariates
                .iter()
                .zip(own.covariates.iter().zip(&vocab.covariates))
                .map(|(&c, (mine, theirs))| {
                    let value = mine.categories.get(c as usize)?;
                    theirs.categories.iter().position(|v| v == value).map(|p| p as u32)
                })
                .collect();
            let covariates = covariates?;
            // Labels exactly as obs spells them, so that outputs join with obs without numeric
            // matching; without a dose column, `1` per part (what the model assumes).
            let dose = g.dose.clone().unwrap_or_else(|| vec!["1"; g.parts.len()].join("+"));
            Some(MappedGroup {
                key: ConditionKey::of(&covariates, &parts),
                is_control: parts.iter().all(|&(id, _)| id as usize == CONTROL_ID),
                parts,
                condition: g.condition.clone(),
                dose,
            })
        })
        .collect()
}

/// The labels of the store's cells that the model cannot map (a perturbation or covariate value
/// it was not trained with), each with its cells, most cells first.
pub fn dropped(labels: &CellLabels, groups: &[Option<MappedGroup>]) -> Vec<(String, u64)> {
    let mut cells = vec![0u64; groups.len()];
    for cell in 0..labels.n_cells() {
        cells[labels.group_id(cell) as usize] += 1;
    }
    let mut dropped: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for ((group, mapped), n) in labels.groups().iter().zip(groups).zip(cells) {
        if mapped.is_none() && n > 0 {
            let covariates: Vec<&str> = group
                .covariates
                .iter()
                .zip(&labels.vocab.covariates)
                .filter_map(|(&c, cov)| cov.categories.get(c as usize).map(String::as_str))
                .collect();
            let label = match covariates.is_empty() {
                true => group.condition.clone(),
                false => format!("{} in {}", group.condition, covariates.join("/")),
            };
            *dropped.entry(label).or_default() += n;
        }
    }
    let mut dropped: Vec<(String, u64)> = dropped.into_iter().collect();
    dropped.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    dropped
}
