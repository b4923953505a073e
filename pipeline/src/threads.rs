//! How many threads libtorch and the batcher get, and how libtorch's OpenMP threads wait:
//! planned together from the CPUs this process may use and from how busy other processes keep
//! them, so that a run on shared cores does not fall apart.
//!
//! Measured on a 2-core machine (`bench model`, 3,000 cells x 2,000 genes, batch 128; see
//! docs/benchmarks.md): idle, libtorch's own setting (OpenMP threads spinning about 300,000
//! rounds between operators, one thread per core) is the fastest, 5,500-6,200 cells/s; with
//! both cores busy with other processes it falls to 1,400 (25 %), because the spinning threads
//! take the time the step's other thread needs. Passive waiting (`OMP_WAIT_POLICY=PASSIVE`)
//! holds 3,300-3,900 cells/s under that load, but costs up to a third idle. So the plan keeps
//! libtorch's setting on idle CPUs and switches to passive waiting when at least half a CPU is
//! busy elsewhere ([`BUSY`]); OpenMP reads its wait policy only when it is loaded, so the CLI
//! re-executes itself once to apply it. The thread count is the CPUs this process may use
//! (libtorch's own default counts the machine's cores, ignoring a container's CPU quota), busy or
//! not: libtorch's CPU results depend on its thread count, and the same command with the same
//! seed must give the same model whatever else runs on the machine. (Fewer threads would be
//! faster on busy cores: `train` on 40,000 x 2,000 cells beside two busy processes ran 2,900
//! cells/s with `--threads 1` and 2,300 with the two passive threads of the plan; that choice is
//! left to `--threads`.) The batcher gets one worker per four CPUs (at least one, at most the
//! default), one when shared: on a CPU device the trainer, not the loader, is the bottleneck, and
//! the workers never change a result. `--threads` and `--workers`
//! override either.

use std::fs;
use std::time::Duration;

use serde::Serialize;

/// How long [`busy_elsewhere`] watches the CPUs.
pub const SAMPLE: Duration = Duration::from_millis(200);

/// The threads of a run and why.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ThreadPlan {
    /// CPUs this process may use: its affinity mask and cgroup CPU quota
    /// (`std::thread::available_parallelism`).
    pub cpus: usize,
    /// CPUs kept busy by other processes while the plan was made (0 when not measured).
    pub busy_elsewhere: f64,
    /// libtorch's intra-op threads.
    pub torch: usize,
    /// Batcher workers.
    pub workers: usize,
    /// Whether OpenMP threads should wait passively (the CPUs are shared).
    pub passive: bool,
}

/// The CPUs this process may use (affinity and cgroup quota), at least 1.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Threads that encode a prediction's Parquet row groups, unless given: on the CPU one (the
/// model's libtorch threads have the CPUs, and one thread encodes as fast as the CPU predicts);
/// on a GPU the CPUs but one, at most 8 (the host must keep pace with the device).
pub fn sink_threads(on_cpu: bool) -> usize {
    if on_cpu { 1 } else { cpus().saturating_sub(1).clamp(1, 8) }
}

/// The most gather workers a GPU run plans.
pub const GPU_WORKERS_MAX: usize = 8;

/// CPUs busy with other processes from which a run counts the machine as shared.
pub const BUSY: f64 = 0.5;

/// Plans the threads of a run on a machine of `cpus` usable CPUs ([`cpus`]), on the CPU
/// (`on_cpu`) or on a GPU; `torch` and `workers` are the user's (kept as given), `busy` the CPUs
/// other processes keep busy ([`busy_elsewhere`]).
pub fn plan(
    cpus: usize,
    on_cpu: bool,
    torch: Option<usize>,
    workers: Option<usize>,
    default_workers: usize,
    busy: f64,
) -> ThreadPlan {
    let shared = busy >= BUSY;
    // Never from the load: libtorch's CPU results depend on its thread count (the reductions
    // split differently), and the same command with the same seed must give the same model
    // whatever else runs on the machine. On a GPU libtorch's CPU threads only launch kernels.
    let torch = torch.unwrap_or(if on_cpu { cpus } else { cpus.min(4) }).max(1);
    let planned = match (on_cpu, shared) {
        (true, true) => 1,
        (true, false) => (cpus / 4).clamp(1, default_workers.max(1)),
        // A GPU trains faster than one worker gathers (an H200 trains the default model at
        // 0.6-0.9 M cells/s; a worker gathers 0.15-0.3 M): half the CPUs, up to 8.
        (false, _) => (cpus / 2).min(GPU_WORKERS_MAX).max(default_workers.min(cpus)).max(1),
    };
    let workers = workers.unwrap_or(planned).max(1);
    ThreadPlan { cpus, busy_elsewhere: busy, torch, workers, passive: shared }
}

/// The environment variable through which a process that measured the busy CPUs at start
/// hands the figure to [`configure`].
pub const BUSY_CPUS_VAR: &str = "CPA_STREAM_BUSY_CPUS";

/// The CPUs that other processes kept busy over `sample`: the machine's busy time
/// (`/proc/stat`) less this process's own (`/proc/self/stat`), over the sample. `0.0` where
/// `/proc` cannot be read. Counts the whole machine, which inside a container with a CPU quota
/// overstates the competition for this process's own share; the plan only uses it to give up
/// cores, never to take more than [`cpus`].
pub fn busy_elsewhere(sample: Duration) -> f64 {
    let (Some(machine0), Some(own0)) = (machine_ticks(), own_ticks()) else { return 0.0 };
    std::thread::sleep(sample);
    let (Some(machine1), Some(own1)) = (machine_ticks(), own_ticks()) else { return 0.0 };
    elsewhere(machine0, machine1, own1.saturating_sub(own0), online_cpus())
}

/// CPUs busy elsewhere from two readings of the machine's `(busy, total)` ticks, this process's
/// own ticks between them, and the CPUs the ticks add up over.
fn elsewhere((busy0, total0): (u64, u64), (busy1, total1): (u64, u64), own: u64, all_cpus: usize) -> f64 {
    let total = total1.saturating_sub(total0) as f64;
    if total <= 0.0 {
        return 0.0;
    }
    // /proc/stat's times add up over CPUs: a second of wall on n CPUs is n seconds of ticks.
    let busy = busy1.saturating_sub(busy0).saturating_sub(own) as f64;
    (busy / total * all_cpus as f64).clamp(0.0, all_cpus as f64)
}

/// Busy and total ticks of all CPUs (`/proc/stat`'s first line; idle and iowait count as idle).
fn machine_ticks() -> Option<(u64, u64)> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line.split_whitespace().filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// This process's user + system ticks (`/proc/self/stat` fields 14 and 15).
fn own_ticks() -> Option<u64> {
    let text = fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; fields after it follow the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// CPUs online in the machine (what `/proc/stat` adds up over).
fn online_cpus() -> usize {
    fs::read_to_string("/proc/stat")
        .map(|t| {
            t.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count()
        })
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_s_counts_are_kept() {
        let p = plan(cpus(), true, Some(7), Some(3), 2, 100.0);
        assert_eq!((p.torch, p.workers), (7, 3));
    }

    #[test]
    fn shared_cpus_make_openmp_wait_passively_and_the_batcher_small() {
        let n = cpus();
        let idle = plan(n, true, None, None, 2, 0.0);
        assert_eq!((idle.torch, idle.passive), (n, false));
        assert_eq!(idle.workers, (n / 4).clamp(1, 2));
        let loaded = plan(n, true, None, None, 2, n as f64);
        // The load changes how threads wait and the batcher, never libtorch's thread count (its
        // results depend on it).
        assert_eq!((loaded.torch, loaded.workers, loaded.passive), (n, 1, true));
        // A GPU run plans the batcher, not libtorch's compute.
        let gpu = plan(n, false, None, None, 2, 0.0);
        assert_eq!(gpu.torch, n.min(4));
    }

    #[test]
    fn a_gpu_run_gathers_with_half_the_cpus_at_least_the_default_and_at_most_eight() {
        let workers = |cpus: usize| plan(cpus, false, None, None, 2, 0.0).workers;
        assert_eq!([1, 2, 3, 4, 8, 12, 16, 64].map(workers), [1, 2, 2, 2, 4, 6, 8, 8]);
        // The user's count stands, and the CPU's plan is not the GPU's.
        assert_eq!(plan(16, false, None, Some(3), 2, 0.0).workers, 3);
        assert_eq!(plan(16, true, None, None, 2, 0.0).workers, 2);
    }

    #[test]
    fn competition_is_the_machine_s_busy_time_less_this_process_s() {
        // 4 CPUs over 1 s: 400 ticks; 300 busy, 100 of them this process's: 2 CPUs elsewhere.
        assert_eq!(elsewhere((1000, 5000), (1300, 5400), 100, 4), 2.0);
        // An idle machine, a busy process of our own only, and a clock that did not move.
        assert_eq!(elsewhere((1000, 5000), (1100, 5400), 100, 4), 0.0);
        assert_eq!(elsewhere((1000, 5000), (1000, 5000), 0, 4), 0.0);
        // Never more CPUs than the machine has.
        assert_eq!(elsewhere((0, 0), (900, 400), 0, 4), 4.0);
        if fs::metadata("/proc/stat").is_ok() {
            let now = busy_elsewhere(Duration::from_millis(50));
            assert!((0.0..=online_cpus() as f64).contains(&now), "{now}");
            assert!(own_ticks().is_some() && machine_ticks().is_some());
        }
    }
}
