//! Pass 2 of an evaluation: the control cells of each covariate combination, gathered by the
//! batcher in store order, decoded into every evaluated condition of those covariates; the moments
//! of the predicted `log1p(mean)` (or mean, or the expected log1p of the predicted counts) per
//! condition, accumulated on the device.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::model::layers::Noise;
use crate::model::likelihood::expected_log1p_nb;
use crate::model::{CpaModel, PerturbationCsr};
use cpa_stream_stages::store::Store;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Device, Kind, Tensor};

use super::EvalSplit;
use super::conditions::SourceSplits;
use crate::batcher::{Feeder, Loaded, LoaderOptions, PoolStats, spawn_fed};
use crate::condition::ConditionKey;
use crate::context::RunContext;
use crate::crew::Crew;
use crate::encoder::CellLabels;
use crate::error::{Error, Result};
use crate::predictor::targets::Target;
use crate::stats::Moments;

use super::samples::{Samples, sampler};
use crate::Stage;
use crate::model::ToDevice as _;
use crate::telemetry::StageStats;
use crate::torch::{TorchResult, torch_error};

/// Rows decoded at once on the CPU: the per-target transients (decoded means and their float64
/// moments) stay about 5 MB at 5,000 genes. Measured at 1M cells x 5,000 genes
/// (`docs/benchmarks.md`): 128 decodes as fast as 256 with 25 MB less peak memory; 64 is slower.
pub(super) const CPU_STEP_ROWS: usize = 128;

/// Cells the planner scans between progress reports.
const CHUNK_CELLS: u64 = 4096;

/// What the decoding pass reads: which control cells go into which conditions.
pub(super) struct Decode<'a> {
    pub(super) model: &'a CpaModel,
    pub(super) store: &'a Arc<Store>,
    pub(super) labels: &'a CellLabels,
    /// Per label group: its covariate codes and the splits decoded, for the control groups used.
    pub(super) source_of_group: &'a [Option<(Vec<u32>, SourceSplits)>],
    pub(super) targets: &'a [(ConditionKey, Target)],
    pub(super) split: EvalSplit,
    pub(super) batch_size: usize,
    pub(super) loader: LoaderOptions,
    pub(super) count_model: bool,
    /// The `nb` inverse dispersion when the expected log1p of the counts is scored.
    pub(super) theta: Option<&'a Tensor>,
    /// Predicted cells kept per target at most ([`super::samples`]).
    pub(super) sample_cap: usize,
    /// An `nb` model's inverse dispersion per gene: the sampled predicted cells are count draws
    /// (log1p), like the real cells, instead of means.
    pub(super) sample_theta: Option<Vec<f64>>,
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
    fn decode(&self, mut loaded: Loaded<Vec<u32>>, stats: &StageStats) -> Result<Decoded> {
        let torch = Error::stage(Stage::Predictor);
        let model = self.model;
        let device = model.device();
        let mut by_covariates: HashMap<&[u32], Vec<usize>> = HashMap::new();
        for (i, (key, _)) in self.targets.iter().enumerate() {
            by_covariates.entry(&key.covariates).or_default().push(i);
        }
        let mut sums: Vec<Option<(Tensor, Tensor)>> = (0..self.targets.len()).map(|_| None).collect();
        let mut counts = vec![0u64; self.targets.len()];
        let mut samples = Samples::new(self.targets.len(), self.sample_cap, self.store.n_vars() as usize);
        let mut rng = sampler(2);
        let mut noise = Noise::new(Xoshiro256PlusPlus::seed_from_u64(0), device);
        let mut perts = PerturbationCsr::new();
        while let Some(gathered) = loaded.next(stats) {
            let gathered = gathered?;
            let covs = &gathered.meta;
            let n = gathered.batch.counts.n_rows();
            // On the CPU a few hundred rows at a time: the transient cells x genes tensors (input,
            // decoder output, float64 moments) stay a few MB whatever the batch, so memory does not
            // grow as batches fill up on larger stores.
            let chunk = if device.is_cuda() { n.max(1) } else { CPU_STEP_ROWS };
            let mut step = || -> cpa_stream_stages::Result<()> {
                for start in (0..n).step_by(chunk) {
                    let rows = start..(start + chunk).min(n);
                    let n = rows.len();
                    let (x, _) = crate::model::batch::densify_range(&gathered.batch.counts, rows, device)?;
                    for &t in by_covariates.get(covs.as_slice()).map(Vec::as_slice).unwrap_or(&[]) {
                        perts.clear();
                        perts.push_repeated(&self.targets[t].1.parts, n);
                        let covariates = covs
                            .iter()
                            .map(|&c| Tensor::f_full([n as i64], i64::from(c), (Kind::Int64, device)).torch())
                            .collect::<cpa_stream_stages::Result<Vec<_>>>()?;
                        let mean = model
                            .counterfactual(&x, &perts.to_device(device)?, &covariates, &mut noise)?
                            .f_to_kind(Kind::Double)
                            .torch()?;
                        let v = match (self.count_model, self.theta) {
                            (true, Some(theta)) => expected_log1p_nb(&mean, theta).torch()?,
                            (true, None) => mean.f_log1p().torch()?,
                            (false, _) => mean.shallow_clone(),
                        };
                        let (s, q) = (
                            v.f_sum_dim_intlist(0, false, Kind::Double).torch()?,
                            v.f_square().torch()?.f_sum_dim_intlist(0, false, Kind::Double).torch()?,
                        );
                        sums[t] = Some(match sums[t].take() {
                            None => (s, q),
                            Some((a, b)) => (a.f_add(&s).torch()?, b.f_add(&q).torch()?),
                        });
                        // The rows the target's sample keeps, copied to the host together.
                        let kept: Vec<(usize, usize)> =
                            (0..n).filter_map(|i| samples.offer(t, &mut rng).map(|slot| (i, slot))).collect();
                        if !kept.is_empty() {
                            let rows: Vec<i64> = kept.iter().map(|&(i, _)| i as i64).collect();
                            let index = Tensor::f_from_slice(&rows).torch()?.f_to_device(device).torch()?;
                            let source = if self.sample_theta.is_some() { &mean } else { &v };
                            let picked = source
                                .f_index_select(0, &index)
                                .torch()?
                                .f_to_kind(Kind::Float)
                                .torch()?
                                .f_to_device(Device::Cpu)
                                .torch()?
                                .f_contiguous()
                                .torch()?;
                            let mut flat = Vec::<f32>::try_from(&picked.f_flatten(0, -1).torch()?).torch()?;
                            if let Some(theta) = &self.sample_theta {
                                draw_log1p_counts(&mut flat, theta, &mut rng);
                            }
                            let width = flat.len() / kept.len();
                            // In offer order: a later row of this batch may replace an earlier one.
                            for (k, &(_, slot)) in kept.iter().enumerate() {
                                samples.put(t, slot, &flat[k * width..(k + 1) * width]).map_err(|source| {
                                    cpa_stream_stages::Error::Io { path: std::env::temp_dir(), source }
                                })?;
                            }
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
}

/// Replaces each predicted mean (rows of `theta.len()` genes) by `log1p` of a negative binomial
/// draw with that mean and the gene's inverse dispersion (a gamma-Poisson mixture).
fn draw_log1p_counts(values: &mut [f32], theta: &[f64], rng: &mut Xoshiro256PlusPlus) {
    use rand_distr::{Distribution, Gamma, Poisson};
    for row in values.chunks_mut(theta.len().max(1)) {
        for (v, &t) in row.iter_mut().zip(theta) {
            let mu = f64::from(*v);
            let rate = match Gamma::new(t, mu / t) {
                Ok(g) if mu > 0.0 && t > 0.0 => g.sample(rng),
                _ => 0.0,
            };
            let count = if rate > 0.0 { Poisson::new(rate).map_or(0.0, |p| p.sample(rng)) } else { 0.0 };
            *v = (count as f32).ln_1p();
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

impl Plan<'_> {
    /// The planner: each control cell joins its covariates' pending batch, sent when full;
    /// the partial batches go last, in covariate order.
    fn run(&self, mut feeder: Feeder<Vec<u32>>, ctx: &RunContext) {
        let mut pending: BTreeMap<Vec<u32>, Vec<u64>> = BTreeMap::new();
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
                let rows = pending.entry(covs.clone()).or_default();
                rows.push(cell);
                if rows.len() == batch_size && !feeder.send_reserved(std::mem::take(rows), covs.clone()) {
                    return;
                }
            }
            ctx.progress().advance(end - start);
            if ctx.stopped() {
                feeder.fail(Error::Interrupted);
                return;
            }
            start = end;
        }
        for (covs, rows) in pending {
            if !rows.is_empty() && !feeder.send_reserved(rows, covs) {
                return;
            }
        }
    }
}
