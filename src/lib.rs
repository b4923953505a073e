//! cpa-stream: the Compositional Perturbation Autoencoder (CPA) on single-cell atlases larger
//! than memory.
//!
//! One module per command of the `cpa-stream` command line, each with the same four names: a
//! `*Request` (the settings as a user gives them: serde, every field optional, what the CLI's
//! flags and the Python package's keywords fill in, what `cpa-stream COMMAND --print-request`
//! prints), resolved by its `options()` into `*Options` (defaults, a run's record, checks), run
//! by `run(&Options, &RunContext)` into a `*Report`. Streaming commands also `open(&Options)` a
//! stream of record batches. A [`RunContext`] carries progress and a stop flag; the store,
//! predictor, Parquet sink, errors and the device are here at the top.
//!
//! | command | module |
//! | --- | --- |
//! | `synth` | [`synth`] |
//! | `import`, `export`, `convert` | [`import`], [`export`], [`convert`] |
//! | `train` | [`train`] |
//! | `predict` | [`predict`] ([`Predictor`], [`PredictionStream`]) |
//! | `evaluate`, `dose-response`, `embeddings` | [`evaluate`], [`dose_response`], [`embeddings`] |
//!
//! Everything else (the stages, the wiring, the model, the benchmarks) is under [`unstable`], which
//! changes without notice.
//!
//! Train, then stream counterfactual predictions as Arrow record batches (an ETL job):
//!
//! ```no_run
//! use cpa_stream::{RunContext, predict, train};
//!
//! let request = train::TrainRequest {
//!     store: "atlas.store".into(),
//!     out: "run".into(),
//!     covariates: vec!["cell_type".into()],
//!     epochs: Some(20),
//!     ..Default::default()
//! };
//! let report = train::run(&request.options()?, &RunContext::default())?;
//! println!("{} epochs", report.epochs.len());
//!
//! let request = predict::PredictRequest {
//!     model: "run".into(),
//!     store: "atlas.store".into(),
//!     targets: vec!["condition=drugA+drugB,dose=0.1+1".into()],
//!     ..Default::default()
//! };
//! for batch in predict::open(&request.options()?)? {
//!     let batch = batch?; // cell_id, condition, dose, covariates, mean (FixedSizeList<Float32>)
//!     println!("{} predicted cells", batch.num_rows());
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A store's cells, read without loading the store:
//!
//! ```no_run
//! let store = cpa_stream::Store::open("atlas.store")?;
//! let mut cursor = store.cursor()?;
//! let (genes, counts) = cursor.row(0)?;
//! println!("cell 0 has {} expressed genes of {}", genes.len(), store.n_vars());
//! # Ok::<(), cpa_stream::StoreError>(())
//! ```

// The library is the model's: without the `engine` feature (the front's early build,
// scripts/build.sh) it is empty.
#![cfg(feature = "engine")]

pub use cpa_stream_engine::predict::PredictionStream;
pub use cpa_stream_engine::predictor::Predictor;
pub use cpa_stream_pipeline::{Error, Progress, Result, RunContext, RunReport, Silent, Stage, StageReport};
pub use cpa_stream_schemas::{Codec, Manifest};
pub use cpa_stream_stages::sink::{ParquetSink, SinkOptions, SinkProfile, SinkSummary};
pub use cpa_stream_stages::store::{Access, RowCursor, Store};
pub use cpa_stream_stages::{CsrBatch, Error as StoreError};
/// Where a model runs (`Device::Cpu`, `Device::Cuda(0)`): libtorch's, re-exported so that
/// embedders need no `tch` dependency of their own.
pub use tch::Device;

/// `cpa-stream synth`: a CPA-shaped synthetic atlas with ground truth.
///
/// ```no_run
/// use cpa_stream::{RunContext, synth};
/// let request = synth::SynthRequest {
///     cells: 20_000,
///     genes: 2_000,
///     perturbations: 8,
///     out: "atlas.store".into(),
///     ..Default::default()
/// };
/// let report = synth::run(&request.options()?, &RunContext::default())?;
/// println!("{} truth groups", report.truth_groups);
/// # Ok::<(), cpa_stream::Error>(())
/// ```
pub mod synth {
    pub use cpa_stream_pipeline::synth::{SynthOptions, SynthReport, SynthRequest, run};
    pub use cpa_stream_stages::synth::SynthConfig;
}

/// `cpa-stream import`: an AnnData `.h5ad` file into a store, in bounded memory.
///
/// ```no_run
/// use cpa_stream::{RunContext, import};
/// let request = import::ImportRequest { inputs: vec!["adata.h5ad".into()], out: "atlas.store".into(), ..Default::default() };
/// let report = import::run(&request.options()?, &RunContext::default())?;
/// println!("{} cells", report.manifest.n_obs);
/// # Ok::<(), cpa_stream::Error>(())
/// ```
pub mod import {
    pub use cpa_stream_pipeline::import::{
        GeneJoin, ImportOptions, ImportReport, ImportRequest, InputReport, JoinName, Tables, run, run_chunks,
    };
}

/// `cpa-stream export`: a store as an AnnData `.h5ad` file.
///
/// ```no_run
/// use cpa_stream::{RunContext, export};
/// let request = export::ExportRequest { store: "atlas.store".into(), out: "atlas.h5ad".into(), ..Default::default() };
/// let report = export::run(&request.options()?, &RunContext::default())?;
/// println!("{} bytes", report.bytes);
/// # Ok::<(), cpa_stream::Error>(())
/// ```
pub mod export {
    pub use cpa_stream_pipeline::export::{
        CellSelection, ExportCompression, ExportOptions, ExportReport, ExportRequest, run,
    };
}

/// `cpa-stream convert`: a store copied with another codec, or its cells shuffled.
///
/// ```no_run
/// use cpa_stream::convert::{CodecName, ConvertRequest, run};
/// let request = ConvertRequest {
///     store: "atlas.store".into(),
///     out: "atlas-zstd.store".into(),
///     codec: CodecName::Zstd,
///     ..Default::default()
/// };
/// let report = run(&request.options()?, &cpa_stream::RunContext::default())?;
/// println!("{} bytes", report.manifest.total_bytes());
/// # Ok::<(), cpa_stream::Error>(())
/// ```
pub mod convert {
    pub use cpa_stream_pipeline::convert::{ConvertOptions, ConvertReport, ConvertRequest, Shuffle, run};
    pub use cpa_stream_pipeline::request::CodecName;
}

/// `cpa-stream train`: CPA trained through the streaming pipeline, with exact resume.
///
/// ```no_run
/// use cpa_stream::{RunContext, train};
/// use std::sync::atomic::AtomicBool;
/// let stop = AtomicBool::new(false); // set it (a signal, a deadline) to stop with a checkpoint
/// let request = train::TrainRequest { store: "atlas.store".into(), out: "run".into(), ..Default::default() };
/// let report = train::run(&request.options()?, &RunContext::default().with_stop(&stop))?;
/// println!("best epoch {:?}, interrupted {}", report.best_epoch, report.interrupted);
/// # Ok::<(), cpa_stream::Error>(())
/// ```
pub mod train {
    pub use cpa_stream_engine::train::{ConfigSource, EpochRecord, TrainOptions, TrainReport, TrainRequest, run};
}

/// `cpa-stream predict`: counterfactual predictions into a Parquet file
/// ([`predict::run`]) or as a stream of record batches
/// ([`predict::open`]).
///
/// ```no_run
/// use cpa_stream::{RunContext, predict};
/// let request = predict::PredictRequest {
///     model: "run".into(),
///     store: "atlas.store".into(),
///     out: Some("pred.parquet".into()),
///     targets: vec!["drugA+drugB".into()],
///     ..Default::default()
/// };
/// let report = predict::run(&request.options()?, &RunContext::default())?;
/// println!("{} rows", report.output.rows);
/// # Ok::<(), cpa_stream::Error>(())
/// ```
pub mod predict {
    pub use cpa_stream_engine::predict::{PredictReport, PredictRequest, PredictionStream, open, run};
    pub use cpa_stream_engine::predictor::targets::{TargetSpec, parse_target_spec};
    pub use cpa_stream_engine::predictor::{GeneSelection, Layout, PredictOptions, Predictor, Shard};
}

/// `cpa-stream evaluate`: per-condition scores of counterfactual means, with plots.
///
/// ```no_run
/// use cpa_stream::{RunContext, evaluate};
/// let request = evaluate::EvaluateRequest {
///     model: "run".into(),
///     store: "atlas.store".into(),
///     out: "eval".into(),
///     split: "ood".into(),
///     ..Default::default()
/// };
/// let report = evaluate::run(&request.options()?, &RunContext::default())?;
/// println!("{} conditions", report.conditions.len());
/// # Ok::<(), cpa_stream::Error>(())
/// ```
pub mod evaluate {
    pub use cpa_stream_engine::evaluate::{EvaluateOptions, EvaluateReport, EvaluateRequest, run};
}

/// `cpa-stream dose-response`: dose-response curves of a model.
///
/// ```no_run
/// use cpa_stream::{RunContext, dose_response};
/// let request = dose_response::DoseResponseRequest {
///     model: "run".into(),
///     store: Some("atlas.store".into()),
///     out: "dose".into(),
///     ..Default::default()
/// };
/// let report = dose_response::run(&request.options()?, &RunContext::default())?;
/// println!("{} perturbations", report.perturbations);
/// # Ok::<(), cpa_stream::Error>(())
/// ```
pub mod dose_response {
    pub use cpa_stream_engine::dose_response::{DoseResponseOptions, DoseResponseReport, DoseResponseRequest, run};
}

/// `cpa-stream embeddings`: a model's learned perturbation and covariate embeddings.
///
/// ```no_run
/// use cpa_stream::embeddings::{EmbeddingsRequest, open};
/// let request = EmbeddingsRequest { model: "run".into(), ..Default::default() };
/// let tables = open(&request.options()?)?;
/// println!("{} perturbations", tables.perturbations.num_rows());
/// # Ok::<(), cpa_stream::Error>(())
/// ```
pub mod embeddings {
    pub use cpa_stream_engine::embeddings::{
        Embeddings, EmbeddingsOptions, EmbeddingsReport, EmbeddingsRequest, open, run,
    };
}

/// The workspace's crates in full: the stages, their wiring, the model and the commands that run
/// it, the benchmarks. No stability promise: names here move and change between releases.
pub mod unstable {
    pub use cpa_stream_engine as engine;
    pub use cpa_stream_pipeline as pipeline;
    pub use cpa_stream_schemas as schemas;
    pub use cpa_stream_stages as stages;
}
