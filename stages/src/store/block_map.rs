//! Which zstd block holds a row. Blocks hold `block_rows` rows, cut from the first row of each
//! run: a store written whole is one run; each append starts a run after the last block of the
//! version before (which may hold fewer rows), so that no block of an earlier version is
//! rewritten ([`Manifest::block_runs`](cpa_stream_schemas::Manifest::block_runs)).

use std::ops::Range;

/// Rows to blocks of one zstd store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    block_rows: u64,
    n_obs: u64,
    /// (first row, first block) of each run, the first at (0, 0); rows and blocks increasing.
    runs: Vec<[u64; 2]>,
}

impl BlockMap {
    /// The blocks of `n_obs` rows cut every `block_rows` rows from each of `runs` (as
    /// [`Manifest::runs`](cpa_stream_schemas::Manifest::runs) lists them, checked there).
    pub fn new(block_rows: u64, n_obs: u64, runs: Vec<[u64; 2]>) -> BlockMap {
        let runs = if runs.is_empty() { vec![[0, 0]] } else { runs };
        BlockMap { block_rows: block_rows.max(1), n_obs, runs }
    }

    /// Rows of a block (the last of a run may hold fewer).
    pub fn block_rows(&self) -> u64 {
        self.block_rows
    }

    /// Blocks of the store.
    pub fn n_blocks(&self) -> u64 {
        let [row, block] = self.runs[self.runs.len() - 1];
        block + self.n_obs.saturating_sub(row).div_ceil(self.block_rows)
    }

    /// The run holding row `row`.
    #[inline]
    fn run_of_row(&self, row: u64) -> usize {
        match self.runs.len() {
            1 => 0,
            _ => self.runs.partition_point(|r| r[0] <= row).saturating_sub(1),
        }
    }

    /// The block holding row `row`.
    #[inline]
    pub fn block_of(&self, row: u64) -> u64 {
        let [first_row, first_block] = self.runs[self.run_of_row(row)];
        first_block + (row - first_row) / self.block_rows
    }

    /// The rows of block `b` (empty past the last block).
    pub fn rows_of(&self, b: u64) -> Range<u64> {
        let k = self.runs.partition_point(|r| r[1] <= b).saturating_sub(1);
        let [first_row, first_block] = self.runs[k];
        let run_end = self.runs.get(k + 1).map_or(self.n_obs, |r| r[0]);
        let start = first_row.saturating_add((b - first_block).saturating_mul(self.block_rows)).min(run_end);
        start..start.saturating_add(self.block_rows).min(run_end)
    }

    /// The blocks wholly inside rows `rows`.
    pub fn blocks_within(&self, rows: Range<u64>) -> Range<u64> {
        let end = rows.end.min(self.n_obs);
        if rows.start >= end {
            return 0..0;
        }
        let first = self.block_of(rows.start);
        let first = if self.rows_of(first).start == rows.start { first } else { first + 1 };
        let last = if end == self.n_obs { self.n_blocks() } else { self.block_of(end) };
        first..last.max(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_blocks_map_both_ways_across_runs() {
        // Rows 0..6 in blocks of 4 (block 1 holds rows 4 and 5), an append of rows 6..11 (blocks
        // 2, 3), another of rows 11..12 (block 4).
        let map = BlockMap::new(4, 12, vec![[0, 0], [6, 2], [11, 4]]);
        assert_eq!(map.n_blocks(), 5);
        let blocks: Vec<u64> = (0..12).map(|r| map.block_of(r)).collect();
        assert_eq!(blocks, [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4]);
        let rows: Vec<Range<u64>> = (0..6).map(|b| map.rows_of(b)).collect();
        assert_eq!(rows, [0..4, 4..6, 6..10, 10..11, 11..12, 12..12]);
        for b in 0..map.n_blocks() {
            assert!(map.rows_of(b).all(|r| map.block_of(r) == b));
        }
        assert_eq!(map.blocks_within(0..12), 0..5);
        assert_eq!(map.blocks_within(1..10), 1..3);
        assert_eq!(map.blocks_within(4..6), 1..2);
        assert_eq!(map.blocks_within(5..6), 2..2);
        let whole = BlockMap::new(4, 10, Vec::new());
        assert_eq!((whole.n_blocks(), whole.block_of(9), whole.rows_of(2)), (3, 2, 8..10));
        // Beyond 2^32 rows (a store grown past four billion cells): u64 all the way.
        let first = (1u64 << 32) + 5;
        let tall = BlockMap::new(256, first + 1000, vec![[0, 0], [first, first.div_ceil(256)]]);
        let b = tall.block_of(first + 999);
        assert_eq!(tall.rows_of(b), first + 768..first + 1000);
        assert_eq!(tall.n_blocks(), b + 1);
    }
}
