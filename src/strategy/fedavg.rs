//! FedAvg (McMahan et al. 2017): the new global model is the sample-weighted mean of the clients'
//! trained models.

use super::{ClientFailure, Error, Report, Result, RoundAggregate, Strategy};
use crate::tensor::{ParamSet, ParamsView};
use std::collections::BTreeMap;

/// Sample-weighted federated averaging.
#[derive(Debug, Default, Clone)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn secure_aggregation(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "FedAvg"
    }

    fn begin_round(&mut self, _round: u64, global: &ParamSet) -> Box<dyn RoundAggregate> {
        Box::new(StreamingMean::new(global))
    }
}

/// Running weighted mean over parameter sets: O(model) memory whatever the number of updates.
///
/// Design: the mean is updated in place, `m += (w / W) · (x − m)` with `W` the total weight so
/// far, instead of summing `w · x` and dividing at the end. The result is the same weighted mean,
/// but intermediate values stay at the scale of the parameters, so f32 accumulation loses no more
/// precision with 1,000 clients than with 2 and no f64 copy of the model is needed.
///
/// It also measures how far the clients moved: the weighted mean of `‖x − global‖₂` over the
/// updates, the round metric `update_distance` (what FedProx's proximal term shrinks).
pub struct StreamingMean {
    mean: ParamSet,
    global: ParamSet,
    total_weight: f64,
    distance_sum: f64,
    count: usize,
}

impl StreamingMean {
    /// An empty mean with the layout of `global`, the model the round's clients start from.
    pub fn new(global: &ParamSet) -> Self {
        Self {
            mean: global.zeros_like(),
            global: global.clone(),
            total_weight: 0.0,
            distance_sum: 0.0,
            count: 0,
        }
    }
}

impl RoundAggregate for StreamingMean {
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
        super::check_update(&self.global, client, update)?;
        let mut sq = 0f64;
        for (g, x) in self.global.tensors().iter().zip(update.tensors()) {
            for (x, &g) in x.values().zip(g.data()) {
                let d = f64::from(x - g);
                sq += d * d;
            }
        }
        self.distance_sum += num_samples as f64 * sq.sqrt();
        self.total_weight += num_samples as f64;
        let frac = (num_samples as f64 / self.total_weight) as f32;
        // Both are sorted by name and have the same layout (checked above).
        for (m, x) in self.mean.tensors_mut().zip(update.tensors()) {
            x.zip_apply(m.data_mut(), |m, x| *m += frac * (x - *m));
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
        BTreeMap::from([(
            "update_distance".to_string(),
            self.distance_sum / self.total_weight,
        )])
    }

    fn finish(self: Box<Self>, _failures: &[ClientFailure]) -> Option<ParamSet> {
        (self.count > 0).then_some(self.mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::NamedTensor;
    use proptest::{prop_assert, proptest};

    const NONE: Report = Report::new();

    fn params(a: Vec<f32>, b: Vec<f32>) -> ParamSet {
        let n = a.len();
        ParamSet::new(vec![
            NamedTensor::new("a.weight", vec![n], a).unwrap(),
            NamedTensor::new("b.bias", vec![b.len()], b).unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn weighted_mean_of_two() {
        let g = params(vec![0.0; 2], vec![0.0]);
        let mut agg = FedAvg.begin_round(1, &g);
        agg.add(
            "c1",
            &ParamsView::of(&params(vec![1.0, 2.0], vec![10.0])),
            1,
            &NONE,
        )
        .unwrap();
        agg.add(
            "c2",
            &ParamsView::of(&params(vec![4.0, 8.0], vec![40.0])),
            2,
            &NONE,
        )
        .unwrap();
        let m = agg.finish(&[]).unwrap();
        // (1·1 + 2·4)/3 = 3, (1·2 + 2·8)/3 = 6, (10 + 80)/3 = 30
        assert_eq!(m.get("a.weight").unwrap().data(), &[3.0, 6.0]);
        assert_eq!(m.get("b.bias").unwrap().data(), &[30.0]);
    }

    #[test]
    fn no_updates_keeps_the_old_model() {
        let g = params(vec![1.0], vec![1.0]);
        let agg = FedAvg.begin_round(1, &g);
        assert!(agg.finish(&[]).is_none());
    }

    #[test]
    fn bad_updates_are_rejected_and_leave_the_mean_unchanged() {
        let g = params(vec![0.0; 2], vec![0.0]);
        let mut agg = FedAvg.begin_round(1, &g);
        agg.add(
            "c1",
            &ParamsView::of(&params(vec![1.0, 1.0], vec![1.0])),
            5,
            &NONE,
        )
        .unwrap();
        let wrong_shape = params(vec![1.0; 3], vec![1.0]);
        assert!(matches!(
            agg.add("c2", &ParamsView::of(&wrong_shape), 5, &NONE),
            Err(Error::Layout { .. })
        ));
        let nan = params(vec![f32::NAN, 1.0], vec![1.0]);
        assert!(matches!(
            agg.add("c3", &ParamsView::of(&nan), 5, &NONE),
            Err(Error::NonFinite { .. })
        ));
        assert!(matches!(
            agg.add(
                "c4",
                &ParamsView::of(&params(vec![9.0; 2], vec![9.0])),
                0,
                &NONE
            ),
            Err(Error::ZeroWeight { .. })
        ));
        assert_eq!(agg.count(), 1);
        let m = agg.finish(&[]).unwrap();
        assert_eq!(m.get("a.weight").unwrap().data(), &[1.0, 1.0]);
    }

    #[test]
    fn seeded_selection_is_deterministic_and_distinct() {
        use rand::SeedableRng;
        let avail: Vec<String> = (1..=20).map(|i| format!("c{i}")).collect();
        let pick = |seed| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            FedAvg.configure_train(1, &avail, 5, &mut rng)
        };
        assert_eq!(pick(7), pick(7));
        let p = pick(7);
        assert_eq!(p.len(), 5);
        let mut d = p.clone();
        d.dedup();
        assert_eq!(d.len(), 5);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        assert_eq!(FedAvg.configure_train(1, &avail[..3], 5, &mut rng).len(), 3);
    }

    proptest! {
        #[test]
        fn mean_of_identical_updates_is_that_update(
            x in proptest::collection::vec(-1e3f32..1e3, 1..16),
            weights in proptest::collection::vec(1u64..10_000, 1..12),
        ) {
            let u = params(x.clone(), vec![0.5]);
            let mut agg = FedAvg.begin_round(1, &u.zeros_like());
            for (i, w) in weights.iter().enumerate() {
                agg.add(&format!("c{i}"), &ParamsView::of(&u), *w, &NONE).unwrap();
            }
            let m = agg.finish(&[]).unwrap();
            for (a, b) in m.get("a.weight").unwrap().data().iter().zip(&x) {
                prop_assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
            }
        }

        #[test]
        fn mean_is_permutation_invariant(
            xs in proptest::collection::vec((proptest::collection::vec(-10f32..10.0, 4), 1u64..100), 2..8),
        ) {
            let g = params(vec![0.0; 4], vec![0.0]);
            let run = |order: &[usize]| {
                let mut agg = FedAvg.begin_round(1, &g);
                for &i in order {
                    agg.add(&format!("c{i}"), &ParamsView::of(&params(xs[i].0.clone(), vec![1.0])), xs[i].1, &NONE).unwrap();
                }
                agg.finish(&[]).unwrap()
            };
            let fwd: Vec<usize> = (0..xs.len()).collect();
            let rev: Vec<usize> = fwd.iter().rev().copied().collect();
            let (a, b) = (run(&fwd), run(&rev));
            // And both equal the direct weighted mean.
            let total: f64 = xs.iter().map(|x| x.1 as f64).sum();
            for j in 0..4 {
                let direct: f64 = xs.iter().map(|x| x.0[j] as f64 * x.1 as f64).sum::<f64>() / total;
                let (ra, rb) = (a.get("a.weight").unwrap().data()[j], b.get("a.weight").unwrap().data()[j]);
                prop_assert!((ra as f64 - direct).abs() < 1e-4, "{ra} vs {direct}");
                prop_assert!((rb as f64 - direct).abs() < 1e-4, "{rb} vs {direct}");
            }
        }
    }
}
