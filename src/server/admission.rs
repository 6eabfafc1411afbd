//! Admission of incoming messages: which MQTT publishes reach the round machine, and as what.
//!
//! In order, each check cheaper than the next: decoding and the topic rules
//! ([`Incoming::decode`]); the server's own status, echoed by the broker, dropped; a token
//! bucket per sender ([`SenderBudget`]), so that a flood costs a map lookup, not a signature
//! check; the signature against the key ring (`fedmq_args.trusted_keys`), which also rejects a
//! sender writing on another participant's topic and stale replays
//! ([`Keyring::check_message`]); QoS 1 duplicates ([`Dedup`]). What passes becomes an
//! [`Event`] when its topic and body agree (a client's status, a client's update or failure on
//! its own `up/` topic); anything else is dropped with a logged reason.

use super::budget::{SenderBudget, Verdict};
use super::driver::SERVER_ID;
use super::machine::{Event, SecureMessage};
use crate::crypto::identity::Keyring;
use crate::proto::{Body, Presence, Role, TopicKind, Topics};
use crate::transport::{Dedup, Incoming};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info, warn};

/// Messages a sender may send at once: a client sends about two a round (presence, then an
/// update or a failure), re-sends included.
const SENDER_BURST: u32 = 50;
/// Messages a second a sender's budget refills.
const SENDER_RATE: f64 = 5.0;

/// The server's admission state: per-sender budgets and the duplicates seen.
pub(super) struct Admission {
    /// Only messages signed by a key in this ring are admitted, when set.
    keyring: Option<Arc<Keyring>>,
    /// Message budgets per sender.
    budget: SenderBudget,
    dedup: Dedup,
}

impl Admission {
    /// Admission checking signatures against `keyring`, when given.
    pub(super) fn new(keyring: Option<Arc<Keyring>>) -> Self {
        Self {
            keyring,
            budget: SenderBudget::new(SENDER_BURST, SENDER_RATE),
            dedup: Dedup::default(),
        }
    }

    /// Decodes one MQTT publish into a machine event, or drops it with a logged reason.
    pub(super) fn admit(&mut self, m: &Incoming, topics: &Topics) -> Option<Event> {
        let (kind, env) = match m.decode(topics) {
            Ok(x) => x,
            Err(e) => {
                warn!("message dropped: {e}");
                return None;
            }
        };
        let sender = match &kind {
            TopicKind::Status(id) if id == SERVER_ID => {
                // Its own presence, echoed by the broker.
                return None;
            }
            TopicKind::Status(id) | TopicKind::Up(id) | TopicKind::Command(id) => id.as_str(),
        };
        // Before the signature check: a flood costs a map lookup, not a verification.
        if let Verdict::Drop { first } = self.budget.admit(sender, Instant::now()) {
            if first {
                let (burst, rate) = self.budget.limits();
                warn!(
                    %sender,
                    "messages dropped: over the per-sender budget ({burst} at once, {rate}/s); \
                     dropping until it slows down"
                );
            }
            return None;
        }
        if let Some(ring) = &self.keyring {
            if let Err(reason) = ring.check_message(&m.payload, m.retained, &env) {
                warn!(topic = %m.topic, from = %env.from, "message dropped: {reason}");
                return None;
            }
        }
        if !self.dedup.first_time(&env) {
            debug!(from = %env.from, id = %env.id, "duplicate dropped");
            return None;
        }
        match (kind, env.body) {
            (TopicKind::Status(id), Body::Status(s)) => {
                if id == SERVER_ID || s.role != Role::Client {
                    return None;
                }
                match s.state {
                    Presence::Online => {
                        info!(client = %id, "client online");
                        Some(Event::ClientOnline {
                            client: id,
                            capabilities: s.capabilities,
                        })
                    }
                    Presence::Offline => {
                        info!(client = %id, "client offline");
                        Some(Event::ClientOffline { client: id })
                    }
                }
            }
            (TopicKind::Up(id), Body::Update(u)) => Some(Event::UpdateReady {
                client: id,
                round: env.round,
                blob: u.update,
                num_samples: u.num_samples,
                metrics: u.metrics,
                report: u.report,
            }),
            (TopicKind::Up(id), Body::Failure(f)) => Some(Event::ClientFailed {
                client: id,
                round: env.round,
                reason: f.reason,
            }),
            (
                TopicKind::Up(id),
                body
                @ (Body::SaKeys(_) | Body::SaShares(_) | Body::SaMasked(_) | Body::SaReveal(_)),
            ) => {
                let msg = match body {
                    Body::SaKeys(k) => SecureMessage::Keys(k),
                    Body::SaShares(s) => SecureMessage::Shares(s),
                    Body::SaMasked(m) => SecureMessage::Masked(m),
                    Body::SaReveal(r) => SecureMessage::Reveal(r),
                    _ => return None,
                };
                Some(Event::Secure {
                    client: id,
                    round: env.round,
                    msg,
                })
            }
            _ => None,
        }
    }
}
