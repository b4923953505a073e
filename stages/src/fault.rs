//! Fault injection for tests: with `CPA_STREAM_FAULT=STAGE` in the environment, the named stage
//! panics when it starts work on its first item (`source`, `batcher`, `predictor`, `read`, and
//! the sink's encoding threads, `sink`), so that tests can check that a panicking thread ends the
//! command with an error naming the stage and publishes nothing. The variable is read once;
//! unset, a point costs one load.

use std::sync::OnceLock;

/// Panics if `CPA_STREAM_FAULT` names `stage`.
pub fn point(stage: &str) {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    if FAULT.get_or_init(|| std::env::var("CPA_STREAM_FAULT").ok()).as_deref() == Some(stage) {
        panic!("fault injected into {stage} (CPA_STREAM_FAULT={stage})");
    }
}
