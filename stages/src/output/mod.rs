//! The one rule for every output (stores, `.h5ad` and Parquet files, run and evaluation
//! directories): written under a temporary sibling name, then published by one rename, so that
//! an output appears complete or not at all; an existing output is replaced only when asked
//! (`--overwrite`), never when it is not a regular file (or, for directory outputs, a
//! directory); `-` (stdout) is refused, since these outputs are files, not streams; one
//! command writes an output at a time (the `lock` module); and temporaries left by killed runs of the
//! same output are removed by the next writer, under the lock.

mod lock;

pub use lock::{NO_LOCKS_VAR, OutputLock, Wait, lock_output, lock_path};

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// What an output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// One file (Parquet, `.h5ad`).
    File,
    /// A directory (a store, a run, an evaluation).
    Directory,
}

impl OutputKind {
    fn noun(self) -> &'static str {
        match self {
            OutputKind::File => "a regular file",
            OutputKind::Directory => "a directory",
        }
    }
}

/// Claims output `dest` for this command: takes its lock ([`lock_output`], refused while
/// another command writes it), checks that it may be written ([`check_destination`]) and removes
/// the temporaries of `dest` that earlier, killed writers left (any writer's, on any node: the
/// lock proves they are gone). Keep the lock until the output is published.
pub fn claim_output(dest: &Path, kind: OutputKind, overwrite: bool) -> Result<OutputLock> {
    check_name(dest)?;
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match kind {
        // A directory output makes its parents, as `mkdir -p` would.
        OutputKind::Directory => fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?,
        OutputKind::File if !parent.is_dir() => {
            return Err(Error::InvalidInput(format!("{}: no such directory", parent.display())));
        }
        OutputKind::File => {}
    }
    let lock = lock_output(dest, Wait::No)?;
    check_destination(dest, kind, overwrite)?;
    remove_stale_temporaries(dest);
    Ok(lock)
}

fn check_name(dest: &Path) -> Result<()> {
    if dest.as_os_str() == "-" {
        return Err(Error::InvalidInput(
            "-: this output is written as a file and published whole when complete, so it cannot go to standard \
             output; give a path"
                .to_owned(),
        ));
    }
    if dest.file_name().is_none() {
        return Err(Error::InvalidInput(format!("{}: not a file or directory name", dest.display())));
    }
    Ok(())
}

/// Checks that `dest` may be written: not `-`, and, if it exists, of the output's kind (a
/// symbolic link, device or FIFO is never replaced) and `overwrite` given. Takes no lock (see
/// [`claim_output`]).
pub fn check_destination(dest: &Path, kind: OutputKind, overwrite: bool) -> Result<()> {
    check_name(dest)?;
    match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(dest, e)),
        Ok(meta) => {
            let t = meta.file_type();
            let right = match kind {
                OutputKind::File => t.is_file(),
                OutputKind::Directory => t.is_dir(),
            };
            if !right {
                let what = if t.is_symlink() {
                    "a symbolic link"
                } else if t.is_dir() {
                    "a directory"
                } else if t.is_file() {
                    "a regular file"
                } else {
                    "a device, socket or FIFO"
                };
                return Err(Error::InvalidInput(format!(
                    "{}: is {what}, and this output is {}; it is never replaced (choose another path)",
                    dest.display(),
                    kind.noun()
                )));
            }
            // An empty directory is as good as none (`mkdir out` first is fine).
            let empty_dir = t.is_dir() && fs::read_dir(dest).is_ok_and(|mut d| d.next().is_none());
            if !overwrite && !empty_dir {
                return Err(Error::OutputExists { path: dest.to_owned() });
            }
        }
    }
    Ok(())
}

/// Refuses an output that would replace an input of the same command: `dest` exists and is one
/// of `inputs`, holds one (a directory output over the input store), or lies inside one (a
/// Parquet file over a store's `obs.parquet`, predictions over a model's weights). A new path
/// inside an input directory replaces nothing and is allowed; paths are compared after
/// resolving links.
pub fn check_not_an_input<P: AsRef<Path>>(dest: &Path, inputs: impl IntoIterator<Item = P>) -> Result<()> {
    // An output that does not exist yet replaces nothing.
    let Ok(resolved) = fs::canonicalize(dest) else { return Ok(()) };
    for input in inputs {
        let input = input.as_ref();
        let Ok(resolved_input) = fs::canonicalize(input) else { continue };
        let relation = if resolved_input == resolved {
            "is"
        } else if resolved_input.starts_with(&resolved) {
            "holds"
        } else if resolved.starts_with(&resolved_input) {
            "lies inside"
        } else {
            continue;
        };
        return Err(Error::InvalidInput(format!(
            "{}: {relation} {}, an input of this command; an output never replaces what the command reads \
             (choose another path)",
            dest.display(),
            input.display()
        )));
    }
    Ok(())
}

/// An existing directory output may be replaced (`--overwrite`) only when it holds nothing but
/// what the command itself writes: entries for which `ours(name, type)` is true, and the
/// temporaries (`.NAME.tmp-*`, `.NAME.old-*`) and lock files (`.NAME.lock`) of such names,
/// which killed runs leave. `what` names the output ("a directory of prediction parts"). So
/// `--overwrite` never deletes a user's other files, a model or a store.
pub fn check_replaceable(dir: &Path, what: &str, ours: impl Fn(&str, fs::FileType) -> bool) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut foreign = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
        let decorated = name.strip_prefix('.').and_then(|rest| {
            rest.strip_suffix(".lock")
                .or_else(|| rest.rfind(".tmp-").or_else(|| rest.rfind(".old-")).map(|at| &rest[..at]))
        });
        let is_ours = match decorated {
            Some(base) => !base.is_empty() && ours(base, kind),
            None => ours(&name, kind),
        };
        if !is_ours {
            foreign.push(name);
        }
    }
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    let shown = foreign.iter().take(6).map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
    let more = if foreign.len() > 6 { format!(" and {} more", foreign.len() - 6) } else { String::new() };
    Err(Error::InvalidInput(format!(
        "{}: holds files that are not part of {what} ({shown}{more}); --overwrite replaces only {what} (choose \
         another path, or remove the directory yourself)",
        dir.display()
    )))
}

/// A temporary sibling of `dest` in its directory (same file system, so the publishing rename is
/// atomic): `.NAME.tmp-PID-NANOS`.
pub fn temporary_sibling(dest: &Path) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("{}: not a file or directory name", dest.display())))?;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}-{nanos}", std::process::id()));
    Ok(dest.with_file_name(tmp_name))
}

/// Moves the finished `tmp` to `dest`. Without `overwrite` the rename fails if `dest` appeared
/// meanwhile (another run publishing the same output): exactly one of two racing runs
/// succeeds. With it, an existing `dest` of the same kind is replaced (a directory moved aside
/// first, then removed).
pub fn publish(tmp: &Path, dest: &Path, kind: OutputKind, overwrite: bool) -> Result<()> {
    if !overwrite {
        if kind == OutputKind::Directory {
            // Only succeeds on an empty directory, which the output may take the place of.
            let _ = fs::remove_dir(dest);
        }
        rename_no_replace(tmp, dest)?;
    } else {
        check_destination(dest, kind, true)?;
        match kind {
            OutputKind::File => fs::rename(tmp, dest).map_err(|e| Error::io(dest, e))?,
            // The new directory and the old one trade places in one step, so that a kill at any
            // moment leaves one of them at `dest` (a store appended to is never absent); the old
            // one, now at `tmp`, goes after.
            OutputKind::Directory if dest.exists() => match renameat2(tmp, dest, libc::RENAME_EXCHANGE)? {
                Ok(()) => fs::remove_dir_all(tmp).map_err(|e| Error::io(tmp, e))?,
                // File systems without RENAME_EXCHANGE: the old one aside, then the new in place.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                    let trash = temporary_sibling(dest)?;
                    fs::rename(dest, &trash).map_err(|e| Error::io(dest, e))?;
                    fs::rename(tmp, dest).map_err(|e| Error::io(dest, e))?;
                    fs::remove_dir_all(&trash).map_err(|e| Error::io(&trash, e))?;
                }
                Err(e) => return Err(Error::io(dest, e)),
            },
            OutputKind::Directory => fs::rename(tmp, dest).map_err(|e| Error::io(dest, e))?,
        }
    }
    sync_parent(dest);
    Ok(())
}

/// `renameat2(2)` with `flags` (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`): the OS error as it is.
pub(crate) fn renameat2(
    from: &Path,
    to: &Path,
    flags: libc::c_uint,
) -> Result<std::result::Result<(), std::io::Error>> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidInput(format!("{}: a NUL byte in the path", p.display())))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths that live across the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) };
    Ok(if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) })
}

fn rename_no_replace(tmp: &Path, dest: &Path) -> Result<()> {
    let Err(e) = renameat2(tmp, dest, libc::RENAME_NOREPLACE)? else { return Ok(()) };
    match e.raw_os_error() {
        Some(libc::EEXIST) => Err(Error::OutputExists { path: dest.to_owned() }),
        // File systems without RENAME_NOREPLACE: check, then rename (a narrow race remains).
        Some(libc::EINVAL | libc::ENOSYS) => {
            if fs::symlink_metadata(dest).is_ok() {
                return Err(Error::OutputExists { path: dest.to_owned() });
            }
            fs::rename(tmp, dest).map_err(|e| Error::io(dest, e))
        }
        _ => Err(Error::io(dest, e)),
    }
}

/// Makes a rename in `path`'s directory durable; a failure only weakens crash safety.
pub fn sync_parent(path: &Path) {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(dir) = fs::File::open(parent) {
        let _ = dir.sync_all();
    }
}

/// Removes the temporaries of `dest` in its directory: `.NAME.tmp-*` (outputs being written and
/// outputs moved aside) and `.NAME.import-*` (an import's scratch: transposition buckets, cell ids, cells before a shuffle), `.NAME.shuffle-*` (a shuffle's buckets), but this
/// process's own. Call it only while holding `dest`'s lock ([`claim_output`]): every writer of
/// `dest` holds it while its temporaries exist, so the others' are dead. Best effort: what cannot
/// be removed stays.
pub fn remove_stale_temporaries(dest: &Path) {
    let (Some(name), Some(parent)) = (dest.file_name(), dest.parent()) else { return };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    // Compared as bytes: a name need not be UTF-8.
    use std::os::unix::ffi::OsStrExt;
    let prefixes = [".tmp-", ".import-", ".shuffle-"].map(|kind| [b".", name.as_bytes(), kind.as_bytes()].concat());
    let Ok(entries) = fs::read_dir(parent) else { return };
    let own = format!("{}", std::process::id());
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let bytes = file_name.as_bytes();
        let Some(rest) = prefixes.iter().find_map(|p| bytes.strip_prefix(p.as_slice())) else { continue };
        if rest.split(|&b| b == b'-').next() == Some(own.as_bytes()) {
            continue;
        }
        let path = entry.path();
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_follow_one_rule() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let file = dir.path().join("out.parquet");
        check_destination(&file, OutputKind::File, false)?;
        fs::write(&file, b"x").map_err(|e| Error::io(&file, e))?;
        assert!(matches!(check_destination(&file, OutputKind::File, false), Err(Error::OutputExists { .. })));
        check_destination(&file, OutputKind::File, true)?;
        let err = check_destination(&file, OutputKind::Directory, true).unwrap_err().to_string();
        assert!(err.contains("is a regular file, and this output is a directory"), "{err}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/null", &link).map_err(|e| Error::io(&link, e))?;
        let err = check_destination(&link, OutputKind::File, true).unwrap_err().to_string();
        assert!(err.contains("is a symbolic link"), "{err}");
        let err = check_destination(Path::new("/dev/null"), OutputKind::File, true).unwrap_err().to_string();
        assert!(err.contains("is a device, socket or FIFO"), "{err}");
        let err = check_destination(Path::new("-"), OutputKind::File, true).unwrap_err().to_string();
        assert!(err.contains("cannot go to standard output"), "{err}");
        Ok(())
    }

    #[test]
    fn publishing_never_replaces_unless_asked_and_stale_temporaries_go() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let dest = dir.path().join("out.h5ad");
        let write = |p: &Path, b: &[u8]| fs::write(p, b).map_err(|e| Error::io(p, e));
        let (a, b) = (temporary_sibling(&dest)?, dir.path().join(".out.h5ad.tmp-1-2"));
        write(&a, b"first")?;
        write(&b, b"second")?;
        publish(&a, &dest, OutputKind::File, false)?;
        assert!(matches!(publish(&b, &dest, OutputKind::File, false), Err(Error::OutputExists { .. })));
        assert_eq!(fs::read(&dest).map_err(|e| Error::io(&dest, e))?, b"first");
        // Under the lock, another writer's temporaries are dead whatever their process id says
        // (pid 1 lives here, but a process on another node wrote it); this process's own stay.
        let stale = dir.path().join(".out.h5ad.tmp-1-5");
        fs::rename(&b, &stale).map_err(|e| Error::io(&b, e))?;
        let buckets = dir.path().join(".out.h5ad.import-1");
        fs::create_dir(&buckets).map_err(|e| Error::io(&buckets, e))?;
        let live = dir.path().join(format!(".out.h5ad.tmp-{}-6", std::process::id()));
        write(&live, b"mine")?;
        let lock = claim_output(&dest, OutputKind::File, true)?;
        assert!(!stale.exists() && !buckets.exists() && live.exists());
        drop(lock);
        // Directories: replaced whole when asked.
        let store = dir.path().join("s.store");
        let t = temporary_sibling(&store)?;
        fs::create_dir_all(t.join("X")).map_err(|e| Error::io(&t, e))?;
        publish(&t, &store, OutputKind::Directory, false)?;
        let t = temporary_sibling(&store)?;
        fs::create_dir_all(&t).map_err(|e| Error::io(&t, e))?;
        assert!(matches!(publish(&t, &store, OutputKind::Directory, false), Err(Error::OutputExists { .. })));
        publish(&t, &store, OutputKind::Directory, true)?;
        assert!(!store.join("X").exists(), "the old directory was replaced");
        Ok(())
    }
}
