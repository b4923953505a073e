//! Reading `.h5ad` files by row (or column) ranges.

use std::ops::Range;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use hdf5::types::TypeDescriptor;
use hdf5::{Dataset, File, Group};

use super::audit::ExternalData;
use super::dataframe::{DataFrameReader, attr_string, read_strings, read_vec};
use crate::anndata::{Arrays, MatrixArray, MatrixLayout, MatrixSource, StoredMatrix, deg_lists, deg_table};
use crate::error::{Error, Result};

/// A dataset of the matrix (`data`, `indices`, `indptr`, or a dense `X`), read by ranges.
struct H5Array {
    path: PathBuf,
    ds: Dataset,
}

impl MatrixArray for H5Array {
    fn len(&self) -> u64 {
        self.ds.shape().first().map_or(0, |&n| n as u64)
    }

    fn ints(&self, range: Range<u64>, what: &dyn Fn() -> String) -> Result<Vec<i64>> {
        let sel = range.start as usize..range.end as usize;
        read_vec(&self.path, &self.ds, &sel, sel.len(), what)
    }

    fn floats(&self, range: Range<u64>, what: &dyn Fn() -> String) -> Result<Vec<f32>> {
        let sel = range.start as usize..range.end as usize;
        if self.ds.ndim() != 2 {
            return read_values(&self.path, &self.ds, &sel, what);
        }
        if sel.is_empty() {
            return Ok(Vec::new());
        }
        let block = match is_boolean(&self.ds) {
            true => self.ds.read_slice_2d::<bool, _>((sel, ..)).map(|b| b.mapv(|v| f32::from(u8::from(v)))),
            false => self.ds.read_slice_2d::<f32, _>((sel, ..)),
        }
        .map_err(Error::hdf5(&self.path, what()))?;
        Ok(block.as_standard_layout().into_owned().into_raw_vec_and_offset().0)
    }
}

/// An open `.h5ad` file: the matrix (`X` or a layer), `obs`, `var` and DEG lists.
#[derive(Debug)]
pub struct H5adReader {
    path: PathBuf,
    file: File,
    element: String,
    matrix: StoredMatrix,
    obs: DataFrameReader,
    var: DataFrameReader,
}

/// Checks that `path` is a regular file holding an HDF5 signature where HDF5 looks for one: at
/// offset 0, or after a user block of 512, 1,024, 2,048... bytes (h5py's `userblock_size`).
/// Opened without blocking, so that a FIFO or device given as the input is refused, not waited on.
fn is_hdf5(path: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    const SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Unsupported {
            path: path.to_owned(),
            reason: "not a regular file (a directory, FIFO, socket or device); expected an AnnData .h5ad file"
                .to_owned(),
        });
    }
    let mut offset = 0u64;
    while offset + 8 <= meta.len() {
        let mut magic = [0u8; 8];
        file.seek(SeekFrom::Start(offset)).map_err(|e| Error::io(path, e))?;
        file.read_exact(&mut magic).map_err(|e| Error::io(path, e))?;
        if magic == *SIGNATURE {
            return Ok(file);
        }
        offset = if offset == 0 { 512 } else { offset * 2 };
    }
    Err(Error::Unsupported {
        path: path.to_owned(),
        reason: "not an HDF5 file (no HDF5 signature at offset 0 or after a user block), expected an AnnData .h5ad"
            .to_owned(),
    })
}

impl H5adReader {
    /// Opens `path` and the matrix `X`, or `layers/<layer>`.
    pub fn open(path: &Path, layer: Option<&str>) -> Result<H5adReader> {
        H5adReader::open_matrix(path, layer.map_or(MatrixSource::X, MatrixSource::Layer))
    }

    /// Opens `path` and the matrix `source`, reading nothing but that file (see
    /// [`ExternalData::Refuse`]).
    pub fn open_matrix(path: &Path, source: MatrixSource<'_>) -> Result<H5adReader> {
        H5adReader::open_matrix_with(path, source, ExternalData::Refuse)
    }

    /// Opens `path` and the matrix `source`; every link and dataset of the file is checked first
    /// (external data as `external` allows, filters, declared sizes: the `audit` module).
    pub fn open_matrix_with(path: &Path, source: MatrixSource<'_>, external: ExternalData) -> Result<H5adReader> {
        let opened = is_hdf5(path)?;
        super::audit::disable_plugins();
        let file = File::open(super::hdf5_name(path, &opened)).map_err(Error::hdf5(path, "opening"))?;
        let root_encoding = attr_string(path, &file, "encoding-type")?;
        if root_encoding.as_deref().is_some_and(|e| e != "anndata") {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: format!("root encoding-type is {root_encoding:?}, expected \"anndata\""),
            });
        }
        if !file.link_exists("obs") || !file.link_exists("var") {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: "no obs and var dataframes: not an AnnData file".to_owned(),
            });
        }
        super::audit::check_file(path, &file, external)?;
        let mut var_name = "var";
        let element = match source {
            MatrixSource::X => "X".to_owned(),
            MatrixSource::Raw => {
                let (x, var) = if file.link_exists("raw") { ("raw/X", "raw/var") } else { ("raw.X", "raw.var") };
                if !file.link_exists(x) || !file.link_exists(var) {
                    return Err(Error::InvalidInput(format!(
                        "{}: no raw matrix (adata.raw: raw/X and raw/var, or raw.X and raw.var)",
                        path.display()
                    )));
                }
                var_name = var;
                x.to_owned()
            }
            MatrixSource::Layer(l) => {
                let known: Vec<String> = file.group("layers").and_then(|g| g.member_names()).unwrap_or_default();
                if !known.iter().any(|k| k == l) {
                    return Err(Error::InvalidInput(format!(
                        "{}: no layer {l:?}; layers: {}",
                        path.display(),
                        if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                    )));
                }
                format!("layers/{l}")
            }
        };
        if !file.link_exists(&element) {
            return Err(Error::Unsupported { path: path.to_owned(), reason: format!("no {element} matrix") });
        }
        let obs = DataFrameReader::open(path, &file, "obs", cpa_stream_schemas::tables::CELL_ID)?;
        let var = DataFrameReader::open(path, &file, var_name, cpa_stream_schemas::tables::GENE_ID)?;
        let (arrays, shape) = open_matrix(path, &file, &element)?;
        let (n_obs, n_vars) = shape;
        if n_obs != obs.n_rows() {
            return Err(Error::SizeMismatch {
                path: path.to_owned(),
                what: format!("{element} rows"),
                expected: obs.n_rows(),
                actual: n_obs,
            });
        }
        if n_vars != var.n_rows() {
            return Err(Error::SizeMismatch {
                path: path.to_owned(),
                what: format!("{element} columns"),
                expected: var.n_rows(),
                actual: n_vars,
            });
        }
        if n_vars > u64::from(u32::MAX) {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: format!("{n_vars} genes exceed u32 indices"),
            });
        }
        let matrix = StoredMatrix::new(path, &element, arrays, shape);
        Ok(H5adReader { path: path.to_owned(), file, element, matrix, obs, var })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The other matrices of the file, as the import flags that pick them (`--layer counts`,
    /// `--use-raw`), for hints when the one read does not fit.
    pub fn other_matrices(&self) -> Vec<String> {
        let layers: Vec<String> = self.file.group("layers").and_then(|g| g.member_names()).unwrap_or_default();
        let mut out: Vec<String> = layers
            .into_iter()
            .filter(|l| format!("layers/{l}") != self.element)
            .map(|l| format!("--layer {l}"))
            .collect();
        if !self.element.starts_with("raw") && (self.file.link_exists("raw/X") || self.file.link_exists("raw.X")) {
            out.push("--use-raw".to_owned());
        }
        out
    }

    /// The matrix read, as its path in the file (`X`, `layers/counts`, `raw/X`).
    pub fn element(&self) -> &str {
        &self.element
    }

    /// Cells.
    pub fn n_obs(&self) -> u64 {
        self.matrix.n_obs()
    }

    /// Genes (of the matrix read, after any gene selection).
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

    /// Gene ids (the `var` index).
    pub fn gene_ids(&self) -> Result<Vec<String>> {
        self.var.read_index(0..self.n_vars())
    }

    /// DEG lists from `uns`, as a table (`group`, `rank`, `gene`, `score`): the entry `key`, or
    /// without one the first `uns` entry that is either a dict of 1-D string arrays (CPA's
    /// `deg_uns_key`: group -> ranked gene names; no scores) or scanpy's `rank_genes_groups`
    /// (record arrays `names` and `scores`, one field per group). `None` when there is none; an
    /// error when `key` is absent or not DEG lists, naming the entries there are.
    pub fn read_degs(&self, key: Option<&str>) -> Result<Option<(String, RecordBatch)>> {
        let uns = self.file.group("uns").ok();
        let names = match &uns {
            Some(uns) => uns.member_names().map_err(Error::hdf5(&self.path, "uns"))?,
            None => Vec::new(),
        };
        let wanted: Vec<&String> = match key {
            Some(k) => names.iter().filter(|n| n.as_str() == k).collect(),
            None => names.iter().collect(),
        };
        if let Some(k) = key
            && wanted.is_empty()
        {
            let shown = if names.is_empty() { "none".to_owned() } else { names.join(", ") };
            return Err(Error::InvalidInput(format!(
                "{}: no uns/{k} for the DEG lists; uns holds: {shown}",
                self.path.display()
            )));
        }
        let Some(uns) = uns else { return Ok(None) };
        for name in wanted {
            let Ok(group) = uns.group(name) else { continue };
            let table = if group.link_exists("names") && group.dataset("names").is_ok() {
                self.deg_records(&group)?
            } else {
                self.deg_dict(&group)?
            };
            if let Some(table) = table {
                return Ok(Some((name.clone(), table)));
            }
        }
        if let Some(k) = key {
            return Err(Error::InvalidInput(format!(
                "{}: uns/{k} is neither a dict of group -> ranked gene names nor scanpy's rank_genes_groups",
                self.path.display()
            )));
        }
        Ok(None)
    }

    /// scanpy's `rank_genes_groups`: record arrays `names` (and optionally `scores`) with one
    /// field per group, rows in rank order.
    fn deg_records(&self, group: &Group) -> Result<Option<RecordBatch>> {
        let names = group.dataset("names").map_err(Error::hdf5(&self.path, format!("{}/names", group.name())))?;
        let Ok(TypeDescriptor::Compound(record)) = names.dtype().and_then(|t| t.to_descriptor()) else {
            return Ok(None);
        };
        // scanpy's record arrays beside `names`, one field per group: scores, p-values and
        // adjusted p-values, each optional.
        let numbers = |name: &str| group.dataset(name).ok();
        let (scores, pvals, pvals_adj) = (numbers("scores"), numbers("pvals"), numbers("pvals_adj"));
        let (mut groups, mut ranks, mut genes, mut values) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut pvalues, mut qvalues) = (Vec::new(), Vec::new());
        for field in &record.fields {
            let list = super::records::read_string_field(&self.path, &names, &field.name)?;
            let read = |ds: &Option<Dataset>| match ds {
                Some(d) => super::records::read_number_field(&self.path, d, &field.name).map(Some),
                None => Ok(None),
            };
            let (score, p, q) = (read(&scores)?, read(&pvals)?, read(&pvals_adj)?);
            let at = |v: &Option<Vec<f64>>, rank: usize| v.as_ref().and_then(|v| v.get(rank).copied());
            for (rank, gene) in list.into_iter().enumerate() {
                groups.push(field.name.clone());
                ranks.push(rank as u32);
                genes.push(gene);
                values.push(at(&score, rank));
                pvalues.push(at(&p, rank));
                qvalues.push(at(&q, rank));
            }
        }
        deg_table(groups, ranks, genes, values, (pvalues, qvalues)).map(Some)
    }

    fn deg_dict(&self, group: &Group) -> Result<Option<RecordBatch>> {
        let members = group.member_names().map_err(Error::hdf5(&self.path, group.name()))?;
        if members.is_empty() {
            return Ok(None);
        }
        let mut lists = Vec::with_capacity(members.len());
        for m in &members {
            let Ok(ds) = group.dataset(m) else { return Ok(None) };
            let is_strings = matches!(
                ds.dtype().and_then(|t| t.to_descriptor()),
                Ok(TypeDescriptor::VarLenUnicode | TypeDescriptor::VarLenAscii)
            );
            if ds.ndim() != 1 || !is_strings {
                return Ok(None);
            }
            lists.push((m.clone(), read_strings(&self.path, &ds, 0..ds.size() as u64)?));
        }
        deg_lists(lists).map(Some)
    }
}

/// Whether a dataset holds booleans (h5py writes numpy's as an enum {FALSE: 0, TRUE: 1}).
fn is_boolean(ds: &Dataset) -> bool {
    match ds.dtype().and_then(|t| t.to_descriptor()) {
        Ok(TypeDescriptor::Boolean) => true,
        Ok(TypeDescriptor::Enum(e)) => {
            e.members.len() == 2 && e.members.iter().all(|m| m.name == "FALSE" || m.name == "TRUE")
        }
        _ => false,
    }
}

/// Entries `sel` of a matrix's values as f32 (HDF5 converts numbers; booleans become 1 and 0).
fn read_values(path: &Path, data: &Dataset, sel: &Range<usize>, ctx: &dyn Fn() -> String) -> Result<Vec<f32>> {
    let n = sel.len();
    if is_boolean(data) {
        let flags: Vec<bool> = read_vec(path, data, sel, n, ctx)?;
        return Ok(flags.into_iter().map(|v| f32::from(u8::from(v))).collect());
    }
    read_vec(path, data, sel, n, ctx)
}

fn open_matrix(path: &Path, file: &File, element: &str) -> Result<(Arrays, (u64, u64))> {
    if let Ok(group) = file.group(element) {
        // anndata <= 0.6 (h5sparse): no encoding-type, `h5sparse_format` "csr"/"csc" and
        // `h5sparse_shape` instead.
        let legacy = attr_string(path, &group, "encoding-type")?.is_none()
            && attr_string(path, &group, "h5sparse_format")?.is_some();
        let encoding = match legacy {
            true => attr_string(path, &group, "h5sparse_format")?.map(|f| format!("{f}_matrix")),
            false => attr_string(path, &group, "encoding-type")?,
        };
        let layout = match encoding.unwrap_or_default().as_str() {
            "csr_matrix" => MatrixLayout::Csr,
            "csc_matrix" => MatrixLayout::Csc,
            other => {
                return Err(Error::Unsupported {
                    path: path.to_owned(),
                    reason: format!(
                        "{element}: encoding-type {other:?}, expected csr_matrix, csc_matrix or a dense array"
                    ),
                });
            }
        };
        let shape_name = if legacy { "h5sparse_shape" } else { "shape" };
        let shape_attr =
            group.attr(shape_name).map_err(Error::hdf5(path, format!("{element}: {shape_name} attribute")))?;
        let shape: Vec<i64> =
            shape_attr.read_raw().map_err(Error::hdf5(path, format!("{element}: {shape_name} attribute")))?;
        if shape.len() != 2 || shape.iter().any(|&d| d < 0) {
            return Err(Error::corrupt(path, format!("{element}: shape {shape:?}, expected two non-negative sizes")));
        }
        let ds = |n: &str| group.dataset(n).map_err(Error::hdf5(path, format!("{element}/{n}")));
        let (data, indices, indptr) = (ds("data")?, ds("indices")?, ds("indptr")?);
        for (name, d) in [("data", &data), ("indices", &indices), ("indptr", &indptr)] {
            let desc =
                d.dtype().and_then(|t| t.to_descriptor()).map_err(Error::hdf5(path, format!("{element}/{name}")))?;
            // Booleans (a binary matrix) are read as anndata reads them: 1 for true, 0 for false.
            let numeric =
                matches!(desc, TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_) | TypeDescriptor::Float(_))
                    || (name == "data" && is_boolean(d));
            let integral = matches!(desc, TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_));
            if !numeric || (name != "data" && !integral) {
                return Err(Error::Unsupported {
                    path: path.to_owned(),
                    reason: format!(
                        "{element}/{name} has type {desc}, expected {}",
                        if name == "data" { "numbers" } else { "integers" }
                    ),
                });
            }
        }
        let major = if layout == MatrixLayout::Csr { shape[0] } else { shape[1] } as u64;
        if indptr.size() as u64 != major + 1 {
            return Err(Error::SizeMismatch {
                path: path.to_owned(),
                what: format!("length of {element}/indptr"),
                expected: major + 1,
                actual: indptr.size() as u64,
            });
        }
        if indices.size() != data.size() {
            return Err(Error::SizeMismatch {
                path: path.to_owned(),
                what: format!("length of {element}/indices"),
                expected: data.size() as u64,
                actual: indices.size() as u64,
            });
        }
        let array = |ds: Dataset| -> Box<dyn MatrixArray> { Box::new(H5Array { path: path.to_owned(), ds }) };
        let arrays = Arrays::Sparse { layout, data: array(data), indices: array(indices), indptr: array(indptr) };
        return Ok((arrays, (shape[0] as u64, shape[1] as u64)));
    }
    let x = file.dataset(element).map_err(Error::hdf5(path, element.to_owned()))?;
    let shape = x.shape();
    if shape.len() != 2 {
        return Err(Error::Unsupported {
            path: path.to_owned(),
            reason: format!("{element}: {}-dimensional array, expected 2", shape.len()),
        });
    }
    let shape = (shape[0] as u64, shape[1] as u64);
    Ok((Arrays::Dense(Box::new(H5Array { path: path.to_owned(), ds: x })), shape))
}
