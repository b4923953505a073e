//! `cpa-stream train` end to end: a synthetic store and the bundled real data, exact resume,
//! and errors from any stage stopping the run.

use std::path::{Path, PathBuf};

use cpa_stream::unstable::engine::model::load_model;
use cpa_stream::unstable::engine::trainer::Trainer;
use cpa_stream::unstable::pipeline::encoder::{EncoderOptions, SplitSpec};
use cpa_stream::unstable::schemas::tables::{same_schema, training_metrics_schema};
use cpa_stream::unstable::stages::model::config::{CpaConfig, DispersionInit};
use cpa_stream::unstable::stages::store::read_small_table;
use serde_json::Value;
use tch::Device;

use crate::common::{bundled_data, run, text};
use cpa_stream::unstable::pipeline::Stage;

fn synth_store(dir: &Path, name: &str, codec: &str) -> PathBuf {
    let out = dir.join(name);
    let o = run(&[
        "synth",
        "--cells",
        "3000",
        "--genes",
        "150",
        "--perturbations",
        "5",
        "--doses",
        "2",
        "--cell-types",
        "2",
        "--combinations",
        "2",
        "--seed",
        "4",
        "--codec",
        codec,
        "--out",
        out.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "synth failed: {}", text(&o.stderr));
    out
}

/// Runs `train` on `store` (dose and cell-type keys of the synthetic stores) into `out`.
fn train_output(store: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let (store, out) = (store.to_str().unwrap_or_default(), out.to_str().unwrap_or_default());
    let mut args = vec!["train", "--store", store, "--dose-key", "dose", "--covariates", "cell_type", "--out", out];
    args.extend_from_slice(extra);
    run(&args)
}

/// Runs `train` with the given extra arguments, returning the JSON report.
fn train(store: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["--json", "--seed", "3"];
    args.extend_from_slice(extra);
    let o = train_output(store, out, &args);
    assert!(o.status.success(), "train failed: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("report is not JSON ({e}): {}", text(&o.stdout)))
}

/// The encoder options of the synthetic stores' obs columns.
fn synth_encoder(split: SplitSpec) -> EncoderOptions {
    EncoderOptions {
        perturbation_key: "condition".into(),
        dose_key: Some("dose".into()),
        control: "control".into(),
        covariate_keys: vec!["cell_type".into()],
        batch_key: None,
        split,
        max_comb_len: 2,
    }
}

fn recon(report: &Value, epoch: usize) -> f64 {
    report["epochs"][epoch]["train"]["recon_loss"].as_f64().unwrap_or(f64::NAN)
}

#[test]
fn trains_on_a_synthetic_store_with_checkpoints_metrics_and_a_final_model() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = synth_store(dir.path(), "s.store", "raw");
    let run_dir = dir.path().join("run");
    let report = train(&store, &run_dir, &["--epochs", "4", "--batch-size", "64"]);
    assert_eq!(report["epochs"].as_array().map(Vec::len), Some(4));
    assert!(recon(&report, 3) < recon(&report, 0), "loss did not decrease: {report}");
    let stages: Vec<&str> =
        report["report"]["stages"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(stages, ["encoder", "planner", "batcher", "trainer"]);
    assert!(report["device_memory"].is_null(), "device memory on the CPU: {}", report["device_memory"]);
    for name in
        ["checkpoint/model.json", "checkpoint/optimizer.safetensors", "model/weights.safetensors", "config.toml"]
    {
        assert!(run_dir.join(name).exists(), "{name} missing");
    }
    // The history picture, as SVG and PNG.
    let svg = std::fs::read_to_string(run_dir.join("history.svg")).unwrap_or_default();
    assert!(svg.starts_with("<svg") && svg.contains("reconstruction loss"), "history.svg: {:.200}", svg);
    let png = std::fs::read(run_dir.join("history.png")).unwrap_or_default();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "history.png: {} bytes", png.len());
    let metrics = read_small_table(&run_dir.join("metrics.parquet")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(metrics.num_rows(), 4);
    same_schema(&training_metrics_schema(&["cell_type".to_owned()]), &metrics.schema())
        .unwrap_or_else(|e| panic!("metrics.parquet against its schema: {e}"));
    // cpa-tools' epoch_history figures: the training R2 of means, and each adversary's own loss,
    // penalty and accuracy, the perturbation's and the covariate's summing to the totals.
    let column = |name: &str| -> Vec<f64> {
        let c = metrics.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
        let c = c.as_any().downcast_ref::<arrow_array::Float64Array>().unwrap_or_else(|| panic!("{name}: not Float64"));
        c.iter().map(|v| v.unwrap_or(f64::NAN)).collect()
    };
    let r2 = column("r2_mean");
    assert!(r2.iter().all(|v| v.is_finite() && *v <= 1.0) && r2[3] > r2[0], "training r2_mean {r2:?}");
    for (name, total, parts) in [
        ("loss", "adv_loss", ["adv_perts", "adv_cell_type"]),
        ("penalty", "penalty_adv", ["penalty_perts", "penalty_cell_type"]),
    ] {
        let (total, a, b) = (column(total), column(parts[0]), column(parts[1]));
        for e in 0..4 {
            assert!(
                (total[e] - a[e] - b[e]).abs() <= 1e-4 * total[e].abs().max(1.0),
                "{name}, epoch {e}: {total:?} {a:?} {b:?}"
            );
        }
    }
    assert!(column("acc_cell_type").iter().all(|v| (0.0..=1.0).contains(v)), "{:?}", column("acc_cell_type"));
    let model = load_model(&run_dir.join("model"), Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.vocabulary().n_genes(), 150);
    let trainer = Trainer::resume(&run_dir.join("checkpoint"), Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(trainer.state().epoch, 4);
}

/// On a GPU: `--batch-size auto` probes a power-of-two batch, and the report gives the caching
/// allocator's peak device memory. Skipped (with the reason printed) where libtorch sees no CUDA
/// device.
#[test]
fn cuda_training_probes_its_batch_size_and_reports_device_memory() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: no CUDA device visible to libtorch");
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = synth_store(dir.path(), "s.store", "raw");
    let run_dir = dir.path().join("run");
    let report = train(&store, &run_dir, &["--epochs", "2", "--device", "cuda", "--batch-size", "auto"]);
    let config = CpaConfig::from_file(&run_dir.join("config.toml")).unwrap_or_else(|e| panic!("{e}"));
    let batch = config.training.batch_size;
    assert!(batch >= 256 && batch.is_power_of_two(), "probed batch size {batch}");
    let bytes = |key: &str| report["device_memory"][key].as_u64().unwrap_or(0);
    assert!(bytes("peak_allocated") > 0, "{}", report["device_memory"]);
    assert!(bytes("peak_reserved") >= bytes("peak_allocated"), "{}", report["device_memory"]);
    assert!(recon(&report, 1).is_finite(), "{report}");
    // The batches went to the device through the uploader, every cell the trainer trained on.
    let stages = report["report"]["stages"].as_array().cloned().unwrap_or_default();
    let stage = |name: &str| stages.iter().find(|s| s["name"] == name).cloned().unwrap_or_default();
    assert!(stage("uploader")["rows"].as_u64().unwrap_or(0) > 0, "{stages:?}");
    assert_eq!(stage("uploader")["rows"], stage("trainer")["rows"], "{stages:?}");
}

#[test]
fn block_sampling_is_recorded_with_the_run() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = synth_store(dir.path(), "s.store", "raw");
    let run_dir = dir.path().join("run");
    let report = train(&store, &run_dir, &["--epochs", "3", "--batch-size", "64", "--shuffle-run-cells", "8"]);
    assert!(recon(&report, 2) < recon(&report, 0), "loss did not decrease: {report}");
    let config = CpaConfig::from_file(&run_dir.join("config.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.training.shuffle_run_cells, 8);
}

#[test]
fn the_deg_aware_validation_score_adds_the_top_changes_r2_to_all_genes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = synth_store(dir.path(), "s.store", "raw");
    let validations = |score: &str| -> Vec<Value> {
        let toml = dir.path().join(format!("{score}.toml"));
        let config = format!("[training]\ncheck_val_every_n_epoch = 1\nvalidation_score = \"{score}\"\n");
        std::fs::write(&toml, config).unwrap_or_else(|e| panic!("{e}"));
        let run_dir = dir.path().join(format!("run-{score}"));
        let c = toml.to_str().unwrap_or_default();
        let report =
            train(&store, &run_dir, &["--epochs", "3", "--batch-size", "128", "--threads", "1", "--config", c]);
        let history = cpa_stream::unstable::stages::store::read_small_table(&run_dir.join("metrics.parquet"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(history.column_by_name("val_r2_mean_deg").is_some(), "metrics.parquet has the DEG R2");
        report["epochs"].as_array().into_iter().flatten().map(|e| e["validation"].clone()).collect()
    };
    let (reference, degs) = (validations("reference"), validations("degs"));
    assert_eq!(reference.len(), 3);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    for (r, d) in reference.iter().zip(&degs) {
        // The score chooses the best weights, not the training: the same figures either way.
        for k in ["r2_mean", "r2_var", "r2_mean_deg"] {
            assert_eq!(f(r, k), f(d, k), "{k}: {r} vs {d}");
        }
        assert!(f(d, "r2_mean_deg").is_finite() && f(d, "r2_mean_deg") < 1.0, "{d}");
        assert!((f(r, "score") - (f(r, "r2_mean") + 0.5 * f(r, "r2_var"))).abs() < 1e-12, "{r}");
        assert!((f(d, "score") - (f(d, "r2_mean") + f(d, "r2_mean_deg"))).abs() < 1e-12, "{d}");
    }
}

#[test]
fn a_preset_is_the_base_a_configuration_file_changes() {
    use cpa_stream::unstable::stages::model::config::LrSchedule;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = synth_store(dir.path(), "s.store", "raw");
    let toml = dir.path().join("c.toml");
    std::fs::write(&toml, "[training]\nstep_size_lr = 2\n").unwrap_or_else(|e| panic!("{e}"));
    let run_dir = dir.path().join("run");
    let c = toml.to_str().unwrap_or_default();
    train(&store, &run_dir, &["--epochs", "1", "--batch-size", "256", "--preset", "reference", "--config", c]);
    let config = CpaConfig::from_file(&run_dir.join("config.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((config.training.lr_schedule, config.training.step_size_lr), (LrSchedule::Reference, 2));
    // A resume with another preset is refused, naming it.
    let o = train_output(&store, &run_dir, &["--resume", "--preset", "default"]);
    assert!(!o.status.success() && text(&o.stderr).contains("--preset default"), "{}", text(&o.stderr));
    let o = train_output(&store, &dir.path().join("other"), &["--preset", "paper"]);
    assert!(!o.status.success() && text(&o.stderr).contains("reference"), "{}", text(&o.stderr));
}

#[test]
fn the_unseen_covariates_preset_trains_the_skip_resumes_exactly_and_predicts_anchored() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = synth_store(dir.path(), "s.store", "raw");
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    // With mixup and the log-sigmoid dose response over the preset (its content until
    // 2026-11-26): mixup's draws are the part of a resume most likely to go astray.
    let toml = dir.path().join("mixup.toml");
    std::fs::write(&toml, "[model]\ndoser_type = \"logsigm\"\n[training]\nmixup_alpha = 4.0\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let c = toml.to_str().unwrap_or_default();
    let preset = ["--preset", "unseen-covariates", "--config", c, "--batch-size", "64"];
    train(&store, &straight, &[&["--epochs", "2"], &preset[..]].concat());
    train(&store, &split, &[&["--epochs", "1"], &preset[..]].concat());
    train(&store, &split, &["--epochs", "2", "--resume"]);
    let config = CpaConfig::from_file(&straight.join("config.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.model.perturbation_skip && config.training.mixup_alpha == 4.0, "{config:?}");
    let weights = read_file(&straight.join("checkpoint").join("weights.safetensors"));
    let named = |name: &str| weights.windows(name.len()).any(|w| w == name.as_bytes());
    assert!(named("ae.decoder.perturbation_skip"), "the checkpoint holds no skip weights");
    assert_resumed_exactly(&straight, &split, &["checkpoint/weights.safetensors", "checkpoint/optimizer.safetensors"]);
    let (s, m) = (store.to_str().unwrap_or_default(), straight.to_str().unwrap_or_default());
    let out = dir.path().join("anchored.parquet");
    let o = run(&[
        "predict",
        "--model",
        m,
        "--store",
        s,
        "--target",
        "PERT01",
        "--anchored",
        "--aggregate",
        "mean",
        "--out",
        out.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "predict --anchored failed: {}", text(&o.stderr));
}

#[test]
fn the_unseen_covariates_preset_learns_a_dose_response_where_the_data_have_several_doses() {
    use cpa_stream::unstable::stages::model::config::DoserType;

    // The synthetic store has two doses a perturbation: `doser_type = "auto"` becomes logsigm,
    // recorded as such (the bundled data's one dose gives linear: python/tests/test_fidelity.py).
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = synth_store(dir.path(), "s.store", "raw");
    let out = dir.path().join("run");
    train(&store, &out, &["--epochs", "1", "--batch-size", "256", "--preset", "unseen-covariates"]);
    let config = CpaConfig::from_file(&out.join("config.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.model.doser_type, DoserType::Logsigm);
    let model = load_model(&out.join("model"), Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.config().model.doser_type, DoserType::Logsigm);
}

#[test]
fn the_dispersion_starts_from_the_data_s_moments_when_asked() {
    use cpa_stream::unstable::engine::train::dispersion::moment_log_theta;
    use cpa_stream::unstable::pipeline::encoder::CellLabels;

    // One epoch of 12 steps at the default rate moves log theta by about 0.004 at most: a run's
    // dispersion is where it started. The random start is standard normal draws; the moments'
    // start is the estimate from the store (here from every cell, the run's from its training
    // cells: close, not equal).
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = synth_store(dir.path(), "s.store", "raw");
    let labels = CellLabels::from_store(
        &cpa_stream::Store::open(&store).unwrap_or_else(|e| panic!("{e}")),
        &synth_encoder(SplitSpec::all_training()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let opened = cpa_stream::Store::open(&store).unwrap_or_else(|e| panic!("{e}"));
    let estimate = moment_log_theta(&opened, &labels).unwrap_or_else(|e| panic!("{e}"));
    let toml = dir.path().join("moments.toml");
    std::fs::write(&toml, "[model]\ndispersion_init = \"moments\"\n").unwrap_or_else(|e| panic!("{e}"));
    let log_theta = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        train(&store, &out, &[&["--epochs", "1", "--batch-size", "256"], extra].concat());
        let model = load_model(&out.join("model"), Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        let theta = model.nb_theta().ok().flatten().unwrap_or_else(|| panic!("{name}: an nb model has a theta"));
        let theta = Vec::<f32>::try_from(&theta).unwrap_or_else(|e| panic!("{e}"));
        (theta.iter().map(|t| f64::from(t.ln())).collect::<Vec<f64>>(), model.config().model.dispersion_init)
    };
    let correlation = |a: &[f64]| {
        let b: Vec<f64> = estimate.log_theta.iter().map(|&v| f64::from(v)).collect();
        let (ma, mb) = (a.iter().sum::<f64>() / a.len() as f64, b.iter().sum::<f64>() / b.len() as f64);
        let cov: f64 = a.iter().zip(&b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let (va, vb): (f64, f64) = (a.iter().map(|x| (x - ma).powi(2)).sum(), b.iter().map(|y| (y - mb).powi(2)).sum());
        cov / (va * vb).sqrt()
    };
    let (random, kind) = log_theta("random", &[]);
    assert_eq!(kind, DispersionInit::Random);
    let (moments, kind) = log_theta("moments", &["--config", toml.to_str().unwrap_or_default()]);
    assert_eq!(kind, DispersionInit::Moments);
    let (r_random, r_moments) = (correlation(&random), correlation(&moments));
    assert!(r_random.abs() < 0.3, "the random start correlates {r_random} with the data's moments");
    assert!(r_moments > 0.9, "the moments' start correlates only {r_moments} with the data's moments");
}

#[test]
fn resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = synth_store(dir.path(), "s.store", "zstd");
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    train(&store, &straight, &["--epochs", "3", "--batch-size", "64"]);
    train(&store, &split, &["--epochs", "1", "--batch-size", "64"]);
    // A flag that disagrees with what the run recorded is an error naming both values.
    let o = train_output(&store, &split, &["--epochs", "3", "--resume", "--covariates", "dose"]);
    let err = text(&o.stderr);
    assert!(err.contains(r#"--covariates cell_type,dose differs from the run's recorded "cell_type""#), "{err}");
    // The split's seed is the training seed's unless given, and a resume keeps it.
    let o = train_output(&store, &split, &["--epochs", "3", "--resume", "--split-seed", "9"]);
    let err = text(&o.stderr);
    assert!(err.contains(r#"--split-seed 9 differs from the run's recorded"#), "{err}");
    // No flag repeated: keys, covariates, split and seed come from the run.
    let (s, p) = (store.to_str().unwrap_or_default(), split.to_str().unwrap_or_default());
    let o = run(&["train", "--store", s, "--out", p, "--epochs", "3", "--batch-size", "64", "--resume", "--json"]);
    assert!(o.status.success(), "bare resume failed: {}", text(&o.stderr));
    let resumed: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resumed["epochs"].as_array().map(Vec::len), Some(3), "metrics of all epochs kept");
    assert_resumed_exactly(&straight, &split, &["checkpoint/weights.safetensors", "checkpoint/optimizer.safetensors"]);
}

/// A run killed after writing an epoch's history but before its checkpoint (or a checkpoint
/// kept from before, `--checkpoint-every`) resumes from the checkpoint it has, exactly: the
/// history's later epochs are trained again, not kept twice.
#[test]
fn a_history_ahead_of_its_checkpoint_resumes_from_the_checkpoint_exactly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = synth_store(dir.path(), "s.store", "zstd");
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    train(&store, &straight, &["--epochs", "3", "--batch-size", "64", "--checkpoint-every", "0"]);
    train(&store, &split, &["--epochs", "1", "--batch-size", "64"]);
    let older = dir.path().join("older-checkpoint");
    copy_flat_dir(&split.join("checkpoint"), &older);
    train(&store, &split, &["--epochs", "2", "--resume", "--checkpoint-every", "0"]);
    std::fs::remove_dir_all(split.join("checkpoint")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(&older, split.join("checkpoint")).unwrap_or_else(|e| panic!("{e}"));
    let resumed = train(&store, &split, &["--epochs", "3", "--resume"]);
    assert_eq!(resumed["epochs"].as_array().map(Vec::len), Some(3), "{resumed}");
    assert_resumed_exactly(&straight, &split, &["checkpoint/weights.safetensors", "checkpoint/optimizer.safetensors"]);
    // Seconds are a duration: not negative, not NaN.
    for bad in ["--checkpoint-every=-1", "--checkpoint-every=NaN"] {
        let o = train_output(&store, &dir.path().join("bad"), &["--epochs", "1", bad]);
        let err = text(&o.stderr);
        assert!(!o.status.success() && err.contains("--checkpoint-every"), "{bad}: {err}");
    }
}

fn copy_flat_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")).flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `files` of two run directories, one trained straight and one interrupted and resumed, are
/// byte-identical.
fn assert_resumed_exactly(straight: &Path, resumed: &Path, files: &[&str]) {
    for file in files {
        assert!(
            read_file(&straight.join(file)) == read_file(&resumed.join(file)),
            "{file} differs between the uninterrupted and the resumed run"
        );
    }
}

/// Sets `stop` once `after` cells have been trained, as a Ctrl-C at that moment would.
struct StopAfter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    after: u64,
    done: std::sync::atomic::AtomicU64,
}

impl cpa_stream::unstable::pipeline::progress::Progress for StopAfter {
    fn begin(&self, _phase: &str, _total: u64) {}
    fn advance(&self, n: u64) {
        use std::sync::atomic::Ordering;
        if self.done.fetch_add(n, Ordering::Relaxed) + n >= self.after {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
    fn end(&self) {}
}

#[test]
fn an_interruption_within_an_epoch_checkpoints_and_resumes_exactly() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    use cpa_stream::RunContext;
    use cpa_stream::train::TrainOptions;

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = synth_store(dir.path(), "s.store", "raw");
    let mut config = CpaConfig::default();
    config.training.seed = 3;
    config.training.batch_size = 64;
    // Two batches per optimizer step: an interruption after an odd batch waits for the next.
    config.training.accumulate_batches = 2;
    // A validation every epoch: the one read back from metrics.parquet has one too.
    config.training.check_val_every_n_epoch = 1;
    let options = |out: &str, resume: bool| TrainOptions {
        store: store.clone(),
        out: dir.path().join(out),
        encoder: synth_encoder(SplitSpec::fractions(0.1, 0.0, 3, Vec::new())),
        config: config.clone(),
        device: Device::Cpu,
        resume,
        epochs: Some(3),
        auto_batch_size: false,
        ..TrainOptions::default()
    };
    let straight =
        cpa_stream::train::run(&options("straight", false), &RunContext::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!straight.interrupted);

    // Stop in the middle of the second epoch, after an odd number of its batches.
    let stop = Arc::new(AtomicBool::new(false));
    let after = straight.train_cells + 11 * 64;
    let progress = StopAfter { stop: Arc::clone(&stop), after, done: AtomicU64::new(0) };
    let first = cpa_stream::train::run(&options("split", false), &RunContext::new(&progress).with_stop(&stop))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(first.interrupted, "the run was not interrupted");
    assert_eq!(first.epochs.len(), 1, "only the first epoch is complete");
    let checkpoint = dir.path().join("split/checkpoint");
    let state: Value = serde_json::from_slice(&std::fs::read(checkpoint.join("trainer.json")).unwrap_or_default())
        .unwrap_or_else(|e| panic!("trainer.json: {e}"));
    assert_eq!(state["epoch"], 1);
    assert_eq!(state["within_epoch"]["batches"], 12, "stopped after the accumulation's second batch: {state}");
    let seconds_before = state["within_epoch"]["seconds"].as_f64().unwrap_or(0.0);
    assert!(seconds_before > 0.0, "the checkpoint records the epoch's time so far: {state}");
    assert!(!dir.path().join("split/model").exists(), "an interrupted run publishes no final model");

    let resumed =
        cpa_stream::train::run(&options("split", true), &RunContext::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!resumed.interrupted);
    assert_eq!(resumed.epochs.len(), 3);
    // Epochs before the checkpoint are read back from metrics.parquet: all their metrics, the
    // batch counts and validation cells included.
    for (a, b) in straight.epochs.iter().zip(&resumed.epochs) {
        assert_eq!(a.train, b.train, "epoch {} metrics differ", a.train.epoch);
        assert!(b.train.autoencoder_batches > 0 && b.train.adversary_batches > 0, "{:?}", b.train);
        assert_eq!(a.validation.map(|v| (v.score, v.cells)), b.validation.map(|v| (v.score, v.cells)));
    }
    assert!(resumed.epochs[0].validation.is_some_and(|v| v.cells > 0), "{:?}", resumed.epochs[0]);
    // The interrupted epoch's time includes its part before the interruption.
    assert!(
        resumed.epochs[1].seconds >= seconds_before,
        "epoch 1 took {} s, {seconds_before} s of them before the interruption",
        resumed.epochs[1].seconds
    );
    let files = ["checkpoint/weights.safetensors", "checkpoint/optimizer.safetensors", "model/weights.safetensors"];
    assert_resumed_exactly(&dir.path().join("straight"), &dir.path().join("split"), &files);
}

/// Imports the bundled .h5ad into `dir/pb.store`.
fn import_real_data(dir: &Path) -> PathBuf {
    let store = dir.join("pb.store");
    let data = bundled_data();
    let o = run(&["import", data.to_str().unwrap_or_default(), "--out", store.to_str().unwrap_or_default()]);
    assert!(o.status.success(), "import failed: {}", text(&o.stderr));
    store
}

#[test]
fn trains_on_the_bundled_real_data() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = import_real_data(dir.path());
    let run_dir = dir.path().join("run");
    let report = train(&store, &run_dir, &["--epochs", "4", "--holdout", "MAP2K3+MAP2K6"]);
    assert!(recon(&report, 3) < recon(&report, 0), "loss did not decrease: {report}");
    let model = load_model(&run_dir.join("model"), Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    let vocab = model.vocabulary();
    assert_eq!(vocab.control(), "control");
    // The held-out pair's parts are known from their single perturbations; the pair never trained.
    assert!(vocab.perturbations.iter().any(|p| p == "MAP2K6"));
    let held = vocab.conditions.iter().position(|c| c == "MAP2K3+MAP2K6");
    assert_eq!(held.map(|i| vocab.condition_counts[i]), Some(0), "held-out cells were counted as training");
}

#[test]
fn runs_of_cells_follow_the_store_order_and_warn_when_asked_of_a_sorted_store() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sorted = import_real_data(dir.path());
    let shuffled = dir.path().join("pb-shuffled.store");
    let o = run(&[
        "convert",
        sorted.to_str().unwrap_or_default(),
        "--out",
        shuffled.to_str().unwrap_or_default(),
        "--shuffle",
        "11",
    ]);
    assert!(o.status.success(), "convert --shuffle failed: {}", text(&o.stderr));
    // Trains one epoch; whether it warned, and the run length saved with the run.
    let train_runs = |store: &Path, runs: &str| -> (bool, usize) {
        let out = dir.path().join(format!("run-{runs}"));
        let o = train_output(store, &out, &["--epochs", "1", "--shuffle-run-cells", runs]);
        assert!(o.status.success(), "train failed: {}", text(&o.stderr));
        let config = CpaConfig::from_file(&out.join("config.toml")).unwrap_or_else(|e| panic!("{e}"));
        let _ = std::fs::remove_dir_all(&out);
        (text(&o.stderr).contains("shuffle the store once"), config.training.shuffle_run_cells)
    };
    assert_eq!(train_runs(&sorted, "16"), (true, 16), "runs of 16 on the sorted store");
    assert_eq!(train_runs(&sorted, "1"), (false, 1), "single cells on the sorted store");
    assert_eq!(train_runs(&shuffled, "16"), (false, 16), "runs of 16 on the shuffled store");
    // The automatic choice: single cells on the sorted store, runs on the shuffled one.
    assert_eq!(train_runs(&sorted, "auto"), (false, 1), "auto on the sorted store");
    assert_eq!(train_runs(&shuffled, "auto"), (false, 8), "auto on the shuffled store");
}

#[test]
fn errors_in_a_stage_stop_the_run_with_their_context() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // A malformed dose: cell types are not numbers.
    let store = synth_store(dir.path(), "s.store", "zstd");
    let out = dir.path().join("bad-dose");
    let o = run(&[
        "train",
        "--store",
        store.to_str().unwrap_or_default(),
        "--dose-key",
        "cell_type",
        "--out",
        out.to_str().unwrap_or_default(),
        "--epochs",
        "1",
    ]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("obs.parquet: row 0 (cell \"cell000000\"): dose \"CT"), "{err}");
    assert!(err.contains("is not a finite number >= 0"), "{err}");

    // A corrupt compressed block: the batcher's error stops the trainer, no final model appears.
    let blocks = store.join("X/blocks");
    let mut bytes = std::fs::read(&blocks).unwrap_or_else(|e| panic!("{e}"));
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&blocks, &bytes).unwrap_or_else(|e| panic!("{e}"));
    let out = dir.path().join("corrupt");
    let o = train_output(&store, &out, &["--epochs", "2"]);
    let err = text(&o.stderr);
    assert!(!o.status.success(), "a corrupt block trained: {err}");
    assert!(err.contains("X/blocks") && err.contains("block "), "{err}");
    assert!(!out.join("model").exists(), "a model was written by a failed run");
}

#[test]
fn a_consumer_that_keeps_its_batches_still_gets_them_all() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use cpa_stream::unstable::pipeline::StageStats;
    use cpa_stream::unstable::pipeline::batcher::{LoaderOptions, PlanOptions, PoolStats, spawn_loader};
    use cpa_stream::unstable::pipeline::encoder::{CellLabels, Split};
    use cpa_stream::unstable::stages::store::Store;

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = synth_store(dir.path(), "s.store", "raw");
    let store = Arc::new(Store::open(&path).unwrap_or_else(|e| panic!("{e}")));
    let options = synth_encoder(SplitSpec::all_training());
    let labels = Arc::new(CellLabels::from_store(&store, &options).unwrap_or_else(|e| panic!("{e}")));
    let plan = PlanOptions { batch_size: 100, ..PlanOptions::default() };
    let loader = LoaderOptions { workers: 2, prefetch: 1, ..LoaderOptions::default() };
    let mut kept = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaded = spawn_loader(&store, &labels, Split::Train, 0, 0, &plan, loader, PoolStats::planned(2), stop)
        .unwrap_or_else(|e| panic!("{e}"));
    let consumer = StageStats::new(Stage::Consumer, 1);
    while let Some(gathered) = loaded.next(&consumer) {
        kept.push(gathered.unwrap_or_else(|e| panic!("{e}")).batch);
    }
    assert_eq!(kept.len(), 30, "3,000 cells in batches of 100");
    assert_eq!(kept.iter().map(|b| b.n_cells()).sum::<usize>(), 3000);
}

/// A batch's rows of counts: (genes, values) per cell.
type BatchRows = Vec<(Vec<u32>, Vec<f32>)>;

/// The batches of one planned pass over every cell, as (rows of counts) per batch, and the pool's
/// block counts.
fn one_pass(
    store: &std::path::Path,
    plan: &cpa_stream::unstable::pipeline::batcher::PlanOptions,
    loader: cpa_stream::unstable::pipeline::batcher::LoaderOptions,
) -> (Vec<BatchRows>, cpa_stream::unstable::stages::store::BlockCacheReport) {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use cpa_stream::unstable::pipeline::StageStats;
    use cpa_stream::unstable::pipeline::batcher::{PoolStats, spawn_loader};
    use cpa_stream::unstable::pipeline::encoder::{CellLabels, Split};
    use cpa_stream::unstable::stages::store::Store;

    let store = Arc::new(Store::open(store).unwrap_or_else(|e| panic!("{e}")));
    let labels = Arc::new(
        CellLabels::from_store(&store, &synth_encoder(SplitSpec::all_training())).unwrap_or_else(|e| panic!("{e}")),
    );
    let stats = PoolStats::planned(loader.workers);
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaded = spawn_loader(&store, &labels, Split::Train, 1, 0, plan, loader, stats.clone(), stop)
        .unwrap_or_else(|e| panic!("{e}"));
    let consumer = StageStats::new(Stage::Consumer, 1);
    let mut batches = Vec::new();
    while let Some(gathered) = loaded.next(&consumer) {
        let batch = gathered.unwrap_or_else(|e| panic!("{e}")).batch;
        batches.push(
            (0..batch.n_cells())
                .map(|i| {
                    let (g, v) = batch.counts.row(i);
                    (g.to_vec(), v.to_vec())
                })
                .collect(),
        );
        loaded.recycle(batch);
    }
    drop(loaded);
    (batches, stats.block_report())
}

#[test]
fn a_compressed_store_decodes_each_block_once_per_pass_and_within_its_buffer() {
    use cpa_stream::unstable::pipeline::batcher::{LoaderOptions, PlanOptions};
    use cpa_stream::unstable::stages::store::Store;

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let raw = synth_store(dir.path(), "raw.store", "raw");
    let zstd = synth_store(dir.path(), "zstd.store", "zstd");
    let blocks = Store::open(&zstd).unwrap_or_else(|e| panic!("{e}")).n_blocks();
    assert_eq!(blocks, 12, "3,000 cells in blocks of 256");
    // Batches of 64 from a window of 4 blocks, three workers: every batch draws from up to 4
    // blocks, and a block feeds 16 batches; decoded per batch, that would be ~190 decodes.
    let plan = PlanOptions { batch_size: 64, shuffle_blocks: 4, run_cells: 1, seed: 3, ..PlanOptions::default() };
    let loader = LoaderOptions { workers: 3, prefetch: 2, ..LoaderOptions::default() };
    let (from_raw, raw_blocks) = one_pass(&raw, &plan, loader);
    let (from_zstd, zstd_blocks) = one_pass(&zstd, &plan, loader);
    assert_eq!(raw_blocks.decodes, 0);
    assert_eq!(zstd_blocks.decodes, blocks, "{zstd_blocks:?}");
    assert_eq!(zstd_blocks.early_drops, 0);
    // The same plan gives the same batches, row for row, whatever the codec.
    assert_eq!(from_raw.len(), from_zstd.len());
    assert!(from_raw == from_zstd, "the zstd store's batches differ from the raw store's");
    assert_eq!(from_zstd.iter().map(Vec::len).sum::<usize>(), 3000);

    // A buffer of room for about two blocks: the window narrows to one block (half the buffer),
    // each block is still decoded once, and the decoded bytes held stay within the buffer.
    let cell_bytes = {
        let s = Store::open(&zstd).unwrap_or_else(|e| panic!("{e}"));
        (s.nnz() * 8).div_ceil(s.n_obs())
    };
    let buffer = 2 * 256 * cell_bytes + 256 * cell_bytes / 2;
    let small = LoaderOptions { buffer_bytes: buffer, workers: 2, prefetch: 1 };
    let (narrow, counts) = one_pass(&zstd, &plan, small);
    assert_eq!(narrow.iter().map(Vec::len).sum::<usize>(), 3000);
    assert!(counts.peak_bytes <= buffer, "{counts:?} over a buffer of {buffer}");
    // A block dropped early costs at most one more decode (none when a batch still held it).
    assert!((blocks..=blocks + counts.early_drops).contains(&counts.decodes), "{counts:?}");
}

#[test]
fn later_passes_fill_the_batches_of_earlier_ones() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use cpa_stream::unstable::pipeline::StageStats;
    use cpa_stream::unstable::pipeline::batcher::{LoaderOptions, PlanOptions, PoolStats, spawn_loader};
    use cpa_stream::unstable::pipeline::encoder::{CellLabels, Split};
    use cpa_stream::unstable::stages::store::Store;

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = synth_store(dir.path(), "zstd.store", "zstd");
    let store = Arc::new(Store::open(&path).unwrap_or_else(|e| panic!("{e}")));
    let labels = Arc::new(
        CellLabels::from_store(&store, &synth_encoder(SplitSpec::all_training())).unwrap_or_else(|e| panic!("{e}")),
    );
    let plan = PlanOptions { batch_size: 64, shuffle_blocks: 4, run_cells: 1, seed: 3, ..PlanOptions::default() };
    let loader = LoaderOptions { workers: 2, prefetch: 2, ..LoaderOptions::default() };
    let pool_size = loader.pool_size();
    let stats = PoolStats::planned(loader.workers);
    let consumer = StageStats::new(Stage::Consumer, 1);
    let pass = |epoch: u64| {
        let stop = Arc::new(AtomicBool::new(false));
        let mut loaded = spawn_loader(&store, &labels, Split::Train, epoch, 0, &plan, loader, stats.clone(), stop)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut rows: Vec<(Vec<u32>, Vec<f32>)> = Vec::new();
        while let Some(gathered) = loaded.next(&consumer) {
            let batch = gathered.unwrap_or_else(|e| panic!("{e}")).batch;
            rows.extend((0..batch.n_cells()).map(|i| {
                let (g, v) = batch.counts.row(i);
                (g.to_vec(), v.to_vec())
            }));
            loaded.recycle(batch);
        }
        drop(loaded);
        rows
    };
    // How many batches a pass needs at once depends on how the threads are scheduled (a
    // consumer descheduled for long makes a worker allocate one more), so the assertions are
    // what holds under any schedule: a pass takes every batch an earlier one kept before it
    // allocates, and never more than a pool's worth is kept.
    let first = pass(1);
    let (kept, allocated) = stats.batches();
    assert!(allocated >= 1, "{allocated} allocated");
    assert_eq!(stats.reused(), 0, "the first pass has nothing kept to reuse");
    assert_eq!(kept as u64, allocated.min(pool_size as u64), "every batch handed back is kept, up to a pool");
    let takes_kept_first = |kept_before: usize, allocated_before: u64, reused_before: u64| {
        let (reused, allocated) = (stats.reused() - reused_before, stats.batches().1 - allocated_before);
        assert!(
            allocated == 0 || reused == kept_before as u64,
            "{allocated} allocated while {} of {kept_before} kept batches were unused",
            kept_before as u64 - reused
        );
        assert!(stats.batches().0 <= pool_size, "{} kept, pool of {pool_size}", stats.batches().0);
    };
    // The same epoch again: the same rows, read into the kept batches.
    let (kept1, allocated1, reused1) = (stats.batches().0, stats.batches().1, stats.reused());
    assert!(pass(1) == first, "a pass into kept batches read other rows");
    takes_kept_first(kept1, allocated1, reused1);
    assert!(stats.reused() > reused1, "the second pass reused no kept batch");
    // Another epoch: other rows, from kept batches first.
    let (kept2, allocated2, reused2) = (stats.batches().0, stats.batches().1, stats.reused());
    assert_eq!(pass(2).len(), 3000);
    takes_kept_first(kept2, allocated2, reused2);
}

#[test]
fn fed_passes_decode_each_block_once_when_their_producer_says_what_is_to_come() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use cpa_stream::unstable::pipeline::StageStats;
    use cpa_stream::unstable::pipeline::batcher::{LoaderOptions, PoolStats, spawn_fed};
    use cpa_stream::unstable::stages::store::Store;

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let zstd = synth_store(dir.path(), "zstd.store", "zstd");
    let store = Arc::new(Store::open(&zstd).unwrap_or_else(|e| panic!("{e}")));
    let loader = LoaderOptions { workers: 3, prefetch: 1, ..LoaderOptions::default() };
    let consumer = StageStats::new(Stage::Consumer, 1);
    let drain = |mut loaded: cpa_stream::unstable::pipeline::batcher::Loaded<u32>| {
        let mut cells = 0;
        while let Some(g) = loaded.next(&consumer) {
            let g = g.unwrap_or_else(|e| panic!("{e}"));
            cells += g.batch.counts.n_rows();
            loaded.recycle(g.batch);
        }
        cells
    };

    // Prediction's way: ascending jobs of 100 cells (jobs share blocks at their ends), the scan
    // position held between jobs.
    let stats = PoolStats::fed(loader.workers);
    let (mut feeder, loaded) = spawn_fed::<u32>(
        &store,
        loader,
        StageStats::new(Stage::Source, 1),
        stats.clone(),
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let producer = std::thread::spawn(move || {
        for (k, start) in (0..3000u64).step_by(100).enumerate() {
            feeder.send_in_order((start..start + 100).collect(), k as u32);
        }
    });
    assert_eq!(drain(loaded), 3000);
    producer.join().unwrap_or_else(|_| panic!("producer panicked"));
    assert_eq!(stats.block_report().decodes, 12, "{:?}", stats.block_report());

    // Evaluation's way: cells of three groups interleaved in store order, each group's batch sent
    // when full, the rest at the end; every cell reserved when the scan reaches it.
    let stats = PoolStats::fed(loader.workers);
    let (mut feeder, loaded) = spawn_fed::<u32>(
        &store,
        loader,
        StageStats::new(Stage::Planner, 1),
        stats.clone(),
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let producer = std::thread::spawn(move || {
        let mut pending: Vec<Vec<u64>> = vec![Vec::new(); 3];
        for cell in 0..3000u64 {
            feeder.scan(cell);
            feeder.reserve(cell);
            let group = (cell * 7 % 3) as usize;
            pending[group].push(cell);
            if pending[group].len() == 90 {
                feeder.send_reserved(std::mem::take(&mut pending[group]), group as u32);
            }
        }
        for (group, rows) in pending.into_iter().enumerate() {
            if !rows.is_empty() {
                feeder.send_reserved(rows, group as u32);
            }
        }
    });
    assert_eq!(drain(loaded), 3000);
    producer.join().unwrap_or_else(|_| panic!("producer panicked"));
    assert_eq!(stats.block_report().decodes, 12, "{:?}", stats.block_report());
}
