//! A trained model opened on a store: the run's model directory found, the store opened, the
//! model loaded for the store's genes (checked to match), and, for the commands that compare a
//! model's conditions with the store's, the store's cells labelled as the model was trained.
//! One place for what predict, evaluate and dose-response share.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::{CpaModel, Vocabulary, load_model_for};
use cpa_stream_stages::store::Store;
use tch::Device;

use crate::Stage;
use cpa_stream_pipeline::encoder::{CellLabels, EncoderOptions};
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::obs::gene_names;
use cpa_stream_pipeline::run_dir::model_dir;
use cpa_stream_pipeline::telemetry::StageStats;

/// A model and the store it runs on.
pub(crate) struct Opened {
    /// The model directory (a run's `model/`).
    pub(crate) dir: PathBuf,
    pub(crate) model: CpaModel,
    pub(crate) store: Arc<Store>,
    /// The store's genes, which are the model's.
    pub(crate) genes: Vec<String>,
}

/// A store's cells labelled with a model's obs keys and split.
pub(crate) struct Labelled {
    pub(crate) labels: CellLabels,
    /// Why the store is not the one the run trained on (see [`other_store`]).
    pub(crate) other_store: Option<String>,
}

impl Opened {
    /// Opens the model at `model` (a run or model directory) on `device` and the store at
    /// `store`; errors of the model name `stage`, the command's.
    pub(crate) fn open(model: &Path, store: &Path, device: Device, stage: Stage) -> Result<Opened> {
        let dir = model_dir(model)?;
        let opened = Arc::new(Store::open(store).map_err(Error::stage(Stage::Reader))?);
        let genes = gene_names(&opened)?;
        let model = load_model_for(&dir, &genes, &store.display().to_string(), device).map_err(Error::stage(stage))?;
        Ok(Opened { dir, model, store: opened, genes })
    }

    /// The store's cells labelled with the obs keys, covariates and split the model recorded;
    /// a warning when the store is not the one the run trained on.
    pub(crate) fn label(&self, encoder_stats: &StageStats) -> Result<Labelled> {
        let vocab = self.model.vocabulary();
        let encoder = EncoderOptions::recorded(vocab, self.model.config().model.max_comb_len, &self.dir)?;
        let labels = encoder_stats.busy(|| CellLabels::from_store(&self.store, &encoder))?;
        encoder_stats.add(labels.n_cells(), labels.heap_bytes() as u64);
        let other_store = other_store(vocab, &labels, self.store.path());
        if let Some(why) = &other_store {
            tracing::warn!("{why}");
        }
        Ok(Labelled { labels, other_store })
    }
}

/// Whether `labels` (of `store`) hold the cells the model was trained from: `None` when they do
/// (in any order) or the model did not record them, else why not, for a warning.
pub(crate) fn other_store(vocab: &Vocabulary, labels: &CellLabels, store: &Path) -> Option<String> {
    let trained = vocab.data.as_ref()?.cells?;
    let here = labels.vocab.data.as_ref()?.cells?;
    (trained != here).then(|| {
        format!(
            "{} is not the store the run trained on: it holds {} cells, other than the run's {} (a filtered, \
             extended or other store). Cells keep the split of their id, so cells the run trained on stay out of \
             the test split; cells it never saw are split by their ids too",
            store.display(),
            here.cells,
            trained.cells
        )
    })
}
