//! The CPA network: encoder, perturbation and covariate embeddings, decoder, adversaries.
//!
//! Parameters live in one `VarStore` under three prefixes, which are also the optimizer groups:
//! `ae` (encoder, decoder, embeddings, dispersion), `doser` (dose responses) and `adv`
//! (classifiers).

use tch::{Device, Kind, Tensor, nn};

use super::batch::DevicePerts;
use super::config::{CpaConfig, DoserType, LOG_EPS, Precision, ReconLoss, VAR_EPS};
use super::fused_nb;
use super::layers::{Classifier, FcLayers, Init, Linear, Noise, affine, variable};
use super::likelihood::{Entries, count_log_likelihood_sparse, log_nb, log_normal, log_zinb};
use super::vocab::{PADDING_ID, Vocabulary};
use crate::torch::TorchResult;
use cpa_stream_stages::{Error, Result};

/// Variable-name prefix of the autoencoder optimizer group (encoder, decoder, embeddings).
pub const GROUP_AE: &str = "ae";
/// Variable-name prefix of the dose-response optimizer group.
pub const GROUP_DOSER: &str = "doser";
/// Variable-name prefix of the adversary optimizer group.
pub const GROUP_ADV: &str = "adv";

/// The encoder: deterministic (a Linear head) or variational (mean and variance heads).
#[derive(Debug)]
struct Encoder {
    body: FcLayers,
    mean: Linear,
    var: Option<Linear>,
}

/// Output of the encoder.
#[derive(Debug)]
pub struct Encoded {
    /// The basal state (a posterior draw when sampling, else its mean).
    pub z_basal: Tensor,
    /// Posterior mean and variance (variational encoder only).
    pub posterior: Option<(Tensor, Tensor)>,
}

/// Whether the model knows nothing of a condition with these `parts`: every part is among its
/// `effectless` perturbations ([`CpaModel::effectless_perturbations`]). Such a condition has no
/// effect, so it is decoded as the control (its latent without any perturbation's term would be
/// a state no training cell was in: the control has a learned term of its own).
pub fn knows_nothing_of(parts: &[(u32, f32)], effectless: &[u32]) -> bool {
    !parts.is_empty() && parts.iter().all(|(id, _)| effectless.contains(id))
}

/// The perturbation embedding: free vectors, or fixed features through a trained projection.
#[derive(Debug)]
enum PertEmbedding {
    Free(Tensor),
    Features { features: Tensor, projection: Linear },
}

/// Dose-response parameters.
#[derive(Debug)]
enum Doser {
    Sigmoid {
        beta: Tensor,
        bias: Tensor,
        log: bool,
    },
    Linear,
    /// Per-perturbation MLPs 1 -> h (-> h)* -> 1, stored stacked over perturbations.
    Mlp {
        w_in: Tensor,
        b_in: Tensor,
        hidden: Vec<(Tensor, Tensor)>,
        w_out: Tensor,
        b_out: Tensor,
    },
}

/// Decoder heads.
#[derive(Debug)]
enum Heads {
    Counts { scale: Linear, zi: Option<Linear>, log_theta: Tensor },
    Gauss { mean: Linear, var: Linear },
}

/// Output of the decoder: the parameters of the likelihood.
#[derive(Debug)]
pub enum Generative {
    /// `mu = exp(library) * softmax(..)`, per-gene `theta`, zero-inflation logits for zinb.
    Counts {
        /// Mean counts, cells x genes.
        mu: Tensor,
        /// Per-gene inverse dispersion.
        theta: Tensor,
        /// Zero-inflation logits (zinb only).
        zi_logits: Option<Tensor>,
    },
    /// Mean and variance of a Gaussian, cells x genes.
    Gauss {
        /// The mean.
        mean: Tensor,
        /// The variance.
        var: Tensor,
    },
}

impl Generative {
    /// The predicted mean expression (`mu`, or the Gaussian mean).
    pub fn mean(&self) -> &Tensor {
        match self {
            Generative::Counts { mu, .. } => mu,
            Generative::Gauss { mean, .. } => mean,
        }
    }
}

/// All latents of a forward pass (`z_pert` and `z_covs` are the added terms).
#[derive(Debug)]
pub struct Latents {
    /// The basal state (perturbations and covariates removed).
    pub z_basal: Tensor,
    /// Basal + perturbation + covariates.
    pub z: Tensor,
    /// `z` without the batch covariate.
    pub z_corrected: Tensor,
    /// Basal + covariates.
    pub z_no_pert: Tensor,
    /// Basal + covariates without the batch covariate.
    pub z_no_pert_corrected: Tensor,
    /// The perturbation term.
    pub z_pert: Tensor,
    /// The covariates' term.
    pub z_covs: Tensor,
}

/// The CPA model on one device.
pub struct CpaModel {
    vs: nn::VarStore,
    config: CpaConfig,
    vocab: Vocabulary,
    encoder: Encoder,
    embedding: PertEmbedding,
    doser: Doser,
    covariate_embeddings: Vec<Tensor>,
    decoder: FcLayers,
    heads: Heads,
    /// `model.perturbation_skip`: genes x latent, added to the heads' output as `W z_pert`.
    skip: Option<Tensor>,
    pert_classifier: Classifier,
    covariate_classifiers: Vec<Option<Classifier>>,
    class_weights: Tensor,
    precision: Precision,
}

impl std::fmt::Debug for CpaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpaModel")
            .field("device", &self.vs.device())
            .field("config", &self.config)
            .field("parameters", &self.n_parameters())
            .finish_non_exhaustive()
    }
}

impl CpaModel {
    /// Builds a freshly initialised model. `features` are optional fixed perturbation features
    /// (one row per vocabulary entry, e.g. fingerprints), projected to the latent space by a
    /// trained Linear instead of free embeddings. Initialisation draws from `init`.
    pub fn new(
        config: &CpaConfig,
        vocab: &Vocabulary,
        features: Option<&Tensor>,
        device: Device,
        init_seed: u64,
    ) -> Result<CpaModel> {
        config.validate().map_err(|e| Error::InvalidInput(format!("model configuration: {e}")))?;
        vocab.validate()?;
        let mut init = Init::new(super::layers::seeded(init_seed, 11, 0));
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (ae, doser_path, adv) = (&root / GROUP_AE, &root / GROUP_DOSER, &root / GROUP_ADV);
        let m = &config.model;
        let (genes, latent, perts) = (vocab.n_genes(), m.n_latent, vocab.n_perturbations());

        let enc_path = &ae / "encoder";
        let body = FcLayers::new(
            &(&enc_path / "body"),
            &mut init,
            genes,
            m.n_hidden_encoder,
            m.n_layers_encoder,
            m.norm_encoder,
            m.dropout_rate_encoder,
        )?;
        let mean = Linear::new(&(&enc_path / "mean"), &mut init, m.n_hidden_encoder, latent)?;
        let var = if m.variational {
            Some(Linear::new(&(&enc_path / "var"), &mut init, m.n_hidden_encoder, latent)?)
        } else {
            None
        };
        let encoder = Encoder { body, mean, var };

        let embedding = match features {
            None => {
                let e = init.normal(&[perts as i64, latent as i64])?;
                // The padding row is zero (never indexed: batches hold real perturbations only),
                // and so are the rows of perturbations no training cell has: no loss reaches them,
                // so a random start would stay a random effect at prediction; zero is no effect,
                // and stays zero (no gradient, weight decay of zero).
                let mut zero: Vec<i64> = vec![PADDING_ID as i64];
                zero.extend(vocab.untrained_perturbations().iter().map(|&id| i64::from(id)));
                let e = e.f_index_fill(0, &Tensor::f_from_slice(&zero).torch()?, 0.0).torch()?;
                PertEmbedding::Free(variable(&ae, "perturbation_embedding", e)?)
            }
            Some(f) => {
                let size = f.size();
                if size.len() != 2 || size[0] != perts as i64 {
                    return Err(Error::InvalidInput(format!(
                        "perturbation features have shape {size:?}, expected [{perts}, n_features]"
                    )));
                }
                let mut features = ae.f_zeros_no_train("perturbation_features", &size).torch()?;
                tch::no_grad(|| features.f_copy_(&f.f_to_kind(Kind::Float)?)).torch()?;
                let projection = Linear::new(&(&ae / "perturbation_projection"), &mut init, size[1] as usize, latent)?;
                PertEmbedding::Features { features, projection }
            }
        };

        let p = perts as i64;
        let doser = match m.doser_type {
            DoserType::Logsigm | DoserType::Sigm => Doser::Sigmoid {
                beta: doser_path.f_ones("beta", &[p]).torch()?,
                bias: doser_path.f_zeros("bias", &[p]).torch()?,
                log: m.doser_type == DoserType::Logsigm,
            },
            DoserType::Linear => Doser::Linear,
            DoserType::Auto => {
                return Err(Error::InvalidInput(
                    "model.doser_type = \"auto\" is chosen from the training cells' doses when a run starts; a model \
                     is built with logsigm, sigm, linear or mlp"
                        .to_owned(),
                ));
            }
            DoserType::Mlp => {
                let h = m.n_hidden_doser as i64;
                // Each per-perturbation layer has PyTorch's default bounds: 1/sqrt(fan_in).
                let w_in = variable(&doser_path, "w_in", init.uniform(&[p, h], 1.0)?)?;
                let b_in = variable(&doser_path, "b_in", init.uniform(&[p, h], 1.0)?)?;
                let bound = 1.0 / (h as f64).sqrt();
                let mut hidden = Vec::new();
                for i in 0..m.n_layers_doser.saturating_sub(2) {
                    let w = variable(&doser_path, &format!("w_hidden{i}"), init.uniform(&[p, h, h], bound)?)?;
                    let b = variable(&doser_path, &format!("b_hidden{i}"), init.uniform(&[p, h], bound)?)?;
                    hidden.push((w, b));
                }
                let w_out = variable(&doser_path, "w_out", init.uniform(&[p, h], bound)?)?;
                let b_out = variable(&doser_path, "b_out", init.uniform(&[p], bound)?)?;
                Doser::Mlp { w_in, b_in, hidden, w_out, b_out }
            }
        };

        let mut covariate_embeddings = Vec::with_capacity(vocab.covariates.len());
        for (i, cov) in vocab.covariates.iter().enumerate() {
            let e = init.normal(&[cov.categories.len() as i64, latent as i64])?;
            covariate_embeddings.push(variable(&ae, &format!("covariate_embedding{i}"), e)?);
        }

        let dec_path = &ae / "decoder";
        let decoder = FcLayers::new(
            &(&dec_path / "body"),
            &mut init,
            latent,
            m.n_hidden_decoder,
            m.n_layers_decoder,
            m.norm_decoder,
            m.dropout_rate_decoder,
        )?;
        let heads = match m.recon_loss {
            ReconLoss::Nb | ReconLoss::Zinb => {
                let scale = Linear::new(&(&dec_path / "scale"), &mut init, m.n_hidden_decoder, genes)?;
                let zi = if m.recon_loss == ReconLoss::Zinb {
                    Some(Linear::new(&(&dec_path / "zero_inflation"), &mut init, m.n_hidden_decoder, genes)?)
                } else {
                    None
                };
                let log_theta = variable(&ae, "log_theta", init.normal(&[genes as i64])?)?;
                Heads::Counts { scale, zi, log_theta }
            }
            ReconLoss::Gauss => Heads::Gauss {
                mean: Linear::new(&(&dec_path / "mean"), &mut init, m.n_hidden_decoder, genes)?,
                var: Linear::new(&(&dec_path / "var"), &mut init, m.n_hidden_decoder, genes)?,
            },
        };

        // Zero at the start: the model starts where one without the skip starts, and the weights
        // move only as far as the loss asks.
        let skip = if m.perturbation_skip {
            Some(variable(
                &dec_path,
                "perturbation_skip",
                Tensor::f_zeros([genes as i64, latent as i64], (Kind::Float, Device::Cpu)).torch()?,
            )?)
        } else {
            None
        };

        let a = &config.adversary;
        let classifier = |path: nn::Path, init: &mut Init, classes: usize| {
            Classifier::new(&path, init, latent, a.n_hidden, a.n_layers, a.norm, a.dropout_rate, classes)
        };
        let pert_classifier = classifier(&adv / "perturbation", &mut init, vocab.conditions.len())?;
        let mut covariate_classifiers = Vec::with_capacity(vocab.covariates.len());
        for (i, cov) in vocab.covariates.iter().enumerate() {
            covariate_classifiers.push(if cov.categories.len() > 1 {
                Some(classifier(&adv / format!("covariate{i}"), &mut init, cov.categories.len())?)
            } else {
                None
            });
        }
        let class_weights = Tensor::f_from_slice(&vocab.condition_weights()).torch()?.f_to_device(device).torch()?;
        Ok(CpaModel {
            vs,
            config: config.clone(),
            vocab: vocab.clone(),
            encoder,
            embedding,
            doser,
            covariate_embeddings,
            decoder,
            heads,
            skip,
            pert_classifier,
            covariate_classifiers,
            class_weights,
            precision: config.training.precision,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CpaConfig {
        &self.config
    }

    /// The negative binomial's per-gene inverse dispersion, for a count model without zero
    /// inflation (`nb`); `None` otherwise.
    pub fn nb_theta(&self) -> Result<Option<Tensor>> {
        match &self.heads {
            Heads::Counts { zi: None, log_theta, .. } => Ok(Some(log_theta.f_detach().torch()?.f_exp().torch()?)),
            _ => Ok(None),
        }
    }

    /// The count likelihood's per-gene inverse dispersion (`nb` and `zinb`); `None` for `gauss`.
    pub fn count_theta(&self) -> Result<Option<Tensor>> {
        match &self.heads {
            Heads::Counts { log_theta, .. } => Ok(Some(log_theta.f_detach().torch()?.f_exp().torch()?)),
            Heads::Gauss { .. } => Ok(None),
        }
    }

    /// Whether the count likelihood is zero-inflated (`zinb`).
    pub fn is_zero_inflated(&self) -> bool {
        matches!(&self.heads, Heads::Counts { zi: Some(_), .. })
    }

    /// Sets the count likelihood's per-gene log inverse dispersion (one value a gene); an error
    /// for a model without one (`gauss`) or a length other than its genes'.
    pub fn set_log_theta(&mut self, values: &[f32]) -> Result<()> {
        let Heads::Counts { log_theta, .. } = &mut self.heads else {
            return Err(Error::InvalidInput("a gauss likelihood has no dispersion to set".to_owned()));
        };
        if values.len() as i64 != log_theta.size1().torch()? {
            return Err(Error::InvalidInput(format!(
                "{} dispersion values for a model of {} genes",
                values.len(),
                log_theta.size1().torch()?
            )));
        }
        let source = Tensor::from_slice(values).f_to_device(log_theta.device()).torch()?;
        tch::no_grad(|| log_theta.f_copy_(&source)).torch()?;
        Ok(())
    }

    /// The vocabularies.
    pub fn vocabulary(&self) -> &Vocabulary {
        &self.vocab
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The weights.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The weights, to change (tests).
    #[cfg(test)]
    pub(crate) fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// Arithmetic of the matrix products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the compute precision (bf16 needs no change to the float32 weights).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// Number of trainable scalars.
    pub fn n_parameters(&self) -> i64 {
        self.vs.trainable_variables().iter().map(Tensor::numel).map(|n| n as i64).sum()
    }

    /// Trainable variables of one group (`ae`, `doser`, `adv`), sorted by name.
    pub fn group_variables(&self, group: &str) -> Vec<(String, Tensor)> {
        let prefix = format!("{group}.");
        let mut vars: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(name, t)| name.starts_with(&prefix) && t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Encoder input and library size: `log1p(x)` and `log(sum x)` for count models (a cell with
    /// no counts gets library size 1, not -inf), `x` and no library for `gauss`.
    pub fn input(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        if self.config.model.recon_loss.is_count() {
            let total = x.f_sum_dim_intlist(1, true, Kind::Float).torch()?.f_clamp_min(1.0).torch()?;
            Ok((x.f_log1p().torch()?, Some(total.f_log().torch()?)))
        } else {
            Ok((x.shallow_clone(), None))
        }
    }

    /// Encodes an encoder input. With a variational encoder, `sample` draws `z_basal` from the
    /// posterior (training, or each of `n_samples` draws at prediction); otherwise its mean.
    pub fn encode(&self, x_in: &Tensor, train: bool, sample: bool, noise: &mut Noise) -> Result<Encoded> {
        let h = self.encoder.body.forward(x_in, train, self.precision, noise)?;
        let mean = self.encoder.mean.forward(&h, self.precision)?;
        match &self.encoder.var {
            None => Ok(Encoded { z_basal: mean, posterior: None }),
            Some(var_head) => {
                let var = var_head.forward(&h, self.precision)?.f_softplus().torch()?.f_add_scalar(VAR_EPS).torch()?;
                let z_basal = if sample {
                    mean.f_add(&var.f_sqrt().torch()?.f_mul(&noise.normal(&mean.size())?).torch()?).torch()?
                } else {
                    mean.shallow_clone()
                };
                Ok(Encoded { z_basal, posterior: Some((mean, var)) })
            }
        }
    }

    /// Embedding rows of the perturbation vocabulary (free, or projected features).
    pub fn perturbation_embeddings(&self) -> Result<Tensor> {
        match &self.embedding {
            PertEmbedding::Free(e) => Ok(e.shallow_clone()),
            PertEmbedding::Features { features, projection } => projection.forward(features, self.precision),
        }
    }

    /// The perturbations this model gives no effect: no training cell has them, and their free
    /// embedding rows are zero, as a model of this version leaves them (empty with projected
    /// features, which place every perturbation, and for an older model's random rows).
    pub fn effectless_perturbations(&self) -> Result<Vec<u32>> {
        let PertEmbedding::Free(table) = &self.embedding else { return Ok(Vec::new()) };
        let untrained = self.vocab.untrained_perturbations();
        if untrained.is_empty() {
            return Ok(untrained);
        }
        let ids: Vec<i64> = untrained.iter().map(|&id| i64::from(id)).collect();
        let rows = Tensor::f_from_slice(&ids).torch()?.f_to_device(table.device()).torch()?;
        let magnitude = table.f_index_select(0, &rows).torch()?.f_abs().torch()?.f_amax(&[1i64][..], false).torch()?;
        let magnitude =
            Vec::<f64>::try_from(&magnitude.f_to_kind(Kind::Double).torch()?.f_to_device(Device::Cpu).torch()?)
                .map_err(|e| Error::InvalidInput(format!("perturbation embedding rows: {e}")))?;
        Ok(untrained.into_iter().zip(magnitude).filter(|(_, m)| *m == 0.0).map(|(id, _)| id).collect())
    }

    /// The scaled dose `s(d)` of each entry (perturbation `ids`, `doses`), one per entry.
    pub fn dose_response(&self, ids: &Tensor, doses: &Tensor) -> Result<Tensor> {
        Ok(match &self.doser {
            Doser::Sigmoid { beta, bias, log } => {
                let (b, c) = (beta.f_index_select(0, ids).torch()?, bias.f_index_select(0, ids).torch()?);
                let d = if *log { doses.f_log1p().torch()? } else { doses.shallow_clone() };
                d.f_mul(&b).torch()?.f_add(&c).torch()?.f_sigmoid().torch()?.f_sub(&c.f_sigmoid().torch()?).torch()?
            }
            Doser::Linear => doses.shallow_clone(),
            Doser::Mlp { w_in, b_in, hidden, w_out, b_out } => {
                let d = doses.f_unsqueeze(1).torch()?;
                let mut h = d
                    .f_mul(&w_in.f_index_select(0, ids).torch()?)
                    .torch()?
                    .f_add(&b_in.f_index_select(0, ids).torch()?)
                    .torch()?
                    .f_relu()
                    .torch()?;
                for (w, b) in hidden {
                    let w = w.f_index_select(0, ids).torch()?;
                    h = w
                        .f_bmm(&h.f_unsqueeze(2).torch()?)
                        .torch()?
                        .f_squeeze_dim(2)
                        .torch()?
                        .f_add(&b.f_index_select(0, ids).torch()?)
                        .torch()?
                        .f_relu()
                        .torch()?;
                }
                let out = h
                    .f_mul(&w_out.f_index_select(0, ids).torch()?)
                    .torch()?
                    .f_sum_dim_intlist(1, false, Kind::Float)
                    .torch()?;
                let out = out.f_add(&b_out.f_index_select(0, ids).torch()?).torch()?.f_sigmoid().torch()?;
                out.f_mul(&doses.f_gt(0.0).torch()?.f_to_kind(Kind::Float).torch()?).torch()?
            }
        })
    }

    /// `z_pert`: the sum over each cell's perturbations of `s(dose) * E[id]`, as one
    /// `embedding_bag` over the CSR of doses.
    pub fn perturbation_latent(&self, perts: &DevicePerts) -> Result<Tensor> {
        let scaled = self.dose_response(&perts.ids, &perts.doses)?;
        let table = self.perturbation_embeddings()?;
        let (z, _, _, _) =
            Tensor::f_embedding_bag(&table, &perts.ids, &perts.offsets, false, 0, false, Some(&scaled), true)
                .torch()?;
        Ok(z)
    }

    /// The same as [`perturbation_latent`](Self::perturbation_latent) through a dense cells x
    /// vocabulary matrix of scaled doses times the embedding table (for checking the sparse path).
    pub fn perturbation_latent_dense(&self, perts: &DevicePerts, n_cells: i64) -> Result<Tensor> {
        let scaled = self.dose_response(&perts.ids, &perts.doses)?;
        let table = self.perturbation_embeddings()?;
        let dense = Tensor::f_zeros([n_cells, table.size()[0]], (Kind::Float, table.device())).torch()?;
        let lengths = perts.offsets.f_diff(1, 0, None::<&Tensor>, None::<&Tensor>).torch()?;
        let rows = Tensor::f_repeat_interleave(&lengths, perts.ids.size()[0]).torch()?;
        let dense = dense.f_index_put(&[Some(rows), Some(perts.ids.shallow_clone())], &scaled, true).torch()?;
        dense.f_matmul(&table).torch()
    }

    /// Covariate embeddings of each covariate, cells x latent.
    pub fn covariate_latents(&self, codes: &[Tensor]) -> Result<Vec<Tensor>> {
        if codes.len() != self.covariate_embeddings.len() {
            return Err(Error::InvalidInput(format!(
                "{} covariate code vectors for a model with {} covariates",
                codes.len(),
                self.covariate_embeddings.len()
            )));
        }
        self.covariate_embeddings.iter().zip(codes).map(|(e, c)| e.f_index_select(0, c).torch()).collect()
    }

    /// Composes the latents from `z_basal`, `z_pert` and per-covariate embeddings.
    pub fn compose(&self, z_basal: &Tensor, z_pert: &Tensor, covariates: &[Tensor]) -> Result<Latents> {
        let mut z_covs = z_basal.f_zeros_like().torch()?;
        let mut z_covs_no_batch = z_basal.f_zeros_like().torch()?;
        for (cov, emb) in self.vocab.covariates.iter().zip(covariates) {
            z_covs = z_covs.f_add(emb).torch()?;
            if !cov.is_batch {
                z_covs_no_batch = z_covs_no_batch.f_add(emb).torch()?;
            }
        }
        Ok(Latents {
            z: z_basal.f_add(z_pert).torch()?.f_add(&z_covs).torch()?,
            z_corrected: z_basal.f_add(z_pert).torch()?.f_add(&z_covs_no_batch).torch()?,
            z_no_pert: z_basal.f_add(&z_covs).torch()?,
            z_no_pert_corrected: z_basal.f_add(&z_covs_no_batch).torch()?,
            z_basal: z_basal.shallow_clone(),
            z_pert: z_pert.shallow_clone(),
            z_covs,
        })
    }

    /// Decodes latents with the cells' library sizes (count models). `z_pert` is the
    /// perturbation term of `z`, which a model with `perturbation_skip` also adds to the heads'
    /// output.
    pub fn decode(
        &self,
        z: &Tensor,
        z_pert: &Tensor,
        library: Option<&Tensor>,
        train: bool,
        noise: &mut Noise,
    ) -> Result<Generative> {
        let h = self.decoder.forward(z, train, self.precision, noise)?;
        match &self.heads {
            Heads::Counts { scale, zi, log_theta } => {
                let library = library.ok_or_else(|| Error::InvalidInput("count decoder needs library sizes".into()))?;
                let logits = self.with_skip(scale.forward(&h, self.precision)?, z_pert)?;
                let px_scale = logits.f_softmax(-1, Kind::Float).torch()?;
                let mu = px_scale.f_mul(&library.f_exp().torch()?).torch()?;
                let zi_logits = zi.as_ref().map(|l| l.forward(&h, self.precision)).transpose()?;
                Ok(Generative::Counts { mu, theta: log_theta.f_exp().torch()?, zi_logits })
            }
            Heads::Gauss { mean, var } => Ok(Generative::Gauss {
                mean: self.with_skip(mean.forward(&h, self.precision)?, z_pert)?,
                var: var.forward(&h, self.precision)?.f_exp().torch()?.f_add_scalar(VAR_EPS).torch()?,
            }),
        }
    }

    /// The predicted mean only, in evaluation mode: what prediction needs, without the dispersion,
    /// zero-inflation or variance heads and with the library scaling done in place (one
    /// cells x genes tensor fewer per call than [`CpaModel::decode`]).
    pub fn decode_mean(
        &self,
        z: &Tensor,
        z_pert: &Tensor,
        library: Option<&Tensor>,
        noise: &mut Noise,
    ) -> Result<Tensor> {
        let h = self.decoder.forward(z, false, self.precision, noise)?;
        match &self.heads {
            Heads::Counts { scale, .. } => {
                let library = library.ok_or_else(|| Error::InvalidInput("count decoder needs library sizes".into()))?;
                let logits = self.with_skip(scale.forward(&h, self.precision)?, z_pert)?;
                let mut mu = logits.f_softmax(-1, Kind::Float).torch()?;
                let _ = mu.f_mul_(&library.f_exp().torch()?).torch()?;
                Ok(mu)
            }
            Heads::Gauss { mean, .. } => {
                Ok(self.with_skip(mean.forward(&h, self.precision)?, z_pert)?.f_to_kind(Kind::Float).torch()?)
            }
        }
    }

    /// Decodes latents in training mode and scores the counts `x` (their non-zero `entries`
    /// where known): the per-cell log-likelihood, as [`decode`](Self::decode) then
    /// [`log_likelihood`](Self::log_likelihood) give it, and the decoder's output. An `nb` model
    /// takes the fused likelihood (one autograd node, [`fused_nb`]) where this build has it and
    /// the entries are known; the others autograd's graph.
    pub fn reconstruct(
        &self,
        x: &Tensor,
        entries: Option<&Entries>,
        z: &Tensor,
        z_pert: &Tensor,
        library: Option<&Tensor>,
        noise: &mut Noise,
    ) -> Result<(Tensor, Generative)> {
        if let (true, Some(entries), Some(library), Heads::Counts { scale, zi: None, log_theta }) =
            (fused_nb::AVAILABLE, entries, library, &self.heads)
        {
            let h = self.decoder.forward(z, true, self.precision, noise)?;
            let logits = self.with_skip(scale.forward(&h, self.precision)?, z_pert)?;
            let (ll, mu) =
                fused_nb::nb_log_likelihood(&logits.f_contiguous().torch()?, library, log_theta, entries, LOG_EPS)
                    .map_err(|e| Error::InvalidInput(format!("the NB likelihood: {e}")))?;
            let theta = log_theta.f_detach().torch()?.f_exp().torch()?;
            return Ok((ll, Generative::Counts { mu, theta, zi_logits: None }));
        }
        let generative = self.decode(z, z_pert, library, true, noise)?;
        Ok((self.log_likelihood(x, entries, &generative)?, generative))
    }

    /// A head's output plus `W z_pert` when the model has `perturbation_skip`.
    fn with_skip(&self, out: Tensor, z_pert: &Tensor) -> Result<Tensor> {
        match &self.skip {
            Some(w) => out.f_add(&affine(z_pert, w, None, self.precision)?).torch(),
            None => Ok(out),
        }
    }

    /// Per-cell reconstruction log-likelihood (summed over genes). With the non-zero `entries`
    /// of `x`, count likelihoods compute their gamma-function terms on those entries only.
    pub fn log_likelihood(&self, x: &Tensor, entries: Option<&Entries>, generative: &Generative) -> Result<Tensor> {
        if let (Some(entries), Generative::Counts { mu, theta, zi_logits }) = (entries, generative) {
            return count_log_likelihood_sparse(x, entries, mu, theta, zi_logits.as_ref()).torch();
        }
        let ll = match generative {
            Generative::Counts { mu, theta, zi_logits: None } => log_nb(x, mu, theta).torch()?,
            Generative::Counts { mu, theta, zi_logits: Some(pi) } => log_zinb(x, mu, theta, pi).torch()?,
            Generative::Gauss { mean, var } => log_normal(x, mean, var).torch()?,
        };
        ll.f_sum_dim_intlist(-1, false, Kind::Float).torch()
    }

    /// Perturbation-condition logits of the adversary.
    pub fn classify_perturbation(&self, z_basal: &Tensor, train: bool, noise: &mut Noise) -> Result<Tensor> {
        self.pert_classifier.forward(z_basal, train, self.precision, noise)
    }

    /// Covariate logits of the adversaries (`None` for covariates with one category).
    pub fn classify_covariates(&self, z_basal: &Tensor, train: bool, noise: &mut Noise) -> Result<Vec<Option<Tensor>>> {
        self.covariate_classifiers
            .iter()
            .map(|c| c.as_ref().map(|c| c.forward(z_basal, train, self.precision, noise)).transpose())
            .collect()
    }

    /// Class weights of the perturbation adversary on the device.
    pub fn class_weights(&self) -> &Tensor {
        &self.class_weights
    }

    /// Whether the encoder is variational.
    pub fn is_variational(&self) -> bool {
        self.encoder.var.is_some()
    }

    /// Counterfactual means: encodes the source cells `x` (evaluation mode), keeps their
    /// `z_basal`, adds the target perturbations and covariates, and decodes with the source
    /// cells' library sizes. A variational model averages the means of `n_samples` draws.
    pub fn counterfactual(
        &self,
        x: &Tensor,
        target_perts: &DevicePerts,
        target_covariates: &[Tensor],
        noise: &mut Noise,
    ) -> Result<Tensor> {
        tch::no_grad(|| {
            let (x_in, library) = self.input(x)?;
            let z_pert = self.perturbation_latent(target_perts)?;
            let covs = self.covariate_latents(target_covariates)?;
            let draws = self.basal_draws(&x_in, noise)?;
            self.mean_over_draws(&draws, &z_pert, &covs, library.as_ref(), noise)
        })
    }

    /// The `z_basal` a prediction decodes from: the posterior mean, or `n_samples` posterior
    /// draws for a variational model (evaluation mode).
    pub fn basal_draws(&self, x_in: &Tensor, noise: &mut Noise) -> Result<Vec<Tensor>> {
        if self.is_variational() {
            (0..self.config.model.n_samples.max(1))
                .map(|_| Ok(self.encode(x_in, false, true, noise)?.z_basal))
                .collect()
        } else {
            Ok(vec![self.encode(x_in, false, false, noise)?.z_basal])
        }
    }

    /// The predicted means (float32) of each `z_basal` draw composed with the perturbation and
    /// covariate latents, averaged over the draws; accumulated in place (one cells x genes
    /// tensor per draw, none for the average).
    pub fn mean_over_draws(
        &self,
        draws: &[Tensor],
        z_pert: &Tensor,
        covariates: &[Tensor],
        library: Option<&Tensor>,
        noise: &mut Noise,
    ) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for z_basal in draws {
            let z = self.compose(z_basal, z_pert, covariates)?.z;
            let mean = self.decode_mean(&z, z_pert, library, noise)?;
            sum = Some(match sum {
                None => mean,
                Some(mut s) => {
                    let _ = s.f_add_(&mean).torch()?;
                    s
                }
            });
        }
        let mut sum = sum.ok_or_else(|| Error::InvalidInput("no draws".into()))?;
        if draws.len() > 1 {
            let _ = sum.f_div_scalar_(draws.len() as f64).torch()?;
        }
        Ok(sum)
    }

    /// The zero-inflation probabilities (`sigmoid` of the zinb head's logits, float32) of each
    /// `z_basal` draw composed with the perturbation and covariate latents, averaged over the
    /// draws as [`mean_over_draws`](CpaModel::mean_over_draws) averages the means; `None` for a
    /// model without zero inflation.
    pub fn zero_probability_over_draws(
        &self,
        draws: &[Tensor],
        z_pert: &Tensor,
        covariates: &[Tensor],
        noise: &mut Noise,
    ) -> Result<Option<Tensor>> {
        let Heads::Counts { zi: Some(zi), .. } = &self.heads else { return Ok(None) };
        let mut sum: Option<Tensor> = None;
        for z_basal in draws {
            let z = self.compose(z_basal, z_pert, covariates)?.z;
            let h = self.decoder.forward(&z, false, self.precision, noise)?;
            let p = zi.forward(&h, self.precision)?.f_sigmoid().torch()?.f_to_kind(Kind::Float).torch()?;
            sum = Some(match sum {
                None => p,
                Some(s) => s.f_add(&p).torch()?,
            });
        }
        let sum = sum.ok_or_else(|| Error::InvalidInput("no draws".into()))?;
        if draws.len() > 1 { sum.f_div_scalar(draws.len() as f64).torch().map(Some) } else { Ok(Some(sum)) }
    }

    /// The fixed perturbation features (perturbations x features, as given to training), when
    /// the model projects features.
    pub fn perturbation_feature_table(&self) -> Option<&Tensor> {
        match &self.embedding {
            PertEmbedding::Free(_) => None,
            PertEmbedding::Features { features, .. } => Some(features),
        }
    }

    /// Width of the fixed perturbation features, when the model projects features.
    pub fn perturbation_feature_width(&self) -> Option<i64> {
        match &self.embedding {
            PertEmbedding::Free(_) => None,
            PertEmbedding::Features { features, .. } => features.size().get(1).copied(),
        }
    }
}
