//! Branch-free `exp`, sigmoid and tanh that the compiler vectorizes over slices.
//!
//! Why: a training step of the char-LSTM (`lstm`) evaluates five transcendental functions per
//! hidden unit, time step, sample and layer (13 M for batch 64), which with `f32::exp` (a libm
//! call per element) costs about as much as the matrix products. These use Cephes' single-precision
//! polynomials (relative error about 2e-7, like libm's) and only operations with SIMD forms.

/// Cephes `expf` polynomial for `exp(r) - 1 - r` over `|r| ≤ ln2 / 2`, highest degree first.
const EXP_P: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5e-1,
];

/// `exp(x)`, clamped to the finite normal range (`x` in [-87, 88]).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Rounding by adding 1.5·2²³: the integer lands in the low mantissa bits (no int/float
    // conversion instruction needed, which SSE2 lacks in vector form for rounding).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let kf = x * std::f32::consts::LOG2_E + MAGIC;
    let ki = kf.to_bits() as i32 - MAGIC.to_bits() as i32;
    let k = kf - MAGIC;
    // ln 2 split in a part exact in f32 times small integers, and the rest.
    let r = x - k * 0.693_359_4 + k * 2.121_944_4e-4;
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p * r + c;
    }
    let e = 1.0 + r + r * r * p;
    e * f32::from_bits(((ki + 127) << 23) as u32)
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `tanh(x)`: Cephes' odd polynomial below 0.625 (where `1 - 2/(e^2x + 1)` would lose relative
/// accuracy), the exponential form above.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let small =
        ((((-5.704_988_7e-3 * z + 2.063_909e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z
            - 3.333_328e-1)
            * z
            * x
            + x;
    let big = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    if a < 0.625 {
        small
    } else {
        big.copysign(x)
    }
}

/// `x ← sigmoid(x)` elementwise.
pub fn sigmoid_inplace(x: &mut [f32]) {
    for v in x {
        *v = sigmoid(*v);
    }
}

/// `x ← tanh(x)` elementwise.
pub fn tanh_inplace(x: &mut [f32]) {
    for v in x {
        *v = tanh(*v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_std() {
        let mut worst = [0.0f64; 3];
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            let pairs = [
                (exp(x), x.exp()),
                (sigmoid(x), 1.0 / (1.0 + (-x).exp())),
                (tanh(x), x.tanh()),
            ];
            for (w, (got, want)) in worst.iter_mut().zip(pairs) {
                let rel = ((got - want) as f64).abs() / (want as f64).abs().max(1e-30);
                *w = w.max(rel);
            }
        }
        assert!(worst.iter().all(|&w| w < 1e-6), "relative errors {worst:?}");
        assert!(exp(-1000.0) > 0.0 && exp(1000.0).is_finite());
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
        assert!(sigmoid(-200.0) >= 0.0);
    }
}
