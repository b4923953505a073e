//! The predictor's work on one batch of source cells: the model a few hundred cells at a time;
//! per step, each pass (target) gets its latents for those cells and its record batch, emitted
//! before the next pass, so the memory in flight is one step of one pass whatever the number of
//! targets.

use std::ops::Range;
use std::sync::Arc;

use crate::model::PerturbationCsr;
use crate::model::batch::densify_range;
use crate::model::likelihood::expected_log1p_nb;
use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray, StringDictionaryBuilder};
use arrow::datatypes::{DataType, Field, Int32Type};
use cpa_stream_stages::CsrBatch;
use tch::Tensor;

use super::buffers::{HostValues, copy_values};
use super::targets::Target;
use super::{CellGroup, Predictor, SourceCells};
use crate::Stage;
use crate::error::{Error, Result};
use crate::model::ToDevice as _;
use crate::torch::{TorchResult, torch_error};

/// Rows the predictor runs the model on at a time on the CPU (see [`Predictor::steps`]).
const CPU_STEP_ROWS: usize = 256;

/// The passes of a batch: one per target, or one reconstruction under each cell's own condition.
fn pass_targets(targets: &[Target]) -> Vec<Option<&Target>> {
    if targets.is_empty() { vec![None] } else { targets.iter().map(Some).collect() }
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

    /// The perturbation and covariate latents of one pass for the cells `rows` of the batch
    /// (rows x latent: small, computed per step so that nothing grows with the targets).
    fn pass_latents(
        &self,
        cells: &SourceCells,
        rows: Range<usize>,
        target: Option<&Target>,
        perts: &mut PerturbationCsr,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let torch = Error::stage(Stage::Predictor);
        let model = &self.model;
        let device = model.device();
        let vocab = model.vocabulary();
        let n = rows.len();
        let groups = &cells.groups[rows];
        // Perturbations (CSR) and covariate codes of the target, per cell.
        perts.clear();
        let mut codes: Vec<Vec<i64>> = vec![Vec::with_capacity(n); vocab.covariates.len()];
        match target {
            Some(t) => perts.push_repeated(&t.parts, n),
            None => {
                for g in groups {
                    perts.push(g.parts.as_deref().map_err(|e| Error::InvalidInput(e.clone()))?);
                }
            }
        }
        for g in groups {
            for (c, codes) in codes.iter_mut().enumerate() {
                let code = target.and_then(|t| t.covariates[c]).or(g.covariates[c]).ok_or_else(|| {
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
            if self.options.batch_corrected {
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

    /// Rows `rows` of a batch through the model for every pass, each pass's record batch given to
    /// `emit` at once; `Ok(false)` when the consumer is gone.
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
        let model = &self.model;
        let genes = self.gene_index.as_ref().map_or(model.vocabulary().genes.len(), Vec::len);
        let (write_expected, write_change, write_anchored) =
            (self.options.expected_log1p, self.options.change, self.options.anchored);
        let gene_columns = usize::from(write_expected) + usize::from(write_change) + usize::from(write_anchored);
        let widths: Vec<usize> = std::iter::repeat_n(genes, 1 + gene_columns)
            .chain(self.latents.iter().map(|_| model.config().model.n_latent))
            .collect();
        let counts_model = model.config().model.recon_loss.is_count();
        // The space the anchored prediction moves in: log1p of the means for a count model (that
        // of the encoder's input, log1p of the counts), the means themselves otherwise.
        let to_anchor_space = |mean: &Tensor| if counts_model { mean.f_log1p() } else { Ok(mean.shallow_clone()) };
        let (z_draws, z_mean, library, observed) = tch::no_grad(|| -> cpa_stream_stages::Result<_> {
            let (x, _) = densify_range(counts, a..b, device)?;
            let (x_in, library) = model.input(&x)?;
            drop(x);
            // The anchored prediction's observed side is the encoder's input, in the same space.
            let observed = match (&gene_index, write_anchored) {
                (_, false) => None,
                (Some(index), true) => Some(x_in.f_index_select(1, index).torch()?),
                (None, true) => Some(x_in.shallow_clone()),
            };
            let mean = model.encode(&x_in, false, false, &mut self.noise)?.z_basal;
            let draws = if model.is_variational() {
                model.basal_draws(&x_in, &mut self.noise)?
            } else {
                vec![mean.shallow_clone()]
            };
            Ok((draws, mean, library, observed))
        })
        .map_err(torch)?;
        let mut perts = PerturbationCsr::new();
        // The cells decoded under their own condition, once per step for every target: the
        // reference of `change_log1p` (its expected log1p) and of `anchored` (observed minus it).
        let (own, anchor_base) = if write_change || write_anchored {
            let (z_pert, covs) = self.pass_latents(cells, a..b, None, &mut perts)?;
            let model = &self.model;
            tch::no_grad(|| -> cpa_stream_stages::Result<(Option<Tensor>, Option<Tensor>)> {
                let mut mean = model.mean_over_draws(&z_draws, &z_pert, &covs, library.as_ref(), &mut self.noise)?;
                if let Some(index) = &gene_index {
                    mean = mean.f_index_select(1, index).torch()?;
                }
                let own = match (&self.theta, write_change) {
                    (Some(theta), true) => Some(expected_log1p_nb(&mean, theta).torch()?),
                    _ => None,
                };
                let base = match &observed {
                    Some(observed) => Some(observed.f_sub(&to_anchor_space(&mean).torch()?).torch()?),
                    None => None,
                };
                Ok((own, base))
            })
            .map_err(torch)?
        } else {
            (None, None)
        };
        drop(observed);
        let targets = std::mem::take(&mut self.targets);
        let result = (|| -> Result<bool> {
            for (pass, target) in pass_targets(&targets).into_iter().enumerate() {
                let (z_pert, covs) = self.pass_latents(cells, a..b, target, &mut perts)?;
                let model = &self.model;
                // Every vector column of the pass, in the schema's order, on the device.
                let values = tch::no_grad(|| -> cpa_stream_stages::Result<Vec<Tensor>> {
                    let mut mean =
                        model.mean_over_draws(&z_draws, &z_pert, &covs, library.as_ref(), &mut self.noise)?;
                    if let Some(index) = &gene_index {
                        mean = mean.f_index_select(1, index).torch()?;
                    }
                    let mut values = Vec::with_capacity(widths.len());
                    let anchored = match &anchor_base {
                        Some(base) => Some(to_anchor_space(&mean).torch()?.f_add(base).torch()?),
                        None => None,
                    };
                    if let Some(theta) = &self.theta {
                        let expected = expected_log1p_nb(&mean, theta).torch()?;
                        let change = own.as_ref().map(|own| expected.f_sub(own)).transpose().torch()?;
                        values.push(mean);
                        if write_expected {
                            values.push(expected);
                        }
                        values.extend(change);
                    } else {
                        values.push(mean);
                    }
                    values.extend(anchored);
                    if !self.latents.is_empty() {
                        let l = model.compose(&z_mean, &z_pert, &covs)?;
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
                    Ok(values)
                })
                .map_err(torch)?;
                if let Some(aggregator) = &mut self.aggregator {
                    let slots = aggregator.slots_of(pass, target, &cells.groups[a..b], model.vocabulary());
                    tch::no_grad(|| aggregator.add(&slots, &values)).map_err(|e| torch(torch_error(e)))?;
                    continue;
                }
                let mut out: Vec<Vec<f32>> = widths.iter().zip(&self.pools).map(|(w, pool)| pool.take(n * w)).collect();
                for (t, out) in values.iter().zip(out.iter_mut()) {
                    copy_values(t, out).map_err(torch)?;
                }
                drop(values);
                let mut columns = out.into_iter().zip(&self.pools).map(|(values, pool)| pool.lend(values));
                let mean = columns.next().ok_or_else(|| Error::InvalidInput("no mean column".into()))?;
                let batch = self.record_batch(cells, a..b, target, mean, columns.collect())?;
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
