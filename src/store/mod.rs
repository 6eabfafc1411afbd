//! Object store: blob layer over aws-sdk-s3 and the embedded S3-compatible server.
//!
//! The data plane of the design: model parameters travel as blobs in an S3 bucket, referenced from
//! control messages by [`BlobRef`](crate::proto::BlobRef) (key, length, SHA-256). The same code
//! talks to the embedded store (local default) and to MinIO, Garage or AWS S3 (production).
//!
//! # Layout
//! - `blob.rs`: [`BlobStore`] (put/get with digest checks, multipart and ranged transfers,
//!   retries, listing, prefix and retention deletes), [`S3Options`], [`RetentionPolicy`].
//! - `server.rs`: [`EmbeddedStore`], the S3-compatible HTTP server (s3s + [`ObjectStore`], SigV4) on a
//!   free loopback port, HTTPS with [`StoreTls`]; [`serve`], [`serve_tls`] and [`run_blocking`]
//!   for other lifecycles.
//! - `objects.rs`: [`ObjectStore`], the embedded store's S3 backend: opaque keys, an in-memory
//!   index and cache, one checked file per object version.
//! - `access.rs`: per-participant credentials ([`access::StoreCredential`]) and what each may do
//!   (enforced by the embedded store; [`access::iam_policy`] for MinIO and AWS).
//! - `retry.rs`: [`retry::until`], a whole operation retried across a store outage.
//! - `sealed.rs`: [`SealedStore`], the decorator that seals a participant's blobs on the way in
//!   and opens them on the way out ([`crate::crypto::seal`]), or passes plaintext through.
//! - `bench.rs`: the put/get throughput measurement behind `fedmq bench blob`.
//! - `error.rs`: [`Error`], with the mapping of S3 error responses to it.

// Design: `Error` names endpoint, bucket and key in owned strings (~140 bytes). Every fallible call
// here is a network round trip, so the size of `Result` does not matter; boxing would only make
// matching on variants clumsier.
#![allow(clippy::result_large_err)]

pub mod access;
mod blob;
mod error;
mod objects;
pub mod retry;
mod sealed;
mod server;

pub use blob::{
    BlobStore, ObjectMeta, RetentionPolicy, S3Options, MAX_PARTS, MIB, MIN_PART_SIZE, TLS_HINT,
};
pub use error::{Error, Result, AUTH_HINT, UNREACHABLE_HINT};
pub use objects::{ObjectStore, BLOCK, CACHE_MAX_OBJECT, DEFAULT_CACHE_BYTES, MAX_KEY_BYTES};
pub use sealed::{Outgoing, SealedError, SealedStore, Written};
pub use server::{
    default_listen, run_blocking, run_blocking_with_tls, serve, serve_tls, EmbeddedStore,
    StoreOptions, StoreTls, SHUTDOWN_GRACE, TLS_HANDSHAKE_TIMEOUT,
};
