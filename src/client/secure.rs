//! A client's securely aggregated round (`docs/PROTOCOL.md`, "Secure aggregation"): the I/O
//! around a [`ClientSession`]. Training runs from the start; meanwhile the client advertises its
//! keys, answers the roster with its share bundle, and reads its inbox (its share from each
//! neighbour, gathered by the server). Once both
//! the training and the neighbours' shares are in, it stores its masked input (sealed for the
//! server when blobs are sealed) and announces it; the unmask request is answered with the shares
//! it asks for, and the round is over here.
//!
//! A stage message that does not come within `stage_timeout_ms` (after the round's deadline, for
//! the unmask request) ends the round here as a failure; so does a request the protocol forbids
//! (the reason is reported to the server).

use super::{publish, store_deadline, JobCtx, RoundError};
use crate::proto::{Body, Envelope, SaMasked, SaReveal, SaShares, SecAggSetup, Train};
use crate::secagg::{self, ClientSession, Reveal};
use crate::store;
use crate::tensor::ParamSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info};

impl JobCtx {
    pub(super) async fn secure_round(
        &self,
        round: u64,
        train: &Train,
        setup: &SecAggSetup,
        interrupt: &Arc<AtomicBool>,
        mut stages: mpsc::UnboundedReceiver<Envelope>,
    ) -> Result<(), RoundError> {
        let sa = |e: secagg::SecAggError| RoundError::SecAgg(e.to_string());
        let samples = self.trainer.num_samples();
        let (session, keys) =
            ClientSession::new(&self.run, round, &self.id, setup, samples).map_err(sa)?;
        let mut session = Some(session);
        self.send(round, Body::SaKeys(keys)).await;
        let store_by = store_deadline(train);
        // Twice the server's stage timeout: a stage closes at its deadline at the latest.
        let stage_wait = 2 * Duration::from_millis(setup.stage_timeout_ms.max(1));
        let training = self.fetch_and_train(round, train, interrupt);
        tokio::pin!(training);
        let mut trained: Option<(ParamSet, ParamSet, crate::proto::TrainMetrics)> = None;
        let mut collected = false;
        let mut masked_sent = false;
        // Each stage message must come within a stage timeout of the previous one; the masked
        // input waits for training, so the unmask request has until the round's deadline too.
        let mut wait_until = tokio::time::Instant::now() + stage_wait;
        loop {
            if collected && !masked_sent {
                if let Some((global, params, metrics)) = trained.take() {
                    let s = session.take().ok_or(RoundError::Interrupted)?;
                    let (s, masked) = tokio::task::spawn_blocking(move || {
                        let mut s = s;
                        let m = s.masked_input(&global, &params);
                        (s, m)
                    })
                    .await
                    .map_err(|source| RoundError::Task {
                        what: "masking",
                        source,
                    })?;
                    session = Some(s);
                    let masked = masked.map_err(sa)?;
                    let key = self.keys.update(round, &self.id);
                    let sealing = self.store.clone();
                    let sealed = tokio::task::spawn_blocking(move || {
                        sealing.seal(&key, secagg::encode_masked(&masked))
                    })
                    .await
                    .map_err(|source| RoundError::Task {
                        what: "encoding",
                        source,
                    })?;
                    let blob = self
                        .store_for_server(round, "masked input", &sealed, store_by)
                        .await?;
                    self.send(
                        round,
                        Body::SaMasked(SaMasked {
                            masked: blob,
                            num_samples: samples,
                            metrics,
                        }),
                    )
                    .await;
                    masked_sent = true;
                    wait_until = tokio::time::Instant::now().max(store_by) + stage_wait;
                }
            }
            tokio::select! {
                done = &mut training, if trained.is_none() && !masked_sent => {
                    let (global, t, _) = done?;
                    let global = global.ok_or_else(|| {
                        RoundError::SecAgg("the global model was not kept for masking".into())
                    })?;
                    debug!(client = %self.id, round, "trained; waiting for the neighbours' shares");
                    trained = Some((global, t.params, t.metrics));
                }
                msg = stages.recv() => {
                    let Some(env) = msg else {
                        return Err(RoundError::Interrupted);
                    };
                    match env.body {
                        Body::SaRoster(roster) => {
                            // LightSecAgg codes the whole mask here: off the async threads.
                            let mut owned = session.take().ok_or(RoundError::Interrupted)?;
                            let (owned, bundle) = tokio::task::spawn_blocking(move || {
                                let b = owned.on_roster(&roster, &mut rand::rng());
                                (owned, b)
                            })
                            .await
                            .map_err(|source| RoundError::Task {
                                what: "sharing",
                                source,
                            })?;
                            session = Some(owned);
                            let bundle = bundle.map_err(sa)?;
                            let key = self.keys.shares(round, &self.id);
                            let what = format!("{}: storing the share bundle of round {round}", self.id);
                            let bytes = bytes::Bytes::from(bundle);
                            let blob = store::retry::until(&what, store_by, || {
                                self.store.inner().put(&key, bytes.clone())
                            })
                            .await
                            .map_err(|e| RoundError::Store(Box::new(e)))?;
                            self.send(round, Body::SaShares(SaShares { bundle: blob })).await;
                        }
                        Body::SaCollect(collect) => {
                            let s = session.as_mut().ok_or(RoundError::Interrupted)?;
                            let own = self.keys.inbox(round, &self.id);
                            if collect.inbox.key != own {
                                return Err(RoundError::SecAgg(format!(
                                    "the inbox is named {:?}, not this client's ({own:?})",
                                    collect.inbox.key
                                )));
                            }
                            if collect.inbox.len > secagg::max_bundle_bytes(setup) {
                                return Err(RoundError::SecAgg(
                                    "the inbox is larger than an inbox can be".into(),
                                ));
                            }
                            let what = format!("{}: fetching its share inbox", self.id);
                            let bytes = store::retry::until(&what, store_by, || {
                                self.store.inner().get(&collect.inbox)
                            })
                            .await
                            .map_err(|e| RoundError::Fetch(Box::new(e)))?;
                            s.on_collect(&collect, &bytes).map_err(sa)?;
                            collected = true;
                        }
                        Body::SaUnmask(req) => {
                            let s = session.as_mut().ok_or(RoundError::Interrupted)?;
                            let reveal = match s.on_unmask(&req).map_err(sa)? {
                                Reveal::Shares(r) => r,
                                Reveal::MaskShare(sum) => {
                                    let key = self.keys.reveal(round, &self.id);
                                    let what = format!(
                                        "{}: storing its aggregate mask share of round {round}",
                                        self.id
                                    );
                                    let bytes = bytes::Bytes::from(
                                        secagg::light::encode_aggregate(&sum),
                                    );
                                    let blob = store::retry::until(&what, store_by.max(tokio::time::Instant::now() + stage_wait), || {
                                        self.store.inner().put(&key, bytes.clone())
                                    })
                                    .await
                                    .map_err(|e| RoundError::Store(Box::new(e)))?;
                                    SaReveal {
                                        self_masks: Vec::new(),
                                        mask_keys: Vec::new(),
                                        mask_share: Some(blob),
                                    }
                                }
                            };
                            if reveal.mask_share.is_some() {
                                info!(
                                    client = %self.id, round,
                                    survivors = req.survivors.len(),
                                    "sending the sum of the survivors' coded mask shares"
                                );
                            } else {
                                info!(
                                    client = %self.id, round,
                                    self_masks = reveal.self_masks.len(),
                                    mask_keys = reveal.mask_keys.len(),
                                    "revealing the shares asked for"
                                );
                            }
                            self.send(round, Body::SaReveal(reveal)).await;
                            return Ok(());
                        }
                        other => debug!(kind = other.kind(), "not a stage message"),
                    }
                    wait_until = tokio::time::Instant::now() + stage_wait;
                    if trained.is_none() && !masked_sent {
                        // Training is still running: the masked input is due at the deadline.
                        wait_until = wait_until.max(store_by);
                    }
                }
                () = tokio::time::sleep_until(wait_until) => {
                    if interrupt.load(Ordering::Relaxed) {
                        return Err(RoundError::Interrupted);
                    }
                    return Err(RoundError::SecAgg(
                        "the server sent no next stage in time; the round is over here".into(),
                    ));
                }
            }
        }
    }

    async fn send(&self, round: u64, body: Body) {
        let env = Envelope::new(&self.run, round, &self.id, body);
        publish(&self.handle, &self.up_topic, &env).await;
    }
}
