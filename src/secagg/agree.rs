//! Per-round X25519 key pairs and the pairwise seeds two clients agree on without talking to each
//! other: each publishes its public key (signed, through the server), and the two ends of a pair
//! derive the same 32-byte seed.
//!
//! `seed = HKDF-SHA256(ikm = X25519(a, B), salt = min(A, B) ‖ max(A, B),
//! info = "fedmq/v1 secagg pairwise" ‖ context)`, with `A`, `B` the two public keys (compared as
//! byte strings) and `context` naming the run and round, so a pair's seed is never reused across
//! rounds even if keys were.

use super::mask::Seed;
use crate::crypto::seal::hkdf32;
use curve25519_dalek::montgomery::MontgomeryPoint;

/// A client's X25519 key pair for one round.
#[derive(Clone)]
pub struct KeyPair {
    secret: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

/// Why two keys do not agree on a seed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgreeError {
    /// The peer's public key is a low-order point: the shared secret would be all zeros,
    /// which anyone can compute.
    #[error("the peer's public key is a low-order point (shared secret all zero)")]
    LowOrder,
}

impl KeyPair {
    /// A fresh key pair from the system's CSPRNG.
    pub fn generate() -> Self {
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
        Self::from_secret(secret)
    }

    /// The key pair of `secret` (clamped as X25519 does).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let public = MontgomeryPoint::mul_base_clamped(secret).to_bytes();
        Self { secret, public }
    }

    /// The public key, to publish.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The secret key: SecAgg+ shares it among the client's neighbours, so that the server can
    /// remove this client's pairwise masks if it drops out.
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The seed this key pair shares with the owner of `their_public` for `context`.
    ///
    /// # Errors
    /// [`AgreeError::LowOrder`].
    pub fn pairwise_seed(
        &self,
        their_public: &[u8; 32],
        context: &[u8],
    ) -> Result<Seed, AgreeError> {
        let shared = MontgomeryPoint(*their_public)
            .mul_clamped(self.secret)
            .to_bytes();
        if shared == [0u8; 32] {
            return Err(AgreeError::LowOrder);
        }
        let (lo, hi) = if self.public <= *their_public {
            (&self.public, their_public)
        } else {
            (their_public, &self.public)
        };
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(lo);
        salt[32..].copy_from_slice(hi);
        Ok(hkdf32(
            &shared,
            &salt,
            &[b"fedmq/v1 secagg pairwise", context],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_derive_the_same_seed_and_only_they_do() {
        let (a, b, c) = (
            KeyPair::generate(),
            KeyPair::generate(),
            KeyPair::generate(),
        );
        let ab = a.pairwise_seed(&b.public(), b"run/1").unwrap();
        assert_eq!(ab, b.pairwise_seed(&a.public(), b"run/1").unwrap());
        assert_ne!(ab, a.pairwise_seed(&c.public(), b"run/1").unwrap());
        assert_ne!(ab, c.pairwise_seed(&b.public(), b"run/1").unwrap());
        assert_ne!(
            ab,
            a.pairwise_seed(&b.public(), b"run/2").unwrap(),
            "per round"
        );
        // The secret key gives the key pair back (what a neighbour's recovered share yields).
        let again = KeyPair::from_secret(*a.secret());
        assert_eq!(again.public(), a.public());
        assert_eq!(again.pairwise_seed(&b.public(), b"run/1").unwrap(), ab);
    }

    #[test]
    fn x25519_is_rfc_7748s_and_low_order_points_are_refused() {
        // RFC 7748, section 6.1: Alice's and Bob's keys.
        let alice: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap();
        let a = KeyPair::from_secret(alice);
        assert_eq!(
            hex::encode(a.public()),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        let zero = [0u8; 32];
        assert_eq!(a.pairwise_seed(&zero, b"x"), Err(AgreeError::LowOrder));
    }
}
