//! TLS everywhere, over real sockets on free 127.0.0.1 ports, with certificates made in a
//! temporary directory by the code behind `fedmq certs`:
//! - MQTT over TLS through the embedded rumqttd and through Mosquitto, mutual TLS through
//!   Mosquitto (rumqttd 0.20 cannot verify client certificates in our build; see
//!   `transport::broker`), and handshake failures (unknown CA, wrong host name, missing client
//!   certificate) reported with what to check;
//! - S3 put/get over HTTPS to the embedded store trusting a custom CA, and a wrong CA reported
//!   as a TLS failure.
//!
//! Mosquitto tests skip when the `mosquitto` binary is absent and `CI` is unset; with `CI` set
//! they fail instead.

mod common;
use common::{free_port, mosquitto_bin};

use bytes::Bytes;
use fedmq::crypto::tls::{generate_certs, CertsPlan, Identity};
use fedmq::proto::{Body, Envelope, Finish, TopicKind, Topics};
use fedmq::store::{BlobStore, EmbeddedStore, S3Options, StoreOptions, StoreTls};
use fedmq::transport::{
    BrokerOptions, BrokerTls, ConnState, EmbeddedBroker, Incoming, MqttError, MqttHandle,
    MqttSession, MqttTls, SessionOptions,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Upper bound for any single wait that should succeed.
const WAIT: Duration = Duration::from_secs(15);
/// How long a session that must fail is given before its error is inspected.
const FAIL_WAIT: Duration = Duration::from_secs(3);

/// A CA with certificates for `server`, `client-1`, `broker` and `store`, valid for `hosts`.
fn certs(hosts: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut plan = CertsPlan::new(dir.path(), vec!["server".into(), "client-1".into()]);
    plan.hosts = hosts.iter().map(|h| h.to_string()).collect();
    generate_certs(&plan).expect("generating certificates");
    dir
}

fn identity(dir: &Path, id: &str) -> Identity {
    Identity {
        cert: dir.join(format!("{id}.pem")),
        key: dir.join(format!("{id}.key")),
    }
}

fn tls_broker(dir: &Path) -> u16 {
    let opts = BrokerOptions {
        tls: Some(BrokerTls {
            cert: dir.join("broker.pem"),
            key: dir.join("broker.key"),
        }),
        ..Default::default()
    };
    EmbeddedBroker::start(opts)
        .expect("embedded TLS broker")
        .addr()
        .port()
}

/// A session to `host:port` over TLS trusting `ca`, presenting `client` when given.
fn session(
    host: &str,
    port: u16,
    id: &str,
    ca: &Path,
    client: Option<Identity>,
    subscriptions: Vec<String>,
) -> (MqttHandle, mpsc::Receiver<Incoming>) {
    let mut o = SessionOptions::new(host, port, id);
    o.tls = Some(MqttTls {
        ca: ca.to_path_buf(),
        identity: client,
    });
    o.subscriptions = subscriptions;
    o.backoff_max = Duration::from_millis(500);
    MqttSession::connect(o, CancellationToken::new()).expect("session options")
}

/// The server sends client-1 a command over TLS; client-1 receives and decodes it.
async fn command_round_trip(host: &str, port: u16, ca: &Path, mtls: Option<&Path>) {
    let run = format!("tls-{:08x}", rand::random::<u32>());
    let topics = Topics::new(&run);
    let id = |who: &str| mtls.map(|dir| identity(dir, who));
    let (client, mut rx) = session(
        host,
        port,
        &format!("{run}-client-1"),
        ca,
        id("client-1"),
        vec![topics.command("client-1")],
    );
    let (server, _srx) = session(
        host,
        port,
        &format!("{run}-server"),
        ca,
        id("server"),
        vec![],
    );
    for h in [&client, &server] {
        h.wait_for(ConnState::Connected, WAIT)
            .await
            .expect("TLS session connects");
    }
    let msg = Envelope::new(
        &run,
        1,
        "server",
        Body::Finish(Finish {
            reason: "completed".into(),
            final_model: None,
        }),
    );
    server
        .publish(&topics.command("client-1"), &msg, false)
        .await
        .expect("publish");
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("command arrives in time")
        .expect("session open");
    let (kind, env) = got.decode(&topics).expect("valid message");
    assert!(
        matches!(&kind, TopicKind::Command(c) if c == "client-1"),
        "{kind:?}"
    );
    assert_eq!(env.id, msg.id);
    client.shutdown().await;
    server.shutdown().await;
}

/// The last error of a session that cannot connect, via `wait_for`'s timeout.
async fn connect_error(handle: &MqttHandle) -> String {
    match handle.wait_for(ConnState::Connected, FAIL_WAIT).await {
        Err(e @ MqttError::Timeout { .. }) => {
            let MqttError::Timeout { last_error, .. } = &e else {
                unreachable!()
            };
            let last = last_error
                .clone()
                .expect("the timeout carries the last error");
            assert_eq!(handle.last_error().as_deref(), Some(last.as_str()));
            assert!(e.to_string().contains(&last), "{e}");
            handle.shutdown().await;
            eprintln!("reported: {last}");
            last
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn mqtt_over_tls_through_embedded_rumqttd() {
    let dir = certs(&["127.0.0.1", "localhost"]);
    let port = tokio::task::spawn_blocking({
        let d = dir.path().to_path_buf();
        move || tls_broker(&d)
    })
    .await
    .unwrap();
    command_round_trip("127.0.0.1", port, &dir.path().join("ca.pem"), None).await;
    // By name too: the certificate's SANs include localhost.
    command_round_trip("localhost", port, &dir.path().join("ca.pem"), None).await;
}

#[tokio::test]
async fn mqtt_handshake_failures_say_what_to_check() {
    // The broker's certificate is valid for 127.0.0.1 only.
    let dir = certs(&["127.0.0.1"]);
    let other = certs(&["127.0.0.1"]);
    let port = tokio::task::spawn_blocking({
        let d = dir.path().to_path_buf();
        move || tls_broker(&d)
    })
    .await
    .unwrap();

    // A CA that did not sign the broker's certificate.
    let wrong_ca = other.path().join("ca.pem");
    let (h, _rx) = session("127.0.0.1", port, "tls-wrong-ca", &wrong_ca, None, vec![]);
    let e = connect_error(&h).await;
    assert!(
        e.contains(&format!(
            "TLS handshake with the MQTT broker 127.0.0.1:{port} failed"
        )),
        "{e}"
    );
    assert!(e.contains("certificate"), "{e}");
    assert!(
        e.contains(&format!("not signed by a CA in {}", wrong_ca.display())),
        "{e}"
    );
    assert!(e.contains("MQTT_CA_PATH"), "{e}");

    // The right CA, but a host name the certificate is not valid for.
    let ca = dir.path().join("ca.pem");
    let (h, _rx) = session("localhost", port, "tls-wrong-name", &ca, None, vec![]);
    let e = connect_error(&h).await;
    assert!(e.contains("TLS handshake"), "{e}");
    assert!(
        e.contains("not valid for the host name \"localhost\""),
        "{e}"
    );
    assert!(e.contains("fedmq certs --hosts"), "{e}");

    // A missing CA file is refused up front, naming the file.
    let mut o = SessionOptions::new("127.0.0.1", port, "tls-no-ca");
    o.tls = Some(MqttTls {
        ca: dir.path().join("missing.pem"),
        identity: None,
    });
    match MqttSession::connect(o, CancellationToken::new()) {
        Err(e @ MqttError::InvalidOption { field: "tls", .. }) => {
            assert!(e.to_string().contains("missing.pem"), "{e}")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

// ---------------------------------------------------------------------------------------------
// Mosquitto

/// Killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Mosquitto with the TLS settings of broker/mosquitto-tls.conf on two listeners: `tls`
/// (server-only TLS) and `mtls` (client certificates required).
fn start_mosquitto(bin: &Path, dir: &Path, tls: u16, mtls: u16) -> Proc {
    let reference = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/mosquitto-tls.conf"),
    )
    .expect("broker/mosquitto-tls.conf");
    for line in [
        "listener 8883",
        "certfile certs/broker.pem",
        "require_certificate true",
        "tls_version tlsv1.2",
        "set_tcp_nodelay true",
        "max_packet_size 262144",
    ] {
        assert!(
            reference.contains(line),
            "mosquitto-tls.conf lacks {line:?}"
        );
    }
    let files = format!(
        "certfile {}\nkeyfile {}\ncafile {}\ntls_version tlsv1.2\n",
        dir.join("broker.pem").display(),
        dir.join("broker.key").display(),
        dir.join("ca.pem").display()
    );
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            // `user root`: started as root, Mosquitto would switch to the `mosquitto` user, who
            // cannot read the 0600 keys in this private directory; for others it has no effect.
            "user root\nper_listener_settings false\nallow_anonymous true\npersistence false\n\
             set_tcp_nodelay true\nmax_packet_size 262144\nlog_dest stderr\n\
             listener {tls} 127.0.0.1\n{files}require_certificate false\n\
             listener {mtls} 127.0.0.1\n{files}require_certificate true\n\
             use_identity_as_username true\n"
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
    Proc(child)
}

#[tokio::test]
async fn mqtt_over_tls_and_mutual_tls_through_mosquitto() {
    let Some(bin) = mosquitto_bin() else {
        return;
    };
    let dir = certs(&["127.0.0.1", "localhost"]);
    let (tls, mtls) = (free_port(), free_port());
    let _broker = start_mosquitto(&bin, dir.path(), tls, mtls);
    let ca = dir.path().join("ca.pem");

    // Sessions retry with back-off until Mosquitto listens: no sleep needed.
    command_round_trip("127.0.0.1", tls, &ca, None).await;
    command_round_trip("127.0.0.1", mtls, &ca, Some(dir.path())).await;

    // Mutual TLS without a client certificate: refused, and the error says what is missing.
    let (h, _rx) = session("127.0.0.1", mtls, "tls-no-client-cert", &ca, None, vec![]);
    let e = connect_error(&h).await;
    assert!(e.contains("TLS handshake"), "{e}");
    assert!(e.contains("refused our client certificate"), "{e}");

    // A client certificate from another CA: refused too.
    let other = certs(&["127.0.0.1"]);
    let (h, _rx) = session(
        "127.0.0.1",
        mtls,
        "tls-foreign-client-cert",
        &ca,
        Some(identity(other.path(), "client-1")),
        vec![],
    );
    let e = connect_error(&h).await;
    assert!(
        e.contains("TLS handshake") && e.contains("client certificate"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// S3 over HTTPS

const AKI: &str = "fedmq-tls";
const SAK: &str = "tls-secret-key-0123456789";

async fn https_store(dir: &Path, data: &Path) -> EmbeddedStore {
    let store = EmbeddedStore::start_with_tls(
        StoreOptions::new(data, AKI, SAK),
        Some(StoreTls {
            cert: dir.join("store.pem"),
            key: dir.join("store.key"),
        }),
    )
    .await
    .expect("HTTPS store");
    assert!(store.endpoint().starts_with("https://127.0.0.1:"));
    store
}

fn s3(endpoint: String, ca: PathBuf) -> S3Options {
    S3Options {
        endpoint,
        access_key: AKI.into(),
        secret_key: SAK.into(),
        bucket: "tls".into(),
        ca_path: Some(ca),
        max_attempts: 1,
        connect_timeout: Duration::from_secs(2),
        ..S3Options::default()
    }
}

#[tokio::test]
async fn s3_put_get_over_https_with_a_custom_ca() {
    let dir = certs(&["127.0.0.1", "localhost"]);
    let data = tempfile::tempdir().unwrap();
    let store = https_store(dir.path(), data.path()).await;
    let blobs = BlobStore::connect(&s3(store.endpoint(), dir.path().join("ca.pem"))).unwrap();
    blobs.ensure_bucket().await.expect("bucket over HTTPS");
    // Larger than one part: multipart upload and ranged GETs over TLS too.
    let bytes: Vec<u8> = (0..9 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    for len in [1000, bytes.len()] {
        let r = blobs
            .put(
                &format!("blob-{len}"),
                Bytes::copy_from_slice(&bytes[..len]),
            )
            .await
            .expect("put over HTTPS");
        let got = blobs.get(&r).await.expect("get over HTTPS");
        assert_eq!(&got[..], &bytes[..len]);
    }
    store.shutdown().await;
}

#[tokio::test]
async fn s3_wrong_ca_or_plain_client_fails_clearly() {
    let dir = certs(&["127.0.0.1"]);
    let other = certs(&["127.0.0.1"]);
    let data = tempfile::tempdir().unwrap();
    let store = https_store(dir.path(), data.path()).await;

    let wrong_ca = other.path().join("ca.pem");
    let blobs = BlobStore::connect(&s3(store.endpoint(), wrong_ca.clone())).unwrap();
    let e = blobs.ensure_bucket().await.unwrap_err().to_string();
    eprintln!("reported: {e}");
    assert!(
        e.contains(&format!(
            "TLS handshake with the S3 endpoint {}",
            store.endpoint()
        )),
        "{e}"
    );
    assert!(
        e.contains(&format!("not signed by a CA in {}", wrong_ca.display())),
        "{e}"
    );
    assert!(e.contains("CN_S3_CA_PATH"), "{e}");

    // The right CA by a name the certificate is not valid for.
    let by_name = store.endpoint().replace("127.0.0.1", "localhost");
    let blobs = BlobStore::connect(&s3(by_name, dir.path().join("ca.pem"))).unwrap();
    let e = blobs.ensure_bucket().await.unwrap_err().to_string();
    assert!(
        e.contains("not valid for the host name \"localhost\""),
        "{e}"
    );

    // A CA file that is not one is refused before any request, naming the file.
    let key_as_ca = dir.path().join("store.key");
    let e = BlobStore::connect(&s3(store.endpoint(), key_as_ca))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("store.key") && e.contains("CN_S3_CA_PATH"),
        "{e}"
    );
    store.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// fedmq certs

#[test]
fn fedmq_certs_writes_a_ca_and_participant_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fedmq"))
            .args(["certs", "--out"])
            .arg(&out)
            .args(["--participants", "server,client-1,client-2"])
            .args(extra)
            .output()
            .expect("running fedmq certs")
    };
    let o = run(&["--hosts", "127.0.0.1,localhost,broker.example"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(String::from)
        .collect();
    let mut want = vec!["ca.pem".to_string(), "ca.key".to_string()];
    for id in ["server", "client-1", "client-2", "broker", "store"] {
        want.push(format!("{id}.pem"));
        want.push(format!("{id}.key"));
    }
    let want: Vec<String> = want
        .iter()
        .map(|f| out.join(f).display().to_string())
        .collect();
    assert_eq!(printed, want);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("client-2.key"), 0o600);
    }
    // The files make working configurations.
    fedmq::crypto::tls::client_config(&out.join("ca.pem"), Some(&identity(&out, "client-2")))
        .unwrap();
    // A second run refuses to overwrite the CA.
    let o = run(&[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
