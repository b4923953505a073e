//! Dose-response curves as their users ask for them (the CLI's `dose-response` flags, the
//! Python package's `Run.dose_response` keywords), resolved into [`DoseResponseOptions`] in one
//! place.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{DEFAULT_CELLS, DoseResponseOptions};
use crate::threads::Configure as _;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::request::{Compute, Naming};

/// A dose-response request. `None` takes the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DoseResponseRequest {
    /// A run directory (its `model/` is used) or a model directory.
    pub model: PathBuf,
    /// The output directory.
    pub out: PathBuf,
    /// The store whose control cells are decoded over the grid (without it, latent curves only).
    pub store: Option<PathBuf>,
    /// Perturbations drawn [default: every one but the control].
    pub perturbations: Vec<String>,
    /// The dose grid [default: 0 to the largest dose the store has, plus every dose it has].
    pub doses: Option<Vec<f64>>,
    /// Genes whose curves go to `genes.parquet` [default: the largest changes].
    pub genes: Vec<String>,
    /// `(covariate, value)` pairs the decoded curves are limited to.
    pub covariates: Vec<(String, String)>,
    /// Control cells sampled per covariate combination.
    pub cells: usize,
    /// Seed of the sample.
    pub seed: u64,
    /// Draw `dose_response.svg` and `.png`.
    pub plots: bool,
    /// Replace an existing dose-response directory.
    pub overwrite: bool,
    /// Device and threads.
    pub compute: Compute,
    /// How messages name the settings.
    pub naming: Naming,
}

impl Default for DoseResponseRequest {
    fn default() -> Self {
        DoseResponseRequest {
            model: PathBuf::new(),
            out: PathBuf::new(),
            store: None,
            perturbations: Vec::new(),
            doses: None,
            genes: Vec::new(),
            covariates: Vec::new(),
            cells: DEFAULT_CELLS,
            seed: 0,
            plots: true,
            overwrite: false,
            compute: Compute::default(),
            naming: Naming::Flags,
        }
    }
}

impl DoseResponseRequest {
    /// The options of the curves, validated; configures the device and libtorch's threads
    /// (process-wide).
    pub fn options(&self) -> Result<DoseResponseOptions> {
        let n = self.naming;
        if self.cells == 0 {
            return Err(Error::InvalidInput(format!("{} must be at least 1", n.name("--cells"))));
        }
        if let Some(d) = self.doses.iter().flatten().find(|d| !d.is_finite() || **d < 0.0) {
            return Err(Error::InvalidInput(format!(
                "{} {d}: doses must be finite and not negative",
                n.name("--doses")
            )));
        }
        if self.compute.workers.is_some() {
            return Err(Error::InvalidInput(format!("{}: dose-response takes threads only", n.name("--workers"))));
        }
        let (device, _) = self.compute.configure()?;
        Ok(DoseResponseOptions {
            store: self.store.clone(),
            perturbations: self.perturbations.clone(),
            doses: self.doses.clone(),
            genes: self.genes.clone(),
            covariates: self.covariates.clone(),
            cells: self.cells,
            seed: self.seed,
            device,
            overwrite: self.overwrite,
            plots: self.plots,
            ..DoseResponseOptions::new(&self.model, &self.out)
        })
    }
}
