//! One field of a 1-D compound ("rec-array") dataset, as anndata writes numpy record arrays
//! (scanpy's `uns/rank_genes_groups/names`, `scores`: one field per group).
//!
//! hdf5-metno reads compound data only into Rust types known at compile time; here the field
//! names are data. HDF5 itself reads a subset of a compound's members when the memory type
//! names them, so these functions build a one-member memory type and call `H5Dread` directly,
//! under the bindings' global lock.

use std::ffi::{CStr, CString, c_char};
use std::path::Path;

use hdf5::Dataset;
use hdf5_sys::h5d::H5Dread;
use hdf5_sys::h5p::H5P_DEFAULT;
use hdf5_sys::h5s::{H5S_ALL, H5Sclose};
use hdf5_sys::h5t::{
    H5T_C_S1, H5T_NATIVE_DOUBLE, H5T_VARIABLE, H5T_class_t, H5T_cset_t, H5Tclose, H5Tcopy, H5Tcreate, H5Tinsert,
    H5Treclaim, H5Tset_cset, H5Tset_size,
};

use crate::error::{Error, Result};

/// Closes an HDF5 identifier when dropped.
struct Id(hdf5_sys::h5i::hid_t, unsafe extern "C" fn(hdf5_sys::h5i::hid_t) -> hdf5_sys::h5::herr_t);

impl Drop for Id {
    fn drop(&mut self) {
        if self.0 >= 0 {
            // SAFETY: the identifier was returned by the matching HDF5 create/copy call and is
            // closed exactly once, here.
            unsafe { (self.1)(self.0) };
        }
    }
}

fn failed(path: &Path, ds: &Dataset, field: &str, what: &str) -> Error {
    Error::Unsupported { path: path.to_owned(), reason: format!("{}: field {field:?}: {what}", ds.name()) }
}

/// Field `field` of every record, as UTF-8 strings (variable-length string members).
pub(super) fn read_string_field(path: &Path, ds: &Dataset, field: &str) -> Result<Vec<String>> {
    let name = CString::new(field).map_err(|_| failed(path, ds, field, "name contains NUL"))?;
    let n = ds.size();
    hdf5::sync::sync(|| {
        // SAFETY: each call gets valid identifiers (checked >= 0 before use); the buffer holds
        // `n` pointer-sized slots, exactly the memory type's size times the dataset's element
        // count, which H5Dread fills with library-allocated strings that H5Treclaim frees after
        // they are copied out.
        unsafe {
            let string_type = Id(H5Tcopy(*H5T_C_S1), H5Tclose);
            if string_type.0 < 0
                || H5Tset_size(string_type.0, H5T_VARIABLE) < 0
                || H5Tset_cset(string_type.0, H5T_cset_t::H5T_CSET_UTF8) < 0
            {
                return Err(failed(path, ds, field, "cannot make a string type"));
            }
            let record = Id(H5Tcreate(H5T_class_t::H5T_COMPOUND, std::mem::size_of::<*mut c_char>()), H5Tclose);
            if record.0 < 0 || H5Tinsert(record.0, name.as_ptr(), 0, string_type.0) < 0 {
                return Err(failed(path, ds, field, "cannot make a record type"));
            }
            let mut buf: Vec<*mut c_char> = vec![std::ptr::null_mut(); n];
            if H5Dread(ds.id(), record.0, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.as_mut_ptr().cast()) < 0 {
                return Err(failed(path, ds, field, "not a string member of this record array"));
            }
            let out = buf
                .iter()
                .map(|&p| if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() })
                .collect();
            let space = Id(hdf5_sys::h5d::H5Dget_space(ds.id()), H5Sclose);
            if space.0 >= 0 {
                H5Treclaim(record.0, space.0, H5P_DEFAULT, buf.as_mut_ptr().cast());
            }
            Ok(out)
        }
    })
}

/// Field `field` of every record, converted to f64 (numeric members).
pub(super) fn read_number_field(path: &Path, ds: &Dataset, field: &str) -> Result<Vec<f64>> {
    let name = CString::new(field).map_err(|_| failed(path, ds, field, "name contains NUL"))?;
    let n = ds.size();
    hdf5::sync::sync(|| {
        // SAFETY: as above; the buffer holds `n` f64 slots, the one-member memory type's size
        // times the element count, and holds no library-allocated memory.
        unsafe {
            let record = Id(H5Tcreate(H5T_class_t::H5T_COMPOUND, std::mem::size_of::<f64>()), H5Tclose);
            if record.0 < 0 || H5Tinsert(record.0, name.as_ptr(), 0, *H5T_NATIVE_DOUBLE) < 0 {
                return Err(failed(path, ds, field, "cannot make a record type"));
            }
            let mut buf = vec![0f64; n];
            if H5Dread(ds.id(), record.0, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.as_mut_ptr().cast()) < 0 {
                return Err(failed(path, ds, field, "not a numeric member of this record array"));
            }
            Ok(buf)
        }
    })
}
