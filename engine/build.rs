//! Records a run path to libtorch in this crate's test binaries, so they load the libtorch they
//! were linked against without `LD_LIBRARY_PATH` (the `cpa-stream-engine` binary's build script
//! does more: see the root `build.rs`), and turns on the cfg of each C++ wrapper that
//! `cpa-stream-cxx` (`engine/cxx`) compiled: `cxx/device_memory.cpp`, the CUDA allocator's memory
//! statistics (`cfg(cpa_device_memory)`; without it the statistics read as unknown),
//! `cxx/collective.cpp`, the collectives of a torch.distributed process group for data-parallel
//! training (`cfg(cpa_collective)`; without it training runs on one process only),
//! `cxx/op_count.cpp`, the operator counter of `bench model --count-ops` (`cfg(cpa_op_count)`),
//! `cxx/profile.cpp`, libtorch's profiler for `bench model --profile` (`cfg(cpa_profile)`),
//! `cxx/optim.cpp`, the optimizer's fused kernels (`cfg(cpa_fused)`; without them the trainer
//! writes the update out), `cxx/nb_loss.cpp`, the training step's NB likelihood as one autograd
//! node (`cfg(cpa_fused_nb)`; without it autograd's graph of it), and `cxx/pinned.cpp`, copies to
//! the device through pinned host memory (`cfg(cpa_pinned)`). It checks that the wrappers were compiled against the libtorch that tch
//! links.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo::rerun-if-env-changed=DEP_CPA_CXX_CFGS");
    println!("cargo::rerun-if-env-changed=DEP_CPA_CXX_TORCH");
    println!("cargo::rerun-if-env-changed=DEP_CPA_CXX_KNOWN");
    // Every cfg a wrapper can turn on (cpa-stream-cxx's list), declared whether compiled or not.
    let known = std::env::var("DEP_CPA_CXX_KNOWN").unwrap_or_default();
    for cfg in known.split(',').filter(|c| !c.is_empty()) {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
    }
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        return;
    };
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo::rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    }
    let wrappers = std::env::var("DEP_CPA_CXX_CFGS").unwrap_or_default();
    if wrappers.is_empty() {
        return;
    }
    if let Some(torch) = std::env::var_os("DEP_CPA_CXX_TORCH") {
        same_libtorch(Path::new(&torch), &lib_dir);
    }
    for cfg in wrappers.split(',') {
        println!("cargo::rustc-cfg={cfg}");
    }
}

/// Panics, naming both, when the wrappers' headers (under TORCH) are not those of the libtorch
/// tch links (LIB_DIR): compiled against one and linked to another, they would call functions
/// with other layouts. Split installs (`LIBTORCH_INCLUDE`, `LIBTORCH_LIB`) are taken as given.
fn same_libtorch(torch: &Path, lib_dir: &Path) {
    for var in ["LIBTORCH_INCLUDE", "LIBTORCH_LIB"] {
        println!("cargo::rerun-if-env-changed={var}");
        if std::env::var_os(var).is_some() {
            return;
        }
    }
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let linked = lib_dir.parent().map(canonical);
    assert!(
        linked.as_deref() == Some(canonical(torch).as_path()),
        "the engine's C++ wrappers were compiled against the libtorch in {} but tch links the one in {}: \
         set LIBTORCH (or LIBTORCH_USE_PYTORCH) the same for the whole build",
        torch.display(),
        lib_dir.display()
    );
}
