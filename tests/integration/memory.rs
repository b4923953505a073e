//! Host memory that does not grow with the number of cells: one model evaluated on a synthetic
//! atlas and on one ten times larger (same generator), peak RssAnon as the run reports it.

use std::path::Path;

use crate::common::{run, text};

fn s(p: &Path) -> String {
    p.to_str().unwrap_or_default().to_owned()
}

/// Peak RssAnon (bytes) and seconds of `evaluate` on `store`, from its JSON report.
fn evaluate_peak(model: &Path, store: &Path, out: &Path) -> (u64, f64) {
    let o = run(&[
        "evaluate",
        "--model",
        &s(model),
        "--store",
        &s(store),
        "--out",
        &s(out),
        "--overwrite",
        "--no-plots",
        // Batches that fill on both atlases: what is bounded by the settings (batches in flight,
        // cell samples) is then the same, and what remains would grow with the cells.
        "--batch-size",
        "64",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "evaluate failed: {}", text(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}"));
    let peak = report["report"]["memory"]["rss_anon"].as_u64().unwrap_or(0);
    (peak, report["seconds"].as_f64().unwrap_or(f64::NAN))
}

#[test]
fn evaluation_memory_does_not_grow_with_the_cells() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let stores: Vec<_> = [20_000u32, 200_000]
        .iter()
        .map(|&n| {
            let store = dir.path().join(format!("atlas-{n}.store"));
            let cells = n.to_string();
            let o = run(&[
                "synth",
                "--cells",
                &cells,
                "--genes",
                "200",
                "--perturbations",
                "4",
                "--cell-types",
                "2",
                "--seed",
                "3",
                "--out",
                &s(&store),
            ]);
            assert!(o.status.success(), "synth failed: {}", text(&o.stderr));
            store
        })
        .collect();
    let model = dir.path().join("run");
    let o = run(&[
        "train",
        "--store",
        &s(&stores[0]),
        "--dose-key",
        "dose",
        "--covariates",
        "cell_type",
        "--epochs",
        "2",
        "--threads",
        "1",
        "--out",
        &s(&model),
    ]);
    assert!(o.status.success(), "train failed: {}", text(&o.stderr));
    // Two runs each, the smaller peak of each kept (a neighbour's load can delay the sampler).
    let peak = |store: &Path| {
        let a = evaluate_peak(&model, store, &dir.path().join("eval"));
        let b = evaluate_peak(&model, store, &dir.path().join("eval"));
        (a.0.min(b.0), a.1.min(b.1))
    };
    let (small, large) = (peak(&stores[0]), peak(&stores[1]));
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    eprintln!(
        "evaluation peak RssAnon: {:.0} MiB at 20,000 cells ({:.1} s), {:.0} MiB at 200,000 ({:.1} s)",
        mib(small.0),
        small.1,
        mib(large.0),
        large.1
    );
    assert!(small.0 > 0 && large.0 > 0, "no memory reported");
    assert!(
        large.0 as f64 <= small.0 as f64 * 1.10,
        "peak RssAnon grew from {:.0} MiB to {:.0} MiB with ten times the cells",
        mib(small.0),
        mib(large.0)
    );
}
