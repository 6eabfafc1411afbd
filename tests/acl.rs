//! Broker authorization: Debian's Mosquitto with a password file and the shipped ACL
//! (`broker/fedmq.acl`) keeps each participant on its own topics.
//!
//! Skips when `mosquitto` or `mosquitto_passwd` is absent and `CI` is unset; with `CI` set it
//! fails instead.

mod common;
use common::free_port;

use fedmq::proto::{BlobRef, Body, Envelope, Failure, Role, TopicKind, Topics, Train, TrainConfig};
use fedmq::transport::{
    ConnState, Incoming, MqttHandle, MqttSession, PresenceMessages, SessionOptions,
};
use std::path::Path;
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

fn start_mosquitto(bin: &Path, passwd: &Path, dir: &Path, port: u16) -> Broker {
    let users = [
        ("server", "pw-server"),
        ("client-1", "pw-1"),
        ("client-2", "pw-2"),
    ];
    let file = dir.join("fedmq.passwd");
    for (i, (user, pw)) in users.iter().enumerate() {
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
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/fedmq.acl");
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
        let role = if id == "server" {
            Role::Server
        } else {
            Role::Client
        };
        let mut o = SessionOptions::new("127.0.0.1", port, id);
        o.user = Some(id.to_string());
        o.password = Some(password.to_string());
        o.clean_session = true;
        o.subscriptions = subscriptions;
        o.presence = Some(PresenceMessages::status(RUN, id, role, None));
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
            deadline_ms: fedmq::proto::now_ms() + 60_000,
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
