//! [`BlobStore`]: content-addressed-by-reference blobs over any S3 endpoint (aws-sdk-s3).
//!
//! A blob is written once with [`BlobStore::put`], which returns the [`BlobRef`] (key, exact
//! length, SHA-256) that travels over the control plane, and read with [`BlobStore::get`], which
//! returns the bytes only after checking both length and digest against that reference.
//!
//! # Transfers
//! - `put`: one `PutObject` up to `multipart_threshold` bytes; above it a multipart upload with
//!   `concurrency` parts of `part_size` in flight, aborted if any step fails (no orphaned parts).
//!   The SHA-256 is computed on the blocking pool while the parts upload.
//! - `get`: one `GetObject` up to `part_size`; above it `concurrency` ranged GETs written straight
//!   into one preallocated buffer (no re-assembly copy). A digest mismatch re-fetches once, then
//!   fails with [`Error::Digest`]; unverified bytes are never returned.
//! - Retries: every request goes through the SDK's standard retry strategy (exponential backoff
//!   with full jitter, `max_attempts`, throttling-aware); a response body that breaks off
//!   mid-stream ([`Error::Transfer`]) is re-requested by this module with the same backoff shape.
//!   Connect, read, per-attempt and whole-operation timeouts are set explicitly from
//!   [`S3Options`].
//! - Integrity on the wire: the SDK's CRC32 request/response checksums are off
//!   (`WhenRequired`): our SHA-256 is the end-to-end check, and the receiver always verifies it.
//!   SigV4 payload signing (`sign_payload`) is a separate, optional second check; see its doc.
//!
//! # Retention
//! Keys are run- and round-scoped ([`BlobKeys`]). [`BlobStore::delete_rounds_before`] deletes
//! every round-scoped key of a run older than a round; [`RetentionPolicy`] decides that round from
//! the current one. Checkpoints and the final model are not round-scoped and are never touched.

use super::error::{from_response, map_sdk, Ctx, Error, Result};
use crate::config::S3Config;
use crate::proto::{BlobKeys, BlobRef};
use crate::tensor::Digest;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
    Delete, ObjectIdentifier,
};
use aws_smithy_http_client::tls;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use rand::Rng;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// What to check when the TLS handshake with the S3 endpoint fails.
pub const TLS_HINT: &str = "check comm_args.customized_training_s3_config.CN_S3_CA_PATH (the CA \
     that signed the store's certificate) and that the certificate is valid for the host of \
     CN_S3_ENDPOINT";

/// One mebibyte.
pub const MIB: usize = 1 << 20;

/// S3's smallest allowed part (all parts but the last).
pub const MIN_PART_SIZE: usize = 5 * MIB;

/// S3's largest part count; bigger blobs get bigger parts automatically.
pub const MAX_PARTS: usize = 10_000;

/// Below this, digests are computed inline rather than on the blocking pool.
const INLINE_HASH_MAX: usize = MIB;

/// How to reach an S3 endpoint and how to move blobs. Build it with struct-update syntax over
/// [`Default`], or from the config file's `customized_training_s3_config` with `From<&S3Config>`.
#[derive(Clone)]
pub struct S3Options {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000` (MinIO, the embedded store) or
    /// `https://s3.eu-west-1.amazonaws.com` (FedML's `CN_S3_ENDPOINT`).
    pub endpoint: String,
    /// Region for SigV4 (FedML's `CN_REGION_NAME`); any value for MinIO and the embedded store.
    pub region: String,
    /// Access key id (FedML's `CN_S3_AKI`, env `FEDMQ_S3_AKI`).
    pub access_key: String,
    /// Secret access key (FedML's `CN_S3_SAK`, env `FEDMQ_S3_SAK`). Never logged.
    pub secret_key: String,
    /// Bucket holding the blobs (FedML's `BUCKET_NAME`).
    pub bucket: String,
    /// Path-style URLs (`http://host/bucket/key`), as MinIO and the embedded store need. Default
    /// true; set false for virtual-hosted-style AWS endpoints.
    pub force_path_style: bool,
    /// Multipart part size and ranged-GET size in bytes (default 8 MiB, at least 5 MiB).
    pub part_size: usize,
    /// Blobs longer than this are uploaded in parts (default: `part_size`).
    pub multipart_threshold: usize,
    /// Parts or ranges in flight per blob (default 4).
    pub concurrency: usize,
    /// Part/range requests in flight across all operations of this store and its clones
    /// (default 16); bounds memory and sockets when many blobs move at once.
    pub max_in_flight: usize,
    /// Attempts per request, including the first (default 4). 1 disables retries.
    pub max_attempts: u32,
    /// First retry backoff (default 100 ms); doubles per attempt, with full jitter.
    pub initial_backoff: Duration,
    /// Longest retry backoff (default 5 s).
    pub max_backoff: Duration,
    /// TCP (and TLS) connect timeout (default 5 s).
    pub connect_timeout: Duration,
    /// Longest wait for a response after sending a request (default 60 s).
    pub read_timeout: Duration,
    /// Longest single attempt of a request, response body included (default 120 s; a part or
    /// range is at most `part_size`).
    pub attempt_timeout: Duration,
    /// Longest whole operation, all retries included (default 600 s).
    pub operation_timeout: Duration,
    /// Keys per `ListObjectsV2` page (default 1000, S3's maximum).
    pub list_page_size: i32,
    /// SigV4-sign request payloads (`x-amz-content-sha256` = SHA-256 of each part), so the
    /// server rejects bodies altered in transit at upload time. Default false: the blob's own
    /// SHA-256 in its [`BlobRef`] is checked by every reader, so payload signing only moves the
    /// detection earlier, at the cost of one more SHA-256 pass on each side of every upload (see
    /// the blob benchmark in docs/). Headers are always signed.
    pub sign_payload: bool,
    /// PEM bundle of the CA(s) trusted for an `https://` endpoint instead of the system's trust
    /// store (`CN_S3_CA_PATH`, a fedmq addition). The endpoint's certificate must be valid for
    /// its host. `None`: the system's roots.
    pub ca_path: Option<PathBuf>,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: "us-east-1".into(),
            access_key: String::new(),
            secret_key: String::new(),
            bucket: "fedmq".into(),
            force_path_style: true,
            part_size: 8 * MIB,
            multipart_threshold: 8 * MIB,
            concurrency: 4,
            max_in_flight: 16,
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(120),
            operation_timeout: Duration::from_secs(600),
            list_page_size: 1000,
            sign_payload: false,
            ca_path: None,
        }
    }
}

impl From<&S3Config> for S3Options {
    fn from(c: &S3Config) -> Self {
        Self {
            endpoint: c.cn_s3_endpoint.clone(),
            region: c.cn_region_name.clone(),
            access_key: c.cn_s3_aki.clone(),
            secret_key: c.cn_s3_sak.clone(),
            bucket: c.bucket_name.clone(),
            ca_path: (!c.cn_s3_ca_path.is_empty()).then(|| PathBuf::from(&c.cn_s3_ca_path)),
            ..Self::default()
        }
    }
}

impl std::fmt::Debug for S3Options {
    // The secret never reaches logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("bucket", &self.bucket)
            .field("force_path_style", &self.force_path_style)
            .field("part_size", &self.part_size)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("concurrency", &self.concurrency)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_attempts", &self.max_attempts)
            .field("connect_timeout", &self.connect_timeout)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("sign_payload", &self.sign_payload)
            .field("ca_path", &self.ca_path)
            .finish_non_exhaustive()
    }
}

impl S3Options {
    /// Checks the options before any request is made.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] naming the setting (and config key) to fix.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidOptions { reason });
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            return bad(format!(
                "S3 endpoint {:?} is not an http(s) URL (CN_S3_ENDPOINT in \
                 customized_training_s3_config, env FEDMQ_S3_ENDPOINT)",
                self.endpoint
            ));
        }
        if self.bucket.is_empty() {
            return bad(
                "bucket name is empty (BUCKET_NAME in customized_training_s3_config)".into(),
            );
        }
        if self.access_key.is_empty() || self.secret_key.is_empty() {
            return bad(format!(
                "S3 access key or secret key is empty: {}",
                super::error::AUTH_HINT
            ));
        }
        if self.part_size < MIN_PART_SIZE {
            return bad(format!(
                "part_size {} is below S3's minimum part size of {MIN_PART_SIZE} bytes",
                self.part_size
            ));
        }
        if self.concurrency == 0
            || self.max_in_flight == 0
            || self.max_attempts == 0
            || self.list_page_size < 1
        {
            return bad(
                "concurrency, max_in_flight, max_attempts and list_page_size must be at least 1"
                    .into(),
            );
        }
        if let Some(ca) = &self.ca_path {
            if !self.endpoint.starts_with("https://") {
                return bad(format!(
                    "a CA file ({}, CN_S3_CA_PATH) is set but the endpoint {:?} is not https://",
                    ca.display(),
                    self.endpoint
                ));
            }
        }
        Ok(())
    }
}

/// Which rounds' blobs to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetentionPolicy {
    /// Delete nothing.
    #[default]
    KeepAll,
    /// Keep the newest `n` rounds, the current one included (at least 1, so the current round's
    /// blobs are never deleted): after round `r`, rounds `r+1-n ..= r` stay, older ones go.
    KeepLast(NonZeroU64),
}

impl RetentionPolicy {
    /// The oldest round to keep when `current_round` has just been written (0 = keep all).
    pub fn keep_from_round(&self, current_round: u64) -> u64 {
        match self {
            RetentionPolicy::KeepAll => 0,
            RetentionPolicy::KeepLast(n) => (current_round + 1).saturating_sub(n.get()),
        }
    }
}

/// A listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Its key.
    pub key: String,
    /// Its length in bytes.
    pub len: u64,
}

/// Blob access to one bucket of one S3 endpoint. Cheap to clone (an `Arc` inside); clones share
/// the HTTP connection pool and the `max_in_flight` limit.
#[derive(Clone, Debug)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The SDK client (owns the connection pool, retry and timeout config).
    client: aws_sdk_s3::Client,
    /// Options as given (for names in errors and transfer sizes).
    opts: S3Options,
    /// Bounds part/range requests in flight across all operations.
    in_flight: Semaphore,
}

impl BlobStore {
    /// Validates `opts` and builds the client. No request is made here: the first request
    /// (usually [`ensure_bucket`](Self::ensure_bucket)) reports an unreachable store or wrong
    /// credentials.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`].
    pub fn connect(opts: &S3Options) -> Result<Self> {
        opts.validate()?;
        let mut http = aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ));
        if let Some(ca) = &opts.ca_path {
            // Checked here: the SDK parses the bundle lazily and panics on a bad one.
            crate::crypto::tls::load_roots(ca).map_err(|e| Error::InvalidOptions {
                reason: format!("{e} (CN_S3_CA_PATH in customized_training_s3_config)"),
            })?;
            let pem = std::fs::read(ca).map_err(|source| Error::Io {
                op: "reading the S3 CA file",
                path: ca.clone(),
                source,
            })?;
            let trust = tls::TrustStore::empty()
                .with_native_roots(false)
                .with_pem_certificate(pem);
            let ctx = tls::TlsContext::builder()
                .with_trust_store(trust)
                .build()
                .map_err(|e| Error::InvalidOptions {
                    reason: format!("S3 TLS settings: {e}"),
                })?;
            http = http.tls_context(ctx);
        }
        let http = http.build_https();
        let retry = RetryConfig::standard()
            .with_max_attempts(opts.max_attempts)
            .with_initial_backoff(opts.initial_backoff)
            .with_max_backoff(opts.max_backoff);
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .operation_attempt_timeout(opts.attempt_timeout)
            .operation_timeout(opts.operation_timeout)
            .build();
        let creds = Credentials::new(
            opts.access_key.clone(),
            opts.secret_key.clone(),
            None,
            None,
            "fedmq-config",
        );
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(opts.endpoint.trim_end_matches('/'))
            // FedML configs often leave CN_REGION_NAME empty; SigV4 needs some region.
            .region(Region::new(if opts.region.is_empty() {
                "us-east-1".to_string()
            } else {
                opts.region.clone()
            }))
            .credentials_provider(creds)
            .force_path_style(opts.force_path_style)
            .http_client(http)
            .retry_config(retry)
            .timeout_config(timeouts)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Ok(Self {
            inner: Arc::new(Inner {
                client: aws_sdk_s3::Client::from_conf(conf),
                opts: opts.clone(),
                in_flight: Semaphore::new(opts.max_in_flight),
            }),
        })
    }

    /// The options this store was built with.
    pub fn options(&self) -> &S3Options {
        &self.inner.opts
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.inner.opts.bucket
    }

    fn ctx<'a>(&'a self, op: &'static str, key: &'a str) -> Ctx<'a> {
        Ctx {
            op,
            endpoint: &self.inner.opts.endpoint,
            bucket: &self.inner.opts.bucket,
            key,
        }
    }

    /// [`map_sdk`], except that a failed TLS handshake says so and names the CA file.
    fn sdk_error<E>(&self, err: SdkError<E, HttpResponse>, ctx: Ctx<'_>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let opts = &self.inner.opts;
        if let Some(rest) = opts.endpoint.strip_prefix("https://") {
            let authority = rest.split('/').next().unwrap_or_default();
            let host = match authority.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or_default(),
                None => authority.split(':').next().unwrap_or_default(),
            };
            let ca = opts.ca_path.clone().unwrap_or_else(|| {
                PathBuf::from("the system trust store (CN_S3_CA_PATH is not set)")
            });
            let peer = format!("the S3 endpoint {}", opts.endpoint);
            if let Some(reason) = crate::crypto::tls::explain_handshake(&err, &peer, host, &ca) {
                return Error::Unreachable {
                    endpoint: ctx.endpoint.to_string(),
                    reason,
                    hint: TLS_HINT,
                };
            }
        }
        map_sdk(err, ctx)
    }

    fn client(&self) -> &aws_sdk_s3::Client {
        &self.inner.client
    }

    /// Creates the bucket if it does not exist. A bucket that exists and that we can access
    /// (including "already owned by you") is success.
    ///
    /// # Errors
    /// [`Error::Auth`], [`Error::Unreachable`], or [`Error::S3`] (e.g. the name is taken by
    /// another account).
    #[tracing::instrument(skip(self), fields(bucket = %self.bucket()))]
    pub async fn ensure_bucket(&self) -> Result<()> {
        match self.head_bucket().await {
            Ok(()) => return Ok(()),
            Err(Error::NoSuchBucket { .. }) => {}
            Err(e) => return Err(e),
        }
        let mut req = self.client().create_bucket().bucket(self.bucket());
        let region = self.inner.opts.region.as_str();
        if !region.is_empty() && region != "us-east-1" {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => {
                tracing::info!("created bucket");
                Ok(())
            }
            Err(e) => match self.sdk_error(e, self.ctx("CreateBucket", "")) {
                Error::S3 { ref code, .. } if code == "BucketAlreadyOwnedByYou" => Ok(()),
                // Created concurrently (some stores say so for our own bucket): fine if we can access it.
                Error::S3 { ref code, .. } if code == "BucketAlreadyExists" => {
                    self.head_bucket().await
                }
                e => Err(e),
            },
        }
    }

    /// Whether the bucket answers to this credential (`HeadBucket`).
    ///
    /// # Errors
    /// [`Error::NoSuchBucket`], [`Error::Auth`] (a HEAD answer has no code: wrong credentials
    /// and a policy without `s3:ListBucket` look the same), [`Error::Unreachable`], ...
    pub async fn head_bucket(&self) -> Result<()> {
        self.client()
            .head_bucket()
            .bucket(self.bucket())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.sdk_error(e, self.ctx("HeadBucket", "")))
    }

    /// Uploads `bytes` under `key` (overwriting) and returns its reference.
    ///
    /// # Errors
    /// [`Error::Auth`], [`Error::Unreachable`], [`Error::NoSuchBucket`], [`Error::Timeout`],
    /// [`Error::S3`]; a failed multipart upload is aborted before the error is returned.
    #[tracing::instrument(skip(self, bytes), fields(len = bytes.len()))]
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<BlobRef> {
        let len = bytes.len();
        let sha256 = if len <= self.inner.opts.multipart_threshold {
            let sha256 = digest_hex(bytes.clone()).await?;
            let mut req = self
                .client()
                .put_object()
                .bucket(self.bucket())
                .key(key)
                .body(ByteStream::from(bytes))
                .customize();
            if !self.inner.opts.sign_payload {
                req = req.disable_payload_signing();
            }
            req.send()
                .await
                .map_err(|e| self.sdk_error(e, self.ctx("PutObject", key)))?;
            sha256
        } else {
            // Hash on the blocking pool while the parts upload.
            let (sha256, uploaded) =
                tokio::join!(digest_hex(bytes.clone()), self.put_multipart(key, bytes));
            uploaded?;
            sha256?
        };
        tracing::debug!(%sha256, "put");
        Ok(BlobRef {
            key: key.to_string(),
            len: len as u64,
            sha256,
            wrapped_key: None,
        })
    }

    /// The part size for a blob of `len` bytes: `part_size`, grown to stay within [`MAX_PARTS`].
    fn part_size_for(&self, len: usize) -> usize {
        self.inner.opts.part_size.max(len.div_ceil(MAX_PARTS))
    }

    async fn put_multipart(&self, key: &str, bytes: Bytes) -> Result<()> {
        let created = self
            .client()
            .create_multipart_upload()
            .bucket(self.bucket())
            .key(key)
            .send()
            .await
            .map_err(|e| self.sdk_error(e, self.ctx("CreateMultipartUpload", key)))?;
        let Some(upload_id) = created.upload_id().map(str::to_string) else {
            return Err(from_response(
                self.ctx("CreateMultipartUpload", key),
                200,
                Some("MissingUploadId".into()),
                "the response carried no upload id".into(),
            ));
        };
        let result = self.upload_parts_and_complete(key, &upload_id, bytes).await;
        if let Err(e) = &result {
            tracing::warn!(error = %e, %upload_id, "multipart upload failed; aborting it");
            if let Err(abort) = self
                .client()
                .abort_multipart_upload()
                .bucket(self.bucket())
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await
            {
                let abort = self.sdk_error(abort, self.ctx("AbortMultipartUpload", key));
                tracing::warn!(error = %abort, %upload_id, "abort failed; the store's lifecycle rules must reap the parts");
            }
        }
        result
    }

    async fn upload_parts_and_complete(
        &self,
        key: &str,
        upload_id: &str,
        bytes: Bytes,
    ) -> Result<()> {
        let part_size = self.part_size_for(bytes.len());
        let n_parts = bytes.len().div_ceil(part_size);
        // Design: the futures are built eagerly into a Vec (they do nothing until polled). A
        // `.map(closure)` over a stream that borrows `key` makes the whole future fail
        // rustc's higher-ranked `Send` check, so callers could not `tokio::spawn` a put.
        let uploads: Vec<_> = (0..n_parts)
            .map(|i| {
                let start = i * part_size;
                let end = (start + part_size).min(bytes.len());
                self.upload_part(key, upload_id, i + 1, bytes.slice(start..end))
            })
            .collect();
        let mut parts: Vec<CompletedPart> = futures::stream::iter(uploads)
            .buffer_unordered(self.inner.opts.concurrency)
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.part_number());
        self.client()
            .complete_multipart_upload()
            .bucket(self.bucket())
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.sdk_error(e, self.ctx("CompleteMultipartUpload", key)))?;
        Ok(())
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: usize,
        body: Bytes,
    ) -> Result<CompletedPart> {
        let _permit = self.permit().await?;
        // Part numbers are at most MAX_PARTS (10 000), so they fit an i32.
        let part_number = i32::try_from(part_number).unwrap_or(i32::MAX);
        let mut req = self
            .client()
            .upload_part()
            .bucket(self.bucket())
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .body(ByteStream::from(body))
            .customize();
        if !self.inner.opts.sign_payload {
            req = req.disable_payload_signing();
        }
        let out = req
            .send()
            .await
            .map_err(|e| self.sdk_error(e, self.ctx("UploadPart", key)))?;
        Ok(CompletedPart::builder()
            .part_number(part_number)
            .set_e_tag(out.e_tag().map(str::to_string))
            .build())
    }

    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        // The semaphore lives as long as `Inner` and is never closed.
        self.inner
            .in_flight
            .acquire()
            .await
            .map_err(|e| Error::Internal {
                reason: format!("transfer limiter: {e}"),
            })
    }

    /// Downloads the blob `r` refers to and returns its bytes once their length and SHA-256 match
    /// `r`. A mismatch is re-fetched once (a torn read, a concurrent overwrite) before it is an
    /// error.
    ///
    /// # Errors
    /// [`Error::Digest`], [`Error::Length`], [`Error::NotFound`], [`Error::InvalidBlobRef`],
    /// and the transport errors of [`put`](Self::put).
    #[tracing::instrument(skip(self, r), fields(key = %r.key, len = r.len))]
    pub async fn get(&self, r: &BlobRef) -> Result<Bytes> {
        let expected = Digest::from_str(&r.sha256).map_err(|e| Error::InvalidBlobRef {
            key: r.key.clone(),
            reason: format!("sha256 {:?} is not 64 hex digits: {e}", r.sha256),
        })?;
        let len = usize::try_from(r.len).map_err(|_| Error::InvalidBlobRef {
            key: r.key.clone(),
            reason: format!("length {} does not fit in memory on this platform", r.len),
        })?;
        let mut got = String::new();
        for attempt in 0..2 {
            let bytes = self.fetch(&r.key, len).await?;
            let digest = digest_hex(bytes.clone()).await?;
            if digest == expected.to_hex() {
                return Ok(bytes);
            }
            tracing::warn!(attempt, expected = %expected, got = %digest, "SHA-256 mismatch");
            got = digest;
        }
        Err(Error::Digest {
            key: r.key.clone(),
            expected: expected.to_hex(),
            got,
        })
    }

    /// Downloads the blob `r` refers to, checking its length but not its SHA-256: only for blobs
    /// whose reader authenticates every byte itself, i.e. sealed blobs whose content key was
    /// wrapped to this reader alone ([`crate::crypto::seal`]: a changed byte fails the AEAD tag). Saves
    /// one hash pass over every update on the server.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::InvalidBlobRef`], and the transport errors of
    /// [`put`](Self::put).
    pub async fn get_length_checked(&self, r: &BlobRef) -> Result<Bytes> {
        let len = usize::try_from(r.len).map_err(|_| Error::InvalidBlobRef {
            key: r.key.clone(),
            reason: format!("length {} does not fit in memory on this platform", r.len),
        })?;
        self.fetch(&r.key, len).await
    }

    /// Downloads the whole of `key` without a digest check: for small documents found by
    /// listing (checkpoints), whose content names digest-checked blobs.
    ///
    /// # Errors
    /// [`Error::NotFound`] and the transport errors of [`put`](Self::put).
    pub async fn get_unverified(&self, key: &str) -> Result<Bytes> {
        let len = self.head(key).await?;
        let len = usize::try_from(len).map_err(|_| Error::InvalidBlobRef {
            key: key.to_string(),
            reason: format!("length {len} does not fit in memory on this platform"),
        })?;
        self.fetch(key, len).await
    }

    /// Downloads exactly `len` bytes of `key` (length-checked, not digest-checked).
    async fn fetch(&self, key: &str, len: usize) -> Result<Bytes> {
        let part = self.part_size_for(len);
        // Zeroed allocation: fresh pages from the OS, faulted in as the ranges land.
        let mut buf = vec![0u8; len];
        if len <= part {
            self.fetch_range_retrying(key, 0, &mut buf, len as u64, len == 0)
                .await?;
        } else {
            // Eager Vec of futures over disjoint slices of `buf`; see `upload_parts_and_complete`.
            let ranges: Vec<_> = buf
                .chunks_mut(part)
                .enumerate()
                .map(|(i, dst)| self.fetch_range_retrying(key, i * part, dst, len as u64, false))
                .collect();
            let _: Vec<()> = futures::stream::iter(ranges)
                .buffer_unordered(self.inner.opts.concurrency)
                .try_collect()
                .await?;
        }
        Ok(Bytes::from(buf))
    }

    /// [`fetch_range`](Self::fetch_range), re-requested with backoff when the body breaks off.
    async fn fetch_range_retrying(
        &self,
        key: &str,
        start: usize,
        dst: &mut [u8],
        total: u64,
        whole: bool,
    ) -> Result<()> {
        let mut attempt: u32 = 0;
        loop {
            match self.fetch_range(key, start, dst, total, whole).await {
                Err(e @ Error::Transfer { .. }) if attempt + 1 < self.inner.opts.max_attempts => {
                    let delay = backoff(
                        attempt,
                        self.inner.opts.initial_backoff,
                        self.inner.opts.max_backoff,
                    );
                    tracing::debug!(error = %e, ?delay, "body broke off; re-requesting the range");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// Fills `dst` with bytes `start..start+dst.len()` of `key`, checking that the object is
    /// `total` bytes long. `whole` requests the object without a Range header (empty objects:
    /// S3 cannot satisfy a range of an empty object).
    async fn fetch_range(
        &self,
        key: &str,
        start: usize,
        dst: &mut [u8],
        total: u64,
        whole: bool,
    ) -> Result<()> {
        let _permit = self.permit().await?;
        let ctx = self.ctx("GetObject", key);
        let end = start + dst.len();
        let work = async {
            let mut req = self.client().get_object().bucket(self.bucket()).key(key);
            if !whole {
                req = req.range(format!("bytes={start}-{}", end.saturating_sub(1)));
            }
            let out = match req.send().await {
                Ok(out) => out,
                Err(e) => {
                    // A range past the end: the object is shorter than the reference says.
                    let e = self.sdk_error(e, ctx);
                    if matches!(&e, Error::S3 { code, .. } if code == "InvalidRange") {
                        return Err(self.length_error(key, total).await);
                    }
                    return Err(e);
                }
            };
            let object_len = match out.content_range() {
                Some(cr) => parse_content_range_total(cr),
                None => out.content_length().and_then(|l| u64::try_from(l).ok()),
            };
            if let Some(object_len) = object_len {
                if object_len != total {
                    return Err(Error::Length {
                        key: key.to_string(),
                        expected: total,
                        got: object_len,
                    });
                }
            }
            let mut body = out.body;
            let mut filled = 0usize;
            while let Some(chunk) = body.try_next().await.map_err(|e| Error::Transfer {
                op: "GetObject",
                endpoint: ctx.endpoint.to_string(),
                bucket: ctx.bucket.to_string(),
                key: key.to_string(),
                reason: format!("response body: {e}"),
            })? {
                let Some(slot) = dst.get_mut(filled..filled + chunk.len()) else {
                    return Err(Error::Length {
                        key: key.to_string(),
                        expected: total,
                        got: (start + filled + chunk.len()) as u64,
                    });
                };
                slot.copy_from_slice(&chunk);
                filled += chunk.len();
            }
            if filled != dst.len() {
                return Err(Error::Transfer {
                    op: "GetObject",
                    endpoint: ctx.endpoint.to_string(),
                    bucket: ctx.bucket.to_string(),
                    key: key.to_string(),
                    reason: format!("response body ended after {filled} of {} bytes", dst.len()),
                });
            }
            Ok(())
        };
        // The SDK's timeouts end when the headers arrive; this one covers the body too.
        match tokio::time::timeout(self.inner.opts.operation_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                op: "GetObject",
                endpoint: ctx.endpoint.to_string(),
                bucket: ctx.bucket.to_string(),
                key: key.to_string(),
                reason: format!(
                    "body not received within {:?}",
                    self.inner.opts.operation_timeout
                ),
            }),
        }
    }

    /// The length error for `key`, with the object's real length if HEAD tells it.
    async fn length_error(&self, key: &str, expected: u64) -> Error {
        match self.head(key).await {
            Ok(got) => Error::Length {
                key: key.to_string(),
                expected,
                got,
            },
            Err(e) => e,
        }
    }

    /// The length of `key`.
    ///
    /// # Errors
    /// [`Error::NotFound`] and the transport errors of [`put`](Self::put).
    pub async fn head(&self, key: &str) -> Result<u64> {
        let out = self
            .client()
            .head_object()
            .bucket(self.bucket())
            .key(key)
            .send()
            .await
            .map_err(|e| self.sdk_error(e, self.ctx("HeadObject", key)))?;
        Ok(out
            .content_length()
            .and_then(|l| u64::try_from(l).ok())
            .unwrap_or(0))
    }

    /// Deletes `key`. Deleting a missing key is success (S3 semantics).
    ///
    /// # Errors
    /// The transport errors of [`put`](Self::put).
    #[tracing::instrument(skip(self))]
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.client()
            .delete_object()
            .bucket(self.bucket())
            .key(key)
            .send()
            .await
            .map_err(|e| self.sdk_error(e, self.ctx("DeleteObject", key)))?;
        Ok(())
    }

    /// Every object whose key starts with `prefix`, in key order (paginated `ListObjectsV2`).
    ///
    /// # Errors
    /// The transport errors of [`put`](Self::put), [`Error::NoSuchBucket`].
    #[tracing::instrument(skip(self))]
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client()
                .list_objects_v2()
                .bucket(self.bucket())
                .prefix(prefix)
                .max_keys(self.inner.opts.list_page_size)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.sdk_error(e, self.ctx("ListObjectsV2", prefix)))?;
            for o in page.contents() {
                if let Some(key) = o.key() {
                    out.push(ObjectMeta {
                        key: key.to_string(),
                        len: o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes every object under `prefix`; returns how many were deleted. An empty prefix is
    /// refused (it would empty the bucket).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for an empty prefix, the errors of [`list`](Self::list), and
    /// [`Error::S3`] / [`Error::Auth`] for the first key the store refused to delete.
    #[tracing::instrument(skip(self))]
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        if prefix.is_empty() {
            return Err(Error::InvalidOptions {
                reason: "refusing to delete with an empty prefix (the whole bucket)".into(),
            });
        }
        let keys = self
            .list(prefix)
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect();
        self.delete_keys(keys).await
    }

    /// Deletes every round-scoped key of the run `keys` describes whose round is below
    /// `keep_from_round` (global models and updates; see [`BlobKeys::round_of`]). Checkpoints and
    /// the final model are kept. Returns how many objects were deleted.
    ///
    /// # Errors
    /// As [`delete_prefix`](Self::delete_prefix).
    #[tracing::instrument(skip(self, keys))]
    pub async fn delete_rounds_before(
        &self,
        keys: &BlobKeys,
        keep_from_round: u64,
    ) -> Result<usize> {
        if keep_from_round == 0 {
            return Ok(0);
        }
        let doomed = self
            .list(&keys.run_prefix())
            .await?
            .into_iter()
            .filter(|o| keys.round_of(&o.key).is_some_and(|r| r < keep_from_round))
            .map(|o| o.key)
            .collect();
        self.delete_keys(doomed).await
    }

    /// Applies `policy` after `current_round` was written: deletes the rounds it does not keep.
    ///
    /// # Errors
    /// As [`delete_rounds_before`](Self::delete_rounds_before).
    pub async fn apply_retention(
        &self,
        keys: &BlobKeys,
        policy: RetentionPolicy,
        current_round: u64,
    ) -> Result<usize> {
        self.delete_rounds_before(keys, policy.keep_from_round(current_round))
            .await
    }

    /// Batch-deletes `keys` (`DeleteObjects`, 1000 per request, quiet mode).
    async fn delete_keys(&self, keys: Vec<String>) -> Result<usize> {
        let mut deleted = 0;
        for batch in keys.chunks(1000) {
            let objects = batch
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Error::Internal {
                    reason: format!("building DeleteObjects: {e}"),
                })?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| Error::Internal {
                    reason: format!("building DeleteObjects: {e}"),
                })?;
            let first = batch.first().map(String::as_str).unwrap_or("");
            let out = self
                .client()
                .delete_objects()
                .bucket(self.bucket())
                .delete(delete)
                .send()
                .await
                .map_err(|e| self.sdk_error(e, self.ctx("DeleteObjects", first)))?;
            if let Some(err) = out.errors().first() {
                let key = err.key().unwrap_or(first);
                return Err(from_response(
                    self.ctx("DeleteObjects", key),
                    0,
                    err.code().map(str::to_string),
                    err.message().unwrap_or("").to_string(),
                ));
            }
            deleted += batch.len();
        }
        tracing::debug!(deleted, "deleted objects");
        Ok(deleted)
    }
}

/// The SHA-256 of `bytes` as 64 lowercase hex digits; large inputs are hashed on the blocking
/// pool so the async workers keep moving bytes.
async fn digest_hex(bytes: Bytes) -> Result<String> {
    if bytes.len() <= INLINE_HASH_MAX {
        return Ok(Digest::of_bytes(&bytes).to_hex());
    }
    tokio::task::spawn_blocking(move || Digest::of_bytes(&bytes).to_hex())
        .await
        .map_err(|e| Error::Internal {
            reason: format!("hashing task: {e}"),
        })
}

/// Full-jitter exponential backoff: uniform in `[0, min(max, initial * 2^attempt)]`.
fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let cap = initial
        .saturating_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
        .min(max);
    let ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

/// The `SIZE` of `bytes START-END/SIZE`.
fn parse_content_range_total(cr: &str) -> Option<u64> {
    cr.rsplit_once('/')?.1.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest_rounds() {
        let keep3 = RetentionPolicy::KeepLast(NonZeroU64::new(3).unwrap());
        assert_eq!(keep3.keep_from_round(10), 8);
        assert_eq!(keep3.keep_from_round(1), 0);
        assert_eq!(RetentionPolicy::KeepAll.keep_from_round(10), 0);
        let keep1 = RetentionPolicy::KeepLast(NonZeroU64::MIN);
        assert_eq!(keep1.keep_from_round(5), 5);
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 0..40 {
            let d = backoff(attempt, Duration::from_millis(100), Duration::from_secs(2));
            assert!(d <= Duration::from_secs(2));
        }
    }

    #[test]
    fn content_range_total() {
        assert_eq!(parse_content_range_total("bytes 0-9/100"), Some(100));
        assert_eq!(parse_content_range_total("bytes */100"), Some(100));
        assert_eq!(parse_content_range_total("garbage"), None);
    }

    #[test]
    fn options_validate() {
        let ok = S3Options {
            endpoint: "http://127.0.0.1:9000".into(),
            access_key: "a".into(),
            secret_key: "s".into(),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let e = S3Options {
            endpoint: "127.0.0.1:9000".into(),
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("CN_S3_ENDPOINT"), "{e}");
        let e = S3Options {
            secret_key: String::new(),
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("CN_S3_SAK"), "{e}");
        assert!(!format!("{ok:?}").contains("\"s\""));
    }
}
