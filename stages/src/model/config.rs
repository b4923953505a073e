//! The typed model and training configuration (`cpa.toml`).
//!
//! Every default is a named constant. The network's and the optimisation's defaults are the ones
//! the validation protocol chose (`docs/fidelity.md`, "The defaults, chosen by the protocol"):
//! cpa-tools' Kang tutorial's settings with warm-ups of 2 and 5 epochs, decided on two data sets
//! and confirmed on three more and at atlas size, against cpa-tools 0.8.8's module defaults,
//! which lost on almost every one. Those stay available as the `reference` preset (the
//! `REFERENCE_*` constants). Where the reference has a defect that this project fixes, the field
//! says so. A file needs only the keys it changes: missing keys take their defaults, unknown keys
//! are errors.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Latent dimension (`n_latent`).
pub const DEFAULT_N_LATENT: usize = 64;
/// Hidden width of the encoder.
pub const DEFAULT_N_HIDDEN_ENCODER: usize = 128;
/// Hidden layers of the encoder.
pub const DEFAULT_N_LAYERS_ENCODER: usize = 2;
/// Hidden width of the decoder.
pub const DEFAULT_N_HIDDEN_DECODER: usize = 512;
/// Hidden layers of the decoder.
pub const DEFAULT_N_LAYERS_DECODER: usize = 2;
/// Hidden width of each per-perturbation dose MLP (`doser_type = "mlp"`).
pub const DEFAULT_N_HIDDEN_DOSER: usize = 128;
/// Layers of each per-perturbation dose MLP.
pub const DEFAULT_N_LAYERS_DOSER: usize = 2;
/// Dropout of the encoder and of the decoder.
pub const DEFAULT_DROPOUT: f64 = 0.0;
/// Most perturbations in one combination.
pub const DEFAULT_MAX_COMB_LEN: usize = 2;
/// Hidden width of the adversarial classifiers.
pub const DEFAULT_N_HIDDEN_ADV: usize = 64;
/// Hidden layers of the adversarial classifiers.
pub const DEFAULT_N_LAYERS_ADV: usize = 3;
/// Dropout of the adversarial classifiers.
pub const DEFAULT_DROPOUT_ADV: f64 = 0.3;
/// Weight of the adversarial term in the autoencoder loss.
pub const DEFAULT_REG_ADV: f64 = 20.0;
/// Weight of the gradient penalty in the adversary loss.
pub const DEFAULT_PEN_ADV: f64 = 5.0;
/// Adversary steps per autoencoder step: batches with `index % adv_steps != 0` train the adversary;
/// 0: every batch trains the autoencoder and then the adversary.
pub const DEFAULT_ADV_STEPS: u32 = 0;
/// Focusing parameter of the focal loss.
pub const DEFAULT_FOCAL_GAMMA: f64 = 2.0;
/// Learning rate of the autoencoder group (encoder, decoder, embeddings).
pub const DEFAULT_LR: f64 = 3e-4;
/// Weight decay of the autoencoder group.
pub const DEFAULT_WD: f64 = 4e-7;
/// Learning rate of the dose-response group.
pub const DEFAULT_DOSER_LR: f64 = 3e-4;
/// Weight decay of the dose-response group.
pub const DEFAULT_DOSER_WD: f64 = 4e-7;
/// Learning rate of the adversary group.
pub const DEFAULT_ADV_LR: f64 = 3e-4;
/// Weight decay of the adversary group.
pub const DEFAULT_ADV_WD: f64 = 4e-7;
/// Epochs between learning-rate decays.
pub const DEFAULT_STEP_SIZE_LR: u32 = 10;
/// The learning-rate decay factor.
pub const DEFAULT_LR_DECAY: f64 = 0.9;
/// Gradient-norm limit (clipping is on by default).
pub const DEFAULT_GRADIENT_CLIP: f64 = 1.0;
/// Epochs of autoencoder-only training before the adversarial term enters.
pub const DEFAULT_PRETRAIN_AE_EPOCHS: u32 = 2;
/// Epochs, after pre-training, over which the adversarial weight rises to `reg_adv`.
pub const DEFAULT_ADV_WARMUP_EPOCHS: u32 = 5;

/// cpa-tools 0.8.8's module defaults where they differ from this project's (`--preset reference`).
pub mod reference {
    /// `n_latent`.
    pub const N_LATENT: usize = 128;
    /// Hidden width of the encoder and of the decoder.
    pub const N_HIDDEN: usize = 256;
    /// Hidden layers of the encoder and of the decoder.
    pub const N_LAYERS: usize = 3;
    /// Dropout of the adversarial classifiers.
    pub const DROPOUT_ADV: f64 = 0.1;
    /// `reg_adv`.
    pub const REG_ADV: f64 = 1.0;
    /// `pen_adv`.
    pub const PEN_ADV: f64 = 1.0;
    /// `adv_steps`.
    pub const ADV_STEPS: u32 = 3;
    /// `lr`.
    pub const LR: f64 = 5e-4;
    /// `wd`.
    pub const WD: f64 = 1e-6;
    /// `step_size_lr`.
    pub const STEP_SIZE_LR: u32 = 45;
    /// `gradient_clip_value` (clipping off).
    pub const GRADIENT_CLIP: f64 = 3.0;
}
/// Adam moments (PyTorch's defaults).
pub const DEFAULT_ADAM_BETAS: (f64, f64) = (0.9, 0.999);
/// Adam epsilon (PyTorch's default).
pub const DEFAULT_ADAM_EPS: f64 = 1e-8;
/// Cells per device batch (the reference's; `cpa-stream train --batch-size auto` picks larger on a GPU).
pub const DEFAULT_BATCH_SIZE: usize = 128;
/// Width of the latent space in the `unseen-covariates` preset.
pub const UNSEEN_N_LATENT: usize = 128;
/// The batch of short training ([`TrainingConfig::batch_size_for`]).
pub const SHORT_BATCH_SIZE: usize = 64;
/// Optimizer steps at [`DEFAULT_BATCH_SIZE`] below which training counts as short.
pub const SHORT_TRAINING_STEPS: u64 = 500;
/// Validation every this many epochs.
pub const DEFAULT_CHECK_VAL_EVERY: u32 = 10;
/// Early stopping after this many validations without improvement.
pub const DEFAULT_EARLY_STOPPING_PATIENCE: u32 = 10;
/// Upper bound of the reference's automatic epoch count, `min(round(20000 / cells * 400), 400)`.
pub const DEFAULT_MAX_EPOCHS_CAP: u32 = 400;
/// Decay of the moving average of the weights that validation and the published model use
/// (`docs/fidelity.md`: measured better than the raw weights on the bundled data, both of its
/// splits and the synthetic atlas).
pub const DEFAULT_EMA_DECAY: f64 = 0.99;
/// Steps between reads of the device-side metrics (each read is one device-to-host sync).
pub const DEFAULT_METRICS_EVERY: u32 = 50;
/// Draws of `z_basal` averaged at prediction with a variational encoder.
pub const DEFAULT_N_SAMPLES: u32 = 20;
/// BatchNorm momentum (scvi-tools' `FCLayers`).
pub const BATCH_NORM_MOMENTUM: f64 = 0.01;
/// BatchNorm epsilon (scvi-tools' `FCLayers`).
pub const BATCH_NORM_EPS: f64 = 1e-3;
/// LayerNorm epsilon (PyTorch's default).
pub const LAYER_NORM_EPS: f64 = 1e-5;
/// Added to the variance heads (variational encoder and Gaussian decoder).
pub const VAR_EPS: f64 = 1e-4;
/// Added inside the logarithms of the likelihoods.
pub const LOG_EPS: f64 = 1e-8;

/// Likelihood of the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconLoss {
    /// Negative binomial with per-gene dispersion (the default).
    Nb,
    /// Zero-inflated negative binomial.
    Zinb,
    /// Gaussian with a learned per-cell, per-gene variance (for normalised, non-count data).
    Gauss,
}

impl ReconLoss {
    /// Whether the model sees counts (log1p input, library size from the cell).
    pub fn is_count(self) -> bool {
        matches!(self, ReconLoss::Nb | ReconLoss::Zinb)
    }
}

/// Dose-response function applied to each perturbation's dose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DoserType {
    /// `sigmoid(log1p(d) * beta + bias) - sigmoid(bias)` (the default).
    Logsigm,
    /// `sigmoid(d * beta + bias) - sigmoid(bias)`.
    Sigm,
    /// `d`.
    Linear,
    /// `sigmoid(MLP_k(d)) * [d > 0]`, one small MLP per perturbation.
    Mlp,
    /// Chosen from the data when a run starts and recorded as chosen: `logsigm` where a
    /// perturbation has training cells at two or more doses (a dose response to learn), `linear`
    /// where every perturbation has one dose (where the log-sigmoid's start only shrinks the
    /// embedding). The `unseen-covariates` preset's.
    Auto,
}

/// Normalisation of the hidden layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// BatchNorm1d (momentum 0.01, eps 1e-3).
    Batch,
    /// LayerNorm without affine parameters.
    Layer,
    /// No normalisation.
    None,
}

/// Loss of the adversarial classifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdvLoss {
    /// Cross-entropy (the default).
    Cce,
    /// Focal loss with `focal_gamma`.
    Focal,
}

/// How weight decay enters the Adam update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// Adam with L2 weight decay added to the gradient (`torch.optim.Adam`, the reference).
    Adam,
    /// Adam with decoupled weight decay (`torch.optim.AdamW`).
    Adamw,
}

/// When the learning rates decay by `lr_decay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Every `step_size_lr` epochs (after epochs e > 1 with e % step_size_lr == 0): the decay the
    /// reference's documentation describes.
    Epochs,
    /// What cpa-tools 0.8.8 does: its `StepLR(step_size = step_size_lr)` is stepped once after
    /// each such epoch, so the rate decays every `step_size_lr` of those steps, every
    /// `step_size_lr`² epochs (never within 100 epochs at `step_size_lr = 10`).
    Reference,
}

/// Where the count likelihoods' per-gene inverse dispersion (`log_theta`) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DispersionInit {
    /// Standard normal draws of log theta, the reference's (scvi-tools') start. Learnt at the
    /// autoencoder's rate, it moves by at most that rate a step: a run of a few hundred steps
    /// ends near its random start.
    #[default]
    Random,
    /// A method-of-moments estimate from a sample of the training cells, within their label
    /// groups and relative to each cell's library size; training goes on from there.
    Moments,
}

/// The validation score that early stopping and the best weights maximise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValidationScoreKind {
    /// `r2_mean + 0.5 r2_var` over all genes: the reference's, without its k-NN term.
    #[default]
    Reference,
    /// `r2_mean + r2_mean_deg`: all genes, plus the R2 of the means of each condition's top
    /// 20 genes by change from the validation controls (the genes a perturbation moves, which
    /// all-gene R2 barely sees). Falls back to `reference` without validation control cells.
    Degs,
    /// cpa-tools' own score, `r2_mean + 0.5 r2_var + exp(disnt_after - disnt_basal)`: the
    /// reference's plus its k-NN disentanglement term, which prefers weights whose basal latent
    /// no longer tells the conditions and covariates apart (cpa-tools' early stopping and best
    /// weights; what `cpa_stream.compat` trains with).
    #[serde(rename = "reference-knn")]
    ReferenceKnn,
}

/// Floating-point precision of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 everywhere.
    Fp32,
    /// Matrix products in bfloat16, weights, normalisation, likelihoods and optimizer in float32.
    Bf16,
}

/// The network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Width of the latent space.
    pub n_latent: usize,
    /// The likelihood of the data.
    pub recon_loss: ReconLoss,
    /// How doses scale a perturbation's embedding.
    pub doser_type: DoserType,
    /// Hidden width of the encoder.
    pub n_hidden_encoder: usize,
    /// Hidden layers of the encoder.
    pub n_layers_encoder: usize,
    /// Hidden width of the decoder.
    pub n_hidden_decoder: usize,
    /// Hidden layers of the decoder.
    pub n_layers_decoder: usize,
    /// Hidden width of the `mlp` dose response.
    pub n_hidden_doser: usize,
    /// Hidden layers of the `mlp` dose response.
    pub n_layers_doser: usize,
    /// Normalisation of the encoder's layers.
    pub norm_encoder: Norm,
    /// Normalisation of the decoder's layers.
    pub norm_decoder: Norm,
    /// Dropout of the encoder.
    pub dropout_rate_encoder: f64,
    /// Dropout of the decoder.
    pub dropout_rate_decoder: f64,
    /// Variational encoder (Gaussian posterior, KL to N(0, I)); deterministic by default.
    pub variational: bool,
    /// Most perturbations in one condition.
    pub max_comb_len: usize,
    /// Draws of `z_basal` averaged at prediction when `variational`.
    pub n_samples: u32,
    /// A linear map (no bias, zero at the start) from the perturbation latent straight to the
    /// decoder's output, beside the path through the decoder: the count model's log-scale
    /// proportions or the Gaussian mean move by `W z_pert`, the same shift in every covariate
    /// value and every cell. Off by default; a model without it has no such weights.
    pub perturbation_skip: bool,
    /// Where the count likelihoods' inverse dispersion starts (`nb`, `zinb`; `gauss` has none).
    pub dispersion_init: DispersionInit,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            n_latent: DEFAULT_N_LATENT,
            recon_loss: ReconLoss::Nb,
            doser_type: DoserType::Linear,
            n_hidden_encoder: DEFAULT_N_HIDDEN_ENCODER,
            n_layers_encoder: DEFAULT_N_LAYERS_ENCODER,
            n_hidden_decoder: DEFAULT_N_HIDDEN_DECODER,
            n_layers_decoder: DEFAULT_N_LAYERS_DECODER,
            n_hidden_doser: DEFAULT_N_HIDDEN_DOSER,
            n_layers_doser: DEFAULT_N_LAYERS_DOSER,
            norm_encoder: Norm::Batch,
            norm_decoder: Norm::Layer,
            dropout_rate_encoder: DEFAULT_DROPOUT,
            dropout_rate_decoder: DEFAULT_DROPOUT,
            variational: false,
            max_comb_len: DEFAULT_MAX_COMB_LEN,
            n_samples: DEFAULT_N_SAMPLES,
            perturbation_skip: false,
            dispersion_init: DispersionInit::Random,
        }
    }
}

/// The adversarial classifiers and their place in the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdversaryConfig {
    /// Hidden width of each classifier.
    pub n_hidden: usize,
    /// Hidden layers of each classifier.
    pub n_layers: usize,
    /// Normalisation of the classifiers' layers.
    pub norm: Norm,
    /// Dropout of the classifiers.
    pub dropout_rate: f64,
    /// The classifiers' loss.
    pub loss: AdvLoss,
    /// Focusing parameter of the focal loss.
    pub focal_gamma: f64,
    /// Weight of the adversarial term in the autoencoder's loss.
    pub reg_adv: f64,
    /// Weight of the adversaries' gradient penalty.
    pub pen_adv: f64,
    /// Batches with `index % adv_steps != 0` step the adversary only, the others the autoencoder
    /// only. 0 steps both on every batch (the reference's `adv_steps = None`).
    pub adv_steps: u32,
}

impl Default for AdversaryConfig {
    fn default() -> Self {
        AdversaryConfig {
            n_hidden: DEFAULT_N_HIDDEN_ADV,
            n_layers: DEFAULT_N_LAYERS_ADV,
            norm: Norm::Batch,
            dropout_rate: DEFAULT_DROPOUT_ADV,
            loss: AdvLoss::Cce,
            focal_gamma: DEFAULT_FOCAL_GAMMA,
            reg_adv: DEFAULT_REG_ADV,
            pen_adv: DEFAULT_PEN_ADV,
            adv_steps: DEFAULT_ADV_STEPS,
        }
    }
}

/// Optimisation and schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Adam with L2 weight decay, or decoupled (AdamW).
    pub optimizer: Optimizer,
    /// Learning rate of the autoencoder group.
    pub lr: f64,
    /// Weight decay of the autoencoder group.
    pub wd: f64,
    /// Learning rate of the dose-response group.
    pub doser_lr: f64,
    /// Weight decay of the dose-response group.
    pub doser_wd: f64,
    /// Learning rate of the adversary group.
    pub adv_lr: f64,
    /// Weight decay of the adversary group.
    pub adv_wd: f64,
    /// Adam's first-moment decay.
    pub adam_beta1: f64,
    /// Adam's second-moment decay.
    pub adam_beta2: f64,
    /// Adam's epsilon.
    pub adam_eps: f64,
    /// Epochs between learning-rate decays by `lr_decay` (0: no decay).
    pub step_size_lr: u32,
    /// How `step_size_lr` counts: `epochs`, or `reference` (cpa-tools' effective schedule).
    pub lr_schedule: LrSchedule,
    /// The learning-rate decay factor.
    pub lr_decay: f64,
    /// Clip each optimizer group's gradient norm to `gradient_clip_value`.
    pub do_clip_grad: bool,
    /// The gradient-norm limit of `do_clip_grad`.
    pub gradient_clip_value: f64,
    /// Epochs of autoencoder-only training before the adversarial term enters (0: none).
    pub n_epochs_pretrain_ae: u32,
    /// Epochs over which the KL weight rises from 0 to 1 (0: weight 1 from the start).
    pub n_epochs_kl_warmup: u32,
    /// Epochs, after pre-training, over which `reg_adv` rises from 0 (0: full weight at once).
    pub n_epochs_adv_warmup: u32,
    /// Epochs, after pre-training, over which the mixup alpha rises from 0 (0: full alpha at once).
    /// The reference zeroes alpha when pre-training is also set; this counts from its end instead.
    pub n_epochs_mixup_warmup: u32,
    /// Beta(alpha, alpha) mixup; 0 is off.
    pub mixup_alpha: f64,
    /// Cells per device batch; 0, the default, lets `train` choose from the planned training
    /// ([`TrainingConfig::batch_size_for`]); the choice is saved with the run.
    pub batch_size: usize,
    /// Device batches whose gradients are summed before each optimizer step (effective batch =
    /// `batch_size * accumulate_batches`).
    pub accumulate_batches: usize,
    /// Consecutive cells of the store that the loader's in-buffer shuffle keeps together (block
    /// sampling). 1 shuffles single cells; k > 1 makes each batch about `batch_size / k` runs of
    /// store neighbours: fewer scattered reads, but on a store sorted by condition or sample,
    /// batches less mixed than the reference's. 0, the default, lets `train` choose from the
    /// store's order: runs of 8 when the training cells lie in random order of their labels,
    /// single cells otherwise; the choice is saved with the run.
    pub shuffle_run_cells: usize,
    /// Epochs to train; 0 takes the reference's rule `min(round(20000 / cells * 400), 400)`.
    pub max_epochs: u32,
    /// Validation every this many epochs (and after the last).
    pub check_val_every_n_epoch: u32,
    /// Validations without improvement before training stops.
    pub early_stopping_patience: u32,
    /// The score of the validations: `reference`, `degs` or `reference-knn`
    /// ([`ValidationScoreKind`]).
    pub validation_score: ValidationScoreKind,
    /// Decay of an exponential moving average of the autoencoder's and dosers' weights, updated
    /// after every optimizer step (0: off, the reference's behaviour). When on, validation, the
    /// best and the final model use the averaged weights; the checkpoint keeps both. Absent from
    /// a model file, 0: models written before the key existed were trained without.
    #[serde(default)]
    pub ema_decay: f64,
    /// Arithmetic of the matrix products.
    pub precision: Precision,
    /// Steps between reads of the device-side running metrics.
    pub metrics_every_n_steps: u32,
    /// Seed of the initialisation, the shuffles and the model's random draws.
    pub seed: u64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            optimizer: Optimizer::Adam,
            lr: DEFAULT_LR,
            wd: DEFAULT_WD,
            doser_lr: DEFAULT_DOSER_LR,
            doser_wd: DEFAULT_DOSER_WD,
            adv_lr: DEFAULT_ADV_LR,
            adv_wd: DEFAULT_ADV_WD,
            adam_beta1: DEFAULT_ADAM_BETAS.0,
            adam_beta2: DEFAULT_ADAM_BETAS.1,
            adam_eps: DEFAULT_ADAM_EPS,
            step_size_lr: DEFAULT_STEP_SIZE_LR,
            lr_schedule: LrSchedule::Epochs,
            lr_decay: DEFAULT_LR_DECAY,
            do_clip_grad: true,
            gradient_clip_value: DEFAULT_GRADIENT_CLIP,
            n_epochs_pretrain_ae: DEFAULT_PRETRAIN_AE_EPOCHS,
            n_epochs_kl_warmup: 0,
            n_epochs_adv_warmup: DEFAULT_ADV_WARMUP_EPOCHS,
            n_epochs_mixup_warmup: 0,
            mixup_alpha: 0.0,
            batch_size: 0,
            accumulate_batches: 1,
            shuffle_run_cells: 0,
            max_epochs: 0,
            check_val_every_n_epoch: DEFAULT_CHECK_VAL_EVERY,
            early_stopping_patience: DEFAULT_EARLY_STOPPING_PATIENCE,
            validation_score: ValidationScoreKind::Reference,
            ema_decay: DEFAULT_EMA_DECAY,
            precision: Precision::Fp32,
            metrics_every_n_steps: DEFAULT_METRICS_EVERY,
            seed: 0,
        }
    }
}

impl TrainingConfig {
    /// The batch size of a run on `cells` training cells for `epochs` epochs: `batch_size`, or
    /// when it is 0 [`DEFAULT_BATCH_SIZE`], halved to [`SHORT_BATCH_SIZE`] when that would make
    /// fewer than [`SHORT_TRAINING_STEPS`] optimizer steps. Chosen by the validation protocol
    /// (docs/fidelity.md): short training on small data (10 epochs of a few thousand cells) gains
    /// on every data set from the steps of the smaller batch, longer training does not.
    pub fn batch_size_for(&self, cells: u64, epochs: u32) -> usize {
        if self.batch_size > 0 {
            return self.batch_size;
        }
        let steps =
            cells.div_ceil(DEFAULT_BATCH_SIZE as u64) * u64::from(epochs) / self.accumulate_batches.max(1) as u64;
        if steps < SHORT_TRAINING_STEPS { SHORT_BATCH_SIZE } else { DEFAULT_BATCH_SIZE }
    }

    /// The epochs to train on `cells` training cells: `max_epochs`, or the reference's rule.
    pub fn epochs_for(&self, cells: u64) -> u32 {
        if self.max_epochs > 0 {
            return self.max_epochs;
        }
        let auto = (20_000.0 / cells.max(1) as f64 * 400.0).round();
        (auto as u32).clamp(1, DEFAULT_MAX_EPOCHS_CAP)
    }
}

/// A named starting point of the configuration (`train --preset`); a configuration file or
/// inline tables then change only the keys they set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// This project's defaults ([`CpaConfig::default`]).
    #[default]
    Default,
    /// cpa-tools 0.8.8's behaviour where the defaults differ from it: its module defaults (the
    /// network, the adversary, the optimiser, no clipping, no warm-ups; [`reference`]), its
    /// learning-rate schedule (`lr_schedule = "reference"`) and no averaging of the weights
    /// (`ema_decay = 0`). For reproducing the reference's numbers (`cpa_stream.compat` starts
    /// from it); `docs/fidelity.md` measures what each difference does.
    Reference,
    /// The defaults plus the perturbation's path straight to the output (`perturbation_skip`), a
    /// latent space of 128 (`n_latent`) and the dose response chosen from the data (`doser_type =
    /// "auto"`: log-sigmoid with several doses, linear with one), for covariate values (cell
    /// types, lines, donors) whose perturbed cells training never saw. The skip and the latent
    /// chosen on real PBMCs (Kang et al. 2018, IFN-beta, one dose; CD14 monocytes and CD4 naive T
    /// cells held out) and confirmed on four other held-out cell types of them; the dose response
    /// on the synthetic drug x dose atlases (`docs/fidelity.md`, "Unseen cell types with several
    /// doses"). Until 2026-11-26 it set mixup and a log-sigmoid dose response for every data set,
    /// which cost on real PBMCs.
    #[serde(rename = "unseen-covariates")]
    UnseenCovariates,
}

impl std::str::FromStr for Preset {
    type Err = Error;

    /// The preset named `name`.
    fn from_str(name: &str) -> Result<Preset> {
        match name {
            "default" => Ok(Preset::Default),
            "reference" => Ok(Preset::Reference),
            "unseen-covariates" => Ok(Preset::UnseenCovariates),
            other => Err(Error::InvalidInput(format!(
                "preset {other:?} is not one of {}",
                Preset::NAMES.map(|n| format!("{n:?}")).join(", ")
            ))),
        }
    }
}

impl Preset {
    /// The names a preset goes by.
    pub const NAMES: [&'static str; 3] = ["default", "reference", "unseen-covariates"];

    /// The preset's name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Default => "default",
            Preset::Reference => "reference",
            Preset::UnseenCovariates => "unseen-covariates",
        }
    }

    /// The configuration the preset starts from.
    pub fn config(self) -> CpaConfig {
        let mut config = CpaConfig::default();
        if self == Preset::Reference {
            let (m, a, t) = (&mut config.model, &mut config.adversary, &mut config.training);
            m.n_latent = reference::N_LATENT;
            m.doser_type = DoserType::Logsigm;
            (m.n_hidden_encoder, m.n_layers_encoder) = (reference::N_HIDDEN, reference::N_LAYERS);
            (m.n_hidden_decoder, m.n_layers_decoder) = (reference::N_HIDDEN, reference::N_LAYERS);
            m.norm_decoder = Norm::Batch;
            a.dropout_rate = reference::DROPOUT_ADV;
            (a.reg_adv, a.pen_adv, a.adv_steps) = (reference::REG_ADV, reference::PEN_ADV, reference::ADV_STEPS);
            (t.lr, t.wd, t.step_size_lr) = (reference::LR, reference::WD, reference::STEP_SIZE_LR);
            (t.do_clip_grad, t.gradient_clip_value) = (false, reference::GRADIENT_CLIP);
            (t.n_epochs_pretrain_ae, t.n_epochs_adv_warmup) = (0, 0);
            t.lr_schedule = LrSchedule::Reference;
            t.ema_decay = 0.0;
            t.batch_size = DEFAULT_BATCH_SIZE;
        }
        if self == Preset::UnseenCovariates {
            config.model.perturbation_skip = true;
            config.model.n_latent = UNSEEN_N_LATENT;
            config.model.doser_type = DoserType::Auto;
        }
        config
    }
}

/// The whole configuration: `[model]`, `[adversary]` and `[training]` tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpaConfig {
    /// `[model]`: the network.
    pub model: ModelConfig,
    /// `[adversary]`: the adversarial classifiers.
    pub adversary: AdversaryConfig,
    /// `[training]`: optimisation and schedule.
    pub training: TrainingConfig,
}

/// Largest configuration file read, in bytes.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

impl CpaConfig {
    /// Parses and validates TOML text; the keys it does not set keep their defaults. `origin`
    /// names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<CpaConfig> {
        CpaConfig::from_toml_over(&CpaConfig::default(), text, origin)
    }

    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<CpaConfig> {
        let text = crate::regular::read_text(path, "a model configuration (TOML)", MAX_CONFIG_BYTES)?;
        CpaConfig::from_toml(&text, &path.display().to_string())
    }

    /// TOML text over `base`: the keys the text sets replace `base`'s, the others stay.
    pub fn from_toml_over(base: &CpaConfig, text: &str, origin: &str) -> Result<CpaConfig> {
        let invalid =
            |e: &dyn std::fmt::Display| Error::InvalidInput(format!("{origin}: {}", e.to_string().trim_end()));
        // Parsed once as a whole configuration for its errors (unknown keys, types, with lines).
        toml::from_str::<CpaConfig>(text).map_err(|e| invalid(&e))?;
        let given: toml::Table = toml::from_str(text).map_err(|e| invalid(&e))?;
        let mut merged = toml::Table::try_from(base).map_err(|e| invalid(&e))?;
        for (table, keys) in given {
            match (merged.get_mut(&table), keys) {
                (Some(toml::Value::Table(into)), toml::Value::Table(keys)) => into.extend(keys),
                (_, keys) => {
                    merged.insert(table, keys);
                }
            }
        }
        let config: CpaConfig = merged.try_into().map_err(|e: toml::de::Error| invalid(&e))?;
        config.validate().map_err(|reason| Error::InvalidInput(format!("{origin}: {reason}")))?;
        Ok(config)
    }

    /// A TOML file over `base` (see [`from_toml_over`](Self::from_toml_over)).
    pub fn from_file_over(base: &CpaConfig, path: &Path) -> Result<CpaConfig> {
        let text = crate::regular::read_text(path, "a model configuration (TOML)", MAX_CONFIG_BYTES)?;
        CpaConfig::from_toml_over(base, &text, &path.display().to_string())
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::InvalidInput(format!("configuration to TOML: {e}")))
    }

    /// Checks ranges and combinations; the message names the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (m, a, t) = (&self.model, &self.adversary, &self.training);
        // Sizes from 1 to a bound far past any real model, so that a typo (`1e8` hidden units)
        // is an error naming the key, not an allocation that aborts the process.
        const WIDTH: usize = 1 << 16;
        const LAYERS: usize = 64;
        let sizes = [
            ("model.n_latent", m.n_latent, WIDTH),
            ("model.n_hidden_encoder", m.n_hidden_encoder, WIDTH),
            ("model.n_hidden_decoder", m.n_hidden_decoder, WIDTH),
            ("model.n_layers_encoder", m.n_layers_encoder, LAYERS),
            ("model.n_layers_decoder", m.n_layers_decoder, LAYERS),
            ("model.n_hidden_doser", m.n_hidden_doser, WIDTH),
            ("model.n_layers_doser", m.n_layers_doser, LAYERS),
            ("model.max_comb_len", m.max_comb_len, 64),
            ("adversary.n_hidden", a.n_hidden, WIDTH),
            ("adversary.n_layers", a.n_layers, LAYERS),
            ("training.accumulate_batches", t.accumulate_batches, 1 << 16),
        ];
        for (key, value, max) in sizes {
            if value == 0 || value > max {
                return Err(format!("{key} is {value}, expected a whole number from 1 to {max}"));
            }
        }
        if t.batch_size > 1 << 20 {
            return Err(format!(
                "training.batch_size is {}, expected a whole number from 1 to {} (or 0: chosen by train)",
                t.batch_size,
                1 << 20
            ));
        }
        let batch_norm = [
            ("model.norm_encoder", m.norm_encoder),
            ("model.norm_decoder", m.norm_decoder),
            ("adversary.norm", a.norm),
        ]
        .into_iter()
        .find(|&(_, norm)| norm == Norm::Batch);
        if let (1, Some((key, _))) = (t.batch_size, batch_norm) {
            return Err(format!(
                "training.batch_size is 1 with {key} = \"batch\": batch normalisation cannot train on one cell \
                 (its variance is 0/0 and the model turns to NaN); use a batch of 2 or more, or \"layer\" \
                 normalisation"
            ));
        }
        if m.dispersion_init == DispersionInit::Moments && !m.recon_loss.is_count() {
            return Err("model.dispersion_init is \"moments\" with model.recon_loss = \"gauss\", which has no \
                        dispersion; it is for \"nb\" or \"zinb\""
                .to_owned());
        }
        for (key, value) in [
            ("model.dropout_rate_encoder", m.dropout_rate_encoder),
            ("model.dropout_rate_decoder", m.dropout_rate_decoder),
            ("adversary.dropout_rate", a.dropout_rate),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(format!("{key} is {value}, expected a probability in [0, 1)"));
            }
        }
        let non_negative = [
            ("adversary.reg_adv", a.reg_adv),
            ("adversary.pen_adv", a.pen_adv),
            ("adversary.focal_gamma", a.focal_gamma),
            ("training.wd", t.wd),
            ("training.doser_wd", t.doser_wd),
            ("training.adv_wd", t.adv_wd),
            ("training.mixup_alpha", t.mixup_alpha),
        ];
        for (key, value) in non_negative {
            if !value.is_finite() || value < 0.0 {
                return Err(format!("{key} is {value}, expected a finite number >= 0"));
            }
        }
        let strictly_positive = [
            ("training.lr", t.lr),
            ("training.doser_lr", t.doser_lr),
            ("training.adv_lr", t.adv_lr),
            ("training.adam_eps", t.adam_eps),
            ("training.lr_decay", t.lr_decay),
            ("training.gradient_clip_value", t.gradient_clip_value),
        ];
        for (key, value) in strictly_positive {
            if !value.is_finite() || value <= 0.0 {
                return Err(format!("{key} is {value}, expected a finite number > 0"));
            }
        }
        for (key, value) in [
            ("training.adam_beta1", t.adam_beta1),
            ("training.adam_beta2", t.adam_beta2),
            ("training.ema_decay", t.ema_decay),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(format!("{key} is {value}, expected a number in [0, 1)"));
            }
        }
        if m.n_samples == 0 {
            return Err("model.n_samples must be at least 1".to_owned());
        }
        if t.metrics_every_n_steps == 0 {
            return Err("training.metrics_every_n_steps must be at least 1".to_owned());
        }
        if t.check_val_every_n_epoch == 0 {
            return Err("training.check_val_every_n_epoch must be at least 1".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() -> Result<()> {
        let config = CpaConfig::default();
        let text = config.to_toml()?;
        assert_eq!(CpaConfig::from_toml(&text, "round trip")?, config);
        Ok(())
    }

    #[test]
    fn the_example_file_is_the_defaults() -> Result<()> {
        let path = std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")), std::path::PathBuf::from)
            .join("../examples/cpa.toml");
        assert_eq!(CpaConfig::from_file(&path)?, CpaConfig::default());
        Ok(())
    }

    #[test]
    fn model_files_without_the_average_key_were_trained_without() -> std::result::Result<(), serde_json::Error> {
        let mut value = serde_json::to_value(CpaConfig::default())?;
        if let Some(training) = value.get_mut("training").and_then(serde_json::Value::as_object_mut) {
            training.remove("ema_decay");
        }
        let config: CpaConfig = serde_json::from_value(value)?;
        assert_eq!(config.training.ema_decay, 0.0);
        assert_eq!(CpaConfig::default().training.ema_decay, DEFAULT_EMA_DECAY);
        assert_eq!(Preset::Reference.config().training.ema_decay, 0.0);
        Ok(())
    }

    #[test]
    fn partial_files_take_defaults_and_unknown_keys_fail() -> Result<()> {
        let config = CpaConfig::from_toml("[model]\nrecon_loss = \"zinb\"\n[training]\nlr = 1e-3\n", "t")?;
        assert_eq!(config.model.recon_loss, ReconLoss::Zinb);
        assert_eq!(config.training.lr, 1e-3);
        assert_eq!(config.model.n_latent, DEFAULT_N_LATENT);
        let err = CpaConfig::from_toml("[model]\nn_latnet = 3\n", "cpa.toml").err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.starts_with("cpa.toml: ") && err.contains("n_latnet"), "{err}");
        let err = CpaConfig::from_toml("[adversary]\ndropout_rate = 1.5\n", "c.toml").err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("c.toml: adversary.dropout_rate is 1.5, expected a probability in [0, 1)"));
        for bad in ["1.0", "-0.5"] {
            let err = CpaConfig::from_toml(&format!("[training]\nema_decay = {bad}\n"), "c.toml").err();
            let err = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("training.ema_decay") && err.contains("[0, 1)"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn a_file_over_a_preset_changes_only_its_keys() -> Result<()> {
        let base = "reference".parse::<Preset>()?.config();
        assert_eq!(base.training.lr_schedule, LrSchedule::Reference);
        let config = CpaConfig::from_toml_over(&base, "[training]\nlr = 1e-3\n[model]\nn_latent = 8\n", "t")?;
        assert_eq!((config.training.lr, config.model.n_latent), (1e-3, 8));
        assert_eq!(config.training.lr_schedule, LrSchedule::Reference);
        assert_eq!(config.training.wd, reference::WD);
        let err = CpaConfig::from_toml_over(&base, "[training]\nlr_shedule = 3\n", "c.toml").err();
        assert!(err.is_some_and(|e| e.to_string().contains("lr_shedule")));
        let err = "paper".parse::<Preset>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("\"default\", \"reference\", \"unseen-covariates\""), "{err}");
        Ok(())
    }

    #[test]
    fn the_unseen_covariates_preset_is_the_defaults_with_the_skip_a_wider_latent_and_the_data_s_doser() -> Result<()> {
        let preset = "unseen-covariates".parse::<Preset>()?;
        assert_eq!(preset.name(), "unseen-covariates");
        let mut u = preset.config();
        assert!(u.model.perturbation_skip);
        assert_eq!((u.model.n_latent, u.model.doser_type), (128, DoserType::Auto));
        // Nothing else differs from the defaults.
        (u.model.perturbation_skip, u.model.n_latent, u.model.doser_type) =
            (false, DEFAULT_N_LATENT, DoserType::Linear);
        assert_eq!(u, CpaConfig::default());
        // A run's config.toml records the skip, and one written before it existed reads as off.
        let written = toml::to_string(&preset.config()).expect("toml");
        assert!(written.contains("perturbation_skip = true"), "{written}");
        let old = CpaConfig::from_toml("[model]\nn_latent = 8\n", "old.toml")?;
        assert!(!old.model.perturbation_skip);
        Ok(())
    }

    #[test]
    fn the_reference_preset_is_cpa_tools_module_defaults() {
        let r = Preset::Reference.config();
        let (m, a, t) = (&r.model, &r.adversary, &r.training);
        assert_eq!((m.n_latent, m.n_hidden_encoder, m.n_layers_encoder), (128, 256, 3));
        assert_eq!((m.n_hidden_decoder, m.n_layers_decoder, m.norm_decoder), (256, 3, Norm::Batch));
        assert_eq!(m.doser_type, DoserType::Logsigm);
        assert_eq!((a.dropout_rate, a.reg_adv, a.pen_adv, a.adv_steps), (0.1, 1.0, 1.0, 3));
        assert_eq!((t.lr, t.wd, t.step_size_lr, t.do_clip_grad), (5e-4, 1e-6, 45, false));
        assert_eq!((t.n_epochs_pretrain_ae, t.n_epochs_adv_warmup, t.ema_decay), (0, 0, 0.0));
        assert_eq!(t.batch_size, 128);
        // The defaults: the tutorial's settings, as the protocol chose them.
        let d = CpaConfig::default();
        assert_eq!((d.model.n_latent, d.model.n_hidden_decoder, d.model.norm_decoder), (64, 512, Norm::Layer));
        assert_eq!((d.adversary.reg_adv, d.training.lr, d.training.n_epochs_adv_warmup), (20.0, 3e-4, 5));
    }

    #[test]
    fn short_training_gets_the_smaller_batch() {
        let t = TrainingConfig::default();
        assert_eq!(t.batch_size, 0, "chosen by train");
        // 2,066 cells (the bundled McFaline half's training cells): 17 batches of 128 an epoch.
        assert_eq!(t.batch_size_for(2_066, 10), SHORT_BATCH_SIZE, "170 steps");
        assert_eq!(t.batch_size_for(2_066, 29), SHORT_BATCH_SIZE, "493 steps");
        assert_eq!(t.batch_size_for(2_066, 30), DEFAULT_BATCH_SIZE, "510 steps");
        assert_eq!(t.batch_size_for(40_000, 10), DEFAULT_BATCH_SIZE, "3,130 steps");
        // Accumulated batches make fewer optimizer steps.
        let accumulated = TrainingConfig { accumulate_batches: 2, ..TrainingConfig::default() };
        assert_eq!(accumulated.batch_size_for(2_066, 30), SHORT_BATCH_SIZE, "255 steps");
        // A batch size given is kept.
        let given = TrainingConfig { batch_size: 128, ..TrainingConfig::default() };
        assert_eq!(given.batch_size_for(2_066, 10), 128);
        let mut config = CpaConfig::default();
        config.training.batch_size = (1 << 20) + 1;
        assert!(config.validate().is_err_and(|e| e.contains("training.batch_size")));
        // One cell a batch: an error with batch normalisation anywhere, allowed without.
        config.training.batch_size = 1;
        assert!(config.validate().is_err_and(|e| e.contains("model.norm_encoder") && e.contains("batch of 2")));
        (config.model.norm_encoder, config.model.norm_decoder, config.adversary.norm) =
            (Norm::Layer, Norm::Layer, Norm::Layer);
        assert_eq!(config.validate(), Ok(()));
        // A dispersion's start for a likelihood without one: an error naming both keys.
        (config.model.dispersion_init, config.model.recon_loss) = (DispersionInit::Moments, ReconLoss::Gauss);
        assert!(config.validate().is_err_and(|e| e.contains("model.dispersion_init") && e.contains("gauss")));
        config.model.recon_loss = ReconLoss::Zinb;
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn automatic_epochs_follow_the_reference_rule() {
        let t = TrainingConfig::default();
        assert_eq!(t.epochs_for(20_000), 400);
        assert_eq!(t.epochs_for(100_000), 80);
        assert_eq!(t.epochs_for(1_000), 400);
        assert_eq!(t.epochs_for(100_000_000), 1);
        let fixed = TrainingConfig { max_epochs: 7, ..TrainingConfig::default() };
        assert_eq!(fixed.epochs_for(10), 7);
    }
}
