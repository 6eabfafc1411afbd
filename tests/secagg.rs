//! Secure aggregation over the real transport: the embedded broker and store, signed messages
//! where the harness signs, every stage's messages and blobs.
//!
//! The no-op clients of `fedmq bench round` add a known delta to every parameter, a different one
//! per client, so the final model says exactly which clients' updates the server unmasked: the
//! mean of the survivors' deltas per round, within the quantization bound.

use fedmq::bench::round::{bench_round_in_process, RoundBenchConfig};
use std::time::Duration;

fn deltas(n: usize) -> Vec<f32> {
    (1..=n).map(|r| r as f32 * 1e-3).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_unmask_exactly_their_weighted_mean() {
    let cfg = RoundBenchConfig {
        clients: 10,
        params: 20_000,
        rounds: 3,
        payload_check: true,
        round_timeout: Duration::from_secs(60),
        secure_aggregation: true,
        client_deltas: deltas(10),
        ..RoundBenchConfig::default()
    };
    let report = bench_round_in_process(&cfg).await.unwrap();
    assert_eq!(report.rounds_completed, 3, "{report:?}");
    assert_eq!(report.payload_ok, Some(true), "{report:?}");
    let m = &report.strategy_metrics;
    assert_eq!(m.get("secagg_survivors"), Some(&10.0), "{m:?}");
    // The unmask stage closes as soon as every secret has t = 6 shares.
    assert!((6.0..=10.0).contains(&m["secagg_revealed"]), "{m:?}");
    assert!(!m.contains_key("update_distance"), "no per-client distance: {m:?}");
    assert!(m["secagg_error_bound"] < 1e-6, "{m:?}");
    for stage in ["keys", "shares", "masked", "unmask"] {
        assert!(
            report.secagg_stage_s_median.contains_key(&format!("secagg_{stage}_s")),
            "{report:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_dropping_after_they_shared_leave_exactly_the_survivors_mean() {
    // Ranks 8, 9 and 10 fail 300 ms into training, after advertising and sharing their keys:
    // the server reconstructs their mask keys and removes their pairwise masks.
    let cfg = RoundBenchConfig {
        clients: 10,
        params: 20_000,
        rounds: 2,
        payload_check: true,
        round_timeout: Duration::from_secs(60),
        secure_aggregation: true,
        client_deltas: deltas(10),
        dropout: 0.3,
        dropout_after: Duration::from_millis(300),
        ..RoundBenchConfig::default()
    };
    let report = bench_round_in_process(&cfg).await.unwrap();
    assert_eq!(report.rounds_completed, 2, "{report:?}");
    // The survivors' mean (ranks 1-7: 4e-3 per round), not all ten's (5.5e-3).
    assert!((cfg.survivors_mean_delta() - 4e-3).abs() < 1e-9);
    assert_eq!(report.payload_ok, Some(true), "{report:?}");
    let m = &report.strategy_metrics;
    assert_eq!(m.get("secagg_survivors"), Some(&7.0), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strategy_that_needs_each_update_is_refused_with_secure_aggregation() {
    use fedmq::config::Config;
    for (optimizer, why) in [
        ("SCAFFOLD", "control-variate"),
        ("FedNova", "normalizer"),
        ("FedBuff", "staleness"),
    ] {
        let mut c = Config::default();
        c.train_args.federated_optimizer = optimizer.into();
        c.train_args.client_optimizer = "sgd".into();
        c.secure_aggregation_args.enable_sa = true;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("secure_aggregation_args.enable_sa") && e.contains(why),
            "{optimizer}: {e}"
        );
    }
    let mut c = Config::default();
    c.train_args.federated_optimizer = "FedAdam".into();
    c.secure_aggregation_args.enable_sa = true;
    c.validate().expect("FedAdam needs only the mean");
}
