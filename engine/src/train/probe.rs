//! `--batch-size auto`: the largest batch whose training step fits on the device.

use crate::device::memory as device_memory;
use crate::model::config::CpaConfig;
use crate::model::{CpaModel, HostBatch};
use crate::trainer::Trainer;
use tch::Device;

use crate::Stage;
use cpa_stream_pipeline::encoder::CellLabels;
use cpa_stream_pipeline::error::{Error, Result};

/// Largest batch `--batch-size auto` probes.
pub const AUTO_BATCH_MAX: usize = 1 << 16;

/// Smallest batch `--batch-size auto` probes (and the smallest it chooses).
pub const AUTO_BATCH_MIN: usize = 256;

/// The batch size for `--batch-size auto`: on CUDA, the largest power of two (from
/// [`AUTO_BATCH_MIN`] up to [`AUTO_BATCH_MAX`]) whose training step runs on the device, halved for
/// margin (probed with a scratch model and synthetic batches of `nnz_per_cell` entries per cell,
/// not guessed); on the CPU, the configuration's batch size.
pub fn probe_batch_size(config: &CpaConfig, labels: &CellLabels, device: Device, nnz_per_cell: usize) -> Result<usize> {
    if !device.is_cuda() {
        return Ok(config.training.batch_size);
    }
    let stage = Error::stage(Stage::Probe);
    let genes = labels.vocab.n_genes() as u32;
    let mut probe = config.clone();
    probe.training.accumulate_batches = 1;
    probe.adversary.adv_steps = 0; // both steps on every batch: the largest memory footprint
    let model = CpaModel::new(&probe, &labels.vocab, None, device, 0).map_err(stage)?;
    let mut trainer = Trainer::new(model).map_err(stage)?;
    let group = labels.groups().first().ok_or_else(|| Error::InvalidInput("no label groups".into()))?;
    let step = nnz_per_cell.clamp(1, genes as usize);
    let indices: Vec<u32> = (0..step as u32).map(|k| (u64::from(k) * u64::from(genes) / step as u64) as u32).collect();
    let values = vec![3.0f32; indices.len()];
    let mut best = None;
    let mut size = AUTO_BATCH_MIN;
    while size <= AUTO_BATCH_MAX {
        let mut batch = HostBatch::new(genes, labels.vocab.covariates.len());
        for _ in 0..size {
            batch.counts.push_row(&indices, &values);
            batch.push_labels(&group.parts, &group.covariates, group.class);
        }
        // Two steps: the second runs with the optimizer state allocated.
        let fits = trainer.step(&batch).and_then(|_| trainer.step(&batch)).is_ok();
        if !fits {
            break;
        }
        best = Some(size);
        size *= 2;
    }
    // The probe's blocks stay in the allocator's cache: give them back before training.
    drop(trainer);
    device_memory::empty_cache(device);
    let best = best
        .ok_or_else(|| Error::InvalidInput(format!("not even a batch of {AUTO_BATCH_MIN} cells fits on {device:?}")))?;
    Ok((best / 2).max(AUTO_BATCH_MIN))
}
