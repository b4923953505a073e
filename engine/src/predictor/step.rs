//! The predictor's work on one batch of source cells: the model a few hundred cells at a time;
//! per step, each pass (target) gets its latents for those cells and its record batch, emitted
//! before the next pass, so the memory in flight is one step of one pass whatever the number of
//! targets.

use std::ops::Range;
use std::sync::Arc;

use crate::model::batch::densify_range;
use crate::model::layers::Noise;
use crate::model::likelihood::expected_log1p_nb;
use crate::model::network::knows_nothing_of;
use crate::model::vocab::CONTROL_ID;
use crate::model::{CpaModel, PerturbationCsr};
use arrow_array::builder::StringDictionaryBuilder;
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field};
use cpa_stream_stages::CsrBatch;
use tch::Tensor;

use super::buffers::{HostValues, copy_values};
use super::targets::Target;
use super::{Anchoring, CellGroup, Predictor, SourceCells};
use crate::Stage;
use crate::model::ToDevice as _;
use crate::torch::{TorchResult, torch_error};
use cpa_stream_pipeline::error::{Error, Result};

/// Rows the predictor runs the model on at a time on the CPU (see [`Predictor::steps`]).
const CPU_STEP_ROWS: usize = 256;

/// The passes of a batch: one per target, or one reconstruction under each cell's own condition.
fn pass_targets(targets: &[Target]) -> Vec<Option<&Target>> {
    if targets.is_empty() { vec![None] } else { targets.iter().map(Some).collect() }
}

/// The per-gene columns a prediction writes besides `mean`, and how it decodes.
#[derive(Debug, Clone, Copy)]
struct Columns {
    expected: bool,
    change: bool,
    /// `anchored` (and `is_anchored`) written.
    anchored: bool,
    /// `counts` written (drawn on the host from `mean`, after the other columns).
    counts: bool,
    batch_corrected: bool,
}

/// Which of `groups`' cells the pass of `target` anchors ([`Anchoring`]): every cell, or
/// (the default) those that are control cells whose covariates the target keeps.
fn anchored_rows(anchoring: Anchoring, groups: &[Arc<CellGroup>], target: Option<&Target>) -> Vec<bool> {
    groups
        .iter()
        .map(|g| match (anchoring, target) {
            (Anchoring::Every, _) => true,
            (Anchoring::Plain, _) | (Anchoring::Controls, None) => false,
            (Anchoring::Controls, Some(t)) => {
                is_control(g) && t.covariates.iter().zip(&g.covariates).all(|(set, own)| set.is_none() || set == own)
            }
        })
        .collect()
}

/// Whether the cells of `g` are control cells: their condition resolves to the control alone.
fn is_control(g: &CellGroup) -> bool {
    g.parts.as_ref().is_ok_and(|p| !p.is_empty() && p.iter().all(|&(id, _)| id as usize == CONTROL_ID))
}

/// One model's encoding of a step's cells: their basal latents (the posterior draws and the
/// mean), library sizes, and the references of `change_log1p` and `anchored` (the cells
/// decoded under their own condition).
struct Encoded {
    z_draws: Vec<Tensor>,
    z_mean: Tensor,
    library: Option<Tensor>,
    /// The expected log1p under the cells' own condition (`change_log1p`).
    own: Option<Tensor>,
    /// The observed expression minus the model's own-condition decoding, in the anchored
    /// prediction's space (`anchored`); `None` where no cell of the step is anchored.
    anchor_base: Option<Tensor>,
}

/// The perturbation and covariate latents of one pass for the cells `rows` of the batch under
/// `model` (rows x latent: small, computed per step so that nothing grows with the targets). A
/// target of perturbations the model gives no effect (`effectless`) is the control: a control
/// cell keeps its own condition, any other cell takes the control at dose 1. `Pass::Anchors`
/// is the cells' own condition as the default anchoring needs it: only control cells are
/// anchored, so any other cell (whose condition the model need not know) is decoded as the
/// control, and a covariate value the model does not know as its first, their values unused.
#[allow(clippy::too_many_arguments)]
fn pass_latents(
    model: &CpaModel,
    batch_corrected: bool,
    cells: &SourceCells,
    rows: Range<usize>,
    pass: Pass<'_>,
    effectless: &[u32],
    perts: &mut PerturbationCsr,
) -> Result<(Tensor, Vec<Tensor>)> {
    let torch = Error::stage(Stage::Predictor);
    let device = model.device();
    let vocab = model.vocabulary();
    let n = rows.len();
    let groups = &cells.groups[rows];
    let (target, anchors) = match pass {
        Pass::Target(t) => (t, false),
        Pass::Anchors => (None, true),
    };
    // Perturbations (CSR) and covariate codes of the target, per cell.
    perts.clear();
    let mut codes: Vec<Vec<i64>> = vec![Vec::with_capacity(n); vocab.covariates.len()];
    match target {
        Some(t) if !knows_nothing_of(&t.parts, effectless) => perts.push_repeated(&t.parts, n),
        _ if anchors => {
            let control = [(CONTROL_ID as u32, 1.0f32)];
            for g in groups {
                perts.push(if is_control(g) { g.parts.as_deref().unwrap_or(&control) } else { &control });
            }
        }
        Some(_) => {
            let control = [(CONTROL_ID as u32, 1.0f32)];
            for g in groups {
                let own = g.parts.as_deref().ok().filter(|p| p.iter().all(|&(id, _)| id as usize == CONTROL_ID));
                perts.push(own.unwrap_or(&control));
            }
        }
        None => {
            for g in groups {
                perts.push(g.parts.as_deref().map_err(|e| Error::InvalidInput(e.clone()))?);
            }
        }
    }
    for g in groups {
        for (c, codes) in codes.iter_mut().enumerate() {
            let own = if anchors { g.covariates[c].or(Some(0)) } else { g.covariates[c] };
            let code = target.and_then(|t| t.covariates[c]).or(own).ok_or_else(|| {
                Error::InvalidInput(format!("covariate {} of a source cell is unknown", vocab.covariates[c].name))
            })?;
            codes.push(i64::from(code));
        }
    }
    tch::no_grad(|| -> cpa_stream_stages::Result<(Tensor, Vec<Tensor>)> {
        let covs = codes
            .iter()
            .map(|c| Tensor::f_from_slice(c).torch()?.f_to_device(device).torch())
            .collect::<cpa_stream_stages::Result<Vec<_>>>()?;
        let mut latents = model.covariate_latents(&covs)?;
        if batch_corrected {
            // The batch covariate's embedding left out of every latent, as in `z_corrected`.
            for (cov, latent) in vocab.covariates.iter().zip(latents.iter_mut()) {
                if cov.is_batch {
                    *latent = latent.f_zeros_like().torch()?;
                }
            }
        }
        Ok((model.perturbation_latent(&perts.to_device(device)?)?, latents))
    })
    .map_err(torch)
}

/// Whose condition a pass decodes the cells under.
#[derive(Clone, Copy)]
enum Pass<'a> {
    /// A target's, or (`None`) each cell's own (a reconstruction; the reference of the change).
    Target(Option<&'a Target>),
    /// The cells' own, as the default anchoring's reference ([`pass_latents`]).
    Anchors,
}

/// The space the anchored prediction moves in: log1p of the means for a count model (that of
/// the encoder's input, log1p of the counts), the means themselves otherwise.
pub(crate) fn to_anchor_space(model: &CpaModel, mean: &Tensor) -> Result<Tensor, tch::TchError> {
    if model.config().model.recon_loss.is_count() { mean.f_log1p() } else { Ok(mean.shallow_clone()) }
}

/// `model`'s encoding of the step's cells `x` (dense counts); `own_latents` gives the latents of
/// the cells' own conditions, needed for the references of `change_log1p` and (where some cell
/// is anchored, `anchors`) of `anchored`.
#[allow(clippy::too_many_arguments)]
fn encode(
    model: &CpaModel,
    theta: Option<&Tensor>,
    x: &Tensor,
    gene_index: Option<&Tensor>,
    columns: Columns,
    anchors: bool,
    own_latents: impl FnOnce(&mut PerturbationCsr) -> Result<(Tensor, Vec<Tensor>)>,
    perts: &mut PerturbationCsr,
    noise: &mut Noise,
) -> Result<Encoded> {
    let torch = Error::stage(Stage::Predictor);
    let (z_draws, z_mean, library, observed) = tch::no_grad(|| -> cpa_stream_stages::Result<_> {
        let (x_in, library) = model.input(x)?;
        // The anchored prediction's observed side is the encoder's input, in the same space.
        let observed = match (gene_index, anchors) {
            (_, false) => None,
            (Some(index), true) => Some(x_in.f_index_select(1, index).torch()?),
            (None, true) => Some(x_in.shallow_clone()),
        };
        let mean = model.encode(&x_in, false, false, noise)?.z_basal;
        let draws = if model.is_variational() { model.basal_draws(&x_in, noise)? } else { vec![mean.shallow_clone()] };
        Ok((draws, mean, library, observed))
    })
    .map_err(torch)?;
    // The cells decoded under their own condition, once per step for every target: the
    // reference of `change_log1p` (its expected log1p) and of `anchored` (observed minus it).
    let (own, anchor_base) = if columns.change || anchors {
        let (z_pert, covs) = own_latents(perts)?;
        tch::no_grad(|| -> cpa_stream_stages::Result<(Option<Tensor>, Option<Tensor>)> {
            let mut mean = model.mean_over_draws(&z_draws, &z_pert, &covs, library.as_ref(), noise)?;
            if let Some(index) = gene_index {
                mean = mean.f_index_select(1, index).torch()?;
            }
            let own = match (theta, columns.change) {
                (Some(theta), true) => Some(expected_log1p_nb(&mean, theta).torch()?),
                _ => None,
            };
            let base = match &observed {
                Some(observed) => Some(observed.f_sub(&to_anchor_space(model, &mean).torch()?).torch()?),
                None => None,
            };
            Ok((own, base))
        })
        .map_err(torch)?
    } else {
        (None, None)
    };
    Ok(Encoded { z_draws, z_mean, library, own, anchor_base })
}

/// Which rows of a pass are anchored.
#[derive(Clone, Copy)]
enum Anchored<'a> {
    /// Every row.
    All,
    /// Rows x 1 on the device: 1 anchored, 0 plain.
    Some(&'a Tensor),
    /// No row: the column holds the plain prediction.
    None,
}

/// `model`'s per-gene columns of one pass, in the schema's order (mean, expected log1p, change,
/// anchored, those written), for the cells `e` under the pass's latents; `anchored` says which
/// rows the `anchored` column anchors.
#[allow(clippy::too_many_arguments)]
fn gene_values(
    model: &CpaModel,
    theta: Option<&Tensor>,
    e: &Encoded,
    z_pert: &Tensor,
    covs: &[Tensor],
    gene_index: Option<&Tensor>,
    columns: Columns,
    anchored: Anchored<'_>,
    noise: &mut Noise,
) -> cpa_stream_stages::Result<Vec<Tensor>> {
    let mut mean = model.mean_over_draws(&e.z_draws, z_pert, covs, e.library.as_ref(), noise)?;
    if let Some(index) = gene_index {
        mean = mean.f_index_select(1, index).torch()?;
    }
    let mut values = Vec::with_capacity(4);
    let anchored = match (columns.anchored, &e.anchor_base, anchored) {
        (false, _, _) => None,
        (true, Some(base), Anchored::All) => Some(to_anchor_space(model, &mean).torch()?.f_add(base).torch()?),
        (true, Some(base), Anchored::Some(rows)) => {
            Some(to_anchor_space(model, &mean).torch()?.f_add(&base.f_mul(rows).torch()?).torch()?)
        }
        // No row of the pass anchored: the plain prediction in the anchored column's space.
        (true, _, _) => Some(to_anchor_space(model, &mean).torch()?),
    };
    if let Some(theta) = theta {
        let expected = expected_log1p_nb(&mean, theta).torch()?;
        let change = e.own.as_ref().map(|own| expected.f_sub(own)).transpose().torch()?;
        values.push(mean);
        if columns.expected {
            values.push(expected);
        }
        values.extend(change);
    } else {
        values.push(mean);
    }
    values.extend(anchored);
    Ok(values)
}

impl Predictor {
    /// The stage's work on one batch: `cells` with their `counts` (gathered in the same order)
    /// through the model for every pass; each step's record batches go to `emit` before the next
    /// step runs, so the memory in flight is a step's output, not a whole batch's. `Ok(false)`
    /// when `emit` said the consumer is gone.
    pub fn predict(
        &mut self,
        cells: &SourceCells,
        counts: &CsrBatch,
        emit: &mut dyn FnMut(RecordBatch) -> bool,
    ) -> Result<bool> {
        if counts.n_rows() != cells.rows.len() {
            return Err(Error::InvalidInput(format!(
                "predictor: {} rows of counts for {} source cells",
                counts.n_rows(),
                cells.rows.len()
            )));
        }
        for rows in self.steps(cells.rows.len()) {
            if !self.step(cells, counts, rows, emit)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Rows `rows` of a batch through the model (each model of an ensemble) for every pass, each
    /// pass's record batch given to `emit` at once; `Ok(false)` when the consumer is gone.
    fn step(
        &mut self,
        cells: &SourceCells,
        counts: &CsrBatch,
        rows: Range<usize>,
        emit: &mut dyn FnMut(RecordBatch) -> bool,
    ) -> Result<bool> {
        let torch = Error::stage(Stage::Predictor);
        let device = self.model.device();
        let (a, b) = (rows.start, rows.end);
        let n = b - a;
        if self.gene_tensor.is_none()
            && let Some(g) = &self.gene_index
        {
            let t = Tensor::f_from_slice(g).and_then(|t| t.f_to_device(device)).map_err(|e| torch(torch_error(e)))?;
            self.gene_tensor = Some(t);
        }
        let gene_index = self.gene_tensor.as_ref().map(Tensor::shallow_clone);
        let genes = self.gene_index.as_ref().map_or(self.model.vocabulary().genes.len(), Vec::len);
        let columns = Columns {
            expected: self.options.expected_log1p,
            change: self.options.change,
            anchored: self.anchored_column,
            counts: self.counts.is_some(),
            batch_corrected: self.options.batch_corrected,
        };
        // Per pass, the rows anchored; the own-condition decoding only where some row is.
        let anchoring = self.options.anchoring;
        let anchored: Vec<Vec<bool>> = match columns.anchored {
            true => pass_targets(&self.targets)
                .into_iter()
                .map(|t| anchored_rows(anchoring, &cells.groups[a..b], t))
                .collect(),
            false => Vec::new(),
        };
        let anchors = anchored.iter().any(|rows| rows.contains(&true));
        // Only control cells are anchored by default: the others' own condition is not needed
        // unless the change is written.
        let own_pass = match anchoring == Anchoring::Controls && !columns.change {
            true => Pass::Anchors,
            false => Pass::Target(None),
        };
        // The columns computed on the device come first; `counts`, drawn on the host from `mean`,
        // sits after them and before the latents.
        let counts_at = 1 + usize::from(columns.expected) + usize::from(columns.change) + usize::from(columns.anchored);
        let gene_columns = counts_at - 1 + usize::from(columns.counts);
        let widths: Vec<usize> = std::iter::repeat_n(genes, 1 + gene_columns)
            .chain(self.latents.iter().map(|_| self.model.config().model.n_latent))
            .collect();
        let x = tch::no_grad(|| densify_range(counts, a..b, device)).map_err(torch)?.0;
        let mut perts = PerturbationCsr::new();
        // Each model's encoding of the step's cells, once for every target.
        let n_models = 1 + self.members.len();
        let mut encoded = Vec::with_capacity(n_models);
        for m in 0..n_models {
            let (model, theta) = match m {
                0 => (&self.model, self.theta.as_ref()),
                _ => (&self.members[m - 1].model, self.members[m - 1].theta.as_ref()),
            };
            let own = |perts: &mut PerturbationCsr| {
                pass_latents(model, columns.batch_corrected, cells, a..b, own_pass, &[], perts)
            };
            let e = encode(model, theta, &x, gene_index.as_ref(), columns, anchors, own, &mut perts, &mut self.noise)?;
            encoded.push(e);
        }
        drop(x);
        let targets = std::mem::take(&mut self.targets);
        let result = (|| -> Result<bool> {
            for (pass, target) in pass_targets(&targets).into_iter().enumerate() {
                let is_anchored = anchored.get(pass).map(Vec::as_slice);
                // Rows x 1 on the device where the pass anchors some rows and not others.
                let mask = match is_anchored {
                    Some(rows) if rows.contains(&true) && rows.contains(&false) => {
                        let ones: Vec<f32> = rows.iter().map(|&r| f32::from(u8::from(r))).collect();
                        let t = Tensor::f_from_slice(&ones)
                            .and_then(|t| t.f_to_device(device)?.f_unsqueeze(1))
                            .map_err(|e| torch(torch_error(e)))?;
                        Some(t)
                    }
                    _ => None,
                };
                let which = match (is_anchored, &mask) {
                    (_, Some(mask)) => Anchored::Some(mask),
                    (Some(rows), None) if rows.contains(&true) => Anchored::All,
                    _ => Anchored::None,
                };
                // Every vector column of the pass, in the schema's order, on the device: the
                // mean over the models, then the first model's latents.
                let mut values: Vec<Tensor> = Vec::new();
                let mut first_latents = None;
                for (m, e) in encoded.iter().enumerate() {
                    let (model, theta, effectless) = match m {
                        0 => (&self.model, self.theta.as_ref(), &self.effectless),
                        _ => {
                            let member = &self.members[m - 1];
                            (&member.model, member.theta.as_ref(), &member.effectless)
                        }
                    };
                    let (z_pert, covs) = pass_latents(
                        model,
                        columns.batch_corrected,
                        cells,
                        a..b,
                        Pass::Target(target),
                        effectless,
                        &mut perts,
                    )?;
                    let own = tch::no_grad(|| {
                        let genes = gene_index.as_ref();
                        gene_values(model, theta, e, &z_pert, &covs, genes, columns, which, &mut self.noise)
                    })
                    .map_err(torch)?;
                    values = if values.is_empty() {
                        own
                    } else {
                        tch::no_grad(|| {
                            values
                                .iter()
                                .zip(&own)
                                .map(|(v, o)| v.f_add(o).torch())
                                .collect::<cpa_stream_stages::Result<Vec<_>>>()
                        })
                        .map_err(torch)?
                    };
                    if m == 0 {
                        first_latents = Some((z_pert, covs));
                    }
                }
                if n_models > 1 {
                    let k = n_models as f64;
                    values = tch::no_grad(|| {
                        values.iter().map(|v| v.f_div_scalar(k).torch()).collect::<cpa_stream_stages::Result<Vec<_>>>()
                    })
                    .map_err(torch)?;
                }
                if let (false, Some((z_pert, covs))) = (self.latents.is_empty(), &first_latents) {
                    let l = tch::no_grad(|| self.model.compose(&encoded[0].z_mean, z_pert, covs)).map_err(torch)?;
                    for name in &self.latents {
                        let t = match name.as_str() {
                            "z_basal" => &l.z_basal,
                            "z" => &l.z,
                            "z_corrected" => &l.z_corrected,
                            "z_no_pert" => &l.z_no_pert,
                            _ => &l.z_no_pert_corrected,
                        };
                        values.push(t.shallow_clone());
                    }
                }
                if let Some(aggregator) = &mut self.aggregator {
                    let slots = aggregator.slots_of(pass, target, &cells.groups[a..b], self.model.vocabulary());
                    tch::no_grad(|| aggregator.add(&slots, &values, is_anchored)).map_err(|e| torch(torch_error(e)))?;
                    continue;
                }
                // The zero-inflation probabilities of the counts' draws (zinb), on the host.
                let zero = match (columns.counts, &first_latents) {
                    (true, Some((z_pert, covs))) => {
                        let p = tch::no_grad(|| {
                            let p = self.model.zero_probability_over_draws(
                                &encoded[0].z_draws,
                                z_pert,
                                covs,
                                &mut self.noise,
                            )?;
                            match (p, &gene_index) {
                                (Some(p), Some(index)) => p.f_index_select(1, index).torch().map(Some),
                                (p, _) => Ok(p),
                            }
                        })
                        .map_err(torch)?;
                        match p {
                            Some(p) => {
                                let mut host = vec![0.0f32; n * genes];
                                copy_values(&p, &mut host).map_err(torch)?;
                                Some(host)
                            }
                            None => None,
                        }
                    }
                    _ => None,
                };
                let mut out: Vec<Vec<f32>> = widths.iter().zip(&self.pools).map(|(w, pool)| pool.take(n * w)).collect();
                let computed = out.iter_mut().enumerate().filter(|(k, _)| !(columns.counts && *k == counts_at));
                for (t, (_, out)) in values.iter().zip(computed) {
                    copy_values(t, out).map_err(torch)?;
                }
                drop(values);
                if let Some(sampler) = &self.counts {
                    let (computed, drawn) = out.split_at_mut(counts_at);
                    let (rows, ids) = (&cells.rows[a..b], &cells.ids[a..b]);
                    let key = super::counts::CountSampler::target_key(target);
                    sampler.draw(&computed[0], zero.as_deref(), rows, key, ids, &mut drawn[0])?;
                }
                let mut columns = out.into_iter().zip(&self.pools).map(|(values, pool)| pool.lend(values));
                let mean = columns.next().ok_or_else(|| Error::InvalidInput("no mean column".into()))?;
                let batch = self.record_batch(cells, a..b, target, is_anchored, mean, columns.collect())?;
                if !emit(batch) {
                    return Ok(false);
                }
            }
            Ok(true)
        })();
        self.targets = targets;
        result
    }

    /// The row ranges a batch of `n` rows runs through the model in: on the CPU [`CPU_STEP_ROWS`]
    /// at a time, so that the transient tensors of the model (input, decoder output, softmax:
    /// each cells x genes) and the output batches in flight stay a few MB and the host memory of
    /// a prediction stays flat; a GPU gets the whole batch.
    fn steps(&self, n: usize) -> impl Iterator<Item = Range<usize>> + use<> {
        let step = if self.model.device().is_cuda() { n.max(1) } else { CPU_STEP_ROWS };
        (0..n).step_by(step).map(move |a| a..(a + step).min(n))
    }

    fn record_batch(
        &self,
        chunk: &SourceCells,
        rows: Range<usize>,
        target: Option<&Target>,
        is_anchored: Option<&[bool]>,
        mean: HostValues,
        vectors: Vec<HostValues>,
    ) -> Result<RecordBatch> {
        let arrow_err = |e| Error::Arrow { context: "building predictions".to_owned(), source: e };
        let groups = &chunk.groups[rows.clone()];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(chunk.ids[rows.clone()].iter()))];
        let label = |value: &dyn Fn(&CellGroup) -> String| -> Result<ArrayRef> {
            let mut b = StringDictionaryBuilder::<Int32Type>::new();
            for g in groups {
                b.append(value(g)).map_err(arrow_err)?;
            }
            Ok(Arc::new(b.finish()))
        };
        match target {
            Some(t) => {
                columns.push(label(&|_| t.condition.clone())?);
                columns.push(label(&|_| t.dose.clone())?);
            }
            None => {
                columns.push(label(&|g| g.condition.clone())?);
                columns.push(label(&|g| g.dose.clone())?);
            }
        }
        let vocab = self.model.vocabulary();
        for c in 0..vocab.covariates.len() {
            let fixed = target.and_then(|t| t.covariate_value(vocab, c)).map(str::to_owned);
            columns.push(label(&|g| fixed.clone().unwrap_or_else(|| g.covariate_values[c].clone()))?);
        }
        if let Some(rows) = is_anchored {
            columns.push(Arc::new(BooleanArray::from(rows.to_vec())));
        }
        let vector = |values: HostValues, width: usize| -> Result<ArrayRef> {
            let item = Arc::new(Field::new("item", DataType::Float32, false));
            let width = i32::try_from(width).map_err(|_| Error::InvalidInput(format!("vector width {width}")))?;
            Ok(Arc::new(
                FixedSizeListArray::try_new(item, width, Arc::new(Float32Array::new(values, None)), None)
                    .map_err(arrow_err)?,
            ))
        };
        let n = rows.len().max(1);
        let gene_width = mean.len() / n;
        columns.push(vector(mean, gene_width)?);
        for values in vectors {
            let width = values.len() / n;
            columns.push(vector(values, width)?);
        }
        RecordBatch::try_new(Arc::clone(&self.schema), columns).map_err(arrow_err)
    }
}
