//! Encoding and decoding of control messages, with a reason for every rejection.
//!
//! Decoding never panics: it runs a size check, then a probe for the version field (so a message
//! from a newer protocol is reported as such rather than as "malformed"), then the typed parse
//! (serde_json bounds nesting depth), then [`Envelope::validate`].

use super::{Envelope, PROTOCOL_VERSION};
use serde::Deserialize;

/// Largest control message accepted, in bytes. Control messages are small (a few hundred bytes);
/// model bytes go through the object store. MQTT clients set their maximum packet size above this.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Why a message was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Received length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not a JSON object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// No integer `v` field.
    #[error("missing or non-integer protocol version field `v`")]
    MissingVersion,
    /// A version this build does not speak.
    #[error("unsupported protocol version {got} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version in the message.
        got: u64,
    },
    /// JSON of the right version but wrong shape (missing field, unknown type, wrong type).
    #[error("malformed v1 message: {0}")]
    Malformed(String),
    /// Well-formed but with invalid values.
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// Serializes a message to its wire form (compact JSON).
pub fn encode(msg: &Envelope) -> Vec<u8> {
    // Invariant: every field of Envelope serializes (no maps with non-string keys, no NaN
    // sources other than f64 fields, which serde_json writes as `null` rather than failing).
    serde_json::to_vec(msg).unwrap_or_default()
}

#[derive(Deserialize)]
struct Probe {
    v: Option<serde_json::Value>,
}

/// Parses and validates a message.
///
/// # Errors
/// A [`DecodeError`] saying why the bytes are not a valid v1 message.
pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    // A signed message is its JSON, `\n`, and a signature (see `split_signed`): decode the JSON.
    let bytes = split_signed(bytes).0;
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let v = probe
        .v
        .and_then(|v| v.as_u64())
        .ok_or(DecodeError::MissingVersion)?;
    if v != u64::from(PROTOCOL_VERSION) {
        return Err(DecodeError::UnsupportedVersion { got: v });
    }
    let msg: Envelope =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    msg.validate().map_err(DecodeError::Invalid)?;
    Ok(msg)
}

/// Splits a payload into its JSON part and its signature, if it has one: the signature is the
/// text after the last `\n` when that is exactly [`super::SIGNATURE_HEX_LEN`] hex digits (JSON written
/// by hand may contain newlines of its own).
pub fn split_signed(payload: &[u8]) -> (&[u8], Option<&[u8]>) {
    match payload.iter().rposition(|&b| b == b'\n') {
        Some(i)
            if payload.len() - i - 1 == super::SIGNATURE_HEX_LEN
                && payload[i + 1..].iter().all(u8::is_ascii_hexdigit) =>
        {
            (&payload[..i], Some(&payload[i + 1..]))
        }
        _ => (payload, None),
    }
}

#[cfg(test)]
mod tests;
