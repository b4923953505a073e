//! The binary loads the libtorch it was built against, with CUDA, and no LD_LIBRARY_PATH.

use std::path::Path;
use std::process::Command;

use crate::common::*;

fn libtorch_lib() -> &'static Path {
    Path::new(env!("CPA_STREAM_LIBTORCH_LIB"))
}

#[test]
fn binary_records_libtorch_cuda_and_a_run_path() {
    let out = match Command::new("readelf").arg("-d").arg(bin()).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIP: readelf not available ({e})");
            return;
        }
    };
    assert!(out.status.success());
    let dynamic = text(&out.stdout);
    let lib = libtorch_lib();
    let has_cuda = lib.join("libtorch_cuda.so").exists();
    if has_cuda {
        assert!(dynamic.contains("Shared library: [libtorch_cuda.so]"), "libtorch_cuda.so not NEEDED:\n{dynamic}");
    } else {
        eprintln!("note: {} has no libtorch_cuda.so (CPU-only libtorch)", lib.display());
    }
    assert!(dynamic.contains("Shared library: [libtorch_cpu.so]"), "{dynamic}");
    let run_path = dynamic
        .lines()
        .find(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .unwrap_or_else(|| panic!("no RUNPATH/RPATH:\n{dynamic}"));
    assert!(run_path.contains(&*lib.to_string_lossy()), "{run_path}");
}

#[test]
fn info_reports_the_loaded_libtorch() {
    let out = run(&["info", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(info["libtorch_version"].as_str().unwrap().starts_with("2.11.0"), "{info}");
    let loaded = info["libtorch_path"].as_str().unwrap();
    assert!(Path::new(loaded).starts_with(libtorch_lib()), "{loaded}");
    if libtorch_lib().join("libtorch_cuda.so").exists() {
        assert_eq!(info["libtorch_cuda_loaded"], true, "{info}");
    }
    assert!(info["cpu_threads"].as_i64().unwrap() >= 1);
    assert_eq!(info["cpa_stream_version"], env!("CARGO_PKG_VERSION"));
    if info["cuda_available"] == true {
        let n = info["cuda_device_count"].as_i64().unwrap();
        assert!(n >= 1);
        assert_eq!(info["cuda_devices"].as_array().unwrap().len(), n as usize);
    } else {
        eprintln!("SKIP: no CUDA device here; device names not checked");
        assert_eq!(info["cuda_device_count"], 0);
    }
    let text_out = run(&["info"]);
    assert!(text(&text_out.stdout).contains("libtorch         2.11.0"));
}
