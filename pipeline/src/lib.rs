//! Wiring of cpa-stream's stages: bounded channels between them, run loops that stop at the
//! first error, and what every stage reports (rows, bytes, busy time, time blocked on input and
//! on output, peak memory).
//!
//! - [`synth`]: generator workers -> store writer (synthetic atlases).
//! - [`convert`]: store reader -> store writer (change codec).
//! - [`import`] / [`export`]: `.h5ad` files in and out of stores.
//! - [`bench`](mod@bench): reader throughput against a memcpy bound measured in the same run.
//! - [`model_bench`]: training throughput of the model alone, on preloaded batches.
//! - [`train`]: store reader -> perturbation encoder -> batcher workers -> trainer.
//! - [`evaluate`]: R2 of counterfactual means and variances per condition, from streaming
//!   sufficient statistics.
//! - [`predict`]: obs selection -> gather workers -> predictor -> Parquet sink (or a
//!   `RecordBatchReader`).

pub mod bench;
pub mod convert;
mod error;
pub mod evaluate;
pub mod export;
pub mod import;
pub mod metrics;
pub mod model_bench;
pub mod predict;
pub mod progress;
mod stream;
pub mod synth;
pub mod train;

pub use error::{Error, Result};
pub use metrics::{MemoryPeak, MemorySampler, MemoryUsage, RunReport, StageReport, StageStats};
pub use progress::{Progress, Silent};
