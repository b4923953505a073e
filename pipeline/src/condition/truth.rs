//! A synthetic atlas's truth table, read for scoring: the true `E[log1p x]` per condition.

use std::collections::HashMap;

use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use cpa_stream_schemas::tables::truth;
use cpa_stream_stages::model::Vocabulary;
use cpa_stream_stages::model::vocab::split_condition;
use cpa_stream_stages::store::TableFile;

use super::ConditionKey;
use crate::Stage;
use crate::error::{Error, Result};
use crate::obs::column_strings;

/// A truth table row: labels as written and the true `E[log1p x]` per gene.
#[derive(Debug, Clone)]
pub struct TruthRow {
    /// The condition as the truth table writes it.
    pub condition: String,
    /// The dose as the truth table writes it.
    pub dose: String,
    /// The true `E[log1p x]` of each gene.
    pub mean_log1p: Vec<f64>,
}

/// Reads `truth.parquet`; rows whose labels the model does not know are skipped.
pub fn read_truth(file: TableFile<'_>, vocab: &Vocabulary) -> Result<HashMap<ConditionKey, TruthRow>> {
    let origin = file.path().display().to_string();
    let table = file.read_small().map_err(Error::stage(Stage::Truth))?;
    let text = |name: &str| column_strings(&table, name, &origin);
    let (conditions, doses) = (text(truth::CONDITION)?, text(truth::DOSE)?);
    let covariates = vocab
        .covariates
        .iter()
        .map(|c| {
            text(&c.name)
                .map_err(|_| Error::InvalidInput(format!("{origin}: no column {:?} for the model's covariate", c.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let means = table
        .column_by_name(truth::MEAN_LOG1P)
        .and_then(|c| c.as_fixed_size_list_opt())
        .ok_or_else(|| Error::InvalidInput(format!("{origin}: no FixedSizeList column {:?}", truth::MEAN_LOG1P)))?;
    let width = means.value_length() as usize;
    if width != vocab.n_genes() {
        return Err(Error::InvalidInput(format!("{origin}: {width} genes per row, the model has {}", vocab.n_genes())));
    }
    let values = means
        .values()
        .as_primitive_opt::<Float32Type>()
        .ok_or_else(|| Error::InvalidInput(format!("{origin}: {} is not Float32", truth::MEAN_LOG1P)))?;
    let index = vocab.perturbation_index();
    let mut out = HashMap::new();
    for row in 0..table.num_rows() {
        let (Some(condition), Some(dose)) = (conditions.get(row), doses.get(row)) else { continue };
        let Ok(parts) = split_condition(condition, Some(dose), usize::MAX) else { continue };
        let Some(parts) = parts.iter().map(|&(n, d)| index.get(n).map(|&id| (id, d))).collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let covs: Option<Vec<u32>> = covariates
            .iter()
            .zip(&vocab.covariates)
            .map(|(col, cov)| col.get(row).and_then(|v| cov.categories.iter().position(|c| c == v)).map(|p| p as u32))
            .collect();
        let Some(covs) = covs else { continue };
        let start = row * width;
        let mean_log1p = (start..start + width).map(|i| f64::from(values.value(i))).collect();
        out.insert(
            ConditionKey::of(&covs, &parts),
            TruthRow { condition: condition.to_owned(), dose: dose.to_owned(), mean_log1p },
        );
    }
    Ok(out)
}
