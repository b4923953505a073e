//! `cpa-stream import` and `export`: AnnData `.h5ad` files (and zarr stores, cell tables) in, `.h5ad` out.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use cpa_stream_pipeline::export::{self, ExportCompression, ExportRequest};
use cpa_stream_pipeline::import::{
    self, DEFAULT_CHUNK_ROWS, DEFAULT_MAX_OPEN_BUCKETS, DEFAULT_MEMORY_BUDGET, DEFAULT_SOURCE_KEY, ImportRequest,
    JoinName,
};
use cpa_stream_pipeline::request::Naming;
use cpa_stream_stages::h5ad::DEFAULT_GZIP_LEVEL;

use super::synth::CodecArgs;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Input AnnData files: .h5ad files and zarr stores (directories AnnData.write_zarr wrote), or
    /// Parquet cell tables (*.parquet, with --var-table) or stores, in order: many become one
    /// store (genes aligned, obs columns merged, like anndata.concat). A quoted pattern
    /// ("plates/*.h5ad") stands for the files it matches, sorted.
    #[arg(required_unless_present = "inputs_from")]
    inputs: Vec<PathBuf>,
    /// Add the inputs' cells to STORE (its genes kept: every input must have them) as a new
    /// version of it, which replaces it once complete: a kill leaves the store as it was, and
    /// readers that have it open go on reading it.
    #[arg(long, value_name = "STORE", conflicts_with = "out")]
    append: Option<PathBuf>,
    /// Also import the files listed in FILE, one per line (relative to FILE's folder).
    #[arg(long, value_name = "FILE")]
    inputs_from: Option<PathBuf>,
    /// Output store directory.
    #[arg(long, required_unless_present = "append")]
    out: Option<PathBuf>,
    /// Import layers/NAME instead of X.
    #[arg(long)]
    layer: Option<String>,
    /// Import adata.raw (raw.X with the genes of raw.var) instead of X: where older files keep
    /// the counts when X holds scaled or log-normalised values.
    #[arg(long, conflicts_with = "layer")]
    use_raw: bool,
    /// Which genes the store keeps: `inner` (of many files, those all have; the default),
    /// `outer` (those any has, zero where a file lacks one) or the genes listed in FILE (one per
    /// line, in that order; every file must have them).
    #[arg(long, value_name = "inner|outer|FILE")]
    genes: Option<PathBuf>,
    /// The var column that identifies genes across files (gene_ids, for Ensembl ids), instead
    /// of the var index; the store's gene ids are its values.
    #[arg(long, value_name = "COLUMN")]
    gene_key: Option<String>,
    #[arg(long, value_name = "COLUMN", help = format!(
        "The obs column naming each cell's file (categorical) [default: {DEFAULT_SOURCE_KEY} of many files, none          of one]"
    ))]
    source_key: Option<String>,
    /// The label of each file in --source-key and --make-unique, comma-separated, in order
    /// [default: the file names without .h5ad or .zarr].
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Append SEP and the file's label to every cell id, so that ids repeated across files
    /// stay apart (anndata's index_unique). Without it, an id in two files is an error.
    #[arg(long, value_name = "SEP", num_args = 0..=1, default_missing_value = "-")]
    make_unique: Option<String>,
    /// Write the cells in a random order drawn from SEED (a uniform shuffle of every cell, out
    /// of core: files sorted by plate or condition otherwise train on runs of one kind).
    #[arg(long, value_name = "SEED")]
    shuffle: Option<u64>,
    /// The gene vocabulary of Parquet cell tables (inputs *.parquet: a row per cell with lists of
    /// gene ids and counts, as Hugging Face's Tahoe-100M): a Parquet file with a row per gene;
    /// --gene-key names its column of gene names [default: gene_id, gene_symbol, gene_name or
    /// ensembl_id].
    #[arg(long, value_name = "FILE", help_heading = "Parquet cell tables")]
    var_table: Option<PathBuf>,
    /// The vocabulary's column that the gene lists hold [default: token_id, else gene names].
    #[arg(long, value_name = "COLUMN", help_heading = "Parquet cell tables")]
    var_id: Option<String>,
    /// The cell tables' list column of gene ids [default: genes].
    #[arg(long, value_name = "COLUMN", help_heading = "Parquet cell tables")]
    genes_column: Option<String>,
    /// The cell tables' list column of counts [default: expressions].
    #[arg(long, value_name = "COLUMN", help_heading = "Parquet cell tables")]
    counts_column: Option<String>,
    /// The cell tables' column of cell ids [default: cell_id, else the row number].
    #[arg(long, value_name = "COLUMN", help_heading = "Parquet cell tables")]
    cell_id_column: Option<String>,
    /// Leave out entries with this count: markers, not genes (Tahoe-100M opens each cell with
    /// one whose count is -2).
    #[arg(long, value_name = "COUNT", allow_negative_numbers = true, help_heading = "Parquet cell tables")]
    marker_value: Option<f32>,
    /// Write a store of no cells when the inputs hold none (without it, an error).
    #[arg(long)]
    allow_empty: bool,
    /// The uns entry with the DEG lists (CPA's dict of group -> ranked genes, or scanpy's
    /// rank_genes_groups) [default: the first such entry].
    #[arg(long, value_name = "KEY")]
    deg_uns_key: Option<String>,
    #[arg(long, help = format!("Rows read per chunk [default: {DEFAULT_CHUNK_ROWS}]"))]
    chunk_rows: Option<usize>,
    #[arg(long, help = format!(
        "MiB of one bucket file of the CSC -> CSR transposition (peak memory about 2.5x this) [default: {}]",
        DEFAULT_MEMORY_BUDGET >> 20
    ))]
    csc_budget_mib: Option<usize>,
    #[arg(long, help = format!(
        "Bucket files open at once during the CSC transposition (more buckets: more passes) [default: \
         {DEFAULT_MAX_OPEN_BUCKETS}]"
    ))]
    csc_max_open_buckets: Option<usize>,
    /// Read data that the file keeps in other files (HDF5 external storage, external links,
    /// virtual datasets), for a trusted collection: only regular files in the input's own folder
    /// are read. Without it such a file is refused, naming the object: an imported file is
    /// untrusted, and reading it reads nothing else.
    #[arg(long)]
    allow_external: bool,
    /// Read a zarr store whose sparse matrix lacks chunks, their entries as the array's fill
    /// value. Without it such a store is refused: zarr leaves out only chunks of the fill value,
    /// which a matrix's indices and values hardly ever are, so a missing one is a damaged or
    /// partial copy. (Missing chunks of other arrays are reported, not refused.)
    #[arg(long)]
    allow_missing_chunks: bool,
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
    #[arg(long, help = format!("gzip level (with --compression gzip) [default: {DEFAULT_GZIP_LEVEL}]"))]
    gzip_level: Option<u8>,
    /// Replace an existing file at --out.
    #[arg(long)]
    overwrite: bool,
    /// Only the cells this expression over obs columns selects, in `predict --source`'s
    /// language: `"split == ood or condition == control"` writes a held-out split's cells and
    /// the controls, the reference `score` takes [default: every cell].
    #[arg(long, value_name = "EXPR")]
    cells: Option<String>,
    /// Print the stage report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl ImportArgs {
    /// The request these flags make.
    fn request(&self) -> ImportRequest {
        let join = match self.genes.as_ref().and_then(|g| g.to_str()) {
            Some("inner") => Some(JoinName::Inner),
            Some("outer") => Some(JoinName::Outer),
            _ => None,
        };
        ImportRequest {
            inputs: self.inputs.clone(),
            inputs_from: self.inputs_from.clone(),
            out: self.out.clone().unwrap_or_default(),
            append: self.append.clone(),
            layer: self.layer.clone(),
            use_raw: self.use_raw,
            genes: None,
            genes_file: if join.is_some() { None } else { self.genes.clone() },
            join,
            gene_key: self.gene_key.clone(),
            source_key: self.source_key.clone(),
            labels: self.labels.clone(),
            make_unique: self.make_unique.clone(),
            shuffle: self.shuffle,
            var_table: self.var_table.clone(),
            var_id: self.var_id.clone(),
            genes_column: self.genes_column.clone(),
            counts_column: self.counts_column.clone(),
            cell_id_column: self.cell_id_column.clone(),
            marker_value: self.marker_value,
            allow_empty: self.allow_empty,
            deg_uns_key: self.deg_uns_key.clone(),
            chunk_rows: self.chunk_rows,
            csc_budget_mib: self.csc_budget_mib,
            csc_max_open_buckets: self.csc_max_open_buckets,
            allow_external: self.allow_external,
            allow_missing_chunks: self.allow_missing_chunks,
            codec: self.codec.codec.into(),
            zstd_level: self.codec.zstd_level,
            block_rows: self.codec.block_rows,
            overwrite: self.overwrite,
            naming: Naming::Flags,
        }
    }
}

pub fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let out = args.out.clone().or_else(|| args.append.clone()).unwrap_or_default();
    let what = || match (args.inputs.as_slice(), &args.append) {
        (_, Some(store)) => format!("append to {}", store.display()),
        ([one], None) => format!("import {} into {}", one.display(), out.display()),
        _ => format!("import into {}", out.display()),
    };
    let Some(summary) = super::run_request(&args.request(), ImportRequest::options, import::run, args.json, what)?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    let m = &summary.manifest;
    outln!(
        "wrote {}: {} cells x {} genes, nnz {}, from {}; {:.0} cells/s, {:.1} MB/s of input",
        out.display(),
        m.n_obs,
        m.n_vars,
        m.nnz,
        match summary.layout.as_str() {
            "cell table" => "cell tables".to_owned(),
            layout => format!("a {layout} matrix"),
        },
        summary.cells_per_s,
        summary.input_mb_per_s
    );
    for input in summary.inputs.iter().filter(|i| !i.skipped_columns.is_empty()) {
        outln!("  {}: columns left out of obs: {}", input.path.display(), input.skipped_columns.join(", "));
    }
    for input in &summary.inputs {
        for line in &input.missing_chunks {
            tracing::warn!("{}: {line}", input.path.display());
        }
    }
    if summary.inputs.len() > 1 {
        for input in &summary.inputs {
            outln!(
                "  {}: {} cells, {} of its {} genes kept ({})",
                input.path.display(),
                input.cells,
                input.genes_kept,
                input.genes,
                input.layout
            );
        }
    }
    if let Some(a) = &summary.append {
        let obs = match a.obs_rewritten {
            true => format!("the obs table written again ({:.1} MB: new columns)", a.obs_bytes as f64 / 1e6),
            false => format!("the obs table {:.1} MB longer", a.obs_bytes as f64 / 1e6),
        };
        let copied = match a.copied_bytes {
            0 => String::new(),
            b => format!(
                "; {:.1} MB copied (files another copy of the store shares, or the file system would not link)",
                b as f64 / 1e6
            ),
        };
        outln!(
            "version {}: {} cells added to {}; the matrix files {:.1} MB longer, {obs}{copied}",
            m.version_number(),
            m.n_obs - a.base_cells,
            a.base_cells,
            a.matrix_bytes as f64 / 1e6
        );
    }
    if let Some(seed) = summary.shuffle_seed {
        outln!("cells written in a random order (seed {seed})");
    }
    if let Some((key, rows)) = &summary.degs {
        outln!("DEG lists from uns/{key}: {rows} rows in degs.parquet");
    }
    super::print_report(&summary.report)?;
    Ok(ExitCode::SUCCESS)
}

pub fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let request = ExportRequest {
        store: args.store.clone(),
        out: args.out.clone(),
        compression: match args.compression {
            CompressionArg::None => ExportCompression::None,
            CompressionArg::Gzip => ExportCompression::Gzip,
            CompressionArg::Lzf => ExportCompression::Lzf,
        },
        gzip_level: args.gzip_level,
        overwrite: args.overwrite,
        cells: args.cells.clone(),
        naming: Naming::Flags,
    };
    let what = || format!("export {} to {}", args.store.display(), args.out.display());
    let Some(report) = super::run_request(&request, ExportRequest::options, export::run, args.json, what)? else {
        return Ok(ExitCode::SUCCESS);
    };
    outln!(
        "wrote {}: {} cells x {} genes, {:.1} MB",
        args.out.display(),
        report.cells,
        report.genes,
        report.bytes as f64 / 1e6
    );
    super::print_report(&report.report)?;
    Ok(ExitCode::SUCCESS)
}
