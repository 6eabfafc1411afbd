//! Whole federations on real components bound to 127.0.0.1: the embedded rumqttd or Debian's
//! Mosquitto, the embedded S3 store (in this process or as `fedmq store`), the server, and
//! clients training on MNIST (fetched on first use), in this process or as `fedmq client`
//! processes.
//!
//! Mosquitto tests skip when the `mosquitto` binary is absent and `CI` is unset; with `CI` set
//! they fail instead.

mod common;
use common::{free_port, mosquitto_bin};

use fedmq::client::{
    self, ClientOptions, ClientReport, DataTrainer, LocalHooks, LocalTrainer, TrainError, Trained,
};
use fedmq::config::Config;
use fedmq::crypto::identity::{Identity, Keyring};
use fedmq::crypto::seal::BlobCrypto;
use fedmq::federation::{self, LocalOptions, ModelEvaluator, KEY_PREFIX};
use fedmq::metrics::{read_jsonl, RoundRecord};
use fedmq::proto::{BlobKeys, Body, Envelope, TopicKind, Topics, TrainConfig, TrainMetrics};
use fedmq::server::{self, Evaluator, Outcome, Progress, ServerReport};
use fedmq::store::{BlobStore, EmbeddedStore, S3Options, SealedStore, StoreOptions};
use fedmq::strategy::FedAvg;
use fedmq::tensor::ParamSet;
use fedmq::train::ModelKind;
use fedmq::transport::{BrokerOptions, ConnState, EmbeddedBroker, MqttSession, SessionOptions};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "federation-test-secret";
const WAIT: Duration = Duration::from_secs(15);

/// A new embedded rumqttd on a free port. Each test gets its own: participant ids (`server`,
/// `client-1`, ...) are MQTT client ids, and two tests sharing a broker would take over each
/// other's sessions. (rumqttd cannot be stopped; its threads end with the test binary.)
fn embedded_broker() -> u16 {
    EmbeddedBroker::start(BrokerOptions::default())
        .expect("embedded broker")
        .addr()
        .port()
}

/// A small, fast federation on MNIST: `model`, `clients` clients, `rounds` rounds.
fn config(run: &str, model: &str, clients: usize, rounds: usize, partition: &str) -> Config {
    let mut c = Config::default();
    c.common_args.run_id = run.into();
    c.model_args.model = model.into();
    c.data_args.dataset = "mnist".into();
    c.data_args.partition_method = partition.into();
    c.data_args.partition_alpha = 0.5;
    c.train_args.client_num_in_total = clients;
    c.train_args.client_num_per_round = clients;
    c.train_args.comm_round = rounds;
    c.train_args.epochs = 1;
    c.train_args.batch_size = 32;
    c.train_args.client_optimizer = "adam".into();
    c.train_args.learning_rate = 0.001;
    c.comm_args.customized_training_s3_config.cn_s3_aki = "fedmq".into();
    c.comm_args.customized_training_s3_config.cn_s3_sak = SECRET.into();
    c.validate().expect("valid test config");
    c
}

/// `raw` (the stored bytes of `key`) is a sealed blob: the sealed header, and neither a
/// safetensors model, nor a tensor name, nor a JSON field anywhere in it.
fn assert_only_ciphertext(key: &str, raw: &[u8]) {
    assert!(
        fedmq::crypto::seal::looks_sealed(raw),
        "{key} is not sealed"
    );
    assert!(
        ParamSet::from_safetensors_bytes(raw).is_err(),
        "{key} parses as a model"
    );
    // Needles of 6+ bytes: a shorter one turns up in random ciphertext of this size now and then
    // (a 3-byte one in about 1 of 20 blobs of 800 KB).
    for needle in [
        &b"weight"[..],
        b".bias\"",
        b"\"dtype\"",
        b"\"round\"",
        b"FedAvg",
    ] {
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle),
            "{key} contains {:?} in clear",
            String::from_utf8_lossy(needle)
        );
    }
}

fn accuracies(records: &[RoundRecord]) -> Vec<f64> {
    records.iter().filter_map(|r| r.test_accuracy).collect()
}

fn failed(r: &RoundRecord, client: &str) -> bool {
    r.failed_clients
        .iter()
        .any(|f| f.starts_with(&format!("{client}:")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_federation_learns_and_writes_its_outputs() {
    let out = tempfile::tempdir().unwrap();
    let cfg = config("learns", "mlp", 3, 3, "homo");
    let opts = LocalOptions::new(out.path().to_path_buf());
    let mut seen = Vec::new();
    let report = federation::run_local(
        &cfg,
        &opts,
        |p| {
            if let Progress::RoundClosed(r) = p {
                seen.push(r.round)
            }
        },
        CancellationToken::new(),
    )
    .await
    .expect("local federation");
    let s = &report.server;
    assert_eq!(s.outcome, Outcome::Completed);
    assert_eq!(seen, vec![1, 2, 3]);
    assert_eq!(s.records.len(), 3);
    for r in &s.records {
        assert_eq!(r.participants, 3, "{r:?}");
        assert_eq!(r.failures, 0, "{r:?}");
        assert_eq!(r.num_samples, 60_000);
        assert!(r.bytes > 0);
    }
    let acc = accuracies(&s.records);
    assert_eq!(acc.len(), 3, "every round is evaluated");
    assert!(acc[2] > acc[0], "accuracy rises: {acc:?}");
    assert!(acc[2] >= 0.95, "mlp on homo MNIST after 3 rounds: {acc:?}");

    // Every client trained every round once and left at the finish.
    assert_eq!(report.clients.len(), 3);
    for c in &report.clients {
        let c = c.as_ref().expect("client ran");
        assert_eq!(c.rounds_reported, 3);
        assert_eq!(c.reason, "completed");
        // The same blob, its key wrapped for this client.
        let m = c.final_model.as_ref().expect("final model offered");
        let f = s.final_model.as_ref().unwrap();
        assert_eq!((&m.key, &m.sha256, m.len), (&f.key, &f.sha256, f.len));
        assert!(m.wrapped_key.is_some());
    }

    // Outputs: metrics as JSONL and CSV, the plot, the final model.
    let jsonl = read_jsonl(&out.path().join("metrics.jsonl")).unwrap();
    assert_eq!(jsonl, s.records);
    let csv = std::fs::read_to_string(out.path().join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    let svg = std::fs::read_to_string(out.path().join("plot.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    let bytes = std::fs::read(out.path().join("final_model.safetensors")).unwrap();
    let final_params = ParamSet::from_safetensors_bytes(&bytes).unwrap();
    assert_eq!(final_params, s.final_params);
    assert_eq!(final_params.num_params(), 199_210, "mlp 784-200-200-10");

    // The store (its data lives in the output directory), read with its raw credentials: the
    // checkpoint of the last round and the blobs of the last two rounds (keep_rounds = 2), every
    // one of them ciphertext (`fedmq run` gives its participants keys and seals every blob).
    let store = EmbeddedStore::start(StoreOptions::new(out.path().join("store"), "fedmq", SECRET))
        .await
        .unwrap();
    let mut s3 = cfg.comm_args.customized_training_s3_config.clone();
    s3.cn_s3_endpoint = store.endpoint();
    let blobs = BlobStore::connect(&S3Options::from(&s3)).unwrap();
    let keys = BlobKeys::new(KEY_PREFIX, "learns");
    let left: Vec<String> = blobs
        .list(&keys.run_prefix())
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(
        left.len() >= 8,
        "global, updates, final model, checkpoints: {left:?}"
    );
    for key in &left {
        let raw = blobs.get_unverified(key).await.unwrap();
        assert_only_ciphertext(key, &raw);
    }
    // Without the server's key the checkpoint cannot even be read.
    let e = server::latest_checkpoint(&SealedStore::new(blobs.clone(), None), &keys)
        .await
        .expect_err("a sealed checkpoint needs the server's key");
    assert!(e.to_string().contains("is sealed"), "{e}");
    assert!(
        !left.iter().any(|k| k.contains("/r000001/")),
        "round 1 blobs deleted: {left:?}"
    );
    assert!(
        left.iter().any(|k| k.ends_with("checkpoint/r000002")),
        "{left:?}"
    );
    assert!(
        !left.iter().any(|k| k.ends_with("checkpoint/r000001")),
        "{left:?}"
    );
    store.shutdown().await;

    // The final model evaluates to the last recorded accuracy.
    let (split, _) = federation::load_data(&cfg, false).unwrap();
    let ev = ModelEvaluator::new(ModelKind::Mlp, split.test.clone(), candle_core::Device::Cpu);
    let e = ev.evaluate(&final_params).unwrap();
    assert!((e.accuracy - acc[2]).abs() < 1e-9, "{e:?} vs {acc:?}");
}

// ---------------------------------------------------------------------------------------------
// A federation assembled by hand: broker and store in this process, clients in-process or as
// `fedmq client` processes.

/// The trusted keys and every participant's signing key.
type Signing = (Arc<Keyring>, BTreeMap<String, Arc<Identity>>);

struct Fixture {
    _dir: tempfile::TempDir,
    cfg: Config,
    cfg_path: PathBuf,
    store: Option<EmbeddedStore>,
    broker_port: u16,
    /// Signed messages: the trusted keys and every participant's key.
    signing: Option<Signing>,
}

impl Fixture {
    /// Embedded broker + embedded store; `cfg` rewritten to point at them and saved to a file
    /// for client processes.
    async fn new(mut cfg: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store =
            EmbeddedStore::start(StoreOptions::new(dir.path().join("store"), "fedmq", SECRET))
                .await
                .expect("embedded store");
        let m = &mut cfg.comm_args.customized_training_mqtt_config;
        m.broker_host = "127.0.0.1".into();
        m.broker_port = embedded_broker();
        let broker_port = m.broker_port;
        cfg.comm_args.customized_training_s3_config.cn_s3_endpoint = store.endpoint();
        let cfg_path = dir.path().join("fedml_config.yaml");
        // The secret travels in the environment, as in production.
        let mut on_disk = cfg.clone();
        on_disk.comm_args.customized_training_s3_config.cn_s3_sak = String::new();
        std::fs::write(&cfg_path, serde_yaml_ng::to_string(&on_disk).unwrap()).unwrap();
        Self {
            _dir: dir,
            cfg,
            cfg_path,
            store: Some(store),
            broker_port,
            signing: None,
        }
    }

    fn s3(&self) -> BlobStore {
        BlobStore::connect(&S3Options::from(
            &self.cfg.comm_args.customized_training_s3_config,
        ))
        .unwrap()
    }

    /// Blob sealing of participant `id` when the fixture signs (one keyring for everyone).
    fn crypto(&self, id: &str) -> Option<Arc<BlobCrypto>> {
        self.signing
            .as_ref()
            .map(|(ring, ids)| Arc::new(BlobCrypto::new(ids[id].clone(), ring.clone())))
    }

    /// An in-process client of `rank` with `trainer`.
    fn client(
        &self,
        rank: usize,
        trainer: Arc<dyn LocalTrainer>,
        cancel: &CancellationToken,
    ) -> tokio::task::JoinHandle<Result<ClientReport, client::ClientError>> {
        let id = client::client_id(rank);
        let opts = ClientOptions {
            run: self.cfg.common_args.run_id.clone(),
            id: id.clone(),
            keys: BlobKeys::new(KEY_PREFIX, &self.cfg.common_args.run_id),
            capabilities: federation::capabilities("cpu", trainer.num_samples()),
            train_slots: None,
            connect_timeout: WAIT,
            keyring: self.signing.as_ref().map(|s| s.0.clone()),
            crypto: self.crypto(&id),
            link_timeout: None,
        };
        let mut mqtt = federation::session_options(&self.cfg, &id, None);
        mqtt.signer = self.signing.as_ref().map(|s| s.1[&id].clone());
        tokio::spawn(client::run_client(
            opts,
            mqtt,
            self.s3(),
            trainer,
            cancel.child_token(),
        ))
    }

    /// `fedmq client --rank <rank>` as a child process.
    fn client_process(&self, rank: usize) -> Child {
        Command::new(env!("CARGO_BIN_EXE_fedmq"))
            .args(["client", "-c"])
            .arg(&self.cfg_path)
            .args(["--rank", &rank.to_string()])
            .env("FEDMQ_S3_SAK", SECRET)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning fedmq client")
    }

    /// The server in this process (evaluating on the MNIST test split).
    async fn server(
        &self,
        progress: impl FnMut(&Progress) + Send,
        out: Option<PathBuf>,
    ) -> ServerReport {
        let (split, _) = federation::load_data(&self.cfg, false).unwrap();
        let kind: ModelKind = self.cfg.model_args.model.parse().unwrap();
        let ev: Arc<dyn Evaluator> = Arc::new(ModelEvaluator::new(
            kind,
            split.test.clone(),
            candle_core::Device::Cpu,
        ));
        let initial = federation::initial_model(&self.cfg, split.train.as_ref()).unwrap();
        let mut opts = federation::server_options(&self.cfg, out);
        opts.keyring = self.signing.as_ref().map(|s| s.0.clone());
        opts.crypto = self.crypto(server::SERVER_ID);
        let mut mqtt = federation::session_options(&self.cfg, server::SERVER_ID, None);
        mqtt.signer = self
            .signing
            .as_ref()
            .map(|s| s.1[server::SERVER_ID].clone());
        server::run_server(
            opts,
            mqtt,
            self.s3(),
            Box::new(FedAvg::default()),
            initial,
            None,
            Some(ev),
            progress,
            CancellationToken::new(),
        )
        .await
        .expect("server")
    }

    async fn shutdown(mut self) {
        if let Some(s) = self.store.take() {
            s.shutdown().await;
        }
    }
}

/// Trains on MNIST, but from round `stall_from` on waits (connected, silent) until interrupted.
struct Stalling {
    inner: DataTrainer,
    stall_from: u64,
}

impl LocalTrainer for Stalling {
    fn num_samples(&self) -> u64 {
        self.inner.num_samples()
    }

    fn train(
        &self,
        global: ParamSet,
        config: &TrainConfig,
        hooks: &LocalHooks,
        interrupt: &AtomicBool,
    ) -> Result<Trained, TrainError> {
        // The per-round seed is `random_seed * 1_000_003 + round`; with random_seed 0 it is the
        // round.
        if config.seed >= self.stall_from {
            while !interrupt.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            return Err(TrainError::Interrupted);
        }
        self.inner.train(global, config, hooks, interrupt)
    }
}

fn data_trainer(cfg: &Config, rank: usize) -> DataTrainer {
    let (split, part) = federation::load_data(cfg, false).unwrap();
    let kind: ModelKind = cfg.model_args.model.parse().unwrap();
    DataTrainer::new(
        kind.into(),
        split.train.clone(),
        part.client(rank - 1).unwrap().to_vec(),
        candle_core::Device::Cpu,
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_and_silent_clients_fail_the_round_at_its_deadline_and_the_run_completes() {
    let mut cfg = config("dropouts", "lr", 4, 3, "homo");
    cfg.fedmq_args.round_timeout_s = 4.0;
    cfg.fedmq_args.quorum = 0.5;
    let fx = Fixture::new(cfg).await;
    let cfg = fx.cfg.clone();
    let cancel = CancellationToken::new();
    let c1 = fx.client(1, Arc::new(data_trainer(&cfg, 1)), &cancel);
    let c2 = fx.client(2, Arc::new(data_trainer(&cfg, 2)), &cancel);
    // Client 3 is a process, SIGKILLed when round 2 starts.
    let victim = Arc::new(Mutex::new(fx.client_process(3)));
    // Client 4 stays connected but never reports from round 2 on.
    let c4 = fx.client(
        4,
        Arc::new(Stalling {
            inner: data_trainer(&cfg, 4),
            stall_from: 2,
        }),
        &cancel,
    );

    let killer = victim.clone();
    let report = fx
        .server(
            move |p| {
                if let Progress::RoundStarted { round: 2, .. } = p {
                    let mut child = killer.lock().unwrap();
                    child.kill().expect("SIGKILL client-3");
                    let _ = child.wait();
                }
            },
            None,
        )
        .await;
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    let r = &report.records;
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].participants, 4, "{:?}", r[0]);
    assert_eq!(r[0].failures, 0);
    // Round 2: clients 1 and 2 reported (a quorum of 2 of 4); 3 was killed, 4 stayed silent,
    // so the round closed at its deadline.
    assert_eq!(r[1].participants, 2, "{:?}", r[1]);
    assert!(failed(&r[1], "client-3"), "{:?}", r[1]);
    assert!(failed(&r[1], "client-4"), "{:?}", r[1]);
    assert!(
        r[1].failed_clients.iter().any(|f| f == "client-4: timeout"),
        "{:?}",
        r[1].failed_clients
    );
    assert!(r[1].round_s >= 4.0, "closed at the deadline: {:?}", r[1]);
    // Round 3: client 3 is gone (offline, not selected); 4 is silent again.
    assert_eq!(r[2].participants, 2, "{:?}", r[2]);
    assert!(failed(&r[2], "client-4"));
    assert!(r[2].test_accuracy.unwrap() > 0.85, "{:?}", r[2]);

    for c in [c1, c2, c4] {
        let rep = tokio::time::timeout(WAIT, c)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(rep.reason, "completed");
    }
    fx.shutdown().await;
}

/// Passes the model through after a short pause (so that a round lasts long enough to replay
/// messages into it).
struct Slow(Duration);

impl LocalTrainer for Slow {
    fn num_samples(&self) -> u64 {
        100
    }

    fn train(
        &self,
        global: ParamSet,
        _config: &TrainConfig,
        _hooks: &LocalHooks,
        _interrupt: &AtomicBool,
    ) -> Result<Trained, TrainError> {
        std::thread::sleep(self.0);
        Ok(Trained {
            params: global,
            metrics: TrainMetrics::default(),
            steps: 1,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replayed_old_round_messages_are_ignored() {
    let mut cfg = config("replay", "lr", 2, 4, "homo");
    cfg.validation_args.frequency_of_the_test = 100;
    let fx = Fixture::new(cfg).await;
    let cfg = fx.cfg.clone();
    let run = cfg.common_args.run_id.clone();
    let topics = Topics::new(&run);
    let cancel = CancellationToken::new();

    // An eavesdropper records the first update of client-1 and the first command to client-2.
    let mut spy = SessionOptions::new("127.0.0.1", fx.broker_port, "replay-spy");
    spy.subscriptions = vec![topics.up_all(), topics.command("client-2")];
    spy.clean_session = true;
    let (spy, mut spy_rx) = MqttSession::connect(spy, cancel.clone()).unwrap();
    spy.wait_for(ConnState::Connected, WAIT).await.unwrap();
    let recorded = Arc::new(Mutex::new((None::<Envelope>, None::<Envelope>)));
    let rec = recorded.clone();
    let spy_topics = topics.clone();
    tokio::spawn(async move {
        while let Some(m) = spy_rx.recv().await {
            let Ok((kind, env)) = m.decode(&spy_topics) else {
                continue;
            };
            let mut r = rec.lock().unwrap();
            match (&kind, &env.body) {
                (TopicKind::Up(c), Body::Update(_)) if c == "client-1" && r.0.is_none() => {
                    r.0 = Some(env)
                }
                (TopicKind::Command(_), Body::Train(_)) if r.1.is_none() => r.1 = Some(env),
                _ => {}
            }
        }
    });

    let c1 = fx.client(1, Arc::new(Slow(Duration::from_millis(400))), &cancel);
    let c2 = fx.client(2, Arc::new(Slow(Duration::from_millis(400))), &cancel);

    // When round 3 starts, replay both recorded round-1 messages, unchanged (same id) and as
    // fresh copies (new id, same old round).
    let (replay_tx, mut replay_rx) = mpsc::unbounded_channel::<()>();
    let spy2 = spy.clone();
    let rec = recorded.clone();
    let replay_topics = topics.clone();
    let replayer = tokio::spawn(async move {
        replay_rx.recv().await.expect("round 3 started");
        let (update, train) = rec.lock().unwrap().clone();
        let update = update.expect("an update of client-1 was recorded");
        let train = train.expect("a train command to client-2 was recorded");
        assert_eq!((update.round, train.round), (1, 1));
        for env in [
            update.clone(),
            Envelope::new(&update.run, 1, "client-1", update.body.clone()),
        ] {
            spy2.publish(&replay_topics.up("client-1"), &env, false)
                .await
                .unwrap();
        }
        for env in [
            train.clone(),
            Envelope::new(&train.run, 1, "server", train.body.clone()),
        ] {
            spy2.publish(&replay_topics.command("client-2"), &env, false)
                .await
                .unwrap();
        }
    });
    let report = fx
        .server(
            move |p| {
                if let Progress::RoundStarted { round: 3, .. } = p {
                    let _ = replay_tx.send(());
                }
            },
            None,
        )
        .await;
    replayer.await.unwrap();
    assert_eq!(report.outcome, Outcome::Completed);
    assert_eq!(report.records.len(), 4);
    for r in &report.records {
        assert_eq!(
            (r.participants, r.failures),
            (2, 0),
            "stale updates neither count nor fail a round: {r:?}"
        );
    }
    let rep2 = tokio::time::timeout(WAIT, c2)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(rep2.rounds_reported, 4, "client-2 never retrained round 1");
    let rep1 = tokio::time::timeout(WAIT, c1)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(rep1.rounds_reported, 4);
    spy.shutdown().await;
    fx.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Everything as separate processes: Mosquitto, `fedmq store`, `fedmq server`, `fedmq client`s.

/// Kills (SIGKILL) the child on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn first_line(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    rx.recv_timeout(WAIT).expect("a line on stdout")
}

fn fedmq(args: &[&str], cfg: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedmq"));
    c.args(args)
        .arg("-c")
        .arg(cfg)
        .env("FEDMQ_S3_SAK", SECRET)
        .env(
            "RUST_LOG",
            std::env::var("FEDMQ_TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null());
    c
}

#[test]
fn distributed_federation_over_mosquitto_and_a_store_process() {
    let Some(bin) = mosquitto_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_packet_size 262144\nset_tcp_nodelay true\nlog_dest stderr\n"
        ),
    )
    .unwrap();
    let _mosquitto = Proc(
        Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning mosquitto"),
    );

    let mut cfg = config("distributed", "lr", 3, 2, "homo");
    let m = &mut cfg.comm_args.customized_training_mqtt_config;
    m.broker_host = "127.0.0.1".into();
    m.broker_port = port;
    let store_port = free_port();
    cfg.comm_args.customized_training_s3_config.cn_s3_endpoint =
        format!("http://127.0.0.1:{store_port}");
    cfg.comm_args.customized_training_s3_config.cn_s3_sak = String::new();
    cfg.tracking_args.log_file_dir = dir.path().join("out").display().to_string();
    // The secure recipe of the README: signed messages, sealed blobs, and each participant's own
    // store credential from `fedmq keys -c`; clients never see the store's secret.
    let keys = dir.path().join("keys");
    cfg.fedmq_args.signing_key = format!("{}/{{id}}.key", keys.display());
    cfg.fedmq_args.trusted_keys = keys.display().to_string();
    cfg.fedmq_args.store_credentials = format!("{}/{{id}}.s3", keys.display());
    let cfg_path = dir.path().join("fedml_config.yaml");
    std::fs::write(&cfg_path, serde_yaml_ng::to_string(&cfg).unwrap()).unwrap();
    let made = fedmq(
        &[
            "keys",
            "--out",
            &keys.display().to_string(),
            "--clients",
            "3",
        ],
        &cfg_path,
    )
    .stdout(Stdio::null())
    .status()
    .unwrap();
    assert!(made.success(), "fedmq keys: {made}");
    for id in ["server", "client-1", "client-3"] {
        let cred = std::fs::read_to_string(keys.join(format!("{id}.s3"))).unwrap();
        assert!(cred.contains(&format!("FEDMQ_S3_AKI={id}\n")), "{cred}");
        assert!(!cred.contains(SECRET));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(keys.join(format!("{id}.s3")))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{id}.s3 is readable by others: {mode:o}");
        }
        let policy = std::fs::read_to_string(keys.join(format!("{id}.s3-policy.json"))).unwrap();
        assert!(policy.contains("arn:aws:s3:::"), "{policy}");
    }

    let mut store = fedmq(
        &[
            "store",
            "--listen",
            &format!("127.0.0.1:{store_port}"),
            "--data-dir",
            &dir.path().join("store").display().to_string(),
        ],
        &cfg_path,
    );
    let mut store = Proc(
        store
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let endpoint = first_line(&mut store.0);
    assert_eq!(endpoint, format!("http://127.0.0.1:{store_port}"));

    // Clients first (they wait for the server), then the server.
    let mut clients: Vec<Proc> = (1..=3)
        .map(|rank| {
            Proc(
                fedmq(&["client", "--rank", &rank.to_string()], &cfg_path)
                    .env_remove("FEDMQ_S3_SAK")
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let mut server = Proc(
        fedmq(&["server"], &cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let status = wait_exit(&mut server.0, Duration::from_secs(300));
    assert!(status.success(), "fedmq server: {status}");
    for c in &mut clients {
        let s = wait_exit(&mut c.0, Duration::from_secs(30));
        assert!(s.success(), "fedmq client: {s}");
    }
    let out = dir.path().join("out").join("distributed");
    let records = read_jsonl(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(records.len(), 2);
    assert!(records
        .iter()
        .all(|r| r.participants == 3 && r.failures == 0));
    let acc = accuracies(&records);
    assert!(acc[1] > 0.85, "lr on MNIST after 2 rounds: {acc:?}");
    assert!(out.join("final_model.safetensors").is_file());
    assert!(out.join("plot.svg").is_file());
}

/// A client whose update is altered in the store after it was announced (one flipped byte): the
/// server's SHA-256 check rejects it, the client is recorded as a failure of that round, and the
/// round closes with the other clients' updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tampered_update_is_rejected_and_the_round_completes_without_it() {
    tampered_update_round(false, Tamper::FlipByte).await;
}

/// Presence lost before the server starts (as after a broker restart without retained messages):
/// the clients are connected and online, but nothing on the broker says so. The server asks who
/// is there while clients are missing, every client answers, and the run completes with all of
/// them in every round; without the request the server would wait out its admission timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_relearns_every_client_when_presence_messages_are_lost() {
    const CLIENTS: usize = 4;
    let mut cfg = config("lost-presence", "lr", CLIENTS, 2, "homo");
    cfg.validation_args.frequency_of_the_test = 100;
    cfg.fedmq_args.admission_timeout_s = 40.0;
    let fx = Fixture::new(cfg).await;
    let run = fx.cfg.common_args.run_id.clone();
    let topics = Topics::new(&run);
    // A watcher that sees the clients' presence, then erases it from the broker.
    let mut o = SessionOptions::new("127.0.0.1", fx.broker_port, format!("{run}-watcher"));
    o.clean_session = true;
    o.subscriptions = vec![topics.status_all()];
    let (watcher, mut statuses) = MqttSession::connect(o, CancellationToken::new()).unwrap();
    watcher.wait_for(ConnState::Connected, WAIT).await.unwrap();
    let cancel = CancellationToken::new();
    let clients: Vec<_> = (1..=CLIENTS)
        .map(|r| fx.client(r, Arc::new(Slow(Duration::from_millis(10))), &cancel))
        .collect();
    let mut online = std::collections::BTreeSet::new();
    while online.len() < CLIENTS {
        let m = tokio::time::timeout(WAIT, statuses.recv())
            .await
            .expect("every client announces itself")
            .unwrap();
        if let Ok((TopicKind::Status(id), _)) = m.decode(&topics) {
            online.insert(id);
        }
    }
    for r in 1..=CLIENTS {
        watcher
            .clear_retained(&topics.status(&client::client_id(r)))
            .await
            .unwrap();
    }
    watcher.shutdown().await;
    // The retained statuses are gone: a new subscriber gets nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let report = fx.server(|_| {}, None).await;
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    for r in &report.records {
        assert_eq!((r.participants, r.failures), (CLIENTS, 0), "{r:?}");
    }
    let took = started.elapsed();
    eprintln!(
        "presence re-learned; run completed {:.1} s after the server started",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    for c in clients {
        let rep = tokio::time::timeout(WAIT, c)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(rep.rounds_reported, 2);
    }
    fx.shutdown().await;
}

/// The same with signatures and sealed blobs: the server skips the SHA-256 pass for sealed
/// updates, and the AEAD tags catch the flipped byte instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tampered_sealed_update_is_rejected_and_the_round_completes_without_it() {
    tampered_update_round(true, Tamper::FlipByte).await;
}

/// What docs/PROTOCOL.md ("What is verified") says: a sealed update is authenticated by its AEAD
/// tags, not by its `sha256` field. The bytes are intact and the field is wrong: accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_update_is_authenticated_by_its_tags_not_its_digest() {
    tampered_update_round(true, Tamper::WrongDigest).await;
}

/// What client-3 of [`tampered_update_round`] does to its update.
#[derive(Clone, Copy, PartialEq)]
enum Tamper {
    /// Flips one byte of the stored blob after computing its reference.
    FlipByte,
    /// Stores the blob intact but announces a wrong SHA-256.
    WrongDigest,
}

/// Every participant's key, all trusted by one keyring.
fn signing(ids: &[&str]) -> Signing {
    let mut ring = Keyring::default();
    let mut keys = BTreeMap::new();
    for id in ids {
        let k = Identity::generate(id);
        ring.trust(&k);
        keys.insert(id.to_string(), Arc::new(k));
    }
    (Arc::new(ring), keys)
}

async fn tampered_update_round(sealed: bool, tamper: Tamper) {
    let mut cfg = config(
        match (sealed, tamper) {
            (false, _) => "tamper",
            (true, Tamper::FlipByte) => "tamper-sealed",
            (true, Tamper::WrongDigest) => "digest-sealed",
        },
        "lr",
        3,
        2,
        "homo",
    );
    cfg.validation_args.frequency_of_the_test = 100;
    let mut fx = Fixture::new(cfg).await;
    if sealed {
        fx.signing = Some(signing(&["server", "client-1", "client-2", "client-3"]));
    }
    let crypto3 = fx.crypto("client-3");
    let cfg = fx.cfg.clone();
    let run = cfg.common_args.run_id.clone();
    let topics = Topics::new(&run);
    let keys = BlobKeys::new(KEY_PREFIX, &run);
    let cancel = CancellationToken::new();
    let c1 = fx.client(1, Arc::new(Slow(Duration::from_millis(50))), &cancel);
    let c2 = fx.client(2, Arc::new(Slow(Duration::from_millis(50))), &cancel);

    // client-3 speaks the protocol by hand: it uploads the global model back as its update,
    // announces it with the right digest, but first flips one byte of the stored blob.
    let mut o = federation::session_options(&cfg, "client-3", None);
    o.signer = fx.signing.as_ref().map(|s| s.1["client-3"].clone());
    o.subscriptions = vec![topics.command("client-3")];
    o.presence = Some(fedmq::transport::PresenceMessages::status(
        &run,
        "client-3",
        fedmq::proto::Role::Client,
        Some(federation::capabilities("cpu", 100)),
    ));
    let (h3, mut rx3) = MqttSession::connect(o, cancel.child_token()).unwrap();
    h3.wait_for(ConnState::Connected, WAIT).await.unwrap();
    let store = fx.s3();
    let (up3, kt) = (topics.up("client-3"), topics.clone());
    let evil = tokio::spawn(async move {
        while let Some(m) = rx3.recv().await {
            let Ok((_, env)) = m.decode(&kt) else {
                continue;
            };
            let Body::Train(t) = env.body else { break };
            let mut bytes = store.get(&t.global).await.unwrap();
            let key = keys.update(env.round, "client-3");
            let mut ck = None;
            if let Some(c) = &crypto3 {
                let plain = c.open(&t.global, bytes).unwrap();
                let (s, k) = c.seal(&key, &plain);
                bytes = s.into();
                ck = Some(k);
            }
            let mut blob = store.put(&key, bytes.clone()).await.unwrap();
            if let (Some(c), Some(k)) = (&crypto3, &ck) {
                blob = c.wrapped_ref(&blob, k, "server").unwrap();
            }
            match tamper {
                Tamper::FlipByte => {
                    let mut flipped = bytes.to_vec();
                    let i = flipped.len() / 2;
                    flipped[i] ^= 0x01;
                    store.put(&key, flipped.into()).await.unwrap();
                }
                Tamper::WrongDigest => blob.sha256 = "00".repeat(32),
            }
            let update = Envelope::new(
                &env.run,
                env.round,
                "client-3",
                Body::Update(fedmq::proto::Update {
                    update: blob,
                    num_samples: 100,
                    metrics: TrainMetrics::default(),
                    report: Default::default(),
                }),
            );
            h3.publish(&up3, &update, false).await.unwrap();
        }
        h3.shutdown().await;
    });

    let report = fx.server(|_| {}, None).await;
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    assert_eq!(report.records.len(), 2);
    for r in &report.records {
        if tamper == Tamper::WrongDigest {
            assert_eq!((r.participants, r.failures), (3, 0), "{r:?}");
            continue;
        }
        assert_eq!(r.participants, 2, "{r:?}");
        assert_eq!(r.failures, 1, "{r:?}");
        let f = &r.failed_clients[0];
        let check = if sealed {
            "does not authenticate"
        } else {
            "SHA-256"
        };
        assert!(
            f.starts_with("client-3: bad update:") && f.contains(check),
            "the failure names the check ({check}): {f}"
        );
    }
    for c in [c1, c2] {
        let rep = tokio::time::timeout(WAIT, c)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(rep.rounds_reported, 2);
    }
    let _ = tokio::time::timeout(WAIT, evil).await;
    fx.shutdown().await;
}

/// Signed control messages: the federation runs with every participant signing and checking;
/// an update forged under client-2's name (signed with another key) and an unsigned one under
/// client-1's name, both pointing to a valid blob of zeros, are dropped: had either been
/// aggregated, the final model would differ from the initial one (the clients return the
/// global model unchanged).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_and_unsigned_messages_are_dropped_when_signatures_are_on() {
    let mut cfg = config("signed", "lr", 2, 2, "homo");
    cfg.validation_args.frequency_of_the_test = 100;
    let mut fx = Fixture::new(cfg).await;
    fx.signing = Some(signing(&["server", "client-1", "client-2"]));
    let cfg = fx.cfg.clone();
    let run = cfg.common_args.run_id.clone();
    let topics = Topics::new(&run);
    let cancel = CancellationToken::new();
    let c1 = fx.client(1, Arc::new(Slow(Duration::from_millis(300))), &cancel);
    let c2 = fx.client(2, Arc::new(Slow(Duration::from_millis(300))), &cancel);

    // The forger: its own MQTT connection and key, and the store's credentials.
    let mut o = SessionOptions::new("127.0.0.1", fx.broker_port, "forger");
    o.clean_session = true;
    o.signer = Some(Arc::new(Identity::generate("client-2")));
    let (forger, _rx) = MqttSession::connect(o, cancel.child_token()).unwrap();
    forger.wait_for(ConnState::Connected, WAIT).await.unwrap();
    let mut o = SessionOptions::new("127.0.0.1", fx.broker_port, "forger-unsigned");
    o.clean_session = true;
    let (unsigned, _rx2) = MqttSession::connect(o, cancel.child_token()).unwrap();
    unsigned.wait_for(ConnState::Connected, WAIT).await.unwrap();
    let store = fx.s3();
    let (split, _) = federation::load_data(&cfg, false).unwrap();
    let initial = federation::initial_model(&cfg, split.train.as_ref()).unwrap();
    let zeros = initial.zeros_like().to_safetensors_bytes();
    store.ensure_bucket().await.unwrap();
    let blob = store
        .put("fedmq/signed/forged-zeros", zeros.into())
        .await
        .unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
    let (t2, run2) = (topics.clone(), run.clone());
    let attack = tokio::spawn(async move {
        while let Some(round) = rx.recv().await {
            let forged = |from: &str| {
                Envelope::new(
                    &run2,
                    round,
                    from,
                    Body::Update(fedmq::proto::Update {
                        update: blob.clone(),
                        num_samples: 1_000_000,
                        metrics: TrainMetrics::default(),
                        report: Default::default(),
                    }),
                )
            };
            forger
                .publish(&t2.up("client-2"), &forged("client-2"), false)
                .await
                .unwrap();
            unsigned
                .publish(&t2.up("client-1"), &forged("client-1"), false)
                .await
                .unwrap();
        }
    });
    let report = fx
        .server(
            move |p| {
                if let Progress::RoundStarted { round, .. } = p {
                    let _ = tx.send(*round);
                }
            },
            None,
        )
        .await;
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    for r in &report.records {
        assert_eq!((r.participants, r.failures), (2, 0), "{r:?}");
    }
    assert_eq!(
        report.final_params, initial,
        "no forged or unsigned update was aggregated"
    );
    for c in [c1, c2] {
        let rep = tokio::time::timeout(WAIT, c)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((rep.rounds_reported, rep.reason.as_str()), (2, "completed"));
    }
    attack.abort();
    fx.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Everything on: mutual TLS, broker ACL, HTTPS store, signed messages, sealed blobs.

/// Runs a federation from per-participant configs, each participant in this process but built
/// only from its config (as `fedmq server` / `fedmq client` build themselves).
async fn run_from_configs(server_cfg: &Config, client_cfgs: &[Config]) -> ServerReport {
    let cancel = CancellationToken::new();
    let clients: Vec<_> = client_cfgs
        .iter()
        .cloned()
        .map(|c| {
            let cancel = cancel.child_token();
            tokio::spawn(async move { federation::run_client_from_config(&c, cancel).await })
        })
        .collect();
    let report =
        federation::run_server_from_config(server_cfg, None, false, |_| {}, cancel.clone())
            .await
            .expect("server");
    for c in clients {
        let rep = tokio::time::timeout(WAIT, c)
            .await
            .expect("client exits after the finish")
            .unwrap()
            .expect("client ran");
        assert_eq!(rep.reason, "completed");
        assert_eq!(rep.rounds_reported, report.records.len() as u64);
    }
    report
}

/// Each client's config: the same federation, its own rank.
fn client_configs(cfg: &Config, n: usize) -> Vec<Config> {
    (1..=n)
        .map(|rank| {
            let mut c = cfg.clone();
            c.fedmq_args.rank = rank;
            c
        })
        .collect()
}

/// The same federation twice: over plain TCP and HTTP, then hardened. Hardened: MQTT over mutual
/// TLS through Mosquitto (the certificate's name is the MQTT user, the shipped ACL applies), S3
/// over HTTPS trusting only the test CA, every message signed and checked against the trusted
/// keys, every blob sealed; each participant set up only by the keys of its config. Both runs
/// complete every round with every client and reach the same accuracy; the hardened store holds
/// only ciphertext, and its sealed checkpoint opens with the server's key alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_federation_over_mutual_tls_with_signatures_and_sealed_blobs_learns_like_a_plain_one() {
    let Some(bin) = mosquitto_bin() else {
        return;
    };
    const N: usize = 3;
    let mut base = config("hardened", "lr", N, 3, "homo");
    base.fedmq_args.round_timeout_s = 120.0;

    // Plain.
    let fx = Fixture::new(base.clone()).await;
    let plain = run_from_configs(&fx.cfg, &client_configs(&fx.cfg, N)).await;
    fx.shutdown().await;

    // Hardened: certificates, signing keys, trusted-key directories.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ids: Vec<String> = std::iter::once("server".to_string())
        .chain((1..=N).map(client::client_id))
        .collect();
    let mut plan = fedmq::crypto::tls::CertsPlan::new(d.join("certs"), ids.clone());
    plan.hosts = vec!["127.0.0.1".into()];
    fedmq::crypto::tls::generate_certs(&plan).unwrap();
    let (trust_server, trust_clients) = (d.join("trust-server"), d.join("trust-clients"));
    for id in &ids {
        let (_, public) = Identity::generate(id).save(&d.join("keys")).unwrap();
        let trust = if id == "server" {
            &trust_clients
        } else {
            &trust_server
        };
        std::fs::create_dir_all(trust).unwrap();
        std::fs::copy(&public, trust.join(format!("{id}.pub"))).unwrap();
    }
    let certs = d.join("certs");
    let port = free_port();
    let _broker = Proc(
        common::secure_mosquitto_command(&bin, port, &certs, &d.join("mosquitto.conf"))
            .spawn()
            .expect("spawning mosquitto"),
    );
    let store = EmbeddedStore::start_with_tls(
        StoreOptions::new(d.join("store"), "fedmq", SECRET),
        Some(fedmq::store::StoreTls {
            cert: certs.join("store.pem"),
            key: certs.join("store.key"),
        }),
    )
    .await
    .expect("HTTPS store");
    let hardened = |id: &str, rank: usize| {
        let mut c = base.clone();
        let m = &mut c.comm_args.customized_training_mqtt_config;
        m.broker_host = "127.0.0.1".into();
        m.broker_port = port;
        m.mqtt_tls = true;
        m.mqtt_ca_path = certs.join("ca.pem").display().to_string();
        m.mqtt_cert_path = certs.join(format!("{id}.pem")).display().to_string();
        m.mqtt_key_path = certs.join(format!("{id}.key")).display().to_string();
        let s3 = &mut c.comm_args.customized_training_s3_config;
        s3.cn_s3_endpoint = store.endpoint();
        s3.cn_s3_ca_path = certs.join("ca.pem").display().to_string();
        let f = &mut c.fedmq_args;
        f.rank = rank;
        f.signing_key = d.join(format!("keys/{id}.key")).display().to_string();
        f.trusted_keys = if rank == 0 {
            &trust_server
        } else {
            &trust_clients
        }
        .display()
        .to_string();
        f.encrypt_blobs = Some(true);
        c
    };
    assert!(store.endpoint().starts_with("https://"));
    let clients: Vec<Config> = (1..=N)
        .map(|r| hardened(&client::client_id(r), r))
        .collect();
    let server_cfg = hardened("server", 0);
    let secure = run_from_configs(&server_cfg, &clients).await;

    for (name, rep) in [("plain", &plain), ("hardened", &secure)] {
        assert_eq!(rep.outcome, Outcome::Completed, "{name}: {rep:?}");
        assert_eq!(rep.records.len(), 3, "{name}");
        for r in &rep.records {
            assert_eq!((r.participants, r.failures), (N, 0), "{name}: {r:?}");
        }
    }
    let (a, b) = (
        *accuracies(&plain.records).last().unwrap(),
        *accuracies(&secure.records).last().unwrap(),
    );
    assert!(a > 0.85, "lr on MNIST after 3 rounds: {a}");
    assert!(
        (a - b).abs() <= 0.005,
        "hardened accuracy {b:.4} vs plain {a:.4}"
    );

    // The store, with raw credentials: ciphertext only.
    let blobs = BlobStore::connect(&S3Options::from(
        &server_cfg.comm_args.customized_training_s3_config,
    ))
    .unwrap();
    let keys = BlobKeys::new(KEY_PREFIX, "hardened");
    let objects = blobs.list(&keys.run_prefix()).await.unwrap();
    assert!(objects.len() >= 8, "{objects:?}");
    for o in &objects {
        assert_only_ciphertext(&o.key, &blobs.get_unverified(&o.key).await.unwrap());
    }
    // The server's key (and only it) reopens the last checkpoint and its model.
    let sec = federation::Security::from_config(&server_cfg, server::SERVER_ID).unwrap();
    let sealed = SealedStore::new(blobs.clone(), Some(sec.crypto.expect("sealing on")));
    let cp = server::latest_checkpoint(&sealed, &keys)
        .await
        .unwrap()
        .expect("a checkpoint");
    assert_eq!(cp.round, 3);
    let model = server::load_checkpoint_model(&sealed, &cp).await.unwrap();
    assert_eq!(model, secure.final_params);
    let client_sec = federation::Security::from_config(&clients[0], "client-1").unwrap();
    assert!(
        server::latest_checkpoint(&SealedStore::new(blobs.clone(), client_sec.crypto), &keys)
            .await
            .is_err(),
        "a client's key does not open the server's checkpoint"
    );
    store.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The secure embedded broker under abuse from the participants' own address.

/// Peak resident set (VmHWM) of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `fedmq broker` with mutual TLS and the shipped ACL (the configuration recommended for a
/// distributed run) in its own process. While 1,000 idle TCP sockets are held open against it
/// and a flood of malformed connections (600 per second for 20 s) comes from 127.0.0.1, the
/// address every participant also uses, a 10-client federation connects and completes every
/// round with every client, and the broker's memory stays bounded. Before the gateway shed
/// idle connections (it refused new ones beyond 128 pending, and rate-limited every connection
/// of an address), no participant could connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_completes_through_the_secure_broker_while_its_address_floods_it() {
    use tokio::io::AsyncWriteExt as _;
    const N: usize = 10;
    const IDLE: usize = 1000;
    const FLOOD_PER_S: u64 = 600;
    const FLOOD: Duration = Duration::from_secs(20);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ids: Vec<String> = ["server", "probe"]
        .into_iter()
        .map(str::to_string)
        .chain((1..=N).map(client::client_id))
        .collect();
    let mut plan = fedmq::crypto::tls::CertsPlan::new(d.join("certs"), ids);
    plan.hosts = vec!["127.0.0.1".into()];
    fedmq::crypto::tls::generate_certs(&plan).unwrap();
    let certs = d.join("certs");
    let port = free_port();
    // FEDMQ_TEST_FLOOD_BROKER=mosquitto: the same scenario against Mosquitto with the same
    // certificates and ACL (the side-by-side figures in docs/SECURITY.md).
    // FEDMQ_TEST_BROKER_BIN: another fedmq binary as the broker (to check an older build).
    let broker = match std::env::var("FEDMQ_TEST_FLOOD_BROKER").as_deref() {
        Ok("mosquitto") => {
            let bin = mosquitto_bin().expect("FEDMQ_TEST_FLOOD_BROKER=mosquitto needs mosquitto");
            let conf = d.join("mosquitto.conf");
            let p = Proc(
                common::secure_mosquitto_command(&bin, port, &certs, &conf)
                    .spawn()
                    .unwrap(),
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "mosquitto did not listen");
                std::thread::sleep(Duration::from_millis(50));
            }
            p
        }
        _ => {
            let bin = std::env::var_os("FEDMQ_TEST_BROKER_BIN")
                .unwrap_or_else(|| env!("CARGO_BIN_EXE_fedmq").into());
            let mut b = Proc(
                common::secure_broker_command(&bin, port, &certs)
                    .spawn()
                    .unwrap(),
            );
            first_line(&mut b.0);
            b
        }
    };
    let pid = broker.0.id();
    let idle_rss = peak_rss_mib(pid);

    // The abuse: idle sockets held to the end, and a flood of garbage connections.
    let addr = format!("127.0.0.1:{port}");
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let flooding = CancellationToken::new();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flood = {
        let (addr, stop, sent) = (addr.clone(), flooding.clone(), sent.clone());
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut n = 0u64;
            while start.elapsed() < FLOOD {
                tick.tick().await;
                // Catch up to the target rate.
                let due = start.elapsed().as_millis() as u64 * FLOOD_PER_S / 1000;
                while n < due {
                    n += 1;
                    let addr = addr.clone();
                    let sent = sent.clone();
                    tokio::spawn(async move {
                        if let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await {
                            // Not a TLS ClientHello: MQTT CONNECT bytes and junk.
                            let _ = s.write_all(b"\x10\xff\xff\xff\x7fgarbage").await;
                            sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    });
                }
            }
            stop.cancel();
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A legitimate participant connecting again and again during the flood: how long its
    // TLS handshake and CONNECT take.
    let probe = {
        let stop = flooding.clone();
        let mut o = SessionOptions::new("127.0.0.1", port, "probe");
        o.tls = Some(fedmq::transport::MqttTls {
            ca: certs.join("ca.pem"),
            identity: Some(fedmq::crypto::tls::Identity {
                cert: certs.join("probe.pem"),
                key: certs.join("probe.key"),
            }),
        });
        o.clean_session = true;
        tokio::spawn(async move {
            let mut took = Vec::new();
            while !stop.is_cancelled() {
                let cancel = CancellationToken::new();
                let t = Instant::now();
                let (session, _rx) = MqttSession::connect(o.clone(), cancel.clone()).unwrap();
                let ok = session
                    .wait_for(ConnState::Connected, Duration::from_secs(30))
                    .await;
                took.push(ok.is_ok().then(|| t.elapsed().as_secs_f64() * 1e3));
                cancel.cancel();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            took
        })
    };

    let store = EmbeddedStore::start(StoreOptions::new(d.join("store"), "fedmq", SECRET))
        .await
        .unwrap();
    let mut base = config("abused", "lr", N, 3, "homo");
    base.fedmq_args.round_timeout_s = 60.0;
    let cfg = |id: &str, rank: usize| {
        let mut c = base.clone();
        let m = &mut c.comm_args.customized_training_mqtt_config;
        m.broker_host = "127.0.0.1".into();
        m.broker_port = port;
        m.mqtt_tls = true;
        m.mqtt_ca_path = certs.join("ca.pem").display().to_string();
        m.mqtt_cert_path = certs.join(format!("{id}.pem")).display().to_string();
        m.mqtt_key_path = certs.join(format!("{id}.key")).display().to_string();
        c.comm_args.customized_training_s3_config.cn_s3_endpoint = store.endpoint();
        c.fedmq_args.rank = rank;
        c
    };
    let clients: Vec<Config> = (1..=N).map(|r| cfg(&client::client_id(r), r)).collect();
    let started = Instant::now();
    let report = run_from_configs(&cfg("server", 0), &clients).await;
    let took = started.elapsed();
    let during_flood = !flooding.is_cancelled();
    flood.await.unwrap();
    let rss = peak_rss_mib(pid);
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    let probes = probe.await.unwrap();
    let mut ms: Vec<f64> = probes.iter().flatten().copied().collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
            .map_or("-".to_string(), |v| format!("{v:.1}"))
    };
    eprintln!(
        "legitimate connects during the flood: {} of {} within 30 s; median {} ms, p90 {} ms, \
         max {} ms",
        ms.len(),
        probes.len(),
        at(0.5),
        at(0.9),
        at(1.0)
    );
    eprintln!(
        "federation took {took:?} ({}); {IDLE} idle sockets held; {sent} garbage connections \
         in {FLOOD:?}; broker peak RSS {rss:.1} MiB ({idle_rss:.1} MiB at start)",
        if during_flood {
            "all during the flood"
        } else {
            "partly after the flood"
        },
    );
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    assert_eq!(report.records.len(), 3);
    for r in &report.records {
        assert_eq!((r.participants, r.failures), (N, 0), "{r:?}");
    }
    assert!(during_flood, "the federation ran while the flood went on");
    assert!(
        sent >= FLOOD_PER_S * FLOOD.as_secs() * 9 / 10,
        "flood of at least {} connections/s: {sent} in {FLOOD:?}",
        FLOOD_PER_S * 9 / 10
    );
    assert!(rss < 256.0, "broker memory bounded: peak {rss:.1} MiB");
    assert_eq!(
        ms.len(),
        probes.len(),
        "every legitimate connect succeeded: {probes:?}"
    );
    drop(idle);
    store.shutdown().await;
}

/// A stateful strategy's checkpoint over the real store: FedAdam's moments are stored as a blob
/// beside the checkpoint document (not inside its JSON), read back verified, and restore a fresh
/// FedAdam; the per-round strategy metrics reach the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fedadam_moments_are_checkpointed_beside_the_checkpoint_and_restore() {
    let mut cfg = config("adam-cp", "lr", 3, 2, "homo");
    cfg.train_args.federated_optimizer = "FedAdam".into();
    cfg.validation_args.frequency_of_the_test = 100;
    let fx = Fixture::new(cfg).await;
    let report = run_from_configs(&fx.cfg, &client_configs(&fx.cfg, 3)).await;
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    for r in &report.records {
        assert!(r.strategy["server_step_norm"] > 0.0, "{r:?}");
        assert!(r.strategy["update_distance"] > 0.0, "{r:?}");
    }
    let store = fx.s3();
    let keys = BlobKeys::new(KEY_PREFIX, &fx.cfg.common_args.run_id);
    let cp = server::latest_checkpoint(&SealedStore::new(store.clone(), None), &keys)
        .await
        .unwrap()
        .expect("a checkpoint");
    assert_eq!((cp.round, cp.strategy.as_str()), (2, "FedAdam"));
    assert!(
        cp.state.to_string().len() < 200,
        "no tensors inside the JSON: {}",
        cp.state
    );
    let blob = cp
        .state_blob
        .clone()
        .expect("moments stored beside the checkpoint");
    assert_eq!(blob.key, keys.checkpoint_state(2));
    let tensors = ParamSet::from_safetensors_bytes(&store.get(&blob).await.unwrap()).unwrap();
    assert!(tensors
        .tensors()
        .iter()
        .any(|t| t.name().starts_with("m.") && t.data().iter().any(|x| *x != 0.0)));
    let mut restored =
        fedmq::strategy::from_config(&fx.cfg.train_args, &fx.cfg.fedmq_args).unwrap();
    restored.restore(&cp.state, Some(tensors)).unwrap();
    let mut other = fx.cfg.train_args.clone();
    other.federated_optimizer = "FedYogi".into();
    let mut yogi = fedmq::strategy::from_config(&other, &fx.cfg.fedmq_args).unwrap();
    assert!(yogi.restore(&cp.state, None).is_err());
}
