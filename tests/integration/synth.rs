//! Synthetic atlases: determinism, the truth table, and truth agreeing with the cells.

use std::collections::HashMap;

use arrow_array::cast::AsArray;

use arrow_array::types::{Float32Type, Int32Type, UInt64Type};
use arrow_array::{DictionaryArray, FixedSizeListArray};
use cpa_stream::RunContext;
use cpa_stream::synth::SynthOptions;
use cpa_stream::unstable::schemas::tables::{categories_of, truth};
use cpa_stream::unstable::schemas::{Codec, StoreFiles};
use cpa_stream::unstable::stages::store::{Store, read_table, table_schema};
use cpa_stream::unstable::stages::synth::{SynthAtlas, SynthConfig};

fn small_config(seed: u64) -> SynthConfig {
    let mut c = SynthConfig::new(6000, 120, 4, 2, 2, 2, seed);
    c.truth_samples = 64;
    c
}

#[test]
fn same_seed_same_atlas_whatever_the_threads_and_codec_agree() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, threads, codec| {
        let options = SynthOptions { threads, codec, ..SynthOptions::new(small_config(5), dir.path().join(name)) };
        cpa_stream::synth::run(&options, &RunContext::default()).unwrap().manifest
    };
    let one = run("one.store", 1, Codec::Raw);
    let three = run("three.store", 3, Codec::Raw);
    for name in [StoreFiles::INDPTR, StoreFiles::INDICES, StoreFiles::DATA, StoreFiles::OBS, StoreFiles::TRUTH] {
        assert_eq!(one.files[name], three.files[name], "{name} differs between 1 and 3 threads");
    }
    let z = run("z.store", 2, Codec::zstd());
    assert_eq!(z.nnz, one.nnz);
    assert!(z.total_bytes() < one.total_bytes());
    let other = cpa_stream::synth::run(
        &SynthOptions::new(small_config(6), dir.path().join("other.store")),
        &RunContext::default(),
    )
    .unwrap()
    .manifest;
    assert_ne!(other.files[StoreFiles::DATA], one.files[StoreFiles::DATA]);
    Store::open(dir.path().join("three.store")).unwrap().verify().unwrap();
}

/// Per (cell_type, condition, dose): number of cells, per-gene sums of counts and of log1p counts.
type GroupSums = HashMap<(String, String, String), (u64, Vec<f64>, Vec<f64>)>;

fn empirical_group_sums(store: &Store) -> GroupSums {
    let g = store.n_vars() as usize;
    let mut sums: GroupSums = HashMap::new();
    let mut cursor = store.cursor().unwrap();
    let mut row = 0u64;
    for batch in read_table(&store.file_path(StoreFiles::OBS)).unwrap() {
        let batch = batch.unwrap();
        let col = |name: &str| -> Vec<String> {
            let d: &DictionaryArray<Int32Type> = batch.column_by_name(name).unwrap().as_dictionary();
            let values = d.values().as_string::<i32>();
            d.keys().iter().map(|k| values.value(k.unwrap() as usize).to_owned()).collect()
        };
        let (ct, cond, dose) = (col("cell_type"), col("condition"), col("dose"));
        for i in 0..batch.num_rows() {
            let entry = sums
                .entry((ct[i].clone(), cond[i].clone(), dose[i].clone()))
                .or_insert_with(|| (0, vec![0.0; g], vec![0.0; g]));
            entry.0 += 1;
            let (idx, val) = cursor.row(row).unwrap();
            for (&j, &v) in idx.iter().zip(val) {
                entry.1[j as usize] += f64::from(v);
                entry.2[j as usize] += f64::from(v).ln_1p();
            }
            row += 1;
        }
    }
    sums
}

#[test]
fn truth_table_describes_the_cells_and_the_held_back_combination() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SynthConfig::new(24_000, 150, 3, 1, 2, 1, 11);
    config.truth_samples = 3000;
    config.control_fraction = 0.2;
    let atlas = SynthAtlas::new(config.clone()).unwrap();
    let path = dir.path().join("t.store");
    cpa_stream::synth::run(&SynthOptions::new(config, &path), &RunContext::default()).unwrap();
    let store = Store::open(&path).unwrap();
    let empirical = empirical_group_sums(&store);

    let truth_path = store.file_path(StoreFiles::TRUTH);
    let schema = table_schema(&truth_path).unwrap();
    let conditions = categories_of(schema.field_with_name(truth::CONDITION).unwrap()).unwrap();
    let expected = cpa_stream::unstable::schemas::tables::truth_schema(
        &atlas.cell_types,
        &conditions,
        &categories_of(schema.field_with_name(truth::DOSE).unwrap()).unwrap(),
        150,
    );
    cpa_stream::unstable::schemas::tables::same_schema(&expected, &schema).unwrap();
    // control, 3 singles, 1 observed pair, 1 held-back pair.
    assert_eq!(conditions.len(), 6);

    let (mut rows, mut cells, mut held_rows, mut checked) = (0, 0u64, 0, 0);
    let mut max_shift: f64 = 0.0;
    for batch in read_table(&truth_path).unwrap() {
        let batch = batch.unwrap();
        let name = |col: &str, i: usize| -> String {
            let d: &DictionaryArray<Int32Type> = batch.column_by_name(col).unwrap().as_dictionary();
            d.values().as_string::<i32>().value(d.keys().value(i) as usize).to_owned()
        };
        let vec_of = |col: &str, i: usize| -> Vec<f32> {
            let l: &FixedSizeListArray = batch.column_by_name(col).unwrap().as_fixed_size_list();
            l.value(i).as_primitive::<Float32Type>().values().to_vec()
        };
        let n_cells = batch.column_by_name(truth::N_CELLS).unwrap().as_primitive::<UInt64Type>().clone();
        let held = batch.column_by_name(truth::HELD_OUT).unwrap().as_boolean().clone();
        for i in 0..batch.num_rows() {
            rows += 1;
            cells += n_cells.value(i);
            let key = (name(truth::CELL_TYPE, i), name(truth::CONDITION, i), name(truth::DOSE, i));
            if held.value(i) {
                held_rows += 1;
                assert_eq!(n_cells.value(i), 0);
                assert!(key.1.contains('+') && !empirical.contains_key(&key), "{key:?}");
                continue;
            }
            let (n, sum, sum_log) = &empirical[&key];
            assert_eq!(*n, n_cells.value(i), "{key:?}");
            let (mean, mean_log) = (vec_of(truth::MEAN, i), vec_of(truth::MEAN_LOG1P, i));
            assert!(vec_of(truth::VAR_LOG1P, i).iter().all(|&v| v >= 0.0));
            if *n < 1000 {
                continue;
            }
            checked += 1;
            // Each gene within 5 standard errors (truth's own variance, both sample sizes), and
            // no systematic offset across genes.
            let var_log = vec_of(truth::VAR_LOG1P, i);
            let mut offset = 0.0;
            for j in 0..150 {
                let emp = sum[j] / *n as f64;
                let t = f64::from(mean[j]);
                if t > 2.0 {
                    assert!((emp - t).abs() < 0.15 * t, "{key:?} gene {j}: cells {emp}, truth {t}");
                }
                let diff = sum_log[j] / *n as f64 - f64::from(mean_log[j]);
                let se = (f64::from(var_log[j]) * (1.0 / *n as f64 + 1.0 / 3000.0)).sqrt();
                assert!(diff.abs() < 5.0 * se + 0.01, "{key:?} gene {j}: log1p off by {diff} (se {se})");
                offset += diff / 150.0;
            }
            assert!(offset.abs() < 0.03, "{key:?}: log1p means offset by {offset} on average");
            if key.1 != "control" {
                let control = &empirical[&(key.0.clone(), "control".to_owned(), "1".to_owned())];
                let shift = (0..150)
                    .map(|j| ((sum[j] / *n as f64).ln_1p() - (control.1[j] / control.0 as f64).ln_1p()).abs())
                    .sum::<f64>()
                    / 150.0;
                max_shift = max_shift.max(shift);
            }
        }
    }
    assert_eq!(rows, atlas.n_groups());
    assert_eq!(cells, 24_000);
    assert_eq!(held_rows, 2, "one held-back pair x one dose x two cell types");
    assert!(checked >= 4, "enough large groups compared ({checked})");
    assert!(max_shift > 0.1, "perturbations visibly change expression (mean |log fold| {max_shift})");
}
