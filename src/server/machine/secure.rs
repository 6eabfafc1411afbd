//! Securely aggregated rounds (`RoundConfig::secure`): the round's stages on top of the normal
//! train command, driven by a [`ServerSession`].
//!
//! ```text
//! train (with the secagg setup) ──▶ keys ──roster──▶ shares ──collect──▶ masked inputs
//!     ──unmask──▶ reveals ──▶ the survivors' weighted mean, folded as one update
//! ```
//! Clients train while the first two stages run. Each stage closes when every client still
//! expected has answered or dropped out (offline, or a reported failure), or at its deadline:
//! `secagg_stage_timeout_s` after the previous stage for keys, shares and reveals; the round's own
//! deadline (`round_timeout_s`) for masked inputs. The unmask stage also closes as soon as every
//! needed secret has `t` shares. A stage left with fewer than `t` clients fails the round and
//! nothing is unmasked; the run then aborts, or with `secagg_on_failure: skip` goes on to the next
//! round with the model unchanged. Secure rounds are never re-sent (`max_retries` does not apply).

use super::{weigh, Action, FailureReason, Outcome, Pending, Phase, RoundMachine, RoundState};
use crate::proto::{Body, SaKeys, SaMasked, SaReveal, SaShares, SecAggSetup};
use crate::secagg::{self, SecAggError, ServerSession, Stage};
use crate::tensor::ParamsView;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Secure aggregation settings (`fedmq_args.secagg_*`, `secure_aggregation_args`).
#[derive(Debug, Clone, PartialEq)]
pub struct SecureConfig {
    /// Each coordinate of a client's weighted update is clipped to `[−clip, clip]`.
    pub clip: f64,
    /// Neighbours per client; 0: the default for the number of clients.
    pub degree: usize,
    /// Shares that recover a secret; 0: the default (a majority of a neighbourhood).
    pub threshold: usize,
    /// Deadline of the keys, shares and unmask stages, from the previous stage.
    pub stage_timeout: Duration,
    /// What a failed secure round does to the run.
    pub on_failure: OnFailure,
    /// SecAgg+ or LightSecAgg.
    pub protocol: Protocol,
}

/// The secure aggregation protocol (`secure_aggregation_args.sa_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// SecAgg+ (`degree` and `threshold` apply).
    #[default]
    SecAggPlus,
    /// LightSecAgg: `active` clients must survive (`U`, 0: the default), `privacy` colluding
    /// clients learn nothing (`T`, `None`: the default).
    LightSecAgg {
        /// `lsa_args.targeted_number_active_clients`.
        active: usize,
        /// `lsa_args.privacy_guarantee`.
        privacy: Option<usize>,
    },
}

/// What a securely aggregated round that fails does (`fedmq_args.secagg_on_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Abort the run, saying why.
    Abort,
    /// Close the round without an update and go on.
    Skip,
}

impl std::str::FromStr for OnFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "abort" => Ok(OnFailure::Abort),
            "skip" => Ok(OnFailure::Skip),
            other => Err(format!("unknown value {other:?}; use abort or skip")),
        }
    }
}

/// A stage message from a client, as admission passes it on.
#[derive(Debug)]
pub enum SecureMessage {
    /// Stage 0.
    Keys(SaKeys),
    /// Stage 1.
    Shares(SaShares),
    /// Stage 2 (its blob is then fetched like an update).
    Masked(SaMasked),
    /// Stage 3.
    Reveal(SaReveal),
}

impl SecureMessage {
    fn name(&self) -> &'static str {
        match self {
            SecureMessage::Keys(_) => "sa_keys",
            SecureMessage::Shares(_) => "sa_shares",
            SecureMessage::Masked(_) => "sa_masked",
            SecureMessage::Reveal(_) => "sa_reveal",
        }
    }
}

/// The secure part of a round's state.
pub(super) struct SecureRound {
    session: ServerSession,
    stage_deadline: Instant,
    /// Clients that dropped out (offline or failed): no stage waits for them.
    gone: BTreeSet<String>,
    /// Weight each client advertised with (from `weigh`), and its sample count.
    weights: BTreeMap<String, (u64, u64)>,
    /// Why the round failed, once it has.
    failed: Option<String>,
    /// The unmasked weighted mean update and the survivors' total weight, once unmasked.
    result: Option<(Vec<f32>, u64)>,
    /// What the round's metrics record about secure aggregation.
    pub(super) metrics: BTreeMap<String, f64>,
    /// When the train commands went out: stage close times are measured from it.
    started: Instant,
}

impl SecureRound {
    /// What the round's train commands carry.
    pub(super) fn setup(&self) -> &SecAggSetup {
        self.session.setup()
    }
}

/// The largest aggregate-mask-share blob of `ell` values: the values and a safetensors header.
fn light_share_bytes(ell: usize) -> u64 {
    4 * ell as u64 + 1024
}

impl RoundMachine {
    /// The session of a new secure round over `selected`, or why there is none.
    pub(super) fn secure_session(
        &mut self,
        round: u64,
        selected: &[String],
        now: Instant,
    ) -> Result<Option<Box<SecureRound>>, String> {
        let Some(sc) = &self.cfg.secure else {
            return Ok(None);
        };
        let n = selected.len();
        let method = match sc.protocol {
            Protocol::SecAggPlus => {
                secagg::Method::Plus(secagg::Params::with_overrides(n, sc.degree, sc.threshold))
            }
            Protocol::LightSecAgg { active, privacy } => {
                let (p, changed) = secagg::LightParams::with_overrides(n, active, privacy);
                if changed && !std::mem::replace(&mut self.light_adjusted, true) {
                    warn!(
                        round,
                        clients = n,
                        active = p.active,
                        privacy = p.privacy,
                        "LightSecAgg needs privacy_guarantee < targeted_number_active_clients <= \
                         clients per round; using these (said once per run)"
                    );
                }
                secagg::Method::Light(p)
            }
        };
        let seed = rand::Rng::random(&mut self.rng);
        let session = ServerSession::new(
            self.cfg.keys.run_id(),
            round,
            selected,
            method,
            sc.clip,
            seed,
            self.global.num_params(),
            sc.stage_timeout.as_millis() as u64,
        )
        .map_err(|e| e.to_string())?;
        let setup = session.setup();
        info!(
            round,
            clients = n,
            threshold = setup.threshold,
            degree = setup.degree,
            privacy = setup.privacy,
            "secure aggregation ({})",
            setup.method
        );
        let mut metrics = BTreeMap::new();
        if let Some(l) = session.light() {
            // LightSecAgg's U and T, as the round used them.
            metrics.insert("lsa_active".into(), l.active as f64);
            metrics.insert("lsa_privacy".into(), l.privacy as f64);
        }
        Ok(Some(Box::new(SecureRound {
            session,
            stage_deadline: now + sc.stage_timeout,
            gone: BTreeSet::new(),
            weights: BTreeMap::new(),
            failed: None,
            result: None,
            metrics,
            started: now,
        })))
    }

    /// A stage message from `client` for `round`.
    pub(super) fn on_secure_message(
        &mut self,
        client: String,
        round: u64,
        msg: SecureMessage,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let weighting = self.cfg.weighting;
        let shares_key = self.cfg.keys.shares(round, &client);
        let reveal_key = self.cfg.keys.reveal(round, &client);
        let update_key = self.cfg.keys.update(round, &client);
        let Phase::Training(r) = &mut self.phase else {
            return;
        };
        let kind = msg.name();
        if r.round != round {
            info!(%client, round, current = r.round, "{kind} of another round ignored");
            return;
        }
        let Some(s) = r.secure.as_mut() else {
            warn!(%client, round, "{kind} in a round without secure aggregation ignored");
            return;
        };
        let taken = match msg {
            SecureMessage::Keys(k) => match weigh(&self.clients, weighting, &client, k.num_samples)
            {
                Ok((samples, weight)) => s.session.add_keys(&client, &k, weight).map(|()| {
                    s.weights.insert(client.clone(), (weight, samples));
                }),
                Err(e) => Err(SecAggError::Refused(e)),
            },
            SecureMessage::Shares(sh) => {
                if sh.bundle.key != shares_key {
                    Err(SecAggError::Refused(format!(
                        "its bundle key {:?} is not its own ({shares_key:?})",
                        sh.bundle.key
                    )))
                } else if sh.bundle.len > secagg::max_bundle_bytes(s.session.setup()) {
                    Err(SecAggError::Refused(
                        "its bundle is larger than a bundle can be".into(),
                    ))
                } else {
                    s.session.add_shares(&client, sh.bundle.clone()).map(|()| {
                        out.push(Action::FetchBundle {
                            client: client.clone(),
                            round,
                            blob: sh.bundle,
                        });
                    })
                }
            }
            SecureMessage::Masked(m) => {
                if m.masked.key != update_key {
                    Err(SecAggError::Refused(format!(
                        "its masked input key {:?} is not its own ({update_key:?})",
                        m.masked.key
                    )))
                } else if r.fetching.contains_key(&client) {
                    Err(SecAggError::Refused("a second masked input".into()))
                } else {
                    s.session.expects_masked(&client).map(|()| {
                        let (weight, samples) = s.weights.get(&client).copied().unwrap_or((1, 1));
                        let samples = samples.min(m.num_samples.max(1));
                        r.announced.insert(client.clone());
                        r.fetching.insert(
                            client.clone(),
                            Pending {
                                samples,
                                weight,
                                metrics: m.metrics,
                                report: BTreeMap::new(),
                            },
                        );
                        out.push(Action::FetchUpdate {
                            client: client.clone(),
                            round,
                            blob: m.masked,
                        });
                    })
                }
            }
            SecureMessage::Reveal(rv) => match (s.session.light(), rv.mask_share) {
                (Some(l), Some(blob)) => {
                    let most = light_share_bytes(l.share_len(s.session.setup().length as usize));
                    if blob.key != reveal_key {
                        Err(SecAggError::Refused(format!(
                            "its aggregate mask share key {:?} is not its own ({reveal_key:?})",
                            blob.key
                        )))
                    } else if blob.len > most {
                        Err(SecAggError::Refused(
                            "its aggregate mask share is larger than one can be".into(),
                        ))
                    } else {
                        s.session.note_mask_share(&client).map(|()| {
                            out.push(Action::FetchBundle {
                                client: client.clone(),
                                round,
                                blob,
                            });
                        })
                    }
                }
                (Some(_), None) => Err(SecAggError::Refused(
                    "a LightSecAgg reveal without an aggregate mask share".into(),
                )),
                (None, mask_share) => s
                    .session
                    .add_reveal(&client, &SaReveal { mask_share, ..rv }),
            },
        };
        if let Err(e) = taken {
            warn!(%client, round, "{kind} refused: {e}");
        }
        self.advance_secure(now, out);
    }

    /// A fetched share bundle (checked, and the client is in `U1`), or in the unmask stage of
    /// LightSecAgg a fetched aggregate mask share; one that cannot be fetched or does not check
    /// out drops the client.
    pub(super) fn on_bundle_fetched(
        &mut self,
        client: String,
        round: u64,
        bundle: Result<bytes::Bytes, String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Phase::Training(r) = &mut self.phase else {
            return;
        };
        if r.round != round {
            return;
        }
        let Some(s) = r.secure.as_mut() else {
            return;
        };
        let unmasking = s.session.stage() == Stage::Unmask;
        let checked = bundle.and_then(|b| {
            if unmasking {
                s.session.add_mask_share(&client, &b)
            } else {
                s.session.add_bundle(&client, &b)
            }
            .map_err(|e| e.to_string())
        });
        if let Err(e) = checked {
            let what = if unmasking {
                "aggregate mask share"
            } else {
                "share bundle"
            };
            warn!(%client, round, "{what} refused: {e}");
            self.secure_dropout(&client, FailureReason::BadUpdate(e), now, out);
            return;
        }
        self.advance_secure(now, out);
    }

    /// A fetched masked input.
    pub(super) fn on_masked_fetched(
        &mut self,
        client: String,
        blob: &[u8],
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Phase::Training(r) = &mut self.phase else {
            return;
        };
        let Some(p) = r.fetching.remove(&client) else {
            return;
        };
        let Some(s) = r.secure.as_mut() else {
            return;
        };
        let added = secagg::decode_masked(blob).and_then(|v| s.session.add_masked(&client, &v));
        match added {
            Ok(()) => {
                r.evals.add(p.metrics.eval.as_ref());
                r.reported.insert(client, (p.samples, p.metrics.train_loss));
            }
            Err(e) => {
                warn!(%client, round = r.round, "masked input refused: {e}");
                r.failed
                    .insert(client, FailureReason::BadUpdate(e.to_string()));
            }
        }
        self.advance_secure(now, out);
    }

    /// `client` dropped out of the secure round (offline, failed, or its blob was refused).
    pub(super) fn secure_dropout(
        &mut self,
        client: &str,
        why: FailureReason,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if let Phase::Training(r) = &mut self.phase {
            if let Some(s) = r.secure.as_mut() {
                if r.selected.contains(client) && s.gone.insert(client.to_string()) {
                    info!(round = r.round, %client, stage = s.session.stage().name(), "dropped out: {why}");
                    if !r.reported.contains_key(client) {
                        r.failed.insert(client.to_string(), why);
                    }
                }
            }
        }
        self.advance_secure(now, out);
    }

    /// The next time a secure round's stage closes on its own.
    pub(super) fn secure_deadline(r: &RoundState) -> Option<Instant> {
        let s = r.secure.as_ref()?;
        match s.session.stage() {
            Stage::Masked => Some(r.deadline),
            Stage::Done => None,
            _ => Some(s.stage_deadline),
        }
    }

    /// Closes every stage that can close now, sending the next stage's messages, and closes the
    /// round when unmasking is done or has failed.
    pub(super) fn advance_secure(&mut self, now: Instant, out: &mut Vec<Action>) {
        let stage_timeout = self
            .cfg
            .secure
            .as_ref()
            .map_or(Duration::ZERO, |c| c.stage_timeout);
        let Phase::Training(r) = &mut self.phase else {
            return;
        };
        let round = r.round;
        let Some(s) = r.secure.as_mut() else {
            return;
        };
        loop {
            let stage = s.session.stage();
            let answered = s.session.answered();
            let complete = s
                .session
                .expected()
                .iter()
                .all(|c| answered.contains(c) || s.gone.contains(c));
            let due = match stage {
                Stage::Masked => now >= r.deadline,
                _ => now >= s.stage_deadline,
            };
            let closed = match stage {
                Stage::Keys | Stage::Shares => complete || due,
                Stage::Masked => (complete || due) && r.fetching.is_empty(),
                Stage::Unmask => complete || due || s.session.ready(),
                Stage::Done => break,
            };
            if !closed {
                return;
            }
            let key = match stage {
                Stage::Keys => "secagg_keys_s",
                Stage::Shares => "secagg_shares_s",
                Stage::Masked => "secagg_masked_s",
                _ => "secagg_unmask_s",
            };
            let at = now.saturating_duration_since(s.started).as_secs_f64();
            s.metrics.insert(key.into(), at);
            // Whoever the stage waited for in vain timed out: later stages do not wait for
            // them, and the round records them. (An unmask stage that closed because it had
            // enough shares waited for no one.)
            let early = stage == Stage::Unmask && !due && !complete;
            for c in s.session.expected() {
                if !answered.contains(&c) && s.gone.insert(c.clone()) {
                    if early {
                        continue;
                    }
                    info!(round, client = %c, stage = stage.name(), "no answer by the stage's deadline");
                    if !r.reported.contains_key(&c) {
                        r.failed.insert(c, FailureReason::Timeout);
                    }
                }
            }
            let step = match stage {
                Stage::Keys => s.session.rosters().map(|m| {
                    m.into_iter()
                        .map(|(c, x)| (c, Body::SaRoster(x)))
                        .collect::<Vec<_>>()
                }),
                Stage::Shares => match s.session.collects() {
                    Ok(m) => {
                        for (client, (sharing, inbox)) in m {
                            if !s.gone.contains(&client) {
                                out.push(Action::SendCollect {
                                    client,
                                    round,
                                    sharing,
                                    inbox,
                                });
                            }
                        }
                        Ok(Vec::new())
                    }
                    Err(e) => Err(e),
                },
                Stage::Masked => s.session.unmask_requests().map(|m| {
                    m.into_iter()
                        .map(|(c, x)| (c, Body::SaUnmask(x)))
                        .collect::<Vec<_>>()
                }),
                Stage::Unmask => {
                    let result = s.session.finish();
                    match result {
                        Ok(u) => {
                            info!(
                                round,
                                survivors = u.survivors.len(),
                                error_bound = u.error_bound,
                                "secure aggregate unmasked"
                            );
                            let weight: u64 = u
                                .survivors
                                .iter()
                                .map(|c| s.weights.get(c).map_or(1, |w| w.0))
                                .sum();
                            let m = &mut s.metrics;
                            m.insert("secagg_survivors".into(), u.survivors.len() as f64);
                            m.insert("secagg_error_bound".into(), u.error_bound);
                            m.insert("secagg_revealed".into(), s.session.revealed() as f64);
                            s.result = Some((u.mean_update, weight));
                            break;
                        }
                        Err(e) => Err(e),
                    }
                }
                Stage::Done => break,
            };
            match step {
                Ok(messages) => {
                    for (client, body) in messages {
                        if s.gone.contains(&client) {
                            continue;
                        }
                        out.push(Action::SendSecure {
                            client,
                            round,
                            body: Box::new(body),
                        });
                    }
                    s.stage_deadline = now + stage_timeout;
                }
                Err(e) => {
                    let reason = format!(
                        "round {round}: secure aggregation failed in the {} stage: {e}",
                        stage.name()
                    );
                    warn!("{reason}");
                    s.failed = Some(reason);
                    break;
                }
            }
        }
        self.finish_secure(now, out);
    }

    /// Closes a secure round that unmasked or failed.
    fn finish_secure(&mut self, now: Instant, out: &mut Vec<Action>) {
        let on_failure = self
            .cfg
            .secure
            .as_ref()
            .map_or(OnFailure::Abort, |c| c.on_failure);
        let Phase::Training(r) = &mut self.phase else {
            return;
        };
        let Some(s) = r.secure.as_mut() else {
            return;
        };
        if let Some((mean, weight)) = s.result.take() {
            let mut model = self.global.clone();
            let mut values = mean.into_iter();
            for t in model.tensors_mut() {
                for (x, d) in t.data_mut().iter_mut().zip(values.by_ref()) {
                    *x += d;
                }
            }
            let added = r.aggregate.as_mut().map(|a| {
                a.add(
                    "secure-aggregate",
                    &ParamsView::of(&model),
                    weight.max(1),
                    &BTreeMap::new(),
                )
            });
            if let Some(Err(e)) = added {
                warn!(round = r.round, "the secure aggregate was refused: {e}");
                r.aggregate = None;
            }
            self.close_round(now, out);
            return;
        }
        let Some(reason) = s.failed.clone() else {
            return;
        };
        match on_failure {
            OnFailure::Abort => self.finish(
                Outcome::Aborted(format!(
                    "{reason}. Check that clients stay online through the round, or set \
                     fedmq_args.secagg_on_failure: skip to go on without the round"
                )),
                out,
            ),
            OnFailure::Skip => {
                s.metrics.insert("secagg_failed".into(), 1.0);
                r.aggregate = None;
                // Their masked inputs arrived but stay masked: no one is a participant.
                for (client, _) in std::mem::take(&mut r.reported) {
                    let why = FailureReason::NotUnmasked(reason.clone());
                    r.failed.insert(client, why);
                }
                warn!(
                    round = r.round,
                    "round closed without an update (secagg_on_failure: skip)"
                );
                self.close_round(now, out);
            }
        }
    }
}
