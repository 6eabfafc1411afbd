//! The machine's secure rounds with plain values: clients are [`ClientSession`]s answering the
//! machine's stage messages, the driver's work (storing, fetching) done inline.

use super::*;
use crate::proto::{Body, SaMasked};
use crate::secagg::{self, ClientSession};
use crate::strategy::FedAvg;
use crate::tensor::NamedTensor;
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);

fn model(v: &[f32]) -> ParamSet {
    ParamSet::new(vec![
        NamedTensor::new("w", vec![v.len()], v.to_vec()).unwrap()
    ])
    .unwrap()
}

fn blob(key: String) -> BlobRef {
    BlobRef {
        key,
        len: 8,
        sha256: "00".repeat(32),
        wrapped_key: None,
    }
}

fn cfg(on_failure: OnFailure) -> RoundConfig {
    RoundConfig {
        rounds: 3,
        clients_per_round: 5,
        min_clients: 5,
        admission_timeout: None,
        round_timeout: 60 * SEC,
        quorum: 0.5,
        max_retries: 1,
        eval_every: 1,
        seed: 3,
        train: TrainConfig {
            model: "lr".into(),
            epochs: 1,
            batch_size: 1,
            optimizer: "sgd".into(),
            learning_rate: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
            seed: 0,
        },
        keys: BlobKeys::new("p", "run"),
        weighting: Weighting::Samples,
        secure: Some(SecureConfig {
            clip: 1.0,
            degree: 0,
            threshold: 0,
            stage_timeout: 5 * SEC,
            on_failure,
            protocol: Default::default(),
        }),
        paced: false,
    }
}

/// Five clients, client-`i` holding `i × 10` samples and moving every value by `i / 100`.
struct Round {
    m: RoundMachine,
    now: Instant,
    sessions: BTreeMap<String, ClientSession>,
    inboxes: BTreeMap<String, Vec<u8>>,
    keys: BlobKeys,
}

fn id(i: usize) -> String {
    format!("client-{i}")
}

fn samples(c: &str) -> u64 {
    c.trim_start_matches("client-").parse::<u64>().unwrap() * 10
}

fn shift(c: &str) -> f32 {
    samples(c) as f32 / 1000.0
}

impl Round {
    /// Admitted and the global model of round 1 stored: the train commands (with the setup).
    fn start(on_failure: OnFailure) -> (Self, Vec<Action>) {
        let now = Instant::now();
        let cfg = cfg(on_failure);
        let keys = cfg.keys.clone();
        let mut m = RoundMachine::new(
            cfg,
            Box::new(FedAvg::default()),
            model(&[0.0, 0.5, -0.5]),
            now,
        );
        for i in 1..=5 {
            m.handle(
                Event::ClientOnline {
                    client: id(i),
                    capabilities: Some(Capabilities {
                        device: "cpu".into(),
                        cores: 1,
                        gpu: None,
                        samples: samples(&id(i)),
                        version: "t".into(),
                    }),
                },
                now,
            );
        }
        let acts = m.handle(
            Event::GlobalUploaded {
                round: 1,
                blob: blob(keys.global(1)),
            },
            now,
        );
        let r = Self {
            m,
            now,
            sessions: BTreeMap::new(),
            inboxes: BTreeMap::new(),
            keys,
        };
        (r, acts)
    }

    fn ev(&mut self, e: Event) -> Vec<Action> {
        self.m.handle(e, self.now)
    }

    fn secure(&mut self, client: &str, msg: SecureMessage) -> Vec<Action> {
        self.ev(Event::Secure {
            client: client.into(),
            round: 1,
            msg,
        })
    }

    /// `clients` answer the train command with their keys.
    fn advertise(&mut self, train: &[Action], clients: &[String]) -> Vec<Action> {
        let mut out = Vec::new();
        for a in train {
            if let Action::SendTrain {
                client,
                secagg: Some(setup),
                ..
            } = a
            {
                if !clients.contains(client) {
                    continue;
                }
                let (s, k) = ClientSession::new("run", 1, client, setup, samples(client)).unwrap();
                self.sessions.insert(client.clone(), s);
                out.extend(self.secure(client, SecureMessage::Keys(k)));
            }
        }
        out
    }

    /// Every addressee still in `alive` answers the stage messages in `acts`; returns what the
    /// machine did next.
    fn answer(&mut self, acts: &[Action], alive: &[String]) -> Vec<Action> {
        let mut out = Vec::new();
        for a in acts {
            let (client, body) = match a {
                Action::SendSecure { client, body, .. } => (client, body.as_ref().clone()),
                Action::SendCollect {
                    client,
                    sharing,
                    inbox,
                    ..
                } => {
                    self.inboxes.insert(client.clone(), inbox.clone());
                    let collect = crate::proto::SaCollect {
                        sharing: sharing.clone(),
                        inbox: blob(self.keys.inbox(1, client)),
                    };
                    (client, Body::SaCollect(collect))
                }
                _ => continue,
            };
            if !alive.contains(client) {
                continue;
            }
            let s = self.sessions.get_mut(client).unwrap();
            match &body {
                Body::SaRoster(r) => {
                    let b = s.on_roster(r, &mut rand::rng()).unwrap();
                    let bundle = blob(self.keys.shares(1, client));
                    let acts = self.secure(
                        client,
                        SecureMessage::Shares(crate::proto::SaShares { bundle }),
                    );
                    assert!(
                        acts.iter().any(|a| matches!(a, Action::FetchBundle { .. })),
                        "{acts:?}"
                    );
                    out.extend(acts);
                    out.extend(self.ev(Event::BundleFetched {
                        client: client.clone(),
                        round: 1,
                        bundle: Ok(b.into()),
                    }));
                }
                Body::SaCollect(c) => {
                    s.on_collect(c, &self.inboxes[client]).unwrap();
                    let global = model(&[0.0, 0.5, -0.5]);
                    let d = shift(client);
                    let trained = model(&[d, 0.5 + d, -0.5 + d]);
                    let y = s.masked_input(&global, &trained).unwrap();
                    let masked = blob(self.keys.update(1, client));
                    let acts = self.secure(
                        client,
                        SecureMessage::Masked(SaMasked {
                            masked,
                            num_samples: samples(client),
                            metrics: TrainMetrics::default(),
                        }),
                    );
                    assert!(
                        acts.iter().any(|a| matches!(a, Action::FetchUpdate { .. })),
                        "{acts:?}"
                    );
                    out.extend(acts);
                    out.extend(self.ev(Event::UpdateFetched {
                        client: client.clone(),
                        round: 1,
                        blob: secagg::encode_masked(&y).into(),
                    }));
                }
                Body::SaUnmask(u) => {
                    let secagg::Reveal::Shares(reveal) = s.on_unmask(u).unwrap() else {
                        panic!("a SecAgg+ round")
                    };
                    out.extend(self.secure(client, SecureMessage::Reveal(reveal)));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    /// Answers stage after stage until the machine sends no more stage messages.
    fn run(&mut self, mut acts: Vec<Action>, alive: &[String]) -> Vec<Action> {
        let mut all = acts.clone();
        while acts
            .iter()
            .any(|a| matches!(a, Action::SendSecure { .. } | Action::SendCollect { .. }))
        {
            acts = self.answer(&acts, alive);
            all.extend(acts.clone());
        }
        all
    }
}

fn summary(acts: &[Action]) -> Option<&RoundSummary> {
    acts.iter().find_map(|a| match a {
        Action::RoundClosed(s) => Some(s),
        _ => None,
    })
}

#[test]
fn a_secure_round_folds_the_unmasked_weighted_mean() {
    let (mut r, train) = Round::start(OnFailure::Abort);
    assert!(train.iter().all(|a| matches!(
        a,
        Action::SendTrain {
            secagg: Some(_),
            ..
        }
    )));
    let all: Vec<String> = (1..=5).map(id).collect();
    let acts = r.advertise(&train, &all);
    let acts = r.run(acts, &all);
    let s = summary(&acts).expect("round closed");
    assert_eq!(s.participants, all);
    assert!(s.updated);
    assert_eq!(s.strategy_metrics["secagg_survivors"], 5.0);
    // Weighted by samples: Σ i·10·(i/100) / Σ i·10 = Σ i² / (100 Σ i) = 55 / 1500.
    let want = 55.0 / 1500.0;
    let got = r.m.global().iter().next().unwrap().data().to_vec();
    for (g, base) in got.iter().zip([0.0f32, 0.5, -0.5]) {
        assert!((f64::from(g - base) - want).abs() < 1e-6, "{got:?}");
    }
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::UploadGlobal { round: 2 })));
}

#[test]
fn a_client_silent_at_the_keys_stage_is_left_out_at_the_stage_deadline() {
    let (mut r, train) = Round::start(OnFailure::Abort);
    let four: Vec<String> = (1..=4).map(id).collect();
    let acts = r.advertise(&train, &four);
    assert!(
        !acts.iter().any(|a| matches!(a, Action::SendSecure { .. })),
        "waits for client-5"
    );
    assert_eq!(
        r.m.next_deadline(),
        Some(r.now + 5 * SEC),
        "the keys stage's deadline"
    );
    r.now += 5 * SEC;
    let acts = r.ev(Event::Tick);
    let rosters: Vec<&String> = acts
        .iter()
        .filter_map(|a| match a {
            Action::SendSecure { client, .. } => Some(client),
            _ => None,
        })
        .collect();
    assert_eq!(rosters.len(), 4, "{acts:?}");
    let acts = r.run(acts, &four);
    let s = summary(&acts).expect("round closed");
    assert_eq!(s.participants, four);
    assert_eq!(s.failures.len(), 1, "{s:?}");
}

/// Three of five go offline after sharing: two masked inputs, t = 3.
fn below_threshold(on_failure: OnFailure) -> Vec<Action> {
    let (mut r, train) = Round::start(on_failure);
    let all: Vec<String> = (1..=5).map(id).collect();
    let acts = r.advertise(&train, &all);
    // Rosters answered by everyone: shares stored, collects sent.
    let collects = r.answer(&acts, &all);
    for i in 3..=5 {
        r.ev(Event::ClientOffline { client: id(i) });
    }
    let two: Vec<String> = (1..=2).map(id).collect();
    r.run(collects, &two)
}

#[test]
fn below_the_threshold_the_run_aborts_with_the_reason() {
    let acts = below_threshold(OnFailure::Abort);
    let reason = acts
        .iter()
        .find_map(|a| match a {
            Action::Finish(Outcome::Aborted(r)) => Some(r.clone()),
            _ => None,
        })
        .expect("aborted");
    assert!(
        reason.contains("masked input stage") && reason.contains("only 2 masked inputs, 3 needed"),
        "{reason}"
    );
    assert!(summary(&acts).is_none());
}

#[test]
fn below_the_threshold_a_skipped_round_leaves_the_model_and_goes_on() {
    let acts = below_threshold(OnFailure::Skip);
    let s = summary(&acts).expect("round closed");
    assert!(!s.updated);
    assert!(s.participants.is_empty(), "nothing unmasked: {s:?}");
    assert_eq!(s.strategy_metrics["secagg_failed"], 1.0);
    let not_unmasked = s
        .failures
        .iter()
        .filter(|f| matches!(f.reason, FailureReason::NotUnmasked(_)))
        .count();
    assert_eq!(not_unmasked, 2, "{s:?}");
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::UploadGlobal { round: 2 })));
}

#[test]
fn plain_updates_and_foreign_stage_messages_change_nothing() {
    let (mut r, train) = Round::start(OnFailure::Abort);
    let acts = r.ev(Event::UpdateReady {
        client: id(1),
        round: 1,
        blob: blob(r.keys.update(1, &id(1))),
        num_samples: 10,
        metrics: TrainMetrics::default(),
        report: BTreeMap::new(),
    });
    assert!(acts.is_empty(), "a plain update is never fetched: {acts:?}");
    let all: Vec<String> = (1..=5).map(id).collect();
    let acts = r.advertise(&train, &all);
    // A share notice under another client's key, and one for another round.
    let wrong = blob(r.keys.shares(1, &id(2)));
    let none = r.secure(
        &id(1),
        SecureMessage::Shares(crate::proto::SaShares { bundle: wrong }),
    );
    assert!(none.is_empty());
    let other_round = r.ev(Event::Secure {
        client: id(1),
        round: 7,
        msg: SecureMessage::Shares(crate::proto::SaShares {
            bundle: blob(r.keys.shares(7, &id(1))),
        }),
    });
    assert!(other_round.is_empty());
    let acts = r.run(acts, &all);
    let s = summary(&acts).expect("the round still completes");
    assert_eq!(s.participants.len(), 5);
}
