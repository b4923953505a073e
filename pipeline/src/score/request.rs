//! A scoring as its users ask for it (the CLI's `score` flags, the Python package's `score`
//! keywords), resolved into [`ScoreOptions`] in one place.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ScoreOptions, TargetGenes};
use crate::error::{Error, Result};
use crate::request::Naming;

/// A score request. `None` takes the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoreRequest {
    /// The predicted cells (`.h5ad` of raw counts).
    pub prediction: PathBuf,
    /// The real cells (`.h5ad` of raw counts).
    pub reference: PathBuf,
    /// The obs column of the perturbations [default: `condition`].
    pub perturbation_key: Option<String>,
    /// The control's label [default: `control`].
    pub control: Option<String>,
    /// The perturbations have no target gene.
    pub no_target_genes: bool,
    /// A real bundle of cell-eval2 for the reference.
    pub real_bundle: Option<PathBuf>,
    /// Score the mean-response baseline arm beside the prediction.
    pub baseline: bool,
    /// The baseline arm's seed [default: 0].
    pub baseline_seed: Option<u64>,
    /// Compute the split-half replicate.
    pub replicate: bool,
    /// The seed of the replicate's split seeds [default: 0].
    pub replicate_seed: Option<u64>,
    /// An obs column of contexts, each scored on its own.
    pub context_key: Option<String>,
    /// The directory written.
    pub out: Option<PathBuf>,
    /// Accept counts that are not whole.
    pub allow_fractional_counts: bool,
    /// Replace a score directory written before.
    pub overwrite: bool,
    /// Whose Wilcoxon p-values: cell-eval2's `scanpy` or `pdex` engine [default: scanpy].
    pub de_engine: Option<super::de::Engine>,
    /// Threads [default: the usable CPUs].
    pub threads: Option<usize>,
    /// How messages name the settings.
    pub naming: Naming,
}

impl ScoreRequest {
    /// The options of the scoring, validated.
    pub fn options(&self) -> Result<ScoreOptions> {
        let n = self.naming;
        for (path, flag) in [(&self.prediction, "--prediction"), (&self.reference, "--reference")] {
            if path.as_os_str().is_empty() {
                return Err(Error::InvalidInput(format!("{} is required (an .h5ad of raw counts)", n.name(flag))));
            }
        }
        if self.real_bundle.is_some() && (self.baseline || self.replicate) {
            return Err(Error::InvalidInput(format!(
                "{} reads the baseline and the replicate from the bundle; {} and {} compute them from the reference: \
                 give one or the other",
                n.name("--real-bundle"),
                n.name("--baseline"),
                n.name("--replicate")
            )));
        }
        for (seed, flag, needs, on) in [
            (self.baseline_seed, "--baseline-seed", "--baseline", self.baseline),
            (self.replicate_seed, "--replicate-seed", "--replicate", self.replicate),
        ] {
            if seed.is_some() && !on {
                return Err(Error::InvalidInput(format!("{} is for {}", n.name(flag), n.name(needs))));
            }
        }
        let mut options = ScoreOptions::new(&self.prediction, &self.reference);
        if let Some(key) = &self.perturbation_key {
            options.perturbation_key = key.clone();
        }
        if let Some(control) = &self.control {
            options.control = control.clone();
        }
        options.target_genes = if self.no_target_genes { TargetGenes::None } else { TargetGenes::ByName };
        options.real_bundle = self.real_bundle.clone();
        options.baseline = self.baseline;
        options.baseline_seed = self.baseline_seed.unwrap_or(super::BASELINE_SEED);
        options.replicate = self.replicate;
        options.replicate_seed = self.replicate_seed.unwrap_or(super::REPLICATE_SEED);
        options.context_key = self.context_key.clone();
        options.out = self.out.clone();
        options.allow_fractional_counts = self.allow_fractional_counts;
        options.overwrite = self.overwrite;
        options.de_engine = self.de_engine.unwrap_or_default();
        if let Some(t) = self.threads {
            options.threads = n.bounded("--threads", t, 1, 1024, "threads")?;
        }
        Ok(options)
    }
}
