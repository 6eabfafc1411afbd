//! Asynchronous rounds for buffered strategies (FedBuff, [`Strategy::buffered`]): no round
//! barrier.
//!
//! A "round" here is one model version. Its global model is stored once (`UploadGlobal`); from
//! then on every idle online client gets a train command for it, up to `client_num_per_round`
//! clients at work at once. An update is accepted when it answers the client's outstanding
//! command (same round), under its own key, at most `max_staleness` versions behind; it is folded
//! at once (an update of an older version with [`RoundAggregate::add_stale`]) and the client is
//! idle again: it gets the newest model as soon as there is one it has not trained (an update key
//! names one round and one client, so a client trains each version at most once). Every `buffer`
//! updates the round closes (`RoundClosed`, the strategy's step) and the next version is stored;
//! clients still training on older versions go on, and their updates count, weighted down by the
//! strategy.
//!
//! A client whose command timed out, that failed or whose update was refused waits for the next
//! version (no hot loop on a client that always fails). The run aborts when no update at all was
//! folded for `round_timeout × (max_retries + 1)`.

use super::{
    weigh, Action, ClientFailure, Event, FailureReason, Notice, Outcome, Pending, Phase,
    RoundConfig, RoundMachine, RoundSummary,
};
use crate::proto::BlobRef;
use crate::strategy::{Buffered, RoundAggregate};
use crate::tensor::ParamsView;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;
use tracing::{debug, info, warn};

/// State of an asynchronous run.
pub(super) struct BufferState {
    schedule: Buffered,
    /// The newest model version (the round the buffer closes next).
    pub(super) version: u64,
    /// Its stored global model; `None` while it is being stored.
    global: Option<BlobRef>,
    /// Clients with a train command out: the version they train and its deadline.
    outstanding: BTreeMap<String, (u64, Instant)>,
    /// Updates being fetched: client → (version, what it claimed).
    fetching: BTreeMap<String, (u64, Pending)>,
    aggregate: Box<dyn RoundAggregate>,
    /// Updates folded into this round's buffer: (client, samples, loss); a client can appear
    /// twice (a stale update and one of the current version).
    reported: Vec<(String, u64, f64)>,
    /// The reporting clients' own evaluations, summed.
    evals: super::EvalSums,
    failed: BTreeMap<String, FailureReason>,
    /// Clients not to be sent the current version (again): those sent it already, and those
    /// that timed out, failed or were refused on an older one. They wait for the next version.
    cooldown: BTreeSet<String>,
    started: Instant,
    commands: usize,
    /// Last time an update was folded (or the run started).
    last_progress: Instant,
}

impl BufferState {
    pub(super) fn next_deadline(&self, cfg: &RoundConfig) -> Instant {
        let stall = self.last_progress + cfg.round_timeout * (cfg.max_retries + 1);
        self.outstanding
            .values()
            .map(|(_, d)| *d)
            .min()
            .map_or(stall, |d| d.min(stall))
    }

    pub(super) fn oldest_in_use(&self) -> u64 {
        self.outstanding
            .values()
            .map(|(v, _)| *v)
            .chain(self.fetching.values().map(|(v, _)| *v))
            .min()
            .unwrap_or(self.version)
            .min(self.version)
    }
}

impl RoundMachine {
    pub(super) fn begin_buffered(
        &mut self,
        version: u64,
        schedule: Buffered,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let aggregate = self.strategy.begin_round(version, &self.global);
        info!(
            version,
            buffer = schedule.buffer,
            max_staleness = schedule.max_staleness,
            "asynchronous run: a server step every {} updates",
            schedule.buffer
        );
        self.upload_started = Some(now);
        self.phase = Phase::Buffered(Box::new(BufferState {
            schedule,
            version,
            global: None,
            outstanding: BTreeMap::new(),
            fetching: BTreeMap::new(),
            aggregate,
            reported: Vec::new(),
            evals: super::EvalSums::default(),
            failed: BTreeMap::new(),
            cooldown: BTreeSet::new(),
            started: now,
            commands: 0,
            last_progress: now,
        }));
        out.push(Action::UploadGlobal { round: version });
    }

    pub(super) fn handle_buffered(&mut self, event: Event, now: Instant, out: &mut Vec<Action>) {
        match event {
            Event::ClientOnline {
                client,
                capabilities,
            } => {
                self.clients.insert(
                    client,
                    super::ClientEntry {
                        online: true,
                        capabilities,
                    },
                );
            }
            Event::ClientOffline { client } => {
                if let Some(c) = self.clients.get_mut(&client) {
                    c.online = false;
                }
                let b = self.buffer_mut();
                if b.outstanding.remove(&client).is_some() {
                    info!(%client, "client at work went offline");
                    b.failed.insert(client, FailureReason::Disconnected);
                }
            }
            Event::GlobalUploaded { round, blob } => {
                let b = self.buffer_mut();
                if round == b.version && b.global.is_none() {
                    b.global = Some(blob);
                }
            }
            Event::GlobalUploadFailed { round, reason } => {
                if round == self.buffer_mut().version {
                    self.finish(
                        Outcome::Aborted(format!(
                            "round {round}: storing the global model failed: {reason}; check the \
                             object store (comm_args.customized_training_s3_config)"
                        )),
                        out,
                    );
                    return;
                }
            }
            Event::UpdateReady {
                client,
                round,
                blob,
                num_samples,
                metrics,
                report,
            } => {
                let notice = Notice {
                    round,
                    blob,
                    num_samples,
                    metrics,
                    report,
                };
                self.on_buffered_update(client, notice, out);
            }
            Event::UpdateFetched {
                client,
                round,
                blob,
            } => self.fold(client, round, &blob, now),
            Event::UpdateRejected {
                client,
                round,
                reason,
            } => {
                let b = self.buffer_mut();
                if b.fetching.get(&client).is_some_and(|(v, _)| *v == round) {
                    b.fetching.remove(&client);
                    warn!(%client, round, "update rejected: {reason}");
                    b.cooldown.insert(client.clone());
                    b.failed.insert(client, FailureReason::BadUpdate(reason));
                }
            }
            Event::ClientFailed {
                client,
                round,
                reason,
            } => {
                let b = self.buffer_mut();
                if b.outstanding.get(&client).is_some_and(|(v, _)| *v == round) {
                    b.outstanding.remove(&client);
                    warn!(%client, round, "client failed: {reason}");
                    b.cooldown.insert(client.clone());
                    b.failed.insert(client, FailureReason::Reported(reason));
                }
            }
            Event::Secure { client, .. } | Event::BundleFetched { client, .. } => {
                debug!(%client, "secure-aggregation message in an asynchronous run ignored");
            }
            // An edge's site is never asynchronous (its config is FedAvg's).
            Event::Upstream { .. } => debug!("upstream round in an asynchronous run ignored"),
            Event::UpstreamFinished { outcome } => self.finish(outcome, out),
            Event::Tick => {
                let stall = self.cfg.round_timeout * (self.cfg.max_retries + 1);
                let b = self.buffer_mut();
                let late: Vec<String> = b
                    .outstanding
                    .iter()
                    .filter(|(_, (_, d))| now >= *d)
                    .map(|(c, _)| c.clone())
                    .collect();
                for c in late {
                    b.outstanding.remove(&c);
                    b.cooldown.insert(c.clone());
                    b.failed.insert(c, FailureReason::Timeout);
                }
                if now >= b.last_progress + stall {
                    let msg = format!(
                        "round {}: no update arrived for {stall:?} ({} of {} buffered); failures: \
                         {}. Check that clients are online and that fedmq_args.round_timeout_s \
                         is long enough for local training",
                        b.version,
                        b.aggregate.count(),
                        b.schedule.buffer,
                        super::describe_failures(&b.failed, &BTreeMap::new())
                    );
                    self.finish(Outcome::Aborted(msg), out);
                    return;
                }
            }
        }
        // A full buffer closes the round once its model is stored (it may have filled while
        // the model was being stored); then idle clients get the newest model.
        self.maybe_step(now, out);
        if matches!(self.phase, Phase::Buffered(_)) {
            self.dispatch(now, out);
        }
    }

    fn buffer_mut(&mut self) -> &mut BufferState {
        match &mut self.phase {
            Phase::Buffered(b) => b,
            _ => unreachable!("handle_buffered runs in the buffered phase only"),
        }
    }

    /// Sends the newest model to idle online clients, up to `client_num_per_round` at work.
    fn dispatch(&mut self, now: Instant, out: &mut Vec<Action>) {
        let online = self.online_clients();
        let per_round = self.cfg.clients_per_round;
        let version = self.buffer_mut().version;
        let config = self.train_config(version);
        let b = self.buffer_mut();
        let Some(global) = b.global.clone() else {
            return;
        };
        let busy = b.outstanding.len() + b.fetching.len();
        let slots = per_round.saturating_sub(busy);
        if slots == 0 {
            return;
        }
        let idle: Vec<String> = online
            .into_iter()
            .filter(|c| {
                !b.outstanding.contains_key(c)
                    && !b.fetching.contains_key(c)
                    && !b.cooldown.contains(c)
            })
            .collect();
        if idle.is_empty() {
            return;
        }
        let plans = self
            .strategy
            .configure_train(version, &idle, slots, &mut self.rng);
        let deadline = now + self.cfg.round_timeout;
        let b = self.buffer_mut();
        for p in plans {
            b.outstanding.insert(p.client.clone(), (version, deadline));
            b.cooldown.insert(p.client.clone());
            b.failed.remove(&p.client);
            b.commands += 1;
            out.push(Action::SendTrain {
                client: p.client,
                round: version,
                global: global.clone(),
                config: config.clone(),
                instruction: p.instruction,
                deadline,
                secagg: None,
            });
        }
    }

    fn on_buffered_update(&mut self, client: String, notice: Notice, out: &mut Vec<Action>) {
        let round = notice.round;
        let own = self.cfg.keys.update(round, &client);
        let weighed = weigh(
            &self.clients,
            self.cfg.weighting,
            &client,
            notice.num_samples,
        );
        let b = self.buffer_mut();
        if b.outstanding.get(&client).map(|(v, _)| *v) != Some(round) {
            debug!(%client, round, "update that answers no outstanding command ignored");
            return;
        }
        b.outstanding.remove(&client);
        let staleness = b.version.saturating_sub(round);
        let refuse = if notice.blob.key != own {
            Some(format!(
                "its blob key {:?} is not its own update key for round {round} ({own:?})",
                notice.blob.key
            ))
        } else if staleness > b.schedule.max_staleness {
            Some(format!(
                "it trained round {round}'s model, {staleness} versions behind round {} \
                 (fedmq_args.max_staleness {})",
                b.version, b.schedule.max_staleness
            ))
        } else {
            weighed.as_ref().err().cloned()
        };
        if let Some(reason) = refuse {
            warn!(%client, round, "update refused: {reason}");
            b.cooldown.insert(client.clone());
            b.failed.insert(client, FailureReason::BadUpdate(reason));
            return;
        }
        let (samples, weight) = weighed.expect("checked above");
        b.fetching.insert(
            client.clone(),
            (
                round,
                Pending {
                    samples,
                    weight,
                    metrics: notice.metrics,
                    report: notice.report,
                },
            ),
        );
        out.push(Action::FetchUpdate {
            client,
            round,
            blob: notice.blob,
        });
    }

    fn fold(&mut self, client: String, round: u64, blob: &[u8], now: Instant) {
        let b = self.buffer_mut();
        if b.fetching.get(&client).is_none_or(|(v, _)| *v != round) {
            return;
        }
        let (_, p) = b.fetching.remove(&client).expect("checked above");
        let added = ParamsView::parse(blob)
            .map_err(|e| format!("not a model blob: {e}"))
            .and_then(|v| {
                if round == b.version {
                    b.aggregate.add(&client, &v, p.weight, &p.report)
                } else {
                    b.aggregate
                        .add_stale(round, &client, &v, p.weight, &p.report)
                }
                .map_err(|e| e.to_string())
            });
        match added {
            Ok(()) => {
                b.evals.add(p.metrics.eval.as_ref());
                b.reported.push((client, p.samples, p.metrics.train_loss));
                b.last_progress = now;
            }
            Err(e) => {
                warn!(%client, round, "update rejected: {e}");
                b.cooldown.insert(client.clone());
                b.failed.insert(client, FailureReason::BadUpdate(e));
            }
        }
    }

    /// Closes the round once the buffer is full and the model of the round is stored.
    fn maybe_step(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Phase::Buffered(b) = &self.phase {
            if b.global.is_some() && b.aggregate.count() >= b.schedule.buffer {
                self.close_step(now, out);
            }
        }
    }

    fn close_step(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Phase::Buffered(mut b) = std::mem::replace(&mut self.phase, Phase::Finished) else {
            return;
        };
        let failures: Vec<ClientFailure> = b
            .failed
            .iter()
            .map(|(c, reason)| ClientFailure {
                client: c.clone(),
                reason: reason.clone(),
            })
            .collect();
        let version = b.version;
        let agg_metrics = b.aggregate.metrics();
        let aggregate = std::mem::replace(&mut b.aggregate, Box::new(Closed));
        let mut end = self
            .strategy
            .end_round(version, &self.global, aggregate.finish(&failures));
        end.metrics.extend(agg_metrics);
        end.metrics.extend(std::mem::take(&mut b.evals).metrics());
        let updated = end.global.is_some();
        if let Some(g) = end.global {
            self.global = g;
        }
        let num_samples: u64 = b.reported.iter().map(|(_, s, _)| s).sum();
        let train_loss = if num_samples > 0 {
            b.reported
                .iter()
                .map(|(_, s, l)| *s as f64 * l)
                .sum::<f64>()
                / num_samples as f64
        } else {
            f64::NAN
        };
        let mut participants: Vec<String> = b.reported.iter().map(|(c, _, _)| c.clone()).collect();
        participants.sort();
        participants.dedup();
        self.completed = version;
        let evaluate = version % self.cfg.eval_every.max(1) == 0 || version == self.cfg.rounds;
        out.push(Action::RoundClosed(RoundSummary {
            round: version,
            participants,
            failures,
            num_samples,
            train_loss,
            commands: b.commands,
            retries: 0,
            seconds: now.saturating_duration_since(b.started).as_secs_f64(),
            evaluate,
            updated,
            strategy_metrics: end.metrics,
        }));
        if version + 1 > self.cfg.rounds {
            self.finish(Outcome::Completed, out);
            return;
        }
        // The next version: its buffer starts from the new model.
        b.version = version + 1;
        b.aggregate = self.strategy.begin_round(b.version, &self.global);
        b.global = None;
        b.reported.clear();
        b.failed.clear();
        b.cooldown.clear();
        b.commands = 0;
        b.started = now;
        self.upload_started = Some(now);
        out.push(Action::UploadGlobal { round: b.version });
        self.phase = Phase::Buffered(b);
    }
}

/// Stands in for a round's aggregate between its close and the next round's start.
struct Closed;

impl RoundAggregate for Closed {
    fn add(
        &mut self,
        client: &str,
        _update: &ParamsView<'_>,
        _num_samples: u64,
        _report: &crate::strategy::Report,
    ) -> crate::strategy::Result<()> {
        Err(crate::strategy::Error::Report {
            client: client.to_string(),
            detail: "the round is closing".into(),
        })
    }

    fn count(&self) -> usize {
        0
    }

    fn finish(self: Box<Self>, _failures: &[ClientFailure]) -> Option<crate::tensor::ParamSet> {
        None
    }
}
