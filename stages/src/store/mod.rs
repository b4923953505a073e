//! The atlas store: a directory of memory-mapped CSR arrays plus Parquet tables.
//!
//! See [`cpa_stream_schemas::Manifest`] for the layout. [`StoreWriter`] writes a store from a
//! stream of row chunks in bounded memory and publishes it atomically; [`Store`] maps and
//! validates one and gives zero-copy row access ([`Store::raw_rows`]) or, for every codec, copies
//! rows into a [`CsrBatch`](crate::CsrBatch) through a per-thread [`RowCursor`].

mod block_map;
mod blocks;
mod cache;
mod hashing;
mod mmap;
mod reader;
mod splice;
mod tables;
mod verify;
mod writer;

pub use block_map::BlockMap;
pub use cache::{BlockCache, BlockCacheReport, BlockCacheShared};
pub use hashing::{file_checksum, hash_reader};
pub use mmap::explain_sigbus;
pub use reader::{Access, CsrView, RowCursor, Store, consecutive_runs};
pub(crate) use tables::guarded;
pub use tables::{
    ColumnSummary, TableFile, read_small_table, read_table, read_table_from_bytes, summarize_obs, table_schema,
    write_table, write_table_locked,
};
pub use verify::VerifyReport;
pub use writer::{AppendReport, DEFAULT_OBS_ROW_GROUP_ROWS, ObsGrowth, StoreWriter, StoreWriterOptions};
pub(crate) use writer::{table_properties, truth_properties};
