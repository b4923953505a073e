//! Where a training step's time goes (`cpa-stream bench model --profile`): libtorch's own
//! profiler (Kineto, what `torch.profiler` runs; `cxx/profile.cpp`) around some code, summarised
//! per unit of work. The host's side is each operator's *self* time (its time less that of the
//! operators it called, on the same thread), so the figures add up to the time spent in libtorch;
//! on CUDA, the device's side is each kernel's (and copy's) time as CUPTI records it, and how much
//! of the wall the device was busy at all: a step whose device is idle most of its wall is bound
//! by the host (launches, the dispatcher), one whose device is busy by its kernels.
//!
//! The whole record can also be saved as a Chrome trace (`chrome://tracing`, Perfetto).

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use cpa_stream_stages::{Error, Result};

/// Where an event ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// An operator (or a runtime call such as `cudaLaunchKernel`) on a host thread.
    Host,
    /// A kernel, copy or fill on a CUDA device.
    Device,
}

/// One profiled event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Host or device.
    pub side: Side,
    /// The host thread, or the device's stream.
    pub lane: u64,
    /// Start, nanoseconds on the profiler's clock.
    pub start_ns: u64,
    /// End, nanoseconds on the profiler's clock.
    pub end_ns: u64,
    /// libtorch's name (`aten::addmm`), or the kernel's.
    pub name: String,
}

/// One name's time per unit of work.
#[derive(Debug, Clone, Serialize)]
pub struct TimeShare {
    /// The operator's or kernel's name.
    pub name: String,
    /// Events per unit.
    pub calls: f64,
    /// Milliseconds per unit (self time on the host; the whole event on the device).
    pub ms: f64,
}

/// The device's side of a profile.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceTime {
    /// Milliseconds per unit the device ran anything (overlapping events counted once).
    pub busy_ms: f64,
    /// Kernels, copies and fills per unit.
    pub events: f64,
    /// Each name's time, most first.
    pub top: Vec<TimeShare>,
}

/// A profile summarised per unit of work.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// Units profiled (training steps).
    pub units: u64,
    /// Wall milliseconds per unit, as the caller measured it.
    pub wall_ms: f64,
    /// Milliseconds per unit the host spent inside libtorch (top-level events' time).
    pub host_ms: f64,
    /// Each host operator's self time, most first.
    pub host_top: Vec<TimeShare>,
    /// The device's side, where the work ran on CUDA.
    pub device: Option<DeviceTime>,
}

impl Profile {
    /// Summarises `events` over `units` units that took `wall_s` seconds.
    pub fn summarise(events: &[Event], units: u64, wall_s: f64) -> Profile {
        let per = |x: f64| x / units.max(1) as f64;
        let host: Vec<&Event> = events.iter().filter(|e| e.side == Side::Host).collect();
        let (self_ns, top_ns) = host_self_times(&host);
        let host_top = shares(&self_ns, per);
        let device_events: Vec<&Event> = events.iter().filter(|e| e.side == Side::Device).collect();
        let device = (!device_events.is_empty()).then(|| {
            let mut by_name: HashMap<&str, (u64, u64)> = HashMap::new();
            for e in &device_events {
                let t = by_name.entry(e.name.as_str()).or_default();
                t.0 += 1;
                t.1 += e.end_ns.saturating_sub(e.start_ns);
            }
            DeviceTime {
                busy_ms: per(union_ns(&device_events) as f64 / 1e6),
                events: per(device_events.len() as f64),
                top: shares(&by_name, per),
            }
        });
        Profile { units, wall_ms: per(wall_s * 1e3), host_ms: per(top_ns as f64 / 1e6), host_top, device }
    }
}

/// Each name's (events, self nanoseconds) over the host's events, and the nanoseconds of the
/// outermost events. Events of one thread nest (an operator's callees start and end inside it);
/// an event's self time is its time less its direct children's.
fn host_self_times<'a>(events: &[&'a Event]) -> (HashMap<&'a str, (u64, u64)>, u64) {
    let mut by_lane: HashMap<u64, Vec<&Event>> = HashMap::new();
    for e in events {
        by_lane.entry(e.lane).or_default().push(e);
    }
    let mut tally: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut top_ns = 0;
    for lane in by_lane.values_mut() {
        // Parents before their children: by start, the longer first.
        lane.sort_by(|a, b| a.start_ns.cmp(&b.start_ns).then(b.end_ns.cmp(&a.end_ns)));
        // Open events: (index in `lane`, nanoseconds of its children so far).
        let mut open: Vec<(usize, u64)> = Vec::new();
        let close = |i: usize, children: u64, tally: &mut HashMap<&'a str, (u64, u64)>| {
            let e = lane[i];
            let t = tally.entry(e.name.as_str()).or_default();
            t.0 += 1;
            t.1 += e.end_ns.saturating_sub(e.start_ns).saturating_sub(children);
        };
        for (i, e) in lane.iter().enumerate() {
            while let Some(&(j, children)) = open.last() {
                if lane[j].end_ns > e.start_ns {
                    break;
                }
                open.pop();
                close(j, children, &mut tally);
            }
            let length = e.end_ns.saturating_sub(e.start_ns);
            match open.last_mut() {
                Some((_, children)) => *children += length,
                None => top_ns += length,
            }
            open.push((i, 0));
        }
        while let Some((j, children)) = open.pop() {
            close(j, children, &mut tally);
        }
    }
    (tally, top_ns)
}

/// Nanoseconds covered by at least one of `events`.
fn union_ns(events: &[&Event]) -> u64 {
    let mut spans: Vec<(u64, u64)> = events.iter().map(|e| (e.start_ns, e.end_ns.max(e.start_ns))).collect();
    spans.sort_unstable();
    let (mut total, mut current) = (0, None::<(u64, u64)>);
    for (start, end) in spans {
        current = match current {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                total += e - s;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    total + current.map_or(0, |(s, e)| e - s)
}

fn shares(tally: &HashMap<&str, (u64, u64)>, per: impl Fn(f64) -> f64) -> Vec<TimeShare> {
    let mut out: Vec<TimeShare> = tally
        .iter()
        .map(|(name, (calls, ns))| TimeShare {
            name: (*name).to_owned(),
            calls: per(*calls as f64),
            ms: per(*ns as f64 / 1e6),
        })
        .collect();
    out.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
    out
}

#[cfg(cpa_profile)]
mod ffi {
    use std::ffi::{c_char, c_int};

    unsafe extern "C" {
        pub fn cpa_profile_start(cuda: c_int, shapes: c_int, err: *mut c_char, err_len: usize) -> c_int;
        pub fn cpa_profile_stop(trace_path: *const c_char, err: *mut c_char, err_len: usize) -> c_int;
        pub fn cpa_profile_events(out: *mut c_char, capacity: i64) -> i64;
    }
}

/// Runs `work` under libtorch's profiler: the calling thread's operators and, where `cuda`, the
/// device's kernels. Returns its result with the events; saves a Chrome trace to `trace` where
/// given (with the operators' input shapes and types). One profile at a time in a process. An error where this build has no profiler
/// (libtorch's headers were missing when it was compiled) or libtorch refuses to start one.
pub fn profile<T>(cuda: bool, trace: Option<&Path>, work: impl FnOnce() -> Result<T>) -> Result<(T, Vec<Event>)> {
    #[cfg(cpa_profile)]
    {
        use std::ffi::CString;

        static ONE_PROFILE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ONE_PROFILE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = match trace {
            Some(p) => CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| Error::InvalidInput(format!("{}: a trace path with a NUL byte", p.display())))?,
            None => CString::default(),
        };
        // A trace also records each operator's input shapes and types (what a reader of it needs
        // to tell one `aten::copy_` from another); the summary does not use them.
        let shapes = std::ffi::c_int::from(trace.is_some());
        // SAFETY: the wrapper catches every exception and writes at most `len` bytes of `err`.
        call("start", |err, len| unsafe { ffi::cpa_profile_start(std::ffi::c_int::from(cuda), shapes, err, len) })?;
        let result = work();
        // SAFETY: `path` is a NUL-terminated string alive for the call.
        let stopped = call("stop", |err, len| unsafe { ffi::cpa_profile_stop(path.as_ptr(), err, len) });
        let value = result?;
        stopped.map_err(|e| match trace {
            Some(p) => Error::InvalidInput(format!("{e} (saving the trace to {})", p.display())),
            None => e,
        })?;
        parse(&events_text()?).map(|events| (value, events))
    }
    #[cfg(not(cpa_profile))]
    {
        let _ = (cuda, trace, work);
        Err(Error::InvalidInput(
            "this build has no profiler: libtorch's headers (torch/csrc/autograd/profiler_kineto.h) were missing \
             when it was compiled"
                .into(),
        ))
    }
}

#[cfg(cpa_profile)]
fn call(what: &str, f: impl FnOnce(*mut std::ffi::c_char, usize) -> std::ffi::c_int) -> Result<()> {
    const ERROR_BYTES: usize = 1024;
    let mut err = vec![0u8; ERROR_BYTES];
    if f(err.as_mut_ptr().cast(), ERROR_BYTES) == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(Error::InvalidInput(format!("libtorch's profiler failed to {what}: {}", String::from_utf8_lossy(&err[..end]))))
}

#[cfg(cpa_profile)]
fn events_text() -> Result<String> {
    // SAFETY: `out` holds `capacity` writable bytes (none when empty: the wrapper then only
    // measures); the wrapper writes at most that many.
    let text = super::wrapper_text("profiler", |out, capacity| unsafe { ffi::cpa_profile_events(out, capacity) })?;
    // Kernel names are C++ signatures: keep what is not UTF-8 readable rather than fail.
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// The wrapper's lines: `cpu|cuda\tlane\tstart_ns\tend_ns\tname`.
fn parse(text: &str) -> Result<Vec<Event>> {
    let bad = |line: &str| Error::InvalidInput(format!("profiler: unexpected line {line:?}"));
    text.lines()
        .map(|line| {
            let mut fields = line.splitn(5, '\t');
            let mut next = || fields.next().ok_or_else(|| bad(line));
            let side = match next()? {
                "cpu" => Side::Host,
                "cuda" => Side::Device,
                _ => return Err(bad(line)),
            };
            let number = |f: Result<&str>| f.and_then(|f| f.parse::<u64>().map_err(|_| bad(line)));
            let (lane, start_ns, end_ns) = (number(next())?, number(next())?, number(next())?);
            Ok(Event { side, lane, start_ns, end_ns, name: next()?.to_owned() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(lane: u64, start_ns: u64, end_ns: u64, name: &str) -> Event {
        Event { side: Side::Host, lane, start_ns, end_ns, name: name.into() }
    }

    fn device(lane: u64, start_ns: u64, end_ns: u64, name: &str) -> Event {
        Event { side: Side::Device, lane, start_ns, end_ns, name: name.into() }
    }

    fn find<'a>(shares: &'a [TimeShare], name: &str) -> &'a TimeShare {
        shares.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("{name} in {shares:?}"))
    }

    /// Self time is an event's time less its direct children's, on its own thread; the host's
    /// total is the outermost events'; the device's busy time counts overlaps once.
    #[test]
    fn self_times_and_busy_time_add_up() {
        let ms = 1_000_000;
        let events = vec![
            // Thread 1: linear (0-10) calling addmm (1-7), which calls fill (2-3); then sum (12-14).
            host(1, 0, 10 * ms, "aten::linear"),
            host(1, ms, 7 * ms, "aten::addmm"),
            host(1, 2 * ms, 3 * ms, "aten::fill_"),
            host(1, 12 * ms, 14 * ms, "aten::sum"),
            // Thread 2, overlapping thread 1 in time but not nesting in it.
            host(2, 5 * ms, 9 * ms, "aten::addmm"),
            // Two streams: 0-4 and 3-6 overlap (busy 0-6), 8-9 apart.
            device(7, 0, 4 * ms, "gemm"),
            device(8, 3 * ms, 6 * ms, "gemm"),
            device(7, 8 * ms, 9 * ms, "copy"),
        ];
        let p = Profile::summarise(&events, 2, 0.03);
        assert_eq!(p.wall_ms, 15.0);
        // Outermost: linear 10, sum 2 (thread 1), addmm 4 (thread 2): 16 over 2 units.
        assert_eq!(p.host_ms, 8.0);
        let (linear, addmm, fill) =
            (find(&p.host_top, "aten::linear"), find(&p.host_top, "aten::addmm"), find(&p.host_top, "aten::fill_"));
        assert_eq!((linear.ms, linear.calls), (2.0, 0.5)); // 10 - 6
        assert_eq!((addmm.ms, addmm.calls), (4.5, 1.0)); // (6 - 1) + 4
        assert_eq!(fill.ms, 0.5);
        assert_eq!(p.host_top[0].name, "aten::addmm", "most first: {:?}", p.host_top);
        let self_total: f64 = p.host_top.iter().map(|s| s.ms).sum();
        assert_eq!(self_total, p.host_ms, "self times add up to the outermost events' time");
        let d = p.device.expect("device events");
        assert_eq!((d.busy_ms, d.events), (3.5, 1.5));
        assert_eq!(find(&d.top, "gemm").ms, 3.5);
        // Host events only: no device side.
        assert!(Profile::summarise(&events[..5], 1, 1.0).device.is_none());
    }

    #[test]
    fn malformed_profiler_lines_are_errors() {
        assert!(parse("gpu\t1\t0\t1\tx\n").is_err());
        assert!(parse("cpu\t1\t0\tx\taten::mm\n").is_err());
        assert!(parse("cpu\t1\t0\t1\n").is_err());
        let e = parse("cuda\t7\t5\t9\tvoid gemm<float>(int,\tint)\n").expect("a good line");
        assert_eq!(e, vec![device(7, 5, 9, "void gemm<float>(int,\tint)")]);
        assert_eq!(parse("").map(|e| e.len()).ok(), Some(0));
    }

    /// The profiler records the operators a piece of libtorch work dispatches on the CPU, and
    /// saves a trace that Chrome's viewer reads.
    #[cfg(cpa_profile)]
    #[test]
    fn the_profiler_sees_a_matrix_product() -> Result<()> {
        use crate::torch::TorchResult;
        use tch::{Kind, Tensor};

        let dir = tempfile::tempdir().map_err(|e| Error::InvalidInput(e.to_string()))?;
        let trace = dir.path().join("trace.json");
        let a = Tensor::f_ones([64, 32], (Kind::Float, tch::Device::Cpu)).torch()?;
        let b = Tensor::f_ones([32, 16], (Kind::Float, tch::Device::Cpu)).torch()?;
        let start = std::time::Instant::now();
        let (value, events) = profile(false, Some(&trace), || {
            let mut total = 0.0;
            for _ in 0..3 {
                total += a.f_mm(&b).torch()?.f_sum(Kind::Float).torch()?.f_double_value(&[]).torch()?;
            }
            Ok(total)
        })?;
        let wall = start.elapsed().as_secs_f64();
        assert_eq!(value, 3.0 * 64.0 * 16.0 * 32.0);
        let p = Profile::summarise(&events, 3, wall);
        assert_eq!(find(&p.host_top, "aten::mm").calls, 1.0, "{:?}", p.host_top);
        assert!(p.host_ms > 0.0 && p.host_ms <= p.wall_ms, "{p:?}");
        assert!(p.device.is_none());
        let text = std::fs::read_to_string(&trace).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let names: Vec<&str> = json["traceEvents"]
            .as_array()
            .expect("a traceEvents array")
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(names.contains(&"aten::mm"), "{names:?}");
        // Nothing is recorded once the profile is over.
        let ((), again) = profile(false, None, || Ok(()))?;
        assert!(again.iter().all(|e| e.name != "aten::mm"), "{again:?}");
        Ok(())
    }
}
