//! Adam over plain tensors, with its moments where a checkpoint can save them (libtorch's
//! optimizers, as bound by tch, cannot export their state).
//!
//! The update is PyTorch's Adam: L2 weight decay added to the gradient (`torch.optim.Adam`, the
//! reference's choice) or decoupled (`torch.optim.AdamW`). Parameters without a gradient in a
//! step are left alone, moments included, as PyTorch does. A group's step is libtorch's fused
//! Adam kernel over all its tensors (`torch.optim.Adam(fused=True)`; `cxx/optim.cpp`): one
//! pass over each parameter, and on CUDA a few launches for the group where the update written
//! out takes eight a parameter. Builds without libtorch's headers take the written-out update,
//! which the tests hold the fused one to.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::fused;
use crate::model::config::Optimizer;
use crate::torch::TorchResult;
use cpa_stream_stages::{Error, Result};

/// Hyper-parameters of one optimizer group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamSettings {
    /// Learning rate.
    pub lr: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Epsilon.
    pub eps: f64,
    /// L2 or decoupled weight decay.
    pub kind: Optimizer,
}

/// One optimizer group: its parameters (sorted by name), first and second moments and step count.
pub struct AdamGroup {
    name: String,
    names: Vec<String>,
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: u64,
    settings: AdamSettings,
    /// The step count on the parameters' device, as the fused kernel reads it (float32).
    step_tensor: Option<Tensor>,
}

impl std::fmt::Debug for AdamGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamGroup")
            .field("name", &self.name)
            .field("params", &self.names.len())
            .field("steps", &self.steps)
            .field("settings", &self.settings)
            .finish()
    }
}

impl AdamGroup {
    /// A group over `params` (named variables).
    pub fn new(name: &str, params: Vec<(String, Tensor)>, settings: AdamSettings) -> Result<AdamGroup> {
        let mut names = Vec::with_capacity(params.len());
        let mut tensors = Vec::with_capacity(params.len());
        let (mut m, mut v) = (Vec::with_capacity(params.len()), Vec::with_capacity(params.len()));
        for (n, p) in params {
            m.push(p.f_zeros_like().torch()?.f_detach().torch()?);
            v.push(p.f_zeros_like().torch()?.f_detach().torch()?);
            names.push(n);
            tensors.push(p);
        }
        let step_tensor = match tensors.first() {
            Some(p) => Some(Tensor::f_zeros([1], (Kind::Float, p.device())).torch()?),
            None => None,
        };
        Ok(AdamGroup { name: name.to_owned(), names, params: tensors, m, v, steps: 0, settings, step_tensor })
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its parameters.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Its settings.
    pub fn settings(&self) -> &AdamSettings {
        &self.settings
    }

    /// One update with `grads` (one per parameter, `None` where a parameter got no gradient) at
    /// learning rate `lr`. The gradients are consumed: they serve as scratch space, so that the
    /// update allocates one temporary per parameter.
    pub fn step(&mut self, grads: Vec<Option<Tensor>>, lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::InvalidInput(format!(
                "optimizer group {}: {} gradients for {} parameters",
                self.name,
                grads.len(),
                self.params.len()
            )));
        }
        self.steps += 1;
        if fused::AVAILABLE { self.step_fused(grads, lr) } else { self.step_written_out(grads, lr) }
    }

    /// The update by libtorch's fused kernel, over the parameters that have a gradient.
    fn step_fused(&mut self, grads: Vec<Option<Tensor>>, lr: f64) -> Result<()> {
        let (mut params, mut with_grads, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (((p, g), mt), vt) in self.params.iter().zip(grads).zip(&self.m).zip(&self.v) {
            if let Some(g) = g {
                params.push(p);
                with_grads.push(g);
                m.push(mt);
                v.push(vt);
            }
        }
        let Some(step) = self.step_tensor.as_mut() else { return Ok(()) };
        if params.is_empty() {
            return Ok(());
        }
        let _ = step.f_fill_(self.steps as f64).torch()?;
        let s = self.settings;
        let hyper = fused::Hyper {
            lr,
            betas: (s.beta1, s.beta2),
            weight_decay: s.weight_decay,
            eps: s.eps,
            decoupled: s.kind == Optimizer::Adamw,
        };
        tch::no_grad(|| fused::adam(&params, &with_grads, &m, &v, step, hyper))
            .map_err(|e| Error::InvalidInput(format!("optimizer group {}: {e}", self.name)))
    }

    /// The update written out in tensor operations (PyTorch's single-tensor Adam).
    fn step_written_out(&mut self, grads: Vec<Option<Tensor>>, lr: f64) -> Result<()> {
        let s = self.settings;
        let t = self.steps as i32;
        let step_size = lr / (1.0 - s.beta1.powi(t));
        let bias2_sqrt = (1.0 - s.beta2.powi(t)).sqrt();
        tch::no_grad(|| -> Result<()> {
            for (((p, g), m), v) in self.params.iter().zip(grads).zip(&self.m).zip(&self.v) {
                let Some(mut g) = g else { continue };
                let (mut p, mut m, mut v) = (p.shallow_clone(), m.shallow_clone(), v.shallow_clone());
                if s.weight_decay != 0.0 {
                    match s.kind {
                        // g += wd * p
                        Optimizer::Adam => {
                            let wd = Tensor::f_scalar_tensor(s.weight_decay, (g.kind(), g.device())).torch()?;
                            let _ = g.f_addcmul_(&p, &wd).torch()?;
                        }
                        Optimizer::Adamw => {
                            let _ = p.f_mul_scalar_(1.0 - lr * s.weight_decay).torch()?;
                        }
                    }
                }
                let _ = m.f_lerp_(&g, 1.0 - s.beta1).torch()?;
                let g2 = g.shallow_clone();
                let _ = g.f_mul_(&g2).torch()?;
                let _ = v.f_lerp_(&g, 1.0 - s.beta2).torch()?;
                // p -= step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), as p += m / d with
                // d = -(sqrt(v) / sqrt(1 - beta2^t) + eps) / step_size: four passes over the
                // parameter where the formula written out takes seven. A learning rate of 0
                // moves nothing (and would divide by it).
                if step_size == 0.0 {
                    continue;
                }
                let mut denom = v.f_sqrt().torch()?;
                let _ = denom.f_mul_scalar_(-1.0 / (bias2_sqrt * step_size)).torch()?;
                let _ = denom.f_add_scalar_(-s.eps / step_size).torch()?;
                let _ = p.f_addcdiv_(&m, &denom).torch()?;
            }
            Ok(())
        })
    }

    /// The moments as named tensors (`GROUP.m.PARAM`, `GROUP.v.PARAM`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for ((n, m), v) in self.names.iter().zip(&self.m).zip(&self.v) {
            out.push((format!("{}.m.{n}", self.name), m.shallow_clone()));
            out.push((format!("{}.v.{n}", self.name), v.shallow_clone()));
        }
        out
    }

    /// Restores the moments and step count saved by [`state_tensors`](Self::state_tensors).
    pub fn load_state(&mut self, saved: &HashMap<String, Tensor>, steps: u64, origin: &str) -> Result<()> {
        for ((n, m), v) in self.names.iter().zip(&self.m).zip(&self.v) {
            for (key, dst) in [(format!("{}.m.{n}", self.name), m), (format!("{}.v.{n}", self.name), v)] {
                let src = saved
                    .get(&key)
                    .ok_or_else(|| Error::InvalidInput(format!("{origin}: optimizer moment {key} is missing")))?;
                crate::model::files::checked_copy(dst, src, origin, &key)?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    /// Adam by hand on one scalar, for two steps, against the group's update.
    #[test]
    fn adam_matches_the_update_rule() -> Result<()> {
        for kind in [Optimizer::Adam, Optimizer::Adamw] {
            let p = Tensor::f_from_slice(&[1.0f64]).torch()?.f_set_requires_grad(true).torch()?;
            let settings = AdamSettings { lr: 0.1, weight_decay: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, kind };
            let mut group = AdamGroup::new("g", vec![("p".into(), p.shallow_clone())], settings)?;
            let (mut x, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
            for (t, grad) in [(1, 0.5f64), (2, -0.25)] {
                group.step(vec![Some(Tensor::f_from_slice(&[grad]).torch()?)], 0.1)?;
                let mut g = grad;
                if kind == Optimizer::Adam {
                    g += 0.01 * x;
                } else {
                    x *= 1.0 - 0.1 * 0.01;
                }
                m = 0.9 * m + 0.1 * g;
                v = 0.999 * v + 0.001 * g * g;
                let (mh, vh) = (m / (1.0 - 0.9f64.powi(t)), v / (1.0 - 0.999f64.powi(t)));
                x -= 0.1 * mh / (vh.sqrt() + 1e-8);
                let got = p
                    .f_to_kind(Kind::Double)
                    .torch()?
                    .f_to_device(Device::Cpu)
                    .torch()?
                    .f_double_value(&[0])
                    .torch()?;
                assert!((got - x).abs() < 1e-12, "{kind:?} step {t}: {got} vs {x}");
            }
            // A step without a gradient leaves the parameter alone.
            let before = p.f_double_value(&[0]).torch()?;
            group.step(vec![None], 0.1)?;
            assert_eq!(p.f_double_value(&[0]).torch()?, before);
        }
        Ok(())
    }

    /// The fused kernel's update is the written-out one's, to float rounding, over several steps
    /// of tensors of several shapes: a transposed (non-contiguous) gradient, a parameter without
    /// a gradient in one step (left alone, moments included), both kinds of weight decay.
    #[test]
    fn the_fused_step_is_the_written_out_one() -> Result<()> {
        if !fused::AVAILABLE {
            eprintln!("skipped: this build has no fused Adam (libtorch's headers were missing)");
            return Ok(());
        }
        tch::manual_seed(7);
        let shapes: [&[i64]; 3] = [&[16, 8], &[8], &[3, 5]];
        for kind in [Optimizer::Adam, Optimizer::Adamw] {
            let settings = AdamSettings { lr: 0.01, weight_decay: 0.05, beta1: 0.9, beta2: 0.999, eps: 1e-8, kind };
            let start: Vec<Tensor> = shapes
                .iter()
                .map(|s| Tensor::f_randn(*s, (Kind::Float, Device::Cpu)))
                .collect::<std::result::Result<_, _>>()
                .torch()?;
            let named = |ts: &[Tensor]| -> Result<Vec<(String, Tensor)>> {
                ts.iter().enumerate().map(|(i, t)| Ok((format!("p{i}"), t.f_detach_copy().torch()?))).collect()
            };
            let mut fused_group = AdamGroup::new("f", named(&start)?, settings)?;
            let mut written = AdamGroup::new("w", named(&start)?, settings)?;
            for step in 0..6 {
                let grads: Vec<Tensor> = shapes
                    .iter()
                    .map(|s| Tensor::f_randn(*s, (Kind::Float, Device::Cpu)))
                    .collect::<std::result::Result<_, _>>()
                    .torch()?;
                let as_given = |copy: bool| -> Result<Vec<Option<Tensor>>> {
                    grads
                        .iter()
                        .enumerate()
                        .map(|(i, g)| {
                            // The second parameter has no gradient in step 3; the first's
                            // gradient is a transposed view on the fused side.
                            if i == 1 && step == 3 {
                                return Ok(None);
                            }
                            let g = g.f_detach_copy().torch()?;
                            Ok(Some(if i == 0 && copy { g.f_t_copy().torch()?.f_t_().torch()? } else { g }))
                        })
                        .collect()
                };
                fused_group.steps += 1;
                fused_group.step_fused(as_given(true)?, settings.lr)?;
                written.steps += 1;
                written.step_written_out(as_given(false)?, settings.lr)?;
            }
            for (name, (a, b)) in ["param", "m", "v"].iter().zip([
                (&fused_group.params, &written.params),
                (&fused_group.m, &written.m),
                (&fused_group.v, &written.v),
            ]) {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    let scale = y.f_abs().torch()?.f_max().torch()?.f_double_value(&[]).torch()?.max(1e-30);
                    let diff = x.f_sub(y).torch()?.f_abs().torch()?.f_max().torch()?.f_double_value(&[]).torch()?;
                    assert!(diff <= 1e-5 * scale, "{kind:?} {name} {i}: largest difference {diff} of {scale}");
                }
            }
        }
        Ok(())
    }
}
