//! libtorch's errors as the stages' errors.
//!
//! [`cpa_stream_stages::Error::Torch`] holds libtorch's failures, but its crate does not link
//! libtorch (so that the commands that need no model start without libtorch's initialisation),
//! which leaves it without a `From<tch::TchError>` for `?` to use, and this crate cannot add one
//! (neither type is its own). The model's code converts explicitly: `tensor.f_log().torch()?`.

use cpa_stream_stages::{Error, Result};

/// `.torch()`: a libtorch result as a result of the stages' error type.
pub(crate) trait TorchResult<T> {
    /// The value, or libtorch's error as [`Error::Torch`].
    fn torch(self) -> Result<T>;
}

impl<T> TorchResult<T> for std::result::Result<T, tch::TchError> {
    fn torch(self) -> Result<T> {
        self.map_err(|e| Error::torch("tensor operation", e))
    }
}

/// libtorch's error as [`Error::Torch`] (for `map_err`).
pub(crate) fn torch_error(e: tch::TchError) -> Error {
    Error::torch("tensor operation", e)
}
