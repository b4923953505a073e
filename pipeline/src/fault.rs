//! Fault injection for tests: with `CPA_STREAM_FAULT=STAGE` in the environment, the named stage
//! panics when it starts work on its first item (see [`cpa_stream_stages::fault`]).

use crate::Stage;

/// Panics if `CPA_STREAM_FAULT` names `stage`.
pub fn point(stage: Stage) {
    cpa_stream_stages::fault::point(stage.name());
}
