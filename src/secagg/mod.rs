//! Secure aggregation: the server learns only the sum of the surviving clients' updates
//! (SecAgg+, Bell et al., CCS 2020; the wire format is in `docs/PROTOCOL.md`, "Secure
//! aggregation", and the threat model in `docs/SECURITY.md`).
//!
//! - [`quantize`]: updates clipped and mapped to the ring `Z_{2^32}` where masked sums are
//!   computed, with a headroom that keeps the sum of up to `N` clients from wrapping, and the
//!   error bound of the round trip.
//! - [`mask`]: the pseudo-random masks: AES-256-CTR keystream words from a 32-byte seed, added or
//!   removed with wrapping arithmetic.
//! - [`agree`]: per-round X25519 key pairs and the pairwise seeds two clients derive (HKDF).
//! - [`field`]: `GF(2^61 − 1)`, the field seeds are shared in.
//! - [`shamir`]: Shamir shares of 32-byte seeds (`t` of `n` recover; fewer reveal nothing),
//!   with a consistency check and a 66-byte wire form.
//! - [`light`]: LightSecAgg (So et al., MLSys 2022): coded mask shares over `GF(2^32 − 5)` and
//!   one-shot reconstruction of the survivors' aggregate mask.
//! - [`graph`]: the random `k`-regular neighbour graph, and `t` and `k` for `N` clients.
//! - [`bundle`]: the share bundle blob, each neighbour's shares encrypted to it.
//! - [`client`]: [`ClientSession`], a client's stages without I/O.
//! - [`server`]: [`ServerSession`], the server's stages and the unmasking, without I/O.
//! - The masked-input blob ([`encode_masked`], [`decode_masked`]).

pub mod agree;
pub mod bundle;
pub mod client;
pub mod field;
pub mod graph;
pub mod light;
pub mod mask;
pub mod quantize;
pub mod server;
pub mod shamir;

pub use client::{ClientSession, Reveal};
pub use graph::Params;
pub use light::LightParams;
pub use server::{Inboxes, ServerSession, Stage, Unmasked};

use mask::Sign;
use safetensors::tensor::{Dtype, TensorView};

/// The protocol of a round and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// SecAgg+ with its threshold `t` and degree `k`.
    Plus(Params),
    /// LightSecAgg with `U` and `T`.
    Light(LightParams),
}

impl From<Params> for Method {
    fn from(p: Params) -> Self {
        Method::Plus(p)
    }
}

/// Why a secure-aggregation step failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    /// A request the protocol forbids, or one out of order.
    #[error("refused: {0}")]
    Refused(String),
    /// Bytes or keys that do not check out.
    #[error("{0}")]
    Invalid(String),
    /// Fewer participants (or shares) than the threshold: nothing is unmasked.
    #[error("only {got} {what}, {needed} needed (the threshold); nothing was unmasked")]
    BelowThreshold {
        /// What was counted.
        what: String,
        /// How many there were.
        got: usize,
        /// The threshold.
        needed: usize,
    },
    /// Shares that cannot be made or combined.
    #[error("shares: {0}")]
    Shamir(#[from] shamir::ShamirError),
}

/// The largest share bundle or inbox a round with `setup` can have, in bytes.
pub fn max_bundle_bytes(setup: &crate::proto::SecAggSetup) -> u64 {
    if setup.method == crate::proto::secagg::LIGHT_SECAGG {
        let pieces = u64::from(setup.threshold.saturating_sub(setup.privacy).max(1));
        let ell = setup.length.div_ceil(pieces);
        // Each entry: the sealed share and its safetensors header line.
        u64::from(setup.selected) * (4 * ell + bundle::TAG_BYTES as u64 + 256) + 4096
    } else {
        bundle::MAX_BUNDLE_BYTES as u64
    }
}

/// The context string of a round, bound into every derived key: `<run>|<round>`.
pub fn context(run: &str, round: u64) -> String {
    format!("{run}|{round}")
}

/// The HKDF context of pairwise masks: `mask|<run>|<round>`.
pub(crate) fn mask_context(context: &str) -> String {
    format!("mask|{context}")
}

/// How client `me` applies its pairwise mask with `peer`: added by the client whose id sorts
/// first, subtracted by the other, so the pair cancels in the sum.
pub(crate) fn pair_sign(me: &str, peer: &str) -> Sign {
    if me < peer {
        Sign::Add
    } else {
        Sign::Sub
    }
}

/// Name of the one tensor of a masked-input blob.
pub const MASKED_TENSOR: &str = "secagg/masked";

/// A masked input as a blob: safetensors with one `U32` tensor [`MASKED_TENSOR`] of shape `[P]`.
pub fn encode_masked(values: &[u32]) -> Vec<u8> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::U32, vec![values.len()], &bytes)
        .unwrap_or_else(|_| unreachable!("shape and length agree"));
    safetensors::serialize([(MASKED_TENSOR, view)], None)
        .unwrap_or_else(|_| unreachable!("one well-formed tensor"))
}

/// The values of a masked-input blob.
///
/// # Errors
/// [`SecAggError::Invalid`]: not safetensors, or not exactly one `U32` vector named
/// [`MASKED_TENSOR`].
pub fn decode_masked(blob: &[u8]) -> Result<Vec<u32>, SecAggError> {
    let bad = |why: String| SecAggError::Invalid(format!("not a masked input: {why}"));
    let st = safetensors::SafeTensors::deserialize(blob).map_err(|e| bad(e.to_string()))?;
    if st.len() != 1 {
        return Err(bad(format!("{} tensors", st.len())));
    }
    let t = st
        .tensor(MASKED_TENSOR)
        .map_err(|_| bad(format!("no tensor {MASKED_TENSOR:?}")))?;
    if t.dtype() != Dtype::U32 || t.shape().len() != 1 {
        return Err(bad("the tensor is not a U32 vector".into()));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests;
