//! Property tests over random inputs.

use proptest::prelude::*;

use super::{median, trimmed_mean, weighted_mean, Update};

/// Between 1 and 9 deltas of a common length 0..6, finite values.
fn deltas() -> impl Strategy<Value = Vec<Vec<f32>>> {
    (1usize..10, 0usize..6)
        .prop_flat_map(|(n, p)| prop::collection::vec(prop::collection::vec(-1e6f32..1e6f32, p), n))
}

fn within_column_range(deltas: &[Vec<f32>], out: &[f32]) -> Result<(), TestCaseError> {
    for (j, &v) in out.iter().enumerate() {
        let lo = deltas.iter().map(|d| d[j]).fold(f32::INFINITY, f32::min);
        let hi = deltas
            .iter()
            .map(|d| d[j])
            .fold(f32::NEG_INFINITY, f32::max);
        prop_assert!(
            lo <= v && v <= hi,
            "coordinate {j}: {v} not in [{lo}, {hi}]"
        );
    }
    Ok(())
}

proptest! {
    #[test]
    fn median_within_min_max(d in deltas()) {
        let us: Vec<Update<'_>> = d.iter().map(|x| Update::new(x, 1.0)).collect();
        let (m, _) = median(&us).unwrap();
        prop_assert_eq!(m.len(), d[0].len());
        within_column_range(&d, &m)?;
    }

    #[test]
    fn trimmed_mean_within_min_max(d in deltas(), frac in 0.0f64..0.5) {
        let n = d.len();
        let b = ((n - 1) / 2).min((frac * n as f64) as usize);
        let us: Vec<Update<'_>> = d.iter().map(|x| Update::new(x, 1.0)).collect();
        let (m, _) = trimmed_mean(&us, b).unwrap();
        prop_assert_eq!(m.len(), d[0].len());
        within_column_range(&d, &m)?;
    }

    #[test]
    fn weighted_mean_of_identical_is_identity(
        x in prop::collection::vec(-1e6f32..1e6f32, 0..8),
        weights in prop::collection::vec(0.0f64..1e3, 1..8),
    ) {
        prop_assume!(weights.iter().sum::<f64>() > 0.0);
        let us: Vec<Update<'_>> = weights.iter().map(|&w| Update::new(&x, w)).collect();
        let (m, o) = weighted_mean(&us).unwrap();
        for (a, b) in m.iter().zip(&x) {
            let tol = 1e-6 * b.abs().max(1.0);
            prop_assert!((a - b).abs() <= tol, "{} vs {}", a, b);
        }
        prop_assert!((o.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
}
