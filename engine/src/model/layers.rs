//! Building blocks of the network: linear layers, normalisation, the scvi-tools `FCLayers` stack,
//! and the source of randomness (initialisation, dropout, sampling, mixup).
//!
//! Parameters are created in a `tch` `VarStore` but initialised from this crate's own seeded
//! generator, not from libtorch's process-global one, so two models in one process (tests run in
//! parallel threads; an ETL job may hold several) do not disturb each other's streams.

use rand::Rng;
use rand_distr::{Beta, Distribution, StandardNormal};
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Device, Kind, Tensor, nn};

use super::config::{BATCH_NORM_EPS, BATCH_NORM_MOMENTUM, LAYER_NORM_EPS, Norm, Precision};
use crate::torch::TorchResult;
use cpa_stream_stages::{Error, Result};

pub(crate) use cpa_stream_stages::rng::seeded;

/// Randomness of a model: host-generated on the CPU (exactly reproducible per model), libtorch's
/// CUDA generator on a GPU (fast; reproducibility is promised on the CPU only).
pub struct Noise {
    rng: Xoshiro256PlusPlus,
    device: Device,
    /// Data-parallel training: this rank's rows of the step's whole batch, while the network
    /// runs on them ([`Noise::set_shard`]).
    shard: Option<BatchShard>,
}

/// This rank's rows of a data-parallel step's whole batch: draws for them are made for the whole
/// batch and cut to these rows (every rank draws the same stream, so a cell gets the dropout one
/// process would give it), and batch normalisation takes its statistics over every rank's rows.
#[derive(Debug, Clone)]
pub struct BatchShard {
    /// The process group.
    pub collective: std::sync::Arc<crate::collective::Collective>,
    /// The first of this rank's rows in the whole batch.
    pub offset: i64,
    /// This rank's rows.
    pub rows: i64,
    /// The whole batch's rows.
    pub total: i64,
}

impl Noise {
    /// A stream seeded by `rng`, drawing on `device`.
    pub fn new(rng: Xoshiro256PlusPlus, device: Device) -> Noise {
        Noise { rng, device, shard: None }
    }

    /// Sets (or clears) the rows of data-parallel training the network runs on; returns the
    /// previous setting.
    pub fn set_shard(&mut self, shard: Option<BatchShard>) -> Option<BatchShard> {
        std::mem::replace(&mut self.shard, shard)
    }

    /// The rows of data-parallel training the network runs on, if any.
    pub fn shard(&self) -> Option<&BatchShard> {
        self.shard.as_ref()
    }

    /// The whole batch's shape for a draw of `shape` on this rank's rows, and the rows to keep.
    fn widened(&self, shape: &[i64]) -> Option<(Vec<i64>, i64, i64)> {
        let s = self.shard.as_ref()?;
        (shape.first() == Some(&s.rows)).then(|| {
            let mut whole = shape.to_vec();
            whole[0] = s.total;
            (whole, s.offset, s.rows)
        })
    }

    /// Reseeds the stream (on CUDA also libtorch's CUDA generators).
    pub fn reseed(&mut self, rng: Xoshiro256PlusPlus) {
        self.rng = rng;
        if self.device.is_cuda() {
            tch::Cuda::manual_seed_all(self.rng.random());
        }
    }

    /// Where the draws are made.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The stream's generator as it stands (for a checkpoint taken mid-epoch).
    pub fn generator(&self) -> &Xoshiro256PlusPlus {
        &self.rng
    }

    /// Uniform [0, 1) float32 values of `shape` on the device.
    pub fn uniform(&mut self, shape: &[i64]) -> Result<Tensor> {
        if let Some((whole, offset, rows)) = self.widened(shape) {
            return self.uniform_unsharded(&whole)?.f_narrow(0, offset, rows).torch();
        }
        self.uniform_unsharded(shape)
    }

    fn uniform_unsharded(&mut self, shape: &[i64]) -> Result<Tensor> {
        if self.device.is_cuda() {
            return Tensor::f_rand(shape, (Kind::Float, self.device)).torch();
        }
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.rng.random::<f32>()).collect();
        Tensor::f_from_slice(&values).torch()?.f_reshape(shape).torch()
    }

    /// Standard normal float32 values of `shape` on the device.
    pub fn normal(&mut self, shape: &[i64]) -> Result<Tensor> {
        if let Some((whole, offset, rows)) = self.widened(shape) {
            return self.normal_unsharded(&whole)?.f_narrow(0, offset, rows).torch();
        }
        self.normal_unsharded(shape)
    }

    fn normal_unsharded(&mut self, shape: &[i64]) -> Result<Tensor> {
        if self.device.is_cuda() {
            return Tensor::f_randn(shape, (Kind::Float, self.device)).torch();
        }
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.rng.sample::<f32, _>(StandardNormal)).collect();
        Tensor::f_from_slice(&values).torch()?.f_reshape(shape).torch()
    }

    /// A uniformly random permutation of `0..n` (host generator on every device).
    pub fn permutation(&mut self, n: usize) -> Vec<i64> {
        let mut p: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            let j = self.rng.random_range(0..=i);
            p.swap(i, j);
        }
        p
    }

    /// A Beta(alpha, alpha) draw (host generator on every device).
    pub fn beta(&mut self, alpha: f64) -> Result<f64> {
        let dist = Beta::new(alpha, alpha).map_err(|e| Error::InvalidInput(format!("mixup alpha {alpha}: {e}")))?;
        Ok(dist.sample(&mut self.rng))
    }

    /// Inverted dropout: zeroes each value with probability `p` and scales the rest by 1/(1-p).
    pub fn dropout(&mut self, x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
        if !train || p == 0.0 {
            return Ok(x.shallow_clone());
        }
        let mask = self.dropout_mask(&x.size(), p)?;
        x.f_mul(&if mask.kind() == x.kind() { mask } else { mask.f_to_kind(x.kind()).torch()? }).torch()
    }

    /// Float32 values of `shape`: 1/(1-p) where a uniform draw is at least `p`, else 0 (one
    /// product a dropout layer, forward and backward, where a 0/1 mask and the scaling take
    /// two and the mask's making two more).
    fn dropout_mask(&mut self, shape: &[i64], p: f64) -> Result<Tensor> {
        if let Some((whole, offset, rows)) = self.widened(shape) {
            return self.dropout_mask_unsharded(&whole, p)?.f_narrow(0, offset, rows).torch();
        }
        self.dropout_mask_unsharded(shape, p)
    }

    fn dropout_mask_unsharded(&mut self, shape: &[i64], p: f64) -> Result<Tensor> {
        let scale = 1.0 / (1.0 - p);
        if self.device.is_cuda() {
            let keep = self.uniform_unsharded(shape)?.f_ge(p).torch()?;
            return keep.f_to_kind(Kind::Float).torch()?.f_mul_scalar_(scale).torch();
        }
        // The draws and decisions of `uniform(shape) >= p` (a float32 comparison).
        let (threshold, scale) = (p as f32, scale as f32);
        let n: i64 = shape.iter().product();
        let values: Vec<f32> =
            (0..n).map(|_| if self.rng.random::<f32>() >= threshold { scale } else { 0.0 }).collect();
        Tensor::f_from_slice(&values).torch()?.f_reshape(shape).torch()
    }
}

/// Host-side initialiser drawing PyTorch's default distributions from a seeded generator.
pub(crate) struct Init {
    rng: Xoshiro256PlusPlus,
}

impl Init {
    pub(crate) fn new(rng: Xoshiro256PlusPlus) -> Init {
        Init { rng }
    }

    pub(crate) fn uniform(&mut self, shape: &[i64], bound: f64) -> Result<Tensor> {
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| ((self.rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect();
        Tensor::f_from_slice(&values).torch()?.f_reshape(shape).torch()
    }

    pub(crate) fn normal(&mut self, shape: &[i64]) -> Result<Tensor> {
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.rng.sample::<f32, _>(StandardNormal)).collect();
        Tensor::f_from_slice(&values).torch()?.f_reshape(shape).torch()
    }
}

/// Creates a trainable variable under `path` holding `init` (moved to the store's device).
pub(crate) fn variable(path: &nn::Path, name: &str, init: Tensor) -> Result<Tensor> {
    path.f_var_copy(name, &init).torch()
}

/// Matrix product `x @ w.T + b` in the chosen precision; the result is float32.
pub(crate) fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>, precision: Precision) -> Result<Tensor> {
    match precision {
        Precision::Fp32 => Ok(x.f_linear(w, b).torch()?),
        Precision::Bf16 => {
            let bf = Kind::BFloat16;
            let b = b.map(|b| b.f_to_kind(bf)).transpose().torch()?;
            Ok(x.f_to_kind(bf)
                .torch()?
                .f_linear(&w.f_to_kind(bf).torch()?, b.as_ref())
                .torch()?
                .f_to_kind(Kind::Float)
                .torch()?)
        }
    }
}

/// `nn.Linear` with PyTorch's default initialisation (uniform in ±1/sqrt(fan_in) for weight and bias).
#[derive(Debug)]
pub struct Linear {
    /// The weight matrix, out x in.
    pub weight: Tensor,
    /// The bias.
    pub bias: Tensor,
}

impl Linear {
    pub(crate) fn new(path: &nn::Path, init: &mut Init, n_in: usize, n_out: usize) -> Result<Linear> {
        let bound = 1.0 / (n_in as f64).sqrt();
        let weight = variable(path, "weight", init.uniform(&[n_out as i64, n_in as i64], bound)?)?;
        let bias = variable(path, "bias", init.uniform(&[n_out as i64], bound)?)?;
        Ok(Linear { weight, bias })
    }

    /// `x W^T + b`, the product in `precision`.
    pub fn forward(&self, x: &Tensor, precision: Precision) -> Result<Tensor> {
        affine(x, &self.weight, Some(&self.bias), precision)
    }
}

/// BatchNorm1d (momentum 0.01, eps 1e-3), LayerNorm without affine parameters, or nothing.
#[derive(Debug)]
pub(crate) enum NormLayer {
    Batch { weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor },
    Layer { dim: i64 },
    None,
}

impl NormLayer {
    fn new(path: &nn::Path, norm: Norm, dim: usize) -> Result<NormLayer> {
        let d = dim as i64;
        Ok(match norm {
            Norm::Batch => NormLayer::Batch {
                weight: path.f_ones("weight", &[d]).torch()?,
                bias: path.f_zeros("bias", &[d]).torch()?,
                running_mean: path.f_zeros_no_train("running_mean", &[d]).torch()?,
                running_var: path.f_ones_no_train("running_var", &[d]).torch()?,
            },
            Norm::Layer => NormLayer::Layer { dim: d },
            Norm::None => NormLayer::None,
        })
    }

    fn forward(&self, x: &Tensor, train: bool, noise: &Noise) -> Result<Tensor> {
        Ok(match self {
            NormLayer::Batch { weight, bias, running_mean, running_var }
                if let (true, Some(s)) = (train, noise.shard()) =>
            {
                s.collective.sync_batch_norm(
                    x,
                    weight,
                    bias,
                    running_mean,
                    running_var,
                    s.total,
                    BATCH_NORM_MOMENTUM,
                    BATCH_NORM_EPS,
                )?
            }
            NormLayer::Batch { weight, bias, running_mean, running_var } => Tensor::f_batch_norm(
                x,
                Some(weight),
                Some(bias),
                Some(running_mean),
                Some(running_var),
                train,
                BATCH_NORM_MOMENTUM,
                BATCH_NORM_EPS,
                false,
            )
            .torch()?,
            NormLayer::Layer { dim } => {
                x.f_layer_norm([*dim], None::<&Tensor>, None::<&Tensor>, LAYER_NORM_EPS, false).torch()?
            }
            NormLayer::None => x.shallow_clone(),
        })
    }
}

/// scvi-tools' `FCLayers`: `n_layers` blocks of Linear -> norm -> ReLU -> Dropout, the first from
/// `n_in` to `n_hidden`, the others `n_hidden` wide.
#[derive(Debug)]
pub struct FcLayers {
    blocks: Vec<(Linear, NormLayer)>,
    dropout: f64,
    out_dim: usize,
}

impl FcLayers {
    pub(crate) fn new(
        path: &nn::Path,
        init: &mut Init,
        n_in: usize,
        n_hidden: usize,
        n_layers: usize,
        norm: Norm,
        dropout: f64,
    ) -> Result<FcLayers> {
        let mut blocks = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = path / format!("layer{i}");
            let input = if i == 0 { n_in } else { n_hidden };
            let linear = Linear::new(&(&p / "linear"), init, input, n_hidden)?;
            let norm = NormLayer::new(&(&p / "norm"), norm, n_hidden)?;
            blocks.push((linear, norm));
        }
        Ok(FcLayers { blocks, dropout, out_dim: n_hidden })
    }

    /// Width of the output.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The layers on `x` (dropout and batch statistics only when `train`).
    pub fn forward(&self, x: &Tensor, train: bool, precision: Precision, noise: &mut Noise) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for (linear, norm) in &self.blocks {
            h = norm.forward(&linear.forward(&h, precision)?, train, noise)?.f_relu().torch()?;
            h = noise.dropout(&h, self.dropout, train)?;
        }
        Ok(h)
    }
}

/// An MLP classifier: [`FcLayers`] then a Linear to the class logits.
#[derive(Debug)]
pub struct Classifier {
    body: FcLayers,
    head: Linear,
}

impl Classifier {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        path: &nn::Path,
        init: &mut Init,
        n_in: usize,
        n_hidden: usize,
        n_layers: usize,
        norm: Norm,
        dropout: f64,
        n_classes: usize,
    ) -> Result<Classifier> {
        let body = FcLayers::new(&(path / "body"), init, n_in, n_hidden, n_layers, norm, dropout)?;
        let head = Linear::new(&(path / "head"), init, n_hidden, n_classes)?;
        Ok(Classifier { body, head })
    }

    /// The classifier's logits for `z`.
    pub fn forward(&self, z: &Tensor, train: bool, precision: Precision, noise: &mut Noise) -> Result<Tensor> {
        self.head.forward(&self.body.forward(z, train, precision, noise)?, precision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_noise_is_reproducible_and_dropout_keeps_the_mean() -> Result<()> {
        let mut a = Noise::new(seeded(1, 2, 3), Device::Cpu);
        let mut b = Noise::new(seeded(1, 2, 3), Device::Cpu);
        let (ua, ub) = (a.uniform(&[4, 5])?, b.uniform(&[4, 5])?);
        assert!(ua.f_equal(&ub).torch()?);
        let x = Tensor::f_ones([20_000], (Kind::Float, Device::Cpu)).torch()?;
        let y = a.dropout(&x, 0.25, true)?;
        let zeros = y.f_eq(0.0).torch()?.f_sum(Kind::Float).torch()?.f_double_value(&[]).torch()?;
        assert!((zeros / 20_000.0 - 0.25).abs() < 0.02, "dropped fraction {}", zeros / 20_000.0);
        let mean = y.f_mean(Kind::Float).torch()?.f_double_value(&[]).torch()?;
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        assert!(a.dropout(&x, 0.25, false)?.f_equal(&x).torch()?);
        // The mask is the draws of `uniform` against p, scaled: the same values, bit for bit,
        // as a 0/1 mask times the input then the scale (`keep` is exact, the scale one product).
        let (mut c, mut d) = (Noise::new(seeded(4, 5, 6), Device::Cpu), Noise::new(seeded(4, 5, 6), Device::Cpu));
        let x = c.normal(&[64, 33])?;
        let _ = d.normal(&[64, 33])?;
        for p in [0.1, 0.2, 0.3, 0.5] {
            let keep = c.uniform(&[64, 33])?.f_ge(p).torch()?.f_to_kind(Kind::Float).torch()?;
            let before = x.f_mul(&keep).torch()?.f_mul_scalar(1.0 / (1.0 - p)).torch()?;
            assert!(d.dropout(&x, p, true)?.f_equal(&before).torch()?, "p {p}");
        }
        let mut p = a.permutation(100);
        p.sort_unstable();
        assert_eq!(p, (0..100).collect::<Vec<i64>>());
        Ok(())
    }
}
