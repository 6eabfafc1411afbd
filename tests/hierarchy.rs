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
