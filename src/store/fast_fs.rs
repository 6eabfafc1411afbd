//! [`FastFs`]: s3s-fs's [`FileSystem`] with a faster `GetObject` body.
//!
//! s3s-fs 0.14.1 streams object bodies with `ReaderStream::with_capacity(tokio::fs::File, 4096)`:
//! every 4 KiB of a download is one `spawn_blocking` round trip plus one 4 KiB frame through hyper,
//! which caps GETs of large blobs at a few hundred MiB/s on loopback. `FastFs` delegates every
//! operation to s3s-fs unchanged (so metadata, ETags and error behaviour stay s3s-fs's) and only
//! replaces the body of a successful `GetObject` with a stream that reads the same byte range in
//! [`READ_CHUNK`] blocks.
//!
//! Design: the replacement opens the object file a second time. It is used only when that file has
//! exactly the length s3s-fs reported (guards against a concurrent overwrite between the two opens)
//! and the key has no `..` component (s3s-fs resolves those virtually; we would not). Otherwise the
//! s3s-fs body is kept. Set `FEDMQ_STORE_PLAIN_GET=1` to always keep it (for A/B benchmarks).

use super::error::{Error, Result};
use bytes::Bytes;
use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result, S3};
use s3s_fs::FileSystem;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;

/// Size of one read (and one HTTP body frame) of a `GetObject` body.
pub const READ_CHUNK: usize = 1 << 20;

/// s3s-fs with the faster `GetObject` body; see the module docs.
#[derive(Debug)]
pub struct FastFs {
    /// Does all the S3 work.
    inner: FileSystem,
    /// The same root s3s-fs uses (absolute, canonical), to find object files.
    root: PathBuf,
    /// False when `FEDMQ_STORE_PLAIN_GET` is set: keep s3s-fs's own bodies.
    fast_get: bool,
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
        let fast_get = std::env::var_os("FEDMQ_STORE_PLAIN_GET").is_none_or(|v| v.is_empty());
        Ok(Self {
            inner,
            root,
            fast_get,
        })
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
    delegate! {
        create_bucket(CreateBucketInput) -> CreateBucketOutput;
        copy_object(CopyObjectInput) -> CopyObjectOutput;
        delete_bucket(DeleteBucketInput) -> DeleteBucketOutput;
        delete_object(DeleteObjectInput) -> DeleteObjectOutput;
        delete_objects(DeleteObjectsInput) -> DeleteObjectsOutput;
        get_bucket_location(GetBucketLocationInput) -> GetBucketLocationOutput;
        head_bucket(HeadBucketInput) -> HeadBucketOutput;
        head_object(HeadObjectInput) -> HeadObjectOutput;
        list_buckets(ListBucketsInput) -> ListBucketsOutput;
        list_objects(ListObjectsInput) -> ListObjectsOutput;
        list_objects_v2(ListObjectsV2Input) -> ListObjectsV2Output;
        put_object(PutObjectInput) -> PutObjectOutput;
        create_multipart_upload(CreateMultipartUploadInput) -> CreateMultipartUploadOutput;
        upload_part(UploadPartInput) -> UploadPartOutput;
        upload_part_copy(UploadPartCopyInput) -> UploadPartCopyOutput;
        list_parts(ListPartsInput) -> ListPartsOutput;
        complete_multipart_upload(CompleteMultipartUploadInput) -> CompleteMultipartUploadOutput;
        abort_multipart_upload(AbortMultipartUploadInput) -> AbortMultipartUploadOutput;
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
                .fast_get
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
}
