//! Sealing as a store decorator: [`SealedStore`] seals what a participant writes and opens what
//! it reads when the participant has blob encryption ([`BlobCrypto`]), and passes plaintext
//! through when it has none.
//!
//! Callers name a blob's readers, never keys. A blob for other participants
//! ([`SealedStore::seal`]) is sealed under a fresh content key that stays in this process
//! ([`Written`]); each reader is sent a reference carrying that key wrapped to it
//! ([`SealedStore::reference_for`]). A blob only this participant reads back
//! ([`SealedStore::seal_own`]: checkpoints) needs no key at all. The blob format and key scheme
//! are [`crate::crypto::seal`]'s; this module decides when they apply, and refuses a blob whose
//! sealing does not match this participant's: a sealed blob it has no keys for
//! ([`SealedError::NoKeys`]), a blob of its own that should be sealed but is not
//! ([`SealedError::Unsealed`]), a blob from another writer without a wrapped key
//! ([`SealError::NotSealed`]).
//!
//! Sealing and opening are CPU-bound (AES-256-GCM over the whole blob) and separate from the
//! transfers: callers run them on a blocking thread for models, and retry a transfer
//! ([`super::retry::until`]) without sealing again.
//!
//! The decorator depends on the crypto layer only; the server and the client each build one from
//! their options.

use super::{BlobStore, Result};
use crate::crypto::seal::{self, BlobCrypto, ContentKey, SealError};
use crate::proto::BlobRef;
use bytes::Bytes;
use std::sync::Arc;

/// A [`BlobStore`] that seals and opens blobs for one participant. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SealedStore {
    /// The store the bytes go to (ciphertext when sealing).
    inner: BlobStore,
    /// This participant's blob encryption; `None`: blobs are stored and read as plaintext.
    crypto: Option<Arc<BlobCrypto>>,
}

/// A blob ready to be stored at its object key ([`SealedStore::put`]): sealed for that key, or
/// plaintext. Storing it again (a retry) stores the very same bytes.
pub struct Outgoing {
    key: String,
    bytes: Bytes,
    /// The content key it was sealed under, when sealed for readers.
    content_key: Option<Arc<ContentKey>>,
}

impl Outgoing {
    /// The object key it is sealed for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The bytes stored (ciphertext when sealed).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

/// A blob stored through a [`SealedStore`]: its reference (no wrapped key) and, when sealed for
/// readers, its content key, which leaves this process only wrapped to a reader
/// ([`SealedStore::reference_for`]).
#[derive(Clone)]
pub struct Written {
    blob: BlobRef,
    content_key: Option<Arc<ContentKey>>,
}

impl Written {
    /// The stored blob's reference, as the store returned it (key, length, SHA-256).
    pub fn blob(&self) -> &BlobRef {
        &self.blob
    }
}

impl std::fmt::Debug for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The content key is never printed.
        f.debug_struct("Written")
            .field("blob", &self.blob)
            .field("sealed", &self.content_key.is_some())
            .finish()
    }
}

/// Why a fetched blob does not open (the transfer itself fails with a [`super::Error`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealedError {
    /// The crypto layer refused the blob or its wrapped key (altered, moved, not for this
    /// participant, not sealed although this participant requires it).
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The blob is sealed, but this participant has no blob encryption to open it.
    #[error(
        "{key}: the blob is sealed, but this participant has no encryption keys (set \
         fedmq_args.signing_key and trusted_keys)"
    )]
    NoKeys {
        /// Object key.
        key: String,
    },
    /// A blob this participant seals for itself is plaintext: anyone with store credentials
    /// could have written it.
    #[error(
        "{key} is not sealed, but this participant seals its blobs: refusing a blob anyone with \
         store credentials could have written"
    )]
    Unsealed {
        /// Object key.
        key: String,
    },
}

impl SealedStore {
    /// `inner`, sealing with `crypto` when given and storing plaintext otherwise.
    pub fn new(inner: BlobStore, crypto: Option<Arc<BlobCrypto>>) -> Self {
        Self { inner, crypto }
    }

    /// The undecorated store, for what involves no blob content: bucket checks, listings,
    /// deletes and retention.
    pub fn inner(&self) -> &BlobStore {
        &self.inner
    }

    /// Whether blobs are sealed.
    pub fn seals(&self) -> bool {
        self.crypto.is_some()
    }

    /// Prepares `plain` for `key`, for readers named later with
    /// [`reference_for`](Self::reference_for): sealed under a fresh content key when blobs are
    /// sealed, as is otherwise. CPU-bound.
    pub fn seal(&self, key: &str, plain: Vec<u8>) -> Outgoing {
        let (bytes, content_key) = match &self.crypto {
            Some(c) => {
                let (sealed, ck) = c.seal(key, &plain);
                (sealed, Some(Arc::new(ck)))
            }
            None => (plain, None),
        };
        Outgoing {
            key: key.to_string(),
            bytes: Bytes::from(bytes),
            content_key,
        }
    }

    /// Prepares `plain` for `key`, to be read back by this participant alone
    /// ([`open_own`](Self::open_own)): sealed with its own key when blobs are sealed, as is
    /// otherwise. CPU-bound.
    pub fn seal_own(&self, key: &str, plain: Vec<u8>) -> Outgoing {
        let bytes = match &self.crypto {
            Some(c) => c.seal_own(key, &plain),
            None => plain,
        };
        Outgoing {
            key: key.to_string(),
            bytes: Bytes::from(bytes),
            content_key: None,
        }
    }

    /// Stores `blob` at its object key.
    ///
    /// # Errors
    /// As [`BlobStore::put`].
    pub async fn put(&self, blob: &Outgoing) -> Result<Written> {
        let stored = self.inner.put(&blob.key, blob.bytes.clone()).await?;
        Ok(Written {
            blob: stored,
            content_key: blob.content_key.clone(),
        })
    }

    /// The reference `reader` is sent for `written`: carrying its content key wrapped to `reader`
    /// when it was sealed for readers, as stored otherwise.
    ///
    /// # Errors
    /// [`SealError::UnknownRecipient`] when `reader` has no trusted key.
    pub fn reference_for(
        &self,
        written: &Written,
        reader: &str,
    ) -> std::result::Result<BlobRef, SealError> {
        match (&self.crypto, &written.content_key) {
            (Some(c), Some(k)) => c.wrapped_ref(&written.blob, k, reader),
            _ => Ok(written.blob.clone()),
        }
    }

    /// Downloads the blob `blob` refers to, checked against its SHA-256: for blobs whose content
    /// key other participants hold too (the global model, whose key every client gets).
    ///
    /// # Errors
    /// As [`BlobStore::get`].
    pub async fn get(&self, blob: &BlobRef) -> Result<Bytes> {
        self.inner.get(blob).await
    }

    /// Downloads a blob whose content key only its writer and this participant hold (an update,
    /// sealed by its client for the server alone). When this participant opens it, its AEAD tags
    /// authenticate every byte, so only its length is checked ([`BlobStore::get_length_checked`]);
    /// otherwise its SHA-256 is.
    ///
    /// # Errors
    /// As [`BlobStore::get`].
    pub async fn get_private(&self, blob: &BlobRef) -> Result<Bytes> {
        if self.crypto.is_some() && blob.wrapped_key.is_some() {
            self.inner.get_length_checked(blob).await
        } else {
            self.inner.get(blob).await
        }
    }

    /// Downloads the whole of `key` without a digest check ([`BlobStore::get_unverified`]): for
    /// small documents found by listing, opened with [`open_own`](Self::open_own).
    ///
    /// # Errors
    /// As [`BlobStore::get_unverified`].
    pub async fn get_unverified(&self, key: &str) -> Result<Bytes> {
        self.inner.get_unverified(key).await
    }

    /// The plaintext of the fetched `bytes` of `blob`: opened with the content key it carries
    /// for this participant when blobs are sealed (so it must be sealed), as is otherwise (so it
    /// must not be). Decrypts in place when `bytes` is not shared. CPU-bound.
    ///
    /// # Errors
    /// [`SealedError::Seal`] (not sealed, not for this participant, altered),
    /// [`SealedError::NoKeys`].
    pub fn open(&self, blob: &BlobRef, bytes: Bytes) -> std::result::Result<Bytes, SealedError> {
        match (&self.crypto, &blob.wrapped_key) {
            (Some(c), _) => Ok(c.open(blob, bytes)?),
            (None, None) => Ok(bytes),
            (None, Some(_)) => Err(SealedError::NoKeys {
                key: blob.key.clone(),
            }),
        }
    }

    /// The plaintext of `bytes` stored at `key` by [`seal_own`](Self::seal_own): opened with this
    /// participant's own key when blobs are sealed (so it must be sealed), as is otherwise (so it
    /// must not be). CPU-bound.
    ///
    /// # Errors
    /// [`SealedError::Unsealed`], [`SealedError::NoKeys`], [`SealedError::Seal`] (altered,
    /// moved, sealed by another participant).
    pub fn open_own(&self, key: &str, bytes: Bytes) -> std::result::Result<Bytes, SealedError> {
        match (&self.crypto, seal::looks_sealed(&bytes)) {
            (Some(c), true) => Ok(c.open_own(key, bytes)?),
            (None, false) => Ok(bytes),
            (Some(_), false) => Err(SealedError::Unsealed {
                key: key.to_string(),
            }),
            (None, true) => Err(SealedError::NoKeys {
                key: key.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::S3Options;

    /// A store these tests never send a request to.
    fn inner() -> BlobStore {
        BlobStore::connect(&S3Options {
            endpoint: "http://127.0.0.1:9".into(),
            access_key: "unused".into(),
            secret_key: "unused".into(),
            ..S3Options::default()
        })
        .expect("valid options")
    }

    /// The server's and a client's sealed stores, each trusting the other.
    fn pair() -> (SealedStore, SealedStore) {
        let (server, client) = crate::crypto::seal::tests::pair();
        (
            SealedStore::new(inner(), Some(Arc::new(server))),
            SealedStore::new(inner(), Some(Arc::new(client))),
        )
    }

    /// What the store would return for `out` (the digest is not checked here).
    fn written(out: &Outgoing) -> Written {
        Written {
            blob: BlobRef {
                key: out.key.clone(),
                len: out.bytes.len() as u64,
                sha256: "00".repeat(32),
                wrapped_key: None,
            },
            content_key: out.content_key.clone(),
        }
    }

    #[tokio::test]
    async fn a_blob_sealed_for_a_reader_opens_for_that_reader_alone() {
        let (server, client) = pair();
        let out = server.seal("fedmq/run/r000001/global", b"model".to_vec());
        assert!(seal::looks_sealed(out.bytes()));
        let w = written(&out);
        let for_client = server.reference_for(&w, "client-1").unwrap();
        assert!(for_client.wrapped_key.is_some());
        let opened = client.open(&for_client, out.bytes().clone()).unwrap();
        assert_eq!(&opened[..], b"model");
        // The server's own reference is wrapped to the server, not the client.
        let for_server = server.reference_for(&w, "server").unwrap();
        assert!(client.open(&for_server, out.bytes().clone()).is_err());
        assert!(matches!(
            server.reference_for(&w, "client-9"),
            Err(SealError::UnknownRecipient(_))
        ));
    }

    #[tokio::test]
    async fn a_plain_store_passes_plaintext_through_and_refuses_sealed_blobs() {
        let (server, _) = pair();
        let plain = SealedStore::new(inner(), None);
        assert!(!plain.seals());
        let out = plain.seal("k", b"model".to_vec());
        assert_eq!(&out.bytes()[..], b"model");
        let w = written(&out);
        let r = plain.reference_for(&w, "client-1").unwrap();
        assert_eq!(&r, w.blob());
        assert_eq!(&plain.open(&r, out.bytes().clone()).unwrap()[..], b"model");

        let sealed = server.seal("k", b"model".to_vec());
        let r = server.reference_for(&written(&sealed), "server").unwrap();
        let e = plain.open(&r, sealed.bytes().clone()).unwrap_err();
        assert_eq!(e, SealedError::NoKeys { key: "k".into() });
        assert!(e.to_string().contains("has no encryption keys"), "{e}");
    }

    #[tokio::test]
    async fn a_sealing_store_refuses_a_plain_blob_from_another_writer() {
        let (server, _) = pair();
        let plain = SealedStore::new(inner(), None);
        let out = plain.seal("k", b"model".to_vec());
        let e = server.open(&written(&out).blob, out.bytes().clone());
        assert!(
            matches!(e, Err(SealedError::Seal(SealError::NotSealed { .. }))),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn own_blobs_must_match_the_stores_sealing() {
        let (server, client) = pair();
        let plain = SealedStore::new(inner(), None);
        let own = server.seal_own("cp", b"doc".to_vec());
        assert!(own.content_key.is_none());
        assert_eq!(
            &server.open_own("cp", own.bytes().clone()).unwrap()[..],
            b"doc"
        );
        // Moved, or opened by someone else.
        assert!(matches!(
            server.open_own("cp2", own.bytes().clone()),
            Err(SealedError::Seal(SealError::Tampered { .. }))
        ));
        assert!(client.open_own("cp", own.bytes().clone()).is_err());
        assert_eq!(
            plain.open_own("cp", own.bytes().clone()).unwrap_err(),
            SealedError::NoKeys { key: "cp".into() }
        );
        let doc = plain.seal_own("cp", b"doc".to_vec());
        assert_eq!(
            &plain.open_own("cp", doc.bytes().clone()).unwrap()[..],
            b"doc"
        );
        assert_eq!(
            server.open_own("cp", doc.bytes().clone()).unwrap_err(),
            SealedError::Unsealed { key: "cp".into() }
        );
    }
}
