//! The client runtime: joins a run, follows the server's commands, trains, uploads, reports.
//!
//! One task owns the MQTT session and the client's state; each round's work (download, train,
//! upload, notify) runs as its own task, with the training itself in a blocking thread that
//! checks an interrupt flag between batches. The owner task keeps reading commands while a round
//! trains, so a newer round or a finish interrupts the old work at once.
//!
//! # Commands
//! Which commands are followed, and when the client announces itself and its update again, is
//! decided by [`ClientMachine`] (`machine.rs`), a sans-IO state machine tested without sockets;
//! this file is its driver: it decodes and authenticates messages, runs each round's work and
//! publishes.
//!
//! # Store outages
//! Fetching the global model and storing the update are retried with back-off across transient
//! store errors until the round's deadline ([`crate::store::retry::until`]): a store that
//! restarts mid-round delays the round, it does not fail it.

mod error;
pub mod hooks;
pub mod machine;
mod secure;
mod trainer;

pub use error::{HookError, RoundError, TrainError};
pub use hooks::{ClientMemory, LocalHooks};
pub use machine::ClientMachine;

use machine::{Action, Event, JobOutcome};
pub use trainer::{
    split_scopes, DataTrainer, LocalTrainer, NoopTrainer, Trained, LOCAL_PARAMS_FILE,
};

use crate::crypto::seal::BlobCrypto;
use crate::proto::SERVER_ID;
use crate::proto::{
    self, BlobKeys, BlobRef, Body, Capabilities, Envelope, Failure, Role, Topics, Train, Update,
};
use crate::store::{self, BlobStore, SealedError, SealedStore};
use crate::tensor::ParamSet;
use crate::transport::{Incoming, MqttHandle, MqttSession, PresenceMessages, SessionOptions};
use rand::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The participant id of the client of rank `rank` (1-based, as FedML's ranks).
pub fn client_id(rank: usize) -> String {
    format!("client-{rank}")
}

/// Settings of a client.
#[derive(Clone)]
pub struct ClientOptions {
    /// Run id.
    pub run: String,
    /// Participant id ([`client_id`]).
    pub id: String,
    /// Blob key scheme (must match the server's).
    pub keys: BlobKeys,
    /// What the client announces.
    pub capabilities: Capabilities,
    /// Shared limit on clients training at once (in-process federations on one machine).
    pub train_slots: Option<Arc<Semaphore>>,
    /// How long to wait for the broker on start.
    pub connect_timeout: Duration,
    /// When set, only commands signed by the server's key in this ring are followed.
    pub keyring: Option<Arc<crate::crypto::identity::Keyring>>,
    /// When set, blobs are sealed ([`crate::crypto::seal`]): the global model must arrive sealed
    /// for this client, and updates are sealed for the server. The client stores and fetches
    /// through a [`SealedStore`] built from it.
    pub crypto: Option<Arc<BlobCrypto>>,
    /// Give up when the broker stays unreachable this long after the session was up (an edge's
    /// cloud link: `fedmq_args.edge_uplink_timeout_s`); `None`: reconnect for ever.
    pub link_timeout: Option<Duration>,
}

/// How a client's run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientReport {
    /// Rounds this client trained and reported.
    pub rounds_reported: u64,
    /// The server's finish reason, or why the client stopped.
    pub reason: String,
    /// The final model the server announced.
    pub final_model: Option<BlobRef>,
}

/// A failure to start the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The MQTT session could not be set up or the broker was not reached.
    #[error(transparent)]
    Mqtt(#[from] crate::transport::MqttError),
    /// The object store refused this client's credentials or stayed unreachable.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

/// How long a starting client waits for the object store to answer.
const STORE_CHECK: Duration = Duration::from_secs(30);

/// Checks at start that the store answers and accepts this client's credentials (a listing of
/// the run's checkpoints), so that wrong credentials fail the client at once, naming the settings,
/// rather than its first round. A bucket that does not exist yet is fine: the server creates it.
/// So is `AccessDenied`: the store verified the signature, and a participant's own credential
/// may not list (`store::access`).
async fn check_store(store: &BlobStore, keys: &BlobKeys) -> Result<(), ClientError> {
    let deadline = tokio::time::Instant::now() + STORE_CHECK;
    // HeadBucket first: every credential may send it to the embedded store, so a healthy start
    // leaves no refused request in the store's log. A 403 to it says nothing about why (HEAD
    // answers have no code), so the listing below tells wrong credentials from a policy.
    let headed = store::retry::until("checking the object store", deadline, || {
        store.head_bucket()
    })
    .await;
    match headed {
        Ok(()) | Err(store::Error::NoSuchBucket { .. }) => return Ok(()),
        Err(store::Error::Auth { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let prefix = keys.checkpoint_prefix();
    let listed = store::retry::until("checking the object store", deadline, || {
        store.list(&prefix)
    })
    .await;
    match listed {
        Ok(_) | Err(store::Error::NoSuchBucket { .. } | store::Error::Denied { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Runs the client until the server finishes the run or `cancel` fires.
///
/// # Errors
/// [`ClientError`] when the broker cannot be reached at start; everything after that (store
/// errors, training errors) is reported to the server as a round failure and the client goes on.
pub async fn run_client(
    opts: ClientOptions,
    mqtt: SessionOptions,
    store: BlobStore,
    trainer: Arc<dyn LocalTrainer>,
    cancel: CancellationToken,
) -> Result<ClientReport, ClientError> {
    let started_ms = proto::now_ms();
    let topics = Topics::new(&opts.run);
    let mut mqtt = mqtt;
    mqtt.client_id = topics.mqtt_client_id(&opts.id);
    mqtt.subscriptions = vec![topics.command(&opts.id), topics.status(SERVER_ID)];
    mqtt.presence = Some(PresenceMessages::status(
        &opts.run,
        &opts.id,
        Role::Client,
        Some(opts.capabilities.clone()),
    ));
    // Starting (the store check, the broker's first answer) can take seconds under load; a run
    // that ends meanwhile (`fedmq run` with many clients and few rounds) cancels it at once.
    let stopped = || ClientReport {
        rounds_reported: 0,
        reason: "cancelled while starting".to_string(),
        final_model: None,
    };
    tokio::select! {
        checked = check_store(&store, &opts.keys) => checked?,
        () = cancel.cancelled() => return Ok(stopped()),
    }
    let store = SealedStore::new(store, opts.crypto.clone());
    let endpoint = format!("{}:{}", mqtt.host, mqtt.port);
    let session_cancel = CancellationToken::new();
    let (handle, mut incoming) = MqttSession::connect(mqtt, session_cancel.clone())?;
    tokio::select! {
        started = handle.wait_started(&endpoint, opts.connect_timeout) => started?,
        () = cancel.cancelled() => {
            handle.shutdown().await;
            return Ok(stopped());
        }
    }
    info!(client = %opts.id, samples = trainer.num_samples(), "client online");

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, JobOutcome)>();
    let mut machine = ClientMachine::new(&opts.id, started_ms);
    // The round being trained: its interrupt flag, and where its stage messages go (secure
    // aggregation).
    let mut current: Option<(u64, Arc<AtomicBool>, mpsc::UnboundedSender<Envelope>)> = None;
    // The strategy's state on this client (SCAFFOLD's control variate), kept across rounds.
    let memory = Arc::new(ClientMemory::default());

    // When the broker link went down (with a link timeout): the client gives up after it.
    let mut link = handle.watch_state();
    let mut down_since: Option<tokio::time::Instant> = None;
    let (reason, final_model) = 'run: loop {
        let give_up = async {
            match (down_since, opts.link_timeout) {
                (Some(t), Some(limit)) => tokio::time::sleep_until(t + limit).await,
                _ => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            _ = cancel.cancelled() => break ("cancelled".to_string(), None),
            changed = link.changed(), if opts.link_timeout.is_some() => {
                if changed.is_err() {
                    break ("the MQTT session ended".to_string(), None);
                }
                let up = *link.borrow_and_update() == crate::transport::ConnState::Connected;
                match (up, down_since) {
                    (true, Some(_)) => {
                        info!(client = %opts.id, "broker link back");
                        down_since = None;
                    }
                    (false, None) => {
                        warn!(client = %opts.id, "broker link lost; reconnecting");
                        down_since = Some(tokio::time::Instant::now());
                    }
                    _ => {}
                }
                continue;
            }
            () = give_up => {
                let secs = opts.link_timeout.map_or(0, |d| d.as_secs());
                break (
                    format!(
                        "aborted: the broker stayed unreachable for {secs} s \
                         (fedmq_args.edge_uplink_timeout_s); check the link to {}",
                        endpoint
                    ),
                    None,
                );
            }
            Some((round, outcome)) = done_rx.recv() => Event::JobDone { round, outcome },
            msg = incoming.recv() => {
                let Some(m) = msg else {
                    break ("the MQTT session ended".to_string(), None);
                };
                match authenticate(&m, &topics, opts.keyring.as_deref()) {
                    Some(event) => event,
                    None => continue,
                }
            }
        };
        for action in machine.handle(event, proto::now_ms()) {
            match action {
                Action::Train { round, train } => {
                    let interrupt = Arc::new(AtomicBool::new(false));
                    let (stage_tx, stage_rx) = mpsc::unbounded_channel();
                    current = Some((round, interrupt.clone(), stage_tx));
                    let ctx = JobCtx {
                        run: opts.run.clone(),
                        id: opts.id.clone(),
                        up_topic: topics.up(&opts.id),
                        keys: opts.keys.clone(),
                        store: store.clone(),
                        handle: handle.clone(),
                        trainer: trainer.clone(),
                        slots: opts.train_slots.clone(),
                        memory: memory.clone(),
                    };
                    let tx = done_tx.clone();
                    tokio::spawn(async move {
                        let done = ctx.run(round, *train, interrupt, stage_rx).await;
                        let _ = tx.send((round, done));
                    });
                }
                Action::Stage { round, env } => match &current {
                    Some((r, _, stages)) if *r == round => {
                        let _ = stages.send(*env);
                    }
                    _ => debug!(round, "stage message for a round no longer in progress"),
                },
                Action::Interrupt { round } => {
                    if current.as_ref().is_some_and(|(r, _, _)| *r == round) {
                        // Dropping the stage sender ends a secure round's wait for messages.
                        if let Some((_, flag, _)) = current.take() {
                            flag.store(true, Ordering::Relaxed);
                        }
                    }
                }
                Action::Publish(env) => publish(&handle, &topics.up(&opts.id), &env).await,
                Action::Reannounce { window_ms, update } => {
                    let handle = handle.clone();
                    let up = topics.up(&opts.id);
                    let delay = Duration::from_millis(rand::rng().random_range(0..=window_ms));
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        if let Err(e) = handle.announce().await {
                            debug!("re-announcement not sent: {e}");
                        }
                        if let Some(env) = update {
                            publish(&handle, &up, &env).await;
                        }
                    });
                }
                Action::Stop {
                    reason,
                    final_model,
                } => break 'run (reason, final_model),
            }
        }
    };
    if let Some((_, flag, _)) = current.take() {
        flag.store(true, Ordering::Relaxed);
    }
    let rounds_reported = machine.rounds_reported();
    info!(client = %opts.id, rounds_reported, %reason, "client done");
    handle.shutdown().await;
    Ok(ClientReport {
        rounds_reported,
        reason,
        final_model,
    })
}

/// Decodes one message and checks its signature (when a key ring is set): the machine's event,
/// or `None` (logged) for a message that is malformed or not the server's.
fn authenticate(
    m: &Incoming,
    topics: &Topics,
    keyring: Option<&crate::crypto::identity::Keyring>,
) -> Option<Event> {
    let (kind, env) = match m.decode(topics) {
        Ok(x) => x,
        Err(e) => {
            warn!("message dropped: {e}");
            return None;
        }
    };
    if let Some(ring) = keyring {
        if let Err(reason) = ring.check_message(&m.payload, m.retained, &env) {
            warn!(topic = %m.topic, "message dropped: {reason}");
            return None;
        }
    }
    Some(Event::Message {
        kind,
        env: Box::new(env),
        retained: m.retained,
    })
}

async fn publish(handle: &MqttHandle, topic: &str, env: &Envelope) {
    if let Err(e) = handle.publish(topic, env, false).await {
        warn!(%topic, "publish failed: {e}");
    }
}

/// What one round's task needs.
struct JobCtx {
    run: String,
    id: String,
    up_topic: String,
    keys: BlobKeys,
    /// Opens the global model and seals the update (plaintext when not sealing).
    store: SealedStore,
    handle: MqttHandle,
    trainer: Arc<dyn LocalTrainer>,
    slots: Option<Arc<Semaphore>>,
    memory: Arc<ClientMemory>,
}

impl JobCtx {
    async fn run(
        self,
        round: u64,
        train: Train,
        interrupt: Arc<AtomicBool>,
        stages: mpsc::UnboundedReceiver<Envelope>,
    ) -> JobOutcome {
        let done = match &train.secagg {
            Some(setup) => self
                .secure_round(round, &train, setup, &interrupt, stages)
                .await
                .map(|()| None),
            None => self.train_round(round, &train, &interrupt).await.map(Some),
        };
        match done {
            Ok(Some(update)) => {
                let env = Envelope::new(&self.run, round, &self.id, Body::Update(update));
                publish(&self.handle, &self.up_topic, &env).await;
                JobOutcome::Reported(Box::new(env))
            }
            Ok(None) => JobOutcome::SecureDone,
            Err(_) if interrupt.load(Ordering::Relaxed) => {
                info!(client = %self.id, round, "round interrupted");
                JobOutcome::Interrupted
            }
            Err(reason) => {
                warn!(client = %self.id, round, "round failed: {reason}");
                let env = Envelope::new(
                    &self.run,
                    round,
                    &self.id,
                    Body::Failure(Failure {
                        reason: proto::clip_text(&reason.to_string()),
                    }),
                );
                publish(&self.handle, &self.up_topic, &env).await;
                JobOutcome::Failed
            }
        }
    }

    async fn train_round(
        &self,
        round: u64,
        train: &Train,
        interrupt: &Arc<AtomicBool>,
    ) -> Result<Update, RoundError> {
        let task = |what| move |source| RoundError::Task { what, source };
        let deadline = store_deadline(train);
        let (_, trained, mut finished) = self.fetch_and_train(round, train, interrupt).await?;
        let Trained {
            params, metrics, ..
        } = trained;
        let key = self.keys.update(round, &self.id);
        let sealing = self.store.clone();
        let extra = finished.tensors.take();
        let sealed = tokio::task::spawn_blocking(move || {
            let plain = match &extra {
                Some(t) => params.to_safetensors_bytes_with(proto::STRATEGY_TENSOR_PREFIX, t),
                None => params.to_safetensors_bytes(),
            };
            sealing.seal(&key, plain)
        })
        .await
        .map_err(task("encoding"))?;
        let blob = self
            .store_for_server(round, "update", &sealed, deadline)
            .await?;
        hooks::commit(&mut finished, &self.memory);
        Ok(Update {
            update: blob,
            num_samples: self.trainer.num_samples(),
            metrics,
            report: std::mem::take(&mut finished.report),
        })
    }

    /// Stores `sealed` (retried across a store outage until `deadline`) and references it for
    /// the server: its content key goes to the server alone.
    async fn store_for_server(
        &self,
        round: u64,
        what: &str,
        sealed: &store::Outgoing,
        deadline: tokio::time::Instant,
    ) -> Result<BlobRef, RoundError> {
        let what = format!("{}: storing the {what} of round {round}", self.id);
        let written = store::retry::until(&what, deadline, || self.store.put(sealed))
            .await
            .map_err(|e| RoundError::Store(Box::new(e)))?;
        self.store
            .reference_for(&written, SERVER_ID)
            .map_err(|e| RoundError::Seal(Box::new(e)))
    }

    /// Fetches the round's global model and trains on it: the global model (without the
    /// strategy's tensors; kept for secure rounds only), the trained model and what the
    /// strategy's hooks made of it.
    async fn fetch_and_train(
        &self,
        round: u64,
        train: &Train,
        interrupt: &Arc<AtomicBool>,
    ) -> Result<(Option<ParamSet>, Trained, hooks::Finished), RoundError> {
        let task = |what| move |source| RoundError::Task { what, source };
        // Store operations are retried across an outage until the round's deadline.
        let deadline = store_deadline(train);
        let what = format!("{}: fetching the global model of round {round}", self.id);
        let bytes = store::retry::until(&what, deadline, || self.store.get(&train.global))
            .await
            .map_err(|e| RoundError::Fetch(Box::new(e)))?;
        let store = self.store.clone();
        let blob = train.global.clone();
        let global = tokio::task::spawn_blocking(move || {
            let bytes = store.open(&blob, bytes).map_err(|e| match e {
                SealedError::NoKeys { key } => RoundError::NoKeys { key },
                e => RoundError::Open(Box::new(e)),
            })?;
            ParamSet::from_safetensors_bytes(&bytes).map_err(|e| RoundError::Decode(Box::new(e)))
        })
        .await
        .map_err(task("decoding"))??;
        let _permit = match &self.slots {
            Some(s) => Some(
                s.clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| RoundError::SlotsClosed)?,
            ),
            None => None,
        };
        if interrupt.load(Ordering::Relaxed) {
            return Err(RoundError::Interrupted);
        }
        let trainer = self.trainer.clone();
        let config = train.config.clone();
        let mut hooks = LocalHooks::from_instruction(train.strategy.as_ref())?;
        hooks.round = round;
        let flag = interrupt.clone();
        let memory = self.memory.clone();
        // A secure round masks the update (trained − global): the global model is kept.
        let keep = train.secagg.is_some();
        let (global, trained, finished) = tokio::task::spawn_blocking(move || {
            let mut global = global;
            let extra = global.split_prefix(proto::STRATEGY_TENSOR_PREFIX);
            let prepared = hooks::prepare(&mut hooks, &global, extra, &memory)?;
            let kept = keep.then(|| global.clone());
            let start = hooks.noise.map(|_| global.clone());
            let mut trained = trainer.train(global, &config, &hooks, &flag)?;
            if let (Some(noise), Some(start)) = (&hooks.noise, &start) {
                hooks::privatize(noise, start, &mut trained.params);
            }
            let finished = hooks::finish(&hooks, prepared, &trained, &config, &memory)?;
            Ok::<_, RoundError>((kept, trained, finished))
        })
        .await
        .map_err(task("training"))??;
        drop(_permit);
        if !trained.metrics.train_loss.is_finite() {
            return Err(RoundError::Diverged {
                what: "train loss",
                value: trained.metrics.train_loss,
            });
        }
        // A model that trains to finite losses can still measure non-finite on the test samples;
        // such sums do not serialize as numbers, and the server would drop the whole update.
        if let Some(eval) = &trained.metrics.eval {
            let sums = [Some(eval.loss_sum), eval.sq_err_sum, eval.abs_err_sum];
            if let Some(value) = sums.into_iter().flatten().find(|v| !v.is_finite()) {
                return Err(RoundError::Diverged {
                    what: "test loss",
                    value,
                });
            }
        }
        Ok((global, trained, finished))
    }
}

/// Until when a round's store operations are retried across an outage: its deadline.
fn store_deadline(train: &Train) -> tokio::time::Instant {
    let left = train.deadline_ms.saturating_sub(proto::now_ms());
    tokio::time::Instant::now() + Duration::from_millis(left)
}
