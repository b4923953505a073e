//! AnnData `.h5ad` files in and out of the store, in row chunks.
//!
//! An `.h5ad` is HDF5 with `encoding-type` attributes on every element (see
//! `../shared/reference/engineering-notes.md`): `X` (and each of `layers/*`) is a `csr_matrix` or
//! `csc_matrix` group (`data`, `indices`, `indptr`) or a dense 2-D dataset; `obs` and `var` are
//! `dataframe` groups whose columns are datasets (numeric, boolean, `string-array`) or groups
//! (`categorical`, `nullable-integer`, `nullable-boolean`, `nullable-string-array`).
//!
//! [`H5adReader`] reads row ranges of the matrix and of `obs` (HDF5 converts numeric types), so
//! memory depends on the chunk, not the file. CSC matrices are read by column ranges for the
//! out-of-core transposition done by the import pipeline. [`H5adWriter`] writes a CSR `.h5ad`
//! by appending row chunks to resizable datasets.
//!
//! HDF5 calls are serialised by a global lock in the bindings: use one reader thread.

mod audit;
mod dataframe;
mod reader;
mod records;
pub mod watchdog;
mod writer;

pub use crate::anndata::{MatrixLayout, MatrixSource};
pub use audit::{ExternalData, InputPolicy, disable_plugins};
pub(crate) use dataframe::{float_text, float_text_f32};
pub use reader::H5adReader;
pub use writer::{DEFAULT_GZIP_LEVEL, H5adCompression, H5adWriter};

pub use cpa_stream_schemas::tables::degs::{
    FILE as DEG_FILE, GENE as DEG_GENE, GROUP as DEG_GROUP, RANK as DEG_RANK, SCORE as DEG_SCORE,
};

/// The name to give the HDF5 library for `path`, which `opened` holds open: `path` itself, or,
/// when it is not UTF-8 (the library takes only UTF-8 names; a Linux path may hold any byte but
/// NUL), the process's link to the open file (`/proc/self/fd/N`), which opens the same file.
fn hdf5_name(path: &std::path::Path, opened: &std::fs::File) -> std::path::PathBuf {
    use std::os::unix::io::AsRawFd;
    match path.to_str() {
        Some(_) => path.to_owned(),
        None => std::path::PathBuf::from(format!("/proc/self/fd/{}", opened.as_raw_fd())),
    }
}
