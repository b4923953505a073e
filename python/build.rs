//! Links the native module against libtorch so that it shares the one libtorch of the `torch`
//! package installed beside it.
//!
//! The module lives at `site-packages/cpa_stream/_native*.so` and torch's libraries at
//! `site-packages/torch/lib`; the run path `$ORIGIN/../torch/lib` finds them without
//! `LD_LIBRARY_PATH`. Where torch's Python side is imported too, before or after, the libraries are
//! matched by soname and one libtorch serves both. `--no-as-needed` keeps libtorch's CPU
//! libraries; its CUDA backend (`libtorch_cuda.so`, and `libtorch.so`, which needs it) is not
//! linked: the engine's `device::backend` loads it as the module loads, where a driver is present.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(std::path::PathBuf::from) else { return };
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../torch/lib");
    println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for lib in ["torch_cpu", "c10"] {
        if lib_dir.join(format!("lib{lib}.so")).exists() {
            println!("cargo:rustc-link-arg=-l{lib}");
        }
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
