//! Memory of a CUDA device as libtorch's caching allocator counts it: the figures Python's
//! `torch.cuda.max_memory_allocated` and `max_memory_reserved` report. tch binds none of them, so
//! they come from a small C++ wrapper (`cxx/device_memory.cpp`) over libtorch's device-generic
//! allocator interface. On the CPU, with no CUDA device, or with a libtorch built without the
//! interface, they are unknown (`None`), never an error.

use serde::Serialize;
use tch::Device;

/// Bytes of one device's memory, since the allocator started or the last [`reset_peak`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceMemory {
    /// Held by live tensors now.
    pub allocated: u64,
    /// The most ever held by live tensors.
    pub peak_allocated: u64,
    /// Taken from the device by the allocator now: live tensors and its cache of freed blocks.
    pub reserved: u64,
    /// The most ever taken from the device by the allocator.
    pub peak_reserved: u64,
}

impl std::fmt::Display for DeviceMemory {
    /// The peaks, in MiB.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        write!(
            f,
            "peak device memory {:.1} MiB in tensors, {:.1} MiB reserved by the caching allocator",
            mib(self.peak_allocated),
            mib(self.peak_reserved)
        )
    }
}

#[cfg(cpa_device_memory)]
mod ffi {
    use std::ffi::c_int;

    unsafe extern "C" {
        pub fn cpa_cuda_memory_stats(device: c_int, out: *mut i64) -> c_int;
        pub fn cpa_cuda_reset_peak_memory(device: c_int) -> c_int;
        pub fn cpa_cuda_empty_cache() -> c_int;
    }
}

fn cuda_index(device: Device) -> Option<i32> {
    match device {
        Device::Cuda(i) => i32::try_from(i).ok(),
        _ => None,
    }
}

/// The allocator's counts for `device`; `None` for a device that is not CUDA, or when libtorch
/// cannot tell (no CUDA, or CUDA not initialised yet).
pub fn stats(device: Device) -> Option<DeviceMemory> {
    let index = cuda_index(device)?;
    read_stats(index)
}

#[cfg(cpa_device_memory)]
fn read_stats(index: i32) -> Option<DeviceMemory> {
    let mut out = [0i64; 4];
    // SAFETY: the wrapper writes at most four i64 to `out`, which has room for four, and catches
    // every C++ exception; it keeps no pointer after returning.
    let rc = unsafe { ffi::cpa_cuda_memory_stats(index, out.as_mut_ptr()) };
    let bytes = |v: i64| u64::try_from(v).ok();
    (rc == 0).then_some(())?;
    Some(DeviceMemory {
        allocated: bytes(out[0])?,
        peak_allocated: bytes(out[1])?,
        reserved: bytes(out[2])?,
        peak_reserved: bytes(out[3])?,
    })
}

#[cfg(not(cpa_device_memory))]
fn read_stats(_index: i32) -> Option<DeviceMemory> {
    None
}

/// Starts the peaks of `device` again from the current counts (a no-op where unknown).
pub fn reset_peak(device: Device) {
    #[cfg(cpa_device_memory)]
    if let Some(index) = cuda_index(device) {
        // SAFETY: takes a plain integer and catches every C++ exception.
        let _ = unsafe { ffi::cpa_cuda_reset_peak_memory(index) };
    }
    #[cfg(not(cpa_device_memory))]
    let _ = device;
}

/// Gives the allocator's cached, unused blocks back to the device (`torch.cuda.empty_cache`), so
/// that memory a finished phase left cached (a batch-size probe) is not counted against the
/// next one. A no-op off CUDA.
pub fn empty_cache(device: Device) {
    #[cfg(cpa_device_memory)]
    if cuda_index(device).is_some() {
        // SAFETY: takes no arguments and catches every C++ exception.
        let _ = unsafe { ffi::cpa_cuda_empty_cache() };
    }
    #[cfg(not(cpa_device_memory))]
    let _ = device;
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::*;

    #[test]
    fn the_cpu_has_no_device_memory() {
        assert_eq!(stats(Device::Cpu), None);
        reset_peak(Device::Cpu);
        empty_cache(Device::Cpu);
    }

    #[test]
    fn a_cuda_tensor_raises_the_peak_and_empty_cache_returns_the_cache() {
        if !tch::Cuda::is_available() {
            // The wrapper must answer "unknown", not fail, where there is no device.
            assert_eq!(stats(Device::Cuda(0)), None);
            eprintln!("skipped: no CUDA device (checked only that the statistics read as unknown)");
            return;
        }
        let device = Device::Cuda(0);
        let before = match Tensor::f_zeros([1], (Kind::Float, device)) {
            Ok(_) => stats(device),
            Err(e) => panic!("{e}"),
        };
        let Some(before) = before else { panic!("no statistics on a CUDA device") };
        reset_peak(device);
        let bytes = 64u64 << 20;
        let big = Tensor::f_zeros([(bytes / 4) as i64], (Kind::Float, device)).unwrap_or_else(|e| panic!("{e}"));
        let during = stats(device).unwrap_or_else(|| panic!("no statistics"));
        assert!(during.allocated >= before.allocated + bytes, "{before:?} -> {during:?}");
        drop(big);
        let after = stats(device).unwrap_or_else(|| panic!("no statistics"));
        assert!(after.peak_allocated >= before.allocated + bytes, "{after:?}");
        assert!(after.allocated < during.allocated, "{after:?}");
        empty_cache(device);
        let emptied = stats(device).unwrap_or_else(|| panic!("no statistics"));
        assert!(emptied.reserved + bytes <= after.reserved, "{after:?} -> {emptied:?}");
        assert!(emptied.peak_reserved >= after.reserved, "{emptied:?}");
    }
}
