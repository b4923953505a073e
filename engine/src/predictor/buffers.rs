//! Host buffers of the predictor's output columns, recycled through Arrow: a batch's predicted
//! means go from the model to the sink without a copy and come back when the sink drops them.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use arrow_buffer::{Buffer, ScalarBuffer};
use tch::{Device, Kind, Tensor};

use crate::torch::TorchResult;

/// Float values on the host, ready to become an Arrow array.
pub(super) type HostValues = ScalarBuffer<f32>;

/// Recycled host buffers for one output column. The predicted means of a batch (cells x genes
/// float32, 20 MB at 1,024 x 5,000) are the largest and longest-lived allocation of a prediction:
/// each lives from the predictor through the channel to the sink. Allocated afresh per batch
/// they fragment the allocator's heaps, and the resident memory of a run kept creeping for
/// hundreds of batches; recycled, a run reaches its steady state within a few batches.
#[derive(Clone, Default)]
pub(super) struct BufferPool {
    free: Arc<Mutex<Vec<Vec<f32>>>>,
}

/// Buffers a pool keeps; more in flight (a consumer holding batches) are freed on return.
const POOL_KEEP: usize = 8;

/// A pooled buffer lent to Arrow: returns to its pool when the last array using it is dropped.
struct Lent {
    values: Vec<f32>,
    pool: Arc<Mutex<Vec<Vec<f32>>>>,
}

impl Drop for Lent {
    fn drop(&mut self) {
        let values = std::mem::take(&mut self.values);
        if let Ok(mut free) = self.pool.lock()
            && free.len() < POOL_KEEP
        {
            free.push(values);
        }
    }
}

impl BufferPool {
    /// A buffer of `len` values: a returned one of that length, else a new one (zeroed).
    pub(super) fn take(&self, len: usize) -> Vec<f32> {
        let reused = self.free.lock().ok().and_then(|mut free| {
            let at = free.iter().position(|v| v.len() == len)?;
            Some(free.swap_remove(at))
        });
        reused.unwrap_or_else(|| vec![0.0; len])
    }

    /// `values` as an Arrow buffer that returns them to this pool once the last array using it
    /// is dropped.
    pub(super) fn lend(&self, mut values: Vec<f32>) -> HostValues {
        let len = values.len();
        let Some(ptr) = NonNull::new(values.as_mut_ptr().cast::<u8>()) else {
            return ScalarBuffer::from(values);
        };
        let lent = Lent { values, pool: Arc::clone(&self.free) };
        // SAFETY: `ptr` points to the `len` initialised f32 values of `lent.values`, a vector that
        // `lent` owns and never resizes or writes while the buffer exists (it is only taken back
        // in `Drop`, after the last reference to the buffer is gone); the heap allocation does
        // not move when `lent` does. The pointer is non-null and aligned for f32.
        let buffer = unsafe { Buffer::from_custom_allocation(ptr, len * std::mem::size_of::<f32>(), Arc::new(lent)) };
        ScalarBuffer::new(buffer, 0, len)
    }
}

/// Copies the values of `t` (any float kind, any device) into `out`, which must hold exactly as
/// many: one copy from the device (or one conversion on the CPU) straight into the pooled buffer,
/// through a tensor that views it. Copied through a host tensor of its own instead, every batch
/// paid a fresh allocation of its size, its pages' first touch and a second copy: on a GPU that
/// held the per-cell rows to a third of the rate the model reaches with aggregates.
pub(super) fn copy_values(t: &Tensor, out: &mut [f32]) -> cpa_stream_stages::Result<()> {
    if t.numel() != out.len() {
        return Err(cpa_stream_stages::Error::InvalidInput(format!(
            "{} predicted values for an output of {}",
            t.numel(),
            out.len()
        )));
    }
    if out.is_empty() {
        return Ok(());
    }
    // SAFETY: `out` holds exactly `t.numel()` initialised f32 values and stays mutably borrowed
    // by this function while the view exists; the view is contiguous with `t`'s shape, is never
    // resized, and is dropped before the function returns (`copy_` from any device waits for the
    // copy to end), so nothing reads or writes `out` through it afterwards.
    let mut view =
        unsafe { Tensor::f_from_blob(out.as_mut_ptr().cast::<u8>(), &t.size(), &[], Kind::Float, Device::Cpu) }
            .torch()?;
    view.f_copy_(t).torch()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use arrow_array::Float32Array;

    use super::*;

    #[test]
    fn lent_buffers_keep_their_values_and_return_to_the_pool() {
        let pool = BufferPool::default();
        let mut values = pool.take(6);
        values.copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let address = values.as_ptr();
        let array = Float32Array::new(pool.lend(values), None);
        let slice = array.slice(2, 3);
        drop(array);
        // A slice still holds the buffer: nothing returned yet, the values are intact.
        assert_eq!(slice.values().as_ref(), &[3.0, 4.0, 5.0]);
        assert_eq!(pool.free.lock().map(|f| f.len()).unwrap_or(usize::MAX), 0);
        drop(slice);
        let again = pool.take(6);
        assert_eq!(again.as_ptr(), address, "the dropped buffer is reused");
        assert_eq!(pool.take(6).len(), 6, "an empty pool allocates");
        assert_eq!(pool.take(4).len(), 4, "other lengths get their own buffers");
    }

    #[test]
    fn values_are_copied_from_any_layout_and_kind() -> cpa_stream_stages::Result<()> {
        // Transposed (not contiguous) doubles: 2 x 3 read row by row.
        let t = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]).view([3, 2]).tr();
        let mut out = vec![0f32; 6];
        copy_values(&t, &mut out)?;
        assert_eq!(out, [1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
        // bfloat16 values widen exactly.
        let half = Tensor::from_slice(&[0.5f32, -2.0, 1024.0]).to_kind(Kind::BFloat16);
        let mut out = vec![0f32; 3];
        copy_values(&half, &mut out)?;
        assert_eq!(out, [0.5, -2.0, 1024.0]);
        // A length that does not match is an error, and `out` is left alone.
        let mut short = vec![7f32; 2];
        assert!(copy_values(&half, &mut short).is_err());
        assert_eq!(short, [7.0, 7.0]);
        Ok(())
    }

    /// Skipped (with the reason printed) where libtorch sees no CUDA device.
    #[test]
    fn values_are_copied_from_cuda() -> cpa_stream_stages::Result<()> {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: no CUDA device visible to libtorch");
            return Ok(());
        }
        let host: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.25).collect();
        let t = Tensor::from_slice(&host).view([100, 100]).to_device(Device::Cuda(0));
        let mut out = vec![0f32; host.len()];
        copy_values(&t.tr(), &mut out)?;
        let want: Vec<f32> = (0..10_000).map(|k| host[(k % 100) * 100 + k / 100]).collect();
        assert_eq!(out, want);
        Ok(())
    }

    #[test]
    fn a_pool_keeps_a_bounded_number_of_buffers() {
        let pool = BufferPool::default();
        let lent: Vec<HostValues> = (0..POOL_KEEP + 5).map(|_| pool.lend(pool.take(3))).collect();
        drop(lent);
        assert_eq!(pool.free.lock().map(|f| f.len()).unwrap_or(0), POOL_KEEP);
    }
}
