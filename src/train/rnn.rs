//! `rnn`: the FedAvg paper's next-character model for Shakespeare (FedML's
//! `RNN_OriginalFedAvg`).
//!
//! A sequence of `T` character ids → an 8-dimensional embedding → a 2-layer LSTM with 256 units
//! (zero initial state) → the top layer's output at the last step → a linear layer to the
//! classes (the vocabulary): the logits of the next character.
//!
//! # Parameter names (wire contract)
//! PyTorch's `state_dict` names and layouts for FedML's model, so a PyTorch checkpoint loads as
//! is: `embeddings.weight [V, 8]`, for each layer `k ∈ {0, 1}`: `lstm.weight_ih_l{k} [1024, in]`,
//! `lstm.weight_hh_l{k} [1024, 256]`, `lstm.bias_ih_l{k} [1024]`, `lstm.bias_hh_l{k} [1024]`
//! (gates stacked in PyTorch's order input, forget, cell, output), `fc.weight [V, 256]`,
//! `fc.bias [V]`. With the 81-symbol vocabulary: 819,705 parameters.
//!
//! # Initialization
//! PyTorch's defaults: the embedding `N(0, 1)`, every LSTM tensor `U(-1/√H, 1/√H)`, the linear
//! layer `U(-1/√H, 1/√H)`.
//!
//! # Engines
//! On the CPU the native engine trains it (`native::lstm`, chosen by
//! [`ModelDef::native_plan`]); the candle network below runs elsewhere and with
//! `Engine::Candle`, and tests compare the two.

use super::registry::{classes_of, ModelDef, NativePlan, Network, ParamInit, ParamSpec};
use super::{Error, Result};
use crate::data::{DataSpec, Input};
use candle_core::Tensor;
use candle_nn::rnn::{LSTMConfig, LSTM, RNN};
use candle_nn::{Embedding, Linear, VarBuilder};

/// The next-character LSTM's sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CharLstm {
    /// Embedding width (8 in the FedAvg paper).
    pub embed: usize,
    /// LSTM units per layer (256).
    pub hidden: usize,
    /// LSTM layers (2).
    pub layers: usize,
}

impl Default for CharLstm {
    /// The FedAvg paper's sizes: 8, 256, 2 layers.
    fn default() -> Self {
        Self {
            embed: 8,
            hidden: 256,
            layers: 2,
        }
    }
}

/// The LSTM's dimensions for one data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LstmDims {
    pub vocab: usize,
    pub classes: usize,
    pub embed: usize,
    pub hidden: usize,
    pub layers: usize,
    pub seq_len: usize,
}

impl CharLstm {
    pub(crate) fn dims(&self, data: &DataSpec) -> Result<LstmDims> {
        let classes = classes_of("rnn", data)?;
        let vocab = match data.input {
            Input::Tokens { vocab } => vocab,
            ref other => {
                return Err(Error::Unsupported {
                    model: "rnn".into(),
                    data: other.describe(),
                    takes: "token sequences (e.g. data_args.dataset: shakespeare)".into(),
                })
            }
        };
        let seq_len = match data.sample_shape[..] {
            [t] if t > 0 => t,
            _ => {
                return Err(Error::SampleShape {
                    model: "rnn".into(),
                    shape: data.sample_shape.clone(),
                    reason: "the LSTM takes one sequence of token ids per sample".into(),
                })
            }
        };
        if vocab == 0 || self.embed == 0 || self.hidden == 0 || self.layers == 0 {
            return Err(Error::SampleShape {
                model: "rnn".into(),
                shape: data.sample_shape.clone(),
                reason: "empty vocabulary or zero-sized layer".into(),
            });
        }
        Ok(LstmDims {
            vocab,
            classes,
            embed: self.embed,
            hidden: self.hidden,
            layers: self.layers,
            seq_len,
        })
    }
}

impl LstmDims {
    pub(crate) fn param_specs(&self) -> Vec<ParamSpec> {
        let h = self.hidden;
        let lstm = ParamInit::fan_in(h);
        let mut out = vec![ParamSpec::shared(
            "embeddings.weight",
            &[self.vocab, self.embed],
            ParamInit::Normal { std: 1.0 },
        )];
        for k in 0..self.layers {
            let inp = if k == 0 { self.embed } else { h };
            out.push(ParamSpec::shared(
                format!("lstm.weight_ih_l{k}"),
                &[4 * h, inp],
                lstm,
            ));
            out.push(ParamSpec::shared(
                format!("lstm.weight_hh_l{k}"),
                &[4 * h, h],
                lstm,
            ));
            out.push(ParamSpec::shared(
                format!("lstm.bias_ih_l{k}"),
                &[4 * h],
                lstm,
            ));
            out.push(ParamSpec::shared(
                format!("lstm.bias_hh_l{k}"),
                &[4 * h],
                lstm,
            ));
        }
        out.push(ParamSpec::shared(
            "fc.weight",
            &[self.classes, h],
            ParamInit::fan_in(h),
        ));
        out.push(ParamSpec::shared(
            "fc.bias",
            &[self.classes],
            ParamInit::fan_in(h),
        ));
        out
    }
}

impl ModelDef for CharLstm {
    fn name(&self) -> &str {
        "rnn"
    }

    fn describe(&self) -> String {
        format!(
            "next-token LSTM ({}-dim embedding, {}×{} LSTM) on token sequences",
            self.embed, self.layers, self.hidden
        )
    }

    fn params(&self, data: &DataSpec) -> Result<Vec<ParamSpec>> {
        Ok(self.dims(data)?.param_specs())
    }

    fn build(&self, data: &DataSpec, vb: VarBuilder) -> Result<Box<dyn Network>> {
        let dims = self.dims(data)?;
        let specs = dims.param_specs();
        let embeddings = Embedding::new(specs[0].get(&vb)?, dims.embed);
        let layers = (0..dims.layers)
            .map(|k| {
                let inp = if k == 0 { dims.embed } else { dims.hidden };
                let cfg = LSTMConfig {
                    layer_idx: k,
                    ..LSTMConfig::default()
                };
                candle_nn::rnn::lstm(inp, dims.hidden, cfg, vb.pp("lstm"))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let n = specs.len();
        let fc = Linear::new(specs[n - 2].get(&vb)?, Some(specs[n - 1].get(&vb)?));
        Ok(Box::new(LstmNet {
            embeddings,
            layers,
            fc,
        }))
    }

    /// The native LSTM engine (`native::lstm`) for any data this model takes whose token ids
    /// are exact in `f32` (the engine reads them from `Dataset::gather_features`, which for
    /// token data writes the ids as `f32`).
    fn native_plan(&self, data: &DataSpec) -> Option<NativePlan> {
        let dims = self.dims(data).ok()?;
        (dims.vocab <= 1 << f32::MANTISSA_DIGITS)
            .then_some(NativePlan(super::native::Plan::Lstm(dims)))
    }

    fn recommended(&self) -> Option<(f64, usize)> {
        // The FedAvg paper's Shakespeare runs: SGD, batch 10, learning rate 1.47.
        Some((1.47, 10))
    }
}

/// The candle network.
struct LstmNet {
    embeddings: Embedding,
    layers: Vec<LSTM>,
    fc: Linear,
}

impl Network for LstmNet {
    fn forward(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = tokens.apply(&self.embeddings)?;
        let mut last = None;
        for (k, layer) in self.layers.iter().enumerate() {
            let states = layer.seq(&x)?;
            if k + 1 < self.layers.len() {
                x = layer.states_to_tensor(&states)?;
            } else {
                last = states.last().map(|s| s.h().clone());
            }
        }
        let Some(h) = last else {
            // Sequences of length 0 are refused when the model is built.
            candle_core::bail!("empty sequence")
        };
        h.apply(&self.fc)
    }
}
