//! The `cpa-stream` command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    openmp_waits_passively();
    let args = cli::Args::parse();
    cpa_stream_stages::provenance::set(
        cli::VERSION_LINE,
        &cpa_stream_stages::provenance::shell_words(std::env::args()),
    );
    if let Err(err) = cli::init_logging(&args) {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "error: {err}");
        // A usage error, as clap reports a bad flag.
        return ExitCode::from(2);
    }
    cpa_stream_stages::store::explain_sigbus();
    match cli::run(args) {
        Ok(code) => code,
        // A closed stdout (`cpa-stream inspect S | head`) ends the output, not the program's success.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            // Not `eprintln!`: it panics when stderr is closed (`... 2>&1 | head -1`).
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "error: {}", message(&err));
            ExitCode::FAILURE
        }
    }
}

/// Commands that run the model on the CPU, whose libtorch threads should wait passively.
const MODEL_COMMANDS: [&str; 4] = ["train", "predict", "evaluate", "bench"];
/// Set in the re-executed process, so that it does not re-execute again.
const REEXEC_MARK: &str = "CPA_STREAM_OPENMP_SET";

/// libtorch's OpenMP runtime (libgomp) lets an idle worker thread spin for about 300,000 rounds
/// before it sleeps, and reads that setting once, when it is loaded, before `main` runs. On cores
/// shared with other processes the spinning takes the time they and the batcher need, and the
/// whole step waits for the thread that lost its core. So the model commands, unless the user set
/// `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`, execute themselves again once with a short spin
/// (`GOMP_SPINCOUNT`, [`SPIN_COUNT`]), which libgomp then reads. If that fails the run goes on
/// as it is.
fn openmp_waits_passively() {
    use std::os::unix::process::CommandExt as _;
    let env = |name: &str| std::env::var_os(name).is_some();
    if env("OMP_WAIT_POLICY") || env("GOMP_SPINCOUNT") || env(REEXEC_MARK) {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next();
    let rest: Vec<std::ffi::OsString> = args.collect();
    let command = rest.iter().find(|a| !a.to_string_lossy().starts_with('-'));
    if !command.is_some_and(|c| MODEL_COMMANDS.iter().any(|m| c == *m)) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut again = std::process::Command::new(exe);
    if let Some(arg0) = arg0 {
        again.arg0(arg0);
    }
    // Only returns on failure.
    let _ = again.args(rest).env("GOMP_SPINCOUNT", SPIN_COUNT).env(REEXEC_MARK, "1").exec();
}

/// The spin count the model commands run with (see [`openmp_waits_passively`]).
const SPIN_COUNT: &str = "10000";

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().filter_map(|e| e.downcast_ref::<std::io::Error>()).any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The error and its causes, each cause only once: library errors already carry their source's
/// text, which anyhow's `{:#}` would repeat.
fn message(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}
