//! Geometric median via the smoothed Weiszfeld algorithm — Robust Federated
//! Aggregation (RFA; Pillutla, Kakade, Harchaoui 2022, "Robust Aggregation
//! for Federated Learning", IEEE Transactions on Signal Processing).

use super::{
    check_non_negative, check_positive, check_updates, dist_sq_f64, normalized_weights,
    positive_indices, to_f32, Outcome, RobustError, Update,
};

/// Weighted geometric median by the smoothed Weiszfeld algorithm (RFA,
/// Pillutla, Kakade & Harchaoui 2022).
///
/// With `αᵢ` the normalised sample weights, the geometric median minimises
/// `g(z) = Σ αᵢ ‖z − Δᵢ‖`. Starting from the weighted mean, each iteration
/// sets `z ← Σ βᵢ Δᵢ / Σ βᵢ` with `βᵢ = αᵢ / max(ν, ‖z − Δᵢ‖)`, where `ν =
/// eps_smoothing > 0` keeps the step defined when `z` hits an update. The
/// loop stops when the relative change of the objective,
/// `|g_prev − g_new| ≤ tol · g_new`, or after `max_iter` iterations
/// (`max_iter = 0` returns the weighted mean). It also stops at once if the
/// objective is exactly 0 (all updates with positive weight coincide).
///
/// Robust to a minority of updates (less than half the total weight)
/// placed anywhere.
///
/// Outcome: `iterations` (Weiszfeld steps taken), `converged` (whether the
/// tolerance was met), `objective` (`g(z)` at the returned point, computed
/// in `f64`), `weights` (each update's effective weight `βᵢ / Σ β` in the
/// last step, or `αᵢ` if no step was taken), `selected` (updates with
/// positive weight).
///
/// Errors: no updates, deltas of different lengths, invalid weights or zero
/// total weight, `eps_smoothing` not finite and `> 0`, `tol` not finite and
/// `>= 0`.
///
/// Non-finite deltas make the result NaN; no panic.
///
/// Memory: `O(P + n)` extra (two `f64` vectors of length `P`, the current
/// and the next iterate, plus `O(n)` distances); time `O(n·P)` per iteration.
pub fn geometric_median(
    updates: &[Update<'_>],
    eps_smoothing: f64,
    tol: f64,
    max_iter: usize,
) -> Result<(Vec<f32>, Outcome), RobustError> {
    let p = check_updates(updates)?;
    check_positive("eps_smoothing", eps_smoothing)?;
    check_non_negative("tol", tol)?;
    let alpha = normalized_weights(updates)?;

    // Start from the weighted mean.
    let mut z = vec![0.0f64; p];
    for (u, &a) in updates.iter().zip(&alpha) {
        if a > 0.0 {
            super::axpy(&mut z, a, u.delta);
        }
    }
    let mut next = vec![0.0f64; p];
    let mut dists: Vec<f64> = Vec::with_capacity(updates.len());
    let mut objective = distances(updates, &alpha, &z, &mut dists);
    let mut weights = alpha.clone();
    let mut beta = vec![0.0f64; updates.len()];
    let mut iterations = 0;
    let mut converged = false;

    while iterations < max_iter {
        if objective == 0.0 {
            converged = true;
            break;
        }
        for ((b, &a), &d) in beta.iter_mut().zip(&alpha).zip(&dists) {
            *b = if a > 0.0 {
                a / d.max(eps_smoothing)
            } else {
                0.0
            };
        }
        let total: f64 = beta.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            // Only reachable with non-finite inputs; keep the current z.
            break;
        }
        next.iter_mut().for_each(|v| *v = 0.0);
        for (u, &b) in updates.iter().zip(&beta) {
            if b > 0.0 {
                super::axpy(&mut next, b / total, u.delta);
            }
        }
        std::mem::swap(&mut z, &mut next);
        for (w, &b) in weights.iter_mut().zip(&beta) {
            *w = b / total;
        }
        iterations += 1;
        let new_objective = distances(updates, &alpha, &z, &mut dists);
        let change = (objective - new_objective).abs();
        objective = new_objective;
        if change <= tol * new_objective.abs() {
            converged = true;
            break;
        }
    }

    let outcome = Outcome {
        selected: positive_indices(&weights),
        weights,
        iterations,
        converged,
        objective: Some(objective),
        ..Outcome::default()
    };
    Ok((to_f32(&z), outcome))
}

/// Fills `dists` with `‖z − Δᵢ‖` and returns `Σ αᵢ ‖z − Δᵢ‖`.
fn distances(updates: &[Update<'_>], alpha: &[f64], z: &[f64], dists: &mut Vec<f64>) -> f64 {
    dists.clear();
    dists.extend(updates.iter().map(|u| dist_sq_f64(z, u.delta).sqrt()));
    alpha
        .iter()
        .zip(dists.iter())
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, d)| a * d)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{l2, ups, Rng};
    use super::*;

    #[test]
    fn collinear_points_median_is_middle() {
        let d = vec![vec![0.0f32], vec![1.0], vec![10.0]];
        let (z, o) = geometric_median(&ups(&d, 1.0), 1e-8, 1e-12, 1000).unwrap();
        assert!((z[0] - 1.0).abs() < 1e-4, "{z:?}");
        assert!(o.converged);
        assert!(o.iterations < 1000);
        assert!((o.objective.unwrap() - 10.0 / 3.0).abs() < 1e-4);
    }

    #[test]
    fn equilateral_triangle_centroid() {
        let h = 3f32.sqrt() / 2.0;
        let d = vec![vec![0.0f32, 0.0], vec![1.0, 0.0], vec![0.5, h]];
        let (z, o) = geometric_median(&ups(&d, 2.0), 1e-6, 1e-10, 100).unwrap();
        assert!(
            (z[0] - 0.5).abs() < 1e-5 && (z[1] - h / 3.0).abs() < 1e-5,
            "{z:?}"
        );
        assert!(o.converged && o.iterations < 100);
        // Effective weights are equal by symmetry.
        for w in &o.weights {
            assert!((w - 1.0 / 3.0).abs() < 1e-6);
        }
    }

    #[test]
    fn robust_to_far_minority() {
        let mut rng = Rng::new(3);
        let mut d: Vec<Vec<f32>> = (0..6).map(|_| rng.vec(5, 0.01)).collect();
        d.extend((0..4).map(|_| vec![1e3f32; 5]));
        let (z, o) = geometric_median(&ups(&d, 1.0), 1e-6, 1e-10, 1000).unwrap();
        assert!(l2(&z) < 0.1, "{z:?}");
        assert!(o.converged && o.iterations < 1000);
        // The plain mean would be at distance ~ 0.4·1e3·√5.
    }

    #[test]
    fn weights_matter() {
        // Two points; the heavier one is the weighted geometric median.
        let d = [vec![0.0f32], vec![4.0]];
        let us = [Update::new(&d[0], 3.0), Update::new(&d[1], 1.0)];
        let (z, _) = geometric_median(&us, 1e-9, 1e-12, 1000).unwrap();
        assert!(z[0].abs() < 1e-4, "{z:?}");
    }

    #[test]
    fn max_iter_zero_is_weighted_mean_and_identical_points() {
        let d = vec![vec![0.0f32], vec![3.0], vec![6.0]];
        let (z, o) = geometric_median(&ups(&d, 1.0), 1e-6, 1e-9, 0).unwrap();
        assert_eq!(z, vec![3.0]);
        assert_eq!(o.iterations, 0);
        assert!(!o.converged);
        let d = vec![vec![2.0f32, 2.0]; 4];
        let (z, o) = geometric_median(&ups(&d, 1.0), 1e-6, 1e-9, 10).unwrap();
        assert_eq!(z, vec![2.0, 2.0]);
        assert!(o.converged);
        assert_eq!(o.objective, Some(0.0));
    }

    #[test]
    fn geometric_median_errors() {
        let d = vec![vec![0.0f32]];
        assert!(geometric_median(&ups(&d, 1.0), 0.0, 1e-6, 10).is_err());
        assert!(geometric_median(&ups(&d, 1.0), 1e-6, -1.0, 10).is_err());
        assert!(geometric_median(&ups(&d, 1.0), 1e-6, f64::NAN, 10).is_err());
        assert!(geometric_median(&ups(&d, 0.0), 1e-6, 1e-6, 10).is_err());
        assert!(geometric_median(&[], 1e-6, 1e-6, 10).is_err());
        let d = vec![vec![f32::NAN], vec![1.0]];
        assert!(geometric_median(&ups(&d, 1.0), 1e-6, 1e-6, 10).is_ok());
    }
}
