//! `bench loader --cold`: the loader's first epoch read from disk, not from the page cache. Each
//! round drops the store's files from the page cache, measures the disk's sequential read of
//! them (the bound), drops them again and times one loader epoch, counting the bytes it made the
//! kernel fetch from storage (`/proc/self/io`).

use std::fs::File;
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use cpa_stream_stages::store::{Access, Store};
use serde::Serialize;

use crate::Stage;
use crate::batcher::{self, LoaderOptions, PlanOptions, PoolStats, spawn_loader};
use crate::encoder::{CellLabels, EncoderOptions, Split, SplitSpec};
use crate::error::{Error, Result};
use crate::telemetry::StageStats;

/// One cold round.
#[derive(Debug, Clone, Serialize)]
pub struct ColdRound {
    /// The disk's sequential read of the store's matrix files, MB/s (page cache dropped first).
    pub disk_sequential_mb_per_s: f64,
    /// The loader's cells per second over the epoch.
    pub cells_per_s: f64,
    /// Seconds of the epoch.
    pub seconds: f64,
    /// MB the epoch made the kernel read from storage (`None` without `/proc/self/io`).
    pub disk_mb: Option<f64>,
    /// Those MB per second of the epoch.
    pub disk_mb_per_s: Option<f64>,
}

/// What [`bench_loader_cold`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct ColdLoaderBench {
    /// The store benchmarked.
    pub store: String,
    /// Its codec.
    pub codec: String,
    /// Its cells.
    pub cells: u64,
    /// Bytes of its matrix files.
    pub matrix_bytes: u64,
    /// Cells per batch.
    pub batch_size: usize,
    /// Batcher workers.
    pub workers: usize,
    /// The access advice given to the maps before each epoch.
    pub advice: String,
    /// Blocks in the shuffle window (fitted to the buffer on a compressed store).
    pub shuffle_blocks: usize,
    /// Medians over the rounds.
    pub cells_per_s: f64,
    /// Median MB/s read from storage during the epochs.
    pub disk_mb_per_s: Option<f64>,
    /// Median sequential read speed of the disk.
    pub disk_sequential_mb_per_s: f64,
    /// Every round.
    pub rounds: Vec<ColdRound>,
}

/// The name of an [`Access`] advice, as the command line spells it.
pub fn advice_name(access: Access) -> &'static str {
    match access {
        Access::Normal => "normal",
        Access::Random => "random",
        Access::Sequential => "sequential",
        Access::WillNeed => "willneed",
    }
}

/// Bytes this process has made the kernel read from storage so far.
fn storage_read_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/io").ok()?;
    text.lines().find_map(|l| l.strip_prefix("read_bytes:")).and_then(|v| v.trim().parse().ok())
}

/// Reads the store's matrix files front to back with 8 MiB reads: the disk's sequential speed.
fn sequential_read(store: &Store) -> Result<Duration> {
    let start = Instant::now();
    let mut buffer = vec![0u8; 8 << 20];
    for name in store.matrix_files() {
        let path = store.file_path(name);
        let mut file = File::open(&path).map_err(Error::io(&path))?;
        loop {
            let n = file.read(&mut buffer).map_err(Error::io(&path))?;
            if n == 0 {
                break;
            }
        }
    }
    Ok(start.elapsed())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// Cold epochs of the loader over every cell (see the module docs), `rounds` times.
pub fn bench_loader_cold(
    store_path: &Path,
    encoder: &EncoderOptions,
    plan: &PlanOptions,
    loader: LoaderOptions,
    advice: Access,
    rounds: u32,
) -> Result<ColdLoaderBench> {
    let store = Arc::new(Store::open(store_path).map_err(Error::stage(Stage::Reader))?);
    let encoder = EncoderOptions { split: SplitSpec::all_training(), ..encoder.clone() };
    let labels = Arc::new(CellLabels::from_store(&store, &encoder)?);
    let clustering = batcher::group_clustering(&labels, Split::Train);
    let plan = PlanOptions { run_cells: batcher::run_cells_for(plan.run_cells, clustering), ..plan.clone() }
        .fitted(&store, loader.buffer_bytes);
    let matrix_bytes = store.matrix_bytes();
    let consumer = StageStats::new(Stage::Consumer, 1);
    let mut out = Vec::new();
    for epoch in 0..u64::from(rounds.max(1)) {
        store.evict_from_page_cache().map_err(Error::stage(Stage::Reader))?;
        let sequential = sequential_read(&store)?;
        store.evict_from_page_cache().map_err(Error::stage(Stage::Reader))?;
        store.advise(advice);
        let before = storage_read_bytes();
        let start = Instant::now();
        let mut cells = 0u64;
        let stop = Arc::new(AtomicBool::new(false));
        let pool = PoolStats::planned(loader.workers);
        let mut loaded = spawn_loader(&store, &labels, Split::Train, epoch, 0, &plan, loader, pool, stop)?;
        while let Some(gathered) = loaded.next(&consumer) {
            let batch = gathered?.batch;
            cells += batch.n_cells() as u64;
            loaded.recycle(batch);
        }
        drop(loaded);
        let seconds = start.elapsed().as_secs_f64().max(1e-9);
        let disk_mb = before.zip(storage_read_bytes()).map(|(b, a)| a.saturating_sub(b) as f64 / 1e6);
        out.push(ColdRound {
            disk_sequential_mb_per_s: matrix_bytes as f64 / 1e6 / sequential.as_secs_f64().max(1e-9),
            cells_per_s: cells as f64 / seconds,
            seconds,
            disk_mb,
            disk_mb_per_s: disk_mb.map(|mb| mb / seconds),
        });
    }
    Ok(ColdLoaderBench {
        store: store_path.display().to_string(),
        codec: store.manifest().codec.name().to_owned(),
        cells: store.n_obs(),
        matrix_bytes,
        batch_size: plan.batch_size,
        workers: loader.workers,
        advice: advice_name(advice).to_owned(),
        shuffle_blocks: plan.shuffle_blocks,
        cells_per_s: median(out.iter().map(|r| r.cells_per_s).collect()),
        disk_mb_per_s: out.iter().map(|r| r.disk_mb_per_s).collect::<Option<Vec<f64>>>().map(median),
        disk_sequential_mb_per_s: median(out.iter().map(|r| r.disk_sequential_mb_per_s).collect()),
        rounds: out,
    })
}
