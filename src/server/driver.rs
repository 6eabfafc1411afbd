//! The server's async driver: MQTT, the object store, timers and evaluation around the sans-IO
//! [`RoundMachine`].
//!
//! One task owns the machine. It waits on four sources, turns each into an [`Event`], and
//! carries out the [`Action`]s the machine returns:
//! - MQTT publishes (`status/+`, `up/+`), admitted by `Admission` (decoded, per-sender
//!   budgets, signatures, duplicates; `admission.rs`);
//! - results of transfer tasks (the global upload, update fetches), sent back over a channel;
//! - the machine's next deadline ([`RoundMachine::next_deadline`]);
//! - cancellation (Ctrl-C): the run ends as aborted, clients are told, the last checkpoint stays.
//!
//! Update fetches run at most `fetch_concurrency` at a time, and each decoded update is folded
//! into the streaming aggregate as soon as it arrives, so the server holds the global model, the
//! running aggregate and the updates in flight — never one model per client.
//!
//! Checkpoints are written by a `Checkpointer` and read back on resume (`checkpoint.rs`).

use super::admission::Admission;
use super::checkpoint::{
    load_checkpoint_model, load_checkpoint_state, open_failed, Checkpoint, Checkpointer,
};
use super::machine::{Action, Event, Outcome, RoundConfig, RoundMachine, RoundSummary};
use crate::crypto::identity::Keyring;
use crate::crypto::seal::BlobCrypto;
use crate::health::Health;
use crate::metrics::{MetricsWriter, RoundRecord};
use crate::proto::{self, BlobKeys, BlobRef, Body, Envelope, Finish, Role, Topics, Train};
use crate::store::{self, BlobStore, RetentionPolicy, SealedStore, Written};
use crate::strategy::Strategy;
use crate::tensor::ParamSet;
use crate::transport::{MqttHandle, MqttSession, PresenceMessages, SessionOptions};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long clients may take to announce themselves again when the server (re)connects: 2 ms
/// per expected client, at least 1 s and at most 10 s, so that a fleet's re-announcements are
/// spread out rather than arriving at once.
pub fn announce_window(expected_clients: usize) -> Duration {
    Duration::from_millis((2 * expected_clients as u64).clamp(1_000, 10_000))
}

/// Shortest interval between two "who is there" requests while clients are missing.
const ASK_EVERY_MIN: Duration = Duration::from_secs(5);

/// The server's participant id (`from` of its messages, its status topic).
pub use crate::proto::SERVER_ID;

/// Evaluates a global model on the server's test data.
pub trait Evaluator: Send + Sync + 'static {
    /// Test accuracy (fraction) and mean loss of `params`.
    ///
    /// # Errors
    /// A message saying why the model cannot be evaluated.
    fn evaluate(&self, params: &ParamSet) -> Result<Evaluation, String>;
}

/// Result of [`Evaluator::evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Fraction of correctly classified test samples.
    pub accuracy: f64,
    /// Mean test loss.
    pub loss: f64,
    /// Further measures of the model (`backdoor_success`: the fraction of triggered test inputs
    /// given the attacker's label), recorded with the strategy's metrics of the round.
    pub extra: BTreeMap<String, f64>,
}

/// What the server does, beyond the round policy.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Run id (topics and blob keys).
    pub run: String,
    /// Blob key scheme.
    pub keys: BlobKeys,
    /// Round policy.
    pub round: RoundConfig,
    /// Client ids expected in this run: their retained commands from an earlier run with the
    /// same id are cleared before round 1.
    pub expected_clients: Vec<String>,
    /// Which rounds' blobs to keep in the store.
    pub retention: RetentionPolicy,
    /// Update downloads in flight at once (each holds one model in memory); 0 picks
    /// [`auto_fetch_concurrency`] from the model's size.
    pub fetch_concurrency: usize,
    /// Where the final model (`final_model.safetensors`) is written, if anywhere.
    pub output_dir: Option<PathBuf>,
    /// How long to wait for the broker on start.
    pub connect_timeout: Duration,
    /// When set, only messages signed by a key in this ring are accepted (clients' keys);
    /// unsigned, unknown, revoked, forged and stale ones are dropped with a logged reason.
    pub keyring: Option<Arc<Keyring>>,
    /// When set, every blob is sealed ([`crate::crypto::seal`]): the global and final models for
    /// each client they are sent to, checkpoints for the server itself; updates must arrive sealed
    /// for the server. The driver stores and fetches through a [`SealedStore`] built from it.
    pub crypto: Option<Arc<BlobCrypto>>,
    /// What the health and metrics endpoints report ([`crate::health`]), kept up to date.
    pub health: Option<Arc<Health>>,
}

/// A paced server's link to its upstream (an edge's site: [`run_site_server`]).
pub struct SiteLink {
    /// Rounds, and the end of the run, from the upstream.
    pub commands: mpsc::UnboundedReceiver<SiteCommand>,
    /// Set once enough clients are online to start a round, to the samples the online clients
    /// announced (updated as clients come and go): what the edge may claim upstream.
    pub ready: tokio::sync::watch::Sender<Option<u64>>,
}

/// What the upstream asks of a paced server.
pub enum SiteCommand {
    /// Run a round from `global` with the upstream's training settings; its result goes to
    /// `reply`.
    Round {
        /// The upstream's model.
        global: ParamSet,
        /// The upstream's local-training settings.
        train: Option<proto::TrainConfig>,
        /// Where the round's result goes.
        reply: std::sync::mpsc::Sender<Result<SiteRound, String>>,
    },
    /// The upstream's run is over: tell the clients and stop.
    Finish(Outcome),
}

/// A paced server's closed round, as its upstream sees it.
#[derive(Debug, Clone)]
pub struct SiteRound {
    /// The site's round number.
    pub round: u64,
    /// The aggregated model.
    pub global: ParamSet,
    /// Samples behind it.
    pub num_samples: u64,
    /// Sample-weighted mean training loss of the participants.
    pub train_loss: f64,
    /// Updates aggregated.
    pub participants: usize,
    /// The round's metrics (the strategy's, and the clients' own evaluations).
    pub metrics: BTreeMap<String, f64>,
}

/// Progress notifications for a user interface (progress bars, logs).
#[derive(Debug, Clone)]
pub enum Progress {
    /// Waiting for clients: `online` of `needed`.
    Admitting {
        /// Clients online.
        online: usize,
        /// Clients needed.
        needed: usize,
    },
    /// Train commands went out.
    RoundStarted {
        /// Round.
        round: u64,
        /// Clients asked.
        selected: usize,
    },
    /// An update was folded into the aggregate.
    UpdateFolded {
        /// Round.
        round: u64,
        /// The client.
        client: String,
    },
    /// A round closed (after evaluation, when evaluated).
    RoundClosed(RoundRecord),
    /// The run ended.
    Finished(Outcome),
}

/// How the run went.
#[derive(Debug, Clone)]
pub struct ServerReport {
    /// Completed or aborted (with the reason).
    pub outcome: Outcome,
    /// One record per closed round.
    pub records: Vec<RoundRecord>,
    /// The final model in the store (when the run completed and it could be stored).
    pub final_model: Option<BlobRef>,
    /// The final model on disk (when `output_dir` was given).
    pub final_path: Option<PathBuf>,
    /// The final global model.
    pub final_params: ParamSet,
    /// Wall seconds from start to finish.
    pub wall_s: f64,
}

/// Errors that stop the server before or outside a round (round-level problems are outcomes).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The MQTT session could not be set up or the broker was not reached.
    #[error(transparent)]
    Mqtt(#[from] crate::transport::MqttError),
    /// The object store could not be used at start.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    /// Reading or writing a checkpoint failed.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

/// Result of a transfer task, back to the driver loop.
enum TaskDone {
    Stored {
        round: u64,
        written: Written,
    },
    StoreFailed {
        round: u64,
        reason: String,
    },
    Fetched {
        client: String,
        round: u64,
        result: Result<Bytes, String>,
        /// Held until the update is folded: bounds the updates in memory.
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    /// A secure round's share bundle, fetched (or not).
    Bundle {
        client: String,
        round: u64,
        result: Result<Bytes, String>,
    },
}

struct RoundBytes {
    round: u64,
    global_len: u64,
    commands: usize,
    updates: u64,
}

/// Memory the server spends on updates being downloaded (see [`auto_fetch_concurrency`]).
pub const FETCH_MEMORY: usize = 64 << 20;

/// Most update downloads at once when the server picks: beyond it the store, not the number of
/// requests in flight, limits the rate (`fedmq bench round` at N = 1,000, P = 100k: 1 → 3.85 s,
/// 8 → 3.17 s per round).
pub const MAX_AUTO_FETCHES: usize = 8;

/// Update downloads in flight when `fetch_concurrency` is 0: as many models of `model_bytes` as
/// fit in [`FETCH_MEMORY`], at least 1 and at most [`MAX_AUTO_FETCHES`]. Each download hides
/// the store's latency behind the others, so small models are fetched in parallel and large
/// ones one at a time (the server's memory stays independent of the number of clients).
#[must_use]
pub fn auto_fetch_concurrency(model_bytes: usize) -> usize {
    (FETCH_MEMORY / model_bytes.max(1)).clamp(1, MAX_AUTO_FETCHES)
}

/// The server's run: connects, admits clients, runs the rounds, finishes. Returns when the run
/// is over (completed or aborted) or `cancel` fires.
///
/// # Errors
/// [`ServerError`] only for problems at start (broker unreachable, store unusable); everything
/// that happens during rounds ends in a [`ServerReport`] with an [`Outcome`].
#[allow(clippy::too_many_arguments)] // each is a distinct collaborator; a struct would only rename them
pub async fn run_server(
    opts: ServerOptions,
    mqtt: SessionOptions,
    store: BlobStore,
    strategy: Box<dyn Strategy>,
    initial: ParamSet,
    resume_from: Option<Checkpoint>,
    evaluator: Option<Arc<dyn Evaluator>>,
    progress: impl FnMut(&Progress) + Send,
    cancel: CancellationToken,
) -> Result<ServerReport, ServerError> {
    let link = None;
    let parts = (strategy, initial, resume_from, evaluator);
    serve_rounds(opts, mqtt, store, parts, link, progress, cancel).await
}

/// The server of an edge's site: rounds paced by the upstream over `link` (the machine's
/// [`RoundConfig::paced`] is set here). Each round starts from the upstream's model when
/// [`SiteCommand::Round`] arrives and its aggregate (or failure) goes back to the round's
/// reply; [`SiteCommand::Finish`] ends the run and tells the clients.
///
/// # Errors
/// As [`run_server`].
pub async fn run_site_server(
    mut opts: ServerOptions,
    mqtt: SessionOptions,
    store: BlobStore,
    strategy: Box<dyn Strategy>,
    link: SiteLink,
    progress: impl FnMut(&Progress) + Send,
    cancel: CancellationToken,
) -> Result<ServerReport, ServerError> {
    opts.round.paced = true;
    let parts = (strategy, ParamSet::default(), None, None);
    serve_rounds(opts, mqtt, store, parts, Some(link), progress, cancel).await
}

/// The strategy, initial model, checkpoint to resume from and evaluator of a run.
type RunParts = (
    Box<dyn Strategy>,
    ParamSet,
    Option<Checkpoint>,
    Option<Arc<dyn Evaluator>>,
);

async fn serve_rounds(
    opts: ServerOptions,
    mqtt: SessionOptions,
    store: BlobStore,
    (strategy, initial, resume_from, evaluator): RunParts,
    mut link: Option<SiteLink>,
    mut progress: impl FnMut(&Progress) + Send,
    cancel: CancellationToken,
) -> Result<ServerReport, ServerError> {
    let started = Instant::now();
    let topics = Topics::new(&opts.run);
    let mut mqtt = mqtt;
    mqtt.client_id = topics.mqtt_client_id(SERVER_ID);
    mqtt.subscriptions = vec![topics.status_all(), topics.up_all()];
    mqtt.presence = Some(
        PresenceMessages::status(&opts.run, SERVER_ID, Role::Server, None)
            .with_announce_window(announce_window(opts.expected_clients.len())),
    );
    let endpoint = format!("{}:{}", mqtt.host, mqtt.port);
    store.ensure_bucket().await?;
    let store = SealedStore::new(store, opts.crypto.clone());
    // The session has its own token: after `cancel` the server still tells the clients that the
    // run is over, then shuts the session down itself.
    let (handle, mut incoming) = MqttSession::connect(mqtt, CancellationToken::new())?;
    handle.wait_started(&endpoint, opts.connect_timeout).await?;
    for c in &opts.expected_clients {
        handle.clear_retained(&topics.command(c)).await?;
    }
    if let Some(h) = &opts.health {
        // Ready while the broker session is up (the store answered at start).
        let (h, mut state) = (h.clone(), handle.watch_state());
        tokio::spawn(async move {
            loop {
                let up = *state.borrow_and_update() == crate::transport::ConnState::Connected;
                h.set_connected(up);
                if state.changed().await.is_err() {
                    h.set_connected(false);
                    break;
                }
            }
        });
    }

    let fetch_concurrency = match opts.fetch_concurrency {
        0 => auto_fetch_concurrency(initial.byte_len()),
        n => n,
    };
    let mut machine = RoundMachine::new(opts.round.clone(), strategy, initial, Instant::now());
    if let Some(cp) = &resume_from {
        let tensors = match &cp.state_blob {
            Some(r) => Some(load_checkpoint_state(&store, r).await?),
            None => None,
        };
        machine
            .strategy_mut()
            .restore(&cp.state, tensors)
            .map_err(|e| ServerError::Checkpoint(e.to_string()))?;
    }
    let mut driver = Driver {
        admission: Admission::new(opts.keyring.clone()),
        checkpoints: Checkpointer::new(store.clone(), opts.keys.clone(), opts.run.clone()),
        topics,
        handle,
        store,
        opts,
        evaluator,
        tasks: mpsc::unbounded_channel(),
        fetch_slots: Arc::new(Semaphore::new(1)),
        known_clients: BTreeSet::new(),
        records: Vec::new(),
        round_bytes: None,
        started,
        last_admitting: None,
        metrics: None,
        held_permit: None,
        cleanup_task: None,
        global: None,
        elapsed_before: 0.0,
        replies: VecDeque::new(),
    };
    if let Some(dir) = &driver.opts.output_dir {
        // A resumed run appends to the metrics of the rounds its checkpoint covers.
        let opened = match &resume_from {
            Some(cp) => MetricsWriter::resume(dir, cp.round),
            None => MetricsWriter::create(dir),
        };
        match opened {
            Ok(w) => {
                // Elapsed time goes on from the last recorded round.
                let before = w.records().last().map_or(0.0, |r| r.elapsed_s);
                driver.elapsed_before = before;
                driver.metrics = Some(w);
            }
            Err(e) => warn!("metrics will not be written: {e}"),
        }
    }
    driver.fetch_slots = Arc::new(Semaphore::new(fetch_concurrency));
    if let Some(cp) = resume_from {
        info!(round = cp.round, "resuming from checkpoint");
        let model = load_checkpoint_model(&driver.store, &cp).await?;
        machine.resume(cp.round, model);
    }
    let clients_needed = driver.opts.round.min_clients;
    progress(&Progress::Admitting {
        online: 0,
        needed: clients_needed,
    });

    // While clients are missing at admission, the server asks who is there: a fresh online
    // status, which every client answers by announcing itself again within the window. Presence
    // then never depends on what a broker does with retained messages.
    let window = announce_window(driver.opts.expected_clients.len());
    let ask_every = (2 * window).max(ASK_EVERY_MIN);
    let mut next_ask = Instant::now() + ask_every;
    // Whether the machine was admitting clients when the last event reached it.
    let mut in_admission = true;
    let outcome = loop {
        let deadline = machine.next_deadline();
        let asking = machine.current_round().is_none()
            && !machine.is_finished()
            && machine.online_clients().len() < clients_needed;
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            _ = cancel.cancelled() => {
                break Outcome::Aborted("interrupted (the last checkpoint is in the store)".into());
            }
            msg = incoming.recv() => match msg {
                Some(m) => match driver.on_message(m) {
                    Some(e) => e,
                    None => continue,
                },
                None => break Outcome::Aborted("the MQTT session ended".into()),
            },
            Some(done) = driver.tasks.1.recv() => match driver.on_task(done).await {
                Some(e) => e,
                None => continue,
            },
            cmd = next_command(&mut link) => match cmd {
                Some(SiteCommand::Round { global, train, reply }) => {
                    // One round pending besides the one in progress: an older pending round is
                    // superseded (its upstream gave up on it).
                    let cap = if machine.current_round().is_some() { 2 } else { 1 };
                    while driver.replies.len() >= cap {
                        if let Some(old) = driver.replies.pop_back() {
                            let _ = old.send(Err("superseded by a newer round from the upstream".into()));
                        }
                    }
                    driver.replies.push_back(reply);
                    Event::Upstream { global, train }
                }
                Some(SiteCommand::Finish(outcome)) => Event::UpstreamFinished { outcome },
                None => {
                    // The upstream is gone: nothing will pace this server again.
                    link = None;
                    Event::UpstreamFinished {
                        outcome: Outcome::Aborted("the edge's upstream link ended".into()),
                    }
                }
            },
            _ = sleep => Event::Tick,
            _ = tokio::time::sleep_until(next_ask.into()), if asking => {
                let online = machine.online_clients().len();
                info!(online, needed = clients_needed, "clients missing; asking who is there");
                if let Err(e) = driver.handle.announce().await {
                    warn!("asking who is there failed: {e}");
                }
                next_ask = Instant::now() + ask_every;
                continue;
            }
        };
        let admitting = machine.current_round().is_none() && machine.completed_rounds() == 0;
        let folded = match &event {
            Event::UpdateFetched { client, round, .. } => Some((client.clone(), *round)),
            _ => None,
        };
        let presence = matches!(
            event,
            Event::ClientOnline { .. } | Event::ClientOffline { .. }
        );
        in_admission = machine.current_round().is_none() && !machine.is_finished();
        let actions = machine.handle(event, Instant::now());
        driver.held_permit = None;
        if presence {
            let online = machine.online_count();
            if let Some(h) = &driver.opts.health {
                h.set_online(online);
            }
            if let Some(l) = &link {
                let samples = (online >= clients_needed.max(1)).then(|| machine.online_samples());
                l.ready.send_if_modified(|v| {
                    let changed = *v != samples && samples.is_some();
                    if changed {
                        *v = samples;
                    }
                    changed
                });
            }
        }
        if let Some((client, round)) = folded {
            progress(&Progress::UpdateFolded { round, client });
        }
        if admitting {
            let online = machine.online_clients().len();
            if driver.last_admitting != Some(online) {
                driver.last_admitting = Some(online);
                progress(&Progress::Admitting {
                    online,
                    needed: clients_needed,
                });
            }
        }
        let sends: Vec<u64> = actions
            .iter()
            .filter_map(|a| match a {
                Action::SendTrain { round, .. } => Some(*round),
                _ => None,
            })
            .collect();
        if let Some(&round) = sends.first() {
            progress(&Progress::RoundStarted {
                round,
                selected: sends.len(),
            });
        }
        let mut finished = None;
        for a in actions {
            if let Some(o) = driver.act(a, &mut machine, &mut progress).await {
                finished = Some(o);
            }
        }
        if let Some(o) = finished {
            break o;
        }
    };
    let outcome = match outcome {
        Outcome::Aborted(why) if in_admission => {
            // Aborted at admission: name who never came.
            let online: BTreeSet<String> = machine.online_clients().into_iter().collect();
            let missing: Vec<&String> = driver
                .opts
                .expected_clients
                .iter()
                .filter(|c| !online.contains(*c))
                .collect();
            if missing.is_empty() {
                Outcome::Aborted(why)
            } else {
                let first: Vec<&str> = missing.iter().take(10).map(|c| c.as_str()).collect();
                let more = missing.len().saturating_sub(first.len());
                let tail = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                warn!(
                    missing = missing.len(),
                    "expected clients never seen online: {}{tail}",
                    first.join(", ")
                );
                Outcome::Aborted(format!(
                    "{why} (not online: {} of the expected clients: {}{tail})",
                    missing.len(),
                    first.join(", ")
                ))
            }
        }
        other => other,
    };
    for reply in driver.replies.drain(..) {
        let _ = reply.send(Err(format!("the site's run ended: {}", outcome.summary())));
    }
    let report = driver.finish(outcome, &mut machine).await;
    if let Some(h) = &driver.opts.health {
        h.finished(&report.outcome.summary());
    }
    progress(&Progress::Finished(report.outcome.clone()));
    driver.handle.shutdown().await;
    Ok(ServerReport {
        wall_s: started.elapsed().as_secs_f64(),
        ..report
    })
}

struct Driver {
    topics: Topics,
    handle: MqttHandle,
    /// Seals what the server stores and opens what it fetches (plaintext when not sealing).
    store: SealedStore,
    opts: ServerOptions,
    evaluator: Option<Arc<dyn Evaluator>>,
    /// Decides which incoming messages reach the machine.
    admission: Admission,
    /// Writes each closed round's checkpoint once its model is stored.
    checkpoints: Checkpointer,
    tasks: (
        mpsc::UnboundedSender<TaskDone>,
        mpsc::UnboundedReceiver<TaskDone>,
    ),
    fetch_slots: Arc<Semaphore>,
    known_clients: BTreeSet<String>,
    records: Vec<RoundRecord>,
    round_bytes: Option<RoundBytes>,
    started: Instant,
    last_admitting: Option<usize>,
    /// `metrics.jsonl` / `metrics.csv` in the output directory.
    metrics: Option<MetricsWriter>,
    /// The fetch slot of the update being folded.
    held_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The latest deletion of old rounds' blobs (awaited before the run returns).
    cleanup_task: Option<tokio::task::JoinHandle<()>>,
    /// The latest global model stored, by round: each client's train command refers to it with
    /// its content key wrapped to that client.
    global: Option<(u64, Written)>,
    /// Seconds the run had taken before this server resumed it (from its metrics).
    elapsed_before: f64,
    /// A paced server's upstream rounds, oldest first: the one in progress, then the next.
    replies: VecDeque<std::sync::mpsc::Sender<Result<SiteRound, String>>>,
}

/// The next command of a paced server's upstream; never, without one.
async fn next_command(link: &mut Option<SiteLink>) -> Option<SiteCommand> {
    match link {
        Some(l) => l.commands.recv().await,
        None => std::future::pending().await,
    }
}

impl Driver {
    /// One MQTT publish as a machine event, when admitted; remembers the clients seen online
    /// (they are told when the run finishes).
    fn on_message(&mut self, m: crate::transport::Incoming) -> Option<Event> {
        let event = self.admission.admit(&m, &self.topics)?;
        if let Event::ClientOnline { client, .. } = &event {
            self.known_clients.insert(client.clone());
        }
        Some(event)
    }

    async fn on_task(&mut self, done: TaskDone) -> Option<Event> {
        match done {
            TaskDone::Stored { round, written } => {
                let blob = written.blob().clone();
                if let Some(b) = &mut self.round_bytes {
                    b.global_len = blob.len;
                }
                self.checkpoints.model_stored(&written).await;
                self.global = Some((round, written));
                Some(Event::GlobalUploaded { round, blob })
            }
            TaskDone::StoreFailed { round, reason } => {
                Some(Event::GlobalUploadFailed { round, reason })
            }
            TaskDone::Fetched {
                client,
                round,
                result,
                permit,
            } => Some(match result {
                Ok(blob) => {
                    self.held_permit = permit;
                    Event::UpdateFetched {
                        client,
                        round,
                        blob,
                    }
                }
                Err(reason) => Event::UpdateRejected {
                    client,
                    round,
                    reason,
                },
            }),
            TaskDone::Bundle {
                client,
                round,
                result,
            } => Some(Event::BundleFetched {
                client,
                round,
                bundle: result,
            }),
        }
    }

    /// Carries out one action; returns the outcome when the run is over.
    async fn act(
        &mut self,
        action: Action,
        machine: &mut RoundMachine,
        progress: &mut (impl FnMut(&Progress) + Send),
    ) -> Option<Outcome> {
        match action {
            Action::UploadGlobal { round } => {
                self.round_bytes = Some(RoundBytes {
                    round,
                    global_len: 0,
                    commands: 0,
                    updates: 0,
                });
                // The strategy's round tensors (SCAFFOLD's control variate) travel with the
                // model, under `strategy/`.
                let plain = machine.global_payload(round);
                let key = self.opts.keys.global(round);
                let store = self.store.clone();
                let tx = self.tasks.0.clone();
                // A store outage delays the round by up to a round's timeout before it aborts it.
                let retry_deadline = tokio::time::Instant::now() + self.opts.round.round_timeout;
                tokio::spawn(async move {
                    // Sealed once, under a fresh content key; a retry stores the same bytes.
                    let sealing = store.clone();
                    let sealed = tokio::task::spawn_blocking(move || sealing.seal(&key, plain))
                        .await
                        .map_err(|e| format!("sealing task failed: {e}"));
                    let stored = match sealed {
                        Ok(blob) => {
                            let what = format!("storing the global model of round {round}");
                            store::retry::until(&what, retry_deadline, || store.put(&blob))
                                .await
                                .map_err(|e| e.to_string())
                        }
                        Err(e) => Err(e),
                    };
                    let done = match stored {
                        Ok(written) => TaskDone::Stored { round, written },
                        Err(reason) => TaskDone::StoreFailed { round, reason },
                    };
                    let _ = tx.send(done);
                });
            }
            Action::SendTrain {
                client,
                round,
                global: _,
                config,
                instruction,
                deadline,
                secagg,
            } => {
                if let Some(b) = &mut self.round_bytes {
                    b.commands += 1;
                }
                // The command's `global` is the blob stored for this round (`GlobalUploaded`):
                // the machine sends a round's commands after it is stored and before the next
                // one is, so `self.global` holds it with its content key.
                let stored = self.global.as_ref().filter(|(r, _)| *r == round);
                let Some((_, written)) = stored else {
                    warn!(%client, round, "train command not sent: no content key for the global model");
                    return None;
                };
                let global = match self.store.reference_for(written, &client) {
                    Ok(g) => g,
                    Err(e) => {
                        warn!(%client, round, "train command not sent: {e}");
                        return None;
                    }
                };
                let left = deadline.saturating_duration_since(Instant::now());
                let msg = Envelope::new(
                    &self.opts.run,
                    round,
                    SERVER_ID,
                    Body::Train(Train {
                        global,
                        config,
                        strategy: instruction,
                        deadline_ms: proto::now_ms() + left.as_millis() as u64,
                        secagg: secagg.map(|s| *s),
                    }),
                );
                if let Err(e) = self
                    .handle
                    .publish(&self.topics.command(&client), &msg, true)
                    .await
                {
                    warn!(%client, round, "train command not sent: {e}");
                }
            }
            Action::FetchBundle {
                client,
                round,
                blob,
            } => {
                let store = self.store.inner().clone();
                let tx = self.tasks.0.clone();
                let deadline = tokio::time::Instant::now() + self.opts.round.round_timeout;
                tokio::spawn(async move {
                    let what = format!("fetching the share bundle of {client} for round {round}");
                    let result = store::retry::until(&what, deadline, || store.get(&blob))
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx.send(TaskDone::Bundle {
                        client,
                        round,
                        result,
                    });
                });
            }
            Action::SendCollect {
                client,
                round,
                sharing,
                inbox,
            } => {
                // Stored and announced in a task of its own: one client's slow store request
                // does not hold up the others'.
                let store = self.store.inner().clone();
                let handle = self.handle.clone();
                let key = self.opts.keys.inbox(round, &client);
                let topic = self.topics.command(&client);
                let run = self.opts.run.clone();
                let deadline = tokio::time::Instant::now() + self.opts.round.round_timeout;
                tokio::spawn(async move {
                    let what = format!("storing the share inbox of {client} for round {round}");
                    let bytes = Bytes::from(inbox);
                    let stored =
                        store::retry::until(&what, deadline, || store.put(&key, bytes.clone()))
                            .await;
                    let inbox = match stored {
                        Ok(b) => b,
                        Err(e) => {
                            warn!(%client, round, "sa_collect not sent: {e}");
                            return;
                        }
                    };
                    let body = Body::SaCollect(proto::SaCollect { sharing, inbox });
                    let msg = Envelope::new(&run, round, SERVER_ID, body);
                    if let Err(e) = handle.publish(&topic, &msg, true).await {
                        warn!(%client, round, "sa_collect not sent: {e}");
                    }
                });
            }
            Action::SendSecure {
                client,
                round,
                body,
            } => {
                let kind = body.kind();
                let msg = Envelope::new(&self.opts.run, round, SERVER_ID, *body);
                if let Err(e) = self
                    .handle
                    .publish(&self.topics.command(&client), &msg, true)
                    .await
                {
                    warn!(%client, round, "{kind} not sent: {e}");
                }
            }
            Action::FetchUpdate {
                client,
                round,
                blob,
            } => {
                if let Some(b) = &mut self.round_bytes {
                    b.updates += blob.len;
                }
                let store = self.store.clone();
                let tx = self.tasks.0.clone();
                let slots = self.fetch_slots.clone();
                let retry_deadline = tokio::time::Instant::now() + self.opts.round.round_timeout;
                tokio::spawn(async move {
                    let permit = slots.acquire_owned().await.ok();
                    // A sealed update's key is wrapped to the server alone: its AEAD tags
                    // authenticate every byte, so the SHA-256 pass is skipped (docs/PROTOCOL.md,
                    // "What is verified").
                    let what = format!("fetching the update of {client} for round {round}");
                    let fetched =
                        store::retry::until(&what, retry_deadline, || store.get_private(&blob))
                            .await;
                    let result = match fetched {
                        Ok(bytes) => tokio::task::spawn_blocking(move || {
                            store.open(&blob, bytes).map_err(open_failed)
                        })
                        .await
                        .unwrap_or_else(|e| Err(format!("opening task failed: {e}"))),
                        Err(e) => Err(e.to_string()),
                    };
                    // The permit travels with the bytes and is released once the driver has
                    // folded them: at most `fetch_concurrency` updates are in memory besides the
                    // global model and the aggregate.
                    let _ = tx.send(TaskDone::Fetched {
                        client,
                        round,
                        result,
                        permit,
                    });
                });
            }
            Action::RoundClosed(summary) => {
                let record = self.close_round(&summary, machine).await;
                if let Some(w) = &mut self.metrics {
                    if let Err(e) = w.record(&record) {
                        warn!("metrics of round {} not written: {e}", record.round);
                    }
                }
                progress(&Progress::RoundClosed(record.clone()));
                if let Some(h) = &self.opts.health {
                    h.round_closed(&record);
                }
                if let Some(reply) = self.replies.pop_front() {
                    let _ = reply.send(Ok(SiteRound {
                        round: summary.round,
                        global: machine.global().clone(),
                        num_samples: summary.num_samples,
                        train_loss: summary.train_loss,
                        participants: summary.participants.len(),
                        metrics: record.strategy.clone(),
                    }));
                }
                self.records.push(record);
                self.checkpoints.round_closed(
                    summary.round,
                    machine.strategy().name().to_string(),
                    machine.strategy().state(),
                );
                // Never a round a client still trains on or whose update is being fetched
                // (asynchronous runs keep older rounds in use).
                let keep = self
                    .opts
                    .retention
                    .keep_from_round(summary.round)
                    .min(machine.oldest_round_in_use());
                if keep > 0 {
                    let store = self.store.inner().clone();
                    let keys = self.opts.keys.clone();
                    // After the previous cleanup (it is awaited before the run returns).
                    let previous = self.cleanup_task.take();
                    self.cleanup_task = Some(tokio::spawn(async move {
                        if let Some(p) = previous {
                            let _ = p.await;
                        }
                        if let Err(e) = store.delete_rounds_before(&keys, keep).await {
                            warn!("deleting blobs of rounds before {keep}: {e}");
                        }
                    }));
                }
            }
            Action::RoundFailed { round, reason } => {
                if let Some(h) = &self.opts.health {
                    h.round_failed(round);
                }
                if let Some(reply) = self.replies.pop_front() {
                    let _ = reply.send(Err(reason));
                }
            }
            Action::Finish(outcome) => return Some(outcome),
        }
        None
    }

    // `&mut`: the machine is `Send` but not `Sync`, and the reference lives across awaits of a
    // future that may be spawned (an edge's site server).
    async fn close_round(&mut self, s: &RoundSummary, machine: &mut RoundMachine) -> RoundRecord {
        let mut extra = BTreeMap::new();
        let (test_accuracy, test_loss, eval_s) = match (&self.evaluator, s.evaluate) {
            (Some(ev), true) => {
                let ev = ev.clone();
                let params = machine.global().clone();
                let t = Instant::now();
                let r = tokio::task::spawn_blocking(move || ev.evaluate(&params))
                    .await
                    .unwrap_or_else(|e| Err(format!("evaluation task failed: {e}")));
                let secs = t.elapsed().as_secs_f64();
                match r {
                    Ok(e) => {
                        extra = e.extra;
                        (Some(e.accuracy), Some(e.loss), Some(secs))
                    }
                    Err(e) => {
                        warn!(round = s.round, "evaluation failed: {e}");
                        (None, None, Some(secs))
                    }
                }
            }
            _ => (None, None, None),
        };
        let bytes = match &self.round_bytes {
            Some(b) if b.round == s.round => b.global_len * (1 + b.commands as u64) + 2 * b.updates,
            _ => 0,
        };
        let record = RoundRecord {
            round: s.round,
            test_accuracy,
            test_loss,
            train_loss: s.train_loss.is_finite().then_some(s.train_loss),
            round_s: s.seconds,
            eval_s,
            elapsed_s: self.elapsed_before + self.started.elapsed().as_secs_f64(),
            bytes,
            participants: s.participants.len(),
            failures: s.failures.len(),
            failed_clients: s
                .failures
                .iter()
                .map(|f| format!("{}: {}", f.client, f.reason))
                .collect(),
            num_samples: s.num_samples,
            retries: s.retries,
            strategy: {
                let mut m = s.strategy_metrics.clone();
                m.extend(extra);
                m
            },
        };
        info!(
            round = s.round,
            participants = record.participants,
            failures = record.failures,
            accuracy = ?record.test_accuracy,
            round_s = format!("{:.2}", s.seconds),
            "round closed"
        );
        record
    }

    /// Stores the final model, tells every known client, writes the final model to disk.
    async fn finish(&mut self, outcome: Outcome, machine: &mut RoundMachine) -> ServerReport {
        let mut final_model: Option<Written> = None;
        let mut final_path = None;
        if outcome == Outcome::Completed || machine.completed_rounds() > 0 {
            let plain = machine.global().to_safetensors_bytes();
            if let Some(dir) = &self.opts.output_dir {
                let path = dir.join("final_model.safetensors");
                match std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &plain)) {
                    Ok(()) => final_path = Some(path),
                    Err(e) => warn!("final model not written to {}: {e}", path.display()),
                }
            }
            let blob = self.store.seal(&self.opts.keys.final_model(), plain);
            let deadline = tokio::time::Instant::now() + self.opts.round.round_timeout;
            let stored = store::retry::until("storing the final model", deadline, || {
                self.store.put(&blob)
            })
            .await;
            match stored {
                Ok(written) => {
                    self.checkpoints.model_stored(&written).await;
                    final_model = Some(written);
                }
                Err(e) => warn!("final model not stored: {e}"),
            }
        }
        // Clipped to what a message may carry: a long list of failures must not make every
        // client drop its finish.
        let reason = proto::clip_text(&outcome.summary());
        let mut clients = self.known_clients.clone();
        clients.extend(self.opts.expected_clients.iter().cloned());
        for c in &clients {
            let for_client = match &final_model {
                Some(m) => match self.store.reference_for(m, c) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        warn!(client = %c, "final model not offered: {e}");
                        None
                    }
                },
                None => None,
            };
            let msg = Envelope::new(
                &self.opts.run,
                machine.completed_rounds(),
                SERVER_ID,
                Body::Finish(Finish {
                    reason: reason.clone(),
                    final_model: for_client,
                }),
            );
            if let Err(e) = self
                .handle
                .publish(&self.topics.command(c), &msg, true)
                .await
            {
                warn!(client = %c, "finish not sent: {e}");
            }
        }
        if let Some(w) = &self.metrics {
            let title = format!(
                "fedmq run {}: {} rounds",
                self.opts.run,
                machine.completed_rounds()
            );
            match w.finish_plot(&title) {
                Ok(p) => debug!("plot written to {}", p.display()),
                Err(e) => warn!("plot not written: {e}"),
            }
        }
        self.checkpoints.wait().await;
        if let Some(t) = self.cleanup_task.take() {
            let _ = t.await;
        }
        match &outcome {
            Outcome::Completed => info!(rounds = machine.completed_rounds(), "run completed"),
            Outcome::Aborted(r) => warn!("run aborted: {r}"),
            Outcome::Stopped(r) => warn!(rounds = machine.completed_rounds(), "run stopped: {r}"),
        }
        ServerReport {
            outcome,
            records: std::mem::take(&mut self.records),
            final_model: final_model.map(|w| w.blob().clone()),
            final_path,
            final_params: machine.global().clone(),
            wall_s: 0.0,
        }
    }
}
