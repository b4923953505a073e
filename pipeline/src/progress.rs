//! How runs report progress: the CLI draws a bar on a terminal and logs lines otherwise;
//! library users pass [`Silent`] or their own implementation.

/// Receives progress of a run's main loop.
pub trait Progress: Sync {
    /// A phase starts; `total` units (cells, groups) are expected.
    fn begin(&self, phase: &str, total: u64);
    /// `n` more units are done.
    fn advance(&self, n: u64);
    /// The phase is over.
    fn end(&self);
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _phase: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn end(&self) {}
}
