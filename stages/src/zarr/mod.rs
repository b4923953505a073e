//! AnnData zarr stores, as `AnnData.write_zarr` writes them (zarr format 2 and 3; blosc, zstd
//! and gzip compressed, sharded or not), read by row ranges through the zarrs crate.
//!
//! The layout is the `.h5ad` one with groups and arrays in place of HDF5's (see
//! [`crate::h5ad`]): `X`, `layers/NAME` and `raw/X` are `csr_matrix` / `csc_matrix` groups or
//! dense 2-D arrays, `obs` and `var` `dataframe` groups, `uns` dicts. [`ZarrReader`] has the
//! `.h5ad` reader's methods and makes the same Arrow tables of the same data, so an import of a
//! zarr store equals the import of its `.h5ad` twin. Before anything is read, the store's
//! directory is checked (the `audit` module): links and special files are refused, and an index
//! must store what it declares.

mod array;
mod audit;
mod frame;
mod guard;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use zarrs::filesystem::FilesystemStore;
use zarrs::group::Group;
use zarrs::storage::ReadableStorageTraits;

use self::array::{Elements, ZArray};
use self::audit::{MAX_IDS_PER_BYTE, Walked};
use self::frame::Frame;
use crate::anndata::{Arrays, MatrixLayout, MatrixSource, StoredMatrix, deg_lists};
use crate::error::{Error, Result};
use crate::h5ad::ExternalData;
use cpa_stream_schemas::tables::{CELL_ID, GENE_ID};

/// The ids an index may declare without the check of what it stores (small stores pass).
const IDS_CHECKED: u64 = 1 << 20;

/// An open zarr store: its directory and what the walk found.
struct Zarr {
    root: PathBuf,
    storage: Arc<dyn ReadableStorageTraits>,
    /// The same storage, where arrays register the bounds of their chunks.
    guard: Arc<guard::GuardedStore>,
    /// 2 or 3.
    format: u8,
    walked: Walked,
}

impl Zarr {
    fn open(root: &Path, external: ExternalData) -> Result<Zarr> {
        let format = if root.join("zarr.json").is_file() {
            3
        } else if root.join(".zgroup").is_file() {
            2
        } else {
            return Err(Error::Unsupported {
                path: root.to_owned(),
                reason: "no zarr.json or .zgroup: not a zarr store".to_owned(),
            });
        };
        let walked = audit::check_store(root, external)?;
        let store = FilesystemStore::new(root)
            .map_err(|e| Error::Unsupported { path: root.to_owned(), reason: format!("opening the store: {e}") })?;
        let (guard, storage) = guard::guarded(store);
        Ok(Zarr { root: root.to_owned(), storage, guard, format, walked })
    }

    /// The node type recorded at `path` (`array` or `group`), if a node is there.
    fn node_type(&self, path: &str) -> Option<&'static str> {
        let dir = self.root.join(path);
        match self.format {
            2 if dir.join(".zarray").is_file() => Some("array"),
            2 if dir.join(".zgroup").is_file() => Some("group"),
            2 => None,
            _ => {
                let text = std::fs::read_to_string(dir.join("zarr.json")).ok()?;
                let value: serde_json::Value = serde_json::from_str(&text).ok()?;
                match value.get("node_type")?.as_str()? {
                    "array" => Some("array"),
                    "group" => Some("group"),
                    _ => None,
                }
            }
        }
    }

    /// Why no node is at `path` although a metadata file is there: its parse error (format 3's
    /// `zarr.json` that is not JSON, or names no node type); `None` where there is no such file.
    fn broken_metadata(&self, path: &str) -> Option<String> {
        if self.format != 3 {
            return None;
        }
        let file = self.root.join(path).join("zarr.json");
        let text = std::fs::read_to_string(&file).ok()?;
        let reason = match serde_json::from_str::<serde_json::Value>(&text) {
            Err(e) => format!("not JSON: {e}"),
            Ok(value) => match value.get("node_type").and_then(|t| t.as_str()) {
                Some("array" | "group") => return None,
                Some(other) => format!("node_type {other:?}, expected \"array\" or \"group\""),
                None => "no node_type".to_owned(),
            },
        };
        Some(format!("{path}/zarr.json: {reason}"))
    }

    /// `no WHAT` at `path`, or why its metadata could not be read.
    fn absent(&self, path: &str, what: &str) -> Error {
        let reason = self.broken_metadata(path).unwrap_or_else(|| format!("no {what} {path}"));
        Error::Unsupported { path: self.root.clone(), reason }
    }

    fn is_group(&self, path: &str) -> bool {
        self.node_type(path) == Some("group")
    }

    fn is_array(&self, path: &str) -> bool {
        self.node_type(path) == Some("array")
    }

    fn group_attributes(&self, path: &str) -> Result<serde_json::Map<String, serde_json::Value>> {
        let group = Group::open(Arc::clone(&self.storage), &format!("/{}", path.trim_start_matches('/')))
            .map_err(|e| Error::Unsupported { path: self.root.clone(), reason: format!("{path}: {e}") })?;
        Ok(group.attributes().clone())
    }

    fn array(&self, path: &str) -> Result<ZArray> {
        if !self.is_array(path) {
            return Err(self.absent(path, "array"));
        }
        let array = ZArray::open(&self.root, &self.storage, &self.guard, path)?;
        Ok(array.with_stored_chunks(self.walked.chunk_files_under(path)))
    }

    /// The nodes in group `path`, by name.
    fn members(&self, path: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.root.join(path)) else { return Vec::new() };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| self.node_type(&format!("{path}/{n}")).is_some())
            .collect();
        names.sort();
        names
    }

    /// Refuses an index that declares more ids than it could store (see the `audit` module).
    fn check_index(&self, frame: &str, n_rows: u64) -> Result<()> {
        let stored = self.walked.stored_under(frame);
        if n_rows > IDS_CHECKED && stored.saturating_mul(MAX_IDS_PER_BYTE) < n_rows {
            return Err(Error::Unsupported {
                path: self.root.clone(),
                reason: format!(
                    "{frame}: its index declares {n_rows} rows but the dataframe stores {stored} bytes, fewer than one \
                     per {MAX_IDS_PER_BYTE} ids: chunks are missing (a damaged or crafted store)"
                ),
            });
        }
        Ok(())
    }
}

/// An open AnnData zarr store: the matrix (`X`, a layer or `raw/X`), `obs`, `var` and DEG lists.
pub struct ZarrReader {
    zarr: Zarr,
    element: String,
    matrix: StoredMatrix,
    /// What [`ZarrReader::missing_chunks`] says of the matrix's arrays.
    matrix_missing: Vec<String>,
    obs: Frame,
    var: Frame,
}

impl std::fmt::Debug for ZarrReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZarrReader")
            .field("path", &self.zarr.root)
            .field("element", &self.element)
            .field("n_obs", &self.n_obs())
            .field("n_vars", &self.n_vars())
            .finish()
    }
}

impl ZarrReader {
    /// Opens the store at `path` and the matrix `source`, after checking that reading it reads
    /// nothing outside it (see [`ExternalData`] and the `audit` module).
    pub fn open_matrix_with(
        path: &Path,
        source: MatrixSource<'_>,
        policy: impl Into<crate::h5ad::InputPolicy>,
    ) -> Result<ZarrReader> {
        let policy = policy.into();
        let zarr = Zarr::open(path, policy.external)?;
        let root_attributes = zarr.group_attributes("")?;
        let encoding = root_attributes.get("encoding-type").and_then(|v| v.as_str());
        if encoding.is_some_and(|e| e != "anndata") {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: format!("root encoding-type is {encoding:?}, expected \"anndata\""),
            });
        }
        if let Some(reason) = ["obs", "var"].iter().find_map(|g| zarr.broken_metadata(g)) {
            return Err(Error::Unsupported { path: path.to_owned(), reason });
        }
        if !zarr.is_group("obs") || !zarr.is_group("var") {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: "no obs and var dataframes: not an AnnData zarr store".to_owned(),
            });
        }
        let (element, var_name) = match source {
            MatrixSource::X => ("X".to_owned(), "var"),
            MatrixSource::Raw => {
                if zarr.node_type("raw/X").is_none() || !zarr.is_group("raw/var") {
                    return Err(Error::InvalidInput(format!(
                        "{}: no raw matrix (adata.raw: raw/X and raw/var)",
                        path.display()
                    )));
                }
                ("raw/X".to_owned(), "raw/var")
            }
            MatrixSource::Layer(l) => {
                let known = zarr.members("layers");
                if !known.iter().any(|k| k == l) {
                    return Err(Error::InvalidInput(format!(
                        "{}: no layer {l:?}; layers: {}",
                        path.display(),
                        if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                    )));
                }
                (format!("layers/{l}"), "var")
            }
        };
        if zarr.node_type(&element).is_none() {
            return Err(zarr.absent(&element, "matrix"));
        }
        let obs = Frame::open(&zarr, "obs", CELL_ID)?;
        zarr.check_index("obs", obs.n_rows())?;
        obs.check_index_chunks()?;
        let var = Frame::open(&zarr, var_name, GENE_ID)?;
        zarr.check_index(var_name, var.n_rows())?;
        var.check_index_chunks()?;
        let (matrix, (n_obs, n_vars)) = open_matrix(&zarr, &element)?;
        let matrix_arrays: Vec<&ZArray> = match &matrix {
            Opened::Sparse { data, indices, indptr, .. } => vec![&**data, &**indices, &**indptr],
            Opened::Dense(x) => vec![&**x],
        };
        if let Opened::Sparse { .. } = &matrix
            && !policy.allow_missing_chunks
            && let Some(array) = matrix_arrays.iter().find(|a| a.missing_chunks() > 0)
        {
            return Err(Error::corrupt(
                path,
                format!(
                    "{}: {} of its {} chunks have no file; zarr leaves out only chunks of the fill value, which a \
                     sparse matrix's {} hardly ever are, so this is a damaged or partial copy (their entries would \
                     read as the fill value); --allow-missing-chunks reads it anyway",
                    array.name(),
                    array.missing_chunks(),
                    array.chunks(),
                    array.name().rsplit('/').next().unwrap_or_default()
                ),
            ));
        }
        for (what, expected, actual) in
            [(format!("{element} rows"), obs.n_rows(), n_obs), (format!("{element} columns"), var.n_rows(), n_vars)]
        {
            if expected != actual {
                return Err(Error::SizeMismatch { path: path.to_owned(), what, expected, actual });
            }
        }
        if n_vars > u64::from(u32::MAX) {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: format!("{n_vars} genes exceed u32 indices"),
            });
        }
        let matrix_missing = missing_lines(matrix_arrays);
        let arrays = match matrix {
            Opened::Sparse { layout, data, indices, indptr } => Arrays::Sparse { layout, data, indices, indptr },
            Opened::Dense(x) => Arrays::Dense(x),
        };
        let matrix = StoredMatrix::new(&zarr.root, &element, arrays, (n_obs, n_vars));
        Ok(ZarrReader { zarr, element, matrix, matrix_missing, obs, var })
    }

    /// The store.
    pub fn path(&self) -> &Path {
        &self.zarr.root
    }

    /// Arrays read that lack chunks (read as their fill value, as zarr means it), one line each.
    pub fn missing_chunks(&self) -> Vec<String> {
        let mut arrays: Vec<&ZArray> = self.obs.arrays();
        arrays.extend(self.var.arrays());
        let mut lines = missing_lines(arrays);
        lines.extend(self.matrix_missing.iter().cloned());
        lines
    }

    /// The other matrices of the store, as the import flags that pick them.
    pub fn other_matrices(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .zarr
            .members("layers")
            .into_iter()
            .filter(|l| format!("layers/{l}") != self.element)
            .map(|l| format!("--layer {l}"))
            .collect();
        if !self.element.starts_with("raw") && self.zarr.node_type("raw/X").is_some() {
            out.push("--use-raw".to_owned());
        }
        out
    }

    /// The matrix read, as its path in the store.
    pub fn element(&self) -> &str {
        &self.element
    }

    /// Cells.
    pub fn n_obs(&self) -> u64 {
        self.matrix.n_obs()
    }

    /// Genes.
    pub fn n_vars(&self) -> u64 {
        self.matrix.n_vars()
    }

    /// The matrix, read by row or column ranges.
    pub fn matrix(&self) -> &StoredMatrix {
        &self.matrix
    }

    /// The Arrow schema `obs` becomes.
    pub fn obs_schema(&self) -> SchemaRef {
        self.obs.schema()
    }

    /// `obs` rows `rows`.
    pub fn read_obs(&self, rows: Range<u64>) -> Result<RecordBatch> {
        self.obs.read(rows)
    }

    /// The whole `var` table (genes are few).
    pub fn read_var(&self) -> Result<RecordBatch> {
        self.var.read(0..self.n_vars())
    }

    /// DEG lists from `uns`: the entry `key`, or without one the first that is a dict of 1-D
    /// string arrays (CPA's `deg_uns_key`: group -> ranked gene names). scanpy's
    /// `rank_genes_groups` is stored as record arrays, which zarr's libraries other than
    /// zarr-python do not read: an error naming it when asked for, passed over otherwise.
    pub fn read_degs(&self, key: Option<&str>) -> Result<Option<(String, RecordBatch)>> {
        let names = self.zarr.members("uns");
        let root = &self.zarr.root;
        if let Some(k) = key
            && !names.iter().any(|n| n == k)
        {
            let shown = if names.is_empty() { "none".to_owned() } else { names.join(", ") };
            return Err(Error::InvalidInput(format!(
                "{}: no uns/{k} for the DEG lists; uns holds: {shown}",
                root.display()
            )));
        }
        for name in names.iter().filter(|n| key.is_none_or(|k| k == n.as_str())) {
            let group = format!("uns/{name}");
            if !self.zarr.is_group(&group) {
                continue;
            }
            let members = self.zarr.members(&group);
            if members.iter().any(|m| m == "names") && self.zarr.is_array(&format!("{group}/names")) {
                if key.is_some() {
                    return Err(Error::Unsupported {
                        path: root.clone(),
                        reason: format!(
                            "{group}: scanpy's rank_genes_groups (record arrays), which this reader cannot read from \
                             zarr; store the DEG lists as a dict of ranked gene names (CPA's deg_uns_key) or import the \
                             .h5ad"
                        ),
                    });
                }
                continue;
            }
            if let Some(table) = self.deg_dict(&group, &members)? {
                return Ok(Some((name.clone(), table)));
            }
        }
        if let Some(k) = key {
            return Err(Error::InvalidInput(format!(
                "{}: uns/{k} is not a dict of group -> ranked gene names",
                root.display()
            )));
        }
        Ok(None)
    }

    fn deg_dict(&self, group: &str, members: &[String]) -> Result<Option<RecordBatch>> {
        if members.is_empty() {
            return Ok(None);
        }
        let mut lists = Vec::with_capacity(members.len());
        for m in members {
            let path = format!("{group}/{m}");
            if !self.zarr.is_array(&path) {
                return Ok(None);
            }
            let array = self.zarr.array(&path)?;
            if array.shape().len() != 1 || array.elements() != Elements::Text {
                return Ok(None);
            }
            lists.push((m.clone(), array.strings(0..array.len())?));
        }
        deg_lists(lists).map(Some)
    }
}

/// A matrix's arrays as opened, before [`StoredMatrix`] takes them.
enum Opened {
    Sparse { layout: MatrixLayout, data: Box<ZArray>, indices: Box<ZArray>, indptr: Box<ZArray> },
    Dense(Box<ZArray>),
}

/// One line per array that lacks chunks.
fn missing_lines(arrays: Vec<&ZArray>) -> Vec<String> {
    arrays
        .into_iter()
        .filter(|a| a.missing_chunks() > 0)
        .map(|a| {
            format!("{}: {} of {} chunks absent, read as the fill value", a.name(), a.missing_chunks(), a.chunks())
        })
        .collect()
}

fn open_matrix(zarr: &Zarr, element: &str) -> Result<(Opened, (u64, u64))> {
    let root = &zarr.root;
    let unsupported = |reason: String| Error::Unsupported { path: root.clone(), reason };
    if zarr.is_group(element) {
        let attributes = zarr.group_attributes(element)?;
        let encoding = attributes.get("encoding-type").and_then(|v| v.as_str()).unwrap_or_default();
        let layout = match encoding {
            "csr_matrix" => MatrixLayout::Csr,
            "csc_matrix" => MatrixLayout::Csc,
            other => {
                return Err(unsupported(format!(
                    "{element}: encoding-type {other:?}, expected csr_matrix, csc_matrix or a dense array"
                )));
            }
        };
        let shape: Vec<u64> = match attributes.get("shape") {
            Some(serde_json::Value::Array(dims)) => dims.iter().filter_map(serde_json::Value::as_u64).collect(),
            _ => Vec::new(),
        };
        if shape.len() != 2 {
            return Err(Error::corrupt(
                root,
                format!("{element}: shape attribute {:?}, expected two sizes", attributes.get("shape")),
            ));
        }
        let array = |n: &str| zarr.array(&format!("{element}/{n}"));
        let (data, indices, indptr) = (array("data")?, array("indices")?, array("indptr")?);
        for (name, a) in [("data", &data), ("indices", &indices), ("indptr", &indptr)] {
            let numeric = matches!(a.elements(), Elements::Int | Elements::UInt | Elements::Float(_))
                || (name == "data" && a.elements() == Elements::Bool);
            let integral = matches!(a.elements(), Elements::Int | Elements::UInt);
            if !numeric || (name != "data" && !integral) || a.shape().len() != 1 {
                return Err(unsupported(format!(
                    "{element}/{name} holds {} of shape {:?}, expected a 1-D array of {}",
                    a.type_name(),
                    a.shape(),
                    if name == "data" { "numbers" } else { "integers" }
                )));
            }
        }
        let major = if layout == MatrixLayout::Csr { shape[0] } else { shape[1] };
        if indptr.len() != major + 1 {
            return Err(Error::SizeMismatch {
                path: root.clone(),
                what: format!("length of {element}/indptr"),
                expected: major + 1,
                actual: indptr.len(),
            });
        }
        if indices.len() != data.len() {
            return Err(Error::SizeMismatch {
                path: root.clone(),
                what: format!("length of {element}/indices"),
                expected: data.len(),
                actual: indices.len(),
            });
        }
        return Ok((
            Opened::Sparse { layout, data: Box::new(data), indices: Box::new(indices), indptr: Box::new(indptr) },
            (shape[0], shape[1]),
        ));
    }
    let x = zarr.array(element)?;
    if x.shape().len() != 2 {
        return Err(unsupported(format!("{element}: {}-dimensional array, expected 2", x.shape().len())));
    }
    if !matches!(x.elements(), Elements::Int | Elements::UInt | Elements::Float(_) | Elements::Bool) {
        return Err(unsupported(format!("{element} holds {}, expected numbers", x.type_name())));
    }
    let shape = (x.shape()[0], x.shape()[1]);
    Ok((Opened::Dense(Box::new(x)), shape))
}
