//! `cpa-stream inspect`, `verify` and `convert`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use cpa_stream_pipeline::convert::{self, ConvertRequest, DEFAULT_SHUFFLE_BUCKET_BYTES};
use cpa_stream_pipeline::request::Naming;
use cpa_stream_stages::store::{Store, summarize_obs};
use serde::Serialize;

use super::synth::CodecArgs;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Store directory.
    store: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Store directory.
    store: PathBuf,
    /// Print what was checked as JSON (files, bytes, rows, entries, versions, trailing bytes).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Input store directory.
    store: PathBuf,
    /// Output store directory.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    codec: CodecArgs,
    /// Write the cells in a random order drawn from this seed: a store sorted by condition can
    /// then be trained with runs of neighbouring cells (`--shuffle-run-cells`) without each run
    /// being one condition. Two sequential passes, with scratch files next to --out as large as
    /// the matrix.
    #[arg(long, value_name = "SEED")]
    shuffle: Option<u64>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), help = format!(
        "Memory for one bucket of the shuffle, in MiB (the input is cut into buckets of about this size) \
         [default: {}]", DEFAULT_SHUFFLE_BUCKET_BYTES >> 20
    ))]
    shuffle_memory_mib: Option<u64>,
    /// Replace an existing store at --out.
    #[arg(long)]
    overwrite: bool,
    /// Print the manifest and stage report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Inspection<'a> {
    path: String,
    n_obs: u64,
    n_vars: u64,
    nnz: u64,
    density: f64,
    codec: &'a cpa_stream_schemas::Codec,
    total_bytes: u64,
    files: &'a std::collections::BTreeMap<String, cpa_stream_schemas::FileEntry>,
    obs_columns: Vec<cpa_stream_stages::store::ColumnSummary>,
    created_by: &'a str,
    source: Option<&'a str>,
    /// This version's number and the versions before it (appends), oldest first.
    version: usize,
    history: &'a [cpa_stream_schemas::Version],
}

/// Categories listed in full by the text output; longer lists are cut with a count.
const MAX_LISTED_CATEGORIES: usize = 20;

pub fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open(&args.store)?;
    let m = store.manifest();
    let obs_columns = summarize_obs(&store)?;
    let cells = (m.n_obs.max(1) as f64) * (m.n_vars.max(1) as f64);
    let report = Inspection {
        path: args.store.display().to_string(),
        n_obs: m.n_obs,
        n_vars: m.n_vars,
        nnz: m.nnz,
        density: m.nnz as f64 / cells,
        codec: &m.codec,
        total_bytes: m.total_bytes(),
        files: &m.files,
        obs_columns,
        created_by: &m.created_by,
        source: m.source.as_deref(),
        version: m.version_number(),
        history: &m.history,
    };
    if args.json {
        jsonln!(&report);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("store     {}", report.path);
    outln!("shape     {} cells x {} genes", report.n_obs, report.n_vars);
    outln!("nnz       {} (density {:.4})", report.nnz, report.density);
    match m.codec {
        cpa_stream_schemas::Codec::Raw => outln!("codec     raw"),
        cpa_stream_schemas::Codec::Zstd { level, block_rows, planes, block_checksum } => {
            let planes = match planes {
                cpa_stream_schemas::Planes::Wide => "32-bit planes",
                cpa_stream_schemas::Planes::Narrow => "16-bit planes where they fit",
            };
            let checksum = match block_checksum {
                cpa_stream_schemas::BlockChecksum::Content => "zstd content checksums",
                cpa_stream_schemas::BlockChecksum::Xxh3_64 => "an XXH3-64 per block",
            };
            outln!("codec     zstd (level {level}, {block_rows} rows per block, {planes}, {checksum})")
        }
    }
    outln!("size      {:.1} MB", report.total_bytes as f64 / 1e6);
    for (name, f) in report.files {
        outln!("  {name:<18} {:>14} bytes  xxh3 {}", f.bytes, f.checksum);
    }
    if !m.history.is_empty() {
        outln!("versions  {} (grown by appends)", report.version);
        let sources = m.history.iter().map(|v| (v.n_obs, v.source.as_deref())).chain([(m.n_obs, m.source.as_deref())]);
        let mut before = 0;
        for (k, (cells, source)) in sources.enumerate() {
            outln!("  {:<3} {:>12} cells (+{})  {}", k + 1, cells, cells - before, source.unwrap_or(""));
            before = cells;
        }
    }
    outln!("obs columns");
    for c in &report.obs_columns {
        let nulls = if c.nulls > 0 { format!(", {} nulls", c.nulls) } else { String::new() };
        match (&c.categories, c.range) {
            (Some(cats), _) => {
                outln!("  {} (categorical, {} categories{nulls})", c.name, cats.len());
                for (name, count) in cats.iter().take(MAX_LISTED_CATEGORIES) {
                    outln!("    {name:<30} {count}");
                }
                if cats.len() > MAX_LISTED_CATEGORIES {
                    outln!("    ... {} more (see --json)", cats.len() - MAX_LISTED_CATEGORIES);
                }
            }
            (None, Some((lo, hi))) => outln!("  {} ({}, range {lo} .. {hi}{nulls})", c.name, c.dtype),
            (None, None) => outln!("  {} ({}{nulls})", c.name, c.dtype),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let result = Store::open(&args.store).and_then(|s| s.verify());
    match result {
        Ok(r) if args.json => {
            jsonln!(&r);
            Ok(ExitCode::SUCCESS)
        }
        Ok(r) => {
            let versions = match r.versions {
                1 => String::new(),
                n => format!(" in {n} versions"),
            };
            outln!(
                "ok: {} files{versions}, {:.1} MB checksummed, {} rows and {} entries checked",
                r.files,
                r.bytes as f64 / 1e6,
                r.rows,
                r.nnz
            );
            if r.trailing_bytes > 0 {
                outln!(
                    "note: the matrix files hold {} bytes after this version's, left by an append that did not \
                     finish; nothing reads them and the next append removes them",
                    r.trailing_bytes
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            outln!("FAILED: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

pub fn convert(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let request = ConvertRequest {
        store: args.store.clone(),
        out: args.out.clone(),
        codec: args.codec.codec.into(),
        zstd_level: args.codec.zstd_level,
        block_rows: args.codec.block_rows,
        shuffle: args.shuffle,
        shuffle_memory_mib: args.shuffle_memory_mib,
        overwrite: args.overwrite,
        naming: Naming::Flags,
    };
    let what = || format!("convert {} into {}", args.store.display(), args.out.display());
    let Some(converted) = super::run_request(&request, ConvertRequest::options, convert::run, args.json, what)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let (manifest, report) = (&converted.manifest, &converted.report);
    outln!(
        "wrote {}: codec {}, {:.1} MB (input {:.1} MB, ratio {:.2})",
        args.out.display(),
        manifest.codec.name(),
        manifest.total_bytes() as f64 / 1e6,
        converted.input_bytes as f64 / 1e6,
        converted.input_bytes as f64 / manifest.total_bytes().max(1) as f64
    );
    super::print_report(report)?;
    Ok(ExitCode::SUCCESS)
}
