//! Integration tests of cpa-stream (one test binary; one module per area).

mod analyses;
mod append;
mod bad_input;
mod cli;
mod common;
mod h5ad;
mod layout;
mod link;
mod memory;
mod model;
mod predict;
mod repository;
mod shared;
mod store;
mod synth;
mod train;
mod trust;
mod untrusted;
mod zarr;
