//! The threads of a run's stages, owned in one place: each started named after its stage, all
//! asked to stop by one flag, all joined together, and the first panic turned into an error
//! naming the stage it happened in. Dropping a crew stops and joins its threads, so a caller
//! that stops reading never leaves threads behind.
//!
//! A crew's threads stop at the flag or when the channel they send on is closed: whoever owns
//! the receiving end drops it before [`join`](Crew::join) so that a thread blocked on a full
//! channel wakes up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{JoinHandle, Scope, ScopedJoinHandle};

use crate::Stage;
use crate::error::{Error, Result};

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

/// The threads of one or more stages and their stop flag.
pub struct Crew<'scope> {
    stop: Arc<AtomicBool>,
    threads: Vec<(Stage, Handle<'scope>)>,
}

impl std::fmt::Debug for Crew<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stages: Vec<Stage> = self.threads.iter().map(|(s, _)| *s).collect();
        f.debug_struct("Crew").field("threads", &stages).field("stopped", &self.stopped()).finish()
    }
}

impl Default for Crew<'_> {
    fn default() -> Self {
        Crew::new()
    }
}

impl<'scope> Crew<'scope> {
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

    /// Starts `work` on a thread named `name` (its stage, and a number where there are
    /// several) that may outlive the caller.
    pub fn spawn(&mut self, stage: Stage, name: String, work: impl FnOnce() + Send + 'static) -> Result<()> {
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(work)
            .map_err(|source| Error::Thread { name, source })?;
        self.threads.push((stage, Handle::Owned(handle)));
        Ok(())
    }

    /// Starts `work`, which may borrow from the caller, on a thread of `scope` named `name`.
    pub fn spawn_in<'env>(
        &mut self,
        scope: &'scope Scope<'scope, 'env>,
        stage: Stage,
        name: String,
        work: impl FnOnce() + Send + 'scope,
    ) -> Result<()> {
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn_scoped(scope, work)
            .map_err(|source| Error::Thread { name, source })?;
        self.threads.push((stage, Handle::Scoped(handle)));
        Ok(())
    }

    /// Waits for every thread, in the order they started; the first that panicked is the
    /// error, naming its stage. The threads must be on their way to an end (finished their
    /// work, stopped, or their output channel closed).
    pub fn join(&mut self) -> Result<()> {
        let mut first = Ok(());
        for (stage, thread) in self.threads.drain(..) {
            if let Err(payload) = thread.join()
                && first.is_ok()
            {
                first = Err(Error::panic(stage, payload));
            }
        }
        first
    }

    /// [`stop`](Crew::stop), then [`join`](Crew::join).
    pub fn stop_and_join(&mut self) -> Result<()> {
        self.stop();
        self.join()
    }
}

impl Drop for Crew<'_> {
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
        crew.spawn(Stage::Source, "source".into(), move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::yield_now();
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        crew.spawn(Stage::Batcher, "batcher-0".into(), || panic!("boom")).unwrap_or_else(|e| panic!("{e}"));
        crew.spawn(Stage::Predictor, "predictor".into(), || panic!("later")).unwrap_or_else(|e| panic!("{e}"));
        let err = crew.stop_and_join().err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("batcher: a worker thread panicked: boom"));
        assert!(crew.join().is_ok(), "joined once");

        // Scoped: the work borrows; dropping the crew stops and joins it before the scope ends.
        let seen = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let mut crew = Crew::new();
            let stop = crew.stop_flag();
            let seen = &seen;
            crew.spawn_in(scope, Stage::Planner, "planner".into(), move || {
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
