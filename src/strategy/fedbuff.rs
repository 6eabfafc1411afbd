//! FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"):
//! no round barrier. Every client trains on the newest global model it was sent; the server
//! buffers updates as they arrive and, every `K` of them, applies
//!
//! ```text
//! Δᵢ = yᵢ − x_{vᵢ}                  the client's change to the model version vᵢ it started from
//! s(τ) = 1/√(1 + τ)                 staleness weight, τ = (current version) − vᵢ
//! x ← x + η_g · Σ wᵢ·s(τᵢ)·Δᵢ / Σ wᵢ
//! ```
//!
//! with `wᵢ` the update's weight (samples, or 1 with `fedmq_args.weighting: uniform`; the paper's
//! plain `1/K` is the uniform case). A "round" of an asynchronous run is one such server update
//! (one model version): `comm_round` of them end the run. A client that reports gets the newest
//! model at once; slow clients keep training on older versions, and their updates count, weighted
//! down, up to `max_staleness` versions late (later ones are dropped). The round machine runs
//! this schedule ([`Strategy::buffered`]); the strategy keeps the models of the last
//! `max_staleness + 1` versions to take the differences from, so the server holds at most
//! `max_staleness + 3` models (those, the buffer, the current global).

use super::{ClientFailure, Error, Report, Result, RoundAggregate, RoundEnd, Strategy};
use crate::tensor::{ParamSet, ParamsView};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The asynchronous schedule a buffered strategy asks the round machine for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffered {
    /// Updates per server step (`K`).
    pub buffer: usize,
    /// Versions an update may lag behind and still count.
    pub max_staleness: u64,
}

/// Buffered asynchronous aggregation.
#[derive(Debug)]
pub struct FedBuff {
    schedule: Buffered,
    server_lr: f64,
    /// Global models of recent versions, to take each update's difference from.
    history: BTreeMap<u64, Arc<ParamSet>>,
}

impl FedBuff {
    /// FedBuff stepping every `buffer` updates with server learning rate `server_lr`, taking
    /// updates up to `max_staleness` versions late.
    ///
    /// # Errors
    /// A buffer of 0 or a server learning rate that is not > 0.
    pub fn new(
        buffer: usize,
        max_staleness: u64,
        server_lr: f64,
    ) -> std::result::Result<Self, String> {
        if buffer == 0 {
            return Err("the buffer must hold at least 1 update".into());
        }
        if !(server_lr.is_finite() && server_lr > 0.0) {
            return Err(format!("server learning rate {server_lr} must be > 0"));
        }
        Ok(Self {
            schedule: Buffered {
                buffer,
                max_staleness,
            },
            server_lr,
            history: BTreeMap::new(),
        })
    }
}

/// The staleness weight `s(τ) = 1/√(1 + τ)`.
pub fn staleness_weight(staleness: u64) -> f64 {
    1.0 / (1.0 + staleness as f64).sqrt()
}

impl Strategy for FedBuff {
    fn secure_aggregation(&self) -> std::result::Result<(), String> {
        Err(
            "FedBuff folds updates one at a time with staleness weights, but secure aggregation \
             unmasks only the sum of a whole round's cohort: use FedAvg, FedProx or the FedOpt \
             family, or turn secure aggregation off"
                .into(),
        )
    }

    fn name(&self) -> &'static str {
        "FedBuff"
    }

    fn buffered(&self) -> Option<Buffered> {
        Some(self.schedule)
    }

    fn begin_round(&mut self, round: u64, global: &ParamSet) -> Box<dyn RoundAggregate> {
        self.history.insert(round, Arc::new(global.clone()));
        let oldest = round.saturating_sub(self.schedule.max_staleness);
        self.history.retain(|&v, _| v >= oldest);
        Box::new(BufferAggregate {
            version: round,
            history: self.history.clone(),
            sum: global.zeros_like(),
            total_weight: 0.0,
            count: 0,
            max_staleness_seen: 0,
            staleness_sum: 0,
        })
    }

    fn end_round(
        &mut self,
        _round: u64,
        global: &ParamSet,
        aggregate: Option<ParamSet>,
    ) -> RoundEnd {
        let Some(step) = aggregate else {
            return RoundEnd::default();
        };
        let lr = self.server_lr as f32;
        let mut next = global.clone();
        for (x, d) in next.tensors_mut().zip(step.tensors()) {
            for (x, &d) in x.data_mut().iter_mut().zip(d.data()) {
                *x += lr * d;
            }
        }
        RoundEnd {
            global: Some(next),
            metrics: BTreeMap::new(),
        }
    }
}

/// The buffer of one server step: `Σ wᵢ·s(τᵢ)·Δᵢ` and `Σ wᵢ`.
struct BufferAggregate {
    version: u64,
    history: BTreeMap<u64, Arc<ParamSet>>,
    sum: ParamSet,
    total_weight: f64,
    count: usize,
    max_staleness_seen: u64,
    staleness_sum: u64,
}

impl BufferAggregate {
    fn fold(
        &mut self,
        base: u64,
        client: &str,
        update: &ParamsView<'_>,
        weight: u64,
    ) -> Result<()> {
        if weight == 0 {
            return Err(Error::ZeroWeight {
                client: client.to_string(),
            });
        }
        let Some(x) = self.history.get(&base).cloned() else {
            return Err(Error::Stale {
                client: client.to_string(),
                base,
                current: self.version,
            });
        };
        update.check_layout(&x).map_err(|e| Error::Layout {
            client: client.to_string(),
            detail: e.to_string(),
        })?;
        if let Some(t) = update
            .tensors()
            .iter()
            .find(|t| t.values().any(|v| !v.is_finite()))
        {
            return Err(Error::NonFinite {
                client: client.to_string(),
                tensor: t.name().to_string(),
            });
        }
        let staleness = self.version - base;
        let scale = (weight as f64 * staleness_weight(staleness)) as f32;
        for ((s, x), y) in self
            .sum
            .tensors_mut()
            .zip(x.tensors())
            .zip(update.tensors())
        {
            let x = x.data();
            let mut i = 0;
            y.zip_apply(s.data_mut(), |s, y| {
                *s += scale * (y - x[i]);
                i += 1;
            });
        }
        self.total_weight += weight as f64;
        self.count += 1;
        self.max_staleness_seen = self.max_staleness_seen.max(staleness);
        self.staleness_sum += staleness;
        Ok(())
    }
}

impl RoundAggregate for BufferAggregate {
    fn add(
        &mut self,
        client: &str,
        update: &ParamsView<'_>,
        num_samples: u64,
        _report: &Report,
    ) -> Result<()> {
        self.fold(self.version, client, update, num_samples)
    }

    fn add_stale(
        &mut self,
        base: u64,
        client: &str,
        update: &ParamsView<'_>,
        num_samples: u64,
        _report: &Report,
    ) -> Result<()> {
        if base > self.version {
            return Err(Error::Stale {
                client: client.to_string(),
                base,
                current: self.version,
            });
        }
        self.fold(base, client, update, num_samples)
    }

    fn count(&self) -> usize {
        self.count
    }

    fn metrics(&self) -> BTreeMap<String, f64> {
        if self.count == 0 {
            return BTreeMap::new();
        }
        BTreeMap::from([
            ("max_staleness".to_string(), self.max_staleness_seen as f64),
            (
                "mean_staleness".to_string(),
                self.staleness_sum as f64 / self.count as f64,
            ),
        ])
    }

    fn finish(self: Box<Self>, _failures: &[ClientFailure]) -> Option<ParamSet> {
        if self.count == 0 {
            return None;
        }
        let inv = (1.0 / self.total_weight) as f32;
        let mut step = self.sum;
        for t in step.tensors_mut() {
            for v in t.data_mut() {
                *v *= inv;
            }
        }
        Some(step)
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

    #[test]
    fn a_step_weights_stale_updates_down_as_computed_by_hand() {
        let mut s = FedBuff::new(2, 4, 1.0).unwrap();
        assert_eq!(
            s.buffered(),
            Some(Buffered {
                buffer: 2,
                max_staleness: 4
            })
        );
        // Version 1: x₁ = [0, 0]; version 2: x₂ = [1, 1].
        let _ = s.begin_round(1, &set(&[0.0, 0.0]));
        let x2 = set(&[1.0, 1.0]);
        let mut agg = s.begin_round(2, &x2);
        let r = Report::new();
        // A fresh update from x₂ (Δ = [2, 0], weight 1) and one that started from x₁
        // (Δ = [0, 4] − [0, 0] = [0, 4], τ = 1, s = 1/√2, weight 1).
        agg.add("c1", &ParamsView::of(&set(&[3.0, 1.0])), 1, &r)
            .unwrap();
        agg.add_stale(1, "c2", &ParamsView::of(&set(&[0.0, 4.0])), 1, &r)
            .unwrap();
        let m = agg.metrics();
        assert_eq!((m["max_staleness"], m["mean_staleness"]), (1.0, 0.5));
        let next = s.end_round(2, &x2, agg.finish(&[])).global.unwrap();
        // x₂ + ([2, 0] + [0, 4]/√2) / 2 = [2, 1 + √2].
        let got = next.get("w").unwrap().data();
        assert_eq!(got[0], 2.0);
        assert!((got[1] - (1.0 + 2f32.sqrt())).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn updates_beyond_the_staleness_bound_or_from_the_future_are_refused() {
        let mut s = FedBuff::new(1, 1, 1.0).unwrap();
        for v in 1..=3 {
            let _ = s.begin_round(v, &set(&[v as f32]));
        }
        let mut agg = s.begin_round(4, &set(&[4.0]));
        let r = Report::new();
        let u = set(&[1.0]);
        assert!(matches!(
            agg.add_stale(2, "c1", &ParamsView::of(&u), 1, &r),
            Err(Error::Stale { .. })
        ));
        assert!(agg.add_stale(5, "c1", &ParamsView::of(&u), 1, &r).is_err());
        assert!(agg.add_stale(3, "c1", &ParamsView::of(&u), 1, &r).is_ok());
        assert_eq!(agg.count(), 1);
    }

    #[test]
    fn staleness_weight_is_the_papers() {
        assert_eq!(staleness_weight(0), 1.0);
        assert_eq!(staleness_weight(3), 0.5);
    }
}
