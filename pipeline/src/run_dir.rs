//! The layout of a training run directory, shared by the commands that write and read it:
//!
//! ```text
//! RUN/
//!   checkpoint/       every epoch, for --resume (model.json, weights, optimizer, trainer.json)
//!   best/             the weights with the best validation score
//!   model/            the final model: the best weights, or the last ones without validation
//!   metrics.parquet   one row per epoch (schema: cpa_stream_schemas::tables::training_metrics_schema)
//!   config.toml       the configuration the run trained with
//!   history.svg/.png  losses, validation and learning rate per epoch
//! ```

use std::path::{Path, PathBuf};

use cpa_stream_stages::model::files::MODEL_FILE;

use crate::error::{Error, Result};

/// The checkpoint written after every epoch (and on Ctrl-C).
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// The weights with the best validation score so far.
pub const BEST_DIR: &str = "best";
/// The final model of a finished run.
pub const MODEL_DIR: &str = "model";
/// One row of training metrics per epoch.
pub const METRICS_FILE: &str = "metrics.parquet";
/// The configuration the run trained with.
pub const CONFIG_FILE: &str = "config.toml";

/// The model directory of `path`: `path` itself when it holds `model.json`, else `path/model`.
pub fn model_dir(path: &Path) -> Result<PathBuf> {
    if path.join(MODEL_FILE).is_file() {
        return Ok(path.to_owned());
    }
    let inner = path.join(MODEL_DIR);
    if inner.join(MODEL_FILE).is_file() {
        return Ok(inner);
    }
    Err(Error::InvalidInput(format!(
        "{}: neither a model directory (model.json) nor a training run with a finished model/",
        path.display()
    )))
}

/// What a command reads of the model given as `path` (a run or a model directory): its model
/// directory, for [`check_not_an_input`](cpa_stream_stages::output::check_not_an_input): an
/// output beside the model in its run (predictions in the run's folder) replaces no input, one
/// inside `model/` or over the run does.
pub fn model_input(path: &Path) -> PathBuf {
    model_dir(path).unwrap_or_else(|_| path.to_owned())
}

/// Copies the files of directory `from` into directory `to` (a model directory: flat); the
/// stages' error type, as [`publish_dir`](cpa_stream_stages::model::files::publish_dir) asks.
pub fn copy_files(from: &Path, to: &Path) -> cpa_stream_stages::Result<()> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| cpa_stream_stages::Error::Io { path, source }
    };
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        std::fs::copy(entry.path(), to.join(entry.file_name())).map_err(io(&entry.path()))?;
    }
    Ok(())
}

/// Every entry a training run directory may hold (with temporaries of them, `.NAME.tmp-*`).
pub const RUN_ENTRIES: [&str; 8] =
    [CHECKPOINT_DIR, BEST_DIR, MODEL_DIR, METRICS_FILE, CONFIG_FILE, SETTINGS_FILE, "history.svg", "history.png"];

/// The picture of a run's history (`.svg` and `.png`, [`crate::train::history::plot_history`]).
pub const HISTORY_STEM: &str = "history";

/// The settings a run was trained with (obs keys, control, covariates, split, configuration),
/// read back by `--resume`, `predict` and `evaluate`.
pub const SETTINGS_FILE: &str = "settings.json";

/// Whether `dir` exists and holds anything.
pub fn is_nonempty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// An existing output directory may be replaced only when it holds nothing but what the
/// command itself writes (`known`, and temporaries and lock files of them, which a killed run
/// leaves): `--overwrite` never deletes a user's other files (say, `--out .`). See
/// [`cpa_stream_stages::output::check_replaceable`].
pub fn check_replaceable(dir: &Path, known: &[&str], what: &str) -> Result<()> {
    cpa_stream_stages::output::check_replaceable(dir, what, |name, _| known.contains(&name)).map_err(|e| match e {
        cpa_stream_stages::Error::InvalidInput(message) => Error::InvalidInput(message),
        other => Error::stage(crate::Stage::Write)(other),
    })
}

/// Removes what a previous output of the same command left in `dir` (after
/// [`check_replaceable`]; under the lock of `dir`, so the lock files of its entries that a
/// killed run left are nobody's).
pub fn remove_entries(dir: &Path, known: &[&str]) -> Result<()> {
    for name in known {
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path).map_err(Error::io(&path))?,
            Ok(_) => std::fs::remove_file(&path).map_err(Error::io(&path))?,
            Err(_) => {}
        }
        let _ = std::fs::remove_file(dir.join(format!(".{name}.lock")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_runs_lock_files_are_its_own_and_go_with_it() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("tempdir"))?;
        for name in [METRICS_FILE, ".metrics.parquet.lock", ".config.toml.tmp-1-2"] {
            std::fs::write(dir.path().join(name), b"x").map_err(Error::io(dir.path()))?;
        }
        check_replaceable(dir.path(), &RUN_ENTRIES, "a training run")?;
        remove_entries(dir.path(), &RUN_ENTRIES)?;
        assert!(!dir.path().join(".metrics.parquet.lock").exists() && !dir.path().join(METRICS_FILE).exists());
        std::fs::write(dir.path().join(".notes.lock"), b"x").map_err(Error::io(dir.path()))?;
        let err = check_replaceable(dir.path(), &RUN_ENTRIES, "a training run").unwrap_err().to_string();
        assert!(err.contains(".notes.lock"), "{err}");
        Ok(())
    }
}
