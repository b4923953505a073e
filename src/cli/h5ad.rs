//! `cpa-stream import` and `export`: AnnData `.h5ad` files in and out.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use cpa_stream_pipeline::export::run_export;
use cpa_stream_pipeline::import::{
    DEFAULT_CHUNK_ROWS, DEFAULT_MAX_OPEN_BUCKETS, DEFAULT_MEMORY_BUDGET, ImportOptions, run_import,
};
use cpa_stream_stages::h5ad::{DEFAULT_GZIP_LEVEL, ExternalData, H5adCompression};
use cpa_stream_stages::store::Store;

use super::progress::CliProgress;
use super::synth::CodecArgs;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Input AnnData file.
    input: PathBuf,
    /// Output store directory.
    #[arg(long)]
    out: PathBuf,
    /// Import layers/NAME instead of X.
    #[arg(long)]
    layer: Option<String>,
    /// Import adata.raw (raw.X with the genes of raw.var) instead of X: where older files keep
    /// the counts when X holds scaled or log-normalised values.
    #[arg(long, conflicts_with = "layer")]
    use_raw: bool,
    /// Keep only the genes listed in FILE (one var index entry per line), in that order.
    #[arg(long, value_name = "FILE")]
    genes: Option<PathBuf>,
    /// The uns entry with the DEG lists (CPA's dict of group -> ranked genes, or scanpy's
    /// rank_genes_groups) [default: the first such entry].
    #[arg(long, value_name = "KEY")]
    deg_uns_key: Option<String>,
    /// Rows read per chunk.
    #[arg(long, default_value_t = DEFAULT_CHUNK_ROWS)]
    chunk_rows: usize,
    /// MiB of one bucket file of the CSC -> CSR transposition (peak memory about 2.5x this).
    #[arg(long, default_value_t = DEFAULT_MEMORY_BUDGET >> 20)]
    csc_budget_mib: usize,
    /// Bucket files open at once during the CSC transposition (more buckets: more passes).
    #[arg(long, default_value_t = DEFAULT_MAX_OPEN_BUCKETS)]
    csc_max_open_buckets: usize,
    /// Read data that the file keeps in other files (HDF5 external storage, external links,
    /// virtual datasets), for a trusted collection: only regular files in the input's own folder
    /// are read. Without it such a file is refused, naming the object: an imported file is
    /// untrusted, and reading it reads nothing else.
    #[arg(long)]
    allow_external: bool,
    #[command(flatten)]
    codec: CodecArgs,
    /// Replace an existing store at --out.
    #[arg(long)]
    overwrite: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Dataset compression of an exported file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    None,
    Gzip,
    Lzf,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Store directory.
    store: PathBuf,
    /// Output AnnData file.
    #[arg(long)]
    out: PathBuf,
    /// Compression of the written datasets.
    #[arg(long, value_enum, default_value_t = CompressionArg::None)]
    compression: CompressionArg,
    /// gzip level (with --compression gzip).
    #[arg(long, default_value_t = DEFAULT_GZIP_LEVEL)]
    gzip_level: u8,
    /// Replace an existing file at --out.
    #[arg(long)]
    overwrite: bool,
    /// Print the stage report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let genes = match &args.genes {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("--genes {}", path.display()))?;
            let list: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
            anyhow::ensure!(!list.is_empty(), "--genes {}: no gene names", path.display());
            Some(list)
        }
    };
    let options = ImportOptions {
        layer: args.layer.clone(),
        use_raw: args.use_raw,
        genes,
        chunk_rows: args.chunk_rows,
        memory_budget: args.csc_budget_mib.max(1) << 20,
        max_open_buckets: args.csc_max_open_buckets,
        codec: args.codec.codec()?,
        overwrite: args.overwrite,
        deg_uns_key: args.deg_uns_key.clone(),
        external: if args.allow_external { ExternalData::SameDirectory } else { ExternalData::Refuse },
    };
    let progress = CliProgress::new();
    let summary = run_import(&args.input, &args.out, &options, &progress)
        .with_context(|| format!("import {} into {}", args.input.display(), args.out.display()))?;
    if args.json {
        jsonln!(&summary);
        return Ok(ExitCode::SUCCESS);
    }
    let m = &summary.manifest;
    outln!(
        "wrote {}: {} cells x {} genes, nnz {}, from a {} matrix; {:.0} cells/s, {:.1} MB/s of input",
        args.out.display(),
        m.n_obs,
        m.n_vars,
        m.nnz,
        summary.layout,
        summary.cells_per_s,
        summary.input_mb_per_s
    );
    if let Some((key, rows)) = &summary.degs {
        outln!("DEG lists from uns/{key}: {rows} rows in degs.parquet");
    }
    super::print_report(&summary.report)?;
    Ok(ExitCode::SUCCESS)
}

pub fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open(&args.store)?;
    let compression = match args.compression {
        CompressionArg::None => H5adCompression::None,
        CompressionArg::Lzf => H5adCompression::Lzf,
        CompressionArg::Gzip => {
            anyhow::ensure!(args.gzip_level <= 9, "--gzip-level must be 0-9");
            H5adCompression::Gzip(args.gzip_level)
        }
    };
    let progress = CliProgress::new();
    let report = run_export(&store, &args.out, compression, args.overwrite, &progress)
        .with_context(|| format!("export {} to {}", args.store.display(), args.out.display()))?;
    if args.json {
        jsonln!(&report);
        return Ok(ExitCode::SUCCESS);
    }
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    outln!(
        "wrote {}: {} cells x {} genes, {:.1} MB",
        args.out.display(),
        store.n_obs(),
        store.n_vars(),
        bytes as f64 / 1e6
    );
    super::print_report(&report)?;
    Ok(ExitCode::SUCCESS)
}
