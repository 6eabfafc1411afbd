//! Coordinate-wise robust statistics: median and trimmed mean
//! (Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed
//! Learning: Towards Optimal Statistical Rates", ICML).

use super::{check_updates, Outcome, RobustError, Update};

/// Coordinate-wise median (Yin et al. 2018): for every coordinate `j`, the
/// median of `Δ₁[j], …, Δₙ[j]`. For even `n` it is the mean of the two middle
/// values (computed in `f64`). Sample weights are ignored (unweighted, as in
/// the paper).
///
/// Robust to fewer than `n/2` arbitrary updates per coordinate.
/// Non-finite values are ordered by IEEE total order (NaN sorts last, or
/// first if negative) and never cause a panic.
///
/// Outcome: all fields left at their defaults (the set of contributing
/// updates differs per coordinate).
///
/// Errors: no updates, or deltas of different lengths.
///
/// Memory: `O(n)` extra (one scratch column); time `O(n·P)` on average.
pub fn median(updates: &[Update<'_>]) -> Result<(Vec<f32>, Outcome), RobustError> {
    let p = check_updates(updates)?;
    let n = updates.len();
    let mut col = vec![0.0f32; n];
    let mut out = Vec::with_capacity(p);
    let mid = n / 2;
    for j in 0..p {
        for (c, u) in col.iter_mut().zip(updates) {
            *c = u.delta[j];
        }
        let (lower, &mut upper, _) = col.select_nth_unstable_by(mid, f32::total_cmp);
        let value = if n % 2 == 1 {
            upper
        } else {
            // `lower` holds the n/2 smallest values; its maximum is the lower middle.
            let lower_mid = lower.iter().copied().fold(f32::NEG_INFINITY, |a, b| {
                if b.total_cmp(&a).is_gt() {
                    b
                } else {
                    a
                }
            });
            ((f64::from(lower_mid) + f64::from(upper)) / 2.0) as f32
        };
        out.push(value);
    }
    Ok((out, Outcome::default()))
}

/// Coordinate-wise trimmed mean (Yin et al. 2018): for every coordinate,
/// drop the `b` largest and the `b` smallest of the `n` values and take the
/// (unweighted) mean of the remaining `n − 2b` in `f64`. `b = 0` is the plain
/// unweighted mean. Sample weights are ignored, as in the paper.
///
/// Non-finite values are ordered by IEEE total order and never cause a
/// panic; if any survive trimming they propagate into the mean.
///
/// Outcome: all fields left at their defaults (the set of kept values
/// differs per coordinate).
///
/// Errors: no updates, deltas of different lengths, or `2b >= n`
/// ([`RobustError::TrimTooLarge`]). See [`trim_count`] for FedML's
/// fractional `beta`.
///
/// Memory: `O(n)` extra (one scratch column); time `O(n·P)` on average.
pub fn trimmed_mean(updates: &[Update<'_>], b: usize) -> Result<(Vec<f32>, Outcome), RobustError> {
    let p = check_updates(updates)?;
    let n = updates.len();
    match b.checked_mul(2) {
        Some(twice) if twice < n => {}
        _ => return Err(RobustError::TrimTooLarge { n, b }),
    }
    let kept = n - 2 * b;
    let mut col = vec![0.0f32; n];
    let mut out = Vec::with_capacity(p);
    for j in 0..p {
        for (c, u) in col.iter_mut().zip(updates) {
            *c = u.delta[j];
        }
        if b > 0 {
            // After this, col[..b] are the b smallest values.
            col.select_nth_unstable_by(b, f32::total_cmp);
            // Within col[b..] (n − b values), put the b largest at the end.
            col[b..].select_nth_unstable_by(kept - 1, f32::total_cmp);
        }
        let sum: f64 = col[b..n - b].iter().map(|&v| f64::from(v)).sum();
        out.push((sum / kept as f64) as f32);
    }
    Ok((out, Outcome::default()))
}

/// Number of values to trim at each end for FedML's fractional trimming
/// parameter: `b = floor(beta · n)`, for `beta` in `[0, 0.5)`. The result
/// always satisfies `2b < n` when `n >= 1`, so it is valid for
/// [`trimmed_mean`].
///
/// Errors: `beta` outside `[0, 0.5)` or NaN ([`RobustError::InvalidParameter`]).
pub fn trim_count(n: usize, beta: f64) -> Result<usize, RobustError> {
    if !(0.0..0.5).contains(&beta) {
        return Err(RobustError::InvalidParameter {
            name: "beta",
            value: beta,
            expected: "in [0, 0.5)",
        });
    }
    let b = (beta * n as f64).floor() as usize;
    // Guard against rounding pushing b to n/2 for huge n.
    Ok(if n == 0 { 0 } else { b.min((n - 1) / 2) })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{ups, Rng};
    use super::*;

    #[test]
    fn median_ignores_outliers() {
        let mut rng = Rng::new(1);
        let mut deltas: Vec<Vec<f32>> = (0..7)
            .map(|_| (0..4).map(|_| 1.0 + 0.01 * rng.sym()).collect())
            .collect();
        deltas.extend((0..3).map(|_| vec![1e6f32; 4]));
        let (m, _) = median(&ups(&deltas, 1.0)).unwrap();
        for v in m {
            assert!((v - 1.0).abs() <= 0.01, "{v}");
        }
    }

    #[test]
    fn median_odd_and_even_exact() {
        let d = vec![vec![3.0f32, -1.0], vec![1.0, 5.0], vec![2.0, 0.0]];
        assert_eq!(median(&ups(&d, 1.0)).unwrap().0, vec![2.0, 0.0]);
        let d = vec![
            vec![4.0f32, 10.0],
            vec![1.0, -2.0],
            vec![3.0, 7.0],
            vec![100.0, 0.0],
        ];
        // Sorted columns: [1, 3, 4, 100] -> 3.5 ; [-2, 0, 7, 10] -> 3.5
        assert_eq!(median(&ups(&d, 1.0)).unwrap().0, vec![3.5, 3.5]);
        let d = vec![vec![1.0f32], vec![2.0]];
        assert_eq!(median(&ups(&d, 0.0)).unwrap().0, vec![1.5]);
    }

    #[test]
    fn median_errors_and_nan_no_panic() {
        assert_eq!(median(&[]).unwrap_err(), RobustError::NoUpdates);
        let d = vec![vec![f32::NAN], vec![1.0], vec![2.0]];
        assert_eq!(median(&ups(&d, 1.0)).unwrap().0, vec![2.0]);
    }

    #[test]
    fn trimmed_mean_exact() {
        // Column 0: [1, 2, 3, 4, 100] trim 1 -> mean(2,3,4) = 3
        // Column 1: [-50, 0, 6, 9, 10] trim 1 -> mean(0,6,9) = 5
        let d = vec![
            vec![100.0f32, 0.0],
            vec![2.0, -50.0],
            vec![3.0, 9.0],
            vec![1.0, 10.0],
            vec![4.0, 6.0],
        ];
        assert_eq!(trimmed_mean(&ups(&d, 1.0), 1).unwrap().0, vec![3.0, 5.0]);
        // b = 2 leaves only the median.
        assert_eq!(trimmed_mean(&ups(&d, 1.0), 2).unwrap().0, vec![3.0, 6.0]);
        // b = 0 is the plain mean.
        assert_eq!(trimmed_mean(&ups(&d, 1.0), 0).unwrap().0, vec![22.0, -5.0]);
    }

    #[test]
    fn trimmed_mean_errors() {
        let d = vec![vec![1.0f32]; 4];
        assert_eq!(
            trimmed_mean(&ups(&d, 1.0), 2).unwrap_err(),
            RobustError::TrimTooLarge { n: 4, b: 2 }
        );
        assert!(trimmed_mean(&ups(&d, 1.0), usize::MAX).is_err());
        assert!(trimmed_mean(&[], 0).is_err());
        assert!(trimmed_mean(&ups(&d, 1.0), 2)
            .unwrap_err()
            .to_string()
            .contains("2b < n"));
    }

    #[test]
    fn trim_count_values() {
        assert_eq!(trim_count(10, 0.1).unwrap(), 1);
        assert_eq!(trim_count(10, 0.25).unwrap(), 2);
        assert_eq!(trim_count(10, 0.0).unwrap(), 0);
        assert_eq!(trim_count(0, 0.3).unwrap(), 0);
        assert_eq!(trim_count(3, 0.49).unwrap(), 1);
        assert!(trim_count(10, 0.5).is_err());
        assert!(trim_count(10, -0.1).is_err());
        assert!(trim_count(10, f64::NAN).is_err());
        for n in 1..50 {
            assert!(2 * trim_count(n, 0.4999999).unwrap() < n);
        }
    }
}
