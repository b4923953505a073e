//! The threads of a run's stages, owned in one place ([`cpa_stream_stages::crew::Crew`], named
//! by [`Stage`]): each started named after its stage, all asked to stop by one flag, all joined
//! together, and the first panic turned into an error naming the stage it happened in. Dropping
//! a crew stops and joins its threads, so a caller that stops reading never leaves threads
//! behind.
//!
//! A crew's threads stop at the flag or when the channel they send on is closed: whoever owns
//! the receiving end drops it before [`join`](Crew::join) so that a thread blocked on a full
//! channel wakes up.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::Scope;

use cpa_stream_stages::crew::Panicked;

use crate::Stage;
use crate::error::{Error, Result};

/// The threads of one or more stages and their stop flag.
#[derive(Debug, Default)]
pub struct Crew<'scope>(cpa_stream_stages::crew::Crew<'scope, Stage>);

fn panicked(p: Panicked<Stage>) -> Error {
    Error::Panic { stage: p.stage, message: p.message }
}

impl<'scope> Crew<'scope> {
    /// A crew with no threads yet and a stop flag of its own.
    pub fn new() -> Self {
        Crew(cpa_stream_stages::crew::Crew::new())
    }

    /// The flag that asks the crew's threads to stop, for them to poll.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.0.stop_flag()
    }

    /// Whether the crew was asked to stop.
    pub fn stopped(&self) -> bool {
        self.0.stopped()
    }

    /// Asks every thread to stop (they see it at their next poll).
    pub fn stop(&self) {
        self.0.stop();
    }

    /// Starts `work` on a thread named `name` (its stage, and a number where there are
    /// several) that may outlive the caller.
    pub fn spawn(&mut self, stage: Stage, name: String, work: impl FnOnce() + Send + 'static) -> Result<()> {
        self.0.spawn(stage, name.clone(), work).map_err(|source| Error::Thread { name, source })
    }

    /// Starts `work`, which may borrow from the caller, on a thread of `scope` named `name`.
    pub fn spawn_in<'env>(
        &mut self,
        scope: &'scope Scope<'scope, 'env>,
        stage: Stage,
        name: String,
        work: impl FnOnce() + Send + 'scope,
    ) -> Result<()> {
        self.0.spawn_in(scope, stage, name.clone(), work).map_err(|source| Error::Thread { name, source })
    }

    /// Waits for every thread, in the order they started; the first that panicked is the
    /// error, naming its stage. The threads must be on their way to an end (finished their
    /// work, stopped, or their output channel closed).
    pub fn join(&mut self) -> Result<()> {
        self.0.join().map_err(panicked)
    }

    /// [`stop`](Crew::stop), then [`join`](Crew::join).
    pub fn stop_and_join(&mut self) -> Result<()> {
        self.0.stop_and_join().map_err(panicked)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn a_panic_is_an_error_naming_the_stage() {
        let mut crew = Crew::new();
        let stop = crew.stop_flag();
        crew.spawn(Stage::Source, "source".into(), move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::yield_now();
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        crew.spawn(Stage::Batcher, "batcher-0".into(), || panic!("boom")).unwrap_or_else(|e| panic!("{e}"));
        let err = crew.stop_and_join().err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("batcher: a worker thread panicked: boom"));
        assert!(crew.join().is_ok(), "joined once");
    }
}
