//! Benchmarks of the model, each against a reference measured in the same run (those that need
//! no model are [`cpa_stream_pipeline::bench`]'s):
//!
//! - [`model`]: training steps of the model alone, on preloaded batches.
//! - [`train`]: training through the pipeline against the same model on preloaded batches.
//! - [`predict`]: prediction through the pipeline per output mode, predictor and sink side by side.
//! - [`ops`]: the operators libtorch dispatches per training step (launches and host syncs).
//! - [`profile`]: where a training step's time goes, on the host and on a CUDA device.

pub mod model;
pub mod ops;
pub mod predict;
pub mod profile;
pub mod train;

pub use cpa_stream_pipeline::bench::*;
pub use model::{
    DEFAULT_MODEL_CELLS, DEFAULT_MODEL_EPOCHS, DEFAULT_MODEL_GENES, ModelBench, ModelBenchOptions, bench_model,
    synthetic_batches,
};
pub use ops::{Dispatched, OpClass, OpCounts, OpTally, Tallies, Threads, count_ops};
pub use predict::{PredictBench, PredictMode, PredictRound, bench_predict};
pub use profile::{DeviceTime, Event, Profile, Side, TimeShare, profile};
pub use train::{DEFAULT_PRELOAD_MIB, TrainingBench, TrainingBenchOptions, TrainingRound, bench_training};

/// The text a C++ wrapper reports through `call(out, capacity)`: it writes the whole text into
/// `out` where it fits in `capacity` bytes and returns its length either way (-1 on an error), so
/// a first call with no room measures and a second reads. `what` names the report in an error.
#[cfg(any(cpa_op_count, cpa_profile))]
fn wrapper_text(
    what: &str,
    mut call: impl FnMut(*mut std::ffi::c_char, i64) -> i64,
) -> cpa_stream_stages::Result<Vec<u8>> {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let capacity = buffer.len() as i64;
        let needed = call(buffer.as_mut_ptr().cast(), capacity);
        if needed < 0 {
            return Err(cpa_stream_stages::Error::InvalidInput(format!("libtorch's {what} failed to report")));
        }
        if needed <= capacity {
            buffer.truncate(needed as usize);
            return Ok(buffer);
        }
        buffer = vec![0; needed as usize];
    }
}
