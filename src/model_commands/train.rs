//! `cpa-stream train`: the request its flags make, the run and its report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use cpa_stream_engine::train::request::{ConfigSource, TrainRequest};
use cpa_stream_engine::train::{self, TrainOptions};
use cpa_stream_pipeline::RunContext;
use cpa_stream_pipeline::request::Naming;

use crate::cli;
use crate::cli::train::TrainArgs;

impl TrainArgs {
    /// The request these flags make.
    fn request(&self) -> TrainRequest {
        TrainRequest {
            store: self.store.clone(),
            out: self.out.clone(),
            perturbation_key: self.labels.perturbation_key.clone(),
            dose_key: self.labels.dose_key.clone(),
            control: self.labels.control.clone(),
            covariates: self.labels.covariates.clone(),
            batch_key: self.batch_key.clone(),
            split_key: self.split_key.clone(),
            holdout: self.holdout.clone(),
            validation_fraction: self.validation_fraction,
            test_fraction: self.test_fraction,
            split_seed: self.split_seed,
            preset: self.preset.clone(),
            config: self.config.clone().map_or(ConfigSource::Default, ConfigSource::File),
            epochs: self.epochs,
            batch_size: self.batch_size.clone(),
            shuffle_run_cells: self.shuffle_run_cells,
            seed: self.seed,
            resume: self.resume,
            overwrite: self.overwrite,
            allow_non_counts: self.allow_non_counts,
            checkpoint_every: self.checkpoint_every,
            prefetch: self.prefetch,
            shuffle_blocks: self.shuffle_blocks,
            shuffle_buffer_bytes: self.shuffle_buffer_mb.map(|mb| mb << 20),
            perturbation_features: self.perturbation_features.clone(),
            compute: self.compute.compute(),
            process_group: None,
            naming: Naming::Flags,
        }
    }
}

/// The features of `--perturbation-smiles`, computed into a file next to the run (removed when
/// dropped: the run keeps its own copy of the features).
struct SmilesFeatures(PathBuf);

impl Drop for SmilesFeatures {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Computes the molecule features of a SMILES table with the Python package (`python -m
/// cpa_stream.chem`), into a temporary Parquet file beside `out`.
fn smiles_features(table: &std::path::Path, kind: &str, out: &std::path::Path) -> anyhow::Result<SmilesFeatures> {
    let python = std::env::var_os("CPA_STREAM_PYTHON").unwrap_or_else(|| "python3".into());
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent)?;
    let path = parent.join(format!(".{name}.smiles-{}.parquet", std::process::id()));
    let features = SmilesFeatures(path);
    let done = std::process::Command::new(&python)
        .args(["-m", "cpa_stream.chem"])
        .arg(table)
        .arg("-o")
        .arg(&features.0)
        .args(["--kind", kind, "--overwrite"])
        .stdout(std::process::Stdio::null())
        .output();
    let shown = std::path::Path::new(&python).display().to_string();
    let advice = "the molecule features of --perturbation-smiles come from the Python package with RDKit \
                  (pip install 'cpa-stream[chem]'; CPA_STREAM_PYTHON names its interpreter), or compute them \
                  with `python -m cpa_stream.chem TABLE -o features.parquet` and pass --perturbation-features";
    match done {
        Ok(done) if done.status.success() => Ok(features),
        Ok(done) => {
            let said = String::from_utf8_lossy(&done.stderr);
            let said = said.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            anyhow::bail!(
                "--perturbation-smiles {}: {shown} -m cpa_stream.chem failed: {said}; {advice}",
                table.display()
            )
        }
        Err(e) => anyhow::bail!("--perturbation-smiles {}: cannot run {shown}: {e}; {advice}", table.display()),
    }
}

/// The processes a launcher started for data-parallel training (`WORLD_SIZE` of torchrun and
/// others, `SLURM_STEP_NUM_TASKS` of an `srun` step); 1 without one.
fn launched_world() -> anyhow::Result<usize> {
    for name in ["WORLD_SIZE", "SLURM_STEP_NUM_TASKS"] {
        if let Ok(value) = std::env::var(name)
            && !value.trim().is_empty()
        {
            return value.trim().parse().map_err(|_| anyhow::anyhow!("{name}={value:?}: expected a whole number"));
        }
    }
    Ok(1)
}

/// One rank of data-parallel training: the process group is torch.distributed's, made in Python,
/// so this process becomes `python -m cpa_stream._rank` with the request (the interpreter
/// of `CPA_STREAM_PYTHON`, else `python3`, with the cpa_stream package and PyTorch).
#[cfg(unix)]
fn become_rank(request: &TrainRequest, json: bool) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let python = std::env::var_os("CPA_STREAM_PYTHON").unwrap_or_else(|| "python3".into());
    let mut command = std::process::Command::new(&python);
    command.args(["-m", "cpa_stream._rank"]).arg(serde_json::to_string(request)?);
    if json {
        command.arg("--json");
    }
    let e = command.exec();
    anyhow::bail!(
        "{} processes launched: data-parallel training runs through the Python package (torch.distributed makes the \
         process group), but {} cannot be run: {e} (CPA_STREAM_PYTHON names an interpreter with cpa_stream and PyTorch)",
        launched_world().unwrap_or(0),
        std::path::Path::new(&python).display()
    )
}

#[cfg(not(unix))]
fn become_rank(_request: &TrainRequest, _json: bool) -> anyhow::Result<ExitCode> {
    anyhow::bail!("data-parallel training from the command line needs a Unix system; use cpa_stream.train")
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    let what = || format!("training on {}", args.store.display());
    let mut request = args.request();
    if launched_world()? > 1 && !cli::printing_request() {
        if args.perturbation_smiles.is_some() {
            anyhow::bail!(
                "--perturbation-smiles in data-parallel training: compute the features once (`python -m \
                 cpa_stream.chem TABLE -o features.parquet`) and pass --perturbation-features"
            );
        }
        return become_rank(&request, args.json);
    }
    let _features = match &args.perturbation_smiles {
        Some(table) if !cli::printing_request() => {
            let features = smiles_features(table, &args.smiles_features, &args.out)?;
            request.perturbation_features = Some(features.0.clone());
            Some(features)
        }
        _ => None,
    };
    let run = |options: &TrainOptions, ctx: &RunContext| {
        // Signals stop the run from the start of the training, not while the request is read.
        if let Err(e) = super::signals::stop_on_signals(Arc::clone(&stop)) {
            return Err(cpa_stream_pipeline::Error::InvalidInput(e.to_string()));
        }
        train::run(options, &ctx.with_stop(&stop))
    };
    // `--json` is printed below: the exit code depends on the report either way.
    let Some(report) = cli::run_request(&request, TrainRequest::options, run, false, what)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let code = match report.interrupted {
        true => ExitCode::from(super::signals::interrupted_exit_code()),
        false => ExitCode::SUCCESS,
    };
    if args.json {
        jsonln!(&report);
        return Ok(code);
    }
    outln!(
        "{}: {} training cells, {} validation cells, {} epochs recorded{}{}",
        args.out.display(),
        report.train_cells,
        report.valid_cells,
        report.epochs.len(),
        if report.stopped_early { ", stopped early" } else { "" },
        if report.interrupted {
            format!(", stopped by {} (resume with --resume)", super::signals::received_name())
        } else {
            String::new()
        }
    );
    if let Some(last) = report.epochs.last() {
        outln!(
            "last epoch {}: recon {:.3}, adversary {:.3}, acc_perts {:.3}",
            last.train.epoch,
            last.train.recon_loss,
            last.train.adv_loss,
            last.train.acc_perts
        );
    }
    if let Some(best) = report.best_epoch {
        let scored = report.epochs.iter().find(|e| e.train.epoch == best).and_then(|e| e.validation);
        match scored {
            Some(v) => outln!(
                "best epoch {best}: validation r2_mean {:.3}, r2_var {:.3} (score r2_mean + 0.5 r2_var = {:.3}); \
                 model/ holds its weights",
                v.r2_mean,
                v.r2_var,
                v.score
            ),
            None => outln!("best validation epoch: {best} (model/ holds its weights)"),
        }
    }
    outln!("training {:.0} cells/s", report.cells_per_s);
    cli::print_report(&report.report)?;
    if let Some(memory) = report.device_memory {
        outln!("{memory}");
    }
    Ok(code)
}
