//! Differentially expressed genes: the DEG tables (`group`, `rank`, `gene`, `score`) that import
//! keeps from an `.h5ad` and evaluation writes (the group names a target's DEGs go by:
//! [`Target::deg_keys`](crate::predictor::targets::Target::deg_keys)).

use std::collections::HashMap;

use cpa_stream_stages::h5ad::{DEG_GENE, DEG_GROUP, DEG_RANK};
use cpa_stream_stages::store::TableFile;

use crate::Stage;
use crate::error::{Error, Result};
use crate::obs::column_strings;

/// Reads a DEG table (`group`, `rank`, `gene`): each group's genes in rank order.
pub fn read_deg_lists(table: TableFile<'_>) -> Result<HashMap<String, Vec<String>>> {
    let path = &table.path();
    if !table.exists() {
        return Err(Error::InvalidInput(format!(
            "{}: no DEG table (import one with the .h5ad, run `cpa-stream evaluate` and pass its degs.parquet with \
             --degs, or give a gene list file)",
            path.display()
        )));
    }
    let origin = path.display().to_string();
    let mut lists: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for batch in table.read().map_err(Error::stage(Stage::Degs))? {
        let batch = batch.map_err(Error::stage(Stage::Degs))?;
        let (group, gene) = (column_strings(&batch, DEG_GROUP, &origin)?, column_strings(&batch, DEG_GENE, &origin)?);
        let rank = column_strings(&batch, DEG_RANK, &origin)?;
        for i in 0..batch.num_rows() {
            let (Some(g), Some(name)) = (group.get(i), gene.get(i)) else { continue };
            let r = rank.get(i).and_then(|r| r.parse::<i64>().ok()).unwrap_or(i64::MAX);
            lists.entry(g.to_owned()).or_default().push((r, name.to_owned()));
        }
    }
    Ok(lists
        .into_iter()
        .map(|(g, mut v)| {
            v.sort();
            (g, v.into_iter().map(|(_, n)| n).collect())
        })
        .collect())
}
