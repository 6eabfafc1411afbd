//! Attacks, defenses and differential privacy in whole federations on real components: the
//! embedded rumqttd and S3 store on 127.0.0.1, the server, and clients training on MNIST
//! (fetched on first use). The attacking clients are ordinary clients with `attack_args` set:
//! their updates cross the broker and the store like every other.

use fedmq::config::Config;
use fedmq::federation::{self, LocalOptions, LocalReport};
use fedmq::server::Outcome;
use tokio_util::sync::CancellationToken;

/// A small federation on MNIST: the lr model, `clients` clients, `rounds` rounds, `extra` YAML
/// (attack, defense, privacy sections) appended.
fn config(run: &str, clients: usize, rounds: usize, extra: &str) -> Config {
    let text = format!(
        "common_args:\n  run_id: {run}\ndata_args:\n  dataset: mnist\n  partition_method: homo\n\
         model_args:\n  model: lr\ntrain_args:\n  client_num_in_total: {clients}\n  \
         client_num_per_round: {clients}\n  comm_round: {rounds}\n  epochs: 1\n  batch_size: 32\n  \
         client_optimizer: adam\n  learning_rate: 0.001\ncomm_args:\n  \
         customized_training_s3_config:\n    CN_S3_AKI: fedmq\n    CN_S3_SAK: robustness-secret\n{extra}"
    );
    let c = Config::from_yaml_str(&text, std::path::Path::new("robustness.yaml"))
        .expect("test config parses");
    c.validate().expect("valid test config");
    c
}

/// Runs `cfg` locally; the report, and the output directory (removed when dropped).
async fn run(cfg: &Config) -> (LocalReport, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let opts = LocalOptions::new(dir.path().to_path_buf());
    let report = federation::run_local(cfg, &opts, |_| {}, CancellationToken::new())
        .await
        .expect("local federation");
    (report, dir)
}

fn final_accuracy(r: &LocalReport) -> f64 {
    r.server
        .records
        .iter()
        .rev()
        .find_map(|r| r.test_accuracy)
        .expect("an evaluated round")
}

/// One attacker of five sends random weights and claims ten times its samples: FedAvg is
/// wrecked, Krum (f = 1) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_byzantine_client_wrecks_fedavg_but_not_krum() {
    let attack = "attack_args:\n  enable_attack: true\n  attack_type: byzantine\n  \
                  attack_mode: random\n  byzantine_client_num: 1\n  sample_boost: 10\n";
    let (plain, _d1) = run(&config("rb-plain", 5, 3, attack)).await;
    assert_eq!(plain.server.outcome, Outcome::Completed);
    let (krum, _d2) = run(&config(
        "rb-krum",
        5,
        3,
        &format!("{attack}defense_args:\n  enable_defense: true\n  defense_type: krum\n  byzantine_client_num: 1\n"),
    ))
    .await;
    let (a, b) = (final_accuracy(&plain), final_accuracy(&krum));
    assert!(a < 0.5, "undefended accuracy {a}");
    assert!(b > 0.8, "Krum's accuracy {b}");
    let last = krum.server.records.last().unwrap();
    assert_eq!(last.strategy.get("defense_selected"), Some(&1.0));
}

/// A model-replacement backdoor: the server measures its success on triggered test images
/// every evaluated round; norm clipping cuts it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backdoor_is_measured_and_clipping_cuts_it_down() {
    let attack = "attack_args:\n  enable_attack: true\n  attack_type: model_replacement\n  \
                  byzantine_client_num: 1\n  backdoor_target: 0\n";
    let (plain, _d1) = run(&config("rb-bd", 4, 3, attack)).await;
    let success = |r: &LocalReport| {
        r.server
            .records
            .last()
            .and_then(|r| r.strategy.get("backdoor_success").copied())
            .expect("backdoor_success recorded")
    };
    let undefended = success(&plain);
    assert!(undefended > 0.5, "backdoor success {undefended}");
    let (clipped, _d2) = run(&config(
        "rb-bd-clip",
        4,
        3,
        &format!("{attack}defense_args:\n  enable_defense: true\n  defense_type: norm_diff_clipping\n  norm_bound: 0.5\n"),
    ))
    .await;
    let defended = success(&clipped);
    assert!(
        defended < undefended / 2.0,
        "clipped {defended}, undefended {undefended}"
    );
}

/// DP-FedAvg with a small budget: the accountant charges every round, and the run stops before
/// a round would overspend, says why, and still writes the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_privacy_budget_stops_the_run_and_saves_the_model() {
    let cfg = config(
        "rb-dp",
        4,
        10,
        "dp_args:\n  enable_dp: true\n  dp_solution_type: cdp\n  noise_multiplier: 2.0\n  \
         clipping_norm: 1.0\n  delta: 1.0e-5\n  stop_training_at_epsilon: 5.0\n",
    );
    let (r, _dir) = run(&cfg).await;
    let Outcome::Stopped(why) = &r.server.outcome else {
        panic!("expected a stop, got {:?}", r.server.outcome)
    };
    assert!(why.contains("stop_training_at_epsilon = 5"), "{why}");
    let rounds = r.server.records.len();
    assert!((2..10).contains(&rounds), "{rounds} rounds");
    let spent: Vec<f64> = r
        .server
        .records
        .iter()
        .map(|r| r.strategy["dp_epsilon"])
        .collect();
    assert!(spent.windows(2).all(|w| w[1] > w[0]), "{spent:?}");
    assert!(*spent.last().unwrap() <= 5.0, "{spent:?}");
    let model = r
        .server
        .final_path
        .as_ref()
        .expect("the final model is written");
    assert!(model.exists());
}

/// Distributed DP: each client clips and adds its share of the noise before secure aggregation
/// masks its update; the server never sees an update, yet the accountant charges every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_dp_runs_under_secure_aggregation() {
    let cfg = config(
        "rb-ddp",
        4,
        2,
        "secure_aggregation_args:\n  enable_sa: true\nfedmq_args:\n  weighting: uniform\n\
         dp_args:\n  enable_dp: true\n  dp_solution_type: ddp\n  noise_multiplier: 0.05\n  \
         clipping_norm: 1.0\n",
    );
    let (r, _dir) = run(&cfg).await;
    assert_eq!(
        r.server.outcome,
        Outcome::Completed,
        "{:?}",
        r.server.outcome
    );
    assert_eq!(r.server.records.len(), 2);
    for rec in &r.server.records {
        assert!(rec.strategy["dp_epsilon"] > 0.0);
        assert_eq!(rec.participants, 4);
    }
    // Little noise (zC = 0.05 on the sum): the clipped, noised, masked updates still average to
    // a model that learned. (The shares' sizes are unit-tested: `strategy::private`,
    // `client::hooks`.)
    assert!(final_accuracy(&r) > 0.7, "{}", final_accuracy(&r));
}
