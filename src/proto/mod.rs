//! Protocol v1: MQTT topics, control messages and blob references. No I/O, and no dependency on
//! the rest of the crate: every other layer builds on this one.
//!
//! Every control message is one JSON object, an [`Envelope`] holding the protocol version, run id,
//! round, message id, sender, timestamp and a typed [`Body`]. Model bytes never travel over MQTT:
//! messages carry [`BlobRef`]s (S3 key, byte length, SHA-256) instead. `docs/PROTOCOL.md` describes
//! the same wire format for implementers in other languages; keep the two in step.
//!
//! # Layout
//! - `topics.rs`: [`Topics`], the only place topic strings are built and parsed.
//! - `message.rs`: [`Envelope`], [`Body`] and the per-type structs.
//! - `codec.rs`: [`encode`] / [`decode`] with size limits and reasons for every rejection.
//! - `keys.rs`: [`BlobKeys`], the run- and round-scoped S3 key scheme.
//! - `secagg.rs`: the bodies of secure aggregation's stages ([`secagg::SecAggSetup`], ...).

mod codec;
mod keys;
mod message;
pub mod secagg;
mod topics;

pub use codec::{decode, encode, split_signed, DecodeError, MAX_MESSAGE_BYTES};
pub use keys::BlobKeys;
pub use message::*;
pub use secagg::{
    Neighbour, RevealedShare, SaCollect, SaKeys, SaMasked, SaReveal, SaRoster, SaShares, SaUnmask,
    SecAggSetup,
};
pub use topics::{TopicKind, Topics};

/// The protocol version this build speaks. Decoders reject any other.
pub const PROTOCOL_VERSION: u32 = 1;

/// The server's participant id: its topics, its key files and its store credential.
pub const SERVER_ID: &str = "server";

/// Length of a message signature in hex (an Ed25519 signature: 64 bytes).
pub const SIGNATURE_HEX_LEN: usize = 128;

/// Length in hex of a content key wrapped to one reader (ephemeral X25519 public key, the
/// encrypted key and its tag: 32 + 32 + 16 bytes).
pub const WRAPPED_KEY_HEX_LEN: usize = 160;

/// Checks an identifier used inside topics and keys (run ids, client ids): 1–64 characters from
/// `[A-Za-z0-9_-]`, so it can never inject MQTT wildcards (`+`, `#`), topic levels (`/`) or key
/// path segments.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
