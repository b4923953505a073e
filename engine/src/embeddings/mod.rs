//! A trained model's learned embeddings as tables: one row per perturbation (the vectors that,
//! scaled by the dose response, are added to a cell's basal latent) and one row per category of
//! each covariate. What cpa-tools calls `get_pert_embeddings` and `get_covar_embeddings`.

mod request;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::CpaModel;
use crate::model::files::load_model;
use arrow_array::{ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

pub use request::EmbeddingsRequest;

use crate::Stage;
use crate::torch::torch_error;
use cpa_stream_pipeline::context::RunContext;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::run_dir::model_dir;

/// Column of the perturbation (or covariate category) name.
pub const NAME: &str = "name";
/// Column of the covariate (obs column) a category belongs to.
pub const COVARIATE: &str = "covariate";
/// Column that marks the control condition's row.
pub const IS_CONTROL: &str = "is_control";
/// Column of the embedding vector (`FixedSizeList<Float32>`, the latent width).
pub const EMBEDDING: &str = "embedding";

/// Which model's embeddings, and where [`run`] writes them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbeddingsOptions {
    /// A run directory (its `model/` is used) or a model directory.
    pub model: PathBuf,
    /// The output directory of [`run`].
    pub out: Option<PathBuf>,
    /// Replace an existing embeddings directory; default false.
    pub overwrite: bool,
}

/// Both tables of a model's embeddings.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// [`perturbation_embeddings`]'s table.
    pub perturbations: RecordBatch,
    /// [`covariate_embeddings`]'s table.
    pub covariates: RecordBatch,
}

/// The model's embeddings, read once.
pub fn open(options: &EmbeddingsOptions) -> Result<Embeddings> {
    let dir = model_dir(&options.model)?;
    let model = load_model(&dir, Device::Cpu).map_err(Error::stage(Stage::Embeddings))?;
    Ok(Embeddings { perturbations: perturbations_of(&model, &dir)?, covariates: covariates_of(&model, &dir)? })
}

/// The perturbation embeddings of the model at `model` (a run or model directory): columns
/// [`NAME`], [`IS_CONTROL`], [`EMBEDDING`], one row per perturbation of the vocabulary (the
/// padding entry left out). A model trained with perturbation features gives the projected
/// features.
pub fn perturbation_embeddings(model: &Path) -> Result<RecordBatch> {
    let dir = model_dir(model)?;
    let model = load_model(&dir, Device::Cpu).map_err(Error::stage(Stage::Embeddings))?;
    perturbations_of(&model, &dir)
}

fn perturbations_of(model: &CpaModel, dir: &Path) -> Result<RecordBatch> {
    let table = tch::no_grad(|| model.perturbation_embeddings()).map_err(Error::stage(Stage::Embeddings))?;
    let vocab = model.vocabulary();
    // Row 0 is the padding entry of the embedding bag.
    let names = &vocab.perturbations[1..];
    let rows = rows_of(&table.narrow(0, 1, names.len() as i64), dir)?;
    let control = vocab.control();
    let is_control = BooleanArray::from_iter(names.iter().map(|n| Some(n == control)));
    let columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(names)), Arc::new(is_control), rows];
    batch(&[(NAME, DataType::Utf8), (IS_CONTROL, DataType::Boolean)], columns)
}

/// The covariate embeddings of the model at `model`: columns [`COVARIATE`], [`NAME`] (the
/// category), [`EMBEDDING`], one row per category of each covariate, in code order.
pub fn covariate_embeddings(model: &Path) -> Result<RecordBatch> {
    let dir = model_dir(model)?;
    let model = load_model(&dir, Device::Cpu).map_err(Error::stage(Stage::Embeddings))?;
    covariates_of(&model, &dir)
}

fn covariates_of(model: &CpaModel, dir: &Path) -> Result<RecordBatch> {
    let vocab = model.vocabulary();
    let codes: Vec<Tensor> = vocab
        .covariates
        .iter()
        .map(|c| Tensor::arange(c.categories.len() as i64, (Kind::Int64, Device::Cpu)))
        .collect();
    let tables = tch::no_grad(|| model.covariate_latents(&codes)).map_err(Error::stage(Stage::Embeddings))?;
    let (mut covariate, mut name, mut parts) = (Vec::new(), Vec::new(), Vec::new());
    for (c, table) in vocab.covariates.iter().zip(&tables) {
        covariate.extend(std::iter::repeat_n(c.name.as_str(), c.categories.len()));
        name.extend(c.categories.iter().map(String::as_str));
        parts.push(table.shallow_clone());
    }
    let width = model.config().model.n_latent as i64;
    let all =
        if parts.is_empty() { Tensor::zeros([0, width], (Kind::Float, Device::Cpu)) } else { Tensor::cat(&parts, 0) };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(covariate)),
        Arc::new(StringArray::from_iter_values(name)),
        rows_of(&all, dir)?,
    ];
    batch(&[(COVARIATE, DataType::Utf8), (NAME, DataType::Utf8)], columns)
}

/// The rows of a 2-D tensor as a fixed-size list column.
fn rows_of(table: &Tensor, dir: &Path) -> Result<ArrayRef> {
    let torch = |e: tch::TchError| Error::stage(Stage::Embeddings)(torch_error(e));
    let width = i32::try_from(table.size().get(1).copied().unwrap_or(0))
        .map_err(|_| Error::InvalidInput(format!("{}: embedding width out of range", dir.display())))?;
    let values = Vec::<f32>::try_from(&table.f_to_kind(Kind::Float).map_err(torch)?.f_flatten(0, -1).map_err(torch)?)
        .map_err(torch)?;
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let list = FixedSizeListArray::try_new(item, width, Arc::new(Float32Array::from(values)), None)
        .map_err(Error::arrow("embedding table"))?;
    Ok(Arc::new(list))
}

fn batch(labels: &[(&str, DataType)], columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    let mut fields: Vec<Field> = labels.iter().map(|(n, t)| Field::new(*n, t.clone(), false)).collect();
    fields.push(Field::new(EMBEDDING, columns[columns.len() - 1].data_type().clone(), false));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(Error::arrow("embedding table"))
}

/// File of the perturbation embeddings in an embeddings directory.
pub const PERTURBATIONS_FILE: &str = "perturbations.parquet";
/// File of the covariate embeddings in an embeddings directory.
pub const COVARIATES_FILE: &str = "covariates.parquet";

/// What [`run`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingsReport {
    /// The output directory.
    pub out: PathBuf,
    /// Perturbation rows.
    pub perturbations: usize,
    /// Covariate category rows.
    pub covariate_categories: usize,
    /// Latent width.
    pub width: usize,
}

/// Writes the model's perturbation and covariate embeddings to `out/perturbations.parquet` and
/// `out/covariates.parquet`, published whole; an existing `out` only with `overwrite` (and only
/// if it holds nothing else).
pub fn run(options: &EmbeddingsOptions, ctx: &RunContext) -> Result<EmbeddingsReport> {
    use cpa_stream_stages::output::{OutputKind, claim_output};
    let out = options.out.as_deref().ok_or_else(|| {
        Error::InvalidInput("embeddings: no output directory given (`embeddings::open` reads them)".to_owned())
    })?;
    cpa_stream_stages::output::check_not_an_input(out, [cpa_stream_pipeline::run_dir::model_input(&options.model)])
        .map_err(Error::stage(Stage::Embeddings))?;
    let _lock = claim_output(out, OutputKind::Directory, options.overwrite).map_err(Error::stage(Stage::Embeddings))?;
    if out.exists() {
        cpa_stream_pipeline::run_dir::check_replaceable(
            out,
            &[PERTURBATIONS_FILE, COVARIATES_FILE],
            "an embeddings directory",
        )?;
    }
    let Embeddings { perturbations: perts, covariates: covs } = open(options)?;
    ctx.check_stopped()?;
    let width = match perts.schema().field_with_name(EMBEDDING).map(|f| f.data_type().clone()) {
        Ok(DataType::FixedSizeList(_, w)) => w as usize,
        _ => 0,
    };
    crate::model::files::publish_dir(out, |tmp| {
        let write = |name: &str, batch: &RecordBatch| {
            cpa_stream_stages::store::write_table(&tmp.join(name), batch.schema(), [batch.clone()])
        };
        write(PERTURBATIONS_FILE, &perts)?;
        write(COVARIATES_FILE, &covs)
    })
    .map_err(Error::stage(Stage::Embeddings))?;
    Ok(EmbeddingsReport {
        out: out.to_owned(),
        perturbations: perts.num_rows(),
        covariate_categories: covs.num_rows(),
        width,
    })
}
