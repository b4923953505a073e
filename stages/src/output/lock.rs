//! One writer per output: an exclusive lock held for the whole command that writes it.
//!
//! Two commands started on one output (two `train --out RUN`, a `train --resume` beside a running
//! training, two shards of a job array on shared files) would otherwise both write it and both
//! report success, each output file coming from either. A writer takes the lock of the output
//! before it checks or removes anything, and keeps it until it has published: the second gets
//! an error naming the holder's process and host.
//!
//! The lock is an exclusive `fcntl` lock on a sibling file `.NAME.lock` (an open file
//! description lock, `F_OFD_SETLK`, so that two threads of one process exclude each other as two
//! processes do; plain POSIX record locks on kernels older than 3.15). The kernel releases it
//! when the process ends, however it ends (SIGKILL included), so a lock never goes stale. Linux
//! forwards these locks to network file systems: NFSv4 takes them on the server, NFSv3 through
//! the lock manager (`lockd`), and both are then seen from every client; Lustre needs the mount
//! option `flock` (`localflock` only excludes processes of one node); GPFS and BeeGFS (with
//! `tuneUseGlobalFileLocks`) lock cluster-wide. A file system that refuses locks is an error, not
//! a silent unlocked write; `CPA_STREAM_NO_LOCKS=1` writes without them where the user knows one
//! writer runs.
//!
//! Because the lock outlives every temporary file of its output, a temporary found while
//! holding the lock belongs to a writer that is gone (on this node or any other), and is
//! removed; no process id is trusted across nodes or PID namespaces.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Setting it (to anything but `0`) writes outputs without a lock (file systems without locks).
pub const NO_LOCKS_VAR: &str = "CPA_STREAM_NO_LOCKS";

/// The lock of one output, held until dropped (then its file is removed).
#[derive(Debug)]
pub struct OutputLock {
    /// The lock file; `None` without locks ([`NO_LOCKS_VAR`]).
    file: Option<File>,
    path: PathBuf,
}

impl OutputLock {
    /// The lock file (`.NAME.lock` beside the output).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let Some(file) = &self.file else { return };
        // Removed while still locked, and only if it is still ours: a waiting writer then finds
        // the file gone and takes a new one (see `take`).
        if same_file(file, &self.path) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The lock file of `dest`: `.NAME.lock` in its directory.
pub fn lock_path(dest: &Path) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("{}: not a file or directory name", dest.display())))?;
    let mut lock_name = OsString::from(".");
    lock_name.push(name);
    lock_name.push(".lock");
    Ok(dest.with_file_name(lock_name))
}

/// How to behave when another writer holds the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Fail at once, naming the holder.
    No,
    /// Wait until the holder is done (for outputs every writer writes alike, such as a sharded
    /// dataset's `genes.parquet`).
    Yes,
}

/// Takes the lock of output `dest` (which need not exist); the holder's process, host and start
/// are written into the lock file, for the error another writer gets.
pub fn lock_output(dest: &Path, wait: Wait) -> Result<OutputLock> {
    let path = lock_path(dest)?;
    if std::env::var_os(NO_LOCKS_VAR).is_some_and(|v| v != "0") {
        return Ok(OutputLock { file: None, path });
    }
    // A lock file removed by its holder between our open and our lock is not the lock any
    // more: try again with the new one.
    for _ in 0..64 {
        let file = open_lock_file(&path)?;
        if !lock(&file, &path, dest, wait)? {
            continue;
        }
        if !same_file(&file, &path) {
            continue;
        }
        let mut file = file;
        let _ = file.set_len(0);
        let _ = file.write_all(holder_description().as_bytes());
        let _ = file.flush();
        return Ok(OutputLock { file: Some(file), path });
    }
    Err(Error::InvalidInput(format!(
        "{}: its lock file {} keeps being replaced by other writers; try again",
        dest.display(),
        path.display()
    )))
}

fn open_lock_file(path: &Path) -> Result<File> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::InvalidInput(format!(
                "{}: the lock file of this output is a symbolic link; it is never followed (remove it)",
                path.display()
            )),
            _ => Error::io(path, e),
        })?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::InvalidInput(format!(
            "{}: the lock file of this output is not a regular file (remove it)",
            path.display()
        )));
    }
    Ok(file)
}

/// Whether `file` is still the file at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Locks `file` exclusively; `Ok(false)` when the file was removed meanwhile (its holder was
/// done while we waited), an error naming the holder when it is held and `wait` is `No`.
fn lock(file: &File, path: &Path, dest: &Path, wait: Wait) -> Result<bool> {
    let mut request: libc::flock = unsafe_zeroed_flock();
    request.l_type = libc::F_WRLCK as libc::c_short;
    request.l_whence = libc::SEEK_SET as libc::c_short;
    let (ofd, posix) = match wait {
        Wait::No => (libc::F_OFD_SETLK, libc::F_SETLK),
        Wait::Yes => (libc::F_OFD_SETLKW, libc::F_SETLKW),
    };
    loop {
        // SAFETY: fcntl on an open descriptor with a pointer to a live, initialised flock.
        let mut rc = unsafe { libc::fcntl(file.as_raw_fd(), ofd, &mut request) };
        let mut err = std::io::Error::last_os_error();
        if rc != 0 && err.raw_os_error() == Some(libc::EINVAL) {
            // A kernel without open file description locks (before 3.15).
            // SAFETY: as above.
            rc = unsafe { libc::fcntl(file.as_raw_fd(), posix, &mut request) };
            err = std::io::Error::last_os_error();
        }
        if rc == 0 {
            return Ok(true);
        }
        return match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN | libc::EACCES) => Err(Error::InvalidInput(format!(
                "{}: another command is writing this output ({}); two writers would mix their files. Wait for it \
                 to end, or write elsewhere",
                dest.display(),
                holder_of(file)
            ))),
            Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => Err(Error::InvalidInput(format!(
                "{}: the file system refuses locks ({err}), so another command could write this output at the same \
                 time; set {NO_LOCKS_VAR}=1 to write without a lock where you know only one command writes it",
                path.display()
            ))),
            _ => Err(Error::io(path, err)),
        };
    }
}

fn unsafe_zeroed_flock() -> libc::flock {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// What a holder writes into its lock file: process, host, boot and start time.
fn holder_description() -> String {
    let host = host_name();
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|b| b.trim().to_owned()).unwrap_or_default();
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    serde_json::json!({"pid": std::process::id(), "host": host, "boot_id": boot, "since": since}).to_string()
}

/// The holder as a phrase for an error: "process 123 on host node7, since 2026-...".
fn holder_of(file: &File) -> String {
    let mut text = String::new();
    let mut reader = file;
    let _ = reader.rewind();
    let _ = reader.take(4096).read_to_string(&mut text);
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
        return "a process that has not yet written its name".to_owned();
    };
    let pid = value["pid"].as_u64().map_or_else(|| "?".to_owned(), |p| p.to_string());
    let host = value["host"].as_str().unwrap_or("?");
    let since = value["since"].as_u64().map(|s| {
        let age = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(s))
            .unwrap_or(0);
        format!(", for {age} s")
    });
    format!("process {pid} on host {host}{}", since.unwrap_or_default())
}

fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the live buffer.
    let rc = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if rc != 0 {
        return "?".to_owned();
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holder_named_and_the_lock_goes_with_its_holder() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let dest = dir.path().join("run");
        let first = lock_output(&dest, Wait::No)?;
        assert!(first.path().ends_with(".run.lock"));
        // Another open file description (as another process would have): refused at once.
        let err = lock_output(&dest, Wait::No).unwrap_err().to_string();
        assert!(err.contains("another command is writing this output"), "{err}");
        assert!(err.contains(&format!("process {} on host ", std::process::id())), "{err}");
        drop(first);
        assert!(!dir.path().join(".run.lock").exists(), "the lock file goes with its holder");
        let again = lock_output(&dest, Wait::No)?;
        drop(again);
        Ok(())
    }

    #[test]
    fn a_waiting_writer_goes_on_when_the_holder_is_done() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let dest = dir.path().join("genes.parquet");
        let first = lock_output(&dest, Wait::No)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = {
            let dest = dest.clone();
            std::thread::spawn(move || {
                let lock = lock_output(&dest, Wait::Yes);
                let _ = tx.send(());
                lock.map(drop)
            })
        };
        // The waiter cannot finish while the lock is held; it does once it is released.
        assert!(rx.try_recv().is_err());
        drop(first);
        waiting.join().map_err(|_| Error::InvalidInput("waiter panicked".into()))??;
        assert!(rx.try_recv().is_ok());
        Ok(())
    }

    #[test]
    fn a_lock_file_that_is_a_link_is_never_followed() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let target = dir.path().join("elsewhere");
        fs::write(&target, b"keep").map_err(|e| Error::io(&target, e))?;
        let link = dir.path().join(".out.lock");
        std::os::unix::fs::symlink(&target, &link).map_err(|e| Error::io(&link, e))?;
        let err = lock_output(&dir.path().join("out"), Wait::No).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(fs::read(&target).map_err(|e| Error::io(&target, e))?, b"keep");
        Ok(())
    }
}
