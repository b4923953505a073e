//! An ETL job embedding the predictor: read a store, predict, transform, write.
//!
//! ```sh
//! cargo run --release --example etl                  # the bundled real data (imported, trained)
//! cargo run --release --example etl -- RUN STORE OUT # a trained run and its store
//! ```
//!
//! Without arguments it imports `examples/data/perturbench_devel_cpa.h5ad` into
//! `out/etl/perturbench.store` and trains a small model (20 epochs, seconds on a CPU) unless
//! they exist. Then it streams counterfactual predictions for three targets (K562 control cells
//! decoded into two held-out-style combinations and a single activation) and transforms each
//! record batch as it arrives: per-cell log fold changes against the cell's own reconstruction
//! under control, kept only for the genes that move most, written as a long table
//! (`cell_id`, `target`, `gene`, `log2_fold_change`) to `OUT/changes.parquet` through the
//! project's Parquet sink. Nothing holds more than one batch of predictions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::cast::AsArray;

use arrow_array::types::Float32Type;
use arrow_array::{Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use cpa_stream::predict::{PredictOptions, PredictRequest};
use cpa_stream::{ParquetSink, Predictor, RunContext, SinkOptions, import, train};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Genes kept per cell and target: the largest absolute log fold changes.
const TOP_GENES: usize = 10;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (run, store, out) = match args.as_slice() {
        [run, store, out] => (PathBuf::from(run), PathBuf::from(store), PathBuf::from(out)),
        [] => bundled()?,
        _ => return Err("usage: etl [RUN STORE OUT]".into()),
    };
    std::fs::create_dir_all(&out)?;
    let targets = ["condition=MAP2K3+MAP2K6,cell_type=k562", "condition=KLF1+MAP2K6,cell_type=k562", "KLF1"];
    let source = "condition == control and cell_type == k562";

    // Extract: the reference under control (each source cell reconstructed as a control cell)
    // and the counterfactuals, as two streams of the same cells in the same order.
    let request = |targets: &[&str]| -> cpa_stream::Result<PredictOptions> {
        let request = PredictRequest {
            model: run.clone(),
            store: store.clone(),
            source: Some(source.into()),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
        request.options()
    };
    let (reference, counterfactual) = (request(&["condition=control"])?, request(&targets)?);
    let predictor = Predictor::open(&counterfactual)?;
    let genes = predictor.genes().to_vec();
    let mut changes = predictor.stream()?;
    let mut controls = Predictor::open(&reference)?.stream()?;

    // Load: a long table, written as it is produced.
    let schema = Arc::new(Schema::new(vec![
        Field::new("cell_id", DataType::Utf8, false),
        Field::new("target", DataType::Utf8, false),
        Field::new("gene", DataType::Utf8, false),
        Field::new("log2_fold_change", DataType::Float32, false),
    ]));
    let path = out.join("changes.parquet");
    let mut sink = ParquetSink::create(&path, Arc::clone(&schema), &SinkOptions::default())?;
    let mut per_target: HashMap<String, (u64, f64)> = HashMap::new();
    // The counterfactual stream sends, per batch of source cells, one record batch per target.
    for control in controls.by_ref() {
        let control = control?;
        let base = means(&control);
        for _ in 0..targets.len() {
            let batch = changes.next().ok_or("the counterfactual stream ended early")??;
            let transformed = transform(&batch, &base, &genes, &schema)?;
            let target = label(&batch, "condition", 0);
            let entry = per_target.entry(target).or_default();
            entry.0 += batch.num_rows() as u64;
            let lfc = transformed.column(3).as_primitive::<Float32Type>();
            entry.1 += lfc.values().iter().map(|v| f64::from(v.abs())).sum::<f64>();
            sink.write(&transformed)?;
        }
    }
    let summary = sink.finish()?;
    println!("{}: {} rows, {:.2} MB", summary.path.display(), summary.rows, summary.bytes as f64 / 1e6);
    let mut names: Vec<_> = per_target.into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (target, (cells, sum)) in names {
        println!(
            "{target:<16} {cells} cells; mean |log2 fold change| of each cell's top {TOP_GENES} genes: {:.3}",
            sum / (cells as f64 * TOP_GENES as f64)
        );
    }
    Ok(())
}

/// The bundled real data: imported and trained once, under `out/etl/`.
fn bundled() -> Result<(PathBuf, PathBuf, PathBuf)> {
    // `cargo run` sets the variable; the compiled-in path is the fallback for a copied binary.
    let root =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let out = root.join("out/etl");
    let store = out.join("perturbench.store");
    if !store.exists() {
        std::fs::create_dir_all(&out)?;
        let input = root.join("examples/data/perturbench_devel_cpa.h5ad");
        let request = import::ImportRequest { inputs: vec![input], out: store.clone(), ..Default::default() };
        import::run(&request.options()?, &RunContext::default())?;
    }
    let run = out.join("run");
    if !run.join("model").exists() {
        let request = train::TrainRequest {
            store: store.clone(),
            out: run.clone(),
            dose_key: Some("dose".into()),
            covariates: vec!["cell_type".into()],
            holdout: vec!["MAP2K3+MAP2K6".into()],
            seed: Some(0),
            epochs: Some(20),
            ..Default::default()
        };
        train::run(&request.options()?, &RunContext::default())?;
    }
    Ok((run, store, out))
}

/// Row-major predicted means of a batch.
fn means(batch: &RecordBatch) -> Vec<Vec<f32>> {
    let Some(list) = batch.column_by_name("mean").map(|c| c.as_fixed_size_list()) else { return Vec::new() };
    let width = list.value_length() as usize;
    let values = list.values().as_primitive::<Float32Type>().values();
    values.chunks(width).map(<[f32]>::to_vec).collect()
}

fn label(batch: &RecordBatch, column: &str, row: usize) -> String {
    batch
        .column_by_name(column)
        .and_then(|c| arrow_cast::cast(c, &DataType::Utf8).ok())
        .map(|c| c.as_string::<i32>().value(row).to_owned())
        .unwrap_or_default()
}

/// Per cell: log2((counterfactual + 1) / (control reconstruction + 1)), the top genes by size.
fn transform(batch: &RecordBatch, base: &[Vec<f32>], genes: &[String], schema: &Arc<Schema>) -> Result<RecordBatch> {
    let ids = batch.column_by_name("cell_id").ok_or("no cell_id")?.as_string::<i32>();
    let predicted = means(batch);
    let (mut cell, mut target, mut gene, mut lfc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (row, (p, b)) in predicted.iter().zip(base).enumerate() {
        let mut changes: Vec<(usize, f32)> =
            p.iter().zip(b).enumerate().map(|(g, (p, b))| (g, ((p + 1.0) / (b + 1.0)).log2())).collect();
        changes.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        let name = format!("{} {}", label(batch, "condition", row), label(batch, "cell_type", row));
        for &(g, v) in changes.iter().take(TOP_GENES) {
            cell.push(ids.value(row).to_owned());
            target.push(name.clone());
            gene.push(genes[g].clone());
            lfc.push(v);
        }
    }
    Ok(RecordBatch::try_new(
        Arc::clone(schema),
        vec![
            Arc::new(StringArray::from(cell)),
            Arc::new(StringArray::from(target)),
            Arc::new(StringArray::from(gene)),
            Arc::new(Float32Array::from(lfc)),
        ],
    )?)
}
