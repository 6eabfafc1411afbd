//! Sealed blobs: every model blob is encrypted and authenticated (AES-256-GCM) before it leaves
//! its writer, and its key travels only inside signed control messages, wrapped to each reader.
//!
//! # Key scheme
//! - **Content key.** The writer draws a fresh random 256-bit content key per blob. The blob's
//!   AEAD key is HKDF-SHA256(content key, salt = the blob header's random salt, info = label,
//!   mode and object key), so a blob is bound to its object key: moved to another key, it does
//!   not open.
//! - **Wrapped to each reader.** For every reader the content key is wrapped with X25519
//!   (ephemeral-static) + HKDF-SHA256 + ChaCha20-Poly1305 to the reader's X25519 key, which is its
//!   Ed25519 identity key (`fedmq keys`) mapped to Curve25519, as age does for ssh-ed25519
//!   recipients. The wrapped key (80 bytes, 160 hex digits) rides in the [`BlobRef`] of the
//!   signed message that names the blob: `train` (wrapped to that client), `update` (wrapped to
//!   the server), `finish` (wrapped to that client). It is never written to the store.
//! - **The server's own blobs** (checkpoints) use a key derived from the server's secret key and
//!   the blob's salt, so a checkpoint can be opened again only with that secret key.
//!
//! Someone holding the store's credentials sees the header (format, length, salt) and
//! ciphertext; altering, truncating, extending or moving a blob is detected before any byte of it
//! is used.
//!
//! # Blob format
//! A 56-byte header, then the plaintext in chunks of `2^chunk_log2` bytes (the last one shorter;
//! an empty blob is one empty chunk), each followed by its 16-byte tag.
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `fedmqSB1` |
//! | 8 | mode: 1 content key wrapped to readers, 2 writer's own key |
//! | 9 | `chunk_log2` (16..=24) |
//! | 10..16 | zero |
//! | 16..24 | plaintext length, u64 little-endian |
//! | 24..56 | random salt |
//!
//! Chunk `i` is sealed with nonce `last ‖ 0 0 0 ‖ i` (`last` = 1 on the final chunk, `i` as u64
//! big-endian) and the header as associated data: chunks cannot be reordered, dropped or
//! appended. Chunks are independent, so large blobs seal and open in parallel.

use crate::crypto::identity::{Identity, Keyring};
use crate::proto::BlobRef;
use bytes::{Bytes, BytesMut};
use rayon::prelude::*;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use std::sync::Arc;

/// Bytes of the blob header.
pub const HEADER_LEN: usize = 56;
/// Bytes of each chunk's tag.
pub const TAG_LEN: usize = 16;
// Hex digits of a wrapped content key: part of the protocol.
pub use crate::proto::WRAPPED_KEY_HEX_LEN;
const WRAPPED_KEY_LEN: usize = 32 + 32 + TAG_LEN;
const _: () = assert!(WRAPPED_KEY_HEX_LEN == 2 * WRAPPED_KEY_LEN);
const MAGIC: &[u8; 8] = b"fedmqSB1";
const DEFAULT_CHUNK_LOG2: u8 = 20;
const MODE_WRAPPED: u8 = 1;
const MODE_OWN: u8 = 2;

/// Why a blob or a wrapped key does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not a sealed blob, or one of another format version.
    #[error("{key}: not a sealed fedmq blob ({reason})")]
    Format {
        /// Object key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The ciphertext or header was altered, truncated, moved, or sealed with another key.
    #[error("{key}: sealed blob does not authenticate (altered, truncated, moved to another key, or not sealed for this participant)")]
    Tampered {
        /// Object key.
        key: String,
    },
    /// The wrapped key is malformed or not wrapped to this participant.
    #[error("{key}: the blob's wrapped key does not open with {who}'s key ({reason})")]
    Unwrap {
        /// Object key.
        key: String,
        /// This participant.
        who: String,
        /// What failed.
        reason: String,
    },
    /// The blob should be sealed but its reference carries no wrapped key.
    #[error("{key}: blob is not sealed but this federation requires sealed blobs (fedmq_args.encrypt_blobs); was it written by a participant without encryption?")]
    NotSealed {
        /// Object key.
        key: String,
    },
    /// No public key to wrap to.
    #[error("no trusted key for {0:?}: cannot seal a blob for it (add its .pub to fedmq_args.trusted_keys)")]
    UnknownRecipient(String),
}

/// A blob's 256-bit content key. Not `Debug`, not `Clone` outside this module: it exists only
/// in memory, between sealing and wrapping.
pub struct ContentKey([u8; 32]);

impl ContentKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut k);
        Self(k)
    }
}

impl Drop for ContentKey {
    fn drop(&mut self) {
        // Best effort: volatile writes so the compiler keeps the wipe.
        for b in &mut self.0 {
            // SAFETY: `b` is a valid, aligned &mut u8.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Length of the sealed form of `len` plaintext bytes (default chunk size).
pub fn sealed_len(len: usize) -> usize {
    sealed_len_with(len, DEFAULT_CHUNK_LOG2)
}

fn sealed_len_with(len: usize, chunk_log2: u8) -> usize {
    let chunk = 1usize << chunk_log2;
    HEADER_LEN + len + TAG_LEN * len.div_ceil(chunk).max(1)
}

/// Whether `bytes` start like a sealed blob.
pub fn looks_sealed(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER_LEN && &bytes[..8] == MAGIC
}

/// This participant's blob encryption: its identity (to open blobs wrapped to it) and the
/// trusted keys of the participants it writes blobs for.
#[derive(Debug, Clone)]
pub struct BlobCrypto {
    me: Arc<Identity>,
    peers: Arc<Keyring>,
}

impl BlobCrypto {
    /// Encryption as `me`, writing for the participants in `peers`.
    pub fn new(me: Arc<Identity>, peers: Arc<Keyring>) -> Self {
        Self { me, peers }
    }

    /// This participant's id.
    pub fn id(&self) -> &str {
        self.me.id()
    }

    /// Seals `plaintext` for `object_key` under a fresh content key; wrap it to readers with
    /// [`wrap`](Self::wrap).
    pub fn seal(&self, object_key: &str, plaintext: &[u8]) -> (Vec<u8>, ContentKey) {
        let ck = ContentKey::generate();
        let sealed = seal_with(MODE_WRAPPED, &ck.0, object_key, plaintext);
        (sealed, ck)
    }

    /// Seals `plaintext` for `object_key` under `ck` (a key drawn once for this blob).
    pub fn seal_with_key(&self, ck: &ContentKey, object_key: &str, plaintext: &[u8]) -> Vec<u8> {
        seal_with(MODE_WRAPPED, &ck.0, object_key, plaintext)
    }

    /// Seals `plaintext` so that only this participant can open it again
    /// ([`open_own`](Self::open_own)), with no key to keep: checkpoints.
    pub fn seal_own(&self, object_key: &str, plaintext: &[u8]) -> Vec<u8> {
        seal_with(MODE_OWN, &self.me.secret_seed(), object_key, plaintext)
    }

    /// Opens a blob sealed with [`seal_own`](Self::seal_own).
    ///
    /// # Errors
    /// [`SealError::Format`], [`SealError::Tampered`].
    pub fn open_own(&self, object_key: &str, bytes: Bytes) -> Result<Bytes, SealError> {
        open_bytes(MODE_OWN, &self.me.secret_seed(), object_key, bytes)
    }

    /// `ck` wrapped to `recipient` for the blob at `object_key`, as the hex text of
    /// [`BlobRef::wrapped_key`].
    ///
    /// # Errors
    /// [`SealError::UnknownRecipient`] when `recipient` has no trusted key (this participant
    /// itself always has one).
    pub fn wrap(
        &self,
        ck: &ContentKey,
        object_key: &str,
        recipient: &str,
    ) -> Result<String, SealError> {
        let public = if recipient == self.me.id() {
            self.me.x25519_public()
        } else {
            self.peers
                .x25519_public(recipient)
                .ok_or_else(|| SealError::UnknownRecipient(recipient.to_string()))?
        };
        Ok(hex::encode(wrap_key(&ck.0, &public, object_key)))
    }

    /// A copy of `blob` carrying `ck` wrapped to `recipient`.
    ///
    /// # Errors
    /// As [`wrap`](Self::wrap).
    pub fn wrapped_ref(
        &self,
        blob: &BlobRef,
        ck: &ContentKey,
        recipient: &str,
    ) -> Result<BlobRef, SealError> {
        Ok(BlobRef {
            wrapped_key: Some(self.wrap(ck, &blob.key, recipient)?),
            ..blob.clone()
        })
    }

    /// Unwraps the content key `blob` carries for this participant.
    ///
    /// # Errors
    /// [`SealError::NotSealed`] when it carries none, [`SealError::Unwrap`] when it does not
    /// open with this participant's key.
    pub fn unwrap(&self, blob: &BlobRef) -> Result<ContentKey, SealError> {
        let wrapped = blob
            .wrapped_key
            .as_deref()
            .ok_or_else(|| SealError::NotSealed {
                key: blob.key.clone(),
            })?;
        let fail = |reason: &str| SealError::Unwrap {
            key: blob.key.clone(),
            who: self.me.id().to_string(),
            reason: reason.to_string(),
        };
        if wrapped.len() != WRAPPED_KEY_HEX_LEN {
            return Err(fail("wrong length"));
        }
        let raw = hex::decode(wrapped).map_err(|_| fail("not hex"))?;
        unwrap_key(&raw, &self.me.x25519_secret(), &blob.key)
            .map(ContentKey)
            .ok_or_else(|| fail("authentication failed"))
    }

    /// Opens the blob `blob` refers to from its (digest-checked) `bytes`, decrypting in place
    /// when `bytes` is not shared.
    ///
    /// # Errors
    /// [`SealError::NotSealed`], [`SealError::Unwrap`], [`SealError::Format`],
    /// [`SealError::Tampered`].
    pub fn open(&self, blob: &BlobRef, bytes: Bytes) -> Result<Bytes, SealError> {
        let ck = self.unwrap(blob)?;
        open_bytes(MODE_WRAPPED, &ck.0, &blob.key, bytes)
    }
}

fn header(mode: u8, chunk_log2: u8, len: usize, salt: &[u8; 32]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8] = mode;
    h[9] = chunk_log2;
    h[16..24].copy_from_slice(&(len as u64).to_le_bytes());
    h[24..].copy_from_slice(salt);
    h
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256 (RFC 5869) of `ikm` with `salt`, expanded to 32 bytes with `info` (concatenated).
pub(crate) fn hkdf32(ikm: &[u8], salt: &[u8], info: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(info, Len(32))
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so expansion cannot fail.
        .and_then(|okm| okm.fill(&mut out))
        .unwrap_or_else(|_| unreachable!("HKDF-SHA256 expands 32 bytes"));
    out
}

fn blob_key(secret: &[u8; 32], header: &[u8; HEADER_LEN], object_key: &str) -> LessSafeKey {
    let k = hkdf32(
        secret,
        &header[24..56],
        &[b"fedmq/v1 blob", &header[8..9], object_key.as_bytes()],
    );
    aead_key(&aead::AES_256_GCM, &k)
}

fn aead_key(alg: &'static aead::Algorithm, k: &[u8; 32]) -> LessSafeKey {
    // Both algorithms take 32-byte keys, so this cannot fail.
    LessSafeKey::new(UnboundKey::new(alg, k).unwrap_or_else(|_| unreachable!("32-byte AEAD key")))
}

fn chunk_nonce(i: usize, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = u8::from(last);
    n[4..].copy_from_slice(&(i as u64).to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn seal_with(mode: u8, secret: &[u8; 32], object_key: &str, plaintext: &[u8]) -> Vec<u8> {
    let mut salt = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
    let chunk_log2 = DEFAULT_CHUNK_LOG2;
    let h = header(mode, chunk_log2, plaintext.len(), &salt);
    let key = blob_key(secret, &h, object_key);
    let chunk = 1usize << chunk_log2;
    let n = plaintext.len().div_ceil(chunk).max(1);
    let mut out = vec![0u8; sealed_len_with(plaintext.len(), chunk_log2)];
    out[..HEADER_LEN].copy_from_slice(&h);
    let seal_one = |(i, dst): (usize, &mut [u8])| {
        let start = i * chunk;
        let end = (start + chunk).min(plaintext.len());
        let body_len = end - start;
        let (body, tag) = dst.split_at_mut(body_len);
        body.copy_from_slice(&plaintext[start..end]);
        // Sealing fails only for inputs above ring's per-nonce limit (~64 GiB), far above a chunk.
        let t = key
            .seal_in_place_separate_tag(chunk_nonce(i, i + 1 == n), Aad::from(&h), body)
            .unwrap_or_else(|_| unreachable!("chunk within the AEAD's length limit"));
        tag[..TAG_LEN].copy_from_slice(t.as_ref());
    };
    let body = &mut out[HEADER_LEN..];
    if n > 2 {
        body.par_chunks_mut(chunk + TAG_LEN)
            .enumerate()
            .for_each(seal_one);
    } else {
        body.chunks_mut(chunk + TAG_LEN)
            .enumerate()
            .for_each(seal_one);
    }
    out
}

/// Checks the header and the exact length; returns (header, plaintext length, chunk size).
fn parse_header(
    mode: u8,
    object_key: &str,
    bytes: &[u8],
) -> Result<([u8; HEADER_LEN], usize, usize), SealError> {
    let fmt = |reason: String| SealError::Format {
        key: object_key.to_string(),
        reason,
    };
    if bytes.len() < HEADER_LEN + TAG_LEN || &bytes[..8] != MAGIC {
        return Err(fmt("missing the fedmqSB1 header".into()));
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&bytes[..HEADER_LEN]);
    if h[8] != mode {
        return Err(fmt(format!("mode {} where {mode} was expected", h[8])));
    }
    let chunk_log2 = h[9];
    if !(16..=24).contains(&chunk_log2) || h[10..16].iter().any(|&b| b != 0) {
        return Err(fmt("unsupported header fields".into()));
    }
    let len = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= bytes.len())
        .ok_or_else(|| SealError::Tampered {
            key: object_key.to_string(),
        })?;
    if sealed_len_with(len, chunk_log2) != bytes.len() {
        return Err(SealError::Tampered {
            key: object_key.to_string(),
        });
    }
    Ok((h, len, 1usize << chunk_log2))
}

/// Opens in place: decrypts each chunk where it lies, then moves the plaintext together at the
/// front. Returns the plaintext length.
fn open_in_place(
    mode: u8,
    secret: &[u8; 32],
    object_key: &str,
    buf: &mut [u8],
) -> Result<usize, SealError> {
    let (h, len, chunk) = parse_header(mode, object_key, buf)?;
    let key = blob_key(secret, &h, object_key);
    let n = len.div_ceil(chunk).max(1);
    let open_one = |(i, c): (usize, &mut [u8])| -> bool {
        key.open_in_place(chunk_nonce(i, i + 1 == n), Aad::from(&h), c)
            .is_ok()
    };
    let body = &mut buf[HEADER_LEN..];
    let ok = if n > 2 {
        body.par_chunks_mut(chunk + TAG_LEN)
            .enumerate()
            .all(open_one)
    } else {
        body.chunks_mut(chunk + TAG_LEN).enumerate().all(open_one)
    };
    if !ok {
        return Err(SealError::Tampered {
            key: object_key.to_string(),
        });
    }
    for i in 0..n {
        let src = HEADER_LEN + i * (chunk + TAG_LEN);
        let body = chunk.min(len - i * chunk);
        buf.copy_within(src..src + body, i * chunk);
    }
    Ok(len)
}

fn open_bytes(
    mode: u8,
    secret: &[u8; 32],
    object_key: &str,
    bytes: Bytes,
) -> Result<Bytes, SealError> {
    let mut buf = bytes
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    let len = open_in_place(mode, secret, object_key, &mut buf)?;
    buf.truncate(len);
    Ok(buf.freeze())
}

/// `ephemeral public ‖ ChaCha20-Poly1305(kek, content key)`; kek from X25519 with `recipient`.
fn wrap_key(ck: &[u8; 32], recipient: &[u8; 32], object_key: &str) -> [u8; WRAPPED_KEY_LEN] {
    use curve25519_dalek::montgomery::MontgomeryPoint;
    let mut eph = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut eph);
    let eph_pub = MontgomeryPoint::mul_base_clamped(eph).to_bytes();
    let shared = MontgomeryPoint(*recipient).mul_clamped(eph).to_bytes();
    let kek = kek(&shared, &eph_pub, recipient, object_key);
    let mut out = [0u8; WRAPPED_KEY_LEN];
    out[..32].copy_from_slice(&eph_pub);
    out[32..64].copy_from_slice(ck);
    let tag = kek
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(object_key.as_bytes()),
            &mut out[32..64],
        )
        .unwrap_or_else(|_| unreachable!("32 bytes within the AEAD's length limit"));
    out[64..].copy_from_slice(tag.as_ref());
    out
}

fn unwrap_key(raw: &[u8], secret: &[u8; 32], object_key: &str) -> Option<[u8; 32]> {
    use curve25519_dalek::montgomery::MontgomeryPoint;
    if raw.len() != WRAPPED_KEY_LEN {
        return None;
    }
    let eph_pub: [u8; 32] = raw[..32].try_into().ok()?;
    let shared = MontgomeryPoint(eph_pub).mul_clamped(*secret).to_bytes();
    let me = MontgomeryPoint::mul_base_clamped(*secret).to_bytes();
    // A low-order ephemeral point gives an all-zero secret that anyone can compute.
    if shared == [0u8; 32] {
        return None;
    }
    let kek = kek(&shared, &eph_pub, &me, object_key);
    let mut ct = raw[32..].to_vec();
    let ck = kek
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(object_key.as_bytes()),
            &mut ct,
        )
        .ok()?;
    ck.try_into().ok()
}

fn kek(shared: &[u8; 32], eph_pub: &[u8; 32], recipient: &[u8; 32], key: &str) -> LessSafeKey {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph_pub);
    salt[32..].copy_from_slice(recipient);
    let k = hkdf32(shared, &salt, &[b"fedmq/v1 key wrap", key.as_bytes()]);
    aead_key(&aead::CHACHA20_POLY1305, &k)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A server's and a client's blob crypto, each trusting the other.
    pub(crate) fn pair() -> (BlobCrypto, BlobCrypto) {
        let server = Arc::new(Identity::generate("server"));
        let client = Arc::new(Identity::generate("client-1"));
        let mut ring_s = Keyring::default();
        ring_s.trust(&client);
        let mut ring_c = Keyring::default();
        ring_c.trust(&server);
        (
            BlobCrypto::new(server, Arc::new(ring_s)),
            BlobCrypto::new(client, Arc::new(ring_c)),
        )
    }

    fn blob_ref(key: &str, sealed: &[u8], wrapped: String) -> BlobRef {
        BlobRef {
            key: key.into(),
            len: sealed.len() as u64,
            sha256: "00".repeat(32),
            wrapped_key: Some(wrapped),
        }
    }

    #[test]
    fn round_trips_at_chunk_boundaries() {
        let (server, client) = pair();
        let chunk = 1 << DEFAULT_CHUNK_LOG2;
        for len in [0, 1, 1000, chunk - 1, chunk, chunk + 1, 3 * chunk + 7] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let key = "fedmq/run/r000001/global";
            let (sealed, ck) = server.seal(key, &plain);
            assert_eq!(sealed.len(), sealed_len(len));
            assert!(looks_sealed(&sealed));
            let r = server.wrapped_ref(&blob_ref(key, &sealed, String::new()), &ck, "client-1");
            let opened = client.open(&r.unwrap(), Bytes::from(sealed)).unwrap();
            assert_eq!(&opened[..], &plain[..], "len {len}");
        }
    }

    #[test]
    fn ciphertext_hides_the_plaintext() {
        let (server, _) = pair();
        let plain = b"fc1.weight fc1.bias ".repeat(10_000);
        let (sealed, _) = server.seal("k", &plain);
        assert!(!sealed
            .windows(10)
            .any(|w| w == b"fc1.weight" || w == b"fc1.bias f"));
    }

    #[test]
    fn any_flipped_byte_truncation_or_move_is_detected() {
        let (server, client) = pair();
        let key = "fedmq/run/r000001/up/client-1";
        let plain = vec![7u8; (1 << DEFAULT_CHUNK_LOG2) + 100];
        let (sealed, ck) = client.seal(key, &plain);
        let r = client
            .wrapped_ref(&blob_ref(key, &sealed, String::new()), &ck, "server")
            .unwrap();
        server.open(&r, Bytes::from(sealed.clone())).unwrap();
        for pos in [
            0,
            8,
            9,
            20,
            30,
            HEADER_LEN,
            HEADER_LEN + 5000,
            sealed.len() - 1,
        ] {
            let mut bad = sealed.clone();
            bad[pos] ^= 0x10;
            assert!(server.open(&r, Bytes::from(bad)).is_err(), "flip at {pos}");
        }
        let short = Bytes::from(sealed[..sealed.len() - 1].to_vec());
        assert!(matches!(
            server.open(&r, short),
            Err(SealError::Tampered { .. })
        ));
        // Dropping the whole last chunk keeps a well-formed length for a shorter plaintext,
        // but the header's length and the `last` flag give it away.
        let chunk = (1 << DEFAULT_CHUNK_LOG2) + TAG_LEN;
        let dropped = Bytes::from(sealed[..HEADER_LEN + chunk].to_vec());
        assert!(server.open(&r, dropped).is_err());
        // The same blob under another object key does not open.
        let moved = BlobRef {
            key: "fedmq/run/r000001/up/client-2".into(),
            ..r.clone()
        };
        assert!(server.open(&moved, Bytes::from(sealed)).is_err());
    }

    #[test]
    fn only_the_recipient_unwraps() {
        let (server, client) = pair();
        let other = BlobCrypto::new(
            Arc::new(Identity::generate("client-1")),
            Arc::new(Keyring::default()),
        );
        let (sealed, ck) = server.seal("k", b"secret model");
        let r = server
            .wrapped_ref(&blob_ref("k", &sealed, String::new()), &ck, "client-1")
            .unwrap();
        assert!(client.open(&r, Bytes::from(sealed.clone())).is_ok());
        assert!(matches!(
            other.open(&r, Bytes::from(sealed.clone())),
            Err(SealError::Unwrap { .. })
        ));
        // The server cannot read what it wrapped for the client either.
        assert!(server.open(&r, Bytes::from(sealed.clone())).is_err());
        let mut bad = r.clone();
        bad.wrapped_key = Some("0".repeat(WRAPPED_KEY_HEX_LEN));
        assert!(client.open(&bad, Bytes::from(sealed.clone())).is_err());
        let mut unsealed = r;
        unsealed.wrapped_key = None;
        assert!(matches!(
            client.open(&unsealed, Bytes::from(sealed)),
            Err(SealError::NotSealed { .. })
        ));
        assert!(matches!(
            server.wrap(&ck, "k", "client-9"),
            Err(SealError::UnknownRecipient(_))
        ));
    }

    #[test]
    fn own_blobs_open_only_with_the_same_identity() {
        let (server, client) = pair();
        let sealed = server.seal_own("checkpoint/r000003", b"{\"round\":3}");
        let opened = server
            .open_own("checkpoint/r000003", Bytes::from(sealed.clone()))
            .unwrap();
        assert_eq!(&opened[..], b"{\"round\":3}");
        assert!(client
            .open_own("checkpoint/r000003", Bytes::from(sealed.clone()))
            .is_err());
        // A wrapped-mode reader refuses an own-mode blob by its header.
        assert!(matches!(
            open_bytes(MODE_WRAPPED, &[0; 32], "k", Bytes::from(sealed)),
            Err(SealError::Format { .. })
        ));
    }

    #[test]
    fn shared_bytes_open_by_copy() {
        let (server, client) = pair();
        let (sealed, ck) = server.seal("k", b"abc");
        let r = server
            .wrapped_ref(&blob_ref("k", &sealed, String::new()), &ck, "client-1")
            .unwrap();
        let b = Bytes::from(sealed);
        let keep = b.clone();
        assert_eq!(&client.open(&r, b).unwrap()[..], b"abc");
        assert!(looks_sealed(&keep));
    }
}
