//! FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
//! Federated Optimization"): normalized averaging.
//!
//! Clients that take more local steps move further; FedAvg's plain average then drifts towards
//! the objectives of the clients with the most steps. FedNova divides each client's change by its
//! own step count before averaging and rescales by the effective step count:
//!
//! ```text
//! dᵢ = (x − yᵢ) / aᵢ          aᵢ: the client's normalizer (its step count for plain SGD)
//! τ_eff = Σ pᵢ·aᵢ              pᵢ: the client's weight (samples) over the round's total
//! x ← x − η_g · τ_eff · Σ pᵢ·dᵢ
//! ```
//!
//! The clients report `local_steps` (τᵢ) and `normalizer` (aᵢ) in their update
//! ([`crate::proto::Update::report`], asked for by the instruction `normalized_steps`). For SGD
//! with momentum ρ the normalizer is `aᵢ = [τᵢ − ρ(1 − ρ^τᵢ)/(1 − ρ)] / (1 − ρ)` (the paper's
//! momentum case); for plain SGD `aᵢ = τᵢ`. The sums are streamed: O(model) memory.

use super::{ClientFailure, Error, Report, Result, RoundAggregate, Strategy};
use crate::proto::{StrategyInstruction, STRATEGY_INSTRUCTION_VERSION};
use crate::tensor::{ParamSet, ParamsView};
use std::collections::BTreeMap;

/// The normalizer `aᵢ` of `steps` local SGD steps with momentum `momentum` (the paper's
/// formula; `steps` itself without momentum).
pub fn normalizer(steps: u64, momentum: f64) -> f64 {
    let tau = steps as f64;
    if momentum <= 0.0 {
        return tau;
    }
    let rho = momentum;
    let geometric = rho * (1.0 - rho.powf(tau)) / (1.0 - rho);
    (tau - geometric) / (1.0 - rho)
}

/// Normalized averaging.
#[derive(Debug, Clone)]
pub struct FedNova {
    /// Server learning rate `η_g` (1 in the paper).
    server_lr: f64,
}

impl FedNova {
    /// FedNova with server learning rate `server_lr` (> 0).
    ///
    /// # Errors
    /// A server learning rate that is not > 0.
    pub fn new(server_lr: f64) -> std::result::Result<Self, String> {
        if !(server_lr.is_finite() && server_lr > 0.0) {
            return Err(format!("server learning rate {server_lr} must be > 0"));
        }
        Ok(Self { server_lr })
    }
}

impl Strategy for FedNova {
    fn secure_aggregation(&self) -> std::result::Result<(), String> {
        Err(
            "FedNova weights each update by that client's own normalizer (its local steps), which \
             secure aggregation hides from the server: use FedAvg, FedProx or the FedOpt family, \
             or turn secure aggregation off"
                .into(),
        )
    }

    fn name(&self) -> &'static str {
        "FedNova"
    }

    fn instruction(&self, _round: u64, _client: &str) -> Option<StrategyInstruction> {
        Some(StrategyInstruction {
            name: self.name().into(),
            version: STRATEGY_INSTRUCTION_VERSION,
            params: [("normalized_steps".to_string(), 1.0)].into(),
        })
    }

    fn begin_round(&mut self, _round: u64, global: &ParamSet) -> Box<dyn RoundAggregate> {
        Box::new(NovaAggregate {
            global: global.clone(),
            direction: global.zeros_like(),
            tau_eff: 0.0,
            total_weight: 0.0,
            count: 0,
            server_lr: self.server_lr,
        })
    }
}

/// A FedNova round: the weighted means of `dᵢ` and of `aᵢ`, updated in place as
/// [`super::StreamingMean`] does.
struct NovaAggregate {
    global: ParamSet,
    direction: ParamSet,
    tau_eff: f64,
    total_weight: f64,
    count: usize,
    server_lr: f64,
}

impl RoundAggregate for NovaAggregate {
    fn add(
        &mut self,
        client: &str,
        update: &ParamsView<'_>,
        num_samples: u64,
        report: &Report,
    ) -> Result<()> {
        if num_samples == 0 {
            return Err(Error::ZeroWeight {
                client: client.to_string(),
            });
        }
        let a = match report.get("normalizer") {
            Some(&a) if a.is_finite() && a > 0.0 => a,
            Some(a) => {
                return Err(Error::Report {
                    client: client.to_string(),
                    detail: format!("normalizer {a} is not > 0"),
                })
            }
            None => {
                return Err(Error::Report {
                    client: client.to_string(),
                    detail: "no normalizer: the client did not run FedNova's normalized steps"
                        .into(),
                })
            }
        };
        update
            .check_layout(&self.global)
            .map_err(|e| Error::Layout {
                client: client.to_string(),
                detail: e.to_string(),
            })?;
        if let Some(t) = update
            .tensors()
            .iter()
            .find(|t| t.values().any(|x| !x.is_finite()))
        {
            return Err(Error::NonFinite {
                client: client.to_string(),
                tensor: t.name().to_string(),
            });
        }
        self.total_weight += num_samples as f64;
        let frac = num_samples as f64 / self.total_weight;
        self.tau_eff += frac * (a - self.tau_eff);
        let (frac, inv_a) = (frac as f32, (1.0 / a) as f32);
        for ((m, g), y) in self
            .direction
            .tensors_mut()
            .zip(self.global.tensors())
            .zip(update.tensors())
        {
            let mut i = 0;
            let g = g.data();
            y.zip_apply(m.data_mut(), |m, y| {
                let d = (g[i] - y) * inv_a;
                *m += frac * (d - *m);
                i += 1;
            });
        }
        self.count += 1;
        Ok(())
    }

    fn count(&self) -> usize {
        self.count
    }

    fn metrics(&self) -> BTreeMap<String, f64> {
        if self.count == 0 {
            return BTreeMap::new();
        }
        BTreeMap::from([("tau_eff".to_string(), self.tau_eff)])
    }

    fn finish(self: Box<Self>, _failures: &[ClientFailure]) -> Option<ParamSet> {
        if self.count == 0 {
            return None;
        }
        let scale = (self.server_lr * self.tau_eff) as f32;
        let mut next = self.global;
        for (x, d) in next.tensors_mut().zip(self.direction.tensors()) {
            for (x, &d) in x.data_mut().iter_mut().zip(d.data()) {
                *x -= scale * d;
            }
        }
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::NamedTensor;

    fn set(w: &[f32]) -> ParamSet {
        ParamSet::new(vec![
            NamedTensor::new("w", vec![w.len()], w.to_vec()).unwrap()
        ])
        .unwrap()
    }

    fn report(a: f64) -> Report {
        [
            ("local_steps".to_string(), a),
            ("normalizer".to_string(), a),
        ]
        .into()
    }

    #[test]
    fn normalized_average_as_computed_by_hand() {
        let mut s = FedNova::new(1.0).unwrap();
        let x = set(&[0.0, 0.0]);
        let mut agg = s.begin_round(1, &x);
        // Client 1: 1 step, moved by [1, 0]; client 2: 4 steps, moved by [0, 8]; weights 1 and 3.
        agg.add("c1", &ParamsView::of(&set(&[1.0, 0.0])), 1, &report(1.0))
            .unwrap();
        agg.add("c2", &ParamsView::of(&set(&[0.0, 8.0])), 3, &report(4.0))
            .unwrap();
        assert_eq!(agg.metrics()["tau_eff"], 0.25 * 1.0 + 0.75 * 4.0);
        let next = s.end_round(1, &x, agg.finish(&[])).global.unwrap();
        // d₁ = −[1,0]/1, d₂ = −[0,8]/4 = −[0,2]; Σpᵢdᵢ = −[0.25, 1.5]; τ_eff = 3.25;
        // x − τ_eff·Σpᵢdᵢ = [0.8125, 4.875]. (FedAvg would give [0.25, 6].)
        assert_eq!(next.get("w").unwrap().data(), &[0.8125, 4.875]);
    }

    #[test]
    fn equal_steps_are_fedavg() {
        let mut s = FedNova::new(1.0).unwrap();
        let x = set(&[1.0]);
        let mut agg = s.begin_round(1, &x);
        agg.add("c1", &ParamsView::of(&set(&[3.0])), 1, &report(5.0))
            .unwrap();
        agg.add("c2", &ParamsView::of(&set(&[-1.0])), 1, &report(5.0))
            .unwrap();
        let next = agg.finish(&[]).unwrap();
        assert_eq!(next.get("w").unwrap().data(), &[1.0]);
    }

    #[test]
    fn a_missing_or_bad_normalizer_is_refused() {
        let mut s = FedNova::new(1.0).unwrap();
        let x = set(&[0.0]);
        let mut agg = s.begin_round(1, &x);
        let e = agg.add("c1", &ParamsView::of(&set(&[1.0])), 1, &Report::new());
        assert!(e.unwrap_err().to_string().contains("normalizer"));
        assert!(agg
            .add("c1", &ParamsView::of(&set(&[1.0])), 1, &report(0.0))
            .is_err());
        assert_eq!(agg.count(), 0);
    }

    #[test]
    fn momentum_normalizer_matches_the_geometric_sum() {
        // Σ_{k=1..τ} (1 − ρ^k)/(1 − ρ): the total weight of the τ gradients in the step.
        for (tau, rho) in [(1u64, 0.9f64), (7, 0.9), (50, 0.5)] {
            let direct: f64 = (1..=tau)
                .map(|k| (1.0 - rho.powi(k as i32)) / (1.0 - rho))
                .sum();
            assert!((normalizer(tau, rho) - direct).abs() < 1e-9 * direct);
        }
        assert_eq!(normalizer(12, 0.0), 12.0);
    }

    #[test]
    fn the_protocol_example_normalizer() {
        // docs/PROTOCOL.md, `update`: 186 steps with momentum 0.9.
        assert_eq!(normalizer(186, 0.9), 1770.0000002775555);
    }
}
