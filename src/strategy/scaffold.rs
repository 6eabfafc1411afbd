//! SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
//! Learning"), with the paper's option II control variates.
//!
//! The server keeps a control variate `c` (model-sized, zero at first) and sends it with the
//! global model (`strategy/control/<param>` in the round's global blob). Each client keeps its
//! own `cᵢ` (zero at first), trains with every gradient corrected by `c − cᵢ`, and after `K`
//! local steps with learning rate `η` sets
//!
//! ```text
//! cᵢ⁺ = cᵢ − c + (x − yᵢ) / (K·η)        Δcᵢ = cᵢ⁺ − cᵢ = (x − yᵢ) / (K·η) − c
//! ```
//!
//! returning `Δcᵢ` in its update blob (`strategy/delta_control/<param>`) beside its model `yᵢ`.
//! The server then steps
//!
//! ```text
//! x ← x + η_g · (ȳ − x)                  ȳ: the round's weighted mean of the yᵢ
//! c ← c + (1/N) · Σ_{i∈S} Δcᵢ             N: the clients available when the round was configured
//! ```
//!
//! so that `c` stays the mean of all clients' `cᵢ`. The model mean is weighted as FedAvg's
//! (samples, or `fedmq_args.weighting`), the control variate update is the paper's plain sum.
//! `c` is the strategy's state, checkpointed and restored with the run.

use super::fedavg::StreamingMean;
use super::{
    sample_clients, ClientFailure, ClientTrain, Error, Report, Result, RoundAggregate, RoundEnd,
    Strategy, StrategyState,
};
use crate::proto::{StrategyInstruction, STRATEGY_INSTRUCTION_VERSION, STRATEGY_TENSOR_PREFIX};
use crate::tensor::{ParamSet, ParamsView};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Name of the server control variate inside the `strategy/` tensors of a global blob.
pub const CONTROL: &str = "control/";
/// Name of a client's control variate change inside the `strategy/` tensors of an update.
pub const DELTA_CONTROL: &str = "delta_control/";

/// SCAFFOLD: FedAvg with client drift corrected by control variates.
#[derive(Debug)]
pub struct Scaffold {
    /// Server learning rate `η_g` (1: the new model is the round's mean).
    server_lr: f64,
    /// The server control variate `c`; created (zeros) at the first round. Shared with
    /// checkpoint snapshots, copied on write only while one is being encoded.
    control: Option<Arc<ParamSet>>,
    /// `N`: clients available when the current round was configured.
    population: usize,
    /// What the round's aggregate hands to [`Strategy::end_round`]: `Σ Δcᵢ` and its count.
    mailbox: Arc<Mutex<Option<(ParamSet, usize)>>>,
}

impl Scaffold {
    /// SCAFFOLD with server learning rate `server_lr` (> 0; 1 in the paper's experiments).
    ///
    /// # Errors
    /// A server learning rate that is not > 0.
    pub fn new(server_lr: f64) -> std::result::Result<Self, String> {
        if !(server_lr.is_finite() && server_lr > 0.0) {
            return Err(format!("server learning rate {server_lr} must be > 0"));
        }
        Ok(Self {
            server_lr,
            control: None,
            population: 0,
            mailbox: Arc::new(Mutex::new(None)),
        })
    }

    /// The server control variate `c` (`None` before the first round).
    pub fn control(&self) -> Option<&ParamSet> {
        self.control.as_deref()
    }
}

impl Strategy for Scaffold {
    fn secure_aggregation(&self) -> std::result::Result<(), String> {
        Err(
            "SCAFFOLD sums each client's control-variate change next to its model, and secure \
             aggregation masks only the model: use FedAvg, FedProx or the FedOpt family, or turn \
             secure aggregation off"
                .into(),
        )
    }

    fn name(&self) -> &'static str {
        "SCAFFOLD"
    }

    fn configure_train(
        &mut self,
        round: u64,
        available: &[String],
        per_round: usize,
        rng: &mut ChaCha8Rng,
    ) -> Vec<ClientTrain> {
        self.population = available.len();
        sample_clients(available, per_round, rng)
            .into_iter()
            .map(|client| ClientTrain {
                instruction: self.instruction(round, &client),
                client,
            })
            .collect()
    }

    fn instruction(&self, _round: u64, _client: &str) -> Option<StrategyInstruction> {
        Some(StrategyInstruction {
            name: self.name().into(),
            version: STRATEGY_INSTRUCTION_VERSION,
            params: [("control_variate".to_string(), 1.0)].into(),
        })
    }

    fn round_tensors(&mut self, _round: u64, global: &ParamSet) -> Option<Arc<ParamSet>> {
        let c = self
            .control
            .get_or_insert_with(|| Arc::new(global.zeros_like()));
        let named = c
            .tensors()
            .iter()
            .map(|t| {
                crate::tensor::NamedTensor::new(
                    format!("{CONTROL}{}", t.name()),
                    t.shape().to_vec(),
                    t.data().to_vec(),
                )
                .expect("a copy keeps its shape")
            })
            .collect();
        Some(Arc::new(
            ParamSet::new(named).expect("prefixed names stay unique"),
        ))
    }

    fn begin_round(&mut self, _round: u64, global: &ParamSet) -> Box<dyn RoundAggregate> {
        *self.mailbox.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Box::new(ScaffoldAggregate {
            model: StreamingMean::new(global),
            delta_sum: global.zeros_like(),
            count: 0,
            mailbox: self.mailbox.clone(),
        })
    }

    fn end_round(
        &mut self,
        _round: u64,
        global: &ParamSet,
        aggregate: Option<ParamSet>,
    ) -> RoundEnd {
        let delta = self
            .mailbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mean) = aggregate else {
            return RoundEnd::default();
        };
        let mut metrics = BTreeMap::new();
        if let Some((sum, _count)) = delta {
            let n = self.population.max(1) as f32;
            let c = Arc::make_mut(
                self.control
                    .get_or_insert_with(|| Arc::new(global.zeros_like())),
            );
            let mut sq = 0f64;
            for (c, d) in c.tensors_mut().zip(sum.tensors()) {
                for (c, &d) in c.data_mut().iter_mut().zip(d.data()) {
                    *c += d / n;
                    sq += f64::from(*c) * f64::from(*c);
                }
            }
            metrics.insert("control_norm".to_string(), sq.sqrt());
        }
        let next = if self.server_lr == 1.0 {
            mean
        } else {
            let lr = self.server_lr as f32;
            let mut next = global.clone();
            for (x, m) in next.tensors_mut().zip(mean.tensors()) {
                for (x, &m) in x.data_mut().iter_mut().zip(m.data()) {
                    *x += lr * (m - *x);
                }
            }
            next
        };
        RoundEnd {
            global: Some(next),
            metrics,
        }
    }

    fn state(&self) -> StrategyState {
        let (control, population) = (self.control.clone(), self.population);
        StrategyState::lazy(move || {
            let json = serde_json::json!({
                "v": 1,
                "population": population,
                "control": control.is_some(),
            });
            (json, control.map(|c| (*c).clone()))
        })
    }

    fn restore(&mut self, state: &serde_json::Value, tensors: Option<ParamSet>) -> Result<()> {
        let bad = |detail: String| Error::Restore {
            strategy: "SCAFFOLD".into(),
            detail,
        };
        if state.is_null() {
            return Err(bad("the checkpoint has no SCAFFOLD state".into()));
        }
        if state["control"].as_bool() == Some(true) {
            let Some(c) = tensors else {
                return Err(bad(
                    "the checkpoint names a control variate but has no tensors".into(),
                ));
            };
            self.control = Some(Arc::new(c));
        }
        self.population = state["population"].as_u64().unwrap_or(0) as usize;
        Ok(())
    }
}

/// A round of SCAFFOLD: the models' streaming mean and the sum of the `Δcᵢ`.
struct ScaffoldAggregate {
    model: StreamingMean,
    delta_sum: ParamSet,
    count: usize,
    mailbox: Arc<Mutex<Option<(ParamSet, usize)>>>,
}

impl RoundAggregate for ScaffoldAggregate {
    fn add(
        &mut self,
        client: &str,
        update: &ParamsView<'_>,
        num_samples: u64,
        report: &Report,
    ) -> Result<()> {
        let mut model = update.clone();
        let mut extra = model.split_prefix(STRATEGY_TENSOR_PREFIX);
        let delta = extra.split_prefix(DELTA_CONTROL);
        let layout = |detail: String| Error::Layout {
            client: client.to_string(),
            detail,
        };
        if !extra.is_empty() {
            let names: Vec<&str> = extra.tensors().iter().map(|t| t.name()).collect();
            return Err(layout(format!(
                "unexpected strategy tensors {names:?} (SCAFFOLD sends only \
                 strategy/{DELTA_CONTROL}*)"
            )));
        }
        if delta.is_empty() {
            return Err(layout(format!(
                "no control variate change (strategy/{DELTA_CONTROL}*): the client did not \
                 run SCAFFOLD"
            )));
        }
        delta
            .check_layout(&self.delta_sum)
            .map_err(|e| layout(format!("strategy/{DELTA_CONTROL}*: {e}")))?;
        if let Some(t) = delta
            .tensors()
            .iter()
            .find(|t| t.values().any(|x| !x.is_finite()))
        {
            return Err(Error::NonFinite {
                client: client.to_string(),
                tensor: format!("strategy/{DELTA_CONTROL}{}", t.name()),
            });
        }
        self.model.add(client, &model, num_samples, report)?;
        for (s, d) in self.delta_sum.tensors_mut().zip(delta.tensors()) {
            d.zip_apply(s.data_mut(), |s, d| *s += d);
        }
        self.count += 1;
        Ok(())
    }

    fn count(&self) -> usize {
        self.count
    }

    fn metrics(&self) -> BTreeMap<String, f64> {
        self.model.metrics()
    }

    fn finish(self: Box<Self>, failures: &[ClientFailure]) -> Option<ParamSet> {
        let this = *self;
        if this.count > 0 {
            *this.mailbox.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((this.delta_sum, this.count));
        }
        Box::new(this.model).finish(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::NamedTensor;
    use rand::SeedableRng;

    fn set(prefix: &str, w: &[f32]) -> ParamSet {
        ParamSet::new(vec![NamedTensor::new(
            format!("{prefix}w"),
            vec![w.len()],
            w.to_vec(),
        )
        .unwrap()])
        .unwrap()
    }

    /// An update blob as a client sends it: model `y` and `Δc` under `strategy/delta_control/`.
    fn update(y: &[f32], dc: &[f32]) -> Vec<u8> {
        set("", y).to_safetensors_bytes_with(
            &format!("{STRATEGY_TENSOR_PREFIX}{DELTA_CONTROL}"),
            &set("", dc),
        )
    }

    #[test]
    fn server_step_and_control_variate_as_computed_by_hand() {
        let mut s = Scaffold::new(0.5).unwrap();
        let avail: Vec<String> = (1..=4).map(|i| format!("c{i}")).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // N = 4 available, 2 selected.
        let picked = s.configure_train(1, &avail, 2, &mut rng);
        assert_eq!(picked.len(), 2);
        assert_eq!(
            picked[0].instruction.as_ref().unwrap().params["control_variate"],
            1.0
        );
        let x = set("", &[1.0, 2.0]);
        // The first round's control variate is zero and travels under control/.
        let sent = s.round_tensors(1, &x).unwrap();
        assert_eq!(sent.get("control/w").unwrap().data(), &[0.0, 0.0]);
        let mut agg = s.begin_round(1, &x);
        let (u1, u2) = (
            update(&[3.0, 2.0], &[1.0, -2.0]),
            update(&[1.0, 6.0], &[3.0, 2.0]),
        );
        let r = Report::new();
        agg.add("c1", &ParamsView::parse(&u1).unwrap(), 1, &r)
            .unwrap();
        agg.add("c2", &ParamsView::parse(&u2).unwrap(), 3, &r)
            .unwrap();
        let mean = agg.finish(&[]);
        let end = s.end_round(1, &x, mean);
        // ȳ = (1·[3,2] + 3·[1,6]) / 4 = [1.5, 5]; x + 0.5·(ȳ − x) = [1.25, 3.5].
        assert_eq!(end.global.unwrap().get("w").unwrap().data(), &[1.25, 3.5]);
        // c = 0 + (1/N)·ΣΔcᵢ = ([1,−2] + [3,2]) / 4 = [1, 0].
        assert_eq!(s.control().unwrap().get("w").unwrap().data(), &[1.0, 0.0]);
        assert_eq!(end.metrics["control_norm"], 1.0);
        // Checkpointed and restored.
        let (json, tensors) = s.state().encode();
        let mut t = Scaffold::new(0.5).unwrap();
        t.restore(&json, tensors).unwrap();
        assert_eq!(t.control(), s.control());
    }

    #[test]
    fn updates_without_or_with_foreign_strategy_tensors_are_refused() {
        let mut s = Scaffold::new(1.0).unwrap();
        let x = set("", &[0.0, 0.0]);
        let mut agg = s.begin_round(1, &x);
        let r = Report::new();
        let plain = set("", &[1.0, 1.0]).to_safetensors_bytes();
        let err = agg.add("c1", &ParamsView::parse(&plain).unwrap(), 1, &r);
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("did not run SCAFFOLD"));
        let foreign = set("", &[1.0, 1.0]).to_safetensors_bytes_with(
            &format!("{STRATEGY_TENSOR_PREFIX}other/"),
            &set("", &[0.0, 0.0]),
        );
        assert!(agg
            .add("c2", &ParamsView::parse(&foreign).unwrap(), 1, &r)
            .is_err());
        let nan = update(&[1.0, 1.0], &[f32::NAN, 0.0]);
        assert!(matches!(
            agg.add("c3", &ParamsView::parse(&nan).unwrap(), 1, &r),
            Err(Error::NonFinite { .. })
        ));
        assert_eq!(agg.count(), 0);
        assert!(agg.finish(&[]).is_none());
        assert!(s.end_round(1, &x, None).global.is_none());
    }
}
