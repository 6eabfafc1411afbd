//! Errors of the client's round path: the strategy instruction it cannot follow
//! ([`HookError`]) and local training that produced no model ([`TrainError`]). Their text is
//! what the server records as the round's failure for this client, so it names the setting to
//! change.

use crate::proto::STRATEGY_INSTRUCTION_VERSION;

/// A strategy instruction (or its tensors) this client cannot follow. The client reports the
/// round as failed instead of training differently than the strategy assumes.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The instruction has a schema version this client does not read.
    #[error(
        "strategy {strategy} sent instruction version {version}; this client reads version \
         {STRATEGY_INSTRUCTION_VERSION}"
    )]
    Version {
        /// The strategy.
        strategy: String,
        /// The version sent.
        version: u32,
    },
    /// A parameter this client implements, with a value out of its range.
    #[error("strategy {strategy}: {name} {value} is {expected}")]
    Value {
        /// The strategy.
        strategy: String,
        /// The parameter.
        name: String,
        /// The value sent.
        value: f64,
        /// What it must be (`not ≥ 0`, `neither 0 nor 1`).
        expected: &'static str,
    },
    /// A parameter this client does not implement.
    #[error(
        "strategy {strategy} asks for {name:?}, which this client does not implement (known: \
         {known})"
    )]
    Unknown {
        /// The strategy.
        strategy: String,
        /// The parameter.
        name: String,
        /// The parameters this client implements.
        known: &'static str,
    },
    /// Tensors the instruction needs are missing or do not fit the model.
    #[error("{strategy}: the server's {what} does not fit the model: {source}")]
    Tensors {
        /// The strategy.
        strategy: &'static str,
        /// Which tensors (`control variate (strategy/control/*)`).
        what: &'static str,
        /// The layout difference.
        source: crate::tensor::Error,
    },
    /// Local training cannot be turned into what the strategy needs back.
    #[error("{strategy}: {detail}")]
    Unusable {
        /// The strategy.
        strategy: &'static str,
        /// Why.
        detail: String,
    },
}

/// Why local training produced no model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The server's model is not the one this client is set up for.
    #[error(
        "the server trains model {server:?}, this client is set up for {client:?}; use the same \
         model_args.model on both"
    )]
    ModelMismatch {
        /// `model` of the train command.
        server: String,
        /// This client's model.
        client: String,
    },
    /// The train command's settings cannot be used (an unknown optimizer).
    #[error("the train command's settings: {0}")]
    Settings(#[source] crate::train::Error),
    /// The global model's tensors do not fit this client's model.
    #[error("the global model does not fit this client's model: {0}")]
    Layout(#[source] crate::train::Error),
    /// Training itself failed.
    #[error("local training failed: {0}")]
    Failed(#[source] crate::train::Error),
    /// The trained parameters could not be read back.
    #[error("reading the trained model: {0}")]
    ReadBack(#[source] crate::train::Error),
    /// A newer round (or the finish) interrupted training.
    #[error("interrupted")]
    Interrupted,
    /// A trainer of the application's own failed.
    #[error(transparent)]
    Other(#[from] Box<dyn std::error::Error + Send + Sync>),
}
