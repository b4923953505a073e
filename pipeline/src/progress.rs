//! How runs report progress: the CLI draws a bar on a terminal and logs lines otherwise;
//! library users pass [`Silent`] or their own implementation, in a
//! [`RunContext`](crate::RunContext).

/// Receives progress of a run's main loop.
pub trait Progress: Sync {
    /// A phase starts; `total` units (cells, groups) are expected.
    fn begin(&self, phase: &str, total: u64);
    /// `n` more units are done.
    fn advance(&self, n: u64);
    /// The phase is over.
    fn end(&self);
    /// The phase's units are cells of epochs: `cells_per_epoch` per epoch, from epoch `first`
    /// (0-based; `resumed` of its cells were trained before this run) to `last` (exclusive), so
    /// that progress can be shown in epochs.
    fn epochs(&self, _cells_per_epoch: u64, _resumed: u64, _first: u32, _last: u32) {}
    /// The latest figures worth showing beside the progress (an epoch's losses and validation).
    fn note(&self, _text: &str) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _phase: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn end(&self) {}
}
