//! Dose-response curves of a trained model, as cpa-tools' `latent_dose_response` and
//! `get_response` give them, without loading the data into memory.
//!
//! - Latent: each perturbation's learned dose scaling `s(d)` over a dose grid, and the length
//!   of the latent shift it adds (`|s(d)| * |E_p|`).
//! - Decoded (with a store): for each covariate combination, a bounded, seeded sample of its
//!   control cells decoded with each perturbation at each dose; the change of the mean predicted
//!   expression from the model's own control prediction (dose 0), its length over all genes
//!   (cpa-tools' `response`) and, for chosen genes, the per-gene curves. With a synthetic atlas's
//!   truth table, the true change at the doses the atlas has, and the R2 of the decoded curves
//!   against it.
//!
//! Memory: the sampled control cells (at most `cells` per covariate combination) and one
//! decoded batch; the store is read once for the sample.

mod plot;
mod request;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::model::layers::Noise;
use crate::model::vocab::CONTROL_ID;
use crate::model::{CpaModel, PerturbationCsr};
use arrow_array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::output::{OutputKind, claim_output};
use cpa_stream_stages::store::TableFile;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::Stage;
use crate::model::ToDevice as _;
use crate::opened::Opened;
use crate::torch::TorchResult;
use cpa_stream_pipeline::condition::{ConditionKey, TruthRow, map_groups, read_truth};
use cpa_stream_pipeline::context::RunContext;
use cpa_stream_pipeline::encoder::CellLabels;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::suggest::listing;
use cpa_stream_pipeline::telemetry::StageStats;

/// File of the latent curves.
pub const LATENT_FILE: &str = "latent.parquet";
/// File of the decoded responses (one row per covariates, perturbation and dose).
pub const DECODED_FILE: &str = "decoded.parquet";
/// File of the per-gene decoded curves.
pub const GENES_FILE: &str = "genes.parquet";
/// File of the run's summary.
pub const SUMMARY_FILE: &str = "summary.json";
/// Stem of the picture (`.svg` and `.png`).
pub const PLOT_STEM: &str = "dose_response";

/// Control cells sampled per covariate combination, unless set otherwise (cpa-tools' default).
pub use cpa_stream_pipeline::model_flags::DOSE_RESPONSE_CELLS as DEFAULT_CELLS;
pub use request::DoseResponseRequest;

/// Points of the default dose grid, from 0 to the largest dose the data has.
pub const DEFAULT_GRID_POINTS: usize = 25;
/// Genes per curve in `genes.parquet` when none are named: the largest changes at the top dose.
pub const DEFAULT_TOP_GENES: usize = 5;

/// What `cpa-stream dose-response` does.
#[derive(Debug, Clone)]
pub struct DoseResponseOptions {
    /// A run directory (its `model/` is used) or a model directory.
    pub model: PathBuf,
    /// The store the model was trained on; without it only the latent curves are computed.
    pub store: Option<PathBuf>,
    /// Perturbations to draw (default: every one the model knows, the control left out).
    pub perturbations: Vec<String>,
    /// Dose grid (default: 0 to the largest dose the store has for each perturbation, else 1, in
    /// [`DEFAULT_GRID_POINTS`] steps, plus every dose the store has for it).
    pub doses: Option<Vec<f64>>,
    /// Genes whose curves go to `genes.parquet` (default: the [`DEFAULT_TOP_GENES`] largest
    /// changes at the top dose of each curve).
    pub genes: Vec<String>,
    /// Covariate values the decoded curves are limited to (`(covariate, value)`; several values of
    /// one covariate are alternatives); default every combination with control cells.
    pub covariates: Vec<(String, String)>,
    /// Control cells sampled per covariate combination.
    pub cells: usize,
    /// Seed of the sample (and of a variational model's draws).
    pub seed: u64,
    /// The output directory.
    pub out: PathBuf,
    /// Where the model runs.
    pub device: Device,
    /// Replace an existing dose-response directory at `out`.
    pub overwrite: bool,
    /// Draw `dose_response.svg` and `.png`.
    pub plots: bool,
}

impl DoseResponseOptions {
    /// Options with every default, for `model` and `out`.
    pub fn new(model: impl Into<PathBuf>, out: impl Into<PathBuf>) -> DoseResponseOptions {
        DoseResponseOptions {
            model: model.into(),
            store: None,
            perturbations: Vec::new(),
            doses: None,
            genes: Vec::new(),
            covariates: Vec::new(),
            cells: DEFAULT_CELLS,
            seed: 0,
            out: out.into(),
            device: Device::Cpu,
            overwrite: false,
            plots: true,
        }
    }
}

/// One point of a latent curve.
#[derive(Debug, Clone, Serialize)]
pub struct LatentPoint {
    /// The perturbation.
    pub perturbation: String,
    /// The dose.
    pub dose: f64,
    /// The learned dose scaling `s(d)`.
    pub response: f64,
    /// Length of the latent shift, `|s(d)| * |E_p|`.
    pub norm: f64,
    /// Whether the store has cells of the perturbation at this dose.
    pub observed: bool,
}

/// One point of a decoded curve.
#[derive(Debug, Clone, Serialize)]
pub struct DecodedPoint {
    /// Covariate values, in the model's covariate order.
    pub covariates: Vec<String>,
    /// The perturbation.
    pub perturbation: String,
    /// The dose.
    pub dose: f64,
    /// Length over all genes of the change of the mean prediction from dose 0.
    pub response: f64,
    /// The same from the truth table, where it has this dose (else NaN).
    pub true_response: f64,
    /// Whether the store has cells of the perturbation at this dose (with these covariates).
    pub observed: bool,
    /// Control cells decoded.
    pub cells: u64,
}

/// One gene's point of a decoded curve.
#[derive(Debug, Clone)]
struct GenePoint {
    point: usize,
    gene: usize,
    predicted: f64,
    delta: f64,
    true_delta: f64,
}

/// What a dose-response run produced.
#[derive(Debug, Clone, Serialize)]
pub struct DoseResponseReport {
    /// The output directory.
    pub out: PathBuf,
    /// The model directory.
    pub model: String,
    /// Perturbations drawn.
    pub perturbations: usize,
    /// Points of the latent curves.
    pub latent_points: usize,
    /// Points of the decoded curves (0 without a store).
    pub decoded_points: usize,
    /// Covariate combinations decoded.
    pub covariate_combinations: usize,
    /// What the decoded values are: `log1p(mean)` (count models) or `mean`.
    pub space: String,
    /// R2 of the decoded per-gene changes against the truth's, over all genes and the doses the
    /// truth table has, averaged over curves (NaN without a truth table).
    pub r2_truth_delta: f64,
    /// R2 of the decoded `response` against the truth's over the same points (NaN without one).
    pub r2_truth_response: f64,
    /// Curves compared with the truth.
    pub truth_curves: usize,
    /// Wall seconds.
    pub seconds: f64,
}

/// Computes the curves and writes them to `options.out` (published whole).
pub fn run(options: &DoseResponseOptions, ctx: &RunContext) -> Result<DoseResponseReport> {
    let wall = Instant::now();
    let inputs =
        std::iter::once(cpa_stream_pipeline::run_dir::model_input(&options.model)).chain(options.store.clone());
    cpa_stream_stages::output::check_not_an_input(&options.out, inputs).map_err(Error::stage(Stage::DoseResponse))?;
    let _lock = claim_output(&options.out, OutputKind::Directory, options.overwrite)
        .map_err(Error::stage(Stage::DoseResponse))?;
    if options.out.exists() {
        cpa_stream_pipeline::run_dir::check_replaceable(
            &options.out,
            &[LATENT_FILE, DECODED_FILE, GENES_FILE, SUMMARY_FILE, "dose_response.svg", "dose_response.png"],
            "a dose-response directory",
        )?;
    }
    check(options)?;
    let encoder_stats = StageStats::new(Stage::Encoder, 1);
    let (model, dir, data) = match &options.store {
        Some(store) => {
            let opened = Opened::open(&options.model, store, options.device, Stage::DoseResponse)?;
            let labels = opened.label(&encoder_stats)?.labels;
            let data = StoreData::read(&opened, &labels, options)?;
            (opened.model, opened.dir, Some((data, store.clone())))
        }
        None => {
            let dir = cpa_stream_pipeline::run_dir::model_dir(&options.model)?;
            let model =
                crate::model::files::load_model(&dir, options.device).map_err(Error::stage(Stage::DoseResponse))?;
            (model, dir, None)
        }
    };
    let vocab = model.vocabulary();
    let perturbations = chosen_perturbations(&model, &options.perturbations)?;
    let gene_index = gene_indices(vocab, &options.genes)?;
    let observed = data.as_ref().map(|(d, _)| &d.observed);
    let grids: Vec<Vec<f64>> =
        perturbations.iter().map(|&p| dose_grid(options.doses.as_deref(), observed.and_then(|o| o.get(&p)))).collect();
    let latent = latent_curves(&model, &perturbations, &grids, observed)?;
    let mut decoded = Vec::new();
    let mut gene_points = Vec::new();
    let (mut r2_delta, mut r2_response) = (Vec::new(), Vec::new());
    let mut combos = 0;
    if let Some((data, store)) = &data {
        let truth = &data.truth;
        let decoder = Decoder { model: &model, gene_index: &gene_index, truth };
        let mut noise = Noise::new(Xoshiro256PlusPlus::seed_from_u64(options.seed), model.device());
        let wanted = covariate_filter(vocab, &options.covariates)?;
        ctx.progress().begin("dose-response: covariate combinations", data.samples.len() as u64);
        for (covs, sample) in &data.samples {
            ctx.progress().advance(1);
            ctx.check_stopped()?;
            if !wanted.iter().zip(covs).all(|(allowed, c)| allowed.is_empty() || allowed.contains(c)) {
                continue;
            }
            combos += 1;
            let encoded = decoder.encode(covs, sample, &mut noise)?;
            for (&p, grid) in perturbations.iter().zip(&grids) {
                let curve = decoder.curve(
                    covs,
                    &encoded,
                    p,
                    grid,
                    &data.observed_with,
                    &mut noise,
                    &mut decoded,
                    &mut gene_points,
                )?;
                if let Some((d, r)) = curve {
                    r2_delta.push(d);
                    r2_response.push(r);
                }
            }
        }
        ctx.progress().end();
        if combos == 0 {
            return Err(Error::InvalidInput(format!(
                "{}: no control cells of the model's covariates{}, nothing to decode (run without --store for \
                 the latent curves alone)",
                store.display(),
                if options.covariates.is_empty() { "" } else { " with the --covariate values given" }
            )));
        }
    }
    let finite_mean = |v: &[f64]| {
        let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        if f.is_empty() { f64::NAN } else { f.iter().sum::<f64>() / f.len() as f64 }
    };
    let count_model = model.config().model.recon_loss.is_count();
    let report = DoseResponseReport {
        out: options.out.clone(),
        model: dir.display().to_string(),
        perturbations: perturbations.len(),
        latent_points: latent.len(),
        decoded_points: decoded.len(),
        covariate_combinations: combos,
        space: if count_model { "log1p(mean)" } else { "mean" }.to_owned(),
        r2_truth_delta: finite_mean(&r2_delta),
        r2_truth_response: finite_mean(&r2_response),
        truth_curves: r2_delta.len(),
        seconds: wall.elapsed().as_secs_f64(),
    };
    let curves =
        Curves { latent: &latent, decoded: &decoded, gene_points: &gene_points, decoded_files: data.is_some() };
    publish(options, &dir, vocab, &report, &curves)?;
    Ok(report)
}

/// The options' own checks (a library caller's options did not come through a request).
fn check(options: &DoseResponseOptions) -> Result<()> {
    if options.cells == 0 {
        return Err(Error::InvalidInput("--cells must be at least 1".to_owned()));
    }
    if options.doses.as_ref().is_some_and(Vec::is_empty) {
        return Err(Error::InvalidInput("--doses: an empty list; give at least one dose".to_owned()));
    }
    if let Some(d) = options.doses.iter().flatten().find(|d| !d.is_finite() || **d < 0.0) {
        return Err(Error::InvalidInput(format!("dose {d}: doses must be finite and not negative")));
    }
    Ok(())
}

/// The model's indices of `genes`; an unknown gene is an error naming the closest.
fn gene_indices(vocab: &crate::model::Vocabulary, genes: &[String]) -> Result<Vec<usize>> {
    genes
        .iter()
        .map(|g| {
            vocab.genes.iter().position(|v| v == g).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "--genes: {g:?} is not a gene of the model; closest: {}",
                    listing(g, vocab.genes.iter().map(String::as_str), 5)
                ))
            })
        })
        .collect()
}

/// The curves a run computed.
struct Curves<'a> {
    latent: &'a [LatentPoint],
    decoded: &'a [DecodedPoint],
    gene_points: &'a [GenePoint],
    /// Whether there were decoded curves (a store): their tables are written, empty or not.
    decoded_files: bool,
}

/// Writes the tables, the summary and the picture into `options.out`, published whole.
fn publish(
    options: &DoseResponseOptions,
    dir: &std::path::Path,
    vocab: &crate::model::Vocabulary,
    report: &DoseResponseReport,
    curves: &Curves<'_>,
) -> Result<()> {
    let Curves { latent, decoded, gene_points, decoded_files } = *curves;
    let covariate_names: Vec<String> = vocab.covariates.iter().map(|c| c.name.clone()).collect();
    crate::model::files::publish_dir(&options.out, |tmp| {
        let write = |name: &str, batch: RecordBatch| {
            cpa_stream_stages::store::write_table(&tmp.join(name), batch.schema(), [batch])
        };
        let table = |e| cpa_stream_stages::Error::InvalidInput(format!("dose-response table: {e}"));
        write(LATENT_FILE, latent_batch(latent).map_err(table)?)?;
        if decoded_files {
            write(DECODED_FILE, decoded_batch(&covariate_names, decoded).map_err(table)?)?;
            write(GENES_FILE, genes_batch(&covariate_names, &vocab.genes, decoded, gene_points).map_err(table)?)?;
        }
        let json = serde_json::to_string_pretty(report)
            .map_err(|e| cpa_stream_stages::Error::InvalidInput(format!("summary: {e}")))?;
        std::fs::write(tmp.join(SUMMARY_FILE), json + "\n").map_err(|e| {
            cpa_stream_stages::Error::InvalidInput(format!("{}: {e}", tmp.join(SUMMARY_FILE).display()))
        })?;
        if options.plots {
            let title = format!("dose response: {}", dir.display());
            plot::plot(&tmp.join(PLOT_STEM), &title, latent, decoded, &report.space)
                .map_err(|e| cpa_stream_stages::Error::InvalidInput(e.to_string()))?;
        }
        Ok(())
    })
    .map_err(Error::stage(Stage::DoseResponse))
}

/// Per covariate of the model, the category codes `given` allows (empty: any). Unknown keys or
/// values are errors naming the closest valid ones.
fn covariate_filter(vocab: &crate::model::Vocabulary, given: &[(String, String)]) -> Result<Vec<Vec<u32>>> {
    let mut allowed = vec![Vec::new(); vocab.covariates.len()];
    for (key, value) in given {
        let Some(c) = vocab.covariates.iter().position(|c| &c.name == key) else {
            return Err(Error::InvalidInput(format!(
                "--covariate {key}={value}: {key:?} is not a covariate of the model; closest: {}",
                listing(key, vocab.covariates.iter().map(|c| c.name.as_str()), 5)
            )));
        };
        let categories = &vocab.covariates[c].categories;
        let Some(code) = categories.iter().position(|v| v == value) else {
            return Err(Error::InvalidInput(format!(
                "--covariate {key}={value}: {value:?} is not a category of {key:?}; closest: {}",
                listing(value, categories.iter().map(String::as_str), 5)
            )));
        };
        allowed[c].push(code as u32);
    }
    Ok(allowed)
}

/// The perturbation ids to draw: the named ones (combinations refused: dose scalings belong to
/// single perturbations), else every perturbation but the control.
fn chosen_perturbations(model: &CpaModel, names: &[String]) -> Result<Vec<u32>> {
    let vocab = model.vocabulary();
    let index = vocab.perturbation_index();
    if names.is_empty() {
        return Ok((CONTROL_ID + 1..vocab.perturbations.len()).map(|p| p as u32).collect());
    }
    names
        .iter()
        .map(|n| match index.get(n.as_str()) {
            Some(&id) if id as usize == CONTROL_ID => {
                Err(Error::InvalidInput(format!("--perturbations: {n:?} is the control, which has no dose response")))
            }
            Some(&id) => Ok(id),
            None => Err(Error::InvalidInput(format!(
                "--perturbations: {n:?} is not a perturbation of the model{}; closest: {}",
                if n.contains('+') { " (dose responses are per single perturbation)" } else { "" },
                listing(n, vocab.perturbations[CONTROL_ID + 1..].iter().map(String::as_str), 5)
            ))),
        })
        .collect()
}

/// The doses of a curve: the given grid, or 0 to the largest observed dose (1 without one) in
/// [`DEFAULT_GRID_POINTS`] steps with every observed dose added; sorted, without repeats.
fn dose_grid(given: Option<&[f64]>, observed: Option<&BTreeSet<u32>>) -> Vec<f64> {
    let mut doses: Vec<f64> = match given {
        Some(g) => g.to_vec(),
        None => {
            let seen: Vec<f64> = observed.into_iter().flatten().map(|&b| f64::from(f32::from_bits(b))).collect();
            let top = seen.iter().copied().fold(0.0f64, f64::max);
            let top = if top > 0.0 { top } else { 1.0 };
            let last = (DEFAULT_GRID_POINTS - 1) as f64;
            let mut grid: Vec<f64> = (0..DEFAULT_GRID_POINTS).map(|i| top * i as f64 / last).collect();
            grid.extend(seen);
            grid
        }
    };
    doses.sort_by(f64::total_cmp);
    // Doses equal as float32 (the precision of the model's inputs and of obs's labels) are one.
    doses.dedup_by(|a, b| (*a as f32) == (*b as f32));
    doses
}

/// Every perturbation's `s(d)` and latent shift length over its grid.
fn latent_curves(
    model: &CpaModel,
    perturbations: &[u32],
    grids: &[Vec<f64>],
    observed: Option<&HashMap<u32, BTreeSet<u32>>>,
) -> Result<Vec<LatentPoint>> {
    let torch = Error::stage(Stage::Predictor);
    let vocab = model.vocabulary();
    let device = model.device();
    let norms: Vec<f64> = tch::no_grad(|| -> cpa_stream_stages::Result<Vec<f64>> {
        let table = model.perturbation_embeddings()?.f_to_kind(Kind::Double).torch()?;
        let norms = table.f_square().torch()?.f_sum_dim_intlist(1, false, Kind::Double).torch()?.f_sqrt().torch()?;
        Vec::<f64>::try_from(&norms.f_to_device(Device::Cpu).torch()?).torch()
    })
    .map_err(torch)?;
    let mut out = Vec::new();
    for (&p, grid) in perturbations.iter().zip(grids) {
        let scaled = tch::no_grad(|| -> cpa_stream_stages::Result<Vec<f64>> {
            let ids = Tensor::f_full([grid.len() as i64], i64::from(p), (Kind::Int64, device)).torch()?;
            let doses =
                Tensor::f_from_slice(grid).torch()?.f_to_kind(Kind::Float).torch()?.f_to_device(device).torch()?;
            let s =
                model.dose_response(&ids, &doses)?.f_to_kind(Kind::Double).torch()?.f_to_device(Device::Cpu).torch()?;
            Vec::<f64>::try_from(&s).torch()
        })
        .map_err(torch)?;
        let seen = observed.and_then(|o| o.get(&p));
        for (&dose, &s) in grid.iter().zip(&scaled) {
            out.push(LatentPoint {
                perturbation: vocab.perturbations[p as usize].clone(),
                dose,
                response: s,
                norm: s.abs() * norms[p as usize],
                observed: seen.is_some_and(|o| o.contains(&(dose as f32).to_bits())),
            });
        }
    }
    Ok(out)
}

/// What the store contributes: the doses each perturbation has, and a seeded sample of control
/// cells per covariate combination.
struct StoreData {
    /// Per perturbation: the doses (float32 bits) of its cells, alone or in combinations.
    observed: HashMap<u32, BTreeSet<u32>>,
    /// Per (covariates, perturbation): the doses its cells have alone.
    observed_with: HashMap<(Vec<u32>, u32), BTreeSet<u32>>,
    /// Per covariate combination: the sampled control cells' rows.
    samples: BTreeMap<Vec<u32>, CsrBatch>,
    /// The store's truth table, when it has one (a synthetic atlas).
    truth: HashMap<ConditionKey, TruthRow>,
}

impl StoreData {
    fn read(opened: &Opened, labels: &CellLabels, options: &DoseResponseOptions) -> Result<StoreData> {
        let groups = map_groups(labels, opened.model.vocabulary());
        let mut observed: HashMap<u32, BTreeSet<u32>> = HashMap::new();
        let mut observed_with: HashMap<(Vec<u32>, u32), BTreeSet<u32>> = HashMap::new();
        for g in groups.iter().flatten().filter(|g| !g.is_control) {
            for &(p, d) in &g.parts {
                observed.entry(p).or_default().insert(d.to_bits());
            }
            if let [(p, d)] = g.parts[..] {
                observed_with.entry((g.key.covariates.clone(), p)).or_default().insert(d.to_bits());
            }
        }
        // Reservoir sample (algorithm R) of each combination's control cells, in store order.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(options.seed);
        let mut reservoirs: BTreeMap<Vec<u32>, (u64, Vec<u64>)> = BTreeMap::new();
        for cell in 0..labels.n_cells() {
            let Some(g) = groups[labels.group_id(cell) as usize].as_ref().filter(|g| g.is_control) else { continue };
            let (seen, rows) = reservoirs.entry(g.key.covariates.clone()).or_default();
            *seen += 1;
            if rows.len() < options.cells {
                rows.push(cell);
            } else {
                let j = rng.random_range(0..*seen);
                if (j as usize) < options.cells {
                    rows[j as usize] = cell;
                }
            }
        }
        let genes = opened.genes.len() as u32;
        let mut cursor = opened.store.cursor().map_err(Error::stage(Stage::Reader))?;
        let mut samples = BTreeMap::new();
        for (covs, (_, mut rows)) in reservoirs {
            rows.sort_unstable();
            let mut batch = CsrBatch::new(genes);
            cursor.gather(&rows, &mut batch).map_err(Error::stage(Stage::Reader))?;
            samples.insert(covs, batch);
        }
        let table = TableFile::Store(&opened.store, cpa_stream_schemas::StoreFiles::TRUTH);
        let truth = match table.exists() {
            true => read_truth(table, opened.model.vocabulary())?,
            false => HashMap::new(),
        };
        Ok(StoreData { observed, observed_with, samples, truth })
    }
}

/// Decodes the curves of one covariate combination.
struct Decoder<'a> {
    model: &'a CpaModel,
    gene_index: &'a [usize],
    truth: &'a HashMap<ConditionKey, TruthRow>,
}

/// A covariate combination's sampled control cells, encoded once for all its curves, and the
/// model's prediction for them at dose 0 (every doser scales dose 0 to 0), the curves' origin.
struct Encoded {
    n: usize,
    draws: Vec<Tensor>,
    library: Option<Tensor>,
    covariates: Vec<Tensor>,
    origin: Vec<f64>,
}

impl Decoder<'_> {
    /// Encodes `sample` (control cells of the covariates `covs`) and decodes its origin.
    fn encode(&self, covs: &[u32], sample: &CsrBatch, noise: &mut Noise) -> Result<Encoded> {
        let model = self.model;
        let n = sample.n_rows();
        tch::no_grad(|| -> cpa_stream_stages::Result<Encoded> {
            let device = model.device();
            let x = crate::model::batch::densify(sample, device)?;
            let (x_in, library) = model.input(&x)?;
            let draws = model.basal_draws(&x_in, noise)?;
            let codes: Vec<Tensor> = covs
                .iter()
                .map(|&c| Tensor::f_full([n as i64], i64::from(c), (Kind::Int64, device)))
                .collect::<std::result::Result<_, _>>()
                .torch()?;
            let covariates = model.covariate_latents(&codes)?;
            let zeros =
                Tensor::f_zeros([n as i64, model.config().model.n_latent as i64], (Kind::Float, device)).torch()?;
            let mut encoded = Encoded { n, draws, library, covariates, origin: Vec::new() };
            encoded.origin = self.average(&encoded, &zeros, noise)?;
            Ok(encoded)
        })
        .map_err(Error::stage(Stage::Predictor))
    }

    /// The mean over the encoded cells of their prediction with the perturbation latent `z_pert`
    /// (`log1p` of the means for count models).
    fn average(&self, encoded: &Encoded, z_pert: &Tensor, noise: &mut Noise) -> cpa_stream_stages::Result<Vec<f64>> {
        let model = self.model;
        let mean =
            model.mean_over_draws(&encoded.draws, z_pert, &encoded.covariates, encoded.library.as_ref(), noise)?;
        let v = if model.config().model.recon_loss.is_count() { mean.f_log1p().torch()? } else { mean };
        Vec::<f64>::try_from(&v.f_mean_dim(0, false, Kind::Double).torch()?.f_to_device(Device::Cpu).torch()?).torch()
    }

    /// Appends the decoded points of perturbation `p` over `grid` in covariates `covs`; returns
    /// the curve's R2 against the truth (per-gene changes, responses) where the truth has at least
    /// two of its doses.
    #[allow(clippy::too_many_arguments)]
    fn curve(
        &self,
        covs: &[u32],
        encoded: &Encoded,
        p: u32,
        grid: &[f64],
        observed_with: &HashMap<(Vec<u32>, u32), BTreeSet<u32>>,
        noise: &mut Noise,
        decoded: &mut Vec<DecodedPoint>,
        gene_points: &mut Vec<GenePoint>,
    ) -> Result<Option<(f64, f64)>> {
        let model = self.model;
        let vocab = model.vocabulary();
        let n = encoded.n;
        let curve = tch::no_grad(|| -> cpa_stream_stages::Result<Vec<Vec<f64>>> {
            let mut perts = PerturbationCsr::new();
            grid.iter()
                .map(|&dose| {
                    perts.clear();
                    perts.push_repeated(&[(p, dose as f32)], n);
                    let z_pert = model.perturbation_latent(&perts.to_device(model.device())?)?;
                    self.average(encoded, &z_pert, noise)
                })
                .collect()
        })
        .map_err(Error::stage(Stage::Predictor))?;
        let origin = &encoded.origin;
        let truth_control =
            self.truth.iter().find(|(k, _)| k.covariates == covs && k.is_control()).map(|(_, row)| &row.mean_log1p);
        let seen = observed_with.get(&(covs.to_vec(), p));
        let top = curve.last().map(|m| top_genes(m, origin, DEFAULT_TOP_GENES)).unwrap_or_default();
        let genes: &[usize] = if self.gene_index.is_empty() { &top } else { self.gene_index };
        let labels: Vec<String> = covs
            .iter()
            .zip(&vocab.covariates)
            .map(|(&c, cov)| cov.categories.get(c as usize).cloned().unwrap_or_default())
            .collect();
        let (mut fit_delta, mut fit_response) = (Vec::new(), Vec::new());
        for (&dose, mean) in grid.iter().zip(curve) {
            let delta: Vec<f64> = mean.iter().zip(origin).map(|(m, o)| m - o).collect();
            let truth_delta: Option<Vec<f64>> = if dose == 0.0 {
                truth_control.map(|c| vec![0.0; c.len()])
            } else {
                let key = ConditionKey::of(covs, &[(p, dose as f32)]);
                self.truth
                    .get(&key)
                    .zip(truth_control)
                    .map(|(t, c)| t.mean_log1p.iter().zip(c).map(|(a, b)| a - b).collect())
            };
            let response = norm(&delta);
            let true_response = truth_delta.as_deref().map_or(f64::NAN, norm);
            if let Some(t) = &truth_delta {
                fit_delta.extend(delta.iter().copied().zip(t.iter().copied()));
                fit_response.push((response, true_response));
            }
            let point = decoded.len();
            decoded.push(DecodedPoint {
                covariates: labels.clone(),
                perturbation: vocab.perturbations[p as usize].clone(),
                dose,
                response,
                true_response,
                observed: seen.is_some_and(|s| s.contains(&(dose as f32).to_bits())),
                cells: n as u64,
            });
            for &g in genes {
                gene_points.push(GenePoint {
                    point,
                    gene: g,
                    predicted: mean[g],
                    delta: delta[g],
                    true_delta: truth_delta.as_ref().map_or(f64::NAN, |t| t[g]),
                });
            }
        }
        // A curve is compared with the truth where the truth has at least two of its doses.
        if fit_response.len() < 2 {
            return Ok(None);
        }
        Ok(Some((r2(&fit_delta), r2(&fit_response))))
    }
}

/// The `k` genes whose mean changes most (absolute) from `origin` to `mean`.
fn top_genes(mean: &[f64], origin: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..mean.len()).collect();
    order.sort_by(|&a, &b| (mean[b] - origin[b]).abs().total_cmp(&(mean[a] - origin[a]).abs()));
    order.truncate(k);
    order
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// R2 (sklearn's: 1 - residual / total sum of squares) of predictions against truth, from
/// (predicted, true) pairs; NaN when the truth is constant.
fn r2(pairs: &[(f64, f64)]) -> f64 {
    let n = pairs.len() as f64;
    let mean = pairs.iter().map(|p| p.1).sum::<f64>() / n;
    let total: f64 = pairs.iter().map(|p| (p.1 - mean).powi(2)).sum();
    let residual: f64 = pairs.iter().map(|p| (p.1 - p.0).powi(2)).sum();
    if total > 0.0 { 1.0 - residual / total } else { f64::NAN }
}

fn schema(fields: Vec<Field>) -> Arc<Schema> {
    Arc::new(Schema::new(fields))
}

fn latent_batch(points: &[LatentPoint]) -> std::result::Result<RecordBatch, arrow_schema::ArrowError> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(points.iter().map(|p| p.perturbation.as_str()))),
        Arc::new(Float64Array::from_iter_values(points.iter().map(|p| p.dose))),
        Arc::new(Float64Array::from_iter_values(points.iter().map(|p| p.response))),
        Arc::new(Float64Array::from_iter_values(points.iter().map(|p| p.norm))),
        Arc::new(BooleanArray::from_iter(points.iter().map(|p| Some(p.observed)))),
    ];
    RecordBatch::try_new(
        schema(vec![
            Field::new("perturbation", DataType::Utf8, false),
            Field::new("dose", DataType::Float64, false),
            Field::new("response", DataType::Float64, false),
            Field::new("norm", DataType::Float64, false),
            Field::new("observed", DataType::Boolean, false),
        ]),
        columns,
    )
}

/// Covariate columns (one per covariate, named as obs names it), then the given columns.
fn with_covariates(
    names: &[String],
    rows: &[&DecodedPoint],
    rest: Vec<(Field, ArrayRef)>,
) -> std::result::Result<RecordBatch, arrow_schema::ArrowError> {
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        fields.push(Field::new(name, DataType::Utf8, false));
        columns.push(Arc::new(StringArray::from_iter_values(rows.iter().map(|p| p.covariates[i].as_str()))));
    }
    fields.push(Field::new("perturbation", DataType::Utf8, false));
    columns.push(Arc::new(StringArray::from_iter_values(rows.iter().map(|p| p.perturbation.as_str()))));
    fields.push(Field::new("dose", DataType::Float64, false));
    columns.push(Arc::new(Float64Array::from_iter_values(rows.iter().map(|p| p.dose))));
    for (f, c) in rest {
        fields.push(f);
        columns.push(c);
    }
    RecordBatch::try_new(schema(fields), columns)
}

fn decoded_batch(
    names: &[String],
    points: &[DecodedPoint],
) -> std::result::Result<RecordBatch, arrow_schema::ArrowError> {
    let rows: Vec<&DecodedPoint> = points.iter().collect();
    let float = |name: &str, f: fn(&DecodedPoint) -> f64| -> (Field, ArrayRef) {
        (Field::new(name, DataType::Float64, false), Arc::new(Float64Array::from_iter_values(points.iter().map(f))))
    };
    with_covariates(
        names,
        &rows,
        vec![
            float("response", |p| p.response),
            float("true_response", |p| p.true_response),
            (
                Field::new("observed", DataType::Boolean, false),
                Arc::new(BooleanArray::from_iter(points.iter().map(|p| Some(p.observed)))),
            ),
            (
                Field::new("cells", DataType::UInt64, false),
                Arc::new(UInt64Array::from_iter_values(points.iter().map(|p| p.cells))),
            ),
        ],
    )
}

fn genes_batch(
    names: &[String],
    genes: &[String],
    points: &[DecodedPoint],
    rows: &[GenePoint],
) -> std::result::Result<RecordBatch, arrow_schema::ArrowError> {
    let of: Vec<&DecodedPoint> = rows.iter().map(|r| &points[r.point]).collect();
    let float = |name: &str, f: fn(&GenePoint) -> f64| -> (Field, ArrayRef) {
        (Field::new(name, DataType::Float64, false), Arc::new(Float64Array::from_iter_values(rows.iter().map(f))))
    };
    with_covariates(
        names,
        &of,
        vec![
            (
                Field::new("gene", DataType::Utf8, false),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| genes[r.gene].as_str()))),
            ),
            float("predicted", |r| r.predicted),
            float("delta", |r| r.delta),
            float("true_delta", |r| r.true_delta),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_grid_spans_the_largest_dose_and_keeps_the_observed_ones() {
        let seen: BTreeSet<u32> = [0.01f32, 0.1, 1.0].iter().map(|d| d.to_bits()).collect();
        let grid = dose_grid(None, Some(&seen));
        assert_eq!(grid[0], 0.0);
        assert_eq!(grid.last().copied(), Some(1.0));
        for d in [0.01f32, 0.1] {
            assert!(grid.iter().any(|&g| g as f32 == d), "{d} missing from {grid:?}");
        }
        assert_eq!(grid.len(), DEFAULT_GRID_POINTS + 2, "{grid:?}");
        assert!(grid.windows(2).all(|w| w[0] < w[1]));
        // Without observations: 0 to 1.
        let plain = dose_grid(None, None);
        assert_eq!((plain.len(), plain[0], plain[DEFAULT_GRID_POINTS - 1]), (DEFAULT_GRID_POINTS, 0.0, 1.0));
        // A given grid is sorted and deduplicated at float32 precision.
        assert_eq!(dose_grid(Some(&[1.0, 0.5, 0.5 + 1e-12, 0.0]), None), vec![0.0, 0.5, 1.0]);
    }

    #[test]
    fn r2_and_top_genes_by_hand() {
        // Truth 1, 2, 3 (mean 2, total 2); predictions off by 1 once: residual 1 -> R2 0.5.
        assert!((r2(&[(1.0, 1.0), (3.0, 2.0), (3.0, 3.0)]) - 0.5).abs() < 1e-12);
        assert!(r2(&[(1.0, 2.0), (3.0, 2.0)]).is_nan());
        assert_eq!(top_genes(&[1.0, -3.0, 0.5, 2.0], &[0.0; 4], 2), vec![1, 3]);
        assert!((norm(&[3.0, 4.0]) - 5.0).abs() < 1e-12);
    }
}
