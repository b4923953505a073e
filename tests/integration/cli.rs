//! The command line end to end: synth, inspect, verify, convert, bench (reader, loader, train);
//! memory stays flat.

use crate::common::*;

fn json(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out.stdout)))
}

#[test]
fn synth_inspect_verify_convert_bench() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("a.store");
    let s = store.to_str().unwrap();
    let summary = json(&[
        "synth",
        "--cells",
        "3000",
        "--genes",
        "300",
        "--perturbations",
        "5",
        "--doses",
        "2",
        "--cell-types",
        "2",
        "--combinations",
        "2",
        "--seed",
        "3",
        "--truth-samples",
        "32",
        "--out",
        s,
        "--json",
    ]);
    assert_eq!(summary["manifest"]["n_obs"], 3000);
    assert_eq!(summary["report"]["stages"][0]["name"], "generate");
    assert_eq!(summary["report"]["stages"][1]["rows"], 3000);

    let inspect = json(&["inspect", s, "--json"]);
    assert_eq!(inspect["n_vars"], 300);
    let columns = inspect["obs_columns"].as_array().unwrap();
    let names: Vec<&str> = columns.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cell_id", "condition", "dose", "cell_type"]);
    let cats = columns[1]["categories"].as_array().unwrap();
    assert_eq!(cats.len(), 1 + 5 + 2, "control, singles, observed pairs");
    let total: u64 = cats.iter().map(|c| c[1].as_u64().unwrap()).sum();
    assert_eq!(total, 3000);
    let text_inspect = text(&run(&["inspect", s]).stdout);
    assert!(text_inspect.contains("shape     3000 cells x 300 genes"), "{text_inspect}");

    let verify = run(&["verify", s]);
    assert_eq!(verify.status.code(), Some(0));
    assert!(text(&verify.stdout).starts_with("ok:"));

    let z = dir.path().join("a-zstd.store");
    let conv = run(&["convert", s, "--codec", "zstd", "--out", z.to_str().unwrap()]);
    assert!(conv.status.success(), "{}", text(&conv.stderr));
    let zi = json(&["inspect", z.to_str().unwrap(), "--json"]);
    assert_eq!(zi["nnz"], inspect["nnz"]);
    assert_eq!(zi["codec"]["name"], "zstd");
    assert!(zi["total_bytes"].as_u64() < inspect["total_bytes"].as_u64());
    assert_eq!(zi["files"]["truth.parquet"], inspect["files"]["truth.parquet"]);
    assert_eq!(zi["obs_columns"], inspect["obs_columns"]);
    // Back to raw: the matrix files are byte-identical to the original.
    let back = dir.path().join("back.store");
    assert!(run(&["convert", z.to_str().unwrap(), "--out", back.to_str().unwrap()]).status.success());
    let bi = json(&["inspect", back.to_str().unwrap(), "--json"]);
    for f in ["X/indptr", "X/indices", "X/data"] {
        assert_eq!(bi["files"][f], inspect["files"][f], "{f}");
    }

    let bench = json(&["bench", "reader", s, "--repeats", "1", "--threads", "2", "--json"]);
    assert_eq!(bench["cells"], 3000);
    for key in ["memcpy_cells_per_s", "sequential_vs_memcpy", "block_shuffled_vs_memcpy", "random_vs_memcpy"] {
        assert!(bench[key].as_f64().unwrap() > 0.0, "{key}: {bench}");
    }
    // As a person reads it: a compressed store's random pass says why it is slow and what to
    // measure instead; a raw store's does not.
    for (store, explained) in [(s, false), (z.to_str().unwrap(), true)] {
        let out = run(&["bench", "reader", store, "--repeats", "1", "--threads", "2"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let said = text(&out.stdout);
        assert!(said.contains("random"), "{said}");
        assert_eq!(said.contains("decodes its whole block") && said.contains("bench loader"), explained, "{said}");
    }

    // The loader against its bounds, on the raw store and on the zstd one (whose memcpy bound
    // copies the same bytes from a plain buffer, and which has no gather bound), with single
    // cells and with runs of cells shuffled.
    for (store, runs) in [(s, "1"), (s, "16"), (z.to_str().unwrap(), "1")] {
        let args = ["bench", "loader", store, "--dose-key", "dose", "--covariates", "cell_type", "--batch-size", "256"];
        let options = ["--workers", "2", "--shuffle-run-cells", runs, "--epochs", "2", "--json"];
        let loader = json(&[&args[..], &options[..]].concat());
        assert_eq!(loader["cells"], 3000);
        // The pool: 2 workers x (prefetch 2 + 1) + 2 batches of 256 cells, at the store's mean
        // payload per cell (8 bytes a non-zero); the bounds copy into as many buffers.
        assert_eq!(loader["pool_batches"], 8, "{loader}");
        // The second epoch fills the first one's batches: no more than one pool in all.
        let allocated = loader["host_batches_allocated"].as_u64().unwrap();
        assert!((1..=8).contains(&allocated), "{loader}");
        let per_cell = (inspect["nnz"].as_u64().unwrap() * 8).div_ceil(3000);
        assert_eq!(loader["pool_bytes"].as_u64(), Some(per_cell * 256 * 8), "{loader}");
        for key in ["cells_per_s", "memcpy_cells_per_s", "vs_memcpy", "read_bound_cells_per_s", "vs_read_bound"] {
            assert!(loader[key].as_f64().unwrap() > 0.0, "{key}: {loader}");
        }
        let raw = store == s;
        for key in ["gather_bound_cells_per_s", "vs_gather_bound"] {
            assert_eq!(loader[key].as_f64().is_some_and(|v| v > 0.0), raw, "{key}: {loader}");
        }
        // Two epochs, each a round with its own bounds; the overall ratio is the ratio of the
        // rounds' summed times, so it lies between theirs.
        assert_eq!(loader["report"]["stages"][2]["rows"], 6000, "{loader}");
        let rounds = loader["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 2, "{loader}");
        let ratios: Vec<f64> = rounds.iter().map(|r| r["vs_memcpy"].as_f64().unwrap()).collect();
        let (low, high) = (ratios[0].min(ratios[1]), ratios[0].max(ratios[1]));
        let overall = loader["vs_memcpy"].as_f64().unwrap();
        assert!(overall >= low * 0.999 && overall <= high * 1.001, "{overall} not within {ratios:?}");
        assert!(rounds.iter().all(|r| r["vs_gather_bound"].as_f64().is_some() == raw), "{loader}");
    }
    let zero =
        run(&["bench", "loader", s, "--dose-key", "dose", "--covariates", "cell_type", "--shuffle-run-cells", "0"]);
    assert_eq!(zero.status.code(), Some(2), "{}", text(&zero.stderr));
    assert!(text(&zero.stderr).contains("--shuffle-run-cells"), "{}", text(&zero.stderr));

    // Training through the pipeline against preloaded batches: two rounds of two passes, each
    // pass the epoch's 12 batches; the preloaded batches are the first ones that fit in 1 MiB.
    let args = ["bench", "train", s, "--dose-key", "dose", "--covariates", "cell_type", "--batch-size", "256"];
    let train = json(&[&args[..], &["--epochs", "2", "--preload-mib", "1", "--json"]].concat());
    assert_eq!((train["cells"].as_u64(), train["batch_size"].as_u64()), (Some(3000), Some(256)), "{train}");
    let preloaded = train["preloaded_batches"].as_u64().unwrap();
    assert!((1..12).contains(&preloaded), "{train}");
    assert_eq!(train["preloaded_cells"].as_u64(), Some(preloaded * 256), "{train}");
    let trainer = &train["report"]["stages"][3];
    assert_eq!((trainer["name"].as_str(), trainer["rows"].as_u64()), (Some("trainer"), Some(6000)), "{train}");
    let rounds = train["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{train}");
    assert!(rounds.iter().all(|r| r["batches"] == 12), "{train}");
    let ratios: Vec<f64> = rounds.iter().map(|r| r["ratio"].as_f64().unwrap()).collect();
    let overall = train["ratio"].as_f64().unwrap();
    let (low, high) = (ratios[0].min(ratios[1]), ratios[0].max(ratios[1]));
    assert!(overall >= low * 0.999 && overall <= high * 1.001, "{overall} not within {ratios:?}");
    assert!(train["device_memory"].is_null(), "{train}");
    let bad = run(&[&args[..], &["--precision", "fp16"]].concat());
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad.stderr));
    assert!(text(&bad.stderr).contains("--precision \"fp16\": expected fp32 or bf16"), "{}", text(&bad.stderr));

    let again = run(&["synth", "--cells", "10", "--genes", "5", "--perturbations", "1", "--out", s]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("already exists"), "{}", text(&again.stderr));
}

#[test]
fn bad_arguments_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("x.store");
    let out = run(&[
        "synth",
        "--cells",
        "10",
        "--genes",
        "5",
        "--perturbations",
        "2",
        "--combinations",
        "3",
        "--out",
        s.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("pairs of perturbations"), "{}", text(&out.stderr));
    assert!(!s.exists());
    let out = run(&["inspect", dir.path().join("none.store").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("none.store/manifest.json"));
}

/// `bench model --profile` reports where a step's time went; `--trace` writes a Chrome trace as a
/// new file or over a file, never over a directory or a link (refused before any work, left as
/// they were), and leaves no temporary beside it.
#[test]
fn bench_model_profiles_and_its_trace_replaces_only_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = ["bench", "model", "--cells", "600", "--genes", "100", "--batch-size", "512", "--epochs", "1"];
    let trace = dir.path().join("trace.json");
    std::fs::write(&trace, "old").unwrap();
    let r = json(&[&model[..], &["--trace", trace.to_str().unwrap(), "--json"]].concat());
    let p = &r["profile"];
    assert_eq!(p["units"], 2, "{p}");
    assert!(p["host_ms"].as_f64().unwrap() > 0.0 && p["host_ms"].as_f64() <= p["wall_ms"].as_f64(), "{p}");
    let names: Vec<&str> = p["host_top"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(names.contains(&"aten::addmm") || names.contains(&"aten::mm"), "{names:?}");
    assert!(p["device"].is_null(), "no device side on the CPU: {p}");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    assert!(saved["traceEvents"].as_array().is_some_and(|e| !e.is_empty()));
    let taken = dir.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("keep"), "mine").unwrap();
    let out = run(&[&model[..], &["--trace", taken.to_str().unwrap()]].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is a directory"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(taken.join("keep")).unwrap(), "mine");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}

/// Peak anonymous memory of `synth`, `convert`, `export` and `import` does not grow with the
/// number of cells.
#[test]
fn pipelines_memory_is_flat_in_cells() {
    let dir = tempfile::tempdir().unwrap();
    let peaks = |cells: &str| -> (u64, u64, u64, u64) {
        let out = dir.path().join(format!("{cells}.store"));
        let out = out.to_str().unwrap();
        let synth = [
            "synth",
            "--cells",
            cells,
            "--genes",
            "1000",
            "--perturbations",
            "6",
            "--doses",
            "2",
            "--cell-types",
            "2",
            "--combinations",
            "3",
            "--truth-samples",
            "16",
            "--threads",
            "2",
            "--out",
            out,
            "--json",
        ];
        let summary = json(&synth);
        // Each output goes once measured: at 160k cells a store or an .h5ad is about 0.5 GB, and
        // a test machine's disk is shared.
        let zstd = format!("{out}.zstd");
        let converted = json(&["convert", out, "--codec", "zstd", "--out", &zstd, "--json"]);
        std::fs::remove_dir_all(&zstd).unwrap();
        let h5ad = format!("{out}.h5ad");
        let exported = json(&["export", out, "--out", &h5ad, "--json"]);
        std::fs::remove_dir_all(out).unwrap();
        let back = format!("{out}.back");
        let imported = json(&["import", &h5ad, "--out", &back, "--json"]);
        std::fs::remove_file(&h5ad).unwrap();
        std::fs::remove_dir_all(&back).unwrap();
        let peak = |v: &serde_json::Value| v["memory"]["rss_anon"].as_u64().unwrap();
        (peak(&summary["report"]), peak(&converted["report"]), peak(&exported["report"]), peak(&imported["report"]))
    };
    let small = peaks("16000");
    let large = peaks("160000");
    eprintln!("peak RssAnon (synth, convert, export, import): 16k cells {small:?} B, 160k cells {large:?} B");
    // The 16k-cell run has not yet filled the reader's and writer's buffer pools: synth's peak
    // rises about 15 MiB by 160k cells and then stays (46 MiB at 480k, measured), which the
    // front's small baseline (no libtorch: about 25 MiB) no longer hides in its quarter. 24 MiB
    // over the quarter still catches 170 bytes a cell between the two sizes.
    let flat = |a: u64, b: u64| b < a + a / 4 + (24 << 20);
    assert!(flat(small.0, large.0), "synth peak RssAnon grew from {} to {} bytes", small.0, large.0);
    assert!(flat(small.1, large.1), "convert peak RssAnon grew from {} to {} bytes", small.1, large.1);
    assert!(flat(small.2, large.2), "export peak RssAnon grew from {} to {} bytes", small.2, large.2);
    assert!(flat(small.3, large.3), "import peak RssAnon grew from {} to {} bytes", small.3, large.3);
}

/// A closed stdout (`cpa-stream inspect S | head -1`) ends the output quietly, without a panic.
#[test]
fn closed_stdout_is_not_a_crash() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let store = small_store(dir.path(), "s.store", cpa_stream::unstable::schemas::Codec::Raw);
    let mut child = Command::new(bin())
        .args(["inspect", store.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the program has written (it first loads libtorch).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{stderr}");
}

/// The conventions every command follows: `--help` ends in an example, `--version` names the
/// commit and the libtorch linked, completions for every shell clap knows, usage errors exit 2,
/// a log filter that does not parse is an error, and docs/cli-reference.md is exactly what the
/// parser prints (regenerate it with `cpa-stream markdown-help > docs/cli-reference.md`).
#[test]
fn help_version_completions_exit_codes_and_the_generated_reference() {
    let commands: [&[&str]; 15] = [
        &["info"],
        &["synth"],
        &["inspect"],
        &["verify"],
        &["convert"],
        &["import"],
        &["export"],
        &["train"],
        &["predict"],
        &["evaluate"],
        &["bench", "reader"],
        &["bench", "model"],
        &["bench", "loader"],
        &["bench", "train"],
        &["completions"],
    ];
    for command in commands {
        let out = run(&[command, &["--help"]].concat());
        assert!(out.status.success(), "{command:?}");
        let help = text(&out.stdout);
        assert!(help.contains("Example") && help.contains(&format!("cpa-stream {}", command.join(" "))), "{help}");
    }
    let version = text(&run(&["--version"]).stdout);
    assert!(version.contains("(git ") && version.contains("\nlibtorch 2.11.0"), "{version}");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success() && text(&out.stdout).contains("cpa-stream"), "{shell}");
    }
    assert_eq!(run(&["train", "--no-such-flag"]).status.code(), Some(2));
    assert_eq!(run(&["completions", "tcsh"]).status.code(), Some(2));
    let bad_log = std::process::Command::new(bin())
        .arg("info")
        .env("CPA_STREAM_LOG", "verbose")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bad_log.status.code(), Some(2));
    assert!(text(&bad_log.stderr).contains(r#""verbose" is not a log level"#), "{}", text(&bad_log.stderr));
    let generated = text(&run(&["markdown-help"]).stdout);
    let committed = std::fs::read_to_string(repo_root().join("docs/cli-reference.md")).unwrap_or_default();
    assert!(
        generated == committed,
        "docs/cli-reference.md differs from the parser's help: run `cpa-stream markdown-help > docs/cli-reference.md`"
    );
}

/// Results first: by default a command prints what it wrote and one line of time and memory;
/// `--verbose` adds the stage table, `--quiet` prints nothing (errors only), `--json` prints
/// the full report even with `--quiet`.
#[test]
fn results_first_with_the_stage_table_behind_verbose() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = dir.path().join("s.store");
    let synth = |extra: &[&str]| {
        let s = store.to_str().unwrap_or_default();
        let args = [
            &["synth", "--cells", "500", "--genes", "30", "--perturbations", "3", "--out", s, "--overwrite"][..],
            extra,
        ];
        let o = std::process::Command::new(bin())
            .args(args.concat())
            .env_remove("CPA_STREAM_LOG")
            .env_remove("RUST_LOG")
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(o.status.success(), "{}", text(&o.stderr));
        (text(&o.stdout), text(&o.stderr))
    };
    let (out, err) = synth(&[]);
    assert!(out.contains("done in ") && !out.contains("busy%"), "{out}");
    assert!(!err.contains(": 0/"), "a start line for a moment's work: {err}");
    let (out, _) = synth(&["--verbose"]);
    assert!(out.contains("busy%") && out.contains("bottleneck"), "{out}");
    let (out, err) = synth(&["--quiet"]);
    assert!(out.is_empty() && err.is_empty(), "--quiet printed: {out}{err}");
    let (out, _) = synth(&["--quiet", "--json"]);
    assert!(out.trim_start().starts_with('{'), "{out}");
}
