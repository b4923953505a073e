//! Host buffers of the predictor's output columns, recycled through Arrow: a batch's predicted
//! means go from the model to the sink without a copy and come back when the sink drops them.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use arrow::buffer::{Buffer, ScalarBuffer};
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
/// many.
pub(super) fn copy_values(t: &Tensor, out: &mut [f32]) -> cpa_stream_stages::Result<()> {
    let host = t.f_to_kind(Kind::Float).torch()?.f_to_device(Device::Cpu).torch()?.f_contiguous().torch()?;
    if host.numel() != out.len() {
        return Err(cpa_stream_stages::Error::InvalidInput(format!(
            "{} predicted values for an output of {}",
            host.numel(),
            out.len()
        )));
    }
    if !out.is_empty() {
        host.f_copy_data(out, out.len()).torch()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use arrow::array::Float32Array;

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
    fn a_pool_keeps_a_bounded_number_of_buffers() {
        let pool = BufferPool::default();
        let lent: Vec<HostValues> = (0..POOL_KEEP + 5).map(|_| pool.lend(pool.take(3))).collect();
        drop(lent);
        assert_eq!(pool.free.lock().map(|f| f.len()).unwrap_or(0), POOL_KEEP);
    }
}
