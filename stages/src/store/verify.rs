//! Full verification of a store: checksums and structure.

use std::io::BufReader;

use cpa_stream_schemas::StoreFiles;
use serde::Serialize;

use super::Store;
use super::hashing::{hash_bytes, hash_reader};
use crate::error::{Error, Result};

/// What [`Store::verify`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Files hashed.
    pub files: u64,
    /// Bytes hashed.
    pub bytes: u64,
    /// obs rows decoded.
    pub rows: u64,
    /// Entries whose column index was checked.
    pub nnz: u64,
}

impl Store {
    /// Checks every file's checksum, every column index, and that `obs` decodes with valid
    /// categories. Stops at the first problem, which the error names.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mapped = self.raw_maps();
        for (name, entry) in &self.manifest().files {
            let path = self.file_path(name);
            let actual = match mapped.iter().find(|(n, _)| n == name) {
                Some((_, bytes)) => hash_bytes(bytes),
                None => {
                    let file = self.open_file(name)?;
                    hash_reader(BufReader::new(file)).map_err(|e| Error::io(&path, e))?.1
                }
            };
            if actual != entry.checksum {
                return Err(Error::ChecksumMismatch { path, expected: entry.checksum.clone(), actual });
            }
            report.files += 1;
            report.bytes += entry.bytes;
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
    fn check_unlisted_files(&self) -> Result<()> {
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
