//! `cpa-stream predict`: its flags.

use std::path::PathBuf;

use clap::Args;
use cpa_stream_pipeline::batcher::DEFAULT_PREFETCH;
use cpa_stream_pipeline::model_flags::{Layout, PREDICT_BATCH_SIZE as DEFAULT_BATCH_SIZE, Statistic};
use cpa_stream_stages::sink::{DEFAULT_ROW_GROUP_ROWS, DEFAULT_ZSTD_LEVEL};

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Training run directory (its model/ is used) or model directory.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Further training runs (or model directories) whose predictions are averaged with
    /// --model's: an ensemble, say of one recipe trained with other seeds (repeat the flag or
    /// separate with commas). Every predicted column is the mean over the models; the runs must
    /// share the store's genes, perturbations and covariates. Latents cannot be asked for.
    #[arg(long, value_delimiter = ',', value_name = "RUN")]
    pub(crate) ensemble: Vec<PathBuf>,
    /// Store with the source cells (same genes as the model).
    #[arg(long)]
    pub(crate) store: PathBuf,
    /// Output Parquet file; with --shard, a dataset directory that receives part-K-of-N.parquet;
    /// with --parts, the directory of parts.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Source cells: an expression over obs columns, e.g. `condition == control and cell_type in
    /// (A549, K562)`, or `all` [default: the control cells].
    #[arg(long)]
    pub(crate) source: Option<String>,
    /// When the source selects no cell, write an empty file with a warning instead of failing.
    #[arg(long)]
    pub(crate) allow_empty: bool,
    /// Replace an existing output file (with --shard: an existing part file; with --parts: an
    /// existing directory of parts).
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// Target condition: `KEY=VALUE,...` with the perturbation key, dose key and covariates
    /// (`condition=A+B,dose=0.1+1,cell_type=K562`), or just a condition (`A+B`, dose 1 each).
    /// Covariates not set keep each source cell's own. Repeat for several targets.
    #[arg(long, conflicts_with = "targets")]
    pub(crate) target: Vec<String>,
    /// CSV (header row) or Parquet table of targets, one per row, columns named like --target keys.
    #[arg(long)]
    pub(crate) targets: Option<PathBuf>,
    /// Genes written: all, top-deg:K (the union of the targets' top K DEGs), or a file with one
    /// gene per line.
    #[arg(long, default_value = "all")]
    pub(crate) genes: String,
    /// DEG table (group, rank, gene) for top-deg:K [default: the store's degs.parquet].
    #[arg(long)]
    pub(crate) degs: Option<PathBuf>,
    /// Latents written as vector columns (comma-separated: z_basal, z, z_corrected, z_no_pert,
    /// z_no_pert_corrected).
    #[arg(long, value_delimiter = ',')]
    pub(crate) latents: Vec<String>,
    /// `long`: `mean` (and each latent) as one list column; `wide`: one float column per gene,
    /// named by the gene (and `z_basal_0`, ... per latent dimension), for tools without list
    /// columns.
    #[arg(long, default_value = "long")]
    pub(crate) layout: Layout,
    /// Decode without the batch covariate's embedding: expression corrected for the batch
    /// (cpa-tools' custom_predict(add_batch=False)); the model must have a batch key.
    #[arg(long)]
    pub(crate) batch_corrected: bool,
    /// Also write `expected_log1p`: E[log1p(x)] of each predicted count distribution, the same
    /// genes as `mean` (nb models). What a mean of log-normalised counts estimates, which
    /// log1p(mean) overstates; `evaluate --expected-log1p` scores it.
    #[arg(long)]
    pub(crate) expected_log1p: bool,
    /// Also write `change_log1p`: per gene, E[log1p(x)] under the target minus under the source
    /// cell's own condition (nb models): the model's predicted change of the expected log1p.
    #[arg(long)]
    pub(crate) change: bool,
    /// Also write `counts`: per cell, whole counts drawn from the model's count distribution (nb,
    /// zinb; a negative binomial of the predicted mean at the source cell's library size, zero
    /// with the zero-inflation probability), one draw per cell and target, seeded by --seed (a
    /// cell's draws do not depend on the batch size, the shard or the other targets). With an
    /// --out ending in .h5ad, the file is an AnnData of raw counts as cell-eval2 scores it
    /// (docs/evaluation.md).
    #[arg(long)]
    pub(crate) counts: bool,
    /// Anchor every row on its source cell, whatever its condition and the target's covariates
    /// (and reconstructions too). By default, with targets, `anchored` holds per gene the
    /// source cell's observed log1p counts plus the model's predicted change (log1p(mean) under
    /// the target minus under the cell's own condition; the values themselves for a Gaussian
    /// model) where the source cell is a control cell whose covariates the target keeps, and
    /// log1p(mean) elsewhere; `is_anchored` says which, per row. With --aggregate mean, each
    /// group's observed mean moved by the model's change, and `n_anchored` counts its anchored
    /// cells. The anchored prediction is ahead of the plain mean on every held-out data set of
    /// docs/fidelity.md.
    #[arg(long, conflicts_with = "plain")]
    pub(crate) anchored: bool,
    /// No `anchored` column: the model's mean only (cpa-tools' prediction), without decoding the
    /// anchored cells once more under their own condition.
    #[arg(long)]
    pub(crate) plain: bool,
    /// Instead of a row per cell, write per target and group of source cells these statistics of
    /// every predicted column (comma-separated: mean, var), computed where the model runs as the
    /// cells pass: one row per group with `n_cells`, `mean`, `mean_var`, ... (the variance is
    /// the sample variance, ddof 1).
    #[arg(long, value_delimiter = ',', value_name = "mean,var")]
    pub(crate) aggregate: Vec<Statistic>,
    /// The obs columns whose values group the source cells of --aggregate (comma-separated)
    /// [default: the model's covariates]; a covariate's group is its value in the output (the
    /// target's where the target sets it).
    #[arg(long, value_delimiter = ',', value_name = "COLUMNS")]
    pub(crate) group_by: Option<Vec<String>>,
    /// The k-th of n contiguous cell ranges, 0-based (`3/16`), for job arrays; `genes.parquet`
    /// (the var rows of the predicted genes, in column order) is written beside the parts.
    #[arg(long)]
    pub(crate) shard: Option<String>,
    #[command(flatten)]
    pub(crate) compute: super::ComputeArgs,
    #[arg(long, value_parser = super::parse_batch_size, help = format!(
        "Source cells per batch [default: {DEFAULT_BATCH_SIZE}]"
    ))]
    pub(crate) batch_size: Option<usize>,
    #[arg(long, value_parser = super::parse_prefetch, help = format!(
        "Batches buffered between stages [default: {DEFAULT_PREFETCH}]"
    ))]
    pub(crate) prefetch: Option<usize>,
    #[arg(long, value_parser = super::parse_row_group_rows, help = format!(
        "Rows per Parquet row group at most [default: {DEFAULT_ROW_GROUP_ROWS}]"
    ))]
    pub(crate) row_group_rows: Option<usize>,
    /// Threads that encode the output's row groups (the file is the same for any count)
    /// [default: 1 on the CPU; on a GPU the CPUs but one, at most 8].
    #[arg(long, value_name = "N", value_parser = super::parse_sink_threads)]
    pub(crate) sink_threads: Option<usize>,
    /// Write --out as a directory of part files (part-K-of-N.parquet in row order, one row group
    /// each), written side by side by the sink's threads: faster than one file with several sink
    /// threads (the kernel writes one file at one thread's pace). Read it as one table
    /// (`polars.scan_parquet(out)`, `pandas.read_parquet(out)`, DuckDB's `read_parquet('out/*.parquet')`).
    #[arg(long, conflicts_with = "shard")]
    pub(crate) parts: bool,
    /// Page encoding of the output: small (zstd, byte-stream-split floats; the default) or fast
    /// (uncompressed pages, plain floats: faster to write and read, larger).
    #[arg(long, value_name = "small|fast")]
    pub(crate) sink_profile: Option<cpa_stream_stages::sink::SinkProfile>,
    /// The float type of the output's float columns: f32 (as computed) or f16 (Parquet FLOAT16:
    /// half the bytes, relative error at most 0.049%; a value above 65504 is an error).
    #[arg(long, value_name = "f32|f16")]
    pub(crate) values: Option<cpa_stream_stages::sink::Values>,
    #[arg(long, value_parser = super::parse_zstd_level, help = format!(
        "zstd level of the output [default: {DEFAULT_ZSTD_LEVEL}]"
    ))]
    pub(crate) zstd_level: Option<i32>,
    /// Seed of the posterior draws (variational models).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}
