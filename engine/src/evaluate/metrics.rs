//! The figures of one evaluated condition: the metric structs a [`super::ConditionMetrics`] row
//! holds (the CPA paper's R2 family, the field's metrics, the baselines beside the model) and
//! the per-condition data the cross-condition ranks and the plots use.

use serde::Serialize;

use super::samples;

/// The simple baselines of a condition, each a predicted pseudobulk built from the training cells
/// of other conditions and scored as the model is (NaN where a baseline has no data): the
/// *additive* baseline of a combination (the control mean plus each part's mean shift from its
/// covariates' training controls, in the same covariates), and the *other covariates* baseline
/// (the control mean plus the condition's mean shift in the other covariate values where it has
/// training cells, averaged with equal weight per value: the classic baseline of an unseen cell
/// type), the same with its shift scaled by the transfer slope ([`Transfer::slope`](super::transfer::Transfer::slope)),
/// the nearest covariates' and the linear baseline.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BaselineMetrics {
    /// R2 of the additive baseline's means against the real means, all genes.
    pub additive_r2_mean: f64,
    /// The same on the top 20 DEGs.
    pub additive_r2_mean_top20: f64,
    /// 1 when the model's `r2_mean` and `r2_mean_top20` both exceed the additive baseline's, 0
    /// when not (the flag to look for), NaN without the baseline.
    pub beats_additive: f64,
    /// R2 of the other-covariates baseline's means, all genes.
    pub other_covariates_r2_mean: f64,
    /// The same on the top 20 DEGs.
    pub other_covariates_r2_mean_top20: f64,
    /// 1 when the model beats the other-covariates baseline on both, 0 when not, NaN without it.
    pub beats_other_covariates: f64,
    /// R2 of the scaled other-covariates baseline's means (the control mean plus the
    /// other-covariates shift times the transfer slope of the training cells), all genes.
    pub other_covariates_scaled_r2_mean: f64,
    /// The same on the top 20 DEGs.
    pub other_covariates_scaled_r2_mean_top20: f64,
    /// 1 when the model beats the scaled other-covariates baseline on both, 0 when not, NaN
    /// without it (or without a finite slope).
    pub beats_other_covariates_scaled: f64,
    /// R2 of the nearest-covariates baseline's means (the control mean plus the condition's shift
    /// in the one other covariate value whose training controls are nearest), all genes.
    pub nearest_covariates_r2_mean: f64,
    /// The same on the top 20 DEGs.
    pub nearest_covariates_r2_mean_top20: f64,
    /// 1 when the model beats the nearest-covariates baseline on both, 0 when not, NaN without it.
    pub beats_nearest_covariates: f64,
    /// R2 of the linear (ridge) baseline's means, all genes (perturbation and covariate indicators to the change).
    pub linear_r2_mean: f64,
    /// The same on the top 20 DEGs.
    pub linear_r2_mean_top20: f64,
    /// 1 when the model beats the linear baseline on both, 0 when not, NaN without it.
    pub beats_linear: f64,
    /// R2 of the context's mean response (the control mean of the condition's covariates plus the
    /// mean of every other perturbed condition's training shift there, each condition weighted
    /// equally; cell-eval2's mean-response baseline `b`, from the training cells), all genes.
    pub context_mean_r2_mean: f64,
    /// The same on the top 20 DEGs.
    pub context_mean_r2_mean_top20: f64,
    /// 1 when the model beats the context's mean response on both, 0 when not, NaN without it.
    pub beats_context_mean: f64,
    /// R2 of the perturbation-matched mean (the condition's own training cells' mean in its
    /// covariates: what a seen condition looks like), all genes; NaN for a condition without
    /// training cells (held out).
    pub matched_mean_r2_mean: f64,
    /// The same on the top 20 DEGs.
    pub matched_mean_r2_mean_top20: f64,
    /// 1 when the model beats the perturbation-matched mean on both, 0 when not, NaN without it.
    pub beats_matched_mean: f64,
    /// The context's mean response scored by the calibrated metrics ([`FieldMetrics::weighted_mse`],
    /// [`FieldMetrics::weighted_r2_delta`]): what they give a prediction that collapsed to the mean.
    pub context_mean_weighted_mse: f64,
    /// See [`BaselineMetrics::context_mean_weighted_mse`].
    pub context_mean_weighted_r2_delta: f64,
    /// R2 of the nearest-perturbations baseline (a single perturbation: the control mean plus the
    /// mean training shift, in the same covariates and at the same dose, of the
    /// five other perturbations nearest to it by cosine in the model's perturbation
    /// embedding), all genes; NaN for a combination or a perturbation the model gives no
    /// embedding (one without training cells, unless the model projects features).
    pub knn_r2_mean: f64,
    /// The same on the top 20 DEGs.
    pub knn_r2_mean_top20: f64,
    /// 1 when the model beats the nearest-perturbations baseline on both, 0 when not, NaN without it.
    pub beats_knn: f64,
    /// R2 of the linear baseline on perturbation features (the linear baseline's ridge on the
    /// model's perturbation features instead of indicators, a combination the sum of its parts'
    /// features), all genes; NaN for a model without `--perturbation-features`. It predicts
    /// perturbations without training cells too.
    pub linear_features_r2_mean: f64,
    /// The same on the top 20 DEGs.
    pub linear_features_r2_mean_top20: f64,
    /// 1 when the model beats the linear baseline on features on both, 0 when not, NaN without it.
    pub beats_linear_features: f64,
}

/// One evaluated condition's figures (NaN where not computable).
#[derive(Debug, Clone, Serialize)]
pub struct ConditionMetrics {
    /// The condition's covariate values.
    pub covariates: Vec<String>,
    /// The condition as obs writes it.
    pub condition: String,
    /// Its doses.
    pub dose: String,
    /// Real cells of the condition in the evaluated split.
    pub n_cells: u64,
    /// Control cells decoded into it.
    pub n_control: u64,
    /// Which control cells were decoded: the evaluated split's, every held-out split's, or all.
    pub control_source: String,
    /// Where the DEGs came from: `store`, `file`, `computed` (Welch t) or `truth`.
    pub deg_source: String,
    /// R2 over genes of the predicted against the real means.
    pub r2_mean: f64,
    /// R2 over genes of the predicted against the real variances.
    pub r2_var: f64,
    /// R2 over genes of the predicted against the real change from the control mean.
    pub r2_delta: f64,
    /// The control mean as the prediction (the baseline to beat).
    pub r2_mean_control: f64,
    /// `r2_mean_top{k}`, `r2_var_top{k}`, `r2_delta_top{k}` for k in [`TOP_K`](super::TOP_K).
    pub top: Vec<TopMetrics>,
    /// Scores against a synthetic atlas's truth table, when there is one.
    pub truth: Option<TruthMetrics>,
    /// The field's metrics (cell-eval's and PerturBench's families; [`field`](super::field)).
    pub field: FieldMetrics,
    /// The simple baselines the field reports beside the model (from training cells only).
    pub baselines: BaselineMetrics,
    /// Distance of the condition's latent shift to the closest training condition's
    /// ([`uncertainty`](super::uncertainty); NaN when no training condition has enough cells): cosine, Euclidean.
    pub uncertainty_cosine: f64,
    /// See `uncertainty_cosine`.
    pub uncertainty_euclidean: f64,
    /// The training condition closest by Euclidean distance (empty when none is compared with).
    pub closest_condition: String,
    /// Metrics from bounded samples of cells: energy distance, Wilcoxon DE agreement.
    pub samples: samples::SampleMetrics,
    /// The predicted and real changes from the control pseudobulk (the discrimination ranks).
    #[serde(skip)]
    pub effects: Effects,
    /// Top-k DEG names (the largest k) and the predicted / real / control means there (plots).
    #[serde(skip)]
    pub plot: PlotData,
}

#[derive(Debug, Clone, Copy, Serialize)]
/// The scores on a condition's top-k DEGs.
pub struct TopMetrics {
    /// How many DEGs.
    pub k: usize,
    /// R2 of means on them.
    pub r2_mean: f64,
    /// R2 of variances on them.
    pub r2_var: f64,
    /// R2 of the change from the control mean on them.
    pub r2_delta: f64,
    /// R2 of the control mean on them (the baseline).
    pub r2_mean_control: f64,
}

/// Scores against a synthetic atlas's true means (`mean_log1p`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TruthMetrics {
    /// R2 of the predicted against the true means.
    pub r2_mean: f64,
    /// R2 of the predicted against the true change.
    pub r2_delta: f64,
    /// R2 of the control mean against the true means (the baseline).
    pub r2_mean_control: f64,
    /// `r2_mean` on the top 20 DEGs.
    pub r2_mean_top20: f64,
    /// `r2_mean_control` on the top 20 DEGs.
    pub r2_mean_control_top20: f64,
}

/// The field's metrics of a condition (see [`field`](super::field) for their definitions).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FieldMetrics {
    /// Pearson of the predicted and real changes from the control, all genes.
    pub pearson_delta: f64,
    /// The same on the top-k DEGs, k in [`TOP_K`](super::TOP_K).
    pub pearson_delta_top: Vec<(usize, f64)>,
    /// Cosine similarity of the changes, all genes.
    pub cosine_delta: f64,
    /// Mean squared error of the pseudobulks.
    pub mse: f64,
    /// Mean absolute error of the pseudobulks.
    pub mae: f64,
    /// Mean squared error of the changes.
    pub mse_delta: f64,
    /// Mean absolute error of the changes.
    pub mae_delta: f64,
    /// `(k, overlap)` of the predicted top-k changed genes with the top-k DEGs, k in [`DEG_OVERLAP_K`].
    pub deg_overlap: Vec<(usize, f64)>,
    /// Share of the top 20 DEGs whose predicted change has the real sign.
    pub direction_match_top20: f64,
    /// Spearman of the predicted and real changes on the top 20 DEGs.
    pub spearman_delta_top20: f64,
    /// `(distance, normalised rank)`, 0 best, for L1, L2 and cosine.
    pub discrimination: Vec<(&'static str, f64)>,
    /// 1 when `r2_mean` beats the control mean's, 0 when not, NaN without real cells.
    pub beats_control: f64,
    /// Genes with a q-value below 0.05 in the computed DEG test (NaN with listed DEGs).
    pub n_significant: f64,
    /// `(k, precision)`: the share of the predicted top-k changed genes that are significant.
    pub deg_precision: Vec<(usize, f64)>,
    /// The data's own ceiling: one random half of the condition's evaluated cells as the
    /// prediction of the other half, `r2_mean` (NaN with fewer than 2 cells in a half).
    pub ceiling_r2_mean: f64,
    /// The same for `pearson_delta`. Both halves' changes are taken from the same control mean,
    /// as the model's is, so the control mean's noise counts as agreement.
    pub ceiling_pearson_delta: f64,
    /// Whether the data measure the condition's change at all: Pearson over genes of its change
    /// in one half of its cells from one half of its covariates' controls against the change in
    /// the other halves (no cell shared). Under [`NOISE_REPRODUCIBILITY`] the change is noise at
    /// this many cells, and no score of it tells predictions apart.
    pub change_reproducibility: f64,
    /// PerturBench's `cosine` of the `logfc` pseudobulks ([`perturbench_logfc`](super::field::perturbench_logfc)).
    pub cosine_logfc: f64,
    /// PerturBench's `rmse` of the `average` pseudobulks.
    pub rmse: f64,
    /// PerturBench's rank metric of `cosine_logfc` (0 best; [`perturbench_ranks`](super::field::perturbench_ranks)).
    pub rank_cosine_logfc: f64,
    /// PerturBench's rank metric of `rmse`.
    pub rank_rmse: f64,
    /// Systema's Pearson delta against the perturbed centroid: Pearson over genes of the predicted
    /// and real means each minus the centroid of the other perturbed conditions of the covariates
    /// (the context's mean response: the control mean plus their mean training shift). Unlike
    /// `pearson_delta` it does not reward the shift every perturbation shares; NaN without
    /// another perturbed condition with training cells in the covariates.
    pub pearson_delta_perturbed: f64,
    /// The calibrated weighted MSE (Shift Bioscience's "Diversity by design", 2025): the squared
    /// errors of the means weighted per gene by how much the condition differs from the other
    /// perturbed conditions of its covariates there (|t| of Welch's test of its cells against
    /// theirs, the rest's variance over the condition's cells, as scanpy's
    /// `t-test_overestim_var`; min-max scaled, squared, summing to 1). NaN without two perturbed
    /// conditions in the covariates.
    pub weighted_mse: f64,
    /// The calibrated weighted delta R2: R2 with those weights of the predicted against the real
    /// means, each minus the mean of the perturbed conditions' means of the covariates (every
    /// split, each condition once). A prediction of that mean scores at most 0.
    pub weighted_r2_delta: f64,
    /// Systema's centroid accuracy: 1 when, of the real changes from the perturbed centroid of
    /// the conditions of its covariates with real cells, the condition's own is the nearest by
    /// cosine to its predicted change from that centroid, else 0 (its own genes left out, as
    /// in `discrimination_cosine`); NaN alone in its covariates or without a centroid.
    pub centroid_accuracy: f64,
    /// The interpolated duplicate's R2, a positive control (Miller et al., "Diversity by design"):
    /// per gene, the second half of the condition's cells ([`in_second_half`](super::in_second_half)) where it
    /// differs from the control (weight 1 - q, q the Benjamini-Hochberg value of Welch's test of
    /// that half against the control cells) and the context's mean response elsewhere, scored
    /// against the first half as `ceiling_r2_mean` is; NaN with fewer than 2 cells in a half or
    /// without a context.
    pub interpolated_r2_mean: f64,
    /// The same on the top 20 DEGs.
    pub interpolated_r2_mean_top20: f64,
}

/// The DEG list lengths of the overlap metrics.
pub const DEG_OVERLAP_K: [usize; 3] = [20, 50, 100];

/// A condition's change reproduces between disjoint halves of its cells and controls with at
/// least this Pearson r when the data measure it ([`FieldMetrics::change_reproducibility`]):
/// real effects score far above (all the cells of the bundled data's K562 CRISPRa conditions:
/// median 0.93 for pairs, 0.53 for singles; the demo's synthetic atlas: 0.92), noise scatters
/// around 0.
pub const NOISE_REPRODUCIBILITY: f64 = 0.1;

/// How many evaluated conditions have a change the data measure ([`NOISE_REPRODUCIBILITY`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reproducibility {
    /// Conditions whose reproducibility is defined (2 cells or more in each half).
    pub conditions: usize,
    /// Of those, the ones under [`NOISE_REPRODUCIBILITY`]: their change is noise at this many
    /// cells.
    pub not_reproduced: usize,
    /// The median reproducibility over them.
    pub median_r: f64,
    /// The threshold, [`NOISE_REPRODUCIBILITY`].
    pub noise_r: f64,
}

impl Reproducibility {
    /// Over the conditions' reproducibilities `values` (NaN: not defined); `None` where none is
    /// defined.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Reproducibility> {
        let mut r: Vec<f64> = values.into_iter().filter(|r| r.is_finite()).collect();
        if r.is_empty() {
            return None;
        }
        r.sort_by(f64::total_cmp);
        let mid = r.len() / 2;
        let median_r = if r.len() % 2 == 1 { r[mid] } else { (r[mid - 1] + r[mid]) / 2.0 };
        Some(Reproducibility {
            conditions: r.len(),
            not_reproduced: r.iter().filter(|&&v| v < NOISE_REPRODUCIBILITY).count(),
            median_r,
            noise_r: NOISE_REPRODUCIBILITY,
        })
    }
}

/// A condition's changes from the control pseudobulk, kept until every condition is scored.
#[derive(Debug, Clone, Default)]
pub struct Effects {
    /// Predicted minus control.
    pub predicted: Vec<f64>,
    /// Real minus control; `None` without real cells.
    pub real: Option<Vec<f64>>,
    /// Genes named by the condition's perturbations (left out of its distances).
    pub exclude: Vec<usize>,
    /// PerturBench's log fold changes of the prediction ([`perturbench_logfc`](super::field::perturbench_logfc)).
    pub predicted_logfc: Vec<f64>,
    /// The same of the real cells; `None` without real cells.
    pub real_logfc: Option<Vec<f64>>,
    /// The perturbed centroid of the covariates minus the control mean: the mean training shift
    /// of their perturbed conditions (Systema's reference); `None` without one.
    pub centroid: Option<Vec<f64>>,
}

#[derive(Debug, Clone, Default)]
/// What a condition's scatter plot shows: its top DEGs' means.
pub struct PlotData {
    /// The genes.
    pub genes: Vec<String>,
    /// Predicted means.
    pub predicted: Vec<f64>,
    /// Real means (or true means without cells).
    pub real: Vec<f64>,
    /// Control means.
    pub control: Vec<f64>,
}
