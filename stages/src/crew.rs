//! The one owner of every thread a run starts: each thread started named after its stage, all
//! asked to stop by one flag, all joined together, and the first panic turned into an error
//! naming the stage it happened in. Dropping a crew stops and joins its threads, so a caller
//! that stops reading never leaves threads behind.
//!
//! A crew's threads stop at the flag or when the channel they send on is closed: whoever owns
//! the receiving end drops it before [`join`](Crew::join) so that a thread blocked on a full
//! channel wakes up.
//!
//! The crew is generic over how a stage is named (`S`): the pipeline's crew names stages by its
//! `Stage` enum; the sink, which lives below the pipeline, by its name. No other code of the
//! workspace starts a thread but the process's HDF5 watchdog, which outlives every run
//! (`tests/integration/layout.rs` checks it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{JoinHandle, Scope, ScopedJoinHandle};

/// A started thread: owned (`'static` work) or scoped (work that borrows from its caller).
enum Handle<'scope> {
    Owned(JoinHandle<()>),
    Scoped(ScopedJoinHandle<'scope, ()>),
}

impl Handle<'_> {
    fn join(self) -> std::thread::Result<()> {
        match self {
            Handle::Owned(h) => h.join(),
            Handle::Scoped(h) => h.join(),
        }
    }
}

/// A thread of a crew that panicked: its stage and the panic's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Panicked<S> {
    /// The stage the thread belonged to.
    pub stage: S,
    /// What the panic said.
    pub message: String,
}

/// The text of a panic's payload (`panic!`'s message), or a placeholder.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_owned())
}

thread_local! {
    /// Calls of [`catch_quietly`] in progress on this thread.
    static QUIET: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Runs `work`, a call into a library that may panic on a damaged input (an index taken from
/// the file's bytes), and returns its panic as the panic's message instead of unwinding further.
/// With [`install_quiet_panic_hook`], the hook says nothing of such a panic: the caller turns it
/// into an error naming the file, which is what the user reads.
pub fn catch_quietly<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    QUIET.with(|q| q.set(q.get() + 1));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    QUIET.with(|q| q.set(q.get() - 1));
    caught.map_err(|payload| panic_message(payload.as_ref()))
}

/// Installs (once per process) a panic hook that stays silent about the panics [`catch_quietly`]
/// catches on the panicking thread and hands every other panic to the hook it replaces.
pub fn install_quiet_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(|q| q.get()) == 0 {
                previous(info);
            }
        }));
    });
}

/// The threads of one or more stages and their stop flag.
pub struct Crew<'scope, S> {
    stop: Arc<AtomicBool>,
    threads: Vec<(S, Handle<'scope>)>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Crew<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stages: Vec<&S> = self.threads.iter().map(|(s, _)| s).collect();
        f.debug_struct("Crew").field("threads", &stages).field("stopped", &self.stopped()).finish()
    }
}

impl<S> Default for Crew<'_, S> {
    fn default() -> Self {
        Crew::new()
    }
}

impl<'scope, S> Crew<'scope, S> {
    /// A crew with no threads yet and a stop flag of its own.
    pub fn new() -> Self {
        Crew { stop: Arc::new(AtomicBool::new(false)), threads: Vec::new() }
    }

    /// The flag that asks the crew's threads to stop, for them to poll.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Whether the crew was asked to stop.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Asks every thread to stop (they see it at their next poll).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Threads started and not joined yet.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether no thread is held.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Starts `work` on a thread named `name` (its stage, and a number where there are
    /// several) that may outlive the caller; the operating system's error if it cannot.
    pub fn spawn(&mut self, stage: S, name: String, work: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let handle = std::thread::Builder::new().name(name).spawn(work)?;
        self.threads.push((stage, Handle::Owned(handle)));
        Ok(())
    }

    /// Starts `work`, which may borrow from the caller, on a thread of `scope` named `name`.
    pub fn spawn_in<'env>(
        &mut self,
        scope: &'scope Scope<'scope, 'env>,
        stage: S,
        name: String,
        work: impl FnOnce() + Send + 'scope,
    ) -> std::io::Result<()> {
        let handle = std::thread::Builder::new().name(name).spawn_scoped(scope, work)?;
        self.threads.push((stage, Handle::Scoped(handle)));
        Ok(())
    }

    /// Waits for every thread, in the order they started; the first that panicked is the
    /// error, naming its stage. The threads must be on their way to an end (finished their
    /// work, stopped, or their output channel closed).
    pub fn join(&mut self) -> Result<(), Panicked<S>> {
        let mut first = Ok(());
        for (stage, thread) in self.threads.drain(..) {
            if let Err(payload) = thread.join()
                && first.is_ok()
            {
                first = Err(Panicked { stage, message: panic_message(payload.as_ref()) });
            }
        }
        first
    }

    /// [`stop`](Crew::stop), then [`join`](Crew::join).
    pub fn stop_and_join(&mut self) -> Result<(), Panicked<S>> {
        self.stop();
        self.join()
    }
}

impl<S> Drop for Crew<'_, S> {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crew_stops_joins_and_names_the_stage_that_panicked() {
        let mut crew = Crew::new();
        let stop = crew.stop_flag();
        crew.spawn("source", "source".into(), move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::yield_now();
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        crew.spawn("batcher", "batcher-0".into(), || panic!("boom")).unwrap_or_else(|e| panic!("{e}"));
        crew.spawn("predictor", "predictor".into(), || panic!("later")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(crew.len(), 3);
        let err = crew.stop_and_join().err();
        assert_eq!(err, Some(Panicked { stage: "batcher", message: "boom".to_owned() }));
        assert!(crew.join().is_ok() && crew.is_empty(), "joined once");

        // Scoped: the work borrows; dropping the crew stops and joins it before the scope ends.
        let seen = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let mut crew = Crew::new();
            let stop = crew.stop_flag();
            let seen = &seen;
            crew.spawn_in(scope, "planner", "planner".into(), move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::yield_now();
                }
                seen.store(true, Ordering::Relaxed);
            })
            .unwrap_or_else(|e| panic!("{e}"));
            drop(crew);
            assert!(seen.load(Ordering::Relaxed), "dropping the crew stopped and joined its thread");
        });
    }
}
