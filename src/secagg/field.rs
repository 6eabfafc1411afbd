//! The prime field `GF(p)`, `p = 2^61 − 1` (a Mersenne prime: reduction is a shift and an add),
//! in which seeds are secret-shared ([`super::shamir`]).

/// The field's modulus, `2^61 − 1`.
pub const P: u64 = (1 << 61) - 1;

/// An element of `GF(2^61 − 1)`, always reduced (`< P`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Fp(u64);

impl Fp {
    /// Zero.
    pub const ZERO: Fp = Fp(0);
    /// One.
    pub const ONE: Fp = Fp(1);

    /// `v mod P`.
    pub fn new(v: u64) -> Self {
        Self(reduce64(v))
    }

    /// The element `v` when `v < P`: what a decoder of received values uses.
    pub fn canonical(v: u64) -> Option<Self> {
        (v < P).then_some(Self(v))
    }

    /// The reduced value.
    pub fn value(self) -> u64 {
        self.0
    }

    /// `self^e`.
    pub fn pow(self, mut e: u64) -> Self {
        let (mut base, mut acc) = (self, Fp::ONE);
        while e > 0 {
            if e & 1 == 1 {
                acc = acc * base;
            }
            base = base * base;
            e >>= 1;
        }
        acc
    }

    /// The multiplicative inverse (Fermat: `self^(P−2)`); `None` for zero.
    pub fn inverse(self) -> Option<Self> {
        (self.0 != 0).then(|| self.pow(P - 2))
    }
}

fn reduce64(v: u64) -> u64 {
    let r = (v & P) + (v >> 61);
    if r >= P {
        r - P
    } else {
        r
    }
}

impl std::ops::Add for Fp {
    type Output = Fp;
    fn add(self, o: Fp) -> Fp {
        // Both < 2^61: the sum fits in u64.
        Fp(reduce64(self.0 + o.0))
    }
}

impl std::ops::Sub for Fp {
    type Output = Fp;
    fn sub(self, o: Fp) -> Fp {
        Fp(reduce64(self.0 + (P - o.0)))
    }
}

impl std::ops::Mul for Fp {
    type Output = Fp;
    fn mul(self, o: Fp) -> Fp {
        let w = u128::from(self.0) * u128::from(o.0);
        // w < 2^122: w = hi·2^61 + lo ≡ hi + lo (mod P).
        let lo = (w as u64) & P;
        let hi = (w >> 61) as u64;
        Fp(reduce64(lo + hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn slow_mul(a: u64, b: u64) -> u64 {
        ((u128::from(a) * u128::from(b)) % u128::from(P)) as u64
    }

    #[test]
    fn arithmetic_matches_the_definition() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let edge = [0, 1, 2, P - 1, P - 2, 1 << 60, (1 << 61) - 2];
        let mut values: Vec<u64> = edge.to_vec();
        values.extend((0..200).map(|_| rng.random_range(0..P)));
        for &a in &values {
            for &b in values.iter().step_by(7) {
                let (x, y) = (Fp::new(a), Fp::new(b));
                assert_eq!((x * y).value(), slow_mul(a, b));
                assert_eq!(
                    (x + y).value(),
                    ((u128::from(a) + u128::from(b)) % u128::from(P)) as u64
                );
                assert_eq!((x - y + y), x);
            }
            if a != 0 {
                assert_eq!(Fp::new(a) * Fp::new(a).inverse().unwrap(), Fp::ONE);
            }
        }
        assert_eq!(Fp::new(P), Fp::ZERO);
        assert_eq!(Fp::new(u64::MAX).value(), u64::MAX % P);
        assert_eq!(Fp::ZERO.inverse(), None);
        assert_eq!(Fp::canonical(P), None);
        assert_eq!(Fp::canonical(P - 1), Some(Fp::new(P - 1)));
    }
}
