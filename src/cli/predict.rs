//! `cpa-stream predict`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use cpa_stream_engine::predict::{self, PredictRequest};
use cpa_stream_engine::predictor::{DEFAULT_BATCH_SIZE, Layout};
use cpa_stream_pipeline::batcher::DEFAULT_PREFETCH;
use cpa_stream_pipeline::request::{Compute, Naming};
use cpa_stream_stages::sink::{DEFAULT_ROW_GROUP_ROWS, DEFAULT_ZSTD_LEVEL};

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Training run directory (its model/ is used) or model directory.
    #[arg(long)]
    model: PathBuf,
    /// Store with the source cells (same genes as the model).
    #[arg(long)]
    store: PathBuf,
    /// Output Parquet file; with --shard, a dataset directory that receives part-K-of-N.parquet.
    #[arg(long)]
    out: PathBuf,
    /// Source cells: an expression over obs columns, e.g. `condition == control and cell_type in
    /// (A549, K562)`, or `all` [default: the control cells].
    #[arg(long)]
    source: Option<String>,
    /// When the source selects no cell, write an empty file with a warning instead of failing.
    #[arg(long)]
    allow_empty: bool,
    /// Replace an existing output file (with --shard: an existing part file).
    #[arg(long)]
    overwrite: bool,
    /// Target condition: `KEY=VALUE,...` with the perturbation key, dose key and covariates
    /// (`condition=A+B,dose=0.1+1,cell_type=K562`), or just a condition (`A+B`, dose 1 each).
    /// Covariates not set keep each source cell's own. Repeat for several targets.
    #[arg(long, conflicts_with = "targets")]
    target: Vec<String>,
    /// CSV (header row) or Parquet table of targets, one per row, columns named like --target keys.
    #[arg(long)]
    targets: Option<PathBuf>,
    /// Genes written: all, top-deg:K (the union of the targets' top K DEGs), or a file with one
    /// gene per line.
    #[arg(long, default_value = "all")]
    genes: String,
    /// DEG table (group, rank, gene) for top-deg:K [default: the store's degs.parquet].
    #[arg(long)]
    degs: Option<PathBuf>,
    /// Latents written as vector columns (comma-separated: z_basal, z, z_corrected, z_no_pert,
    /// z_no_pert_corrected).
    #[arg(long, value_delimiter = ',')]
    latents: Vec<String>,
    /// `long`: `mean` (and each latent) as one list column; `wide`: one float column per gene,
    /// named by the gene (and `z_basal_0`, ... per latent dimension), for tools without list
    /// columns.
    #[arg(long, default_value = "long")]
    layout: Layout,
    /// Decode without the batch covariate's embedding: expression corrected for the batch
    /// (cpa-tools' custom_predict(add_batch=False)); the model must have a batch key.
    #[arg(long)]
    batch_corrected: bool,
    /// Also write `expected_log1p`: E[log1p(x)] of each predicted count distribution, the same
    /// genes as `mean` (nb models). What a mean of log-normalised counts estimates, which
    /// log1p(mean) overstates; `evaluate --expected-log1p` scores it.
    #[arg(long)]
    expected_log1p: bool,
    /// Also write `change_log1p`: per gene, E[log1p(x)] under the target minus under the source
    /// cell's own condition (nb models): the model's predicted change. Added to the cells'
    /// observed log1p counts it anchors the prediction on real data, which on the bundled data
    /// beats the control-mean baseline (docs/fidelity.md).
    #[arg(long)]
    change: bool,
    /// Instead of a row per cell, write per target and group of source cells these statistics of
    /// every predicted column (comma-separated: mean, var), computed where the model runs as the
    /// cells pass: one row per group with `n_cells`, `mean`, `mean_var`, ... (the variance is
    /// the sample variance, ddof 1).
    #[arg(long, value_delimiter = ',', value_name = "mean,var")]
    aggregate: Vec<cpa_stream_engine::predictor::aggregate::Statistic>,
    /// The obs columns whose values group the source cells of --aggregate (comma-separated)
    /// [default: the model's covariates]; a covariate's group is its value in the output (the
    /// target's where the target sets it).
    #[arg(long, value_delimiter = ',', value_name = "COLUMNS")]
    group_by: Option<Vec<String>>,
    /// The k-th of n contiguous cell ranges, 0-based (`3/16`), for job arrays; `genes.parquet`
    /// (the var rows of the predicted genes, in column order) is written beside the parts.
    #[arg(long)]
    shard: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, value_parser = super::parse_batch_size, help = format!(
        "Source cells per batch [default: {DEFAULT_BATCH_SIZE}]"
    ))]
    batch_size: Option<usize>,
    /// Gather worker threads [default: planned with --threads from the usable CPUs].
    #[arg(long, value_parser = super::parse_workers)]
    workers: Option<usize>,
    #[arg(long, value_parser = super::parse_prefetch, help = format!(
        "Batches buffered between stages [default: {DEFAULT_PREFETCH}]"
    ))]
    prefetch: Option<usize>,
    #[arg(long, help = format!("Rows per Parquet row group at most [default: {DEFAULT_ROW_GROUP_ROWS}]"))]
    row_group_rows: Option<usize>,
    /// Threads that encode the output's row groups (the file is the same for any count)
    /// [default: 1 on the CPU; on a GPU the CPUs but one, at most 8].
    #[arg(long, value_name = "N")]
    sink_threads: Option<usize>,
    /// Page encoding of the output: small (zstd, byte-stream-split floats; the default) or fast
    /// (uncompressed pages, plain floats: faster to write and read, larger).
    #[arg(long, value_name = "small|fast")]
    sink_profile: Option<cpa_stream_stages::sink::SinkProfile>,
    /// The float type of the output's float columns: f32 (as computed) or f16 (Parquet FLOAT16:
    /// half the bytes, relative error at most 0.049%; a value above 65504 is an error).
    #[arg(long, value_name = "f32|f16")]
    values: Option<cpa_stream_stages::sink::Values>,
    #[arg(long, help = format!("zstd level of the output [default: {DEFAULT_ZSTD_LEVEL}]"))]
    zstd_level: Option<i32>,
    /// Seed of the posterior draws (variational models).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// libtorch threads [default: on the CPU, the usable CPUs not busy with other processes].
    #[arg(long, value_parser = super::parse_threads)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

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
            aggregate: self.aggregate.clone(),
            group_by: self.group_by.clone(),
            row_group_rows: self.row_group_rows,
            sink_threads: self.sink_threads,
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
    let Some(report) = super::run_request(&args.request()?, PredictRequest::options, predict::run, args.json, what)?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    let plural = if report.targets == 1 { "" } else { "s" };
    let (rows, of) = if report.aggregated { ("groups", "aggregates of ") } else { ("rows", "") };
    outln!(
        "{}: {} {rows} ({of}{} source cells x {} target{plural}), {} genes, {:.1} MB",
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
    super::print_report(&report.report)?;
    if let Some(memory) = report.device_memory {
        outln!("{memory}");
    }
    Ok(ExitCode::SUCCESS)
}
