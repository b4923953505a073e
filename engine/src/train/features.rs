//! Fixed perturbation features (`train --perturbation-features TABLE`): one row per perturbation
//! (molecular descriptors, fingerprints, gene embeddings computed by the user), which the model
//! projects into its latent space instead of learning a free embedding per perturbation. The
//! table may name perturbations the store has no cells of: they join the model's vocabulary and
//! are predicted from their features.

use std::collections::HashMap;
use std::path::Path;

use crate::model::Vocabulary;
use crate::model::vocab::{CONTROL_ID, PADDING_NAME};
use arrow_array::cast::AsArray;
use arrow_array::types::Float64Type;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use tch::Tensor;

use crate::Stage;
use crate::torch::torch_error;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::suggest::listing;

/// Column names the perturbation names are looked for under, after the perturbation key.
const NAME_COLUMNS: [&str; 3] = ["perturbation", "name", "drug"];

/// A table of perturbation features: names and their rows (row-major, `columns` wide).
#[derive(Debug, Clone)]
pub struct FeatureTable {
    /// The file read.
    pub origin: String,
    /// The perturbation of each row.
    pub names: Vec<String>,
    /// The feature columns.
    pub columns: Vec<String>,
    /// Values, `names.len() x columns.len()`.
    pub values: Vec<f32>,
}

impl FeatureTable {
    /// Reads a Parquet (`.parquet`, `.pq`) or CSV table. The names are the column named like the
    /// perturbation key (else `perturbation`, `name` or `drug`, else the first column); every other
    /// column is a feature and must hold numbers (booleans count as 0/1) in every row.
    pub fn read(path: &Path, perturbation_key: &str) -> Result<FeatureTable> {
        let origin = path.display().to_string();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let batches: Vec<RecordBatch> = if ext == "parquet" || ext == "pq" {
            let table = cpa_stream_stages::store::read_small_table(path).map_err(Error::stage(Stage::Features))?;
            vec![table]
        } else {
            crate::predictor::targets::read_csv(path)?
        };
        let Some(first) = batches.first() else {
            return Err(Error::InvalidInput(format!("{origin}: an empty table; expected one row per perturbation")));
        };
        let schema = first.schema();
        let fields: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let key = std::iter::once(perturbation_key)
            .chain(NAME_COLUMNS)
            .find(|k| fields.contains(k))
            .or(fields.first().copied())
            .ok_or_else(|| Error::InvalidInput(format!("{origin}: no columns")))?
            .to_owned();
        let columns: Vec<String> = fields.iter().filter(|f| **f != key).map(|f| (*f).to_owned()).collect();
        if columns.is_empty() {
            return Err(Error::InvalidInput(format!(
                "{origin}: only the name column {key:?}; expected feature columns beside it"
            )));
        }
        let (mut names, mut values) = (Vec::new(), Vec::new());
        let mut seen: HashMap<String, usize> = HashMap::new();
        for batch in &batches {
            let name_column = batch
                .column_by_name(&key)
                .ok_or_else(|| Error::InvalidInput(format!("{origin}: no column {key:?}")))?;
            let name_column = arrow_cast::cast(name_column, &DataType::Utf8)
                .map_err(|e| Error::InvalidInput(format!("{origin}: column {key:?}: {e}")))?;
            let name_column = name_column.as_string::<i32>();
            let numeric: Vec<arrow_array::ArrayRef> = columns
                .iter()
                .map(|c| {
                    let column = batch
                        .column_by_name(c)
                        .ok_or_else(|| Error::InvalidInput(format!("{origin}: no column {c:?}")))?;
                    let column = if column.data_type() == &DataType::Boolean {
                        arrow_cast::cast(column, &DataType::Int8).and_then(|c| arrow_cast::cast(&c, &DataType::Float64))
                    } else {
                        arrow_cast::cast(column, &DataType::Float64)
                    };
                    column.map_err(|e| Error::InvalidInput(format!("{origin}: column {c:?} is not numeric: {e}")))
                })
                .collect::<Result<_>>()?;
            for row in 0..batch.num_rows() {
                let line = names.len() + 1;
                if name_column.is_null(row) || name_column.value(row).trim().is_empty() {
                    return Err(Error::InvalidInput(format!("{origin}: row {line}: no perturbation name in {key:?}")));
                }
                let name = name_column.value(row).trim().to_owned();
                if let Some(first) = seen.insert(name.clone(), line) {
                    return Err(Error::InvalidInput(format!("{origin}: {name:?} in rows {first} and {line}")));
                }
                for (c, column) in columns.iter().zip(&numeric) {
                    let v = column.as_primitive::<Float64Type>();
                    if v.is_null(row) || !v.value(row).is_finite() {
                        let raw = batch.column_by_name(c).and_then(|a| {
                            arrow_cast::cast(a, &DataType::Utf8)
                                .ok()
                                .map(|s| s.as_string::<i32>().value(row).to_owned())
                        });
                        return Err(Error::InvalidInput(format!(
                            "{origin}: row {line} ({name}), column {c:?}: {} is not a finite number",
                            raw.map_or_else(|| "an empty cell".to_owned(), |r| format!("{r:?}"))
                        )));
                    }
                    values.push(v.value(row) as f32);
                }
                names.push(name);
            }
        }
        if names.is_empty() {
            return Err(Error::InvalidInput(format!("{origin}: no rows; expected one row per perturbation")));
        }
        Ok(FeatureTable { origin, names, columns, values })
    }

    /// The table's perturbations the vocabulary lacks (perturbations without cells, predicted
    /// from their features); the control's row is never one.
    pub fn extra(&self, vocab: &Vocabulary) -> Vec<String> {
        let index = vocab.perturbation_index();
        self.names.iter().filter(|n| !index.contains_key(n.as_str()) && *n != PADDING_NAME).cloned().collect()
    }

    /// The features in vocabulary order (`perturbations x columns`): the padding entry zeros, the
    /// control its row or zeros. Every other perturbation of the vocabulary needs a row.
    pub fn tensor(&self, vocab: &Vocabulary) -> Result<Tensor> {
        let width = self.columns.len();
        let rows: HashMap<&str, usize> = self.names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let missing: Vec<&str> = vocab.perturbations[CONTROL_ID + 1..]
            .iter()
            .map(String::as_str)
            .filter(|p| !rows.contains_key(p))
            .collect();
        if let Some(first) = missing.first() {
            return Err(Error::InvalidInput(format!(
                "{}: no features for {} perturbation(s) of the store: {}{}; closest names in the table to {first:?}: {}",
                self.origin,
                missing.len(),
                missing.iter().take(5).map(|m| format!("{m:?}")).collect::<Vec<_>>().join(", "),
                if missing.len() > 5 { ", ..." } else { "" },
                listing(first, self.names.iter().map(String::as_str), 3)
            )));
        }
        let mut out = vec![0f32; vocab.perturbations.len() * width];
        for (p, name) in vocab.perturbations.iter().enumerate().skip(CONTROL_ID) {
            if let Some(&r) = rows.get(name.as_str()) {
                out[p * width..(p + 1) * width].copy_from_slice(&self.values[r * width..(r + 1) * width]);
            }
        }
        Tensor::f_from_slice(&out)
            .and_then(|t| t.f_view([vocab.perturbations.len() as i64, width as i64]))
            .map_err(|e| Error::stage(Stage::Features)(torch_error(e)))
    }
}
