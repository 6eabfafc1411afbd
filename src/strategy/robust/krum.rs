//! Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer 2017,
//! "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
//! NeurIPS).

use super::{axpy, check_updates, dist_sq, to_f32, Outcome, RobustError, Update};

/// Krum / Multi-Krum (Blanchard et al. 2017).
///
/// Rule: with `n` updates of which at most `f` are Byzantine, the score of
/// update `i` is the sum of the squared L2 distances from `Δᵢ` to its
/// `n − f − 2` nearest other updates. The `m` updates with the lowest scores
/// are selected (ties broken by lower index) and their **unweighted** mean is
/// returned, as in the paper; sample weights are ignored. `m = 1` is Krum
/// (the result is the selected update itself); `m > 1` is Multi-Krum.
/// The paper suggests `m ≤ n − f`; any `1 ≤ m ≤ n` is accepted.
///
/// Outcome: `selected` (the `m` chosen indices, best score first), `scores`
/// (every update's Krum score; lower is better), `weights` (`1/m` for the
/// selected updates, 0 otherwise).
///
/// Errors: no updates, deltas of different lengths,
/// [`RobustError::TooManyByzantine`] unless `n > 2f + 2`, and
/// [`RobustError::InvalidSelectionCount`] unless `1 ≤ m ≤ n`.
///
/// Non-finite values give non-finite scores, ordered by IEEE total order
/// (NaN scores sort last); no panic.
///
/// Memory: `O(n² + P)` extra (the `n × n` distance matrix, an `n` scratch
/// row and one `f64` accumulator); time `O(n²·P)`.
pub fn krum(
    updates: &[Update<'_>],
    f: usize,
    m: usize,
) -> Result<(Vec<f32>, Outcome), RobustError> {
    let p = check_updates(updates)?;
    let n = updates.len();
    match f.checked_mul(2).and_then(|x| x.checked_add(2)) {
        Some(min) if n > min => {}
        _ => return Err(RobustError::TooManyByzantine { n, f }),
    }
    if m == 0 || m > n {
        return Err(RobustError::InvalidSelectionCount { m, n });
    }

    // Symmetric matrix of squared distances, row-major.
    let mut dist = vec![0.0f64; n * n];
    for i in 0..n {
        for j in (i + 1)..n {
            let d = dist_sq(updates[i].delta, updates[j].delta);
            dist[i * n + j] = d;
            dist[j * n + i] = d;
        }
    }

    let neighbours = n - f - 2; // >= f + 1 >= 1 because n > 2f + 2
    let mut row = Vec::with_capacity(n - 1);
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            row.clear();
            row.extend((0..n).filter(|&j| j != i).map(|j| dist[i * n + j]));
            row.select_nth_unstable_by(neighbours - 1, f64::total_cmp);
            row[..neighbours].iter().sum()
        })
        .collect();

    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(m);

    let mut acc = vec![0.0f64; p];
    let c = 1.0 / m as f64;
    for &i in &order {
        axpy(&mut acc, c, updates[i].delta);
    }
    let mut weights = vec![0.0; n];
    for &i in &order {
        weights[i] = c;
    }
    let outcome = Outcome {
        selected: order,
        weights,
        scores,
        ..Outcome::default()
    };
    Ok((to_f32(&acc), outcome))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{ups, Rng};
    use super::*;

    /// 7 honest updates near A = (1, …, 1), 3 Byzantine near B = (50, …, 50),
    /// the Byzantine ones placed at indices 2, 5, 8.
    fn planted() -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut rng = Rng::new(7);
        let byz = [2usize, 5, 8];
        let deltas = (0..10)
            .map(|i| {
                let centre = if byz.contains(&i) { 50.0 } else { 1.0 };
                (0..16).map(|_| centre + 0.1 * rng.sym()).collect()
            })
            .collect();
        let honest = (0..10).filter(|i| !byz.contains(i)).collect();
        (deltas, honest)
    }

    #[test]
    fn krum_picks_honest() {
        let (d, honest) = planted();
        let (agg, o) = krum(&ups(&d, 1.0), 3, 1).unwrap();
        assert_eq!(o.selected.len(), 1);
        assert!(honest.contains(&o.selected[0]));
        assert_eq!(agg, d[o.selected[0]]);
        assert_eq!(o.scores.len(), 10);
        assert!((o.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn multi_krum_selects_only_honest() {
        let (d, honest) = planted();
        let (agg, o) = krum(&ups(&d, 1.0), 3, 4).unwrap();
        assert_eq!(o.selected.len(), 4);
        for i in &o.selected {
            assert!(honest.contains(i), "selected byzantine {i}");
        }
        // Sorted by score.
        for w in o.selected.windows(2) {
            assert!(o.scores[w[0]] <= o.scores[w[1]]);
        }
        // Unweighted mean of the selected.
        for (j, v) in agg.iter().enumerate() {
            let mean: f64 = o.selected.iter().map(|&i| f64::from(d[i][j])).sum::<f64>() / 4.0;
            assert!((f64::from(*v) - mean).abs() < 1e-5);
        }
    }

    #[test]
    fn krum_exact_scores_and_ties() {
        // 1-D points 0, 1, 2, 3, 10; f = 1 -> n − f − 2 = 2 neighbours.
        let d: Vec<Vec<f32>> = [0.0f32, 1.0, 2.0, 3.0, 10.0]
            .iter()
            .map(|&x| vec![x])
            .collect();
        let (agg, o) = krum(&ups(&d, 1.0), 1, 1).unwrap();
        assert_eq!(o.scores, vec![5.0, 2.0, 2.0, 5.0, 113.0]);
        assert_eq!(o.selected, vec![1]); // tie 1 vs 2 broken by index
        assert_eq!(agg, vec![1.0]);
        let (agg, o) = krum(&ups(&d, 1.0), 1, 5).unwrap();
        assert_eq!(o.selected, vec![1, 2, 0, 3, 4]);
        assert_eq!(agg, vec![3.2]);
    }

    #[test]
    fn krum_errors() {
        let d = vec![vec![0.0f32]; 5];
        let e = krum(&ups(&d, 1.0), 2, 1).unwrap_err();
        assert_eq!(e, RobustError::TooManyByzantine { n: 5, f: 2 });
        assert_eq!(
            e.to_string(),
            "Krum needs n > 2f + 2 updates: n = 5, f = 2 (byzantine_client_num)"
        );
        let d6 = vec![vec![0.0f32]; 6];
        assert!(krum(&ups(&d6, 1.0), 2, 1).is_err()); // n = 2f + 2
        assert!(krum(&ups(&d, 1.0), usize::MAX, 1).is_err());
        assert_eq!(
            krum(&ups(&d, 1.0), 1, 0).unwrap_err(),
            RobustError::InvalidSelectionCount { m: 0, n: 5 }
        );
        assert!(krum(&ups(&d, 1.0), 1, 6).is_err());
        assert!(krum(&[], 0, 1).is_err());
    }

    #[test]
    fn krum_nan_no_panic() {
        let d = vec![vec![f32::NAN], vec![1.0], vec![1.0], vec![2.0]];
        let (_, o) = krum(&ups(&d, 1.0), 0, 1).unwrap();
        assert_eq!(o.selected.len(), 1);
    }
}
