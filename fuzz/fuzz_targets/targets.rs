//! The `--targets FILE` reader: the input is the file, read as CSV (byte 0 even) or Parquet.
#![no_main]


use cpa_stream_engine::predictor::targets::read_targets_file;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(init: common::init(), |data: &[u8]| {
    let [kind, body @ ..] = data else { return };
    let path = common::scratch().join(if kind % 2 == 0 { "targets.csv" } else { "targets.parquet" });
    std::fs::write(&path, body).expect("scratch");
    let _ = read_targets_file(&path);
});
