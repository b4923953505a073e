//! Checksums of store files: XXH3-64 over the whole file, as 16 hex digits.

use std::io::{self, Read, Write};

use xxhash_rust::xxh3::Xxh3;

/// Formats a checksum as written in the manifest.
pub(crate) fn hex(hash: u64) -> String {
    format!("{hash:016x}")
}

/// A writer that hashes and counts every byte it passes on.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Xxh3,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Xxh3::new(), bytes: 0 }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes and returns the inner writer, the byte count and the checksum.
    pub(crate) fn finish(mut self) -> io::Result<(W, u64, String)> {
        self.inner.flush()?;
        Ok((self.inner, self.bytes, hex(self.hasher.digest())))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes a byte slice (a mapped file) in one pass.
pub(crate) fn hash_bytes(bytes: &[u8]) -> String {
    hex(xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Hashes everything a reader yields; returns (bytes, checksum).
pub fn hash_reader(mut reader: impl Read) -> io::Result<(u64, String)> {
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hex(hasher.digest())));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// A file's size and checksum as a store's manifest records them (XXH3-64, 16 hex digits).
pub fn file_checksum(path: &std::path::Path) -> io::Result<(u64, String)> {
    hash_reader(std::io::BufReader::new(std::fs::File::open(path)?))
}
