//! candle models, optimizers, the local trainer and the training benchmark.
//!
//! Models are registered by name ([`registry`]): FedML's `lr`, `mlp` (FedAvg 2NN) and `cnn`
//! (FedAvg CNN) in [`model`], the next-character LSTM `rnn` in [`rnn`], matrix factorization `mf`
//! in [`mf`], and any an application adds. Parameter names are part of the wire protocol; the
//! seeded initialization every client of a federation shares is in [`model`].
//!
//! Training runs on one of two engines with the same semantics:
//! - on the CPU, a native engine (`native`) with hand-written forward and backward passes over
//!   the built-in image architectures and the `rnn` LSTM, calling the `gemm` crate directly,
//!   splitting each mini-batch over the rayon pool and updating parameters in place. It exists
//!   because candle's CPU path spends most of a small step in per-op overhead and does not use
//!   the second core well (measurements in `docs/BENCHMARKS.md`, "Training throughput");
//! - on other devices (CUDA), and for models without a native plan, candle's autograd with the
//!   [`optim`] optimizers written in candle tensor ops. [`Engine::Candle`] forces this path on
//!   the CPU too (tests compare both).
//!
//! # Layout
//! - [`registry`]: [`ModelDef`], [`Registry`], [`ParamSpec`] with its [`Scope`] (shared or local).
//! - [`model`]: [`ModelKind`] (the image models), [`Model`] (a built model, a
//!   `candle_nn::Module`), [`init_model`], [`init_params`].
//! - [`rnn`]: the next-character LSTM; [`mf`]: matrix factorization with local user factors.
//! - [`optim`]: SGD (momentum, Nesterov, L2 weight decay) and Adam with PyTorch's update
//!   rules, as host kernels and as a candle-tensor optimizer.
//! - [`trainer`]: [`train_local`], [`evaluate`], [`train_central`], [`select_device`].
//! - `native`: the CPU engine.

pub mod mf;
pub mod model;
mod native;
pub mod optim;
pub mod registry;
pub mod rnn;
pub mod trainer;

pub use model::{init_model, init_params, Model, ModelKind};
pub use optim::{OptimizerConfig, OptimizerKind, TensorOptimizer};
pub use registry::{
    ModelDef, ModelRef, NativePlan, Network, ParamInit, ParamSpec, Registry, Scope,
};
pub use trainer::{
    evaluate, select_device, train_central, train_local, CentralEpoch, CentralReport, Engine,
    EpochStats, EvalReport, TrainOptions, TrainOutcome, TrainReport,
};

/// Errors of model building, training and evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `model_args.model` names no model fedmq has.
    #[error("unknown model `{name}`; valid models: {valid}")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The valid names, comma-separated.
        valid: String,
    },
    /// `train_args.client_optimizer` names no optimizer fedmq has.
    #[error("unknown optimizer `{name}`; valid optimizers: {valid}")]
    UnknownOptimizer {
        /// The name given.
        name: String,
        /// The valid names, comma-separated.
        valid: String,
    },
    /// A name given to [`Registry::register`] is taken.
    #[error("a model named `{name}` is already registered; pick another name")]
    DuplicateModel {
        /// The name.
        name: String,
    },
    /// The model cannot take this kind of data (sequences into a CNN, ratings into a
    /// classifier).
    #[error(
        "model `{model}` cannot take {data}: it takes {takes}; pick a model for this data set \
         (model_args.model) or a data set for this model (data_args.dataset)"
    )]
    Unsupported {
        /// The model.
        model: String,
        /// What the data is.
        data: String,
        /// What the model takes.
        takes: String,
    },
    /// The model cannot take samples of this shape.
    #[error("model `{model}` cannot take samples of shape {shape:?}: {reason}")]
    SampleShape {
        /// The model.
        model: String,
        /// The sample shape.
        shape: Vec<usize>,
        /// Why.
        reason: String,
    },
    /// A data set with no classes.
    #[error("the data set has no classes")]
    NoClasses,
    /// The data set does not fit the model (sample shape or class count differ, or a label is
    /// not below the class count).
    #[error("data set `{dataset}` does not fit the model: {reason}")]
    DataMismatch {
        /// The data set's name.
        dataset: String,
        /// What differs.
        reason: String,
    },
    /// A sample index past the end of the data set.
    #[error("sample index {index} is out of range for data set `{dataset}` of {len} samples")]
    IndexOutOfRange {
        /// The data set's name.
        dataset: String,
        /// The offending index.
        index: usize,
        /// The data set's length.
        len: usize,
    },
    /// A training option is out of its valid range.
    #[error("invalid training option `{field}`: {reason}")]
    InvalidOption {
        /// The option, as named in [`TrainOptions`].
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// Building a thread pool failed.
    #[error("cannot build a thread pool of {threads} threads: {reason}")]
    ThreadPool {
        /// Requested threads.
        threads: usize,
        /// rayon's message.
        reason: String,
    },
    /// Converting parameters failed.
    #[error(transparent)]
    Tensor(#[from] crate::tensor::Error),
    /// A candle operation failed (device memory, kernel launch, shape bug).
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

/// Result of the training layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
