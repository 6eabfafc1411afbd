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
