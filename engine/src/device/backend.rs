//! libtorch's CUDA backend, loaded when the process starts on a machine that can run it.
//!
//! PyTorch's wheels put CUDA in `libtorch_cuda.so`, which pulls in cuBLAS, cuDNN, NCCL and the
//! other CUDA libraries and registers CUDA kernels for every operator as it loads: about 0.3 s of CPU
//! at each start of a process on a 2-core machine, half of libtorch's whole start, paid by every
//! command and every Python import even where no GPU exists. The binaries therefore do not link
//! it (build.rs); this module's initialiser, which runs before `main` (and when Python loads the
//! native module) right after libtorch's own libraries have started, loads it where an NVIDIA
//! driver is present, so that on such a machine everything starts as if it were linked.
//! It must run before anything asks libtorch about CUDA: libtorch decides once, at the first
//! question, whether it has a CUDA backend, and keeps the answer.
//!
//! `CPA_STREAM_CUDA=1` loads it whatever the machine shows, `CPA_STREAM_CUDA=0` never.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The variable that overrides the driver check: `1` loads the CUDA backend, `0` does not.
pub const CUDA_VAR: &str = "CPA_STREAM_CUDA";

/// Device files and driver entries of which any one shows an NVIDIA driver (on WSL 2, `/dev/dxg`).
const DRIVER_FILES: [&str; 4] = ["/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"];

/// What became of libtorch's CUDA backend in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaBackend {
    /// Loaded from this path (or found loaded: by torch in Python, or linked).
    Loaded(PathBuf),
    /// Not loaded: no NVIDIA driver on this machine.
    NoDriver,
    /// Not loaded: `CPA_STREAM_CUDA=0`.
    Disabled,
    /// This libtorch has no `libtorch_cuda.so` (a CPU-only build).
    NotBuilt,
    /// Loading failed; the dynamic loader's message.
    Failed(String),
}

impl CudaBackend {
    /// Whether CUDA can be used at all in this process.
    pub fn is_loaded(&self) -> bool {
        matches!(self, CudaBackend::Loaded(_))
    }

    /// Why CUDA is unavailable, for an error message (`None` when it was loaded).
    pub fn why_not(&self) -> Option<String> {
        match self {
            CudaBackend::Loaded(_) => None,
            CudaBackend::NoDriver => Some(format!(
                "no NVIDIA driver on this machine (none of {} exists; {CUDA_VAR}=1 loads libtorch's \
                 CUDA backend anyway)",
                DRIVER_FILES.join(", ")
            )),
            CudaBackend::Disabled => Some(format!("{CUDA_VAR}=0 keeps libtorch's CUDA backend unloaded")),
            CudaBackend::NotBuilt => Some("this libtorch is a CPU-only build (no libtorch_cuda.so)".into()),
            CudaBackend::Failed(e) => Some(format!("libtorch's CUDA backend failed to load: {e}")),
        }
    }
}

impl std::fmt::Display for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaBackend::Loaded(path) => write!(f, "loaded ({})", path.display()),
            other => write!(f, "not loaded: {}", other.why_not().unwrap_or_default()),
        }
    }
}

static BACKEND: OnceLock<CudaBackend> = OnceLock::new();

/// What became of the CUDA backend (loaded at the process's start; see the module's text).
pub fn cuda_backend() -> &'static CudaBackend {
    BACKEND.get_or_init(load)
}

#[cfg(target_os = "linux")]
extern "C" fn load_at_start() {
    let _ = cuda_backend();
}

#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static LOAD_AT_START: extern "C" fn() = load_at_start;

/// Whether the backend should be loaded: the variable's say, else whether a driver is present.
fn wanted(var: Option<&std::ffi::OsStr>, driver_present: impl Fn() -> bool) -> Result<(), CudaBackend> {
    match var.and_then(|v| v.to_str()) {
        Some("0") => Err(CudaBackend::Disabled),
        Some("1") => Ok(()),
        _ if driver_present() => Ok(()),
        _ => Err(CudaBackend::NoDriver),
    }
}

fn load() -> CudaBackend {
    if let Some(path) = mapped("libtorch_cuda.so") {
        return CudaBackend::Loaded(path);
    }
    if let Err(not) =
        wanted(std::env::var_os(CUDA_VAR).as_deref(), || DRIVER_FILES.iter().any(|f| Path::new(f).exists()))
    {
        return not;
    }
    let Some(cpu) = mapped("libtorch_cpu.so") else {
        return CudaBackend::Failed("libtorch_cpu.so is not loaded in this process".into());
    };
    let path = cpu.with_file_name("libtorch_cuda.so");
    if !path.exists() {
        return CudaBackend::NotBuilt;
    }
    match open(&path) {
        Ok(()) => CudaBackend::Loaded(path),
        Err(e) => CudaBackend::Failed(e),
    }
}

/// `dlopen` with the flags the dynamic loader gives a library a program is linked with.
#[cfg(target_os = "linux")]
fn open(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt as _;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path; the handle is kept open for the process's life (never
    // closed: libtorch's registrations point into the library).
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns this thread's last loader message, NUL-terminated, or null.
    let message = unsafe { libc::dlerror() };
    Err(if message.is_null() {
        format!("{}: dlopen failed", path.display())
    } else {
        // SAFETY: non-null and NUL-terminated (above).
        unsafe { std::ffi::CStr::from_ptr(message) }.to_string_lossy().into_owned()
    })
}

#[cfg(not(target_os = "linux"))]
fn open(path: &Path) -> Result<(), String> {
    Err(format!("{}: loaded at start on Linux only", path.display()))
}

/// The path of a shared library mapped in this process (`/proc/self/maps`).
pub fn mapped(file_name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| Path::new(path).file_name().is_some_and(|n| n == file_name))
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn the_variable_overrides_the_driver_check() {
        let (yes, no) = (|| true, || false);
        assert_eq!(wanted(None, yes), Ok(()));
        assert_eq!(wanted(None, no), Err(CudaBackend::NoDriver));
        assert_eq!(wanted(Some(OsStr::new("1")), no), Ok(()));
        assert_eq!(wanted(Some(OsStr::new("0")), yes), Err(CudaBackend::Disabled));
        // Anything else leaves the decision to the driver check.
        assert_eq!(wanted(Some(OsStr::new("yes")), no), Err(CudaBackend::NoDriver));
    }

    /// The backend's state agrees with what is mapped: loaded exactly when libtorch_cuda.so is.
    #[test]
    fn the_reported_state_is_what_the_process_has_mapped() {
        let backend = cuda_backend();
        assert_eq!(backend.is_loaded(), mapped("libtorch_cuda.so").is_some(), "{backend}");
        assert!(mapped("libtorch_cpu.so").is_some());
        if let Some(why) = backend.why_not() {
            assert!(!tch::Cuda::is_available(), "CUDA is available, yet the backend is {why}");
        }
    }
}
