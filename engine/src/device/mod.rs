//! The devices a model runs on: their command-line names, a check that a CUDA device exists,
//! libtorch's CUDA backend loaded at the start where a driver is present ([`backend`]), and the
//! CUDA caching allocator's memory figures ([`memory`]).

pub mod backend;
pub mod memory;

pub use backend::{CudaBackend, cuda_backend};
pub use memory::DeviceMemory;
use tch::Device;

use cpa_stream_stages::{Error, Result};

/// The device of a command-line name: `cpu`, `cuda` (device 0) or `cuda:N`.
pub fn parse(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match name.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(i) => Ok(Device::Cuda(i)),
            None => Err(Error::InvalidInput(format!("device {name:?}: expected cpu, cuda or cuda:N"))),
        },
    }
}

/// Checks that a requested CUDA device exists, with a clear error when it does not.
pub fn check(device: Device) -> Result<()> {
    if let Device::Cuda(i) = device {
        if let Some(why) = cuda_backend().why_not() {
            return Err(Error::InvalidInput(format!("device cuda:{i} requested, but {why}")));
        }
        let n = tch::Cuda::device_count();
        if !tch::Cuda::is_available() || i as i64 >= n {
            return Err(Error::InvalidInput(format!(
                "device cuda:{i} requested, but libtorch sees {n} CUDA devices (run `cpa-stream info`)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_names_say_what_is_expected() {
        assert_eq!(parse("cpu").ok(), Some(Device::Cpu));
        assert_eq!(parse("cuda").ok(), Some(Device::Cuda(0)));
        assert_eq!(parse("cuda:3").ok(), Some(Device::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            let err = parse(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("expected cpu, cuda or cuda:N"), "{bad:?}: {err}");
        }
        assert!(check(Device::Cpu).is_ok());
    }
}
