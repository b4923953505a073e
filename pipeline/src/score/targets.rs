//! Each perturbation's own gene, which cell-eval2's metrics leave out of what they compare
//! (`distances.resolve_exclusion_columns`): a perturbation's label names its target gene in the
//! gene index (`var_names`), unless the panel is declared to have none (drugs, cytokines:
//! cell-eval2's `--no-target-genes`).

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};

/// Where a perturbation's target gene comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetGenes {
    /// The gene whose id is the perturbation's label, where the panel has one (CRISPR
    /// knock-downs named after their gene).
    #[default]
    ByName,
    /// No perturbation has a target gene: nothing is left out.
    None,
}

/// The gene index's positions, checked unique (a repeated gene id would leave out the wrong gene).
pub fn gene_positions<'a>(genes: &'a [String], origin: &str) -> Result<HashMap<&'a str, usize>> {
    let mut positions = HashMap::with_capacity(genes.len());
    for (k, g) in genes.iter().enumerate() {
        if let Some(first) = positions.insert(g.as_str(), k) {
            return Err(Error::InvalidInput(format!(
                "{origin}: gene id {g:?} appears twice (genes {first} and {k}); each perturbation's own gene is \
                 left out of the comparison by its id, so the ids must be unique (anndata's \
                 var_names_make_unique())"
            )));
        }
    }
    Ok(positions)
}

/// What resolving the labels found.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// Row (the label's position) -> its gene's column.
    pub columns: BTreeMap<usize, usize>,
    /// Labels that name no gene of the panel (scored with every gene), at most five.
    pub unresolved: Vec<String>,
    /// How many labels name no gene.
    pub n_unresolved: usize,
}

/// The gene column of each of `labels` that names one. `gate` is the whole panel's labels, which
/// must resolve at least once (a panel whose labels name no gene is a mismatch of ids, not a
/// panel without targets: declare that with [`TargetGenes::None`]).
pub fn resolve(
    labels: &[&str],
    positions: &HashMap<&str, usize>,
    targets: TargetGenes,
    gate: &[&str],
    what: &str,
) -> Result<Resolved> {
    let mut out = Resolved::default();
    if targets == TargetGenes::None {
        return Ok(out);
    }
    for (i, label) in labels.iter().enumerate() {
        match positions.get(label) {
            Some(&col) => {
                out.columns.insert(i, col);
            }
            None => {
                out.n_unresolved += 1;
                if out.unresolved.len() < 5 {
                    out.unresolved.push((*label).to_owned());
                }
            }
        }
    }
    if !gate.is_empty() && !gate.iter().any(|l| positions.contains_key(l)) {
        let sample: Vec<&str> = gate.iter().take(5).copied().collect();
        return Err(Error::InvalidInput(format!(
            "{what} leaves each perturbation's own gene out, but no perturbation label names a gene id of the panel \
             (labels such as {sample:?}): if the perturbations have no target gene (drugs, cytokines), say so with \
             --no-target-genes; if the labels name genes differently (guides, symbols against Ensembl ids), rename \
             them to the gene ids"
        )));
    }
    Ok(out)
}
