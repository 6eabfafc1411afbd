//! FoolsGold (Fung, Yoon, Beschastnikh 2020, "The Limitations of Federated
//! Learning in Sybil Settings", RAID).

use std::collections::{BTreeMap, BTreeSet};

use super::{
    axpy, check_positive, check_updates, dot, norm_sq, to_f32, Outcome, RobustError, Update,
};

/// FoolsGold sybil-resistant aggregation (Fung, Yoon & Beschastnikh 2020).
///
/// Keeps, per client name, the running sum of every delta it has sent
/// (its *history*). Sybils pushing the same poisoned objective have
/// unusually similar histories and receive a learning rate near zero.
///
/// The rule, per round, over the histories `Hᵢ` of this round's clients
/// (the paper's Algorithm 1 without the optional feature-importance
/// weighting):
///
/// 1. `csᵢⱼ = cos(Hᵢ, Hⱼ)` for `i ≠ j` (0 if either history is zero);
/// 2. `vᵢ = maxⱼ≠ᵢ csᵢⱼ`;
/// 3. pardoning: `csᵢⱼ ← csᵢⱼ · vᵢ / vⱼ` whenever `vⱼ > vᵢ` (applied only
///    when `vᵢ > 0`, so the factor lies in `(0, 1)`; with `vᵢ ≤ 0` the row is
///    already non-positive and gets `αᵢ = 1` either way);
/// 4. `αᵢ = 1 − maxⱼ≠ᵢ csᵢⱼ`, clipped to `[0, 1]`; values below `1e-9`
///    are set to 0, since they are floating-point rounding of `cos = 1`
///    (without this, step 5 would blow rounding noise up to 1 when every
///    client is a sybil);
/// 5. `αᵢ ← αᵢ / maxₖ αₖ`;
/// 6. logit: `αᵢ ← κ (ln(αᵢ / (1 − αᵢ)) + 0.5)` clipped to `[0, 1]`, with
///    `αᵢ = 1 → 1` and `αᵢ = 0 → 0` (κ = 1 by default);
/// 7. aggregate `= Σ αᵢ Δᵢ / Σ αᵢ` over this round's deltas.
///
/// Sample weights are ignored (FoolsGold weights clients by `α` only). A
/// round with a single client gives it `α = 1`. If every `α` is 0 (for
/// example, all clients are identical), the zero delta is returned and
/// `Outcome::degenerate` is set.
///
/// Memory: one `f32` vector of length `P` per client ever seen (the
/// history), plus `O(n² + P)` per call (the similarity matrix and one `f64`
/// accumulator). Histories are stored in `f32`, as in the checkpoint format.
#[derive(Debug, Clone, PartialEq)]
pub struct FoolsGold {
    history: BTreeMap<String, Vec<f32>>,
    kappa: f64,
}

impl Default for FoolsGold {
    fn default() -> Self {
        Self::new()
    }
}

impl FoolsGold {
    /// A FoolsGold aggregator with empty history and `κ = 1`.
    pub fn new() -> Self {
        FoolsGold {
            history: BTreeMap::new(),
            kappa: 1.0,
        }
    }

    /// A FoolsGold aggregator with empty history and confidence parameter
    /// `kappa` (the logit's scale, the paper's κ). Errors unless `kappa` is
    /// finite and `> 0`.
    pub fn with_kappa(kappa: f64) -> Result<Self, RobustError> {
        check_positive("kappa", kappa)?;
        Ok(FoolsGold {
            history: BTreeMap::new(),
            kappa,
        })
    }

    /// Restores an aggregator from a checkpointed history (as returned by
    /// [`FoolsGold::history`]), with `κ = 1`. Histories of different lengths
    /// are accepted here; a client's history is checked against the delta
    /// length when that client next takes part.
    pub fn from_history(history: BTreeMap<String, Vec<f32>>) -> Self {
        FoolsGold {
            history,
            kappa: 1.0,
        }
    }

    /// The per-client sums of past deltas, for checkpointing.
    pub fn history(&self) -> &BTreeMap<String, Vec<f32>> {
        &self.history
    }

    /// Consumes the aggregator and returns its history.
    pub fn into_history(self) -> BTreeMap<String, Vec<f32>> {
        self.history
    }

    /// The confidence parameter κ.
    pub fn kappa(&self) -> f64 {
        self.kappa
    }

    /// Forgets a client's history (e.g. when it leaves the federation);
    /// returns whether it was known.
    pub fn forget(&mut self, client: &str) -> bool {
        self.history.remove(client).is_some()
    }

    /// Adds each delta to its client's history, then aggregates this
    /// round's deltas with the FoolsGold weights (see the type's
    /// documentation for the rule). `clients[i]` names the sender of
    /// `updates[i]`.
    ///
    /// Outcome: `scores` (each client's final learning rate `αᵢ ∈ [0, 1]`),
    /// `weights` (`αᵢ / Σ α`; empty if degenerate), `selected` (clients with
    /// `αᵢ > 0`), `degenerate` (every `α` was 0 and the zero delta was
    /// returned).
    ///
    /// Errors (nothing is modified on error): no updates, deltas of
    /// different lengths, [`RobustError::ClientCountMismatch`],
    /// [`RobustError::DuplicateClient`], [`RobustError::HistoryLengthMismatch`].
    ///
    /// Non-finite deltas poison that client's history; a NaN `α` is treated
    /// as 0. No panic.
    ///
    /// Memory: see the type; `O(n² + P)` extra per call.
    pub fn aggregate(
        &mut self,
        clients: &[&str],
        updates: &[Update<'_>],
    ) -> Result<(Vec<f32>, Outcome), RobustError> {
        if clients.len() != updates.len() {
            return Err(RobustError::ClientCountMismatch {
                clients: clients.len(),
                updates: updates.len(),
            });
        }
        let p = check_updates(updates)?;
        let mut seen = BTreeSet::new();
        for &c in clients {
            if !seen.insert(c) {
                return Err(RobustError::DuplicateClient {
                    client: c.to_string(),
                });
            }
            if let Some(h) = self.history.get(c) {
                if h.len() != p {
                    return Err(RobustError::HistoryLengthMismatch {
                        client: c.to_string(),
                        expected: p,
                        found: h.len(),
                    });
                }
            }
        }

        // 0. Accumulate histories.
        for (&c, u) in clients.iter().zip(updates) {
            match self.history.get_mut(c) {
                Some(h) => {
                    for (hv, &d) in h.iter_mut().zip(u.delta) {
                        *hv += d;
                    }
                }
                None => {
                    self.history.insert(c.to_string(), u.delta.to_vec());
                }
            }
        }
        let hist: Vec<&[f32]> = clients
            .iter()
            .map(|c| self.history.get(*c).map_or(&[][..], |h| h.as_slice()))
            .collect();

        let alpha = foolsgold_alpha(&hist, self.kappa);

        let total: f64 = alpha.iter().sum();
        let mut acc = vec![0.0f64; p];
        let mut outcome = Outcome {
            selected: super::positive_indices(&alpha),
            ..Outcome::default()
        };
        if total > 0.0 && total.is_finite() {
            for (u, &a) in updates.iter().zip(&alpha) {
                if a > 0.0 {
                    axpy(&mut acc, a / total, u.delta);
                }
            }
            outcome.weights = alpha.iter().map(|a| a / total).collect();
        } else {
            outcome.degenerate = true;
        }
        outcome.scores = alpha;
        Ok((to_f32(&acc), outcome))
    }
}

/// `1 − cos` below this is floating-point rounding of identical directions
/// (the cosine is accumulated in `f64` over `P` terms), not a real
/// difference; such `α` is set to 0 before normalisation.
const ALPHA_EPS: f64 = 1e-9;

/// Computes the FoolsGold learning rates from the histories of this round's
/// clients (steps 1–6 of the rule). `O(n²)` memory.
fn foolsgold_alpha(hist: &[&[f32]], kappa: f64) -> Vec<f64> {
    let n = hist.len();
    let norms: Vec<f64> = hist.iter().map(|h| norm_sq(h).sqrt()).collect();
    let mut cs = vec![0.0f64; n * n];
    for i in 0..n {
        for j in (i + 1)..n {
            let denom = norms[i] * norms[j];
            let c = if denom > 0.0 {
                (dot(hist[i], hist[j]) / denom).clamp(-1.0, 1.0)
            } else {
                0.0
            };
            cs[i * n + j] = c;
            cs[j * n + i] = c;
        }
    }
    let row_max = |cs: &[f64], i: usize| {
        (0..n)
            .filter(|&j| j != i)
            .map(|j| cs[i * n + j])
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let v: Vec<f64> = (0..n).map(|i| row_max(&cs, i)).collect();
    // Pardoning.
    for i in 0..n {
        if v[i] > 0.0 {
            for j in 0..n {
                if j != i && v[j] > v[i] {
                    cs[i * n + j] *= v[i] / v[j];
                }
            }
        }
    }
    let mut alpha: Vec<f64> = (0..n)
        .map(|i| {
            let a = 1.0 - row_max(&cs, i);
            // NaN (non-finite input) and rounding noise around cos = 1 count as 0.
            if a.is_nan() || a < ALPHA_EPS {
                0.0
            } else {
                a.min(1.0)
            }
        })
        .collect();
    let max = alpha.iter().copied().fold(0.0f64, f64::max);
    if max <= 0.0 {
        return vec![0.0; n];
    }
    for a in alpha.iter_mut() {
        *a /= max;
        *a = if *a >= 1.0 {
            1.0
        } else if *a <= 0.0 {
            0.0
        } else {
            let l = kappa * ((*a / (1.0 - *a)).ln() + 0.5);
            if l.is_nan() {
                0.0
            } else {
                l.clamp(0.0, 1.0)
            }
        };
    }
    alpha
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{ups, Rng};
    use super::*;

    const NAMES: [&str; 8] = ["h0", "h1", "h2", "h3", "h4", "s0", "s1", "s2"];

    fn round(rng: &mut Rng) -> Vec<Vec<f32>> {
        let mut d: Vec<Vec<f32>> = (0..5).map(|_| rng.vec(64, 1.0)).collect();
        let sybil = rng.vec(64, 1.0);
        d.extend(std::iter::repeat_n(sybil, 3));
        d
    }

    #[test]
    fn sybils_get_zero_weight_and_history_accumulates() {
        let mut rng = Rng::new(42);
        let mut fg = FoolsGold::new();
        let d1 = round(&mut rng);
        let (agg, o) = fg.aggregate(&NAMES, &ups(&d1, 1.0)).unwrap();
        for i in 5..8 {
            assert!(o.scores[i] < 1e-9, "sybil {i}: {}", o.scores[i]);
        }
        for i in 0..5 {
            assert!(o.scores[i] > 0.0, "honest {i}: {}", o.scores[i]);
        }
        assert_eq!(o.selected, vec![0, 1, 2, 3, 4]);
        assert!(!o.degenerate);
        assert!((o.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // The aggregate is the α-weighted mean of the honest deltas.
        for (j, &a) in agg.iter().enumerate() {
            let expect: f64 = (0..5).map(|i| o.weights[i] * f64::from(d1[i][j])).sum();
            assert!((f64::from(a) - expect).abs() < 1e-5);
        }

        let d2 = round(&mut rng);
        let (_, o2) = fg.aggregate(&NAMES, &ups(&d2, 1.0)).unwrap();
        for (k, name) in NAMES.iter().enumerate() {
            let h = &fg.history()[*name];
            for j in 0..64 {
                assert!((h[j] - (d1[k][j] + d2[k][j])).abs() < 1e-6);
            }
        }
        for i in 5..8 {
            assert!(o2.scores[i] < 1e-9);
        }
        for i in 0..5 {
            assert!(o2.scores[i] > 0.0);
        }
    }

    #[test]
    fn checkpoint_round_trip_and_partial_rounds() {
        let mut rng = Rng::new(5);
        let mut fg = FoolsGold::new();
        let d = round(&mut rng);
        fg.aggregate(&NAMES, &ups(&d, 1.0)).unwrap();
        let mut restored = FoolsGold::from_history(fg.history().clone());
        assert_eq!(restored, fg);
        // A round with only some clients leaves the others' history alone.
        let d3 = vec![rng.vec(64, 1.0), rng.vec(64, 1.0)];
        restored.aggregate(&["h0", "new"], &ups(&d3, 1.0)).unwrap();
        assert_eq!(restored.history()["h1"], fg.history()["h1"]);
        assert_eq!(restored.history()["new"], d3[1]);
        assert_eq!(restored.history().len(), 9);
        assert!(restored.forget("new"));
        assert_eq!(restored.into_history().len(), 8);
    }

    #[test]
    fn single_client_and_all_identical() {
        let mut fg = FoolsGold::new();
        let a = vec![1.0f32, 2.0];
        let (agg, o) = fg
            .aggregate(&["a"], &ups(std::slice::from_ref(&a), 1.0))
            .unwrap();
        assert_eq!(agg, a);
        assert_eq!(o.scores, vec![1.0]);
        let mut fg = FoolsGold::new();
        let d = vec![a.clone(), a.clone(), a];
        let (agg, o) = fg.aggregate(&["x", "y", "z"], &ups(&d, 1.0)).unwrap();
        assert_eq!(agg, vec![0.0, 0.0]);
        assert!(o.degenerate);
        assert!(o.selected.is_empty() && o.weights.is_empty());
    }

    #[test]
    fn errors_leave_state_untouched() {
        let mut fg = FoolsGold::new();
        let a = vec![1.0f32, 2.0];
        let us = ups(std::slice::from_ref(&a), 1.0);
        assert!(matches!(
            fg.aggregate(&["a", "b"], &us),
            Err(RobustError::ClientCountMismatch { .. })
        ));
        let d = vec![a.clone(), a.clone()];
        assert!(matches!(
            fg.aggregate(&["a", "a"], &ups(&d, 1.0)),
            Err(RobustError::DuplicateClient { .. })
        ));
        assert!(fg.history().is_empty());
        fg.aggregate(&["a"], &us).unwrap();
        let short = vec![1.0f32];
        assert!(matches!(
            fg.aggregate(&["b", "a"], &ups(&[short.clone(), short], 1.0)),
            Err(RobustError::HistoryLengthMismatch { .. })
        ));
        assert!(!fg.history().contains_key("b"));
        assert!(fg.aggregate(&[], &[]).is_err());
        assert!(FoolsGold::with_kappa(0.0).is_err());
        assert_eq!(FoolsGold::with_kappa(2.0).unwrap().kappa(), 2.0);
    }
}
