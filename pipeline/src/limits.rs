//! The ranges of the numbers that size threads, queues and buffers, one set for every caller
//! (the CLI's flags, the Python keywords, the library's options): a typo (`threads=0`,
//! `prefetch=1e9`, `threads=20000`) is an error before any work, never a panic, a hang of
//! thousands of threads or an allocation failure.

use crate::error::{Error, Result};

/// Most libtorch threads.
pub const MAX_THREADS: usize = 1024;
/// Most gather workers.
pub const MAX_WORKERS: usize = 256;
/// Most batches in flight between two stages.
pub const MAX_PREFETCH: usize = 1024;
/// Most cells in one batch.
pub const MAX_BATCH_SIZE: usize = 1 << 20;
/// Most blocks in a shuffle window.
pub const MAX_SHUFFLE_BLOCKS: usize = 1 << 20;
/// Most MiB of shuffle buffer (1 TiB).
pub const MAX_BUFFER_MB: usize = 1 << 20;

/// `value` when it is in `min..=max`; else an error naming `name` (the flag or keyword, as the
/// caller spells it) and `what` it counts.
pub fn check(name: &str, value: usize, min: usize, max: usize, what: &str) -> Result<usize> {
    match (min..=max).contains(&value) {
        true => Ok(value),
        false => {
            Err(Error::InvalidInput(format!("{name} {value}: expected {what}, a whole number from {min} to {max}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_outside_their_range_are_named() {
        assert_eq!(check("threads", 4, 1, MAX_THREADS, "threads").ok(), Some(4));
        for bad in [0, 20_000] {
            let err = check("threads", bad, 1, MAX_THREADS, "threads").unwrap_err().to_string();
            assert_eq!(err, format!("threads {bad}: expected threads, a whole number from 1 to 1024"));
        }
    }
}
