//! The round benchmark behind `fedmq bench round`: whole federated rounds (server, clients,
//! broker, store) with local training replaced by a no-op, so what is measured is the system
//! around training: control messages, model transfers, digests, encoding and aggregation.
//!
//! Every client runs [`NoopTrainer`]: its update is the global model it received plus a small
//! constant. The model is synthetic ([`synthetic_model`]): exactly `params` f32 values in four
//! tensors, with values that are a function of their index, so the expected final model can be
//! recomputed without keeping a copy ([`RoundBenchConfig::payload_check`]).
//!
//! # What lives here
//! - [`bench_round_in_process`]: the whole federation in this process (embedded broker or a
//!   Mosquitto child, embedded store over a scratch directory, the server and every client, each
//!   client with its own MQTT session and S3 client).
//! - The parts the multi-process mode of the command line is built from: [`run_bench_server`],
//!   [`run_bench_client`], [`MosquittoBroker`], [`ScratchDir`], [`proc_status_kib`] and
//!   [`RoundBenchReport::from_server`].
//!
//! # Figures
//! Round times are the server's own (`RoundRecord::round_s`: from the upload of the global model
//! to the round's close). With three rounds or more, round 1 (connections, first allocations) is
//! left out of the median, p90 and minimum; the report says so in `warmup_rounds_dropped`.
//! Memory figures are Linux's `VmHWM` (peak resident set) from `/proc/<pid>/status`; it never
//! decreases during a process's life, which is why the command line runs each configuration in
//! a fresh process when several are asked for.

use crate::client::{self, ClientOptions, ClientReport, NoopTrainer};
use crate::federation::{
    capabilities, participant_store_options, LocalClients, Security, CLIENT_GRACE, KEY_PREFIX,
};
use crate::metrics::RoundRecord;
use crate::proto::{BlobKeys, TrainConfig};
use crate::server::{
    self, OnFailure, Progress, Protocol, RoundConfig, SecureConfig, ServerOptions, ServerReport,
    Weighting,
};
use crate::store::{
    BlobStore, EmbeddedStore, RetentionPolicy, S3Options, StoreOptions, StoreTls, MIB,
};
use crate::tensor::{NamedTensor, ParamSet};
use crate::transport::{BrokerOptions, BrokerTls, EmbeddedBroker, MqttTls, SessionOptions};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Samples each benchmark client reports (its FedAvg weight).
pub const CLIENT_SAMPLES: u64 = 100;

/// The access key of the benchmark's store.
pub const ACCESS_KEY: &str = "fedmq-bench";

/// The bucket of the benchmark's store.
pub const BUCKET: &str = "fedmq-bench";

/// Rounds whose blobs the benchmark's server keeps in the store.
/// The clipping bound of secure-aggregation benchmarks (`fedmq_args.secagg_clip`'s default).
pub const SECAGG_CLIP: f64 = 1.0;

const KEEP_ROUNDS: NonZeroU64 = NonZeroU64::MIN.saturating_add(1);

/// Which MQTT broker carries the control messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// fedmq's embedded rumqttd (in this process, or `fedmq broker` in the process mode).
    Embedded,
    /// A Mosquitto child process ([`MosquittoBroker`]).
    Mosquitto,
}

impl std::str::FromStr for BrokerKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "embedded" | "rumqttd" => Ok(Self::Embedded),
            "mosquitto" => Ok(Self::Mosquitto),
            other => Err(format!(
                "unknown broker {other:?}; valid: embedded, mosquitto"
            )),
        }
    }
}

impl std::fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Embedded => "embedded",
            Self::Mosquitto => "mosquitto",
        })
    }
}

/// Where the participants run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// Server, clients, broker and store in one process.
    #[serde(rename = "in-process")]
    InProcess,
    /// Every client, the broker and the store in its own process; the server in the caller's.
    #[serde(rename = "processes")]
    Processes,
}

/// One configuration of the benchmark.
#[derive(Debug, Clone)]
pub struct RoundBenchConfig {
    /// Clients, all selected every round.
    pub clients: usize,
    /// Model parameters (f32 values).
    pub params: usize,
    /// Rounds.
    pub rounds: u64,
    /// The broker.
    pub broker: BrokerKind,
    /// Update downloads the server runs at once (`ServerOptions::fetch_concurrency`).
    pub fetch_concurrency: usize,
    /// Check that the final model is exactly the initial one plus `rounds × delta`.
    pub payload_check: bool,
    /// What every client adds to every parameter.
    pub delta: f32,
    /// Deadline of a round (generous: a missed deadline spoils the figure anyway).
    pub round_timeout: Duration,
    /// Everything on: MQTT over mutual TLS with the shipped ACL (the embedded broker's gateway,
    /// or Mosquitto), S3 over HTTPS, every message signed and checked, every blob sealed (see
    /// [`BenchSecurity`]).
    pub secure: bool,
    /// With processes: client sessions per client process (each with its own MQTT connection and
    /// S3 client), so that thousands of real sessions fit on a small machine.
    pub clients_per_process: usize,
    /// The server's strategy (`train_args.federated_optimizer` names, default hyper-parameters).
    pub strategy: String,
    /// Local steps each no-op client reports, by rank (cycled; empty: 1 each). Strategies that
    /// normalize by steps (FedNova, SCAFFOLD) then move the model by amounts
    /// [`server_shift`] computes.
    pub client_steps: Vec<u64>,
    /// How long each no-op client "trains", by rank (cycled; empty: no delay): slow clients.
    pub client_delays: Vec<Duration>,
    /// The strategy's own hyper-parameters (FedBuff's buffer and staleness bound, the
    /// server optimizers' β and τ, ...).
    pub strategy_args: crate::config::FedmqArgs,
    /// Secure aggregation (SecAgg+) on every round.
    pub secure_aggregation: bool,
    /// With `secure_aggregation`: LightSecAgg instead of SecAgg+.
    pub light_secagg: bool,
    /// Fraction of the clients that drop out of every round: the last `round(dropout · clients)`
    /// ranks fail after `dropout_after`, while the others go on.
    pub dropout: f64,
    /// When a dropping client fails (with secure aggregation: after it shared its keys, if the
    /// stages are faster than this).
    pub dropout_after: Duration,
    /// What each client adds to every parameter, by rank (cycled; empty: `delta` for all): with
    /// distinct values, the final model tells which clients' updates it holds.
    pub client_deltas: Vec<f32>,
    /// Hierarchical FL (with processes): this many `fedmq edge` processes between the clients
    /// (devices) and the server, which then has the edges as its clients (0: flat).
    pub edges: usize,
}

impl Default for RoundBenchConfig {
    fn default() -> Self {
        Self {
            edges: 0,
            clients: 10,
            params: 1_000_000,
            rounds: 5,
            broker: BrokerKind::Embedded,
            fetch_concurrency: 0,
            payload_check: false,
            delta: 0.001,
            round_timeout: Duration::from_secs(300),
            secure: false,
            clients_per_process: 1,
            strategy: "FedAvg".into(),
            client_steps: Vec::new(),
            client_delays: Vec::new(),
            strategy_args: crate::config::FedmqArgs::default(),
            secure_aggregation: false,
            light_secagg: false,
            dropout: 0.0,
            dropout_after: Duration::from_millis(50),
            client_deltas: Vec::new(),
        }
    }
}

impl RoundBenchConfig {
    /// The local steps client `rank` (1-based) reports.
    pub fn steps_of(&self, rank: usize) -> u64 {
        if self.client_steps.is_empty() {
            1
        } else {
            self.client_steps[(rank - 1) % self.client_steps.len()]
        }
    }

    /// What client `rank` (1-based) adds to every parameter.
    pub fn delta_of(&self, rank: usize) -> f32 {
        if self.client_deltas.is_empty() {
            self.delta
        } else {
            self.client_deltas[(rank - 1) % self.client_deltas.len()]
        }
    }

    /// Clients that drop out of every round.
    pub fn dropped(&self) -> usize {
        ((self.dropout * self.clients as f64).round() as usize).min(self.clients)
    }

    /// Whether client `rank` drops out of every round (the last [`Self::dropped`] ranks).
    pub fn drops(&self, rank: usize) -> bool {
        rank > self.clients - self.dropped()
    }

    /// The no-op trainer of client `rank` (1-based).
    pub fn trainer_of(&self, rank: usize) -> NoopTrainer {
        let fail = self.drops(rank);
        NoopTrainer {
            num_samples: CLIENT_SAMPLES,
            delta: self.delta_of(rank),
            steps: self.steps_of(rank),
            delay: if fail {
                self.dropout_after
            } else if self.client_delays.is_empty() {
                Duration::ZERO
            } else {
                self.client_delays[(rank - 1) % self.client_delays.len()]
            },
            fail,
        }
    }

    /// The mean of the surviving clients' deltas (equal weights): what a round adds to every
    /// parameter under FedAvg.
    pub fn survivors_mean_delta(&self) -> f64 {
        let ranks: Vec<usize> = (1..=self.clients).filter(|&r| !self.drops(r)).collect();
        ranks
            .iter()
            .map(|&r| f64::from(self.delta_of(r)))
            .sum::<f64>()
            / ranks.len().max(1) as f64
    }
}

/// One line of the benchmark's output.
#[derive(Debug, Clone, Serialize)]
pub struct RoundBenchReport {
    /// Clients.
    pub clients: usize,
    /// Model parameters.
    pub params: usize,
    /// Rounds asked for.
    pub rounds: u64,
    /// Rounds the server closed.
    pub rounds_completed: usize,
    /// Where the participants ran.
    pub mode: Mode,
    /// The broker.
    pub broker: BrokerKind,
    /// The server's update downloads in flight at once (0: the server's default).
    pub fetch_concurrency: usize,
    /// `on`: TLS, signed messages and sealed blobs; `off`: plain TCP and HTTP, unsigned,
    /// plaintext blobs.
    pub security: &'static str,
    /// The server's strategy.
    pub strategy: String,
    /// Secure aggregation on every round.
    pub secure_aggregation: bool,
    /// The secure aggregation protocol (`secagg_plus` or `lightsecagg`), when it is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sa_method: Option<&'static str>,
    /// Fraction of the clients that dropped out of every round.
    pub dropout: f64,
    /// With secure aggregation: medians (warm-up left out) of when each stage closed, in
    /// seconds from the round's train commands (`secagg_keys_s`, `secagg_shares_s`,
    /// `secagg_masked_s`, `secagg_unmask_s`).
    pub secagg_stage_s_median: BTreeMap<String, f64>,
    /// Median round time in seconds (warm-up rounds left out).
    pub round_s_median: Option<f64>,
    /// 90th percentile (nearest rank) of the round times.
    pub round_s_p90: Option<f64>,
    /// Fastest round.
    pub round_s_min: Option<f64>,
    /// Slowest round.
    pub round_s_max: Option<f64>,
    /// Leading rounds left out of the statistics above (1 when `rounds ≥ 3`).
    pub warmup_rounds_dropped: usize,
    /// Every round's time, in order, warm-up included.
    pub round_s: Vec<f64>,
    /// Medians (warm-up left out) of where a round's time went, as the server saw it: `upload`
    /// (global model encoded, hashed, stored; checkpoint), `first_update` / `last_update` (train
    /// commands → first / last update folded), `close`.
    pub phase_s_median: Option<PhaseMedians>,
    /// Median bytes through the object store per round (uploads and downloads).
    pub bytes_per_round: Option<u64>,
    /// Raw model size, `4 × params` bytes, in MiB.
    pub model_mib: f64,
    /// Peak resident set of the server's process in MiB; `None` when the server shares its
    /// process with other participants.
    pub server_peak_rss_mib: Option<f64>,
    /// The server process's peak minus its resident set just before the initial model was built.
    pub server_rss_above_idle_mib: Option<f64>,
    /// `server_rss_above_idle_mib / model_mib`.
    pub server_rss_above_idle_models: Option<f64>,
    /// Sum of the peak resident sets of every process of the run.
    pub total_rss_mib: Option<f64>,
    /// Peak resident set of the broker's process (when it has its own).
    pub broker_peak_rss_mib: Option<f64>,
    /// Peak resident set of the store's process (when it has its own).
    pub store_peak_rss_mib: Option<f64>,
    /// Largest peak resident set among the client processes (when they have their own).
    pub client_peak_rss_mib_max: Option<f64>,
    /// Edges between the clients and the server (hierarchical runs; 0: flat).
    pub edges: usize,
    /// Largest peak resident set among the edge processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge_peak_rss_mib_max: Option<f64>,
    /// Resident set of the whole benchmark process just before the initial model was built
    /// (in-process mode: broker, store and clients connected, no model yet).
    pub idle_rss_mib: Option<f64>,
    /// CPU seconds of the whole run, by process (start-up included).
    pub cpu_s: CpuSeconds,
    /// Whether the final model was exactly initial + rounds × delta (with `--payload-check`).
    pub payload_ok: Option<bool>,
    /// The strategy's metrics of the last round (`control_norm`, `tau_eff`, ...).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub strategy_metrics: std::collections::BTreeMap<String, f64>,
    /// The largest value of each strategy metric over the run (FedBuff's `max_staleness`: the
    /// most versions an applied update lagged).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub strategy_metrics_max: std::collections::BTreeMap<String, f64>,
    /// Clients that reported every round.
    pub clients_ok: usize,
    /// `completed`, or `aborted: <reason>`.
    pub outcome: String,
    /// Wall seconds of the whole run, start-up of broker, store and clients included.
    pub wall_s: f64,
    /// What to keep in mind when reading the figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// CPU seconds (user + system) of a run's processes; `None` where not measured separately.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CpuSeconds {
    /// Every process of the run.
    pub total: Option<f64>,
    /// The server's process (in-process mode: everything).
    pub server: Option<f64>,
    /// The broker's process.
    pub broker: Option<f64>,
    /// The store's process.
    pub store: Option<f64>,
    /// All client processes together.
    pub clients: Option<f64>,
    /// All edge processes together (hierarchical runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edges: Option<f64>,
}

/// Parses a parameter count: a plain integer (`1000000`, `1_000_000`) or a number with a
/// decimal suffix `k`, `M` or `G` (`100k`, `1M`, `2.5M`, `1G`; case-insensitive).
///
/// # Errors
/// A message for anything else, zero, or a count that does not fit.
pub fn parse_params(s: &str) -> std::result::Result<usize, String> {
    let t: String = s.trim().chars().filter(|&c| c != '_').collect();
    let bad = || {
        format!("bad parameter count {s:?}: use an integer or a number with k, M or G (e.g. 100k, 1M, 10M)")
    };
    let (num, mult): (&str, u64) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1_000),
        Some('m' | 'M') => (&t[..t.len() - 1], 1_000_000),
        Some('g' | 'G') => (&t[..t.len() - 1], 1_000_000_000),
        _ => (t.as_str(), 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let n = if let Ok(i) = num.parse::<u64>() {
        i.checked_mul(mult).ok_or_else(bad)?
    } else {
        let f: f64 = num.parse().map_err(|_| bad())?;
        let v = f * mult as f64;
        if v.fract() != 0.0 || v > u64::MAX as f64 {
            return Err(format!("{s:?} is not a whole number of parameters"));
        }
        v as u64
    };
    if n == 0 {
        return Err("the parameter count must be at least 1".into());
    }
    usize::try_from(n).map_err(|_| bad())
}

/// The value of parameter `index` (counted across tensors in name order) of the synthetic model:
/// a hash of the index mapped into [-0.05, 0.05).
pub fn synthetic_value(index: u64) -> f32 {
    // SplitMix64 finalizer.
    let mut z = index.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 24 random bits → [0, 1) exactly representable in f32.
    let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
    (unit - 0.5) * 0.1
}

/// The tensor names and shapes of the synthetic model of `params` values, in name order: two
/// layers like a small MLP (`fc1.bias`, `fc1.weight`, `fc2.bias`, `fc2.weight`), about 70 % of the
/// values in `fc1.weight`. Fewer than 4 values: one tensor `w`.
pub fn synthetic_layout(params: usize) -> Vec<(String, Vec<usize>)> {
    if params < 4 {
        return vec![("w".to_string(), vec![params])];
    }
    let b1 = (params / 1000).max(1);
    let b2 = (params / 100_000).max(1);
    let weights = params - b1 - b2;
    let w2 = weights * 3 / 10;
    let w1 = weights - w2;
    let shape = |n: usize, rows: usize| {
        if n.is_multiple_of(rows) && n > rows {
            vec![rows, n / rows]
        } else {
            vec![n]
        }
    };
    vec![
        ("fc1.bias".to_string(), vec![b1]),
        ("fc1.weight".to_string(), shape(w1, b1)),
        ("fc2.bias".to_string(), vec![b2]),
        ("fc2.weight".to_string(), shape(w2, b2)),
    ]
    .into_iter()
    .filter(|(_, s)| s.iter().product::<usize>() > 0)
    .collect()
}

/// The synthetic model: exactly `params` f32 values in the tensors of [`synthetic_layout`], value
/// `i` (in name order) being [`synthetic_value`]`(i)`.
pub fn synthetic_model(params: usize) -> ParamSet {
    let mut next = 0u64;
    let tensors = synthetic_layout(params)
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product::<usize>() as u64;
            let data: Vec<f32> = (next..next + n).map(synthetic_value).collect();
            next += n;
            // The length is the product of the shape by construction.
            NamedTensor::new(name, shape, data).expect("synthetic tensor length matches its shape")
        })
        .collect();
    ParamSet::new(tensors).expect("synthetic tensor names are unique")
}

/// Whether `model` has the synthetic layout of its size and every value passes `ok(initial,
/// got)`, `initial` being the synthetic model's value at that place.
fn matches_synthetic(model: &ParamSet, mut ok: impl FnMut(f32, f32) -> bool) -> bool {
    let layout = synthetic_layout(model.num_params());
    if layout.len() != model.len() {
        return false;
    }
    let mut next = 0u64;
    for ((name, shape), t) in layout.iter().zip(model.iter()) {
        if t.name() != name || t.shape() != shape.as_slice() {
            return false;
        }
        for (i, &got) in t.data().iter().enumerate() {
            if !ok(synthetic_value(next + i as u64), got) {
                return false;
            }
        }
        next += t.len() as u64;
    }
    true
}

/// Whether `model` is exactly the synthetic model of its size with `delta` added `rounds` times
/// (in f32, one addition per round, as FedAvg over identical no-op updates produces it).
pub fn check_payload(model: &ParamSet, rounds: u64, delta: f32) -> bool {
    matches_synthetic(model, |initial, got| {
        let mut want = initial;
        for _ in 0..rounds {
            want += delta;
        }
        got == want
    })
}

/// How far a server optimizer (FedAvgM, FedAdam, FedYogi, FedAdagrad, default hyper-parameters)
/// moves every parameter in `rounds` rounds in which every client adds `delta`: the
/// pseudo-gradient is then `delta` for every parameter and round, so the moments are scalars.
/// Written from the update rules (Reddi et al. 2021, Hsu et al. 2019) in f64, independently of
/// `strategy::FedOpt`. `None` for strategies whose model is the plain mean (FedAvg, FedProx,
/// SCAFFOLD with server learning rate 1); FedNova is [`fednova_shift`].
pub fn server_shift(strategy: &str, rounds: u64, delta: f32) -> Option<f64> {
    let d = f64::from(delta);
    let (lr, b1, b2, tau) = match strategy.to_ascii_lowercase().as_str() {
        "fedavgm" => (1.0, 0.9, 0.0, 0.0),
        "fedadam" | "fedyogi" => (0.01, 0.9, 0.99, 1e-3),
        "fedadagrad" => (0.1, 0.9, 0.0, 1e-3),
        _ => return None,
    };
    let kind = strategy.to_ascii_lowercase();
    let (mut m, mut v, mut shift) = (0.0f64, tau * tau, 0.0f64);
    for _ in 0..rounds {
        if kind == "fedavgm" {
            m = b1 * m + d;
            shift += lr * m;
            continue;
        }
        m = b1 * m + (1.0 - b1) * d;
        v = match kind.as_str() {
            "fedadagrad" => v + d * d,
            "fedadam" => b2 * v + (1.0 - b2) * d * d,
            // Yogi: sign(v − Δ²), 0 at a tie (f64::signum would give ±1).
            _ => {
                let diff = v - d * d;
                let sign = if diff > 0.0 {
                    1.0
                } else if diff < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                v - (1.0 - b2) * d * d * sign
            }
        };
        shift += lr * m / (v.sqrt() + tau);
    }
    Some(shift)
}

/// How far FedNova moves every parameter in `rounds` rounds in which every client (equal
/// weights) adds `delta` after reporting `steps` plain SGD steps: each client's normalized
/// direction is `−delta/τᵢ`, the effective step count the mean `τ`, so a round moves the model
/// by `delta · mean(τ) · mean(1/τ)` (FedAvg: `delta`). From the paper's rule in f64,
/// independently of `strategy::FedNova`.
pub fn fednova_shift(steps: &[u64], rounds: u64, delta: f32) -> f64 {
    let n = steps.len() as f64;
    let mean_tau = steps.iter().map(|&t| t as f64).sum::<f64>() / n;
    let mean_inv = steps.iter().map(|&t| 1.0 / t as f64).sum::<f64>() / n;
    rounds as f64 * f64::from(delta) * mean_tau * mean_inv
}

/// Whether `model` is the synthetic model of its size with every value moved by `shift`
/// (within `tol`).
pub fn check_shift(model: &ParamSet, shift: f64, tol: f64) -> bool {
    matches_synthetic(model, |initial, got| {
        (f64::from(got) - (f64::from(initial) + shift)).abs() <= tol
    })
}

/// Statistics of the rounds of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundStats {
    /// Median round time (warm-up left out).
    pub median: f64,
    /// 90th percentile, nearest rank.
    pub p90: f64,
    /// Fastest.
    pub min: f64,
    /// Slowest.
    pub max: f64,
    /// Leading rounds left out.
    pub dropped: usize,
    /// Median bytes per round (all rounds).
    pub bytes_median: u64,
}

/// The statistics of `records`; round 1 is left out when there are at least 3. `None` without
/// records.
pub fn round_stats(records: &[RoundRecord]) -> Option<RoundStats> {
    if records.is_empty() {
        return None;
    }
    let dropped = usize::from(records.len() >= 3);
    let mut times: Vec<f64> = records[dropped..].iter().map(|r| r.round_s).collect();
    times.sort_by(f64::total_cmp);
    let mut bytes: Vec<u64> = records.iter().map(|r| r.bytes).collect();
    bytes.sort_unstable();
    Some(RoundStats {
        median: median_sorted(&times),
        p90: times[(times.len() * 9).div_ceil(10).max(1) - 1],
        min: times[0],
        max: times[times.len() - 1],
        dropped,
        bytes_median: bytes[(bytes.len() - 1) / 2],
    })
}

fn median_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmHWM`, `VmRSS`, ...); `pid` `None` reads this
/// process. `None` where the file or field is missing (not Linux, process gone).
pub fn proc_status_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// CPU seconds (user + system, all threads, exited ones included) of process `pid` (`None`: this
/// process) from `/proc/<pid>/stat`, assuming Linux's fixed `USER_HZ` of 100. `None` off Linux or
/// when the process is gone.
pub fn proc_cpu_s(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// KiB → MiB, rounded to 0.1.
pub fn kib_to_mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

/// Where a benchmark's participants meet.
#[derive(Debug, Clone)]
pub struct BenchEnv {
    /// Broker host.
    pub mqtt_host: String,
    /// Broker port.
    pub mqtt_port: u16,
    /// The store.
    pub s3: S3Options,
    /// Run id.
    pub run: String,
    /// Certificates and identities, when security is on.
    pub security: Option<Arc<BenchSecurity>>,
}

/// A secure benchmark's material: `fedmq certs` output for every participant, and fresh
/// Ed25519 identities (messages signed, blobs sealed).
#[derive(Debug)]
pub struct BenchSecurity {
    /// Directory with `ca.pem`, `<id>.pem`, `<id>.key`, `broker.*`, `store.*`.
    pub certs: PathBuf,
    /// Each participant's keys.
    pub ids: BTreeMap<String, Security>,
}

impl BenchSecurity {
    /// Certificates under `dir` and identities for the server and `clients` clients.
    ///
    /// # Errors
    /// Writing the certificates fails.
    pub fn create(dir: &Path, clients: usize) -> Result<Self> {
        let client_ids: Vec<String> = (1..=clients).map(client::client_id).collect();
        let mut all = vec![server::SERVER_ID.to_string()];
        all.extend(client_ids.iter().cloned());
        let mut plan = crate::crypto::tls::CertsPlan::new(dir, all);
        plan.hosts = vec!["127.0.0.1".into()];
        crate::crypto::tls::generate_certs(&plan)
            .context("creating the benchmark's certificates")?;
        let (server_sec, client_secs) = Security::ephemeral(&client_ids, Some(true))?;
        let mut ids: BTreeMap<String, Security> = client_ids.into_iter().zip(client_secs).collect();
        ids.insert(server::SERVER_ID.to_string(), server_sec);
        Ok(Self {
            certs: dir.to_path_buf(),
            ids,
        })
    }

    fn of(&self, id: &str) -> Security {
        self.ids.get(id).cloned().unwrap_or_default()
    }
}

impl BenchEnv {
    /// The store options for `endpoint` with the benchmark's access key and bucket.
    pub fn s3_options(endpoint: &str, secret_key: &str) -> S3Options {
        S3Options {
            endpoint: endpoint.to_string(),
            access_key: ACCESS_KEY.into(),
            secret_key: secret_key.to_string(),
            bucket: BUCKET.into(),
            ..S3Options::default()
        }
    }

    /// Client `id`'s store options: its own credential, derived from the store's secret.
    fn client_s3(&self, id: &str) -> S3Options {
        participant_store_options(&self.s3, id)
    }

    fn session(&self, id: &str) -> SessionOptions {
        let mut o = SessionOptions::new(self.mqtt_host.clone(), self.mqtt_port, id);
        if let Some(sec) = &self.security {
            o.tls = Some(MqttTls {
                ca: sec.certs.join("ca.pem"),
                identity: Some(crate::crypto::tls::Identity {
                    cert: sec.certs.join(format!("{id}.pem")),
                    key: sec.certs.join(format!("{id}.key")),
                }),
            });
            o.signer = sec.of(id).signer;
        }
        o
    }

    fn security_of(&self, id: &str) -> Security {
        self.security.as_ref().map(|s| s.of(id)).unwrap_or_default()
    }
}

/// The strategy `name` (as `train_args.federated_optimizer`) for `clients` clients a round,
/// with the hyper-parameters of `args` (`fedmq_args`; FedML's `train_args` keys at their
/// defaults).
///
/// # Errors
/// An unknown name, listing the valid ones.
pub fn strategy_named(
    name: &str,
    clients: usize,
    args: &crate::config::FedmqArgs,
) -> Result<Box<dyn crate::strategy::Strategy>> {
    let t = crate::config::TrainArgs {
        federated_optimizer: name.to_string(),
        client_num_per_round: clients,
        // The benchmark's train commands ask for SGD (`bench_server_options`).
        client_optimizer: "sgd".into(),
        ..Default::default()
    };
    crate::strategy::from_config(&t, args).map_err(|e| anyhow::anyhow!("--strategy: {}", e.reason))
}

/// A fresh run id (`bench-<hex>`).
pub fn random_run_id() -> String {
    format!("bench-{:08x}", rand::random::<u32>())
}

pub use crate::federation::random_secret;

/// The server options of a benchmark: every client selected every round, full quorum, no
/// retries, no evaluation, the last two rounds' blobs kept, nothing written to disk.
pub fn bench_server_options(cfg: &RoundBenchConfig, run: &str) -> ServerOptions {
    ServerOptions {
        run: run.to_string(),
        keys: BlobKeys::new(KEY_PREFIX, run),
        round: RoundConfig {
            rounds: cfg.rounds,
            // Hierarchical: the server's clients are the edges.
            clients_per_round: if cfg.edges > 0 {
                cfg.edges
            } else {
                cfg.clients
            },
            min_clients: if cfg.edges > 0 {
                cfg.edges
            } else {
                cfg.clients
            },
            admission_timeout: Some(Duration::from_secs(120)),
            round_timeout: cfg.round_timeout,
            // Every client that does not drop out.
            quorum: ((cfg.clients - cfg.dropped()) as f64 / cfg.clients.max(1) as f64).max(1e-9),
            max_retries: 0,
            eval_every: u64::MAX,
            seed: 0,
            train: TrainConfig {
                model: "noop".into(),
                epochs: 1,
                batch_size: 1,
                optimizer: "sgd".into(),
                // SCAFFOLD's clients divide by it; the no-op trainer ignores it.
                learning_rate: 1.0,
                momentum: 0.0,
                weight_decay: 0.0,
                seed: 0,
            },
            keys: BlobKeys::new(KEY_PREFIX, run),
            weighting: Weighting::Samples,
            secure: cfg.secure_aggregation.then(|| SecureConfig {
                clip: SECAGG_CLIP,
                degree: 0,
                threshold: 0,
                stage_timeout: Duration::from_secs(30),
                on_failure: OnFailure::Abort,
                protocol: if cfg.light_secagg {
                    Protocol::LightSecAgg {
                        active: 0,
                        privacy: None,
                    }
                } else {
                    Protocol::SecAggPlus
                },
            }),
            paced: false,
        },
        expected_clients: if cfg.edges > 0 {
            (1..=cfg.edges)
                .map(|k| crate::edge::edge_id(run, k))
                .collect()
        } else {
            (1..=cfg.clients).map(client::client_id).collect()
        },
        retention: RetentionPolicy::KeepLast(KEEP_ROUNDS),
        fetch_concurrency: cfg.fetch_concurrency,
        output_dir: None,
        connect_timeout: Duration::from_secs(30),
        keyring: None,
        crypto: None,
        health: None,
    }
}

/// What the server side of a run measured.
#[derive(Debug)]
pub struct ServerRun {
    /// The server's report.
    pub report: ServerReport,
    /// This process's resident set just before the initial model was built.
    pub idle_rss_kib: Option<u64>,
    /// This process's peak resident set right after the server returned.
    pub peak_rss_kib: Option<u64>,
    /// The payload check's result, when asked for.
    pub payload_ok: Option<bool>,
    /// Where each round's time went, from the server's progress notifications.
    pub phases: Vec<RoundPhases>,
}

/// Where one round's time went, as the server saw it (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RoundPhases {
    /// Round.
    pub round: u64,
    /// From the round's start to its train commands: encoding, hashing and storing the global
    /// model, and the previous round's checkpoint.
    pub upload: f64,
    /// From the train commands to the first update folded into the aggregate.
    pub first_update: f64,
    /// From the train commands to the last update folded.
    pub last_update: f64,
    /// From the last update folded to the round's close.
    pub close: f64,
}

/// Medians of [`RoundPhases`] over the rounds the statistics keep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PhaseMedians {
    /// Median of [`RoundPhases::upload`].
    pub upload: f64,
    /// Median of [`RoundPhases::first_update`].
    pub first_update: f64,
    /// Median of [`RoundPhases::last_update`].
    pub last_update: f64,
    /// Median of [`RoundPhases::close`].
    pub close: f64,
}

/// The medians of `phases`, leaving out the first `dropped` rounds. `None` when nothing is left.
pub fn phase_medians(phases: &[RoundPhases], dropped: usize) -> Option<PhaseMedians> {
    let kept = phases.get(dropped..).filter(|k| !k.is_empty())?;
    let med = |f: fn(&RoundPhases) -> f64| {
        let mut v: Vec<f64> = kept.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        round6(median_sorted(&v))
    };
    Some(PhaseMedians {
        upload: med(|p| p.upload),
        first_update: med(|p| p.first_update),
        last_update: med(|p| p.last_update),
        close: med(|p| p.close),
    })
}

/// Turns the server's progress notifications (with the instants they arrived) into phases.
fn phases_from_progress(events: &[(Instant, ProgressMark)]) -> Vec<RoundPhases> {
    let mut out = Vec::new();
    let mut started: Option<(u64, Instant)> = None;
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    for &(t, mark) in events {
        match mark {
            ProgressMark::Started(r) => {
                // A re-sent round keeps its first start.
                if started.is_none_or(|(sr, _)| sr != r) {
                    started = Some((r, t));
                    first = None;
                    last = None;
                }
            }
            ProgressMark::Folded(r) => {
                if started.is_some_and(|(sr, _)| sr == r) {
                    first.get_or_insert(t);
                    last = Some(t);
                }
            }
            ProgressMark::Closed(r, round_s) => {
                if let (Some((sr, st)), Some(f), Some(l)) = (started, first, last) {
                    if sr == r {
                        let begin = t
                            .checked_sub(Duration::from_secs_f64(round_s))
                            .unwrap_or(st);
                        out.push(RoundPhases {
                            round: r,
                            upload: round6(st.saturating_duration_since(begin).as_secs_f64()),
                            first_update: round6((f - st).as_secs_f64()),
                            last_update: round6((l - st).as_secs_f64()),
                            close: round6(t.saturating_duration_since(l).as_secs_f64()),
                        });
                    }
                }
                started = None;
            }
        }
    }
    out
}

/// The progress notifications the phases are computed from.
#[derive(Debug, Clone, Copy)]
enum ProgressMark {
    Started(u64),
    Folded(u64),
    Closed(u64, f64),
}

/// Runs the server of a benchmark in this process: builds the synthetic model (after noting the
/// idle resident set) and runs every round with FedAvg, no evaluator.
///
/// # Errors
/// An unusable store or an unreachable broker at start.
pub async fn run_bench_server(
    cfg: &RoundBenchConfig,
    env: &BenchEnv,
    cancel: CancellationToken,
) -> Result<ServerRun> {
    let store = BlobStore::connect(&env.s3).context("S3 options of the server")?;
    let mut opts = bench_server_options(cfg, &env.run);
    let sec = env.security_of(server::SERVER_ID);
    opts.keyring = sec.keyring;
    opts.crypto = sec.crypto;
    let idle_rss_kib = proc_status_kib(None, "VmRSS");
    let initial = tokio::task::block_in_place(|| synthetic_model(cfg.params));
    let mut marks: Vec<(Instant, ProgressMark)> = Vec::new();
    let progress = |p: &Progress| {
        let mark = match p {
            Progress::RoundStarted { round, .. } => ProgressMark::Started(*round),
            Progress::UpdateFolded { round, .. } => ProgressMark::Folded(*round),
            Progress::RoundClosed(r) => ProgressMark::Closed(r.round, r.round_s),
            _ => return,
        };
        marks.push((Instant::now(), mark));
    };
    let strategy = strategy_named(&cfg.strategy, cfg.clients, &cfg.strategy_args)?;
    let report = server::run_server(
        opts,
        env.session(server::SERVER_ID),
        store,
        strategy,
        initial,
        None,
        None,
        progress,
        cancel,
    )
    .await
    .context("running the server")?;
    let phases = phases_from_progress(&marks);
    for p in &phases {
        tracing::debug!(
            round = p.round,
            upload_s = p.upload,
            first_update_s = p.first_update,
            last_update_s = p.last_update,
            close_s = p.close,
            "round phases"
        );
    }
    let peak_rss_kib = proc_status_kib(None, "VmHWM");
    let rounds_closed = report.records.len() as u64;
    let payload_ok = cfg.payload_check.then(|| {
        tokio::task::block_in_place(|| {
            let steps: Vec<u64> = (1..=cfg.clients).map(|r| cfg.steps_of(r)).collect();
            if cfg.strategy.eq_ignore_ascii_case("fednova") {
                let shift = fednova_shift(&steps, rounds_closed, cfg.delta);
                return check_shift(&report.final_params, shift, 1e-6);
            }
            if cfg.secure_aggregation || cfg.dropout > 0.0 || !cfg.client_deltas.is_empty() {
                // The survivors' mean delta per round, within the quantization bound (and f32
                // rounding of the model) when masked.
                let shift = rounds_closed as f64 * cfg.survivors_mean_delta();
                let n = (cfg.clients - cfg.dropped()) as u64;
                let bound = if cfg.secure_aggregation {
                    let clients = cfg.clients as u64;
                    let bits = if cfg.light_secagg {
                        crate::secagg::light::max_bits(clients)
                    } else {
                        crate::secagg::quantize::Quantizer::max_bits(clients)
                    };
                    let q = crate::secagg::quantize::Quantizer::with_bits(
                        SECAGG_CLIP as f32,
                        bits,
                        clients,
                    )
                    .map(|q| q.sum_error_bound(n) / (n as f64 / cfg.clients as f64))
                    .unwrap_or(f64::INFINITY);
                    rounds_closed as f64 * q
                } else {
                    0.0
                };
                return check_shift(&report.final_params, shift, bound + 1e-5);
            }
            match server_shift(&cfg.strategy, rounds_closed, cfg.delta) {
                None => check_payload(&report.final_params, rounds_closed, cfg.delta),
                Some(shift) => check_shift(&report.final_params, shift, 1e-6),
            }
        })
    });
    Ok(ServerRun {
        report,
        idle_rss_kib,
        peak_rss_kib,
        payload_ok,
        phases,
    })
}

/// Runs benchmark client `rank` (1-based) with `trainer` until the server finishes.
///
/// # Errors
/// Bad store options, the broker not reached at start.
pub async fn run_bench_client(
    rank: usize,
    env: &BenchEnv,
    trainer: NoopTrainer,
    cancel: CancellationToken,
) -> Result<ClientReport> {
    let id = client::client_id(rank);
    let store = BlobStore::connect(&env.client_s3(&id)).context("S3 options of a client")?;
    let sec = env.security_of(&id);
    let opts = ClientOptions {
        run: env.run.clone(),
        id: id.clone(),
        keys: BlobKeys::new(KEY_PREFIX, &env.run),
        capabilities: capabilities("cpu (no-op trainer)", CLIENT_SAMPLES),
        train_slots: None,
        connect_timeout: Duration::from_secs(30),
        keyring: sec.keyring,
        crypto: sec.crypto,
        link_timeout: None,
    };
    Ok(client::run_client(
        opts,
        env.session(&id),
        store,
        std::sync::Arc::new(trainer),
        cancel,
    )
    .await?)
}

/// Medians of the rounds' `secagg_*_s` metrics, the first `dropped` rounds left out.
fn stage_medians(records: &[RoundRecord], dropped: usize) -> BTreeMap<String, f64> {
    let mut by_key: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in records.iter().skip(dropped) {
        for (k, v) in &r.strategy {
            if k.starts_with("secagg_") && k.ends_with("_s") {
                by_key.entry(k.clone()).or_default().push(*v);
            }
        }
    }
    by_key
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            (k, round6(v[v.len() / 2]))
        })
        .collect()
}

impl RoundBenchReport {
    /// The report of a run from the server's side; the memory figures other than the server's
    /// are left for the caller (they depend on the mode).
    pub fn from_server(
        cfg: &RoundBenchConfig,
        mode: Mode,
        server: &ServerRun,
        clients_ok: usize,
        wall_s: f64,
    ) -> Self {
        let stats = round_stats(&server.report.records);
        let model_mib = (cfg.params as f64 * 4.0 / MIB as f64 * 1000.0).round() / 1000.0;
        let outcome = server.report.outcome.summary();
        let mut r = Self {
            clients: cfg.clients,
            params: cfg.params,
            rounds: cfg.rounds,
            rounds_completed: server.report.records.len(),
            mode,
            broker: cfg.broker,
            fetch_concurrency: cfg.fetch_concurrency,
            security: if cfg.secure { "on" } else { "off" },
            strategy: cfg.strategy.clone(),
            secure_aggregation: cfg.secure_aggregation,
            sa_method: cfg.secure_aggregation.then_some(if cfg.light_secagg {
                "lightsecagg"
            } else {
                "secagg_plus"
            }),
            dropout: cfg.dropout,
            secagg_stage_s_median: stage_medians(
                &server.report.records,
                stats.as_ref().map_or(0, |s| s.dropped),
            ),
            round_s_median: stats.as_ref().map(|s| round6(s.median)),
            round_s_p90: stats.as_ref().map(|s| round6(s.p90)),
            round_s_min: stats.as_ref().map(|s| round6(s.min)),
            round_s_max: stats.as_ref().map(|s| round6(s.max)),
            warmup_rounds_dropped: stats.as_ref().map_or(0, |s| s.dropped),
            round_s: server
                .report
                .records
                .iter()
                .map(|r| round6(r.round_s))
                .collect(),
            phase_s_median: phase_medians(&server.phases, stats.as_ref().map_or(0, |s| s.dropped)),
            bytes_per_round: stats.as_ref().map(|s| s.bytes_median),
            model_mib,
            server_peak_rss_mib: None,
            server_rss_above_idle_mib: None,
            server_rss_above_idle_models: None,
            total_rss_mib: None,
            broker_peak_rss_mib: None,
            store_peak_rss_mib: None,
            client_peak_rss_mib_max: None,
            edges: cfg.edges,
            edge_peak_rss_mib_max: None,
            idle_rss_mib: server.idle_rss_kib.map(kib_to_mib),
            cpu_s: CpuSeconds::default(),
            payload_ok: server.payload_ok,
            strategy_metrics: server
                .report
                .records
                .last()
                .map(|r| r.strategy.clone().into_iter().collect())
                .unwrap_or_default(),
            strategy_metrics_max: server.report.records.iter().fold(
                std::collections::BTreeMap::new(),
                |mut max, r| {
                    for (k, &v) in &r.strategy {
                        let m = max.entry(k.clone()).or_insert(v);
                        *m = f64::max(*m, v);
                    }
                    max
                },
            ),
            clients_ok,
            outcome,
            wall_s: round6(wall_s),
            note: None,
        };
        if mode == Mode::Processes {
            r.server_peak_rss_mib = server.peak_rss_kib.map(kib_to_mib);
            if let (Some(peak), Some(idle)) = (server.peak_rss_kib, server.idle_rss_kib) {
                let above = kib_to_mib(peak.saturating_sub(idle));
                r.server_rss_above_idle_mib = Some(above);
                r.server_rss_above_idle_models = Some((above / model_mib * 100.0).round() / 100.0);
            }
        }
        r
    }

    /// Whether the run completed every round with every client and (when checked) the right
    /// final model.
    pub fn succeeded(&self) -> bool {
        self.outcome == "completed"
            && self.rounds_completed as u64 == self.rounds
            && self.payload_ok != Some(false)
    }
}

/// Rounded to 0.01.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// A directory under the system's temporary directory, removed (with its contents) on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `<tmp>/fedmq-<tag>-<random>`.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("fedmq-{tag}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(error = %e, dir = %self.path.display(), "cannot remove a scratch directory");
        }
    }
}

/// The `mosquitto` binary: on `PATH`, or in `/usr/sbin` or `/usr/local/sbin` (where Debian and
/// Homebrew-style installs put it).
pub fn find_mosquitto() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// A Mosquitto child process on `127.0.0.1:<free port>` with fedmq's settings (anonymous on
/// loopback, 256 KiB packets, no persistence, `TCP_NODELAY`). Killed on drop.
#[derive(Debug)]
pub struct MosquittoBroker {
    child: std::process::Child,
    port: u16,
    _dir: ScratchDir,
}

impl MosquittoBroker {
    /// Starts Mosquitto and waits (up to 10 s) until its port accepts connections.
    ///
    /// # Errors
    /// The binary is missing (with the install command), or it does not start.
    pub fn start() -> Result<Self> {
        Self::start_tls(None)
    }

    /// As [`start`](Self::start); with `certs` (a `fedmq certs` directory), over mutual TLS:
    /// client certificates from its CA required, the certificate's name as MQTT user.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn start_tls(certs: Option<&Path>) -> Result<Self> {
        let Some(bin) = find_mosquitto() else {
            bail!(
                "--broker mosquitto: the mosquitto binary is not on PATH nor in /usr/sbin or \
                 /usr/local/sbin (install it, e.g. `apt-get install mosquitto`, or use \
                 --broker embedded)"
            );
        };
        let dir = ScratchDir::new("mosquitto")?;
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                     max_packet_size {}\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\n{}",
                    crate::transport::DEFAULT_MAX_PACKET_SIZE,
                    certs.map_or(String::new(), |c| format!(
                        // `user root`: started as root, Mosquitto would switch to the
                        // `mosquitto` user, who cannot read the 0600 key; otherwise no effect.
                        "user root\ncertfile {0}/broker.pem\nkeyfile {0}/broker.key\n\
                         cafile {0}/ca.pem\n\
                         tls_version tlsv1.2\nrequire_certificate true\n\
                         use_identity_as_username true\n",
                        c.display()
                    ))
                ),
            )
            .context("writing mosquitto.conf")?;
            let mut child = std::process::Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!("mosquitto exited at start ({status})");
                    break;
                }
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(Self {
                        child,
                        port,
                        _dir: dir,
                    });
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("mosquitto did not accept connections on port {port} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        bail!("{last_err}")
    }

    /// The listener's port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for MosquittoBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
///
/// # Errors
/// Binding fails.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free port")?;
    Ok(l.local_addr().context("finding a free port")?.port())
}

/// Runs one configuration with every participant in this process: the broker (embedded, or a
/// Mosquitto child), the embedded store over a scratch directory, `clients` clients (each with
/// its own MQTT session and S3 client) and the server.
///
/// `total_rss_mib` is this process's peak resident set (plus Mosquitto's, when it is the broker).
/// Call it in a fresh process for a per-configuration figure: the peak never decreases.
///
/// # Errors
/// Start-up failures (broker, store, server). A run that aborts still gives a report, whose
/// `outcome` says why.
///
/// # Panics
/// Outside a multi-threaded tokio runtime.
pub async fn bench_round_in_process(cfg: &RoundBenchConfig) -> Result<RoundBenchReport> {
    if cfg.clients == 0 || cfg.rounds == 0 || cfg.params == 0 {
        bail!("clients, params and rounds must each be at least 1");
    }
    let started = Instant::now();
    let dir = ScratchDir::new("bench-round")?;
    let security = if cfg.secure {
        let certs = dir.path().join("certs");
        Some(Arc::new(tokio::task::block_in_place(|| {
            BenchSecurity::create(&certs, cfg.clients)
        })?))
    } else {
        None
    };
    let certs = security.as_ref().map(|s| s.certs.clone());
    let (port, mosquitto) = match cfg.broker {
        BrokerKind::Embedded => {
            // Secure: TLS with client certificates and the shipped ACL, through the gateway.
            let acl = match &certs {
                Some(c) => {
                    let path = c.join("fedmq.acl");
                    std::fs::write(&path, include_str!("../../broker/fedmq.acl"))
                        .context("writing the benchmark's ACL")?;
                    Some(path)
                }
                None => None,
            };
            let opts = BrokerOptions {
                tls: certs.as_ref().map(|c| BrokerTls {
                    cert: c.join("broker.pem"),
                    key: c.join("broker.key"),
                }),
                client_ca: certs.as_ref().map(|c| c.join("ca.pem")),
                acl_file: acl,
                ..BrokerOptions::default()
            };
            let b = tokio::task::block_in_place(|| EmbeddedBroker::start(opts))
                .context("starting the embedded MQTT broker")?;
            (b.addr().port(), None)
        }
        BrokerKind::Mosquitto => {
            let m = tokio::task::block_in_place(|| MosquittoBroker::start_tls(certs.as_deref()))?;
            (m.port(), Some(m))
        }
    };
    let secret = random_secret();
    let store = EmbeddedStore::start_with_tls(
        StoreOptions::new(dir.path().join("store"), ACCESS_KEY, secret.as_str()),
        certs.as_ref().map(|c| StoreTls {
            cert: c.join("store.pem"),
            key: c.join("store.key"),
        }),
    )
    .await
    .context("starting the embedded store")?;
    let mut s3 = BenchEnv::s3_options(&store.endpoint(), &secret);
    s3.ca_path = certs.as_ref().map(|c| c.join("ca.pem"));
    let env = BenchEnv {
        mqtt_host: "127.0.0.1".into(),
        mqtt_port: port,
        s3,
        run: random_run_id(),
        security,
    };

    let mut clients = LocalClients::new(CancellationToken::new());
    for rank in 1..=cfg.clients {
        let (env, cancel, trainer) = (env.clone(), clients.cancel_token(), cfg.trainer_of(rank));
        clients.spawn(async move { run_bench_client(rank, &env, trainer, cancel).await });
    }

    let server = run_bench_server(cfg, &env, CancellationToken::new()).await;

    let joined = clients.join(CLIENT_GRACE).await;
    let clients_ok = joined
        .iter()
        .filter(|r| matches!(r, Ok(c) if c.rounds_reported == cfg.rounds))
        .count();
    for (i, r) in joined.iter().enumerate() {
        if let Err(e) = r {
            tracing::warn!(rank = i + 1, "client failed: {e}");
        }
    }
    let server = server?;
    let self_peak = proc_status_kib(None, "VmHWM");
    let self_cpu = proc_cpu_s(None);
    let broker_cpu = mosquitto.as_ref().and_then(|m| proc_cpu_s(Some(m.pid())));
    let broker_peak = mosquitto
        .as_ref()
        .and_then(|m| proc_status_kib(Some(m.pid()), "VmHWM"));
    store.shutdown().await;
    drop(mosquitto);
    let wall_s = started.elapsed().as_secs_f64();

    let mut report =
        RoundBenchReport::from_server(cfg, Mode::InProcess, &server, clients_ok, wall_s);
    report.total_rss_mib = self_peak.map(|s| kib_to_mib(s + broker_peak.unwrap_or(0)));
    report.broker_peak_rss_mib = broker_peak.map(kib_to_mib);
    report.cpu_s = CpuSeconds {
        total: self_cpu.map(|c| round2(c + broker_cpu.unwrap_or(0.0))),
        server: self_cpu,
        broker: broker_cpu,
        store: None,
        clients: None,
        edges: None,
    };
    report.note = Some(format!(
        "in-process: the server shares its process with {} clients{}, so \
         server_peak_rss_mib is not measured; total_rss_mib is this process's peak resident set{}; \
         idle_rss_mib is it with the broker and the store up and the clients started, before the \
         model was built",
        cfg.clients,
        if mosquitto_used(cfg) {
            " and the store (the broker, Mosquitto, is a child process)"
        } else {
            ", the store and the broker"
        },
        if mosquitto_used(cfg) {
            " plus Mosquitto's"
        } else {
            ""
        },
    ));
    Ok(report)
}

fn mosquitto_used(cfg: &RoundBenchConfig) -> bool {
    cfg.broker == BrokerKind::Mosquitto
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_parse_plain_and_suffixed() {
        assert_eq!(parse_params("1000000"), Ok(1_000_000));
        assert_eq!(parse_params("1_000_000"), Ok(1_000_000));
        assert_eq!(parse_params("1M"), Ok(1_000_000));
        assert_eq!(parse_params("10M"), Ok(10_000_000));
        assert_eq!(parse_params("10m"), Ok(10_000_000));
        assert_eq!(parse_params("100k"), Ok(100_000));
        assert_eq!(parse_params("100K"), Ok(100_000));
        assert_eq!(parse_params("2.5M"), Ok(2_500_000));
        assert_eq!(parse_params("1G"), Ok(1_000_000_000));
        assert_eq!(parse_params(" 7 "), Ok(7));
    }

    #[test]
    fn params_reject_garbage() {
        for bad in [
            "",
            "M",
            "0",
            "0k",
            "-1",
            "1.5",
            "1e6",
            "abc",
            "1MB",
            "1.2.3M",
            "0.0000001k",
        ] {
            assert!(parse_params(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_params("99999999999999999999").is_err());
    }

    #[test]
    fn synthetic_model_has_exactly_the_asked_size() {
        for p in [
            1usize, 2, 3, 4, 5, 999, 1000, 1001, 123_457, 1_000_000, 10_000_000,
        ] {
            let m = synthetic_model(p);
            assert_eq!(m.num_params(), p, "params {p}");
            assert_eq!(m.byte_len(), 4 * p);
            let layout = synthetic_layout(p);
            assert_eq!(
                layout
                    .iter()
                    .map(|(_, s)| s.iter().product::<usize>())
                    .sum::<usize>(),
                p
            );
        }
        let m = synthetic_model(1_000_000);
        assert_eq!(m.len(), 4);
        assert!(m.get("fc1.weight").unwrap().len() > 600_000);
    }

    #[test]
    fn synthetic_model_is_deterministic_and_small_valued() {
        let a = synthetic_model(10_000);
        assert_eq!(a, synthetic_model(10_000));
        assert!(a
            .iter()
            .flat_map(|t| t.data())
            .all(|x| x.is_finite() && x.abs() <= 0.05));
        // Not constant.
        let first = a.tensors()[0].data()[0];
        assert!(a.iter().flat_map(|t| t.data()).any(|&x| x != first));
    }

    #[test]
    fn payload_check_accepts_the_expected_model_only() {
        let mut m = synthetic_model(5_000);
        assert!(check_payload(&m, 0, 0.5));
        for _ in 0..3 {
            for t in m.tensors_mut() {
                for x in t.data_mut() {
                    *x += 0.001;
                }
            }
        }
        assert!(check_payload(&m, 3, 0.001));
        assert!(!check_payload(&m, 2, 0.001));
        m.tensors_mut().next().unwrap().data_mut()[0] += 1.0;
        assert!(!check_payload(&m, 3, 0.001));
    }

    fn record(round: u64, round_s: f64, bytes: u64) -> RoundRecord {
        RoundRecord {
            round,
            test_accuracy: None,
            test_loss: None,
            train_loss: None,
            round_s,
            eval_s: None,
            elapsed_s: 0.0,
            bytes,
            participants: 1,
            failures: 0,
            failed_clients: Vec::new(),
            num_samples: 1,
            retries: 0,
            strategy: Default::default(),
        }
    }

    #[test]
    fn stats_drop_the_warm_up_round_from_three_rounds() {
        let two = [record(1, 5.0, 10), record(2, 1.0, 10)];
        let s = round_stats(&two).unwrap();
        assert_eq!((s.dropped, s.min, s.max, s.median), (0, 1.0, 5.0, 3.0));
        let five: Vec<_> = [9.0, 0.4, 0.1, 0.3, 0.2]
            .iter()
            .enumerate()
            .map(|(i, &t)| record(i as u64 + 1, t, 100 + i as u64))
            .collect();
        let s = round_stats(&five).unwrap();
        assert_eq!(s.dropped, 1);
        assert_eq!(s.min, 0.1);
        assert_eq!(s.max, 0.4);
        assert!((s.median - 0.25).abs() < 1e-12);
        assert_eq!(s.p90, 0.4);
        assert_eq!(s.bytes_median, 102);
        assert!(round_stats(&[]).is_none());
    }

    #[test]
    fn phases_come_from_progress_marks() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let marks = [
            (at(100), ProgressMark::Started(1)),
            (at(200), ProgressMark::Folded(1)),
            (at(300), ProgressMark::Folded(1)),
            (at(350), ProgressMark::Closed(1, 0.35)),
            (at(400), ProgressMark::Started(2)),
            (at(450), ProgressMark::Folded(1)), // stale: ignored
            (at(500), ProgressMark::Folded(2)),
            (at(500), ProgressMark::Closed(2, 0.15)),
        ];
        let p = phases_from_progress(&marks);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (
                p[0].round,
                p[0].upload,
                p[0].first_update,
                p[0].last_update,
                p[0].close
            ),
            (1, 0.1, 0.1, 0.2, 0.05)
        );
        assert_eq!(
            (p[1].upload, p[1].first_update, p[1].last_update, p[1].close),
            (0.05, 0.1, 0.1, 0.0)
        );
        let m = phase_medians(&p, 1).unwrap();
        assert_eq!(m.upload, 0.05);
        assert!(phase_medians(&p, 2).is_none());
    }

    #[test]
    fn proc_status_reads_this_process() {
        if cfg!(target_os = "linux") {
            let rss = proc_status_kib(None, "VmRSS").unwrap();
            let hwm = proc_status_kib(None, "VmHWM").unwrap();
            assert!(rss > 0 && hwm >= rss);
            assert!(proc_cpu_s(None).unwrap() >= 0.0);
        }
        assert_eq!(kib_to_mib(1024), 1.0);
        assert_eq!(kib_to_mib(1536), 1.5);
    }

    #[test]
    fn broker_kind_parses() {
        assert_eq!("embedded".parse(), Ok(BrokerKind::Embedded));
        assert_eq!("Mosquitto".parse(), Ok(BrokerKind::Mosquitto));
        assert!("nats".parse::<BrokerKind>().is_err());
    }
}
