//! The model configuration (`--config cpa.toml`): parsing and validation.
#![no_main]

use cpa_stream_stages::model::config::CpaConfig;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(init: common::init(), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = CpaConfig::from_toml(text, "fuzz.toml");
});
