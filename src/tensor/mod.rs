//! Model parameters as bytes: safetensors in memory, SHA-256 digests.
//!
//! A [`ParamSet`] is the host-side, device-independent form of a model's parameters: an ordered
//! (by name) list of named f32 tensors. It is what travels between server and clients (as
//! safetensors bytes in the blob store, referenced by a [`Digest`]) and what aggregation
//! strategies fold together (flat `&[f32]` per tensor, see [`ParamSet::tensors_mut`]).
//!
//! ```
//! use fedmq::tensor::{NamedTensor, ParamSet};
//!
//! let params = ParamSet::new(vec![
//!     NamedTensor::new("linear.weight", vec![2, 3], vec![0.5; 6])?,
//!     NamedTensor::new("linear.bias", vec![2], vec![0.0, 1.0])?,
//! ])?;
//! let bytes = params.to_safetensors_bytes();
//! let back = ParamSet::from_safetensors_bytes(&bytes)?;
//! assert_eq!(back, params);
//! assert_eq!(back.digest(), params.digest());
//! # Ok::<(), fedmq::tensor::Error>(())
//! ```
//!
//! # Layout
//! - `param_set`: [`ParamSet`], [`NamedTensor`], conversions to and from candle `VarMap`s and
//!   safetensors bytes, and the [`LayoutMismatch`] report.
//! - `digest`: [`Digest`], the SHA-256 of a blob.

mod digest;
mod param_set;
mod view;

pub use digest::Digest;
pub use param_set::{LayoutMismatch, NamedTensor, ParamSet, ShapeMismatch};
pub use view::{ParamsView, TensorView};

/// Errors of the parameter layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not a valid safetensors blob (bad header, truncated data, bad offsets...).
    #[error("malformed safetensors blob: {0}")]
    Malformed(safetensors::SafeTensorError),
    /// A tensor in a blob or a `VarMap` has another dtype than f32.
    #[error("tensor `{name}` has dtype {dtype}; fedmq parameters are f32")]
    UnsupportedDtype {
        /// Tensor name.
        name: String,
        /// The dtype found, as its name (`F16`, `BF16`, `I64`, ...).
        dtype: String,
    },
    /// Two parameter layouts (names, shapes, dtypes) differ; the report lists every difference.
    #[error("parameter layouts differ: {0}")]
    Mismatch(Box<LayoutMismatch>),
    /// The same tensor name appears twice.
    #[error("duplicate tensor name `{0}`")]
    DuplicateName(String),
    /// The data length does not match the shape.
    #[error("tensor `{name}`: shape {shape:?} holds {expected} values but {got} were given")]
    LengthMismatch {
        /// Tensor name.
        name: String,
        /// Declared shape.
        shape: Vec<usize>,
        /// Product of the shape.
        expected: usize,
        /// Length of the data given.
        got: usize,
    },
    /// An operation of the candle tensor library failed (device transfer, allocation).
    // Not `#[from]`: that would also make it the error's source, and `{:#}` would print the
    // candle message twice.
    #[error("candle: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// Result of the parameter layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
