//! `cpa-stream train`: its flags.

use std::path::PathBuf;

use clap::Args;
use cpa_stream_pipeline::batcher::{DEFAULT_BUFFER_BYTES, DEFAULT_PREFETCH, DEFAULT_SHUFFLE_BLOCKS};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Store directory (see `cpa-stream import` / `synth`).
    #[arg(long)]
    pub(crate) store: PathBuf,
    #[command(flatten)]
    pub(crate) labels: super::LabelArgs,
    /// A batch covariate (left out of the corrected latents).
    #[arg(long)]
    pub(crate) batch_key: Option<String>,
    /// Fixed perturbation features: a Parquet or CSV table with one row per perturbation (a name
    /// column named like the perturbation key, `perturbation`, `name` or `drug`, else the first;
    /// every other column a number, e.g. RDKit descriptors or fingerprint bits). The model
    /// projects them instead of learning a free embedding per perturbation; perturbations of the
    /// table without cells can then be predicted.
    #[arg(long)]
    pub(crate) perturbation_features: Option<PathBuf>,
    /// Drugs as SMILES: a table (CSV, TSV or Parquet: a perturbation name column and a SMILES
    /// column) whose molecules' features the model projects, as with --perturbation-features, so
    /// that drugs without cells are predicted from their molecules. The features (RDKit's Morgan
    /// fingerprints, or its 2-D descriptors: --smiles-features) are computed by the Python
    /// package's `cpa_stream.chem` (pip install 'cpa-stream[chem]'), run with $CPA_STREAM_PYTHON,
    /// else python3.
    #[arg(long, value_name = "TABLE", conflicts_with = "perturbation_features")]
    pub(crate) perturbation_smiles: Option<PathBuf>,
    /// The molecule features of --perturbation-smiles: `morgan` (2,048 bits, radius 2, as
    /// cpa-tools' use_rdkit_embeddings) or `descriptors` (RDKit's 2-D descriptors, standardised).
    #[arg(long, value_parser = ["morgan", "descriptors"], default_value = "morgan", requires = "perturbation_smiles")]
    pub(crate) smiles_features: String,
    /// obs column with train / valid / test / ood per cell.
    #[arg(long, conflicts_with_all = ["holdout", "validation_fraction", "test_fraction", "split_seed"])]
    pub(crate) split_key: Option<String>,
    /// Conditions held out entirely (comma-separated, as written in obs).
    #[arg(long, value_delimiter = ',')]
    pub(crate) holdout: Vec<String>,
    /// Fraction of each condition's cells used for validation (without --split-key) [default: 0.1].
    #[arg(long)]
    pub(crate) validation_fraction: Option<f64>,
    /// Fraction of each condition's cells kept for testing (without --split-key) [default: 0.1].
    #[arg(long)]
    pub(crate) test_fraction: Option<f64>,
    /// Seed of the split by fractions (without --split-key) [default: --seed's]: runs given the
    /// same split seed split the cells alike whatever their --seed, as an ensemble's runs should
    /// (predict --ensemble).
    #[arg(long)]
    pub(crate) split_seed: Option<u64>,
    /// Model configuration (TOML; see examples/cpa.toml); with --preset, changes only the keys it
    /// sets.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Starting point of the configuration: `default`; `reference` for cpa-tools 0.8.8's
    /// behaviour where the defaults differ from it (its module defaults, its learning-rate schedule,
    /// no weight averaging); `unseen-covariates`: the defaults plus the perturbation skip, a
    /// latent of 128 and the dose response chosen from the data (log-sigmoid where perturbations
    /// have several doses, linear with one), for cell types (or lines, donors) none of whose
    /// perturbed cells were trained on: ahead of the defaults on each of six held-out cell types of
    /// real PBMCs and on two synthetic drug x dose atlases (docs/fidelity.md, "Unseen cell types
    /// with several doses").
    #[arg(long, value_parser = ["default", "reference", "unseen-covariates"])]
    pub(crate) preset: Option<String>,
    /// Run directory (checkpoint/, best/, model/, metrics.parquet).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Epochs [default: the configuration's, or the reference's rule].
    #[arg(long)]
    pub(crate) epochs: Option<u32>,
    /// Cells per batch, or `auto` (on CUDA the largest power of two that fits, halved for margin;
    /// on the CPU the configuration's) [default: the configuration's, whose default is 128, or 64
    /// when 128 would make fewer than 500 optimizer steps].
    #[arg(long)]
    pub(crate) batch_size: Option<String>,
    /// Consecutive store cells the shuffle keeps together (block sampling: faster reads, less
    /// mixed batches on a store sorted by condition), or `auto`: runs of 8 on a store in random
    /// order of its labels, single cells otherwise [default: the configuration's, auto].
    #[arg(long, value_parser = super::parse_run_cells)]
    pub(crate) shuffle_run_cells: Option<usize>,
    /// Continue from RUN/checkpoint, with the obs keys, control, covariates, split and
    /// configuration the run recorded (flags given must agree).
    #[arg(long, conflicts_with = "overwrite")]
    pub(crate) resume: bool,
    /// Replace an existing run at --out (a directory holding other files is refused).
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// Train the count likelihoods (nb, zinb) on values that are not whole numbers (a warning
    /// instead of the error).
    #[arg(long)]
    pub(crate) allow_non_counts: bool,
    /// Seconds of training between two checkpoints: checkpoint/ is written at the end of the
    /// first epoch that ends this long after the last one (every epoch of at least this long),
    /// and always after the last epoch, at an early stop and on an interruption; 0 writes it after
    /// every epoch. A run killed outright continues with --resume from its last checkpoint,
    /// exactly as if it had not stopped [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub(crate) checkpoint_every: Option<f64>,
    #[command(flatten)]
    pub(crate) compute: super::ComputeArgs,
    /// Seed [default: the configuration's].
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    #[arg(long, value_parser = super::parse_prefetch, help = format!(
        "Batches buffered ahead of the trainer, per worker [default: {DEFAULT_PREFETCH}]"
    ))]
    pub(crate) prefetch: Option<usize>,
    #[arg(long, value_parser = super::parse_shuffle_blocks, help = format!(
        "Blocks of 256 cells whose cells are shuffled together (the shuffle window): each batch draws from this \
         many random blocks. A compressed store decodes each block once per epoch [default: {DEFAULT_SHUFFLE_BLOCKS}]"
    ))]
    pub(crate) shuffle_blocks: Option<usize>,
    #[arg(long, value_parser = super::parse_buffer_mb, help = format!(
        "Most MiB of decoded blocks a compressed store's shuffle buffer holds; the window is narrowed to fit half \
         of it [default: {}]", DEFAULT_BUFFER_BYTES >> 20
    ))]
    pub(crate) shuffle_buffer_mb: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}
