//! The model commands as `cpa-stream-engine` runs them: the requests their flags make, the runs
//! and what they print. The `cpa-stream` front parses the same command line and hands these
//! commands to this binary (`front.rs`), so that the others start without libtorch.

mod bench;
mod evaluate;
mod info;
mod predict;
mod signals;
mod train;

pub use bench::{model as bench_model, predict as bench_predict, train as bench_train};
pub use evaluate::{dose_response, embeddings, run as evaluate};
pub use info::run as info;
pub use predict::run as predict;
pub use train::run as train;

/// The device named on the command line, checked to exist, and the run's threads planned
/// ([`cpa_stream_engine::threads::configure`]): libtorch's set from `--threads` or the plan, the
/// batcher's workers returned (`--workers` or the plan). On the CPU without both flags, the plan
/// first watches the CPUs for a moment to see how busy other processes keep them.
fn model_device(name: &str, threads: Option<usize>, workers: Option<usize>) -> anyhow::Result<(tch::Device, usize)> {
    Ok(cpa_stream_engine::threads::configure(name, threads, workers)?)
}

impl crate::cli::DeviceArgs {
    /// The request's compute settings, the batcher's workers planned.
    pub fn compute(&self) -> cpa_stream_pipeline::request::Compute {
        cpa_stream_pipeline::request::Compute { device: self.device.clone(), threads: self.threads, workers: None }
    }
}

impl crate::cli::ComputeArgs {
    /// The request's compute settings.
    pub fn compute(&self) -> cpa_stream_pipeline::request::Compute {
        cpa_stream_pipeline::request::Compute { workers: self.workers, ..self.device.compute() }
    }
}
