//! Ctrl-C, and the signals schedulers end jobs with, as a request to stop cleanly.
//!
//! Slurm (`scancel`, the end of a time limit), Kubernetes and systemd send SIGTERM and wait a
//! grace period before SIGKILL; a closed terminal or SSH session sends SIGHUP. `train` treats
//! all three like Ctrl-C: the first stops the run after the current step with a checkpoint inside
//! the epoch (`--resume` goes on from there), and the command exits with the shell's code for
//! that signal (128 + its number: 130, 143, 129). A second signal ends the process at once.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

/// The first stop signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// The flag the run polls.
static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// What the handler prints for the first signal (async-signal-safe: static bytes, one write).
fn notice(signal: libc::c_int) -> &'static [u8] {
    match signal {
        libc::SIGTERM => b"\ncpa-stream: SIGTERM: stopping after this step with a checkpoint (--resume goes on; a second signal quits at once)\n",
        libc::SIGHUP => b"\ncpa-stream: SIGHUP: stopping after this step with a checkpoint (--resume goes on; a second signal quits at once)\n",
        _ => b"\ncpa-stream: interrupted: stopping after this step with a checkpoint (Ctrl-C again to quit at once)\n",
    }
}

extern "C" fn on_stop_signal(signal: libc::c_int) {
    if RECEIVED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst).is_err() {
        // SAFETY: _exit is async-signal-safe and ends the process at once.
        unsafe { libc::_exit(128 + signal) };
    }
    if let Some(stop) = STOP.get() {
        stop.store(true, Ordering::SeqCst);
    }
    let text = notice(signal);
    // SAFETY: write(2) is async-signal-safe; the bytes are static.
    unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
}

/// Sets `stop` on the first SIGINT, SIGTERM or SIGHUP; a second ends the process with 128 + its
/// number. Once per process.
pub fn stop_on_signals(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    anyhow::ensure!(STOP.set(stop).is_ok(), "the stop-signal handler is already installed");
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with an empty mask and the handler set is valid; the handler
        // only touches atomics and calls async-signal-safe functions.
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        anyhow::ensure!(
            installed == 0,
            "installing a handler for signal {signal}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The exit code of a run that a signal stopped: 128 + the signal's number (130 for Ctrl-C).
pub fn interrupted_exit_code() -> u8 {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => 130,
        signal => u8::try_from(128 + signal).unwrap_or(130),
    }
}

/// The signal that stopped the run, by name, for the summary line.
pub fn received_name() -> &'static str {
    match RECEIVED.load(Ordering::SeqCst) {
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "Ctrl-C",
    }
}
