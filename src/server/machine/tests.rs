use super::*;
use crate::strategy::FedAvg;
use crate::tensor::NamedTensor;

const SEC: Duration = Duration::from_secs(1);

fn params(v: f32) -> ParamSet {
    ParamSet::new(vec![
        NamedTensor::new("w", vec![2], vec![v, 2.0 * v]).unwrap()
    ])
    .unwrap()
}

fn blob(key: &str) -> BlobRef {
    BlobRef {
        key: key.into(),
        len: 8,
        sha256: "00".repeat(32),
        wrapped_key: None,
    }
}

fn cfg(rounds: u64, per_round: usize) -> RoundConfig {
    RoundConfig {
        rounds,
        clients_per_round: per_round,
        min_clients: per_round,
        admission_timeout: Some(60 * SEC),
        round_timeout: 10 * SEC,
        quorum: 0.5,
        max_retries: 1,
        eval_every: 2,
        seed: 1,
        train: TrainConfig {
            model: "lr".into(),
            epochs: 1,
            batch_size: 32,
            optimizer: "sgd".into(),
            learning_rate: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
            seed: 0,
        },
        keys: BlobKeys::new("p", "run"),
        weighting: Weighting::Samples,
        secure: None,
        paced: false,
    }
}

fn caps(samples: u64) -> Capabilities {
    Capabilities {
        device: "cpu".into(),
        cores: 1,
        gpu: None,
        samples,
        version: "test".into(),
    }
}

/// A machine plus a clock, with helpers that drive it like the real driver would.
struct Harness {
    m: RoundMachine,
    now: Instant,
}

impl Harness {
    fn new(cfg: RoundConfig) -> Self {
        let now = Instant::now();
        Self {
            m: RoundMachine::new(cfg, Box::new(FedAvg::default()), params(0.0), now),
            now,
        }
    }
    fn ev(&mut self, e: Event) -> Vec<Action> {
        self.m.handle(e, self.now)
    }
    fn online(&mut self, ids: &[&str]) -> Vec<Action> {
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.ev(Event::ClientOnline {
                client: id.to_string(),
                capabilities: Some(caps(10_000)),
            }));
        }
        out
    }
    /// Uploads the global model of `round`; returns the clients that got a train command.
    fn upload(&mut self, round: u64) -> Vec<String> {
        let acts = self.ev(Event::GlobalUploaded {
            round,
            blob: blob(&format!("p/run/r{round:06}/global")),
        });
        trains(&acts)
    }
    /// A client announces and delivers an update equal to `params(v)`.
    fn report(&mut self, client: &str, round: u64, v: f32, samples: u64) -> Vec<Action> {
        let mut acts = self.ev(Event::UpdateReady {
            client: client.into(),
            round,
            blob: blob(&format!("p/run/r{round:06}/updates/{client}")),
            num_samples: samples,
            metrics: TrainMetrics {
                train_loss: 1.0,
                train_seconds: 0.1,
                eval: None,
            },
            report: Default::default(),
        });
        if acts
            .iter()
            .any(|a| matches!(a, Action::FetchUpdate { client: c, .. } if c == client))
        {
            acts.extend(self.ev(Event::UpdateFetched {
                client: client.into(),
                round,
                blob: params(v).to_safetensors_bytes().into(),
            }));
        }
        acts
    }
    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.ev(Event::Tick)
    }
}

fn trains(acts: &[Action]) -> Vec<String> {
    acts.iter()
        .filter_map(|a| match a {
            Action::SendTrain { client, .. } => Some(client.clone()),
            _ => None,
        })
        .collect()
}

fn closed(acts: &[Action]) -> Option<&RoundSummary> {
    acts.iter().find_map(|a| match a {
        Action::RoundClosed(s) => Some(s),
        _ => None,
    })
}

#[test]
fn admission_waits_for_enough_clients() {
    let mut h = Harness::new(cfg(1, 3));
    assert!(h.online(&["a", "b"]).is_empty());
    assert_eq!(h.online(&["c"]), vec![Action::UploadGlobal { round: 1 }]);
}

#[test]
fn happy_path_runs_every_round_and_averages() {
    let mut h = Harness::new(cfg(2, 2));
    h.online(&["a", "b"]);
    let sel = h.upload(1);
    assert_eq!(sel, vec!["a", "b"]);
    assert!(closed(&h.report("a", 1, 1.0, 1)).is_none());
    let acts = h.report("b", 1, 4.0, 2);
    let s = closed(&acts).expect("round closes when all reported");
    assert_eq!(s.participants, vec!["a", "b"]);
    assert!(s.failures.is_empty());
    assert_eq!(s.num_samples, 3);
    assert!(!s.evaluate, "eval_every is 2");
    assert!(acts.contains(&Action::UploadGlobal { round: 2 }));
    assert_eq!(h.m.global().get("w").unwrap().data(), &[3.0, 6.0]);

    h.upload(2);
    h.report("a", 2, 1.0, 1);
    let acts = h.report("b", 2, 1.0, 1);
    assert!(closed(&acts).unwrap().evaluate);
    assert_eq!(acts.last(), Some(&Action::Finish(Outcome::Completed)));
    assert!(h.m.is_finished());
}

#[test]
fn dead_client_becomes_a_failure_and_round_closes_with_quorum() {
    let mut h = Harness::new(cfg(1, 3));
    h.online(&["a", "b", "c"]);
    h.upload(1);
    h.report("a", 1, 1.0, 10);
    // c dies (its last will arrives) while b is still training: nothing closes yet.
    assert!(h.ev(Event::ClientOffline { client: "c".into() }).is_empty());
    // b reports: every selected client is accounted for and the quorum is met, so the round
    // closes without waiting for the deadline.
    let acts = h.report("b", 1, 1.0, 10);
    let s = closed(&acts).expect("closed");
    assert_eq!(s.participants, vec!["a", "b"]);
    assert_eq!(
        s.failures,
        vec![ClientFailure {
            client: "c".into(),
            reason: FailureReason::Disconnected
        }]
    );
    assert_eq!(acts.last(), Some(&Action::Finish(Outcome::Completed)));
}

#[test]
fn dead_client_that_returns_in_time_still_counts() {
    let mut h = Harness::new(cfg(1, 2));
    h.online(&["a", "b"]);
    h.upload(1);
    h.ev(Event::ClientOffline { client: "b".into() });
    h.online(&["b"]);
    h.report("b", 1, 1.0, 1);
    let acts = h.report("a", 1, 1.0, 1);
    assert_eq!(closed(&acts).unwrap().participants, vec!["a", "b"]);
}

#[test]
fn silent_client_times_out() {
    let mut h = Harness::new(cfg(1, 2));
    h.online(&["a", "b"]);
    h.upload(1);
    h.report("a", 1, 1.0, 10);
    let acts = h.advance(10 * SEC);
    let s = closed(&acts).unwrap();
    assert_eq!(s.failures[0].reason, FailureReason::Timeout);
}

#[test]
fn stale_duplicate_foreign_and_late_updates_are_ignored() {
    let mut h = Harness::new(cfg(2, 2));
    h.online(&["a", "b", "x"]);
    let sel = h.upload(1);
    let outsider = ["a", "b", "x"]
        .into_iter()
        .find(|c| !sel.contains(&c.to_string()))
        .unwrap();
    let (p, q) = (sel[0].clone(), sel[1].clone());
    // Not selected.
    assert!(h.report(outsider, 1, 9.0, 1).is_empty());
    h.report(&p, 1, 1.0, 1);
    // Duplicate notice (QoS 1 redelivery) of an update already folded in.
    assert!(h.report(&p, 1, 9.0, 1).is_empty());
    // A replayed notice of a future/other round.
    assert!(h.report(&q, 7, 9.0, 1).is_empty());
    h.report(&q, 1, 1.0, 1);
    h.upload(2);
    // A replayed round-1 message during round 2 changes nothing.
    assert!(h.report(&p, 1, 9.0, 1).is_empty());
    // Deadline passes with only p: quorum (1 of 2) reached, q times out; q's late update is
    // discarded.
    h.report(&p, 2, 1.0, 1);
    let acts = h.advance(10 * SEC);
    assert!(closed(&acts).is_some());
    assert!(h.report(&q, 2, 9.0, 1).is_empty());
    assert_eq!(h.m.global().get("w").unwrap().data(), &[1.0, 2.0]);
}

#[test]
fn update_announced_in_time_is_waited_for_after_the_deadline() {
    let mut h = Harness::new(cfg(1, 2));
    h.online(&["a", "b"]);
    h.upload(1);
    h.report("a", 1, 1.0, 1);
    let acts = h.ev(Event::UpdateReady {
        client: "b".into(),
        round: 1,
        blob: blob("p/run/r000001/updates/b"),
        num_samples: 1,
        metrics: TrainMetrics::default(),
        report: Default::default(),
    });
    assert!(matches!(acts[0], Action::FetchUpdate { .. }));
    assert!(
        closed(&h.advance(10 * SEC)).is_none(),
        "b is still downloading"
    );
    let acts = h.ev(Event::UpdateFetched {
        client: "b".into(),
        round: 1,
        blob: params(3.0).to_safetensors_bytes().into(),
    });
    assert_eq!(closed(&acts).unwrap().participants, vec!["a", "b"]);
}

#[test]
fn rejected_and_malformed_updates_are_failures() {
    let mut c = cfg(1, 3);
    c.quorum = 0.3;
    let mut h = Harness::new(c);
    h.online(&["a", "b", "c"]);
    h.upload(1);
    h.report("a", 1, 1.0, 1);
    h.ev(Event::UpdateReady {
        client: "b".into(),
        round: 1,
        blob: blob("p/run/r000001/updates/b"),
        num_samples: 1,
        metrics: TrainMetrics::default(),
        report: Default::default(),
    });
    h.ev(Event::UpdateRejected {
        client: "b".into(),
        round: 1,
        reason: "digest mismatch".into(),
    });
    // c sends parameters of the wrong shape.
    h.ev(Event::UpdateReady {
        client: "c".into(),
        round: 1,
        blob: blob("p/run/r000001/updates/c"),
        num_samples: 1,
        metrics: TrainMetrics::default(),
        report: Default::default(),
    });
    let bad = ParamSet::new(vec![NamedTensor::new("w", vec![3], vec![0.0; 3]).unwrap()]).unwrap();
    let acts = h.ev(Event::UpdateFetched {
        client: "c".into(),
        round: 1,
        blob: bad.to_safetensors_bytes().into(),
    });
    // Everyone is done and the quorum (1 of 3) is met: the round closes at once.
    let s = closed(&acts).expect("closed");
    assert_eq!(s.participants, vec!["a"]);
    let reasons: Vec<String> = s.failures.iter().map(|f| f.reason.to_string()).collect();
    assert_eq!(reasons.len(), 2);
    assert!(reasons[0].contains("digest mismatch"), "{reasons:?}");
    assert!(
        reasons[1].contains("does not match the global model"),
        "{reasons:?}"
    );
}

#[test]
fn missed_quorum_is_resent_then_aborted_with_a_reason() {
    let mut c = cfg(1, 2);
    c.quorum = 1.0;
    let mut h = Harness::new(c);
    h.online(&["a", "b"]);
    h.upload(1);
    h.report("a", 1, 1.0, 1);
    // b never answers: at the deadline the round is re-sent to b (still online).
    let acts = h.advance(10 * SEC);
    assert_eq!(trains(&acts), vec!["b"]);
    // Second deadline: max_retries (1) used up, the run aborts naming the failure.
    let acts = h.advance(10 * SEC);
    match acts.last() {
        Some(Action::Finish(Outcome::Aborted(msg))) => {
            assert!(msg.contains("only 1 of 2"), "{msg}");
            assert!(msg.contains("b: timeout"), "{msg}");
        }
        other => panic!("expected abort, got {other:?}"),
    }
}

#[test]
fn resend_recovers_when_the_client_answers() {
    let mut c = cfg(1, 2);
    c.quorum = 1.0;
    let mut h = Harness::new(c);
    h.online(&["a", "b"]);
    h.upload(1);
    h.report("a", 1, 1.0, 1);
    h.advance(10 * SEC);
    let acts = h.report("b", 1, 3.0, 1);
    let s = closed(&acts).unwrap();
    assert_eq!((s.participants.len(), s.retries, s.commands), (2, 1, 3));
}

#[test]
fn admission_timeout_aborts_with_advice() {
    let mut h = Harness::new(cfg(1, 3));
    h.online(&["a"]);
    let acts = h.advance(61 * SEC);
    match &acts[..] {
        [Action::Finish(Outcome::Aborted(msg))] => {
            assert!(msg.contains("only 1 of the 3"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn selection_is_seeded() {
    let run = || {
        let mut h = Harness::new(cfg(1, 3));
        h.online(&["a", "b", "c", "d", "e", "f"]);
        h.upload(1)
    };
    assert_eq!(run(), run());
}

/// Announces an update of `client` for `round` with the given key and claim; returns the actions.
fn notice(h: &mut Harness, client: &str, round: u64, key: &str, samples: u64) -> Vec<Action> {
    h.ev(Event::UpdateReady {
        client: client.into(),
        round,
        blob: blob(key),
        num_samples: samples,
        metrics: TrainMetrics::default(),
        report: Default::default(),
    })
}

fn failure_of<'a>(s: &'a RoundSummary, client: &str) -> Option<&'a FailureReason> {
    s.failures
        .iter()
        .find(|f| f.client == client)
        .map(|f| &f.reason)
}

#[test]
fn an_update_key_outside_the_run_or_of_another_client_is_refused() {
    let mut c = cfg(1, 3);
    c.quorum = 0.3;
    let mut h = Harness::new(c);
    h.online(&["a", "b", "c"]);
    h.upload(1);
    // A key outside the run's prefix, and b pointing at c's object: neither is fetched.
    let acts = notice(&mut h, "a", 1, "outside/evil", 10);
    assert!(
        !acts.iter().any(|a| matches!(a, Action::FetchUpdate { .. })),
        "{acts:?}"
    );
    let acts = notice(&mut h, "b", 1, "p/run/r000001/updates/c", 10);
    assert!(
        !acts.iter().any(|a| matches!(a, Action::FetchUpdate { .. })),
        "{acts:?}"
    );
    // A key of the right client but another round is refused too.
    let acts = h.report("c", 1, 2.0, 10);
    let s = closed(&acts).expect("c completes the round");
    assert_eq!(s.participants, vec!["c"]);
    for who in ["a", "b"] {
        match failure_of(s, who) {
            Some(FailureReason::BadUpdate(why)) => {
                assert!(why.contains("not its own update key"), "{why}")
            }
            other => panic!("{who}: {other:?}"),
        }
    }
    assert_eq!(h.m.global().get("w").unwrap().data(), &[2.0, 4.0]);
}

#[test]
fn a_key_of_the_wrong_round_is_refused() {
    let mut h = Harness::new(cfg(2, 1));
    h.online(&["a"]);
    h.upload(1);
    let acts = notice(&mut h, "a", 1, "p/run/r000002/updates/a", 10);
    assert!(!acts.iter().any(|a| matches!(a, Action::FetchUpdate { .. })));
}

#[test]
fn a_sample_claim_above_the_announced_count_is_clipped() {
    let mut h = Harness::new(cfg(1, 2));
    for (id, samples) in [("honest", 100), ("liar", 100)] {
        h.ev(Event::ClientOnline {
            client: id.into(),
            capabilities: Some(caps(samples)),
        });
    }
    h.upload(1);
    h.report("honest", 1, 1.0, 100);
    // Claims 1000 samples; weighted as 100 (what it announced), so the mean is 2.0, not ~2.8.
    let acts = h.report("liar", 1, 3.0, 1_000);
    let s = closed(&acts).unwrap();
    assert_eq!(s.num_samples, 200);
    assert_eq!(h.m.global().get("w").unwrap().data(), &[2.0, 4.0]);
}

#[test]
fn uniform_weighting_ignores_sample_counts() {
    let mut c = cfg(1, 2);
    c.weighting = Weighting::Uniform;
    let mut h = Harness::new(c);
    h.online(&["a", "b"]);
    h.upload(1);
    h.report("a", 1, 1.0, 10);
    let acts = h.report("b", 1, 4.0, 9_000);
    assert!(closed(&acts).is_some());
    assert_eq!(h.m.global().get("w").unwrap().data(), &[2.5, 5.0]);
}

#[test]
fn sample_weighting_refuses_a_client_that_announced_no_capabilities() {
    let mut c = cfg(1, 2);
    c.quorum = 0.5;
    let mut h = Harness::new(c);
    h.online(&["a"]);
    h.ev(Event::ClientOnline {
        client: "anon".into(),
        capabilities: None,
    });
    h.upload(1);
    h.report("a", 1, 1.0, 10);
    let acts = notice(&mut h, "anon", 1, "p/run/r000001/updates/anon", 10);
    let s = closed(&acts).expect("anon's refusal closes the round");
    match failure_of(s, "anon") {
        Some(FailureReason::BadUpdate(why)) => assert!(why.contains("capabilities"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_second_notice_is_ignored_and_the_first_counts() {
    let mut h = Harness::new(cfg(1, 2));
    h.online(&["a", "b"]);
    h.upload(1);
    // The first notice is being fetched when a second one (another id) arrives.
    let first = notice(&mut h, "a", 1, "p/run/r000001/updates/a", 10);
    assert!(matches!(first[..], [Action::FetchUpdate { .. }]));
    assert!(notice(&mut h, "a", 1, "p/run/r000001/updates/a", 50).is_empty());
    assert!(notice(&mut h, "a", 1, "outside/x", 50).is_empty());
    h.ev(Event::UpdateFetched {
        client: "a".into(),
        round: 1,
        blob: params(1.0).to_safetensors_bytes().into(),
    });
    let acts = h.report("b", 1, 1.0, 10);
    assert_eq!(closed(&acts).unwrap().num_samples, 20);
}

#[test]
fn an_update_announced_before_a_resumed_round_starts_is_kept() {
    // A restarted server resumes after round 1; a client's re-announced update for round 2
    // reaches it before the round opens (the broker delivers queued messages at once).
    let mut h = Harness::new(cfg(2, 2));
    h.m.resume(1, params(1.0));
    assert!(notice(&mut h, "a", 2, "p/run/r000002/updates/a", 10).is_empty());
    // A notice of another round is not kept.
    assert!(notice(&mut h, "b", 3, "p/run/r000003/updates/b", 10).is_empty());
    h.online(&["a", "b"]);
    let acts = h.ev(Event::GlobalUploaded {
        round: 2,
        blob: blob("p/run/r000002/global"),
    });
    let fetches: Vec<&str> = acts
        .iter()
        .filter_map(|a| match a {
            Action::FetchUpdate { client, .. } => Some(client.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(fetches, vec!["a"]);
}

#[test]
fn the_abort_names_the_cause_before_the_resend() {
    let mut c = cfg(1, 2);
    c.quorum = 1.0;
    let mut h = Harness::new(c);
    h.online(&["a", "b"]);
    h.upload(1);
    h.report("a", 1, 1.0, 10);
    let acts = h.ev(Event::ClientFailed {
        client: "b".into(),
        round: 1,
        reason: "uploading the update failed: store unreachable".into(),
    });
    assert!(
        trains(&acts).is_empty(),
        "b may still come back before the deadline"
    );
    // At the deadline the round is re-sent to b, which then stays silent.
    assert_eq!(trains(&h.advance(10 * SEC)), vec!["b"]);
    let acts = h.advance(10 * SEC);
    match acts.last() {
        Some(Action::Finish(Outcome::Aborted(msg))) => {
            assert!(msg.contains("store unreachable"), "{msg}");
        }
        other => panic!("expected abort, got {other:?}"),
    }
}

/// When every selected client reports that it failed (a diverged model makes every client's
/// training fail), the round is re-sent at once, and the run aborts once the retries are spent,
/// without waiting for deadlines nobody can meet.
#[test]
fn a_round_every_client_failed_is_resent_and_aborted_without_waiting() {
    let mut h = Harness::new(cfg(1, 2));
    h.online(&["a", "b"]);
    h.upload(1);
    let fail = |h: &mut Harness, c: &str| {
        h.ev(Event::ClientFailed {
            client: c.into(),
            round: 1,
            reason: "training diverged (train loss NaN)".into(),
        })
    };
    assert!(trains(&fail(&mut h, "a")).is_empty(), "b may still deliver");
    assert_eq!(trains(&fail(&mut h, "b")), vec!["a", "b"]);
    fail(&mut h, "a");
    let acts = fail(&mut h, "b");
    match acts.last() {
        Some(Action::Finish(Outcome::Aborted(msg))) => {
            assert!(msg.contains("training diverged"), "{msg}");
        }
        other => panic!("expected abort, got {other:?}"),
    }
}

/// Log lines (WARN and above) emitted while `f` runs.
fn warnings_of(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    text
}

#[test]
fn a_second_update_of_a_client_is_logged_at_warn_once_per_round() {
    let mut h = Harness::new(cfg(1, 2));
    h.online(&["a", "b"]);
    h.upload(1);
    h.report("a", 1, 1.0, 10);
    let logs = warnings_of(|| {
        for _ in 0..3 {
            assert!(notice(&mut h, "a", 1, "p/run/r000001/updates/a", 10).is_empty());
        }
    });
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("second update"))
        .collect();
    assert_eq!(lines.len(), 1, "{logs}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("client=a"),
        "{logs}"
    );
}

// Asynchronous runs (FedBuff): no round barrier.

fn buffered(rounds: u64, per_round: usize, buffer: usize, max_staleness: u64) -> Harness {
    let now = Instant::now();
    let strategy = crate::strategy::FedBuff::new(buffer, max_staleness, 1.0).unwrap();
    Harness {
        m: RoundMachine::new(cfg(rounds, per_round), Box::new(strategy), params(0.0), now),
        now,
    }
}

fn strategy_metric(s: &RoundSummary, name: &str) -> f64 {
    s.strategy_metrics[name]
}

#[test]
fn a_buffered_run_steps_every_k_updates_while_a_slow_client_trains_on() {
    let mut h = buffered(3, 3, 2, 10);
    assert_eq!(
        h.online(&["a", "b", "c"]),
        vec![Action::UploadGlobal { round: 1 }]
    );
    assert_eq!(h.upload(1), vec!["a", "b", "c"]);
    assert!(closed(&h.report("a", 1, 1.0, 10)).is_none());
    // a waits: it trained version 1 and there is no newer one.
    let acts = h.report("b", 1, 1.0, 10);
    let s = closed(&acts).expect("two updates close version 1; c is not waited for");
    assert_eq!(s.participants, vec!["a", "b"]);
    assert!(s.failures.is_empty());
    assert_eq!(strategy_metric(s, "max_staleness"), 0.0);
    assert!(acts.contains(&Action::UploadGlobal { round: 2 }));
    assert_eq!(h.m.global().get("w").unwrap().data(), &[1.0, 2.0]);
    assert_eq!(h.m.oldest_round_in_use(), 1, "c still trains version 1");

    // Version 2 goes to the idle clients only; c still trains version 1.
    assert_eq!(h.upload(2), vec!["a", "b"]);
    // c's update of version 1 counts, one version stale, and c gets version 2 at once.
    let acts = h.report("c", 1, 3.0, 10);
    assert!(closed(&acts).is_none());
    assert_eq!(trains(&acts), vec!["c"]);
    let acts = h.report("a", 2, 2.0, 10);
    let s = closed(&acts).expect("version 2 closes");
    assert_eq!(s.participants, vec!["a", "c"]);
    assert_eq!(strategy_metric(s, "max_staleness"), 1.0);
    assert_eq!(strategy_metric(s, "mean_staleness"), 0.5);
    // x₃ = x₂ + (Δ_c/√2 + Δ_a)/2, Δ_c = [3, 6] − x₁ = [3, 6], Δ_a = [2, 4] − x₂ = [1, 2].
    let r = std::f32::consts::FRAC_1_SQRT_2;
    let want = [1.0 + (3.0 * r + 1.0) / 2.0, 2.0 + (6.0 * r + 2.0) / 2.0];
    let got = h.m.global().get("w").unwrap().data().to_vec();
    assert!(
        got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6),
        "{got:?} vs {want:?}"
    );

    h.upload(3);
    h.report("b", 2, 2.0, 10);
    let acts = h.report("a", 3, 2.0, 10);
    assert!(closed(&acts).is_some());
    assert_eq!(acts.last(), Some(&Action::Finish(Outcome::Completed)));
}

#[test]
fn a_buffered_run_sends_each_version_to_a_client_once() {
    let mut h = buffered(1, 2, 3, 10);
    h.online(&["a", "b"]);
    assert_eq!(h.upload(1), vec!["a", "b"]);
    let acts = h.report("a", 1, 1.0, 10);
    assert!(trains(&acts).is_empty(), "a already trained version 1");
    // A second notice of the same update answers no command: ignored, not counted twice.
    assert!(notice(&mut h, "a", 1, "p/run/r000001/updates/a", 10).is_empty());
    assert!(
        closed(&h.report("b", 1, 1.0, 10)).is_none(),
        "2 of 3 buffered"
    );
}

#[test]
fn a_buffered_run_refuses_updates_beyond_the_staleness_bound() {
    let mut h = buffered(3, 3, 2, 0);
    h.online(&["a", "b", "c"]);
    h.upload(1);
    h.report("a", 1, 1.0, 10);
    h.report("b", 1, 1.0, 10);
    h.upload(2);
    let acts = h.report("c", 1, 1.0, 10);
    assert!(!acts.iter().any(|a| matches!(a, Action::FetchUpdate { .. })));
    h.report("a", 2, 1.0, 10);
    let acts = h.report("b", 2, 1.0, 10);
    let s = closed(&acts).expect("version 2 closes");
    match failure_of(s, "c") {
        Some(FailureReason::BadUpdate(why)) => {
            assert!(
                why.contains("1 versions behind") && why.contains("max_staleness"),
                "{why}"
            )
        }
        other => panic!("c: {other:?}"),
    }
}

#[test]
fn a_buffered_run_times_out_silent_clients_and_aborts_when_nothing_arrives() {
    let mut h = buffered(2, 2, 1, 10);
    h.online(&["a", "b"]);
    h.upload(1);
    // round_timeout 10 s: both commands expire; the clients wait for a next version.
    assert!(h.advance(11 * SEC).is_empty());
    assert_eq!(h.m.next_deadline(), Some(h.now + 9 * SEC));
    // round_timeout × (max_retries + 1) = 20 s without one update: abort with the causes.
    let acts = h.advance(10 * SEC);
    match acts.last() {
        Some(Action::Finish(Outcome::Aborted(why))) => {
            assert!(
                why.contains("no update arrived") && why.contains("a, b: timeout"),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_buffered_update_under_another_key_is_refused() {
    let mut h = buffered(1, 2, 1, 10);
    h.online(&["a", "b"]);
    h.upload(1);
    let acts = notice(&mut h, "a", 1, "p/run/r000001/updates/b", 10);
    assert!(!acts.iter().any(|a| matches!(a, Action::FetchUpdate { .. })));
    let acts = h.report("b", 1, 1.0, 10);
    let s = closed(&acts).unwrap();
    assert!(matches!(
        failure_of(s, "a"),
        Some(FailureReason::BadUpdate(_))
    ));
}

#[test]
fn failures_are_grouped_by_reason_and_long_lists_counted() {
    let mut failed = BTreeMap::new();
    for i in 0..943 {
        failed.insert(
            format!("client-{i:03}"),
            FailureReason::Reported("training diverged".into()),
        );
    }
    failed.insert("late".into(), FailureReason::Timeout);
    let mut earlier = BTreeMap::new();
    earlier.insert("late".to_string(), FailureReason::Disconnected);
    let msg = describe_failures(&failed, &earlier);
    assert!(msg.len() < 300, "{msg}");
    assert!(
        msg.contains("client-000, client-001, client-002, client-003, client-004 and 938 more"),
        "{msg}"
    );
    assert!(msg.contains("late: "), "{msg}");
    assert!(msg.contains("before the re-send"), "{msg}");
    failed.retain(|c, _| c == "client-007" || c == "client-008");
    let two = describe_failures(&failed, &BTreeMap::new());
    assert!(two.starts_with("client-007, client-008: "), "{two}");
    assert_eq!(
        describe_failures(&BTreeMap::new(), &BTreeMap::new()),
        "none"
    );
}

/// A paced machine (an edge's site) with two clients, quorum 1: rounds only on `Upstream`.
fn paced() -> Harness {
    let mut c = cfg(u64::MAX, 2);
    c.paced = true;
    c.quorum = 1.0;
    Harness::new(c)
}

fn upstream(h: &mut Harness, v: f32, lr: f64) -> Vec<Action> {
    let mut train = h.m.cfg.train.clone();
    train.learning_rate = lr;
    h.ev(Event::Upstream {
        global: params(v),
        train: Some(train),
    })
}

#[test]
fn a_paced_machine_starts_rounds_only_from_its_upstream_and_waits_between_them() {
    let mut h = paced();
    assert!(
        h.online(&["a", "b"]).is_empty(),
        "clients alone start nothing"
    );
    // Past the admission timeout with its clients online: it waits for its upstream.
    assert!(h.advance(120 * SEC).is_empty());
    assert!(!h.m.is_finished());
    let acts = upstream(&mut h, 4.0, 0.25);
    assert_eq!(acts, vec![Action::UploadGlobal { round: 1 }]);
    assert_eq!(
        h.m.global(),
        &params(4.0),
        "the round starts from the upstream's model"
    );
    let acts = h.ev(Event::GlobalUploaded {
        round: 1,
        blob: blob("p/run/r000001/global"),
    });
    let lrs: Vec<f64> = acts
        .iter()
        .filter_map(|a| match a {
            Action::SendTrain { config, .. } => Some(config.learning_rate),
            _ => None,
        })
        .collect();
    assert_eq!(
        lrs,
        vec![0.25, 0.25],
        "the upstream's settings go to the clients"
    );
    h.report("a", 1, 1.0, 10);
    let acts = h.report("b", 1, 3.0, 30);
    let s = closed(&acts).expect("closed");
    assert_eq!(s.num_samples, 40);
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::UploadGlobal { .. } | Action::Finish(_))),
        "no next round without the upstream: {acts:?}"
    );
    assert_eq!(h.m.global(), &params(2.5), "(1·10 + 3·30) / 40");
    assert_eq!(h.m.current_round(), None);
    assert_eq!(
        h.m.next_deadline(),
        None,
        "nothing to time out while waiting"
    );
    // The next upstream round starts at once, numbered on.
    assert_eq!(
        upstream(&mut h, 0.0, 0.1),
        vec![Action::UploadGlobal { round: 2 }]
    );
    assert_eq!(h.m.global(), &params(0.0));
}

#[test]
fn a_paced_round_that_misses_its_quorum_fails_without_ending_the_run() {
    let mut h = paced();
    h.online(&["a", "b"]);
    upstream(&mut h, 1.0, 0.1);
    h.upload(1);
    h.report("a", 1, 2.0, 10);
    // b never answers: deadline, one re-send (max_retries 1), deadline again.
    h.advance(11 * SEC);
    let acts = h.advance(11 * SEC);
    let failed = acts.iter().find_map(|a| match a {
        Action::RoundFailed { round, reason } => Some((*round, reason.clone())),
        _ => None,
    });
    let (round, reason) = failed.expect("the round failed");
    assert_eq!(round, 1);
    assert!(reason.contains("quorum"), "{reason}");
    assert!(
        !acts.iter().any(|a| matches!(a, Action::Finish(_))),
        "{acts:?}"
    );
    assert!(!h.m.is_finished());
    assert_eq!(h.m.global(), &params(1.0), "the model is unchanged");
    // The next upstream round goes on with a fresh number.
    assert_eq!(
        upstream(&mut h, 1.0, 0.1),
        vec![Action::UploadGlobal { round: 2 }]
    );
}

#[test]
fn an_upstream_round_during_a_round_waits_for_it_and_the_upstream_ends_the_run() {
    let mut h = paced();
    // Before the clients: kept until they come.
    assert!(upstream(&mut h, 1.0, 0.1).is_empty());
    assert_eq!(
        h.online(&["a", "b"]),
        vec![Action::UploadGlobal { round: 1 }]
    );
    h.upload(1);
    // The next one arrives while round 1 trains: started when it closes.
    assert!(upstream(&mut h, 7.0, 0.1).is_empty());
    h.report("a", 1, 1.0, 10);
    let acts = h.report("b", 1, 1.0, 10);
    assert!(closed(&acts).is_some());
    assert!(
        acts.contains(&Action::UploadGlobal { round: 2 }),
        "{acts:?}"
    );
    assert_eq!(
        h.m.global(),
        &params(7.0),
        "round 2 starts from the newer model"
    );
    let acts = h.ev(Event::UpstreamFinished {
        outcome: Outcome::Completed,
    });
    assert_eq!(acts, vec![Action::Finish(Outcome::Completed)]);
    assert!(h.m.is_finished());
}

#[test]
fn an_unpaced_machine_still_aborts_on_a_missed_quorum() {
    let mut h = Harness::new({
        let mut c = cfg(3, 2);
        c.quorum = 1.0;
        c
    });
    h.online(&["a", "b"]);
    h.upload(1);
    h.report("a", 1, 2.0, 10);
    h.advance(11 * SEC);
    let acts = h.advance(11 * SEC);
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Finish(Outcome::Aborted(_)))),
        "{acts:?}"
    );
}
