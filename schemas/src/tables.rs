//! Arrow schemas of the store's tables.
//!
//! - `obs.parquet`: first column [`CELL_ID`] (Utf8, not null), then metadata columns. Categorical
//!   columns are `Dictionary(Int32, Utf8)` and carry their full ordered category list in the field
//!   metadata under [`CATEGORIES_KEY`] (Parquet dictionaries keep neither order nor unused
//!   categories, and perturbation vocabularies depend on both).
//! - `var.parquet`: first column [`GENE_ID`] (Utf8, not null), then gene metadata.
//! - `truth.parquet` (synthetic atlases): see [`truth_schema`].
//! - `degs.parquet` (a store's DEG lists, and evaluation's): see [`deg_schema`].
//!
//! And the outputs: predictions ([`prediction_schema`]), a training run's `metrics.parquet`
//! ([`training_metrics_schema`]) and an evaluation's `metrics.parquet`
//! ([`evaluation_metrics_schema`]).

use std::collections::HashMap;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};

/// A schema that is not the one a table or output must have; the message names the column and
/// what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(pub String);

/// Name of the cell id column, the first column of `obs.parquet`.
pub const CELL_ID: &str = "cell_id";
/// Name of the gene id column, the first column of `var.parquet`.
pub const GENE_ID: &str = "gene_id";
/// Field metadata key holding a categorical column's categories as a JSON array of strings.
pub const CATEGORIES_KEY: &str = "cpa_stream.categories";
/// The key type of categorical columns.
pub const CATEGORICAL_KEY_TYPE: DataType = DataType::Int32;

/// The Arrow type of a categorical column.
pub fn categorical_type() -> DataType {
    DataType::Dictionary(Box::new(CATEGORICAL_KEY_TYPE), Box::new(DataType::Utf8))
}

/// A categorical (dictionary-encoded) field that records its ordered categories.
pub fn categorical_field(name: &str, categories: &[String], nullable: bool) -> Field {
    let json = serde_json::to_string(categories).unwrap_or_else(|_| "[]".to_owned());
    Field::new(name, categorical_type(), nullable).with_metadata(HashMap::from([(CATEGORIES_KEY.to_owned(), json)]))
}

/// Field metadata key set to `"true"` on a categorical column whose categories are ordered
/// (pandas' `ordered=True`; absent otherwise).
pub const ORDERED_KEY: &str = "cpa_stream.ordered";

/// Field metadata key holding a column's name in the file it came from, when the store had to
/// name it otherwise (an obs column called `cell_id` beside the index, which becomes `cell_id`);
/// export gives it its name back.
pub const SOURCE_NAME_KEY: &str = "cpa_stream.source_name";

/// `field` marked as an ordered categorical ([`ORDERED_KEY`]) when `ordered`.
pub fn with_order(field: Field, ordered: bool) -> Field {
    if !ordered {
        return field;
    }
    let mut metadata = field.metadata().clone();
    metadata.insert(ORDERED_KEY.to_owned(), "true".to_owned());
    field.with_metadata(metadata)
}

/// Whether a categorical field's categories are ordered.
pub fn is_ordered(field: &Field) -> bool {
    field.metadata().get(ORDERED_KEY).is_some_and(|v| v == "true")
}

/// The name a field had in its source file (see [`SOURCE_NAME_KEY`]).
pub fn source_name(field: &Field) -> &str {
    field.metadata().get(SOURCE_NAME_KEY).map_or(field.name().as_str(), String::as_str)
}

/// A name for a column `name` that clashes with the table's id column `id`: `<name>_column`, or
/// with a number when `taken` (the other columns' names) has that too.
pub fn renamed_column(name: &str, taken: &dyn Fn(&str) -> bool) -> String {
    let first = format!("{name}_column");
    if !taken(&first) {
        return first;
    }
    (2..).map(|k| format!("{name}_column_{k}")).find(|n| !taken(n)).unwrap_or(first)
}

/// The ordered categories recorded on a categorical field, if it is one.
pub fn categories_of(field: &Field) -> Option<Vec<String>> {
    if !matches!(field.data_type(), DataType::Dictionary(_, v) if **v == DataType::Utf8) {
        return None;
    }
    let json = field.metadata().get(CATEGORIES_KEY)?;
    serde_json::from_str(json).ok()
}

/// Whether a schema is a valid `obs` schema: first column `cell_id` Utf8 not null.
pub fn check_obs_schema(schema: &Schema) -> Result<(), SchemaError> {
    check_id_column(schema, CELL_ID)
}

/// Whether a schema is a valid `var` schema: first column `gene_id` Utf8 not null.
pub fn check_var_schema(schema: &Schema) -> Result<(), SchemaError> {
    check_id_column(schema, GENE_ID)
}

fn check_id_column(schema: &Schema, name: &str) -> Result<(), SchemaError> {
    let Some(first) = schema.fields().first() else {
        return Err(SchemaError(format!("no columns, expected {name:?} first")));
    };
    if first.name() != name || first.data_type() != &DataType::Utf8 || first.is_nullable() {
        return Err(SchemaError(format!(
            "first column is {:?} ({}, nullable {}), expected {name:?} (Utf8, not null)",
            first.name(),
            first.data_type(),
            first.is_nullable()
        )));
    }
    for field in schema.fields().iter().skip(1) {
        if let DataType::Dictionary(_, _) = field.data_type()
            && categories_of(field).is_none()
        {
            return Err(SchemaError(format!(
                "categorical column {:?} has no {CATEGORIES_KEY:?} metadata",
                field.name()
            )));
        }
    }
    Ok(())
}

/// Columns of `truth.parquet`.
pub mod truth {
    /// Cell type (categorical).
    pub const CELL_TYPE: &str = "cell_type";
    /// Condition, `+`-joined perturbations (categorical).
    pub const CONDITION: &str = "condition";
    /// Doses, `+`-joined in the order of `condition` (categorical).
    pub const DOSE: &str = "dose";
    /// Cells of this group in the atlas (0 for held-back groups).
    pub const N_CELLS: &str = "n_cells";
    /// True when the group was held back from the cells (counterfactual only).
    pub const HELD_OUT: &str = "held_out";
    /// E\[x_g\]: the expected count of each gene.
    pub const MEAN: &str = "mean";
    /// E[log1p(x_g)], estimated by sampling.
    pub const MEAN_LOG1P: &str = "mean_log1p";
    /// Var[log1p(x_g)], estimated by sampling.
    pub const VAR_LOG1P: &str = "var_log1p";
}

/// A `FixedSizeList<Float32>` of `len` items (per-gene vectors, embeddings).
pub fn f32_vector_type(len: i32) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), len)
}

/// Schema of `truth.parquet`: one row per (cell_type, condition, dose) with per-gene vectors of
/// `n_genes` values in `var` order.
pub fn truth_schema(cell_types: &[String], conditions: &[String], doses: &[String], n_genes: i32) -> SchemaRef {
    Arc::new(Schema::new(vec![
        categorical_field(truth::CELL_TYPE, cell_types, false),
        categorical_field(truth::CONDITION, conditions, false),
        categorical_field(truth::DOSE, doses, false),
        Field::new(truth::N_CELLS, DataType::UInt64, false),
        Field::new(truth::HELD_OUT, DataType::Boolean, false),
        Field::new(truth::MEAN, f32_vector_type(n_genes), false),
        Field::new(truth::MEAN_LOG1P, f32_vector_type(n_genes), false),
        Field::new(truth::VAR_LOG1P, f32_vector_type(n_genes), false),
    ]))
}

/// Columns and metadata of prediction files (`cpa-stream predict`).
pub mod predictions {
    /// The source cell's id (Utf8).
    pub const CELL_ID: &str = super::CELL_ID;
    /// Predicted means of the chosen genes, `FixedSizeList<Float32>` in the order of [`GENES_KEY`].
    pub const MEAN: &str = "mean";
    /// `E[log1p(x)]` of the predicted counts for the same genes, `FixedSizeList<Float32>`
    /// (`predict --expected-log1p`, nb models): what a mean of log-normalised counts estimates.
    pub const EXPECTED_LOG1P: &str = "expected_log1p";
    /// The predicted change of `E[log1p(x)]` from the source cell decoded under its own condition
    /// to the target, the same genes, `FixedSizeList<Float32>` (`predict --change`, nb models):
    /// added to the cells' observed log1p counts, the model's prediction anchored on real data.
    pub const CHANGE_LOG1P: &str = "change_log1p";
    /// The anchored prediction, the same genes, `FixedSizeList<Float32>` (written by default with
    /// targets; `predict --plain` leaves it out): where [`IS_ANCHORED`] is true, the source cell's
    /// observed expression (log1p of its counts for a count model) plus the model's predicted
    /// change of it, `log1p(mean)` under the target minus under the cell's own condition (the
    /// means themselves for a Gaussian model); its mean over a group of source cells is their
    /// observed mean plus the model's predicted change of the group's mean. Where
    /// [`IS_ANCHORED`] is false (the source cell is not a control of the target's covariates),
    /// the plain prediction in the same space, `log1p(mean)`.
    pub const ANCHORED: &str = "anchored";
    /// Whether the row's [`ANCHORED`] values are anchored on its source cell (Boolean, written
    /// with [`ANCHORED`], after the label columns).
    pub const IS_ANCHORED: &str = "is_anchored";
    /// Counts drawn per cell from the model's count distribution (`predict --counts`, nb and zinb
    /// models), the same genes, `FixedSizeList<Float32>` of whole numbers: one sample of the
    /// cell's counts under the target, at the source cell's library size, seeded by the
    /// prediction's seed.
    pub const COUNTS: &str = "counts";
    /// The per-gene columns besides `mean`, in the order they are written.
    pub const GENE_COLUMNS: [&str; 4] = [EXPECTED_LOG1P, CHANGE_LOG1P, ANCHORED, COUNTS];
    /// Schema metadata key: the chosen genes as a JSON array, in the order of [`MEAN`]'s items.
    pub const GENES_KEY: &str = "cpa_stream.genes";
    /// Schema metadata key: the model directory the predictions came from (absolute path).
    pub const MODEL_KEY: &str = "cpa_stream.model";
    /// Schema metadata key: the model's content hash (`xxh3-64:HEX` of its weights file), which
    /// identifies it wherever the directory moves.
    pub const MODEL_ID_KEY: &str = "cpa_stream.model_id";
    /// Schema metadata key, written only for an ensemble (`predict --ensemble`): its models as a
    /// JSON array of `{"model": absolute path, "model_id": "xxh3-64:HEX"}`, the first that of
    /// [`MODEL_KEY`]; each predicted column is their mean.
    pub const ENSEMBLE_KEY: &str = "cpa_stream.ensemble";
    /// Schema metadata key: the store the source cells came from (absolute path).
    pub const STORE_KEY: &str = "cpa_stream.store";
    /// Schema metadata key: `long` (a `mean` list column) or `wide` (one column per gene).
    pub const LAYOUT_KEY: &str = "cpa_stream.layout";
    /// Latents that can be written, each a `FixedSizeList<Float32>` of the latent width.
    pub const LATENTS: [&str; 5] = ["z_basal", "z", "z_corrected", "z_no_pert", "z_no_pert_corrected"];
}

/// Schema of a prediction file: `cell_id`, then one categorical column per label of the target
/// condition (`label_columns`: the perturbation key, the dose key, the covariates),
/// `is_anchored` when `gene_columns` holds `anchored`, `mean` (one
/// value per gene of `genes`, which the schema metadata records), the per-gene columns of
/// `gene_columns` (of [`predictions::GENE_COLUMNS`], the same genes), then the chosen latents of
/// width `latent_width`. Errors when a label column collides with another column.
pub fn prediction_schema(
    label_columns: &[String],
    genes: &[String],
    gene_columns: &[&str],
    latents: &[String],
    latent_width: i32,
) -> Result<SchemaRef, SchemaError> {
    let mut fields = vec![Field::new(predictions::CELL_ID, DataType::Utf8, false)];
    fields.extend(label_columns.iter().map(|name| Field::new(name, categorical_type(), false)));
    if gene_columns.contains(&predictions::ANCHORED) {
        fields.push(Field::new(predictions::IS_ANCHORED, DataType::Boolean, false));
    }
    let n_genes = i32::try_from(genes.len()).map_err(|_| SchemaError(format!("{} genes is too many", genes.len())))?;
    fields.push(Field::new(predictions::MEAN, f32_vector_type(n_genes), false));
    for name in gene_columns {
        if !predictions::GENE_COLUMNS.contains(name) {
            return Err(SchemaError(format!("unknown gene column {name:?}")));
        }
        fields.push(Field::new(*name, f32_vector_type(n_genes), false));
    }
    for latent in latents {
        if !predictions::LATENTS.contains(&latent.as_str()) {
            return Err(SchemaError(format!("unknown latent {latent:?} (known: {})", predictions::LATENTS.join(", "))));
        }
        fields.push(Field::new(latent, f32_vector_type(latent_width), false));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = fields.iter().find(|f| !seen.insert(f.name().clone())) {
        return Err(SchemaError(format!(
            "column {:?} would appear twice (an obs label named like an output column)",
            dup.name()
        )));
    }
    let genes_json = serde_json::to_string(genes).map_err(|e| SchemaError(e.to_string()))?;
    Ok(Arc::new(Schema::new(fields).with_metadata(HashMap::from([(predictions::GENES_KEY.to_owned(), genes_json)]))))
}

/// The genes recorded in a prediction schema's metadata.
pub fn prediction_genes(schema: &Schema) -> Option<Vec<String>> {
    serde_json::from_str(schema.metadata().get(predictions::GENES_KEY)?).ok()
}

/// Columns of a DEG table (`degs.parquet` in a store, imported from an `.h5ad`'s `uns`, and in an
/// evaluation's output): one row per (group, rank).
pub mod degs {
    /// File name of the DEG table inside a store or an evaluation directory.
    pub const FILE: &str = "degs.parquet";
    /// The group (condition, or covariates and condition), Utf8.
    pub const GROUP: &str = "group";
    /// Rank within the group, 0 = most differentially expressed, UInt32.
    pub const RANK: &str = "rank";
    /// Gene name as in `var`'s id column, Utf8.
    pub const GENE: &str = "gene";
    /// The score, Float64 (null where the source has none).
    pub const SCORE: &str = "score";
    /// The two-sided p-value, Float64 (null where the source has none; Welch's test when
    /// `evaluate` computes the DEGs, scanpy's `pvals` when imported).
    pub const PVALUE: &str = "pvalue";
    /// The Benjamini-Hochberg adjusted p-value over the group's genes, Float64 (null where the
    /// source has none; scanpy's `pvals_adj` when imported).
    pub const QVALUE: &str = "qvalue";
    /// In an evaluation's table: the Wilcoxon rank-sum p-value of the condition's sampled real
    /// cells against its control cells (at most 100 each), Float64 (null without samples).
    pub const WILCOXON_PVALUE: &str = "wilcoxon_pvalue";
    /// Its Benjamini-Hochberg adjusted value over all genes, Float64 (null without samples).
    pub const WILCOXON_QVALUE: &str = "wilcoxon_qvalue";
}

/// Schema of a DEG table.
pub fn deg_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(degs::GROUP, DataType::Utf8, false),
        Field::new(degs::RANK, DataType::UInt32, false),
        Field::new(degs::GENE, DataType::Utf8, false),
        Field::new(degs::SCORE, DataType::Float64, true),
        Field::new(degs::PVALUE, DataType::Float64, true),
        Field::new(degs::QVALUE, DataType::Float64, true),
    ]))
}

/// Schema of an evaluation's `degs.parquet`: [`deg_schema`]'s columns (readable wherever a DEG
/// table is, `predict --degs` included) and the Wilcoxon rank-sum p- and q-values.
pub fn evaluation_deg_schema() -> SchemaRef {
    let mut fields: Vec<Field> = deg_schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(degs::WILCOXON_PVALUE, DataType::Float64, true));
    fields.push(Field::new(degs::WILCOXON_QVALUE, DataType::Float64, true));
    Arc::new(Schema::new(fields))
}

/// Columns of a training run's `metrics.parquet`: one row per epoch.
pub mod training_metrics {
    /// Epoch, 0-based (UInt32).
    pub const EPOCH: &str = "epoch";
    /// Losses and accuracy of the epoch's training batches (Float64, null when not finite or not
    /// computed): reconstruction, KL, adversary, gradient penalty, perturbation accuracy.
    pub const TRAIN_FLOATS: [&str; 5] = ["recon_loss", "kl", "adv_loss", "penalty_adv", "acc_perts"];
    /// cpa-tools' training `r2_mean` and `r2_var` (Float64, null when not finite or absent from
    /// an older file): per autoencoder batch, the R2 over genes of the predicted against the
    /// observed means (and variances) of each category of condition and covariates in the batch,
    /// averaged over categories, then over the epoch's batches.
    pub const TRAIN_R2: [&str; 2] = ["r2_mean", "r2_var"];
    /// The perturbation adversary's own loss and gradient penalty (Float64, null as above);
    /// `adv_loss` and `penalty_adv` are sums over all adversaries.
    pub const PERTURBATION_ADVERSARY: [&str; 2] = ["adv_perts", "penalty_perts"];
    /// The autoencoder's learning rate during the epoch (Float64).
    pub const LR: &str = "lr";
    /// Counts of the epoch (UInt64): cells, autoencoder batches, adversary batches.
    pub const COUNTS: [&str; 3] = ["cells", "autoencoder_batches", "adversary_batches"];
    /// Wall seconds of the epoch (Float64).
    pub const SECONDS: &str = "seconds";
    /// Validation after the epoch (Float64, null when not validated): reconstruction loss per
    /// cell, mean R2 of means and of variances over conditions, and the score early stopping keeps.
    pub const VALIDATION_FLOATS: [&str; 4] = ["val_recon_loss", "val_r2_mean", "val_r2_var", "val_score"];
    /// Cells validated (UInt64, null when not validated).
    pub const VAL_CELLS: &str = "val_cells";
    /// Mean R2 over conditions of the means of each one's top 20 genes by change from the
    /// validation controls (Float64, null when not validated or without control cells).
    pub const VAL_R2_MEAN_DEG: &str = "val_r2_mean_deg";
    /// cpa-tools' k-NN disentanglement of the validation cells (Float64, null when not
    /// validated): the mean over validation batches of the k-NN purity (k = 30) of the condition
    /// and of each covariate of more than one value, summed, in the basal latent and in the full
    /// latent. Lower basal purity is better disentangled.
    pub const VAL_DISENTANGLEMENT: [&str; 2] = ["val_disnt_basal", "val_disnt_after"];

    /// The last columns, three per covariate of the model in its order (Float64, null for a
    /// covariate of one value, which has no adversary, or absent from an older file): its
    /// adversary's loss, gradient penalty and accuracy, named as cpa-tools names them
    /// (`adv_<covariate>`, `penalty_<covariate>`, `acc_<covariate>`), or with `covariate_`
    /// before the covariate's name where that would repeat a column's name (a covariate named
    /// `perts`).
    pub fn covariate_columns(covariate: &str) -> [String; 3] {
        let fixed = |name: &str| {
            let mut all = [EPOCH, LR, SECONDS, VAL_CELLS, VAL_R2_MEAN_DEG].into_iter();
            all.any(|f| f == name)
                || TRAIN_FLOATS.contains(&name)
                || TRAIN_R2.contains(&name)
                || PERTURBATION_ADVERSARY.contains(&name)
                || COUNTS.contains(&name)
                || VALIDATION_FLOATS.contains(&name)
                || VAL_DISENTANGLEMENT.contains(&name)
        };
        let named = |c: &str| ["adv", "penalty", "acc"].map(|p| format!("{p}_{c}"));
        let plain = named(covariate);
        if plain.iter().any(|n| fixed(n)) { named(&format!("covariate_{covariate}")) } else { plain }
    }
}

/// Schema of a training run's `metrics.parquet` for a model of these covariates.
pub fn training_metrics_schema(covariates: &[String]) -> SchemaRef {
    use training_metrics as m;
    let mut fields = vec![Field::new(m::EPOCH, DataType::UInt32, false)];
    fields.extend(m::TRAIN_FLOATS.iter().map(|n| Field::new(*n, DataType::Float64, true)));
    fields.extend(m::TRAIN_R2.iter().map(|n| Field::new(*n, DataType::Float64, true)));
    fields.extend(m::PERTURBATION_ADVERSARY.iter().map(|n| Field::new(*n, DataType::Float64, true)));
    fields.push(Field::new(m::LR, DataType::Float64, false));
    fields.extend(m::COUNTS.iter().map(|n| Field::new(*n, DataType::UInt64, false)));
    fields.push(Field::new(m::SECONDS, DataType::Float64, false));
    fields.extend(m::VALIDATION_FLOATS.iter().map(|n| Field::new(*n, DataType::Float64, true)));
    fields.push(Field::new(m::VAL_CELLS, DataType::UInt64, true));
    fields.push(Field::new(m::VAL_R2_MEAN_DEG, DataType::Float64, true));
    fields.extend(m::VAL_DISENTANGLEMENT.iter().map(|n| Field::new(*n, DataType::Float64, true)));
    for covariate in covariates {
        fields.extend(m::covariate_columns(covariate).map(|n| Field::new(n, DataType::Float64, true)));
    }
    Arc::new(Schema::new(fields))
}

/// Columns of an evaluation's `metrics.parquet` besides the labels and metrics.
pub mod evaluation_metrics {
    /// Which control cells were decoded (Utf8): the evaluated split's, `held-out` or `all`.
    pub const CONTROL_SOURCE: &str = "control_source";
    /// Where the condition's DEGs came from (Utf8): `store`, `file`, `computed`, `truth`, `none`.
    pub const DEG_SOURCE: &str = "deg_source";
    /// Real cells of the condition in the evaluated split (UInt64).
    pub const N_CELLS: &str = "n_cells";
    /// Control cells decoded into the condition (UInt64).
    pub const N_CONTROL: &str = "n_control";
    /// The training condition whose latent shift is closest to the condition's (Utf8; empty when
    /// none has enough training cells); `uncertainty_cosine` and `uncertainty_euclidean` are the
    /// distances.
    pub const CLOSEST_CONDITION: &str = "closest_condition";
}

/// Schema of an evaluation's `metrics.parquet`: one Utf8 column per label (the model's
/// covariates, then its perturbation and dose keys), the sources and counts of
/// [`evaluation_metrics`], then one nullable Float64 column per metric. Errors when two columns
/// would share a name.
pub fn evaluation_metrics_schema(labels: &[String], metrics: &[String]) -> Result<SchemaRef, SchemaError> {
    use evaluation_metrics as e;
    let mut fields: Vec<Field> = labels.iter().map(|l| Field::new(l, DataType::Utf8, false)).collect();
    fields.push(Field::new(e::CONTROL_SOURCE, DataType::Utf8, false));
    fields.push(Field::new(e::DEG_SOURCE, DataType::Utf8, false));
    fields.push(Field::new(e::N_CELLS, DataType::UInt64, false));
    fields.push(Field::new(e::N_CONTROL, DataType::UInt64, false));
    fields.push(Field::new(e::CLOSEST_CONDITION, DataType::Utf8, false));
    fields.extend(metrics.iter().map(|m| Field::new(m, DataType::Float64, true)));
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = fields.iter().find(|f| !seen.insert(f.name().clone())) {
        return Err(SchemaError(format!(
            "column {:?} would appear twice (an obs label named like a metric)",
            dup.name()
        )));
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// Compares a schema read back from a file with the expected one: names, types and nullability,
/// and the categories of categorical fields. Other metadata (writer-added keys) is ignored.
pub fn same_schema(expected: &Schema, actual: &Schema) -> Result<(), SchemaError> {
    if expected.fields().len() != actual.fields().len() {
        return Err(SchemaError(format!("{} columns, expected {}", actual.fields().len(), expected.fields().len())));
    }
    for (e, a) in expected.fields().iter().zip(actual.fields()) {
        if e.name() != a.name() || e.data_type() != a.data_type() || e.is_nullable() != a.is_nullable() {
            return Err(SchemaError(format!(
                "column {:?} is {} (nullable {}), expected {:?} {} (nullable {})",
                a.name(),
                a.data_type(),
                a.is_nullable(),
                e.name(),
                e.data_type(),
                e.is_nullable()
            )));
        }
        if categories_of(e) != categories_of(a) {
            return Err(SchemaError(format!("column {:?} has other categories than expected", a.name())));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categorical_fields_keep_order_and_unused_categories() {
        let cats = vec!["b".to_owned(), "a".to_owned(), "unused".to_owned()];
        let f = categorical_field("condition", &cats, false);
        assert_eq!(categories_of(&f), Some(cats));
        assert_eq!(categories_of(&Field::new("x", DataType::Utf8, false)), None);
    }

    #[test]
    fn obs_schema_needs_cell_id_first() {
        let good = Schema::new(vec![
            Field::new(CELL_ID, DataType::Utf8, false),
            categorical_field("cell_type", &["t".to_owned()], false),
        ]);
        assert!(check_obs_schema(&good).is_ok());
        let bad = Schema::new(vec![Field::new("x", DataType::Utf8, false)]);
        assert!(check_obs_schema(&bad).unwrap_err().0.contains("cell_id"));
        let no_cats =
            Schema::new(vec![Field::new(CELL_ID, DataType::Utf8, false), Field::new("c", categorical_type(), false)]);
        assert!(check_obs_schema(&no_cats).unwrap_err().0.contains("metadata"));
    }

    #[test]
    fn prediction_schema_records_genes_and_rejects_collisions() {
        let genes = vec!["g1".to_owned(), "g2".to_owned()];
        let s = prediction_schema(&["condition".into(), "dose".into()], &genes, &[], &["z_basal".into()], 4)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(prediction_genes(&s), Some(genes.clone()));
        let names: Vec<&str> = s.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["cell_id", "condition", "dose", "mean", "z_basal"]);
        assert_eq!(s.field(3).data_type(), &f32_vector_type(2));
        assert!(
            prediction_schema(&["mean".into()], &genes, &[], &[], 4)
                .unwrap_err()
                .0
                .contains("\"mean\" would appear twice")
        );
        assert!(prediction_schema(&[], &genes, &[], &["zz".into()], 4).unwrap_err().0.contains("unknown latent"));
    }

    #[test]
    fn same_schema_reports_the_differing_column() {
        let a = truth_schema(&["t".into()], &["control".into()], &["1".into()], 5);
        assert!(same_schema(&a, &a).is_ok());
        let b = truth_schema(&["t".into()], &["control".into()], &["1".into()], 6);
        assert!(same_schema(&a, &b).unwrap_err().0.contains("mean"));
    }
}
