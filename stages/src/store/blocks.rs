//! The zstd block codec.
//!
//! A block holds `block_rows` consecutive rows (the last may hold fewer). Its plain form is the
//! rows' column indices, delta-coded within each row (first index absolute), followed by their
//! values; each array is byte-shuffled (all first bytes, then all second bytes, ...) before one
//! zstd frame (with a content checksum) compresses the whole. Row boundaries come from
//! `X/indptr`, which stays uncompressed, so the size of every block's entries is known before
//! decompressing.
//!
//! Two layouts of the plain form ([`Planes`]): `wide` stores both arrays as four planes of 32-bit
//! words. `narrow` starts with a header byte (bit 0: index deltas in two planes of 16-bit words,
//! bit 1: values in two planes of 16-bit whole numbers; other bits 0) and uses the 16-bit form
//! for an array wherever the block allows it: all deltas (first indices included) up to 65,535,
//! all values whole numbers from 0 to 65,535 (a `-0.0` keeps the block at 32 bits, so every value
//! comes back bit for bit). On counts that halves the bytes zstd has to produce and the planes to
//! undo: the block decodes about 1.5x faster and compresses about 15% smaller.

use std::io;

use cpa_stream_schemas::Planes;
use zstd::bulk::{Compressor, Decompressor};

/// Header bit of a narrow block: index deltas in two 16-bit planes.
const NARROW_INDICES: u8 = 1;
/// Header bit of a narrow block: values as whole numbers in two 16-bit planes.
const NARROW_VALUES: u8 = 2;

/// Compresses blocks; owns its scratch buffers so that steady-state encoding does not allocate.
pub(crate) struct BlockEncoder {
    compressor: Compressor<'static>,
    planes: Planes,
    deltas: Vec<u32>,
    shuffled: Vec<u8>,
    out: Vec<u8>,
}

impl BlockEncoder {
    pub(crate) fn new(level: i32, planes: Planes) -> io::Result<BlockEncoder> {
        let mut compressor = Compressor::new(level)?;
        // A content checksum per frame (xxh64, 4 bytes): a corrupt block is an error when read,
        // not plausible garbage (damaged literals can otherwise decode to valid-looking values).
        compressor.include_checksum(true)?;
        Ok(BlockEncoder { compressor, planes, deltas: Vec::new(), shuffled: Vec::new(), out: Vec::new() })
    }

    /// Encodes rows given by `indptr` (relative offsets starting at 0), `indices` and `data`.
    pub(crate) fn encode(&mut self, indptr: &[u64], indices: &[u32], data: &[f32]) -> io::Result<&[u8]> {
        let nnz = indices.len();
        self.deltas.clear();
        self.deltas.reserve(nnz);
        for w in indptr.windows(2) {
            let mut prev = 0u32;
            for &c in &indices[w[0] as usize..w[1] as usize] {
                self.deltas.push(c.wrapping_sub(prev));
                prev = c;
            }
        }
        self.shuffled.clear();
        match self.planes {
            Planes::Wide => {
                shuffle(&mut self.shuffled, self.deltas.iter().map(|&d| d.to_le_bytes()));
                shuffle(&mut self.shuffled, data.iter().map(|v| v.to_bits().to_le_bytes()));
            }
            Planes::Narrow => {
                let narrow_indices = self.deltas.iter().all(|&d| d <= u32::from(u16::MAX));
                let narrow_values = data.iter().all(|&v| is_u16_whole(v));
                let header =
                    if narrow_indices { NARROW_INDICES } else { 0 } | if narrow_values { NARROW_VALUES } else { 0 };
                self.shuffled.push(header);
                if narrow_indices {
                    shuffle(&mut self.shuffled, self.deltas.iter().map(|&d| (d as u16).to_le_bytes()));
                } else {
                    shuffle(&mut self.shuffled, self.deltas.iter().map(|&d| d.to_le_bytes()));
                }
                if narrow_values {
                    // Exact: every value is a whole number in 0..=65535 (checked above).
                    shuffle(&mut self.shuffled, data.iter().map(|&v| (v as u16).to_le_bytes()));
                } else {
                    shuffle(&mut self.shuffled, data.iter().map(|v| v.to_bits().to_le_bytes()));
                }
            }
        }
        self.out.clear();
        self.out.reserve(zstd::zstd_safe::compress_bound(self.shuffled.len()));
        self.compressor.compress_to_buffer(&self.shuffled, &mut self.out)?;
        Ok(&self.out)
    }
}

/// Whether `v` is a whole number from 0 to 65,535 that a u16 gives back bit for bit (not -0.0).
fn is_u16_whole(v: f32) -> bool {
    (0.0..=65535.0).contains(&v) && v.fract() == 0.0 && v.to_bits() != 0x8000_0000
}

/// Appends the words' bytes to `out` as `N` planes: all first bytes, then all second bytes, ...
fn shuffle<const N: usize>(out: &mut Vec<u8>, words: impl ExactSizeIterator<Item = [u8; N]>) {
    let n = words.len();
    let base = out.len();
    out.resize(base + n * N, 0);
    let planes = &mut out[base..];
    for (i, bytes) in words.enumerate() {
        for (k, b) in bytes.into_iter().enumerate() {
            planes[k * n + i] = b;
        }
    }
}

/// The `n` little-endian 32-bit words whose bytes were split into four planes of `n` bytes, each
/// put through `word` and written to `out` (replacing its contents). One indexed loop over four
/// slices of exactly `n` bytes: no bounds checks left in it, and the compiler vectorises it.
fn unshuffle4_into<T>(planes: &[u8], n: usize, out: &mut Vec<T>, word: impl Fn(u32) -> T) {
    let (p0, rest) = planes.split_at(n);
    let (p1, rest) = rest.split_at(n);
    let (p2, p3) = rest.split_at(n);
    let p3 = &p3[..n];
    out.clear();
    out.extend((0..n).map(|i| {
        word(u32::from(p0[i]) | (u32::from(p1[i]) << 8) | (u32::from(p2[i]) << 16) | (u32::from(p3[i]) << 24))
    }));
}

/// The same for 16-bit words in two planes.
fn unshuffle2_into<T>(planes: &[u8], n: usize, out: &mut Vec<T>, word: impl Fn(u16) -> T) {
    let (p0, p1) = planes.split_at(n);
    let p1 = &p1[..n];
    out.clear();
    out.extend((0..n).map(|i| word(u16::from(p0[i]) | (u16::from(p1[i]) << 8))));
}

/// Decompresses blocks; reuses its buffers.
pub(crate) struct BlockDecoder {
    decompressor: Decompressor<'static>,
    planes: Planes,
    shuffled: Vec<u8>,
}

impl BlockDecoder {
    pub(crate) fn new(planes: Planes) -> io::Result<BlockDecoder> {
        Ok(BlockDecoder { decompressor: Decompressor::new()?, planes, shuffled: Vec::new() })
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
        // At most a header byte and 8 bytes per entry: a frame claiming more is an error below.
        self.shuffled.reserve(nnz * 8 + 1);
        let n =
            self.decompressor.decompress_to_buffer(compressed, &mut self.shuffled).map_err(|e| format!("zstd: {e}"))?;
        let (index_bytes, value_bytes, body) = match self.planes {
            Planes::Wide => (4, 4, &self.shuffled[..n]),
            Planes::Narrow => {
                let Some((&header, body)) = self.shuffled[..n].split_first() else {
                    return Err(format!("decompressed to 0 bytes, expected a header byte and {nnz} entries"));
                };
                if header & !(NARROW_INDICES | NARROW_VALUES) != 0 {
                    return Err(format!("unknown block header {header:#04x}"));
                }
                let width = |bit: u8| if header & bit != 0 { 2 } else { 4 };
                (width(NARROW_INDICES), width(NARROW_VALUES), body)
            }
        };
        let expected = nnz * (index_bytes + value_bytes);
        if body.len() != expected {
            return Err(format!("decompressed to {} bytes, expected {expected} for {nnz} entries", body.len()));
        }
        let (idx_planes, val_planes) = body.split_at(nnz * index_bytes);
        if index_bytes == 2 {
            unshuffle2_into(idx_planes, nnz, indices, u32::from);
        } else {
            unshuffle4_into(idx_planes, nnz, indices, |w| w);
        }
        let values_checked = value_bytes == 2;
        if values_checked {
            // Whole numbers 0..=65535: finite and >= 0 by construction.
            unshuffle2_into(val_planes, nnz, data, f32::from);
        } else {
            unshuffle4_into(val_planes, nnz, data, f32::from_bits);
        }
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
        if values_checked {
            return Ok(());
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

    fn round_trip(planes: Planes, indptr: &[u64], indices: &[u32], data: &[f32]) -> Result<Vec<u8>, String> {
        let mut enc = BlockEncoder::new(3, planes).map_err(|e| e.to_string())?;
        let frame = enc.encode(indptr, indices, data).map_err(|e| e.to_string())?.to_vec();
        let mut dec = BlockDecoder::new(planes).map_err(|e| e.to_string())?;
        let (mut i, mut d) = (Vec::new(), Vec::new());
        let abs: Vec<u64> = indptr.iter().map(|x| x + 100).collect();
        dec.decode(&frame, &abs, 5_000_000, &mut i, &mut d)?;
        assert_eq!(i, indices);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&d), bits(data), "values must come back bit for bit");
        Ok(frame)
    }

    fn header(frame: &[u8]) -> Result<u8, String> {
        let plain = zstd::bulk::decompress(frame, 1 << 20).map_err(|e| e.to_string())?;
        plain.first().copied().ok_or_else(|| "empty block".to_owned())
    }

    #[test]
    fn blocks_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let indptr = [0u64, 3, 3, 5];
        let indices = [1u32, 7, 9, 0, 4_000_000];
        let data = [1.0f32, 2.5, 3.0, 0.0, 7.0];
        for planes in [Planes::Wide, Planes::Narrow] {
            let frame = round_trip(planes, &indptr, &indices, &data)?;
            let mut dec = BlockDecoder::new(planes)?;
            let (mut i, mut d) = (Vec::new(), Vec::new());
            let abs: Vec<u64> = indptr.iter().map(|x| x + 100).collect();
            let err = dec.decode(&frame, &abs, 10, &mut i, &mut d).unwrap_err();
            assert_eq!(err, "row 2 of the block: column index 4000000 out of range, expected < 10");
            let short = [0u64, 3, 3, 4];
            assert!(dec.decode(&frame, &short, 5_000_000, &mut i, &mut d).unwrap_err().contains("expected 32"));
            assert!(dec.decode(&frame[..frame.len() / 2], &abs, 5_000_000, &mut i, &mut d).is_err());
            // Values follow the stored-row rule too: finite and >= 0.
            let mut enc = BlockEncoder::new(3, planes)?;
            let negative = enc.encode(&indptr, &indices, &[1.0, 2.5, -3.0, 0.0, 7.0])?.to_vec();
            let err = dec.decode(&negative, &abs, 5_000_000, &mut i, &mut d).unwrap_err();
            assert_eq!(
                err,
                "row 0 of the block, column 9: value -3 is negative (expected counts or normalised expression, >= 0)"
            );
        }
        Ok(())
    }

    #[test]
    fn narrow_blocks_use_16_bits_only_where_every_entry_fits() -> Result<(), Box<dyn std::error::Error>> {
        let indptr = [0u64, 3, 5];
        // Counts with small gaps: both arrays in 16 bits.
        let frame = round_trip(Planes::Narrow, &indptr, &[1, 7, 65_535, 0, 65_535], &[1.0, 65_535.0, 3.0, 0.0, 7.0])?;
        assert_eq!(header(&frame)?, NARROW_INDICES | NARROW_VALUES);
        // A gap above 65,535 (the first index of a row counts as one) widens the indices only.
        let frame = round_trip(Planes::Narrow, &indptr, &[1, 7, 65_543, 65_536, 70_000], &[1.0, 2.0, 3.0, 0.0, 7.0])?;
        assert_eq!(header(&frame)?, NARROW_VALUES);
        // A fraction, a value above 65,535 or a -0.0 widens the values only.
        for odd in [2.5f32, 65_536.0, -0.0, 1e-30] {
            let frame = round_trip(Planes::Narrow, &indptr, &[1, 7, 9, 0, 4], &[1.0, odd, 3.0, 0.0, 7.0])?;
            assert_eq!(header(&frame)?, NARROW_INDICES, "{odd}");
        }
        // An empty block and empty rows.
        round_trip(Planes::Narrow, &[0, 0, 0], &[], &[])?;
        round_trip(Planes::Wide, &[0, 0, 0], &[], &[])?;
        Ok(())
    }

    #[test]
    fn a_narrow_block_with_a_wrong_header_is_an_error() -> Result<(), Box<dyn std::error::Error>> {
        let mut dec = BlockDecoder::new(Planes::Narrow)?;
        let (mut i, mut d) = (Vec::new(), Vec::new());
        let frame = |plain: &[u8]| zstd::bulk::compress(plain, 3);
        let err = dec.decode(&frame(&[4, 1, 0, 1, 0])?, &[0, 1], 10, &mut i, &mut d).unwrap_err();
        assert_eq!(err, "unknown block header 0x04");
        let err = dec.decode(&frame(&[])?, &[0, 1], 10, &mut i, &mut d).unwrap_err();
        assert!(err.contains("expected a header byte"), "{err}");
        // Header 3 (both 16-bit) with one entry is 5 bytes; 9 is the wide size.
        let err = dec.decode(&frame(&[3, 1, 0, 1, 0, 0, 0, 0, 0])?, &[0, 1], 10, &mut i, &mut d).unwrap_err();
        assert_eq!(err, "decompressed to 8 bytes, expected 4 for 1 entries");
        dec.decode(&frame(&[3, 1, 0, 2, 0])?, &[0, 1], 10, &mut i, &mut d)?;
        assert_eq!((i.as_slice(), d.as_slice()), (&[1u32][..], &[2.0f32][..]));
        Ok(())
    }
}
