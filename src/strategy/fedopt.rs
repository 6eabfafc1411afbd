//! Server optimizers on the averaged update (FedOpt, Reddi et al. 2021, "Adaptive Federated
//! Optimization"; FedAvgM, Hsu et al. 2019): the round's sample-weighted mean of the clients'
//! models is turned into a pseudo-gradient `Δ = mean − x`, and the server steps from the global
//! model `x` with its own optimizer:
//!
//! ```text
//! FedAvgM (sgd):  m ← β·m + Δ                          x ← x + η·m       (β = 0, η = 1: FedAvg)
//! FedAdagrad:     m ← β1·m + (1−β1)·Δ   v ← v + Δ²                        x ← x + η·m / (√v + τ)
//! FedAdam:        m ← β1·m + (1−β1)·Δ   v ← β2·v + (1−β2)·Δ²              x ← x + η·m / (√v + τ)
//! FedYogi:        m ← β1·m + (1−β1)·Δ   v ← v − (1−β2)·Δ²·sign(v − Δ²)    x ← x + η·m / (√v + τ)
//! ```
//!
//! Moments start at `m = 0` and `v = τ²` (the paper's `v₋₁ ≥ τ²`), without bias correction, as
//! in the paper's Algorithm 2. The arithmetic is in f32, element by element; the moments are the
//! strategy's state, checkpointed (as a binary blob beside the checkpoint document) and restored
//! with the run.

use super::fedavg::StreamingMean;
use super::{Error, Result, RoundAggregate, RoundEnd, Strategy, StrategyState};
use crate::tensor::{NamedTensor, ParamSet};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Which server optimizer (FedML's `train_args.server_optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerOptimizer {
    /// SGD with momentum `server_momentum` (FedAvgM; FedAvg at momentum 0 and lr 1).
    Sgd,
    /// Adagrad.
    Adagrad,
    /// Adam.
    Adam,
    /// Yogi.
    Yogi,
}

impl ServerOptimizer {
    /// Every name [`ServerOptimizer::parse`] accepts.
    pub const NAMES: &'static [&'static str] = &["sgd", "adagrad", "adam", "yogi"];

    /// From FedML's name (case-insensitive).
    ///
    /// # Errors
    /// The valid names.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "sgd" => Ok(Self::Sgd),
            "adagrad" => Ok(Self::Adagrad),
            "adam" => Ok(Self::Adam),
            "yogi" => Ok(Self::Yogi),
            _ => Err(format!(
                "{name:?} is not a server optimizer; valid: {}",
                Self::NAMES.join(", ")
            )),
        }
    }

    /// The server learning rate used when the config sets none: 1 for SGD (so that momentum 0
    /// is FedAvg), 0.1 for Adagrad, 0.01 for Adam and Yogi (the ranges of Reddi et al.).
    pub fn default_lr(self) -> f64 {
        match self {
            Self::Sgd => 1.0,
            Self::Adagrad => 0.1,
            Self::Adam | Self::Yogi => 0.01,
        }
    }
}

/// Hyper-parameters of a [`FedOpt`] strategy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedOptConfig {
    /// The server optimizer.
    pub optimizer: ServerOptimizer,
    /// Server learning rate `η`.
    pub lr: f64,
    /// SGD's momentum `β` (FedAvgM); ignored by the adaptive optimizers.
    pub momentum: f64,
    /// `β1` of the adaptive optimizers.
    pub beta1: f64,
    /// `β2` of Adam and Yogi.
    pub beta2: f64,
    /// `τ`, the adaptivity (denominator offset; `v` starts at `τ²`).
    pub tau: f64,
}

impl FedOptConfig {
    /// `optimizer` with its default learning rate, momentum 0, β1 0.9, β2 0.99, τ 1e-3.
    pub fn new(optimizer: ServerOptimizer) -> Self {
        Self {
            optimizer,
            lr: optimizer.default_lr(),
            momentum: 0.0,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }

    /// Checks the ranges.
    ///
    /// # Errors
    /// What is out of range.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let in01 = |v: f64| (0.0..1.0).contains(&v);
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("server learning rate {} must be > 0", self.lr));
        }
        if !in01(self.momentum) || !in01(self.beta1) || !in01(self.beta2) {
            return Err(format!(
                "server momentum {}, beta1 {} and beta2 {} must be in [0, 1)",
                self.momentum, self.beta1, self.beta2
            ));
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return Err(format!("server tau {} must be > 0", self.tau));
        }
        Ok(())
    }
}

/// A server optimizer over the streaming mean of the round's models.
#[derive(Debug, Clone)]
pub struct FedOpt {
    cfg: FedOptConfig,
    name: &'static str,
    /// First moment (SGD: the momentum buffer); created at the first round. Shared with
    /// checkpoint snapshots, copied on write only while one is still being encoded.
    m: Option<Arc<ParamSet>>,
    /// Second moment (adaptive optimizers only).
    v: Option<Arc<ParamSet>>,
    /// Server steps taken.
    steps: u64,
    /// Row-sparse tensors ([`Strategy::set_row_sparse`]).
    sparse: Arc<std::collections::BTreeSet<String>>,
    /// Their step cap.
    step_cap: u32,
}

impl FedOpt {
    /// A FedOpt strategy named `name` in checkpoints and metrics (`FedAdam`, `FedAvgM`, ...).
    ///
    /// # Errors
    /// Out-of-range hyper-parameters ([`FedOptConfig::validate`]).
    pub fn new(name: &'static str, cfg: FedOptConfig) -> std::result::Result<Self, String> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            name,
            m: None,
            v: None,
            steps: 0,
            sparse: Arc::default(),
            step_cap: 1,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &FedOptConfig {
        &self.cfg
    }

    /// One server step from `global` with the round's mean model: the new global model and the
    /// norm of the pseudo-gradient and of the step.
    fn step(&mut self, global: &ParamSet, mean: &ParamSet) -> (ParamSet, f64, f64) {
        let c = self.cfg;
        let (lr, b1, b2, tau) = (c.lr as f32, c.beta1 as f32, c.beta2 as f32, c.tau as f32);
        let m = Arc::make_mut(self.m.get_or_insert_with(|| Arc::new(global.zeros_like())));
        let adaptive = c.optimizer != ServerOptimizer::Sgd;
        let v = adaptive.then(|| {
            Arc::make_mut(self.v.get_or_insert_with(|| {
                let mut v = global.zeros_like();
                for t in v.tensors_mut() {
                    t.data_mut().fill(tau * tau);
                }
                Arc::new(v)
            }))
        });
        let mut next = global.clone();
        let (mut delta_sq, mut step_sq) = (0f64, 0f64);
        let mut vs = v.map(|v| v.tensors_mut().collect::<Vec<_>>());
        for (i, ((x, mt), mean_t)) in next
            .tensors_mut()
            .zip(m.tensors_mut())
            .zip(mean.tensors())
            .enumerate()
        {
            let x = x.data_mut();
            let mt = mt.data_mut();
            let vt = vs.as_mut().map(|v| v[i].data_mut());
            // Per optimizer one loop without branches inside, in blocks whose squared norms
            // are summed in f32 and carried over in f64 (vectorizable, and exact enough for a
            // metric).
            const BLOCK: usize = 4096;
            let mean_t = mean_t.data();
            match (c.optimizer, vt) {
                (ServerOptimizer::Sgd, _) => {
                    let beta = c.momentum as f32;
                    for ((x, m), avg) in x
                        .chunks_mut(BLOCK)
                        .zip(mt.chunks_mut(BLOCK))
                        .zip(mean_t.chunks(BLOCK))
                    {
                        let (mut dq, mut sq) = (0f32, 0f32);
                        for ((x, m), &avg) in x.iter_mut().zip(m.iter_mut()).zip(avg) {
                            let d = avg - *x;
                            *m = beta * *m + d;
                            let s = lr * *m;
                            *x += s;
                            dq += d * d;
                            sq += s * s;
                        }
                        delta_sq += f64::from(dq);
                        step_sq += f64::from(sq);
                    }
                }
                (opt, Some(vt)) => {
                    for (((x, m), v), avg) in x
                        .chunks_mut(BLOCK)
                        .zip(mt.chunks_mut(BLOCK))
                        .zip(vt.chunks_mut(BLOCK))
                        .zip(mean_t.chunks(BLOCK))
                    {
                        let (dq, sq) = match opt {
                            ServerOptimizer::Adagrad => {
                                adaptive_block(x, m, v, avg, b1, lr, tau, |v, d2| v + d2)
                            }
                            ServerOptimizer::Adam => {
                                adaptive_block(x, m, v, avg, b1, lr, tau, |v, d2| {
                                    b2 * v + (1.0 - b2) * d2
                                })
                            }
                            // Yogi: v − (1−β2)·Δ²·sign(v − Δ²), with sign(0) = 0.
                            _ => adaptive_block(x, m, v, avg, b1, lr, tau, |v, d2| {
                                let diff = v - d2;
                                let sign = f32::from(u8::from(diff > 0.0))
                                    - f32::from(u8::from(diff < 0.0));
                                v - (1.0 - b2) * d2 * sign
                            }),
                        };
                        delta_sq += f64::from(dq);
                        step_sq += f64::from(sq);
                    }
                }
                (_, None) => unreachable!("adaptive optimizers have a second moment"),
            }
        }
        self.steps += 1;
        (next, delta_sq.sqrt(), step_sq.sqrt())
    }
}

/// One block of an adaptive step: `m ← β1·m + (1−β1)·Δ`, `v ← second(v, Δ²)`,
/// `x ← x + η·m / (√v + τ)`; returns the block's `‖Δ‖²` and `‖step‖²`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn adaptive_block(
    x: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    avg: &[f32],
    b1: f32,
    lr: f32,
    tau: f32,
    second: impl Fn(f32, f32) -> f32,
) -> (f32, f32) {
    let (mut dq, mut sq) = (0f32, 0f32);
    for (((x, m), v), &avg) in x.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(avg) {
        let d = avg - *x;
        let d2 = d * d;
        *m = b1 * *m + (1.0 - b1) * d;
        *v = second(*v, d2);
        let s = lr * *m / (v.sqrt() + tau);
        *x += s;
        dq += d2;
        sq += s * s;
    }
    (dq, sq)
}

impl Strategy for FedOpt {
    fn secure_aggregation(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        self.name
    }

    fn begin_round(&mut self, _round: u64, global: &ParamSet) -> Box<dyn RoundAggregate> {
        Box::new(StreamingMean::new(global).with_row_sparse(self.sparse.clone(), self.step_cap))
    }

    fn set_row_sparse(
        &mut self,
        tensors: std::collections::BTreeSet<String>,
        step_cap: u32,
    ) -> bool {
        self.sparse = Arc::new(tensors);
        self.step_cap = step_cap;
        true
    }

    fn end_round(
        &mut self,
        _round: u64,
        global: &ParamSet,
        aggregate: Option<ParamSet>,
    ) -> RoundEnd {
        let Some(mean) = aggregate else {
            return RoundEnd::default();
        };
        let (next, delta, step) = self.step(global, &mean);
        RoundEnd {
            global: Some(next),
            metrics: BTreeMap::from([
                ("pseudo_gradient_norm".to_string(), delta),
                ("server_step_norm".to_string(), step),
                ("server_steps".to_string(), self.steps as f64),
            ]),
        }
    }

    fn state(&self) -> StrategyState {
        let (m, v, steps) = (self.m.clone(), self.v.clone(), self.steps);
        let optimizer = format!("{:?}", self.cfg.optimizer).to_ascii_lowercase();
        StrategyState::lazy(move || {
            let json = serde_json::json!({
                "v": 2,
                "optimizer": optimizer,
                "steps": steps,
                "m": m.is_some(),
                "second_moment": v.is_some(),
            });
            let mut tensors = Vec::new();
            for (prefix, set) in [("m.", &m), ("second_moment.", &v)] {
                for t in set.iter().flat_map(|p| p.tensors()) {
                    let named = NamedTensor::new(
                        format!("{prefix}{}", t.name()),
                        t.shape().to_vec(),
                        t.data().to_vec(),
                    );
                    tensors.push(named.expect("a copy keeps its shape"));
                }
            }
            let tensors = (!tensors.is_empty())
                .then(|| ParamSet::new(tensors).expect("prefixed names stay unique"));
            (json, tensors)
        })
    }

    fn restore(&mut self, state: &serde_json::Value, tensors: Option<ParamSet>) -> Result<()> {
        let bad = |detail: String| Error::Restore {
            strategy: self.name.to_string(),
            detail,
        };
        if state.is_null() {
            return Err(bad("the checkpoint has no server-optimizer state".into()));
        }
        let want = format!("{:?}", self.cfg.optimizer).to_ascii_lowercase();
        if state["optimizer"].as_str() != Some(want.as_str()) {
            return Err(bad(format!(
                "the checkpoint's server optimizer is {}, the config's {want}",
                state["optimizer"]
            )));
        }
        let take = |prefix: &str| -> std::result::Result<Option<Arc<ParamSet>>, String> {
            if state[prefix.trim_end_matches('.')].as_bool() != Some(true) {
                return Ok(None);
            }
            let Some(all) = &tensors else {
                return Err(format!(
                    "the checkpoint names {prefix}* tensors but has none"
                ));
            };
            let part: Vec<NamedTensor> = all
                .tensors()
                .iter()
                .filter_map(|t| {
                    let name = t.name().strip_prefix(prefix)?;
                    NamedTensor::new(name, t.shape().to_vec(), t.data().to_vec()).ok()
                })
                .collect();
            ParamSet::new(part)
                .map(|p| Some(Arc::new(p)))
                .map_err(|e| format!("{prefix}*: {e}"))
        };
        self.m = take("m.").map_err(bad)?;
        self.v = take("second_moment.").map_err(bad)?;
        self.steps = state["steps"].as_u64().unwrap_or(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::NamedTensor;

    fn one(values: Vec<f32>) -> ParamSet {
        let n = values.len();
        ParamSet::new(vec![NamedTensor::new("w", vec![n], values).unwrap()]).unwrap()
    }

    fn run(opt: ServerOptimizer, cfg: impl Fn(&mut FedOptConfig)) -> Vec<Vec<f32>> {
        let mut c = FedOptConfig::new(opt);
        c.lr = 0.1;
        c.momentum = 0.9;
        cfg(&mut c);
        let mut s = FedOpt::new("test", c).unwrap();
        let mut x = one(vec![1.0, -2.0]);
        let mut out = Vec::new();
        // Two rounds; the mean model of round r is x + Δ_r.
        for delta in [[0.5f32, -0.25], [-0.1, 0.3]] {
            let mean = one(vec![
                x.tensors()[0].data()[0] + delta[0],
                x.tensors()[0].data()[1] + delta[1],
            ]);
            x = s.end_round(1, &x, Some(mean)).global.unwrap();
            out.push(x.tensors()[0].data().to_vec());
        }
        out
    }

    fn close(got: &[Vec<f32>], want: &[[f64; 2]]) {
        for (g, w) in got.iter().zip(want) {
            for i in 0..2 {
                assert!((f64::from(g[i]) - w[i]).abs() < 1e-5, "{got:?} vs {want:?}");
            }
        }
    }

    // Expected values by hand (float64), x₀ = [1, −2], Δ₁ = [0.5, −0.25], Δ₂ = [−0.1, 0.3],
    // η = 0.1, β = 0.9 (FedAvgM), β1 = 0.9, β2 = 0.99, τ = 1e-3, m₀ = 0, v₀ = τ²:
    //   FedAvgM:    m₁ = Δ₁;  x₁ = x₀ + 0.1·m₁ = [1.05, −2.025]
    //               m₂ = 0.9·m₁ + Δ₂ = [0.35, 0.075];  x₂ = [1.085, −2.0175]
    // The adaptive optimizers: the Python lines above their test.
    #[test]
    fn fedavgm_step_equals_the_hand_computed_update() {
        close(
            &run(ServerOptimizer::Sgd, |_| {}),
            &[[1.05, -2.025], [1.085, -2.0175]],
        );
    }

    #[test]
    fn sgd_without_momentum_at_lr_one_is_fedavg() {
        let got = run(ServerOptimizer::Sgd, |c| {
            c.lr = 1.0;
            c.momentum = 0.0;
        });
        close(&got, &[[1.5, -2.25], [1.4, -1.95]]);
    }

    // def adaptive(kind):
    //     x, m, v = [1.0, -2.0], [0.0, 0.0], [1e-6, 1e-6]
    //     for d in ([0.5, -0.25], [-0.1, 0.3]):
    //         m = [0.9*mi + 0.1*di for mi, di in zip(m, d)]
    //         if kind == "adagrad": v = [vi + di*di for vi, di in zip(v, d)]
    //         if kind == "adam":    v = [0.99*vi + 0.01*di*di for vi, di in zip(v, d)]
    //         if kind == "yogi":    v = [vi - 0.01*di*di*copysign(1, vi - di*di) ...]  (sign 0 at 0)
    //         x = [xi + 0.1*mi/(sqrt(vi) + 1e-3) for xi, mi, vi in zip(x, m, v)]
    #[test]
    fn adaptive_steps_equal_the_hand_computed_updates() {
        close(
            &run(ServerOptimizer::Adam, |_| {}),
            &[
                [1.098_020_190_1, -2.096_080_706_0],
                [1.165_647_664_0, -2.077_323_069_6],
            ],
        );
        close(
            &run(ServerOptimizer::Yogi, |_| {}),
            &[
                [1.098_019_998_0, -2.096_079_968_0],
                [1.165_327_690_3, -2.077_359_943_5],
            ],
        );
        close(
            &run(ServerOptimizer::Adagrad, |_| {}),
            &[
                [1.009_980_020_0, -2.009_960_080_0],
                [1.016_830_636_4, -2.008_044_438_5],
            ],
        );
    }

    #[test]
    fn state_round_trips_through_a_checkpoint() {
        let mut a = FedOpt::new("FedAdam", FedOptConfig::new(ServerOptimizer::Adam)).unwrap();
        let x = one(vec![1.0, 2.0]);
        a.end_round(1, &x, Some(one(vec![1.5, 1.0])));
        let (state, tensors) = a.state().encode();
        assert!(tensors.is_some());
        let mut b = FedOpt::new("FedAdam", FedOptConfig::new(ServerOptimizer::Adam)).unwrap();
        b.restore(&state, tensors.clone()).unwrap();
        let next = one(vec![0.5, 0.5]);
        let ra = a.end_round(2, &x, Some(next.clone())).global.unwrap();
        let rb = b.end_round(2, &x, Some(next)).global.unwrap();
        assert_eq!(ra.tensors()[0].data(), rb.tensors()[0].data());
        let mut yogi = FedOpt::new("FedYogi", FedOptConfig::new(ServerOptimizer::Yogi)).unwrap();
        assert!(
            yogi.restore(&state, tensors).is_err(),
            "another optimizer's state"
        );
        assert!(yogi.restore(&serde_json::Value::Null, None).is_err());
        assert!(
            b.restore(&state, None).is_err(),
            "moments named but missing"
        );
    }

    #[test]
    fn bad_hyper_parameters_are_refused() {
        let mut c = FedOptConfig::new(ServerOptimizer::Adam);
        c.beta2 = 1.0;
        assert!(FedOpt::new("FedAdam", c).is_err());
        assert_eq!(ServerOptimizer::parse("ADAM"), Ok(ServerOptimizer::Adam));
        assert!(ServerOptimizer::parse("lamb").unwrap_err().contains("yogi"));
    }
}
