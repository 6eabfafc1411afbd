//! Scale: a federation of 300 real client sessions (each its own MQTT connection and S3 client,
//! 100 per process) with the server in its own process, against the embedded broker and
//! against Mosquitto. Every client must be admitted and counted in every round. Round times at
//! larger N are benchmarks (`fedmq bench round --processes --clients-per-process K`,
//! docs/BENCHMARKS.md), not tests.

mod common;

use std::process::Command;
use std::sync::Mutex;

/// One federation at a time: each is 300 sessions on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

const CLIENTS: usize = 300;
const ROUNDS: u64 = 3;

fn federation_of_300(broker: &str) {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = Command::new(env!("CARGO_BIN_EXE_fedmq"))
        .args(["bench", "round", "--processes", "--broker", broker])
        .arg(format!("--clients={CLIENTS}"))
        .args([
            "--clients-per-process=100",
            "--params=10k",
            "--round-timeout-s=120",
        ])
        .arg(format!("--rounds={ROUNDS}"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("running fedmq bench round");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr.lines().rev().take(20).collect::<Vec<_>>().join("\n");
    assert!(out.status.success(), "{stdout}\n{tail}");
    let line: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(line["outcome"], "completed", "{line}");
    assert_eq!(line["rounds_completed"], ROUNDS, "{line}");
    assert_eq!(
        line["clients_ok"], CLIENTS,
        "every client reported every round: {line}"
    );
    eprintln!(
        "{broker}: {CLIENTS} sessions, round_s median {} s, server peak {} MiB",
        line["round_s_median"], line["server_peak_rss_mib"]
    );
}

#[test]
fn three_hundred_client_sessions_through_the_embedded_broker() {
    federation_of_300("embedded");
}

#[test]
fn three_hundred_client_sessions_through_mosquitto() {
    if common::mosquitto_bin().is_none() {
        return;
    }
    federation_of_300("mosquitto");
}

/// Reconnect storm: 1,000 sessions (mutual TLS, behind the gateway with the shipped ACL) are
/// connected to `fedmq broker`; the broker is killed (SIGKILL) and started again on the same
/// port; every session must be back without any action, the gateway refusing none of them.
/// Their reconnects are spread by the sessions' jittered exponential back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The lock only keeps this test from running beside the 300-session ones.
#[allow(clippy::await_holding_lock)]
async fn a_thousand_sessions_return_after_a_broker_restart() {
    use fedmq::transport::{ConnState, MqttSession, MqttTls, SessionOptions};
    use std::io::BufRead as _;
    use std::time::{Duration, Instant};
    const SESSIONS: usize = 1000;
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let mut plan =
        fedmq::crypto::tls::CertsPlan::new(dir.path().join("certs"), vec!["client-1".into()]);
    plan.hosts = vec!["127.0.0.1".into()];
    fedmq::crypto::tls::generate_certs(&plan).unwrap();
    let certs = dir.path().join("certs");
    let port = common::free_port();
    let start_broker = || {
        let mut child =
            common::secure_broker_command(env!("CARGO_BIN_EXE_fedmq").as_ref(), port, &certs)
                .spawn()
                .expect("fedmq broker");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.contains(&port.to_string()).then_some(child)
    };
    // The port can take a moment to be free again after the kill: a few tries.
    let start_broker = || {
        for _ in 0..20 {
            if let Some(child) = start_broker() {
                return child;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("fedmq broker did not start on port {port}");
    };
    let mut broker = start_broker();
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut sessions = Vec::with_capacity(SESSIONS);
    let t = Instant::now();
    for i in 0..SESSIONS {
        let mut o = SessionOptions::new("127.0.0.1", port, format!("storm-{i}"));
        o.tls = Some(MqttTls {
            ca: certs.join("ca.pem"),
            identity: Some(fedmq::crypto::tls::Identity {
                cert: certs.join("client-1.pem"),
                key: certs.join("client-1.key"),
            }),
        });
        let (h, rx) = MqttSession::connect(o, cancel.child_token()).unwrap();
        sessions.push((h, rx));
    }
    let all = |want: ConnState, limit: Duration| {
        let handles: Vec<_> = sessions.iter().map(|(h, _)| h.clone()).collect();
        async move {
            let waits = handles.iter().map(|h| h.wait_for(want, limit));
            futures::future::join_all(waits)
                .await
                .into_iter()
                .filter(|r| r.is_err())
                .count()
        }
    };
    let missing = all(ConnState::Connected, Duration::from_secs(120)).await;
    assert_eq!(
        missing, 0,
        "{missing} of {SESSIONS} sessions never connected"
    );
    let first = t.elapsed();

    broker.kill().unwrap();
    broker.wait().unwrap();
    let missing = all(ConnState::Disconnected, Duration::from_secs(60)).await;
    assert_eq!(
        missing, 0,
        "{missing} sessions did not notice the broker was gone"
    );
    let mut broker = start_broker();
    let t = Instant::now();
    let missing = all(ConnState::Connected, Duration::from_secs(120)).await;
    let back = t.elapsed();
    eprintln!(
        "{SESSIONS} TLS sessions: first connect {first:?}; all back {back:?} after the restart"
    );
    assert_eq!(
        missing, 0,
        "{missing} of {SESSIONS} sessions did not come back"
    );
    cancel.cancel();
    let _ = broker.kill();
    let _ = broker.wait();
}
