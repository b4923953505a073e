//! The zstd block codec.
//!
//! A block holds `block_rows` consecutive rows (the last may hold fewer). Its plain form is the
//! rows' column indices, delta-coded within each row (first index absolute), followed by their
//! values; each array is byte-shuffled (all first bytes, then all second bytes, ...) before one
//! zstd frame compresses the whole. Row boundaries come from `X/indptr`, which stays
//! uncompressed, so the size of every block's entries is known before decompressing.
//!
//! A damaged block is an error when read ([`BlockChecksum`]): stores written now follow each
//! frame with the XXH3-64 of its bytes, checked before decompressing; older ones rely on zstd's
//! content checksum inside the frame (XXH64 of the decompressed bytes, which hashing cost about
//! 15% of a block's decode).
//!
//! Two layouts of the plain form ([`Planes`]): `wide` stores both arrays as four planes of 32-bit
//! words. `narrow` starts with a header byte (bit 0: index deltas in two planes of 16-bit words,
//! bit 1: values in two planes of 16-bit whole numbers; other bits 0) and uses the 16-bit form
//! for an array wherever the block allows it: all deltas (first indices included) up to 65,535,
//! all values whole numbers from 0 to 65,535 (a `-0.0` keeps the block at 32 bits, so every value
//! comes back bit for bit). On counts that halves the bytes zstd has to produce and the planes to
//! undo: the block decodes about 1.5x faster and compresses about 15% smaller.

use std::io;

use cpa_stream_schemas::{BlockChecksum, Planes};
use zstd::bulk::{Compressor, Decompressor};

use crate::counts_csr::CsrBatch;

/// Header bit of a narrow block: index deltas in two 16-bit planes.
const NARROW_INDICES: u8 = 1;
/// Header bit of a narrow block: values as whole numbers in two 16-bit planes.
const NARROW_VALUES: u8 = 2;

/// Compresses blocks; owns its scratch buffers so that steady-state encoding does not allocate.
pub(crate) struct BlockEncoder {
    compressor: Compressor<'static>,
    planes: Planes,
    checksum: BlockChecksum,
    deltas: Vec<u32>,
    shuffled: Vec<u8>,
    out: Vec<u8>,
}

impl BlockEncoder {
    pub(crate) fn new(level: i32, planes: Planes, checksum: BlockChecksum) -> io::Result<BlockEncoder> {
        let mut compressor = Compressor::new(level)?;
        compressor.include_checksum(checksum == BlockChecksum::Content)?;
        Ok(BlockEncoder { compressor, planes, checksum, deltas: Vec::new(), shuffled: Vec::new(), out: Vec::new() })
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
        self.out.reserve(zstd::zstd_safe::compress_bound(self.shuffled.len()) + self.checksum.trailer_bytes());
        self.compressor.compress_to_buffer(&self.shuffled, &mut self.out)?;
        if self.checksum == BlockChecksum::Xxh3_64 {
            let hash = xxhash_rust::xxh3::xxh3_64(&self.out);
            self.out.extend_from_slice(&hash.to_le_bytes());
        }
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

/// A decoded block in its smallest exact form, as the shared block cache keeps it. A narrow
/// block's 16-bit arrays (index deltas, counts) stay the byte planes zstd wrote, in the buffer it
/// wrote them to, and are put together and widened row by row when gathered
/// ([`CompactBlock::push_row`]): the decode is one decompression with no pass of its own over the
/// entries, and it writes and a gather reads half the bytes of the 32-bit form. Wide arrays are
/// undone to absolute u32 indices and f32 values. Checked as [`BlockDecoder::decode`] checks (an
/// error names the row), so a gather cannot fail.
#[derive(Debug, Default)]
pub(crate) struct CompactBlock {
    /// The narrow arrays' planes, each `nnz` bytes: low then high bytes of the index deltas (per
    /// row, the first of a row absolute) when the indices are narrow, then those of the counts
    /// when the values are; after a header byte, which is how zstd wrote them (a narrow block
    /// whose arrays are both wide keeps nothing here).
    planes: Vec<u8>,
    /// Entries of the block.
    nnz: usize,
    /// Wide indices, absolute.
    indices: Vec<u32>,
    /// Wide values.
    values: Vec<f32>,
    narrow_indices: bool,
    narrow_values: bool,
}

/// Where the first plane starts in [`CompactBlock::planes`]: after the block's header byte.
const PLANES_AT: usize = 1;

impl CompactBlock {
    /// Bytes of the arrays in use.
    pub(crate) fn bytes(&self) -> u64 {
        let index_bytes = if self.narrow_indices { self.nnz * 2 } else { self.indices.len() * 4 };
        let value_bytes = if self.narrow_values { self.nnz * 2 } else { self.values.len() * 4 };
        (index_bytes + value_bytes) as u64
    }

    /// Bytes allocated, in use or not.
    pub(crate) fn capacity_bytes(&self) -> u64 {
        (self.planes.capacity() + self.indices.capacity() * 4 + self.values.capacity() * 4) as u64
    }

    /// Entries a block of the same layout fits without growing.
    pub(crate) fn room(&self) -> usize {
        let narrow = 2 * (usize::from(self.narrow_indices) + usize::from(self.narrow_values));
        let in_planes = match narrow {
            0 => usize::MAX,
            n => self.planes.capacity().saturating_sub(PLANES_AT) / n,
        };
        let indices = if self.narrow_indices { usize::MAX } else { self.indices.capacity() };
        let values = if self.narrow_values { usize::MAX } else { self.values.capacity() };
        in_planes.min(indices).min(values)
    }

    /// Empty wide buffers with room for `entries` entries (8 bytes each).
    #[cfg(test)]
    pub(crate) fn with_room(entries: usize) -> CompactBlock {
        CompactBlock { indices: Vec::with_capacity(entries), values: Vec::with_capacity(entries), ..Default::default() }
    }

    /// The low and high planes of entries `start..end` of the narrow array whose planes begin at
    /// `at`.
    fn plane_pair(&self, at: usize, start: usize, end: usize) -> (&[u8], &[u8]) {
        let (low, high) = self.planes[at..at + 2 * self.nnz].split_at(self.nnz);
        (&low[start..end], &high[start..end])
    }

    /// Starts loading the narrow planes of entries `start..end` into the CPU's caches, every
    /// line of them (a hint, see [`prefetch`](super::mmap::prefetch)): the blocks of a window
    /// outgrow the core's own cache, and each row read from them is four short runs of bytes.
    pub(crate) fn prefetch_row(&self, start: usize, end: usize) {
        // A block whose arrays are both wide keeps no planes (not even the header byte).
        let Some(planes) = self.planes.get(PLANES_AT..).filter(|_| self.nnz > 0) else { return };
        let narrow_planes = 2 * (usize::from(self.narrow_indices) + usize::from(self.narrow_values));
        for plane in planes.chunks_exact(self.nnz).take(narrow_planes) {
            super::mmap::prefetch(&plane[start..end], 64);
        }
    }

    /// Appends entries `start..end` (one row of the block) to `out` as a row.
    pub(crate) fn push_row(&self, start: usize, end: usize, out: &mut CsrBatch) {
        let (indices, data) = out.entries_mut();
        if self.narrow_indices {
            let (low, high) = self.plane_pair(PLANES_AT, start, end);
            push_running_sums(low, high, indices);
        } else {
            indices.extend_from_slice(&self.indices[start..end]);
        }
        if self.narrow_values {
            let at = PLANES_AT + if self.narrow_indices { 2 * self.nnz } else { 0 };
            let (low, high) = self.plane_pair(at, start, end);
            data.extend(low.iter().zip(high).map(|(&l, &h)| f32::from(u16::from(l) | (u16::from(h) << 8))));
        } else {
            data.extend_from_slice(&self.values[start..end]);
        }
        out.close_row();
    }
}

/// Appends to `out` the running sums of the 16-bit words whose low and high bytes are `low` and
/// `high`: a row's column indices from its deltas. No overflow: every row's deltas were checked
/// to sum below n_vars. On x86_64 eight words at a time in SSE2 registers: the one-at-a-time
/// sum, which the compiler does not vectorise, took a third of the time of copying a narrow
/// block's rows into a batch.
fn push_running_sums(low: &[u8], high: &[u8], out: &mut Vec<u32>) {
    #[cfg(target_arch = "x86_64")]
    let (low, high, mut at) = sse2::push_running_sums_by_8(low, high, out);
    #[cfg(not(target_arch = "x86_64"))]
    let mut at = 0u32;
    out.extend(words(low, high).map(|word| {
        at += word;
        at
    }));
}

/// The 16-bit words whose low and high bytes are `low` and `high`, widened.
fn words<'a>(low: &'a [u8], high: &'a [u8]) -> impl Iterator<Item = u32> + 'a {
    low.iter().zip(high).map(|(&l, &h)| u32::from(l) | (u32::from(h) << 8))
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use safe_arch::{
        add_i32_m128i, add_i64_m128i, byte_shl_imm_u128_m128i, cmp_eq_mask_i8_m128i, get_i32_from_m128i_s,
        load_unaligned_m128i, m128i, move_mask_i8_m128i, set_i64_m128i_s, shuffle_ai_f32_all_m128i,
        sum_of_u8_abs_diff_m128i, unpack_high_i16_m128i, unpack_low_i8_m128i, unpack_low_i16_m128i, zeroed_m128i,
    };

    /// The parts of `low` and `high` after their whole groups of sixteen bytes.
    pub(super) fn split_at_16s<'a>(low: &'a [u8], high: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        (low.as_chunks::<16>().1, high.as_chunks::<16>().1)
    }

    /// [`delta_stats`](super::delta_stats) of the whole groups of sixteen bytes.
    pub(super) fn delta_stats_by_16(low: &[u8], high: &[u8]) -> (bool, u64, u64) {
        let zero = zeroed_m128i();
        let (mut zeros, mut low_sum, mut high_sum) = (zero, zero, zero);
        for (l, h) in low.as_chunks::<16>().0.iter().zip(high.as_chunks::<16>().0) {
            let (l, h) = (load_unaligned_m128i(l), load_unaligned_m128i(h));
            zeros |= cmp_eq_mask_i8_m128i(l | h, zero);
            low_sum = add_i64_m128i(low_sum, sum_of_u8_abs_diff_m128i(l, zero));
            high_sum = add_i64_m128i(high_sum, sum_of_u8_abs_diff_m128i(h, zero));
        }
        let total = |sums: m128i| <[u64; 2]>::from(sums).iter().sum();
        (move_mask_i8_m128i(zeros) != 0, total(low_sum), total(high_sum))
    }

    /// The four lanes' running sums.
    fn running(words: m128i) -> m128i {
        let words = add_i32_m128i(words, byte_shl_imm_u128_m128i::<4>(words));
        add_i32_m128i(words, byte_shl_imm_u128_m128i::<8>(words))
    }

    /// [`push_running_sums`](super::push_running_sums) for whole groups of eight words; returns
    /// the words left over and the sum so far.
    pub(super) fn push_running_sums_by_8<'a>(
        low: &'a [u8],
        high: &'a [u8],
        out: &mut Vec<u32>,
    ) -> (&'a [u8], &'a [u8], u32) {
        let (low_groups, low_rest) = low.as_chunks::<8>();
        let (high_groups, high_rest) = high.as_chunks::<8>();
        out.reserve(low.len());
        let zero = zeroed_m128i();
        // The sum so far in every lane.
        let mut carry = zero;
        for (l, h) in low_groups.iter().zip(high_groups) {
            let bytes =
                unpack_low_i8_m128i(set_i64_m128i_s(i64::from_le_bytes(*l)), set_i64_m128i_s(i64::from_le_bytes(*h)));
            let first = add_i32_m128i(running(unpack_low_i16_m128i(bytes, zero)), carry);
            carry = shuffle_ai_f32_all_m128i::<0xFF>(first);
            let second = add_i32_m128i(running(unpack_high_i16_m128i(bytes, zero)), carry);
            carry = shuffle_ai_f32_all_m128i::<0xFF>(second);
            out.extend_from_slice(&<[u32; 4]>::from(first));
            out.extend_from_slice(&<[u32; 4]>::from(second));
        }
        (low_rest, high_rest, get_i32_from_m128i_s(carry) as u32)
    }
}

/// Decompresses blocks; reuses its buffers.
pub(crate) struct BlockDecoder {
    decompressor: Decompressor<'static>,
    planes: Planes,
    checksum: BlockChecksum,
    shuffled: Vec<u8>,
}

/// Where the arrays of a decompressed block are: bytes per index and per value (2 or 4), and the
/// plain body's range in the decoder's buffer.
struct Body {
    index_bytes: usize,
    value_bytes: usize,
    range: std::ops::Range<usize>,
}

impl BlockDecoder {
    pub(crate) fn new(planes: Planes, checksum: BlockChecksum) -> io::Result<BlockDecoder> {
        Ok(BlockDecoder { decompressor: Decompressor::new()?, planes, checksum, shuffled: Vec::new() })
    }

    /// Decompresses a block of `nnz` entries into the decoder's buffer and checks its size.
    fn decompress(&mut self, block: &[u8], nnz: usize) -> Result<Body, String> {
        let frame = checked_frame(block, self.checksum)?;
        decompress_into(&mut self.decompressor, self.planes, frame, nnz, &mut self.shuffled)
    }

    /// Decodes a block whose rows have the absolute offsets `indptr` into `indices` and `data`
    /// (replacing their contents). Checks the plain size, and that indices are strictly increasing
    /// within each row and below `n_vars`, and the values (the stored-row rule,
    /// [`check_row`](crate::counts_csr::check_row)); the error says which row of the block is wrong.
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        indptr: &[u64],
        n_vars: u64,
        indices: &mut Vec<u32>,
        data: &mut Vec<f32>,
    ) -> Result<(), String> {
        let nnz = (indptr[indptr.len() - 1] - indptr[0]) as usize;
        let body = self.decompress(block, nnz)?;
        let (idx_planes, val_planes) = self.shuffled[body.range].split_at(nnz * body.index_bytes);
        if body.index_bytes == 2 {
            unshuffle2_into(idx_planes, nnz, indices, u32::from);
        } else {
            unshuffle4_into(idx_planes, nnz, indices, |w| w);
        }
        if body.value_bytes == 2 {
            // Whole numbers 0..=65535: finite and >= 0 by construction.
            unshuffle2_into(val_planes, nnz, data, f32::from);
        } else {
            unshuffle4_into(val_planes, nnz, data, f32::from_bits);
        }
        undo_deltas(indptr, indices, n_vars)?;
        if body.value_bytes == 4 {
            check_values(indptr, indices, data, n_vars)?;
        }
        Ok(())
    }

    /// Decodes a block as [`decode`](BlockDecoder::decode) does (the same checks and errors) into
    /// its compact form. A narrow store's block is decompressed into `out`'s own buffer, whose
    /// 16-bit planes it keeps as they are.
    pub(crate) fn decode_compact(
        &mut self,
        block: &[u8],
        indptr: &[u64],
        n_vars: u64,
        out: &mut CompactBlock,
    ) -> Result<(), String> {
        let nnz = (indptr[indptr.len() - 1] - indptr[0]) as usize;
        out.nnz = nnz;
        out.indices.clear();
        out.values.clear();
        if self.planes == Planes::Wide {
            out.planes.clear();
            (out.narrow_indices, out.narrow_values) = (false, false);
            let body = self.decompress(block, nnz)?;
            let (idx_planes, val_planes) = self.shuffled[body.range].split_at(nnz * 4);
            unshuffle4_into(idx_planes, nnz, &mut out.indices, |w| w);
            unshuffle4_into(val_planes, nnz, &mut out.values, f32::from_bits);
            undo_deltas(indptr, &mut out.indices, n_vars)?;
            return check_values(indptr, &out.indices, &out.values, n_vars);
        }
        let frame = checked_frame(block, self.checksum)?;
        let body = decompress_into(&mut self.decompressor, self.planes, frame, nnz, &mut out.planes)?;
        out.narrow_indices = body.index_bytes == 2;
        out.narrow_values = body.value_bytes == 2;
        let values_at = PLANES_AT + nnz * body.index_bytes;
        if !out.narrow_values {
            unshuffle4_into(&out.planes[values_at..], nnz, &mut out.values, f32::from_bits);
            out.planes.truncate(values_at);
        }
        if out.narrow_indices {
            let (low, high) = out.planes[PLANES_AT..PLANES_AT + 2 * nnz].split_at(nnz);
            check_narrow_deltas(indptr, low, high, n_vars)?;
            if !out.narrow_values && !values_ok(&out.values) {
                // Only a block with a bad value needs absolute indices, for the error's words.
                let mut absolute: Vec<u32> = words(low, high).collect();
                undo_deltas(indptr, &mut absolute, n_vars)?;
                check_values(indptr, &absolute, &out.values, n_vars)?;
            }
        } else {
            unshuffle4_into(&out.planes[PLANES_AT..], nnz, &mut out.indices, |w| w);
            undo_deltas(indptr, &mut out.indices, n_vars)?;
            if out.narrow_values {
                // Only the counts' planes stay, right after the header byte.
                out.planes.copy_within(values_at..values_at + 2 * nnz, PLANES_AT);
                out.planes.truncate(PLANES_AT + 2 * nnz);
            } else {
                out.planes.clear();
                check_values(indptr, &out.indices, &out.values, n_vars)?;
            }
        }
        Ok(())
    }
}

/// The zstd frame of a stored block, once its checksum (if it carries one after the frame)
/// matches its bytes.
fn checked_frame(block: &[u8], checksum: BlockChecksum) -> Result<&[u8], String> {
    match checksum {
        BlockChecksum::Content => Ok(block),
        BlockChecksum::Xxh3_64 => {
            let Some((frame, stored)) = block.split_last_chunk::<8>() else {
                return Err(format!("{} bytes, too short for a block and its 8-byte checksum", block.len()));
            };
            let (stored, actual) = (u64::from_le_bytes(*stored), xxhash_rust::xxh3::xxh3_64(frame));
            if stored != actual {
                return Err(format!(
                    "checksum mismatch: the block's bytes hash to {actual:016x}, stored {stored:016x} (the file is damaged)"
                ));
            }
            Ok(frame)
        }
    }
}

/// Decompresses a block of `nnz` entries into `out` (replacing its contents) and checks its
/// size. `out` grows to the size the frame declares when that is a possible one, else to the
/// largest possible, so that a reused buffer is not grown beyond what the block needs.
fn decompress_into(
    decompressor: &mut Decompressor<'static>,
    planes: Planes,
    compressed: &[u8],
    nnz: usize,
    out: &mut Vec<u8>,
) -> Result<Body, String> {
    out.clear();
    // At most a header byte and 8 bytes per entry. A frame that says it holds more is an error
    // before it is decompressed; one that holds more than it says is one when decompressed.
    let header = usize::from(planes == Planes::Narrow);
    let largest = nnz * 8 + header;
    let declared = zstd::zstd_safe::get_frame_content_size(compressed).ok().flatten();
    if let Some(declared) = declared.filter(|&n| n > largest as u64) {
        return Err(format!(
            "decompresses to {} bytes, expected at most {} for {nnz} entries",
            declared - header as u64,
            largest - header
        ));
    }
    out.reserve(declared.map_or(largest, |n| n as usize));
    let n = decompressor.decompress_to_buffer(compressed, out).map_err(|e| format!("zstd: {e}"))?;
    let (index_bytes, value_bytes, start) = match planes {
        Planes::Wide => (4, 4, 0),
        Planes::Narrow => {
            let Some(&header) = out[..n].first() else {
                return Err(format!("decompressed to 0 bytes, expected a header byte and {nnz} entries"));
            };
            if header & !(NARROW_INDICES | NARROW_VALUES) != 0 {
                return Err(format!("unknown block header {header:#04x}"));
            }
            let width = |bit: u8| if header & bit != 0 { 2 } else { 4 };
            (width(NARROW_INDICES), width(NARROW_VALUES), 1)
        }
    };
    let expected = nnz * (index_bytes + value_bytes);
    if n - start != expected {
        return Err(format!("decompressed to {} bytes, expected {expected} for {nnz} entries", n - start));
    }
    Ok(Body { index_bytes, value_bytes, range: start..n })
}

/// The rows (offsets `indptr` from its first) of a block's entries: `(row, start..end)`.
fn block_rows(indptr: &[u64]) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
    let base = indptr[0];
    indptr.windows(2).enumerate().map(move |(row, w)| (row, (w[0] - base) as usize..(w[1] - base) as usize))
}

/// Undoes the per-row delta coding of `indices` in place. A row is fine when no delta after its
/// first is 0 (strictly increasing) and its last index is below n_vars; the exact complaint is
/// worked out only for a row that is not.
fn undo_deltas(indptr: &[u64], indices: &mut [u32], n_vars: u64) -> Result<(), String> {
    for (row, range) in block_rows(indptr) {
        let Some((&mut first, rest)) = indices[range.clone()].split_first_mut() else { continue };
        // Two branch-free reductions (vectorised), then the prefix sum.
        let repeated = rest.iter().fold(false, |any, &c| any | (c == 0));
        let last = rest.iter().fold(u64::from(first), |sum, &c| sum + u64::from(c));
        if repeated || last >= n_vars {
            return Err(delta_error(row, &indices[range], n_vars));
        }
        let mut prev = first;
        for c in rest.iter_mut() {
            // No overflow: the sum of the deltas is below n_vars.
            prev += *c;
            *c = prev;
        }
    }
    Ok(())
}

/// The checks of [`undo_deltas`] on 16-bit deltas, which stay deltas, in their low and high
/// byte planes.
fn check_narrow_deltas(indptr: &[u64], low: &[u8], high: &[u8], n_vars: u64) -> Result<(), String> {
    for (row, range) in block_rows(indptr) {
        let (low, high) = (&low[range.clone()], &high[range.clone()]);
        if low.is_empty() {
            continue;
        }
        // A delta is 0 when both its bytes are; the row's sum is that of the low bytes plus 256
        // times that of the high ones.
        let (repeated, low_sum, high_sum) = delta_stats(&low[1..], &high[1..]);
        let sum = u64::from(low[0]) + low_sum + ((u64::from(high[0]) + high_sum) << 8);
        if repeated || sum >= n_vars {
            let wide: Vec<u32> = words(low, high).collect();
            return Err(delta_error(row, &wide, n_vars));
        }
    }
    Ok(())
}

/// Whether any of the 16-bit words whose low and high bytes are `low` and `high` is 0, and the
/// sums of the low and of the high bytes. On x86_64 sixteen words at a time in SSE2 registers
/// (one `psadbw` per sum): the plain reductions, which the compiler widens to 32-bit lanes eight
/// bytes at a time, took a tenth of a worker's time on a zstd store when measured.
fn delta_stats(low: &[u8], high: &[u8]) -> (bool, u64, u64) {
    #[cfg(target_arch = "x86_64")]
    let ((low, high), found) = (sse2::split_at_16s(low, high), sse2::delta_stats_by_16(low, high));
    #[cfg(not(target_arch = "x86_64"))]
    let found = (false, 0, 0);
    let repeated = low.iter().zip(high).fold(found.0, |any, (&l, &h)| any | (l | h == 0));
    (repeated, found.1 + byte_sum(low), found.2 + byte_sum(high))
}

/// The sum of `bytes`, in 32-bit sums of up to 2^24 bytes (which cannot overflow and vectorise
/// well, unlike one 64-bit sum).
fn byte_sum(bytes: &[u8]) -> u64 {
    bytes.chunks(1 << 24).map(|chunk| u64::from(chunk.iter().map(|&b| u32::from(b)).sum::<u32>())).sum()
}

/// Whether every value is finite and >= 0 (-0.0 included). A value is when its bits, with -0.0
/// taken as 0.0, are below those of +inf (NaNs and negatives are above): one branch-free max.
fn values_ok(data: &[f32]) -> bool {
    let highest = data.iter().fold(0u32, |m, v| {
        let bits = v.to_bits();
        m.max(if bits == 0x8000_0000 { 0 } else { bits })
    });
    highest < f32::INFINITY.to_bits()
}

/// Checks that every value is finite and >= 0; the error names the row, worked out with
/// [`check_row`](crate::counts_csr::check_row) over the block's absolute `indices`.
fn check_values(indptr: &[u64], indices: &[u32], data: &[f32], n_vars: u64) -> Result<(), String> {
    if values_ok(data) {
        return Ok(());
    }
    let n_cols = u32::try_from(n_vars).unwrap_or(u32::MAX);
    for (row, range) in block_rows(indptr) {
        crate::counts_csr::check_row(&indices[range.clone()], &data[range], n_cols)
            .map_err(|e| format!("row {row} of the block{e}"))?;
    }
    Ok(())
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

    /// Decodes `frame` both ways, [`BlockDecoder::decode`] and [`BlockDecoder::decode_compact`]
    /// with every row gathered, asserts that they agree (the same entries bit for bit, or the
    /// same error), and returns the entries.
    fn decode_both(
        dec: &mut BlockDecoder,
        frame: &[u8],
        indptr: &[u64],
        n_vars: u64,
    ) -> Result<(Vec<u32>, Vec<f32>), String> {
        let (mut i, mut d) = (Vec::new(), Vec::new());
        let full = dec.decode(frame, indptr, n_vars, &mut i, &mut d).map(|()| (i, d));
        let mut block = CompactBlock::default();
        let compact = dec.decode_compact(frame, indptr, n_vars, &mut block).map(|()| {
            let mut batch = CsrBatch::new(u32::try_from(n_vars).unwrap_or(u32::MAX));
            let base = indptr[0];
            for w in indptr.windows(2) {
                // A hint with no effect on the rows, but it slices the planes as push_row does.
                block.prefetch_row((w[0] - base) as usize, (w[1] - base) as usize);
                block.push_row((w[0] - base) as usize, (w[1] - base) as usize, &mut batch);
            }
            let rows = (0..batch.n_rows()).map(|r| batch.row(r));
            let (i, d): (Vec<Vec<u32>>, Vec<Vec<f32>>) = rows.map(|(i, d)| (i.to_vec(), d.to_vec())).unzip();
            (i.concat(), d.concat())
        });
        let bits = |r: &Result<(Vec<u32>, Vec<f32>), String>| {
            r.as_ref()
                .map(|(i, d)| (i.clone(), d.iter().map(|x| x.to_bits()).collect::<Vec<_>>()))
                .map_err(|e| e.clone())
        };
        assert_eq!(bits(&full), bits(&compact), "the compact decode must agree with the full one");
        if full.is_ok() {
            // The compact form holds at most the bytes of the full one.
            assert!(block.bytes() <= (full.as_ref().map_or(0, |(i, _)| i.len()) * 8) as u64);
        }
        full
    }

    /// Both checksums, the current one first.
    const CHECKSUMS: [BlockChecksum; 2] = [BlockChecksum::Xxh3_64, BlockChecksum::Content];

    fn round_trip(
        planes: Planes,
        checksum: BlockChecksum,
        indptr: &[u64],
        indices: &[u32],
        data: &[f32],
    ) -> Result<Vec<u8>, String> {
        let mut enc = BlockEncoder::new(3, planes, checksum).map_err(|e| e.to_string())?;
        let frame = enc.encode(indptr, indices, data).map_err(|e| e.to_string())?.to_vec();
        let mut dec = BlockDecoder::new(planes, checksum).map_err(|e| e.to_string())?;
        let abs: Vec<u64> = indptr.iter().map(|x| x + 100).collect();
        let (i, d) = decode_both(&mut dec, &frame, &abs, 5_000_000)?;
        assert_eq!(i, indices);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&d), bits(data), "values must come back bit for bit");
        Ok(frame)
    }

    /// The header byte of a narrow block as written now (with its checksum after the frame).
    fn header(block: &[u8]) -> Result<u8, String> {
        let frame = checked_frame(block, BlockChecksum::Xxh3_64)?;
        let plain = zstd::bulk::decompress(frame, 1 << 20).map_err(|e| e.to_string())?;
        plain.first().copied().ok_or_else(|| "empty block".to_owned())
    }

    #[test]
    fn blocks_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let indptr = [0u64, 3, 3, 5];
        let indices = [1u32, 7, 9, 0, 4_000_000];
        let data = [1.0f32, 2.5, 3.0, 0.0, 7.0];
        for (planes, checksum) in [Planes::Wide, Planes::Narrow].into_iter().flat_map(|p| CHECKSUMS.map(|c| (p, c))) {
            let frame = round_trip(planes, checksum, &indptr, &indices, &data)?;
            let mut dec = BlockDecoder::new(planes, checksum)?;
            let abs: Vec<u64> = indptr.iter().map(|x| x + 100).collect();
            let err = decode_both(&mut dec, &frame, &abs, 10).unwrap_err();
            assert_eq!(err, "row 2 of the block: column index 4000000 out of range, expected < 10");
            let short = [0u64, 3, 3, 4];
            let err = decode_both(&mut dec, &frame, &short, 5_000_000).unwrap_err();
            assert_eq!(err, "decompresses to 40 bytes, expected at most 32 for 4 entries");
            assert!(decode_both(&mut dec, &frame[..frame.len() / 2], &abs, 5_000_000).is_err());
            // Values follow the stored-row rule too: finite and >= 0.
            let mut enc = BlockEncoder::new(3, planes, checksum)?;
            let negative = enc.encode(&indptr, &indices, &[1.0, 2.5, -3.0, 0.0, 7.0])?.to_vec();
            let err = decode_both(&mut dec, &negative, &abs, 5_000_000).unwrap_err();
            assert_eq!(
                err,
                "row 0 of the block, column 9: value -3 is negative (expected counts or normalised expression, >= 0)"
            );
        }
        Ok(())
    }

    #[test]
    fn damaged_blocks_never_decode_to_other_values() -> Result<(), Box<dyn std::error::Error>> {
        let indptr = [0u64, 40, 80];
        let indices: Vec<u32> = (0..80).map(|k| (k % 40) * 3).collect();
        let data: Vec<f32> = (0..80).map(|k| (k % 7) as f32).collect();
        for checksum in CHECKSUMS {
            let mut enc = BlockEncoder::new(1, Planes::Narrow, checksum)?;
            let block = enc.encode(&indptr, &indices, &data)?.to_vec();
            let mut dec = BlockDecoder::new(Planes::Narrow, checksum)?;
            assert!(decode_both(&mut dec, &block, &indptr, 200).is_ok());
            // Flip every bit in turn: the damage that decodes anyway.
            for (at, bit) in (0..block.len()).flat_map(|at| (0..8).map(move |bit| (at, bit))) {
                let mut damaged = block.clone();
                damaged[at] ^= 1 << bit;
                // Either decode may be the one to fail (with different zstd errors).
                let (mut i, mut d, mut compact) = (Vec::new(), Vec::new(), CompactBlock::default());
                let full = dec.decode(&damaged, &indptr, 200, &mut i, &mut d).is_ok();
                let any = full || dec.decode_compact(&damaged, &indptr, 200, &mut compact).is_ok();
                match checksum {
                    BlockChecksum::Xxh3_64 => assert!(!any, "byte {at} bit {bit} flipped decoded"),
                    // zstd's checksum covers what the frame decodes to, not the frame: a flip
                    // that changes nothing there (a header flag, an unused table entry) passes.
                    BlockChecksum::Content if any => {
                        assert!(full, "byte {at} bit {bit}: one decode failed, the other did not");
                        assert_eq!((i.as_slice(), d.as_slice()), (&indices[..], &data[..]), "byte {at} bit {bit}");
                    }
                    BlockChecksum::Content => {}
                }
            }
        }
        let mut dec = BlockDecoder::new(Planes::Narrow, BlockChecksum::Xxh3_64)?;
        let mut enc = BlockEncoder::new(1, Planes::Narrow, BlockChecksum::Xxh3_64)?;
        let mut block = enc.encode(&indptr, &indices, &data)?.to_vec();
        let last = block.len() - 1;
        block[last] ^= 0x80;
        let err = decode_both(&mut dec, &block, &indptr, 200).unwrap_err();
        assert!(err.starts_with("checksum mismatch: the block's bytes hash to "), "{err}");
        let err = decode_both(&mut dec, &block[..5], &indptr, 200).unwrap_err();
        assert_eq!(err, "5 bytes, too short for a block and its 8-byte checksum");
        Ok(())
    }

    #[test]
    fn narrow_blocks_use_16_bits_only_where_every_entry_fits() -> Result<(), Box<dyn std::error::Error>> {
        let narrow = |indices: &[u32], data: &[f32]| {
            round_trip(Planes::Narrow, BlockChecksum::Xxh3_64, &[0, 3, 5], indices, data)
        };
        // Counts with small gaps: both arrays in 16 bits.
        let frame = narrow(&[1, 7, 65_535, 0, 65_535], &[1.0, 65_535.0, 3.0, 0.0, 7.0])?;
        assert_eq!(header(&frame)?, NARROW_INDICES | NARROW_VALUES);
        // A gap above 65,535 (the first index of a row counts as one) widens the indices only.
        let frame = narrow(&[1, 7, 65_543, 65_536, 70_000], &[1.0, 2.0, 3.0, 0.0, 7.0])?;
        assert_eq!(header(&frame)?, NARROW_VALUES);
        // A fraction, a value above 65,535 or a -0.0 widens the values only.
        for odd in [2.5f32, 65_536.0, -0.0, 1e-30] {
            let frame = narrow(&[1, 7, 9, 0, 4], &[1.0, odd, 3.0, 0.0, 7.0])?;
            assert_eq!(header(&frame)?, NARROW_INDICES, "{odd}");
        }
        // An empty block and empty rows.
        round_trip(Planes::Narrow, BlockChecksum::Xxh3_64, &[0, 0, 0], &[], &[])?;
        round_trip(Planes::Wide, BlockChecksum::Xxh3_64, &[0, 0, 0], &[], &[])?;
        Ok(())
    }

    #[test]
    fn a_reused_compact_block_decodes_every_layout() -> Result<(), Box<dyn std::error::Error>> {
        // One buffer through blocks of each layout and size in turn, as the cache's spares hand
        // buffers on: every gather matches a fresh decode.
        let mut enc = BlockEncoder::new(3, Planes::Narrow, BlockChecksum::Xxh3_64)?;
        let mut dec = BlockDecoder::new(Planes::Narrow, BlockChecksum::Xxh3_64)?;
        let blocks: [(&[u64], &[u32], &[f32]); 5] = [
            (&[0, 2, 5], &[1, 7, 0, 3, 9], &[1.0, 2.0, 3.0, 4.0, 5.0]),
            (&[0, 2, 3], &[1, 70_000, 4], &[1.0, 2.0, 3.0]),
            (&[0, 1, 3], &[5, 0, 9], &[1.5, 2.0, 3.0]),
            (&[0, 3, 4], &[1, 80_000, 90_000, 2], &[0.5, 2.0, 3.0, 1e6]),
            (&[0, 1, 2], &[3, 4], &[6.0, 7.0]),
        ];
        let mut reused = CompactBlock::default();
        for (indptr, indices, data) in blocks.iter().chain(blocks.iter().rev()) {
            let frame = enc.encode(indptr, indices, data)?.to_vec();
            dec.decode_compact(&frame, indptr, 100_000, &mut reused)?;
            assert_eq!(reused.bytes(), {
                let mut fresh = CompactBlock::default();
                dec.decode_compact(&frame, indptr, 100_000, &mut fresh)?;
                fresh.bytes()
            });
            let mut batch = CsrBatch::new(100_000);
            for w in indptr.windows(2) {
                reused.prefetch_row(w[0] as usize, w[1] as usize);
                reused.push_row(w[0] as usize, w[1] as usize, &mut batch);
            }
            let rows: Vec<(Vec<u32>, Vec<f32>)> =
                (0..batch.n_rows()).map(|r| batch.row(r)).map(|(i, d)| (i.to_vec(), d.to_vec())).collect();
            let expected: Vec<(Vec<u32>, Vec<f32>)> = indptr
                .windows(2)
                .map(|w| (indices[w[0] as usize..w[1] as usize].to_vec(), data[w[0] as usize..w[1] as usize].to_vec()))
                .collect();
            assert_eq!(rows, expected);
        }
        Ok(())
    }

    #[test]
    fn running_sums_of_planes_match_the_plain_sum() {
        // Every length around the groups of eight, small and large deltas (high bytes set).
        let mut state = 12_345u32;
        for len in 0..40usize {
            let words: Vec<u16> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (state >> 16) as u16 >> (state % 12)
                })
                .collect();
            let low: Vec<u8> = words.iter().map(|w| w.to_le_bytes()[0]).collect();
            let high: Vec<u8> = words.iter().map(|w| w.to_le_bytes()[1]).collect();
            let mut sums = vec![7u32];
            push_running_sums(&low, &high, &mut sums);
            let expected: Vec<u32> = std::iter::once(7)
                .chain(words.iter().scan(0u32, |at, &w| {
                    *at += u32::from(w);
                    Some(*at)
                }))
                .collect();
            assert_eq!(sums, expected, "{len} words");
        }
    }

    #[test]
    fn narrow_blocks_are_checked_as_wide_ones() -> Result<(), Box<dyn std::error::Error>> {
        let mut enc = BlockEncoder::new(3, Planes::Narrow, BlockChecksum::Xxh3_64)?;
        let mut dec = BlockDecoder::new(Planes::Narrow, BlockChecksum::Xxh3_64)?;
        let indptr = [0u64, 2, 5];
        let mut check = |indices: &[u32], data: &[f32], n_vars: u64, expected_header: u8| {
            let frame = enc.encode(&indptr, indices, data).map_err(|e| e.to_string())?.to_vec();
            assert_eq!(header(&frame)?, expected_header);
            decode_both(&mut dec, &frame, &indptr, n_vars).map(|_| ())
        };
        let counts = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(check(&[1, 7, 0, 3, 9], &counts, 10, NARROW_INDICES | NARROW_VALUES), Ok(()));
        assert_eq!(
            check(&[1, 7, 0, 3, 3], &counts, 10, NARROW_INDICES | NARROW_VALUES),
            Err("row 1 of the block: repeated column index 3".into())
        );
        assert_eq!(
            check(&[1, 7, 0, 3, 9], &counts, 9, NARROW_INDICES | NARROW_VALUES),
            Err("row 1 of the block: column index 9 out of range, expected < 9".into())
        );
        // 16-bit deltas with 32-bit values: a bad value names its row and absolute column.
        assert_eq!(
            check(&[1, 7, 0, 3, 9], &[1.0, 2.0, 3.0, f32::NAN, 5.0], 10, NARROW_INDICES),
            Err("row 1 of the block, column 3: value NaN is not finite".into())
        );
        Ok(())
    }

    #[test]
    fn delta_stats_match_the_plain_reductions() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(7);
        for len in 0..80usize {
            for zero_at in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                let mut low: Vec<u8> = (0..len).map(|_| rng.random_range(1..=255)).collect();
                let mut high: Vec<u8> = (0..len).map(|_| if rng.random_bool(0.2) { rng.random() } else { 0 }).collect();
                if let Some(k) = zero_at.filter(|&k| k < len) {
                    (low[k], high[k]) = (0, 0);
                }
                let sum = |bytes: &[u8]| bytes.iter().map(|&b| u64::from(b)).sum::<u64>();
                let repeated = low.iter().zip(&high).any(|(&l, &h)| l == 0 && h == 0);
                assert_eq!(
                    delta_stats(&low, &high),
                    (repeated, sum(&low), sum(&high)),
                    "len {len}, zero at {zero_at:?}"
                );
            }
        }
    }

    #[test]
    fn long_narrow_rows_are_checked_at_every_position() -> Result<(), Box<dyn std::error::Error>> {
        // Rows long enough for whole groups of sixteen entries and a remainder: a repeated index
        // is found wherever it is, and the deltas' high bytes count towards the last index.
        let mut enc = BlockEncoder::new(3, Planes::Narrow, BlockChecksum::Xxh3_64)?;
        let mut dec = BlockDecoder::new(Planes::Narrow, BlockChecksum::Xxh3_64)?;
        for len in [16usize, 17, 33, 50] {
            // A one-entry row, then `len` strictly increasing indices, deltas up to 299.
            let indptr = [0u64, 1, 1 + len as u64];
            let mut indices = vec![5u32];
            indices.extend((0..len as u32).scan(0u32, |at, k| {
                *at += 1 + k * 37 % 299;
                Some(*at)
            }));
            let data = vec![1.0f32; len + 1];
            let mut check = |indices: &[u32], n_vars: u64| {
                let frame = enc.encode(&indptr, indices, &data).map_err(|e| e.to_string())?.to_vec();
                assert_eq!(header(&frame)?, NARROW_INDICES | NARROW_VALUES);
                decode_both(&mut dec, &frame, &indptr, n_vars).map(|_| ())
            };
            let last = u64::from(indices[len]);
            assert_eq!(check(&indices, last + 1), Ok(()));
            assert_eq!(
                check(&indices, last),
                Err(format!("row 1 of the block: column index {last} out of range, expected < {last}"))
            );
            for k in 2..=len {
                let mut repeated = indices.clone();
                repeated[k] = repeated[k - 1];
                let expected = format!("row 1 of the block: repeated column index {}", repeated[k]);
                assert_eq!(check(&repeated, last + 1), Err(expected), "row of {len}, entry {k}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_narrow_block_with_a_wrong_header_is_an_error() -> Result<(), Box<dyn std::error::Error>> {
        // Bare frames, as blocks were written before the checksum after the frame.
        let mut dec = BlockDecoder::new(Planes::Narrow, BlockChecksum::Content)?;
        let frame = |plain: &[u8]| zstd::bulk::compress(plain, 3);
        let err = decode_both(&mut dec, &frame(&[4, 1, 0, 1, 0])?, &[0, 1], 10).unwrap_err();
        assert_eq!(err, "unknown block header 0x04");
        let err = decode_both(&mut dec, &frame(&[])?, &[0, 1], 10).unwrap_err();
        assert!(err.contains("expected a header byte"), "{err}");
        // Header 3 (both 16-bit) with one entry is 5 bytes; 9 is the wide size.
        let err = decode_both(&mut dec, &frame(&[3, 1, 0, 1, 0, 0, 0, 0, 0])?, &[0, 1], 10).unwrap_err();
        assert_eq!(err, "decompressed to 8 bytes, expected 4 for 1 entries");
        let (i, d) = decode_both(&mut dec, &frame(&[3, 1, 0, 2, 0])?, &[0, 1], 10)?;
        assert_eq!((i.as_slice(), d.as_slice()), (&[1u32][..], &[2.0f32][..]));
        Ok(())
    }
}
