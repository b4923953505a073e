//! `cpa-stream bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use cpa_stream_pipeline::bench::{ReaderBenchOptions, bench_reader};
use cpa_stream_stages::store::Store;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Sequential and random-gather read throughput against a memcpy bound.
    Reader(ReaderArgs),
}

#[derive(Debug, Args)]
pub struct ReaderArgs {
    /// Store directory.
    store: PathBuf,
    /// Rows per batch.
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    /// Reader threads [default: available cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Repetitions per measurement (the best is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Rows of the random-gather pass [default: all rows of a raw store, 2,048 of a zstd store].
    #[arg(long)]
    random_rows: Option<u64>,
    /// Seed of the random order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    let BenchCommand::Reader(args) = command;
    let store = Store::open(&args.store)?;
    let mut options = ReaderBenchOptions {
        batch_size: args.batch_size,
        repeats: args.repeats,
        seed: args.seed,
        ..Default::default()
    };
    if let Some(t) = args.threads {
        options.threads = t;
    }
    let r = bench_reader(&store, &options)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{}: {} cells x {} genes, codec {}, {:.0} payload bytes/cell, {} threads, batch {}",
        r.store,
        r.cells,
        r.n_vars,
        r.codec,
        r.bytes_per_cell,
        r.threads,
        r.batch_size
    );
    outln!("{:<12} {:>14} {:>10} {:>10}", "pass", "cells/s", "GB/s", "vs memcpy");
    outln!("{:<12} {:>14.0} {:>10.2} {:>10}", "memcpy", r.memcpy_cells_per_s, r.memcpy.gb_per_s, "1.00");
    outln!(
        "{:<12} {:>14.0} {:>10.2} {:>10.2}",
        "sequential",
        r.sequential.cells_per_s,
        r.sequential.gb_per_s,
        r.sequential_vs_memcpy
    );
    outln!(
        "{:<12} {:>14.0} {:>10.2} {:>10.2}",
        "block-shuf",
        r.block_shuffled.cells_per_s,
        r.block_shuffled.gb_per_s,
        r.block_shuffled_vs_memcpy
    );
    outln!("{:<12} {:>14.0} {:>10.2} {:>10.2}", "random", r.random.cells_per_s, r.random.gb_per_s, r.random_vs_memcpy);
    outln!("(random: {} rows; block-shuf: runs of {} contiguous rows in random order)", r.random_rows, r.batch_size);
    Ok(ExitCode::SUCCESS)
}
