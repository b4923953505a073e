//! glibc's allocator, set once per process for the streaming work: the CLI's binaries as they
//! start and the Python module before its first command.
//!
//! glibc by default serves every allocation above a threshold that starts at 128 KiB from a
//! fresh `mmap` and gives freed heap back to the system past 128 KiB: the sink's pages and column
//! chunks (megabytes, made and dropped per row group) and libtorch's activations (megabytes, made
//! and dropped per training step) then cost a page fault and a zeroed page per 4 KiB every time.
//! Measured with `cpa-stream bench sink --genes 5000 --threads 1 --profiles fast --mib 256` (3
//! interleaved runs on 2026-11-25, the fidelity harness running beside): 413-451 MB/s as glibc
//! sets it, 517-544 MB/s with allocations below 32 MiB kept in the heap and 256 MiB of freed heap
//! kept for reuse, the same peak RSS (859 MiB).
//!
//! The thresholds govern the heap of the process's main thread. The heaps glibc gives other
//! threads (its arenas, 64 MiB each) are unmapped whenever they empty, whatever the thresholds, so
//! the Python module runs its commands on the calling thread (docs/benchmarks.md, "The Python
//! route's training step").

/// Keeps allocations below 32 MiB in the heap and up to 256 MiB of freed heap for reuse; left as
/// glibc sets it when the user tunes the allocator (`GLIBC_TUNABLES`, `MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_`). Does nothing outside glibc.
pub fn reuse_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 256 << 20;
        let tuned = ["GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
            .iter()
            .any(|name| std::env::var_os(name).is_some());
        if tuned {
            return;
        }
        // SAFETY: mallopt only changes the allocator's thresholds, under the allocator's own
        // lock (safe with other threads running). A value it refuses leaves the default (its
        // return value is not needed).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}
