//! `mf`: matrix factorization for rating prediction, with the user factors local to each client.
//!
//! The predicted rating of user `u` for item `i` is `⟨p_u, q_i⟩ + b_u + b_i + g + m`, where
//! `p_u`, `q_i` are `K`-dimensional factors, `b_u`, `b_i` biases, `g` a learned global bias and
//! `m` the middle of the rating range (a constant that centres the start). The loss of a batch
//! is the mean squared error plus `λ·mean(‖p_u‖² + ‖q_i‖² + b_u² + b_i²)` over the batch's
//! (user, item) pairs, the regularization of Koren et al.'s biased MF (Surprise's SVD).
//!
//! # Federated: user factors are local
//! `user_embedding.weight` and `user_bias.weight` are [`Scope::Local`]: a client trains its own
//! rows and keeps them on its disk; the server never sees them (a test scans every blob of a
//! run's store). Item factors and biases and the global bias are shared and aggregated. A
//! client holds the whole user table (`U·(K+1)` values, 124 kB for MovieLens-100k with `K = 32`)
//! so that one definition serves both central and federated training; only its own rows change.
//!
//! # Parameter names (wire contract)
//! `user_embedding.weight [U, K]` (local), `user_bias.weight [U, 1]` (local),
//! `item_embedding.weight [I, K]`, `item_bias.weight [I, 1]`, `global_bias [1]`; factors drawn
//! from `N(0, 0.1²)`, biases zero.
//!
//! [`Scope::Local`]: super::Scope::Local

use super::registry::{ModelDef, Network, ParamInit, ParamSpec};
use super::{Error, Result};
use crate::data::{DataSpec, Input, Target};
use candle_core::{IndexOp, Tensor, D};
use candle_nn::VarBuilder;

/// Matrix factorization's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatrixFactorization {
    /// Factor dimension `K`.
    pub dim: usize,
    /// Regularization `λ`.
    pub lambda: f64,
}

impl Default for MatrixFactorization {
    /// `K = 32`, `λ = 0.05`.
    fn default() -> Self {
        Self {
            dim: 32,
            lambda: 0.05,
        }
    }
}

/// MF's dimensions for one data set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MfDims {
    pub users: usize,
    pub items: usize,
    pub dim: usize,
    pub lambda: f64,
    /// The middle of the rating range.
    pub offset: f32,
}

impl MatrixFactorization {
    pub(crate) fn dims(&self, data: &DataSpec) -> Result<MfDims> {
        let takes = "(user, item) id pairs with real-valued ratings (e.g. data_args.dataset: \
                     movielens_100k)";
        let unsupported = |what: String| Error::Unsupported {
            model: "mf".into(),
            data: what,
            takes: takes.into(),
        };
        let (users, items) = match &data.input {
            Input::Ids { cardinalities } if cardinalities.len() == 2 => {
                (cardinalities[0], cardinalities[1])
            }
            other => return Err(unsupported(other.describe())),
        };
        let offset = match data.target {
            Target::Real { min, max } => (min + max) / 2.0,
            Target::Classes { .. } => {
                return Err(unsupported(format!(
                    "{} with class labels",
                    data.input.describe()
                )))
            }
        };
        if users == 0 || items == 0 || self.dim == 0 || data.sample_shape != [2] {
            return Err(Error::SampleShape {
                model: "mf".into(),
                shape: data.sample_shape.clone(),
                reason: "samples must be one (user, item) pair, with users, items and the \
                         factor dimension non-zero"
                    .into(),
            });
        }
        Ok(MfDims {
            users,
            items,
            dim: self.dim,
            lambda: self.lambda,
            offset,
        })
    }
}

impl MfDims {
    pub(crate) fn param_specs(&self) -> Vec<ParamSpec> {
        let factors = ParamInit::Normal { std: 0.1 };
        vec![
            ParamSpec::local("user_embedding.weight", &[self.users, self.dim], factors),
            ParamSpec::local("user_bias.weight", &[self.users, 1], ParamInit::Zeros),
            ParamSpec::shared("item_embedding.weight", &[self.items, self.dim], factors),
            ParamSpec::shared("item_bias.weight", &[self.items, 1], ParamInit::Zeros),
            ParamSpec::shared("global_bias", &[1], ParamInit::Zeros),
        ]
    }
}

impl ModelDef for MatrixFactorization {
    fn name(&self) -> &str {
        "mf"
    }

    fn describe(&self) -> String {
        format!(
            "biased matrix factorization (K = {}, λ = {}) on (user, item) ratings, user factors local",
            self.dim, self.lambda
        )
    }

    fn params(&self, data: &DataSpec) -> Result<Vec<ParamSpec>> {
        Ok(self.dims(data)?.param_specs())
    }

    fn build(&self, data: &DataSpec, vb: VarBuilder) -> Result<Box<dyn Network>> {
        let dims = self.dims(data)?;
        let t = dims
            .param_specs()
            .iter()
            .map(|s| s.get(&vb))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Box::new(MfNet {
            user: t[0].clone(),
            user_bias: t[1].flatten_all()?,
            item: t[2].clone(),
            item_bias: t[3].flatten_all()?,
            global: t[4].clone(),
            lambda: dims.lambda,
            offset: dims.offset as f64,
        }))
    }

    fn recommended(&self) -> Option<(f64, usize)> {
        Some((0.05, 32))
    }
}

struct MfNet {
    user: Tensor,
    user_bias: Tensor,
    item: Tensor,
    item_bias: Tensor,
    global: Tensor,
    lambda: f64,
    offset: f64,
}

impl MfNet {
    /// The batch's rows: user factors, item factors, user biases, item biases.
    fn rows(&self, ids: &Tensor) -> candle_core::Result<[Tensor; 4]> {
        let users = ids.i((.., 0))?.contiguous()?;
        let items = ids.i((.., 1))?.contiguous()?;
        Ok([
            self.user.index_select(&users, 0)?,
            self.item.index_select(&items, 0)?,
            self.user_bias.index_select(&users, 0)?,
            self.item_bias.index_select(&items, 0)?,
        ])
    }
}

impl Network for MfNet {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let [p, q, bu, bi] = self.rows(ids)?;
        let dot = (p * q)?.sum(D::Minus1)?;
        ((dot + bu)? + bi)?
            .broadcast_add(&self.global)?
            .affine(1.0, self.offset)
    }

    fn penalty(&self, ids: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if self.lambda == 0.0 {
            return Ok(None);
        }
        let [p, q, bu, bi] = self.rows(ids)?;
        let per_sample =
            (((p.sqr()?.sum(D::Minus1)? + q.sqr()?.sum(D::Minus1)?)? + bu.sqr()?)? + bi.sqr()?)?;
        Ok(Some(per_sample.mean_all()?.affine(self.lambda, 0.0)?))
    }
}
