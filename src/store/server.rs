//! The embedded S3-compatible server: [`ObjectStore`] (objects as checked files under a data
//! directory, an in-memory index and cache) behind [`s3s`]'s HTTP service with SigV4
//! authentication, served by hyper on the current tokio runtime.
//!
//! It is the local default of the design's "store" part: the server and every client talk to it
//! over real HTTP with real SigV4 signatures, exactly as they would to MinIO or AWS S3. It accepts
//! its own key pair (everything allowed) and each participant's derived credential (only what
//! that participant may do, `super::access`); a request signed with any other key pair is
//! rejected (`SignatureDoesNotMatch` / `InvalidAccessKeyId`), one outside its rights
//! `AccessDenied`.
//!
//! Lifecycle: [`EmbeddedStore::start`] binds (port 0 picks a free port) and spawns the accept loop;
//! [`EmbeddedStore::shutdown`] stops accepting, lets in-flight requests finish for up to
//! [`SHUTDOWN_GRACE`] and returns. Dropping the handle also stops the server (without waiting).
//! [`serve`] is the same loop as an `async fn run(.., cancel)` for callers that own a
//! `TaskTracker`; [`run_blocking`] is the entry for synchronous callers such as the CLI.
//!
//! HTTPS: [`EmbeddedStore::start_with_tls`] (and [`serve_tls`]) put a rustls acceptor (ring) in
//! front of the same service, with the certificate and key of [`StoreTls`]. Each handshake runs
//! in the connection's own task, bounded by [`TLS_HANDSHAKE_TIMEOUT`], so a client that stalls
//! its handshake holds only its own connection. Clients are not asked for certificates: the
//! S3 client fedmq uses cannot present one (see `S3Options::ca_path`), and SigV4 authenticates
//! every request.

use super::access::{ParticipantAccess, ParticipantAuth};
use super::error::{Error, Result};
use super::objects::{ObjectStore, DEFAULT_CACHE_BYTES};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::service::{S3Service, S3ServiceBuilder};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long [`EmbeddedStore::shutdown`] waits for in-flight requests before dropping them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Longest TLS handshake the HTTPS store waits for before dropping the connection.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTPS settings of the embedded store: the certificate it presents (valid for the host name
/// or IP address clients use in `CN_S3_ENDPOINT`) and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreTls {
    /// Certificate chain (leaf first), e.g. `store.pem` from `fedmq certs`.
    pub cert: PathBuf,
    /// Its private key, e.g. `store.key`.
    pub key: PathBuf,
}

impl StoreTls {
    /// The rustls acceptor (HTTP/1.1 over TLS 1.2/1.3, ring).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] naming the file that is missing or invalid.
    pub fn acceptor(&self) -> Result<TlsAcceptor> {
        let identity = crate::crypto::tls::Identity {
            cert: self.cert.clone(),
            key: self.key.clone(),
        };
        let config = crate::crypto::tls::server_config(&identity, &[b"http/1.1"]).map_err(|e| {
            Error::InvalidOptions {
                reason: format!("embedded store HTTPS: {e}"),
            }
        })?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// What [`EmbeddedStore::start`] needs.
#[derive(Clone)]
pub struct StoreOptions {
    /// Address to listen on. The default `127.0.0.1:0` picks a free port on loopback only; read
    /// the chosen one back with [`EmbeddedStore::addr`] / [`EmbeddedStore::endpoint`].
    pub listen: SocketAddr,
    /// Root of the stored data (layout in [`ObjectStore`]'s docs). Created when missing.
    /// Survives restarts.
    pub data_dir: PathBuf,
    /// Memory for recently written and read objects, served without touching the disk
    /// (default [`DEFAULT_CACHE_BYTES`]; 0 turns the cache off).
    pub cache_bytes: usize,
    /// The store's own access key id (FedML's `CN_S3_AKI`), allowed everything. Participants
    /// sign with their own credentials, derived from the secret (`super::access`).
    pub access_key: String,
    /// Its secret (FedML's `CN_S3_SAK`). Must not be empty.
    pub secret_key: String,
}

impl StoreOptions {
    /// Options for a store on `127.0.0.1:<free port>` over `data_dir`.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        access_key: impl Into<String>,
        secret_key: impl Into<String>,
    ) -> Self {
        Self {
            listen: default_listen(),
            data_dir: data_dir.into(),
            cache_bytes: DEFAULT_CACHE_BYTES,
            access_key: access_key.into(),
            secret_key: secret_key.into(),
        }
    }

    /// Checks that the options can run a store (non-empty keys).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] naming the config key or variable to set.
    pub fn validate(&self) -> Result<()> {
        if self.access_key.is_empty() {
            return Err(Error::InvalidOptions {
                reason: "the embedded store needs an access key: set \
                         comm_args.customized_training_s3_config.CN_S3_AKI or FEDMQ_S3_AKI"
                    .into(),
            });
        }
        if self.secret_key.is_empty() {
            return Err(Error::InvalidOptions {
                reason: "the embedded store refuses to start with an empty secret key: set \
                         comm_args.customized_training_s3_config.CN_S3_SAK or FEDMQ_S3_SAK"
                    .into(),
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for StoreOptions {
    // The secret never reaches logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("cache_bytes", &self.cache_bytes)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// `127.0.0.1:0`: loopback, free port.
pub fn default_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A running embedded store. Stops when [`shutdown`](Self::shutdown) is awaited or the handle is
/// dropped.
#[derive(Debug)]
pub struct EmbeddedStore {
    /// The bound address (the real port when `listen` had port 0).
    addr: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    /// Cancelled to stop the accept loop; the loop then drains connections.
    cancel: CancellationToken,
    /// The accept loop; joined by `shutdown`.
    task: Option<JoinHandle<()>>,
}

impl EmbeddedStore {
    /// Validates the options, creates the data directory, binds and starts serving on the
    /// current tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] (empty keys), [`Error::Io`] (data directory), [`Error::Bind`],
    /// [`Error::Server`] (the directory holds another layout).
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the accept loop).
    pub async fn start(opts: StoreOptions) -> Result<Self> {
        Self::start_with_tls(opts, None).await
    }

    /// As [`start`](Self::start), serving HTTPS with `tls` when given (the endpoint is then
    /// `https://...`).
    ///
    /// # Errors
    /// As [`start`](Self::start), and [`Error::InvalidOptions`] naming a missing or invalid
    /// certificate or key file.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn start_with_tls(opts: StoreOptions, tls: Option<StoreTls>) -> Result<Self> {
        let acceptor = tls.as_ref().map(StoreTls::acceptor).transpose()?;
        let service = build_service(&opts)?;
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: opts.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: opts.listen,
            source,
        })?;
        let cancel = CancellationToken::new();
        let span = tracing::info_span!("store", %addr);
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let task =
            tokio::spawn(serve_inner(listener, service, acceptor, cancel.clone()).instrument(span));
        tracing::info!(endpoint = %format!("{scheme}://{addr}"), data_dir = %opts.data_dir.display(), "embedded S3 store listening");
        Ok(Self {
            addr,
            scheme,
            cancel,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint URL for S3 clients, e.g. `http://127.0.0.1:40123` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// A token that stops the server when cancelled (as [`shutdown`](Self::shutdown) does,
    /// without waiting).
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops accepting connections, lets in-flight requests finish for up to
    /// [`SHUTDOWN_GRACE`], and returns once the server is down.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            // The loop bounds its own drain; the extra second covers scheduling.
            match tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "embedded store task failed"),
                Err(_) => tracing::warn!("embedded store did not stop in time"),
            }
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Builds the s3s service over `opts.data_dir` with SigV4 auth for the store's key pair and every
/// participant's derived one, and each participant's rights (`super::access`).
fn build_service(opts: &StoreOptions) -> Result<S3Service> {
    opts.validate()?;
    std::fs::create_dir_all(&opts.data_dir).map_err(|source| Error::Io {
        op: "creating data directory",
        path: opts.data_dir.clone(),
        source,
    })?;
    let objects = ObjectStore::open(&opts.data_dir, opts.cache_bytes)?;
    tracing::debug!(objects = objects.object_count(), dir = %opts.data_dir.display(), "store index loaded");
    let mut b = S3ServiceBuilder::new(objects);
    b.set_auth(ParticipantAuth::new(&opts.access_key, &opts.secret_key));
    b.set_access(ParticipantAccess::new(&opts.access_key));
    Ok(b.build())
}

/// Serves `service` on `listener` until `cancel` fires, then drains in-flight connections for up
/// to [`SHUTDOWN_GRACE`]. Accept errors (e.g. too many open files) are logged and retried with
/// backoff, never fatal.
pub async fn serve(listener: TcpListener, service: S3Service, cancel: CancellationToken) {
    serve_inner(listener, service, None, cancel).await;
}

/// [`serve`] over HTTPS: each connection's TLS handshake (bounded by [`TLS_HANDSHAKE_TIMEOUT`])
/// runs in its own task before HTTP is served on it.
pub async fn serve_tls(
    listener: TcpListener,
    service: S3Service,
    acceptor: TlsAcceptor,
    cancel: CancellationToken,
) {
    serve_inner(listener, service, Some(acceptor), cancel).await;
}

async fn serve_inner(
    listener: TcpListener,
    service: S3Service,
    acceptor: Option<TlsAcceptor>,
    cancel: CancellationToken,
) {
    let http = ConnBuilder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let socket = tokio::select! {
            () = cancel.cancelled() => break,
            res = listener.accept() => match res {
                Ok((socket, peer)) => {
                    tracing::trace!(%peer, "connection");
                    backoff = Duration::from_millis(5);
                    socket
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        // Small control requests (HEAD, list, complete) should not wait for Nagle.
        let _ = socket.set_nodelay(true);
        let Some(acceptor) = &acceptor else {
            let conn = http.serve_connection(TokioIo::new(socket), service.clone());
            let conn = graceful.watch(conn.into_owned());
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
            continue;
        };
        let (acceptor, http, service) = (acceptor.clone(), http.clone(), service.clone());
        let watcher = graceful.watcher();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let peer = socket.peer_addr().ok();
            let handshake = tokio::select! {
                () = cancel.cancelled() => return,
                r = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(socket)) => r,
            };
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(?peer, error = %e, "TLS handshake with a client failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(?peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = http.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("embedded store drained"),
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("embedded store: in-flight requests still running after {SHUTDOWN_GRACE:?}; dropping them");
        }
    }
    tracing::info!("embedded S3 store stopped");
}

/// Runs a store on a new multi-threaded tokio runtime until `shutdown` completes, calling `ready`
/// with the running store first (to print or publish its endpoint). For synchronous callers.
///
/// # Errors
/// As [`EmbeddedStore::start`], plus [`Error::Server`] if the runtime cannot be built.
pub fn run_blocking<F, R>(opts: StoreOptions, shutdown: F, ready: R) -> Result<()>
where
    F: Future<Output = ()>,
    R: FnOnce(&EmbeddedStore),
{
    run_blocking_with_tls(opts, None, shutdown, ready)
}

/// [`run_blocking`], serving HTTPS with `tls` when given (see
/// [`EmbeddedStore::start_with_tls`]).
///
/// # Errors
/// As [`EmbeddedStore::start_with_tls`], plus [`Error::Server`] if the runtime cannot be built.
pub fn run_blocking_with_tls<F, R>(
    opts: StoreOptions,
    tls: Option<StoreTls>,
    shutdown: F,
    ready: R,
) -> Result<()>
where
    F: Future<Output = ()>,
    R: FnOnce(&EmbeddedStore),
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fedmq-store")
        .build()
        .map_err(|e| Error::Server {
            reason: format!("cannot build the tokio runtime: {e}"),
        })?;
    rt.block_on(async move {
        let store = EmbeddedStore::start_with_tls(opts, tls).await?;
        ready(&store);
        shutdown.await;
        store.shutdown().await;
        Ok(())
    })
}
