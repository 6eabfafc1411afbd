//! [`Private`]: differential privacy around a strategy (`dp_args`).
//!
//! | `dp_solution_type` | who clips | who adds noise | accountant |
//! |---|---|---|---|
//! | `cdp` (DP-FedAvg, McMahan et al. 2018) | the server, each update to `C` | the server, `N(0, (zC)²)` on the sum | RDP, sampled Gaussian |
//! | `ddp` (distributed, with secure aggregation) | each client | each client, `N(0, (zC)²/m)`, before masking | RDP, sampled Gaussian |
//! | `ldp` | each client | each client: Gaussian `σ = 2C·√(2 ln(1.25/δ))/ε` or Laplace `b = 2C/ε` (L1) | per round (ε, δ) |
//!
//! With `cdp` and `ddp`, the mean is the noised sum over `m`, the number of clients a round
//! selects, with every client weighted alike (a sample-count weight would let one client's
//! contribution exceed `C`). The noise multiplier `z` is `noise_multiplier`, or the smallest that
//! keeps the whole run (`comm_round` rounds at sampling rate `q = per_round / total`) within
//! `epsilon`. Adaptive clipping (Andrew et al. 2021) moves `C` geometrically towards the
//! `target_unclipped_quantile` of the update norms, from a noised count of unclipped updates;
//! that count's noise (`σ_b = m/20`) takes its share of the privacy budget, so the update noise
//! is `z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`. The RDP accountant ([`crate::privacy`]) adds one step at
//! rate `q` and multiplier `z` per round; the spent ε (at `delta`) is a round metric, and the
//! run stops before a round would spend more than `stop_training_at_epsilon`.

use super::{
    ClientFailure, ClientTrain, Error, Report, Result, RoundAggregate, RoundEnd, Strategy,
    StrategyState,
};
use crate::config::Config;
use crate::privacy::{noise_multiplier_for, RdpAccountant};
use crate::proto::{StrategyInstruction, STRATEGY_INSTRUCTION_VERSION};
use crate::tensor::{ParamSet, ParamsView};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Where the noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpMode {
    /// The server clips and noises (`cdp`).
    Central,
    /// Each client noises its share before secure aggregation (`ddp`).
    Distributed,
    /// Each client noises its own update (`ldp`).
    Local,
}

/// Adaptive clipping's settings (Andrew et al. 2021).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adaptive {
    /// The quantile of update norms `C` tracks (`γ`).
    pub quantile: f64,
    /// The geometric learning rate (`η_C`).
    pub lr: f64,
    /// The standard deviation of the unclipped count's noise (`σ_b`).
    pub count_std: f64,
}

/// Differential privacy as `dp_args` configure it.
#[derive(Debug, Clone, PartialEq)]
pub struct DpSettings {
    /// Where the noise is added.
    pub mode: DpMode,
    /// The clipping norm `C` (the starting one with adaptive clipping).
    pub clip: f64,
    /// `cdp`/`ddp`: the update noise's multiplier `z_Δ`.
    pub noise_multiplier: f64,
    /// `cdp`/`ddp`: the multiplier the accountant charges (`z`; `z_Δ` without adaptive clipping).
    pub accounted_multiplier: f64,
    /// Adaptive clipping (`cdp` only).
    pub adaptive: Option<Adaptive>,
    /// `δ`.
    pub delta: f64,
    /// Stop before spending more than this ε.
    pub stop_at: Option<f64>,
    /// Clients per round (`m`).
    pub per_round: usize,
    /// The sampling rate `q`.
    pub q: f64,
    /// `ldp`: the Gaussian noise's standard deviation, or `None` for Laplace.
    pub ldp_gaussian_std: Option<f64>,
    /// `ldp`: the Laplace noise's scale (L1 clipping), when the mechanism is Laplace.
    pub ldp_laplace_scale: Option<f64>,
    /// `ldp`: the per-round ε.
    pub ldp_epsilon: Option<f64>,
}

/// The differential privacy `cfg.dp_args` configure (`None` when `enable_dp` is off).
///
/// # Errors
/// An unknown solution or mechanism, a non-positive ε, δ outside (0, 1), neither ε nor a noise
/// multiplier, a combination that does not hold (ddp without secure aggregation or with sample
/// weighting, cdp with secure aggregation, an asynchronous strategy): each naming its key.
pub fn dp_from_config(cfg: &Config) -> std::result::Result<Option<DpSettings>, String> {
    let d = &cfg.dp_args;
    if !d.enable_dp {
        return Ok(None);
    }
    let t = &cfg.train_args;
    let per_round = t.client_num_per_round.max(1);
    let q = per_round as f64 / t.client_num_in_total.max(1) as f64;
    if let Some(e) = d.epsilon {
        if !(e.is_finite() && e > 0.0) {
            return Err(format!(
                "dp_args.epsilon must be a positive number, got {e}"
            ));
        }
    }
    let stop_at = d.stop_budget()?;
    if let Some(e) = stop_at {
        if !(e.is_finite() && e > 0.0) {
            return Err(format!(
                "dp_args.stop_training_at_epsilon must be a positive number, got {e}"
            ));
        }
    }
    if !(d.delta > 0.0 && d.delta < 1.0) {
        return Err(format!("dp_args.delta must be in (0, 1), got {}", d.delta));
    }
    let clip = d.clip();
    if !(clip.is_finite() && clip > 0.0) {
        return Err(format!(
            "dp_args.clipping_norm must be a positive number, got {clip}"
        ));
    }
    let mode = match d.dp_solution_type.to_ascii_lowercase().as_str() {
        "cdp" | "central" => DpMode::Central,
        "ddp" | "distributed" => DpMode::Distributed,
        "ldp" | "local" => DpMode::Local,
        other => {
            return Err(format!(
                "dp_args.dp_solution_type: {other:?} is not one of cdp (the server noises), ddp \
                 (clients noise their share under secure aggregation), ldp (each client noises \
                 its update)"
            ))
        }
    };
    let lname = t.federated_optimizer.to_ascii_lowercase();
    if matches!(lname.as_str(), "fedbuff" | "async_fedavg") {
        return Err(format!(
            "dp_args.enable_dp: the accountant counts synchronous rounds of sampled clients; \
             {} is asynchronous. Use FedAvg, FedProx or the FedOpt family",
            t.federated_optimizer
        ));
    }
    let gaussian =
        match d.mechanism_type.to_ascii_lowercase().as_str() {
            "gaussian" => true,
            "laplace" if mode == DpMode::Local => false,
            "laplace" => return Err(
                "dp_args.mechanism_type: laplace is for ldp; cdp and ddp add Gaussian noise (the \
                 RDP accountant is for the sampled Gaussian mechanism)"
                    .into(),
            ),
            other => {
                return Err(format!(
                    "dp_args.mechanism_type: {other:?} is not gaussian or laplace"
                ))
            }
        };
    let sa = cfg.secure_aggregation();
    match mode {
        DpMode::Central if sa => {
            return Err(
                "dp_args.dp_solution_type: cdp clips each client's update on the server, which \
                 secure aggregation hides from it; use ddp (each client adds its share of the \
                 noise before masking)"
                    .into(),
            )
        }
        DpMode::Distributed if !sa => {
            return Err(
                "dp_args.dp_solution_type: ddp splits the noise among clients and relies on \
                 secure aggregation to hide each noised share; turn secure aggregation on \
                 (secure_aggregation_args.enable_sa), or use cdp"
                    .into(),
            )
        }
        DpMode::Distributed if cfg.fedmq_args.weighting != "uniform" => {
            return Err(
                "dp_args.dp_solution_type: ddp needs every client weighted alike (a sample-count \
                 weight scales a clipped update past C); set fedmq_args.weighting: uniform"
                    .into(),
            )
        }
        _ => {}
    }
    let mut settings = DpSettings {
        mode,
        clip,
        noise_multiplier: 0.0,
        accounted_multiplier: 0.0,
        adaptive: None,
        delta: d.delta,
        stop_at,
        per_round,
        q,
        ldp_gaussian_std: None,
        ldp_laplace_scale: None,
        ldp_epsilon: None,
    };
    if mode == DpMode::Local {
        let Some(eps) = d.epsilon else {
            return Err(
                "dp_args.epsilon: ldp needs the per-round ε of each client's release".into(),
            );
        };
        let c = d.sensitivity.unwrap_or(clip);
        if !(c.is_finite() && c > 0.0) {
            return Err(format!(
                "dp_args.sensitivity must be a positive number, got {c}"
            ));
        }
        settings.clip = c;
        settings.ldp_epsilon = Some(eps);
        if gaussian {
            settings.ldp_gaussian_std = Some(2.0 * c * (2.0 * (1.25 / d.delta).ln()).sqrt() / eps);
        } else {
            settings.ldp_laplace_scale = Some(2.0 * c / eps);
        }
        return Ok(Some(settings));
    }
    let z =
        match (d.noise_multiplier, d.epsilon) {
            (Some(z), _) if z.is_finite() && z > 0.0 => z,
            (Some(z), _) => {
                return Err(format!(
                    "dp_args.noise_multiplier must be a positive number, got {z}"
                ))
            }
            (None, Some(eps)) => noise_multiplier_for(eps, d.delta, q, t.comm_round as u64)
                .map_err(|e| format!("dp_args.epsilon: {e}"))?,
            (None, None) => return Err(
                "dp_args: set epsilon (the budget of the whole run; the noise is chosen to fit \
                 it) or noise_multiplier"
                    .into(),
            ),
        };
    settings.accounted_multiplier = z;
    settings.noise_multiplier = z;
    if let Some(budget) = settings.stop_at {
        let mut one = RdpAccountant::new();
        one.step(q, z);
        let first = one.epsilon(d.delta);
        if first > budget {
            return Err(format!(
                "dp_args.stop_training_at_epsilon: one round at noise multiplier {z:.3} already                  spends ε = {first:.3} (δ = {}), over the budget of {budget}; raise                  noise_multiplier (or lower epsilon) or raise the budget",
                d.delta
            ));
        }
    }
    if d.adaptive_clipping {
        if mode != DpMode::Central {
            return Err(
                "dp_args.adaptive_clipping needs the server to see which updates were clipped: \
                 use it with cdp"
                    .into(),
            );
        }
        if !(d.target_unclipped_quantile > 0.0 && d.target_unclipped_quantile < 1.0) {
            return Err(format!(
                "dp_args.target_unclipped_quantile must be in (0, 1), got {}",
                d.target_unclipped_quantile
            ));
        }
        if !(d.clip_learning_rate.is_finite() && d.clip_learning_rate > 0.0) {
            return Err(format!(
                "dp_args.clip_learning_rate must be a positive number, got {}",
                d.clip_learning_rate
            ));
        }
        let count_std = per_round as f64 / 20.0;
        let share = (2.0 * count_std).powi(-2);
        if z.powi(-2) <= share {
            return Err(format!(
                "dp_args.adaptive_clipping: with {per_round} clients a round the unclipped \
                 count's noise (σ_b = m/20 = {count_std}) needs all of the budget of noise \
                 multiplier {z:.3}; select more clients a round or turn adaptive clipping off"
            ));
        }
        settings.noise_multiplier = (z.powi(-2) - share).powf(-0.5);
        settings.adaptive = Some(Adaptive {
            quantile: d.target_unclipped_quantile,
            lr: d.clip_learning_rate,
            count_std,
        });
    }
    Ok(Some(settings))
}

/// What the accountant and adaptive clipping carry across rounds.
struct Ledger {
    accountant: RdpAccountant,
    clip: f64,
    /// Set by a round's aggregate: updates and how many were not clipped.
    counts: Option<(usize, usize)>,
}

/// A strategy with differential privacy.
pub struct Private {
    inner: Box<dyn Strategy>,
    dp: DpSettings,
    ledger: Arc<Mutex<Ledger>>,
    stop: Option<String>,
}

impl Private {
    /// `inner` with `dp`.
    ///
    /// # Errors
    /// `cdp` around a strategy whose aggregate is more than the mean of the clients' models.
    pub fn new(inner: Box<dyn Strategy>, dp: DpSettings) -> std::result::Result<Self, String> {
        if dp.mode == DpMode::Central && inner.secure_aggregation().is_err() {
            return Err(format!(
                "dp_args: cdp replaces the mean of the clients' models with a clipped, noised \
                 one, but {} aggregates more than that; use FedAvg, FedProx or the FedOpt family",
                inner.name()
            ));
        }
        Ok(Self {
            ledger: Arc::new(Mutex::new(Ledger {
                accountant: RdpAccountant::new(),
                clip: dp.clip,
                counts: None,
            })),
            inner,
            dp,
            stop: None,
        })
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Instruction parameters of the client-side noise (read by `crate::client::LocalHooks`).
pub const DP_CLIP: &str = "dp_clip_norm";
/// The Gaussian noise's standard deviation a client adds to its clipped update.
pub const DP_GAUSSIAN: &str = "dp_gaussian_std";
/// The Laplace noise's scale a client adds to its L1-clipped update.
pub const DP_LAPLACE: &str = "dp_laplace_scale";

impl Strategy for Private {
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
        let mut picked = self.inner.configure_train(round, available, per_round, rng);
        for c in &mut picked {
            c.instruction = self.instruction(round, &c.client);
        }
        picked
    }

    fn instruction(&self, round: u64, client: &str) -> Option<StrategyInstruction> {
        let mut i = self.inner.instruction(round, client);
        let noise = match self.dp.mode {
            DpMode::Central => return i,
            DpMode::Distributed => vec![(
                DP_GAUSSIAN,
                self.dp.noise_multiplier * self.dp.clip / (self.dp.per_round as f64).sqrt(),
            )],
            DpMode::Local => match (self.dp.ldp_gaussian_std, self.dp.ldp_laplace_scale) {
                (Some(s), _) => vec![(DP_GAUSSIAN, s)],
                (None, Some(b)) => vec![(DP_LAPLACE, b)],
                (None, None) => vec![],
            },
        };
        let i = i.get_or_insert_with(|| StrategyInstruction {
            name: self.inner.name().to_string(),
            version: STRATEGY_INSTRUCTION_VERSION,
            params: BTreeMap::new(),
        });
        i.params.insert(DP_CLIP.into(), self.dp.clip);
        for (k, v) in noise {
            i.params.insert(k.into(), v);
        }
        Some(i.clone())
    }

    fn round_tensors(&mut self, round: u64, global: &ParamSet) -> Option<Arc<ParamSet>> {
        self.inner.round_tensors(round, global)
    }

    fn secure_aggregation(&self) -> std::result::Result<(), String> {
        match self.dp.mode {
            DpMode::Central => Err(
                "dp_args.dp_solution_type: cdp clips each client's update on \
                                    the server, which secure aggregation hides; use ddp"
                    .into(),
            ),
            _ => self.inner.secure_aggregation(),
        }
    }

    fn begin_round(&mut self, round: u64, global: &ParamSet) -> Box<dyn RoundAggregate> {
        if self.dp.mode != DpMode::Central {
            return self.inner.begin_round(round, global);
        }
        let clip = self.ledger().clip;
        Box::new(CentralRound {
            global: global.clone(),
            sum: vec![0f64; global.num_params()],
            count: 0,
            unclipped: 0,
            clip,
            z: self.dp.noise_multiplier,
            ledger: self.ledger.clone(),
        })
    }

    fn end_round(
        &mut self,
        round: u64,
        global: &ParamSet,
        aggregate: Option<ParamSet>,
    ) -> RoundEnd {
        let mut end = self.inner.end_round(round, global, aggregate);
        let dp = self.dp.clone();
        let mut ledger = self.ledger();
        if dp.mode == DpMode::Local {
            if let Some(e) = dp.ldp_epsilon {
                end.metrics.insert("ldp_epsilon_round".into(), e);
            }
            return end;
        }
        // The round released a noised sum whether or not updates arrived in time.
        ledger.accountant.step(dp.q, dp.accounted_multiplier);
        let spent = ledger.accountant.epsilon(dp.delta);
        end.metrics.insert("dp_epsilon".into(), spent);
        end.metrics.insert("dp_clip".into(), ledger.clip);
        end.metrics
            .insert("dp_noise_multiplier".into(), dp.noise_multiplier);
        if let (Some(a), Some((n, unclipped))) = (dp.adaptive, ledger.counts.take()) {
            if n > 0 {
                let noise = Normal::new(0.0, a.count_std)
                    .map(|d| d.sample(&mut rand::rng()))
                    .unwrap_or(0.0);
                let frac = (unclipped as f64 + noise) / dp.per_round as f64;
                ledger.clip *= (-a.lr * (frac - a.quantile)).exp();
                end.metrics.insert("dp_unclipped_noised".into(), frac);
            }
        }
        let next_spent = dp.stop_at.map(|_| {
            let mut next = ledger.accountant.clone();
            next.step(dp.q, dp.accounted_multiplier);
            next.epsilon(dp.delta)
        });
        drop(ledger);
        if let (Some(budget), Some(after)) = (dp.stop_at, next_spent) {
            if after > budget {
                self.stop = Some(format!(
                    "privacy budget reached: round {round} brought the spent ε to {spent:.3} \
                     (δ = {}), and one more round would spend {after:.3}, over \
                     dp_args.stop_training_at_epsilon = {budget}",
                    dp.delta
                ));
            }
        }
        end
    }

    fn stop(&self) -> Option<String> {
        self.stop.clone()
    }

    fn state(&self) -> StrategyState {
        let inner = self.inner.state();
        let ledger = self.ledger();
        let accountant = serde_json::to_value(&ledger.accountant).unwrap_or_default();
        let clip = ledger.clip;
        StrategyState::lazy(move || {
            let (state, tensors) = inner.encode();
            (
                serde_json::json!({"inner": state, "accountant": accountant, "clip": clip}),
                tensors,
            )
        })
    }

    fn restore(&mut self, state: &serde_json::Value, tensors: Option<ParamSet>) -> Result<()> {
        let bad = |detail: String| Error::Restore {
            strategy: format!("{} with differential privacy", self.inner.name()),
            detail,
        };
        let accountant: RdpAccountant = serde_json::from_value(
            state
                .get("accountant")
                .cloned()
                .ok_or_else(|| bad("the checkpoint has no privacy accountant".into()))?,
        )
        .map_err(|e| bad(format!("the privacy accountant: {e}")))?;
        let clip = state
            .get("clip")
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| bad("the checkpoint has no clipping norm".into()))?;
        self.inner.restore(
            state.get("inner").unwrap_or(&serde_json::Value::Null),
            tensors,
        )?;
        let mut ledger = self.ledger();
        ledger.accountant = accountant;
        ledger.clip = clip;
        Ok(())
    }
}

/// A `cdp` round: each update's change clipped to `C` and summed; the sum noised at the end.
struct CentralRound {
    global: ParamSet,
    sum: Vec<f64>,
    count: usize,
    unclipped: usize,
    clip: f64,
    z: f64,
    ledger: Arc<Mutex<Ledger>>,
}

impl RoundAggregate for CentralRound {
    fn add(
        &mut self,
        client: &str,
        update: &ParamsView<'_>,
        _num_samples: u64,
        _report: &Report,
    ) -> Result<()> {
        super::check_update(&self.global, client, update)?;
        let mut sq = 0f64;
        for (g, x) in self.global.tensors().iter().zip(update.tensors()) {
            for (x, g) in x.values().zip(g.data()) {
                let d = f64::from(x - g);
                sq += d * d;
            }
        }
        let norm = sq.sqrt();
        let scale = if norm > self.clip {
            self.clip / norm
        } else {
            self.unclipped += 1;
            1.0
        };
        let mut at = 0;
        for (g, x) in self.global.tensors().iter().zip(update.tensors()) {
            for (x, g) in x.values().zip(g.data()) {
                self.sum[at] += scale * f64::from(x - g);
                at += 1;
            }
        }
        self.count += 1;
        Ok(())
    }

    fn count(&self) -> usize {
        self.count
    }

    fn finish(self: Box<Self>, _failures: &[ClientFailure]) -> Option<ParamSet> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner()).counts =
            Some((self.count, self.unclipped));
        if self.count == 0 {
            return None;
        }
        let std = self.z * self.clip;
        let normal = Normal::new(0.0, std).ok()?;
        let mut rng = rand::rng();
        let m = self.count as f64;
        let mut next = self.global;
        let mut at = 0;
        for t in next.tensors_mut() {
            for x in t.data_mut() {
                let noised = self.sum[at] + normal.sample(&mut rng);
                *x += (noised / m) as f32;
                at += 1;
            }
        }
        Some(next)
    }
}

#[cfg(test)]
mod tests;
