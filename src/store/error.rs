//! [`Error`]: everything the blob layer and the embedded store can fail with, and the mapping from
//! the S3 SDK's errors to it.
//!
//! Every variant names what the operator needs to find the problem: the endpoint, the bucket, the
//! key, and for configuration problems the configuration keys (FedML's `CN_S3_*`) and environment
//! variables to check.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Result of store operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Where to look when the store rejects our credentials.
pub const AUTH_HINT: &str =
    "check comm_args.customized_training_s3_config.CN_S3_AKI / CN_S3_SAK in \
     the config file, or the environment variables FEDMQ_S3_AKI / FEDMQ_S3_SAK that override them";

/// Where to look when the store cannot be reached.
pub const UNREACHABLE_HINT: &str = "is the store running? check \
     comm_args.customized_training_s3_config.CN_S3_ENDPOINT (env FEDMQ_S3_ENDPOINT)";

/// Errors of the blob layer ([`super::BlobStore`]) and the embedded server
/// ([`super::EmbeddedStore`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // === Configuration ===
    /// The options are unusable (empty endpoint, empty secret key, zero part size, ...).
    #[error("invalid store options: {reason}")]
    InvalidOptions {
        /// What is wrong and which setting to change.
        reason: String,
    },

    // === Reaching and authenticating to the store ===
    /// The store rejected the credentials or the signature (HTTP 403, `SignatureDoesNotMatch`,
    /// `InvalidAccessKeyId`, `AccessDenied`).
    #[error("S3 endpoint {endpoint} rejected the request ({code}): {hint}")]
    Auth {
        /// The endpoint that answered.
        endpoint: String,
        /// The S3 error code, or the HTTP status when the response had no body (HEAD).
        code: String,
        /// Which configuration keys to check ([`AUTH_HINT`]).
        hint: &'static str,
    },
    /// The store accepted the credential but refused the request (`AccessDenied`): the rights
    /// of the credential in use (a participant's, see `super::access`) do not cover it.
    #[error(
        "S3 endpoint {endpoint} refused {op} of {bucket}/{key} (AccessDenied): the credential in \
         use may not do this (a participant's own store credential may write only its own \
         updates; docs/SECURITY.md, \"Least privilege on the store\")"
    )]
    Denied {
        /// The endpoint that answered.
        endpoint: String,
        /// The S3 operation.
        op: &'static str,
        /// The bucket.
        bucket: String,
        /// The key (empty for bucket-level operations).
        key: String,
    },
    /// No connection could be made (refused, reset, DNS failure, connect timeout).
    #[error("S3 endpoint {endpoint} is unreachable ({reason}): {hint}")]
    Unreachable {
        /// The endpoint we tried.
        endpoint: String,
        /// The transport's reason, e.g. "Connection refused".
        reason: String,
        /// What to check ([`UNREACHABLE_HINT`]).
        hint: &'static str,
    },
    /// A request did not finish within the configured timeouts (after retries).
    #[error("S3 {op} of {bucket}/{key} at {endpoint} timed out: {reason}")]
    Timeout {
        /// The S3 operation (`GetObject`, `UploadPart`, ...).
        op: &'static str,
        /// The endpoint.
        endpoint: String,
        /// The bucket.
        bucket: String,
        /// The key (empty for bucket-level operations).
        key: String,
        /// Which timeout fired.
        reason: String,
    },

    // === Expected outcomes of individual requests ===
    /// The object does not exist.
    #[error("blob {bucket}/{key} not found at {endpoint}")]
    NotFound {
        /// The endpoint.
        endpoint: String,
        /// The bucket.
        bucket: String,
        /// The missing key.
        key: String,
    },
    /// The bucket does not exist (call [`super::BlobStore::ensure_bucket`] first).
    #[error("bucket {bucket} does not exist at {endpoint} (BUCKET_NAME in customized_training_s3_config)")]
    NoSuchBucket {
        /// The endpoint.
        endpoint: String,
        /// The missing bucket.
        bucket: String,
    },

    /// A response body broke off or came short mid-transfer (retried before it is returned).
    #[error("S3 {op} of {bucket}/{key} at {endpoint}: transfer interrupted: {reason}")]
    Transfer {
        /// The S3 operation.
        op: &'static str,
        /// The endpoint.
        endpoint: String,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// What happened to the body.
        reason: String,
    },

    // === Integrity ===
    /// A [`crate::proto::BlobRef`] that cannot be fetched as given (malformed digest, length too
    /// large for this platform).
    #[error("invalid blob reference for {key}: {reason}")]
    InvalidBlobRef {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The bytes read do not hash to the digest in the blob reference (also after a re-fetch).
    #[error("blob {key}: SHA-256 mismatch (expected {expected}, got {got}); the bytes were not returned")]
    Digest {
        /// The key.
        key: String,
        /// The digest from the blob reference.
        expected: String,
        /// The digest of the bytes received.
        got: String,
    },
    /// The object's length differs from the blob reference.
    #[error("blob {key}: length mismatch (expected {expected} bytes, got {got})")]
    Length {
        /// The key.
        key: String,
        /// The length from the blob reference.
        expected: u64,
        /// The length the store reported or sent.
        got: u64,
    },

    // === Everything else the store can say ===
    /// Any other error response from the store.
    #[error("S3 {op} of {bucket}/{key} at {endpoint} failed: {code} (HTTP {status}): {message}")]
    S3 {
        /// The S3 operation.
        op: &'static str,
        /// The endpoint.
        endpoint: String,
        /// The bucket.
        bucket: String,
        /// The key (empty for bucket-level operations).
        key: String,
        /// The S3 error code (`InternalError`, `SlowDown`, ...), or `-` if none.
        code: String,
        /// The HTTP status, 0 if there was no response.
        status: u16,
        /// The store's message, or the SDK's description.
        message: String,
    },

    /// A bug or an unexpected condition inside this module (a task panicked, ...).
    #[error("store internal error: {reason}")]
    Internal {
        /// What went wrong.
        reason: String,
    },

    // === Embedded server ===
    /// A filesystem operation of the embedded server failed.
    #[error("embedded store: {op} {path}: {source}")]
    Io {
        /// What we were doing (`creating data directory`, ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The embedded server could not listen on its address.
    #[error("embedded store: cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The embedded server failed otherwise.
    #[error("embedded store: {reason}")]
    Server {
        /// What went wrong.
        reason: String,
    },
}

impl Error {
    /// True for errors that a retry of the whole operation may cure (timeouts, unreachable store,
    /// 5xx, throttling). Integrity errors are not retryable at this level: [`super::BlobStore::get`]
    /// already re-fetched once.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout { .. } | Error::Transfer { .. } => true,
            Error::S3 { status, code, .. } => {
                *status >= 500 || *status == 429 || *status == 0 || code == "SlowDown"
            }
            _ => false,
        }
    }
}

/// What a request was about, to name it in errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub op: &'static str,
    pub endpoint: &'a str,
    pub bucket: &'a str,
    pub key: &'a str,
}

/// S3 error codes that mean "your credentials or signature are wrong".
const AUTH_CODES: &[&str] = &[
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "NotSignedUp",
    "InvalidSecurity",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "RequestTimeTooSkewed",
];

/// Maps any SDK error to an [`Error`], never panicking on odd responses.
pub(crate) fn map_sdk<E>(err: SdkError<E, HttpResponse>, ctx: Ctx<'_>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    // The SDK's own Display is terse ("dispatch failure"); the sources say what happened.
    let reason = source_chain(std::error::Error::source(&err));
    let timeout = |reason: String| Error::Timeout {
        op: ctx.op,
        endpoint: ctx.endpoint.to_string(),
        bucket: ctx.bucket.to_string(),
        key: ctx.key.to_string(),
        reason,
    };
    match &err {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().map(str::to_string);
            let message = se.err().message().map(str::to_string).unwrap_or(reason);
            from_response(ctx, status, code, message)
        }
        SdkError::DispatchFailure(df) => {
            if df.is_timeout() {
                timeout(reason)
            } else if is_connect_error(&err) {
                Error::Unreachable {
                    endpoint: ctx.endpoint.to_string(),
                    reason,
                    hint: UNREACHABLE_HINT,
                }
            } else {
                // E.g. the connection was closed mid-transfer: transient (status 0).
                other(ctx, 0, "-", reason)
            }
        }
        SdkError::TimeoutError(_) => timeout(reason),
        SdkError::ResponseError(re) => {
            let status = re.raw().status().as_u16();
            // An unparsable 403 is still an authentication failure.
            if status == 403 {
                return from_response(ctx, status, None, reason);
            }
            other(ctx, status, "-", reason)
        }
        // ConstructionFailure, and whatever a future SDK adds (`SdkError` is non-exhaustive).
        _ => other(ctx, 0, "-", reason),
    }
}

/// Maps an error response (status, optional S3 code) to an [`Error`].
pub(crate) fn from_response(
    ctx: Ctx<'_>,
    status: u16,
    code: Option<String>,
    message: String,
) -> Error {
    let code_str = code.as_deref().unwrap_or("");
    if code_str == "AccessDenied" {
        return Error::Denied {
            endpoint: ctx.endpoint.to_string(),
            op: ctx.op,
            bucket: ctx.bucket.to_string(),
            key: ctx.key.to_string(),
        };
    }
    // A 403 without a code is an authentication failure; one with another code (e.g.
    // InvalidObjectState: the store cannot serve a damaged object) is not.
    if (status == 403 && code.is_none()) || AUTH_CODES.contains(&code_str) {
        return Error::Auth {
            endpoint: ctx.endpoint.to_string(),
            code: code.unwrap_or_else(|| format!("HTTP {status}")),
            hint: AUTH_HINT,
        };
    }
    // A 404 of a bucket-level request (HeadBucket answers with no body, the SDK says "NotFound").
    if code_str == "NoSuchBucket" || (status == 404 && ctx.key.is_empty()) {
        return Error::NoSuchBucket {
            endpoint: ctx.endpoint.to_string(),
            bucket: ctx.bucket.to_string(),
        };
    }
    if code_str == "NoSuchKey" || code_str == "NotFound" || (status == 404 && !ctx.key.is_empty()) {
        return Error::NotFound {
            endpoint: ctx.endpoint.to_string(),
            bucket: ctx.bucket.to_string(),
            key: ctx.key.to_string(),
        };
    }
    other(ctx, status, code.as_deref().unwrap_or("-"), message)
}

fn other(ctx: Ctx<'_>, status: u16, code: &str, message: String) -> Error {
    Error::S3 {
        op: ctx.op,
        endpoint: ctx.endpoint.to_string(),
        bucket: ctx.bucket.to_string(),
        key: ctx.key.to_string(),
        code: code.to_string(),
        status,
        message,
    }
}

/// "a: b: c" from an error and its sources, skipping repeated messages.
fn source_chain(err: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = err;
    while let Some(e) = cur {
        let s = e.to_string();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    if parts.is_empty() {
        return "no details".to_string();
    }
    parts.join(": ")
}

/// True if the chain says the connection could not be made (refused, DNS, unroutable).
fn is_connect_error(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind as K;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        // hyper-util's connector: "tcp connect error", "dns error".
        let s = e.to_string();
        if s.contains("connect error") || s.contains("dns error") {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::NotConnected
                    | K::AddrNotAvailable
                    | K::HostUnreachable
                    | K::NetworkUnreachable
            ) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx<'static> {
        Ctx {
            op: "GetObject",
            endpoint: "http://127.0.0.1:9",
            bucket: "b",
            key: "k",
        }
    }

    #[test]
    fn auth_codes_and_403_map_to_auth_with_config_keys() {
        for (status, code) in [
            (403, Some("SignatureDoesNotMatch")),
            (403, None),
            (400, Some("InvalidAccessKeyId")),
        ] {
            let e = from_response(ctx(), status, code.map(str::to_string), String::new());
            assert!(matches!(e, Error::Auth { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(
                msg.contains("CN_S3_AKI") && msg.contains("FEDMQ_S3_SAK"),
                "{msg}"
            );
        }
    }

    #[test]
    fn access_denied_names_the_request_not_the_credentials() {
        let e = from_response(ctx(), 403, Some("AccessDenied".into()), String::new());
        assert!(matches!(e, Error::Denied { .. }), "{e:?}");
        assert!(!e.is_transient());
        let msg = e.to_string();
        assert!(msg.contains("GetObject of b/k"), "{msg}");
    }

    #[test]
    fn not_found_and_other_codes() {
        let e = from_response(ctx(), 404, None, String::new());
        assert!(matches!(e, Error::NotFound { ref key, .. } if key == "k"));
        let e = from_response(ctx(), 404, Some("NoSuchBucket".into()), String::new());
        assert!(matches!(e, Error::NoSuchBucket { .. }));
        let e = from_response(ctx(), 503, Some("SlowDown".into()), "slow".into());
        assert!(e.is_transient());
        assert!(e.to_string().contains("SlowDown"));
    }
}
