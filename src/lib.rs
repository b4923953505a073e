//! cpa-stream: the Compositional Perturbation Autoencoder (CPA) on single-cell atlases larger
//! than memory.
//!
//! This facade re-exports the public API of the workspace crates:
//! - [`schemas`]: the store manifest and the Arrow schemas of every table;
//! - [`stages`]: the store reader/writer, synthetic atlases and the other stages;
//! - [`pipeline`]: the stages wired with bounded channels, with stage reports;
//! - `lazy` (feature `polars`): prediction files opened lazily with polars.
//!
//! Predictions as a stream of Arrow record batches, for ETL jobs:
//!
//! ```no_run
//! use cpa_stream::pipeline::predict::{PredictOptions, Predictor};
//! use cpa_stream::pipeline::predict::targets::parse_target_spec;
//! let mut options = PredictOptions::new("run/", "atlas.store");
//! options.targets = vec![parse_target_spec("condition=drugA+drugB,dose=0.1+1")?];
//! let stream = Predictor::open(&options)?.stream()?; // an arrow RecordBatchReader
//! for batch in stream {
//!     let batch = batch?; // cell_id, condition, dose, covariates, mean (FixedSizeList<Float32>)
//!     println!("{} predicted cells", batch.num_rows());
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ```no_run
//! use cpa_stream::stages::store::Store;
//! let store = Store::open("atlas.store")?;
//! let mut cursor = store.cursor()?;
//! let (genes, counts) = cursor.row(0)?;
//! println!("cell 0 has {} expressed genes of {}", genes.len(), store.n_vars());
//! # Ok::<(), cpa_stream::stages::Error>(())
//! ```

pub use cpa_stream_pipeline as pipeline;
pub use cpa_stream_schemas as schemas;
pub use cpa_stream_stages as stages;

#[cfg(feature = "polars")]
pub mod lazy;
