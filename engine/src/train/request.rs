//! A training run as its users ask for it (the CLI's flags, the Python package's keyword
//! arguments): every setting optional, defaults and a resumed run's record filled in, turned into
//! [`TrainOptions`] in one place so that both front ends train the same model from the same
//! request.

use std::path::PathBuf;

use crate::model::config::{CpaConfig, Preset};
use serde::{Deserialize, Serialize};

use std::time::Duration;

use super::{DEFAULT_CHECKPOINT_SECONDS, TrainOptions, recorded_settings};
use crate::Stage;
use cpa_stream_pipeline::batcher::{
    DEFAULT_BLOCK_CELLS, DEFAULT_BUFFER_BYTES, DEFAULT_PREFETCH, DEFAULT_SHUFFLE_BLOCKS, LoaderOptions, PlanOptions,
};
use cpa_stream_pipeline::encoder::{
    DEFAULT_CONTROL, DEFAULT_PERTURBATION_KEY, DEFAULT_TEST_FRACTION, DEFAULT_VALIDATION_FRACTION, EncoderOptions,
    SplitSpec,
};
use cpa_stream_pipeline::error::{Error, Result};

use crate::threads::Configure as _;
use cpa_stream_pipeline::request::Compute;
pub use cpa_stream_pipeline::request::Naming;

/// Where the model's configuration comes from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConfigSource {
    /// The defaults (the reference's).
    #[default]
    Default,
    /// A TOML file.
    File(PathBuf),
    /// Given in full or in part (missing keys take their defaults), as the TOML file's tables.
    Inline(serde_json::Map<String, serde_json::Value>),
}

impl ConfigSource {
    /// The configuration over `base` (keys not given keep `base`'s); `None` when none was given.
    fn load(&self, base: &CpaConfig) -> Result<Option<CpaConfig>> {
        match self {
            ConfigSource::Default => Ok(None),
            ConfigSource::File(path) => {
                CpaConfig::from_file_over(base, path).map(Some).map_err(Error::stage(Stage::Trainer))
            }
            ConfigSource::Inline(map) => {
                let invalid = |e: serde_json::Error| Error::InvalidInput(format!("configuration: {e}"));
                let mut merged = serde_json::to_value(base).map_err(invalid)?;
                for (table, keys) in map {
                    match (merged.get_mut(table), keys) {
                        (Some(serde_json::Value::Object(into)), serde_json::Value::Object(keys)) => {
                            into.extend(keys.clone());
                        }
                        (_, keys) => {
                            if let serde_json::Value::Object(m) = &mut merged {
                                m.insert(table.clone(), keys.clone());
                            }
                        }
                    }
                }
                let config: CpaConfig = serde_json::from_value(merged).map_err(invalid)?;
                config.validate().map_err(|e| Error::InvalidInput(format!("configuration: {e}")))?;
                Ok(Some(config))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            ConfigSource::Default => "(defaults)".to_owned(),
            ConfigSource::File(path) => path.display().to_string(),
            ConfigSource::Inline(_) => "(the configuration given)".to_owned(),
        }
    }
}

/// A training request: the store and run directory, the obs columns that label the cells, the
/// split, the configuration and what may override it. `None` takes the default, or on
/// `resume` the run's record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainRequest {
    /// The store to train on.
    pub store: PathBuf,
    /// The run directory.
    pub out: PathBuf,
    /// obs column of the condition [default: `condition`].
    pub perturbation_key: Option<String>,
    /// obs column of the doses; without it every part has dose 1.
    pub dose_key: Option<String>,
    /// The control condition [default: `control`].
    pub control: Option<String>,
    /// Categorical covariate columns.
    pub covariates: Vec<String>,
    /// A batch covariate, left out of the corrected latents.
    pub batch_key: Option<String>,
    /// obs column with train / valid / test / ood per cell.
    pub split_key: Option<String>,
    /// Conditions held out entirely.
    pub holdout: Vec<String>,
    /// Fraction of each condition's cells for validation (without `split_key`).
    pub validation_fraction: Option<f64>,
    /// Fraction of each condition's cells kept for testing (without `split_key`).
    pub test_fraction: Option<f64>,
    /// Seed of the split by fractions [default: the training seed]; runs given the same one
    /// (and fractions and holdout) split the cells alike whatever their training seeds, as the
    /// runs of an ensemble should.
    pub split_seed: Option<u64>,
    /// The configuration's starting point (`default`, `reference`); `config` changes the keys it
    /// sets.
    pub preset: Option<String>,
    /// The model configuration.
    pub config: ConfigSource,
    /// Epochs.
    pub epochs: Option<u32>,
    /// Cells per batch, or `auto`.
    pub batch_size: Option<String>,
    /// Consecutive store cells the shuffle keeps together.
    pub shuffle_run_cells: Option<usize>,
    /// Seed.
    pub seed: Option<u64>,
    /// Continue from the run's checkpoint with its recorded settings.
    pub resume: bool,
    /// Replace an existing run.
    pub overwrite: bool,
    /// Train count likelihoods on values that are not whole numbers (a warning).
    pub allow_non_counts: bool,
    /// Seconds of training between two checkpoints [default: [`DEFAULT_CHECKPOINT_SECONDS`]; 0:
    /// every epoch].
    pub checkpoint_every: Option<f64>,
    /// Batches buffered ahead of the trainer, per worker [default: [`DEFAULT_PREFETCH`]].
    pub prefetch: Option<usize>,
    /// Blocks whose cells are shuffled together [default: [`DEFAULT_SHUFFLE_BLOCKS`]].
    pub shuffle_blocks: Option<usize>,
    /// Bytes of a compressed store's shuffle buffer [default: [`DEFAULT_BUFFER_BYTES`]].
    pub shuffle_buffer_bytes: Option<u64>,
    /// Fixed perturbation features (Parquet or CSV, one row per perturbation).
    pub perturbation_features: Option<PathBuf>,
    /// Device and threads.
    pub compute: Compute,
    /// The torch.distributed process group (its name) to train as one rank of, made in this
    /// process by the caller (`cpa_stream.train` under torchrun, srun or Ray); `None` trains alone.
    pub process_group: Option<String>,
    /// How messages name the settings.
    pub naming: Naming,
}

impl TrainRequest {
    /// The encoder's options for the label columns of this request.
    fn encoder(&self, split: SplitSpec, max_comb_len: usize) -> EncoderOptions {
        EncoderOptions {
            perturbation_key: self.perturbation_key.clone().unwrap_or_else(|| DEFAULT_PERTURBATION_KEY.to_owned()),
            dose_key: self.dose_key.clone(),
            control: self.control.clone().unwrap_or_else(|| DEFAULT_CONTROL.to_owned()),
            covariate_keys: self.covariates.clone(),
            batch_key: self.batch_key.clone(),
            split,
            max_comb_len,
        }
    }

    /// The configuration given (preset, then file or tables over it); `None` when neither was.
    fn given_config(&self) -> Result<Option<CpaConfig>> {
        let base = match &self.preset {
            Some(name) => name
                .parse::<Preset>()
                .map_err(|e| Error::InvalidInput(format!("{}: {}", self.naming.name("--preset"), e)))?,
            None => Preset::Default,
        };
        let base_config = base.config();
        let given = self.config.load(&base_config)?;
        Ok(given.or_else(|| self.preset.is_some().then_some(base_config)))
    }

    /// The settings a resumed run recorded, after checking that every setting given agrees.
    fn resumed(&self) -> Result<(EncoderOptions, CpaConfig)> {
        let (encoder, recorded) = recorded_settings(&self.out)?;
        let mut differ: Vec<(&'static str, String, String)> = Vec::new();
        let mut check = |flag: &'static str, given: Option<String>, had: String| {
            if let Some(g) = given.filter(|g| *g != had) {
                differ.push((flag, g, had));
            }
        };
        check("--perturbation-key", self.perturbation_key.clone(), encoder.perturbation_key.clone());
        check("--dose-key", self.dose_key.clone(), encoder.dose_key.clone().unwrap_or_else(|| "(none)".into()));
        check("--control", self.control.clone(), encoder.control.clone());
        let covariates = (!self.covariates.is_empty()).then(|| self.covariates.join(","));
        check("--covariates", covariates, encoder.covariate_keys.join(","));
        check("--batch-key", self.batch_key.clone(), encoder.batch_key.clone().unwrap_or_else(|| "(none)".into()));
        check("--seed", self.seed.map(|s| s.to_string()), recorded.training.seed.to_string());
        match &encoder.split {
            SplitSpec::Column(c) => check("--split-key", self.split_key.clone(), c.clone()),
            SplitSpec::Fraction { validation, test, holdout, seed, .. } => {
                check("--split-key", self.split_key.clone(), "(none)".into());
                check("--split-seed", self.split_seed.map(|v| v.to_string()), seed.to_string());
                check("--validation-fraction", self.validation_fraction.map(|v| v.to_string()), validation.to_string());
                check("--test-fraction", self.test_fraction.map(|v| v.to_string()), test.to_string());
                let given = (!self.holdout.is_empty()).then(|| self.holdout.join(","));
                check("--holdout", given, holdout.join(","));
            }
        }
        if let Some(mut given) = self.given_config()? {
            // What a resume may change: the epochs, the batch and run lengths, the seed.
            given.training.max_epochs = recorded.training.max_epochs;
            given.training.batch_size = recorded.training.batch_size;
            given.training.shuffle_run_cells = recorded.training.shuffle_run_cells;
            given.training.seed = recorded.training.seed;
            let toml = |c: &CpaConfig| c.to_toml().map_err(Error::stage(Stage::Trainer));
            if toml(&given)? != toml(&recorded)? {
                let flag = if matches!(self.config, ConfigSource::Default) { "--preset" } else { "--config" };
                let described = match (&self.preset, &self.config) {
                    (Some(p), ConfigSource::Default) => p.clone(),
                    _ => self.config.describe(),
                };
                differ.push((flag, described, "the configuration in checkpoint/model.json".into()));
            }
        }
        if let Some((flag, given, had)) = differ.first() {
            let restart = match self.naming {
                Naming::Flags => "--overwrite",
                Naming::Keywords => "overwrite=True",
            };
            return Err(Error::InvalidInput(format!(
                "{}: {} {given} differs from the run's recorded {had:?}; a resumed run keeps its settings \
                 (leave it out, or start a new run with {restart})",
                self.out.display(),
                self.naming.name(flag),
            )));
        }
        Ok((encoder, recorded))
    }

    /// The options of the run: defaults, the configuration, the resumed run's record and the
    /// overrides, validated; configures the device and libtorch's threads (process-wide,
    /// [`threads::configure`](crate::threads::configure)).
    pub fn options(&self) -> Result<TrainOptions> {
        if self.resume && self.overwrite {
            return Err(Error::InvalidInput(format!(
                "{} and {} both given; choose one",
                self.naming.name("--resume"),
                self.naming.name("--overwrite")
            )));
        }
        if self.split_key.is_some()
            && (!self.holdout.is_empty()
                || self.validation_fraction.is_some()
                || self.test_fraction.is_some()
                || self.split_seed.is_some())
        {
            return Err(Error::InvalidInput(format!(
                "{} gives the split; {}, {}, {} and {} are for a split by fractions",
                self.naming.name("--split-key"),
                self.naming.name("--holdout"),
                self.naming.name("--validation-fraction"),
                self.naming.name("--test-fraction"),
                self.naming.name("--split-seed")
            )));
        }
        let recorded = if self.resume { Some(self.resumed()?) } else { None };
        let (device, workers) = self.compute.configure()?;
        let mut config = match &recorded {
            Some((_, c)) => c.clone(),
            None => self.given_config()?.unwrap_or_default(),
        };
        if let Some(e) = self.epochs {
            config.training.max_epochs = e;
        }
        let auto_batch_size = self.batch_size.as_deref() == Some("auto");
        if let Some(b) = self.batch_size.as_deref().filter(|b| *b != "auto") {
            config.training.batch_size = b.parse().map_err(|_| {
                Error::InvalidInput(format!(
                    "{} {b:?}: expected a number of cells or auto",
                    self.naming.name("--batch-size")
                ))
            })?;
        }
        if let Some(s) = self.seed {
            config.training.seed = s;
        }
        if let Some(k) = self.shuffle_run_cells {
            config.training.shuffle_run_cells = k;
        }
        config.validate().map_err(|e| Error::InvalidInput(format!("configuration: {e}")))?;
        let checkpoint_every = match self.checkpoint_every {
            None => Duration::from_secs_f64(DEFAULT_CHECKPOINT_SECONDS),
            Some(s) => Duration::try_from_secs_f64(s).map_err(|_| {
                Error::InvalidInput(format!(
                    "{} {s}: expected seconds, 0 or more (0: after every epoch)",
                    self.naming.name("--checkpoint-every")
                ))
            })?,
        };
        let encoder = match recorded {
            Some((encoder, _)) => encoder,
            None => {
                let split = match &self.split_key {
                    Some(k) => SplitSpec::Column(k.clone()),
                    None => SplitSpec::fractions(
                        self.validation_fraction.unwrap_or(DEFAULT_VALIDATION_FRACTION),
                        self.test_fraction.unwrap_or(DEFAULT_TEST_FRACTION),
                        self.split_seed.unwrap_or(config.training.seed),
                        self.holdout.clone(),
                    ),
                };
                self.encoder(split, config.model.max_comb_len)
            }
        };
        Ok(TrainOptions {
            store: self.store.clone(),
            out: self.out.clone(),
            encoder,
            config,
            perturbation_features: self.perturbation_features.clone(),
            device,
            resume: self.resume,
            overwrite: self.overwrite,
            allow_non_counts: self.allow_non_counts,
            checkpoint_every,
            epochs: self.epochs,
            process_group: self.process_group.clone(),
            auto_batch_size,
            loader: LoaderOptions {
                workers,
                prefetch: self.naming.prefetch(self.prefetch)?.unwrap_or(DEFAULT_PREFETCH),
                buffer_bytes: self.shuffle_buffer_bytes.unwrap_or(DEFAULT_BUFFER_BYTES),
            },
            plan: PlanOptions {
                block_cells: DEFAULT_BLOCK_CELLS,
                shuffle_blocks: self.shuffle_blocks.unwrap_or(DEFAULT_SHUFFLE_BLOCKS),
                ..PlanOptions::default()
            },
        })
    }
}
