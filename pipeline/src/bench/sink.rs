//! Sink benchmark: the prediction sink alone, fed prediction batches made beforehand (a cell id,
//! a target and a vector of expected means per cell, as `predict` writes them), per gene count
//! and thread count, against a memcpy bound of the same values measured in the same run.
//! Repetitions interleave the thread counts; figures are medians. Each round writes one file, or
//! a directory of parts (`SinkOptions::parts`).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use cpa_stream_stages::sink::{ParquetSink, SinkOptions, SinkProfile};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use crate::Stage;
use crate::error::{Error, Result};

/// MiB of float32 values written per round, unless set otherwise.
pub const DEFAULT_SINK_MIB: usize = 256;
/// Rows per batch fed to the sink (the predictor's default batch).
const BATCH_ROWS: usize = 512;

/// Options of [`bench_sink`].
#[derive(Debug, Clone)]
pub struct SinkBenchOptions {
    /// Genes per row (one round each).
    pub genes: Vec<usize>,
    /// Encoding threads (one round each).
    pub threads: Vec<usize>,
    /// Page encodings (one round each).
    pub profiles: Vec<SinkProfile>,
    /// MiB of float32 values per round.
    pub mib: usize,
    /// Repetitions of every round.
    pub repeats: usize,
    /// The float type written.
    pub values: cpa_stream_stages::sink::Values,
    /// What each round writes (one round each).
    pub outputs: Vec<SinkOutput>,
}

/// What a sink writes: one file, or a directory of parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkOutput {
    /// One Parquet file.
    File,
    /// A directory of part files, one row group each.
    Parts,
}

impl std::str::FromStr for SinkOutput {
    type Err = Error;

    fn from_str(text: &str) -> Result<SinkOutput> {
        match text {
            "file" => Ok(SinkOutput::File),
            "parts" => Ok(SinkOutput::Parts),
            _ => Err(Error::InvalidInput(format!("sink output {text:?}: expected file or parts"))),
        }
    }
}

impl Default for SinkBenchOptions {
    fn default() -> Self {
        SinkBenchOptions {
            genes: vec![5_000, 20_000],
            threads: vec![1, 2],
            profiles: vec![SinkProfile::Small, SinkProfile::Fast],
            mib: DEFAULT_SINK_MIB,
            repeats: 3,
            values: cpa_stream_stages::sink::Values::F32,
            outputs: vec![SinkOutput::File, SinkOutput::Parts],
        }
    }
}

/// One gene count and thread count.
#[derive(Debug, Clone, Serialize)]
pub struct SinkRound {
    /// Genes per row.
    pub genes: usize,
    /// Encoding threads.
    pub threads: usize,
    /// Page encoding.
    pub profile: SinkProfile,
    /// One file or parts.
    pub output: SinkOutput,
    /// Rows written.
    pub rows: usize,
    /// Median seconds of a round.
    pub seconds: f64,
    /// Rows per second.
    pub rows_per_s: f64,
    /// MB per second of float32 values taken in.
    pub mb_per_s: f64,
    /// `mb_per_s` per thread.
    pub mb_per_s_per_thread: f64,
    /// Bytes of the file (of every part) written.
    pub file_bytes: u64,
    /// Files written (1, or the parts).
    pub files: usize,
}

/// What [`bench_sink`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct SinkBench {
    /// Every round.
    pub rounds: Vec<SinkRound>,
    /// MB per second of copying the same values once (the bound of any sink on one thread).
    pub memcpy_mb_per_s: f64,
    /// CPUs of the machine.
    pub cpus: usize,
}

/// Rows of `genes` expected means each, about `mib` MiB of values, in batches of
/// [`BATCH_ROWS`]; values spread as a model's means are (mostly small, a few large).
fn batches(genes: usize, mib: usize) -> Result<Vec<RecordBatch>> {
    let rows = ((mib << 20) / (genes * 4)).max(BATCH_ROWS);
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("cell_id", DataType::Utf8, false),
        Field::new("target", DataType::Utf8, false),
        Field::new("mean", DataType::FixedSizeList(Arc::clone(&item), genes as i32), false),
    ]));
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
    let scale: Vec<f32> = (0..genes).map(|_| (rng.random::<f32>() * 6.0 - 3.0).exp()).collect();
    let mut out = Vec::new();
    for first in (0..rows).step_by(BATCH_ROWS) {
        let n = BATCH_ROWS.min(rows - first);
        let ids = StringArray::from_iter_values((first..first + n).map(|i| format!("cell{i:08}")));
        let targets = StringArray::from_iter_values((0..n).map(|_| "MAP2K3+MAP2K6"));
        let values = Float32Array::from_iter_values((0..n * genes).map(|k| scale[k % genes] * rng.random::<f32>()));
        let means = FixedSizeListArray::try_new(Arc::clone(&item), genes as i32, Arc::new(values), None)
            .map_err(Error::arrow("benchmark batch"))?;
        let columns: Vec<ArrayRef> = vec![Arc::new(ids), Arc::new(targets), Arc::new(means)];
        out.push(RecordBatch::try_new(Arc::clone(&schema), columns).map_err(Error::arrow("benchmark batch"))?);
    }
    Ok(out)
}

/// Writes `batches` through a sink of `threads` threads into `dir`; seconds, bytes and files.
fn round(
    dir: &Path,
    batches: &[RecordBatch],
    (profile, output, threads): Case,
    values: cpa_stream_stages::sink::Values,
) -> Result<(f64, u64, usize)> {
    let path = dir.join("sink-bench.parquet");
    let parts = output == SinkOutput::Parts;
    let options = SinkOptions { threads, profile, values, parts, overwrite: true, ..SinkOptions::default() };
    let started = Instant::now();
    let mut sink = ParquetSink::create(&path, batches[0].schema(), &options).map_err(Error::stage(Stage::Sink))?;
    for batch in batches {
        sink.write(batch).map_err(Error::stage(Stage::Sink))?;
    }
    let summary = sink.finish().map_err(Error::stage(Stage::Sink))?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = if parts { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
    Ok((seconds, summary.bytes, summary.files))
}

/// A round's page encoding, output and threads.
type Case = (SinkProfile, SinkOutput, usize);

/// Copies every value of `batches` once into one buffer: MB per second.
fn memcpy(batches: &[RecordBatch]) -> f64 {
    let values: Vec<&[f32]> = batches
        .iter()
        .filter_map(|b| b.column(2).as_any().downcast_ref::<FixedSizeListArray>())
        .filter_map(|l| l.values().as_any().downcast_ref::<Float32Array>().map(|v| v.values().as_ref()))
        .collect();
    let total: usize = values.iter().map(|v| v.len()).sum();
    let mut into = vec![0f32; total];
    let started = Instant::now();
    let mut at = 0;
    for v in &values {
        into[at..at + v.len()].copy_from_slice(v);
        at += v.len();
    }
    std::hint::black_box(&into);
    (total * 4) as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-9)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs the sink benchmark, writing its files in a temporary directory in `dir` (default: the
/// system's), removed after.
pub fn bench_sink(options: &SinkBenchOptions, dir: Option<&Path>) -> Result<SinkBench> {
    let scratch = match dir {
        Some(dir) => tempfile::tempdir_in(dir).map_err(Error::io(dir))?,
        None => tempfile::tempdir().map_err(Error::io(std::env::temp_dir()))?,
    };
    let dir = scratch.path();
    let repeats = options.repeats.max(1);
    let mut rounds = Vec::new();
    let mut memcpy_rates = Vec::new();
    for &genes in &options.genes {
        let batches = batches(genes.max(1), options.mib.max(1))?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let outputs = if options.outputs.is_empty() { vec![SinkOutput::File] } else { options.outputs.clone() };
        let cases: Vec<Case> = options
            .profiles
            .iter()
            .flat_map(|&p| outputs.iter().flat_map(move |&o| options.threads.iter().map(move |&t| (p, o, t.max(1)))))
            .collect();
        let mut seconds = vec![Vec::new(); cases.len()];
        let mut bytes = vec![(0u64, 0usize); cases.len()];
        for repeat in 0..repeats {
            memcpy_rates.push(memcpy(&batches));
            // Cases in a rotating order: each repetition starts with another.
            for k in 0..cases.len() {
                let c = (k + repeat) % cases.len();
                let (s, b, files) = round(dir, &batches, cases[c], options.values)?;
                seconds[c].push(s);
                bytes[c] = (b, files);
            }
        }
        for (c, &(profile, output, threads)) in cases.iter().enumerate() {
            let (t, s) = (c, median(seconds[c].clone()));
            let mb = (rows * genes * 4) as f64 / 1e6;
            rounds.push(SinkRound {
                genes,
                threads,
                profile,
                output,
                rows,
                seconds: s,
                rows_per_s: rows as f64 / s,
                mb_per_s: mb / s,
                mb_per_s_per_thread: mb / s / threads.max(1) as f64,
                file_bytes: bytes[t].0,
                files: bytes[t].1,
            });
        }
    }
    Ok(SinkBench { rounds, memcpy_mb_per_s: median(memcpy_rates), cpus: crate::threads::cpus() })
}
