//! Operator counts: what the host asks of libtorch while some code runs, for the launch and
//! synchronisation counts of a training step (`cpa-stream bench model --count-ops`).
//!
//! The count comes from libtorch's own RecordFunction hook (`cxx/op_count.cpp`) and does not
//! depend on the device: a CPU build counts the operators a CUDA step would dispatch. A dispatch
//! counts as a **kernel** (about one launch on a device) when its operator computes and none of
//! the operators it calls does (views, allocations, no-op conversions and autograd's bookkeeping
//! compute nothing). An operator whose result the host must wait for on a device is a **host
//! synchronisation** (a scalar read, `nonzero` and the operators that call it, `unique`, ...).
//!
//! Copies to the host are not told apart from other copies by name; the trainer makes none in a
//! step (its losses stay on the device until an epoch's metrics are read).

use serde::Serialize;

use cpa_stream_stages::{Error, Result};

/// How one operator is classed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpClass {
    /// Counted as a kernel at least once: a launch on a device.
    Kernel,
    /// Never a kernel: metadata only (views, allocations, no-op conversions), or an operator whose
    /// work is the kernels of the operators it calls.
    NoKernel,
    /// The host waits for the device.
    Sync,
}

/// One operator's counts over the counted code.
#[derive(Debug, Clone, Serialize)]
pub struct OpTally {
    /// libtorch's name (`aten::addmm`).
    pub name: String,
    /// Every dispatch, nested ones included.
    pub calls: u64,
    /// Dispatches counted as a kernel.
    pub kernels: u64,
    /// Dispatches made by the caller itself (not from inside another operator).
    pub top: u64,
    /// What it costs on a device.
    pub class: OpClass,
}

/// The kernels that follow from one operator the caller dispatched.
#[derive(Debug, Clone, Serialize)]
pub struct Dispatched {
    /// The operator the caller dispatched (`aten::lerp_`, `aten::linear`).
    pub name: String,
    /// The kernels counted inside it (itself where it is one).
    pub kernels: u64,
}

/// What [`count_ops`] counted.
#[derive(Debug, Clone, Default)]
pub struct Tallies {
    /// Every operator seen.
    pub ops: Vec<OpTally>,
    /// Kernels by the operator the caller dispatched.
    pub by_dispatch: Vec<Dispatched>,
}

/// Counts per unit of work (a training step), from [`count_ops`]' tallies.
#[derive(Debug, Clone, Serialize)]
pub struct OpCounts {
    /// Units the tallies cover.
    pub units: u64,
    /// Operators the caller dispatched, per unit.
    pub dispatched: f64,
    /// Kernels (launches on a device), per unit.
    pub kernels: f64,
    /// Host synchronisations on a device, per unit.
    pub syncs: f64,
    /// Every operator seen, most kernels first.
    pub ops: Vec<OpTally>,
    /// Kernels by the operator the caller dispatched, most first.
    pub by_dispatch: Vec<Dispatched>,
}

impl OpCounts {
    /// Per-unit figures of `tallies` counted over `units` units.
    pub fn per(units: u64, tallies: Tallies) -> OpCounts {
        let Tallies { mut ops, mut by_dispatch } = tallies;
        ops.sort_by(|a, b| b.kernels.cmp(&a.kernels).then(b.calls.cmp(&a.calls)).then(a.name.cmp(&b.name)));
        by_dispatch.sort_by(|a, b| b.kernels.cmp(&a.kernels).then(a.name.cmp(&b.name)));
        let per = |n: u64| n as f64 / units.max(1) as f64;
        OpCounts {
            units,
            dispatched: per(ops.iter().map(|o| o.top).sum()),
            kernels: per(ops.iter().map(|o| o.kernels).sum()),
            syncs: per(ops.iter().filter(|o| o.class == OpClass::Sync).map(|o| o.calls).sum()),
            ops,
            by_dispatch,
        }
    }
}

/// Operators that make the host wait for a device's result.
const SYNCS: &[&str] = &[
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::equal",
    "aten::bincount",
];

/// The class of operator `name`, counted as a kernel `kernels` times.
pub fn class_of(name: &str, kernels: u64) -> OpClass {
    if SYNCS.contains(&name) {
        OpClass::Sync
    } else if kernels > 0 {
        OpClass::Kernel
    } else {
        OpClass::NoKernel
    }
}

#[cfg(cpa_op_count)]
mod ffi {
    use std::ffi::{c_char, c_int};

    unsafe extern "C" {
        pub fn cpa_op_count_start(this_thread_only: c_int) -> c_int;
        pub fn cpa_op_count_stop(out: *mut c_char, capacity: i64) -> i64;
    }
}

/// Which threads' operators [`count_ops`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Every thread's (a device's autograd runs on libtorch's own threads).
    All,
    /// The calling thread's only (on the CPU, autograd runs on the caller's thread).
    This,
}

/// Runs `work` with every operator libtorch dispatches on `threads` counted and returns its
/// result with the tallies. Counts are taken one at a time in a process. An error where this
/// build has no counter (libtorch's headers were missing when it was compiled).
pub fn count_ops<T>(threads: Threads, work: impl FnOnce() -> Result<T>) -> Result<(T, Tallies)> {
    #[cfg(cpa_op_count)]
    {
        static ONE_COUNT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ONE_COUNT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // SAFETY: takes an int; the wrapper catches every exception.
        if unsafe { ffi::cpa_op_count_start(std::ffi::c_int::from(threads == Threads::This)) } != 0 {
            return Err(Error::InvalidInput("libtorch refused the operator counter's callbacks".into()));
        }
        let result = work();
        let text = stop()?;
        let value = result?;
        parse(&text).map(|tallies| (value, tallies))
    }
    #[cfg(not(cpa_op_count))]
    {
        let _ = (threads, work);
        Err(Error::InvalidInput(
            "this build counts no operators: libtorch's headers (ATen/record_function.h) were missing when it was \
             compiled"
                .into(),
        ))
    }
}

#[cfg(cpa_op_count)]
fn stop() -> Result<String> {
    // SAFETY: `out` holds `capacity` writable bytes (none when empty: the wrapper then only
    // measures); the wrapper writes at most that many.
    let text =
        super::wrapper_text("operator counter", |out, capacity| unsafe { ffi::cpa_op_count_stop(out, capacity) })?;
    String::from_utf8(text).map_err(|e| Error::InvalidInput(format!("operator names are not UTF-8: {e}")))
}

/// The wrapper's lines: `name\tcalls\tkernels\ttop`, and `<top>\tname\tkernels`.
fn parse(text: &str) -> Result<Tallies> {
    let bad = |line: &str| Error::InvalidInput(format!("operator counter: unexpected line {line:?}"));
    let mut tallies = Tallies::default();
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).ok_or_else(|| bad(line));
        match fields.as_slice() {
            ["<top>", name, _] => {
                tallies.by_dispatch.push(Dispatched { name: (*name).to_owned(), kernels: number(2)? })
            }
            [name, _, _, _] => {
                let (calls, kernels, top) = (number(1)?, number(2)?, number(3)?);
                let class = class_of(name, kernels);
                tallies.ops.push(OpTally { name: (*name).to_owned(), calls, kernels, top, class });
            }
            _ => return Err(bad(line)),
        }
    }
    Ok(tallies)
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::*;
    use crate::torch::TorchResult;

    /// The counter sees what a few known operations dispatch: `a.matmul(b)` of two matrices is
    /// one `aten::mm` kernel under a top-level `aten::matmul`, `sum` one kernel, a scalar read one
    /// host synchronisation (and its copy), a view no kernel.
    #[test]
    fn the_counter_sees_leaves_views_and_scalar_reads() -> Result<()> {
        let a = Tensor::f_ones([4, 3], (Kind::Float, tch::Device::Cpu)).torch()?;
        let b = Tensor::f_ones([3, 2], (Kind::Float, tch::Device::Cpu)).torch()?;
        let (value, ops) = count_ops(Threads::This, || {
            let product = a.f_matmul(&b).torch()?;
            let flat = product.f_view([-1]).torch()?;
            flat.f_sum(Kind::Float).torch()?.f_double_value(&[]).torch()
        })?;
        assert_eq!(value, 24.0);
        let find = |name: &str| ops.ops.iter().find(|o| o.name == name);
        let matmul = find("aten::matmul").expect("matmul counted");
        assert_eq!((matmul.calls, matmul.kernels, matmul.top), (1, 0, 1));
        let mm = find("aten::mm").expect("mm counted");
        assert_eq!((mm.kernels, mm.top, mm.class), (1, 0, OpClass::Kernel));
        // `sum` is dispatched once; the CPU's sum does its work in an operator it calls.
        assert_eq!(find("aten::sum").map(|o| o.top), Some(1));
        assert_eq!(find("aten::_local_scalar_dense").map(|o| o.class), Some(OpClass::Sync));
        assert_eq!(find("aten::view").map(|o| (o.top, o.class)), Some((1, OpClass::NoKernel)));
        let counts = OpCounts::per(1, ops);
        assert_eq!(counts.syncs, 1.0);
        // mm, sum's and the scalar read's copy.
        assert_eq!(counts.kernels, 3.0, "{counts:?}");
        let by = |name: &str| counts.by_dispatch.iter().find(|d| d.name == name).map(|d| d.kernels);
        assert_eq!((by("aten::matmul"), by("aten::sum"), by("aten::item")), (Some(1), Some(1), Some(1)));
        // Nothing is counted once the count is over.
        let (_, again) = count_ops(Threads::This, || Ok(()))?;
        assert!(again.ops.is_empty() && again.by_dispatch.is_empty(), "{again:?}");
        Ok(())
    }

    #[test]
    fn malformed_counter_lines_are_errors() {
        assert!(parse("aten::mm\t1\t1\n").is_err());
        assert!(parse("aten::mm\t1\tx\t1\n").is_err());
        assert!(parse("<top>\taten::mm\n").is_err());
        let t = parse("aten::mm\t2\t2\t0\n<top>\taten::matmul\t2\n").expect("two good lines");
        assert_eq!((t.ops.len(), t.ops[0].class, t.by_dispatch[0].kernels), (1, OpClass::Kernel, 2));
        assert_eq!(parse("").map(|t| t.ops.len()).ok(), Some(0));
    }
}
