//! Blob store tests against a real S3 server over HTTP: the embedded store (s3s + fedmq's `ObjectStore`, SigV4)
//! on a free 127.0.0.1 port, always; and an external S3 store (MinIO, Garage, AWS, ...) when
//! `FEDMQ_TEST_S3_ENDPOINT` is set, in the style of object_store's `maybe_skip_integration!`:
//!
//! ```text
//! FEDMQ_TEST_S3_ENDPOINT=http://127.0.0.1:9000 FEDMQ_TEST_S3_AKI=minioadmin \
//! FEDMQ_TEST_S3_SAK=minioadmin [FEDMQ_TEST_S3_BUCKET=fedmq-test] [FEDMQ_TEST_S3_REGION=us-east-1] \
//!   cargo test --test store
//! ```
//!
//! Unset: the external tests pass as skipped (with a note on stderr). Set: they must pass; missing
//! keys or an unreachable endpoint fail them. No mocks: the S3 protocol is what is tested.

use anyhow::{Context, Result};
use bytes::Bytes;
use fedmq::proto::{BlobKeys, BlobRef};
use fedmq::store::{
    BlobStore, EmbeddedStore, Error, RetentionPolicy, S3Options, StoreOptions, MIB,
};
use rand::RngCore;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

const AK: &str = "test-access";
const SK: &str = "test-secret-0123456789";
const BUCKET: &str = "fedmq-test";

/// An embedded store on a free port over a temporary directory.
struct Embedded {
    dir: tempfile::TempDir,
    store: EmbeddedStore,
}

impl Embedded {
    async fn start() -> Result<Self> {
        Self::start_with_cache(fedmq::store::DEFAULT_CACHE_BYTES).await
    }

    /// A store whose object cache holds `cache_bytes` (0: every GET reads the disk).
    async fn start_with_cache(cache_bytes: usize) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::start(StoreOptions {
            cache_bytes,
            ..StoreOptions::new(dir.path().join("data"), AK, SK)
        })
        .await
        .context("starting the embedded store")?;
        Ok(Self { dir, store })
    }

    /// Options with small timeouts so failures are quick.
    fn options(&self) -> S3Options {
        S3Options {
            endpoint: self.store.endpoint(),
            access_key: AK.into(),
            secret_key: SK.into(),
            bucket: BUCKET.into(),
            ..test_options()
        }
    }

    async fn blobs(&self) -> Result<BlobStore> {
        let b = BlobStore::connect(&self.options())?;
        b.ensure_bucket().await?;
        Ok(b)
    }

    /// The files of bucket `BUCKET` (one per object).
    fn bucket_files(&self) -> Result<Vec<std::path::PathBuf>> {
        let dir = self.dir.path().join("data").join("buckets").join(BUCKET);
        Ok(std::fs::read_dir(dir)?
            .filter_map(|d| d.ok())
            .map(|d| d.path())
            .collect())
    }

    /// The file that holds `key`: named by the SHA-256 of the key and a version.
    fn object_file(&self, key: &str) -> Result<std::path::PathBuf> {
        use sha2::Digest as _;
        let prefix = format!("{}.", hex::encode(sha2::Sha256::digest(key.as_bytes())));
        let mut found: Vec<_> = self
            .bucket_files()?
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .collect();
        anyhow::ensure!(found.len() == 1, "{key}: files {found:?}");
        Ok(found.remove(0))
    }
}

fn test_options() -> S3Options {
    S3Options {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(20),
        attempt_timeout: Duration::from_secs(30),
        operation_timeout: Duration::from_secs(60),
        list_page_size: 4,
        ..S3Options::default()
    }
}

/// The external store from the environment: `None` (skip) when `FEDMQ_TEST_S3_ENDPOINT` is unset;
/// panics (fails the test) when it is set but its keys are missing.
fn external_options() -> Option<S3Options> {
    let endpoint = std::env::var("FEDMQ_TEST_S3_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty());
    let Some(endpoint) = endpoint else {
        eprintln!("skipping: FEDMQ_TEST_S3_ENDPOINT is not set (external S3 conformance)");
        return None;
    };
    let var = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
    };
    let access_key = var(&["FEDMQ_TEST_S3_AKI", "FEDMQ_S3_AKI"])
        .expect("FEDMQ_TEST_S3_ENDPOINT is set but FEDMQ_TEST_S3_AKI (or FEDMQ_S3_AKI) is not");
    let secret_key = var(&["FEDMQ_TEST_S3_SAK", "FEDMQ_S3_SAK"])
        .expect("FEDMQ_TEST_S3_ENDPOINT is set but FEDMQ_TEST_S3_SAK (or FEDMQ_S3_SAK) is not");
    Some(S3Options {
        endpoint,
        access_key,
        secret_key,
        bucket: var(&["FEDMQ_TEST_S3_BUCKET"]).unwrap_or_else(|| BUCKET.into()),
        region: var(&["FEDMQ_TEST_S3_REGION"]).unwrap_or_else(|| "us-east-1".into()),
        max_attempts: 3,
        ..test_options()
    })
}

fn random_bytes(n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    Bytes::from(v)
}

fn unique_prefix() -> String {
    format!("fedmq-test/{:016x}", rand::random::<u64>())
}

// ---------------------------------------------------------------------------------------------
// The conformance suite: the same checks against any S3 endpoint.
// ---------------------------------------------------------------------------------------------

/// Put/get round trips (empty, 1 KiB, 64 MiB multipart), concurrent clones, overwrite.
async fn suite_round_trips(blobs: &BlobStore, prefix: &str) -> Result<()> {
    for (name, len) in [("empty", 0), ("1kib", 1024), ("64mib", 64 * MIB)] {
        let key = format!("{prefix}/rt/{name}");
        let data = random_bytes(len);
        let r = blobs.put(&key, data.clone()).await?;
        assert_eq!(r.key, key);
        assert_eq!(r.len, len as u64);
        assert_eq!(r.sha256, fedmq::tensor::Digest::of_bytes(&data).to_hex());
        assert_eq!(r.sha256.len(), 64);
        let got = blobs.get(&r).await?;
        assert_eq!(got.len(), len, "{name}");
        assert!(got == data, "{name}: bytes differ");
        assert_eq!(blobs.head(&key).await?, len as u64);
    }

    // Clones share the client; transfers run concurrently.
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let b = blobs.clone();
            let key = format!("{prefix}/rt/concurrent-{i}");
            tokio::spawn(async move {
                let data = random_bytes(MIB + i * 4096);
                let r = b.put(&key, data.clone()).await?;
                anyhow::ensure!(b.get(&r).await? == data, "concurrent blob {i} differs");
                Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }

    // Overwrite: the new reference reads back, the old one no longer verifies.
    let key = format!("{prefix}/rt/overwrite");
    let old = blobs.put(&key, random_bytes(2048)).await?;
    let new = blobs.put(&key, random_bytes(2048)).await?;
    assert_eq!(blobs.get(&new).await?.len(), 2048);
    assert!(matches!(blobs.get(&old).await, Err(Error::Digest { .. })));
    Ok(())
}

/// Missing keys, wrong digests and wrong lengths are errors naming the key; no bytes leak.
async fn suite_integrity(blobs: &BlobStore, prefix: &str) -> Result<()> {
    let missing = format!("{prefix}/nope/missing");
    let r = BlobRef {
        key: missing.clone(),
        len: 10,
        sha256: "0".repeat(64),
        wrapped_key: None,
    };
    match blobs.get(&r).await {
        Err(Error::NotFound { key, .. }) => assert_eq!(key, missing),
        other => panic!("expected NotFound, got {other:?}"),
    }
    let e = blobs.head(&missing).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(e.to_string().contains(&missing), "{e}");

    for len in [1000usize, 20 * MIB] {
        let key = format!("{prefix}/integrity/{len}");
        let good = blobs.put(&key, random_bytes(len)).await?;
        // Wrong digest.
        let bad = BlobRef {
            sha256: "ab".repeat(32),
            ..good.clone()
        };
        match blobs.get(&bad).await {
            Err(Error::Digest {
                key: k,
                expected,
                got,
            }) => {
                assert_eq!(k, key);
                assert_eq!(expected, bad.sha256);
                assert_eq!(got, good.sha256);
            }
            other => panic!("expected Digest, got {other:?}"),
        }
        // Wrong length, shorter and longer than the object.
        for wrong in [good.len - 1, good.len + 1] {
            let bad = BlobRef {
                len: wrong,
                ..good.clone()
            };
            match blobs.get(&bad).await {
                Err(Error::Length {
                    key: k,
                    expected,
                    got,
                }) => {
                    assert_eq!((k.as_str(), expected, got), (key.as_str(), wrong, good.len));
                }
                other => panic!("expected Length for len {wrong}, got {other:?}"),
            }
        }
        // Malformed digest.
        let bad = BlobRef {
            sha256: "xyz".into(),
            ..good.clone()
        };
        assert!(matches!(
            blobs.get(&bad).await,
            Err(Error::InvalidBlobRef { .. })
        ));
    }
    Ok(())
}

/// `delete`, `delete_prefix`, `delete_rounds_before` and retention remove exactly the right keys.
async fn suite_deletes(blobs: &BlobStore, prefix: &str) -> Result<()> {
    let keys = BlobKeys::new(&format!("{prefix}/models"), "run-1");
    let other_run = BlobKeys::new(&format!("{prefix}/models"), "run-10");
    let small = Bytes::from_static(b"w");
    let mut all = Vec::new();
    for round in 0..5 {
        all.push(keys.global(round));
        all.push(keys.update(round, "c1"));
        all.push(keys.update(round, "c2"));
        all.push(other_run.global(round));
    }
    all.push(keys.checkpoint(1));
    all.push(keys.final_model());
    for k in &all {
        blobs.put(k, small.clone()).await?;
    }
    let listed =
        |v: Vec<fedmq::store::ObjectMeta>| v.into_iter().map(|o| o.key).collect::<Vec<_>>();

    // Rounds 0 and 1 of run-1 go (6 keys); run-10, checkpoints and the final model stay.
    assert_eq!(blobs.delete_rounds_before(&keys, 2).await?, 6);
    let left = listed(blobs.list(&keys.run_prefix()).await?);
    let mut expect: Vec<String> = (2..5)
        .flat_map(|r| [keys.global(r), keys.update(r, "c1"), keys.update(r, "c2")])
        .chain([keys.checkpoint(1), keys.final_model()])
        .collect();
    expect.sort();
    assert_eq!(left, expect);
    assert_eq!(blobs.list(&other_run.run_prefix()).await?.len(), 5);

    // Retention: keep the last 2 rounds after round 4 → round 2 goes.
    let keep2 = RetentionPolicy::KeepLast(NonZeroU64::new(2).unwrap_or(NonZeroU64::MIN));
    assert_eq!(blobs.apply_retention(&keys, keep2, 4).await?, 3);
    assert_eq!(
        blobs
            .apply_retention(&keys, RetentionPolicy::KeepAll, 4)
            .await?,
        0
    );
    assert!(blobs.list(&keys.round_prefix(2)).await?.is_empty());
    assert_eq!(blobs.list(&keys.round_prefix(3)).await?.len(), 3);

    // A prefix delete takes one round and nothing else ("r000003/" does not match "r000030").
    assert_eq!(blobs.delete_prefix(&keys.round_prefix(3)).await?, 3);
    assert_eq!(blobs.list(&keys.round_prefix(4)).await?.len(), 3);
    assert!(matches!(
        blobs.delete_prefix("").await,
        Err(Error::InvalidOptions { .. })
    ));

    // Single delete, idempotent.
    blobs.delete(&keys.final_model()).await?;
    blobs.delete(&keys.final_model()).await?;
    assert!(matches!(
        blobs.head(&keys.final_model()).await,
        Err(Error::NotFound { .. })
    ));

    // Everything left (run-1 round 4, its checkpoint, run-10): the tests use 4-key list pages,
    // so listing and deleting paginate.
    assert_eq!(blobs.options().list_page_size, 4);
    assert_eq!(blobs.list(prefix).await?.len(), 3 + 1 + 5);
    assert_eq!(blobs.delete_prefix(prefix).await?, 3 + 1 + 5);
    assert!(blobs.list(prefix).await?.is_empty());
    Ok(())
}

async fn run_suite(blobs: &BlobStore) -> Result<()> {
    let prefix = unique_prefix();
    let result = async {
        suite_round_trips(blobs, &prefix)
            .await
            .context("round trips")?;
        suite_integrity(blobs, &prefix).await.context("integrity")?;
        blobs.delete_prefix(&prefix).await?;
        suite_deletes(blobs, &prefix).await.context("deletes")?;
        Ok(())
    }
    .await;
    // Leave an external bucket clean even when a check failed.
    let _ = blobs.delete_prefix(&prefix).await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_conformance() -> Result<()> {
    let e = Embedded::start().await?;
    let blobs = e.blobs().await?;
    // ensure_bucket is idempotent.
    blobs.ensure_bucket().await?;
    run_suite(&blobs).await?;
    e.store.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_conformance() -> Result<()> {
    let Some(opts) = external_options() else {
        return Ok(());
    };
    let blobs = BlobStore::connect(&opts)?;
    blobs.ensure_bucket().await.with_context(|| {
        format!(
            "FEDMQ_TEST_S3_ENDPOINT={} is set but unusable",
            opts.endpoint
        )
    })?;
    run_suite(&blobs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_wrong_secret_is_auth_error() -> Result<()> {
    let Some(opts) = external_options() else {
        return Ok(());
    };
    let blobs = BlobStore::connect(&S3Options {
        secret_key: format!("{}-wrong", opts.secret_key),
        ..opts
    })?;
    let e = blobs
        .put("fedmq-test/auth", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Embedded-only: behaviour that needs control over the server or its disk.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_or_access_key_is_auth_error_naming_the_config_keys() -> Result<()> {
    let e = Embedded::start().await?;
    let good = e.blobs().await?;
    let r = good.put("k", Bytes::from_static(b"secret bytes")).await?;
    for opts in [
        S3Options {
            secret_key: "not-the-secret".into(),
            ..e.options()
        },
        S3Options {
            access_key: "not-the-access-key".into(),
            ..e.options()
        },
    ] {
        let bad = BlobStore::connect(&opts)?;
        for err in [
            bad.put("k2", Bytes::from_static(b"x")).await.unwrap_err(),
            bad.get(&r).await.unwrap_err(),
            bad.head("k").await.unwrap_err(),
            bad.ensure_bucket().await.unwrap_err(),
        ] {
            let Error::Auth { endpoint, code, .. } = &err else {
                panic!("expected Auth, got {err:?}");
            };
            assert_eq!(endpoint, &e.store.endpoint());
            assert!(!code.is_empty());
            let msg = err.to_string();
            for needle in [
                "comm_args.customized_training_s3_config.CN_S3_AKI",
                "CN_S3_SAK",
                "FEDMQ_S3_AKI",
                "FEDMQ_S3_SAK",
            ] {
                assert!(msg.contains(needle), "{needle} missing from: {msg}");
            }
        }
    }
    // The bad writer wrote nothing.
    assert!(matches!(good.head("k2").await, Err(Error::NotFound { .. })));
    Ok(())
}

/// Least privilege: a participant's own credential (derived from the store's secret, as
/// `fedmq keys -c` writes it) writes only its own updates and reads only the global models,
/// the final model and its own updates. Another client's update, the global model, listings,
/// deletes and copies are refused with `AccessDenied`, and what was refused is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_credential_cannot_write_another_clients_prefix() -> Result<()> {
    use fedmq::store::access::StoreCredential;
    let e = Embedded::start().await?;
    let admin = e.blobs().await?;
    let keys = BlobKeys::new("fedmq", "run-1");
    let as_client = |id: &str| -> Result<BlobStore> {
        let c = StoreCredential::for_participant(SK, id);
        Ok(BlobStore::connect(&S3Options {
            access_key: c.access_key,
            secret_key: c.secret_key,
            ..e.options()
        })?)
    };
    let (one, two) = (as_client("client-1")?, as_client("client-2")?);
    let global = admin.put(&keys.global(1), random_bytes(1000)).await?;
    let theirs_bytes = random_bytes(2000);
    let theirs = two
        .put(&keys.update(1, "client-2"), theirs_bytes.clone())
        .await?;

    // Its own update, small and multipart, and reading back what it may read.
    let mine = one
        .put(&keys.update(1, "client-1"), random_bytes(3000))
        .await?;
    let big = random_bytes(2 * one.options().part_size + 7);
    let mine_big = one.put(&keys.update(2, "client-1"), big.clone()).await?;
    assert!(one.get(&mine_big).await? == big);
    one.get(&mine).await?;
    one.get(&global).await?;
    one.ensure_bucket().await?;

    // Everything else is refused, naming the request.
    fn denied<T>(r: std::result::Result<T, Error>, what: &str) {
        match r {
            Err(Error::Denied { .. }) => {}
            Err(other) => panic!("{what}: expected Denied, got {other}"),
            Ok(_) => panic!("{what}: allowed"),
        }
    }
    denied(
        one.put(&keys.update(1, "client-2"), random_bytes(10)).await,
        "overwrite another client's update",
    );
    denied(
        one.put(&keys.update(3, "client-2"), big.clone()).await,
        "multipart into another client's update",
    );
    denied(
        one.put(&keys.update(1, "client-10"), random_bytes(10))
            .await,
        "a longer id",
    );
    denied(
        one.put(&keys.global(2), random_bytes(10)).await,
        "write a global model",
    );
    denied(
        one.put(&keys.checkpoint(1), random_bytes(10)).await,
        "write a checkpoint",
    );
    denied(one.get(&theirs).await, "read another client's update");
    denied(one.delete(&keys.update(1, "client-2")).await, "delete");
    denied(
        one.delete(&keys.update(1, "client-1")).await,
        "delete its own",
    );
    denied(one.list(&keys.run_prefix()).await, "list");
    let err = one.put("../btwo/k", random_bytes(1)).await.unwrap_err();
    assert!(matches!(err, Error::Denied { .. }), "{err}");
    // Through the SDK: copying another's update over its own, and a batch delete.
    let sdk = sdk_client_as(
        &e,
        "client-1",
        &StoreCredential::for_participant(SK, "client-1").secret_key,
    );
    let copy = sdk
        .copy_object()
        .bucket(BUCKET)
        .key(keys.update(4, "client-1"))
        .copy_source(format!("{BUCKET}/{}", keys.update(1, "client-2")))
        .send()
        .await
        .unwrap_err();
    assert_eq!(s3_code(&copy), "AccessDenied");
    let batch = sdk
        .delete_objects()
        .bucket(BUCKET)
        .delete(
            aws_sdk_s3::types::Delete::builder()
                .objects(
                    aws_sdk_s3::types::ObjectIdentifier::builder()
                        .key(keys.update(1, "client-2"))
                        .build()?,
                )
                .build()?,
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(s3_code(&batch), "AccessDenied");

    // Signing as client-2 with client-1's secret is a bad signature, not a way in.
    let forged = BlobStore::connect(&S3Options {
        access_key: "client-2".into(),
        secret_key: StoreCredential::for_participant(SK, "client-1").secret_key,
        ..e.options()
    })?;
    let err = forged
        .put(&keys.update(1, "client-2"), random_bytes(10))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");

    // What was refused is intact; the store's own key (the server's) still does everything.
    assert!(admin.get(&theirs).await? == theirs_bytes);
    assert_eq!(admin.list(&keys.run_prefix()).await?.len(), 4);
    admin.delete(&keys.update(1, "client-2")).await?;
    Ok(())
}

/// Bytes changed on the store's disk (a failing disk, a tampering operator) are never served:
/// the store checks every block it reads against the CRC32 it stored, and the file's length,
/// and refuses the object with an error that names it (not retried: the data is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_changed_on_disk_are_refused_by_the_store() -> Result<()> {
    // No cache: every GET reads the disk.
    let e = Embedded::start_with_cache(0).await?;
    let blobs = e.blobs().await?;
    for (key, len) in [
        ("small", 4096usize),
        ("multipart", 12 * MIB),
        ("big", 40 * MIB),
    ] {
        let r = blobs.put(key, random_bytes(len)).await?;
        // Flip one byte of the data in place (same length).
        let path = e.object_file(key)?;
        let mut on_disk = std::fs::read(&path).with_context(|| path.display().to_string())?;
        assert!(on_disk.len() > len, "data and footer");
        on_disk[len / 2] ^= 0xff;
        std::fs::write(&path, &on_disk)?;
        let err = blobs
            .get(&r)
            .await
            .expect_err("a damaged object is refused");
        let text = err.to_string();
        assert!(
            text.contains("changed on disk") && text.contains(key),
            "{key}: {text}"
        );
        assert!(!err.is_transient(), "{key}: {err:?}");
        // Truncated on disk: refused too, not a short read passed off as the object.
        std::fs::write(&path, &on_disk[..on_disk.len() / 2])?;
        let text = blobs.get(&r).await.expect_err("refused").to_string();
        assert!(text.contains("changed on disk"), "{key}: {text}");
    }
    Ok(())
}

/// A blob replaced behind the writer's back (another writer with the same credential, or an
/// S3 server that does not check what it stores) fails the reader's SHA-256 check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_replaced_in_the_store_are_rejected_with_digest_error() -> Result<()> {
    let e = Embedded::start().await?;
    let blobs = e.blobs().await?;
    let s3 = sdk_client(&e);
    for (key, len) in [("small", 4096usize), ("multipart", 12 * MIB)] {
        let r = blobs.put(key, random_bytes(len)).await?;
        let other = random_bytes(len);
        s3.put_object()
            .bucket(BUCKET)
            .key(key)
            .body(other.to_vec().into())
            .send()
            .await?;
        match blobs.get(&r).await {
            Err(Error::Digest {
                key: k,
                expected,
                got,
            }) => {
                assert_eq!(k, key);
                assert_eq!(expected, r.sha256);
                assert_eq!(got, fedmq::tensor::Digest::of_bytes(&other).to_hex());
            }
            other => panic!("expected Digest for {key}, got {other:?}"),
        }
        // Shorter than the reference says: a length error.
        s3.put_object()
            .bucket(BUCKET)
            .key(key)
            .body(other[..len - 1].to_vec().into())
            .send()
            .await?;
        assert!(
            matches!(blobs.get(&r).await, Err(Error::Length { got, .. }) if got == len as u64 - 1),
            "{key}"
        );
    }
    Ok(())
}

/// A multipart object reads back: the bytes, the length, and a multipart ETag (`"<32 hex>-N"`:
/// S3's MD5 of the part ETags; the parts' own ETags are not MD5s of their bytes, see
/// `multipart_etags_are_consistent`) that HEAD reports; no part or temporary file is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_objects_read_back() -> Result<()> {
    let e = Embedded::start().await?;
    let blobs = e.blobs().await?;
    let len = 2 * blobs.options().part_size + 12345;
    let data = random_bytes(len);
    let r = blobs.put("mp/object", data.clone()).await?;
    assert!(blobs.get(&r).await? == data);
    assert_eq!(blobs.list("mp/").await?[0].len, len as u64);

    let parts = data.chunks(blobs.options().part_size).count();
    let creds = aws_sdk_s3::config::Credentials::new(AK, SK, None, None, "test");
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(e.store.endpoint())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .force_path_style(true)
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .build(),
    );
    let head = client
        .head_object()
        .bucket(BUCKET)
        .key("mp/object")
        .send()
        .await?;
    assert!(
        is_hex_etag(head.e_tag().unwrap_or(""), Some(parts)),
        "{:?}",
        head.e_tag()
    );
    assert_eq!(head.content_length(), Some(len as i64));
    assert_eq!(e.bucket_files()?.len(), 1);
    assert_no_leftovers(&e).await
}

/// Deleted objects leave no file behind: one file per object, removed with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_objects_leave_no_files_behind() -> Result<()> {
    let e = Embedded::start().await?;
    let blobs = e.blobs().await?;
    // Single puts, a multipart put, an overwrite, then one delete and a prefix delete.
    blobs.put("gone/one", random_bytes(1000)).await?;
    blobs.put("gone/two", random_bytes(1000)).await?;
    blobs.put("gone/two", random_bytes(1001)).await?;
    let big = 2 * blobs.options().part_size + 7;
    blobs.put("gone/big", random_bytes(big)).await?;
    blobs.put("kept", random_bytes(10)).await?;
    assert_eq!(e.bucket_files()?.len(), 4, "one file per object");
    blobs.delete("gone/one").await?;
    assert_eq!(blobs.delete_prefix("gone/").await?, 2);
    assert_eq!(e.bucket_files()?, vec![e.object_file("kept")?]);
    assert_no_leftovers(&e).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_fails_fast_with_a_hint() -> Result<()> {
    // A port nobody listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let opts = S3Options {
        endpoint: format!("http://127.0.0.1:{port}"),
        access_key: AK.into(),
        secret_key: SK.into(),
        ..test_options()
    };
    let blobs = BlobStore::connect(&opts)?;
    let t = Instant::now();
    let e = blobs.ensure_bucket().await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let Error::Unreachable { endpoint, .. } = &e else {
        panic!("expected Unreachable, got {e:?}");
    };
    assert_eq!(endpoint, &opts.endpoint);
    let msg = e.to_string();
    assert!(
        msg.contains("CN_S3_ENDPOINT") && msg.contains("is the store running"),
        "{msg}"
    );
    assert!(e.is_transient());
    let e = blobs.put("k", Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_endpoint_times_out_instead_of_hanging() -> Result<()> {
    // Accepts connections (the kernel does) but never answers a request.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let opts = S3Options {
        endpoint: format!("http://{}", listener.local_addr()?),
        access_key: AK.into(),
        secret_key: SK.into(),
        read_timeout: Duration::from_millis(300),
        attempt_timeout: Duration::from_millis(600),
        operation_timeout: Duration::from_secs(3),
        ..test_options()
    };
    let blobs = BlobStore::connect(&opts)?;
    let t = Instant::now();
    let e = blobs.head("k").await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(e.is_transient());
    drop(listener);
    Ok(())
}

/// A TCP proxy in front of the store that cuts the first `cuts` responses longer than
/// `after` bytes mid-body, as a flaky network would. Returns its address and the cuts left.
async fn flaky_proxy(
    upstream: std::net::SocketAddr,
    cuts: usize,
    after: usize,
) -> Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let left = std::sync::Arc::new(AtomicUsize::new(cuts));
    let left2 = left.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let left = left2.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                let mut sent = 0usize;
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if sent + n > after
                        && left
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1))
                            .is_ok()
                    {
                        // Forward part of it, then drop both directions.
                        let _ = cw.write_all(&buf[..after.saturating_sub(sent)]).await;
                        up.abort();
                        return;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
                up.abort();
            });
        }
    });
    Ok((addr, left))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_cut_mid_transfer_are_retried() -> Result<()> {
    let e = Embedded::start().await?;
    let direct = e.blobs().await?;
    let small = direct.put("flaky/small", random_bytes(600_000)).await?;
    let large = direct.put("flaky/large", random_bytes(20 * MIB)).await?;
    // Two cuts: the single GET of the small blob and one range of the large one.
    let (proxy, left) = flaky_proxy(e.store.addr(), 2, 200_000).await?;
    let flaky = BlobStore::connect(&S3Options {
        endpoint: format!("http://{proxy}"),
        max_attempts: 3,
        ..e.options()
    })?;
    assert_eq!(flaky.get(&small).await?.len(), 600_000);
    assert_eq!(flaky.get(&large).await?.len(), 20 * MIB);
    assert_eq!(
        left.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no cut happened"
    );
    // Without retries the cut surfaces as a transient transfer error, not as short bytes.
    let (proxy, _) = flaky_proxy(e.store.addr(), 1, 200_000).await?;
    let no_retry = BlobStore::connect(&S3Options {
        endpoint: format!("http://{proxy}"),
        max_attempts: 1,
        ..e.options()
    })?;
    let err = no_retry.get(&small).await.unwrap_err();
    assert!(
        matches!(&err, Error::Transfer { key, .. } if key == "flaky/small"),
        "{err:?}"
    );
    assert!(err.is_transient());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_are_refused_with_the_key_to_fix() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let e = EmbeddedStore::start(StoreOptions::new(dir.path(), AK, ""))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidOptions { .. }), "{e:?}");
    assert!(e.to_string().contains("CN_S3_SAK"), "{e}");
    let e = BlobStore::connect(&S3Options {
        endpoint: "localhost:9000".into(),
        access_key: AK.into(),
        secret_key: SK.into(),
        ..S3Options::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("CN_S3_ENDPOINT"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_serving_and_data_survives_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = StoreOptions::new(dir.path().join("nested/data"), AK, SK);
    let store = EmbeddedStore::start(opts.clone()).await?;
    let addr = store.addr();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    let s3 = S3Options {
        endpoint: store.endpoint(),
        access_key: AK.into(),
        secret_key: SK.into(),
        ..test_options()
    };
    let blobs = BlobStore::connect(&s3)?;
    blobs.ensure_bucket().await?;
    let r = blobs.put("persist", random_bytes(10_000)).await?;
    let t = Instant::now();
    store.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    // Same directory, same port: the blob is still there.
    let store = EmbeddedStore::start(StoreOptions {
        listen: addr,
        ..opts
    })
    .await?;
    let blobs = BlobStore::connect(&s3)?;
    assert_eq!(blobs.get(&r).await?.len(), 10_000);
    store.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The embedded store through the S3 API (aws-sdk-s3 directly): what it writes reads back through
// GET, HEAD and LIST; what it refuses leaves nothing behind; keys are opaque.
// ---------------------------------------------------------------------------------------------

/// An aws-sdk-s3 client for the embedded store, with the SDK's own checksums off as in
/// `BlobStore` (so requests carry only the checksums a test sets).
fn sdk_client(e: &Embedded) -> aws_sdk_s3::Client {
    sdk_client_as(e, AK, SK)
}

/// [`sdk_client`] signing with `access_key`/`secret_key`.
fn sdk_client_as(e: &Embedded, access_key: &str, secret_key: &str) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
    let creds = aws_sdk_s3::config::Credentials::new(access_key, secret_key, None, None, "test");
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(e.store.endpoint())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .build(),
    )
}

/// The S3 error code of a failed SDK call.
fn s3_code<E, R>(err: &aws_sdk_s3::error::SdkError<E, R>) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata,
{
    err.as_service_error()
        .and_then(|e| e.code())
        .unwrap_or("<not a service error>")
        .to_string()
}

/// `"<32 lowercase hex digits>"`, optionally followed by `-N` inside the quotes.
fn is_hex_etag(etag: &str, parts: Option<usize>) -> bool {
    let Some(inner) = etag.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return false;
    };
    let (hex, suffix) = match parts {
        Some(n) => match inner.split_once('-') {
            Some((h, s)) if s == n.to_string() => (h, ""),
            _ => return false,
        },
        None => (inner, ""),
    };
    suffix.is_empty()
        && hex.len() == 32
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Standard base64 with padding (for `Content-MD5`).
fn base64(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Temporary files and multipart uploads left in the store.
fn store_leftovers(e: &Embedded) -> Result<Vec<String>> {
    let mut left = Vec::new();
    for dir in ["tmp", "uploads"] {
        for d in std::fs::read_dir(e.dir.path().join("data").join(dir))?.flatten() {
            left.push(format!("{dir}/{}", d.file_name().to_string_lossy()));
        }
    }
    Ok(left)
}

/// Waits up to 5 s for the store's root to hold no temporary or upload files.
async fn assert_no_leftovers(e: &Embedded) -> Result<()> {
    let t = Instant::now();
    loop {
        let left = store_leftovers(e)?;
        if left.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(5),
            "left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_objects_read_back() -> Result<()> {
    let e = Embedded::start().await?;
    let blobs = e.blobs().await?;
    let s3 = sdk_client(&e);
    // Single PutObjects (7 MiB is under the 8 MiB part size): BlobStore round trips.
    for (name, len) in [("empty", 0), ("1kib", 1024), ("7mib", 7 * MIB)] {
        assert!(len < blobs.options().part_size);
        let key = format!("fast/{name}");
        let data = random_bytes(len);
        let r = blobs.put(&key, data.clone()).await?;
        assert!(blobs.get(&r).await? == data, "{name}: bytes differ");
        assert_eq!(blobs.head(&key).await?, len as u64, "{name}");
        let head = s3.head_object().bucket(BUCKET).key(&key).send().await?;
        assert_eq!(head.content_length(), Some(len as i64), "{name}");
        assert!(is_hex_etag(head.e_tag().unwrap_or(""), None), "{head:?}");
    }
    // ListObjects lists them with their sizes.
    let listed: Vec<(String, u64)> = blobs
        .list("fast/")
        .await?
        .into_iter()
        .map(|o| (o.key, o.len))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("fast/1kib".to_string(), 1024),
            ("fast/7mib".to_string(), 7 * MIB as u64),
            ("fast/empty".to_string(), 0),
        ]
    );
    let v1 = s3
        .list_objects()
        .bucket(BUCKET)
        .prefix("fast/")
        .send()
        .await?;
    assert_eq!(v1.contents().len(), 3);

    // The ETag PutObject returns is what HEAD, GET and LIST report; attributes read back.
    let key = "fast/attrs";
    let first = random_bytes(3000);
    let put = s3
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .content_type("application/x-fedmq-test")
        .cache_control("no-store")
        .metadata("round", "7")
        .body(first.to_vec().into())
        .send()
        .await?;
    let etag1 = put.e_tag().unwrap_or_default().to_string();
    assert!(is_hex_etag(&etag1, None), "{etag1}");
    let head = s3.head_object().bucket(BUCKET).key(key).send().await?;
    assert_eq!(head.e_tag(), Some(etag1.as_str()));
    assert_eq!(head.content_type(), Some("application/x-fedmq-test"));
    assert_eq!(head.cache_control(), Some("no-store"));
    assert_eq!(
        head.metadata()
            .and_then(|m| m.get("round"))
            .map(String::as_str),
        Some("7")
    );
    let get = s3.get_object().bucket(BUCKET).key(key).send().await?;
    assert_eq!(get.e_tag(), Some(etag1.as_str()));
    assert_eq!(get.content_type(), Some("application/x-fedmq-test"));
    assert!(get.body.collect().await?.into_bytes() == first);
    let listed = s3
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix(key)
        .send()
        .await?;
    assert_eq!(listed.contents().len(), 1);
    assert_eq!(listed.contents()[0].size(), Some(3000));

    // Overwritten with other content (and no attributes): the new bytes, a new ETag, the old
    // attributes gone.
    let second = random_bytes(5000);
    let put = s3
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(second.to_vec().into())
        .send()
        .await?;
    let etag2 = put.e_tag().unwrap_or_default().to_string();
    assert!(is_hex_etag(&etag2, None), "{etag2}");
    assert_ne!(etag1, etag2);
    let get = s3.get_object().bucket(BUCKET).key(key).send().await?;
    assert_eq!(get.e_tag(), Some(etag2.as_str()));
    assert_eq!(get.content_length(), Some(5000));
    assert_ne!(get.content_type(), Some("application/x-fedmq-test"));
    assert!(get.metadata().is_none_or(|m| m.is_empty()), "{get:?}");
    assert!(get.body.collect().await?.into_bytes() == second);

    // Copy and delete.
    s3.copy_object()
        .bucket(BUCKET)
        .key("fast/copy")
        .copy_source(format!("{BUCKET}/{key}"))
        .send()
        .await?;
    let copy = s3
        .get_object()
        .bucket(BUCKET)
        .key("fast/copy")
        .send()
        .await?;
    assert!(copy.body.collect().await?.into_bytes() == second);
    blobs.delete("fast/copy").await?;
    assert!(matches!(
        blobs.head("fast/copy").await,
        Err(Error::NotFound { .. })
    ));
    assert_no_leftovers(&e).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_md5_is_checked() -> Result<()> {
    use s3s::crypto::{Checksum as _, Md5};
    let e = Embedded::start().await?;
    let blobs = e.blobs().await?;
    let s3 = sdk_client(&e);
    let key = "md5/object";
    let data = random_bytes(3 * MIB + 17);
    let md5 = Md5::checksum(&data);
    let put = s3
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .content_md5(base64(&md5))
        .body(data.to_vec().into())
        .send()
        .await?;
    // With a Content-MD5 the ETag is the MD5, as S3's.
    assert_eq!(
        put.e_tag(),
        Some(format!("\"{}\"", hex::encode(md5)).as_str())
    );
    let get = s3.get_object().bucket(BUCKET).key(key).send().await?;
    assert!(get.body.collect().await?.into_bytes() == data);

    // A wrong Content-MD5 is refused, and the object keeps its previous bytes.
    let other = random_bytes(3 * MIB + 17);
    let err = s3
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .content_md5(base64(&md5))
        .body(other.to_vec().into())
        .send()
        .await
        .unwrap_err();
    assert_eq!(s3_code(&err), "BadDigest", "{err:?}");
    let get = s3.get_object().bucket(BUCKET).key(key).send().await?;
    assert!(get.body.collect().await?.into_bytes() == data);
    // Not base64 at all.
    let err = s3
        .put_object()
        .bucket(BUCKET)
        .key("md5/never")
        .content_md5("not base64!")
        .body(other.to_vec().into())
        .send()
        .await
        .unwrap_err();
    assert_eq!(s3_code(&err), "InvalidDigest", "{err:?}");
    assert!(matches!(
        blobs.head("md5/never").await,
        Err(Error::NotFound { .. })
    ));

    // UploadPart: a correct Content-MD5 gives the MD5 as the part ETag, a wrong one is refused.
    let up = s3
        .create_multipart_upload()
        .bucket(BUCKET)
        .key("md5/multipart")
        .send()
        .await?;
    let id = up.upload_id().unwrap_or_default();
    let part = s3
        .upload_part()
        .bucket(BUCKET)
        .key("md5/multipart")
        .upload_id(id)
        .part_number(1)
        .content_md5(base64(&md5))
        .body(data.to_vec().into())
        .send()
        .await?;
    assert_eq!(
        part.e_tag(),
        Some(format!("\"{}\"", hex::encode(md5)).as_str())
    );
    let err = s3
        .upload_part()
        .bucket(BUCKET)
        .key("md5/multipart")
        .upload_id(id)
        .part_number(2)
        .content_md5(base64(&md5))
        .body(other.to_vec().into())
        .send()
        .await
        .unwrap_err();
    assert_eq!(s3_code(&err), "BadDigest", "{err:?}");
    s3.abort_multipart_upload()
        .bucket(BUCKET)
        .key("md5/multipart")
        .upload_id(id)
        .send()
        .await?;
    assert_no_leftovers(&e).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_checksums_are_checked() -> Result<()> {
    use s3s::crypto::{Checksum as _, Crc32};
    let e = Embedded::start().await?;
    e.blobs().await?;
    let s3 = sdk_client(&e);
    let data = random_bytes(100_000);
    let crc = base64(Crc32::checksum(&data).as_ref());
    s3.put_object()
        .bucket(BUCKET)
        .key("crc/good")
        .checksum_crc32(&crc)
        .body(data.to_vec().into())
        .send()
        .await?;
    let get = s3
        .get_object()
        .bucket(BUCKET)
        .key("crc/good")
        .send()
        .await?;
    assert!(get.body.collect().await?.into_bytes() == data);
    let err = s3
        .put_object()
        .bucket(BUCKET)
        .key("crc/bad")
        .checksum_crc32(if crc == "AAAAAA==" {
            "AAAAAQ=="
        } else {
            "AAAAAA=="
        })
        .body(data.to_vec().into())
        .send()
        .await
        .unwrap_err();
    assert_eq!(s3_code(&err), "BadDigest", "{err:?}");
    Ok(())
}

/// A PutObject whose body ends before its Content-Length (the client went away) is an error and
/// leaves neither a new object nor a temporary file; an existing object keeps its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_put_bodies_leave_nothing_behind() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = Embedded::start().await?;
    let blobs = e.blobs().await?;
    let s3 = sdk_client(&e);
    let kept = blobs.put("short/existing", random_bytes(4096)).await?;
    // Small (one write) and large (several 1 MiB writes before the cut).
    for (key, declared, sent) in [
        ("short/new", 1000usize, 500usize),
        ("short/existing", 1000, 999),
        ("short/large", 12 * MIB, 5 * MIB + 3),
    ] {
        let presigned = s3
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .presigned(aws_sdk_s3::presigning::PresigningConfig::expires_in(
                Duration::from_secs(60),
            )?)
            .await?;
        let uri: raw_uri::Uri = presigned.uri().parse()?;
        let mut head = format!(
            "PUT {} HTTP/1.1\r\nhost: {}\r\ncontent-length: {declared}\r\n",
            uri.path_and_query,
            e.store.addr()
        );
        for (name, value) in presigned.headers() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut conn = tokio::net::TcpStream::connect(e.store.addr()).await?;
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(&random_bytes(sent)).await?;
        conn.shutdown().await?;
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut reply)).await;
        let reply = String::from_utf8_lossy(&reply);
        assert!(!reply.starts_with("HTTP/1.1 200"), "{key}: {reply}");
        assert_no_leftovers(&e).await?;
        if key == "short/existing" {
            assert_eq!(blobs.get(&kept).await?.len(), 4096);
        } else {
            assert!(
                matches!(blobs.head(key).await, Err(Error::NotFound { .. })),
                "{key}"
            );
        }
    }
    Ok(())
}

/// The smallest URI split the test above needs (no extra dependency).
mod raw_uri {
    pub struct Uri {
        pub path_and_query: String,
    }
    impl std::str::FromStr for Uri {
        type Err = anyhow::Error;
        fn from_str(s: &str) -> anyhow::Result<Self> {
            let rest = s
                .strip_prefix("http://")
                .ok_or_else(|| anyhow::anyhow!("not an http URI: {s}"))?;
            let slash = rest.find('/').unwrap_or(rest.len());
            Ok(Self {
                path_and_query: rest[slash..].to_string(),
            })
        }
    }
}

/// Multipart through the SDK: part ETags are 32 hex digits and distinct, the completed object's
/// ETag is what CompleteMultipartUpload returned, and its bytes are the parts in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_etags_are_consistent() -> Result<()> {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let e = Embedded::start().await?;
    e.blobs().await?;
    let s3 = sdk_client(&e);
    let key = "mp/sdk";
    let parts = [
        random_bytes(5 * MIB),
        random_bytes(5 * MIB),
        random_bytes(1234),
    ];
    let up = s3
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .content_type("application/x-fedmq-test")
        .send()
        .await?;
    let id = up.upload_id().unwrap_or_default().to_string();
    let mut done = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let n = i as i32 + 1;
        let out = s3
            .upload_part()
            .bucket(BUCKET)
            .key(key)
            .upload_id(&id)
            .part_number(n)
            .body(p.to_vec().into())
            .send()
            .await?;
        let etag = out.e_tag().unwrap_or_default().to_string();
        assert!(is_hex_etag(&etag, None), "{etag}");
        done.push(CompletedPart::builder().part_number(n).e_tag(etag).build());
    }
    let mut etags: Vec<_> = done.iter().filter_map(|p| p.e_tag()).collect();
    etags.sort();
    etags.dedup();
    assert_eq!(etags.len(), parts.len());
    let out = s3
        .complete_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .send()
        .await?;
    let etag = out.e_tag().unwrap_or_default().to_string();
    assert!(is_hex_etag(&etag, Some(parts.len())), "{etag}");
    let head = s3.head_object().bucket(BUCKET).key(key).send().await?;
    assert_eq!(head.e_tag(), Some(etag.as_str()));
    assert_eq!(head.content_type(), Some("application/x-fedmq-test"));
    let total: usize = parts.iter().map(Bytes::len).sum();
    assert_eq!(head.content_length(), Some(total as i64));
    let got = s3.get_object().bucket(BUCKET).key(key).send().await?;
    let got = got.body.collect().await?.into_bytes();
    assert!(got == parts.concat(), "bytes differ");

    // A part for an upload that does not exist, or with an invalid part number, is refused.
    let err = s3
        .upload_part()
        .bucket(BUCKET)
        .key(key)
        .upload_id("67e55044-10b1-426f-9247-bb680e5fe0c8")
        .part_number(1)
        .body(parts[2].to_vec().into())
        .send()
        .await
        .unwrap_err();
    assert_eq!(s3_code(&err), "NoSuchUpload", "{err:?}");
    assert_no_leftovers(&e).await
}

/// Keys that could leave the bucket's directory never write outside the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_keys_cannot_escape_the_data_directory() -> Result<()> {
    let e = Embedded::start().await?;
    let s3 = sdk_client(&e);
    for key in ["../../../escaped", "a/../../../../escaped", "/escaped"] {
        let _ = s3
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .body(b"x".to_vec().into())
            .send()
            .await;
    }
    assert!(!e.dir.path().join("escaped").exists());
    assert!(!e
        .dir
        .path()
        .parent()
        .unwrap_or(e.dir.path())
        .join("escaped")
        .exists());
    assert_no_leftovers(&e).await
}

/// Object keys are opaque strings: none leaves its bucket or the data directory, distinct keys
/// stay distinct objects (also after a restart rebuilds the index from the files), and a LIST
/// returns each exactly as written. NUL and keys over 1,024 bytes are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_keys_are_opaque_and_stay_in_their_bucket() -> Result<()> {
    let e = Embedded::start().await?;
    let s3 = sdk_client(&e);
    for b in ["bone", "btwo"] {
        s3.create_bucket().bucket(b).send().await?;
    }
    s3.put_object()
        .bucket("btwo")
        .key("k")
        .body(b"btwo's own".to_vec().into())
        .send()
        .await?;
    let long = "k".repeat(1024);
    let keys: Vec<String> = [
        "../btwo/k",
        "../../escape1",
        "a/../../../escape2",
        "a//b",
        "a/b",
        "./c",
        "c",
        ".",
        "..",
        "/",
        "/lead",
        "trail/",
        "%2F",
        "a%2Fb",
        "caf\u{e9}",   // NFC
        "cafe\u{301}", // NFD: the same text to a human, another key to S3
        "tab\tnew\nline",
        "sp ace+plus?q=1#h&amp",
        long.as_str(),
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    for k in &keys {
        s3.put_object()
            .bucket("bone")
            .key(k)
            .body(format!("value of {k:?}").into_bytes().into())
            .send()
            .await
            .with_context(|| format!("PUT {k:?}"))?;
    }
    for (k, code) in [
        ("nul\0byte".to_string(), "InvalidArgument"),
        ("k".repeat(1025), "KeyTooLongError"),
    ] {
        let err = s3
            .put_object()
            .bucket("bone")
            .key(&k)
            .body(b"x".to_vec().into())
            .send()
            .await
            .expect_err("refused");
        assert_eq!(s3_code(&err), code, "{err:?}");
    }
    let check = |e: &Embedded| {
        let s3 = sdk_client(e);
        let keys = keys.clone();
        async move {
            for k in &keys {
                let got = s3.get_object().bucket("bone").key(k).send().await?;
                let got = got.body.collect().await?.into_bytes();
                assert_eq!(got, format!("value of {k:?}").as_bytes(), "{k:?}");
            }
            let other = s3.get_object().bucket("btwo").key("k").send().await?;
            assert_eq!(other.body.collect().await?.into_bytes(), &b"btwo's own"[..]);
            let mut listed = Vec::new();
            let mut token = None;
            loop {
                let page = s3
                    .list_objects_v2()
                    .bucket("bone")
                    .max_keys(5)
                    .set_continuation_token(token)
                    .send()
                    .await?;
                listed.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_owned)),
                );
                token = page.next_continuation_token().map(str::to_owned);
                if token.is_none() {
                    break;
                }
            }
            let mut want = keys.clone();
            want.sort();
            assert_eq!(listed, want);
            anyhow::Ok(())
        }
    };
    check(&e).await?;
    // Every file is inside the data directory's own sub-directories.
    let data = e.dir.path().join("data");
    let mut stack = vec![e.dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)?.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(&data)
                    .with_context(|| p.display().to_string())?;
                let top = rel
                    .components()
                    .next()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned());
                assert!(
                    matches!(top.as_deref(), Some("buckets" | "fedmq-store.json")),
                    "{}",
                    p.display()
                );
            }
        }
    }
    // After a restart the index, rebuilt from the files, holds the same distinct objects.
    let Embedded { dir, store } = e;
    store.shutdown().await;
    let store = EmbeddedStore::start(StoreOptions::new(dir.path().join("data"), AK, SK)).await?;
    let e = Embedded { dir, store };
    check(&e).await
}

/// Delimiter listings group keys into common prefixes across pages, and `start-after` and
/// prefixes select what S3 would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_page_through_prefixes_and_delimiters() -> Result<()> {
    let e = Embedded::start().await?;
    e.blobs().await?;
    let s3 = sdk_client(&e);
    let keys = ["a/1", "a/2", "b", "c/x/1", "c/y", "d/", "d/e", "e"];
    for k in keys {
        s3.put_object()
            .bucket(BUCKET)
            .key(k)
            .body(b"x".to_vec().into())
            .send()
            .await?;
    }
    // One item per page: keys and common prefixes in order, each once.
    let mut items = Vec::new();
    let mut token = None;
    loop {
        let page = s3
            .list_objects_v2()
            .bucket(BUCKET)
            .delimiter("/")
            .max_keys(1)
            .set_continuation_token(token)
            .send()
            .await?;
        items.extend(
            page.common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().map(|p| format!("P:{p}"))),
        );
        items.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(|k| format!("K:{k}"))),
        );
        token = page.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    assert_eq!(items, ["P:a/", "K:b", "P:c/", "P:d/", "K:e"]);
    // Within a prefix, a key equal to the prefix is an object; deeper levels are prefixes.
    let page = s3
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("d/")
        .delimiter("/")
        .send()
        .await?;
    let got: Vec<_> = page.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(got, ["d/", "d/e"]);
    let page = s3
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("c/")
        .delimiter("/")
        .send()
        .await?;
    let got: Vec<_> = page
        .common_prefixes()
        .iter()
        .filter_map(|p| p.prefix())
        .collect();
    assert_eq!(got, ["c/x/"]);
    let got: Vec<_> = page.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(got, ["c/y"]);
    let page = s3
        .list_objects_v2()
        .bucket(BUCKET)
        .start_after("c/y")
        .send()
        .await?;
    let got: Vec<_> = page.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(got, ["d/", "d/e", "e"]);
    Ok(())
}
