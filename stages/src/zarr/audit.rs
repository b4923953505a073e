//! What an untrusted zarr store may make a reader do, checked before anything is read.
//!
//! A zarr store is a directory of files, and the zarr library reads whatever its paths lead to:
//! a symbolic link inside the store would read a file the user never named (a secret as cell
//! ids), a FIFO or device would block the import for ever. [`check_store`] walks the whole
//! directory first, without following links, and refuses each of these with an error naming the
//! entry. With [`ExternalData::SameDirectory`] (a trusted collection, `import --allow-external`)
//! a link is followed when it leads to a regular file in the store's own parent directory.
//!
//! A zarr array may also declare far more elements than it stores (missing chunks read as the
//! fill value), so that an index of a billion cells costs a few bytes: the index of `obs` and
//! `var` (unique names, which no compressor stores in less than a byte per [`MAX_IDS_PER_BYTE`]
//! of them) must hold at least that many bytes per id, which bounds the cells an import reads by
//! the size of its input.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::h5ad::ExternalData;

/// Entries of a store visited at most (files and directories; a million-cell AnnData written with
/// small chunks holds tens of thousands).
const MAX_ENTRIES: usize = 10_000_000;
/// Ids (of `obs` or `var`) an index may declare per byte it stores.
pub(super) const MAX_IDS_PER_BYTE: u64 = 4096;

/// What the walk found: the bytes stored under each directory of the store (its files and its
/// subdirectories' files), by path relative to the store (`obs/_index`).
#[derive(Debug, Default)]
pub(super) struct Walked {
    stored: HashMap<String, u64>,
    /// Files under each directory that are not zarr metadata: an array's chunks (or shards).
    chunk_files: HashMap<String, u64>,
}

impl Walked {
    /// Bytes stored under `dir` (a node's directory, relative to the store).
    pub(super) fn stored_under(&self, dir: &str) -> u64 {
        self.stored.get(dir).copied().unwrap_or(0)
    }

    /// Files under `dir` (an array's directory) that are not zarr metadata: its stored chunks.
    pub(super) fn chunk_files_under(&self, dir: &str) -> u64 {
        self.chunk_files.get(dir.trim_matches('/')).copied().unwrap_or(0)
    }
}

/// The names of zarr's metadata files (formats 2 and 3), which are no chunks.
const METADATA_FILES: [&str; 5] = [".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json"];

/// Walks the store at `root` and refuses what would make reading it read elsewhere or block.
pub(super) fn check_store(root: &Path, policy: ExternalData) -> Result<Walked> {
    let parent = root.canonicalize().map_err(|e| Error::io(root, e))?.parent().map(Path::to_owned);
    let mut walked = Walked::default();
    let mut stack: Vec<(PathBuf, Vec<String>)> = vec![(root.to_owned(), Vec::new())];
    let mut entries = 0usize;
    while let Some((dir, rel)) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(Error::Unsupported {
                    path: root.to_owned(),
                    reason: format!("more than {MAX_ENTRIES} files and directories; not read"),
                });
            }
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
            let kind = meta.file_type();
            let name = entry.file_name().to_string_lossy().into_owned();
            let bytes = if kind.is_dir() {
                let mut sub = rel.clone();
                sub.push(name);
                stack.push((path, sub));
                continue;
            } else if kind.is_file() {
                meta.len()
            } else if kind.is_symlink() {
                followed_link(root, &path, parent.as_deref(), policy)?
            } else {
                return Err(refused(
                    root,
                    &path,
                    "a FIFO, socket or device, which reading would block on or read from",
                ));
            };
            // Every directory above the file counts its bytes (and it, if it is no metadata).
            let chunk = !METADATA_FILES.contains(&name.as_str());
            for depth in 0..=rel.len() {
                let dir = rel[..depth].join("/");
                if chunk {
                    *walked.chunk_files.entry(dir.clone()).or_default() += 1;
                }
                *walked.stored.entry(dir).or_default() += bytes;
            }
        }
    }
    Ok(walked)
}

fn refused(root: &Path, path: &Path, what: &str) -> Error {
    let inside = path.strip_prefix(root).unwrap_or(path);
    Error::Unsupported { path: root.to_owned(), reason: format!("{}: {what}; the store is not read", inside.display()) }
}

/// The size of the regular file a link leads to, where the policy allows following it.
fn followed_link(root: &Path, path: &Path, parent: Option<&Path>, policy: ExternalData) -> Result<u64> {
    let target = fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
    if policy == ExternalData::Refuse {
        return Err(refused(
            root,
            path,
            &format!(
                "a symbolic link (to {target}), which would read a file outside the store; a trusted collection may \
                 follow links into the store's own directory (--allow-external)"
            ),
        ));
    }
    let resolved = path.canonicalize().map_err(|e| Error::io(path, e))?;
    let meta = fs::metadata(&resolved).map_err(|e| Error::io(&resolved, e))?;
    let inside = parent.is_some_and(|p| resolved.starts_with(p));
    if !inside || !meta.is_file() {
        return Err(refused(
            root,
            path,
            &format!(
                "a symbolic link to {}, which is not a regular file in the store's directory (the only links \
                 --allow-external follows)",
                resolved.display()
            ),
        ));
    }
    Ok(meta.len())
}
