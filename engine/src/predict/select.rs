//! The source stage of prediction: one pass over obs (the shard's rows) selects the source cells
//! by the `--source` expression, resolves each label group against the model once, and hands
//! batches of cells to the batcher.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::model::Vocabulary;
use crate::model::vocab::split_condition;
use arrow_array::RecordBatch;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_schemas::tables::CELL_ID;
use cpa_stream_stages::store::Store;

use crate::Stage;
use crate::predictor::targets::{Target, known};
use crate::predictor::{CellGroup, SourceCells};
use cpa_stream_pipeline::batcher::Feeder;
use cpa_stream_pipeline::encoder::GroupKey;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::obs::expr::Expr;
use cpa_stream_pipeline::obs::{ObsKeys, TextColumn, column_strings};
use cpa_stream_pipeline::telemetry::StageStats;

/// Which per-cell labels must resolve against the model: the perturbations (reconstruction)
/// and each covariate that some target leaves to the source cell.
#[derive(Debug, Clone)]
pub(super) struct Needs {
    parts: bool,
    covariates: Vec<bool>,
}

impl Needs {
    pub(super) fn of(targets: &[Target], vocab: &Vocabulary) -> Needs {
        let n = vocab.covariates.len();
        Needs {
            parts: targets.is_empty(),
            covariates: (0..n)
                .map(|c| targets.is_empty() || targets.iter().any(|t| t.covariates[c].is_none()))
                .collect(),
        }
    }
}

/// The source stage's inputs.
pub(super) struct Select {
    pub(super) store: Arc<Store>,
    pub(super) vocab: Vocabulary,
    pub(super) keys: ObsKeys,
    pub(super) source: Expr,
    pub(super) rows: Range<u64>,
    pub(super) need: Needs,
    pub(super) batch_size: usize,
    pub(super) max_comb_len: usize,
    /// Extra obs columns whose values group the cells of an aggregate.
    pub(super) group_by: Vec<String>,
}

impl Select {
    /// Selects the source cells and sends them in batches; an error goes to the consumer in
    /// order, after the batches before it.
    pub(super) fn run(
        &self,
        feeder: &mut Feeder<SourceCells>,
        stats: &StageStats,
        stop: &AtomicBool,
        selected: &AtomicU64,
    ) {
        cpa_stream_pipeline::fault::point(Stage::Source);
        if let Err(e) = self.select(feeder, stats, stop, selected) {
            feeder.fail(e);
        }
    }

    fn select(
        &self,
        feeder: &mut Feeder<SourceCells>,
        stats: &StageStats,
        stop: &AtomicBool,
        selected: &AtomicU64,
    ) -> Result<()> {
        let obs = self.store.file_path(StoreFiles::OBS);
        let origin = obs.display().to_string();
        let mut chunk = SourceCells::default();
        let mut lookup: HashMap<String, Arc<CellGroup>> = HashMap::new();
        let mut key = GroupKey::default();
        let mut send = |chunk: &mut SourceCells| -> bool {
            stats.add(chunk.rows.len() as u64, chunk.rows.len() as u64 * 8);
            let full = std::mem::take(chunk);
            // Rows ascend: the block of this job's last cell is kept until the next job, which
            // may share it, has been sent, so that a compressed block is decoded once.
            feeder.send_in_order(full.rows.clone(), full)
        };
        let mut row = 0u64;
        for batch in self.store.table(StoreFiles::OBS).map_err(Error::stage(Stage::Source))? {
            let batch = batch.map_err(Error::stage(Stage::Source))?;
            let n = batch.num_rows() as u64;
            if row + n <= self.rows.start {
                row += n;
                continue;
            }
            if row >= self.rows.end || stop.load(Ordering::Relaxed) {
                break;
            }
            let chosen = stats.busy(|| self.source.select(&batch, &origin))?;
            let columns = stats.busy(|| self.columns(&batch, &origin))?;
            for (i, &take) in chosen.iter().enumerate() {
                let r = row + i as u64;
                if !take || !self.rows.contains(&r) {
                    continue;
                }
                let group = stats.busy(|| self.group(&columns, i, r, (&mut lookup, &mut key), &origin))?;
                chunk.rows.push(r);
                chunk.ids.push(columns.cell_id.as_ref().and_then(|c| c.get(i)).unwrap_or_default().to_owned());
                chunk.groups.push(group);
                selected.fetch_add(1, Ordering::Relaxed);
                if chunk.rows.len() == self.batch_size && !send(&mut chunk) {
                    return Ok(());
                }
            }
            row += n;
        }
        if !chunk.rows.is_empty() {
            send(&mut chunk);
        }
        Ok(())
    }

    fn columns(&self, batch: &RecordBatch, origin: &str) -> Result<LabelColumns> {
        let optional = |name: &str| batch.column_by_name(name).map(|_| column_strings(batch, name, origin)).transpose();
        let required = |name: &str, why: &str| -> Result<TextColumn> {
            if batch.column_by_name(name).is_none() {
                return Err(Error::InvalidInput(format!("{origin}: no obs column {name:?} ({why})")));
            }
            column_strings(batch, name, origin)
        };
        let perturbation = if self.need.parts {
            Some(required(&self.keys.perturbation, "the model's perturbation key, needed to reconstruct cells")?)
        } else {
            optional(&self.keys.perturbation)?
        };
        let dose = match &self.keys.dose {
            Some(d) if self.need.parts => Some(required(d, "the model's dose key")?),
            Some(d) => optional(d)?,
            None => None,
        };
        let covariates = self
            .vocab
            .covariates
            .iter()
            .zip(&self.need.covariates)
            .map(|(c, &need)| {
                if need {
                    required(&c.name, "a covariate of the model that the targets do not set").map(Some)
                } else {
                    optional(&c.name)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let by = self
            .group_by
            .iter()
            .map(|name| {
                required(name, "a group-by column of the aggregates").map_err(|e| match e {
                    Error::InvalidInput(text) if batch.column_by_name(name).is_none() => {
                        let names: Vec<&str> = batch.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
                        let close = cpa_stream_pipeline::suggest::listing(name, names, 5);
                        Error::InvalidInput(format!("{text}; obs columns, closest first: {close}"))
                    }
                    other => other,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LabelColumns { cell_id: optional(CELL_ID)?, perturbation, dose, covariates, by })
    }

    /// The label group of row `i` (store row `row`): looked up by its key, resolved against the
    /// model when first seen.
    fn group(
        &self,
        columns: &LabelColumns,
        i: usize,
        row: u64,
        (lookup, key): (&mut HashMap<String, Arc<CellGroup>>, &mut GroupKey),
        origin: &str,
    ) -> Result<Arc<CellGroup>> {
        let condition = columns.perturbation.as_ref().and_then(|c| c.get(i)).unwrap_or("");
        let dose = columns.dose.as_ref().and_then(|c| c.get(i));
        let values: Vec<&str> =
            columns.covariates.iter().map(|c| c.as_ref().and_then(|c| c.get(i)).unwrap_or("")).collect();
        let by: Vec<Option<&str>> = columns.by.iter().map(|c| c.get(i)).collect();
        // A null group-by value keys apart from any text (the key's separator is never in labels).
        let keyed: Vec<&str> = values.iter().copied().chain(by.iter().map(|v| v.unwrap_or("\u{1f}"))).collect();
        let key = key.of(condition, dose, &keyed);
        let cell = || match columns.cell_id.as_ref().and_then(|c| c.get(i)) {
            Some(id) => format!("{origin}: row {row} (cell {id:?})"),
            None => format!("{origin}: row {row}"),
        };
        let group = match lookup.get(key) {
            Some(g) => Arc::clone(g),
            None => {
                let index = self.vocab.perturbation_index();
                let parts = split_condition(condition, dose, self.max_comb_len).and_then(|parts| {
                    parts
                        .into_iter()
                        .map(|(name, d)| {
                            index.get(name).map(|&id| (id, d)).ok_or_else(|| {
                                format!(
                                    "perturbation {name:?} is not in the model's vocabulary ({})",
                                    known(&self.vocab.perturbations[1..])
                                )
                            })
                        })
                        .collect::<std::result::Result<Vec<_>, String>>()
                });
                let covariates = self
                    .vocab
                    .covariates
                    .iter()
                    .zip(&values)
                    .map(|(c, v)| c.categories.iter().position(|x| x == v).map(|p| p as u32))
                    .collect();
                let n_parts = condition.split('+').count();
                let group = Arc::new(CellGroup {
                    condition: condition.to_owned(),
                    dose: dose.map(str::to_owned).unwrap_or_else(|| vec!["1"; n_parts].join("+")),
                    parts,
                    covariates,
                    covariate_values: values.iter().map(|v| (*v).to_owned()).collect(),
                    by_values: by.iter().map(|v| v.map(str::to_owned)).collect(),
                });
                lookup.insert(key.to_owned(), Arc::clone(&group));
                group
            }
        };
        if self.need.parts
            && let Err(reason) = &group.parts
        {
            return Err(Error::InvalidInput(format!("{}: {reason}", cell())));
        }
        for (c, cov) in self.vocab.covariates.iter().enumerate() {
            if self.need.covariates[c] && group.covariates[c].is_none() {
                return Err(Error::InvalidInput(format!(
                    "{}: {} {:?} is not a category the model knows ({})",
                    cell(),
                    cov.name,
                    group.covariate_values[c],
                    known(&cov.categories)
                )));
            }
        }
        Ok(group)
    }
}

struct LabelColumns {
    cell_id: Option<TextColumn>,
    perturbation: Option<TextColumn>,
    dose: Option<TextColumn>,
    covariates: Vec<Option<TextColumn>>,
    by: Vec<TextColumn>,
}
