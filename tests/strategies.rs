//! Strategies over the real transport (embedded broker and store, in one process): each server
//! optimizer's global model after a few rounds equals the update rules computed by hand.
//!
//! The clients are `fedmq bench round`'s no-op trainers: every client adds `delta` to every
//! parameter, so each round's pseudo-gradient is `delta` everywhere and the expected model is
//! the initial one shifted by a scalar that `bench_round::server_shift` computes in f64 from the
//! papers' rules (independently of `strategy::FedOpt`'s f32 tensor code).

use fedmq::bench_round::{bench_round_in_process, server_shift, RoundBenchConfig};
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
