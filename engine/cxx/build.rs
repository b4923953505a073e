//! Compiles the engine's C++ wrappers against libtorch's headers into one static library, each
//! wrapper where the headers have what it needs, and tells the engine's build script which ones
//! (`cargo::metadata=cfgs`, a comma-separated list of the engine's cfg names, out of `known`, all
//! of them) and where libtorch was found (`cargo::metadata=torch`, the directory holding `include`
//! and `lib`).
//!
//! libtorch is found as libtorch's binding (torch-sys) finds it, without waiting for it:
//! `LIBTORCH_USE_PYTORCH` (the torch package of the Python on the path, as `pip install ./python`
//! builds), else `LIBTORCH` (scripts/bootstrap.sh sets it; `LIBTORCH_INCLUDE` overrides where the
//! headers are), else a system install under `/usr`. Without libtorch's headers
//! no wrapper is compiled: the engine then reads device memory as unknown, trains on one process
//! only, and so on (a warning says which).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Each wrapper: its file, the engine's cfg that says it was compiled, the headers it needs and
/// what the engine lacks without it.
const WRAPPERS: [(&str, &str, &[&str], &str); 7] = [
    ("device_memory.cpp", "cpa_device_memory", &["ATen/DeviceAccelerator.h"], "no device memory statistics"),
    ("op_count.cpp", "cpa_op_count", &["ATen/record_function.h"], "no operator counts"),
    ("profile.cpp", "cpa_profile", &["torch/csrc/autograd/profiler_kineto.h"], "no profiler for bench model --profile"),
    (
        "optim.cpp",
        "cpa_fused",
        &["ATen/ops/_fused_adam.h", "ATen/ops/_foreach_norm.h"],
        "the optimizer's step is written out",
    ),
    (
        "nb_loss.cpp",
        "cpa_fused_nb",
        &["torch/csrc/autograd/custom_function.h"],
        "the count likelihood trains through autograd's graph of it",
    ),
    ("pinned.cpp", "cpa_pinned", &["ATen/core/Tensor.h"], "batches go to the device from pageable memory"),
    (
        "collective.cpp",
        "cpa_collective",
        &["torch/csrc/distributed/c10d/GroupRegistry.hpp"],
        "training on one process only",
    ),
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=guarded.h");
    for (file, ..) in WRAPPERS {
        println!("cargo::rerun-if-changed={file}");
    }
    for var in ["LIBTORCH", "LIBTORCH_INCLUDE", "LIBTORCH_USE_PYTORCH", "LIBTORCH_CXX11_ABI", "VIRTUAL_ENV"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    // Every cfg a wrapper can turn on, whether compiled or not: the engine declares them all.
    let known: Vec<&str> = WRAPPERS.iter().map(|(_, cfg, ..)| *cfg).collect();
    println!("cargo::metadata=known={}", known.join(","));
    let Some(torch) = libtorch_dir() else {
        println!("cargo::warning=libtorch not found (LIBTORCH, LIBTORCH_USE_PYTORCH): no C++ wrappers");
        println!("cargo::metadata=cfgs=");
        return;
    };
    let include = include_dir(&torch);
    let mut files = Vec::new();
    let mut cfgs = Vec::new();
    for (file, cfg, headers, without) in WRAPPERS {
        if let Some(missing) = headers.iter().find(|h| !include.join(h).exists()) {
            println!("cargo::warning=libtorch's headers lack {missing}: {without}");
            continue;
        }
        files.push(file);
        cfgs.push(cfg);
    }
    if !files.is_empty() {
        compile(&include, &files);
    }
    println!("cargo::metadata=cfgs={}", cfgs.join(","));
    println!("cargo::metadata=torch={}", torch.display());
}

/// The directory of libtorch's `include` and `lib`, found as torch-sys finds it.
fn libtorch_dir() -> Option<PathBuf> {
    if env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        // torch-sys's choice of interpreter: `python` inside a virtual environment, else `python3`.
        let python = if env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
        let script = "import os, torch; print(os.path.dirname(torch.__file__))";
        let out = Command::new(python).args(["-c", script]).output().ok()?;
        let dir = String::from_utf8(out.stdout).ok()?;
        return out.status.success().then(|| PathBuf::from(dir.trim()));
    }
    if let Some(dir) = env::var_os("LIBTORCH") {
        return Some(PathBuf::from(dir));
    }
    Path::new("/usr/lib/libtorch.so").exists().then(|| PathBuf::from("/usr"))
}

/// libtorch's headers: `include` under TORCH, or under `LIBTORCH_INCLUDE` where torch-sys reads it.
fn include_dir(torch: &Path) -> PathBuf {
    match env::var_os("LIBTORCH_INCLUDE") {
        Some(dir) if env::var_os("LIBTORCH_USE_PYTORCH").is_none() => PathBuf::from(dir).join("include"),
        _ => torch.join("include"),
    }
}

fn compile(include: &Path, files: &[&str]) {
    // The same C++ ABI as torch-sys's own wrapper (its default is the C++11 ABI, as PyTorch 2.11's).
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .files(files)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // Glue between Rust and libtorch's operators: -O1 compiles in three quarters of -O3's
        // time (libtorch's headers dominate), and the work is in libtorch's kernels.
        .opt_level(1)
        .warnings(false)
        .compile("cpa_cxx");
}
