//! Norm clipping: norm-difference clipping (Sun, Kairouz, Suresh, McMahan
//! 2019, "Can You Really Backdoor Federated Learning?") and centered
//! clipping (Karimireddy, He, Jaggi 2021, "Learning from History for
//! Byzantine Robust Optimization", ICML).

use super::{
    axpy, check_positive, check_updates, dist_sq_f64, norm_sq, normalized_weights,
    positive_indices, to_f32, Outcome, RobustError, Update,
};

/// Scales `delta` in place so that its L2 norm is at most `bound`; returns
/// whether it was scaled. This is the per-update step of norm-difference
/// clipping (Sun et al. 2019): `Δ ← Δ · min(1, bound / ‖Δ‖)`.
///
/// The norm is computed in `f64`; after scaling, the norm equals `bound` up
/// to `f32` rounding (a relative error of about `1e-7`).
///
/// This function cannot fail. Out-of-range bounds behave as follows (use
/// [`clipped_mean`] for a validated bound): `bound <= 0` zeroes any nonzero
/// delta; `bound = +inf` never clips; a NaN bound never clips (returns
/// `false`). A delta containing NaN is left untouched (returns `false`); one
/// containing an infinity has infinite norm and is scaled by 0 (`inf · 0`
/// gives NaN entries). An empty or zero delta is never clipped.
///
/// Memory: `O(1)` extra.
pub fn norm_clip(delta: &mut [f32], bound: f64) -> bool {
    if bound.is_nan() {
        return false;
    }
    let bound = bound.max(0.0);
    let norm = norm_sq(delta).sqrt();
    if norm > bound {
        let scale = (bound / norm) as f32;
        for v in delta.iter_mut() {
            *v *= scale;
        }
        true
    } else {
        false
    }
}

/// Norm-difference clipping followed by the sample-weighted mean (Sun et al.
/// 2019): every update's delta is clipped to L2 norm at most `bound`, i.e.
/// `Δ̃ᵢ = Δᵢ · min(1, bound / ‖Δᵢ‖)`, and the result is `Σ wᵢ Δ̃ᵢ / Σ wᵢ`.
/// Deltas are not copied: the clipping factor is folded into the weight.
///
/// Outcome: `weights` (the normalised sample weights), `scores` (each
/// update's clipping factor `min(1, bound/‖Δᵢ‖)`, 1 for a zero delta),
/// `clipped` (how many updates were scaled down), `selected` (updates with
/// positive weight).
///
/// Errors: no updates, deltas of different lengths, invalid weights or zero
/// total weight, `bound` not finite and `> 0`.
///
/// Memory: `O(P + n)` extra (one `f64` accumulator).
pub fn clipped_mean(
    updates: &[Update<'_>],
    bound: f64,
) -> Result<(Vec<f32>, Outcome), RobustError> {
    let p = check_updates(updates)?;
    check_positive("bound", bound)?;
    let weights = normalized_weights(updates)?;
    let mut acc = vec![0.0f64; p];
    let mut scores = Vec::with_capacity(updates.len());
    let mut clipped = 0;
    for (u, &w) in updates.iter().zip(&weights) {
        let norm = norm_sq(u.delta).sqrt();
        let factor = if norm > bound {
            clipped += 1;
            bound / norm
        } else {
            1.0
        };
        scores.push(factor);
        if w > 0.0 {
            axpy(&mut acc, w * factor, u.delta);
        }
    }
    let outcome = Outcome {
        selected: positive_indices(&weights),
        weights,
        scores,
        clipped,
        ..Outcome::default()
    };
    Ok((to_f32(&acc), outcome))
}

/// Centered clipping (Karimireddy, He & Jaggi 2021).
///
/// Starting from `v = center` (typically the previous round's aggregate,
/// i.e. the server momentum, or zeros), repeat `iters` times:
/// `v ← v + Σ wᵢ · clip(Δᵢ − v, τ)`, where `clip(x, τ) = x · min(1, τ/‖x‖)`.
/// The weights `wᵢ` are the updates' **normalised sample weights** (the paper
/// states the rule with uniform weights `1/n`; pass equal weights to get
/// it). One update can therefore move `v` by at most `τ · wᵢ` per iteration.
/// The paper finds one iteration (`iters = 1`) sufficient when `center` is
/// the momentum; `iters = 0` returns `center` unchanged.
///
/// Outcome: `weights` (normalised sample weights), `iterations` (= `iters`),
/// `clipped` (number of updates clipped in the **last** iteration),
/// `scores` (each update's clipping factor `min(1, τ/‖Δᵢ − v‖)` in the last
/// iteration), `selected` (updates with positive weight).
///
/// Errors: no updates, deltas of different lengths,
/// [`RobustError::ReferenceLengthMismatch`] if `center` has another length,
/// invalid weights or zero total weight, `tau` not finite and `> 0`.
///
/// Memory: `O(P + n)` extra (the iterate and one step accumulator, both
/// `f64`); time `O(n·P)` per iteration.
pub fn centered_clip(
    updates: &[Update<'_>],
    center: &[f32],
    tau: f64,
    iters: usize,
) -> Result<(Vec<f32>, Outcome), RobustError> {
    let p = check_updates(updates)?;
    if center.len() != p {
        return Err(RobustError::ReferenceLengthMismatch {
            name: "center",
            expected: p,
            found: center.len(),
        });
    }
    check_positive("tau", tau)?;
    let weights = normalized_weights(updates)?;

    let mut v: Vec<f64> = center.iter().map(|&x| f64::from(x)).collect();
    let mut step = vec![0.0f64; p];
    let mut scores = vec![1.0f64; updates.len()];
    let mut clipped = 0;
    for _ in 0..iters {
        step.iter_mut().for_each(|s| *s = 0.0);
        clipped = 0;
        for ((u, &w), score) in updates.iter().zip(&weights).zip(scores.iter_mut()) {
            let dist = dist_sq_f64(&v, u.delta).sqrt();
            let factor = if dist > tau {
                clipped += 1;
                tau / dist
            } else {
                1.0
            };
            *score = factor;
            let c = w * factor;
            if c > 0.0 {
                // step += c · (Δᵢ − v)
                for ((s, &x), &vj) in step.iter_mut().zip(u.delta).zip(&v) {
                    *s += c * (f64::from(x) - vj);
                }
            }
        }
        for (vj, s) in v.iter_mut().zip(&step) {
            *vj += s;
        }
    }
    let outcome = Outcome {
        selected: positive_indices(&weights),
        weights,
        scores,
        iterations: iters,
        clipped,
        ..Outcome::default()
    };
    Ok((to_f32(&v), outcome))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{l2, ups, Rng};
    use super::super::weighted_mean;
    use super::*;

    #[test]
    fn norm_clip_scales_to_bound_keeping_direction() {
        let mut d = vec![6.0f32, 8.0]; // norm 10
        assert!(norm_clip(&mut d, 2.0));
        assert!((l2(&d) - 2.0).abs() < 1e-6);
        assert!((d[0] - 1.2).abs() < 1e-6 && (d[1] - 1.6).abs() < 1e-6);
        let mut small = vec![0.3f32, -0.4];
        assert!(!norm_clip(&mut small, 2.0));
        assert_eq!(small, vec![0.3, -0.4]);
        // Exactly at the bound: untouched.
        let mut at = vec![6.0f32, 8.0];
        assert!(!norm_clip(&mut at, 10.0));
        assert_eq!(at, vec![6.0, 8.0]);
    }

    #[test]
    fn norm_clip_odd_bounds_no_panic() {
        let mut d = vec![1.0f32, 1.0];
        assert!(!norm_clip(&mut d, f64::NAN));
        assert!(!norm_clip(&mut d, f64::INFINITY));
        assert!(norm_clip(&mut d, -1.0));
        assert_eq!(d, vec![0.0, 0.0]);
        assert!(!norm_clip(&mut [], 1.0));
        let mut inf = vec![f32::INFINITY, 1.0];
        assert!(norm_clip(&mut inf, 1.0));
    }

    #[test]
    fn clipped_mean_known_value() {
        let a = [6.0f32, 8.0]; // norm 10 -> (0.6, 0.8)
        let b = [0.5f32, 0.0]; // untouched
        let us = [Update::new(&a, 1.0), Update::new(&b, 3.0)];
        let (m, o) = clipped_mean(&us, 1.0).unwrap();
        assert!((m[0] - (0.25 * 0.6 + 0.75 * 0.5)).abs() < 1e-6);
        assert!((m[1] - 0.25 * 0.8).abs() < 1e-6);
        assert_eq!(o.clipped, 1);
        assert!((o.scores[0] - 0.1).abs() < 1e-12 && o.scores[1] == 1.0);
        assert!(clipped_mean(&us, 0.0).is_err());
        assert!(clipped_mean(&us, f64::INFINITY).is_err());
    }

    #[test]
    fn centered_clip_large_tau_is_weighted_mean() {
        let mut rng = Rng::new(11);
        let d: Vec<Vec<f32>> = (0..5).map(|_| rng.vec(8, 3.0)).collect();
        let us: Vec<Update<'_>> = d
            .iter()
            .enumerate()
            .map(|(i, x)| Update::new(x, 1.0 + i as f64))
            .collect();
        let center = rng.vec(8, 1.0);
        let (v, o) = centered_clip(&us, &center, 1e12, 1).unwrap();
        let (mean, _) = weighted_mean(&us).unwrap();
        for (a, b) in v.iter().zip(&mean) {
            assert!((a - b).abs() < 1e-5);
        }
        assert_eq!(o.clipped, 0);
        assert_eq!(o.iterations, 1);
    }

    #[test]
    fn centered_clip_bounds_outlier_influence() {
        let honest = vec![0.0f32; 4];
        let outlier = vec![1e6f32, 0.0, 0.0, 0.0];
        let mut d = vec![honest; 9];
        d.push(outlier);
        let us = ups(&d, 1.0);
        let center = vec![0.0f32; 4];
        let tau = 0.5;
        let (v, o) = centered_clip(&us, &center, tau, 1).unwrap();
        let w_out = 0.1;
        assert!(l2(&v) <= tau * w_out * (1.0 + 1e-6), "{v:?}");
        assert!((l2(&v) - tau * w_out).abs() < 1e-6);
        assert_eq!(o.clipped, 1);
        // More iterations: each moves v by at most τ·w_out more.
        let (v3, _) = centered_clip(&us, &center, tau, 3).unwrap();
        assert!(l2(&v3) <= 3.0 * tau * w_out * (1.0 + 1e-6));
    }

    #[test]
    fn centered_clip_errors_and_zero_iters() {
        let d = vec![vec![1.0f32, 2.0]];
        let us = ups(&d, 1.0);
        assert!(matches!(
            centered_clip(&us, &[0.0], 1.0, 1),
            Err(RobustError::ReferenceLengthMismatch { name: "center", .. })
        ));
        assert!(centered_clip(&us, &[0.0, 0.0], 0.0, 1).is_err());
        let (v, _) = centered_clip(&us, &[5.0, 6.0], 1.0, 0).unwrap();
        assert_eq!(v, vec![5.0, 6.0]);
    }
}
