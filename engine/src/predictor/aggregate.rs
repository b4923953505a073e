//! Aggregates instead of cells (`predict --aggregate mean,var`): per target and per group of the
//! source cells, the mean and variance of every predicted vector column (`mean`, `expected_log1p`,
//! `change_log1p`, latents), accumulated on the model's device as the steps pass, so that no
//! per-cell value leaves the device and the output is one row per group.
//!
//! Each step's rows are reduced to per-group count, mean and sum of squared deviations (in the
//! model's float32: a step is a few hundred rows), and merged into the running ones with Chan et
//! al.'s pairwise update in float64: exact for any order of merging up to rounding, and free of
//! the cancellation of a sum of squares over millions of cells.

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::Vocabulary;
use arrow_array::builder::StringDictionaryBuilder;
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, UInt64Array};
use arrow_buffer::NullBuffer;
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use cpa_stream_schemas::tables::predictions::IS_ANCHORED;
use cpa_stream_schemas::tables::{categorical_type, f32_vector_type};
use tch::{Device, Kind, Tensor};

use super::CellGroup;
use super::targets::Target;
use crate::torch::torch_error;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::obs::ObsKeys;

/// The column of an aggregate row that counts its source cells (UInt64).
pub const N_CELLS: &str = "n_cells";
/// The column of an aggregate row that counts its source cells whose `anchored` values are
/// anchored (UInt64), written with `anchored`.
pub const N_ANCHORED: &str = "n_anchored";
/// The suffix of a variance column (`mean_var`, `expected_log1p_var`, ...).
pub const VAR_SUFFIX: &str = "_var";
/// Schema metadata of an aggregate file: the statistics and the group-by columns, as JSON.
pub const AGGREGATE_KEY: &str = "cpa_stream.aggregate";
/// Slots of aggregates written per record batch.
const ROWS_PER_BATCH: usize = 1024;

pub use cpa_stream_pipeline::model_flags::Statistic;

/// What an aggregate prediction computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateOptions {
    /// The statistics written (at least one, each once).
    pub statistics: Vec<Statistic>,
    /// The obs columns of the source cells whose values group them, besides the target's
    /// condition and dose; `None`: the model's covariates. A covariate's group is its value in the
    /// output (the target's where the target sets it), as grouping the per-cell output would.
    pub group_by: Option<Vec<String>>,
}

/// How a group-by column gets a row's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum By {
    /// The model's covariate `c`: the target's value where it sets one, else the source cell's.
    Covariate(usize),
    /// The source cell's value of the k-th extra obs column ([`CellGroup::by_values`]).
    Obs(usize),
}

/// The group-by columns resolved: each one's name and source, and the extra obs columns the
/// source stage reads for them.
#[derive(Debug, Clone, Default)]
pub(crate) struct GroupBy {
    pub(crate) names: Vec<String>,
    pub(crate) by: Vec<By>,
    pub(crate) obs_columns: Vec<String>,
}

impl GroupBy {
    pub(crate) fn resolve(options: &AggregateOptions, vocab: &Vocabulary, keys: &ObsKeys) -> Result<GroupBy> {
        let names: Vec<String> = match &options.group_by {
            Some(names) => names.clone(),
            None => vocab.covariates.iter().map(|c| c.name.clone()).collect(),
        };
        let mut out = GroupBy::default();
        for name in names {
            if out.names.contains(&name) {
                return Err(Error::InvalidInput(format!("group by: column {name:?} is listed twice")));
            }
            if name == keys.perturbation || Some(&name) == keys.dose.as_ref() || name == keys.dose_output {
                return Err(Error::InvalidInput(format!(
                    "group by: {name:?} is the target's condition or dose, which always groups the rows; list \
                     only other obs columns (the covariates by default: {:?})",
                    vocab.covariates.iter().map(|c| c.name.as_str()).collect::<Vec<_>>()
                )));
            }
            let by = match vocab.covariates.iter().position(|c| c.name == name) {
                Some(c) => By::Covariate(c),
                None => {
                    out.obs_columns.push(name.clone());
                    By::Obs(out.obs_columns.len() - 1)
                }
            };
            out.names.push(name);
            out.by.push(by);
        }
        Ok(out)
    }
}

/// The schema of an aggregate output: the target's labels, the group-by columns, `n_cells`
/// (and `n_anchored` where `cells` has `is_anchored`), then per vector column of `cells` (the
/// per-cell schema) its mean and/or `_var`.
pub(crate) fn aggregate_schema(
    cells: &Schema,
    labels: &[String],
    group_by: &GroupBy,
    statistics: &[Statistic],
) -> Result<SchemaRef> {
    let mut fields: Vec<Field> = labels.iter().map(|name| Field::new(name, categorical_type(), false)).collect();
    fields.extend(group_by.names.iter().map(|name| Field::new(name, categorical_type(), true)));
    fields.push(Field::new(N_CELLS, DataType::UInt64, false));
    if cells.column_with_name(IS_ANCHORED).is_some() {
        fields.push(Field::new(N_ANCHORED, DataType::UInt64, false));
    }
    for field in cells.fields() {
        let DataType::FixedSizeList(_, width) = field.data_type() else { continue };
        if statistics.contains(&Statistic::Mean) {
            fields.push(Field::new(field.name(), f32_vector_type(*width), false));
        }
        if statistics.contains(&Statistic::Var) {
            fields.push(Field::new(format!("{}{VAR_SUFFIX}", field.name()), f32_vector_type(*width), true));
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = fields.iter().find(|f| !seen.insert(f.name().clone())) {
        return Err(Error::InvalidInput(format!(
            "aggregates: column {:?} would appear twice (a group-by column named like an output column)",
            dup.name()
        )));
    }
    let mut metadata = cells.metadata().clone();
    let described = serde_json::json!({ "statistics": statistics, "group_by": group_by.names });
    metadata.insert(AGGREGATE_KEY.to_owned(), described.to_string());
    Ok(Arc::new(Schema::new(fields).with_metadata(metadata)))
}

/// The running aggregates of a prediction, on the model's device.
pub(crate) struct Aggregator {
    group_by: GroupBy,
    means: bool,
    variance: bool,
    widths: Vec<usize>,
    device: Device,
    schema: SchemaRef,
    /// (pass, condition, dose, group-by values) -> slot.
    slots: HashMap<(usize, Vec<Option<String>>), usize>,
    /// (pass, label group's address) -> slot; the group is held so that its address stays its own.
    cache: HashMap<(usize, usize), (Arc<CellGroup>, usize)>,
    /// Each slot's pass and labels.
    labels: Vec<(usize, Vec<Option<String>>)>,
    counts: Vec<u64>,
    /// Per slot, the cells anchored (`None`: no `anchored` column).
    anchored: Option<Vec<u64>>,
    /// Per vector column: slots x width, float64.
    mean: Vec<Tensor>,
    m2: Vec<Tensor>,
    capacity: usize,
}

impl Aggregator {
    pub(crate) fn new(
        group_by: GroupBy,
        statistics: &[Statistic],
        widths: Vec<usize>,
        device: Device,
        schema: SchemaRef,
    ) -> Aggregator {
        let anchored = schema.column_with_name(N_ANCHORED).map(|_| Vec::new());
        Aggregator {
            group_by,
            means: statistics.contains(&Statistic::Mean),
            variance: statistics.contains(&Statistic::Var),
            widths,
            device,
            schema,
            slots: HashMap::new(),
            cache: HashMap::new(),
            labels: Vec::new(),
            counts: Vec::new(),
            anchored,
            mean: Vec::new(),
            m2: Vec::new(),
            capacity: 0,
        }
    }

    /// The slot of each of `groups`' cells in pass `pass` (target `target`, or its own condition).
    pub(crate) fn slots_of(
        &mut self,
        pass: usize,
        target: Option<&Target>,
        groups: &[Arc<CellGroup>],
        vocab: &Vocabulary,
    ) -> Vec<i64> {
        groups
            .iter()
            .map(|g| {
                let address = Arc::as_ptr(g) as usize;
                if let Some((_, slot)) = self.cache.get(&(pass, address)) {
                    return *slot as i64;
                }
                let (condition, dose) = match target {
                    Some(t) => (t.condition.clone(), t.dose.clone()),
                    None => (g.condition.clone(), g.dose.clone()),
                };
                let mut labels = vec![Some(condition), Some(dose)];
                for by in &self.group_by.by {
                    labels.push(match *by {
                        By::Covariate(c) => Some(
                            target
                                .and_then(|t| t.covariate_value(vocab, c))
                                .map_or_else(|| g.covariate_values[c].clone(), str::to_owned),
                        ),
                        By::Obs(k) => g.by_values.get(k).cloned().flatten(),
                    });
                }
                let next = self.labels.len();
                let slot = *self.slots.entry((pass, labels.clone())).or_insert(next);
                if slot == next {
                    self.labels.push((pass, labels));
                    self.counts.push(0);
                    if let Some(anchored) = &mut self.anchored {
                        anchored.push(0);
                    }
                }
                self.cache.insert((pass, address), (Arc::clone(g), slot));
                slot as i64
            })
            .collect()
    }

    /// Room for `slots` slots in every accumulator (doubling).
    fn reserve(&mut self, slots: usize) -> tch::Result<()> {
        if slots <= self.capacity {
            return Ok(());
        }
        let capacity = slots.max(self.capacity * 2).max(16);
        let grow = |old: Option<&Tensor>, width: usize| -> tch::Result<Tensor> {
            let fresh = Tensor::f_zeros([capacity as i64, width as i64], (Kind::Double, self.device))?;
            if let Some(old) = old {
                fresh.f_narrow(0, 0, old.size()[0])?.f_copy_(old)?;
            }
            Ok(fresh)
        };
        let variance = self.variance;
        for (c, &width) in self.widths.iter().enumerate() {
            let mean = grow(self.mean.get(c), width)?;
            if c < self.mean.len() {
                self.mean[c] = mean;
            } else {
                self.mean.push(mean);
            }
            if variance {
                let m2 = grow(self.m2.get(c), width)?;
                if c < self.m2.len() {
                    self.m2[c] = m2;
                } else {
                    self.m2.push(m2);
                }
            }
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Merges a step's rows (`columns`: one rows x width tensor per vector column, in the
    /// schema's order; `is_anchored`: whether each row is anchored) into the slots `slots` (one
    /// per row).
    pub(crate) fn add(&mut self, slots: &[i64], columns: &[Tensor], is_anchored: Option<&[bool]>) -> tch::Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        if let (Some(counts), Some(rows)) = (&mut self.anchored, is_anchored) {
            for (&s, _) in slots.iter().zip(rows).filter(|(_, r)| **r) {
                counts[s as usize] += 1;
            }
        }
        self.reserve(self.labels.len())?;
        // The step's distinct slots, and each row's index among them.
        let mut local_of: HashMap<i64, i64> = HashMap::new();
        let mut unique: Vec<i64> = Vec::new();
        let mut n_b: Vec<f64> = Vec::new();
        let local: Vec<i64> = slots
            .iter()
            .map(|&s| {
                let next = unique.len() as i64;
                let l = *local_of.entry(s).or_insert(next);
                if l == next {
                    unique.push(s);
                    n_b.push(0.0);
                }
                n_b[l as usize] += 1.0;
                l
            })
            .collect();
        let n_a: Vec<f64> = unique.iter().map(|&s| self.counts[s as usize] as f64).collect();
        let n: Vec<f64> = n_a.iter().zip(&n_b).map(|(a, b)| a + b).collect();
        let to_device =
            |v: &[f64]| -> tch::Result<Tensor> { Tensor::f_from_slice(v)?.f_to_device(self.device)?.f_unsqueeze(1) };
        let local_t = Tensor::f_from_slice(&local)?.f_to_device(self.device)?;
        let unique_t = Tensor::f_from_slice(&unique)?.f_to_device(self.device)?;
        let (n_b_t, n_t) = (to_device(&n_b)?, to_device(&n)?);
        let weight_b = n_b_t.f_div(&n_t)?;
        let weight_ab = to_device(&n_a.iter().zip(&n_b).zip(&n).map(|((a, b), n)| a * b / n).collect::<Vec<_>>())?;
        let u = unique.len() as i64;
        let n_b_f32 = n_b_t.f_to_kind(Kind::Float)?;
        for (c, column) in columns.iter().enumerate() {
            // The step's own statistics in the model's float32 (a step is a few hundred rows on
            // the CPU, a batch on a GPU), merged into the running ones in float64.
            let x = column.f_to_kind(Kind::Float)?;
            let width = x.size()[1];
            let sum = if u == 1 {
                x.f_sum_dim_intlist(0, true, Kind::Float)?
            } else {
                Tensor::f_zeros([u, width], (Kind::Float, self.device))?.f_index_add(0, &local_t, &x)?
            };
            let mean_b = sum.f_div(&n_b_f32)?;
            let mean_a = self.mean[c].f_index_select(0, &unique_t)?;
            let delta = mean_b.f_to_kind(Kind::Double)?.f_sub(&mean_a)?;
            let mean = mean_a.f_add(&delta.f_mul(&weight_b)?)?;
            let _ = self.mean[c].f_index_copy_(0, &unique_t, &mean)?;
            if self.variance {
                let deviation = if u == 1 { x.f_sub(&mean_b)? } else { x.f_sub(&mean_b.f_index_select(0, &local_t)?)? };
                let squares = deviation.f_square()?;
                let m2_b = if u == 1 {
                    squares.f_sum_dim_intlist(0, true, Kind::Float)?
                } else {
                    Tensor::f_zeros([u, width], (Kind::Float, self.device))?.f_index_add(0, &local_t, &squares)?
                };
                let m2_a = self.m2[c].f_index_select(0, &unique_t)?;
                let m2 = m2_a.f_add(&m2_b.f_to_kind(Kind::Double)?)?.f_add(&delta.f_square()?.f_mul(&weight_ab)?)?;
                let _ = self.m2[c].f_index_copy_(0, &unique_t, &m2)?;
            }
        }
        for (&s, &b) in unique.iter().zip(&n_b) {
            self.counts[s as usize] += b as u64;
        }
        Ok(())
    }

    /// The aggregate rows: by pass (the targets' order), then by the groups' labels.
    pub(crate) fn finish(&self) -> Result<Vec<RecordBatch>> {
        let arrow_err = |e| Error::Arrow { context: "building aggregates".to_owned(), source: e };
        let torch = |e: tch::TchError| Error::stage(crate::Stage::Predictor)(torch_error(e));
        let mut order: Vec<usize> = (0..self.labels.len()).collect();
        order.sort_by(|&a, &b| self.labels[a].cmp(&self.labels[b]));
        let mut batches = Vec::new();
        for chunk in order.chunks(ROWS_PER_BATCH) {
            let mut columns: Vec<ArrayRef> = Vec::new();
            for k in 0..self.labels.first().map_or(0, |(_, l)| l.len()) {
                let mut b = StringDictionaryBuilder::<Int32Type>::new();
                for &s in chunk {
                    match &self.labels[s].1[k] {
                        Some(v) => b.append(v).map(|_| ()).map_err(arrow_err)?,
                        None => b.append_null(),
                    }
                }
                columns.push(Arc::new(b.finish()));
            }
            let counts: Vec<u64> = chunk.iter().map(|&s| self.counts[s]).collect();
            columns.push(Arc::new(UInt64Array::from(counts.clone())));
            if let Some(anchored) = &self.anchored {
                columns.push(Arc::new(UInt64Array::from_iter_values(chunk.iter().map(|&s| anchored[s]))));
            }
            let index = Tensor::f_from_slice(&chunk.iter().map(|&s| s as i64).collect::<Vec<_>>())
                .and_then(|t| t.f_to_device(self.device))
                .map_err(torch)?;
            let host = |t: &Tensor| -> tch::Result<Vec<f32>> {
                let t =
                    t.f_index_select(0, &index)?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
                Vec::<f32>::try_from(t.f_view([-1])?)
            };
            let vector = |values: Vec<f32>, width: usize, nulls: Option<NullBuffer>| -> Result<ArrayRef> {
                let item = Arc::new(Field::new("item", DataType::Float32, false));
                let width = i32::try_from(width).map_err(|_| Error::InvalidInput(format!("vector width {width}")))?;
                Ok(Arc::new(
                    FixedSizeListArray::try_new(item, width, Arc::new(Float32Array::from(values)), nulls)
                        .map_err(arrow_err)?,
                ))
            };
            for (c, &width) in self.widths.iter().enumerate() {
                if self.means {
                    columns.push(vector(host(&self.mean[c]).map_err(torch)?, width, None)?);
                }
                if self.variance {
                    let (values, defined) = self.variance_of(c, &counts, &index).map_err(torch)?;
                    columns.push(vector(values, width, Some(defined))?);
                }
            }
            batches.push(RecordBatch::try_new(Arc::clone(&self.schema), columns).map_err(arrow_err)?);
        }
        Ok(batches)
    }

    /// The sample variances of column `c` for the slots `index` (with their `counts`), and which
    /// are defined (two cells or more).
    fn variance_of(&self, c: usize, counts: &[u64], index: &Tensor) -> tch::Result<(Vec<f32>, NullBuffer)> {
        let ddof: Vec<f64> = counts.iter().map(|&n| (n.max(2) - 1) as f64).collect();
        let divisor = Tensor::f_from_slice(&ddof)?.f_to_device(self.device)?.f_unsqueeze(1)?;
        let var = self.m2[c].f_index_select(0, index)?.f_div(&divisor)?;
        let var = var.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let values = Vec::<f32>::try_from(var.f_view([-1])?)?;
        Ok((values, NullBuffer::from(counts.iter().map(|&n| n >= 2).collect::<Vec<_>>())))
    }
}
