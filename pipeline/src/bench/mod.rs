//! Benchmarks, each against a bound or a reference measured in the same run:
//!
//! - [`reader`]: sequential and random-gather reads of a store against a memcpy bound.
//! - [`loader`]: the encoder and batcher without the model against memcpy and gather bounds.
//! - [`sink`]: the prediction sink alone, per encoding thread count, against a memcpy bound.
//!
//! The benchmarks of the model (its training steps, training and prediction through the pipeline)
//! are `cpa_stream_engine::bench`'s.

pub mod cold;
pub mod loader;
pub mod reader;
pub mod sink;

pub use cold::{ColdLoaderBench, ColdRound, advice_name, bench_loader_cold};
pub use loader::{DEFAULT_LOADER_BATCH_SIZE, DEFAULT_ROUNDS, LoaderBench, LoaderRound, bench_loader};
pub use reader::{
    DEFAULT_READER_BATCH_SIZE, DEFAULT_REPEATS, ReaderBench, ReaderBenchOptions, Throughput, bench_reader,
};
pub use sink::{DEFAULT_SINK_MIB, SinkBench, SinkBenchOptions, SinkOutput, SinkRound, bench_sink};
