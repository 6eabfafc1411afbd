use super::*;
use crate::tensor::NamedTensor;

fn hier(devices: usize, edges: usize) -> Config {
    let mut c = Config::default();
    c.train_args.federated_optimizer = "HierarchicalFL".into();
    c.train_args.client_num_in_total = devices;
    c.train_args.client_num_per_round = devices;
    c.train_args.group_num = edges;
    c.common_args.run_id = "run".into();
    c
}

#[test]
fn devices_are_dealt_to_every_edge_once_evenly_and_reproducibly() {
    let c = hier(53, 10);
    let s = sites(&c);
    assert_eq!(s.len(), 10);
    let mut all: Vec<usize> = s.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=53).collect::<Vec<_>>(),
        "each device in exactly one site"
    );
    let sizes: Vec<usize> = s.iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|&n| n == 5 || n == 6), "{sizes:?}");
    assert_eq!(sites(&c), s, "same seed, same sites");
    assert_ne!(
        s[0],
        (1..=5).collect::<Vec<_>>(),
        "shuffled, not contiguous"
    );
    for (k, members) in (1..).zip(&s) {
        for &r in members {
            assert_eq!(site_of(&c, r), Some(k));
        }
    }
    let mut other = c.clone();
    other.common_args.random_seed = 7;
    assert_ne!(sites(&other), s, "the seed decides");
    assert_eq!(site_of(&c, 54), None);
}

#[test]
fn a_site_config_is_the_sites_share_of_the_federation() {
    let mut c = hier(50, 10);
    c.train_args.client_num_per_round = 20;
    c.train_args.group_comm_round = 2;
    c.fedmq_args.round_timeout_s = 100.0;
    c.fedmq_args.signing_key = "keys/{id}.key".into();
    c.fedmq_args.trusted_keys = "keys".into();
    let s = site_config(&c, 3);
    assert_eq!(s.common_args.run_id, "run-edge-3");
    assert_eq!(
        s.train_args.client_num_per_round, 2,
        "20 of 50 devices: 2 of this site's 5"
    );
    assert_eq!(
        s.fedmq_args.round_timeout_s, 40.0,
        "0.8 × 100 s over 2 site rounds"
    );
    assert_eq!(s.fedmq_args.trusted_keys, "keys/run-edge-3");
    assert_eq!(s.fedmq_args.signing_key, "keys/run-edge-3/{id}.key");
    assert!(!s.hierarchical(), "a site's rounds are plain FedAvg rounds");
    c.fedmq_args.edge_round_timeout_s = 7.0;
    assert_eq!(site_config(&c, 3).fedmq_args.round_timeout_s, 7.0);
    // The site's server options: its devices, paced, unbounded rounds.
    let o = site_server_options(&c, 3, None);
    let expected: Vec<String> = sites(&c)[2].iter().map(|&r| client::client_id(r)).collect();
    assert_eq!(o.expected_clients, expected);
    assert!(o.round.paced);
    assert_eq!(o.run, "run-edge-3");
    // The cloud's: the edges, all of them every round.
    let cloud = federation::server_options(&c, None);
    assert_eq!(cloud.expected_clients.len(), 10);
    assert_eq!(cloud.expected_clients[0], "run-edge-1");
    assert_eq!(cloud.round.clients_per_round, 10);
    assert_eq!(cloud.round.min_clients, 10);
}

#[test]
fn hierarchical_settings_are_checked() {
    let mut c = hier(10, 11);
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("train_args.group_num"), "{e}");
    c.train_args.group_num = 2;
    c.train_args.group_method = "hetero".into();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("train_args.group_method"), "{e}");
    c.train_args.group_method = "random".into();
    c.validate().unwrap();
    c.fedmq_args.health_listen = "nowhere".into();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("fedmq_args.health_listen"), "{e}");
}

fn params(v: f32) -> ParamSet {
    ParamSet::new(vec![NamedTensor::new("w", vec![2], vec![v, v]).unwrap()]).unwrap()
}

fn train_config() -> TrainConfig {
    TrainConfig {
        model: "lr".into(),
        epochs: 1,
        batch_size: 8,
        optimizer: "sgd".into(),
        learning_rate: 0.5,
        momentum: 0.0,
        weight_decay: 0.0,
        seed: 3,
    }
}

/// A stand-in site server answering each round with its model plus one, from 40 samples;
/// fails round `fail_at`.
fn fake_site(
    fail_at: Option<u64>,
) -> (
    mpsc::UnboundedSender<SiteCommand>,
    std::thread::JoinHandle<Vec<f64>>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let h = std::thread::spawn(move || {
        let mut seen_lr = Vec::new();
        let mut round = 0;
        while let Some(cmd) = rx.blocking_recv() {
            let SiteCommand::Round {
                global,
                train,
                reply,
            } = cmd
            else {
                break;
            };
            round += 1;
            seen_lr.push(train.map_or(0.0, |t| t.learning_rate));
            if Some(round) == fail_at {
                let _ = reply.send(Err("only 1 of 3 devices reported".into()));
                continue;
            }
            let v = global.tensors()[0].data()[0] + 1.0;
            let metrics = [
                ("client_test_samples".to_string(), 10.0),
                ("client_test_rmse".to_string(), 2.0),
                ("client_test_loss".to_string(), 0.5),
            ]
            .into_iter()
            .collect();
            let _ = reply.send(Ok(SiteRound {
                round,
                global: params(v),
                num_samples: 40,
                train_loss: 0.25,
                participants: 3,
                metrics,
            }));
        }
        seen_lr
    });
    (tx, h)
}

#[test]
fn the_site_trainer_runs_group_comm_round_site_rounds_and_reports_the_sites_samples() {
    let (tx, site) = fake_site(None);
    let t = SiteTrainer::new(tx, 3, 100);
    assert_eq!(
        t.num_samples(),
        100,
        "before the first round: what the devices announced"
    );
    let hooks = LocalHooks::default();
    let out = t
        .train(
            params(1.0),
            &train_config(),
            &hooks,
            &AtomicBool::new(false),
        )
        .unwrap();
    assert_eq!(
        out.params,
        params(4.0),
        "three site rounds, each from the last"
    );
    assert_eq!(out.steps, 3);
    assert_eq!(
        t.num_samples(),
        40,
        "the samples behind the last site round"
    );
    assert_eq!(out.metrics.train_loss, 0.25);
    let eval = out
        .metrics
        .eval
        .expect("the devices' evaluations go up as sums");
    assert_eq!(eval.samples, 10);
    assert_eq!(eval.sq_err_sum, Some(40.0), "rmse² × n");
    assert_eq!(eval.loss_sum, 5.0);
    drop(t);
    assert_eq!(
        site.join().unwrap(),
        vec![0.5; 3],
        "the cloud's settings reach the site"
    );
}

/// The error of one cloud round of `t` from `params(1.0)` with `hooks`.
fn train_err(t: &SiteTrainer, hooks: &LocalHooks) -> String {
    t.train(params(1.0), &train_config(), hooks, &AtomicBool::new(false))
        .unwrap_err()
        .to_string()
}

#[test]
fn a_failed_site_round_or_a_strategy_instruction_is_the_edges_failure() {
    let (tx, _site) = fake_site(Some(2));
    let t = SiteTrainer::new(tx, 2, 100);
    let e = train_err(&t, &LocalHooks::default());
    assert!(
        e.contains("site's round failed") && e.contains("1 of 3"),
        "{e}"
    );
    let prox = LocalHooks {
        proximal_mu: 0.1,
        ..LocalHooks::default()
    };
    let e = train_err(&t, &prox);
    assert!(e.contains("HierarchicalFL"), "{e}");
    // A site server that is gone.
    let (tx, rx) = mpsc::unbounded_channel();
    drop(rx);
    let t = SiteTrainer::new(tx, 1, 1);
    let e = train_err(&t, &LocalHooks::default());
    assert!(e.contains("stopped"), "{e}");
}

#[test]
fn an_interrupted_cloud_round_stops_waiting_for_the_site() {
    // A site that never answers.
    let (tx, mut rx) = mpsc::unbounded_channel::<SiteCommand>();
    let keep = std::thread::spawn(move || {
        let held = rx.blocking_recv();
        std::thread::sleep(Duration::from_millis(500));
        drop(held);
    });
    let t = SiteTrainer::new(tx, 1, 1);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(150));
            stop.store(true, Ordering::Relaxed);
        });
        let e = t
            .train(params(1.0), &train_config(), &LocalHooks::default(), &stop)
            .unwrap_err();
        assert!(matches!(e, client::TrainError::Interrupted), "{e}");
    });
    keep.join().unwrap();
}
