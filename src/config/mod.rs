//! `fedml_config.yaml` → typed configuration.
//!
//! The file keeps FedML's sections and keys with FedML's meaning (`common_args`, `data_args`,
//! `model_args`, `train_args`, `validation_args`, `device_args`, `comm_args`, `tracking_args`,
//! `lsa_args`, plus FedML's `environment_args`), so a FedML user's file loads as it is. Unlike FedML,
//! sections are not flattened: an unknown or misplaced key is an error naming the file, the line and
//! the closest valid key (or the section where the key belongs). FedML's own keys that fedmq does
//! not use are left out with one warning each ([`Config::ignored_keys`], `fedml.rs`). Keys that fedmq adds are marked
//! "fedmq addition" below; everything fedmq-specific without a FedML counterpart lives in the
//! `fedmq_args` section.
//!
//! A leading `~` in a path-valued key is the home directory (`paths.rs` lists those keys). How
//! the file will be used matters ([`LoadMode`]): a local run (`fedmq run`, `data`, `train`,
//! `bench`) has its own broker and store, so FedML's broker and store files are not read then,
//! with one warning each; `fedmq server`, `client`, `store` and `config check` read and check them.
//!
//! Secrets can come from the environment instead of the file (see [`Config::apply_env`]); the CLI
//! applies `--rank`, `--run-id` and a few other overrides on top. [`Config::to_yaml_masked`]
//! prints the effective configuration with every secret ([`SECRET_KEYS`]) masked.
//!
//! # Layout
//! - this file: the section structs and their defaults, [`Config::load_for`], [`Config::validate`].
//! - `error.rs`: [`ConfigError`], including the "did you mean" machinery.
//! - `fedml.rs`: the FedML keys fedmq reads and ignores, FedML's asynchronous-training keys it
//!   maps onto its own, and the FedML switches it refuses (or finds misspelled).
//! - `paths.rs`: the path-valued keys and `~` expansion.

mod error;
mod fedml;
mod paths;
mod security;

pub use error::{ConfigError, UnknownKey};
pub use paths::path_keys;
pub use security::{AttackArgs, DefenseArgs, DpArgs, EpsilonStop};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Result of configuration loading and validation.
pub type Result<T> = std::result::Result<T, ConfigError>;

/// The whole configuration file. Every section is optional; missing keys take the defaults below.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Run-wide settings (seed, training type).
    pub common_args: CommonArgs,
    /// FedML's environment section (accepted for compatibility; fedmq needs no bootstrap).
    pub environment_args: EnvironmentArgs,
    /// Which data set, where it is cached and how it is partitioned among clients.
    pub data_args: DataArgs,
    /// Which model to train.
    pub model_args: ModelArgs,
    /// Federation size, rounds and local training hyper-parameters.
    pub train_args: TrainArgs,
    /// How often the server evaluates the global model.
    pub validation_args: ValidationArgs,
    /// CPU or GPU.
    pub device_args: DeviceArgs,
    /// Broker (MQTT) and object store (S3) endpoints and credentials.
    pub comm_args: CommArgs,
    /// Logging and metrics output.
    pub tracking_args: TrackingArgs,
    /// LightSecAgg parameters (FedML's `lsa_args`; used by secure aggregation).
    pub lsa_args: LsaArgs,
    /// Secure aggregation (FedML's `secure_aggregation_args`).
    pub secure_aggregation_args: SecureAggregationArgs,
    /// fedmq additions without a FedML counterpart.
    pub fedmq_args: FedmqArgs,
    /// Attacking clients (FedML's `attack_args`), to measure defenses against.
    pub attack_args: AttackArgs,
    /// Robust aggregation and the backdoor defense (FedML's `defense_args`).
    pub defense_args: DefenseArgs,
    /// Differential privacy (FedML's `dp_args`).
    pub dp_args: DpArgs,
    /// FedML keys the file set that fedmq does not use, one line each (`file:line: key: why`);
    /// the commands print them as warnings.
    #[serde(skip)]
    pub ignored_keys: Vec<String>,
    /// FedML keys read under fedmq's own names (FedML's asynchronous-training keys of
    /// `train_args`), one line each (`file:line: key ...`); printed as warnings.
    #[serde(skip)]
    pub mapped_keys: Vec<String>,
    /// Settings a [`LoadMode::Local`] load left unused (FedML's broker and store files), one line
    /// each naming the key and why; printed as warnings.
    #[serde(skip)]
    pub unused_locally: Vec<String>,
}

/// How a configuration is going to be used, which decides what happens to the settings only a
/// distributed federation needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LoadMode {
    /// `fedmq server`, `client`, `store`, `keys` and `config check`: everything is read and
    /// checked; a broker or store file the config names must exist and hold only valid keys.
    #[default]
    Distributed,
    /// `fedmq run` (the federation in one process, with its embedded broker and store unless
    /// `customized_training_mqtt_config` / `customized_training_s3_config` name others inline),
    /// `data`, `train` and `bench`: FedML's broker and store files (`comm_args.mqtt_config_path`,
    /// `s3_config_path`, which FedML's examples point at FedML's own servers or at files they do not
    /// ship) are not read; each one named gives a line in [`Config::unused_locally`].
    Local,
}

/// `common_args`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CommonArgs {
    /// FedML's training type; fedmq runs `cross_silo` and `cross_device` the same way.
    pub training_type: String,
    /// Seed for partitions, client selection, model initialization and shuffling.
    pub random_seed: u64,
    /// FedML's scenario (`horizontal`).
    pub scenario: String,
    /// FedML's MLOps switch; accepted and ignored.
    pub using_mlops: bool,
    /// FedML's config version label (e.g. `release`); informational.
    pub config_version: String,
    /// Run identifier: scopes MQTT topics and blob keys. CLI `--run-id` overrides.
    pub run_id: String,
}

impl Default for CommonArgs {
    fn default() -> Self {
        Self {
            training_type: "cross_silo".into(),
            random_seed: 0,
            scenario: "horizontal".into(),
            using_mlops: false,
            config_version: "release".into(),
            run_id: "fedmq".into(),
        }
    }
}

/// `environment_args` (FedML compatibility).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EnvironmentArgs {
    /// FedML's bootstrap script path; accepted and ignored.
    pub bootstrap: Option<String>,
}

/// `data_args`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataArgs {
    /// Data set name: `mnist`, `fashion_mnist`, `cifar10`.
    pub dataset: String,
    /// Where fetched data is cached; empty means the per-user cache directory.
    pub data_cache_dir: String,
    /// `homo`, `hetero` (Dirichlet over labels) or `pathological` (2 label shards per client).
    pub partition_method: String,
    /// Dirichlet concentration for `hetero`; smaller is more skewed.
    pub partition_alpha: f64,
    /// fedmq addition: minimum samples per client for `hetero`.
    pub partition_min_samples: usize,
    /// fedmq addition: shards per client for `pathological` (McMahan et al. use 2).
    pub partition_shards_per_client: usize,
    /// fedmq addition: fetch the data set automatically when it is not in the cache.
    pub auto_fetch: bool,
}

impl Default for DataArgs {
    fn default() -> Self {
        Self {
            dataset: "mnist".into(),
            data_cache_dir: String::new(),
            partition_method: "hetero".into(),
            partition_alpha: 0.5,
            partition_min_samples: 10,
            partition_shards_per_client: 2,
            auto_fetch: true,
        }
    }
}

/// `model_args`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelArgs {
    /// `lr` (multinomial logistic regression), `mlp` (FedAvg's 2NN) or `cnn` (FedAvg's CNN).
    pub model: String,
    /// FedML's model cache folder; accepted, unused.
    pub model_file_cache_folder: Option<String>,
    /// FedML's initial global model path; a safetensors file to start from when set.
    pub global_model_file_path: Option<String>,
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self {
            model: "cnn".into(),
            model_file_cache_folder: None,
            global_model_file_path: None,
        }
    }
}

/// `train_args`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainArgs {
    /// The strategy (FedML's names: `FedAvg`, `FedProx`, `FedOpt`; fedmq also accepts
    /// `FedAvgM`, `FedAdam`, `FedYogi`, `FedAdagrad`; see `strategy::from_config`).
    pub federated_optimizer: String,
    /// FedML's explicit client id list (`[]` = ranks 1..=client_num_in_total).
    pub client_id_list: Option<serde_yaml_ng::Value>,
    /// Number of clients in the federation.
    pub client_num_in_total: usize,
    /// Clients selected per round.
    pub client_num_per_round: usize,
    /// Number of federated rounds.
    pub comm_round: usize,
    /// Local epochs per round (and epochs of `fedmq train`).
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// `sgd` or `adam`.
    pub client_optimizer: String,
    /// Local learning rate.
    pub learning_rate: f64,
    /// fedmq addition: SGD momentum.
    pub momentum: f64,
    /// L2 weight decay (PyTorch semantics).
    pub weight_decay: f64,
    /// Server optimizer of `FedOpt` (`sgd`, `adagrad`, `adam`, `yogi`).
    pub server_optimizer: String,
    /// Server learning rate of the FedOpt family; unset: 1 (sgd), 0.1 (adagrad), 0.01
    /// (adam, yogi).
    pub server_lr: Option<f64>,
    /// Server momentum of FedOpt with `sgd` and of `FedAvgM` (unset there: 0.9).
    pub server_momentum: Option<f64>,
    /// FedProx's proximal coefficient `μ` (unset: 0.01).
    pub fedprox_mu: Option<f64>,
    /// Hierarchical FL (`federated_optimizer: HierarchicalFL`): edges (sites), each a server to
    /// its devices and one client to the cloud server (`fedmq edge`).
    pub group_num: usize,
    /// Hierarchical FL: rounds each edge runs with its devices per cloud round.
    pub group_comm_round: usize,
    /// Hierarchical FL: how devices are assigned to edges: `random` (seeded by
    /// `common_args.random_seed`, sizes differing by at most one).
    pub group_method: String,
}

impl Default for TrainArgs {
    fn default() -> Self {
        Self {
            federated_optimizer: "FedAvg".into(),
            client_id_list: None,
            client_num_in_total: 10,
            client_num_per_round: 10,
            comm_round: 10,
            epochs: 1,
            batch_size: 32,
            client_optimizer: "adam".into(),
            learning_rate: 0.001,
            momentum: 0.9,
            weight_decay: 0.0,
            server_optimizer: "sgd".into(),
            server_lr: None,
            server_momentum: None,
            fedprox_mu: None,
            group_num: 0,
            group_comm_round: 1,
            group_method: "random".into(),
        }
    }
}

/// `validation_args`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationArgs {
    /// Evaluate the global model every this many rounds (and after the last).
    pub frequency_of_the_test: usize,
    /// (fedmq) The server evaluates on a fixed random subset of this many test samples (seeded
    /// by `common_args.random_seed`); 0: the whole test set. For large test sets and slow models
    /// (Shakespeare's 863 k sequences through an LSTM).
    pub max_test_samples: usize,
}

impl Default for ValidationArgs {
    fn default() -> Self {
        Self {
            frequency_of_the_test: 1,
            max_test_samples: 0,
        }
    }
}

/// `device_args`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceArgs {
    /// FedML's worker count; accepted, informational.
    pub worker_num: Option<usize>,
    /// Train on CUDA when this build has the `cuda` feature.
    pub using_gpu: bool,
    /// fedmq addition: CUDA device ordinal.
    pub gpu_id: usize,
    /// FedML's GPU mapping file; accepted, unused.
    pub gpu_mapping_file: Option<String>,
    /// FedML's GPU mapping key; accepted, unused.
    pub gpu_mapping_key: Option<String>,
}

/// `comm_args`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CommArgs {
    /// Transport backend: `MQTT_S3` (control over MQTT, blobs over S3).
    pub backend: String,
    /// FedML's separate broker file (`BROKER_HOST`, `BROKER_PORT`, `MQTT_USER`, ...): read into
    /// `customized_training_mqtt_config` by [`Config::load`]; inline keys win.
    pub mqtt_config_path: Option<String>,
    /// FedML's separate store file (`BUCKET_NAME`, `CN_S3_AKI`, ...): read into
    /// `customized_training_s3_config` by [`Config::load`]; inline keys win.
    pub s3_config_path: Option<String>,
    /// Broker address and credentials.
    pub customized_training_mqtt_config: MqttConfig,
    /// Object store address, bucket and credentials.
    pub customized_training_s3_config: S3Config,
}

impl Default for CommArgs {
    fn default() -> Self {
        Self {
            backend: "MQTT_S3".into(),
            mqtt_config_path: None,
            s3_config_path: None,
            customized_training_mqtt_config: MqttConfig::default(),
            customized_training_s3_config: S3Config::default(),
        }
    }
}

/// `comm_args.customized_training_mqtt_config` (FedML's upper-case keys).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host name or IP.
    #[serde(rename = "BROKER_HOST")]
    pub broker_host: String,
    /// Broker port; 0 with `fedmq run` means "embedded broker on a free port".
    #[serde(rename = "BROKER_PORT")]
    pub broker_port: u16,
    /// MQTT user name (env `FEDMQ_MQTT_USER` overrides); `{id}` stands for the participant id.
    #[serde(rename = "MQTT_USER")]
    pub mqtt_user: String,
    /// MQTT password (env `FEDMQ_MQTT_PWD` overrides; prefer the environment for secrets).
    #[serde(rename = "MQTT_PWD")]
    pub mqtt_pwd: String,
    /// MQTT keep-alive in seconds.
    #[serde(rename = "MQTT_KEEPALIVE")]
    pub mqtt_keepalive: u64,
    /// fedmq addition: connect to the broker over TLS (default false). Needs `MQTT_CA_PATH`.
    #[serde(rename = "MQTT_TLS")]
    pub mqtt_tls: bool,
    /// fedmq addition: PEM file of the CA that signed the broker's certificate (only this CA is
    /// trusted; `fedmq certs` writes `ca.pem`). The certificate must be valid for `BROKER_HOST`.
    #[serde(rename = "MQTT_CA_PATH")]
    pub mqtt_ca_path: String,
    /// fedmq addition: client certificate (PEM) for mutual TLS, with `MQTT_KEY_PATH`; empty: none.
    /// `{id}` in either path stands for the participant id.
    #[serde(rename = "MQTT_CERT_PATH")]
    pub mqtt_cert_path: String,
    /// fedmq addition: private key (PEM) of `MQTT_CERT_PATH`.
    #[serde(rename = "MQTT_KEY_PATH")]
    pub mqtt_key_path: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            broker_host: "127.0.0.1".into(),
            broker_port: 0,
            mqtt_user: String::new(),
            mqtt_pwd: String::new(),
            mqtt_keepalive: 180,
            mqtt_tls: false,
            mqtt_ca_path: String::new(),
            mqtt_cert_path: String::new(),
            mqtt_key_path: String::new(),
        }
    }
}

/// `comm_args.customized_training_s3_config` (FedML's upper-case keys).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Bucket for model blobs (created when missing).
    #[serde(rename = "BUCKET_NAME")]
    pub bucket_name: String,
    /// Access key id (env `FEDMQ_S3_AKI` overrides).
    #[serde(rename = "CN_S3_AKI")]
    pub cn_s3_aki: String,
    /// Secret access key (env `FEDMQ_S3_SAK` overrides; prefer the environment for secrets).
    #[serde(rename = "CN_S3_SAK")]
    pub cn_s3_sak: String,
    /// Region used in SigV4 signatures.
    #[serde(rename = "CN_REGION_NAME")]
    pub cn_region_name: String,
    /// S3 endpoint URL (e.g. `http://127.0.0.1:9000` for MinIO); empty with `fedmq run` means
    /// "embedded store on a free port".
    #[serde(rename = "CN_S3_ENDPOINT")]
    pub cn_s3_endpoint: String,
    /// fedmq addition: PEM bundle of the CA(s) to trust for an `https://` `CN_S3_ENDPOINT`
    /// instead of the system's; empty: the system's trust store.
    #[serde(rename = "CN_S3_CA_PATH")]
    pub cn_s3_ca_path: String,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket_name: "fedmq".into(),
            cn_s3_aki: "fedmq".into(),
            cn_s3_sak: String::new(),
            cn_region_name: "us-east-1".into(),
            cn_s3_endpoint: String::new(),
            cn_s3_ca_path: String::new(),
        }
    }
}

/// `tracking_args`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingArgs {
    /// Where logs and per-round metrics are written.
    pub log_file_dir: String,
    /// FedML's Weights & Biases switch; accepted, unused (fedmq writes JSONL/CSV).
    pub enable_wandb: bool,
    /// FedML's W&B key; accepted, unused.
    pub wandb_key: Option<String>,
    /// FedML's W&B entity; accepted, unused.
    pub wandb_entity: Option<String>,
    /// FedML's W&B project; accepted, unused.
    pub wandb_project: Option<String>,
    /// FedML's run name; used as a label in metrics.
    pub run_name: Option<String>,
}

impl Default for TrackingArgs {
    fn default() -> Self {
        Self {
            log_file_dir: "out".into(),
            enable_wandb: false,
            wandb_key: None,
            wandb_entity: None,
            wandb_project: None,
            run_name: None,
        }
    }
}

/// `lsa_args` (FedML's LightSecAgg parameters).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LsaArgs {
    /// FedML's field prime. fedmq's LightSecAgg computes in `GF(2^32 − 5)` and ignores it.
    pub prime_number: u64,
    /// FedML's fixed-point bits. fedmq derives its precision from `fedmq_args.secagg_clip` and
    /// the number of clients and ignores it.
    pub precision_parameter: u32,
    /// Colluding clients that learn nothing of one client's mask (`T`); default `⌊N/2⌋`.
    pub privacy_guarantee: Option<usize>,
    /// Clients that must survive a round (`U > T`); default `N − ⌊3N/10⌋` (30% may drop).
    pub targeted_number_active_clients: Option<usize>,
}

impl Default for LsaArgs {
    fn default() -> Self {
        Self {
            prime_number: (1 << 15) - 19,
            precision_parameter: 10,
            privacy_guarantee: None,
            targeted_number_active_clients: None,
        }
    }
}

/// `secure_aggregation_args` (FedML's keys): the server learns only the weighted mean of each
/// round's updates. fedmq's own settings are `fedmq_args.secagg_*`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecureAggregationArgs {
    /// Turns secure aggregation on (also on with `federated_optimizer: SA` or `LSA`).
    pub enable_sa: bool,
    /// `secagg` (every client neighbours every other), `secagg_plus` (a sparse random graph
    /// above 32 clients), or `lightsecagg` (LightSecAgg, with `lsa_args`).
    pub sa_method: String,
    /// FedML's field prime. fedmq masks in `Z_2^32` (SecAgg+) or `GF(2^32 − 5)` (LightSecAgg)
    /// and ignores it (with a warning).
    pub prime_number: Option<u64>,
    /// FedML's fixed-point bits. fedmq derives its precision from `fedmq_args.secagg_clip` and
    /// the number of clients and ignores it (with a warning).
    pub precision_parameter: Option<u32>,
}

impl Default for SecureAggregationArgs {
    fn default() -> Self {
        Self {
            enable_sa: false,
            sa_method: "secagg_plus".into(),
            prime_number: None,
            precision_parameter: None,
        }
    }
}

/// The secure aggregation methods `secure_aggregation_args.sa_method` takes.
pub const SA_METHODS: &[&str] = &["secagg", "secagg_plus", "secagg++", "lightsecagg"];

/// `fedmq_args`: fedmq additions without a FedML counterpart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FedmqArgs {
    /// This process's rank: 0 = server, 1.. = clients (CLI `--rank` overrides).
    pub rank: usize,
    /// Seconds from a round's train commands to its deadline.
    pub round_timeout_s: f64,
    /// Fraction of a round's selected clients whose updates close it at the deadline (0 < q ≤ 1).
    pub quorum: f64,
    /// Re-sends of a round that missed its quorum before the run is aborted.
    pub max_retries: u32,
    /// Clients that must be online before round 1 (0: `client_num_per_round`).
    pub min_clients: usize,
    /// Seconds the server waits for `min_clients` before giving up (0: forever).
    pub admission_timeout_s: f64,
    /// Rounds whose blobs are kept in the store (older rounds are deleted; 0 keeps all).
    pub keep_rounds: u64,
    /// Clients of `fedmq run` that train at the same time (0: one per 2 cores, at least 1).
    /// Training clients share the CPU; one at a time with all cores is fastest on small machines.
    pub concurrent_training: usize,
    /// Embedding tables of models such as `mf` are aggregated row by row: a row moves by the
    /// mean change of the clients that changed it times their number, at most this many times
    /// (1: the plain mean, slow for rows many clients change; the full sum diverges on them).
    pub row_sparse_step_cap: u32,
    /// This participant's Ed25519 signing key (`<id>.key` from `fedmq keys`); when set, every
    /// message it publishes is signed. Empty: unsigned.
    pub signing_key: String,
    /// Directory of trusted public keys (`<id>.pub`): the server accepts only messages signed by
    /// the clients listed there, a client only commands signed by `server.pub`. Removing a file
    /// revokes that participant. Empty: signatures are not checked.
    pub trusted_keys: String,
    /// Seal every model blob (AES-256-GCM, key wrapped to each reader's identity key; see
    /// docs/SECURITY.md). Unset: on whenever `signing_key` and `trusted_keys` are set (and always
    /// in `fedmq run`, whose participants get keys of their own). `true`: required (an error
    /// without keys). `false`: plaintext blobs, integrity-checked only.
    pub encrypt_blobs: Option<bool>,
    /// This participant's own store credential (`<id>.s3` from `fedmq keys -c <config>`; `{id}`
    /// stands for the participant id): its access key and secret replace `CN_S3_AKI`/`CN_S3_SAK`,
    /// and the store lets it write only its own updates. Empty: the shared credential.
    pub store_credentials: String,
    /// `β1` of the adaptive server optimizers (FedAdagrad, FedAdam, FedYogi).
    pub server_beta1: f64,
    /// `β2` of FedAdam and FedYogi.
    pub server_beta2: f64,
    /// `τ` of the adaptive server optimizers (their adaptivity; Reddi et al. 2021).
    pub server_tau: f64,
    /// FedBuff (`federated_optimizer: FedBuff` or FedML's `Async_FedAvg`): updates per server
    /// step (`K`); unset: half of `client_num_per_round` (at least 1).
    pub buffer_size: Option<usize>,
    /// FedBuff: versions an update may lag behind the newest model and still count.
    pub max_staleness: u64,
    /// How the server weights updates: `samples` (FedAvg: by the claimed sample count, bounded
    /// by the `capabilities.samples` each client announced when it joined) or `uniform` (every
    /// update the same).
    pub weighting: String,
    /// Secure aggregation: each coordinate of a client's weighted update (its update times its
    /// share of the round's weight) is clipped to `[−secagg_clip, secagg_clip]`.
    pub secagg_clip: f64,
    /// Secure aggregation: neighbours per client (0: every other client up to 32 clients, then
    /// the smallest even number ≥ 4·log2 N).
    pub secagg_degree: usize,
    /// Secure aggregation: shares that recover a secret (0: a strict majority of a client and
    /// its neighbours).
    pub secagg_threshold: usize,
    /// Secure aggregation: seconds the keys, shares and unmask stages wait for clients.
    pub secagg_stage_timeout_s: f64,
    /// Secure aggregation: what a round that fails (fewer than the threshold left) does:
    /// `abort` the run, or `skip` the round (model unchanged) and go on.
    pub secagg_on_failure: String,
    /// Where the server and edges answer `GET /healthz`, `/readyz` and `/metrics` (Prometheus),
    /// e.g. `0.0.0.0:9464` (CLI `--health`, env `FEDMQ_HEALTH_LISTEN`). Empty: no endpoint.
    pub health_listen: String,
    /// Hierarchical FL: seconds an edge keeps its site running while its link to the cloud
    /// broker is down; after that it stops and tells its devices.
    pub edge_uplink_timeout_s: f64,
    /// Hierarchical FL: seconds from a site round's train commands to its deadline (0: the
    /// cloud's `round_timeout_s` split over `group_comm_round` site rounds, with a fifth kept
    /// for the edge's upload).
    pub edge_round_timeout_s: f64,
}

impl Default for FedmqArgs {
    fn default() -> Self {
        Self {
            rank: 0,
            round_timeout_s: 600.0,
            quorum: 0.5,
            max_retries: 2,
            min_clients: 0,
            admission_timeout_s: 300.0,
            keep_rounds: 2,
            concurrent_training: 1,
            row_sparse_step_cap: 128,
            signing_key: String::new(),
            trusted_keys: String::new(),
            encrypt_blobs: None,
            store_credentials: String::new(),
            server_beta1: 0.9,
            server_beta2: 0.99,
            server_tau: 1e-3,
            buffer_size: None,
            max_staleness: 10,
            weighting: "samples".into(),
            secagg_clip: 1.0,
            secagg_degree: 0,
            secagg_threshold: 0,
            secagg_stage_timeout_s: 30.0,
            secagg_on_failure: "abort".into(),
            health_listen: String::new(),
            edge_uplink_timeout_s: 300.0,
            edge_round_timeout_s: 0.0,
        }
    }
}

/// `p` as given when it exists (absolute, or relative to the working directory), else beside the
/// config file `config`.
fn resolve_beside(p: &str, config: &Path) -> PathBuf {
    let given = PathBuf::from(p);
    if given.is_absolute() || given.exists() {
        return given;
    }
    match config.parent() {
        Some(dir) if dir.join(&given).exists() => dir.join(given),
        _ => given,
    }
}

/// The section read from `file` (named by config key `key`; its keys are those of `section`) with
/// the keys of `inline` (from the main file) laid over it.
fn merge_file<T: serde::de::DeserializeOwned>(
    key: &'static str,
    section: &'static str,
    file: &Path,
    inline: serde_yaml_ng::Mapping,
    main: &Path,
) -> Result<T> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Referenced {
        key,
        path: file.to_path_buf(),
        source,
    })?;
    let in_file = |e| error::from_yaml_in(e, file, section, Some(key));
    // The file alone first, so that its typos are reported with its own lines.
    if !text.trim().is_empty() {
        serde_yaml_ng::from_str::<T>(&text).map_err(in_file)?;
    }
    let mut merged: serde_yaml_ng::Mapping = if text.trim().is_empty() {
        serde_yaml_ng::Mapping::new()
    } else {
        serde_yaml_ng::from_str(&text).map_err(in_file)?
    };
    for (k, v) in inline {
        merged.insert(k, v);
    }
    // An empty value (`CN_S3_AKI:`, as FedML's files have) leaves the key at its default.
    merged.retain(|_, v| !v.is_null());
    serde_yaml_ng::from_value(serde_yaml_ng::Value::Mapping(merged))
        .map_err(|e| error::from_yaml_in(e, main, section, None))
}

/// Environment variables that override secrets and endpoints (name, what it sets).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    (
        "FEDMQ_MQTT_USER",
        "comm_args.customized_training_mqtt_config.MQTT_USER",
    ),
    (
        "FEDMQ_MQTT_PWD",
        "comm_args.customized_training_mqtt_config.MQTT_PWD",
    ),
    (
        "FEDMQ_S3_AKI",
        "comm_args.customized_training_s3_config.CN_S3_AKI",
    ),
    (
        "FEDMQ_S3_SAK",
        "comm_args.customized_training_s3_config.CN_S3_SAK",
    ),
    (
        "FEDMQ_S3_ENDPOINT",
        "comm_args.customized_training_s3_config.CN_S3_ENDPOINT",
    ),
    ("FEDMQ_RUN_ID", "common_args.run_id"),
    ("FEDMQ_HEALTH_LISTEN", "fedmq_args.health_listen"),
];

impl Config {
    /// Reads, parses and validates a configuration file for a distributed run
    /// ([`LoadMode::Distributed`]: FedML's broker and store files are read and must exist).
    ///
    /// # Errors
    /// As [`Config::load_for`].
    pub fn load(path: &Path) -> Result<Config> {
        Self::load_for(path, LoadMode::Distributed)
    }

    /// Reads, parses and validates a configuration file: `~` in path keys is expanded, FedML's
    /// broker and store files are read (or, with [`LoadMode::Local`], left unread with a line in
    /// [`Config::unused_locally`] each), then [`Config::validate`].
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Referenced`] when a
    /// broker or store file it names cannot be read (distributed only), [`ConfigError::UnknownKey`]
    /// for a typo'd or misplaced key (with file, line and suggestion; also in the broker and store
    /// files, and for a misspelled FedML `enable_*` switch), [`ConfigError::Parse`] for other YAML
    /// or type errors, [`ConfigError::Invalid`] when values are inconsistent.
    pub fn load_for(path: &Path, mode: LoadMode) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::from_yaml_str(&text, path)?;
        let home = dirs::home_dir();
        paths::expand_home(&mut cfg, home.as_deref());
        match mode {
            LoadMode::Distributed => cfg.read_comm_files(&text, path)?,
            LoadMode::Local => cfg.skip_comm_files(&text, path),
        }
        // Again: the broker and store files may hold paths too (MQTT_CA_PATH, ...).
        paths::expand_home(&mut cfg, home.as_deref());
        let notes = cfg.secure_aggregation_notes();
        cfg.mapped_keys.extend(notes);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether rounds are securely aggregated: `secure_aggregation_args.enable_sa`, or FedML's
    /// `federated_optimizer: SA` / `LSA`.
    pub fn secure_aggregation(&self) -> bool {
        self.secure_aggregation_args.enable_sa
            || matches!(
                self.train_args
                    .federated_optimizer
                    .to_ascii_lowercase()
                    .as_str(),
                "sa" | "lsa"
            )
    }

    /// Whether secure rounds run LightSecAgg: `sa_method: lightsecagg`, or FedML's
    /// Hierarchical FL: `federated_optimizer: HierarchicalFL` (edges between the devices and the
    /// cloud server; `crate::edge`).
    pub fn hierarchical(&self) -> bool {
        self.train_args
            .federated_optimizer
            .eq_ignore_ascii_case("hierarchicalfl")
    }

    /// `federated_optimizer: LSA`.
    pub fn light_secagg(&self) -> bool {
        self.secure_aggregation()
            && (self
                .secure_aggregation_args
                .sa_method
                .eq_ignore_ascii_case("lightsecagg")
                || self
                    .train_args
                    .federated_optimizer
                    .eq_ignore_ascii_case("lsa"))
    }

    /// What secure aggregation does differently from what FedML's keys ask, one line each.
    fn secure_aggregation_notes(&self) -> Vec<String> {
        let sa = &self.secure_aggregation_args;
        let mut notes = Vec::new();
        if !self.secure_aggregation() {
            return notes;
        }
        let lsa = &self.lsa_args;
        let d = LsaArgs::default();
        let fedml_field = sa.prime_number.is_some()
            || sa.precision_parameter.is_some()
            || lsa.prime_number != d.prime_number
            || lsa.precision_parameter != d.precision_parameter;
        if fedml_field {
            notes.push(
                "prime_number / precision_parameter: not used; fedmq quantizes updates clipped to \
                 [-secagg_clip, secagg_clip] with as many bits as the sum of N clients allows, in \
                 Z_2^32 (SecAgg+) or GF(2^32 - 5) (LightSecAgg) (fedmq_args.secagg_clip; \
                 docs/PROTOCOL.md, \"Quantization\")"
                    .to_string(),
            );
        }
        if !self.light_secagg()
            && (lsa.privacy_guarantee.is_some() || lsa.targeted_number_active_clients.is_some())
        {
            notes.push(
                "lsa_args.privacy_guarantee / targeted_number_active_clients: not used; they are \
                 LightSecAgg's (secure_aggregation_args.sa_method: lightsecagg)"
                    .to_string(),
            );
        }
        notes
    }

    /// Every warning of the load, one line each: FedML keys ignored, FedML keys read under
    /// fedmq's names, settings a local run does not use.
    pub fn warnings(&self) -> impl Iterator<Item = &str> {
        self.ignored_keys
            .iter()
            .chain(&self.mapped_keys)
            .chain(&self.unused_locally)
            .map(String::as_str)
    }

    /// For a local run: notes each broker or store file the config names as not read.
    fn skip_comm_files(&mut self, text: &str, path: &Path) {
        let what = [
            (
                "mqtt_config_path",
                self.comm_args.mqtt_config_path.take(),
                "broker",
                "customized_training_mqtt_config",
            ),
            (
                "s3_config_path",
                self.comm_args.s3_config_path.take(),
                "store",
                "customized_training_s3_config",
            ),
        ];
        for (key, value, role, inline) in what {
            let Some(p) = value.filter(|p| !p.trim().is_empty()) else {
                continue;
            };
            let line = fedml::key_line(text, "comm_args", key)
                .map_or(String::new(), |(l, _)| format!(":{l}"));
            let file = resolve_beside(p.trim(), path);
            let missing = if file.exists() { "" } else { " (not found)" };
            self.unused_locally.push(format!(
                "{}{line}: comm_args.{key} is ignored for a local run: FedML's {role} file \
                 {p}{missing} is not read; fedmq run uses its embedded {role} (or one named \
                 inline in comm_args.{inline}), and data, train and bench use none; fedmq server \
                 and fedmq client read the file",
                path.display()
            ));
        }
    }

    /// Reads FedML's separate broker and store files (`comm_args.mqtt_config_path`,
    /// `s3_config_path`, e.g. `config/mqtt_config.yaml` with `BROKER_HOST`, `BROKER_PORT`, ...):
    /// their keys fill `customized_training_mqtt_config` / `customized_training_s3_config`;
    /// a key set inline in the main file wins over the same key in the separate file (and the
    /// environment overrides both, see [`ENV_OVERRIDES`]). A relative path is looked up in the
    /// working directory first (as FedML does), then beside the config file.
    ///
    /// # Errors
    /// [`ConfigError::Referenced`] when a named file cannot be read; an unknown key or bad value
    /// in it is reported with that file's line (and, for a key, the valid keys).
    fn read_comm_files(&mut self, text: &str, path: &Path) -> Result<()> {
        let main: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).unwrap_or_default();
        let inline = |section: &str| {
            main.get("comm_args")
                .and_then(|c| c.get(section))
                .and_then(|v| v.as_mapping())
                .cloned()
                .unwrap_or_default()
        };
        let named = |p: &Option<String>| {
            p.as_deref()
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string)
        };
        if let Some(p) = named(&self.comm_args.mqtt_config_path) {
            self.comm_args.customized_training_mqtt_config = merge_file(
                "comm_args.mqtt_config_path",
                "comm_args.customized_training_mqtt_config",
                &resolve_beside(&p, path),
                inline("customized_training_mqtt_config"),
                path,
            )?;
        }
        if let Some(p) = named(&self.comm_args.s3_config_path) {
            self.comm_args.customized_training_s3_config = merge_file(
                "comm_args.s3_config_path",
                "comm_args.customized_training_s3_config",
                &resolve_beside(&p, path),
                inline("customized_training_s3_config"),
                path,
            )?;
        }
        Ok(())
    }

    /// Parses YAML text (no validation, no environment); `path` is used in error messages only.
    ///
    /// # Errors
    /// As [`Config::load`], without `Read` and `Invalid`.
    pub fn from_yaml_str(text: &str, path: &Path) -> Result<Config> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        // FedML's own keys that fedmq does not use are left out one by one (their lines
        // blanked, so later errors keep their line numbers) and reported; anything else unknown
        // is an error.
        // FedML's asynchronous-training keys of train_args are left out the same way, then read
        // under fedmq's names (`fedml::map_async`).
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let mut ignored = Vec::new();
        let mut async_lines: Vec<(String, usize)> = Vec::new();
        let mut current = text.to_string();
        loop {
            match serde_yaml_ng::from_str::<Config>(&current) {
                Ok(mut cfg) => {
                    let doc: serde_yaml_ng::Value =
                        serde_yaml_ng::from_str(text).unwrap_or_default();
                    if let Some(u) = fedml::misspelled_switch(&doc, text, path) {
                        return Err(ConfigError::UnknownKey(Box::new(u)));
                    }
                    let mut problems = fedml::unsupported(&doc);
                    let at = |k: &str| {
                        let line = async_lines.iter().find(|(a, _)| a == k).map(|(_, l)| *l);
                        format!("{}:{}", path.display(), line.unwrap_or(0))
                    };
                    let (mapped, more) = fedml::map_async(&doc, &mut cfg, &at);
                    problems.extend(more);
                    if !problems.is_empty() {
                        return Err(ConfigError::Invalid { problems });
                    }
                    cfg.ignored_keys = ignored;
                    cfg.mapped_keys = mapped;
                    return Ok(cfg);
                }
                Err(e) => match error::from_yaml(e, path) {
                    ConfigError::UnknownKey(u) => {
                        let fedml_async =
                            u.section == "train_args" && fedml::ASYNC_KEYS.contains(&&*u.key);
                        let why = fedml::why_ignored(&u.section, &u.key);
                        if (why.is_none() && !fedml_async)
                            || u.line == 0
                            || u.line > lines.len()
                            || lines[u.line - 1].is_empty()
                        {
                            return Err(ConfigError::UnknownKey(u));
                        }
                        if let Some(why) = why {
                            let dotted = if u.section.is_empty() {
                                u.key.clone()
                            } else {
                                format!("{}.{}", u.section, u.key)
                            };
                            ignored.push(format!(
                                "{}:{}: {dotted} is a FedML key fedmq ignores: {why}",
                                path.display(),
                                u.line
                            ));
                        } else {
                            async_lines.push((u.key.clone(), u.line));
                        }
                        fedml::blank_key(&mut lines, u.line);
                        current = lines.join("\n");
                    }
                    other => return Err(other),
                },
            }
        }
    }

    /// Applies the environment overrides listed in [`ENV_OVERRIDES`] (non-empty values only).
    pub fn apply_env(&mut self) {
        self.apply_env_from(|k| std::env::var(k).ok());
    }

    /// As [`Config::apply_env`], reading variables through `get` (testable without touching the
    /// process environment).
    pub fn apply_env_from(&mut self, get: impl Fn(&str) -> Option<String>) {
        let mqtt = &mut self.comm_args.customized_training_mqtt_config;
        let s3 = &mut self.comm_args.customized_training_s3_config;
        let slots: [(&str, &mut String); 7] = [
            ("FEDMQ_MQTT_USER", &mut mqtt.mqtt_user),
            ("FEDMQ_MQTT_PWD", &mut mqtt.mqtt_pwd),
            ("FEDMQ_S3_AKI", &mut s3.cn_s3_aki),
            ("FEDMQ_S3_SAK", &mut s3.cn_s3_sak),
            ("FEDMQ_S3_ENDPOINT", &mut s3.cn_s3_endpoint),
            ("FEDMQ_RUN_ID", &mut self.common_args.run_id),
            ("FEDMQ_HEALTH_LISTEN", &mut self.fedmq_args.health_listen),
        ];
        for (name, slot) in slots {
            if let Some(v) = get(name).filter(|v| !v.is_empty()) {
                *slot = v;
            }
        }
    }

    /// Checks values that parse but make no sense together; every problem is reported at once.
    /// `model_args.model` must name a built-in model.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing each problem with its key.
    pub fn validate(&self) -> Result<()> {
        self.validate_with(&crate::train::Registry::default())
    }

    /// [`Config::validate`], with `model_args.model` looked up in `models` (an application's
    /// registry with its own models added).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing each problem with its key.
    pub fn validate_with(&self, models: &crate::train::Registry) -> Result<()> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, key: &str, msg: String| {
            if !ok {
                problems.push(format!("{key}: {msg}"));
            }
        };
        let t = &self.train_args;
        check(
            t.client_num_in_total >= 1,
            "train_args.client_num_in_total",
            "must be at least 1".into(),
        );
        check(
            (1..=t.client_num_in_total.max(1)).contains(&t.client_num_per_round),
            "train_args.client_num_per_round",
            format!(
                "must be between 1 and client_num_in_total ({}), got {}",
                t.client_num_in_total, t.client_num_per_round
            ),
        );
        check(
            t.comm_round >= 1,
            "train_args.comm_round",
            "must be at least 1".into(),
        );
        check(
            t.epochs >= 1,
            "train_args.epochs",
            "must be at least 1".into(),
        );
        check(
            t.batch_size >= 1,
            "train_args.batch_size",
            "must be at least 1".into(),
        );
        check(
            t.learning_rate.is_finite() && t.learning_rate > 0.0,
            "train_args.learning_rate",
            format!("must be a positive number, got {}", t.learning_rate),
        );
        check(
            t.momentum.is_finite() && (0.0..1.0).contains(&t.momentum),
            "train_args.momentum",
            format!("must be in [0, 1), got {}", t.momentum),
        );
        check(
            t.weight_decay.is_finite() && t.weight_decay >= 0.0,
            "train_args.weight_decay",
            format!("must be ≥ 0, got {}", t.weight_decay),
        );
        if let Err(e) = t.client_optimizer.parse::<crate::train::OptimizerKind>() {
            check(false, "train_args.client_optimizer", e.to_string());
        }
        if self.hierarchical() {
            check(
                (1..=t.client_num_in_total).contains(&t.group_num),
                "train_args.group_num",
                format!(
                    "HierarchicalFL needs between 1 and client_num_in_total ({}) edges, got {}",
                    t.client_num_in_total, t.group_num
                ),
            );
            check(
                t.group_comm_round >= 1,
                "train_args.group_comm_round",
                "must be at least 1".into(),
            );
            check(
                t.group_method.eq_ignore_ascii_case("random"),
                "train_args.group_method",
                format!(
                    "{:?} is not supported; use random (devices spread over the edges by \
                     common_args.random_seed)",
                    t.group_method
                ),
            );
            check(
                !self.secure_aggregation() || t.group_comm_round == 1,
                "train_args.group_comm_round",
                "with secure aggregation each edge forwards one masked site round per cloud \
                 round: set group_comm_round: 1"
                    .into(),
            );
        }
        let f = &self.fedmq_args;
        check(
            f.edge_uplink_timeout_s.is_finite() && f.edge_uplink_timeout_s > 0.0,
            "fedmq_args.edge_uplink_timeout_s",
            format!(
                "must be a positive number of seconds, got {}",
                f.edge_uplink_timeout_s
            ),
        );
        check(
            f.edge_round_timeout_s.is_finite() && f.edge_round_timeout_s >= 0.0,
            "fedmq_args.edge_round_timeout_s",
            format!("must be ≥ 0 seconds, got {}", f.edge_round_timeout_s),
        );
        if !f.health_listen.is_empty() {
            check(
                f.health_listen.parse::<std::net::SocketAddr>().is_ok(),
                "fedmq_args.health_listen",
                format!(
                    "{:?} is not an address and port such as 0.0.0.0:9464",
                    f.health_listen
                ),
            );
        }
        match crate::strategy::from_config(t, &self.fedmq_args) {
            Err(e) => check(false, e.key, e.reason),
            Ok(s) if self.secure_aggregation() => {
                if let Err(why) = s.secure_aggregation() {
                    check(false, "secure_aggregation_args.enable_sa", why);
                }
            }
            Ok(_) => {}
        }
        let mut late = Vec::new();
        if let Err(e) = crate::attack::Attack::from_config(self) {
            late.push(e);
        }
        // FLTrust's root data set is built by the server from its data; here, only its size.
        let placeholder: std::sync::Arc<crate::strategy::RootTrainer> =
            std::sync::Arc::new(|g: &crate::tensor::ParamSet| Ok(g.clone()));
        let defense = crate::strategy::defense_from_config(
            &self.defense_args,
            t.client_num_per_round,
            Some(placeholder),
        );
        let dp = crate::strategy::dp_from_config(self);
        match (&defense, &dp) {
            (Err(e), _) | (_, Err(e)) => late.push(e.clone()),
            (Ok(Some(d)), _) if self.secure_aggregation() => late.push(format!(
                "defense_args.enable_defense: the {} defense looks at each client's update, but                  secure aggregation shows the server only their sum; turn one of them off",
                d.name()
            )),
            (Ok(Some(d)), Ok(Some(p))) if p.mode == crate::strategy::DpMode::Central => {
                late.push(format!(
                    "defense_args.enable_defense: the {} defense and dp_args' cdp both replace                      the mean of the updates; use one of them (weak_dp is the defense that adds                      noise), or dp_solution_type ldp",
                    d.name()
                ))
            }
            _ => {}
        }
        if let (Ok(Some(_)), Ok(strategy)) =
            (&defense, crate::strategy::from_config(t, &self.fedmq_args))
        {
            if strategy.secure_aggregation().is_err() || strategy.buffered().is_some() {
                late.push(format!(
                    "defense_args.enable_defense: a defense replaces the mean of the clients'                      models, but {} aggregates more than that; use FedAvg, FedProx or the FedOpt                      family",
                    strategy.name()
                ));
            }
        }
        let sa = &self.secure_aggregation_args;
        check(
            SA_METHODS.contains(&sa.sa_method.to_ascii_lowercase().as_str()),
            "secure_aggregation_args.sa_method",
            format!("{:?} is not one of {}", sa.sa_method, SA_METHODS.join(", ")),
        );
        let f = &self.fedmq_args;
        check(
            f.secagg_clip.is_finite() && f.secagg_clip > 0.0 && f.secagg_clip < 1e30,
            "fedmq_args.secagg_clip",
            format!("must be a positive number, got {}", f.secagg_clip),
        );
        check(
            f.secagg_stage_timeout_s.is_finite() && f.secagg_stage_timeout_s > 0.0,
            "fedmq_args.secagg_stage_timeout_s",
            format!(
                "must be a positive number of seconds, got {}",
                f.secagg_stage_timeout_s
            ),
        );
        if let Err(e) = f.secagg_on_failure.parse::<crate::server::OnFailure>() {
            check(false, "fedmq_args.secagg_on_failure", e);
        }
        let d = &self.data_args;
        if let Err(e) = d.dataset.parse::<crate::data::DatasetKind>() {
            check(false, "data_args.dataset", e.to_string());
        }
        if let Err(e) = d.partition_method.parse::<crate::data::PartitionMethod>() {
            check(false, "data_args.partition_method", e.to_string());
        }
        check(
            d.partition_alpha.is_finite() && d.partition_alpha > 0.0,
            "data_args.partition_alpha",
            format!("must be a positive number, got {}", d.partition_alpha),
        );
        check(
            d.partition_shards_per_client >= 1,
            "data_args.partition_shards_per_client",
            "must be at least 1".into(),
        );
        let f = &self.fedmq_args;
        check(
            matches!(f.weighting.as_str(), "samples" | "uniform"),
            "fedmq_args.weighting",
            format!("must be samples or uniform, got {:?}", f.weighting),
        );
        check(
            f.round_timeout_s.is_finite() && f.round_timeout_s > 0.0,
            "fedmq_args.round_timeout_s",
            format!(
                "must be a positive number of seconds, got {}",
                f.round_timeout_s
            ),
        );
        check(
            f.quorum.is_finite() && f.quorum > 0.0 && f.quorum <= 1.0,
            "fedmq_args.quorum",
            format!("must be in (0, 1], got {}", f.quorum),
        );
        check(
            f.min_clients <= t.client_num_in_total,
            "fedmq_args.min_clients",
            format!(
                "must not exceed client_num_in_total ({}), got {}",
                t.client_num_in_total, f.min_clients
            ),
        );
        check(
            f.row_sparse_step_cap >= 1,
            "fedmq_args.row_sparse_step_cap",
            "must be at least 1 (1: the plain mean of the clients' changes)".into(),
        );
        check(
            f.admission_timeout_s.is_finite() && f.admission_timeout_s >= 0.0,
            "fedmq_args.admission_timeout_s",
            format!("must be ≥ 0 seconds, got {}", f.admission_timeout_s),
        );
        if let Err(e) = models.get(&self.model_args.model) {
            check(false, "model_args.model", e.to_string());
        }
        check(
            self.validation_args.frequency_of_the_test >= 1,
            "validation_args.frequency_of_the_test",
            "must be at least 1".into(),
        );
        check(
            self.comm_args.backend.eq_ignore_ascii_case("MQTT_S3"),
            "comm_args.backend",
            format!(
                "{:?} is not supported; valid: MQTT_S3",
                self.comm_args.backend
            ),
        );
        check(
            !self.common_args.run_id.is_empty()
                && self
                    .common_args
                    .run_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "common_args.run_id",
            format!(
                "{:?} must be non-empty and use only letters, digits, '-' and '_' (it is part of MQTT topics and S3 keys)",
                self.common_args.run_id
            ),
        );
        self.check_tls(&mut problems);
        problems.extend(late);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    /// The TLS keys of `customized_training_mqtt_config` and `customized_training_s3_config`:
    /// consistent, and their files present and holding what they should.
    fn check_tls(&self, problems: &mut Vec<String>) {
        const MQTT: &str = "comm_args.customized_training_mqtt_config";
        const S3: &str = "comm_args.customized_training_s3_config";
        let m = &self.comm_args.customized_training_mqtt_config;
        let mut file =
            |key: String, path: &str, load: &dyn Fn(&Path) -> crate::crypto::tls::Result<()>| {
                if let Err(e) = load(Path::new(path)) {
                    problems.push(format!("{key}: {e}"));
                }
            };
        let ca = |p: &Path| crate::crypto::tls::load_roots(p).map(drop);
        let cert = |p: &Path| crate::crypto::tls::load_certs(p, "certificate").map(drop);
        let key = |p: &Path| crate::crypto::tls::load_key(p).map(drop);
        let mut local = Vec::new();
        if m.mqtt_tls {
            if m.broker_port == 0 {
                local.push(format!(
                    "{MQTT}.MQTT_TLS: true, but BROKER_PORT 0 starts fedmq run's embedded broker, \
                     which serves plain MQTT on loopback; set BROKER_PORT to a TLS broker's port \
                     (8883 usually) or MQTT_TLS: false"
                ));
            }
            if m.mqtt_ca_path.is_empty() {
                local.push(format!(
                    "{MQTT}.MQTT_CA_PATH: MQTT_TLS is true but no CA is given; set it to the PEM \
                     file of the CA that signed the broker's certificate (fedmq certs writes \
                     ca.pem)"
                ));
            } else {
                file(format!("{MQTT}.MQTT_CA_PATH"), &m.mqtt_ca_path, &ca);
            }
            match (m.mqtt_cert_path.is_empty(), m.mqtt_key_path.is_empty()) {
                // `{id}` stands for the participant id: the files are read when it connects.
                (false, false) if m.mqtt_cert_path.contains("{id}") => {}
                (false, false) => {
                    file(format!("{MQTT}.MQTT_CERT_PATH"), &m.mqtt_cert_path, &cert);
                    file(format!("{MQTT}.MQTT_KEY_PATH"), &m.mqtt_key_path, &key);
                }
                (false, true) => local.push(format!(
                    "{MQTT}.MQTT_KEY_PATH: MQTT_CERT_PATH is set but its private key is not; \
                     mutual TLS needs both"
                )),
                (true, false) => local.push(format!(
                    "{MQTT}.MQTT_CERT_PATH: MQTT_KEY_PATH is set but the certificate is not; \
                     mutual TLS needs both"
                )),
                (true, true) => {}
            }
        } else {
            for (name, v) in [
                ("MQTT_CA_PATH", &m.mqtt_ca_path),
                ("MQTT_CERT_PATH", &m.mqtt_cert_path),
                ("MQTT_KEY_PATH", &m.mqtt_key_path),
            ] {
                if !v.is_empty() {
                    local.push(format!(
                        "{MQTT}.{name}: set, but MQTT_TLS is false, so the connection would be \
                         plain text; set MQTT_TLS: true (or remove {name})"
                    ));
                }
            }
        }
        let s = &self.comm_args.customized_training_s3_config;
        if !s.cn_s3_ca_path.is_empty() {
            if s.cn_s3_endpoint.starts_with("https://") {
                file(format!("{S3}.CN_S3_CA_PATH"), &s.cn_s3_ca_path, &ca);
            } else {
                local.push(format!(
                    "{S3}.CN_S3_CA_PATH: set, but CN_S3_ENDPOINT {:?} is not an https:// URL \
                     (an empty endpoint starts fedmq run's plain-HTTP embedded store)",
                    s.cn_s3_endpoint
                ));
            }
        }
        problems.extend(local);
    }

    /// The data cache directory: `data_args.data_cache_dir`, or the per-user default when empty.
    pub fn data_cache_dir(&self) -> PathBuf {
        if self.data_args.data_cache_dir.is_empty() {
            crate::data::default_cache_dir()
        } else {
            PathBuf::from(&self.data_args.data_cache_dir)
        }
    }

    /// The effective configuration as YAML, with every secret of [`SECRET_KEYS`] that is set
    /// replaced by `********` (whether it came from the file, FedML's broker or store file, or the
    /// environment).
    pub fn to_yaml_masked(&self) -> String {
        let mut c = self.clone();
        for (_, secret) in secrets(&mut c) {
            if !secret.is_empty() {
                *secret = MASK.into();
            }
        }
        serde_yaml_ng::to_string(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// What [`Config::to_yaml_masked`] prints instead of a secret.
pub const MASK: &str = "********";

/// The keys that hold secrets (passwords, secret keys, API keys), masked by
/// [`Config::to_yaml_masked`]. Access key ids and user names are not secret.
pub const SECRET_KEYS: &[&str] = &[
    "comm_args.customized_training_mqtt_config.MQTT_PWD",
    "comm_args.customized_training_s3_config.CN_S3_SAK",
    "tracking_args.wandb_key",
];

/// The fields of [`SECRET_KEYS`] that are present, with their keys.
fn secrets(c: &mut Config) -> Vec<(&'static str, &mut String)> {
    let mut v = vec![
        (
            SECRET_KEYS[0],
            &mut c.comm_args.customized_training_mqtt_config.mqtt_pwd,
        ),
        (
            SECRET_KEYS[1],
            &mut c.comm_args.customized_training_s3_config.cn_s3_sak,
        ),
    ];
    if let Some(k) = c.tracking_args.wandb_key.as_mut() {
        v.push((SECRET_KEYS[2], k));
    }
    v
}

#[cfg(test)]
mod tests;
