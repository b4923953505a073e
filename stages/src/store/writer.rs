//! The streaming store writer: row chunks in, bounded memory, published atomically.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use cpa_stream_schemas::tables::{check_obs_schema, check_var_schema};
use cpa_stream_schemas::{
    ChecksumAlgorithm, Codec, FileEntry, MANIFEST_FILE, Manifest, MatrixDtypes, STORE_FORMAT, STORE_FORMAT_VERSION,
    StoreFiles,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::blocks::BlockEncoder;
use super::hashing::{HashingWriter, hash_reader};
use crate::csr::CsrBatch;
use crate::error::{Error, Result};
use crate::output::{OutputKind, OutputLock, claim_output, publish, temporary_sibling};

/// Default rows per row group of `obs.parquet`: a few MB of metadata columns in memory at most.
pub const DEFAULT_OBS_ROW_GROUP_ROWS: usize = 65_536;
/// Buffer size of each matrix file writer.
const FILE_BUFFER_BYTES: usize = 1 << 20;

/// Options of a [`StoreWriter`].
#[derive(Debug, Clone)]
pub struct StoreWriterOptions {
    /// Matrix codec. Default: [`Codec::Raw`].
    pub codec: Codec,
    /// Rows per `obs.parquet` row group. Default: [`DEFAULT_OBS_ROW_GROUP_ROWS`].
    pub obs_row_group_rows: usize,
    /// Replace an existing store at the destination on [`finish`](StoreWriter::finish).
    /// Default: false (an existing destination is an error at creation).
    pub overwrite: bool,
    /// Free-text provenance recorded in the manifest. Default: none.
    pub source: Option<String>,
}

impl Default for StoreWriterOptions {
    fn default() -> Self {
        StoreWriterOptions {
            codec: Codec::Raw,
            obs_row_group_rows: DEFAULT_OBS_ROW_GROUP_ROWS,
            overwrite: false,
            source: None,
        }
    }
}

type Sink = HashingWriter<BufWriter<File>>;

enum MatrixSink {
    Raw { indices: Sink, data: Sink },
    Zstd { blocks: Sink, block_index: Sink, pending: CsrBatch, block_rows: usize, encoder: Box<BlockEncoder> },
}

/// Writes a store from a stream of row chunks and their `obs` rows.
///
/// Everything is written into a temporary directory next to the destination; [`finish`]
/// writes the manifest and renames the directory into place, so a store appears complete or not
/// at all. Dropping an unfinished writer removes the temporary directory.
///
/// [`finish`]: StoreWriter::finish
pub struct StoreWriter {
    dest: PathBuf,
    tmp: PathBuf,
    options: StoreWriterOptions,
    n_vars: u32,
    n_obs: u64,
    nnz: u64,
    indptr: Option<Sink>,
    matrix: Option<MatrixSink>,
    obs: Option<ArrowWriter<File>>,
    obs_schema: SchemaRef,
    finished: bool,
    /// Held until the store is published or abandoned (dropped after `Drop::drop`).
    _lock: OutputLock,
}

impl StoreWriter {
    /// Starts a store at `dest` whose genes are the rows of `var` (first column `gene_id`) and
    /// whose cells will have `obs_schema` (first column `cell_id`).
    pub fn create(
        dest: &Path,
        var: &RecordBatch,
        obs_schema: SchemaRef,
        options: StoreWriterOptions,
    ) -> Result<StoreWriter> {
        check_var_schema(var.schema_ref()).map_err(|e| Error::InvalidInput(format!("var table: {e}")))?;
        check_obs_schema(&obs_schema).map_err(|e| Error::InvalidInput(format!("obs table: {e}")))?;
        let n_vars = u32::try_from(var.num_rows())
            .map_err(|_| Error::InvalidInput(format!("{} genes exceed the u32 column index range", var.num_rows())))?;
        let lock = claim_output(dest, OutputKind::Directory, options.overwrite)?;
        let tmp = temporary_sibling(dest)?;
        fs::create_dir_all(tmp.join("X")).map_err(|e| Error::io(&tmp, e))?;
        let mut writer = StoreWriter {
            dest: dest.to_owned(),
            tmp,
            options,
            n_vars,
            n_obs: 0,
            nnz: 0,
            indptr: None,
            matrix: None,
            obs: None,
            obs_schema,
            finished: false,
            _lock: lock,
        };
        writer.open_files(var)?;
        Ok(writer)
    }

    fn open_files(&mut self, var: &RecordBatch) -> Result<()> {
        let mut indptr = self.sink(StoreFiles::INDPTR)?;
        write_all(&mut indptr, &0u64.to_le_bytes(), &self.tmp.join(StoreFiles::INDPTR))?;
        self.indptr = Some(indptr);
        self.matrix = Some(match self.options.codec {
            Codec::Raw => {
                MatrixSink::Raw { indices: self.sink(StoreFiles::INDICES)?, data: self.sink(StoreFiles::DATA)? }
            }
            Codec::Zstd { level, block_rows, planes, block_checksum } => {
                let mut block_index = self.sink(StoreFiles::BLOCK_INDEX)?;
                write_all(&mut block_index, &0u64.to_le_bytes(), &self.tmp.join(StoreFiles::BLOCK_INDEX))?;
                let encoder = BlockEncoder::new(level, planes, block_checksum)
                    .map_err(|e| Error::io(self.tmp.join(StoreFiles::BLOCKS), e))?;
                MatrixSink::Zstd {
                    blocks: self.sink(StoreFiles::BLOCKS)?,
                    block_index,
                    pending: CsrBatch::new(self.n_vars),
                    block_rows: block_rows as usize,
                    encoder: Box::new(encoder),
                }
            }
        });
        let props = table_properties(self.options.obs_row_group_rows);
        let var_path = self.tmp.join(StoreFiles::VAR);
        let file = File::create(&var_path).map_err(|e| Error::io(&var_path, e))?;
        let mut var_writer =
            ArrowWriter::try_new(file, var.schema(), Some(props.clone())).map_err(|e| Error::parquet(&var_path, e))?;
        var_writer.write(var).map_err(|e| Error::parquet(&var_path, e))?;
        var_writer.close().map_err(|e| Error::parquet(&var_path, e))?;
        let obs_path = self.tmp.join(StoreFiles::OBS);
        let file = File::create(&obs_path).map_err(|e| Error::io(&obs_path, e))?;
        self.obs = Some(
            ArrowWriter::try_new(file, Arc::clone(&self.obs_schema), Some(props))
                .map_err(|e| Error::parquet(&obs_path, e))?,
        );
        Ok(())
    }

    fn sink(&self, name: &str) -> Result<Sink> {
        let path = self.tmp.join(name);
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(HashingWriter::new(BufWriter::with_capacity(FILE_BUFFER_BYTES, file)))
    }

    /// Number of genes (columns).
    pub fn n_vars(&self) -> u32 {
        self.n_vars
    }

    /// Rows written so far.
    pub fn n_obs(&self) -> u64 {
        self.n_obs
    }

    /// Non-zero entries written so far.
    pub fn nnz(&self) -> u64 {
        self.nnz
    }

    /// The schema `obs` batches must have.
    pub fn obs_schema(&self) -> &SchemaRef {
        &self.obs_schema
    }

    /// Path inside the unpublished store where an extra table (for example
    /// [`StoreFiles::TRUTH`]) may be written before [`finish`](StoreWriter::finish); it is
    /// checksummed and published with the store.
    pub fn extra_file_path(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Appends `rows` with their `obs` rows (same count, in order). Rows are validated: column
    /// indices strictly increasing and below `n_vars`, values finite.
    pub fn push_rows(&mut self, rows: &CsrBatch, obs: &RecordBatch) -> Result<()> {
        if rows.n_cols() != self.n_vars {
            return Err(Error::InvalidInput(format!(
                "rows have {} columns, the store has {} genes",
                rows.n_cols(),
                self.n_vars
            )));
        }
        if obs.num_rows() != rows.n_rows() {
            return Err(Error::InvalidInput(format!(
                "{} obs rows for {} matrix rows (starting at cell {})",
                obs.num_rows(),
                rows.n_rows(),
                self.n_obs
            )));
        }
        if obs.schema_ref().fields() != self.obs_schema.fields() {
            return Err(Error::InvalidInput(format!(
                "obs batch schema differs from the store's obs schema (starting at cell {})",
                self.n_obs
            )));
        }
        rows.validate()
            .map_err(|e| Error::InvalidInput(format!("matrix rows starting at cell {}: {e}", self.n_obs)))?;
        self.write_matrix(rows)?;
        let obs_path = self.tmp.join(StoreFiles::OBS);
        self.obs
            .as_mut()
            .ok_or_else(|| Error::InvalidInput("writer already finished".to_owned()))?
            .write(obs)
            .map_err(|e| Error::parquet(&obs_path, e))?;
        Ok(())
    }

    fn write_matrix(&mut self, rows: &CsrBatch) -> Result<()> {
        let tmp = &self.tmp;
        let indptr = self.indptr.as_mut().ok_or_else(|| Error::InvalidInput("writer already finished".to_owned()))?;
        let mut offsets = Vec::with_capacity(rows.n_rows() * 8);
        for &off in &rows.indptr()[1..] {
            offsets.extend_from_slice(&(self.nnz + off).to_le_bytes());
        }
        write_all(indptr, &offsets, &tmp.join(StoreFiles::INDPTR))?;
        match self.matrix.as_mut() {
            Some(MatrixSink::Raw { indices, data }) => {
                write_all(indices, bytemuck::cast_slice(rows.indices()), &tmp.join(StoreFiles::INDICES))?;
                write_all(data, bytemuck::cast_slice(rows.data()), &tmp.join(StoreFiles::DATA))?;
            }
            Some(MatrixSink::Zstd { blocks, block_index, pending, block_rows, encoder }) => {
                for r in 0..rows.n_rows() {
                    let (i, d) = rows.row(r);
                    pending.push_row(i, d);
                    if pending.n_rows() == *block_rows {
                        flush_block(tmp, pending, encoder, blocks, block_index)?;
                    }
                }
            }
            None => return Err(Error::InvalidInput("writer already finished".to_owned())),
        }
        self.n_obs += rows.n_rows() as u64;
        self.nnz += rows.nnz() as u64;
        Ok(())
    }

    /// Writes the manifest and publishes the store at its destination. Returns the manifest.
    pub fn finish(mut self) -> Result<Manifest> {
        let tmp = self.tmp.clone();
        let mut files = BTreeMap::new();
        let mut close = |name: &str, sink: Sink| -> Result<()> {
            let path = tmp.join(name);
            let (buf, bytes, checksum) = sink.finish().map_err(|e| Error::io(&path, e))?;
            let file = buf.into_inner().map_err(|e| Error::io(&path, e.into_error()))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
            files.insert(name.to_owned(), FileEntry { bytes, checksum });
            Ok(())
        };
        if let Some(indptr) = self.indptr.take() {
            close(StoreFiles::INDPTR, indptr)?;
        }
        match self.matrix.take() {
            Some(MatrixSink::Raw { indices, data }) => {
                close(StoreFiles::INDICES, indices)?;
                close(StoreFiles::DATA, data)?;
            }
            Some(MatrixSink::Zstd { mut blocks, mut block_index, mut pending, mut encoder, .. }) => {
                if !pending.is_empty() {
                    flush_block(&tmp, &mut pending, &mut encoder, &mut blocks, &mut block_index)?;
                }
                close(StoreFiles::BLOCKS, blocks)?;
                close(StoreFiles::BLOCK_INDEX, block_index)?;
            }
            None => {}
        }
        if let Some(obs) = self.obs.take() {
            let path = tmp.join(StoreFiles::OBS);
            let file = obs.into_inner().map_err(|e| Error::parquet(&path, e))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        // Tables written whole (var, obs, extras): checksum them by reading back.
        for entry in walk_files(&tmp)? {
            let rel = relative_name(&tmp, &entry);
            if files.contains_key(&rel) {
                continue;
            }
            let file = File::open(&entry).map_err(|e| Error::io(&entry, e))?;
            file.sync_all().map_err(|e| Error::io(&entry, e))?;
            let (bytes, checksum) = hash_reader(std::io::BufReader::new(file)).map_err(|e| Error::io(&entry, e))?;
            files.insert(rel, FileEntry { bytes, checksum });
        }
        let manifest = Manifest {
            format: STORE_FORMAT.to_owned(),
            version: STORE_FORMAT_VERSION,
            n_obs: self.n_obs,
            n_vars: u64::from(self.n_vars),
            nnz: self.nnz,
            dtypes: MatrixDtypes::default(),
            codec: self.options.codec,
            checksum: ChecksumAlgorithm::Xxh3_64,
            files,
            created_by: format!("cpa-stream {}", env!("CARGO_PKG_VERSION")),
            source: self.options.source.clone(),
        };
        let manifest_path = tmp.join(MANIFEST_FILE);
        let mut file = File::create(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
        file.write_all(manifest.to_json().as_bytes()).map_err(|e| Error::io(&manifest_path, e))?;
        file.sync_all().map_err(|e| Error::io(&manifest_path, e))?;
        self.publish()?;
        self.finished = true;
        Ok(manifest)
    }

    fn publish(&self) -> Result<()> {
        publish(&self.tmp, &self.dest, OutputKind::Directory, self.options.overwrite)
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Drop the open writers before removing their files; errors here leave only a
            // temporary directory behind, never a partial store at the destination.
            self.obs = None;
            self.matrix = None;
            self.indptr = None;
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn flush_block(
    tmp: &Path,
    pending: &mut CsrBatch,
    encoder: &mut BlockEncoder,
    blocks: &mut Sink,
    block_index: &mut Sink,
) -> Result<()> {
    let path = tmp.join(StoreFiles::BLOCKS);
    let frame = encoder.encode(pending.indptr(), pending.indices(), pending.data()).map_err(|e| Error::io(&path, e))?;
    write_all(blocks, frame, &path)?;
    let end = blocks.bytes();
    write_all(block_index, &end.to_le_bytes(), &tmp.join(StoreFiles::BLOCK_INDEX))?;
    pending.clear();
    Ok(())
}

fn write_all(sink: &mut Sink, bytes: &[u8], path: &Path) -> Result<()> {
    sink.write_all(bytes).map_err(|e| Error::io(path, e))
}

/// Parquet properties of store tables: zstd, bounded row groups.
pub(crate) fn table_properties(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .build()
}

fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let path = entry.map_err(|e| Error::io(&d, e))?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn relative_name(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// Parquet properties of wide tables (per-gene vectors): zstd, a few rows per row group, no
/// dictionary and byte-stream-split floats on the vector leaves.
pub(crate) fn truth_properties(rows_per_group: usize) -> WriterProperties {
    use parquet::basic::Encoding;
    use parquet::schema::types::ColumnPath;
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(rows_per_group.max(1)));
    for col in [
        cpa_stream_schemas::tables::truth::MEAN,
        cpa_stream_schemas::tables::truth::MEAN_LOG1P,
        cpa_stream_schemas::tables::truth::VAR_LOG1P,
    ] {
        let path = ColumnPath::new(vec![col.to_owned(), "list".to_owned(), "item".to_owned()]);
        builder = builder
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_encoding(path, Encoding::BYTE_STREAM_SPLIT);
    }
    builder.build()
}
