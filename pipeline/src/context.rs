//! What a command's run is given besides its options: where it reports progress and the flag
//! that asks it to stop. Every command runs as `run(&Options, &RunContext) -> Result<Report>`.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::progress::{Progress, Silent};

/// A run's progress sink and stop flag.
///
/// The stop flag is set by the caller (a signal handler, Ctrl-C in Python, an ETL job's
/// deadline): training then stops at its next step with a checkpoint and reports itself
/// interrupted; the other commands end with [`Error::Interrupted`] before they publish anything.
#[derive(Clone, Copy)]
pub struct RunContext<'a> {
    progress: &'a dyn Progress,
    stop: Option<&'a AtomicBool>,
}

impl Default for RunContext<'_> {
    fn default() -> Self {
        RunContext::new(&Silent)
    }
}

impl std::fmt::Debug for RunContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunContext").field("stopped", &self.stopped()).finish_non_exhaustive()
    }
}

impl<'a> RunContext<'a> {
    /// Progress reported to `progress`, nothing stops the run.
    pub fn new(progress: &'a dyn Progress) -> Self {
        RunContext { progress, stop: None }
    }

    /// The same context, stopped when `stop` is set.
    pub fn with_stop(self, stop: &'a AtomicBool) -> Self {
        RunContext { stop: Some(stop), ..self }
    }

    /// Where progress goes.
    pub fn progress(&self) -> &'a dyn Progress {
        self.progress
    }

    /// Whether the caller asked the run to stop.
    pub fn stopped(&self) -> bool {
        self.stop.is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// `Err(`[`Error::Interrupted`]`)` once the caller asked the run to stop.
    ///
    /// Under `CPA_STREAM_FAULT=hold` (tests, [`cpa_stream_stages::fault`]), a run that can be
    /// stopped first waits here until it is.
    pub fn check_stopped(&self) -> Result<()> {
        if let Some(stop) = self.stop
            && cpa_stream_stages::fault::holding()
        {
            let start = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < cpa_stream_stages::fault::HOLD_LIMIT {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        match self.stopped() {
            true => Err(Error::Interrupted),
            false => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_is_stopped_only_by_its_flag() {
        let quiet = RunContext::default();
        assert!(!quiet.stopped());
        let flag = AtomicBool::new(false);
        let ctx = RunContext::new(&Silent).with_stop(&flag);
        assert!(ctx.check_stopped().is_ok());
        flag.store(true, Ordering::Relaxed);
        assert!(matches!(ctx.check_stopped(), Err(Error::Interrupted)));
    }
}
