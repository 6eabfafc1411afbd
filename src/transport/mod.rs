//! MQTT transport: the control-plane session over rumqttc, and the embedded rumqttd broker.
//!
//! Everything here moves bytes; what the bytes mean is [`crate::proto`]'s business. The session
//! encodes and decodes [`crate::proto::Envelope`]s at its edges so that no caller ever hands raw
//! JSON to the network, and it refuses messages larger than [`crate::proto::MAX_MESSAGE_BYTES`].
//!
//! # Layout
//! - `mqtt.rs`: [`MqttSession`] spawns the one task that polls the rumqttc event loop;
//!   [`MqttHandle`] (cheap to clone) publishes, [`Incoming`] is what arrives, [`Dedup`] drops
//!   QoS 1 duplicates. The `Design:` note there explains how commands survive broker restarts.
//! - `broker.rs`: [`EmbeddedBroker`], rumqttd on a dedicated thread bound to 127.0.0.1, configured
//!   from [`BrokerOptions`] (programmatic defaults or the shape of `broker/rumqttd.toml`), with
//!   TLS from [`BrokerTls`].
//! - `gateway/`: the authorizing MQTT 3.1.1 gateway the embedded broker puts in front of
//!   rumqttd when asked for an ACL, a password file or client certificates: Mosquitto's ACL and
//!   password file formats (one `broker/fedmq.acl` for both brokers), mutual TLS with the
//!   certificate's Common Name as user name, connection rate limits. rumqttd itself then listens
//!   on loopback and accepts only the gateway's internal credential. `mod.rs` is its I/O driver;
//!   `framing.rs` (MQTT packet framing and parsing), `acl.rs`, `passwords.rs` and `cert_name.rs`
//!   (client certificate names) hold its pure parts.
//! - `bench.rs`: [`bench::mqtt_rtt`], control-message round-trip latency through any broker.
//!
//! # TLS
//! [`SessionOptions::tls`] ([`MqttTls`]; `MQTT_TLS` and `MQTT_*_PATH` in the config) connects
//! over TLS trusting only the given CA, with an optional client certificate for mutual TLS.
//! Handshake failures are not retried silently: the session logs one error saying what failed
//! and what to check, and reports it through [`MqttHandle::last_error`] and
//! [`MqttError::Timeout`]. `broker/mosquitto-tls.conf` is the reference Mosquitto setup for
//! TLS and mutual TLS; the embedded broker does mutual TLS through its gateway
//! ([`BrokerOptions::client_ca`]).
//!
//! # Limits
//! One number ties the layers together: [`DEFAULT_MAX_PACKET_SIZE`] (256 KiB). The embedded broker
//! accepts packets up to it, `broker/mosquitto.conf` sets Mosquitto's `max_packet_size` to it, and
//! every session sets rumqttc's incoming and outgoing limits to it (rumqttc's own default is 10 KiB).
//! Control messages are capped far below, at [`crate::proto::MAX_MESSAGE_BYTES`] (64 KiB), by
//! [`MqttHandle::publish`], so a fedmq message can never exceed a limit anywhere on its path.

mod broker;
mod gateway;
mod mqtt;

pub use broker::{BrokerError, BrokerOptions, BrokerTls, EmbeddedBroker};
pub use gateway::{FailureBudget, ABUSIVE_CONNECT_WINDOW, GUESS_DELAY};
pub use mqtt::{
    ConnState, Dedup, Incoming, IncomingError, MqttError, MqttHandle, MqttSession, MqttTls,
    PresenceMessages, SessionOptions,
};

/// Largest MQTT packet (remaining length: topic + packet id + payload) that fedmq's brokers accept
/// and its clients send or receive.
///
/// Why 256 KiB: a control message is at most [`crate::proto::MAX_MESSAGE_BYTES`] (64 KiB) and the
/// MQTT framing around it (topic of at most ~150 bytes, packet id, MQTT 5 properties) adds well
/// under 1 KiB, so 64 KiB would already do; four times that leaves room for protocol growth
/// (signatures, more capabilities) without a coordinated broker change. It is still far too small
/// for a model (megabytes), which keeps the rule "model bytes go through S3" enforced by the
/// broker too, and it bounds broker memory per connection (inflight count × packet size).
///
/// The incoming limit matters as much as the outgoing one: a client whose incoming limit is
/// below what the broker accepts would drop its connection on every redelivery of one oversized
/// QoS 1 message (a poison message on a persistent session). With both at this value, anything
/// the broker accepts reaches the application, where [`crate::proto::decode`] rejects it with a
/// reason.
pub const DEFAULT_MAX_PACKET_SIZE: usize = 256 * 1024;

/// Smallest packet size limit fedmq accepts in configuration: the largest control message plus
/// 1 KiB for the MQTT framing around it (topic, packet id, properties).
pub const MIN_PACKET_SIZE: usize = crate::proto::MAX_MESSAGE_BYTES + 1024;
