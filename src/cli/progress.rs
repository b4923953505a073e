//! Progress on a terminal (a bar) or in logs (a line every few seconds).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cpa_stream_pipeline::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// The bar on screen, if any: log lines are printed above it rather than through it.
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Runs `write` with the bar (if one is drawn) cleared, and redraws it after.
pub fn above_bar<T>(write: impl FnOnce() -> T) -> T {
    let bar = ACTIVE.lock().ok().and_then(|b| b.clone());
    match bar {
        Some(bar) => bar.suspend(write),
        None => write(),
    }
}

/// Seconds between progress log lines when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct CliProgress {
    bar: Mutex<Option<ProgressBar>>,
    terminal: bool,
    phase: Mutex<(String, u64, Instant, Instant)>,
    done: AtomicU64,
    /// Cells per epoch, cells of the first epoch done before, first and last epoch (training).
    epochs: Mutex<Option<(u64, u64, u32, u32)>>,
}

impl CliProgress {
    pub fn new() -> CliProgress {
        let now = Instant::now();
        CliProgress {
            bar: Mutex::new(None),
            // No bar with --quiet (errors only).
            terminal: std::io::stderr().is_terminal() && !super::quiet(),
            phase: Mutex::new((String::new(), 0, now, now)),
            done: AtomicU64::new(0),
            epochs: Mutex::new(None),
        }
    }
}

impl Progress for CliProgress {
    fn begin(&self, phase: &str, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        if let Ok(mut e) = self.epochs.lock() {
            *e = None;
        }
        if let Ok(mut p) = self.phase.lock() {
            *p = (phase.to_owned(), total, Instant::now(), Instant::now());
        }
        if self.terminal {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template("{msg:>12} [{bar:40}] {human_pos}/{human_len} {rate} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0}/s", state.per_sec());
                })
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(phase.to_owned());
            if let Ok(mut a) = ACTIVE.lock() {
                *a = Some(bar.clone());
            }
            if let Ok(mut b) = self.bar.lock() {
                *b = Some(bar);
            }
        } else {
            tracing::debug!("{phase}: 0/{total}");
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
            match self.epochs.lock().ok().and_then(|e| *e) {
                Some((per, resumed, first, last)) => {
                    let epochs = u64::from(first) + (resumed + done) / per.max(1);
                    tracing::info!("{}: {}/{last} epochs ({rate:.0} cells/s)", p.0, epochs.min(u64::from(last)));
                }
                None => tracing::info!("{}: {done}/{} ({rate:.0}/s)", p.0, p.1),
            }
        }
    }

    fn epochs(&self, cells_per_epoch: u64, resumed: u64, first: u32, last: u32) {
        if let Ok(mut e) = self.epochs.lock() {
            *e = Some((cells_per_epoch, resumed, first, last));
        }
        let Ok(b) = self.bar.lock() else { return };
        let Some(bar) = b.as_ref() else { return };
        // The bar counts cells (smooth within an epoch) and shows epochs.
        let per = cells_per_epoch.max(1);
        let style = ProgressStyle::with_template(
            "{prefix:>5} [{bar:30}] {epochs} epochs, {cells_per_s}, eta {eta}  {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("epochs", move |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            // Epochs completed (the logs number epochs from 0, as metrics.parquet does).
            let done = u64::from(first) + (resumed + state.pos()) / per;
            let _ = write!(w, "{}/{last}", done.min(u64::from(last)));
        })
        .with_key("cells_per_s", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0} cells/s", state.per_sec());
        })
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix("train");
        bar.set_message("");
    }

    fn note(&self, text: &str) {
        if let Ok(b) = self.bar.lock()
            && let Some(bar) = b.as_ref()
        {
            bar.set_message(text.to_owned());
        }
    }

    fn end(&self) {
        if let Ok(mut a) = ACTIVE.lock() {
            *a = None;
        }
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
            // A phase of a moment needs no line of its own: the results say what was done.
            let rate = done as f64 / secs.max(1e-9);
            if secs >= 2.0 {
                tracing::info!("{phase}: {done} in {secs:.1} s ({rate:.0}/s)");
            } else {
                tracing::debug!("{phase}: {done} in {secs:.1} s ({rate:.0}/s)");
            }
        }
    }
}
