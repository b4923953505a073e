//! What an untrusted `.h5ad` may make the HDF5 library do, checked before anything is read.
//!
//! HDF5 can read from outside the file it opened: a dataset's raw data may live in other files
//! (external storage, `H5Pset_external`), a link may lead into another file (an external link),
//! and a virtual dataset (VDS) maps other files' datasets. Reading any of them reads files the
//! user never named (a secret as cell ids), or blocks for ever on a FIFO. A dataset may need a
//! filter that the library would look for as a plugin (a `dlopen` of a library from a default
//! directory). A dataset may also declare far more data than the file holds (unallocated
//! chunks read as fill values), so that sizes taken from it exhaust memory or time.
//!
//! [`check_file`] walks every link of the file before any element is read and refuses each of
//! these with an error naming the object and the kind. With [`ExternalData::SameDirectory`] (a
//! trusted collection, `import --allow-external`) external references are followed only when
//! every file HDF5 could resolve them to is a regular file inside the file's own directory, and
//! the files they lead to are checked the same way. Plugin loading is switched off for the
//! whole process ([`disable_plugins`]): only the filters built in (gzip, lzf, shuffle,
//! fletcher32, n-bit, scale-offset) are used.

use std::collections::HashSet;
use std::ffi::{CStr, CString, c_char, c_uint};
use std::path::{Component, Path, PathBuf};
use std::sync::Once;

use hdf5::{Dataset, File, Group, LinkType, LocationType};
use hdf5_sys::h5d::{H5D_layout_t, H5Dget_create_plist, H5Dget_storage_size};
use hdf5_sys::h5i::hid_t;
use hdf5_sys::h5l::{H5L_info2_t, H5Lget_info2, H5Lget_val, H5Lunpack_elink_val};
use hdf5_sys::h5p::{
    H5P_DEFAULT, H5Pclose, H5Pget_external, H5Pget_external_count, H5Pget_filter2, H5Pget_layout, H5Pget_nfilters,
    H5Pget_virtual_count, H5Pget_virtual_dsetname, H5Pget_virtual_filename,
};
use hdf5_sys::h5z::H5Zfilter_avail;

use crate::error::{Error, Result};

/// Whether an `.h5ad` may read data from other files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExternalData {
    /// Read nothing but the named file: external storage, external links and virtual datasets
    /// are errors (the default: the file is untrusted).
    #[default]
    Refuse,
    /// A trusted collection: follow them when every file they can resolve to is a regular file
    /// in the file's own directory (and check those files the same way).
    SameDirectory,
}

/// What reading an input may trust beyond its own bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputPolicy {
    /// Whether it may read data from other files (see [`ExternalData`]).
    pub external: ExternalData,
    /// Whether a zarr store's sparse matrix may lack chunks (read as the fill value: zeros for
    /// the values, column 0 for the indices). A store that lacks them is refused without it:
    /// zarr leaves out only chunks of the fill value, which a matrix's indices and values hardly
    /// ever are, so a missing one is a damaged or partial copy.
    pub allow_missing_chunks: bool,
}

impl From<ExternalData> for InputPolicy {
    fn from(external: ExternalData) -> Self {
        InputPolicy { external, allow_missing_chunks: false }
    }
}

/// Links visited at most (an anndata file has hundreds to a few thousand).
const MAX_LINKS: usize = 1_000_000;
/// How deep external links and virtual datasets may lead from file to file.
const MAX_FILE_DEPTH: usize = 4;
/// A dataset declaring more than this many bytes must store at least 1/[`MAX_DECLARED_RATIO`]
/// of them: gzip, the strongest built-in filter on uniform data, stays below 1,032:1.
const DECLARED_BYTES_CHECKED: u64 = 64 << 20;
const MAX_DECLARED_RATIO: u64 = 2048;
/// Longest external file name read (HDF5 keeps names whole; longer ones are refused).
const NAME_BUFFER: usize = 4096;

/// Switches off HDF5's filter plugins (searched in `HDF5_PLUGIN_PATH` or a default directory
/// and loaded with `dlopen` when a dataset names a filter that is not built in). Once per
/// process; this library's HDF5 is its own copy (statically linked), so no other user of HDF5
/// in the process (h5py) is affected.
pub fn disable_plugins() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        hdf5::sync::sync(|| {
            let mut none: std::ffi::c_int = 0;
            // SAFETY: a plain library call with a pointer to a live integer.
            unsafe { hdf5_sys::h5pl::H5PLset_loading_state(&mut none) };
        });
    });
}

/// Checks every link and dataset of `file` (at `path`) against `policy`, before any of its
/// data is read.
pub(crate) fn check_file(path: &Path, file: &File, policy: ExternalData) -> Result<()> {
    disable_plugins();
    let _watch = super::watchdog::guard(|| format!("{}: checking its links and datasets", path.display()));
    let mut visited = Visited::default();
    check_tree(path, file, policy, 0, &mut visited)
}

#[derive(Default)]
struct Visited {
    /// Groups already walked, by file and object address (hard links may form cycles).
    groups: HashSet<String>,
    /// Files already checked (external targets).
    files: HashSet<PathBuf>,
    links: usize,
}

fn refuse(path: &Path, object: &str, kind: &str, policy: ExternalData) -> Error {
    let hint = match policy {
        ExternalData::Refuse => {
            "; an untrusted file is read alone: for a trusted collection whose files sit in one folder, \
             --allow-external (Python: allow_external=True) reads such data from that folder"
        }
        ExternalData::SameDirectory => "",
    };
    Error::Unsupported { path: path.to_owned(), reason: format!("{object}: {kind}{hint}") }
}

fn check_tree(path: &Path, file: &File, policy: ExternalData, depth: usize, visited: &mut Visited) -> Result<()> {
    let mut stack: Vec<String> = vec!["/".to_owned()];
    while let Some(group_name) = stack.pop() {
        let group = file.group(&group_name).map_err(Error::hdf5(path, group_name.clone()))?;
        let mut links: Vec<(String, LinkType)> = Vec::new();
        group
            .iter_visit_default(|name, info| {
                links.push((name.to_owned(), info.link_type));
                Ok(())
            })
            .map_err(Error::hdf5(path, format!("{group_name}: listing its members")))?;
        visited.links += links.len();
        if visited.links > MAX_LINKS {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: format!("more than {MAX_LINKS} links (or a cycle of hard links); not an AnnData file"),
            });
        }
        for (name, kind) in links {
            let full = if group_name == "/" { format!("/{name}") } else { format!("{group_name}/{name}") };
            match kind {
                // A name inside this file: its target is reached through its own hard link.
                LinkType::Soft => {}
                LinkType::External => {
                    let (target, object) = external_link(path, &group, &name, &full)?;
                    if policy == ExternalData::Refuse {
                        let what = format!("an external link to {object:?} in file {target:?}");
                        return Err(refuse(path, &full, &what, policy));
                    }
                    let resolved = resolve_in_directory(path, &full, "external link", &target, Lookup::Link)?;
                    check_external_file(&resolved, policy, depth, visited)?;
                }
                LinkType::Hard => {
                    let info = group.loc_info_by_name(&name).map_err(Error::hdf5(path, full.clone()))?;
                    match info.loc_type {
                        LocationType::Group
                            if visited.groups.insert(format!("{}:{:?}", path.display(), info.token)) =>
                        {
                            stack.push(full);
                        }
                        LocationType::Dataset => {
                            let ds = group.dataset(&name).map_err(Error::hdf5(path, full.clone()))?;
                            check_dataset(path, &ds, &full, policy, depth, visited)?;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    Ok(())
}

/// Opens and checks a file that an external link or a virtual dataset leads to.
fn check_external_file(target: &Path, policy: ExternalData, depth: usize, visited: &mut Visited) -> Result<()> {
    if depth + 1 > MAX_FILE_DEPTH {
        return Err(Error::Unsupported {
            path: target.to_owned(),
            reason: format!("external references lead more than {MAX_FILE_DEPTH} files deep"),
        });
    }
    if !visited.files.insert(target.to_owned()) {
        return Ok(());
    }
    let file = File::open(target).map_err(Error::hdf5(target, "opening (the target of an external reference)"))?;
    check_tree(target, &file, policy, depth + 1, visited)
}

/// The file and object an external link names.
fn external_link(path: &Path, group: &Group, name: &str, full: &str) -> Result<(String, String)> {
    let c_name = CString::new(name).map_err(|_| Error::corrupt(path, format!("{full}: a NUL in a link name")))?;
    hdf5::sync::sync(|| {
        // SAFETY: `info` is a plain C struct filled by the call; the buffer holds `val_size`
        // bytes, as H5Lget_val is told; the unpacked pointers point into that buffer, which
        // outlives their use (copied into owned strings before it drops).
        unsafe {
            let mut info: H5L_info2_t = std::mem::zeroed();
            if H5Lget_info2(group.id(), c_name.as_ptr(), &mut info, H5P_DEFAULT) < 0 {
                return Err(Error::corrupt(path, format!("{full}: an external link that cannot be read")));
            }
            let size = *info.u.val_size();
            if size == 0 || size > 1 << 20 {
                return Err(Error::corrupt(path, format!("{full}: an external link of {size} bytes")));
            }
            let mut buffer = vec![0u8; size];
            if H5Lget_val(group.id(), c_name.as_ptr(), buffer.as_mut_ptr().cast(), size, H5P_DEFAULT) < 0 {
                return Err(Error::corrupt(path, format!("{full}: an external link that cannot be read")));
            }
            let (mut flags, mut file, mut object): (c_uint, *const c_char, *const c_char) =
                (0, std::ptr::null(), std::ptr::null());
            if H5Lunpack_elink_val(buffer.as_ptr().cast(), size, &mut flags, &mut file, &mut object) < 0
                || file.is_null()
                || object.is_null()
            {
                return Err(Error::corrupt(path, format!("{full}: an external link that cannot be read")));
            }
            let text = |p: *const c_char| CStr::from_ptr(p).to_string_lossy().into_owned();
            Ok((text(file), text(object)))
        }
    })
}

/// A dataset's creation properties, closed when dropped.
struct Plist(hid_t);

impl Drop for Plist {
    fn drop(&mut self) {
        // SAFETY: a property list identifier returned by H5Dget_create_plist, closed once.
        unsafe { H5Pclose(self.0) };
    }
}

/// What a dataset's creation properties say about where its data comes from.
struct Storage {
    layout: H5D_layout_t,
    /// External storage file names.
    external: Vec<String>,
    /// Virtual dataset sources: (file, dataset).
    sources: Vec<(String, String)>,
    /// Filter ids that are not available.
    missing_filters: Vec<i32>,
    /// Bytes allocated in the file.
    stored: u64,
}

fn storage(path: &Path, ds: &Dataset, full: &str) -> Result<Storage> {
    let bad = |what: &str| Error::corrupt(path, format!("{full}: {what}"));
    hdf5::sync::sync(|| {
        // SAFETY: every identifier is checked before use and the property list is closed by
        // `Plist`; name buffers are NAME_BUFFER bytes as the calls are told, NUL-terminated by
        // HDF5 (a name that fills the buffer is refused as too long).
        unsafe {
            let plist = Plist(H5Dget_create_plist(ds.id()));
            if plist.0 < 0 {
                return Err(bad("its creation properties cannot be read"));
            }
            let layout = H5Pget_layout(plist.0);
            let mut name = vec![0 as c_char; NAME_BUFFER];
            let read_name = |name: &[c_char]| -> Result<String> {
                if name[NAME_BUFFER - 2] != 0 {
                    return Err(bad("an external file name longer than 4,094 bytes"));
                }
                Ok(CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned())
            };
            let mut external = Vec::new();
            let count = H5Pget_external_count(plist.0);
            for i in 0..count.max(0) {
                name.fill(0);
                let (mut offset, mut size) = (0, 0);
                if H5Pget_external(plist.0, i as c_uint, NAME_BUFFER, name.as_mut_ptr(), &mut offset, &mut size) < 0 {
                    return Err(bad("its external storage cannot be read"));
                }
                external.push(read_name(&name)?);
            }
            let mut sources = Vec::new();
            if layout == H5D_layout_t::H5D_VIRTUAL {
                let mut n = 0usize;
                if H5Pget_virtual_count(plist.0, &mut n) < 0 {
                    return Err(bad("its virtual mappings cannot be read"));
                }
                for i in 0..n {
                    name.fill(0);
                    if H5Pget_virtual_filename(plist.0, i, name.as_mut_ptr(), NAME_BUFFER) < 0 {
                        return Err(bad("its virtual mappings cannot be read"));
                    }
                    let file = read_name(&name)?;
                    name.fill(0);
                    if H5Pget_virtual_dsetname(plist.0, i, name.as_mut_ptr(), NAME_BUFFER) < 0 {
                        return Err(bad("its virtual mappings cannot be read"));
                    }
                    sources.push((file, read_name(&name)?));
                }
            }
            let mut missing_filters = Vec::new();
            for i in 0..H5Pget_nfilters(plist.0).max(0) {
                let (mut flags, mut n_values, mut config) = (0, 0usize, 0);
                let id = H5Pget_filter2(
                    plist.0,
                    i as c_uint,
                    &mut flags,
                    &mut n_values,
                    std::ptr::null_mut(),
                    0,
                    std::ptr::null_mut(),
                    &mut config,
                );
                if id < 0 {
                    return Err(bad("its filter pipeline cannot be read"));
                }
                if H5Zfilter_avail(id) <= 0 {
                    missing_filters.push(id);
                }
            }
            let stored = H5Dget_storage_size(ds.id());
            Ok(Storage { layout, external, sources, missing_filters, stored })
        }
    })
}

/// Known names of filter ids (the HDF Group's registry), for messages.
fn filter_name(id: i32) -> &'static str {
    match id {
        1 => "gzip",
        2 => "shuffle",
        3 => "fletcher32",
        4 => "szip",
        5 => "n-bit",
        6 => "scale-offset",
        307 => "bzip2",
        32000 => "lzf",
        32001 => "blosc",
        32004 => "lz4",
        32008 => "bitshuffle",
        32013 => "zfp",
        32015 => "zstd",
        32026 => "blosc2",
        _ => "unregistered here",
    }
}

fn check_dataset(
    path: &Path,
    ds: &Dataset,
    full: &str,
    policy: ExternalData,
    depth: usize,
    visited: &mut Visited,
) -> Result<()> {
    let s = storage(path, ds, full)?;
    if let Some(&id) = s.missing_filters.first() {
        return Err(Error::Unsupported {
            path: path.to_owned(),
            reason: format!(
                "{full}: compressed with HDF5 filter {id} ({}), which this build does not include (filters \
                 built in: gzip, lzf, shuffle, fletcher32, n-bit, scale-offset; plugins are never loaded for a \
                 file being imported). Rewrite the file with a built-in filter, e.g. anndata's \
                 write_h5ad(compression=\"gzip\") or `h5repack -f GZIP=4`",
                filter_name(id)
            ),
        });
    }
    if !s.external.is_empty() {
        if policy == ExternalData::Refuse {
            let what = format!("external storage: its values are read from file {:?}", s.external[0]);
            return Err(refuse(path, full, &what, policy));
        }
        for name in &s.external {
            resolve_in_directory(path, full, "external storage", name, Lookup::Storage)?;
        }
    }
    if s.layout == H5D_layout_t::H5D_VIRTUAL {
        if policy == ExternalData::Refuse {
            let first = s.sources.first().map(|(f, d)| format!("{d:?} in file {f:?}")).unwrap_or_default();
            let what = format!("a virtual dataset: its values come from {first}");
            return Err(refuse(path, full, &what, policy));
        }
        for (file, _) in &s.sources {
            // "." is the file itself.
            if file != "." {
                let resolved = resolve_in_directory(path, full, "virtual dataset source", file, Lookup::Virtual)?;
                check_external_file(&resolved, policy, depth, visited)?;
            }
        }
    }
    let declared = (ds.size() as u64).saturating_mul(ds.dtype().map(|t| t.size() as u64).unwrap_or(1));
    if s.layout != H5D_layout_t::H5D_VIRTUAL
        && s.external.is_empty()
        && declared > DECLARED_BYTES_CHECKED
        && s.stored.saturating_mul(MAX_DECLARED_RATIO) < declared
    {
        return Err(Error::corrupt(
            path,
            format!(
                "{full}: declares {} elements ({declared} bytes) but the file stores {} bytes of them (chunks \
                 missing: a damaged or crafted file)",
                ds.size(),
                s.stored
            ),
        ));
    }
    Ok(())
}

/// How HDF5 looks up a file named by an external reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// External storage: the `HDF5_EXTFILE_PREFIX` prefix (`${ORIGIN}` the file's directory),
    /// else the working directory.
    Storage,
    /// External links: as given if absolute, then `HDF5_EXT_PREFIX`, the file's directory, the
    /// working directory.
    Link,
    /// Virtual dataset sources: as links, with `HDF5_VDS_PREFIX`.
    Virtual,
}

/// The file an external reference `name` of `object` resolves to, allowed only when every file
/// HDF5 could open for it is a regular file inside `path`'s directory.
fn resolve_in_directory(path: &Path, object: &str, kind: &str, name: &str, lookup: Lookup) -> Result<PathBuf> {
    let own_dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let own_dir = own_dir.canonicalize().map_err(|e| Error::io(own_dir, e))?;
    let outside = |why: String| Error::Unsupported {
        path: path.to_owned(),
        reason: format!("{object}: {kind} {name:?} {why}; only regular files in {} are read", own_dir.display()),
    };
    let cwd = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    let expand = |prefix: &str| -> PathBuf {
        match prefix.strip_prefix("${ORIGIN}") {
            Some(rest) => PathBuf::from(format!("{}{rest}", own_dir.display())),
            None => PathBuf::from(prefix),
        }
    };
    let named = Path::new(name);
    let mut candidates: Vec<PathBuf> = Vec::new();
    let mut relative = named.to_owned();
    match lookup {
        Lookup::Storage => {
            let prefix = std::env::var("HDF5_EXTFILE_PREFIX").ok().filter(|p| !p.is_empty() && p != ".");
            candidates.push(match (&prefix, named.is_absolute()) {
                (_, true) => named.to_owned(),
                (Some(prefix), false) => expand(prefix).join(named),
                (None, false) => cwd.join(named),
            });
        }
        Lookup::Link | Lookup::Virtual => {
            if named.is_absolute() {
                candidates.push(named.to_owned());
                relative = named.file_name().map(PathBuf::from).unwrap_or_default();
            }
            let var = if lookup == Lookup::Link { "HDF5_EXT_PREFIX" } else { "HDF5_VDS_PREFIX" };
            if let Ok(list) = std::env::var(var) {
                candidates.extend(list.split(':').filter(|p| !p.is_empty()).map(|p| expand(p).join(&relative)));
            }
            candidates.push(own_dir.join(&relative));
            candidates.push(cwd.join(&relative));
        }
    }
    if relative.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(outside("climbs out of the folder (..)".to_owned()));
    }
    let mut chosen = None;
    for candidate in candidates {
        let Ok(meta) = std::fs::metadata(&candidate) else { continue };
        if !meta.is_file() {
            return Err(outside(format!("resolves to {}, which is not a regular file", candidate.display())));
        }
        let real = candidate.canonicalize().map_err(|e| Error::io(&candidate, e))?;
        if real.parent() != Some(own_dir.as_path()) {
            return Err(outside(format!("resolves to {}, outside the file's folder", real.display())));
        }
        chosen.get_or_insert(real);
    }
    chosen.ok_or_else(|| outside("names no file that exists".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_named_for_messages() {
        assert_eq!(filter_name(32008), "bitshuffle");
        assert_eq!(filter_name(4), "szip");
        assert_eq!(filter_name(65000), "unregistered here");
    }
}
