//! The client runtime: joins a run, follows the server's commands, trains, uploads, reports.
//!
//! One task owns the MQTT session and the client's state; each round's work (download, train,
//! upload, notify) runs as its own task, with the training itself in a blocking thread that
//! checks an interrupt flag between batches. The owner task keeps reading commands while a round
//! trains, so a newer round or a finish interrupts the old work at once.
//!
//! # Commands
//! - `train` for round `r`: ignored when it is a duplicate (same id), when round `r` is being
//!   trained, when `r` is older than the last round seen, or when its deadline has passed. When
//!   round `r` was already trained, the update already sent is announced again instead (never
//!   trained twice), so a lost notice is recovered by the server's re-send; when round `r`
//!   failed here (the store was down, say), a re-sent command trains it again. A newer round
//!   interrupts the round in progress.
//! - The server's `status` online with an id not seen before, after a first one (a server that
//!   restarted, or reconnected after a broker restart): the client announces itself again and
//!   re-announces its latest update when that is for the latest round it was asked to train,
//!   after a random delay within the status' `announce_window_ms`, so a server that lost
//!   track (a broker that dropped messages, a restarted server whose broker keeps its old
//!   subscription) learns who is there and what they sent without waiting for a deadline.
//! - `finish`: the client interrupts any work, publishes its offline status and exits. A finish
//!   kept retained by the broker from an earlier run (sent before this client started) is
//!   ignored.
//!
//! # Store outages
//! Fetching the global model and storing the update are retried with back-off across transient
//! store errors until the round's deadline ([`crate::store::retry::until`]): a store that
//! restarts mid-round delays the round, it does not fail it.

pub mod hooks;
mod trainer;

pub use hooks::{ClientMemory, LocalHooks};
pub use trainer::{DataTrainer, LocalTrainer, NoopTrainer, Trained};

use crate::proto::SERVER_ID;
use crate::proto::{
    self, BlobKeys, BlobRef, Body, Capabilities, Envelope, Failure, Role, TopicKind, Topics, Train,
    Update,
};
use crate::seal::BlobCrypto;
use crate::store::{self, BlobStore};
use crate::tensor::ParamSet;
use crate::transport::{
    Dedup, Incoming, MqttHandle, MqttSession, PresenceMessages, SessionOptions,
};
use bytes::Bytes;
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
    pub keyring: Option<Arc<crate::identity::Keyring>>,
    /// When set, blobs are sealed ([`crate::seal`]): the global model must arrive sealed for this
    /// client, and updates are sealed for the server.
    pub crypto: Option<Arc<BlobCrypto>>,
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

struct Job {
    round: u64,
    interrupt: Arc<AtomicBool>,
}

enum JobDone {
    Reported(Box<Envelope>),
    Failed,
    Interrupted,
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
    check_store(&store, &opts.keys).await?;
    let endpoint = format!("{}:{}", mqtt.host, mqtt.port);
    let session_cancel = CancellationToken::new();
    let (handle, mut incoming) = MqttSession::connect(mqtt, session_cancel.clone())?;
    handle.wait_started(&endpoint, opts.connect_timeout).await?;
    info!(client = %opts.id, samples = trainer.num_samples(), "client online");

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, JobDone)>();
    let mut dedup = Dedup::default();
    let mut current: Option<Job> = None;
    // Highest round a command was accepted for; older commands are stale.
    let mut last_round = 0u64;
    let mut last_update: Option<Envelope> = None;
    let mut rounds_reported = 0u64;
    // Whether a server online status was seen yet: the first one (often retained from before
    // this client started) needs no re-announcement, the client has just announced itself.
    let mut seen_server = false;
    // The strategy's state on this client (SCAFFOLD's control variate), kept across rounds.
    let memory = Arc::new(ClientMemory::default());

    let (reason, final_model) = loop {
        tokio::select! {
            _ = cancel.cancelled() => break ("cancelled".to_string(), None),
            Some((round, done)) = done_rx.recv() => {
                if current.as_ref().is_some_and(|j| j.round == round) {
                    current = None;
                }
                match done {
                    JobDone::Reported(env) => {
                        rounds_reported += 1;
                        last_update = Some(*env);
                    }
                    JobDone::Failed | JobDone::Interrupted => {}
                }
            }
            msg = incoming.recv() => {
                let Some(m) = msg else {
                    break ("the MQTT session ended".to_string(), None);
                };
                match on_command(&m, &topics, &mut dedup, started_ms, opts.keyring.as_deref()) {
                    Command::Ignore => {}
                    Command::ServerOnline { window } => {
                        if !std::mem::replace(&mut seen_server, true) {
                            continue;
                        }
                        // The latest update, unless a round is in progress (its update will be
                        // announced when done) or a newer round was asked for.
                        let update = last_update
                            .as_ref()
                            .filter(|e| current.is_none() && e.round == last_round)
                            .cloned();
                        info!(
                            client = %opts.id,
                            update_round = update.as_ref().map(|e| e.round),
                            "the server (re)connected; announcing this client again"
                        );
                        let handle = handle.clone();
                        let up = topics.up(&opts.id);
                        let delay = Duration::from_millis(rand::rng().random_range(0..=window));
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
                    Command::Finish { reason, final_model } => break (reason, final_model),
                    Command::Train { round, id, train } => {
                        if round < last_round
                            || current.as_ref().is_some_and(|j| j.round >= round)
                        {
                            info!(client = %opts.id, round, last_round, "stale or duplicate train command ignored");
                            continue;
                        }
                        if round == last_round && current.is_none() {
                            // Trained already: announce the same update again (the server
                            // drops it if it has it), never train twice. A round that failed
                            // here is trained again (below).
                            if let Some(env) = last_update.as_ref().filter(|e| e.round == round) {
                                info!(client = %opts.id, round, "round already trained; update announced again");
                                publish(&handle, &topics.up(&opts.id), env).await;
                                continue;
                            }
                            info!(client = %opts.id, round, "round re-sent after a failure here; training it again");
                        }
                        if train.deadline_ms <= proto::now_ms() {
                            info!(client = %opts.id, round, "train command past its deadline ignored");
                            continue;
                        }
                        if let Some(old) = current.take() {
                            info!(client = %opts.id, old = old.round, round, "newer round: interrupting the old one");
                            old.interrupt.store(true, Ordering::Relaxed);
                        }
                        debug!(client = %opts.id, round, command = %id, "training");
                        last_round = round;
                        let interrupt = Arc::new(AtomicBool::new(false));
                        current = Some(Job { round, interrupt: interrupt.clone() });
                        let ctx = JobCtx {
                            run: opts.run.clone(),
                            id: opts.id.clone(),
                            up_topic: topics.up(&opts.id),
                            keys: opts.keys.clone(),
                            store: store.clone(),
                            handle: handle.clone(),
                            trainer: trainer.clone(),
                            slots: opts.train_slots.clone(),
                            crypto: opts.crypto.clone(),
                            memory: memory.clone(),
                        };
                        let tx = done_tx.clone();
                        tokio::spawn(async move {
                            let done = ctx.run(round, train, interrupt).await;
                            let _ = tx.send((round, done));
                        });
                    }
                }
            }
        }
    };
    if let Some(j) = current.take() {
        j.interrupt.store(true, Ordering::Relaxed);
    }
    info!(client = %opts.id, rounds_reported, %reason, "client done");
    handle.shutdown().await;
    Ok(ClientReport {
        rounds_reported,
        reason,
        final_model,
    })
}

enum Command {
    Ignore,
    /// The server's online status, with a new id: it asks to be told who is there.
    ServerOnline {
        window: u64,
    },
    Train {
        round: u64,
        id: String,
        train: Train,
    },
    Finish {
        reason: String,
        final_model: Option<BlobRef>,
    },
}

fn on_command(
    m: &Incoming,
    topics: &Topics,
    dedup: &mut Dedup,
    started_ms: u64,
    keyring: Option<&crate::identity::Keyring>,
) -> Command {
    let (kind, env) = match m.decode(topics) {
        Ok(x) => x,
        Err(e) => {
            warn!("message dropped: {e}");
            return Command::Ignore;
        }
    };
    if let Some(ring) = keyring {
        if let Err(reason) = ring.check_message(&m.payload, m.retained, &env) {
            warn!(topic = %m.topic, "message dropped: {reason}");
            return Command::Ignore;
        }
    }
    if !dedup.first_time(&env) {
        debug!(id = %env.id, "duplicate dropped");
        return Command::Ignore;
    }
    match (kind, env.body) {
        (TopicKind::Status(_), Body::Status(s)) => {
            info!(state = ?s.state, "server status");
            match (s.state, s.role) {
                (proto::Presence::Online, Role::Server) => Command::ServerOnline {
                    window: s
                        .announce_window_ms
                        .unwrap_or(0)
                        .min(MAX_ANNOUNCE_WINDOW_MS),
                },
                _ => Command::Ignore,
            }
        }
        (TopicKind::Command(_), Body::Train(t)) => Command::Train {
            round: env.round,
            id: env.id,
            train: t,
        },
        (TopicKind::Command(_), Body::Finish(f)) => {
            if m.retained && env.ts_ms < started_ms {
                info!(
                    reason = %f.reason,
                    "a finish kept by the broker from an earlier run was ignored; waiting for the server"
                );
                return Command::Ignore;
            }
            Command::Finish {
                reason: f.reason,
                final_model: f.final_model,
            }
        }
        _ => Command::Ignore,
    }
}

async fn publish(handle: &MqttHandle, topic: &str, env: &Envelope) {
    if let Err(e) = handle.publish(topic, env, false).await {
        warn!(%topic, "publish failed: {e}");
    }
}

/// Longest delay before a re-announcement, whatever the server asks (a bound on how long a
/// forged or mistaken window can keep a client quiet).
const MAX_ANNOUNCE_WINDOW_MS: u64 = 60_000;

/// What one round's task needs.
struct JobCtx {
    run: String,
    id: String,
    up_topic: String,
    keys: BlobKeys,
    store: BlobStore,
    handle: MqttHandle,
    trainer: Arc<dyn LocalTrainer>,
    slots: Option<Arc<Semaphore>>,
    crypto: Option<Arc<BlobCrypto>>,
    memory: Arc<ClientMemory>,
}

impl JobCtx {
    async fn run(self, round: u64, train: Train, interrupt: Arc<AtomicBool>) -> JobDone {
        match self.train_round(round, &train, &interrupt).await {
            Ok(update) => {
                let env = Envelope::new(&self.run, round, &self.id, Body::Update(update));
                publish(&self.handle, &self.up_topic, &env).await;
                JobDone::Reported(Box::new(env))
            }
            Err(_) if interrupt.load(Ordering::Relaxed) => {
                info!(client = %self.id, round, "round interrupted");
                JobDone::Interrupted
            }
            Err(reason) => {
                warn!(client = %self.id, round, "round failed: {reason}");
                let env = Envelope::new(
                    &self.run,
                    round,
                    &self.id,
                    Body::Failure(Failure {
                        reason: proto::clip_text(&reason),
                    }),
                );
                publish(&self.handle, &self.up_topic, &env).await;
                JobDone::Failed
            }
        }
    }

    async fn train_round(
        &self,
        round: u64,
        train: &Train,
        interrupt: &Arc<AtomicBool>,
    ) -> Result<Update, String> {
        // Store operations are retried across an outage until the round's deadline.
        let left = train.deadline_ms.saturating_sub(proto::now_ms());
        let deadline = tokio::time::Instant::now() + Duration::from_millis(left);
        let what = format!("{}: fetching the global model of round {round}", self.id);
        let bytes = store::retry::until(&what, deadline, || self.store.get(&train.global))
            .await
            .map_err(|e| format!("fetching the global model: {e}"))?;
        let crypto = self.crypto.clone();
        let blob = train.global.clone();
        let global = tokio::task::spawn_blocking(move || {
            let bytes = match (&crypto, &blob.wrapped_key) {
                (Some(c), _) => c.open(&blob, bytes).map_err(|e| e.to_string())?,
                (None, None) => bytes,
                (None, Some(_)) => {
                    return Err(format!(
                        "{}: the server sealed the global model, but this client has no \
                         encryption keys (set fedmq_args.signing_key and trusted_keys)",
                        blob.key
                    ))
                }
            };
            ParamSet::from_safetensors_bytes(&bytes)
                .map_err(|e| format!("the global model does not decode: {e}"))
        })
        .await
        .map_err(|e| format!("decoding task failed: {e}"))??;
        let _permit = match &self.slots {
            Some(s) => Some(
                s.clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| "training slots closed".to_string())?,
            ),
            None => None,
        };
        if interrupt.load(Ordering::Relaxed) {
            return Err("interrupted".into());
        }
        let trainer = self.trainer.clone();
        let config = train.config.clone();
        let mut hooks = LocalHooks::from_instruction(train.strategy.as_ref())?;
        let flag = interrupt.clone();
        let memory = self.memory.clone();
        let (trained, mut finished) = tokio::task::spawn_blocking(move || {
            let mut global = global;
            let extra = global.split_prefix(proto::STRATEGY_TENSOR_PREFIX);
            let prepared = hooks::prepare(&mut hooks, &global, extra, &memory)?;
            let trained = trainer.train(global, &config, &hooks, &flag)?;
            let finished = hooks::finish(&hooks, prepared, &trained, &config, &memory)?;
            Ok::<_, String>((trained, finished))
        })
        .await
        .map_err(|e| format!("training task failed: {e}"))??;
        drop(_permit);
        let Trained {
            params, metrics, ..
        } = trained;
        if !metrics.train_loss.is_finite() {
            return Err(format!(
                "training diverged (train loss {}); lower train_args.learning_rate",
                metrics.train_loss
            ));
        }
        let key = self.keys.update(round, &self.id);
        let crypto = self.crypto.clone();
        let sealed_key = key.clone();
        let extra = finished.tensors.take();
        let (bytes, content_key) = tokio::task::spawn_blocking(move || {
            let plain = match &extra {
                Some(t) => params.to_safetensors_bytes_with(proto::STRATEGY_TENSOR_PREFIX, t),
                None => params.to_safetensors_bytes(),
            };
            match &crypto {
                Some(c) => {
                    let (sealed, ck) = c.seal(&sealed_key, &plain);
                    (sealed, Some(ck))
                }
                None => (plain, None),
            }
        })
        .await
        .map_err(|e| format!("encoding task failed: {e}"))?;
        let bytes = Bytes::from(bytes);
        let what = format!("{}: storing the update of round {round}", self.id);
        let mut blob = store::retry::until(&what, deadline, || self.store.put(&key, bytes.clone()))
            .await
            .map_err(|e| format!("storing the update: {e}"))?;
        if let (Some(c), Some(ck)) = (&self.crypto, &content_key) {
            blob = c
                .wrapped_ref(&blob, ck, SERVER_ID)
                .map_err(|e| format!("sealing the update for the server: {e}"))?;
        }
        hooks::commit(&mut finished, &self.memory);
        Ok(Update {
            update: blob,
            num_samples: self.trainer.num_samples(),
            metrics,
            report: std::mem::take(&mut finished.report),
        })
    }
}
