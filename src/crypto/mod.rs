//! The crypto layer: who a participant is, what it signs, and how its bytes are protected in
//! transit and at rest. Nothing here does I/O beyond reading and writing key and certificate
//! files.
//!
//! # Layout
//! - [`identity`]: Ed25519 identities (key files), the keyring of trusted public keys, and signed
//!   control messages.
//! - [`seal`]: sealed blobs: AES-256-GCM chunks under a per-blob content key, wrapped to each
//!   reader with X25519 (or sealed with the writer's own key, for checkpoints).
//! - [`tls`]: rustls configurations (ring) from PEM files for MQTT, S3 and the embedded store,
//!   handshake-failure explanations, and the local CA of `fedmq certs`.

pub mod identity;
pub mod seal;
pub mod tls;
