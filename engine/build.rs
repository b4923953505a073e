//! Records a run path to libtorch in this crate's test binaries, so they load the libtorch they
//! were linked against without `LD_LIBRARY_PATH` (the `cpa-stream-engine` binary's build script
//! does more: see the root `build.rs`), and compiles `cxx/device_memory.cpp`, the CUDA
//! allocator's memory statistics (`cfg(cpa_device_memory)`; without libtorch's headers the
//! statistics read as unknown), and `cxx/collective.cpp`, the collectives of a torch.distributed
//! process group for data-parallel training (`cfg(cpa_collective)`; without c10d's headers
//! training runs on one process only), `cxx/op_count.cpp`, the operator counter of
//! `bench model --count-ops` (`cfg(cpa_op_count)`), `cxx/profile.cpp`, libtorch's profiler for
//! `bench model --profile` (`cfg(cpa_profile)`), and `cxx/optim.cpp`, the optimizer's fused
//! kernels (`cfg(cpa_fused)`; without them the trainer writes the update out), and
//! `cxx/pinned.cpp`, copies to the device through pinned host memory (`cfg(cpa_pinned)`).

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cxx/device_memory.cpp");
    println!("cargo:rerun-if-changed=cxx/collective.cpp");
    println!("cargo:rerun-if-changed=cxx/op_count.cpp");
    println!("cargo:rerun-if-changed=cxx/optim.cpp");
    println!("cargo:rerun-if-changed=cxx/profile.cpp");
    println!("cargo:rerun-if-changed=cxx/pinned.cpp");
    println!("cargo:rerun-if-changed=cxx/guarded.h");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo::rustc-check-cfg=cfg(cpa_device_memory)");
    println!("cargo::rustc-check-cfg=cfg(cpa_collective)");
    println!("cargo::rustc-check-cfg=cfg(cpa_op_count)");
    println!("cargo::rustc-check-cfg=cfg(cpa_fused)");
    println!("cargo::rustc-check-cfg=cfg(cpa_profile)");
    println!("cargo::rustc-check-cfg=cfg(cpa_pinned)");
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        return;
    };
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    }
    let include = lib_dir.parent().map(|torch| torch.join("include")).unwrap_or_default();
    // Each wrapper where libtorch's headers have what it needs; all compiled in one library, the
    // files in parallel (cc's `parallel` feature, which the dependencies already turn on).
    let wrappers = [
        (
            "cxx/device_memory.cpp",
            "cpa_device_memory",
            &["ATen/DeviceAccelerator.h"][..],
            "no device memory statistics",
        ),
        ("cxx/op_count.cpp", "cpa_op_count", &["ATen/record_function.h"][..], "no operator counts"),
        (
            "cxx/profile.cpp",
            "cpa_profile",
            &["torch/csrc/autograd/profiler_kineto.h"][..],
            "no profiler for bench model --profile",
        ),
        (
            "cxx/optim.cpp",
            "cpa_fused",
            &["ATen/ops/_fused_adam.h", "ATen/ops/_foreach_norm.h"][..],
            "the optimizer's step is written out",
        ),
        ("cxx/pinned.cpp", "cpa_pinned", &["ATen/core/Tensor.h"][..], "batches go to the device from pageable memory"),
        (
            "cxx/collective.cpp",
            "cpa_collective",
            &["torch/csrc/distributed/c10d/GroupRegistry.hpp"][..],
            "training on one process only",
        ),
    ];
    let mut files = Vec::new();
    for (file, cfg, headers, without) in wrappers {
        if let Some(missing) = headers.iter().find(|h| !include.join(h).exists()) {
            println!("cargo:warning=libtorch's headers lack {missing}: {without}");
            continue;
        }
        files.push(file);
        println!("cargo:rustc-cfg={cfg}");
    }
    if !files.is_empty() {
        compile(&include, &files);
    }
}

fn compile(include: &Path, files: &[&str]) {
    // The same C++ ABI as torch-sys's own wrapper (its default is the C++11 ABI, as PyTorch 2.11's).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
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
