//! Records a run path to libtorch in this crate's test binaries, so they load the libtorch they
//! were linked against without `LD_LIBRARY_PATH` (the `cpa-stream` binary's build script does
//! more: see the root `build.rs`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Some(dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB")
        && std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
    {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", std::path::Path::new(&dir).display());
    }
}
