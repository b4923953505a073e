//! The `--targets FILE` reader: the input is the file, read as CSV (byte 0 even) or Parquet.
#![no_main]

use std::sync::OnceLock;

use cpa_stream_pipeline::predictor::targets::read_targets_file;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fn scratch() -> &'static std::path::Path {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().expect("scratch directory")).path()
}

fuzz_target!(init: common::init(), |data: &[u8]| {
    let [kind, body @ ..] = data else { return };
    let path = scratch().join(if kind % 2 == 0 { "targets.csv" } else { "targets.parquet" });
    std::fs::write(&path, body).expect("scratch");
    let _ = read_targets_file(&path);
});
