//! The negative binomial reconstruction likelihood as one autograd node (`cxx/nb_loss.cpp`): the
//! same per-cell values as [`count_log_likelihood_sparse`](super::likelihood::count_log_likelihood_sparse)
//! on a count decoder's softmax, with the gradient written out, so that a training step makes
//! about fourteen passes over cells x genes for it instead of autograd's forty. Without
//! libtorch's headers at build time ([`AVAILABLE`] false) training keeps autograd's graph.

use tch::Tensor;

use super::likelihood::Entries;

/// Whether this build has the fused likelihood.
pub const AVAILABLE: bool = cfg!(cpa_fused_nb);

#[cfg(cpa_fused_nb)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    unsafe extern "C" {
        pub fn cpa_nb_log_likelihood(
            logits: *mut c_void,
            log_library: *mut c_void,
            log_theta: *mut c_void,
            rows: *mut c_void,
            cols: *mut c_void,
            values: *mut c_void,
            eps: f64,
            ll: *mut *mut c_void,
            mu: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }
}

/// The per-cell NB log-likelihood (summed over genes; differentiable in `logits` and
/// `log_theta`) and the means `mu = softmax(logits) * exp(log_library)` (not differentiable) of
/// a count decoder's `logits` (cells x genes, float32, contiguous), the cells' `log_library`
/// (cells x 1), the per-gene `log_theta` and the counts' non-zero `entries`; `eps` where the
/// likelihood adds it (`LOG_EPS`).
pub fn nb_log_likelihood(
    logits: &Tensor,
    log_library: &Tensor,
    log_theta: &Tensor,
    entries: &Entries,
    eps: f64,
) -> Result<(Tensor, Tensor), String> {
    #[cfg(cpa_fused_nb)]
    {
        const ERROR_BYTES: usize = 1024;
        let mut err = vec![0u8; ERROR_BYTES];
        let (mut ll, mut mu) = (std::ptr::null_mut(), std::ptr::null_mut());
        let ptr = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
        // SAFETY: six live tch tensors (`at::Tensor*`), read and not kept beyond the autograd
        // node's saved copies; on success the wrapper writes two new `at::Tensor*` for the
        // caller to own; it catches every C++ exception; `err` has `ERROR_BYTES` bytes.
        let status = unsafe {
            ffi::cpa_nb_log_likelihood(
                ptr(logits),
                ptr(log_library),
                ptr(log_theta),
                ptr(&entries.rows),
                ptr(&entries.cols),
                ptr(&entries.values),
                eps,
                &mut ll,
                &mut mu,
                err.as_mut_ptr().cast(),
                ERROR_BYTES,
            )
        };
        if status != 0 || ll.is_null() || mu.is_null() {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            return Err(format!("libtorch: {}", String::from_utf8_lossy(&err[..end])));
        }
        // SAFETY: tensors the wrapper allocated for the caller to own, as tch's own functions
        // return theirs.
        Ok(unsafe { (Tensor::from_ptr(ll.cast()), Tensor::from_ptr(mu.cast())) })
    }
    #[cfg(not(cpa_fused_nb))]
    {
        let _ = (logits, log_library, log_theta, entries, eps);
        Err("this build has no fused NB likelihood (libtorch's headers were missing when it was compiled)".into())
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::model::config::LOG_EPS;
    use crate::model::likelihood::count_log_likelihood_sparse;

    /// The fused node gives the values and gradients of autograd's graph of the same likelihood,
    /// on counts with an empty cell, a huge count and mixup's fractional values, found by
    /// [`Entries::of_dense`].
    #[test]
    fn the_fused_likelihood_matches_autograds_graph() -> tch::Result<()> {
        if !AVAILABLE {
            eprintln!("skipped: this build has no fused NB likelihood (libtorch's headers were missing)");
            return Ok(());
        }
        let (cells, genes) = (5i64, 7i64);
        let counts: Vec<f32> = (0..cells * genes)
            .map(|i| match (i / genes, i % genes) {
                (1, _) => 0.0,
                (2, 3) => 90_000.0,
                (4, g) => 0.25 * g as f32,
                (c, g) if (c * 3 + g) % 4 == 0 => ((c + 2 * g) % 9) as f32,
                _ => 0.0,
            })
            .collect();
        let x = Tensor::f_from_slice(&counts)?.f_reshape([cells, genes])?;
        let entries = Entries::of_dense(&x)?;
        let logits0 =
            Tensor::f_from_slice(&(0..cells * genes).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect::<Vec<_>>())?
                .f_reshape([cells, genes])?;
        let log_theta0 = Tensor::f_from_slice(&[0.3f32, -1.2, 2.0, 0.0, -0.4, 1.1, -2.5])?;
        // A cell with no counts has library 1 (log 0), as the model's input gives it.
        let library = x.f_sum_dim_intlist(1, true, Kind::Float)?.f_clamp_min(1.0)?.f_log()?;
        let weights = Tensor::f_from_slice(&[1.0f32, -2.0, 0.5, 3.0, 1.5])?;
        let run = |fused: bool, kind: Kind| -> tch::Result<Vec<Vec<f64>>> {
            let logits = logits0.f_to_kind(kind)?.f_set_requires_grad(true)?;
            let log_theta = log_theta0.f_to_kind(kind)?.f_set_requires_grad(true)?;
            let (x, library) = (x.f_to_kind(kind)?, library.f_to_kind(kind)?);
            let entries = Entries {
                rows: entries.rows.shallow_clone(),
                cols: entries.cols.shallow_clone(),
                values: entries.values.f_to_kind(kind)?,
            };
            let ll = if fused {
                let (ll, mu) =
                    nb_log_likelihood(&logits, &library, &log_theta, &entries, LOG_EPS).map_err(tch::TchError::Kind)?;
                assert!(!mu.requires_grad());
                ll
            } else {
                let mu = logits.f_softmax(-1, kind)?.f_mul(&library.f_exp()?)?;
                count_log_likelihood_sparse(&x, &entries, &mu, &log_theta.f_exp()?, None)?
            };
            let loss = ll.f_mul(&weights.f_to_kind(kind)?)?.f_sum(kind)?;
            let g = Tensor::f_run_backward(&[&loss], &[&logits, &log_theta], false, false)?;
            [&ll, &g[0], &g[1]]
                .iter()
                .map(|t| Vec::<f64>::try_from(t.f_detach()?.f_to_kind(Kind::Double)?.f_reshape([-1])?))
                .collect()
        };
        let close = |got: &[f64], want: &[f64], rel: f64, what: &str| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= rel * (1.0 + w.abs()), "{what}: {got:?} against {want:?}");
            }
        };
        // In double precision the two are the same arithmetic; in float32 the fused node is as
        // close to it as the graph is (the 90,000 count's lgamma terms cancel to 1e-4).
        let want = run(false, Kind::Double)?;
        for (kind, rel) in [(Kind::Double, 1e-10), (Kind::Float, 2e-4)] {
            let got = run(true, kind)?;
            for (i, what) in ["values", "d/dlogits", "d/dlog_theta"].iter().enumerate() {
                close(&got[i], &want[i], rel, &format!("{kind:?} {what}"));
            }
        }
        let graph = run(false, Kind::Float)?;
        close(&graph[0], &want[0], 2e-4, "the graph in float32");
        // The entries found are the non-zero values, row by row.
        assert_eq!(entries.values.size(), [x.f_ne(0.0)?.f_sum(Kind::Int64)?.int64_value(&[])]);
        let rebuilt = Tensor::f_zeros([cells, genes], (Kind::Float, Device::Cpu))?.f_index_put(
            &[Some(entries.rows.shallow_clone()), Some(entries.cols.shallow_clone())],
            &entries.values,
            false,
        )?;
        assert!(rebuilt.f_equal(&x)?);
        Ok(())
    }
}
