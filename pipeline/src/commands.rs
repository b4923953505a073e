//! Every command of the command line, once: the places that treat commands alike read this list
//! instead of naming commands themselves. The CLI's parser is held to it by a test (its
//! subcommands, in order); start-up reads which commands run the model (their OpenMP wait
//! policy); the front names the commands it hands to the engine from it; the Python module runs
//! the commands that take a request and names them in its errors; the layout test reads which
//! commands have a library module (and so must not use one another).

/// What a command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandKind {
    /// As typed (`dose-response`).
    pub name: &'static str,
    /// Runs in `cpa-stream-engine`, the binary that links libtorch (the `cpa-stream` front hands
    /// it over; `bench` hands over its model, train and predict benchmarks only).
    pub in_engine: bool,
    /// Computes with the model on libtorch's threads (their OpenMP threads may need to wait
    /// passively on a busy machine).
    pub runs_model: bool,
    /// Builds a request (`--print-request` prints it; the Python package sends the same).
    pub takes_request: bool,
    /// The library module that runs it (in `cpa_stream_pipeline` or `cpa_stream_engine`);
    /// `None` for the commands of the command line alone.
    pub module: Option<&'static str>,
}

const fn kind(
    name: &'static str,
    in_engine: bool,
    runs_model: bool,
    takes_request: bool,
    module: Option<&'static str>,
) -> CommandKind {
    CommandKind { name, in_engine, runs_model, takes_request, module }
}

/// Every command, in the order `cpa-stream --help` lists them.
pub const COMMANDS: [CommandKind; 17] = [
    kind("info", true, false, false, None),
    kind("synth", false, false, true, Some("synth")),
    kind("inspect", false, false, false, None),
    kind("verify", false, false, false, None),
    kind("convert", false, false, true, Some("convert")),
    kind("import", false, false, true, Some("import")),
    kind("export", false, false, true, Some("export")),
    kind("train", true, true, true, Some("train")),
    kind("predict", true, true, true, Some("predict")),
    kind("evaluate", true, true, true, Some("evaluate")),
    kind("embeddings", true, true, true, Some("embeddings")),
    kind("dose-response", true, true, true, Some("dose_response")),
    kind("import-model", false, false, false, None),
    kind("score", false, false, true, Some("score")),
    kind("bench", true, true, false, None),
    kind("completions", false, false, false, None),
    kind("markdown-help", false, false, false, None),
];

/// The entry of [`COMMANDS`] named `name`.
pub fn command_kind(name: &str) -> Option<&'static CommandKind> {
    COMMANDS.iter().find(|k| k.name == name)
}

/// The names of the commands `select` picks, in order, joined by ", " (for messages).
pub fn names(select: impl Fn(&CommandKind) -> bool) -> String {
    COMMANDS.iter().filter(|k| select(k)).map(|k| k.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_the_model_commands_run_in_the_engine() {
        for (i, k) in COMMANDS.iter().enumerate() {
            assert!(COMMANDS[..i].iter().all(|other| other.name != k.name), "{} listed twice", k.name);
            assert!(!k.runs_model || k.in_engine, "{} runs the model outside the engine", k.name);
        }
        assert_eq!(names(|k| k.takes_request && k.runs_model), "train, predict, evaluate, embeddings, dose-response");
    }
}
