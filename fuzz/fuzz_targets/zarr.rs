//! The zarr reader: one file of a valid AnnData zarr store (templates made by scripts/fuzz.sh
//! with anndata and zarr: format 2 and 3, sharded, small chunks; paths in CPA_FUZZ_ZARR, one per
//! line) edited, truncated or removed as the input says, then opened as X, as adata.raw and as
//! a layer, with obs, var, every row (or the first columns of a CSC matrix) and the DEG lists
//! read (X also with --allow-missing-chunks). Errors are fine; a panic, abort, an
//! allocation the store's bytes do not justify (-rss_limit_mb) or a hang is a finding.
//!
//! Input: byte 0 picks the template, byte 1 the file (modulo its files), byte 2 bit 0 truncates
//! the file at the first edit's offset, bit 1 removes it (a missing chunk); then 5-byte edits
//! (u32 LE offset modulo the file's length, new byte).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::h5ad::{ExternalData, MatrixLayout, MatrixSource};
use cpa_stream_stages::input::InputPolicy;
use cpa_stream_stages::zarr::ZarrReader;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

/// A template store's files: (relative path, bytes).
type Files = Vec<(PathBuf, Vec<u8>)>;

fn load(root: &std::path::Path) -> Files {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("template store") {
            let path = entry.expect("template store").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("template store");
                out.push((path.strip_prefix(root).expect("inside the store").to_owned(), bytes));
            }
        }
    }
    out.sort();
    out
}

fn templates() -> &'static Vec<Files> {
    static T: OnceLock<Vec<Files>> = OnceLock::new();
    T.get_or_init(|| {
        let list = std::env::var("CPA_FUZZ_ZARR").expect("CPA_FUZZ_ZARR is not set: run scripts/fuzz.sh zarr");
        list.lines().filter(|l| !l.is_empty()).map(|l| load(std::path::Path::new(l))).collect()
    })
}

fuzz_target!(init: common::init(), |data: &[u8]| {
    let [template, which, flags, edits @ ..] = data else { return };
    let files = &templates()[usize::from(*template) % templates().len()];
    let which = usize::from(*which) % files.len();
    let store = common::scratch().join("s.zarr");
    let _ = std::fs::remove_dir_all(&store);
    for (i, (name, bytes)) in files.iter().enumerate() {
        let path = store.join(name);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("scratch");
        let mut bytes = bytes.clone();
        if i == which {
            if flags & 2 == 2 {
                continue;
            }
            if !bytes.is_empty() {
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
        }
        std::fs::write(&path, &bytes).expect("scratch");
    }
    let reads = [
        (MatrixSource::X, false),
        (MatrixSource::X, true),
        (MatrixSource::Raw, false),
        (MatrixSource::Layer("counts"), false),
    ];
    for (source, allow_missing_chunks) in reads {
        {
            let policy = InputPolicy { external: ExternalData::Refuse, allow_missing_chunks };
            let Ok(z) = ZarrReader::open_matrix_with(&store, source, policy) else { continue };
            let n = z.n_obs();
            let _ = z.read_obs(0..n.min(4096));
            let _ = z.read_var();
            let _ = z.read_degs(None);
            let _ = z.missing_chunks();
            if z.matrix().layout() == MatrixLayout::Csc {
                let _ = z.matrix().read_columns(0..z.n_vars().min(64));
            } else {
                let mut out = CsrBatch::new(z.n_vars().min(u64::from(u32::MAX)) as u32);
                let _ = z.matrix().read_rows(0..n.min(4096), &mut out);
            }
        }
    }
});
