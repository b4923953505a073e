//! The model commands' flag values: the choices and defaults their command lines name.
//!
//! They belong to `cpa_stream_engine` (which re-exports each where it is used), but live here so
//! that the `cpa-stream` front parses them, and `--help` shows them, without linking libtorch.

use serde::{Deserialize, Serialize};

/// A statistic over the cells of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Statistic {
    /// The mean over the group's cells (the pseudobulk of the predictions).
    Mean,
    /// The sample variance over the group's cells (ddof 1, as pandas and polars compute it;
    /// null for a group of one cell), in the column `<name>_var`.
    Var,
}

impl std::str::FromStr for Statistic {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Statistic, String> {
        match text.trim() {
            "mean" => Ok(Statistic::Mean),
            "var" => Ok(Statistic::Var),
            other => Err(format!("{other:?} is not a statistic: expected mean or var")),
        }
    }
}

/// The layout of a prediction file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `mean` (and each latent) as one fixed-size list column: compact, one column per output.
    #[default]
    Long,
    /// One Float32 column per gene, named by the gene, and `LATENT_i` per latent dimension: for
    /// tools without list columns.
    Wide,
}

impl std::str::FromStr for Layout {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Layout, String> {
        match text {
            "long" => Ok(Layout::Long),
            "wide" => Ok(Layout::Wide),
            other => Err(format!("layout {other:?}: expected long or wide")),
        }
    }
}

/// Which metrics the printed table shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetricSet {
    /// The short set.
    #[default]
    Default,
    /// Every metric but the per-k variants.
    All,
}

impl std::str::FromStr for MetricSet {
    type Err = String;

    fn from_str(text: &str) -> Result<MetricSet, String> {
        match text {
            "default" => Ok(MetricSet::Default),
            "all" => Ok(MetricSet::All),
            other => Err(format!("metrics {other:?}: expected default or all")),
        }
    }
}

/// What a round writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PredictMode {
    /// A row per cell and target, zstd pages (`--sink-profile small`).
    Small,
    /// A row per cell and target, plain uncompressed pages (`--sink-profile fast`).
    Fast,
    /// As `Fast`, into a directory of parts written side by side (`--sink-profile fast --parts`).
    Parts,
    /// A row per target and group: mean and variance (`--aggregate mean,var`).
    Aggregate,
}

impl std::str::FromStr for PredictMode {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<PredictMode, String> {
        match text {
            "small" => Ok(PredictMode::Small),
            "fast" => Ok(PredictMode::Fast),
            "parts" => Ok(PredictMode::Parts),
            "aggregate" => Ok(PredictMode::Aggregate),
            other => Err(format!("{other:?}: expected small, fast, parts or aggregate")),
        }
    }
}

/// Source cells per batch of `predict`, unless set otherwise.
pub const PREDICT_BATCH_SIZE: usize = 1024;

/// Control cells `dose-response` samples per covariate combination, unless set otherwise.
pub const DOSE_RESPONSE_CELLS: usize = 100;

/// Cells of the model benchmark's synthetic atlas, unless set otherwise.
pub const MODEL_BENCH_CELLS: u64 = 5_000;
/// Genes of the model benchmark's synthetic atlas, unless set otherwise.
pub const MODEL_BENCH_GENES: u32 = 2_000;
/// Timed epochs of the model benchmark, unless set otherwise.
pub const MODEL_BENCH_EPOCHS: u32 = 2;

/// Payload the training benchmark's preloaded batches may hold, in MiB, unless set otherwise.
pub const TRAIN_BENCH_PRELOAD_MIB: u64 = 512;
