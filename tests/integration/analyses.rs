//! The cpa-tools analyses on one model trained on a synthetic atlas with dose levels and a batch
//! covariate: dose-response curves (latent and decoded, against the atlas's truth) and
//! batch-corrected prediction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arrow_array::cast::AsArray;

use arrow_array::RecordBatch;
use arrow_array::types::{Float64Type, UInt64Type};
use cpa_stream::unstable::stages::store::read_small_table;

use crate::common::{repo_root, run, text};

struct Fixture {
    dir: PathBuf,
    store: PathBuf,
    run: PathBuf,
}

fn s(p: &Path) -> String {
    p.to_str().unwrap_or_default().to_owned()
}

/// Four dose levels of three perturbations in two cell types, the cell type trained as the batch
/// covariate; the small configuration with a doser learning rate that lets the dose scaling
/// saturate (the reference's 3e-4 leaves it near its initial curve in 100 epochs). 50 epochs:
/// the decoded changes' R2 against the truth was 0.56 (0.59 after 100, in twice the time; the
/// test asks for 0.3).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")).keep();
        let store = dir.join("dosed.store");
        let o = run(&[
            "synth",
            "--cells",
            "6000",
            "--genes",
            "100",
            "--perturbations",
            "3",
            "--doses",
            "4",
            "--cell-types",
            "2",
            "--seed",
            "5",
            "--out",
            &s(&store),
        ]);
        assert!(o.status.success(), "synth failed: {}", text(&o.stderr));
        let small = std::fs::read_to_string(repo_root().join("examples/cpa-small.toml")).unwrap_or_default();
        let config = dir.join("cpa.toml");
        std::fs::write(&config, small.replace("[training]\n", "[training]\ndoser_lr = 0.03\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        let run_dir = dir.join("run");
        let o = run(&[
            "train",
            "--store",
            &s(&store),
            "--dose-key",
            "dose",
            "--batch-key",
            "cell_type",
            "--config",
            &s(&config),
            "--epochs",
            "50",
            "--threads",
            "1",
            "--out",
            &s(&run_dir),
        ]);
        assert!(o.status.success(), "train failed: {}", text(&o.stderr));
        Fixture { dir, store, run: run_dir }
    })
}

fn floats(batch: &RecordBatch, name: &str) -> Vec<f64> {
    let column = batch.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
    column.as_primitive::<Float64Type>().values().to_vec()
}

fn strings(batch: &RecordBatch, name: &str) -> Vec<String> {
    let column = batch.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
    let column = arrow_cast::cast(column, &arrow_schema::DataType::Utf8).unwrap_or_else(|e| panic!("{e}"));
    column.as_string::<i32>().iter().map(|v| v.unwrap_or_default().to_owned()).collect()
}

#[test]
fn dose_response_recovers_the_true_curves_and_writes_complete_tables() {
    let f = fixture();
    // `dose-response` of the fixture's model and store into `out`, with `extra` flags.
    let dose_response = |out: &Path, extra: &[&str]| {
        let (model, store, out) = (s(&f.run), s(&f.store), s(out));
        let mut args = vec!["dose-response", "--model", &model, "--store", &store, "--out", &out];
        args.extend_from_slice(extra);
        run(&args)
    };
    let out = f.dir.join("dose");
    let o = dose_response(&out, &["--cells", "50", "--json"]);
    assert!(o.status.success(), "dose-response failed: {}", text(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}"));
    for file in ["latent.parquet", "decoded.parquet", "genes.parquet", "summary.json", "dose_response.svg"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let png = std::fs::read(out.join("dose_response.png")).unwrap_or_default();
    assert!(png.starts_with(b"\x89PNG"), "dose_response.png is not a PNG");

    // Latent: s(0) = 0, rising with the dose (the logsigm doser with a positive slope), one
    // curve per perturbation, the observed doses flagged.
    let latent = read_small_table(&out.join("latent.parquet")).unwrap_or_else(|e| panic!("{e}"));
    let (perts, doses, response) =
        (strings(&latent, "perturbation"), floats(&latent, "dose"), floats(&latent, "response"));
    let mut curves: HashMap<&str, Vec<(f64, f64)>> = HashMap::new();
    for i in 0..latent.num_rows() {
        curves.entry(perts[i].as_str()).or_default().push((doses[i], response[i]));
    }
    assert_eq!(curves.len(), 3, "{:?}", curves.keys());
    for (p, curve) in &curves {
        assert_eq!(curve[0], (0.0, 0.0), "{p}: s(0)");
        assert!(curve.windows(2).all(|w| w[0].0 < w[1].0), "{p}: doses not increasing");
        assert!(curve.last().is_some_and(|l| l.1 > 0.0), "{p}: no response at the top dose");
    }
    let observed = latent.column_by_name("observed").map(|c| c.as_boolean().true_count()).unwrap_or(0);
    assert_eq!(observed, 3 * 4, "each perturbation's four observed dose levels");

    // Decoded: one curve per cell type and perturbation, zero change at dose 0, the truth filled
    // at the atlas's doses.
    let decoded = read_small_table(&out.join("decoded.parquet")).unwrap_or_else(|e| panic!("{e}"));
    let (cell_types, response, truth) =
        (strings(&decoded, "cell_type"), floats(&decoded, "response"), floats(&decoded, "true_response"));
    let dose = floats(&decoded, "dose");
    assert_eq!(cell_types.iter().collect::<std::collections::BTreeSet<_>>().len(), 2);
    for i in (0..decoded.num_rows()).filter(|&i| dose[i] == 0.0) {
        assert!(response[i].abs() < 1e-9, "change at dose 0: {}", response[i]);
    }
    assert!(truth.iter().filter(|t| t.is_finite()).count() >= 2 * 3 * 4, "truth at the observed doses");
    let cells = decoded.column_by_name("cells").map(|c| c.as_primitive::<UInt64Type>().value(0)).unwrap_or(0);
    assert_eq!(cells, 50, "--cells control cells per combination");
    let genes = read_small_table(&out.join("genes.parquet")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(genes.num_rows(), decoded.num_rows() * 5, "5 genes per point by default");

    // Recovery of the true dose response: reported, and far from chance (a loose bound: the
    // model is small and trained briefly).
    let r2 = report["r2_truth_delta"].as_f64().unwrap_or(f64::NAN);
    eprintln!("dose response vs truth: R2 of per-gene changes {r2:.3}, of lengths {}", report["r2_truth_response"]);
    assert!(r2 > 0.3, "R2 of the decoded per-gene changes against the truth {r2}");
    assert_eq!(report["truth_curves"].as_u64(), Some(6));

    // Named genes and doses; bad names get the closest valid ones.
    let named = f.dir.join("dose-named");
    let flags = ["--perturbations", "PERT02", "--doses", "1,0,0.5", "--genes", "GENE001,GENE002", "--no-plots"];
    let o = dose_response(&named, &flags);
    assert!(o.status.success(), "dose-response failed: {}", text(&o.stderr));
    let genes = read_small_table(&named.join("genes.parquet")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(genes.num_rows(), 2 * 3 * 2, "2 cell types x 3 doses x 2 genes");
    assert!(!named.join("dose_response.png").exists());
    // One cell type only; a value the model does not know is an error naming the closest.
    let one = f.dir.join("dose-one");
    let flags = ["--perturbations", "PERT02", "--doses", "0,1", "--covariate", "cell_type=CT02", "--no-plots"];
    let o = dose_response(&one, &flags);
    assert!(o.status.success(), "dose-response failed: {}", text(&o.stderr));
    let decoded = read_small_table(&one.join("decoded.parquet")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(strings(&decoded, "cell_type"), ["CT02", "CT02"]);
    let o = dose_response(&f.dir.join("bad-ct"), &["--covariate", "cell_type=CT2"]);
    assert!(!o.status.success() && text(&o.stderr).contains("\"CT02\""), "{}", text(&o.stderr));
    let o = run(&["dose-response", "--model", &s(&f.run), "--perturbations", "PERT2", "--out", &s(&f.dir.join("bad"))]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("\"PERT02\""), "no suggestion: {}", text(&o.stderr));
    assert!(!f.dir.join("bad").exists(), "a failed run left its output");
}

#[test]
fn batch_corrected_predictions_do_not_depend_on_the_batch() {
    let f = fixture();
    let (model, store) = (s(&f.run), s(&f.store));
    let predict = |name: &str, extra: &[&str]| -> RecordBatch {
        let out = f.dir.join(name);
        let mut args = vec![
            "predict",
            "--model",
            model.as_str(),
            "--store",
            store.as_str(),
            "--source",
            "condition == control and cell_type == CT01",
            "--target",
            "condition=PERT01,dose=1,cell_type=CT01",
            "--target",
            "condition=PERT01,dose=1,cell_type=CT02",
            "--out",
        ];
        let out_s = s(&out);
        args.push(&out_s);
        args.extend_from_slice(extra);
        let o = run(&args);
        assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
        read_small_table(&out).unwrap_or_else(|e| panic!("{e}"))
    };
    let means = |b: &RecordBatch| -> (Vec<f32>, Vec<f32>) {
        let ct = strings(b, "cell_type");
        let list =
            b.column_by_name("mean").map(|c| c.as_fixed_size_list().clone()).unwrap_or_else(|| panic!("no mean"));
        let (mut a, mut c) = (Vec::new(), Vec::new());
        for (i, t) in ct.iter().enumerate() {
            let row = list.value(i);
            let row = row.as_primitive::<arrow_array::types::Float32Type>().values().to_vec();
            if t == "CT01" { a.extend(row) } else { c.extend(row) }
        }
        (a, c)
    };
    let (plain_1, plain_2) = means(&predict("plain.parquet", &[]));
    let (corrected_1, corrected_2) = means(&predict("corrected.parquet", &["--batch-corrected"]));
    assert_eq!(plain_1.len(), plain_2.len());
    assert!(!plain_1.is_empty());
    assert!(plain_1 != plain_2, "the batch covariate changes the plain prediction");
    assert_eq!(corrected_1, corrected_2, "batch-corrected: the batch value makes no difference");
    assert!(corrected_1 != plain_1, "batch-corrected differs from decoding with the batch");
}

#[test]
fn batch_corrected_prediction_needs_a_batch_key() {
    let fixture = crate::predict::fixture();
    let out = fixture.dir.join("corrected-nobatch.parquet");
    let o = run(&[
        "predict",
        "--model",
        &s(&fixture.run),
        "--store",
        &s(&fixture.store),
        "--batch-corrected",
        "--out",
        &s(&out),
    ]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("batch key"), "{}", text(&o.stderr));
    assert!(!out.exists());
}

/// Reads one Float32 fixed-size-list or plain row of the embeddings table by name.
fn embedding_of(table: &RecordBatch, name: &str) -> Vec<f32> {
    let names = strings(table, "name");
    let row = names.iter().position(|n| n == name).unwrap_or_else(|| panic!("no embedding of {name}: {names:?}"));
    let list = table.column_by_name("embedding").map(|c| c.as_fixed_size_list().clone()).unwrap_or_else(|| panic!());
    list.value(row).as_primitive::<arrow_array::types::Float32Type>().values().to_vec()
}

#[test]
fn perturbation_features_reach_the_model_and_predict_a_perturbation_without_cells() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = dir.path().join("atlas.store");
    let o =
        run(&["synth", "--cells", "3000", "--genes", "60", "--perturbations", "4", "--seed", "2", "--out", &s(&store)]);
    assert!(o.status.success(), "synth failed: {}", text(&o.stderr));
    // The atlas's true effects as features, and one perturbation without cells halfway between
    // two others: the model's embedding of it must be the midpoint of theirs (the projection is
    // affine), which only holds when the features reach the model.
    let truth = read_small_table(&store.join("perturbation_features.parquet")).unwrap_or_else(|e| panic!("{e}"));
    let names = strings(&truth, "perturbation");
    let widths: Vec<String> = truth.schema().fields().iter().skip(1).map(|f| f.name().clone()).collect();
    let value = |row: usize, c: &str| -> f64 {
        let col = truth.column_by_name(c).unwrap_or_else(|| panic!());
        f64::from(col.as_primitive::<arrow_array::types::Float32Type>().value(row))
    };
    let mut csv = format!("drug,{}\n", widths.join(","));
    for (row, name) in names.iter().enumerate() {
        let values: Vec<String> = widths.iter().map(|c| format!("{}", value(row, c))).collect();
        csv.push_str(&format!("{name},{}\n", values.join(",")));
    }
    let mid: Vec<String> = widths.iter().map(|c| format!("{}", (value(0, c) + value(1, c)) / 2.0)).collect();
    csv.push_str(&format!("NEWDRUG,{}\n", mid.join(",")));
    let features = dir.path().join("features.csv");
    std::fs::write(&features, &csv).unwrap_or_else(|e| panic!("{e}"));
    let run_dir = dir.path().join("run");
    let config = repo_root().join("examples/cpa-small.toml");
    let train = |out: &Path, table: &Path| {
        run(&[
            "train",
            "--store",
            &s(&store),
            "--config",
            &s(&config),
            "--perturbation-features",
            &s(table),
            "--epochs",
            "10",
            "--threads",
            "1",
            "--out",
            &s(out),
        ])
    };
    let o = train(&run_dir, &features);
    assert!(o.status.success(), "train failed: {}", text(&o.stderr));
    let emb = dir.path().join("emb");
    let o = run(&["embeddings", "--model", &s(&run_dir), "--out", &s(&emb)]);
    assert!(o.status.success(), "embeddings failed: {}", text(&o.stderr));
    let table = read_small_table(&emb.join("perturbations.parquet")).unwrap_or_else(|e| panic!("{e}"));
    let (a, b, m) = (embedding_of(&table, &names[0]), embedding_of(&table, &names[1]), embedding_of(&table, "NEWDRUG"));
    for i in 0..m.len() {
        let midpoint = (a[i] + b[i]) / 2.0;
        assert!((m[i] - midpoint).abs() < 1e-4 * (1.0 + midpoint.abs()), "dimension {i}: {} vs {midpoint}", m[i]);
    }
    assert!(a != b, "distinct features give distinct embeddings");

    // The perturbation without cells is predicted from its features.
    let pred = dir.path().join("new.parquet");
    let o =
        run(&["predict", "--model", &s(&run_dir), "--store", &s(&store), "--target", "NEWDRUG", "--out", &s(&pred)]);
    assert!(o.status.success(), "predict failed: {}", text(&o.stderr));
    let predicted = read_small_table(&pred).unwrap_or_else(|e| panic!("{e}"));
    assert!(predicted.num_rows() > 0);
    assert!(strings(&predicted, "condition").iter().all(|c| c == "NEWDRUG"));

    // Bad tables: a perturbation of the store without features, a cell that is not a number.
    let missing = dir.path().join("missing.csv");
    let without_first: String =
        csv.lines().filter(|l| !l.starts_with(&format!("{},", names[0]))).map(|l| format!("{l}\n")).collect();
    std::fs::write(&missing, without_first).unwrap_or_else(|e| panic!("{e}"));
    let o = train(&dir.path().join("run-missing"), &missing);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains(&format!("{:?}", names[0])) && err.contains("no features"), "{err}");
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, csv.replacen(&format!("{},", names[1]), &format!("{},x", names[1]), 1))
        .unwrap_or_else(|e| panic!("{e}"));
    let o = train(&dir.path().join("run-bad"), &bad);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("row 2") && err.contains("effect_0") && err.contains("not a finite number"), "{err}");
    assert!(!dir.path().join("run-bad").join("model").exists());
}
