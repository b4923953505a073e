//! libtorch's multi-tensor kernels for the optimizer step, which tch does not bind
//! (`cxx/optim.cpp`): the fused Adam update of a group and gradient clipping by a group's joint
//! norm. Without libtorch's headers at build time ([`AVAILABLE`] false) the callers write the
//! same arithmetic out in tensor operations.

use tch::Tensor;

/// The hyper-parameters of a fused Adam step.
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    /// Learning rate.
    pub lr: f64,
    /// First- and second-moment decay.
    pub betas: (f64, f64),
    /// Weight decay.
    pub weight_decay: f64,
    /// Epsilon.
    pub eps: f64,
    /// AdamW's decoupled weight decay instead of Adam's L2 term.
    pub decoupled: bool,
}

/// Whether this build has the fused kernels.
pub const AVAILABLE: bool = cfg!(cpa_fused);

#[cfg(cpa_fused)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    unsafe extern "C" {
        pub fn cpa_fused_adam(
            params: *const *mut c_void,
            grads: *const *mut c_void,
            exp_avgs: *const *mut c_void,
            exp_avg_sqs: *const *mut c_void,
            n: i64,
            step: *mut c_void,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            decoupled: c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn cpa_clip_grad_norm(
            grads: *const *mut c_void,
            n: i64,
            max_norm: f64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }
}

#[cfg(cpa_fused)]
const ERROR_BYTES: usize = 1024;

#[cfg(cpa_fused)]
fn pointers<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Vec<*mut std::ffi::c_void> {
    tensors.into_iter().map(|t| t.as_ptr() as *mut std::ffi::c_void).collect()
}

/// Runs one wrapper call with an error buffer; its message as the error.
#[cfg(cpa_fused)]
fn call(f: impl FnOnce(*mut std::ffi::c_char) -> std::ffi::c_int) -> Result<(), String> {
    let mut err = vec![0u8; ERROR_BYTES];
    if f(err.as_mut_ptr().cast()) == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(format!("libtorch: {}", String::from_utf8_lossy(&err[..end])))
}

/// One fused Adam step of `params` (equal lengths: the tensors that have a gradient), at the step
/// count `step` holds (float32, on the parameters' device). The gradients may be written into.
pub fn adam(
    params: &[&Tensor],
    grads: &[Tensor],
    m: &[&Tensor],
    v: &[&Tensor],
    step: &Tensor,
    h: Hyper,
) -> Result<(), String> {
    if grads.len() != params.len() || m.len() != params.len() || v.len() != params.len() {
        return Err(format!(
            "fused Adam: {} parameters, {} gradients, {} + {} moments",
            params.len(),
            grads.len(),
            m.len(),
            v.len()
        ));
    }
    #[cfg(cpa_fused)]
    {
        let (p, g, m, v) = (
            pointers(params.iter().copied()),
            pointers(grads),
            pointers(m.iter().copied()),
            pointers(v.iter().copied()),
        );
        let decoupled = std::ffi::c_int::from(h.decoupled);
        call(|err| {
            // SAFETY: four arrays of `n` live tch tensors (`at::Tensor*`) and a live step tensor;
            // the wrapper updates them in place, keeps none, and catches every C++ exception;
            // `err` has `ERROR_BYTES` bytes.
            unsafe {
                ffi::cpa_fused_adam(
                    p.as_ptr(),
                    g.as_ptr(),
                    m.as_ptr(),
                    v.as_ptr(),
                    p.len() as i64,
                    step.as_ptr() as *mut std::ffi::c_void,
                    h.lr,
                    h.betas.0,
                    h.betas.1,
                    h.weight_decay,
                    h.eps,
                    decoupled,
                    err,
                    ERROR_BYTES,
                )
            }
        })
    }
    #[cfg(not(cpa_fused))]
    {
        let _ = (step, h);
        Err("this build has no fused Adam (libtorch's headers were missing when it was compiled)".into())
    }
}

/// Scales `grads` in place so that their joint 2-norm is at most `max_norm`, with no read of the
/// norm on the host.
pub fn clip_norm(grads: &[&Tensor], max_norm: f64) -> Result<(), String> {
    #[cfg(cpa_fused)]
    {
        let g = pointers(grads.iter().copied());
        call(|err| {
            // SAFETY: an array of `n` live tch tensors, scaled in place and not kept; the wrapper
            // catches every C++ exception; `err` has `ERROR_BYTES` bytes.
            unsafe { ffi::cpa_clip_grad_norm(g.as_ptr(), g.len() as i64, max_norm, err, ERROR_BYTES) }
        })
    }
    #[cfg(not(cpa_fused))]
    {
        let _ = (grads, max_norm);
        Err("this build has no fused clipping (libtorch's headers were missing when it was compiled)".into())
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    /// Clipping scales every gradient by max / (norm + 1e-6) where the joint norm is over `max`,
    /// and leaves them alone where it is under.
    #[test]
    fn clipping_scales_by_the_joint_norm() -> Result<(), String> {
        if !AVAILABLE {
            eprintln!("skipped: this build has no fused clipping (libtorch's headers were missing)");
            return Ok(());
        }
        let t = |v: &[f32]| Tensor::from_slice(v).to_device(Device::Cpu);
        // The joint norm of (3, 4) and (12) is 13.
        for (max, want_scale) in [(1.0, 1.0 / (13.0f64 + 1e-6)), (20.0, 1.0)] {
            let grads = [t(&[3.0, 4.0]), t(&[12.0])];
            clip_norm(&[&grads[0], &grads[1]], max)?;
            let got: Vec<f64> =
                grads.iter().flat_map(|g| Vec::<f64>::try_from(g.to_kind(Kind::Double)).unwrap_or_default()).collect();
            let want: Vec<f64> = [3.0, 4.0, 12.0].iter().map(|x| x * want_scale).collect();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6 * w.abs(), "max {max}: {got:?} against {want:?}");
            }
        }
        Ok(())
    }
}
