//! `cpa-stream-engine`: the whole command line with libtorch loaded. The `cpa-stream` front hands
//! it the model commands; run directly, it runs any command as the front would.

#[macro_use]
mod cli;
mod model_commands;

use std::process::ExitCode;

fn main() -> ExitCode {
    return_to_a_deep_working_directory();
    openmp_waits_passively();
    cpa_stream_pipeline::allocator::reuse_freed_buffers();
    cli::main()
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

/// Started directly (not by the front, which measured already), a model command watches the
/// CPUs and, when they are busy, executes itself again with `OMP_WAIT_POLICY=PASSIVE`, which
/// libgomp reads as it loads ([`cli::start::openmp_environment`]). If the re-execution fails the
/// run goes on as it is.
fn openmp_waits_passively() {
    use std::os::unix::process::CommandExt as _;
    let mut args = std::env::args_os();
    let arg0 = args.next();
    let rest: Vec<std::ffi::OsString> = args.collect();
    let Some(openmp) = cli::start::openmp_environment(&rest) else { return };
    for (name, value) in openmp.vars() {
        if name == "OMP_WAIT_POLICY" {
            continue;
        }
        // SAFETY: nothing else runs yet (main's first statements): no other thread reads the
        // environment while it changes.
        unsafe { std::env::set_var(name, value) };
    }
    if !openmp.passive {
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
