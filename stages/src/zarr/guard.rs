//! The storage the zarr library reads through, guarded against what an untrusted store can make
//! a decoder do before any of its own checks:
//!
//! - a byte range beyond the file (a shard index entry of offset 0 and 2^62 bytes) is refused
//!   here, instead of the library allocating the range and aborting the process;
//! - a chunk that decodes to more than its array's chunk can hold (a compression bomb: 130 KB of
//!   zstd that expands to 4 GiB of zeros) is refused before the library decodes it: zstd and blosc
//!   frames declare their size and are checked by their headers, frames that do not (zstd without
//!   a content size, gzip) are decoded into a sink that stops at the first byte over the bound.
//!
//! The bound of a chunk is registered by the array when it is opened ([`GuardedStore::bound`]):
//! its decoded chunk's bytes (a shard's inner chunk), with room for a codec's framing.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, RwLock};

use zarrs::filesystem::FilesystemStore;
use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator};
use zarrs::storage::{Bytes, MaybeBytesIterator, ReadableStorageTraits, StorageError, StoreKey};

/// Bytes a codec's framing may add to a decoded chunk (headers, a block's overhead).
const FRAMING_BYTES: u64 = 64 << 10;

/// A filesystem store whose reads are checked (see the module's documentation).
#[derive(Debug)]
pub(super) struct GuardedStore {
    inner: FilesystemStore,
    /// Decoded bytes a chunk may hold, by array path (`obs/cell_type/codes`).
    bounds: RwLock<HashMap<String, u64>>,
}

impl GuardedStore {
    pub(super) fn new(inner: FilesystemStore) -> GuardedStore {
        GuardedStore { inner, bounds: RwLock::new(HashMap::new()) }
    }

    /// Records that a chunk of the array at `path` decodes to at most `bytes` bytes.
    pub(super) fn bound(&self, path: &str, bytes: u64) {
        if let Ok(mut bounds) = self.bounds.write() {
            bounds.insert(path.trim_matches('/').to_owned(), bytes.saturating_add(FRAMING_BYTES));
        }
    }

    /// The bound of the array `key` (a chunk's key) belongs to: its longest registered prefix.
    fn bound_of(&self, key: &str) -> Option<u64> {
        let bounds = self.bounds.read().ok()?;
        let mut path = key;
        while let Some((parent, _)) = path.rsplit_once('/') {
            if let Some(&b) = bounds.get(parent) {
                return Some(b);
            }
            path = parent;
        }
        None
    }
}

/// Checks that each range lies within a value of `size` bytes.
fn check_ranges(key: &StoreKey, ranges: &[ByteRange], size: u64) -> Result<(), StorageError> {
    for range in ranges {
        let end = match *range {
            ByteRange::FromStart(offset, Some(length)) => offset.checked_add(length),
            ByteRange::FromStart(offset, None) => Some(offset),
            ByteRange::Suffix(length) => Some(length),
        };
        if end.is_none_or(|end| end > size) {
            return Err(StorageError::Other(format!(
                "{key}: a read of bytes {range} of a file of {size} bytes (a shard index that points past its \
                 shard: a damaged or crafted store)"
            )));
        }
    }
    Ok(())
}

/// Why `bytes` would decode to more than `bound` bytes, if they would (zstd, gzip and blosc
/// frames, told by their headers; anything else is left to the decoder).
pub(super) fn exceeds(bytes: &[u8], bound: u64) -> Option<String> {
    const ZSTD: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
    const GZIP: [u8; 2] = [0x1F, 0x8B];
    let declared_over = |n: u64| {
        (n > bound).then(|| format!("declares {n} bytes decoded, more than its array's chunk can hold ({bound})"))
    };
    // A bounded decode stops at the first byte over: how far past it would go is not read.
    let decoded_over =
        |n: u64| (n > bound).then(|| format!("decodes to more than its array's chunk can hold ({bound} bytes)"));
    if bytes.starts_with(&ZSTD) {
        let (mut declared, mut at) = (0u64, 0usize);
        while at < bytes.len() {
            let frame = &bytes[at..];
            match zstd::zstd_safe::get_frame_content_size(frame) {
                Ok(Some(n)) => declared = declared.saturating_add(n),
                // No size declared (or not a frame the header tells): decode, bounded.
                _ => return decoded_over(bounded_len(zstd::stream::read::Decoder::new(bytes).ok()?, bound)),
            }
            match zstd::zstd_safe::find_frame_compressed_size(frame) {
                Ok(n) if n > 0 => at += n,
                _ => break,
            }
        }
        return declared_over(declared);
    }
    if bytes.starts_with(&GZIP) {
        return decoded_over(bounded_len(flate2::read::GzDecoder::new(bytes), bound));
    }
    // blosc: version, versionlz, flags, typesize, then nbytes (decoded), blocksize, cbytes (the
    // frame's own length), little-endian u32s; recognised by cbytes.
    if bytes.len() >= 16 && (1..=4).contains(&bytes[0]) {
        let word = |at: usize| u64::from(u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]));
        if word(12) == bytes.len() as u64 {
            return declared_over(word(4));
        }
    }
    None
}

/// Bytes `reader` yields, reading at most `bound + 1` of them (a decoding error ends the count:
/// the library reports it when it decodes).
fn bounded_len(reader: impl Read, bound: u64) -> u64 {
    let mut limited = reader.take(bound.saturating_add(1));
    let mut buffer = [0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        match limited.read(&mut buffer) {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n as u64,
        }
    }
}

impl ReadableStorageTraits for GuardedStore {
    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        let Some(size) = self.inner.size_key(key)? else { return Ok(None) };
        let ranges: Vec<ByteRange> = byte_ranges.collect();
        check_ranges(key, &ranges, size)?;
        let Some(values) = self.inner.get_partial_many(key, Box::new(ranges.into_iter()))? else { return Ok(None) };
        let values: Vec<Bytes> = values.collect::<Result<_, _>>()?;
        if let Some(bound) = self.bound_of(key.as_str()) {
            for value in &values {
                if let Some(why) = exceeds(value, bound) {
                    return Err(StorageError::Other(format!(
                        "{key}: a chunk that {why}: a compression bomb or a damaged store; not decoded"
                    )));
                }
            }
        }
        Ok(Some(Box::new(values.into_iter().map(Ok))))
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        self.inner.size_key(key)
    }

    fn supports_get_partial(&self) -> bool {
        self.inner.supports_get_partial()
    }
}

/// The store as the zarr library takes it, and the guard to register bounds with.
pub(super) fn guarded(inner: FilesystemStore) -> (Arc<GuardedStore>, Arc<dyn ReadableStorageTraits>) {
    let guard = Arc::new(GuardedStore::new(inner));
    let storage: Arc<dyn ReadableStorageTraits> = Arc::clone(&guard) as Arc<dyn ReadableStorageTraits>;
    (guard, storage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_that_decode_past_the_bound_are_told_by_their_headers_or_a_bounded_decode() {
        let zeros = vec![0u8; 1 << 20];
        // zstd with its content size: the header tells.
        let packed = zstd::bulk::compress(&zeros, 3).unwrap_or_default();
        assert!(exceeds(&packed, 1 << 20).is_none());
        let why = exceeds(&packed, 1000).unwrap_or_default();
        assert!(why.contains("declares 1048576 bytes decoded, more than its array's chunk can hold (1000)"), "{why}");
        // zstd without a content size (a streaming encoder's frame): decoded, stopping past the bound.
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap_or_else(|e| panic!("{e}"));
        encoder.include_contentsize(false).unwrap_or_else(|e| panic!("{e}"));
        std::io::Write::write_all(&mut encoder, &zeros).unwrap_or_else(|e| panic!("{e}"));
        let streamed = encoder.finish().unwrap_or_default();
        assert!(exceeds(&streamed, 1 << 20).is_none());
        let why = exceeds(&streamed, 1000).unwrap_or_default();
        assert!(why.contains("decodes to more than its array's chunk can hold (1000 bytes)"), "{why}");
        // gzip: decoded, bounded.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &zeros).unwrap_or_else(|e| panic!("{e}"));
        let gz = gz.finish().unwrap_or_default();
        assert!(exceeds(&gz, 1 << 20).is_none());
        assert!(exceeds(&gz, 4096).is_some_and(|w| w.contains("decodes to more than")));
        // blosc: the header's decoded size.
        let mut blosc = vec![2u8, 1, 1, 4];
        blosc.extend_from_slice(&(1u32 << 30).to_le_bytes());
        blosc.extend_from_slice(&(1u32 << 16).to_le_bytes());
        blosc.extend_from_slice(&32u32.to_le_bytes());
        blosc.extend_from_slice(&[0u8; 16]);
        assert!(exceeds(&blosc, 1 << 20).is_some_and(|w| w.contains("declares 1073741824 bytes")));
        // Plain bytes are the decoder's business.
        assert!(exceeds(&[1, 2, 3, 4, 5], 1).is_none());
    }

    #[test]
    fn a_range_past_the_file_is_refused() {
        let key = StoreKey::new("X/data/c/0").unwrap_or_else(|e| panic!("{e}"));
        assert!(check_ranges(&key, &[ByteRange::FromStart(0, Some(10)), ByteRange::Suffix(16)], 100).is_ok());
        let err = check_ranges(&key, &[ByteRange::FromStart(8, Some(1 << 62))], 100).unwrap_err().to_string();
        assert!(err.contains("X/data/c/0: a read of bytes") && err.contains("of a file of 100 bytes"), "{err}");
        assert!(check_ranges(&key, &[ByteRange::FromStart(u64::MAX, Some(2))], 100).is_err());
        assert!(check_ranges(&key, &[ByteRange::Suffix(101)], 100).is_err());
    }
}
