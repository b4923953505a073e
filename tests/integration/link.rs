//! The engine loads the libtorch it was built against, and no LD_LIBRARY_PATH; its CUDA backend
//! where an NVIDIA driver is present (or when asked); the front loads none, and hands the model
//! commands to the engine.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

use crate::common::*;

fn libtorch_lib() -> &'static Path {
    Path::new(env!("CPA_STREAM_LIBTORCH_LIB"))
}

#[test]
fn engine_records_libtorch_and_a_run_path_and_leaves_cuda_to_the_start() {
    let out = match Command::new("readelf").arg("-d").arg(engine_bin()).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIP: readelf not available ({e})");
            return;
        }
    };
    assert!(out.status.success());
    let dynamic = text(&out.stdout);
    let lib = libtorch_lib();
    // The CUDA backend (and libtorch.so, which needs it) is loaded at the start, not linked.
    for cuda in ["libtorch_cuda.so", "libtorch.so", "libc10_cuda.so"] {
        assert!(!dynamic.contains(&format!("Shared library: [{cuda}]")), "{cuda} is NEEDED:\n{dynamic}");
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
    // Loaded exactly where the process says it loaded it.
    let backend = info["cuda_backend"].as_str().unwrap();
    assert_eq!(info["libtorch_cuda_loaded"], backend.starts_with("loaded"), "{info}");
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

/// `CPA_STREAM_CUDA=1` loads libtorch's CUDA backend where no driver is present, and it
/// registers with libtorch as a linked one does: a CUDA device is then refused for want of a
/// device or driver, no longer for want of the library. `CPA_STREAM_CUDA=0` leaves it out.
#[test]
fn the_cuda_backend_loads_when_asked_and_registers_with_libtorch() {
    let lib = libtorch_lib();
    if !lib.join("libtorch_cuda.so").exists() {
        eprintln!("SKIP: {} has no libtorch_cuda.so (CPU-only libtorch)", lib.display());
        return;
    }
    let info = |value: &str| -> serde_json::Value {
        let out = Command::new(engine_bin()).args(["info", "--json"]).env("CPA_STREAM_CUDA", value).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let on = info("1");
    assert_eq!(on["libtorch_cuda_loaded"], true, "{on}");
    assert!(on["cuda_backend"].as_str().unwrap().starts_with("loaded"), "{on}");
    let off = info("0");
    assert_eq!(off["libtorch_cuda_loaded"], false, "{off}");
    assert!(off["cuda_backend"].as_str().unwrap().contains("CPA_STREAM_CUDA=0"), "{off}");
    if on["cuda_available"] == true {
        return;
    }
    // No device here. Without the backend, libtorch has no CUDA kernel for a tensor on cuda:0;
    // with it, the kernel runs and asks the driver: the late load registered the backend's
    // kernels as linking it would.
    let (on_error, off_error) = (on["cuda_error"].as_str().unwrap(), off["cuda_error"].as_str().unwrap());
    let no_kernel = "from the 'CUDA' backend";
    assert!(off_error.contains(no_kernel), "{off_error}");
    assert!(!on_error.contains(no_kernel), "the loaded backend did not register its kernels: {on_error}");
}

/// The libraries the dynamic loader loads for `binary --version` (glibc's `LD_DEBUG=libs`), or
/// `None` where the loader ignores the variable.
fn loaded_libraries(binary: &Path) -> Option<String> {
    let out = Command::new(binary).arg("--version").env("LD_DEBUG", "libs").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = text(&out.stderr);
    log.contains("libc.so").then_some(log)
}

#[test]
fn the_front_starts_without_libtorch_and_the_engine_with_it() {
    let (Some(front), Some(engine)) = (loaded_libraries(&bin()), loaded_libraries(&engine_bin())) else {
        eprintln!("SKIP: the dynamic loader ignores LD_DEBUG here");
        return;
    };
    assert!(!front.contains("libtorch") && !front.contains("libc10"), "the front loads libtorch:\n{front}");
    assert!(engine.contains("libtorch_cpu.so"), "the engine does not load libtorch:\n{engine}");
}

#[test]
fn the_front_hands_model_commands_to_the_engine() {
    // `info` runs in the engine: it reports the libtorch loaded (see above), through the front.
    let out = run(&["info", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(info["libtorch_path"].as_str().is_some_and(|p| p.contains("libtorch_cpu")), "{info}");
    // Usage errors and help come from the front, the same as the engine's.
    for args in [&["train", "--no-such-flag"][..], &["predict", "--help"][..]] {
        let front = run(args);
        let engine = Command::new(engine_bin()).arg0("cpa-stream").args(args).output().unwrap();
        assert_eq!(front.status.code(), engine.status.code(), "{args:?}");
        assert_eq!(text(&front.stdout), text(&engine.stdout), "{args:?}");
        assert_eq!(text(&front.stderr), text(&engine.stderr), "{args:?}");
    }
}

#[test]
fn a_front_without_its_engine_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let lone = dir.path().join("cpa-stream");
    std::fs::copy(bin(), &lone).unwrap();
    // The commands that need no model run.
    let mut synth = Command::new(&lone);
    synth
        .args(["synth", "--cells", "200", "--genes", "10", "--perturbations", "2", "--out"])
        .arg(dir.path().join("s.store"));
    let out = run_copied(&mut synth);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out =
        run_copied(Command::new(&lone).args(["train", "--store", "s.store", "--out", "run"]).current_dir(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cpa-stream-engine is missing") && err.contains("cargo install"), "{err}");
    assert!(!dir.path().join("run").exists());
}

/// Runs a binary this process has just written. Another test's thread may fork while the copy's
/// file is still open for writing here; until that child execs, the file is open for writing in
/// it too and the kernel refuses to run it ("Text file busy"). The child execs within
/// milliseconds, so the run is retried on that error alone.
fn run_copied(command: &mut Command) -> std::process::Output {
    for _ in 0..100 {
        match command.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            result => return result.unwrap_or_else(|e| panic!("{e}")),
        }
    }
    panic!("{command:?}: the copied binary stayed busy (open for writing) for 2 s")
}
