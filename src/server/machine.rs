//! The round engine as a sans-IO state machine: `handle(event, now) -> actions`.
//!
//! The machine never touches the network, the store or the clock. The driver (`server::driver`)
//! turns MQTT messages, finished transfers and timers into [`Event`]s, and carries out the
//! [`Action`]s. That makes dropouts, deadlines, stale and duplicate messages testable with plain
//! values (see the tests at the bottom).
//!
//! # A round
//! ```text
//! Admitting --enough clients online--> Uploading --GlobalUploaded--> Training --all reported,
//!     or deadline with quorum--> (RoundClosed) --> Uploading (next round) | Finished
//! ```
//! In `Training`, an `UpdateReady` notice from a selected client makes the driver fetch the blob
//! (`FetchUpdate`); the fetched update is folded into the strategy's streaming aggregate at once.
//! At the deadline, selected clients that announced nothing are failures (`Timeout`); updates
//! announced in time but still downloading are waited for. Without a quorum the round is re-sent
//! (to the failed clients that are online, and replacements) up to `max_retries` times, then the
//! run is aborted with a message saying what to check.

use crate::proto::{
    BlobKeys, BlobRef, Body, Capabilities, SecAggSetup, StrategyInstruction, TrainConfig,
    TrainMetrics,
};
use crate::strategy::{ClientFailure, FailureReason, RoundAggregate, Strategy};
use crate::tensor::{ParamSet, ParamsView};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
pub use secure::{OnFailure, Protocol, SecureConfig, SecureMessage};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Policy of the round engine (from `train_args`, `validation_args` and `fedmq_args`).
#[derive(Debug, Clone)]
pub struct RoundConfig {
    /// Number of rounds (`comm_round`); rounds are numbered from 1.
    pub rounds: u64,
    /// Clients selected per round (`client_num_per_round`).
    pub clients_per_round: usize,
    /// Clients that must be online before round 1 starts.
    pub min_clients: usize,
    /// Give up when `min_clients` are not online after this long.
    pub admission_timeout: Option<Duration>,
    /// Time from the train commands to the round's deadline.
    pub round_timeout: Duration,
    /// Fraction of the selected clients whose updates close a round at its deadline (0 < q ≤ 1).
    pub quorum: f64,
    /// Re-sends of a round that missed its quorum before the run is aborted.
    pub max_retries: u32,
    /// Evaluate every this many rounds (`frequency_of_the_test`), and after the last.
    pub eval_every: u64,
    /// Seed of client selection (and of per-round shuffling seeds sent to clients).
    pub seed: u64,
    /// Local training settings sent with every train command (`seed` is replaced per round).
    pub train: TrainConfig,
    /// The run's blob keys: an update is accepted only from the sender's own update key of the
    /// round ([`BlobKeys::update`]).
    pub keys: BlobKeys,
    /// How updates are weighted in the aggregate (`fedmq_args.weighting`).
    pub weighting: Weighting,
    /// Secure aggregation (`secure_aggregation_args.enable_sa`): each round's updates are
    /// masked and only their weighted mean is unmasked (`secure.rs`).
    pub secure: Option<SecureConfig>,
    /// Paced by an upstream server (an edge's site, `crate::edge`): a round starts only on
    /// [`Event::Upstream`], from the model it brings; between rounds the machine waits; a round
    /// that misses its quorum ends in [`Action::RoundFailed`] rather than the run's abort.
    pub paced: bool,
}

/// How the server weights each update (`fedmq_args.weighting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weighting {
    /// By the samples the client claims, bounded by the `capabilities.samples` it announced
    /// when it joined (FedAvg's weighting). A client can still lie when it joins.
    #[default]
    Samples,
    /// Every update weighs the same, whatever it claims.
    Uniform,
}

impl std::str::FromStr for Weighting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "samples" => Ok(Weighting::Samples),
            "uniform" => Ok(Weighting::Uniform),
            other => Err(format!(
                "unknown weighting {other:?}; use samples or uniform"
            )),
        }
    }
}

/// Something that happened, as seen by the driver.
#[derive(Debug)]
pub enum Event {
    /// A client announced itself online (retained status).
    ClientOnline {
        /// Client id.
        client: String,
        /// What it brings.
        capabilities: Option<Capabilities>,
    },
    /// A client went offline (last will or clean exit).
    ClientOffline {
        /// Client id.
        client: String,
    },
    /// The driver stored the global model of `round`.
    GlobalUploaded {
        /// Round.
        round: u64,
        /// Where it is.
        blob: BlobRef,
    },
    /// Storing the global model failed.
    GlobalUploadFailed {
        /// Round.
        round: u64,
        /// Why.
        reason: String,
    },
    /// A client says its update for `round` is in the store.
    UpdateReady {
        /// Client id (already checked against the topic by the driver).
        client: String,
        /// Round the update belongs to.
        round: u64,
        /// Where the update is.
        blob: BlobRef,
        /// FedAvg weight.
        num_samples: u64,
        /// Training metrics.
        metrics: TrainMetrics,
        /// What the strategy asked the client to report ([`crate::proto::Update::report`]).
        report: BTreeMap<String, f64>,
    },
    /// The driver fetched and verified (length, SHA-256) an update announced by `UpdateReady`.
    UpdateFetched {
        /// Client id.
        client: String,
        /// Round.
        round: u64,
        /// The client's trained parameters as a safetensors blob; folded into the aggregate
        /// straight from these bytes (no decoded copy).
        blob: bytes::Bytes,
    },
    /// The announced update could not be fetched or decoded (digest mismatch, store error).
    UpdateRejected {
        /// Client id.
        client: String,
        /// Round.
        round: u64,
        /// Why.
        reason: String,
    },
    /// The client reported that it cannot complete `round`.
    ClientFailed {
        /// Client id.
        client: String,
        /// Round.
        round: u64,
        /// Its reason.
        reason: String,
    },
    /// A secure-aggregation stage message from a client (`secure.rs`).
    Secure {
        /// Client id (checked against the topic by the driver).
        client: String,
        /// Round it belongs to.
        round: u64,
        /// The message.
        msg: SecureMessage,
    },
    /// The driver fetched a client's share bundle ([`Action::FetchBundle`]), or could not.
    BundleFetched {
        /// Client id.
        client: String,
        /// Round.
        round: u64,
        /// The bundle's bytes, or why there are none.
        bundle: Result<bytes::Bytes, String>,
    },
    /// Time passed (the driver sends this at [`RoundMachine::next_deadline`]).
    Tick,
    /// A paced machine's next round ([`RoundConfig::paced`]): start it from `global` with the
    /// upstream's training settings (`train`; the seed is still set per round), once enough
    /// clients are online and the round in progress, if any, has closed.
    Upstream {
        /// The upstream's model.
        global: ParamSet,
        /// The upstream's local-training settings, forwarded to this machine's clients.
        train: Option<TrainConfig>,
    },
    /// The upstream ended the run: finish with `outcome` (an open round is abandoned).
    UpstreamFinished {
        /// How the upstream's run ended.
        outcome: Outcome,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Store [`RoundMachine::global`] as the global model of `round`, then send
    /// [`Event::GlobalUploaded`].
    UploadGlobal {
        /// Round.
        round: u64,
    },
    /// Send a train command.
    SendTrain {
        /// Client id.
        client: String,
        /// Round.
        round: u64,
        /// The global model.
        global: BlobRef,
        /// Local training settings.
        config: TrainConfig,
        /// What the strategy adds to local training.
        instruction: Option<StrategyInstruction>,
        /// When the update is due.
        deadline: Instant,
        /// The secure aggregation setup, when the round is securely aggregated.
        secagg: Option<Box<SecAggSetup>>,
    },
    /// Fetch a client's share bundle (verified against its reference), then send
    /// [`Event::BundleFetched`].
    FetchBundle {
        /// Client id.
        client: String,
        /// Round.
        round: u64,
        /// Where the bundle is.
        blob: BlobRef,
    },
    /// Store `inbox` at the client's inbox key (plaintext: every share in it is sealed to the
    /// client), then send it `sa_collect` naming it and the neighbours in `sharing`.
    SendCollect {
        /// Client id.
        client: String,
        /// Round.
        round: u64,
        /// Its neighbours that shared.
        sharing: Vec<String>,
        /// The inbox blob's bytes.
        inbox: Vec<u8>,
    },
    /// Send a secure-aggregation stage message (roster, unmask) to a client.
    SendSecure {
        /// Client id.
        client: String,
        /// Round.
        round: u64,
        /// The message body.
        body: Box<Body>,
    },
    /// Fetch, verify and decode an update, then send [`Event::UpdateFetched`] or
    /// [`Event::UpdateRejected`].
    FetchUpdate {
        /// Client id.
        client: String,
        /// Round.
        round: u64,
        /// Where the update is.
        blob: BlobRef,
    },
    /// A round closed: [`RoundMachine::global`] is its new model. Record metrics, evaluate when
    /// `summary.evaluate`, checkpoint, delete blobs of old rounds.
    RoundClosed(RoundSummary),
    /// A paced machine's round ended without a model ([`RoundConfig::paced`]): it missed its
    /// quorum, or its global model could not be stored. The machine waits for the next
    /// [`Event::Upstream`].
    RoundFailed {
        /// Round.
        round: u64,
        /// Why, naming what to check.
        reason: String,
    },
    /// The run is over: store the final model, send finish to the clients, stop.
    Finish(Outcome),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum Outcome {
    /// All rounds ran.
    Completed,
    /// The run stopped early; the message says why and what to check.
    Aborted(String),
    /// The strategy ended the run before its last round, as configured (the privacy budget
    /// is spent); the message says why. The model so far is the final model.
    Stopped(String),
}

impl Outcome {
    /// `completed`, `aborted: <why>` or `stopped: <why>`.
    pub fn summary(&self) -> String {
        match self {
            Outcome::Completed => "completed".to_string(),
            Outcome::Aborted(r) => format!("aborted: {r}"),
            Outcome::Stopped(r) => format!("stopped: {r}"),
        }
    }
}

/// What happened in a closed round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundSummary {
    /// Round number (from 1).
    pub round: u64,
    /// Clients whose updates were aggregated.
    pub participants: Vec<String>,
    /// Selected clients that contributed nothing, with reasons.
    pub failures: Vec<ClientFailure>,
    /// Samples behind the aggregate.
    pub num_samples: u64,
    /// Sample-weighted mean of the participants' training losses.
    pub train_loss: f64,
    /// Train commands sent (including re-sends).
    pub commands: usize,
    /// Re-sends because the quorum was missed.
    pub retries: u32,
    /// Time from the upload request to the close.
    pub seconds: f64,
    /// Whether this round's model is to be evaluated.
    pub evaluate: bool,
    /// Whether the global model changed (false when no update arrived).
    pub updated: bool,
    /// The strategy's metrics of the round ([`crate::strategy::RoundEnd::metrics`]).
    pub strategy_metrics: BTreeMap<String, f64>,
}

/// The sums of the clients' own evaluations ([`crate::proto::ClientEval`]) over a round.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct EvalSums {
    samples: u64,
    loss: f64,
    correct: Option<u64>,
    sq_err: Option<f64>,
    abs_err: Option<f64>,
}

impl EvalSums {
    /// Adds one client's evaluation (none: nothing).
    pub(crate) fn add(&mut self, e: Option<&crate::proto::ClientEval>) {
        let Some(e) = e else { return };
        fn sum<T: std::ops::Add<Output = T> + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            }
        }
        self.samples += e.samples;
        self.loss += e.loss_sum;
        self.correct = sum(self.correct, e.correct);
        self.sq_err = sum(self.sq_err, e.sq_err_sum);
        self.abs_err = sum(self.abs_err, e.abs_err_sum);
    }

    /// `client_test_loss`, `client_test_accuracy`, `client_test_rmse`, `client_test_mae` and
    /// `client_test_samples` over the clients that evaluated; empty when none did.
    pub(crate) fn metrics(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        if self.samples == 0 {
            return m;
        }
        let n = self.samples as f64;
        m.insert("client_test_samples".into(), n);
        m.insert("client_test_loss".into(), self.loss / n);
        if let Some(c) = self.correct {
            m.insert("client_test_accuracy".into(), c as f64 / n);
        }
        if let Some(s) = self.sq_err {
            m.insert("client_test_rmse".into(), (s / n).sqrt());
        }
        if let Some(a) = self.abs_err {
            m.insert("client_test_mae".into(), a / n);
        }
        m
    }
}

/// Phase of the run.
enum Phase {
    Admitting {
        since: Instant,
    },
    Uploading {
        round: u64,
    },
    Training(Box<RoundState>),
    /// An asynchronous run ([`Strategy::buffered`]): `buffered.rs`.
    Buffered(Box<buffered::BufferState>),
    /// A paced machine between rounds: waiting for [`Event::Upstream`].
    Waiting,
    Finished,
}

struct RoundState {
    round: u64,
    global: BlobRef,
    started: Instant,
    deadline: Instant,
    retries: u32,
    commands: usize,
    selected: BTreeSet<String>,
    /// Announced in time, being fetched.
    fetching: BTreeMap<String, Pending>,
    /// Folded into the aggregate: client → (samples, loss).
    reported: BTreeMap<String, (u64, f64)>,
    /// The reporting clients' own evaluations, summed.
    evals: EvalSums,
    failed: BTreeMap<String, FailureReason>,
    /// Clients whose update notice of this round was taken (fetched, folded or refused): their
    /// slot is closed, a second notice is ignored.
    announced: BTreeSet<String>,
    /// Clients already warned about a second update notice this round (warned once).
    warned: BTreeSet<String>,
    /// The reason a client failed before the round was re-sent to it: named in the abort
    /// message when it then times out.
    earlier: BTreeMap<String, FailureReason>,
    aggregate: Option<Box<dyn RoundAggregate>>,
    /// Deadline passed: no new announcements are accepted.
    closed_for_updates: bool,
    /// The secure aggregation session, when the round is securely aggregated.
    secure: Option<Box<secure::SecureRound>>,
}

/// An update being fetched.
#[derive(Debug)]
struct Pending {
    /// Samples behind it (the claim, bounded by the client's announcement).
    samples: u64,
    /// Its weight in the aggregate ([`Weighting`]).
    weight: u64,
    metrics: TrainMetrics,
    report: BTreeMap<String, f64>,
}

/// Known client.
#[derive(Debug, Clone)]
struct ClientEntry {
    online: bool,
    /// What it announced when it joined (the latest announcement); bounds its sample claims.
    capabilities: Option<Capabilities>,
}

/// An update notice: what a client's `update` message says. Notices for the round about to
/// start are kept until it does (after a server restart, the clients' re-announcements may arrive
/// before the round's train commands go out).
#[derive(Debug)]
struct Notice {
    round: u64,
    blob: BlobRef,
    num_samples: u64,
    metrics: TrainMetrics,
    report: BTreeMap<String, f64>,
}

/// The round engine.
pub struct RoundMachine {
    cfg: RoundConfig,
    strategy: Box<dyn Strategy>,
    rng: ChaCha8Rng,
    clients: BTreeMap<String, ClientEntry>,
    global: ParamSet,
    phase: Phase,
    /// Last completed round (0 before the first).
    completed: u64,
    upload_started: Option<Instant>,
    /// Updates announced for round `completed + 1` before it started (first per client).
    early: BTreeMap<String, Notice>,
    /// Whether the LightSecAgg parameters were adjusted already (the warning is said once).
    light_adjusted: bool,
    /// A paced machine's next round, when it arrived before the machine could start it.
    pending: Option<(ParamSet, Option<TrainConfig>)>,
}

impl RoundMachine {
    /// A machine that starts from `initial` and waits for clients. `now` starts the admission
    /// timeout.
    pub fn new(
        cfg: RoundConfig,
        strategy: Box<dyn Strategy>,
        initial: ParamSet,
        now: Instant,
    ) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        Self {
            cfg,
            strategy,
            rng,
            clients: BTreeMap::new(),
            global: initial,
            phase: Phase::Admitting { since: now },
            completed: 0,
            upload_started: None,
            early: BTreeMap::new(),
            light_adjusted: false,
            pending: None,
        }
    }

    /// Resumes after round `completed` with `global` (from a checkpoint).
    pub fn resume(&mut self, completed: u64, global: ParamSet) {
        self.completed = completed;
        self.global = global;
    }

    /// The current global model.
    pub fn global(&self) -> &ParamSet {
        &self.global
    }

    /// The blob of the global model of `round`: the model, with the strategy's round tensors
    /// (SCAFFOLD's control variate) under `strategy/`.
    pub fn global_payload(&mut self, round: u64) -> Vec<u8> {
        match self.strategy.round_tensors(round, &self.global) {
            Some(extra) => self
                .global
                .to_safetensors_bytes_with(crate::proto::STRATEGY_TENSOR_PREFIX, &extra),
            None => self.global.to_safetensors_bytes(),
        }
    }

    /// The strategy (for checkpointing its state).
    pub fn strategy(&self) -> &dyn Strategy {
        self.strategy.as_ref()
    }

    /// The strategy, to restore its state from a checkpoint before round 1.
    pub fn strategy_mut(&mut self) -> &mut dyn Strategy {
        self.strategy.as_mut()
    }

    /// Last completed round.
    pub fn completed_rounds(&self) -> u64 {
        self.completed
    }

    /// The round in progress, if any.
    pub fn current_round(&self) -> Option<u64> {
        match &self.phase {
            Phase::Uploading { round } => Some(*round),
            Phase::Training(r) => Some(r.round),
            Phase::Buffered(b) => Some(b.version),
            _ => None,
        }
    }

    /// Whether the run is over.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// Online clients, sorted.
    pub fn online_clients(&self) -> Vec<String> {
        self.clients
            .iter()
            .filter(|(_, c)| c.online)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Clients online now.
    pub fn online_count(&self) -> usize {
        self.clients.values().filter(|c| c.online).count()
    }

    /// The samples the online clients announced when they joined (an edge's bound on what it
    /// may claim upstream).
    pub fn online_samples(&self) -> u64 {
        self.clients
            .values()
            .filter(|c| c.online)
            .filter_map(|c| c.capabilities.as_ref())
            .map(|c| c.samples)
            .sum()
    }

    /// When the driver must send [`Event::Tick`] next.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Admitting { since } => self.cfg.admission_timeout.map(|t| *since + t),
            Phase::Training(r) if r.secure.is_some() => Self::secure_deadline(r),
            Phase::Training(r) if !r.closed_for_updates => Some(r.deadline),
            Phase::Buffered(b) => Some(b.next_deadline(&self.cfg)),
            _ => None,
        }
    }

    /// The oldest round whose blobs a client may still use (its global model being trained
    /// on, its update not yet fetched): retention must keep it.
    pub fn oldest_round_in_use(&self) -> u64 {
        match &self.phase {
            Phase::Buffered(b) => b.oldest_in_use(),
            _ => self.current_round().unwrap_or(self.completed + 1),
        }
    }

    /// Feeds one event; returns what to do, in order.
    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if matches!(self.phase, Phase::Buffered(_)) {
            self.handle_buffered(event, now, &mut out);
            return out;
        }
        match event {
            Event::ClientOnline {
                client,
                capabilities,
            } => {
                self.clients.insert(
                    client,
                    ClientEntry {
                        online: true,
                        capabilities,
                    },
                );
                self.maybe_start(now, &mut out);
            }
            Event::ClientOffline { client } => {
                if let Some(c) = self.clients.get_mut(&client) {
                    c.online = false;
                }
                if self.is_secure_round() {
                    self.secure_dropout(&client, FailureReason::Disconnected, now, &mut out);
                    return out;
                }
                if let Phase::Training(r) = &mut self.phase {
                    if r.selected.contains(&client)
                        && !r.reported.contains_key(&client)
                        && !r.fetching.contains_key(&client)
                    {
                        tracing::info!(round = r.round, %client, "selected client went offline");
                        r.failed.insert(client, FailureReason::Disconnected);
                    }
                }
                self.maybe_close(now, &mut out);
            }
            Event::GlobalUploaded { round, blob } => {
                if matches!(self.phase, Phase::Uploading { round: r } if r == round) {
                    self.start_training(round, blob, now, &mut out);
                }
            }
            Event::GlobalUploadFailed { round, reason } => {
                if matches!(self.phase, Phase::Uploading { round: r } if r == round) {
                    let msg = format!(
                        "round {round}: storing the global model failed: {reason}; check the \
                         object store (comm_args.customized_training_s3_config)"
                    );
                    self.round_failed(round, msg, now, &mut out);
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
                self.on_update_ready(client, notice, now, &mut out);
            }
            Event::UpdateFetched {
                client,
                round,
                blob,
            } => {
                if self.is_secure_round() {
                    if self.current_round() == Some(round) {
                        self.on_masked_fetched(client, &blob, now, &mut out);
                    }
                    return out;
                }
                if let Phase::Training(r) = &mut self.phase {
                    if r.round == round {
                        if let Some(p) = r.fetching.remove(&client) {
                            let agg = r.aggregate.as_mut();
                            let added = ParamsView::parse(&blob)
                                .map_err(|e| format!("not a model blob: {e}"))
                                .and_then(|v| {
                                    agg.map(|a| {
                                        a.add(&client, &v, p.weight, &p.report)
                                            .map_err(|e| e.to_string())
                                    })
                                    .transpose()
                                });
                            match added {
                                Ok(Some(())) => {
                                    r.evals.add(p.metrics.eval.as_ref());
                                    r.reported.insert(client, (p.samples, p.metrics.train_loss));
                                }
                                Err(e) => {
                                    tracing::warn!(%client, round, "update rejected: {e}");
                                    r.failed.insert(client, FailureReason::BadUpdate(e));
                                }
                                Ok(None) => {}
                            }
                        }
                    }
                }
                self.maybe_close(now, &mut out);
            }
            Event::UpdateRejected {
                client,
                round,
                reason,
            } => {
                if self.is_secure_round() {
                    if let Phase::Training(r) = &mut self.phase {
                        if r.round == round && r.fetching.remove(&client).is_some() {
                            warn!(%client, round, "masked input rejected: {reason}");
                            let why = FailureReason::BadUpdate(reason);
                            self.secure_dropout(&client, why, now, &mut out);
                        }
                    }
                    return out;
                }
                if let Phase::Training(r) = &mut self.phase {
                    if r.round == round && r.fetching.remove(&client).is_some() {
                        tracing::warn!(%client, round, "update rejected: {reason}");
                        r.failed.insert(client, FailureReason::BadUpdate(reason));
                    }
                }
                self.maybe_close(now, &mut out);
            }
            Event::ClientFailed {
                client,
                round,
                reason,
            } => {
                if self.is_secure_round() {
                    if self.current_round() == Some(round) {
                        tracing::warn!(%client, round, "client failed: {reason}");
                        let why = FailureReason::Reported(reason);
                        self.secure_dropout(&client, why, now, &mut out);
                    }
                    return out;
                }
                if let Phase::Training(r) = &mut self.phase {
                    if r.round == round
                        && r.selected.contains(&client)
                        && !r.reported.contains_key(&client)
                        && !r.announced.contains(&client)
                    {
                        tracing::warn!(%client, round, "client failed: {reason}");
                        r.failed.insert(client, FailureReason::Reported(reason));
                    }
                }
                self.maybe_close(now, &mut out);
            }
            Event::Secure { client, round, msg } => {
                self.on_secure_message(client, round, msg, now, &mut out);
            }
            Event::BundleFetched {
                client,
                round,
                bundle,
            } => self.on_bundle_fetched(client, round, bundle, now, &mut out),
            Event::Upstream { global, train } => {
                self.pending = Some((global, train));
                match self.phase {
                    Phase::Admitting { .. } => self.maybe_start(now, &mut out),
                    Phase::Waiting => self.begin_round(self.completed + 1, now, &mut out),
                    // Started when the round in progress closes.
                    _ => {}
                }
            }
            Event::UpstreamFinished { outcome } => {
                if !self.is_finished() {
                    self.finish(outcome, &mut out);
                }
            }
            Event::Tick if self.is_secure_round() => self.advance_secure(now, &mut out),
            Event::Tick => match &mut self.phase {
                Phase::Admitting { since } => {
                    if let Some(t) = self.cfg.admission_timeout {
                        // A paced machine with its clients online waits for its upstream.
                        let due = now >= *since + t;
                        let ready = self.online_clients().len() >= self.cfg.min_clients.max(1);
                        if due && (!self.cfg.paced || !ready) {
                            let online = self.online_clients().len();
                            let setting = if self.cfg.min_clients == self.cfg.clients_per_round {
                                "train_args.client_num_per_round"
                            } else {
                                "fedmq_args.min_clients"
                            };
                            let msg = format!(
                                "only {online} of the {} required clients came online within \
                                 {:?}; start more clients or lower {setting}",
                                self.cfg.min_clients, t
                            );
                            self.finish(Outcome::Aborted(msg), &mut out);
                        }
                    }
                }
                Phase::Training(r) => {
                    if !r.closed_for_updates && now >= r.deadline {
                        r.closed_for_updates = true;
                        let silent: Vec<String> = r
                            .selected
                            .iter()
                            .filter(|c| {
                                !r.reported.contains_key(*c)
                                    && !r.fetching.contains_key(*c)
                                    && !r.failed.contains_key(*c)
                            })
                            .cloned()
                            .collect();
                        for c in silent {
                            r.failed.insert(c, FailureReason::Timeout);
                        }
                    }
                    self.maybe_close(now, &mut out);
                }
                _ => {}
            },
        }
        out
    }

    /// An update notice: fetched when it is the first of a selected client for the open round,
    /// from the client's own update key, in time; otherwise ignored or refused with a logged
    /// reason (a refusal is that client's failure of the round).
    fn on_update_ready(
        &mut self,
        client: String,
        notice: Notice,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let round = notice.round;
        if !matches!(self.phase, Phase::Training(_)) {
            if round == self.completed + 1 && round <= self.cfg.rounds {
                // The round this server is about to (re)start: a client's re-announcement after
                // a server restart can arrive before the train commands. Kept for the round.
                debug!(%client, round, "update for the next round kept until it starts");
                self.early.entry(client).or_insert(notice);
            } else {
                debug!(%client, round, "update outside a round ignored");
            }
            return;
        }
        let Notice {
            blob,
            num_samples,
            metrics,
            report,
            ..
        } = notice;
        let Phase::Training(r) = &mut self.phase else {
            return;
        };
        if round != r.round {
            info!(%client, round, current = r.round, "stale update ignored");
            return;
        }
        if r.secure.is_some() {
            warn!(
                %client, round,
                "a plain update in a securely aggregated round ignored (not fetched): the round \
                 takes masked inputs only"
            );
            return;
        }
        if !r.selected.contains(&client) {
            warn!(%client, round, "update from a client not selected ignored");
            return;
        }
        if r.announced.contains(&client) || r.reported.contains_key(&client) {
            if r.warned.insert(client.clone()) {
                warn!(
                    %client, round, key = %blob.key,
                    "second update notice of the round ignored: the first one counts (further \
                     notices from this client in this round are dropped without a warning)"
                );
            }
            return;
        }
        if r.closed_for_updates {
            info!(%client, round, "update after the deadline discarded");
            return;
        }
        r.announced.insert(client.clone());
        let own = self.cfg.keys.update(round, &client);
        if blob.key != own {
            let reason = format!(
                "its blob key {:?} is not its own update key for round {round} ({own:?})",
                blob.key
            );
            warn!(%client, round, "update refused: {reason}");
            r.failed.insert(client, FailureReason::BadUpdate(reason));
            self.maybe_close(now, out);
            return;
        }
        let (samples, weight) = match weigh(&self.clients, self.cfg.weighting, &client, num_samples)
        {
            Ok(x) => x,
            Err(reason) => {
                warn!(%client, round, "update refused: {reason}");
                r.failed.insert(client, FailureReason::BadUpdate(reason));
                self.maybe_close(now, out);
                return;
            }
        };
        r.failed.remove(&client);
        r.fetching.insert(
            client.clone(),
            Pending {
                samples,
                weight,
                metrics,
                report,
            },
        );
        out.push(Action::FetchUpdate {
            client,
            round,
            blob,
        });
    }

    fn maybe_start(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Phase::Admitting { .. } = self.phase {
            if self.cfg.paced && self.pending.is_none() {
                return;
            }
            if self.online_clients().len() >= self.cfg.min_clients.max(1) {
                self.begin_round(self.completed + 1, now, out);
            }
        }
    }

    fn begin_round(&mut self, round: u64, now: Instant, out: &mut Vec<Action>) {
        if round > self.cfg.rounds {
            self.finish(Outcome::Completed, out);
            return;
        }
        if self.cfg.paced {
            let Some((global, train)) = self.pending.take() else {
                self.phase = Phase::Waiting;
                return;
            };
            self.global = global;
            if let Some(t) = train {
                self.cfg.train = t;
            }
        }
        if let Some(schedule) = self.strategy.buffered() {
            self.begin_buffered(round, schedule, now, out);
            return;
        }
        self.phase = Phase::Uploading { round };
        self.upload_started = Some(now);
        out.push(Action::UploadGlobal { round });
    }

    fn train_config(&self, round: u64) -> TrainConfig {
        let mut c = self.cfg.train.clone();
        c.seed = self.cfg.seed.wrapping_mul(1_000_003).wrapping_add(round);
        c
    }

    fn start_training(&mut self, round: u64, global: BlobRef, now: Instant, out: &mut Vec<Action>) {
        let available = self.online_clients();
        let plans = self.strategy.configure_train(
            round,
            &available,
            self.cfg.clients_per_round,
            &mut self.rng,
        );
        let deadline = now + self.cfg.round_timeout;
        let config = self.train_config(round);
        let ids: Vec<String> = plans.iter().map(|p| p.client.clone()).collect();
        let secure = match self.secure_session(round, &ids, now) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("round {round}: secure aggregation cannot start: {e}");
                self.finish(Outcome::Aborted(msg), out);
                return;
            }
        };
        let secagg = secure.as_ref().map(|s| Box::new(s.setup().clone()));
        let mut selected = Vec::with_capacity(plans.len());
        for p in plans {
            out.push(Action::SendTrain {
                client: p.client.clone(),
                round,
                global: global.clone(),
                config: config.clone(),
                instruction: p.instruction,
                deadline,
                secagg: secagg.clone(),
            });
            selected.push(p.client);
        }
        tracing::info!(round, selected = selected.len(), "round started");
        let aggregate = Some(self.strategy.begin_round(round, &self.global));
        self.phase = Phase::Training(Box::new(RoundState {
            round,
            global,
            started: self.upload_started.unwrap_or(now),
            deadline,
            retries: 0,
            commands: selected.len(),
            selected: selected.into_iter().collect(),
            fetching: BTreeMap::new(),
            reported: BTreeMap::new(),
            evals: EvalSums::default(),
            failed: BTreeMap::new(),
            announced: BTreeSet::new(),
            warned: BTreeSet::new(),
            earlier: BTreeMap::new(),
            aggregate,
            closed_for_updates: false,
            secure,
        }));
        if self.is_secure_round() {
            // Re-announced plain updates mean nothing to a secure round.
            self.early.clear();
            self.advance_secure(now, out);
            return;
        }
        // Updates announced for this round before it started (re-announcements reaching a
        // restarted server early): taken as if they arrived now.
        for (client, u) in std::mem::take(&mut self.early) {
            if u.round == round {
                self.on_update_ready(client, u, now, out);
            }
        }
        // No client online at all: nothing will ever arrive; let the deadline logic handle it.
        self.maybe_close(now, out);
    }

    fn quorum_of(&self, selected: usize) -> usize {
        ((self.cfg.quorum * selected as f64).ceil() as usize).clamp(1, selected.max(1))
    }

    /// Closes the round when nothing more can change its outcome, or re-sends / aborts when the
    /// quorum was missed.
    fn maybe_close(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.is_secure_round() {
            self.advance_secure(now, out);
            return;
        }
        let Phase::Training(r) = &self.phase else {
            return;
        };
        if !r.fetching.is_empty() {
            return;
        }
        let quorum = self.quorum_of(r.selected.len());
        let everyone_done = r.reported.len() + r.failed.len() >= r.selected.len();
        let reached = r.reported.len() >= quorum;
        if reached && (everyone_done || r.closed_for_updates) {
            self.close_round(now, out);
            return;
        }
        // Every selected client said it cannot deliver (its training failed, its update was
        // unusable) and none delivered: waiting for the deadline would only delay the re-send
        // (or the abort), e.g. of a federation whose model diverged.
        let hopeless = everyone_done
            && r.reported.is_empty()
            && r.failed
                .values()
                .all(|f| matches!(f, FailureReason::Reported(_) | FailureReason::BadUpdate(_)));
        if !r.closed_for_updates && !hopeless {
            // Wait for more updates, or for the deadline (also when everyone already failed:
            // a disconnected client may come back and report before it).
            return;
        }
        // The deadline passed without a quorum.
        if r.retries < self.cfg.max_retries {
            self.resend(now, out);
        } else {
            let msg = format!(
                "round {}: only {} of {} selected clients reported (quorum {quorum}) after {} \
                 attempt(s); failures: {}. Check that clients are online and that \
                 fedmq_args.round_timeout_s is long enough for local training",
                r.round,
                r.reported.len(),
                r.selected.len(),
                r.retries + 1,
                describe_failures(&r.failed, &r.earlier)
            );
            let round = r.round;
            self.round_failed(round, msg, now, out);
        }
    }

    /// A round that cannot produce a model: the run's abort, or, for a paced machine, the
    /// round's failure (the upstream is told; the machine waits for its next round).
    fn round_failed(&mut self, round: u64, msg: String, now: Instant, out: &mut Vec<Action>) {
        if !self.cfg.paced {
            self.finish(Outcome::Aborted(msg), out);
            return;
        }
        warn!(round, "round failed: {msg}");
        self.completed = round;
        out.push(Action::RoundFailed { round, reason: msg });
        self.phase = Phase::Waiting;
        self.begin_round(round + 1, now, out);
    }

    /// Re-sends a round that missed its quorum: to failed clients that are online, plus
    /// replacements, with a fresh deadline. Updates already folded in are kept: the global
    /// model of the round has not changed.
    fn resend(&mut self, now: Instant, out: &mut Vec<Action>) {
        let online: BTreeSet<String> = self.online_clients().into_iter().collect();
        let config = {
            let Phase::Training(r) = &self.phase else {
                return;
            };
            self.train_config(r.round)
        };
        let Phase::Training(r) = &mut self.phase else {
            return;
        };
        r.retries += 1;
        r.closed_for_updates = false;
        r.deadline = now + self.cfg.round_timeout;
        let need = self.cfg.clients_per_round.saturating_sub(r.reported.len());
        // Clients whose update was refused already delivered it: asking again changes nothing.
        let mut targets: Vec<String> = r
            .failed
            .keys()
            .filter(|c| online.contains(*c) && !r.announced.contains(*c))
            .cloned()
            .collect();
        let spare: Vec<String> = online
            .iter()
            .filter(|c| !r.selected.contains(*c))
            .cloned()
            .collect();
        for c in spare {
            if targets.len() >= need {
                break;
            }
            targets.push(c);
        }
        tracing::warn!(
            round = r.round,
            retry = r.retries,
            reported = r.reported.len(),
            resend_to = targets.len(),
            "quorum missed; re-sending the round"
        );
        for c in &targets {
            if let Some(why) = r.failed.remove(c) {
                if why != FailureReason::Timeout {
                    r.earlier.insert(c.clone(), why);
                }
            }
            r.selected.insert(c.clone());
            r.commands += 1;
            out.push(Action::SendTrain {
                client: c.clone(),
                round: r.round,
                global: r.global.clone(),
                config: config.clone(),
                instruction: self.strategy.instruction(r.round, c),
                deadline: r.deadline,
                secagg: None,
            });
        }
        // Clients that are gone stay failed; if nobody could be asked, wait for the deadline.
    }

    fn close_round(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Phase::Training(mut r) = std::mem::replace(&mut self.phase, Phase::Finished) else {
            return;
        };
        let failures: Vec<ClientFailure> = r
            .failed
            .iter()
            .filter(|(c, _)| !r.reported.contains_key(*c))
            .map(|(c, reason)| ClientFailure {
                client: c.clone(),
                reason: reason.clone(),
            })
            .collect();
        let agg_metrics = r
            .aggregate
            .as_ref()
            .map(|a| a.metrics())
            .unwrap_or_default();
        let aggregate = r.aggregate.take().and_then(|a| a.finish(&failures));
        let mut end = self.strategy.end_round(r.round, &self.global, aggregate);
        end.metrics.extend(agg_metrics);
        end.metrics.extend(r.evals.metrics());
        if let Some(s) = &r.secure {
            // The aggregate saw one mean, not each client's model: no per-client measures.
            end.metrics.remove("update_distance");
            end.metrics.extend(s.metrics.clone());
        }
        let updated = end.global.is_some();
        if let Some(g) = end.global {
            self.global = g;
        }
        let num_samples: u64 = r.reported.values().map(|(s, _)| s).sum();
        let train_loss = if num_samples > 0 {
            r.reported.values().map(|(s, l)| *s as f64 * l).sum::<f64>() / num_samples as f64
        } else {
            f64::NAN
        };
        self.completed = r.round;
        let evaluate = r.round % self.cfg.eval_every.max(1) == 0 || r.round == self.cfg.rounds;
        out.push(Action::RoundClosed(RoundSummary {
            round: r.round,
            participants: r.reported.keys().cloned().collect(),
            failures,
            num_samples,
            train_loss,
            commands: r.commands,
            retries: r.retries,
            seconds: now.saturating_duration_since(r.started).as_secs_f64(),
            evaluate,
            updated,
            strategy_metrics: end.metrics,
        }));
        if let Some(why) = self.strategy.stop() {
            self.finish(Outcome::Stopped(why), out);
            return;
        }
        self.begin_round(r.round + 1, now, out);
    }

    /// Whether a securely aggregated round is in progress.
    fn is_secure_round(&self) -> bool {
        matches!(&self.phase, Phase::Training(r) if r.secure.is_some())
    }

    fn finish(&mut self, outcome: Outcome, out: &mut Vec<Action>) {
        self.phase = Phase::Finished;
        out.push(Action::Finish(outcome));
    }
}

/// The samples an update counts for and its weight in the aggregate: the claim, bounded by the
/// `capabilities.samples` the client announced when it joined.
///
/// # Errors
/// With sample weighting, a client that announced no sample count.
fn weigh(
    clients: &BTreeMap<String, ClientEntry>,
    weighting: Weighting,
    client: &str,
    num_samples: u64,
) -> Result<(u64, u64), String> {
    let announced = clients
        .get(client)
        .and_then(|c| c.capabilities.as_ref())
        .map(|c| c.samples);
    let samples = match (weighting, announced) {
        (Weighting::Samples, None) => {
            return Err(format!(
                "it claims {num_samples} samples but announced no capabilities.samples when it \
                 joined; a client must announce its sample count (or set fedmq_args.weighting: \
                 uniform)"
            ))
        }
        (_, Some(max)) if num_samples > max => {
            warn!(
                %client, claimed = num_samples, announced = max,
                "sample claim above what the client announced when it joined; clipped to it"
            );
            max
        }
        _ => num_samples,
    };
    let weight = match weighting {
        Weighting::Samples => samples,
        Weighting::Uniform => 1,
    };
    Ok((samples, weight))
}

/// `client: reason` for each failure; a client that failed for a reason of its own before the
/// round was re-sent to it, then stayed silent, is described by both.
fn describe_failures(
    failed: &BTreeMap<String, FailureReason>,
    earlier: &BTreeMap<String, FailureReason>,
) -> String {
    /// Clients named per reason; the rest are counted (a round of thousands of clients that
    /// all failed the same way must not make a message of thousands of lines).
    const NAMED: usize = 5;
    if failed.is_empty() {
        return "none".into();
    }
    let mut by_reason: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (c, r) in failed {
        let reason = match earlier.get(c) {
            Some(e) if e != r => format!("{r} (before the re-send: {e})"),
            _ => r.to_string(),
        };
        by_reason.entry(reason).or_default().push(c);
    }
    by_reason
        .iter()
        .map(|(reason, clients)| match clients.as_slice() {
            [one] => format!("{one}: {reason}"),
            many if many.len() <= NAMED => format!("{}: {reason}", many.join(", ")),
            many => format!(
                "{} and {} more: {reason}",
                many[..NAMED].join(", "),
                many.len() - NAMED
            ),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

mod buffered;
mod secure;
#[cfg(test)]
mod secure_tests;
#[cfg(test)]
mod tests;
