//! Secure aggregation: the server learns only the sum of the surviving clients' updates
//! (issue 12, in progress). This module holds the arithmetic both sides share; the protocol
//! stages build on it.
//!
//! - [`quantize`]: updates clipped and mapped to the ring `Z_{2^32}` where masked sums are
//!   computed, with a headroom that keeps the sum of up to `N` clients from wrapping, and the
//!   error bound of the round trip.
//! - [`mask`]: the pseudo-random masks: ChaCha20 keystream words from a 32-byte seed, added or
//!   removed with wrapping arithmetic.
//! - [`agree`]: per-round X25519 key pairs and the pairwise seeds two clients derive (HKDF).
//! - [`field`]: `GF(2^61 − 1)`, the field seeds are shared in.
//! - [`shamir`]: Shamir shares of 32-byte seeds (`t` of `n` recover; fewer reveal nothing),
//!   with a consistency check and a 66-byte wire form.

pub mod agree;
pub mod field;
pub mod mask;
pub mod quantize;
pub mod shamir;
