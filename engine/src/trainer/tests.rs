//! Tests of the model and trainer on small hand-built data (CPU).

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Device, Kind, Tensor};

use super::*;
use crate::model::config::{DoserType, Norm, Precision, ReconLoss};
use crate::model::vocab::{Covariate, Vocabulary, parse_condition};
use crate::model::{CpaModel, DeviceBatch, HostBatch};
use crate::torch::TorchResult;

const GENES: usize = 24;

fn vocab() -> Result<Vocabulary> {
    let covariates = vec![
        Covariate { name: "cell_type".into(), categories: vec!["t1".into(), "t2".into()], is_batch: false },
        Covariate { name: "donor".into(), categories: vec!["d1".into(), "d2".into(), "d3".into()], is_batch: true },
    ];
    Vocabulary::new(
        (0..GENES).map(|g| format!("gene{g}")).collect(),
        "ctrl",
        ["A", "B", "C", "ctrl"].map(String::from),
        covariates,
        vec![("ctrl".into(), 40), ("A".into(), 20), ("A+B".into(), 20), ("B".into(), 10), ("C".into(), 10)],
    )
}

fn small_config() -> CpaConfig {
    let mut c = CpaConfig::default();
    c.model.n_latent = 8;
    c.model.n_hidden_encoder = 16;
    c.model.n_hidden_decoder = 16;
    c.model.n_layers_encoder = 2;
    c.model.n_layers_decoder = 2;
    c.model.n_hidden_doser = 4;
    c.adversary.n_hidden = 8;
    c.adversary.n_layers = 2;
    c.training.batch_size = 16;
    c.training.seed = 7;
    c
}

const CONDITIONS: [(&str, &str); 6] =
    [("ctrl", "1"), ("A", "0.5"), ("A+B", "0.1+1"), ("B+A", "1+0.1"), ("B", "2"), ("C", "0.3")];

/// A batch of `n` cells with random counts (some cells all zero) and labels, from `seed`.
fn batch(v: &Vocabulary, n: usize, seed: u64) -> Result<HostBatch> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let (perts, classes) = (v.perturbation_index(), v.condition_index());
    let mut b = HostBatch::new(GENES as u32, v.covariates.len());
    for cell in 0..n {
        let (cond, dose) = CONDITIONS[rng.random_range(0..CONDITIONS.len())];
        let parsed = parse_condition(cond, Some(dose), 2, &perts, &classes).map_err(Error::InvalidInput)?;
        let (mut idx, mut val) = (Vec::new(), Vec::new());
        if cell % 7 != 3 {
            for g in 0..GENES as u32 {
                if rng.random::<f64>() < 0.4 {
                    idx.push(g);
                    val.push(rng.random_range(1..40) as f32);
                }
            }
        }
        b.counts.push_row(&idx, &val);
        b.push_labels(&parsed.parts, &[rng.random_range(0..2), rng.random_range(0..3)], parsed.class);
    }
    b.check(v)?;
    Ok(b)
}

fn train(trainer: &mut Trainer, batches: &[HostBatch], epochs: u32) -> Result<Vec<EpochMetrics>> {
    let mut out = Vec::new();
    for _ in 0..epochs {
        for b in batches {
            trainer.step(b)?;
        }
        out.push(trainer.end_epoch()?);
    }
    Ok(out)
}

fn weights(model: &CpaModel) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn same_weights(a: &CpaModel, b: &CpaModel) -> Result<bool> {
    let (wa, wb) = (weights(a), weights(b));
    if wa.len() != wb.len() {
        return Ok(false);
    }
    for ((na, ta), (nb, tb)) in wa.iter().zip(&wb) {
        if na != nb || !ta.f_equal(tb).torch()? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.f_to_kind(Kind::Double).torch()?.f_double_value(&[]).torch()
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Vec::<f64>::try_from(&t.f_to_kind(Kind::Double).torch()?.f_flatten(0, -1).torch()?).torch()
}

#[test]
fn a_model_is_not_built_with_the_dose_response_left_to_the_data() -> Result<()> {
    let mut config = small_config();
    config.model.doser_type = DoserType::Auto;
    let err = CpaModel::new(&config, &vocab()?, None, Device::Cpu, 1).err().map(|e| e.to_string());
    assert!(err.as_deref().is_some_and(|e| e.contains("\"auto\" is chosen")), "{err:?}");
    Ok(())
}

#[test]
fn dose_responses_follow_their_formulas() -> Result<()> {
    let v = vocab()?;
    let doses = [0.0f32, 0.1, 1.0, 10.0];
    let ids = Tensor::f_from_slice(&[2i64, 2, 3, 4]).torch()?;
    let d = Tensor::f_from_slice(&doses).torch()?;
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    for doser in [DoserType::Logsigm, DoserType::Sigm, DoserType::Linear, DoserType::Mlp] {
        let mut config = small_config();
        config.model.doser_type = doser;
        let model = CpaModel::new(&config, &v, None, Device::Cpu, 1)?;
        let vars = model.var_store().variables();
        if let (Some(beta), Some(bias)) = (vars.get("doser.beta"), vars.get("doser.bias")) {
            let (mut beta, mut bias) = (beta.shallow_clone(), bias.shallow_clone());
            tch::no_grad(|| -> Result<()> {
                beta.f_copy_(&Tensor::f_from_slice(&[1.0f32, 1.0, 2.0, 0.5, -1.0]).torch()?).torch()?;
                bias.f_copy_(&Tensor::f_from_slice(&[0.0f32, 0.0, -1.0, 0.3, 0.2]).torch()?).torch()?;
                Ok(())
            })?;
        }
        let got = values(&model.dose_response(&ids, &d)?)?;
        let (beta, bias) = ([1.0, 1.0, 2.0, 0.5, -1.0], [0.0, 0.0, -1.0, 0.3, 0.2]);
        for (i, (&id, &dose)) in [2usize, 2, 3, 4].iter().zip(&doses).enumerate() {
            let dose = f64::from(dose);
            let want = match doser {
                DoserType::Logsigm => sigmoid(dose.ln_1p() * beta[id] + bias[id]) - sigmoid(bias[id]),
                DoserType::Sigm => sigmoid(dose * beta[id] + bias[id]) - sigmoid(bias[id]),
                DoserType::Linear => dose,
                DoserType::Mlp => {
                    let row = |name: &str| -> Result<Vec<f64>> {
                        let t = vars.get(name).ok_or_else(|| Error::InvalidInput(name.into()))?;
                        values(&t.f_get(id as i64).torch()?)
                    };
                    let (w_in, b_in, w_out, b_out) =
                        (row("doser.w_in")?, row("doser.b_in")?, row("doser.w_out")?, row("doser.b_out")?);
                    let h: f64 =
                        w_in.iter().zip(&b_in).zip(&w_out).map(|((w, b), o)| (dose * w + b).max(0.0) * o).sum();
                    if dose > 0.0 { sigmoid(h + b_out[0]) } else { 0.0 }
                }
                DoserType::Auto => unreachable!("not among the dose responses built here"),
            };
            assert!((got[i] - want).abs() < 1e-6, "{doser:?} entry {i}: {} vs {want}", got[i]);
        }
    }
    Ok(())
}

#[test]
fn embedding_bag_equals_dense_and_order_does_not_matter() -> Result<()> {
    let v = vocab()?;
    let model = CpaModel::new(&small_config(), &v, None, Device::Cpu, 3)?;
    let (perts, classes) = (v.perturbation_index(), v.condition_index());
    let mut b = HostBatch::new(GENES as u32, 2);
    for (cond, dose) in [("A+B", "0.1+1"), ("B+A", "1+0.1"), ("ctrl", "1"), ("C", "0.3"), ("A+B", "1+0.1")] {
        let p = parse_condition(cond, Some(dose), 2, &perts, &classes).map_err(Error::InvalidInput)?;
        b.counts.push_row(&[0], &[1.0]);
        b.push_labels(&p.parts, &[0, 0], p.class);
    }
    let d = DeviceBatch::upload(&b, Device::Cpu)?;
    let bag = model.perturbation_latent(&d.perts)?;
    let dense = model.perturbation_latent_dense(&d.perts, d.n_cells)?;
    assert!(bag.f_allclose(&dense, 1e-6, 1e-6, false).torch()?, "embedding_bag and dense paths differ");
    let row = |i: i64| bag.f_get(i);
    assert!(
        row(0).torch()?.f_equal(&row(1).torch()?).torch()?
            || row(0).torch()?.f_allclose(&row(1).torch()?, 1e-7, 1e-7, false).torch()?,
        "A+B != B+A"
    );
    // The doses follow their drug: swapping them changes the latent.
    assert!(
        !row(0).torch()?.f_allclose(&row(4).torch()?, 1e-4, 1e-4, false).torch()?,
        "doses were not paired with their perturbations"
    );
    // The control has its own embedding, scaled by its dose.
    assert!(scalar(&row(2).torch()?.f_abs().torch()?.f_sum(Kind::Float).torch()?)? > 0.0);
    Ok(())
}

#[test]
fn gradient_penalty_matches_finite_differences() -> Result<()> {
    let v = vocab()?;
    let mut config = small_config();
    config.adversary.norm = Norm::Layer;
    let mut model = CpaModel::new(&config, &v, None, Device::Cpu, 5)?;
    model.var_store_mut().set_kind(Kind::Double);
    let mut noise = Noise::new(seeded(1, 1, 1), Device::Cpu);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
    let (n, l) = (6i64, 8i64);
    let z0: Vec<f64> = (0..n * l).map(|_| rng.random_range(-1.0..1.0)).collect();
    let z = Tensor::f_from_slice(&z0).torch()?.f_reshape([n, l]).torch()?.f_set_requires_grad(true).torch()?;
    let logits = model.classify_perturbation(&z, false, &mut noise)?;
    let penalty = gradient_penalty(&logits, &z)?;

    // (a) the penalty is the mean squared gradient of the summed logits: central differences.
    let sum_logits = |zv: &[f64], model: &CpaModel, noise: &mut Noise| -> Result<f64> {
        let z = Tensor::f_from_slice(zv).torch()?.f_reshape([n, l]).torch()?;
        scalar(&model.classify_perturbation(&z, false, noise)?.f_sum(Kind::Double).torch()?)
    };
    let eps = 1e-6;
    let mut squares = 0.0;
    for i in 0..z0.len() {
        let (mut up, mut down) = (z0.clone(), z0.clone());
        up[i] += eps;
        down[i] -= eps;
        let g = (sum_logits(&up, &model, &mut noise)? - sum_logits(&down, &model, &mut noise)?) / (2.0 * eps);
        squares += g * g;
    }
    let fd_penalty = squares / z0.len() as f64;
    let p = scalar(&penalty)?;
    assert!((p - fd_penalty).abs() < 1e-6 * (1.0 + fd_penalty), "penalty {p} vs finite differences {fd_penalty}");

    // (b) its gradient with respect to a classifier weight (double backward) against central
    // differences of the penalty in that weight.
    let name = "adv.perturbation.head.weight";
    let vars = model.var_store().variables();
    let w = vars.get(name).ok_or_else(|| Error::InvalidInput(name.into()))?.shallow_clone();
    let grads = Tensor::f_run_backward(&[&penalty], &[&w], false, false).torch()?;
    let analytic = values(&grads[0])?;
    let penalty_at = |model: &CpaModel, noise: &mut Noise| -> Result<f64> {
        let z = Tensor::f_from_slice(&z0).torch()?.f_reshape([n, l]).torch()?.f_set_requires_grad(true).torch()?;
        scalar(&gradient_penalty(&model.classify_perturbation(&z, false, noise)?, &z)?)
    };
    for k in [0i64, 3, 11] {
        let original = scalar(&w.f_view(-1).torch()?.f_get(k).torch()?)?;
        let set = |value: f64| -> Result<()> {
            let flat = w.f_view(-1).torch()?;
            tch::no_grad(|| flat.f_get(k)?.f_fill_(value).map(|_| ())).torch()?;
            Ok(())
        };
        set(original + eps)?;
        let up = penalty_at(&model, &mut noise)?;
        set(original - eps)?;
        let down = penalty_at(&model, &mut noise)?;
        set(original)?;
        let fd = (up - down) / (2.0 * eps);
        let a = analytic[k as usize];
        assert!((a - fd).abs() < 1e-5 * (1.0 + fd.abs()), "d penalty / d {name}[{k}]: {a} vs {fd}");
    }
    Ok(())
}

/// A configuration that exercises every random and scheduled part of training.
fn busy_config(seed: u64) -> CpaConfig {
    let mut c = small_config();
    c.training.seed = seed;
    c.model.variational = true;
    c.model.recon_loss = ReconLoss::Zinb;
    c.model.dropout_rate_encoder = 0.1;
    c.training.mixup_alpha = 0.4;
    c.training.n_epochs_pretrain_ae = 1;
    c.training.n_epochs_adv_warmup = 2;
    c.training.n_epochs_kl_warmup = 2;
    c.training.accumulate_batches = 2;
    c.training.do_clip_grad = true;
    c.training.step_size_lr = 1;
    c.adversary.loss = AdvLoss::Focal;
    c
}

#[test]
fn same_seed_gives_the_same_weights() -> Result<()> {
    let v = vocab()?;
    let batches: Vec<HostBatch> = (0..5).map(|i| batch(&v, 16, i)).collect::<Result<_>>()?;
    let run = |seed: u64| -> Result<Trainer> {
        let mut t = Trainer::from_config(&busy_config(seed), &v, Device::Cpu)?;
        train(&mut t, &batches, 3)?;
        Ok(t)
    };
    let (a, b, c) = (run(11)?, run(11)?, run(12)?);
    assert!(same_weights(a.model(), b.model())?, "same seed, different weights");
    assert!(!same_weights(a.model(), c.model())?, "different seeds, same weights");
    assert_eq!(a.state(), b.state());
    Ok(())
}

#[test]
fn resume_equals_an_uninterrupted_run() -> Result<()> {
    let v = vocab()?;
    let batches: Vec<HostBatch> = (0..7).map(|i| batch(&v, 16, 100 + i)).collect::<Result<_>>()?;
    let config = busy_config(3);
    let mut straight = Trainer::from_config(&config, &v, Device::Cpu)?;
    let straight_metrics = train(&mut straight, &batches, 4)?;

    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let ckpt = dir.path().join("checkpoint");
    let mut first = Trainer::from_config(&config, &v, Device::Cpu)?;
    train(&mut first, &batches, 2)?;
    first.save_checkpoint(&ckpt)?;
    drop(first);
    let mut resumed = Trainer::resume(&ckpt, Device::Cpu)?;
    assert_eq!(resumed.state().epoch, 2);
    let resumed_metrics = train(&mut resumed, &batches, 2)?;
    assert!(same_weights(straight.model(), resumed.model())?, "resumed weights differ from the uninterrupted run");
    assert_eq!(resumed_metrics, straight_metrics[2..]);
    assert_eq!(straight.state().global_step, resumed.state().global_step);
    // A checkpoint is refused while gradients accumulate (2 batches per step here).
    resumed.step(&batches[0])?;
    assert!(!resumed.can_checkpoint());
    assert!(resumed.save_checkpoint(&ckpt).is_err());
    Ok(())
}

#[test]
fn a_checkpoint_within_an_epoch_resumes_exactly() -> Result<()> {
    let v = vocab()?;
    let batches: Vec<HostBatch> = (0..7).map(|i| batch(&v, 16, 200 + i)).collect::<Result<_>>()?;
    // Mixup, dropout, sampling, accumulation over 2 batches and the adversary alternation all
    // depend on the position within the epoch.
    let config = busy_config(5);
    let mut straight = Trainer::from_config(&config, &v, Device::Cpu)?;
    let straight_metrics = train(&mut straight, &batches, 3)?;

    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let ckpt = dir.path().join("checkpoint");
    let mut first = Trainer::from_config(&config, &v, Device::Cpu)?;
    train(&mut first, &batches, 1)?;
    for b in &batches[..4] {
        first.step(b)?;
    }
    assert!(first.can_checkpoint());
    first.save_checkpoint(&ckpt)?;
    drop(first);
    let mut resumed = Trainer::resume(&ckpt, Device::Cpu)?;
    assert_eq!((resumed.state().epoch, resumed.batches_in_epoch()), (1, 4));
    for b in &batches[4..] {
        resumed.step(b)?;
    }
    let mut resumed_metrics = vec![resumed.end_epoch()?];
    resumed_metrics.extend(train(&mut resumed, &batches, 1)?);
    assert!(same_weights(straight.model(), resumed.model())?, "resumed weights differ from the uninterrupted run");
    assert_eq!(resumed_metrics, straight_metrics[1..]);
    let position = |t: &Trainer| (t.state().epoch, t.state().global_step, t.state().cells_seen);
    assert_eq!(position(&resumed), position(&straight));
    Ok(())
}

/// Fills a `perturbation_skip` model's skip weights with draws of N(0, 1) (they start at zero).
fn randomize_skip(model: &CpaModel) -> Result<()> {
    let mut w = model.var_store().variables().remove(SKIP_WEIGHTS).expect("the skip's weights");
    tch::no_grad(|| w.f_copy_(&Tensor::f_randn(w.size(), (Kind::Float, Device::Cpu))?)).torch()?;
    Ok(())
}

const SKIP_WEIGHTS: &str = "ae.decoder.perturbation_skip";

#[test]
fn the_perturbation_skip_starts_at_zero_and_moves_the_mean_by_its_map_of_z_pert() -> Result<()> {
    let v = vocab()?;
    let b = batch(&v, 16, 9)?;
    let d = DeviceBatch::upload(&b, Device::Cpu)?;
    let mut c = small_config();
    c.model.recon_loss = ReconLoss::Gauss;
    let plain = CpaModel::new(&c, &v, None, Device::Cpu, 11)?;
    c.model.perturbation_skip = true;
    let skipping = CpaModel::new(&c, &v, None, Device::Cpu, 11)?;
    assert!(!plain.var_store().variables().contains_key(SKIP_WEIGHTS));
    assert_eq!(skipping.n_parameters() - plain.n_parameters(), (v.n_genes() * c.model.n_latent) as i64);
    let means = |model: &CpaModel| -> Result<Tensor> {
        tch::no_grad(|| {
            let mut noise = Noise::new(Xoshiro256PlusPlus::seed_from_u64(1), Device::Cpu);
            model.counterfactual(&d.x, &d.perts, &d.covariates, &mut noise)
        })
    };
    // Zero at the start, drawn from the same seed otherwise: the same predictions as without it.
    assert!(means(&plain)?.f_equal(&means(&skipping)?).torch()?, "a new skip changed the prediction");
    randomize_skip(&skipping)?;
    let w = skipping.var_store().variables()[SKIP_WEIGHTS].shallow_clone();
    let z_pert = tch::no_grad(|| skipping.perturbation_latent(&d.perts))?;
    let shift = z_pert.f_matmul(&w.f_tr().torch()?).torch()?;
    let moved = means(&skipping)?.f_sub(&means(&plain)?).torch()?;
    let error = f64::try_from(moved.f_sub(&shift).torch()?.f_abs().torch()?.f_max().torch()?).torch()?;
    assert!(error < 1e-4, "the Gaussian mean moved by W z_pert up to {error}");
    assert!(f64::try_from(shift.f_abs().torch()?.f_max().torch()?).torch()? > 0.1, "the batch has no perturbation");
    Ok(())
}

#[test]
fn the_mean_only_decoder_equals_the_full_decoder() -> Result<()> {
    let v = vocab()?;
    let b = batch(&v, 16, 9)?;
    let d = DeviceBatch::upload(&b, Device::Cpu)?;
    for (loss, precision, skip) in [
        (ReconLoss::Nb, Precision::Fp32, false),
        (ReconLoss::Zinb, Precision::Bf16, false),
        (ReconLoss::Gauss, Precision::Fp32, false),
        (ReconLoss::Nb, Precision::Fp32, true),
        (ReconLoss::Gauss, Precision::Bf16, true),
    ] {
        let mut c = small_config();
        c.model.recon_loss = loss;
        c.training.precision = precision;
        c.model.perturbation_skip = skip;
        let model = CpaModel::new(&c, &v, None, Device::Cpu, 11)?;
        if skip {
            randomize_skip(&model)?;
        }
        tch::no_grad(|| -> Result<()> {
            let (x_in, library) = model.input(&d.x)?;
            let mut noise = Noise::new(Xoshiro256PlusPlus::seed_from_u64(1), Device::Cpu);
            let z = model.encode(&x_in, false, false, &mut noise)?.z_basal;
            let z_pert = model.perturbation_latent(&d.perts)?;
            let z = z.f_add(&z_pert).torch()?;
            let full = model
                .decode(&z, &z_pert, library.as_ref(), false, &mut noise)?
                .mean()
                .f_to_kind(Kind::Float)
                .torch()?;
            let mean = model.decode_mean(&z, &z_pert, library.as_ref(), &mut noise)?;
            assert_eq!(mean.kind(), Kind::Float, "{loss:?}");
            assert!(mean.f_equal(&full).torch()?, "{loss:?} {precision:?}: decode_mean differs from decode().mean()");
            Ok(())
        })?;
    }
    Ok(())
}

#[test]
fn every_likelihood_doser_and_norm_trains_to_finite_losses() -> Result<()> {
    let v = vocab()?;
    let batches: Vec<HostBatch> = (0..3).map(|i| batch(&v, 16, 50 + i)).collect::<Result<_>>()?;
    let combos = [
        (ReconLoss::Nb, DoserType::Logsigm, Norm::Batch, Precision::Fp32),
        (ReconLoss::Zinb, DoserType::Sigm, Norm::Layer, Precision::Fp32),
        (ReconLoss::Gauss, DoserType::Linear, Norm::None, Precision::Fp32),
        (ReconLoss::Nb, DoserType::Mlp, Norm::Batch, Precision::Bf16),
    ];
    for (loss, doser, norm, precision) in combos {
        let mut c = small_config();
        c.model.recon_loss = loss;
        c.model.doser_type = doser;
        c.model.n_layers_doser = 3;
        c.model.norm_encoder = norm;
        c.model.norm_decoder = norm;
        c.adversary.adv_steps = 0;
        c.training.precision = precision;
        let mut t = Trainer::from_config(&c, &v, Device::Cpu)?;
        let m = train(&mut t, &batches, 2)?;
        for e in &m {
            assert!(
                e.recon_loss.is_finite() && e.adv_loss.is_finite() && e.penalty_adv.is_finite(),
                "{loss:?} {doser:?}: {e:?}"
            );
        }
        assert_eq!(m[1].autoencoder_batches, 3);
        assert_eq!(m[1].adversary_batches, 3);
    }
    Ok(())
}

#[test]
fn the_schedule_follows_the_reference() -> Result<()> {
    let v = vocab()?;
    let mut c = small_config();
    c.training.n_epochs_pretrain_ae = 1;
    c.training.n_epochs_adv_warmup = 4;
    c.training.step_size_lr = 2;
    (c.adversary.adv_steps, c.adversary.reg_adv) = (3, 1.0);
    let batches: Vec<HostBatch> = (0..6).map(|i| batch(&v, 8, i)).collect::<Result<_>>()?;
    let mut t = Trainer::from_config(&c, &v, Device::Cpu)?;
    assert_eq!(t.phase(), Phase::Pretrain);
    let m = train(&mut t, &batches, 1)?;
    assert_eq!((m[0].autoencoder_batches, m[0].adversary_batches), (6, 6));
    // adv_steps = 3: batches 0 and 3 step the autoencoder, the other four the adversary.
    let m = train(&mut t, &batches, 1)?;
    assert_eq!((m[0].autoencoder_batches, m[0].adversary_batches), (2, 4));
    assert_eq!(t.adv_weight(), 0.25);
    let factors: Vec<f64> = (0..6u32)
        .map(|e| {
            t.state_mut().epoch = e;
            t.lr_factor()
        })
        .collect();
    // The reference steps its scheduler after epochs e > 1 with e % 2 == 0.
    assert_eq!(factors, [1.0, 1.0, 1.0, 0.9, 0.9, 0.9 * 0.9]);
    // cpa-tools' StepLR(step_size = 2) decays on every second of those steps: after epochs 4, 8.
    let mut reference = c.clone();
    reference.training.lr_schedule = LrSchedule::Reference;
    let mut t = Trainer::from_config(&reference, &v, Device::Cpu)?;
    let factors: Vec<f64> = (0..11u32)
        .map(|e| {
            t.state_mut().epoch = e;
            t.lr_factor()
        })
        .collect();
    let expected = [1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 0.9, 0.9, 0.9, 0.9 * 0.9, 0.9 * 0.9];
    assert_eq!(factors, expected);
    Ok(())
}

#[test]
fn saved_models_load_and_check_their_files() -> Result<()> {
    let v = vocab()?;
    let config = small_config();
    let mut t = Trainer::from_config(&config, &v, Device::Cpu)?;
    train(&mut t, &[batch(&v, 16, 1)?], 1)?;
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let path = dir.path().join("model");
    crate::model::save_model(t.model(), &path)?;
    let loaded = crate::model::load_model(&path, Device::Cpu)?;
    assert!(same_weights(t.model(), &loaded)?);
    assert_eq!(loaded.vocabulary(), &v);
    let entries: Vec<String> = std::fs::read_dir(dir.path())
        .map_err(|e| Error::io(dir.path(), e))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(dir.path(), e))?;
    assert_eq!(entries, ["model"], "temporary directories left behind");
    let mut genes = v.genes.clone();
    assert!(crate::model::load_model_for(&path, &genes, "store S", Device::Cpu).is_ok());
    genes.swap(0, 1);
    let err = crate::model::load_model_for(&path, &genes, "store S", Device::Cpu).err().map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("store S: gene 0 is \"gene1\", the model's gene 0 is \"gene0\" (same genes in the same order expected)")
    );

    let json = path.join(crate::model::files::MODEL_FILE);
    let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
    let write = |t: &str| std::fs::write(&json, t).map_err(|e| Error::io(&json, e));
    write(&text.replace("\"version\": 1", "\"version\": 9"))?;
    let err = crate::model::load_model(&path, Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("model format version Some(9); this build reads version 1"), "{err}");
    write(&text.replace("cpa-stream-model", "something-else"))?;
    let err = crate::model::load_model(&path, Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("not a cpa-stream model"), "{err}");
    // A vocabulary that does not match the weights (one more perturbation).
    let mut file: crate::model::files::ModelFile =
        serde_json::from_str(&text).map_err(|e| Error::InvalidInput(e.to_string()))?;
    file.vocabulary.perturbations.push("D".into());
    // Edited after it was written: its own checksum tells.
    write(&serde_json::to_string(&file).map_err(|e| Error::InvalidInput(e.to_string()))?)?;
    let err = crate::model::load_model(&path, Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("the description was edited after the model was written"), "{err}");
    // Sealed again (as a writer of a broken model would): the weights tell.
    let file = file.sealed()?;
    write(&serde_json::to_string(&file).map_err(|e| Error::InvalidInput(e.to_string()))?)?;
    let err = crate::model::load_model(&path, Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("the model needs [6, 8] (the weights are not this model's)"), "{err}");
    Ok(())
}

#[test]
fn early_stopping_keeps_the_best_epoch_and_stops_after_patience() -> Result<()> {
    // (scores after epochs 0, 1, ..., patience) -> (best epoch, best score, epoch after which it stops)
    type Case<'a> = (&'a [f64], u32, Option<u32>, Option<f64>, Option<usize>);
    let table: [Case; 6] = [
        (&[0.1, 0.2, 0.3], 2, Some(2), Some(0.3), None),
        (&[0.5, 0.4, 0.3], 2, Some(0), Some(0.5), Some(2)),
        (&[0.5, 0.5, 0.6, 0.6, 0.6], 2, Some(2), Some(0.6), Some(4)),
        (&[0.5, 0.1], 1, Some(0), Some(0.5), Some(1)),
        (&[0.5], 0, Some(0), Some(0.5), Some(0)),
        (&[-1.0, -0.5, -2.0, -0.4], 3, Some(3), Some(-0.4), None),
    ];
    let v = vocab()?;
    for (scores, patience, best_epoch, best_score, stops_after) in table {
        let mut t = Trainer::from_config(&small_config(), &v, Device::Cpu)?;
        let mut stopped = None;
        for (e, &score) in scores.iter().enumerate() {
            t.state_mut().epoch = e as u32 + 1; // as after end_epoch of epoch e
            let outcome = t.record_validation(score, patience);
            assert_eq!(outcome.improved, t.state().best_epoch == Some(e as u32), "{scores:?}: epoch {e}");
            if outcome.stop && stopped.is_none() {
                stopped = Some(e);
            }
        }
        assert_eq!(t.state().best_epoch, best_epoch, "{scores:?}");
        assert_eq!(t.state().best_score, best_score, "{scores:?}");
        assert_eq!(stopped, stops_after, "{scores:?} with patience {patience}");
    }
    Ok(())
}

#[test]
fn a_non_finite_loss_stops_training_naming_epoch_and_batch() -> Result<()> {
    let v = vocab()?;
    let mut trainer = Trainer::new(CpaModel::new(&small_config(), &v, None, Device::Cpu, 7)?)?;
    let good: Vec<HostBatch> = (0..3).map(|s| batch(&v, 16, s)).collect::<Result<_>>()?;
    train(&mut trainer, &good, 1)?;
    // Epoch 1: batch 2 carries a NaN count (as a damaged store would without the reader's check).
    let mut bad = batch(&v, 16, 9)?;
    let first = (0..bad.counts.n_rows()).find(|&r| !bad.counts.row(r).0.is_empty()).unwrap_or(0);
    let (idx, _) = bad.counts.row(first);
    let idx = idx.to_vec();
    let mut counts = cpa_stream_stages::CsrBatch::new(GENES as u32);
    for r in 0..bad.counts.n_rows() {
        let (i, d) = bad.counts.row(r);
        if r == first {
            counts.push_row(&idx, &vec![f32::NAN; idx.len()]);
        } else {
            counts.push_row(i, d);
        }
    }
    bad.counts = counts;
    trainer.step(&good[0])?;
    trainer.step(&good[1])?;
    trainer.step(&bad)?;
    trainer.step(&good[2])?;
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let err = trainer.save_checkpoint(&dir.path().join("checkpoint")).unwrap_err();
    assert!(matches!(err, Error::Diverged { epoch: 1, batch: 2 }), "{err}");
    assert!(!dir.path().join("checkpoint").exists(), "a diverged checkpoint was written");
    let err = trainer.end_epoch().unwrap_err().to_string();
    assert!(err.starts_with("epoch 1, batch 2: a training loss is not finite"), "{err}");
    Ok(())
}

#[test]
fn checkpoints_are_replaced_whole_and_a_lost_one_is_recovered() -> Result<()> {
    let v = vocab()?;
    let mut trainer = Trainer::new(CpaModel::new(&small_config(), &v, None, Device::Cpu, 7)?)?;
    let batches: Vec<HostBatch> = (0..2).map(|s| batch(&v, 16, s)).collect::<Result<_>>()?;
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let checkpoint = dir.path().join("checkpoint");
    train(&mut trainer, &batches, 1)?;
    trainer.save_checkpoint(&checkpoint)?;
    train(&mut trainer, &batches, 1)?;
    trainer.save_checkpoint(&checkpoint)?;
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .map_err(|e| Error::io(dir.path(), e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(names, ["checkpoint"], "siblings left: {names:?}");
    assert_eq!(Trainer::resume(&checkpoint, Device::Cpu)?.state().epoch, 2);
    // A run of an older version killed between its two renames: nothing at checkpoint/, the data
    // in `.checkpoint.old-PID` of a process that is gone.
    let old = dir.path().join(format!(".checkpoint.old-{}", u32::MAX - 3));
    std::fs::rename(&checkpoint, &old).map_err(|e| Error::io(&old, e))?;
    let stale_tmp = dir.path().join(format!(".checkpoint.tmp-{}", u32::MAX - 3));
    std::fs::create_dir(&stale_tmp).map_err(|e| Error::io(&stale_tmp, e))?;
    assert_eq!(Trainer::resume(&checkpoint, Device::Cpu)?.state().epoch, 2);
    assert!(!old.exists() && !stale_tmp.exists());
    Ok(())
}

#[test]
fn averaged_weights_follow_their_rule_stay_apart_and_resume_exactly() -> Result<()> {
    let v = vocab()?;
    let batches: Vec<HostBatch> = (0..7).map(|i| batch(&v, 16, 300 + i)).collect::<Result<_>>()?;
    let mut config = busy_config(9);
    config.training.ema_decay = 0.5;
    let averaged = |m: &CpaModel| -> Vec<Tensor> {
        [GROUP_AE, GROUP_DOSER].iter().flat_map(|g| m.group_variables(g)).map(|(_, w)| w.copy()).collect()
    };

    // The shadow by hand, in f64: after the n-th autoencoder step (0-based) it moves towards the
    // weights by 1 - min(0.5, (1 + n) / (10 + n)).
    let mut straight = Trainer::from_config(&config, &v, Device::Cpu)?;
    let mut shadow: Vec<Tensor> = averaged(straight.model())
        .iter()
        .map(|w| w.f_to_kind(Kind::Double))
        .collect::<std::result::Result<_, _>>()
        .torch()?;
    // An optimizer step ends a batch (every 2 here) or the epoch (an odd batch left over).
    let mut follow = |trainer: &mut Trainer, work: &dyn Fn(&mut Trainer) -> Result<()>| -> Result<()> {
        let before = trainer.groups[0].steps();
        work(trainer)?;
        if trainer.groups[0].steps() > before {
            let d = 0.5f64.min((1.0 + before as f64) / (10.0 + before as f64));
            for (s, w) in shadow.iter_mut().zip(averaged(trainer.model())) {
                *s = s
                    .f_mul_scalar(d)
                    .torch()?
                    .f_add(&w.f_to_kind(Kind::Double).torch()?.f_mul_scalar(1.0 - d).torch()?)
                    .torch()?;
            }
        }
        Ok(())
    };
    for _ in 0..6 {
        for b in &batches {
            follow(&mut straight, &|t| t.step(b))?;
        }
        follow(&mut straight, &|t| t.end_epoch().map(drop))?;
    }
    assert!(straight.groups[0].steps() > 9, "too few steps to pass the decay's warm-up");
    let live = averaged(straight.model());
    let published = straight.with_published_weights(averaged)?;
    let mut moved = false;
    for ((p, s), l) in published.iter().zip(&shadow).zip(&live) {
        let err = scalar(&p.f_to_kind(Kind::Double).torch()?.f_sub(s).torch()?.f_abs().torch()?.f_max().torch()?)?;
        assert!(err < 1e-5, "averaged weight off the rule by {err}");
        moved |= !p.f_equal(l).torch()?;
    }
    assert!(moved, "the averaged weights equal the live ones");
    // The live weights are back in place afterwards.
    for (now, before) in averaged(straight.model()).iter().zip(&live) {
        assert!(now.f_equal(before).torch()?, "the live weights were not restored");
    }

    // A checkpoint keeps the shadows: a resumed run publishes the same averaged weights.
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let ckpt = dir.path().join("checkpoint");
    let mut first = Trainer::from_config(&config, &v, Device::Cpu)?;
    train(&mut first, &batches, 3)?;
    first.save_checkpoint(&ckpt)?;
    drop(first);
    let mut resumed = Trainer::resume(&ckpt, Device::Cpu)?;
    train(&mut resumed, &batches, 3)?;
    assert!(same_weights(straight.model(), resumed.model())?, "resumed live weights differ");
    let resumed_published = resumed.with_published_weights(averaged)?;
    for (a, b) in published.iter().zip(&resumed_published) {
        assert!(a.f_equal(b).torch()?, "resumed averaged weights differ from the uninterrupted run");
    }

    // Without an average the published weights are the live ones.
    let mut off = busy_config(9);
    off.training.ema_decay = 0.0;
    let mut plain = Trainer::from_config(&off, &v, Device::Cpu)?;
    train(&mut plain, &batches, 1)?;
    let live = averaged(plain.model());
    for (p, l) in plain.with_published_weights(averaged)?.iter().zip(&live) {
        assert!(p.f_equal(l).torch()?);
    }
    Ok(())
}

#[test]
fn perturbations_without_training_cells_keep_a_zero_embedding() -> Result<()> {
    // D is only in conditions without training cells (a held-out combination and itself).
    let covariates = vocab()?.covariates;
    let v = Vocabulary::new(
        (0..GENES).map(|g| format!("gene{g}")).collect(),
        "ctrl",
        ["A", "B", "C", "D", "ctrl"].map(String::from),
        covariates,
        vec![
            ("ctrl".into(), 40),
            ("A".into(), 20),
            ("A+B".into(), 20),
            ("A+D".into(), 0),
            ("B".into(), 10),
            ("C".into(), 10),
            ("D".into(), 0),
        ],
    )?;
    let batches: Vec<HostBatch> = (0..5).map(|i| batch(&v, 16, 400 + i)).collect::<Result<_>>()?;
    let mut trainer = Trainer::from_config(&busy_config(4), &v, Device::Cpu)?;
    train(&mut trainer, &batches, 3)?;
    let index = v.perturbation_index();
    let rows = trainer.with_published_weights(|m| {
        m.perturbation_embeddings().and_then(|e| e.f_abs().torch()?.f_sum_dim_intlist(1, false, Kind::Float).torch())
    })??;
    let row = |name: &str| -> Result<f64> { rows.f_double_value(&[i64::from(index[name])]).torch() };
    assert_eq!(row("D")?, 0.0, "the untrained perturbation moved");
    for name in ["A", "B", "C", "ctrl"] {
        assert!(row(name)? > 0.0, "{name} has a zero embedding");
    }
    Ok(())
}
