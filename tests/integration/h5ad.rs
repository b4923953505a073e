//! `.h5ad` import and export against the real anndata package.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use arrow_array::Array;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, UInt32Type};
use arrow_schema::DataType;
use cpa_stream::RunContext;
use cpa_stream::export::ExportOptions;
use cpa_stream::import::{GeneJoin, ImportOptions, ImportReport};
use cpa_stream::unstable::schemas::StoreFiles;
use cpa_stream::unstable::schemas::tables::categories_of;
use cpa_stream::unstable::stages::h5ad::{DEG_FILE, H5adCompression};
use cpa_stream::unstable::stages::store::{Store, read_table, table_schema};
use serde_json::Value;

use crate::common::*;

/// The Python of the project's cache (anndata, h5py), from scripts/bootstrap.sh.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CPA_STREAM_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("CPA_STREAM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/cpa-stream"));
    let p = cache.join("venv/bin/python");
    assert!(p.exists(), "no Python with anndata at {}: run the tests through scripts/test.sh", p.display());
    p
}

fn script() -> PathBuf {
    repo_root().join("tests/fixtures/h5ad_fixtures.py")
}

/// Fixtures made by anndata itself, once per version of the script and of the Python packages
/// ([`python_fixtures`]); the tests only read them and write their outputs elsewhere.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| python_fixtures("h5ad", &script()))
}

/// What anndata reads from `file`.
fn anndata_summary(file: &Path, layer: Option<&str>) -> Value {
    summarize(file, layer.map(|l| vec!["--layer", l]).unwrap_or_default())
}

fn summarize(file: &Path, args: Vec<&str>) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(script()).arg("summarize").arg(file).args(args);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "summarize {}: {}", file.display(), text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn import(input: &Path, out: &Path, options: ImportOptions) -> cpa_stream::Manifest {
    import_file(input, out, &options).unwrap_or_else(|e| panic!("import {}: {e}", input.display())).manifest
}

/// `options` with `input` and `out`, run.
fn import_file(input: &Path, out: &Path, options: &ImportOptions) -> cpa_stream::Result<ImportReport> {
    let options = ImportOptions { inputs: vec![input.to_owned()], out: out.to_owned(), ..options.clone() };
    cpa_stream::import::run(&options, &RunContext::default())
}

/// The store at `store` exported to `out` with `compression`.
fn export(store: &Path, out: &Path, compression: H5adCompression) -> cpa_stream::Result<()> {
    let options = ExportOptions { compression, ..ExportOptions::new(store, out) };
    cpa_stream::export::run(&options, &RunContext::default()).map(|_| ())
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1.0)
}

/// Compares a store with anndata's summary of the file it came from.
fn assert_store_matches(store_path: &Path, expected: &Value, rel: f64) {
    let store = Store::open(store_path).unwrap();
    let shape = [store.n_obs(), store.n_vars()];
    assert_eq!(expected["shape"], serde_json::json!(shape), "shape");
    let mut cursor = store.cursor().unwrap();
    let (mut nnz, mut sum) = (0u64, 0f64);
    let mut row_sums = Vec::new();
    for r in 0..store.n_obs() {
        let (idx, val) = cursor.row(r).unwrap();
        nnz += val.iter().filter(|&&v| v != 0.0).count() as u64;
        let s: f64 = val.iter().map(|&v| f64::from(v)).sum();
        sum += s;
        row_sums.push(s);
        if r < 5 {
            let want = expected["rows"][r as usize].as_array().unwrap();
            assert_eq!(want.len(), idx.len(), "row {r}");
            for (k, pair) in want.iter().enumerate() {
                assert_eq!(pair[0].as_u64().unwrap(), u64::from(idx[k]), "row {r} entry {k}");
                assert!(close(pair[1].as_f64().unwrap(), f64::from(val[k]), rel), "row {r} entry {k}");
            }
        }
    }
    assert_eq!(expected["nnz"].as_u64().unwrap(), nnz, "nnz");
    assert!(close(expected["sum"].as_f64().unwrap(), sum, rel), "sum {sum} vs {}", expected["sum"]);
    for (r, want) in expected["row_sums"].as_array().unwrap().iter().enumerate() {
        assert!(close(want.as_f64().unwrap(), row_sums[r], rel), "row {r} sum");
    }
    // obs: index, values (first rows) and categories, in order.
    let schema = table_schema(&store.file_path(StoreFiles::OBS)).unwrap();
    let first = read_table(&store.file_path(StoreFiles::OBS)).unwrap().next().unwrap().unwrap();
    let n = expected["obs_index"].as_array().unwrap().len();
    let ids: Vec<&str> = (0..n).map(|i| first.column(0).as_string::<i32>().value(i)).collect();
    assert_eq!(serde_json::json!(ids), expected["obs_index"]);
    for (name, want) in expected["obs"].as_object().unwrap() {
        let field = schema.field_with_name(name).unwrap_or_else(|_| panic!("obs column {name} missing"));
        let col = first.column_by_name(name).unwrap();
        if let Some(cats) = want["categories"].as_array() {
            let got = categories_of(field).unwrap_or_else(|| panic!("{name} is not categorical"));
            assert_eq!(serde_json::json!(got), Value::Array(cats.clone()), "{name} categories");
        }
        for (i, v) in want["values"].as_array().unwrap().iter().enumerate() {
            let got: Value = if col.is_null(i) {
                Value::Null
            } else {
                match col.data_type() {
                    DataType::Dictionary(_, _) => {
                        let d = col.as_dictionary::<arrow_array::types::Int32Type>();
                        let values = d.values().as_string::<i32>();
                        Value::from(values.value(d.keys().value(i) as usize))
                    }
                    DataType::Utf8 => Value::from(col.as_string::<i32>().value(i)),
                    DataType::Int64 => Value::from(col.as_primitive::<Int64Type>().value(i)),
                    DataType::UInt64 => Value::from(col.as_primitive::<arrow_array::types::UInt64Type>().value(i)),
                    DataType::Float64 => Value::from(col.as_primitive::<Float64Type>().value(i)),
                    DataType::Boolean => Value::from(col.as_boolean().value(i)),
                    t => panic!("{name}: unexpected type {t}"),
                }
            };
            match (v.as_f64(), got.as_f64()) {
                (Some(a), Some(b)) if !v.is_i64() => assert!(close(a, b, 1e-12), "{name}[{i}]: {got} vs {v}"),
                _ => assert_eq!(&got, v, "{name}[{i}]"),
            }
        }
    }
    // var index.
    let var = read_table(&store.file_path(StoreFiles::VAR)).unwrap().next().unwrap().unwrap();
    let genes: Vec<&str> = (0..var.num_rows()).map(|i| var.column(0).as_string::<i32>().value(i)).collect();
    assert_eq!(serde_json::json!(genes), expected["var_index"]);
}

#[test]
fn every_encoding_imports_as_anndata_reads_it() {
    let dir = fixtures();
    let scratch = tempfile::tempdir().unwrap();
    let work = scratch.path();
    for (name, rel) in [
        ("csr_f32", 1e-9),
        ("csr_f64_i64_gzip", 1e-6),
        ("csc_lzf", 1e-9),
        ("csc", 1e-9),
        ("dense_i32", 1e-9),
        ("csr_u16", 1e-9),
    ] {
        let file = dir.join(format!("{name}.h5ad"));
        let out = work.join(format!("{name}.store"));
        import(&file, &out, ImportOptions::default());
        assert_store_matches(&out, &anndata_summary(&file, None), rel);
        Store::open(&out).unwrap().verify().unwrap();
    }
}

#[test]
fn layers_degs_chunks_and_csc_buckets() {
    let dir = fixtures();
    let scratch = tempfile::tempdir().unwrap();
    let work = scratch.path();
    let file = dir.join("csr_f32.h5ad");
    let out = work.join("layer.store");
    import(&file, &out, ImportOptions { layer: Some("counts".into()), chunk_rows: 7, ..Default::default() });
    assert_store_matches(&out, &anndata_summary(&file, Some("counts")), 1e-9);

    // DEG lists from uns, in rank order.
    let degs = read_table(&out.join(DEG_FILE)).unwrap().next().unwrap().unwrap();
    let group = degs.column(0).as_string::<i32>();
    let rank = degs.column(1).as_primitive::<UInt32Type>();
    let gene = degs.column(2).as_string::<i32>();
    let rows: Vec<(String, u32, String)> =
        (0..degs.num_rows()).map(|i| (group.value(i).into(), rank.value(i), gene.value(i).into())).collect();
    assert_eq!(rows.len(), 5);
    assert!(rows.contains(&("A".into(), 0, "GENE005".into())));
    assert!(rows.contains(&("B+A".into(), 1, "GENE009".into())));
    assert_eq!(table_schema(&out.join(DEG_FILE)).unwrap().metadata()["uns_key"], "rank_genes_groups_cov");

    // CSC through many tiny buckets, in groups of 7 open at once, equals CSR.
    let csr = work.join("ref.store");
    let csc = work.join("buckets.store");
    let a = import(&file, &csr, ImportOptions::default());
    let b = import(
        &dir.join("csc.h5ad"),
        &csc,
        ImportOptions { memory_budget: 120, chunk_rows: 5, max_open_buckets: 7, ..Default::default() },
    );
    for f in [StoreFiles::INDPTR, StoreFiles::INDICES, StoreFiles::DATA] {
        assert_eq!(a.files[f], b.files[f], "{f}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(work)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".import-"))
        .collect();
    assert!(leftovers.is_empty(), "transposition buckets left behind");
}

#[test]
fn scanpy_rank_genes_groups_becomes_the_deg_table() {
    let dir = fixtures();
    let scratch = tempfile::tempdir().unwrap();
    let work = scratch.path();
    let out = work.join("rgg.store");
    import(&dir.join("csr_rgg.h5ad"), &out, ImportOptions::default());
    let degs = read_table(&out.join(DEG_FILE)).unwrap().next().unwrap().unwrap();
    let group = degs.column(0).as_string::<i32>();
    let rank = degs.column(1).as_primitive::<UInt32Type>();
    let gene = degs.column(2).as_string::<i32>();
    let score = degs.column(3).as_primitive::<Float64Type>();
    let rows: Vec<(String, u32, String, f64)> = (0..degs.num_rows())
        .map(|i| (group.value(i).into(), rank.value(i), gene.value(i).into(), score.value(i)))
        .collect();
    let want = [
        ("A", 0, "GENE005", 9.5),
        ("A", 1, "GENE001", 4.25),
        ("A", 2, "GENE007", -1.0),
        ("B+A", 0, "GENE002", 3.0),
        ("B+A", 1, "GENE009", 2.5),
        ("B+A", 2, "GENE000", 0.125),
    ];
    let want: Vec<(String, u32, String, f64)> = want.iter().map(|w| (w.0.into(), w.1, w.2.into(), w.3)).collect();
    assert_eq!(rows, want);
    assert_eq!(table_schema(&out.join(DEG_FILE)).unwrap().metadata()["uns_key"], "rank_genes_groups");
    // scanpy's p-values and adjusted p-values beside the scores.
    let (p, q) = (degs.column(4).as_primitive::<Float64Type>(), degs.column(5).as_primitive::<Float64Type>());
    assert_eq!((p.value(0), q.value(0)), (1e-6, 3e-6));
    assert_eq!((p.value(5), q.value(5)), (0.9, 0.9));

    // Named: the same entry; an absent one is an error naming what uns holds, never a silent
    // fall-back to another entry or to none.
    let named = work.join("rgg-named.store");
    let options = |key: &str| ImportOptions { deg_uns_key: Some(key.into()), ..Default::default() };
    import(&dir.join("csr_rgg.h5ad"), &named, options("rank_genes_groups"));
    assert_eq!(table_schema(&named.join(DEG_FILE)).unwrap().metadata()["uns_key"], "rank_genes_groups");
    let absent = work.join("rgg-absent.store");
    let err = import_file(&dir.join("csr_rgg.h5ad"), &absent, &options("rank_genes_groups_cov"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("no uns/rank_genes_groups_cov") && err.contains("rank_genes_groups"), "{err}");
    assert!(!absent.exists(), "a failed import leaves no store");
}

#[test]
fn gene_subset_keeps_the_given_order() {
    let dir = fixtures();
    let scratch = tempfile::tempdir().unwrap();
    let work = scratch.path();
    let file = dir.join("csc.h5ad");
    let (full, sub) = (work.join("genes-full.store"), work.join("genes-sub.store"));
    import(&file, &full, ImportOptions::default());
    let genes = ["GENE010", "GENE002", "GENE039"];
    import(
        &file,
        &sub,
        ImportOptions { join: GeneJoin::List(genes.iter().map(|s| s.to_string()).collect()), ..Default::default() },
    );
    let (full, sub) = (Store::open(&full).unwrap(), Store::open(&sub).unwrap());
    assert_eq!(sub.n_vars(), 3);
    let (mut fc, mut sc) = (full.cursor().unwrap(), sub.cursor().unwrap());
    for r in 0..full.n_obs() {
        let (fi, fv) = fc.row(r).unwrap();
        let dense: HashMap<u32, f32> = fi.iter().copied().zip(fv.iter().copied()).collect();
        let want: Vec<(u32, f32)> =
            [10u32, 2, 39].iter().enumerate().filter_map(|(k, g)| dense.get(g).map(|&v| (k as u32, v))).collect();
        let (si, sv) = sc.row(r).unwrap();
        let got: Vec<(u32, f32)> = si.iter().copied().zip(sv.iter().copied()).collect();
        assert_eq!(got, want, "row {r}");
    }
    let var = read_table(&sub.file_path(StoreFiles::VAR)).unwrap().next().unwrap().unwrap();
    assert_eq!(var.column(0).as_string::<i32>().iter().flatten().collect::<Vec<_>>(), genes);

    let bad = import_file(
        &file,
        &work.join("never.store"),
        &ImportOptions { join: GeneJoin::List(vec!["NOPE".into()]), ..Default::default() },
    );
    assert!(bad.unwrap_err().to_string().contains("not in the genes of"));
    assert!(!work.join("never.store").exists());
}

#[test]
fn bad_files_give_named_errors_and_no_store() {
    let dir = fixtures();
    let scratch = tempfile::tempdir().unwrap();
    let work = scratch.path();
    for (name, layer, expected) in [
        ("bad_not_hdf5", None, "not an HDF5 file"),
        ("bad_not_anndata", None, "not an AnnData file"),
        ("bad_encoding", None, "encoding-type \"awkward-array\""),
        ("bad_shape", None, "X columns is 41, expected 40"),
        ("bad_obs_length", None, "is 120, expected 100"),
        ("bad_negative", None, "value -1.5 is negative"),
        ("bad_nan", None, "value NaN is not finite"),
        ("bad_indptr_start", None, "X/indptr[0] = 1: expected 0"),
        ("csr_f32", Some("nope"), "no layer \"nope\"; layers: counts"),
        ("missing", None, "No such file"),
    ] {
        let file = dir.join(format!("{name}.h5ad"));
        let out = work.join(format!("{name}-{}.store", layer.unwrap_or("x")));
        let options = ImportOptions { layer: layer.map(str::to_owned), ..Default::default() };
        let err = import_file(&file, &out, &options).err().unwrap_or_else(|| panic!("{name} imported")).to_string();
        assert!(err.contains(expected) && err.contains(&*file.to_string_lossy()), "{name}: {err}");
        assert!(!out.exists(), "{name}: a partial store was left");
    }
    // Found by `scripts/fuzz.sh h5ad`: damaged metadata makes the HDF5 library ask for an absurd
    // buffer; the import ends with the library's error naming the element, never a crash (since
    // every link is checked before reading, the damaged group's listing is what fails first).
    let damaged = repo_root().join("tests/fixtures/damaged/h5ad-huge-allocation.h5ad");
    let out_store = work.join("damaged.store");
    let err = import_file(&damaged, &out_store, &ImportOptions::default())
        .err()
        .unwrap_or_else(|| panic!("the damaged file imported"))
        .to_string();
    let named = err.contains("memory allocation failed") || err.contains("/var: listing its members");
    assert!(named && err.contains("h5ad-huge-allocation.h5ad"), "{err}");
    assert!(!out_store.exists());
    let out = run(&[
        "import",
        dir.join("bad_shape.h5ad").to_str().unwrap(),
        "--out",
        work.join("cli.store").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches("X columns is 41").count(), 1, "{stderr}");
}

/// The writer takes no HDF5 file lock: a child process started while a `.h5ad` is written (by
/// another test thread here, by any program embedding the library) inherits HDF5's descriptor,
/// and with a lock on it would keep the published file locked until it exits, failing readers
/// that ask for the lock (h5py's). A lock HDF5 held would make this `try_lock` fail.
#[test]
fn an_h5ad_being_written_holds_no_hdf5_lock_for_a_child_to_inherit() {
    use cpa_stream::unstable::stages::h5ad::H5adWriter;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out.h5ad");
    let writer = H5adWriter::create(&dest, &var_table(10), &obs_schema(), 0, H5adCompression::Lzf, false).unwrap();
    let temporary: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".out.h5ad.tmp-")))
        .collect();
    assert_eq!(temporary.len(), 1, "the file being written: {temporary:?}");
    let file = std::fs::File::open(&temporary[0]).unwrap();
    assert!(file.try_lock().is_ok(), "HDF5 holds a lock on {}", temporary[0].display());
    drop(writer);
}

#[test]
fn real_data_imports_exports_and_round_trips() {
    let real = bundled_data();
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("real.store");
    let m1 = import(&real, &first, ImportOptions::default());
    let expected = anndata_summary(&real, None);
    assert_store_matches(&first, &expected, 1e-9);
    assert_eq!(m1.nnz, 211_790);

    // Export, read with anndata: identical values.
    let exported = dir.path().join("real.h5ad");
    export(&first, &exported, H5adCompression::Gzip(4)).unwrap();
    let mut again = anndata_summary(&exported, None);
    let mut want = expected.clone();
    // The exported file has the store's obs columns; compare everything anndata reports.
    again["uns_degs"] = Value::Null;
    want["uns_degs"] = Value::Null;
    assert_eq!(again, want);

    // Re-import: the same matrix and obs, byte for byte.
    let second = dir.path().join("again.store");
    let m2 = import(&exported, &second, ImportOptions::default());
    for f in [StoreFiles::INDPTR, StoreFiles::INDICES, StoreFiles::DATA] {
        assert_eq!(m1.files[f], m2.files[f], "{f}");
    }
    let a: Vec<_> = read_table(&first.join(StoreFiles::OBS)).unwrap().map(|b| b.unwrap()).collect();
    let b: Vec<_> = read_table(&second.join(StoreFiles::OBS)).unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(a, b);
}

#[test]
fn export_round_trips_every_column_kind_and_degs() {
    let dir = fixtures();
    let scratch = tempfile::tempdir().unwrap();
    let work = scratch.path();
    let file = dir.join("csr_f32.h5ad");
    let store = work.join("rt.store");
    import(&file, &store, ImportOptions::default());
    let exported = work.join("rt.h5ad");
    export(&store, &exported, H5adCompression::Lzf).unwrap();
    let original = anndata_summary(&file, None);
    let round = anndata_summary(&exported, None);
    for key in ["shape", "nnz", "sum", "row_sums", "rows", "obs_index", "obs", "var_index", "uns_degs"] {
        assert_eq!(round[key], original[key], "{key}");
    }
    assert_eq!(round["var_columns"], original["var_columns"]);
    // Exporting over an existing file needs overwrite.
    let err = export(&store, &exported, H5adCompression::None).unwrap_err();
    assert!(err.to_string().contains("already exists"));
}

/// anndata's own archived files (`tests/fixtures/anndata-archives`, see its README): the 0.7
/// layout (categories behind an object reference) imports as anndata reads it; the layouts this
/// build does not read give an error naming them.
#[test]
fn files_of_every_anndata_version_import_as_anndata_reads_them_or_name_their_layout() {
    let archives = anndata_archives();
    let dir = tempfile::tempdir().unwrap();
    for version in ["v0.7.0", "v0.7.8"] {
        let file = archives.join(version).join("adata.h5ad");
        let out = dir.path().join(format!("{version}.store"));
        import(&file, &out, ImportOptions::default());
        let expected = anndata_summary(&file, None);
        assert_store_matches(&out, &expected, 1e-9);
        let schema = table_schema(&out.join(StoreFiles::OBS)).unwrap();
        for column in ["obs_cat", "cat_ordered"] {
            let field = schema.field_with_name(column).unwrap();
            assert!(matches!(field.data_type(), DataType::Dictionary(..)), "{version} {column}");
            assert!(categories_of(field).is_some_and(|c| c.len() > 10), "{version} {column}: categories lost");
        }
    }
    // anndata <= 0.6: record-array obs/var, categories in uns, an h5sparse raw.X. Its X is
    // scaled (negative values), so the error names the counts in adata.raw; --use-raw imports
    // them with raw.var's genes, as anndata reads adata.raw.
    let file = archives.join("v0.5.0/adata.h5ad");
    let out = dir.path().join("v0.5.0-raw.store");
    import(&file, &out, ImportOptions { use_raw: true, ..Default::default() });
    let expected = summarize(&file, vec!["--raw", "--rows", "700"]);
    assert_store_matches(&out, &expected, 1e-6);
    let schema = table_schema(&out.join(StoreFiles::OBS)).unwrap();
    for (column, n) in [("bulk_labels", 10), ("phase", 3), ("louvain", 11)] {
        let field = schema.field_with_name(column).unwrap();
        assert_eq!(categories_of(field).map(|c| c.len()), Some(n), "v0.5.0 {column}");
    }
    assert_eq!(schema.field_with_name("n_genes").unwrap().data_type(), &DataType::Int64);
    for (version, expected) in [("v0.5.0", "value -0.326 is negative"), ("v0.11.4", "no X matrix")] {
        let file = archives.join(version).join("adata.h5ad");
        let out = dir.path().join(format!("{version}.store"));
        let err = import_file(&file, &out, &ImportOptions::default()).unwrap_err().to_string();
        assert!(err.contains(expected), "{version}: {err}");
        assert!(version != "v0.5.0" || err.contains("--use-raw"), "{err}");
        assert!(!out.exists());
    }
}

/// A file in the anndata <= 0.6 layout made by hand (h5sparse X, record-array obs and var,
/// categories in uns, fixed-length strings): imported as current anndata reads it, including
/// the categorical whose codes exceed its categories (anndata keeps integers) and missing codes.
#[test]
fn the_anndata_06_layout_imports_as_anndata_reads_it() {
    let file = fixtures().join("legacy_v06_csr.h5ad");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("legacy.store");
    let manifest = import(&file, &out, ImportOptions::default());
    let expected = summarize(&file, vec!["--rows", "120"]);
    assert_store_matches(&out, &expected, 1e-6);
    let schema = table_schema(&out.join(StoreFiles::OBS)).unwrap();
    assert!(categories_of(schema.field_with_name("condition").unwrap()).is_some());
    assert_eq!(schema.field_with_name("cluster").unwrap().data_type(), &DataType::Int64);
    assert_eq!(schema.field_with_name("is_doublet").unwrap().data_type(), &DataType::Boolean);
    let var = table_schema(&out.join(StoreFiles::VAR)).unwrap();
    assert_eq!(var.field_with_name("symbol").unwrap().data_type(), &DataType::Utf8);
    assert_eq!(var.field_with_name("highly_variable").unwrap().data_type(), &DataType::Boolean);
    // scanpy's DEG record array with fixed-length strings.
    let degs: Vec<_> = read_table(&out.join(DEG_FILE)).unwrap().map(|b| b.unwrap()).collect();
    let genes: Vec<&str> = degs.iter().flat_map(|b| b.column(2).as_string::<i32>().iter().flatten()).collect();
    assert_eq!(genes, ["GENE004", "GENE002", "GENE011", "GENE007", "GENE001", "GENE000"]);
    assert_eq!(manifest.n_obs, 120);
    // No adata.raw in this file: a clear error.
    let err = import_file(&file, &dir.path().join("raw.store"), &ImportOptions { use_raw: true, ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(err.contains("no raw matrix"), "{err}");
}
