//! `cpa-stream bench`: the flags of every benchmark, and those that need no model (reader,
//! loader, sink).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use cpa_stream_pipeline::batcher::{
    DEFAULT_BLOCK_CELLS, DEFAULT_BUFFER_BYTES, DEFAULT_PREFETCH, DEFAULT_SHUFFLE_BLOCKS, LoaderOptions, PlanOptions,
};
use cpa_stream_pipeline::bench::{
    DEFAULT_LOADER_BATCH_SIZE, DEFAULT_READER_BATCH_SIZE, DEFAULT_REPEATS, DEFAULT_ROUNDS, DEFAULT_SINK_MIB,
    LoaderRound, ReaderBenchOptions, SinkBenchOptions, bench_loader, bench_loader_cold, bench_reader, bench_sink,
};
use cpa_stream_pipeline::model_flags::{
    MODEL_BENCH_CELLS as DEFAULT_MODEL_CELLS, MODEL_BENCH_EPOCHS as DEFAULT_MODEL_EPOCHS,
    MODEL_BENCH_GENES as DEFAULT_MODEL_GENES, PredictMode, TRAIN_BENCH_PRELOAD_MIB as DEFAULT_PRELOAD_MIB,
};
use cpa_stream_stages::model::config::{CpaConfig, DEFAULT_BATCH_SIZE};
use cpa_stream_stages::store::{Access, Store};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Sequential and random-gather read throughput against a memcpy bound.
    #[command(after_help = "Example:\n  cpa-stream bench reader atlas-zstd.store --repeats 3 --json")]
    Reader(ReaderArgs),
    /// Training throughput of the model alone, on preloaded batches of a synthetic atlas.
    #[command(after_help = "Example:\n  cpa-stream bench model --cells 5000 --genes 2000 --batch-size 128 --epochs 2")]
    Model(ModelArgs),
    /// The training pipeline without the model (encoder, batcher workers) against a
    /// memcpy bound.
    #[command(after_help = "Example:\n  cpa-stream bench loader atlas.store --dose-key dose --covariates cell_type \
                            --batch-size 4096 --epochs 3")]
    Loader(LoaderArgs),
    /// Training through the pipeline against the same model stepping on batches held in
    /// memory, in alternating passes: whether the loader ever holds the trainer up.
    #[command(after_help = "Example:\n  cpa-stream bench train atlas.store --dose-key dose --covariates cell_type")]
    Train(TrainArgs),
    /// The prediction sink alone, fed prediction batches made beforehand, per gene count and
    /// encoding thread count, against a memcpy bound.
    #[command(after_help = "Example:\n  cpa-stream bench sink --genes 5000,20000 --threads 1,2 --repeats 3")]
    Sink(SinkArgs),
    /// Prediction through the whole pipeline, per output mode (per-cell rows small or fast,
    /// aggregates), with the predictor's and the sink's rates side by side: which one limits.
    #[command(after_help = "Example:\n  cpa-stream bench predict --model run --store atlas.store --source all \
                            --target PERT01 --repeats 3")]
    Predict(PredictBenchArgs),
}

#[derive(Debug, Args)]
pub struct PredictBenchArgs {
    /// Run directory (or model directory).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Store with the source cells.
    #[arg(long)]
    pub(crate) store: PathBuf,
    /// Source cells: an expression over obs columns, or `all` [default: the control cells].
    #[arg(long)]
    pub(crate) source: Option<String>,
    /// A target (repeat for several) [default: each cell reconstructed under its own condition].
    #[arg(long)]
    pub(crate) target: Vec<String>,
    /// Output modes, comma-separated (small, fast, parts: fast into a directory of parts,
    /// aggregate; a round each).
    #[arg(long, value_delimiter = ',', default_value = "small,fast,parts,aggregate")]
    pub(crate) modes: Vec<PredictMode>,
    /// Repetitions of every mode (interleaved; medians reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) repeats: usize,
    /// Threads that encode the file's row groups [default: as predict's].
    #[arg(long, value_name = "N", value_parser = super::parse_sink_threads)]
    pub(crate) sink_threads: Option<usize>,
    /// The float type of the per-cell rows (f32 or f16), as predict's --values.
    #[arg(long, default_value = "f32")]
    pub(crate) values: cpa_stream_stages::sink::Values,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// libtorch threads [default: as predict's].
    #[arg(long, value_parser = super::parse_threads)]
    pub(crate) threads: Option<usize>,
    /// Where the files go while written [default: the system's temporary directory].
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Print the figures as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub struct SinkArgs {
    /// Genes per row, comma-separated (a round each).
    #[arg(long, value_delimiter = ',', default_value = "5000,20000")]
    pub(crate) genes: Vec<usize>,
    /// Encoding threads, comma-separated (a round each).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub(crate) threads: Vec<usize>,
    /// Page encodings, comma-separated (small, fast; a round each).
    #[arg(long, value_delimiter = ',', default_value = "small,fast")]
    pub(crate) profiles: Vec<cpa_stream_stages::sink::SinkProfile>,
    /// The float type written (f32 or f16).
    #[arg(long, default_value = "f32")]
    pub(crate) values: cpa_stream_stages::sink::Values,
    /// What each round writes, comma-separated (a round each): one file, or a directory of parts
    /// written side by side (`predict --parts`).
    #[arg(long, value_delimiter = ',', default_value = "file,parts")]
    pub(crate) outputs: Vec<cpa_stream_pipeline::bench::SinkOutput>,
    /// MiB of float32 values written per round.
    #[arg(long, default_value_t = DEFAULT_SINK_MIB)]
    pub(crate) mib: usize,
    /// Repetitions of every round (interleaved; medians reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) repeats: usize,
    /// Where the files go while written [default: the system's temporary directory].
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Print the figures as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Store directory (every cell trains).
    pub(crate) store: PathBuf,
    #[command(flatten)]
    pub(crate) labels: super::LabelArgs,
    /// Model configuration (TOML) [default: the reference's].
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Cells per batch [default: the configuration's].
    #[arg(long, value_parser = super::parse_batch_size)]
    pub(crate) batch_size: Option<usize>,
    /// fp32 or bf16 [default: the configuration's].
    #[arg(long)]
    pub(crate) precision: Option<String>,
    /// Consecutive store cells the shuffle keeps together, or `auto` [default: the configuration's].
    #[arg(long, value_parser = super::parse_run_cells)]
    pub(crate) shuffle_run_cells: Option<usize>,
    /// Rounds: an epoch through the pipeline and as many steps on the preloaded batches.
    #[arg(long, default_value_t = DEFAULT_ROUNDS)]
    pub(crate) epochs: u32,
    /// Payload the preloaded batches may hold, in MiB (an epoch's first batches, reused in turn).
    #[arg(long, default_value_t = DEFAULT_PRELOAD_MIB)]
    pub(crate) preload_mib: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// libtorch threads [default: on the CPU, the usable CPUs not busy with other processes].
    #[arg(long, value_parser = super::parse_threads)]
    pub(crate) threads: Option<usize>,
    /// Batcher worker threads [default: planned with --threads from the usable CPUs].
    #[arg(long, value_parser = super::parse_workers)]
    pub(crate) workers: Option<usize>,
    /// Batches buffered ahead of the trainer, per worker.
    #[arg(long, value_parser = super::parse_prefetch, default_value_t = DEFAULT_PREFETCH)]
    pub(crate) prefetch: usize,
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub struct LoaderArgs {
    /// Store directory.
    pub(crate) store: PathBuf,
    #[command(flatten)]
    pub(crate) labels: super::LabelArgs,
    /// Cells per batch.
    #[arg(long, value_parser = super::parse_batch_size, default_value_t = DEFAULT_LOADER_BATCH_SIZE)]
    pub(crate) batch_size: usize,
    /// Batcher worker threads [default: available cores].
    #[arg(long, value_parser = super::parse_workers)]
    pub(crate) workers: Option<usize>,
    /// Batches buffered ahead of the consumer, per worker.
    #[arg(long, value_parser = super::parse_prefetch, default_value_t = DEFAULT_PREFETCH)]
    pub(crate) prefetch: usize,
    /// Epochs to time, each right after its own measurement of the memcpy and gather bounds.
    #[arg(long, default_value_t = DEFAULT_ROUNDS)]
    pub(crate) epochs: u32,
    /// Contiguous cells shuffled as a unit.
    #[arg(long, default_value_t = DEFAULT_BLOCK_CELLS)]
    pub(crate) block_cells: u64,
    /// Blocks shuffled together before being cut into batches.
    #[arg(long, value_parser = super::parse_shuffle_blocks, default_value_t = DEFAULT_SHUFFLE_BLOCKS)]
    pub(crate) shuffle_blocks: usize,
    /// Most MiB of decoded blocks a compressed store's shuffle buffer holds.
    #[arg(long, value_parser = super::parse_buffer_mb, default_value_t = DEFAULT_BUFFER_BYTES >> 20)]
    pub(crate) shuffle_buffer_mb: u64,
    /// Consecutive cells the in-buffer shuffle keeps together (training's
    /// `shuffle_run_cells`: 1 shuffles single cells; `auto` chooses from the store's order as
    /// training does).
    #[arg(long, default_value = "auto", value_parser = super::parse_run_cells)]
    pub(crate) shuffle_run_cells: usize,
    /// Hand each batch on dense (cells x genes f32 on the host, as a loader yielding numpy arrays
    /// does) instead of as CSR.
    #[arg(long)]
    pub(crate) dense: bool,
    /// Read from disk: before each epoch drop the store's files from the page cache
    /// (`posix_fadvise(DONTNEED)`), time the disk's sequential read of them as the bound, drop
    /// them again and time the loader's epoch (no memcpy or gather bounds).
    #[arg(long)]
    pub(crate) cold: bool,
    /// With --cold: the access advice (`madvise`) given to the store's maps before each epoch.
    #[arg(long, value_enum, default_value_t = AdviceArg::Normal, requires = "cold")]
    pub(crate) advice: AdviceArg,
    #[arg(long)]
    pub(crate) json: bool,
}

/// `madvise` advice for `bench loader --cold`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum AdviceArg {
    /// The kernel's default read-around.
    Normal,
    /// No read-ahead.
    Random,
    /// Aggressive read-ahead.
    Sequential,
    /// Read the whole matrix in now.
    Willneed,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Cells of the synthetic atlas (held in memory).
    #[arg(long, default_value_t = DEFAULT_MODEL_CELLS)]
    pub(crate) cells: u64,
    /// Genes of the synthetic atlas.
    #[arg(long, default_value_t = DEFAULT_MODEL_GENES)]
    pub(crate) genes: u32,
    /// Cells per batch.
    #[arg(long, value_parser = super::parse_batch_size, default_value_t = DEFAULT_BATCH_SIZE)]
    pub(crate) batch_size: usize,
    /// Timed epochs (after one warm-up epoch).
    #[arg(long, default_value_t = DEFAULT_MODEL_EPOCHS)]
    pub(crate) epochs: u32,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// fp32 or bf16.
    #[arg(long, default_value = "fp32")]
    pub(crate) precision: String,
    /// libtorch threads [default: libtorch's choice].
    #[arg(long, value_parser = super::parse_threads)]
    pub(crate) threads: Option<usize>,
    /// Model configuration (TOML) [default: the reference architecture].
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// After the timed epochs, count the operators one more epoch's steps dispatch: kernel
    /// launches and host synchronisations per step on a device (the same counts on any device).
    #[arg(long)]
    pub(crate) count_ops: bool,
    /// After the timed epochs, profile one more epoch's steps with libtorch's profiler: each
    /// operator's host time and, on CUDA, each kernel's device time and how busy the device was.
    #[arg(long)]
    pub(crate) profile: bool,
    /// Save the profile as a Chrome trace (chrome://tracing, Perfetto) to this file (implies
    /// --profile); a file there is replaced once the trace is complete, anything else refused.
    #[arg(long, value_name = "FILE")]
    pub(crate) trace: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub struct ReaderArgs {
    /// Store directory.
    pub(crate) store: PathBuf,
    /// Rows per batch.
    #[arg(long, value_parser = super::parse_batch_size, default_value_t = DEFAULT_READER_BATCH_SIZE)]
    pub(crate) batch_size: usize,
    /// Reader threads [default: available cores].
    #[arg(long, value_parser = super::parse_threads)]
    pub(crate) threads: Option<usize>,
    /// Repetitions per measurement (the best is reported).
    #[arg(long, default_value_t = DEFAULT_REPEATS)]
    pub(crate) repeats: usize,
    /// Rows of the random-gather pass [default: all rows of a raw store, 2,048 of a zstd store].
    #[arg(long)]
    pub(crate) random_rows: Option<u64>,
    /// Seed of the random order.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

pub fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Reader(args) => reader(args),
        BenchCommand::Loader(args) => loader(args),
        BenchCommand::Sink(args) => sink(args),
        BenchCommand::Model(args) => crate::model_commands::bench_model(args),
        BenchCommand::Train(args) => crate::model_commands::bench_train(args),
        BenchCommand::Predict(args) => crate::model_commands::bench_predict(args),
    }
}

fn loader(args: LoaderArgs) -> anyhow::Result<ExitCode> {
    let encoder = args.labels.all_training(CpaConfig::default().model.max_comb_len);
    let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let loader = LoaderOptions { workers, prefetch: args.prefetch, buffer_bytes: args.shuffle_buffer_mb << 20 };
    let plan = PlanOptions {
        batch_size: args.batch_size,
        block_cells: args.block_cells,
        shuffle_blocks: args.shuffle_blocks,
        run_cells: args.shuffle_run_cells,
        ..PlanOptions::default()
    };
    if args.cold {
        let advice = match args.advice {
            AdviceArg::Normal => Access::Normal,
            AdviceArg::Random => Access::Random,
            AdviceArg::Sequential => Access::Sequential,
            AdviceArg::Willneed => Access::WillNeed,
        };
        let r = bench_loader_cold(&args.store, &encoder, &plan, loader, advice, args.epochs)?;
        if args.json {
            jsonln!(&r);
            return Ok(ExitCode::SUCCESS);
        }
        outln!(
            "{} ({}, {:.0} MB of matrix): batch {}, {} workers, advice {}, cold epochs from disk",
            r.store,
            r.codec,
            r.matrix_bytes as f64 / 1e6,
            r.batch_size,
            r.workers,
            r.advice
        );
        let disk = r.disk_mb_per_s.map_or("-".to_owned(), |d| format!("{d:.0}"));
        outln!(
            "loader {:.0} cells/s reading {disk} MB/s from disk; the disk's sequential read {:.0} MB/s (medians of {})",
            r.cells_per_s,
            r.disk_sequential_mb_per_s,
            r.rounds.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let r = bench_loader(&args.store, &encoder, &plan, loader, args.epochs, args.dense)?;
    if args.json {
        jsonln!(&r);
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{}: {} cells x {} genes, batch {}, {} workers, shuffled in runs of {} cells (store order {:.2}x as \
         clustered by label group as a random one)",
        r.store,
        r.cells,
        r.genes,
        r.batch_size,
        r.workers,
        r.run_cells,
        r.group_clustering
    );
    outln!(
        "loader {:.0} cells/s; memcpy bound {:.0} cells/s (into {} batch buffers, {:.1} MB); ratio {:.2}",
        r.cells_per_s,
        r.memcpy_cells_per_s,
        r.pool_batches,
        r.pool_bytes as f64 / 1e6,
        r.vs_memcpy
    );
    outln!(
        "read bound {:.0} cells/s (one reused buffer per thread); ratio {:.2}",
        r.read_bound_cells_per_s,
        r.vs_read_bound
    );
    if let (Some(bound), Some(ratio)) = (r.gather_bound_cells_per_s, r.vs_gather_bound) {
        outln!(
            "gather bound {bound:.0} cells/s (the plan's rows, plain memcpy into {} batch buffers); ratio {ratio:.2}",
            r.pool_batches
        );
    }
    if r.store_blocks > 0 {
        outln!(
            "zstd blocks: {} decoded over {} rounds of {} (window {} blocks, buffer peak {:.1} of {:.0} MB, {} dropped early)",
            r.blocks.decodes,
            r.rounds.len(),
            r.store_blocks,
            r.shuffle_blocks,
            r.blocks.peak_bytes as f64 / 1e6,
            r.buffer_bytes as f64 / 1e6,
            r.blocks.early_drops
        );
    }
    let ratios = |ratio: fn(&LoaderRound) -> Option<f64>| {
        r.rounds.iter().map(|round| ratio(round).map_or("-".to_string(), |x| format!("{x:.2}"))).collect::<Vec<_>>()
    };
    outln!(
        "per epoch (bounds measured just before it): {} of the memcpy bound, {} of the gather bound",
        ratios(|round| Some(round.vs_memcpy)).join(" "),
        ratios(|round| round.vs_gather_bound).join(" ")
    );
    out!("{}", r.report.render());
    Ok(ExitCode::SUCCESS)
}

fn sink(args: SinkArgs) -> anyhow::Result<ExitCode> {
    let limit = |what: &str, values: &[usize], max: usize| -> anyhow::Result<()> {
        match values.iter().find(|&&v| v == 0 || v > max) {
            Some(v) => anyhow::bail!("--{what} {v}: expected 1 to {max}"),
            None => Ok(()),
        }
    };
    limit("genes", &args.genes, 1 << 20)?;
    limit("threads", &args.threads, 256)?;
    limit("mib", &[args.mib], 1 << 16)?;
    let options = SinkBenchOptions {
        genes: args.genes,
        threads: args.threads,
        profiles: args.profiles,
        mib: args.mib,
        repeats: args.repeats,
        values: args.values,
        outputs: args.outputs,
    };
    let r = bench_sink(&options, args.dir.as_deref())?;
    if args.json {
        jsonln!(&r);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("memcpy of the same values: {:.0} MB/s (one thread); {} CPUs", r.memcpy_mb_per_s, r.cpus);
    outln!(
        "{:>7} {:>7} {:>6} {:>8} {:>9} {:>12} {:>10} {:>14} {:>10} {:>10}",
        "genes",
        "profile",
        "output",
        "threads",
        "rows",
        "rows/s",
        "MB/s",
        "MB/s/thread",
        "vs memcpy",
        "file MB"
    );
    for round in &r.rounds {
        outln!(
            "{:>7} {:>7} {:>6} {:>8} {:>9} {:>12.0} {:>10.0} {:>14.0} {:>10.3} {:>10.1}",
            round.genes,
            format!("{:?}", round.profile).to_lowercase(),
            format!("{:?}", round.output).to_lowercase(),
            round.threads,
            round.rows,
            round.rows_per_s,
            round.mb_per_s,
            round.mb_per_s_per_thread,
            round.mb_per_s / r.memcpy_mb_per_s,
            round.file_bytes as f64 / 1e6
        );
    }
    outln!("(MB/s of float32 values taken in; medians of {} interleaved repetitions)", options.repeats.max(1));
    Ok(ExitCode::SUCCESS)
}

fn reader(args: ReaderArgs) -> anyhow::Result<ExitCode> {
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
        jsonln!(&r);
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
    if r.codec != "raw" {
        // Without this line the random pass of a compressed store reads as the loader's speed.
        outln!(
            "(a random row of a {} store decodes its whole block; training and prediction decode each \
             block once per epoch: `cpa-stream bench loader`)",
            r.codec
        );
    }
    Ok(ExitCode::SUCCESS)
}
