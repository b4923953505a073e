//! What a prediction is asked for: the model and store, source cells, targets, genes, latents,
//! shard, device and the loader's sizes.

use std::ops::Range;
use std::path::{Path, PathBuf};

use cpa_stream_stages::sink::SinkOptions;
use tch::Device;

use super::targets::TargetSpec;
use cpa_stream_pipeline::batcher::LoaderOptions;
use cpa_stream_pipeline::error::{Error, Result};

/// Which genes' predicted means are written.
#[derive(Debug, Clone, PartialEq)]
pub enum GeneSelection {
    /// Every gene of the model, in its order.
    All,
    /// The union of each target's top-K differentially expressed genes (from the store's DEG
    /// table or `--degs`), in the model's gene order.
    TopDeg(usize),
    /// These genes, in this order.
    Names(Vec<String>),
}

impl GeneSelection {
    /// The genes listed in a file, one name per line (quotes and blank lines ignored).
    pub fn from_file(path: &Path) -> Result<GeneSelection> {
        let text = path.display();
        let body = cpa_stream_stages::regular::read_text(path, "a gene list file", 256 << 20).map_err(|e| {
            Error::InvalidInput(format!("--genes {text:?}: not all, top-deg:K or a readable gene list file ({e})"))
        })?;
        let genes: Vec<String> =
            body.lines().map(|l| l.trim().trim_matches('"').to_owned()).filter(|l| !l.is_empty()).collect();
        if genes.is_empty() {
            return Err(Error::InvalidInput(format!("{text}: no gene names")));
        }
        let mut seen = std::collections::HashMap::new();
        for (line, gene) in genes.iter().enumerate() {
            if let Some(first) = seen.insert(gene.as_str(), line) {
                return Err(Error::InvalidInput(format!(
                    "{text}: gene {gene:?} is listed twice (entries {} and {}); each gene is one column of the output",
                    first + 1,
                    line + 1
                )));
            }
        }
        Ok(GeneSelection::Names(genes))
    }
}

/// The k-th of n contiguous cell ranges (0-based), for job arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which range (0-based).
    pub index: u64,
    /// How many ranges.
    pub count: u64,
}

impl std::str::FromStr for Shard {
    type Err = Error;

    /// `k/n` with `0 <= k < n`.
    fn from_str(text: &str) -> Result<Shard> {
        let bad = || Error::InvalidInput(format!("--shard {text:?}: expected k/n with 0 <= k < n (0-based)"));
        let (k, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count): (u64, u64) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// The rows of this shard among `n_cells`.
    pub fn rows(&self, n_cells: u64) -> Range<u64> {
        let at = |k: u64| (u128::from(n_cells) * u128::from(k) / u128::from(self.count)) as u64;
        at(self.index)..at(self.index + 1)
    }

    /// The file name of this shard inside a dataset directory.
    pub fn file_name(&self) -> String {
        let width = (self.count - 1).max(1).ilog10() as usize + 1;
        format!("part-{:0width$}-of-{:0width$}.parquet", self.index, self.count)
    }
}

/// Source cells per batch, unless set otherwise.
pub use cpa_stream_pipeline::model_flags::PREDICT_BATCH_SIZE as DEFAULT_BATCH_SIZE;

/// What to predict.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// A run directory (its `model/` is used) or a model directory.
    pub model: PathBuf,
    /// Further runs (or model directories) of the same genes, perturbations and covariates, each
    /// model's predictions averaged with `model`'s: an ensemble, say of one recipe trained with
    /// several seeds. Every predicted column is the mean over the models (the mean of an equal
    /// mixture of their predictive distributions); latents, which are each model's own space,
    /// cannot be asked for. Default none.
    pub ensemble: Vec<PathBuf>,
    /// The store with the source cells (the model's genes).
    pub store: PathBuf,
    /// Source cells: an [`Expr`](cpa_stream_pipeline::obs::expr::Expr) over obs columns; `None` selects the control cells.
    pub source: Option<String>,
    /// Targets; empty (the default) reconstructs each cell under its own condition.
    pub targets: Vec<TargetSpec>,
    /// The genes written; default all.
    pub genes: GeneSelection,
    /// A DEG table (`group`, `rank`, `gene`) for `top-deg:K`, instead of the store's.
    pub degs: Option<PathBuf>,
    /// Latent columns to write ([`cpa_stream_schemas::tables::predictions::LATENTS`]).
    pub latents: Vec<String>,
    /// The part of the store's cells this run predicts; default all.
    pub shard: Option<Shard>,
    /// Where the model runs; default the CPU.
    pub device: Device,
    /// Source cells per batch; default [`DEFAULT_BATCH_SIZE`].
    pub batch_size: usize,
    /// Gather workers and batches buffered between stages; default [`LoaderOptions::default`].
    pub loader: LoaderOptions,
    /// Seed of the posterior draws of a variational model; default 0.
    pub seed: u64,
    /// Write an empty file (with a warning) when the source selects no cell, instead of failing;
    /// default false.
    pub allow_empty: bool,
    /// The file [`predict::run`](crate::predict::run) writes (with a shard: the dataset
    /// directory that receives the shard's part); unused by a stream. Default none.
    pub out: Option<PathBuf>,
    /// How [`predict::run`](crate::predict::run) lays out the file; default long.
    pub layout: Layout,
    /// The file's row groups, compression and replacement; default [`SinkOptions::default`].
    pub sink: SinkOptions,
    /// Decode without the batch covariate's embedding (cpa-tools' `custom_predict(add_batch=False)`):
    /// expression corrected for the batch; the model needs a batch key. Default false.
    pub batch_corrected: bool,
    /// Also write `expected_log1p`: `E[log1p(x)]` of each predicted count distribution (nb models),
    /// what a mean of log-normalised counts estimates; `log1p(mean)` overstates it. Default false.
    pub expected_log1p: bool,
    /// Also write `change_log1p`: per gene, `E[log1p(x)]` under the target minus under the source
    /// cell's own condition (nb models): the model's predicted change, to add to observed log1p
    /// counts. Default false.
    pub change: bool,
    /// Also write `counts`: per cell, whole counts drawn from the model's count distribution (nb,
    /// zinb) at the predicted mean and the source cell's library size, seeded by `seed`
    /// ([`predictions::COUNTS`](cpa_stream_schemas::tables::predictions::COUNTS)). Default false.
    pub counts: bool,
    /// Whether and where the `anchored` column is written ([`Anchoring`]); default
    /// [`Anchoring::Controls`].
    pub anchoring: Anchoring,
    /// Write per target and group of source cells the statistics of every vector column instead
    /// of per-cell rows ([`aggregate`](super::aggregate)); default none.
    pub aggregate: Option<super::aggregate::AggregateOptions>,
}

pub use cpa_stream_pipeline::model_flags::Layout;

/// The anchored prediction: per gene, the source cell's observed expression (log1p of its counts
/// for a count model, the encoder's input) plus the model's predicted change of it (`log1p` of
/// the mean under the target minus under the cell's own condition; the means for a Gaussian
/// model), written as the `anchored` column with `is_anchored` saying, per row, whether that row
/// is anchored. Averaged over a group of source cells, their observed mean moved by the model's
/// change. On every held-out data set of docs/fidelity.md it is ahead of the plain mean
/// (`log1p(mean)`) on all genes, the top-20 DEGs and the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Anchoring {
    /// The default: with targets, `anchored` is written, and a row is anchored where its source
    /// cell is a control cell (its own condition is the control) and the target keeps the cell's
    /// covariates, so that the observed cell is what the target's context looks like
    /// unperturbed. Other rows (a perturbed source cell, or a target that moves the cell to
    /// other covariate values) hold the plain prediction in the same space, `log1p(mean)`, with
    /// `is_anchored` false. Without targets (a reconstruction) nothing is anchored and the
    /// column is not written.
    #[default]
    Controls,
    /// Every row anchored on its own source cell, whatever its condition and the target's
    /// covariates (`predict --anchored`); written for reconstructions too (where it is the
    /// observed expression).
    Every,
    /// No `anchored` column: the model's mean only (`predict --plain`; cpa-tools' prediction).
    Plain,
}

impl Anchoring {
    /// Whether a prediction with `targets` writes the `anchored` and `is_anchored` columns.
    pub fn writes_column(self, has_targets: bool) -> bool {
        match self {
            Anchoring::Controls => has_targets,
            Anchoring::Every => true,
            Anchoring::Plain => false,
        }
    }
}

impl PredictOptions {
    /// Options with every default, for `model` and `store`.
    pub fn new(model: impl Into<PathBuf>, store: impl Into<PathBuf>) -> PredictOptions {
        PredictOptions {
            model: model.into(),
            ensemble: Vec::new(),
            store: store.into(),
            source: None,
            targets: Vec::new(),
            genes: GeneSelection::All,
            degs: None,
            latents: Vec::new(),
            shard: None,
            device: Device::Cpu,
            batch_size: DEFAULT_BATCH_SIZE,
            loader: LoaderOptions::default(),
            seed: 0,
            allow_empty: false,
            out: None,
            layout: Layout::Long,
            sink: SinkOptions::default(),
            batch_corrected: false,
            expected_log1p: false,
            change: false,
            counts: false,
            anchoring: Anchoring::Controls,
            aggregate: None,
        }
    }
}
