//! Prediction files opened lazily with polars (feature `polars`).
//!
//! polars reads the `mean` and latent columns as `Array(Float32, n)` and the label columns as
//! `Categorical`; the gene of each `mean` item is in the file's schema metadata (see
//! [`crate::unstable::schemas::tables::prediction_genes`], or [`prediction_genes`] here).

use std::path::Path;

use polars::prelude::{LazyFrame, PlRefPath, PolarsError, PolarsResult, ScanArgsParquet};

/// Opens a prediction file, or a directory of part files (`part-*.parquet` from `predict
/// --shard` or `predict --parts`; the shards' `genes.parquet` beside them is not a part), as one
/// lazy frame. Nothing is read
/// until the query runs.
pub fn scan_predictions(path: impl AsRef<Path>) -> PolarsResult<LazyFrame> {
    let path = path.as_ref();
    let target = if path.is_dir() { path.join("part-*.parquet") } else { path.to_owned() };
    let text = target
        .to_str()
        .ok_or_else(|| PolarsError::ComputeError(format!("{}: not a UTF-8 path", target.display()).into()))?;
    LazyFrame::scan_parquet(PlRefPath::new(text), ScanArgsParquet::default())
}

/// The genes of the `mean` column of a prediction file (or of the first file of a dataset
/// directory), in order.
pub fn prediction_genes(path: impl AsRef<Path>) -> std::io::Result<Vec<String>> {
    let path = path.as_ref();
    let file = if path.is_dir() {
        let mut parts: Vec<_> = std::fs::read_dir(path)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                name.starts_with("part-") && name.ends_with(".parquet")
            })
            .collect();
        parts.sort();
        parts
            .into_iter()
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{}: no part-*.parquet files", path.display())))?
    } else {
        path.to_owned()
    };
    let reader = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&file)?)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", file.display())))?;
    let metadata = parquet::file::reader::FileReader::metadata(&reader).file_metadata();
    let schema = parquet::arrow::parquet_to_arrow_schema(metadata.schema_descr(), metadata.key_value_metadata())
        .map_err(|e| std::io::Error::other(format!("{}: {e}", file.display())))?;
    cpa_stream_schemas::tables::prediction_genes(&schema).ok_or_else(|| {
        std::io::Error::other(format!("{}: not a cpa-stream prediction file (no gene list)", file.display()))
    })
}
