//! The plain sample-weighted mean (FedAvg), the non-robust baseline.

use super::{axpy, check_updates, normalized_weights, to_f32, Outcome, RobustError, Update};

/// Sample-weighted mean of the deltas, `Σ wᵢ Δᵢ / Σ wᵢ` — the FedAvg rule of
/// McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
/// from Decentralized Data". Not robust: a single update can move it
/// arbitrarily far.
///
/// Outcome: `weights` (the normalised sample weights) and `selected` (the
/// updates with positive weight).
///
/// Errors: no updates, deltas of different lengths, a negative or non-finite
/// weight, or all weights zero.
///
/// Memory: `O(P + n)` extra (one `f64` accumulator of length `P`).
pub fn weighted_mean(updates: &[Update<'_>]) -> Result<(Vec<f32>, Outcome), RobustError> {
    let p = check_updates(updates)?;
    let weights = normalized_weights(updates)?;
    let mut acc = vec![0.0f64; p];
    for (u, &w) in updates.iter().zip(&weights) {
        if w > 0.0 {
            axpy(&mut acc, w, u.delta);
        }
    }
    let outcome = Outcome {
        selected: super::positive_indices(&weights),
        weights,
        ..Outcome::default()
    };
    Ok((to_f32(&acc), outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_mean_known_value() {
        let a = [1.0f32, 0.0];
        let b = [4.0f32, 3.0];
        let c = [100.0f32, 100.0];
        let us = [
            Update::new(&a, 1.0),
            Update::new(&b, 2.0),
            Update::new(&c, 0.0),
        ];
        let (m, o) = weighted_mean(&us).unwrap();
        assert_eq!(m, vec![3.0, 2.0]);
        assert_eq!(o.selected, vec![0, 1]);
        assert!((o.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(o.weights[2], 0.0);
    }

    #[test]
    fn weighted_mean_errors() {
        assert_eq!(weighted_mean(&[]).unwrap_err(), RobustError::NoUpdates);
        let a = [1.0f32];
        assert_eq!(
            weighted_mean(&[Update::new(&a, 0.0)]).unwrap_err(),
            RobustError::ZeroTotalWeight
        );
    }

    #[test]
    fn weighted_mean_empty_delta() {
        let a: [f32; 0] = [];
        let (m, _) = weighted_mean(&[Update::new(&a, 1.0)]).unwrap();
        assert!(m.is_empty());
    }
}
