//! A saved model's description, `model.json` (format, configuration, vocabularies, gene names),
//! beside its `weights.safetensors`, in a directory that appears complete or not at all
//! ([`publish_dir`]). Reading and writing the weights needs libtorch: `cpa_stream_engine::model`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::CpaConfig;
use super::vocab::Vocabulary;
use crate::error::{Error, Result};

/// `format` field of `model.json`.
pub const MODEL_FORMAT: &str = "cpa-stream-model";
/// Version of the model directory layout this build reads and writes.
pub const MODEL_VERSION: u32 = 1;
/// The model description in a model directory.
pub const MODEL_FILE: &str = "model.json";
/// The weights in a model directory.
pub const WEIGHTS_FILE: &str = "weights.safetensors";

/// The contents of `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// Always [`MODEL_FORMAT`].
    pub format: String,
    /// The format version.
    pub version: u32,
    /// The program that wrote it (`cpa-stream 0.1.0`).
    pub written_by: String,
    /// The configuration the model was built with.
    pub config: CpaConfig,
    /// What its inputs and outputs are indexed by.
    pub vocabulary: Vocabulary,
    /// Width of the fixed perturbation features, when the model uses them.
    pub perturbation_features: Option<i64>,
    /// Trainable parameters.
    pub n_parameters: i64,
    /// `xxh3-64:HEX` of `weights.safetensors`, checked when the model is loaded (absent in
    /// models written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_checksum: Option<String>,
    /// `xxh3-64:HEX` of this description itself, every other field (configuration,
    /// vocabularies, the weights' checksum) as [`ModelFile::description_checksum`] computes it:
    /// checked at every read, so that a label edited in a copy (two perturbations' names swapped)
    /// is refused instead of predicting under the wrong name. Absent in models written before it
    /// was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description_checksum: Option<String>,
}

/// Largest `model.json` read, in bytes (a model of 100,000 genes and perturbations has one of a
/// few MB).
pub const MAX_MODEL_FILE_BYTES: u64 = 256 << 20;

/// Largest safetensors header read (the format's own bound).
pub const MAX_SAFETENSORS_HEADER_BYTES: u64 = 100 << 20;

impl ModelFile {
    /// `xxh3-64:HEX` of the description without its own checksum: its compact JSON, fields in
    /// the struct's order (every map in it is ordered), so the same description always gives
    /// the same text.
    pub fn compute_description_checksum(&self) -> Result<String> {
        let bare = ModelFile { description_checksum: None, ..self.clone() };
        let text = serde_json::to_vec(&bare).map_err(|e| Error::InvalidInput(format!("model description: {e}")))?;
        Ok(format!("xxh3-64:{:016x}", xxhash_rust::xxh3::xxh3_64(&text)))
    }

    /// The description with its checksum recorded.
    pub fn sealed(mut self) -> Result<ModelFile> {
        self.description_checksum = Some(self.compute_description_checksum()?);
        Ok(self)
    }
}

/// Reads `DIR/model.json`, checking the format and version before anything else.
pub fn read_model_file(dir: &Path) -> Result<ModelFile> {
    let path = dir.join(MODEL_FILE);
    let text = crate::regular::read_text(&path, "a model description (model.json)", MAX_MODEL_FILE_BYTES)?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::corrupt(&path, format!("not JSON: {e}")))?;
    let format = value.get("format").and_then(|f| f.as_str());
    if format != Some(MODEL_FORMAT) {
        return Err(Error::corrupt(
            &path,
            format!("format is {format:?}, expected {MODEL_FORMAT:?} (not a cpa-stream model)"),
        ));
    }
    let version = value.get("version").and_then(|v| v.as_u64());
    if version != Some(u64::from(MODEL_VERSION)) {
        return Err(Error::Unsupported {
            path,
            reason: format!("model format version {version:?}; this build reads version {MODEL_VERSION}"),
        });
    }
    let file: ModelFile = serde_json::from_value(value).map_err(|e| Error::corrupt(&path, e.to_string()))?;
    if let Some(recorded) = &file.description_checksum {
        let actual = file.compute_description_checksum()?;
        if &actual != recorded {
            return Err(Error::ChecksumMismatch {
                path,
                expected: recorded.clone(),
                actual: format!(
                    "{actual} (the description was edited after the model was written: its configuration, \
                     vocabularies or weights' checksum no longer match what was trained)"
                ),
            });
        }
    }
    file.config.validate().map_err(|e| Error::corrupt(&path, format!("config: {e}")))?;
    file.vocabulary.validate().map_err(|e| Error::corrupt(&path, e.to_string()))?;
    Ok(file)
}

/// `xxh3-64:HEX` of a weights file (a regular file).
pub fn weights_checksum(path: &Path) -> Result<String> {
    let file = crate::regular::open_regular(path, "the model's weights (safetensors)")?;
    let (_, hex) = crate::store::hash_reader(std::io::BufReader::new(file)).map_err(|e| Error::io(path, e))?;
    Ok(format!("xxh3-64:{hex}"))
}

/// Checks, before the weights file `path` is read, that it is a regular file whose safetensors
/// header describes at most the bytes a model of `model_bytes` bytes of tensors could need (and
/// a little more, so that an extra tensor is named by the load rather than refused here), and
/// that the file holds exactly what its header describes: a huge or padded file is refused
/// without being read.
pub fn check_weights_file(path: &Path, model_bytes: u64) -> Result<()> {
    use std::io::Read;
    let mut file = crate::regular::open_regular(path, "the model's weights (safetensors)")?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|_| Error::corrupt(path, format!("{len} bytes: not a safetensors file")))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_SAFETENSORS_HEADER_BYTES || 8 + header_len > len {
        return Err(Error::corrupt(
            path,
            format!("a safetensors header of {header_len} bytes in a file of {len}: not a safetensors file"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| Error::corrupt(path, format!("the safetensors header is not a JSON object: {e}")))?;
    let mut data_bytes = 0u64;
    for (name, entry) in header.iter().filter(|(name, _)| *name != "__metadata__") {
        let end = entry
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| o.get(1))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| Error::corrupt(path, format!("tensor {name}: no data_offsets in the header")))?;
        data_bytes = data_bytes.max(end);
    }
    if 8 + header_len + data_bytes != len {
        return Err(Error::corrupt(
            path,
            format!(
                "{len} bytes, and its header describes {} (8 + a header of {header_len} + {data_bytes} of tensors): \
                 truncated or padded",
                8 + header_len + data_bytes
            ),
        ));
    }
    let allowance = model_bytes.saturating_add(16 << 20);
    if data_bytes > allowance {
        return Err(Error::InvalidInput(format!(
            "{}: {data_bytes} bytes of tensors, and the model of model.json needs at most {model_bytes}: not this model's \
             weights",
            path.display()
        )));
    }
    Ok(())
}

/// Runs `write` on a fresh temporary sibling of `dir`, then puts it in place of `dir` with one
/// atomic exchange of the two names (`renameat2(RENAME_EXCHANGE)`), so that `dir` exists, whole,
/// at every instant: a kill at any moment leaves the old or the new directory at `dir`, and at
/// most a sibling that the next call removes. If `write` fails, nothing changes at `dir`.
/// Call it while holding the lock of `dir` or of the output it is in (a run's, see
/// [`crate::output::claim_output`]): siblings of other processes are then known dead.
pub fn publish_dir(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    recover_dir(dir)?;
    let tmp = sibling(dir, "tmp")?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Ok(dir_file) = std::fs::File::open(&tmp) {
        let _ = dir_file.sync_all();
    }
    if !dir.exists() {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    } else if exchange(&tmp, dir)? {
        // `tmp` now holds the old directory.
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    } else {
        // No RENAME_EXCHANGE on this file system: two renames, the old kept as `.NAME.old-PID`
        // until the new one is in place (recovered by `recover_dir` if killed between them).
        let old = sibling(dir, "old")?;
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        if let Err(e) = std::fs::rename(&tmp, dir) {
            let _ = std::fs::rename(&old, dir);
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::io(dir, e));
        }
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    crate::output::sync_parent(dir);
    Ok(())
}

/// `.NAME.TAG-PID`, this process's sibling of `dir`.
fn sibling(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name =
        dir.file_name().ok_or_else(|| Error::InvalidInput(format!("{}: not a directory name", dir.display())))?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.{tag}-{}", name.to_string_lossy(), std::process::id())))
}

/// Swaps the names `a` and `b` atomically; false where the file system cannot.
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    match crate::output::renameat2(a, b, libc::RENAME_EXCHANGE)? {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) => Ok(false),
        Err(e) => Err(Error::io(b, e)),
    }
}

/// Where a published directory can be read without changing anything: `dir` itself, or, when a
/// writer was killed between the two renames of a file system without exchange (or is between
/// them now), the old version it set aside (`.NAME.old-PID`). `None` when there is neither.
pub fn readable_dir(dir: &Path) -> Option<PathBuf> {
    if dir.is_dir() {
        return Some(dir.to_owned());
    }
    let (name, parent) = (dir.file_name()?, dir.parent()?);
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let prefix = format!(".{}.old-", name.to_string_lossy());
    std::fs::read_dir(parent)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .find(|p| p.is_dir())
}

/// Puts back a directory that a run killed between the two renames of an older version (or of
/// a file system without exchange) left as `.NAME.old-PID` with nothing at `dir`, and removes
/// the `.NAME.tmp-PID` / `.NAME.old-PID` siblings of other processes (called under the lock of
/// `dir`'s output, which every writer holds: theirs are dead).
pub fn recover_dir(dir: &Path) -> Result<()> {
    let (Some(name), Some(parent)) = (dir.file_name(), dir.parent()) else { return Ok(()) };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let name = name.to_string_lossy();
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(()) };
    let mut olds = Vec::new();
    let mut stale = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        for tag in ["old", "tmp"] {
            let Some(pid) = file_name.strip_prefix(&format!(".{name}.{tag}-")) else { continue };
            let Ok(pid) = pid.split('-').next().unwrap_or("").parse::<u32>() else { continue };
            // Called under the output's lock (see `publish_dir`): another writer's are dead,
            // whatever their process id says here (it may be another node's).
            if pid != std::process::id() {
                if tag == "old" {
                    olds.push(entry.path());
                } else {
                    stale.push(entry.path());
                }
            }
        }
    }
    if !dir.exists()
        && let Some(old) = olds.pop()
    {
        std::fs::rename(&old, dir).map_err(|e| Error::io(dir, e))?;
    }
    for path in olds.into_iter().chain(stale) {
        let _ = std::fs::remove_dir_all(&path);
    }
    Ok(())
}
