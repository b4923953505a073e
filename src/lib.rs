//! cpa-stream: the Compositional Perturbation Autoencoder (CPA) on single-cell atlases larger
//! than memory.
//!
//! This facade re-exports the public API of the workspace crates:
//! - [`schemas`]: the store manifest and the Arrow schemas of every table;
//! - [`stages`]: the store reader/writer, synthetic atlases and the other stages;
//! - [`pipeline`]: the stages wired with bounded channels, with stage reports.
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
