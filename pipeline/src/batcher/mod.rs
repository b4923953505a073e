//! The batcher: which cells make each batch ([`plan`]) and the one pool of gather workers
//! ([`pool`]) that reads them from the store into recycled host batches, for training,
//! validation, prediction and evaluation alike.

pub mod plan;
pub mod pool;

pub use plan::{
    AUTO_RUN_CELLS, CLUSTERED, DEFAULT_BLOCK_CELLS, DEFAULT_SHUFFLE_BLOCKS, EpochPlan, MIXED, PlanOptions, Shard,
    group_clustering, run_cells_for,
};
pub use pool::{
    DEFAULT_BUFFER_BYTES, DEFAULT_PREFETCH, DEFAULT_WORKERS, Feeder, Gathered, Loaded, LoaderOptions, PoolStats,
    spawn_fed, spawn_loader,
};
