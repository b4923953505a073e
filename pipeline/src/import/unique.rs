//! Cell ids that two files share, found in memory bounded by a budget whatever the number of
//! cells: each cell's id hash, file and row go to bucket files by hash; a bucket at a time is
//! sorted and equal hashes from different files are looked up in their files to tell a shared
//! id from a hash collision.

use std::fs::{self, File};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;

use arrow_array::RecordBatch;

use crate::error::{Error, Result};

/// Bytes of one record: id hash, file, row.
const RECORD_BYTES: usize = 8 + 4 + 8;
/// Bytes of one bucket (held once, sorted).
const BUCKET_BYTES: u64 = 64 << 20;
/// Shared ids looked up and shown.
const SHOWN: usize = 3;

/// Records the ids of the cells imported, then names the ids two files share.
pub struct SharedIds {
    dir: PathBuf,
    buckets: Vec<BufWriter<File>>,
}

/// A cell id in two files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    /// Cell ids hashed alike in two files (a few of them may be collisions, not shared ids).
    pub candidates: u64,
    /// Ids looked up and found in two files.
    pub examples: Vec<SharedId>,
}

/// A cell id found in two files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedId {
    /// The id.
    pub id: String,
    /// Where it is: (file, row), twice.
    pub at: [(usize, u64); 2],
}

impl SharedIds {
    /// Bucket files in `dir` for `n_cells` cells.
    pub fn new(dir: &Path, n_cells: u64) -> Result<SharedIds> {
        fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let n = (n_cells * RECORD_BYTES as u64).div_ceil(BUCKET_BYTES).clamp(1, 1024) as usize;
        let buckets = (0..n)
            .map(|b| {
                let path = dir.join(format!("ids-{b:04}"));
                File::create(&path).map(|f| BufWriter::with_capacity(64 << 10, f)).map_err(Error::io(&path))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SharedIds { dir: dir.to_owned(), buckets })
    }

    fn hash(id: &str) -> u64 {
        BuildHasherDefault::<DefaultHasher>::default().hash_one(id)
    }

    /// Records the ids (first column) of `obs`, rows `first..` of file `file`.
    pub fn add(&mut self, file: usize, first: u64, obs: &RecordBatch) -> Result<()> {
        let ids = obs.column(0).as_string::<i32>();
        let n = self.buckets.len() as u64;
        for (r, id) in ids.iter().enumerate() {
            let hash = Self::hash(id.unwrap_or_default());
            let mut record = [0u8; RECORD_BYTES];
            record[..8].copy_from_slice(&hash.to_le_bytes());
            record[8..12].copy_from_slice(&(file as u32).to_le_bytes());
            record[12..].copy_from_slice(&(first + r as u64).to_le_bytes());
            let b = (hash % n) as usize;
            self.buckets[b].write_all(&record).map_err(Error::io(self.dir.join(format!("ids-{b:04}"))))?;
        }
        Ok(())
    }

    /// The ids that two files share, `None` if none; `id_at(file, row)` reads an id back.
    pub fn finish(mut self, mut id_at: impl FnMut(usize, u64) -> Result<String>) -> Result<Option<Shared>> {
        let dir = self.dir.clone();
        let buckets = std::mem::take(&mut self.buckets);
        let result = (|| {
            let mut shared = Shared { candidates: 0, examples: Vec::new() };
            for (b, writer) in buckets.into_iter().enumerate() {
                let path = dir.join(format!("ids-{b:04}"));
                drop(writer.into_inner().map_err(|e| Error::io(&path)(e.into_error()))?);
                let mut bytes = Vec::new();
                BufReader::new(File::open(&path).map_err(Error::io(&path))?)
                    .read_to_end(&mut bytes)
                    .map_err(Error::io(&path))?;
                let _ = fs::remove_file(&path);
                let mut records: Vec<(u64, u32, u64)> = bytes
                    .chunks_exact(RECORD_BYTES)
                    .map(|r| {
                        let word = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or_default());
                        (word(&r[..8]), u32::from_le_bytes(r[8..12].try_into().unwrap_or_default()), word(&r[12..]))
                    })
                    .collect();
                drop(bytes);
                records.sort_unstable();
                for run in records.chunk_by(|a, b| a.0 == b.0) {
                    // Ids repeated within one file are the file's own affair, as anndata has it.
                    if run.iter().all(|r| r.1 == run[0].1) {
                        continue;
                    }
                    shared.candidates += 1;
                    if shared.examples.len() < SHOWN {
                        let a = run[0];
                        let Some(b) = run.iter().find(|r| r.1 != a.1) else { continue };
                        let (id_a, id_b) = (id_at(a.1 as usize, a.2)?, id_at(b.1 as usize, b.2)?);
                        if id_a == id_b {
                            shared.examples.push(SharedId { id: id_a, at: [(a.1 as usize, a.2), (b.1 as usize, b.2)] });
                        }
                    }
                }
            }
            Ok(if shared.examples.is_empty() { None } else { Some(shared) })
        })();
        let _ = fs::remove_dir_all(&dir);
        result
    }
}

impl Drop for SharedIds {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
