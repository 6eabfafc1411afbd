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
    /// An embedding table whose rows a client changes only for the ids in its data: the server
    /// averages each row over the clients that changed it
    /// ([`crate::strategy::Strategy::set_row_sparse`]).
    pub row_sparse: bool,
}

impl ParamSpec {
    /// A shared parameter.
    pub fn shared(name: impl Into<String>, shape: &[usize], init: ParamInit) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            init,
            scope: Scope::Shared,
            row_sparse: false,
        }
    }

    /// Marks the parameter as a row-sparse embedding table.
    pub fn row_sparse(mut self) -> Self {
        self.row_sparse = true;
        self
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DatasetKind, Input};
    use crate::train::Model;
    use candle_core::Device;

    /// A model an application might add: one linear layer on dense inputs.
    #[derive(Debug)]
    struct Probe;

    impl ModelDef for Probe {
        fn name(&self) -> &str {
            "Probe"
        }
        fn describe(&self) -> String {
            "a probe".into()
        }
        fn params(&self, data: &DataSpec) -> Result<Vec<ParamSpec>> {
            let classes = classes_of("probe", data)?;
            let d = data.sample_shape.iter().product();
            Ok(vec![ParamSpec::shared(
                "w",
                &[classes, d],
                ParamInit::Uniform { bound: 0.1 },
            )])
        }
        fn build(&self, data: &DataSpec, vb: VarBuilder) -> Result<Box<dyn Network>> {
            struct Net(Tensor);
            impl Network for Net {
                fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
                    x.flatten_from(1)?.matmul(&self.0.t()?)
                }
            }
            let w = self.params(data)?[0].get(&vb)?;
            Ok(Box::new(Net(w)))
        }
    }

    #[test]
    fn builtins_and_aliases_resolve() {
        let r = Registry::default();
        assert_eq!(r.names(), ["cnn", "lr", "mf", "mlp", "rnn"]);
        for (alias, name) in [
            ("LSTM", "rnn"),
            ("char_lstm", "rnn"),
            ("RNN_OriginalFedAvg", "rnn"),
            ("matrix_factorization", "mf"),
            (" CNN ", "cnn"),
        ] {
            assert_eq!(r.get(alias).unwrap().name(), name);
        }
        let err = r.get("resnet56").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("resnet56") && msg.contains("cnn, lr, mf, mlp, rnn"),
            "{msg}"
        );
    }

    #[test]
    fn applications_add_models_but_not_over_builtins() {
        let mut r = Registry::default();
        r.register(Arc::new(Probe)).unwrap();
        assert_eq!(r.get("probe").unwrap().name(), "Probe");
        let err = r.register(Arc::new(Probe)).unwrap_err();
        assert!(matches!(err, Error::DuplicateModel { .. }), "{err}");
        let err = r
            .register(Arc::new(crate::train::ModelKind::Cnn))
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateModel { .. }), "{err}");
        // The added model trains through the generic model type.
        let data = DataSpec::image(&[1, 4, 4], 3);
        let def = r.get("probe").unwrap();
        let (model, _vars) = Model::init(&def, &data, 0, &Device::Cpu).unwrap();
        assert_eq!(model.num_params(), 48);
        let x = Tensor::zeros((2, 1, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.network().forward(&x).unwrap().dims(), [2, 3]);
    }

    #[test]
    fn models_refuse_data_they_do_not_take() {
        let r = Registry::default();
        let shakespeare = DatasetKind::Shakespeare.spec();
        let movielens = DatasetKind::Movielens100k.spec();
        let mnist = DatasetKind::Mnist.spec();
        for (model, data, says) in [
            ("cnn", &shakespeare, "token"),
            ("mlp", &movielens, "ids"),
            ("rnn", &mnist, "dense"),
            ("rnn", &movielens, "ids"),
            ("mf", &mnist, "dense"),
            ("mf", &shakespeare, "token"),
        ] {
            let err = r.get(model).unwrap().params(data).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, Error::Unsupported { .. }) && msg.contains(model),
                "{model} on {data:?}: {msg}"
            );
            assert!(msg.to_lowercase().contains(says), "{model}: {msg}");
        }
        // Each model takes its own data set.
        for (model, data) in [("cnn", &mnist), ("rnn", &shakespeare), ("mf", &movielens)] {
            assert!(r.get(model).unwrap().params(data).is_ok(), "{model}");
        }
        assert!(matches!(movielens.input, Input::Ids { .. }));
    }

    #[test]
    fn the_shakespeare_lstm_has_fedmls_names_and_size() {
        let rnn = Registry::default().get("rnn").unwrap();
        let specs = rnn.params(&DatasetKind::Shakespeare.spec()).unwrap();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "embeddings.weight",
                "lstm.weight_ih_l0",
                "lstm.weight_hh_l0",
                "lstm.bias_ih_l0",
                "lstm.bias_hh_l0",
                "lstm.weight_ih_l1",
                "lstm.weight_hh_l1",
                "lstm.bias_ih_l1",
                "lstm.bias_hh_l1",
                "fc.weight",
                "fc.bias",
            ]
        );
        // FedML's RNN_OriginalFedAvg on the 81-symbol vocabulary (PyTorch counts 820,185 with
        // the same layers: nn.Embedding(81, 8), nn.LSTM(8, 256, 2), nn.Linear(256, 81)).
        let n: usize = specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        assert_eq!(n, 820_185);
        assert!(specs
            .iter()
            .all(|s| s.scope == Scope::Shared && !s.row_sparse));
    }
}
