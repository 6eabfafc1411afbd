//! BARFED-style layer-wise outlier elimination (Isik-Polat, Bilgin, Ozdemir
//! 2022, "BARFED: Byzantine Attack-Resistant Federated Averaging Based on
//! Outlier Elimination").

use std::ops::Range;

use super::{
    check_layers, check_non_negative, check_updates, normalized_weights, Outcome, RobustError,
    Update,
};

/// Layer-wise outlier elimination in the style of BARFED (Isik-Polat et al.
/// 2022).
///
/// Rule, for every layer `l` (a range of the flattened delta):
///
/// 1. `dᵢ = ‖Δᵢ[l]‖`, the L2 distance between client `i`'s layer and the
///    global model's layer (deltas are changes to the global model);
/// 2. `Q1`, `Q3` = the 25th and 75th percentiles of the `dᵢ`, with linear
///    interpolation between order statistics (NumPy's default `linear`
///    method: position `(n − 1)·q` in the sorted list);
/// 3. threshold `= Q3 + k · (Q3 − Q1)` (Tukey's fence; `k = 1.5` usually);
/// 4. client `i` is excluded from layer `l` if `dᵢ > threshold`;
/// 5. layer `l` of the result is the sample-weighted mean of the included
///    clients' layer. If the included clients' weight is 0, the layer is 0
///    and `Outcome::degenerate` is set. (With `k ≥ 0` the smallest distance
///    never exceeds the threshold, so some client is always included.)
///
/// Outcome: `excluded_layers` (per update, the number of layers it was
/// excluded from), `degenerate`. `weights` and `selected` are left empty
/// because the contributing set differs per layer.
///
/// Errors: no updates, deltas of different lengths, invalid weights or zero
/// total weight, layers that are not contiguous ranges covering `0..P` in
/// order ([`RobustError::InvalidLayer`], [`RobustError::LayersIncomplete`];
/// empty ranges are allowed), `k` not finite and `>= 0`.
///
/// Non-finite deltas give non-finite distances, ordered by IEEE total
/// order; no panic.
///
/// Memory: `O(P + n)` extra (an `f64` accumulator for one layer, at most `P`
/// long, and `O(n)` distances); time `O(n·P + L·n log n)`.
pub fn barfed(
    updates: &[Update<'_>],
    layers: &[Range<usize>],
    k: f64,
) -> Result<(Vec<f32>, Outcome), RobustError> {
    let p = check_updates(updates)?;
    check_layers(layers, p)?;
    check_non_negative("k", k)?;
    let weights = normalized_weights(updates)?;
    let n = updates.len();

    let mut out = vec![0.0f32; p];
    let mut excluded = vec![0usize; n];
    let mut dists = vec![0.0f64; n];
    let mut sorted = vec![0.0f64; n];
    let mut acc: Vec<f64> = Vec::new();
    let mut degenerate = false;

    for layer in layers {
        let layer = layer.clone();
        for (d, u) in dists.iter_mut().zip(updates) {
            *d = super::norm_sq(&u.delta[layer.clone()]).sqrt();
        }
        sorted.copy_from_slice(&dists);
        sorted.sort_unstable_by(f64::total_cmp);
        let q1 = quantile_sorted(&sorted, 0.25);
        let q3 = quantile_sorted(&sorted, 0.75);
        let threshold = q3 + k * (q3 - q1);

        acc.clear();
        acc.resize(layer.len(), 0.0);
        let mut total = 0.0f64;
        for ((u, &w), (&d, ex)) in updates
            .iter()
            .zip(&weights)
            .zip(dists.iter().zip(excluded.iter_mut()))
        {
            if d > threshold {
                *ex += 1;
                continue;
            }
            if w > 0.0 {
                total += w;
                super::axpy(&mut acc, w, &u.delta[layer.clone()]);
            }
        }
        if total > 0.0 {
            for (o, a) in out[layer].iter_mut().zip(&acc) {
                *o = (a / total) as f32;
            }
        } else if !layer.is_empty() {
            degenerate = true;
        }
    }

    let outcome = Outcome {
        excluded_layers: excluded,
        degenerate,
        ..Outcome::default()
    };
    Ok((out, outcome))
}

/// Quantile `q ∈ [0, 1]` of an ascending, non-empty slice with linear
/// interpolation (NumPy's default method): position `h = (n − 1)·q`,
/// value `x[⌊h⌋] + (h − ⌊h⌋)·(x[⌊h⌋+1] − x[⌊h⌋])`. Returns 0 for an empty
/// slice.
pub(crate) fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let Some(&last) = sorted.last() else {
        return 0.0;
    };
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    if lo + 1 >= sorted.len() {
        return last;
    }
    let frac = h - lo as f64;
    let (a, b) = (sorted[lo], sorted[lo + 1]);
    if frac == 0.0 {
        a
    } else {
        a + frac * (b - a)
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one-layer models are intended
mod tests {
    use super::super::test_util::{ups, Rng};
    use super::*;

    #[test]
    fn quantiles_match_numpy_linear() {
        // numpy.percentile([1, 2, 3, 4], [25, 75]) == [1.75, 3.25]
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&x, 0.25), 1.75);
        assert_eq!(quantile_sorted(&x, 0.75), 3.25);
        // numpy.percentile([1, 2, 3, 4, 5], [25, 75]) == [2, 4]
        let y = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile_sorted(&y, 0.25), 2.0);
        assert_eq!(quantile_sorted(&y, 0.75), 4.0);
        assert_eq!(quantile_sorted(&[7.0], 0.75), 7.0);
        assert_eq!(quantile_sorted(&[], 0.5), 0.0);
        assert_eq!(quantile_sorted(&y, 1.0), 5.0);
    }

    #[test]
    fn outlier_excluded_from_its_layer_only() {
        let mut rng = Rng::new(9);
        // 3 layers: 0..4, 4..10, 10..12.
        let layers = [0..4, 4..10, 10..12];
        let mut d: Vec<Vec<f32>> = (0..8).map(|_| rng.vec(12, 1.0)).collect();
        for v in &mut d[3][4..10] {
            *v *= 50.0;
        }
        let us = ups(&d, 1.0);
        let (agg, o) = barfed(&us, &layers, 1.5).unwrap();
        assert_eq!(o.excluded_layers[3], 1);
        assert_eq!(o.excluded_layers.iter().sum::<usize>(), 1);
        assert!(!o.degenerate);
        for j in 0..12 {
            let clients: Vec<usize> = if (4..10).contains(&j) {
                (0..8).filter(|&i| i != 3).collect()
            } else {
                (0..8).collect()
            };
            let mean: f64 =
                clients.iter().map(|&i| f64::from(d[i][j])).sum::<f64>() / clients.len() as f64;
            assert!((f64::from(agg[j]) - mean).abs() < 1e-6, "coordinate {j}");
        }
    }

    #[test]
    fn sample_weighted_within_layer() {
        let layers = [0..1];
        let d = [vec![1.0f32], vec![2.0], vec![1.5]];
        let us = [
            Update::new(&d[0], 1.0),
            Update::new(&d[1], 3.0),
            Update::new(&d[2], 0.0),
        ];
        let (agg, o) = barfed(&us, &layers, 1.5).unwrap();
        assert_eq!(agg, vec![1.75]);
        assert_eq!(o.excluded_layers, vec![0, 0, 0]);
    }

    #[test]
    fn zero_weight_layer_is_degenerate() {
        // Client 2 (the only one with weight) is the outlier with k = 0:
        // distances [1, 1, 100]: Q3 = 50.5, IQR = 49.5, threshold (k = 0) = 50.5.
        let d = [vec![1.0f32], vec![1.0], vec![100.0]];
        let us = [
            Update::new(&d[0], 0.0),
            Update::new(&d[1], 0.0),
            Update::new(&d[2], 1.0),
        ];
        let (agg, o) = barfed(&us, &[0..1], 0.0).unwrap();
        assert_eq!(agg, vec![0.0]);
        assert!(o.degenerate);
        assert_eq!(o.excluded_layers, vec![0, 0, 1]);
    }

    #[test]
    fn barfed_errors() {
        let d = vec![vec![1.0f32, 2.0]];
        let us = ups(&d, 1.0);
        assert!(barfed(&us, &[0..1], 1.5).is_err());
        assert!(barfed(&us, &[0..1, 2..2], 1.5).is_err());
        assert!(barfed(&us, &[0..2], -1.0).is_err());
        assert!(barfed(&us, &[0..2], f64::NAN).is_err());
        assert!(barfed(&[], &[], 1.5).is_err());
        assert!(barfed(&ups(&d, 0.0), &[0..2], 1.5).is_err());
        let (agg, _) = barfed(&us, &[0..0, 0..2, 2..2], 1.5).unwrap();
        assert_eq!(agg, vec![1.0, 2.0]);
    }
}
