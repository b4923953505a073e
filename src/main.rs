//! The `cpa-stream` command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;
// The CPUs busy elsewhere, as measured at start (see `openmp_waits_passively`).
use cpa_stream_pipeline::threads::BUSY_CPUS_VAR as BUSY_VAR;

fn main() -> ExitCode {
    return_to_a_deep_working_directory();
    openmp_waits_passively();
    reuse_freed_buffers();
    let args = cli::Args::parse();
    // Arguments are OS strings (a path may hold any byte but NUL); provenance records them
    // lossily, with U+FFFD where a byte is not UTF-8.
    cpa_stream_stages::provenance::set(
        cli::VERSION_LINE,
        &cpa_stream_stages::provenance::shell_words(std::env::args_os().map(|a| a.to_string_lossy().into_owned())),
    );
    if let Err(err) = cli::init_logging(&args) {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "error: {err}");
        // A usage error, as clap reports a bad flag.
        return ExitCode::from(2);
    }
    cpa_stream_stages::store::explain_sigbus();
    // A damaged .h5ad can make the HDF5 library loop forever: end with an error instead.
    cpa_stream_stages::h5ad::watchdog::install(None);
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

/// The working directory this process started in, when it was too deep for the libraries'
/// initialisers (a descriptor on it; -1: it was not).
static DEEP_WORKING_DIRECTORY: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Runs before any shared library is initialised (the executable's `.preinit_array`). libtorch's
/// MKL asks for the working directory while it initialises and ends the process (exit 2, "Cannot
/// load libtorch_cpu.so") when its path is longer than 4,096 bytes. In such a directory this
/// keeps a descriptor on it and moves to `/` for the libraries' start; `main` moves back at once.
/// Only system calls here: nothing else of the process is initialised yet.
extern "C" fn leave_a_deep_working_directory() {
    let mut buffer = [0u8; 4096];
    // SAFETY: the raw getcwd system call writes at most `len` bytes into the live buffer.
    let rc = unsafe { libc::syscall(libc::SYS_getcwd, buffer.as_mut_ptr(), buffer.len()) };
    // SAFETY: reading errno of this thread right after the call.
    let errno = unsafe { *libc::__errno_location() };
    if rc >= 0 || !matches!(errno, libc::ENAMETOOLONG | libc::ERANGE) {
        return;
    }
    // SAFETY: open(2) of "." and chdir(2) to "/" with NUL-terminated literals.
    unsafe {
        let fd = libc::open(c".".as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC);
        if fd >= 0 && libc::chdir(c"/".as_ptr()) == 0 {
            DEEP_WORKING_DIRECTORY.store(fd, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[used]
#[unsafe(link_section = ".preinit_array")]
static LEAVE_A_DEEP_WORKING_DIRECTORY: extern "C" fn() = leave_a_deep_working_directory;

/// Moves back to the working directory [`leave_a_deep_working_directory`] left, so that relative
/// paths mean what the user meant.
fn return_to_a_deep_working_directory() {
    let fd = DEEP_WORKING_DIRECTORY.swap(-1, std::sync::atomic::Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: fchdir(2) and close(2) on the descriptor opened before the libraries started.
        unsafe {
            libc::fchdir(fd);
            libc::close(fd);
        }
    }
}

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
/// glibc's allocator by default serves every allocation above a threshold that starts at 128 KiB
/// from a fresh `mmap` and gives freed heap back to the system past 128 KiB: the sink's pages and
/// column chunks (megabytes, made and dropped per row group) then cost a page fault and a zeroed
/// page per 4 KiB every time. Measured with `cpa-stream bench sink --genes 5000 --threads 1
/// --profiles fast --mib 256` (3 interleaved runs on 2026-11-25, the fidelity harness running
/// beside): 413-451 MB/s as glibc sets it, 517-544 MB/s with allocations below 32 MiB kept in the
/// heap and 256 MiB of freed heap kept for reuse, the same peak RSS (859 MiB). Left as it is when
/// the user tunes the allocator (`GLIBC_TUNABLES`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`).
fn reuse_freed_buffers() {
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    const TRIM_THRESHOLD: libc::c_int = 256 << 20;
    let tuned = ["GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
    if tuned {
        return;
    }
    // SAFETY: mallopt only changes the allocator's thresholds; called before any other thread
    // exists. A value it refuses leaves the default (its return value is not needed).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

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
