//! The contexts of a scoring (`--context-key`): the values of an obs column of both files (cell
//! lines, say), each scored on its own, as the challenge scores each of its contexts against
//! its own control, baseline and replicate. Memory: one context number per cell of each file.

use std::collections::BTreeMap;

use cpa_stream_stages::h5ad::H5adReader;

use super::ScoreOptions;
use crate::error::{Error, Result};
use crate::obs::column_strings;

/// Each file's cells by context.
#[derive(Debug)]
pub struct Split {
    /// The contexts, sorted.
    pub names: Vec<String>,
    /// Per cell of the prediction, its context's position.
    pub pred: Vec<u32>,
    /// Per cell of the reference, its context's position.
    pub real: Vec<u32>,
}

impl Split {
    /// A membership of the cells of context `k` (1) among `codes`.
    pub fn membership(&self, codes: &[u32], k: usize) -> Vec<u8> {
        codes.iter().map(|&c| u8::from(c as usize == k)).collect()
    }
}

/// Reads obs column `key` of both files.
pub fn split(pred: &H5adReader, real: &H5adReader, key: &str, options: &ScoreOptions) -> Result<Split> {
    let (real_seen, mut real_codes) = codes(real, key)?;
    let mut names = real_seen.clone();
    names.sort();
    let position: BTreeMap<&str, u32> = names.iter().enumerate().map(|(k, n)| (n.as_str(), k as u32)).collect();
    let renumber: Vec<u32> = real_seen.iter().map(|n| position[n.as_str()]).collect();
    for c in &mut real_codes {
        *c = renumber[*c as usize];
    }
    let (pred_seen, mut pred_codes) = codes(pred, key)?;
    let mut renumber = Vec::with_capacity(pred_seen.len());
    for v in &pred_seen {
        let k = *position.get(v.as_str()).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{}: cells of context {v:?} ({key}), which the reference {} has no cells of; its contexts: {}",
                options.prediction.display(),
                options.reference.display(),
                crate::suggest::listing(v, names.iter().map(String::as_str), 8)
            ))
        })?;
        renumber.push(k);
    }
    for c in &mut pred_codes {
        *c = renumber[*c as usize];
    }
    if let Some(missing) = names.iter().find(|n| !pred_seen.contains(n)) {
        return Err(Error::InvalidInput(format!(
            "{}: no cells of context {missing:?} ({key}), which the reference has: each context is scored on its own, \
             so the prediction must cover every one",
            options.prediction.display()
        )));
    }
    Ok(Split { names, pred: pred_codes, real: real_codes })
}

/// The values of obs column `key` in the order first seen, and each cell's position among them.
fn codes(reader: &H5adReader, key: &str) -> Result<(Vec<String>, Vec<u32>)> {
    let origin = reader.path().display().to_string();
    let n_obs = reader.n_obs();
    let mut out = Vec::with_capacity(n_obs as usize);
    let mut index: BTreeMap<String, u32> = BTreeMap::new();
    let mut seen: Vec<String> = Vec::new();
    let mut start = 0u64;
    while start < n_obs {
        let end = (start + 65_536).min(n_obs);
        let obs = reader.read_obs(start..end).map_err(Error::stage(crate::Stage::Read))?;
        if obs.column_by_name(key).is_none() {
            let names: Vec<String> = obs.schema().fields().iter().map(|f| f.name().clone()).collect();
            return Err(Error::InvalidInput(format!(
                "{origin}: no obs column {key:?} (the context column); obs has {}",
                crate::suggest::listing(key, names.iter().map(String::as_str), 8)
            )));
        }
        let column = column_strings(&obs, key, &origin)?;
        for i in 0..obs.num_rows() {
            let v = column.get(i).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{origin}: cell {} has no {key:?} (a missing value); every cell needs its context",
                    start + i as u64
                ))
            })?;
            let code = match index.get(v) {
                Some(&c) => c,
                None => {
                    let c = seen.len() as u32;
                    index.insert(v.to_owned(), c);
                    seen.push(v.to_owned());
                    c
                }
            };
            out.push(code);
        }
        start = end;
    }
    Ok((seen, out))
}
