//! Least privilege on the store: one credential per participant, and what each may do.
//!
//! Every participant of a run gets its own S3 key pair: the access key is its id (`client-3`,
//! `server`), the secret an HMAC-SHA256 of that id under the store's own secret (the operator's
//! `CN_S3_SAK`), cut to 40 hex characters ([`participant_secret`]). The embedded store therefore
//! needs no table of users: it derives the secret of any id it is asked about
//! ([`ParticipantAuth`]), and a client machine never holds the store's secret, only its own.
//! `fedmq keys -c <config>` writes each participant's credential as `<id>.s3` (an env file,
//! `FEDMQ_S3_AKI=…`, `FEDMQ_S3_SAK=…`) and, for MinIO or AWS, the IAM policy it must be given
//! ([`iam_policy`]).
//!
//! What a credential may do ([`ParticipantAccess`], the same rules as [`iam_policy`]):
//! - the store's own key pair and `server`: everything;
//! - a client `<id>`: write (PUT, multipart) only its own updates (`…/r<round>/updates/<id>`),
//!   read only the global models (`…/r<round>/global`), the final model (`…/final`) and its own
//!   updates, and check that the bucket exists. No listing, no deletes, no copies, nothing of
//!   another client: a refused request is `AccessDenied`, logged with the participant and key.

use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::path::S3Path;
use s3s::{s3_error, S3Result};
use std::path::Path;

/// What the HMAC of [`participant_secret`] is over, before the participant id.
const SECRET_LABEL: &[u8] = b"fedmq store credential v1\0";

/// The id whose credential may do everything a server does.
const SERVER: &str = "server";

/// The secret of participant `id` under the store's secret `store_secret`: 40 hex characters
/// (160 bits; the longest secret MinIO accepts).
pub fn participant_secret(store_secret: &str, id: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, store_secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(SECRET_LABEL);
    ctx.update(id.as_bytes());
    hex::encode(&ctx.sign().as_ref()[..20])
}

/// One participant's store key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreCredential {
    /// The access key id: the participant id.
    pub access_key: String,
    /// Its secret ([`participant_secret`]).
    pub secret_key: String,
}

impl std::fmt::Debug for StoreCredential {
    // The secret never reaches logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCredential")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

impl StoreCredential {
    /// The credential of participant `id` under the store's secret.
    pub fn for_participant(store_secret: &str, id: &str) -> Self {
        Self {
            access_key: id.to_string(),
            secret_key: participant_secret(store_secret, id),
        }
    }

    /// The env-file form: `FEDMQ_S3_AKI=<id>` and `FEDMQ_S3_SAK=<secret>` lines, which a shell
    /// (`set -a; . client-1.s3`) and docker compose (`env_file:`) read as they are.
    pub fn to_env_file(&self) -> String {
        format!(
            "# fedmq store credential of {id}: keep it on {id}'s machine only\n\
             FEDMQ_S3_AKI={id}\nFEDMQ_S3_SAK={secret}\n",
            id = self.access_key,
            secret = self.secret_key
        )
    }

    /// Parses [`to_env_file`](Self::to_env_file)'s form (comments and blank lines skipped).
    ///
    /// # Errors
    /// What is missing or unknown, for a message that names the file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (mut access, mut secret) = (None, None);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                return Err(format!("line {}: expected NAME=value", n + 1));
            };
            let value = value.trim().trim_matches('"').to_string();
            match name.trim() {
                "FEDMQ_S3_AKI" => access = Some(value),
                "FEDMQ_S3_SAK" => secret = Some(value),
                other => return Err(format!("line {}: unknown name {other:?}", n + 1)),
            }
        }
        match (access, secret) {
            (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => Ok(Self {
                access_key: a,
                secret_key: s,
            }),
            _ => Err("needs non-empty FEDMQ_S3_AKI and FEDMQ_S3_SAK lines".into()),
        }
    }

    /// Reads a credential file.
    ///
    /// # Errors
    /// The file is unreadable or malformed; the message names it.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read store credential {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("store credential {}: {e}", path.display()))
    }

    /// Writes the credential file, readable by its owner only (mode 0600 on Unix).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        std::io::Write::write_all(&mut o.open(path)?, self.to_env_file().as_bytes())
    }
}

/// Whether client `id` may run S3 operation `op` (s3s's names: `PutObject`, `GetObject`, ...)
/// on object `key` (`None` for bucket-level requests).
pub fn client_may(id: &str, op: &str, key: Option<&str>) -> bool {
    match (op, key) {
        ("HeadBucket", None) => true,
        (
            "PutObject"
            | "CreateMultipartUpload"
            | "UploadPart"
            | "CompleteMultipartUpload"
            | "AbortMultipartUpload"
            | "ListParts",
            Some(k),
        ) => {
            is_update_of(k, id) || is_round_item(k, "shares", id) || is_round_item(k, "reveal", id)
        }
        ("GetObject" | "HeadObject", Some(k)) => {
            is_update_of(k, id)
                || is_round_key(k, "global")
                || k.ends_with("/final")
                || is_round_item(k, "inbox", id)
        }
        _ => false,
    }
}

/// `…/r<round>/updates/<id>`.
fn is_update_of(key: &str, id: &str) -> bool {
    key.strip_suffix(id)
        .and_then(|k| k.strip_suffix("/updates/"))
        .is_some_and(|k| is_round_key(k, ""))
}

/// `…/r<round>/<dir>/<id>`: a client's own share bundle (`shares`), share inbox (`inbox`) or
/// LightSecAgg aggregate mask share (`reveal`) of a securely aggregated round. A client writes
/// its bundle and its aggregate share and reads its inbox, nobody else's: the server gathers
/// each client's shares from the bundles.
fn is_round_item(key: &str, dir: &str, id: &str) -> bool {
    key.strip_suffix(id)
        .and_then(|k| k.strip_suffix('/'))
        .and_then(|k| k.strip_suffix(dir))
        .and_then(|k| k.strip_suffix('/'))
        .is_some_and(|k| is_round_key(k, ""))
}

/// `…/r<digits>/<name>` (with `name` empty: `…/r<digits>`).
fn is_round_key(key: &str, name: &str) -> bool {
    let Some(rest) = key.strip_suffix(name) else {
        return false;
    };
    let rest = if name.is_empty() {
        rest
    } else {
        match rest.strip_suffix('/') {
            Some(r) => r,
            None => return false,
        }
    };
    let segment = rest.rsplit('/').next().unwrap_or(rest);
    rest.contains('/')
        && segment.len() > 1
        && segment.starts_with('r')
        && segment[1..].bytes().all(|b| b.is_ascii_digit())
}

/// The embedded store's authentication: its own key pair, and every participant's derived one.
pub struct ParticipantAuth {
    access_key: String,
    secret_key: String,
}

impl ParticipantAuth {
    /// Accepts `access_key`/`secret_key` and the credential of every participant derived from
    /// `secret_key`.
    pub fn new(access_key: impl Into<String>, secret_key: impl Into<String>) -> Self {
        Self {
            access_key: access_key.into(),
            secret_key: secret_key.into(),
        }
    }
}

#[async_trait::async_trait]
impl S3Auth for ParticipantAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        if access_key == self.access_key {
            return Ok(SecretKey::from(self.secret_key.clone()));
        }
        if crate::proto::valid_id(access_key) {
            return Ok(SecretKey::from(participant_secret(
                &self.secret_key,
                access_key,
            )));
        }
        Err(s3_error!(
            InvalidAccessKeyId,
            "the access key is neither the store's nor a participant id"
        ))
    }
}

/// The embedded store's authorization: the rules in this module's docs.
pub struct ParticipantAccess {
    access_key: String,
}

impl ParticipantAccess {
    /// Rules for a store whose own access key is `access_key` (allowed everything).
    pub fn new(access_key: impl Into<String>) -> Self {
        Self {
            access_key: access_key.into(),
        }
    }
}

#[async_trait::async_trait]
impl S3Access for ParticipantAccess {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let Some(who) = cx.credentials().map(|c| c.access_key.clone()) else {
            return Err(s3_error!(AccessDenied, "a signed request is required"));
        };
        if who == self.access_key || who == SERVER {
            return Ok(());
        }
        let op = cx.s3_op().name();
        let key = match cx.s3_path() {
            S3Path::Object { key, .. } => Some(&**key),
            _ => None,
        };
        if client_may(&who, op, key) {
            return Ok(());
        }
        tracing::warn!(
            participant = %who,
            op,
            key = key.unwrap_or("-"),
            "store request refused: outside what this participant may do"
        );
        Err(s3_error!(
            AccessDenied,
            "participant {who} may not {op} {}",
            key.unwrap_or("on this bucket")
        ))
    }
}

/// The IAM policy (MinIO, AWS) that gives participant `id` the same rights as
/// [`ParticipantAccess`], for the run whose keys start with `run_prefix` (`fedmq/<run_id>`) in
/// `bucket`. The server's policy covers the whole run prefix and the bucket.
pub fn iam_policy(bucket: &str, run_prefix: &str, id: &str) -> serde_json::Value {
    let run = format!("arn:aws:s3:::{bucket}/{}", run_prefix.trim_end_matches('/'));
    let statements = if id == SERVER {
        serde_json::json!([
            {
                "Effect": "Allow",
                "Action": ["s3:CreateBucket", "s3:ListBucket", "s3:GetBucketLocation",
                           "s3:ListBucketMultipartUploads"],
                "Resource": [format!("arn:aws:s3:::{bucket}")]
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                           "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
                "Resource": [format!("{run}/*")]
            }
        ])
    } else {
        let own = format!("{run}/r*/updates/{id}");
        let bundle = format!("{run}/r*/shares/{id}");
        let inbox = format!("{run}/r*/inbox/{id}");
        let reveal = format!("{run}/r*/reveal/{id}");
        serde_json::json!([
            {
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload",
                           "s3:ListMultipartUploadParts"],
                "Resource": [own, bundle, reveal]
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [own, format!("{run}/r*/global"), format!("{run}/final"), inbox]
            }
        ])
    };
    serde_json::json!({ "Version": "2012-10-17", "Statement": statements })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_per_participant_and_stable() {
        let a = participant_secret("store-secret", "client-1");
        assert_eq!(a.len(), 40);
        assert_eq!(a, participant_secret("store-secret", "client-1"));
        assert_ne!(a, participant_secret("store-secret", "client-2"));
        assert_ne!(a, participant_secret("other-secret", "client-1"));
        // Test vector (docs/SECURITY.md): HMAC-SHA256("s3cret", label ‖ "client-1")[..20].
        assert_eq!(
            participant_secret("s3cret", "client-1"),
            "45d313985b09daa0f4f18572b917eab4be0900e6"
        );
    }

    #[test]
    fn the_env_file_round_trips_and_bad_files_are_named() {
        let c = StoreCredential::for_participant("k", "client-7");
        assert_eq!(StoreCredential::parse(&c.to_env_file()).unwrap(), c);
        assert!(StoreCredential::parse("FEDMQ_S3_AKI=x\n")
            .unwrap_err()
            .contains("FEDMQ_S3_SAK"));
        assert!(StoreCredential::parse("PASSWORD=x\n")
            .unwrap_err()
            .contains("PASSWORD"));
        assert!(!format!("{c:?}").contains(&c.secret_key));
    }

    #[test]
    fn a_client_writes_only_its_own_updates_and_reads_only_what_it_needs() {
        let me = "client-1";
        let own = "fedmq/run/r000003/updates/client-1";
        for op in ["PutObject", "CreateMultipartUpload", "UploadPart"] {
            assert!(client_may(me, op, Some(own)), "{op}");
            for other in [
                "fedmq/run/r000003/updates/client-2",
                "fedmq/run/r000003/updates/client-10",
                "fedmq/run/r000003/updates/xclient-1",
                "fedmq/run/r000003/global",
                "fedmq/run/final",
                "fedmq/run/checkpoint/r000003",
                "fedmq/run/rx/updates/client-1",
                "updates/client-1",
                "client-1",
            ] {
                assert!(!client_may(me, op, Some(other)), "{op} {other}");
            }
        }
        for ok in [own, "fedmq/run/r000003/global", "fedmq/run/final"] {
            assert!(client_may(me, "GetObject", Some(ok)), "{ok}");
            assert!(client_may(me, "HeadObject", Some(ok)), "{ok}");
        }
        for no in [
            "fedmq/run/r000003/updates/client-2",
            "fedmq/run/checkpoint/r000003",
            "fedmq/run/r000003/globalx",
        ] {
            assert!(!client_may(me, "GetObject", Some(no)), "{no}");
        }
        assert!(client_may(me, "HeadBucket", None));
        for op in [
            "ListObjectsV2",
            "ListObjects",
            "DeleteObjects",
            "CreateBucket",
            "DeleteBucket",
        ] {
            assert!(!client_may(me, op, None), "{op}");
        }
        for op in ["DeleteObject", "CopyObject", "UploadPartCopy"] {
            assert!(!client_may(me, op, Some(own)), "{op}");
        }
    }

    #[test]
    fn a_client_writes_its_own_share_bundle_and_reads_its_own_inbox() {
        let me = "client-1";
        let own = "fedmq/run/r000003/shares/client-1";
        let inbox = "fedmq/run/r000003/inbox/client-1";
        assert!(client_may(me, "PutObject", Some(own)));
        assert!(client_may(me, "GetObject", Some(inbox)));
        assert!(
            !client_may(me, "PutObject", Some(inbox)),
            "the server writes inboxes"
        );
        // LightSecAgg's aggregate mask share: its own, written by it, read by the server.
        let reveal = "fedmq/run/r000003/reveal/client-1";
        assert!(client_may(me, "PutObject", Some(reveal)));
        assert!(!client_may(me, "GetObject", Some(reveal)));
        for no in [
            "fedmq/run/r000003/reveal/client-2",
            "fedmq/run/r000003/shares/client-2",
            "fedmq/run/r000003/inbox/client-2",
            "fedmq/run/r000003/inbox/client-11",
            "fedmq/run/rx/inbox/client-1",
            "fedmq/run/r000003/inbox/",
            "fedmq/run/r000003/inboxx/client-1",
        ] {
            assert!(!client_may(me, "GetObject", Some(no)), "{no}");
            assert!(!client_may(me, "PutObject", Some(no)), "{no}");
        }
        assert!(
            !client_may(me, "GetObject", Some(own)),
            "bundles are the server's to read"
        );
        let p = iam_policy("fedmq", "fedmq/run-1/", me).to_string();
        assert!(p.contains("fedmq/run-1/r*/shares/client-1"), "{p}");
        assert!(p.contains("fedmq/run-1/r*/inbox/client-1"), "{p}");
        assert!(p.contains("fedmq/run-1/r*/reveal/client-1"), "{p}");
        assert!(!p.contains("shares/*"), "{p}");
    }

    #[test]
    fn policies_name_the_run_and_the_participant() {
        let p = iam_policy("fedmq", "fedmq/run-1/", "client-4").to_string();
        assert!(p.contains("arn:aws:s3:::fedmq/fedmq/run-1/r*/updates/client-4"));
        assert!(p.contains("arn:aws:s3:::fedmq/fedmq/run-1/r*/global"));
        assert!(!p.contains("DeleteObject"));
        let s = iam_policy("fedmq", "fedmq/run-1", "server").to_string();
        assert!(s.contains("arn:aws:s3:::fedmq/fedmq/run-1/*"));
        assert!(s.contains("s3:DeleteObject"));
    }
}
