//! Which cells make each batch of an epoch: a block shuffle with an in-buffer shuffle, a new
//! seeded permutation each epoch, or store order.

use cpa_stream_stages::model::config::DEFAULT_BATCH_SIZE;
use cpa_stream_stages::store::Store;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::encoder::{CellLabels, Split};

/// Contiguous cells shuffled as a unit, unless set otherwise (the zstd store's default block rows).
pub const DEFAULT_BLOCK_CELLS: u64 = 256;
/// Blocks whose cells are shuffled together, unless set otherwise.
pub const DEFAULT_SHUFFLE_BLOCKS: usize = 64;

/// How batches are drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Cells per batch (the last of an epoch may have fewer); default the model's
    /// [`DEFAULT_BATCH_SIZE`].
    pub batch_size: usize,
    /// Contiguous cells shuffled as a unit (align with the store's zstd block rows); default
    /// [`DEFAULT_BLOCK_CELLS`].
    pub block_cells: u64,
    /// Blocks whose cells are shuffled together before being cut into batches; default
    /// [`DEFAULT_SHUFFLE_BLOCKS`].
    pub shuffle_blocks: usize,
    /// Consecutive cells that the in-buffer shuffle keeps together (block sampling). 1 shuffles
    /// single cells; k > 1 shuffles runs of k cells, so that a batch is about batch / k runs
    /// of neighbours in the store: fewer scattered reads, less mixing within a batch. Default 1.
    pub run_cells: usize,
    /// Seed of the shuffles (each epoch draws its own from it); default 0.
    pub seed: u64,
    /// Shuffle (training) or read in store order (validation, evaluation); default true.
    pub shuffle: bool,
    /// The part of every batch this process reads (data-parallel training); default the whole.
    pub shard: Shard,
}

/// One process's part of every batch in data-parallel training: every rank plans the same
/// batches (the plan is a function of the seed and the epoch) and takes the `rank`-th of
/// `world` consecutive slices of each, so that the ranks together read each batch once and the
/// batch size stays the size of the whole step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's rank, below `world`.
    pub rank: usize,
    /// The number of processes (at least 1).
    pub world: usize,
}

impl Shard {
    /// The whole batch: training alone.
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    /// The rows of a batch of `n` cells that this rank reads: the `rank`-th of `world` slices
    /// whose sizes differ by at most one (empty where the batch has fewer cells than ranks).
    pub fn range(&self, n: usize) -> std::ops::Range<usize> {
        let world = self.world.max(1);
        (n * self.rank / world)..(n * (self.rank + 1) / world)
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard::WHOLE
    }
}

impl PlanOptions {
    /// These options with the shuffle window narrowed, on a compressed store, so that its
    /// decoded cells fill at most half of `buffer_bytes` at the store's mean cell (the other half
    /// is room for the cells carried over between windows and for the next window's first
    /// blocks, decoded by workers running ahead). A raw store is read in place: unchanged.
    pub fn fitted(&self, store: &Store, buffer_bytes: u64) -> PlanOptions {
        if store.block_rows().is_none() || store.n_obs() == 0 {
            return self.clone();
        }
        let cell_bytes = (store.nnz() * 8).div_ceil(store.n_obs()).max(1);
        let block_bytes = self.block_cells.max(1).saturating_mul(cell_bytes);
        let fit = usize::try_from(buffer_bytes / 2 / block_bytes).unwrap_or(usize::MAX).max(1);
        PlanOptions { shuffle_blocks: self.shuffle_blocks.min(fit).max(1), ..self.clone() }
    }
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            block_cells: DEFAULT_BLOCK_CELLS,
            shuffle_blocks: DEFAULT_SHUFFLE_BLOCKS,
            run_cells: 1,
            seed: 0,
            shuffle: true,
            shard: Shard::WHOLE,
        }
    }
}

/// The batches of one epoch over the cells of `split`, as row lists. With `shuffle`, blocks of
/// `block_cells` cells are permuted with a generator seeded by (seed, epoch), cells of
/// `shuffle_blocks` consecutive blocks are shuffled together (in runs of `run_cells`), and the
/// stream is cut into batches of `batch_size` (the last may be smaller, never a single cell: a
/// last cell alone joins the batch before it). Every cell of the split appears exactly once.
pub struct EpochPlan<'a> {
    labels: &'a CellLabels,
    split: Split,
    options: PlanOptions,
    blocks: Vec<u64>,
    next_block: usize,
    buffer: Vec<u64>,
    taken: usize,
    rng: Xoshiro256PlusPlus,
    /// With `run_cells > 1`: the buffer's runs, and where their permutation is assembled.
    runs: Vec<(usize, usize)>,
    scratch: Vec<u64>,
}

impl<'a> EpochPlan<'a> {
    /// The plan of epoch `epoch` over the cells of `split`.
    pub fn new(labels: &'a CellLabels, split: Split, epoch: u64, options: &PlanOptions) -> EpochPlan<'a> {
        let block = options.block_cells.max(1);
        let n_blocks = labels.n_cells().div_ceil(block);
        let mut rng =
            Xoshiro256PlusPlus::seed_from_u64(options.seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut blocks: Vec<u64> = (0..n_blocks).collect();
        if options.shuffle {
            blocks.shuffle(&mut rng);
        }
        EpochPlan {
            labels,
            split,
            options: PlanOptions {
                block_cells: block,
                batch_size: options.batch_size.max(1),
                run_cells: options.run_cells.max(1),
                ..options.clone()
            },
            blocks,
            next_block: 0,
            buffer: Vec::new(),
            taken: 0,
            rng,
            scratch: Vec::new(),
            runs: Vec::new(),
        }
    }

    /// Refills the buffer with the split's cells of the next window of blocks.
    fn refill(&mut self) {
        self.buffer.drain(..self.taken);
        self.taken = 0;
        let window = if self.options.shuffle { self.options.shuffle_blocks.max(1) } else { 1 };
        let start = self.buffer.len();
        let n = self.labels.n_cells();
        while self.buffer.len() < self.options.batch_size && self.next_block < self.blocks.len() {
            for _ in 0..window {
                if !self.read_next_block(n) {
                    break;
                }
            }
        }
        if !self.options.shuffle {
            return;
        }
        if self.options.run_cells <= 1 {
            self.buffer[start..].shuffle(&mut self.rng);
            // Mix the carried-over cells with the new ones too.
            self.buffer.shuffle(&mut self.rng);
        } else {
            // The carried-over cells are runs of their own: cutting across them and the new
            // cells would split runs in two.
            let k = self.options.run_cells;
            self.runs.clear();
            for (from, to) in [(0, start), (start, self.buffer.len())] {
                self.runs.extend((from..to).step_by(k).map(|s| (s, (s + k).min(to))));
            }
            self.runs.shuffle(&mut self.rng);
            self.scratch.clear();
            for &(s, e) in &self.runs {
                self.scratch.extend_from_slice(&self.buffer[s..e]);
            }
            std::mem::swap(&mut self.buffer, &mut self.scratch);
        }
    }

    /// The next batch's rows (this process's [`Shard`] of them), written into `out` (cleared
    /// first). `false` at the end of the epoch.
    pub fn next_into(&mut self, out: &mut Vec<u64>) -> bool {
        out.clear();
        let rows = self.advance();
        if self.options.shard.world > 1 {
            return self.split(rows, out, &mut Vec::new());
        }
        out.extend_from_slice(&self.buffer[rows.clone()]);
        !rows.is_empty()
    }

    /// As [`next_into`](EpochPlan::next_into), also writing the batch's rows of the other ranks
    /// into `others` (cleared first), whose holds on a block cache this rank gives back.
    pub fn next_split_into(&mut self, out: &mut Vec<u64>, others: &mut Vec<u64>) -> bool {
        out.clear();
        others.clear();
        let rows = self.advance();
        self.split(rows, out, others)
    }

    /// This rank's part of the batch at `rows` of the buffer into `out`, the rest into `others`.
    /// The batch is put in store order first, the order in which the loader hands a whole batch
    /// to the trainer: the ranks' parts, one after the other, are then the batch one process
    /// trains on, row for row.
    fn split(&mut self, rows: std::ops::Range<usize>, out: &mut Vec<u64>, others: &mut Vec<u64>) -> bool {
        let batch = &mut self.buffer[rows.clone()];
        batch.sort_unstable();
        let mine = self.options.shard.range(batch.len());
        out.extend_from_slice(&batch[mine.clone()]);
        others.extend_from_slice(&batch[..mine.start]);
        others.extend_from_slice(&batch[mine.end..]);
        !rows.is_empty()
    }

    /// Passes over the next batch without copying its rows. `false` at the end of the epoch.
    pub fn pass_over(&mut self) -> bool {
        !self.advance().is_empty()
    }

    /// Passes over `gap` batches, then writes the next one into `out` (cleared first): a worker
    /// filling every n-th batch calls it with its index first, then with n - 1. `false` at the end
    /// of the epoch.
    pub fn next_after_into(&mut self, gap: usize, out: &mut Vec<u64>) -> bool {
        for _ in 0..gap {
            if !self.pass_over() {
                out.clear();
                return false;
            }
        }
        self.next_into(out)
    }

    /// The next batch's place in the buffer (empty at the end of the epoch). The epoch's last
    /// cell, when it would be a batch of its own, joins the batch before it: batch normalisation
    /// cannot train on one cell (its running variance becomes 0/0, and every later prediction
    /// NaN), as on 577 training cells in batches of 64. In data-parallel training the last
    /// cells join the batch before them when they are fewer than the ranks, so that every rank
    /// has a cell of every batch.
    fn advance(&mut self) -> std::ops::Range<usize> {
        if self.buffer.len() - self.taken < self.options.batch_size {
            self.refill();
        }
        let least = self.options.shard.world.max(2);
        let (start, mut end) = (self.taken, (self.taken + self.options.batch_size).min(self.buffer.len()));
        let rest = self.buffer.len() - end;
        if end > start && rest < least {
            // The cells after this batch, in the buffer and in the blocks not yet read, are too
            // few for a batch: read them now, so that they join this one.
            let ahead = self.cells_ahead(least);
            if rest + ahead > 0 && rest + ahead < least {
                let n = self.labels.n_cells();
                while self.read_next_block(n) {}
                end = self.buffer.len();
            }
        }
        self.taken = end;
        start..end
    }

    /// Appends the split's cells of the next block not yet read to the buffer; `false` when every
    /// block has been read.
    fn read_next_block(&mut self, n: u64) -> bool {
        let Some(&b) = self.blocks.get(self.next_block) else { return false };
        self.next_block += 1;
        let first = b * self.options.block_cells;
        for cell in first..(first + self.options.block_cells).min(n) {
            if self.labels.split(cell) == self.split {
                self.buffer.push(cell);
            }
        }
        true
    }

    /// How many of the split's cells the blocks not yet read hold, counting up to `limit` (it
    /// stops there).
    fn cells_ahead(&self, limit: usize) -> usize {
        let (block, n) = (self.options.block_cells, self.labels.n_cells());
        self.blocks[self.next_block..]
            .iter()
            .flat_map(|&b| b * block..((b + 1) * block).min(n))
            .filter(|&cell| self.labels.split(cell) == self.split)
            .take(limit)
            .count()
    }
}

impl Iterator for EpochPlan<'_> {
    type Item = Vec<u64>;

    fn next(&mut self) -> Option<Vec<u64>> {
        let mut out = Vec::new();
        self.next_into(&mut out).then_some(out)
    }
}

/// The run length that `shuffle_run_cells = 0` takes on a store in random order. At batch 128
/// it brings the loader from under half to about three quarters of the memcpy bound (README,
/// Benchmarks), and on a shuffled store it moved no score beyond the spread between seeds.
pub const AUTO_RUN_CELLS: usize = 8;

/// The [`group_clustering`] up to which `shuffle_run_cells = 0` reads runs of cells. A store in
/// random order scores 1.0 within a few hundredths; a fifth of its cells sorted by group already
/// scores about 1.25.
pub const MIXED: f64 = 1.1;

/// The [`group_clustering`] above which runs of cells asked for explicitly draw a warning that
/// the store is sorted by label group.
pub const CLUSTERED: f64 = 2.0;

/// The run length to train with: `requested`, or for 0 (automatic) [`AUTO_RUN_CELLS`] when the
/// training cells' `clustering` ([`group_clustering`]) is at most [`MIXED`], and single cells
/// otherwise.
pub fn run_cells_for(requested: usize, clustering: f64) -> usize {
    match requested {
        0 if clustering <= MIXED => AUTO_RUN_CELLS,
        0 => 1,
        k => k,
    }
}

/// How clustered the cells of `split` are in store order: the mean length of the stretches of
/// consecutive cells (of the split) in one label group (condition, doses and covariates), over
/// the same mean expected of a random order of those cells, `1 / (1 - sum of squared group
/// shares)`. Near 1 for a shuffled store; far above it for a store sorted by condition, where
/// runs of neighbouring cells ([`PlanOptions::run_cells`] > 1) each come from one group.
pub fn group_clustering(labels: &CellLabels, split: Split) -> f64 {
    let mut counts = vec![0u64; labels.groups().len()];
    let (mut n, mut stretches) = (0u64, 0u64);
    let mut last = None;
    for cell in 0..labels.n_cells() {
        if labels.split(cell) != split {
            continue;
        }
        let g = labels.group_id(cell);
        counts[g as usize] += 1;
        n += 1;
        if last != Some(g) {
            stretches += 1;
            last = Some(g);
        }
    }
    if n == 0 {
        return 1.0;
    }
    let n = n as f64;
    let same: f64 = counts.iter().map(|&c| (c as f64 / n).powi(2)).sum();
    let expected = if same < 1.0 { (1.0 / (1.0 - same)).min(n) } else { n };
    n / stretches as f64 / expected
}

#[cfg(test)]
mod tests {
    use cpa_stream_stages::model::vocab::{Covariate, Vocabulary};
    use proptest::prelude::*;

    use super::*;
    use crate::Stage;
    use crate::encoder::Group;
    use crate::error::Error;

    fn labels(splits: &[Split]) -> CellLabels {
        let vocab = Vocabulary::new(
            vec!["g".into()],
            "ctrl",
            ["ctrl".to_owned()],
            vec![Covariate { name: "c".into(), categories: vec!["a".into()], is_batch: false }],
            vec![("ctrl".into(), 1)],
        );
        let group = Group { parts: vec![(1, 1.0)], covariates: vec![0], class: 0, condition: "p".into(), dose: None };
        let cells: Vec<(u32, Split)> = splits.iter().map(|&s| (0, s)).collect();
        match vocab
            .map_err(|source| Error::Stage { stage: Stage::Consumer, source })
            .and_then(|v| CellLabels::from_parts(v, vec![group], &cells))
        {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        }
    }

    fn split_strategy() -> impl Strategy<Value = Vec<Split>> {
        prop::collection::vec(
            prop_oneof![6 => Just(Split::Train), 2 => Just(Split::Valid), 1 => Just(Split::Test), 1 => Just(Split::Ood)],
            0..3000,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_training_cell_once_per_epoch_and_no_other(
            splits in split_strategy(),
            batch in 1usize..300,
            block in 1u64..100,
            window in 1usize..8,
            run in prop_oneof![3 => Just(1usize), 1 => 2usize..70],
            seed in any::<u64>(),
            epoch in 0u64..5,
        ) {
            let l = labels(&splits);
            let plan = PlanOptions {
                batch_size: batch,
                block_cells: block,
                shuffle_blocks: window,
                run_cells: run,
                seed,
                shuffle: true,
                shard: Shard::WHOLE,
            };
            let batches: Vec<Vec<u64>> = EpochPlan::new(&l, Split::Train, epoch, &plan).collect();
            let mut seen: Vec<u64> = batches.iter().flatten().copied().collect();
            for (i, b) in batches.iter().enumerate() {
                let last = i + 1 == batches.len();
                prop_assert!(b.len() == batch || (last && b.len() <= batch + 1), "batch {i} has {} cells", b.len());
                // A batch of one cell only where the split has one cell or one cell a batch was
                // asked for (which the configuration refuses with batch normalisation): batch
                // normalisation cannot train on it.
                prop_assert!(
                    b.len() > 1 || batch == 1 || batches.iter().map(Vec::len).sum::<usize>() == 1,
                    "batch {i} of one cell"
                );
            }
            seen.sort_unstable();
            let want: Vec<u64> = (0..splits.len() as u64).filter(|&c| splits[c as usize] == Split::Train).collect();
            prop_assert_eq!(seen, want);
            let again: Vec<Vec<u64>> = EpochPlan::new(&l, Split::Train, epoch, &plan).collect();
            prop_assert_eq!(&again, &batches);
            // Workers drawing the plan each and taking every n-th batch share it exactly.
            for workers in 1..4usize {
                for w in 0..workers {
                    let mut own = EpochPlan::new(&l, Split::Train, epoch, &plan);
                    let (mut rows, mut got) = (Vec::new(), Vec::new());
                    let mut gap = w;
                    while own.next_after_into(gap, &mut rows) {
                        got.push(rows.clone());
                        gap = workers - 1;
                    }
                    prop_assert!(rows.is_empty());
                    let want: Vec<Vec<u64>> = batches.iter().skip(w).step_by(workers).cloned().collect();
                    prop_assert_eq!(got, want, "worker {} of {}", w, workers);
                }
            }
        }

        #[test]
        fn the_ranks_shares_of_every_batch_make_the_batch_of_one_process(
            splits in split_strategy(),
            batch_size in 1usize..300,
            block in 1u64..100,
            run in prop_oneof![3 => Just(1usize), 1 => 2usize..70],
            seed in any::<u64>(),
            world in 2usize..6,
        ) {
            let l = labels(&splits);
            let whole = PlanOptions { batch_size, block_cells: block, run_cells: run, seed, ..Default::default() };
            let shares: Vec<Vec<Vec<u64>>> = (0..world)
                .map(|rank| {
                    let plan = PlanOptions { shard: Shard { rank, world }, ..whole.clone() };
                    EpochPlan::new(&l, Split::Train, 1, &plan).collect()
                })
                .collect();
            let alone: Vec<Vec<u64>> = EpochPlan::new(&l, Split::Train, 1, &whole).collect();
            let cells = alone.iter().map(Vec::len).sum::<usize>();
            prop_assert!(shares.iter().all(|s| s.len() == shares[0].len()), "every rank has every batch");
            let mut seen = Vec::new();
            for (i, _) in shares[0].iter().enumerate() {
                let batch: Vec<u64> = shares.iter().flat_map(|s| s[i].iter().copied()).collect();
                // In store order, the ranks' shares one after the other.
                prop_assert!(batch.windows(2).all(|w| w[0] < w[1]), "batch {} out of order", i);
                // Training refuses batches of fewer cells than ranks.
                if cells >= world && batch_size >= world {
                    prop_assert!(shares.iter().all(|s| !s[i].is_empty()), "a rank without a cell of batch {}", i);
                }
                if world == 2 {
                    // The tail rule of two ranks is one process's: the same batches.
                    let mut one = alone[i].clone();
                    one.sort_unstable();
                    prop_assert_eq!(&batch, &one);
                }
                seen.extend(batch);
            }
            seen.sort_unstable();
            let want: Vec<u64> = (0..splits.len() as u64).filter(|&c| splits[c as usize] == Split::Train).collect();
            prop_assert_eq!(seen, want);
        }
    }

    /// Pieces of consecutive rows in a batch: the scattered reads it costs.
    fn pieces(batch: &[u64]) -> usize {
        let mut rows = batch.to_vec();
        rows.sort_unstable();
        1 + rows.windows(2).filter(|w| w[1] != w[0] + 1).count()
    }

    #[test]
    fn runs_keep_neighbours_together() {
        // One cell in ten held out, so that runs meet the gaps of a split and a window's cells
        // are not a multiple of the batch (cells carried over to the next window).
        let splits: Vec<Split> = (0..40_000).map(|i| if i % 10 == 3 { Split::Valid } else { Split::Train }).collect();
        let l = labels(&splits);
        let plan = |run_cells| PlanOptions {
            batch_size: 128,
            block_cells: 256,
            shuffle_blocks: 8,
            run_cells,
            seed: 7,
            shuffle: true,
            shard: Shard::WHOLE,
        };
        let single: Vec<Vec<u64>> = EpochPlan::new(&l, Split::Train, 0, &plan(1)).collect();
        let runs: Vec<Vec<u64>> = EpochPlan::new(&l, Split::Train, 0, &plan(16)).collect();
        // A batch holds its 8 runs, plus up to three cut short (by the batch's two ends, and at
        // the end of the cells carried over); a run of 16 training cells spans at most three
        // pieces (held-out cells inside it) and one more where it crosses a block boundary.
        let most = runs.iter().map(|b| pieces(b)).max().unwrap_or(0);
        assert!(most <= 4 * (128usize.div_ceil(16) + 3), "a batch of runs of 16 has {most} pieces");
        let mean = |batches: &[Vec<u64>]| {
            batches.iter().map(|b| pieces(b)).sum::<usize>() as f64 / batches.len().max(1) as f64
        };
        assert!(mean(&single) > 100.0, "single-cell shuffle: {} pieces per batch", mean(&single));
        assert!(mean(&runs) < 30.0, "runs of 16: {} pieces per batch", mean(&runs));
        // Each batch still draws from the whole window, not from one block.
        let blocks = |b: &[u64]| {
            let mut blocks: Vec<u64> = b.iter().map(|c| c / 256).collect();
            blocks.sort_unstable();
            blocks.dedup();
            blocks.len()
        };
        assert!(runs.iter().take(runs.len() - 1).all(|b| blocks(b) >= 3), "runs of 16 from fewer than 3 blocks");
    }

    #[test]
    fn clustering_tells_a_sorted_store_from_a_shuffled_one() {
        let vocab = labels(&[]).vocab;
        let group =
            |class| Group { parts: vec![(1, 1.0)], covariates: vec![0], class, condition: "p".into(), dose: None };
        let with =
            |cells: &[(u32, Split)]| match CellLabels::from_parts(vocab.clone(), (0..4).map(group).collect(), cells) {
                Ok(l) => l,
                Err(e) => panic!("{e}"),
            };
        // 4,000 cells of 4 groups, sorted by group; one in five held out for validation.
        let split = |i: u32| if i.is_multiple_of(5) { Split::Valid } else { Split::Train };
        let sorted: Vec<(u32, Split)> = (0..4000u32).map(|i| (i / 1000, split(i))).collect();
        let mut shuffled = sorted.clone();
        shuffled.shuffle(&mut Xoshiro256PlusPlus::seed_from_u64(5));
        let (s, r) = (group_clustering(&with(&sorted), Split::Train), group_clustering(&with(&shuffled), Split::Train));
        assert!(s > 100.0, "sorted: {s}");
        assert!((0.9..=MIXED).contains(&r), "shuffled: {r}");
        assert_eq!(group_clustering(&with(&[]), Split::Train), 1.0);
        // Automatic runs only on the shuffled order; a run length asked for is kept.
        assert_eq!((run_cells_for(0, s), run_cells_for(0, r)), (1, AUTO_RUN_CELLS));
        assert_eq!((run_cells_for(1, r), run_cells_for(16, s)), (1, 16));
    }

    #[test]
    fn the_last_cell_of_an_epoch_joins_the_batch_before_it() {
        // 577 training cells in batches of 64: eight batches of 64 and one of 65, in every epoch;
        // validation cells interleaved, and after the last training cell.
        let mut n_train = 0;
        let splits: Vec<Split> = (0..700)
            .map(|i| {
                let train = n_train < 577 && i % 6 != 5;
                n_train += usize::from(train);
                if train { Split::Train } else { Split::Valid }
            })
            .collect();
        assert_eq!(n_train, 577);
        let l = labels(&splits);
        for epoch in 0..3 {
            let plan = PlanOptions {
                batch_size: 64,
                block_cells: 16,
                shuffle_blocks: 4,
                run_cells: 1,
                seed: 3,
                shuffle: true,
                shard: Shard::WHOLE,
            };
            let sizes: Vec<usize> = EpochPlan::new(&l, Split::Train, epoch, &plan).map(|b| b.len()).collect();
            assert_eq!(sizes, [vec![64; 8], vec![65]].concat(), "epoch {epoch}");
        }
    }

    #[test]
    fn seeds_and_epochs_change_the_order() {
        let l = labels(&vec![Split::Train; 5000]);
        let plan = PlanOptions {
            batch_size: 128,
            block_cells: 64,
            shuffle_blocks: 4,
            run_cells: 1,
            seed: 1,
            ..Default::default()
        };
        let order = |seed: u64, epoch: u64| -> Vec<u64> {
            EpochPlan::new(&l, Split::Train, epoch, &PlanOptions { seed, ..plan.clone() }).flatten().collect()
        };
        assert_eq!(order(1, 0), order(1, 0));
        assert_ne!(order(1, 0), order(2, 0));
        assert_ne!(order(1, 0), order(1, 1));
        let in_order: Vec<u64> =
            EpochPlan::new(&l, Split::Train, 0, &PlanOptions { shuffle: false, ..plan }).flatten().collect();
        assert_eq!(in_order, (0..5000).collect::<Vec<u64>>());
    }
}
