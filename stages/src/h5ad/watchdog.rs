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

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Seconds a guarded call may take by default, unless `CPA_STREAM_HDF5_TIMEOUT` says otherwise.
/// The guarded reads are attributes and slices of string columns: milliseconds on a sound file.
pub const DEFAULT_LIMIT_SECS: u64 = 300;

static INSTALLED: AtomicBool = AtomicBool::new(false);
static LIMIT: OnceLock<Duration> = OnceLock::new();
static NEXT: AtomicU64 = AtomicU64::new(0);
static WATCHED: Mutex<Option<HashMap<u64, (Instant, String)>>> = Mutex::new(None);

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
        let overdue = {
            let watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
            watched
                .as_ref()
                .and_then(|w| w.values().find(|(since, _)| since.elapsed() >= limit).map(|(_, what)| what.clone()))
        };
        if let Some(what) = overdue {
            let message = format!(
                "error: {what}: the HDF5 library has not returned after {:.0} s; the file is probably damaged \
                 (a corrupt global heap makes HDF5 loop; h5py and anndata hang on it too). Stopped; nothing was \
                 published. CPA_STREAM_HDF5_TIMEOUT=SECONDS waits longer.\n",
                limit.as_secs_f64()
            );
            let _ = std::io::stderr().write_all(message.as_bytes());
            // SAFETY: `_exit` ends the process without running exit handlers; nothing after it.
            unsafe { libc::_exit(1) }
        }
    }
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
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
    watched.get_or_insert_with(HashMap::new).insert(id, (Instant::now(), what()));
    Guard(Some(id))
}
