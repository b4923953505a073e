//! Opening a file that a command reads without blocking on what is not one: a FIFO, socket or
//! device given as an input (or planted in a model or run directory) is refused at once, never
//! waited on, and a small file (a description, a configuration, a list) is read only up to a
//! bound, so a huge or endless one is an error instead of the host's memory.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Opens `path` for reading if it is a regular file (following links); `what` names it in the
/// error ("a model description").
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() { "a directory" } else { "a FIFO, socket or device" };
        return Err(Error::Unsupported {
            path: path.to_owned(),
            reason: format!("is {kind}, not a regular file; expected {what}"),
        });
    }
    Ok(file)
}

/// The bytes of the regular file `path`, at most `max_bytes` of them (a longer file is an
/// error naming both sizes).
pub fn read_bounded(path: &Path, what: &str, max_bytes: u64) -> Result<Vec<u8>> {
    let file = open_regular(path, what)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let too_long = |len: u64| {
        Error::InvalidInput(format!(
            "{}: {len} bytes, more than {what} can be ({max_bytes} bytes at most)",
            path.display()
        ))
    };
    if len > max_bytes {
        return Err(too_long(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // One byte past the bound tells a file that grew since its size was read.
    file.take(max_bytes + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_long(bytes.len() as u64));
    }
    Ok(bytes)
}

/// The text of the regular file `path` (UTF-8), at most `max_bytes` long.
pub fn read_text(path: &Path, what: &str, max_bytes: u64) -> Result<String> {
    String::from_utf8(read_bounded(path, what, max_bytes)?).map_err(|e| {
        Error::corrupt(path, format!("not UTF-8 text (byte {}); expected {what}", e.utf8_error().valid_up_to()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_a_regular_file_or_too_long_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap_or_default()).unwrap_or_default();
        // SAFETY: a NUL-terminated path that lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_text(&fifo, "a model description", 10).unwrap_err().to_string();
        assert!(err.contains("is a FIFO, socket or device, not a regular file; expected a model description"), "{err}");
        let err = read_text(dir.path(), "a list", 10).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
        let long = dir.path().join("long");
        std::fs::write(&long, b"0123456789ab").unwrap_or_else(|e| panic!("{e}"));
        let err = read_text(&long, "a list", 10).unwrap_err().to_string();
        assert!(err.contains("12 bytes, more than a list can be (10 bytes at most)"), "{err}");
        assert_eq!(read_text(&long, "a list", 12).unwrap_or_default(), "0123456789ab");
    }
}
