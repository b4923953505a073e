//! The zstd block codec.
//!
//! A block holds `block_rows` consecutive rows (the last may hold fewer). Its plain form is the
//! rows' column indices, delta-coded within each row (first index absolute), followed by their
//! values; each of the two u32/f32 arrays is byte-shuffled (all first bytes, then all second
//! bytes, ...) before one zstd frame (with a content checksum) compresses the whole. Row boundaries come from `X/indptr`,
//! which stays uncompressed, so the plain size of every block is known before decompressing.

use std::io;

use zstd::bulk::{Compressor, Decompressor};

/// Compresses blocks; owns its scratch buffers so that steady-state encoding does not allocate.
pub(crate) struct BlockEncoder {
    compressor: Compressor<'static>,
    shuffled: Vec<u8>,
    out: Vec<u8>,
}

impl BlockEncoder {
    pub(crate) fn new(level: i32) -> io::Result<BlockEncoder> {
        let mut compressor = Compressor::new(level)?;
        // A content checksum per frame (xxh64, 4 bytes): a corrupt block is an error when read,
        // not plausible garbage (damaged literals can otherwise decode to valid-looking values).
        compressor.include_checksum(true)?;
        Ok(BlockEncoder { compressor, shuffled: Vec::new(), out: Vec::new() })
    }

    /// Encodes rows given by `indptr` (relative offsets starting at 0), `indices` and `data`.
    pub(crate) fn encode(&mut self, indptr: &[u64], indices: &[u32], data: &[f32]) -> io::Result<&[u8]> {
        let nnz = indices.len();
        self.shuffled.clear();
        self.shuffled.resize(nnz * 8, 0);
        let (idx_planes, val_planes) = self.shuffled.split_at_mut(nnz * 4);
        for w in indptr.windows(2) {
            let mut prev = 0u32;
            for (i, &c) in indices.iter().enumerate().take(w[1] as usize).skip(w[0] as usize) {
                let delta = if i == w[0] as usize { c } else { c.wrapping_sub(prev) };
                prev = c;
                scatter(idx_planes, nnz, i, delta.to_le_bytes());
            }
        }
        for (i, v) in data.iter().enumerate() {
            scatter(val_planes, nnz, i, v.to_bits().to_le_bytes());
        }
        self.out.clear();
        self.out.reserve(zstd::zstd_safe::compress_bound(self.shuffled.len()));
        self.compressor.compress_to_buffer(&self.shuffled, &mut self.out)?;
        Ok(&self.out)
    }
}

#[inline]
fn scatter(planes: &mut [u8], n: usize, i: usize, bytes: [u8; 4]) {
    for (k, b) in bytes.into_iter().enumerate() {
        planes[k * n + i] = b;
    }
}

/// The `n` little-endian u32 words whose bytes were split into four planes of `n` bytes.
fn unshuffle(planes: &[u8], n: usize) -> impl Iterator<Item = u32> + '_ {
    let (p0, rest) = planes.split_at(n);
    let (p1, rest) = rest.split_at(n);
    let (p2, p3) = rest.split_at(n);
    p0.iter().zip(p1).zip(p2).zip(p3).map(|(((&a, &b), &c), &d)| u32::from_le_bytes([a, b, c, d]))
}

/// Decompresses blocks; reuses its buffers.
pub(crate) struct BlockDecoder {
    decompressor: Decompressor<'static>,
    shuffled: Vec<u8>,
}

impl BlockDecoder {
    pub(crate) fn new() -> io::Result<BlockDecoder> {
        Ok(BlockDecoder { decompressor: Decompressor::new()?, shuffled: Vec::new() })
    }

    /// Decodes a block whose rows have the absolute offsets `indptr` into `indices` and `data`
    /// (replacing their contents). Checks the plain size, and that indices are strictly increasing
    /// within each row and below `n_vars`; the error says which row of the block is wrong.
    pub(crate) fn decode(
        &mut self,
        compressed: &[u8],
        indptr: &[u64],
        n_vars: u64,
        indices: &mut Vec<u32>,
        data: &mut Vec<f32>,
    ) -> Result<(), String> {
        let base = indptr[0];
        let nnz = (indptr[indptr.len() - 1] - base) as usize;
        self.shuffled.clear();
        self.shuffled.reserve(nnz * 8);
        let n =
            self.decompressor.decompress_to_buffer(compressed, &mut self.shuffled).map_err(|e| format!("zstd: {e}"))?;
        if n != nnz * 8 {
            return Err(format!("decompressed to {n} bytes, expected {} for {nnz} entries", nnz * 8));
        }
        let (idx_planes, val_planes) = self.shuffled.split_at(nnz * 4);
        indices.clear();
        data.clear();
        indices.extend(unshuffle(idx_planes, nnz));
        data.extend(unshuffle(val_planes, nnz).map(f32::from_bits));
        // Undo the per-row delta coding in place, checking order and range.
        for (row, w) in indptr.windows(2).enumerate() {
            let (start, end) = ((w[0] - base) as usize, (w[1] - base) as usize);
            let mut prev: u64 = 0;
            for (k, c) in indices[start..end].iter_mut().enumerate() {
                let value = if k == 0 {
                    u64::from(*c)
                } else if *c == 0 {
                    return Err(format!("row {row} of the block: repeated column index {prev}"));
                } else {
                    prev + u64::from(*c)
                };
                if value >= n_vars {
                    return Err(format!(
                        "row {row} of the block: column index {value} out of range, expected < {n_vars}"
                    ));
                }
                *c = value as u32;
                prev = value;
            }
            let n_cols = u32::try_from(n_vars).unwrap_or(u32::MAX);
            crate::csr::check_row(&indices[start..end], &data[start..end], n_cols)
                .map_err(|e| format!("row {row} of the block{e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let indptr = [0u64, 3, 3, 5];
        let indices = [1u32, 7, 9, 0, 4_000_000];
        let data = [1.0f32, 2.5, 3.0, 0.0, 7.0];
        let mut enc = BlockEncoder::new(3)?;
        let frame = enc.encode(&indptr, &indices, &data)?.to_vec();
        let mut dec = BlockDecoder::new()?;
        let (mut i, mut d) = (Vec::new(), Vec::new());
        let abs: Vec<u64> = indptr.iter().map(|x| x + 100).collect();
        dec.decode(&frame, &abs, 5_000_000, &mut i, &mut d)?;
        assert_eq!(i, indices);
        assert_eq!(d, data);
        let err = dec.decode(&frame, &abs, 10, &mut i, &mut d).unwrap_err();
        assert_eq!(err, "row 2 of the block: column index 4000000 out of range, expected < 10");
        let short = [0u64, 3, 3, 4];
        assert!(dec.decode(&frame, &short, 5_000_000, &mut i, &mut d).unwrap_err().contains("expected 32"));
        assert!(dec.decode(&frame[..frame.len() / 2], &abs, 5_000_000, &mut i, &mut d).is_err());
        // Values follow the stored-row rule too: finite and >= 0.
        let negative = enc.encode(&indptr, &indices, &[1.0, 2.5, -3.0, 0.0, 7.0])?.to_vec();
        let err = dec.decode(&negative, &abs, 5_000_000, &mut i, &mut d).unwrap_err();
        assert_eq!(
            err,
            "row 0 of the block, column 9: value -3 is negative (expected counts or normalised expression, >= 0)"
        );
        Ok(())
    }
}
