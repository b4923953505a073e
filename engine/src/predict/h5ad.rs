//! `predict --counts --out FILE.h5ad`: the drawn counts as an AnnData of raw counts in the
//! layout a counts-scored benchmark (cell-eval2's `vcc2026`) reads: `X` the counts (CSR,
//! float32 whole numbers), `obs` the target's labels under the store's column names, `var` the
//! store's rows of the written genes. After the predicted rows come the control cells among
//! the source cells, as observed, under their own labels: the control group such a file
//! carries. Written to a temporary name and renamed when complete, as every output.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, RecordBatch, StringArray};

use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use cpa_stream_schemas::StoreFiles;
use cpa_stream_schemas::tables::predictions::{CELL_ID, COUNTS};
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::h5ad::{H5adCompression, H5adWriter};
use cpa_stream_stages::sink::SinkSummary;

use crate::Stage;
use crate::predictor::Predictor;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::obs::column_strings;

/// The obs column of the source cell's id.
pub const SOURCE_CELL: &str = "source_cell_id";
/// The obs column that is true for the observed control cells, false for predicted rows.
pub const OBSERVED: &str = "observed";
/// Store rows read at a time for the observed control cells.
const OBSERVED_ROWS: usize = 1024;

/// Whether `out` names an AnnData file (`.h5ad`, any case).
pub fn is_h5ad(out: &Path) -> bool {
    out.extension().is_some_and(|e| e.eq_ignore_ascii_case("h5ad"))
}

/// An `.h5ad` of drawn counts being written.
pub(super) struct CountsFile {
    writer: H5adWriter,
    path: std::path::PathBuf,
    obs_schema: SchemaRef,
    /// The prediction's label columns, in the obs table's order.
    labels: Vec<String>,
    rows: u64,
    genes: u32,
    /// Where the observed control cells come from.
    source: Source,
}

/// The source cells' selection, as [`CountsFile::write_observed_controls`] reads it again.
struct Source {
    store: Arc<cpa_stream_stages::store::Store>,
    select: cpa_stream_pipeline::obs::expr::Expr,
    rows: std::ops::Range<u64>,
    keys: cpa_stream_pipeline::obs::ObsKeys,
    control: String,
    covariates: Vec<String>,
    genes: Vec<String>,
}

impl CountsFile {
    /// Starts `out` for `predictor`'s rows (which must write `counts`).
    pub(super) fn create(out: &Path, predictor: &Predictor, overwrite: bool) -> Result<CountsFile> {
        let schema = predictor.schema();
        if schema.column_with_name(COUNTS).is_none() {
            return Err(Error::InvalidInput(format!(
                "{}: an .h5ad prediction is a file of raw counts (X), what cell-eval2 scores: add --counts (Python \
                 counts=True), or write the predicted means to a .parquet file",
                out.display()
            )));
        }
        let labels: Vec<String> = schema
            .fields()
            .iter()
            .filter(|f| matches!(f.data_type(), DataType::Dictionary(..)))
            .map(|f| f.name().clone())
            .collect();
        let mut fields = vec![Field::new("_index", DataType::Utf8, false)];
        fields.extend(labels.iter().map(|l| Field::new(l, DataType::Utf8, false)));
        for extra in [SOURCE_CELL, OBSERVED] {
            if labels.iter().any(|l| l == extra) {
                return Err(Error::InvalidInput(format!(
                    "{}: the obs column {extra:?} of the written AnnData would repeat a label column of the model",
                    out.display()
                )));
            }
        }
        fields.push(Field::new(SOURCE_CELL, DataType::Utf8, false));
        fields.push(Field::new(OBSERVED, DataType::Boolean, false));
        let obs_schema = Arc::new(Schema::new(fields));
        let var = super::genes_var_table(predictor)?;
        let genes = predictor.genes().len();
        // The entries announced pick int32 or int64 indices: every row full, at most.
        let rows = predictor.rows();
        let bound = (rows.end - rows.start).saturating_mul(predictor.passes() as u64 + 1).saturating_mul(genes as u64);
        let writer = H5adWriter::create(out, &var, &obs_schema, bound, H5adCompression::None, overwrite)
            .map_err(Error::stage(Stage::Sink))?;
        let genes = u32::try_from(genes).map_err(|_| Error::InvalidInput(format!("{genes} genes")))?;
        let source = Source {
            store: Arc::clone(predictor.store()),
            select: predictor.source().clone(),
            rows,
            keys: predictor.keys().clone(),
            control: predictor.vocabulary().control().to_owned(),
            covariates: predictor.vocabulary().covariates.iter().map(|c| c.name.clone()).collect(),
            genes: predictor.genes().to_vec(),
        };
        Ok(CountsFile { writer, path: out.to_owned(), obs_schema, labels, rows: 0, genes, source })
    }

    /// Appends a batch of predicted rows.
    pub(super) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let counts = batch
            .column_by_name(COUNTS)
            .and_then(|c| c.as_fixed_size_list_opt())
            .ok_or_else(|| Error::InvalidInput("predictions without their counts column".to_owned()))?;
        let values = counts.values().as_primitive::<Float32Type>().values();
        let width = self.genes as usize;
        let mut rows = CsrBatch::with_capacity(self.genes, batch.num_rows(), 0);
        let (mut indices, mut data) = (Vec::new(), Vec::new());
        for r in 0..batch.num_rows() {
            let row = &values[counts.value_offset_at(r)..][..width];
            indices.clear();
            data.clear();
            for (g, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    indices.push(g as u32);
                    data.push(v);
                }
            }
            rows.push_row(&indices, &data);
        }
        let ids = arrow_cast::cast(
            batch.column_by_name(CELL_ID).ok_or_else(|| Error::InvalidInput("predictions without cell ids".into()))?,
            &DataType::Utf8,
        )
        .map_err(Error::arrow("cell ids"))?;
        let labels = self
            .labels
            .iter()
            .map(|l| {
                let column = batch.column_by_name(l).ok_or_else(|| Error::InvalidInput(format!("no label {l:?}")))?;
                arrow_cast::cast(column, &DataType::Utf8).map_err(Error::arrow(format!("label {l:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.append(rows, labels, ids, false)
    }

    /// Appends the control cells among the source cells (of the shard's rows), as observed:
    /// their counts of the written genes under their own labels. Returns how many.
    pub(super) fn write_observed_controls(&mut self, ctx: &cpa_stream_pipeline::context::RunContext) -> Result<u64> {
        let store = Arc::clone(&self.source.store);
        let obs_path = store.file_path(StoreFiles::OBS);
        let origin = obs_path.display().to_string();
        let var = store.small_table(StoreFiles::VAR).map_err(Error::stage(Stage::Reader))?;
        let ids = arrow_cast::cast(var.column(0), &DataType::Utf8).map_err(Error::arrow("gene ids"))?;
        let position: HashMap<&str, u32> =
            self.source.genes.iter().enumerate().map(|(i, g)| (g.as_str(), i as u32)).collect();
        let map: Vec<Option<u32>> =
            ids.as_string::<i32>().iter().map(|g| g.and_then(|g| position.get(g).copied())).collect();
        let rows = self.source.rows.clone();
        let mut cursor = store.cursor().map_err(Error::stage(Stage::Reader))?;
        let (mut row, mut written) = (0u64, 0u64);
        let mut one = CsrBatch::new(store.n_vars() as u32);
        for obs in store.table(StoreFiles::OBS).map_err(Error::stage(Stage::Reader))? {
            let obs = obs.map_err(Error::stage(Stage::Reader))?;
            let n = obs.num_rows() as u64;
            if row + n <= rows.start || row >= rows.end {
                row += n;
                continue;
            }
            let chosen = self.source.select.select(&obs, &origin)?;
            let condition = column_strings(&obs, &self.source.keys.perturbation, &origin)?;
            let control = self.source.control.as_str();
            let picked: Vec<usize> = (0..obs.num_rows())
                .filter(|&i| chosen[i] && rows.contains(&(row + i as u64)) && condition.get(i) == Some(control))
                .collect();
            if picked.is_empty() {
                row += n;
                continue;
            }
            let dose = self.source.keys.dose.as_deref().map(|d| column_strings(&obs, d, &origin)).transpose()?;
            let covariates =
                self.source.covariates.iter().map(|c| column_strings(&obs, c, &origin)).collect::<Result<Vec<_>>>()?;
            let cell_ids = obs.column_by_name(CELL_ID).map(|_| column_strings(&obs, CELL_ID, &origin)).transpose()?;
            for chunk in picked.chunks(OBSERVED_ROWS) {
                let mut counts = CsrBatch::new(self.genes);
                for &i in chunk {
                    let r = row + i as u64;
                    one.clear();
                    cursor.read_range(r..r + 1, &mut one).map_err(Error::stage(Stage::Reader))?;
                    store.release(r..r + 1);
                    counts.push_remapped(&one, &map);
                }
                let text = |f: &dyn Fn(usize) -> String| -> ArrayRef {
                    Arc::new(StringArray::from_iter_values(chunk.iter().map(|&i| f(i))))
                };
                let mut labels = vec![text(&|i| condition.get(i).unwrap_or_default().to_owned())];
                labels.push(text(&|i| dose.as_ref().and_then(|d| d.get(i)).unwrap_or("1").to_owned()));
                for c in &covariates {
                    labels.push(text(&|i| c.get(i).unwrap_or_default().to_owned()));
                }
                let ids = text(&|i| match &cell_ids {
                    Some(c) => c.get(i).unwrap_or_default().to_owned(),
                    None => (row + i as u64).to_string(),
                });
                written += chunk.len() as u64;
                self.append(counts, labels, ids, true)?;
                ctx.check_stopped()?;
            }
            row += n;
        }
        Ok(written)
    }

    fn append(&mut self, rows: CsrBatch, labels: Vec<ArrayRef>, ids: ArrayRef, observed: bool) -> Result<()> {
        let n = rows.n_rows();
        let index = StringArray::from_iter_values((self.rows..self.rows + n as u64).map(|r| r.to_string()));
        let mut columns: Vec<ArrayRef> = vec![Arc::new(index)];
        columns.extend(labels);
        columns.push(ids);
        columns.push(Arc::new(BooleanArray::from(vec![observed; n])));
        let obs = RecordBatch::try_new(Arc::clone(&self.obs_schema), columns).map_err(Error::arrow("obs rows"))?;
        self.writer.append(&rows, &obs).map_err(Error::stage(Stage::Sink))?;
        self.rows += n as u64;
        Ok(())
    }

    /// Publishes the file.
    pub(super) fn finish(self) -> Result<SinkSummary> {
        self.writer.finish().map_err(Error::stage(Stage::Sink))?;
        let bytes = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        Ok(SinkSummary { path: self.path, rows: self.rows, bytes, row_groups: 0, files: 1 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_h5ad_output_is_recognised_by_its_extension() {
        assert!(is_h5ad(Path::new("out/pred.h5ad")) && is_h5ad(Path::new("PRED.H5AD")));
        assert!(!is_h5ad(Path::new("pred.parquet")) && !is_h5ad(Path::new("h5ad")));
    }
}
