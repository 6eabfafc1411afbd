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
//! run's store). Item factors and biases and the global bias are shared and aggregated; the item
//! tables are row-sparse (a client changes only the rows of items it rated, and the server
//! averages each row over the clients that changed it). A
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
            ParamSpec::shared("item_embedding.weight", &[self.items, self.dim], factors)
                .row_sparse(),
            ParamSpec::shared("item_bias.weight", &[self.items, 1], ParamInit::Zeros).row_sparse(),
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
        Some((0.15, 32))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{NamedTensor, ParamSet};
    use crate::train::registry::Scope;
    use crate::train::{Model, ModelRef};
    use candle_core::Device;
    use std::sync::Arc;

    fn spec(users: usize, items: usize) -> DataSpec {
        DataSpec {
            input: Input::Ids {
                cardinalities: vec![users, items],
            },
            sample_shape: vec![2],
            target: Target::Real { min: 1.0, max: 5.0 },
        }
    }

    /// Two users, three items, `K = 2`, with chosen values.
    fn small() -> (Model, candle_nn::VarMap) {
        let def: ModelRef = Arc::new(MatrixFactorization {
            dim: 2,
            lambda: 0.5,
        });
        let t = |name: &str, shape: &[usize], v: &[f32]| {
            NamedTensor::new(name, shape.to_vec(), v.to_vec()).unwrap()
        };
        let params = ParamSet::new(vec![
            t("user_embedding.weight", &[2, 2], &[1.0, 2.0, -1.0, 0.5]),
            t("user_bias.weight", &[2, 1], &[0.25, -0.5]),
            t(
                "item_embedding.weight",
                &[3, 2],
                &[0.5, 0.5, 1.0, -1.0, 2.0, 0.0],
            ),
            t("item_bias.weight", &[3, 1], &[0.1, 0.2, 0.3]),
            t("global_bias", &[1], &[-0.125]),
        ])
        .unwrap();
        Model::load(&def, &spec(2, 3), &params, &Device::Cpu).unwrap()
    }

    #[test]
    fn predicts_biased_dot_products_from_the_middle_of_the_range() {
        let (model, _) = small();
        let ids = Tensor::new(&[[0u32, 1], [1, 2]], &Device::Cpu).unwrap();
        let pred: Vec<f32> = model.network().forward(&ids).unwrap().to_vec1().unwrap();
        // ⟨p0, q1⟩ + b0 + b1 + g + 3 = (1 − 2) + 0.25 + 0.2 − 0.125 + 3
        // ⟨p1, q2⟩ + b1 + b2 + g + 3 = −2 − 0.5 + 0.3 − 0.125 + 3
        for (got, want) in pred.iter().zip([2.325, 0.675]) {
            assert!((got - want).abs() < 1e-6, "{pred:?}");
        }
        // λ · mean over the pairs of ‖p‖² + ‖q‖² + bu² + bi².
        let pen: f32 = model
            .network()
            .penalty(&ids)
            .unwrap()
            .unwrap()
            .to_scalar()
            .unwrap();
        let first = 5.0 + 2.0 + 0.0625 + 0.04;
        let second = 1.25 + 4.0 + 0.25 + 0.09;
        assert!((pen - 0.5 * (first + second) / 2.0).abs() < 1e-6, "{pen}");
    }

    #[test]
    fn user_tables_are_local_and_item_tables_row_sparse() {
        let specs = MatrixFactorization::default()
            .params(&spec(943, 1682))
            .unwrap();
        let summary: Vec<(&str, Vec<usize>, Scope, bool)> = specs
            .iter()
            .map(|s| (s.name.as_str(), s.shape.clone(), s.scope, s.row_sparse))
            .collect();
        assert_eq!(
            summary,
            [
                ("user_embedding.weight", vec![943, 32], Scope::Local, false),
                ("user_bias.weight", vec![943, 1], Scope::Local, false),
                ("item_embedding.weight", vec![1682, 32], Scope::Shared, true),
                ("item_bias.weight", vec![1682, 1], Scope::Shared, true),
                ("global_bias", vec![1], Scope::Shared, false),
            ]
        );
    }

    #[test]
    fn a_batch_changes_only_its_own_rows() {
        // What row-sparse aggregation relies on: the gradient of the loss, penalty included, is
        // zero on the rows of items (and users) not in the batch.
        let (model, _) = small();
        let ids = Tensor::new(&[[0u32, 1]], &Device::Cpu).unwrap();
        let target = Tensor::new(&[4.0f32], &Device::Cpu).unwrap();
        let net = model.network();
        let pred = net.forward(&ids).unwrap();
        let loss = (pred
            .sub(&target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            + net.penalty(&ids).unwrap().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let tensors = model.tensors();
        let rows =
            |i: usize| -> Vec<Vec<f32>> { grads.get(tensors[i]).unwrap().to_vec2().unwrap() };
        let items = rows(2);
        assert!(
            items[0].iter().chain(&items[2]).all(|&g| g == 0.0),
            "{items:?}"
        );
        assert!(items[1].iter().any(|&g| g != 0.0));
        let users = rows(0);
        assert!(users[1].iter().all(|&g| g == 0.0) && users[0].iter().any(|&g| g != 0.0));
    }
}
