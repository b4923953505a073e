//! An evaluation as its users ask for it (the CLI's `evaluate` flags, the Python package's
//! `Run.evaluate` keywords), resolved into [`EvaluateOptions`] in one place.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Definitions, EvalSplit, EvaluateOptions};
use crate::threads::Configure as _;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::request::{Compute, Naming};

/// An evaluation request. `None` takes the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluateRequest {
    /// A run directory (its `model/` is used) or a model directory.
    pub model: PathBuf,
    /// The store the model was trained on.
    pub store: PathBuf,
    /// The output directory.
    pub out: PathBuf,
    /// `train`, `valid`, `test`, `ood` or `all`.
    pub split: String,
    /// A synthetic atlas's truth table [default: the store's].
    pub truth: Option<PathBuf>,
    /// A DEG table [default: the store's, else computed].
    pub degs: Option<PathBuf>,
    /// Conditions with fewer evaluated cells are skipped [default: the definitions'].
    pub min_cells: Option<u64>,
    /// `default` or `reference`.
    pub definitions: String,
    /// Score the expected log1p of the predicted counts (nb models).
    pub expected_log1p: bool,
    /// Further runs whose predictions are averaged with `model`'s (an ensemble).
    pub ensemble: Vec<PathBuf>,
    /// Score the anchored prediction (the control cells' observed values moved by the change)
    /// [default: anchored, except with `expected_log1p`, a plain prediction].
    pub anchored: bool,
    /// Score the plain prediction: log1p of the predicted means.
    pub plain: bool,
    /// Write the per-condition plots and the overview.
    pub plots: bool,
    /// Replace an existing evaluation.
    pub overwrite: bool,
    /// Control cells decoded per batch [default: the device's].
    pub batch_size: Option<usize>,
    /// Device and threads (no batcher workers: the evaluation plans its own).
    pub compute: Compute,
    /// How messages name the settings.
    pub naming: Naming,
}

impl Default for EvaluateRequest {
    fn default() -> Self {
        EvaluateRequest {
            model: PathBuf::new(),
            store: PathBuf::new(),
            out: PathBuf::new(),
            split: "test".to_owned(),
            truth: None,
            degs: None,
            min_cells: None,
            definitions: "default".to_owned(),
            expected_log1p: false,
            ensemble: Vec::new(),
            anchored: false,
            plain: false,
            plots: true,
            overwrite: false,
            batch_size: None,
            compute: Compute::default(),
            naming: Naming::Flags,
        }
    }
}

impl EvaluateRequest {
    /// The options of the evaluation, validated; configures the device and libtorch's threads
    /// (process-wide).
    pub fn options(&self) -> Result<EvaluateOptions> {
        let n = self.naming;
        let named = |flag: &str, e: Error| Error::InvalidInput(format!("{} {e}", n.name(flag)));
        let split: EvalSplit = self.split.parse().map_err(|e| named("--split", e))?;
        let definitions: Definitions = self.definitions.parse().map_err(|e| named("--definitions", e))?;
        if self.compute.workers.is_some() {
            return Err(Error::InvalidInput(format!(
                "{}: evaluate plans its own workers; give threads only",
                n.name("--workers")
            )));
        }
        if self.anchored && self.plain {
            return Err(cpa_stream_pipeline::request::choose_one(n, "--anchored", "--plain"));
        }
        if self.anchored && self.expected_log1p {
            return Err(Error::InvalidInput(format!(
                "{} and {}: the anchored prediction moves the observed log1p counts by the change in log1p of \
                 the means; ask for one of them",
                n.name("--anchored"),
                n.name("--expected-log1p")
            )));
        }
        let (device, _) = self.compute.configure()?;
        let mut options = EvaluateOptions::new(&self.model, &self.store, &self.out);
        options.split = split;
        options.truth = self.truth.clone();
        options.degs = self.degs.clone();
        options.device = device;
        options.batch_size = n.batch_size(self.batch_size)?;
        options.min_cells = self.min_cells.unwrap_or(definitions.min_cells());
        options.definitions = definitions;
        options.expected_log1p = self.expected_log1p;
        options.ensemble = self.ensemble.clone();
        // Anchored unless asked otherwise; the expected log1p is a plain prediction.
        options.anchored = self.anchored || (!self.plain && !self.expected_log1p);
        options.plots = self.plots;
        options.overwrite = self.overwrite;
        Ok(options)
    }
}
