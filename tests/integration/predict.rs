//! `cpa-stream predict` and `evaluate` end to end on one trained synthetic model: the output
//! schema read back, a run that dies leaving no output, evaluation numbers recomputed by hand,
//! and a held-out combination scored against the atlas's truth.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arrow_array::{Array, RecordBatch};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, UInt64Type};
use cpa_stream::unstable::schemas::tables::{
    evaluation_deg_schema, evaluation_metrics, evaluation_metrics_schema, prediction_genes, prediction_schema,
    same_schema,
};
use cpa_stream::unstable::stages::store::{Store, read_small_table};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::common::{repo_root, run, text};

/// A synthetic atlas with a held-back combination and a model trained on it (built once).
pub struct Fixture {
    pub dir: PathBuf,
    pub store: PathBuf,
    pub run: PathBuf,
}

/// The small-atlas configuration the demo uses too.
const CONFIG: &str = "examples/cpa-small.toml";

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")).keep();
        let store = dir.join("atlas.store");
        let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
        let o = run(&[
            "synth",
            "--cells",
            "6000",
            "--genes",
            "100",
            "--perturbations",
            "4",
            "--doses",
            "1",
            "--cell-types",
            "2",
            "--combinations",
            "2",
            "--heldout-combinations",
            "1",
            "--seed",
            "5",
            "--out",
            &s(&store),
        ]);
        assert!(o.status.success(), "synth failed: {}", text(&o.stderr));
        let config = repo_root().join(CONFIG);
        let run_dir = dir.join("run");
        // 50 epochs: the held-out combination's R2 against the truth was 0.937 and 0.963 in the
        // two cell types (the control mean's 0.653 and 0.822; the change's 0.80 and 0.78), after
        // 100 epochs 0.943 and 0.953 (0.82 and 0.72) in twice the time.
        train_synthetic(&store, &config, &run_dir, &["--epochs", "50"]);
        Fixture { dir, store, run: run_dir }
    })
}

/// Trains a model of a synthetic store (`dose`, `cell_type`) with `config` into `out`; must
/// succeed. One libtorch thread: tests run in parallel on 2 cores, and oversubscribed libtorch
/// threads slowed the fixture's training tenfold.
fn train_synthetic(store: &Path, config: &Path, out: &Path, extra: &[&str]) {
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    let (store, config, out) = (s(store), s(config), s(out));
    let args = ["train", "--store", &store, "--dose-key", "dose", "--covariates", "cell_type", "--config", &config];
    let o = run(&[&args[..], extra, &["--threads", "1", "--out", &out]].concat());
    assert!(o.status.success(), "train failed: {}", text(&o.stderr));
}

fn read_parquet(path: &Path) -> (arrow_schema::SchemaRef, Vec<RecordBatch>) {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap_or_else(|e| panic!("{e}"));
    let schema = builder.schema().clone();
    let reader = builder.build().unwrap_or_else(|e| panic!("{e}"));
    (schema, reader.map(|b| b.unwrap_or_else(|e| panic!("{e}"))).collect())
}

/// A column of text values (dictionary or plain) of every batch.
fn strings(batches: &[RecordBatch], name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        let col = b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
        let col = arrow_cast::cast(col, &arrow_schema::DataType::Utf8).unwrap_or_else(|e| panic!("{e}"));
        let s = col.as_string::<i32>();
        out.extend((0..s.len()).map(|i| s.value(i).to_owned()));
    }
    out
}

/// The `mean` vectors of every row.
fn means(batches: &[RecordBatch]) -> Vec<Vec<f64>> {
    vectors(batches, "mean")
}

/// The vectors of a list column of every row.
fn vectors(batches: &[RecordBatch], name: &str) -> Vec<Vec<f64>> {
    let mut out = Vec::new();
    for b in batches {
        let list = b.column_by_name(name).unwrap_or_else(|| panic!("no {name}")).as_fixed_size_list();
        let width = list.value_length() as usize;
        let values = list.values().as_primitive::<Float32Type>();
        for r in 0..list.len() {
            out.push((0..width).map(|g| f64::from(values.value(r * width + g))).collect());
        }
    }
    out
}

pub fn predict(args: &[&str]) -> std::process::Output {
    let f = fixture();
    let mut all = vec!["predict", "--model", f.run.to_str().unwrap_or_default(), "--store"];
    all.push(f.store.to_str().unwrap_or_default());
    all.extend_from_slice(args);
    run(&all)
}

/// The synthetic obs labels per store row.
fn obs(store: &Path) -> (Vec<String>, Vec<String>, Vec<String>) {
    let t = read_small_table(&store.join("obs.parquet")).unwrap_or_else(|e| panic!("{e}"));
    let b = [t];
    (strings(&b, "condition"), strings(&b, "dose"), strings(&b, "cell_type"))
}

fn canonical(condition: &str, dose: &str) -> Vec<(String, String)> {
    let mut parts: Vec<(String, String)> =
        condition.split('+').zip(dose.split('+')).map(|(c, d)| (c.to_owned(), d.to_owned())).collect();
    parts.sort();
    parts
}

#[test]
fn predictions_read_back_match_the_schema() {
    let f = fixture();
    let out = f.dir.join("preds.parquet");
    let (conds, _, types) = obs(&f.store);
    let target_type = types[0].clone();
    let o = predict(&[
        "--target",
        "condition=PERT01+PERT02,dose=1+1",
        "--target",
        &format!("condition=PERT03,cell_type={target_type}"),
        "--latents",
        "z_basal,z",
        "--batch-size",
        "100",
        "--out",
        out.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
    let (schema, batches) = read_parquet(&out);
    let store_genes =
        cpa_stream::unstable::pipeline::obs::gene_names(&Store::open(&f.store).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store_genes.len(), 100);
    let labels = ["condition", "dose", "cell_type"].map(String::from);
    let expected = prediction_schema(&labels, &store_genes, &["anchored"], &["z_basal".into(), "z".into()], 32)
        .unwrap_or_else(|e| panic!("{e}"));
    same_schema(&expected, &schema).unwrap_or_else(|e| panic!("schema read back: {e}"));
    assert_eq!(prediction_genes(&schema), Some(store_genes));

    let controls = conds.iter().filter(|c| *c == "control").count();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 2 * controls, "every control cell decoded into both targets");
    let (c, d, t) = (strings(&batches, "condition"), strings(&batches, "dose"), strings(&batches, "cell_type"));
    assert_eq!(c.iter().filter(|c| *c == "PERT01+PERT02").count(), controls);
    assert!(d.iter().zip(&c).all(|(d, c)| (c == "PERT03") == (d == "1")));
    // The first target keeps each cell's own type; the second sets it.
    assert!(t.iter().zip(&c).filter(|(_, c)| *c == "PERT03").all(|(t, _)| *t == target_type));
    assert!(t.iter().zip(&c).filter(|(_, c)| *c != "PERT03").any(|(t, _)| *t != target_type));
    let m = means(&batches);
    assert!(m.iter().flatten().all(|v| v.is_finite() && *v >= 0.0));
    // Same cell, same z_basal whatever the target; z differs.
    let z_basal = batches[0].column_by_name("z_basal").map(|c| c.as_fixed_size_list().value(0));
    assert!(z_basal.is_some());
}

/// What DuckDB and pandas users see: the meaning of a prediction file in plain Parquet
/// key-value metadata, `--layout wide` with one column per gene equal to the long layout's lists,
/// and a sharded dataset with its genes.parquet (tests/fixtures/read_outputs.py).
#[test]
fn predictions_are_self_describing_for_duckdb_and_pandas() {
    fixture();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (long, wide, dataset) =
        (dir.path().join("long.parquet"), dir.path().join("wide.parquet"), dir.path().join("ds"));
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    let common = ["--target", "condition=PERT01+PERT02,dose=1+1", "--latents", "z_basal", "--source", "all"];
    for (out, extra) in [(&long, vec![]), (&wide, vec!["--layout", "wide"])] {
        let o = predict(&[&common[..], &["--out", &s(out)], &extra[..]].concat());
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    for shard in ["0/2", "1/2"] {
        let o = predict(&[&common[..], &["--out", &s(&dataset), "--shard", shard]].concat());
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    // A directory of parts, the same for any sink thread count.
    let listing = |dir: &Path| -> Vec<(String, u64)> {
        let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map_or(0, |m| m.len())))
            .collect();
        files.sort();
        files
    };
    let parts: Vec<PathBuf> = [1, 3].iter().map(|t| dir.path().join(format!("parts-{t}"))).collect();
    for (threads, out) in ["1", "3"].iter().zip(&parts) {
        let args = ["--out", &s(out), "--parts", "--sink-threads", threads, "--row-group-rows", "700"];
        let o = predict(&[&common[..], &args[..]].concat());
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert!(text(&o.stdout).contains(" parts"), "{}", text(&o.stdout));
    }
    // The same parts, value for value (the bytes differ only in the command line recorded in
    // the metadata; the sink's own tests compare bytes).
    let (one, three) = (listing(&parts[0]), listing(&parts[1]));
    assert!(one.len() > 1 && one.iter().all(|(name, _)| name.starts_with("part-") && name.ends_with(".parquet")));
    assert_eq!(one.iter().map(|f| &f.0).collect::<Vec<_>>(), three.iter().map(|f| &f.0).collect::<Vec<_>>());
    for (name, _) in &one {
        let (a, b) = (read_parquet(&parts[0].join(name)).1, read_parquet(&parts[1].join(name)).1);
        assert_eq!(a, b, "{name} differs between 1 and 3 sink threads");
    }
    let o = predict(&[&common[..], &["--out", &s(&dir.path().join("both")), "--parts", "--shard", "0/2"]].concat());
    assert!(!o.status.success() && text(&o.stderr).contains("--shard"), "{}", text(&o.stderr));
    let python = crate::common::python();
    let script = repo_root().join("tests/fixtures/read_outputs.py");
    let o = std::process::Command::new(&python)
        .arg(&script)
        .args([&long, &wide, &dataset, &parts[1]])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
}

/// One spelling of labels: obs spells doses `1.0`, `10.0`, `1.0+10.0` (as many public datasets
/// do); evaluate's tables and predict's files keep those spellings, so that both join with obs
/// on (condition, dose) as plain strings.
#[test]
fn outputs_spell_labels_as_obs_and_join_with_it() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let p = |name: &str| dir.path().join(name).to_str().unwrap_or_default().to_owned();
    let made = std::process::Command::new(crate::common::python())
        .arg(repo_root().join("tests/fixtures/h5ad_fixtures.py"))
        .args(["doses", &p("doses.h5ad")])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(made.status.success(), "{}", text(&made.stderr));
    let config = repo_root().join(CONFIG);
    let steps: [&[&str]; 4] = [
        &["import", &p("doses.h5ad"), "--out", &p("s.store")],
        &[
            "train",
            "--store",
            &p("s.store"),
            "--dose-key",
            "dose",
            "--covariates",
            "cell_type",
            "--config",
            config.to_str().unwrap_or_default(),
            "--epochs",
            "2",
            "--out",
            &p("run"),
        ],
        &[
            "evaluate",
            "--model",
            &p("run"),
            "--store",
            &p("s.store"),
            "--split",
            "test",
            "--no-plots",
            "--out",
            &p("eval"),
        ],
        &[
            "predict",
            "--model",
            &p("run"),
            "--store",
            &p("s.store"),
            "--target",
            "condition=A+B,dose=1.0+10.0",
            "--target",
            "condition=B+A,dose=10+1",
            "--target",
            "condition=A,dose=10",
            "--out",
            &p("pred.parquet"),
        ],
    ];
    for args in steps {
        let o = run(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    }
    let (_, obs) = read_parquet(&dir.path().join("s.store/obs.parquet"));
    let pairs: std::collections::HashSet<(String, String)> =
        strings(&obs, "condition").into_iter().zip(strings(&obs, "dose")).collect();
    assert!(pairs.contains(&("A+B".to_owned(), "1.0+10.0".to_owned())), "{pairs:?}");
    let (_, metrics) = read_parquet(&dir.path().join("eval/metrics.parquet"));
    let evaluated: Vec<(String, String)> =
        strings(&metrics, "condition").into_iter().zip(strings(&metrics, "dose")).collect();
    assert!(!evaluated.is_empty());
    for pair in &evaluated {
        assert!(pairs.contains(pair), "evaluate wrote {pair:?}, which obs does not spell so: {pairs:?}");
    }
    let (_, predicted) = read_parquet(&dir.path().join("pred.parquet"));
    for pair in strings(&predicted, "condition").into_iter().zip(strings(&predicted, "dose")) {
        assert!(pairs.contains(&pair), "predict wrote {pair:?}");
    }
}

#[test]
fn a_failing_or_killed_prediction_leaves_no_output_file() {
    let f = fixture();
    // Killed mid-way: the sink's temporary file never becomes the output.
    let out = f.dir.join("killed.parquet");
    let mut child = std::process::Command::new(crate::common::bin())
        .args(["predict", "--model", f.run.to_str().unwrap_or_default(), "--store"])
        .args([f.store.to_str().unwrap_or_default(), "--source", "all", "--batch-size", "8", "--prefetch", "1"])
        .args(["--target", "PERT01", "--target", "PERT02", "--target", "PERT03", "--target", "PERT04"])
        .args(["--row-group-rows", "64", "--out", out.to_str().unwrap_or_default()])
        .env_remove("LD_LIBRARY_PATH")
        .env("CPA_STREAM_LOG", "warn")
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::Instant::now();
    let tmp_exists = || {
        std::fs::read_dir(&f.dir)
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(".killed.parquet.tmp")))
            .unwrap_or(false)
    };
    while !tmp_exists() && started.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    let status = child.wait().unwrap_or_else(|e| panic!("{e}"));
    assert!(!status.success(), "the prediction finished before it could be killed");
    assert!(!out.exists(), "a killed run left {}", out.display());

    // Failing mid-way: a corrupt block in a zstd copy of the store.
    let zstd = f.dir.join("corrupt.store");
    let o = run(&["convert", f.store.to_str().unwrap_or_default(), "--codec", "zstd", "--out"]
        .into_iter()
        .chain([zstd.to_str().unwrap_or_default(), "--block-rows", "64"])
        .collect::<Vec<_>>());
    assert!(o.status.success(), "convert failed: {}", text(&o.stderr));
    let blocks = zstd.join("X/blocks");
    let mut bytes = std::fs::read(&blocks).unwrap_or_else(|e| panic!("{e}"));
    let at = bytes.len() * 3 / 4;
    for b in &mut bytes[at..at + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&blocks, &bytes).unwrap_or_else(|e| panic!("{e}"));
    let out = f.dir.join("failed.parquet");
    let o = run(&[
        "predict",
        "--model",
        f.run.to_str().unwrap_or_default(),
        "--store",
        zstd.to_str().unwrap_or_default(),
        "--source",
        "all",
        "--batch-size",
        "64",
        "--out",
        out.to_str().unwrap_or_default(),
    ]);
    let err = text(&o.stderr);
    assert!(!o.status.success(), "a corrupt store predicted: {err}");
    assert!(err.contains("X/blocks") && err.contains("block "), "{err}");
    assert!(!out.exists(), "a failed run left {}", out.display());
    let leftovers = names_starting_with(&f.dir, ".failed.parquet");
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // The same into a directory of parts (several written before the corrupt block is read):
    // no directory, no temporary one, no part anywhere.
    let parts = f.dir.join("failed-parts");
    let (model, store) = (f.run.to_str().unwrap_or_default(), zstd.to_str().unwrap_or_default());
    let o = run(&[
        "predict",
        "--model",
        model,
        "--store",
        store,
        "--source",
        "all",
        "--batch-size",
        "64",
        "--row-group-rows",
        "64",
        "--parts",
        "--sink-threads",
        "2",
        "--out",
        parts.to_str().unwrap_or_default(),
    ]);
    assert!(!o.status.success(), "a corrupt store predicted into parts");
    assert!(!parts.exists(), "a failed run left {}", parts.display());
    let leftovers = names_starting_with(&f.dir, ".failed-parts");
    assert!(leftovers.is_empty(), "temporary parts left: {leftovers:?}");
}

/// The names in `dir` that start with `prefix` (temporary files a failed run must not leave).
fn names_starting_with(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn r2(pred: &[f64], truth: &[f64]) -> f64 {
    let mean = truth.iter().sum::<f64>() / truth.len() as f64;
    let res: f64 = pred.iter().zip(truth).map(|(p, t)| (t - p) * (t - p)).sum();
    let tot: f64 = truth.iter().map(|t| (t - mean) * (t - mean)).sum();
    1.0 - res / tot
}

fn mean_var(rows: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
    let n = rows.len() as f64;
    let g = rows[0].len();
    let mean: Vec<f64> = (0..g).map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n).collect();
    let var = (0..g).map(|j| rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n).collect();
    (mean, var)
}

/// log1p of some cells' counts, one dense row per cell, and the cells' rows in the store.
type Log1pCells = (Vec<Vec<f64>>, Vec<u64>);

/// The dense log1p rows of a condition's cells and of the control cells of the same cell type,
/// every split, each with their store rows.
fn log1p_rows(store: &Path, condition: &str, dose: &str, cell_type: &str) -> (Log1pCells, Log1pCells) {
    let opened = Store::open(store).unwrap_or_else(|e| panic!("{e}"));
    let genes = opened.n_vars() as usize;
    let mut cursor = opened.cursor().unwrap_or_else(|e| panic!("{e}"));
    let (conds, doses, types) = obs(store);
    let key = canonical(condition, dose);
    let (mut real, mut real_rows, mut control, mut control_rows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..opened.n_obs() as usize {
        let is_real = canonical(&conds[r], &doses[r]) == key;
        if types[r] != cell_type || (!is_real && conds[r] != "control") {
            continue;
        }
        let (idx, val) = cursor.row(r as u64).unwrap_or_else(|e| panic!("{e}"));
        let mut dense = vec![0.0f64; genes];
        for (&g, &v) in idx.iter().zip(val) {
            dense[g as usize] = f64::from(v).ln_1p();
        }
        if is_real {
            real.push(dense);
            real_rows.push(r as u64);
        } else {
            control.push(dense);
            control_rows.push(r as u64);
        }
    }
    ((real, real_rows), (control, control_rows))
}

fn metric(batches: &[RecordBatch], name: &str, row: usize) -> f64 {
    let col = batches[0].column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
    col.as_primitive::<Float64Type>().value(row)
}

/// Runs `evaluate` on the fixture's model and store for `split` into `out`; must succeed.
fn evaluate(out: &Path, split: &str) -> std::process::Output {
    evaluate_with(out, split, &[])
}

/// `evaluate` with `extra` flags.
fn evaluate_with(out: &Path, split: &str, extra: &[&str]) -> std::process::Output {
    let f = fixture();
    let (model, store) = (f.run.to_str().unwrap_or_default(), f.store.to_str().unwrap_or_default());
    let args =
        ["evaluate", "--model", model, "--store", store, "--split", split, "--out", out.to_str().unwrap_or_default()];
    let o = run(&[&args[..], extra].concat());
    assert!(o.status.success(), "evaluate failed: {}", text(&o.stderr));
    o
}

#[test]
fn evaluation_equals_a_computation_by_hand() {
    let f = fixture();
    let eval = f.dir.join("eval-all");
    // The plain prediction, computed by hand below from `predict`'s means.
    let o = evaluate_with(&eval, "all", &["--plain"]);
    let printed = text(&o.stdout);
    assert!(printed.contains("r2_mean"), "no table printed: {printed}");
    // The one-page overview, as SVG and PNG.
    let svg = std::fs::read_to_string(eval.join("overview.svg")).unwrap_or_default();
    assert!(svg.starts_with("<svg") && svg.contains("R2 of means per condition"), "overview.svg: {:.200}", svg);
    let png = std::fs::read(eval.join("overview.png")).unwrap_or_default();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "overview.png: {} bytes", png.len());
    let (schema, batches) = read_parquet(&eval.join("metrics.parquet"));
    // The labels (covariates, perturbation and dose keys) and fixed columns as the schema defines
    // them; the metric columns after them are Float64 and include the headline ones.
    let fixed = 3 + 5;
    let metrics: Vec<String> = schema.fields().iter().skip(fixed).map(|f| f.name().clone()).collect();
    for m in [
        "r2_mean",
        "r2_var",
        "r2_delta",
        "r2_mean_control",
        "truth_r2_mean",
        "pearson_delta",
        "pearson_delta_top20",
        "mse",
        "mae_delta",
        "deg_overlap_at100",
        "direction_match_top20",
        "spearman_delta_top20",
        "discrimination_l1",
        "discrimination_cosine",
        "beats_control",
        "ceiling_r2_mean",
        "change_reproducibility",
        "n_significant",
        "deg_precision_at20",
        "uncertainty_cosine",
        "uncertainty_euclidean",
        "energy_distance",
        "energy_distance_control",
        "de_recall",
        "de_precision",
        "energy_distance_predicted_control",
        "de_overlap_at_n",
        "de_precision_at_n",
        "de_spearman_lfc",
        "de_pr_auc",
        "de_roc_auc",
        "cosine_logfc",
        "rmse",
        "rank_cosine_logfc",
        "rank_rmse",
    ] {
        assert!(metrics.iter().any(|n| n == m), "no {m} among the metrics: {metrics:?}");
    }
    let labels = ["cell_type", "condition", "dose"].map(String::from);
    let expected = evaluation_metrics_schema(&labels, &metrics).unwrap_or_else(|e| panic!("{e}"));
    same_schema(&expected, &schema).unwrap_or_else(|e| panic!("evaluation metrics.parquet: {e}"));
    assert_eq!(schema.field(fixed - 2).name(), evaluation_metrics::N_CONTROL);
    assert_eq!(schema.field(fixed - 1).name(), evaluation_metrics::CLOSEST_CONDITION);
    let (deg_file_schema, deg_batches) = read_parquet(&eval.join("degs.parquet"));
    same_schema(&evaluation_deg_schema(), &deg_file_schema).unwrap_or_else(|e| panic!("evaluation degs.parquet: {e}"));
    // Wilcoxon p- and q-values from the cell samples: probabilities, q never below p.
    let mut tested = 0;
    for b in &deg_batches {
        let col = |n: &str| {
            b.column_by_name(n).map(|c| c.as_primitive::<Float64Type>().clone()).unwrap_or_else(|| panic!("{n}"))
        };
        let (p, q) = (col("wilcoxon_pvalue"), col("wilcoxon_qvalue"));
        for i in (0..b.num_rows()).filter(|&i| !p.is_null(i)) {
            let (p, q) = (p.value(i), q.value(i));
            assert!((0.0..=1.0).contains(&p) && (0.0..=1.0).contains(&q) && q >= p - 1e-12, "p {p}, q {q}");
            tested += 1;
        }
    }
    assert!(tested > 0, "no Wilcoxon values in degs.parquet");
    let (ec, ed, et) = (strings(&batches, "condition"), strings(&batches, "dose"), strings(&batches, "cell_type"));
    let n_cells = batches[0].column_by_name("n_cells").map(|c| c.as_primitive::<UInt64Type>().value(0));
    // The first condition with cells, recomputed from the store, obs and `predict`'s output.
    let row = (0..ec.len()).find(|&i| n_cells.is_some() && !ec[i].contains("+") && ec[i] != "control");
    let row = row.unwrap_or_else(|| panic!("no single-perturbation condition evaluated: {ec:?}"));
    let (condition, dose, cell_type) = (&ec[row], &ed[row], &et[row]);

    let ((real, real_rows), (control, control_rows)) = log1p_rows(&f.store, condition, dose, cell_type);
    let genes = control[0].len();
    let preds = f.dir.join("hand.parquet");
    let source = format!("condition == control and cell_type == {cell_type}");
    let target = format!("condition={condition},dose={dose},cell_type={cell_type}");
    let o = predict(&["--source", &source, "--target", &target, "--out", preds.to_str().unwrap_or_default()]);
    assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
    let predicted: Vec<Vec<f64>> =
        means(&read_parquet(&preds).1).into_iter().map(|r| r.into_iter().map(f64::ln_1p).collect()).collect();
    assert_eq!(predicted.len(), control.len());

    let (real_mean, real_var) = mean_var(&real);
    let (pred_mean, pred_var) = mean_var(&predicted);
    let (ctrl_mean, ctrl_var) = mean_var(&control);
    let delta = |m: &[f64]| -> Vec<f64> { m.iter().zip(&ctrl_mean).map(|(a, b)| a - b).collect() };
    // Welch's t over all cells (the split is `all`), top 20 genes by |t|.
    let (nr, nc) = (real.len() as f64, control.len() as f64);
    let t: Vec<f64> = (0..genes)
        .map(|g| {
            let se = (real_var[g] * nr / (nr - 1.0) / nr + ctrl_var[g] * nc / (nc - 1.0) / nc).sqrt();
            let d = real_mean[g] - ctrl_mean[g];
            if se > 0.0 {
                d / se
            } else if d == 0.0 {
                0.0
            } else {
                d.signum() * f64::INFINITY
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..genes).collect();
    order.sort_by(|&a, &b| t[b].abs().total_cmp(&t[a].abs()).then(a.cmp(&b)));
    let top: Vec<usize> = order[..20].to_vec();
    let pick = |v: &[f64]| -> Vec<f64> { top.iter().map(|&g| v[g]).collect() };

    let (pd, rd) = (delta(&pred_mean), delta(&real_mean));
    let pearson = |a: &[f64], b: &[f64]| {
        let n = a.len() as f64;
        let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let (va, vb): (f64, f64) = (a.iter().map(|x| (x - ma).powi(2)).sum(), b.iter().map(|y| (y - mb).powi(2)).sum());
        cov / (va * vb).sqrt()
    };
    let mean_of = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    let same_sign = top.iter().filter(|&&g| pd[g].signum() == rd[g].signum()).count() as f64 / top.len() as f64;
    let beats = if r2(&pred_mean, &real_mean) > r2(&ctrl_mean, &real_mean) { 1.0 } else { 0.0 };
    // The split-half ceiling: the library's fixed halves of the real cells, one predicting the other.
    let halves = |cells: &[Vec<f64>], rows: &[u64]| -> (Vec<f64>, Vec<f64>) {
        let (second, first): (Vec<_>, Vec<_>) =
            cells.iter().zip(rows).partition(|(_, r)| cpa_stream::unstable::engine::evaluate::in_second_half(**r));
        assert!(first.len() >= 2 && second.len() >= 2, "halves {} and {}", first.len(), second.len());
        let mean = |h: &[(&Vec<f64>, &u64)]| mean_var(&h.iter().map(|(v, _)| (*v).clone()).collect::<Vec<_>>()).0;
        (mean(&first), mean(&second))
    };
    let (first_mean, second_mean) = halves(&real, &real_rows);
    let ceiling = r2(&first_mean, &second_mean);
    let ceiling_delta = pearson(&delta(&first_mean), &delta(&second_mean));
    // The change's reproducibility: each half of the condition's cells against its own half of
    // the controls, no cell shared.
    let (first_control, second_control) = halves(&control, &control_rows);
    let change = |t: &[f64], c: &[f64]| -> Vec<f64> { t.iter().zip(c).map(|(a, b)| a - b).collect() };
    let reproducibility = pearson(&change(&first_mean, &first_control), &change(&second_mean, &second_control));
    let hand = [
        ("pearson_delta", pearson(&pd, &rd)),
        ("pearson_delta_top20", pearson(&pick(&pd), &pick(&rd))),
        ("mse", mean_of(pred_mean.iter().zip(&real_mean).map(|(a, b)| (a - b).powi(2)).collect())),
        ("mae_delta", mean_of(pd.iter().zip(&rd).map(|(a, b)| (a - b).abs()).collect())),
        ("direction_match_top20", same_sign),
        ("beats_control", beats),
        ("ceiling_r2_mean", ceiling),
        ("ceiling_pearson_delta", ceiling_delta),
        ("change_reproducibility", reproducibility),
        ("r2_mean", r2(&pred_mean, &real_mean)),
        ("r2_var", r2(&pred_var, &real_var)),
        ("r2_delta", r2(&delta(&pred_mean), &delta(&real_mean))),
        ("r2_mean_control", r2(&ctrl_mean, &real_mean)),
        ("r2_mean_top20", r2(&pick(&pred_mean), &pick(&real_mean))),
    ];
    for (name, expected) in hand {
        let got = metric(&batches, name, row);
        assert!((got - expected).abs() < 1e-5, "{name} of {condition} {cell_type}: evaluate {got}, by hand {expected}");
    }
    let count = |name: &str| batches[0].column_by_name(name).map(|c| c.as_primitive::<UInt64Type>().value(row));
    assert_eq!(count("n_cells"), Some(real.len() as u64));
    assert_eq!(count("n_control"), Some(control.len() as u64));
    assert_eq!(strings(&batches, "deg_source")[row], "computed");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("summary.json")).unwrap_or_default())
            .unwrap_or_else(|e| panic!("summary.json: {e}"));
    assert_eq!(summary["conditions"].as_u64(), Some(ec.len() as u64));
    // The synthetic atlas gives a perturbation one latent effect in every cell type (decoded
    // nonlinearly): it carries over between the two cell types (python/tests/test_baselines.py
    // checks the figures by hand).
    // `~` marks the conditions whose change does not reproduce, and a line says what it means.
    let reproducibility =
        batches[0].column_by_name("change_reproducibility").map(|c| c.as_primitive::<Float64Type>().clone());
    let reproducibility = reproducibility.unwrap_or_else(|| panic!("no change_reproducibility"));
    let unmeasured = (0..ec.len()).filter(|&i| !reproducibility.is_null(i) && reproducibility.value(i) < 0.1).count();
    let marked = printed.lines().filter(|l| l.ends_with(" ~")).count();
    assert_eq!(marked, unmeasured, "{printed}");
    assert_eq!(printed.contains("`~` marks the conditions"), unmeasured > 0, "{printed}");
    // The synthetic atlas's effects are real: most changes reproduce, and the summary counts them.
    let counted = &summary["reproducibility"];
    let conditions = counted["conditions"].as_u64().unwrap_or(0);
    assert!(conditions > 0 && counted["not_reproduced"].as_u64().is_some_and(|n| 2 * n < conditions), "{counted}");
    let transfer = &summary["transfer"];
    assert_eq!(transfer["carries_over"].as_bool(), Some(true), "{transfer}");
    assert!(transfer["same_pairs"].as_u64().is_some_and(|n| n > 0), "{transfer}");
    assert!(printed.contains("effects carry over between covariate values"), "{printed}");
    // A line counts the conditions on which the model beats each simple baseline that some
    // condition has, as the beats_* columns say.
    let mut expected = Vec::new();
    for (name, column) in [
        ("context mean", "beats_context_mean"),
        ("matched mean", "beats_matched_mean"),
        ("additive", "beats_additive"),
        ("other covariates", "beats_other_covariates"),
        ("scaled other covariates", "beats_other_covariates_scaled"),
        ("nearest covariates", "beats_nearest_covariates"),
        ("linear", "beats_linear"),
        ("nearest perturbations", "beats_knn"),
        ("linear on features", "beats_linear_features"),
    ] {
        let values = batches[0].column_by_name(column).map(|c| c.as_primitive::<Float64Type>().clone());
        let values = values.unwrap_or_else(|| panic!("no column {column}"));
        // NaN (no baseline) is written as null.
        let flags: Vec<f64> =
            (0..ec.len()).filter(|&i| !values.is_null(i)).map(|i| values.value(i)).filter(|v| v.is_finite()).collect();
        if !flags.is_empty() {
            expected.push(format!("{name} {} of {}", flags.iter().filter(|&&v| v == 1.0).count(), flags.len()));
        }
    }
    assert!(expected.len() >= 3, "the atlas has other covariates and combinations: {expected:?}");
    let line = printed.lines().find(|l| l.starts_with("the model beats the simple baselines")).unwrap_or_default();
    let listed: Vec<String> =
        line.split_once("on: ").map(|(_, l)| l.split(", ").map(str::to_owned).collect()).unwrap_or_default();
    assert_eq!(listed, expected, "{printed}");
    let plots = std::fs::read_dir(eval.join("plots")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(plots, ec.len(), "one plot per condition");
}

#[test]
fn the_reference_definitions_decode_every_control_and_rank_degs_by_mean_difference() {
    let f = fixture();
    let eval = f.dir.join("eval-reference");
    let (model, store) = (f.run.to_str().unwrap_or_default(), f.store.to_str().unwrap_or_default());
    let args = ["evaluate", "--model", model, "--store", store, "--definitions", "reference", "--no-plots"];
    let o = run(&[&args[..], &["--out", eval.to_str().unwrap_or_default()]].concat());
    assert!(o.status.success(), "evaluate failed: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("DEGs: the reference's"), "{}", text(&o.stdout));
    let (_, batches) = read_parquet(&eval.join("metrics.parquet"));
    let (ec, ed, et) = (strings(&batches, "condition"), strings(&batches, "dose"), strings(&batches, "cell_type"));
    let n_cells = batches[0].column_by_name("n_cells").map(|c| c.as_primitive::<UInt64Type>().clone());
    let n_cells = n_cells.unwrap_or_else(|| panic!("no n_cells"));
    let row = (0..ec.len()).find(|&i| n_cells.value(i) > 0).unwrap_or_else(|| panic!("nothing evaluated"));
    assert_eq!(strings(&batches, "deg_source")[row], "mean difference");
    assert_eq!(strings(&batches, "control_source")[row], "all");
    // Every control cell of the cell type, whatever its split, and the condition's DEGs ranked by
    // |mean of all its cells - mean of those controls| of log1p counts.
    let (condition, dose, cell_type) = (&ec[row], &ed[row], &et[row]);
    let ((real, _), (control, _)) = log1p_rows(&f.store, condition, dose, cell_type);
    let (real_mean, control_mean) = (mean_var(&real).0, mean_var(&control).0);
    let n_control = control.len() as u64;
    let count = batches[0].column_by_name("n_control").map(|c| c.as_primitive::<UInt64Type>().value(row));
    assert_eq!(count, Some(n_control));
    let change: Vec<f64> = real_mean.iter().zip(&control_mean).map(|(a, b)| a - b).collect();
    let mut order: Vec<usize> = (0..change.len()).collect();
    order.sort_by(|&a, &b| change[b].abs().total_cmp(&change[a].abs()).then(a.cmp(&b)));
    let (_, degs) = read_parquet(&eval.join("degs.parquet"));
    let group = format!("{cell_type}_{condition}_{dose}");
    let listed: Vec<String> = strings(&degs, "group")
        .into_iter()
        .zip(strings(&degs, "gene"))
        .filter(|(g, _)| *g == group)
        .map(|(_, gene)| gene)
        .take(10)
        .collect();
    let store = Store::open(&f.store).unwrap_or_else(|e| panic!("{e}"));
    let names = cpa_stream::unstable::pipeline::obs::gene_names(&store).unwrap_or_else(|e| panic!("{e}"));
    let by_hand: Vec<String> = order[..10].iter().map(|&g| names[g].clone()).collect();
    assert_eq!(listed, by_hand, "top 10 DEGs of {group}");
}

#[test]
fn the_expected_log1p_is_scored_below_log1p_of_the_mean() {
    let f = fixture();
    let (model, store) = (f.run.to_str().unwrap_or_default(), f.store.to_str().unwrap_or_default());
    let summaries: Vec<serde_json::Value> = [&["--plain"][..], &["--expected-log1p"][..]]
        .iter()
        .enumerate()
        .map(|(i, extra)| {
            let out = f.dir.join(format!("eval-space-{i}"));
            let args = ["evaluate", "--model", model, "--store", store, "--no-plots", "--split", "all", "--out"];
            let o = run(&[&args[..], &[out.to_str().unwrap_or_default()], extra].concat());
            assert!(o.status.success(), "evaluate failed: {}", text(&o.stderr));
            let text = std::fs::read_to_string(out.join("summary.json")).unwrap_or_default();
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("summary.json: {e}"))
        })
        .collect();
    let (plain, expected) = (&summaries[0], &summaries[1]);
    assert_eq!(plain["predicted"].as_str(), Some("log1p(mean)"), "{plain}");
    assert_eq!(expected["predicted"].as_str(), Some("expected log1p"), "{expected}");
    // E[log1p X] < log1p(E[X]) for every gene: the predicted mean moves, the real side does not.
    let mean = |s: &serde_json::Value, k: &str| s["mean"][k].as_f64().unwrap_or(f64::NAN);
    assert!(mean(expected, "mse") != mean(plain, "mse"), "{expected}");
    assert_eq!(mean(expected, "r2_mean_control"), mean(plain, "r2_mean_control"));
}

/// E[log1p X] for X ~ NB(mean mu, inverse dispersion theta), summed over the pmf.
fn expected_log1p_by_pmf(mu: f64, theta: f64) -> f64 {
    let q = mu / (theta + mu);
    let (mut p, mut total, mut mass) = ((theta / (theta + mu)).powf(theta), 0.0, 0.0);
    for k in 0..1_000_000u32 {
        let k = f64::from(k);
        total += p * k.ln_1p();
        mass += p;
        if mass > 1.0 - 1e-13 && k > mu {
            break;
        }
        p *= (k + theta) / (k + 1.0) * q;
    }
    total
}

#[test]
fn predict_writes_the_expected_log1p_of_each_predicted_distribution_and_its_change() {
    let f = fixture();
    let long = f.dir.join("preds-elog.parquet");
    let o = predict(&["--target", "PERT03", "--expected-log1p", "--plain", "--out", long.to_str().unwrap_or_default()]);
    assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
    let (schema, batches) = read_parquet(&long);
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["cell_id", "condition", "dose", "cell_type", "mean", "expected_log1p"]);
    let (mean, expected) = (means(&batches), vectors(&batches, "expected_log1p"));
    assert_eq!(mean.len(), expected.len());
    // Against the pmf sum with the model's own dispersion, for the first cells.
    let store = Store::open(&f.store).unwrap_or_else(|e| panic!("{e}"));
    let genes = cpa_stream::unstable::pipeline::obs::gene_names(&store).unwrap_or_else(|e| panic!("{e}"));
    let model =
        cpa_stream::unstable::engine::model::load_model_for(&f.run.join("model"), &genes, "test", tch::Device::Cpu)
            .unwrap_or_else(|e| panic!("{e}"));
    let theta = model.nb_theta().unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("an nb model"));
    let theta = Vec::<f64>::try_from(&theta.to_kind(tch::Kind::Double)).unwrap_or_else(|e| panic!("{e}"));
    let mut worst = 0.0f64;
    for (m, e) in mean.iter().zip(&expected).take(20) {
        for g in 0..genes.len() {
            let by_hand = expected_log1p_by_pmf(m[g], theta[g]);
            worst = worst.max((e[g] - by_hand).abs() / (1.0 + by_hand));
            // Below log1p of the mean (Jensen), never negative.
            assert!(e[g] >= 0.0 && e[g] <= m[g].ln_1p() + 1e-6, "gene {g}: {} vs log1p(mean {})", e[g], m[g]);
        }
    }
    // The quadrature (48 nodes) is good to about 1e-4 of the value on these means.
    assert!(worst < 5e-4, "largest relative difference from the pmf sum: {worst}");
    // Wide: one column per gene, named expected_log1p_GENE, equal to the long lists.
    let wide = f.dir.join("preds-elog-wide.parquet");
    let o = predict(&[
        "--target",
        "PERT03",
        "--expected-log1p",
        "--layout",
        "wide",
        "--out",
        wide.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
    let (_, wide_batches) = read_parquet(&wide);
    let column = format!("expected_log1p_{}", genes[7]);
    let values = wide_batches[0].column_by_name(&column).unwrap_or_else(|| panic!("no {column}"));
    assert_eq!(f64::from(values.as_primitive::<Float32Type>().value(0)), expected[0][7]);

    // The change: the expected log1p under the target minus under the cell's own condition (the
    // control cells reconstructed), and exactly 0 where the target is the cell's own condition.
    let changed = f.dir.join("preds-change.parquet");
    let o = predict(&["--target", "PERT03", "--change", "--plain", "--out", changed.to_str().unwrap_or_default()]);
    assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
    let (schema, batches) = read_parquet(&changed);
    assert_eq!(schema.fields().iter().map(|f| f.name().as_str()).next_back(), Some("change_log1p"));
    let change = vectors(&batches, "change_log1p");
    let own_file = f.dir.join("preds-own.parquet");
    let o = predict(&["--expected-log1p", "--change", "--out", own_file.to_str().unwrap_or_default()]);
    assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
    let (_, own_batches) = read_parquet(&own_file);
    let own = vectors(&own_batches, "expected_log1p");
    assert!(vectors(&own_batches, "change_log1p").iter().flatten().all(|v| *v == 0.0));
    assert_eq!(change.len(), own.len());
    for ((c, e), o) in change.iter().zip(&expected).zip(&own) {
        for g in 0..genes.len() {
            assert!((c[g] - (e[g] - o[g])).abs() < 1e-5, "gene {g}: change {} vs {} - {}", c[g], e[g], o[g]);
        }
    }
    assert!(change.iter().flatten().any(|v| v.abs() > 0.1), "PERT03 moves some gene");

    // A model without an nb dispersion cannot: an error naming the likelihood, no file.
    let config = f.dir.join("gauss.toml");
    std::fs::write(&config, "[model]\nrecon_loss = \"gauss\"\n").unwrap_or_else(|e| panic!("{e}"));
    let gauss = f.dir.join("run-gauss");
    let (store_arg, config_arg, run_arg) =
        (f.store.to_str().unwrap_or_default(), config.to_str().unwrap_or_default(), gauss.to_str().unwrap_or_default());
    let o = run(&[
        "train",
        "--store",
        store_arg,
        "--dose-key",
        "dose",
        "--covariates",
        "cell_type",
        "--config",
        config_arg,
        "--epochs",
        "1",
        "--threads",
        "1",
        "--allow-non-counts",
        "--out",
        run_arg,
        "-q",
    ]);
    assert!(o.status.success(), "train failed: {}", text(&o.stderr));
    let refused = f.dir.join("preds-elog-gauss.parquet");
    let o = run(&[
        "predict",
        "--model",
        run_arg,
        "--store",
        store_arg,
        "--target",
        "PERT03",
        "--expected-log1p",
        "--out",
        refused.to_str().unwrap_or_default(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--expected-log1p needs a model with the nb likelihood"), "{}", text(&o.stderr));
    assert!(!refused.exists());
    let o = run(&[
        "predict",
        "--model",
        run_arg,
        "--store",
        store_arg,
        "--target",
        "PERT03",
        "--change",
        "--out",
        refused.to_str().unwrap_or_default(),
    ]);
    assert!(text(&o.stderr).contains("--change needs a model with the nb likelihood"), "{}", text(&o.stderr));
    assert!(!refused.exists());

    // `--anchored` needs no dispersion: for a Gaussian model it moves the observed values (not
    // their log1p) by the change of the means.
    let anchored = |extra: &[&str], name: &str| -> Vec<RecordBatch> {
        let out = f.dir.join(name);
        let mut args = vec!["predict", "--model", run_arg, "--store", store_arg, "--anchored", "--threads", "1"];
        args.extend_from_slice(extra);
        args.extend(["--out", out.to_str().unwrap_or_default()]);
        let o = run(&args);
        assert!(o.status.success(), "predict --anchored failed: {}", text(&o.stderr));
        read_parquet(&out).1
    };
    let (target, own) =
        (anchored(&["--target", "PERT03"], "gauss-anchored.parquet"), anchored(&[], "gauss-own.parquet"));
    assert_eq!(strings(&target, "cell_id"), strings(&own, "cell_id"));
    let store = Store::open(&f.store).unwrap_or_else(|e| panic!("{e}"));
    let mut cursor = store.cursor().unwrap_or_else(|e| panic!("{e}"));
    let first = strings(&own, "cell_id")[0].clone();
    let obs = store.small_table(cpa_stream::unstable::schemas::StoreFiles::OBS).unwrap_or_else(|e| panic!("{e}"));
    let row = strings(std::slice::from_ref(&obs), "cell_id").iter().position(|id| *id == first).unwrap_or(usize::MAX);
    let (index, counts) = cursor.row(row as u64).unwrap_or_else(|e| panic!("{e}"));
    let mut observed = vec![0.0f64; genes.len()];
    for (&g, &v) in index.iter().zip(counts) {
        observed[g as usize] = f64::from(v);
    }
    let own_anchored = vectors(&own, "anchored");
    assert!(
        own_anchored[0].iter().zip(&observed).all(|(a, x)| (a - x).abs() <= 1e-5 * (1.0 + x.abs())),
        "observed values, not log1p"
    );
    let (t_mean, o_mean, t_anchored) = (means(&target), means(&own), vectors(&target, "anchored"));
    for i in 0..t_mean.len() {
        for g in 0..genes.len() {
            let by_hand = own_anchored[i][g] + t_mean[i][g] - o_mean[i][g];
            let close = (t_anchored[i][g] - by_hand).abs() <= 1e-5 * (1.0 + by_hand.abs());
            assert!(close, "cell {i} gene {g}: {} vs {by_hand}", t_anchored[i][g]);
        }
    }
}

#[test]
fn counts_are_whole_seeded_draws_whose_means_match_the_predicted_means_and_an_h5ad_holds_them() {
    use cpa_stream::unstable::stages::CsrBatch;
    use cpa_stream::unstable::stages::h5ad::H5adReader;
    let f = fixture();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let counted = |name: &str, extra: &[&str]| -> Vec<RecordBatch> {
        let out = dir.path().join(name);
        let out_arg = out.to_str().unwrap_or_default().to_owned();
        let targets = ["--target", "PERT01", "--target", "PERT03+PERT02", "--counts", "--threads", "1"];
        let o = predict(&[&targets[..], extra, &["--out", &out_arg]].concat());
        assert!(o.status.success(), "predict --counts failed: {}", text(&o.stderr));
        read_parquet(&out).1
    };
    let first = counted("a.parquet", &[]);
    let (counts, mean) = (vectors(&first, "counts"), means(&first));
    assert!(!counts.is_empty() && counts.len() == mean.len());
    assert!(counts.iter().flatten().all(|&c| c >= 0.0 && c.fract() == 0.0), "whole, non-negative counts");
    // Per target and gene, the mean count over the source cells against the mean of the
    // predicted means, within 5 standard errors.
    let conditions = strings(&first, "condition");
    for target in ["PERT01", "PERT03+PERT02"] {
        let rows: Vec<usize> = (0..conditions.len()).filter(|&r| conditions[r] == target).collect();
        let n = rows.len() as f64;
        assert!(n > 100.0, "{target}: {n} rows");
        for g in 0..mean[0].len() {
            let c: Vec<f64> = rows.iter().map(|&r| counts[r][g]).collect();
            let m = rows.iter().map(|&r| mean[r][g]).sum::<f64>() / n;
            let cm = c.iter().sum::<f64>() / n;
            // The variance at least the mean's: a negative binomial's is mu + mu^2 / theta.
            let var = (c.iter().map(|v| (v - cm).powi(2)).sum::<f64>() / (n - 1.0)).max(m);
            assert!((cm - m).abs() <= 5.0 * (var / n).sqrt(), "{target}, gene {g}: counts {cm} against mean {m}");
        }
    }
    // The same seed draws the same counts; a row's draws follow the row, not its batch (the
    // batch size orders the rows by batch, then target): at another batch size only the float
    // rounding of the means, which the model's matrix products may round otherwise for other
    // shapes, can move a draw. Another seed draws others.
    assert!(vectors(&counted("again.parquet", &[]), "counts") == counts, "the same seed drew other counts");
    let keyed = |batches: &[RecordBatch]| -> HashMap<(String, String), Vec<f64>> {
        let (ids, conditions) = (strings(batches, "cell_id"), strings(batches, "condition"));
        ids.into_iter().zip(conditions).zip(vectors(batches, "counts")).collect()
    };
    let (want, small) = (keyed(&first), keyed(&counted("b.parquet", &["--batch-size", "37"])));
    assert_eq!(small.len(), want.len());
    let entries = (counts.len() * counts[0].len()) as f64;
    let moved = want
        .iter()
        .map(|(k, v)| small.get(k).map_or(v.len(), |s| s.iter().zip(v).filter(|(a, b)| a != b).count()))
        .sum::<usize>() as f64;
    assert!(moved <= 0.001 * entries, "batch size 37 changed {moved} of {entries} draws");
    let other = keyed(&counted("c.parquet", &["--seed", "9"]));
    assert!(want.iter().all(|(k, v)| other.get(k) != Some(v)), "another seed drew the same counts for some row");
    // The .h5ad: the drawn rows in order, then the source's control cells as observed.
    let out = dir.path().join("p.h5ad");
    let o = predict(&[
        "--target",
        "PERT01",
        "--target",
        "PERT03+PERT02",
        "--counts",
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "predict --counts to .h5ad failed: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("AnnData of raw counts"), "{}", text(&o.stdout));
    let h5ad = H5adReader::open(&out, None).unwrap_or_else(|e| panic!("{e}"));
    let controls = obs(&f.store).0.iter().filter(|c| c.as_str() == "control").count();
    assert_eq!(h5ad.n_obs() as usize, counts.len() + controls);
    let mut rows = CsrBatch::new(h5ad.n_vars() as u32);
    h5ad.matrix().read_rows(0..h5ad.n_obs(), &mut rows).unwrap_or_else(|e| panic!("{e}"));
    for (r, want) in counts.iter().enumerate() {
        let mut dense = vec![0.0f64; want.len()];
        let (idx, data) = rows.row(r);
        idx.iter().zip(data).for_each(|(&g, &v)| dense[g as usize] = f64::from(v));
        assert_eq!(&dense, want, "row {r} of the .h5ad is not the Parquet file's counts");
    }
    let labels = h5ad.read_obs(0..h5ad.n_obs()).unwrap_or_else(|e| panic!("{e}"));
    let written = strings(std::slice::from_ref(&labels), "condition");
    assert_eq!(written[..counts.len()], conditions[..], "predicted rows keep the targets' labels");
    assert!(written[counts.len()..].iter().all(|c| c == "control"), "then the control cells");
    let observed = labels.column_by_name("observed").unwrap_or_else(|| panic!("no observed column")).as_boolean();
    assert_eq!(observed.true_count(), controls);
    // The observed rows are the control cells' own counts.
    let store = Store::open(&f.store).unwrap_or_else(|e| panic!("{e}"));
    let ids = strings(&[labels], "source_cell_id");
    let store_ids =
        strings(&[read_small_table(&f.store.join("obs.parquet")).unwrap_or_else(|e| panic!("{e}"))], "cell_id");
    let first_control = ids[counts.len()].clone();
    let at = store_ids.iter().position(|i| *i == first_control).unwrap_or_else(|| panic!("{first_control}")) as u64;
    let mut own = CsrBatch::new(store.n_vars() as u32);
    store.cursor().and_then(|mut c| c.read_range(at..at + 1, &mut own)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.row(counts.len()), own.row(0), "an observed control row is its cell's counts");
    // Refusals: an .h5ad without --counts, with --parts.
    let refused = |extra: &[&str], want: &str| {
        let bad = dir.path().join("bad.h5ad");
        let o = predict(&[&["--target", "PERT01", "--out", bad.to_str().unwrap_or_default()][..], extra].concat());
        assert!(!o.status.success() && text(&o.stderr).contains(want), "{}", text(&o.stderr));
        assert!(!bad.exists(), "a refused prediction wrote its file");
    };
    refused(&[], "add --counts");
    refused(&["--counts", "--parts"], "--parts");
    let o = predict(&["--target", "PERT01", "--counts", "--aggregate", "mean", "--out", "x.parquet"]);
    assert!(!o.status.success() && text(&o.stderr).contains("--counts with --aggregate"), "{}", text(&o.stderr));
}

#[test]
fn predict_anchored_is_the_observed_log1p_moved_by_the_models_change() {
    use cpa_stream::unstable::schemas::StoreFiles;
    let f = fixture();
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    // The observed side by hand: log1p of each control cell's counts, read from the store.
    let store = Store::open(&f.store).unwrap_or_else(|e| panic!("{e}"));
    let genes = store.n_vars() as usize;
    let obs = store.small_table(StoreFiles::OBS).unwrap_or_else(|e| panic!("{e}"));
    let ids = strings(std::slice::from_ref(&obs), "cell_id");
    let row_of: HashMap<&str, u64> = ids.iter().enumerate().map(|(r, id)| (id.as_str(), r as u64)).collect();
    let mut cursor = store.cursor().unwrap_or_else(|e| panic!("{e}"));
    let mut observed = |id: &str| -> Vec<f64> {
        let (index, values) = cursor.row(row_of[id]).unwrap_or_else(|e| panic!("{e}"));
        let mut dense = vec![0.0f64; genes];
        for (&g, &v) in index.iter().zip(values) {
            dense[g as usize] = f64::from(v).ln_1p();
        }
        dense
    };

    let target = f.dir.join("preds-anchored.parquet");
    let o = predict(&["--target", "PERT03", "--anchored", "--out", &s(&target)]);
    assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
    let (schema, batches) = read_parquet(&target);
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["cell_id", "condition", "dose", "cell_type", "is_anchored", "mean", "anchored"]);
    let own_file = f.dir.join("preds-anchored-own.parquet");
    let o = predict(&["--anchored", "--out", &s(&own_file)]);
    assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
    let (_, own_batches) = read_parquet(&own_file);
    let own: HashMap<String, (Vec<f64>, Vec<f64>)> = strings(&own_batches, "cell_id")
        .into_iter()
        .zip(means(&own_batches).into_iter().zip(vectors(&own_batches, "anchored")))
        .collect();
    let (cell_ids, mean, anchored) = (strings(&batches, "cell_id"), means(&batches), vectors(&batches, "anchored"));
    assert_eq!(cell_ids.len(), own.len(), "one row per control cell");
    let mut moved = 0usize;
    for ((id, m), a) in cell_ids.iter().zip(&mean).zip(&anchored).take(200) {
        let x = observed(id);
        let (own_mean, own_anchored) = &own[id];
        for g in 0..genes {
            // Under its own condition a cell's anchored prediction is what was observed.
            assert!((own_anchored[g] - x[g]).abs() < 1e-5, "cell {id} gene {g}: {} vs log1p {}", own_anchored[g], x[g]);
            let by_hand = x[g] + m[g].ln_1p() - own_mean[g].ln_1p();
            assert!((a[g] - by_hand).abs() < 1e-4, "cell {id} gene {g}: anchored {} vs {by_hand}", a[g]);
            moved += usize::from((a[g] - x[g]).abs() > 0.1);
        }
    }
    assert!(moved > 0, "PERT03 moves some gene of some cell");

    // Aggregated, the group's observed mean moved by the model's change of the group's mean.
    let aggregated = f.dir.join("preds-anchored-groups.parquet");
    let o = predict(&["--target", "PERT03", "--anchored", "--aggregate", "mean", "--out", &s(&aggregated)]);
    assert!(o.status.success(), "predict --aggregate failed: {}", text(&o.stderr));
    let (_, groups) = read_parquet(&aggregated);
    let cell_types = strings(&batches, "cell_type");
    let (group_types, group_anchored) = (strings(&groups, "cell_type"), vectors(&groups, "anchored"));
    assert_eq!(group_types.len(), 2, "two cell types: {group_types:?}");
    for (cell_type, got) in group_types.iter().zip(&group_anchored) {
        let members: Vec<usize> = (0..cell_ids.len()).filter(|&i| &cell_types[i] == cell_type).collect();
        for g in 0..genes {
            let n = members.len() as f64;
            let observed_mean = members.iter().map(|&i| own[&cell_ids[i]].1[g]).sum::<f64>() / n;
            let change = members.iter().map(|&i| mean[i][g].ln_1p() - own[&cell_ids[i]].0[g].ln_1p()).sum::<f64>() / n;
            let by_hand = observed_mean + change;
            assert!((got[g] - by_hand).abs() < 1e-4, "{cell_type} gene {g}: {} vs {by_hand}", got[g]);
        }
    }
}

/// The `is_anchored` column of every row.
fn flags(batches: &[RecordBatch], name: &str) -> Vec<bool> {
    batches
        .iter()
        .flat_map(|b| {
            let column = b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")).as_boolean();
            (0..column.len()).map(|i| column.value(i)).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn predictions_are_anchored_on_control_cells_by_default_and_say_which_rows_are() {
    let f = fixture();
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    let read = |args: &[&str], name: &str| {
        let out = f.dir.join(name);
        let o = predict(&[args, &["--threads", "1", "--out", &s(&out)]].concat());
        assert!(o.status.success(), "predict {args:?} failed: {}", text(&o.stderr));
        let (schema, batches) = read_parquet(&out);
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        (names, batches, text(&o.stdout))
    };
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()));

    // From the control cells (the default source): every row anchored, the same values as
    // anchoring every cell (--anchored), and the line says so.
    let (names, default, said) = read(&["--target", "PERT03"], "anchored-default.parquet");
    assert_eq!(names, ["cell_id", "condition", "dose", "cell_type", "is_anchored", "mean", "anchored"]);
    assert!(flags(&default, "is_anchored").iter().all(|&a| a), "control cells are anchored");
    assert!(said.contains("anchored: every one of the"), "{said}");
    let (_, every, _) = read(&["--target", "PERT03", "--anchored"], "anchored-every.parquet");
    let (d, e) = (vectors(&default, "anchored"), vectors(&every, "anchored"));
    assert!(d.iter().zip(&e).all(|(d, e)| close(d, e)), "the default anchors controls as --anchored does");
    assert!(d.iter().zip(means(&default)).any(|(a, m)| !close(a, &m.iter().map(|x| x.ln_1p()).collect::<Vec<_>>())));

    // From every cell: the controls are anchored, the perturbed cells hold log1p(mean); a target
    // that moves the cells to one cell type anchors only the controls of that type.
    let (_, all, said) = read(&["--source", "all", "--target", "PERT03"], "anchored-all.parquet");
    let (conditions, is_anchored) = (strings(&all, "condition"), flags(&all, "is_anchored"));
    let ids = strings(&all, "cell_id");
    let (store_conditions, _, store_types) = obs(&f.store);
    let store_ids =
        strings(&[read_small_table(&f.store.join("obs.parquet")).unwrap_or_else(|e| panic!("{e}"))], "cell_id");
    let row_of: HashMap<&str, usize> = store_ids.iter().enumerate().map(|(r, id)| (id.as_str(), r)).collect();
    assert!(conditions.iter().all(|c| c == "PERT03"), "the target's label on every row");
    let controls = ids.iter().filter(|id| store_conditions[row_of[id.as_str()]] == "control").count();
    for (id, &a) in ids.iter().zip(&is_anchored) {
        assert_eq!(a, store_conditions[row_of[id.as_str()]] == "control", "cell {id}");
    }
    assert!(said.contains(&format!("anchored: {controls} of {} rows", ids.len())), "{said}");
    for ((a, m), anchored) in vectors(&all, "anchored").iter().zip(means(&all)).zip(&is_anchored) {
        let plain: Vec<f64> = m.iter().map(|x| x.ln_1p()).collect();
        if !anchored {
            assert!(close(a, &plain), "an unanchored row holds log1p(mean)");
        }
    }
    let one_type = &store_types[0];
    let spec = format!("condition=PERT03,cell_type={one_type}");
    let (_, moved, _) = read(&["--target", &spec], "anchored-moved.parquet");
    for (id, a) in strings(&moved, "cell_id").iter().zip(flags(&moved, "is_anchored")) {
        assert_eq!(a, &store_types[row_of[id.as_str()]] == one_type, "cell {id} of another type is not anchored");
    }

    // Two targets, the second moving the cells to that type, from the other type's controls: each
    // step anchors every row of the first pass and none of the second.
    let other_type = store_types.iter().find(|t| *t != one_type).unwrap_or_else(|| panic!("two cell types"));
    let others = format!("condition == control and cell_type == {other_type}");
    let (_, two, _) = read(&["--source", &others, "--target", "PERT03", "--target", &spec], "anchored-two.parquet");
    let (two_ids, two_flags) = (strings(&two, "cell_id"), flags(&two, "is_anchored"));
    let (two_anchored, two_means) = (vectors(&two, "anchored"), means(&two));
    // Each step writes its first target's rows, then its second's: a cell's first row is the first.
    let mut seen = std::collections::HashSet::new();
    let mut plain_rows = 0;
    for (i, id) in two_ids.iter().enumerate() {
        let first_target = seen.insert(id.as_str());
        let expected = first_target || store_types[row_of[id.as_str()]] == *one_type;
        assert_eq!(two_flags[i], expected, "row {i} (cell {id})");
        if !expected {
            let plain: Vec<f64> = two_means[i].iter().map(|x| x.ln_1p()).collect();
            assert!(close(&two_anchored[i], &plain), "row {i}: not anchored, so log1p(mean)");
            plain_rows += 1;
        }
    }
    assert!(plain_rows > 0, "some cells of the other type");

    // Aggregates count the anchored cells of each group.
    let (names, groups, _) =
        read(&["--source", "all", "--target", "PERT03", "--aggregate", "mean"], "anchored-groups.parquet");
    assert!(names.iter().any(|n| n == "n_anchored"), "{names:?}");
    let counted: u64 = groups
        .iter()
        .map(|b| {
            let c = b.column_by_name("n_anchored").unwrap_or_else(|| panic!("no n_anchored"));
            c.as_primitive::<arrow_array::types::UInt64Type>().values().iter().sum::<u64>()
        })
        .sum();
    assert_eq!(counted, controls as u64);

    // --plain: the mean only; a reconstruction is not anchored; the two flags exclude each other.
    let (names, _, said) = read(&["--target", "PERT03", "--plain"], "anchored-plain.parquet");
    assert_eq!(names, ["cell_id", "condition", "dose", "cell_type", "mean"]);
    assert!(!said.contains("anchored: ") && !said.contains("not anchored"), "{said}");
    let (names, _, _) = read(&[], "anchored-reconstruction.parquet");
    assert!(!names.iter().any(|n| n == "anchored" || n == "is_anchored"), "{names:?}");
    let o = predict(&["--target", "PERT03", "--plain", "--anchored", "--out", &s(&f.dir.join("both.parquet"))]);
    assert!(!o.status.success() && text(&o.stderr).contains("--plain"), "{}", text(&o.stderr));
}

#[test]
fn a_held_out_combination_beats_the_control_mean_against_the_truth() {
    let f = fixture();
    let eval = f.dir.join("eval-test");
    evaluate(&eval, "test");
    let (_, batches) = read_parquet(&eval.join("metrics.parquet"));
    let n = batches[0].num_rows();
    let n_cells = batches[0].column_by_name("n_cells").map(|c| c.as_primitive::<UInt64Type>().clone());
    let n_cells = n_cells.unwrap_or_else(|| panic!("no n_cells"));
    let conditions = strings(&batches, "condition");
    let held: Vec<usize> = (0..n).filter(|&i| n_cells.value(i) == 0).collect();
    assert!(!held.is_empty(), "the held-back combination is evaluated against the truth: {conditions:?}");
    let mut report = HashMap::new();
    for &i in &held {
        let (model, baseline) = (metric(&batches, "truth_r2_mean", i), metric(&batches, "truth_r2_mean_control", i));
        report.insert(format!("{} {}", conditions[i], strings(&batches, "cell_type")[i]), (model, baseline));
        assert!(conditions[i].contains('+'), "held-back groups are combinations");
        let delta = metric(&batches, "truth_r2_delta", i);
        eprintln!("{}: truth R2 {model:.3} (control mean {baseline:.3}), of the change {delta:.3}", conditions[i]);
        assert!(model > baseline + 0.05, "{}: model R2 {model:.3} vs control mean {baseline:.3}", conditions[i]);
        assert!(delta > 0.4, "{}: R2 of the change vs control {delta:.3}", conditions[i]);
    }
    eprintln!("held-out combination, R2 of log1p means against the truth (model, control mean): {report:?}");

    // Uncertainty (cpa-tools' compute_uncertainty): a condition seen in training is its own
    // closest training condition at distance 0; the held-out combination lies away from all.
    let closest = strings(&batches, "closest_condition");
    let doses = strings(&batches, "dose");
    for i in (0..n).filter(|&i| n_cells.value(i) >= 10) {
        // Sample metrics: computed wherever the condition has the cells.
        for m in ["energy_distance", "energy_distance_control"] {
            let e = metric(&batches, m, i);
            assert!(e.is_finite() && e > -1e-9, "{m} of {}: {e}", conditions[i]);
        }
    }
    for i in (0..n).filter(|&i| n_cells.value(i) > 0) {
        let d = metric(&batches, "uncertainty_euclidean", i);
        assert!(d < 1e-6, "{} seen in training: distance {d}", conditions[i]);
        assert!(
            closest[i].starts_with(&format!("{} {}", conditions[i], doses[i])),
            "{} -> {}",
            conditions[i],
            closest[i]
        );
    }
    for &i in &held {
        let (cos, euc) = (metric(&batches, "uncertainty_cosine", i), metric(&batches, "uncertainty_euclidean", i));
        eprintln!("{}: uncertainty cosine {cos:.3}, euclidean {euc:.3}, closest {}", conditions[i], closest[i]);
        assert!(euc > 0.1 && cos > 0.0, "{}: cosine {cos}, euclidean {euc}", conditions[i]);
        assert!(!closest[i].is_empty() && !closest[i].starts_with(&conditions[i]), "{}", closest[i]);
    }
}

#[test]
fn the_library_streams_record_batches_and_exports_an_arrow_c_stream() {
    use cpa_stream::predict::parse_target_spec;
    use cpa_stream::predict::{GeneSelection, PredictOptions, Predictor};

    let f = fixture();
    let mut options = PredictOptions::new(&f.run, &f.store);
    options.targets = vec![parse_target_spec("condition=PERT02,dose=1").unwrap_or_else(|e| panic!("{e}"))];
    options.genes = GeneSelection::Names(vec!["GENE007".into(), "GENE003".into()]);
    options.batch_size = 50;
    let predictor = Predictor::open(&options).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(predictor.genes(), ["GENE007", "GENE003"]);
    let schema = predictor.schema();
    let direct: Vec<RecordBatch> =
        predictor.stream().unwrap_or_else(|e| panic!("{e}")).map(|b| b.unwrap_or_else(|e| panic!("{e}"))).collect();
    assert!(direct.len() > 1, "several batches of 50 control cells");
    assert!(direct.iter().all(|b| b.schema() == schema));

    // Through the Arrow C stream interface, as another runtime would read it.
    let ffi = Predictor::open(&options)
        .unwrap_or_else(|e| panic!("{e}"))
        .stream()
        .unwrap_or_else(|e| panic!("{e}"))
        .into_ffi();
    let reader = arrow_array::ffi_stream::RecordBatchStreamReader::try_new(ffi).unwrap_or_else(|e| panic!("{e}"));
    let imported: Vec<RecordBatch> = reader.map(|b| b.unwrap_or_else(|e| panic!("{e}"))).collect();
    assert_eq!(means(&imported), means(&direct), "same predictions through the C stream");
    assert_eq!(strings(&imported, "cell_id"), strings(&direct, "cell_id"));

    // The full prediction's columns agree with the selected genes.
    options.genes = GeneSelection::All;
    let all: Vec<RecordBatch> = Predictor::open(&options)
        .unwrap_or_else(|e| panic!("{e}"))
        .stream()
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|b| b.unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let (full, picked) = (means(&all), means(&direct));
    for (row, p) in full.iter().zip(&picked) {
        assert_eq!(p, &vec![row[6], row[2]]);
    }

    // An error inside a stage ends the stream with that error.
    let mut bad = PredictOptions::new(&f.run, &f.store);
    bad.source = Some("cell_type == CT01".into());
    bad.targets = Vec::new();
    let err = Predictor::open(&PredictOptions { source: Some("nonexistent == 1".into()), ..bad })
        .and_then(|p| p.stream())
        .map(|mut stream| stream.find_map(Result::err).map(|e| e.to_string()).unwrap_or_default())
        .unwrap_or_else(|e| e.to_string());
    assert!(err.contains("\"nonexistent\", which does not exist"), "{err}");
}

#[test]
fn embeddings_are_written_once_and_match_the_model() {
    let f = fixture();
    let out = f.dir.join("embeddings");
    let model = f.run.to_str().unwrap_or_default();
    let o = run(&["embeddings", "--model", model, "--out", out.to_str().unwrap_or_default(), "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}"));
    let file = cpa_stream::unstable::stages::model::files::read_model_file(&f.run.join("model"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (schema, batches) = read_parquet(&out.join("perturbations.parquet"));
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, file.vocabulary.perturbations.len() - 1, "every perturbation but the padding entry");
    assert_eq!(report["perturbations"].as_u64(), Some(rows as u64));
    let width = match schema.field_with_name("embedding").map(|f| f.data_type().clone()) {
        Ok(arrow_schema::DataType::FixedSizeList(_, w)) => w as usize,
        other => panic!("embedding column: {other:?}"),
    };
    assert_eq!(width, file.config.model.n_latent);
    let names = strings(&batches, "name");
    assert!(names.contains(&file.vocabulary.control().to_owned()));
    let (_, covs) = read_parquet(&out.join("covariates.parquet"));
    let categories: usize = file.vocabulary.covariates.iter().map(|c| c.categories.len()).sum();
    assert_eq!(covs.iter().map(|b| b.num_rows()).sum::<usize>(), categories);
    // An existing output is refused without --overwrite.
    let again = run(&["embeddings", "--model", model, "--out", out.to_str().unwrap_or_default()]);
    assert!(!again.status.success() && text(&again.stderr).contains("already exists"), "{}", text(&again.stderr));
}

/// Per group of rows (by the labels `keys`), the count, mean and sample variance of `values`.
fn group_stats(keys: &[Vec<String>], values: &[Vec<f64>]) -> HashMap<Vec<String>, (u64, Vec<f64>, Vec<f64>)> {
    let mut rows: HashMap<Vec<String>, Vec<usize>> = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        rows.entry(k.clone()).or_default().push(i);
    }
    rows.into_iter()
        .map(|(k, members)| {
            let width = values[members[0]].len();
            let n = members.len() as f64;
            let mean: Vec<f64> = (0..width).map(|g| members.iter().map(|&r| values[r][g]).sum::<f64>() / n).collect();
            let var: Vec<f64> = (0..width)
                .map(|g| members.iter().map(|&r| (values[r][g] - mean[g]).powi(2)).sum::<f64>() / (n - 1.0))
                .collect();
            (k, (members.len() as u64, mean, var))
        })
        .collect()
}

#[test]
fn aggregates_equal_the_per_cell_predictions_aggregated_afterwards() {
    let f = fixture();
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    let common =
        ["--source", "all", "--target", "PERT01", "--target", "PERT03", "--expected-log1p", "--latents", "z_basal"];
    let cells = f.dir.join("agg-cells.parquet");
    let mut args = common.to_vec();
    let cells_path = s(&cells);
    args.extend(["--out", &cells_path]);
    let o = predict(&args);
    assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
    let (_, batches) = read_parquet(&cells);
    let labels: Vec<Vec<String>> = {
        let (c, d, t) = (strings(&batches, "condition"), strings(&batches, "dose"), strings(&batches, "cell_type"));
        (0..c.len()).map(|i| vec![c[i].clone(), d[i].clone(), t[i].clone()]).collect()
    };
    let aggregated = f.dir.join("agg-groups.parquet");
    let mut args = common.to_vec();
    let aggregated_path = s(&aggregated);
    args.extend(["--aggregate", "mean,var", "--out", &aggregated_path]);
    let o = predict(&args);
    assert!(o.status.success(), "predict --aggregate failed: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("groups (aggregates of 6000 source cells x 2 targets)"), "{}", text(&o.stdout));
    let (schema, groups) = read_parquet(&aggregated);
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [
            "condition",
            "dose",
            "cell_type",
            "n_cells",
            "n_anchored",
            "mean",
            "mean_var",
            "expected_log1p",
            "expected_log1p_var",
            "anchored",
            "anchored_var",
            "z_basal",
            "z_basal_var"
        ]
    );
    let group_labels: Vec<Vec<String>> = {
        let (c, d, t) = (strings(&groups, "condition"), strings(&groups, "dose"), strings(&groups, "cell_type"));
        (0..c.len()).map(|i| vec![c[i].clone(), d[i].clone(), t[i].clone()]).collect()
    };
    let counts: Vec<u64> = groups
        .iter()
        .flat_map(|b| {
            b.column_by_name("n_cells").map(|c| c.as_primitive::<UInt64Type>().values().to_vec()).unwrap_or_default()
        })
        .collect();
    let mut sorted = group_labels.clone();
    sorted.sort();
    assert_eq!(group_labels, sorted, "rows ordered by the targets, then the groups' labels");
    assert_eq!(group_labels.len(), 4, "2 targets x 2 cell types: {group_labels:?}");
    // Each group's anchored cells: its control cells (the targets keep the cell types).
    let anchored_cells: Vec<u64> = groups
        .iter()
        .flat_map(|b| {
            b.column_by_name("n_anchored").map(|c| c.as_primitive::<UInt64Type>().values().to_vec()).unwrap_or_default()
        })
        .collect();
    let flagged = flags(&batches, "is_anchored");
    for (i, key) in group_labels.iter().enumerate() {
        let by_hand = (0..labels.len()).filter(|&r| labels[r] == *key && flagged[r]).count() as u64;
        assert_eq!(anchored_cells[i], by_hand, "{key:?}");
        assert!(by_hand > 0 && by_hand < counts[i], "{key:?}: some control cells among all");
    }
    for column in ["mean", "expected_log1p", "anchored", "z_basal"] {
        let by_hand = group_stats(&labels, &vectors(&batches, column));
        let (means, vars) = (vectors(&groups, column), vectors(&groups, &format!("{column}_var")));
        for (i, key) in group_labels.iter().enumerate() {
            let (n, mean, var) = &by_hand[key];
            assert_eq!(counts[i], *n, "{key:?}");
            for g in 0..mean.len() {
                let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * (1.0 + b.abs());
                assert!(close(means[i][g], mean[g], 1e-5), "{column} {key:?} gene {g}: {} vs {}", means[i][g], mean[g]);
                assert!(close(vars[i][g], var[g], 1e-4), "{column}_var {key:?} gene {g}: {} vs {}", vars[i][g], var[g]);
            }
        }
    }

    // Grouped by an obs column that is not a covariate (here each cell's id): one row per cell
    // and target, equal to the cell's own prediction, its variance undefined (null).
    let by_cell = f.dir.join("agg-by-cell.parquet");
    let by_cell_path = s(&by_cell);
    let o = predict(&[
        "--source",
        "cell_type == CT01",
        "--target",
        "PERT01",
        "--aggregate",
        "var,mean",
        "--group-by",
        "cell_id",
        "--out",
        &by_cell_path,
    ]);
    assert!(o.status.success(), "predict --group-by cell_id failed: {}", text(&o.stderr));
    let (schema, rows) = read_parquet(&by_cell);
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        ["condition", "dose", "cell_id", "n_cells", "n_anchored", "mean", "mean_var", "anchored", "anchored_var"]
    );
    let ids = strings(&rows, "cell_id");
    let per_cell: HashMap<String, Vec<f64>> = {
        let all_ids = strings(&batches, "cell_id");
        let all_means = means(&batches);
        let conditions = strings(&batches, "condition");
        all_ids
            .into_iter()
            .zip(all_means)
            .zip(conditions)
            .filter(|(_, c)| c == "PERT01")
            .map(|((i, m), _)| (i, m))
            .collect()
    };
    let aggregated_means = means(&rows);
    assert!(!ids.is_empty());
    for (id, mean) in ids.iter().zip(&aggregated_means) {
        let own = &per_cell[id];
        assert!(mean.iter().zip(own).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs())), "cell {id}");
    }
    for b in &rows {
        let var = b.column_by_name("mean_var").unwrap_or_else(|| panic!("no mean_var"));
        assert_eq!(var.null_count(), b.num_rows(), "a group of one cell has no sample variance");
    }

    // Asked wrongly: an error naming the flag or the column, and no file.
    let refused = f.dir.join("agg-refused.parquet");
    let refused_path = s(&refused);
    for (args, expected) in [
        (vec!["--aggregate", "mean", "--group-by", "condition"], "always groups the rows"),
        (vec!["--aggregate", "mean", "--group-by", "celltype"], "\"cell_type\""),
        (vec!["--group-by", "cell_type"], "--aggregate"),
        (vec!["--aggregate", "mean", "--layout", "wide"], "long layout"),
        (vec!["--aggregate", "mean", "--shard", "0/2"], "--shard"),
        (vec!["--aggregate", "mean,mean"], "listed twice"),
        (vec!["--aggregate", "median"], "expected mean or var"),
    ] {
        let mut all = vec!["--target", "PERT01", "--out", &refused_path];
        all.extend(args.iter().copied());
        let o = predict(&all);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(text(&o.stderr).contains(expected), "{args:?}: {}", text(&o.stderr));
        assert!(!refused.exists(), "{args:?} left a file");
    }
}

#[test]
fn bench_predict_reports_the_predictor_and_the_sink_side_by_side() {
    let f = fixture();
    let o = run(&[
        "bench",
        "predict",
        "--model",
        f.run.to_str().unwrap_or_default(),
        "--store",
        f.store.to_str().unwrap_or_default(),
        "--source",
        "cell_type == CT01",
        "--target",
        "PERT01",
        "--modes",
        "fast,aggregate",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "bench predict failed: {}", text(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o.stdout)));
    let rounds = r["rounds"].as_array().unwrap_or_else(|| panic!("no rounds: {r}"));
    assert_eq!(rounds.len(), 2);
    let (fast, aggregate) = (&rounds[0], &rounds[1]);
    assert_eq!((fast["mode"].as_str(), aggregate["mode"].as_str()), (Some("fast"), Some("aggregate")));
    // The same predictions either way: one row each in the file, or one row per cell type group.
    assert_eq!(fast["predictions"], aggregate["predictions"]);
    assert_eq!(fast["rows"], fast["predictions"]);
    assert_eq!(aggregate["rows"].as_u64(), Some(1));
    for round in rounds {
        for key in ["per_s", "predictor_per_s", "sink_per_s", "sink_share"] {
            assert!(round[key].as_f64().is_some_and(|v| v.is_finite() && v >= 0.0), "{key}: {round}");
        }
    }
    assert_eq!(r["genes"].as_u64(), Some(100));
}

/// A second model of the fixture's store: the same keys and configuration, another seed and
/// fewer epochs (an ensemble's other member), or without the covariate (`covariates` false).
fn other_run(name: &str, covariates: bool) -> PathBuf {
    let f = fixture();
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    let out = f.dir.join(name);
    let config = repo_root().join(CONFIG);
    let mut args = vec!["train", "--store", f.store.to_str().unwrap_or_default(), "--dose-key", "dose"];
    if covariates {
        args.extend(["--covariates", "cell_type"]);
    }
    let (config, out_text) = (s(&config), s(&out));
    // Another seed, the fixture's split (its split seed is its seed, the configuration's 1).
    let split = ["--seed", "11", "--split-seed", "1"];
    args.extend([&["--config", &config, "--epochs", "5", "--threads", "1", "--out", &out_text][..], &split].concat());
    let o = run(&args);
    assert!(o.status.success(), "train failed: {}", text(&o.stderr));
    out
}

/// The ensemble tests' second member (trained once).
fn second_run() -> &'static PathBuf {
    static SECOND: OnceLock<PathBuf> = OnceLock::new();
    SECOND.get_or_init(|| other_run("run-seed-11", true))
}

#[test]
fn an_ensemble_writes_the_mean_of_its_models_predictions() {
    let f = fixture();
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    let second = second_run();
    let columns = ["mean", "expected_log1p", "change_log1p", "anchored"];
    let flags = ["--target", "PERT03", "--target", "condition=PERT01+PERT02,dose=1+1", "--expected-log1p", "--change"];
    let flags = [&flags[..], &["--anchored"]].concat();
    let predict_with = |model: &Path, extra: &[&str], out: &Path| {
        let mut args = vec!["predict", "--model", model.to_str().unwrap_or_default(), "--store"];
        args.push(f.store.to_str().unwrap_or_default());
        let out = s(out);
        args.extend_from_slice(&flags);
        args.extend_from_slice(extra);
        args.extend(["--out", &out]);
        let o = run(&args);
        assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
        assert!(!text(&o.stderr).contains("another split"), "one split: {}", text(&o.stderr));
        let models = if extra.contains(&"--ensemble") { "each the mean of 2 models" } else { "target" };
        assert!(text(&o.stderr).contains(models) || text(&o.stdout).contains(models), "{}", text(&o.stdout));
        read_parquet(Path::new(&out))
    };
    let (_, first) = predict_with(&f.run, &[], &f.dir.join("ens-first.parquet"));
    let (_, other) = predict_with(second, &[], &f.dir.join("ens-second.parquet"));
    let second_text = s(second);
    let (schema, both) = predict_with(&f.run, &["--ensemble", &second_text], &f.dir.join("ens-both.parquet"));
    assert_eq!(strings(&both, "cell_id"), strings(&first, "cell_id"), "the same rows in the same order");
    assert_eq!(strings(&both, "condition"), strings(&first, "condition"));
    let mut differ = 0usize;
    for name in columns {
        let (a, b, e) = (vectors(&first, name), vectors(&other, name), vectors(&both, name));
        assert_eq!(e.len(), a.len(), "{name}: rows");
        for ((a, b), e) in a.iter().zip(&b).zip(&e) {
            for g in 0..a.len() {
                let mean = (a[g] + b[g]) / 2.0;
                assert!((e[g] - mean).abs() <= 1e-5 * (1.0 + mean.abs()), "{name} gene {g}: {} vs {mean}", e[g]);
                differ += usize::from((a[g] - b[g]).abs() > 1e-3 * (1.0 + a[g].abs()));
            }
        }
    }
    assert!(differ > 0, "the two models predict differently, so the mean is not either one");
    // The file names its models.
    let meta = schema.metadata();
    let listed: serde_json::Value =
        serde_json::from_str(&meta["cpa_stream.ensemble"]).unwrap_or_else(|e| panic!("ensemble metadata: {e}"));
    let listed = listed.as_array().unwrap_or_else(|| panic!("a list: {listed}"));
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["model_id"].as_str(), Some(meta["cpa_stream.model_id"].as_str()));
    assert!(listed[1]["model"].as_str().is_some_and(|p| p.ends_with("run-seed-11/model")), "{listed:?}");
    assert_ne!(listed[0]["model_id"], listed[1]["model_id"]);

    // Aggregated: each group's statistic of the averaged columns.
    let (_, one) = predict_with(&f.run, &["--aggregate", "mean"], &f.dir.join("ens-first-agg.parquet"));
    let (_, two) = predict_with(second, &["--aggregate", "mean"], &f.dir.join("ens-second-agg.parquet"));
    let (_, agg) =
        predict_with(&f.run, &["--aggregate", "mean", "--ensemble", &second_text], &f.dir.join("ens-agg.parquet"));
    for name in columns {
        let (a, b, e) = (vectors(&one, name), vectors(&two, name), vectors(&agg, name));
        assert_eq!((e.len(), a.len()), (4, 4), "{name}: two targets x two cell types");
        for ((a, b), e) in a.iter().zip(&b).zip(&e) {
            for g in 0..a.len() {
                let mean = (a[g] + b[g]) / 2.0;
                assert!((e[g] - mean).abs() <= 1e-4 * (1.0 + mean.abs()), "{name} gene {g}: {} vs {mean}", e[g]);
            }
        }
    }
}

#[test]
fn an_ensemble_refuses_latents_the_same_model_twice_and_runs_that_differ() {
    let f = fixture();
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    let out = s(&f.dir.join("ens-refused.parquet"));
    let run_dir = s(&f.run);
    let expect_error = |args: &[&str], words: &[&str]| {
        let o = predict(&[args, &["--target", "PERT03", "--out", &out]].concat());
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        for w in words {
            assert!(err.contains(w), "{args:?}: {w:?} not in {err}");
        }
        assert!(!Path::new(&out).exists(), "no output on an error");
    };
    let second = s(second_run());
    expect_error(&["--ensemble", &second, "--latents", "z_basal"], &["latents", "z_basal", "ensemble"]);
    expect_error(&["--ensemble", &run_dir], &["the same model", "xxh3-64:"]);
    let without = s(&other_run("run-no-covariates", false));
    expect_error(&["--ensemble", &without], &["ensemble member", "run-no-covariates", "covariates", "cell_type"]);
    expect_error(&["--ensemble", "/nonexistent/run"], &["/nonexistent/run"]);
    // A run of another store (other genes): the error names the member, not the first model.
    let (tiny_store, tiny_run) = (s(&f.dir.join("tiny.store")), s(&f.dir.join("tiny-run")));
    let o =
        run(&["synth", "--cells", "300", "--genes", "40", "--perturbations", "3", "--seed", "5", "--out", &tiny_store]);
    assert!(o.status.success(), "synth failed: {}", text(&o.stderr));
    let o = run(&["train", "--store", &tiny_store, "--epochs", "1", "--threads", "1", "--out", &tiny_run, "-q"]);
    assert!(o.status.success(), "train failed: {}", text(&o.stderr));
    expect_error(&["--ensemble", &tiny_run], &["ensemble member", "tiny-run", "40"]);
}

/// `evaluate --ensemble` scores by default what `predict --ensemble` writes as `anchored` for the
/// same control cells, and `evaluate --ensemble --plain` the log1p of the models' averaged means.
#[test]
fn an_evaluation_of_an_ensemble_scores_its_predictions_plain_and_anchored() {
    let f = fixture();
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    let second = s(second_run());
    let (model, store) = (s(&f.run), s(&f.store));
    let evaluate_with = |extra: &[&str], out: &Path| {
        let out = s(out);
        let args = [&["evaluate", "--model", &model, "--store", &store, "--split", "all"][..], extra].concat();
        let o = run(&[&args[..], &["--out", &out]].concat());
        assert!(o.status.success(), "evaluate {extra:?} failed: {}", text(&o.stderr));
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(Path::new(&out).join("summary.json")).unwrap_or_default())
                .unwrap_or_else(|e| panic!("summary.json: {e}"));
        (text(&o.stdout), summary, read_parquet(&Path::new(&out).join("metrics.parquet")).1)
    };
    let (printed, summary, anchored) = evaluate_with(&["--ensemble", &second], &f.dir.join("eval-ens-anchored"));
    let svg = std::fs::read_to_string(f.dir.join("eval-ens-anchored/overview.svg")).unwrap_or_default();
    assert!(svg.contains("anchored, mean of 2 models"), "the overview says what it scores: {:.300}", svg);
    assert!(printed.contains("each prediction the mean of 2 models") && printed.contains("anchored"), "{printed}");
    assert_eq!(summary["predicted"].as_str(), Some("anchored log1p"));
    let listed = summary["ensemble"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 2, "ensemble: {}", summary["ensemble"]);
    assert!(listed[1]["model"].as_str().is_some_and(|p| p.ends_with("run-seed-11/model")), "{listed:?}");
    let (_, plain_summary, plain) =
        evaluate_with(&["--ensemble", &second, "--no-plots", "--plain"], &f.dir.join("eval-ens-plain"));
    assert_eq!(plain_summary["predicted"].as_str(), Some("log1p(mean)"));
    let (_, single_summary, single) = evaluate_with(&["--no-plots", "--plain"], &f.dir.join("eval-single"));
    assert!(single_summary.get("ensemble").is_none(), "one model lists no ensemble: {}", single_summary["ensemble"]);

    let (ec, ed, et) = (strings(&anchored, "condition"), strings(&anchored, "dose"), strings(&anchored, "cell_type"));
    let row = (0..ec.len()).find(|&i| !ec[i].contains('+') && ec[i] != "control");
    let row = row.unwrap_or_else(|| panic!("no single-perturbation condition evaluated: {ec:?}"));
    let (condition, dose, cell_type) = (&ec[row], &ed[row], &et[row]);
    let ((real, _), (control, _)) = log1p_rows(&f.store, condition, dose, cell_type);
    let (real_mean, real_var) = mean_var(&real);
    let (ctrl_mean, _) = mean_var(&control);
    let source = format!("condition == control and cell_type == {cell_type}");
    let target = format!("condition={condition},dose={dose},cell_type={cell_type}");
    let preds = f.dir.join("eval-ens-hand.parquet");
    let o = predict(&[
        "--source",
        &source,
        "--target",
        &target,
        "--ensemble",
        &second,
        "--anchored",
        "--out",
        preds.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
    let written = read_parquet(&preds).1;
    let by_hand = |predicted: &[Vec<f64>]| {
        let (pred_mean, pred_var) = mean_var(predicted);
        let delta = |m: &[f64]| -> Vec<f64> { m.iter().zip(&ctrl_mean).map(|(a, b)| a - b).collect() };
        [
            ("r2_mean", r2(&pred_mean, &real_mean)),
            ("r2_var", r2(&pred_var, &real_var)),
            ("r2_delta", r2(&delta(&pred_mean), &delta(&real_mean))),
            (
                "mse",
                pred_mean.iter().zip(&real_mean).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / real_mean.len() as f64,
            ),
        ]
    };
    let anchored_cells = vectors(&written, "anchored");
    let plain_cells: Vec<Vec<f64>> =
        means(&written).into_iter().map(|r| r.into_iter().map(f64::ln_1p).collect()).collect();
    assert_eq!((anchored_cells.len(), plain_cells.len()), (control.len(), control.len()));
    for (what, batches, cells) in [("plain", &plain, &plain_cells), ("anchored", &anchored, &anchored_cells)] {
        let rows = strings(batches, "condition");
        let i = (0..rows.len())
            .find(|&i| rows[i] == *condition && strings(batches, "cell_type")[i] == *cell_type)
            .unwrap_or_else(|| panic!("{what}: {condition} {cell_type} not evaluated"));
        for (name, expected) in by_hand(cells) {
            let got = metric(batches, name, i);
            assert!((got - expected).abs() < 1e-4, "{what} {name}: evaluate {got}, by hand {expected}");
        }
    }
    // The three evaluations score different predictions.
    let r2_of = |b: &[RecordBatch]| metric(b, "r2_mean", row);
    assert!((r2_of(&anchored) - r2_of(&plain)).abs() > 1e-6, "anchored and plain differ");
    assert!((r2_of(&plain) - r2_of(&single)).abs() > 1e-6, "the ensemble differs from its first model");
    // The anchored prediction moves in log1p of the means: the expected log1p is refused with it.
    let o = run(&[
        "evaluate",
        "--model",
        &model,
        "--store",
        &store,
        "--anchored",
        "--expected-log1p",
        "--out",
        &s(&f.dir.join("eval-refused")),
    ]);
    assert!(!o.status.success() && text(&o.stderr).contains("--expected-log1p"), "{}", text(&o.stderr));
}

/// A perturbation without training cells has no effect: the model decodes it as the control (its
/// latent without the control's own learned term, as before 2026-11-27, was a state no training
/// cell was in, and moved the prediction by up to 0.66 of log1p here). A variational model's
/// anchored change comes from one set of `z_basal` draws decoded under both conditions
/// (`evaluate` encodes each control cell once per model, as `predict` does), so the anchored
/// prediction of such a perturbation is the observed controls to the bit, and is scored exactly
/// as the control mean. Draws taken anew for the second decoding (as `evaluate` did before
/// 2026-11-27) would move it by their noise.
#[test]
fn a_perturbation_without_training_cells_is_predicted_as_the_control_from_one_set_of_draws() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    let store = dir.path().join("v.store");
    let o = run(&[
        "synth",
        "--cells",
        "1500",
        "--genes",
        "40",
        "--perturbations",
        "3",
        "--doses",
        "1",
        "--cell-types",
        "2",
        "--combinations",
        "0",
        "--seed",
        "7",
        "--out",
        &s(&store),
    ]);
    assert!(o.status.success(), "synth failed: {}", text(&o.stderr));
    let config = dir.path().join("variational.toml");
    std::fs::write(&config, "[model]\nvariational = true\nn_samples = 3\n").unwrap_or_else(|e| panic!("{e}"));
    let model = dir.path().join("run");
    train_synthetic(&store, &config, &model, &["--holdout", "PERT02", "--epochs", "3", "--batch-size", "128"]);
    let evaluate = |split: &str, extra: &[&str]| {
        let out = dir.path().join(format!("eval-{split}-{}", extra.len()));
        let args = ["evaluate", "--model", &s(&model), "--store", &s(&store), "--split", split, "--no-plots"];
        let o = run(&[&args[..], extra, &["--threads", "1", "--out", &s(&out)]].concat());
        assert!(o.status.success(), "evaluate --split {split} {extra:?} failed: {}", text(&o.stderr));
        read_parquet(&out.join("metrics.parquet")).1
    };
    // The conditions scored (the table lists the others of the split's covariates, unscored).
    let scored = |batches: &[RecordBatch]| -> Vec<usize> {
        let cells = batches[0].column_by_name("n_cells").map(|c| c.as_primitive::<UInt64Type>().clone());
        let cells = cells.unwrap_or_else(|| panic!("no n_cells"));
        (0..cells.len()).filter(|&i| cells.value(i) > 0).collect()
    };
    let gap = |batches: &[RecordBatch], model: &str, control: &str| {
        scored(batches)
            .into_iter()
            .map(|i| (metric(batches, model, i) - metric(batches, control, i)).abs())
            .fold(0.0f64, f64::max)
    };
    let held = evaluate("ood", &[]);
    let conditions: Vec<String> = scored(&held).into_iter().map(|i| strings(&held, "condition")[i].clone()).collect();
    assert!(conditions == ["PERT02", "PERT02"], "ood, scored: {conditions:?}");
    for (model, control) in [("r2_mean", "r2_mean_control"), ("r2_mean_top20", "r2_mean_control_top20")] {
        let gap = gap(&held, model, control);
        assert!(gap < 1e-6, "anchored {model} of the untrained PERT02 is the control mean's {control}: off by {gap}");
    }
    // Neither side of that equality is trivial: the plain prediction of PERT02 is not the control
    // mean, and the anchored prediction of a trained perturbation moves away from it.
    let plain = evaluate("ood", &["--plain"]);
    assert!(gap(&plain, "r2_mean", "r2_mean_control") > 1e-4, "the plain prediction is the control mean");
    let trained = evaluate("test", &[]);
    assert!(gap(&trained, "r2_mean", "r2_mean_control") > 1e-4, "a trained perturbation changes nothing");
    // `predict` alike: each control cell's anchored prediction under PERT02 is its observed
    // log1p, which is its anchored prediction under its own condition.
    let predicted = |extra: &[&str], name: &str| {
        let out = dir.path().join(name);
        let args = ["predict", "--model", &s(&model), "--store", &s(&store), "--anchored", "--threads", "1"];
        let o = run(&[&args[..], extra, &["--out", &s(&out)]].concat());
        assert!(o.status.success(), "predict {extra:?} failed: {}", text(&o.stderr));
        let batches = read_parquet(&out).1;
        let ids = strings(&batches, "cell_id");
        (ids.into_iter().zip(vectors(&batches, "anchored")).collect::<HashMap<_, _>>(), text(&o.stderr))
    };
    let ((target, warned), (own, _)) =
        (predicted(&["--target", "PERT02"], "pert02.parquet"), predicted(&[], "own.parquet"));
    assert!(warned.contains("(PERT02)") && warned.contains("alone, as the control"), "the warning: {warned}");
    assert!(!target.is_empty() && target.len() == own.len(), "{} and {} cells", target.len(), own.len());
    for (id, anchored) in &target {
        assert_eq!(Some(anchored), own.get(id), "cell {id}: PERT02 moved the anchored prediction");
    }
}
