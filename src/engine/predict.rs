//! `cpa-stream predict`: the request its flags make, the run and its report.

use std::path::PathBuf;
use std::process::ExitCode;

use cpa_stream_engine::predict::{self, PredictRequest};
use cpa_stream_pipeline::request::{Compute, Naming};

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
            anchored: self.anchored,
            aggregate: self.aggregate.clone(),
            group_by: self.group_by.clone(),
            row_group_rows: self.row_group_rows,
            sink_threads: self.sink_threads,
            parts: self.parts,
            sink_profile: self.sink_profile,
            values: self.values,
            zstd_level: self.zstd_level,
            overwrite: self.overwrite,
            compute: Compute { device: self.device.clone(), threads: self.threads, workers: self.workers },
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
    outln!(
        "{}: {} {rows} ({of}{} source cells x {} target{plural}), {} genes, {:.1} MB{parts}",
        report.output.path.display(),
        report.output.rows,
        report.source_cells,
        report.targets,
        report.genes,
        report.output.bytes as f64 / 1e6
    );
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
    if let Some(memory) = report.device_memory {
        outln!("{memory}");
    }
    Ok(ExitCode::SUCCESS)
}
