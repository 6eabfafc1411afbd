//! The MQTT control plane against real brokers on free 127.0.0.1 ports: the embedded rumqttd,
//! `fedmq broker` (rumqttd in a child process we can kill), and Debian's Mosquitto.
//!
//! Mosquitto tests skip when the `mosquitto` binary is absent and `CI` is unset; with `CI` set
//! they fail instead. Nothing waits for readiness with a fixed sleep: tests wait on session
//! states and message channels with timeouts.

mod common;
use common::{free_port, mosquitto_bin};

use fedmq::proto::{
    BlobRef, Body, Capabilities, Envelope, Failure, Presence, Role, TopicKind, Topics, Train,
    TrainConfig, TrainMetrics, Update, MAX_MESSAGE_BYTES,
};
use fedmq::transport::{
    BrokerOptions, ConnState, Dedup, EmbeddedBroker, Incoming, IncomingError, MqttError,
    MqttHandle, MqttSession, PresenceMessages, SessionOptions,
};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Upper bound for any single wait (connection, message); the happy path takes milliseconds.
const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Brokers

/// One embedded rumqttd for the whole test binary (it cannot be stopped; tests use distinct
/// run and client ids).
fn embedded() -> u16 {
    static BROKER: OnceLock<EmbeddedBroker> = OnceLock::new();
    BROKER
        .get_or_init(|| EmbeddedBroker::start(BrokerOptions::default()).expect("embedded broker"))
        .addr()
        .port()
}

/// A broker process, killed (SIGKILL: a crash, no clean shutdown) on drop.
struct BrokerProc {
    child: Child,
}

impl BrokerProc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `fedmq broker --listen 127.0.0.1:<port>`; returns once it prints its address (it does so
/// only after its own MQTT readiness probe).
fn start_fedmq_broker(port: u16) -> BrokerProc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedmq"))
        .args(["broker", "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning fedmq broker");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads until the child exits, so the child never writes into a closed pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(WAIT)
        .expect("fedmq broker did not report its address");
    assert!(
        line.contains(&format!("listening on 127.0.0.1:{port}")),
        "{line}"
    );
    BrokerProc { child }
}

/// Mosquitto on `port` with fedmq's limits and no persistence (a restart loses everything, the
/// hardest case for delivery). The config lives in `dir`.
fn start_mosquitto(bin: &PathBuf, port: u16, dir: &tempfile::TempDir) -> BrokerProc {
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_packet_size 262144\nlog_dest stderr\n"
        ),
    )
    .expect("writing mosquitto.conf");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning mosquitto");
    // Readiness: the sessions connect with back-off and the tests wait for `Connected`.
    BrokerProc { child }
}

// ---------------------------------------------------------------------------------------------
// Participants

struct Participant {
    handle: MqttHandle,
    rx: mpsc::Receiver<Incoming>,
    topics: Topics,
}

impl Participant {
    /// The server of `run`: subscribes to every update and every status.
    fn server(port: u16, run: &str) -> Self {
        let t = Topics::new(run);
        Self::start(
            port,
            run,
            "server",
            Role::Server,
            vec![t.up_all(), t.status_all()],
        )
    }

    /// Client `id` of `run`: subscribes to its commands and the server's status.
    fn client(port: u16, run: &str, id: &str) -> Self {
        let t = Topics::new(run);
        Self::start(
            port,
            run,
            id,
            Role::Client,
            vec![t.command(id), t.status("server")],
        )
    }

    fn start(port: u16, run: &str, id: &str, role: Role, subscriptions: Vec<String>) -> Self {
        let caps = (role == Role::Client).then(|| Capabilities {
            device: "cpu".into(),
            cores: 2,
            gpu: None,
            samples: 5923,
            version: env!("CARGO_PKG_VERSION").into(),
        });
        // MQTT client ids are unique per test (the embedded broker is shared).
        let mut o = SessionOptions::new("127.0.0.1", port, format!("{run}-{id}"));
        o.subscriptions = subscriptions;
        o.presence = Some(PresenceMessages::status(run, id, role, caps));
        o.backoff_max = Duration::from_millis(500);
        let (handle, rx) = MqttSession::connect(o, CancellationToken::new()).expect("options");
        Self {
            handle,
            rx,
            topics: Topics::new(run),
        }
    }

    async fn connected(&self) {
        self.handle
            .wait_for(ConnState::Connected, WAIT)
            .await
            .expect("session connects");
    }

    /// The next message that decodes under the run's rules, with its raw form.
    async fn next(&mut self) -> (TopicKind, Envelope, Incoming) {
        let msg = tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a message within the timeout")
            .expect("session open");
        let (kind, env) = msg
            .decode(&self.topics)
            .unwrap_or_else(|e| panic!("undecodable message: {e}"));
        (kind, env, msg)
    }

    /// Skips messages until `pred` holds.
    async fn until(&mut self, mut pred: impl FnMut(&TopicKind, &Envelope) -> bool) -> Envelope {
        loop {
            let (k, e, _) = self.next().await;
            if pred(&k, &e) {
                return e;
            }
        }
    }
}

fn run_id(test: &str) -> String {
    format!("{test}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

fn train(run: &str, round: u64) -> Envelope {
    Envelope::new(
        run,
        round,
        "server",
        Body::Train(Train {
            global: BlobRef {
                key: format!("fedmq/{run}/r{round:06}/global"),
                len: 1234,
                sha256: "ab".repeat(32),
                wrapped_key: None,
            },
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
            strategy: None,
            deadline_ms: fedmq::proto::now_ms() + 60_000,
            secagg: None,
        }),
    )
}

fn update(run: &str, round: u64, client: &str) -> Envelope {
    Envelope::new(
        run,
        round,
        client,
        Body::Update(Update {
            update: BlobRef {
                key: format!("fedmq/{run}/r{round:06}/updates/{client}"),
                len: 1234,
                sha256: "cd".repeat(32),
                wrapped_key: None,
            },
            num_samples: 5923,
            metrics: TrainMetrics {
                train_loss: 0.25,
                train_seconds: 1.5,
                eval: None,
            },
            report: Default::default(),
        }),
    )
}

fn is_status(e: &Envelope, from: &str, state: Presence) -> bool {
    e.from == from && matches!(&e.body, Body::Status(s) if s.state == state)
}

// ---------------------------------------------------------------------------------------------
// (a) control messages

/// Status, commands, updates and failures both ways, decoded on receipt; a message of exactly
/// MAX_MESSAGE_BYTES passes every packet limit; a clean shutdown publishes the offline status.
async fn control_messages(port: u16) {
    let run = run_id("ctl");
    let mut server = Participant::server(port, &run);
    let mut client = Participant::client(port, &run, "c1");
    server.connected().await;
    client.connected().await;
    let t = Topics::new(&run);

    // Presence with capabilities (retained or live, depending on who connected first).
    let online = server
        .until(|_, e| is_status(e, "c1", Presence::Online))
        .await;
    let Body::Status(s) = &online.body else {
        unreachable!()
    };
    assert_eq!(s.role, Role::Client);
    assert_eq!(s.capabilities.as_ref().map(|c| c.samples), Some(5923));

    // Command: server → client, retained.
    let cmd = train(&run, 1);
    server
        .handle
        .publish(&t.command("c1"), &cmd, true)
        .await
        .unwrap();
    let got = client
        .until(|k, _| matches!(k, TopicKind::Command(_)))
        .await;
    assert_eq!(got, cmd);

    // Update and failure: client → server.
    let up = update(&run, 1, "c1");
    client
        .handle
        .publish(&t.up("c1"), &up, false)
        .await
        .unwrap();
    let got = server.until(|k, _| matches!(k, TopicKind::Up(_))).await;
    assert_eq!(got, up);
    let fail = Envelope::new(
        &run,
        1,
        "c1",
        Body::Failure(Failure {
            reason: "out of memory".into(),
        }),
    );
    client
        .handle
        .publish(&t.up("c1"), &fail, false)
        .await
        .unwrap();
    let got = server.until(|k, _| matches!(k, TopicKind::Up(_))).await;
    assert_eq!(got, fail);

    // A message of exactly MAX_MESSAGE_BYTES crosses broker and client limits intact (its
    // 64 KiB reason is then rejected by the receiver's validation, as the protocol says).
    let mut big = Envelope::new(
        &run,
        1,
        "c1",
        Body::Failure(Failure {
            reason: String::new(),
        }),
    );
    let overhead = fedmq::proto::encode(&big).len();
    big.body = Body::Failure(Failure {
        reason: "x".repeat(MAX_MESSAGE_BYTES - overhead),
    });
    assert_eq!(fedmq::proto::encode(&big).len(), MAX_MESSAGE_BYTES);
    client
        .handle
        .publish(&t.up("c1"), &big, false)
        .await
        .unwrap();
    let raw = loop {
        let msg = tokio::time::timeout(WAIT, server.rx.recv())
            .await
            .expect("the 64 KiB message arrives")
            .expect("session open");
        if msg.topic == t.up("c1") {
            break msg;
        }
    };
    assert_eq!(raw.payload.len(), MAX_MESSAGE_BYTES);
    assert!(matches!(raw.decode(&t), Err(IncomingError::Decode { .. })));

    // Clean shutdown: the offline status is published by the client itself.
    client.handle.shutdown().await;
    assert_eq!(client.handle.state(), ConnState::Closed);
    server
        .until(|_, e| is_status(e, "c1", Presence::Offline))
        .await;
    server.handle.shutdown().await;
}

#[tokio::test]
async fn control_messages_through_embedded_rumqttd() {
    control_messages(embedded()).await;
}

#[tokio::test]
async fn control_messages_through_mosquitto() {
    let Some(bin) = mosquitto_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = start_mosquitto(&bin, port, &dir);
    control_messages(port).await;
}

/// One session floods another while that one publishes as much and reads nothing: the flooded
/// session's publishes must all go out and its connection stay up (its driver keeps polling the
/// network), then everything it was sent is still there to read. Before the relay, the driver
/// waited for room in the 16-deep incoming channel, the consumer waited for room in the 16-deep
/// request channel that only the driver drains, and both stalled until the broker dropped them.
async fn a_flooded_session_keeps_publishing(port: u16) {
    const N: usize = 3_000;
    let run = run_id("flood");
    let t = Topics::new(&run);
    let session = |name: &str, subscriptions: Vec<String>| {
        let mut o = SessionOptions::new("127.0.0.1", port, format!("{run}-{name}"));
        o.subscriptions = subscriptions;
        o.queue_capacity = 16;
        o.keepalive = Duration::from_secs(2);
        MqttSession::connect(o, CancellationToken::new()).expect("options")
    };
    let (a, mut a_rx) = session("a", vec![t.up_all()]);
    let (b, mut b_rx) = session("b", vec![t.command("c1")]);
    for h in [&a, &b] {
        h.wait_for(ConnState::Connected, WAIT).await.unwrap();
    }
    // b reads everything a sends it, as fast as it comes.
    let b_reader = tokio::spawn(async move {
        let mut ids = std::collections::HashSet::new();
        while ids.len() < N {
            match tokio::time::timeout(Duration::from_secs(60), b_rx.recv()).await {
                Ok(Some(m)) => {
                    let env: Envelope = serde_json::from_slice(&m.payload).unwrap();
                    ids.insert(env.id);
                }
                _ => break,
            }
        }
        ids.len()
    });
    let (b_pub, up) = (b.clone(), t.up("c1"));
    let flood_run = run.clone();
    let b_flood = tokio::spawn(async move {
        for _ in 0..N {
            b_pub
                .publish(&up, &update(&flood_run, 1, "c1"), false)
                .await
                .unwrap();
        }
    });
    // a publishes N commands while nobody reads what it receives.
    let started = std::time::Instant::now();
    let cmd = t.command("c1");
    let a_flood = async {
        for i in 0..N {
            a.publish(&cmd, &train(&run, i as u64 + 1), false)
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), a_flood)
        .await
        .expect("the flooded session's publishes go out (no deadlock)");
    tokio::time::timeout(Duration::from_secs(60), b_flood)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        a.state(),
        ConnState::Connected,
        "the flooded session stayed up"
    );
    assert_eq!(b_reader.await.unwrap(), N, "every command arrived");
    // Now a reads its backlog: every update is there.
    let mut ids = std::collections::HashSet::new();
    while ids.len() < N {
        let m = tokio::time::timeout(WAIT, a_rx.recv())
            .await
            .expect("the backlog is delivered")
            .unwrap();
        let env: Envelope = serde_json::from_slice(&m.payload).unwrap();
        ids.insert(env.id);
    }
    eprintln!(
        "{N} messages each way through a session that read nothing meanwhile: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_session_keeps_publishing_through_embedded_rumqttd() {
    a_flooded_session_keeps_publishing(embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_session_keeps_publishing_through_mosquitto() {
    let Some(bin) = mosquitto_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = start_mosquitto(&bin, port, &dir);
    a_flooded_session_keeps_publishing(port).await;
}

// ---------------------------------------------------------------------------------------------
// (c) broker restart

/// Client and server connected; the broker crashes; the server publishes a command while it is
/// down; the broker comes back on the same port (empty: no sessions, no retained messages);
/// both reconnect, and the client gets the command exactly once after de-duplication.
async fn command_survives_broker_restart(port: u16, mut restart: impl FnMut() -> BrokerProc) {
    let mut broker = restart();
    let run = run_id("restart");
    let t = Topics::new(&run);
    let mut server = Participant::server(port, &run);
    let mut client = Participant::client(port, &run, "c1");
    server.connected().await;
    client.connected().await;

    let mut dedup = Dedup::default();
    let mut delivered: Vec<(u64, String)> = Vec::new(); // after de-dup
    let mut copies = 0usize; // of round 2, before de-dup

    // Round 1 while all is well.
    let r1 = train(&run, 1);
    server
        .handle
        .publish(&t.command("c1"), &r1, true)
        .await
        .unwrap();
    loop {
        let (k, e, _) = client.next().await;
        if matches!(k, TopicKind::Command(_)) && dedup.first_time(&e) {
            delivered.push((e.round, e.id.clone()));
            if e.round == 1 {
                break;
            }
        }
    }

    // Crash the broker and publish round 2 at once, before the sessions have noticed: in practice
    // rumqttc writes it into the dead connection, then drops it as unacknowledged when the new
    // broker reports no session. Only the session's retained ledger (re-published on CONNACK)
    // brings it back; with that disabled this test fails. If the session notices first, the
    // command waits in the request queue instead; either way it must arrive exactly once.
    broker.kill();
    let r2 = train(&run, 2);
    server
        .handle
        .publish(&t.command("c1"), &r2, true)
        .await
        .unwrap();
    server
        .handle
        .wait_for(ConnState::Disconnected, WAIT)
        .await
        .unwrap();
    client
        .handle
        .wait_for(ConnState::Disconnected, WAIT)
        .await
        .unwrap();

    // Same port, empty broker.
    broker = restart();
    server.connected().await;
    client.connected().await;

    // Receive until round 2 is through, then fence with round 3: anything about round 2 that
    // could still arrive (retained copy, re-publication) is delivered before it.
    let mut fence_sent = false;
    loop {
        let (k, e, _) = client.next().await;
        if !matches!(k, TopicKind::Command(_)) {
            continue;
        }
        if e.id == r2.id {
            copies += 1;
        }
        if dedup.first_time(&e) {
            delivered.push((e.round, e.id.clone()));
        }
        if e.round == 2 && !fence_sent {
            fence_sent = true;
            server
                .handle
                .publish(&t.command("c1"), &train(&run, 3), true)
                .await
                .unwrap();
        }
        if e.round == 3 {
            break;
        }
    }
    let rounds: Vec<u64> = delivered.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        rounds.iter().filter(|r| **r == 2).count(),
        1,
        "round 2 must be delivered exactly once after de-dup: {delivered:?}"
    );
    assert_eq!(rounds, [1, 2, 3], "{delivered:?}");
    assert!(copies >= 1);
    eprintln!("round 2 arrived {copies} time(s) before de-dup");

    // The other direction works again too.
    let up = update(&run, 2, "c1");
    client
        .handle
        .publish(&t.up("c1"), &up, false)
        .await
        .unwrap();
    let got = server.until(|k, _| matches!(k, TopicKind::Up(_))).await;
    assert_eq!(got, up);

    // Phase 2, the order the brief worries about: the client dies during a second outage and
    // comes back only after the server has re-sent its command to the new, empty broker (so no
    // session and no subscriber existed when the command arrived). The retained copy reaches it.
    broker.kill();
    server
        .handle
        .wait_for(ConnState::Disconnected, WAIT)
        .await
        .unwrap();
    client.handle.abort();
    let r4 = train(&run, 4);
    server
        .handle
        .publish(&t.command("c1"), &r4, true)
        .await
        .unwrap();
    broker = restart();
    server.connected().await;
    // An observer proves that the command is at the broker before the client subscribes.
    let mut observer =
        Participant::start(port, &run, "observer", Role::Client, vec![t.command("c1")]);
    observer.until(|_, e| e.id == r4.id).await;
    observer.handle.shutdown().await;

    let mut client = Participant::client(port, &run, "c1"); // a new process: fresh de-dup state
    client.connected().await;
    let mut dedup = Dedup::default();
    let mut delivered = Vec::new();
    let mut fence_sent = false;
    loop {
        let (k, e, raw) = client.next().await;
        if !matches!(k, TopicKind::Command(_)) {
            continue;
        }
        if dedup.first_time(&e) {
            delivered.push(e.round);
        }
        if e.id == r4.id && !fence_sent {
            assert!(
                raw.retained,
                "the late client gets the command from the retained store"
            );
            fence_sent = true;
            server
                .handle
                .publish(&t.command("c1"), &train(&run, 5), true)
                .await
                .unwrap();
        }
        if e.round == 5 {
            break;
        }
    }
    assert_eq!(delivered, [4, 5], "late client: {delivered:?}");

    server
        .handle
        .clear_retained(&t.command("c1"))
        .await
        .unwrap();
    client.handle.shutdown().await;
    server.handle.shutdown().await;
    drop(broker);
}

#[tokio::test]
async fn command_survives_rumqttd_restart() {
    let port = free_port();
    command_survives_broker_restart(port, || start_fedmq_broker(port)).await;
}

#[tokio::test]
async fn command_survives_mosquitto_restart() {
    let Some(bin) = mosquitto_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    command_survives_broker_restart(port, || start_mosquitto(&bin, port, &dir)).await;
}

// ---------------------------------------------------------------------------------------------
// (d) size limit

#[tokio::test]
async fn oversized_message_is_refused_with_a_clear_error() {
    let run = run_id("big");
    let client = Participant::client(embedded(), &run, "c1");
    client.connected().await;
    let mut big = Envelope::new(
        &run,
        1,
        "c1",
        Body::Failure(Failure {
            reason: String::new(),
        }),
    );
    big.body = Body::Failure(Failure {
        reason: "x".repeat(MAX_MESSAGE_BYTES),
    });
    let topic = Topics::new(&run).up("c1");
    let err = client
        .handle
        .publish(&topic, &big, false)
        .await
        .unwrap_err();
    match &err {
        MqttError::TooLarge { topic: t, len, max } => {
            assert_eq!(t, &topic);
            assert!(*len > MAX_MESSAGE_BYTES);
            assert_eq!(*max, MAX_MESSAGE_BYTES);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("exceeds the 65536-byte control-message limit")
            && text.contains("object store"),
        "{text}"
    );
    // The session is unaffected.
    assert_eq!(client.handle.state(), ConnState::Connected);
    client.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// (e) last will

/// A client dies without DISCONNECT: the server sees its offline status at once, and a late
/// subscriber finds it retained.
async fn last_will_announces_a_dead_client(port: u16) {
    let run = run_id("will");
    let mut server = Participant::server(port, &run);
    let client = Participant::client(port, &run, "c2");
    server.connected().await;
    client.connected().await;
    server
        .until(|_, e| is_status(e, "c2", Presence::Online))
        .await;

    client.handle.abort();
    let will = server
        .until(|_, e| is_status(e, "c2", Presence::Offline))
        .await;
    assert_eq!(will.run, run);

    let t = Topics::new(&run);
    let mut late = Participant::start(port, &run, "observer", Role::Client, vec![t.status("c2")]);
    let (_, status, raw) = late.next().await;
    assert!(is_status(&status, "c2", Presence::Offline), "{status:?}");
    assert!(raw.retained, "the will is retained");
    late.handle.shutdown().await;
    server.handle.shutdown().await;
}

#[tokio::test]
async fn last_will_through_embedded_rumqttd() {
    last_will_announces_a_dead_client(embedded()).await;
}

#[tokio::test]
async fn last_will_through_mosquitto() {
    let Some(bin) = mosquitto_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = start_mosquitto(&bin, port, &dir);
    last_will_announces_a_dead_client(port).await;
}
