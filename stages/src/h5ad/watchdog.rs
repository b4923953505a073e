//! A watchdog for the HDF5 calls that can hang on a damaged file.
//!
//! Reading a variable-length string goes through HDF5's global heap; a corrupt global heap
//! collection makes the C library (1.14) loop forever inside `H5Aread`/`H5Dread`
//! (`fuzz/known/h5ad-hdf5-global-heap-hang.h5ad`). A library call cannot be interrupted from
//! inside the process, so a program that must not hang (the CLI) [`install`]s this watchdog:
//! when one guarded call has not returned within the limit, it prints which file and element
//! were being read and ends the process at once (`_exit(1)`: no exit handlers, which could wait
//! on the looping thread). Nothing is published then; the temporary output is cleaned by the
//! next run of the same output. Without [`install`] (the Python module: ending a user's
//! interpreter is not this library's call) guards cost one relaxed atomic load.
//!
//! The limit counts the CPU time of the thread making the call, not wall time: a looping call
//! burns CPU, while a process that is stopped (Ctrl-Z, `scontrol suspend`, a cgroup freezer),
//! waiting for its turn on a busy machine or reading a slow disk does not, and is never taken
//! for hung. (A call blocked for ever without using the CPU, such as a read from a FIFO, cannot
//! happen: the `audit` module refuses every reference to another file before anything is read.)

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// CPU seconds a guarded call may take by default, unless `CPA_STREAM_HDF5_TIMEOUT` says otherwise.
/// The guarded reads are attributes and slices of string columns: milliseconds on a sound file.
pub const DEFAULT_LIMIT_SECS: u64 = 300;

static INSTALLED: AtomicBool = AtomicBool::new(false);
static LIMIT: OnceLock<Duration> = OnceLock::new();
static NEXT: AtomicU64 = AtomicU64::new(0);
static WATCHED: Mutex<Option<HashMap<u64, (ThreadClock, String)>>> = Mutex::new(None);

/// The CPU-time clock of the thread that made a guarded call, and its reading then.
#[derive(Debug, Clone, Copy)]
struct ThreadClock {
    clock: libc::clockid_t,
    start: Duration,
}

impl ThreadClock {
    /// The calling thread's clock (`None` where the system has none).
    fn current() -> Option<ThreadClock> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self is always valid for the calling thread; the clock id is written
        // into a live local.
        if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } != 0 {
            return None;
        }
        Some(ThreadClock { clock, start: read_clock(clock)? })
    }

    /// CPU time the thread has used since the call began. The thread is alive while its guard
    /// is registered (the guard is dropped on that thread before it can end).
    fn used(&self) -> Duration {
        read_clock(self.clock).map_or(Duration::ZERO, |now| now.saturating_sub(self.start))
    }
}

fn read_clock(clock: libc::clockid_t) -> Option<Duration> {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a live timespec.
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        return None;
    }
    Some(Duration::new(u64::try_from(now.tv_sec).ok()?, u32::try_from(now.tv_nsec).ok()?))
}

/// Starts the watchdog (once per process) with `limit`, or with `CPA_STREAM_HDF5_TIMEOUT`
/// seconds when that is set, or [`DEFAULT_LIMIT_SECS`].
pub fn install(limit: Option<Duration>) {
    let limit = limit
        .or_else(|| std::env::var("CPA_STREAM_HDF5_TIMEOUT").ok()?.parse::<f64>().ok().map(Duration::from_secs_f64))
        .filter(|l| !l.is_zero())
        .unwrap_or(Duration::from_secs(DEFAULT_LIMIT_SECS));
    if LIMIT.set(limit).is_err() {
        return;
    }
    let started = std::thread::Builder::new().name("hdf5-watchdog".to_owned()).spawn(move || watch_loop(limit));
    if started.is_ok() {
        INSTALLED.store(true, Ordering::Release);
    }
}

fn watch_loop(limit: Duration) {
    let tick = (limit / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        std::thread::sleep(tick);
        if let Some(what) = overdue(limit) {
            let message = format!(
                "error: {what}: the HDF5 library has not returned after {:.0} s of CPU time; the file is probably \
                 damaged (a corrupt global heap makes HDF5 loop; h5py and anndata hang on it too). Stopped; nothing \
                 was published. CPA_STREAM_HDF5_TIMEOUT=SECONDS waits longer.\n",
                limit.as_secs_f64()
            );
            let _ = std::io::stderr().write_all(message.as_bytes());
            // SAFETY: `_exit` ends the process without running exit handlers; nothing after it.
            unsafe { libc::_exit(1) }
        }
    }
}

/// A guarded call whose thread has used `limit` of CPU time in it, by what it reads.
fn overdue(limit: Duration) -> Option<String> {
    let watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
    watched.as_ref().and_then(|w| w.values().find(|(clock, _)| clock.used() >= limit).map(|(_, what)| what.clone()))
}

/// A guarded call in progress: dropped when it returns.
pub(crate) struct Guard(Option<u64>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            let mut watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(w) = watched.as_mut() {
                w.remove(&id);
            }
        }
    }
}

/// Guards the HDF5 call made while the result lives; `what` (the file and the element, for the
/// message) is only formatted when the watchdog is installed.
pub(crate) fn guard(what: impl FnOnce() -> String) -> Guard {
    if !INSTALLED.load(Ordering::Acquire) {
        return Guard(None);
    }
    let Some(clock) = ThreadClock::current() else { return Guard(None) };
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
    watched.get_or_insert_with(HashMap::new).insert(id, (clock, what()));
    Guard(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_overdue_by_the_cpu_time_it_used_not_by_the_time_it_waited() {
        // Installed with a limit no test reaches: the watchdog itself never fires here.
        install(Some(Duration::from_secs(3600)));
        let limit = Duration::from_millis(100);
        let (to_main, from_call) = std::sync::mpsc::channel();
        let (to_call, from_main) = std::sync::mpsc::channel::<()>();
        let call = std::thread::spawn(move || {
            let _guard = guard(|| "a test call".to_owned());
            // Stopped, suspended or waiting its turn: wall time passes, CPU time does not.
            std::thread::sleep(Duration::from_millis(300));
            let _ = to_main.send(());
            let _ = from_main.recv();
            // Looping, as HDF5 on a corrupt heap: CPU time passes.
            let clock = ThreadClock::current().map(|c| c.clock);
            let start = clock.and_then(read_clock).unwrap_or_default();
            while clock.and_then(read_clock).is_some_and(|now| now.saturating_sub(start) < 2 * limit) {
                std::hint::spin_loop();
            }
            let _ = to_main.send(());
            let _ = from_main.recv();
        });
        let _ = from_call.recv();
        assert_eq!(overdue(limit), None, "a call that only waited was taken for hung");
        let _ = to_call.send(());
        let _ = from_call.recv();
        assert_eq!(overdue(limit).as_deref(), Some("a test call"));
        let _ = to_call.send(());
        let _ = call.join();
        assert_eq!(overdue(limit), None, "the guard was dropped with its call");
    }
}
