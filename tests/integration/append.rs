//! Appending to a store (issue 49 item 2): the new version holds the cells of the store and of
//! the files added, as a store made of all of them at once does; it costs the new cells (the
//! matrix files are the old ones grown, the obs table keeps its bytes); a reader that opened the
//! old version reads it to the end; the bytes an interrupted append leaves go with the next one;
//! `verify` checks every version.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use cpa_stream::unstable::stages::CsrBatch;
use cpa_stream::unstable::stages::store::{Store, StoreWriter, StoreWriterOptions};
use serde_json::Value;

use crate::common::{obs_batch, obs_schema, run, text, var_table};

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "cpa-stream {}: {}", args.join(" "), text(&o.stderr));
    text(&o.stdout)
}

/// Three `.h5ad` files of 400 cells each (ids cell0 .. cell1199 across them), 40 genes, counts.
fn files(dir: &Path) -> [PathBuf; 3] {
    let n_vars = 40u32;
    let mut out = Vec::new();
    for (k, start) in [0usize, 400, 800].into_iter().enumerate() {
        let store = dir.join(format!("part{k}.store"));
        let options = StoreWriterOptions::default();
        let mut writer =
            StoreWriter::create(&store, &var_table(n_vars), obs_schema(), options).unwrap_or_else(|e| panic!("{e}"));
        let mut batch = CsrBatch::new(n_vars);
        for i in start..start + 400 {
            let mut idx: Vec<u32> = (0..(i % 7)).map(|j| ((i * 7 + j * 3) as u32) % n_vars).collect();
            idx.sort_unstable();
            idx.dedup();
            let vals: Vec<f32> = idx.iter().map(|&c| ((c as usize + i) % 9 + 1) as f32).collect();
            batch.push_row(&idx, &vals);
        }
        writer.push_rows(&batch, &obs_batch(start, 400)).unwrap_or_else(|e| panic!("{e}"));
        writer.finish().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join(format!("f{k}.h5ad"));
        ok(&["export", s(&store), "--out", s(&file)]);
        out.push(file);
    }
    [out[0].clone(), out[1].clone(), out[2].clone()]
}

fn manifest(store: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(store.join("manifest.json")).unwrap_or_default()).unwrap_or_default()
}

/// Every row of a store and its obs table, as text (values and ids), for comparing stores.
/// A store's rows (indices, values) and its obs table as text.
type Content = (Vec<(Vec<u32>, Vec<f32>)>, String);

fn content(store: &Path) -> Content {
    let opened = Store::open(store).unwrap_or_else(|e| panic!("{e}"));
    rows_and_obs(&opened)
}

fn rows_and_obs(store: &Store) -> Content {
    let mut cursor = store.cursor().unwrap_or_else(|e| panic!("{e}"));
    let mut batch = CsrBatch::new(store.n_vars() as u32);
    cursor.read_range(0..store.n_obs(), &mut batch).unwrap_or_else(|e| panic!("{e}"));
    let rows = (0..batch.n_rows()).map(|r| (batch.row(r).0.to_vec(), batch.row(r).1.to_vec())).collect();
    // Every obs column, as text (categories by their values), with its name.
    let obs = store.table("obs.parquet").unwrap_or_else(|e| panic!("{e}"));
    let mut text = String::new();
    for b in obs {
        let b = b.unwrap_or_else(|e| panic!("{e}"));
        for (field, column) in b.schema().fields().iter().zip(b.columns()) {
            let column = arrow_cast::cast(column, &arrow_schema::DataType::Utf8).unwrap_or_else(|e| panic!("{e}"));
            let values: Vec<Option<&str>> = arrow_array::cast::AsArray::as_string::<i32>(&column).iter().collect();
            text.push_str(&format!("{}={values:?};", field.name()));
        }
    }
    (rows, text)
}

#[test]
fn appends_grow_the_store_by_the_new_cells_and_every_version_checks() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let [a, b, c] = files(dir.path());
    for codec in [&["--codec", "raw"][..], &["--codec", "zstd", "--block-rows", "64"][..]] {
        let name = codec[1];
        let store = dir.path().join(format!("grown-{name}.store"));
        let at_once = dir.path().join(format!("at-once-{name}.store"));
        let mut args = vec!["import", s(&a), "--out", s(&store)];
        args.extend_from_slice(codec);
        ok(&args);
        let labels = format!("grown-{name},f1,f2");
        let mut args = vec!["import", s(&a), s(&b), s(&c), "--out", s(&at_once), "--labels", &labels];
        args.extend_from_slice(codec);
        ok(&args);
        // The first append adds the source column (the obs table is written again); the second
        // keeps the table's bytes and adds its rows.
        let old = Store::open(&store).unwrap_or_else(|e| panic!("{e}"));
        let old_content = rows_and_obs(&old);
        ok(&["import", "--append", s(&store), s(&b)]);
        let first = manifest(&store);
        let data = if name == "raw" { "X/data" } else { "X/blocks" };
        let inode = std::fs::metadata(store.join(data)).map(|m| m.ino()).unwrap_or_default();
        let obs_before = std::fs::read(store.join("obs.parquet")).unwrap_or_default();
        ok(&["import", "--append", s(&store), s(&c)]);
        let second = manifest(&store);
        // The same cells, values and ids as the store made at once.
        assert_eq!(content(&store), content(&at_once), "{name}");
        // O(new cells): the matrix file is the old one, grown; the obs table starts with the old
        // table's bytes; each file's entry checks only what this append added.
        assert_eq!(std::fs::metadata(store.join(data)).map(|m| m.ino()).unwrap_or_default(), inode, "{name}");
        let obs_after = std::fs::read(store.join("obs.parquet")).unwrap_or_default();
        assert_eq!(&obs_after[..obs_before.len()], &obs_before[..], "{name}: obs.parquet was rewritten");
        assert_eq!(second["files"]["obs.parquet"]["from"], obs_before.len() as u64, "{name}");
        assert_eq!(second["files"][data]["from"], first["files"][data]["bytes"], "{name}");
        assert_eq!(second["version"], 2);
        assert_eq!(second["history"].as_array().map(Vec::len), Some(2));
        // A reader that opened the first version reads it to the end, unchanged.
        assert_eq!(rows_and_obs(&old), old_content, "{name}: the old version changed under its reader");
        drop(old);
        let verified = ok(&["verify", s(&store), "--json"]);
        let verified: Value = serde_json::from_str(&verified).unwrap_or_default();
        assert_eq!(verified["versions"], 3, "{verified}");
        assert_eq!(verified["trailing_bytes"], 0, "{verified}");
    }
}

#[test]
fn an_interrupted_append_leaves_bytes_that_nothing_reads_and_the_next_append_removes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let [a, b, _] = files(dir.path());
    let store = dir.path().join("s.store");
    ok(&["import", s(&a), "--out", s(&store)]);
    ok(&["import", "--append", s(&store), s(&b)]);
    let before = content(&store);
    let size = std::fs::metadata(store.join("X/data")).map(|m| m.len()).unwrap_or_default();
    // What a kill during an append leaves: bytes after the version's in the matrix files.
    {
        use std::io::Write as _;
        let mut f =
            std::fs::OpenOptions::new().append(true).open(store.join("X/data")).unwrap_or_else(|e| panic!("{e}"));
        f.write_all(&[7u8; 4000]).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(content(&store), before);
    let verified: Value = serde_json::from_str(&ok(&["verify", s(&store), "--json"])).unwrap_or_default();
    assert_eq!(verified["trailing_bytes"], 4000, "{verified}");
    let c = dir.path().join("c.h5ad");
    std::fs::copy(&a, &c).unwrap_or_else(|e| panic!("{e}"));
    ok(&["import", "--append", s(&store), s(&c), "--make-unique"]);
    let grown = manifest(&store);
    assert_eq!(grown["files"]["X/data"]["from"], size);
    let verified: Value = serde_json::from_str(&ok(&["verify", s(&store), "--json"])).unwrap_or_default();
    assert_eq!(verified["trailing_bytes"], 0, "{verified}");
}

#[test]
fn verify_names_the_version_whose_bytes_were_changed() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let [a, b, _] = files(dir.path());
    let store = dir.path().join("s.store");
    ok(&["import", s(&a), "--out", s(&store)]);
    ok(&["import", "--append", s(&store), s(&b)]);
    // A byte of the first version's values, changed in place.
    {
        use std::io::{Seek as _, SeekFrom, Write as _};
        let mut f =
            std::fs::OpenOptions::new().write(true).open(store.join("X/data")).unwrap_or_else(|e| panic!("{e}"));
        f.seek(SeekFrom::Start(10)).unwrap_or_else(|e| panic!("{e}"));
        f.write_all(&[0xAB]).unwrap_or_else(|e| panic!("{e}"));
    }
    let o = run(&["verify", s(&store)]);
    let err = text(&o.stdout) + &text(&o.stderr);
    assert!(!o.status.success() && err.contains("X/data") && err.contains("written by version 1 of 2"), "{err}");
}

/// `cp -al`: a copy of `from` whose files are hard links of its files.
fn link_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")) {
        let entry = entry.unwrap_or_else(|e| panic!("{e}"));
        let target = to.join(entry.file_name());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            link_copy(&entry.path(), &target);
        } else {
            std::fs::hard_link(entry.path(), &target).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Issue 73 item 2: a store copied with `cp -al` (or an `rsync --link-dest` snapshot) shares the
/// inodes of its matrix files with the original; an append to one copy must not write into the
/// others (it copies a file that has other names, then grows the copy).
#[test]
fn an_append_to_a_hard_linked_copy_leaves_the_other_copies_as_they_were() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let [a, b, c] = files(dir.path());
    for codec in [&["--codec", "raw"][..], &["--codec", "zstd", "--block-rows", "64"][..]] {
        let name = codec[1];
        let original = dir.path().join(format!("a-{name}.store"));
        let mut args = vec!["import", s(&a), "--out", s(&original)];
        args.extend_from_slice(codec);
        ok(&args);
        let (x, y) = (dir.path().join(format!("x-{name}.store")), dir.path().join(format!("y-{name}.store")));
        link_copy(&original, &x);
        link_copy(&original, &y);
        let before = content(&original);
        let said = ok(&["import", "--append", s(&x), s(&b)]);
        assert!(said.contains("MB copied (files another copy of the store shares"), "{name}: {said}");
        ok(&["import", "--append", s(&y), s(&c)]);
        // Each copy holds its own cells, as a store made at once of the same files does (the
        // labels an append gives: the store's name, then the file's).
        for (store, added, labels) in [(&x, &b, format!("x-{name},f1")), (&y, &c, format!("y-{name},f2"))] {
            let at_once = dir.path().join(format!("at-once-{}.store", labels.replace(',', "-")));
            let mut args = vec!["import", s(&a), s(added), "--out", s(&at_once), "--labels", &labels];
            args.extend_from_slice(codec);
            ok(&args);
            assert_eq!(content(store), content(&at_once), "{name}: {}", store.display());
            let verified: Value = serde_json::from_str(&ok(&["verify", s(store), "--json"])).unwrap_or_default();
            assert_eq!(verified["versions"], 2, "{verified}");
        }
        assert_eq!(content(&original), before, "{name}: the original changed");
        ok(&["verify", s(&original)]);
    }
}
