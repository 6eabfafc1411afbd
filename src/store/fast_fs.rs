//! [`FastFs`]: s3s-fs's [`FileSystem`] with faster `PutObject`, `UploadPart`, `GetObject` and
//! `CompleteMultipartUpload`.
//!
//! Measured on s3s-fs 0.14.1 (blob benchmark notes in docs/), these costs dominate large blobs:
//! - `PutObject` and `UploadPart` MD5-hash every body byte for the ETag (40 % of the store's CPU
//!   in `fedmq bench round`) and write it through a tokio `BufWriter` (8 KiB buffer, one
//!   `spawn_blocking` round trip per write). fedmq never relies on ETags: integrity is the SHA-256 in every
//!   `BlobRef`, checked by the reader. We write the body in [`WRITE_CHUNK`] vectored writes on the
//!   blocking pool (the next chunk arrives while the previous one is written) and return a cheap
//!   ETag that is unique per written version ([`new_e_tag`]: 32 hex digits, like an MD5). A
//!   body sent with a `Content-MD5` is hashed and checked before it becomes visible (then the
//!   ETag is its MD5, as S3's); a request with an `x-amz-checksum-*` value or algorithm, or with
//!   trailing checksums, goes to s3s-fs, which checks it.
//! - `GetObject` streams bodies with `ReaderStream::with_capacity(tokio::fs::File, 4096)`: every
//!   4 KiB of a download is one `spawn_blocking` round trip and one 4 KiB frame through hyper.
//!   We replace the body of a successful `GetObject` with a stream that reads the same byte range
//!   in [`READ_CHUNK`] blocks.
//! - `CompleteMultipartUpload` re-reads every part through 64 KiB tokio reads, MD5-hashes all of
//!   it a second time only to derive the multipart ETag, and copies it into the object file: a
//!   serial pass over the whole blob after the last part arrived. We concatenate the part files
//!   with `std::io::copy` (`copy_file_range` on Linux) on the blocking pool and derive the ETag
//!   S3's way (MD5 of the 16-byte part ETags, `-N`) from the part ETags in the request, which are
//!   what `UploadPart` returned (ours or, for parts s3s-fs wrote, MD5s).
//!
//! Every other operation is s3s-fs's, unchanged, so buckets, metadata and errors behave as
//! s3s-fs's. The fast paths fall back to s3s-fs whenever a request is outside what they handle
//! (conditional headers, checksums, storage classes, keys with `..` or `/` at the end,
//! non-canonical upload ids, part ETags that are not 32 hex digits).
//!
//! Design: the fast paths write s3s-fs 0.14.1's private on-disk layout: the object at
//! `<root>/<bucket>/<key>`, its attributes (content type, user metadata, ...) in
//! `.bucket-<b64>.object-<b64>.metadata.json`, its ETag in `...internal.json` (without it s3s-fs
//! would MD5 the whole object on every GET and HEAD), part files `.upload_id-<id>.part-<n>`, the
//! upload's owner in `.upload-<id>.json`, every file written to a `.tmp.*.internal.part` file in
//! the root (swept by s3s-fs at startup) and renamed into place. `tests/store.rs` checks that
//! s3s-fs reads back what we write (HEAD length and ETag, GET bytes, LIST); re-check this file
//! when upgrading s3s-fs.
//! The GET fast path opens the object file a second time and is used only when that file has
//! exactly the length s3s-fs reported (guards against a concurrent overwrite between the opens).
//! Set `FEDMQ_STORE_PLAIN_FS=1` to use s3s-fs's own paths throughout (for A/B benchmarks).

use super::error::{Error, Result};
use bytes::Bytes;
use futures::StreamExt as _;
use s3s::crypto::{Checksum as _, Md5};
use s3s::dto::*;
use s3s::stream::ByteStream as _;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};
use s3s_fs::FileSystem;
use std::future::Future;
use std::io::{IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Size of one read (and one HTTP body frame) of a `GetObject` body.
pub const READ_CHUNK: usize = 1 << 20;

/// Bytes of a `PutObject` / `UploadPart` body gathered before one write to its file.
const WRITE_CHUNK: usize = 1 << 20;

/// s3s-fs with the faster `GetObject` body; see the module docs.
#[derive(Debug)]
pub struct FastFs {
    /// Does all the S3 work.
    inner: FileSystem,
    /// The same root s3s-fs uses (absolute, canonical), to find object files.
    root: PathBuf,
    /// False when `FEDMQ_STORE_PLAIN_FS` is set: use s3s-fs's own GET and complete paths.
    fast: bool,
}

impl FastFs {
    /// Serves the objects under `root` (must exist).
    ///
    /// # Errors
    /// [`Error::Server`] with whatever s3s-fs reports for the directory.
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        // s3s-fs's error type has no Display; its Debug names the cause.
        let inner = FileSystem::new(root).map_err(|e| Error::Server {
            reason: format!("cannot use {} as data directory: {e:?}", root.display()),
        })?;
        // As s3s-fs does it, so both resolve the same files.
        let root = std::env::current_dir()
            .and_then(|cwd| cwd.join(root).canonicalize())
            .map_err(|source| Error::Io {
                op: "resolving data directory",
                path: root.to_path_buf(),
                source,
            })?;
        let fast = std::env::var_os("FEDMQ_STORE_PLAIN_FS").is_none_or(|v| v.is_empty());
        Ok(Self { inner, root, fast })
    }

    /// The object file for `bucket`/`key`, when it can be resolved without s3s-fs's virtual
    /// path logic.
    fn object_path(&self, bucket: &str, key: &str) -> Option<PathBuf> {
        let rel = Path::new(bucket).join(key);
        let plain = rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        plain.then(|| self.root.join(rel))
    }
}

// ---------------------------------------------------------------------------------------------
// PutObject and UploadPart without hashing the body.
// ---------------------------------------------------------------------------------------------

/// A fresh ETag for a version of an object or part we wrote: the write time in nanoseconds and a
/// per-process random seed plus a counter, as 32 lowercase hex digits (the shape of an MD5, for
/// clients that parse ETags as hex; our multipart completion reads part ETags as 16 bytes).
/// Unique per write; says nothing about the content.
fn new_e_tag() -> String {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(rand::random::<u64>);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:016x}{:016x}", seed.wrapping_add(n))
}

/// A temporary file under the store root, named so that s3s-fs's startup sweep removes it if we
/// die first. Removed on drop unless [`persist`](Self::persist)ed, also when the drop happens on
/// the blocking pool after the request that wrote it was cancelled.
struct TmpFile {
    /// `None` once renamed into place.
    path: Option<PathBuf>,
    file: std::fs::File,
}

impl TmpFile {
    fn create(root: &Path) -> std::io::Result<Self> {
        let mut tries = 0;
        loop {
            let path = root.join(format!(
                ".tmp.fedmq-{:016x}.internal.part",
                rand::random::<u64>()
            ));
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
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 3 => {
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A temporary file holding `bytes`.
    fn with_contents(root: &Path, bytes: &[u8]) -> std::io::Result<Self> {
        let mut t = Self::create(root)?;
        t.file.write_all(bytes)?;
        Ok(t)
    }

    /// Appends `chunks` with as few `writev` calls as the kernel allows.
    fn write_chunks(&mut self, chunks: &[Bytes]) -> std::io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
        let mut rest = &mut slices[..];
        IoSlice::advance_slices(&mut rest, 0);
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

    /// Renames the file to `dest` (atomically replacing what is there), creating `dest`'s
    /// directory when missing, as s3s-fs does.
    fn persist(mut self, dest: &Path) -> std::io::Result<()> {
        let Some(path) = self.path.as_deref() else {
            return Ok(());
        };
        match std::fs::rename(path, dest) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = dest.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::rename(path, dest)?;
            }
            other => other?,
        }
        self.path = None;
        Ok(())
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A request body received into a temporary file, except for its last (under
/// [`WRITE_CHUNK`]) bytes, which [`finish`](Self::finish) writes together with whatever else the
/// request does on the blocking pool (small bodies take one blocking call in all).
struct Received {
    file: Option<TmpFile>,
    tail: Vec<Bytes>,
    /// The body's MD5, when asked for.
    md5: Option<[u8; 16]>,
}

impl Received {
    /// The temporary file with the whole body in it (blocking).
    fn finish(self, root: &Path) -> std::io::Result<TmpFile> {
        let mut file = match self.file {
            Some(f) => f,
            None => TmpFile::create(root)?,
        };
        file.write_chunks(&self.tail)?;
        Ok(file)
    }
}

/// Receives `body` into a temporary file under `root` in [`WRITE_CHUNK`] writes on the blocking
/// pool, one in flight while the next chunk arrives; MD5-hashes it only if `md5`. A body that
/// fails mid-way (client gone, SigV4 chunk or payload hash mismatch) or whose length is not
/// `expected` is an error, and its temporary file is removed.
async fn receive(
    root: &Path,
    mut body: StreamingBlob,
    expected: Option<u64>,
    md5: bool,
) -> S3Result<Received> {
    let mut hasher = md5.then(Md5::new);
    let mut writing: Option<tokio::task::JoinHandle<std::io::Result<TmpFile>>> = None;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len = 0usize;
    let mut total = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            S3Error::with_message(
                S3ErrorCode::IncompleteBody,
                format!("reading the request body: {e}"),
            )
        })?;
        total += chunk.len() as u64;
        if expected.is_some_and(|n| total > n) {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidRequest,
                "the request body is longer than its Content-Length",
            ));
        }
        if chunk.is_empty() {
            continue;
        }
        if let Some(h) = &mut hasher {
            h.update(&chunk);
        }
        batch_len += chunk.len();
        batch.push(chunk);
        if batch_len >= WRITE_CHUNK {
            let prev = match writing.take() {
                Some(w) => Some(joined(w.await)?),
                None => None,
            };
            let chunks = std::mem::take(&mut batch);
            batch_len = 0;
            let root = root.to_path_buf();
            writing = Some(tokio::task::spawn_blocking(move || {
                let mut file = match prev {
                    Some(f) => f,
                    None => TmpFile::create(&root)?,
                };
                file.write_chunks(&chunks)?;
                Ok(file)
            }));
        }
    }
    let file = match writing {
        Some(w) => Some(joined(w.await)?),
        None => None,
    };
    if let Some(n) = expected.filter(|&n| n != total) {
        return Err(S3Error::with_message(
            S3ErrorCode::IncompleteBody,
            format!("the request body has {total} bytes, its Content-Length says {n}"),
        ));
    }
    Ok(Received {
        file,
        tail: batch,
        md5: hasher.map(Md5::finalize),
    })
}

/// The result of a blocking task doing store I/O, as an S3 result.
fn joined<T>(res: std::result::Result<std::io::Result<T>, tokio::task::JoinError>) -> S3Result<T> {
    match res {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(S3Error::with_message(
            S3ErrorCode::InternalError,
            format!("writing to the store: {e}"),
        )),
        Err(e) => Err(S3Error::internal_error(e)),
    }
}

/// The body length a request announces: its `Content-Length` (for aws-chunked bodies s3s puts
/// the decoded length there), else the exact length its body stream knows.
fn expected_len(content_length: Option<i64>, body: &StreamingBlob) -> Option<u64> {
    match content_length {
        Some(n) => u64::try_from(n).ok(),
        None => body.remaining_length().exact().map(|n| n as u64),
    }
}

/// Whether a request names an `x-amz-checksum-*` value or algorithm, or trailing checksums, so
/// that s3s-fs must see it to verify it. (`Content-MD5` we check ourselves.)
fn wants_checksum<T>(req: &S3Request<T>, checksums: &[bool]) -> bool {
    checksums.iter().any(|&c| c) || req.headers.contains_key("x-amz-trailer")
}

/// The bytes of a `Content-MD5` header (standard base64, padded); `InvalidArgument` when it is
/// not base64, as s3s-fs.
fn decode_content_md5(value: &str) -> S3Result<Vec<u8>> {
    let invalid = || S3Error::with_message(S3ErrorCode::InvalidArgument, "invalid Content-MD5");
    let sextet = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let bytes = value.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return Err(invalid());
    }
    let quads = bytes.len() / 4;
    let mut out = Vec::with_capacity(quads * 3);
    for (i, quad) in bytes.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != quads) {
            return Err(invalid());
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | u32::from(sextet(c).ok_or_else(invalid)?);
        }
        n <<= 6 * pad;
        let [_, b0, b1, b2] = n.to_be_bytes();
        out.extend_from_slice(&[b0, b1, b2][..3 - pad]);
    }
    Ok(out)
}

/// The ETag of a body we received: its MD5 when we computed it (the client sent a `Content-MD5`,
/// checked here against `content_md5`: `BadDigest` when they differ), else a fresh
/// [`new_e_tag`].
fn checked_e_tag(received: &Received, content_md5: Option<&[u8]>) -> S3Result<String> {
    match (received.md5, content_md5) {
        (Some(md5), Some(expected)) if md5[..] != *expected => Err(S3Error::with_message(
            S3ErrorCode::BadDigest,
            "the body does not match its Content-MD5",
        )),
        (Some(md5), _) => Ok(hex::encode(md5)),
        (None, _) => Ok(new_e_tag()),
    }
}

/// Checks that the caller is who started upload `id` (as s3s-fs does: the same access key, or
/// both anonymous). Blocking.
fn check_upload_owner(upload_info: &Path, caller: Option<&str>) -> S3Result<()> {
    let started_by: Option<String> = match std::fs::read(upload_info) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| S3Error::with_message(S3ErrorCode::InternalError, e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(S3Error::new(S3ErrorCode::AccessDenied));
        }
        Err(e) => {
            return Err(S3Error::with_message(
                S3ErrorCode::InternalError,
                format!("reading upload info: {e}"),
            ))
        }
    };
    if started_by.as_deref() != caller {
        return Err(S3Error::new(S3ErrorCode::AccessDenied));
    }
    Ok(())
}

/// s3s-fs 0.14.1's `ObjectAttributes`, the JSON in an object's `.metadata.json` (same field
/// names, absent fields left out).
#[derive(serde::Serialize)]
struct ObjectAttributes {
    #[serde(skip_serializing_if = "Option::is_none")]
    user_metadata: Option<Metadata>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_encoding: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_disposition: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_language: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<String>,
    /// As s3s-fs stores it: the S3 date-time text.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    website_redirect_location: Option<String>,
}

/// What a `PutObject` the fast path handles writes, all resolved before the body is read.
struct PutPlan {
    object: PathBuf,
    /// `.metadata.json` and its contents.
    meta: PathBuf,
    meta_json: Vec<u8>,
    /// `.internal.json` (the ETag goes there).
    internal: PathBuf,
    body: StreamingBlob,
    expected: Option<u64>,
    /// The `Content-MD5` header, when sent.
    content_md5: Option<String>,
}

impl FastFs {
    /// The object file for a write to `bucket`/`key`: only for a plain bucket name and a key made
    /// of plain path segments (no `.`, `..`, root or trailing `/`), which resolve to a file inside
    /// the bucket's directory exactly as s3s-fs resolves them.
    fn write_path(&self, bucket: &str, key: &str) -> Option<PathBuf> {
        let mut b = Path::new(bucket).components();
        let bucket_ok = matches!(b.next(), Some(Component::Normal(_))) && b.next().is_none();
        let key_ok = !key.is_empty()
            && !key.ends_with('/')
            && key.split('/').all(|s| s != "." && s != "..")
            && Path::new(key)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        (bucket_ok && key_ok).then(|| self.root.join(bucket).join(key))
    }

    /// `.bucket-<b64>.object-<b64>.<what>.json`, s3s-fs's side files of an object.
    fn side_file(&self, bucket: &str, key: &str, what: &str) -> PathBuf {
        self.root.join(format!(
            ".bucket-{}.object-{}.{what}.json",
            b64url(bucket.as_bytes()),
            b64url(key.as_bytes())
        ))
    }

    /// Removes the side files of a deleted object (those that exist).
    async fn remove_side_files(&self, bucket: &str, key: &str) {
        for what in ["metadata", "internal"] {
            let path = self.side_file(bucket, key, what);
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("embedded store: removing {}: {e}", path.display()),
            }
        }
    }

    /// The plan for `req` if the fast path handles it; `None` (request untouched) to let s3s-fs
    /// do it.
    fn put_plan(&self, req: &mut S3Request<PutObjectInput>) -> Option<PutPlan> {
        let i = &req.input;
        let checksums = [
            i.checksum_algorithm.is_some(),
            i.checksum_crc32.is_some(),
            i.checksum_crc32c.is_some(),
            i.checksum_crc64nvme.is_some(),
            i.checksum_sha1.is_some(),
            i.checksum_sha256.is_some(),
        ];
        if !self.fast
            || wants_checksum(req, &checksums)
            || i.if_match.is_some()
            || i.if_none_match.is_some()
            || i.storage_class.is_some()
            || i.body.is_none()
            || i.content_length.is_some_and(|n| n < 0)
        {
            return None;
        }
        let object = self.write_path(&i.bucket, &i.key)?;
        // Past this point the fast path owns the request.
        let input = &mut req.input;
        let body = input.body.take()?;
        let expires = input.expires.take().and_then(|ts| {
            let mut buf = Vec::new();
            ts.format(TimestampFormat::DateTime, &mut buf).ok()?;
            String::from_utf8(buf).ok()
        });
        let attrs = ObjectAttributes {
            user_metadata: input.metadata.take(),
            content_encoding: input.content_encoding.take(),
            content_type: input.content_type.take(),
            content_disposition: input.content_disposition.take(),
            content_language: input.content_language.take(),
            cache_control: input.cache_control.take(),
            expires,
            website_redirect_location: input.website_redirect_location.take(),
        };
        // Serializing strings and a string map cannot fail.
        let meta_json = serde_json::to_vec(&attrs).unwrap_or_else(|_| b"{}".to_vec());
        Some(PutPlan {
            meta: self.side_file(&input.bucket, &input.key, "metadata"),
            internal: self.side_file(&input.bucket, &input.key, "internal"),
            object,
            meta_json,
            expected: expected_len(input.content_length, &body),
            body,
            content_md5: input.content_md5.take(),
        })
    }

    /// `PutObject` without hashing the body (unless it came with a `Content-MD5`): s3s-fs's
    /// writes (object, attributes, ETag), in its order, with our ETag. Unlike s3s-fs, a body that
    /// does not match its `Content-MD5` never replaces the object.
    async fn fast_put(&self, plan: PutPlan) -> S3Result<S3Response<PutObjectOutput>> {
        let content_md5 = plan
            .content_md5
            .as_deref()
            .map(decode_content_md5)
            .transpose()?;
        let md5 = content_md5.is_some();
        let received = receive(&self.root, plan.body, plan.expected, md5).await?;
        let e_tag = checked_e_tag(&received, content_md5.as_deref())?;
        let mut info = serde_json::Map::new();
        info.insert("e_tag".into(), serde_json::Value::String(e_tag.clone()));
        let info_json = serde_json::Value::Object(info).to_string().into_bytes();
        let root = self.root.clone();
        let (object, meta, meta_json, internal) =
            (plan.object, plan.meta, plan.meta_json, plan.internal);
        joined(
            tokio::task::spawn_blocking(move || {
                let data = received.finish(&root)?;
                let meta_tmp = TmpFile::with_contents(&root, &meta_json)?;
                let info_tmp = TmpFile::with_contents(&root, &info_json)?;
                data.persist(&object)?;
                meta_tmp.persist(&meta)?;
                info_tmp.persist(&internal)
            })
            .await,
        )?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(e_tag)),
            ..Default::default()
        }))
    }

    /// The part file for `req` if the fast path handles it, `None` to let s3s-fs do it.
    fn part_path(&self, req: &S3Request<UploadPartInput>) -> Option<PathBuf> {
        let i = &req.input;
        let checksums = [
            i.checksum_algorithm.is_some(),
            i.checksum_crc32.is_some(),
            i.checksum_crc32c.is_some(),
            i.checksum_crc64nvme.is_some(),
            i.checksum_sha1.is_some(),
            i.checksum_sha256.is_some(),
        ];
        let ok = self.fast
            && !wants_checksum(req, &checksums)
            && i.body.is_some()
            && (1..=10_000).contains(&i.part_number)
            && i.content_length.is_none_or(|n| n >= 0)
            && is_canonical_uuid(&i.upload_id);
        ok.then(|| {
            self.root
                .join(format!(".upload_id-{}.part-{}", i.upload_id, i.part_number))
        })
    }

    /// `UploadPart` without hashing the body, unless it came with a `Content-MD5`, which (unlike
    /// s3s-fs) we check.
    async fn fast_upload_part(
        &self,
        req: S3Request<UploadPartInput>,
        part: PathBuf,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let caller = req.credentials.as_ref().map(|c| c.access_key.clone());
        let UploadPartInput {
            body,
            upload_id,
            content_length,
            content_md5,
            ..
        } = req.input;
        let Some(body) = body else {
            return Err(S3Error::new(S3ErrorCode::IncompleteBody));
        };
        let content_md5 = content_md5.as_deref().map(decode_content_md5).transpose()?;
        let upload_info = self.root.join(format!(".upload-{upload_id}.json"));
        tokio::task::spawn_blocking(move || check_upload_owner(&upload_info, caller.as_deref()))
            .await
            .map_err(S3Error::internal_error)??;
        let expected = expected_len(content_length, &body);
        let received = receive(&self.root, body, expected, content_md5.is_some()).await?;
        let e_tag = checked_e_tag(&received, content_md5.as_deref())?;
        let root = self.root.clone();
        joined(tokio::task::spawn_blocking(move || received.finish(&root)?.persist(&part)).await)?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(e_tag)),
            ..Default::default()
        }))
    }
}

/// `(start, len)` of the body s3s-fs is about to send, from its output.
fn body_range(out: &GetObjectOutput) -> Option<(u64, u64, u64)> {
    let len = u64::try_from(out.content_length?).ok()?;
    match &out.content_range {
        // "bytes START-END/SIZE"
        Some(cr) => {
            let rest = cr.strip_prefix("bytes ")?;
            let (span, size) = rest.split_once('/')?;
            let (start, _) = span.split_once('-')?;
            Some((start.parse().ok()?, len, size.parse().ok()?))
        }
        None => Some((0, len, len)),
    }
}

/// Reads `len` bytes from `file` at `start` in [`READ_CHUNK`] blocks on the blocking pool.
fn chunked_body(
    file: std::fs::File,
    start: u64,
    len: u64,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static {
    struct State {
        file: Option<std::fs::File>,
        remaining: u64,
        seeked: bool,
        start: u64,
    }
    let state = State {
        file: Some(file),
        remaining: len,
        seeked: false,
        start,
    };
    futures::stream::unfold(state, |mut st| async move {
        if st.remaining == 0 {
            return None;
        }
        let mut file = st.file.take()?;
        let want = st.remaining.min(READ_CHUNK as u64) as usize;
        let seek_to = (!st.seeked).then_some(st.start);
        let res = tokio::task::spawn_blocking(move || {
            if let Some(pos) = seek_to {
                file.seek(SeekFrom::Start(pos))?;
            }
            let mut buf = vec![0u8; want];
            let mut filled = 0;
            while filled < want {
                let n = file.read(&mut buf[filled..])?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "object file shrank while it was being read",
                    ));
                }
                filled += n;
            }
            Ok((file, Bytes::from(buf)))
        })
        .await;
        match res {
            Ok(Ok((file, bytes))) => {
                st.file = Some(file);
                st.seeked = true;
                st.remaining -= bytes.len() as u64;
                Some((Ok(bytes), st))
            }
            // The stream ends after an error (file is gone from the state).
            Ok(Err(e)) => Some((Err(e), st)),
            Err(join) => Some((Err(std::io::Error::other(join)), st)),
        }
    })
}

/// A `CompleteMultipartUpload` the fast path can do: everything resolved, nothing done yet.
struct CompletePlan {
    /// `.upload-<id>.json`: who started the upload.
    upload_info: PathBuf,
    /// `.upload_id-<id>.part-<n>`, in part order.
    parts: Vec<PathBuf>,
    /// The 16 bytes of each part's ETag (an MD5 from s3s-fs, or ours from [`new_e_tag`]).
    part_md5s: Vec<[u8; 16]>,
    /// Where the object goes.
    object: PathBuf,
    /// The upload's metadata file, and the object's.
    upload_meta: PathBuf,
    object_meta: PathBuf,
    /// The object's internal info (holds the ETag).
    internal: PathBuf,
    /// Root, for temporary files.
    root: PathBuf,
}

impl FastFs {
    /// The plan for `req` if the fast path handles it, `None` to let s3s-fs do it (and report
    /// any error the way it does).
    fn complete_plan(&self, req: &S3Request<CompleteMultipartUploadInput>) -> Option<CompletePlan> {
        let input = &req.input;
        if input.if_match.is_some() || input.if_none_match.is_some() {
            return None;
        }
        let id = input.upload_id.as_str();
        if !is_canonical_uuid(id) {
            return None;
        }
        let parts = input.multipart_upload.as_ref()?.parts.as_ref()?;
        if parts.is_empty() {
            return None;
        }
        let mut part_files = Vec::with_capacity(parts.len());
        let mut part_md5s = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let n = p.part_number?;
            if usize::try_from(n).ok()? != i + 1 {
                return None;
            }
            let md5 = p.e_tag.as_ref().and_then(|e| parse_md5(e.value()))?;
            part_files.push(self.root.join(format!(".upload_id-{id}.part-{n}")));
            part_md5s.push(md5);
        }
        let object = self.object_path(&input.bucket, &input.key)?;
        let (b, k) = (
            b64url(input.bucket.as_bytes()),
            b64url(input.key.as_bytes()),
        );
        Some(CompletePlan {
            upload_info: self.root.join(format!(".upload-{id}.json")),
            parts: part_files,
            part_md5s,
            object,
            upload_meta: self
                .root
                .join(format!(".bucket-{b}.object-{k}.upload-{id}.metadata.json")),
            object_meta: self
                .root
                .join(format!(".bucket-{b}.object-{k}.metadata.json")),
            internal: self
                .root
                .join(format!(".bucket-{b}.object-{k}.internal.json")),
            root: self.root.clone(),
        })
    }
}

impl CompletePlan {
    /// Does the completion (blocking I/O) and returns the ETag. Mirrors s3s-fs 0.14.1's
    /// `complete_multipart_upload`, minus the MD5 pass over the parts and the user-space copy.
    /// The ETag is S3's multipart form over the part ETags the client sent back (s3s-fs does not
    /// check those against the parts either).
    fn run(self, caller: Option<&str>) -> S3Result<String> {
        let io = |what: &str, e: std::io::Error| {
            S3Error::with_message(S3ErrorCode::InternalError, format!("{what}: {e}"))
        };
        // Only the access key that started the upload may complete it (as s3s-fs).
        check_upload_owner(&self.upload_info, caller)?;
        // `complete_plan` only builds plans with at least one part.
        let last = self.parts.len().saturating_sub(1);
        for (i, p) in self.parts.iter().enumerate() {
            let len = match std::fs::metadata(p) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(S3Error::with_message(
                        S3ErrorCode::InvalidPart,
                        format!("part {} was not uploaded", i + 1),
                    ));
                }
                Err(e) => return Err(io("part metadata", e)),
            };
            if i != last && len < 5 * 1024 * 1024 {
                return Err(S3Error::new(S3ErrorCode::EntityTooSmall));
            }
        }
        let _ = std::fs::remove_file(&self.upload_info);
        if self.upload_meta.exists() {
            std::fs::rename(&self.upload_meta, &self.object_meta)
                .map_err(|e| io("moving upload metadata", e))?;
        }
        // Concatenate into a temporary file (named so s3s-fs's startup sweep removes leftovers),
        // then rename it into place.
        let tmp = self.root.join(format!(
            ".tmp.fedmq-{:016x}.internal.part",
            rand::random::<u64>()
        ));
        let assembled = (|| {
            let mut out = std::fs::File::create(&tmp)?;
            for p in &self.parts {
                std::io::copy(&mut std::fs::File::open(p)?, &mut out)?;
            }
            if let Some(dir) = self.object.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::rename(&tmp, &self.object)
        })();
        if let Err(e) = assembled {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("assembling the object", e));
        }
        for p in &self.parts {
            let _ = std::fs::remove_file(p);
        }
        let mut md5 = Md5::new();
        for m in &self.part_md5s {
            md5.update(m);
        }
        let e_tag = format!("{}-{}", hex::encode(md5.finalize()), self.part_md5s.len());
        // The ETag lives in the object's internal info, which may hold other fields.
        let mut info: serde_json::Map<String, serde_json::Value> = std::fs::read(&self.internal)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        info.insert("e_tag".into(), serde_json::Value::String(e_tag.clone()));
        let tmp = self.root.join(format!(
            ".tmp.fedmq-{:016x}.internal.part",
            rand::random::<u64>()
        ));
        let bytes = serde_json::to_vec(&info)
            .map_err(|e| S3Error::with_message(S3ErrorCode::InternalError, e.to_string()))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &self.internal))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io("writing the object's internal info", e)
            })?;
        Ok(e_tag)
    }
}

/// `8-4-4-4-12` lowercase hex, the form s3s-fs formats upload ids in (so our file names match).
fn is_canonical_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// The 16 bytes of an MD5-shaped ETag value (32 hex digits, quotes tolerated).
fn parse_md5(etag: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(etag.trim_matches('"'), &mut out).ok()?;
    Some(out)
}

/// Base64, URL-safe alphabet, no padding (s3s-fs's encoding of bucket and key in file names).
fn b64url(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = S3Result<S3Response<T>>> + Send + 'a>>;

/// Forwards operations to s3s-fs unchanged. (The signatures are what `#[async_trait]` expands
/// the `S3` trait's methods to; we do not depend on the `async-trait` crate.)
macro_rules! delegate {
    ($($name:ident($input:ty) -> $output:ty;)*) => {$(
        fn $name<'life0, 'async_trait>(
            &'life0 self,
            req: S3Request<$input>,
        ) -> BoxFut<'async_trait, $output>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            self.inner.$name(req)
        }
    )*};
}

impl S3 for FastFs {
    // Deletes are s3s-fs's, followed by removing the object's side files, which s3s-fs 0.14.1
    // leaves behind (two files per deleted object, forever).
    fn delete_object<'life0, 'async_trait>(
        &'life0 self,
        req: S3Request<DeleteObjectInput>,
    ) -> BoxFut<'async_trait, DeleteObjectOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
            let out = self.inner.delete_object(req).await?;
            self.remove_side_files(&bucket, &key).await;
            Ok(out)
        })
    }

    fn delete_objects<'life0, 'async_trait>(
        &'life0 self,
        req: S3Request<DeleteObjectsInput>,
    ) -> BoxFut<'async_trait, DeleteObjectsOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let bucket = req.input.bucket.clone();
            let out = self.inner.delete_objects(req).await?;
            for d in out.output.deleted.iter().flatten() {
                if let Some(key) = &d.key {
                    self.remove_side_files(&bucket, key).await;
                }
            }
            Ok(out)
        })
    }

    delegate! {
        create_bucket(CreateBucketInput) -> CreateBucketOutput;
        copy_object(CopyObjectInput) -> CopyObjectOutput;
        delete_bucket(DeleteBucketInput) -> DeleteBucketOutput;
        get_bucket_location(GetBucketLocationInput) -> GetBucketLocationOutput;
        head_bucket(HeadBucketInput) -> HeadBucketOutput;
        head_object(HeadObjectInput) -> HeadObjectOutput;
        list_buckets(ListBucketsInput) -> ListBucketsOutput;
        list_objects(ListObjectsInput) -> ListObjectsOutput;
        list_objects_v2(ListObjectsV2Input) -> ListObjectsV2Output;
        create_multipart_upload(CreateMultipartUploadInput) -> CreateMultipartUploadOutput;
        upload_part_copy(UploadPartCopyInput) -> UploadPartCopyOutput;
        list_parts(ListPartsInput) -> ListPartsOutput;
        abort_multipart_upload(AbortMultipartUploadInput) -> AbortMultipartUploadOutput;
    }

    fn put_object<'life0, 'async_trait>(
        &'life0 self,
        mut req: S3Request<PutObjectInput>,
    ) -> BoxFut<'async_trait, PutObjectOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            match self.put_plan(&mut req) {
                Some(plan) => self.fast_put(plan).await,
                None => self.inner.put_object(req).await,
            }
        })
    }

    fn upload_part<'life0, 'async_trait>(
        &'life0 self,
        req: S3Request<UploadPartInput>,
    ) -> BoxFut<'async_trait, UploadPartOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            match self.part_path(&req) {
                Some(part) => self.fast_upload_part(req, part).await,
                None => self.inner.upload_part(req).await,
            }
        })
    }

    fn complete_multipart_upload<'life0, 'async_trait>(
        &'life0 self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> BoxFut<'async_trait, CompleteMultipartUploadOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let Some(plan) = self.fast.then(|| self.complete_plan(&req)).flatten() else {
                return self.inner.complete_multipart_upload(req).await;
            };
            let caller = req.credentials.as_ref().map(|c| c.access_key.clone());
            let CompleteMultipartUploadInput { bucket, key, .. } = req.input;
            let e_tag = tokio::task::spawn_blocking(move || plan.run(caller.as_deref()))
                .await
                .map_err(S3Error::internal_error)??;
            Ok(S3Response::new(CompleteMultipartUploadOutput {
                bucket: Some(bucket),
                key: Some(key),
                e_tag: Some(ETag::Strong(e_tag)),
                ..Default::default()
            }))
        })
    }

    fn get_object<'life0, 'async_trait>(
        &'life0 self,
        req: S3Request<GetObjectInput>,
    ) -> BoxFut<'async_trait, GetObjectOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let path = self
                .fast
                .then(|| self.object_path(&req.input.bucket, &req.input.key))
                .flatten();
            let mut resp = self.inner.get_object(req).await?;
            let Some(path) = path else {
                return Ok(resp);
            };
            let Some((start, len, size)) = body_range(&resp.output) else {
                return Ok(resp);
            };
            let opened = tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&path)?;
                let actual = file.metadata()?.len();
                Ok::<_, std::io::Error>((file, actual))
            })
            .await;
            if let Ok(Ok((file, actual))) = opened {
                if actual == size {
                    resp.output.body = Some(StreamingBlob::wrap(chunked_body(file, start, len)));
                }
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_range_parses_content_range() {
        let out = GetObjectOutput {
            content_length: Some(10),
            content_range: Some("bytes 5-14/100".into()),
            ..Default::default()
        };
        assert_eq!(body_range(&out), Some((5, 10, 100)));
        let out = GetObjectOutput {
            content_length: Some(7),
            ..Default::default()
        };
        assert_eq!(body_range(&out), Some((0, 7, 7)));
    }

    #[test]
    fn b64url_matches_rfc4648_without_padding() {
        // RFC 4648 test vectors, padding removed; '+' and '/' become '-' and '_'.
        for (i, o) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64url(i.as_bytes()), o);
        }
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn upload_ids_and_etags() {
        assert!(is_canonical_uuid("67e55044-10b1-426f-9247-bb680e5fe0c8"));
        assert!(!is_canonical_uuid("67E55044-10B1-426F-9247-BB680E5FE0C8"));
        assert!(!is_canonical_uuid(
            "../../etc/passwd-aaaaaaaaaaaaaaaaaaaaaa"
        ));
        assert_eq!(
            parse_md5("\"d41d8cd98f00b204e9800998ecf8427e\""),
            Some([
                0xd4, 0x1d, 0x8c, 0xd9, 0x8f, 0x00, 0xb2, 0x04, 0xe9, 0x80, 0x09, 0x98, 0xec, 0xf8,
                0x42, 0x7e
            ])
        );
        assert_eq!(parse_md5("abc-2"), None);
    }

    #[test]
    fn content_md5_decodes_standard_base64() {
        for (enc, dec) in [
            ("", &b""[..]),
            ("Zg==", b"f"),
            ("Zm8=", b"fo"),
            ("Zm9v", b"foo"),
            ("Zm9vYmFy", b"foobar"),
            ("+/8=", &[0xfb, 0xff]),
        ] {
            assert_eq!(decode_content_md5(enc).ok().as_deref(), Some(dec), "{enc}");
        }
        // The MD5 of nothing, as a client sends it.
        assert_eq!(
            decode_content_md5("1B2M2Y8AsgTpgAmY7PhCfg==").ok(),
            parse_md5("d41d8cd98f00b204e9800998ecf8427e").map(|m| m.to_vec())
        );
        for bad in ["Zg", "Zg=a", "Z===", "Zg==Zg==", "-_8=", "not base64!"] {
            assert!(decode_content_md5(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn e_tags_are_md5_shaped_and_unique() {
        let tags: Vec<String> = (0..1000).map(|_| new_e_tag()).collect();
        for t in &tags {
            assert!(parse_md5(t).is_some(), "{t}");
            assert_eq!(t.len(), 32);
            assert!(t.bytes().all(|c| !c.is_ascii_uppercase()), "{t}");
        }
        let mut unique = tags.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), tags.len());
    }

    #[test]
    fn write_paths_stay_inside_the_bucket() {
        let dir = tempfile_dir();
        let fs = FastFs::new(&dir).unwrap();
        let root = fs.root.clone();
        assert_eq!(
            fs.write_path("b", "a/b/c"),
            Some(root.join("b").join("a").join("b").join("c"))
        );
        for (bucket, key) in [
            ("b", "../x"),
            ("b", "a/../../x"),
            ("b", "a/./x"),
            ("b", "/x"),
            ("b", ""),
            ("b", "dir/"),
            ("b", "."),
            ("..", "x"),
            (".", "x"),
            ("a/b", "x"),
            ("/b", "x"),
            ("", "x"),
        ] {
            assert_eq!(fs.write_path(bucket, key), None, "{bucket:?} {key:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tmp_files_are_removed_unless_persisted() {
        let dir = tempfile_dir();
        let mut t = TmpFile::create(&dir).unwrap();
        t.write_chunks(&[
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"c"),
        ])
        .unwrap();
        let tmp = t.path.clone().unwrap_or_default();
        assert!(tmp.exists());
        drop(t);
        assert!(!tmp.exists());
        let mut t = TmpFile::create(&dir).unwrap();
        t.write_chunks(&[Bytes::from_static(b"abc")]).unwrap();
        let dest = dir.join("new").join("dir").join("obj");
        t.persist(&dest).unwrap();
        assert_eq!(std::fs::read(&dest).ok().as_deref(), Some(&b"abc"[..]));
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert_eq!(left, vec![std::ffi::OsString::from("new")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fresh empty directory (no `tempfile` in the library's dependencies).
    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fedmq-fastfs-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
