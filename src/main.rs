//! The `cpa-stream` command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
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
