//! The encoder against its definition, on random obs tables written to real stores.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use cpa_stream_schemas::tables::{CELL_ID, GENE_ID};
use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::model::HostBatch;
use cpa_stream_stages::model::vocab::{Stratify, canonical_condition, split_condition, split_of_cell_id};
use cpa_stream_stages::store::{Store, StoreWriter, StoreWriterOptions};
use proptest::prelude::*;

use super::*;

/// One obs row: condition, dose, cell type.
type Row = (String, String, String);

/// Writes a store of `rows.len()` empty cells x 3 genes with the rows as string obs columns.
fn store_with(dir: &Path, rows: &[Row]) -> Store {
    let var = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(GENE_ID, DataType::Utf8, false)])),
        vec![Arc::new(StringArray::from(vec!["g0", "g1", "g2"])) as ArrayRef],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    let schema = Arc::new(Schema::new(vec![text(CELL_ID), text("condition"), text("dose"), text("cell_type")]));
    let path = dir.join("obs.store");
    let mut writer = StoreWriter::create(&path, &var, Arc::clone(&schema), StoreWriterOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut counts = CsrBatch::new(3);
    for _ in rows {
        counts.push_row(&[], &[]);
    }
    let column = |f: &dyn Fn(usize, &Row) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().enumerate().map(|(i, r)| f(i, r))))
    };
    let obs = RecordBatch::try_new(
        schema,
        vec![
            column(&|i, _| format!("c{i}")),
            column(&|_, r| r.0.clone()),
            column(&|_, r| r.1.clone()),
            column(&|_, r| r.2.clone()),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    writer.push_rows(&counts, &obs).unwrap_or_else(|e| panic!("{e}"));
    writer.finish().unwrap_or_else(|e| panic!("{e}"));
    Store::open(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// A random row: a condition of one or two of three drugs (either order), its doses, a cell type.
fn row() -> impl Strategy<Value = Row> {
    let doses = prop::sample::select(vec!["0.1", "1", "10"]);
    (0usize..6, doses.clone(), doses, prop::sample::select(vec!["x", "y", "z"])).prop_map(|(c, d1, d2, t)| {
        let (condition, dose) = match c {
            0 => ("control".to_owned(), "1".to_owned()),
            1 => ("A".to_owned(), d1.to_owned()),
            2 => ("B".to_owned(), d1.to_owned()),
            3 => ("A+B".to_owned(), format!("{d1}+{d2}")),
            4 => ("B+A".to_owned(), format!("{d2}+{d1}")),
            _ => ("C+A".to_owned(), format!("{d1}+{d2}")),
        };
        (condition, dose, t.to_owned())
    })
}

fn options(validation: f64, test: f64, seed: u64, holdout: Vec<String>) -> EncoderOptions {
    EncoderOptions {
        dose_key: Some("dose".into()),
        covariate_keys: vec!["cell_type".into()],
        split: SplitSpec::fractions(validation, test, seed, holdout),
        ..EncoderOptions::default()
    }
}

/// [`options`] with the split assigned by `method`.
fn options_by(method: Stratify, validation: f64, test: f64, seed: u64, holdout: Vec<String>) -> EncoderOptions {
    EncoderOptions {
        split: SplitSpec::Fraction { validation, test, seed, holdout, method },
        ..options(0.0, 0.0, 0, Vec::new())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn every_cell_gets_its_group_and_split(
        rows in prop::collection::vec(row(), 1..400),
        validation in 0.0f64..0.4,
        test in 0.0f64..0.4,
        seed in any::<u64>(),
        hold in any::<bool>(),
        by_id in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = store_with(dir.path(), &rows);
        let holdout = if hold { vec!["B+A".to_owned()] } else { Vec::new() };
        let method = if by_id { Stratify::CellId } else { Stratify::Exact };
        let labels = CellLabels::from_store(&store, &options_by(method, validation, test, seed, holdout.clone()));
        // A held-out condition that no cell has is an error, not an empty split; so is a
        // table without the control.
        let has_ab = rows.iter().any(|r| canonical_condition(&r.0) == "A+B");
        let has_control = rows.iter().any(|r| r.0 == "control");
        if (hold && !has_ab) || !has_control {
            prop_assert!(labels.is_err());
            return Ok(());
        }
        let labels = labels.unwrap_or_else(|e| panic!("{e}"));
        let v = &labels.vocab;
        prop_assert_eq!(labels.n_cells(), rows.len() as u64);
        // Per group (condition as written, dose, cell type): its cells and their splits.
        let mut per_group: HashMap<&Row, (u64, [u64; 4])> = HashMap::new();
        for (cell, r) in rows.iter().enumerate() {
            let g = labels.group(cell as u64);
            let mut want: Vec<(String, u32)> = split_condition(&r.0, Some(&r.1), 2)
                .unwrap_or_else(|e| panic!("{e}"))
                .into_iter()
                .map(|(n, d)| (n.to_owned(), d.to_bits()))
                .collect();
            let mut got: Vec<(String, u32)> =
                g.parts.iter().map(|&(id, d)| (v.perturbations[id as usize].clone(), d.to_bits())).collect();
            want.sort();
            got.sort();
            prop_assert_eq!(got, want, "cell {}", cell);
            prop_assert_eq!(&v.covariates[0].categories[g.covariates[0] as usize], &r.2);
            prop_assert_eq!(&v.conditions[g.class as usize], &canonical_condition(&r.0));
            let split = labels.split(cell as u64);
            let held = hold && canonical_condition(&r.0) == "A+B";
            prop_assert_eq!(split == Split::Ood, held, "cell {} ({:?})", cell, r);
            if by_id && !held {
                // A function of the cell's id alone.
                let expected = Split::from(split_of_cell_id(&format!("c{cell}"), seed, validation, test));
                prop_assert_eq!(split, expected, "cell {}", cell);
            }
            let e = per_group.entry(r).or_default();
            e.0 += 1;
            e.1[split as usize] += 1;
        }
        // Exact: each group's validation and test cells are its fractions, to one cell.
        for (group, (n, splits)) in &per_group {
            if by_id || (hold && canonical_condition(&group.0) == "A+B") {
                continue;
            }
            let close = |got: u64, fraction: f64| (got as f64 - fraction * *n as f64).abs() <= 1.0;
            prop_assert!(close(splits[1], validation), "{:?}: {} of {} cells valid at {}", group, splits[1], n, validation);
            prop_assert!(close(splits[2], test), "{:?}: {} of {} cells test at {}", group, splits[2], n, test);
        }
        let counted: u64 = labels.split_counts.iter().sum();
        prop_assert_eq!(counted, rows.len() as u64);
    }
}

#[test]
fn combinations_in_any_order_give_the_same_perturbation_row() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let rows: Vec<Row> = [("A+B", "0.1+1"), ("B+A", "1+0.1"), ("A+B", "1+0.1"), ("control", "1")]
        .iter()
        .map(|(c, d)| ((*c).to_owned(), (*d).to_owned(), "x".to_owned()))
        .collect();
    let store = store_with(dir.path(), &rows);
    let labels = CellLabels::from_store(&store, &options(0.0, 0.0, 0, Vec::new())).unwrap_or_else(|e| panic!("{e}"));
    let mut batch = HostBatch::new(3, 1);
    for cell in 0..4 {
        let g = labels.group(cell);
        batch.push_labels(&g.parts, &g.covariates, g.class);
    }
    let p = &batch.perts;
    let row = |i: usize| {
        let (a, b) = (p.offsets[i] as usize, p.offsets[i + 1] as usize);
        (p.ids[a..b].to_vec(), p.doses[a..b].to_vec())
    };
    assert_eq!(row(0), row(1), "A+B at 0.1+1 and B+A at 1+0.1");
    assert_ne!(row(0), row(2), "the doses stay with their perturbation");
    assert_eq!(batch.conditions[0], batch.conditions[2], "one condition class whatever the doses");
    assert!(batch.dose_matrix(labels.vocab.n_perturbations()).is_ok(), "a valid CSR");
}

#[test]
fn a_split_column_and_bad_values() {
    assert_eq!("Validation".parse::<Split>().ok(), Some(Split::Valid));
    assert_eq!("training".parse::<Split>().ok(), Some(Split::Train));
    assert!("holdout".parse::<Split>().is_err());
    for s in Split::ALL {
        assert_eq!(s.name().parse::<Split>().ok(), Some(s));
        assert_eq!(Split::from_bits(s as u32), s);
    }
}

#[test]
fn group_keys_tell_labels_apart() {
    let mut key = GroupKey::default();
    let a = key.of("A+B", Some("1+1"), &["x"]).to_owned();
    assert_eq!(key.of("A+B", Some("1+1"), &["x"]), a);
    assert_ne!(key.of("A+B", Some("1+1"), &["y"]), a);
    assert_ne!(key.of("A+B", None, &["x"]), a);
    assert_ne!(key.of("A+B1", Some("+1"), &["x"]), a, "the separator keeps fields apart");
}

#[test]
fn models_from_before_the_exact_split_keep_their_sequence_split() {
    let old: SplitSpec =
        serde_json::from_str(r#"{"fraction": {"validation": 0.1, "test": 0.2, "seed": 4, "holdout": []}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(old, SplitSpec::Fraction { method: Stratify::Sequence, .. }), "{old:?}");
    let new = SplitSpec::fractions(0.1, 0.2, 4, Vec::new());
    let text = serde_json::to_string(&new).unwrap_or_default();
    assert!(text.contains(r#""method":"cell_id""#), "{text}");
    // The sequence assignment still labels every cell as it did: 1,000 cells of one group.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut rows: Vec<Row> = (0..1000).map(|_| ("A".to_owned(), "1".to_owned(), "x".to_owned())).collect();
    rows.push(("control".to_owned(), "1".to_owned(), "x".to_owned()));
    let store = store_with(dir.path(), &rows);
    let options = EncoderOptions { split: old, ..options(0.0, 0.0, 0, Vec::new()) };
    let labels = CellLabels::from_store(&store, &options).unwrap_or_else(|e| panic!("{e}"));
    let splits: Vec<Split> = (0..1000).map(|c| labels.split(c)).collect();
    // (The control is group 1, after them.)
    let expected: Vec<Split> = (0..1000).map(|k| super::scan::stratified(4, 0, k, 0.1, 0.2)).collect();
    assert_eq!(splits, expected);
}

#[test]
fn a_control_that_does_not_occur_is_an_error_naming_the_closest_values() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let rows: Vec<Row> = [("A", "1"), ("ctrl", "1"), ("B", "1"), ("Control", "1")]
        .iter()
        .map(|(c, d)| ((*c).to_owned(), (*d).to_owned(), "x".to_owned()))
        .collect();
    let store = store_with(dir.path(), &rows);
    let err = CellLabels::from_store(&store, &options(0.0, 0.0, 0, Vec::new())).unwrap_err().to_string();
    assert!(err.contains(r#"control "control" does not occur in obs column "condition""#), "{err}");
    assert!(err.contains(r#"closest first: "Control", "ctrl""#), "{err}");
    let named = EncoderOptions { control: "Control".into(), ..options(0.0, 0.0, 0, Vec::new()) };
    assert!(CellLabels::from_store(&store, &named).is_ok());
    // Holding out the control, or naming a covariate or held-out condition twice, is refused.
    let held = EncoderOptions { control: "Control".into(), ..options(0.1, 0.1, 0, vec!["Control".into()]) };
    let err = CellLabels::from_store(&store, &held).unwrap_err().to_string();
    assert!(err.contains("cannot be held out"), "{err}");
    let twice = EncoderOptions { control: "Control".into(), ..options(0.1, 0.1, 0, vec!["A".into(), "A".into()]) };
    assert!(CellLabels::from_store(&store, &twice).unwrap_err().to_string().contains("named twice"));
    let twice = EncoderOptions {
        control: "Control".into(),
        covariate_keys: vec!["cell_type".into(), "cell_type".into()],
        ..options(0.0, 0.0, 0, Vec::new())
    };
    assert!(CellLabels::from_store(&store, &twice).unwrap_err().to_string().contains("named twice"));
    let missing = EncoderOptions { perturbation_key: "conditon".into(), ..options(0.0, 0.0, 0, Vec::new()) };
    let err = CellLabels::from_store(&store, &missing).unwrap_err().to_string();
    assert!(err.contains(r#"no obs column "conditon" (closest first: "condition""#), "{err}");
}

#[test]
fn cell_id_splits_meet_their_fractions_on_a_large_group() {
    // 20,000 cells of one group: the counts are binomial around the fractions (deterministic
    // here: the ids and the seed are fixed).
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut rows: Vec<Row> = (0..20_000).map(|_| ("A".to_owned(), "1".to_owned(), "x".to_owned())).collect();
    rows.push(("control".to_owned(), "1".to_owned(), "x".to_owned()));
    let store = store_with(dir.path(), &rows);
    let labels = CellLabels::from_store(&store, &options(0.1, 0.2, 7, Vec::new())).unwrap_or_else(|e| panic!("{e}"));
    let [train, valid, test, _] = labels.split_counts;
    let sd = |p: f64| (20_001.0 * p * (1.0 - p)).sqrt();
    assert!((valid as f64 - 2_000.1).abs() < 4.0 * sd(0.1), "{valid} validation cells of 20,001");
    assert!((test as f64 - 4_000.2).abs() < 4.0 * sd(0.2), "{test} test cells of 20,001");
    assert_eq!(train + valid + test, 20_001);
}

/// The options a model recorded give its covariates back in the model's order, wherever the
/// batch covariate was: listed among the covariates (any place) or appended by the batch key.
#[test]
fn recorded_options_label_covariates_in_the_models_order() {
    use cpa_stream_stages::model::vocab::{Covariate, DataSpec, Vocabulary};
    let covariate =
        |name: &str, is_batch: bool| Covariate { name: name.into(), categories: vec!["a".into()], is_batch };
    for order in [
        vec![covariate("cell_type", false), covariate("batch", true)],
        vec![covariate("batch", true), covariate("cell_type", false)],
        vec![covariate("donor", false), covariate("batch", true), covariate("cell_type", false)],
        vec![covariate("cell_type", false)],
    ] {
        let names: Vec<String> = order.iter().map(|c| c.name.clone()).collect();
        let vocab = Vocabulary {
            genes: vec!["g0".into()],
            perturbations: vec!["<pad>".into(), "control".into()],
            covariates: order,
            conditions: vec!["control".into()],
            condition_counts: vec![1],
            data: Some(DataSpec {
                perturbation_key: "condition".into(),
                dose_key: None,
                split: SplitSpec::fractions(0.1, 0.1, 0, Vec::new()),
                cells: None,
            }),
        };
        let recorded = EncoderOptions::recorded(&vocab, 2, Path::new("model")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(recorded.all_covariate_keys(), names);
        assert_eq!(recorded.batch_key.is_some(), names.iter().any(|n| n == "batch"));
    }
    let bare = Vocabulary {
        genes: Vec::new(),
        perturbations: Vec::new(),
        covariates: Vec::new(),
        conditions: Vec::new(),
        condition_counts: Vec::new(),
        data: None,
    };
    let err = EncoderOptions::recorded(&bare, 2, Path::new("m")).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("m: the model records no obs keys"), "{err}");
}
