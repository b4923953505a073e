//! The `--source` / `--where` expression parser and its column listing.
#![no_main]

use cpa_stream_pipeline::obs::expr::Expr;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(init: common::init(), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(e) = text.parse::<Expr>() {
        let _ = e.columns();
    }
});
