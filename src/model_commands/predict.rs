//! `cpa-stream predict`: the request its flags make, the run and its report.

use std::path::PathBuf;
use std::process::ExitCode;

use cpa_stream_engine::predict::{self, PredictRequest};
use cpa_stream_pipeline::request::Naming;

use crate::cli;
use crate::cli::predict::PredictArgs;

impl PredictArgs {
    /// The request these flags make (`--genes` is `all`, `top-deg:K` or a file of names).
    pub fn request(&self) -> anyhow::Result<PredictRequest> {
        let (genes_file, top_deg) = match self.genes.as_str() {
            "all" => (None, None),
            text => match text.strip_prefix("top-deg:") {
                Some(k) => match k.parse::<usize>() {
                    Ok(k) if k > 0 => (None, Some(k)),
                    _ => anyhow::bail!("--genes {text:?}: K must be a positive integer"),
                },
                None => (Some(PathBuf::from(text)), None),
            },
        };
        Ok(PredictRequest {
            model: self.model.clone(),
            ensemble: self.ensemble.clone(),
            store: self.store.clone(),
            out: Some(self.out.clone()),
            source: self.source.clone(),
            targets: self.target.clone(),
            targets_file: self.targets.clone(),
            genes: None,
            genes_file,
            top_deg,
            degs: self.degs.clone(),
            latents: self.latents.clone(),
            shard: self.shard.clone(),
            layout: self.layout,
            batch_size: self.batch_size,
            prefetch: self.prefetch,
            seed: self.seed,
            allow_empty: self.allow_empty,
            batch_corrected: self.batch_corrected,
            expected_log1p: self.expected_log1p,
            change: self.change,
            counts: self.counts,
            anchored: self.anchored,
            plain: self.plain,
            aggregate: self.aggregate.clone(),
            group_by: self.group_by.clone(),
            row_group_rows: self.row_group_rows,
            sink_threads: self.sink_threads,
            parts: self.parts,
            sink_profile: self.sink_profile,
            values: self.values,
            zstd_level: self.zstd_level,
            overwrite: self.overwrite,
            compute: self.compute.compute(),
            naming: Naming::Flags,
        })
    }
}

pub fn run(args: PredictArgs) -> anyhow::Result<ExitCode> {
    let what = || format!("predicting from {} with {}", args.store.display(), args.model.display());
    let Some(report) = cli::run_request(&args.request()?, PredictRequest::options, predict::run, args.json, what)?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    let plural = if report.targets == 1 { "" } else { "s" };
    let (rows, of) = if report.aggregated { ("groups", "aggregates of ") } else { ("rows", "") };
    let parts = match report.output.files {
        1 if !report.parts => String::new(),
        1 => " in 1 part".to_owned(),
        n => format!(" in {n} parts"),
    };
    let models = if report.models > 1 { format!(", each the mean of {} models", report.models) } else { String::new() };
    if let Some(controls) = report.observed_controls {
        outln!(
            "{}: AnnData of raw counts, {} rows x {} genes: {} drawn ({} source cells x {} target{plural}), then the \
             {controls} control cells among the source cells as observed (obs `observed`); {:.1} MB",
            report.output.path.display(),
            report.output.rows,
            report.genes,
            report.output.rows - controls,
            report.source_cells,
            report.targets,
            report.output.bytes as f64 / 1e6
        );
        cli::print_report(&report.report)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{}: {} {rows} ({of}{} source cells x {} target{plural}{models}), {} genes, {:.1} MB{parts}",
        report.output.path.display(),
        report.output.rows,
        report.source_cells,
        report.targets,
        report.genes,
        report.output.bytes as f64 / 1e6
    );
    if let Some(anchored) = report.anchored_rows {
        outln!(
            "{}",
            anchored_line(anchored, report.source_cells.saturating_mul(report.targets as u64), report.aggregated)
        );
    }
    if report.aggregated {
        outln!("{:.0} source cells/s, {:.0} cell predictions/s", report.cells_per_s, report.rows_per_s);
    } else {
        let ratio = report.raw_f32_bytes_per_row / report.bytes_per_row.max(1e-9);
        let compared =
            if ratio >= 1.0 { format!("{ratio:.2}x smaller") } else { format!("{:.2}x larger", 1.0 / ratio) };
        outln!(
            "{:.0} source cells/s, {:.0} rows/s; {:.0} bytes per row on disk (ids, labels, values) vs {:.0} for \
             its values as raw float32 ({compared})",
            report.cells_per_s,
            report.rows_per_s,
            report.bytes_per_row,
            report.raw_f32_bytes_per_row,
        );
    }
    cli::print_report(&report.report)?;
    let sink = report.report.holdup().filter(|stage| stage.name == "sink").map(|stage| stage.threads);
    let f16 = args.values == Some(cpa_stream_stages::sink::Values::F16);
    if let Some(hint) = faster_output_hint(sink, report.aggregated, report.parts, args.shard.is_some(), f16) {
        outln!("{hint}");
    }
    if let Some(memory) = report.device_memory {
        outln!("{memory}");
    }
    Ok(ExitCode::SUCCESS)
}

/// What the `anchored` column holds: how many of the `total` rows (cells, for aggregates) are
/// anchored on their source cell.
fn anchored_line(anchored: u64, total: u64, aggregated: bool) -> String {
    let rows = if aggregated { "cells" } else { "rows" };
    if anchored == total {
        format!(
            "anchored: every one of the {total} {rows} is its source cell's observed log1p counts moved by the \
             predicted change (column `anchored`; `mean` is the plain prediction)"
        )
    } else if anchored == 0 {
        format!(
            "not anchored: no source cell is a control cell of its target's covariates, so `anchored` holds \
             log1p(mean) in all {total} {rows} (is_anchored false); anchor on control cells of the target's \
             covariates, or give --anchored to anchor each cell on itself"
        )
    } else {
        format!(
            "anchored: {anchored} of {total} {rows}, those whose source cell is a control cell of the target's \
             covariates; the other {} hold log1p(mean) in `anchored` (is_anchored false)",
            total - anchored
        )
    }
}

/// What would write per-cell rows faster when writing them held the run up (`sink_held_up`:
/// the sink stage was the run's holdup, on that many threads): the flags not given of those that
/// lift the sink's rate (docs/benchmarks.md: parts on several threads 1.8-2.2x on a GPU host,
/// float16 1.3-1.9x), and aggregates.
fn faster_output_hint(
    sink_held_up: Option<u64>,
    aggregated: bool,
    parts: bool,
    shard: bool,
    f16: bool,
) -> Option<String> {
    let threads = sink_held_up.filter(|_| !aggregated)?;
    let mut ways = Vec::new();
    let more = if threads < 2 { " --sink-threads 2" } else { "" };
    if !parts && !shard {
        ways.push(format!("--parts{more} (part files written side by side)"));
    } else if parts && !more.is_empty() {
        ways.push(format!("{} (a thread a part)", more.trim_start()));
    }
    if !f16 {
        ways.push("--values f16 (half the bytes)".to_owned());
    }
    ways.push("--aggregate mean,var where per-cell rows are not needed".to_owned());
    Some(format!("hint: writing the Parquet rows limited this run; faster: {}", ways.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::faster_output_hint;

    #[test]
    fn the_hint_names_the_faster_outputs_not_already_asked_for_when_the_sink_held_the_run_up() {
        assert_eq!(faster_output_hint(None, false, false, false, false), None, "another stage or none");
        assert_eq!(faster_output_hint(Some(1), true, false, false, false), None, "aggregates write a few rows");
        let all = faster_output_hint(Some(1), false, false, false, false).unwrap_or_default();
        assert!(all.contains("--parts --sink-threads 2") && all.contains("--values f16"), "{all}");
        assert!(all.contains("--aggregate mean,var"), "{all}");
        let threads = faster_output_hint(Some(8), false, false, false, false).unwrap_or_default();
        assert!(threads.contains("--parts (") && !threads.contains("--sink-threads"), "{threads}");
        let given = faster_output_hint(Some(4), false, true, false, true).unwrap_or_default();
        assert!(!given.contains("--parts") && !given.contains("--values") && given.contains("--aggregate"), "{given}");
        let one = faster_output_hint(Some(1), false, true, false, true).unwrap_or_default();
        assert!(one.contains("--sink-threads 2 (a thread a part)") && !one.contains("--parts"), "{one}");
        let sharded = faster_output_hint(Some(1), false, false, true, false).unwrap_or_default();
        assert!(!sharded.contains("--parts"), "a shard cannot also be parts: {sharded}");
    }
}
