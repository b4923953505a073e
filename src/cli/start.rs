//! What both binaries do as they start, before the command line is parsed: libgomp's wait
//! policy for the model commands (the allocator's thresholds: `cpa_stream_pipeline::allocator`).

use std::ffi::OsString;

// The CPUs busy elsewhere, as measured at start.
use cpa_stream_pipeline::threads::{self, BUSY_CPUS_VAR as BUSY_VAR};

/// The environment a model command's libtorch should start with, or `None` when there is
/// nothing to set.
///
/// libtorch's OpenMP runtime (libgomp) reads its wait policy once, when it is loaded, before
/// `main` runs. By default an idle OpenMP thread spins for about 300,000 rounds before it sleeps:
/// the fastest on idle cores, but on cores shared with other processes the spinning takes the
/// time the step's other threads need (a quarter of the idle throughput, measured; see
/// [`cpa_stream_pipeline::threads`]). So a model command first watches the CPUs for
/// [`threads::SAMPLE`]; the measurement is passed on in [`BUSY_VAR`] (so that the thread plan need
/// not watch again), and when at least [`threads::BUSY`] CPUs are busy elsewhere libtorch must
/// start with `OMP_WAIT_POLICY=PASSIVE`: the front sets it for the engine it starts, the engine
/// started directly executes itself again with it. Nothing is set when the user set
/// `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`, when the measurement was already made, for the commands
/// that run no model, or on a GPU (`--device cuda...`).
pub fn openmp_environment(args: &[OsString]) -> Option<OpenMpEnvironment> {
    let set = |name: &str| std::env::var_os(name).is_some();
    if set("OMP_WAIT_POLICY") || set("GOMP_SPINCOUNT") || set(BUSY_VAR) {
        return None;
    }
    let command = args.iter().find(|a| !a.to_string_lossy().starts_with('-'));
    let on_gpu = args.iter().any(|a| a.to_string_lossy().contains("cuda"));
    // The commands that run the model (the command registry's), whose OpenMP threads may need
    // to wait passively.
    let runs_model = command.and_then(|c| super::command_kind(&c.to_string_lossy())).is_some_and(|k| k.runs_model);
    if on_gpu || !runs_model {
        return None;
    }
    let busy = threads::busy_elsewhere(threads::SAMPLE);
    Some(OpenMpEnvironment { busy: format!("{busy:.2}"), passive: busy >= threads::BUSY })
}

/// What [`openmp_environment`] measured and decided.
pub struct OpenMpEnvironment {
    /// CPUs busy with other processes, for [`BUSY_VAR`].
    pub busy: String,
    /// Whether libgomp must start with `OMP_WAIT_POLICY=PASSIVE`.
    pub passive: bool,
}

impl OpenMpEnvironment {
    /// The variables to set.
    pub fn vars(&self) -> Vec<(&'static str, &str)> {
        let mut vars = vec![(BUSY_VAR, self.busy.as_str())];
        if self.passive {
            vars.push(("OMP_WAIT_POLICY", "PASSIVE"));
        }
        vars
    }
}
