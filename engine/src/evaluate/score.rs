//! Scoring each evaluated condition: its DEGs (a table's list, else a Welch t-test over its cells
//! against the controls, else the truth's change), then R2 of predicted against real means,
//! variances and changes on all genes and the top-k DEGs, the control-mean baseline, and the
//! truth's scores.

use std::collections::{BTreeMap, HashMap};

use crate::model::Vocabulary;

use super::conditions::{Condition, SourceSplits};
use super::field::{cosine, direction_match, mae, mse, overlap_at, pearson, perturbench_logfc, precision_at, spearman};
use super::moments::GroupMoments;
use super::outputs::DegRow;
use super::{
    BaselineMetrics, ConditionMetrics, DEG_OVERLAP_K, Definitions, Effects, EvaluateOptions, FieldMetrics, PlotData,
    TOP_K, TopMetrics, TruthMetrics,
};
use crate::predictor::targets::Target;
use cpa_stream_pipeline::condition::{ConditionKey, TruthRow};
use cpa_stream_pipeline::encoder::Split;
use cpa_stream_pipeline::obs::ObsKeys;
use cpa_stream_pipeline::stats::{Moments, benjamini_hochberg, r2_score, top_by_abs, welch_test};

/// A DEG is significant below this Benjamini-Hochberg q-value (cell-eval's FDR threshold).
pub const SIGNIFICANT_Q: f64 = 0.05;

/// A condition's test of every gene against the controls: Welch's t, its p-value and the
/// Benjamini-Hochberg q-value over the genes.
pub(super) struct Tested {
    score: Vec<f64>,
    pvalue: Vec<f64>,
    qvalue: Vec<f64>,
}

/// Everything scoring reads.
pub(super) struct Scoring<'a> {
    pub(super) vocab: &'a Vocabulary,
    pub(super) keys: &'a ObsKeys,
    pub(super) genes: &'a [String],
    pub(super) options: &'a EvaluateOptions,
    pub(super) moments: &'a GroupMoments,
    pub(super) conditions: &'a BTreeMap<ConditionKey, Condition>,
    /// Per covariate combination: the control cells' groups (every split).
    pub(super) control_groups: &'a HashMap<Vec<u32>, Vec<usize>>,
    /// Per covariate combination: which controls were decoded, and their moments.
    pub(super) sources: &'a HashMap<Vec<u32>, (SourceSplits, Moments)>,
    pub(super) truth: &'a HashMap<ConditionKey, TruthRow>,
    /// DEG lists by group name, and where they came from (`store` or `file`).
    pub(super) deg_table: Option<&'a super::DegLists>,
    /// The linear baseline, fitted once ([`Scoring::fit_ridge`]).
    pub(super) ridge: Option<super::ridge::Ridge>,
    /// The linear baseline on the model's perturbation features ([`Scoring::fit_feature_ridge`]).
    pub(super) feature_ridge: Option<super::ridge::Ridge>,
    /// Whether effects carry over between covariate values, and how much (the scaled
    /// other-covariates baseline's slope), measured once ([`Scoring::measure_transfer`]).
    pub(super) transfer: Option<super::transfer::Transfer>,
    /// Every perturbed condition's training shift ([`Scoring::training_shifts`]), taken once.
    pub(super) shifts: BTreeMap<ConditionKey, Vec<f64>>,
    /// Per covariate combination, the sum of its perturbed conditions' training shifts and how
    /// many they are: the context's mean response, less a condition's own.
    pub(super) context: HashMap<Vec<u32>, (Vec<f64>, usize)>,
    /// Per covariate combination, its perturbed cells of every split ([`Scoring::perturbed_cells`]).
    pub(super) perturbed: HashMap<Vec<u32>, Perturbed>,
    /// The model's perturbation embedding rows on the host ([`host_embeddings`]; empty where
    /// they could not be read).
    pub(super) embeddings: Vec<Vec<f64>>,
}

/// The perturbations the nearest-perturbations baseline averages.
pub const KNN_K: usize = 5;

/// The model's perturbation features on the host, one row per perturbation (`None` for a model
/// without features, or, with a warning, where they cannot be read).
pub(super) fn host_features(model: &crate::model::CpaModel) -> Option<Vec<Vec<f64>>> {
    let table = model.perturbation_feature_table()?;
    host_rows(table).map_err(|e| tracing::warn!("the model's perturbation features could not be read ({e})")).ok()
}

/// A 2-D tensor's rows as float64 vectors on the host.
fn host_rows(t: &tch::Tensor) -> Result<Vec<Vec<f64>>, String> {
    tch::no_grad(|| {
        let t =
            t.f_to_kind(tch::Kind::Double).and_then(|t| t.f_to_device(tch::Device::Cpu)).map_err(|e| e.to_string())?;
        let width = t.size().get(1).copied().unwrap_or(0).max(1) as usize;
        let flat = Vec::<f64>::try_from(&t.f_flatten(0, -1).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        Ok(flat.chunks(width).map(<[f64]>::to_vec).collect())
    })
}

/// The model's perturbation embedding rows on the host, for the nearest-perturbations baseline
/// (empty, with a warning, where they cannot be read).
pub(super) fn host_embeddings(model: &crate::model::CpaModel) -> Vec<Vec<f64>> {
    let rows = model.perturbation_embeddings().map_err(|e| e.to_string()).and_then(|t| host_rows(&t));
    rows.unwrap_or_else(|e| {
        tracing::warn!(
            "the model's perturbation embeddings could not be read ({e}): no nearest-perturbations baseline"
        );
        Vec::new()
    })
}

/// The perturbed cells of one covariate combination, every split: their moments and the sum of
/// their conditions' means (each condition once), the calibrated metrics' reference.
pub(super) struct Perturbed {
    cells: Moments,
    means: Vec<f64>,
    conditions: usize,
}

/// The calibrated metrics' per-gene weights and reference of a condition.
struct Calibration {
    /// Summing to 1.
    weights: Vec<f64>,
    /// The mean of the perturbed conditions' means.
    reference: Vec<f64>,
}

/// `sum(w (a - b)^2)`.
fn weighted_mse(a: &[f64], b: &[f64], w: &[f64]) -> f64 {
    a.iter().zip(b).zip(w).map(|((a, b), w)| w * (a - b) * (a - b)).sum()
}

/// sklearn's `r2_score(truth, pred, sample_weight=w)`: 1 minus the weighted squared error over
/// the weighted squares of the truth about its weighted mean.
fn weighted_r2(pred: &[f64], truth: &[f64], w: &[f64]) -> f64 {
    let total: f64 = w.iter().sum();
    let mean = truth.iter().zip(w).map(|(t, w)| t * w).sum::<f64>() / total;
    let residual = weighted_mse(pred, truth, w);
    let spread: f64 = truth.iter().zip(w).map(|(t, w)| w * (t - mean) * (t - mean)).sum();
    1.0 - residual / spread
}

/// R2 over the genes `idx` (all genes when `None`).
fn r2_on(pred: &[f64], truth: &[f64], idx: Option<&[usize]>) -> f64 {
    match idx {
        None => r2_score(pred, truth),
        Some(idx) => {
            let (p, t): (Vec<f64>, Vec<f64>) = idx.iter().map(|&i| (pred[i], truth[i])).unzip();
            r2_score(&p, &t)
        }
    }
}

/// The split-half ceiling of a condition: the means of one random half of its evaluated cells
/// (`second`; `real` is all of them) against the other's, as `r2_mean` and `pearson_delta` score
/// the model; NaN with fewer than 2 cells in a half.
fn ceiling(real: &Moments, second: &Moments, ctrl_mean: &[f64]) -> (f64, f64) {
    let Some((first, second)) = halves(real, second) else {
        return (f64::NAN, f64::NAN);
    };
    let delta = |m: &[f64]| -> Vec<f64> { m.iter().zip(ctrl_mean).map(|(a, b)| a - b).collect() };
    (r2_score(&first, &second), pearson(&delta(&first), &delta(&second)))
}

/// The means of the cells of `all` outside `second` and of `second` (a subset of them); `None`
/// with fewer than 2 cells in either.
fn halves(all: &Moments, second: &Moments) -> Option<(Vec<f64>, Vec<f64>)> {
    let first_n = all.n - second.n;
    if first_n < 2.0 || second.n < 2.0 {
        return None;
    }
    Some((all.sum.iter().zip(&second.sum).map(|(a, b)| (a - b) / first_n).collect(), second.mean()))
}

/// The interpolated duplicate of a condition whose evaluated cells are `all` (`second` their
/// second half) and its first half's means: per gene `a d + (1 - a) b`, `d` the second half's
/// mean, `b` the `baseline`, `a = 1 - q` with `q` the Benjamini-Hochberg value of Welch's test
/// of the second half against `control`; `None` with fewer than 2 cells in a half.
fn interpolated_duplicate(
    all: &Moments,
    second: &Moments,
    control: &Moments,
    baseline: &[f64],
) -> Option<(Vec<f64>, Vec<f64>)> {
    let (first, duplicate) = halves(all, second)?;
    if control.n < 2.0 {
        return None;
    }
    let (_, p) = welch_test(second, control);
    let q = benjamini_hochberg(&p);
    let interpolated = duplicate
        .iter()
        .zip(baseline)
        .zip(&q)
        .map(|((d, b), q)| {
            let a = if q.is_finite() { 1.0 - q } else { 0.0 };
            a * d + (1.0 - a) * b
        })
        .collect();
    Some((interpolated, first))
}

fn nan_unless(ok: bool, v: f64) -> f64 {
    if ok { v } else { f64::NAN }
}

impl Scoring<'_> {
    /// Scores one condition from its real and predicted moments; adds its DEGs to `deg_rows`.
    pub(super) fn score(
        &self,
        key: &ConditionKey,
        target: &Target,
        real: &Moments,
        predicted: &Moments,
        deg_rows: &mut Vec<DegRow>,
    ) -> ConditionMetrics {
        let (choice, control) = &self.sources[&key.covariates];
        let truth = self.truth.get(key);
        let ctrl_mean = control.mean();
        let (ranked, deg_source, tested) = self.degs(key, target, &ctrl_mean, truth);
        let group_name = target.deg_keys(self.vocab, self.keys).into_iter().next().unwrap_or_default();
        let largest_k = TOP_K[TOP_K.len() - 1];
        for (rank, &g) in ranked.iter().take(largest_k).enumerate() {
            let at = |v: fn(&Tested) -> &Vec<f64>| tested.as_ref().map_or(f64::NAN, |t| v(t)[g]);
            deg_rows.push(DegRow {
                group: group_name.clone(),
                rank,
                gene: self.genes[g].clone(),
                score: at(|t| &t.score),
                welch_p: at(|t| &t.pvalue),
                welch_q: at(|t| &t.qvalue),
                wilcoxon_p: f64::NAN,
                wilcoxon_q: f64::NAN,
            });
        }
        let (pred_mean, pred_var) = (predicted.mean(), predicted.var());
        let (real_mean, real_var) = (real.mean(), real.var());
        let has_real = real.n >= 1.0;
        let delta = |v: &[f64]| -> Vec<f64> { v.iter().zip(&ctrl_mean).map(|(a, b)| a - b).collect() };
        let (pd, rd) = (delta(&pred_mean), delta(&real_mean));
        let beats = r2_on(&pred_mean, &real_mean, None) > r2_on(&ctrl_mean, &real_mean, None);
        let top = TOP_K
            .iter()
            .map(|&k| {
                let idx = (ranked.len() >= k).then(|| &ranked[..k]);
                let score = |p: &[f64], t: &[f64]| idx.map_or(f64::NAN, |i| r2_on(p, t, Some(i)));
                TopMetrics {
                    k,
                    r2_mean: nan_unless(has_real, score(&pred_mean, &real_mean)),
                    r2_var: nan_unless(real.n >= 2.0, score(&pred_var, &real_var)),
                    r2_delta: nan_unless(has_real, score(&pd, &rd)),
                    r2_mean_control: nan_unless(has_real, score(&ctrl_mean, &real_mean)),
                }
            })
            .collect();
        let truth_metrics = truth.map(|t| {
            let td = delta(&t.mean_log1p);
            let top20 = (ranked.len() >= 20).then(|| &ranked[..20]);
            TruthMetrics {
                r2_mean: r2_score(&pred_mean, &t.mean_log1p),
                r2_delta: r2_score(&pd, &td),
                r2_mean_control: r2_score(&ctrl_mean, &t.mean_log1p),
                r2_mean_top20: top20.map_or(f64::NAN, |i| r2_on(&pred_mean, &t.mean_log1p, Some(i))),
                r2_mean_control_top20: top20.map_or(f64::NAN, |i| r2_on(&ctrl_mean, &t.mean_log1p, Some(i))),
            }
        });
        let significant: Option<Vec<usize>> =
            tested.as_ref().map(|t| ranked.iter().copied().filter(|&g| t.qvalue[g] < SIGNIFICANT_Q).collect());
        let mut field = self.field(&ranked, has_real, (&pred_mean, &real_mean), (&pd, &rd));
        let predicted_order = top_by_abs(&pd, pd.len());
        let second = self.moments.second_half(&self.conditions[key].groups);
        (field.ceiling_r2_mean, field.ceiling_pearson_delta) = ceiling(real, &second, &ctrl_mean);
        field.change_reproducibility = self.reproducibility(key, real, &second);
        field.n_significant = significant.as_ref().map_or(f64::NAN, |s| s.len() as f64);
        field.deg_precision = DEG_OVERLAP_K
            .iter()
            .map(|&k| {
                let p = significant.as_ref().map_or(f64::NAN, |s| precision_at(&predicted_order, s, k));
                (k, nan_unless(has_real, p))
            })
            .collect();
        let exclude: Vec<usize> =
            target.condition.split('+').filter_map(|part| self.genes.iter().position(|g| g == part)).collect();
        let (predicted_logfc, real_logfc) =
            (perturbench_logfc(&pred_mean, &ctrl_mean), perturbench_logfc(&real_mean, &ctrl_mean));
        field.cosine_logfc = nan_unless(has_real, cosine(&predicted_logfc, &real_logfc));
        field.rmse = nan_unless(has_real, field.mse.sqrt());
        let effects = Effects {
            predicted: pd.clone(),
            real: has_real.then(|| rd.clone()),
            exclude,
            predicted_logfc,
            real_logfc: has_real.then_some(real_logfc),
            centroid: self.context.get(&key.covariates).map(|(sum, n)| sum.iter().map(|s| s / *n as f64).collect()),
        };
        let context = self.context_shift(key);
        let mut baselines =
            self.baselines(key, &ctrl_mean, &ranked, has_real, &real_mean, &pred_mean, context.as_ref());
        // The calibrated metrics, of the model and of the context's mean response.
        if let Some(c) = self.calibration(key, real).filter(|_| has_real) {
            let from = |m: &[f64]| -> Vec<f64> { m.iter().zip(&c.reference).map(|(a, b)| a - b).collect() };
            let real_delta = from(&real_mean);
            field.weighted_mse = weighted_mse(&pred_mean, &real_mean, &c.weights);
            field.weighted_r2_delta = weighted_r2(&from(&pred_mean), &real_delta, &c.weights);
            if let Some(shift) = &context {
                let baseline: Vec<f64> = ctrl_mean.iter().zip(shift).map(|(c, d)| c + d).collect();
                baselines.context_mean_weighted_mse = weighted_mse(&baseline, &real_mean, &c.weights);
                baselines.context_mean_weighted_r2_delta = weighted_r2(&from(&baseline), &real_delta, &c.weights);
            }
        }
        // The interpolated duplicate: one half of the cells where it differs from the control,
        // the context's mean response elsewhere, against the other half.
        if let Some(shift) = &context {
            let base: Vec<f64> = ctrl_mean.iter().zip(shift).map(|(c, d)| c + d).collect();
            if let Some((interpolated, first)) = interpolated_duplicate(real, &second, control, &base) {
                let top20 = (ranked.len() >= 20).then(|| &ranked[..20]);
                field.interpolated_r2_mean = r2_on(&interpolated, &first, None);
                field.interpolated_r2_mean_top20 = top20.map_or(f64::NAN, |i| r2_on(&interpolated, &first, Some(i)));
            }
        }
        // Systema: the changes from the perturbed centroid (the context's mean response).
        field.pearson_delta_perturbed = match &context {
            Some(shift) if has_real => {
                let centroid: Vec<f64> = ctrl_mean.iter().zip(shift).map(|(c, d)| c + d).collect();
                let from = |m: &[f64]| -> Vec<f64> { m.iter().zip(&centroid).map(|(a, b)| a - b).collect() };
                pearson(&from(&pred_mean), &from(&real_mean))
            }
            _ => f64::NAN,
        };
        let plot_genes: Vec<usize> = ranked.iter().take(largest_k).copied().collect();
        let reference = if has_real { &real_mean } else { truth.map_or(&real_mean, |t| &t.mean_log1p) };
        ConditionMetrics {
            covariates: key
                .covariates
                .iter()
                .zip(&self.vocab.covariates)
                .map(|(&c, cov)| cov.categories[c as usize].clone())
                .collect(),
            condition: target.condition.clone(),
            dose: target.dose.clone(),
            n_cells: real.n as u64,
            n_control: control.n as u64,
            control_source: choice.name(self.options.split).to_owned(),
            deg_source: deg_source.to_owned(),
            r2_mean: nan_unless(has_real, r2_on(&pred_mean, &real_mean, None)),
            r2_var: nan_unless(real.n >= 2.0, r2_on(&pred_var, &real_var, None)),
            r2_delta: nan_unless(has_real, r2_on(&pd, &rd, None)),
            r2_mean_control: nan_unless(has_real, r2_on(&ctrl_mean, &real_mean, None)),
            top,
            truth: truth_metrics,
            field: FieldMetrics { beats_control: nan_unless(has_real, f64::from(u8::from(beats))), ..field },
            baselines,
            uncertainty_cosine: f64::NAN,
            uncertainty_euclidean: f64::NAN,
            closest_condition: String::new(),
            samples: super::samples::SampleMetrics::missing(),
            effects,
            plot: PlotData {
                genes: plot_genes.iter().map(|&g| self.genes[g].clone()).collect(),
                predicted: plot_genes.iter().map(|&g| pred_mean[g]).collect(),
                real: plot_genes.iter().map(|&g| reference[g]).collect(),
                control: plot_genes.iter().map(|&g| ctrl_mean[g]).collect(),
            },
        }
    }

    /// The field's metrics of a condition but its discrimination ranks and baseline flag:
    /// `ranked` its DEGs, `means` the predicted and real pseudobulks, `deltas` their changes.
    fn field(
        &self,
        ranked: &[usize],
        has_real: bool,
        means: (&[f64], &[f64]),
        deltas: (&[f64], &[f64]),
    ) -> FieldMetrics {
        let ((pm, rm), (pd, rd)) = (means, deltas);
        let on = |v: &[f64], idx: &[usize]| -> Vec<f64> { idx.iter().map(|&i| v[i]).collect() };
        let top = |k: usize| (ranked.len() >= k).then(|| &ranked[..k]);
        let predicted_order = top_by_abs(pd, pd.len());
        let real = |v: f64| nan_unless(has_real, v);
        let top20 = top(20);
        FieldMetrics {
            pearson_delta: real(pearson(pd, rd)),
            pearson_delta_top: TOP_K
                .iter()
                .map(|&k| (k, real(top(k).map_or(f64::NAN, |i| pearson(&on(pd, i), &on(rd, i))))))
                .collect(),
            cosine_delta: real(cosine(pd, rd)),
            mse: real(mse(pm, rm)),
            mae: real(mae(pm, rm)),
            mse_delta: real(mse(pd, rd)),
            mae_delta: real(mae(pd, rd)),
            deg_overlap: DEG_OVERLAP_K.iter().map(|&k| (k, overlap_at(&predicted_order, ranked, k))).collect(),
            direction_match_top20: real(top20.map_or(f64::NAN, |i| direction_match(pd, rd, i))),
            spearman_delta_top20: real(top20.map_or(f64::NAN, |i| spearman(&on(pd, i), &on(rd, i)))),
            discrimination: Vec::new(),
            beats_control: f64::NAN,
            n_significant: f64::NAN,
            deg_precision: Vec::new(),
            ceiling_r2_mean: f64::NAN,
            ceiling_pearson_delta: f64::NAN,
            change_reproducibility: f64::NAN,
            cosine_logfc: f64::NAN,
            rmse: f64::NAN,
            rank_cosine_logfc: f64::NAN,
            rank_rmse: f64::NAN,
            pearson_delta_perturbed: f64::NAN,
            weighted_mse: f64::NAN,
            weighted_r2_delta: f64::NAN,
            centroid_accuracy: f64::NAN,
            interpolated_r2_mean: f64::NAN,
            interpolated_r2_mean_top20: f64::NAN,
        }
    }

    /// Every condition's mean shift from its covariates' training controls, training cells only
    /// (those with training cells on both sides), and the perturbed ones' sums per covariates.
    #[allow(clippy::type_complexity)]
    pub(super) fn training_shifts(&self) -> (BTreeMap<ConditionKey, Vec<f64>>, HashMap<Vec<u32>, (Vec<f64>, usize)>) {
        let shifts: BTreeMap<ConditionKey, Vec<f64>> = self
            .conditions
            .keys()
            .filter_map(|k| Some((k.clone(), self.training_shift(&k.covariates, &k.parts)?)))
            .collect();
        let mut context: HashMap<Vec<u32>, (Vec<f64>, usize)> = HashMap::new();
        for (key, shift) in shifts.iter().filter(|(k, _)| !k.is_control()) {
            let (sum, n) = context.entry(key.covariates.clone()).or_insert_with(|| (vec![0.0; shift.len()], 0));
            sum.iter_mut().zip(shift).for_each(|(s, d)| *s += d);
            *n += 1;
        }
        (shifts, context)
    }

    /// Per covariate combination, the moments of its perturbed cells (every split) and the sum of
    /// its conditions' means.
    pub(super) fn perturbed_cells(&self) -> HashMap<Vec<u32>, Perturbed> {
        let mut out: HashMap<Vec<u32>, Perturbed> = HashMap::new();
        for (key, condition) in self.conditions.iter().filter(|(k, _)| !k.is_control()) {
            let cells = self.moments.of_groups(&condition.groups, |_| true);
            if cells.n < 1.0 {
                continue;
            }
            let genes = cells.sum.len();
            let entry = out.entry(key.covariates.clone()).or_insert_with(|| Perturbed {
                cells: Moments::new(genes),
                means: vec![0.0; genes],
                conditions: 0,
            });
            entry.means.iter_mut().zip(cells.mean()).for_each(|(s, m)| *s += m);
            entry.cells.merge(&cells);
            entry.conditions += 1;
        }
        out
    }

    /// The calibrated metrics' weights of `key`, whose evaluated cells are `real`: per gene the
    /// |t| of Welch's test of `real` against the other perturbed cells of the covariates (every
    /// split), with the rest's variance taken over `real`'s cells (scanpy's
    /// `t-test_overestim_var`), min-max scaled to [0, 1], squared and scaled to sum to 1; `None`
    /// with fewer than two perturbed conditions or two cells a side, or all weights 0.
    fn calibration(&self, key: &ConditionKey, real: &Moments) -> Option<Calibration> {
        let context = self.perturbed.get(&key.covariates)?;
        let own = self.moments.of_groups(&self.conditions.get(key)?.groups, |_| true);
        let mut rest = context.cells.clone();
        rest.n -= own.n;
        rest.sum.iter_mut().zip(&own.sum).for_each(|(r, o)| *r -= o);
        rest.sq.iter_mut().zip(&own.sq).for_each(|(r, o)| *r -= o);
        if context.conditions < 2 || real.n < 2.0 || rest.n < 2.0 {
            return None;
        }
        let (mean, var, rest_mean, rest_var) = (real.mean(), real.sample_var(), rest.mean(), rest.sample_var());
        let t: Vec<f64> = (0..mean.len())
            .map(|g| {
                let t = (mean[g] - rest_mean[g]) / ((var[g] + rest_var[g]) / real.n).sqrt();
                if t.is_finite() { t.abs() } else { 0.0 }
            })
            .collect();
        let (lo, hi) = t.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let scaled: Vec<f64> = match hi > lo {
            true => t.iter().map(|v| ((v - lo) / (hi - lo)).powi(2)).collect(),
            false if hi > 0.0 => vec![1.0; t.len()],
            false => return None,
        };
        let total: f64 = scaled.iter().sum();
        let k = context.conditions as f64;
        Some(Calibration {
            weights: scaled.iter().map(|w| w / total).collect(),
            reference: context.means.iter().map(|m| m / k).collect(),
        })
    }

    /// The nearest-perturbations baseline's shift of `key`, a single perturbation: the mean training
    /// shift of the [`KNN_K`] other single perturbations of its covariates and dose whose model
    /// embeddings are nearest to its own by cosine (ties by id); `None` for a combination, an
    /// embedding of zero (a perturbation the model knows nothing of) or no candidate.
    fn knn_shift(&self, key: &ConditionKey) -> Option<Vec<f64>> {
        let [(id, dose)] = key.parts.as_slice() else { return None };
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let own = self.embeddings.get(*id as usize).filter(|e| norm(e) > 0.0)?;
        let mut candidates: Vec<(f64, u32, &Vec<f64>)> = self
            .shifts
            .iter()
            .filter_map(|(k, shift)| {
                let [(other, d)] = k.parts.as_slice() else { return None };
                if k.covariates != key.covariates || other == id || d != dose {
                    return None;
                }
                let e = self.embeddings.get(*other as usize).filter(|e| norm(e) > 0.0)?;
                let cosine = own.iter().zip(e).map(|(a, b)| a * b).sum::<f64>() / (norm(own) * norm(e));
                Some((cosine, *other, shift))
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let near = &candidates[..candidates.len().min(KNN_K)];
        let k = near.len() as f64;
        Some((0..near[0].2.len()).map(|g| near.iter().map(|c| c.2[g]).sum::<f64>() / k).collect())
    }

    /// The linear baseline fitted on every perturbed condition's training cells.
    pub(super) fn fit_ridge(&self) -> Option<super::ridge::Ridge> {
        super::ridge::Ridge::fit(self.vocab, &self.shifts, self.genes.len())
    }

    /// The linear baseline on the model's perturbation features (`table`), fitted as
    /// [`fit_ridge`](Self::fit_ridge)'s; `None` for a model without features.
    pub(super) fn fit_feature_ridge(&self, table: Option<Vec<Vec<f64>>>) -> Option<super::ridge::Ridge> {
        let table = table?;
        super::ridge::Ridge::fit_on(self.vocab, &self.shifts, self.genes.len(), Some(table))
    }

    /// The mean training shift of the perturbed conditions of `key`'s covariates other than
    /// `key` itself: the context's mean response less the control mean (`None` without another).
    fn context_shift(&self, key: &ConditionKey) -> Option<Vec<f64>> {
        let (sum, n) = self.context.get(&key.covariates)?;
        let own = self.shifts.get(key).filter(|_| !key.is_control());
        let others = n - usize::from(own.is_some());
        if others == 0 {
            return None;
        }
        let k = others as f64;
        Some(match own {
            Some(own) => sum.iter().zip(own).map(|(s, o)| (s - o) / k).collect(),
            None => sum.iter().map(|s| s / k).collect(),
        })
    }

    /// Whether perturbations' effects carry over between covariate values ([`super::transfer`]),
    /// over every perturbed condition's training cells.
    pub(super) fn measure_transfer(&self) -> Option<super::transfer::Transfer> {
        let keys: Vec<&ConditionKey> = self.conditions.keys().collect();
        super::transfer::measure(&keys, |k| self.shifts.get(k).cloned())
    }

    /// The mean of the training cells of `key`'s condition (`None` without any).
    fn training_mean(&self, key: &ConditionKey) -> Option<Vec<f64>> {
        let groups = if key.is_control() {
            self.control_groups.get(&key.covariates)?
        } else {
            &self.conditions.get(key)?.groups
        };
        let moments = self.moments.of_groups(groups, |s| s == Split::Train);
        (moments.n >= 1.0).then(|| moments.mean())
    }

    /// The mean shift of `parts` from the training controls in `covariates`, training cells only.
    fn training_shift(&self, covariates: &[u32], parts: &[(u32, u32)]) -> Option<Vec<f64>> {
        self.training_shift_and_control(covariates, parts).map(|(shift, _)| shift)
    }

    /// [`training_shift`](Self::training_shift) and the training controls' mean it is taken from.
    fn training_shift_and_control(&self, covariates: &[u32], parts: &[(u32, u32)]) -> Option<(Vec<f64>, Vec<f64>)> {
        let control = ConditionKey { covariates: covariates.to_vec(), parts: Vec::new() };
        let control = self.training_mean(&control)?;
        let treated = self.training_mean(&ConditionKey { covariates: covariates.to_vec(), parts: parts.to_vec() })?;
        Some((treated.iter().zip(&control).map(|(t, c)| t - c).collect(), control))
    }

    /// The additive, other-covariates (plain and scaled), nearest-covariates and linear baselines of a condition
    /// ([`BaselineMetrics`]), scored against its real means as the model's `pred_mean` is.
    #[allow(clippy::too_many_arguments)]
    fn baselines(
        &self,
        key: &ConditionKey,
        ctrl_mean: &[f64],
        ranked: &[usize],
        has_real: bool,
        real_mean: &[f64],
        pred_mean: &[f64],
        context: Option<&Vec<f64>>,
    ) -> BaselineMetrics {
        let top20 = (ranked.len() >= 20).then(|| &ranked[..20]);
        let score = |shift: Option<Vec<f64>>| -> (f64, f64, f64) {
            let Some(shift) = shift.filter(|_| has_real) else { return (f64::NAN, f64::NAN, f64::NAN) };
            let baseline: Vec<f64> = ctrl_mean.iter().zip(&shift).map(|(c, d)| c + d).collect();
            let all = r2_on(&baseline, real_mean, None);
            let top = top20.map_or(f64::NAN, |i| r2_on(&baseline, real_mean, Some(i)));
            let model_all = r2_on(pred_mean, real_mean, None);
            let model_top = top20.map_or(f64::NAN, |i| r2_on(pred_mean, real_mean, Some(i)));
            let beats = model_all > all && (top.is_nan() || model_top > top);
            (all, top, f64::from(u8::from(beats)))
        };
        // Additive: a combination of two or more perturbations, each part's own shift summed.
        let parts: Vec<(u32, u32)> =
            key.parts.iter().copied().filter(|&(id, _)| id as usize != crate::model::vocab::CONTROL_ID).collect();
        let additive = (parts.len() >= 2)
            .then(|| {
                let mut sum = vec![0.0; ctrl_mean.len()];
                for &part in &parts {
                    let shift = self.training_shift(&key.covariates, &[part])?;
                    sum.iter_mut().zip(&shift).for_each(|(s, d)| *s += d);
                }
                Some(sum)
            })
            .flatten();
        // Other covariates: the same condition's shift where the covariates differ, averaged; and
        // the shift of the one whose training controls' mean lies nearest (Euclidean over the
        // genes) to this condition's control mean: the most similar cell type's response.
        let mut others: Vec<Vec<f64>> = Vec::new();
        let mut nearest: Option<(f64, usize)> = None;
        if !key.covariates.is_empty() {
            for other in self.conditions.keys().filter(|k| k.parts == key.parts && k.covariates != key.covariates) {
                let Some((shift, their_control)) = self.training_shift_and_control(&other.covariates, &other.parts)
                else {
                    continue;
                };
                let distance: f64 = their_control.iter().zip(ctrl_mean).map(|(a, b)| (a - b) * (a - b)).sum();
                if nearest.is_none_or(|(best, _)| distance < best) {
                    nearest = Some((distance, others.len()));
                }
                others.push(shift);
            }
        }
        let nearest = nearest.map(|(_, i)| others[i].clone());
        let other = (!others.is_empty()).then(|| {
            let n = others.len() as f64;
            (0..ctrl_mean.len()).map(|g| others.iter().map(|s| s[g]).sum::<f64>() / n).collect()
        });
        let (additive_r2_mean, additive_r2_mean_top20, beats_additive) = score(additive);
        // Scaled: the other covariates' mean shift times the share of it that carries over in the
        // training cells.
        let slope = self.transfer.map(|t| t.slope).filter(|s| s.is_finite());
        let scaled =
            other.as_ref().zip(slope).map(|(shift, b): (&Vec<f64>, f64)| shift.iter().map(|d| b * d).collect());
        let (other_covariates_r2_mean, other_covariates_r2_mean_top20, beats_other_covariates) = score(other);
        let (other_covariates_scaled_r2_mean, other_covariates_scaled_r2_mean_top20, beats_other_covariates_scaled) =
            score(scaled);
        let (nearest_covariates_r2_mean, nearest_covariates_r2_mean_top20, beats_nearest_covariates) = score(nearest);
        let (linear_r2_mean, linear_r2_mean_top20, beats_linear) =
            score(self.ridge.as_ref().and_then(|r| r.change(key)));
        let (context_mean_r2_mean, context_mean_r2_mean_top20, beats_context_mean) = score(context.cloned());
        // The perturbation-matched mean: the condition's own training mean, as a shift from the
        // control mean the others are added to.
        let matched = self
            .training_mean(key)
            .filter(|_| !key.is_control())
            .map(|m| m.iter().zip(ctrl_mean).map(|(m, c)| m - c).collect());
        let (matched_mean_r2_mean, matched_mean_r2_mean_top20, beats_matched_mean) = score(matched);
        let (knn_r2_mean, knn_r2_mean_top20, beats_knn) = score(self.knn_shift(key));
        let (linear_features_r2_mean, linear_features_r2_mean_top20, beats_linear_features) =
            score(self.feature_ridge.as_ref().and_then(|r| r.change(key)));
        BaselineMetrics {
            additive_r2_mean,
            additive_r2_mean_top20,
            beats_additive,
            other_covariates_r2_mean,
            other_covariates_r2_mean_top20,
            beats_other_covariates,
            other_covariates_scaled_r2_mean,
            other_covariates_scaled_r2_mean_top20,
            beats_other_covariates_scaled,
            nearest_covariates_r2_mean,
            nearest_covariates_r2_mean_top20,
            beats_nearest_covariates,
            linear_r2_mean,
            linear_r2_mean_top20,
            beats_linear,
            context_mean_r2_mean,
            context_mean_r2_mean_top20,
            beats_context_mean,
            matched_mean_r2_mean,
            matched_mean_r2_mean_top20,
            beats_matched_mean,
            context_mean_weighted_mse: f64::NAN,
            context_mean_weighted_r2_delta: f64::NAN,
            knn_r2_mean,
            knn_r2_mean_top20,
            beats_knn,
            linear_features_r2_mean,
            linear_features_r2_mean_top20,
            beats_linear_features,
        }
    }

    /// Whether the data measure a condition's change at all: Pearson over genes of its change in
    /// one half of its evaluated cells (`real` is all of them) from one half of its covariates'
    /// control cells (of every split) against the change in the other halves. Unlike the
    /// ceiling's, the two changes share no control cell, so the noise of the control mean does
    /// not make them agree; near 0 the change is noise at this many cells. `second` is the second
    /// half of `real`. NaN with fewer than 2 cells in a half.
    fn reproducibility(&self, key: &ConditionKey, real: &Moments, second: &Moments) -> f64 {
        let Some(control_groups) = self.control_groups.get(&key.covariates) else {
            return f64::NAN;
        };
        let controls = self.moments.of_groups(control_groups, |_| true);
        let treated = halves(real, second);
        let control = halves(&controls, &self.moments.second_half(control_groups));
        let (Some((t1, t2)), Some((c1, c2))) = (treated, control) else {
            return f64::NAN;
        };
        let change = |t: &[f64], c: &[f64]| -> Vec<f64> { t.iter().zip(c).map(|(a, b)| a - b).collect() };
        pearson(&change(&t1, &c1), &change(&t2, &c2))
    }

    /// A condition's genes ranked by differential expression, where the ranking came from, and
    /// the scores when computed here: a table's list, else a Welch t-test over all its cells
    /// against all the controls of its covariates, else the truth's change.
    fn degs(
        &self,
        key: &ConditionKey,
        target: &Target,
        ctrl_mean: &[f64],
        truth: Option<&TruthRow>,
    ) -> (Vec<usize>, &'static str, Option<Tested>) {
        let n_genes = self.genes.len();
        let all_splits = |_| true;
        if self.options.definitions == Definitions::Reference {
            // The reference ranks by |mean of all the condition's cells - control mean|.
            let treated = self.moments.of_groups(&self.conditions[key].groups, all_splits);
            if treated.n >= 1.0 {
                let change: Vec<f64> = treated.mean().iter().zip(ctrl_mean).map(|(a, b)| a - b).collect();
                return (top_by_abs(&change, n_genes), "mean difference", None);
            }
        }
        let listed = self.deg_table.and_then(|table| {
            let keys = target.deg_keys(self.vocab, self.keys);
            keys.into_iter().find_map(|k| table.lists.get(&k)).map(|l| (l, table.source))
        });
        if let Some((list, source)) = listed {
            let position: HashMap<&str, usize> = self.genes.iter().enumerate().map(|(i, g)| (g.as_str(), i)).collect();
            return (list.iter().filter_map(|g| position.get(g.as_str()).copied()).collect(), source, None);
        }
        let treated = self.moments.of_groups(&self.conditions[key].groups, all_splits);
        let controls = self
            .moments
            .of_groups(self.control_groups.get(&key.covariates).map(Vec::as_slice).unwrap_or(&[]), all_splits);
        if treated.n >= 2.0 && controls.n >= 2.0 {
            let (score, pvalue) = welch_test(&treated, &controls);
            let qvalue = benjamini_hochberg(&pvalue);
            return (top_by_abs(&score, n_genes), "computed", Some(Tested { score, pvalue, qvalue }));
        }
        match truth {
            Some(t) => {
                let change: Vec<f64> = t.mean_log1p.iter().zip(ctrl_mean).map(|(a, b)| a - b).collect();
                (top_by_abs(&change, n_genes), "truth", None)
            }
            None => (Vec::new(), "none", None),
        }
    }
}
