//! Broker authorization: the shipped ACL (`broker/fedmq.acl`) keeps each participant on its own
//! topics, in Debian's Mosquitto (with a password file) and in the embedded broker's authorizing
//! gateway (with a user table, the same Mosquitto password file, or client certificates).
//!
//! Mosquitto drops a refused publish silently; the gateway closes the connection that sent it.
//! Either way the forged message never reaches its subscribers, which is what the tests check.
//!
//! Tests that need `mosquitto` or `mosquitto_passwd` skip when it is absent and `CI` is unset;
//! with `CI` set they fail instead.

mod common;
use common::free_port;

use fedmq::crypto::tls::{generate_certs, CertsPlan, Identity};
use fedmq::proto::{BlobRef, Body, Envelope, Failure, Role, TopicKind, Topics, Train, TrainConfig};
use fedmq::transport::{
    BrokerOptions, BrokerTls, ConnState, EmbeddedBroker, FailureBudget, Incoming, MqttHandle,
    MqttSession, MqttTls, PresenceMessages, SessionOptions,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);
const RUN: &str = "acl";

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The participants and their passwords.
const USERS: [(&str, &str); 3] = [
    ("server", "pw-server"),
    ("client-1", "pw-1"),
    ("client-2", "pw-2"),
];

fn password_of(user: &str) -> &'static str {
    USERS
        .iter()
        .find(|(u, _)| *u == user)
        .map(|(_, p)| *p)
        .expect("a known user")
}

fn acl_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/fedmq.acl")
}

/// `fedmq.passwd` in `dir`, written by `mosquitto_passwd` for [`USERS`].
fn write_password_file(passwd: &Path, dir: &Path) -> PathBuf {
    let file = dir.join("fedmq.passwd");
    for (i, (user, pw)) in USERS.iter().enumerate() {
        let mut c = Command::new(passwd);
        c.arg("-b");
        if i == 0 {
            c.arg("-c");
        }
        let ok = c
            .arg(&file)
            .args([user, pw])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("running mosquitto_passwd");
        assert!(ok.success(), "mosquitto_passwd failed");
    }
    file
}

fn start_mosquitto(bin: &Path, passwd: &Path, dir: &Path, port: u16) -> Broker {
    let file = write_password_file(passwd, dir);
    let acl = acl_file();
    let conf = dir.join("mosquitto.conf");
    // `user root`: started as root, Mosquitto would switch to the `mosquitto` user, which cannot
    // read the test's files; without root privileges the line has no effect.
    std::fs::write(
        &conf,
        format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
             acl_file {}\npersistence false\nmax_packet_size 262144\nset_tcp_nodelay true\n",
            file.display(),
            acl.display()
        ),
    )
    .unwrap();
    Broker(
        Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning mosquitto"),
    )
}

struct Peer {
    handle: MqttHandle,
    rx: mpsc::Receiver<Incoming>,
}

impl Peer {
    async fn connect(port: u16, id: &str, password: &str, subscriptions: Vec<String>) -> Self {
        let mut o = SessionOptions::new("127.0.0.1", port, id);
        o.user = Some(id.to_string());
        o.password = Some(password.to_string());
        o.clean_session = true;
        o.subscriptions = subscriptions;
        Self::start(o).await
    }

    /// Connects with `o` plus the participant's presence (its client id is its participant id)
    /// and waits until connected and subscribed.
    async fn start(mut o: SessionOptions) -> Self {
        let role = if o.client_id == "server" {
            Role::Server
        } else {
            Role::Client
        };
        o.presence = Some(PresenceMessages::status(RUN, &o.client_id, role, None));
        let (handle, rx) = MqttSession::connect(o, CancellationToken::new()).unwrap();
        handle
            .wait_for(ConnState::Connected, WAIT)
            .await
            .expect("authenticated session connects");
        Self { handle, rx }
    }

    /// The next command or update (status messages skipped).
    async fn next(&mut self, topics: &Topics) -> (TopicKind, Envelope) {
        loop {
            let m = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("a message within the timeout")
                .expect("session open");
            let (kind, env) = m.decode(topics).expect("a valid message");
            if !matches!(kind, TopicKind::Status(_)) {
                return (kind, env);
            }
        }
    }
}

fn train(round: u64) -> Envelope {
    Envelope::new(
        RUN,
        round,
        "server",
        Body::Train(Train {
            global: BlobRef {
                key: format!("fedmq/{RUN}/r{round:06}/global"),
                len: 1,
                sha256: "ab".repeat(32),
                wrapped_key: None,
            },
            config: TrainConfig {
                model: "lr".into(),
                epochs: 1,
                batch_size: 32,
                optimizer: "adam".into(),
                learning_rate: 0.001,
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

fn failure(from: &str, reason: &str) -> Envelope {
    Envelope::new(
        RUN,
        1,
        from,
        Body::Failure(Failure {
            reason: reason.into(),
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_acl_keeps_each_client_on_its_own_topics() {
    let (Some(bin), Some(passwd)) = (
        common::installed("mosquitto"),
        common::installed("mosquitto_passwd"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = start_mosquitto(&bin, &passwd, dir.path(), port);
    let t = Topics::new(RUN);

    let mut server = Peer::connect(port, "server", "pw-server", vec![t.up_all()]).await;
    let mut victim = Peer::connect(port, "client-2", "pw-2", vec![t.command("client-2")]).await;
    // client-1 also tries to read client-2's commands.
    let mut attacker = Peer::connect(
        port,
        "client-1",
        "pw-1",
        vec![t.command("client-1"), t.command("client-2")],
    )
    .await;

    // Refused by the ACL: client-1 publishing as client-2, and as the server.
    attacker
        .handle
        .publish(&t.up("client-2"), &failure("client-2", "forged"), false)
        .await
        .unwrap();
    attacker
        .handle
        .publish(&t.command("client-2"), &train(99), false)
        .await
        .unwrap();
    // Allowed: its own update topic.
    let own = failure("client-1", "genuine");
    attacker
        .handle
        .publish(&t.up("client-1"), &own, false)
        .await
        .unwrap();
    let (kind, got) = server.next(&t).await;
    assert_eq!(kind, TopicKind::Up("client-1".into()));
    assert_eq!(got.id, own.id, "the forged update never reached the server");

    // The server commands client-2, then client-1.
    let for_victim = train(1);
    server
        .handle
        .publish(&t.command("client-2"), &for_victim, false)
        .await
        .unwrap();
    let for_attacker = train(2);
    server
        .handle
        .publish(&t.command("client-1"), &for_attacker, false)
        .await
        .unwrap();
    let (_, got) = victim.next(&t).await;
    assert_eq!(
        got.id, for_victim.id,
        "client-2 never saw the forged command"
    );
    let (kind, got) = attacker.next(&t).await;
    assert_eq!(kind, TopicKind::Command("client-1".into()));
    assert_eq!(
        got.id, for_attacker.id,
        "client-1 cannot read client-2's commands"
    );

    // A wrong password is refused at connection time.
    let mut o = SessionOptions::new("127.0.0.1", port, "client-2");
    o.user = Some("client-2".into());
    o.password = Some("wrong".into());
    let (h, _rx) = MqttSession::connect(o, CancellationToken::new()).unwrap();
    assert!(h
        .wait_for(ConnState::Connected, Duration::from_secs(2))
        .await
        .is_err());
    h.abort();

    for p in [server, victim, attacker] {
        p.handle.shutdown().await;
    }
}

/// Session options for participant `who` (user name, or certificate name with mutual TLS)
/// connecting as `client_id` to the embedded broker under test.
type Login<'a> = &'a dyn Fn(&str, &str) -> SessionOptions;

/// Options for `who` connecting as `client_id` with user name and password.
fn password_login(port: u16) -> impl Fn(&str, &str) -> SessionOptions {
    move |who, client_id| {
        let mut o = SessionOptions::new("127.0.0.1", port, client_id);
        o.user = Some(who.to_string());
        o.password = Some(password_of(who).to_string());
        o.clean_session = true;
        // A connection closed by the gateway stays visible as `Disconnected` for a while.
        o.backoff_initial = Duration::from_secs(1);
        o
    }
}

/// Options for `who` connecting as `client_id` over TLS with `who`'s client certificate.
fn certificate_login(port: u16, dir: &Path) -> impl Fn(&str, &str) -> SessionOptions + '_ {
    move |who, client_id| {
        let mut o = SessionOptions::new("127.0.0.1", port, client_id);
        o.tls = Some(MqttTls {
            ca: dir.join("ca.pem"),
            identity: Some(Identity {
                cert: dir.join(format!("{who}.pem")),
                key: dir.join(format!("{who}.key")),
            }),
        });
        o.clean_session = true;
        o.backoff_initial = Duration::from_secs(1);
        o
    }
}

/// The embedded broker with `opts` plus the shipped ACL, and a failure budget that the test's
/// refused sessions cannot exhaust.
fn start_embedded(opts: BrokerOptions) -> u16 {
    let opts = BrokerOptions {
        acl_file: Some(acl_file()),
        failure_budget: FailureBudget {
            burst: 1000,
            per_second: 1000.0,
        },
        ..opts
    };
    EmbeddedBroker::start(opts)
        .expect("embedded broker behind the gateway")
        .addr()
        .port()
}

/// A session as `who` with `client_id`, no presence, that must connect; it then publishes
/// `msg` on `topic`, which the gateway must answer by closing the connection.
async fn forged_publish_is_refused(login: Login<'_>, who: &str, topic: &str, msg: &Envelope) {
    let (h, _rx) = MqttSession::connect(login(who, "forger"), CancellationToken::new()).unwrap();
    h.wait_for(ConnState::Connected, WAIT)
        .await
        .expect("the forger itself is authenticated");
    h.publish(topic, msg, false).await.unwrap();
    h.wait_for(ConnState::Disconnected, WAIT)
        .await
        .unwrap_or_else(|e| {
            panic!("the gateway closes the connection that published on {topic}: {e}")
        });
    h.abort();
}

/// The checks of the Mosquitto test, through the gateway: forged update and forged command
/// refused (the forger's connection is closed; server and victim never see the messages while
/// genuine ones from other connections arrive), no subscription to another client's commands,
/// no takeover of another client's session through its client id, and `refused` (a session with
/// a wrong credential) never connects.
async fn embedded_scenario(login: Login<'_>, refused: SessionOptions) {
    let t = Topics::new(RUN);
    let with = |who: &str, subscriptions: Vec<String>| {
        let mut o = login(who, who);
        o.subscriptions = subscriptions;
        o
    };
    let mut server = Peer::start(with("server", vec![t.up_all()])).await;
    let mut victim = Peer::start(with("client-2", vec![t.command("client-2")])).await;
    let mut client1 = Peer::start(with("client-1", vec![t.command("client-1")])).await;

    // client-1 publishing as client-2, then as the server.
    forged_publish_is_refused(
        login,
        "client-1",
        &t.up("client-2"),
        &failure("client-2", "forged"),
    )
    .await;
    forged_publish_is_refused(login, "client-1", &t.command("client-2"), &train(99)).await;

    // client-1 subscribing to client-2's commands: closed at SUBSCRIBE, so never `Connected`.
    let mut o = login("client-1", "reader");
    o.subscriptions = vec![t.command("client-2")];
    let (reader, mut reader_rx) = MqttSession::connect(o, CancellationToken::new()).unwrap();
    reader
        .wait_for(ConnState::Disconnected, WAIT)
        .await
        .expect("the gateway closes a connection that subscribes to another client's commands");

    // client-1 connecting with client-2's client id: its own session, client-2 keeps its own.
    let mut o = login("client-1", "client-2");
    o.subscriptions = vec![t.command("client-1")];
    let (impostor, mut impostor_rx) = MqttSession::connect(o, CancellationToken::new()).unwrap();
    impostor
        .wait_for(ConnState::Connected, WAIT)
        .await
        .expect("a client id is not an identity");

    // Genuine messages, from other connections, arrive first: the forged ones never did.
    let own = failure("client-1", "genuine");
    client1
        .handle
        .publish(&t.up("client-1"), &own, false)
        .await
        .unwrap();
    let (kind, got) = server.next(&t).await;
    assert_eq!(kind, TopicKind::Up("client-1".into()));
    assert_eq!(got.id, own.id, "the forged update never reached the server");
    let for_victim = train(1);
    server
        .handle
        .publish(&t.command("client-2"), &for_victim, false)
        .await
        .unwrap();
    let for_client1 = train(2);
    server
        .handle
        .publish(&t.command("client-1"), &for_client1, false)
        .await
        .unwrap();
    let (_, got) = victim.next(&t).await;
    assert_eq!(
        got.id, for_victim.id,
        "client-2 never saw the forged command"
    );
    let (kind, got) = client1.next(&t).await;
    assert_eq!(kind, TopicKind::Command("client-1".into()));
    assert_eq!(got.id, for_client1.id);
    assert_eq!(
        victim.handle.state(),
        ConnState::Connected,
        "not taken over"
    );
    for rx in [&mut reader_rx, &mut impostor_rx] {
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            let (kind, _) = m.decode(&t).expect("a valid message");
            assert_ne!(
                kind,
                TopicKind::Command("client-2".into()),
                "read client-2's commands"
            );
        }
    }
    reader.abort();
    impostor.abort();

    let (h, _rx) = MqttSession::connect(refused, CancellationToken::new()).unwrap();
    assert!(h
        .wait_for(ConnState::Connected, Duration::from_secs(2))
        .await
        .is_err());
    h.abort();

    for p in [server, victim, client1] {
        p.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_acl_keeps_each_client_on_its_own_topics() {
    let users = user_table();
    let port = start_embedded(BrokerOptions {
        users: Some(users),
        ..Default::default()
    });
    let login = password_login(port);
    let mut wrong = login("client-2", "client-2");
    wrong.password = Some("wrong".into());
    embedded_scenario(&login, wrong).await;
}

/// The same, with the password file `mosquitto_passwd` writes (the one Mosquitto uses above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_acl_with_a_mosquitto_password_file() {
    let Some(passwd) = common::installed("mosquitto_passwd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = start_embedded(BrokerOptions {
        password_file: Some(write_password_file(&passwd, dir.path())),
        ..Default::default()
    });
    let login = password_login(port);
    let mut wrong = login("client-2", "client-2");
    wrong.password = Some("wrong".into());
    embedded_scenario(&login, wrong).await;
}

/// Mutual TLS through the gateway: the client certificate's Common Name is the user name, no
/// password needed; without a client certificate the handshake fails; client-1's certificate
/// cannot publish on client-2's topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mutual_tls_identity_is_the_certificate_name() {
    let dir = tempfile::tempdir().unwrap();
    let plan = CertsPlan::new(
        dir.path(),
        vec!["server".into(), "client-1".into(), "client-2".into()],
    );
    generate_certs(&plan).expect("certificates");
    let port = start_embedded(BrokerOptions {
        tls: Some(BrokerTls {
            cert: dir.path().join("broker.pem"),
            key: dir.path().join("broker.key"),
        }),
        client_ca: Some(dir.path().join("ca.pem")),
        ..Default::default()
    });
    let login = certificate_login(port, dir.path());
    let mut anonymous = login("client-2", "client-2");
    if let Some(tls) = &mut anonymous.tls {
        tls.identity = None;
    }
    let (h, _rx) = MqttSession::connect(anonymous.clone(), CancellationToken::new()).unwrap();
    let e = h
        .wait_for(ConnState::Connected, Duration::from_secs(3))
        .await
        .expect_err("no client certificate, no connection")
        .to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    h.abort();
    embedded_scenario(&login, anonymous).await;
}

/// The participants' passwords as the broker's user table.
fn user_table() -> HashMap<String, String> {
    USERS
        .iter()
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect()
}

/// A raw MQTT 3.1.1 CONNECT with a user name and password.
fn connect_packet(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60];
    for field in [client_id, user, password] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// Sends CONNECT from source address `from` and returns the CONNACK's return code and how
/// long it took to come.
async fn try_password(port: u16, from: std::net::Ipv4Addr, user: &str, pw: &str) -> (u8, Duration) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let mut s = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let t = std::time::Instant::now();
    s.write_all(&connect_packet("guess", user, pw))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    (connack[3], t.elapsed())
}

/// Password guessing for one user name from many addresses (so that no address runs out of
/// its budget): once the user name's failure budget is spent, every further wrong password is
/// answered only after a second, while the right password still connects at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_for_one_user_name_is_slowed_and_the_right_password_is_not() {
    let users = user_table();
    let port = EmbeddedBroker::start(BrokerOptions {
        users: Some(users),
        acl_file: Some(acl_file()),
        failure_budget: FailureBudget {
            burst: 5,
            per_second: 0.1,
        },
        ..Default::default()
    })
    .unwrap()
    .addr()
    .port();
    let mut answers = Vec::new();
    for i in 0..8u8 {
        let from = std::net::Ipv4Addr::new(127, 0, 1, 10 + i);
        answers.push(try_password(port, from, "client-2", &format!("guess-{i}")).await);
    }
    assert!(answers.iter().all(|(code, _)| *code == 0x04), "{answers:?}");
    let (quick, slow) = answers.split_at(4);
    assert!(
        quick.iter().all(|(_, t)| *t < Duration::from_millis(500)),
        "{answers:?}"
    );
    assert!(
        slow.iter().all(|(_, t)| *t >= Duration::from_millis(950)),
        "{answers:?}"
    );
    // The right password is not delayed, from a fresh address or a guessing one.
    for from in [[127, 0, 1, 100], [127, 0, 1, 10]] {
        let (code, took) =
            try_password(port, from.into(), "client-2", password_of("client-2")).await;
        assert_eq!(code, 0, "the right password connects");
        assert!(took < Duration::from_millis(500), "{took:?}");
    }
}
