//! Participant identity: Ed25519 signing keys, the keyring of trusted public keys, and signed
//! control messages.
//!
//! # Wire format
//! A signed message is the JSON envelope, then one `\n`, then the Ed25519 signature of exactly
//! those JSON bytes as 128 lowercase hex digits. A receiver splits at the last `\n` (when 128 hex
//! digits follow it) and verifies the very bytes it will parse: no canonical form is needed, in
//! any language. An unsigned message is the JSON alone.
//!
//! # Key files
//! `<id>.key`: the 32-byte secret seed as 64 hex digits (mode 0600). `<id>.pub`: the public key
//! as 64 hex digits. A keyring is a directory of `.pub` files, the file stem being the
//! participant id; removing a file revokes that participant.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest difference between a live message's timestamp and the receiver's clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

// The signature's length and how it is split off a payload are part of the protocol.
pub use crate::proto::{split_signed, SIGNATURE_HEX_LEN};

/// Errors of key files and signature checks.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key file does not hold a key.
    #[error("{path}: not an Ed25519 key ({reason}); create keys with `fedmq keys`")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The message carries no signature.
    #[error("unsigned message")]
    Unsigned,
    /// The sender has no key in the keyring (unknown or revoked).
    #[error("no trusted key for {0:?} (unknown or revoked participant)")]
    UnknownSender(String),
    /// The signature does not verify: forged or altered.
    #[error("bad signature for {0:?} (forged or altered message)")]
    BadSignature(String),
}

/// This participant's signing key.
pub struct Identity {
    id: String,
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("public", &self.public_hex())
            .finish()
    }
}

impl Identity {
    /// A fresh random key for participant `id`.
    pub fn generate(id: &str) -> Self {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut seed);
        Self {
            id: id.to_string(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Reads `<path>` (a `.key` file) as the key of participant `id`.
    ///
    /// # Errors
    /// [`IdentityError::Io`], [`IdentityError::BadKey`].
    pub fn load(path: &Path, id: &str) -> Result<Self, IdentityError> {
        let seed = read_hex32(path)?;
        Ok(Self {
            id: id.to_string(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Writes `<dir>/<id>.key` (mode 0600) and `<dir>/<id>.pub`; returns their paths.
    ///
    /// # Errors
    /// [`IdentityError::Io`].
    pub fn save(&self, dir: &Path) -> Result<(PathBuf, PathBuf), IdentityError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let secret = dir.join(format!("{}.key", self.id));
        write_private(&secret, &hex::encode(self.key.to_bytes())).map_err(io(&secret))?;
        let public = dir.join(format!("{}.pub", self.id));
        std::fs::write(&public, format!("{}\n", self.public_hex())).map_err(io(&public))?;
        Ok((secret, public))
    }

    /// The participant id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public key as 64 hex digits.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// The secret seed: key material for blobs only this participant opens ([`crate::crypto::seal`]).
    pub(crate) fn secret_seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The X25519 secret scalar of this key (Ed25519's expanded scalar, used clamped), for
    /// unwrapping blob keys ([`crate::crypto::seal`]).
    pub(crate) fn x25519_secret(&self) -> [u8; 32] {
        self.key.to_scalar_bytes()
    }

    /// This key's X25519 public key (the Ed25519 point in Montgomery form).
    pub(crate) fn x25519_public(&self) -> [u8; 32] {
        self.key.verifying_key().to_montgomery().to_bytes()
    }

    /// `json` followed by `\n` and its signature (the wire format above).
    pub fn seal(&self, mut json: Vec<u8>) -> Vec<u8> {
        let sig = self.key.sign(&json);
        json.push(b'\n');
        json.extend_from_slice(hex::encode(sig.to_bytes()).as_bytes());
        json
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)?.write_all(format!("{text}\n").as_bytes())
}

fn read_hex32(path: &Path) -> Result<[u8; 32], IdentityError> {
    let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| IdentityError::BadKey {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = hex::decode(text.trim()).map_err(|e| bad(format!("not hex: {e}")))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| bad(format!("{} bytes, expected 32", b.len())))
}

/// Trusted public keys by participant id.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<String, VerifyingKey>,
}

impl Keyring {
    /// Every `<id>.pub` in `dir`.
    ///
    /// # Errors
    /// [`IdentityError::Io`] for an unreadable directory, [`IdentityError::BadKey`] for a
    /// malformed key file.
    pub fn load_dir(dir: &Path) -> Result<Self, IdentityError> {
        let mut ring = Self::default();
        let entries = std::fs::read_dir(dir).map_err(|source| IdentityError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("pub") {
                continue;
            }
            let Some(id) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let bytes = read_hex32(&path)?;
            let key = VerifyingKey::from_bytes(&bytes).map_err(|e| IdentityError::BadKey {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            ring.keys.insert(id.to_string(), key);
        }
        Ok(ring)
    }

    /// Trusts `identity`'s public key.
    pub fn trust(&mut self, identity: &Identity) {
        self.keys
            .insert(identity.id.clone(), identity.key.verifying_key());
    }

    /// Stops trusting `id`.
    pub fn revoke(&mut self, id: &str) -> bool {
        self.keys.remove(id).is_some()
    }

    /// The X25519 public key of `id` (its Ed25519 key in Montgomery form), to wrap blob keys to.
    pub(crate) fn x25519_public(&self, id: &str) -> Option<[u8; 32]> {
        self.keys.get(id).map(|k| k.to_montgomery().to_bytes())
    }

    /// Participants trusted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Checks a received message: `payload` is signed by the trusted key of its sender
    /// (`env.from`), and, when it arrived live (not `retained`), its timestamp is within
    /// [`MAX_CLOCK_SKEW`] of this clock, so a recorded message replayed much later is dropped
    /// whatever its round. Retained messages are exempt from the age check (a retained status or
    /// command is legitimately old); the round rules and the signed message ids cover them.
    ///
    /// # Errors
    /// Why the message is not acceptable.
    pub fn check_message(
        &self,
        payload: &[u8],
        retained: bool,
        env: &crate::proto::Envelope,
    ) -> Result<(), String> {
        self.verify(&env.from, payload).map_err(|e| e.to_string())?;
        if !retained {
            let skew = crate::proto::now_ms().abs_diff(env.ts_ms);
            if skew > MAX_CLOCK_SKEW.as_millis() as u64 {
                return Err(format!(
                    "timestamp {} is {:.0} s away from this clock (replayed, or clocks not \
                     synchronized; at most {} s allowed)",
                    env.ts_ms,
                    skew as f64 / 1000.0,
                    MAX_CLOCK_SKEW.as_secs()
                ));
            }
        }
        Ok(())
    }

    /// Checks that `payload` is signed by `from`'s trusted key.
    ///
    /// # Errors
    /// [`IdentityError::Unsigned`], [`IdentityError::UnknownSender`],
    /// [`IdentityError::BadSignature`].
    pub fn verify(&self, from: &str, payload: &[u8]) -> Result<(), IdentityError> {
        let (json, sig) = split_signed(payload);
        let sig = sig.ok_or(IdentityError::Unsigned)?;
        let key = self
            .keys
            .get(from)
            .ok_or_else(|| IdentityError::UnknownSender(from.to_string()))?;
        let bad = || IdentityError::BadSignature(from.to_string());
        if sig.len() != SIGNATURE_HEX_LEN {
            return Err(bad());
        }
        let bytes: [u8; 64] = hex::decode(sig)
            .map_err(|_| bad())?
            .try_into()
            .map_err(|_| bad())?;
        key.verify(json, &Signature::from_bytes(&bytes))
            .map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_messages_verify_and_forgeries_do_not() {
        let alice = Identity::generate("client-1");
        let mallory = Identity::generate("client-1");
        let mut ring = Keyring::default();
        ring.trust(&alice);
        let json = br#"{"v":1,"from":"client-1"}"#.to_vec();
        let sealed = alice.seal(json.clone());
        assert_eq!(split_signed(&sealed).0, &json[..]);
        ring.verify("client-1", &sealed).unwrap();
        // Signed by another key under the same name.
        assert!(matches!(
            ring.verify("client-1", &mallory.seal(json.clone())),
            Err(IdentityError::BadSignature(_))
        ));
        // Altered after signing.
        let mut altered = sealed.clone();
        altered[3] ^= 1;
        assert!(matches!(
            ring.verify("client-1", &altered),
            Err(IdentityError::BadSignature(_))
        ));
        // Unsigned, unknown, revoked, truncated signature.
        assert!(matches!(
            ring.verify("client-1", &json),
            Err(IdentityError::Unsigned)
        ));
        assert!(matches!(
            ring.verify("client-2", &sealed),
            Err(IdentityError::UnknownSender(_))
        ));
        assert!(matches!(
            ring.verify("client-1", &sealed[..sealed.len() - 2]),
            Err(IdentityError::Unsigned)
        ));
        let mut wrong = sealed.clone();
        let n = wrong.len();
        wrong[n - 1] = if wrong[n - 1] == b'0' { b'1' } else { b'0' };
        assert!(matches!(
            ring.verify("client-1", &wrong),
            Err(IdentityError::BadSignature(_))
        ));
        assert!(ring.revoke("client-1"));
        assert!(matches!(
            ring.verify("client-1", &sealed),
            Err(IdentityError::UnknownSender(_))
        ));
    }

    #[test]
    fn old_live_messages_are_replays_but_old_retained_ones_are_not() {
        use crate::proto::{Body, Envelope, Failure};
        let alice = Identity::generate("client-1");
        let mut ring = Keyring::default();
        ring.trust(&alice);
        let mut env = Envelope::new(
            "run",
            1,
            "client-1",
            Body::Failure(Failure { reason: "x".into() }),
        );
        let fresh = alice.seal(crate::proto::encode(&env));
        ring.check_message(&fresh, false, &env).unwrap();
        env.ts_ms -= 10 * 60 * 1000;
        let old = alice.seal(crate::proto::encode(&env));
        let e = ring.check_message(&old, false, &env).unwrap_err();
        assert!(e.contains("timestamp") && e.contains("replayed"), "{e}");
        ring.check_message(&old, true, &env).unwrap();
        // The timestamp is signed: a replay with a refreshed timestamp fails the signature.
        let sig = split_signed(&old).1.unwrap().to_vec();
        let refreshed = Envelope {
            ts_ms: crate::proto::now_ms(),
            ..env.clone()
        };
        let mut forged = crate::proto::encode(&refreshed);
        forged.push(b'\n');
        forged.extend_from_slice(&sig);
        assert!(ring.check_message(&forged, false, &refreshed).is_err());
    }

    #[test]
    fn key_files_round_trip_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::generate("server");
        let (secret, public) = id.save(dir.path()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = Identity::load(&secret, "server").unwrap();
        assert_eq!(again.public_hex(), id.public_hex());
        let ring = Keyring::load_dir(dir.path()).unwrap();
        assert_eq!(ring.ids().collect::<Vec<_>>(), vec!["server"]);
        ring.verify("server", &again.seal(b"{}".to_vec())).unwrap();
        std::fs::write(&public, "zz").unwrap();
        let e = Keyring::load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("server.pub") && e.contains("fedmq keys"), "{e}");
    }

    #[test]
    fn random_payloads_never_panic() {
        let mut ring = Keyring::default();
        ring.trust(&Identity::generate("a"));
        for n in 0..2000u32 {
            let bytes: Vec<u8> = (0..(n % 300)).map(|i| (i * 7 + n) as u8).collect();
            let _ = ring.verify("a", &bytes);
        }
    }
}
