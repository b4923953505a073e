//! The gather-worker pool: threads that gather each batch's rows from the store into recycled
//! host batches and deliver them in order, one bounded channel per worker, read round-robin.
//!
//! Two ways to give the workers their batches:
//! - [`spawn_loader`]: every worker draws the epoch's [`EpochPlan`] itself and fills every n-th
//!   batch of it, labels included (training, validation, `bench loader`): no planner thread, and
//!   no worker waits for another's job to be taken.
//! - [`spawn_fed`]: a producer (prediction's source selection, evaluation's control cells) sends
//!   row lists with a payload through a [`Feeder`], round-robin, in the order they are read back.
//!
//! The pool owns its threads: [`Loaded`] joins them when a pass ends or when it is dropped, and a
//! worker's panic reaches the consumer as an error naming the batcher, never as a short pass.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpa_stream_stages::model::HostBatch;
use cpa_stream_stages::store::{BlockCache, BlockCacheReport, BlockCacheShared, Store};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};

use super::plan::{EpochPlan, PlanOptions};
use crate::Stage;
use crate::crew::Crew;
use crate::encoder::{CellLabels, Split};
use crate::error::{Error, Result};
use crate::telemetry::{StageReport, StageStats};

/// The name workers and their errors carry.
const STAGE: Stage = Stage::Batcher;

/// Batcher worker threads, unless set otherwise.
pub const DEFAULT_WORKERS: usize = 2;
/// Batches buffered ahead of the consumer per worker, unless set otherwise.
pub const DEFAULT_PREFETCH: usize = 2;

/// Decoded bytes of a compressed store's blocks a pass holds at most, unless set otherwise
/// ([`LoaderOptions::buffer_bytes`]).
pub const DEFAULT_BUFFER_BYTES: u64 = 256 << 20;

/// How long a worker waits for a recycled batch before allocating another.
const POOL_WAIT: Duration = Duration::from_millis(200);

/// Channel depths and threads of the loader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Gather worker threads; default [`DEFAULT_WORKERS`].
    pub workers: usize,
    /// Batches buffered ahead of the consumer, per worker; default [`DEFAULT_PREFETCH`].
    pub prefetch: usize,
    /// The shuffle buffer of a compressed store: the decoded bytes of its blocks that a pass
    /// holds at most; default [`DEFAULT_BUFFER_BYTES`]. Each block is decoded once per pass and
    /// kept until its last cell of the pass is read; the training plan's window is narrowed to
    /// half of this ([`PlanOptions::fitted`]), and past it, blocks are dropped least recently
    /// used first (a dropped block still to be read is decoded again). Unused for a raw store.
    pub buffer_bytes: u64,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions { workers: DEFAULT_WORKERS, prefetch: DEFAULT_PREFETCH, buffer_bytes: DEFAULT_BUFFER_BYTES }
    }
}

impl LoaderOptions {
    /// The batches that circulate: each worker's prefetch depth and one in its hands, and two at
    /// the consumer. Once all exist, a worker waits for one to come back (no allocation in steady
    /// state, host memory bounded by batch size x this count).
    pub fn pool_size(&self) -> usize {
        self.workers.max(1) * (self.prefetch.max(1) + 1) + 2
    }
}

/// The counters of a pool: the time spent choosing rows (the planner's, when the workers plan
/// themselves) and gathering them (the batcher's); and what one pass hands to the next of the
/// same run (clones share them): decoded-block buffers and host batches.
#[derive(Debug, Clone)]
pub struct PoolStats {
    /// Planning time and rows planned (`None` for a fed pool: its producer counts its own).
    pub planner: Option<Arc<StageStats>>,
    /// Gathering time, rows and bytes gathered, time blocked.
    pub batcher: Arc<StageStats>,
    /// A compressed store's blocks: decoded, and the most decoded bytes held at once.
    pub blocks: Arc<BlockCacheShared>,
    /// The host batches a finished pass gave back, for the next pass to fill instead of
    /// allocating its own: fresh ones cost a page fault and the kernel zeroing each page on
    /// their first fill (136 MB per pass at 4,096 cells of 5,000 genes; keeping them made an
    /// epoch of 200,000 cells from a raw store 9 % faster when measured). At most one pool's
    /// worth is kept.
    kept: Arc<Mutex<Vec<HostBatch>>>,
    /// Host batches allocated by the passes.
    allocated: Arc<AtomicU64>,
    /// Host batches taken from `kept`.
    reused: Arc<AtomicU64>,
}

impl PoolStats {
    /// Counters for a pool of `workers` threads that plan their own batches.
    pub fn planned(workers: usize) -> PoolStats {
        PoolStats { planner: Some(StageStats::new(Stage::Planner, workers)), ..PoolStats::fed(workers) }
    }

    /// Counters for a pool of `workers` threads fed by a producer.
    pub fn fed(workers: usize) -> PoolStats {
        PoolStats::fed_with(StageStats::new(STAGE, workers), BlockCacheShared::new())
    }

    /// A fed pool's counters kept by its caller, with nothing handed on yet.
    pub fn fed_with(batcher: Arc<StageStats>, blocks: Arc<BlockCacheShared>) -> PoolStats {
        PoolStats {
            planner: None,
            batcher,
            blocks,
            kept: Arc::default(),
            allocated: Arc::default(),
            reused: Arc::default(),
        }
    }

    /// What the passes did with a compressed store's blocks (zeros for a raw store).
    pub fn block_report(&self) -> BlockCacheReport {
        self.blocks.report()
    }

    /// A batch an earlier pass gave back, if one of this shape is kept.
    fn take_kept(&self, genes: u32, n_covariates: usize) -> Option<HostBatch> {
        let mut kept = self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let k = kept.iter().rposition(|b| b.counts.n_cols() == genes && b.covariates.len() == n_covariates)?;
        self.reused.fetch_add(1, Ordering::Relaxed);
        Some(kept.swap_remove(k))
    }

    /// Keeps `batches` for the next pass, up to `pool_size` batches in all.
    fn keep(&self, batches: impl Iterator<Item = HostBatch>, pool_size: usize) {
        let mut kept = self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let room = pool_size.saturating_sub(kept.len());
        kept.extend(batches.take(room));
    }

    /// Host batches taken from those an earlier pass kept, so far.
    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    /// Host batches kept for the next pass, and allocated by the passes so far.
    pub fn batches(&self) -> (usize, u64) {
        let kept = self.kept.lock().map_or(0, |kept| kept.len());
        (kept, self.allocated.load(Ordering::Relaxed))
    }

    /// The reports of the planner (if any) and the batcher.
    pub fn reports(&self) -> Vec<StageReport> {
        self.planner.iter().chain([&self.batcher]).map(|s| s.report()).collect()
    }
}

/// A gathered batch and the payload its job came with.
#[derive(Debug)]
pub struct Gathered<M> {
    /// Counts of the job's rows, in its order; labels for a planned pool.
    pub batch: HostBatch,
    /// The job's payload (`()` for a planned pool).
    pub meta: M,
}

/// The batches of one pass, received in job order. Hand each batch back with
/// [`recycle`](Loaded::recycle) when done with it: the workers reuse a fixed pool.
pub struct Loaded<M> {
    outputs: Vec<Receiver<Result<Gathered<M>>>>,
    next: usize,
    recycle: Sender<HostBatch>,
    /// The workers; its stop flag is the pass's own (set when the pass ends or is dropped).
    workers: Crew<'static>,
    shared: Arc<Shared>,
}

impl<M> std::fmt::Debug for Loaded<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").field("workers", &self.workers).field("next", &self.next).finish()
    }
}

impl<M> Loaded<M> {
    /// The next batch in job order; `None` at the end of the pass. A worker that panicked ends
    /// the pass with an error, not early.
    pub fn next(&mut self, stats: &StageStats) -> Option<Result<Gathered<M>>> {
        if self.outputs.is_empty() {
            return None;
        }
        let k = self.next % self.outputs.len();
        self.next += 1;
        match stats.recv(&self.outputs[k]) {
            Some(item) => Some(item),
            None => self.join().err().map(Err),
        }
    }

    /// Hands a used batch back to the workers.
    pub fn recycle(&self, batch: HostBatch) {
        let _ = self.recycle.try_send(batch);
    }

    /// Stops the workers and waits for them; the first panic becomes an error.
    fn join(&mut self) -> Result<()> {
        self.workers.stop();
        // Dropping the receivers wakes a worker blocked on a full channel.
        self.outputs.clear();
        let joined = self.workers.join();
        // The batches handed back and not taken again go to the next pass.
        self.shared.stats.keep(self.shared.recycle.try_iter(), self.shared.pool_size);
        joined
    }
}

impl<M> Drop for Loaded<M> {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// What every worker of a pool shares.
struct Shared {
    store: Arc<Store>,
    /// A compressed store's decoded blocks, shared by the workers of this pass.
    cache: Option<Arc<BlockCache>>,
    recycle: Receiver<HostBatch>,
    created: AtomicUsize,
    pool_size: usize,
    n_covariates: usize,
    stats: PoolStats,
    /// The caller's stop (shared with other passes).
    stop: Arc<AtomicBool>,
    /// This pass's own: set when its [`Loaded`] ends or is dropped (its crew's stop flag).
    done: Arc<AtomicBool>,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.done.load(Ordering::Relaxed)
    }

    /// A batch to fill: a recycled one, a new one while the pool is not full, else one that
    /// comes back within [`POOL_WAIT`] (a consumer that keeps batches costs allocations, not a
    /// deadlock). A batch an earlier pass kept is always taken before one is allocated, however
    /// the threads were scheduled. `None` when the consumer is gone.
    fn take_batch(&self) -> Option<HostBatch> {
        let genes = self.store.n_vars() as u32;
        let batch = match self.recycle.try_recv() {
            Ok(b) => Some(b),
            Err(_) if self.created.fetch_add(1, Ordering::Relaxed) < self.pool_size => {
                self.stats.take_kept(genes, self.n_covariates)
            }
            Err(_) => match self.stats.batcher.recv_timeout(&self.recycle, POOL_WAIT) {
                Ok(b) => Some(b),
                Err(RecvTimeoutError::Timeout) => self.stats.take_kept(genes, self.n_covariates),
                Err(RecvTimeoutError::Disconnected) => return None,
            },
        };
        Some(batch.unwrap_or_else(|| {
            self.stats.allocated.fetch_add(1, Ordering::Relaxed);
            HostBatch::new(genes, self.n_covariates)
        }))
    }

    /// A worker's loop: `next` writes the next job's rows (in the order the batch should hold
    /// them) and returns its payload, `None` at the end; `labels` fills each cell's labels.
    fn work<M>(
        &self,
        out: &Sender<Result<Gathered<M>>>,
        next: &mut dyn FnMut(&mut Vec<u64>) -> Option<Result<M>>,
        labels: Option<&CellLabels>,
    ) {
        let mut cursor = match self.store.cursor() {
            Ok(c) => c,
            Err(source) => {
                let _ = out.send(Err(Error::Stage { stage: STAGE, source }));
                return;
            }
        };
        let mut rows = Vec::new();
        loop {
            let job = match &self.stats.planner {
                Some(planner) => planner.busy(|| next(&mut rows)),
                None => next(&mut rows),
            };
            let meta = match job {
                None => return,
                Some(Err(e)) => {
                    let _ = self.stats.batcher.send(out, Err(e));
                    return;
                }
                Some(Ok(meta)) => meta,
            };
            if self.stopped() {
                return;
            }
            crate::fault::point(STAGE);
            if let Some(planner) = &self.stats.planner {
                planner.add(rows.len() as u64, rows.len() as u64 * 8);
            }
            let Some(mut batch) = self.take_batch() else { return };
            let result = self.stats.batcher.busy(|| {
                batch.clear();
                match &self.cache {
                    Some(cache) => cursor.gather_cached(&rows, cache, &mut batch.counts),
                    None => cursor.gather(&rows, &mut batch.counts),
                }
                .map_err(Error::stage(STAGE))?;
                if let Some(labels) = labels {
                    for &row in &rows {
                        let g = labels.group(row);
                        batch.push_labels(&g.parts, &g.covariates, g.class);
                    }
                }
                Ok(Gathered { batch, meta })
            });
            if let Ok(g) = &result {
                self.stats.batcher.add(rows.len() as u64, g.batch.counts.byte_size());
            }
            let failed = result.is_err();
            if !self.stats.batcher.send(out, result) || failed {
                return;
            }
        }
    }
}

/// Starts `workers` threads running `body(shared, worker index, output)`.
fn spawn_workers<M: Send + 'static>(
    store: &Arc<Store>,
    cache: Option<Arc<BlockCache>>,
    loader: LoaderOptions,
    n_covariates: usize,
    stats: PoolStats,
    stop: Arc<AtomicBool>,
    mut body: impl FnMut(usize) -> Box<dyn FnOnce(&Shared, &Sender<Result<Gathered<M>>>) + Send>,
) -> Result<Loaded<M>> {
    let pool_size = loader.pool_size();
    let (recycle_tx, recycle_rx) = bounded::<HostBatch>(pool_size);
    let workers = Crew::new();
    let shared = Arc::new(Shared {
        store: Arc::clone(store),
        cache,
        recycle: recycle_rx,
        created: AtomicUsize::new(0),
        pool_size,
        n_covariates,
        stats,
        stop,
        done: workers.stop_flag(),
    });
    let mut loaded = Loaded { outputs: Vec::new(), next: 0, recycle: recycle_tx, workers, shared: Arc::clone(&shared) };
    for w in 0..loader.workers.max(1) {
        let (out_tx, out_rx) = bounded::<Result<Gathered<M>>>(loader.prefetch.max(1));
        let (shared, work) = (Arc::clone(&shared), body(w));
        // On an error here, `loaded` is dropped and joins the workers already started.
        loaded.outputs.push(out_rx);
        loaded.workers.spawn(STAGE, format!("{STAGE}-{w}"), move || work(&shared, &out_tx))?;
    }
    Ok(loaded)
}

/// One pass over the cells of `split`: each worker draws the epoch's plan and fills batches
/// `w, w + workers, ...` of it with counts and labels (planning time is counted in the planner's
/// stats). The first `skip` batches of the plan are passed over without being read (a run
/// resumed within an epoch). Stops early when `stop` is set or the [`Loaded`] is dropped; errors
/// arrive in order, as batches do.
#[allow(clippy::too_many_arguments)] // one call site per pass kind; a struct would only rename them
pub fn spawn_loader(
    store: &Arc<Store>,
    labels: &Arc<CellLabels>,
    split: Split,
    epoch: u64,
    skip: u64,
    plan: &PlanOptions,
    loader: LoaderOptions,
    stats: PoolStats,
    stop: Arc<AtomicBool>,
) -> Result<Loaded<()>> {
    let workers = loader.workers.max(1);
    let n_covariates = labels.vocab.covariates.len();
    let plan = plan.fitted(store, loader.buffer_bytes);
    let cache = BlockCache::new(store, loader.buffer_bytes, Arc::clone(&stats.blocks)).map(Arc::new);
    if let Some(cache) = &cache {
        // Every cell of the split is read once in the pass: hold them all, so that each block
        // is decoded by the first batch that needs it and dropped after the last.
        hold_split(cache, labels, split);
    }
    spawn_workers(store, cache, loader, n_covariates, stats, stop, |w| {
        let (labels, plan) = (Arc::clone(labels), plan.clone());
        Box::new(move |shared: &Shared, out: &Sender<Result<Gathered<()>>>| {
            let busy = |f: &mut dyn FnMut() -> bool| match &shared.stats.planner {
                Some(p) => p.busy(f),
                None => f(),
            };
            let mut epoch_plan = EpochPlan::new(&labels, split, epoch, &plan);
            let mut skipped = Vec::new();
            for _ in 0..skip {
                // The first worker gives back the holds of the batches passed over.
                let more = match (&shared.cache, w) {
                    (Some(cache), 0) => busy(&mut || {
                        let more = epoch_plan.next_into(&mut skipped);
                        skipped.sort_unstable();
                        for &row in &skipped {
                            cache.release(cache.block_of(row), 1);
                        }
                        more
                    }),
                    _ => busy(&mut || epoch_plan.pass_over()),
                };
                if !more {
                    return;
                }
            }
            let mut gap = w;
            let mut others = Vec::new();
            let mut next = |rows: &mut Vec<u64>| {
                let more = if plan.shard.world > 1 {
                    // The other ranks read the rest of the batch: the worker of the batch gives
                    // back its holds.
                    let more =
                        (0..gap).all(|_| epoch_plan.pass_over()) && epoch_plan.next_split_into(rows, &mut others);
                    if let Some(cache) = &shared.cache {
                        for &row in &others {
                            cache.release(cache.block_of(row), 1);
                        }
                    }
                    more
                } else {
                    epoch_plan.next_after_into(gap, rows)
                };
                gap = workers - 1;
                // Store order within a batch: a compressed block is looked up once per batch.
                rows.sort_unstable();
                more.then_some(Ok(()))
            };
            shared.work(out, &mut next, Some(&labels));
        })
    })
}

/// Holds, block by block, every cell of `split`.
fn hold_split(cache: &BlockCache, labels: &CellLabels, split: Split) {
    let map = cache.block_map();
    let n = labels.n_cells();
    for b in 0..map.n_blocks() {
        let rows = map.rows_of(b);
        let cells = (rows.start..rows.end.min(n)).filter(|&c| labels.split(c) == split).count() as u64;
        if cells > 0 {
            cache.hold(b, cells);
        }
    }
}

/// A job for a fed pool: store rows (ascending, so that a compressed block is decoded once per
/// batch) and a payload that comes back with the batch.
type Job<M> = Result<(Vec<u64>, M)>;

/// The producer's end of a fed pool: jobs go to the workers round-robin, the order the
/// [`Loaded`] reads their batches back in.
///
/// On a compressed store a fed pass decodes each block once too, provided the producer says
/// which cells are still to come: [`send`](Feeder::send) holds a job's rows until a worker has
/// gathered them, [`reserve`](Feeder::reserve) holds a cell that a later job will carry, and
/// [`scan`](Feeder::scan) holds the block a producer reading the store in order is in, so that
/// the block survives between two jobs that share it ([`send_in_order`](Feeder::send_in_order)
/// does both for a producer whose jobs ascend). A hold is always taken before the rows it covers
/// are sent.
pub struct Feeder<M> {
    jobs: Vec<Sender<Job<M>>>,
    next: usize,
    stats: Arc<StageStats>,
    cache: Option<Arc<BlockCache>>,
    /// The block [`scan`](Feeder::scan) holds.
    scanning: Option<u64>,
}

impl<M> Feeder<M> {
    /// Sends a job; `false` when the pool is gone (stop quietly: the consumer reports why).
    pub fn send(&mut self, rows: Vec<u64>, meta: M) -> bool {
        if let Some(cache) = &self.cache {
            cache.hold_rows(&rows);
        }
        self.deliver(Ok((rows, meta)))
    }

    /// Sends a job of a producer that reads the store in ascending order, and keeps the block of
    /// its last row held until the next such job (which may start in that block) is sent. The
    /// holds are taken before the job leaves, so no worker can drop a block in between.
    pub fn send_in_order(&mut self, rows: Vec<u64>, meta: M) -> bool {
        if let Some(cache) = &self.cache {
            cache.hold_rows(&rows);
        }
        if let Some(&last) = rows.last() {
            self.scan(last);
        }
        self.deliver(Ok((rows, meta)))
    }

    /// Holds `row` for a job sent later with [`send_reserved`](Feeder::send_reserved).
    pub fn reserve(&mut self, row: u64) {
        if let Some(cache) = &self.cache {
            cache.hold(cache.block_of(row), 1);
        }
    }

    /// Sends a job whose rows were each [`reserve`](Feeder::reserve)d.
    pub fn send_reserved(&mut self, rows: Vec<u64>, meta: M) -> bool {
        self.deliver(Ok((rows, meta)))
    }

    /// The producer reads the store in order and has reached `row`: the block holding it is
    /// kept at least until the scan moves past it.
    pub fn scan(&mut self, row: u64) {
        let Some(cache) = &self.cache else { return };
        let block = cache.block_of(row);
        if self.scanning == Some(block) {
            return;
        }
        cache.hold(block, 1);
        if let Some(old) = self.scanning.replace(block) {
            cache.release(old, 1);
        }
    }

    /// Sends the producer's error; the consumer receives it in job order.
    pub fn fail(&mut self, error: Error) {
        self.deliver(Err(error));
    }

    fn deliver(&mut self, job: Job<M>) -> bool {
        let k = self.next % self.jobs.len();
        self.next += 1;
        self.stats.send(&self.jobs[k], job)
    }
}

impl<M> Drop for Feeder<M> {
    fn drop(&mut self) {
        if let (Some(cache), Some(block)) = (&self.cache, self.scanning.take()) {
            cache.release(block, 1);
        }
    }
}

/// A pool fed by a producer: returns the producer's [`Feeder`] (its sends counted in `producer`)
/// and the consumer's [`Loaded`]. Batches carry counts only (no labels).
pub fn spawn_fed<M: Send + 'static>(
    store: &Arc<Store>,
    loader: LoaderOptions,
    producer: Arc<StageStats>,
    stats: PoolStats,
    stop: Arc<AtomicBool>,
) -> Result<(Feeder<M>, Loaded<M>)> {
    let mut jobs = Vec::new();
    let cache = BlockCache::new(store, loader.buffer_bytes, Arc::clone(&stats.blocks)).map(Arc::new);
    let feeder_cache = cache.clone();
    let loaded = spawn_workers(store, cache, loader, 0, stats, stop, |_| {
        let (job_tx, job_rx) = bounded::<Job<M>>(loader.prefetch.max(1));
        jobs.push(job_tx);
        Box::new(move |shared: &Shared, out: &Sender<Result<Gathered<M>>>| {
            let mut next = |rows: &mut Vec<u64>| {
                let job = shared.stats.batcher.recv(&job_rx)?;
                Some(job.map(|(r, meta)| {
                    *rows = r;
                    meta
                }))
            };
            shared.work(out, &mut next, None);
        })
    })?;
    Ok((Feeder { jobs, next: 0, stats: producer, cache: feeder_cache, scanning: None }, loaded))
}
