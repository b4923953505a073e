//! `cpa-stream info`: what libtorch and which devices this binary really uses.

use std::ffi::{CStr, c_char, c_int};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use cpa_stream_engine::device::backend::mapped;

use crate::cli::info::InfoArgs;

#[derive(Debug, Serialize)]
struct Info {
    cpa_stream_version: &'static str,
    libtorch_version: String,
    libtorch_path: Option<PathBuf>,
    libtorch_cuda_loaded: bool,
    /// What became of the CUDA backend: "loaded (PATH)" or "not loaded: WHY".
    cuda_backend: String,
    cuda_available: bool,
    /// Without a CUDA device: libtorch's own error for a tensor on `cuda:0` (no driver, an old
    /// driver, no backend), its first sentence.
    cuda_error: Option<String>,
    cudnn_available: bool,
    cuda_device_count: i64,
    cuda_devices: Vec<String>,
    cpu_threads: i64,
}

pub fn run(args: InfoArgs) -> anyhow::Result<ExitCode> {
    // The backend's state first: it is settled before libtorch is asked about CUDA.
    let backend = cpa_stream_engine::device::cuda_backend();
    let cuda_available = tch::Cuda::is_available();
    let cuda_device_count = tch::Cuda::device_count();
    let libtorch_path = mapped("libtorch_cpu.so");
    let libtorch_version = libtorch_path
        .as_deref()
        .and_then(version_next_to)
        .unwrap_or_else(|| format!("{} (built against; loaded version unknown)", torch_sys_version()));
    let info = Info {
        cpa_stream_version: env!("CARGO_PKG_VERSION"),
        libtorch_version,
        libtorch_cuda_loaded: mapped("libtorch_cuda.so").is_some(),
        cuda_backend: backend.to_string(),
        libtorch_path,
        cuda_available,
        cuda_error: if cuda_available { None } else { cuda_error() },
        cudnn_available: cuda_available && tch::Cuda::cudnn_is_available(),
        cuda_device_count,
        cuda_devices: if cuda_available { cuda_device_names(cuda_device_count) } else { Vec::new() },
        cpu_threads: i64::from(tch::utils::get_num_threads()),
    };
    if args.json {
        jsonln!(&info);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("cpa-stream       {}", info.cpa_stream_version);
    outln!("libtorch         {}", info.libtorch_version);
    if let Some(p) = &info.libtorch_path {
        outln!("libtorch path    {}", p.display());
    }
    match backend.why_not() {
        None => outln!("libtorch_cuda    loaded"),
        Some(why) => outln!("libtorch_cuda    not loaded: {why}"),
    }
    outln!("CUDA available   {}", info.cuda_available);
    if let (true, Some(error)) = (backend.is_loaded(), &info.cuda_error) {
        outln!("CUDA error       {error}");
    }
    outln!("cuDNN available  {}", info.cudnn_available);
    outln!("CUDA devices     {}", info.cuda_device_count);
    for (i, name) in info.cuda_devices.iter().enumerate() {
        outln!("  cuda:{i}         {name}");
    }
    outln!("CPU threads      {}", info.cpu_threads);
    Ok(ExitCode::SUCCESS)
}

/// libtorch's error for a tensor placed on `cuda:0`, its first sentence (`None` if that works).
fn cuda_error() -> Option<String> {
    match tch::Tensor::f_zeros([1], (tch::Kind::Float, tch::Device::Cuda(0))) {
        Ok(_) => None,
        Err(e) => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or_default().trim();
            Some(line.find(". ").map_or(line, |end| &line[..=end]).to_string())
        }
    }
}

/// The libtorch version this binary was built against (recorded by build.rs).
fn torch_sys_version() -> &'static str {
    option_env!("CPA_STREAM_LIBTORCH_BUILD_VERSION").unwrap_or("unknown")
}

/// The `__version__` of the torch package whose `lib/` holds `library`.
fn version_next_to(library: &Path) -> Option<String> {
    let version_py = library.parent()?.parent()?.join("version.py");
    let text = std::fs::read_to_string(version_py).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("__version__"))
        .and_then(|rest| rest.split(['\'', '"']).nth(1))
        .map(str::to_owned)
}

/// Device names from the CUDA driver (`libcuda.so.1`), which libtorch has loaded when CUDA is
/// available. Names that cannot be read are reported as such.
fn cuda_device_names(count: i64) -> Vec<String> {
    type CuInit = unsafe extern "C" fn(u32) -> c_int;
    type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
    let unknown = |i| format!("device {i} (name unavailable)");
    // SAFETY: loading the system CUDA driver runs its initialisers, which libtorch has already
    // done in this process when CUDA is available.
    let Ok(lib) = (unsafe { libloading::Library::new("libcuda.so.1") }) else {
        return (0..count).map(unknown).collect();
    };
    // SAFETY: the signatures are those of the CUDA driver API (cuda.h); buffers are sized as
    // passed, and every return code is checked before a result is used.
    unsafe {
        let (Ok(init), Ok(get), Ok(name), total) = (
            lib.get::<CuInit>(b"cuInit\0"),
            lib.get::<CuDeviceGet>(b"cuDeviceGet\0"),
            lib.get::<CuDeviceGetName>(b"cuDeviceGetName\0"),
            lib.get::<CuDeviceTotalMem>(b"cuDeviceTotalMem_v2\0").ok(),
        ) else {
            return (0..count).map(unknown).collect();
        };
        if init(0) != 0 {
            return (0..count).map(unknown).collect();
        }
        (0..count)
            .map(|i| {
                let mut dev: c_int = 0;
                let mut buf = [0 as c_char; 256];
                if get(&mut dev, i as c_int) != 0 || name(buf.as_mut_ptr(), buf.len() as c_int, dev) != 0 {
                    return unknown(i);
                }
                let label = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
                let mut bytes = 0usize;
                match total.as_ref() {
                    Some(f) if f(&mut bytes, dev) == 0 => {
                        format!("{label} ({:.1} GiB)", bytes as f64 / (1u64 << 30) as f64)
                    }
                    _ => label,
                }
            })
            .collect()
    }
}
