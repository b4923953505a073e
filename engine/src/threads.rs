//! Where a model command runs: the device, checked, and the threads planned by
//! [`cpa_stream_pipeline::threads`], set in libtorch.

use cpa_stream_pipeline::request::Compute;
pub use cpa_stream_pipeline::threads::*;

use crate::Stage;

/// Parses and checks `device` (`cpu`, `cuda`, `cuda:N`), plans the threads of a run on it
/// ([`plan`]; `threads` and `workers` are the user's, kept as given) and sets libtorch's thread
/// count. Returns the device and the batcher's workers. The CPUs busy elsewhere come from
/// `CPA_STREAM_BUSY_CPUS` when the process measured them at start (the CLI does), else they are
/// watched here for [`SAMPLE`] when a count is left to the plan.
///
/// libtorch's thread count is process-wide: in a process that also uses PyTorch this sets it
/// for both.
pub fn configure(device: &str, threads: Option<usize>, workers: Option<usize>) -> crate::Result<(tch::Device, usize)> {
    use cpa_stream_pipeline::limits::{MAX_THREADS, MAX_WORKERS, check};
    if let Some(n) = threads {
        check("threads", n, 1, MAX_THREADS, "libtorch threads")?;
    }
    if let Some(n) = workers {
        check("workers", n, 1, MAX_WORKERS, "gather workers")?;
    }
    let device = crate::device::parse(device).map_err(crate::Error::stage(Stage::Device))?;
    crate::device::check(device).map_err(crate::Error::stage(Stage::Device))?;
    let on_cpu = device == tch::Device::Cpu;
    let measured = std::env::var(BUSY_CPUS_VAR).ok().and_then(|v| v.parse::<f64>().ok());
    let busy = match measured {
        Some(b) => b,
        None if on_cpu && (threads.is_none() || workers.is_none()) => busy_elsewhere(SAMPLE),
        None => 0.0,
    };
    let plan = plan(cpus(), on_cpu, threads, workers, cpa_stream_pipeline::batcher::DEFAULT_WORKERS, busy);
    let torch = i32::try_from(plan.torch)
        .map_err(|_| crate::Error::InvalidInput(format!("threads {}: too many", plan.torch)))?;
    tch::set_num_threads(torch);
    tracing::debug!(
        "threads: {} CPUs usable, {:.1} busy elsewhere: libtorch {} ({} OpenMP wait), batcher workers {}",
        plan.cpus,
        plan.busy_elsewhere,
        plan.torch,
        if std::env::var("OMP_WAIT_POLICY").is_ok_and(|v| v.eq_ignore_ascii_case("passive")) {
            "passive"
        } else {
            "spinning"
        },
        plan.workers
    );
    Ok((device, plan.workers))
}

/// A request's [`Compute`] made real: the device, checked, and the batcher's workers; libtorch's
/// threads set, which are the process's ([`configure`]).
pub trait Configure {
    /// See the trait.
    fn configure(&self) -> crate::Result<(tch::Device, usize)>;
}

impl Configure for Compute {
    fn configure(&self) -> crate::Result<(tch::Device, usize)> {
        configure(&self.device, self.threads, self.workers)
    }
}
