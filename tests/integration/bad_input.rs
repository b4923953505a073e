//! Damaged and foreign stores: each gives an error naming the file and what was expected.

use std::fs::{self, OpenOptions};
use std::path::Path;

use cpa_stream::unstable::schemas::{Codec, MANIFEST_FILE, StoreFiles};
use cpa_stream::unstable::stages::store::Store;
use parquet::arrow::ArrowWriter;

use crate::common::*;

fn open_err(path: &Path) -> String {
    match Store::open(path) {
        Ok(_) => panic!("{} opened although damaged", path.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_manifest(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let file = path.join(MANIFEST_FILE);
    let mut value: serde_json::Value = serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
    edit(&mut value);
    fs::write(&file, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn missing_store_or_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = open_err(&dir.path().join("nowhere.store"));
    assert!(err.contains("nowhere.store/manifest.json") && err.contains("No such file"), "{err}");
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    fs::remove_file(path.join(StoreFiles::DATA)).unwrap();
    let err = open_err(&path);
    assert!(err.contains("X/data") && err.contains("No such file"), "{err}");
}

#[test]
fn truncated_file_is_a_size_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    let f = OpenOptions::new().write(true).open(path.join(StoreFiles::INDICES)).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 4).unwrap();
    let err = open_err(&path);
    assert!(err.contains("X/indices") && err.contains(&format!("is {}, expected {len}", len - 4)), "{err}");
}

#[test]
fn wrong_magic_version_or_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    edit_manifest(&path, |v| v["format"] = "anndata".into());
    let err = open_err(&path);
    assert!(err.contains("manifest.json") && err.contains("\"anndata\", expected \"cpa-stream-store\""), "{err}");
    edit_manifest(&path, |v| {
        v["format"] = "cpa-stream-store".into();
        v["version"] = 7.into();
    });
    let err = open_err(&path);
    assert!(err.contains("version 7 is not supported") && err.contains("reads version 1"), "{err}");
    fs::write(path.join(MANIFEST_FILE), "{not json").unwrap();
    let err = open_err(&path);
    assert!(err.contains("manifest.json: not valid JSON"), "{err}");
}

#[test]
fn sizes_disagreeing_with_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    // A file shorter than its entry says is damaged; a matrix file longer than its entry holds
    // bytes of an interrupted append, which nothing reads, but its entry must still fit the shape.
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    edit_manifest(&path, |v| v["files"]["X/data"]["bytes"] = 1_000_000.into());
    let err = open_err(&path);
    assert!(err.contains("X/data: file size in bytes is") && err.contains("expected 1000000"), "{err}");
    edit_manifest(&path, |v| v["files"]["X/data"]["bytes"] = 12.into());
    let err = open_err(&path);
    assert!(err.contains("X/data: file size in bytes (from the manifest's shape) is 12"), "{err}");
    edit_manifest(&path, |v| v["files"]["var.parquet"]["bytes"] = 12.into());
    let err = open_err(&path);
    assert!(err.contains("var.parquet: file size in bytes is") && err.contains("expected 12"), "{err}");

    let path = small_store(dir.path(), "t.store", Codec::Raw);
    edit_manifest(&path, |v| {
        let nnz = v["nnz"].as_u64().unwrap();
        v["nnz"] = (nnz + 1).into();
    });
    let err = open_err(&path);
    assert!(err.contains("X/indices") && err.contains("from the manifest's shape"), "{err}");

    let path = small_store(dir.path(), "big.store", Codec::Raw);
    edit_manifest(&path, |v| v["nnz"] = (u64::MAX / 2).into());
    let err = open_err(&path);
    assert!(err.contains("manifest.json: nnz = 9223372036854775807 is too large"), "{err}");

    let path = small_store(dir.path(), "u.store", Codec::zstd());
    edit_manifest(&path, |v| v["n_obs"] = 51.into());
    let err = open_err(&path);
    assert!(err.contains("X/indptr") && err.contains("expected 416"), "{err}");
}

#[test]
fn checksum_mismatch_is_found_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    patch(&path.join(StoreFiles::DATA), 8, &[0xff, 0xff]);
    let store = Store::open(&path).unwrap();
    let err = store.verify().unwrap_err().to_string();
    assert!(err.contains("X/data: checksum is") && err.contains("the manifest records"), "{err}");

    let out = run(&["verify", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("FAILED:") && stdout.contains("X/data"), "{stdout}");
}

#[test]
fn non_monotone_indptr_names_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    // Row 3's end offset set far beyond row 4's.
    patch(&path.join(StoreFiles::INDPTR), 4 * 8, &1000u64.to_le_bytes());
    let err = open_err(&path);
    assert!(err.contains("X/indptr: offsets decrease at row 4"), "{err}");
    patch(&path.join(StoreFiles::INDPTR), 0, &5u64.to_le_bytes());
    let err = open_err(&path);
    assert!(err.contains("X/indptr: first offset is Some(5), expected 0"), "{err}");
}

#[test]
fn column_index_out_of_range_is_found_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    let store = Store::open(&path).unwrap();
    store.check_indices().unwrap();
    drop(store);
    // Row 1 holds the first entry (row 0 is empty in the sample rows).
    patch(&path.join(StoreFiles::INDICES), 0, &25u32.to_le_bytes());
    let store = Store::open(&path).unwrap();
    let err = store.check_indices().unwrap_err().to_string();
    assert!(err.contains("X/indices: row 1: column index 25 out of range, expected < 20"), "{err}");
}

#[test]
fn corrupt_zstd_block_names_the_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::zstd_with(3, 16));
    let len = fs::metadata(path.join(StoreFiles::BLOCKS)).unwrap().len();
    patch(&path.join(StoreFiles::BLOCKS), len / 2, &[0xde, 0xad, 0xbe, 0xef]);
    let store = Store::open(&path).unwrap();
    let mut cursor = store.cursor().unwrap();
    let err = (0..50).find_map(|r| cursor.row(r).err()).expect("a damaged block fails to decode").to_string();
    assert!(err.contains("X/blocks: block") && err.contains("rows"), "{err}");
    assert!(store.check_indices().is_err());
}

#[test]
fn obs_rows_must_match_n_obs() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    let obs_path = path.join(StoreFiles::OBS);
    let file = fs::File::create(&obs_path).unwrap();
    let mut w = ArrowWriter::try_new(file, obs_schema(), None).unwrap();
    w.write(&obs_batch(0, 49)).unwrap();
    w.close().unwrap();
    let bytes = fs::metadata(&obs_path).unwrap().len();
    edit_manifest(&path, |v| v["files"]["obs.parquet"]["bytes"] = bytes.into());
    let err = open_err(&path);
    assert!(err.contains("obs.parquet: rows (n_obs) is 49, expected 50"), "{err}");
}

#[test]
fn a_directory_that_is_no_store() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(MANIFEST_FILE), "[1, 2]").unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("format is \"<missing>\""), "{err}");
}

#[test]
fn manifest_file_names_never_leave_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    let outside = dir.path().join("outside.txt");
    fs::write(&outside, b"not the store's").unwrap();
    for name in ["../outside.txt", outside.to_str().unwrap(), "X/../../outside.txt"] {
        let copy = dir.path().join("copy.store");
        let _ = fs::remove_dir_all(&copy);
        let o = run(&["convert", path.to_str().unwrap(), "--out", copy.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        edit_manifest(&copy, |v| {
            v["files"][name] = serde_json::json!({"bytes": 15, "checksum": "0000000000000000"});
        });
        let err = open_err(&copy);
        assert!(err.contains(&format!("files lists {name:?}")), "{err}");
        // Neither verify nor convert follows the name out of the store.
        let o = run(&["verify", copy.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
        let o = run(&["convert", copy.to_str().unwrap(), "--out", dir.path().join("again.store").to_str().unwrap()]);
        assert!(!o.status.success());
        assert_eq!(fs::read(&outside).unwrap(), b"not the store's");
    }
}

#[test]
fn a_manifest_that_is_no_regular_file_or_too_large_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    let manifest = path.join(MANIFEST_FILE);
    fs::remove_file(&manifest).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &manifest).unwrap();
    let err = open_err(&path);
    assert!(err.contains("manifest.json: not a regular file"), "{err}");
    fs::remove_file(&manifest).unwrap();
    fs::write(&manifest, vec![b' '; 2 << 20]).unwrap();
    let err = open_err(&path);
    assert!(err.contains("larger than 1048576 bytes"), "{err}");
}

#[test]
fn verify_finds_unlisted_files_and_decodes_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    fs::write(path.join("X/stale"), b"left behind").unwrap();
    let err = Store::open(&path).unwrap().verify().unwrap_err().to_string();
    assert!(err.contains("X/stale: in the store but not listed"), "{err}");
    fs::remove_file(path.join("X/stale")).unwrap();
    Store::open(&path).unwrap().verify().unwrap();
    // A truth table whose bytes match the manifest but do not decode.
    let truth = path.join(StoreFiles::TRUTH);
    fs::write(&truth, b"PAR1 not parquet PAR1").unwrap();
    let (bytes, checksum) = cpa_stream::unstable::stages::store::file_checksum(&truth).unwrap();
    edit_manifest(&path, |v| {
        v["files"][StoreFiles::TRUTH] = serde_json::json!({"bytes": bytes, "checksum": checksum});
    });
    let err = Store::open(&path).unwrap().verify().unwrap_err().to_string();
    assert!(err.contains("truth.parquet"), "{err}");
}

#[test]
fn every_reader_checks_the_rows_it_gathers() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    let first = |store: &Store| -> (u64, usize) {
        let indptr = store.indptr();
        let row = (0..store.n_obs()).find(|&r| indptr[r as usize + 1] > indptr[r as usize] + 1).unwrap();
        (row, indptr[row as usize] as usize)
    };
    let (row, at) = first(&Store::open(&path).unwrap());
    let read = |path: &Path| -> String {
        let store = Store::open(path).unwrap();
        let mut out = cpa_stream::unstable::stages::CsrBatch::new(store.n_vars() as u32);
        let mut cursor = store.cursor().unwrap();
        let by_range = cursor.read_range(0..store.n_obs(), &mut out).unwrap_err().to_string();
        let by_row = cursor.gather(&[row], &mut out).unwrap_err().to_string();
        assert_eq!(by_range, by_row);
        by_range
    };
    // An index past the genes (it used to become the last gene, or a libtorch error later).
    patch(&path.join(StoreFiles::INDICES), at as u64 * 4, &u32::MAX.to_le_bytes());
    let err = read(&path);
    assert!(err.contains(&format!("X/indices: row {row}: column index 4294967295 out of range")), "{err}");
    // Repeated (zeroed) indices.
    patch(&path.join(StoreFiles::INDICES), at as u64 * 4, &0u32.to_le_bytes());
    patch(&path.join(StoreFiles::INDICES), at as u64 * 4 + 4, &0u32.to_le_bytes());
    let err = read(&path);
    assert!(err.contains(&format!("X/indices: row {row}: column indices not strictly increasing")), "{err}");
    // A NaN or a negative value.
    let path = small_store(dir.path(), "t.store", Codec::Raw);
    patch(&path.join(StoreFiles::DATA), at as u64 * 4, &f32::NAN.to_le_bytes());
    let err = read(&path);
    assert!(err.contains(&format!("X/data: row {row}, column")) && err.contains("NaN is not finite"), "{err}");
    patch(&path.join(StoreFiles::DATA), at as u64 * 4, &(-2.0f32).to_le_bytes());
    let err = read(&path);
    assert!(err.contains("value -2 is negative"), "{err}");
    // verify finds it too, and export stops with the row rather than writing it.
    let o = run(&["verify", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let h5ad = dir.path().join("out.h5ad");
    let o = run(&["export", path.to_str().unwrap(), "--out", h5ad.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o.stderr).contains("is negative"), "{}", text(&o.stderr));
    assert!(!h5ad.exists());
}
