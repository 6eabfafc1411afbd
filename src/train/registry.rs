//! The open model layer: a model is a [`ModelDef`] registered by name in a [`Registry`].
//!
//! A definition says, for the data it is given ([`DataSpec`]), which parameter tensors it has
//! ([`ParamSpec`]: wire name, shape, initialization and whether it is [`Scope::Shared`] or
//! [`Scope::Local`]) and builds a candle [`Network`] from a `VarBuilder`. candle's autograd then
//! trains it on any device. The built-in definitions are `lr`, `mlp`, `cnn` (images), `rnn`
//! (next-character LSTM) and `mf` (matrix factorization); an application registers its own with
//! [`Registry::register`] (see `examples/custom_model.rs`).
//!
//! # Shared and local parameters
//! Shared parameters are what the server aggregates and sends: the global model holds only
//! them. Local parameters never leave the client: the client keeps them on its disk between
//! rounds (`DataTrainer`) and trains them with the shared ones. `mf`'s user embeddings and
//! biases are local, its item embeddings and biases shared.
//!
//! # Native fast path
//! For the built-in architectures the CPU has a hand-written engine (`native`). A definition
//! outside the crate cannot claim one: [`ModelDef::native_plan`] returns a [`NativePlan`],
//! which only this crate can construct. The trainer uses the native engine only where a plan
//! exists, and tests compare both engines' losses and gradients on every such model.

use super::{Error, Result};
use crate::data::{DataSpec, Target};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Whether a parameter is aggregated or stays on the client.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Sent to the server, aggregated, part of the global model.
    #[default]
    Shared,
    /// Kept on the client's disk between rounds; never uploaded.
    Local,
}

/// How a parameter's initial values are drawn (see [`super::init_params`] for the exact
/// generator).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ParamInit {
    /// `U(-bound, bound)`; PyTorch's default for linear, convolution and LSTM layers with
    /// `bound = 1/√fan_in`.
    Uniform {
        /// Half-width.
        bound: f64,
    },
    /// `N(0, std²)`; PyTorch's default for embeddings with `std = 1`.
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// All zeros.
    Zeros,
}

impl ParamInit {
    /// `U(-1/√fan_in, 1/√fan_in)`.
    pub fn fan_in(fan_in: usize) -> Self {
        ParamInit::Uniform {
            bound: 1.0 / (fan_in.max(1) as f64).sqrt(),
        }
    }

    /// candle's equivalent, for a `VarBuilder` that creates variables.
    pub fn to_candle(self) -> candle_nn::Init {
        match self {
            ParamInit::Uniform { bound } => candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
            ParamInit::Normal { std } => candle_nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
            ParamInit::Zeros => candle_nn::Init::Const(0.0),
        }
    }
}

/// One parameter tensor of a model: wire name, shape, initialization and scope.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// Wire name, e.g. `fc1.weight` (a safetensors key; part of the protocol).
    pub name: String,
    /// Shape (PyTorch layout).
    pub shape: Vec<usize>,
    /// Initial values.
    pub init: ParamInit,
    /// Aggregated or kept on the client.
    pub scope: Scope,
}

impl ParamSpec {
    /// A shared parameter.
    pub fn shared(name: impl Into<String>, shape: &[usize], init: ParamInit) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            init,
            scope: Scope::Shared,
        }
    }

    /// A local parameter (never leaves the client).
    pub fn local(name: impl Into<String>, shape: &[usize], init: ParamInit) -> Self {
        Self {
            scope: Scope::Local,
            ..Self::shared(name, shape, init)
        }
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor from `vb`, created with this spec's initialization when `vb` creates
    /// variables.
    ///
    /// # Errors
    /// candle's, when `vb` holds a tensor of another shape or none.
    pub fn get(&self, vb: &VarBuilder) -> candle_core::Result<Tensor> {
        vb.get_with_hints(self.shape.as_slice(), &self.name, self.init.to_candle())
    }
}

/// A built model: the forward pass and any penalty the loss adds.
pub trait Network: Send + Sync {
    /// Logits `[n, classes]` for a classification target, predictions `[n]` for a real one.
    /// The inputs are `f32 [n, sample_shape…]` for dense data and `u32 [n, sample_shape…]` for
    /// tokens and ids.
    fn forward(&self, inputs: &Tensor) -> candle_core::Result<Tensor>;

    /// A term added to the batch's mean loss (a regularizer over the rows the batch used);
    /// `None` for none.
    fn penalty(&self, inputs: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _ = inputs;
        Ok(None)
    }
}

/// Opaque: which native engine trains a built-in model. Only this crate constructs one.
#[derive(Clone, Debug, PartialEq)]
pub struct NativePlan(pub(crate) super::native::Plan);

/// A model, defined once and registered by name.
pub trait ModelDef: Send + Sync + fmt::Debug {
    /// The name `model_args.model` gives (lower case).
    fn name(&self) -> &str;

    /// One line on what the model is, for listings and errors.
    fn describe(&self) -> String;

    /// The parameters for data of `data`'s shape, in forward order.
    ///
    /// # Errors
    /// [`Error::Unsupported`] (or [`Error::SampleShape`]) when the model cannot take such
    /// data, saying what it takes.
    fn params(&self, data: &DataSpec) -> Result<Vec<ParamSpec>>;

    /// Builds the network, taking every tensor of [`ModelDef::params`] from `vb` by name.
    ///
    /// # Errors
    /// As [`ModelDef::params`]; candle's when `vb` lacks a tensor.
    fn build(&self, data: &DataSpec, vb: VarBuilder) -> Result<Box<dyn Network>>;

    /// The native CPU engine for this model on this data, if there is one. Definitions outside
    /// this crate keep the default.
    fn native_plan(&self, data: &DataSpec) -> Option<NativePlan> {
        let _ = data;
        None
    }

    /// Recommended local-training settings `(learning rate, batch size)` for this model, shown
    /// in `fedmq train`'s hints; `None` when there is no recommendation.
    fn recommended(&self) -> Option<(f64, usize)> {
        None
    }
}

/// A shared handle on a definition.
pub type ModelRef = Arc<dyn ModelDef>;

impl From<super::ModelKind> for ModelRef {
    fn from(kind: super::ModelKind) -> Self {
        Arc::new(kind)
    }
}

/// Models by name: the built-in ones and any an application adds.
#[derive(Clone, Debug)]
pub struct Registry {
    models: BTreeMap<String, ModelRef>,
}

impl Default for Registry {
    /// The built-in models.
    fn default() -> Self {
        let mut r = Self {
            models: BTreeMap::new(),
        };
        for kind in super::ModelKind::ALL {
            r.insert(Arc::new(kind));
        }
        r.insert(Arc::new(super::rnn::CharLstm::default()));
        r.insert(Arc::new(super::mf::MatrixFactorization::default()));
        r
    }
}

impl Registry {
    /// Adds `def` under its name.
    ///
    /// # Errors
    /// [`Error::DuplicateModel`] when the name is taken (built-in names included).
    pub fn register(&mut self, def: ModelRef) -> Result<()> {
        let name = def.name().to_ascii_lowercase();
        if self.models.contains_key(&name) {
            return Err(Error::DuplicateModel { name });
        }
        self.models.insert(name, def);
        Ok(())
    }

    fn insert(&mut self, def: ModelRef) {
        self.models.insert(def.name().to_ascii_lowercase(), def);
    }

    /// The model named `name` (case-insensitive; FedML's `rnn` and the aliases `lstm`,
    /// `char_lstm` for the next-character LSTM).
    ///
    /// # Errors
    /// [`Error::UnknownModel`] listing the valid names.
    pub fn get(&self, name: &str) -> Result<ModelRef> {
        let lower = name.trim().to_ascii_lowercase();
        let key = match lower.as_str() {
            "lstm" | "char_lstm" | "rnn_originalfedavg" => "rnn",
            "matrix_factorization" => "mf",
            other => other,
        };
        self.models
            .get(key)
            .cloned()
            .ok_or_else(|| Error::UnknownModel {
                name: name.to_string(),
                valid: self.names().join(", "),
            })
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }
}

/// The classes of a classification target, or [`Error::Unsupported`] naming `model`.
pub(crate) fn classes_of(model: &str, data: &DataSpec) -> Result<usize> {
    match data.target {
        Target::Classes { classes: 0 } => Err(Error::NoClasses),
        Target::Classes { classes } => Ok(classes),
        Target::Real { .. } => Err(Error::Unsupported {
            model: model.to_string(),
            data: format!("{} with real-valued targets", data.input.describe()),
            takes: "class labels".to_string(),
        }),
    }
}
