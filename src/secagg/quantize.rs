//! Quantization of model values into `Z_{2^32}`, the ring masked sums are computed in.
//!
//! A value `x` is clipped to `[−c, c]` and mapped to the integer `q = round((x + c)·L / 2c)` in
//! `[0, L]`, with `L = 2^b − 1` levels. The server adds the clients' `q` (masks cancel in the
//! sum) and maps the sum `S` of `n` values back with `S·2c/L − n·c`.
//!
//! **No overflow.** `b` is chosen so that `N·L < 2^32` for the largest number of clients `N` a
//! sum can have: the sum of `n ≤ N` quantized values is exact in `u32`, so a sum taken mod
//! `2^32` (what masking needs) is the true sum.
//!
//! **Error bound.** Rounding moves each value by at most half a step, `c/L`; clipping moves
//! nothing inside `[−c, c]`. So for values inside the clip range, the recovered sum of `n` values
//! differs from the true sum by at most `n·c/L` per coordinate (plus `f64` rounding, far below).
//! With `N = 100` clients (`b = 25`) and `c = 1`, that is `n · 3.0e-8`.

/// Why a quantizer cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantizeError {
    /// The clip bound is not a positive finite number.
    #[error("the clipping bound must be > 0 and finite, got {0}")]
    Clip(f32),
    /// No number of levels fits `max_clients` summands in 32 bits.
    #[error(
        "{max_clients} clients with {bits}-bit values can overflow the 32-bit sum; use at most \
         {max_bits} bits for {max_clients} clients"
    )]
    Headroom {
        /// Clients a sum may have.
        max_clients: u64,
        /// Bits asked for.
        bits: u32,
        /// The most bits that fit.
        max_bits: u32,
    },
}

/// Maps values to `Z_{2^32}` and sums back (see the module docs for the bound).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantizer {
    clip: f32,
    bits: u32,
    max_clients: u64,
}

impl Quantizer {
    /// The finest quantizer for sums of up to `max_clients` values clipped to `[−clip, clip]`:
    /// `32 − ⌈log2(max_clients)⌉` bits.
    ///
    /// # Errors
    /// A clip bound that is not positive and finite; `max_clients` of 0 or above `2^31`.
    pub fn new(clip: f32, max_clients: u64) -> Result<Self, QuantizeError> {
        Self::with_bits(clip, Self::max_bits(max_clients), max_clients)
    }

    /// A quantizer with `bits` bits per value.
    ///
    /// # Errors
    /// As [`Quantizer::new`], and [`QuantizeError::Headroom`] when `max_clients` values of
    /// `bits` bits can overflow 32 bits.
    pub fn with_bits(clip: f32, bits: u32, max_clients: u64) -> Result<Self, QuantizeError> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(QuantizeError::Clip(clip));
        }
        let max_bits = Self::max_bits(max_clients);
        if bits == 0 || bits > max_bits {
            return Err(QuantizeError::Headroom {
                max_clients,
                bits,
                max_bits,
            });
        }
        Ok(Self {
            clip,
            bits,
            max_clients,
        })
    }

    /// The most bits per value for which `max_clients` values never overflow 32 bits (0 when
    /// none do).
    pub fn max_bits(max_clients: u64) -> u32 {
        if max_clients == 0 || max_clients > 1 << 31 {
            return 0;
        }
        // N·(2^b − 1) < 2^32  ⇐  N ≤ 2^(32−b).
        32 - max_clients.next_power_of_two().trailing_zeros()
    }

    /// Bits per value.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// The clipping bound `c`.
    pub fn clip(&self) -> f32 {
        self.clip
    }

    /// The number of clients a sum may have.
    pub fn max_clients(&self) -> u64 {
        self.max_clients
    }

    fn levels(&self) -> f64 {
        ((1u64 << self.bits) - 1) as f64
    }

    /// `x` clipped and quantized; a NaN maps to the midpoint (0.0).
    pub fn quantize(&self, x: f32) -> u32 {
        let c = f64::from(self.clip);
        let x = if x.is_nan() { 0.0 } else { f64::from(x) };
        let t = (x.clamp(-c, c) + c) / (2.0 * c);
        (t * self.levels()).round() as u32
    }

    /// `values` quantized into `out` (same length).
    pub fn quantize_into(&self, values: &[f32], out: &mut [u32]) {
        for (o, &x) in out.iter_mut().zip(values) {
            *o = self.quantize(x);
        }
    }

    /// The sum of `n` values whose quantized sum is `sum`.
    pub fn dequantize_sum(&self, sum: u32, n: u64) -> f64 {
        let c = f64::from(self.clip);
        f64::from(sum) * 2.0 * c / self.levels() - n as f64 * c
    }

    /// The largest difference, per coordinate, between the true sum of `n` values inside the
    /// clip range and [`Quantizer::dequantize_sum`] of their quantized sum: `n·c/L`.
    pub fn sum_error_bound(&self, n: u64) -> f64 {
        n as f64 * f64::from(self.clip) / self.levels()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn headroom_follows_the_number_of_clients() {
        assert_eq!(Quantizer::max_bits(1), 32);
        assert_eq!(Quantizer::max_bits(2), 31);
        assert_eq!(Quantizer::max_bits(10), 28);
        assert_eq!(Quantizer::max_bits(100), 25);
        assert_eq!(Quantizer::max_bits(1 << 31), 1);
        assert_eq!(Quantizer::max_bits(0), 0);
        assert_eq!(Quantizer::max_bits((1 << 31) + 1), 0);
        for n in [1u64, 2, 3, 10, 100, 1000, 1 << 20] {
            let b = Quantizer::max_bits(n);
            assert!(n * ((1u64 << b) - 1) < 1 << 32, "n {n}, {b} bits");
            if b < 32 {
                assert!(
                    n * ((1u64 << (b + 1)) - 1) >= 1 << 32,
                    "n {n}: {b} is the most"
                );
            }
        }
        let e = Quantizer::with_bits(1.0, 29, 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "10 clients with 29-bit values can overflow the 32-bit sum; use at most 28 bits for \
             10 clients"
        );
        assert!(matches!(
            Quantizer::new(0.0, 10),
            Err(QuantizeError::Clip(_))
        ));
        assert!(Quantizer::new(f32::INFINITY, 10).is_err());
    }

    #[test]
    fn the_extremes_of_n_clients_sum_without_wrapping() {
        for n in [1u64, 7, 10, 100, 1000] {
            let q = Quantizer::new(1.0, n).unwrap();
            let top = q.quantize(1.0);
            assert_eq!(u64::from(top), (1u64 << q.bits()) - 1);
            assert_eq!(q.quantize(-1.0), 0);
            let sum = (0..n).fold(0u32, |s, _| s.checked_add(top).expect("no overflow"));
            assert!((q.dequantize_sum(sum, n) - n as f64).abs() < 1e-6);
        }
    }

    #[test]
    fn sums_come_back_within_the_documented_bound() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (n, clip, bits) in [(10u64, 1.0f32, None), (100, 0.5, None), (10, 2.0, Some(12))] {
            let q = match bits {
                None => Quantizer::new(clip, n).unwrap(),
                Some(b) => Quantizer::with_bits(clip, b, n).unwrap(),
            };
            let bound = q.sum_error_bound(n);
            let mut worst = 0f64;
            for _ in 0..2000 {
                let xs: Vec<f32> = (0..n).map(|_| rng.random_range(-clip..=clip)).collect();
                let exact: f64 = xs.iter().map(|&x| f64::from(x)).sum();
                let sum = xs.iter().fold(0u32, |s, &x| s.wrapping_add(q.quantize(x)));
                worst = worst.max((q.dequantize_sum(sum, n) - exact).abs());
            }
            assert!(worst <= bound * (1.0 + 1e-9), "n {n}: {worst} > {bound}");
            // The bound is tight to within a small factor (rounding errors do add up).
            assert!(
                worst > bound / 50.0,
                "n {n}: bound {bound} far above {worst}"
            );
        }
    }

    #[test]
    fn values_outside_the_range_are_clipped_and_nan_is_neutral() {
        let q = Quantizer::new(1.0, 10).unwrap();
        assert_eq!(q.quantize(5.0), q.quantize(1.0));
        assert_eq!(q.quantize(-5.0), 0);
        assert_eq!(q.quantize(f32::NAN), q.quantize(0.0));
        let mut out = [0u32; 3];
        q.quantize_into(&[-1.0, 0.0, 1.0], &mut out);
        assert_eq!(out, [0, q.quantize(0.0), (1 << 28) - 1]);
    }
}
