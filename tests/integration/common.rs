//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use arrow_array::{ArrayRef, DictionaryArray, Int32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use cpa_stream::unstable::schemas::Codec;
use cpa_stream::unstable::schemas::tables::{CELL_ID, GENE_ID, categorical_field};
use cpa_stream::unstable::stages::CsrBatch;
use cpa_stream::unstable::stages::store::{StoreWriter, StoreWriterOptions};

/// The repository root. Cargo sets `CARGO_MANIFEST_DIR` when it runs a test, so the checkout
/// being tested wins over the path compiled in (a build cache shared by checkouts at other paths
/// can hold a binary compiled elsewhere).
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// The bundled real data (examples/data, with its provenance): every test reads files inside the
/// repository only, so that a fresh clone with nothing beside it passes.
pub fn bundled_data() -> PathBuf {
    repo_root().join("examples/data/perturbench_devel_cpa.h5ad")
}

/// anndata's own archived `.h5ad` files, one folder per version (tests/fixtures/anndata-archives).
pub fn anndata_archives() -> PathBuf {
    repo_root().join("tests/fixtures/anndata-archives")
}

/// Path of the built `cpa-stream` binary (the front).
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cpa-stream"))
}

/// Path of the built `cpa-stream-engine` binary (the model commands, with libtorch).
pub fn engine_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cpa-stream-engine"))
}

/// Runs the binary with `args` and no `LD_LIBRARY_PATH` (the rpath must suffice).
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env("CPA_STREAM_LOG", "warn")
        .output()
        .expect("the cpa-stream binary runs")
}

/// The Python of the project's cache (anndata, h5py, duckdb, pyarrow), from scripts/bootstrap.sh.
pub fn python() -> PathBuf {
    std::env::var("CPA_STREAM_PYTHON").map(PathBuf::from).unwrap_or_else(|_| {
        let cache = std::env::var("CPA_STREAM_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/cpa-stream"));
        cache.join("venv/bin/python")
    })
}

/// The files a fixture script makes with the real anndata and zarr (`python SCRIPT make FILES
/// OUTSIDE`): made once for each content of the script and version of the Python packages that
/// write them, and kept under the target directory (`CARGO_TARGET_TMPDIR/fixtures/NAME-KEY`), so
/// that later runs of the tests reuse them (the zarr fixtures take half a minute of zarr's own
/// writing). Made in a temporary sibling and renamed into place: a run finds them whole or makes
/// them. OUTSIDE (`NAME-KEY-outside`) stays where the script made it, since the files may link to
/// it. Returns FILES; the tests only read them.
pub fn python_fixtures(name: &str, script: &Path) -> PathBuf {
    use std::hash::{Hash, Hasher};

    let source = std::fs::read(script).unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    let probe = "import importlib.metadata as m\n\
        def v(p):\n    try:\n        return m.version(p)\n    except m.PackageNotFoundError:\n        return '-'\n\
        print(*(v(p) for p in ('anndata', 'zarr', 'numcodecs', 'h5py', 'numpy', 'scipy', 'pandas')))";
    let versions = Command::new(python()).arg("-c").arg(probe).output();
    let versions = versions.unwrap_or_else(|e| panic!("{}: {e}", python().display()));
    assert!(versions.status.success(), "the Python packages' versions: {}", text(&versions.stderr));
    let mut hasher = std::hash::DefaultHasher::new();
    (source, python(), versions.stdout).hash(&mut hasher);
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    let key = format!("{name}-{:016x}", hasher.finish());
    let root = base.join(&key);
    if root.join("files").is_dir() {
        return root.join("files");
    }
    let outside = base.join(format!("{key}-outside"));
    let making = base.join(format!("{key}.making-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&making);
    std::fs::create_dir_all(&making).unwrap_or_else(|e| panic!("{}: {e}", making.display()));
    let out = Command::new(python()).arg(script).arg("make").arg(making.join("files")).arg(&outside).output();
    let out = out.unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(out.status.success(), "fixture script {} failed: {}", script.display(), text(&out.stderr));
    // Another test process may have made them meanwhile: then its copy is kept and ours removed.
    if std::fs::rename(&making, &root).is_err() {
        let _ = std::fs::remove_dir_all(&making);
        assert!(root.join("files").is_dir(), "{}: neither made nor found", root.display());
    }
    root.join("files")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub const CONDITIONS: [&str; 3] = ["control", "A", "A+B"];

pub fn obs_schema() -> SchemaRef {
    let cats: Vec<String> = CONDITIONS.iter().map(|s| s.to_string()).collect();
    Arc::new(Schema::new(vec![
        Field::new(CELL_ID, DataType::Utf8, false),
        categorical_field("condition", &cats, false),
    ]))
}

pub fn var_table(n_vars: u32) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![Field::new(GENE_ID, DataType::Utf8, false)]));
    let ids = StringArray::from_iter_values((0..n_vars).map(|g| format!("g{g}")));
    RecordBatch::try_new(schema, vec![Arc::new(ids)]).unwrap()
}

/// obs rows for cells `start..start + n`, condition `i % 3`.
pub fn obs_batch(start: usize, n: usize) -> RecordBatch {
    let ids = StringArray::from_iter_values((start..start + n).map(|i| format!("cell{i}")));
    let values: ArrayRef = Arc::new(StringArray::from_iter_values(CONDITIONS));
    let keys = Int32Array::from_iter_values((start..start + n).map(|i| (i % 3) as i32));
    let dict = DictionaryArray::try_new(keys, values).unwrap();
    RecordBatch::try_new(obs_schema(), vec![Arc::new(ids), Arc::new(dict)]).unwrap()
}

/// Rows as (indices, values) pairs; row `i` has entries at `(i * 7 + k * 3) % n_vars`.
pub fn sample_rows(n_rows: usize, n_vars: u32) -> Vec<(Vec<u32>, Vec<f32>)> {
    (0..n_rows)
        .map(|i| {
            let mut idx: Vec<u32> = (0..(i % 5)).map(|k| ((i * 7 + k * 3) as u32) % n_vars).collect();
            idx.sort_unstable();
            idx.dedup();
            let vals = idx.iter().map(|&c| (c as f32) + 0.5 + i as f32).collect();
            (idx, vals)
        })
        .collect()
}

/// Writes `rows` to a store at `dir` in chunks of `chunk` rows.
pub fn write_store(
    dir: &Path,
    rows: &[(Vec<u32>, Vec<f32>)],
    n_vars: u32,
    codec: Codec,
    chunk: usize,
) -> cpa_stream::unstable::schemas::Manifest {
    let options = StoreWriterOptions { codec, ..Default::default() };
    let mut writer = StoreWriter::create(dir, &var_table(n_vars), obs_schema(), options).unwrap();
    for (c, part) in rows.chunks(chunk.max(1)).enumerate() {
        let mut batch = CsrBatch::new(n_vars);
        for (i, v) in part {
            batch.push_row(i, v);
        }
        writer.push_rows(&batch, &obs_batch(c * chunk, part.len())).unwrap();
    }
    writer.finish().unwrap()
}

/// A small valid raw store (50 cells x 20 genes) at `dir/name`.
pub fn small_store(dir: &Path, name: &str, codec: Codec) -> PathBuf {
    let path = dir.join(name);
    write_store(&path, &sample_rows(50, 20), 20, codec, 16);
    path
}
