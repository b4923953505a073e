//! Long work of a command, run on the calling thread with the GIL released, while a thread of
//! its own shows the work's progress through a Python object and watches for Ctrl-C.
//!
//! The work runs on the calling thread, not on a thread of its own, for glibc's allocator: the
//! heap of a process's main thread keeps its freed megabytes for reuse
//! ([`cpa_stream_pipeline::allocator`]), while the heaps glibc gives other threads are unmapped
//! whenever they empty, so that libtorch's activations, made and dropped every training step,
//! cost fresh zeroed pages each time there (docs/benchmarks.md, "The Python route's training
//! step").

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use cpa_stream_pipeline::{Progress, RunContext};
use cpa_stream_stages::crew::Crew;
use crossbeam_channel::{RecvTimeoutError, Sender, unbounded};
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError};
use pyo3::prelude::*;

use crate::{CpaStreamError, to_py};

/// What a run reports, sent from its thread to the thread that shows it.
pub(crate) enum Event {
    Begin(String, u64),
    Advance(u64),
    End,
    Epochs(u64, u64, u32, u32),
    Note(String),
}

/// Progress sent to the thread that shows it.
struct ChannelProgress(Sender<Event>);

impl Progress for ChannelProgress {
    fn begin(&self, phase: &str, total: u64) {
        let _ = self.0.send(Event::Begin(phase.to_owned(), total));
    }
    fn advance(&self, n: u64) {
        let _ = self.0.send(Event::Advance(n));
    }
    fn end(&self) {
        let _ = self.0.send(Event::End);
    }
    fn epochs(&self, cells_per_epoch: u64, resumed: u64, first: u32, last: u32) {
        let _ = self.0.send(Event::Epochs(cells_per_epoch, resumed, first, last));
    }
    fn note(&self, text: &str) {
        let _ = self.0.send(Event::Note(text.to_owned()));
    }
}

/// Calls the Python progress object (methods `begin`, `advance`, `end`, `epochs`, `note`); a
/// failing one is reported once as unraisable and then left alone, never failing the run.
pub(crate) struct Shown {
    pub(crate) target: Option<Py<PyAny>>,
}

impl Shown {
    pub(crate) fn deliver(&mut self, py: Python<'_>, event: Event) {
        let Some(target) = self.target.as_ref().map(|t| t.bind(py).clone()) else { return };
        let called = match event {
            Event::Begin(phase, total) => target.call_method1("begin", (phase, total)),
            Event::Advance(n) => target.call_method1("advance", (n,)),
            Event::End => target.call_method0("end"),
            Event::Epochs(cells, resumed, first, last) => target.call_method1("epochs", (cells, resumed, first, last)),
            Event::Note(text) => target.call_method1("note", (text,)),
        };
        if let Err(e) = called {
            e.write_unraisable(py, Some(&target));
            self.target = None;
        }
    }
}

/// What Ctrl-C does to a command.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnInterrupt {
    /// Training: the run ends at its next step with a checkpoint, as on the CLI's first Ctrl-C,
    /// and returns its report (`interrupted`).
    Checkpoint,
    /// Everything else: nothing is published, and `KeyboardInterrupt` is raised once the work
    /// has ended.
    Raise,
}

/// glibc's allocator set as the CLI sets it, once, before the first command of the process.
pub(crate) fn set_allocator() {
    static ALLOCATOR: Once = Once::new();
    ALLOCATOR.call_once(cpa_stream_pipeline::allocator::reuse_freed_buffers);
}

/// Runs `work` on this thread with the GIL released while a thread of its own shows its
/// progress; Ctrl-C (on the main thread) sets the context's stop flag, with the effect
/// `on_interrupt` says. Returns what the work returned.
pub(crate) fn run_shown<T: Send>(
    py: Python<'_>,
    progress: Option<Bound<'_, PyAny>>,
    on_interrupt: OnInterrupt,
    work: impl FnOnce(&RunContext) -> cpa_stream_pipeline::Result<T> + Send,
) -> PyResult<T> {
    set_allocator();
    // Python runs its SIGINT handler on the main thread only, between bytecodes: not while that
    // thread works here. Elsewhere Ctrl-C is the main thread's, as for any Python thread.
    let main = py.import("threading")?;
    let on_main = main.call_method0("current_thread")?.is(&main.call_method0("main_thread")?);
    let (tx, rx) = unbounded::<Event>();
    let mut crew = Crew::new();
    let stop = crew.stop_flag();
    let interrupted = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&interrupted);
    let mut shown = Shown { target: progress.map(Bound::unbind) };
    crew.spawn("progress", "cpa-stream-progress".to_owned(), move || {
        loop {
            let event = rx.recv_timeout(Duration::from_millis(100));
            if matches!(event, Err(RecvTimeoutError::Disconnected)) {
                break;
            }
            let pressed = on_main && ctrl_c::take();
            if pressed {
                stop.store(true, Ordering::Relaxed);
                seen.store(true, Ordering::Relaxed);
            }
            let mut events: Vec<Event> = event.into_iter().chain(rx.try_iter()).collect();
            if pressed && on_interrupt == OnInterrupt::Checkpoint {
                events.push(Event::Note("interrupted: stopping after this step with a checkpoint".into()));
            }
            if !events.is_empty() && shown.target.is_some() {
                Python::attach(|py| events.into_iter().for_each(|e| shown.deliver(py, e)));
            }
        }
        // The progress object released with the GIL held.
        if shown.target.is_some() {
            Python::attach(|_| drop(shown));
        }
    })
    .map_err(|e| PyOSError::new_err(format!("starting a thread: {e}")))?;
    let flag = crew.stop_flag();
    let (result, joined) = py.detach(|| {
        let _handler = on_main.then(ctrl_c::Handler::install).flatten();
        let result = {
            let progress = ChannelProgress(tx);
            // With gradients whatever the calling thread's mode (`torch.no_grad()` around the
            // call): libtorch's grad mode is per thread.
            tch::with_grad(|| work(&RunContext::new(&progress).with_stop(&flag)))
        };
        (result, crew.join())
    });
    joined.map_err(|p| CpaStreamError::new_err(format!("the progress thread panicked: {}", p.message)))?;
    // A Ctrl-C as the work ended, after the progress thread's last look.
    if on_main && ctrl_c::take() {
        interrupted.store(true, Ordering::Relaxed);
    }
    if on_interrupt == OnInterrupt::Raise && interrupted.load(Ordering::Relaxed) {
        return Err(PyKeyboardInterrupt::new_err(""));
    }
    result.map_err(to_py)
}

/// Ctrl-C while the main thread works outside Python: a SIGINT handler of this module, in place
/// of Python's for the work's duration, records it.
mod ctrl_c {
    use std::sync::atomic::{AtomicBool, Ordering};

    static PRESSED: AtomicBool = AtomicBool::new(false);

    /// Whether Ctrl-C was pressed since the last call.
    pub(super) fn take() -> bool {
        PRESSED.swap(false, Ordering::Relaxed)
    }

    /// The handler in place; the one it replaced is put back on drop.
    pub(super) struct Handler {
        #[cfg(unix)]
        replaced: libc::sigaction,
    }

    #[cfg(unix)]
    extern "C" fn on_sigint(_: libc::c_int) {
        PRESSED.store(true, Ordering::Relaxed);
    }

    impl Handler {
        /// Installs the handler, unless SIGINT is ignored (the process was started so) or this
        /// platform has none.
        #[cfg(unix)]
        pub(super) fn install() -> Option<Handler> {
            // SAFETY: sigaction with valid, zero-initialised structures; the handler only
            // stores to an atomic, which is async-signal-safe.
            unsafe {
                let mut replaced: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGINT, std::ptr::null(), &mut replaced) != 0
                    || replaced.sa_sigaction == libc::SIG_IGN
                {
                    return None;
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                PRESSED.store(false, Ordering::Relaxed);
                if libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut()) != 0 {
                    return None;
                }
                Some(Handler { replaced })
            }
        }

        #[cfg(not(unix))]
        pub(super) fn install() -> Option<Handler> {
            None
        }
    }

    impl Drop for Handler {
        fn drop(&mut self) {
            #[cfg(unix)]
            // SAFETY: puts back the action read in `install`.
            unsafe {
                libc::sigaction(libc::SIGINT, &self.replaced, std::ptr::null_mut());
            }
        }
    }
}
