//! The layout of a training run directory, shared by the commands that write and read it:
//!
//! ```text
//! RUN/
//!   checkpoint/       every epoch, for --resume (model.json, weights, optimizer, trainer.json)
//!   best/             the weights with the best validation score
//!   model/            the final model: the best weights, or the last ones without validation
//!   metrics.parquet   one row per epoch (schema: cpa_stream_schemas::tables::training_metrics_schema)
//!   config.toml       the configuration the run trained with
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

/// Copies the files of directory `from` into directory `to` (a model directory: flat); the
/// stages' error type, as [`publish_dir`](cpa_stream_stages::model::files::publish_dir) asks.
pub(crate) fn copy_files(from: &Path, to: &Path) -> cpa_stream_stages::Result<()> {
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
