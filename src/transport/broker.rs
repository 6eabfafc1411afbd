//! The embedded MQTT broker: rumqttd on a dedicated thread, bound to 127.0.0.1 by default.
//!
//! [`EmbeddedBroker::start`] builds a rumqttd [`rumqttd::Config`] from [`BrokerOptions`] (the
//! programmatic defaults, or `broker/rumqttd.toml` through [`BrokerOptions::from_toml`]), starts
//! it, and returns only once every listener answers an MQTT CONNECT with a CONNACK, so callers
//! never sleep "until the broker is up".
//!
//! Design: rumqttd has no shutdown API (rumqtt issue #771): `Broker::start` blocks for ever,
//! running one thread (with its own runtime) per listener plus a router thread. We run it on a
//! dedicated `std::thread` that lives as long as the process; dropping [`EmbeddedBroker`] does not
//! stop the broker. A process that needs a broker it can stop (tests of broker restarts) runs
//! `fedmq broker` as a child process instead.
//!
//! Design: rumqttd binds its listeners itself and does not report the bound port, so port 0
//! ("any free port") is resolved here first, by binding and releasing an ephemeral port. Another
//! process could take the port in between; the readiness probe speaks MQTT, so that case is
//! reported as an error rather than mistaken for our broker.
//!
//! TLS: with [`BrokerOptions::tls`] every listener speaks MQTT over TLS (rumqttd's rustls
//! listener, ring), presenting the given certificate; the readiness probe then speaks TLS too,
//! pinned to that certificate. rumqttd 0.20 runs each TLS handshake inside its accept loop,
//! without a timeout: a client that never completes its handshake delays every later connection
//! on that listener. Acceptable on trusted networks; in front of untrusted ones use the gateway
//! (any of the options below turns it on; its TLS handshakes are concurrent and time-limited).
//!
//! Authorization: rumqttd 0.20 has user names and passwords but no per-topic ACLs and, in our
//! build, no client-certificate verification (its `verify-client-cert` feature would require a
//! certificate on every TLS listener and turn the certificate's organization into a topic
//! prefix). With [`BrokerOptions::acl_file`], [`BrokerOptions::password_file`] or
//! [`BrokerOptions::client_ca`], rumqttd listens on 127.0.0.1 on a free port behind an
//! authorizing gateway (`gateway/`) that serves [`BrokerOptions::listen`]: Mosquitto's ACL and
//! password file formats (so `broker/fedmq.acl` and one `mosquitto_passwd` file serve both
//! brokers), mutual TLS with the certificate's Common Name as user name, and guards against idle and
//! hostile connections (the oldest connection still waiting for its CONNECT is shed at the
//! pending cap; failures, not connections, cost a source address its budget). [`EmbeddedBroker::addr`] is then the gateway's address. The gateway speaks MQTT
//! 3.1.1 only, so it cannot be combined with an MQTT 5 listener.

use super::gateway::{self, Acl, Credential, FailureBudget, PasswordFile};
use super::{DEFAULT_MAX_PACKET_SIZE, MIN_PACKET_SIZE};
use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Why the embedded broker could not be configured or started.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration file could not be read.
    #[error("reading broker config {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration file is not valid rumqttd TOML.
    #[error("parsing broker config {path}: {source}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        source: Box<toml::de::Error>,
    },
    /// The configuration asks for a rumqttd feature the embedded broker does not offer.
    #[error("broker config: {what} is not supported by the embedded broker")]
    Unsupported {
        /// The feature.
        what: String,
    },
    /// An option is out of range.
    #[error("broker option `{field}`: {reason}")]
    InvalidOption {
        /// Which option.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// No free port could be reserved for a listener given as port 0.
    #[error("finding a free port on {ip}: {source}")]
    NoFreePort {
        /// The address asked for.
        ip: std::net::IpAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The broker thread could not be spawned.
    #[error("spawning the broker thread: {0}")]
    Spawn(std::io::Error),
    /// rumqttd stopped during start-up, typically because a listener could not bind.
    #[error("the broker stopped during start-up (listeners {listeners}): {reason}")]
    Exited {
        /// The listeners it was asked to open.
        listeners: String,
        /// What rumqttd reported (its logs say which listener failed).
        reason: String,
    },
    /// The gateway's listener could not be bound.
    #[error("binding the gateway listener {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// A listener did not answer MQTT in time.
    #[error("listener {addr} did not answer an MQTT CONNECT within {after:?} (port taken by another process?)")]
    NotReady {
        /// The listener.
        addr: SocketAddr,
        /// How long we waited.
        after: Duration,
    },
}

/// Settings of the embedded broker. [`Default`] is the local default: an MQTT 3.1.1 listener on
/// 127.0.0.1 on a free port, no MQTT 5 listener, anonymous access.
#[derive(Clone, PartialEq)]
pub struct BrokerOptions {
    /// MQTT 3.1.1 listener (the protocol fedmq's sessions speak). Port 0: a free port is chosen
    /// by [`EmbeddedBroker::start`] and reported by [`EmbeddedBroker::addr`].
    pub listen: SocketAddr,
    /// Optional MQTT 5 listener for other clients (port 0: a free port, see
    /// [`EmbeddedBroker::addr_v5`]). It shares every connection setting below.
    pub listen_v5: Option<SocketAddr>,
    /// Largest packet accepted from a client, in bytes (rumqttd's `max_payload_size` bounds the
    /// whole remaining length: topic, packet id and payload). See
    /// [`super::DEFAULT_MAX_PACKET_SIZE`] for why 256 KiB.
    pub max_payload_size: usize,
    /// Concurrent client connections.
    pub max_connections: usize,
    /// Packets a connection may have buffered towards the router before it is throttled.
    pub max_inflight: usize,
    /// Time a new TCP connection has to send its CONNECT, in milliseconds (a guard against idle
    /// sockets exhausting `max_connections`).
    pub connection_timeout_ms: u16,
    /// Size of one in-memory log segment per topic filter. Must exceed `max_payload_size`.
    pub max_segment_size: usize,
    /// In-memory segments kept per topic filter; older messages are dropped (a persistent session
    /// offline for longer loses them; retained messages are kept separately).
    pub max_segment_count: usize,
    /// User name → password. `None`: anonymous access (fine on 127.0.0.1; on any other
    /// interface use it, with TLS so that passwords do not cross the network in clear).
    pub users: Option<HashMap<String, String>>,
    /// How long [`EmbeddedBroker::start`] waits for the listeners to answer.
    pub ready_timeout: Duration,
    /// Serve MQTT over TLS on every listener (see the module's TLS note). `None`: plain TCP.
    pub tls: Option<BrokerTls>,
    /// Mosquitto ACL file (`broker/fedmq.acl`): each client may publish and subscribe only where
    /// it grants. Needs authentication (`users`, `password_file` or `client_ca`). Turns on the
    /// gateway (see the module's Authorization note).
    pub acl_file: Option<PathBuf>,
    /// Mosquitto password file (written by `mosquitto_passwd`), checked after `users`. Turns on
    /// the gateway.
    pub password_file: Option<PathBuf>,
    /// Mutual TLS: CA (PEM) that client certificates must chain to; every client must present
    /// one, and its Common Name is its user name (like Mosquitto's `use_identity_as_username`;
    /// `fedmq certs` puts the participant id there). Needs `tls`. Turns on the gateway.
    pub client_ca: Option<PathBuf>,
    /// Gateway only: failures (bad bytes, bad credentials, no CONNECT in time) a source address
    /// (IPv6: a /64) may cause before its connections are treated as abusive; successful
    /// connections cost nothing. The same budget per user name for wrong passwords: beyond it,
    /// each wrong password is answered after [`super::GUESS_DELAY`]. See [`FailureBudget`].
    pub failure_budget: FailureBudget,
    /// Gateway only: connections that may be between accept and a complete CONNECT at once.
    /// When a new one arrives at the cap, the oldest pending connection (from an abusive source
    /// first) is closed; a connection that has sent its CONNECT is never shed.
    pub max_pending_connects: usize,
}

/// The embedded broker's TLS certificate (PEM files). Sessions must trust its CA and connect by
/// a host name or IP address in its subject alternative names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerTls {
    /// Certificate chain, leaf first (e.g. `broker.pem` from `fedmq certs`).
    pub cert: PathBuf,
    /// Its private key (e.g. `broker.key`).
    pub key: PathBuf,
}

impl BrokerTls {
    /// Loads both files: the leaf certificate (for the readiness probe), checking the key too.
    fn load(&self) -> Result<rustls::pki_types::CertificateDer<'static>, BrokerError> {
        let bad = |e: crate::crypto::tls::TlsError| BrokerError::InvalidOption {
            field: "tls",
            reason: e.to_string(),
        };
        let mut certs =
            crate::crypto::tls::load_certs(&self.cert, "broker certificate").map_err(bad)?;
        crate::crypto::tls::load_key(&self.key).map_err(bad)?;
        Ok(certs.swap_remove(0))
    }

    fn to_rumqttd(&self) -> rumqttd::TlsConfig {
        rumqttd::TlsConfig::Rustls {
            capath: None,
            certpath: self.cert.to_string_lossy().into_owned(),
            keypath: self.key.to_string_lossy().into_owned(),
        }
    }
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            listen_v5: None,
            max_payload_size: DEFAULT_MAX_PACKET_SIZE,
            max_connections: 10_000,
            max_inflight: 100,
            connection_timeout_ms: 10_000,
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 4,
            users: None,
            ready_timeout: Duration::from_secs(10),
            tls: None,
            acl_file: None,
            password_file: None,
            client_ca: None,
            failure_budget: FailureBudget::default(),
            max_pending_connects: 10_000,
        }
    }
}

impl fmt::Debug for BrokerOptions {
    // Hand-written so that passwords never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let users: Option<Vec<&String>> = self.users.as_ref().map(|u| u.keys().collect());
        f.debug_struct("BrokerOptions")
            .field("listen", &self.listen)
            .field("listen_v5", &self.listen_v5)
            .field("max_payload_size", &self.max_payload_size)
            .field("max_connections", &self.max_connections)
            .field("max_inflight", &self.max_inflight)
            .field("connection_timeout_ms", &self.connection_timeout_ms)
            .field("max_segment_size", &self.max_segment_size)
            .field("max_segment_count", &self.max_segment_count)
            .field("users (passwords redacted)", &users)
            .field("ready_timeout", &self.ready_timeout)
            .field("tls", &self.tls)
            .field("acl_file", &self.acl_file)
            .field("password_file", &self.password_file)
            .field("client_ca", &self.client_ca)
            .field("failure_budget", &self.failure_budget)
            .field("max_pending_connects", &self.max_pending_connects)
            .finish()
    }
}

impl BrokerOptions {
    /// Reads a rumqttd configuration file (`broker/rumqttd.toml` is the reference). The file
    /// keeps rumqttd's own shape, so it also works with the upstream `rumqttd` binary.
    ///
    /// The embedded broker supports: `[router]`, exactly one `[v4.*]` listener, at most one
    /// `[v5.*]` listener, and their `connections` settings (`auth` included). The MQTT 5 listener
    /// uses the MQTT 3.1.1 listener's connection settings. TLS: a listener's
    /// `tls = { certpath = "...", keypath = "..." }` (rumqttd's `Rustls` form); both listeners
    /// must then have the same. `capath` becomes [`BrokerOptions::client_ca`] (mutual TLS through
    /// the gateway, MQTT 3.1.1 only: refused with a `[v5]` listener).
    ///
    /// # Errors
    /// [`BrokerError::ReadConfig`] / [`BrokerError::ParseConfig`] for an unreadable or malformed
    /// file, [`BrokerError::Unsupported`] for sections the embedded broker does not run
    /// (native-tls, websockets, bridge, cluster, console, prometheus, metrics), and
    /// [`BrokerError::InvalidOption`] from [`BrokerOptions::validate`].
    pub fn from_toml(path: &Path) -> Result<Self, BrokerError> {
        let text = std::fs::read_to_string(path).map_err(|source| BrokerError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text).map_err(|e| match e {
            BrokerError::ParseConfig { source, .. } => BrokerError::ParseConfig {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// [`BrokerOptions::from_toml`] on a string (errors name the path `<string>`).
    ///
    /// # Errors
    /// As [`BrokerOptions::from_toml`].
    pub fn from_toml_str(text: &str) -> Result<Self, BrokerError> {
        let cfg: rumqttd::Config =
            toml::from_str(text).map_err(|source| BrokerError::ParseConfig {
                path: PathBuf::from("<string>"),
                source: Box::new(source),
            })?;
        let unsupported = |what: &str| BrokerError::Unsupported { what: what.into() };
        if cfg.ws.is_some() {
            return Err(unsupported("a websocket listener ([ws])"));
        }
        if cfg.bridge.is_some() {
            return Err(unsupported("[bridge]"));
        }
        if cfg.cluster.is_some() {
            return Err(unsupported("[cluster]"));
        }
        if cfg.console.is_some() {
            return Err(unsupported("[console]"));
        }
        if cfg.prometheus.is_some() {
            return Err(unsupported("[prometheus]"));
        }
        if cfg.metrics.is_some() {
            return Err(unsupported("[metrics]"));
        }
        let one = |servers: Option<HashMap<String, rumqttd::ServerSettings>>,
                   section: &str|
         -> Result<Option<rumqttd::ServerSettings>, BrokerError> {
            let mut servers: Vec<_> = servers.unwrap_or_default().into_values().collect();
            if servers.len() > 1 {
                return Err(unsupported(&format!(
                    "more than one [{section}.*] listener"
                )));
            }
            Ok(servers.pop())
        };
        let tls_of = |server: &rumqttd::ServerSettings,
                      section: &str|
         -> Result<Option<(BrokerTls, Option<PathBuf>)>, BrokerError> {
            match &server.tls {
                None => Ok(None),
                Some(rumqttd::TlsConfig::Rustls {
                    capath,
                    certpath,
                    keypath,
                }) => Ok(Some((
                    BrokerTls {
                        cert: PathBuf::from(certpath),
                        key: PathBuf::from(keypath),
                    },
                    capath.as_ref().map(PathBuf::from),
                ))),
                Some(rumqttd::TlsConfig::NativeTls { .. }) => Err(unsupported(&format!(
                    "native-tls (pkcs12) on the [{section}] listener; use certpath and keypath"
                ))),
            }
        };
        let v4 = one(cfg.v4, "v4")?.ok_or_else(|| BrokerError::InvalidOption {
            field: "v4",
            reason: "exactly one [v4.*] listener is required (fedmq sessions speak MQTT 3.1.1)"
                .into(),
        })?;
        let v5 = one(cfg.v5, "v5")?;
        let tls = tls_of(&v4, "v4")?;
        if let Some(v5) = &v5 {
            if tls_of(v5, "v5")? != tls {
                return Err(unsupported(
                    "different TLS settings on the [v4] and [v5] listeners (the embedded broker \
                     applies one TLS setting to both)",
                ));
            }
        }
        if let Some(v5) = &v5 {
            if v5.connections.max_payload_size != v4.connections.max_payload_size
                || v5.connections.auth != v4.connections.auth
            {
                tracing::warn!(
                    "broker config: the [v5] listener's connection settings differ from [v4]'s; \
                     the embedded broker applies [v4]'s to both"
                );
            }
        }
        let c = &v4.connections;
        let opts = Self {
            listen: v4.listen,
            listen_v5: v5.map(|s| s.listen),
            max_payload_size: c.max_payload_size,
            max_connections: cfg.router.max_connections,
            max_inflight: c.max_inflight_count,
            connection_timeout_ms: c.connection_timeout_ms,
            max_segment_size: cfg.router.max_segment_size,
            max_segment_count: cfg.router.max_segment_count,
            users: c.auth.clone(),
            ready_timeout: Self::default().ready_timeout,
            client_ca: tls.as_ref().and_then(|(_, ca)| ca.clone()),
            tls: tls.map(|(t, _)| t),
            ..Self::default()
        };
        opts.validate()?;
        Ok(opts)
    }

    /// Checks the options against what fedmq needs and what rumqttd accepts.
    ///
    /// # Errors
    /// [`BrokerError::InvalidOption`] naming the option.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let bad = |field, reason: String| Err(BrokerError::InvalidOption { field, reason });
        if self.max_payload_size < MIN_PACKET_SIZE {
            return bad(
                "max_payload_size",
                format!(
                    "{} bytes is below {MIN_PACKET_SIZE} (the largest control message plus MQTT \
                     framing); fedmq messages could be refused",
                    self.max_payload_size
                ),
            );
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1".into());
        }
        if self.max_inflight == 0 {
            return bad("max_inflight", "must be at least 1".into());
        }
        if self.connection_timeout_ms == 0 {
            return bad("connection_timeout_ms", "must be at least 1".into());
        }
        if self.max_segment_size <= self.max_payload_size {
            return bad(
                "max_segment_size",
                format!(
                    "{} bytes must exceed max_payload_size ({} bytes)",
                    self.max_segment_size, self.max_payload_size
                ),
            );
        }
        if self.max_segment_count == 0 {
            return bad("max_segment_count", "must be at least 1".into());
        }
        if let Some(users) = &self.users {
            if users.is_empty() {
                return bad("users", "an empty user table locks every client out".into());
            }
        }
        if let Some(tls) = &self.tls {
            tls.load()?;
        }
        if self.client_ca.is_some() && self.tls.is_none() {
            return bad(
                "client_ca",
                "client certificates need TLS: set tls (the broker's certificate and key)".into(),
            );
        }
        if self.wants_gateway() {
            if self.listen_v5.is_some() {
                return bad(
                    "listen_v5",
                    "acl_file, password_file and client_ca run the authorizing gateway, which \
                     speaks MQTT 3.1.1 only; an MQTT 5 listener would bypass it (remove \
                     listen_v5 / the [v5] listener)"
                        .into(),
                );
            }
            let rate = &self.failure_budget;
            if rate.burst == 0 || !(rate.per_second.is_finite() && rate.per_second > 0.0) {
                return bad(
                    "failure_budget",
                    format!(
                        "burst {} and {} per second: both must be positive",
                        rate.burst, rate.per_second
                    ),
                );
            }
            if self.max_pending_connects == 0 {
                return bad("max_pending_connects", "must be at least 1".into());
            }
            self.gateway_parts()?;
        }
        Ok(())
    }

    /// Whether these options run the authorizing gateway in front of rumqttd.
    fn wants_gateway(&self) -> bool {
        self.acl_file.is_some() || self.password_file.is_some() || self.client_ca.is_some()
    }

    /// Loads what the gateway needs (ACL, password file, TLS configuration); `None` when the
    /// options do not ask for the gateway.
    fn gateway_parts(&self) -> Result<Option<GatewayParts>, BrokerError> {
        if !self.wants_gateway() {
            return Ok(None);
        }
        let bad = |field, reason: String| BrokerError::InvalidOption { field, reason };
        let acl = self
            .acl_file
            .as_deref()
            .map(Acl::load)
            .transpose()
            .map_err(|e| bad("acl_file", e))?;
        let passwords = self
            .password_file
            .as_deref()
            .map(PasswordFile::load)
            .transpose()
            .map_err(|e| bad("password_file", e))?;
        if let (Some(users), Some(file)) = (&self.users, &passwords) {
            if let Some(u) = users.keys().find(|u| file.contains(u)) {
                return Err(bad(
                    "password_file",
                    format!("user {u:?} is also in `users`: give each user one password"),
                ));
            }
        }
        if let Some(acl) = &acl {
            if self.users.is_none() && passwords.is_none() && self.client_ca.is_none() {
                return Err(bad(
                    "acl_file",
                    "an ACL needs authenticated user names: set users, password_file or \
                     client_ca"
                        .into(),
                ));
            }
            if acl.has_anonymous_rules() {
                tracing::warn!(
                    "ACL file: `topic` lines before the first `user` line apply to anonymous \
                     clients (as in Mosquitto); the gateway admits none, so they grant nothing"
                );
            }
        }
        let tls = self
            .tls
            .as_ref()
            .map(|t| gateway_tls(t, self.client_ca.as_deref()))
            .transpose()?;
        Ok(Some(GatewayParts {
            acl,
            passwords,
            tls,
        }))
    }

    /// The rumqttd configuration for concrete (non-zero) listener addresses. With `internal`
    /// (the gateway's credential) rumqttd is the gateway's back end: plain TCP, and only that
    /// credential is accepted.
    fn to_rumqttd(
        &self,
        v4: SocketAddr,
        v5: Option<SocketAddr>,
        internal: Option<&Credential>,
    ) -> rumqttd::Config {
        let auth = match internal {
            Some(c) => Some(HashMap::from([(c.user.clone(), c.password.clone())])),
            None => self.users.clone(),
        };
        let tls = match internal {
            Some(_) => None,
            None => self.tls.as_ref().map(BrokerTls::to_rumqttd),
        };
        let connections = rumqttd::ConnectionSettings {
            connection_timeout_ms: self.connection_timeout_ms,
            max_payload_size: self.max_payload_size,
            max_inflight_count: self.max_inflight,
            auth,
            external_auth: None,
            // Required: without it rumqttd refuses publishes to topics nobody has subscribed to
            // yet (a command sent before its client connected).
            dynamic_filters: true,
        };
        let server = |name: &str, listen| rumqttd::ServerSettings {
            name: name.into(),
            listen,
            tls: tls.clone(),
            // rumqttd pauses this long after each accept: a cheap guard against connection storms.
            next_connection_delay_ms: 1,
            connections: connections.clone(),
        };
        rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: self.max_connections,
                max_outgoing_packet_count: 200,
                max_segment_size: self.max_segment_size,
                max_segment_count: self.max_segment_count,
                ..Default::default()
            },
            v4: Some(HashMap::from([("1".to_string(), server("v4-1", v4))])),
            v5: v5.map(|a| HashMap::from([("1".to_string(), server("v5-1", a))])),
            ..Default::default()
        }
    }
}

/// What the gateway loads from [`BrokerOptions`]' files.
struct GatewayParts {
    acl: Option<Acl>,
    passwords: Option<PasswordFile>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// The gateway's TLS server: the broker certificate, and with `client_ca` a required client
/// certificate chaining to it.
fn gateway_tls(
    tls: &BrokerTls,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, BrokerError> {
    let bad = |field, reason: String| BrokerError::InvalidOption { field, reason };
    let certs = crate::crypto::tls::load_certs(&tls.cert, "broker certificate")
        .map_err(|e| bad("tls", e.to_string()))?;
    let key = crate::crypto::tls::load_key(&tls.key).map_err(|e| bad("tls", e.to_string()))?;
    let provider = crate::crypto::tls::crypto_provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls", e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots =
                crate::crypto::tls::load_roots(ca).map_err(|e| bad("client_ca", e.to_string()))?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| bad("client_ca", format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        bad(
            "tls",
            format!(
                "certificate {} with key {}: {e}",
                tls.cert.display(),
                tls.key.display()
            ),
        )
    })?;
    Ok(Arc::new(config))
}

/// A running embedded broker. Cheap to keep; dropping it does not stop the broker (see the
/// module's `Design:` note).
#[derive(Debug)]
pub struct EmbeddedBroker {
    /// The MQTT 3.1.1 listener's bound address.
    addr: SocketAddr,
    /// The MQTT 5 listener's bound address, when configured.
    addr_v5: Option<SocketAddr>,
}

impl EmbeddedBroker {
    /// Validates `opts`, starts rumqttd on a dedicated thread and waits (up to
    /// `opts.ready_timeout`) until each listener answers an MQTT CONNECT with a CONNACK.
    ///
    /// Blocking (it polls sockets with short, bounded pauses): call it before starting async
    /// work, or from `spawn_blocking`.
    ///
    /// # Errors
    /// [`BrokerError::InvalidOption`] for bad options, [`BrokerError::NoFreePort`] when port 0
    /// cannot be resolved, [`BrokerError::Exited`] when rumqttd stops during start-up (a listener
    /// failed to bind), [`BrokerError::NotReady`] when a listener does not answer in time.
    pub fn start(opts: BrokerOptions) -> Result<Self, BrokerError> {
        opts.validate()?;
        if let Some(parts) = opts.gateway_parts()? {
            return Self::start_behind_gateway(&opts, parts);
        }
        let probe_tls = opts
            .tls
            .as_ref()
            .map(|t| t.load().map(probe_tls_config))
            .transpose()?;
        let addr = resolve_port(opts.listen)?;
        let addr_v5 = opts.listen_v5.map(resolve_port).transpose()?;
        let config = opts.to_rumqttd(addr, addr_v5, None);
        let over = if opts.tls.is_some() { " over TLS" } else { "" };
        let listeners = match addr_v5 {
            Some(v5) => format!("{addr} (MQTT 3.1.1{over}), {v5} (MQTT 5{over})"),
            None => format!("{addr} (MQTT 3.1.1{over})"),
        };
        let exit_rx = run_rumqttd(config)?;
        let probe_user = opts.users.as_ref().and_then(|u| u.iter().next());
        let mut targets: Vec<(SocketAddr, u8)> = vec![(addr, 4)];
        targets.extend(addr_v5.map(|a| (a, 5)));
        wait_ready(
            &exit_rx,
            &listeners,
            targets,
            probe_user,
            probe_tls.as_ref(),
            opts.ready_timeout,
        )?;
        nodelay_on_listeners(
            &[Some(addr), addr_v5]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>(),
        );
        tracing::info!(%listeners, "embedded MQTT broker ready");
        Ok(Self { addr, addr_v5 })
    }

    /// rumqttd on a free internal port, behind the gateway on `opts.listen`.
    fn start_behind_gateway(
        opts: &BrokerOptions,
        parts: GatewayParts,
    ) -> Result<Self, BrokerError> {
        // The gateway binds its own listener: port 0 is resolved without a race.
        let public = TcpListener::bind(opts.listen).map_err(|source| BrokerError::Bind {
            addr: opts.listen,
            source,
        })?;
        let addr = public.local_addr().map_err(|source| BrokerError::Bind {
            addr: opts.listen,
            source,
        })?;
        let internal = resolve_port(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let credential = Credential::random();
        let config = opts.to_rumqttd(internal, None, Some(&credential));
        let over = if opts.tls.is_some() { " over TLS" } else { "" };
        let listeners = format!(
            "{addr} (MQTT 3.1.1{over}, authorizing gateway) -> {internal} (rumqttd, internal)"
        );
        let exit_rx = run_rumqttd(config)?;
        let login = (credential.user.clone(), credential.password.clone());
        wait_ready(
            &exit_rx,
            &listeners,
            vec![(internal, 4)],
            Some((&login.0, &login.1)),
            None,
            opts.ready_timeout,
        )?;
        nodelay_on_listeners(&[internal]);
        gateway::spawn(gateway::GatewayConfig {
            listener: public,
            upstream: internal,
            credential,
            auth: gateway::Auth {
                users: opts.users.clone(),
                passwords: parts.passwords,
                client_cert: opts.client_ca.is_some(),
            },
            acl: parts.acl,
            tls: parts.tls,
            max_packet: opts.max_payload_size,
            connect_timeout: Duration::from_millis(u64::from(opts.connection_timeout_ms)),
            max_connections: opts.max_connections,
            max_pending: opts.max_pending_connects,
            rate: opts.failure_budget,
        })
        .map_err(BrokerError::Spawn)?;
        // The listener is bound, so this only proves that nothing is badly wrong with it.
        let target = match addr.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => {
                SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
            }
            ip if ip.is_unspecified() => {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
            }
            _ => addr,
        };
        TcpStream::connect_timeout(&target, Duration::from_millis(500)).map_err(|_| {
            BrokerError::NotReady {
                addr,
                after: Duration::from_millis(500),
            }
        })?;
        tracing::info!(%listeners, "embedded MQTT broker ready");
        Ok(Self {
            addr,
            addr_v5: None,
        })
    }

    /// The MQTT 3.1.1 listener's address (the port is the bound one, never 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The MQTT 5 listener's address, when one was configured.
    pub fn addr_v5(&self) -> Option<SocketAddr> {
        self.addr_v5
    }
}

/// Starts rumqttd on a dedicated thread; the receiver gets its exit reason.
fn run_rumqttd(config: rumqttd::Config) -> Result<mpsc::Receiver<String>, BrokerError> {
    let (exit_tx, exit_rx) = mpsc::channel::<String>();
    std::thread::Builder::new()
        .name("fedmq-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            keep_router_awake(&broker);
            // `start` returns only when every listener thread has ended: during start-up
            // that means they failed to bind.
            let reason = match broker.start() {
                Ok(()) => "all listeners stopped".to_string(),
                Err(e) => e.to_string(),
            };
            let _ = exit_tx.send(reason);
        })
        .map_err(BrokerError::Spawn)?;
    Ok(exit_rx)
}

/// Sets `TCP_NODELAY` on rumqttd's listening sockets at `addrs`, so that the connections it
/// accepts inherit it (as they do on Linux). rumqttd never sets it: its small writes to a client
/// (an acknowledgement, then a message) then wait for that client's delayed ACK, 40 ms, whenever
/// an earlier write is unacknowledged, which held every second control message of a secure round
/// by 40 ms. rumqttd binds its listeners itself, so they are found among this process's
/// descriptors by their bound address. Elsewhere than Linux this does nothing.
fn nodelay_on_listeners(addrs: &[SocketAddr]) {
    let mut found = 0;
    for_each_socket(|sock| {
        let listening = sock.is_listener().unwrap_or(false);
        let bound = sock.local_addr().ok().and_then(|a| a.as_socket());
        if listening && bound.is_some_and(|a| addrs.contains(&a)) {
            found += usize::from(sock.set_tcp_nodelay(true).is_ok());
        }
    });
    if found < addrs.len() {
        tracing::debug!(found, "TCP_NODELAY not set on every rumqttd listener");
    }
}

/// Calls `f` with each socket this process has open (on Linux; elsewhere, none).
fn for_each_socket(mut f: impl FnMut(socket2::SockRef<'_>)) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::{BorrowedFd, RawFd};
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
            return;
        };
        for entry in dir.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<RawFd>().ok())
            else {
                continue;
            };
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
            if !is_socket {
                continue;
            }
            // SAFETY: `fd` was open when listed and is only borrowed for `f`'s calls. Were it
            // closed and its number reused meanwhile, the calls act on whatever socket has it
            // (callers check what it is before changing it) or fail.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            f(socket2::SockRef::from(&borrowed));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = &mut f;
}

/// How often the router is nudged ([`keep_router_awake`]).
const ROUTER_TICK: Duration = Duration::from_millis(100);

/// Works around a stall in rumqttd 0.20: a connection that disconnects while it waits in the
/// router's ready queue leaves its id there; when the router next polls that id it finds no
/// connection, treats the queue as empty and blocks for a new event, with other connections
/// (a new one awaiting its CONNACK among them) still queued. The listener thread that accepted
/// that new connection waits for the CONNACK synchronously, so no event comes from any of its
/// connections: the broker stalls for good (seen with 1,000 clients connecting while others
/// finished). A local link that tells the router it is ready every [`ROUTER_TICK`] is such an
/// event: the router wakes and works through its queue.
fn keep_router_awake(broker: &rumqttd::Broker) {
    let rx = match broker.link("fedmq-router-tick") {
        Ok((_tx, rx)) => rx,
        Err(e) => {
            tracing::warn!(
                "embedded broker: no router tick ({e}); a connection storm may stall it"
            );
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("fedmq-broker-tick".into())
        .spawn(move || {
            // Ends when the router is gone.
            while rx.ready().is_ok() {
                std::thread::sleep(ROUTER_TICK);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("embedded broker: no router tick ({e}); a connection storm may stall it");
    }
}

/// Probes `targets` (address, protocol level) until each answers, rumqttd exits, or
/// `ready_timeout` passes.
fn wait_ready(
    exit_rx: &mpsc::Receiver<String>,
    listeners: &str,
    mut targets: Vec<(SocketAddr, u8)>,
    login: Option<(&String, &String)>,
    tls: Option<&Arc<rustls::ClientConfig>>,
    ready_timeout: Duration,
) -> Result<(), BrokerError> {
    let deadline = Instant::now() + ready_timeout;
    let mut pause = Duration::from_millis(1);
    while !targets.is_empty() {
        if let Ok(reason) = exit_rx.try_recv() {
            return Err(BrokerError::Exited {
                listeners: listeners.to_string(),
                reason,
            });
        }
        targets.retain(|&(a, level)| !probe(a, level, login, tls));
        if targets.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(BrokerError::NotReady {
                addr: targets[0].0,
                after: ready_timeout,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Ok(())
}

/// Port 0 → a port that was free a moment ago on the same IP.
fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let listener = TcpListener::bind(addr).map_err(|source| BrokerError::NoFreePort {
        ip: addr.ip(),
        source,
    })?;
    listener
        .local_addr()
        .map_err(|source| BrokerError::NoFreePort {
            ip: addr.ip(),
            source,
        })
}

/// One readiness probe: TCP connect, (TLS handshake,) MQTT CONNECT (protocol level 4 or 5, clean
/// session), and a CONNACK back (any return code: even "not authorized" proves an MQTT broker is
/// answering). Then DISCONNECT. Every step is bounded by a short timeout.
fn probe(
    addr: SocketAddr,
    level: u8,
    login: Option<(&String, &String)>,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> bool {
    let step = Duration::from_millis(500);
    let Ok(s) = TcpStream::connect_timeout(&addr, step) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(step));
    let _ = s.set_write_timeout(Some(step));
    let Some(config) = tls else {
        return mqtt_probe(s, level, login, |s| {
            let _ = s.shutdown(std::net::Shutdown::Write);
        });
    };
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let Ok(conn) = rustls::ClientConnection::new(config.clone(), name) else {
        return false;
    };
    mqtt_probe(rustls::StreamOwned::new(conn, s), level, login, |s| {
        s.conn.send_close_notify();
        let _ = s.flush();
    })
}

/// The MQTT part of [`probe`] on a connected stream; `close` ends our side after DISCONNECT.
fn mqtt_probe<S: Read + Write>(
    mut s: S,
    level: u8,
    login: Option<(&String, &String)>,
    close: impl FnOnce(&mut S),
) -> bool {
    if s.write_all(&connect_packet(level, login)).is_err() {
        return false;
    }
    let mut head = [0u8; 2];
    if s.read_exact(&mut head).is_err() || head[0] != 0x20 {
        return false;
    }
    // Read the rest of the CONNACK (short: its remaining length fits in one byte) so that the
    // close below is orderly rather than a reset with unread data.
    let mut rest = vec![0u8; usize::from(head[1] & 0x7f)];
    let _ = s.read_exact(&mut rest);
    // DISCONNECT (remaining length 0 is valid in both 3.1.1 and 5), then wait for the broker to
    // close its side.
    let _ = s.write_all(&[0xE0, 0x00]);
    close(&mut s);
    let _ = s.read(&mut [0u8; 16]);
    true
}

/// The readiness probe's TLS client: it accepts exactly the certificate the broker was given
/// (signatures still checked), so it proves that *our* broker answers, whatever names or CA
/// that certificate has.
fn probe_tls_config(cert: rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let provider = crate::crypto::tls::crypto_provider();
    let verifier = Arc::new(PinnedCert {
        cert,
        provider: provider.clone(),
    });
    // Invariant: ring's default provider supports the safe default protocol versions.
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

/// Accepts one certificate, byte for byte.
#[derive(Debug)]
struct PinnedCert {
    cert: rustls::pki_types::CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "not the embedded broker's certificate".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A minimal MQTT CONNECT packet for the readiness probe.
fn connect_packet(level: u8, login: Option<(&String, &String)>) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        // Invariant: probe strings are short (client id, configured user names and passwords,
        // which MQTT itself limits to 65,535 bytes), so the length fits in u16.
        out.extend_from_slice(&(s.len().min(u16::MAX as usize) as u16).to_be_bytes());
        out.extend_from_slice(&s[..s.len().min(u16::MAX as usize)]);
    }
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(level);
    let mut flags = 0x02; // clean session
    if login.is_some() {
        flags |= 0xC0; // user name + password
    }
    body.push(flags);
    body.extend_from_slice(&10u16.to_be_bytes()); // keep-alive (rumqttd refuses 0)
    if level == 5 {
        body.push(0); // no properties
    }
    let id = format!("fedmq-probe-{:08x}", rand::random::<u32>());
    string(&mut body, id.as_bytes());
    if let Some((user, pass)) = login {
        string(&mut body, user.as_bytes());
        string(&mut body, pass.as_bytes());
    }
    let mut packet = vec![0x10];
    super::gateway::put_remaining_length(&mut packet, body.len());
    packet.extend_from_slice(&body);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_toml_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/rumqttd.toml");
        let opts = BrokerOptions::from_toml(&path).expect("broker/rumqttd.toml");
        assert_eq!(opts.listen, "127.0.0.1:1883".parse().unwrap());
        assert_eq!(opts.listen_v5, Some("127.0.0.1:1884".parse().unwrap()));
        assert_eq!(opts.max_payload_size, DEFAULT_MAX_PACKET_SIZE);
        assert!(opts.users.is_none());
    }

    #[test]
    fn unsupported_and_invalid_configs_are_named() {
        let base = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/rumqttd.toml"),
        )
        .unwrap();
        let with_console = format!("{base}\n[console]\nlisten = \"127.0.0.1:3030\"\n");
        assert!(matches!(
            BrokerOptions::from_toml_str(&with_console),
            Err(BrokerError::Unsupported { .. })
        ));
        let small = base.replace("max_payload_size = 262144", "max_payload_size = 20480");
        assert!(matches!(
            BrokerOptions::from_toml_str(&small),
            Err(BrokerError::InvalidOption {
                field: "max_payload_size",
                ..
            })
        ));
        assert!(matches!(
            BrokerOptions::from_toml_str("id = 0\n[router]\nmax_connections = 1"),
            Err(BrokerError::ParseConfig { .. })
        ));
    }

    #[test]
    fn tls_listeners_parse_and_capath_needs_the_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let plan = crate::crypto::tls::CertsPlan::new(dir.path(), vec!["server".into()]);
        crate::crypto::tls::generate_certs(&plan).unwrap();
        let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
        let base = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/rumqttd.toml"),
        )
        .unwrap();
        let tls_line = format!(
            "tls = {{ certpath = {:?}, keypath = {:?} }}",
            p("broker.pem"),
            p("broker.key")
        );
        let commented =
            "# tls = { certpath = \"certs/broker.pem\", keypath = \"certs/broker.key\" }";
        assert!(base.contains(commented));
        // Both listeners: parsed into one setting.
        let both = base.replace(commented, &tls_line).replace(
            "listen = \"127.0.0.1:1884\"",
            &format!("listen = \"127.0.0.1:1884\"\n{tls_line}"),
        );
        let opts = BrokerOptions::from_toml_str(&both).unwrap();
        assert_eq!(
            opts.tls,
            Some(BrokerTls {
                cert: p("broker.pem").into(),
                key: p("broker.key").into()
            })
        );
        // Only on [v4]: the embedded broker cannot apply different settings.
        let v4_only = base.replace(commented, &tls_line);
        assert!(matches!(
            BrokerOptions::from_toml_str(&v4_only),
            Err(BrokerError::Unsupported { what }) if what.contains("different TLS settings")
        ));
        // capath (client certificates): mutual TLS through the gateway, MQTT 3.1.1 only.
        let ca_line = format!(
            "tls = {{ capath = {:?}, certpath = {:?}, keypath = {:?} }}",
            p("ca.pem"),
            p("broker.pem"),
            p("broker.key")
        );
        let v5_start = base.find("[v5.1]").unwrap();
        let v4_only_ca = base[..v5_start].replace(commented, &ca_line);
        let opts = BrokerOptions::from_toml_str(&v4_only_ca).unwrap();
        assert_eq!(opts.client_ca, Some(p("ca.pem").into()));
        assert!(opts.listen_v5.is_none() && opts.tls.is_some());
        let both_ca = base.replace(commented, &ca_line).replace(
            "listen = \"127.0.0.1:1884\"",
            &format!("listen = \"127.0.0.1:1884\"\n{ca_line}"),
        );
        match BrokerOptions::from_toml_str(&both_ca) {
            Err(
                e @ BrokerError::InvalidOption {
                    field: "listen_v5", ..
                },
            ) => assert!(e.to_string().contains("3.1.1"), "{e}"),
            other => panic!("{other:?}"),
        }
        // A missing key file is named.
        let missing = both.replace(&p("broker.key"), &p("gone.key"));
        match BrokerOptions::from_toml_str(&missing) {
            Err(e @ BrokerError::InvalidOption { field: "tls", .. }) => {
                assert!(e.to_string().contains("gone.key"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gateway_options_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/fedmq.acl");
        let field = |o: BrokerOptions| match o.validate() {
            Err(BrokerError::InvalidOption { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let users = Some(HashMap::from([("client-1".to_string(), "pw".to_string())]));
        let with_acl = BrokerOptions {
            acl_file: Some(acl.clone()),
            users: users.clone(),
            ..Default::default()
        };
        with_acl.validate().unwrap();
        assert_eq!(
            field(BrokerOptions {
                users: None,
                ..with_acl.clone()
            }),
            "acl_file"
        );
        assert_eq!(
            field(BrokerOptions {
                listen_v5: Some("127.0.0.1:0".parse().unwrap()),
                ..with_acl.clone()
            }),
            "listen_v5"
        );
        assert_eq!(
            field(BrokerOptions {
                client_ca: Some(dir.path().join("ca.pem")),
                ..Default::default()
            }),
            "client_ca"
        );
        let passwd = dir.path().join("passwd");
        std::fs::write(&passwd, "client-1:$6$AAAA$AAAA\n").unwrap();
        assert_eq!(
            field(BrokerOptions {
                password_file: Some(passwd),
                ..with_acl.clone()
            }),
            "password_file"
        );
        assert_eq!(
            field(BrokerOptions {
                failure_budget: FailureBudget {
                    burst: 0,
                    per_second: 1.0
                },
                ..with_acl
            }),
            "failure_budget"
        );
        let s = format!(
            "{:?}",
            BrokerOptions {
                acl_file: Some(acl),
                ..Default::default()
            }
        );
        assert!(s.contains("fedmq.acl"), "{s}");
    }

    /// The connections rumqttd accepts have `TCP_NODELAY` (inherited from the listener the
    /// broker set it on): found among this process's sockets by their two addresses.
    #[cfg(target_os = "linux")]
    #[test]
    fn accepted_connections_have_nodelay() {
        let broker = EmbeddedBroker::start(BrokerOptions::default()).unwrap();
        let stream = std::net::TcpStream::connect(broker.addr()).unwrap();
        let ours = stream.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let nodelay = loop {
            let mut hit = None;
            for_each_socket(|sock| {
                let local = sock.local_addr().ok().and_then(|a| a.as_socket());
                let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
                if local == Some(broker.addr()) && peer == Some(ours) {
                    hit = sock.tcp_nodelay().ok();
                }
            });
            if hit.is_some() || Instant::now() > deadline {
                break hit;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(nodelay, Some(true), "the broker's side of the connection");
        drop(stream);
    }

    #[test]
    fn debug_redacts_passwords() {
        let opts = BrokerOptions {
            users: Some(HashMap::from([("alice".into(), "s3cret".into())])),
            ..Default::default()
        };
        let s = format!("{opts:?}");
        assert!(s.contains("alice") && !s.contains("s3cret"), "{s}");
    }

    #[test]
    fn connect_packet_encodes_remaining_length() {
        let p = connect_packet(4, None);
        assert_eq!(p[0], 0x10);
        assert_eq!(p[1] as usize, p.len() - 2);
        assert_eq!(&p[2..8], b"\x00\x04MQTT");
        assert_eq!(p[8], 4);
    }
}
