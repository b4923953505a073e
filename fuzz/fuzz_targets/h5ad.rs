//! The .h5ad reader: the input is a whole file (seeded by scripts/fuzz.sh with anndata's
//! archived files of versions 0.5 to 0.11 and generated ones), opened as X, as adata.raw and as
//! its first layer, with obs, var, every row and the DEG table read. The HDF5 C library is not
//! instrumented: coverage guides through cpa-stream's own reading code.
#![no_main]


use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::h5ad::{H5adReader, MatrixLayout, MatrixSource};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(init: common::init(), |data: &[u8]| {
    let path = common::scratch().join("input.h5ad");
    std::fs::write(&path, data).expect("scratch");
    for source in [MatrixSource::X, MatrixSource::Raw, MatrixSource::Layer("counts")] {
        let Ok(h5) = H5adReader::open_matrix(&path, source) else { continue };
        let n = h5.n_obs();
        let _ = h5.read_obs(0..n);
        let _ = h5.read_var();
        let _ = h5.read_degs(None);
        let _ = h5.other_matrices();
        if h5.layout() == MatrixLayout::Csc {
            let _ = h5.read_columns(0..h5.n_vars().min(64));
        } else {
            let mut out = CsrBatch::new(h5.n_vars().min(u64::from(u32::MAX)) as u32);
            let _ = h5.read_rows(0..n.min(4096), &mut out);
        }
    }
});
