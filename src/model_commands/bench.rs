//! `cpa-stream bench model`, `bench train` and `bench predict`: the benchmarks that run the model.

use std::process::ExitCode;

use anyhow::Context as _;

use cpa_stream_engine::bench::{
    ModelBenchOptions, OpClass, OpCounts, Profile, TimeShare, TrainingBenchOptions, bench_model, bench_training,
};
use cpa_stream_pipeline::batcher::LoaderOptions;
use cpa_stream_stages::model::config::{CpaConfig, Precision};

use crate::cli::bench::{ModelArgs, PredictBenchArgs, TrainArgs};

pub fn train(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(path) => CpaConfig::from_file(path)?,
        None => CpaConfig::default(),
    };
    if let Some(b) = args.batch_size {
        config.training.batch_size = b;
    }
    if let Some(p) = &args.precision {
        config.training.precision = parse_precision(p)?;
    }
    if let Some(k) = args.shuffle_run_cells {
        config.training.shuffle_run_cells = k;
    }
    config.validate().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    let (device, workers) = super::model_device(&args.device, args.threads, args.workers)?;
    let options = TrainingBenchOptions {
        store: args.store.clone(),
        encoder: args.labels.all_training(config.model.max_comb_len),
        device,
        config,
        loader: LoaderOptions { workers, prefetch: args.prefetch.max(1), ..LoaderOptions::default() },
        epochs: args.epochs,
        preload_bytes: args.preload_mib.saturating_mul(1 << 20),
    };
    let r = bench_training(&options).with_context(|| format!("benchmarking training on {}", args.store.display()))?;
    if args.json {
        jsonln!(&r);
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{}: {} cells x {} genes, batch {}, runs of {} cells, {} workers, {} {}, {} threads; {} batches ({} cells) \
         preloaded",
        r.store,
        r.cells,
        r.genes,
        r.batch_size,
        r.run_cells,
        r.workers,
        r.device,
        r.precision,
        r.threads,
        r.preloaded_batches,
        r.preloaded_cells
    );
    outln!(
        "through the pipeline {:.0} cells/s; on preloaded batches {:.0} cells/s; ratio {:.2}",
        r.pipeline_cells_per_s,
        r.preloaded_cells_per_s,
        r.ratio
    );
    let ratios: Vec<String> = r.rounds.iter().map(|round| format!("{:.2}", round.ratio)).collect();
    let waits: Vec<String> = r.rounds.iter().map(|round| format!("{:.2}", round.trainer_blocked_s)).collect();
    outln!("per epoch: ratio {}; trainer waited {} s for batches", ratios.join(" "), waits.join(" "));
    if let Some(memory) = r.device_memory {
        outln!("{memory}");
    }
    out!("{}", r.report.render());
    Ok(ExitCode::SUCCESS)
}

fn parse_precision(name: &str) -> anyhow::Result<Precision> {
    match name {
        "fp32" => Ok(Precision::Fp32),
        "bf16" => Ok(Precision::Bf16),
        other => anyhow::bail!("--precision {other:?}: expected fp32 or bf16"),
    }
}

pub fn model(args: ModelArgs) -> anyhow::Result<ExitCode> {
    let precision = parse_precision(&args.precision)?;
    let config = match &args.config {
        Some(path) => CpaConfig::from_file(path)?,
        None => CpaConfig::default(),
    };
    let options = ModelBenchOptions {
        cells: args.cells,
        genes: args.genes,
        batch_size: args.batch_size,
        epochs: args.epochs,
        device: cpa_stream_engine::device::parse(&args.device)?,
        precision,
        threads: args.threads.unwrap_or(0),
        config,
        seed: 0,
        count_ops: args.count_ops,
        profile: args.profile,
        trace: args.trace.clone(),
    };
    let r = bench_model(&options)?;
    if args.json {
        jsonln!(&r);
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "model: {} cells x {} genes, batch {}, {} {}, {} threads, {} parameters",
        r.cells,
        r.genes,
        r.batch_size,
        r.device,
        r.precision,
        r.threads,
        r.parameters
    );
    outln!(
        "{} epochs in {:.2} s: {:.0} cells/s, {:.2} ms per batch (final reconstruction loss {:.1})",
        r.epochs,
        r.seconds,
        r.cells_per_s,
        r.ms_per_batch,
        r.final_recon_loss
    );
    if let Some(memory) = r.device_memory {
        outln!("{memory}");
    }
    if let Some(ops) = &r.ops {
        print_ops(ops)?;
    }
    if let Some(profile) = &r.profile {
        print_profile(profile)?;
    }
    if let Some(trace) = &args.trace {
        outln!("trace: {}", trace.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a step's time went: the wall, the host's time in libtorch, the device's busy time, then
/// the kernels and host operators that took most of it.
fn print_profile(p: &Profile) -> anyhow::Result<()> {
    let top = |shares: &[TimeShare]| -> String {
        shares
            .iter()
            .take(12)
            .map(|s| format!("{} {:.3} ms ({:.1}x)", s.name, s.ms, s.calls))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let share = |ms: f64| 100.0 * ms / p.wall_ms.max(1e-12);
    outln!(
        "profile of {} training steps: {:.2} ms a step; the host in libtorch {:.2} ms ({:.0}%)",
        p.units,
        p.wall_ms,
        p.host_ms,
        share(p.host_ms)
    );
    if let Some(d) = &p.device {
        outln!(
            "device busy {:.2} ms a step ({:.0}% of the wall), {:.1} kernels, copies and fills a step",
            d.busy_ms,
            share(d.busy_ms),
            d.events
        );
        outln!("device time per step, most first: {}", top(&d.top));
    }
    outln!("host self time per step, most first: {}", top(&p.host_top));
    Ok(())
}

/// The operator counts of a step: totals, then the operators behind most of the kernels.
fn print_ops(ops: &OpCounts) -> anyhow::Result<()> {
    outln!(
        "per training step ({} steps counted): {:.1} operators dispatched, {:.1} kernels, {:.1} host \
         synchronisations",
        ops.units,
        ops.dispatched,
        ops.kernels,
        ops.syncs
    );
    let per = |n: u64| n as f64 / ops.units.max(1) as f64;
    let kernels = ops.ops.iter().filter(|o| o.class == OpClass::Kernel);
    let shown: Vec<String> = kernels.take(12).map(|o| format!("{} {:.1}", o.name, per(o.kernels))).collect();
    outln!("kernels per step, most first: {}", shown.join(", "));
    let by: Vec<String> =
        ops.by_dispatch.iter().take(12).map(|d| format!("{} {:.1}", d.name, per(d.kernels))).collect();
    outln!("kernels per step by the operator dispatched, most first: {}", by.join(", "));
    let syncs: Vec<String> = ops
        .ops
        .iter()
        .filter(|o| o.class == OpClass::Sync)
        .map(|o| format!("{} {:.1}", o.name, per(o.calls)))
        .collect();
    if !syncs.is_empty() {
        outln!("host synchronisations per step: {}", syncs.join(", "));
    }
    Ok(())
}

pub fn predict(args: PredictBenchArgs) -> anyhow::Result<ExitCode> {
    use cpa_stream_engine::predict::PredictRequest;
    use cpa_stream_pipeline::request::Compute;
    let request = PredictRequest {
        model: args.model.clone(),
        store: args.store.clone(),
        source: args.source.clone(),
        targets: args.target.clone(),
        sink_threads: args.sink_threads,
        values: Some(args.values),
        compute: Compute { device: args.device.clone(), threads: args.threads, workers: None },
        ..PredictRequest::default()
    };
    let base = request.options()?;
    let r = cpa_stream_engine::bench::bench_predict(&base, &args.modes, args.repeats, args.dir.as_deref())?;
    if args.json {
        jsonln!(&r);
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{} genes per row; {} values; sink threads {}; {} CPUs",
        r.genes,
        if r.values == cpa_stream_stages::sink::Values::F16 { "float16" } else { "float32" },
        r.sink_threads,
        r.cpus
    );
    outln!(
        "{:>9} {:>12} {:>8} {:>9} {:>12} {:>12} {:>12} {:>11} {:>11} {:>10}",
        "mode",
        "predictions",
        "rows",
        "wall s",
        "per s",
        "predictor/s",
        "sink/s",
        "sink share",
        "bottleneck",
        "file MB"
    );
    for round in &r.rounds {
        outln!(
            "{:>9} {:>12} {:>8} {:>9.2} {:>12.0} {:>12.0} {:>12.0} {:>10.1}% {:>11} {:>10.1}",
            format!("{:?}", round.mode).to_lowercase(),
            round.predictions,
            round.rows,
            round.seconds,
            round.per_s,
            round.predictor_per_s,
            round.sink_per_s,
            100.0 * round.sink_share,
            round.bottleneck,
            round.file_bytes as f64 / 1e6
        );
    }
    outln!(
        "(cell predictions per second of wall time, and of each stage's busy time; medians of {} interleaved \
         repetitions)",
        args.repeats.max(1)
    );
    Ok(ExitCode::SUCCESS)
}
