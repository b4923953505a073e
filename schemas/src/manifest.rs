//! `manifest.json`: the description of a store directory.
//!
//! ```text
//! NAME.store/
//!   manifest.json      this file
//!   X/indptr           u64 LE, n_obs + 1 row offsets into indices/data (both codecs)
//!   X/indices          u32 LE column indices, sorted within a row      (codec "raw")
//!   X/data             f32 LE values                                   (codec "raw")
//!   X/blocks           zstd frames, one per block of rows              (codec "zstd")
//!   X/block_index      u64 LE, n_blocks + 1 byte offsets into X/blocks (codec "zstd")
//!   obs.parquet        one row per cell, matrix row order
//!   var.parquet        one row per gene, matrix column order
//!   truth.parquet      optional: ground truth of a synthetic atlas
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The format name every manifest carries in `format` (the store's magic).
pub const STORE_FORMAT: &str = "cpa-stream-store";
/// The manifest version of a store written whole (and the oldest this build reads).
pub const STORE_FORMAT_VERSION: u32 = 1;
/// The manifest version of a store that grew by appends ([`Manifest::history`],
/// [`FileEntry::from`], [`Manifest::block_runs`]); this build reads both.
pub const STORE_FORMAT_VERSION_APPENDED: u32 = 2;
/// File name of the manifest inside a store directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Default zstd level of the block codec. Level 1 rather than zstd's own default of 3: on the
/// byte planes of counts it writes smaller blocks (3-9 % on three data sets) that decode about
/// 10-15 % faster (docs/benchmarks.md).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Default rows per zstd block: small enough that a random row costs one small decompression,
/// large enough that the compressor sees repetition.
pub const DEFAULT_ZSTD_BLOCK_ROWS: u32 = 256;

/// Relative paths of the files of a store.
#[derive(Debug, Clone, Copy)]
pub struct StoreFiles;

impl StoreFiles {
    /// Row offsets, u64 LE, `n_obs + 1` of them (both codecs).
    pub const INDPTR: &'static str = "X/indptr";
    /// Column indices, u32 LE, strictly increasing within a row (raw codec).
    pub const INDICES: &'static str = "X/indices";
    /// Values, f32 LE (raw codec).
    pub const DATA: &'static str = "X/data";
    /// zstd frames, one per block of rows (zstd codec).
    pub const BLOCKS: &'static str = "X/blocks";
    /// Byte offsets of the blocks, u64 LE, `n_blocks + 1` of them (zstd codec).
    pub const BLOCK_INDEX: &'static str = "X/block_index";
    /// One row per cell, matrix row order.
    pub const OBS: &'static str = "obs.parquet";
    /// One row per gene, matrix column order.
    pub const VAR: &'static str = "var.parquet";
    /// Ground truth of a synthetic atlas (optional).
    pub const TRUTH: &'static str = "truth.parquet";
}

/// Largest `manifest.json` read, in bytes (a store of a few files has a manifest of about 1 KB).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// A file name a manifest may list: one the format defines, or a plain name in the store's top
/// directory (letters, digits, `.`, `_`, `-`, not starting with `.`). Nothing absolute, nothing
/// with `..`, nothing in another directory: a store never names a file outside itself.
pub fn check_file_name(name: &str) -> Result<(), ManifestError> {
    const DEFINED: [&str; 8] = [
        StoreFiles::INDPTR,
        StoreFiles::INDICES,
        StoreFiles::DATA,
        StoreFiles::BLOCKS,
        StoreFiles::BLOCK_INDEX,
        StoreFiles::OBS,
        StoreFiles::VAR,
        StoreFiles::TRUTH,
    ];
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if DEFINED.contains(&name) || plain {
        Ok(())
    } else {
        Err(ManifestError::Invalid(format!(
            "files lists {name:?}: a store's files are the format's ({}) or plain names in its directory",
            DEFINED.join(", ")
        )))
    }
}

/// Errors in a manifest's content (the file's own I/O errors belong to the reader).
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ManifestError {
    /// The file is not JSON.
    #[error("not valid JSON: {0}")]
    Json(String),
    /// Not a cpa-stream manifest.
    #[error("format is {found:?}, expected {STORE_FORMAT:?} (is this a cpa-stream store?)")]
    WrongFormat {
        /// The `format` field found.
        found: String,
    },
    /// A version this build does not read.
    #[error("format version {found} is not supported, this build reads version {STORE_FORMAT_VERSION}")]
    UnsupportedVersion {
        /// The `version` field found.
        found: u64,
    },
    /// A field is missing, unknown or inconsistent.
    #[error("invalid field: {0}")]
    Invalid(String),
}

/// Element types of the matrix files. Fixed in format version 1; recorded so that other tools can
/// map the files without reading this crate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixDtypes {
    /// Element type of `X/indptr`: `u64le`.
    pub indptr: String,
    /// Element type of `X/indices`: `u32le`.
    pub indices: String,
    /// Element type of `X/data`: `f32le`.
    pub data: String,
}

impl Default for MatrixDtypes {
    fn default() -> Self {
        MatrixDtypes { indptr: "u64le".to_owned(), indices: "u32le".to_owned(), data: "f32le".to_owned() }
    }
}

/// How `X/indices` and `X/data` are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase", deny_unknown_fields)]
pub enum Codec {
    /// Plain little-endian arrays, memory-mapped and read without copying.
    Raw,
    /// Blocks of `block_rows` rows, each one zstd frame holding the rows' delta-coded column
    /// indices and values, byte-shuffled. Memory-mapped; a block is decompressed on demand.
    Zstd {
        /// zstd compression level.
        level: i32,
        /// Rows per block.
        block_rows: u32,
        /// How a block's arrays are split into byte planes before compression. Manifests
        /// written before the field existed hold [`Planes::Wide`] blocks.
        #[serde(default)]
        planes: Planes,
        /// How a damaged block is caught. Manifests written before the field existed hold
        /// [`BlockChecksum::Content`] blocks.
        #[serde(default)]
        block_checksum: BlockChecksum,
    },
}

/// The checksum that makes a damaged zstd block an error when read instead of plausible values
/// (damaged literals can decode to valid-looking counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockChecksum {
    /// zstd's content checksum inside each frame: XXH64 of the decompressed bytes, 32 bits kept
    /// (the first layout; still read).
    #[default]
    #[serde(rename = "content")]
    Content,
    /// Each frame (written without zstd's content checksum) is followed by the XXH3-64 of its
    /// bytes, 8 bytes little-endian, checked before decompressing: 64 bits instead of 32, over the
    /// compressed bytes, about a quarter of the decompressed ones, so a block decodes about 15%
    /// faster.
    #[serde(rename = "xxh3-64")]
    Xxh3_64,
}

impl BlockChecksum {
    /// Bytes a block carries after its frame.
    pub fn trailer_bytes(self) -> usize {
        match self {
            BlockChecksum::Content => 0,
            BlockChecksum::Xxh3_64 => 8,
        }
    }
}

/// The byte planes of a zstd block's plain form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Planes {
    /// Both arrays as four planes of 32-bit words (the first layout; still read).
    #[default]
    Wide,
    /// A one-byte header, then each array as two planes of 16-bit words where the block's
    /// values allow (index deltas up to 65,535; whole-number values up to 65,535), otherwise
    /// four planes as in `Wide`. About 15% smaller and faster to decode on counts.
    Narrow,
}

impl Codec {
    /// The zstd codec with the default level and block size.
    pub fn zstd() -> Codec {
        Codec::zstd_with(DEFAULT_ZSTD_LEVEL, DEFAULT_ZSTD_BLOCK_ROWS)
    }

    /// The zstd codec as new stores are written: `level`, `block_rows`, narrow planes, an XXH3-64
    /// after each frame.
    pub fn zstd_with(level: i32, block_rows: u32) -> Codec {
        Codec::Zstd { level, block_rows, planes: Planes::Narrow, block_checksum: BlockChecksum::Xxh3_64 }
    }

    /// The codec's name in the manifest (`raw`, `zstd`).
    pub fn name(&self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd { .. } => "zstd",
        }
    }
}

/// Checksum used for every file of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumAlgorithm {
    /// XXH3, 64-bit, written as 16 lowercase hex digits.
    Xxh3_64,
}

/// Size and checksum of one file of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Size in bytes (of a matrix file, the bytes this version reads: an append interrupted by a
    /// kill may have left more after them, which no version reads).
    pub bytes: u64,
    /// XXH3-64 of bytes `from..bytes`, 16 lowercase hex digits.
    pub checksum: String,
    /// Where the checksummed bytes start: 0 for a file written whole; for a file an append grew,
    /// its size in the previous version (whose entry, in [`Manifest::history`], covers the bytes
    /// before).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub from: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl FileEntry {
    /// The entry of a file written whole.
    pub fn whole(bytes: u64, checksum: String) -> FileEntry {
        FileEntry { bytes, checksum, from: 0 }
    }
}

/// An earlier version of a store that grew by appends (`import --append`): what it held and its
/// files' entries, which still check the bytes they cover (files only grow).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Version {
    /// Cells of that version.
    pub n_obs: u64,
    /// Stored entries of that version.
    pub nnz: u64,
    /// Its files, as [`Manifest::files`].
    pub files: BTreeMap<String, FileEntry>,
    /// The program that wrote it.
    pub created_by: String,
    /// Where its data came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// The parsed `manifest.json` of a store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`STORE_FORMAT`].
    pub format: String,
    /// Always [`STORE_FORMAT_VERSION`] for stores this build reads.
    pub version: u32,
    /// Cells (matrix rows).
    pub n_obs: u64,
    /// Genes (matrix columns).
    pub n_vars: u64,
    /// Stored entries.
    pub nnz: u64,
    /// Element types of the matrix files.
    pub dtypes: MatrixDtypes,
    /// How the matrix is stored.
    pub codec: Codec,
    /// The checksum of every file.
    pub checksum: ChecksumAlgorithm,
    /// Every file of the store by relative path (`/`-separated), the manifest excepted.
    pub files: BTreeMap<String, FileEntry>,
    /// The program that wrote the store, e.g. `cpa-stream 0.1.0`.
    pub created_by: String,
    /// Where the data came from (a command line, an input file), free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// zstd codec: where each run of blocks after the first starts, as (first row, first
    /// block). The rows of a run are cut into blocks of `block_rows` from its first row; an
    /// append starts a run, so that the blocks of earlier versions (the last of them not full)
    /// are never rewritten. Empty: one run (every store written whole).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block_runs: Vec<[u64; 2]>,
    /// The versions before this one, oldest first (a store that grew by appends); this one is
    /// version `history.len() + 1`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Version>,
}

impl Manifest {
    /// Parses a manifest, checking the format name and version before the rest of the fields, so
    /// that a file from another tool or a newer version gets that error rather than a field error.
    pub fn from_json(text: &str) -> Result<Manifest, ManifestError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| ManifestError::Json(e.to_string()))?;
        let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("<missing>");
        if format != STORE_FORMAT {
            return Err(ManifestError::WrongFormat { found: format.to_owned() });
        }
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != u64::from(STORE_FORMAT_VERSION) && version != u64::from(STORE_FORMAT_VERSION_APPENDED) {
            return Err(ManifestError::UnsupportedVersion { found: version });
        }
        // serde does not reject unknown fields of an internally tagged unit variant (`raw`).
        if let Some(codec) = value.get("codec").and_then(|c| c.as_object()) {
            let allowed: &[&str] = match codec.get("name").and_then(|n| n.as_str()) {
                Some("zstd") => &["name", "level", "block_rows", "planes", "block_checksum"],
                _ => &["name"],
            };
            if let Some(field) = codec.keys().find(|k| !allowed.contains(&k.as_str())) {
                return Err(ManifestError::Invalid(format!(
                    "codec has an unknown field {field:?} (expected {})",
                    allowed.join(", ")
                )));
            }
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Serialises the manifest as pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        // Serialising plain structs and maps with string keys cannot fail.
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Checks the manifest's internal consistency (no I/O).
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |msg: String| Err(ManifestError::Invalid(msg));
        if self.dtypes != MatrixDtypes::default() {
            return invalid(format!("dtypes {:?}, expected indptr u64le, indices u32le, data f32le", self.dtypes));
        }
        if self.n_vars > u64::from(u32::MAX) {
            return invalid(format!("n_vars {} exceeds the u32 column index range", self.n_vars));
        }
        if let Codec::Zstd { level, block_rows, .. } = self.codec {
            if block_rows == 0 {
                return invalid("codec zstd with block_rows 0".to_owned());
            }
            if !(-7..=22).contains(&level) {
                return invalid(format!("codec zstd with level {level}, expected -7..=22"));
            }
        }
        for name in self.required_files() {
            if !self.files.contains_key(*name) {
                return invalid(format!("files has no entry for {name:?}"));
            }
        }
        let appended = !self.history.is_empty() || !self.block_runs.is_empty();
        let expected = if appended { STORE_FORMAT_VERSION_APPENDED } else { STORE_FORMAT_VERSION };
        if self.version != expected {
            return invalid(format!(
                "version {} with{} a history of appends, expected {expected}",
                self.version,
                if appended { "" } else { "out" }
            ));
        }
        let versions = self.history.iter().map(|v| &v.files).chain(std::iter::once(&self.files));
        let mut previous: Option<&BTreeMap<String, FileEntry>> = None;
        for (k, files) in versions.enumerate() {
            for (path, entry) in files {
                check_file_name(path)?;
                let ok = entry.checksum.len() == 16 && entry.checksum.bytes().all(|b| b.is_ascii_hexdigit());
                if !ok {
                    return invalid(format!("checksum of {path:?} is {:?}, expected 16 hex digits", entry.checksum));
                }
                // A file grown by an append continues the previous version's bytes of it.
                let before = previous.and_then(|p| p.get(path)).map(|e| e.bytes);
                if entry.from != 0 && before != Some(entry.from) || entry.from > entry.bytes {
                    return invalid(format!(
                        "{path:?} of version {} starts its checksum at byte {}, but the version before holds {} of it",
                        k + 1,
                        entry.from,
                        before.map_or("none".to_owned(), |b| b.to_string())
                    ));
                }
            }
            previous = Some(files);
        }
        self.check_block_runs()
    }

    /// The runs of zstd blocks (see [`block_runs`](Manifest::block_runs)), the first included:
    /// (first row, first block), rows and blocks strictly increasing.
    pub fn runs(&self) -> Vec<[u64; 2]> {
        std::iter::once([0, 0]).chain(self.block_runs.iter().copied()).collect()
    }

    fn check_block_runs(&self) -> Result<(), ManifestError> {
        if self.block_runs.is_empty() {
            return Ok(());
        }
        let Codec::Zstd { block_rows, .. } = self.codec else {
            return Err(ManifestError::Invalid("block_runs in a store of the raw codec".to_owned()));
        };
        let runs = self.runs();
        for w in runs.windows(2) {
            let ([row, block], [next_row, next_block]) = (w[0], w[1]);
            let blocks = next_row.checked_sub(row).map(|rows| rows.div_ceil(u64::from(block_rows)));
            if next_row <= row || next_row > self.n_obs || blocks.map(|b| block + b) != Some(next_block) {
                return Err(ManifestError::Invalid(format!(
                    "block_runs: a run at row {next_row}, block {next_block} does not follow the run at row {row},                      block {block} ({block_rows} rows a block, {} cells)",
                    self.n_obs
                )));
            }
        }
        Ok(())
    }

    /// The files a store of this codec cannot be without.
    pub fn required_files(&self) -> &'static [&'static str] {
        match self.codec {
            Codec::Raw => {
                &[StoreFiles::INDPTR, StoreFiles::INDICES, StoreFiles::DATA, StoreFiles::OBS, StoreFiles::VAR]
            }
            Codec::Zstd { .. } => {
                &[StoreFiles::INDPTR, StoreFiles::BLOCKS, StoreFiles::BLOCK_INDEX, StoreFiles::OBS, StoreFiles::VAR]
            }
        }
    }

    /// Number of zstd blocks (0 for the raw codec).
    pub fn n_blocks(&self) -> u64 {
        match self.codec {
            Codec::Raw => 0,
            Codec::Zstd { block_rows, .. } => {
                let [row, block] = self.runs().last().copied().unwrap_or([0, 0]);
                block + self.n_obs.saturating_sub(row).div_ceil(u64::from(block_rows))
            }
        }
    }

    /// This version's number (1 for a store written whole).
    pub fn version_number(&self) -> usize {
        self.history.len() + 1
    }

    /// Total bytes of all files of the store, manifest excluded.
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut files = BTreeMap::new();
        for name in [StoreFiles::INDPTR, StoreFiles::INDICES, StoreFiles::DATA, StoreFiles::OBS, StoreFiles::VAR] {
            files.insert(name.to_owned(), FileEntry::whole(8, "0123456789abcdef".to_owned()));
        }
        Manifest {
            format: STORE_FORMAT.to_owned(),
            version: STORE_FORMAT_VERSION,
            n_obs: 2,
            n_vars: 3,
            nnz: 4,
            dtypes: MatrixDtypes::default(),
            codec: Codec::Raw,
            checksum: ChecksumAlgorithm::Xxh3_64,
            files,
            created_by: "test".to_owned(),
            source: None,
            block_runs: Vec::new(),
            history: Vec::new(),
        }
    }

    #[test]
    fn round_trips_through_json() -> Result<(), ManifestError> {
        let m = sample();
        assert_eq!(Manifest::from_json(&m.to_json())?, m);
        let z = Manifest { codec: Codec::zstd(), ..sample() };
        let text = z.to_json();
        assert!(text.contains("\"name\": \"zstd\""), "{text}");
        assert!(text.contains("\"checksum\": \"xxh3-64\""), "{text}");
        assert!(text.contains("\"planes\": \"narrow\""), "{text}");
        let mut z = z;
        for name in [StoreFiles::BLOCKS, StoreFiles::BLOCK_INDEX] {
            z.files.insert(name.to_owned(), z.files[StoreFiles::INDPTR].clone());
        }
        assert_eq!(Manifest::from_json(&z.to_json())?, z);
        assert!(text.contains("\"block_checksum\": \"xxh3-64\""), "{text}");
        // A manifest from before the block checksum holds zstd's content checksums; one from
        // before the planes, wide planes too.
        let before_checksum = z.to_json().replace(",\n    \"block_checksum\": \"xxh3-64\"", "");
        assert!(!before_checksum.contains("block_checksum"), "{before_checksum}");
        let earlier = |planes| Codec::Zstd {
            level: DEFAULT_ZSTD_LEVEL,
            block_rows: 256,
            planes,
            block_checksum: BlockChecksum::Content,
        };
        assert_eq!(Manifest::from_json(&before_checksum)?.codec, earlier(Planes::Narrow));
        let old = before_checksum.replace(",\n    \"planes\": \"narrow\"", "");
        assert!(!old.contains("planes"), "{old}");
        assert_eq!(Manifest::from_json(&old)?.codec, earlier(Planes::Wide));
        let unknown = z.to_json().replace("\"xxh3-64\"\n", "\"crc32\"\n");
        assert!(matches!(Manifest::from_json(&unknown), Err(ManifestError::Invalid(e)) if e.contains("crc32")));
        let unknown = z.to_json().replace("\"narrow\"", "\"tiny\"");
        assert!(matches!(Manifest::from_json(&unknown), Err(ManifestError::Invalid(e)) if e.contains("tiny")));
        Ok(())
    }

    #[test]
    fn rejects_foreign_and_future_files() {
        let m = sample().to_json();
        let foreign = m.replace(STORE_FORMAT, "zarr");
        assert_eq!(Manifest::from_json(&foreign), Err(ManifestError::WrongFormat { found: "zarr".to_owned() }));
        let future = m.replace("\"version\": 1", "\"version\": 3");
        assert_eq!(Manifest::from_json(&future), Err(ManifestError::UnsupportedVersion { found: 3 }));
        assert!(matches!(Manifest::from_json("{"), Err(ManifestError::Json(_))));
    }

    #[test]
    fn rejects_unknown_fields_and_missing_files() {
        let m = sample().to_json().replacen("{", "{\"extra\": 1,", 1);
        assert!(matches!(Manifest::from_json(&m), Err(ManifestError::Invalid(msg)) if msg.contains("extra")));
        let mut missing = sample();
        missing.files.remove(StoreFiles::DATA);
        assert!(matches!(missing.validate(), Err(ManifestError::Invalid(msg)) if msg.contains("X/data")));
        let mut bad_sum = sample();
        if let Some(obs) = bad_sum.files.get_mut(StoreFiles::OBS) {
            obs.checksum = "xyz".to_owned();
        }
        assert!(bad_sum.validate().is_err());
    }

    #[test]
    fn file_names_stay_inside_the_store() {
        for good in ["X/indptr", "obs.parquet", "degs.parquet", "truth.parquet", "notes-1_a.txt"] {
            assert_eq!(check_file_name(good), Ok(()), "{good}");
        }
        for bad in ["/etc/passwd", "../x", "X/../../x", "X/other", ".hidden", "a/b", "", "a\\b", "obs.parquet\0"] {
            assert!(check_file_name(bad).is_err(), "{bad:?} accepted");
        }
        let mut m = sample();
        let entry = m.files[StoreFiles::OBS].clone();
        m.files.insert("../outside".to_owned(), entry);
        assert!(
            matches!(Manifest::from_json(&m.to_json()), Err(ManifestError::Invalid(e)) if e.contains("../outside"))
        );
    }

    #[test]
    fn the_raw_codec_takes_no_other_field() {
        let text = sample().to_json().replace(r#""name": "raw""#, r#""name": "raw", "level": 3"#);
        assert!(text.contains(r#""level": 3"#), "{text}");
        let err = Manifest::from_json(&text).unwrap_err().to_string();
        assert!(err.contains(r#"unknown field "level""#), "{err}");
    }

    #[test]
    fn an_appended_store_records_its_versions_runs_and_grown_files() -> Result<(), ManifestError> {
        let mut first = Manifest { codec: Codec::zstd_with(1, 4), ..sample() };
        for name in [StoreFiles::BLOCKS, StoreFiles::BLOCK_INDEX] {
            first.files.insert(name.to_owned(), first.files[StoreFiles::INDPTR].clone());
        }
        first.files.remove(StoreFiles::INDICES);
        first.files.remove(StoreFiles::DATA);
        first.n_obs = 6;
        assert_eq!(first.n_blocks(), 2);
        let mut grown = first.clone();
        grown.version = STORE_FORMAT_VERSION_APPENDED;
        grown.history.push(Version {
            n_obs: first.n_obs,
            nnz: first.nnz,
            files: first.files.clone(),
            created_by: first.created_by.clone(),
            source: None,
        });
        // Rows 6..11 appended: a run of blocks from row 6, block 2 (block 1 holds rows 4 and 5).
        grown.n_obs = 11;
        grown.block_runs = vec![[6, 2]];
        grown.files.insert(
            StoreFiles::BLOCKS.to_owned(),
            FileEntry { bytes: 20, checksum: "0123456789abcdef".to_owned(), from: 8 },
        );
        assert_eq!(grown.n_blocks(), 4);
        assert_eq!(grown.version_number(), 2);
        assert_eq!(Manifest::from_json(&grown.to_json())?, grown);
        // Inconsistent: a grown file that does not continue the version before, a run that does
        // not follow the one before, an appended store that says version 1.
        let mut bad = grown.clone();
        if let Some(e) = bad.files.get_mut(StoreFiles::BLOCKS) {
            e.from = 7;
        }
        assert!(matches!(bad.validate(), Err(ManifestError::Invalid(e)) if e.contains("starts its checksum")));
        let mut bad = grown.clone();
        bad.block_runs = vec![[6, 3]];
        assert!(matches!(bad.validate(), Err(ManifestError::Invalid(e)) if e.contains("does not follow")));
        let bad = Manifest { version: STORE_FORMAT_VERSION, ..grown.clone() };
        assert!(matches!(bad.validate(), Err(ManifestError::Invalid(e)) if e.contains("history of appends")));
        Ok(())
    }
}
