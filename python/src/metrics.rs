//! `evaluate`'s metric definitions, callable from Python (`cpa_stream.metrics`): the fidelity
//! harness and notebooks score with the functions `cpa-stream evaluate` scores with, not copies
//! of them.

use std::collections::{BTreeMap, HashMap};

use cpa_stream_engine::evaluate::NOISE_REPRODUCIBILITY;
use cpa_stream_engine::evaluate::field::pearson as field_pearson;
use cpa_stream_engine::evaluate::transfer::measure;
use cpa_stream_pipeline::condition::ConditionKey;
use cpa_stream_pipeline::stats::r2_score as stats_r2;
use cpa_stream_stages::model::vocab::CONTROL_ID;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Two vectors of one length, or a `ValueError` naming the function.
fn same_length(what: &str, a: &[f64], b: &[f64]) -> PyResult<()> {
    if a.len() != b.len() {
        return Err(PyValueError::new_err(format!("{what}: vectors of {} and {} values", a.len(), b.len())));
    }
    Ok(())
}

/// sklearn's R2 of `pred` against `truth` over their values (1 for a matched constant truth, 0
/// for any other prediction of a constant truth): `evaluate`'s `r2_mean` family.
#[pyfunction]
pub fn r2_score(truth: Vec<f64>, pred: Vec<f64>) -> PyResult<f64> {
    same_length("r2_score", &truth, &pred)?;
    Ok(stats_r2(&pred, &truth))
}

/// Pearson's correlation of two vectors (NaN with fewer than 2 values or a constant one):
/// `evaluate`'s `pearson_delta`, `change_reproducibility` and transfer correlations.
#[pyfunction]
pub fn pearson(a: Vec<f64>, b: Vec<f64>) -> PyResult<f64> {
    same_length("pearson", &a, &b)?;
    Ok(field_pearson(&a, &b))
}

/// `evaluate`'s transfer between covariate values (`cpa_stream_engine::evaluate::transfer`) of
/// the training shifts `shifts`: `(perturbation, covariate value, shift over genes)`, one per
/// condition, where a perturbation is what `evaluate` tells apart (its parts and their doses:
/// pass `"A+B|1.0"`, not `"A+B"`, to score doses apart). A dict with `same_perturbation_r`,
/// `same_pairs`, `other_perturbations_r`, `other_pairs`, `carries_over` and `slope`; `None` when
/// no perturbation has a shift in two covariate values.
#[pyfunction]
pub fn transfer<'py>(py: Python<'py>, shifts: Vec<(String, String, Vec<f64>)>) -> PyResult<Option<Bound<'py, PyDict>>> {
    let genes = shifts.first().map_or(0, |s| s.2.len());
    if let Some((p, c, s)) = shifts.iter().find(|s| s.2.len() != genes) {
        return Err(PyValueError::new_err(format!(
            "transfer: the shift of {p:?} in {c:?} has {} values, the first one {genes}",
            s.len()
        )));
    }
    // Ids as evaluate's keys hold them: perturbations after the control's id, covariate codes.
    let mut perturbations: BTreeMap<&str, u32> = BTreeMap::new();
    let mut covariates: BTreeMap<&str, u32> = BTreeMap::new();
    let mut by_key: HashMap<ConditionKey, &[f64]> = HashMap::new();
    for (p, c, s) in &shifts {
        let next = (CONTROL_ID + 1 + perturbations.len()) as u32;
        let pid = *perturbations.entry(p.as_str()).or_insert(next);
        let next = covariates.len() as u32;
        let cid = *covariates.entry(c.as_str()).or_insert(next);
        let key = ConditionKey::of(&[cid], &[(pid, 1.0)]);
        if by_key.insert(key, s).is_some() {
            return Err(PyValueError::new_err(format!("transfer: {p:?} in {c:?} is given twice")));
        }
    }
    let keys: Vec<&ConditionKey> = by_key.keys().collect();
    let Some(t) = measure(&keys, |k| by_key.get(k).map(|s| s.to_vec())) else {
        return Ok(None);
    };
    let out = PyDict::new(py);
    out.set_item("same_perturbation_r", t.same_perturbation_r)?;
    out.set_item("same_pairs", t.same_pairs)?;
    out.set_item("other_perturbations_r", t.other_perturbations_r)?;
    out.set_item("other_pairs", t.other_pairs)?;
    out.set_item("carries_over", t.carries_over)?;
    out.set_item("slope", t.slope)?;
    Ok(Some(out))
}

/// Adds the functions and `NOISE_REPRODUCIBILITY` (under it a condition's change is noise at
/// its number of cells) to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(r2_score, m)?)?;
    m.add_function(wrap_pyfunction!(pearson, m)?)?;
    m.add_function(wrap_pyfunction!(transfer, m)?)?;
    m.add("NOISE_REPRODUCIBILITY", NOISE_REPRODUCIBILITY)?;
    Ok(())
}
