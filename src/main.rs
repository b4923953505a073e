//! The `cpa-stream` command line. This binary parses the arguments (so `--help`, `--version` and
//! usage errors need no model), runs the commands that need no model itself, and replaces itself
//! with `cpa-stream-engine` for those that do (same arguments, same process). It is linked
//! without libtorch's CUDA libraries, most of a model binary's start (see `cli::exec_engine`).

use std::process::ExitCode;

use clap::Parser;
use cpa_stream::cli;

// The front still loads part of libtorch (see `cli::exec_engine`): the same guard as the engine's.
#[used]
#[unsafe(link_section = ".preinit_array")]
static LEAVE_A_DEEP_WORKING_DIRECTORY: extern "C" fn() = cli::leave_a_deep_working_directory;

fn main() -> ExitCode {
    cli::return_to_a_deep_working_directory();
    let args = cli::Args::parse();
    if !cli::runs_without_the_model(&args) {
        return cli::exec_engine();
    }
    cli::reuse_freed_buffers();
    cli::main_with(args, cli::run_front)
}
