//! [`Defended`]: a strategy whose round aggregate is replaced by a robust one (`defense_args`).
//!
//! The wrapped strategy still chooses the clients, instructs them and takes the round's
//! aggregate as its model (a FedOpt server optimizer steps towards it), so a defense composes
//! with FedAvg, FedProx and the FedOpt family: every strategy whose aggregate is the mean of the
//! clients' models ([`Strategy::secure_aggregation`] says which).
//!
//! Memory: the buffered defenses hold each update of the round once, as its flattened change
//! from the global model (`n · P` f32 for `n` updates of `P` parameters), plus `O(P)` scratch;
//! Krum adds its `n × n` distance matrix, FoolsGold one `P`-vector per client it has seen,
//! centered clipping the previous aggregate. Norm clipping and weak DP stream: `O(P)` whatever
//! `n`.

use super::robust::{self, FoolsGold, Outcome, Update};
use super::{
    ClientFailure, ClientTrain, Error, Report, Result, RoundAggregate, RoundEnd, Strategy,
    StrategyState,
};
use crate::proto::StrategyInstruction;
use crate::tensor::{ParamSet, ParamsView};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Trains a copy of the global model on the server's root data set (FLTrust's `g₀`).
pub type RootTrainer = dyn Fn(&ParamSet) -> std::result::Result<ParamSet, String> + Send + Sync;

/// The defenses `defense_args.defense_type` names.
pub const DEFENSES: &[&str] = &[
    "median",
    "trimmed_mean",
    "krum",
    "multikrum",
    "geo_median",
    "norm_diff_clipping",
    "cclip",
    "foolsgold",
    "fltrust",
    "barfed",
    "weak_dp",
];

/// A robust aggregation rule and its parameters.
#[derive(Clone)]
pub enum Defense {
    /// Coordinate-wise median (Yin et al. 2018).
    Median,
    /// Coordinate-wise trimmed mean, `b` trimmed at each end.
    TrimmedMean {
        /// Trimmed at each end; `None`: from `beta`, or `f`.
        b: Option<usize>,
        /// FedML's fraction trimmed at each end.
        beta: Option<f64>,
        /// The Byzantine clients tolerated (the default `b`).
        f: usize,
    },
    /// Krum (`m = 1`) and Multi-Krum (Blanchard et al. 2017).
    Krum {
        /// Byzantine clients tolerated.
        f: usize,
        /// Updates averaged; `None`: `n − f`.
        m: Option<usize>,
    },
    /// Geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2022).
    GeoMedian {
        /// Iterations at most.
        max_iter: usize,
    },
    /// Norm-difference clipping (Sun et al. 2019), then the weighted mean.
    NormClip {
        /// The L2 bound of an update.
        bound: f64,
    },
    /// Centered clipping around the previous aggregate (Karimireddy et al. 2021).
    CenteredClip {
        /// The clipping radius.
        tau: f64,
        /// Iterations.
        iters: usize,
    },
    /// FoolsGold (Fung et al. 2020): sybils that push the same direction lose their weight.
    FoolsGold,
    /// FLTrust (Cao et al. 2021): trust by cosine to the server's own update on root data.
    FlTrust(Arc<RootTrainer>),
    /// BARFED-style per-layer outlier exclusion (Isik-Polat et al. 2022).
    Barfed {
        /// The fence factor of `Q3 + k·IQR`.
        k: f64,
    },
    /// Weak DP against backdoors: norm clipping, then Gaussian noise on the aggregate.
    WeakDp {
        /// The L2 bound of an update.
        bound: f64,
        /// The noise's standard deviation per parameter.
        stddev: f64,
    },
}

impl std::fmt::Debug for Defense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Defense {
    /// The defense's name as `defense_type` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Defense::Median => "median",
            Defense::TrimmedMean { .. } => "trimmed_mean",
            Defense::Krum { m: Some(1), .. } => "krum",
            Defense::Krum { .. } => "multikrum",
            Defense::GeoMedian { .. } => "geo_median",
            Defense::NormClip { .. } => "norm_diff_clipping",
            Defense::CenteredClip { .. } => "cclip",
            Defense::FoolsGold => "foolsgold",
            Defense::FlTrust(_) => "fltrust",
            Defense::Barfed { .. } => "barfed",
            Defense::WeakDp { .. } => "weak_dp",
        }
    }

    /// Whether the defense needs the round's updates side by side (otherwise it streams).
    fn buffered(&self) -> bool {
        !matches!(self, Defense::NormClip { .. } | Defense::WeakDp { .. })
    }
}

/// The defense `defense_args` configure (`None` when `enable_defense` is off). `root` trains
/// FLTrust's root update; it is required for `fltrust`.
///
/// # Errors
/// An unknown defense, a parameter out of range, `byzantine_client_num` too large for Krum
/// with `client_num_per_round` clients, FLTrust without a root data set: each naming its key.
pub fn defense_from_config(
    d: &crate::config::DefenseArgs,
    per_round: usize,
    root: Option<Arc<RootTrainer>>,
) -> std::result::Result<Option<Defense>, String> {
    if !d.enable_defense {
        return Ok(None);
    }
    let positive = |key: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(format!(
                "defense_args.{key} must be a positive number, got {v}"
            ))
        }
    };
    let f = d.byzantine_client_num;
    let defense = match d.defense_type.to_ascii_lowercase().as_str() {
        "median" | "wise_median" | "coordinate_wise_median" => Defense::Median,
        "trimmed_mean" | "coordinate_wise_trimmed_mean" => {
            let b = match (d.trim_param_b, d.beta) {
                (Some(b), _) => b,
                (None, Some(beta)) => robust::trim_count(per_round, beta)
                    .map_err(|e| format!("defense_args.beta: {e}"))?,
                (None, None) => f,
            };
            if 2 * b >= per_round {
                return Err(format!(
                    "defense_args.trim_param_b: trimming {b} at each end leaves nothing of \
                     client_num_per_round ({per_round}) updates; it must be below {}",
                    per_round.div_ceil(2)
                ));
            }
            Defense::TrimmedMean {
                b: d.trim_param_b,
                beta: d.beta,
                f,
            }
        }
        kind @ ("krum" | "multikrum") => {
            if per_round <= 2 * f + 2 {
                return Err(format!(
                    "defense_args.byzantine_client_num: Krum tolerates f Byzantine clients only \
                     with more than 2f + 2 updates a round; f = {f} needs client_num_per_round ≥ \
                     {}, which is {per_round}",
                    2 * f + 3
                ));
            }
            let m = if kind == "krum" {
                Some(1)
            } else {
                d.krum_param_m
            };
            if let Some(m) = m {
                if m == 0 || m > per_round {
                    return Err(format!(
                        "defense_args.krum_param_m must be in 1..={per_round}, got {m}"
                    ));
                }
            }
            Defense::Krum { f, m }
        }
        "geo_median" | "geometric_median" | "rfa" => Defense::GeoMedian {
            max_iter: d.rfa_max_iter.max(1),
        },
        "norm_diff_clipping" => Defense::NormClip {
            bound: positive("norm_bound", d.norm_bound)?,
        },
        "cclip" | "centered_clipping" => Defense::CenteredClip {
            tau: positive("tau", d.tau)?,
            iters: d.cclip_iters.max(1),
        },
        "foolsgold" => Defense::FoolsGold,
        "fltrust" => {
            if d.root_data_size == 0 {
                return Err(
                    "defense_args.root_data_size: FLTrust needs a root data set on the server; \
                     set root_data_size to the number of samples (e.g. 100)"
                        .into(),
                );
            }
            match root {
                Some(r) => Defense::FlTrust(r),
                None => {
                    return Err(
                        "defense_args.defense_type: fltrust needs the server's root \
                                data set, and this server has none"
                            .into(),
                    )
                }
            }
        }
        "barfed" => Defense::Barfed {
            k: if d.barfed_fence.is_finite() && d.barfed_fence >= 0.0 {
                d.barfed_fence
            } else {
                return Err(format!(
                    "defense_args.barfed_fence must be ≥ 0, got {}",
                    d.barfed_fence
                ));
            },
        },
        "weak_dp" => Defense::WeakDp {
            bound: positive("norm_bound", d.norm_bound)?,
            stddev: if d.stddev.is_finite() && d.stddev >= 0.0 {
                d.stddev
            } else {
                return Err(format!("defense_args.stddev must be ≥ 0, got {}", d.stddev));
            },
        },
        other => {
            return Err(format!(
                "defense_args.defense_type: {other:?} is not a defense fedmq has; valid: {}",
                DEFENSES.join(", ")
            ))
        }
    };
    Ok(Some(defense))
}

/// Memory a defense keeps across rounds.
#[derive(Default)]
struct Memory {
    foolsgold: FoolsGold,
    /// Centered clipping's center: the previous round's aggregated change.
    center: Option<Vec<f32>>,
    /// What the last round's aggregation did, for its metrics.
    metrics: BTreeMap<String, f64>,
}

/// A strategy with a robust aggregate in place of its mean.
pub struct Defended {
    inner: Box<dyn Strategy>,
    defense: Defense,
    memory: Arc<Mutex<Memory>>,
}

impl Defended {
    /// `inner` aggregated with `defense`.
    ///
    /// # Errors
    /// When `inner`'s aggregate is not the mean of the clients' models (SCAFFOLD, FedNova,
    /// FedBuff), which a robust aggregate cannot stand in for.
    pub fn new(inner: Box<dyn Strategy>, defense: Defense) -> std::result::Result<Self, String> {
        if inner.secure_aggregation().is_err() || inner.buffered().is_some() {
            return Err(format!(
                "defense_args: a defense replaces the mean of the clients' models, but {} \
                 aggregates more than that; use it with FedAvg, FedProx or the FedOpt family",
                inner.name()
            ));
        }
        Ok(Self {
            inner,
            defense,
            memory: Arc::default(),
        })
    }
}

impl Strategy for Defended {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn configure_train(
        &mut self,
        round: u64,
        available: &[String],
        per_round: usize,
        rng: &mut ChaCha8Rng,
    ) -> Vec<ClientTrain> {
        self.inner.configure_train(round, available, per_round, rng)
    }

    fn instruction(&self, round: u64, client: &str) -> Option<StrategyInstruction> {
        self.inner.instruction(round, client)
    }

    fn round_tensors(&mut self, round: u64, global: &ParamSet) -> Option<Arc<ParamSet>> {
        self.inner.round_tensors(round, global)
    }

    fn secure_aggregation(&self) -> std::result::Result<(), String> {
        Err(format!(
            "the {} defense (defense_args) looks at each client's update, but secure aggregation \
             shows the server only their sum; turn one of them off",
            self.defense.name()
        ))
    }

    fn begin_round(&mut self, _round: u64, global: &ParamSet) -> Box<dyn RoundAggregate> {
        Box::new(DefendedRound {
            defense: self.defense.clone(),
            global: global.clone(),
            memory: self.memory.clone(),
            clients: Vec::new(),
            deltas: Vec::new(),
            weights: Vec::new(),
            sum: (!self.defense.buffered()).then(|| vec![0f64; global.num_params()]),
            clipped: 0,
        })
    }

    fn end_round(
        &mut self,
        round: u64,
        global: &ParamSet,
        aggregate: Option<ParamSet>,
    ) -> RoundEnd {
        let mut end = self.inner.end_round(round, global, aggregate);
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        end.metrics.append(&mut memory.metrics);
        end
    }

    fn stop(&self) -> Option<String> {
        self.inner.stop()
    }

    fn state(&self) -> StrategyState {
        self.inner.state()
    }

    fn restore(&mut self, state: &serde_json::Value, tensors: Option<ParamSet>) -> Result<()> {
        self.inner.restore(state, tensors)
    }
}

/// One round of a [`Defended`] strategy.
struct DefendedRound {
    defense: Defense,
    global: ParamSet,
    memory: Arc<Mutex<Memory>>,
    clients: Vec<String>,
    /// Buffered defenses: each update's flattened change from the global model.
    deltas: Vec<Vec<f32>>,
    weights: Vec<f64>,
    /// Streaming defenses: the weighted sum of the clipped changes.
    sum: Option<Vec<f64>>,
    clipped: usize,
}

impl DefendedRound {
    /// The flattened change `x − g` of an update, after the checks every aggregate makes.
    fn delta(&self, client: &str, update: &ParamsView<'_>) -> Result<Vec<f32>> {
        super::check_update(&self.global, client, update)?;
        let mut out = Vec::with_capacity(self.global.num_params());
        for (g, x) in self.global.tensors().iter().zip(update.tensors()) {
            let at = out.len();
            out.extend(x.values());
            for (d, g) in out[at..].iter_mut().zip(g.data()) {
                *d -= g;
            }
        }
        Ok(out)
    }

    /// The layers of the flattened model, for BARFED.
    fn layers(&self) -> Vec<std::ops::Range<usize>> {
        let mut at = 0;
        self.global
            .tensors()
            .iter()
            .map(|t| {
                let r = at..at + t.len();
                at += t.len();
                r
            })
            .collect()
    }

    fn robust(&self, memory: &mut Memory) -> std::result::Result<(Vec<f32>, Outcome), String> {
        let updates: Vec<Update<'_>> = self
            .deltas
            .iter()
            .zip(&self.weights)
            .map(|(d, &w)| Update::new(d, w))
            .collect();
        let n = updates.len();
        let r = match &self.defense {
            Defense::Median => robust::median(&updates),
            Defense::TrimmedMean { b, beta, f } => {
                let b = match (b, beta) {
                    (Some(b), _) => *b,
                    (None, Some(beta)) => {
                        robust::trim_count(n, *beta).map_err(|e| e.to_string())?
                    }
                    (None, None) => *f,
                };
                // Fewer updates than configured (dropouts): trim what still leaves one.
                robust::trimmed_mean(&updates, b.min(n.saturating_sub(1) / 2))
            }
            Defense::Krum { f, m } => {
                let m = m.unwrap_or(n.saturating_sub(*f)).clamp(1, n.max(1));
                robust::krum(&updates, *f, m)
            }
            Defense::GeoMedian { max_iter } => {
                robust::geometric_median(&updates, 1e-6, 1e-5, *max_iter)
            }
            Defense::CenteredClip { tau, iters } => {
                let zero;
                let center = match &memory.center {
                    Some(c) if c.len() == self.global.num_params() => c,
                    _ => {
                        zero = vec![0f32; self.global.num_params()];
                        &zero
                    }
                };
                robust::centered_clip(&updates, center, *tau, *iters)
            }
            Defense::FoolsGold => {
                let ids: Vec<&str> = self.clients.iter().map(String::as_str).collect();
                memory.foolsgold.aggregate(&ids, &updates)
            }
            Defense::FlTrust(root) => {
                let trained = root(&self.global)?;
                let root_delta: Vec<f32> = trained
                    .tensors()
                    .iter()
                    .zip(self.global.tensors())
                    .flat_map(|(x, g)| x.data().iter().zip(g.data()).map(|(x, g)| x - g))
                    .collect();
                robust::fltrust(&updates, &root_delta)
            }
            Defense::Barfed { k } => robust::barfed(&updates, &self.layers(), *k),
            Defense::NormClip { .. } | Defense::WeakDp { .. } => {
                unreachable!("streaming defenses are not buffered")
            }
        };
        r.map_err(|e| e.to_string())
    }
}

/// Sets `x ← g + delta` for every parameter of `global`.
fn apply(global: &ParamSet, delta: &[f32]) -> ParamSet {
    let mut next = global.clone();
    let mut at = 0;
    for t in next.tensors_mut() {
        let n = t.len();
        for (x, d) in t.data_mut().iter_mut().zip(&delta[at..at + n]) {
            *x += d;
        }
        at += n;
    }
    next
}

impl RoundAggregate for DefendedRound {
    fn add(
        &mut self,
        client: &str,
        update: &ParamsView<'_>,
        num_samples: u64,
        _report: &Report,
    ) -> Result<()> {
        if num_samples == 0 {
            return Err(Error::ZeroWeight {
                client: client.to_string(),
            });
        }
        let mut delta = self.delta(client, update)?;
        let w = num_samples as f64;
        if let Some(sum) = &mut self.sum {
            let (Defense::NormClip { bound } | Defense::WeakDp { bound, .. }) = self.defense else {
                unreachable!("only clipping streams")
            };
            if robust::norm_clip(&mut delta, bound) {
                self.clipped += 1;
            }
            for (s, d) in sum.iter_mut().zip(&delta) {
                *s += w * f64::from(*d);
            }
        } else {
            self.deltas.push(delta);
        }
        self.weights.push(w);
        self.clients.push(client.to_string());
        Ok(())
    }

    fn count(&self) -> usize {
        self.clients.len()
    }

    fn finish(self: Box<Self>, _failures: &[ClientFailure]) -> Option<ParamSet> {
        if self.clients.is_empty() {
            return None;
        }
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let mut metrics = BTreeMap::new();
        let delta = if let Some(sum) = &self.sum {
            let total: f64 = self.weights.iter().sum();
            let mut delta: Vec<f32> = sum.iter().map(|s| (s / total) as f32).collect();
            if let Defense::WeakDp { stddev, .. } = self.defense {
                if let Ok(normal) = Normal::new(0.0, stddev) {
                    let mut rng = rand::rng();
                    for d in &mut delta {
                        *d += normal.sample(&mut rng) as f32;
                    }
                }
            }
            metrics.insert("defense_clipped".into(), self.clipped as f64);
            delta
        } else {
            match self.robust(&mut memory) {
                Ok((delta, outcome)) => {
                    metrics.extend(outcome_metrics(&outcome, self.clients.len()));
                    delta
                }
                Err(e) => {
                    tracing::warn!(
                        defense = self.defense.name(),
                        "robust aggregation failed, the global model is kept: {e}"
                    );
                    memory.metrics = BTreeMap::from([("defense_failed".into(), 1.0)]);
                    return None;
                }
            }
        };
        if matches!(self.defense, Defense::CenteredClip { .. }) {
            memory.center = Some(delta.clone());
        }
        memory.metrics = metrics;
        Some(apply(&self.global, &delta))
    }
}

/// The round metrics of a robust aggregation: how many updates it kept or weighed down.
fn outcome_metrics(o: &Outcome, n: usize) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    if !o.selected.is_empty() {
        m.insert("defense_selected".into(), o.selected.len() as f64);
    }
    if !o.weights.is_empty() {
        let low = o.weights.iter().filter(|w| **w < 0.5 / n as f64).count();
        m.insert("defense_downweighted".into(), low as f64);
    }
    if o.clipped > 0 {
        m.insert("defense_clipped".into(), o.clipped as f64);
    }
    if !o.excluded_layers.is_empty() {
        let excluded = o.excluded_layers.iter().filter(|e| **e > 0).count();
        m.insert("defense_excluded".into(), excluded as f64);
    }
    if o.iterations > 0 {
        m.insert("defense_iterations".into(), o.iterations as f64);
    }
    m
}

#[cfg(test)]
mod tests;
