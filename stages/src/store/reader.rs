//! The validated, memory-mapped store reader.

use std::collections::HashMap;
use std::fs::{self, File};
use std::ops::Range;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use cpa_stream_schemas::tables::check_obs_schema;
use cpa_stream_schemas::{BlockChecksum, Codec, MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, Planes, StoreFiles};
use memmap2::Advice;
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::block_map::BlockMap;
use super::blocks::{BlockDecoder, CompactBlock};
use super::mmap::{MappedFile, prefetch};
use crate::counts_csr::{CsrBatch, check_row};
use crate::error::{Error, Result};

/// Access pattern hints for the matrix maps (`madvise`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No particular pattern: the kernel's default read-around.
    Normal,
    /// Rows are read front to back: read ahead aggressively.
    Sequential,
    /// Rows are read in random order: no read-ahead.
    Random,
    /// The whole matrix will be needed soon: start reading it in.
    WillNeed,
}

enum Matrix {
    Raw { indices: MappedFile, data: MappedFile },
    Zstd { blocks: MappedFile, block_index: MappedFile, map: BlockMap, planes: Planes, block_checksum: BlockChecksum },
}

/// An open, validated store. `Send + Sync`: share one `&Store` between worker threads, each with
/// its own [`RowCursor`].
///
/// Opening checks the manifest (format, version, fields), that every file exists with the size
/// the manifest records and the size the shape implies, that `X/indptr` starts at 0, never
/// decreases and ends at `nnz`, and that `obs`/`var` have `n_obs`/`n_vars` rows. Column indices
/// are checked on demand ([`check_indices`](Store::check_indices)) and on every zstd block
/// decode; checksums by [`verify`](Store::verify).
///
/// A store of three cells written and read back:
///
/// ```
/// use std::sync::Arc;
///
/// use arrow_array::{RecordBatch, StringArray};
/// use arrow_schema::{DataType, Field, Schema};
/// use cpa_stream_stages::CsrBatch;
/// use cpa_stream_stages::store::{Store, StoreWriter, StoreWriterOptions};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tiny.store");
/// let ids = |name: &str, values: &[&str]| {
///     let schema = Arc::new(Schema::new(vec![Field::new(name, DataType::Utf8, false)]));
///     RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(values.to_vec()))])
/// };
/// let var = ids("gene_id", &["g0", "g1", "g2", "g3"])?;
/// let obs = ids("cell_id", &["a", "b", "c"])?;
/// let mut writer = StoreWriter::create(&path, &var, obs.schema(), StoreWriterOptions::default())?;
/// let mut rows = CsrBatch::new(4);
/// rows.push_row(&[0, 3], &[1.0, 5.0]);
/// rows.push_row(&[], &[]);
/// rows.push_row(&[2], &[7.0]);
/// writer.push_rows(&rows, &obs)?;
/// writer.finish()?;
///
/// let store = Store::open(&path)?;
/// assert_eq!((store.n_obs(), store.n_vars(), store.nnz()), (3, 4, 3));
/// let mut cursor = store.cursor()?;
/// let (genes, counts) = cursor.row(0)?;
/// assert_eq!((genes, counts), (&[0u32, 3][..], &[1.0f32, 5.0][..]));
/// let mut batch = CsrBatch::new(4);
/// cursor.gather(&[2, 0], &mut batch)?; // any rows, in the order asked
/// assert_eq!(batch.row(0), (&[2u32][..], &[7.0f32][..]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Store {
    dir: PathBuf,
    manifest: Manifest,
    /// Every file the manifest lists, opened when the store was (through one handle on its
    /// directory): what is read later comes from these, so a store replaced meanwhile (`convert
    /// --overwrite`, an import over it) is never read half old, half new.
    files: HashMap<String, File>,
    /// The directory they were opened in (listed by `verify`).
    directory: File,
    indptr: MappedFile,
    matrix: Matrix,
}

/// Rows of a raw store borrowed from the maps without copying.
#[derive(Debug, Clone, Copy)]
pub struct CsrView<'a> {
    /// `rows.len() + 1` absolute offsets into the store's entries.
    pub indptr: &'a [u64],
    /// Column indices of entries `indptr[0]..indptr[last]`.
    pub indices: &'a [u32],
    /// Values of the same entries.
    pub data: &'a [f32],
}

impl<'a> CsrView<'a> {
    /// Rows in the view.
    pub fn n_rows(&self) -> usize {
        self.indptr.len() - 1
    }

    /// Entries in the view.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Row `i` (relative to the view).
    pub fn row(&self, i: usize) -> (&'a [u32], &'a [f32]) {
        let base = self.indptr[0];
        let (s, e) = ((self.indptr[i] - base) as usize, (self.indptr[i + 1] - base) as usize);
        (&self.indices[s..e], &self.data[s..e])
    }
}

/// The manifest's text: a regular file of at most [`MAX_MANIFEST_BYTES`] (a link to a device
/// or a huge file is refused before it is read).
fn read_manifest(path: &Path, file: File) -> Result<String> {
    use std::io::Read as _;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::corrupt(path, "not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_MANIFEST_BYTES + 1).read_to_string(&mut text).map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(Error::corrupt(path, format!("larger than {MAX_MANIFEST_BYTES} bytes; not a store manifest")));
    }
    Ok(text)
}

/// The store directory, opened once: every file of one store is opened relative to it, so all
/// come from the same directory even if another takes its name meanwhile.
fn open_directory(dir: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(dir).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::ENOTDIR) => Error::InvalidInput(format!("{}: not a store directory", dir.display())),
            // A store is its manifest: say which file is missing, as reading it would.
            Some(libc::ENOENT) => Error::io(dir.join(MANIFEST_FILE), e),
            _ => Error::io(dir, e),
        }
    })
}

/// Opens `name` (a manifest name, checked to stay inside the store) relative to the directory
/// `dir` (at `dir_path`), without blocking on a FIFO; it must be a regular file.
fn open_in(dir: &File, dir_path: &Path, name: &str) -> Result<File> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::io::{AsRawFd as _, FromRawFd as _};
    let path = dir_path.join(name);
    let c_name = std::ffi::CString::new(std::ffi::OsStr::new(name).as_bytes())
        .map_err(|_| Error::corrupt(&path, "a NUL byte in a file name"))?;
    // SAFETY: openat on a live directory descriptor with a NUL-terminated name; the returned
    // descriptor is owned by the File made from it, exactly once.
    let fd =
        unsafe { libc::openat(dir.as_raw_fd(), c_name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(Error::io(&path, std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    let meta = file.metadata().map_err(|e| Error::io(&path, e))?;
    if !meta.is_file() {
        return Err(Error::corrupt(&path, "not a regular file"));
    }
    Ok(file)
}

impl Store {
    /// Opens and validates the store at `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
        let dir = dir.as_ref().to_owned();
        let handle = open_directory(&dir)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = read_manifest(&manifest_path, open_in(&handle, &dir, MANIFEST_FILE)?)?;
        let manifest =
            Manifest::from_json(&text).map_err(|source| Error::Manifest { path: manifest_path.clone(), source })?;
        let mut files = HashMap::with_capacity(manifest.files.len());
        for (name, entry) in &manifest.files {
            let file = open_in(&handle, &dir, name)?;
            let actual = file.metadata().map_err(|e| Error::io(dir.join(name), e))?.len();
            // A matrix file may hold more than this version's bytes: those of an append that a
            // kill interrupted, which nothing reads (the next append removes them).
            let grows = is_matrix_file(name) && actual > entry.bytes;
            if actual != entry.bytes && !grows {
                return Err(Error::SizeMismatch {
                    path: dir.join(name),
                    what: "file size in bytes".to_owned(),
                    expected: entry.bytes,
                    actual,
                });
            }
            files.insert(name.clone(), file);
        }
        let map = |name: &str, expected: Option<u64>| -> Result<MappedFile> {
            let path = dir.join(name);
            let opened =
                files.get(name).ok_or_else(|| Error::corrupt(&manifest_path, format!("no entry for {name}")))?;
            let bytes = manifest.files.get(name).map_or(0, |e| e.bytes);
            // SAFETY: store files are published once and only ever grow after the bytes a
            // version reads (see `MappedFile::map`); a store that another process rewrites in
            // place while open is misuse.
            let file = unsafe { MappedFile::map(opened, &path, bytes) }?;
            if let Some(expected) = expected
                && file.len() != expected
            {
                return Err(Error::SizeMismatch {
                    path,
                    what: "file size in bytes (from the manifest's shape)".to_owned(),
                    expected,
                    actual: file.len(),
                });
            }
            Ok(file)
        };
        // Sizes implied by the shape; a manifest whose counts overflow them is rejected.
        let bytes_of = |count: u64, width: u64, what: &str| -> Result<u64> {
            count.checked_mul(width).ok_or_else(|| {
                Error::corrupt(&manifest_path, format!("{what} = {count} is too large for this platform"))
            })
        };
        let indptr_bytes = bytes_of(manifest.n_obs.saturating_add(1), 8, "n_obs")?;
        let entry_bytes = bytes_of(manifest.nnz, 4, "nnz")?;
        let indptr = map(StoreFiles::INDPTR, Some(indptr_bytes))?;
        let matrix = match manifest.codec {
            Codec::Raw => Matrix::Raw {
                indices: map(StoreFiles::INDICES, Some(entry_bytes))?,
                data: map(StoreFiles::DATA, Some(entry_bytes))?,
            },
            Codec::Zstd { block_rows, planes, block_checksum, .. } => Matrix::Zstd {
                blocks: map(StoreFiles::BLOCKS, None)?,
                block_index: map(
                    StoreFiles::BLOCK_INDEX,
                    Some(bytes_of(manifest.n_blocks().saturating_add(1), 8, "blocks")?),
                )?,
                map: BlockMap::new(u64::from(block_rows), manifest.n_obs, manifest.runs()),
                planes,
                block_checksum,
            },
        };
        let store = Store { dir, manifest, files, directory: handle, indptr, matrix };
        store.check_offsets()?;
        store.check_tables()?;
        Ok(store)
    }

    fn check_offsets(&self) -> Result<()> {
        let path = self.dir.join(StoreFiles::INDPTR);
        // Where the file system keeps runs of zeros as holes (empty rows written sparsely), the
        // check reads only the stored bytes: a hole is zeros, valid where no offset before it is
        // above zero.
        let extents = self.files.get(StoreFiles::INDPTR).and_then(|f| data_extents(f, self.indptr.len()));
        match extents {
            Some(extents) => check_monotone_extents(&path, self.indptr(), &extents, self.manifest.nnz, "row", "nnz")?,
            None => check_monotone(&path, self.indptr(), self.manifest.nnz, "row", "nnz")?,
        }
        if let Matrix::Zstd { blocks, block_index, .. } = &self.matrix {
            let offsets = block_index
                .as_slice::<u64>()
                .ok_or_else(|| Error::corrupt(self.dir.join(StoreFiles::BLOCK_INDEX), "not an array of u64"))?;
            check_monotone(
                &self.dir.join(StoreFiles::BLOCK_INDEX),
                offsets,
                blocks.len(),
                "block",
                "the size of X/blocks",
            )?;
        }
        Ok(())
    }

    fn check_tables(&self) -> Result<()> {
        for (name, expected, what) in [
            (StoreFiles::OBS, self.manifest.n_obs, "rows (n_obs)"),
            (StoreFiles::VAR, self.manifest.n_vars, "rows (n_vars)"),
        ] {
            let path = self.dir.join(name);
            let file = self.open_file(name)?;
            let actual = super::tables::guarded(&path, || {
                let reader = SerializedFileReader::new(file).map_err(|e| Error::parquet(&path, e))?;
                Ok(reader.metadata().file_metadata().num_rows())
            })?;
            if actual < 0 || actual as u64 != expected {
                return Err(Error::SizeMismatch { path, what: what.to_owned(), expected, actual: actual as u64 });
            }
        }
        let schema = super::tables::table_schema_of(&self.dir.join(StoreFiles::OBS), self.open_file(StoreFiles::OBS)?)?;
        check_obs_schema(&schema).map_err(|e| Error::corrupt(self.dir.join(StoreFiles::OBS), e.0))?;
        Ok(())
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Number of cells (rows).
    pub fn n_obs(&self) -> u64 {
        self.manifest.n_obs
    }

    /// Number of genes (columns).
    pub fn n_vars(&self) -> u64 {
        self.manifest.n_vars
    }

    /// Number of stored entries.
    pub fn nnz(&self) -> u64 {
        self.manifest.nnz
    }

    /// Row offsets, `n_obs + 1` entries.
    pub fn indptr(&self) -> &[u64] {
        // Size checked at open: (n_obs + 1) * 8 bytes of a page-aligned map.
        self.indptr.as_slice().unwrap_or(&[0])
    }

    /// Path of a file of the store, for messages; read the file through
    /// [`open_file`](Store::open_file), which gives this version of the store.
    pub fn file_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The directory the store's files were opened in, as a path that still leads to it if
    /// another directory has since taken the store's name (for listing it).
    pub(crate) fn opened_directory(&self) -> PathBuf {
        use std::os::unix::io::AsRawFd as _;
        PathBuf::from(format!("/proc/self/fd/{}", self.directory.as_raw_fd()))
    }

    /// Whether the manifest lists file `name` (`truth.parquet`, `degs.parquet`, ...).
    pub fn has_file(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    /// A new handle (its own read position) on file `name` as it was when the store was opened,
    /// even if the store has since been replaced or removed.
    pub fn open_file(&self, name: &str) -> Result<File> {
        use std::os::unix::io::AsRawFd as _;
        let path = self.dir.join(name);
        let held = self.files.get(name).ok_or_else(|| {
            Error::InvalidInput(format!("{}: not a file of this store (its manifest does not list it)", path.display()))
        })?;
        // The process's link to the open file opens that same file (not whatever now has its name).
        File::open(format!("/proc/self/fd/{}", held.as_raw_fd())).map_err(|e| Error::io(&path, e))
    }

    /// Streams table `name` of the store (`obs.parquet`, `var.parquet`, ...) in batches.
    pub fn table(&self, name: &str) -> Result<impl Iterator<Item = Result<RecordBatch>> + use<>> {
        super::tables::read_table_of(&self.dir.join(name), self.open_file(name)?)
    }

    /// Table `name` whole, as one batch (for small tables: `var`, DEG lists).
    pub fn small_table(&self, name: &str) -> Result<RecordBatch> {
        let path = self.dir.join(name);
        let schema = self.table_schema(name)?;
        let batches = self.table(name)?.collect::<Result<Vec<_>>>()?;
        arrow_select::concat::concat_batches(&schema, &batches).map_err(|e| Error::arrow(path.display().to_string(), e))
    }

    /// The Arrow schema of table `name` of the store.
    pub fn table_schema(&self, name: &str) -> Result<arrow_schema::SchemaRef> {
        super::tables::table_schema_of(&self.dir.join(name), self.open_file(name)?)
    }

    /// Rows `rows` without copying; `None` for a compressed store (use a [`RowCursor`]).
    pub fn raw_rows(&self, rows: Range<u64>) -> Option<CsrView<'_>> {
        let Matrix::Raw { indices, data } = &self.matrix else { return None };
        let indptr = self.indptr().get(rows.start as usize..=rows.end as usize)?;
        let (s, e) = (indptr[0] as usize, indptr[indptr.len() - 1] as usize);
        Some(CsrView {
            indptr,
            indices: indices.as_slice::<u32>()?.get(s..e)?,
            data: data.as_slice::<f32>()?.get(s..e)?,
        })
    }

    /// A reader of rows for one thread.
    pub fn cursor(&self) -> Result<RowCursor<'_>> {
        RowCursor::new(self)
    }

    /// Hints the kernel how the matrix will be read.
    pub fn advise(&self, access: Access) {
        let advice = match access {
            Access::Normal => Advice::Normal,
            Access::Sequential => Advice::Sequential,
            Access::Random => Advice::Random,
            Access::WillNeed => Advice::WillNeed,
        };
        self.indptr.advise(advice);
        match &self.matrix {
            Matrix::Raw { indices, data } => {
                indices.advise(advice);
                data.advise(advice);
            }
            Matrix::Zstd { blocks, .. } => blocks.advise(advice),
        }
    }

    /// Drops the mapped pages of `rows` from this process's resident set (they stay in the page
    /// cache). Streaming readers call this on consumed ranges so that RSS does not creep.
    pub fn release(&self, rows: Range<u64>) {
        let indptr = self.indptr();
        let end_row = (rows.end as usize).min(indptr.len() - 1);
        let start_row = (rows.start as usize).min(end_row);
        match &self.matrix {
            Matrix::Raw { indices, data } => {
                let (s, e) = (indptr[start_row] as usize * 4, indptr[end_row] as usize * 4);
                indices.release(s..e);
                data.release(s..e);
            }
            Matrix::Zstd { blocks, block_index, map, .. } => {
                let offsets = block_index.as_slice::<u64>().unwrap_or(&[]);
                let within = map.blocks_within(start_row as u64..end_row as u64);
                let (first, last) = (within.start as usize, within.end as usize);
                if first < last && last < offsets.len() {
                    blocks.release(offsets[first] as usize..offsets[last] as usize);
                }
            }
        }
        self.indptr.release(start_row * 8..end_row * 8);
    }

    /// Rows per compressed block (the last of a run may hold fewer); `None` for a raw store.
    pub fn block_rows(&self) -> Option<u64> {
        self.block_map().map(BlockMap::block_rows)
    }

    /// Which block holds which rows; `None` for a raw store.
    pub fn block_map(&self) -> Option<&BlockMap> {
        match &self.matrix {
            Matrix::Raw { .. } => None,
            Matrix::Zstd { map, .. } => Some(map),
        }
    }

    /// Compressed blocks of the store (0 for a raw store).
    pub fn n_blocks(&self) -> u64 {
        self.block_map().map_or(0, BlockMap::n_blocks)
    }

    /// Entries of block `b` of a zstd store (0 for a raw store or a block past the end): what
    /// its decode fills.
    pub(crate) fn block_entries(&self, b: u64) -> usize {
        let Some(map) = self.block_map() else { return 0 };
        let indptr = self.indptr();
        let rows = map.rows_of(b);
        let (start, end) = (rows.start as usize, rows.end as usize);
        match (indptr.get(start), indptr.get(end)) {
            (Some(&s), Some(&e)) => usize::try_from(e.saturating_sub(s)).unwrap_or(0),
            _ => 0,
        }
    }

    /// Block `b`'s compressed bytes, the offsets of its rows (absolute; one more than rows) and
    /// its first and end rows.
    fn block_parts(&self, b: u64) -> Result<(&[u8], &[u64], u64, u64)> {
        let Matrix::Zstd { blocks, block_index, map, .. } = &self.matrix else {
            return Err(Error::InvalidInput(format!("{}: a raw store has no blocks", self.dir.display())));
        };
        let offsets = block_index.as_slice::<u64>().unwrap_or(&[]);
        let Range { start, end } = map.rows_of(b);
        let (s, e) = match (offsets.get(b as usize), offsets.get(b as usize + 1)) {
            (Some(&s), Some(&e)) if start < end => (s as usize, e as usize),
            _ => {
                let path = self.dir.join(StoreFiles::BLOCKS);
                return Err(Error::corrupt(&path, format!("no block {b} (rows from {start})")));
            }
        };
        Ok((&blocks.bytes()[s..e], &self.indptr()[start as usize..=end as usize], start, end))
    }

    /// Decodes block `b` into `indices` and `data`; returns the store offset of its first entry.
    pub(crate) fn decode_block(
        &self,
        b: u64,
        decoder: &mut BlockDecoder,
        indices: &mut Vec<u32>,
        data: &mut Vec<f32>,
    ) -> Result<u64> {
        let (bytes, indptr, start, end) = self.block_parts(b)?;
        decoder.decode(bytes, indptr, self.n_vars(), indices, data).map_err(|reason| {
            Error::corrupt(self.dir.join(StoreFiles::BLOCKS), format!("block {b} (rows {start}..{end}): {reason}"))
        })?;
        Ok(indptr[0])
    }

    /// Decodes block `b` into its compact form; returns the store offset of its first entry.
    pub(crate) fn decode_block_compact(
        &self,
        b: u64,
        decoder: &mut BlockDecoder,
        out: &mut CompactBlock,
    ) -> Result<u64> {
        let (bytes, indptr, start, end) = self.block_parts(b)?;
        decoder.decode_compact(bytes, indptr, self.n_vars(), out).map_err(|reason| {
            Error::corrupt(self.dir.join(StoreFiles::BLOCKS), format!("block {b} (rows {start}..{end}): {reason}"))
        })?;
        Ok(indptr[0])
    }

    /// Drops the matrix files (and `X/indptr`) from the page cache as far as the kernel allows,
    /// so that the next reads come from the disk: this process's mapped pages first (a mapped page
    /// cannot be evicted), then `posix_fadvise(DONTNEED)` on each file. Pages that other
    /// processes map, and dirty pages, stay. Returns the bytes of the files advised. For
    /// benchmarks of a cold start (`bench loader --cold`).
    pub fn evict_from_page_cache(&self) -> Result<u64> {
        use std::os::fd::AsRawFd as _;
        let mut bytes = 0;
        let maps: Vec<&MappedFile> = match &self.matrix {
            Matrix::Raw { indices, data } => vec![&self.indptr, indices, data],
            Matrix::Zstd { blocks, block_index, .. } => vec![&self.indptr, blocks, block_index],
        };
        for map in &maps {
            map.release(0..map.bytes().len());
        }
        for (name, map_bytes) in self.raw_maps() {
            let path = self.dir.join(name);
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: posix_fadvise only takes a descriptor that `file` keeps open and plain
            // integers; it changes no memory of this process.
            let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                return Err(Error::io(&path, std::io::Error::from_raw_os_error(rc)));
            }
            bytes += map_bytes.len() as u64;
        }
        Ok(bytes)
    }

    /// The names of the matrix files and `X/indptr` (see [`file_path`](Store::file_path)).
    pub fn matrix_files(&self) -> Vec<&'static str> {
        self.raw_maps().into_iter().map(|(name, _)| name).collect()
    }

    /// Bytes of the matrix files and `X/indptr`: what a pass over every cell reads from disk.
    pub fn matrix_bytes(&self) -> u64 {
        self.raw_maps().iter().map(|(_, b)| b.len() as u64).sum()
    }

    /// Checks every column index (`< n_vars`, strictly increasing within rows). Reads the whole
    /// matrix; the error names the file and row.
    pub fn check_indices(&self) -> Result<()> {
        let n_vars = self.n_vars();
        match &self.matrix {
            Matrix::Raw { .. } => {
                let path = self.dir.join(StoreFiles::INDICES);
                let chunk = 65_536u64;
                let mut start = 0;
                while start < self.n_obs() {
                    let end = (start + chunk).min(self.n_obs());
                    let view =
                        self.raw_rows(start..end).ok_or_else(|| Error::corrupt(&path, "unreadable row range"))?;
                    for r in 0..view.n_rows() {
                        let (indices, data) = view.row(r);
                        check_row(indices, data, n_vars as u32)
                            .map_err(|e| Error::corrupt(&path, format!("row {}{e}", start + r as u64)))?;
                    }
                    start = end;
                }
                Ok(())
            }
            Matrix::Zstd { map, .. } => {
                let mut cursor = self.cursor()?;
                for b in 0..map.n_blocks() {
                    cursor.load_block(map.rows_of(b).start)?;
                }
                Ok(())
            }
        }
    }

    pub(crate) fn raw_maps(&self) -> Vec<(&'static str, &[u8])> {
        let mut out = vec![(StoreFiles::INDPTR, self.indptr.bytes())];
        match &self.matrix {
            Matrix::Raw { indices, data } => {
                out.push((StoreFiles::INDICES, indices.bytes()));
                out.push((StoreFiles::DATA, data.bytes()));
            }
            Matrix::Zstd { blocks, block_index, .. } => {
                out.push((StoreFiles::BLOCKS, blocks.bytes()));
                out.push((StoreFiles::BLOCK_INDEX, block_index.bytes()));
            }
        }
        out
    }
}

/// Whether `name` is one of the matrix's files, which appends grow (`X/...`).
pub(crate) fn is_matrix_file(name: &str) -> bool {
    [StoreFiles::INDPTR, StoreFiles::INDICES, StoreFiles::DATA, StoreFiles::BLOCKS, StoreFiles::BLOCK_INDEX]
        .contains(&name)
}

/// The byte ranges of the first `len` bytes of `file` that the file system stores (the rest are
/// holes, read as zeros), from `SEEK_DATA`/`SEEK_HOLE`; `None` where it cannot tell, or where the
/// file is small enough to read whole anyway.
fn data_extents(file: &File, len: u64) -> Option<Vec<Range<u64>>> {
    use std::os::unix::io::AsRawFd as _;
    const WORTH_IT: u64 = 64 << 20;
    if len < WORTH_IT {
        return None;
    }
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut at = 0u64;
    while at < len {
        // SAFETY: lseek on a descriptor this store holds open; it only moves that descriptor's
        // offset, which nothing else uses (files are read through maps and `open_file`'s new
        // descriptions).
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            return match std::io::Error::last_os_error().raw_os_error() {
                // No data after `at`: the rest is a hole.
                Some(libc::ENXIO) => Some(extents),
                _ => None,
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let (start, end) = ((data as u64).min(len), (hole as u64).min(len));
        if start < end {
            extents.push(start..end);
        }
        at = end.max(at + 1);
    }
    Some(extents)
}

/// [`check_monotone`] of offsets of which only the bytes `extents` are stored (in order); the
/// others are zeros.
fn check_monotone_extents(
    path: &Path,
    offsets: &[u64],
    extents: &[Range<u64>],
    end: u64,
    unit: &str,
    end_name: &str,
) -> Result<()> {
    // Whole offsets: the element an extent starts in and the one it ends in (holes are
    // block-aligned, so this is exact but at a file's very end).
    let mut last = 0u64;
    let mut next = 0usize;
    for extent in extents {
        let (from, to) = ((extent.start / 8) as usize, (extent.end.div_ceil(8) as usize).min(offsets.len()));
        if from > next && last > 0 {
            return Err(Error::corrupt(
                path,
                format!("offsets decrease at {unit} {} ({last} then 0), expected non-decreasing", next.max(1) - 1),
            ));
        }
        let part = &offsets[from.min(to)..to];
        if from == 0 && part.first().is_some_and(|&v| v != 0) {
            return Err(Error::corrupt(path, format!("first offset is {:?}, expected 0", part.first())));
        }
        if from > next {
            last = 0;
        }
        let decrease = match part.first() {
            Some(&first) if first < last => Some((from.saturating_sub(1), last, first)),
            _ => part.windows(2).position(|w| w[1] < w[0]).map(|i| (from + i, part[i], part[i + 1])),
        };
        if let Some((at, a, b)) = decrease {
            return Err(Error::corrupt(
                path,
                format!("offsets decrease at {unit} {at} ({a} then {b}), expected non-decreasing"),
            ));
        }
        last = part.last().copied().unwrap_or(last);
        next = to;
    }
    if next < offsets.len() {
        // A hole at the end: zeros after the last stored offset.
        if last > 0 {
            return Err(Error::corrupt(
                path,
                format!("offsets decrease at {unit} {} ({last} then 0), expected non-decreasing", next - 1),
            ));
        }
        last = 0;
    }
    if last != end {
        return Err(Error::corrupt(path, format!("last offset is {last}, expected {end} ({end_name})")));
    }
    Ok(())
}

fn check_monotone(path: &Path, offsets: &[u64], end: u64, unit: &str, end_name: &str) -> Result<()> {
    if offsets.first() != Some(&0) {
        return Err(Error::corrupt(path, format!("first offset is {:?}, expected 0", offsets.first())));
    }
    if let Some(i) = offsets.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::corrupt(
            path,
            format!("offsets decrease at {unit} {i} ({} then {}), expected non-decreasing", offsets[i], offsets[i + 1]),
        ));
    }
    let last = offsets[offsets.len() - 1];
    if last != end {
        return Err(Error::corrupt(path, format!("last offset is {last}, expected {end} ({end_name})")));
    }
    Ok(())
}

/// Rows whose loads [`RowCursor::gather`] starts ahead of the one it copies.
const PREFETCH_ROWS: usize = 4;

/// Bytes of a memory page: a mapped row's pages are prefetched one line each.
const PAGE: usize = 4096;

/// Reads rows of a [`Store`] for one thread, for every codec. For the zstd codec it keeps the
/// last decompressed block, so reading rows in order decompresses each block once.
pub struct RowCursor<'a> {
    store: &'a Store,
    indptr: &'a [u64],
    raw: Option<(&'a [u32], &'a [f32])>,
    decoder: Option<BlockDecoder>,
    block: Option<u64>,
    block_start: u64,
    indices: Vec<u32>,
    data: Vec<f32>,
    n_vars: u32,
    /// This cursor's number among those opened by the process.
    id: u64,
}

/// Cursors opened so far.
static CURSORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl<'a> RowCursor<'a> {
    fn new(store: &'a Store) -> Result<RowCursor<'a>> {
        let (raw, decoder) = match &store.matrix {
            Matrix::Raw { indices, data } => {
                let path = store.dir.join(StoreFiles::INDICES);
                let indices = indices.as_slice::<u32>().ok_or_else(|| Error::corrupt(&path, "not an array of u32"))?;
                let data = data.as_slice::<f32>().ok_or_else(|| Error::corrupt(&path, "not an array of f32"))?;
                (Some((indices, data)), None)
            }
            Matrix::Zstd { planes, block_checksum, .. } => {
                let decoder = BlockDecoder::new(*planes, *block_checksum)
                    .map_err(|e| Error::io(store.dir.join(StoreFiles::BLOCKS), e))?;
                (None, Some(decoder))
            }
        };
        Ok(RowCursor {
            store,
            indptr: store.indptr(),
            raw,
            decoder,
            block: None,
            block_start: 0,
            indices: Vec::new(),
            data: Vec::new(),
            // At most u32::MAX (checked with the manifest).
            n_vars: u32::try_from(store.n_vars()).unwrap_or(u32::MAX),
            id: CURSORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// The store read.
    pub(crate) fn store(&self) -> &'a Store {
        self.store
    }

    /// A place in `0..len` that differs between cursors, as far apart as the golden ratio keeps
    /// consecutive cursors: where each thread starts decoding a batch's shared blocks.
    pub(crate) fn spread_start(&self, len: usize) -> usize {
        let fraction = (self.id as f64 * 0.618_033_988_749_895).fract();
        ((fraction * len as f64) as usize).min(len.saturating_sub(1))
    }

    /// This cursor's block decoder (a zstd store's).
    pub(crate) fn decoder_mut(&mut self) -> Result<&mut BlockDecoder> {
        let path = self.store.dir.join(StoreFiles::BLOCKS);
        self.decoder.as_mut().ok_or_else(|| Error::corrupt(&path, "a raw store has no block decoder"))
    }

    /// Decompresses the block holding `row` unless it is the cached one.
    fn load_block(&mut self, row: u64) -> Result<()> {
        let Some(map) = self.store.block_map() else { return Ok(()) };
        let b = map.block_of(row);
        if self.block == Some(b) {
            return Ok(());
        }
        self.block = None;
        let path = self.store.dir.join(StoreFiles::BLOCKS);
        let decoder = self.decoder.as_mut().ok_or_else(|| Error::corrupt(&path, "no decoder"))?;
        self.block_start = self.store.decode_block(b, decoder, &mut self.indices, &mut self.data)?;
        self.block = Some(b);
        Ok(())
    }

    /// The stored-row rule ([`check_row`]) on a raw row before it is handed out: a damaged store
    /// stops the reader with the file and row, not a wrong gene or a libtorch index error later.
    fn check(&self, row: u64, indices: &[u32], data: &[f32]) -> Result<()> {
        check_row(indices, data, self.n_vars).map_err(|e| {
            let file = if e.contains("column index") || e.contains("strictly") {
                StoreFiles::INDICES
            } else {
                StoreFiles::DATA
            };
            Error::corrupt(self.store.dir.join(file), format!("row {row}{e}"))
        })
    }

    /// Row `row`'s column indices and values (valid until the next call).
    pub fn row(&mut self, row: u64) -> Result<(&[u32], &[f32])> {
        if row >= self.store.n_obs() {
            return Err(Error::InvalidInput(format!(
                "{}: row {row} out of range, the store has {} rows",
                self.store.dir.display(),
                self.store.n_obs()
            )));
        }
        let (s, e) = (self.indptr[row as usize], self.indptr[row as usize + 1]);
        if let Some((indices, data)) = self.raw {
            // Offsets were checked at open: non-decreasing and ending at nnz = the arrays' length.
            let (indices, data) = (&indices[s as usize..e as usize], &data[s as usize..e as usize]);
            self.check(row, indices, data)?;
            return Ok((indices, data));
        }
        self.load_block(row)?;
        let (s, e) = ((s - self.block_start) as usize, (e - self.block_start) as usize);
        Ok((&self.indices[s..e], &self.data[s..e]))
    }

    /// Appends rows `rows` (a contiguous range) to `out`.
    pub fn read_range(&mut self, rows: Range<u64>, out: &mut CsrBatch) -> Result<()> {
        if let Some(view) = self.store.raw_rows(rows.clone()) {
            for r in 0..view.n_rows() {
                let (indices, data) = view.row(r);
                self.check(rows.start + r as u64, indices, data)?;
            }
            out.push_rows(view.indptr, view.indices, view.data);
            return Ok(());
        }
        for row in rows {
            let (i, d) = self.row(row)?;
            out.push_row(i, d);
        }
        Ok(())
    }

    /// Appends the rows listed in `rows` (any order, repeats allowed) to `out`. Runs of
    /// consecutive rows are copied as one range.
    pub fn gather(&mut self, rows: &[u64], out: &mut CsrBatch) -> Result<()> {
        // The room these rows need, with a little headroom: recycled batches then grow to about
        // the largest batch they carry, not to the next power of two (which left every buffer of
        // a long run up to twice the size it needs, and the resident memory creeping as more
        // buffers doubled).
        let n_obs = self.store.n_obs();
        let mut nnz = 0u64;
        for &row in rows {
            if row < n_obs {
                nnz += self.indptr[row as usize + 1] - self.indptr[row as usize];
            }
        }
        out.reserve(rows.len(), usize::try_from(nnz).unwrap_or(usize::MAX));
        // Rows whose loads have been started, for a raw store: the copy of one row overlaps the
        // memory latency of the next ones.
        let mut prefetched = 0;
        for (i, j) in consecutive_runs(rows) {
            if let Some((indices, data)) = self.raw {
                let ahead = (j + PREFETCH_ROWS).min(rows.len());
                for &row in &rows[prefetched.max(i)..ahead] {
                    if row < n_obs {
                        let (s, e) = (self.indptr[row as usize] as usize, self.indptr[row as usize + 1] as usize);
                        prefetch(&indices[s..e], PAGE);
                        prefetch(&data[s..e], PAGE);
                    }
                }
                prefetched = ahead;
            }
            if j - i > 1 {
                self.read_range(rows[i]..rows[j - 1] + 1, out)?;
            } else {
                let (idx, d) = self.row(rows[i])?;
                out.push_row(idx, d);
            }
        }
        Ok(())
    }
}

/// The runs of consecutive row numbers in `rows`, as `(start, end)` positions in `rows`: each
/// run is one contiguous range of the store.
pub fn consecutive_runs(rows: &[u64]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= rows.len() {
            return None;
        }
        let start = i;
        i += 1;
        while i < rows.len() && rows[i - 1].checked_add(1) == Some(rows[i]) {
            i += 1;
        }
        Some((start, i))
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{check_monotone, check_monotone_extents, consecutive_runs};

    /// Issue 49 item 8: a store with more than 2^32 entries reads the rows beyond that boundary
    /// (u64 offsets from `X/indptr` through the maps and the cursor). Built from a small store
    /// whose first row is stretched to 2^32 entries in sparse files (zeros the file system does
    /// not store): 16 GiB per file on paper, a few KiB on disk. Skipped with the reason where the
    /// file system does not keep sparse files sparse.
    #[test]
    fn rows_beyond_four_billion_entries_read_back() {
        use std::io::{Seek as _, SeekFrom, Write as _};
        use std::os::unix::fs::MetadataExt as _;
        use std::sync::Arc;

        use arrow_array::{RecordBatch, StringArray};
        use arrow_schema::{DataType, Field, Schema};

        use crate::CsrBatch;
        use crate::store::{Store, StoreWriter, StoreWriterOptions};

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.store");
        let ids = |name: &str, values: &[&str]| {
            let schema = Arc::new(Schema::new(vec![Field::new(name, DataType::Utf8, false)]));
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(values.to_vec()))]).expect("batch")
        };
        let var = ids("gene_id", &["g0", "g1", "g2", "g3"]);
        let obs = ids("cell_id", &["a", "b", "c"]);
        let mut writer = StoreWriter::create(&path, &var, obs.schema(), StoreWriterOptions::default()).expect("writer");
        let mut rows = CsrBatch::new(4);
        rows.push_row(&[], &[]);
        rows.push_row(&[0, 3], &[1.0, 5.0]);
        rows.push_row(&[2], &[7.0]);
        writer.push_rows(&rows, &obs).expect("rows");
        writer.finish().expect("finish");

        // Row "a" gets 2^32 + 1 entries (column 0, value 0: what a sparse file reads as).
        let big: u64 = (1 << 32) + 1;
        let nnz = big + 3;
        let (indices, data) = (path.join("X/indices"), path.join("X/data"));
        for (file, tail) in [
            (&indices, [0u32.to_le_bytes(), 3u32.to_le_bytes(), 2u32.to_le_bytes()].concat()),
            (&data, [1.0f32.to_le_bytes(), 5.0f32.to_le_bytes(), 7.0f32.to_le_bytes()].concat()),
        ] {
            let mut f = std::fs::OpenOptions::new().write(true).open(file).expect("open");
            f.set_len(nnz * 4).expect("set_len");
            f.seek(SeekFrom::Start(big * 4)).expect("seek");
            f.write_all(&tail).expect("write");
            f.sync_all().expect("sync");
            let meta = f.metadata().expect("metadata");
            if meta.blocks() * 512 > (1 << 30) {
                eprintln!("skipped: {} is not kept sparse by this file system", file.display());
                return;
            }
        }
        let indptr: Vec<u8> = [0u64, big, big + 2, big + 3].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(path.join("X/indptr"), &indptr).expect("indptr");
        let manifest_path = path.join("manifest.json");
        let mut manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("manifest")).expect("json");
        manifest["nnz"] = nnz.into();
        manifest["files"]["X/indices"]["bytes"] = (nnz * 4).into();
        manifest["files"]["X/data"]["bytes"] = (nnz * 4).into();
        manifest["files"]["X/indptr"]["bytes"] = (indptr.len() as u64).into();
        std::fs::write(&manifest_path, manifest.to_string()).expect("write manifest");

        let store = Store::open(&path).expect("open");
        assert_eq!((store.n_obs(), store.nnz()), (3, nnz));
        assert!(store.nnz() > u64::from(u32::MAX));
        let mut cursor = store.cursor().expect("cursor");
        assert_eq!(cursor.row(1).expect("row 1"), (&[0u32, 3][..], &[1.0f32, 5.0][..]));
        assert_eq!(cursor.row(2).expect("row 2"), (&[2u32][..], &[7.0f32][..]));
        let mut batch = CsrBatch::new(4);
        cursor.gather(&[2, 1], &mut batch).expect("gather");
        assert_eq!(batch.row(0), (&[2u32][..], &[7.0f32][..]));
        assert_eq!(batch.row(1), (&[0u32, 3][..], &[1.0f32, 5.0][..]));
        let view = store.raw_rows(1..3).expect("raw rows");
        assert_eq!(view.row(0), (&[0u32, 3][..], &[1.0f32, 5.0][..]));
        assert_eq!(view.indptr[0], big);
    }

    /// The check that reads only stored bytes says what the check of every offset says, on
    /// offsets that are zero outside the stored extents (valid or not).
    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a list of one extent, not a range of them
    fn offsets_checked_by_extents_as_by_every_offset() {
        let path = Path::new("X/indptr");
        let cases: [(&[u64], &[std::ops::Range<u64>]); 7] = [
            (&[0, 0, 0, 0, 2, 3], &[32..48]),
            (&[0, 1, 2, 3, 3, 3], &[0..48]),
            (&[0, 1, 0, 0, 2, 3], &[0..16, 32..48]),
            (&[0, 0, 0, 0, 0, 0], &[]),
            (&[0, 2, 1, 0, 0, 0], &[0..24]),
            (&[0, 3, 3, 0, 0, 0], &[0..24]),
            (&[5, 6, 7, 8, 9, 9], &[0..48]),
        ];
        for (offsets, extents) in cases {
            for end in [0, 3, 9] {
                let whole = check_monotone(path, offsets, end, "row", "nnz").map_err(|e| e.to_string());
                let parts =
                    check_monotone_extents(path, offsets, extents, end, "row", "nnz").map_err(|e| e.to_string());
                assert_eq!(whole.is_ok(), parts.is_ok(), "{offsets:?} {extents:?} end {end}: {whole:?} / {parts:?}");
            }
        }
    }

    /// A store of more than 2^31 cells (issue 49 item 8): opened (its 16 GiB of row offsets
    /// checked through the bytes the file system stores: the empty rows before are a hole) and
    /// its last cells read back by cursor, gather and zero-copy view. Skipped with the reason
    /// where the file system does not keep sparse files sparse.
    #[test]
    fn rows_beyond_two_billion_cells_read_back() {
        use std::io::{Seek as _, SeekFrom, Write as _};
        use std::os::unix::fs::MetadataExt as _;
        use std::sync::Arc;

        use arrow_array::{RecordBatch, StringArray};
        use arrow_schema::{DataType, Field, Schema};
        use parquet::arrow::ArrowWriter;
        use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader, ParquetMetaDataWriter};

        use crate::CsrBatch;
        use crate::store::{Store, StoreWriter, StoreWriterOptions};

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tall.store");
        let ids = |name: &str, values: Vec<&str>| {
            let schema = Arc::new(Schema::new(vec![Field::new(name, DataType::Utf8, false)]));
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(values))]).expect("batch")
        };
        let var = ids("gene_id", vec!["g0", "g1", "g2", "g3"]);
        let obs = ids("cell_id", vec!["a", "b", "c"]);
        let mut writer = StoreWriter::create(&path, &var, obs.schema(), StoreWriterOptions::default()).expect("writer");
        let mut rows = CsrBatch::new(4);
        rows.push_row(&[], &[]);
        rows.push_row(&[0, 3], &[1.0, 5.0]);
        rows.push_row(&[2], &[7.0]);
        writer.push_rows(&rows, &obs).expect("rows");
        writer.finish().expect("finish");

        // 2^31 empty cells before the three: their offsets (zeros) a hole of 16 GiB.
        let first: u64 = 1 << 31;
        let n_obs = first + 3;
        let indptr_path = path.join("X/indptr");
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&indptr_path).expect("open");
        f.set_len((n_obs + 1) * 8).expect("set_len");
        f.seek(SeekFrom::Start((first + 1) * 8)).expect("seek");
        f.write_all(&[0u64, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).expect("write");
        f.sync_all().expect("sync");
        if f.metadata().expect("metadata").blocks() * 512 > (1 << 30) {
            eprintln!("skipped: {} is not kept sparse by this file system", indptr_path.display());
            return;
        }
        // An obs table of n_obs rows, a few KiB: one row group of 2^20 ids listed 2,048 times in
        // the footer, then the three cells' (readers find rows through the footer).
        let obs_path = path.join("obs.parquet");
        let block = 1usize << 20;
        let mut table =
            ArrowWriter::try_new(std::fs::File::create(&obs_path).expect("obs"), obs.schema(), None).expect("writer");
        table.write(&ids("cell_id", vec!["e"; block])).expect("write");
        table.flush().expect("flush");
        table.write(&obs).expect("write");
        table.close().expect("close");
        let file = std::fs::File::open(&obs_path).expect("open");
        let written = ParquetMetaDataReader::new().parse_and_finish(&file).expect("footer");
        let groups = written.row_groups();
        let listed: Vec<_> = std::iter::repeat_n(groups[0].clone(), (first as usize) / block)
            .chain([groups[1].clone()])
            .enumerate()
            .map(|(i, g)| g.into_builder().set_ordinal(i as i32).build().expect("row group"))
            .collect();
        let meta = written.file_metadata();
        let footer = parquet::file::metadata::FileMetaData::new(
            meta.version(),
            n_obs as i64,
            meta.created_by().map(str::to_owned),
            meta.key_value_metadata().cloned(),
            meta.schema_descr_ptr(),
            meta.column_orders().cloned(),
        );
        let mut out = std::fs::OpenOptions::new().append(true).open(&obs_path).expect("append");
        ParquetMetaDataWriter::new(&mut out, &ParquetMetaData::new(footer, listed)).finish().expect("footer");
        drop(out);
        let manifest_path = path.join("manifest.json");
        let mut manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("manifest")).expect("json");
        manifest["n_obs"] = n_obs.into();
        manifest["files"]["X/indptr"]["bytes"] = ((n_obs + 1) * 8).into();
        manifest["files"]["obs.parquet"]["bytes"] = std::fs::metadata(&obs_path).expect("size").len().into();
        std::fs::write(&manifest_path, manifest.to_string()).expect("write manifest");

        let store = Store::open(&path).expect("open");
        assert_eq!((store.n_obs(), store.nnz()), (n_obs, 3));
        assert!(store.n_obs() > u64::from(u32::MAX >> 1));
        let mut cursor = store.cursor().expect("cursor");
        assert_eq!(cursor.row(first + 1).expect("row"), (&[0u32, 3][..], &[1.0f32, 5.0][..]));
        assert_eq!(cursor.row(first + 2).expect("row"), (&[2u32][..], &[7.0f32][..]));
        assert_eq!(cursor.row(12_345).expect("an empty row"), (&[][..], &[][..]));
        let mut batch = CsrBatch::new(4);
        cursor.gather(&[first + 2, 7, first + 1], &mut batch).expect("gather");
        assert_eq!(batch.row(0), (&[2u32][..], &[7.0f32][..]));
        assert_eq!(batch.row(1), (&[][..], &[][..]));
        assert_eq!(batch.row(2), (&[0u32, 3][..], &[1.0f32, 5.0][..]));
        let view = store.raw_rows(first..n_obs).expect("raw rows");
        assert_eq!((view.n_rows(), view.row(1)), (3, (&[0u32, 3][..], &[1.0f32, 5.0][..])));
        store.release(first..n_obs);
        assert!(cursor.row(n_obs).is_err());
    }

    #[test]
    fn runs_of_consecutive_rows() {
        let runs = |rows: &[u64]| consecutive_runs(rows).collect::<Vec<_>>();
        assert_eq!(runs(&[]), []);
        assert_eq!(runs(&[7]), [(0, 1)]);
        assert_eq!(runs(&[3, 4, 5, 9, 10, 2, 2]), [(0, 3), (3, 5), (5, 6), (6, 7)]);
        // No run wraps around the largest row number.
        assert_eq!(runs(&[u64::MAX, 0]), [(0, 1), (1, 2)]);
    }
}
