//! Read-only memory maps of store files, viewed as little-endian arrays.

use std::fs::File;
use std::path::Path;

use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::error::{Error, Result};

/// A read-only map of a whole file (or nothing, for an empty file, which cannot be mapped).
#[derive(Debug)]
pub(crate) struct MappedFile {
    map: Option<Mmap>,
}

impl MappedFile {
    /// Maps the first `len` bytes of the open `file` (at `path`, for messages) read-only; the
    /// file must hold at least that many.
    ///
    /// # Safety
    /// Those bytes must not be truncated or written while the map (or any slice taken from it)
    /// is alive: the slices are plain Rust references into the page cache. Store files are
    /// written once into a temporary directory and published by rename; an append only adds
    /// bytes after those of the versions before (and removes, under the store's lock, only bytes
    /// after the current version's, which no reader maps).
    pub(crate) unsafe fn map(file: &File, path: &Path, len: u64) -> Result<MappedFile> {
        if len == 0 {
            return Ok(MappedFile { map: None });
        }
        let len = usize::try_from(len)
            .map_err(|_| Error::corrupt(path, format!("{len} bytes cannot be mapped on this platform")))?;
        // SAFETY: forwarded to the caller (see `# Safety`).
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(file) }.map_err(|e| Error::io(path, e))?;
        Ok(MappedFile { map: Some(map) })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub(crate) fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    /// The file as an array of `T`; `None` if its length is not a multiple of `T`'s size (sizes
    /// are checked against the manifest before this is called; maps are page-aligned).
    pub(crate) fn as_slice<T: bytemuck::Pod>(&self) -> Option<&[T]> {
        match &self.map {
            // An empty file has no map; an empty byte slice need not be aligned for `T`.
            None => Some(&[]),
            Some(map) => bytemuck::try_cast_slice(map).ok(),
        }
    }

    /// Hints the kernel about the access pattern of the whole file.
    pub(crate) fn advise(&self, advice: Advice) {
        if let Some(map) = &self.map {
            // Advice is a hint; a kernel that refuses it changes nothing we rely on.
            let _ = map.advise(advice);
        }
    }

    /// Drops the pages of `bytes` (a byte range of the file) from this process's resident set.
    pub(crate) fn release(&self, bytes: std::ops::Range<usize>) {
        let Some(map) = &self.map else { return };
        let end = bytes.end.min(map.len());
        if bytes.start < end {
            // SAFETY: DONTNEED on a private read-only file map only drops our view of the pages
            // (memmap2 widens the range to whole pages); later reads fault them in again from the
            // unchanged file, so no live reference observes different data.
            let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, bytes.start, end - bytes.start) };
        }
    }
}

/// What the process says when a mapped file shrinks under it.
const SIGBUS_MESSAGE: &[u8] =
    b"\ncpa-stream: bus error (SIGBUS) reading a memory-mapped store file: the file became shorter \
while this process read it (another process truncated or rewrote the store in place). A store must not be modified \
while in use; check it with `cpa-stream verify STORE` and rerun.\n";

extern "C" fn on_sigbus(_signal: libc::c_int) {
    // SAFETY: write(2), signal(2) and raise(3) are async-signal-safe; the message is static.
    unsafe {
        libc::write(2, SIGBUS_MESSAGE.as_ptr().cast(), SIGBUS_MESSAGE.len());
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        libc::raise(libc::SIGBUS);
    }
}

/// Installs a SIGBUS handler that explains the one way a validated store can fault: a mapped
/// file truncated by another process (sizes are checked at open, so a store that is not
/// modified while in use never faults). The process still ends by SIGBUS (exit 135 in a shell),
/// after the message. For programs (the CLI); a library leaves signals to its host.
pub fn explain_sigbus() {
    // SAFETY: installs a handler that only calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGBUS, on_sigbus as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
}

/// Asks the CPU to start loading `values` into its caches, one line every `stride` bytes.
/// Gathering scattered rows is bound by memory latency, not bandwidth (each row is a few KB at a
/// new place, and the hardware prefetchers do not cross pages): loads started a couple of rows
/// ahead overlap it. A hint only: no effect on results, and nothing on targets without the
/// instruction.
#[inline]
pub(crate) fn prefetch<T>(values: &[T], stride: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start = values.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(values)).step_by(stride) {
            // SAFETY: prefetching never faults and does not change memory; the address lies
            // inside `values`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}
