//! A run's `metrics.parquet`: one row per epoch (training losses, learning rate, counts, time,
//! validation), rewritten after every epoch and read back on `--resume`. Its schema is
//! [`training_metrics_schema`].

use std::path::Path;
use std::sync::Arc;

use crate::trainer::{EpochMetrics, HeadMetrics};
use arrow_array::{Array, ArrayRef, Float64Array, RecordBatch, UInt32Array, UInt64Array};
use cpa_stream_schemas::tables::training_metrics::{self as columns, EPOCH};
use cpa_stream_schemas::tables::training_metrics_schema;
use cpa_stream_stages::store::{read_small_table, write_table};
use serde::Serialize;

use super::validate::ValidationScore;
use crate::Stage;
use cpa_stream_pipeline::error::{Error, Result};

/// One epoch's row of `metrics.parquet`.
#[derive(Debug, Clone, Serialize)]
pub struct EpochRecord {
    /// The training batches' figures.
    pub train: EpochMetrics,
    /// Wall seconds of the epoch (an epoch split by an interruption: both parts).
    pub seconds: f64,
    /// Validation after the epoch, when there was one.
    pub validation: Option<ValidationScore>,
}

/// Writes every epoch's metrics to `path` (temporary name, then rename), for a model of these
/// covariates.
pub fn write_history(path: &Path, records: &[EpochRecord], covariates: &[String]) -> Result<()> {
    let finite = |v: f64| v.is_finite().then_some(v);
    let floats = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from(records.iter().map(f).collect::<Vec<_>>()))
    };
    let counts = |f: &dyn Fn(&EpochRecord) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from(records.iter().map(f).collect::<Vec<_>>()))
    };
    fn t(r: &EpochRecord) -> &EpochMetrics {
        &r.train
    }
    let v = |r: &EpochRecord| r.validation;
    let head = |r: &EpochRecord, i: usize| r.train.covariates.get(i).copied().unwrap_or(HeadMetrics::ABSENT);
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from(records.iter().map(|r| r.train.epoch).collect::<Vec<_>>())),
        floats(&|r| finite(t(r).recon_loss)),
        floats(&|r| finite(t(r).kl)),
        floats(&|r| finite(t(r).adv_loss)),
        floats(&|r| finite(t(r).penalty_adv)),
        floats(&|r| finite(t(r).acc_perts)),
        floats(&|r| finite(t(r).r2_mean)),
        floats(&|r| finite(t(r).r2_var)),
        floats(&|r| finite(t(r).adv_perts)),
        floats(&|r| finite(t(r).penalty_perts)),
        Arc::new(Float64Array::from(records.iter().map(|r| r.train.lr).collect::<Vec<_>>())),
        counts(&|r| t(r).cells),
        counts(&|r| t(r).autoencoder_batches),
        counts(&|r| t(r).adversary_batches),
        Arc::new(Float64Array::from(records.iter().map(|r| r.seconds).collect::<Vec<_>>())),
        floats(&|r| v(r).and_then(|v| finite(v.recon_loss))),
        floats(&|r| v(r).and_then(|v| finite(v.r2_mean))),
        floats(&|r| v(r).and_then(|v| finite(v.r2_var))),
        floats(&|r| v(r).and_then(|v| finite(v.score))),
        Arc::new(UInt64Array::from(records.iter().map(|r| r.validation.map(|v| v.cells)).collect::<Vec<_>>())),
        floats(&|r| v(r).and_then(|v| finite(v.r2_mean_deg))),
        floats(&|r| v(r).and_then(|v| finite(v.disnt_basal))),
        floats(&|r| v(r).and_then(|v| finite(v.disnt_after))),
    ];
    for i in 0..covariates.len() {
        columns.push(floats(&|r| finite(head(r, i).adv)));
        columns.push(floats(&|r| finite(head(r, i).penalty)));
        columns.push(floats(&|r| finite(head(r, i).acc)));
    }
    let schema = training_metrics_schema(covariates);
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns).map_err(Error::arrow(path.display().to_string()))?;
    write_table(path, schema, [batch]).map_err(Error::stage(Stage::Metrics))
}

/// Reads back the metrics of epochs before `epochs` of a model of these covariates (for
/// `--resume`); none if there is no file. Columns added later read as 0 (batch counts,
/// validation cells) or NaN (training R2, each adversary's figures) from older files.
pub fn read_history(path: &Path, epochs: u32, covariates: &[String]) -> Result<Vec<EpochRecord>> {
    if epochs == 0 || !path.exists() {
        return Ok(Vec::new());
    }
    let batch = read_small_table(path).map_err(Error::stage(Stage::Metrics))?;
    let f64s = |name: &str| -> Vec<Option<f64>> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    };
    let u64s = |name: &str| -> Vec<Option<u64>> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    };
    let epoch: Vec<u32> = batch
        .column_by_name(EPOCH)
        .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
        .map(|a| a.values().to_vec())
        .unwrap_or_default();
    let [recon, kl, adv, penalty, acc] = columns::TRAIN_FLOATS.map(f64s);
    let [r2_mean, r2_var] = columns::TRAIN_R2.map(f64s);
    let [adv_perts, penalty_perts] = columns::PERTURBATION_ADVERSARY.map(f64s);
    let heads: Vec<[Vec<Option<f64>>; 3]> =
        covariates.iter().map(|c| columns::covariate_columns(c).map(|name| f64s(&name))).collect();
    let [val_recon, val_mean, val_var, val_score] = columns::VALIDATION_FLOATS.map(f64s);
    let [cells, ae_batches, adv_batches] = columns::COUNTS.map(u64s);
    let (lr, seconds, val_cells) = (f64s(columns::LR), f64s(columns::SECONDS), u64s(columns::VAL_CELLS));
    let val_deg = f64s(columns::VAL_R2_MEAN_DEG);
    let [disnt_basal, disnt_after] = columns::VAL_DISENTANGLEMENT.map(f64s);
    let get = |v: &[Option<f64>], i: usize| v.get(i).copied().flatten().unwrap_or(f64::NAN);
    let count = |v: &[Option<u64>], i: usize| v.get(i).copied().flatten().unwrap_or(0);
    let mut out = Vec::new();
    for (i, &e) in epoch.iter().enumerate().filter(|(_, e)| **e < epochs) {
        let validation = val_score.get(i).copied().flatten().map(|score| ValidationScore {
            recon_loss: get(&val_recon, i),
            r2_mean: get(&val_mean, i),
            r2_var: get(&val_var, i),
            r2_mean_deg: get(&val_deg, i),
            disnt_basal: get(&disnt_basal, i),
            disnt_after: get(&disnt_after, i),
            score,
            cells: count(&val_cells, i),
        });
        out.push(EpochRecord {
            train: EpochMetrics {
                epoch: e,
                recon_loss: get(&recon, i),
                kl: get(&kl, i),
                adv_loss: get(&adv, i),
                penalty_adv: get(&penalty, i),
                acc_perts: get(&acc, i),
                r2_mean: get(&r2_mean, i),
                r2_var: get(&r2_var, i),
                adv_perts: get(&adv_perts, i),
                penalty_perts: get(&penalty_perts, i),
                covariates: heads
                    .iter()
                    .map(|[a, p, c]| HeadMetrics { adv: get(a, i), penalty: get(p, i), acc: get(c, i) })
                    .collect(),
                autoencoder_batches: count(&ae_batches, i),
                adversary_batches: count(&adv_batches, i),
                cells: count(&cells, i),
                lr: get(&lr, i),
            },
            seconds: get(&seconds, i),
            validation,
        });
    }
    Ok(out)
}

/// Writes `stem.svg` and `stem.png`: the run's reconstruction and adversary losses, its
/// validation scores and its learning rate, per epoch (1-based, as the logs count).
pub fn plot_history(stem: &Path, title: &str, records: &[EpochRecord]) -> Result<()> {
    use cpa_stream_pipeline::plots::{Colour, Line, Panel, write_panels};
    if records.is_empty() {
        return Ok(());
    }
    let x = |r: &EpochRecord| f64::from(r.train.epoch) + 1.0;
    let line = |label: &str, colour: Colour, f: &dyn Fn(&EpochRecord) -> f64| Line {
        label: label.to_owned(),
        colour,
        points: records.iter().map(|r| (x(r), f(r))).collect(),
    };
    let validation = |label: &str, colour: Colour, f: fn(&ValidationScore) -> f64| Line {
        label: label.to_owned(),
        colour,
        points: records.iter().filter_map(|r| r.validation.map(|v| (x(r), f(&v)))).collect(),
    };
    let epochs = (0.5, records.last().map_or(1.0, x) + 0.5);
    let panel = |title: &str, lines: Vec<Line>| Panel {
        title: title.to_owned(),
        x_desc: "epoch".to_owned(),
        x_range: epochs,
        lines,
        marks: Vec::new(),
    };
    let panels = [
        panel("reconstruction loss (per cell)", vec![line("recon", Colour::Blue, &|r| r.train.recon_loss)]),
        panel(
            "adversaries",
            vec![
                line("adversary loss", Colour::Orange, &|r| r.train.adv_loss),
                line("perturbation accuracy", Colour::Grey, &|r| r.train.acc_perts),
            ],
        ),
        panel(
            "validation",
            vec![
                validation("r2_mean", Colour::Green, |v| v.r2_mean),
                validation("r2_var", Colour::Orange, |v| v.r2_var),
                validation("score", Colour::Blue, |v| v.score),
            ],
        ),
        panel("learning rate (autoencoder)", vec![line("lr", Colour::Red, &|r| r.train.lr)]),
    ];
    write_panels(stem, title, 20, (1100, 760), (2, 2), &panels)
}
