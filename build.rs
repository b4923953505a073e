//! Makes `cpa-stream-engine` (and this package's tests and examples) load the libtorch it was
//! built against; the `cpa-stream` front needs no libtorch and loads none.
//!
//! torch-sys links libtorch but records no run path, so the binary would need `LD_LIBRARY_PATH`.
//! This script records an rpath to their directory for every target, and links libtorch's CPU
//! libraries with `--no-as-needed` for the targets that run the model only (the engine, tests,
//! examples): a `cargo:rustc-link-arg` would make the front load them too. The CUDA backend
//! (`libtorch_cuda.so`) is not linked (the linker's `--as-needed` drops it: no symbol of it is
//! referenced): the engine crate's `device::backend` loads it as the process starts where an
//! NVIDIA driver is present, and a machine without one does not pay its 0.4 s at every start.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    git_revision();
    // The tch binding's version, from this package's own dependency pin.
    let manifest = std::fs::read_to_string("Cargo.toml").unwrap_or_default();
    let tch = manifest
        .lines()
        .find(|l| l.starts_with("tch = "))
        .and_then(|l| l.split('"').nth(1))
        .map(|v| v.trim_start_matches('=').to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=CPA_STREAM_TCH_VERSION={tch}");
    if !libtorch_version_from_pip() {
        println!("cargo:rustc-env=CPA_STREAM_LIBTORCH_BUILD_VERSION=unknown");
    }
    link_libtorch();
}

/// `CPA_STREAM_GIT_REVISION`: the commit built, `-dirty` with uncommitted changes to tracked
/// files, `unknown` outside a git checkout (a source tarball).
fn git_revision() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let revision = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let suffix = if dirty { "-dirty" } else { "" };
    println!("cargo:rustc-env=CPA_STREAM_GIT_REVISION={revision}{suffix}");
    // Rebuilt (this crate only) when HEAD moves or the index changes.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        let dir = PathBuf::from(dir);
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        println!("cargo:rerun-if-changed={}", dir.join("index").display());
        if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let common = git(&["rev-parse", "--git-common-dir"]).map(PathBuf::from).unwrap_or(dir);
            println!("cargo:rerun-if-changed={}", common.join(reference).display());
        }
    }
}

/// Sets `CPA_STREAM_LIBTORCH_BUILD_VERSION` from the pip package's version.py; false when absent.
fn libtorch_version_from_pip() -> bool {
    let Some(lib_dir) = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else { return false };
    let version_py = lib_dir.parent().map(|torch| torch.join("version.py"));
    if let Some(text) = version_py.and_then(|p| std::fs::read_to_string(p).ok())
        && let Some(line) = text.lines().find(|l| l.starts_with("__version__"))
        && let Some(version) = line.split(['\'', '"']).nth(1)
    {
        println!("cargo:rustc-env=CPA_STREAM_LIBTORCH_BUILD_VERSION={version}");
        return true;
    }
    false
}

fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib_dir) = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        // torch-sys only exports the directory on unix-like targets; nothing to add elsewhere.
        return;
    };
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let dir = lib_dir.display();
    // libtorch's CPU libraries only: the CUDA backend (`libtorch_cuda.so`, and `libtorch.so`,
    // which needs it) is loaded at the start where a driver is present (the engine's
    // `device::backend`), not by the dynamic loader on every machine.
    let libs: Vec<&str> =
        ["torch_cpu", "c10"].into_iter().filter(|lib| lib_dir.join(format!("lib{lib}.so")).exists()).collect();
    // Every target of the package gets the run path (doctests included, which take no
    // target-specific arguments); on the front it only names a directory, from which nothing is
    // loaded, because the front needs no library there.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    for target in ["-bin=cpa-stream-engine=", "-tests=", "-examples="] {
        let arg = |a: &str| println!("cargo:rustc-link-arg{target}{a}");
        arg(&format!("-L{dir}"));
        arg("-Wl,--no-as-needed");
        for lib in &libs {
            arg(&format!("-l{lib}"));
        }
        arg("-Wl,--as-needed");
    }
    println!("cargo:rustc-env=CPA_STREAM_LIBTORCH_LIB={dir}");
}
