//! The client's protocol logic as a sans-IO state machine: `(event, now) → actions`, like the
//! server's round machine. It decides which commands to follow; the async driver in `mod.rs`
//! decodes and authenticates messages, runs the work each [`Action`] names (training in a
//! blocking thread, publishing, re-announcing) and feeds back what happened.
//!
//! # Rules
//! - A message seen before (same sender and id: a QoS 1 duplicate) is dropped.
//! - `train` for round `r`: ignored when `r` is older than the last round accepted, when `r` is
//!   being trained, or when its deadline has passed. When `r` was already trained, the update
//!   already sent is announced again instead (never trained twice), so a lost notice is recovered
//!   by the server's re-send; when `r` failed here (the store was down, say), a re-sent command
//!   trains it again. A newer round interrupts the round in progress.
//! - The server's `status` online, after a first one (often retained from before this client
//!   started): the server restarted or reconnected, so the client announces itself again and
//!   re-announces its latest update when that is for the latest round it was asked to train and
//!   no round is in progress, after a random delay within the status' `announce_window_ms`
//!   (capped at [`MAX_ANNOUNCE_WINDOW_MS`]).
//! - `sa_roster`, `sa_collect`, `sa_unmask` (secure aggregation's stages): passed to the work of
//!   the round they name when that round is in progress here; ignored otherwise.
//! - `finish`: stop. A finish retained by the broker from before this client started (an earlier
//!   run's) is ignored.

use crate::proto::{self, BlobRef, Body, Envelope, Role, TopicKind, Train};
use crate::transport::Dedup;
use tracing::{debug, info};

/// Longest delay before a re-announcement, whatever the server asks (a bound on how long a
/// forged or mistaken window can keep a client quiet).
pub const MAX_ANNOUNCE_WINDOW_MS: u64 = 60_000;

/// What the client machine is told.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message on one of the client's topics, decoded and authenticated by the driver.
    Message {
        /// Which topic it came on.
        kind: TopicKind,
        /// The message.
        env: Box<Envelope>,
        /// Whether the broker delivered it as a retained message.
        retained: bool,
    },
    /// The work of a round ended.
    JobDone {
        /// The round.
        round: u64,
        /// How.
        outcome: JobOutcome,
    },
}

/// How a round's work ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// The update was stored and announced with this message.
    Reported(Box<Envelope>),
    /// It failed here (the failure was reported to the server).
    Failed,
    /// A securely aggregated round ended here (masked input and shares sent). Nothing is kept
    /// to announce again: a re-sent command for the round trains it again, in a new session.
    SecureDone,
    /// A newer round or the end of the run interrupted it.
    Interrupted,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Train round `round` as `train` says (download, train, upload, announce), then send
    /// [`Event::JobDone`].
    Train {
        /// The round.
        round: u64,
        /// The command.
        train: Box<Train>,
    },
    /// Pass a secure-aggregation stage message to the work of round `round`.
    Stage {
        /// The round.
        round: u64,
        /// The message.
        env: Box<Envelope>,
    },
    /// Interrupt the work of round `round`.
    Interrupt {
        /// The round.
        round: u64,
    },
    /// Publish this message on the client's `up` topic (an update announced again).
    Publish(Box<Envelope>),
    /// After a random delay of at most `window_ms`, publish the client's online status again,
    /// then `update` if any.
    Reannounce {
        /// Upper bound of the delay.
        window_ms: u64,
        /// The latest update, to announce again.
        update: Option<Box<Envelope>>,
    },
    /// The run is over for this client.
    Stop {
        /// The server's finish reason.
        reason: String,
        /// The final model the server announced.
        final_model: Option<BlobRef>,
    },
}

/// The client's protocol state.
#[derive(Debug)]
pub struct ClientMachine {
    id: String,
    /// Unix ms when the client started: older retained finishes are an earlier run's.
    started_ms: u64,
    dedup: Dedup,
    /// The round being trained.
    current: Option<u64>,
    /// Highest round a command was accepted for; older commands are stale.
    last_round: u64,
    /// The latest update announced.
    last_update: Option<Envelope>,
    rounds_reported: u64,
    /// Whether a server online status was seen yet.
    seen_server: bool,
}

impl ClientMachine {
    /// The machine of client `id`, started at `started_ms` (Unix ms).
    pub fn new(id: &str, started_ms: u64) -> Self {
        Self {
            id: id.to_string(),
            started_ms,
            dedup: Dedup::default(),
            current: None,
            last_round: 0,
            last_update: None,
            rounds_reported: 0,
            seen_server: false,
        }
    }

    /// Rounds trained and reported so far.
    pub fn rounds_reported(&self) -> u64 {
        self.rounds_reported
    }

    /// The round being trained, if any.
    pub fn current_round(&self) -> Option<u64> {
        self.current
    }

    /// Feeds one event at `now_ms` (Unix ms); returns what to do, in order.
    pub fn handle(&mut self, event: Event, now_ms: u64) -> Vec<Action> {
        match event {
            Event::JobDone { round, outcome } => {
                if self.current == Some(round) {
                    self.current = None;
                }
                match outcome {
                    JobOutcome::Reported(env) => {
                        self.rounds_reported += 1;
                        self.last_update = Some(*env);
                    }
                    JobOutcome::SecureDone => self.rounds_reported += 1,
                    JobOutcome::Failed | JobOutcome::Interrupted => {}
                }
                Vec::new()
            }
            Event::Message {
                kind,
                env,
                retained,
            } => {
                if !self.dedup.first_time(&env) {
                    debug!(id = %env.id, "duplicate dropped");
                    return Vec::new();
                }
                self.on_message(kind, *env, retained, now_ms)
            }
        }
    }

    fn on_message(
        &mut self,
        kind: TopicKind,
        env: Envelope,
        retained: bool,
        now_ms: u64,
    ) -> Vec<Action> {
        let round = env.round;
        if matches!(kind, TopicKind::Command(_))
            && matches!(
                env.body,
                Body::SaRoster(_) | Body::SaCollect(_) | Body::SaUnmask(_)
            )
        {
            if self.current != Some(round) {
                debug!(
                    client = %self.id, round, kind = env.body.kind(),
                    "stage message of a round not in progress here ignored"
                );
                return Vec::new();
            }
            return vec![Action::Stage {
                round,
                env: Box::new(env),
            }];
        }
        match (kind, env.body) {
            (TopicKind::Status(_), Body::Status(s)) => {
                info!(state = ?s.state, "server status");
                if !(s.state == proto::Presence::Online && s.role == Role::Server) {
                    return Vec::new();
                }
                if !std::mem::replace(&mut self.seen_server, true) {
                    // The first one: this client has just announced itself.
                    return Vec::new();
                }
                // The latest update, unless a round is in progress (its update will be
                // announced when done) or a newer round was asked for.
                let update = self
                    .last_update
                    .as_ref()
                    .filter(|e| self.current.is_none() && e.round == self.last_round)
                    .cloned()
                    .map(Box::new);
                info!(
                    client = %self.id,
                    update_round = update.as_ref().map(|e| e.round),
                    "the server (re)connected; announcing this client again"
                );
                vec![Action::Reannounce {
                    window_ms: s
                        .announce_window_ms
                        .unwrap_or(0)
                        .min(MAX_ANNOUNCE_WINDOW_MS),
                    update,
                }]
            }
            (TopicKind::Command(_), Body::Train(train)) => self.on_train(round, train, now_ms),
            (TopicKind::Command(_), Body::Finish(f)) => {
                if retained && env.ts_ms < self.started_ms {
                    info!(
                        reason = %f.reason,
                        "a finish kept by the broker from an earlier run was ignored; waiting for the server"
                    );
                    return Vec::new();
                }
                let mut out = Vec::new();
                if let Some(r) = self.current.take() {
                    out.push(Action::Interrupt { round: r });
                }
                out.push(Action::Stop {
                    reason: f.reason,
                    final_model: f.final_model,
                });
                out
            }
            _ => Vec::new(),
        }
    }

    fn on_train(&mut self, round: u64, train: Train, now_ms: u64) -> Vec<Action> {
        let id = &self.id;
        if round < self.last_round || self.current.is_some_and(|r| r >= round) {
            info!(client = %id, round, last_round = self.last_round, "stale or duplicate train command ignored");
            return Vec::new();
        }
        if round == self.last_round && self.current.is_none() {
            // Trained already: announce the same update again (the server drops it if it has
            // it), never train twice. A round that failed here is trained again (below).
            if let Some(env) = self.last_update.as_ref().filter(|e| e.round == round) {
                info!(client = %id, round, "round already trained; update announced again");
                return vec![Action::Publish(Box::new(env.clone()))];
            }
            info!(client = %id, round, "round re-sent after a failure here; training it again");
        }
        if train.deadline_ms <= now_ms {
            info!(client = %id, round, "train command past its deadline ignored");
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(old) = self.current.take() {
            info!(client = %id, old, round, "newer round: interrupting the old one");
            out.push(Action::Interrupt { round: old });
        }
        debug!(client = %id, round, "training");
        self.last_round = round;
        self.current = Some(round);
        out.push(Action::Train {
            round,
            train: Box::new(train),
        });
        out
    }
}

#[cfg(test)]
mod tests;
