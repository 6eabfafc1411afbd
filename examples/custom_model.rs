//! A model written outside the crate, against fedmq's public model layer: neural matrix
//! factorization for MovieLens-100k. A rating is predicted by a small network on the user's and
//! the item's embeddings, `mlp([p_u, q_i, p_u ⊙ q_i]) + m` (`m` the middle of the rating range),
//! in the spirit of He et al.'s neural collaborative filtering.
//!
//! The user table is declared local: each client trains its own user's row and keeps it on its
//! disk; it never leaves the client. The item table is shared and row-sparse (the server averages
//! each item's row over the clients that rated it); the network on top is shared and averaged.
//!
//! It runs a federation of one client per MovieLens user through the same path as `fedmq run`:
//! the embedded broker and store, signed messages, sealed blobs.
//!
//! ```text
//! cargo run --release --example custom_model -- [rounds]
//! ```
//!
//! How to add a model: implement [`ModelDef`] (its name, its parameters as [`ParamSpec`]s with
//! their names, shapes, initialization and scope, and `build`, which returns a [`Network`] from
//! those parameters), refuse data it cannot take with [`Error::Unsupported`], register it in a
//! [`Registry`] and pass the registry in [`LocalOptions::models`]. The parameter names are the
//! wire format: every participant must define the model identically.

use anyhow::{Context, Result};
use candle_core::{IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use fedmq::config::Config;
use fedmq::data::{DataSpec, Input, Target};
use fedmq::federation::{run_local, LocalOptions};
use fedmq::train::{Error, ModelDef, Network, ParamInit, ParamSpec, Registry};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Neural matrix factorization: embeddings of dimension `dim`, one hidden layer of `hidden`.
#[derive(Debug)]
struct NeuralMf {
    dim: usize,
    hidden: usize,
}

impl NeuralMf {
    /// Users, items and the middle of the rating range, or why the data is not ratings.
    fn shape(&self, data: &DataSpec) -> fedmq::train::Result<(usize, usize, f32)> {
        let unsupported = |what: String| Error::Unsupported {
            model: self.name().into(),
            data: what,
            takes: "(user, item) id pairs with real-valued ratings".into(),
        };
        let (users, items) = match &data.input {
            Input::Ids { cardinalities } if cardinalities.len() == 2 => {
                (cardinalities[0], cardinalities[1])
            }
            other => return Err(unsupported(other.describe())),
        };
        match data.target {
            Target::Real { min, max } => Ok((users, items, (min + max) / 2.0)),
            Target::Classes { .. } => Err(unsupported("class labels".into())),
        }
    }
}

impl ModelDef for NeuralMf {
    fn name(&self) -> &str {
        "neural_mf"
    }

    fn describe(&self) -> String {
        format!(
            "neural matrix factorization (K = {}, {} hidden units), user embeddings local",
            self.dim, self.hidden
        )
    }

    fn params(&self, data: &DataSpec) -> fedmq::train::Result<Vec<ParamSpec>> {
        let (users, items, _) = self.shape(data)?;
        let (k, h) = (self.dim, self.hidden);
        let factors = ParamInit::Normal { std: 0.1 };
        // PyTorch's nn.Linear initialization: U(±1/√fan_in).
        let linear = |fan_in: usize| ParamInit::Uniform {
            bound: 1.0 / (fan_in as f64).sqrt(),
        };
        Ok(vec![
            ParamSpec::local("user_embedding.weight", &[users, k], factors),
            ParamSpec::shared("item_embedding.weight", &[items, k], factors).row_sparse(),
            ParamSpec::shared("mlp.0.weight", &[h, 3 * k], linear(3 * k)),
            ParamSpec::shared("mlp.0.bias", &[h], linear(3 * k)),
            ParamSpec::shared("mlp.1.weight", &[1, h], linear(h)),
            ParamSpec::shared("mlp.1.bias", &[1], linear(h)),
        ])
    }

    fn build(&self, data: &DataSpec, vb: VarBuilder) -> fedmq::train::Result<Box<dyn Network>> {
        let (_, _, middle) = self.shape(data)?;
        let t = self
            .params(data)?
            .iter()
            .map(|s| s.get(&vb))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Box::new(NeuralMfNet {
            users: t[0].clone(),
            items: t[1].clone(),
            w0: t[2].clone(),
            b0: t[3].clone(),
            w1: t[4].clone(),
            b1: t[5].clone(),
            middle: f64::from(middle),
        }))
    }

    fn recommended(&self) -> Option<(f64, usize)> {
        Some((0.1, 32))
    }
}

struct NeuralMfNet {
    users: Tensor,
    items: Tensor,
    w0: Tensor,
    b0: Tensor,
    w1: Tensor,
    b1: Tensor,
    middle: f64,
}

impl Network for NeuralMfNet {
    /// `ids`: `u32 [n, 2]` (user, item); returns the predicted ratings `[n]`.
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let p = self.users.index_select(&ids.i((.., 0))?.contiguous()?, 0)?;
        let q = self.items.index_select(&ids.i((.., 1))?.contiguous()?, 0)?;
        let x = Tensor::cat(&[&p, &q, &(&p * &q)?], D::Minus1)?;
        let hidden = x.matmul(&self.w0.t()?)?.broadcast_add(&self.b0)?.relu()?;
        hidden
            .matmul(&self.w1.t()?)?
            .broadcast_add(&self.b1)?
            .squeeze(D::Minus1)?
            .affine(1.0, self.middle)
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let rounds: usize = match std::env::args().nth(1) {
        Some(s) => s.parse().with_context(|| format!("rounds: {s:?}"))?,
        None => 5,
    };
    let mut models = Registry::default();
    models.register(Arc::new(NeuralMf {
        dim: 16,
        hidden: 32,
    }))?;

    // The shipped MovieLens config (one client per user), with this model.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/movielens.yaml");
    let mut cfg = Config::load(path.as_ref())?;
    cfg.model_args.model = "neural_mf".into();
    cfg.train_args.comm_round = rounds;
    cfg.train_args.learning_rate = 0.1;
    cfg.validate_with(&models)?;

    let out = tempfile::tempdir()?;
    let opts = LocalOptions {
        fetch_progress: true,
        models,
        ..LocalOptions::new(out.path().to_path_buf())
    };
    let report = run_local(&cfg, &opts, |_| {}, CancellationToken::new()).await?;
    for r in &report.server.records {
        let rmse = r.strategy.get("client_test_rmse").copied();
        println!(
            "round {:>2}  train loss {:.4}  clients' test RMSE {}",
            r.round,
            r.train_loss.unwrap_or(f64::NAN),
            rmse.map_or("-".into(), |x| format!("{x:.4}"))
        );
    }
    println!("{:?}", report.server.outcome);
    Ok(())
}
