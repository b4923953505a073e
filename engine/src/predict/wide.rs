//! `--layout wide`: the prediction table with one Float32 column per gene (named by the gene)
//! instead of the `mean` list column (`expected_log1p_GENE`, `change_log1p_GENE` when written),
//! and one column per latent dimension (`z_basal_0`, ...),
//! for tools without list columns (spreadsheets, pandas without object arrays, SQL engines).

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, FixedSizeListArray, Float32Array, RecordBatch};

use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use cpa_stream_schemas::tables::predictions::{GENE_COLUMNS, LAYOUT_KEY, MEAN};

use cpa_stream_pipeline::error::{Error, Result};

/// Turns long prediction batches into wide ones.
#[derive(Debug, Clone)]
pub(super) struct Widen {
    schema: SchemaRef,
    /// Per long column: `None` kept as is, `Some(n)` split into `n` Float32 columns.
    split: Vec<Option<usize>>,
}

impl Widen {
    /// The wide form of `long`, whose `mean` items are `genes`.
    pub(super) fn new(long: &Schema, genes: &[String]) -> Result<Widen> {
        let mut fields = Vec::new();
        let mut split = Vec::new();
        for field in long.fields() {
            match field.data_type() {
                DataType::FixedSizeList(item, n) if item.data_type() == &DataType::Float32 => {
                    let n = usize::try_from(*n).unwrap_or(0);
                    let names: Vec<String> = if field.name() == MEAN {
                        genes.to_vec()
                    } else if GENE_COLUMNS.contains(&field.name().as_str()) {
                        genes.iter().map(|g| format!("{}_{g}", field.name())).collect()
                    } else {
                        (0..n).map(|i| format!("{}_{i}", field.name())).collect()
                    };
                    fields.extend(names.iter().map(|name| Field::new(name, DataType::Float32, false)));
                    split.push(Some(n));
                }
                _ => {
                    fields.push(field.as_ref().clone());
                    split.push(None);
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = fields.iter().find(|f| !seen.insert(f.name().as_str())) {
            return Err(Error::InvalidInput(format!(
                "--layout wide: column {:?} would appear twice (a gene named like another column or gene); \
                 use the long layout, or --genes to leave it out",
                dup.name()
            )));
        }
        let mut metadata = long.metadata().clone();
        metadata.insert(LAYOUT_KEY.to_owned(), "wide".to_owned());
        Ok(Widen { schema: Arc::new(Schema::new(fields).with_metadata(metadata)), split })
    }

    pub(super) fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// `batch` (long) in the wide schema.
    pub(super) fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for (column, split) in batch.columns().iter().zip(&self.split) {
            let Some(n) = *split else {
                columns.push(Arc::clone(column));
                continue;
            };
            let list: &FixedSizeListArray = column.as_fixed_size_list();
            let values = list.values().as_primitive::<Float32Type>().values();
            let rows = list.len();
            for j in 0..n {
                let column: Float32Array =
                    (0..rows).map(|r| values[list.value_offset_at(r) + j]).collect::<Vec<f32>>().into();
                columns.push(Arc::new(column));
            }
        }
        RecordBatch::try_new(self.schema(), columns).map_err(Error::arrow("wide prediction batch"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::StringArray;

    #[test]
    fn lists_become_one_column_per_item_in_order() {
        let long = Schema::new(vec![
            Field::new("cell_id", DataType::Utf8, false),
            Field::new(MEAN, DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, true)), 2), false),
            Field::new("z", DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, true)), 1), false),
        ]);
        let genes = ["CD3E".to_owned(), "MS4A1".to_owned()];
        let widen = Widen::new(&long, &genes).unwrap_or_else(|e| panic!("{e}"));
        let item = Arc::new(Field::new("item", DataType::Float32, true));
        let mean =
            FixedSizeListArray::new(Arc::clone(&item), 2, Arc::new(Float32Array::from(vec![1., 2., 3., 4.])), None);
        let z = FixedSizeListArray::new(item, 1, Arc::new(Float32Array::from(vec![9., 8.])), None);
        let batch = RecordBatch::try_new(
            Arc::new(long),
            vec![Arc::new(StringArray::from(vec!["a", "b"])), Arc::new(mean), Arc::new(z)],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let wide = widen.apply(&batch.slice(1, 1)).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = wide.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["cell_id", "CD3E", "MS4A1", "z_0"]);
        let value = |c: usize| wide.column(c).as_primitive::<Float32Type>().value(0);
        assert_eq!((value(1), value(2), value(3)), (3.0, 4.0, 8.0));
        let err = Widen::new(batch.schema_ref(), &["cell_id".to_owned(), "x".to_owned()]).unwrap_err();
        assert!(err.to_string().contains("\"cell_id\" would appear twice"), "{err}");
    }
}
