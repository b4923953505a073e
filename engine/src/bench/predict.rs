//! Prediction benchmark: a trained model over a store through the whole pipeline, once per output
//! mode (per-cell rows in the small and the fast encoding, and aggregates), with the predictor's
//! and the sink's rates side by side, so that the stage that limits prediction shows. Repetitions
//! interleave the modes; figures are medians.

use std::path::Path;

use serde::Serialize;

use crate::predict;
use crate::predictor::PredictOptions;
use crate::predictor::aggregate::{AggregateOptions, Statistic};
use cpa_stream_pipeline::context::RunContext;
use cpa_stream_pipeline::error::{Error, Result};
pub use cpa_stream_pipeline::model_flags::PredictMode;
use cpa_stream_pipeline::telemetry::StageReport;

/// One mode's medians.
#[derive(Debug, Clone, Serialize)]
pub struct PredictRound {
    /// What was written.
    pub mode: PredictMode,
    /// Cell predictions made (source cells x targets).
    pub predictions: u64,
    /// Rows of the file (cells x targets, or groups).
    pub rows: u64,
    /// Median wall seconds, from the model's load to the file's rename.
    pub seconds: f64,
    /// Cell predictions per wall second.
    pub per_s: f64,
    /// Cell predictions per second of the predictor's busy time (what the model alone sustains).
    pub predictor_per_s: f64,
    /// Cell predictions per second of the sink's busy time (what the sink alone sustains).
    pub sink_per_s: f64,
    /// The sink's busy time as a share of the wall time.
    pub sink_share: f64,
    /// The stage busiest for its threads.
    pub bottleneck: String,
    /// Bytes of the file.
    pub file_bytes: u64,
}

/// What [`bench_predict`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct PredictBench {
    /// Every mode.
    pub rounds: Vec<PredictRound>,
    /// Genes per row.
    pub genes: usize,
    /// The sink's encoding threads.
    pub sink_threads: usize,
    /// The float type of the per-cell rows.
    pub values: cpa_stream_stages::sink::Values,
    /// CPUs of the machine.
    pub cpus: usize,
}

/// One repetition of a mode: wall, predictor busy and sink busy seconds, the sink's share of the
/// wall time, the bottleneck's name.
struct Sample {
    wall: f64,
    predictor: f64,
    sink: f64,
    share: f64,
    bottleneck: String,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn busy(stages: &[StageReport], name: &str) -> f64 {
    stages.iter().find(|s| s.name == name).map_or(0.0, |s| s.busy.as_secs_f64())
}

/// Runs `base` (model, store, source, targets, device, threads) once per mode and repetition,
/// interleaved, writing into `dir` (default: a temporary directory) and removing each file.
pub fn bench_predict(
    base: &PredictOptions,
    modes: &[PredictMode],
    repeats: usize,
    dir: Option<&Path>,
) -> Result<PredictBench> {
    if modes.is_empty() {
        return Err(Error::InvalidInput("bench predict: no mode given (small, fast, parts, aggregate)".to_owned()));
    }
    let temp = match dir {
        Some(dir) => tempfile::tempdir_in(dir).map_err(Error::io(dir))?,
        None => tempfile::tempdir().map_err(Error::io(std::env::temp_dir()))?,
    };
    let mut samples: Vec<Vec<Sample>> = (0..modes.len()).map(|_| Vec::new()).collect();
    let mut shapes = vec![(0u64, 0u64, 0u64); modes.len()];
    let mut genes = 0;
    for _ in 0..repeats.max(1) {
        for (k, &mode) in modes.iter().enumerate() {
            let mut options = base.clone();
            let out = temp.path().join("bench-predict.parquet");
            options.out = Some(out.clone());
            options.sink.overwrite = true;
            options.sink.profile = match mode {
                PredictMode::Fast | PredictMode::Parts => cpa_stream_stages::sink::SinkProfile::Fast,
                _ => cpa_stream_stages::sink::SinkProfile::Small,
            };
            options.sink.parts = mode == PredictMode::Parts;
            options.aggregate = (mode == PredictMode::Aggregate)
                .then(|| AggregateOptions { statistics: vec![Statistic::Mean, Statistic::Var], group_by: None });
            let report = predict::run(&options, &RunContext::default())?;
            let _ = if options.sink.parts { std::fs::remove_dir_all(&out) } else { std::fs::remove_file(&out) };
            let predictions = report.source_cells * report.targets as u64;
            let stages = &report.report.stages;
            let wall = report.seconds;
            let bottleneck = report.report.bottleneck().map(|s| s.name.clone()).unwrap_or_default();
            let sink = busy(stages, crate::Stage::Sink.name());
            samples[k].push(Sample {
                wall,
                predictor: busy(stages, crate::Stage::Predictor.name()),
                sink,
                share: sink / wall.max(1e-9),
                bottleneck,
            });
            shapes[k] = (predictions, report.output.rows, report.output.bytes);
            genes = report.genes;
        }
    }
    let rounds = modes
        .iter()
        .zip(samples)
        .zip(shapes)
        .map(|((&mode, s), (predictions, rows, file_bytes))| {
            let n = predictions as f64;
            let seconds = median(s.iter().map(|x| x.wall).collect());
            let predictor = median(s.iter().map(|x| x.predictor).collect());
            let sink = median(s.iter().map(|x| x.sink).collect());
            // The bottleneck of the median-wall repetition.
            let mut by_wall: Vec<&Sample> = s.iter().collect();
            by_wall.sort_by(|a, b| a.wall.total_cmp(&b.wall));
            PredictRound {
                mode,
                predictions,
                rows,
                seconds,
                per_s: n / seconds.max(1e-9),
                predictor_per_s: n / predictor.max(1e-9),
                sink_per_s: n / sink.max(1e-9),
                sink_share: median(s.iter().map(|x| x.share).collect()),
                bottleneck: by_wall.get(by_wall.len() / 2).map(|x| x.bottleneck.clone()).unwrap_or_default(),
                file_bytes,
            }
        })
        .collect();
    Ok(PredictBench {
        rounds,
        genes,
        sink_threads: base.sink.threads,
        values: base.sink.values,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}
