//! [`ObjectStore`]: the embedded store's S3 backend (s3s's [`S3`] trait over files and memory).
//!
//! Why our own backend and not s3s-fs: s3s-fs maps an object key to a file path, so a key such as
//! `../other-bucket/k` wrote into another bucket, `../../x` beside the store's metadata, and
//! `a//b` or `./c` aliased `a/b` and `c` (issue 18); it also spends most of a request in
//! file-system metadata (three files per object, a blocking-pool round trip per file operation),
//! which made the store the largest cost of a round with 1,000 clients (issue 17).
//!
//! # Model
//! - **Keys are opaque.** An object's file is named by the SHA-256 of its key (plus a version), so
//!   no key names a path, leaves its bucket or aliases another key: `a//b`, `a/b`, `./c` and `c`
//!   are four objects. Keys are 1–1,024 bytes of UTF-8 without NUL.
//! - **An in-memory index** (bucket → sorted key → metadata) answers HEAD, LIST and every
//!   existence check without touching the disk; it is rebuilt from the files at start.
//! - **One file per object version**: the bytes, then a JSON footer (key, size, ETag,
//!   attributes, checksums and a CRC32 of every [`BLOCK`]), its length and a magic. A PUT writes
//!   the file under `tmp/` and renames it into place, then swaps the index entry and removes the
//!   previous version's file; so a crash leaves the old or the new version, never a mix (at start
//!   the newest complete version of a key wins).
//! - **Every read is checked against what was stored**: each block read from disk is compared
//!   with its CRC32, and the file's length with the index; a mismatch is an `InternalError`
//!   naming the object, never silent data.
//! - **A bounded cache** keeps recently written and read objects (up to
//!   [`StoreOptions::cache_bytes`](super::StoreOptions), objects up to a quarter of it and at
//!   most [`CACHE_MAX_OBJECT`]) so that the models a round writes are served to their readers from
//!   memory: a GET that hits takes no file operation at all.
//!
//! Layout under the data directory: `fedmq-store.json` (format marker), `buckets/<bucket>/<sha256
//! of key>.<version>` (objects), `uploads/<upload id>/upload.json` and
//! `<part>.<version>.part` (multipart uploads in progress; they survive a restart), `tmp/`
//! (files being written; emptied at start).
//!
//! ETags: a PUT with `Content-MD5` gets the MD5 (checked); otherwise the ETag is a fresh unique
//! value of 32 hex digits (fedmq never relies on content ETags: integrity is the SHA-256 in every
//! `BlobRef` and the AEAD tags of sealed blobs); a multipart object's ETag is S3's: the MD5 of
//! its parts' ETags and `-N`. `x-amz-checksum-*` values (headers or trailers; CRC32, CRC32C,
//! CRC64NVME, SHA-1, SHA-256) are verified on upload and returned on GET and HEAD; a multipart
//! object reports the composite checksum (`<checksum of the part checksums>-N`) when every part
//! carried one.

use super::error::{Error, Result};
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use s3s::crypto::{Checksum as _, Md5};
use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{IoSlice, Read, Seek, SeekFrom, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Granularity of the stored CRC32s, and size of one read (one HTTP body frame) from disk.
pub const BLOCK: usize = 1 << 20;

/// The largest object the cache holds (and the largest read served in one piece).
pub const CACHE_MAX_OBJECT: usize = 16 << 20;

/// Default size of the object cache.
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;

/// Bytes of a request body gathered before one write to its file.
const WRITE_CHUNK: usize = 1 << 20;

/// Longest object key, as S3.
pub const MAX_KEY_BYTES: usize = 1024;

/// The most keys (and common prefixes) one LIST returns, as S3.
const MAX_LIST: usize = 1000;

/// Smallest part of a multipart upload, except the last (S3's limit).
const MIN_PART: u64 = 5 << 20;

/// Last 8 bytes of every object and part file.
const MAGIC: &[u8; 8] = b"FMQOBJ01";

/// Name of the format marker in the data directory.
const FORMAT_FILE: &str = "fedmq-store.json";

/// Version of the on-disk layout written in [`FORMAT_FILE`].
const FORMAT: u32 = 1;

// ---------------------------------------------------------------------------------------------
// What is stored

/// Standard and user attributes of an object, as given at upload.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Attrs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_disposition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_control: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    website_redirect_location: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metadata: Option<HashMap<String, String>>,
}

impl Attrs {
    #[allow(clippy::too_many_arguments)]
    fn new(
        content_type: Option<String>,
        content_encoding: Option<String>,
        content_disposition: Option<String>,
        content_language: Option<String>,
        cache_control: Option<String>,
        website_redirect_location: Option<String>,
        expires: Option<Timestamp>,
        metadata: Option<Metadata>,
    ) -> Self {
        let expires = expires.and_then(|t| {
            let mut buf = Vec::new();
            t.format(TimestampFormat::DateTime, &mut buf).ok()?;
            String::from_utf8(buf).ok()
        });
        Self {
            content_type,
            content_encoding,
            content_disposition,
            content_language,
            cache_control,
            website_redirect_location,
            expires,
            metadata: metadata.map(|m| m.into_iter().collect()),
        }
    }

    fn expires(&self) -> Option<Timestamp> {
        Timestamp::parse(TimestampFormat::DateTime, self.expires.as_deref()?).ok()
    }

    fn metadata(&self) -> Option<Metadata> {
        self.metadata
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

/// `x-amz-checksum-*` values (base64), as given at upload and verified.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Sums {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc32: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc32c: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc64nvme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
}

impl Sums {
    fn from_checksum(c: Checksum) -> Self {
        Self {
            crc32: c.checksum_crc32,
            crc32c: c.checksum_crc32c,
            crc64nvme: c.checksum_crc64nvme,
            sha1: c.checksum_sha1,
            sha256: c.checksum_sha256,
        }
    }

    /// The checksums a request announces: values in headers, an algorithm, or a trailer.
    fn hasher(
        &self,
        algorithm: Option<&ChecksumAlgorithm>,
        trailer: Option<&str>,
    ) -> S3Result<s3s::checksum::ChecksumHasher> {
        let mut h = s3s::checksum::ChecksumHasher::default();
        let mut want = |name: &str| -> S3Result<()> {
            match name.to_ascii_uppercase().as_str() {
                "CRC32" => h.crc32 = Some(Default::default()),
                "CRC32C" => h.crc32c = Some(Default::default()),
                "CRC64NVME" => h.crc64nvme = Some(Default::default()),
                "SHA1" => h.sha1 = Some(Default::default()),
                "SHA256" => h.sha256 = Some(Default::default()),
                other => {
                    return Err(S3Error::with_message(
                        S3ErrorCode::InvalidArgument,
                        format!("unsupported checksum algorithm {other}"),
                    ))
                }
            }
            Ok(())
        };
        for (set, name) in [
            (self.crc32.is_some(), "CRC32"),
            (self.crc32c.is_some(), "CRC32C"),
            (self.crc64nvme.is_some(), "CRC64NVME"),
            (self.sha1.is_some(), "SHA1"),
            (self.sha256.is_some(), "SHA256"),
        ] {
            if set {
                want(name)?;
            }
        }
        if let Some(a) = algorithm {
            want(a.as_str())?;
        }
        if let Some(t) = trailer {
            for name in t.split(',') {
                let name = name.trim().to_ascii_lowercase();
                if let Some(alg) = name.strip_prefix("x-amz-checksum-") {
                    want(alg)?;
                }
            }
        }
        Ok(h)
    }

    /// Fills values sent as trailers (aws-chunked bodies) into `self`.
    fn add_trailers(&mut self, trailers: Option<s3s::TrailingHeaders>) -> S3Result<()> {
        let Some(map) = trailers.and_then(|t| t.take()) else {
            return Ok(());
        };
        for (name, slot) in [
            ("x-amz-checksum-crc32", &mut self.crc32),
            ("x-amz-checksum-crc32c", &mut self.crc32c),
            ("x-amz-checksum-crc64nvme", &mut self.crc64nvme),
            ("x-amz-checksum-sha1", &mut self.sha1),
            ("x-amz-checksum-sha256", &mut self.sha256),
        ] {
            if let Some(v) = map.get(name) {
                let v = v.to_str().map_err(|_| {
                    S3Error::with_message(S3ErrorCode::InvalidArgument, format!("invalid {name}"))
                })?;
                *slot = Some(v.to_owned());
            }
        }
        Ok(())
    }

    /// `BadDigest` unless every value the client gave equals what we computed.
    fn check(&self, computed: &Sums) -> S3Result<()> {
        for (name, given, got) in [
            ("CRC32", &self.crc32, &computed.crc32),
            ("CRC32C", &self.crc32c, &computed.crc32c),
            ("CRC64NVME", &self.crc64nvme, &computed.crc64nvme),
            ("SHA1", &self.sha1, &computed.sha1),
            ("SHA256", &self.sha256, &computed.sha256),
        ] {
            if let Some(given) = given {
                if got.as_deref() != Some(given.as_str()) {
                    return Err(S3Error::with_message(
                        S3ErrorCode::BadDigest,
                        format!(
                            "the body does not match its x-amz-checksum-{}",
                            name.to_ascii_lowercase()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The footer of an object file: everything the index keeps about one object version.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    key: String,
    version: u64,
    size: u64,
    etag: String,
    modified_ms: u64,
    #[serde(default)]
    attrs: Attrs,
    #[serde(default)]
    sums: Sums,
    /// CRC32 of each [`BLOCK`] of the bytes (the last one may be shorter).
    crcs: Vec<u32>,
}

impl Meta {
    fn modified(&self) -> Timestamp {
        Timestamp::from(UNIX_EPOCH + Duration::from_millis(self.modified_ms))
    }
}

/// The footer of a part file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Part {
    number: i32,
    version: u64,
    size: u64,
    etag: String,
    modified_ms: u64,
    /// CRC32 of the whole part.
    crc: u32,
    #[serde(default)]
    sums: Sums,
}

/// `uploads/<id>/upload.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadInfo {
    bucket: String,
    key: String,
    /// Access key that started it; only it may add parts, complete or abort.
    owner: Option<String>,
    #[serde(default)]
    attrs: Attrs,
    /// Checksum algorithm the parts carry (`CRC32`, ...), when the upload named one.
    #[serde(default)]
    algorithm: Option<String>,
    created_ms: u64,
}

struct Upload {
    info: UploadInfo,
    parts: BTreeMap<i32, Arc<Part>>,
}

struct Bucket {
    created_ms: u64,
    objects: BTreeMap<String, Arc<Meta>>,
}

#[derive(Default)]
struct State {
    buckets: BTreeMap<String, Bucket>,
    uploads: HashMap<String, Upload>,
}

// ---------------------------------------------------------------------------------------------
// The cache

/// Object bytes by version, bounded in bytes, evicted oldest-first with a second chance for
/// entries read since they were last considered (CLOCK).
struct Cache {
    budget: usize,
    max_object: usize,
    bytes: usize,
    map: HashMap<u64, (Bytes, bool)>,
    order: VecDeque<u64>,
}

impl Cache {
    fn new(budget: usize) -> Self {
        Self {
            budget,
            max_object: (budget / 4).min(CACHE_MAX_OBJECT),
            bytes: 0,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&mut self, version: u64) -> Option<Bytes> {
        let (b, used) = self.map.get_mut(&version)?;
        *used = true;
        Some(b.clone())
    }

    fn insert(&mut self, version: u64, bytes: Bytes) {
        if bytes.len() > self.max_object || self.map.contains_key(&version) {
            return;
        }
        self.bytes += bytes.len();
        self.map.insert(version, (bytes, false));
        self.order.push_back(version);
        while self.bytes > self.budget {
            let Some(v) = self.order.pop_front() else {
                break;
            };
            match self.map.get_mut(&v) {
                None => {}
                Some((_, used)) if *used => {
                    *used = false;
                    self.order.push_back(v);
                }
                Some(_) => {
                    if let Some((b, _)) = self.map.remove(&v) {
                        self.bytes -= b.len();
                    }
                }
            }
        }
    }

    fn remove(&mut self, version: u64) {
        if let Some((b, _)) = self.map.remove(&version) {
            self.bytes -= b.len();
        }
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|v| map.contains_key(v));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn err(code: S3ErrorCode, msg: impl Into<String>) -> S3Error {
    S3Error::with_message(code, msg.into())
}

/// S3's bucket naming rules, which also keep a bucket name a plain directory name.
fn check_bucket_name(name: &str) -> S3Result<()> {
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(err(
            S3ErrorCode::InvalidBucketName,
            format!("invalid bucket name {name:?}: 3-63 characters of a-z, 0-9, '.' and '-'"),
        ))
    }
}

/// Keys are opaque: any UTF-8 of 1–1,024 bytes except NUL (which XML listings cannot carry).
fn check_key(key: &str) -> S3Result<()> {
    if key.is_empty() {
        return Err(err(S3ErrorCode::InvalidArgument, "the object key is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(err(
            S3ErrorCode::KeyTooLongError,
            format!(
                "the object key has {} bytes; the limit is {MAX_KEY_BYTES}",
                key.len()
            ),
        ));
    }
    if key.contains('\0') {
        return Err(err(
            S3ErrorCode::InvalidArgument,
            "object keys must not contain NUL",
        ));
    }
    Ok(())
}

/// A fresh ETag: 32 hex digits unique per write (the shape of an MD5; says nothing about the
/// content).
fn new_e_tag(version: u64) -> String {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(rand::random::<u64>);
    format!("{version:016x}{seed:016x}")
}

/// The bytes of a `Content-MD5` header.
fn decode_content_md5(value: &str) -> S3Result<Vec<u8>> {
    base64_simd::STANDARD
        .decode_to_vec(value)
        .map_err(|_| err(S3ErrorCode::InvalidDigest, "Content-MD5 is not base64"))
}

/// Percent-encodes `s` for `encoding-type=url` listings (everything but unreserved and `/`).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn io_error(what: &str, e: impl std::fmt::Display) -> S3Error {
    err(S3ErrorCode::InternalError, format!("{what}: {e}"))
}

/// The result of a blocking task doing store I/O.
fn joined<T>(
    what: &str,
    res: std::result::Result<std::io::Result<T>, tokio::task::JoinError>,
) -> S3Result<T> {
    match res {
        Ok(Ok(v)) => Ok(v),
        // Stored bytes that fail their check: not retryable, so a 4xx code (S3 has none for
        // "damaged"; InvalidObjectState is what it answers for objects it cannot serve).
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            tracing::error!(error = %e, "{what}");
            Err(err(S3ErrorCode::InvalidObjectState, format!("{what}: {e}")))
        }
        Ok(Err(e)) => Err(io_error(what, e)),
        Err(e) => Err(io_error(what, e)),
    }
}

// ---------------------------------------------------------------------------------------------
// Files

/// CRC32s of consecutive [`BLOCK`]s of a byte stream.
#[derive(Default)]
struct BlockCrcs {
    done: Vec<u32>,
    cur: crc32fast::Hasher,
    cur_len: usize,
}

impl BlockCrcs {
    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = (BLOCK - self.cur_len).min(data.len());
            self.cur.update(&data[..take]);
            self.cur_len += take;
            data = &data[take..];
            if self.cur_len == BLOCK {
                self.done.push(std::mem::take(&mut self.cur).finalize());
                self.cur_len = 0;
            }
        }
    }

    fn finish(mut self) -> Vec<u32> {
        if self.cur_len > 0 {
            self.done.push(self.cur.finalize());
        }
        self.done
    }
}

/// A file being written: removed on drop unless [`finish`](Self::finish)ed. Object and part
/// files are created at their final name (unique per version; until its footer is written a
/// file is not an object, and `load` removes such leftovers); copies and multipart
/// completions write under `tmp/` and are renamed into place.
struct TmpFile {
    path: Option<PathBuf>,
    file: std::fs::File,
}

impl TmpFile {
    fn create(tmp_dir: &Path) -> std::io::Result<Self> {
        loop {
            let path = tmp_dir.join(format!("{:016x}", rand::random::<u64>()));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(Self {
                        path: Some(path),
                        file,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates `path`, which must not exist.
    fn create_at(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            file,
        })
    }

    fn write_chunks(&mut self, chunks: &[Bytes]) -> std::io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.file.write_vectored(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Appends the footer (`json`, its length, [`MAGIC`]) and renames the file to `dest`
    /// (unless it is already there).
    fn finish(mut self, json: &[u8], dest: &Path) -> std::io::Result<u64> {
        let len = u32::try_from(json.len()).map_err(std::io::Error::other)?;
        self.file.write_all(json)?;
        self.file.write_all(&len.to_le_bytes())?;
        self.file.write_all(MAGIC)?;
        let total = self.file.stream_position()?;
        let path = self.path.take().expect("not yet renamed");
        if path == dest {
            return Ok(total);
        }
        if let Err(e) = std::fs::rename(&path, dest) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(total)
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Reads the footer of an object or part file: its JSON and the length of the data before it.
fn read_footer<T: for<'de> Deserialize<'de>>(
    file: &mut std::fs::File,
) -> std::io::Result<(T, u64)> {
    let data_len = data_len(file)?;
    let json_len = file.metadata()?.len() - 12 - data_len;
    let mut json = vec![0u8; json_len as usize];
    file.seek(SeekFrom::Start(data_len))?;
    file.read_exact(&mut json)?;
    let meta = serde_json::from_slice(&json).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad footer: {e}"))
    })?;
    Ok((meta, data_len))
}

/// The length of the data before the footer of an object or part file (the footer is not
/// parsed).
fn data_len(file: &mut std::fs::File) -> std::io::Result<u64> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let len = file.metadata()?.len();
    if len < 12 {
        return Err(bad("too short for a footer"));
    }
    let mut tail = [0u8; 12];
    file.seek(SeekFrom::Start(len - 12))?;
    file.read_exact(&mut tail)?;
    if &tail[4..] != MAGIC {
        return Err(bad("no fedmq footer"));
    }
    let json_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    len.checked_sub(12 + json_len)
        .ok_or_else(|| bad("footer longer than the file"))
}

/// Reads bytes `start..end` of `meta`'s object from `file`, checking every block it touches
/// against its CRC32 and the data length against the index.
fn read_checked(
    file: &mut std::fs::File,
    meta: &Meta,
    bucket: &str,
    start: u64,
    end: u64,
) -> std::io::Result<Bytes> {
    let corrupt = |what: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "object {:?} in bucket {bucket:?} changed on disk ({what}); it cannot be served",
                meta.key
            ),
        )
    };
    let data_len = data_len(file).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => corrupt(e.to_string()),
        _ => e,
    })?;
    if data_len != meta.size {
        return Err(corrupt(format!(
            "{data_len} bytes stored, {} expected",
            meta.size
        )));
    }
    if start >= end {
        return Ok(Bytes::new());
    }
    let block = BLOCK as u64;
    let first = start / block;
    let from = first * block;
    let to = end.div_ceil(block).saturating_mul(block).min(meta.size);
    let mut buf = vec![0u8; (to - from) as usize];
    file.seek(SeekFrom::Start(from))?;
    file.read_exact(&mut buf)?;
    for (i, chunk) in buf.chunks(BLOCK).enumerate() {
        let b = first as usize + i;
        if meta.crcs.get(b) != Some(&crc32fast::hash(chunk)) {
            return Err(corrupt(format!("block {b} fails its CRC32")));
        }
    }
    Ok(Bytes::from(buf).slice((start - from) as usize..(end - from) as usize))
}

// ---------------------------------------------------------------------------------------------
// Receiving bodies

/// A request body received into a temporary file (all but its last, under [`WRITE_CHUNK`],
/// bytes, which go with the footer), with what was computed over it.
struct Received {
    file: Option<TmpFile>,
    tail: Vec<Bytes>,
    size: u64,
    crcs: Vec<u32>,
    crc: u32,
    md5: Option<[u8; 16]>,
    sums: Sums,
    /// The whole body, when it is small enough to cache.
    whole: Option<Bytes>,
}

impl Received {
    /// Writes the rest and the footer of the file at `dest` (blocking).
    fn finish(self, json: &[u8], dest: &Path) -> std::io::Result<u64> {
        let mut file = match self.file {
            Some(f) => f,
            None => TmpFile::create_at(dest)?,
        };
        file.write_chunks(&self.tail)?;
        file.finish(json, dest)
    }
}

/// Receives `body` into a new file at `at` in [`WRITE_CHUNK`] writes on the blocking pool
/// (one in flight while the next chunk arrives), computing block CRCs, the MD5 when `md5`, and
/// the checksums `hasher` was asked for. Keeps the whole body in memory when it is at most
/// `keep` bytes. A body cut short or longer than `expected` is an error.
async fn receive(
    at: &Path,
    mut body: StreamingBlob,
    expected: Option<u64>,
    md5: bool,
    mut hasher: s3s::checksum::ChecksumHasher,
    keep: usize,
) -> S3Result<Received> {
    let mut md5 = md5.then(Md5::new);
    let mut crcs = BlockCrcs::default();
    let mut whole_crc = crc32fast::Hasher::new();
    let mut writing: Option<tokio::task::JoinHandle<std::io::Result<TmpFile>>> = None;
    let mut kept: Option<BytesMut> = expected
        .filter(|&n| n as usize <= keep)
        .map(|n| BytesMut::with_capacity(n as usize));
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len = 0usize;
    let mut total = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            err(
                S3ErrorCode::IncompleteBody,
                format!("reading the request body: {e}"),
            )
        })?;
        if chunk.is_empty() {
            continue;
        }
        total += chunk.len() as u64;
        if expected.is_some_and(|n| total > n) {
            return Err(err(
                S3ErrorCode::InvalidRequest,
                "the request body is longer than its Content-Length",
            ));
        }
        crcs.update(&chunk);
        whole_crc.update(&chunk);
        hasher.update(&chunk);
        if let Some(h) = &mut md5 {
            h.update(&chunk);
        }
        if let Some(k) = &mut kept {
            if k.len() + chunk.len() <= keep {
                k.extend_from_slice(&chunk);
            } else {
                kept = None;
            }
        }
        batch_len += chunk.len();
        batch.push(chunk);
        if batch_len >= WRITE_CHUNK {
            let prev = match writing.take() {
                Some(w) => Some(joined("writing to the store", w.await)?),
                None => None,
            };
            let chunks = std::mem::take(&mut batch);
            batch_len = 0;
            let at = at.to_path_buf();
            writing = Some(tokio::task::spawn_blocking(move || {
                let mut file = match prev {
                    Some(f) => f,
                    None => TmpFile::create_at(&at)?,
                };
                file.write_chunks(&chunks)?;
                Ok(file)
            }));
        }
    }
    let file = match writing {
        Some(w) => Some(joined("writing to the store", w.await)?),
        None => None,
    };
    if let Some(n) = expected.filter(|&n| n != total) {
        return Err(err(
            S3ErrorCode::IncompleteBody,
            format!("the request body has {total} bytes, its Content-Length says {n}"),
        ));
    }
    Ok(Received {
        file,
        tail: batch,
        size: total,
        crcs: crcs.finish(),
        crc: whole_crc.finalize(),
        md5: md5.map(Md5::finalize),
        sums: Sums::from_checksum(hasher.finalize()),
        whole: kept.map(BytesMut::freeze),
    })
}

/// The length a request body announces.
fn expected_len(content_length: Option<i64>, body: &StreamingBlob) -> Option<u64> {
    use s3s::stream::ByteStream as _;
    match content_length {
        Some(n) => u64::try_from(n).ok(),
        None => body.remaining_length().exact().map(|n| n as u64),
    }
}

/// The ETag of a received body: its MD5 when the client sent a `Content-MD5` (checked), else a
/// fresh one.
fn checked_e_tag(received: &Received, content_md5: Option<&str>, version: u64) -> S3Result<String> {
    match (received.md5, content_md5) {
        (Some(md5), Some(given)) => {
            if decode_content_md5(given)? != md5 {
                return Err(err(
                    S3ErrorCode::BadDigest,
                    "the body does not match its Content-MD5",
                ));
            }
            Ok(hex::encode(md5))
        }
        _ => Ok(new_e_tag(version)),
    }
}

// ---------------------------------------------------------------------------------------------
// The store

/// The embedded store's backend; see the module docs.
pub struct ObjectStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStore")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

struct Inner {
    root: PathBuf,
    state: RwLock<State>,
    cache: Mutex<Cache>,
    next_version: AtomicU64,
}

/// What a PUT, a copy or a multipart completion hands to [`ObjectStore::commit`].
struct NewObject {
    bucket: String,
    meta: Meta,
    whole: Option<Bytes>,
    if_none_match: Option<ETagCondition>,
    if_match: Option<ETagCondition>,
}

impl ObjectStore {
    /// Opens (creating when missing) the store under `root`, loading its index; `cache_bytes`
    /// bounds the object cache (0 turns it off).
    ///
    /// # Errors
    /// [`Error::Io`] naming the path that cannot be read or written; [`Error::Server`] when the
    /// directory holds data of another layout (an older fedmq wrote it with s3s-fs).
    pub fn open(root: impl AsRef<Path>, cache_bytes: usize) -> Result<Self> {
        let root = root.as_ref();
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { op, path, source }
        };
        std::fs::create_dir_all(root).map_err(io("creating data directory", root))?;
        let root = root
            .canonicalize()
            .map_err(io("resolving data directory", root))?;
        let marker = root.join(FORMAT_FILE);
        if !marker.exists() {
            let foreign: Vec<String> = std::fs::read_dir(&root)
                .map_err(io("listing data directory", &root))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .take(3)
                .collect();
            if !foreign.is_empty() {
                return Err(Error::Server {
                    reason: format!(
                        "the store's data directory {} holds files of another layout ({}, ...), \
                         probably from an older fedmq; move them away or choose another data \
                         directory",
                        root.display(),
                        foreign.join(", ")
                    ),
                });
            }
            std::fs::write(&marker, format!("{{\"format\": {FORMAT}}}\n"))
                .map_err(io("writing", &marker))?;
        } else {
            let text = std::fs::read_to_string(&marker).map_err(io("reading", &marker))?;
            let format = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("format")?.as_u64());
            if format != Some(u64::from(FORMAT)) {
                return Err(Error::Server {
                    reason: format!(
                        "{} says format {format:?}; this fedmq reads format {FORMAT}",
                        marker.display()
                    ),
                });
            }
        }
        for dir in ["buckets", "uploads", "tmp"] {
            let p = root.join(dir);
            std::fs::create_dir_all(&p).map_err(io("creating", &p))?;
        }
        let tmp = root.join("tmp");
        for e in std::fs::read_dir(&tmp)
            .map_err(io("listing", &tmp))?
            .flatten()
        {
            let _ = std::fs::remove_file(e.path());
        }
        let mut max_version = 0u64;
        let state = load(&root, &mut max_version).map_err(|(path, source)| Error::Io {
            op: "loading the store index",
            path,
            source,
        })?;
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                state: RwLock::new(state),
                cache: Mutex::new(Cache::new(cache_bytes)),
                next_version: AtomicU64::new(max_version.saturating_add(1).max(now_ns)),
            }),
        })
    }

    /// Number of objects in all buckets (for logs).
    #[must_use]
    pub fn object_count(&self) -> usize {
        self.state().buckets.values().map(|b| b.objects.len()).sum()
    }

    /// The file that holds the current version of `key` in `bucket`, if any (for tests that
    /// damage it on purpose).
    #[must_use]
    pub fn object_file(&self, bucket: &str, key: &str) -> Option<PathBuf> {
        let st = self.state();
        let meta = st.buckets.get(bucket)?.objects.get(key)?;
        Some(self.inner.object_path(bucket, key, meta.version))
    }

    /// Drops every cached object (for tests that read from disk).
    pub fn clear_cache(&self) {
        let mut c = self.cache();
        let budget = c.budget;
        *c = Cache::new(budget);
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn version(&self) -> u64 {
        self.inner.next_version.fetch_add(1, Ordering::Relaxed)
    }

    fn cache_keep(&self) -> usize {
        self.cache().max_object
    }

    /// The current metadata of `key`, or `NoSuchBucket` / `NoSuchKey`.
    fn lookup(&self, bucket: &str, key: &str) -> S3Result<Arc<Meta>> {
        let st = self.state();
        let b = st
            .buckets
            .get(bucket)
            .ok_or_else(|| err(S3ErrorCode::NoSuchBucket, format!("no bucket {bucket:?}")))?;
        b.objects.get(key).cloned().ok_or_else(|| {
            err(
                S3ErrorCode::NoSuchKey,
                format!("no object {key:?} in {bucket:?}"),
            )
        })
    }

    fn require_bucket(&self, bucket: &str) -> S3Result<()> {
        if self.state().buckets.contains_key(bucket) {
            Ok(())
        } else {
            Err(err(
                S3ErrorCode::NoSuchBucket,
                format!("no bucket {bucket:?}"),
            ))
        }
    }

    /// The bytes `start..end` of `meta`'s object: from the cache, else read (and checked) from
    /// disk, caching the whole object when it is small enough.
    async fn read(&self, bucket: &str, meta: &Arc<Meta>, start: u64, end: u64) -> S3Result<Bytes> {
        if let Some(b) = self.cache().get(meta.version) {
            return Ok(b.slice(start as usize..end as usize));
        }
        let whole = meta.size as usize <= self.cache_keep();
        let (from, to) = if whole { (0, meta.size) } else { (start, end) };
        let path = self.inner.object_path(bucket, &meta.key, meta.version);
        let (m, b) = (Arc::clone(meta), bucket.to_owned());
        let bytes = joined(
            "reading from the store",
            tokio::task::spawn_blocking(move || {
                let mut f = std::fs::File::open(&path)?;
                read_checked(&mut f, &m, &b, from, to)
            })
            .await,
        )
        .map_err(|e| gone_if_missing(e, bucket, &meta.key))?;
        if whole {
            self.cache().insert(meta.version, bytes.clone());
            Ok(bytes.slice(start as usize..end as usize))
        } else {
            Ok(bytes)
        }
    }

    /// Puts `new` into the index (checking the conditions again under the lock), replacing and
    /// then removing the previous version. Its file is already in place.
    async fn commit(&self, new: NewObject) -> S3Result<()> {
        let NewObject {
            bucket,
            meta,
            whole,
            if_none_match,
            if_match,
        } = new;
        let version = meta.version;
        let key = meta.key.clone();
        let outcome = {
            let mut st = self.state_mut();
            match st.buckets.get_mut(&bucket) {
                None => Err(err(
                    S3ErrorCode::NoSuchBucket,
                    format!("no bucket {bucket:?}"),
                )),
                Some(b) => {
                    let current = b.objects.get(&key);
                    match check_conditions(
                        current.map(|m| m.etag.as_str()),
                        if_none_match.as_ref(),
                        if_match.as_ref(),
                    ) {
                        Err(e) => Err(e),
                        // A newer version was committed while ours was written: ours is
                        // superseded at once (last writer by version wins, as at start).
                        Ok(()) if current.is_some_and(|m| m.version > version) => Ok(Some(version)),
                        Ok(()) => Ok(b
                            .objects
                            .insert(key.clone(), Arc::new(meta))
                            .map(|old| old.version)),
                    }
                }
            }
        };
        let drop_version = match outcome {
            Ok(v) => v,
            Err(e) => {
                self.remove_file(&bucket, &key, version).await;
                return Err(e);
            }
        };
        {
            let mut c = self.cache();
            if drop_version != Some(version) {
                if let Some(w) = whole {
                    c.insert(version, w);
                }
            }
            if let Some(v) = drop_version {
                c.remove(v);
            }
        }
        if let Some(v) = drop_version {
            self.remove_file(&bucket, &key, v).await;
        }
        Ok(())
    }

    async fn remove_file(&self, bucket: &str, key: &str, version: u64) {
        let path = self.inner.object_path(bucket, key, version);
        let res = tokio::task::spawn_blocking(move || std::fs::remove_file(&path)).await;
        if let Ok(Err(e)) = res {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(bucket, key, error = %e, "cannot remove an old object version");
            }
        }
    }

    /// Removes `key`'s current version: its file first (so a crash cannot bring it back), then
    /// its index entry. False when there was none.
    async fn delete(&self, bucket: &str, key: &str) -> S3Result<bool> {
        let meta = match self.lookup(bucket, key) {
            Ok(m) => m,
            Err(e) if e.code() == &S3ErrorCode::NoSuchKey => return Ok(false),
            Err(e) => return Err(e),
        };
        let path = self.inner.object_path(bucket, key, meta.version);
        let res = tokio::task::spawn_blocking(move || std::fs::remove_file(&path)).await;
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => return joined("deleting from the store", other).map(|()| false),
        }
        let mut st = self.state_mut();
        if let Some(b) = st.buckets.get_mut(bucket) {
            if b.objects
                .get(key)
                .is_some_and(|m| m.version == meta.version)
            {
                b.objects.remove(key);
            }
        }
        drop(st);
        self.cache().remove(meta.version);
        Ok(true)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.inner.root.join("tmp")
    }

    /// Object listing shared by ListObjects and ListObjectsV2: up to `max` objects and common
    /// prefixes after `after` (exclusive), and whether more follow.
    fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<&str>,
        max: usize,
    ) -> S3Result<Listing> {
        let st = self.state();
        let b = st
            .buckets
            .get(bucket)
            .ok_or_else(|| err(S3ErrorCode::NoSuchBucket, format!("no bucket {bucket:?}")))?;
        let delimiter = delimiter.filter(|d| !d.is_empty());
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let mut out = Listing::default();
        // A common prefix equal to `after` was returned on the previous page.
        let mut last_prefix: Option<String> = after.map(str::to_owned);
        for (k, m) in b.objects.range::<str, _>((start, Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            let common = delimiter.and_then(|d| {
                k[prefix.len()..]
                    .find(d)
                    .map(|i| k[..prefix.len() + i + d.len()].to_owned())
            });
            if let Some(cp) = common {
                if last_prefix.as_deref() == Some(cp.as_str()) {
                    continue;
                }
                if out.objects.len() + out.prefixes.len() >= max {
                    out.truncated = true;
                    break;
                }
                last_prefix = Some(cp.clone());
                out.last = Some(cp.clone());
                out.prefixes.push(cp);
            } else {
                if out.objects.len() + out.prefixes.len() >= max {
                    out.truncated = true;
                    break;
                }
                out.last = Some(k.clone());
                out.objects.push(Arc::clone(m));
            }
        }
        Ok(out)
    }
}

fn gone_if_missing(e: S3Error, bucket: &str, key: &str) -> S3Error {
    if e.message().is_some_and(|m| m.contains("No such file")) {
        err(
            S3ErrorCode::NoSuchKey,
            format!("no object {key:?} in {bucket:?}"),
        )
    } else {
        e
    }
}

/// `PreconditionFailed` unless the conditions of a write hold for the current ETag.
fn check_conditions(
    current: Option<&str>,
    if_none_match: Option<&ETagCondition>,
    if_match: Option<&ETagCondition>,
) -> S3Result<()> {
    if let Some(c) = if_none_match {
        let hit = match c {
            ETagCondition::Any => current.is_some(),
            ETagCondition::ETag(t) => current == Some(t.value()),
        };
        if hit {
            return Err(err(
                S3ErrorCode::PreconditionFailed,
                "the object exists (If-None-Match)",
            ));
        }
    }
    if let Some(c) = if_match {
        let hit = match c {
            ETagCondition::Any => current.is_some(),
            ETagCondition::ETag(t) => current == Some(t.value()),
        };
        if !hit {
            return Err(err(
                S3ErrorCode::PreconditionFailed,
                "the object's ETag does not match (If-Match)",
            ));
        }
    }
    Ok(())
}

#[derive(Default)]
struct Listing {
    objects: Vec<Arc<Meta>>,
    prefixes: Vec<String>,
    truncated: bool,
    /// The last key or common prefix returned.
    last: Option<String>,
}

impl Listing {
    fn contents(&self, url: bool) -> (Option<Vec<Object>>, Option<Vec<CommonPrefix>>) {
        let enc = |s: &str| if url { url_encode(s) } else { s.to_owned() };
        let objects = self
            .objects
            .iter()
            .map(|m| Object {
                key: Some(enc(&m.key)),
                size: Some(m.size as i64),
                e_tag: Some(ETag::Strong(m.etag.clone())),
                last_modified: Some(m.modified()),
                storage_class: Some(ObjectStorageClass::from_static(
                    ObjectStorageClass::STANDARD,
                )),
                ..Default::default()
            })
            .collect();
        let prefixes = self
            .prefixes
            .iter()
            .map(|p| CommonPrefix {
                prefix: Some(enc(p)),
            })
            .collect();
        (Some(objects), Some(prefixes))
    }
}

impl Inner {
    fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join("buckets").join(bucket)
    }

    fn object_path(&self, bucket: &str, key: &str, version: u64) -> PathBuf {
        self.bucket_dir(bucket).join(object_file_name(key, version))
    }

    fn upload_dir(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(id)
    }
}

fn object_file_name(key: &str, version: u64) -> String {
    format!(
        "{}.{version:016x}",
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    )
}

/// `<64 hex>.<16 hex>`, as [`object_file_name`] writes.
fn is_object_file_name(name: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| c.is_ascii_hexdigit());
    name.split_once('.')
        .is_some_and(|(h, v)| hex(h, 64) && hex(v, 16))
}

fn part_file_name(number: i32, version: u64) -> String {
    format!("{number:05}.{version:016x}.part")
}

/// Rebuilds the index from the files under `root` (blocking), keeping the newest version of
/// each key and removing older ones.
fn load(
    root: &Path,
    max_version: &mut u64,
) -> std::result::Result<State, (PathBuf, std::io::Error)> {
    let mut state = State::default();
    let buckets_dir = root.join("buckets");
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    for entry in std::fs::read_dir(&buckets_dir).map_err(at(&buckets_dir))? {
        let entry = entry.map_err(at(&buckets_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        if check_bucket_name(&name).is_err() || !dir.is_dir() {
            tracing::warn!(path = %dir.display(), "not a bucket directory; ignored");
            continue;
        }
        let md = entry.metadata().map_err(at(&dir))?;
        let created = md
            .created()
            .or_else(|_| md.modified())
            .unwrap_or(UNIX_EPOCH);
        let mut bucket = Bucket {
            created_ms: created
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            objects: BTreeMap::new(),
        };
        for f in std::fs::read_dir(&dir).map_err(at(&dir))? {
            let f = f.map_err(at(&dir))?;
            let path = f.path();
            let meta =
                std::fs::File::open(&path).and_then(|mut file| read_footer::<Meta>(&mut file));
            let meta = match meta {
                Ok((m, data_len))
                    if data_len == m.size
                        && f.file_name().to_str()
                            == Some(object_file_name(&m.key, m.version).as_str()) =>
                {
                    m
                }
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "object file does not match its footer; ignored");
                    continue;
                }
                // Our name without a complete footer: a write the store did not finish.
                Err(e)
                    if e.kind() == std::io::ErrorKind::InvalidData
                        && is_object_file_name(&f.file_name().to_string_lossy()) =>
                {
                    tracing::info!(path = %path.display(), "removing an unfinished object write");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "not a readable object file; ignored");
                    continue;
                }
            };
            *max_version = (*max_version).max(meta.version);
            let older = match bucket.objects.get(&meta.key) {
                Some(cur) if cur.version > meta.version => Some(meta.version),
                Some(cur) => Some(cur.version),
                None => None,
            };
            if let Some(v) = older {
                let _ = std::fs::remove_file(dir.join(object_file_name(&meta.key, v)));
                if v == meta.version {
                    continue;
                }
            }
            bucket.objects.insert(meta.key.clone(), Arc::new(meta));
        }
        state.buckets.insert(name, bucket);
    }
    let uploads_dir = root.join("uploads");
    for entry in std::fs::read_dir(&uploads_dir).map_err(at(&uploads_dir))? {
        let entry = entry.map_err(at(&uploads_dir))?;
        let id = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        let info: Option<UploadInfo> = std::fs::read(dir.join("upload.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let Some(info) = info else {
            tracing::warn!(path = %dir.display(), "unreadable multipart upload; removed");
            let _ = std::fs::remove_dir_all(&dir);
            continue;
        };
        let mut parts: BTreeMap<i32, Arc<Part>> = BTreeMap::new();
        for f in std::fs::read_dir(&dir).map_err(at(&dir))?.flatten() {
            let path = f.path();
            if path.extension().and_then(|e| e.to_str()) != Some("part") {
                continue;
            }
            match std::fs::File::open(&path).and_then(|mut file| read_footer::<Part>(&mut file)) {
                Ok((p, len)) if len == p.size => {
                    *max_version = (*max_version).max(p.version);
                    let replaced = match parts.get(&p.number) {
                        Some(cur) if cur.version > p.version => {
                            let _ = std::fs::remove_file(&path);
                            continue;
                        }
                        Some(cur) => Some(cur.version),
                        None => None,
                    };
                    if let Some(v) = replaced {
                        let _ = std::fs::remove_file(dir.join(part_file_name(p.number, v)));
                    }
                    parts.insert(p.number, Arc::new(p));
                }
                _ => {
                    tracing::warn!(path = %path.display(), "unreadable part file; removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        state.uploads.insert(id, Upload { info, parts });
    }
    Ok(state)
}

// ---------------------------------------------------------------------------------------------
// Streaming large reads

/// Reads `start..end` of an object in [`BLOCK`]s on the blocking pool, each checked.
fn block_stream(
    path: PathBuf,
    meta: Arc<Meta>,
    bucket: String,
    start: u64,
    end: u64,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static {
    struct St {
        file: Option<std::fs::File>,
        path: PathBuf,
        meta: Arc<Meta>,
        bucket: String,
        pos: u64,
        end: u64,
        failed: bool,
    }
    let st = St {
        file: None,
        path,
        meta,
        bucket,
        pos: start,
        end,
        failed: false,
    };
    futures::stream::unfold(st, |mut st| async move {
        if st.pos >= st.end || st.failed {
            return None;
        }
        let block = BLOCK as u64;
        let to = ((st.pos / block + 1) * block).min(st.end);
        let (file, path, meta, bucket, from) = (
            st.file.take(),
            st.path.clone(),
            Arc::clone(&st.meta),
            st.bucket.clone(),
            st.pos,
        );
        let res = tokio::task::spawn_blocking(move || {
            let mut f = match file {
                Some(f) => f,
                None => std::fs::File::open(&path)?,
            };
            let b = read_checked(&mut f, &meta, &bucket, from, to)?;
            Ok::<_, std::io::Error>((f, b))
        })
        .await;
        match res {
            Ok(Ok((f, b))) => {
                st.file = Some(f);
                st.pos = to;
                Some((Ok(b), st))
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading an object failed mid-body");
                st.failed = true;
                Some((Err(e), st))
            }
            Err(e) => {
                st.failed = true;
                Some((Err(std::io::Error::other(e)), st))
            }
        }
    })
}

/// The attributes of an upload request (`PutObject`, `CreateMultipartUpload`, `CopyObject`
/// with `REPLACE`): the same field names in each input type.
macro_rules! attrs_of {
    ($i:expr) => {
        Attrs::new(
            $i.content_type,
            $i.content_encoding,
            $i.content_disposition,
            $i.content_language,
            $i.cache_control,
            $i.website_redirect_location,
            $i.expires,
            $i.metadata,
        )
    };
}

/// The `x-amz-checksum-*` values of an upload request (`PutObject`, `UploadPart`).
macro_rules! sums_of {
    ($i:expr) => {
        Sums {
            crc32: $i.checksum_crc32,
            crc32c: $i.checksum_crc32c,
            crc64nvme: $i.checksum_crc64nvme,
            sha1: $i.checksum_sha1,
            sha256: $i.checksum_sha256,
        }
    };
}

/// A `GetObject` or `HeadObject` output with the object's stored headers (ETag, attributes,
/// checksums `$sums`) and the given fields.
macro_rules! object_headers {
    ($ty:ident, $meta:expr, $sums:expr, { $($field:ident $(: $value:expr)?),* $(,)? }) => {
        $ty {
            $($field $(: $value)?,)*
            accept_ranges: Some("bytes".into()),
            last_modified: Some($meta.modified()),
            e_tag: Some(ETag::Strong($meta.etag.clone())),
            metadata: $meta.attrs.metadata(),
            content_type: $meta.attrs.content_type.clone(),
            content_encoding: $meta.attrs.content_encoding.clone(),
            content_disposition: $meta.attrs.content_disposition.clone(),
            content_language: $meta.attrs.content_language.clone(),
            cache_control: $meta.attrs.cache_control.clone(),
            website_redirect_location: $meta.attrs.website_redirect_location.clone(),
            expires: $meta.attrs.expires(),
            checksum_crc32: $sums.crc32,
            checksum_crc32c: $sums.crc32c,
            checksum_crc64nvme: $sums.crc64nvme,
            checksum_sha1: $sums.sha1,
            checksum_sha256: $sums.sha256,
            ..Default::default()
        }
    };
}

/// The checksum trailers an aws-chunked request announces (`x-amz-trailer`).
fn trailer_names<T>(req: &S3Request<T>) -> Option<String> {
    req.headers
        .get("x-amz-trailer")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

// ---------------------------------------------------------------------------------------------
// S3 operations

#[async_trait::async_trait]
impl S3 for ObjectStore {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let bucket = req.input.bucket;
        check_bucket_name(&bucket)?;
        if self.state().buckets.contains_key(&bucket) {
            return Err(err(
                S3ErrorCode::BucketAlreadyOwnedByYou,
                format!("bucket {bucket:?} exists"),
            ));
        }
        let dir = self.inner.bucket_dir(&bucket);
        joined(
            "creating a bucket",
            tokio::task::spawn_blocking(move || std::fs::create_dir_all(dir)).await,
        )?;
        let mut st = self.state_mut();
        if st.buckets.contains_key(&bucket) {
            return Err(err(
                S3ErrorCode::BucketAlreadyOwnedByYou,
                format!("bucket {bucket:?} exists"),
            ));
        }
        st.buckets.insert(
            bucket,
            Bucket {
                created_ms: now_ms(),
                objects: BTreeMap::new(),
            },
        );
        Ok(S3Response::new(CreateBucketOutput::default()))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let bucket = req.input.bucket;
        {
            let mut st = self.state_mut();
            match st.buckets.get(&bucket) {
                None => {
                    return Err(err(
                        S3ErrorCode::NoSuchBucket,
                        format!("no bucket {bucket:?}"),
                    ))
                }
                Some(b) if !b.objects.is_empty() => {
                    return Err(err(
                        S3ErrorCode::BucketNotEmpty,
                        format!("bucket {bucket:?} is not empty"),
                    ))
                }
                Some(_) => {}
            }
            st.buckets.remove(&bucket);
        }
        let dir = self.inner.bucket_dir(&bucket);
        joined(
            "deleting a bucket",
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await,
        )?;
        Ok(S3Response::new(DeleteBucketOutput::default()))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.require_bucket(&req.input.bucket)?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.require_bucket(&req.input.bucket)?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn list_buckets(
        &self,
        _req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let buckets = self
            .state()
            .buckets
            .iter()
            .map(|(name, b)| s3s::dto::Bucket {
                name: Some(name.clone()),
                creation_date: Some(Timestamp::from(
                    UNIX_EPOCH + Duration::from_millis(b.created_ms),
                )),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            ..Default::default()
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let trailer = trailer_names(&req);
        let trailers = req.trailing_headers;
        let i = req.input;
        check_key(&i.key)?;
        self.require_bucket(&i.bucket)?;
        if let Some(sc) = &i.storage_class {
            if !["STANDARD", "REDUCED_REDUNDANCY"].contains(&sc.as_str()) {
                return Err(err(
                    S3ErrorCode::InvalidStorageClass,
                    format!("storage class {} is not offered", sc.as_str()),
                ));
            }
        }
        {
            let st = self.state();
            let current = st
                .buckets
                .get(&i.bucket)
                .and_then(|b| b.objects.get(&i.key));
            check_conditions(
                current.map(|m| m.etag.as_str()),
                i.if_none_match.as_ref(),
                i.if_match.as_ref(),
            )?;
        }
        let Some(body) = i.body else {
            return Err(err(S3ErrorCode::IncompleteBody, "the request has no body"));
        };
        let mut given = sums_of!(i);
        let hasher = given.hasher(i.checksum_algorithm.as_ref(), trailer.as_deref())?;
        let expected = expected_len(i.content_length, &body);
        let version = self.version();
        let dest = self.inner.object_path(&i.bucket, &i.key, version);
        let received = receive(
            &dest,
            body,
            expected,
            i.content_md5.is_some(),
            hasher,
            self.cache_keep(),
        )
        .await?;
        given.add_trailers(trailers)?;
        given.check(&received.sums)?;
        let etag = checked_e_tag(&received, i.content_md5.as_deref(), version)?;
        let meta = Meta {
            key: i.key,
            version,
            size: received.size,
            etag: etag.clone(),
            modified_ms: now_ms(),
            attrs: attrs_of!(i),
            sums: received.sums.clone(),
            crcs: received.crcs.clone(),
        };
        let json = serde_json::to_vec(&meta).map_err(|e| io_error("encoding metadata", e))?;
        let sums = meta.sums.clone();
        let whole = received.whole.clone();
        joined(
            "writing to the store",
            tokio::task::spawn_blocking(move || received.finish(&json, &dest)).await,
        )?;
        self.commit(NewObject {
            bucket: i.bucket,
            meta,
            whole,
            if_none_match: i.if_none_match,
            if_match: i.if_match,
        })
        .await?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(etag)),
            checksum_crc32: sums.crc32,
            checksum_crc32c: sums.crc32c,
            checksum_crc64nvme: sums.crc64nvme,
            checksum_sha1: sums.sha1,
            checksum_sha256: sums.sha256,
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let i = req.input;
        let meta = self.lookup(&i.bucket, &i.key)?;
        check_read_conditions(&meta, i.if_match.as_ref(), i.if_none_match.as_ref())?;
        let (range, content_range) = match &i.range {
            None => (0..meta.size, None),
            Some(r) => {
                let range = r.check(meta.size)?;
                let cr = format!("bytes {}-{}/{}", range.start, range.end - 1, meta.size);
                (range, Some(cr))
            }
        };
        let len = range.end - range.start;
        let cached = self.cache().get(meta.version);
        let body = if let Some(b) = cached {
            StreamingBlob::from(s3s::Body::from(
                b.slice(range.start as usize..range.end as usize),
            ))
        } else if len as usize <= CACHE_MAX_OBJECT || meta.size as usize <= self.cache_keep() {
            let bytes = self.read(&i.bucket, &meta, range.start, range.end).await?;
            StreamingBlob::from(s3s::Body::from(bytes))
        } else {
            let path = self.inner.object_path(&i.bucket, &meta.key, meta.version);
            // Fail before the headers go out if the file is gone or damaged at its start.
            let (p, m, b) = (path.clone(), Arc::clone(&meta), i.bucket.clone());
            joined(
                "reading from the store",
                tokio::task::spawn_blocking(move || {
                    let mut f = std::fs::File::open(&p)?;
                    read_checked(&mut f, &m, &b, 0, 0).map(|_| ())
                })
                .await,
            )
            .map_err(|e| gone_if_missing(e, &i.bucket, &meta.key))?;
            StreamingBlob::wrap(block_stream(
                path,
                Arc::clone(&meta),
                i.bucket.clone(),
                range.start,
                range.end,
            ))
        };
        let sums = if content_range.is_none() {
            meta.sums.clone()
        } else {
            Sums::default()
        };
        Ok(S3Response::new(
            object_headers!(GetObjectOutput, meta, sums, {
                body: Some(body),
                content_length: Some(len as i64),
                content_range,
            }),
        ))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let i = req.input;
        let meta = self.lookup(&i.bucket, &i.key)?;
        check_read_conditions(&meta, i.if_match.as_ref(), i.if_none_match.as_ref())?;
        let sums = meta.sums.clone();
        Ok(S3Response::new(
            object_headers!(HeadObjectOutput, meta, sums, {
                content_length: Some(meta.size as i64),
            }),
        ))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.require_bucket(&req.input.bucket)?;
        self.delete(&req.input.bucket, &req.input.key).await?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let i = req.input;
        self.require_bucket(&i.bucket)?;
        let quiet = i.delete.quiet.unwrap_or(false);
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for o in i.delete.objects {
            match self.delete(&i.bucket, &o.key).await {
                Ok(_) => {
                    if !quiet {
                        deleted.push(DeletedObject {
                            key: Some(o.key),
                            ..Default::default()
                        });
                    }
                }
                Err(e) => errors.push(s3s::dto::Error {
                    key: Some(o.key),
                    code: Some(e.code().as_str().to_owned()),
                    message: e.message().map(str::to_owned),
                    ..Default::default()
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: Some(errors),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let i = req.input;
        let max = list_max(i.max_keys);
        let prefix = i.prefix.clone().unwrap_or_default();
        let l = self.list(
            &i.bucket,
            &prefix,
            i.delimiter.as_deref(),
            i.marker.as_deref(),
            max,
        )?;
        let url = i
            .encoding_type
            .as_ref()
            .is_some_and(|e| e.as_str() == EncodingType::URL);
        let (contents, common_prefixes) = l.contents(url);
        let enc = |s: String| if url { url_encode(&s) } else { s };
        Ok(S3Response::new(ListObjectsOutput {
            contents,
            common_prefixes,
            is_truncated: Some(l.truncated),
            next_marker: if l.truncated && i.delimiter.is_some() {
                l.last.clone().map(enc)
            } else {
                None
            },
            marker: i.marker.map(enc),
            max_keys: Some(max as i32),
            name: Some(i.bucket),
            prefix: Some(enc(prefix)),
            delimiter: i.delimiter.map(enc),
            encoding_type: i.encoding_type,
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let i = req.input;
        let max = list_max(i.max_keys);
        let prefix = i.prefix.clone().unwrap_or_default();
        let after = match &i.continuation_token {
            Some(t) => Some(decode_token(t)?),
            None => i.start_after.clone(),
        };
        let l = self.list(
            &i.bucket,
            &prefix,
            i.delimiter.as_deref(),
            after.as_deref(),
            max,
        )?;
        let url = i
            .encoding_type
            .as_ref()
            .is_some_and(|e| e.as_str() == EncodingType::URL);
        let (contents, common_prefixes) = l.contents(url);
        let count = l.objects.len() + l.prefixes.len();
        let enc = |s: String| if url { url_encode(&s) } else { s };
        Ok(S3Response::new(ListObjectsV2Output {
            contents,
            common_prefixes,
            key_count: Some(count as i32),
            max_keys: Some(max as i32),
            is_truncated: Some(l.truncated),
            continuation_token: i.continuation_token,
            next_continuation_token: if l.truncated {
                l.last.as_deref().map(encode_token)
            } else {
                None
            },
            name: Some(i.bucket),
            prefix: Some(enc(prefix)),
            delimiter: i.delimiter.map(enc),
            start_after: i.start_after.map(enc),
            encoding_type: i.encoding_type,
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let owner = req.credentials.as_ref().map(|c| c.access_key.clone());
        let i = req.input;
        check_key(&i.key)?;
        self.require_bucket(&i.bucket)?;
        let id = hex::encode(rand::random::<[u8; 16]>());
        let info = UploadInfo {
            bucket: i.bucket.clone(),
            key: i.key.clone(),
            owner,
            attrs: attrs_of!(i),
            algorithm: i.checksum_algorithm.as_ref().map(|a| a.as_str().to_owned()),
            created_ms: now_ms(),
        };
        let dir = self.inner.upload_dir(&id);
        let json = serde_json::to_vec(&info).map_err(|e| io_error("encoding upload", e))?;
        joined(
            "starting a multipart upload",
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("upload.json"), json)
            })
            .await,
        )?;
        self.state_mut().uploads.insert(
            id.clone(),
            Upload {
                info,
                parts: BTreeMap::new(),
            },
        );
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(id),
            checksum_algorithm: i.checksum_algorithm,
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let trailer = trailer_names(&req);
        let caller = req.credentials.as_ref().map(|c| c.access_key.clone());
        let trailers = req.trailing_headers;
        let i = req.input;
        if !(1..=10_000).contains(&i.part_number) {
            return Err(err(
                S3ErrorCode::InvalidArgument,
                "part numbers are 1 to 10000",
            ));
        }
        self.upload_of(&i.upload_id, &i.bucket, &i.key, caller.as_deref())?;
        let Some(body) = i.body else {
            return Err(err(S3ErrorCode::IncompleteBody, "the request has no body"));
        };
        let mut given = sums_of!(i);
        let hasher = given.hasher(i.checksum_algorithm.as_ref(), trailer.as_deref())?;
        let expected = expected_len(i.content_length, &body);
        let version = self.version();
        let dir = self.inner.upload_dir(&i.upload_id);
        let dest = dir.join(part_file_name(i.part_number, version));
        let received = receive(&dest, body, expected, i.content_md5.is_some(), hasher, 0).await?;
        given.add_trailers(trailers)?;
        given.check(&received.sums)?;
        let etag = checked_e_tag(&received, i.content_md5.as_deref(), version)?;
        let part = Part {
            number: i.part_number,
            version,
            size: received.size,
            etag: etag.clone(),
            modified_ms: now_ms(),
            crc: received.crc,
            sums: received.sums.clone(),
        };
        let json = serde_json::to_vec(&part).map_err(|e| io_error("encoding part", e))?;
        joined(
            "writing a part",
            tokio::task::spawn_blocking(move || received.finish(&json, &dest)).await,
        )?;
        let sums = part.sums.clone();
        let replaced = {
            let mut st = self.state_mut();
            match st.uploads.get_mut(&i.upload_id) {
                // Completed or aborted meanwhile.
                None => Some(version),
                Some(u) => match u.parts.get(&i.part_number) {
                    Some(cur) if cur.version > version => Some(version),
                    _ => u
                        .parts
                        .insert(i.part_number, Arc::new(part))
                        .map(|p| p.version),
                },
            }
        };
        if let Some(v) = replaced {
            let path = dir.join(part_file_name(i.part_number, v));
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
        }
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(etag)),
            checksum_crc32: sums.crc32,
            checksum_crc32c: sums.crc32c,
            checksum_crc64nvme: sums.crc64nvme,
            checksum_sha1: sums.sha1,
            checksum_sha256: sums.sha256,
            ..Default::default()
        }))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let caller = req.credentials.as_ref().map(|c| c.access_key.clone());
        let i = req.input;
        self.upload_of(&i.upload_id, &i.bucket, &i.key, caller.as_deref())?;
        let max = i
            .max_parts
            .map_or(MAX_LIST, |m| (m.max(0) as usize).min(MAX_LIST));
        let after = i.part_number_marker.unwrap_or(0);
        let st = self.state();
        let u = st
            .uploads
            .get(&i.upload_id)
            .ok_or_else(|| err(S3ErrorCode::NoSuchUpload, "no such upload"))?;
        let all: Vec<&Arc<Part>> = u.parts.range(after + 1..).map(|(_, p)| p).collect();
        let truncated = all.len() > max;
        let parts: Vec<s3s::dto::Part> = all
            .iter()
            .take(max)
            .map(|p| s3s::dto::Part {
                part_number: Some(p.number),
                size: Some(p.size as i64),
                e_tag: Some(ETag::Strong(p.etag.clone())),
                last_modified: Some(Timestamp::from(
                    UNIX_EPOCH + Duration::from_millis(p.modified_ms),
                )),
                checksum_crc32: p.sums.crc32.clone(),
                checksum_crc32c: p.sums.crc32c.clone(),
                checksum_crc64nvme: p.sums.crc64nvme.clone(),
                checksum_sha1: p.sums.sha1.clone(),
                checksum_sha256: p.sums.sha256.clone(),
            })
            .collect();
        let next = parts.last().and_then(|p| p.part_number);
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(i.upload_id),
            max_parts: Some(max as i32),
            part_number_marker: i.part_number_marker,
            next_part_number_marker: if truncated { next } else { None },
            is_truncated: Some(truncated),
            parts: Some(parts),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let caller = req.credentials.as_ref().map(|c| c.access_key.clone());
        let i = req.input;
        self.upload_of(&i.upload_id, &i.bucket, &i.key, caller.as_deref())?;
        let listed = i
            .multipart_upload
            .and_then(|m| m.parts)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| err(S3ErrorCode::MalformedXML, "the request lists no parts"))?;
        // Take the upload out so no part changes under us; put it back if the request is refused.
        let upload = self
            .state_mut()
            .uploads
            .remove(&i.upload_id)
            .ok_or_else(|| err(S3ErrorCode::NoSuchUpload, "no such upload"))?;
        let chosen = match choose_parts(&upload, &listed) {
            Ok(c) => c,
            Err(e) => {
                self.state_mut().uploads.insert(i.upload_id.clone(), upload);
                return Err(e);
            }
        };
        let version = self.version();
        let etag = multipart_e_tag(&chosen);
        let sums = composite_sums(upload.info.algorithm.as_deref(), &chosen);
        let dir = self.inner.upload_dir(&i.upload_id);
        let dest = self.inner.object_path(&i.bucket, &i.key, version);
        let tmp = self.tmp_dir();
        let mut meta = Meta {
            key: i.key.clone(),
            version,
            size: chosen.iter().map(|p| p.size).sum(),
            etag: etag.clone(),
            modified_ms: now_ms(),
            attrs: upload.info.attrs.clone(),
            sums: sums.clone(),
            crcs: Vec::new(),
        };
        let (d, parts) = (dir.clone(), chosen.clone());
        let joined_res = tokio::task::spawn_blocking(move || {
            let crcs = join_parts(&tmp, &d, &parts)?;
            meta.crcs = crcs.0;
            let json = serde_json::to_vec(&meta).map_err(std::io::Error::other)?;
            crcs.1.finish(&json, &dest)?;
            Ok::<_, std::io::Error>(meta)
        })
        .await;
        let meta = match joined("completing a multipart upload", joined_res) {
            Ok(m) => m,
            Err(e) => {
                self.state_mut().uploads.insert(i.upload_id.clone(), upload);
                return Err(e);
            }
        };
        self.commit(NewObject {
            bucket: i.bucket.clone(),
            meta,
            whole: None,
            if_none_match: None,
            if_match: None,
        })
        .await?;
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            e_tag: Some(ETag::Strong(etag)),
            checksum_crc32: sums.crc32,
            checksum_crc32c: sums.crc32c,
            checksum_crc64nvme: sums.crc64nvme,
            checksum_sha1: sums.sha1,
            checksum_sha256: sums.sha256,
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let i = req.input;
        let CopySource::Bucket {
            bucket: src_bucket,
            key: src_key,
            version_id,
        } = &i.copy_source
        else {
            return Err(err(
                S3ErrorCode::NotImplemented,
                "copies from access points are not offered",
            ));
        };
        if version_id.is_some() {
            return Err(err(
                S3ErrorCode::NotImplemented,
                "this store keeps no object versions",
            ));
        }
        check_key(&i.key)?;
        self.require_bucket(&i.bucket)?;
        let src = self.lookup(src_bucket, src_key)?;
        if let Some(c) = &i.copy_source_if_match {
            check_read_conditions(&src, Some(c), None)?;
        }
        let replace = i
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        let attrs = if replace {
            attrs_of!(i)
        } else {
            src.attrs.clone()
        };
        let version = self.version();
        let meta = Meta {
            key: i.key.clone(),
            version,
            size: src.size,
            etag: new_e_tag(version),
            modified_ms: now_ms(),
            attrs,
            sums: src.sums.clone(),
            crcs: src.crcs.clone(),
        };
        let from = self.inner.object_path(src_bucket, src_key, src.version);
        let dest = self.inner.object_path(&i.bucket, &i.key, version);
        let tmp = self.tmp_dir();
        let json = serde_json::to_vec(&meta).map_err(|e| io_error("encoding metadata", e))?;
        let (m, b) = (Arc::clone(&src), src_bucket.to_string());
        joined(
            "copying an object",
            tokio::task::spawn_blocking(move || {
                let mut f = std::fs::File::open(&from)?;
                let mut out = TmpFile::create(&tmp)?;
                let mut pos = 0;
                while pos < m.size {
                    let to = (pos + BLOCK as u64).min(m.size);
                    out.file
                        .write_all(&read_checked(&mut f, &m, &b, pos, to)?)?;
                    pos = to;
                }
                out.finish(&json, &dest)
            })
            .await,
        )
        .map_err(|e| gone_if_missing(e, src_bucket, src_key))?;
        let (etag, modified) = (meta.etag.clone(), meta.modified());
        self.commit(NewObject {
            bucket: i.bucket,
            meta,
            whole: None,
            if_none_match: None,
            if_match: None,
        })
        .await?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(ETag::Strong(etag)),
                last_modified: Some(modified),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let caller = req.credentials.as_ref().map(|c| c.access_key.clone());
        let i = req.input;
        self.upload_of(&i.upload_id, &i.bucket, &i.key, caller.as_deref())?;
        self.state_mut().uploads.remove(&i.upload_id);
        let dir = self.inner.upload_dir(&i.upload_id);
        joined(
            "aborting an upload",
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await,
        )?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }
}

impl ObjectStore {
    /// Checks that upload `id` exists for `bucket`/`key` and that `caller` started it.
    fn upload_of(&self, id: &str, bucket: &str, key: &str, caller: Option<&str>) -> S3Result<()> {
        let st = self.state();
        let u = st
            .uploads
            .get(id)
            .filter(|u| u.info.bucket == bucket && u.info.key == key)
            .ok_or_else(|| {
                err(
                    S3ErrorCode::NoSuchUpload,
                    format!("no upload {id:?} for {key:?} in {bucket:?}"),
                )
            })?;
        if u.info.owner.as_deref() != caller {
            return Err(err(
                S3ErrorCode::AccessDenied,
                "the upload was started by another access key",
            ));
        }
        Ok(())
    }
}

fn list_max(max_keys: Option<i32>) -> usize {
    max_keys.map_or(MAX_LIST, |m| (m.max(0) as usize).min(MAX_LIST))
}

fn encode_token(last: &str) -> String {
    base64_simd::URL_SAFE_NO_PAD.encode_to_string(last.as_bytes())
}

fn decode_token(token: &str) -> S3Result<String> {
    base64_simd::URL_SAFE_NO_PAD
        .decode_to_vec(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| err(S3ErrorCode::InvalidArgument, "invalid continuation token"))
}

/// `PreconditionFailed` when a GET's or HEAD's `If-Match` fails; `NotModified` when its
/// `If-None-Match` matches.
fn check_read_conditions(
    meta: &Meta,
    if_match: Option<&ETagCondition>,
    if_none_match: Option<&ETagCondition>,
) -> S3Result<()> {
    let matches = |c: &ETagCondition| match c {
        ETagCondition::Any => true,
        ETagCondition::ETag(t) => t.value() == meta.etag,
    };
    if if_match.is_some_and(|c| !matches(c)) {
        return Err(err(
            S3ErrorCode::PreconditionFailed,
            "the object's ETag does not match (If-Match)",
        ));
    }
    if if_none_match.is_some_and(matches) {
        return Err(S3Error::new(S3ErrorCode::NotModified));
    }
    Ok(())
}

/// The stored parts a completion request lists, in order: ascending numbers, matching ETags,
/// every part but the last at least 5 MiB.
fn choose_parts(upload: &Upload, listed: &[CompletedPart]) -> S3Result<Vec<Arc<Part>>> {
    let mut out: Vec<Arc<Part>> = Vec::with_capacity(listed.len());
    let mut prev = 0;
    for c in listed {
        let n = c
            .part_number
            .ok_or_else(|| err(S3ErrorCode::InvalidPart, "a listed part has no number"))?;
        if n <= prev {
            return Err(err(
                S3ErrorCode::InvalidPartOrder,
                "parts must be listed in ascending order",
            ));
        }
        prev = n;
        let p = upload.parts.get(&n).ok_or_else(|| {
            err(
                S3ErrorCode::InvalidPart,
                format!("part {n} was not uploaded"),
            )
        })?;
        if let Some(t) = &c.e_tag {
            if t.value().trim_matches('"') != p.etag {
                return Err(err(
                    S3ErrorCode::InvalidPart,
                    format!("part {n}'s ETag does not match"),
                ));
            }
        }
        out.push(Arc::clone(p));
    }
    if let Some((_, init)) = out.split_last() {
        if let Some(small) = init.iter().find(|p| p.size < MIN_PART) {
            return Err(err(
                S3ErrorCode::EntityTooSmall,
                format!(
                    "part {} has {} bytes; every part but the last needs at least 5 MiB",
                    small.number, small.size
                ),
            ));
        }
    }
    Ok(out)
}

/// S3's multipart ETag: MD5 of the parts' ETags (as bytes when they are hex) and `-N`.
fn multipart_e_tag(parts: &[Arc<Part>]) -> String {
    let mut md5 = Md5::new();
    for p in parts {
        match hex::decode(&p.etag) {
            Ok(b) => md5.update(&b),
            Err(_) => md5.update(p.etag.as_bytes()),
        }
    }
    format!("{}-{}", hex::encode(md5.finalize()), parts.len())
}

/// The composite checksum of a multipart object, when every part carries the upload's algorithm.
fn composite_sums(algorithm: Option<&str>, parts: &[Arc<Part>]) -> Sums {
    let Some(alg) = algorithm else {
        return Sums::default();
    };
    let pick = |s: &Sums| -> Option<String> {
        match alg.to_ascii_uppercase().as_str() {
            "CRC32" => s.crc32.clone(),
            "CRC32C" => s.crc32c.clone(),
            "CRC64NVME" => s.crc64nvme.clone(),
            "SHA1" => s.sha1.clone(),
            "SHA256" => s.sha256.clone(),
            _ => None,
        }
    };
    let Ok(mut h) = Sums::default().hasher(Some(&ChecksumAlgorithm::from(alg.to_owned())), None)
    else {
        return Sums::default();
    };
    for p in parts {
        let Some(v) = pick(&p.sums) else {
            return Sums::default();
        };
        let Ok(raw) = base64_simd::STANDARD.decode_to_vec(v) else {
            return Sums::default();
        };
        h.update(&raw);
    }
    let mut s = Sums::from_checksum(h.finalize());
    let n = parts.len();
    for slot in [
        &mut s.crc32,
        &mut s.crc32c,
        &mut s.crc64nvme,
        &mut s.sha1,
        &mut s.sha256,
    ] {
        if let Some(v) = slot.as_mut() {
            v.push_str(&format!("-{n}"));
        }
    }
    s
}

/// Concatenates `parts` (files in `dir`) into a new temporary file, checking each part's CRC32
/// and computing the object's block CRCs (blocking).
fn join_parts(
    tmp_dir: &Path,
    dir: &Path,
    parts: &[Arc<Part>],
) -> std::io::Result<(Vec<u32>, TmpFile)> {
    let mut out = TmpFile::create(tmp_dir)?;
    let mut crcs = BlockCrcs::default();
    let mut buf = vec![0u8; BLOCK];
    for p in parts {
        let path = dir.join(part_file_name(p.number, p.version));
        let mut f = std::fs::File::open(&path)?;
        let len = data_len(&mut f)?;
        if len != p.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "part {} changed on disk ({len} bytes, {} expected)",
                    p.number, p.size
                ),
            ));
        }
        f.seek(SeekFrom::Start(0))?;
        let mut left = p.size;
        let mut crc = crc32fast::Hasher::new();
        while left > 0 {
            let n = (left as usize).min(BLOCK);
            f.read_exact(&mut buf[..n])?;
            crc.update(&buf[..n]);
            crcs.update(&buf[..n]);
            out.file.write_all(&buf[..n])?;
            left -= n as u64;
        }
        if crc.finalize() != p.crc {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("part {} changed on disk (CRC32 mismatch)", p.number),
            ));
        }
    }
    Ok((crcs.finish(), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_crcs_split_at_block_boundaries() {
        let data: Vec<u8> = (0..(2 * BLOCK + 10)).map(|i| (i % 251) as u8).collect();
        let mut c = BlockCrcs::default();
        for piece in data.chunks(7777) {
            c.update(piece);
        }
        let want: Vec<u32> = data.chunks(BLOCK).map(crc32fast::hash).collect();
        assert_eq!(c.finish(), want);
    }

    #[test]
    fn distinct_keys_get_distinct_files_and_none_is_a_path() {
        let keys = ["a/b", "a//b", "./c", "c", "../x", "a/../b", "%2F", "/"];
        let names: std::collections::HashSet<String> =
            keys.iter().map(|k| object_file_name(k, 1)).collect();
        assert_eq!(names.len(), keys.len());
        assert!(names
            .iter()
            .all(|n| !n.contains('/') && !n.starts_with('.')));
    }

    #[test]
    fn cache_evicts_oldest_unread_first() {
        let mut c = Cache::new(3 * 1024);
        c.max_object = 1024;
        for v in 1..=3 {
            c.insert(v, Bytes::from(vec![0u8; 1024]));
        }
        assert!(c.get(1).is_some()); // read: gets a second chance
        c.insert(4, Bytes::from(vec![0u8; 1024]));
        assert!(c.get(1).is_some());
        assert!(c.get(2).is_none());
        assert!(c.bytes <= c.budget);
        c.remove(1);
        assert!(c.get(1).is_none());
    }

    #[test]
    fn bucket_names_follow_s3_rules() {
        for ok in ["fedmq", "a.b-c", "abc"] {
            assert!(check_bucket_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "..",
            "ab",
            "a..b",
            "-abc",
            "ABC",
            "a/b",
            "abc.",
            &"a".repeat(64),
        ] {
            assert!(check_bucket_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn url_encoding_keeps_slashes() {
        assert_eq!(url_encode("a b/c%"), "a%20b/c%25");
    }
}
