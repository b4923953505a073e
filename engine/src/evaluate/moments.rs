//! Pass 1 of an evaluation: per (label group, split) moments of every gene, from one pass over
//! the store in store order (memory: groups x genes, not cells).

use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::store::Store;

use cpa_stream_pipeline::context::RunContext;
use cpa_stream_pipeline::encoder::{CellLabels, Split};
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::stats::Moments;

use super::samples::{Samples, sampler};
use crate::Stage;

/// Cells read per step of the pass.
const CHUNK_CELLS: u64 = 4096;

/// Per-(group, split) moments of every gene, and per group those of one half of its evaluated
/// cells (a control group's: of all its cells), for the split-half ceiling and the change's
/// reproducibility: the other half is the rest.
pub(super) struct GroupMoments {
    pub(super) genes: usize,
    moments: Vec<Moments>,
    half: Vec<Moments>,
    /// Per group: a sample of its evaluated cells (control groups: of all their cells), dense,
    /// in the space the moments are in.
    pub(super) samples: Samples,
}

/// Which half of the cells a cell falls in: a fixed hash of its row (splitmix64), so the halves
/// are random with respect to the store's order and the same in every run.
pub fn in_second_half(cell: u64) -> bool {
    let mut z = cell.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & 1 == 1
}

impl GroupMoments {
    fn slot(group: usize, split: Split) -> usize {
        group * 4 + split as usize
    }

    /// Moments of `group` over the splits `splits` accepts.
    pub(super) fn of(&self, group: usize, splits: impl Fn(Split) -> bool) -> Moments {
        let mut out = Moments::new(self.genes);
        for split in Split::ALL {
            if splits(split) {
                out.merge(&self.moments[Self::slot(group, split)]);
            }
        }
        out
    }

    /// Moments of several groups over the splits `splits` accepts.
    pub(super) fn of_groups(&self, groups: &[usize], splits: impl Fn(Split) -> bool + Copy) -> Moments {
        let mut out = Moments::new(self.genes);
        for &g in groups {
            out.merge(&self.of(g, splits));
        }
        out
    }

    /// Moments of the second half ([`in_second_half`]) of the evaluated cells of `groups` (of
    /// every cell of a control group).
    pub(super) fn second_half(&self, groups: &[usize]) -> Moments {
        let mut out = Moments::new(self.genes);
        for &g in groups {
            out.merge(&self.half[g]);
        }
        out
    }

    /// One pass over `store`: moments of `log1p(x)` (count models) or `x` per group and split,
    /// and per group of the second half of the cells whose split `evaluated` accepts; a sample of
    /// at most `sample_cap` of those cells per group. For the groups `is_control` marks, both
    /// take every cell, whatever its split.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read(
        store: &Store,
        labels: &CellLabels,
        genes: usize,
        count_model: bool,
        evaluated: impl Fn(Split) -> bool,
        is_control: &[bool],
        sample_cap: usize,
        ctx: &RunContext,
    ) -> Result<GroupMoments> {
        let mut moments: Vec<Moments> = (0..labels.groups().len() * 4).map(|_| Moments::new(genes)).collect();
        let mut half: Vec<Moments> = (0..labels.groups().len()).map(|_| Moments::new(genes)).collect();
        let mut samples = Samples::new(labels.groups().len(), sample_cap, genes);
        let mut rng = sampler(1);
        let mut cursor = store.cursor().map_err(Error::stage(Stage::Reader))?;
        let mut batch = CsrBatch::new(genes as u32);
        let mut start = 0u64;
        while start < store.n_obs() {
            let end = (start + CHUNK_CELLS).min(store.n_obs());
            batch.clear();
            cursor.read_range(start..end, &mut batch).map_err(Error::stage(Stage::Reader))?;
            for (i, cell) in (start..end).enumerate() {
                let (group, split) = (labels.group_id(cell) as usize, labels.split(cell));
                let (idx, val) = batch.row(i);
                moments[Self::slot(group, split)].add_sparse(idx, val, count_model);
                let taken = evaluated(split) || is_control.get(group).copied().unwrap_or(false);
                if taken && in_second_half(cell) {
                    half[group].add_sparse(idx, val, count_model);
                }
                if taken && let Some(slot) = samples.offer(group, &mut rng) {
                    samples
                        .put_sparse(group, slot, idx, val, |v| if count_model { v.ln_1p() } else { v })
                        .map_err(Error::io(std::env::temp_dir()))?;
                }
            }
            store.release(start..end);
            ctx.progress().advance(end - start);
            ctx.check_stopped()?;
            start = end;
        }
        Ok(GroupMoments { genes, moments, half, samples })
    }
}
