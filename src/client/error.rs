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
    /// The client's local parameters cannot be read or written (or it has nowhere to keep
    /// them).
    #[error("the client's local parameters: {0}")]
    LocalState(String),
    /// A newer round (or the finish) interrupted training.
    #[error("interrupted")]
    Interrupted,
    /// A trainer of the application's own failed.
    #[error(transparent)]
    Other(#[from] Box<dyn std::error::Error + Send + Sync>),
}

/// Why a client's round ended without an update. Its text is the round's `failure` message to
/// the server. Large causes are boxed: the error travels through every `?` of the round.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The global model could not be fetched before the round's deadline.
    #[error("fetching the global model: {0}")]
    Fetch(#[source] Box<crate::store::Error>),
    /// The global model is sealed and this client has no keys to open it.
    #[error(
        "{key}: the server sealed the global model, but this client has no encryption keys (set \
         fedmq_args.signing_key and trusted_keys)"
    )]
    NoKeys {
        /// Object key of the global model.
        key: String,
    },
    /// The global model does not open (altered, moved, not sealed for this client).
    #[error(transparent)]
    Open(Box<crate::store::SealedError>),
    /// The global model is not a safetensors file of f32 tensors.
    #[error("the global model does not decode: {0}")]
    Decode(#[source] Box<crate::tensor::Error>),
    /// The strategy instruction cannot be followed.
    #[error(transparent)]
    Hooks(Box<HookError>),
    /// Local training failed.
    #[error(transparent)]
    Train(Box<TrainError>),
    /// Training produced a non-finite loss, or a model whose test loss is not finite.
    #[error("training diverged ({what} {value}); lower train_args.learning_rate")]
    Diverged {
        /// Which figure: `train loss`, `test loss`.
        what: &'static str,
        /// Its value.
        value: f64,
    },
    /// The update could not be stored before the round's deadline.
    #[error("storing the update: {0}")]
    Store(#[source] Box<crate::store::Error>),
    /// The update's content key could not be wrapped for the server.
    #[error("sealing the update for the server: {0}")]
    Seal(#[source] Box<crate::crypto::seal::SealError>),
    /// A blocking task (decoding, training, encoding) panicked or was cancelled.
    #[error("{what} task failed: {source}")]
    Task {
        /// Which task.
        what: &'static str,
        /// The join error.
        source: tokio::task::JoinError,
    },
    /// The process is shutting down (the training slots are closed).
    #[error("training slots closed")]
    SlotsClosed,
    /// A newer round or the finish interrupted this one.
    #[error("interrupted")]
    Interrupted,
    /// A secure-aggregation stage failed here, or the server asked for what the protocol
    /// forbids (the reason says which).
    #[error("secure aggregation: {0}")]
    SecAgg(String),
}

impl From<HookError> for RoundError {
    fn from(e: HookError) -> Self {
        Self::Hooks(Box::new(e))
    }
}

impl From<TrainError> for RoundError {
    fn from(e: TrainError) -> Self {
        Self::Train(Box::new(e))
    }
}
