//! Hierarchical FL in one process on real components (the embedded broker and store): edges
//! between devices training on MNIST and the cloud server.

use fedmq::config::Config;
use fedmq::federation::{self, LocalOptions};
use fedmq::server::Outcome;
use fedmq::tensor::ParamSet;
use tokio_util::sync::CancellationToken;

fn config(run: &str, optimizer: &str) -> Config {
    let mut c = Config::default();
    c.common_args.run_id = run.into();
    c.model_args.model = "lr".into();
    c.data_args.dataset = "mnist".into();
    c.data_args.partition_method = "hetero".into();
    c.data_args.partition_alpha = 0.5;
    c.train_args.federated_optimizer = optimizer.into();
    c.train_args.client_num_in_total = 12;
    c.train_args.client_num_per_round = 12;
    c.train_args.group_num = 3;
    c.train_args.comm_round = 2;
    c.train_args.epochs = 1;
    c.train_args.batch_size = 64;
    c.train_args.client_optimizer = "adam".into();
    c.train_args.learning_rate = 0.001;
    c.fedmq_args.round_timeout_s = 120.0;
    c.validate().expect("valid test config");
    c
}

async fn run(cfg: Config, out: std::path::PathBuf) -> federation::LocalReport {
    federation::run_local(
        &cfg,
        &LocalOptions::new(out),
        |_| {},
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

/// The two runs' final models agree within `tol` in every value.
fn assert_same_model(a: &std::path::Path, b: &std::path::Path, tol: f32) {
    let (a, b) = (final_model(a), final_model(b));
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert_eq!(x.name(), y.name());
        let worst = x
            .data()
            .iter()
            .zip(y.data())
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < tol, "{}: differs by {worst}", x.name());
    }
}

fn final_model(dir: &std::path::Path) -> ParamSet {
    ParamSet::from_safetensors_bytes(&std::fs::read(dir.join("final_model.safetensors")).unwrap())
        .unwrap()
}

/// With one site round per cloud round, FedAvg of the edges' sample-weighted site means is
/// FedAvg over all devices: the hierarchy's model must be the flat federation's, up to float
/// rounding. Both train the same devices on the same data with the same seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hierarchy_with_one_site_round_equals_the_flat_federation() {
    let dir = tempfile::tempdir().unwrap();
    let flat = run(config("flat", "FedAvg"), dir.path().join("flat")).await;
    let hier = run(config("hier", "HierarchicalFL"), dir.path().join("hier")).await;
    assert_eq!(flat.server.outcome, Outcome::Completed);
    assert_eq!(
        hier.server.outcome,
        Outcome::Completed,
        "{:?}",
        hier.clients
    );
    // The cloud saw three clients per round (the edges), standing for all twelve devices.
    for (f, h) in flat.server.records.iter().zip(&hier.server.records) {
        assert_eq!(h.participants, 3);
        assert_eq!(f.participants, 12);
        assert_eq!(
            h.num_samples, f.num_samples,
            "the edges claim their sites' samples"
        );
        let (fa, ha) = (f.test_accuracy.unwrap(), h.test_accuracy.unwrap());
        assert!(
            (fa - ha).abs() < 2e-3,
            "round {}: flat {fa}, hierarchy {ha}",
            f.round
        );
    }
    assert_same_model(&dir.path().join("flat"), &dir.path().join("hier"), 1e-4);
    // Each edge ran its own site: its metrics name its devices' rounds.
    for k in 1..=3 {
        let csv = std::fs::read_to_string(
            dir.path()
                .join(format!("hier/edges/hier-edge-{k}/metrics.csv")),
        )
        .unwrap();
        assert_eq!(csv.lines().count(), 3, "header and two site rounds: {csv}");
    }
    // Every participant's run ended with the cloud's finish (edges and devices alike).
    assert_eq!(hier.clients.len(), 15);
    for c in &hier.clients {
        let r = c.as_ref().expect("every participant finished");
        assert!(r.reason.contains("completed"), "{r:?}");
    }
}

/// Secure aggregation in a hierarchy: each site's rounds and the cloud's are securely
/// aggregated (`enable_sa`), and the model is the plain hierarchy's up to quantization.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_securely_aggregated_hierarchy_gives_the_plain_hierarchys_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut secure = config("hsa", "HierarchicalFL");
    secure.secure_aggregation_args.enable_sa = true;
    secure.validate().unwrap();
    let plain = run(config("hplain", "HierarchicalFL"), dir.path().join("plain")).await;
    let masked = run(secure, dir.path().join("secure")).await;
    assert_eq!(plain.server.outcome, Outcome::Completed);
    assert_eq!(
        masked.server.outcome,
        Outcome::Completed,
        "{:?}",
        masked.clients
    );
    // The cloud's rounds and every site's were masked.
    assert!(masked.server.records[0]
        .strategy
        .contains_key("secagg_survivors"));
    for k in 1..=3 {
        let site = fedmq::metrics::read_jsonl(
            &dir.path()
                .join(format!("secure/edges/hsa-edge-{k}/metrics.jsonl")),
        )
        .unwrap();
        assert_eq!(site.len(), 2);
        assert!(
            site.iter()
                .all(|r| r.strategy.contains_key("secagg_survivors")),
            "{site:?}"
        );
    }
    assert_same_model(&dir.path().join("plain"), &dir.path().join("secure"), 1e-4);
}

/// An edge keeps reconnecting while its broker is away, and gives up once it has been away for
/// longer than its uplink timeout (`fedmq_args.edge_uplink_timeout_s`): here the broker is a
/// `fedmq broker` process killed with SIGKILL and never restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_link_timeout_gives_up_when_its_broker_stays_away() {
    use fedmq::client::{self, ClientOptions, NoopTrainer};
    use fedmq::proto::BlobKeys;
    use fedmq::store::{BlobStore, EmbeddedStore, S3Options, StoreOptions};
    use std::io::BufRead;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let mut broker = std::process::Command::new(env!("CARGO_BIN_EXE_fedmq"))
        .args(["broker", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(broker.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: std::net::SocketAddr = line
        .strip_prefix("fedmq broker listening on ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("broker said {line:?}"));
    let store = EmbeddedStore::start(StoreOptions::new(dir.path().join("store"), "fedmq", "s"))
        .await
        .unwrap();
    let s3 = S3Options {
        endpoint: store.endpoint(),
        access_key: "fedmq".into(),
        secret_key: "s".into(),
        bucket: "fedmq".into(),
        ..S3Options::default()
    };
    let id = "lt-edge-1";
    let opts = ClientOptions {
        run: "lt".into(),
        id: id.into(),
        keys: BlobKeys::new(federation::KEY_PREFIX, "lt"),
        capabilities: federation::capabilities("cpu", 10),
        train_slots: None,
        connect_timeout: Duration::from_secs(10),
        keyring: None,
        crypto: None,
        link_timeout: Some(Duration::from_secs(2)),
    };
    let mqtt = fedmq::transport::SessionOptions::new("127.0.0.1", addr.port(), id);
    let trainer = NoopTrainer {
        num_samples: 10,
        delta: 0.0,
        steps: 1,
        delay: Duration::ZERO,
        fail: false,
    };
    let run = tokio::spawn(client::run_client(
        opts,
        mqtt,
        BlobStore::connect(&s3).unwrap(),
        std::sync::Arc::new(trainer),
        CancellationToken::new(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!run.is_finished(), "connected and waiting for the server");
    broker.kill().unwrap();
    broker.wait().unwrap();
    let killed = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("gave up within 30 s")
        .unwrap()
        .unwrap();
    let waited = killed.elapsed();
    assert!(
        report.reason.starts_with("aborted") && report.reason.contains("unreachable for 2 s"),
        "{}",
        report.reason
    );
    // Not at once: it reconnected for the link timeout first (keep-alive detection included).
    assert!(waited >= Duration::from_secs(2), "gave up after {waited:?}");
    store.shutdown().await;
}
