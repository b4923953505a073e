//! `cpa-stream-engine`: the commands of the `cpa-stream` command line that run the model (and,
//! when called directly, every other), linked with libtorch. `cpa-stream` runs the others itself
//! and replaces itself with this binary for these (`cpa_stream::cli::exec_engine`).

use std::process::ExitCode;

use clap::Parser;
use cpa_stream::cli;
// The CPUs busy elsewhere, as measured at start (see `openmp_waits_passively`).
use cpa_stream_pipeline::threads::BUSY_CPUS_VAR as BUSY_VAR;

fn main() -> ExitCode {
    cli::return_to_a_deep_working_directory();
    openmp_waits_passively();
    cli::reuse_freed_buffers();
    cli::main_with(cli::Args::parse(), cli::run)
}

// libtorch's MKL cannot start in a working directory deeper than 4,096 bytes: leave it for the
// libraries' initialisers (see `cli::leave_a_deep_working_directory`).
#[used]
#[unsafe(link_section = ".preinit_array")]
static LEAVE_A_DEEP_WORKING_DIRECTORY: extern "C" fn() = cli::leave_a_deep_working_directory;

/// Commands that run the model, whose OpenMP threads may need to wait passively.
const MODEL_COMMANDS: [&str; 4] = ["train", "predict", "evaluate", "bench"];

/// libtorch's OpenMP runtime (libgomp) reads its wait policy once, when it is loaded, before
/// `main` runs. By default an idle OpenMP thread spins for about 300,000 rounds before it sleeps:
/// the fastest on idle cores, but on cores shared with other processes the spinning takes the
/// time the step's other threads need (a quarter of the idle throughput, measured; see
/// [`cpa_stream_pipeline::threads`]). So a model command first watches the CPUs for
/// [`threads::SAMPLE`](cpa_stream_pipeline::threads::SAMPLE); when at least
/// [`threads::BUSY`](cpa_stream_pipeline::threads::BUSY) CPUs are busy elsewhere it executes
/// itself again with `OMP_WAIT_POLICY=PASSIVE`, which libgomp then reads, and passes the
/// measurement on in [`BUSY_VAR`] so that the thread plan need not watch again. Nothing happens
/// when the user set `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`, or on a GPU run (`--device cuda...`),
/// and if the re-execution fails the run goes on as it is.
fn openmp_waits_passively() {
    use std::os::unix::process::CommandExt as _;

    use cpa_stream_pipeline::threads;
    let set = |name: &str| std::env::var_os(name).is_some();
    if set("OMP_WAIT_POLICY") || set("GOMP_SPINCOUNT") || set(BUSY_VAR) {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next();
    let rest: Vec<std::ffi::OsString> = args.collect();
    let command = rest.iter().find(|a| !a.to_string_lossy().starts_with('-'));
    let on_gpu = rest.iter().any(|a| a.to_string_lossy().contains("cuda"));
    if on_gpu || !command.is_some_and(|c| MODEL_COMMANDS.iter().any(|m| c == *m)) {
        return;
    }
    let busy = threads::busy_elsewhere(threads::SAMPLE);
    // SAFETY: nothing else runs yet (main's first statement): no other thread reads the
    // environment while it changes.
    unsafe { std::env::set_var(BUSY_VAR, format!("{busy:.2}")) };
    if busy < threads::BUSY {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut again = std::process::Command::new(exe);
    if let Some(arg0) = arg0 {
        again.arg0(arg0);
    }
    // Only returns on failure.
    let _ = again.args(rest).env("OMP_WAIT_POLICY", "PASSIVE").exec();
}
