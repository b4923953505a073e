//! Which conditions are evaluated and which control cells are decoded into them: the store's
//! label groups mapped into the model's vocabulary, merged by condition (any part order), with
//! the truth table's conditions added, and per covariate combination the control cells to use.

use std::collections::{BTreeMap, HashMap};

use cpa_stream_stages::model::Vocabulary;
use cpa_stream_stages::model::vocab::CONTROL_ID;

use super::moments::GroupMoments;
use super::truth::TruthRow;
use super::{Definitions, EvalSplit};
use crate::encoder::{CellLabels, Split};
use crate::stats::Moments;

/// A condition's key: covariate codes and the sorted (perturbation id, dose bits) parts.
pub(crate) type ConditionKey = (Vec<u32>, Vec<(u32, u32)>);

/// The key of a condition with these covariate codes and parts (any part order).
pub(crate) fn key_of(covariates: &[u32], parts: &[(u32, f32)]) -> ConditionKey {
    let mut p: Vec<(u32, u32)> = parts.iter().map(|&(id, d)| (id, d.to_bits())).collect();
    p.sort_unstable();
    (covariates.to_vec(), p)
}

/// A label group of the store in the model's vocabulary (`None` where it uses a perturbation or
/// covariate value the model does not know).
#[derive(Debug, Clone)]
pub(crate) struct MappedGroup {
    pub(crate) key: ConditionKey,
    pub(crate) parts: Vec<(u32, f32)>,
    pub(crate) condition: String,
    pub(crate) dose: String,
    pub(crate) is_control: bool,
}

/// A condition's labels and the label groups (same condition in other part orders) it covers.
#[derive(Debug, Clone)]
pub(crate) struct Condition {
    pub(crate) covariates: Vec<u32>,
    pub(crate) parts: Vec<(u32, f32)>,
    pub(crate) condition: String,
    pub(crate) dose: String,
    pub(crate) groups: Vec<usize>,
}

/// The store's label groups in the model's vocabulary.
pub(crate) fn map_groups(labels: &CellLabels, vocab: &Vocabulary) -> Vec<Option<MappedGroup>> {
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
                key: key_of(&covariates, &parts),
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
pub(crate) fn dropped(labels: &CellLabels, groups: &[Option<MappedGroup>]) -> Vec<(String, u64)> {
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

/// The perturbed conditions of the store's groups, and those of the truth table with no cells.
pub(crate) fn collect(
    groups: &[Option<MappedGroup>],
    truth: &HashMap<ConditionKey, TruthRow>,
) -> BTreeMap<ConditionKey, Condition> {
    let mut conditions: BTreeMap<ConditionKey, Condition> = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        let Some(group) = group else { continue };
        if group.is_control {
            continue;
        }
        let c = conditions.entry(group.key.clone()).or_insert_with(|| Condition {
            covariates: group.key.0.clone(),
            parts: group.parts.clone(),
            condition: group.condition.clone(),
            dose: group.dose.clone(),
            groups: Vec::new(),
        });
        c.groups.push(g);
    }
    for (key, t) in truth {
        if key.1.iter().all(|&(id, _)| id as usize == CONTROL_ID) {
            continue;
        }
        let c = conditions.entry(key.clone()).or_insert_with(|| Condition {
            covariates: key.0.clone(),
            parts: key.1.iter().map(|&(id, d)| (id, f32::from_bits(d))).collect(),
            condition: t.condition.clone(),
            dose: t.dose.clone(),
            groups: Vec::new(),
        });
        c.condition.clone_from(&t.condition);
    }
    conditions
}

/// Which control cells are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceSplits {
    Evaluated,
    HeldOut,
    All,
}

impl SourceSplits {
    pub(crate) fn contains(self, evaluated: EvalSplit, split: Split) -> bool {
        match self {
            SourceSplits::Evaluated => evaluated.contains(split),
            SourceSplits::HeldOut => split != Split::Train,
            SourceSplits::All => true,
        }
    }

    pub(crate) fn name(self, evaluated: EvalSplit) -> &'static str {
        match self {
            SourceSplits::Evaluated => evaluated.name(),
            SourceSplits::HeldOut => "held-out",
            SourceSplits::All => "all",
        }
    }
}

/// The control cells of each covariate combination.
pub(crate) fn control_groups(groups: &[Option<MappedGroup>]) -> HashMap<Vec<u32>, Vec<usize>> {
    let mut out: HashMap<Vec<u32>, Vec<usize>> = HashMap::new();
    for (g, group) in groups.iter().enumerate() {
        if let Some(group) = group
            && group.is_control
        {
            out.entry(group.key.0.clone()).or_default().push(g);
        }
    }
    out
}

/// Per covariate combination of the evaluated conditions, the control cells decoded into them:
/// the evaluated split's, else every held-out split's, else all, the first with `min_cells`.
pub(super) fn control_sources<'a>(
    covariates: impl IntoIterator<Item = &'a Vec<u32>>,
    controls: &HashMap<Vec<u32>, Vec<usize>>,
    moments: &GroupMoments,
    split: EvalSplit,
    min_cells: u64,
    definitions: Definitions,
) -> HashMap<Vec<u32>, (SourceSplits, Moments)> {
    let choices: &[SourceSplits] = match definitions {
        Definitions::Default => &[SourceSplits::Evaluated, SourceSplits::HeldOut, SourceSplits::All],
        Definitions::Reference => &[SourceSplits::All],
    };
    let mut sources = HashMap::new();
    for covs in covariates {
        if sources.contains_key(covs) {
            continue;
        }
        let groups = controls.get(covs).map(Vec::as_slice).unwrap_or(&[]);
        let pick = |choice: SourceSplits| {
            let mut m = Moments::new(moments.genes);
            for &g in groups {
                m.merge(&moments.of(g, |s| choice.contains(split, s)));
            }
            m
        };
        let chosen = choices.iter().map(|&choice| (choice, pick(choice))).find(|(_, m)| m.n >= min_cells.max(1) as f64);
        if let Some(c) = chosen {
            sources.insert(covs.clone(), c);
        }
    }
    sources
}
