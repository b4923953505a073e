//! The store writer and reader: round trips, codecs, zero-copy access, atomic publish.

use cpa_stream::unstable::schemas::{BlockChecksum, Codec, Planes, StoreFiles};
use cpa_stream::unstable::stages::CsrBatch;
use cpa_stream::unstable::stages::store::{Store, StoreWriter, StoreWriterOptions, summarize_obs};
use proptest::prelude::*;

use crate::common::*;

fn read_all(store: &Store) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut cursor = store.cursor().unwrap();
    (0..store.n_obs())
        .map(|r| {
            let (i, d) = cursor.row(r).unwrap();
            (i.to_vec(), d.to_vec())
        })
        .collect()
}

#[test]
fn raw_and_zstd_stores_read_back_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let rows = sample_rows(1000, 37);
    for (name, codec) in [("raw.store", Codec::Raw), ("z.store", Codec::zstd_with(3, 64))] {
        let path = dir.path().join(name);
        let manifest = write_store(&path, &rows, 37, codec, 100);
        assert_eq!(manifest.n_obs, 1000);
        let store = Store::open(&path).unwrap();
        assert_eq!(read_all(&store), rows, "{name}");
        // Ranges and gathers agree with single rows.
        let mut cursor = store.cursor().unwrap();
        let mut batch = CsrBatch::new(37);
        cursor.read_range(10..75, &mut batch).unwrap();
        cursor.gather(&[999, 3, 3, 500], &mut batch).unwrap();
        assert_eq!(batch.n_rows(), 65 + 4);
        assert_eq!(batch.row(0), (&rows[10].0[..], &rows[10].1[..]));
        assert_eq!(batch.row(65), (&rows[999].0[..], &rows[999].1[..]));
        assert_eq!(batch.row(67), (&rows[3].0[..], &rows[3].1[..]));
        let report = store.verify().unwrap();
        assert_eq!(report.rows, 1000);
        // Zero-copy views only for raw.
        assert_eq!(store.raw_rows(0..10).is_some(), codec == Codec::Raw);
        store.release(0..500);
        assert_eq!(read_all(&store), rows, "{name} after release");
        let obs = summarize_obs(&store).unwrap();
        let cats = obs[1].categories.as_ref().unwrap();
        assert_eq!(cats.iter().map(|c| c.1).collect::<Vec<_>>(), vec![334, 333, 333]);
        assert_eq!(cats[2].0, "A+B");
    }
}

#[test]
fn zstd_stores_of_every_block_layout_read_back_exactly() {
    // Counts (16-bit planes where a block allows), with a block holding a count above 65,535 and
    // one holding a gap above 65,535, so that blocks of every header meet in one store; written
    // as now (narrow planes, an XXH3-64 after each frame) and as earlier versions did (zstd's
    // content checksums; wide planes before that).
    let n_vars = 70_000u32;
    let mut rows: Vec<(Vec<u32>, Vec<f32>)> =
        (0..300).map(|i| (vec![i % 50, 100 + i % 7], vec![(i % 9) as f32, 1.0 + (i % 3) as f32])).collect();
    rows[70] = (vec![3, 69_999], vec![2.0, 5.0]);
    rows[150] = (vec![4, 9], vec![70_000.0, 1.0]);
    rows[250] = (vec![5], vec![0.25]);
    let dir = tempfile::tempdir().unwrap();
    let earlier = |planes| Codec::Zstd { level: 3, block_rows: 64, planes, block_checksum: BlockChecksum::Content };
    let mut sizes = Vec::new();
    for (name, codec, expected) in [
        ("narrow.store", Codec::zstd_with(3, 64), "\"planes\": \"narrow\",\n    \"block_checksum\": \"xxh3-64\""),
        ("content.store", earlier(Planes::Narrow), "\"planes\": \"narrow\",\n    \"block_checksum\": \"content\""),
        ("wide.store", earlier(Planes::Wide), "\"planes\": \"wide\",\n    \"block_checksum\": \"content\""),
    ] {
        let path = dir.path().join(name);
        let manifest = write_store(&path, &rows, n_vars, codec, 100);
        let text = std::fs::read_to_string(path.join("manifest.json")).unwrap();
        assert!(text.contains(expected), "{text}");
        let store = Store::open(&path).unwrap();
        let back = read_all(&store);
        for (r, (got, want)) in back.iter().zip(&rows).enumerate() {
            assert_eq!(got.0, want.0, "{name} row {r}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.1), bits(&want.1), "{name} row {r}");
        }
        assert_eq!(store.verify().unwrap().rows, 300);
        sizes.push(manifest.files[StoreFiles::BLOCKS].bytes);
    }
    // Stores written before the fields existed: no "block_checksum" reads as content checksums,
    // no "planes" as wide planes.
    for (name, fields) in [
        ("content.store", ",\n    \"block_checksum\": \"content\""),
        ("wide.store", ",\n    \"planes\": \"wide\",\n    \"block_checksum\": \"content\""),
    ] {
        let path = dir.path().join(name);
        let manifest = std::fs::read_to_string(path.join("manifest.json")).unwrap();
        let old = manifest.replace(fields, "");
        assert!(!old.contains("block_checksum"), "{old}");
        std::fs::write(path.join("manifest.json"), old).unwrap();
        assert_eq!(
            read_all(&Store::open(&path).unwrap()),
            read_all(&Store::open(dir.path().join("narrow.store")).unwrap())
        );
    }
    // 8 bytes of checksum per block against zstd's 4, and narrow planes smaller than wide ones.
    let blocks = 300u64.div_ceil(64);
    assert_eq!(sizes[0], sizes[1] + 4 * blocks, "xxh3 blocks {} bytes, content {}", sizes[0], sizes[1]);
    assert!(sizes[1] < sizes[2], "narrow blocks {} bytes, wide {}", sizes[1], sizes[2]);
}

#[test]
fn store_is_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::zstd());
    let store = Store::open(&path).unwrap();
    let sums: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let store = &store;
                s.spawn(move || {
                    let mut c = store.cursor().unwrap();
                    (t..50).step_by(4).map(|r| c.row(r as u64).unwrap().1.iter().map(|&v| v as f64).sum::<f64>()).sum()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: f64 = read_all(&store).iter().flat_map(|r| r.1.iter()).map(|&v| v as f64).sum();
    assert!((sums.iter().sum::<f64>() - total).abs() < 1e-6);
}

#[test]
fn empty_store_and_empty_rows_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.store");
    let m = write_store(&path, &[], 5, Codec::Raw, 10);
    assert_eq!((m.n_obs, m.nnz), (0, 0));
    let store = Store::open(&path).unwrap();
    store.verify().unwrap();
    let zeros = vec![(vec![], vec![]); 3];
    let path = dir.path().join("zeros.store");
    write_store(&path, &zeros, 5, Codec::zstd(), 10);
    assert_eq!(read_all(&Store::open(&path).unwrap()), zeros);
}

#[test]
fn an_unfinished_writer_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("never.store");
    {
        let mut w = StoreWriter::create(&dest, &var_table(4), obs_schema(), StoreWriterOptions::default()).unwrap();
        let mut b = CsrBatch::new(4);
        b.push_row(&[1], &[1.0]);
        w.push_rows(&b, &obs_batch(0, 1)).unwrap();
        // Dropped without finish (an error elsewhere, a panic unwinding).
    }
    assert!(!dest.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temporary directory removed");
}

#[test]
fn writer_rejects_bad_rows_with_the_cell_named() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("bad.store");
    let mut w = StoreWriter::create(&dest, &var_table(4), obs_schema(), StoreWriterOptions::default()).unwrap();
    let mut b = CsrBatch::new(4);
    b.push_row(&[0], &[1.0]);
    w.push_rows(&b, &obs_batch(0, 1)).unwrap();
    b.clear();
    b.push_row(&[3, 2], &[1.0, 1.0]);
    let err = w.push_rows(&b, &obs_batch(1, 1)).unwrap_err().to_string();
    assert!(err.contains("starting at cell 1") && err.contains("not strictly increasing"), "{err}");
    let err = w.push_rows(&b, &obs_batch(1, 2)).unwrap_err().to_string();
    assert!(err.contains("2 obs rows for 1 matrix rows"), "{err}");
    let err = StoreWriter::create(&dest, &var_table(4), obs_schema(), StoreWriterOptions::default());
    assert!(err.is_err() || !dest.exists());
}

#[test]
fn existing_destination_needs_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::Raw);
    let err = StoreWriter::create(&path, &var_table(20), obs_schema(), StoreWriterOptions::default()).err().unwrap();
    assert!(err.to_string().contains("already exists"), "{err}");
    let options = StoreWriterOptions { overwrite: true, ..Default::default() };
    let mut w = StoreWriter::create(&path, &var_table(20), obs_schema(), options).unwrap();
    let mut b = CsrBatch::new(20);
    b.push_row(&[2], &[9.0]);
    w.push_rows(&b, &obs_batch(0, 1)).unwrap();
    w.finish().unwrap();
    assert_eq!(Store::open(&path).unwrap().n_obs(), 1);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "old store removed, no temporaries");
}

#[test]
fn manifest_records_sizes_and_checksums_of_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", Codec::zstd());
    let m = Store::open(&path).unwrap().manifest().clone();
    for name in [StoreFiles::INDPTR, StoreFiles::BLOCKS, StoreFiles::BLOCK_INDEX, StoreFiles::OBS, StoreFiles::VAR] {
        let f = &m.files[name];
        assert_eq!(f.bytes, std::fs::metadata(path.join(name)).unwrap().len(), "{name}");
    }
    assert!(!m.files.contains_key(StoreFiles::DATA));
}

fn arb_rows() -> impl Strategy<Value = (u32, Vec<Vec<(u32, f32)>>)> {
    (1u32..300).prop_flat_map(|n_vars| {
        let row = prop::collection::btree_map(0..n_vars, 0f32..1e6, 0..20usize)
            .prop_map(|m| m.into_iter().collect::<Vec<_>>());
        (Just(n_vars), prop::collection::vec(row, 0..120))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn any_rows_round_trip_through_both_codecs((n_vars, rows) in arb_rows(), block_rows in 1u32..40, chunk in 1usize..50) {
        let rows: Vec<(Vec<u32>, Vec<f32>)> = rows.into_iter().map(|r| r.into_iter().unzip()).collect();
        let dir = tempfile::tempdir().unwrap();
        for codec in [Codec::Raw, Codec::zstd_with(1, block_rows)] {
            let path = dir.path().join(codec.name());
            write_store(&path, &rows, n_vars, codec, chunk);
            let store = Store::open(&path).unwrap();
            prop_assert_eq!(read_all(&store), rows.clone());
            store.verify().unwrap();
        }
    }
}

#[test]
fn convert_shuffles_cells_with_their_obs_rows() {
    use arrow_array::types::Int32Type;
    use arrow_array::{Array, DictionaryArray, StringArray};
    use cpa_stream::unstable::schemas::tables::CELL_ID;
    use cpa_stream::unstable::stages::store::read_small_table;

    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let ok = |args: &[&str]| {
        let done = run(args);
        assert!(done.status.success(), "{args:?}: {}", text(&done.stderr));
        text(&done.stderr)
    };
    // About 12 MB of cells.
    ok(&[
        "synth",
        "--cells",
        "20000",
        "--genes",
        "500",
        "--perturbations",
        "4",
        "--combinations",
        "1",
        "--seed",
        "2",
        "--out",
        &path("orig.store"),
    ]);
    ok(&["convert", &path("orig.store"), "--codec", "zstd", "--out", &path("orig-z.store")]);
    // Buckets of 1 MiB: a dozen scratch files.
    let shuffle = |from: &str, seed: &str, name: &str| {
        ok(&["convert", &path(from), "--out", &path(name), "--shuffle", seed, "--shuffle-memory-mib", "1"]);
    };
    shuffle("orig.store", "7", "a.store");
    shuffle("orig.store", "7", "again.store");
    shuffle("orig.store", "8", "other.store");
    shuffle("orig-z.store", "7", "from-zstd.store");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("shuffle"))
        .collect();
    assert!(leftovers.is_empty(), "scratch files left: {leftovers:?}");

    let table = |name: &str| read_small_table(&dir.path().join(name).join(StoreFiles::OBS)).unwrap();
    let (orig_obs, obs) = (table("orig.store"), table("a.store"));
    let strings = |t: &arrow_array::RecordBatch, column: &str| -> Vec<String> {
        let c = t.column_by_name(column).unwrap();
        if let Some(s) = c.as_any().downcast_ref::<StringArray>() {
            return (0..s.len()).map(|i| s.value(i).to_owned()).collect();
        }
        let d = c.as_any().downcast_ref::<DictionaryArray<Int32Type>>().unwrap();
        let names = d.values().as_any().downcast_ref::<StringArray>().unwrap();
        (0..d.len()).map(|i| names.value(d.keys().value(i) as usize).to_owned()).collect()
    };
    let position: std::collections::HashMap<String, usize> =
        strings(&orig_obs, CELL_ID).into_iter().enumerate().map(|(i, id)| (id, i)).collect();
    let (orig, store) =
        (Store::open(dir.path().join("orig.store")).unwrap(), Store::open(dir.path().join("a.store")).unwrap());
    assert_eq!(store.n_obs(), 20_000);
    assert_eq!(store.nnz(), orig.nnz());
    store.verify().unwrap();
    let (ids, conditions, orig_conditions) =
        (strings(&obs, CELL_ID), strings(&obs, "condition"), strings(&orig_obs, "condition"));
    let (mut a, mut b) = (orig.cursor().unwrap(), store.cursor().unwrap());
    let mut seen = vec![false; 20_000];
    let mut moved = 0;
    for r in 0..20_000usize {
        // Each cell keeps its own matrix row and obs row.
        let cell = position[&ids[r]];
        assert!(!std::mem::replace(&mut seen[cell], true), "cell {cell} written twice");
        let want = a.row(cell as u64).map(|(i, d)| (i.to_vec(), d.to_vec())).unwrap();
        let got = b.row(r as u64).map(|(i, d)| (i.to_vec(), d.to_vec())).unwrap();
        assert_eq!(got, want, "row {r} (cell {cell})");
        assert_eq!(conditions[r], orig_conditions[cell], "row {r}");
        moved += usize::from(cell != r);
    }
    assert!(moved > 19_000, "only {moved} of 20,000 cells moved");
    // The same seed writes the same store, from either codec; another seed another order.
    let x = |name: &str| Store::open(dir.path().join(name)).unwrap().manifest().files["X/indices"].checksum.clone();
    assert_eq!(x("a.store"), x("again.store"));
    assert_eq!(x("a.store"), x("from-zstd.store"));
    assert_ne!(x("a.store"), x("other.store"));
}

/// A store with bytes of one file changed at random: opening it, reading every row (both
/// codecs) and verifying it give values or errors, never a panic (the fuzz target "store open
/// and row gather", run as a property test).
fn damaged_store_never_panics(codec: Codec, file: &str, edits: &[(usize, u8)]) {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path(), "s.store", codec);
    let target = path.join(file);
    let mut bytes = std::fs::read(&target).unwrap();
    if bytes.is_empty() {
        return;
    }
    for &(at, value) in edits {
        let at = at % bytes.len();
        bytes[at] = value;
    }
    std::fs::write(&target, &bytes).unwrap();
    let Ok(store) = Store::open(&path) else { return };
    if let Ok(mut cursor) = store.cursor() {
        let mut out = CsrBatch::new(store.n_vars() as u32);
        let _ = cursor.read_range(0..store.n_obs(), &mut out);
        let rows: Vec<u64> = (0..store.n_obs()).rev().collect();
        let _ = cursor.gather(&rows, &mut out);
    }
    let _ = store.verify();
    let _ = summarize_obs(&store);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn damaged_stores_give_errors_not_panics(
        zstd in any::<bool>(),
        which in 0usize..6,
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let codec = if zstd { Codec::zstd() } else { Codec::Raw };
        let files = if zstd {
            [StoreFiles::INDPTR, StoreFiles::BLOCKS, StoreFiles::BLOCK_INDEX, StoreFiles::OBS, StoreFiles::VAR, "manifest.json"]
        } else {
            [StoreFiles::INDPTR, StoreFiles::INDICES, StoreFiles::DATA, StoreFiles::OBS, StoreFiles::VAR, "manifest.json"]
        };
        damaged_store_never_panics(codec, files[which], &edits);
    }
}
