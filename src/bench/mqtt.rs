//! Control-message round-trip latency through a broker (`fedmq bench mqtt`).
//!
//! Two sessions with fedmq's production settings (QoS 1, 256 KiB packets, presence) talk through
//! the broker: "server" publishes a realistic `train` command (blob reference, hyper-parameters,
//! deadline; about 500 bytes of JSON) retained on `cmd/<client>`, exactly as a round does; the
//! client decodes it and answers with an `update` notice for the same round on `up/<client>`; the
//! server decodes that and stops the clock. One message is in flight at a time, so the figure is
//! latency, not throughput: encode + MQTT (publish, PUBACK, delivery) + decode, twice.
//!
//! The bench sessions use clean sessions and a random run id so that repeated runs against a
//! long-lived broker leave neither persistent sessions nor retained commands behind.

use crate::proto::{
    BlobRef, Body, Envelope, Role, TopicKind, Topics, Train, TrainConfig, TrainMetrics, Update,
};
use crate::transport::{
    BrokerError, ConnState, Incoming, MqttError, MqttHandle, MqttSession, PresenceMessages,
    SessionOptions,
};
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Starting the embedded broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A session failed (could not connect in time, closed, …).
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    /// No echo arrived for a message.
    #[error("no echo for round {round} within {after:?}")]
    Timeout {
        /// The message's round number.
        round: u64,
        /// How long we waited.
        after: Duration,
    },
    /// A session's incoming channel ended.
    #[error("the {who} session ended during the benchmark")]
    SessionEnded {
        /// `server` or `client`.
        who: &'static str,
    },
    /// Nothing to measure.
    #[error("messages must be at least 1")]
    NoMessages,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct RttOptions {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Name of the broker in the report (`rumqttd`, `mosquitto`, …).
    pub broker: String,
    /// Timed round trips.
    pub messages: usize,
    /// Untimed round trips first (connection warm-up, allocator, caches).
    pub warmup: usize,
    /// Longest wait for one echo (and for each session to connect).
    pub timeout: Duration,
}

/// The result: one JSON object per run.
#[derive(Debug, Clone, Serialize)]
pub struct RttReport {
    /// Always `mqtt_rtt`.
    pub bench: &'static str,
    /// The broker's name as given.
    pub broker: String,
    /// Timed round trips.
    pub messages: usize,
    /// Encoded size of the command sent (the echo is of similar size).
    pub payload_bytes: usize,
    /// Median round trip, microseconds.
    pub p50_us: f64,
    /// 99th percentile (nearest rank), microseconds.
    pub p99_us: f64,
    /// Mean, microseconds.
    pub mean_us: f64,
    /// Fastest, microseconds.
    pub min_us: f64,
    /// Slowest, microseconds.
    pub max_us: f64,
}

/// Runs the round-trip benchmark against the broker at `opts.host:opts.port`.
///
/// # Errors
/// [`BenchError`] when a session cannot connect, an echo times out, or a session ends.
pub async fn mqtt_rtt(opts: &RttOptions) -> Result<RttReport, BenchError> {
    if opts.messages == 0 {
        return Err(BenchError::NoMessages);
    }
    let run = format!("bench-{:08x}", rand::random::<u32>());
    let topics = Topics::new(&run);
    let client_id = "bench-client";
    let cancel = CancellationToken::new();

    let session = |id: &str, role, subscriptions| {
        let mut o = SessionOptions::new(opts.host.clone(), opts.port, format!("{run}-{id}"));
        o.clean_session = true;
        o.subscriptions = subscriptions;
        o.presence = Some(PresenceMessages::status(&run, id, role, None));
        MqttSession::connect(o, cancel.clone())
    };
    let (server, mut server_rx) = session("server", Role::Server, vec![topics.up(client_id)])?;
    let (client, client_rx) = session(client_id, Role::Client, vec![topics.command(client_id)])?;
    server.wait_for(ConnState::Connected, opts.timeout).await?;
    client.wait_for(ConnState::Connected, opts.timeout).await?;

    let echo = tokio::spawn(echo(
        client.clone(),
        client_rx,
        topics.clone(),
        client_id.into(),
    ));

    let total = opts.warmup + opts.messages;
    let mut samples = Vec::with_capacity(opts.messages);
    let mut payload_bytes = 0;
    let cmd_topic = topics.command(client_id);
    let result = async {
        for i in 0..total {
            let round = i as u64 + 1;
            let msg = train_command(&run, round);
            payload_bytes = crate::proto::encode(&msg).len();
            let t0 = Instant::now();
            server.publish(&cmd_topic, &msg, true).await?;
            wait_echo(&mut server_rx, &topics, round, opts.timeout).await?;
            if i >= opts.warmup {
                samples.push(t0.elapsed());
            }
        }
        Ok::<(), BenchError>(())
    }
    .await;

    // Leave the broker as we found it: no retained command, no sessions.
    let _ = server.clear_retained(&cmd_topic).await;
    server.shutdown().await;
    client.shutdown().await;
    echo.abort();
    result?;
    Ok(report(&opts.broker, payload_bytes, samples))
}

/// The client side: answers every `train` with an `update` for the same round.
async fn echo(
    handle: MqttHandle,
    mut rx: mpsc::Receiver<Incoming>,
    topics: Topics,
    client_id: String,
) -> Result<(), BenchError> {
    while let Some(msg) = rx.recv().await {
        let Ok((TopicKind::Command(_), env)) = msg.decode(&topics) else {
            continue;
        };
        if let Body::Train(t) = &env.body {
            let reply = Envelope::new(
                &env.run,
                env.round,
                &client_id,
                Body::Update(Update {
                    update: BlobRef {
                        key: t
                            .global
                            .key
                            .replace("/global", &format!("/updates/{client_id}")),
                        len: t.global.len,
                        sha256: t.global.sha256.clone(),
                        wrapped_key: None,
                    },
                    num_samples: 5923,
                    metrics: TrainMetrics {
                        train_loss: 0.213,
                        train_seconds: 8.4,
                        eval: None,
                    },
                    report: Default::default(),
                }),
            );
            handle
                .publish(&topics.up(&client_id), &reply, false)
                .await?;
        }
    }
    Err(BenchError::SessionEnded { who: "client" })
}

async fn wait_echo(
    rx: &mut mpsc::Receiver<Incoming>,
    topics: &Topics,
    round: u64,
    timeout: Duration,
) -> Result<(), BenchError> {
    let wait = async {
        while let Some(msg) = rx.recv().await {
            if let Ok((TopicKind::Up(_), env)) = msg.decode(topics) {
                if env.round == round && matches!(env.body, Body::Update(_)) {
                    return Ok(());
                }
            }
        }
        Err(BenchError::SessionEnded { who: "server" })
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| BenchError::Timeout {
            round,
            after: timeout,
        })?
}

/// A `train` command shaped like a real round's (CNN global model reference, SGD settings).
fn train_command(run: &str, round: u64) -> Envelope {
    Envelope::new(
        run,
        round,
        "server",
        Body::Train(Train {
            global: BlobRef {
                key: format!("fedmq/{run}/r{round:06}/global"),
                len: 6_653_608,
                sha256: "3b1f0c9d7e2a4b6c8d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e".into(),
                wrapped_key: None,
            },
            strategy: None,
            config: TrainConfig {
                model: "cnn".into(),
                epochs: 1,
                batch_size: 32,
                optimizer: "sgd".into(),
                learning_rate: 0.05,
                momentum: 0.9,
                weight_decay: 0.0,
                seed: round,
            },
            deadline_ms: crate::proto::now_ms() + 60_000,
            secagg: None,
        }),
    )
}

fn report(broker: &str, payload_bytes: usize, mut samples: Vec<Duration>) -> RttReport {
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    // Nearest rank: the smallest sample with at least p% of the samples at or below it.
    let rank = |p: f64| {
        let n = samples.len();
        let k = ((p / 100.0) * n as f64).ceil() as usize;
        us(samples[k.clamp(1, n) - 1])
    };
    let mean = samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64;
    let round1 = |x: f64| (x * 10.0).round() / 10.0;
    RttReport {
        bench: "mqtt_rtt",
        broker: broker.to_string(),
        messages: samples.len(),
        payload_bytes,
        p50_us: round1(rank(50.0)),
        p99_us: round1(rank(99.0)),
        mean_us: round1(mean),
        min_us: round1(us(samples[0])),
        max_us: round1(us(samples[samples.len() - 1])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let r = report("x", 1, samples);
        assert_eq!(
            (r.p50_us, r.p99_us, r.min_us, r.max_us),
            (50.0, 99.0, 1.0, 100.0)
        );
        assert_eq!(r.mean_us, 50.5);
    }

    #[test]
    fn the_command_is_a_valid_realistic_message() {
        let m = train_command("bench-1", 7);
        m.validate().unwrap();
        let len = crate::proto::encode(&m).len();
        assert!((300..1000).contains(&len), "{len}");
    }
}
