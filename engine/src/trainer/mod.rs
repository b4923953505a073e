//! Training CPA: the schedule (pre-training, `adv_steps`, warm-ups, mixup, step decay), the
//! three optimizer groups, gradient accumulation and clipping, device-side metrics, and
//! checkpoints that resume exactly.
//!
//! The trainer owns the model and is driven one device batch at a time: [`Trainer::step`] for
//! each batch of an epoch, then [`Trainer::end_epoch`]. Randomness (dropout, sampling, mixup) is
//! reseeded from `(seed, epoch)` at the start of each epoch, so a run resumed from the checkpoint
//! of epoch k continues exactly as the uninterrupted run would (on the CPU; CUDA kernels such as
//! `embedding_bag`'s backward are not deterministic). A checkpoint taken within an epoch (after
//! an interruption) also keeps the epoch's position, running sums and random stream; the caller
//! resumes it by feeding the epoch's batches from [`Trainer::batches_in_epoch`] on.

mod average;
mod fused;
mod losses;
mod metrics;
pub mod optim;
mod ranks;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::collective::Collective;

use crate::model::batch::{DeviceBatch, HostBatch};
use crate::model::config::{AdvLoss, CpaConfig, LrSchedule};
use crate::model::files::{load_model, publish_dir, write_model_files};
use crate::model::layers::{Noise, seeded};
use crate::model::likelihood::Entries;
use crate::model::network::{CpaModel, GROUP_ADV, GROUP_AE, GROUP_DOSER, Generative};
use crate::torch::TorchResult;
use average::Averaged;
use cpa_stream_stages::{Error, Result};
pub use losses::{classification_loss, gradient_penalty};
use losses::{kl_standard_normal, mixed_loss};
pub use metrics::{EpochMetrics, HeadMetrics};
use metrics::{HeadTensors, Heads, Sums, batch_r2, category_codes};
use optim::{AdamGroup, AdamSettings};
use ranks::{splice, whole_perts};

/// Optimizer moments of a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Schedule position and seeds of a checkpoint.
pub const STATE_FILE: &str = "trainer.json";

const STREAM_EPOCH: u64 = 21;

/// Where training stands; saved with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: u32,
    /// Optimizer steps (effective batches) taken.
    pub global_step: u64,
    /// Training cells stepped over.
    pub cells_seen: u64,
    /// The run's seed.
    pub seed: u64,
    /// Steps taken by each optimizer group (`ae`, `doser`, `adv`), for Adam's bias correction.
    pub group_steps: Vec<u64>,
    /// Early stopping: best validation score so far, its epoch, and validations since.
    pub best_score: Option<f64>,
    /// The epoch of the best score.
    pub best_epoch: Option<u32>,
    /// Validations since the best score.
    pub validations_without_improvement: u32,
    /// Where the current epoch stands, for a checkpoint taken within it; `None` between epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_epoch: Option<EpochPosition>,
    /// The processes of data-parallel training (absent: one), recorded so that a resume at
    /// another world size can say that it does not continue exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u32>,
}

/// What a validation score did ([`Trainer::record_validation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlyStopping {
    /// The score is the best so far: keep these weights.
    pub improved: bool,
    /// Validations without improvement reached the patience: stop training.
    pub stop: bool,
}

/// The part of an epoch already trained when a checkpoint was taken within it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochPosition {
    /// Batches of the epoch trained (the next batch to train is this one of the epoch's plan).
    pub batches: u64,
    /// Optimizer steps of the epoch (the adversary / autoencoder alternation counts them).
    pub steps: u64,
    /// Running loss sums and their counts (autoencoder batches, adversary batches, cells).
    pub sums: Vec<f32>,
    /// Counts behind the sums: autoencoder batches, adversary batches, cells.
    pub counts: (u64, u64, u64),
    /// The random stream of dropout, sampling and mixup.
    pub noise: rand_xoshiro::Xoshiro256PlusPlus,
    /// Wall seconds spent training in the epoch so far (0 in checkpoints written before it was
    /// recorded).
    #[serde(default)]
    pub seconds: f64,
}

/// What a batch trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before `n_epochs_pretrain_ae`: the autoencoder without the adversarial term, and the
    /// adversary on the detached basal state.
    Pretrain,
    /// `adv_steps = 0`: the autoencoder (with the adversarial term) and then the adversary.
    Both,
    /// The adversary only.
    Adversary,
    /// The autoencoder and dosers only.
    Autoencoder,
}

struct Pending {
    micro: usize,
    ae: Option<Vec<Option<Tensor>>>,
    adv: Option<Vec<Option<Tensor>>>,
}

/// The outputs of the adversaries on one basal state.
struct AdversaryOut {
    loss: Tensor,
    penalty: Option<Tensor>,
    heads: Heads,
}

/// Trains a [`CpaModel`].
pub struct Trainer {
    model: CpaModel,
    /// `ae`, `doser`, `adv`.
    groups: [AdamGroup; 3],
    noise: Noise,
    state: TrainState,
    in_epoch: bool,
    /// Optimizer steps of this epoch.
    batch_in_epoch: u64,
    /// Batches of this epoch given to [`step`](Trainer::step) (several per optimizer step when
    /// gradients accumulate).
    batches_in_epoch: u64,
    pending: Pending,
    /// The running sums ([`Sums`] says what each holds).
    sums: Tensor,
    layout: Sums,
    /// Sizes of the condition and covariate vocabularies (the training R2's categories).
    radices: Vec<i64>,
    /// The first batch of the epoch with a non-finite loss ([`NO_BAD_BATCH`] if none), kept on
    /// the device so that checking costs no synchronisation per batch.
    first_nonfinite: Tensor,
    counts: (u64, u64, u64),
    /// Wall seconds of this epoch before this trainer took it over from a checkpoint, and the
    /// clock of its own part (from its first batch).
    epoch_seconds_before: f64,
    epoch_clock: Option<std::time::Instant>,
    /// The moving average of the weights, when `training.ema_decay` is set.
    average: Option<Averaged>,
    /// The process group of data-parallel training ([`Trainer::join`]); `None` trains alone.
    collective: Option<Arc<Collective>>,
    /// Cells of the last batch stepped, every rank's.
    last_batch_cells: u64,
}

/// [`Trainer::first_nonfinite`] while every loss of the epoch is finite.
const NO_BAD_BATCH: f64 = 1e300;

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("model", &self.model).field("state", &self.state).finish_non_exhaustive()
    }
}

fn settings(config: &CpaConfig, lr: f64, wd: f64) -> AdamSettings {
    let t = &config.training;
    AdamSettings { lr, weight_decay: wd, beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_eps, kind: t.optimizer }
}

impl Trainer {
    /// A trainer for a fresh (or loaded) model, at epoch 0, seeded by the configuration's seed.
    pub fn new(model: CpaModel) -> Result<Trainer> {
        let config = model.config().clone();
        let t = &config.training;
        let groups = [
            AdamGroup::new(GROUP_AE, model.group_variables(GROUP_AE), settings(&config, t.lr, t.wd))?,
            AdamGroup::new(GROUP_DOSER, model.group_variables(GROUP_DOSER), settings(&config, t.doser_lr, t.doser_wd))?,
            AdamGroup::new(GROUP_ADV, model.group_variables(GROUP_ADV), settings(&config, t.adv_lr, t.adv_wd))?,
        ];
        let device = model.device();
        let state = TrainState {
            epoch: 0,
            global_step: 0,
            cells_seen: 0,
            seed: t.seed,
            group_steps: vec![0; 3],
            best_score: None,
            best_epoch: None,
            validations_without_improvement: 0,
            within_epoch: None,
            world_size: None,
        };
        let vocab = model.vocabulary();
        let layout = Sums::new(vocab.covariates.len());
        let sums = Tensor::f_zeros([layout.slots() as i64], (Kind::Float, device)).torch()?;
        // The categories of the training R2: condition and covariates, as many of the covariates
        // as their combinations fit an int64 (all, in any model seen).
        let mut span: i64 = 1;
        let radices = std::iter::once(vocab.conditions.len())
            .chain(vocab.covariates.iter().map(|c| c.categories.len()))
            .map(|n| i64::try_from(n).unwrap_or(i64::MAX).max(1))
            .take_while(|n| span.checked_mul(*n).map(|s| span = s).is_some())
            .collect();
        let average = if t.ema_decay > 0.0 {
            let (names, live): (Vec<String>, Vec<Tensor>) =
                [GROUP_AE, GROUP_DOSER].iter().flat_map(|g| model.group_variables(g)).unzip();
            Some(Averaged::new(t.ema_decay, names, live)?)
        } else {
            None
        };
        Ok(Trainer {
            noise: Noise::new(seeded(t.seed, STREAM_EPOCH, 0), device),
            model,
            groups,
            state,
            in_epoch: false,
            batch_in_epoch: 0,
            batches_in_epoch: 0,
            pending: Pending { micro: 0, ae: None, adv: None },
            sums,
            layout,
            radices,
            first_nonfinite: Tensor::f_full([], NO_BAD_BATCH, (Kind::Double, device)).torch()?,
            counts: (0, 0, 0),
            epoch_seconds_before: 0.0,
            epoch_clock: None,
            average,
            collective: None,
            last_batch_cells: 0,
        })
    }

    /// Trains as one rank of data-parallel training, as one process would train on the whole
    /// batches: every rank starts from rank 0's weights and buffers and
    /// [`step`](Trainer::step)s its share of every batch (at least one cell); batch
    /// normalisation takes its statistics over every rank's cells; every rank draws the whole
    /// batch's dropout and mixup from the same stream and keeps its own cells'; the adversaries
    /// see the whole batch's basal latents on every rank; each optimizer step sums the ranks'
    /// gradients of their shares of the whole batch's loss. The running losses are summed over
    /// the ranks. Checkpoints are taken between epochs only.
    pub fn join(&mut self, collective: Collective) -> Result<()> {
        let mut variables: Vec<(String, Tensor)> = self.model.var_store().variables().into_iter().collect();
        // Every rank in the same order.
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tensors: Vec<Tensor> = variables.into_iter().map(|(_, t)| t).collect();
        if let Some(average) = &self.average {
            tensors.extend(average.shadows().iter().map(Tensor::shallow_clone));
        }
        collective.broadcast_all(&tensors)?;
        self.state.world_size = Some(u32::try_from(collective.world()).unwrap_or(u32::MAX));
        self.collective = Some(Arc::new(collective));
        Ok(())
    }

    /// Cells of the last batch [`step`](Trainer::step)ped: in data-parallel training the whole
    /// batch's, every rank's share (what the run's progress and throughput count).
    pub fn last_batch_cells(&self) -> u64 {
        self.last_batch_cells
    }

    /// The process group this trainer is a rank of.
    pub fn collective(&self) -> Option<&Collective> {
        self.collective.as_deref()
    }

    /// A fresh model from a configuration and vocabulary, initialised from the configuration's seed.
    pub fn from_config(config: &CpaConfig, vocab: &crate::model::vocab::Vocabulary, device: Device) -> Result<Trainer> {
        Trainer::new(CpaModel::new(config, vocab, None, device, config.training.seed)?)
    }

    /// The model.
    pub fn model(&self) -> &CpaModel {
        &self.model
    }

    /// The model, giving up the trainer.
    pub fn into_model(self) -> CpaModel {
        self.model
    }

    /// Runs `f` on the model with the weights it is validated and published with: the moving
    /// average of the weights when `training.ema_decay` is set (put in place for `f` and taken
    /// out after it, whatever `f` returns), else the weights as trained. An error here is one of
    /// moving the weights; `f`'s own result is returned as it is.
    pub fn with_published_weights<T>(&mut self, f: impl FnOnce(&CpaModel) -> T) -> Result<T> {
        let Some(average) = self.average.as_mut() else { return Ok(f(&self.model)) };
        average.swap()?;
        let value = f(&self.model);
        self.average.as_mut().map_or(Ok(()), Averaged::swap)?;
        Ok(value)
    }

    /// Where training stands.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// The state, to change by hand (tests, tools); training changes it itself.
    pub fn state_mut(&mut self) -> &mut TrainState {
        &mut self.state
    }

    /// Records the validation score of the epoch that just ended (call after
    /// [`end_epoch`](Self::end_epoch)) for early stopping: a score above the best so far becomes
    /// the best, with that epoch; any other adds one to the validations without improvement.
    /// The run should stop once those reach `patience`.
    pub fn record_validation(&mut self, score: f64, patience: u32) -> EarlyStopping {
        let state = &mut self.state;
        let improved = state.best_score.is_none_or(|best| score > best);
        if improved {
            state.best_score = Some(score);
            state.best_epoch = Some(state.epoch.saturating_sub(1));
            state.validations_without_improvement = 0;
        } else {
            state.validations_without_improvement += 1;
        }
        EarlyStopping { improved, stop: state.validations_without_improvement >= patience }
    }

    fn config(&self) -> &CpaConfig {
        self.model.config()
    }

    /// Batches of the current epoch trained so far (0 between epochs). A trainer resumed from a
    /// checkpoint taken within an epoch continues with this batch of the epoch's plan.
    pub fn batches_in_epoch(&self) -> u64 {
        self.batches_in_epoch
    }

    /// Wall seconds the current epoch had been trained for before this trainer resumed it from a
    /// checkpoint taken within it (0 otherwise): the time of an epoch split by an interruption
    /// is this plus the time after the resume.
    pub fn epoch_seconds_before_resume(&self) -> f64 {
        self.epoch_seconds_before
    }

    /// Whether a checkpoint can be taken now: between epochs, or within one after an optimizer
    /// step (not while gradients of a step are still being accumulated).
    pub fn can_checkpoint(&self) -> bool {
        self.pending.micro == 0 && (self.collective.is_none() || !self.in_epoch)
    }

    /// Epochs after pre-training, for the warm-ups (negative during pre-training).
    fn epochs_after_pretrain(&self) -> i64 {
        i64::from(self.state.epoch) - i64::from(self.config().training.n_epochs_pretrain_ae)
    }

    /// The phase of the current batch.
    pub fn phase(&self) -> Phase {
        let k = self.config().adversary.adv_steps;
        if self.epochs_after_pretrain() < 0 {
            Phase::Pretrain
        } else if k == 0 {
            Phase::Both
        } else if !self.batch_in_epoch.is_multiple_of(u64::from(k)) {
            Phase::Adversary
        } else {
            Phase::Autoencoder
        }
    }

    /// Learning-rate factor of the current epoch. The reference steps its schedulers after epochs
    /// e > 1 with e % step_size_lr == 0; with `lr_schedule = "epochs"` each of those steps decays
    /// by `lr_decay`, with `"reference"` every `step_size_lr`-th one does (a `StepLR` of that step
    /// size, as cpa-tools 0.8.8 builds it).
    pub fn lr_factor(&self) -> f64 {
        let t = &self.config().training;
        let (e, s) = (u64::from(self.state.epoch), u64::from(t.step_size_lr));
        if s == 0 || e < 2 {
            return 1.0;
        }
        let steps = (e - 1) / s - u64::from(s == 1);
        let decays = match t.lr_schedule {
            LrSchedule::Epochs => steps,
            LrSchedule::Reference => steps / s,
        };
        t.lr_decay.powi(i32::try_from(decays).unwrap_or(i32::MAX))
    }

    /// KL weight of the current epoch (ramped 0 -> 1 over `n_epochs_kl_warmup`).
    pub fn kl_weight(&self) -> f64 {
        let w = self.config().training.n_epochs_kl_warmup;
        if w == 0 { 1.0 } else { (f64::from(self.state.epoch) / f64::from(w)).min(1.0) }
    }

    /// Weight of the adversarial term (`reg_adv`, ramped over `n_epochs_adv_warmup` after pre-training).
    pub fn adv_weight(&self) -> f64 {
        let (reg, w) = (self.config().adversary.reg_adv, self.config().training.n_epochs_adv_warmup);
        if w == 0 { reg } else { reg * (self.epochs_after_pretrain().max(0) as f64 / f64::from(w)).min(1.0) }
    }

    /// Mixup alpha of the current epoch (ramped over `n_epochs_mixup_warmup` after pre-training).
    pub fn mixup_alpha(&self) -> f64 {
        let (alpha, w) = (self.config().training.mixup_alpha, self.config().training.n_epochs_mixup_warmup);
        if w == 0 { alpha } else { alpha * (self.epochs_after_pretrain().max(0) as f64 / f64::from(w)).min(1.0) }
    }

    /// Trains on one batch, uploaded to the device here (gradients of `accumulate_batches`
    /// batches are summed before each optimizer step).
    pub fn step(&mut self, batch: &HostBatch) -> Result<()> {
        let device = self.model.device();
        self.step_with(batch.n_cells(), || DeviceBatch::upload(batch, device))
    }

    /// [`step`](Self::step) on a batch already on the model's device (uploaded ahead, while
    /// the batch before trained).
    pub fn step_uploaded(&mut self, batch: DeviceBatch) -> Result<()> {
        self.step_with(batch.n_cells as usize, || Ok(batch))
    }

    fn step_with(&mut self, n_cells: usize, upload: impl FnOnce() -> Result<DeviceBatch>) -> Result<()> {
        let result = self.step_batch(n_cells, upload);
        match (&self.collective, result) {
            (Some(c), Err(e)) => {
                Err(c.name_rank(e, &format!("batch {} of epoch {}", self.batches_in_epoch, self.state.epoch)))
            }
            (_, result) => result,
        }
    }

    fn step_batch(&mut self, n_cells: usize, upload: impl FnOnce() -> Result<DeviceBatch>) -> Result<()> {
        if n_cells == 0 {
            if let Some(c) = &self.collective {
                // The plan gives every rank a share of every batch (at least one cell each).
                return Err(Error::InvalidInput(format!(
                    "rank {} of {}: an empty share of batch {} of epoch {}",
                    c.rank(),
                    c.world(),
                    self.batches_in_epoch,
                    self.state.epoch
                )));
            }
            return Ok(());
        }
        if !self.in_epoch {
            self.noise.reseed(seeded(self.state.seed, STREAM_EPOCH, u64::from(self.state.epoch)));
            self.in_epoch = true;
        }
        self.epoch_clock.get_or_insert_with(std::time::Instant::now);
        let b = upload()?;
        let shard = self.batch_shard(b.n_cells)?;
        let (offset, rows, total) = shard.as_ref().map_or((0, b.n_cells, b.n_cells), |s| (s.offset, s.rows, s.total));
        let gather = |t: &Tensor, what: &str| -> Result<Tensor> {
            match &shard {
                None => Ok(t.shallow_clone()),
                Some(s) => {
                    s.collective.gather_rows(t, offset, total, &format!("{what} of batch {}", self.batches_in_epoch))
                }
            }
        };
        let phase = self.phase();
        let alpha = self.mixup_alpha();
        // Mixup pairs the cells of the whole batch (every rank draws the same permutation).
        let (lambda, perm) = if alpha > 0.0 {
            let lambda = self.noise.beta(alpha)?;
            let perm = Tensor::f_from_slice(&self.noise.permutation(total as usize))
                .torch()?
                .f_to_device(self.model.device())
                .torch()?;
            (lambda, Some(perm))
        } else {
            (1.0, None)
        };
        // The whole batch's labels, for the adversaries (which see the whole batch): the
        // condition and covariate codes side by side, gathered at once.
        let (conditions, covariates) = match &shard {
            None => (b.conditions.shallow_clone(), b.covariates.iter().map(Tensor::shallow_clone).collect()),
            Some(_) => {
                let columns: Vec<&Tensor> = std::iter::once(&b.conditions).chain(&b.covariates).collect();
                let whole = gather(&Tensor::f_stack(&columns, 1).torch()?, "the labels")?;
                let column = |i: i64| whole.f_select(1, i).and_then(|c| c.f_contiguous()).torch();
                let covariates = (1..=b.covariates.len() as i64).map(column).collect::<Result<Vec<_>>>()?;
                (column(0)?, covariates)
            }
        };
        // With mixup, a tensor of the whole batch's rows mixed and cut to this rank's rows;
        // without, this rank's rows as they are.
        let mix = |t: &Tensor| -> Result<Tensor> {
            match &perm {
                None => Ok(t.shallow_clone()),
                Some(p) => Ok(t
                    .f_narrow(0, offset, rows)
                    .torch()?
                    .f_mul_scalar(lambda)
                    .torch()?
                    .f_add(
                        &t.f_index_select(0, &p.f_narrow(0, offset, rows).torch()?)
                            .torch()?
                            .f_mul_scalar(1.0 - lambda)
                            .torch()?,
                    )
                    .torch()?),
            }
        };
        let permuted = |t: &Tensor| -> Result<Option<Tensor>> {
            perm.as_ref().map(|p| t.f_index_select(0, p)).transpose().torch()
        };
        // Mixing needs the partners' rows, which other ranks hold: the counts and perturbations
        // of the whole batch then come to every rank.
        let whole_x = if perm.is_some() { gather(&b.x, "the counts")? } else { b.x.shallow_clone() };
        let x = mix(&whole_x)?;
        let (x_in, library) = self.model.input(&x)?;
        let conditions_mix = permuted(&conditions)?;
        let covariates_mix = covariates.iter().map(&permuted).collect::<Result<Vec<_>>>()?;
        let labels = Labels {
            conditions: &conditions,
            conditions_mix: conditions_mix.as_ref(),
            covariates: &covariates,
            covariates_mix: &covariates_mix,
            lambda,
        };
        // This rank's share of the whole batch's mean losses.
        let share = rows as f64 / total as f64;

        self.noise.set_shard(shard.clone());
        let encoded = if phase == Phase::Adversary {
            tch::no_grad(|| self.model.encode(&x_in, true, true, &mut self.noise))
        } else {
            self.model.encode(&x_in, true, true, &mut self.noise)
        };
        let encoded = match encoded {
            Ok(e) => e,
            Err(e) => {
                self.noise.set_shard(None);
                return Err(e);
            }
        };
        let z_detached = encoded.z_basal.f_detach().torch()?;
        let z_whole = gather(&z_detached, "the basal latents")?;
        if phase != Phase::Adversary {
            let (z_pert, covs) = match (&perm, &shard) {
                (Some(_), Some(s)) => {
                    let perts = whole_perts(&s.collective, &b.perts, offset, total)?;
                    let z_pert = mix(&self.model.perturbation_latent(&perts)?)?;
                    let covs =
                        self.model.covariate_latents(&covariates)?.iter().map(&mix).collect::<Result<Vec<_>>>()?;
                    (z_pert, covs)
                }
                _ => {
                    let z_pert = mix(&self.model.perturbation_latent(&b.perts)?)?;
                    let covs =
                        self.model.covariate_latents(&b.covariates)?.iter().map(&mix).collect::<Result<Vec<_>>>()?;
                    (z_pert, covs)
                }
            };
            let latents = self.model.compose(&encoded.z_basal, &z_pert, &covs)?;
            // Mixup blends counts, so the non-zero entries are those of the batch only without it;
            // with it they are found on the CPU (on a GPU that would wait for the device).
            let mixed = match &perm {
                Some(_) if x.device() == Device::Cpu => Some(Entries::of_dense(&x).torch()?),
                _ => None,
            };
            let entries = if perm.is_none() { Some(&b.entries) } else { mixed.as_ref() };
            let reconstruction =
                self.model.reconstruct(&x, entries, &latents.z, &latents.z_pert, library.as_ref(), &mut self.noise);
            self.noise.set_shard(None);
            let (ll, generative) = reconstruction?;
            let recon = ll.f_mean(Kind::Float).torch()?.f_neg().torch()?;
            let r2 = tch::no_grad(|| self.training_r2(&x_in, &generative, &b))?;
            let kl = match &encoded.posterior {
                Some((mean, var)) => kl_standard_normal(mean, var)?,
                None => Tensor::f_zeros([], (Kind::Float, self.model.device())).torch()?,
            };
            let mut loss = recon.f_add(&kl.f_mul_scalar(self.kl_weight()).torch()?).torch()?;
            if share != 1.0 {
                loss = loss.f_mul_scalar(share).torch()?;
            }
            let adv_weight = self.adv_weight();
            if phase != Phase::Pretrain && adv_weight != 0.0 {
                // The whole batch's basal latents, this rank's rows differentiable: the
                // adversaries' loss of the whole batch sends each rank the gradient of its rows.
                let z = splice(&z_whole, &encoded.z_basal, offset)?;
                let adv = self.adversary(&z, &labels, false)?;
                loss = loss.f_sub(&adv.loss.f_mul_scalar(adv_weight).torch()?).torch()?;
            }
            let params: Vec<Tensor> =
                self.groups[0].params().iter().chain(self.groups[1].params()).map(Tensor::shallow_clone).collect();
            let grads = Tensor::f_run_backward(&[&loss], &params, false, false).torch()?;
            accumulate(&mut self.pending.ae, grads)?;
            // Data-parallel: this rank's share of the whole batch's means (the ranks' rows add up
            // to them; the training R2, not a mean over cells, is approximated so).
            let row = self.layout.autoencoder_row(&recon, &kl, &r2)?;
            self.add_sums(&if share == 1.0 { row } else { row.f_mul_scalar(share).torch()? })?;
            self.counts.0 += 1;
        }
        self.noise.set_shard(None);

        if phase != Phase::Autoencoder {
            let z = z_whole.f_set_requires_grad(true).torch()?;
            let adv = self.adversary(&z, &labels, true)?;
            let penalty = adv.penalty.unwrap_or(Tensor::f_zeros([], (Kind::Float, self.model.device())).torch()?);
            let total = adv.loss.f_add(&penalty.f_mul_scalar(self.config().adversary.pen_adv).torch()?).torch()?;
            // Without a class to tell apart (only control cells and no covariate) the adversary's
            // loss is a constant: there is no graph to run backward through (libtorch would
            // crash on it), and nothing for the adversary to learn.
            if total.requires_grad() {
                let grads = Tensor::f_run_backward(&[&total], self.groups[2].params(), false, false).torch()?;
                accumulate(&mut self.pending.adv, grads)?;
            }
            // Every rank computed the whole batch's: each adds its part of the one value.
            let row = self.layout.adversary_row(&adv.heads)?;
            let world = self.collective.as_ref().map_or(1, |c| c.world());
            self.add_sums(&if world == 1 { row } else { row.f_div_scalar(world as f64).torch()? })?;
            self.counts.1 += 1;
        }
        self.counts.2 += n_cells as u64;
        // The run's cells: every rank's share of the batch.
        self.state.cells_seen += total as u64;
        self.last_batch_cells = total as u64;
        self.batches_in_epoch += 1;
        self.pending.micro += 1;
        if self.pending.micro >= self.config().training.accumulate_batches {
            self.apply()?;
        }
        Ok(())
    }

    /// cpa-tools' training `r2_mean` and `r2_var` of an autoencoder batch ([`batch_r2`]) over
    /// its categories of condition and covariates; `x_in` is the encoder's input (log1p counts
    /// for nb/zinb), mixed as the batch was.
    fn training_r2(&self, x_in: &Tensor, generative: &Generative, b: &DeviceBatch) -> Result<(Tensor, Tensor)> {
        let keys: Vec<&Tensor> = std::iter::once(&b.conditions).chain(&b.covariates).collect();
        let (codes, span) = category_codes(&keys, &self.radices)?;
        match generative {
            Generative::Counts { mu, .. } => batch_r2(x_in, &mu.f_log1p().torch()?, None, &codes, span),
            Generative::Gauss { mean, var } => batch_r2(x_in, mean, Some(var), &codes, span),
        }
    }

    fn add_sums(&mut self, row: &Tensor) -> Result<()> {
        self.sums = self.sums.f_add(row).torch()?;
        // finite ? NO_BAD_BATCH : this batch, folded into the epoch's first.
        let finite = row.f_isfinite().torch()?.f_all().torch()?.f_to_kind(Kind::Double).torch()?;
        let batch = self.batches_in_epoch as f64;
        let here = finite.f_mul_scalar(NO_BAD_BATCH - batch).torch()?.f_add_scalar(batch).torch()?;
        self.first_nonfinite = self.first_nonfinite.f_minimum(&here).torch()?;
        Ok(())
    }

    /// Errors ([`Error::Diverged`], naming the epoch and batch) when a loss of this epoch so far
    /// was not finite. One device-to-host read; done wherever metrics are read and before a
    /// checkpoint is written, so a diverged model is never saved.
    pub fn check_finite(&self) -> Result<()> {
        let first = self.first_nonfinite.f_double_value(&[]).torch()?;
        if first < NO_BAD_BATCH {
            return Err(Error::Diverged { epoch: self.state.epoch, batch: first as u64 });
        }
        Ok(())
    }

    /// Classification losses of the adversaries on `z_basal`, with the gradient penalty when
    /// asked (which needs `z_basal` to require gradients).
    fn adversary(&mut self, z_basal: &Tensor, labels: &Labels<'_>, penalty: bool) -> Result<AdversaryOut> {
        let a = self.config().adversary.clone();
        let focal = (a.loss == AdvLoss::Focal).then_some(a.focal_gamma);
        let lambda = labels.lambda;
        let device = self.model.device();
        let zero = || Tensor::f_zeros([], (Kind::Float, device)).torch();
        let accuracy = |logits: &Tensor, target: &Tensor| -> Result<Tensor> {
            let hits = logits.f_argmax(1, false).torch()?.f_eq_tensor(target).torch()?;
            hits.f_to_kind(Kind::Float).torch()?.f_mean(Kind::Float).torch()
        };
        let head = |logits: &Tensor, loss: Tensor, target: &Tensor| -> Result<HeadTensors> {
            let penalty = if penalty { gradient_penalty(logits, z_basal)? } else { zero()? };
            Ok(HeadTensors { loss, penalty, accuracy: accuracy(logits, target)? })
        };
        let logits = self.model.classify_perturbation(z_basal, true, &mut self.noise)?;
        let perts = if self.model.vocabulary().conditions.len() > 1 {
            let weights = Some(self.model.class_weights());
            let loss = mixed_loss(&logits, labels.conditions, labels.conditions_mix, weights, focal, lambda)?;
            head(&logits, loss, labels.conditions)?
        } else {
            // One class: nothing to tell apart; the accuracy is still reported.
            HeadTensors { loss: zero()?, penalty: zero()?, accuracy: accuracy(&logits, labels.conditions)? }
        };
        let mut covariates = Vec::new();
        for (i, l) in self.model.classify_covariates(z_basal, true, &mut self.noise)?.into_iter().enumerate() {
            covariates.push(match l {
                None => None,
                Some(l) => {
                    let mix = labels.covariates_mix.get(i).and_then(Option::as_ref);
                    let loss = mixed_loss(&l, &labels.covariates[i], mix, None, focal, lambda)?;
                    Some(head(&l, loss, &labels.covariates[i])?)
                }
            });
        }
        let heads = Heads { perts, covariates };
        let mut loss = heads.perts.loss.shallow_clone();
        let mut total_penalty = heads.perts.penalty.shallow_clone();
        for h in heads.covariates.iter().flatten() {
            loss = loss.f_add(&h.loss).torch()?;
            total_penalty = total_penalty.f_add(&h.penalty).torch()?;
        }
        Ok(AdversaryOut { loss, penalty: penalty.then_some(total_penalty), heads })
    }

    /// Averages the accumulated gradients, clips and steps the optimizers.
    fn apply(&mut self) -> Result<()> {
        let count = self.pending.micro as f64;
        let t = self.config().training.clone();
        let factor = self.lr_factor();
        let clip = t.do_clip_grad.then_some(t.gradient_clip_value);
        if self.collective.is_some() {
            // Every rank reduces the groups the phase trains, whether or not it has cells.
            let phase = self.phase();
            let ae = self.pending.ae.take();
            self.pending.ae = if phase == Phase::Adversary { ae } else { self.all_reduced(false, ae)? };
            let adv = self.pending.adv.take();
            self.pending.adv = if phase == Phase::Autoencoder { adv } else { self.all_reduced(true, adv)? };
        }
        if let Some(mut grads) = self.pending.ae.take() {
            scale(&mut grads, count)?;
            let doser = grads.split_off(self.groups[0].params().len());
            let mut ae = grads;
            if let Some(max) = clip {
                clip_norm(&mut ae, max)?;
            }
            self.groups[0].step(ae, t.lr * factor)?;
            let mut doser = doser;
            if let Some(max) = clip {
                clip_norm(&mut doser, max)?;
            }
            self.groups[1].step(doser, t.doser_lr * factor)?;
            if let Some(average) = self.average.as_mut() {
                average.update(self.groups[0].steps().saturating_sub(1))?;
            }
        }
        if let Some(mut grads) = self.pending.adv.take() {
            scale(&mut grads, count)?;
            if let Some(max) = clip {
                clip_norm(&mut grads, max)?;
            }
            self.groups[2].step(grads, t.adv_lr * factor)?;
        }
        self.pending.micro = 0;
        self.state.global_step += 1;
        self.batch_in_epoch += 1;
        Ok(())
    }

    /// Whether the running metrics are due for a read (every `metrics_every_n_steps` steps).
    pub fn metrics_due(&self) -> bool {
        let every = u64::from(self.config().training.metrics_every_n_steps);
        self.pending.micro == 0 && self.state.global_step > 0 && self.state.global_step.is_multiple_of(every)
    }

    /// Means of the losses since the start of the epoch (one device-to-host read).
    pub fn running_metrics(&self) -> Result<EpochMetrics> {
        self.check_finite()?;
        let (sums, counts) = match &self.collective {
            None => (self.sums.shallow_clone(), self.counts),
            Some(c) => {
                // Every rank's sums and counts (in one all-reduce: the counts as floats).
                let (a, b, n) = self.counts;
                let counts = Tensor::f_from_slice(&[a as f32, b as f32, n as f32]).torch()?;
                let both =
                    Tensor::f_cat(&[self.sums.shallow_clone(), counts.f_to_device(self.model.device()).torch()?], 0)
                        .torch()?;
                c.all_reduce_sum(&both, &format!("the running losses of epoch {}", self.state.epoch))?;
                let slots = self.layout.slots() as i64;
                let n = Vec::<f32>::try_from(&both.f_narrow(0, slots, 3).torch()?.f_to_device(Device::Cpu).torch()?)
                    .torch()?;
                // The sums are the whole batches' (each rank added its part); every rank counted
                // every batch, and its own cells.
                (both.f_narrow(0, 0, slots).torch()?, (a, b, n[2] as u64))
            }
        };
        let sums = Vec::<f32>::try_from(&sums.f_to_device(Device::Cpu).torch()?).torch()?;
        let has_adversary: Vec<bool> =
            self.model.vocabulary().covariates.iter().map(|c| c.categories.len() > 1).collect();
        let lr = self.config().training.lr * self.lr_factor();
        Ok(self.layout.means(&sums, counts, &has_adversary, self.state.epoch, lr))
    }

    /// Ends the epoch: steps any partial accumulation, returns the epoch's metrics, advances the
    /// schedule.
    pub fn end_epoch(&mut self) -> Result<EpochMetrics> {
        if self.pending.micro > 0 {
            self.apply()?;
        }
        let metrics = self.running_metrics()?;
        self.sums = self.sums.f_zero_().torch()?;
        self.first_nonfinite = self.first_nonfinite.f_fill_(NO_BAD_BATCH).torch()?;
        self.counts = (0, 0, 0);
        self.state.epoch += 1;
        self.batch_in_epoch = 0;
        self.batches_in_epoch = 0;
        self.in_epoch = false;
        self.epoch_seconds_before = 0.0;
        self.epoch_clock = None;
        Ok(metrics)
    }

    /// Writes a checkpoint directory (model files, optimizer moments, schedule state) atomically.
    /// Checkpoints are taken between epochs, or within one when
    /// [`can_checkpoint`](Trainer::can_checkpoint) (the epoch's position is then saved too).
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<()> {
        self.check_finite()?;
        if !self.can_checkpoint() {
            return Err(Error::InvalidInput(format!(
                "{}: no checkpoint while the gradients of an optimizer step are being accumulated \
                 ({} of {} batches)",
                dir.display(),
                self.pending.micro,
                self.config().training.accumulate_batches
            )));
        }
        self.state.within_epoch = if self.in_epoch {
            Some(EpochPosition {
                batches: self.batches_in_epoch,
                steps: self.batch_in_epoch,
                sums: Vec::<f32>::try_from(&self.sums.f_to_device(Device::Cpu).torch()?).torch()?,
                counts: self.counts,
                noise: self.noise.generator().clone(),
                seconds: self.epoch_seconds_before + self.epoch_clock.map_or(0.0, |c| c.elapsed().as_secs_f64()),
            })
        } else {
            None
        };
        self.state.group_steps = self.groups.iter().map(AdamGroup::steps).collect();
        let mut moments: Vec<(String, Tensor)> = self.groups.iter().flat_map(AdamGroup::state_tensors).collect();
        if let Some(average) = &self.average {
            moments.extend(average.state_tensors());
        }
        let state = serde_json::to_string_pretty(&self.state).map_err(|e| Error::InvalidInput(e.to_string()))?;
        publish_dir(dir, |tmp| {
            write_model_files(&self.model, tmp)?;
            let path = tmp.join(OPTIMIZER_FILE);
            Tensor::write_safetensors(&moments, &path)
                .map_err(|e| Error::torch(format!("writing {}", path.display()), e))?;
            let path = tmp.join(STATE_FILE);
            std::fs::write(&path, &state).map_err(|e| Error::io(&path, e))
        })
    }

    /// Continues training from a checkpoint directory on `device`.
    pub fn resume(dir: &Path, device: Device) -> Result<Trainer> {
        crate::model::files::recover_dir(dir)?;
        let model = load_model(dir, device)?;
        let mut trainer = Trainer::new(model)?;
        let path = dir.join(STATE_FILE);
        let text = cpa_stream_stages::regular::read_text(&path, "a trainer's state (trainer.json)", 64 << 20)?;
        let mut state: TrainState = serde_json::from_str(&text).map_err(|e| Error::corrupt(&path, e.to_string()))?;
        if state.group_steps.len() != trainer.groups.len() {
            return Err(Error::corrupt(&path, format!("{} group step counts, expected 3", state.group_steps.len())));
        }
        let path = dir.join(OPTIMIZER_FILE);
        // Two moments per weight, and the weights' running average at most.
        let model_bytes: u64 = (trainer.model.var_store().variables().values())
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum();
        cpa_stream_stages::model::files::check_weights_file(&path, model_bytes.saturating_mul(3))?;
        let saved: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .map_err(|e| Error::torch(format!("reading {}", path.display()), e))?
            .into_iter()
            .map(|(k, t)| t.f_to_device(device).map(|t| (k, t)))
            .collect::<std::result::Result<_, _>>()
            .torch()?;
        let origin = path.display().to_string();
        for (group, &steps) in trainer.groups.iter_mut().zip(&state.group_steps) {
            group.load_state(&saved, steps, &origin)?;
        }
        if let Some(average) = trainer.average.as_mut() {
            average.load_state(&saved, &origin)?;
        }
        // Kept in the trainer's fields from here; the state records it again at the next save.
        if let Some(position) = state.within_epoch.take() {
            let path = dir.join(STATE_FILE);
            let layout = trainer.layout;
            let Some(sums) = layout.restore(&position.sums) else {
                let want = layout.slots();
                let n = position.sums.len();
                return Err(Error::corrupt(
                    &path,
                    format!("{n} running sums, expected {want} (or {})", metrics::OLD_SUMS),
                ));
            };
            trainer.sums = Tensor::f_from_slice(&sums).torch()?.f_to_device(device).torch()?;
            trainer.counts = position.counts;
            trainer.batch_in_epoch = position.steps;
            trainer.batches_in_epoch = position.batches;
            trainer.noise.reseed(position.noise);
            trainer.in_epoch = true;
            trainer.epoch_seconds_before = position.seconds;
        }
        trainer.state = state;
        Ok(trainer)
    }
}

/// Labels of a batch for the adversaries, with their mixup partners.
struct Labels<'a> {
    conditions: &'a Tensor,
    conditions_mix: Option<&'a Tensor>,
    covariates: &'a [Tensor],
    covariates_mix: &'a [Option<Tensor>],
    lambda: f64,
}

fn accumulate(into: &mut Option<Vec<Option<Tensor>>>, grads: Vec<Tensor>) -> Result<()> {
    let grads: Vec<Option<Tensor>> = grads.into_iter().map(|g| g.defined().then_some(g)).collect();
    match into {
        None => *into = Some(grads),
        Some(acc) => {
            for (a, g) in acc.iter_mut().zip(grads) {
                match (a.as_mut(), g) {
                    (Some(a), Some(g)) => {
                        let _ = a.f_add_(&g).torch()?;
                    }
                    (None, Some(g)) => *a = Some(g),
                    (_, None) => {}
                }
            }
        }
    }
    Ok(())
}

fn scale(grads: &mut [Option<Tensor>], count: f64) -> Result<()> {
    if count > 1.0 {
        for g in grads.iter_mut().flatten() {
            let _ = g.f_mul_scalar_(1.0 / count).torch()?;
        }
    }
    Ok(())
}

/// Scales gradients so that their joint norm is at most `max` (no device-to-host sync): by
/// libtorch's multi-tensor kernels where this build has them, else written out.
fn clip_norm(grads: &mut [Option<Tensor>], max: f64) -> Result<()> {
    if fused::AVAILABLE {
        let present: Vec<&Tensor> = grads.iter().flatten().collect();
        return fused::clip_norm(&present, max).map_err(|e| Error::InvalidInput(format!("gradient clipping: {e}")));
    }
    clip_norm_written_out(grads, max)
}

fn clip_norm_written_out(grads: &mut [Option<Tensor>], max: f64) -> Result<()> {
    let squares: Vec<Tensor> = grads
        .iter()
        .flatten()
        .map(|g| g.f_square()?.f_sum(Kind::Float))
        .collect::<std::result::Result<_, _>>()
        .torch()?;
    if squares.is_empty() {
        return Ok(());
    }
    let norm = Tensor::f_stack(&squares, 0).torch()?.f_sum(Kind::Float).torch()?.f_sqrt().torch()?;
    let coef =
        norm.f_add_scalar(1e-6).torch()?.f_reciprocal().torch()?.f_mul_scalar(max).torch()?.f_clamp_max(1.0).torch()?;
    for g in grads.iter_mut().flatten() {
        let _ = g.f_mul_(&coef).torch()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
