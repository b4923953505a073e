//! Data-parallel training's collectives: the gradients of every optimizer step summed over the
//! ranks of a torch.distributed process group, the starting weights broadcast from rank 0, and
//! the decisions only rank 0 takes (early stopping) shared with the others.
//!
//! tch binds no process group. The group is made by torch.distributed in the same process
//! (`init_process_group`: gloo on the CPU, NCCL on CUDA, from torchrun's, Slurm's or Ray's
//! variables; `cpa_stream.train` does it) and found by its name in libtorch's registry by the
//! small C++ wrapper in `cxx/collective.cpp`, compiled against the libtorch tch links. The
//! transport is libtorch's own; nothing here moves bytes between processes.

use std::ffi::{CString, c_char, c_int};

use tch::{Device, Kind, Tensor};

use crate::torch::TorchResult;
use cpa_stream_stages::{Error, Result};

/// A failed collective: what it was doing and the transport's message.
#[derive(Debug)]
struct CollectiveError(String);

impl std::fmt::Display for CollectiveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CollectiveError {}

#[cfg(cpa_collective)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    unsafe extern "C" {
        pub fn cpa_group_rank_size(
            group: *const c_char,
            rank: *mut c_int,
            size: *mut c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn cpa_all_reduce_sum(
            group: *const c_char,
            tensor: *mut c_void,
            timeout_ms: i64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn cpa_broadcast(
            group: *const c_char,
            tensor: *mut c_void,
            root: c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn cpa_sync_batch_norm(
            group: *const c_char,
            x: *mut c_void,
            weight: *mut c_void,
            bias: *mut c_void,
            running_mean: *mut c_void,
            running_var: *mut c_void,
            cells: f64,
            momentum: f64,
            eps: f64,
            out: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }
}

/// This process's place in a process group.
#[derive(Debug)]
pub struct Collective {
    group: CString,
    rank: usize,
    world: usize,
}

const ERROR_BYTES: usize = 1024;

/// What a failed collective most often means.
const ENDED: &str = " (another rank most likely ended: its own error comes first in the launcher's output)";

impl Collective {
    /// The process group torch.distributed registered as `group` in this process (its
    /// `group_name`; the default group's is `"0"`).
    pub fn join(group: &str) -> Result<Collective> {
        let name = CString::new(group)
            .map_err(|_| Error::InvalidInput(format!("process group name {group:?} holds a NUL byte")))?;
        let (rank, world) = rank_size(&name).map_err(|e| {
            Error::InvalidInput(format!(
                "process group {group:?}: {e} (data-parallel training needs torch.distributed's process group in \
                 this process: launch through cpa_stream.train under torchrun, srun or Ray)"
            ))
        })?;
        Ok(Collective { group: name, rank, world })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Sums `t` in place over the ranks; `what` names it in an error.
    pub fn all_reduce_sum(&self, t: &Tensor, what: &str) -> Result<()> {
        self.call(what, |group, err| {
            #[cfg(cpa_collective)]
            // SAFETY: `t` is a live tch tensor (an `at::Tensor*` behind tch's C API), which the
            // wrapper reads and writes in place and does not keep; `err` has `ERROR_BYTES` bytes.
            return unsafe { ffi::cpa_all_reduce_sum(group, t.as_ptr() as *mut _, 0, err, ERROR_BYTES) };
            #[cfg(not(cpa_collective))]
            unbuilt(group, err, t)
        })
    }

    /// Replaces `t` by rank 0's in every process.
    pub fn broadcast(&self, t: &Tensor, what: &str) -> Result<()> {
        self.call(what, |group, err| {
            #[cfg(cpa_collective)]
            // SAFETY: as in `all_reduce_sum`.
            return unsafe { ffi::cpa_broadcast(group, t.as_ptr() as *mut _, 0, err, ERROR_BYTES) };
            #[cfg(not(cpa_collective))]
            unbuilt(group, err, t)
        })
    }

    /// Whether any rank says yes (rank 0's early stop, any rank's interruption).
    pub fn any(&self, yes: bool, device: Device, what: &str) -> Result<bool> {
        let t = Tensor::f_from_slice(&[f32::from(u8::from(yes))]).torch()?.f_to_device(device).torch()?;
        self.all_reduce_sum(&t, what)?;
        Ok(t.f_double_value(&[0]).torch()? > 0.0)
    }

    /// Sums the gradients of one optimizer step over the ranks and divides them by `divisor`: 1
    /// where each rank's loss is its share of the whole step's (the sum is then the gradient one
    /// process computes on the whole batch), the world size where every rank computed the
    /// same gradients (keeping the ranks' weights equal to the last bit). A parameter without a
    /// gradient here (no cell of this rank used it) counts as zero; one that no rank has a
    /// gradient for stays without one, as on one process. `params` gives the shapes. One
    /// all-reduce of one flattened buffer per call.
    pub fn average(&self, grads: &mut [Option<Tensor>], params: &[Tensor], divisor: f64, what: &str) -> Result<()> {
        let Some(first) = params.first() else { return Ok(()) };
        let (kind, device) = (first.kind(), first.device());
        let mut parts = Vec::with_capacity(grads.len() + 1);
        for (g, p) in grads.iter().zip(params) {
            parts.push(match g {
                Some(g) => g.f_reshape([-1]).torch()?,
                None => Tensor::f_zeros([p.numel() as i64], (kind, device)).torch()?,
            });
        }
        // One flag per parameter: whether this rank has its gradient.
        let flags: Vec<f32> = grads.iter().map(|g| f32::from(u8::from(g.is_some()))).collect();
        parts.push(Tensor::f_from_slice(&flags).torch()?.f_to_device(device).torch()?.f_to_kind(kind).torch()?);
        let bucket = Tensor::f_cat(&parts, 0).torch()?;
        self.all_reduce_sum(&bucket, what)?;
        let n = grads.len() as i64;
        let total = bucket.numel() as i64;
        let tail =
            Vec::<f32>::try_from(&bucket.f_narrow(0, total - n, n).torch()?.f_to_kind(Kind::Float).torch()?).torch()?;
        let mut offset = 0i64;
        for (i, (g, p)) in grads.iter_mut().zip(params).enumerate() {
            let len = p.numel() as i64;
            *g = if tail[i] > 0.0 {
                let part = bucket.f_narrow(0, offset, len).torch()?.f_view(p.size().as_slice()).torch()?;
                Some(if divisor == 1.0 { part } else { part.f_div_scalar(divisor).torch()? })
            } else {
                None
            };
            offset += len;
        }
        Ok(())
    }

    /// The rows of every rank's `t` (`rows` of them here, at `offset` of `total`), in rank
    /// order, on every rank: one all-reduce of a zeroed `total`-row tensor into which each rank
    /// writes its rows (exact: each value is added to zeros only). Not differentiable.
    pub fn gather_rows(&self, t: &Tensor, offset: i64, total: i64, what: &str) -> Result<Tensor> {
        let mut shape = t.size();
        let rows = shape.first().copied().unwrap_or(0);
        shape[0] = total;
        let all = Tensor::f_zeros(&shape, (t.kind(), t.device())).torch()?;
        tch::no_grad(|| -> std::result::Result<(), tch::TchError> {
            let mut place = all.f_narrow(0, offset, rows)?;
            place.f_copy_(&t.f_detach()?)
        })
        .torch()?;
        self.all_reduce_sum(&all, what)?;
        Ok(all)
    }

    /// Batch normalisation of this rank's rows `x` of a batch of `cells` cells over every rank,
    /// as one process normalises the whole batch (`cxx/collective.cpp`'s `SyncBatchNorm`),
    /// updating the running statistics in place.
    #[allow(clippy::too_many_arguments)]
    pub fn sync_batch_norm(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        cells: i64,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor> {
        let mut out: *mut std::ffi::c_void = std::ptr::null_mut();
        self.call("synchronised batch norm", |group, err| {
            #[cfg(cpa_collective)]
            // SAFETY: every tensor is a live tch tensor (`at::Tensor*`); the wrapper updates the
            // running statistics in place, writes a new `at::Tensor*` to `out` on success and
            // catches every C++ exception; `err` has `ERROR_BYTES` bytes.
            return unsafe {
                ffi::cpa_sync_batch_norm(
                    group,
                    x.as_ptr() as *mut _,
                    weight.as_ptr() as *mut _,
                    bias.as_ptr() as *mut _,
                    running_mean.as_ptr() as *mut _,
                    running_var.as_ptr() as *mut _,
                    cells as f64,
                    momentum,
                    eps,
                    &mut out,
                    err,
                    ERROR_BYTES,
                )
            };
            #[cfg(not(cpa_collective))]
            unbuilt(group, err, x)
        })?;
        if out.is_null() {
            return Err(Error::InvalidInput("synchronised batch norm returned no tensor".to_owned()));
        }
        // SAFETY: `out` is a tensor the wrapper allocated for the caller to own, as tch's own
        // functions return theirs.
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }

    /// Makes every rank's `params` rank 0's (the starting weights; one broadcast each).
    pub fn broadcast_all(&self, params: &[Tensor]) -> Result<()> {
        tch::no_grad(|| {
            for (i, p) in params.iter().enumerate() {
                self.broadcast(p, &format!("the starting weights (tensor {i})"))?;
            }
            Ok(())
        })
    }

    /// An error of this rank's work on `what` that names the rank; one that a collective raised
    /// (inside libtorch too: a batch norm's backward pass) says that another rank most likely
    /// ended. Errors this module made already name the rank.
    pub fn name_rank(&self, e: Error, what: &str) -> Error {
        let text = e.to_string();
        if text.contains(&self.place()) {
            return e;
        }
        let transport = ["gloo", "nccl", "NCCL", "onnection", "peer", "timed out", "Timeout", "c10d"];
        let message = if transport.iter().any(|t| text.contains(t)) { format!("{text}{ENDED}") } else { text };
        Error::torch(format!("{}: {what}", self.place()), CollectiveError(message))
    }

    fn place(&self) -> String {
        format!("rank {} of {}", self.rank, self.world)
    }

    fn call(&self, what: &str, f: impl FnOnce(*const c_char, *mut c_char) -> c_int) -> Result<()> {
        let mut err = vec![0u8; ERROR_BYTES];
        if f(self.group.as_ptr(), err.as_mut_ptr().cast()) == 0 {
            return Ok(());
        }
        let message =
            String::from_utf8_lossy(&err[..err.iter().position(|&b| b == 0).unwrap_or(err.len())]).into_owned();
        Err(Error::torch(format!("{}: {what}", self.place()), CollectiveError(format!("{}{ENDED}", message.trim()))))
    }
}

#[cfg(cpa_collective)]
fn rank_size(group: &CString) -> std::result::Result<(usize, usize), String> {
    let (mut rank, mut size) = (0 as c_int, 0 as c_int);
    let mut err = vec![0u8; ERROR_BYTES];
    // SAFETY: the pointers are to live locals and `err` has `ERROR_BYTES` bytes; the wrapper
    // catches every C++ exception and keeps nothing.
    let rc =
        unsafe { ffi::cpa_group_rank_size(group.as_ptr(), &mut rank, &mut size, err.as_mut_ptr().cast(), ERROR_BYTES) };
    if rc != 0 {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        return Err(String::from_utf8_lossy(&err[..end]).trim().to_owned());
    }
    match (usize::try_from(rank), usize::try_from(size)) {
        (Ok(r), Ok(s)) if r < s => Ok((r, s)),
        _ => Err(format!("rank {rank} of {size} is no place in a group")),
    }
}

#[cfg(not(cpa_collective))]
fn rank_size(_group: &CString) -> std::result::Result<(usize, usize), String> {
    Err("this build has no process groups (libtorch's c10d headers were absent when it was compiled)".to_owned())
}

#[cfg(not(cpa_collective))]
fn unbuilt(_group: *const c_char, _err: *mut c_char, _t: &Tensor) -> c_int {
    -1
}
