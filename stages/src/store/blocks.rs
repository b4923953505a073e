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

/// The `n` little-endian words whose bytes were split into four planes of `n` bytes, each put
/// through `word` and written to `out` (replacing its contents). One indexed loop over four
/// slices of exactly `n` bytes: no bounds checks left in it, and the compiler vectorises it.
fn unshuffle_into<T>(planes: &[u8], n: usize, out: &mut Vec<T>, word: impl Fn(u32) -> T) {
    let (p0, rest) = planes.split_at(n);
    let (p1, rest) = rest.split_at(n);
    let (p2, p3) = rest.split_at(n);
    let p3 = &p3[..n];
    out.clear();
    out.extend((0..n).map(|i| {
        word(u32::from(p0[i]) | (u32::from(p1[i]) << 8) | (u32::from(p2[i]) << 16) | (u32::from(p3[i]) << 24))
    }));
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
    /// within each row and below `n_vars`, and the values (the stored-row rule,
    /// [`check_row`](crate::csr::check_row)); the error says which row of the block is wrong.
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
        unshuffle_into(idx_planes, nnz, indices, |w| w);
        unshuffle_into(val_planes, nnz, data, f32::from_bits);
        // Undo the per-row delta coding in place. A row is fine when no delta after its first is
        // 0 (strictly increasing) and its last index is below n_vars; the exact complaint is
        // worked out only for a row that is not.
        for (row, w) in indptr.windows(2).enumerate() {
            let (start, end) = ((w[0] - base) as usize, (w[1] - base) as usize);
            let Some((&mut first, rest)) = indices[start..end].split_first_mut() else { continue };
            // Two branch-free reductions (vectorised), then the prefix sum.
            let repeated = rest.iter().fold(false, |any, &c| any | (c == 0));
            let last = rest.iter().fold(u64::from(first), |sum, &c| sum + u64::from(c));
            if repeated || last >= n_vars {
                return Err(delta_error(row, &indices[start..end], n_vars));
            }
            let mut prev = first;
            for c in rest.iter_mut() {
                // No overflow: the sum of the deltas is below n_vars.
                prev += *c;
                *c = prev;
            }
        }
        // A value is finite and >= 0 when its bits, with -0.0 taken as 0.0, are below those of
        // +inf (NaNs and negatives are above): one branch-free max over the block.
        let highest = data.iter().fold(0u32, |m, v| {
            let bits = v.to_bits();
            m.max(if bits == 0x8000_0000 { 0 } else { bits })
        });
        if highest >= f32::INFINITY.to_bits() {
            let n_cols = u32::try_from(n_vars).unwrap_or(u32::MAX);
            for (row, w) in indptr.windows(2).enumerate() {
                let (start, end) = ((w[0] - base) as usize, (w[1] - base) as usize);
                crate::csr::check_row(&indices[start..end], &data[start..end], n_cols)
                    .map_err(|e| format!("row {row} of the block{e}"))?;
            }
        }
        Ok(())
    }
}

/// What is wrong with a row of deltas (first index absolute) that failed the fast check.
fn delta_error(row: usize, deltas: &[u32], n_vars: u64) -> String {
    let mut prev: u64 = 0;
    for (k, &c) in deltas.iter().enumerate() {
        let value = if k == 0 {
            u64::from(c)
        } else if c == 0 {
            return format!("row {row} of the block: repeated column index {prev}");
        } else {
            prev + u64::from(c)
        };
        if value >= n_vars {
            return format!("row {row} of the block: column index {value} out of range, expected < {n_vars}");
        }
        prev = value;
    }
    format!("row {row} of the block: column indices out of order")
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
