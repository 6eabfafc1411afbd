//! Shamir secret sharing of 32-byte seeds over [`GF(2^61 − 1)`](super::field).
//!
//! The seed is read as eight little-endian `u32` limbs; each limb `s` is the constant term of a
//! polynomial `f(z) = s + a₁z + … + a_{t−1}z^{t−1}` with coefficients drawn uniformly from the
//! field. Participant `x ∈ 1..=65535` gets `f(x)` for all eight limbs. Any `t` shares give the
//! seed back by Lagrange interpolation at 0; `t − 1` or fewer are uniformly distributed whatever
//! the seed, so they say nothing about it. A recovered limb that is not below `2^32` means the
//! shares are not of one seed, and recovery fails: shares mixed from two sharings, or a share
//! garbled at random, are caught with probability `1 − 2^−29` per limb. This is no authenticity
//! check (a deliberate small change to a share shifts the result undetected): shares travel
//! signed and encrypted to their recipient.
//!
//! Wire form of a share (66 bytes): `x` as `u16` little-endian, then the eight values as `u64`
//! little-endian, each below `2^61 − 1`.

use super::field::Fp;
use rand::{CryptoRng, Rng};

/// A secret: a 32-byte seed.
pub type Secret = [u8; 32];

const LIMBS: usize = 8;

/// Bytes of an encoded [`Share`].
pub const SHARE_BYTES: usize = 2 + 8 * LIMBS;

/// One participant's share of a seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The evaluation point (the participant's index, ≥ 1).
    pub x: u16,
    ys: [Fp; LIMBS],
}

/// Why shares cannot be made or combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    /// The threshold is 0 or above the number of participants.
    #[error("threshold {threshold} is not in 1..={participants} (the number of participants)")]
    Threshold {
        /// The threshold asked for.
        threshold: usize,
        /// The participants.
        participants: usize,
    },
    /// More participants than evaluation points.
    #[error("{0} participants: at most 65535 can share a secret")]
    TooMany(usize),
    /// Fewer shares than the threshold.
    #[error("{got} shares, {threshold} needed to recover the secret")]
    TooFew {
        /// Shares given.
        got: usize,
        /// The threshold.
        threshold: usize,
    },
    /// Two shares with one evaluation point.
    #[error("two shares for participant {0}")]
    Duplicate(u16),
    /// The shares interpolate to something that is not a seed.
    #[error("the shares are not of one secret (one was altered or belongs to another sharing)")]
    Inconsistent,
    /// Bytes that are not a share.
    #[error("a share is {SHARE_BYTES} bytes with x ≥ 1 and values below 2^61 − 1: {0}")]
    Malformed(&'static str),
}

/// Splits `secret` into shares for participants `1..=participants`, any `threshold` of which
/// recover it.
///
/// # Errors
/// [`ShamirError::Threshold`], [`ShamirError::TooMany`].
pub fn split<R: Rng + CryptoRng>(
    secret: &Secret,
    threshold: usize,
    participants: usize,
    rng: &mut R,
) -> Result<Vec<Share>, ShamirError> {
    if participants > usize::from(u16::MAX) {
        return Err(ShamirError::TooMany(participants));
    }
    if threshold == 0 || threshold > participants {
        return Err(ShamirError::Threshold {
            threshold,
            participants,
        });
    }
    // coefficients[l] = [s_l, a_1, …, a_{t−1}] for limb l.
    let coefficients: Vec<Vec<Fp>> = secret
        .chunks_exact(4)
        .map(|limb| {
            let s = u32::from_le_bytes([limb[0], limb[1], limb[2], limb[3]]);
            std::iter::once(Fp::new(u64::from(s)))
                .chain((1..threshold).map(|_| Fp::new(rng.random_range(0..super::field::P))))
                .collect()
        })
        .collect();
    Ok((1..=participants as u16)
        .map(|x| {
            let z = Fp::new(u64::from(x));
            let mut ys = [Fp::ZERO; LIMBS];
            for (y, c) in ys.iter_mut().zip(&coefficients) {
                // Horner.
                *y = c.iter().rev().fold(Fp::ZERO, |acc, &a| acc * z + a);
            }
            Share { x, ys }
        })
        .collect())
}

/// The secret from at least `threshold` shares (the first `threshold` are used).
///
/// # Errors
/// [`ShamirError::TooFew`], [`ShamirError::Duplicate`], [`ShamirError::Inconsistent`].
pub fn recover(shares: &[Share], threshold: usize) -> Result<Secret, ShamirError> {
    if threshold == 0 || shares.len() < threshold {
        return Err(ShamirError::TooFew {
            got: shares.len(),
            threshold,
        });
    }
    let used = &shares[..threshold];
    for (i, a) in used.iter().enumerate() {
        if used[..i].iter().any(|b| b.x == a.x) {
            return Err(ShamirError::Duplicate(a.x));
        }
    }
    // Lagrange basis at 0: λ_i = Π_{j≠i} x_j / (x_j − x_i).
    let xs: Vec<Fp> = used.iter().map(|s| Fp::new(u64::from(s.x))).collect();
    let lambdas: Vec<Fp> = xs
        .iter()
        .enumerate()
        .map(|(i, &xi)| {
            let (num, den) = xs
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .fold((Fp::ONE, Fp::ONE), |(n, d), (_, &xj)| {
                    (n * xj, d * (xj - xi))
                });
            num * den.inverse().expect("distinct points: nonzero denominator")
        })
        .collect();
    let mut secret = [0u8; 32];
    for (l, out) in secret.chunks_exact_mut(4).enumerate() {
        let s = used
            .iter()
            .zip(&lambdas)
            .fold(Fp::ZERO, |acc, (sh, &lam)| acc + sh.ys[l] * lam);
        let limb = u32::try_from(s.value()).map_err(|_| ShamirError::Inconsistent)?;
        out.copy_from_slice(&limb.to_le_bytes());
    }
    Ok(secret)
}

impl Share {
    /// The wire form ([`SHARE_BYTES`] bytes).
    pub fn to_bytes(&self) -> [u8; SHARE_BYTES] {
        let mut b = [0u8; SHARE_BYTES];
        b[..2].copy_from_slice(&self.x.to_le_bytes());
        for (chunk, y) in b[2..].chunks_exact_mut(8).zip(&self.ys) {
            chunk.copy_from_slice(&y.value().to_le_bytes());
        }
        b
    }

    /// A share from its wire form.
    ///
    /// # Errors
    /// [`ShamirError::Malformed`]: wrong length, `x = 0`, a value not below the modulus.
    pub fn from_bytes(b: &[u8]) -> Result<Self, ShamirError> {
        if b.len() != SHARE_BYTES {
            return Err(ShamirError::Malformed("wrong length"));
        }
        let x = u16::from_le_bytes([b[0], b[1]]);
        if x == 0 {
            return Err(ShamirError::Malformed("x is 0"));
        }
        let mut ys = [Fp::ZERO; LIMBS];
        for (y, chunk) in ys.iter_mut().zip(b[2..].chunks_exact(8)) {
            let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            *y = Fp::canonical(v).ok_or(ShamirError::Malformed("a value is not below 2^61 − 1"))?;
        }
        Ok(Self { x, ys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn secret(tag: u8) -> Secret {
        std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ tag)
    }

    #[test]
    fn any_threshold_of_the_shares_recover_the_secret() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        for (t, n) in [(1, 1), (1, 5), (3, 5), (5, 5), (6, 10), (51, 100)] {
            let s = secret(t as u8);
            let shares = split(&s, t, n, &mut rng).unwrap();
            assert_eq!(shares.len(), n);
            // Several subsets of size t, in different orders.
            for start in 0..n.min(4) {
                let subset: Vec<Share> = (0..t)
                    .map(|k| shares[(start + 3 * k) % n].clone())
                    .collect();
                let distinct = subset
                    .iter()
                    .map(|s| s.x)
                    .collect::<std::collections::BTreeSet<_>>();
                if distinct.len() == t {
                    assert_eq!(recover(&subset, t).unwrap(), s, "t {t} n {n} from {start}");
                }
            }
            let last: Vec<Share> = shares[n - t..].iter().rev().cloned().collect();
            assert_eq!(recover(&last, t).unwrap(), s);
        }
    }

    #[test]
    fn fewer_than_threshold_shares_do_not_depend_on_the_secret() {
        // With t = 3, two shares are uniform in the field whatever the secret: the same
        // randomness gives different secrets shares that are a fixed shift apart, and over many
        // sharings the values cover the field evenly (here: their top bits).
        let (a, b) = (secret(1), secret(2));
        let mut buckets = [[0u32; 8]; 2];
        for (k, s) in [a, b].iter().enumerate() {
            let mut rng = ChaCha20Rng::seed_from_u64(11);
            for _ in 0..4000 {
                let shares = split(s, 3, 5, &mut rng).unwrap();
                for sh in &shares[..2] {
                    buckets[k][(sh.ys[0].value() >> 58) as usize] += 1;
                }
            }
        }
        for (k, counts) in buckets.iter().enumerate() {
            for &c in counts {
                // 8000 values in 8 buckets: 1000 each, ±4.5σ.
                assert!((860..=1140).contains(&c), "secret {k}: {counts:?}");
            }
        }
        // And t − 1 shares do not recover it.
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let shares = split(&a, 3, 5, &mut rng).unwrap();
        assert_eq!(
            recover(&shares[..2], 3),
            Err(ShamirError::TooFew {
                got: 2,
                threshold: 3
            })
        );
    }

    #[test]
    fn altered_duplicate_and_malformed_shares_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let s = secret(9);
        let mut shares = split(&s, 3, 5, &mut rng).unwrap();
        let dup = vec![shares[0].clone(), shares[0].clone(), shares[1].clone()];
        assert_eq!(recover(&dup, 3), Err(ShamirError::Duplicate(1)));
        shares[1].ys[4] = Fp::new(0x1234_5678_9abc_def0);
        assert_eq!(recover(&shares[..3], 3), Err(ShamirError::Inconsistent));
        // Shares of another sharing of the same secret do not mix.
        let other = split(&s, 3, 5, &mut rng).unwrap();
        let mixed = vec![shares[0].clone(), shares[2].clone(), other[3].clone()];
        assert_eq!(recover(&mixed, 3), Err(ShamirError::Inconsistent));

        let bytes = shares[0].to_bytes();
        assert_eq!(Share::from_bytes(&bytes).unwrap(), shares[0]);
        assert!(Share::from_bytes(&bytes[..65]).is_err());
        let mut zero = bytes;
        zero[..2].copy_from_slice(&[0, 0]);
        assert_eq!(
            Share::from_bytes(&zero),
            Err(ShamirError::Malformed("x is 0"))
        );
        let mut big = bytes;
        big[2..10].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Share::from_bytes(&big).is_err());
        assert!(matches!(
            split(&s, 0, 5, &mut rng),
            Err(ShamirError::Threshold { .. })
        ));
        assert!(split(&s, 6, 5, &mut rng).is_err());
        assert_eq!(
            split(&s, 2, 70_000, &mut rng),
            Err(ShamirError::TooMany(70_000))
        );
    }

    #[test]
    fn the_wire_form_is_as_documented() {
        // t = 1: the polynomial is the secret itself, so every share carries the limbs.
        let s = secret(0);
        let shares = split(&s, 1, 2, &mut ChaCha20Rng::seed_from_u64(0)).unwrap();
        let b = shares[1].to_bytes();
        assert_eq!(&b[..2], &[2, 0]);
        let limb0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        assert_eq!(&b[2..10], &u64::from(limb0).to_le_bytes());
    }
}
