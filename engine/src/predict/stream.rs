//! The prediction stream: source selection -> batcher -> predictor, on threads joined by bounded
//! channels, read as an iterator of record batches (an Arrow `RecordBatchReader`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow_array::{RecordBatch, RecordBatchReader};
use arrow_schema::ArrowError;
use arrow_schema::SchemaRef;
use cpa_stream_stages::store::BlockCacheShared;
use crossbeam_channel::{Receiver, Sender, bounded};

use super::select::{Needs, Select};
use crate::Stage;
use crate::predictor::{Predictor, SourceCells};
use cpa_stream_pipeline::batcher::{Loaded, LoaderOptions, PoolStats, spawn_fed};
use cpa_stream_pipeline::crew::Crew;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::telemetry::StageStats;

/// Stage statistics of a prediction stream.
#[derive(Debug, Clone)]
pub struct PredictStats {
    /// Source selection over obs.
    pub source: Arc<StageStats>,
    /// The gather workers.
    pub batcher: Arc<StageStats>,
    /// The model.
    pub predictor: Arc<StageStats>,
    /// A compressed store's blocks decoded (each once per pass when all goes to plan).
    pub blocks: Arc<BlockCacheShared>,
}

/// Predictions as they are computed: an iterator of record batches (a `RecordBatchReader`),
/// fed by background stages through bounded channels. Dropping it stops the stages. A stage that
/// fails or panics ends the stream with an error naming it, never early.
pub struct PredictionStream {
    schema: SchemaRef,
    output: Option<Receiver<Result<RecordBatch>>>,
    /// The source and predictor threads (the batcher's workers are the predictor's).
    crew: Crew<'static>,
    stats: PredictStats,
    /// Source cells selected so far (known once the stream ends).
    selected: Arc<AtomicU64>,
    /// Store rows of the shard that the predictor has passed.
    scanned: Arc<AtomicU64>,
    /// Where to look when the source selects no cell, unless an empty result was allowed.
    empty: Option<EmptyCheck>,
}

/// What explains a source that selected no cell: the expression, the obs table, the rows.
struct EmptyCheck {
    text: Option<String>,
    source: cpa_stream_pipeline::obs::expr::Expr,
    store: Arc<cpa_stream_stages::store::Store>,
    shard: Option<crate::predictor::Shard>,
    rows: std::ops::Range<u64>,
}

impl EmptyCheck {
    /// The error of a source that selected no cell, naming close values of its columns.
    fn error(&self) -> Error {
        let selection = match &self.text {
            Some(text) => format!("the source {text:?}"),
            None => "the default source (the control cells)".to_owned(),
        };
        let shard = self
            .shard
            .map(|s| format!(" in shard {}/{} (rows {}..{})", s.index, s.count, self.rows.start, self.rows.end))
            .unwrap_or_default();
        let obs = cpa_stream_stages::store::TableFile::Store(&self.store, cpa_stream_schemas::StoreFiles::OBS);
        match self.source.explain_no_match(obs) {
            Ok(why) => Error::InvalidInput(format!(
                "{selection} selects no cell{shard}: {why} (an empty result must be asked for: allow_empty / --allow-empty)"
            )),
            Err(e) => e,
        }
    }
}

impl std::fmt::Debug for PredictionStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PredictionStream").field("schema", &self.schema).finish_non_exhaustive()
    }
}

impl Predictor {
    /// Starts the stages (source selection, batcher workers, this predictor on a thread of its
    /// own) and returns the stream of record batches.
    pub fn stream(self) -> Result<PredictionStream> {
        let options = self.options();
        let loader = LoaderOptions {
            workers: options.loader.workers.max(1),
            prefetch: options.loader.prefetch.max(1),
            ..options.loader
        };
        let crew = Crew::new();
        let stop = crew.stop_flag();
        let stats = PredictStats {
            source: StageStats::new(Stage::Source, 1),
            batcher: StageStats::new(Stage::Batcher, loader.workers),
            predictor: StageStats::new(Stage::Predictor, 1),
            blocks: BlockCacheShared::new(),
        };
        let pool = PoolStats::fed_with(Arc::clone(&stats.batcher), Arc::clone(&stats.blocks));
        let (mut feeder, loaded) =
            spawn_fed::<SourceCells>(self.store(), loader, Arc::clone(&stats.source), pool, Arc::clone(&stop))?;
        let select = Select {
            store: Arc::clone(self.store()),
            vocab: self.vocabulary().clone(),
            keys: self.keys().clone(),
            source: self.source().clone(),
            rows: self.rows(),
            need: Needs::of(self.targets(), self.vocabulary()),
            batch_size: options.batch_size.max(1),
            max_comb_len: self.max_comb_len(),
            group_by: self.group_by_obs().to_vec(),
        };
        let (selected, scanned) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut stream = PredictionStream {
            schema: self.schema(),
            output: None,
            crew,
            stats: stats.clone(),
            selected: Arc::clone(&selected),
            scanned: Arc::clone(&scanned),
            empty: (!options.allow_empty).then(|| EmptyCheck {
                text: options.source.clone(),
                source: self.source().clone(),
                store: Arc::clone(self.store()),
                shard: options.shard,
                rows: self.rows(),
            }),
        };
        let (source_stats, source_stop) = (Arc::clone(&stats.source), Arc::clone(&stop));
        stream.crew.spawn(Stage::Source, Stage::Source.name().to_owned(), move || {
            select.run(&mut feeder, &source_stats, &source_stop, &selected);
        })?;
        let (out_tx, out_rx) = bounded::<Result<RecordBatch>>(loader.prefetch);
        let first_row = self.rows().start;
        stream.crew.spawn(Stage::Predictor, Stage::Predictor.name().to_owned(), move || {
            run_predictor(self, loaded, &out_tx, &stats.predictor, &stop, &scanned, first_row);
        })?;
        stream.output = Some(out_rx);
        Ok(stream)
    }
}

/// The predictor's thread: every gathered batch through the model, each step's record batches
/// sent on as they are made.
fn run_predictor(
    mut predictor: Predictor,
    mut loaded: Loaded<SourceCells>,
    out: &Sender<Result<RecordBatch>>,
    stats: &StageStats,
    stop: &AtomicBool,
    scanned: &AtomicU64,
    first_row: u64,
) {
    while let Some(item) = loaded.next(stats) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        cpa_stream_pipeline::fault::point(Stage::Predictor);
        let gathered = match item {
            Ok(g) => g,
            Err(e) => {
                let _ = out.send(Err(e));
                return;
            }
        };
        let (start, mut blocked) = (Instant::now(), Duration::ZERO);
        let mut emit = |batch: RecordBatch| {
            stats.add(batch.num_rows() as u64, batch.get_array_memory_size() as u64);
            let sending = Instant::now();
            let sent = stats.send(out, Ok(batch));
            blocked += sending.elapsed();
            sent
        };
        let done = predictor.predict(&gathered.meta, &gathered.batch.counts, &mut emit);
        stats.add_busy(start.elapsed().saturating_sub(blocked));
        match done {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = out.send(Err(e));
                return;
            }
        }
        if let Some(&last) = gathered.meta.rows.last() {
            scanned.store(last + 1 - first_row, Ordering::Relaxed);
        }
        loaded.recycle(gathered.batch);
    }
    if stop.load(Ordering::Relaxed) || !predictor.aggregates() {
        return;
    }
    // Every batch has passed: the aggregates, one row per group.
    let start = Instant::now();
    match predictor.finish_aggregates() {
        Ok(batches) => {
            stats.add_busy(start.elapsed());
            for batch in batches {
                stats.add(batch.num_rows() as u64, batch.get_array_memory_size() as u64);
                if !stats.send(out, Ok(batch)) {
                    return;
                }
            }
        }
        Err(e) => {
            let _ = out.send(Err(e));
        }
    }
}

impl PredictionStream {
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
    pub fn into_ffi(self) -> arrow_array::ffi_stream::FFI_ArrowArrayStream {
        arrow_array::ffi_stream::FFI_ArrowArrayStream::new(Box::new(self))
    }

    /// Leaves an empty result to the caller, which explains it itself (`predict::run`).
    pub(crate) fn without_empty_check(mut self) -> Self {
        self.empty = None;
        self
    }

    /// Stops the stages and waits for them; the first panic becomes an error naming its stage.
    fn shutdown(&mut self) -> Result<()> {
        self.crew.stop();
        // The predictor blocked on a full channel wakes to a closed one.
        self.output.take();
        self.crew.join()
    }
}

/// A pipeline error as the Arrow error a `RecordBatchReader` yields (the pipeline's error inside).
fn external(e: Error) -> ArrowError {
    ArrowError::ExternalError(Box::new(e))
}

impl Iterator for PredictionStream {
    type Item = std::result::Result<RecordBatch, ArrowError>;

    fn next(&mut self) -> Option<Self::Item> {
        let next = self.output.as_ref()?.recv().ok();
        match next {
            Some(Ok(b)) => Some(Ok(b)),
            Some(Err(e)) => {
                let _ = self.shutdown();
                Some(Err(external(e)))
            }
            None => match self.shutdown() {
                Err(e) => Some(Err(external(e))),
                // Once: the check is taken, so a later call ends the stream.
                Ok(()) => match self.empty.take() {
                    Some(check) if self.selected.load(Ordering::Relaxed) == 0 => Some(Err(external(check.error()))),
                    _ => None,
                },
            },
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
        let _ = self.shutdown();
    }
}
