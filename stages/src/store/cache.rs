//! Decoded zstd blocks shared by the threads of one pass, so that each block is decompressed at
//! most once per pass however many batches draw cells from it.
//!
//! A pass that knows which cells it will read *holds* them ([`BlockCache::hold`]) before any is
//! gathered; gathering through the cache ([`RowCursor::gather_cached`]) releases them. A block
//! is decoded by the first gather that needs it (other threads needing it meanwhile wait for that
//! decode rather than repeat it) and dropped when its last held cell has been gathered. Memory is
//! therefore the decoded size of the blocks with cells still to come, which the batcher's plan
//! keeps to its shuffle window; [`BlockCache::new`]'s budget caps it in any case: past it, the
//! least recently used blocks are dropped (those with cells still held too, which then cost a
//! second decode, counted in [`BlockCacheShared::early_drops`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::Serialize;

use super::block_map::BlockMap;
use super::blocks::{BlockDecoder, CompactBlock};
use super::reader::{RowCursor, Store};
use crate::counts_csr::CsrBatch;
use crate::error::{Error, Result};

/// One decompressed block. Dropping it (when the cache and every gather are done with it) hands
/// its buffers to the cache's [`Spares`].
#[derive(Debug)]
struct Decoded {
    /// Store offset of the block's first entry.
    base: u64,
    block: CompactBlock,
    spares: Arc<Spares>,
}

impl Drop for Decoded {
    fn drop(&mut self) {
        self.spares.put(std::mem::take(&mut self.block));
    }
}

/// Buffers of dropped blocks, reused by the next decodes, of this pass or a later one of the
/// run: fresh ones would each cost page faults and zeroing by the kernel (a quarter of a worker's
/// time on a zstd store when measured). A block is often dropped by another thread than the one
/// that decoded it (the last to copy rows from it), so they are handed back on drop. Kept while
/// they and the decoded blocks of the caches using them fit the largest of their budgets: a pass
/// drops a window's blocks at about the rate it decodes the next window's, so in steady state
/// every decode reuses a buffer, and the next pass starts with the last one's.
#[derive(Debug, Default)]
struct Spares {
    /// The spare buffers and their bytes of capacity.
    buffers: Mutex<(Vec<CompactBlock>, u64)>,
    /// Decoded bytes the caches using these spares hold (the sum of their [`State::bytes`],
    /// kept here for the drops outside their locks).
    live: AtomicU64,
    /// The largest budget of those caches.
    budget: AtomicU64,
}

impl Spares {
    fn put(&self, buffers: CompactBlock) {
        let bytes = buffers.capacity_bytes();
        if bytes == 0 {
            return;
        }
        let mut spare = self.buffers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let live = self.live.load(Ordering::Relaxed);
        if spare.1 + bytes + live <= self.budget.load(Ordering::Relaxed) {
            spare.1 += bytes;
            spare.0.push(buffers);
        }
    }

    /// Spare buffers with room for `entries` entries if there are, else the most recent (grown
    /// by the decode); `None` when there are none.
    fn take(&self, entries: usize) -> Option<CompactBlock> {
        let mut spare = self.buffers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let fits = spare.0.iter().rposition(|b| b.room() >= entries);
        let taken = match fits {
            Some(k) => spare.0.swap_remove(k),
            None => spare.0.pop()?,
        };
        spare.1 -= taken.capacity_bytes();
        Some(taken)
    }
}

/// Rows of a decoded block whose planes [`RowCursor::gather_cached`] asks for ahead of the one it
/// copies (zstd store, batch 4,096: +1 to +3 % in five interleaved A/B runs; no change at 128).
const PREFETCH_ROWS: usize = 2;

/// A block's decode, done once by whichever thread gets there first.
type Slot = Arc<SlotCell>;

#[derive(Debug, Default)]
struct SlotCell {
    /// Set by the first thread that sets out to decode the block: another thread that needs it
    /// meanwhile turns to the other blocks of its batch first ([`SlotCell::ready_or_claim`]).
    claimed: AtomicBool,
    decoded: OnceLock<std::result::Result<Arc<Decoded>, String>>,
}

impl SlotCell {
    /// Whether the block is decoded, or is now this thread's to decode; `false` while another
    /// thread decodes it.
    fn ready_or_claim(&self) -> bool {
        self.decoded.get().is_some() || !self.claimed.swap(true, Ordering::AcqRel)
    }
}

#[derive(Debug)]
struct Entry {
    /// Cells held and not yet gathered; below zero once more were gathered than held (a pass
    /// that does not hold: the block then stays until the budget drops it).
    held: i64,
    slot: Slot,
    /// Decoded bytes counted in [`State::bytes`] (0 until decoded).
    bytes: u64,
    last_use: u64,
}

impl Entry {
    fn new() -> Entry {
        Entry { held: 0, slot: Arc::default(), bytes: 0, last_use: 0 }
    }
}

#[derive(Debug)]
struct State {
    entries: HashMap<u64, Entry>,
    /// Decoded bytes held; change it through [`State::set_bytes`].
    bytes: u64,
    /// Where [`State::bytes`] is summed with the other caches' for the spares.
    spares: Arc<Spares>,
    clock: u64,
}

impl State {
    fn set_bytes(&mut self, bytes: u64) {
        if bytes >= self.bytes {
            self.spares.live.fetch_add(bytes - self.bytes, Ordering::Relaxed);
        } else {
            self.spares.live.fetch_sub(self.bytes - bytes, Ordering::Relaxed);
        }
        self.bytes = bytes;
    }

    /// Removes `block`'s entry; its buffers go to the spares once nobody reads it any more (here,
    /// if nobody else holds it: after the bytes are no longer counted).
    fn remove(&mut self, block: u64) {
        let Some(entry) = self.entries.remove(&block) else { return };
        let total = self.bytes - entry.bytes;
        self.set_bytes(total);
        drop(entry);
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // The cache is done: its blocks no longer count against the spares' room (the entries,
        // dropped after this, may hand theirs on).
        self.set_bytes(0);
    }
}

/// What the caches of a run's passes share: what they did, and the buffers of the blocks they
/// dropped, for the next decodes.
#[derive(Debug, Default)]
pub struct BlockCacheShared {
    decodes: AtomicU64,
    decoded_bytes: AtomicU64,
    early_drops: AtomicU64,
    peak_bytes: AtomicU64,
    new_buffers: AtomicU64,
    spares: Arc<Spares>,
}

/// A snapshot of [`BlockCacheShared`]'s counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BlockCacheReport {
    /// Blocks decompressed.
    pub decodes: u64,
    /// Bytes they decompressed to.
    pub decoded_bytes: u64,
    /// Blocks dropped for the budget while cells of theirs were still to be read.
    pub early_drops: u64,
    /// Most decoded bytes held at once.
    pub peak_bytes: u64,
    /// Decodes that allocated their buffers (no dropped block's were spare).
    pub new_buffers: u64,
}

impl BlockCacheShared {
    /// New, zeroed counters.
    pub fn new() -> Arc<BlockCacheShared> {
        Arc::default()
    }

    /// The counts so far.
    pub fn report(&self) -> BlockCacheReport {
        BlockCacheReport {
            decodes: self.decodes.load(Ordering::Relaxed),
            decoded_bytes: self.decoded_bytes.load(Ordering::Relaxed),
            early_drops: self.early_drops.load(Ordering::Relaxed),
            peak_bytes: self.peak_bytes.load(Ordering::Relaxed),
            new_buffers: self.new_buffers.load(Ordering::Relaxed),
        }
    }
}

/// Decoded blocks of one zstd store shared by the threads of a pass (see the module docs).
#[derive(Debug)]
pub struct BlockCache {
    map: BlockMap,
    budget: u64,
    state: Mutex<State>,
    counts: Arc<BlockCacheShared>,
}

impl BlockCache {
    /// A cache for `store`, holding at most `budget` decoded bytes, counting into `counts` and
    /// sharing its spare buffers with the other caches of `counts`; `None` for a raw store (its
    /// rows are read from the map directly).
    pub fn new(store: &Store, budget: u64, counts: Arc<BlockCacheShared>) -> Option<BlockCache> {
        let map = store.block_map()?.clone();
        let budget = budget.max(1);
        counts.spares.budget.fetch_max(budget, Ordering::Relaxed);
        let state = State { entries: HashMap::new(), bytes: 0, spares: Arc::clone(&counts.spares), clock: 0 };
        Some(BlockCache { map, budget, state: Mutex::new(state), counts })
    }

    /// Which block holds which rows.
    pub fn block_map(&self) -> &BlockMap {
        &self.map
    }

    /// The block holding row `row`.
    pub fn block_of(&self, row: u64) -> u64 {
        self.map.block_of(row)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held left the counts as they were; keep going with them.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Announces that `cells` cells of block `block` will be gathered through this cache.
    pub fn hold(&self, block: u64, cells: u64) {
        let mut state = self.state();
        let entry = state.entries.entry(block).or_insert_with(Entry::new);
        entry.held += cells as i64;
    }

    /// Announces `rows` (any order), grouped by block.
    pub fn hold_rows(&self, rows: &[u64]) {
        for (block, n) in self.blocks_of(rows) {
            self.hold(block, n);
        }
    }

    /// Takes back a hold of `cells` cells of `block` without gathering them; a block with nothing
    /// more to come is dropped.
    pub fn release(&self, block: u64, cells: u64) {
        let mut state = self.state();
        self.release_locked(&mut state, block, cells);
    }

    fn release_locked(&self, state: &mut State, block: u64, cells: u64) {
        let Some(entry) = state.entries.get_mut(&block) else { return };
        let was = entry.held;
        entry.held -= cells as i64;
        // Only a block that was held and now has nothing to come is done; one gathered without
        // a hold stays for the budget to drop.
        if was > 0 && entry.held <= 0 {
            state.remove(block);
        }
    }

    /// `(block, cells)` for the runs of `rows` in one block.
    fn blocks_of<'r>(&'r self, rows: &'r [u64]) -> impl Iterator<Item = (u64, u64)> + 'r {
        let mut i = 0;
        std::iter::from_fn(move || {
            let first = *rows.get(i)?;
            let b = self.map.block_of(first);
            let start = i;
            while i < rows.len() && self.map.block_of(rows[i]) == b {
                i += 1;
            }
            Some((b, (i - start) as u64))
        })
    }

    /// Block `b`'s slot, marked as just used.
    fn slot(&self, b: u64) -> Slot {
        let mut state = self.state();
        state.clock += 1;
        let now = state.clock;
        let entry = state.entries.entry(b).or_insert_with(Entry::new);
        entry.last_use = now;
        Arc::clone(&entry.slot)
    }

    /// Block `b` decoded, by this thread or another (waiting for one that is decoding it).
    fn get(&self, store: &Store, decoder: &mut BlockDecoder, b: u64, slot: &Slot) -> Result<Arc<Decoded>> {
        let mut decoded_here = false;
        let result = slot.decoded.get_or_init(|| {
            decoded_here = true;
            let mut block = self.counts.spares.take(store.block_entries(b)).unwrap_or_else(|| {
                self.counts.new_buffers.fetch_add(1, Ordering::Relaxed);
                CompactBlock::default()
            });
            match store.decode_block_compact(b, decoder, &mut block) {
                Ok(base) => Ok(Arc::new(Decoded { base, block, spares: Arc::clone(&self.counts.spares) })),
                Err(e) => Err(e.to_string()),
            }
        });
        let decoded = match result {
            Ok(d) => Arc::clone(d),
            Err(e) => return Err(Error::InvalidInput(e.clone())),
        };
        if decoded_here {
            let bytes = decoded.block.bytes();
            self.counts.decodes.fetch_add(1, Ordering::Relaxed);
            self.counts.decoded_bytes.fetch_add(bytes, Ordering::Relaxed);
            let mut state = self.state();
            // The entry may be gone (released meanwhile): then the bytes were never counted.
            let counted = match state.entries.get_mut(&b) {
                Some(entry) if Arc::ptr_eq(&entry.slot, slot) => {
                    entry.bytes = bytes;
                    true
                }
                _ => false,
            };
            if counted {
                let total = state.bytes + bytes;
                state.set_bytes(total);
                self.shrink(&mut state, b);
                self.counts.peak_bytes.fetch_max(state.bytes, Ordering::Relaxed);
            }
        }
        Ok(decoded)
    }

    /// Drops least recently used decoded blocks (never `keep`) until the budget holds.
    fn shrink(&self, state: &mut State, keep: u64) {
        while state.bytes > self.budget {
            let victim = state
                .entries
                .iter()
                .filter(|(b, e)| **b != keep && e.bytes > 0)
                .min_by_key(|(_, e)| (e.held > 0, e.last_use))
                .map(|(&b, e)| (b, e.held > 0));
            let Some((b, still_held)) = victim else { break };
            if still_held {
                self.counts.early_drops.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(entry) = state.entries.get_mut(&b) {
                if entry.held <= 0 {
                    state.remove(b);
                } else {
                    // A fresh slot: the next gather decodes again. Uncounted first, so that
                    // its buffers may go to the spares when the old slot drops.
                    let (bytes, old) = (entry.bytes, std::mem::take(&mut entry.slot));
                    entry.bytes = 0;
                    let total = state.bytes - bytes;
                    state.set_bytes(total);
                    drop(old);
                }
            }
        }
    }
}

impl RowCursor<'_> {
    /// Appends the rows listed in `rows` to `out`, as [`gather`](RowCursor::gather) does, taking
    /// zstd blocks from `cache` (decoded there once for every thread of the pass) and releasing
    /// one held cell per row. Rows in ascending order touch each block once.
    pub fn gather_cached(&mut self, rows: &[u64], cache: &BlockCache, out: &mut CsrBatch) -> Result<()> {
        let store = self.store();
        let n_obs = store.n_obs();
        if let Some(&bad) = rows.iter().find(|&&r| r >= n_obs) {
            return Err(Error::InvalidInput(format!(
                "{}: row {bad} out of range, the store has {n_obs} rows",
                store.path().display()
            )));
        }
        let indptr = store.indptr();
        let nnz: u64 = rows.iter().map(|&r| indptr[r as usize + 1] - indptr[r as usize]).sum();
        out.reserve(rows.len(), usize::try_from(nnz).unwrap_or(usize::MAX));
        // Decode first, starting at a place of the batch that depends on the thread, and
        // leaving a block another thread is decoding for last: workers whose batches share the
        // window's blocks then decode different blocks side by side instead of queueing on the
        // same one (waits took a seventh of the workers' time at batch 4,096 when they only
        // started apart). The copy below stays in the rows' order and uses the blocks taken here
        // (one look-up each; a block the budget drops meanwhile stays readable through its
        // handle).
        let runs: Vec<(u64, u64)> = cache.blocks_of(rows).collect();
        let mut blocks: Vec<Option<Arc<Decoded>>> = vec![None; runs.len()];
        let mut elsewhere = Vec::new();
        let start = self.spread_start(runs.len());
        for k in (start..runs.len()).chain(0..start) {
            let slot = cache.slot(runs[k].0);
            if slot.ready_or_claim() {
                blocks[k] = Some(cache.get(store, self.decoder_mut()?, runs[k].0, &slot)?);
            } else {
                elsewhere.push((k, slot));
            }
        }
        for (k, slot) in elsewhere {
            blocks[k] = Some(cache.get(store, self.decoder_mut()?, runs[k].0, &slot)?);
        }
        let mut i = 0;
        for (&(b, n), decoded) in runs.iter().zip(&mut blocks) {
            let Some(decoded) = decoded.take() else { continue };
            let block_rows = &rows[i..i + n as usize];
            let span = |row: u64| {
                ((indptr[row as usize] - decoded.base) as usize, (indptr[row as usize + 1] - decoded.base) as usize)
            };
            // Each row's planes are asked for PREFETCH_ROWS rows before they are copied.
            let ahead = block_rows.iter().skip(PREFETCH_ROWS).map(Some).chain([None; PREFETCH_ROWS]);
            for &row in block_rows.iter().take(PREFETCH_ROWS) {
                let (s, e) = span(row);
                decoded.block.prefetch_row(s, e);
            }
            for (&row, next) in block_rows.iter().zip(ahead) {
                if let Some(&next) = next {
                    let (s, e) = span(next);
                    decoded.block.prefetch_row(s, e);
                }
                let (s, e) = span(row);
                decoded.block.push_row(s, e, out);
            }
            i += n as usize;
            // Let go of the block first, so that a block whose last cells these were can hand
            // its buffers on.
            drop(decoded);
            let mut state = cache.state();
            cache.release_locked(&mut state, b, n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use cpa_stream_schemas::Codec;
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    use rand_xoshiro::Xoshiro256PlusPlus;

    use super::*;
    use crate::store::{StoreWriter, StoreWriterOptions};

    /// A zstd store of `n` cells of 50 genes in blocks of 16 rows; row r holds gene r % 50 with
    /// count r + 1, so that every gathered row can be checked.
    fn store(dir: &std::path::Path, n: u64) -> Store {
        let ids = |name: &str, values: Vec<String>| {
            let schema = Arc::new(Schema::new(vec![Field::new(name, DataType::Utf8, false)]));
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(values))]).expect("batch")
        };
        let var = ids("gene_id", (0..50).map(|g| format!("g{g}")).collect());
        let obs = ids("cell_id", (0..n).map(|c| format!("c{c}")).collect());
        let options = StoreWriterOptions { codec: Codec::zstd_with(3, 16), ..StoreWriterOptions::default() };
        let path = dir.join("z.store");
        let mut writer = StoreWriter::create(&path, &var, obs.schema(), options).expect("writer");
        let mut rows = CsrBatch::new(50);
        for r in 0..n {
            rows.push_row(&[(r % 50) as u32], &[(r + 1) as f32]);
        }
        writer.push_rows(&rows, &obs).expect("push");
        writer.finish().expect("finish");
        Store::open(&path).expect("open")
    }

    /// Reads `order` through `cache` in batches of `batch` rows (each sorted, as the batcher
    /// sends them), checks every row, calls `after` after each batch; returns the rows read.
    fn read_in_batches(store: &Store, cache: &BlockCache, order: &[u64], batch: usize, after: impl Fn()) -> u64 {
        let mut cursor = store.cursor().expect("cursor");
        let mut seen = 0u64;
        for chunk in order.chunks(batch) {
            let mut rows = chunk.to_vec();
            rows.sort_unstable();
            let mut out = CsrBatch::new(50);
            cursor.gather_cached(&rows, cache, &mut out).expect("gather");
            for (i, &r) in rows.iter().enumerate() {
                assert_eq!(out.row(i), (&[(r % 50) as u32][..], &[(r + 1) as f32][..]));
            }
            seen += rows.len() as u64;
            after();
        }
        seen
    }

    #[test]
    fn held_blocks_are_decoded_once_and_dropped_after_their_last_cell() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path(), 1000);
        let counts = BlockCacheShared::new();
        let cache = BlockCache::new(&store, u64::MAX, Arc::clone(&counts)).expect("zstd store");
        let mut order: Vec<u64> = (0..1000).collect();
        order.shuffle(&mut Xoshiro256PlusPlus::seed_from_u64(3));
        cache.hold_rows(&{
            let mut all = order.clone();
            all.sort_unstable();
            all
        });
        assert_eq!(read_in_batches(&store, &cache, &order, 37, || ()), 1000);
        let report = counts.report();
        // 1,000 rows in blocks of 16: 63 blocks, each decoded once although every batch of 37
        // random rows touches about 30 of them.
        assert_eq!(report.decodes, 63);
        assert_eq!(report.early_drops, 0);
        assert!(cache.state().entries.is_empty(), "blocks left after every cell was read");
        assert_eq!(cache.state().bytes, 0);
    }

    #[test]
    fn the_budget_caps_decoded_bytes_at_the_price_of_decoding_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path(), 1024);
        // A block of 16 one-entry rows (small indices, counts) decodes to 16-bit deltas and counts,
        // 64 bytes: room for 4.
        let counts = BlockCacheShared::new();
        let cache = BlockCache::new(&store, 4 * 64, Arc::clone(&counts)).expect("zstd store");
        let all: Vec<u64> = (0..1024).collect();
        cache.hold_rows(&all);
        let mut order = all.clone();
        order.shuffle(&mut Xoshiro256PlusPlus::seed_from_u64(4));
        let within = || assert!(cache.state().bytes <= 4 * 64);
        assert_eq!(read_in_batches(&store, &cache, &order, 50, within), 1024);
        let report = counts.report();
        assert!(report.peak_bytes <= 4 * 64, "{report:?}");
        assert!(report.early_drops > 0 && report.decodes > 64, "{report:?}");
        // Every block is a full one of 64 bytes.
        assert_eq!(report.decoded_bytes, report.decodes * 64);
    }

    #[test]
    fn a_block_is_claimed_once_and_ready_once_decoded() {
        let slot = SlotCell::default();
        assert!(slot.ready_or_claim(), "the first thread to want a block decodes it");
        assert!(!slot.ready_or_claim(), "the others turn to other blocks meanwhile");
        let _ = slot.decoded.set(Err("decoded".into()));
        assert!(slot.ready_or_claim(), "once decoded it is there for every thread");
    }

    #[test]
    fn threads_share_one_decode_per_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path(), 4096);
        let counts = BlockCacheShared::new();
        let cache = BlockCache::new(&store, u64::MAX, Arc::clone(&counts)).expect("zstd store");
        let all: Vec<u64> = (0..4096).collect();
        cache.hold_rows(&all);
        // Four threads each read every fourth row: each block is wanted by all four at once.
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let (store, cache) = (&store, &cache);
                scope.spawn(move || {
                    let rows: Vec<u64> = (0..4096).filter(|r| r % 4 == t).collect();
                    assert_eq!(read_in_batches(store, cache, &rows, 8, || ()), 1024);
                });
            }
        });
        assert_eq!(counts.report().decodes, 256);
        assert!(cache.state().entries.is_empty());
    }

    #[test]
    fn dropped_blocks_hand_their_buffers_on_within_a_bound() {
        // Spares and live blocks share the budget: with 64 bytes live, two more pairs of 64
        // bytes fit in 3 x 64; the other three are let go.
        let spares = Spares::default();
        spares.budget.store(3 * 64, Ordering::Relaxed);
        spares.live.store(64, Ordering::Relaxed);
        for capacity in [8, 4, 8, 8, 8] {
            spares.put(CompactBlock::with_room(capacity));
        }
        assert_eq!(spares.buffers.lock().map(|b| (b.0.len(), b.1)).ok(), Some((2, 96)));
        // A pair that fits is taken before the most recent one.
        assert!(spares.take(6).expect("a spare").room() >= 8);
        assert_eq!(spares.buffers.lock().map(|b| b.1).ok(), Some(32));
        // None fits: the most recent, to be grown.
        assert_eq!(spares.take(100).map(|b| b.room()), Some(4));
        assert!(spares.take(1).is_none());
        // Less live, more room.
        spares.live.store(0, Ordering::Relaxed);
        for _ in 0..4 {
            spares.put(CompactBlock::with_room(8));
        }
        assert_eq!(spares.buffers.lock().map(|b| (b.0.len(), b.1)).ok(), Some((3, 192)));

        // Through the cache: a block dropped by another thread than its decoder still hands its
        // buffers back.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path(), 4096);
        let shared = BlockCacheShared::new();
        let cache = BlockCache::new(&store, 1 << 20, Arc::clone(&shared)).expect("zstd store");
        let all: Vec<u64> = (0..4096).collect();
        cache.hold_rows(&all);
        std::thread::scope(|scope| {
            for t in 0..2u64 {
                let (store, cache) = (&store, &cache);
                scope.spawn(move || {
                    let rows: Vec<u64> = (0..4096).filter(|r| r % 2 == t).collect();
                    assert_eq!(read_in_batches(store, cache, &rows, 8, || ()), 2048);
                });
            }
        });
        drop(cache);
        let spare = shared.spares.buffers.lock().map(|b| (b.0.len(), b.1)).ok();
        assert!(matches!(spare, Some((n, bytes)) if n >= 1 && bytes <= 1 << 20), "{spare:?}");
        assert_eq!(shared.spares.live.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn later_passes_decode_into_the_buffers_of_earlier_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path(), 4096);
        let shared = BlockCacheShared::new();
        let all: Vec<u64> = (0..4096).collect();
        for pass in 1..=3 {
            let cache = BlockCache::new(&store, 1 << 20, Arc::clone(&shared)).expect("zstd store");
            cache.hold_rows(&all);
            // In order, 8 rows a batch: one block of 16 rows in use at a time, dropped after its
            // last row, its buffers taken by the next block's decode.
            assert_eq!(read_in_batches(&store, &cache, &all, 8, || ()), 4096);
            let report = shared.report();
            assert_eq!((report.decodes, report.new_buffers), (256 * pass, 1), "pass {pass}");
        }
        // A pass that keeps 64 blocks at once needs 63 more, and no pass after it.
        let mut order = Vec::new();
        for window in all.chunks(64 * 16) {
            for k in 0..16 {
                order.extend(window.iter().skip(k).step_by(16));
            }
        }
        for pass in 0..2 {
            let cache = BlockCache::new(&store, 1 << 20, Arc::clone(&shared)).expect("zstd store");
            cache.hold_rows(&all);
            assert_eq!(read_in_batches(&store, &cache, &order, 64, || ()), 4096);
            assert_eq!(shared.report().new_buffers, 64, "pass {pass}");
        }
    }
}
