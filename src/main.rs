//! `cpa-stream`, the front of the command line: every command that needs no model runs here,
//! without libtorch; the model commands are handed to `cpa-stream-engine` (see `front.rs`).

#[macro_use]
mod cli;
#[path = "front.rs"]
mod model_commands;

use std::process::ExitCode;

fn main() -> ExitCode {
    cpa_stream_pipeline::allocator::reuse_freed_buffers();
    cli::main()
}
