//! Counterfactual prediction as a stream of Arrow record batches: obs selection -> gather workers
//! -> predictor (the thread that owns the model) -> consumer (the Parquet sink, or a library
//! caller through [`PredictionStream`], a `RecordBatchReader`).
//!
//! Source cells (by default the control cells) are encoded, keep their `z_basal`, get each
//! target's perturbations, doses and covariates added, and are decoded with their own library
//! size. Without targets, each cell is reconstructed under its own condition. Every stage holds
//! a bounded number of batches: host memory depends on batch size, prefetch depth, genes and
//! targets, never on the number of cells.

pub mod expr;
pub mod targets;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use arrow::array::StringDictionaryBuilder;
use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, RecordBatchReader, StringArray};
use arrow::buffer::{Buffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Int32Type, SchemaRef};
use arrow::error::ArrowError;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_schemas::tables::{CELL_ID, prediction_schema};
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::device_memory::{self, DeviceMemory};
use cpa_stream_stages::h5ad::{DEG_FILE, DEG_GENE, DEG_GROUP, DEG_RANK};
use cpa_stream_stages::model::batch::{DevicePerts, densify_range};
use cpa_stream_stages::model::layers::Noise;
use cpa_stream_stages::model::vocab::split_condition;
use cpa_stream_stages::model::{CpaModel, Vocabulary, load_model_for, read_model_file};
use cpa_stream_stages::sink::{ParquetSink, SinkOptions, SinkSummary};
use cpa_stream_stages::store::{Store, read_table};
use crossbeam_channel::{Receiver, Sender, bounded};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::metrics::{MemorySampler, RunReport, StageStats, release_free_memory};
use crate::progress::Progress;
use crate::train::MODEL_DIR;
use crate::train::encoder::{TextColumn, column_strings, gene_names};
use expr::Expr;
use targets::{Target, TargetSpec, known, resolve_target};

/// Which genes' predicted means are written.
#[derive(Debug, Clone, PartialEq)]
pub enum GeneSelection {
    All,
    /// The union of each target's top-K differentially expressed genes (from the store's DEG
    /// table or `--degs`), in the model's gene order.
    TopDeg(usize),
    /// These genes, in this order.
    Names(Vec<String>),
}

impl GeneSelection {
    /// `all`, `top-deg:K`, or a file with one gene name per line.
    pub fn parse(text: &str) -> Result<GeneSelection> {
        if text == "all" {
            return Ok(GeneSelection::All);
        }
        if let Some(k) = text.strip_prefix("top-deg:") {
            let k: usize = k
                .parse()
                .ok()
                .filter(|&k| k > 0)
                .ok_or_else(|| Error::InvalidInput(format!("--genes {text:?}: K must be a positive integer")))?;
            return Ok(GeneSelection::TopDeg(k));
        }
        let path = Path::new(text);
        let body = std::fs::read_to_string(path).map_err(|e| {
            Error::InvalidInput(format!("--genes {text:?}: not all, top-deg:K or a readable gene list file ({e})"))
        })?;
        let genes: Vec<String> =
            body.lines().map(|l| l.trim().trim_matches('"').to_owned()).filter(|l| !l.is_empty()).collect();
        if genes.is_empty() {
            return Err(Error::InvalidInput(format!("{text}: no gene names")));
        }
        Ok(GeneSelection::Names(genes))
    }
}

/// The k-th of n contiguous cell ranges (0-based), for job arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Shard {
    /// `k/n` with `0 <= k < n`.
    pub fn parse(text: &str) -> Result<Shard> {
        let bad = || Error::InvalidInput(format!("--shard {text:?}: expected k/n with 0 <= k < n (0-based)"));
        let (k, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count): (u64, u64) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// The rows of this shard among `n_cells`.
    pub fn rows(&self, n_cells: u64) -> Range<u64> {
        let at = |k: u64| (u128::from(n_cells) * u128::from(k) / u128::from(self.count)) as u64;
        at(self.index)..at(self.index + 1)
    }

    /// The file name of this shard inside a dataset directory.
    pub fn file_name(&self) -> String {
        let width = (self.count - 1).max(1).ilog10() as usize + 1;
        format!("part-{:0width$}-of-{:0width$}.parquet", self.index, self.count)
    }
}

/// What to predict.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// A run directory (its `model/` is used) or a model directory.
    pub model: PathBuf,
    pub store: PathBuf,
    /// Source cells: an [`Expr`] over obs columns; `None` selects the control cells.
    pub source: Option<String>,
    /// Targets; empty reconstructs each cell under its own condition.
    pub targets: Vec<TargetSpec>,
    pub genes: GeneSelection,
    /// A DEG table (`group`, `rank`, `gene`) for `top-deg:K`, instead of the store's.
    pub degs: Option<PathBuf>,
    /// Latent columns to write ([`cpa_stream_schemas::tables::predictions::LATENTS`]).
    pub latents: Vec<String>,
    pub shard: Option<Shard>,
    pub device: Device,
    pub batch_size: usize,
    pub workers: usize,
    /// Batches buffered between stages.
    pub prefetch: usize,
    /// Seed of the posterior draws of a variational model.
    pub seed: u64,
}

impl PredictOptions {
    /// Options with the defaults of the command line.
    pub fn new(model: impl Into<PathBuf>, store: impl Into<PathBuf>) -> PredictOptions {
        PredictOptions {
            model: model.into(),
            store: store.into(),
            source: None,
            targets: Vec::new(),
            genes: GeneSelection::All,
            degs: None,
            latents: Vec::new(),
            shard: None,
            device: Device::Cpu,
            batch_size: 1024,
            workers: 2,
            prefetch: 2,
            seed: 0,
        }
    }
}

/// The model directory of `path`: `path` itself when it holds `model.json`, else `path/model`.
pub fn model_dir(path: &Path) -> Result<PathBuf> {
    if path.join(cpa_stream_stages::model::files::MODEL_FILE).is_file() {
        return Ok(path.to_owned());
    }
    let inner = path.join(MODEL_DIR);
    if inner.join(cpa_stream_stages::model::files::MODEL_FILE).is_file() {
        return Ok(inner);
    }
    Err(Error::InvalidInput(format!(
        "{}: neither a model directory (model.json) nor a training run with a finished model/",
        path.display()
    )))
}

/// The obs columns of a model's data: perturbation key and dose key.
#[derive(Debug, Clone, PartialEq)]
pub struct ObsKeys {
    pub perturbation: String,
    pub dose: Option<String>,
    /// The name of the dose column in outputs (`dose` when the model had none).
    pub dose_output: String,
}

impl ObsKeys {
    pub fn of(vocab: &Vocabulary) -> ObsKeys {
        let (perturbation, dose) = match &vocab.data {
            Some(d) => (d.perturbation_key.clone(), d.dose_key.clone()),
            None => ("condition".to_owned(), None),
        };
        let dose_output = dose.clone().unwrap_or_else(|| "dose".to_owned());
        ObsKeys { perturbation, dose, dose_output }
    }
}

/// The labels of one kind of source cell (condition, doses, covariates), resolved against the
/// model's vocabulary where it could be.
#[derive(Debug)]
struct CellGroup {
    condition: String,
    dose: String,
    /// `Err`: why the condition does not fit the model (an error only where it is needed).
    parts: std::result::Result<Vec<(u32, f32)>, String>,
    covariates: Vec<Option<u32>>,
    covariate_values: Vec<String>,
}

/// A run of selected source cells.
struct Chunk {
    rows: Vec<u64>,
    ids: Vec<String>,
    groups: Vec<Arc<CellGroup>>,
}

/// A chunk with its counts gathered from the store.
struct Gathered {
    chunk: Chunk,
    counts: CsrBatch,
}

/// A prepared prediction: model loaded, targets and genes resolved, output schema known.
pub struct Predictor {
    store: Arc<Store>,
    model: CpaModel,
    keys: ObsKeys,
    source: Expr,
    targets: Vec<Target>,
    gene_index: Option<Vec<i64>>,
    genes: Vec<String>,
    latents: Vec<String>,
    schema: SchemaRef,
    rows: Range<u64>,
    options: PredictOptions,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor")
            .field("store", &self.store.path())
            .field("targets", &self.targets.len())
            .field("genes", &self.genes.len())
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl Predictor {
    /// Loads the model, checks it against the store, and resolves source, targets and genes.
    pub fn open(options: &PredictOptions) -> Result<Predictor> {
        let stage = |stage: &'static str| move |source| Error::Stage { stage, source };
        let dir = model_dir(&options.model)?;
        let file = read_model_file(&dir).map_err(stage("predictor"))?;
        let store = Store::open(&options.store).map_err(stage("reader"))?;
        let store_genes = gene_names(&store)?;
        let model = load_model_for(&dir, &store_genes, &options.store.display().to_string(), options.device)
            .map_err(stage("predictor"))?;
        let vocab = &file.vocabulary;
        let keys = ObsKeys::of(vocab);
        let source = match &options.source {
            Some(text) => Expr::parse(text)?,
            None => Expr::Eq(keys.perturbation.clone(), vocab.control().to_owned()),
        };
        let max_comb_len = file.config.model.max_comb_len;
        let targets = options
            .targets
            .iter()
            .map(|spec| resolve_target(spec, vocab, &keys.perturbation, keys.dose.as_deref(), max_comb_len))
            .collect::<Result<Vec<_>>>()?;
        let (gene_index, genes) =
            select_genes(&options.genes, vocab, &targets, &keys, &store, options.degs.as_deref())?;
        let mut label_columns = vec![keys.perturbation.clone(), keys.dose_output.clone()];
        label_columns.extend(vocab.covariates.iter().map(|c| c.name.clone()));
        let latent_width = i32::try_from(file.config.model.n_latent).unwrap_or(i32::MAX);
        let schema = prediction_schema(&label_columns, &genes, &options.latents, latent_width)
            .map_err(|e| Error::InvalidInput(format!("predictions of {}: {e}", dir.display())))?;
        let mut metadata = schema.metadata().clone();
        metadata.insert(cpa_stream_schemas::tables::predictions::MODEL_KEY.to_owned(), dir.display().to_string());
        let schema = Arc::new(schema.as_ref().clone().with_metadata(metadata));
        let rows = options.shard.map_or(0..store.n_obs(), |s| s.rows(store.n_obs()));
        Ok(Predictor {
            store: Arc::new(store),
            model,
            keys,
            source,
            targets,
            gene_index,
            genes,
            latents: options.latents.clone(),
            schema,
            rows,
            options: options.clone(),
        })
    }

    /// The schema of every batch.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// The genes of the `mean` column, in order.
    pub fn genes(&self) -> &[String] {
        &self.genes
    }

    /// The resolved targets (empty: reconstruction).
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Store rows this prediction reads (the shard).
    pub fn rows(&self) -> Range<u64> {
        self.rows.clone()
    }

    /// Starts the stages and returns the stream of record batches.
    pub fn stream(self) -> PredictionStream {
        PredictionStream::start(self)
    }
}

/// The chosen genes: indices into the model's genes (`None` for all) and names.
fn select_genes(
    selection: &GeneSelection,
    vocab: &Vocabulary,
    targets: &[Target],
    keys: &ObsKeys,
    store: &Store,
    degs: Option<&Path>,
) -> Result<(Option<Vec<i64>>, Vec<String>)> {
    let position: HashMap<&str, usize> = vocab.genes.iter().enumerate().map(|(i, g)| (g.as_str(), i)).collect();
    match selection {
        GeneSelection::All => Ok((None, vocab.genes.clone())),
        GeneSelection::Names(names) => {
            let mut index = Vec::with_capacity(names.len());
            for (line, name) in names.iter().enumerate() {
                let i = position.get(name.as_str()).ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "gene list, entry {}: {name:?} is not one of the model's genes",
                        line + 1
                    ))
                })?;
                index.push(*i as i64);
            }
            Ok((Some(index), names.clone()))
        }
        GeneSelection::TopDeg(k) => {
            if targets.is_empty() {
                return Err(Error::InvalidInput("--genes top-deg:K needs --target or --targets".into()));
            }
            let path = degs.map(Path::to_owned).unwrap_or_else(|| store.file_path(DEG_FILE));
            let lists = read_deg_lists(&path)?;
            let mut chosen = vec![false; vocab.genes.len()];
            for target in targets {
                let list =
                    deg_keys(target, vocab, keys).into_iter().find_map(|key| lists.get(&key)).ok_or_else(|| {
                        Error::InvalidInput(format!(
                            "{}: no DEG list for target {} (tried {}; groups there: {})",
                            path.display(),
                            target.condition,
                            deg_keys(target, vocab, keys).join(", "),
                            known(lists.keys())
                        ))
                    })?;
                for gene in list.iter().take(*k) {
                    if let Some(&i) = position.get(gene.as_str()) {
                        chosen[i] = true;
                    }
                }
            }
            let index: Vec<i64> = (0..chosen.len()).filter(|&i| chosen[i]).map(|i| i as i64).collect();
            let names = index.iter().map(|&i| vocab.genes[i as usize].clone()).collect();
            Ok((Some(index), names))
        }
    }
}

/// Group names a DEG table may use for a target: `<covariates>_<condition>_<dose>`,
/// `<covariates>_<condition>`, `<condition>` (the last also in canonical part order).
pub fn deg_keys(target: &Target, vocab: &Vocabulary, keys: &ObsKeys) -> Vec<String> {
    let covs: Vec<&str> = (0..vocab.covariates.len()).filter_map(|c| target.covariate_value(vocab, c)).collect();
    let prefix = if covs.is_empty() { String::new() } else { format!("{}_", covs.join("_")) };
    let mut out = Vec::new();
    if keys.dose.is_some() {
        out.push(format!("{prefix}{}_{}", target.condition, target.dose));
    }
    out.push(format!("{prefix}{}", target.condition));
    out.push(target.condition.clone());
    out.push(cpa_stream_stages::model::vocab::canonical_condition(&target.condition));
    out.dedup();
    out
}

/// Reads a DEG table (`group`, `rank`, `gene`): each group's genes in rank order.
pub fn read_deg_lists(path: &Path) -> Result<HashMap<String, Vec<String>>> {
    if !path.exists() {
        return Err(Error::InvalidInput(format!(
            "{}: no DEG table (import one with the .h5ad, run `cpa-stream evaluate` and pass its degs.parquet with \
             --degs, or give a gene list file)",
            path.display()
        )));
    }
    let origin = path.display().to_string();
    let mut lists: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for batch in read_table(path).map_err(|source| Error::Stage { stage: "degs", source })? {
        let batch = batch.map_err(|source| Error::Stage { stage: "degs", source })?;
        let (group, gene) = (column_strings(&batch, DEG_GROUP, &origin)?, column_strings(&batch, DEG_GENE, &origin)?);
        let rank = column_strings(&batch, DEG_RANK, &origin)?;
        for i in 0..batch.num_rows() {
            let (Some(g), Some(name)) = (group.get(i), gene.get(i)) else { continue };
            let r = rank.get(i).and_then(|r| r.parse::<i64>().ok()).unwrap_or(i64::MAX);
            lists.entry(g.to_owned()).or_default().push((r, name.to_owned()));
        }
    }
    Ok(lists
        .into_iter()
        .map(|(g, mut v)| {
            v.sort();
            (g, v.into_iter().map(|(_, n)| n).collect())
        })
        .collect())
}

/// Stage statistics of a prediction stream.
#[derive(Debug, Clone)]
pub struct PredictStats {
    pub source: Arc<StageStats>,
    pub batcher: Arc<StageStats>,
    pub predictor: Arc<StageStats>,
}

/// Predictions as they are computed: an iterator of record batches (a `RecordBatchReader`),
/// fed by background stages through bounded channels. Dropping it stops the stages.
pub struct PredictionStream {
    schema: SchemaRef,
    output: Option<Receiver<Result<RecordBatch>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    stats: PredictStats,
    /// Source cells selected so far (known once the stream ends).
    selected: Arc<std::sync::atomic::AtomicU64>,
    /// Store rows of the shard that the predictor has passed.
    scanned: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for PredictionStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PredictionStream").field("schema", &self.schema).finish_non_exhaustive()
    }
}

impl PredictionStream {
    fn start(predictor: Predictor) -> PredictionStream {
        let Predictor { store, model, keys, source, targets, gene_index, genes: _, latents, schema, rows, options } =
            predictor;
        let workers = options.workers.max(1);
        let depth = options.prefetch.max(1);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = PredictStats {
            source: StageStats::new("source", 1),
            batcher: StageStats::new("batcher", workers),
            predictor: StageStats::new("predictor", 1),
        };
        let selected = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let scanned = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let first_row = rows.start;
        let vocab = model.vocabulary().clone();
        let mut threads = Vec::new();

        // Gather workers: chunk k goes to worker k % workers; outputs are read in the same order.
        let (spare_tx, spare_rx) = bounded::<CsrBatch>(workers * (depth + 1) + 2);
        let mut job_txs = Vec::with_capacity(workers);
        let mut gathered_rxs = Vec::with_capacity(workers);
        let genes = store.n_vars() as u32;
        for _ in 0..workers {
            let (job_tx, job_rx) = bounded::<Result<Chunk>>(depth);
            let (out_tx, out_rx) = bounded::<Result<Gathered>>(depth);
            job_txs.push(job_tx);
            gathered_rxs.push(out_rx);
            let (store, stats, spare_rx, stop) =
                (Arc::clone(&store), Arc::clone(&stats.batcher), spare_rx.clone(), Arc::clone(&stop));
            threads.push(std::thread::spawn(move || {
                gather_worker(&store, &job_rx, &out_tx, &spare_rx, &stats, &stop, genes)
            }));
        }

        // Source selection over obs.
        {
            let (store, stats, stop, selected) =
                (Arc::clone(&store), Arc::clone(&stats.source), Arc::clone(&stop), Arc::clone(&selected));
            let vocab = vocab.clone();
            let keys = keys.clone();
            let need = Needs::of(&targets, &vocab);
            let batch_size = options.batch_size.max(1);
            let max_comb_len = model.config().model.max_comb_len;
            threads.push(std::thread::spawn(move || {
                let mut select = Select {
                    store: &store,
                    vocab: &vocab,
                    keys: &keys,
                    source: &source,
                    rows,
                    need,
                    batch_size,
                    max_comb_len,
                };
                select.run(&job_txs, &stats, &stop, &selected);
            }));
        }

        // The predictor: owns the model.
        let (out_tx, out_rx) = bounded::<Result<RecordBatch>>(depth);
        {
            let (stats, stop, schema) = (Arc::clone(&stats.predictor), Arc::clone(&stop), Arc::clone(&schema));
            let scanned = Arc::clone(&scanned);
            let seed = options.seed;
            threads.push(std::thread::spawn(move || {
                let mut work = Work {
                    model: &model,
                    vocab: &vocab,
                    targets: &targets,
                    gene_index: gene_index.as_deref(),
                    gene_tensor: None,
                    latents: &latents,
                    schema,
                    noise: Noise::new(Xoshiro256PlusPlus::seed_from_u64(seed), model.device()),
                    pools: vec![BufferPool::default(); 1 + latents.len()],
                };
                let mut k = 0usize;
                while let Some(item) = stats.recv(&gathered_rxs[k % gathered_rxs.len()]) {
                    k += 1;
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let gathered = match item {
                        Ok(g) => g,
                        Err(e) => {
                            let _ = out_tx.send(Err(e));
                            return;
                        }
                    };
                    // Each step's batches go out before the next step runs: memory in flight is
                    // a step's output, not a whole batch's.
                    let conditions = match stats.busy(|| work.conditions(&gathered)) {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = out_tx.send(Err(e));
                            return;
                        }
                    };
                    for rows in work.steps(gathered.chunk.rows.len()) {
                        match stats.busy(|| work.step(&gathered, &conditions, rows)) {
                            Ok(batches) => {
                                for b in batches {
                                    stats.add(b.num_rows() as u64, b.get_array_memory_size() as u64);
                                    if !stats.send(&out_tx, Ok(b)) {
                                        return;
                                    }
                                }
                            }
                            Err(e) => {
                                let _ = out_tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    if let Some(&last) = gathered.chunk.rows.last() {
                        scanned.store(last + 1 - first_row, Ordering::Relaxed);
                    }
                    let _ = spare_tx.try_send(gathered.counts);
                }
            }));
        }
        PredictionStream { schema, output: Some(out_rx), stop, threads, stats, selected, scanned }
    }

    /// Per-stage statistics (busy, blocked, rows, bytes).
    pub fn stats(&self) -> &PredictStats {
        &self.stats
    }

    /// Source cells selected so far.
    pub fn source_cells(&self) -> u64 {
        self.selected.load(Ordering::Relaxed)
    }

    /// Store rows of the shard whose source cells have been predicted.
    pub fn rows_done(&self) -> u64 {
        self.scanned.load(Ordering::Relaxed)
    }

    /// Exports the stream through the Arrow C stream interface, for other runtimes (pyarrow's
    /// `RecordBatchReader._import_from_c`, DuckDB, R's nanoarrow, ...).
    pub fn into_ffi(self) -> arrow::ffi_stream::FFI_ArrowArrayStream {
        arrow::ffi_stream::FFI_ArrowArrayStream::new(Box::new(self))
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.output.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Iterator for PredictionStream {
    type Item = std::result::Result<RecordBatch, ArrowError>;

    fn next(&mut self) -> Option<Self::Item> {
        let next = self.output.as_ref()?.recv().ok();
        match next {
            Some(Ok(b)) => Some(Ok(b)),
            Some(Err(e)) => {
                self.shutdown();
                Some(Err(ArrowError::ExternalError(Box::new(e))))
            }
            None => {
                self.shutdown();
                None
            }
        }
    }
}

impl RecordBatchReader for PredictionStream {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

impl Drop for PredictionStream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Which per-cell labels must resolve against the model: the perturbations (reconstruction)
/// and each covariate that some target leaves to the source cell.
#[derive(Debug, Clone)]
struct Needs {
    parts: bool,
    covariates: Vec<bool>,
}

impl Needs {
    fn of(targets: &[Target], vocab: &Vocabulary) -> Needs {
        let n = vocab.covariates.len();
        Needs {
            parts: targets.is_empty(),
            covariates: (0..n)
                .map(|c| targets.is_empty() || targets.iter().any(|t| t.covariates[c].is_none()))
                .collect(),
        }
    }
}

struct Select<'a> {
    store: &'a Store,
    vocab: &'a Vocabulary,
    keys: &'a ObsKeys,
    source: &'a Expr,
    rows: Range<u64>,
    need: Needs,
    batch_size: usize,
    max_comb_len: usize,
}

impl Select<'_> {
    fn run(
        &mut self,
        jobs: &[Sender<Result<Chunk>>],
        stats: &StageStats,
        stop: &AtomicBool,
        selected: &std::sync::atomic::AtomicU64,
    ) {
        let mut k = 0usize;
        let send = |chunk: Result<Chunk>, k: &mut usize| -> bool {
            let ok = stats.send(&jobs[*k % jobs.len()], chunk);
            *k += 1;
            ok
        };
        let mut chunk = Chunk { rows: Vec::new(), ids: Vec::new(), groups: Vec::new() };
        let mut lookup: HashMap<String, Arc<CellGroup>> = HashMap::new();
        let obs = self.store.file_path(StoreFiles::OBS);
        let origin = obs.display().to_string();
        let result = (|| -> Result<()> {
            let mut row = 0u64;
            for batch in read_table(&obs).map_err(|source| Error::Stage { stage: "source", source })? {
                let batch = batch.map_err(|source| Error::Stage { stage: "source", source })?;
                let n = batch.num_rows() as u64;
                if row + n <= self.rows.start {
                    row += n;
                    continue;
                }
                if row >= self.rows.end || stop.load(Ordering::Relaxed) {
                    break;
                }
                let chosen = stats.busy(|| self.source.select(&batch, &origin))?;
                let columns = stats.busy(|| self.columns(&batch, &origin))?;
                for (i, &take) in chosen.iter().enumerate() {
                    let r = row + i as u64;
                    if !take || !self.rows.contains(&r) {
                        continue;
                    }
                    let group = stats.busy(|| self.group(&columns, i, r, &mut lookup, &origin))?;
                    chunk.rows.push(r);
                    chunk.ids.push(columns.cell_id.as_ref().and_then(|c| c.get(i)).unwrap_or_default().to_owned());
                    chunk.groups.push(group);
                    selected.fetch_add(1, Ordering::Relaxed);
                    if chunk.rows.len() == self.batch_size {
                        stats.add(chunk.rows.len() as u64, chunk.rows.len() as u64 * 8);
                        let full = std::mem::replace(
                            &mut chunk,
                            Chunk { rows: Vec::new(), ids: Vec::new(), groups: Vec::new() },
                        );
                        if !send(Ok(full), &mut k) {
                            return Ok(());
                        }
                    }
                }
                row += n;
            }
            if !chunk.rows.is_empty() {
                stats.add(chunk.rows.len() as u64, chunk.rows.len() as u64 * 8);
                let last =
                    std::mem::replace(&mut chunk, Chunk { rows: Vec::new(), ids: Vec::new(), groups: Vec::new() });
                send(Ok(last), &mut k);
            }
            Ok(())
        })();
        if let Err(e) = result {
            send(Err(e), &mut k);
        }
    }

    fn columns(&self, batch: &RecordBatch, origin: &str) -> Result<LabelColumns> {
        let optional = |name: &str| batch.column_by_name(name).map(|_| column_strings(batch, name, origin)).transpose();
        let required = |name: &str, why: &str| -> Result<TextColumn> {
            if batch.column_by_name(name).is_none() {
                return Err(Error::InvalidInput(format!("{origin}: no obs column {name:?} ({why})")));
            }
            column_strings(batch, name, origin)
        };
        let perturbation = if self.need.parts {
            Some(required(&self.keys.perturbation, "the model's perturbation key, needed to reconstruct cells")?)
        } else {
            optional(&self.keys.perturbation)?
        };
        let dose = match &self.keys.dose {
            Some(d) if self.need.parts => Some(required(d, "the model's dose key")?),
            Some(d) => optional(d)?,
            None => None,
        };
        let covariates = self
            .vocab
            .covariates
            .iter()
            .zip(&self.need.covariates)
            .map(|(c, &need)| {
                if need {
                    required(&c.name, "a covariate of the model that the targets do not set").map(Some)
                } else {
                    optional(&c.name)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LabelColumns { cell_id: optional(CELL_ID)?, perturbation, dose, covariates })
    }

    fn group(
        &self,
        columns: &LabelColumns,
        i: usize,
        row: u64,
        lookup: &mut HashMap<String, Arc<CellGroup>>,
        origin: &str,
    ) -> Result<Arc<CellGroup>> {
        let condition = columns.perturbation.as_ref().and_then(|c| c.get(i)).unwrap_or("");
        let dose = columns.dose.as_ref().and_then(|c| c.get(i));
        let mut key = format!("{condition}\u{1f}{}", dose.unwrap_or(""));
        let values: Vec<&str> =
            columns.covariates.iter().map(|c| c.as_ref().and_then(|c| c.get(i)).unwrap_or("")).collect();
        for v in &values {
            key.push('\u{1f}');
            key.push_str(v);
        }
        let cell = || match columns.cell_id.as_ref().and_then(|c| c.get(i)) {
            Some(id) => format!("{origin}: row {row} (cell {id:?})"),
            None => format!("{origin}: row {row}"),
        };
        let group = match lookup.get(&key) {
            Some(g) => Arc::clone(g),
            None => {
                let index = self.vocab.perturbation_index();
                let parts = split_condition(condition, dose, self.max_comb_len).and_then(|parts| {
                    parts
                        .into_iter()
                        .map(|(name, d)| {
                            index.get(name).map(|&id| (id, d)).ok_or_else(|| {
                                format!(
                                    "perturbation {name:?} is not in the model's vocabulary ({})",
                                    known(&self.vocab.perturbations[1..])
                                )
                            })
                        })
                        .collect::<std::result::Result<Vec<_>, String>>()
                });
                let covariates = self
                    .vocab
                    .covariates
                    .iter()
                    .zip(&values)
                    .map(|(c, v)| c.categories.iter().position(|x| x == v).map(|p| p as u32))
                    .collect();
                let n_parts = condition.split('+').count();
                let group = Arc::new(CellGroup {
                    condition: condition.to_owned(),
                    dose: dose.map(str::to_owned).unwrap_or_else(|| vec!["1"; n_parts].join("+")),
                    parts,
                    covariates,
                    covariate_values: values.iter().map(|v| (*v).to_owned()).collect(),
                });
                lookup.insert(key, Arc::clone(&group));
                group
            }
        };
        if self.need.parts
            && let Err(reason) = &group.parts
        {
            return Err(Error::InvalidInput(format!("{}: {reason}", cell())));
        }
        for (c, cov) in self.vocab.covariates.iter().enumerate() {
            if self.need.covariates[c] && group.covariates[c].is_none() {
                return Err(Error::InvalidInput(format!(
                    "{}: {} {:?} is not a category the model knows ({})",
                    cell(),
                    cov.name,
                    group.covariate_values[c],
                    known(&cov.categories)
                )));
            }
        }
        Ok(group)
    }
}

struct LabelColumns {
    cell_id: Option<TextColumn>,
    perturbation: Option<TextColumn>,
    dose: Option<TextColumn>,
    covariates: Vec<Option<TextColumn>>,
}

fn gather_worker(
    store: &Store,
    jobs: &Receiver<Result<Chunk>>,
    out: &Sender<Result<Gathered>>,
    spare: &Receiver<CsrBatch>,
    stats: &StageStats,
    stop: &AtomicBool,
    genes: u32,
) {
    let mut cursor = match store.cursor() {
        Ok(c) => c,
        Err(source) => {
            let _ = out.send(Err(Error::Stage { stage: "batcher", source }));
            return;
        }
    };
    while let Some(job) = stats.recv(jobs) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let result = job.and_then(|chunk| {
            stats.busy(|| {
                let mut counts = spare.try_recv().unwrap_or_else(|_| CsrBatch::new(genes));
                counts.clear();
                cursor.gather(&chunk.rows, &mut counts).map_err(|source| Error::Stage { stage: "batcher", source })?;
                Ok(Gathered { chunk, counts })
            })
        });
        if let Ok(g) = &result {
            stats.add(g.chunk.rows.len() as u64, g.counts.byte_size());
        }
        let failed = result.is_err();
        if !stats.send(out, result) || failed {
            return;
        }
    }
}

/// The predictor's per-batch work.
struct Work<'a> {
    model: &'a CpaModel,
    vocab: &'a Vocabulary,
    targets: &'a [Target],
    gene_index: Option<&'a [i64]>,
    /// `gene_index` on the model's device, made on first use.
    gene_tensor: Option<Tensor>,
    latents: &'a [String],
    schema: SchemaRef,
    noise: Noise,
    /// Output buffers: the means, then each latent.
    pools: Vec<BufferPool>,
}

impl<'a> Work<'a> {
    /// The passes of a batch: one per target, or one reconstruction under each cell's own
    /// condition.
    fn passes(&self) -> Vec<Option<&'a Target>> {
        if self.targets.is_empty() { vec![None] } else { self.targets.iter().map(Some).collect() }
    }

    /// Per pass, the perturbation and covariate latents of every cell of the batch (cells x
    /// latent: small, computed once per batch).
    fn conditions(&self, gathered: &Gathered) -> Result<Conditions> {
        let torch = |source| Error::Stage { stage: "predictor", source };
        let device = self.model.device();
        let model = self.model;
        let n = gathered.chunk.rows.len();
        let groups = &gathered.chunk.groups;
        let mut conditions = Vec::new();
        for target in self.passes() {
            // Perturbations (CSR) and covariate codes of the target, per cell.
            let (mut ids, mut offsets, mut doses) = (Vec::new(), vec![0i64], Vec::new());
            let mut codes: Vec<Vec<i64>> = vec![Vec::with_capacity(n); self.vocab.covariates.len()];
            for g in groups {
                let parts: &[(u32, f32)] = match target {
                    Some(t) => &t.parts,
                    None => g.parts.as_deref().map_err(|e| Error::InvalidInput(e.clone()))?,
                };
                let mut sorted = parts.to_vec();
                sorted.sort_by_key(|p| p.0);
                ids.extend(sorted.iter().map(|p| i64::from(p.0)));
                doses.extend(sorted.iter().map(|p| p.1));
                offsets.push(ids.len() as i64);
                for (c, codes) in codes.iter_mut().enumerate() {
                    let code = target.and_then(|t| t.covariates[c]).or(g.covariates[c]).ok_or_else(|| {
                        Error::InvalidInput(format!(
                            "covariate {} of a source cell is unknown",
                            self.vocab.covariates[c].name
                        ))
                    })?;
                    codes.push(i64::from(code));
                }
            }
            let latents = tch::no_grad(|| -> cpa_stream_stages::Result<(Tensor, Vec<Tensor>)> {
                let to = |t: Tensor| -> cpa_stream_stages::Result<Tensor> { Ok(t.f_to_device(device)?) };
                let perts = DevicePerts {
                    ids: to(Tensor::f_from_slice(&ids)?)?,
                    offsets: to(Tensor::f_from_slice(&offsets)?)?,
                    doses: to(Tensor::f_from_slice(&doses)?)?,
                };
                let covs = codes
                    .iter()
                    .map(|c| to(Tensor::f_from_slice(c)?))
                    .collect::<cpa_stream_stages::Result<Vec<_>>>()?;
                Ok((model.perturbation_latent(&perts)?, model.covariate_latents(&covs)?))
            })
            .map_err(torch)?;
            conditions.push(latents);
        }
        Ok(conditions)
    }

    /// Rows `rows` of a batch through the model for every pass: one record batch per pass.
    fn step(&mut self, gathered: &Gathered, conditions: &Conditions, rows: Range<usize>) -> Result<Vec<RecordBatch>> {
        let torch = |source| Error::Stage { stage: "predictor", source };
        let device = self.model.device();
        let model = self.model;
        let (a, b) = (rows.start, rows.end);
        let n = b - a;
        if self.gene_tensor.is_none()
            && let Some(g) = self.gene_index
        {
            let t = Tensor::f_from_slice(g).and_then(|t| t.f_to_device(device)).map_err(|e| torch(e.into()))?;
            self.gene_tensor = Some(t);
        }
        let gene_index = self.gene_tensor.as_ref().map(Tensor::shallow_clone);
        let genes = self.gene_index.map_or(self.vocab.genes.len(), <[i64]>::len);
        let widths: Vec<usize> =
            std::iter::once(genes).chain(self.latents.iter().map(|_| model.config().model.n_latent)).collect();
        let slice = |t: &Tensor| t.f_narrow(0, a as i64, n as i64);
        let (z_draws, z_mean, library) = tch::no_grad(|| -> cpa_stream_stages::Result<_> {
            let (x, _) = densify_range(&gathered.counts, a..b, device)?;
            let (x_in, library) = model.input(&x)?;
            drop(x);
            let mean = model.encode(&x_in, false, false, &mut self.noise)?.z_basal;
            let draws = if model.is_variational() {
                model.basal_draws(&x_in, &mut self.noise)?
            } else {
                vec![mean.shallow_clone()]
            };
            Ok((draws, mean, library))
        })
        .map_err(torch)?;
        let mut batches = Vec::with_capacity(conditions.len());
        for (target, (z_pert, covs)) in self.passes().into_iter().zip(conditions) {
            let mut out: Vec<Vec<f32>> = widths.iter().zip(&self.pools).map(|(w, pool)| pool.take(n * w)).collect();
            tch::no_grad(|| -> cpa_stream_stages::Result<()> {
                let z_pert = slice(z_pert)?;
                let covs = covs.iter().map(slice).collect::<std::result::Result<Vec<_>, _>>()?;
                let mut mean = model.mean_over_draws(&z_draws, &z_pert, &covs, library.as_ref(), &mut self.noise)?;
                if let Some(index) = &gene_index {
                    mean = mean.f_index_select(1, index)?;
                }
                copy_values(&mean, &mut out[0])?;
                if !self.latents.is_empty() {
                    let l = model.compose(&z_mean, &z_pert, &covs)?;
                    for (k, name) in self.latents.iter().enumerate() {
                        let t = match name.as_str() {
                            "z_basal" => &l.z_basal,
                            "z" => &l.z,
                            "z_corrected" => &l.z_corrected,
                            "z_no_pert" => &l.z_no_pert,
                            _ => &l.z_no_pert_corrected,
                        };
                        copy_values(t, &mut out[1 + k])?;
                    }
                }
                Ok(())
            })
            .map_err(torch)?;
            let mut columns = out.into_iter().zip(&self.pools).map(|(values, pool)| pool.lend(values));
            let mean = columns.next().ok_or_else(|| Error::InvalidInput("no mean column".into()))?;
            batches.push(self.record_batch(&gathered.chunk, a..b, target, mean, columns.collect())?);
        }
        Ok(batches)
    }

    /// The row ranges a batch of `n` rows runs through the model in: on the CPU [`CPU_STEP_ROWS`]
    /// at a time, so that the transient tensors of the model (input, decoder output, softmax:
    /// each cells x genes) and the output batches in flight stay a few MB and the host memory of
    /// a prediction stays flat; a GPU gets the whole batch.
    fn steps(&self, n: usize) -> impl Iterator<Item = Range<usize>> + use<> {
        let step = if self.model.device().is_cuda() { n.max(1) } else { CPU_STEP_ROWS };
        (0..n).step_by(step).map(move |a| a..(a + step).min(n))
    }

    fn record_batch(
        &self,
        chunk: &Chunk,
        rows: Range<usize>,
        target: Option<&Target>,
        mean: HostValues,
        latents: Vec<HostValues>,
    ) -> Result<RecordBatch> {
        let arrow_err = |e: ArrowError| Error::InvalidInput(format!("building predictions: {e}"));
        let groups = &chunk.groups[rows.clone()];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(chunk.ids[rows.clone()].iter()))];
        let label = |value: &dyn Fn(&CellGroup) -> String| -> Result<ArrayRef> {
            let mut b = StringDictionaryBuilder::<Int32Type>::new();
            for g in groups {
                b.append(value(g)).map_err(arrow_err)?;
            }
            Ok(Arc::new(b.finish()))
        };
        match target {
            Some(t) => {
                columns.push(label(&|_| t.condition.clone())?);
                columns.push(label(&|_| t.dose.clone())?);
            }
            None => {
                columns.push(label(&|g| g.condition.clone())?);
                columns.push(label(&|g| g.dose.clone())?);
            }
        }
        for c in 0..self.vocab.covariates.len() {
            let fixed = target.and_then(|t| t.covariate_value(self.vocab, c)).map(str::to_owned);
            columns.push(label(&|g| fixed.clone().unwrap_or_else(|| g.covariate_values[c].clone()))?);
        }
        let vector = |values: HostValues, width: usize| -> Result<ArrayRef> {
            let item = Arc::new(Field::new("item", DataType::Float32, false));
            let width = i32::try_from(width).map_err(|_| Error::InvalidInput(format!("vector width {width}")))?;
            Ok(Arc::new(
                FixedSizeListArray::try_new(item, width, Arc::new(Float32Array::new(values, None)), None)
                    .map_err(arrow_err)?,
            ))
        };
        let n = rows.len().max(1);
        let gene_width = mean.len() / n;
        columns.push(vector(mean, gene_width)?);
        for values in latents {
            let width = values.len() / n;
            columns.push(vector(values, width)?);
        }
        RecordBatch::try_new(Arc::clone(&self.schema), columns).map_err(arrow_err)
    }
}

/// Per pass of a batch: the perturbation latent and the covariate latents of its cells.
type Conditions = Vec<(Tensor, Vec<Tensor>)>;

/// Float values on the host, ready to become an Arrow array.
type HostValues = ScalarBuffer<f32>;

/// Recycled host buffers for one output column. The predicted means of a batch (cells x genes
/// float32, 20 MB at 1,024 x 5,000) are the largest and longest-lived allocation of a prediction:
/// each lives from the predictor through the channel to the sink. Allocated afresh per batch
/// they fragment the allocator's heaps, and the resident memory of a run kept creeping for
/// hundreds of batches; recycled, a run reaches its steady state within a few batches.
#[derive(Clone, Default)]
struct BufferPool {
    free: Arc<Mutex<Vec<Vec<f32>>>>,
}

/// Buffers a pool keeps; more in flight (a consumer holding batches) are freed on return.
const POOL_KEEP: usize = 8;

/// A pooled buffer lent to Arrow: returns to its pool when the last array using it is dropped.
struct Lent {
    values: Vec<f32>,
    pool: Arc<Mutex<Vec<Vec<f32>>>>,
}

impl Drop for Lent {
    fn drop(&mut self) {
        let values = std::mem::take(&mut self.values);
        if let Ok(mut free) = self.pool.lock()
            && free.len() < POOL_KEEP
        {
            free.push(values);
        }
    }
}

impl BufferPool {
    /// A buffer of `len` values: a returned one of that length, else a new one (zeroed).
    fn take(&self, len: usize) -> Vec<f32> {
        let reused = self.free.lock().ok().and_then(|mut free| {
            let at = free.iter().position(|v| v.len() == len)?;
            Some(free.swap_remove(at))
        });
        reused.unwrap_or_else(|| vec![0.0; len])
    }

    /// `values` as an Arrow buffer that returns them to this pool once the last array using it
    /// is dropped.
    fn lend(&self, mut values: Vec<f32>) -> HostValues {
        let len = values.len();
        let Some(ptr) = NonNull::new(values.as_mut_ptr().cast::<u8>()) else {
            return ScalarBuffer::from(values);
        };
        let lent = Lent { values, pool: Arc::clone(&self.free) };
        // SAFETY: `ptr` points to the `len` initialised f32 values of `lent.values`, a vector that
        // `lent` owns and never resizes or writes while the buffer exists (it is only taken back
        // in `Drop`, after the last reference to the buffer is gone); the heap allocation does
        // not move when `lent` does. The pointer is non-null and aligned for f32.
        let buffer = unsafe { Buffer::from_custom_allocation(ptr, len * std::mem::size_of::<f32>(), Arc::new(lent)) };
        ScalarBuffer::new(buffer, 0, len)
    }
}

/// Rows the predictor runs the model on at a time on the CPU (see [`Work::steps`]).
const CPU_STEP_ROWS: usize = 256;

/// Copies the values of `t` (any float kind, any device) into `out`, which must hold exactly as
/// many.
fn copy_values(t: &Tensor, out: &mut [f32]) -> cpa_stream_stages::Result<()> {
    let host = t.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
    if host.numel() != out.len() {
        return Err(cpa_stream_stages::Error::InvalidInput(format!(
            "{} predicted values for an output of {}",
            host.numel(),
            out.len()
        )));
    }
    if !out.is_empty() {
        host.f_copy_data(out, out.len())?;
    }
    Ok(())
}

/// What [`run_predict`] did.
#[derive(Debug, Clone, Serialize)]
pub struct PredictReport {
    pub output: SinkSummary,
    pub source_cells: u64,
    pub targets: usize,
    pub genes: usize,
    pub seconds: f64,
    /// Source cells per second (each decoded into every target).
    pub cells_per_s: f64,
    pub rows_per_s: f64,
    pub bytes_per_row: f64,
    /// The same predicted means as raw float32 (genes x 4 bytes per row).
    pub raw_f32_bytes_per_row: f64,
    pub report: RunReport,
    /// The CUDA caching allocator's counts at the end, peaks since the model loaded (`None` on
    /// the CPU).
    pub device_memory: Option<DeviceMemory>,
}

/// Runs a prediction into a Parquet file (`out`; with a shard, `out` is a dataset directory and
/// the file is the shard's part). The file appears only when complete.
pub fn run_predict(
    options: &PredictOptions,
    out: &Path,
    sink_options: &SinkOptions,
    progress: &dyn Progress,
) -> Result<PredictReport> {
    let wall = Instant::now();
    let sampler = MemorySampler::start();
    let path = match options.shard {
        Some(shard) => {
            std::fs::create_dir_all(out).map_err(|e| Error::InvalidInput(format!("{}: {e}", out.display())))?;
            out.join(shard.file_name())
        }
        None => out.to_owned(),
    };
    let predictor = Predictor::open(options)?;
    device_memory::reset_peak(options.device);
    let (genes, targets) = (predictor.genes().len(), predictor.targets().len().max(1));
    let rows = predictor.rows();
    let mut sink = ParquetSink::create(&path, predictor.schema(), sink_options)
        .map_err(|source| Error::Stage { stage: "sink", source })?;
    let sink_stats = StageStats::new("sink", 1);
    let start = Instant::now();
    progress.begin("predict", rows.end - rows.start);
    let mut stream = predictor.stream();
    let mut written_cells = 0u64;
    let mut reported = 0u64;
    loop {
        let next = sink_stats.blocked_in(|| stream.next());
        let Some(batch) = next else { break };
        let batch = batch.map_err(|e| match e {
            ArrowError::ExternalError(inner) => match inner.downcast::<Error>() {
                Ok(e) => *e,
                Err(other) => Error::InvalidInput(other.to_string()),
            },
            other => Error::InvalidInput(other.to_string()),
        })?;
        let flushed = sink.row_groups_written();
        sink_stats.busy(|| sink.write(&batch)).map_err(|source| Error::Stage { stage: "sink", source })?;
        if sink.row_groups_written() > flushed {
            sink_stats.busy(release_free_memory);
        }
        sink_stats.add(batch.num_rows() as u64, batch.get_array_memory_size() as u64);
        written_cells += batch.num_rows() as u64;
        let done = stream.rows_done();
        progress.advance(done.saturating_sub(reported));
        reported = reported.max(done);
    }
    progress.advance((rows.end - rows.start).saturating_sub(reported));
    let source_cells = stream.source_cells();
    let stats = stream.stats().clone();
    drop(stream);
    let output = sink_stats.busy(|| sink.finish()).map_err(|source| Error::Stage { stage: "sink", source })?;
    progress.end();
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    let report = RunReport {
        wall: wall.elapsed(),
        stages: vec![stats.source.report(), stats.batcher.report(), stats.predictor.report(), sink_stats.report()],
        memory: sampler.finish(),
    };
    let rows_out = output.rows.max(1) as f64;
    Ok(PredictReport {
        bytes_per_row: output.bytes as f64 / rows_out,
        raw_f32_bytes_per_row: genes as f64 * 4.0,
        output,
        source_cells,
        targets,
        genes,
        seconds,
        cells_per_s: source_cells as f64 / seconds,
        rows_per_s: written_cells as f64 / seconds,
        report,
        device_memory: device_memory::stats(options.device),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lent_buffers_keep_their_values_and_return_to_the_pool() {
        let pool = BufferPool::default();
        let mut values = pool.take(6);
        values.copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let address = values.as_ptr();
        let array = Float32Array::new(pool.lend(values), None);
        let slice = array.slice(2, 3);
        drop(array);
        // A slice still holds the buffer: nothing returned yet, the values are intact.
        assert_eq!(slice.values().as_ref(), &[3.0, 4.0, 5.0]);
        assert_eq!(pool.free.lock().map(|f| f.len()).unwrap_or(usize::MAX), 0);
        drop(slice);
        let again = pool.take(6);
        assert_eq!(again.as_ptr(), address, "the dropped buffer is reused");
        assert_eq!(pool.take(6).len(), 6, "an empty pool allocates");
        assert_eq!(pool.take(4).len(), 4, "other lengths get their own buffers");
    }

    #[test]
    fn a_pool_keeps_a_bounded_number_of_buffers() {
        let pool = BufferPool::default();
        let lent: Vec<HostValues> = (0..POOL_KEEP + 5).map(|_| pool.lend(pool.take(3))).collect();
        drop(lent);
        assert_eq!(pool.free.lock().map(|f| f.len()).unwrap_or(0), POOL_KEEP);
    }
}
