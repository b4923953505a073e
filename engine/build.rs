//! Records a run path to libtorch in this crate's test binaries, so they load the libtorch they
//! were linked against without `LD_LIBRARY_PATH` (the `cpa-stream-engine` binary's build script
//! does more: see the root `build.rs`), and compiles `cxx/device_memory.cpp`, the CUDA
//! allocator's memory statistics (`cfg(cpa_device_memory)`; without libtorch's headers the
//! statistics read as unknown), and `cxx/collective.cpp`, the collectives of a torch.distributed
//! process group for data-parallel training (`cfg(cpa_collective)`; without c10d's headers
//! training runs on one process only).

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cxx/device_memory.cpp");
    println!("cargo:rerun-if-changed=cxx/collective.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo::rustc-check-cfg=cfg(cpa_device_memory)");
    println!("cargo::rustc-check-cfg=cfg(cpa_collective)");
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        return;
    };
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    }
    let include = lib_dir.parent().map(|torch| torch.join("include")).unwrap_or_default();
    if include.join("ATen/DeviceAccelerator.h").exists() {
        compile_device_memory(&include);
    } else {
        println!("cargo:warning=libtorch headers without ATen/DeviceAccelerator.h: no device memory statistics");
    }
    if include.join("torch/csrc/distributed/c10d/GroupRegistry.hpp").exists() {
        compile(&include, "cxx/collective.cpp", "cpa_collective");
        println!("cargo:rustc-cfg=cpa_collective");
    } else {
        println!("cargo:warning=libtorch headers without c10d's GroupRegistry.hpp: training on one process only");
    }
}

fn compile_device_memory(include: &Path) {
    compile(include, "cxx/device_memory.cpp", "cpa_device_memory");
    println!("cargo:rustc-cfg=cpa_device_memory");
}

fn compile(include: &Path, file: &str, name: &str) {
    // The same C++ ABI as torch-sys's own wrapper (its default is the C++11 ABI, as PyTorch 2.11's).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .file(file)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile(name);
}
