//! Batches on the model's device: a loader's host batch
//! ([`HostBatch`](cpa_stream_stages::model::HostBatch)) uploaded, its counts densified there.

use std::ops::Range;

use cpa_stream_stages::CsrBatch;
pub use cpa_stream_stages::model::batch::{HostBatch, PerturbationCsr};
use cpa_stream_stages::{Error, Result};
use tch::{Device, Kind, Tensor};

use super::likelihood::Entries;
use crate::torch::TorchResult;

/// A host matrix of perturbation doses on a device.
pub trait ToDevice {
    /// The matrix on `device`, as the model reads it.
    fn to_device(&self, device: Device) -> Result<DevicePerts>;
}

impl ToDevice for PerturbationCsr {
    fn to_device(&self, device: Device) -> Result<DevicePerts> {
        Ok(DevicePerts {
            ids: slice_to_device(&self.ids, device)?,
            offsets: slice_to_device(&self.offsets, device)?,
            doses: slice_to_device(&self.doses, device)?,
        })
    }
}

/// The perturbations of a batch on the device: CSR over the perturbation vocabulary.
#[derive(Debug)]
pub struct DevicePerts {
    /// Perturbation id of each entry (int64).
    pub ids: Tensor,
    /// Entry offsets, one more than cells (int64).
    pub offsets: Tensor,
    /// Dose of each entry (float32).
    pub doses: Tensor,
}

/// A batch on the model's device.
#[derive(Debug)]
pub struct DeviceBatch {
    /// Cells.
    pub n_cells: i64,
    /// Dense counts, cells x genes, float32.
    pub x: Tensor,
    /// The non-zero entries of `x`.
    pub entries: Entries,
    /// The cells' perturbations.
    pub perts: DevicePerts,
    /// One int64 code vector per covariate.
    pub covariates: Vec<Tensor>,
    /// Condition classes, int64.
    pub conditions: Tensor,
}

impl DeviceBatch {
    /// Uploads a host batch and densifies its counts on `device` (the host never holds the dense
    /// matrix). The batch should have passed [`HostBatch::check`].
    pub fn upload(batch: &HostBatch, device: Device) -> Result<DeviceBatch> {
        let n = batch.n_cells() as i64;
        let genes = i64::from(batch.counts.n_cols());
        let (x, entries) = densify_with_entries(&batch.counts, device)?;
        let perts = batch.perts.to_device(device)?;
        let covariates = batch.covariates.iter().map(|c| slice_to_device(c, device)).collect::<Result<Vec<_>>>()?;
        let conditions = slice_to_device(&batch.conditions, device)?;
        debug_assert_eq!(x.size(), [n, genes]);
        Ok(DeviceBatch { n_cells: n, x, entries, perts, covariates, conditions })
    }
}

/// CSR rows to a dense float32 matrix on `device`: the CSR arrays are copied (values float32,
/// column indices int32), the row of each entry is expanded and the entries scattered there.
pub fn densify(rows: &CsrBatch, device: Device) -> Result<Tensor> {
    Ok(densify_with_entries(rows, device)?.0)
}

/// [`densify`], also returning the non-zero entries (row, column, value) on the device.
pub fn densify_with_entries(rows: &CsrBatch, device: Device) -> Result<(Tensor, Entries)> {
    densify_range(rows, 0..rows.n_rows(), device)
}

/// [`densify_with_entries`] of the rows `range` of `rows` (row numbers of the result and of the
/// entries start at 0).
pub fn densify_range(rows: &CsrBatch, range: Range<usize>, device: Device) -> Result<(Tensor, Entries)> {
    if range.start > range.end || range.end > rows.n_rows() {
        return Err(Error::InvalidInput(format!("rows {range:?} of a batch of {} rows", rows.n_rows())));
    }
    if rows.n_cols() > i32::MAX as u32 {
        return Err(Error::InvalidInput(format!("{} genes: at most {} are supported", rows.n_cols(), i32::MAX)));
    }
    let (n, genes) = (range.len() as i64, i64::from(rows.n_cols()));
    let indptr = &rows.indptr()[range.start..=range.end];
    let (first, last) = (indptr[0] as usize, indptr[indptr.len() - 1] as usize);
    let nnz = (last - first) as i64;
    let mut dense = Tensor::f_zeros([n, genes], (Kind::Float, device)).torch()?;
    if nnz == 0 {
        let empty = |kind| Tensor::f_zeros([0], (kind, device));
        return Ok((
            dense,
            Entries {
                rows: empty(Kind::Int64).torch()?,
                cols: empty(Kind::Int64).torch()?,
                values: empty(Kind::Float).torch()?,
            },
        ));
    }
    let values = slice_to_device(&rows.data()[first..last], device)?;
    let col: &[i32] = bytemuck::cast_slice(&rows.indices()[first..last]);
    let col = slice_to_device(col, device)?.f_to_kind(Kind::Int64).torch()?;
    let indptr: &[i64] = bytemuck::cast_slice(indptr);
    let lengths = slice_to_device(indptr, device)?.f_diff(1, 0, None::<&Tensor>, None::<&Tensor>).torch()?;
    let row = Tensor::f_repeat_interleave(&lengths, nnz).torch()?;
    // In place: the zeros are fresh, and a copy would double the largest tensor of the step.
    let _ = dense.f_index_put_(&[Some(row.shallow_clone()), Some(col.shallow_clone())], &values, false).torch()?;
    Ok((dense, Entries { rows: row, cols: col, values }))
}

/// A host slice as a 1-D tensor on `device`. On CUDA (where this build has the wrapper) the
/// slice goes through pinned host memory and the copy is queued without blocking the host (the
/// slice may be reused when this returns): a copy from pageable memory is staged by the driver
/// while the host waits, and libtorch then waits for the whole stream, the trainer's queued
/// kernels included. Elsewhere the slice is copied into a tensor and moved.
pub fn slice_to_device<T: tch::kind::Element>(data: &[T], device: Device) -> Result<Tensor> {
    #[cfg(cpa_pinned)]
    if device.is_cuda() && !data.is_empty() {
        return pinned::copy(data, device);
    }
    Tensor::f_from_slice(data).torch()?.f_to_device(device).torch()
}

#[cfg(cpa_pinned)]
mod pinned {
    use std::ffi::{c_char, c_int, c_void};

    use cpa_stream_stages::{Error, Result};
    use tch::{Device, Tensor};

    use crate::torch::TorchResult;

    unsafe extern "C" {
        fn cpa_copy_through_pinned(src: *mut c_void, dst: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    }

    pub fn copy<T: tch::kind::Element>(data: &[T], device: Device) -> Result<Tensor> {
        let size = [data.len() as i64];
        // SAFETY: the tensor views `data` only during this call (the wrapper copies it into
        // pinned memory before it returns) and is dropped before `data` can change.
        let src = unsafe { Tensor::f_from_blob(data.as_ptr().cast(), &size, &[], T::KIND, Device::Cpu) }.torch()?;
        let dst = Tensor::f_empty(size, (T::KIND, device)).torch()?;
        let mut err = [0u8; 1024];
        // SAFETY: both pointers are live tensors of the same size and type; `err` is writable.
        let rc = unsafe {
            cpa_copy_through_pinned(
                src.as_ptr() as *mut c_void,
                dst.as_ptr() as *mut c_void,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        drop(src);
        if rc != 0 {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            let message = String::from_utf8_lossy(&err[..end]).into_owned();
            return Err(Error::torch(format!("copying a batch to {device:?}"), tch::TchError::Torch(message)));
        }
        Ok(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn densify_places_every_entry() -> Result<()> {
        let mut rows = CsrBatch::new(5);
        rows.push_row(&[0, 3], &[1.0, 7.0]);
        rows.push_row(&[], &[]);
        rows.push_row(&[4], &[2.5]);
        let dense = densify(&rows, Device::Cpu)?;
        let got = Vec::<f32>::try_from(&dense.f_flatten(0, -1).torch()?).torch()?;
        assert_eq!(got, [1.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.5]);
        Ok(())
    }

    #[test]
    fn densify_range_is_the_slice_of_the_whole() -> Result<()> {
        let mut rows = CsrBatch::new(4);
        rows.push_row(&[1], &[3.0]);
        rows.push_row(&[0, 2], &[1.0, 2.0]);
        rows.push_row(&[], &[]);
        rows.push_row(&[3], &[9.0]);
        let whole = densify(&rows, Device::Cpu)?;
        for (a, b) in [(0, 4), (1, 3), (2, 3), (3, 4), (2, 2)] {
            let (part, entries) = densify_range(&rows, a..b, Device::Cpu)?;
            assert!(part.f_equal(&whole.f_narrow(0, a as i64, (b - a) as i64).torch()?).torch()?, "rows {a}..{b}");
            let nnz = (rows.indptr()[b] - rows.indptr()[a]) as i64;
            assert_eq!(entries.values.size(), [nnz], "rows {a}..{b}");
        }
        assert!(densify_range(&rows, 3..5, Device::Cpu).is_err());
        Ok(())
    }

    /// The upload through pinned memory places every entry as the CPU's densify does, and the
    /// host arrays may be overwritten as soon as it returns. Skipped (with the reason printed)
    /// where libtorch sees no CUDA device.
    #[test]
    fn densify_on_cuda_matches_the_cpu_and_frees_the_host_arrays() -> Result<()> {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: no CUDA device visible to libtorch");
            return Ok(());
        }
        let (cells, genes) = (3000usize, 700u32);
        let mut rows = CsrBatch::new(genes);
        let mut state = 11u64;
        for cell in 0..cells {
            let (mut cols, mut values) = (Vec::new(), Vec::new());
            for g in 0..genes {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if (state >> 33).is_multiple_of(5) {
                    cols.push(g);
                    values.push(((state >> 40) % 50) as f32 + cell as f32 * 1e-3);
                }
            }
            rows.push_row(&cols, &values);
        }
        let want = densify(&rows, Device::Cpu)?;
        let (got, entries) = densify_with_entries(&rows, Device::Cuda(0))?;
        // Overwritten before the device's work is waited for: the upload copied them already.
        let written = rows.clone();
        rows.clear();
        for _ in 0..cells {
            rows.push_row(&[0, 1, 2], &[-1.0, -2.0, -3.0]);
        }
        let got = got.f_to_device(Device::Cpu).torch()?;
        assert!(got.f_equal(&want).torch()?, "the CUDA upload differs from the CPU's densify");
        assert_eq!(entries.values.size(), [written.data().len() as i64]);
        let cols = Vec::<i64>::try_from(&entries.cols.f_to_device(Device::Cpu).torch()?).torch()?;
        assert!(cols.iter().zip(written.indices()).all(|(&a, &b)| a == i64::from(b)));
        Ok(())
    }
}
