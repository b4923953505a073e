//! `export`: store reader -> `.h5ad` writer (CSR `X`, `obs`, `var`, DEG lists in `uns`).

use std::path::Path;
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::h5ad::{DEG_FILE, H5adCompression, H5adWriter};
use cpa_stream_stages::store::{Access, Store};

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::telemetry::{MemorySampler, RunReport, StageStats};
use crate::two_stage::{send_store_rows, two_stage};

/// Rows per chunk sent to the writer (about 7 MB of rows at 5,000 genes and 17% density).
const BATCH_ROWS: usize = 1024;
/// Chunks queued between reader and writer.
const CHANNEL_DEPTH: usize = 4;
/// `uns` key of exported DEG lists when the store does not record one.
pub const DEFAULT_DEG_KEY: &str = "rank_genes_groups_cov";

/// Writes `store` as an AnnData file at `out`.
pub fn run_export(
    store: &Store,
    out: &Path,
    compression: H5adCompression,
    overwrite: bool,
    progress: &dyn Progress,
) -> Result<RunReport> {
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let read = StageStats::new("read", 1);
    let write = StageStats::new("write", 1);
    let var = store.small_table(StoreFiles::VAR).map_err(Error::stage("read"))?;
    let obs_schema = store.table_schema(StoreFiles::OBS).map_err(Error::stage("read"))?;
    let mut writer = H5adWriter::create(out, &var, &obs_schema, store.nnz(), compression, overwrite)
        .map_err(Error::stage("write"))?;
    store.advise(Access::Sequential);
    progress.begin("cells", store.n_obs());
    let result = two_stage(
        "read",
        &read,
        &write,
        CHANNEL_DEPTH,
        |out| send_store_rows(store, BATCH_ROWS, &read, out),
        |(rows, obs): (CsrBatch, RecordBatch)| {
            write.busy(|| writer.append(&rows, &obs)).map_err(Error::stage("write"))?;
            write.add(rows.n_rows() as u64, rows.byte_size());
            progress.advance(rows.n_rows() as u64);
            Ok(())
        },
    );
    progress.end();
    result?;
    if store.has_file(DEG_FILE) {
        let table = store.small_table(DEG_FILE).map_err(Error::stage("read"))?;
        let key = table.schema().metadata().get("uns_key").cloned().unwrap_or_else(|| DEFAULT_DEG_KEY.to_owned());
        writer.write_degs(&key, &table).map_err(Error::stage("write"))?;
    }
    write.busy(|| writer.finish()).map_err(Error::stage("write"))?;
    Ok(RunReport { wall: started.elapsed(), stages: vec![read.report(), write.report()], memory: sampler.finish() })
}
