//! The MQTT session: one task polls the rumqttc event loop; cloneable [`MqttHandle`]s publish.
//!
//! [`MqttSession::connect`] validates [`SessionOptions`], spawns the driver task and returns a
//! [`MqttHandle`] plus a bounded [`mpsc::Receiver`] of [`Incoming`] publishes. The driver is the
//! only code that touches the rumqttc [`EventLoop`]; it never blocks on anything but the network
//! and cancellation. Incoming publishes reach the bounded channel through a relay task, so a slow
//! consumer never stalls the network or the keep-alive, even while it waits to publish; beyond a
//! bounded backlog ([`MAX_INCOMING_BACKLOG`] bytes) new publishes are shed with a warning.
//!
//! Wire defaults: MQTT 3.1.1, QoS 1 for every publish and subscription, persistent sessions
//! (`clean_session = false`), a maximum packet size of [`super::DEFAULT_MAX_PACKET_SIZE`] in both
//! directions, and the participant's presence as a retained status with a retained last will.
//!
//! Design: why MQTT 3.1.1. Every broker a federation may meet speaks it (Mosquitto, EMQX, HiveMQ,
//! rumqttd, AWS IoT, …), as does every client library on the devices we target. fedmq's
//! guarantees are built from features 3.1.1 already has (QoS 1, retained messages, last will,
//! persistent sessions) plus application-level ids, so MQTT 5 (session expiry, reason codes,
//! negotiated packet sizes) would add nothing we rely on; the JSON on the wire is the same on
//! both, and non-Rust participants may use either.
//!
//! Design: reconnection. On any connection error the driver marks the session
//! [`ConnState::Disconnected`], logs the change once, sleeps an exponential back-off with jitter
//! (50 ms doubling to 5 s by default; half fixed, half random, so a restarted broker is not hit
//! by every client at once) and polls again, which makes rumqttc reconnect. On **every**
//! CONNACK, whether or not the broker says it kept our session, the driver (1) re-subscribes (a
//! restarted broker without persistence has forgotten our subscriptions), (2) re-publishes the
//! retained online presence with a fresh message id, and (3) re-publishes every retained message
//! this session has published (the retained ledger, latest per topic). The session reports
//! [`ConnState::Connected`] only once the broker has acknowledged the subscriptions.
//!
//! Design: delivery of commands ("a QoS 1 command published while a client is briefly
//! disconnected is still delivered").
//! - While the broker stays up, a persistent session (`clean_session = false`) makes the broker
//!   queue QoS 1 messages for a disconnected subscriber; nothing else is needed.
//! - When the broker restarts, an in-memory broker (rumqttd; Mosquitto without persistence or
//!   killed between autosaves) loses sessions, subscriptions and retained messages. Worse, the
//!   publisher's own copy is not safe: rumqttc drops its unacknowledged messages when the new
//!   broker answers "no session present", and a message that does reach the new broker before
//!   the client has re-subscribed is delivered to nobody.
//! - fedmq therefore publishes commands (`cmd/<client>`) **retained**, and the session keeps the
//!   latest retained payload per topic and re-publishes it on every CONNACK. Whichever order the
//!   two ends reconnect in, the client gets the command: either the broker still holds it
//!   retained when the client (re-)subscribes, or the server's re-publication reaches the
//!   subscribed client live. The same mechanism also covers a client *process* restart (it
//!   receives its latest command on subscribe).
//! - The cost is duplicates (a queued copy, a retained copy on re-subscribe, a re-published
//!   copy), which the receiver drops: the message id is unique per sender and stays the same in
//!   every copy, so [`Dedup`] (keyed by `from` and `id`) delivers each command exactly once,
//!   and rounds and deadlines make an old retained command stale (`docs/PROTOCOL.md`, receiving
//!   rules). Presence differs on purpose: each (re)connection's online status and last will get a
//!   fresh id, since they are new events, not copies.
//! - A topic's retained command is cleared with [`MqttHandle::clear_retained`] (an empty retained
//!   payload, which the driver never forwards as a message).
//! - Test: `tests/mqtt.rs` crashes and restarts Mosquitto and `fedmq broker` (rumqttd) on the
//!   same port. A command published at the moment of the crash (rumqttc writes it into the dead
//!   connection, then drops it when the new broker reports no session: without the ledger the
//!   test fails) arrives exactly once after [`Dedup`]; and a client that comes back only after
//!   the server has re-sent its command to the new broker gets it from the retained store.

use super::{DEFAULT_MAX_PACKET_SIZE, MIN_PACKET_SIZE};
use crate::config::MqttConfig;
use crate::crypto::tls;
use crate::proto::{
    self, Body, Capabilities, Envelope, Presence, Role, Status, TopicKind, Topics,
    MAX_MESSAGE_BYTES,
};
use bytes::Bytes;
use rand::Rng;
use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing,
    Packet, QoS, Request, SubscribeFilter, SubscribeReasonCode,
};
use rumqttc::{TlsConfiguration, Transport};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Errors of the session layer.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// A session option is out of range.
    #[error("MQTT session option `{field}`: {reason}")]
    InvalidOption {
        /// Which option.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// The encoded message exceeds [`MAX_MESSAGE_BYTES`]; nothing was sent.
    #[error(
        "message of {len} bytes for {topic} exceeds the {max}-byte control-message limit; \
         large data belongs in the object store"
    )]
    TooLarge {
        /// Destination topic.
        topic: String,
        /// Encoded length.
        len: usize,
        /// [`MAX_MESSAGE_BYTES`].
        max: usize,
    },
    /// Not a valid MQTT topic name (empty, or contains wildcards or NUL).
    #[error("invalid MQTT topic name {topic:?}")]
    InvalidTopic {
        /// The topic.
        topic: String,
    },
    /// The session has ended (shut down, cancelled or aborted); the request was not sent and is
    /// handed back.
    #[error("MQTT session is closed; request not sent")]
    Closed {
        /// The unsent request.
        request: Box<Request>,
    },
    /// The broker was not reached when the participant started.
    #[error(
        "the MQTT broker at {endpoint} was not reached within {after:?}{}; check \
         comm_args.customized_training_mqtt_config.BROKER_HOST and BROKER_PORT, and that the \
         broker is running",
        last_error_suffix(.last_error)
    )]
    BrokerUnreachable {
        /// `host:port`.
        endpoint: String,
        /// How long we waited.
        after: Duration,
        /// The last connection error.
        last_error: Option<String>,
    },
    /// A wait on the connection state timed out.
    #[error(
        "timed out after {after:?} waiting for the MQTT session to be {want:?} (it is {now:?}){}",
        last_error_suffix(.last_error)
    )]
    Timeout {
        /// The state waited for.
        want: ConnState,
        /// The state at the deadline.
        now: ConnState,
        /// How long we waited.
        after: Duration,
        /// The last connection error of the session, when its latest attempt failed (for a
        /// TLS handshake failure: what failed and what to check).
        last_error: Option<String>,
    },
    /// The session closed while waiting for another state.
    #[error("the MQTT session closed while waiting for it to be {want:?}")]
    ClosedWhileWaiting {
        /// The state waited for.
        want: ConnState,
    },
}

fn last_error_suffix(e: &Option<String>) -> String {
    e.as_ref()
        .map(|e| format!("; last connection error: {e}"))
        .unwrap_or_default()
}

/// Why a received publish is not a valid message for this run (see `docs/PROTOCOL.md`,
/// receiving rules). Receivers log it and drop the message.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The topic is not one of this run's topics.
    #[error("topic {topic:?} is not a topic of this run")]
    ForeignTopic {
        /// The topic.
        topic: String,
    },
    /// The payload is not a valid v1 message.
    #[error("message on {topic}: {source}")]
    Decode {
        /// The topic.
        topic: String,
        /// Why decoding failed.
        source: proto::DecodeError,
    },
    /// The envelope names another run than its topic.
    #[error("message on {topic} belongs to run {run:?}")]
    WrongRun {
        /// The topic.
        topic: String,
        /// The envelope's run.
        run: String,
    },
    /// The sender is not the participant the topic belongs to: a client may only speak for
    /// itself, and only the server sends commands.
    #[error("message on {topic} claims to be from {from:?}; only {expected:?} may publish there")]
    WrongSender {
        /// The topic.
        topic: String,
        /// The envelope's `from`.
        from: String,
        /// Who may publish on the topic.
        expected: String,
    },
    /// The message type does not belong on this topic.
    #[error("a `{kind}` message does not belong on {topic}")]
    WrongType {
        /// The topic.
        topic: String,
        /// The envelope's `body.type`.
        kind: &'static str,
    },
}

/// Connection state of a session, observable through [`MqttHandle::watch_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Connecting for the first time, or connected and waiting for the subscriptions to be
    /// acknowledged.
    Connecting,
    /// Connected, subscriptions acknowledged, online presence published.
    Connected,
    /// The connection was lost or refused; the driver is backing off before the next attempt.
    Disconnected,
    /// The session has ended (shutdown, cancellation or abort). Final.
    Closed,
}

/// The retained presence of a participant: the online status published on every connection and
/// the offline status registered as MQTT last will (and published on a clean shutdown). Each
/// (re)connection sends them with a fresh message id and timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceMessages {
    /// The participant's status topic ([`Topics::status`]).
    pub topic: String,
    /// Published retained on every CONNACK.
    pub online: Envelope,
    /// Registered as the retained last will; published on a clean shutdown.
    pub offline: Envelope,
}

impl PresenceMessages {
    /// The status messages of `participant` in run `run`: online (with `capabilities`) and
    /// offline, on [`Topics::status`].
    pub fn status(
        run: &str,
        participant: &str,
        role: Role,
        capabilities: Option<Capabilities>,
    ) -> Self {
        let msg = |state, capabilities| {
            Envelope::new(
                run,
                0,
                participant,
                Body::Status(Status {
                    state,
                    role,
                    capabilities,
                    announce_window_ms: None,
                }),
            )
        };
        Self {
            topic: Topics::new(run).status(participant),
            online: msg(Presence::Online, capabilities),
            offline: msg(Presence::Offline, None),
        }
    }

    /// The server's presence: its online status asks clients that see it anew to announce
    /// themselves again within `window` ([`Status::announce_window_ms`]).
    #[must_use]
    pub fn with_announce_window(mut self, window: Duration) -> Self {
        if let Body::Status(s) = &mut self.online.body {
            s.announce_window_ms = Some(window.as_millis() as u64);
        }
        self
    }
}

/// TLS settings of a session (`MQTT_TLS` and the `MQTT_*_PATH` keys of
/// `customized_training_mqtt_config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTls {
    /// PEM file of the CA(s) that signed the broker's certificate; only these are trusted. The
    /// broker's certificate must also be valid for [`SessionOptions::host`] (a DNS name or IP
    /// address in its subject alternative names).
    pub ca: PathBuf,
    /// Client certificate and key for mutual TLS, for brokers that require one.
    pub identity: Option<tls::Identity>,
}

/// Seconds to wait for the broker's CONNACK before reconnecting.
const CONNACK_TIMEOUT_S: u64 = 30;

/// Settings of one MQTT session. [`SessionOptions::new`] gives fedmq's defaults.
#[derive(Clone)]
pub struct SessionOptions {
    /// Broker host name or IP.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id (it keys the broker's persistent session, so it must be stable across
    /// reconnects and unique among connected participants; the server and clients use
    /// [`Topics::mqtt_client_id`], `fedmq-<run>-<participant>`).
    pub client_id: String,
    /// User name, if the broker requires authentication.
    pub user: Option<String>,
    /// Password (used only with `user`).
    pub password: Option<String>,
    /// MQTT keep-alive: the broker declares a silent connection dead (and publishes the last
    /// will) after 1.5 × this. At least 1 s (rumqttd refuses 0) and at most 65,535 s.
    pub keepalive: Duration,
    /// `false` (the default): a persistent session, so the broker queues QoS 1 messages while we
    /// are briefly disconnected. Requires a non-empty `client_id`.
    pub clean_session: bool,
    /// Largest MQTT packet sent or received (both directions). At least
    /// [`super::MIN_PACKET_SIZE`]; keep it equal to the broker's limit (see
    /// [`super::DEFAULT_MAX_PACKET_SIZE`]).
    pub max_packet_size: usize,
    /// TLS (`None`: plain TCP). See [`MqttTls`].
    pub tls: Option<MqttTls>,
    /// Signs every message this session publishes (presence and last will included) with this
    /// participant's key (`crate::crypto::identity`); `None`: unsigned.
    pub signer: Option<Arc<crate::crypto::identity::Identity>>,
    /// Topic filters subscribed (QoS 1) on every connection.
    pub subscriptions: Vec<String>,
    /// Retained presence and last will, if this participant announces itself.
    pub presence: Option<PresenceMessages>,
    /// Capacity of the incoming channel and of rumqttc's request channel. A full request channel
    /// makes [`MqttHandle::publish`] wait (backpressure while the broker is unreachable).
    pub queue_capacity: usize,
    /// First reconnection back-off.
    pub backoff_initial: Duration,
    /// Largest reconnection back-off.
    pub backoff_max: Duration,
    /// How long a clean shutdown may take to publish the offline status and disconnect.
    pub close_timeout: Duration,
    /// Disable Nagle's algorithm on the socket (default `true`). Control messages are small and
    /// latency-bound: with Nagle on, a QoS 1 exchange can stall on the peer's delayed ACK
    /// (tens of milliseconds per hop; see `docs/BENCHMARKS.md`, "Control-message round trip").
    pub tcp_nodelay: bool,
}

impl fmt::Debug for SessionOptions {
    // Hand-written so that the password never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("keepalive", &self.keepalive)
            .field("clean_session", &self.clean_session)
            .field("max_packet_size", &self.max_packet_size)
            .field("subscriptions", &self.subscriptions)
            .field("presence", &self.presence.as_ref().map(|p| &p.topic))
            .field("queue_capacity", &self.queue_capacity)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("close_timeout", &self.close_timeout)
            .field("tcp_nodelay", &self.tcp_nodelay)
            .field("tls", &self.tls)
            .finish()
    }
}

impl SessionOptions {
    /// fedmq's defaults for a session with `client_id` to `host:port`: anonymous, 60 s
    /// keep-alive, persistent session, 256 KiB packets, no subscriptions, no presence, queues of
    /// 256, back-off 50 ms → 5 s, 2 s to close, `TCP_NODELAY`.
    pub fn new(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port,
            client_id: client_id.into(),
            user: None,
            password: None,
            keepalive: Duration::from_secs(60),
            clean_session: false,
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            subscriptions: Vec::new(),
            presence: None,
            queue_capacity: 256,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            close_timeout: Duration::from_secs(2),
            tcp_nodelay: true,
            signer: None,
            tls: None,
        }
    }

    /// Defaults plus the broker address, credentials (when `MQTT_USER` is non-empty),
    /// keep-alive and TLS settings (when `MQTT_TLS` is true) of
    /// `comm_args.customized_training_mqtt_config`, for participant `client_id`: `{id}` in
    /// `MQTT_USER`, `MQTT_CERT_PATH` and `MQTT_KEY_PATH` is replaced by it.
    pub fn from_config(cfg: &MqttConfig, client_id: impl Into<String>) -> Self {
        let client_id = client_id.into();
        // `{id}` in the user name and the certificate paths stands for the participant id, so
        // one config serves every participant of a deployment.
        let own = |v: &str| v.replace("{id}", &client_id);
        let mut opts = Self::new(cfg.broker_host.clone(), cfg.broker_port, client_id.clone());
        if !cfg.mqtt_user.is_empty() {
            opts.user = Some(own(&cfg.mqtt_user));
            opts.password = Some(cfg.mqtt_pwd.clone());
        }
        opts.keepalive = Duration::from_secs(cfg.mqtt_keepalive);
        if cfg.mqtt_tls {
            let path = |p: &str| (!p.is_empty()).then(|| PathBuf::from(own(p)));
            opts.tls = Some(MqttTls {
                ca: PathBuf::from(&cfg.mqtt_ca_path),
                identity: path(&cfg.mqtt_cert_path)
                    .zip(path(&cfg.mqtt_key_path))
                    .map(|(cert, key)| tls::Identity { cert, key }),
            });
        }
        opts
    }

    /// Checks every option that rumqttc would otherwise panic on or a broker would refuse.
    ///
    /// # Errors
    /// [`MqttError::InvalidOption`] naming the option.
    pub fn validate(&self) -> Result<(), MqttError> {
        let bad = |field, reason: String| Err(MqttError::InvalidOption { field, reason });
        if self.host.is_empty() {
            return bad("host", "must not be empty".into());
        }
        if self.port == 0 {
            return bad("port", "must not be 0".into());
        }
        if self.client_id.is_empty() {
            return bad(
                "client_id",
                "must not be empty (it keys the persistent session)".into(),
            );
        }
        if self.keepalive < Duration::from_secs(1)
            || self.keepalive > Duration::from_secs(u64::from(u16::MAX))
            || self.keepalive.subsec_nanos() != 0
        {
            return bad(
                "keepalive",
                format!(
                    "{:?} must be whole seconds between 1 s and 65535 s",
                    self.keepalive
                ),
            );
        }
        if self.max_packet_size < MIN_PACKET_SIZE {
            return bad(
                "max_packet_size",
                format!(
                    "{} bytes is below {MIN_PACKET_SIZE} (the largest control message plus MQTT \
                     framing)",
                    self.max_packet_size
                ),
            );
        }
        if let Some(f) = self
            .subscriptions
            .iter()
            .find(|f| !rumqttc::valid_filter(f))
        {
            return bad(
                "subscriptions",
                format!("{f:?} is not a valid topic filter"),
            );
        }
        if let Some(p) = &self.presence {
            if !rumqttc::valid_topic(&p.topic) {
                return bad("presence", format!("{:?} is not a valid topic", p.topic));
            }
            for env in [&p.online, &p.offline] {
                let len = proto::encode(env).len();
                if len > MAX_MESSAGE_BYTES {
                    return bad(
                        "presence",
                        format!("status of {len} bytes exceeds {MAX_MESSAGE_BYTES}"),
                    );
                }
            }
        }
        if self.queue_capacity == 0 {
            return bad("queue_capacity", "must be at least 1".into());
        }
        if let Some(t) = &self.tls {
            if t.ca.as_os_str().is_empty() {
                return bad(
                    "tls",
                    "the CA file path is empty (set MQTT_CA_PATH to the PEM file of the CA that \
                     signed the broker's certificate)"
                        .into(),
                );
            }
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return bad(
                "backoff",
                format!(
                    "need 0 < backoff_initial ({:?}) <= backoff_max ({:?})",
                    self.backoff_initial, self.backoff_max
                ),
            );
        }
        Ok(())
    }
}

/// A publish received from the broker. [`Incoming::decode`] turns it into a checked message.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The topic it was published on.
    pub topic: String,
    /// The payload (a JSON envelope, if the sender follows the protocol). Never empty: empty
    /// payloads clear retained messages and are not forwarded.
    pub payload: Bytes,
    /// Delivered from the broker's retained store (on subscribe) rather than live.
    pub retained: bool,
}

impl Incoming {
    /// Decodes the payload and applies the topic rules of `docs/PROTOCOL.md`: the topic belongs
    /// to `topics`' run, the envelope names the same run, the sender is the topic's participant
    /// (`server` for commands), and the message type belongs on the topic. Duplicates are the
    /// caller's to drop ([`Dedup`]).
    ///
    /// # Errors
    /// An [`IncomingError`] saying which rule the message breaks.
    pub fn decode(&self, topics: &Topics) -> Result<(TopicKind, Envelope), IncomingError> {
        let topic = || self.topic.clone();
        let kind = topics
            .parse(&self.topic)
            .ok_or_else(|| IncomingError::ForeignTopic { topic: topic() })?;
        let env = proto::decode(&self.payload).map_err(|source| IncomingError::Decode {
            topic: topic(),
            source,
        })?;
        if Topics::new(&env.run) != *topics {
            return Err(IncomingError::WrongRun {
                topic: topic(),
                run: env.run,
            });
        }
        let (expected, type_ok) = match &kind {
            TopicKind::Status(id) => (id.as_str(), matches!(env.body, Body::Status(_))),
            TopicKind::Command(_) => (
                "server",
                matches!(
                    env.body,
                    Body::Train(_)
                        | Body::Finish(_)
                        | Body::SaRoster(_)
                        | Body::SaCollect(_)
                        | Body::SaUnmask(_)
                ),
            ),
            TopicKind::Up(id) => (
                id.as_str(),
                matches!(
                    env.body,
                    Body::Update(_)
                        | Body::Failure(_)
                        | Body::SaKeys(_)
                        | Body::SaShares(_)
                        | Body::SaMasked(_)
                        | Body::SaReveal(_)
                ),
            ),
        };
        if env.from != expected {
            return Err(IncomingError::WrongSender {
                topic: topic(),
                from: env.from,
                expected: expected.to_string(),
            });
        }
        if !type_ok {
            return Err(IncomingError::WrongType {
                topic: topic(),
                kind: env.body.kind(),
            });
        }
        Ok((kind, env))
    }
}

/// Drops QoS 1 duplicates: remembers the last `capacity` (`from`, `id`) pairs seen.
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    seen: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
}

impl Dedup {
    /// A filter remembering the last `capacity` messages (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            seen: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// `true` the first time a (`from`, `id`) pair is seen, `false` for a duplicate.
    pub fn first_time(&mut self, msg: &Envelope) -> bool {
        let key = (msg.from.clone(), msg.id.clone());
        if self.seen.contains(&key) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(key.clone());
        self.order.push_back(key);
        true
    }
}

impl Default for Dedup {
    /// Remembers the last 4096 messages.
    fn default() -> Self {
        Self::new(4096)
    }
}

/// The latest payload of every retained topic this session published, re-published on every
/// CONNACK (see the module's `Design:` note). A std mutex: held only to insert, remove or clone.
type RetainedLedger = Arc<Mutex<BTreeMap<String, Bytes>>>;

/// Entry point: starts sessions.
#[derive(Debug)]
pub struct MqttSession;

impl MqttSession {
    /// Validates `opts` and spawns the session's driver task on the current tokio runtime; it
    /// connects in the background (wait with [`MqttHandle::wait_for`]). The session ends when
    /// `cancel` (or [`MqttHandle::shutdown`]) fires: it then publishes the offline status and
    /// disconnects cleanly, within `opts.close_timeout`.
    ///
    /// Returns the handle and the channel of incoming publishes (capacity
    /// `opts.queue_capacity`). Dropping the receiver discards incoming publishes; the session
    /// keeps running for publishing.
    ///
    /// With [`SessionOptions::tls`], the CA (and client certificate) files are read here; a
    /// failed TLS handshake is logged once as an error saying what to check, and reported by
    /// [`MqttHandle::last_error`] and in [`MqttError::Timeout`].
    ///
    /// # Errors
    /// [`MqttError::InvalidOption`] from [`SessionOptions::validate`], or with field `tls` when
    /// a certificate file is missing or invalid (the message names it).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn connect(
        opts: SessionOptions,
        cancel: CancellationToken,
    ) -> Result<(MqttHandle, mpsc::Receiver<Incoming>), MqttError> {
        opts.validate()?;
        let mut mqtt = MqttOptions::new(opts.client_id.clone(), opts.host.clone(), opts.port);
        // Invariants: validate() checked keepalive (whole seconds ≥ 1) and a non-empty client id,
        // the two conditions under which these rumqttc setters panic.
        mqtt.set_keep_alive(opts.keepalive)
            .set_clean_session(opts.clean_session)
            .set_max_packet_size(opts.max_packet_size, opts.max_packet_size);
        if let Some(user) = &opts.user {
            mqtt.set_credentials(user.clone(), opts.password.clone().unwrap_or_default());
        }
        if let Some(p) = &opts.presence {
            mqtt.set_last_will(last_will(p, &opts.signer));
        }
        if let Some(t) = &opts.tls {
            let config = tls::client_config(&t.ca, t.identity.as_ref()).map_err(|e| {
                MqttError::InvalidOption {
                    field: "tls",
                    reason: e.to_string(),
                }
            })?;
            mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(config),
            )));
        }
        let (client, mut eventloop) = AsyncClient::new(mqtt, opts.queue_capacity);
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(opts.tcp_nodelay);
        // rumqttc gives up on a CONNACK after 5 s and reconnects. A broker answering a storm of
        // connections (a thousand clients starting at once) can take longer; reconnecting then
        // only adds duplicate client ids to the storm (and stalled the embedded rumqttd's
        // listener), so wait for the CONNACK as long as the session waits to start.
        network.set_connection_timeout(CONNACK_TIMEOUT_S);
        eventloop.set_network_options(network);
        let (incoming_tx, incoming_rx) = mpsc::channel(opts.queue_capacity);
        // The driver hands incoming publishes to a relay task and never waits for the consumer
        // (see `Driver::forward`): the relay does the waiting.
        let (relay_tx, mut relay_rx) = mpsc::unbounded_channel::<Incoming>();
        let backlog = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let relay_backlog = backlog.clone();
        tokio::spawn(async move {
            while let Some(m) = relay_rx.recv().await {
                let len = incoming_cost(&m);
                let sent = incoming_tx.send(m).await;
                relay_backlog.fetch_sub(len, std::sync::atomic::Ordering::Relaxed);
                if sent.is_err() {
                    break;
                }
            }
        });
        let state = Arc::new(watch::Sender::new(ConnState::Connecting));
        let retained = RetainedLedger::default();
        let cancel = cancel.child_token();
        let last_error = Arc::new(Mutex::new(None));
        let handle_presence = opts.presence.clone().map(Arc::new);

        let driver = Driver {
            eventloop,
            client: client.clone(),
            endpoint: format!("{}:{}", opts.host, opts.port),
            host: opts.host.clone(),
            tls_files: opts.tls.as_ref().map(|t| match &t.identity {
                None => format!("MQTT_CA_PATH {}", t.ca.display()),
                Some(id) => format!(
                    "MQTT_CA_PATH {}, MQTT_CERT_PATH {}",
                    t.ca.display(),
                    id.cert.display()
                ),
            }),
            tls_ca: opts.tls.as_ref().map(|t| t.ca.clone()),
            shared_error: last_error.clone(),
            client_id: opts.client_id.clone(),
            subscriptions: opts.subscriptions,
            presence: opts.presence,
            retained: retained.clone(),
            relay: relay_tx,
            backlog,
            shedding: false,
            receiver_gone: false,
            state: state.clone(),
            cancel: cancel.clone(),
            backoff: Backoff::new(opts.backoff_initial, opts.backoff_max),
            close_timeout: opts.close_timeout,
            signer: opts.signer.clone(),
            awaiting_suback: None,
            last_error: None,
            had_connack: false,
            connected_at: None,
            quick_drops: 0,
            takeover_reported: false,
        };
        let task = tokio::spawn(driver.run());
        let handle = MqttHandle {
            client,
            client_id: opts.client_id.into(),
            retained,
            state,
            cancel,
            abort: task.abort_handle(),
            close_timeout: opts.close_timeout,
            last_error,
            signer: opts.signer,
            presence: handle_presence,
        };
        Ok((handle, incoming_rx))
    }
}

/// A cheap-to-clone handle on a session: publishes, observes the connection, ends the session.
#[derive(Debug, Clone)]
pub struct MqttHandle {
    /// rumqttc's request sender (a channel into the driver's event loop).
    client: AsyncClient,
    /// Our MQTT client id (for logs).
    client_id: Arc<str>,
    /// Shared with the driver, which re-publishes it on every CONNACK.
    retained: RetainedLedger,
    /// Written by the driver (and by [`MqttHandle::abort`]); read by anyone.
    state: Arc<watch::Sender<ConnState>>,
    /// The session's own token (a child of the one given to `connect`).
    cancel: CancellationToken,
    /// Aborts the driver task (crash simulation).
    abort: AbortHandle,
    /// Bound on a clean shutdown.
    close_timeout: Duration,
    /// The driver's last connection error (cleared on CONNACK).
    last_error: Arc<Mutex<Option<String>>>,
    /// Signs published messages.
    signer: Option<Arc<crate::crypto::identity::Identity>>,
    /// The participant's presence, re-announced on request.
    presence: Option<Arc<PresenceMessages>>,
}

impl MqttHandle {
    /// The session's MQTT client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Publishes `msg` on `topic` with QoS 1, retained if `retain`. Returns once the request is
    /// queued for the driver (it waits while the queue is full, e.g. while the broker is
    /// unreachable); delivery then follows the module's `Design:` notes. A retained message is
    /// also remembered and re-published on every reconnection.
    ///
    /// # Errors
    /// [`MqttError::TooLarge`] if the encoded message exceeds [`MAX_MESSAGE_BYTES`] (nothing is
    /// sent: the broker's and every client's packet limit is above this, so no message is ever
    /// dropped silently on the way), [`MqttError::InvalidTopic`], or [`MqttError::Closed`] with
    /// the unsent request when the session has ended.
    pub async fn publish(
        &self,
        topic: &str,
        msg: &Envelope,
        retain: bool,
    ) -> Result<(), MqttError> {
        let payload = seal(&self.signer, msg);
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(MqttError::TooLarge {
                topic: topic.to_string(),
                len: payload.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        self.send(topic, Bytes::from(payload), retain).await
    }

    /// Publishes the participant's online presence again (retained, with a fresh id: a new
    /// event), e.g. when a restarted server asks who is there. Does nothing without presence.
    ///
    /// # Errors
    /// As [`MqttHandle::publish`].
    pub async fn announce(&self) -> Result<(), MqttError> {
        match &self.presence {
            Some(p) => {
                let payload = seal(&self.signer, &fresh(&p.online));
                self.client
                    .publish_bytes(
                        p.topic.clone(),
                        QoS::AtLeastOnce,
                        true,
                        Bytes::from(payload),
                    )
                    .await
                    .map_err(closed)
            }
            None => Ok(()),
        }
    }

    /// Clears the retained message on `topic` (an empty retained payload) and stops
    /// re-publishing it on reconnection.
    ///
    /// # Errors
    /// As [`MqttHandle::publish`].
    pub async fn clear_retained(&self, topic: &str) -> Result<(), MqttError> {
        self.send(topic, Bytes::new(), true).await
    }

    async fn send(&self, topic: &str, payload: Bytes, retain: bool) -> Result<(), MqttError> {
        if !rumqttc::valid_topic(topic) {
            return Err(MqttError::InvalidTopic {
                topic: topic.to_string(),
            });
        }
        if retain {
            let mut ledger = lock(&self.retained);
            if payload.is_empty() {
                ledger.remove(topic);
            } else {
                ledger.insert(topic.to_string(), payload.clone());
            }
        }
        self.client
            .publish_bytes(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(closed)
    }

    /// The last connection error, when the latest connection attempt failed (`None` once
    /// connected). For a TLS handshake failure it says what failed and what to check.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The current connection state.
    pub fn state(&self) -> ConnState {
        *self.state.borrow()
    }

    /// A receiver of connection-state changes.
    pub fn watch_state(&self) -> watch::Receiver<ConnState> {
        self.state.subscribe()
    }

    /// Waits until the session is in state `want`, for at most `timeout`.
    ///
    /// # Errors
    /// [`MqttError::Timeout`], or [`MqttError::ClosedWhileWaiting`] if the session closes first.
    pub async fn wait_for(&self, want: ConnState, timeout: Duration) -> Result<(), MqttError> {
        let mut rx = self.state.subscribe();
        let reached = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| *s == want || *s == ConnState::Closed),
        )
        .await;
        match reached {
            Ok(Ok(s)) if *s == want => Ok(()),
            Ok(_) => Err(MqttError::ClosedWhileWaiting { want }),
            Err(_) => Err(MqttError::Timeout {
                want,
                now: self.state(),
                after: timeout,
                last_error: self.last_error(),
            }),
        }
    }

    /// Waits for the first connection of a participant that is starting, for at most `timeout`;
    /// on failure, shuts the session down and returns [`MqttError::BrokerUnreachable`] naming
    /// `endpoint` and the settings to check.
    ///
    /// # Errors
    /// [`MqttError::BrokerUnreachable`], or [`MqttError::ClosedWhileWaiting`].
    pub async fn wait_started(&self, endpoint: &str, timeout: Duration) -> Result<(), MqttError> {
        match self.wait_for(ConnState::Connected, timeout).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shutdown().await;
                Err(match e {
                    MqttError::Timeout {
                        after, last_error, ..
                    } => MqttError::BrokerUnreachable {
                        endpoint: endpoint.to_string(),
                        after,
                        last_error,
                    },
                    other => other,
                })
            }
        }
    }

    /// Ends the session cleanly: publishes the offline status (when connected), disconnects, and
    /// waits for the driver to finish (bounded by the session's `close_timeout`, after which the
    /// connection is dropped and the broker publishes the last will instead). Idempotent.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let grace = self.close_timeout + Duration::from_millis(500);
        if self.wait_for(ConnState::Closed, grace).await.is_err() {
            warn!(client_id = %self.client_id, "MQTT session did not close in time; aborting it");
            self.abort();
        }
    }

    /// Kills the driver task without an MQTT DISCONNECT, as a crash would: the broker sees the
    /// connection drop and publishes the last will. For fault-injection tests; use
    /// [`MqttHandle::shutdown`] otherwise.
    pub fn abort(&self) {
        self.abort.abort();
        self.state.send_replace(ConnState::Closed);
    }
}

fn closed(e: ClientError) -> MqttError {
    match e {
        ClientError::Request(r) | ClientError::TryRequest(r) => MqttError::Closed {
            request: Box::new(r),
        },
    }
}

/// Locks the ledger. Invariant: no code panics while holding it (insert, remove and clone only),
/// so a poisoned lock still holds consistent data and is used as is.
fn lock(ledger: &RetainedLedger) -> std::sync::MutexGuard<'_, BTreeMap<String, Bytes>> {
    ledger
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The message with a fresh id and timestamp: a new presence event, not a copy of an old one.
fn fresh(msg: &Envelope) -> Envelope {
    let mut m = msg.clone();
    m.id = format!("{:016x}", rand::rng().random::<u64>());
    m.ts_ms = proto::now_ms();
    m
}

/// The wire bytes of `msg`: its JSON, signed when the session has a signer.
fn seal(signer: &Option<Arc<crate::crypto::identity::Identity>>, msg: &Envelope) -> Vec<u8> {
    let json = proto::encode(msg);
    match signer {
        Some(id) => id.seal(json),
        None => json,
    }
}

fn last_will(
    p: &PresenceMessages,
    signer: &Option<Arc<crate::crypto::identity::Identity>>,
) -> LastWill {
    LastWill::new(
        p.topic.clone(),
        seal(signer, &fresh(&p.offline)),
        QoS::AtLeastOnce,
        true,
    )
}

/// Exponential back-off with jitter: the n-th delay is uniform in [d/2, d] for
/// d = min(initial · 2ⁿ, max).
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }
}

/// The session's driver: owns the rumqttc event loop; the only task that polls it.
struct Driver {
    eventloop: EventLoop,
    /// For re-subscribing and re-publishing after a CONNACK (from a helper task, so that the
    /// driver never waits on its own request channel).
    client: AsyncClient,
    /// `host:port`, for logs.
    endpoint: String,
    /// The broker host (the name its TLS certificate must be valid for).
    host: String,
    /// The CA file, when the session uses TLS (for error messages).
    tls_ca: Option<PathBuf>,
    /// The TLS settings in use, for error messages.
    tls_files: Option<String>,
    /// `last_error`, readable by the handles.
    shared_error: Arc<Mutex<Option<String>>>,
    client_id: String,
    subscriptions: Vec<String>,
    presence: Option<PresenceMessages>,
    retained: RetainedLedger,
    /// To the relay task that feeds the consumer's channel.
    relay: mpsc::UnboundedSender<Incoming>,
    /// Bytes handed to the relay and not yet taken by the consumer's channel.
    backlog: Arc<std::sync::atomic::AtomicUsize>,
    /// Publishes are being shed (logged once per episode).
    shedding: bool,
    /// Set once the incoming receiver was dropped (logged once).
    receiver_gone: bool,
    state: Arc<watch::Sender<ConnState>>,
    cancel: CancellationToken,
    backoff: Backoff,
    /// Signs presence messages and the last will.
    signer: Option<Arc<crate::crypto::identity::Identity>>,
    close_timeout: Duration,
    /// After a CONNACK: `Some(None)` until our SUBSCRIBE is sent, then `Some(Some(pkid))` until
    /// its SUBACK arrives.
    awaiting_suback: Option<Option<u16>>,
    /// The last connection error logged, so a repeating error is logged once.
    last_error: Option<String>,
    /// A CONNACK arrived since the last connection error.
    had_connack: bool,
    /// When the latest CONNACK arrived.
    connected_at: Option<std::time::Instant>,
    /// Connections in a row that the broker closed within [`TAKEOVER_WINDOW`] of accepting them.
    quick_drops: u32,
    /// The takeover error was logged (once per session).
    takeover_reported: bool,
}

/// Bytes of incoming publishes a session holds for a slow consumer before it sheds new ones
/// (see `Driver::forward`): 1,024 maximum-size messages.
pub const MAX_INCOMING_BACKLOG: usize = 1024 * MAX_MESSAGE_BYTES;

/// What an incoming publish counts against [`MAX_INCOMING_BACKLOG`]: its bytes plus a fixed
/// overhead, so that many empty messages are bounded too.
fn incoming_cost(m: &Incoming) -> usize {
    m.payload.len() + m.topic.len() + 64
}

/// A connection closed this soon after its CONNACK counts as taken over (see
/// `Driver::on_error`).
const TAKEOVER_WINDOW: Duration = Duration::from_secs(2);
/// Quick drops in a row that mean another connection uses our client id.
const TAKEOVER_DROPS: u32 = 3;

impl Driver {
    async fn run(mut self) {
        loop {
            let event = tokio::select! {
                biased;
                () = self.cancel.cancelled() => {
                    self.close().await;
                    break;
                }
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => self.on_connack(ack.session_present),
                Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                    if self.awaiting_suback == Some(None) {
                        self.awaiting_suback = Some(Some(pkid));
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if self.awaiting_suback == Some(Some(ack.pkid)) {
                        self.awaiting_suback = None;
                        let refused: Vec<&String> = self
                            .subscriptions
                            .iter()
                            .zip(&ack.return_codes)
                            .filter(|(_, c)| matches!(c, SubscribeReasonCode::Failure))
                            .map(|(f, _)| f)
                            .collect();
                        if !refused.is_empty() {
                            tracing::error!(
                                client_id = %self.client_id, ?refused,
                                "the broker refused subscriptions (ACL?); their messages will not arrive"
                            );
                        }
                        self.set_state(ConnState::Connected);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.payload.is_empty() {
                        debug!(topic = %p.topic, "retained message cleared; not forwarded");
                        continue;
                    }
                    self.forward(Incoming {
                        topic: p.topic,
                        payload: p.payload,
                        retained: p.retain,
                    });
                }
                Ok(Event::Incoming(Packet::Disconnect)) => {
                    info!(client_id = %self.client_id, "the broker sent DISCONNECT");
                }
                Ok(_) => {}
                Err(e) => {
                    self.on_error(&e);
                    let pause = self.backoff.next_delay();
                    tokio::select! {
                        () = self.cancel.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        self.set_state(ConnState::Closed);
        debug!(client_id = %self.client_id, "MQTT session closed");
    }

    fn set_state(&self, s: ConnState) {
        self.state.send_if_modified(|cur| {
            let changed = *cur != s;
            *cur = s;
            changed
        });
    }

    fn on_connack(&mut self, session_present: bool) {
        // While another connection keeps taking our client id over, the back-off keeps growing
        // instead of restarting at 50 ms: two such sessions would otherwise fight hundreds of
        // times a minute.
        if self.quick_drops == 0 {
            self.backoff.reset();
        }
        self.connected_at = Some(std::time::Instant::now());
        let was = *self.state.borrow();
        if was == ConnState::Disconnected {
            info!(client_id = %self.client_id, endpoint = %self.endpoint, session_present,
                  "MQTT reconnected; re-subscribing and re-publishing retained messages");
        } else {
            info!(client_id = %self.client_id, endpoint = %self.endpoint, session_present,
                  "MQTT connected");
        }
        self.last_error = None;
        *self
            .shared_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.had_connack = true;
        self.set_state(ConnState::Connecting);
        if self.subscriptions.is_empty() {
            self.awaiting_suback = None;
            self.set_state(ConnState::Connected);
        } else {
            self.awaiting_suback = Some(None);
        }

        // Design: these requests go through rumqttc's request channel (flow-controlled by its
        // inflight window) from a helper task, never pushed into `EventLoop::pending`, which
        // bypasses flow control and could collide packet ids when re-publishing many retained
        // topics; the driver itself must not wait on its own channel.
        let client = self.client.clone();
        let cancel = self.cancel.clone();
        let filters: Vec<SubscribeFilter> = self
            .subscriptions
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
            .collect();
        let online = self.presence.as_ref().map(|p| {
            (
                p.topic.clone(),
                Bytes::from(seal(&self.signer, &fresh(&p.online))),
            )
        });
        let retained: Vec<(String, Bytes)> = lock(&self.retained)
            .iter()
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect();
        let client_id = self.client_id.clone();
        tokio::spawn(async move {
            let resume = async {
                if !filters.is_empty() {
                    client.subscribe_many(filters).await?;
                }
                if let Some((topic, payload)) = online {
                    client
                        .publish_bytes(topic, QoS::AtLeastOnce, true, payload)
                        .await?;
                }
                for (topic, payload) in retained {
                    client
                        .publish_bytes(topic, QoS::AtLeastOnce, true, payload)
                        .await?;
                }
                Ok::<(), ClientError>(())
            };
            tokio::select! {
                () = cancel.cancelled() => {}
                r = resume => if r.is_err() {
                    debug!(%client_id, "session closed while resuming");
                }
            }
        });
    }

    fn on_error(&mut self, e: &ConnectionError) {
        let explained = self.tls_ca.as_deref().and_then(|ca| {
            let peer = format!("the MQTT broker {}", self.endpoint);
            tls::explain_handshake(e, &peer, &self.host, ca)
                .map(|m| format!("{m} ({})", self.tls_files.as_deref().unwrap_or_default()))
        });
        let msg = explained.clone().unwrap_or_else(|| e.to_string());
        *self
            .shared_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(msg.clone());
        let repeated = self.last_error.as_deref() == Some(msg.as_str());
        if self.had_connack {
            // A broker closes an accepted connection at once when another one connects with the
            // same client id (MQTT 3.1.1 §3.1.4): the two then take each other over forever.
            let quick = self
                .connected_at
                .is_some_and(|t| t.elapsed() < TAKEOVER_WINDOW);
            self.quick_drops = if quick { self.quick_drops + 1 } else { 0 };
            if self.quick_drops >= TAKEOVER_DROPS && !self.takeover_reported {
                self.takeover_reported = true;
                tracing::error!(
                    client_id = %self.client_id, endpoint = %self.endpoint,
                    "the broker keeps closing this connection right after accepting it: another \
                     process is connected with the same MQTT client id (the same participant of \
                     the same run, common_args.run_id). Stop it, or give each run its own run_id \
                     and each client its own rank"
                );
            }
        }
        if self.had_connack {
            warn!(client_id = %self.client_id, endpoint = %self.endpoint, error = %msg,
                  "MQTT connection lost; reconnecting with back-off");
            // The broker may have published our last will: the next one is a new event.
            if let Some(p) = &self.presence {
                self.eventloop
                    .mqtt_options
                    .set_last_will(last_will(p, &self.signer));
            }
        } else if explained.is_some() && !repeated {
            // Not a transient network problem: retrying will not help until a certificate or a
            // setting changes, so say it loudly (once per distinct error).
            tracing::error!(client_id = %self.client_id, "{msg}; retrying with back-off");
        } else if !repeated {
            warn!(client_id = %self.client_id, endpoint = %self.endpoint, error = %msg,
                  "cannot connect to the MQTT broker; retrying with back-off");
        } else {
            debug!(client_id = %self.client_id, error = %msg, "MQTT connect retry failed");
        }
        self.last_error = Some(msg);
        self.had_connack = false;
        self.awaiting_suback = None;
        self.set_state(ConnState::Disconnected);
    }

    /// Hands an incoming publish to the consumer without ever waiting for it.
    ///
    /// Design: the driver must keep polling the network whatever the consumer does. If it waited
    /// for room in the consumer's channel, a consumer that is itself waiting to publish (its
    /// requests go through rumqttc's channel, which only this driver drains) would stall both
    /// forever, and the broker would drop the session after 1.5 × keep-alive. So publishes go to
    /// a relay task through an unbounded channel whose content is bounded here by bytes
    /// ([`MAX_INCOMING_BACKLOG`]): beyond it, publishes are shed, with a warning per episode.
    fn forward(&mut self, msg: Incoming) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.receiver_gone {
            return;
        }
        let len = incoming_cost(&msg);
        let queued = self.backlog.load(Relaxed);
        if queued + len > MAX_INCOMING_BACKLOG {
            if !self.shedding {
                self.shedding = true;
                warn!(
                    client_id = %self.client_id, queued_bytes = queued,
                    "incoming messages are arriving faster than they are handled: shedding \
                     publishes beyond the {MAX_INCOMING_BACKLOG}-byte backlog (QoS 1 does not \
                     resend them; the protocol's re-announcements recover presence and updates)"
                );
            }
            return;
        }
        if self.shedding && queued < MAX_INCOMING_BACKLOG / 2 {
            self.shedding = false;
            info!(client_id = %self.client_id, "incoming backlog drained; no longer shedding");
        }
        self.backlog.fetch_add(len, Relaxed);
        if self.relay.send(msg).is_err() {
            self.receiver_gone = true;
            debug!(client_id = %self.client_id, "incoming receiver dropped; discarding publishes");
        }
    }

    /// Clean close: offline status, DISCONNECT, bounded by `close_timeout`. Skipped when not
    /// connected (the broker then has, or will publish, the last will).
    async fn close(&mut self) {
        if *self.state.borrow() != ConnState::Connected {
            return;
        }
        if let Some(p) = &self.presence {
            let offline = seal(&self.signer, &fresh(&p.offline));
            let _ = self
                .client
                .try_publish(p.topic.clone(), QoS::AtLeastOnce, true, offline);
        }
        if self.client.try_disconnect().is_err() {
            debug!(client_id = %self.client_id, "request queue full; closing without DISCONNECT");
            return;
        }
        // Poll until the broker closes the connection after our DISCONNECT, not just until the
        // DISCONNECT is written: dropping the socket while the broker's acknowledgements are
        // still unread makes the kernel answer with a reset, and a broker that has not yet read
        // our last packets (the latest publishes, the offline status, the DISCONNECT) then
        // loses them.
        let until_disconnect = async {
            loop {
                if self.eventloop.poll().await.is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(self.close_timeout, until_disconnect)
            .await
            .is_err()
        {
            debug!(client_id = %self.client_id, "clean close timed out");
        } else {
            info!(client_id = %self.client_id, "MQTT session closed cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train_for(run: &str, from: &str) -> Envelope {
        let msg = serde_json::json!({
            "v": 1, "run": run, "round": 3, "id": "00000000000000aa", "from": from, "ts_ms": 1,
            "body": {"type": "finish", "reason": "completed"}
        });
        serde_json::from_value(msg).unwrap()
    }

    fn incoming(topic: &str, env: &Envelope) -> Incoming {
        Incoming {
            topic: topic.into(),
            payload: Bytes::from(proto::encode(env)),
            retained: false,
        }
    }

    #[test]
    fn decode_applies_topic_rules() {
        let t = Topics::new("run-1");
        let ok = incoming(&t.command("c1"), &train_for("run-1", "server"));
        assert!(matches!(ok.decode(&t), Ok((TopicKind::Command(c), _)) if c == "c1"));

        let spoofed = incoming(&t.command("c1"), &train_for("run-1", "c2"));
        assert!(matches!(
            spoofed.decode(&t),
            Err(IncomingError::WrongSender { .. })
        ));
        let other_run = incoming(&t.command("c1"), &train_for("run-2", "server"));
        assert!(matches!(
            other_run.decode(&t),
            Err(IncomingError::WrongRun { .. })
        ));
        let wrong_topic = incoming(&t.up("server"), &train_for("run-1", "server"));
        assert!(matches!(
            wrong_topic.decode(&t),
            Err(IncomingError::WrongType { kind: "finish", .. })
        ));
        let foreign = incoming("elsewhere/x", &train_for("run-1", "server"));
        assert!(matches!(
            foreign.decode(&t),
            Err(IncomingError::ForeignTopic { .. })
        ));
        let garbage = Incoming {
            topic: t.command("c1"),
            payload: Bytes::from_static(b"not json"),
            retained: false,
        };
        assert!(matches!(
            garbage.decode(&t),
            Err(IncomingError::Decode { .. })
        ));
    }

    #[test]
    fn dedup_forgets_oldest_beyond_capacity() {
        let mut d = Dedup::new(2);
        let mut m = train_for("r", "server");
        let ids = ["a1", "a2", "a3"];
        for id in ids {
            m.id = id.into();
            assert!(d.first_time(&m));
            assert!(!d.first_time(&m));
        }
        m.id = "a1".into(); // evicted
        assert!(d.first_time(&m));
        m.from = "other".into(); // same id, other sender: a different message
        assert!(d.first_time(&m));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_millis(400));
        let mut caps = Vec::new();
        for _ in 0..6 {
            let cap = b.next;
            let d = b.next_delay();
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
            caps.push(cap.as_millis());
        }
        assert_eq!(caps, [50, 100, 200, 400, 400, 400]);
        b.reset();
        assert_eq!(b.next, Duration::from_millis(50));
    }

    #[test]
    fn options_are_validated_before_rumqttc_can_panic() {
        let ok = SessionOptions::new("127.0.0.1", 1883, "c1");
        assert!(ok.validate().is_ok());
        let cases: Vec<(&str, SessionOptions)> = vec![
            ("client_id", SessionOptions::new("127.0.0.1", 1883, "")),
            (
                "keepalive",
                SessionOptions {
                    keepalive: Duration::from_millis(500),
                    ..ok.clone()
                },
            ),
            (
                "max_packet_size",
                SessionOptions {
                    max_packet_size: 10 * 1024,
                    ..ok.clone()
                },
            ),
            (
                "subscriptions",
                SessionOptions {
                    subscriptions: vec!["a/#/b".into()],
                    ..ok.clone()
                },
            ),
        ];
        for (field, opts) in cases {
            match opts.validate() {
                Err(MqttError::InvalidOption { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn debug_redacts_the_password() {
        let mut o = SessionOptions::new("h", 1, "c");
        o.user = Some("u".into());
        o.password = Some("s3cret".into());
        assert!(!format!("{o:?}").contains("s3cret"));
    }
}
