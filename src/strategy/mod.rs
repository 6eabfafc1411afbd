//! Aggregation strategies: which clients train in a round, and how their updates become the next
//! global model.
//!
//! The shape follows Flower's strategy (configure a round, aggregate its results, failures passed
//! in as data), with one change: aggregation is *streaming*. A round's [`RoundAggregate`] folds
//! each update in as it arrives, so the server holds O(model) memory instead of O(clients × model).
//! Strategies that need every update at once (median, Krum) buffer inside their own aggregate.
//!
//! # Layout
//! - this file: [`Strategy`], [`RoundAggregate`], [`ClientFailure`].
//! - `fedavg.rs`: [`FedAvg`], the sample-weighted average of McMahan et al. 2017, and the
//!   [`StreamingMean`] other strategies aggregate with.
//! - `fedopt.rs`: [`FedOpt`], server optimizers on the averaged update (FedAvgM, FedAdagrad,
//!   FedAdam, FedYogi).
//! - `fedprox.rs`: [`FedProx`], FedAvg with a proximal term on the clients.
//! - `scaffold.rs`: [`Scaffold`], control variates against client drift (option II).
//! - `fednova.rs`: [`FedNova`], normalized averaging of clients with different step counts.
//! - `fedbuff.rs`: [`FedBuff`], buffered asynchronous aggregation (no round barrier).
//! - `robust/`: Byzantine-robust aggregation rules over flattened updates ([`robust`]).
//! - `defended.rs`: [`Defended`], any mean-aggregating strategy with a robust rule in place of
//!   its mean (`defense_args`).
//! - `private.rs`: [`Private`], differential privacy around a strategy (`dp_args`).
//!
//! [`from_config`] builds the strategy a config names.

mod defended;
mod fedavg;
pub mod fedbuff;
mod fednova;
mod fedopt;
mod fedprox;
mod private;
pub mod robust;
pub mod scaffold;

pub use defended::{defense_from_config, Defended, Defense, RootTrainer, DEFENSES};
pub use fedavg::{FedAvg, StreamingMean};
pub use fedbuff::{Buffered, FedBuff};
pub use fednova::{normalizer as fednova_normalizer, FedNova};
pub use fedopt::{FedOpt, FedOptConfig, ServerOptimizer};
pub use fedprox::FedProx;
pub use private::{dp_from_config, DpMode, DpSettings, Private};
pub use scaffold::Scaffold;

use crate::proto::StrategyInstruction;
use crate::tensor::{ParamSet, ParamsView};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Why a selected client contributed nothing to a round. Failures are data, not errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum FailureReason {
    /// No update before the round's deadline.
    Timeout,
    /// The client went offline (last will or clean exit) during the round.
    Disconnected,
    /// The client reported a failure itself.
    Reported(String),
    /// The update could not be used (digest mismatch, wrong layout, non-finite values).
    BadUpdate(String),
    /// The update arrived, but the round's secure aggregation failed, so it was not unmasked.
    NotUnmasked(String),
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureReason::Timeout => f.write_str("timeout"),
            FailureReason::Disconnected => f.write_str("disconnected"),
            FailureReason::Reported(r) => write!(f, "reported: {r}"),
            FailureReason::BadUpdate(r) => write!(f, "bad update: {r}"),
            FailureReason::NotUnmasked(r) => write!(f, "not unmasked: {r}"),
        }
    }
}

/// A selected client that did not contribute to a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFailure {
    /// The client id.
    pub client: String,
    /// Why.
    pub reason: FailureReason,
}

/// Errors of aggregation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An update's tensors do not match the global model's names and shapes.
    #[error("update from {client} does not match the global model: {detail}")]
    Layout {
        /// The client.
        client: String,
        /// What differs.
        detail: String,
    },
    /// An update contains NaN or infinite values.
    #[error("update from {client} contains non-finite values in {tensor}")]
    NonFinite {
        /// The client.
        client: String,
        /// The first offending tensor.
        tensor: String,
    },
    /// A zero sample count (FedAvg weight).
    #[error("update from {client} claims 0 samples")]
    ZeroWeight {
        /// The client.
        client: String,
    },
    /// An update lacks what the strategy asked the client to report, or reports nonsense.
    #[error("update from {client}: {detail}")]
    Report {
        /// The client.
        client: String,
        /// What is missing or wrong.
        detail: String,
    },
    /// An update trained from a model version the strategy no longer holds (or not yet).
    #[error("update from {client} started from round {base}'s model, too old for round {current}")]
    Stale {
        /// The client.
        client: String,
        /// The round whose global model it trained from.
        base: u64,
        /// The round being aggregated.
        current: u64,
    },
    /// Restoring strategy state from a checkpoint failed.
    #[error("cannot restore {strategy} state: {detail}")]
    Restore {
        /// The strategy.
        strategy: String,
        /// Why.
        detail: String,
    },
}

/// Result of aggregation.
pub type Result<T> = std::result::Result<T, Error>;

/// The numbers a client reports about its local training when its strategy instruction asks
/// ([`crate::proto::Update::report`]).
pub type Report = BTreeMap<String, f64>;

/// Every `train_args.federated_optimizer` fedmq runs (matched case-insensitively): FedML's names
/// (`FedAvg`, `FedProx`, `FedOpt` with `server_optimizer`) and shorthands for the FedOpt family.
pub const STRATEGIES: &[&str] = &[
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedOpt",
    "FedAdam",
    "FedYogi",
    "FedAdagrad",
    "SCAFFOLD",
    "FedNova",
    "FedBuff",
    "Async_FedAvg",
    "SA",
    "LSA",
    "HierarchicalFL",
];

/// A config value [`from_config`] cannot use: the key and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The config key, e.g. `train_args.server_lr`.
    pub key: &'static str,
    /// What is wrong and what is valid.
    pub reason: String,
}

/// The strategy `train_args.federated_optimizer` names, with its hyper-parameters from
/// `train_args` (FedML's keys: `server_optimizer`, `server_lr`, `server_momentum`,
/// `fedprox_mu`) and `fedmq_args` (`server_beta1`, `server_beta2`, `server_tau`).
///
/// # Errors
/// An unknown name (listing the valid ones) or an out-of-range hyper-parameter, with its key.
pub fn from_config(
    t: &crate::config::TrainArgs,
    f: &crate::config::FedmqArgs,
) -> std::result::Result<Box<dyn Strategy>, ConfigError> {
    let name = t.federated_optimizer.to_ascii_lowercase();
    let fedopt = |label: &'static str, opt: ServerOptimizer, momentum: f64| {
        let cfg = FedOptConfig {
            optimizer: opt,
            lr: t.server_lr.unwrap_or(opt.default_lr()),
            momentum,
            beta1: f.server_beta1,
            beta2: f.server_beta2,
            tau: f.server_tau,
        };
        FedOpt::new(label, cfg)
            .map(|s| Box::new(s) as Box<dyn Strategy>)
            .map_err(|reason| ConfigError {
                key: "train_args.server_lr",
                reason: format!(
                    "{label}: {reason} (keys train_args.server_lr, \
                                 server_momentum; fedmq_args.server_beta1, server_beta2, \
                                 server_tau)"
                ),
            })
    };
    match name.as_str() {
        // FedML's names for FedAvg with secure aggregation (`Config::secure_aggregation`).
        // HierarchicalFL: FedAvg at the cloud over the edges' site aggregates (`crate::edge`).
        "fedavg" | "sa" | "lsa" | "hierarchicalfl" => Ok(Box::new(FedAvg::default())),
        "fedprox" => {
            let mu = t.fedprox_mu.unwrap_or(0.01);
            if !(mu.is_finite() && mu >= 0.0) {
                return Err(ConfigError {
                    key: "train_args.fedprox_mu",
                    reason: format!("must be ≥ 0, got {mu}"),
                });
            }
            Ok(Box::new(FedProx { mu }))
        }
        "fedavgm" => fedopt(
            "FedAvgM",
            ServerOptimizer::Sgd,
            t.server_momentum.unwrap_or(0.9),
        ),
        "fedadam" => fedopt("FedAdam", ServerOptimizer::Adam, 0.0),
        "fedyogi" => fedopt("FedYogi", ServerOptimizer::Yogi, 0.0),
        "fedadagrad" => fedopt("FedAdagrad", ServerOptimizer::Adagrad, 0.0),
        "scaffold" | "fednova" if !t.client_optimizer.eq_ignore_ascii_case("sgd") => {
            Err(ConfigError {
                key: "train_args.client_optimizer",
                reason: format!(
                    "{} normalizes plain or momentum SGD steps; with client_optimizer {:?} its \
                     arithmetic does not hold: set client_optimizer: sgd",
                    t.federated_optimizer, t.client_optimizer
                ),
            })
        }
        "scaffold" => Scaffold::new(t.server_lr.unwrap_or(1.0))
            .map(|s| Box::new(s) as Box<dyn Strategy>)
            .map_err(|reason| ConfigError {
                key: "train_args.server_lr",
                reason: format!("SCAFFOLD: {reason}"),
            }),
        "fednova" => FedNova::new(t.server_lr.unwrap_or(1.0))
            .map(|s| Box::new(s) as Box<dyn Strategy>)
            .map_err(|reason| ConfigError {
                key: "train_args.server_lr",
                reason: format!("FedNova: {reason}"),
            }),
        "fedopt" => {
            let opt =
                ServerOptimizer::parse(&t.server_optimizer).map_err(|reason| ConfigError {
                    key: "train_args.server_optimizer",
                    reason,
                })?;
            let label = match opt {
                ServerOptimizer::Sgd => "FedAvgM",
                ServerOptimizer::Adam => "FedAdam",
                ServerOptimizer::Yogi => "FedYogi",
                ServerOptimizer::Adagrad => "FedAdagrad",
            };
            fedopt(label, opt, t.server_momentum.unwrap_or(0.0))
        }
        "fedbuff" | "async_fedavg" => FedBuff::new(
            f.buffer_size
                .unwrap_or_else(|| (t.client_num_per_round / 2).max(1)),
            f.max_staleness,
            t.server_lr.unwrap_or(1.0),
        )
        .map(|s| Box::new(s) as Box<dyn Strategy>)
        .map_err(|reason| ConfigError {
            key: "fedmq_args.buffer_size",
            reason: format!("FedBuff: {reason} (keys fedmq_args.buffer_size, max_staleness; train_args.server_lr)"),
        }),
        _ => Err(ConfigError {
            key: "train_args.federated_optimizer",
            reason: format!(
                "{:?} is not a strategy fedmq knows; valid: {}",
                t.federated_optimizer,
                STRATEGIES.join(", ")
            ),
        }),
    }
}

/// A federated optimization strategy.
pub trait Strategy: Send {
    /// Short name (`FedAvg`), recorded in checkpoints and metrics.
    fn name(&self) -> &'static str;

    /// Chooses the clients of round `round` among `available` (sorted, online and admitted), at
    /// most `per_round` of them, each with what the strategy asks of its local training. The
    /// default samples uniformly without replacement from `rng`, so a seeded run selects the
    /// same clients every time, and asks each for [`Strategy::instruction`].
    fn configure_train(
        &mut self,
        round: u64,
        available: &[String],
        per_round: usize,
        rng: &mut ChaCha8Rng,
    ) -> Vec<ClientTrain> {
        sample_clients(available, per_round, rng)
            .into_iter()
            .map(|client| ClientTrain {
                instruction: self.instruction(round, &client),
                client,
            })
            .collect()
    }

    /// What the strategy asks of `client`'s local training in `round` (also for a client the
    /// round is re-sent to). `None`: plain local training.
    fn instruction(&self, round: u64, client: &str) -> Option<StrategyInstruction> {
        let _ = (round, client);
        None
    }

    /// Tensors sent to the clients with `global`, the model of `round`, in the same blob
    /// (each named `strategy/<name>`): SCAFFOLD's server control variate. `None` for most
    /// strategies.
    fn round_tensors(&mut self, round: u64, global: &ParamSet) -> Option<Arc<ParamSet>> {
        let _ = (round, global);
        None
    }

    /// `Some` for an asynchronous strategy: the round machine then runs no round barrier, and a
    /// "round" is one server step every `buffer` updates ([`FedBuff`]). `None` (the default):
    /// synchronous rounds.
    fn buffered(&self) -> Option<Buffered> {
        None
    }

    /// Asks the strategy to aggregate the tensors named in `tensors` (embedding tables) row by
    /// row, each row over the updates that changed it, its mean change applied up to
    /// `step_cap` times ([`StreamingMean::with_row_sparse`]). Returns whether it does; the
    /// default does not (every row is averaged over every update).
    fn set_row_sparse(
        &mut self,
        tensors: std::collections::BTreeSet<String>,
        step_cap: u32,
    ) -> bool {
        let _ = (tensors, step_cap);
        false
    }

    /// Whether the strategy works with secure aggregation, which gives it only the weighted
    /// mean of a round's models (one `add` of that mean) and no per-client tensors or reports.
    /// The default refuses: a strategy says `Ok` only when its aggregate is that mean.
    ///
    /// # Errors
    /// Why not, for the configuration error.
    fn secure_aggregation(&self) -> std::result::Result<(), String> {
        Err(format!(
            "{} needs each client's update (or reports) on their own, but secure aggregation \
             gives the server only their weighted mean; use FedAvg, FedProx or the FedOpt family \
             (FedAvgM, FedAdam, FedYogi, FedAdagrad), or turn secure aggregation off",
            self.name()
        ))
    }

    /// Starts aggregating round `round`, whose clients trained from `global`.
    fn begin_round(&mut self, round: u64, global: &ParamSet) -> Box<dyn RoundAggregate>;

    /// Closes round `round`: `aggregate` is what the round's [`RoundAggregate`] produced (`None`
    /// when no update arrived), `global` the model the round started from. Returns the next
    /// global model (`None`: keep `global`) and metrics for `metrics.jsonl`. The default takes
    /// the aggregate as the new model; server optimizers (FedOpt) step from `global` towards it
    /// and update their own state here.
    fn end_round(
        &mut self,
        round: u64,
        global: &ParamSet,
        aggregate: Option<ParamSet>,
    ) -> RoundEnd {
        let _ = (round, global);
        RoundEnd {
            global: aggregate,
            metrics: BTreeMap::new(),
        }
    }

    /// `Some(why)` when the run should end after the round just closed, before its last
    /// round (differential privacy's budget is spent). `None` (the default): go on.
    fn stop(&self) -> Option<String> {
        None
    }

    /// Strategy state to checkpoint (server optimizer moments, ...): a snapshot, encoded to
    /// JSON only when the checkpoint is written, off the round's critical path. `null` when
    /// stateless.
    fn state(&self) -> StrategyState {
        StrategyState::json(serde_json::Value::Null)
    }

    /// Restores [`Strategy::state`] from a checkpoint: its JSON part and its tensors.
    ///
    /// # Errors
    /// [`Error::Restore`] when the state does not belong to this strategy.
    fn restore(&mut self, state: &serde_json::Value, tensors: Option<ParamSet>) -> Result<()> {
        let _ = (state, tensors);
        Ok(())
    }
}

/// Checks an update against the round's `global` model: same tensors and shapes, every value
/// finite. The check every aggregate makes before folding an update in.
///
/// # Errors
/// [`Error::Layout`] or [`Error::NonFinite`], naming `client`.
pub fn check_update(global: &ParamSet, client: &str, update: &ParamsView<'_>) -> Result<()> {
    update.check_layout(global).map_err(|e| Error::Layout {
        client: client.to_string(),
        detail: e.to_string(),
    })?;
    match update
        .tensors()
        .iter()
        .find(|t| t.values().any(|x| !x.is_finite()))
    {
        Some(t) => Err(Error::NonFinite {
            client: client.to_string(),
            tensor: t.name().to_string(),
        }),
        None => Ok(()),
    }
}

/// `per_round` of `available` (all of them when fewer), sampled uniformly without replacement
/// from `rng` and sorted: the default selection of [`Strategy::configure_train`].
pub fn sample_clients(available: &[String], per_round: usize, rng: &mut ChaCha8Rng) -> Vec<String> {
    let n = per_round.min(available.len());
    let mut picked: Vec<String> = rand::seq::index::sample(rng, available.len(), n)
        .into_iter()
        .map(|i| available[i].clone())
        .collect();
    picked.sort();
    picked
}

/// A snapshot of a strategy's state ([`Strategy::state`]), turned into JSON by
/// [`StrategyState::encode`] when a checkpoint is written (in the background: a strategy with
/// model-sized state hands out shared references here, not copies).
#[allow(clippy::type_complexity)]
pub struct StrategyState(Box<dyn FnOnce() -> (serde_json::Value, Option<ParamSet>) + Send>);

impl StrategyState {
    /// State that is already JSON.
    pub fn json(value: serde_json::Value) -> Self {
        Self(Box::new(move || (value, None)))
    }

    /// State made by `f` when the checkpoint is written: a small JSON part (the checkpoint's
    /// `state` field) and model-sized tensors, stored as a binary blob beside the checkpoint.
    pub fn lazy(
        f: impl FnOnce() -> (serde_json::Value, Option<ParamSet>) + Send + 'static,
    ) -> Self {
        Self(Box::new(f))
    }

    /// The checkpoint's `state` JSON and the tensors, if any.
    pub fn encode(self) -> (serde_json::Value, Option<ParamSet>) {
        (self.0)()
    }
}

impl std::fmt::Debug for StrategyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StrategyState(..)")
    }
}

/// One selected client of a round and what the strategy asks of its local training.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientTrain {
    /// The client id.
    pub client: String,
    /// Sent in the train command (`None`: plain local training).
    pub instruction: Option<StrategyInstruction>,
}

/// What [`Strategy::end_round`] decided.
#[derive(Debug, Clone, Default)]
pub struct RoundEnd {
    /// The next global model; `None` keeps the current one.
    pub global: Option<ParamSet>,
    /// The strategy's metrics of the round (e.g. `server_update_norm`), recorded under
    /// `strategy` in `metrics.jsonl`.
    pub metrics: BTreeMap<String, f64>,
}

/// The aggregation of one round, fed one update at a time.
pub trait RoundAggregate: Send {
    /// Folds in one client's update with its weight (sample count): its full trained
    /// parameters, plus the tensors the strategy asked for under `strategy/` (SCAFFOLD's control
    /// variate change), and `report`, the numbers it asked for (FedNova's `local_steps`).
    ///
    /// # Errors
    /// The update is unusable (layout, non-finite values, zero weight, a missing report); the
    /// aggregate is left unchanged, so the caller records a failure and goes on.
    fn add(
        &mut self,
        client: &str,
        update: &ParamsView<'_>,
        num_samples: u64,
        report: &Report,
    ) -> Result<()>;

    /// Folds in an update trained from the global model of an earlier round `base`
    /// (asynchronous strategies, [`Strategy::buffered`]). The default refuses it.
    ///
    /// # Errors
    /// As [`RoundAggregate::add`], and [`Error::Stale`].
    fn add_stale(
        &mut self,
        base: u64,
        client: &str,
        update: &ParamsView<'_>,
        num_samples: u64,
        report: &Report,
    ) -> Result<()> {
        let _ = (update, num_samples, report);
        Err(Error::Stale {
            client: client.to_string(),
            base,
            current: base + 1,
        })
    }

    /// Number of updates folded in so far.
    fn count(&self) -> usize;

    /// Metrics of the round's updates (e.g. `update_distance`), recorded under `strategy` in
    /// `metrics.jsonl` with [`Strategy::end_round`]'s.
    fn metrics(&self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }

    /// Closes the round: the new global model, or `None` to keep the old one (no updates).
    /// `failures` are the selected clients that contributed nothing.
    fn finish(self: Box<Self>, failures: &[ClientFailure]) -> Option<ParamSet>;
}
