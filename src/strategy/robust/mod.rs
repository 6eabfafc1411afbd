//! Byzantine-robust aggregation of client updates.
//!
//! Every aggregator takes one round's updates as `&[Update<'_>]` (each a
//! flattened model delta of the same length `P` plus a sample-count weight)
//! and returns the aggregated delta as a new `Vec<f32>` together with an
//! [`Outcome`] describing what happened, or a [`RobustError`] naming the
//! offending parameter and its valid range.
//!
//! # Conventions shared by all aggregators
//!
//! * **No panics.** Every input, including an empty list, zero weights and
//!   non-finite values, yields either `Ok` or `Err`.
//! * **Validation.** An empty update list is [`RobustError::NoUpdates`];
//!   deltas of different lengths are [`RobustError::LengthMismatch`].
//!   Aggregators that use the sample weights reject a negative or non-finite
//!   weight ([`RobustError::InvalidWeight`]) and a zero total weight
//!   ([`RobustError::ZeroTotalWeight`]); aggregators that ignore the weights
//!   (median, trimmed mean, Krum, FoolsGold, FLTrust) do not look at them.
//! * **Non-finite values.** The caller is expected to have rejected deltas
//!   containing NaN or infinities. If some slip through, no aggregator
//!   panics: sorting uses IEEE total order (`-NaN < -inf < … < inf < NaN`)
//!   and arithmetic simply propagates NaN/inf into the result.
//! * **Precision.** Inputs and outputs are `f32`; every sum, norm and dot
//!   product is accumulated in `f64`.
//! * **Memory.** Each function states its extra-memory bound (beyond the
//!   inputs and the returned delta) in its documentation.

use std::fmt;
use std::ops::Range;

mod barfed;
mod clipping;
mod coordinate;
mod fltrust;
mod foolsgold;
mod geomed;
mod krum;
mod mean;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod test_util;

pub use barfed::barfed;
pub use clipping::{centered_clip, clipped_mean, norm_clip};
pub use coordinate::{median, trim_count, trimmed_mean};
pub use fltrust::fltrust;
pub use foolsgold::FoolsGold;
pub use geomed::geometric_median;
pub use krum::krum;
pub use mean::weighted_mean;

/// One client's update: its change to the global model, flattened (all
/// tensors concatenated in a fixed order), and its weight (sample count).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update<'a> {
    /// The client's change to the global model, all tensors concatenated.
    pub delta: &'a [f32],
    /// The client's weight, normally its number of training samples.
    pub weight: f64,
}

impl<'a> Update<'a> {
    /// Builds an update from a delta and a weight.
    pub fn new(delta: &'a [f32], weight: f64) -> Self {
        Update { delta, weight }
    }
}

/// What an aggregator did, besides producing the aggregated delta.
///
/// Fields that an aggregator has nothing to say about are left at their
/// [`Default`] value (empty vector, `0`, `None`, `false`); each aggregator's
/// documentation lists the fields it fills.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Indices of the updates that contributed to the result with positive
    /// weight. Krum / Multi-Krum lists them in order of increasing score
    /// (best first); every other aggregator lists them in ascending index
    /// order. Empty for coordinate-wise rules (median, trimmed mean) and for
    /// BARFED, where the contributing set differs per coordinate or layer.
    pub selected: Vec<usize>,
    /// Effective weight of each update in the result (one entry per update,
    /// summing to 1), where a single weight per update is meaningful. Empty
    /// otherwise, or when every weight is zero (see `degenerate`).
    pub weights: Vec<f64>,
    /// A per-update score whose meaning depends on the aggregator: the Krum
    /// score (lower is better), the FLTrust trust score, the FoolsGold
    /// learning rate `α` before normalisation, or the clipping factor of
    /// norm clipping. Empty when not applicable.
    pub scores: Vec<f64>,
    /// Number of iterations performed by iterative rules (geometric median,
    /// centered clipping); 0 otherwise.
    pub iterations: usize,
    /// Whether an iterative rule met its stopping tolerance (geometric
    /// median) before the iteration cap.
    pub converged: bool,
    /// Value of the rule's objective at the returned point (geometric
    /// median: `Σ αᵢ ‖z − xᵢ‖`).
    pub objective: Option<f64>,
    /// Number of updates whose delta was scaled down by clipping.
    pub clipped: usize,
    /// BARFED: for every update, the number of layers it was excluded from.
    pub excluded_layers: Vec<usize>,
    /// `true` when no update received positive weight (everything filtered
    /// out) so that the zero delta was returned; for BARFED, when at least
    /// one layer was set to zero for that reason.
    pub degenerate: bool,
}

/// Errors reported by the robust aggregators.
#[derive(Debug, Clone, PartialEq)]
pub enum RobustError {
    /// The list of updates was empty.
    NoUpdates,
    /// An update's delta length differs from the first update's.
    LengthMismatch {
        /// Index of the offending update.
        index: usize,
        /// Length of the first update's delta.
        expected: usize,
        /// Length of the offending delta.
        found: usize,
    },
    /// A reference vector (FLTrust root update, centered-clipping center)
    /// has a different length than the updates.
    ReferenceLengthMismatch {
        /// Name of the reference argument.
        name: &'static str,
        /// Length of the updates' deltas.
        expected: usize,
        /// Length of the reference vector.
        found: usize,
    },
    /// An update's weight was negative or not finite.
    InvalidWeight {
        /// Index of the offending update.
        index: usize,
        /// The weight.
        weight: f64,
    },
    /// All update weights were zero, so the weighted mean is undefined.
    ZeroTotalWeight,
    /// A real-valued parameter was out of range.
    InvalidParameter {
        /// Name of the parameter.
        name: &'static str,
        /// The value given.
        value: f64,
        /// The valid range, in words.
        expected: &'static str,
    },
    /// Trimmed mean: `2b >= n`, nothing would be left after trimming.
    TrimTooLarge {
        /// Number of updates.
        n: usize,
        /// Number of values trimmed at each end.
        b: usize,
    },
    /// Krum: not enough updates for the assumed number of Byzantine clients.
    TooManyByzantine {
        /// Number of updates.
        n: usize,
        /// Assumed number of Byzantine clients.
        f: usize,
    },
    /// Multi-Krum: the number of updates to average is outside `1..=n`.
    InvalidSelectionCount {
        /// Number of updates to average.
        m: usize,
        /// Number of updates.
        n: usize,
    },
    /// FLTrust: the server's root update has zero (or non-finite) norm.
    ZeroRootUpdate,
    /// FoolsGold: the client-name list and the update list differ in length.
    ClientCountMismatch {
        /// Number of client names.
        clients: usize,
        /// Number of updates.
        updates: usize,
    },
    /// FoolsGold: a client name appears twice in one round.
    DuplicateClient {
        /// The duplicated name.
        client: String,
    },
    /// FoolsGold: a client's stored history has a different length than this
    /// round's deltas (the model's shape changed).
    HistoryLengthMismatch {
        /// The client.
        client: String,
        /// Length of this round's deltas.
        expected: usize,
        /// Length of the stored history.
        found: usize,
    },
    /// BARFED: a layer range is not where it must be; layers must be
    /// contiguous ranges covering `0..P` in order.
    InvalidLayer {
        /// Index of the offending layer.
        layer: usize,
        /// The layer's start.
        start: usize,
        /// The layer's end.
        end: usize,
        /// Where the layer must start (the previous layer's end, or 0).
        expected_start: usize,
        /// Length `P` of the deltas.
        len: usize,
    },
    /// BARFED: the layers end before `P`.
    LayersIncomplete {
        /// End of the last layer (0 if there are none).
        covered: usize,
        /// Length `P` of the deltas.
        len: usize,
    },
}

impl fmt::Display for RobustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use RobustError::*;
        match self {
            NoUpdates => write!(f, "no updates to aggregate: need at least 1 update"),
            LengthMismatch {
                index,
                expected,
                found,
            } => write!(
                f,
                "update {index} has {found} parameters but update 0 has {expected}: \
                 all deltas must have the same length"
            ),
            ReferenceLengthMismatch {
                name,
                expected,
                found,
            } => write!(
                f,
                "{name} has {found} parameters but the updates have {expected}: \
                 lengths must match"
            ),
            InvalidWeight { index, weight } => write!(
                f,
                "update {index} has weight {weight}: weights must be finite and >= 0"
            ),
            ZeroTotalWeight => write!(
                f,
                "all update weights are 0: at least one weight must be > 0"
            ),
            InvalidParameter {
                name,
                value,
                expected,
            } => write!(f, "invalid {name} = {value}: must be {expected}"),
            TrimTooLarge { n, b } => write!(
                f,
                "trimmed mean needs 2b < n updates: n = {n}, b = {b} (values trimmed at each end)"
            ),
            TooManyByzantine { n, f: byz } => write!(
                f,
                "Krum needs n > 2f + 2 updates: n = {n}, f = {byz} (byzantine_client_num)"
            ),
            InvalidSelectionCount { m, n } => write!(
                f,
                "Multi-Krum needs 1 <= m <= n: m = {m} (updates to average), n = {n}"
            ),
            ZeroRootUpdate => write!(
                f,
                "FLTrust root update has zero or non-finite norm: it must be a nonzero finite vector"
            ),
            ClientCountMismatch { clients, updates } => write!(
                f,
                "FoolsGold got {clients} client names for {updates} updates: one name per update"
            ),
            DuplicateClient { client } => write!(
                f,
                "FoolsGold got client {client:?} twice in one round: names must be unique"
            ),
            HistoryLengthMismatch {
                client,
                expected,
                found,
            } => write!(
                f,
                "FoolsGold history of client {client:?} has {found} parameters but this round's \
                 deltas have {expected}: lengths must match"
            ),
            InvalidLayer {
                layer,
                start,
                end,
                expected_start,
                len,
            } => write!(
                f,
                "layer {layer} is {start}..{end}: layers must be contiguous ranges covering \
                 0..{len}, so it must start at {expected_start} and end within {expected_start}..={len}"
            ),
            LayersIncomplete { covered, len } => write!(
                f,
                "layers cover only 0..{covered} of 0..{len}: they must cover every parameter"
            ),
        }
    }
}

impl std::error::Error for RobustError {}

// ---------------------------------------------------------------------------
// Shared helpers (crate-private).
// ---------------------------------------------------------------------------

/// Checks that there is at least one update and all deltas have the same
/// length; returns that length `P`.
pub(crate) fn check_updates(updates: &[Update<'_>]) -> Result<usize, RobustError> {
    let first = updates.first().ok_or(RobustError::NoUpdates)?;
    let p = first.delta.len();
    for (index, u) in updates.iter().enumerate() {
        if u.delta.len() != p {
            return Err(RobustError::LengthMismatch {
                index,
                expected: p,
                found: u.delta.len(),
            });
        }
    }
    Ok(p)
}

/// Sample weights normalised to sum to 1. Errors on a negative or
/// non-finite weight, or a zero total. `O(n)` memory.
pub(crate) fn normalized_weights(updates: &[Update<'_>]) -> Result<Vec<f64>, RobustError> {
    let mut total = 0.0f64;
    for (index, u) in updates.iter().enumerate() {
        if !(u.weight.is_finite() && u.weight >= 0.0) {
            return Err(RobustError::InvalidWeight {
                index,
                weight: u.weight,
            });
        }
        total += u.weight;
    }
    if total == 0.0 {
        return Err(RobustError::ZeroTotalWeight);
    }
    if total.is_infinite() {
        // Finite weights whose sum overflows: rescale by the largest first.
        let max = updates.iter().map(|u| u.weight).fold(0.0f64, f64::max);
        let scaled: f64 = updates.iter().map(|u| u.weight / max).sum();
        return Ok(updates.iter().map(|u| u.weight / max / scaled).collect());
    }
    Ok(updates.iter().map(|u| u.weight / total).collect())
}

/// Checks a parameter that must be finite and strictly positive.
pub(crate) fn check_positive(name: &'static str, value: f64) -> Result<(), RobustError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(RobustError::InvalidParameter {
            name,
            value,
            expected: "finite and > 0",
        })
    }
}

/// Checks a parameter that must be finite and non-negative.
pub(crate) fn check_non_negative(name: &'static str, value: f64) -> Result<(), RobustError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(RobustError::InvalidParameter {
            name,
            value,
            expected: "finite and >= 0",
        })
    }
}

/// Checks that `layers` are contiguous ranges covering `0..len` in order.
/// Empty ranges are allowed.
pub(crate) fn check_layers(layers: &[Range<usize>], len: usize) -> Result<(), RobustError> {
    let mut expected_start = 0usize;
    for (layer, r) in layers.iter().enumerate() {
        if r.start != expected_start || r.end < r.start || r.end > len {
            return Err(RobustError::InvalidLayer {
                layer,
                start: r.start,
                end: r.end,
                expected_start,
                len,
            });
        }
        expected_start = r.end;
    }
    if expected_start != len {
        return Err(RobustError::LayersIncomplete {
            covered: expected_start,
            len,
        });
    }
    Ok(())
}

/// Squared L2 norm, accumulated in `f64`.
pub(crate) fn norm_sq(x: &[f32]) -> f64 {
    x.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
}

/// Dot product, accumulated in `f64`. Slices must have equal length.
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum()
}

/// Squared L2 distance between two `f32` slices, accumulated in `f64`.
pub(crate) fn dist_sq(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(&a, &b)| {
            let d = f64::from(a) - f64::from(b);
            d * d
        })
        .sum()
}

/// Squared L2 distance between an `f64` point and an `f32` slice.
pub(crate) fn dist_sq_f64(z: &[f64], x: &[f32]) -> f64 {
    z.iter()
        .zip(x)
        .map(|(&a, &b)| {
            let d = a - f64::from(b);
            d * d
        })
        .sum()
}

/// `acc += c · x`, element-wise.
pub(crate) fn axpy(acc: &mut [f64], c: f64, x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += c * f64::from(v);
    }
}

/// Converts an `f64` accumulator to the `f32` result.
pub(crate) fn to_f32(acc: &[f64]) -> Vec<f32> {
    acc.iter().map(|&v| v as f32).collect()
}

/// Indices whose weight is strictly positive, ascending.
pub(crate) fn positive_indices(weights: &[f64]) -> Vec<usize> {
    weights
        .iter()
        .enumerate()
        .filter(|(_, w)| **w > 0.0)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one-layer models are intended
mod tests {
    use super::*;

    #[test]
    fn error_messages_name_parameter_and_range() {
        let e = RobustError::TooManyByzantine { n: 5, f: 2 };
        assert_eq!(
            e.to_string(),
            "Krum needs n > 2f + 2 updates: n = 5, f = 2 (byzantine_client_num)"
        );
        let e = RobustError::InvalidParameter {
            name: "beta",
            value: 0.7,
            expected: "in [0, 0.5)",
        };
        assert_eq!(e.to_string(), "invalid beta = 0.7: must be in [0, 0.5)");
        let boxed: Box<dyn std::error::Error> = Box::new(RobustError::NoUpdates);
        assert!(boxed.to_string().contains("at least 1"));
    }

    #[test]
    fn check_updates_rejects_empty_and_mismatch() {
        assert_eq!(check_updates(&[]), Err(RobustError::NoUpdates));
        let a = [1.0f32, 2.0];
        let b = [1.0f32];
        let us = [Update::new(&a, 1.0), Update::new(&b, 1.0)];
        assert_eq!(
            check_updates(&us),
            Err(RobustError::LengthMismatch {
                index: 1,
                expected: 2,
                found: 1
            })
        );
    }

    #[test]
    fn weights_validation() {
        let a = [1.0f32];
        let zero = [Update::new(&a, 0.0), Update::new(&a, 0.0)];
        assert_eq!(normalized_weights(&zero), Err(RobustError::ZeroTotalWeight));
        let neg = [Update::new(&a, 1.0), Update::new(&a, -1.0)];
        assert!(matches!(
            normalized_weights(&neg),
            Err(RobustError::InvalidWeight { index: 1, .. })
        ));
        let nan = [Update::new(&a, f64::NAN)];
        assert!(normalized_weights(&nan).is_err());
        let huge = [Update::new(&a, f64::MAX), Update::new(&a, f64::MAX)];
        let w = normalized_weights(&huge).unwrap();
        assert!((w[0] - 0.5).abs() < 1e-12 && (w[1] - 0.5).abs() < 1e-12);
    }

    #[test]
    fn layer_validation() {
        assert!(check_layers(&[0..2, 2..5], 5).is_ok());
        assert!(check_layers(&[], 0).is_ok());
        assert!(matches!(
            check_layers(&[0..2, 3..5], 5),
            Err(RobustError::InvalidLayer {
                layer: 1,
                expected_start: 2,
                ..
            })
        ));
        assert_eq!(
            check_layers(&[0..2], 5),
            Err(RobustError::LayersIncomplete { covered: 2, len: 5 })
        );
        assert!(check_layers(&[0..7], 5).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = [0..2, 2..1];
        assert!(check_layers(&reversed, 5).is_err());
    }
}
