//! The CPA model in libtorch and the commands that run it: training, prediction, evaluation,
//! embeddings, dose response and the model's benchmarks.
//!
//! The model's pieces (`model`, `trainer`, `device`) are stages of the dataflow, wired by the
//! commands with the pieces of [`cpa_stream_pipeline`] (encoder, batcher, telemetry, run
//! directories). They are the only code that calls libtorch: the commands that need no model
//! (import, export, convert, synth, inspect, verify, the loader and sink benchmarks) live in
//! `cpa_stream_pipeline` and `cpa_stream_stages`, which a program can link without libtorch's
//! start-up (the `cpa-stream` command line does, and hands the model commands to
//! `cpa-stream-engine`).
//!
//! | stage | module |
//! | --- | --- |
//! | libtorch model | [`model`] (`CpaModel`, likelihoods, saved weights) |
//! | libtorch trainer | [`trainer`] (`Trainer`), run by [`train`] |
//! | libtorch predictor | [`predictor`] (`Predictor`), run by [`predict`], [`evaluate`], [`dose_response`], [`embeddings`] |
//! | device | [`device`] (CPU or CUDA, memory) |

#![warn(missing_docs)]

// The C++ wrappers' static library (engine/cxx), whose functions the modules declare: linked
// through this crate, which nothing names otherwise.
use cpa_stream_cxx as _;

pub mod bench;
pub mod collective;
pub mod device;
pub mod dose_response;
pub mod embeddings;
pub mod evaluate;
pub mod model;
mod opened;
pub mod predict;
pub mod predictor;
pub mod threads;
mod torch;
pub mod train;
pub mod trainer;

// The pipeline's types every command's signature names (its modules are used by their own
// paths, `cpa_stream_pipeline::batcher` and so on).
pub use cpa_stream_pipeline::{Error, Progress, Result, RunContext, Silent, Stage};

/// A file under the repository's `tests/fixtures` (see `cpa_stream_pipeline`'s).
#[cfg(test)]
pub(crate) fn test_fixture(relative: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")), std::path::PathBuf::from)
        .join("../tests/fixtures")
        .join(relative)
}
