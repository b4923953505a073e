//! Values of 1-D datasets whose element type hdf5-metno reads only into types known at compile
//! time: one field of a compound ("record array") dataset, and fixed-length strings.
//!
//! Record arrays are how numpy record arrays reach HDF5: scanpy's `uns/rank_genes_groups/names`
//! and `scores` (one field per group), and the whole `obs` / `var` dataframes of files written by
//! anndata <= 0.6. Their field names are data, so these functions build the memory type at run
//! time: HDF5 reads a subset of a compound's members when the memory type names only those, and
//! converts each member to the native type asked for. Rows are read by hyperslab, so a column of
//! a large table is read range by range. All calls run under the bindings' global lock.

use std::ffi::{CStr, CString, c_char, c_void};
use std::ops::Range;
use std::path::Path;

use hdf5::Dataset;
use hdf5::types::TypeDescriptor;
use hdf5_sys::h5::hsize_t;
use hdf5_sys::h5d::{H5Dget_space, H5Dget_type, H5Dread};
use hdf5_sys::h5i::hid_t;
use hdf5_sys::h5p::H5P_DEFAULT;
use hdf5_sys::h5s::{H5S_seloper_t, H5Sclose, H5Screate_simple, H5Sselect_hyperslab};
use hdf5_sys::h5t::{
    H5T_C_S1, H5T_NATIVE_DOUBLE, H5T_NATIVE_INT64, H5T_NATIVE_UINT64, H5T_VARIABLE, H5T_class_t, H5T_cset_t,
    H5T_direction_t, H5T_str_t, H5Tclose, H5Tcopy, H5Tcreate, H5Tget_member_index, H5Tget_member_type,
    H5Tget_native_type, H5Tget_size, H5Tinsert, H5Treclaim, H5Tset_cset, H5Tset_size, H5Tset_strpad,
};

use crate::error::{Error, Result};

/// What one field (or a plain dataset's element) holds, as read here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scalar {
    /// Fixed-length strings of this many bytes (numpy `S` / `U` kinds as h5py stores them).
    FixedText {
        bytes: usize,
        utf8: bool,
    },
    /// Variable-length strings.
    VarText {
        utf8: bool,
    },
    Int,
    UInt,
    Float,
    /// numpy booleans, which h5py stores as an enum {FALSE: 0, TRUE: 1}.
    Bool,
}

impl Scalar {
    /// The kind of `desc`, or `None` for types this reader does not convert (arrays, nested
    /// records, references, other enums).
    pub(super) fn of(desc: &TypeDescriptor) -> Option<Scalar> {
        Some(match desc {
            TypeDescriptor::FixedAscii(n) => Scalar::FixedText { bytes: *n, utf8: false },
            TypeDescriptor::FixedUnicode(n) => Scalar::FixedText { bytes: *n, utf8: true },
            TypeDescriptor::VarLenAscii => Scalar::VarText { utf8: false },
            TypeDescriptor::VarLenUnicode => Scalar::VarText { utf8: true },
            TypeDescriptor::Integer(_) => Scalar::Int,
            TypeDescriptor::Unsigned(_) => Scalar::UInt,
            TypeDescriptor::Float(_) => Scalar::Float,
            TypeDescriptor::Boolean => Scalar::Bool,
            TypeDescriptor::Enum(e)
                if e.members.len() == 2 && e.members.iter().all(|m| m.name == "FALSE" || m.name == "TRUE") =>
            {
                Scalar::Bool
            }
            _ => return None,
        })
    }

    pub(super) fn is_text(self) -> bool {
        matches!(self, Scalar::FixedText { .. } | Scalar::VarText { .. })
    }
}

/// Values read from a field or dataset, converted to one Rust type per kind.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Values {
    Text(Vec<String>),
    Int(Vec<i64>),
    UInt(Vec<u64>),
    Float(Vec<f64>),
    Bool(Vec<bool>),
}

/// Closes an HDF5 identifier when dropped.
struct Id(hid_t, unsafe extern "C" fn(hid_t) -> hdf5_sys::h5::herr_t);

impl Drop for Id {
    fn drop(&mut self) {
        if self.0 >= 0 {
            // SAFETY: the identifier was returned by the matching HDF5 create/copy/get call and is
            // closed exactly once, here.
            unsafe { (self.1)(self.0) };
        }
    }
}

fn failed(path: &Path, ds: &Dataset, field: Option<&str>, what: &str) -> Error {
    let at = match field {
        Some(f) => format!("{}: field {f:?}", ds.name()),
        None => ds.name(),
    };
    Error::Unsupported { path: path.to_owned(), reason: format!("{at}: {what}") }
}

/// The fields of 1-D compound dataset `ds`, in order, with their kinds (`None`: not convertible).
pub(super) fn fields(path: &Path, ds: &Dataset) -> Result<Vec<(String, Option<Scalar>)>> {
    match ds.dtype().and_then(|t| t.to_descriptor()) {
        Ok(TypeDescriptor::Compound(record)) => {
            Ok(record.fields.iter().map(|f| (f.name.clone(), Scalar::of(&f.ty))).collect())
        }
        Ok(other) => Err(failed(path, ds, None, &format!("type {other}, expected a record array"))),
        Err(e) => Err(Error::hdf5(path, ds.name())(e)),
    }
}

/// The kind of `field` of compound `ds`, or of `ds`'s own elements when `field` is `None`.
fn kind_of(path: &Path, ds: &Dataset, field: Option<&str>) -> Result<Scalar> {
    let desc = ds.dtype().and_then(|t| t.to_descriptor()).map_err(Error::hdf5(path, ds.name()))?;
    let ty = match (field, &desc) {
        (None, _) => &desc,
        (Some(name), TypeDescriptor::Compound(record)) => match record.fields.iter().find(|f| f.name == name) {
            Some(f) => &f.ty,
            None => return Err(failed(path, ds, field, "no such field in this record array")),
        },
        (Some(_), other) => return Err(failed(path, ds, field, &format!("type {other}, expected a record array"))),
    };
    Scalar::of(ty).ok_or_else(|| failed(path, ds, field, &format!("values of type {ty} are not supported")))
}

/// Reads rows `rows` of `field` of 1-D compound dataset `ds` (or of `ds` itself when `field` is
/// `None`), converted per [`Scalar`] kind: integers to i64/u64, floats to f64, fixed-length
/// strings with their NUL padding removed.
pub(super) fn read(path: &Path, ds: &Dataset, field: Option<&str>, rows: Range<u64>) -> Result<Values> {
    let kind = kind_of(path, ds, field)?;
    if ds.ndim() != 1 {
        return Err(failed(path, ds, field, &format!("{}-dimensional, expected 1", ds.ndim())));
    }
    let size = ds.size() as u64;
    if rows.start > rows.end || rows.end > size {
        return Err(failed(path, ds, field, &format!("rows {}..{} outside its {size} rows", rows.start, rows.end)));
    }
    let n = (rows.end - rows.start) as usize;
    if n == 0 {
        return Ok(match kind {
            Scalar::FixedText { .. } | Scalar::VarText { .. } => Values::Text(Vec::new()),
            Scalar::Int => Values::Int(Vec::new()),
            Scalar::UInt => Values::UInt(Vec::new()),
            Scalar::Float => Values::Float(Vec::new()),
            Scalar::Bool => Values::Bool(Vec::new()),
        });
    }
    let name =
        field.map(|f| CString::new(f).map_err(|_| failed(path, ds, field, "field name contains NUL"))).transpose()?;
    hdf5::sync::sync(|| {
        // SAFETY: every identifier is checked >= 0 before use and closed by `Id`; the buffer
        // holds `n` elements of the memory type (`elem` bytes each, 8-byte aligned, which covers
        // the pointers of variable-length strings), exactly what H5Dread writes for a selection
        // of `n` rows; library-allocated strings are copied out before H5Treclaim frees them.
        unsafe {
            let err = |what: &str| failed(path, ds, field, what);
            let element = memory_type(ds, name.as_deref(), kind).ok_or_else(|| err("cannot make a memory type"))?;
            let elem = H5Tget_size(element.0);
            let mem_type = match &name {
                None => element,
                Some(name) => {
                    let record = Id(H5Tcreate(H5T_class_t::H5T_COMPOUND, elem), H5Tclose);
                    if record.0 < 0 || H5Tinsert(record.0, name.as_ptr(), 0, element.0) < 0 {
                        return Err(err("cannot make a record type"));
                    }
                    record
                }
            };
            let file_space = Id(H5Dget_space(ds.id()), H5Sclose);
            let (start, count) = ([rows.start as hsize_t], [n as hsize_t]);
            if file_space.0 < 0
                || H5Sselect_hyperslab(
                    file_space.0,
                    H5S_seloper_t::H5S_SELECT_SET,
                    start.as_ptr(),
                    std::ptr::null(),
                    count.as_ptr(),
                    std::ptr::null(),
                ) < 0
            {
                return Err(err("cannot select rows"));
            }
            let mem_space = Id(H5Screate_simple(1, count.as_ptr(), std::ptr::null()), H5Sclose);
            if mem_space.0 < 0 {
                return Err(err("cannot make a memory space"));
            }
            let mut buf = vec![0u64; (n * elem).div_ceil(8)];
            let out = buf.as_mut_ptr().cast::<c_void>();
            if H5Dread(ds.id(), mem_type.0, mem_space.0, file_space.0, H5P_DEFAULT, out) < 0 {
                return Err(err(&format!("cannot read rows {}..{} as {kind:?}", rows.start, rows.end)));
            }
            let bytes = std::slice::from_raw_parts(out.cast::<u8>(), n * elem);
            let values = decode(kind, bytes, elem, n);
            if matches!(kind, Scalar::VarText { .. }) {
                H5Treclaim(mem_type.0, mem_space.0, H5P_DEFAULT, out);
            }
            Ok(values)
        }
    })
}

/// The native memory type for one element of `kind`.
///
/// # Safety
/// Must run under the HDF5 lock with `ds` open.
unsafe fn memory_type(ds: &Dataset, field: Option<&CStr>, kind: Scalar) -> Option<Id> {
    // SAFETY: the caller holds the lock; every returned identifier is checked.
    unsafe {
        let id = match kind {
            Scalar::Int => H5Tcopy(*H5T_NATIVE_INT64),
            Scalar::UInt => H5Tcopy(*H5T_NATIVE_UINT64),
            Scalar::Float => H5Tcopy(*H5T_NATIVE_DOUBLE),
            Scalar::FixedText { bytes, utf8 } => return text_type(Some(bytes.max(1)), utf8),
            Scalar::VarText { utf8 } => return text_type(None, utf8),
            Scalar::Bool => {
                // Booleans: the file's own enum in native byte order (HDF5 converts enums by name).
                let file_type = Id(H5Dget_type(ds.id()), H5Tclose);
                if file_type.0 < 0 {
                    return None;
                }
                let member = match field {
                    Some(name) => {
                        let i = H5Tget_member_index(file_type.0, name.as_ptr());
                        if i < 0 {
                            return None;
                        }
                        Id(H5Tget_member_type(file_type.0, i as u32), H5Tclose)
                    }
                    None => Id(H5Tcopy(file_type.0), H5Tclose),
                };
                if member.0 < 0 {
                    return None;
                }
                H5Tget_native_type(member.0, H5T_direction_t::H5T_DIR_ASCEND)
            }
        };
        (id >= 0).then_some(Id(id, H5Tclose))
    }
}

/// A C string type: fixed-length (`bytes`, NUL-padded) or variable-length.
///
/// # Safety
/// Must run under the HDF5 lock.
unsafe fn text_type(bytes: Option<usize>, utf8: bool) -> Option<Id> {
    // SAFETY: the caller holds the lock; the copied type is checked before it is changed.
    unsafe {
        let t = Id(H5Tcopy(*H5T_C_S1), H5Tclose);
        let cset = if utf8 { H5T_cset_t::H5T_CSET_UTF8 } else { H5T_cset_t::H5T_CSET_ASCII };
        let ok = t.0 >= 0
            && H5Tset_size(t.0, bytes.unwrap_or(H5T_VARIABLE)) >= 0
            && H5Tset_cset(t.0, cset) >= 0
            && (bytes.is_none() || H5Tset_strpad(t.0, H5T_str_t::H5T_STR_NULLPAD) >= 0);
        ok.then_some(t)
    }
}

/// Converts `n` elements of `elem` bytes each, as H5Dread wrote them for `kind`.
///
/// # Safety
/// For variable-length strings, `bytes` must hold `n` pointers written by H5Dread (each null or
/// a NUL-terminated string), still allocated.
unsafe fn decode(kind: Scalar, bytes: &[u8], elem: usize, n: usize) -> Values {
    let words = || bytes.chunks_exact(8).map(|c| <[u8; 8]>::try_from(c).unwrap_or_default());
    match kind {
        Scalar::Int => Values::Int(words().map(i64::from_ne_bytes).collect()),
        Scalar::UInt => Values::UInt(words().map(u64::from_ne_bytes).collect()),
        Scalar::Float => Values::Float(words().map(f64::from_ne_bytes).collect()),
        Scalar::Bool => Values::Bool(bytes.chunks_exact(elem).map(|c| c.iter().any(|&b| b != 0)).collect()),
        Scalar::FixedText { .. } => Values::Text(
            bytes
                .chunks_exact(elem)
                .map(|c| {
                    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                    String::from_utf8_lossy(&c[..end]).into_owned()
                })
                .collect(),
        ),
        Scalar::VarText { .. } => Values::Text(
            words()
                .take(n)
                .map(|w| {
                    let p = usize::from_ne_bytes(w) as *const c_char;
                    if p.is_null() {
                        String::new()
                    } else {
                        // SAFETY: per the function's contract, a NUL-terminated string.
                        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
                    }
                })
                .collect(),
        ),
    }
}

/// Rows `rows` of a text field (or text dataset) as strings.
pub(super) fn read_text(path: &Path, ds: &Dataset, field: Option<&str>, rows: Range<u64>) -> Result<Vec<String>> {
    match read(path, ds, field, rows)? {
        Values::Text(v) => Ok(v),
        _ => Err(failed(path, ds, field, "not strings")),
    }
}

/// Rows `rows` of a numeric field as f64 (integers converted).
pub(super) fn read_f64(path: &Path, ds: &Dataset, field: Option<&str>, rows: Range<u64>) -> Result<Vec<f64>> {
    match read(path, ds, field, rows)? {
        Values::Float(v) => Ok(v),
        Values::Int(v) => Ok(v.into_iter().map(|x| x as f64).collect()),
        Values::UInt(v) => Ok(v.into_iter().map(|x| x as f64).collect()),
        _ => Err(failed(path, ds, field, "not numbers")),
    }
}

/// Field `field` of every record, as strings (scanpy's DEG names).
pub(super) fn read_string_field(path: &Path, ds: &Dataset, field: &str) -> Result<Vec<String>> {
    read_text(path, ds, Some(field), 0..ds.size() as u64)
}

/// Field `field` of every record, as f64 (scanpy's DEG scores).
pub(super) fn read_number_field(path: &Path, ds: &Dataset, field: &str) -> Result<Vec<f64>> {
    read_f64(path, ds, Some(field), 0..ds.size() as u64)
}
