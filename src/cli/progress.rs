//! Progress on a terminal (a bar) or in logs (a line every few seconds).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cpa_stream_pipeline::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// Seconds between progress log lines when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct CliProgress {
    bar: Mutex<Option<ProgressBar>>,
    terminal: bool,
    phase: Mutex<(String, u64, Instant, Instant)>,
    done: AtomicU64,
}

impl CliProgress {
    pub fn new() -> CliProgress {
        let now = Instant::now();
        CliProgress {
            bar: Mutex::new(None),
            terminal: std::io::stderr().is_terminal(),
            phase: Mutex::new((String::new(), 0, now, now)),
            done: AtomicU64::new(0),
        }
    }
}

impl Progress for CliProgress {
    fn begin(&self, phase: &str, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        if let Ok(mut p) = self.phase.lock() {
            *p = (phase.to_owned(), total, Instant::now(), Instant::now());
        }
        if self.terminal {
            let bar = ProgressBar::new(total);
            let style =
                ProgressStyle::with_template("{msg:>12} [{bar:40}] {human_pos}/{human_len} {per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(phase.to_owned());
            if let Ok(mut b) = self.bar.lock() {
                *b = Some(bar);
            }
        } else {
            tracing::info!("{phase}: 0/{total}");
        }
    }

    fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if self.terminal {
            if let Ok(b) = self.bar.lock()
                && let Some(bar) = b.as_ref()
            {
                bar.inc(n);
            }
            return;
        }
        if let Ok(mut p) = self.phase.lock()
            && p.3.elapsed() >= LOG_EVERY
        {
            p.3 = Instant::now();
            let rate = done as f64 / p.2.elapsed().as_secs_f64().max(1e-9);
            tracing::info!("{}: {done}/{} ({rate:.0}/s)", p.0, p.1);
        }
    }

    fn end(&self) {
        if let Ok(mut b) = self.bar.lock()
            && let Some(bar) = b.take()
        {
            bar.finish_and_clear();
        }
        // Only a phase begun and not yet ended: callers close the phase that failed on an error,
        // which may be none.
        if let Ok(mut p) = self.phase.lock()
            && !p.0.is_empty()
        {
            let phase = std::mem::take(&mut p.0);
            let done = self.done.load(Ordering::Relaxed);
            let secs = p.2.elapsed().as_secs_f64();
            tracing::info!("{phase}: {done} in {secs:.1} s ({:.0}/s)", done as f64 / secs.max(1e-9));
        }
    }
}
