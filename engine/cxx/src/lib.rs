//! The static library of the engine's C++ wrappers over libtorch (`engine/cxx/*.cpp`), compiled
//! by this crate's build script; the engine declares their functions and links the library
//! through this crate.
//!
//! A crate of its own, without a dependency on libtorch's binding, so that a cold build compiles
//! these files beside the binding's own C++ shim (two files, the longer of which takes minutes on
//! one core) instead of after it: the engine's build script, which waits for the binding's, only
//! reads which wrappers were compiled (`DEP_CPA_CXX_CFGS`) and checks that both builds found the
//! same libtorch (`DEP_CPA_CXX_TORCH`).
#![no_std]
