//! Pass 1 of an evaluation: per (label group, split) moments of every gene, from one pass over
//! the store in store order (memory: groups x genes, not cells).

use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::store::Store;

use crate::encoder::{CellLabels, Split};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::stats::Moments;

/// Cells read per step of the pass.
const CHUNK_CELLS: u64 = 4096;

/// Per-(group, split) moments of every gene.
pub(super) struct GroupMoments {
    pub(super) genes: usize,
    moments: Vec<Moments>,
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

    /// One pass over `store`: moments of `log1p(x)` (count models) or `x` per group and split.
    pub(super) fn read(
        store: &Store,
        labels: &CellLabels,
        genes: usize,
        count_model: bool,
        progress: &dyn Progress,
    ) -> Result<GroupMoments> {
        let mut moments: Vec<Moments> = (0..labels.groups().len() * 4).map(|_| Moments::new(genes)).collect();
        let mut cursor = store.cursor().map_err(Error::stage("reader"))?;
        let mut batch = CsrBatch::new(genes as u32);
        let mut start = 0u64;
        while start < store.n_obs() {
            let end = (start + CHUNK_CELLS).min(store.n_obs());
            batch.clear();
            cursor.read_range(start..end, &mut batch).map_err(Error::stage("reader"))?;
            for (i, cell) in (start..end).enumerate() {
                let slot = Self::slot(labels.group_id(cell) as usize, labels.split(cell));
                let (idx, val) = batch.row(i);
                moments[slot].add_sparse(idx, val, count_model);
            }
            store.release(start..end);
            progress.advance(end - start);
            start = end;
        }
        Ok(GroupMoments { genes, moments })
    }
}
