//! Which conditions are evaluated and which control cells are decoded into them: the store's
//! label groups mapped into the model's vocabulary, merged by condition (any part order), with
//! the truth table's conditions added, and per covariate combination the control cells to use.

use std::collections::{BTreeMap, HashMap};

use super::moments::GroupMoments;
use super::{Definitions, EvalSplit};
use cpa_stream_pipeline::condition::{ConditionKey, MappedGroup, TruthRow};
use cpa_stream_pipeline::encoder::Split;
use cpa_stream_pipeline::stats::Moments;

/// A condition's labels and the label groups (same condition in other part orders) it covers.
#[derive(Debug, Clone)]
pub(crate) struct Condition {
    pub(crate) covariates: Vec<u32>,
    pub(crate) parts: Vec<(u32, f32)>,
    pub(crate) condition: String,
    pub(crate) dose: String,
    pub(crate) groups: Vec<usize>,
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
            covariates: group.key.covariates.clone(),
            parts: group.parts.clone(),
            condition: group.condition.clone(),
            dose: group.dose.clone(),
            groups: Vec::new(),
        });
        c.groups.push(g);
    }
    for (key, t) in truth {
        if key.is_control() {
            continue;
        }
        let c = conditions.entry(key.clone()).or_insert_with(|| Condition {
            covariates: key.covariates.clone(),
            parts: key.doses(),
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
            out.entry(group.key.covariates.clone()).or_default().push(g);
        }
    }
    out
}

/// Control cells an anchored prediction prefers to start from: the evaluated split's (or every
/// held-out split's) are passed over for a larger set below this many, as their observed mean,
/// noise included, is the anchored prediction's starting point.
pub const ANCHOR_CONTROLS: u64 = 30;

/// Per covariate combination of the evaluated conditions, the control cells decoded into them:
/// the evaluated split's, else every held-out split's, else all, the first with `min_cells`
/// (with `prefer` more, the first before all with at least `prefer`).
pub(super) fn control_sources<'a>(
    covariates: impl IntoIterator<Item = &'a Vec<u32>>,
    controls: &HashMap<Vec<u32>, Vec<usize>>,
    moments: &GroupMoments,
    split: EvalSplit,
    (min_cells, prefer): (u64, u64),
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
        let last = choices.len() - 1;
        let chosen = choices
            .iter()
            .enumerate()
            .map(|(i, &choice)| (i, choice, pick(choice)))
            .find(|(i, _, m)| m.n >= if *i < last { min_cells.max(prefer) } else { min_cells }.max(1) as f64)
            .map(|(_, choice, m)| (choice, m));
        if let Some(c) = chosen {
            sources.insert(covs.clone(), c);
        }
    }
    sources
}
