//! A prediction as its users ask for it (the CLI's `predict` flags, the Python package's
//! `predict`, `predict_to_parquet`, `predict_anndata`, `latents` keywords), resolved into
//! [`PredictOptions`] and the sink's [`SinkOptions`] in one place.

use std::path::PathBuf;

use cpa_stream_stages::sink::SinkOptions;
use serde::{Deserialize, Serialize};

use crate::predictor::targets::{parse_target_spec, read_targets_file};
use crate::predictor::{Anchoring, GeneSelection, Layout, PredictOptions, Shard};
use crate::threads::Configure as _;
use cpa_stream_pipeline::batcher::LoaderOptions;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::request::{Compute, Naming, choose_one};

/// A prediction request: the model and store, source cells, targets, genes, latents and the
/// output's layout. `None` takes the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PredictRequest {
    /// A run directory (its `model/` is used) or a model directory.
    pub model: PathBuf,
    /// Further runs whose predictions are averaged with `model`'s (an ensemble).
    pub ensemble: Vec<PathBuf>,
    /// The store with the source cells.
    pub store: PathBuf,
    /// The Parquet file written (with a shard or `parts`: the dataset directory); none for a
    /// stream.
    pub out: Option<PathBuf>,
    /// Source cells: an expression over obs columns, or `all` [default: the control cells].
    pub source: Option<String>,
    /// Target specifications (`A+B`, `condition=A+B,dose=0.1+1,cell_type=K562`).
    pub targets: Vec<String>,
    /// A CSV or Parquet table of targets, one per row (instead of `targets`).
    pub targets_file: Option<PathBuf>,
    /// The genes written, by name, in this order [default: all].
    pub genes: Option<Vec<String>>,
    /// A file with one gene name per line (instead of `genes`).
    pub genes_file: Option<PathBuf>,
    /// The union of the targets' top K DEGs (instead of `genes`).
    pub top_deg: Option<usize>,
    /// DEG table for `top_deg` [default: the store's].
    pub degs: Option<PathBuf>,
    /// Latent columns written.
    pub latents: Vec<String>,
    /// `k/n`: the k-th of n contiguous cell ranges.
    pub shard: Option<String>,
    /// `long` (list columns) or `wide` (one column per gene).
    pub layout: Layout,
    /// Source cells per batch [default: [`DEFAULT_BATCH_SIZE`](crate::predictor::DEFAULT_BATCH_SIZE)].
    pub batch_size: Option<usize>,
    /// Batches buffered between stages [default: the loader's].
    pub prefetch: Option<usize>,
    /// Seed of a variational model's posterior draws.
    pub seed: u64,
    /// An empty result is written (with a warning) instead of being an error.
    pub allow_empty: bool,
    /// Decode without the batch covariate's embedding.
    pub batch_corrected: bool,
    /// Also write E[log1p(x)] of each predicted count distribution.
    pub expected_log1p: bool,
    /// Also write the predicted change of E[log1p(x)].
    pub change: bool,
    /// Also write `counts`: whole counts drawn per cell from the model's count distribution.
    pub counts: bool,
    /// Anchor every row on its source cell, whatever its condition and the target's covariates
    /// (by default, with targets, the rows of control cells whose covariates the target keeps).
    pub anchored: bool,
    /// No anchored prediction: the model's mean only.
    pub plain: bool,
    /// Statistics per target and group of source cells written instead of per-cell rows
    /// (`mean`, `var`) [default: none, per-cell rows].
    pub aggregate: Vec<crate::predictor::aggregate::Statistic>,
    /// The obs columns whose values group the source cells of the aggregates [default: the
    /// model's covariates].
    pub group_by: Option<Vec<String>>,
    /// Rows per Parquet row group at most (files) [default: the sink's].
    pub row_group_rows: Option<usize>,
    /// Threads that encode the output's row groups [default: [`crate::threads::sink_threads`]].
    pub sink_threads: Option<usize>,
    /// Write a directory of part files (one row group each, written side by side by the sink's
    /// threads) instead of one file.
    pub parts: bool,
    /// How the output's pages are encoded [default: small].
    pub sink_profile: Option<cpa_stream_stages::sink::SinkProfile>,
    /// The float type of the file's float columns: f32 or f16 [default: f32].
    pub values: Option<cpa_stream_stages::sink::Values>,
    /// zstd level of the file [default: the sink's].
    pub zstd_level: Option<i32>,
    /// Replace an existing output file.
    pub overwrite: bool,
    /// Device and threads.
    pub compute: Compute,
    /// How messages name the settings.
    pub naming: Naming,
}

impl PredictRequest {
    /// The options of the prediction and of its file, validated; configures the device and
    /// libtorch's threads (process-wide).
    pub fn options(&self) -> Result<PredictOptions> {
        let n = self.naming;
        let targets = match (&self.targets_file, self.targets.is_empty()) {
            (Some(_), false) => return Err(choose_one(n, "--target", "--targets")),
            (Some(path), true) => read_targets_file(path)?,
            (None, _) => self.targets.iter().map(|t| parse_target_spec(t)).collect::<Result<_>>()?,
        };
        let genes = match (&self.genes, &self.genes_file, self.top_deg) {
            (None, None, None) => GeneSelection::All,
            (Some(names), None, None) if names.is_empty() => {
                return Err(Error::InvalidInput(format!("{}: an empty list of genes", n.name("--genes"))));
            }
            (Some(names), None, None) => GeneSelection::Names(names.clone()),
            (None, Some(path), None) => GeneSelection::from_file(path)?,
            (None, None, Some(0)) => {
                return Err(Error::InvalidInput(format!("{} 0: expected at least 1", n.name("--top-deg"))));
            }
            (None, None, Some(k)) => GeneSelection::TopDeg(k),
            (Some(_), _, _) => {
                return Err(choose_one(
                    n,
                    "--genes",
                    if self.top_deg.is_some() { "--top-deg" } else { "--genes-file" },
                ));
            }
            (None, Some(_), Some(_)) => return Err(choose_one(n, "--genes-file", "--top-deg")),
        };
        let shard = self
            .shard
            .as_deref()
            .map(|s| {
                s.parse::<Shard>().map_err(|_| {
                    Error::InvalidInput(format!("{} {s:?}: expected k/n with 0 <= k < n (0-based)", n.name("--shard")))
                })
            })
            .transpose()?;
        let (device, workers) = self.compute.configure()?;
        let mut options = PredictOptions::new(&self.model, &self.store);
        options.ensemble = self.ensemble.clone();
        options.source = self.source.clone();
        options.targets = targets;
        options.genes = genes;
        options.degs = self.degs.clone();
        options.latents = self.latents.clone();
        options.shard = shard;
        options.device = device;
        if let Some(b) = n.batch_size(self.batch_size)? {
            options.batch_size = b;
        }
        let defaults = LoaderOptions::default();
        options.loader =
            LoaderOptions { workers, prefetch: n.prefetch(self.prefetch)?.unwrap_or(defaults.prefetch), ..defaults };
        options.seed = self.seed;
        options.allow_empty = self.allow_empty;
        options.layout = self.layout;
        options.batch_corrected = self.batch_corrected;
        options.expected_log1p = self.expected_log1p;
        options.change = self.change;
        options.counts = self.counts;
        options.anchoring = match (self.anchored, self.plain) {
            (true, true) => return Err(choose_one(n, "--anchored", "--plain")),
            (true, false) => Anchoring::Every,
            (false, true) => Anchoring::Plain,
            (false, false) => Anchoring::Controls,
        };
        options.out = self.out.clone();
        options.aggregate = match (self.aggregate.as_slice(), &self.group_by) {
            ([], None) => None,
            ([], Some(_)) => {
                return Err(Error::InvalidInput(format!(
                    "{} groups the rows of aggregates: give {} too (mean, var)",
                    n.name("--group-by"),
                    n.name("--aggregate")
                )));
            }
            (statistics, group_by) => {
                if statistics.iter().enumerate().any(|(i, s)| statistics[..i].contains(s)) {
                    return Err(Error::InvalidInput(format!("{}: a statistic is listed twice", n.name("--aggregate"))));
                }
                Some(crate::predictor::aggregate::AggregateOptions {
                    statistics: statistics.to_vec(),
                    group_by: group_by.clone(),
                })
            }
        };
        let sink_threads = match self.sink_threads {
            Some(t) => n.bounded("--sink-threads", t, 1, cpa_stream_pipeline::limits::MAX_THREADS, "threads")?,
            None => crate::threads::sink_threads(device == tch::Device::Cpu),
        };
        options.sink = SinkOptions {
            overwrite: self.overwrite,
            threads: sink_threads,
            profile: self.sink_profile.unwrap_or_default(),
            values: self.values.unwrap_or_default(),
            parts: self.parts,
            ..SinkOptions::default()
        };
        if self.parts && options.shard.is_some() {
            return Err(Error::InvalidInput(format!(
                "{} and {}: a shard is already one part of a dataset directory; give one of them",
                n.name("--parts"),
                n.name("--shard")
            )));
        }
        if let Some(rows) = self.row_group_rows {
            options.sink.row_group_rows = n.bounded("--row-group-rows", rows, 1, usize::MAX, "rows per row group")?;
        }
        if let Some(level) = self.zstd_level {
            if !(1..=22).contains(&level) {
                return Err(Error::InvalidInput(format!("{} {level}: expected 1 to 22", n.name("--zstd-level"))));
            }
            options.sink.zstd_level = level;
        }
        Ok(options)
    }
}
