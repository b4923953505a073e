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
