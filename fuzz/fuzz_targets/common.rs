//! What every target shares: the panic rule and a scratch directory.
//!
//! libfuzzer-sys aborts on every panic, even one that is caught. cpa-stream deliberately
//! catches the parquet crate's assertions on damaged files (`tables::guarded` turns them into
//! an error naming the file), so here a panic aborts only when it escapes cpa-stream's code to
//! the fuzz target's boundary (libfuzzer-sys aborts then, after unwinding): a panic that reaches
//! a user is a crash, a caught one is not. Panics from the parquet crate are not printed (they
//! are expected on damaged files); any other is.

pub fn init() {
    std::panic::set_hook(Box::new(|info| {
        let from_parquet = info.location().is_some_and(|l| l.file().contains("/parquet-"));
        if !from_parquet {
            eprintln!("{info}");
        }
    }));
}

/// A scratch directory for the process's inputs, made once (the file-reading targets).
#[allow(dead_code, reason = "the text-parsing targets write no files")]
pub fn scratch() -> &'static std::path::Path {
    static D: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().expect("scratch directory")).path()
}
