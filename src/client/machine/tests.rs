//! Every case the client handles, without sockets: commands are envelopes, time is a number.

use super::*;
use crate::proto::{Failure, Finish, Presence, Status, TrainConfig, TrainMetrics, Update};

const RUN: &str = "run-1";
const ME: &str = "client-1";
/// "Now" in these tests (Unix ms).
const NOW: u64 = 1_000_000;

fn machine() -> ClientMachine {
    ClientMachine::new(ME, NOW - 10_000)
}

fn blob(key: &str) -> BlobRef {
    BlobRef {
        key: key.into(),
        len: 4,
        sha256: "00".repeat(32),
        wrapped_key: None,
    }
}

fn train_env(round: u64, deadline_ms: u64) -> Envelope {
    Envelope::new(
        RUN,
        round,
        crate::proto::SERVER_ID,
        Body::Train(Train {
            global: blob(&format!("fedmq/{RUN}/r{round:06}/global")),
            config: TrainConfig {
                model: "lr".into(),
                epochs: 1,
                batch_size: 32,
                optimizer: "sgd".into(),
                learning_rate: 0.1,
                momentum: 0.0,
                weight_decay: 0.0,
                seed: round,
            },
            strategy: None,
            deadline_ms,
            secagg: None,
        }),
    )
}

fn command(env: Envelope) -> Event {
    Event::Message {
        kind: TopicKind::Command(ME.into()),
        env: Box::new(env),
        retained: false,
    }
}

fn train(round: u64) -> Event {
    command(train_env(round, NOW + 60_000))
}

fn server_online(window_ms: Option<u64>) -> Event {
    Event::Message {
        kind: TopicKind::Status(crate::proto::SERVER_ID.into()),
        env: Box::new(Envelope::new(
            RUN,
            0,
            crate::proto::SERVER_ID,
            Body::Status(Status {
                state: Presence::Online,
                role: Role::Server,
                capabilities: None,
                announce_window_ms: window_ms,
            }),
        )),
        retained: true,
    }
}

fn finish_env(ts_ms: u64) -> Envelope {
    let mut env = Envelope::new(
        RUN,
        0,
        crate::proto::SERVER_ID,
        Body::Finish(Finish {
            reason: "completed".into(),
            final_model: Some(blob(&format!("fedmq/{RUN}/final"))),
        }),
    );
    env.ts_ms = ts_ms;
    env
}

fn update_env(round: u64) -> Envelope {
    Envelope::new(
        RUN,
        round,
        ME,
        Body::Update(Update {
            update: blob(&format!("fedmq/{RUN}/r{round:06}/updates/{ME}")),
            num_samples: 10,
            metrics: TrainMetrics::default(),
            report: Default::default(),
        }),
    )
}

fn reported(round: u64) -> (Event, Envelope) {
    let env = update_env(round);
    (
        Event::JobDone {
            round,
            outcome: JobOutcome::Reported(Box::new(env.clone())),
        },
        env,
    )
}

fn trains(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Train { round, .. } => Some(*round),
            _ => None,
        })
        .collect()
}

#[test]
fn a_train_command_starts_training_and_its_duplicate_is_dropped() {
    let mut m = machine();
    let env = train_env(1, NOW + 60_000);
    let acts = m.handle(command(env.clone()), NOW);
    assert_eq!(trains(&acts), [1]);
    assert_eq!(m.current_round(), Some(1));
    // The same message again (a QoS 1 re-delivery): dropped, even once the round is done.
    assert!(m.handle(command(env.clone()), NOW).is_empty());
    m.handle(reported(1).0, NOW);
    assert!(m.handle(command(env), NOW).is_empty());
}

#[test]
fn the_round_in_progress_and_older_rounds_are_not_trained_again() {
    let mut m = machine();
    m.handle(train(3), NOW);
    // A re-sent command for the round being trained (new id): ignored.
    assert!(m.handle(train(3), NOW).is_empty());
    // An older round: stale.
    assert!(m.handle(train(2), NOW).is_empty());
    m.handle(reported(3).0, NOW);
    assert!(m.handle(train(1), NOW).is_empty());
    assert_eq!(m.rounds_reported(), 1);
}

#[test]
fn a_newer_round_interrupts_the_one_in_progress() {
    let mut m = machine();
    m.handle(train(1), NOW);
    let acts = m.handle(train(2), NOW);
    assert_eq!(acts[0], Action::Interrupt { round: 1 });
    assert_eq!(trains(&acts), [2]);
    // The interrupted round ending later does not clear the new one.
    m.handle(
        Event::JobDone {
            round: 1,
            outcome: JobOutcome::Interrupted,
        },
        NOW,
    );
    assert_eq!(m.current_round(), Some(2));
    assert_eq!(m.rounds_reported(), 0);
}

#[test]
fn a_command_past_its_deadline_is_ignored() {
    let mut m = machine();
    assert!(m.handle(command(train_env(1, NOW)), NOW).is_empty());
    assert!(m.handle(command(train_env(1, NOW - 1)), NOW).is_empty());
    assert_eq!(m.current_round(), None);
    // The same round with a deadline ahead is trained.
    assert_eq!(trains(&m.handle(train(1), NOW)), [1]);
}

#[test]
fn a_round_already_trained_is_announced_again_never_trained_twice() {
    let mut m = machine();
    m.handle(train(4), NOW);
    let (done, env) = reported(4);
    m.handle(done, NOW);
    let acts = m.handle(train(4), NOW);
    assert_eq!(acts, [Action::Publish(Box::new(env))]);
    assert_eq!(m.current_round(), None);
}

#[test]
fn a_round_that_failed_here_is_trained_again_when_re_sent() {
    let mut m = machine();
    m.handle(train(2), NOW);
    m.handle(
        Event::JobDone {
            round: 2,
            outcome: JobOutcome::Failed,
        },
        NOW,
    );
    assert_eq!(trains(&m.handle(train(2), NOW)), [2]);
}

#[test]
fn a_restarted_server_gets_the_client_and_its_latest_update_announced_again() {
    let mut m = machine();
    // The first server status (retained from before this client started): nothing to do.
    assert!(m.handle(server_online(Some(5_000)), NOW).is_empty());
    m.handle(train(1), NOW);
    let (done, env) = reported(1);
    m.handle(done, NOW);
    // A new server status: re-announce, with the update of the latest round.
    let acts = m.handle(server_online(Some(5_000)), NOW);
    assert_eq!(
        acts,
        [Action::Reannounce {
            window_ms: 5_000,
            update: Some(Box::new(env)),
        }]
    );
    // While a round trains, its update is announced when done: presence only. The window is
    // capped.
    m.handle(train(2), NOW);
    let acts = m.handle(server_online(Some(10 * MAX_ANNOUNCE_WINDOW_MS)), NOW);
    assert_eq!(
        acts,
        [Action::Reannounce {
            window_ms: MAX_ANNOUNCE_WINDOW_MS,
            update: None,
        }]
    );
    // Round 2 interrupted: the latest update (round 1) is not for the latest round asked.
    m.handle(
        Event::JobDone {
            round: 2,
            outcome: JobOutcome::Interrupted,
        },
        NOW,
    );
    let acts = m.handle(server_online(None), NOW);
    assert_eq!(
        acts,
        [Action::Reannounce {
            window_ms: 0,
            update: None,
        }]
    );
}

#[test]
fn finish_stops_the_client_and_interrupts_its_work() {
    let mut m = machine();
    m.handle(train(5), NOW);
    let acts = m.handle(command(finish_env(NOW)), NOW);
    assert_eq!(acts[0], Action::Interrupt { round: 5 });
    assert!(
        matches!(&acts[1], Action::Stop { reason, final_model: Some(_) } if reason == "completed")
    );
}

#[test]
fn a_finish_kept_by_the_broker_from_an_earlier_run_is_ignored() {
    let mut m = machine();
    let old = Event::Message {
        kind: TopicKind::Command(ME.into()),
        env: Box::new(finish_env(NOW - 20_000)),
        retained: true,
    };
    assert!(m.handle(old, NOW).is_empty());
    // Retained but sent after this client started: this run's finish.
    let current = Event::Message {
        kind: TopicKind::Command(ME.into()),
        env: Box::new(finish_env(NOW - 1_000)),
        retained: true,
    };
    assert!(matches!(m.handle(current, NOW)[..], [Action::Stop { .. }]));
}

#[test]
fn messages_of_the_wrong_kind_or_topic_are_ignored() {
    let mut m = machine();
    // A train command on a status topic, a failure on the command topic, a client's status.
    let odd = [
        Event::Message {
            kind: TopicKind::Status(crate::proto::SERVER_ID.into()),
            env: Box::new(train_env(1, NOW + 60_000)),
            retained: false,
        },
        command(Envelope::new(
            RUN,
            1,
            crate::proto::SERVER_ID,
            Body::Failure(Failure { reason: "x".into() }),
        )),
        Event::Message {
            kind: TopicKind::Status("client-2".into()),
            env: Box::new(Envelope::new(
                RUN,
                0,
                "client-2",
                Body::Status(Status {
                    state: Presence::Online,
                    role: Role::Client,
                    capabilities: None,
                    announce_window_ms: None,
                }),
            )),
            retained: false,
        },
    ];
    for e in odd {
        assert!(m.handle(e, NOW).is_empty());
    }
    assert_eq!(m.current_round(), None);
}
