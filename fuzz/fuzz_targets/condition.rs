//! Condition and dose text (`A+B` with `1.0+0.5`) and `--targets` specifications.
//!
//! Input: byte 0 is the maximum combination length (modulo 5); the rest is
//! `condition` NUL `dose` (no NUL: no dose), also parsed whole as a target specification.
#![no_main]

use cpa_stream_engine::predictor::targets::parse_target_spec;
use cpa_stream_stages::model::vocab::split_condition;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(init: common::init(), |data: &[u8]| {
    let [max, rest @ ..] = data else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let (condition, dose) = match text.split_once('\0') {
        Some((c, d)) => (c, Some(d)),
        None => (text, None),
    };
    let _ = split_condition(condition, dose, usize::from(*max % 5));
    let _ = parse_target_spec(text);
});
