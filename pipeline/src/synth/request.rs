//! A synthetic atlas as its users ask for it (the CLI's `synth` flags, the Python package's
//! `synth` keywords), resolved into [`SynthOptions`] in one place.

use std::path::PathBuf;

use cpa_stream_stages::synth::{
    DEFAULT_CELL_TYPES, DEFAULT_COMBINATIONS, DEFAULT_CONTROL_FRACTION, DEFAULT_DOSES, DEFAULT_HIDDEN,
    DEFAULT_INTERACTION, DEFAULT_LATENT_DIM, DEFAULT_LIBRARY_LOG_SD, DEFAULT_LIBRARY_SIZE, DEFAULT_TRUTH_SAMPLES,
    SynthConfig,
};
use serde::{Deserialize, Serialize};

use super::{DEFAULT_CHANNEL_DEPTH, SynthOptions};
use crate::error::{Error, Result};
use crate::limits::MAX_THREADS;
use crate::request::{CodecName, Naming};

/// A synth request: the atlas's shape and true model, the store and how it is written. `None`
/// takes the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthRequest {
    /// Cells.
    pub cells: u64,
    /// Genes.
    pub genes: u32,
    /// Single perturbations.
    pub perturbations: u32,
    /// Dose levels, log-spaced from 0.01 to 1.
    pub doses: u32,
    /// Cell types.
    pub cell_types: u32,
    /// Two-perturbation combinations present in the cells.
    pub combinations: u32,
    /// Combinations present only in the truth table [default: 1 if there are combinations and
    /// pairs to spare].
    pub heldout_combinations: Option<u32>,
    /// Strength of the combination interaction term in latent space (0: additive).
    pub interaction: f32,
    /// Fraction of control cells.
    pub control_fraction: f64,
    /// Median total counts per cell.
    pub library_size: f64,
    /// Standard deviation of the log library size.
    pub library_log_sd: f64,
    /// Latent dimension of the true model.
    pub latent_dim: u32,
    /// Hidden width of the true decoder.
    pub hidden: u32,
    /// Monte-Carlo draws per group for the truth table.
    pub truth_samples: u32,
    /// Seed of everything drawn.
    pub seed: u64,
    /// The store written.
    pub out: PathBuf,
    /// The store's matrix codec.
    pub codec: CodecName,
    /// zstd level (codec zstd).
    pub zstd_level: Option<i32>,
    /// Rows per compressed block (codec zstd).
    pub block_rows: Option<u32>,
    /// Generator threads [default: the available cores].
    pub threads: Option<usize>,
    /// Chunks of 1,024 cells queued per generator thread.
    pub channel_depth: usize,
    /// Replace an existing store.
    pub overwrite: bool,
    /// How messages name the settings.
    pub naming: Naming,
}

impl Default for SynthRequest {
    fn default() -> Self {
        SynthRequest {
            cells: 0,
            genes: 0,
            perturbations: 0,
            doses: DEFAULT_DOSES,
            cell_types: DEFAULT_CELL_TYPES,
            combinations: DEFAULT_COMBINATIONS,
            heldout_combinations: None,
            interaction: DEFAULT_INTERACTION,
            control_fraction: DEFAULT_CONTROL_FRACTION,
            library_size: DEFAULT_LIBRARY_SIZE,
            library_log_sd: DEFAULT_LIBRARY_LOG_SD,
            latent_dim: DEFAULT_LATENT_DIM,
            hidden: DEFAULT_HIDDEN,
            truth_samples: DEFAULT_TRUTH_SAMPLES,
            seed: 0,
            out: PathBuf::new(),
            codec: CodecName::Raw,
            zstd_level: None,
            block_rows: None,
            threads: None,
            channel_depth: DEFAULT_CHANNEL_DEPTH,
            overwrite: false,
            naming: Naming::Flags,
        }
    }
}

impl SynthRequest {
    /// The options of the atlas and its store, validated.
    pub fn options(&self) -> Result<SynthOptions> {
        let n = self.naming;
        // Checked here too so that the message names the setting as the caller spells it.
        let counts = [
            ("--genes", self.genes),
            ("--perturbations", self.perturbations),
            ("--doses", self.doses),
            ("--cell-types", self.cell_types),
        ];
        if let Some((flag, _)) = counts.iter().find(|(_, v)| *v == 0) {
            return Err(Error::InvalidInput(format!("synth: {} must be at least 1", n.name(flag))));
        }
        let mut config = SynthConfig::new(
            self.cells,
            self.genes,
            self.perturbations,
            self.doses,
            self.cell_types,
            self.combinations,
            self.seed,
        );
        if let Some(h) = self.heldout_combinations {
            config.heldout_combinations = h;
        }
        config.interaction = self.interaction;
        config.control_fraction = self.control_fraction;
        config.library_size = self.library_size;
        config.library_log_sd = self.library_log_sd;
        config.latent_dim = self.latent_dim;
        config.hidden = self.hidden;
        config.truth_samples = self.truth_samples;
        let source = format!("cpa-stream synth {config:?}");
        let mut options = SynthOptions::new(config, &self.out);
        options.codec = n.codec(self.codec, self.zstd_level, self.block_rows)?;
        options.channel_depth = n.bounded("--channel-depth", self.channel_depth, 1, 1024, "chunks per thread")?;
        options.overwrite = self.overwrite;
        options.source = Some(source);
        if let Some(t) = self.threads {
            options.threads = n.bounded("--threads", t, 1, MAX_THREADS, "threads")?;
        }
        Ok(options)
    }
}
