//! The predictor: the model stage of prediction. [`Predictor::open`] loads a trained model,
//! checks it against the store and resolves the targets, genes and output schema; on the thread
//! that owns it, [`Predictor::predict`] encodes each batch of source cells once, keeps their
//! `z_basal`, adds every target's perturbations, doses and covariates, and decodes the means with
//! the cells' own library sizes into Arrow record batches.
//!
//! The `predict` command wires it: source selection -> batcher -> predictor -> sink (or a
//! `RecordBatchReader`, [`Predictor::stream`]).

pub mod aggregate;
mod buffers;
mod counts;
mod genes;
pub mod options;
mod step;
pub(crate) use step::to_anchor_space;
pub mod targets;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::config::DispersionInit;
use crate::model::layers::Noise;
use crate::model::{CpaModel, Vocabulary};
use arrow_schema::SchemaRef;
use cpa_stream_schemas::tables::prediction_schema;
use cpa_stream_schemas::tables::predictions::{
    ANCHORED, CHANGE_LOG1P, COUNTS, ENSEMBLE_KEY, EXPECTED_LOG1P, MODEL_ID_KEY, MODEL_KEY, STORE_KEY,
};
use cpa_stream_stages::store::Store;
pub use options::{Anchoring, DEFAULT_BATCH_SIZE, GeneSelection, Layout, PredictOptions, Shard};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use targets::{Target, resolve_target};
use tch::{Device, Tensor};

use crate::Stage;
use crate::opened::Opened;
use crate::torch::{TorchResult, torch_error};
use buffers::BufferPool;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::obs::ObsKeys;
use cpa_stream_pipeline::obs::expr::Expr;

/// The labels of one kind of source cell (condition, doses, covariates), resolved against the
/// model's vocabulary where it could be.
#[derive(Debug)]
pub struct CellGroup {
    /// The condition as obs writes it.
    pub condition: String,
    /// The doses as obs writes them (`1` per part without a dose column).
    pub dose: String,
    /// `Err`: why the condition does not fit the model (an error only where it is needed).
    pub parts: std::result::Result<Vec<(u32, f32)>, String>,
    /// Each covariate's code in the model (`None`: a category the model does not know).
    pub covariates: Vec<Option<u32>>,
    /// Each covariate's value as obs writes it.
    pub covariate_values: Vec<String>,
    /// The values of the aggregate's extra group-by obs columns (`None`: null).
    pub by_values: Vec<Option<String>>,
}

/// A batch of selected source cells: store rows (ascending), ids and label groups.
#[derive(Debug, Default)]
pub struct SourceCells {
    /// Store rows.
    pub rows: Vec<u64>,
    /// Cell ids.
    pub ids: Vec<String>,
    /// Each cell's labels (shared by the cells of one group).
    pub groups: Vec<Arc<CellGroup>>,
}

/// A prepared prediction, and the stage that runs it: model loaded, targets and genes resolved,
/// output schema known.
///
/// A tiny synthetic atlas, one epoch of training, and a counterfactual streamed as Arrow record
/// batches:
///
/// ```
/// use cpa_stream_pipeline::RunContext;
/// use cpa_stream_pipeline::encoder::EncoderOptions;
/// use cpa_stream_engine::predictor::targets::parse_target_spec;
/// use cpa_stream_engine::predictor::{PredictOptions, Predictor};
/// use cpa_stream_pipeline::synth::{self, SynthOptions};
/// use cpa_stream_engine::train::{self, TrainOptions};
/// use cpa_stream_stages::synth::SynthConfig;
///
/// let dir = tempfile::tempdir()?;
/// let store = dir.path().join("atlas.store");
/// // 300 cells x 20 genes, 2 perturbations, 1 dose, 1 cell type.
/// synth::run(&SynthOptions::new(SynthConfig::new(300, 20, 2, 1, 1, 0, 7), &store), &RunContext::default())?;
///
/// let mut options = TrainOptions { store: store.clone(), out: dir.path().join("run"), ..TrainOptions::default() };
/// options.encoder = EncoderOptions { dose_key: Some("dose".into()), ..EncoderOptions::default() };
/// options.config.model.n_latent = 4;
/// options.config.model.n_hidden_encoder = 16;
/// options.config.model.n_hidden_decoder = 16;
/// options.epochs = Some(1);
/// train::run(&options, &RunContext::default())?;
///
/// let mut options = PredictOptions::new(dir.path().join("run"), &store);
/// options.targets = vec![parse_target_spec("condition=PERT01,dose=1")?];
/// let predictor = Predictor::open(&options)?;
/// assert_eq!(predictor.genes().len(), 20);
/// let mut rows = 0;
/// for batch in predictor.stream()? {
///     rows += batch?.num_rows(); // cell_id, condition, dose, is_anchored, mean, anchored (20 floats each)
/// }
/// assert!(rows > 0, "one row per control cell");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Predictor {
    store: Arc<Store>,
    model: CpaModel,
    /// The ensemble's further models ([`PredictOptions::ensemble`]), each column the mean over
    /// `model` and these.
    members: Vec<Member>,
    keys: ObsKeys,
    source: Expr,
    targets: Vec<Target>,
    /// Indices of the written genes among the model's (`None`: all), on the host and, made on
    /// first use, on the model's device.
    gene_index: Option<Vec<i64>>,
    gene_tensor: Option<Tensor>,
    genes: Vec<String>,
    latents: Vec<String>,
    /// The nb dispersion of the written genes, on the model's device, when `expected_log1p` or
    /// `change_log1p` is written.
    theta: Option<Tensor>,
    /// The draws of `counts` (`predict --counts`).
    counts: Option<counts::CountSampler>,
    schema: SchemaRef,
    rows: Range<u64>,
    options: PredictOptions,
    /// The posterior draws of a variational model.
    noise: Noise,
    /// The perturbations `model` gives no effect: a target of these alone is decoded as the
    /// control ([`knows_nothing_of`](crate::model::network::knows_nothing_of)).
    effectless: Vec<u32>,
    /// Whether `anchored` and `is_anchored` are written ([`Anchoring::writes_column`]).
    anchored_column: bool,
    /// Output buffers: the means, the expected log1p, the change and the anchored prediction if
    /// written, then each latent.
    pools: Vec<BufferPool>,
    /// The running aggregates (`predict --aggregate`), instead of per-cell rows.
    aggregator: Option<aggregate::Aggregator>,
    /// The obs columns of the source cells that group them besides the labels (aggregates).
    group_by_obs: Vec<String>,
}

/// A further model of an ensemble, with what [`Predictor`] holds per model.
struct Member {
    model: CpaModel,
    /// As [`Predictor`]'s `theta`, for this model.
    theta: Option<Tensor>,
    /// As [`Predictor`]'s `effectless`, for this model.
    effectless: Vec<u32>,
}

/// The model directory's weights hash, `xxh3-64:HEX` ([`MODEL_ID_KEY`]).
fn model_id(dir: &Path) -> Result<String> {
    let weights = dir.join(crate::model::files::WEIGHTS_FILE);
    let (_, hash) = cpa_stream_stages::store::file_checksum(&weights).map_err(Error::io(&weights))?;
    Ok(format!("xxh3-64:{hash}"))
}

/// Checks that an ensemble's model `member` (at `dir`) reads and writes what its first model
/// does: the same genes, perturbations, covariates, obs keys and likelihood
/// family, so that a target means the same to both and their columns can be averaged.
fn check_member(first: &CpaModel, member: &CpaModel, dir: &Path) -> Result<()> {
    let (a, b) = (first.vocabulary(), member.vocabulary());
    let differ = |detail: String| {
        Err(Error::InvalidInput(format!(
            "ensemble member {}: {detail}; an ensemble's runs are trained on one store with the same keys (say \
             one recipe with several seeds)",
            dir.display()
        )))
    };
    let only = |x: &[String], y: &[String]| x.iter().find(|v| !y.contains(v)).cloned();
    let which = |what: &str, x: &[String], y: &[String]| match (only(y, x), only(x, y)) {
        (Some(v), _) => format!("{what} {v:?} is known to this run and not to the first model's"),
        (None, Some(v)) => format!("{what} {v:?} is known to the first model's run and not to this one"),
        (None, None) => format!("its {what}s are in another order than the first model's"),
    };
    if a.genes != b.genes {
        return differ(which("gene", &a.genes, &b.genes));
    }
    if a.perturbations != b.perturbations {
        return differ(which("perturbation", &a.perturbations, &b.perturbations));
    }
    let names = |v: &Vocabulary| v.covariates.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    if names(a) != names(b) {
        return differ(format!("covariates {:?} where the first model has {:?}", names(b), names(a)));
    }
    for (x, y) in a.covariates.iter().zip(&b.covariates) {
        if x.is_batch != y.is_batch {
            return differ(format!("covariate {:?} is the batch key in one run and not in the other", x.name));
        }
        if x.categories != y.categories {
            return differ(format!("covariate {:?}: {}", x.name, which("value", &x.categories, &y.categories)));
        }
    }
    let keys = |v: &Vocabulary| v.data.as_ref().map(|d| (d.perturbation_key.clone(), d.dose_key.clone()));
    if keys(a) != keys(b) {
        return differ(format!("obs keys (condition, dose) {:?} where the first model has {:?}", keys(b), keys(a)));
    }
    let trained = |v: &Vocabulary| v.data.as_ref().map(|d| (d.split.clone(), d.cells));
    if trained(a) != trained(b) {
        tracing::warn!(
            "ensemble member {}: trained on other cells or with another split than the first model; its predictions \
             are averaged all the same (a member that trained on cells the others held out scores them as seen)",
            dir.display()
        );
    }
    let (x, y) = (first.config().model.recon_loss, member.config().model.recon_loss);
    if x.is_count() != y.is_count() {
        return differ(format!(
            "likelihood {y:?} where the first model has {x:?} (a count model and a Gaussian one predict in different spaces)"
        ));
    }
    Ok(())
}

/// An ensemble's models beside its first, as [`open_members`] opens them.
pub(crate) struct Members {
    /// Every model's directory and weights hash (`xxh3-64:HEX`), the first model's first.
    pub(crate) ids: Vec<(PathBuf, String)>,
    /// The further models, in the order given.
    pub(crate) models: Vec<CpaModel>,
}

/// Opens an ensemble's further models `paths` beside its first (`model`, at `dir`) on `store`:
/// each checked against the first ([`check_member`]) and refused when it is a model already
/// opened (by its weights' hash).
pub(crate) fn open_members(
    model: &CpaModel,
    dir: &Path,
    paths: &[PathBuf],
    store: &Path,
    device: Device,
    stage: Stage,
) -> Result<Members> {
    let mut ids = vec![(dir.to_owned(), model_id(dir)?)];
    let mut members = Vec::with_capacity(paths.len());
    for path in paths {
        // Whatever the member's run cannot do on this store is said of the member, not of the
        // first model.
        let Opened { dir: member_dir, model: member, .. } =
            Opened::open(path, store, device, stage).map_err(|e| match e {
                Error::InvalidInput(_) | Error::Stage { .. } => {
                    Error::InvalidInput(format!("ensemble member {}: {e}", path.display()))
                }
                other => other,
            })?;
        check_member(model, &member, &member_dir)?;
        let id = model_id(&member_dir)?;
        if let Some((same, _)) = ids.iter().find(|(_, other)| *other == id) {
            return Err(Error::InvalidInput(format!(
                "ensemble member {}: the same model ({id}) as {}; an ensemble averages different runs",
                member_dir.display(),
                same.display()
            )));
        }
        ids.push((member_dir, id));
        members.push(member);
    }
    Ok(Members { ids, models: members })
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor")
            .field("store", &self.store.path())
            .field("targets", &self.targets.len())
            .field("genes", &self.genes.len())
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

/// The dispersion of the genes `index` (all: `None`) of an nb model, for `expected_log1p` and
/// `change_log1p` (`change`: the flag that asked, for the error).
fn written_theta(model: &CpaModel, dir: &Path, index: Option<&[i64]>, change: bool) -> Result<Tensor> {
    let torch = Error::stage(Stage::Predictor);
    let theta = model.nb_theta().map_err(torch)?.ok_or_else(|| {
        Error::InvalidInput(format!(
            "{}: {} needs a model with the nb likelihood (its dispersion); this one is {:?}",
            dir.display(),
            if change { "--change" } else { "--expected-log1p" },
            model.config().model.recon_loss
        ))
    })?;
    if model.config().model.dispersion_init == DispersionInit::Random {
        tracing::warn!(
            "{}: {} uses the model's dispersion, which started as random draws (model.dispersion_init = \"random\", \
             the reference's start) and moves little in a run of a few thousand steps or fewer; a model trained with \
             dispersion_init = \"moments\" starts from the data's",
            dir.display(),
            if change { "--change" } else { "--expected-log1p" }
        );
    }
    of_genes(theta, index)
}

/// The entries `index` (all: `None`) of a per-gene tensor of the model.
fn of_genes(per_gene: Tensor, index: Option<&[i64]>) -> Result<Tensor> {
    let Some(index) = index else { return Ok(per_gene) };
    Tensor::f_from_slice(index)
        .and_then(|i| i.f_to_device(per_gene.device()))
        .and_then(|i| per_gene.f_index_select(0, &i))
        .map_err(|e| Error::stage(Stage::Predictor)(torch_error(e)))
}

/// The sampler of `predict --counts` for the written genes `index` (all: `None`) of `model`: a
/// count model (nb, zinb), alone (not an ensemble), writing per-cell rows (not aggregates).
fn count_sampler(
    model: &CpaModel,
    dir: &Path,
    options: &PredictOptions,
    index: Option<&[i64]>,
    genes: &[String],
) -> Result<counts::CountSampler> {
    let torch = Error::stage(Stage::Predictor);
    let Some(theta) = model.count_theta().map_err(torch)? else {
        return Err(Error::InvalidInput(format!(
            "{}: --counts draws counts from the model's count distribution, and this model's likelihood is gauss \
             (a mean and variance of normalised expression, with no counts to draw); train with \
             model.recon_loss = \"nb\" or \"zinb\" on raw counts",
            dir.display()
        )));
    };
    if !options.ensemble.is_empty() {
        return Err(Error::InvalidInput(
            "--counts with an ensemble: counts are drawn from one model's distribution, and an ensemble's mean is \
             the mean of several; draw counts from one run"
                .to_owned(),
        ));
    }
    if options.aggregate.is_some() {
        return Err(Error::InvalidInput(
            "--counts with --aggregate: counts are one draw per cell, and their mean over a group estimates, with \
             sampling noise, the group's `mean` that --aggregate mean writes without it; write per-cell rows"
                .to_owned(),
        ));
    }
    if model.config().model.dispersion_init == DispersionInit::Random {
        tracing::warn!(
            "{}: --counts draws with the model's dispersion, which started as random draws (model.dispersion_init = \
             \"random\", the reference's start) and moves little in a run of a few thousand steps or fewer, so the \
             counts' spread around the predicted means is the start's rather than the data's; a model trained with \
             dispersion_init = \"moments\" starts from the data's",
            dir.display()
        );
    }
    let theta = of_genes(theta, index)?
        .f_to_kind(tch::Kind::Float)
        .and_then(|t| t.f_to_device(tch::Device::Cpu))
        .and_then(|t| Vec::<f32>::try_from(&t))
        .map_err(|e| torch(torch_error(e)))?;
    counts::CountSampler::new(&theta, genes, options.seed, &dir.display().to_string())
}

/// Warns when targets hold perturbations that no training cell had: the model knows nothing of
/// them. A model of this version gives them a zero embedding (no effect, so a combination is
/// predicted as its trained parts); one trained before holds a random start for them.
fn warn_untrained(model: &CpaModel, vocab: &Vocabulary, targets: &[Target]) -> cpa_stream_stages::Result<()> {
    if model.perturbation_feature_width().is_some() {
        // Projected features: an untrained perturbation is placed by its features.
        return Ok(());
    }
    let untrained = vocab.untrained_perturbations();
    let mut named: Vec<u32> =
        targets.iter().flat_map(|t| t.parts.iter().map(|&(id, _)| id)).filter(|id| untrained.contains(id)).collect();
    named.sort_unstable();
    named.dedup();
    if named.is_empty() {
        return Ok(());
    }
    let rows = Tensor::f_from_slice(&named.iter().map(|&id| i64::from(id)).collect::<Vec<_>>())
        .torch()?
        .f_to_device(model.device())
        .torch()?;
    let magnitude =
        model.perturbation_embeddings()?.f_index_select(0, &rows).torch()?.f_abs().torch()?.f_max().torch()?;
    let random = magnitude.f_double_value(&[]).torch()? > 0.0;
    let names: Vec<&str> = named.iter().map(|&id| vocab.perturbations[id as usize].as_str()).collect();
    if random {
        tracing::warn!(
            "targets hold perturbations without training cells ({}): this model was trained by an earlier \
             version, which left them random embeddings, so their predictions are noise; retrain it with this one",
            names.join(", ")
        );
    } else {
        tracing::warn!(
            "targets hold perturbations without training cells ({}): the model knows nothing of them and \
             predicts them as having no effect (alone, as the control; in a combination, as its trained parts)",
            names.join(", ")
        );
    }
    Ok(())
}

impl Predictor {
    /// Loads the model, checks it against the store, and resolves source, targets and genes.
    pub fn open(options: &PredictOptions) -> Result<Predictor> {
        let Opened { dir, model, store, .. } =
            Opened::open(&options.model, &options.store, options.device, Stage::Predictor)?;
        let vocab = &model.vocabulary().clone();
        let config = model.config().clone();
        if options.batch_corrected && !vocab.covariates.iter().any(|c| c.is_batch) {
            return Err(Error::InvalidInput(format!(
                "{}: a batch-corrected prediction needs a model trained with a batch key (train --batch-key); this \
                 one has covariates {:?} and no batch",
                dir.display(),
                vocab.covariates.iter().map(|c| c.name.as_str()).collect::<Vec<_>>()
            )));
        }
        let keys = ObsKeys::of(vocab);
        let source = match &options.source {
            Some(text) => text.parse::<Expr>()?,
            None => Expr::Eq(keys.perturbation.clone(), vocab.control().to_owned()),
        };
        let max_comb_len = config.model.max_comb_len;
        let targets = options
            .targets
            .iter()
            .map(|spec| resolve_target(spec, vocab, &keys.perturbation, keys.dose.as_deref(), max_comb_len))
            .collect::<Result<Vec<_>>>()?;
        let targets = targets::spell_as_obs(targets, &store, &keys.perturbation, keys.dose.as_deref())?;
        warn_untrained(&model, vocab, &targets).map_err(Error::stage(Stage::Predictor))?;
        let (gene_index, genes) =
            genes::select_genes(&options.genes, vocab, &targets, &keys, &store, options.degs.as_deref())?;
        let mut label_columns = vec![keys.perturbation.clone(), keys.dose_output.clone()];
        label_columns.extend(vocab.covariates.iter().map(|c| c.name.clone()));
        let latent_width = i32::try_from(config.model.n_latent).unwrap_or(i32::MAX);
        let wants_theta = options.expected_log1p || options.change;
        let theta =
            if wants_theta { Some(written_theta(&model, &dir, gene_index.as_deref(), options.change)?) } else { None };
        if !options.ensemble.is_empty() && !options.latents.is_empty() {
            return Err(Error::InvalidInput(format!(
                "latents ({}) with an ensemble: each model's latent space is its own, so an ensemble averages \
                 predictions, not latents; ask for latents from one run",
                options.latents.join(", ")
            )));
        }
        let Members { ids, models: opened } =
            open_members(&model, &dir, &options.ensemble, &options.store, options.device, Stage::Predictor)?;
        let mut members = Vec::with_capacity(opened.len());
        for ((member_dir, _), member) in ids.iter().skip(1).zip(opened) {
            warn_untrained(&member, vocab, &targets).map_err(Error::stage(Stage::Predictor))?;
            let theta = if wants_theta {
                Some(written_theta(&member, member_dir, gene_index.as_deref(), options.change)?)
            } else {
                None
            };
            let effectless = member.effectless_perturbations().map_err(Error::stage(Stage::Predictor))?;
            members.push(Member { model: member, theta, effectless });
        }
        let anchored_column = options.anchoring.writes_column(!targets.is_empty());
        let counts = match options.counts {
            true => Some(count_sampler(&model, &dir, options, gene_index.as_deref(), &genes)?),
            false => None,
        };
        let gene_columns: Vec<&str> = [
            (options.expected_log1p, EXPECTED_LOG1P),
            (options.change, CHANGE_LOG1P),
            (anchored_column, ANCHORED),
            (options.counts, COUNTS),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        let schema = prediction_schema(&label_columns, &genes, &gene_columns, &options.latents, latent_width)
            .map_err(|e| Error::InvalidInput(format!("predictions of {}: {e}", dir.display())))?;
        let mut metadata = schema.metadata().clone();
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned()).display().to_string();
        metadata.insert(MODEL_KEY.to_owned(), absolute(&dir));
        metadata.insert(STORE_KEY.to_owned(), absolute(&options.store));
        metadata.insert(MODEL_ID_KEY.to_owned(), ids[0].1.clone());
        if !members.is_empty() {
            let list: Vec<serde_json::Value> =
                ids.iter().map(|(dir, id)| serde_json::json!({ "model": absolute(dir), "model_id": id })).collect();
            metadata.insert(ENSEMBLE_KEY.to_owned(), serde_json::Value::Array(list).to_string());
        }
        let schema = Arc::new(schema.as_ref().clone().with_metadata(metadata));
        let (aggregator, group_by_obs, schema) = match &options.aggregate {
            None => (None, Vec::new(), schema),
            Some(aggregate) => {
                if options.layout == Layout::Wide {
                    return Err(Error::InvalidInput(
                        "aggregates are written in the long layout (a list column per statistic); the wide layout \
                         is for per-cell rows"
                            .to_owned(),
                    ));
                }
                if aggregate.statistics.is_empty() {
                    return Err(Error::InvalidInput("aggregate: no statistic given (mean, var)".to_owned()));
                }
                let group_by = aggregate::GroupBy::resolve(aggregate, vocab, &keys)?;
                let labels = &label_columns[..2];
                let aggregated = aggregate::aggregate_schema(&schema, labels, &group_by, &aggregate.statistics)?;
                let widths = schema
                    .fields()
                    .iter()
                    .filter_map(|f| match f.data_type() {
                        arrow_schema::DataType::FixedSizeList(_, w) => Some(*w as usize),
                        _ => None,
                    })
                    .collect();
                let obs = group_by.obs_columns.clone();
                let aggregator = aggregate::Aggregator::new(
                    group_by,
                    &aggregate.statistics,
                    widths,
                    model.device(),
                    Arc::clone(&aggregated),
                );
                (Some(aggregator), obs, aggregated)
            }
        };
        let rows = options.shard.map_or(0..store.n_obs(), |s| s.rows(store.n_obs()));
        let noise = Noise::new(Xoshiro256PlusPlus::seed_from_u64(options.seed), model.device());
        let effectless = model.effectless_perturbations().map_err(Error::stage(Stage::Predictor))?;
        Ok(Predictor {
            store,
            model,
            effectless,
            members,
            keys,
            source,
            targets,
            gene_index,
            gene_tensor: None,
            genes,
            pools: vec![BufferPool::default(); 1 + gene_columns.len() + options.latents.len()],
            latents: options.latents.clone(),
            theta,
            counts,
            schema,
            rows,
            options: options.clone(),
            noise,
            anchored_column,
            aggregator,
            group_by_obs,
        })
    }

    /// The schema of every batch.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// The genes of the `mean` column, in order.
    pub fn genes(&self) -> &[String] {
        &self.genes
    }

    /// The resolved targets (empty: reconstruction).
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Store rows this prediction reads (the shard).
    pub fn rows(&self) -> Range<u64> {
        self.rows.clone()
    }

    /// The options it was opened with.
    pub fn options(&self) -> &PredictOptions {
        &self.options
    }

    /// The store it reads.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The model's vocabulary.
    pub fn vocabulary(&self) -> &Vocabulary {
        self.model.vocabulary()
    }

    /// The obs columns the model was trained with.
    pub fn keys(&self) -> &ObsKeys {
        &self.keys
    }

    /// The source cells' selection.
    pub fn source(&self) -> &Expr {
        &self.source
    }

    /// Most parts of a combination the model takes.
    pub fn max_comb_len(&self) -> usize {
        self.model.config().model.max_comb_len
    }

    /// The obs columns the source stage reads for the aggregate's groups.
    pub fn group_by_obs(&self) -> &[String] {
        &self.group_by_obs
    }

    /// Whether this prediction writes aggregates instead of per-cell rows.
    pub fn aggregates(&self) -> bool {
        self.aggregator.is_some()
    }

    /// The aggregate rows, once every batch has passed (none for per-cell predictions).
    pub fn finish_aggregates(&self) -> Result<Vec<arrow_array::RecordBatch>> {
        match &self.aggregator {
            Some(a) => a.finish(),
            None => Ok(Vec::new()),
        }
    }

    /// Output rows per source cell: one per target, or one reconstruction.
    pub fn passes(&self) -> usize {
        self.targets.len().max(1)
    }
}
