//! Reading a store's `obs` and `var` tables as the stages need them: label columns as text, the
//! gene names, the obs columns a trained model was fitted on, and expressions that select cells
//! ([`expr`]).

pub mod expr;

use arrow_array::{Array, RecordBatch};

use arrow_array::cast::AsArray;
use arrow_schema::DataType;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_stages::model::Vocabulary;
use cpa_stream_stages::store::Store;

use crate::Stage;
use crate::error::{Error, Result};

/// A column read as text without a string per row: categories through their dictionary,
/// strings as they are, other types (numbers) formatted once per row.
pub enum TextColumn {
    /// A categorical column: each row's key into the category names.
    Dictionary {
        /// Each row's category (`None`: null or out of range).
        keys: Vec<Option<usize>>,
        /// The category names.
        values: arrow_array::StringArray,
    },
    /// A string column as it is.
    Strings(arrow_array::StringArray),
    /// Any other column (numbers, booleans), formatted once per row.
    Formatted(Vec<Option<String>>),
}

impl TextColumn {
    /// Row `i`'s text (`None`: null).
    pub fn get(&self, i: usize) -> Option<&str> {
        match self {
            TextColumn::Dictionary { keys, values } => keys.get(i).copied().flatten().map(|k| values.value(k)),
            TextColumn::Strings(s) => (i < s.len() && !s.is_null(i)).then(|| s.value(i)),
            TextColumn::Formatted(v) => v.get(i).and_then(|s| s.as_deref()),
        }
    }
}

/// A column of `batch` as text (categorical, string or numeric columns).
pub fn column_strings(batch: &RecordBatch, name: &str, origin: &str) -> Result<TextColumn> {
    let col =
        batch.column_by_name(name).ok_or_else(|| Error::InvalidInput(format!("{origin}: no obs column {name:?}")))?;
    let unreadable = |e: arrow_schema::ArrowError| {
        Error::InvalidInput(format!("{origin}: obs column {name:?} cannot be read as text: {e}"))
    };
    if let Some(dict) = col.as_any_dictionary_opt() {
        let values = arrow_cast::cast(dict.values(), &DataType::Utf8).map_err(unreadable)?;
        let keys = arrow_cast::cast(dict.keys(), &DataType::Int64).map_err(unreadable)?;
        let keys = keys.as_primitive::<arrow_array::types::Int64Type>();
        let n_values = values.len();
        let keys = (0..keys.len())
            .map(|i| {
                (!keys.is_null(i))
                    .then(|| keys.value(i))
                    .filter(|&k| k >= 0 && (k as usize) < n_values)
                    .map(|k| k as usize)
            })
            .collect();
        return Ok(TextColumn::Dictionary { keys, values: values.as_string::<i32>().clone() });
    }
    if let Some(s) = col.as_string_opt::<i32>() {
        return Ok(TextColumn::Strings(s.clone()));
    }
    let utf8 = arrow_cast::cast(col, &DataType::Utf8).map_err(unreadable)?;
    let strings = utf8.as_string::<i32>();
    Ok(TextColumn::Formatted(
        (0..strings.len()).map(|i| (!strings.is_null(i)).then(|| strings.value(i).to_owned())).collect(),
    ))
}

/// The store's gene names (var `gene_id`, else the first column).
pub fn gene_names(store: &Store) -> Result<Vec<String>> {
    let path = store.file_path(StoreFiles::VAR);
    let var = store.small_table(StoreFiles::VAR).map_err(Error::stage(Stage::Reader))?;
    let col = var
        .column_by_name(cpa_stream_schemas::tables::GENE_ID)
        .or_else(|| (var.num_columns() > 0).then(|| var.column(0)))
        .ok_or_else(|| Error::InvalidInput(format!("{}: no gene names", path.display())))?;
    let utf8 =
        arrow_cast::cast(col, &DataType::Utf8).map_err(Error::arrow(format!("{}: gene names", path.display())))?;
    let s = utf8.as_string::<i32>();
    Ok((0..s.len()).map(|i| s.value(i).to_owned()).collect())
}

/// The obs columns of a model's data: perturbation key and dose key.
#[derive(Debug, Clone, PartialEq)]
pub struct ObsKeys {
    /// The perturbation (condition) column.
    pub perturbation: String,
    /// The dose column, if the model had one.
    pub dose: Option<String>,
    /// The name of the dose column in outputs (`dose` when the model had none).
    pub dose_output: String,
}

impl ObsKeys {
    /// The keys a model recorded (older models without a record: `condition`, no dose).
    pub fn of(vocab: &Vocabulary) -> ObsKeys {
        let (perturbation, dose) = match &vocab.data {
            Some(d) => (d.perturbation_key.clone(), d.dose_key.clone()),
            None => ("condition".to_owned(), None),
        };
        let dose_output = dose.clone().unwrap_or_else(|| "dose".to_owned());
        ObsKeys { perturbation, dose, dose_output }
    }
}
