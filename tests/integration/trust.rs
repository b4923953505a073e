//! No silent wrong or empty result: each mistake a user makes ends in an error that names it
//! (and what they probably meant), never in exit 0 with a wrong or empty output.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use cpa_stream::unstable::schemas::Codec;

use crate::common::{bin, run, small_store, text};
use crate::predict::fixture;

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Runs the binary with stdout and/or stderr writing into a pipe nobody reads (closed before
/// the start, so that every write fails with a broken pipe).
fn run_closed(args: &[&str], close_stdout: bool, close_stderr: bool) -> std::process::ExitStatus {
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap_or_else(|e| panic!("{e}"));
        drop(reader);
        Stdio::from(writer)
    };
    let mut command = Command::new(bin());
    command.args(args).env("CPA_STREAM_LOG", "info").stdin(Stdio::null());
    command.stdout(if close_stdout { closed() } else { Stdio::null() });
    command.stderr(if close_stderr { closed() } else { Stdio::null() });
    command.status().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn closed_output_streams_end_the_process_quietly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = small_store(dir.path(), "s.store", Codec::Raw);
    // An error with nowhere to report it: the failure's exit code, not a panic (101).
    let status = run_closed(&["inspect", s(&dir.path().join("missing.store"))], false, true);
    assert_eq!(status.code(), Some(1), "{status}");
    // Output and logs into closed pipes: the work is done and succeeds.
    assert_eq!(run_closed(&["inspect", s(&store)], true, true).code(), Some(0));
    let out = dir.path().join("synth.store");
    let args = ["synth", "--cells", "200", "--genes", "20", "--perturbations", "2", "--out", s(&out)];
    assert_eq!(run_closed(&args, true, true).code(), Some(0));
    assert!(out.join("manifest.json").exists());
}

/// fuzz/known's damaged .h5ad makes the HDF5 library loop forever (h5py and anndata too): the
/// CLI's watchdog ends the import with an error naming the file and what was being read.
#[test]
fn an_hdf5_call_that_never_returns_ends_the_import_with_an_error() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let file = crate::common::repo_root().join("fuzz/known/h5ad-hdf5-global-heap-hang.h5ad");
    let out = dir.path().join("hang.store");
    let started = std::time::Instant::now();
    let mut child = Command::new(bin())
        .args(["import", s(&file), "--out", s(&out)])
        .env("CPA_STREAM_HDF5_TIMEOUT", "2")
        .env("CPA_STREAM_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    // Without the watchdog the import would never end: give up (and fail) after two minutes
    // rather than hang the test suite. Not a timing assertion of the watchdog itself.
    let status = loop {
        if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the import of a damaged .h5ad still runs after 120 s: the HDF5 watchdog did not end it");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read as _;
        e.read_to_string(&mut err).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("h5ad-hdf5-global-heap-hang.h5ad: /: reading attribute encoding-type"), "{err}");
    assert!(err.contains("has not returned after 2 s of CPU time"), "{err}");
    assert!(!out.exists(), "a store was published");
}

#[test]
fn a_control_missing_from_the_perturbation_column_is_an_error_listing_its_values() {
    let f = fixture();
    let out = f.dir.join("run-no-control");
    let o = run(&["train", "--store", s(&f.store), "--control", "Control ", "--epochs", "1", "--out", s(&out)]);
    let err = text(&o.stderr);
    assert!(!o.status.success(), "trained without its control");
    assert!(err.contains(r#"control "Control " does not occur in obs column "condition""#), "{err}");
    assert!(err.contains(r#"closest first: "control""#), "{err}");
    assert!(!out.join("model").exists());
}

#[test]
fn a_source_that_selects_no_cell_is_an_error_unless_allowed() {
    let f = fixture();
    let out = f.dir.join("empty.parquet");
    let o = crate::predict::predict(&["--source", "cell_type == ct01", "--out", s(&out)]);
    let err = text(&o.stderr);
    assert!(!o.status.success(), "an empty selection succeeded");
    assert!(err.contains(r#"obs column "cell_type" has no value "ct01" (closest first: "CT01""#), "{err}");
    assert!(!out.exists(), "an empty file was published");
    // Both values occur, but no cell has both.
    let o = crate::predict::predict(&["--source", "cell_type == CT01 and cell_type == CT02", "--out", s(&out)]);
    assert!(text(&o.stderr).contains("no cell meets the whole expression"), "{}", text(&o.stderr));
    // Asked for: a warning and an empty file with the full schema.
    let o = crate::predict::predict(&["--source", "cell_type == ct01", "--allow-empty", "--out", s(&out)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("selects no cell"), "no warning: {}", text(&o.stderr));
    let table = cpa_stream::unstable::stages::store::read_small_table(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(table.num_rows(), 0);
    assert!(table.column_by_name("mean").is_some());
}

/// A panic in any thread of a command that publishes a file (injected with CPA_STREAM_FAULT)
/// ends it with exit 1 and an error naming the stage, and publishes nothing: no truncated
/// Parquet that looks complete.
#[test]
fn a_panicking_stage_is_an_error_naming_it_and_publishes_nothing() {
    let f = fixture();
    let fault = |stage: &str, args: &[&str]| {
        let o = Command::new(bin())
            .args(args)
            .env("CPA_STREAM_FAULT", stage)
            .env("CPA_STREAM_LOG", "warn")
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        (o.status.code(), text(&o.stderr))
    };
    for stage in ["source", "batcher", "predictor"] {
        let out = f.dir.join(format!("fault-{stage}.parquet"));
        let args = ["predict", "--model", s(&f.run), "--store", s(&f.store), "--out", s(&out)];
        let (code, err) = fault(stage, &args);
        assert_eq!(code, Some(1), "{stage}: {err}");
        assert!(err.contains(&format!("{stage}: a worker thread panicked: fault injected into {stage}")), "{err}");
        assert!(!out.exists(), "{stage}: a file was published");
        let leftovers: Vec<_> = std::fs::read_dir(&f.dir)
            .unwrap_or_else(|e| panic!("{e}"))
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(&format!("fault-{stage}")))
            .collect();
        assert!(leftovers.is_empty(), "{stage}: temporaries left: {leftovers:?}");
    }
    let h5ad = f.dir.join("fault.h5ad");
    let (code, err) = fault("none", &["export", s(&f.store), "--out", s(&h5ad)]);
    assert_eq!(code, Some(0), "{err}");
    let store = f.dir.join("fault-import.store");
    let (code, err) = fault("read", &["import", s(&h5ad), "--out", s(&store)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("read: a worker thread panicked: fault injected into read"), "{err}");
    assert!(!store.exists(), "a store was published");
}

#[test]
fn a_diverging_run_or_zero_epochs_leaves_no_model() {
    let f = fixture();
    let config = f.dir.join("diverge.toml");
    let toml = std::fs::read_to_string(crate::common::repo_root().join("examples/cpa-small.toml"))
        .unwrap_or_else(|e| panic!("{e}"))
        .replace("lr = 0.002", "lr = 1e30")
        .replace("adv_lr = 0.003", "adv_lr = 1e30");
    std::fs::write(&config, toml).unwrap_or_else(|e| panic!("{e}"));
    let out = f.dir.join("run-diverged");
    let args = ["--dose-key", "dose", "--covariates", "cell_type", "--threads", "1", "--out", s(&out)];
    let mut all = vec!["train", "--store", s(&f.store), "--config", s(&config), "--epochs", "3"];
    all.extend(args);
    let o = run(&all);
    let err = text(&o.stderr);
    assert!(!o.status.success(), "a diverged run succeeded: {err}");
    assert!(err.contains("a training loss is not finite") && err.contains("epoch 0, batch"), "{err}");
    for dir in ["model", "best", "checkpoint"] {
        assert!(!out.join(dir).exists(), "{dir}/ written by a diverged run");
    }
    let out = f.dir.join("run-zero");
    let o = run(&["train", "--store", s(&f.store), "--epochs", "0", "--out", s(&out)]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--epochs 0 trains nothing"), "{}", text(&o.stderr));
    assert!(!out.join("model").exists());
}

#[test]
fn every_command_refuses_an_existing_output_unless_asked() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // predict: an existing file is kept; --overwrite replaces it; never a device, link or `-`.
    let out = dir.path().join("p.parquet");
    std::fs::write(&out, b"mine").unwrap_or_else(|e| panic!("{e}"));
    let o = crate::predict::predict(&["--out", s(&out)]);
    assert!(!o.status.success() && text(&o.stderr).contains("already exists"), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&out).unwrap_or_default(), b"mine");
    let o = crate::predict::predict(&["--out", s(&out), "--overwrite"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let link = dir.path().join("null");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap_or_else(|e| panic!("{e}"));
    for target in [link.to_str().unwrap_or_default(), "/dev/null", "-"] {
        let o = crate::predict::predict(&["--out", target, "--overwrite"]);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{target}: {err}");
        assert!(err.contains("never replaced") || err.contains("standard output"), "{target}: {err}");
    }
    assert!(std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()));
    // evaluate: an existing evaluation is replaced whole with --overwrite (no stale plots).
    let eval = dir.path().join("eval");
    let args = |extra: &[&'static str]| {
        let mut a = vec!["evaluate", "--model", s(&f.run), "--store", s(&f.store), "--out", s(&eval)];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let go = |a: Vec<String>| run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(go(args(&[])).status.success());
    assert!(eval.join("plots").is_dir());
    let o = go(args(&["--no-plots"]));
    assert!(!o.status.success() && text(&o.stderr).contains("already exists"), "{}", text(&o.stderr));
    let o = go(args(&["--no-plots", "--overwrite"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!eval.join("plots").exists(), "old plots beside new metrics");
    std::fs::write(eval.join("notes.txt"), b"mine").unwrap_or_else(|e| panic!("{e}"));
    let o = go(args(&["--overwrite"]));
    assert!(
        text(&o.stderr).contains("holds files that are not an evaluation's (\"notes.txt\")"),
        "{}",
        text(&o.stderr)
    );
    assert!(eval.join("notes.txt").exists());
    // train: a finished run is kept unless resumed or replaced.
    let o = run(&["train", "--store", s(&f.store), "--epochs", "1", "--out", s(&f.run)]);
    let err = text(&o.stderr);
    assert!(!o.status.success() && err.contains("already holds a training run with a finished model/"), "{err}");
    assert!(err.contains("--resume continues it, --overwrite replaces it"), "{err}");
}

#[test]
fn sizes_from_flags_and_configurations_are_bounded() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = small_store(dir.path(), "s.store", Codec::Raw);
    let out = dir.path().join("run");
    for (flag, value, what) in [
        ("--threads", "0", "threads, a whole number from 1 to 1024"),
        ("--workers", "100000", "gather workers, a whole number from 1 to 256"),
        ("--prefetch", "1000000000", "batches in flight"),
    ] {
        let o = run(&["train", "--store", s(&store), flag, value, "--out", s(&out)]);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}");
        assert!(text(&o.stderr).contains(what), "{flag}: {}", text(&o.stderr));
    }
    let o = run(&["predict", "--model", s(&out), "--store", s(&store), "--batch-size", "1000000000000", "--out", "x"]);
    assert!(text(&o.stderr).contains("cells per batch, a whole number from 1 to 1048576"), "{}", text(&o.stderr));
    let config = dir.path().join("huge.toml");
    std::fs::write(&config, "[model]\nn_hidden_encoder = 100000000\n").unwrap_or_else(|e| panic!("{e}"));
    let o = run(&["train", "--store", s(&store), "--config", s(&config), "--out", s(&out)]);
    let err = text(&o.stderr);
    assert!(err.contains("model.n_hidden_encoder is 100000000, expected a whole number from 1 to 65536"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_count_likelihood_on_a_normalised_layer_is_an_error_unless_allowed() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = dir.path().join("lognorm.store");
    let data = crate::common::bundled_data();
    let o = run(&["import", s(&data), "--layer", "lognorm", "--out", s(&store)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = dir.path().join("run");
    let train = |extra: &[&str]| {
        let mut a = vec!["train", "--store", s(&store), "--dose-key", "dose", "--epochs", "1", "--threads", "1"];
        a.extend_from_slice(&["--out", s(&out)]);
        a.extend_from_slice(extra);
        run(&a)
    };
    let o = train(&[]);
    let err = text(&o.stderr);
    assert!(!o.status.success(), "nb trained on log-normalised values");
    assert!(err.contains("models counts, but cell 0 holds") && err.contains("--allow-non-counts"), "{err}");
    assert!(!out.exists(), "a run directory was left");
    let o = train(&["--allow-non-counts", "--validation-fraction", "0", "--test-fraction", "0"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("training anyway"), "{}", text(&o.stderr));
}

#[test]
fn a_store_truncated_while_mapped_ends_the_run_with_an_explanation() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = dir.path().join("s.store");
    // On a busy machine the reader may not have mapped the file yet when it is cut: it then
    // fails its size check (a clean error, not what is tested here), so the store is rebuilt and
    // the cut comes later.
    for wait_ms in [1500u64, 5000, 15000] {
        let _ = std::fs::remove_dir_all(&store);
        let o = run(&["synth", "--cells", "20000", "--genes", "500", "--perturbations", "3", "--out", s(&store)]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let mut child = Command::new(bin())
            .args(["bench", "reader", s(&store), "--repeats", "1000000"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(std::time::Duration::from_millis(wait_ms));
        let data = std::fs::OpenOptions::new().write(true).open(store.join("X/data")).unwrap_or_else(|e| panic!("{e}"));
        data.set_len(0).unwrap_or_else(|e| panic!("{e}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("the reader did not stop after its store was truncated");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap_or_else(|| panic!("no stderr")), &mut err)
            .unwrap_or_else(|e| panic!("{e}"));
        if status.code() == Some(1) && err.contains("file size in bytes is 0") {
            eprintln!("the reader had not mapped the store after {wait_ms} ms; again with a later cut");
            continue;
        }
        assert_eq!(status.signal(), Some(libc_sigbus()), "{status}: {err}");
        assert!(err.contains("the file became shorter while this process read it"), "{err}");
        return;
    }
    panic!("the reader never mapped the store before it was cut");
}

/// SIGBUS on Linux.
fn libc_sigbus() -> i32 {
    7
}

/// Weights that are not the model's are refused at load, naming the tensor: a shape that
/// libtorch would broadcast into place, NaN, another element type, a missing or extra tensor;
/// and a weights file that is not the one model.json was written with.
#[test]
fn weights_that_do_not_fit_the_model_are_refused_at_load() {
    use tch::{Kind, Tensor};

    let f = fixture();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let original = f.run.join("model");
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let tensors = Tensor::read_safetensors(original.join("weights.safetensors")).unwrap_or_else(|e| panic!("{e}"));
    let (name, shape) = tensors
        .iter()
        .find(|(_, t)| t.size().len() == 1 && t.size()[0] > 1)
        .map(|(n, t)| (n.clone(), t.size()))
        .unwrap_or_else(|| panic!("no 1-D tensor among the weights"));
    let model_json: Value = serde_json::from_slice(&read(&original.join("model.json"))).unwrap_or_default();
    assert!(model_json["weights_checksum"].as_str().is_some_and(|c| c.starts_with("xxh3-64:")), "{model_json}");
    // A model directory whose weights are `edit`ed, with or without the recorded checksum.
    type Weights = Vec<(String, Tensor)>;
    let crafted = |label: &str, keep_checksum: bool, edit: &dyn Fn(&mut Weights)| -> PathBuf {
        let model = dir.path().join(label);
        std::fs::create_dir_all(&model).unwrap_or_else(|e| panic!("{e}"));
        let mut json = model_json.clone();
        if !keep_checksum && let Some(o) = json.as_object_mut() {
            o.remove("weights_checksum");
        }
        std::fs::write(model.join("model.json"), json.to_string()).unwrap_or_else(|e| panic!("{e}"));
        let mut weights: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        edit(&mut weights);
        let refs: Vec<(&str, &Tensor)> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, model.join("weights.safetensors")).unwrap_or_else(|e| panic!("{e}"));
        model
    };
    let replace = |with: Tensor| {
        let name = name.clone();
        move |w: &mut Vec<(String, Tensor)>| {
            for (n, t) in w.iter_mut() {
                if *n == name {
                    *t = with.copy();
                }
            }
        }
    };
    let predict_with = |model: &Path| {
        let out = model.join("p.parquet");
        let o = run(&["predict", "--model", s(model), "--store", s(&f.store), "--target", "PERT01", "--out", s(&out)]);
        assert_eq!(out.exists(), o.status.success(), "{}", text(&o.stderr));
        (o.status.code(), text(&o.stderr))
    };
    let nan = Tensor::full(shape.as_slice(), f64::NAN, (Kind::Float, tch::Device::Cpu));
    let cases: Vec<(&str, PathBuf, String)> = vec![
        (
            "broadcast",
            crafted("broadcast", false, &replace(Tensor::ones([1], (Kind::Float, tch::Device::Cpu)))),
            format!("tensor {name} has shape [1], the model needs {shape:?}"),
        ),
        ("nan", crafted("nan", false, &replace(nan)), format!("tensor {name} holds NaN or infinite values")),
        (
            "double",
            crafted("double", false, &replace(Tensor::ones(shape.as_slice(), (Kind::Double, tch::Device::Cpu)))),
            format!("tensor {name} holds Double values, the model needs Float"),
        ),
        (
            "missing",
            crafted("missing", false, &|w: &mut Vec<(String, Tensor)>| w.retain(|(n, _)| *n != name)),
            format!("no tensor {name}, which the model of model.json needs"),
        ),
        (
            "extra",
            crafted("extra", false, &|w: &mut Vec<(String, Tensor)>| {
                w.push(("stowaway".to_owned(), Tensor::zeros([3], (Kind::Float, tch::Device::Cpu))));
            }),
            "tensors the model of model.json does not have: stowaway".to_owned(),
        ),
        (
            "tampered",
            crafted("tampered", true, &replace(Tensor::ones(shape.as_slice(), (Kind::Float, tch::Device::Cpu)))),
            "model.json records the weights it was written with".to_owned(),
        ),
    ];
    for (label, model, expected) in cases {
        let (code, err) = predict_with(&model);
        assert_eq!(code, Some(1), "{label}: {err}");
        assert!(err.contains(&expected) && err.contains("weights.safetensors"), "{label}: {err}");
    }
    // The model itself, copied, loads.
    let copy = crafted("copy", true, &|_| {});
    let (code, err) = predict_with(&copy);
    assert_eq!(code, Some(0), "{err}");
}
