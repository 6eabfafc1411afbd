//! FLTrust (Cao, Fang, Liu, Gong 2021, "FLTrust: Byzantine-robust Federated
//! Learning via Trust Bootstrapping", NDSS).

use super::{axpy, check_updates, dot, norm_sq, to_f32, Outcome, RobustError, Update};

/// FLTrust (Cao et al. 2021): the server computes its own update `g₀` on a
/// small clean root data set and trusts each client by its direction.
///
/// Rule: trust score `TSᵢ = ReLU(cos(Δᵢ, g₀))`; each delta is rescaled to the
/// root's norm, `Δ̂ᵢ = Δᵢ · ‖g₀‖ / ‖Δᵢ‖`; the result is
/// `Σ TSᵢ Δ̂ᵢ / Σ TSᵢ`. A zero delta gets `TSᵢ = 0`. If every trust score is
/// 0 the zero delta is returned and `Outcome::degenerate` is set. Sample
/// weights are ignored, as in the paper.
///
/// Outcome: `scores` (the trust scores `TSᵢ`), `weights` (`TSᵢ / Σ TS`;
/// empty if degenerate), `selected` (updates with `TSᵢ > 0`), `clipped`
/// (number of contributing updates whose norm exceeded `‖g₀‖` and were
/// scaled down).
///
/// Errors: no updates, deltas of different lengths,
/// [`RobustError::ReferenceLengthMismatch`] if `root` has another length,
/// [`RobustError::ZeroRootUpdate`] if `‖g₀‖` is 0 or not finite.
///
/// Memory: `O(P + n)` extra (one `f64` accumulator).
pub fn fltrust(updates: &[Update<'_>], root: &[f32]) -> Result<(Vec<f32>, Outcome), RobustError> {
    let p = check_updates(updates)?;
    if root.len() != p {
        return Err(RobustError::ReferenceLengthMismatch {
            name: "root",
            expected: p,
            found: root.len(),
        });
    }
    let root_norm = norm_sq(root).sqrt();
    if !(root_norm > 0.0 && root_norm.is_finite()) {
        return Err(RobustError::ZeroRootUpdate);
    }

    let mut scores = Vec::with_capacity(updates.len());
    let mut scale = Vec::with_capacity(updates.len());
    for u in updates {
        let norm = norm_sq(u.delta).sqrt();
        let ts = if norm > 0.0 {
            let cos = dot(u.delta, root) / (norm * root_norm);
            if cos > 0.0 {
                cos.min(1.0)
            } else {
                0.0
            } // NaN -> 0
        } else {
            0.0
        };
        scores.push(ts);
        scale.push(if ts > 0.0 { root_norm / norm } else { 0.0 });
    }

    let total: f64 = scores.iter().sum();
    let mut acc = vec![0.0f64; p];
    let mut outcome = Outcome {
        selected: super::positive_indices(&scores),
        ..Outcome::default()
    };
    if total > 0.0 && total.is_finite() {
        for ((u, &ts), &s) in updates.iter().zip(&scores).zip(&scale) {
            if ts > 0.0 {
                axpy(&mut acc, ts * s / total, u.delta);
                if s < 1.0 {
                    outcome.clipped += 1;
                }
            }
        }
        outcome.weights = scores.iter().map(|t| t / total).collect();
    } else {
        outcome.degenerate = true;
    }
    outcome.scores = scores;
    Ok((to_f32(&acc), outcome))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::l2;
    use super::*;

    #[test]
    fn opposite_update_gets_zero_trust() {
        let root = [1.0f32, 2.0];
        let bad = [-2.0f32, -4.0];
        let good = [0.5f32, 1.0];
        let us = [Update::new(&bad, 1.0), Update::new(&good, 1.0)];
        let (agg, o) = fltrust(&us, &root).unwrap();
        assert_eq!(o.scores[0], 0.0);
        assert!((o.scores[1] - 1.0).abs() < 1e-12);
        assert_eq!(o.selected, vec![1]);
        // `good` rescaled to ‖root‖ is root itself.
        assert!((agg[0] - 1.0).abs() < 1e-6 && (agg[1] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn large_update_rescaled_to_root_norm() {
        let root = [3.0f32, 4.0]; // norm 5
        let big = [300.0f32, 400.0]; // 100× the root, same direction
        let (agg, o) = fltrust(&[Update::new(&big, 1.0)], &root).unwrap();
        assert!((l2(&agg) - 5.0).abs() < 1e-5);
        assert!((agg[0] - 3.0).abs() < 1e-5 && (agg[1] - 4.0).abs() < 1e-5);
        assert_eq!(o.clipped, 1);
    }

    #[test]
    fn known_2d_result() {
        let root = [1.0f32, 0.0];
        let a = [2.0f32, 0.0]; // TS 1, rescaled (1, 0)
        let b = [0.0f32, 3.0]; // TS 0 (orthogonal)
        let c = [1.0f32, 1.0]; // TS 1/√2, rescaled (1/√2, 1/√2)
        let d = [-1.0f32, 0.0]; // TS 0 (opposite)
        let us = [a, b, c, d].map(|x| x.to_vec());
        let us: Vec<Update<'_>> = us.iter().map(|x| Update::new(x, 1.0)).collect();
        let (agg, o) = fltrust(&us, &root).unwrap();
        let s = std::f64::consts::FRAC_1_SQRT_2;
        let expect = [(1.0 + s * s) / (1.0 + s), (s * s) / (1.0 + s)];
        assert!((f64::from(agg[0]) - expect[0]).abs() < 1e-6, "{agg:?}");
        assert!((f64::from(agg[1]) - expect[1]).abs() < 1e-6, "{agg:?}");
        assert_eq!(o.selected, vec![0, 2]);
        assert!((o.scores[2] - s).abs() < 1e-12);
    }

    #[test]
    fn degenerate_and_errors() {
        let root = [1.0f32, 0.0];
        let bad = [-1.0f32, 0.0];
        let zero = [0.0f32, 0.0];
        let (agg, o) = fltrust(&[Update::new(&bad, 1.0), Update::new(&zero, 1.0)], &root).unwrap();
        assert_eq!(agg, vec![0.0, 0.0]);
        assert!(o.degenerate);
        assert_eq!(
            fltrust(&[Update::new(&bad, 1.0)], &zero).unwrap_err(),
            RobustError::ZeroRootUpdate
        );
        assert!(matches!(
            fltrust(&[Update::new(&bad, 1.0)], &[1.0]),
            Err(RobustError::ReferenceLengthMismatch { name: "root", .. })
        ));
        assert!(fltrust(&[], &root).is_err());
    }
}
