//! The stages of cpa-stream's dataflow and the on-disk atlas store they read.
//!
//! - [`store`]: the memory-mapped CSR store (`NAME.store/`): streaming writer, validated reader,
//!   zero-copy row access, zstd blocks, verification.
//! - [`synth`]: CPA-shaped synthetic atlases with ground truth.
//! - [`h5ad`]: AnnData `.h5ad` files in and out, in row chunks; [`zarr`]: AnnData zarr stores in;
//!   [`input`]: either, opened as one; [`anndata`]: what the two share of AnnData's encoding.
//! - [`csr`]: the owned CSR batch that stages hand to each other.
//! - [`model`]: what describes the CPA model without libtorch (configuration, vocabularies, host
//!   batches, the model file); the model, its training and its weights are `cpa-stream-engine`'s.
//! - [`sink`]: the Parquet sink (bounded row groups, zstd, complete or absent).
//!
//! What belongs here: single-threaded pieces that know files, each doing one thing
//! to what it is handed. Stages never wire themselves together: the `cpa-stream-pipeline`
//! crate connects them with bounded channels, owns their threads, and holds the commands. The
//! one owner of threads, [`crew`], lives here so that the one stage that parallelises inside
//! itself (the [`sink`]'s encoding threads) is owned the same way.

#![warn(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!("cpa-stream stores are little-endian and mapped without conversion");

pub mod anndata;
pub mod cell_table;
pub mod counts_csr;
pub mod crew;
mod error;
pub mod fault;
pub mod h5ad;
pub mod input;
pub mod model;
pub mod output;
pub mod provenance;
pub mod regular;
pub mod rng;
pub mod sink;
pub mod store;
pub mod synth;
pub mod zarr;

pub use counts_csr::CsrBatch;
pub use error::{Error, Result};
