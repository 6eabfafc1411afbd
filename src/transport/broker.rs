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

use super::{DEFAULT_MAX_PACKET_SIZE, MIN_PACKET_SIZE};
use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
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
    /// User name → password. `None`: anonymous access (fine on 127.0.0.1; use it, or TLS when it
    /// lands, on any other interface).
    pub users: Option<HashMap<String, String>>,
    /// How long [`EmbeddedBroker::start`] waits for the listeners to answer.
    pub ready_timeout: Duration,
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
            .finish()
    }
}

impl BrokerOptions {
    /// Reads a rumqttd configuration file (`broker/rumqttd.toml` is the reference). The file
    /// keeps rumqttd's own shape, so it also works with the upstream `rumqttd` binary.
    ///
    /// The embedded broker supports: `[router]`, exactly one `[v4.*]` listener, at most one
    /// `[v5.*]` listener, and their `connections` settings (`auth` included). The MQTT 5 listener
    /// uses the MQTT 3.1.1 listener's connection settings.
    ///
    /// # Errors
    /// [`BrokerError::ReadConfig`] / [`BrokerError::ParseConfig`] for an unreadable or malformed
    /// file, [`BrokerError::Unsupported`] for sections the embedded broker does not run (TLS,
    /// websockets, bridge, cluster, console, prometheus, metrics), and
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
            let server = servers.pop();
            if server.as_ref().is_some_and(|s| s.tls.is_some()) {
                return Err(unsupported(&format!(
                    "TLS on the [{section}] listener (TLS comes in a later release)"
                )));
            }
            Ok(server)
        };
        let v4 = one(cfg.v4, "v4")?.ok_or_else(|| BrokerError::InvalidOption {
            field: "v4",
            reason: "exactly one [v4.*] listener is required (fedmq sessions speak MQTT 3.1.1)"
                .into(),
        })?;
        let v5 = one(cfg.v5, "v5")?;
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
        Ok(())
    }

    /// The rumqttd configuration for concrete (non-zero) listener addresses.
    fn to_rumqttd(&self, v4: SocketAddr, v5: Option<SocketAddr>) -> rumqttd::Config {
        let connections = rumqttd::ConnectionSettings {
            connection_timeout_ms: self.connection_timeout_ms,
            max_payload_size: self.max_payload_size,
            max_inflight_count: self.max_inflight,
            auth: self.users.clone(),
            external_auth: None,
            // Required: without it rumqttd refuses publishes to topics nobody has subscribed to
            // yet (a command sent before its client connected).
            dynamic_filters: true,
        };
        let server = |name: &str, listen| rumqttd::ServerSettings {
            name: name.into(),
            listen,
            tls: None,
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
        let addr = resolve_port(opts.listen)?;
        let addr_v5 = opts.listen_v5.map(resolve_port).transpose()?;
        let config = opts.to_rumqttd(addr, addr_v5);
        let listeners = match addr_v5 {
            Some(v5) => format!("{addr} (MQTT 3.1.1), {v5} (MQTT 5)"),
            None => format!("{addr} (MQTT 3.1.1)"),
        };

        let (exit_tx, exit_rx) = mpsc::channel::<String>();
        std::thread::Builder::new()
            .name("fedmq-broker".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                // `start` returns only when every listener thread has ended: during start-up
                // that means they failed to bind.
                let reason = match broker.start() {
                    Ok(()) => "all listeners stopped".to_string(),
                    Err(e) => e.to_string(),
                };
                let _ = exit_tx.send(reason);
            })
            .map_err(BrokerError::Spawn)?;

        let probe_user = opts.users.as_ref().and_then(|u| u.iter().next());
        let deadline = Instant::now() + opts.ready_timeout;
        let mut targets: Vec<(SocketAddr, u8)> = vec![(addr, 4)];
        targets.extend(addr_v5.map(|a| (a, 5)));
        let mut pause = Duration::from_millis(1);
        while !targets.is_empty() {
            if let Ok(reason) = exit_rx.try_recv() {
                return Err(BrokerError::Exited { listeners, reason });
            }
            targets.retain(|&(a, level)| !probe(a, level, probe_user));
            if targets.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(BrokerError::NotReady {
                    addr: targets[0].0,
                    after: opts.ready_timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        tracing::info!(%listeners, "embedded MQTT broker ready");
        Ok(Self { addr, addr_v5 })
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

/// One readiness probe: TCP connect, MQTT CONNECT (protocol level 4 or 5, clean session), and a
/// CONNACK back (any return code: even "not authorized" proves an MQTT broker is answering).
/// Then DISCONNECT. Every step is bounded by a short timeout.
fn probe(addr: SocketAddr, level: u8, login: Option<(&String, &String)>) -> bool {
    let step = Duration::from_millis(500);
    let Ok(mut s) = TcpStream::connect_timeout(&addr, step) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(step));
    let _ = s.set_write_timeout(Some(step));
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
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.read(&mut [0u8; 16]);
    true
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
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
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
