//! Counterfactual targets: which perturbations, doses and covariate values the source cells are
//! decoded into, from `--target` specs or a CSV / Parquet table, checked against a model's
//! vocabulary.

use std::path::Path;

use crate::model::Vocabulary;
use crate::model::vocab::{canonical_condition, split_condition};
use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;

use crate::Stage;
use cpa_stream_pipeline::error::{Error, Result};
use cpa_stream_pipeline::obs::ObsKeys;

/// A target as the user wrote it: `(key, value)` pairs. Keys are the model's perturbation key
/// (or `perturbation` / `condition`), its dose key (or `dose`), and covariate names.
pub type TargetSpec = Vec<(String, String)>;

/// A target resolved against a vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The condition as written (`A+B`).
    pub condition: String,
    /// The doses as written, or `1` per part.
    pub dose: String,
    /// Vocabulary ids and doses.
    pub parts: Vec<(u32, f32)>,
    /// Per covariate of the model: the target's category code, or `None` to keep the source
    /// cell's own value.
    pub covariates: Vec<Option<u32>>,
}

impl Target {
    /// The target's value of covariate `c`, if it fixes one.
    pub fn covariate_value<'a>(&self, vocab: &'a Vocabulary, c: usize) -> Option<&'a str> {
        let code = self.covariates.get(c).copied().flatten()?;
        vocab.covariates.get(c)?.categories.get(code as usize).map(String::as_str)
    }

    /// Group names a DEG table may use for this target: `<covariates>_<condition>_<dose>`,
    /// `<covariates>_<condition>`, `<condition>` (the last also in canonical part order).
    pub fn deg_keys(&self, vocab: &Vocabulary, keys: &ObsKeys) -> Vec<String> {
        let covs: Vec<&str> = (0..vocab.covariates.len()).filter_map(|c| self.covariate_value(vocab, c)).collect();
        let prefix = if covs.is_empty() { String::new() } else { format!("{}_", covs.join("_")) };
        let mut out = Vec::new();
        if keys.dose.is_some() {
            out.push(format!("{prefix}{}_{}", self.condition, self.dose));
        }
        out.push(format!("{prefix}{}", self.condition));
        out.push(self.condition.clone());
        out.push(canonical_condition(&self.condition));
        out.dedup();
        out
    }
}

/// Parses `KEY=VALUE,KEY=VALUE`; a spec without `=` is a condition alone (`A+B`).
pub fn parse_target_spec(text: &str) -> Result<TargetSpec> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Error::InvalidInput("empty target".into()));
    }
    if !text.contains('=') {
        return Ok(vec![("condition".to_owned(), text.to_owned())]);
    }
    let spec: TargetSpec = text
        .split(',')
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| Error::InvalidInput(format!("target {text:?}: {pair:?} is not KEY=VALUE")))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || v.is_empty() {
                return Err(Error::InvalidInput(format!("target {text:?}: {pair:?} has an empty key or value")));
            }
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect::<Result<_>>()?;
    for (i, (k, _)) in spec.iter().enumerate() {
        if spec[..i].iter().any(|(seen, _)| seen == k) {
            return Err(Error::InvalidInput(format!("target {text:?}: key {k:?} is given twice")));
        }
    }
    Ok(spec)
}

/// Reads targets from a CSV (header row) or Parquet table; one target per row, one column per
/// key, empty cells meaning "not set". Files over `MAX_TARGETS_FILE_BYTES` (64 MiB) and tables of more
/// than [`MAX_TARGETS`] rows are errors: a damaged or hostile Parquet file can declare billions
/// of rows in a few bytes (one run-length-encoded page), so rows are counted as they are decoded.
pub fn read_targets_file(path: &Path) -> Result<Vec<TargetSpec>> {
    let origin = path.display().to_string();
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let mut out = Vec::new();
    if ext == "parquet" || ext == "pq" {
        let bytes = read_bounded(path)?;
        let batches = cpa_stream_stages::store::read_table_from_bytes(path, bytes)
            .map_err(|source| Error::Stage { stage: Stage::Targets, source })?;
        for batch in batches {
            let batch = batch.map_err(|source| Error::Stage { stage: Stage::Targets, source })?;
            push_targets(&batch, &origin, &mut out)?;
        }
    } else {
        for batch in read_csv(path)? {
            push_targets(&batch, &origin, &mut out)?;
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidInput(format!("{origin}: no targets")));
    }
    Ok(out)
}

/// Most targets one table may list: each costs the predictor a resolved target and the sink a
/// share of its metadata (about 1 KiB together), and a table of conditions is far smaller.
pub const MAX_TARGETS: usize = 1_000_000;

/// Largest targets file read (a table of conditions, not of cells).
const MAX_TARGETS_FILE_BYTES: u64 = 64 << 20;

fn too_large(origin: &str) -> Error {
    Error::InvalidInput(format!(
        "{origin}: larger than {} MiB; a targets table lists conditions, one per row",
        MAX_TARGETS_FILE_BYTES >> 20
    ))
}

/// Appends the targets of one batch of a targets table to `out`.
fn push_targets(batch: &RecordBatch, origin: &str, out: &mut Vec<TargetSpec>) -> Result<()> {
    if out.len() + batch.num_rows() > MAX_TARGETS {
        return Err(Error::InvalidInput(format!(
            "{origin}: more than {MAX_TARGETS} targets (rows); split the table and predict in parts"
        )));
    }
    let columns: Vec<(String, arrow_array::ArrayRef)> = batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(f, c)| {
            arrow_cast::cast(c, &DataType::Utf8)
                .map(|c| (f.name().clone(), c))
                .map_err(|e| Error::InvalidInput(format!("{origin}: column {:?}: {e}", f.name())))
        })
        .collect::<Result<_>>()?;
    for row in 0..batch.num_rows() {
        let spec: TargetSpec = columns
            .iter()
            .filter_map(|(name, col)| {
                let s = col.as_string::<i32>();
                (!s.is_null(row) && !s.value(row).trim().is_empty())
                    .then(|| (name.clone(), s.value(row).trim().to_owned()))
            })
            .collect();
        if spec.is_empty() {
            return Err(Error::InvalidInput(format!("{origin}: row {} sets no key", out.len() + 1)));
        }
        out.push(spec);
    }
    Ok(())
}

/// The whole file, at most [`MAX_TARGETS_FILE_BYTES`] of it.
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut bytes = Vec::new();
    file.take(MAX_TARGETS_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(Error::io(path))?;
    if bytes.len() as u64 > MAX_TARGETS_FILE_BYTES {
        return Err(too_large(&path.display().to_string()));
    }
    Ok(bytes)
}

pub(crate) fn read_csv(path: &Path) -> Result<Vec<RecordBatch>> {
    let origin = path.display().to_string();
    let bytes = read_bounded(path)?;
    // The whole file must be UTF-8 before arrow-csv sees it: arrow-csv 60 checks the fields of a
    // batch only together, so two invalid halves of a character in neighbouring fields pass and
    // each field becomes a `&str` that is not UTF-8 (undefined behaviour; found by the `targets`
    // fuzz target). In valid UTF-8 the ASCII delimiters never split a character.
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::InvalidInput(format!("{origin}: line {line}: not UTF-8 text (byte {})", e.valid_up_to()))
    })?;
    let header = text.lines().next().unwrap_or_default();
    let names: Vec<String> = header.trim_end().split(',').map(|n| n.trim().trim_matches('"').to_owned()).collect();
    if names.iter().any(String::is_empty) {
        return Err(Error::InvalidInput(format!(
            "{origin}: the header row {:?} has an empty column name",
            header.trim_end()
        )));
    }
    let schema = std::sync::Arc::new(arrow_schema::Schema::new(
        names.iter().map(|n| arrow_schema::Field::new(n, DataType::Utf8, true)).collect::<Vec<_>>(),
    ));
    let reader = arrow_csv::ReaderBuilder::new(schema)
        .with_header(true)
        .build(std::io::Cursor::new(text.as_bytes()))
        .map_err(Error::arrow(origin.as_str()))?;
    reader.collect::<std::result::Result<Vec<_>, _>>().map_err(Error::arrow(origin.as_str()))
}

/// The targets with their condition and dose spelled as the store's obs spells the same
/// condition (`B+A` → `A+B` with the doses reordered alike; `1+10` → `1.0+10.0`), so that
/// prediction files join with obs and with `evaluate`'s tables by plain strings. A target obs
/// does not hold keeps its own spelling.
pub fn spell_as_obs(
    mut targets: Vec<Target>,
    store: &cpa_stream_stages::store::Store,
    perturbation_key: &str,
    dose_key: Option<&str>,
) -> Result<Vec<Target>> {
    use cpa_stream_schemas::tables::categories_of;
    let schema = store
        .table_schema(cpa_stream_schemas::StoreFiles::OBS)
        .map_err(|source| Error::Stage { stage: Stage::Targets, source })?;
    let categories = |key: &str| schema.field_with_name(key).ok().and_then(categories_of).unwrap_or_default();
    let conditions = categories(perturbation_key);
    let doses = dose_key.map(categories).unwrap_or_default();
    let numbers = |text: &str| -> Option<Vec<f32>> { text.split('+').map(|d| d.trim().parse().ok()).collect() };
    for target in &mut targets {
        let names: Vec<&str> = target.condition.split('+').collect();
        let given: Vec<&str> = target.dose.split('+').collect();
        if !conditions.contains(&target.condition) {
            let mut sorted = names.clone();
            sorted.sort_unstable();
            let same = conditions.iter().find(|c| {
                let mut parts: Vec<&str> = c.split('+').collect();
                parts.sort_unstable();
                parts == sorted
            });
            if let Some(obs_condition) = same {
                if given.len() == names.len() {
                    let reordered: Option<Vec<&str>> = obs_condition
                        .split('+')
                        .map(|n| names.iter().position(|m| *m == n).map(|i| given[i]))
                        .collect();
                    if let Some(reordered) = reordered {
                        target.dose = reordered.join("+");
                    }
                }
                target.condition = obs_condition.clone();
            }
        }
        if !doses.contains(&target.dose)
            && let Some(want) = numbers(&target.dose)
            && let Some(obs_dose) = doses.iter().find(|d| numbers(d).is_some_and(|v| v == want))
        {
            target.dose = obs_dose.clone();
        }
    }
    Ok(targets)
}

/// Names a list for an error message (the first 30).
pub(crate) fn known(values: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let all: Vec<String> = values.into_iter().map(|v| v.as_ref().to_owned()).collect();
    let shown = all.iter().take(30).cloned().collect::<Vec<_>>().join(", ");
    if all.len() > 30 { format!("{shown}, ... ({} in all)", all.len()) } else { shown }
}

/// Resolves a spec against `vocab`; `perturbation_key` and `dose_key` are the obs columns the
/// model was trained with. Unknown keys, perturbations or covariate values are errors that list
/// the known ones.
pub fn resolve_target(
    spec: &TargetSpec,
    vocab: &Vocabulary,
    perturbation_key: &str,
    dose_key: Option<&str>,
    max_comb_len: usize,
) -> Result<Target> {
    let shown = || spec.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let bad = |msg: String| Error::InvalidInput(format!("target {:?}: {msg}", shown()));
    let mut condition = None;
    let mut dose = None;
    let mut covariates = vec![None; vocab.covariates.len()];
    for (key, value) in spec {
        if key == perturbation_key || key == "perturbation" || key == "condition" {
            condition = Some(value.clone());
        } else if Some(key.as_str()) == dose_key || key == "dose" {
            dose = Some(value.clone());
        } else if let Some(c) = vocab.covariates.iter().position(|c| &c.name == key) {
            let cov = &vocab.covariates[c];
            let code = cov.categories.iter().position(|v| v == value).ok_or_else(|| {
                bad(format!("{key} {value:?} is not a category the model knows ({})", known(&cov.categories)))
            })?;
            covariates[c] = Some(code as u32);
        } else {
            let mut keys = vec![perturbation_key.to_owned(), dose_key.unwrap_or("dose").to_owned()];
            keys.extend(vocab.covariates.iter().map(|c| c.name.clone()));
            return Err(bad(format!("unknown key {key:?} (keys: {})", keys.join(", "))));
        }
    }
    let condition = condition.ok_or_else(|| bad(format!("no {perturbation_key} given")))?;
    let parts = split_condition(&condition, dose.as_deref(), max_comb_len).map_err(bad)?;
    let index = vocab.perturbation_index();
    let parts = parts
        .into_iter()
        .map(|(name, d)| {
            index.get(name).map(|&id| (id, d)).ok_or_else(|| {
                bad(format!(
                    "perturbation {name:?} is not in the model's vocabulary ({})",
                    known(&vocab.perturbations[1..])
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let dose = dose.unwrap_or_else(|| vec!["1"; parts.len()].join("+"));
    Ok(Target { condition, dose, parts, covariates })
}

#[cfg(test)]
mod tests {
    use crate::model::vocab::Covariate;

    use super::*;

    fn vocab() -> Vocabulary {
        let cov = Covariate { name: "cell_type".into(), categories: vec!["A".into(), "B".into()], is_batch: false };
        Vocabulary::new(
            vec!["g1".into()],
            "control",
            ["control", "x", "y"].map(String::from),
            vec![cov],
            vec![("control".into(), 1)],
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn specs_resolve_with_doses_and_covariates() -> Result<()> {
        let v = vocab();
        let t = resolve_target(&parse_target_spec("y+x")?, &v, "condition", Some("dose"), 2)?;
        assert_eq!(
            (t.parts.clone(), t.dose.as_str(), t.covariates.clone()),
            (vec![(3, 1.0), (2, 1.0)], "1+1", vec![None])
        );
        let spec = parse_target_spec("condition=x+y, dose=0.1+1, cell_type=B")?;
        let t = resolve_target(&spec, &v, "condition", Some("dose"), 2)?;
        assert_eq!((t.parts.clone(), t.covariates.clone()), (vec![(2, 0.1), (3, 1.0)], vec![Some(1)]));
        assert_eq!(t.covariate_value(&v, 0), Some("B"));
        let err = parse_target_spec("condition=x,cell_type=A,condition=y").unwrap_err().to_string();
        assert!(err.contains(r#"key "condition" is given twice"#), "{err}");
        Ok(())
    }

    #[test]
    fn a_gene_list_names_each_gene_once() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::InvalidInput(e.to_string()))?;
        let path = dir.path().join("genes.txt");
        std::fs::write(&path, "g1\ng2\n\"g1\"\n").map_err(Error::io(&path))?;
        let err = crate::predictor::GeneSelection::from_file(&path).unwrap_err().to_string();
        assert!(err.contains(r#"gene "g1" is listed twice (entries 1 and 3)"#), "{err}");
        Ok(())
    }

    /// Found by `scripts/fuzz.sh targets` (AddressSanitizer: heap-buffer-overflow): a CSV whose
    /// fields hold halves of one UTF-8 character passed arrow-csv's check and became invalid
    /// `&str`s. Now the file is checked whole first and the error names the line.
    #[test]
    fn targets_tables_are_bounded_in_bytes_and_rows() -> std::result::Result<(), Box<dyn std::error::Error>> {
        use std::sync::Arc;

        use arrow_array::StringArray;
        use arrow_schema::{Field, Schema};
        let dir = tempfile::tempdir()?;
        // One more row than allowed, all the same condition: dictionary- and run-length-encoded
        // into a file of a few KB, as a hostile file would declare them.
        let schema = Arc::new(Schema::new(vec![Field::new("condition", DataType::Utf8, false)]));
        let rows = StringArray::from_iter_values(std::iter::repeat_n("x", MAX_TARGETS + 1));
        let path = dir.path().join("many.parquet");
        let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path)?, schema.clone(), None)?;
        writer.write(&RecordBatch::try_new(schema, vec![Arc::new(rows)])?)?;
        writer.close()?;
        assert!(std::fs::metadata(&path)?.len() < 1 << 20);
        let err = read_targets_file(&path).unwrap_err().to_string();
        assert!(err.contains("more than 1000000 targets (rows)"), "{err}");
        // Files over the byte bound, CSV or Parquet, are not read at all.
        for name in ["big.parquet", "big.csv"] {
            let big = dir.path().join(name);
            std::fs::File::create(&big)?.set_len(MAX_TARGETS_FILE_BYTES + 1)?;
            let err = read_targets_file(&big).unwrap_err().to_string();
            assert!(err.contains("larger than 64 MiB"), "{name}: {err}");
        }
        Ok(())
    }

    #[test]
    fn a_parquet_page_header_that_skips_past_the_end_is_an_error_not_a_hang() {
        // Found by the `targets` fuzz target: the Parquet library skipped a field of these damaged
        // page headers billions of times at the end of its input (one ran for hours read from
        // its file, the other for minutes from memory). Reading past the end is now an error.
        for name in ["targets-page-header-skip.parquet", "targets-page-header-skip-2.parquet"] {
            let path = crate::test_fixture("damaged").join(name);
            let started = std::time::Instant::now();
            let err = read_targets_file(&path).unwrap_err().to_string();
            eprintln!("{name}: error after {:?}: {err}", started.elapsed());
            assert!(err.contains(name), "{err}");
            assert!(err.contains("past the end of the file"), "{err}");
        }
    }

    #[test]
    fn a_targets_csv_that_is_not_utf8_is_an_error_naming_the_line() {
        let path = crate::test_fixture("damaged/targets-split-utf8.csv");
        let err = read_targets_file(&path).unwrap_err().to_string();
        assert!(err.contains("line 22: not UTF-8 text"), "{err}");
    }

    #[test]
    fn unknown_values_list_the_known_ones() -> Result<()> {
        let v = vocab();
        let err = |s: &str| {
            parse_target_spec(s)
                .and_then(|spec| resolve_target(&spec, &v, "condition", Some("dose"), 2))
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("z").contains("perturbation \"z\" is not in the model's vocabulary (control, x, y)"),
            "{}",
            err("z")
        );
        assert!(err("condition=x,cell_type=C").contains("\"C\" is not a category the model knows (A, B)"));
        assert!(err("condition=x,donor=1").contains("unknown key \"donor\" (keys: condition, dose, cell_type)"));
        assert!(err("condition=x+y,dose=1").contains("dose"));
        assert!(err("cell_type=A").contains("no condition given"));
        Ok(())
    }
}
