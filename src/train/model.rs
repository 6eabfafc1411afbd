//! The models, named as FedML's `model_args.model`: `lr`, `mlp` (the FedAvg paper's 2NN) and
//! `cnn` (the FedAvg paper's CNN).
//!
//! # Parameter names (wire contract)
//! Parameters travel between server and clients by name (safetensors keys), so these names are
//! part of the protocol. Weights follow PyTorch's layouts (`[out, in]` for linear layers,
//! `[out, in, kh, kw]` for convolutions), so a PyTorch `state_dict` with the same names loads
//! as is.
//!
//! | model | tensors |
//! |---|---|
//! | `lr`  | `linear.weight [classes, D]`, `linear.bias [classes]` |
//! | `mlp` | `fc1.weight [200, D]`, `fc1.bias`, `fc2.weight [200, 200]`, `fc2.bias`, `fc3.weight [classes, 200]`, `fc3.bias` |
//! | `cnn` | `conv1.weight [32, C, 5, 5]`, `conv1.bias`, `conv2.weight [64, 32, 5, 5]`, `conv2.bias`, `fc1.weight [512, 64·⌊H/4⌋·⌊W/4⌋]`, `fc1.bias`, `fc2.weight [classes, 512]`, `fc2.bias` |
//!
//! `D` is the product of the sample shape (784 for MNIST). The CNN flattens in channel-major
//! (NCHW) order like PyTorch. On MNIST the CNN has 1,663,370 parameters, as FedML's
//! `CNN_OriginalFedAvg`.
//!
//! # Initialization
//! PyTorch's defaults for `nn.Linear` and `nn.Conv2d`: every weight and bias is drawn from
//! `U(-1/√fan_in, 1/√fan_in)` (what `kaiming_uniform_(a=√5)` gives), `fan_in` being the inputs
//! of one output unit (`in` or `in·kh·kw`).
//!
//! [`init_params`] is deterministic, so every client of a federation can build the same initial
//! model from a shared seed. Design: candle's CPU random generator cannot be seeded, so fedmq
//! draws the values itself. Each tensor has its own ChaCha8 stream whose 32-byte key is
//! `SHA-256("fedmq/init/v1" ‖ seed as u64 little-endian ‖ tensor name)`. The `i`-th value is
//! `(2u − 1)·bound` with `u = (next_u32() >> 8) · 2⁻²⁴` (`rand_chacha`'s `next_u32`, the ChaCha
//! keystream read as little-endian words). The values do not depend on tensor order or on
//! any other tensor, and the scheme is versioned by the prefix.

use super::registry::{
    classes_of, ModelDef, ModelRef, NativePlan, Network, ParamInit, ParamSpec, Scope,
};
use super::{Error, Result};
use crate::data::{DataSpec, Input};
use crate::tensor::{NamedTensor, ParamSet};
use candle_core::{Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder, VarMap};
use rand::RngCore;
use rand_chacha::rand_core::SeedableRng;
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Which model to train, named as FedML's `model_args.model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// `lr`: multinomial logistic regression, flatten → linear to the classes.
    Lr,
    /// `mlp`: the FedAvg paper's 2NN, flatten → 200 ReLU → 200 ReLU → classes.
    Mlp,
    /// `cnn`: the FedAvg paper's CNN, two 5×5 convolutions (32, 64 channels) each followed by
    /// ReLU and 2×2 max-pooling, then 512 ReLU, then the classes.
    Cnn,
}

impl ModelKind {
    /// All kinds, in the order of [`ModelKind::NAMES`].
    pub const ALL: [ModelKind; 3] = [ModelKind::Lr, ModelKind::Mlp, ModelKind::Cnn];
    /// The accepted names.
    pub const NAMES: [&'static str; 3] = ["lr", "mlp", "cnn"];

    /// FedML's name of the model.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Lr => "lr",
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
        }
    }

    /// The parameter tensors of this model for samples of `sample_shape` and `num_classes`
    /// classes, in forward order.
    ///
    /// # Errors
    /// [`Error::SampleShape`] when the model cannot take samples of that shape (the CNN needs
    /// `[C, H, W]` or `[H, W]` with `H, W ≥ 4`), [`Error::NoClasses`] for zero classes.
    pub fn param_specs(self, sample_shape: &[usize], num_classes: usize) -> Result<Vec<ParamSpec>> {
        let arch = Arch::new(self, sample_shape, num_classes)?;
        Ok(arch.param_specs())
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelKind {
    type Err = Error;

    /// Parses FedML's `model_args.model` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        ModelKind::ALL
            .into_iter()
            .find(|k| k.name() == lower)
            .ok_or_else(|| Error::UnknownModel {
                name: s.to_string(),
                valid: ModelKind::NAMES.join(", "),
            })
    }
}

/// Hidden width of the 2NN.
pub(crate) const MLP_HIDDEN: usize = 200;
/// Channels of the CNN's convolutions.
pub(crate) const CNN_CHANNELS: [usize; 2] = [32, 64];
/// Width of the CNN's hidden fully connected layer.
pub(crate) const CNN_HIDDEN: usize = 512;
/// Kernel size of the CNN's convolutions.
pub(crate) const CNN_KERNEL: usize = 5;
/// Padding of the CNN's convolutions (keeps the spatial size).
pub(crate) const CNN_PADDING: usize = 2;

/// A model's architecture resolved for one sample shape and class count: layer sizes only,
/// shared by the candle [`Model`] and the native CPU engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Arch {
    /// Input width `d`, classes `c`.
    Lr { d: usize, c: usize },
    /// Input width `d`, hidden `h`, classes `c`.
    Mlp { d: usize, h: usize, c: usize },
    /// Input channels, height, width; classes.
    Cnn {
        ch: usize,
        h: usize,
        w: usize,
        c: usize,
    },
}

impl Arch {
    pub(crate) fn new(kind: ModelKind, sample_shape: &[usize], num_classes: usize) -> Result<Self> {
        let shape_err = |reason: &str| Error::SampleShape {
            model: kind.name().to_string(),
            shape: sample_shape.to_vec(),
            reason: reason.to_string(),
        };
        if num_classes == 0 {
            return Err(Error::NoClasses);
        }
        let d: usize = sample_shape.iter().product();
        if sample_shape.is_empty() || d == 0 {
            return Err(shape_err("samples have no features"));
        }
        Ok(match kind {
            ModelKind::Lr => Arch::Lr { d, c: num_classes },
            ModelKind::Mlp => Arch::Mlp {
                d,
                h: MLP_HIDDEN,
                c: num_classes,
            },
            ModelKind::Cnn => {
                let (ch, h, w) = match *sample_shape {
                    [ch, h, w] => (ch, h, w),
                    [h, w] => (1, h, w),
                    _ => return Err(shape_err("the CNN needs [channels, height, width]")),
                };
                if h < 4 || w < 4 {
                    return Err(shape_err(
                        "the CNN pools twice by 2: height and width must be ≥ 4",
                    ));
                }
                Arch::Cnn {
                    ch,
                    h,
                    w,
                    c: num_classes,
                }
            }
        })
    }

    pub(crate) fn num_classes(&self) -> usize {
        match *self {
            Arch::Lr { c, .. } | Arch::Mlp { c, .. } | Arch::Cnn { c, .. } => c,
        }
    }

    /// Width of the CNN's flattened features (`64·⌊H/4⌋·⌊W/4⌋`).
    pub(crate) fn cnn_flat(h: usize, w: usize) -> usize {
        CNN_CHANNELS[1] * (h / 2 / 2) * (w / 2 / 2)
    }

    pub(crate) fn param_specs(&self) -> Vec<ParamSpec> {
        fn lin(out: &mut Vec<ParamSpec>, name: &str, i: usize, o: usize) {
            out.push(ParamSpec {
                name: format!("{name}.weight"),
                shape: vec![o, i],
                init: ParamInit::fan_in(i),
                scope: Scope::Shared,
                row_sparse: false,
            });
            out.push(ParamSpec {
                name: format!("{name}.bias"),
                shape: vec![o],
                init: ParamInit::fan_in(i),
                scope: Scope::Shared,
                row_sparse: false,
            });
        }
        fn conv(out: &mut Vec<ParamSpec>, name: &str, i: usize, o: usize) {
            let k = CNN_KERNEL;
            out.push(ParamSpec {
                name: format!("{name}.weight"),
                shape: vec![o, i, k, k],
                init: ParamInit::fan_in(i * k * k),
                scope: Scope::Shared,
                row_sparse: false,
            });
            out.push(ParamSpec {
                name: format!("{name}.bias"),
                shape: vec![o],
                init: ParamInit::fan_in(i * k * k),
                scope: Scope::Shared,
                row_sparse: false,
            });
        }
        let mut out = Vec::new();
        match *self {
            Arch::Lr { d, c } => lin(&mut out, "linear", d, c),
            Arch::Mlp { d, h, c } => {
                lin(&mut out, "fc1", d, h);
                lin(&mut out, "fc2", h, h);
                lin(&mut out, "fc3", h, c);
            }
            Arch::Cnn { ch, h, w, c } => {
                conv(&mut out, "conv1", ch, CNN_CHANNELS[0]);
                conv(&mut out, "conv2", CNN_CHANNELS[0], CNN_CHANNELS[1]);
                lin(&mut out, "fc1", Arch::cnn_flat(h, w), CNN_HIDDEN);
                lin(&mut out, "fc2", CNN_HIDDEN, c);
            }
        }
        out
    }
}

impl ModelDef for ModelKind {
    fn name(&self) -> &str {
        ModelKind::name(*self)
    }

    fn describe(&self) -> String {
        match self {
            ModelKind::Lr => "multinomial logistic regression on dense features".into(),
            ModelKind::Mlp => "the FedAvg paper's 2NN (200-200 ReLU) on dense features".into(),
            ModelKind::Cnn => "the FedAvg paper's CNN (5×5 conv 32, 64, fc 512) on images".into(),
        }
    }

    fn params(&self, data: &DataSpec) -> Result<Vec<ParamSpec>> {
        Ok(image_arch(*self, data)?.param_specs())
    }

    fn build(&self, data: &DataSpec, vb: VarBuilder) -> Result<Box<dyn Network>> {
        Ok(Box::new(ImageNet::new(image_arch(*self, data)?, vb)?))
    }

    fn native_plan(&self, data: &DataSpec) -> Option<NativePlan> {
        image_arch(*self, data)
            .ok()
            .map(|a| NativePlan(super::native::Plan::Image(a)))
    }

    fn recommended(&self) -> Option<(f64, usize)> {
        Some(match self {
            ModelKind::Lr => (0.01, 64),
            ModelKind::Mlp => (0.02, 64),
            ModelKind::Cnn => (0.01, 32),
        })
    }
}

/// The image architecture of `kind` for `data`, or why it cannot take it.
fn image_arch(kind: ModelKind, data: &DataSpec) -> Result<Arch> {
    let classes = classes_of(kind.name(), data)?;
    if data.input != Input::Dense {
        return Err(Error::Unsupported {
            model: kind.name().to_string(),
            data: data.input.describe(),
            takes: "dense features (images)".to_string(),
        });
    }
    Arch::new(kind, &data.sample_shape, classes)
}

/// Seeded PyTorch-style initial parameters for `kind` on images of `sample_shape` in
/// `num_classes` classes (see the module docs for the exact scheme).
///
/// # Errors
/// As [`ModelKind::param_specs`].
pub fn init_params(
    kind: ModelKind,
    sample_shape: &[usize],
    num_classes: usize,
    seed: u64,
) -> Result<ParamSet> {
    init_model(&kind, &DataSpec::image(sample_shape, num_classes), seed)
}

/// Seeded initial parameters of every tensor of `def` on `data`, shared and local (see the
/// module docs for the generator).
///
/// # Errors
/// As [`ModelDef::params`].
pub fn init_model(def: &dyn ModelDef, data: &DataSpec, seed: u64) -> Result<ParamSet> {
    let tensors = def
        .params(data)?
        .into_iter()
        .map(|spec| {
            let mut h = Sha256::new();
            h.update(b"fedmq/init/v1");
            h.update(seed.to_le_bytes());
            h.update(spec.name.as_bytes());
            let mut rng = rand_chacha::ChaCha8Rng::from_seed(h.finalize().into());
            let mut unit = move || (rng.next_u32() >> 8) as f64 * (1.0 / (1u32 << 24) as f64);
            let n = spec.numel();
            let data = match spec.init {
                ParamInit::Uniform { bound } => (0..n)
                    .map(|_| ((2.0 * unit() - 1.0) * bound) as f32)
                    .collect(),
                // Box–Muller, one value per pair of draws; `1 − u` keeps the logarithm finite.
                ParamInit::Normal { std } => (0..n)
                    .map(|_| {
                        let (u1, u2) = (1.0 - unit(), unit());
                        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                        (z * std) as f32
                    })
                    .collect(),
                ParamInit::Zeros => vec![0.0; n],
            };
            NamedTensor::new(spec.name, spec.shape, data)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(ParamSet::new(tensors)?)
}

/// A built model: its definition, the data it was built for, and the candle network reading
/// the variables of a `VarMap`.
///
/// Implements [`candle_nn::Module`]: `forward` maps a batch `[N, ...sample_shape]` to logits
/// `[N, classes]` (classification) or predictions `[N]` (a real target).
#[derive(Clone)]
pub struct Model {
    def: ModelRef,
    data: DataSpec,
    specs: Vec<ParamSpec>,
    tensors: Vec<Tensor>,
    net: Arc<dyn Network>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("def", &self.def.name())
            .field("data", &self.data)
            .field("params", &self.specs.len())
            .finish()
    }
}

impl Model {
    /// Builds `def` for `data`, reading (or, from a `VarBuilder` over an empty `VarMap`,
    /// creating) its parameters through `vb`.
    ///
    /// # Errors
    /// As [`ModelDef::params`] and [`ModelDef::build`].
    pub fn build(def: ModelRef, data: &DataSpec, vb: VarBuilder) -> Result<Self> {
        let specs = def.params(data)?;
        let tensors = specs
            .iter()
            .map(|s| s.get(&vb))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let net = Arc::from(def.build(data, vb)?);
        Ok(Self {
            def,
            data: data.clone(),
            specs,
            tensors,
            net,
        })
    }

    /// `def` on `data` with the seeded initial parameters of [`init_model`] (all of them,
    /// local ones included), and the `VarMap` holding them.
    ///
    /// # Errors
    /// As [`Model::build`].
    pub fn init(
        def: &ModelRef,
        data: &DataSpec,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, VarMap)> {
        let params = init_model(def.as_ref(), data, seed)?;
        Self::load(def, data, &params, device)
    }

    /// `def` on `data` with the parameters `params`, which must be exactly the model's (names
    /// and shapes, shared and local).
    ///
    /// # Errors
    /// [`Error::Tensor`] naming missing, unexpected or misshapen tensors; as [`Model::build`].
    pub fn load(
        def: &ModelRef,
        data: &DataSpec,
        params: &ParamSet,
        device: &Device,
    ) -> Result<(Self, VarMap)> {
        let expected = ParamSet::new(
            def.params(data)?
                .into_iter()
                .map(|s| NamedTensor::zeros(s.name, s.shape))
                .collect(),
        )?;
        expected.check_same_layout(params)?;
        let varmap = params.to_varmap(device)?;
        let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, device);
        let model = Self::build(def.clone(), data, vb)?;
        Ok((model, varmap))
    }

    /// A built-in image model of `kind` for `sample_shape` and `num_classes`, reading its
    /// parameters through `vb`.
    ///
    /// # Errors
    /// As [`ModelKind::param_specs`].
    pub fn new(
        kind: ModelKind,
        sample_shape: &[usize],
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::build(
            Arc::new(kind),
            &DataSpec::image(sample_shape, num_classes),
            vb,
        )
    }

    /// [`Model::init`] for a built-in image model.
    ///
    /// # Errors
    /// As [`Model::new`].
    pub fn init_seeded(
        kind: ModelKind,
        sample_shape: &[usize],
        num_classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, VarMap)> {
        Self::init(
            &(Arc::new(kind) as ModelRef),
            &DataSpec::image(sample_shape, num_classes),
            seed,
            device,
        )
    }

    /// [`Model::load`] for a built-in image model.
    ///
    /// # Errors
    /// As [`Model::load`].
    pub fn from_params(
        kind: ModelKind,
        sample_shape: &[usize],
        num_classes: usize,
        params: &ParamSet,
        device: &Device,
    ) -> Result<(Self, VarMap)> {
        Self::load(
            &(Arc::new(kind) as ModelRef),
            &DataSpec::image(sample_shape, num_classes),
            params,
            device,
        )
    }

    /// The definition.
    pub fn def(&self) -> &ModelRef {
        &self.def
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        self.def.name()
    }

    /// The data the model was built for.
    pub fn data(&self) -> &DataSpec {
        &self.data
    }

    /// Shape of one input sample.
    pub fn sample_shape(&self) -> &[usize] {
        &self.data.sample_shape
    }

    /// Number of classes (0 for a real-valued target).
    pub fn num_classes(&self) -> usize {
        self.data.classes().unwrap_or(0)
    }

    /// The parameter tensors, in forward order.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        self.specs.clone()
    }

    /// Total number of parameters (shared and local).
    pub fn num_params(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// The native engine's plan, where one exists.
    pub(crate) fn native_plan(&self) -> Option<NativePlan> {
        self.def.native_plan(&self.data)
    }

    /// The network (forward pass and penalty).
    pub(crate) fn network(&self) -> &dyn Network {
        self.net.as_ref()
    }

    /// The parameter tensors, in the order of [`Model::param_specs`].
    #[cfg(test)]
    pub(crate) fn tensors(&self) -> Vec<&Tensor> {
        self.tensors.iter().collect()
    }

    /// The current parameters (shared and local) as host tensors.
    ///
    /// # Errors
    /// [`Error::Candle`] when reading a device tensor fails.
    pub fn param_set(&self) -> Result<ParamSet> {
        let tensors = self
            .specs
            .iter()
            .zip(&self.tensors)
            .map(|(spec, t)| {
                let data = t.flatten_all()?.to_vec1::<f32>()?;
                Ok(NamedTensor::new(
                    spec.name.clone(),
                    spec.shape.clone(),
                    data,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ParamSet::new(tensors)?)
    }
}

impl Module for Model {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.net.forward(xs)
    }
}

/// The candle network of an image architecture.
struct ImageNet {
    arch: Arch,
    layers: Layers,
}

enum Layers {
    Lr {
        linear: Linear,
    },
    Mlp {
        fc1: Linear,
        fc2: Linear,
        fc3: Linear,
    },
    Cnn {
        conv1: Conv2d,
        conv2: Conv2d,
        fc1: Linear,
        fc2: Linear,
    },
}

impl ImageNet {
    fn new(arch: Arch, vb: VarBuilder) -> Result<Self> {
        let specs = arch.param_specs();
        let get = |i: usize| -> Result<Tensor> { Ok(specs[i].get(&vb)?) };
        let lin = |i: usize| -> Result<Linear> { Ok(Linear::new(get(i)?, Some(get(i + 1)?))) };
        let conv = |i: usize| -> Result<Conv2d> {
            let cfg = Conv2dConfig {
                padding: CNN_PADDING,
                ..Default::default()
            };
            Ok(Conv2d::new(get(i)?, Some(get(i + 1)?), cfg))
        };
        let layers = match arch {
            Arch::Lr { .. } => Layers::Lr { linear: lin(0)? },
            Arch::Mlp { .. } => Layers::Mlp {
                fc1: lin(0)?,
                fc2: lin(2)?,
                fc3: lin(4)?,
            },
            Arch::Cnn { .. } => Layers::Cnn {
                conv1: conv(0)?,
                conv2: conv(2)?,
                fc1: lin(4)?,
                fc2: lin(6)?,
            },
        };
        Ok(Self { arch, layers })
    }
}

impl Network for ImageNet {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let n = xs.dim(0)?;
        match &self.layers {
            Layers::Lr { linear } => xs.reshape((n, ()))?.apply(linear),
            Layers::Mlp { fc1, fc2, fc3 } => xs
                .reshape((n, ()))?
                .apply(fc1)?
                .relu()?
                .apply(fc2)?
                .relu()?
                .apply(fc3),
            Layers::Cnn {
                conv1,
                conv2,
                fc1,
                fc2,
            } => {
                let Arch::Cnn { ch, h, w, .. } = self.arch else {
                    unreachable!("CNN layers are only built for a CNN architecture")
                };
                let x = xs.reshape((n, ch, h, w))?.apply(conv1)?.relu()?;
                let x = max_pool_2x2(&x)?.apply(conv2)?.relu()?;
                max_pool_2x2(&x)?
                    .flatten_from(1)?
                    .apply(fc1)?
                    .relu()?
                    .apply(fc2)
            }
        }
    }
}

/// 2×2 max-pooling with stride 2 (odd sizes floored, as PyTorch), built from `max` reductions.
///
/// Design: candle 0.11's `max_pool2d` backward multiplies the gradient by the *fraction* of
/// maxima in each window (¼ for a unique maximum) instead of routing all of it to the maximum,
/// which scales the CNN's convolution gradients down by 4 and 16. The gradient of a `max`
/// reduction goes to the maximum unscaled, as PyTorch's does (ties, which ReLU zeros make
/// common, each get the full gradient, but ReLU then zeroes it, since their input was ≤ 0).
fn max_pool_2x2(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ph, pw) = (h / 2, w / 2);
    let x = if h % 2 != 0 || w % 2 != 0 {
        x.narrow(2, 0, 2 * ph)?.narrow(3, 0, 2 * pw)?.contiguous()?
    } else {
        x.contiguous()?
    };
    x.reshape((n, c, ph, 2, pw, 2))?.max(5)?.max(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fedml_names() {
        assert_eq!("lr".parse::<ModelKind>().unwrap(), ModelKind::Lr);
        assert_eq!("MLP".parse::<ModelKind>().unwrap(), ModelKind::Mlp);
        assert_eq!(" cnn ".parse::<ModelKind>().unwrap(), ModelKind::Cnn);
        let err = "resnet56".parse::<ModelKind>().unwrap_err().to_string();
        assert!(
            err.contains("resnet56") && err.contains("lr, mlp, cnn"),
            "{err}"
        );
    }

    #[test]
    fn mnist_parameter_counts() {
        let count = |k: ModelKind| -> usize {
            k.param_specs(&[1, 28, 28], 10)
                .unwrap()
                .iter()
                .map(|s| s.shape.iter().product::<usize>())
                .sum()
        };
        assert_eq!(count(ModelKind::Lr), 7_850);
        assert_eq!(
            count(ModelKind::Mlp),
            784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
        );
        // FedML's CNN_OriginalFedAvg.
        assert_eq!(count(ModelKind::Cnn), 1_663_370);
    }

    #[test]
    fn names_are_the_wire_contract() {
        let names = |k: ModelKind| -> Vec<String> {
            k.param_specs(&[1, 28, 28], 10)
                .unwrap()
                .into_iter()
                .map(|s| s.name)
                .collect()
        };
        assert_eq!(names(ModelKind::Lr), ["linear.weight", "linear.bias"]);
        assert_eq!(
            names(ModelKind::Mlp),
            [
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias",
                "fc3.weight",
                "fc3.bias"
            ]
        );
        assert_eq!(
            names(ModelKind::Cnn),
            [
                "conv1.weight",
                "conv1.bias",
                "conv2.weight",
                "conv2.bias",
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias"
            ]
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(matches!(
            ModelKind::Cnn.param_specs(&[784], 10),
            Err(Error::SampleShape { .. })
        ));
        assert!(matches!(
            ModelKind::Cnn.param_specs(&[1, 3, 3], 10),
            Err(Error::SampleShape { .. })
        ));
        assert!(matches!(
            ModelKind::Lr.param_specs(&[4], 0),
            Err(Error::NoClasses)
        ));
        assert_eq!(
            ModelKind::Cnn.param_specs(&[8, 8], 10).unwrap()[4].shape,
            [512, 256]
        );
    }

    #[test]
    fn init_is_deterministic_and_bounded() {
        let a = init_params(ModelKind::Mlp, &[1, 8, 8], 10, 7).unwrap();
        let b = init_params(ModelKind::Mlp, &[1, 8, 8], 10, 7).unwrap();
        let c = init_params(ModelKind::Mlp, &[1, 8, 8], 10, 8).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        let w = a.get("fc1.weight").unwrap().data();
        let bound = 1.0 / 64f32.sqrt();
        assert!(w.iter().all(|v| v.abs() <= bound));
        // Roughly uniform: mean near 0, variance near bound²/3.
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        let var = w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.1, "{var}");
        // Values of one tensor do not depend on the other tensors (here: another input size).
        let d = init_params(ModelKind::Mlp, &[1, 28, 28], 10, 7).unwrap();
        assert_eq!(d.get("fc2.weight"), a.get("fc2.weight"));
    }

    #[test]
    fn max_pool_gradient_goes_to_the_maximum() {
        let x = candle_core::Var::new(
            &[[[[1.0f32, 5.0, 2.0], [3.0, 4.0, 0.0], [9.0, 9.0, 9.0]]]],
            &Device::Cpu,
        )
        .unwrap();
        let y = max_pool_2x2(x.as_tensor()).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [5.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        assert_eq!(
            gx.to_vec1::<f32>().unwrap(),
            [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn from_params_checks_the_layout() {
        let params = init_params(ModelKind::Mlp, &[1, 8, 8], 10, 4).unwrap();
        let (model, _) =
            Model::from_params(ModelKind::Mlp, &[1, 8, 8], 10, &params, &Device::Cpu).unwrap();
        assert_eq!(model.param_set().unwrap(), params);
        let Err(err) = Model::from_params(ModelKind::Cnn, &[1, 8, 8], 10, &params, &Device::Cpu)
        else {
            panic!("an MLP's parameters loaded into a CNN");
        };
        let err = err.to_string();
        assert!(
            err.contains("conv1.weight") && err.contains("fc3.bias"),
            "{err}"
        );
    }

    #[test]
    fn seeded_model_forward_shapes() {
        for kind in ModelKind::ALL {
            let (model, varmap) =
                Model::init_seeded(kind, &[1, 8, 8], 10, 1, &Device::Cpu).unwrap();
            let x = Tensor::zeros((3, 1, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
            assert_eq!(model.forward(&x).unwrap().dims(), [3, 10]);
            let from_model = model.param_set().unwrap();
            assert_eq!(from_model, ParamSet::from_varmap(&varmap).unwrap());
            assert_eq!(from_model, init_params(kind, &[1, 8, 8], 10, 1).unwrap());
            assert_eq!(model.num_params(), from_model.num_params());
        }
    }
}
