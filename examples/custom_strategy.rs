//! A strategy written outside the crate, against fedmq's public API: the coordinate-wise trimmed
//! mean (Yin et al. 2018). In every coordinate the server drops the `trim` largest and `trim`
//! smallest client values and averages the rest, so up to `trim` clients cannot drag any
//! parameter arbitrarily far.
//!
//! It runs a small federation on real MNIST through the same path as `fedmq run`: the embedded
//! broker and store, one MQTT session and one S3 client per participant, signed messages and
//! sealed blobs.
//!
//! ```text
//! cargo run --release --example custom_strategy -- [rounds] [clients] [trim]
//! ```
//!
//! How to write a strategy: implement [`Strategy`] (a name and `begin_round`; the other methods
//! have defaults: uniform client selection, no instruction, the aggregate taken as the new
//! model) and [`RoundAggregate`] (`add` one update as it arrives, `finish` the round). A strategy
//! that can fold updates in one at a time keeps O(model) memory; this one needs every value of a
//! coordinate at once, so its aggregate keeps the updates.

use anyhow::{Context, Result};
use fedmq::config::Config;
use fedmq::federation::{run_local_with, LocalOptions};
use fedmq::strategy::{self, ClientFailure, Report, RoundAggregate, Strategy};
use fedmq::tensor::{NamedTensor, ParamSet, ParamsView};
use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;

/// The coordinate-wise trimmed mean.
struct TrimmedMean {
    /// Values dropped at each end of every coordinate.
    trim: usize,
}

impl Strategy for TrimmedMean {
    fn name(&self) -> &'static str {
        "TrimmedMean"
    }

    fn begin_round(&mut self, _round: u64, global: &ParamSet) -> Box<dyn RoundAggregate> {
        Box::new(Trimming {
            trim: self.trim,
            layout: global.zeros_like(),
            updates: Vec::new(),
        })
    }
}

/// One round: the updates received so far, each flattened in the global model's tensor order.
struct Trimming {
    trim: usize,
    layout: ParamSet,
    updates: Vec<Vec<f32>>,
}

impl RoundAggregate for Trimming {
    fn add(
        &mut self,
        client: &str,
        update: &ParamsView<'_>,
        num_samples: u64,
        _report: &Report,
    ) -> strategy::Result<()> {
        update
            .check_layout(&self.layout)
            .map_err(|e| strategy::Error::Layout {
                client: client.to_string(),
                detail: e.to_string(),
            })?;
        if num_samples == 0 {
            return Err(strategy::Error::ZeroWeight {
                client: client.to_string(),
            });
        }
        let mut flat = Vec::with_capacity(update.num_params());
        for t in update.tensors() {
            flat.extend(t.values());
        }
        if let Some(i) = flat.iter().position(|x| !x.is_finite()) {
            return Err(strategy::Error::NonFinite {
                client: client.to_string(),
                tensor: format!("value {i}"),
            });
        }
        self.updates.push(flat);
        Ok(())
    }

    fn count(&self) -> usize {
        self.updates.len()
    }

    fn metrics(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([("trimmed_each_end".into(), self.kept_range().0 as f64)])
    }

    fn finish(self: Box<Self>, _failures: &[ClientFailure]) -> Option<ParamSet> {
        if self.updates.is_empty() {
            return None;
        }
        let (lo, hi) = self.kept_range();
        let mut column = vec![0f32; self.updates.len()];
        let mut offset = 0;
        let mut tensors = Vec::with_capacity(self.layout.len());
        for t in self.layout.tensors() {
            let mut data = Vec::with_capacity(t.len());
            for i in offset..offset + t.len() {
                for (c, u) in column.iter_mut().zip(&self.updates) {
                    *c = u[i];
                }
                column.sort_unstable_by(f32::total_cmp);
                let kept = &column[lo..hi];
                data.push(kept.iter().sum::<f32>() / kept.len() as f32);
            }
            offset += t.len();
            tensors.push(NamedTensor::new(t.name(), t.shape().to_vec(), data).ok()?);
        }
        ParamSet::new(tensors).ok()
    }
}

impl Trimming {
    /// The sorted positions averaged: `trim` dropped at each end, at least one value kept.
    fn kept_range(&self) -> (usize, usize) {
        let n = self.updates.len();
        let t = self.trim.min(n.saturating_sub(1) / 2);
        (t, n - t)
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: usize| -> Result<usize> {
        args.get(i)
            .map(|s| s.parse().with_context(|| format!("argument {i}: {s:?}")))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    let (rounds, clients, trim) = (arg(1, 5)?, arg(2, 5)?, arg(3, 1)?);

    // The shipped local config, made small: logistic regression, a few clients and rounds.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/fedml_config.yaml");
    let mut cfg = Config::load(path.as_ref())?;
    cfg.model_args.model = "lr".into();
    cfg.train_args.comm_round = rounds;
    cfg.train_args.client_num_in_total = clients;
    cfg.train_args.client_num_per_round = clients;
    cfg.validate()?;

    let out = tempfile::tempdir()?;
    let opts = LocalOptions {
        fetch_progress: true,
        ..LocalOptions::new(out.path().to_path_buf())
    };
    let report = run_local_with(
        &cfg,
        &opts,
        Box::new(TrimmedMean { trim }),
        |_| {},
        CancellationToken::new(),
    )
    .await?;
    for r in &report.server.records {
        println!("{}", serde_json::to_string(r)?);
    }
    println!("{:?}", report.server.outcome);
    Ok(())
}
