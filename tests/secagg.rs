//! Secure aggregation over the real transport: the embedded broker and store, signed messages
//! where the harness signs, every stage's messages and blobs.
//!
//! The no-op clients of `fedmq bench round` add a known delta to every parameter, a different one
//! per client, so the final model says exactly which clients' updates the server unmasked: the
//! mean of the survivors' deltas per round, within the quantization bound.

use fedmq::bench::round::{bench_round_in_process, RoundBenchConfig};
use std::time::Duration;
use tokio::sync::{Mutex, MutexGuard};

/// One federation at a time: each is a broker, a store, a server and its clients in this
/// process, on a 2-core machine.
static LOCK: Mutex<()> = Mutex::const_new(());

async fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().await
}

fn deltas(n: usize) -> Vec<f32> {
    (1..=n).map(|r| r as f32 * 1e-3).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_unmask_exactly_their_weighted_mean() {
    let _serial = serial().await;
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
    assert!(
        !m.contains_key("update_distance"),
        "no per-client distance: {m:?}"
    );
    assert!(m["secagg_error_bound"] < 1e-6, "{m:?}");
    for stage in ["keys", "shares", "masked", "unmask"] {
        assert!(
            report
                .secagg_stage_s_median
                .contains_key(&format!("secagg_{stage}_s")),
            "{report:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lightsecagg_unmasks_exactly_the_weighted_mean_of_the_survivors() {
    let _serial = serial().await;
    // N = 10: U = 7 aggregate shares unmask, T = 5. Without dropouts, and with ranks 8-10
    // failing 300 ms into training, after they shared their coded mask shares.
    for (dropout, survivors) in [(0.0, 10.0), (0.3, 7.0)] {
        let cfg = RoundBenchConfig {
            clients: 10,
            params: 20_000,
            rounds: 2,
            payload_check: true,
            round_timeout: Duration::from_secs(60),
            secure_aggregation: true,
            light_secagg: true,
            client_deltas: deltas(10),
            dropout,
            dropout_after: Duration::from_millis(300),
            ..RoundBenchConfig::default()
        };
        let report = bench_round_in_process(&cfg).await.unwrap();
        assert_eq!(report.sa_method, Some("lightsecagg"));
        assert_eq!(report.rounds_completed, 2, "{report:?}");
        assert_eq!(report.payload_ok, Some(true), "{report:?}");
        let m = &report.strategy_metrics;
        assert_eq!(m.get("secagg_survivors"), Some(&survivors), "{m:?}");
        // The unmask stage closes as soon as U = 7 aggregate shares are in.
        assert_eq!(m.get("secagg_revealed"), Some(&7.0), "{m:?}");
        assert!(m["secagg_error_bound"] < 1e-6, "{m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_dropping_after_they_shared_leave_exactly_the_survivors_mean() {
    let _serial = serial().await;
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

// ---------------------------------------------------------------------------------------------
// Real training: MNIST with and without secure aggregation, and what the store holds.

mod mnist {
    use fedmq::config::{Config, LoadMode};
    use fedmq::federation::{self, LocalOptions, KEY_PREFIX};
    use fedmq::proto::BlobKeys;
    use fedmq::secagg;
    use fedmq::server::Outcome;
    use fedmq::store::{BlobStore, EmbeddedStore, S3Options, StoreOptions};
    use fedmq::tensor::ParamSet;
    use tokio_util::sync::CancellationToken;

    const SECRET: &str = "secagg-test-secret";

    /// 10 clients on Dirichlet-skewed MNIST (different sample counts, so different weights),
    /// `lr`, every client every round, every blob kept, blobs not sealed (the test reads them as
    /// the server and the store operator would after opening a seal).
    fn config(run: &str, secure: bool, store: &EmbeddedStore) -> Config {
        let mut c = Config::default();
        c.common_args.run_id = run.into();
        c.model_args.model = "lr".into();
        c.data_args.partition_method = "hetero".into();
        c.data_args.partition_alpha = 0.5;
        c.train_args.client_num_in_total = 10;
        c.train_args.client_num_per_round = 10;
        c.train_args.comm_round = 4;
        c.train_args.batch_size = 32;
        c.train_args.client_optimizer = "sgd".into();
        c.train_args.learning_rate = 0.05;
        c.validation_args.frequency_of_the_test = 4;
        c.fedmq_args.keep_rounds = 0;
        c.fedmq_args.encrypt_blobs = Some(false);
        c.secure_aggregation_args.enable_sa = secure;
        let s3 = &mut c.comm_args.customized_training_s3_config;
        s3.cn_s3_endpoint = store.endpoint();
        s3.cn_s3_aki = "fedmq".into();
        s3.cn_s3_sak = SECRET.into();
        c.validate().expect("valid config");
        c
    }

    async fn run(cfg: &Config) -> fedmq::federation::LocalReport {
        let out = tempfile::tempdir().unwrap();
        let opts = LocalOptions::new(out.path().to_path_buf());
        let report = federation::run_local(cfg, &opts, |_| {}, CancellationToken::new())
            .await
            .expect("local federation");
        assert_eq!(
            report.server.outcome,
            Outcome::Completed,
            "{:?}",
            cfg.common_args.run_id
        );
        report
    }

    fn flat(p: &ParamSet) -> Vec<f32> {
        p.iter().flat_map(|t| t.data().to_vec()).collect()
    }

    /// Same data, seeds and initial model with and without secure aggregation: round 1's new
    /// global model is the same within the documented bound (the server unmasked exactly the
    /// weighted sum), the final accuracies agree within 0.5 points, and client-1's masked input
    /// in the store is uniform-looking and uncorrelated with its real update (the plain run's).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_secure_mnist_federation_matches_the_plain_one_and_hides_each_update() {
        let _serial = super::serial().await;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::start(StoreOptions::new(dir.path(), "fedmq", SECRET))
            .await
            .unwrap();
        let plain_cfg = config("plain", false, &store);
        let secure_cfg = config("masked", true, &store);
        let plain = run(&plain_cfg).await;
        let secure = run(&secure_cfg).await;

        let blobs = BlobStore::connect(&S3Options::from(
            &plain_cfg.comm_args.customized_training_s3_config,
        ))
        .unwrap();
        let get = |run: &str, key: fn(&BlobKeys) -> String| {
            let blobs = blobs.clone();
            let k = key(&BlobKeys::new(KEY_PREFIX, run));
            async move { blobs.get_unverified(&k).await.unwrap() }
        };
        let model = |b: &[u8]| ParamSet::from_safetensors_bytes(b).unwrap();
        // Round 1: both runs start from the same model; round 2's global is round 1's result.
        let g1_plain = model(&get("plain", |k| k.global(1)).await);
        let g1_secure = model(&get("masked", |k| k.global(1)).await);
        assert_eq!(g1_plain, g1_secure, "same initial model");
        let g2_plain = flat(&model(&get("plain", |k| k.global(2)).await));
        let g2_secure = flat(&model(&get("masked", |k| k.global(2)).await));
        let r1 = &secure.server.records[0];
        assert_eq!(r1.participants, 10, "{r1:?}");
        let bound = r1.strategy["secagg_error_bound"];
        let worst = g2_plain
            .iter()
            .zip(&g2_secure)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0.0, f64::max);
        // The bound, plus f32 rounding of the two ways of averaging (the plain mean is folded
        // in f32, update by update).
        assert!(
            worst <= bound + 2e-6,
            "round 1 differs by {worst}, bound {bound}"
        );

        let acc = |r: &fedmq::federation::LocalReport| {
            r.server.records.last().unwrap().test_accuracy.unwrap()
        };
        let (a_plain, a_secure) = (acc(&plain), acc(&secure));
        assert!(
            (a_plain - a_secure).abs() <= 0.005,
            "accuracy {a_plain} without, {a_secure} with secure aggregation"
        );
        assert!(a_secure > 0.8, "it learned: {a_secure}");

        // What the server and the store hold of client-1 in round 1: its masked input.
        let masked =
            secagg::decode_masked(&get("masked", |k| k.update(1, "client-1")).await).unwrap();
        let trained = flat(&model(&get("plain", |k| k.update(1, "client-1")).await));
        let update: Vec<f64> = trained
            .iter()
            .zip(flat(&g1_plain))
            .map(|(t, g)| f64::from(t - g))
            .collect();
        assert_eq!(masked.len(), update.len());
        let n = masked.len() as f64;
        let mut buckets = [0usize; 16];
        for v in &masked {
            buckets[(*v >> 28) as usize] += 1;
        }
        let chi2: f64 = buckets
            .iter()
            .map(|&b| (b as f64 - n / 16.0).powi(2) / (n / 16.0))
            .sum();
        assert!(
            chi2 < 37.7,
            "chi-square {chi2} (15 d.o.f., p = 0.001): {buckets:?}"
        );
        let m: Vec<f64> = masked.iter().map(|v| f64::from(*v)).collect();
        let corr = correlation(&m, &update);
        assert!(corr.abs() < 0.05, "correlation with the update {corr}");
        // The same test sees the structure of the update itself, quantized without a mask.
        let q = secagg::quantize::Quantizer::new(1.0, 10).unwrap();
        let mut plain_buckets = [0usize; 16];
        for u in &update {
            plain_buckets[(q.quantize(*u as f32) >> 24) as usize & 15] += 1;
        }
        let plain_chi2: f64 = plain_buckets
            .iter()
            .map(|&b| (b as f64 - n / 16.0).powi(2) / (n / 16.0))
            .sum();
        assert!(plain_chi2 > 1000.0, "unmasked: chi-square {plain_chi2}");
        store.shutdown().await;
    }

    fn correlation(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len() as f64;
        let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
        cov / (va * vb).sqrt()
    }

    /// FedML's LightSecAgg example config runs as it is: 1,000 clients, 2 per round, 2 rounds,
    /// with LightSecAgg (its `privacy_guarantee: 2` needs 3 clients per round: the server lowers
    /// it to 1, with a warning); only the data cache is the test suite's. (A thousand clients
    /// connecting while the first ones finish used to stall the embedded broker: see
    /// `keep_router_awake` in `src/transport/broker.rs`.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fedmls_lightsecagg_config_runs_as_it_is() {
        let _serial = super::serial().await;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fedml_corpus/secagg_lightsecagg.yaml"
        );
        let mut cfg = Config::load_for(std::path::Path::new(path), LoadMode::Local).unwrap();
        assert!(cfg.secure_aggregation());
        cfg.data_args.data_cache_dir = Config::default().data_args.data_cache_dir;
        assert_eq!(cfg.train_args.client_num_in_total, 1000);
        let out = tempfile::tempdir().unwrap();
        let opts = LocalOptions::new(out.path().to_path_buf());
        let report = federation::run_local(&cfg, &opts, |_| {}, CancellationToken::new())
            .await
            .expect("local federation");
        assert_eq!(report.server.outcome, Outcome::Completed);
        let records = &report.server.records;
        assert_eq!(records.len(), 2);
        for r in records {
            assert_eq!(r.participants, 2, "{r:?}");
            assert_eq!(r.strategy.get("secagg_survivors"), Some(&2.0), "{r:?}");
            // LightSecAgg with U = 2 and T lowered from 2 to 1.
            assert_eq!(r.strategy.get("lsa_active"), Some(&2.0), "{r:?}");
            assert_eq!(r.strategy.get("lsa_privacy"), Some(&1.0), "{r:?}");
        }
    }
}
