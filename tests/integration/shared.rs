//! Shared directories and schedulers (issue 47): one writer per output, stores read as they
//! were opened, shards that share files, SIGTERM and SIGHUP as Ctrl-C, and paths that are not
//! UTF-8.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cpa_stream::unstable::stages::store::Store;
use serde_json::Value;

use crate::common::{bin, run, small_store, text};
use crate::predict::fixture;

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn synth(out: &Path, cells: &str) {
    let o = run(&[
        "synth",
        "--cells",
        cells,
        "--genes",
        "60",
        "--perturbations",
        "3",
        "--cell-types",
        "2",
        "--seed",
        "7",
        "--out",
        s(out),
    ]);
    assert!(o.status.success(), "synth failed: {}", text(&o.stderr));
}

fn spawn_train(store: &Path, out: &Path, extra: &[&str]) -> Child {
    Command::new(bin())
        .args(["train", "--store", s(store), "--dose-key", "dose", "--covariates", "cell_type", "--out", s(out)])
        .args(["--threads", "1", "--batch-size", "32", "--checkpoint-every", "0"])
        .args(extra)
        .env("CPA_STREAM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The (epoch, batches into the next epoch) of a run's checkpoint, if it has one.
fn checkpoint_position(checkpoint: &Path) -> Option<(u64, u64)> {
    let state: Value = serde_json::from_slice(&std::fs::read(checkpoint).ok()?).ok()?;
    Some((state["epoch"].as_u64()?, state["within_epoch"]["batches"].as_u64().unwrap_or(0)))
}

/// Waits until the run's checkpoint is past `after` (its progress, seen on disk), failing after
/// two minutes; returns the position seen.
fn wait_past(checkpoint: &Path, after: Option<(u64, u64)>, child: &mut Child) -> (u64, u64) {
    let started = Instant::now();
    loop {
        if let Some(seen) = checkpoint_position(checkpoint).filter(|p| after.is_none_or(|a| *p > a)) {
            return seen;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the run ended ({status}) before its checkpoint passed {after:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint past {after:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// Two writers of one run: the second is refused naming the first; SIGTERM then SIGHUP stop the
/// first like Ctrl-C (a checkpoint inside the epoch, the exit code of the signal) and the run
/// resumes from where it stopped.
#[test]
fn a_run_has_one_writer_and_schedulers_signals_checkpoint_it() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = dir.path().join("s.store");
    synth(&store, "4000");
    let run_dir = dir.path().join("run");
    let checkpoint = run_dir.join("checkpoint/trainer.json");
    for (sig, code, name) in [(libc::SIGTERM, 143, "SIGTERM"), (libc::SIGHUP, 129, "SIGHUP")] {
        let resume: &[&str] = if run_dir.exists() { &["--resume"] } else { &[] };
        let before = checkpoint_position(&checkpoint);
        let mut first = spawn_train(&store, &run_dir, &[&["--epochs", "10000"], resume].concat());
        // The lock is taken before anything else; a new checkpoint shows the run is training.
        let seen = wait_past(&checkpoint, before, &mut first);
        for second in [&[][..], &["--resume"][..], &["--overwrite"][..]] {
            let o = spawn_train(&store, &run_dir, &[&["--epochs", "1"], second].concat())
                .wait_with_output()
                .unwrap_or_else(|e| panic!("{e}"));
            let err = text(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{second:?}: {err}");
            let holder = format!("another command is writing this output (process {} on host ", first.id());
            assert!(err.contains(&holder), "{second:?}: {err}");
        }
        signal(&first, sig);
        let o = first.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        assert_eq!(o.status.code(), Some(code), "{name}: {out}{err}");
        assert!(err.contains(&format!("{name}: stopping after this step")), "{name}: {err}");
        assert!(out.contains(&format!("stopped by {name} (resume with --resume)")), "{name}: {out}");
        // Checkpointed where the signal found it (within an epoch, or at its end if it came
        // then): never behind what was already on disk.
        let stopped = checkpoint_position(&checkpoint).unwrap_or_else(|| panic!("{name}: no checkpoint"));
        assert!(stopped >= seen, "{name}: checkpoint {stopped:?} is behind {seen:?}");
        assert!(!run_dir.join("model").exists(), "an interrupted run publishes no final model");
        assert!(!dir.path().join(".run.lock").exists(), "the lock file outlived its holder");
    }
    // The run goes on from the last checkpoint and finishes.
    let epochs_done = checkpoint_position(&checkpoint).map_or(0, |(epoch, _)| epoch);
    let last = (epochs_done + 1).to_string();
    let o = spawn_train(&store, &run_dir, &["--resume", "--epochs", &last]).wait_with_output();
    let o = o.unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(run_dir.join("model/model.json").exists());
}

/// A store replaced while a reader has it open (`convert --overwrite`, an import over it): the
/// reader goes on reading the version it opened, every file of it, never a mix.
#[test]
fn a_store_replaced_under_a_reader_is_read_as_it_was_opened() {
    use arrow_array::cast::AsArray;
    use cpa_stream::unstable::schemas::{Codec, StoreFiles};

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    let opened = Store::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let ids = |store: &Store| -> Vec<String> {
        let obs = store.small_table(StoreFiles::OBS).unwrap_or_else(|e| panic!("{e}"));
        obs.column(0).as_string::<i32>().iter().flatten().map(str::to_owned).collect()
    };
    let before = ids(&opened);
    let mut cursor = opened.cursor().unwrap_or_else(|e| panic!("{e}"));
    let first_row = cursor.row(0).map(|(g, v)| (g.to_vec(), v.to_vec())).unwrap_or_else(|e| panic!("{e}"));
    // Another store, with other cells, takes its place (published by rename, the old removed).
    let other = dir.path().join("other.store");
    synth(&other, "300");
    let o = run(&["convert", s(&other), "--out", s(&path), "--overwrite", "--codec", "zstd"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let replaced = Store::open(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(ids(&replaced), before, "the replacement has other cells");
    // The first reader: the same cells and values as when it opened the store.
    assert_eq!(ids(&opened), before);
    let mut cursor = opened.cursor().unwrap_or_else(|e| panic!("{e}"));
    let again = cursor.row(0).map(|(g, v)| (g.to_vec(), v.to_vec())).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again, first_row);
    assert!(opened.verify().is_ok(), "the opened version checks against its own manifest");
}

/// Shards of a job array share `genes.parquet`: the first writes it, the others find it written
/// and leave it alone; no shard removes another's temporaries by a process id.
#[test]
fn shards_write_their_shared_genes_table_once() {
    use std::os::unix::fs::MetadataExt;

    let f = fixture();
    let dir = f.dir.join("shared-shards");
    let shard = move |k: usize| {
        let dir = fixture().dir.join("shared-shards");
        let out = crate::predict::predict(&["--target", "PERT01", "--shard", &format!("{k}/3"), "--out", s(&dir)]);
        assert!(out.status.success(), "shard {k}: {}", text(&out.stderr));
    };
    shard(0);
    let genes = dir.join("genes.parquet");
    let inode = std::fs::metadata(&genes).map(|m| m.ino()).unwrap_or_else(|e| panic!("{e}"));
    // A live temporary of genes.parquet that some shard on another node is writing (its pid
    // need not exist here): the lock, not the pid, says whether it is alive.
    let held =
        cpa_stream::unstable::stages::output::lock_output(&genes, cpa_stream::unstable::stages::output::Wait::No)
            .unwrap_or_else(|e| panic!("{e}"));
    let foreign = dir.join(format!(".genes.parquet.tmp-{}-1", u32::MAX - 7));
    std::fs::write(&foreign, b"being written elsewhere").unwrap_or_else(|e| panic!("{e}"));
    let waiting = std::thread::spawn(move || shard(1));
    // The shard waits on the lock; nothing of genes.parquet's is touched while it is held.
    std::thread::sleep(Duration::from_millis(300));
    assert!(foreign.exists(), "a shard removed another writer's live temporary");
    drop(held);
    waiting.join().unwrap_or_else(|_| panic!("shard 1 panicked"));
    shard(2);
    assert_eq!(std::fs::metadata(&genes).map(|m| m.ino()).ok(), Some(inode), "genes.parquet was rewritten");
    let _ = std::fs::remove_file(&foreign);
}

/// A path is any bytes but NUL: every command takes it (the provenance records it lossily).
#[test]
fn paths_that_are_not_utf8_work_in_every_command() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path().join(OsStr::from_bytes(b"data-\xff"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let p = |name: &[u8]| -> PathBuf { dir.join(OsStr::from_bytes(name)) };
    let (store, h5ad, back, run_dir, preds, eval) =
        (p(b"s\xfe.store"), p(b"x\xfd.h5ad"), p(b"b\xfc.store"), p(b"run\xfb"), p(b"p\xfa.parquet"), p(b"e\xf9"));
    let cli = |args: &[&OsStr]| {
        let o = Command::new(bin()).args(args).env("CPA_STREAM_LOG", "warn").output();
        let o = o.unwrap_or_else(|e| panic!("{e}"));
        assert!(o.status.success(), "{args:?}: exit {:?}: {}", o.status.code(), text(&o.stderr));
        o
    };
    let os = |t: &'static str| OsStr::new(t);
    let synth = ["synth", "--cells", "600", "--genes", "40", "--perturbations", "2", "--cell-types", "2", "--out"];
    cli(&[synth.map(os).as_slice(), &[store.as_os_str()]].concat());
    cli(&[os("inspect"), store.as_os_str()]);
    cli(&[os("verify"), store.as_os_str()]);
    cli(&[os("export"), store.as_os_str(), os("--out"), h5ad.as_os_str()]);
    cli(&[os("import"), h5ad.as_os_str(), os("--out"), back.as_os_str()]);
    let keys = [os("--dose-key"), os("dose"), os("--covariates"), os("cell_type"), os("--threads"), os("1")];
    let mut train =
        vec![os("train"), os("--store"), back.as_os_str(), os("--epochs"), os("1"), os("--out"), run_dir.as_os_str()];
    train.extend_from_slice(&keys);
    cli(&train);
    cli(&[
        os("predict"),
        os("--model"),
        run_dir.as_os_str(),
        os("--store"),
        back.as_os_str(),
        os("--out"),
        preds.as_os_str(),
    ]);
    cli(&[
        os("evaluate"),
        os("--model"),
        run_dir.as_os_str(),
        os("--store"),
        back.as_os_str(),
        os("--out"),
        eval.as_os_str(),
    ]);
    assert!(preds.is_file() && eval.join("metrics.parquet").is_file());
    // An argument that is not UTF-8 where text is expected is a usage error, not a crash.
    let o = Command::new(bin()).args([os("inspect"), os("--bogus"), OsStr::from_bytes(b"\xff")]).output();
    assert_eq!(o.unwrap_or_else(|e| panic!("{e}")).status.code(), Some(2));
}

/// The split is a function of cell identity: a shuffled copy of the training store tests the
/// same cells, `--resume` on it goes on, and a store with other cells is named as such (by
/// evaluate, with the cells it cannot label; refused by `--resume`).
#[test]
fn the_split_follows_cell_ids_and_another_store_is_named() {
    use std::collections::HashMap;

    use arrow_array::cast::AsArray;
    use cpa_stream::unstable::pipeline::encoder::{CellLabels, Split};
    use cpa_stream::unstable::schemas::StoreFiles;

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = dir.path().join("s.store");
    synth(&store, "3000");
    let run_dir = dir.path().join("run");
    let o = spawn_train(&store, &run_dir, &["--epochs", "1"]).wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let shuffled = dir.path().join("shuffled.store");
    let o = run(&["convert", s(&store), "--out", s(&shuffled), "--shuffle", "11"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // Each cell id's split, in either store, as the run recorded it.
    let (encoder, _) =
        cpa_stream::unstable::engine::train::recorded_settings(&run_dir).unwrap_or_else(|e| panic!("{e}"));
    let splits = |path: &Path| -> HashMap<String, Split> {
        let opened = Store::open(path).unwrap_or_else(|e| panic!("{e}"));
        let labels = CellLabels::from_store(&opened, &encoder).unwrap_or_else(|e| panic!("{e}"));
        let obs = opened.small_table(StoreFiles::OBS).unwrap_or_else(|e| panic!("{e}"));
        let ids = obs.column(0).as_string::<i32>();
        (0..labels.n_cells()).map(|c| (ids.value(c as usize).to_owned(), labels.split(c))).collect()
    };
    let (a, b) = (splits(&store), splits(&shuffled));
    assert_eq!(a.len(), 3000);
    assert_eq!(a, b, "a shuffled copy of the store splits its cells otherwise");
    assert!(a.values().filter(|s| **s == Split::Test).count() > 100, "a test split of a few cells");
    // Evaluate on the copy: the same cells, nothing said; `--resume` on it goes on.
    let eval = |store: &Path, out: &str| -> Value {
        let out = dir.path().join(out);
        let o = run(&["evaluate", "--model", s(&run_dir), "--store", s(store), "--out", s(&out), "--json"]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}"))
    };
    let report = eval(&shuffled, "eval-shuffled");
    assert!(report.get("other_store").is_none(), "{report}");
    assert_eq!(report["dropped"], serde_json::json!([]));
    let o = spawn_train(&shuffled, &run_dir, &["--resume", "--epochs", "2"]).wait_with_output();
    let o = o.unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{}", text(&o.stderr));
    // A store with other cells and a cell type the model never saw.
    let other = dir.path().join("other.store");
    let o = run(&[
        "synth",
        "--cells",
        "2000",
        "--genes",
        "60",
        "--perturbations",
        "3",
        "--cell-types",
        "3",
        "--seed",
        "7",
        "--out",
        s(&other),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report = eval(&other, "eval-other");
    let said = report["other_store"].as_str().unwrap_or_default();
    assert!(said.contains("is not the store the run trained on") && said.contains("2000 cells"), "{report}");
    let dropped = report["dropped"].as_array().cloned().unwrap_or_default();
    assert!(!dropped.is_empty(), "cells of an unknown cell type were dropped without a word: {report}");
    assert!(dropped.iter().all(|d| d[0].as_str().is_some_and(|l| l.contains("CT03"))), "{dropped:?}");
    let o = spawn_train(&other, &run_dir, &["--resume", "--epochs", "3"]).wait_with_output();
    let o = o.unwrap_or_else(|e| panic!("{e}"));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("holds 2000 cells, not the 3000 the run") && err.contains("trained on"), "{err}");
}

/// A working directory deeper than PATH_MAX (4,096 bytes), where libtorch's MKL ended every
/// command before `main` (exit 2): the commands work, and relative paths mean what they say.
#[test]
fn a_working_directory_deeper_than_path_max_works() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // A shell walks down (no single path may exceed PATH_MAX) and runs the binary there.
    let script = r#"
        set -e
        cd "$1"
        name=$(printf 'd%.0s' $(seq 200))
        for i in $(seq 25); do mkdir "$name"; cd "$name"; done
        [ "$(pwd | wc -c)" -gt 4096 ]
        "$2" --version
        "$2" synth --cells 300 --genes 20 --perturbations 2 --out deep.store --quiet
        "$2" inspect deep.store > inspected.txt
        "$2" train --store deep.store --out run --epochs 1 --threads 1 --quiet
        test -f run/model/model.json
        grep -q "300 cells" inspected.txt
    "#;
    let o = Command::new("bash")
        .args(["-c", script, "bash", s(tmp.path()), s(&bin())])
        .env("CPA_STREAM_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "exit {:?}: {}{}", o.status.code(), text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stdout).contains("cpa-stream"), "{}", text(&o.stdout));
    // tempdir's removal cannot walk a path this deep by name: remove it from the inside out.
    let cleanup = "cd \"$1\" && while [ -d d* ]; do n=$(ls -d d*); cd \"$n\"; done; cd \"$1\"; \
        rm -rf -- \"$(ls -d d*)\" 2>/dev/null || true";
    let _ = Command::new("bash").args(["-c", cleanup, "bash", s(tmp.path())]).status();
}
