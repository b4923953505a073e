//! An exponential moving average of the autoencoder's and dosers' weights
//! (`training.ema_decay`): after every optimizer step `shadow = d * shadow + (1 - d) * weight`,
//! with `d = min(decay, (1 + n) / (10 + n))` after `n` earlier updates, so that the first steps,
//! far from where training settles, weigh little for long. The adversary is not averaged: it is
//! not used to predict.
//!
//! The averaged weights are what the run validates, keeps as `best/` and publishes as `model/`;
//! training itself goes on from the live ones. [`Averaged::swap`] exchanges the two in place
//! (no model copy), so anything that reads the model sees the averaged weights between two swaps.

use std::collections::HashMap;

use tch::Tensor;

use cpa_stream_stages::{Error, Result};

use crate::torch::TorchResult;

/// Prefix of the averaged weights in a checkpoint's optimizer file.
const PREFIX: &str = "ema.";

/// The shadow weights of one trainer.
pub(crate) struct Averaged {
    decay: f64,
    /// Names of the averaged weights (group-prefixed, as the optimizer file names them).
    names: Vec<String>,
    /// The live weights (shallow handles to the model's variables).
    live: Vec<Tensor>,
    shadow: Vec<Tensor>,
    /// Whether `live` holds the averaged weights just now (between two swaps).
    swapped: bool,
}

impl Averaged {
    /// Shadows equal to the weights `live` (named `names`), averaged with `decay` in (0, 1).
    pub(crate) fn new(decay: f64, names: Vec<String>, live: Vec<Tensor>) -> Result<Averaged> {
        let shadow = tch::no_grad(|| live.iter().map(|t| t.f_detach_copy()).collect::<Result<Vec<_>, _>>()).torch()?;
        Ok(Averaged { decay, names, live, shadow, swapped: false })
    }

    /// The decay of the `n`-th update (0-based).
    pub(crate) fn decay_at(&self, n: u64) -> f64 {
        self.decay.min((1.0 + n as f64) / (10.0 + n as f64))
    }

    /// Moves the shadows towards the live weights after an optimizer step; `n` counts the updates
    /// before this one.
    pub(crate) fn update(&mut self, n: u64) -> Result<()> {
        debug_assert!(!self.swapped, "the averaged weights are in the model");
        let d = self.decay_at(n);
        tch::no_grad(|| -> Result<()> {
            for (shadow, live) in self.shadow.iter_mut().zip(&self.live) {
                // shadow += (1 - d) * (live - shadow)
                let _ = shadow.f_lerp_(live, 1.0 - d).torch()?;
            }
            Ok(())
        })
    }

    /// Exchanges the model's weights and the shadows: the first call puts the averaged weights
    /// into the model, the second puts the live ones back.
    pub(crate) fn swap(&mut self) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (shadow, live) in self.shadow.iter_mut().zip(&self.live) {
                let kept = live.f_detach_copy().torch()?;
                let mut live = live.shallow_clone();
                live.f_copy_(shadow).torch()?;
                shadow.f_copy_(&kept).torch()?;
            }
            Ok(())
        })?;
        self.swapped = !self.swapped;
        Ok(())
    }

    /// The shadows (data-parallel training broadcasts rank 0's).
    pub(crate) fn shadows(&self) -> &[Tensor] {
        &self.shadow
    }

    /// The shadows under their checkpoint names.
    pub(crate) fn state_tensors(&self) -> Vec<(String, Tensor)> {
        debug_assert!(!self.swapped, "the averaged weights are in the model");
        self.names.iter().zip(&self.shadow).map(|(n, t)| (format!("{PREFIX}{n}"), t.shallow_clone())).collect()
    }

    /// Loads the shadows from a checkpoint's tensors; `origin` names the file in errors.
    pub(crate) fn load_state(&mut self, saved: &HashMap<String, Tensor>, origin: &str) -> Result<()> {
        for (name, shadow) in self.names.iter().zip(&mut self.shadow) {
            let key = format!("{PREFIX}{name}");
            let src = saved.get(&key).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{origin}: averaged weight {key} is missing (was the checkpoint written with \
                     training.ema_decay = 0?)"
                ))
            })?;
            if src.size() != shadow.size() {
                return Err(Error::InvalidInput(format!(
                    "{origin}: averaged weight {key} has shape {:?}, expected {:?}",
                    src.size(),
                    shadow.size()
                )));
            }
            tch::no_grad(|| shadow.f_copy_(src)).torch()?;
        }
        Ok(())
    }
}
