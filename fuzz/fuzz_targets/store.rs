//! Store open and row gather, raw and zstd: one file of a valid store (made by scripts/fuzz.sh,
//! paths in CPA_FUZZ_STORE_RAW / CPA_FUZZ_STORE_ZSTD) edited as the input says, then opened,
//! read in order and gathered in reverse, verified and summarised. Errors are fine; a panic,
//! abort or out-of-bounds read is a finding.
//!
//! Input: byte 0 picks the codec (bit 7) and the file (the rest, modulo the store's files);
//! byte 1 bit 0 truncates the file at the first edit's offset; then 5-byte edits
//! (u32 LE offset modulo the file's length, new byte).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::store::{Store, summarize_obs};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

/// A template store's files: (relative path, bytes).
type Files = Vec<(PathBuf, Vec<u8>)>;

fn load(var: &str) -> Files {
    let root = PathBuf::from(std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run scripts/fuzz.sh store")));
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("template store") {
            let path = entry.expect("template store").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("template store");
                out.push((path.strip_prefix(&root).expect("inside the store").to_owned(), bytes));
            }
        }
    }
    out.sort();
    out
}

fn templates() -> &'static [Files; 2] {
    static T: OnceLock<[Files; 2]> = OnceLock::new();
    T.get_or_init(|| [load("CPA_FUZZ_STORE_RAW"), load("CPA_FUZZ_STORE_ZSTD")])
}

fuzz_target!(init: common::init(), |data: &[u8]| {
    let [select, flags, edits @ ..] = data else { return };
    let files = &templates()[usize::from(select >> 7)];
    let which = usize::from(select & 0x7f) % files.len();
    let store = common::scratch().join("s.store");
    let _ = std::fs::remove_dir_all(&store);
    for (i, (name, bytes)) in files.iter().enumerate() {
        let path = store.join(name);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("scratch");
        let mut bytes = bytes.clone();
        if i == which && !bytes.is_empty() {
            let mut cut = None;
            for edit in edits.chunks_exact(5) {
                let at = u32::from_le_bytes([edit[0], edit[1], edit[2], edit[3]]) as usize % bytes.len();
                cut.get_or_insert(at);
                bytes[at] = edit[4];
            }
            if flags & 1 == 1 {
                bytes.truncate(cut.unwrap_or(0));
            }
        }
        std::fs::write(&path, &bytes).expect("scratch");
    }
    let Ok(store) = Store::open(&store) else { return };
    if let Ok(mut cursor) = store.cursor() {
        let mut out = CsrBatch::new(store.n_vars() as u32);
        let _ = cursor.read_range(0..store.n_obs(), &mut out);
        let rows: Vec<u64> = (0..store.n_obs()).rev().collect();
        let _ = cursor.gather(&rows, &mut out);
    }
    let _ = store.verify();
    let _ = summarize_obs(&store);
});
