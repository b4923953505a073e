//! The parts of a training step that data-parallel training adds ([`Trainer::join`]): where a
//! rank's cells lie in the whole batch, the whole batch's latents and perturbations on every
//! rank, and the gradients summed over the ranks.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::Trainer;
use crate::collective::Collective;
use crate::model::batch::DevicePerts;
use crate::model::layers::BatchShard;
use crate::torch::TorchResult;
use cpa_stream_stages::Result;

impl Trainer {
    /// Data-parallel training: where this rank's `rows` lie in the step's whole batch (one
    /// all-reduce of every rank's cell count); `None` alone.
    pub(super) fn batch_shard(&self, rows: i64) -> Result<Option<BatchShard>> {
        let Some(c) = &self.collective else { return Ok(None) };
        let mut counts = vec![0i64; c.world()];
        counts[c.rank()] = rows;
        let t = Tensor::f_from_slice(&counts).torch()?.f_to_device(self.model.device()).torch()?;
        c.all_reduce_sum(&t, &format!("the cells of batch {} of epoch {}", self.batches_in_epoch, self.state.epoch))?;
        let counts = Vec::<i64>::try_from(&t.f_to_device(Device::Cpu).torch()?).torch()?;
        Ok(Some(BatchShard {
            collective: Arc::clone(c),
            offset: counts[..c.rank()].iter().sum(),
            rows,
            total: counts.iter().sum(),
        }))
    }

    /// Data-parallel training: the step's gradients of group `ae` (the autoencoder and dosers)
    /// or the adversaries, summed over the ranks; `None` when no rank has any. Each rank's
    /// autoencoder gradients are of its share of the whole batch's loss (their sum is the
    /// whole batch's); every rank computed the adversaries' on the whole batch (their mean).
    pub(super) fn all_reduced(
        &self,
        adversary: bool,
        pending: Option<Vec<Option<Tensor>>>,
    ) -> Result<Option<Vec<Option<Tensor>>>> {
        let Some(c) = &self.collective else { return Ok(pending) };
        let params: Vec<Tensor> = if adversary {
            self.groups[2].params().iter().map(Tensor::shallow_clone).collect()
        } else {
            self.groups[0].params().iter().chain(self.groups[1].params()).map(Tensor::shallow_clone).collect()
        };
        let mut grads = pending.unwrap_or_else(|| params.iter().map(|_| None).collect());
        let what = format!(
            "{} gradients of step {} of epoch {}",
            if adversary { "the adversaries'" } else { "the autoencoder's" },
            self.batch_in_epoch,
            self.state.epoch
        );
        let divisor = if adversary { c.world() as f64 } else { 1.0 };
        c.average(&mut grads, &params, divisor, &what)?;
        Ok(grads.iter().any(Option::is_some).then_some(grads))
    }
}

/// The whole batch's basal latents with this rank's rows (`mine`, at `offset`) in place of their
/// gathered copies, so that gradients reach this rank's encoder.
pub(super) fn splice(whole: &Tensor, mine: &Tensor, offset: i64) -> Result<Tensor> {
    let (total, rows) = (whole.size()[0], mine.size()[0]);
    if rows == total {
        return Ok(mine.shallow_clone());
    }
    let before = whole.f_narrow(0, 0, offset).torch()?;
    let after = whole.f_narrow(0, offset + rows, total - offset - rows).torch()?;
    Tensor::f_cat(&[before, mine.shallow_clone(), after], 0).torch()
}

/// The whole batch's perturbations on every rank (mixup pairs cells across ranks): the entries
/// of every rank in rank order, their offsets from every rank's entry counts.
pub(super) fn whole_perts(c: &Collective, perts: &DevicePerts, offset: i64, total: i64) -> Result<DevicePerts> {
    let device = perts.ids.device();
    let rows = perts.offsets.size()[0] - 1;
    let lengths = perts.offsets.f_diff(1, 0, None::<&Tensor>, None::<&Tensor>).torch()?;
    let all_lengths = c.gather_rows(&lengths, offset, total, "the perturbations' lengths")?;
    let starts = Vec::<i64>::try_from(&all_lengths.f_to_device(Device::Cpu).torch()?).torch()?;
    let entries_before: i64 = starts[..offset as usize].iter().sum();
    let entries: i64 = starts.iter().sum();
    let ids = c.gather_rows(&perts.ids, entries_before, entries, "the perturbations")?;
    let doses = c.gather_rows(&perts.doses, entries_before, entries, "the doses")?;
    let zero = Tensor::f_zeros([1], (Kind::Int64, device)).torch()?;
    let offsets = Tensor::f_cat(&[zero, all_lengths.f_cumsum(0, Kind::Int64).torch()?], 0).torch()?;
    debug_assert_eq!(rows, lengths.size()[0]);
    Ok(DevicePerts { ids, offsets, doses })
}
