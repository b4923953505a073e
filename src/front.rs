//! The model commands as the `cpa-stream` front runs them: handed to `cpa-stream-engine`, the
//! binary beside it that links libtorch.
//!
//! libtorch's and CUDA's libraries take a third of a second or more to initialise, and half a
//! gigabyte of mappings, in every process that links them. The front does not: `--help`,
//! `--version`, usage errors and the commands that need no model (import, export, inspect,
//! verify, convert, synth, completions, the reader, loader and sink benchmarks) run here at
//! once. A model command, once its command line has parsed, replaces this process with the
//! engine (`execve`: the same process id, so signals, the exit code and the terminal are the
//! engine's), which parses the same arguments again and runs it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::bench::{ModelArgs, PredictBenchArgs, TrainArgs as BenchTrainArgs};
use crate::cli::evaluate::{DoseResponseArgs, EmbeddingsArgs, EvaluateArgs};
use crate::cli::info::InfoArgs;
use crate::cli::predict::PredictArgs;
use crate::cli::start::openmp_environment;
use crate::cli::train::TrainArgs;

/// The engine's file name, beside the front's.
pub const ENGINE: &str = "cpa-stream-engine";

pub fn info(_: InfoArgs) -> anyhow::Result<ExitCode> {
    hand_over()
}

pub fn train(_: TrainArgs) -> anyhow::Result<ExitCode> {
    hand_over()
}

pub fn predict(_: PredictArgs) -> anyhow::Result<ExitCode> {
    hand_over()
}

pub fn evaluate(_: EvaluateArgs) -> anyhow::Result<ExitCode> {
    hand_over()
}

pub fn embeddings(_: EmbeddingsArgs) -> anyhow::Result<ExitCode> {
    hand_over()
}

pub fn dose_response(_: DoseResponseArgs) -> anyhow::Result<ExitCode> {
    hand_over()
}

pub fn bench_model(_: ModelArgs) -> anyhow::Result<ExitCode> {
    hand_over()
}

pub fn bench_train(_: BenchTrainArgs) -> anyhow::Result<ExitCode> {
    hand_over()
}

pub fn bench_predict(_: PredictBenchArgs) -> anyhow::Result<ExitCode> {
    hand_over()
}

/// Replaces this process with the engine, given this process's arguments (and its `argv[0]`,
/// so that messages name the command the user typed). Only returns with an error.
fn hand_over() -> anyhow::Result<ExitCode> {
    let engine = engine_path()?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| OsString::from("cpa-stream"));
    let rest: Vec<OsString> = args.collect();
    let mut command = std::process::Command::new(&engine);
    command.arg0(arg0).args(&rest);
    if let Some(openmp) = openmp_environment(&rest) {
        command.envs(openmp.vars());
    }
    let err = command.exec();
    anyhow::bail!("cannot start {}: {err} (it runs the model commands)", engine.display())
}

/// `cpa-stream-engine` in this executable's directory, where `cargo install` and the release
/// archives put it.
fn engine_path() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| anyhow::anyhow!("cannot find this program's path: {e}"))?;
    let engine = exe.with_file_name(ENGINE);
    if !engine.is_file() {
        let handed = cpa_stream_pipeline::commands::names(|k| k.in_engine);
        anyhow::bail!(
            "{} is missing: the model commands ({handed}; bench only its model, train and predict benchmarks) run \
             in it, installed beside {} (`cargo install --path .` installs both; see docs/install.md)",
            engine.display(),
            exe.display()
        );
    }
    Ok(engine)
}
