//! `synth`: generator workers -> store writer, then the truth table.
//!
//! Worker `w` of `W` generates chunks `w, w + W, ...` and sends them on its own bounded channel;
//! the writer takes chunk `k` from channel `k % W`, so chunks arrive in order with no reorder
//! buffer and at most `W * depth` chunks in flight.

mod request;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cpa_stream_schemas::{Codec, Manifest, StoreFiles};
use cpa_stream_stages::Result as StageResult;
use cpa_stream_stages::store::{StoreWriter, StoreWriterOptions};
use cpa_stream_stages::synth::{SynthAtlas, SynthChunk, SynthConfig};
use crossbeam_channel::bounded;
use serde::Serialize;

pub use request::SynthRequest;

use crate::Stage;
use crate::context::RunContext;
use crate::crew::Crew;
use crate::error::{Error, Result};
use crate::telemetry::{MemorySampler, RunReport, StageStats};

/// Default chunks queued per generator worker.
pub const DEFAULT_CHANNEL_DEPTH: usize = 2;

/// What `synth` generates, and how.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// The atlas: its shape, true model and seed.
    pub config: SynthConfig,
    /// The store written.
    pub out: PathBuf,
    /// Generator threads (the writer runs on the calling thread). Default: available cores.
    pub threads: usize,
    /// Matrix codec of the store. Default: raw.
    pub codec: Codec,
    /// Chunks queued per worker. Default: [`DEFAULT_CHANNEL_DEPTH`].
    pub channel_depth: usize,
    /// Replace an existing store. Default: false.
    pub overwrite: bool,
    /// Provenance recorded in the manifest.
    pub source: Option<String>,
}

impl SynthOptions {
    /// The atlas of `config` into `out`, with every other default.
    pub fn new(config: SynthConfig, out: impl Into<PathBuf>) -> SynthOptions {
        SynthOptions {
            config,
            out: out.into(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            codec: Codec::Raw,
            channel_depth: DEFAULT_CHANNEL_DEPTH,
            overwrite: false,
            source: None,
        }
    }
}

/// The outcome of a `synth` run.
#[derive(Debug, Clone, Serialize)]
pub struct SynthReport {
    /// The store's manifest.
    pub manifest: Manifest,
    /// Rows of the truth table.
    pub truth_groups: u64,
    /// Cells per second of the whole run (truth table excluded).
    pub cells_per_s: f64,
    /// Matrix bytes (indptr, indices, data or blocks) written per second.
    pub mb_per_s: f64,
    /// Stages, wall time and peak memory.
    pub report: RunReport,
}

// Long: the wiring of three stages (generators, writer, truth) and their report, read top to
// bottom as the data flows.
/// Generates the atlas of `options.config` into a store at `options.out`.
pub fn run(options: &SynthOptions, ctx: &RunContext) -> Result<SynthReport> {
    let atlas = &SynthAtlas::new(options.config.clone()).map_err(|e| Error::InvalidInput(e.to_string()))?;
    let (out, progress) = (options.out.as_path(), ctx.progress());
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let workers = options.threads.max(1);
    let generate = StageStats::new(Stage::Generate, workers);
    let write = StageStats::new(Stage::Write, 1);
    let truth = StageStats::new(Stage::Truth, workers);
    let var = atlas.var_table().map_err(Error::stage(Stage::Synth))?;
    let writer_options = StoreWriterOptions {
        codec: options.codec,
        overwrite: options.overwrite,
        source: options.source.clone(),
        ..StoreWriterOptions::default()
    };
    let mut writer =
        StoreWriter::create(out, &var, atlas.obs_schema(), writer_options).map_err(Error::stage(Stage::Write))?;
    let n_chunks = atlas.n_chunks();
    let mut counts = vec![0u64; atlas.n_groups()];
    progress.begin("cells", atlas.config().cells);

    let cells_result = std::thread::scope(|scope| -> Result<()> {
        let mut receivers = Vec::with_capacity(workers);
        let mut crew = Crew::new();
        for w in 0..workers {
            let (tx, rx) = bounded::<StageResult<SynthChunk>>(options.channel_depth.max(1));
            receivers.push(rx);
            let generate = Arc::clone(&generate);
            crew.spawn_in(scope, Stage::Generate, format!("{}-{w}", Stage::Generate), move || {
                for k in (w as u64..n_chunks).step_by(workers) {
                    let chunk = generate.busy(|| atlas.generate_chunk(k));
                    let failed = chunk.is_err();
                    if let Ok(c) = &chunk {
                        generate.add(c.rows.n_rows() as u64, c.rows.byte_size());
                    }
                    if !generate.send(&tx, chunk) || failed {
                        return;
                    }
                }
            })?;
        }
        let written = (|| -> Result<()> {
            for k in 0..n_chunks {
                let rx = &receivers[(k % workers as u64) as usize];
                let Some(chunk) = write.recv(rx) else {
                    // The worker ended without sending: it panicked; the join below says why.
                    return Ok(());
                };
                let chunk = chunk.map_err(Error::stage(Stage::Generate))?;
                write.busy(|| writer.push_rows(&chunk.rows, &chunk.obs)).map_err(Error::stage(Stage::Write))?;
                write.add(chunk.rows.n_rows() as u64, chunk.rows.byte_size());
                for (total, c) in counts.iter_mut().zip(&chunk.group_counts) {
                    *total += c;
                }
                progress.advance(chunk.rows.n_rows() as u64);
                ctx.check_stopped()?;
            }
            Ok(())
        })();
        // Unblock workers still sending, then collect their fate.
        drop(receivers);
        crew.join()?;
        written?;
        if writer.n_obs() != atlas.config().cells {
            return Err(Error::InvalidInput(format!(
                "generated {} cells, expected {}",
                writer.n_obs(),
                atlas.config().cells
            )));
        }
        Ok(())
    });
    progress.end();
    cells_result?;
    let cells_wall = started.elapsed();

    progress.begin("truth groups", atlas.n_groups() as u64);
    let truth_path = writer.extra_file_path(StoreFiles::TRUTH);
    let groups = truth.busy(|| atlas.write_truth(&truth_path, &counts, workers)).map_err(Error::stage(Stage::Truth))?;
    truth.add(groups, std::fs::metadata(&truth_path).map(|m| m.len()).unwrap_or(0));
    let features_path = writer.extra_file_path(cpa_stream_stages::synth::FEATURES_FILE);
    truth.busy(|| atlas.write_perturbation_features(&features_path)).map_err(Error::stage(Stage::Truth))?;
    progress.advance(groups);
    progress.end();
    let manifest = write.busy(|| writer.finish()).map_err(Error::stage(Stage::Write))?;

    let matrix_bytes: u64 =
        manifest.files.iter().filter(|(name, _)| name.starts_with("X/")).map(|(_, f)| f.bytes).sum();
    let secs = cells_wall.as_secs_f64().max(1e-9);
    let report = RunReport {
        wall: started.elapsed(),
        stages: vec![generate.report(), write.report(), truth.report()],
        memory: sampler.finish(),
    };
    Ok(SynthReport {
        cells_per_s: manifest.n_obs as f64 / secs,
        mb_per_s: matrix_bytes as f64 / 1e6 / secs,
        manifest,
        truth_groups: groups,
        report,
    })
}
