//! The streaming store writer: row chunks in, bounded memory, published atomically.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use cpa_stream_schemas::tables::{check_obs_schema, check_var_schema};
use cpa_stream_schemas::{
    ChecksumAlgorithm, Codec, FileEntry, MANIFEST_FILE, Manifest, MatrixDtypes, STORE_FORMAT, STORE_FORMAT_VERSION,
    STORE_FORMAT_VERSION_APPENDED, StoreFiles, Version,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::blocks::BlockEncoder;
use super::hashing::{HashingWriter, hash_reader};
use super::reader::{Store, is_matrix_file};
use super::splice::{appendix_properties, splice};
use crate::counts_csr::CsrBatch;
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
    Raw {
        indices: Sink,
        data: Sink,
    },
    Zstd {
        blocks: Sink,
        block_index: Sink,
        pending: CsrBatch,
        block_rows: usize,
        encoder: Box<BlockEncoder>,
        /// Bytes of `X/blocks` before this writer's (those of the version appended to).
        base: u64,
    },
}

/// How an append grows the store's `obs` table.
pub enum ObsGrowth<'a> {
    /// The table keeps its bytes and gains the new rows' row groups and a new footer: its
    /// columns stay the same (names, types, whether nullable), their categories may grow.
    Extend,
    /// The table is written again: each of its batches turned into the new obs schema by this
    /// function (columns added, types widened), then the new rows.
    Rewrite(&'a dyn Fn(&RecordBatch) -> Result<RecordBatch>),
}

/// What an appending writer adds to.
struct Base {
    /// The store as opened (its files are the version appended to).
    store: Store,
    /// Where the new obs rows wait to be spliced into the table (`None`: the table is rewritten).
    appendix: Option<PathBuf>,
    /// Bytes of the files that could not be linked and were copied.
    copied: u64,
}

/// What [`StoreWriter::finish`] of an append did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AppendReport {
    /// Cells before the append.
    pub base_cells: u64,
    /// Bytes added to the matrix files.
    pub matrix_bytes: u64,
    /// Bytes of the obs table written: its new rows and footer when extended, all of it when
    /// rewritten.
    pub obs_bytes: u64,
    /// Whether the obs table was rewritten (its columns changed).
    pub obs_rewritten: bool,
    /// Bytes of files copied rather than linked into the new version: matrix files that have
    /// other names (a `cp -al` copy of the store shares them, and would see the append), and
    /// files the file system refused to link.
    pub copied_bytes: u64,
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
    /// An append: the version appended to.
    base: Option<Base>,
    /// Held until the store is published or abandoned (dropped after `Drop::drop`).
    _lock: OutputLock,
}

/// Copies the first `bytes` bytes of `from` into a new file `to` (the kernel's copy where the
/// file system has one); returns the bytes copied.
fn copy_prefix(from: &Path, to: &Path, bytes: u64) -> Result<u64> {
    let source = File::open(from).map_err(|e| Error::io(from, e))?;
    let mut target = File::create(to).map_err(|e| Error::io(to, e))?;
    let copied = std::io::copy(&mut source.take(bytes), &mut target).map_err(|e| Error::io(to, e))?;
    if copied != bytes {
        return Err(Error::corrupt(from, format!("holds {copied} bytes, its manifest says {bytes}")));
    }
    Ok(copied)
}

/// `--overwrite` replaces a store, and only a store: a directory whose manifest opens and which
/// holds nothing the manifest does not list (an empty directory is no output yet and passes
/// [`claim_output`] without this). Anything else (a model, a user's folder, a damaged store) is
/// left for its owner to remove.
fn check_replaceable_store(dest: &Path) -> Result<()> {
    let empty = fs::read_dir(dest).map_err(|e| Error::io(dest, e))?.next().is_none();
    if empty {
        return Ok(());
    }
    let refuse = |why: String| {
        Error::InvalidInput(format!(
            "{}: --overwrite replaces only a store, and this directory is not one ({why}); choose another path, or \
             remove it yourself",
            dest.display()
        ))
    };
    let store = Store::open(dest).map_err(|e| refuse(e.to_string()))?;
    store.check_unlisted_files().map_err(|e| refuse(e.to_string()))
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
        if dest.is_dir() {
            check_replaceable_store(dest)?;
        }
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
            base: None,
            _lock: lock,
        };
        writer.open_files(var)?;
        Ok(writer)
    }

    /// Starts the next version of the store at `dest`, holding its cells and the rows pushed
    /// (whose obs rows have `obs_schema`, the store's own or one that merges it with the new
    /// files'); `obs` says how its obs table grows. The matrix files only grow: each is linked into
    /// the new version and written after its current bytes (an interrupted append's bytes there
    /// removed first), so an append costs the new cells, not the store, and a reader of the
    /// version appended to reads it to the end. [`finish`](StoreWriter::finish) publishes the
    /// new version by the same rename as a new store; until then the store is as it was. The
    /// codec is the store's (`options.codec` must be it).
    pub fn append_to(
        dest: &Path,
        obs_schema: SchemaRef,
        obs: ObsGrowth<'_>,
        options: StoreWriterOptions,
    ) -> Result<StoreWriter> {
        check_obs_schema(&obs_schema).map_err(|e| Error::InvalidInput(format!("obs table: {e}")))?;
        let lock = claim_output(dest, OutputKind::Directory, true)?;
        let store = Store::open(dest)?;
        let manifest = store.manifest().clone();
        if options.codec != manifest.codec {
            return Err(Error::InvalidInput(format!(
                "{}: appending keeps the store's codec ({}); another is a new store (convert, or import without \
                 --append)",
                dest.display(),
                manifest.codec.name()
            )));
        }
        let tmp = temporary_sibling(dest)?;
        fs::create_dir_all(tmp.join("X")).map_err(|e| Error::io(&tmp, e))?;
        let mut writer = StoreWriter {
            dest: dest.to_owned(),
            tmp,
            options,
            n_vars: u32::try_from(manifest.n_vars).unwrap_or(u32::MAX),
            n_obs: manifest.n_obs,
            nnz: manifest.nnz,
            indptr: None,
            matrix: None,
            obs: None,
            obs_schema,
            finished: false,
            base: None,
            _lock: lock,
        };
        let mut copied = 0;
        for (name, entry) in &manifest.files {
            let (from, to) = (dest.join(name), writer.tmp.join(name));
            if name == StoreFiles::OBS {
                continue;
            }
            if is_matrix_file(name) {
                // Written after its current bytes, so only a file this store alone names may be
                // linked: another name of it (`cp -al`, an `rsync --link-dest` snapshot) would
                // see this append's bytes, and its own appends would overwrite them. Such a file
                // is copied, up to this version's bytes.
                let file = fs::OpenOptions::new().write(true).open(&from).map_err(|e| Error::io(&from, e))?;
                let meta = file.metadata().map_err(|e| Error::io(&from, e))?;
                if meta.nlink() > 1 {
                    copied += copy_prefix(&from, &to, entry.bytes)?;
                    continue;
                }
                // Bytes after this version's: an interrupted append's, read by no version.
                if meta.len() > entry.bytes {
                    file.set_len(entry.bytes).map_err(|e| Error::io(&from, e))?;
                }
            }
            if fs::hard_link(&from, &to).is_err() {
                copied += fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
            }
        }
        let append = |name: &str| -> Result<Sink> {
            let path = writer.tmp.join(name);
            let file = fs::OpenOptions::new().append(true).open(&path).map_err(|e| Error::io(&path, e))?;
            Ok(HashingWriter::new(BufWriter::with_capacity(FILE_BUFFER_BYTES, file)))
        };
        writer.indptr = Some(append(StoreFiles::INDPTR)?);
        writer.matrix = Some(match manifest.codec {
            Codec::Raw => MatrixSink::Raw { indices: append(StoreFiles::INDICES)?, data: append(StoreFiles::DATA)? },
            Codec::Zstd { level, block_rows, planes, block_checksum } => {
                let encoder = BlockEncoder::new(level, planes, block_checksum)
                    .map_err(|e| Error::io(writer.tmp.join(StoreFiles::BLOCKS), e))?;
                MatrixSink::Zstd {
                    blocks: append(StoreFiles::BLOCKS)?,
                    block_index: append(StoreFiles::BLOCK_INDEX)?,
                    pending: CsrBatch::new(writer.n_vars),
                    block_rows: block_rows as usize,
                    encoder: Box::new(encoder),
                    base: manifest.files.get(StoreFiles::BLOCKS).map_or(0, |e| e.bytes),
                }
            }
        });
        let props = table_properties(writer.options.obs_row_group_rows);
        let appendix = match obs {
            ObsGrowth::Extend => {
                let path = writer.tmp.join(".obs-appended.parquet");
                let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
                let props = appendix_properties(props);
                writer.obs = Some(
                    ArrowWriter::try_new(file, Arc::clone(&writer.obs_schema), Some(props))
                        .map_err(|e| Error::parquet(&path, e))?,
                );
                Some(path)
            }
            ObsGrowth::Rewrite(adapt) => {
                let path = writer.tmp.join(StoreFiles::OBS);
                let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
                let mut table = ArrowWriter::try_new(file, Arc::clone(&writer.obs_schema), Some(props))
                    .map_err(|e| Error::parquet(&path, e))?;
                for batch in store.table(StoreFiles::OBS)? {
                    table.write(&adapt(&batch?)?).map_err(|e| Error::parquet(&path, e))?;
                }
                writer.obs = Some(table);
                None
            }
        };
        writer.base = Some(Base { store, appendix, copied });
        Ok(writer)
    }

    /// [`finish`](StoreWriter::finish), and what it did of an append (`None` for a new store).
    pub fn finish_report(self) -> Result<(Manifest, Option<AppendReport>)> {
        let mut report = None;
        let manifest = self.finish_with(&mut report)?;
        Ok((manifest, report))
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
                    base: 0,
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
            Some(MatrixSink::Zstd { blocks, block_index, pending, block_rows, encoder, base }) => {
                for r in 0..rows.n_rows() {
                    let (i, d) = rows.row(r);
                    pending.push_row(i, d);
                    if pending.n_rows() == *block_rows {
                        flush_block(tmp, pending, encoder, (blocks, *base), block_index)?;
                    }
                }
            }
            None => return Err(Error::InvalidInput("writer already finished".to_owned())),
        }
        self.n_obs += rows.n_rows() as u64;
        self.nnz += rows.nnz() as u64;
        Ok(())
    }

    /// Writes the manifest and publishes the store at its destination (of an append: its next
    /// version). Returns the manifest.
    pub fn finish(self) -> Result<Manifest> {
        self.finish_with(&mut None)
    }

    fn finish_with(mut self, appended: &mut Option<AppendReport>) -> Result<Manifest> {
        let tmp = self.tmp.clone();
        let base = self.base.take();
        let before = base.as_ref().map(|b| b.store.manifest().clone());
        let mut files = BTreeMap::new();
        let mut matrix_bytes = 0;
        let mut close = |name: &str, sink: Sink| -> Result<()> {
            let path = tmp.join(name);
            let (buf, bytes, checksum) = sink.finish().map_err(|e| Error::io(&path, e))?;
            let file = buf.into_inner().map_err(|e| Error::io(&path, e.into_error()))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
            let earlier = before.as_ref().and_then(|m| m.files.get(name));
            let entry = match earlier {
                // An append that added nothing to this file: the entry of the version before.
                Some(earlier) if bytes == 0 => earlier.clone(),
                Some(earlier) => FileEntry { bytes: earlier.bytes + bytes, checksum, from: earlier.bytes },
                None => FileEntry::whole(bytes, checksum),
            };
            matrix_bytes += bytes;
            files.insert(name.to_owned(), entry);
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
            Some(MatrixSink::Zstd { mut blocks, mut block_index, mut pending, mut encoder, base, .. }) => {
                if !pending.is_empty() {
                    flush_block(&tmp, &mut pending, &mut encoder, (&mut blocks, base), &mut block_index)?;
                }
                close(StoreFiles::BLOCKS, blocks)?;
                close(StoreFiles::BLOCK_INDEX, block_index)?;
            }
            None => {}
        }
        if let Some(obs) = self.obs.take() {
            let path = base.as_ref().and_then(|b| b.appendix.clone()).unwrap_or_else(|| tmp.join(StoreFiles::OBS));
            let file = obs.into_inner().map_err(|e| Error::parquet(&path, e))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        let mut report = None;
        if let (Some(base), Some(before)) = (&base, &before) {
            let obs = self.grow_obs(base, before, &mut files)?;
            report = Some(AppendReport {
                base_cells: before.n_obs,
                matrix_bytes,
                obs_bytes: obs,
                obs_rewritten: base.appendix.is_none(),
                copied_bytes: base.copied,
            });
            // The files the append did not touch (var, DEGs, truth): linked, as they were.
            for (name, entry) in &before.files {
                if name != StoreFiles::OBS {
                    files.entry(name.clone()).or_insert_with(|| entry.clone());
                }
            }
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
            files.insert(rel, FileEntry::whole(bytes, checksum));
        }
        let (history, block_runs) = match &before {
            Some(before) => self.history(before, report.as_ref().is_some_and(|r| r.obs_rewritten)),
            None => (Vec::new(), Vec::new()),
        };
        let manifest = Manifest {
            format: STORE_FORMAT.to_owned(),
            version: if history.is_empty() { STORE_FORMAT_VERSION } else { STORE_FORMAT_VERSION_APPENDED },
            n_obs: self.n_obs,
            n_vars: u64::from(self.n_vars),
            nnz: self.nnz,
            dtypes: MatrixDtypes::default(),
            codec: self.options.codec,
            checksum: ChecksumAlgorithm::Xxh3_64,
            files,
            created_by: format!("cpa-stream {}", env!("CARGO_PKG_VERSION")),
            source: self.options.source.clone(),
            block_runs,
            history,
        };
        manifest.validate().map_err(|source| Error::Manifest { path: tmp.join(MANIFEST_FILE), source })?;
        let manifest_path = tmp.join(MANIFEST_FILE);
        let mut file = File::create(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
        file.write_all(manifest.to_json().as_bytes()).map_err(|e| Error::io(&manifest_path, e))?;
        file.sync_all().map_err(|e| Error::io(&manifest_path, e))?;
        // The version appended to stays open until the new one is in its place.
        self.publish()?;
        drop(base);
        self.finished = true;
        *appended = report;
        Ok(manifest)
    }

    /// The obs table of an append: the old table with the new rows spliced in (or, rewritten,
    /// as written); its entry goes into `files`. Returns the bytes written.
    fn grow_obs(&self, base: &Base, before: &Manifest, files: &mut BTreeMap<String, FileEntry>) -> Result<u64> {
        let path = self.tmp.join(StoreFiles::OBS);
        let Some(appendix) = &base.appendix else {
            return Ok(fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len());
        };
        let old_len = before.files.get(StoreFiles::OBS).map_or(0, |e| e.bytes);
        let old = base.store.open_file(StoreFiles::OBS)?;
        let new = File::open(appendix).map_err(|e| Error::io(appendix, e))?;
        let mut out = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let old_path = self.dest.join(StoreFiles::OBS);
        let len = splice((&old_path, &old, old_len), (appendix, &new), (&path, &mut out))?;
        out.sync_all().map_err(|e| Error::io(&path, e))?;
        fs::remove_file(appendix).map_err(|e| Error::io(appendix, e))?;
        // The checksum of what follows the old table's bytes, which its old entry checks.
        let mut read = File::open(&path).map_err(|e| Error::io(&path, e))?;
        std::io::Seek::seek(&mut read, std::io::SeekFrom::Start(old_len)).map_err(|e| Error::io(&path, e))?;
        let (added, checksum) = hash_reader(std::io::BufReader::new(read)).map_err(|e| Error::io(&path, e))?;
        files.insert(StoreFiles::OBS.to_owned(), FileEntry { bytes: len, checksum, from: old_len });
        Ok(added)
    }

    /// The history of the new version (the one appended to added to it; where the obs table was
    /// rewritten, the earlier versions' obs entries, which no longer check anything, left out)
    /// and its block runs (a run starts where the version appended to left its last block not
    /// full).
    fn history(&self, before: &Manifest, obs_rewritten: bool) -> (Vec<Version>, Vec<[u64; 2]>) {
        let mut history = before.history.clone();
        history.push(Version {
            n_obs: before.n_obs,
            nnz: before.nnz,
            files: before.files.clone(),
            created_by: before.created_by.clone(),
            source: before.source.clone(),
        });
        if obs_rewritten {
            for version in &mut history {
                version.files.remove(StoreFiles::OBS);
            }
        }
        let mut runs = before.block_runs.clone();
        if let Codec::Zstd { block_rows, .. } = before.codec {
            let [row, _] = before.runs().last().copied().unwrap_or([0, 0]);
            let partial = !(before.n_obs - row).is_multiple_of(u64::from(block_rows));
            if partial && self.n_obs > before.n_obs {
                runs.push([before.n_obs, before.n_blocks()]);
            }
        }
        (history, runs)
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
            // An abandoned append: the matrix files (shared with the version appended to) back
            // to that version's bytes. A kill leaves them longer, which is harmless (see
            // `append_to`).
            if let Some(base) = &self.base {
                for (name, entry) in &base.store.manifest().files {
                    if is_matrix_file(name)
                        && let Ok(file) = fs::OpenOptions::new().write(true).open(self.dest.join(name))
                    {
                        let _ = file.set_len(entry.bytes);
                    }
                }
            }
        }
    }
}

/// Encodes the pending rows as one block after the `base` bytes of `X/blocks` written before
/// this writer, and records where it ends.
fn flush_block(
    tmp: &Path,
    pending: &mut CsrBatch,
    encoder: &mut BlockEncoder,
    (blocks, base): (&mut Sink, u64),
    block_index: &mut Sink,
) -> Result<()> {
    let path = tmp.join(StoreFiles::BLOCKS);
    let frame = encoder.encode(pending.indptr(), pending.indices(), pending.data()).map_err(|e| Error::io(&path, e))?;
    write_all(blocks, frame, &path)?;
    let end = base + blocks.bytes();
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
