//! Benchmarks, each against a bound or a reference measured in the same run:
//!
//! - [`reader`]: sequential and random-gather reads of a store against a memcpy bound.
//! - [`loader`]: the encoder and batcher without the model against memcpy and gather bounds.
//! - [`model`]: training steps of the model alone, on preloaded batches.
//! - [`train`]: training through the pipeline against the same model on preloaded batches.
//! - [`sink`]: the prediction sink alone, per encoding thread count, against a memcpy bound.
//! - [`predict`]: prediction through the pipeline per output mode, predictor and sink side by side.

pub mod cold;
pub mod loader;
pub mod model;
pub mod predict;
pub mod reader;
pub mod sink;
pub mod train;

pub use cold::{ColdLoaderBench, ColdRound, advice_name, bench_loader_cold};
pub use loader::{DEFAULT_LOADER_BATCH_SIZE, DEFAULT_ROUNDS, LoaderBench, LoaderRound, bench_loader};
pub use model::{
    DEFAULT_MODEL_CELLS, DEFAULT_MODEL_EPOCHS, DEFAULT_MODEL_GENES, ModelBench, ModelBenchOptions, bench_model,
    synthetic_batches,
};
pub use predict::{PredictBench, PredictMode, PredictRound, bench_predict};
pub use reader::{
    DEFAULT_READER_BATCH_SIZE, DEFAULT_REPEATS, ReaderBench, ReaderBenchOptions, Throughput, bench_reader,
};
pub use sink::{DEFAULT_SINK_MIB, SinkBench, SinkBenchOptions, SinkRound, bench_sink};
pub use train::{DEFAULT_PRELOAD_MIB, TrainingBench, TrainingBenchOptions, TrainingRound, bench_training};
