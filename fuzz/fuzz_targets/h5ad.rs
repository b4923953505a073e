//! The .h5ad reader: the input is a whole file (seeded by scripts/fuzz.sh with anndata's
//! archived files of versions 0.5 to 0.11, generated ones, and the attack files of
//! tests/fixtures/untrusted_h5ad.py: external storage, external links, virtual datasets, filters
//! that are not built in, sizes the file cannot hold), opened as X, as adata.raw and as its
//! first layer, untrusted and as a trusted collection (its folder holds nothing else, so every
//! external reference must be refused), with obs, var, every row and the DEG table read. The
//! HDF5 C library is not instrumented: coverage guides through cpa-stream's own reading code.
#![no_main]


use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::h5ad::{ExternalData, H5adReader, MatrixLayout, MatrixSource};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(init: common::init(), |data: &[u8]| {
    let path = common::scratch().join("input.h5ad");
    std::fs::write(&path, data).expect("scratch");
    let sources = [MatrixSource::X, MatrixSource::Raw, MatrixSource::Layer("counts")];
    for (source, external) in sources.into_iter().flat_map(|s| [(s, ExternalData::Refuse), (s, ExternalData::SameDirectory)]) {
        let Ok(h5) = H5adReader::open_matrix_with(&path, source, external) else { continue };
        let n = h5.n_obs();
        let _ = h5.read_obs(0..n);
        let _ = h5.read_var();
        let _ = h5.read_degs(None);
        let _ = h5.other_matrices();
        if h5.matrix().layout() == MatrixLayout::Csc {
            let _ = h5.matrix().read_columns(0..h5.n_vars().min(64));
        } else {
            let mut out = CsrBatch::new(h5.n_vars().min(u64::from(u32::MAX)) as u32);
            let _ = h5.matrix().read_rows(0..n.min(4096), &mut out);
        }
    }
});
