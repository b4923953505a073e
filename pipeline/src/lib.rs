//! Wiring of cpa-stream's stages: bounded channels between them, run loops that stop at the
//! first error, and what every stage reports (rows, bytes, busy time, time blocked on input and
//! on output, peak memory).
//!
//! What belongs here and not in `cpa_stream_stages`: what runs on threads and channels (a
//! stage's threads are owned by one crew: named after their [`Stage`], stopped and joined
//! together, the first panic an error naming the stage), and the computations of the commands
//! that need no model. `cpa_stream_stages` holds the single-threaded pieces that know files;
//! `cpa_stream_engine` the model (libtorch) and the commands that run it. Neither this crate nor
//! the stages link libtorch.
//!
//! Every command has one front door, the same shape for each: a `*Request` in its module's
//! `request.rs` (serde, unknown fields refused; what the CLI's flags and the Python package's
//! keywords fill in), resolved by `options()` in one place into `*Options` (defaults, a run's
//! record, checks, process-wide settings), run by `run(&Options, &`[`RunContext`]`)` into a
//! `*Report`; streaming commands also `open(&Options)` a stream of record batches.
//!
//! The stages of the design, and where each lives:
//!
//! | stage | module |
//! | --- | --- |
//! | memory-mapped matrix reader | `cpa_stream_stages::store` (`Store`, `RowCursor`) |
//! | CSR perturbation encoder | [`encoder`] (labels, vocabularies, splits); its CSR builder is `cpa_stream_stages::model::PerturbationCsr` |
//! | prefetching batcher with worker threads | [`batcher`] (epoch plans and the one gather-worker pool) |
//! | libtorch trainer | `cpa_stream_engine::trainer` (`Trainer`), run by `cpa_stream_engine::train` |
//! | libtorch predictor | `cpa_stream_engine::predictor` (`Predictor`) |
//! | Parquet sink | `cpa_stream_stages::sink` (`ParquetSink`) |
//!
//! Commands wire the stages and never import one another:
//! [`synth`], [`import`], [`export`], [`convert`] and the benchmarks that need no model
//! ([`bench`](mod@bench)); the engine's commands are train, predict, evaluate, dose_response and
//! embeddings. Shared pieces, the engine's too:
//! [`request`] (what every request shares), [`obs`] (label columns, cell selection), [`run_dir`]
//! (a training run's files), [`degs`] (DEG tables), [`stats`] (streaming moments and scores),
//! [`plots`] (the drawing kit), [`telemetry`] (stage reports, memory), [`progress`],
//! [`condition`] (conditions' keys, the truth table) and [`model_flags`] (the model commands'
//! choices that command lines name).
//! No module uses a sibling that uses it back (`tests/integration/layout.rs`).

#![warn(missing_docs)]

pub mod allocator;
pub mod batcher;
pub mod bench;
pub mod commands;
pub mod condition;
pub mod context;
pub mod convert;
pub mod crew;
pub mod degs;
pub mod encoder;
pub mod error;
pub mod export;
pub mod fault;
pub mod import;
pub mod limits;
pub mod model_flags;
pub mod obs;
pub mod plots;
pub mod progress;
pub mod request;
pub mod run_dir;
pub mod score;
pub mod shuffle;
pub mod stage;
pub mod stats;
pub mod suggest;
pub mod synth;
pub mod telemetry;
pub mod threads;
pub mod two_stage;

pub use context::RunContext;
pub use error::{Error, Result};
pub use progress::{Progress, Silent};
pub use stage::Stage;
pub use telemetry::{MemoryPeak, MemorySampler, MemoryUsage, RunReport, StageReport, StageStats};

/// A file under the repository's `tests/fixtures`. Cargo sets `CARGO_MANIFEST_DIR` when it runs
/// a test, so the checkout being tested wins over the path compiled in: a build cache shared by
/// checkouts at other paths can hold a test binary compiled elsewhere.
#[cfg(test)]
pub fn test_fixture(relative: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")), std::path::PathBuf::from)
        .join("../tests/fixtures")
        .join(relative)
}
