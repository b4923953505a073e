//! CPA-shaped synthetic atlases with ground truth.
//!
//! Each cell has a basal latent state `z_b ~ N(0, I)`. Its condition adds a cell-type effect and,
//! for each perturbation of the condition, that perturbation's latent effect scaled by a sigmoid
//! (Hill) dose response; combinations add their parts (plus an optional interaction term). A
//! nonlinear decoder (`tanh` MLP, softmax over genes) turns the latent state into gene
//! proportions, scaled by a log-normal per-cell library size; counts are negative binomial with
//! a per-gene dispersion.
//!
//! Cells are generated in chunks of [`CHUNK_CELLS`]; chunk `k` draws from its own generator
//! seeded by `(seed, k)`, so the atlas is the same whatever the number of threads.
//! [`SynthAtlas::write_truth`] writes the true per-group means, including combinations held back
//! from the cells.

mod model;
mod nb;

use std::path::Path;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_array::{
    ArrayRef, BooleanArray, DictionaryArray, FixedSizeListArray, Float32Array, Int32Array, StringArray, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use cpa_stream_schemas::tables::{CELL_ID, GENE_ID, categorical_field, truth_schema};
use parquet::arrow::ArrowWriter;
use rand::Rng;
use rand_distr::StandardNormal;

use crate::counts_csr::CsrBatch;
use crate::crew::Crew;
use crate::error::{Error, Result};
use model::TrueModel;

/// The truth of a group: mean counts, mean log1p and variance of log1p per gene.
type GroupTruth = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The stage that computes the ground truth (its threads' names).
const TRUTH_STAGE: &str = "synth-truth";

/// Cells per generated chunk (the unit of parallelism and determinism).
pub const CHUNK_CELLS: u64 = 1024;
/// Default latent dimension of the true model.
pub const DEFAULT_LATENT_DIM: u32 = 16;
/// Default hidden width of the true decoder.
pub const DEFAULT_HIDDEN: u32 = 32;
/// Default fraction of control cells.
pub const DEFAULT_CONTROL_FRACTION: f64 = 0.1;
/// Default median library size (total counts per cell).
pub const DEFAULT_LIBRARY_SIZE: f64 = 2000.0;
/// Default standard deviation of log library size.
pub const DEFAULT_LIBRARY_LOG_SD: f64 = 0.4;
/// Default Monte-Carlo draws per group for the truth table.
pub const DEFAULT_TRUTH_SAMPLES: u32 = 256;
/// Dose levels per perturbation, unless set otherwise.
pub const DEFAULT_DOSES: u32 = 1;
/// Cell types, unless set otherwise.
pub const DEFAULT_CELL_TYPES: u32 = 1;
/// Two-perturbation combinations in the cells, unless set otherwise.
pub const DEFAULT_COMBINATIONS: u32 = 0;
/// Strength of the combination interaction term, unless set otherwise (0: additive).
pub const DEFAULT_INTERACTION: f32 = 0.0;
/// Name of the control condition.
pub const CONTROL: &str = "control";
/// Dose label of the control condition.
pub const CONTROL_DOSE: &str = "1";
/// Truth rows per written batch (and row group).
const TRUTH_BATCH_GROUPS: usize = 32;
/// File of the perturbations' true latent effects in a synthetic store: one row per single
/// perturbation (`perturbation`, then `effect_0`, ... Float32), the features that determine each
/// perturbation's effect, for training and testing `train --perturbation-features`.
pub const FEATURES_FILE: &str = "perturbation_features.parquet";

// Independent random streams derived from the seed.
const STREAM_MODEL: u64 = 1;
const STREAM_DESIGN: u64 = 2;
const STREAM_CELLS: u64 = 3;
const STREAM_TRUTH: u64 = 4;

/// What to generate. Build with [`SynthConfig::new`] and adjust the public fields.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Cells.
    pub cells: u64,
    /// Genes.
    pub genes: u32,
    /// Single perturbations.
    pub perturbations: u32,
    /// Dose levels, log-spaced from 0.01 to 1 (a single level is dose 1).
    pub doses: u32,
    /// Cell types.
    pub cell_types: u32,
    /// Two-perturbation combinations present in the cells.
    pub combinations: u32,
    /// Further combinations present only in the truth table (for counterfactual evaluation).
    pub heldout_combinations: u32,
    /// Strength of the combination interaction term (0: purely additive in latent space).
    pub interaction: f32,
    /// Latent dimension of the true model.
    pub latent_dim: u32,
    /// Hidden width of the true decoder.
    pub hidden: u32,
    /// Fraction of control cells.
    pub control_fraction: f64,
    /// Median total counts per cell.
    pub library_size: f64,
    /// Standard deviation of the log library size.
    pub library_log_sd: f64,
    /// Monte-Carlo draws per group for the truth table.
    pub truth_samples: u32,
    /// Seed of everything drawn.
    pub seed: u64,
}

impl SynthConfig {
    /// A configuration with the given shape and every other field at its default
    /// (one held-back combination when there are combinations and pairs to spare).
    pub fn new(
        cells: u64,
        genes: u32,
        perturbations: u32,
        doses: u32,
        cell_types: u32,
        combinations: u32,
        seed: u64,
    ) -> Self {
        let pairs = u64::from(perturbations) * u64::from(perturbations.saturating_sub(1)) / 2;
        let heldout = u32::from(combinations > 0 && u64::from(combinations) < pairs);
        SynthConfig {
            cells,
            genes,
            perturbations,
            doses,
            cell_types,
            combinations,
            heldout_combinations: heldout,
            interaction: 0.0,
            latent_dim: DEFAULT_LATENT_DIM,
            hidden: DEFAULT_HIDDEN,
            control_fraction: DEFAULT_CONTROL_FRACTION,
            library_size: DEFAULT_LIBRARY_SIZE,
            library_log_sd: DEFAULT_LIBRARY_LOG_SD,
            truth_samples: DEFAULT_TRUTH_SAMPLES,
            seed,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidInput(format!("synth: {msg}")));
        for (name, v) in [
            ("--genes", self.genes),
            ("--perturbations", self.perturbations),
            ("--doses", self.doses),
            ("--cell-types", self.cell_types),
            ("latent dimension", self.latent_dim),
            ("hidden width", self.hidden),
            ("truth samples", self.truth_samples),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        let pairs = u64::from(self.perturbations) * u64::from(self.perturbations - 1) / 2;
        let wanted = u64::from(self.combinations) + u64::from(self.heldout_combinations);
        if wanted > pairs {
            return bad(format!(
                "{} combinations (+{} held back) need at least that many pairs of perturbations, {} perturbations give {pairs}",
                self.combinations, self.heldout_combinations, self.perturbations
            ));
        }
        if !(0.0..1.0).contains(&self.control_fraction) {
            return bad(format!("control fraction {} must be in [0, 1)", self.control_fraction));
        }
        let library_ok = self.library_size.is_finite()
            && self.library_size > 0.0
            && self.library_log_sd.is_finite()
            && self.library_log_sd >= 0.0;
        if !library_ok {
            return bad("library size must be positive and its log sd non-negative".to_owned());
        }
        if !self.interaction.is_finite() {
            return bad("interaction must be finite".to_owned());
        }
        Ok(())
    }
}

/// A condition of the design: its perturbations, and whether cells of it were generated.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthCondition {
    /// `+`-joined perturbation names (`control` for the control group).
    pub name: String,
    /// Perturbation indices, in the order of `name`.
    pub parts: Vec<usize>,
    /// Only in the truth table (no cells).
    pub held_out: bool,
}

/// One (condition, dose) arm of the design; groups are arms crossed with cell types.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Arm {
    condition: usize,
    /// Dose level index; `None` for the control.
    level: Option<usize>,
}

/// A synthetic atlas: its design, true model and obs vocabularies. `Sync`: share it between the
/// threads generating chunks.
pub struct SynthAtlas {
    config: SynthConfig,
    model: TrueModel,
    /// Perturbation names.
    pub perturbations: Vec<String>,
    /// Cell type names.
    pub cell_types: Vec<String>,
    /// Dose levels.
    pub dose_levels: Vec<f64>,
    /// Dose levels as obs writes them.
    pub dose_level_labels: Vec<String>,
    /// Every condition, held-back ones included.
    pub conditions: Vec<SynthCondition>,
    arms: Vec<Arm>,
    /// Arms cells are drawn from (the control first); the rest are held back.
    observed_arms: usize,
    /// Latent shift of every (cell type, arm), `latent` values each.
    shifts: Vec<f32>,
    /// Categories of the `condition` obs column (observed arms only).
    pub obs_conditions: Vec<String>,
    /// Categories of the `dose` obs column (observed arms only).
    pub obs_doses: Vec<String>,
    /// obs codes of each observed arm: (condition code, dose code).
    arm_codes: Vec<(i32, i32)>,
    obs_schema: SchemaRef,
    condition_values: ArrayRef,
    dose_values: ArrayRef,
    cell_type_values: ArrayRef,
    id_width: usize,
}

/// One generated chunk of cells.
pub struct SynthChunk {
    /// Chunk number.
    pub index: u64,
    /// The chunk's counts.
    pub rows: CsrBatch,
    /// The chunk's obs rows.
    pub obs: RecordBatch,
    /// Cells per (cell type, arm) group in this chunk, indexed `cell_type * arms + arm`.
    pub group_counts: Vec<u64>,
}

impl std::fmt::Debug for SynthAtlas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynthAtlas")
            .field("config", &self.config)
            .field("conditions", &self.conditions)
            .field("dose_levels", &self.dose_levels)
            .finish_non_exhaustive()
    }
}

/// Formats a dose with at most three significant digits and no trailing zeros.
fn dose_label(d: f64) -> String {
    let decimals = (2 - d.log10().floor() as i32).max(0) as usize;
    let text = format!("{d:.decimals$}");
    if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.').to_owned() } else { text }
}

fn names(prefix: &str, n: u32) -> Vec<String> {
    let width = n.to_string().len().max(2);
    (1..=n).map(|i| format!("{prefix}{i:0width$}")).collect()
}

impl SynthAtlas {
    /// Draws the design and the true model from the configuration's seed.
    pub fn new(config: SynthConfig) -> Result<SynthAtlas> {
        config.validate()?;
        let (p, c) = (config.perturbations as usize, config.cell_types as usize);
        let mut model_rng = crate::rng::seeded(config.seed, STREAM_MODEL, 0);
        let model = TrueModel::draw(
            &mut model_rng,
            config.latent_dim as usize,
            config.hidden as usize,
            config.genes as usize,
            c,
            p,
        );
        let perturbations = names("PERT", config.perturbations);
        let cell_types = names("CT", config.cell_types);
        let dose_levels: Vec<f64> = if config.doses == 1 {
            vec![1.0]
        } else {
            let last = f64::from(config.doses - 1);
            (0..config.doses).map(|j| 10f64.powf(-2.0 + 2.0 * f64::from(j) / last)).collect()
        };
        let dose_level_labels: Vec<String> = dose_levels.iter().map(|&d| dose_label(d)).collect();

        // Combinations: distinct unordered pairs, each written in a random order (so names are
        // not always in vocabulary order, as in real data).
        let mut design_rng = crate::rng::seeded(config.seed, STREAM_DESIGN, 0);
        let mut pairs: Vec<(usize, usize)> = (0..p).flat_map(|a| (a + 1..p).map(move |b| (a, b))).collect();
        let wanted = (config.combinations + config.heldout_combinations) as usize;
        for i in 0..wanted {
            let j = design_rng.random_range(i..pairs.len());
            pairs.swap(i, j);
        }
        let mut conditions = vec![SynthCondition { name: CONTROL.to_owned(), parts: vec![], held_out: false }];
        conditions.extend((0..p).map(|k| SynthCondition {
            name: perturbations[k].clone(),
            parts: vec![k],
            held_out: false,
        }));
        for (i, &(a, b)) in pairs.iter().take(wanted).enumerate() {
            let parts = if design_rng.random::<bool>() { vec![a, b] } else { vec![b, a] };
            let name = format!("{}+{}", perturbations[parts[0]], perturbations[parts[1]]);
            conditions.push(SynthCondition { name, parts, held_out: i >= config.combinations as usize });
        }
        let mut arms = vec![Arm { condition: 0, level: None }];
        for held_out in [false, true] {
            for (k, cond) in conditions.iter().enumerate().skip(1).filter(|(_, c)| c.held_out == held_out) {
                let _ = cond;
                arms.extend((0..dose_levels.len()).map(|j| Arm { condition: k, level: Some(j) }));
            }
        }
        let observed_arms = arms.iter().filter(|a| !conditions[a.condition].held_out).count();

        let mut shifts = Vec::with_capacity(c * arms.len() * model.latent);
        let interactions: Vec<Vec<f32>> = conditions
            .iter()
            .map(|_| (0..model.latent).map(|_| model_rng.sample::<f32, _>(StandardNormal)).collect())
            .collect();
        for ct in 0..c {
            for arm in &arms {
                let cond = &conditions[arm.condition];
                let dose = arm.level.map_or(1.0, |j| dose_levels[j]);
                let parts: Vec<(usize, f64)> = cond.parts.iter().map(|&k| (k, dose)).collect();
                let inter = (config.interaction != 0.0).then(|| (&interactions[arm.condition][..], config.interaction));
                shifts.extend(model.shift(ct, &parts, inter));
            }
        }

        let mut obs_conditions: Vec<String> = Vec::new();
        let mut obs_doses: Vec<String> = Vec::new();
        let mut arm_codes = Vec::new();
        let code = |list: &mut Vec<String>, v: String| -> i32 {
            match list.iter().position(|x| *x == v) {
                Some(i) => i as i32,
                None => {
                    list.push(v);
                    (list.len() - 1) as i32
                }
            }
        };
        for arm in &arms[..observed_arms] {
            let cond = &conditions[arm.condition];
            let dose = arm_dose_label(cond, arm, &dose_level_labels);
            arm_codes.push((code(&mut obs_conditions, cond.name.clone()), code(&mut obs_doses, dose)));
        }
        let obs_schema = Arc::new(Schema::new(vec![
            Field::new(CELL_ID, DataType::Utf8, false),
            categorical_field("condition", &obs_conditions, false),
            categorical_field("dose", &obs_doses, false),
            categorical_field("cell_type", &cell_types, false),
        ]));
        let values = |v: &[String]| -> ArrayRef { Arc::new(StringArray::from_iter_values(v)) };
        Ok(SynthAtlas {
            condition_values: values(&obs_conditions),
            dose_values: values(&obs_doses),
            cell_type_values: values(&cell_types),
            id_width: config.cells.saturating_sub(1).to_string().len().max(6),
            config,
            model,
            perturbations,
            cell_types,
            dose_levels,
            dose_level_labels,
            conditions,
            arms,
            observed_arms,
            shifts,
            obs_conditions,
            obs_doses,
            arm_codes,
            obs_schema,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SynthConfig {
        &self.config
    }

    /// Number of chunks of [`CHUNK_CELLS`] cells.
    pub fn n_chunks(&self) -> u64 {
        self.config.cells.div_ceil(CHUNK_CELLS)
    }

    /// Number of (cell type, arm) groups, held-back arms included.
    pub fn n_groups(&self) -> usize {
        self.cell_types.len() * self.arms.len()
    }

    /// Schema of the atlas's `obs` table.
    pub fn obs_schema(&self) -> SchemaRef {
        Arc::clone(&self.obs_schema)
    }

    /// The `var` table: gene ids `GENE0001`, ...
    pub fn var_table(&self) -> Result<RecordBatch> {
        let ids = names("GENE", self.config.genes);
        let schema = Arc::new(Schema::new(vec![Field::new(GENE_ID, DataType::Utf8, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(StringArray::from_iter_values(ids))])
            .map_err(|e| Error::arrow("synth var table", e))
    }

    /// Generates chunk `index` (cells `index * CHUNK_CELLS ..`).
    pub fn generate_chunk(&self, index: u64) -> Result<SynthChunk> {
        let start = index * CHUNK_CELLS;
        let n = CHUNK_CELLS.min(self.config.cells.saturating_sub(start)) as usize;
        let mut rng = crate::rng::seeded(self.config.seed, STREAM_CELLS, index);
        let l = self.model.latent;
        let n_types = self.cell_types.len();
        let mut z = vec![0f32; n * l];
        let mut library = vec![0f32; n];
        let mut cell_type_codes = Vec::with_capacity(n);
        let mut condition_codes = Vec::with_capacity(n);
        let mut dose_codes = Vec::with_capacity(n);
        let mut group_counts = vec![0u64; self.n_groups()];
        for i in 0..n {
            let ct = rng.random_range(0..n_types);
            let arm = if self.observed_arms == 1 || rng.random::<f64>() < self.config.control_fraction {
                0
            } else {
                rng.random_range(1..self.observed_arms)
            };
            group_counts[ct * self.arms.len() + arm] += 1;
            let shift = self.shift(ct, arm);
            for (zi, si) in z[i * l..(i + 1) * l].iter_mut().zip(shift) {
                *zi = rng.sample::<f32, _>(StandardNormal) + si;
            }
            library[i] = self.draw_library(&mut rng);
            cell_type_codes.push(ct as i32);
            condition_codes.push(self.arm_codes[arm].0);
            dose_codes.push(self.arm_codes[arm].1);
        }
        let rows = self.sample_counts(&z, &library, &mut rng);
        let ids =
            StringArray::from_iter_values((start..start + n as u64).map(|i| format!("cell{i:0w$}", w = self.id_width)));
        let dict = |codes: Vec<i32>, values: &ArrayRef| -> Result<ArrayRef> {
            DictionaryArray::try_new(Int32Array::from(codes), Arc::clone(values))
                .map(|a| Arc::new(a) as ArrayRef)
                .map_err(|e| Error::arrow("synth obs", e))
        };
        let obs = RecordBatch::try_new(
            self.obs_schema(),
            vec![
                Arc::new(ids),
                dict(condition_codes, &self.condition_values)?,
                dict(dose_codes, &self.dose_values)?,
                dict(cell_type_codes, &self.cell_type_values)?,
            ],
        )
        .map_err(|e| Error::arrow("synth obs", e))?;
        Ok(SynthChunk { index, rows, obs, group_counts })
    }

    fn shift(&self, cell_type: usize, arm: usize) -> &[f32] {
        let l = self.model.latent;
        let at = (cell_type * self.arms.len() + arm) * l;
        &self.shifts[at..at + l]
    }

    fn draw_library<R: Rng>(&self, rng: &mut R) -> f32 {
        let normal: f64 = rng.sample(StandardNormal);
        (self.config.library_size.ln() + self.config.library_log_sd * normal).exp() as f32
    }

    /// Decodes latent rows and draws NB counts, in sub-blocks to bound the dense scratch.
    fn sample_counts<R: Rng>(&self, z: &[f32], library: &[f32], rng: &mut R) -> CsrBatch {
        const SUB: usize = 128;
        let (l, g) = (self.model.latent, self.model.genes);
        let n = library.len();
        let mut rows = CsrBatch::with_capacity(g as u32, n, n * g / 8);
        let (mut hidden, mut mu) = (Vec::new(), Vec::new());
        for s in (0..n).step_by(SUB) {
            let e = (s + SUB).min(n);
            self.model.decode(&z[s * l..e * l], &library[s..e], &mut hidden, &mut mu);
            for row in mu.chunks_exact(g) {
                let (indices, data) = rows.entries_mut();
                for (j, (&m, &theta)) in row.iter().zip(&self.model.theta).enumerate() {
                    let k = nb::sample_nb(rng, f64::from(m), theta);
                    if k > 0 {
                        indices.push(j as u32);
                        data.push(k as f32);
                    }
                }
                rows.close_row();
            }
        }
        rows
    }

    /// Writes [`FEATURES_FILE`]'s table to `path`: each single perturbation's true latent effect.
    pub fn write_perturbation_features(&self, path: &Path) -> Result<()> {
        let singles: Vec<&SynthCondition> = self.conditions.iter().filter(|c| c.parts.len() == 1).collect();
        let l = self.model.latent;
        let mut fields = vec![Field::new("perturbation", DataType::Utf8, false)];
        fields.extend((0..l).map(|i| Field::new(format!("effect_{i}"), DataType::Float32, false)));
        let mut columns: Vec<ArrayRef> =
            vec![Arc::new(StringArray::from_iter_values(singles.iter().map(|c| c.name.as_str())))];
        for i in 0..l {
            columns.push(Arc::new(Float32Array::from_iter_values(
                singles.iter().map(|c| self.model.effect(c.parts[0])[i]),
            )));
        }
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        let batch =
            RecordBatch::try_new(Arc::clone(&schema), columns).map_err(|e| Error::arrow("features table", e))?;
        crate::store::write_table(path, schema, [batch])
    }

    /// Writes `truth.parquet` to `path`: for every (cell type, condition, dose) group, held-back
    /// ones included, the expected counts E\[x\] (Monte-Carlo mean of the NB means) and the mean
    /// and variance (ddof 0) of log1p counts, from `truth_samples` draws per group. `counts` are
    /// the cells per group (summed [`SynthChunk::group_counts`]). Uses `threads` threads.
    pub fn write_truth(&self, path: &Path, counts: &[u64], threads: usize) -> Result<u64> {
        if counts.len() != self.n_groups() {
            return Err(Error::InvalidInput(format!("{} group counts for {} groups", counts.len(), self.n_groups())));
        }
        let all_conditions: Vec<String> = self.conditions.iter().map(|c| c.name.clone()).collect();
        let mut all_doses = self.obs_doses.clone();
        for (cond, arm) in self.arms.iter().map(|a| (&self.conditions[a.condition], a)) {
            let label = arm_dose_label(cond, arm, &self.dose_level_labels);
            if !all_doses.contains(&label) {
                all_doses.push(label);
            }
        }
        let g = self.model.genes;
        let schema = truth_schema(&self.cell_types, &all_conditions, &all_doses, g as i32);
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let props = crate::store::truth_properties(TRUTH_BATCH_GROUPS);
        let mut writer =
            ArrowWriter::try_new(file, Arc::clone(&schema), Some(props)).map_err(|e| Error::parquet(path, e))?;
        let groups: Vec<usize> = (0..self.n_groups()).collect();
        for batch_groups in groups.chunks(TRUTH_BATCH_GROUPS) {
            let stats = self.truth_stats(batch_groups, threads.max(1))?;
            let mut ct_codes = Vec::new();
            let mut cond_codes = Vec::new();
            let mut dose_codes = Vec::new();
            let mut n_cells = Vec::new();
            let mut held = Vec::new();
            let (mut mean, mut mean_log, mut var_log) = (Vec::new(), Vec::new(), Vec::new());
            for (&group, stat) in batch_groups.iter().zip(stats) {
                let (ct, arm) = (group / self.arms.len(), self.arms[group % self.arms.len()]);
                let cond = &self.conditions[arm.condition];
                let label = arm_dose_label(cond, &arm, &self.dose_level_labels);
                ct_codes.push(ct as i32);
                cond_codes.push(arm.condition as i32);
                dose_codes.push(all_doses.iter().position(|d| *d == label).unwrap_or(0) as i32);
                n_cells.push(counts[group]);
                held.push(cond.held_out);
                mean.extend(stat.0);
                mean_log.extend(stat.1);
                var_log.extend(stat.2);
            }
            let dict = |codes: Vec<i32>, values: &[String]| -> Result<ArrayRef> {
                DictionaryArray::try_new(Int32Array::from(codes), Arc::new(StringArray::from_iter_values(values)))
                    .map(|a| Arc::new(a) as ArrayRef)
                    .map_err(|e| Error::arrow("truth table", e))
            };
            let vectors = |v: Vec<f32>| -> Result<ArrayRef> {
                let item = Arc::new(Field::new("item", DataType::Float32, false));
                FixedSizeListArray::try_new(item, g as i32, Arc::new(Float32Array::from(v)), None)
                    .map(|a| Arc::new(a) as ArrayRef)
                    .map_err(|e| Error::arrow("truth table", e))
            };
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    dict(ct_codes, &self.cell_types)?,
                    dict(cond_codes, &all_conditions)?,
                    dict(dose_codes, &all_doses)?,
                    Arc::new(UInt64Array::from(n_cells)),
                    Arc::new(BooleanArray::from(held)),
                    vectors(mean)?,
                    vectors(mean_log)?,
                    vectors(var_log)?,
                ],
            )
            .map_err(|e| Error::arrow("truth table", e))?;
            writer.write(&batch).map_err(|e| Error::parquet(path, e))?;
        }
        writer.close().map_err(|e| Error::parquet(path, e))?;
        Ok(self.n_groups() as u64)
    }

    /// Monte-Carlo statistics of `groups`, computed on `threads` threads of a crew (a panic is an
    /// error naming the stage).
    fn truth_stats(&self, groups: &[usize], threads: usize) -> Result<Vec<GroupTruth>> {
        let per = groups.len().div_ceil(threads).max(1);
        let mut out: Vec<GroupTruth> = vec![(Vec::new(), Vec::new(), Vec::new()); groups.len()];
        std::thread::scope(|scope| -> Result<()> {
            let mut crew = Crew::new();
            for (t, (part, slots)) in groups.chunks(per).zip(out.chunks_mut(per)).enumerate() {
                let work = move || {
                    for (slot, &g) in slots.iter_mut().zip(part) {
                        *slot = self.group_truth(g);
                    }
                };
                crew.spawn_in(scope, TRUTH_STAGE, format!("{TRUTH_STAGE}-{t}"), work)
                    .map_err(|e| Error::InvalidInput(format!("starting a thread of {TRUTH_STAGE}: {e}")))?;
            }
            crew.join().map_err(|p| Error::InvalidInput(format!("a thread of {} panicked: {}", p.stage, p.message)))
        })?;
        Ok(out)
    }

    fn group_truth(&self, group: usize) -> GroupTruth {
        let (l, g) = (self.model.latent, self.model.genes);
        let samples = self.config.truth_samples as usize;
        let mut rng = crate::rng::seeded(self.config.seed, STREAM_TRUTH, group as u64);
        let (ct, arm) = (group / self.arms.len(), group % self.arms.len());
        let shift = self.shift(ct, arm).to_vec();
        let mut sum_mu = vec![0f64; g];
        let mut sum_log = vec![0f64; g];
        let mut sum_log2 = vec![0f64; g];
        let (mut hidden, mut mu) = (Vec::new(), Vec::new());
        const SUB: usize = 64;
        let mut done = 0;
        while done < samples {
            let n = SUB.min(samples - done);
            let mut z = vec![0f32; n * l];
            for zi in z.chunks_exact_mut(l) {
                for (v, s) in zi.iter_mut().zip(&shift) {
                    *v = rng.sample::<f32, _>(StandardNormal) + s;
                }
            }
            let library: Vec<f32> = (0..n).map(|_| self.draw_library(&mut rng)).collect();
            self.model.decode(&z, &library, &mut hidden, &mut mu);
            for row in mu.chunks_exact(g) {
                for j in 0..g {
                    let m = f64::from(row[j]);
                    let x = f64::from(nb::sample_nb(&mut rng, m, self.model.theta[j])).ln_1p();
                    sum_mu[j] += m;
                    sum_log[j] += x;
                    sum_log2[j] += x * x;
                }
            }
            done += n;
        }
        let s = samples as f64;
        let mean: Vec<f32> = sum_mu.iter().map(|v| (v / s) as f32).collect();
        let mean_log: Vec<f32> = sum_log.iter().map(|v| (v / s) as f32).collect();
        let var_log: Vec<f32> =
            sum_log.iter().zip(&sum_log2).map(|(a, b)| ((b / s) - (a / s).powi(2)).max(0.0) as f32).collect();
        (mean, mean_log, var_log)
    }
}

fn arm_dose_label(cond: &SynthCondition, arm: &Arm, labels: &[String]) -> String {
    match arm.level {
        None => CONTROL_DOSE.to_owned(),
        Some(j) => vec![labels[j].as_str(); cond.parts.len()].join("+"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dose_labels_are_short() {
        assert_eq!(dose_label(1.0), "1");
        assert_eq!(dose_label(0.01), "0.01");
        assert_eq!(dose_label(0.1), "0.1");
        assert_eq!(dose_label(0.046415888), "0.0464");
        assert_eq!(dose_label(0.21544347), "0.215");
    }

    #[test]
    fn chunks_are_deterministic_and_seed_dependent() -> Result<()> {
        let atlas = SynthAtlas::new(SynthConfig::new(3000, 40, 4, 2, 2, 2, 9))?;
        let a = atlas.generate_chunk(1)?;
        let b = atlas.generate_chunk(1)?;
        assert_eq!(a.rows, b.rows);
        assert_eq!(a.obs, b.obs);
        assert_eq!(a.rows.n_rows(), 1024);
        assert_eq!(atlas.generate_chunk(2)?.rows.n_rows(), 3000 - 2048);
        let other = SynthAtlas::new(SynthConfig::new(3000, 40, 4, 2, 2, 2, 10))?;
        assert_ne!(other.generate_chunk(1)?.rows, a.rows);
        assert_eq!(a.rows.validate(), Ok(()));
        assert_eq!(a.group_counts.iter().sum::<u64>(), 1024);
        Ok(())
    }

    #[test]
    fn design_holds_back_combinations() -> Result<()> {
        let atlas = SynthAtlas::new(SynthConfig::new(10, 5, 4, 3, 2, 2, 1))?;
        let held: Vec<_> = atlas.conditions.iter().filter(|c| c.held_out).collect();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].parts.len(), 2);
        assert!(!atlas.obs_conditions.contains(&held[0].name));
        // control + 4 singles x 3 doses + 2 pairs x 3 doses observed; 1 pair x 3 doses held back.
        assert_eq!(atlas.observed_arms, 1 + 12 + 6);
        assert_eq!(atlas.n_groups(), 2 * (1 + 12 + 6 + 3));
        assert_eq!(atlas.obs_doses, vec!["1", "0.01", "0.1", "0.01+0.01", "0.1+0.1", "1+1"]);
        Ok(())
    }

    #[test]
    fn rejects_impossible_designs() {
        let mut c = SynthConfig::new(10, 5, 2, 1, 1, 2, 1);
        assert!(SynthAtlas::new(c.clone()).unwrap_err().to_string().contains("pairs"));
        c.combinations = 0;
        c.genes = 0;
        assert!(SynthAtlas::new(c).unwrap_err().to_string().contains("--genes"));
    }
}
