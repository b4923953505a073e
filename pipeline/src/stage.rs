//! The stages of a run, by one name each: what statistics, errors, fault points, thread names
//! and the CLI's bottleneck note call them.

use std::fmt;
use std::str::FromStr;

/// A stage of a command's run (the design card's reader, encoder, batcher, trainer, predictor
/// and sink, and the steps of the commands that are not the training pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Stage {
    /// Opening and reading a store (the memory-mapped matrix reader).
    Reader,
    /// Reading an input file as a command's first stage (`import`'s `.h5ad`, `convert`'s and
    /// `export`'s store).
    Read,
    /// Writing an output file or store (`import`, `convert`, `export`, `synth`).
    Write,
    /// `convert --shuffle`'s scatter of cells into scratch buckets.
    Scatter,
    /// The CSR perturbation encoder: labels, vocabularies, splits.
    Encoder,
    /// Choosing which cells make each batch.
    Planner,
    /// The prefetching batcher's gather workers.
    Batcher,
    /// Selecting prediction's source cells.
    Source,
    /// Copying training batches to the device ahead of the trainer (CUDA).
    Uploader,
    /// The libtorch trainer.
    Trainer,
    /// Scoring validation cells after epochs.
    Validation,
    /// The libtorch predictor.
    Predictor,
    /// The Parquet sink.
    Sink,
    /// Where a benchmark or a test consumes batches.
    #[default]
    Consumer,
    /// Evaluation's pass over the real cells (moments, samples).
    Moments,
    /// Evaluation and its outputs.
    Evaluate,
    /// Dose-response curves.
    DoseResponse,
    /// The learned embeddings.
    Embeddings,
    /// A synthetic atlas (`synth`): its model and tables.
    Synth,
    /// A synthetic atlas's cells.
    Generate,
    /// A synthetic atlas's truth table.
    Truth,
    /// Reading a targets table (`--targets`).
    Targets,
    /// Reading a DEG table.
    Degs,
    /// A run's metrics table.
    Metrics,
    /// Fixed perturbation features.
    Features,
    /// The compute device.
    Device,
    /// The batch-size probe of a CUDA run (`--batch-size auto`).
    Probe,
    /// A benchmark's own steps (preloading, timing).
    Bench,
    /// Scoring a prediction file against the real cells (`score`).
    Score,
}

impl Stage {
    /// Every stage.
    pub const ALL: [Stage; 29] = [
        Stage::Reader,
        Stage::Read,
        Stage::Write,
        Stage::Scatter,
        Stage::Encoder,
        Stage::Planner,
        Stage::Batcher,
        Stage::Source,
        Stage::Uploader,
        Stage::Trainer,
        Stage::Validation,
        Stage::Predictor,
        Stage::Sink,
        Stage::Consumer,
        Stage::Moments,
        Stage::Evaluate,
        Stage::DoseResponse,
        Stage::Embeddings,
        Stage::Synth,
        Stage::Generate,
        Stage::Truth,
        Stage::Targets,
        Stage::Degs,
        Stage::Metrics,
        Stage::Features,
        Stage::Device,
        Stage::Probe,
        Stage::Bench,
        Stage::Score,
    ];

    /// The stage's name in reports, messages, thread names and `CPA_STREAM_FAULT`.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Reader => "reader",
            Stage::Read => "read",
            Stage::Write => "write",
            Stage::Scatter => "scatter",
            Stage::Encoder => "encoder",
            Stage::Planner => "planner",
            Stage::Batcher => "batcher",
            Stage::Source => "source",
            Stage::Uploader => "uploader",
            Stage::Trainer => "trainer",
            Stage::Validation => "validation",
            Stage::Predictor => "predictor",
            Stage::Sink => "sink",
            Stage::Consumer => "consumer",
            Stage::Moments => "moments",
            Stage::Evaluate => "evaluate",
            Stage::DoseResponse => "dose-response",
            Stage::Embeddings => "embeddings",
            Stage::Synth => "synth",
            Stage::Generate => "generate",
            Stage::Truth => "truth",
            Stage::Targets => "targets",
            Stage::Degs => "degs",
            Stage::Metrics => "metrics",
            Stage::Features => "features",
            Stage::Device => "device",
            Stage::Probe => "batch-size probe",
            Stage::Bench => "bench",
            Stage::Score => "score",
        }
    }

    /// Whether the stage moves the data to or from the model or the file: one that is busy most
    /// of a run held the rest up, and the CLI says so (the reader, encoder, planner, batcher and
    /// source feeding a model; the read, write and scatter stages of `import`, `convert`,
    /// `export` and `synth`; the sink).
    pub const fn moves_data(self) -> bool {
        matches!(
            self,
            Stage::Reader
                | Stage::Read
                | Stage::Write
                | Stage::Scatter
                | Stage::Encoder
                | Stage::Planner
                | Stage::Batcher
                | Stage::Source
                | Stage::Sink
        )
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Stage {
    type Err = String;

    fn from_str(name: &str) -> Result<Stage, String> {
        Stage::ALL.into_iter().find(|s| s.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
            format!("no stage {name:?}; stages: {}", names.join(", "))
        })
    }
}

impl serde::Serialize for Stage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_has_one_name_that_parses_back() {
        let mut names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
        for s in Stage::ALL {
            assert_eq!(s.name().parse::<Stage>(), Ok(s));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Stage::ALL.len(), "two stages share a name");
        assert!("loader".parse::<Stage>().is_err());
    }
}
