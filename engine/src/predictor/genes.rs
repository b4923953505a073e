//! The genes a prediction writes: all, a list, or the union of the targets' top DEGs.

use std::collections::HashMap;
use std::path::Path;

use crate::model::Vocabulary;
use cpa_stream_stages::h5ad::DEG_FILE;
use cpa_stream_stages::store::{Store, TableFile};

use super::options::GeneSelection;
use super::targets::{Target, known};
use cpa_stream_pipeline::degs::read_deg_lists;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::obs::ObsKeys;

/// The chosen genes: indices into the model's genes (`None` for all) and names.
pub(super) fn select_genes(
    selection: &GeneSelection,
    vocab: &Vocabulary,
    targets: &[Target],
    keys: &ObsKeys,
    store: &Store,
    degs: Option<&Path>,
) -> Result<(Option<Vec<i64>>, Vec<String>)> {
    let position: HashMap<&str, usize> = vocab.genes.iter().enumerate().map(|(i, g)| (g.as_str(), i)).collect();
    match selection {
        GeneSelection::All => Ok((None, vocab.genes.clone())),
        GeneSelection::Names(names) => {
            let mut index = Vec::with_capacity(names.len());
            for (line, name) in names.iter().enumerate() {
                let i = position.get(name.as_str()).ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "gene list, entry {}: {name:?} is not one of the model's genes",
                        line + 1
                    ))
                })?;
                index.push(*i as i64);
            }
            Ok((Some(index), names.clone()))
        }
        GeneSelection::TopDeg(k) => {
            if targets.is_empty() {
                return Err(Error::InvalidInput("--genes top-deg:K needs --target or --targets".into()));
            }
            let table = degs.map_or(TableFile::Store(store, DEG_FILE), TableFile::Path);
            let path = table.path();
            let lists = read_deg_lists(table)?;
            let mut chosen = vec![false; vocab.genes.len()];
            for target in targets {
                let list =
                    target.deg_keys(vocab, keys).into_iter().find_map(|key| lists.get(&key)).ok_or_else(|| {
                        Error::InvalidInput(format!(
                            "{}: no DEG list for target {} (tried {}; groups there: {})",
                            path.display(),
                            target.condition,
                            target.deg_keys(vocab, keys).join(", "),
                            known(lists.keys())
                        ))
                    })?;
                for gene in list.iter().take(*k) {
                    if let Some(&i) = position.get(gene.as_str()) {
                        chosen[i] = true;
                    }
                }
            }
            let index: Vec<i64> = (0..chosen.len()).filter(|&i| chosen[i]).map(|i| i as i64).collect();
            let names = index.iter().map(|&i| vocab.genes[i as usize].clone()).collect();
            Ok((Some(index), names))
        }
    }
}
