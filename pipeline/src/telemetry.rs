//! Stage metrics and memory accounting.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Stage;
use cpa_stream_stages::crew::Crew;
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;

/// Counters of one stage, shared by its threads.
#[derive(Debug, Default)]
pub struct StageStats {
    name: Stage,
    threads: AtomicU64,
    busy_ns: AtomicU64,
    blocked_in_ns: AtomicU64,
    blocked_out_ns: AtomicU64,
    rows: AtomicU64,
    bytes: AtomicU64,
}

impl StageStats {
    /// Counters of a stage named `name` run by `threads` threads.
    pub fn new(name: Stage, threads: usize) -> Arc<StageStats> {
        Arc::new(StageStats { name, threads: AtomicU64::new(threads as u64), ..Default::default() })
    }

    /// Runs `work`, counting its time as busy.
    pub fn busy<T>(&self, work: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = work();
        self.busy_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// Counts `time` as busy (work timed by the caller).
    pub fn add_busy(&self, time: Duration) {
        self.busy_ns.fetch_add(time.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Counts `rows` rows and `bytes` bytes as done.
    pub fn add(&self, rows: u64, bytes: u64) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Receives from the stage's input, counting the wait. `None` when the producer is gone.
    pub fn recv<T>(&self, rx: &Receiver<T>) -> Option<T> {
        let start = Instant::now();
        let msg = rx.recv().ok();
        self.blocked_in_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        msg
    }

    /// Runs `wait` (a receive the stage does not do through [`recv`](Self::recv)), counting its
    /// time as blocked on input.
    pub fn blocked_in<T>(&self, wait: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = wait();
        self.blocked_in_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// Receives with a time limit, counting the wait.
    pub fn recv_timeout<T>(&self, rx: &Receiver<T>, limit: Duration) -> Result<T, crossbeam_channel::RecvTimeoutError> {
        let start = Instant::now();
        let msg = rx.recv_timeout(limit);
        self.blocked_in_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        msg
    }

    /// Sends to the stage's output, counting the wait. `false` when the consumer is gone (the
    /// producer should stop quietly: the consumer reports why).
    pub fn send<T>(&self, tx: &Sender<T>, msg: T) -> bool {
        let start = Instant::now();
        let ok = tx.send(msg).is_ok();
        self.blocked_out_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        ok
    }

    /// What the stage has done so far.
    pub fn report(&self) -> StageReport {
        let d = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        StageReport {
            name: self.name.name().to_owned(),
            threads: self.threads.load(Ordering::Relaxed),
            busy: d(&self.busy_ns),
            blocked_in: d(&self.blocked_in_ns),
            blocked_out: d(&self.blocked_out_ns),
            rows: self.rows.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// What one stage did during a run (times summed over its threads).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageReport {
    /// The stage's name.
    pub name: String,
    /// Its threads.
    pub threads: u64,
    /// Time working, summed over threads.
    pub busy: Duration,
    /// Time blocked on input (an empty channel), summed over threads.
    pub blocked_in: Duration,
    /// Time blocked on output (a full channel), summed over threads.
    pub blocked_out: Duration,
    /// Rows done.
    pub rows: u64,
    /// Bytes done.
    pub bytes: u64,
}

impl StageReport {
    /// Fraction of the stage's thread time spent working.
    pub fn utilisation(&self, wall: Duration) -> f64 {
        let capacity = wall.as_secs_f64() * self.threads.max(1) as f64;
        if capacity > 0.0 { self.busy.as_secs_f64() / capacity } else { 0.0 }
    }
}

/// The end-of-run report: stages, wall time, peak memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// Wall time of the run.
    pub wall: Duration,
    /// Every stage's report.
    pub stages: Vec<StageReport>,
    /// Peak memory of the process.
    pub memory: MemoryPeak,
}

impl RunReport {
    /// The stage that limits the run: the one busiest relative to its threads.
    pub fn bottleneck(&self) -> Option<&StageReport> {
        self.stages.iter().max_by(|a, b| a.utilisation(self.wall).total_cmp(&b.utilisation(self.wall)))
    }

    /// The stage that held the run up, worth a note beside a command's results: the bottleneck,
    /// when it is a stage that moves data ([`Stage::moves_data`]: a reader, the batcher, a
    /// writer, the sink, ...), busy for at least [`HOLDUP_UTILISATION`] of a run of at least
    /// [`HOLDUP_SECONDS`]. `None` when the model or nothing in particular limited the run.
    pub fn holdup(&self) -> Option<&StageReport> {
        let b = self.bottleneck()?;
        let moves_data = b.name.parse::<Stage>().is_ok_and(Stage::moves_data);
        let long = self.wall.as_secs_f64() >= HOLDUP_SECONDS;
        (moves_data && long && b.utilisation(self.wall) >= HOLDUP_UTILISATION).then_some(b)
    }

    /// A table of the stages followed by the bottleneck and peak memory.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<12} {:>7} {:>12} {:>12} {:>9} {:>9} {:>11} {:>6}",
            "stage", "threads", "rows", "MB", "busy s", "in s", "out s", "busy%"
        );
        for s in &self.stages {
            let _ = writeln!(
                out,
                "{:<12} {:>7} {:>12} {:>12.1} {:>9.2} {:>9.2} {:>11.2} {:>5.0}%",
                s.name,
                s.threads,
                s.rows,
                s.bytes as f64 / 1e6,
                s.busy.as_secs_f64(),
                s.blocked_in.as_secs_f64(),
                s.blocked_out.as_secs_f64(),
                100.0 * s.utilisation(self.wall)
            );
        }
        if let Some(b) = self.bottleneck() {
            let _ = writeln!(out, "bottleneck: {} ({:.0}% busy)", b.name, 100.0 * b.utilisation(self.wall));
        }
        let _ = writeln!(
            out,
            "wall {:.2} s; peak RssAnon {:.1} MiB, peak RssFile {:.1} MiB, VmHWM {:.1} MiB",
            self.wall.as_secs_f64(),
            mib(self.memory.rss_anon),
            mib(self.memory.rss_file),
            mib(self.memory.vm_hwm)
        );
        out
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Memory of this process now, from `/proc/self/status` (zeros where it is not available).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryUsage {
    /// Anonymous resident memory (heap, stacks): what a streaming run must keep flat.
    pub rss_anon: u64,
    /// File-backed resident memory (mapped store pages).
    pub rss_file: u64,
    /// All resident memory.
    pub vm_rss: u64,
    /// Peak resident memory (the kernel's high-water mark).
    pub vm_hwm: u64,
}

impl MemoryUsage {
    /// The process's memory now.
    pub fn current() -> MemoryUsage {
        let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
            return MemoryUsage::default();
        };
        let mut usage = MemoryUsage::default();
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else { continue };
            let kib: u64 = value.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
            match key {
                "RssAnon" => usage.rss_anon = kib * 1024,
                "RssFile" => usage.rss_file = kib * 1024,
                "VmRSS" => usage.vm_rss = kib * 1024,
                "VmHWM" => usage.vm_hwm = kib * 1024,
                _ => {}
            }
        }
        usage
    }
}

/// Peaks seen by a [`MemorySampler`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryPeak {
    /// Peak anonymous resident memory.
    pub rss_anon: u64,
    /// Peak file-backed resident memory.
    pub rss_file: u64,
    /// Peak resident memory (the kernel's high-water mark).
    pub vm_hwm: u64,
}

/// Returns the allocator's free memory to the operating system (glibc's `malloc_trim`; a no-op
/// with other C libraries). Streaming runs call it at natural boundaries, such as a Parquet row
/// group written: glibc only gives back free memory at the top of its heaps, and the memory freed
/// in the middle of them by a long run's short-lived buffers otherwise stays resident and makes
/// the peak creep with the length of the run.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: `malloc_trim` has no preconditions: it takes the allocator's own locks and
        // releases free pages, touching no memory the program holds.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Samples `/proc/self/status` on a background thread of its own crew (Linux keeps no peak of
/// RssAnon itself).
pub struct MemorySampler {
    crew: Crew<'static, &'static str>,
    peak: Arc<Mutex<MemoryPeak>>,
}

/// Sampling period of [`MemorySampler`].
pub const MEMORY_SAMPLE_PERIOD: Duration = Duration::from_millis(10);

impl MemorySampler {
    /// Starts sampling (or, where no thread can be started, samples nothing: the peaks read 0).
    pub fn start() -> MemorySampler {
        let mut crew = Crew::new();
        let (stop, peak) = (crew.stop_flag(), Arc::new(Mutex::new(MemoryPeak::default())));
        let shared = Arc::clone(&peak);
        let sample = move || {
            loop {
                let now = MemoryUsage::current();
                {
                    let mut peak = shared.lock().unwrap_or_else(|p| p.into_inner());
                    peak.rss_anon = peak.rss_anon.max(now.rss_anon);
                    peak.rss_file = peak.rss_file.max(now.rss_file);
                    peak.vm_hwm = peak.vm_hwm.max(now.vm_hwm);
                }
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(MEMORY_SAMPLE_PERIOD);
            }
        };
        let _ = crew.spawn("memory-sampler", "memory-sampler".to_owned(), sample);
        MemorySampler { crew, peak }
    }

    /// Stops sampling and returns the peaks.
    pub fn finish(mut self) -> MemoryPeak {
        let _ = self.crew.stop_and_join();
        *self.peak.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs shorter than this (seconds) are not worth a note on what held them up.
pub const HOLDUP_SECONDS: f64 = 5.0;
/// The share of a run a stage must be busy to have held it up.
pub const HOLDUP_UTILISATION: f64 = 0.6;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_that_moves_data_and_held_the_run_up_is_named_for_every_command() {
        let stage = |name: &str, busy| StageReport {
            name: name.to_owned(),
            threads: 1,
            busy: Duration::from_secs(busy),
            blocked_in: Duration::ZERO,
            blocked_out: Duration::ZERO,
            rows: 1,
            bytes: 1,
        };
        let report =
            |wall, stages| RunReport { wall: Duration::from_secs(wall), stages, memory: MemoryPeak::default() };
        // import, convert and export: read and write (scatter for a shuffle); train and predict:
        // the batcher, source and sink.
        for (held_up, other) in [
            ("read", "write"),
            ("write", "read"),
            ("scatter", "write"),
            ("batcher", "trainer"),
            ("source", "predictor"),
            ("sink", "predictor"),
        ] {
            let r = report(10, vec![stage(held_up, 8), stage(other, 3)]);
            assert_eq!(r.holdup().map(|b| b.name.as_str()), Some(held_up), "{held_up}");
        }
        // The model's own work, a short run, or a stage busy for less than most of it: no note.
        assert!(report(10, vec![stage("trainer", 9), stage("batcher", 2)]).holdup().is_none());
        assert!(report(4, vec![stage("read", 4), stage("write", 1)]).holdup().is_none());
        assert!(report(10, vec![stage("read", 5), stage("write", 1)]).holdup().is_none());
    }

    #[test]
    fn bottleneck_is_the_busiest_stage_per_thread() {
        let wall = Duration::from_secs(10);
        let stage = |name: &str, threads, busy| StageReport {
            name: name.to_owned(),
            threads,
            busy: Duration::from_secs(busy),
            blocked_in: Duration::ZERO,
            blocked_out: Duration::ZERO,
            rows: 1,
            bytes: 1,
        };
        let report = RunReport {
            wall,
            stages: vec![stage("generate", 2, 12), stage("write", 1, 9)],
            memory: MemoryPeak::default(),
        };
        assert_eq!(report.bottleneck().map(|b| b.name.as_str()), Some("write"));
        assert!(report.render().contains("bottleneck: write (90% busy)"));
    }

    #[test]
    fn reads_this_process_memory() {
        let now = MemoryUsage::current();
        assert!(now.vm_rss > 0 && now.rss_anon > 0, "{now:?}");
        let sampler = MemorySampler::start();
        std::thread::sleep(Duration::from_millis(30));
        assert!(sampler.finish().rss_anon > 0);
    }

    #[test]
    fn channel_helpers_count_waits_and_detect_a_gone_peer() {
        let stats = StageStats::new(Stage::Source, 1);
        let (tx, rx) = crossbeam_channel::bounded(1);
        assert!(stats.send(&tx, 1));
        assert_eq!(stats.recv(&rx), Some(1));
        drop(rx);
        assert!(!stats.send(&tx, 2));
        stats.add(3, 4);
        let r = stats.report();
        assert_eq!((r.rows, r.bytes), (3, 4));
    }
}
