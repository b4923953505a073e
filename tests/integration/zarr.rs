//! AnnData zarr stores on the command line (issue 49 item 3): `cpa-stream import x.zarr` makes
//! the very store that the import of the `.h5ad` twin of the same AnnData makes (zarr format 2
//! and 3, blosc and zstd, sharded or not, small chunks, CSR, CSC and dense X, layers, raw,
//! categoricals, nullable columns); zarr stores join collections; a store that would make the
//! reader read elsewhere, block or take what it does not hold is refused. The stores come from
//! `tests/fixtures/zarr_fixtures.py` (anndata's and zarr's own writers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{bin, python_fixtures, repo_root, text};

const SECRET: &str = "TOP-SECRET-LINE";

struct Fixtures {
    dir: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES
        .get_or_init(|| Fixtures { dir: python_fixtures("zarr", &repo_root().join("tests/fixtures/zarr_fixtures.py")) })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Runs the binary, failing the test (not hanging the suite) if it is still running after two
/// minutes: an input that blocks the import. Not a timing assertion.
fn run_bounded(args: &[&str]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .env("CPA_STREAM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
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

fn import(inputs: &[&Path], out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["import"];
    args.extend(inputs.iter().map(|p| s(p)));
    args.extend(["--out", s(out), "--overwrite", "-q"]);
    args.extend_from_slice(extra);
    run_bounded(&args)
}

/// Each file of a store and its checksum (the manifest's record of the bytes written).
fn checksums(store: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(store.join("manifest.json")).unwrap_or_else(|e| panic!("{e}"));
    let manifest: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let files = manifest["files"].as_object().unwrap_or_else(|| panic!("no files in {}", store.display()));
    files.iter().map(|(k, v)| (k.clone(), v["checksum"].as_str().unwrap_or_default().to_owned())).collect()
}

#[test]
fn a_zarr_anndata_imports_as_its_h5ad_twin_byte_for_byte() {
    let f = fixtures();
    let out = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let variants =
        ["v2", "v3", "v3_sharded", "v2_chunked", "v3_sharded_small", "v3_csc", "v2_dense", "v3_dense", "v3_f64_i64"];
    for variant in variants {
        for (what, extra) in [("X", &[][..]), ("layer", &["--layer", "counts"][..]), ("raw", &["--use-raw"][..])] {
            // Chunks of 10 cells cross the small chunks (97 cells) and shards (291) of the
            // chunked variants at every offset.
            for chunk_rows in ["1024", "10"] {
                let mut extra = extra.to_vec();
                extra.extend(["--chunk-rows", chunk_rows]);
                let (z, h) = (out.path().join("z.store"), out.path().join("h.store"));
                let done = import(&[&f.dir.join(format!("{variant}.zarr"))], &z, &extra);
                assert!(done.status.success(), "{variant} {what}: {}", text(&done.stderr));
                let done = import(&[&f.dir.join(format!("{variant}.h5ad"))], &h, &extra);
                assert!(done.status.success(), "{variant} {what} (h5ad): {}", text(&done.stderr));
                assert_eq!(checksums(&z), checksums(&h), "{variant} {what}, chunks of {chunk_rows}");
            }
        }
    }
}

#[test]
fn zarr_stores_join_collections_as_h5ad_files_do() {
    let f = fixtures();
    let out = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (mixed, twins) = (out.path().join("mixed.store"), out.path().join("twins.store"));
    let first = f.dir.join("first.h5ad");
    let done = import(&[&first, &f.dir.join("second.zarr")], &mixed, &[]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    let done = import(&[&first, &f.dir.join("second.h5ad")], &twins, &[]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    // The labels are the file names without `.zarr` / `.h5ad`: the same.
    assert_eq!(checksums(&mixed), checksums(&twins));
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(mixed.join("manifest.json")).unwrap_or_default())
            .unwrap_or_default();
    assert_eq!(manifest["n_obs"], 300);
    // And a zarr store takes its genes by another column, or a list of them, like a file.
    let genes = out.path().join("genes.txt");
    std::fs::write(&genes, "GENE007\nGENE001\n").unwrap_or_else(|e| panic!("{e}"));
    let listed = out.path().join("listed.store");
    let done = import(&[&f.dir.join("v3.zarr")], &listed, &["--genes", s(&genes)]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    let twin = out.path().join("listed-twin.store");
    let done = import(&[&f.dir.join("v3.h5ad")], &twin, &["--genes", s(&genes)]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert_eq!(checksums(&listed), checksums(&twin));
}

#[test]
fn a_zarr_store_that_reads_elsewhere_blocks_or_declares_what_it_lacks_is_refused() {
    let f = fixtures();
    let out = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = out.path().join("x.store");
    let cases: [(&str, &[&str], &str); 6] = [
        ("link.zarr", &[], "obs/_index/0: a symbolic link"),
        ("link.zarr", &["--allow-external"], "not a regular file in the store's directory"),
        ("fifo.zarr", &[], "X/data/c: a FIFO, socket or device"),
        ("huge.zarr", &[], "its index declares 1000000000 rows but the dataframe stores"),
        ("bigchunk.zarr", &[], "X/data: chunks of [1099511627776] elements"),
        ("rank_genes_groups.zarr", &["--deg-uns-key", "rank_genes_groups"], "scanpy's rank_genes_groups"),
    ];
    for (name, extra, said) in cases {
        let done = import(&[&f.dir.join(name)], &store, extra);
        let err = text(&done.stderr);
        assert!(!done.status.success(), "{name} was imported");
        assert!(err.contains(said), "{name}: {err}");
        assert!(!err.contains(SECRET) && !text(&done.stdout).contains(SECRET), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(!store.exists(), "{name}: a store was written");
    }
    // Without the key, rank_genes_groups is passed over: the cells import, with no DEG table.
    let done = import(&[&f.dir.join("rank_genes_groups.zarr")], &store, &[]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert!(!store.join("degs.parquet").exists());
}

#[test]
fn a_directory_that_is_neither_a_store_nor_anndata_says_what_was_expected() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let zarr = dir.path().join("atlas.zarr");
    std::fs::create_dir(&zarr).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(zarr.join("zarr.json"), br#"{"zarr_format": 3, "node_type": "group", "attributes": {}}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = dir.path().join("out.store");
    let done = import(&[&zarr], &out, &[]);
    let err = text(&done.stderr);
    assert!(!done.status.success() && err.contains("not an AnnData zarr store"), "{err}");
    let plain = dir.path().join("some-folder");
    std::fs::create_dir(&plain).unwrap_or_else(|e| panic!("{e}"));
    let done = import(&[&plain], &out, &[]);
    let err = text(&done.stderr);
    assert!(err.contains("neither a store (no manifest.json) nor a zarr store") && err.contains(".h5ad"), "{err}");
    assert!(!out.exists());
}

/// Issue 73 items 4, 5, 9, 10 and 13: a store a careless copy or a crafted file makes is refused
/// with the array and why (or, where zarr's own rules allow what it holds, imported with a
/// warning), never read into wrong cells, a blown-up host or an aborted process.
#[test]
fn a_damaged_or_crafted_zarr_store_is_refused_naming_the_array() {
    let f = fixtures();
    let out = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = out.path().join("x.store");
    let cases: [(&str, &[&str], &str); 7] = [
        ("dupcats.zarr", &[], "obs/condition: category \"control\" appears twice (codes 0 and 1)"),
        ("vlen.zarr", &[], "obs/stage/categories: rows 0..2: a damaged chunk (the zarr library failed on it"),
        ("missing_index.zarr", &[], "obs/_index (the index): 1 of its 4 chunks have no file"),
        ("missing_data.zarr", &[], "X/data: 1 of its"),
        ("bomb.zarr", &[], "a compression bomb or a damaged store; not decoded"),
        ("shard_index.zarr", &[], "a shard index that points past its shard"),
        ("bad_metadata.zarr", &[], "X/data/zarr.json: not JSON"),
    ];
    for (name, extra, said) in cases {
        let done = import(&[&f.dir.join(name)], &store, extra);
        let err = text(&done.stderr);
        assert!(!done.status.success(), "{name} was imported");
        assert!(err.contains(said), "{name}: {err}");
        assert!(!err.contains("panicked") && done.status.code() == Some(1), "{name}: {err}");
        assert!(!store.exists(), "{name}: a store was written");
    }
    let done = import(&[&f.dir.join("missing_data.zarr")], &store, &[]);
    assert!(text(&done.stderr).contains("--allow-missing-chunks reads it anyway"), "{}", text(&done.stderr));
    // Asked for, the missing values read as the fill value, and the import says where.
    let done = import(&[&f.dir.join("missing_data.zarr")], &store, &["--allow-missing-chunks"]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    // A column's missing chunk is zarr's way of storing the fill value: imported, and reported.
    let done = run_bounded(&["import", s(&f.dir.join("missing_column.zarr")), "--out", s(&store), "--overwrite"]);
    let err = text(&done.stderr);
    assert!(done.status.success(), "{err}");
    assert!(err.contains("obs/n_genes: 1 of 4 chunks absent, read as the fill value"), "{err}");
}
