//! Pass 2 of an evaluation: the control cells of each covariate combination, gathered by the
//! batcher in store order, decoded into every evaluated condition of those covariates; the moments
//! of the predicted `log1p(mean)` (or mean, or the expected log1p of the predicted counts) per
//! condition, accumulated on the device.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::model::layers::Noise;
use crate::model::likelihood::expected_log1p_nb;
use crate::model::network::knows_nothing_of;
use crate::model::{CpaModel, DevicePerts, PerturbationCsr};
use cpa_stream_stages::store::Store;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Device, Kind, Tensor};

use super::EvalSplit;
use super::conditions::SourceSplits;
use crate::predictor::targets::Target;
use crate::predictor::to_anchor_space;
use cpa_stream_pipeline::batcher::{Feeder, Loaded, LoaderOptions, PoolStats, spawn_fed};
use cpa_stream_pipeline::condition::ConditionKey;
use cpa_stream_pipeline::context::RunContext;
use cpa_stream_pipeline::crew::Crew;
use cpa_stream_pipeline::encoder::CellLabels;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::stats::Moments;

use super::samples::{Samples, sampler};
use crate::Stage;
use crate::model::ToDevice as _;
use crate::torch::{TorchResult, torch_error};
use cpa_stream_pipeline::telemetry::StageStats;

/// Rows decoded at once on the CPU: the per-target transients (decoded means and their float64
/// moments) stay about 5 MB at 5,000 genes. Measured at 1M cells x 5,000 genes
/// (`docs/benchmarks.md`): 128 decodes as fast as 256 with 25 MB less peak memory; 64 is slower.
pub(super) const CPU_STEP_ROWS: usize = 128;

/// Cells the planner scans between progress reports.
const CHUNK_CELLS: u64 = 4096;

/// One model of the decoding pass, with what it needs besides its weights.
pub(super) struct Decoder<'a> {
    pub(super) model: &'a CpaModel,
    /// The `nb` inverse dispersion when the expected log1p of the counts is scored.
    pub(super) theta: Option<Tensor>,
    /// An `nb` model's inverse dispersion per gene: the sampled predicted cells are count draws
    /// (log1p), like the real cells, instead of means.
    pub(super) sample_theta: Option<Vec<f64>>,
    /// The perturbations the model gives no effect: a condition of these alone is decoded as the
    /// control, each (control) cell under its own condition.
    pub(super) effectless: Vec<u32>,
}

/// What the decoding pass reads: which control cells go into which conditions, decoded by which
/// models.
pub(super) struct Decode<'a> {
    /// The models whose predictions are averaged (an ensemble), the first first; one or more.
    pub(super) models: &'a [Decoder<'a>],
    pub(super) store: &'a Arc<Store>,
    pub(super) labels: &'a CellLabels,
    /// Per label group: its covariate codes and the splits decoded, for the control groups used.
    pub(super) source_of_group: &'a [Option<(Vec<u32>, SourceSplits)>],
    /// Per label group: its perturbations and doses in the model's vocabulary (the source cells'
    /// own condition, which the anchored prediction decodes them under).
    pub(super) parts_of_group: &'a [Option<Vec<(u32, f32)>>],
    pub(super) targets: &'a [(ConditionKey, Target)],
    pub(super) split: EvalSplit,
    pub(super) batch_size: usize,
    pub(super) loader: LoaderOptions,
    pub(super) count_model: bool,
    /// Score the anchored prediction: each cell's observed values (the encoder's input) moved by
    /// the mean over the models of the change from its own (control) condition to the target's.
    pub(super) anchored: bool,
    /// Predicted cells kept per target at most ([`super::samples`]).
    pub(super) sample_cap: usize,
}

/// What the decoding pass produced: per condition the moments of the predictions and its index
/// among the samples of predicted cells.
pub(super) struct Decoded {
    pub(super) conditions: HashMap<ConditionKey, (Moments, usize)>,
    pub(super) samples: Samples,
}

/// The counters of the decoding pass's stages.
pub(super) struct DecodeStats {
    pub(super) planner: Arc<StageStats>,
    pub(super) pool: PoolStats,
    pub(super) predictor: Arc<StageStats>,
}

impl DecodeStats {
    pub(super) fn new(loader: LoaderOptions) -> DecodeStats {
        DecodeStats {
            planner: StageStats::new(Stage::Planner, 1),
            pool: PoolStats::fed(loader.workers),
            predictor: StageStats::new(Stage::Predictor, 1),
        }
    }
}

/// One model's encoding of a step's cells.
struct Encoded {
    /// The encoder's input: the observed values in the space the anchored prediction moves in.
    input: Tensor,
    /// Log library sizes (count models).
    library: Option<Tensor>,
    /// The `z_basal` decoded from (a variational model's posterior draws).
    draws: Vec<Tensor>,
    /// The cells' covariate latents.
    covariates: Vec<Tensor>,
}

impl Encoded {
    /// The predicted means (float32) of these cells under the perturbations `perts`, with their
    /// own covariates and library sizes.
    fn decode(&self, model: &CpaModel, perts: &DevicePerts, noise: &mut Noise) -> cpa_stream_stages::Result<Tensor> {
        let z_pert = model.perturbation_latent(perts)?;
        model.mean_over_draws(&self.draws, &z_pert, &self.covariates, self.library.as_ref(), noise)
    }
}

impl Decode<'_> {
    /// Runs the pass: a planner thread groups the control cells by covariates into batches, the
    /// batcher gathers them, and this thread decodes them.
    pub(super) fn run(&self, stats: &DecodeStats, ctx: &RunContext) -> Result<Decoded> {
        std::thread::scope(|scope| {
            let mut crew = Crew::new();
            let (feeder, loaded) =
                spawn_fed(self.store, self.loader, Arc::clone(&stats.planner), stats.pool.clone(), crew.stop_flag())?;
            let plan = Plan {
                labels: self.labels,
                source_of_group: self.source_of_group,
                split: self.split,
                batch_size: self.batch_size.max(1),
            };
            crew.spawn_in(scope, Stage::Planner, Stage::Planner.name().to_owned(), move || plan.run(feeder, ctx))?;
            let decoded = self.decode(loaded, &stats.predictor);
            // The planner ends with its jobs, or at the stop when the decoding failed.
            if decoded.is_err() {
                crew.stop();
            }
            crew.join()?;
            decoded
        })
    }

    /// Decodes every gathered batch into the targets of its covariates.
    fn decode(&self, mut loaded: Loaded<Job>, stats: &StageStats) -> Result<Decoded> {
        let torch = Error::stage(Stage::Predictor);
        let device = self.models[0].model.device();
        let mut by_covariates: HashMap<&[u32], Vec<usize>> = HashMap::new();
        for (i, (key, _)) in self.targets.iter().enumerate() {
            by_covariates.entry(&key.covariates).or_default().push(i);
        }
        // Per target, per model: whether the model knows nothing of it (decoded as the control).
        let as_control: Vec<Vec<bool>> = self
            .targets
            .iter()
            .map(|(_, target)| self.models.iter().map(|d| knows_nothing_of(&target.parts, &d.effectless)).collect())
            .collect();
        let mut sums: Vec<Option<(Tensor, Tensor)>> = (0..self.targets.len()).map(|_| None).collect();
        let mut counts = vec![0u64; self.targets.len()];
        let mut samples = Samples::new(self.targets.len(), self.sample_cap, self.store.n_vars() as usize);
        let mut rng = sampler(2);
        let mut noise = Noise::new(Xoshiro256PlusPlus::seed_from_u64(0), device);
        let mut perts = PerturbationCsr::new();
        while let Some(gathered) = loaded.next(stats) {
            let gathered = gathered?;
            let Job { covariates: covs, groups } = &gathered.meta;
            let n = gathered.batch.counts.n_rows();
            // On the CPU a few hundred rows at a time: the transient cells x genes tensors (input,
            // decoder output, float64 moments) stay a few MB whatever the batch, so memory does not
            // grow as batches fill up on larger stores.
            let chunk = if device.is_cuda() { n.max(1) } else { CPU_STEP_ROWS };
            let mut step = || -> cpa_stream_stages::Result<()> {
                for start in (0..n).step_by(chunk) {
                    let rows = start..(start + chunk).min(n);
                    let n = rows.len();
                    let (x, _) = crate::model::batch::densify_range(&gathered.batch.counts, rows.clone(), device)?;
                    let covariates = covs
                        .iter()
                        .map(|&c| Tensor::f_full([n as i64], i64::from(c), (Kind::Int64, device)).torch())
                        .collect::<cpa_stream_stages::Result<Vec<_>>>()?;
                    let encoded = self.encode(&x, &covariates, &mut noise)?;
                    let mine = by_covariates.get(covs.as_slice()).map(Vec::as_slice).unwrap_or(&[]);
                    // The cells' own (control) conditions: the anchored prediction's reference,
                    // and the target of a model that knows nothing of a condition.
                    let own = match self.anchored || mine.iter().any(|&t| as_control[t].contains(&true)) {
                        true => {
                            perts.clear();
                            for &g in &groups[rows.clone()] {
                                perts.push(self.parts_of_group[g as usize].as_deref().unwrap_or(&[]));
                            }
                            Some(perts.to_device(device)?)
                        }
                        false => None,
                    };
                    let bases = match (&own, self.anchored) {
                        (Some(own), true) => self.anchor_bases(&encoded, own, &mut noise)?,
                        _ => Vec::new(),
                    };
                    for &t in mine {
                        perts.clear();
                        perts.push_repeated(&self.targets[t].1.parts, n);
                        let written = perts.to_device(device)?;
                        let target: Vec<&DevicePerts> = as_control[t]
                            .iter()
                            .map(|&c| match (&own, c) {
                                (Some(own), true) => own,
                                _ => &written,
                            })
                            .collect();
                        let (v, means) = self.scored_values(&encoded, &target, &bases, &mut noise)?;
                        let (s, q) = (
                            v.f_sum_dim_intlist(0, false, Kind::Double).torch()?,
                            v.f_square().torch()?.f_sum_dim_intlist(0, false, Kind::Double).torch()?,
                        );
                        sums[t] = Some(match sums[t].take() {
                            None => (s, q),
                            Some((a, b)) => (a.f_add(&s).torch()?, b.f_add(&q).torch()?),
                        });
                        // The rows the target's sample keeps.
                        let kept: Vec<(usize, usize)> =
                            (0..n).filter_map(|i| samples.offer(t, &mut rng).map(|slot| (i, slot))).collect();
                        let picked = self.sampled_rows(&kept, &means, &v, &mut rng)?;
                        // In offer order: a later row of this batch may replace an earlier one.
                        for (&(_, slot), row) in kept.iter().zip(&picked) {
                            samples.put(t, slot, row).map_err(|source| cpa_stream_stages::Error::Io {
                                path: std::env::temp_dir(),
                                source,
                            })?;
                        }
                        counts[t] += n as u64;
                    }
                }
                Ok(())
            };
            stats.busy(|| tch::no_grad(&mut step)).map_err(torch)?;
            stats.add(n as u64, gathered.batch.counts.byte_size());
            loaded.recycle(gathered.batch);
        }
        let host = |t: &Tensor| -> Result<Vec<f64>> {
            let t = t.f_to_device(Device::Cpu).map_err(|e| torch(torch_error(e)))?;
            Vec::<f64>::try_from(&t).map_err(|e| torch(torch_error(e)))
        };
        let mut conditions = HashMap::new();
        for (t, (key, _)) in self.targets.iter().enumerate() {
            let Some((s, q)) = sums[t].take() else { continue };
            conditions.insert(key.clone(), (Moments::from_sums(counts[t] as f64, host(&s)?, host(&q)?), t));
        }
        Ok(Decoded { conditions, samples })
    }

    /// Each model's encoding of a step's cells `x` with covariate codes `covariates`, shared by
    /// every target they are decoded into and by their own condition's decoding (a variational
    /// model's draws among them, as `predict` decodes one set of draws under every condition).
    fn encode(&self, x: &Tensor, covariates: &[Tensor], noise: &mut Noise) -> cpa_stream_stages::Result<Vec<Encoded>> {
        self.models
            .iter()
            .map(|d| {
                let (input, library) = d.model.input(x)?;
                let draws = d.model.basal_draws(&input, noise)?;
                let covariates = d.model.covariate_latents(covariates)?;
                Ok(Encoded { input, library, draws, covariates })
            })
            .collect()
    }

    /// Per model, the cells' observed values (the encoder's input) minus their decoding under
    /// their own condition (`own`, each cell's label group's parts), in the space the anchored
    /// prediction's change is taken in.
    fn anchor_bases(
        &self,
        encoded: &[Encoded],
        own: &DevicePerts,
        noise: &mut Noise,
    ) -> cpa_stream_stages::Result<Vec<Tensor>> {
        self.models
            .iter()
            .zip(encoded)
            .map(|(d, e)| {
                let observed = e.input.f_to_kind(Kind::Double).torch()?;
                let mean = e.decode(d.model, own, noise)?;
                observed.f_sub(&to_anchor_space(d.model, &mean).torch()?).torch()
            })
            .collect()
    }

    /// The scored values of the `encoded` cells decoded into `target` (one per model; cells x
    /// genes, float64),
    /// averaged over the models as `predict --ensemble` averages its columns: log1p of the
    /// averaged means (count models), or the mean of each model's expected log1p or anchored
    /// values (`bases` from [`Decode::anchor_bases`]); and each model's predicted means.
    fn scored_values(
        &self,
        encoded: &[Encoded],
        target: &[&DevicePerts],
        bases: &[Tensor],
        noise: &mut Noise,
    ) -> cpa_stream_stages::Result<(Tensor, Vec<Tensor>)> {
        let mut means = Vec::with_capacity(self.models.len());
        let mut total: Option<Tensor> = None;
        for (m, ((d, e), target)) in self.models.iter().zip(encoded).zip(target).enumerate() {
            let mean = e.decode(d.model, target, noise)?.f_to_kind(Kind::Double).torch()?;
            let value = match (self.anchored, self.count_model, &d.theta) {
                (true, _, _) => to_anchor_space(d.model, &mean).torch()?.f_add(&bases[m]).torch()?,
                (false, true, Some(theta)) => expected_log1p_nb(&mean, theta).torch()?,
                (false, _, _) => mean.shallow_clone(),
            };
            total = Some(match total.take() {
                None => value,
                Some(sum) => sum.f_add(&value).torch()?,
            });
            means.push(mean);
        }
        // One model at least: the evaluated run's.
        let Some(total) = total else { return Ok((Tensor::new(), means)) };
        let average = match self.models.len() {
            1 => total,
            k => total.f_div_scalar(k as f64).torch()?,
        };
        let scored = match (self.anchored, self.count_model, self.models[0].theta.is_some()) {
            (false, true, false) => average.f_log1p().torch()?,
            _ => average,
        };
        Ok((scored, means))
    }

    /// The rows `kept` (row, slot) of a target's sample, in their order: for a count model
    /// scored plainly, log1p of a count drawn from one model's predicted distribution each (the
    /// models in turn, row by row: a sample of their equal mixture); otherwise the scored
    /// values `v` themselves.
    fn sampled_rows(
        &self,
        kept: &[(usize, usize)],
        means: &[Tensor],
        v: &Tensor,
        rng: &mut Xoshiro256PlusPlus,
    ) -> cpa_stream_stages::Result<Vec<Vec<f32>>> {
        let mut picked = vec![Vec::new(); kept.len()];
        let k = self.models.len();
        for (m, d) in self.models.iter().enumerate() {
            let mine: Vec<usize> = (0..kept.len()).filter(|&j| kept[j].0 % k == m).collect();
            if mine.is_empty() {
                continue;
            }
            let rows: Vec<i64> = mine.iter().map(|&j| kept[j].0 as i64).collect();
            let source = if d.sample_theta.is_some() { &means[m] } else { v };
            let index = Tensor::f_from_slice(&rows).torch()?.f_to_device(source.device()).torch()?;
            let host = source
                .f_index_select(0, &index)
                .torch()?
                .f_to_kind(Kind::Float)
                .torch()?
                .f_to_device(Device::Cpu)
                .torch()?
                .f_contiguous()
                .torch()?;
            let mut flat = Vec::<f32>::try_from(&host.f_flatten(0, -1).torch()?).torch()?;
            if let Some(theta) = &d.sample_theta {
                draw_log1p_counts(&mut flat, theta, rng);
            }
            let width = flat.len() / mine.len();
            for (r, &j) in mine.iter().enumerate() {
                picked[j] = flat[r * width..(r + 1) * width].to_vec();
            }
        }
        Ok(picked)
    }
}

/// Replaces each predicted mean (rows of `theta.len()` genes) by `log1p` of a negative binomial
/// draw with that mean and the gene's inverse dispersion (a gamma-Poisson mixture).
fn draw_log1p_counts(values: &mut [f32], theta: &[f64], rng: &mut Xoshiro256PlusPlus) {
    for row in values.chunks_mut(theta.len().max(1)) {
        for (v, &t) in row.iter_mut().zip(theta) {
            *v = (crate::model::likelihood::draw_nb(f64::from(*v), t, rng) as f32).ln_1p();
        }
    }
}

/// The planner's view of the pass (no model: it runs on a thread of its own).
struct Plan<'a> {
    labels: &'a CellLabels,
    source_of_group: &'a [Option<(Vec<u32>, SourceSplits)>],
    split: EvalSplit,
    batch_size: usize,
}

/// A batch the planner sends: the covariates its cells share, and each cell's label group.
pub(super) struct Job {
    covariates: Vec<u32>,
    groups: Vec<u32>,
}

impl Plan<'_> {
    /// The planner: each control cell joins its covariates' pending batch, sent when full;
    /// the partial batches go last, in covariate order.
    fn run(&self, mut feeder: Feeder<Job>, ctx: &RunContext) {
        let mut pending: BTreeMap<Vec<u32>, (Vec<u64>, Vec<u32>)> = BTreeMap::new();
        let batch_size = self.batch_size;
        let n = self.labels.n_cells();
        let mut start = 0u64;
        while start < n {
            let end = (start + CHUNK_CELLS).min(n);
            for cell in start..end {
                let Some((covs, choice)) = &self.source_of_group[self.labels.group_id(cell) as usize] else { continue };
                if !choice.contains(self.split, self.labels.split(cell)) {
                    continue;
                }
                feeder.scan(cell);
                feeder.reserve(cell);
                let (rows, groups) = pending.entry(covs.clone()).or_default();
                rows.push(cell);
                groups.push(self.labels.group_id(cell));
                if rows.len() == batch_size {
                    let job = Job { covariates: covs.clone(), groups: std::mem::take(groups) };
                    if !feeder.send_reserved(std::mem::take(rows), job) {
                        return;
                    }
                }
            }
            ctx.progress().advance(end - start);
            if ctx.stopped() {
                feeder.fail(Error::Interrupted);
                return;
            }
            start = end;
        }
        for (covariates, (rows, groups)) in pending {
            if !rows.is_empty() && !feeder.send_reserved(rows, Job { covariates, groups }) {
                return;
            }
        }
    }
}
