//! Makes the `cpa-stream` binary load the libtorch it was built against, CUDA included.
//!
//! torch-sys links libtorch, but (a) the linker's default `--as-needed` drops `libtorch_cuda.so`
//! because no symbol of it is referenced directly, after which CUDA is silently unavailable at run
//! time, and (b) it records no run path, so the binary would need `LD_LIBRARY_PATH`. This script
//! links the libtorch libraries with `--no-as-needed` and records an rpath to their directory.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib_dir) = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        // torch-sys only exports the directory on unix-like targets; nothing to add elsewhere.
        return;
    };
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let dir = lib_dir.display();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    println!("cargo:rustc-link-arg=-L{dir}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for lib in ["torch_cuda", "torch_cpu", "torch", "c10_cuda", "c10"] {
        if lib_dir.join(format!("lib{lib}.so")).exists() {
            println!("cargo:rustc-link-arg=-l{lib}");
        }
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    println!("cargo:rustc-env=CPA_STREAM_LIBTORCH_LIB={dir}");
    // The pip package records its version (e.g. 2.11.0+cu130) next to lib/.
    let version_py = lib_dir.parent().map(|torch| torch.join("version.py"));
    if let Some(text) = version_py.and_then(|p| std::fs::read_to_string(p).ok())
        && let Some(line) = text.lines().find(|l| l.starts_with("__version__"))
        && let Some(version) = line.split(['\'', '"']).nth(1)
    {
        println!("cargo:rustc-env=CPA_STREAM_LIBTORCH_BUILD_VERSION={version}");
    }
}
