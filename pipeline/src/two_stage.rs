//! The two-stage driver shared by the store-to-store and file-to-store runs: a producer thread
//! and the calling thread connected by a bounded channel.

use std::sync::Arc;

use arrow_array::RecordBatch;
use cpa_stream_schemas::StoreFiles;
use cpa_stream_stages::store::Store;
use cpa_stream_stages::{CsrBatch, Result as StageResult};
use crossbeam_channel::{Sender, bounded};

use crate::Stage;
use crate::crew::Crew;
use crate::error::{Error, Result};
use crate::telemetry::StageStats;

/// The producer's end: sends items, counting time blocked on the channel.
pub struct Emitter<'a, T> {
    tx: &'a Sender<StageResult<T>>,
    stats: &'a StageStats,
}

impl<T> Emitter<'_, T> {
    /// Sends an item; `false` when the consumer is gone (stop quietly: it reports why).
    pub fn send(&self, item: T) -> bool {
        self.stats.send(self.tx, Ok(item))
    }
}

/// Produces a store's rows in windows of `batch_rows` rows, each with its `obs` rows (zero-copy
/// slices of the Parquet batches), and drops consumed pages from the resident set.
pub fn send_store_rows(
    store: &Store,
    batch_rows: usize,
    stats: &StageStats,
    out: &Emitter<(CsrBatch, RecordBatch)>,
) -> StageResult<()> {
    let n_vars = store.n_vars() as u32;
    let mut cursor = store.cursor()?;
    let mut row = 0u64;
    for obs in store.table(StoreFiles::OBS)? {
        let obs = obs?;
        for offset in (0..obs.num_rows()).step_by(batch_rows.max(1)) {
            let window = obs.slice(offset, batch_rows.min(obs.num_rows() - offset));
            let n = window.num_rows() as u64;
            let rows = stats.busy(|| -> StageResult<CsrBatch> {
                let mut rows = CsrBatch::new(n_vars);
                cursor.read_range(row..row + n, &mut rows)?;
                store.release(row..row + n);
                Ok(rows)
            })?;
            row += n;
            stats.add(n, rows.byte_size());
            if !out.send((rows, window)) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Runs `produce` on a new thread and `consume` on this one, joined by a channel of `depth`
/// items. The producer returns its first error, which the consumer receives in order after the
/// items sent before it; the consumer's first error drops the channel so the producer stops at
/// its next send. A panic of the producer becomes an error naming `producer_stage`.
pub fn two_stage<T: Send>(
    producer_stage: Stage,
    producer_stats: &Arc<StageStats>,
    consumer_stats: &StageStats,
    depth: usize,
    produce: impl FnOnce(&Emitter<T>) -> StageResult<()> + Send,
    mut consume: impl FnMut(T) -> Result<()>,
) -> Result<()> {
    std::thread::scope(|scope| {
        let (tx, rx) = bounded::<StageResult<T>>(depth.max(1));
        let stats = Arc::clone(producer_stats);
        let mut crew = Crew::new();
        crew.spawn_in(scope, producer_stage, producer_stage.name().to_owned(), move || {
            let emitter = Emitter { tx: &tx, stats: &stats };
            if let Err(e) = produce(&emitter) {
                stats.send(&tx, Err(e));
            }
        })?;
        let consumed = (|| -> Result<()> {
            while let Some(item) = consumer_stats.recv(&rx) {
                consume(item.map_err(Error::stage(producer_stage))?)?;
            }
            Ok(())
        })();
        // A producer blocked on a full channel wakes to a closed one.
        drop(rx);
        crew.join()?;
        consumed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_flow_and_the_first_error_stops_both_sides() -> Result<()> {
        let (p, c) = (StageStats::new(Stage::Source, 1), StageStats::new(Stage::Consumer, 1));
        let mut got = Vec::new();
        two_stage(
            Stage::Source,
            &p,
            &c,
            2,
            |e| {
                for i in 0..5 {
                    e.send(i);
                }
                Ok(())
            },
            |i| {
                got.push(i);
                Ok(())
            },
        )?;
        assert_eq!(got, [0, 1, 2, 3, 4]);

        let err = two_stage::<u32>(
            Stage::Source,
            &p,
            &c,
            1,
            |e| {
                e.send(1);
                Err(cpa_stream_stages::Error::InvalidInput("bad row 7".into()))
            },
            |_| Ok(()),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "source: bad row 7");

        // The consumer fails: the producer's sends start failing and it stops.
        let sent = std::sync::atomic::AtomicU32::new(0);
        let err = two_stage(
            Stage::Source,
            &p,
            &c,
            1,
            |e| {
                for i in 0..1000 {
                    if !e.send(i) {
                        break;
                    }
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            },
            |i: u32| if i == 3 { Err(Error::InvalidInput("stop".into())) } else { Ok(()) },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "stop");
        assert!(sent.load(std::sync::atomic::Ordering::Relaxed) < 1000);

        let err = two_stage::<u32>(Stage::Source, &p, &c, 1, |_| panic!("boom"), |_| Ok(())).unwrap_err();
        assert_eq!(err.to_string(), "source: a worker thread panicked: boom");
        Ok(())
    }
}
