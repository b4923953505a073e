//! An AnnData file to import, whatever holds it: an `.h5ad` (HDF5) file or a zarr store that
//! `AnnData.write_zarr` wrote. [`AnnDataReader`] opens either and reads the matrix and `obs` by
//! row ranges, as the import streams them; what the two readers share of AnnData's encoding is in
//! [`crate::anndata`].

use std::ops::Range;
use std::path::Path;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

pub use crate::anndata::{MatrixLayout, MatrixSource, StoredMatrix};
use crate::counts_csr::CsrBatch;
use crate::error::Result;
use crate::h5ad::H5adReader;
pub use crate::h5ad::InputPolicy;
use crate::zarr::ZarrReader;

/// Whether `path` is a zarr store (a directory holding zarr metadata at its top).
pub fn is_zarr(path: &Path) -> bool {
    path.is_dir() && (path.join(".zgroup").is_file() || path.join("zarr.json").is_file())
}

/// An AnnData file opened for reading: an `.h5ad` file or a zarr store.
#[derive(Debug)]
pub enum AnnDataReader {
    /// An `.h5ad` file.
    H5ad(Box<H5adReader>),
    /// A zarr store.
    Zarr(Box<ZarrReader>),
}

macro_rules! each {
    ($self:ident, $r:ident => $e:expr) => {
        match $self {
            AnnDataReader::H5ad($r) => $e,
            AnnDataReader::Zarr($r) => $e,
        }
    };
}

impl AnnDataReader {
    /// Opens `path` (a zarr store if it is a directory with zarr metadata, else an `.h5ad`
    /// file) and the matrix `source`, checking first that reading it reads nothing but the
    /// input (see [`ExternalData`](crate::h5ad::ExternalData)).
    pub fn open(path: &Path, source: MatrixSource<'_>, policy: impl Into<InputPolicy>) -> Result<AnnDataReader> {
        let policy = policy.into();
        match is_zarr(path) {
            true => ZarrReader::open_matrix_with(path, source, policy).map(|r| AnnDataReader::Zarr(Box::new(r))),
            false => {
                H5adReader::open_matrix_with(path, source, policy.external).map(|r| AnnDataReader::H5ad(Box::new(r)))
            }
        }
    }

    /// Arrays of a zarr store that lack chunks (read as their fill value), one line each; none
    /// for an `.h5ad` file.
    pub fn missing_chunks(&self) -> Vec<String> {
        match self {
            AnnDataReader::H5ad(_) => Vec::new(),
            AnnDataReader::Zarr(r) => r.missing_chunks(),
        }
    }

    /// The file or store.
    pub fn path(&self) -> &Path {
        each!(self, r => r.path())
    }

    /// The other matrices of the file, as the import flags that pick them.
    pub fn other_matrices(&self) -> Vec<String> {
        each!(self, r => r.other_matrices())
    }

    /// The matrix read, as its path in the file (`X`, `layers/counts`, `raw/X`).
    pub fn element(&self) -> &str {
        each!(self, r => r.element())
    }

    /// Cells.
    pub fn n_obs(&self) -> u64 {
        each!(self, r => r.n_obs())
    }

    /// Genes.
    pub fn n_vars(&self) -> u64 {
        each!(self, r => r.n_vars())
    }

    /// The matrix, read by row or column ranges.
    pub fn matrix(&self) -> &StoredMatrix {
        each!(self, r => r.matrix())
    }

    /// The matrix's layout.
    pub fn layout(&self) -> MatrixLayout {
        self.matrix().layout()
    }

    /// Stored entries of the sparse matrix (for dense: the number of elements).
    pub fn stored_entries(&self) -> u64 {
        self.matrix().stored_entries()
    }

    /// The Arrow schema `obs` becomes.
    pub fn obs_schema(&self) -> SchemaRef {
        each!(self, r => r.obs_schema())
    }

    /// `obs` rows `rows`.
    pub fn read_obs(&self, rows: Range<u64>) -> Result<RecordBatch> {
        each!(self, r => r.read_obs(rows))
    }

    /// The whole `var` table.
    pub fn read_var(&self) -> Result<RecordBatch> {
        each!(self, r => r.read_var())
    }

    /// The end of the longest run of lines from `start` (at most `max_lines`) whose entries
    /// number at most `max_entries` (see [`StoredMatrix::lines_within`]).
    pub fn lines_within(&self, start: u64, max_lines: u64, max_entries: u64) -> Result<u64> {
        self.matrix().lines_within(start, max_lines, max_entries)
    }

    /// Appends rows `rows` of a CSR or dense matrix to `out`.
    pub fn read_rows(&self, rows: Range<u64>, out: &mut CsrBatch) -> Result<()> {
        self.matrix().read_rows(rows, out)
    }

    /// For a CSC matrix: columns `cols` as (column offsets, row indices, values).
    pub fn read_columns(&self, cols: Range<u64>) -> Result<(Vec<u64>, Vec<u64>, Vec<f32>)> {
        self.matrix().read_columns(cols)
    }

    /// DEG lists from `uns` (see [`H5adReader::read_degs`]).
    pub fn read_degs(&self, key: Option<&str>) -> Result<Option<(String, RecordBatch)>> {
        each!(self, r => r.read_degs(key))
    }
}
