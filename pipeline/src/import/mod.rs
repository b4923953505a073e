//! `import`: `.h5ad` reader -> store writer, in row chunks.
//!
//! CSR and dense matrices are read by row ranges. CSC matrices are transposed out of core: one
//! pass over column ranges scatters entries into row-range bucket files next to the output (each
//! bucket sized to fit [`ImportOptions::memory_budget`]), then each bucket is counting-sorted
//! into CSR rows. Entries arrive in column order, so rows come out sorted.

mod collection;
mod read;
mod request;
mod unique;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::cast::AsArray;

use arrow_array::{RecordBatch, StringArray};
use cpa_stream_schemas::{Codec, StoreFiles};
use cpa_stream_stages::cell_table::{CellTable, CellTableLayout, Vocabulary};
use cpa_stream_stages::h5ad::{DEG_FILE, ExternalData, MatrixLayout, MatrixSource};
use cpa_stream_stages::input::{AnnDataReader, InputPolicy};
use cpa_stream_stages::store::{ObsGrowth, Store, StoreWriter, StoreWriterOptions, write_table};
use cpa_stream_stages::{CsrBatch, Error as StageError, Result as StageResult};
use crossbeam_channel::bounded;
use serde::Serialize;

pub use collection::GeneJoin;
use collection::{Collection, Kind, Part, Plan};
pub use read::DEFAULT_MAX_OPEN_BUCKETS;
use read::{ChunkSink, read_by_rows, read_cell_table, read_csc, read_store};
pub use request::{DEFAULT_SOURCE_KEY, ImportRequest, JoinName};
use unique::SharedIds;

use crate::Stage;
use crate::context::RunContext;
use crate::error::{Error, Result};
use crate::shuffle::{Scatter, Shuffle};
use crate::telemetry::{MemorySampler, RunReport, StageStats};
use crate::two_stage::two_stage;

/// Default rows per chunk read from the file. Small enough that the batches in flight (channel
/// depth + 2, recycled) stay a few tens of MB on wide atlases; at 4,096 rows and 5,000 genes they
/// were 28 MB each and peak RssAnon of a 1M-cell import reached 870 MB.
pub const DEFAULT_CHUNK_ROWS: usize = 1024;
/// Default size of one CSC transposition bucket file (entries x 12 bytes). Turning a bucket into
/// rows holds it about 2.5 times (file bytes, then indices, values and the CSR rows).
pub const DEFAULT_MEMORY_BUDGET: usize = 128 << 20;
/// Stored entries (values plus indices) read per HDF5 call: a chunk of CSR rows, of CSC columns
/// or of dense rows ends where they would exceed it (about 48 MB of i64 indices + f32 values, or
/// 16 MB of dense f32), whatever the file declares; a single row holds at most as many entries
/// as there are genes (checked before it is read).
const ENTRIES_PER_READ: u64 = 4 << 20;
/// Chunks queued between reader and writer.
const CHANNEL_DEPTH: usize = 4;

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The `.h5ad` files [`run`] reads, in order, into one store ([`run_chunks`] is given its
    /// data instead).
    pub inputs: Vec<PathBuf>,
    /// The store written.
    pub out: PathBuf,
    /// Import `layers/<layer>` instead of `X`.
    pub layer: Option<String>,
    /// Import `adata.raw` (its matrix and genes) instead of `X`; excludes `layer`.
    pub use_raw: bool,
    /// Which genes the store keeps. Default [`GeneJoin::Inner`] (of one file: all its genes).
    pub join: GeneJoin,
    /// The `var` column that identifies genes across files; `None`: the var index.
    pub gene_key: Option<String>,
    /// The `obs` column naming each cell's file (categorical, one category per file); `None`:
    /// none.
    pub source_key: Option<String>,
    /// The label of each file in `source_key` and `index_unique` (one per input); `None`: the
    /// file names without their extension.
    pub labels: Option<Vec<String>>,
    /// Append this separator and the file's label to every cell id (anndata's `index_unique`);
    /// `None`: ids as the files have them, and an id in two files is an error.
    pub index_unique: Option<String>,
    /// Write the cells in a random order drawn from this seed.
    pub shuffle: Option<Shuffle>,
    /// The store appended to (also the first input and the output): the new version replaces it
    /// atomically once complete.
    pub append: Option<PathBuf>,
    /// Rows per chunk. Default [`DEFAULT_CHUNK_ROWS`].
    pub chunk_rows: usize,
    /// Bytes of one CSC transposition bucket. Default [`DEFAULT_MEMORY_BUDGET`].
    pub memory_budget: usize,
    /// CSC transposition buckets open at once; more buckets take more passes over the columns.
    /// Default [`DEFAULT_MAX_OPEN_BUCKETS`].
    pub max_open_buckets: usize,
    /// Matrix codec of the store.
    pub codec: Codec,
    /// Replace an existing store.
    pub overwrite: bool,
    /// The `uns` entry with the DEG lists; `None`: the first entry that holds DEG lists. Of many
    /// files, the first that has one gives the store its DEG table.
    pub deg_uns_key: Option<String>,
    /// Whether the file may read data from other files (HDF5 external storage, external links,
    /// virtual datasets). Default [`ExternalData::Refuse`]: an imported file is untrusted.
    pub external: ExternalData,
    /// Whether a zarr store's sparse matrix may lack chunks (see
    /// [`InputPolicy`](cpa_stream_stages::input::InputPolicy)). Default false.
    pub allow_missing_chunks: bool,
    /// How Parquet cell tables among the inputs lay out their cells.
    pub cell_table: CellTableLayout,
    /// The gene vocabulary of Parquet cell tables (a Parquet file, a row per gene).
    pub var_table: Option<PathBuf>,
    /// Write a store of no cells when the inputs hold none (else an error).
    pub allow_empty: bool,
    /// The vocabulary's column that the cell tables' gene lists refer to [default: `token_id`
    /// if it has one, else the gene names].
    pub var_id: Option<String>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            inputs: Vec::new(),
            out: PathBuf::new(),
            layer: None,
            use_raw: false,
            join: GeneJoin::Inner,
            gene_key: None,
            source_key: None,
            labels: None,
            index_unique: None,
            shuffle: None,
            append: None,
            chunk_rows: DEFAULT_CHUNK_ROWS,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_open_buckets: DEFAULT_MAX_OPEN_BUCKETS,
            codec: Codec::Raw,
            overwrite: false,
            deg_uns_key: None,
            external: ExternalData::Refuse,
            allow_missing_chunks: false,
            cell_table: CellTableLayout::default(),
            var_table: None,
            var_id: None,
            allow_empty: false,
        }
    }
}

/// The outcome of an import.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The store's manifest.
    pub manifest: cpa_stream_schemas::Manifest,
    /// The files' matrix layout (`csr`, `csc`, `dense`, or `mixed`).
    pub layout: String,
    /// Each file read.
    pub inputs: Vec<InputReport>,
    /// `uns` key and rows of the imported DEG table, if any.
    pub degs: Option<(String, usize)>,
    /// The seed of the cells' random order, if shuffled.
    pub shuffle_seed: Option<u64>,
    /// Of an append that grew the store in place: what it wrote.
    pub append: Option<cpa_stream_stages::store::AppendReport>,
    /// Cells imported per second.
    pub cells_per_s: f64,
    /// Stored bytes of the input files read per second.
    pub input_mb_per_s: f64,
    /// Stages, wall time and peak memory.
    pub report: RunReport,
}

/// One file of an import.
#[derive(Debug, Clone, Serialize)]
pub struct InputReport {
    /// The file.
    pub path: PathBuf,
    /// Its cells.
    pub cells: u64,
    /// Its genes.
    pub genes: usize,
    /// Its genes that the store keeps.
    pub genes_kept: usize,
    /// Its matrix layout (`csr`, `csc`, `dense`, `cell table`).
    pub layout: String,
    /// Columns of a cell table left out of `obs` (lists, structs, binary), with their types.
    pub skipped_columns: Vec<String>,
    /// Arrays of a zarr store that lack chunks, read as their fill value (one line each).
    pub missing_chunks: Vec<String>,
}

impl ImportOptions {
    /// What reading the inputs may trust.
    pub fn policy(&self) -> InputPolicy {
        InputPolicy { external: self.external, allow_missing_chunks: self.allow_missing_chunks }
    }
}

/// Imports the `.h5ad` files `options.inputs`, in order, into a new store at `options.out`.
pub fn run(options: &ImportOptions, ctx: &RunContext) -> Result<ImportReport> {
    let out = options.out.as_path();
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let read = StageStats::new(Stage::Read, 1);
    let write = StageStats::new(Stage::Write, 1);
    let source = match (&options.layer, options.use_raw) {
        (Some(l), false) => MatrixSource::Layer(l),
        (None, true) => MatrixSource::Raw,
        (None, false) => MatrixSource::X,
        (Some(l), true) => {
            return Err(Error::InvalidInput(format!("import: layer {l:?} and adata.raw both asked for; choose one")));
        }
    };
    if options.inputs.is_empty() {
        return Err(Error::InvalidInput("import: no input file".to_owned()));
    }
    // An append's first input is the store itself, by design; no other input is replaced.
    let skip = usize::from(options.append.is_some());
    let inputs = options.inputs[skip..].iter().chain(&options.var_table);
    cpa_stream_stages::output::check_not_an_input(out, inputs).map_err(Error::stage(Stage::Write))?;
    let labels = labels(options)?;
    let vocabulary = match &options.var_table {
        Some(path) if options.inputs.iter().any(|p| collection::is_cell_table(p)) => Some(
            Vocabulary::read(path, options.gene_key.as_deref(), options.var_id.as_deref())
                .map_err(Error::stage(Stage::Read))?,
        ),
        Some(path) => {
            return Err(Error::InvalidInput(format!(
                "--var-table {}: the genes of Parquet cell tables, but no input is one (*.parquet)",
                path.display()
            )));
        }
        None => None,
    };
    let plan = Plan {
        source,
        policy: options.policy(),
        join: &options.join,
        gene_key: options.gene_key.as_deref(),
        source_key: options.source_key.as_deref().map(|key| (key, labels.as_slice())),
        index_unique: options.index_unique.as_deref(),
        appending: options.append.is_some(),
        cells: vocabulary.as_ref().map(|v| (&options.cell_table, v)),
    };
    let collection = collection::plan(&options.inputs, &plan)?;
    if !options.allow_empty && collection.parts.iter().all(|p| p.n_obs == 0) {
        let files: Vec<String> = options.inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::InvalidInput(format!(
            "{}: no cells; nothing was written (allow_empty, --allow-empty, writes a store of no cells)",
            files.join(", ")
        )));
    }
    let cells = vocabulary.as_ref().map(|v| (&options.cell_table, v));
    let element = match source {
        MatrixSource::X => String::new(),
        MatrixSource::Raw => " (adata.raw)".to_owned(),
        MatrixSource::Layer(l) => format!(" (layers/{l})"),
    };
    let files = match options.inputs.as_slice() {
        [one] => one.display().to_string(),
        [first, .., last] => format!("{} files, {} .. {}", options.inputs.len(), first.display(), last.display()),
        [] => String::new(),
    };
    let files = match (&options.append, &options.inputs[..]) {
        (Some(_), [_, one]) => format!("{} appended", one.display()),
        (Some(_), [_, first, .., last]) => {
            format!("{} files appended, {} .. {}", options.inputs.len() - 1, first.display(), last.display())
        }
        _ => files,
    };
    let shuffled = options.shuffle.map(|s| format!(", cells shuffled with seed {}", s.seed)).unwrap_or_default();
    let writer_options = StoreWriterOptions {
        codec: options.codec,
        overwrite: options.overwrite,
        source: Some(match options.append {
            Some(_) => format!("{files}{element}{shuffled}"),
            None => format!("imported from {files}{element}{shuffled}"),
        }),
        ..StoreWriterOptions::default()
    };
    // Appended to in place (the new cells written after the store's): the same codec only; another
    // writes the store again.
    let appended = match &options.append {
        Some(store) => {
            let opened = Store::open(store).map_err(Error::stage(Stage::Read))?;
            (opened.manifest().codec == options.codec).then_some(opened)
        }
        None => None,
    };
    let mut writer = match &appended {
        Some(store) => {
            let adapt = |batch: &RecordBatch| {
                collection.parts[0].obs.apply(batch).map_err(|e| cpa_stream_stages::Error::InvalidInput(e.to_string()))
            };
            let columns = store.table_schema(StoreFiles::OBS).map_err(Error::stage(Stage::Read))?;
            let growth = match same_columns(&columns, &collection.obs_schema) {
                true => ObsGrowth::Extend,
                false => ObsGrowth::Rewrite(&adapt),
            };
            StoreWriter::append_to(out, Arc::clone(&collection.obs_schema), growth, writer_options)
        }
        None => StoreWriter::create(out, &collection.var, Arc::clone(&collection.obs_schema), writer_options),
    }
    .map_err(Error::stage(Stage::Write))?;
    // Created once the store's lock is held: while it is, no other import sweeps it away.
    let scratch = Scratch::create(out)?;
    // An appended store keeps its DEG table (linked into the new version); one without gets the
    // files'.
    let keep_degs = appended.as_ref().is_some_and(|s| s.has_file(DEG_FILE));
    let degs = match read_degs(&collection, options, source)? {
        Some((key, table)) if !keep_degs => Some(write_degs(&writer, &key, &table)?),
        _ => None,
    };
    let skip = usize::from(appended.is_some());
    let scatter = StageStats::new(Stage::Scatter, 1);
    let mut inputs = Vec::with_capacity(collection.parts.len());
    match options.shuffle {
        None => {
            let target = Target::Store(&mut writer);
            stream(&collection, skip, options, source, cells, target, &scratch, &mut inputs, [&read, &write], ctx)?
        }
        Some(shuffle) => {
            // The cells go to the shuffle's buckets as they are read (convert --shuffle's first
            // pass, while the files stream), their obs rows kept; then each bucket is shuffled
            // and written (its second pass).
            let entries: u64 = collection.parts[skip..].iter().map(|p| p.entries).sum();
            let records = Scatter::record_bytes(collection.parts[skip..].iter().map(|p| p.n_obs).sum(), entries);
            let mut buckets = Scatter::new(out, shuffle, records)?;
            let mut obs = Vec::new();
            let target = Target::Scatter(&mut buckets, &mut obs, &scatter);
            stream(&collection, skip, options, source, cells, target, &scratch, &mut inputs, [&read, &write], ctx)?;
            let obs =
                arrow_select::concat::concat_batches(&collection.obs_schema, &obs).map_err(Error::arrow("obs"))?;
            let result = buckets.write_out(&obs, "obs", &mut writer, [&scatter, &write], ctx.progress());
            if result.is_err() {
                ctx.progress().end();
            }
            result?;
        }
    }
    drop(appended);
    // The scratch is done with; removed before the store is published, so that a kill after
    // the publication leaves no temporary beside a complete store (one before it is swept by
    // the next writer).
    drop(scratch);
    let (manifest, append) = write
        .busy(|| {
            let manifest = writer.finish_report()?;
            Ok::<_, cpa_stream_stages::Error>(manifest)
        })
        .map_err(Error::stage(Stage::Write))?;
    let wall = started.elapsed();
    let input_bytes: u64 = options.inputs.iter().map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    let layout = match inputs.iter().all(|i| i.layout == inputs[0].layout) {
        true => inputs[0].layout.clone(),
        false => "mixed".to_owned(),
    };
    let mut stages = vec![read.report(), write.report()];
    if options.shuffle.is_some() {
        stages.insert(1, scatter.report());
    }
    let cells = manifest.n_obs - append.as_ref().map_or(0, |a| a.base_cells);
    Ok(ImportReport {
        cells_per_s: cells as f64 / wall.as_secs_f64().max(1e-9),
        input_mb_per_s: input_bytes as f64 / 1e6 / wall.as_secs_f64().max(1e-9),
        manifest,
        layout,
        inputs,
        degs,
        shuffle_seed: options.shuffle.map(|s| s.seed),
        append,
        report: RunReport { wall, stages, memory: sampler.finish() },
    })
}

/// The label of each input: as given, or the file names without `.h5ad` (`.zarr`, ...).
fn labels(options: &ImportOptions) -> Result<Vec<String>> {
    let default = |p: &PathBuf| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        [".h5ad", ".zarr", ".parquet", ".pq", ".store"]
            .iter()
            .find_map(|x| name.strip_suffix(x))
            .map(str::to_owned)
            .unwrap_or(name)
    };
    let labels: Vec<String> = match &options.labels {
        // Appending, the labels name the files added; the store's cells keep theirs.
        Some(labels) if options.append.is_some() && labels.len() + 1 == options.inputs.len() => {
            std::iter::once(default(&options.inputs[0])).chain(labels.iter().cloned()).collect()
        }
        Some(labels) if labels.len() != options.inputs.len() => {
            return Err(Error::InvalidInput(format!(
                "--labels: {} labels for {} input files; give one per file, in order",
                labels.len(),
                options.inputs.len()
            )));
        }
        Some(labels) => labels.clone(),
        None => options.inputs.iter().map(default).collect(),
    };
    let mut seen = HashMap::new();
    for (i, label) in labels.iter().enumerate() {
        if label.is_empty() {
            return Err(Error::InvalidInput(format!(
                "--labels: the label of {} is empty",
                options.inputs[i].display()
            )));
        }
        if let Some(j) = seen.insert(label.as_str(), i) {
            return Err(Error::InvalidInput(format!(
                "{} and {} have the same label {label:?}; --labels gives each file its own",
                options.inputs[j].display(),
                options.inputs[i].display()
            )));
        }
    }
    Ok(labels)
}

/// A scratch directory next to a store being written (`.NAME.import-PID`), removed when dropped
/// and, after a kill, by the next writer of the store.
struct Scratch(PathBuf);

impl Scratch {
    fn create(out: &Path) -> Result<Scratch> {
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dir = out.with_file_name(format!(".{name}.import-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Where the cells of an import go: the store, or the shuffle's buckets (their obs rows kept
/// in order) with the stage that scatters them.
enum Target<'a> {
    Store(&'a mut StoreWriter),
    Scatter(&'a mut Scatter, &'a mut Vec<RecordBatch>, &'a Arc<StageStats>),
}

/// One chunk of a file's cells: store rows, the file's obs rows, the file, its first row.
type Chunk = (CsrBatch, RecordBatch, usize, u64);

/// The first value of a file that is not a count: its row and the value.
type NotACount = Option<(u64, f32)>;

// Long: the wiring of the reader thread and the writer with their checks, read top to bottom
// as the data flows.
/// Streams the files' cells, in order, into `writer`, checking each row, the files' kinds of
/// values and that no cell id is in two files.
#[allow(clippy::too_many_arguments)]
fn stream(
    collection: &Collection,
    skip: usize,
    options: &ImportOptions,
    source: MatrixSource,
    cells: Option<(&CellTableLayout, &Vocabulary)>,
    mut target: Target,
    scratch: &Scratch,
    inputs: &mut Vec<InputReport>,
    [read, write]: [&Arc<StageStats>; 2],
    ctx: &RunContext,
) -> Result<()> {
    let progress = ctx.progress();
    let parts = &collection.parts;
    let n_vars = collection.var.num_rows() as u32;
    let n_obs: u64 = parts[skip..].iter().map(|p| p.n_obs).sum();
    let chunk_rows = options.chunk_rows.max(1) as u64;
    let csc_dir = scratch.0.join("csc");
    let mut ids = match parts.len() {
        1 => None,
        _ => Some(SharedIds::new(&scratch.0.join("ids"), parts.iter().map(|p| p.n_obs).sum())?),
    };
    let mut not_counts: Vec<NotACount> = vec![None; parts.len()];
    // The store appended to is not read again: its ids join the check for ids in two inputs, and
    // a sample of its values says whether it holds counts.
    for (f, part) in parts[..skip].iter().enumerate() {
        let store = Store::open(&part.path).map_err(Error::stage(Stage::Read))?;
        not_counts[f] = store_values_sample(&store).map_err(Error::stage(Stage::Read))?;
        if let Some(ids) = ids.as_mut() {
            let mut first = 0;
            for obs in store.table(StoreFiles::OBS).map_err(Error::stage(Stage::Read))? {
                let obs = part.obs.apply(&obs.map_err(Error::stage(Stage::Read))?)?;
                ids.add(f, first, &obs)?;
                first += obs.num_rows() as u64;
            }
        }
    }
    let mut consumed = 0u64;
    let layouts = std::sync::Mutex::new(Vec::with_capacity(parts.len()));
    progress.begin("cells", n_obs);
    // Written batches go back to the reader, so steady state allocates no batch buffers.
    let (recycle_tx, recycle_rx) = bounded::<CsrBatch>(CHANNEL_DEPTH + 2);
    let result = two_stage(
        Stage::Read,
        read,
        write,
        CHANNEL_DEPTH,
        |out| {
            crate::fault::point(Stage::Read);
            for (f, part) in parts.iter().enumerate().skip(skip) {
                let sink = ChunkSink { out, recycled: &recycle_rx, stats: read, n_vars, part: f };
                if part.kind == Kind::Store {
                    layouts.lock().unwrap_or_else(|e| e.into_inner()).push("store".to_owned());
                    if !read_store(&part.path, &part.map, chunk_rows, &sink)? {
                        return Ok(());
                    }
                    continue;
                }
                if part.kind == Kind::Cells {
                    let (layout, vocabulary) = cells.ok_or_else(|| {
                        StageError::InvalidInput(format!("{}: a cell table without a vocabulary", part.path.display()))
                    })?;
                    layouts.lock().unwrap_or_else(|e| e.into_inner()).push("cell table".to_owned());
                    if !read_cell_table(&part.path, layout, vocabulary, &part.map, chunk_rows, &sink)? {
                        return Ok(());
                    }
                    continue;
                }
                let h5 = AnnDataReader::open(&part.path, source, options.policy())?;
                if h5.n_obs() != part.n_obs || h5.n_vars() as usize != part.map.len() {
                    return Err(StageError::InvalidInput(format!(
                        "{}: changed while it was imported ({} x {} when opened, now {} x {})",
                        part.path.display(),
                        part.n_obs,
                        part.map.len(),
                        h5.n_obs(),
                        h5.n_vars()
                    )));
                }
                layouts.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{:?}", h5.layout()).to_lowercase());
                let sent = match h5.layout() {
                    MatrixLayout::Csc => {
                        let sent = read_csc(&h5, &part.map, chunk_rows, options, &csc_dir, &sink);
                        let _ = fs::remove_dir_all(&csc_dir);
                        sent?
                    }
                    _ => read_by_rows(&h5, &part.map, chunk_rows, &sink)?,
                };
                if !sent {
                    return Ok(());
                }
            }
            Ok(())
        },
        |(rows, obs, f, first): Chunk| {
            let part = &parts[f];
            // The store's rule for values (finite, >= 0), reported against the input file.
            for r in 0..rows.n_rows() {
                let (indices, values) = rows.row(r);
                cpa_stream_stages::counts_csr::check_row(indices, values, n_vars).map_err(|e| {
                    let hint = match part.other_matrices.is_empty() {
                        true => String::new(),
                        false => format!("; this file has other matrices: {}", part.other_matrices.join(", ")),
                    };
                    let (file, cell) = (part.path.display(), first + r as u64);
                    if part.kind == Kind::Cells {
                        let counts = &options.cell_table.counts;
                        return Error::InvalidInput(format!(
                            "{file}: {counts}: cell {cell}{e}; some cell tables mark entries with a negative count \
                             (Tahoe-100M opens each cell with one of -2): --marker-value leaves them out"
                        ));
                    }
                    Error::InvalidInput(format!("{file}: {}: cell {cell}{e}{hint}", element(source)))
                })?;
                if not_counts[f].is_none()
                    && let Some(v) = values.iter().find(|v| v.fract() != 0.0)
                {
                    not_counts[f] = Some((first + r as u64, *v));
                }
            }
            let obs = part.obs.apply(&obs)?;
            if let Some(ids) = ids.as_mut() {
                ids.add(f, first, &obs)?;
            }
            match &mut target {
                Target::Store(writer) => {
                    write.busy(|| writer.push_rows(&rows, &obs)).map_err(Error::stage(Stage::Write))?;
                    write.add(rows.n_rows() as u64, rows.byte_size());
                }
                Target::Scatter(buckets, kept, scatter) => {
                    scatter.busy(|| buckets.push(&rows))?;
                    scatter.add(rows.n_rows() as u64, rows.byte_size());
                    kept.push(obs);
                }
            }
            consumed += rows.n_rows() as u64;
            progress.advance(rows.n_rows() as u64);
            ctx.check_stopped()?;
            let _ = recycle_tx.try_send(rows);
            Ok(())
        },
    );
    progress.end();
    result?;
    if consumed != n_obs {
        return Err(Error::InvalidInput(format!("read {consumed} of the {n_obs} cells of the input files")));
    }
    let layouts = layouts.into_inner().unwrap_or_else(|e| e.into_inner());
    for (part, layout) in parts[skip..].iter().zip(layouts) {
        inputs.push(InputReport {
            path: part.path.clone(),
            cells: part.n_obs,
            genes: part.map.len(),
            genes_kept: part.kept_genes,
            layout,
            skipped_columns: part.skipped.clone(),
            missing_chunks: part.missing_chunks.clone(),
        });
    }
    check_counts(parts, &not_counts, source)?;
    if let Some(ids) = ids {
        check_shared_ids(parts, ids, source, options.policy(), &options.cell_table)?;
    }
    Ok(())
}

fn element(source: MatrixSource) -> String {
    match source {
        MatrixSource::X => "X".to_owned(),
        MatrixSource::Raw => "raw.X".to_owned(),
        MatrixSource::Layer(l) => format!("layers/{l}"),
    }
}

/// Rows of a store looked at to tell whether it holds counts.
const SAMPLE_ROWS: u64 = 4096;

/// The first value that is not a count among a store's first rows (a store appended to, which
/// is not read again), if any.
fn store_values_sample(store: &Store) -> StageResult<NotACount> {
    let mut cursor = store.cursor()?;
    for row in 0..store.n_obs().min(SAMPLE_ROWS) {
        let (_, values) = cursor.row(row)?;
        if let Some(v) = values.iter().find(|v| v.fract() != 0.0) {
            return Ok(Some((row, *v)));
        }
    }
    Ok(None)
}

/// Whether an appended store's obs table can keep its bytes: the merged schema has its columns,
/// in order, of the same types (categories may grow).
fn same_columns(store: &arrow_schema::Schema, merged: &arrow_schema::Schema) -> bool {
    store.fields().len() == merged.fields().len()
        && store
            .fields()
            .iter()
            .zip(merged.fields())
            .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type() && a.is_nullable() == b.is_nullable())
}

/// Files of counts beside files of other values are an error naming one of each.
fn check_counts(parts: &[Part], not_counts: &[NotACount], source: MatrixSource) -> Result<()> {
    let counts = parts.iter().zip(not_counts).find(|(_, n)| n.is_none());
    let other = parts.iter().zip(not_counts).find_map(|(p, n)| n.map(|n| (p, n)));
    if let (Some((counts, _)), Some((part, (row, value)))) = (counts, other) {
        return Err(Error::InvalidInput(format!(
            "{}: {} holds values that are not counts (cell {row}: {value}) while {} holds counts: a store holds one \
             kind of value; import the counts of every file (--layer NAME, --use-raw)",
            part.path.display(),
            element(source),
            counts.path.display()
        )));
    }
    Ok(())
}

/// Cell ids in two files are an error naming one and its files.
fn check_shared_ids(
    parts: &[Part],
    ids: SharedIds,
    source: MatrixSource,
    policy: InputPolicy,
    layout: &CellTableLayout,
) -> Result<()> {
    let id_at = |f: usize, row: u64| -> Result<String> {
        let part = &parts[f];
        if part.kind == Kind::Store {
            let store = Store::open(&part.path).map_err(Error::stage(Stage::Read))?;
            let mut seen = 0u64;
            for obs in store.table(cpa_stream_schemas::StoreFiles::OBS).map_err(Error::stage(Stage::Read))? {
                let obs = obs.map_err(Error::stage(Stage::Read))?;
                if row < seen + obs.num_rows() as u64 {
                    let obs = part.obs.apply(&obs.slice((row - seen) as usize, 1))?;
                    return Ok(obs.column(0).as_string::<i32>().value(0).to_owned());
                }
                seen += obs.num_rows() as u64;
            }
            return Err(Error::InvalidInput(format!("{}: no cell {row}", part.path.display())));
        }
        if part.kind == Kind::Cells {
            let table = CellTable::open(&part.path, layout).map_err(Error::stage(Stage::Read))?;
            let id = table.cell_id(row).map_err(Error::stage(Stage::Read))?;
            return Ok(format!("{id}{}", part.obs.suffix().unwrap_or_default()));
        }
        let h5 = AnnDataReader::open(&part.path, source, policy).map_err(Error::stage(Stage::Read))?;
        let obs = part.obs.apply(&h5.read_obs(row..row + 1).map_err(Error::stage(Stage::Read))?)?;
        Ok(obs.column(0).as_string::<i32>().value(0).to_owned())
    };
    let Some(shared) = ids.finish(id_at)? else { return Ok(()) };
    let unique::SharedId { id, at: [(a, ra), (b, rb)] } = &shared.examples[0];
    Err(Error::InvalidInput(format!(
        "cell id {id:?} is in {} (cell {ra}) and in {} (cell {rb}){}: a store's cell ids are unique; \
         --make-unique appends each file's label to its cell ids (anndata's index_unique)",
        parts[*a].path.display(),
        parts[*b].path.display(),
        match shared.candidates {
            1 => String::new(),
            n => format!(", and about {} more ids are in two files", n - 1),
        }
    )))
}

/// The DEG table of the first file that has one, its genes named as the store names them.
fn read_degs(
    collection: &Collection,
    options: &ImportOptions,
    source: MatrixSource,
) -> Result<Option<(String, RecordBatch)>> {
    let mut first_error = None;
    for part in collection.parts.iter().filter(|p| p.kind != Kind::Cells) {
        if part.kind == Kind::Store {
            let store = Store::open(&part.path).map_err(Error::stage(Stage::Read))?;
            if !store.has_file(DEG_FILE) {
                continue;
            }
            let schema = store.table_schema(DEG_FILE).map_err(Error::stage(Stage::Read))?;
            let key = schema.metadata().get("uns_key").cloned().unwrap_or_else(|| "degs".to_owned());
            if options.deg_uns_key.as_ref().is_some_and(|k| *k != key) {
                continue;
            }
            let table = store.small_table(DEG_FILE).map_err(Error::stage(Stage::Read))?;
            // The store's own schema (without its metadata: the writer sets the key again).
            let plain = Arc::new(table.schema().as_ref().clone().with_metadata(HashMap::new()));
            let table = RecordBatch::try_new(plain, table.columns().to_vec());
            return Ok(Some((key, rename_deg_genes(part, table.map_err(Error::arrow("DEG table"))?)?)));
        }
        let h5 = AnnDataReader::open(&part.path, source, options.policy()).map_err(Error::stage(Stage::Read))?;
        match h5.read_degs(options.deg_uns_key.as_deref()) {
            Ok(Some((key, table))) => return Ok(Some((key, rename_deg_genes(part, table)?))),
            Ok(None) => {}
            Err(e) if collection.parts.len() > 1 && options.deg_uns_key.is_some() => {
                first_error.get_or_insert(e);
            }
            Err(e) => return Err(Error::stage(Stage::Read)(e)),
        }
    }
    match first_error {
        Some(e) => Err(Error::stage(Stage::Read)(e)),
        None => Ok(None),
    }
}

/// A file's DEG table with its genes (var index entries) named by the gene key.
fn rename_deg_genes(part: &Part, table: RecordBatch) -> Result<RecordBatch> {
    let Some(names) = &part.gene_names else { return Ok(table) };
    let column = table.schema().index_of(cpa_stream_schemas::tables::degs::GENE).map_err(Error::arrow("DEG table"))?;
    let genes = table.column(column).as_string::<i32>();
    let renamed: StringArray =
        genes.iter().map(|g| g.map(|g| names.get(g).map_or_else(|| g.to_owned(), Clone::clone))).collect();
    let mut columns = table.columns().to_vec();
    columns[column] = Arc::new(renamed);
    RecordBatch::try_new(table.schema(), columns).map_err(Error::arrow("DEG table"))
}

/// Writes a DEG table into the store being written, its `uns` key in the table's metadata;
/// returns the key and its rows.
fn write_degs(writer: &StoreWriter, key: &str, table: &RecordBatch) -> Result<(String, usize)> {
    let rows = table.num_rows();
    let metadata = HashMap::from([("uns_key".to_owned(), key.to_owned())]);
    let schema = Arc::new(table.schema().as_ref().clone().with_metadata(metadata));
    let table = table.clone().with_schema(Arc::clone(&schema)).map_err(Error::arrow("DEG table"))?;
    write_table(&writer.extra_file_path(DEG_FILE), schema, [table]).map_err(Error::stage(Stage::Write))?;
    Ok((key.to_owned(), rows))
}

/// Tables of an in-memory dataset (an AnnData in a Python process), in the store's schemas.
#[derive(Debug, Clone)]
pub struct Tables {
    /// The cells: first column `cell_id` (Utf8, not null), categoricals as
    /// [`categorical_field`](cpa_stream_schemas::tables::categorical_field)s.
    pub obs: RecordBatch,
    /// The genes: first column `gene_id` (Utf8, not null).
    pub var: RecordBatch,
    /// A DEG table ([`deg_schema`](cpa_stream_schemas::tables::deg_schema)) and the name of its
    /// source (an `uns` key), if any.
    pub degs: Option<(String, RecordBatch)>,
}

/// Imports a matrix given as chunks of CSR rows, in cell order, with its [`Tables`], into a new
/// store at `options.out`: the path of data already in memory (no `.h5ad` written in between).
/// `what` names the data in messages (`"AnnData (in memory)"`). Every row is checked as [`run`]
/// checks a file's (sorted column indices inside the genes, values finite and >= 0), and the
/// chunks must hold exactly the cells of `obs`.
pub fn run_chunks(
    what: &str,
    tables: &Tables,
    mut chunks: impl Iterator<Item = Result<CsrBatch>>,
    options: &ImportOptions,
    ctx: &RunContext,
) -> Result<ImportReport> {
    let (out, progress) = (options.out.as_path(), ctx.progress());
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let read = StageStats::new(Stage::Read, 1);
    let write = StageStats::new(Stage::Write, 1);
    let n_vars = u32::try_from(tables.var.num_rows())
        .map_err(|_| Error::InvalidInput(format!("{what}: {} genes exceed the u32 range", tables.var.num_rows())))?;
    let n_obs = tables.obs.num_rows() as u64;
    if n_obs == 0 && !options.allow_empty {
        return Err(Error::InvalidInput(format!(
            "{what}: no cells; nothing was written (allow_empty, --allow-empty, writes a store of no cells)"
        )));
    }
    if let Some((_, degs)) = &tables.degs {
        cpa_stream_schemas::tables::same_schema(&cpa_stream_schemas::tables::deg_schema(), degs.schema_ref())
            .map_err(|e| Error::InvalidInput(format!("{what}: DEG table: {e}")))?;
    }
    let writer_options = StoreWriterOptions {
        codec: options.codec,
        overwrite: options.overwrite,
        source: Some(format!("imported from {what}")),
        ..StoreWriterOptions::default()
    };
    let mut writer = StoreWriter::create(out, &tables.var, tables.obs.schema(), writer_options)
        .map_err(Error::stage(Stage::Write))?;
    let degs = tables.degs.as_ref().map(|(key, table)| write_degs(&writer, key, table)).transpose()?;
    progress.begin("cells", n_obs);
    let result = (|| {
        while let Some(rows) = read.busy(|| chunks.next()) {
            let rows = rows?;
            read.add(rows.n_rows() as u64, rows.byte_size());
            let first = writer.n_obs();
            if rows.n_cols() != n_vars {
                return Err(Error::InvalidInput(format!(
                    "{what}: cells {first}..: a chunk of {} columns for {n_vars} genes",
                    rows.n_cols()
                )));
            }
            let end = first + rows.n_rows() as u64;
            if end > n_obs {
                return Err(Error::InvalidInput(format!(
                    "{what}: the matrix has more rows than the {n_obs} cells of obs"
                )));
            }
            for r in 0..rows.n_rows() {
                let (indices, values) = rows.row(r);
                cpa_stream_stages::counts_csr::check_row(indices, values, n_vars)
                    .map_err(|e| Error::InvalidInput(format!("{what}: cell {}{e}", first + r as u64)))?;
            }
            let obs = tables.obs.slice(first as usize, rows.n_rows());
            write.busy(|| writer.push_rows(&rows, &obs)).map_err(Error::stage(Stage::Write))?;
            write.add(rows.n_rows() as u64, rows.byte_size());
            progress.advance(rows.n_rows() as u64);
            ctx.check_stopped()?;
        }
        Ok(())
    })();
    progress.end();
    result?;
    if writer.n_obs() != n_obs {
        return Err(Error::InvalidInput(format!("{what}: the matrix has {} rows for {n_obs} cells", writer.n_obs())));
    }
    let manifest = write.busy(|| writer.finish()).map_err(Error::stage(Stage::Write))?;
    let wall = started.elapsed();
    let bytes = read.report().bytes;
    Ok(ImportReport {
        cells_per_s: manifest.n_obs as f64 / wall.as_secs_f64().max(1e-9),
        input_mb_per_s: bytes as f64 / 1e6 / wall.as_secs_f64().max(1e-9),
        manifest,
        layout: "csr".to_owned(),
        inputs: vec![InputReport {
            path: PathBuf::from(what),
            cells: n_obs,
            genes: n_vars as usize,
            genes_kept: n_vars as usize,
            layout: "csr".to_owned(),
            skipped_columns: Vec::new(),
            missing_chunks: Vec::new(),
        }],
        degs,
        shuffle_seed: None,
        append: None,
        report: RunReport { wall, stages: vec![read.report(), write.report()], memory: sampler.finish() },
    })
}
