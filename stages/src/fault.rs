//! Fault injection for tests: with `CPA_STREAM_FAULT=STAGE` in the environment, the named stage
//! panics when it starts work on its first item (`source`, `batcher`, `predictor`, `read`, and
//! the sink's encoding threads, `sink`), so that tests can check that a panicking thread ends the
//! command with an error naming the stage and publishes nothing.
//!
//! `CPA_STREAM_FAULT=hold` instead makes a command that can be stopped (a Ctrl-C handler or
//! Python's) wait at its first check of the stop flag, which comes after its output's lock and
//! temporary exist, until it is asked to stop ([`HOLD_LIMIT`] at most): a test interrupts it there
//! however fast the machine is, instead of racing the work to its end.
//!
//! The variable is read once; unset, a point costs one load.

use std::sync::OnceLock;
use std::time::Duration;

/// The longest a held command waits for its stop before it goes on.
pub const HOLD_LIMIT: Duration = Duration::from_secs(300);

fn fault() -> Option<&'static str> {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    FAULT.get_or_init(|| std::env::var("CPA_STREAM_FAULT").ok()).as_deref()
}

/// Panics if `CPA_STREAM_FAULT` names `stage`.
pub fn point(stage: &str) {
    if fault() == Some(stage) {
        panic!("fault injected into {stage} (CPA_STREAM_FAULT={stage})");
    }
}

/// Whether `CPA_STREAM_FAULT=hold`: checks of the stop flag wait for it.
pub fn holding() -> bool {
    fault() == Some("hold")
}
