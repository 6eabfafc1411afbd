//! Strategies over the real transport (embedded broker and store, in one process): each server
//! optimizer's global model after a few rounds equals the update rules computed by hand.
//!
//! The clients are `fedmq bench round`'s no-op trainers: every client adds `delta` to every
//! parameter, so each round's pseudo-gradient is `delta` everywhere and the expected model is
//! the initial one shifted by a scalar that `bench_round::server_shift` computes in f64 from the
//! papers' rules (independently of `strategy::FedOpt`'s f32 tensor code).

use fedmq::bench::round::{bench_round_in_process, fednova_shift, server_shift, RoundBenchConfig};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_optimizers_move_the_model_as_computed_by_hand() {
    for strategy in [
        "FedAvgM",
        "FedAdam",
        "FedYogi",
        "FedAdagrad",
        "FedAvg",
        "FedProx",
    ] {
        let cfg = RoundBenchConfig {
            clients: 3,
            params: 10_000,
            rounds: 4,
            payload_check: true,
            delta: 0.002,
            round_timeout: Duration::from_secs(60),
            strategy: strategy.into(),
            ..RoundBenchConfig::default()
        };
        let report = bench_round_in_process(&cfg).await.unwrap();
        assert_eq!(report.rounds_completed, 4, "{strategy}: {report:?}");
        assert_eq!(report.payload_ok, Some(true), "{strategy}: {report:?}");
    }
    // The shifts differ: the test would notice a strategy that silently averaged.
    let avg = 4.0 * 0.002f64;
    for s in ["FedAvgM", "FedAdam", "FedYogi", "FedAdagrad"] {
        let shift = server_shift(s, 4, 0.002).unwrap();
        assert!((shift - avg).abs() > 0.05 * avg, "{s}: {shift}");
    }
}

/// FedProx over the real transport with real training (MNIST, `lr`, 4 clients on
/// pathological non-IID shards): the clients receive `proximal_mu` in their train commands and
/// their models end the round measurably closer to the global model than with `mu = 0` (FedAvg),
/// same data, same seeds. `update_distance` is the server's sample-weighted mean of
/// `‖client model − global‖₂`, recorded in the round's metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fedprox_keeps_client_models_closer_to_the_global_model() {
    use fedmq::config::Config;
    use fedmq::federation::{self, LocalOptions};
    use tokio_util::sync::CancellationToken;
    let distance = |optimizer: &str, mu: f64| {
        let mut c = Config::default();
        c.common_args.run_id = format!("prox-{}", optimizer.to_lowercase());
        c.model_args.model = "lr".into();
        c.data_args.partition_method = "pathological".into();
        c.train_args.client_num_in_total = 4;
        c.train_args.client_num_per_round = 4;
        c.train_args.comm_round = 1;
        c.train_args.client_optimizer = "sgd".into();
        c.train_args.learning_rate = 0.05;
        c.train_args.momentum = 0.0;
        c.train_args.federated_optimizer = optimizer.into();
        c.train_args.fedprox_mu = Some(mu);
        c.validate().expect("valid config");
        async move {
            let out = tempfile::tempdir().unwrap();
            let opts = LocalOptions::new(out.path().to_path_buf());
            let report = federation::run_local(&c, &opts, |_| {}, CancellationToken::new())
                .await
                .expect("local federation");
            let r = &report.server.records[0];
            assert_eq!((r.participants, r.failures), (4, 0), "{r:?}");
            r.strategy["update_distance"]
        }
    };
    let plain = distance("FedAvg", 0.0).await;
    let prox = distance("FedProx", 1.0).await;
    eprintln!("update_distance: FedAvg {plain:.4}, FedProx mu=1 {prox:.4}");
    assert!(plain > 0.0);
    assert!(prox < 0.8 * plain, "FedProx {prox} vs FedAvg {plain}");
}

/// FedNova over the real transport is exact for clients with different numbers of local steps:
/// three clients report 1, 2 and 4 steps and each moves every parameter by the same `delta`, so
/// their normalized directions differ (`−delta/τᵢ`) and the server's model moves by
/// `delta · mean(τ) · mean(1/τ)` per round (7/3 · 7/12 = 1.361 × delta; FedAvg: 1 × delta),
/// which `fednova_shift` computes in f64 from the paper's rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fednova_is_exact_for_clients_with_different_step_counts() {
    let steps = vec![1, 2, 4];
    let cfg = RoundBenchConfig {
        clients: 3,
        params: 10_000,
        rounds: 3,
        payload_check: true,
        delta: 0.002,
        round_timeout: Duration::from_secs(60),
        strategy: "FedNova".into(),
        client_steps: steps.clone(),
        ..RoundBenchConfig::default()
    };
    let report = bench_round_in_process(&cfg).await.unwrap();
    assert_eq!(report.rounds_completed, 3, "{report:?}");
    assert_eq!(report.payload_ok, Some(true), "{report:?}");
    assert!((report.strategy_metrics["tau_eff"] - 7.0 / 3.0).abs() < 1e-9);
    let shift = fednova_shift(&steps, 3, 0.002);
    let d = f64::from(0.002f32);
    assert!((shift - 3.0 * d * (7.0 / 3.0) * (7.0 / 12.0)).abs() < 1e-12);
    assert!(
        (shift - 3.0 * d).abs() > 0.2 * shift,
        "distinct from FedAvg"
    );
}

/// SCAFFOLD over the real transport: the server's control variate travels in the global blob,
/// each client returns `Δcᵢ = (x − yᵢ)/(K·η) − c` in its update blob and keeps `cᵢ`, and the
/// server's `c` follows `c ← c + (1/N)·ΣΔcᵢ`. With no-op clients that move every parameter by
/// `delta` in `τᵢ` steps (η = 1), round 1 gives `c = −delta·mean(1/τ)` in every parameter and
/// later rounds keep it there (ΣΔcᵢ = 0), while the model is the plain mean. `control_norm`
/// is `‖c‖₂ = delta·mean(1/τ)·√P`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffold_control_variates_cross_the_transport_as_computed_by_hand() {
    let (params, delta) = (10_000usize, 0.002f32);
    let cfg = RoundBenchConfig {
        clients: 3,
        params,
        rounds: 3,
        payload_check: true,
        delta,
        round_timeout: Duration::from_secs(60),
        strategy: "SCAFFOLD".into(),
        client_steps: vec![1, 2, 4],
        ..RoundBenchConfig::default()
    };
    let report = bench_round_in_process(&cfg).await.unwrap();
    assert_eq!(report.rounds_completed, 3, "{report:?}");
    assert_eq!(report.payload_ok, Some(true), "{report:?}");
    let mean_inv = (1.0 + 0.5 + 0.25) / 3.0;
    let want = f64::from(delta) * mean_inv * (params as f64).sqrt();
    let got = report.strategy_metrics["control_norm"];
    assert!(
        (got - want).abs() < 1e-4 * want,
        "control_norm {got} vs {want}"
    );
}

/// FedBuff over the real transport: 4 clients take 100 ms to "train" and one takes 1 s (10×
/// slower). Synchronous FedAvg waits for the slow client every round; FedBuff (a server step
/// every 2 updates) keeps stepping at the fast clients' pace, and the slow client's updates,
/// trained on a model many versions old, still count (weighted down by `1/√(1+τ)`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedbuff_keeps_stepping_while_a_client_is_ten_times_slower() {
    let (fast, slow) = (Duration::from_millis(100), Duration::from_secs(1));
    let base = RoundBenchConfig {
        clients: 5,
        params: 10_000,
        round_timeout: Duration::from_secs(60),
        client_delays: vec![slow, fast, fast, fast, fast],
        ..RoundBenchConfig::default()
    };

    let sync = RoundBenchConfig {
        rounds: 3,
        strategy: "FedAvg".into(),
        ..base.clone()
    };
    let sync = bench_round_in_process(&sync).await.unwrap();
    assert_eq!(sync.rounds_completed, 3, "{sync:?}");
    let slowest_wait = sync.round_s.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        slowest_wait >= slow.as_secs_f64(),
        "FedAvg rounds wait for the slow client: {:?}",
        sync.round_s
    );

    let strategy_args = fedmq::config::FedmqArgs {
        buffer_size: Some(2),
        max_staleness: 100,
        ..Default::default()
    };
    let buffered = RoundBenchConfig {
        rounds: 40,
        strategy: "FedBuff".into(),
        strategy_args,
        ..base
    };
    let report = bench_round_in_process(&buffered).await.unwrap();
    assert_eq!(report.rounds_completed, 40, "{report:?}");
    let median = report.round_s_median.unwrap();
    assert!(
        median < 0.5 * slow.as_secs_f64(),
        "FedBuff steps at the fast clients' pace: median {median} s, {:?}",
        report.round_s
    );
    // The fast clients lag at most a few versions; only the slow client's updates, trained
    // while the others moved the model on, can lag this far.
    let lag = report.strategy_metrics_max["max_staleness"];
    eprintln!(
        "FedAvg round_s {:?}; FedBuff (K = 2) median step {median:.3} s over 40 steps, wall {:.2} s, \
         largest staleness applied {lag}",
        sync.round_s, report.wall_s
    );
    assert!(
        lag >= 5.0,
        "the slow client's updates were applied: {report:?}"
    );
}
