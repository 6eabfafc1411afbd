//! `fedmq store` (run the embedded S3-compatible store) and `fedmq bench blob` (blob put/get
//! throughput). Thin: flags, a tokio runtime, and calls into [`fedmq::store`].

use anyhow::{bail, Context, Result};
use clap::Args;
use fedmq::config::LoadMode;
use fedmq::store::{self, BlobStore, EmbeddedStore, S3Options, StoreOptions, MIB};
use std::net::SocketAddr;
use std::path::PathBuf;

/// `fedmq store`: serve a data directory over S3 (SigV4-authenticated) until Ctrl-C.
///
/// Keys come from the flags, else the environment (FEDMQ_S3_AKI / FEDMQ_S3_SAK), else the
/// config file's comm_args.customized_training_s3_config (CN_S3_AKI / CN_S3_SAK) when -c is
/// given. The secret key must not be empty. Point clients at the printed endpoint
/// (CN_S3_ENDPOINT).
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Address to listen on. The default, 127.0.0.1:9000, is loopback only and MinIO's port,
    /// so a config written for a local MinIO works unchanged; use port 0 for a free port, and
    /// 0.0.0.0:9000 to serve other machines (put TLS in front).
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Directory holding the buckets and objects (created when missing; kept across restarts).
    #[arg(long, default_value = "fedmq-store")]
    pub data_dir: PathBuf,
    /// Memory (MiB) for recently written and read objects, served without touching the disk;
    /// objects up to a quarter of it (at most 16 MiB) are cached. 0 turns the cache off.
    #[arg(long, default_value_t = 256)]
    pub cache_mib: usize,
    /// The accepted access key id.
    #[arg(long, env = "FEDMQ_S3_AKI")]
    pub access_key: Option<String>,
    /// Its secret key (prefer the environment variable over the flag).
    #[arg(long, env = "FEDMQ_S3_SAK", hide_env_values = true)]
    pub secret_key: Option<String>,
    /// Take missing keys from this config file's customized_training_s3_config.
    #[arg(short, long = "config")]
    pub config: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first; e.g. store.pem from
    /// `fedmq certs`). Clients trust its CA with CN_S3_CA_PATH.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM; e.g. store.key).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Runs `fedmq store`.
pub fn run(a: StoreArgs) -> Result<()> {
    let (mut access_key, mut secret_key) = (a.access_key, a.secret_key);
    if let Some(path) = &a.config {
        let cfg = super::load_config(path, LoadMode::Distributed)?;
        let s3 = &cfg.comm_args.customized_training_s3_config;
        access_key = access_key.or_else(|| Some(s3.cn_s3_aki.clone()));
        secret_key = secret_key.or_else(|| Some(s3.cn_s3_sak.clone()));
    }
    let opts = StoreOptions {
        listen: a.listen,
        data_dir: a.data_dir,
        cache_bytes: a.cache_mib.saturating_mul(1 << 20),
        access_key: access_key.unwrap_or_default(),
        secret_key: secret_key.unwrap_or_default(),
    };
    let data_dir = opts.data_dir.clone();
    let access = opts.access_key.clone();
    let tls = match (a.tls_cert, a.tls_key) {
        (Some(cert), Some(key)) => Some(store::StoreTls { cert, key }),
        _ => None,
    };
    store::run_blocking_with_tls(
        opts,
        tls,
        async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot listen for Ctrl-C; stopping");
            }
            tracing::info!("Ctrl-C: stopping the store");
        },
        |s: &EmbeddedStore| {
            // The endpoint alone on stdout, for scripts; details on stderr.
            println!("{}", s.endpoint());
            eprintln!(
                "fedmq store: serving {} on {} (access key {access}); set CN_S3_ENDPOINT to it. \
                 Ctrl-C stops.",
                data_dir.display(),
                s.endpoint()
            );
        },
    )
    .context("running the embedded store")
}

/// `fedmq bench blob`: put and get (digest-verified) throughput, one JSON object per size.
///
/// Without --endpoint it starts an embedded store over a temporary directory on a free
/// loopback port; with --endpoint it uses that S3 store (keys from flags or FEDMQ_S3_AKI /
/// FEDMQ_S3_SAK) and the bucket --bucket, deleting its benchmark objects afterwards.
#[derive(Debug, Args)]
pub struct BenchBlobArgs {
    /// Blob sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,40,400")]
    pub sizes_mib: Vec<usize>,
    /// Timed runs per size (medians are reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Multipart part and ranged-GET size in MiB (at least 5).
    #[arg(long, default_value_t = 8)]
    pub part_size_mib: usize,
    /// Parts or ranges in flight per blob.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// SigV4-sign request payloads (one more SHA-256 pass per side of an upload).
    #[arg(long)]
    pub sign_payload: bool,
    /// An external S3 endpoint to measure instead of the embedded store.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Access key for --endpoint.
    #[arg(long, env = "FEDMQ_S3_AKI")]
    pub access_key: Option<String>,
    /// Secret key for --endpoint.
    #[arg(long, env = "FEDMQ_S3_SAK", hide_env_values = true)]
    pub secret_key: Option<String>,
    /// Region for --endpoint.
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// Bucket to use (created when missing).
    #[arg(long, default_value = "fedmq-bench")]
    pub bucket: String,
    /// Data directory of the embedded store (default: a fresh temporary directory, removed
    /// afterwards). Use it to measure a particular disk.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Runs `fedmq bench blob`.
pub fn run_bench_blob(a: BenchBlobArgs) -> Result<()> {
    if a.sizes_mib.is_empty() || a.sizes_mib.contains(&0) {
        bail!("--sizes-mib needs sizes of at least 1 MiB");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(bench_blob(a))
}

async fn bench_blob(a: BenchBlobArgs) -> Result<()> {
    let tag = format!("{:016x}", rand::random::<u64>());
    let mut opts = S3Options {
        region: a.region.clone(),
        bucket: a.bucket.clone(),
        part_size: a.part_size_mib * MIB,
        multipart_threshold: a.part_size_mib * MIB,
        concurrency: a.concurrency,
        sign_payload: a.sign_payload,
        ..S3Options::default()
    };
    // Keep the embedded store (and its temporary directory) alive for the whole run.
    let mut embedded: Option<(EmbeddedStore, Option<PathBuf>)> = None;
    let label = match &a.endpoint {
        Some(endpoint) => {
            opts.endpoint = endpoint.clone();
            opts.access_key = a.access_key.clone().unwrap_or_default();
            opts.secret_key = a.secret_key.clone().unwrap_or_default();
            endpoint.clone()
        }
        None => {
            let (dir, temp) = match &a.data_dir {
                Some(d) => (d.clone(), None),
                None => {
                    let d = std::env::temp_dir().join(format!("fedmq-bench-blob-{tag}"));
                    (d.clone(), Some(d))
                }
            };
            let secret = format!("{:032x}", rand::random::<u128>());
            let s = EmbeddedStore::start(StoreOptions::new(&dir, "fedmq-bench", secret.as_str()))
                .await
                .context("starting the embedded store")?;
            opts.endpoint = s.endpoint();
            opts.access_key = "fedmq-bench".into();
            opts.secret_key = secret;
            embedded = Some((s, temp));
            "embedded".to_string()
        }
    };
    let blobs = BlobStore::connect(&opts).context("S3 options")?;
    let result = fedmq::bench::blob::bench_blob(
        &blobs,
        &label,
        &format!("bench/{tag}"),
        &a.sizes_mib,
        a.runs,
        |r| match serde_json::to_string(r) {
            Ok(line) => println!("{line}"),
            Err(e) => tracing::error!(error = %e, "cannot serialize a result"),
        },
    )
    .await;
    if let Some((s, temp)) = embedded {
        s.shutdown().await;
        if let Some(dir) = temp {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot remove the temporary store");
            }
        }
    }
    result.context("blob benchmark")?;
    Ok(())
}
