//! Training batches uploaded to the device one batch ahead of the trainer.
//!
//! On CUDA a step's upload (the batch's CSR arrays copied to the device and densified there)
//! took half the trainer's time on a 1 M x 5,000 atlas when the trainer did it itself: copies
//! from pageable memory block the host thread while the driver stages them (docs/benchmarks.md,
//! "Uploads ahead of the trainer"). Here a thread of its own, the uploader, uploads batch k + 1 through
//! pinned memory while the trainer queues the kernels of batch k, and hands the host batch back
//! as soon as its arrays are copied out. Both threads queue their work on the device's current
//! stream, so a batch's kernels run after its upload, in order; the channel between them holds
//! nothing (a rendezvous), so at most two uploaded batches exist at a time. On the CPU there is
//! nothing to overlap (the copy is the host's own memory and every core is libtorch's): the
//! trainer uploads as before.

use std::borrow::Borrow;
use std::sync::Arc;

use cpa_stream_pipeline::batcher::Loaded;
use cpa_stream_pipeline::crew::Crew;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::telemetry::StageStats;
use crossbeam_channel::{Receiver, bounded};
use tch::Device;

use crate::Stage;
use crate::model::batch::{DeviceBatch, HostBatch};
use crate::trainer::Trainer;

/// Where an uploader takes host batches from.
pub(crate) trait Source: Send + 'static {
    /// A host batch, owned or shared.
    type Batch: Borrow<HostBatch> + Send;

    /// The next batch (the wait counted in `stats`); `None` at the end.
    fn next(&mut self, stats: &StageStats) -> Option<Result<Self::Batch>>;

    /// Takes back a batch whose arrays were copied out.
    fn recycle(&mut self, batch: Self::Batch);
}

impl Source for Loaded<()> {
    type Batch = HostBatch;

    fn next(&mut self, stats: &StageStats) -> Option<Result<HostBatch>> {
        Loaded::next(self, stats).map(|g| g.map(|g| g.batch))
    }

    fn recycle(&mut self, batch: HostBatch) {
        Loaded::recycle(self, batch);
    }
}

/// Batches held in memory, in order (benchmarks, tests).
pub(crate) struct Preloaded {
    batches: Arc<Vec<HostBatch>>,
    next: usize,
}

impl Preloaded {
    /// A pass over `batches`.
    pub fn new(batches: &Arc<Vec<HostBatch>>) -> Preloaded {
        Preloaded { batches: Arc::clone(batches), next: 0 }
    }
}

/// One of the preloaded batches.
pub(crate) struct Nth(Arc<Vec<HostBatch>>, usize);

impl Borrow<HostBatch> for Nth {
    fn borrow(&self) -> &HostBatch {
        &self.0[self.1]
    }
}

impl Source for Preloaded {
    type Batch = Nth;

    fn next(&mut self, _stats: &StageStats) -> Option<Result<Nth>> {
        let k = self.next;
        self.next += 1;
        (k < self.batches.len()).then(|| Ok(Nth(Arc::clone(&self.batches), k)))
    }

    fn recycle(&mut self, _batch: Nth) {}
}

/// A batch as the trainer takes it.
pub(crate) enum Fed {
    /// Still on the host: [`Feed::step`] uploads it (then hands it back to the loader).
    Host(HostBatch),
    /// On the device, with the host batch's cells and bytes.
    Device { batch: DeviceBatch, cells: u64, bytes: u64 },
}

impl Fed {
    /// Cells of the batch.
    pub fn cells(&self) -> u64 {
        match self {
            Fed::Host(b) => b.n_cells() as u64,
            Fed::Device { cells, .. } => *cells,
        }
    }

    /// Bytes of the host batch's counts.
    pub fn bytes(&self) -> u64 {
        match self {
            Fed::Host(b) => b.counts.byte_size(),
            Fed::Device { bytes, .. } => *bytes,
        }
    }
}

/// One pass's batches for the trainer.
pub(crate) enum Feed {
    /// The trainer uploads each batch itself.
    Inline(Loaded<()>),
    /// Uploaded ahead by a thread of their own.
    Ahead(Ahead),
}

impl Feed {
    /// The batches of `loaded` for a trainer on `device`: uploaded ahead on CUDA.
    pub fn new(loaded: Loaded<()>, device: Device, stats: &Arc<StageStats>) -> Result<Feed> {
        if device.is_cuda() { Ok(Feed::Ahead(Ahead::start(loaded, device, stats)?)) } else { Ok(Feed::Inline(loaded)) }
    }

    /// The next batch; `None` at the end of the pass. The wait counts as the trainer's.
    pub fn next(&mut self, trainer: &StageStats) -> Option<Result<Fed>> {
        match self {
            Feed::Inline(loaded) => loaded.next(trainer).map(|g| g.map(|g| Fed::Host(g.batch))),
            Feed::Ahead(ahead) => ahead.next(trainer),
        }
    }

    /// Trains `trainer` on `fed`, uploading it first where it is still on the host (and then
    /// handing it back to the loader).
    pub fn step(&self, trainer: &mut Trainer, fed: Fed) -> cpa_stream_stages::Result<()> {
        match (self, fed) {
            (Feed::Inline(loaded), Fed::Host(batch)) => {
                let stepped = trainer.step(&batch);
                loaded.recycle(batch);
                stepped
            }
            (_, fed) => step(trainer, fed),
        }
    }
}

/// Trains `trainer` on `fed` (a host batch is uploaded first).
pub(crate) fn step(trainer: &mut Trainer, fed: Fed) -> cpa_stream_stages::Result<()> {
    match fed {
        Fed::Host(batch) => trainer.step(&batch),
        Fed::Device { batch, .. } => trainer.step_uploaded(batch),
    }
}

/// The uploader's output and its thread (dropped in this order: the receiver first, so that an
/// uploader blocked on sending wakes up and ends).
pub(crate) struct Ahead {
    batches: Receiver<Result<Fed>>,
    crew: Crew<'static>,
}

impl Ahead {
    /// Starts the uploader on the batches of `source`, for `device` (any device: on the CPU it
    /// only moves the work to another thread), counting its work in `stats`.
    pub fn start<S: Source>(mut source: S, device: Device, stats: &Arc<StageStats>) -> Result<Ahead> {
        let (tx, batches) = bounded::<Result<Fed>>(0);
        let mut crew = Crew::new();
        let stats = Arc::clone(stats);
        crew.spawn(Stage::Uploader, Stage::Uploader.name().to_owned(), move || {
            while let Some(next) = source.next(&stats) {
                let fed = next.and_then(|owned| {
                    let host: &HostBatch = owned.borrow();
                    let (cells, bytes) = (host.n_cells() as u64, host.counts.byte_size());
                    let uploaded = stats.busy(|| DeviceBatch::upload(host, device));
                    // The arrays are copied out (on CUDA the device's copy is queued from
                    // pinned memory).
                    source.recycle(owned);
                    stats.add(cells, bytes);
                    let batch = uploaded.map_err(Error::stage(Stage::Uploader))?;
                    Ok(Fed::Device { batch, cells, bytes })
                });
                let failed = fed.is_err();
                if !stats.send(&tx, fed) || failed {
                    return;
                }
            }
        })?;
        Ok(Ahead { batches, crew })
    }

    /// The next uploaded batch; `None` at the end. The wait counts in `stats`.
    pub fn next(&mut self, stats: &StageStats) -> Option<Result<Fed>> {
        match stats.recv(&self.batches) {
            Some(fed) => Some(fed),
            // The uploader ended: the source is done, or it panicked.
            None => self.crew.join().err().map(Err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::model::synthetic_batches;
    use crate::model::CpaModel;
    use crate::model::config::CpaConfig;

    fn batches() -> Arc<Vec<HostBatch>> {
        let (_, batches) = synthetic_batches(700, 40, 96, 3).unwrap_or_else(|e| panic!("{e}"));
        Arc::new(batches)
    }

    fn trainer(device: Device) -> Trainer {
        let (vocab, _) = synthetic_batches(700, 40, 96, 3).unwrap_or_else(|e| panic!("{e}"));
        let mut config = CpaConfig::default();
        // Every step trains the adversaries too from the first epoch: the whole step is covered.
        config.training.n_epochs_pretrain_ae = 0;
        let model = CpaModel::new(&config, &vocab, None, device, 5).unwrap_or_else(|e| panic!("{e}"));
        Trainer::new(model).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The losses of each epoch and every weight at the end.
    fn outcome(trainer: &Trainer, losses: Vec<f64>) -> (Vec<f64>, Vec<(String, Vec<f32>)>) {
        let mut weights: Vec<(String, Vec<f32>)> = trainer
            .model()
            .var_store()
            .variables()
            .into_iter()
            .map(|(name, t)| {
                let flat = t
                    .f_to_device(Device::Cpu)
                    .and_then(|t| t.f_to_kind(tch::Kind::Float))
                    .and_then(|t| t.f_flatten(0, -1));
                (name, Vec::<f32>::try_from(&flat.unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}")))
            })
            .collect();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        (losses, weights)
    }

    /// Two epochs on `device`, each batch uploaded by the trainer (`ahead` false) or by the
    /// uploader.
    fn train(device: Device, ahead: bool) -> (Vec<f64>, Vec<(String, Vec<f32>)>) {
        let (batches, stats) = (batches(), StageStats::new(Stage::Uploader, 1));
        let mut trainer = trainer(device);
        let mut losses = Vec::new();
        for _ in 0..2 {
            if ahead {
                let mut uploads =
                    Ahead::start(Preloaded::new(&batches), device, &stats).unwrap_or_else(|e| panic!("{e}"));
                while let Some(fed) = uploads.next(&stats) {
                    step(&mut trainer, fed.unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"));
                }
            } else {
                for b in batches.iter() {
                    trainer.step(b).unwrap_or_else(|e| panic!("{e}"));
                }
            }
            let m = trainer.end_epoch().unwrap_or_else(|e| panic!("{e}"));
            losses.extend([m.recon_loss, m.adv_loss]);
        }
        if ahead {
            assert_eq!(stats.report().rows, 2 * 700, "the uploader's cells");
        }
        outcome(&trainer, losses)
    }

    #[test]
    fn batches_uploaded_ahead_train_exactly_as_batches_the_trainer_uploads() {
        let (inline, ahead) = (train(Device::Cpu, false), train(Device::Cpu, true));
        assert!(inline.0.iter().all(|l| l.is_finite()), "{:?}", inline.0);
        assert_eq!(inline.0, ahead.0, "losses");
        assert_eq!(inline.1.len(), ahead.1.len());
        for ((name, a), (_, b)) in inline.1.iter().zip(&ahead.1) {
            assert_eq!(a, b, "{name}");
        }
    }

    /// On CUDA, within float tolerance (the device's scatter-adds in backward passes are not
    /// bitwise reproducible). Skipped (with the reason printed) where libtorch sees no CUDA
    /// device.
    #[test]
    fn cuda_batches_uploaded_ahead_train_as_batches_the_trainer_uploads() {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: no CUDA device visible to libtorch");
            return;
        }
        let (inline, ahead) = (train(Device::Cuda(0), false), train(Device::Cuda(0), true));
        for (a, b) in inline.0.iter().zip(&ahead.0) {
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "losses {:?} vs {:?}", inline.0, ahead.0);
        }
        for ((name, a), (_, b)) in inline.1.iter().zip(&ahead.1) {
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-3, "{name}: differs by {worst}");
        }
    }

    /// A source that yields `good` batches, then an error or a panic.
    struct Failing {
        batches: Preloaded,
        good: usize,
        panics: bool,
    }

    impl Source for Failing {
        type Batch = Nth;

        fn next(&mut self, stats: &StageStats) -> Option<Result<Nth>> {
            if self.good == 0 {
                assert!(!self.panics, "the source broke");
                return Some(Err(Error::InvalidInput("a damaged batch".into())));
            }
            self.good -= 1;
            self.batches.next(stats)
        }

        fn recycle(&mut self, _batch: Nth) {}
    }

    #[test]
    fn a_source_that_fails_or_panics_ends_the_pass_with_an_error_after_its_good_batches() {
        for panics in [false, true] {
            let stats = StageStats::new(Stage::Uploader, 1);
            let source = Failing { batches: Preloaded::new(&batches()), good: 2, panics };
            let mut uploads = Ahead::start(source, Device::Cpu, &stats).unwrap_or_else(|e| panic!("{e}"));
            let mut got = Vec::new();
            while let Some(fed) = uploads.next(&stats) {
                got.push(fed.map(|f| f.cells()).map_err(|e| e.to_string()));
            }
            assert_eq!(got.len(), 3, "{got:?}");
            assert!(got[..2].iter().all(|g| g == &Ok(96)), "{got:?}");
            let error = got[2].as_ref().err().cloned().unwrap_or_default();
            let want = if panics { "uploader" } else { "a damaged batch" };
            assert!(error.contains(want), "{error}");
        }
    }
}
