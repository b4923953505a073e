//! Full verification of a store: checksums and structure.

use std::collections::HashSet;
use std::io::{BufReader, Read as _, Seek as _, SeekFrom};

use cpa_stream_schemas::StoreFiles;
use serde::Serialize;

use super::Store;
use super::hashing::{hash_bytes, hash_reader};
use super::reader::is_matrix_file;
use crate::error::{Error, Result};

/// What [`Store::verify`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Files hashed (each range of a file an append grew counts once).
    pub files: u64,
    /// Bytes hashed.
    pub bytes: u64,
    /// obs rows decoded.
    pub rows: u64,
    /// Entries whose column index was checked.
    pub nnz: u64,
    /// Versions whose checksums were checked (1 for a store written whole).
    pub versions: u64,
    /// Bytes after the current version's in the matrix files: left by an append that was
    /// interrupted, read by nothing and removed by the next append.
    pub trailing_bytes: u64,
}

impl Store {
    /// Checks every file's checksum in every version of the store (each byte range an append
    /// added, once), every column index, and that `obs` decodes with valid categories. Stops at
    /// the first problem, which the error names.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mapped = self.raw_maps();
        let manifest = self.manifest();
        let versions = manifest.history.iter().map(|v| &v.files).chain(std::iter::once(&manifest.files));
        let mut checked: HashSet<(&str, u64, u64)> = HashSet::new();
        let current = manifest.version_number();
        for (k, files) in versions.enumerate() {
            for (name, entry) in files {
                if !checked.insert((name.as_str(), entry.from, entry.bytes)) {
                    continue;
                }
                let path = self.file_path(name);
                let actual = match mapped.iter().find(|(n, _)| n == name) {
                    Some((_, bytes)) => {
                        let range = entry.from as usize..entry.bytes as usize;
                        let part = bytes.get(range).ok_or_else(|| {
                            Error::corrupt(
                                &path,
                                format!("shorter than the {} bytes version {} holds", entry.bytes, k + 1),
                            )
                        })?;
                        hash_bytes(part)
                    }
                    None => {
                        let mut file = self.open_file(name)?;
                        file.seek(SeekFrom::Start(entry.from)).map_err(|e| Error::io(&path, e))?;
                        let (read, sum) = hash_reader(BufReader::new(file.take(entry.bytes - entry.from)))
                            .map_err(|e| Error::io(&path, e))?;
                        if read != entry.bytes - entry.from {
                            return Err(Error::corrupt(
                                &path,
                                format!("shorter than the {} bytes version {} holds", entry.bytes, k + 1),
                            ));
                        }
                        sum
                    }
                };
                if actual != entry.checksum {
                    if k + 1 == current && entry.from == 0 {
                        return Err(Error::ChecksumMismatch { path, expected: entry.checksum.clone(), actual });
                    }
                    return Err(Error::corrupt(
                        &path,
                        format!(
                            "bytes {}..{} (written by version {} of {current}) have checksum {actual}, the manifest \
                             records {} (file modified or corrupt)",
                            entry.from,
                            entry.bytes,
                            k + 1,
                            entry.checksum
                        ),
                    ));
                }
                report.files += 1;
                report.bytes += entry.bytes - entry.from;
            }
        }
        report.versions = current as u64;
        for (name, entry) in &manifest.files {
            if is_matrix_file(name) {
                let size = self.open_file(name)?.metadata().map_err(|e| Error::io(self.file_path(name), e))?.len();
                report.trailing_bytes += size.saturating_sub(entry.bytes);
            }
        }
        self.check_unlisted_files()?;
        self.check_indices()?;
        super::summarize_obs(self)?;
        for name in [StoreFiles::VAR, StoreFiles::TRUTH] {
            if name == StoreFiles::VAR || self.manifest().files.contains_key(name) {
                for batch in self.table(name)? {
                    batch?;
                }
            }
        }
        report.rows = self.n_obs();
        report.nnz = self.nnz();
        Ok(report)
    }

    /// Every file in the store's directories is one the manifest lists (or the manifest).
    pub(crate) fn check_unlisted_files(&self) -> Result<()> {
        let listed = &self.manifest().files;
        // The directory opened, listed through its handle; named as the user named it.
        let mut dirs = vec![(self.opened_directory(), String::new())];
        while let Some((dir, prefix)) = dirs.pop() {
            let shown = self.path().join(&prefix);
            for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&shown, e))? {
                let entry = entry.map_err(|e| Error::io(&shown, e))?;
                let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
                let kind = entry.file_type().map_err(|e| Error::io(shown.join(entry.file_name()), e))?;
                if kind.is_dir() && prefix.is_empty() && name == "X" {
                    dirs.push((entry.path(), "X/".to_owned()));
                } else if name != cpa_stream_schemas::MANIFEST_FILE && !listed.contains_key(&name) {
                    return Err(Error::corrupt(
                        self.path().join(&name),
                        "in the store but not listed in its manifest (a leftover of another write, or added by hand)",
                    ));
                }
            }
        }
        Ok(())
    }
}
