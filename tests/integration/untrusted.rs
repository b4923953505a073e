//! Untrusted `.h5ad` files (issue 47's attack round): importing one reads nothing but that file,
//! never blocks, never allocates what the file cannot hold, never loads a plugin; files of other
//! valid writers import as anndata reads them. The files come from
//! `tests/fixtures/untrusted_h5ad.py` (anndata's writer, edited with h5py).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{bin, python, repo_root, text};

/// What the attack files point at; must never appear in any output.
const SECRET: &str = "TOP-SECRET-LINE";

struct Fixtures {
    /// The .h5ad files (and the FIFO `pipe`).
    dir: PathBuf,
    /// A folder elsewhere holding the secrets.
    outside: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_those_of_ended_runs(tmp);
        let root = tmp.join(format!("untrusted-{}", std::process::id()));
        let (dir, outside) = (root.join("files"), root.join("outside"));
        let script = repo_root().join("tests/fixtures/untrusted_h5ad.py");
        let out = Command::new(python()).arg(&script).arg("make").arg(&dir).arg(&outside).output();
        let out = out.unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        assert!(out.status.success(), "fixture script failed: {}", text(&out.stderr));
        Fixtures { dir, outside }
    })
}

/// Removes the fixtures earlier runs of this suite left in `tmp` (`untrusted-<pid>`, each run its
/// own, used until the run ends): those whose process no longer runs. A run still going (two
/// suites at once) keeps its own.
fn remove_those_of_ended_runs(tmp: &Path) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("untrusted-")).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !proc.join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Runs the binary, ending it (and failing) if it has not finished after two minutes: a file
/// that makes the import block must fail the test, not hang the suite. Not a timing assertion.
fn run_bounded(args: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> Output {
    let mut command = Command::new(bin());
    command.args(args).env("CPA_STREAM_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command.envs(env.iter().copied());
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let mut child = command.spawn().unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap_or_else(|e| panic!("{e}")).is_some() {
            return child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("cpa-stream {} still runs after 120 s: it blocked", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn import(file: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["import", s(file), "--out", s(out)];
    args.extend_from_slice(extra);
    run_bounded(&args, &[], None)
}

#[test]
fn files_that_read_from_elsewhere_block_or_exhaust_memory_are_refused_naming_the_object() {
    let f = fixtures();
    let out_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // (file, object named, what is said of it)
    let cases = [
        ("external_x.h5ad", "/X/data", "external storage"),
        ("external_x_relative.h5ad", "/X/data", "external storage"),
        ("external_obs_index.h5ad", "/obs/_index", "external storage"),
        ("external_categories.h5ad", "/obs/condition/categories", "external storage"),
        ("external_link.h5ad", "/obs/_index", "an external link"),
        ("vds_missing_source.h5ad", "/X/data", "a virtual dataset"),
        ("vds_outside.h5ad", "/X/data", "a virtual dataset"),
        ("external_fifo.h5ad", "/X/data", "external storage"),
        ("external_link_fifo.h5ad", "/obs/_index", "an external link"),
        ("huge_declared_1e12.h5ad", "/X/data", "declares 1000000000000 elements"),
        ("huge_declared_3e9.h5ad", "/X/data", "declares 3000000000 elements"),
        ("row_longer_than_genes.h5ad", "X/indptr: row 0", "more than the matrix's 12 columns"),
        ("filter_32008.h5ad", "/X/data", "HDF5 filter 32008 (bitshuffle)"),
    ];
    for (name, object, kind) in cases {
        let file = f.dir.join(name);
        let out = out_dir.path().join(format!("{name}.store"));
        // From the secrets' folder, so that a name relative to the working directory finds one.
        let o = run_bounded(&["import", s(&file), "--out", s(&out)], &[], Some(&f.outside));
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(name) && err.contains(object) && err.contains(kind), "{name}: {err}");
        assert!(!err.contains(SECRET) && !text(&o.stdout).contains(SECRET), "{name}: a secret was read: {err}");
        assert!(!out.exists(), "{name}: a store was published");
    }
    // The library refuses the same (the Python import and the fuzz target call it).
    let options = cpa_stream::import::ImportOptions {
        inputs: vec![f.dir.join("external_x.h5ad")],
        out: out_dir.path().join("lib.store"),
        ..Default::default()
    };
    let err = cpa_stream::import::run(&options, &cpa_stream::RunContext::default()).unwrap_err().to_string();
    assert!(err.contains("/X/data: external storage") && err.contains("--allow-external"), "{err}");
}

#[test]
fn a_trusted_collection_reads_external_data_from_its_own_folder_only() {
    let f = fixtures();
    let out_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let plain = out_dir.path().join("plain.store");
    assert!(import(&f.dir.join("plain.h5ad"), &plain, &[]).status.success());
    let local = f.dir.join("external_local.h5ad");
    // Refused without the flag.
    let o = import(&local, &out_dir.path().join("refused.store"), &[]);
    assert!(text(&o.stderr).contains("/X/data: external storage"), "{}", text(&o.stderr));
    // With it: HDF5 resolves a relative name against the working directory, or the folder of
    // the file with HDF5_EXTFILE_PREFIX=${ORIGIN}; either way the values are the same.
    let from_folder = out_dir.path().join("from-folder.store");
    let o = run_bounded(&["import", s(&local), "--out", s(&from_folder), "--allow-external"], &[], Some(&f.dir));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let with_origin = out_dir.path().join("origin.store");
    let o = run_bounded(
        &["import", s(&local), "--out", s(&with_origin), "--allow-external"],
        &[("HDF5_EXTFILE_PREFIX", "${ORIGIN}")],
        Some(&f.outside),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    for store in [&from_folder, &with_origin] {
        for file in ["X/data", "X/indices", "X/indptr"] {
            let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(read(store.join(file)) == read(plain.join(file)), "{}: {file} differs", store.display());
        }
    }
    // From elsewhere without the prefix, the relative name would be read from the working
    // directory: refused, and said why.
    let o = run_bounded(
        &["import", s(&local), "--out", s(&out_dir.path().join("cwd.store")), "--allow-external"],
        &[],
        Some(&f.outside),
    );
    let err = text(&o.stderr);
    assert!(err.contains("local_values.bin") && err.contains("only regular files in"), "{err}");
    // Outside the folder, a FIFO, an external link or VDS leading out: refused even when trusted.
    for (name, said) in [
        ("external_x.h5ad", "outside the file's folder"),
        ("external_fifo.h5ad", "not a regular file"),
        ("external_link.h5ad", "outside the file's folder"),
        ("vds_outside.h5ad", "outside the file's folder"),
        ("vds_missing_source.h5ad", "names no file that exists"),
    ] {
        let out = out_dir.path().join(format!("trusted-{name}.store"));
        let o = import(&f.dir.join(name), &out, &["--allow-external"]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(said) && !err.contains(SECRET), "{name}: {err}");
        assert!(!out.exists());
    }
}

/// An HDF5 filter plugin that leaves a mark when a process loads it.
fn marking_plugin(dir: &Path, mark: &Path) -> Option<()> {
    let source = dir.join("mark.c");
    let code = format!(
        "#include <stdio.h>\n__attribute__((constructor)) static void mark(void) {{ FILE *f = fopen(\"{}\", \"w\"); if (f) fclose(f); }}\nint H5PLget_plugin_type(void) {{ return 0; }}\nconst void *H5PLget_plugin_info(void) {{ return 0; }}\n",
        mark.display()
    );
    std::fs::write(&source, code).ok()?;
    let built =
        Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(dir.join("libmark.so")).arg(&source).status().ok()?;
    built.success().then_some(())
}

#[test]
fn a_filter_that_is_not_built_in_is_named_and_no_plugin_is_loaded() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mark = dir.path().join("plugin-was-loaded");
    if marking_plugin(dir.path(), &mark).is_none() {
        eprintln!("skipped: no C compiler (cc) to build a plugin that marks its loading");
        return;
    }
    let out = dir.path().join("filtered.store");
    let plugins = s(dir.path()).to_owned();
    let o = run_bounded(
        &["import", s(&f.dir.join("filter_32008.h5ad")), "--out", s(&out)],
        &[("HDF5_PLUGIN_PATH", plugins.as_str())],
        None,
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("/X/data: compressed with HDF5 filter 32008 (bitshuffle)"), "{err}");
    assert!(!err.contains("can't open directory"), "the message speaks of the build directory's plugins: {err}");
    assert!(!mark.exists(), "a plugin was loaded (dlopen) for an untrusted file");
}

/// What anndata reads of `file` (tests/fixtures/untrusted_h5ad.py summarize).
fn anndata_reads(file: &Path) -> Value {
    let script = repo_root().join("tests/fixtures/untrusted_h5ad.py");
    let out = Command::new(python()).arg(script).arg("summarize").arg(file).output();
    let out = out.unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "summarize {}: {}", file.display(), text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn files_of_other_valid_writers_import_and_export_as_anndata_reads_them() {
    use cpa_stream::unstable::schemas::tables::{categories_of, is_ordered};
    use cpa_stream::unstable::stages::store::Store;

    let f = fixtures();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for name in ["userblock", "names_clash", "typed_obs", "bool_x"] {
        let file = f.dir.join(format!("{name}.h5ad"));
        let store = dir.path().join(format!("{name}.store"));
        let o = import(&file, &store, &[]);
        assert!(o.status.success(), "{name}: {}", text(&o.stderr));
        let opened = Store::open(&store).unwrap_or_else(|e| panic!("{e}"));
        let schema = opened.table_schema("obs.parquet").unwrap_or_else(|e| panic!("{e}"));
        let names: std::collections::HashSet<&String> = schema.fields().iter().map(|f| f.name()).collect();
        assert_eq!(names.len(), schema.fields().len(), "{name}: two obs fields share a name: {schema:?}");
        // Exported back, anndata reads what it read from the original.
        let exported = dir.path().join(format!("{name}.h5ad"));
        let o = run_bounded(&["export", s(&store), "--out", s(&exported)], &[], None);
        assert!(o.status.success(), "{name}: {}", text(&o.stderr));
        let (original, round) = (anndata_reads(&file), anndata_reads(&exported));
        for key in ["shape", "x_sum", "x_rows", "obs_index", "var_index"] {
            assert_eq!(round[key], original[key], "{name}: {key}");
        }
        for table in ["obs", "var"] {
            let (a, b) = (original[table].as_object().cloned(), round[table].as_object().cloned());
            let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{name}: {table} columns");
            for (column, value) in &a {
                for field in ["categories", "ordered", "values"] {
                    // Float categories come back as their text, spelled as pandas prints them.
                    assert_eq!(value.get(field), b[column].get(field), "{name}: {table}.{column} {field}");
                }
            }
        }
        if name == "typed_obs" {
            let field = |n: &str| schema.field_with_name(n).unwrap_or_else(|e| panic!("{e}")).clone();
            assert!(is_ordered(&field("stage")) && !is_ordered(&field("condition")));
            let text = |n: &str| categories_of(&field(n)).unwrap_or_default();
            assert_eq!(text("dose"), ["1e-05", "0.1", "0.5", "1.0", "100.0", "2.5e+16"]);
            assert_eq!(text("dose32"), ["1e-05", "0.1", "1.0"]);
            assert_eq!(field("half").data_type(), &arrow_schema::DataType::Float64);
        }
    }
}

#[test]
fn a_killed_imports_buckets_and_temporaries_go_with_the_next_import() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = dir.path().join("s.store");
    // Left by a killed CSC import and a killed writer, of processes that may live on another node
    // (pid 1 exists here): removed because the next writer holds the store's lock.
    let buckets = dir.path().join(".s.store.import-1");
    let tmp = dir.path().join(".s.store.tmp-1-123");
    for d in [&buckets, &tmp] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join("bucket-00000"), vec![0u8; 4096]).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(import(&f.dir.join("plain.h5ad"), &store, &[]).status.success());
    assert!(!buckets.exists() && !tmp.exists(), "the next import left the earlier one's temporaries");
    assert!(!dir.path().join(".s.store.lock").exists(), "the lock file outlived its import");
}
