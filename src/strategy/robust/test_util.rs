//! Deterministic pseudo-random numbers for tests (SplitMix64), so the
//! crate needs no `rand` dependency.

/// A tiny SplitMix64 generator.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub(crate) fn sym(&mut self) -> f32 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (2.0 * u - 1.0) as f32
    }

    /// A vector of `p` values uniform in [-scale, scale).
    pub(crate) fn vec(&mut self, p: usize, scale: f32) -> Vec<f32> {
        (0..p).map(|_| self.sym() * scale).collect()
    }
}

/// Builds updates with the given weight from owned deltas.
pub(crate) fn ups(deltas: &[Vec<f32>], weight: f64) -> Vec<super::Update<'_>> {
    deltas
        .iter()
        .map(|d| super::Update::new(d, weight))
        .collect()
}

pub(crate) fn l2(x: &[f32]) -> f64 {
    super::norm_sq(x).sqrt()
}
