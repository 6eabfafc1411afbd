//! Putting a federation together from a config: the server and client roles as `fedmq server` /
//! `fedmq client` run them, and the one-process local federation of `fedmq run` (embedded broker,
//! embedded store, server and every client, each client with its own MQTT connection and S3
//! client, so the same code path runs as in a distributed deployment).

use crate::client::{self, ClientOptions, ClientReport, DataTrainer, LocalTrainer};
use crate::config::Config;
use crate::crypto::identity::{Identity, Keyring};
use crate::crypto::seal::BlobCrypto;
use crate::data::{
    self, DataSpec, DataSplit, Dataset, DatasetKind, FetchOptions, Partition, PartitionMethod,
};
use crate::proto::{BlobKeys, Capabilities, TrainConfig};
use crate::server::{
    self, Checkpoint, Evaluation, Evaluator, OnFailure, Progress, RoundConfig, SecureConfig,
    ServerOptions, ServerReport,
};
use crate::store::access::StoreCredential;
use crate::store::{
    BlobStore, EmbeddedStore, RetentionPolicy, S3Options, SealedStore, StoreOptions,
};
use crate::strategy::Strategy;
use crate::tensor::ParamSet;
use crate::train::{self, Model, ModelRef, Registry, Scope};
use crate::transport::{BrokerOptions, EmbeddedBroker, SessionOptions};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Prefix of every blob key.
pub const KEY_PREFIX: &str = "fedmq";

/// The round policy of `cfg`.
pub fn round_config(cfg: &Config) -> RoundConfig {
    let t = &cfg.train_args;
    let f = &cfg.fedmq_args;
    // Hierarchical FL: the cloud server's clients are the edges, every one of them each round.
    let (per_round, min_clients) = if cfg.hierarchical() {
        (t.group_num, t.group_num)
    } else if f.min_clients == 0 {
        (t.client_num_per_round, t.client_num_per_round)
    } else {
        (t.client_num_per_round, f.min_clients)
    };
    RoundConfig {
        rounds: t.comm_round as u64,
        clients_per_round: per_round,
        min_clients,
        admission_timeout: (f.admission_timeout_s > 0.0)
            .then(|| Duration::from_secs_f64(f.admission_timeout_s)),
        round_timeout: Duration::from_secs_f64(f.round_timeout_s),
        quorum: f.quorum,
        max_retries: f.max_retries,
        eval_every: cfg.validation_args.frequency_of_the_test as u64,
        seed: cfg.common_args.random_seed,
        train: TrainConfig {
            model: cfg.model_args.model.clone(),
            epochs: t.epochs as u32,
            batch_size: t.batch_size as u32,
            optimizer: t.client_optimizer.to_ascii_lowercase(),
            learning_rate: t.learning_rate,
            momentum: t.momentum,
            weight_decay: t.weight_decay,
            seed: 0,
        },
        keys: BlobKeys::new(KEY_PREFIX, &cfg.common_args.run_id),
        // Validated by Config::validate; the default otherwise.
        weighting: f.weighting.parse().unwrap_or_default(),
        secure: cfg.secure_aggregation().then(|| SecureConfig {
            clip: f.secagg_clip,
            // FedML's `secagg` is the original protocol: every client neighbours every other.
            degree: if cfg
                .secure_aggregation_args
                .sa_method
                .eq_ignore_ascii_case("secagg")
            {
                usize::MAX
            } else {
                f.secagg_degree
            },
            threshold: f.secagg_threshold,
            stage_timeout: Duration::from_secs_f64(f.secagg_stage_timeout_s),
            on_failure: f.secagg_on_failure.parse().unwrap_or(OnFailure::Abort),
            protocol: if cfg.light_secagg() {
                crate::server::Protocol::LightSecAgg {
                    active: cfg.lsa_args.targeted_number_active_clients.unwrap_or(0),
                    privacy: cfg.lsa_args.privacy_guarantee,
                }
            } else {
                crate::server::Protocol::SecAggPlus
            },
        }),
        paced: false,
    }
}

/// The server options of `cfg`, writing the final model to `output_dir`.
pub fn server_options(cfg: &Config, output_dir: Option<PathBuf>) -> ServerOptions {
    let run = cfg.common_args.run_id.clone();
    ServerOptions {
        keys: BlobKeys::new(KEY_PREFIX, &run),
        round: round_config(cfg),
        expected_clients: if cfg.hierarchical() {
            (1..=cfg.train_args.group_num)
                .map(|k| crate::edge::edge_id(&cfg.common_args.run_id, k))
                .collect()
        } else {
            (1..=cfg.train_args.client_num_in_total)
                .map(client::client_id)
                .collect()
        },
        retention: NonZeroU64::new(cfg.fedmq_args.keep_rounds)
            .map_or(RetentionPolicy::KeepAll, RetentionPolicy::KeepLast),
        fetch_concurrency: 0,
        output_dir,
        connect_timeout: Duration::from_secs(30),
        keyring: None,
        crypto: None,
        health: None,
        run,
    }
}

/// Evaluates global models on a test set (and, when a backdoor attack is measured, on its
/// triggered test set).
pub struct ModelEvaluator {
    model: ModelRef,
    test: Arc<dyn Dataset>,
    /// The test samples evaluated; `None`: all.
    subset: Option<Vec<usize>>,
    device: Device,
    backdoor: Option<Arc<dyn Dataset>>,
}

impl ModelEvaluator {
    /// An evaluator of `model` on `test`.
    pub fn new(model: impl Into<ModelRef>, test: Arc<dyn Dataset>, device: Device) -> Self {
        Self {
            model: model.into(),
            test,
            subset: None,
            device,
            backdoor: None,
        }
    }

    /// Evaluates on a seeded random choice of `n` test samples (all of them when `n` is 0 or
    /// at least the test set's size), the same samples every round.
    pub fn with_max_samples(mut self, n: usize, seed: u64) -> Self {
        let len = self.test.len();
        if n > 0 && n < len {
            let mut rng =
                <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed ^ 0x7e57);
            let mut idx = rand::seq::index::sample(&mut rng, len, n).into_vec();
            idx.sort_unstable();
            self.subset = Some(idx);
        }
        self
    }

    /// Also measures a backdoor's success: accuracy on `triggered` (test inputs of other
    /// classes with the trigger, labelled with the attacker's target), `backdoor_success`.
    pub fn with_backdoor(mut self, triggered: Arc<dyn Dataset>) -> Self {
        self.backdoor = Some(triggered);
        self
    }
}

impl Evaluator for ModelEvaluator {
    fn evaluate(&self, params: &ParamSet) -> std::result::Result<Evaluation, String> {
        let (model, _vars) = Model::load(
            &self.model,
            &DataSpec::of(self.test.as_ref()),
            params,
            &self.device,
        )
        .map_err(|e| e.to_string())?;
        let r = train::evaluate(
            &model,
            self.test.as_ref(),
            self.subset.as_deref(),
            500,
            &self.device,
        )
        .map_err(|e| e.to_string())?;
        let mut extra = std::collections::BTreeMap::new();
        if let Some(triggered) = &self.backdoor {
            let b = train::evaluate(&model, triggered.as_ref(), None, 500, &self.device)
                .map_err(|e| e.to_string())?;
            extra.insert("backdoor_success".to_string(), b.accuracy);
        }
        if r.rmse.is_finite() {
            extra.insert("test_rmse".to_string(), r.rmse);
            extra.insert("test_mae".to_string(), r.mae);
        }
        Ok(Evaluation {
            accuracy: r.accuracy,
            loss: r.loss,
            extra,
        })
    }
}

/// The data set of `cfg` and its partition among `client_num_in_total` clients.
///
/// # Errors
/// Unknown data set or partition method, a missing data set with `auto_fetch` off, a partition
/// that cannot give every client `partition_min_samples`.
pub fn load_data(cfg: &Config, progress: bool) -> Result<(DataSplit, Partition)> {
    let d = &cfg.data_args;
    let kind: DatasetKind = d.dataset.parse()?;
    let split = data::load(
        kind,
        &cfg.data_cache_dir(),
        d.auto_fetch,
        &FetchOptions { progress },
    )
    .with_context(|| format!("loading data set {}", d.dataset))?;
    let method = PartitionMethod::from_args(
        &d.partition_method,
        d.partition_alpha,
        d.partition_shards_per_client,
    )?;
    let n = cfg.train_args.client_num_in_total;
    let part = match (method, split.train.groups()) {
        (PartitionMethod::Natural, Some(groups)) => data::partition_natural(
            groups,
            n,
            cfg.common_args.random_seed,
            d.partition_min_samples,
        ),
        _ => data::partition(
            split.train.labels(),
            split.train.num_classes(),
            n,
            method,
            cfg.common_args.random_seed,
            d.partition_min_samples,
        ),
    }
    .with_context(|| {
        format!(
            "partitioning {} among {n} clients ({})",
            d.dataset, d.partition_method
        )
    })?;
    Ok((split, part))
}

/// The model `model_args.model` names in `models`.
///
/// # Errors
/// An unknown name, listing the registered ones.
pub fn model_def(cfg: &Config, models: &Registry) -> Result<ModelRef> {
    models
        .get(&cfg.model_args.model)
        .with_context(|| "model_args.model".to_string())
}

/// The seeded initial global model of `cfg` for `data`: the shared parameters of the model
/// `model_args.model` names among the built-in models.
///
/// # Errors
/// An unknown model or one that does not fit the data.
pub fn initial_model(cfg: &Config, data: &dyn Dataset) -> Result<ParamSet> {
    initial_model_of(&model_def(cfg, &Registry::default())?, cfg, data)
}

/// The seeded initial global model of `model` for `data` (its shared parameters).
///
/// # Errors
/// A model that does not fit the data.
pub fn initial_model_of(model: &ModelRef, cfg: &Config, data: &dyn Dataset) -> Result<ParamSet> {
    let spec = DataSpec::of(data);
    let all = train::init_model(model.as_ref(), &spec, cfg.common_args.random_seed)?;
    Ok(client::split_scopes(all, &model.params(&spec)?).0)
}

/// Whether `model` keeps parameters on the clients (which the server then cannot evaluate).
fn has_local_params(model: &ModelRef, data: &dyn Dataset) -> Result<bool> {
    Ok(model
        .params(&DataSpec::of(data))?
        .iter()
        .any(|p| p.scope == Scope::Local))
}

/// The device `device_args` asks for and its description; a warning when `using_gpu` is set
/// but training falls back to the CPU (no CUDA in this build, or the GPU cannot be opened).
pub fn training_device(cfg: &Config) -> (Device, String) {
    let (device, desc) = train::select_device(cfg.device_args.using_gpu, cfg.device_args.gpu_id);
    if cfg.device_args.using_gpu && device.is_cpu() {
        tracing::warn!("device_args.using_gpu: {desc}");
    }
    (device, desc)
}

/// What a client of this process announces (`device_desc` from [`train::select_device`]).
pub fn capabilities(device_desc: &str, samples: u64) -> Capabilities {
    Capabilities {
        device: device_desc.to_string(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        gpu: device_desc
            .starts_with("CUDA")
            .then(|| device_desc.to_string()),
        samples,
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// MQTT session options of `cfg` for participant `id`, with the broker at `port` when given.
pub fn session_options(cfg: &Config, id: &str, port: Option<u16>) -> SessionOptions {
    let m = &cfg.comm_args.customized_training_mqtt_config;
    let mut o = SessionOptions::from_config(m, id);
    if let Some(p) = port {
        o.port = p;
    }
    o
}

/// `fedmq_args.signing_key` for participant `id`: `{id}` in it stands for the participant id
/// (`server`, `client-3`), so one config serves every participant of a federation.
pub fn signing_key_path(cfg: &Config, id: &str) -> String {
    cfg.fedmq_args.signing_key.replace("{id}", id)
}

/// The warning a distributed participant prints when nothing proves who sent a message: no
/// signing key and no mTLS identity. `None` when either is configured.
pub fn unauthenticated_warning(cfg: &Config, id: &str) -> Option<String> {
    let m = &cfg.comm_args.customized_training_mqtt_config;
    if !cfg.fedmq_args.signing_key.is_empty() || !m.mqtt_cert_path.is_empty() {
        return None;
    }
    Some(format!(
        "{id} runs without authentication: its messages are unsigned and it has no mTLS \
         identity, so anyone who can publish on the broker can act as any participant (forge \
         updates, impersonate clients, send commands). Create keys with `fedmq keys --out keys \
         --clients N` and set fedmq_args.signing_key: \"keys/{{id}}.key\" and trusted_keys: \
         \"keys\" (as config/fedml_config_distributed.yaml does), or give each participant a \
         client certificate (MQTT_CERT_PATH) on a broker with an ACL"
    ))
}

/// The store options of participant `id`: the config's endpoint and bucket, with the
/// participant's own credential from `fedmq_args.store_credentials` when that is set.
///
/// # Errors
/// The credential file is missing or malformed, or holds another participant's credential.
pub fn store_options(cfg: &Config, id: &str) -> Result<S3Options> {
    let mut o = S3Options::from(&cfg.comm_args.customized_training_s3_config);
    let path = cfg.fedmq_args.store_credentials.replace("{id}", id);
    if path.is_empty() {
        return Ok(o);
    }
    let c = StoreCredential::load(std::path::Path::new(&path)).map_err(|e| {
        anyhow::anyhow!(
            "{e} (fedmq_args.store_credentials; create the participants' credentials with \
             `fedmq keys -c <config> --out DIR --clients N`)"
        )
    })?;
    if c.access_key != id {
        bail!(
            "fedmq_args.store_credentials: {path} holds the store credential of {:?}, not of {id}",
            c.access_key
        );
    }
    o.access_key = c.access_key;
    o.secret_key = c.secret_key;
    Ok(o)
}

/// The warning a distributed client prints when it signs its store requests with the run's
/// shared credential (which lets it overwrite any blob of the run). `None` with a credential of
/// its own.
pub fn shared_store_credential_warning(s3: &S3Options, id: &str) -> Option<String> {
    (s3.access_key != id).then(|| {
        format!(
            "{id} uses the store's shared credential ({}): it can overwrite or delete every \
             participant's blobs. Give each participant its own with `fedmq keys -c <config> \
             --out keys --clients N` and fedmq_args.store_credentials: \"keys/{{id}}.s3\" \
             (docs/SECURITY.md, \"Least privilege on the store\")",
            s3.access_key
        )
    })
}

/// This participant's signing key from `fedmq_args.signing_key`, if configured.
///
/// # Errors
/// The key file is missing or malformed (the message names it).
pub fn signer(cfg: &Config, id: &str) -> Result<Option<Arc<Identity>>> {
    let path = signing_key_path(cfg, id);
    if path.is_empty() {
        return Ok(None);
    }
    let file = std::path::Path::new(&path);
    let id = Identity::load(file, id).with_context(|| {
        if file.exists() {
            "fedmq_args.signing_key".to_string()
        } else {
            "fedmq_args.signing_key (create the federation's keys with `fedmq keys --out DIR \
             --clients N`)"
                .to_string()
        }
    })?;
    Ok(Some(Arc::new(id)))
}

/// A participant's security material: its signing key, the keys it trusts, and blob sealing.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Signs every message this participant publishes.
    pub signer: Option<Arc<Identity>>,
    /// Accepts only messages signed by these keys.
    pub keyring: Option<Arc<Keyring>>,
    /// Seals and opens blobs.
    pub crypto: Option<Arc<BlobCrypto>>,
}

impl Security {
    /// Security of participant `id` from `fedmq_args` (`signing_key`, `trusted_keys`,
    /// `encrypt_blobs`).
    ///
    /// # Errors
    /// Unreadable key files; `encrypt_blobs: true` without both keys.
    pub fn from_config(cfg: &Config, id: &str) -> Result<Self> {
        let signer = signer(cfg, id)?;
        let keyring = keyring(cfg)?;
        Self::with_keys(signer, keyring, cfg.fedmq_args.encrypt_blobs)
    }

    fn with_keys(
        signer: Option<Arc<Identity>>,
        keyring: Option<Arc<Keyring>>,
        encrypt: Option<bool>,
    ) -> Result<Self> {
        let crypto = match (&signer, &keyring, encrypt) {
            (_, _, Some(false)) => None,
            (Some(me), Some(ring), _) => Some(Arc::new(BlobCrypto::new(me.clone(), ring.clone()))),
            (_, _, Some(true)) => bail!(
                "fedmq_args.encrypt_blobs is true, but sealing needs this participant's \
                 fedmq_args.signing_key and the others' public keys in fedmq_args.trusted_keys \
                 (create them with `fedmq keys`)"
            ),
            (_, _, None) => None,
        };
        Ok(Self {
            signer,
            keyring,
            crypto,
        })
    }

    /// Fresh in-memory identities for a server and `clients` clients in one process: every
    /// message signed, blobs sealed unless `encrypt` is `Some(false)`.
    ///
    /// # Errors
    /// None in practice (kept for symmetry with [`Security::from_config`]).
    pub fn ephemeral(clients: &[String], encrypt: Option<bool>) -> Result<(Self, Vec<Self>)> {
        let server = Arc::new(Identity::generate(server::SERVER_ID));
        let ids: Vec<Arc<Identity>> = clients
            .iter()
            .map(|c| Arc::new(Identity::generate(c)))
            .collect();
        let mut server_ring = Keyring::default();
        for c in &ids {
            server_ring.trust(c);
        }
        let mut client_ring = Keyring::default();
        client_ring.trust(&server);
        let client_ring = Arc::new(client_ring);
        let encrypt = encrypt.or(Some(true));
        let s = Self::with_keys(Some(server), Some(Arc::new(server_ring)), encrypt)?;
        let cs = ids
            .into_iter()
            .map(|c| Self::with_keys(Some(c), Some(client_ring.clone()), encrypt))
            .collect::<Result<_>>()?;
        Ok((s, cs))
    }
}

/// The trusted keys of `fedmq_args.trusted_keys`, if configured.
///
/// # Errors
/// The directory is unreadable or holds a malformed key (the message names it).
pub fn keyring(cfg: &Config) -> Result<Option<Arc<Keyring>>> {
    let dir = &cfg.fedmq_args.trusted_keys;
    if dir.is_empty() {
        return Ok(None);
    }
    let ring = Keyring::load_dir(std::path::Path::new(dir))
        .with_context(|| "fedmq_args.trusted_keys".to_string())?;
    Ok(Some(Arc::new(ring)))
}

/// The client of `rank` on its own data (as `fedmq client` runs it).
///
/// # Errors
/// Bad rank, data or model problems, an unusable store configuration, and [`run_client`]'s
/// start-up errors.
///
/// [`run_client`]: client::run_client
pub async fn run_client_from_config(
    cfg: &Config,
    cancel: CancellationToken,
) -> Result<ClientReport> {
    let rank = cfg.fedmq_args.rank;
    let n = cfg.train_args.client_num_in_total;
    if rank == 0 || rank > n {
        bail!(
            "a client needs a rank between 1 and train_args.client_num_in_total ({n}); got {rank} \
             (set --rank or fedmq_args.rank; rank 0 is the server)"
        );
    }
    require_external(cfg, "fedmq client")?;
    // Hierarchical FL: a device is a client of its edge, on its site's run.
    let site_cfg;
    let cfg = match crate::edge::site_of(cfg, rank).filter(|_| cfg.hierarchical()) {
        Some(site) => {
            site_cfg = crate::edge::site_config(cfg, site);
            tracing::info!(
                site,
                run = %site_cfg.common_args.run_id,
                "a device of {}",
                crate::edge::edge_id(&cfg.common_args.run_id, site)
            );
            &site_cfg
        }
        None => cfg,
    };
    if let Some(w) = unauthenticated_warning(cfg, &client::client_id(rank)) {
        tracing::warn!("{w}");
    }
    let (split, part) = tokio::task::block_in_place(|| load_data(cfg, true))?;
    let (device, desc) = training_device(cfg);
    let model = model_def(cfg, &Registry::default())?;
    let id = client::client_id(rank);
    let state_dir = PathBuf::from(&cfg.tracking_args.log_file_dir)
        .join(&cfg.common_args.run_id)
        .join(&id);
    let trainer = client_trainer(cfg, &model, rank, &split, &part, &state_dir, device, 0)?;
    let s3 = store_options(cfg, &id)?;
    if let Some(w) = shared_store_credential_warning(&s3, &id) {
        tracing::warn!("{w}");
    }
    let store = BlobStore::connect(&s3)?;
    let opts = ClientOptions {
        run: cfg.common_args.run_id.clone(),
        keys: BlobKeys::new(KEY_PREFIX, &cfg.common_args.run_id),
        capabilities: capabilities(&desc, trainer.num_samples()),
        train_slots: None,
        connect_timeout: Duration::from_secs(30),
        keyring: None,
        crypto: None,
        link_timeout: None,
        id: id.clone(),
    };
    let sec = Security::from_config(cfg, &id)?;
    let mut opts = opts;
    opts.keyring = sec.keyring;
    opts.crypto = sec.crypto;
    let mut mqtt = session_options(cfg, &id, None);
    mqtt.signer = sec.signer;
    Ok(client::run_client(opts, mqtt, store, trainer, cancel).await?)
}

/// The server (as `fedmq server` runs it), evaluating on the data set's test split.
///
/// # Errors
/// Data or model problems, an unusable store, the broker not reached at start.
pub async fn run_server_from_config(
    cfg: &Config,
    output_dir: Option<PathBuf>,
    resume: bool,
    progress: impl FnMut(&Progress) + Send,
    cancel: CancellationToken,
) -> Result<ServerReport> {
    if cfg.fedmq_args.rank != 0 {
        bail!(
            "the server is rank 0, but rank {} was given (--rank or fedmq_args.rank); start \
             clients with `fedmq client --rank N`, and the server without --rank",
            cfg.fedmq_args.rank
        );
    }
    require_external(cfg, "fedmq server")?;
    if let Some(w) = unauthenticated_warning(cfg, server::SERVER_ID) {
        tracing::warn!("{w}");
    }
    let (split, _) = tokio::task::block_in_place(|| load_data(cfg, true))?;
    let model = model_def(cfg, &Registry::default())?;
    let store = BlobStore::connect(&store_options(cfg, server::SERVER_ID)?)?;
    let mqtt = session_options(cfg, server::SERVER_ID, None);
    let sec = Security::from_config(cfg, server::SERVER_ID)?;
    let strategy = strategy_with_model(cfg, &model, &split)?;
    serve(
        cfg, &model, &split, store, mqtt, sec, strategy, output_dir, resume, progress, cancel,
    )
    .await
}

/// The strategy `train_args.federated_optimizer` names, with the defense of `defense_args`
/// (FLTrust's root data set drawn from `split`'s training samples) and the differential privacy
/// of `dp_args` around it.
///
/// # Errors
/// An unknown strategy or defense, a bad hyper-parameter or privacy setting, naming the key.
pub fn strategy_from_config(cfg: &Config, split: &DataSplit) -> Result<Box<dyn Strategy>> {
    strategy_with_model(cfg, &model_def(cfg, &Registry::default())?, split)
}

/// [`strategy_from_config`] for `model`.
fn strategy_with_model(
    cfg: &Config,
    model: &ModelRef,
    split: &DataSplit,
) -> Result<Box<dyn Strategy>> {
    let mut strategy = crate::strategy::from_config(&cfg.train_args, &cfg.fedmq_args)
        .map_err(|e| anyhow::anyhow!("{}: {}", e.key, e.reason))?;
    let sparse: std::collections::BTreeSet<String> = model
        .params(&DataSpec::of(split.train.as_ref()))?
        .into_iter()
        .filter(|p| p.row_sparse && p.scope == Scope::Shared)
        .map(|p| p.name)
        .collect();
    if !sparse.is_empty() && !strategy.set_row_sparse(sparse, cfg.fedmq_args.row_sparse_step_cap) {
        tracing::warn!(
            strategy = strategy.name(),
            "model `{}` has embedding tables this strategy averages over every client, not only \
             those that changed a row: each row moves by the share of clients that saw it (slow); \
             FedAvg and the FedOpt family average them row by row",
            model.name()
        );
    }
    let root = root_trainer(cfg, model, split)?;
    if let Some(defense) = crate::strategy::defense_from_config(
        &cfg.defense_args,
        cfg.train_args.client_num_per_round,
        root,
    )
    .map_err(|e| anyhow::anyhow!(e))?
    {
        tracing::info!(defense = defense.name(), "robust aggregation");
        strategy = Box::new(
            crate::strategy::Defended::new(strategy, defense).map_err(|e| anyhow::anyhow!(e))?,
        );
    }
    if let Some(dp) = crate::strategy::dp_from_config(cfg).map_err(|e| anyhow::anyhow!(e))? {
        tracing::info!(
            mode = ?dp.mode,
            clip = dp.clip,
            noise_multiplier = dp.noise_multiplier,
            "differential privacy"
        );
        strategy =
            Box::new(crate::strategy::Private::new(strategy, dp).map_err(|e| anyhow::anyhow!(e))?);
    }
    Ok(strategy)
}

/// FLTrust's root update: a copy of the global model trained, as a client would (as many
/// steps as a client of average size), on `defense_args.root_data_size` training samples the
/// server holds (drawn with the run's seed).
fn root_trainer(
    cfg: &Config,
    model: &ModelRef,
    split: &DataSplit,
) -> Result<Option<Arc<crate::strategy::RootTrainer>>> {
    let d = &cfg.defense_args;
    if !(d.enable_defense && d.defense_type.eq_ignore_ascii_case("fltrust"))
        || d.root_data_size == 0
    {
        return Ok(None);
    }
    if has_local_params(model, split.train.as_ref())? {
        bail!(
            "defense_args.defense_type fltrust trains a root update on the server, which model \
             `{}` cannot: it keeps parameters on the clients",
            model.name()
        );
    }
    let n = split.train.len();
    if d.root_data_size > n {
        bail!(
            "defense_args.root_data_size ({}) exceeds the {} training samples",
            d.root_data_size,
            n
        );
    }
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(
        cfg.common_args.random_seed ^ 0x0f17_7a57,
    );
    let indices = rand::seq::index::sample(&mut rng, n, d.root_data_size).into_vec();
    let (device, _) = training_device(cfg);
    let trainer = DataTrainer::new(model.clone(), split.train.clone(), indices, device, 0);
    let mut config = round_config(cfg).train;
    config.seed = cfg.common_args.random_seed;
    // As many local steps as a client of average size takes (FLTrust trains the root update
    // with the clients' local iterations): the root update's norm is what every update is
    // rescaled to.
    let per_client = n.div_ceil(cfg.train_args.client_num_in_total.max(1));
    config.epochs = config
        .epochs
        .saturating_mul(per_client.div_ceil(d.root_data_size).max(1) as u32);
    Ok(Some(Arc::new(move |global: &ParamSet| {
        let stop = std::sync::atomic::AtomicBool::new(false);
        trainer
            .train(
                global.clone(),
                &config,
                &client::LocalHooks::default(),
                &stop,
            )
            .map(|t| t.params)
            .map_err(|e| format!("training on the root data set: {e}"))
    })))
}

/// Client `rank`'s trainer of `model` on its samples in `part`: honest, or attacking when
/// `attack_args` pick this rank. A model with local parameters keeps them in `state_dir`, and
/// then needs the `natural` partition: the client evaluates on its owner's test samples.
///
/// # Errors
/// Bad attack settings; a model with local parameters on another partition.
#[allow(clippy::too_many_arguments)]
pub fn client_trainer(
    cfg: &Config,
    model: &ModelRef,
    rank: usize,
    split: &DataSplit,
    part: &Partition,
    state_dir: &std::path::Path,
    device: Device,
    threads: usize,
) -> Result<Arc<dyn LocalTrainer>> {
    let indices = part.client(rank - 1).unwrap_or_default().to_vec();
    let attack = crate::attack::Attack::from_config(cfg).map_err(|e| anyhow::anyhow!(e))?;
    let local = has_local_params(model, split.train.as_ref())?;
    // The client's held-out samples: its owner's test samples (natural partitions).
    let eval = match (part.group(rank - 1), split.test.groups()) {
        (Some(g), Some(groups)) => groups
            .iter()
            .enumerate()
            .filter(|(_, &o)| o == g)
            .map(|(i, _)| i)
            .collect(),
        _ if local => bail!(
            "model `{}` keeps parameters on each client, so each client must hold one owner's \
             samples: set data_args.partition_method: natural",
            model.name()
        ),
        _ => Vec::new(),
    };
    let seed = cfg.common_args.random_seed;
    let build = {
        let (model, device, test, eval) = (model.clone(), device.clone(), split.test.clone(), eval);
        let state_dir = state_dir.to_path_buf();
        move |data, indices| {
            let t = DataTrainer::new(model.clone(), data, indices, device.clone(), threads);
            let t = if local {
                t.with_local_dir(&state_dir, seed)
            } else {
                t
            };
            t.with_eval(test.clone(), if local { eval.clone() } else { Vec::new() })
        }
    };
    match attack {
        Some(a) if crate::attack::attacker_ranks(cfg).contains(&rank) => {
            tracing::warn!(rank, attack = ?a.kind, "this client attacks the federation (attack_args)");
            // Only a backdoor uses its trigger; the other attacks work on any data set.
            let trigger = if a.is_backdoor() {
                trigger_for(cfg)?
            } else {
                crate::attack::Trigger::new(&[0.0], &[1.0])
            };
            Ok(Arc::new(crate::attack::AttackingTrainer::new(
                a,
                rank,
                split.train.clone(),
                indices,
                trigger,
                build,
            )))
        }
        _ => Ok(Arc::new(build(split.train.clone(), indices))),
    }
}

/// The backdoor trigger for `cfg`'s data set (bright pixels in its normalization).
fn trigger_for(cfg: &Config) -> Result<crate::attack::Trigger> {
    let kind: DatasetKind = cfg.data_args.dataset.parse()?;
    if !kind.is_image() {
        bail!(
            "attack_args: the backdoor's trigger is a pixel pattern, and {} is not an image data \
             set; use a Byzantine or label-flipping attack",
            kind.name()
        );
    }
    Ok(crate::attack::Trigger::new(kind.mean(), kind.std()))
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    cfg: &Config,
    model: &ModelRef,
    split: &DataSplit,
    store: BlobStore,
    mqtt: SessionOptions,
    sec: Security,
    strategy: Box<dyn Strategy>,
    output_dir: Option<PathBuf>,
    resume: bool,
    progress: impl FnMut(&Progress) + Send,
    cancel: CancellationToken,
) -> Result<ServerReport> {
    let mut opts = server_options(cfg, output_dir);
    opts.keyring = sec.keyring;
    opts.crypto = sec.crypto;
    // The health endpoint lives as long as the server.
    let health_stop = CancellationToken::new();
    let _stop_health = health_stop.clone().drop_guard();
    opts.health = start_health(cfg, "server", health_stop).await?;
    let mut mqtt = mqtt;
    mqtt.signer = sec.signer;
    let resume_from: Option<Checkpoint> = if resume {
        store.ensure_bucket().await?;
        let sealed = SealedStore::new(store.clone(), opts.crypto.clone());
        let cp = server::latest_checkpoint(&sealed, &opts.keys).await?;
        match &cp {
            Some(c) => tracing::info!(round = c.round, "resuming after round {}", c.round),
            None => bail!(
                "--resume: run {:?} has no checkpoint under {} in bucket {}: nothing to resume. \
                 Check common_args.run_id (env FEDMQ_RUN_ID), or start without --resume to begin \
                 the run at round 1",
                cfg.common_args.run_id,
                opts.keys.checkpoint_prefix(),
                store.bucket()
            ),
        }
        cp
    } else {
        None
    };
    let initial = initial_model_of(model, cfg, split.train.as_ref())?;
    let (device, _) = training_device(cfg);
    let mut evaluator = ModelEvaluator::new(model.clone(), split.test.clone(), device)
        .with_max_samples(
            cfg.validation_args.max_test_samples,
            cfg.common_args.random_seed,
        );
    if let Some(a) = crate::attack::Attack::from_config(cfg)
        .map_err(|e| anyhow::anyhow!(e))?
        .filter(crate::attack::Attack::is_backdoor)
    {
        evaluator = evaluator.with_backdoor(Arc::new(crate::attack::backdoor_test_set(
            split.test.clone(),
            trigger_for(cfg)?,
            a.target,
        )));
    }
    // A model with local parameters is measured by the clients (`client_test_*` metrics).
    let evaluator: Option<Arc<dyn Evaluator>> =
        (!has_local_params(model, split.train.as_ref())?).then(|| Arc::new(evaluator) as _);
    Ok(server::run_server(
        opts,
        mqtt,
        store,
        strategy,
        initial,
        resume_from,
        evaluator,
        progress,
        cancel,
    )
    .await?)
}

/// Starts the health and metrics endpoints of a `role` where `fedmq_args.health_listen` says,
/// until `stop`.
///
/// # Errors
/// The address does not parse or cannot be bound.
pub async fn start_health(
    cfg: &Config,
    role: &'static str,
    stop: CancellationToken,
) -> Result<Option<Arc<crate::health::Health>>> {
    let listen = &cfg.fedmq_args.health_listen;
    if listen.is_empty() {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = listen.parse().with_context(|| {
        format!("fedmq_args.health_listen {listen:?}: not an address and port such as 0.0.0.0:9464")
    })?;
    let h = Arc::new(crate::health::Health::new(role));
    let bound = crate::health::serve(addr, h.clone(), stop).await?;
    tracing::info!("{role}: health endpoints at http://{bound}/healthz, /readyz and /metrics");
    Ok(Some(h))
}

/// Fails unless `cfg` names an external broker and store (`what`: the command, for the message).
///
/// # Errors
/// No broker port or no store endpoint, naming the keys.
pub fn require_external(cfg: &Config, what: &str) -> Result<()> {
    let c = &cfg.comm_args;
    if c.customized_training_mqtt_config.broker_port == 0 {
        bail!(
            "{what} needs a broker: set comm_args.customized_training_mqtt_config.BROKER_HOST and \
             BROKER_PORT (e.g. `fedmq broker` or Mosquitto), or run the whole federation in one \
             process with `fedmq run`"
        );
    }
    if c.customized_training_s3_config.cn_s3_endpoint.is_empty() {
        bail!(
            "{what} needs an object store: set comm_args.customized_training_s3_config.CN_S3_ENDPOINT \
             (or FEDMQ_S3_ENDPOINT; e.g. `fedmq store` or MinIO), or run the whole federation in \
             one process with `fedmq run`"
        );
    }
    Ok(())
}

/// How long clients of a local federation get to exit on their own after the server finished.
pub const CLIENT_GRACE: Duration = Duration::from_secs(10);

/// Options of [`run_local`].
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Output directory: metrics, plot, final model, the embedded store's data, and each
    /// client's local parameters (`clients/<id>/`).
    pub output_dir: PathBuf,
    /// Show a spinner while fetching data.
    pub fetch_progress: bool,
    /// The models `model_args.model` is looked up in: the built-in ones, and any the caller
    /// registered (`examples/custom_model.rs`).
    pub models: Registry,
}

impl LocalOptions {
    /// Output to `output_dir`, no fetch spinner, the built-in models.
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        Self {
            output_dir: output_dir.into(),
            fetch_progress: false,
            models: Registry::default(),
        }
    }
}

/// A finished local federation.
#[derive(Debug)]
pub struct LocalReport {
    /// The server's report.
    pub server: ServerReport,
    /// Each client's report (or why it failed), by rank.
    pub clients: Vec<std::result::Result<ClientReport, String>>,
    /// The broker address used.
    pub broker: String,
    /// The store endpoint used.
    pub store: String,
}

/// Runs a whole federation in this process: the broker and the store embedded unless the config
/// names external ones (`BROKER_PORT` ≠ 0, `CN_S3_ENDPOINT` set), the server, and
/// `client_num_in_total` clients on their partitions. Every client has its own MQTT session and
/// S3 client. At most `fedmq_args.concurrent_training` clients train at once; each gets an equal
/// share of the cores.
///
/// # Errors
/// Start-up problems (data, broker, store, the strategy's settings). Round-level problems end
/// in the report's outcome.
pub async fn run_local(
    cfg: &Config,
    opts: &LocalOptions,
    progress: impl FnMut(&Progress) + Send,
    cancel: CancellationToken,
) -> Result<LocalReport> {
    run_local_inner(cfg, opts, None, progress, cancel).await
}

/// [`run_local`] with a strategy of the caller's instead of the one the config names: how a
/// strategy written outside fedmq runs (`examples/custom_strategy.rs`). The clients follow
/// whatever instructions it sends (`Strategy::instruction`).
///
/// # Errors
/// As [`run_local`].
pub async fn run_local_with(
    cfg: &Config,
    opts: &LocalOptions,
    strategy: Box<dyn Strategy>,
    progress: impl FnMut(&Progress) + Send,
    cancel: CancellationToken,
) -> Result<LocalReport> {
    run_local_inner(cfg, opts, Some(strategy), progress, cancel).await
}

/// The broker and store of a local federation: embedded unless the config names external
/// ones.
pub struct LocalInfra {
    /// The config with the embedded broker's address and store's endpoint and credential
    /// filled in, and key files cleared (participants get fresh keys).
    pub cfg: Config,
    /// The embedded broker's port, when embedded.
    pub mqtt_port: Option<u16>,
    /// The root store options.
    pub s3: S3Options,
    /// Whether the store is the embedded one (participants then get derived credentials).
    pub embedded_store: bool,
    /// The broker, for the report.
    pub broker_desc: String,
    _broker: Option<EmbeddedBroker>,
    store_server: Option<EmbeddedStore>,
}

impl LocalInfra {
    /// Starts the embedded broker and store where the config names none.
    ///
    /// # Errors
    /// The broker or store cannot start.
    pub async fn start(cfg: &Config, output_dir: &std::path::Path) -> Result<Self> {
        let mut mqtt_port = None;
        let m = &cfg.comm_args.customized_training_mqtt_config;
        let broker_desc;
        let broker = if m.broker_port == 0 {
            let b = tokio::task::block_in_place(|| EmbeddedBroker::start(BrokerOptions::default()))
                .context("starting the embedded MQTT broker")?;
            mqtt_port = Some(b.addr().port());
            broker_desc = format!("embedded rumqttd at {}", b.addr());
            Some(b)
        } else {
            broker_desc = format!("{}:{}", m.broker_host, m.broker_port);
            None
        };
        let mut cfg = cfg.clone();
        if !cfg.fedmq_args.signing_key.is_empty() || !cfg.fedmq_args.trusted_keys.is_empty() {
            // One key file cannot sign for every participant of the process.
            tracing::warn!(
                "fedmq_args.signing_key / trusted_keys are ignored by fedmq run: its participants \
                 get fresh keys of their own; use key files with fedmq server and fedmq client"
            );
            cfg.fedmq_args.signing_key.clear();
            cfg.fedmq_args.trusted_keys.clear();
        }
        if mqtt_port.is_some() {
            cfg.comm_args.customized_training_mqtt_config.broker_host = "127.0.0.1".into();
        }
        let s3 = &mut cfg.comm_args.customized_training_s3_config;
        let embedded_store = s3.cn_s3_endpoint.is_empty();
        let store_server = if embedded_store {
            if s3.cn_s3_aki.is_empty() {
                s3.cn_s3_aki = "fedmq".into();
            }
            if s3.cn_s3_sak.is_empty() {
                // A secret for this process only; nothing outside it can use the store.
                s3.cn_s3_sak = random_secret();
            }
            let dir = output_dir.join("store");
            let st = EmbeddedStore::start(StoreOptions::new(&dir, &s3.cn_s3_aki, &s3.cn_s3_sak))
                .await
                .with_context(|| format!("starting the embedded store over {}", dir.display()))?;
            s3.cn_s3_endpoint = st.endpoint();
            Some(st)
        } else {
            None
        };
        let s3 = S3Options::from(&cfg.comm_args.customized_training_s3_config);
        Ok(Self {
            cfg,
            mqtt_port,
            s3,
            embedded_store,
            broker_desc,
            _broker: broker,
            store_server,
        })
    }

    /// Participant `id`'s store options: its derived credential on the embedded store, its
    /// configured one on an external store.
    ///
    /// # Errors
    /// As [`store_options`].
    pub fn participant_store(&self, id: &str) -> Result<S3Options> {
        if self.embedded_store {
            Ok(participant_store_options(&self.s3, id))
        } else {
            store_options(&self.cfg, id)
        }
    }

    /// The store options of a participant with a server's rights (the root credential on the
    /// embedded store).
    ///
    /// # Errors
    /// As [`store_options`].
    pub fn server_store(&self) -> Result<S3Options> {
        if self.embedded_store {
            Ok(self.s3.clone())
        } else {
            store_options(&self.cfg, server::SERVER_ID)
        }
    }

    /// MQTT session options of participant `id`.
    pub fn session(&self, id: &str) -> SessionOptions {
        session_options(&self.cfg, id, self.mqtt_port)
    }

    /// Stops the embedded store (the broker stops when dropped).
    pub async fn shutdown(self) {
        if let Some(st) = self.store_server {
            st.shutdown().await;
        }
    }
}

/// Training slots and threads of the clients of a local federation of `n` clients: at most
/// `fedmq_args.concurrent_training` train at once, each with an equal share of the cores.
pub fn local_training(cfg: &Config, n: usize) -> (Arc<Semaphore>, usize) {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let concurrent = match cfg.fedmq_args.concurrent_training {
        0 => (cores / 2).max(1),
        c => c,
    }
    .min(n)
    .max(1);
    let threads = (cores / concurrent).max(1);
    (Arc::new(Semaphore::new(concurrent)), threads)
}

/// [`run_local`] with the caller's strategy, or (`None`) the one the config names.
async fn run_local_inner(
    cfg: &Config,
    opts: &LocalOptions,
    strategy: Option<Box<dyn Strategy>>,
    progress: impl FnMut(&Progress) + Send,
    cancel: CancellationToken,
) -> Result<LocalReport> {
    let (split, part) = tokio::task::block_in_place(|| load_data(cfg, opts.fetch_progress))?;
    let model = model_def(cfg, &opts.models)?;
    let strategy = match strategy {
        Some(s) => s,
        None => strategy_with_model(cfg, &model, &split)?,
    };
    let infra = LocalInfra::start(cfg, &opts.output_dir).await?;
    let cfg = infra.cfg.clone();
    let mut clients = LocalClients::new(cancel.child_token());
    let server_sec = if cfg.hierarchical() {
        let data = crate::edge::local::Data {
            split: &split,
            part: &part,
            model: &model,
        };
        crate::edge::local::spawn_hierarchy(&infra, data, &opts.output_dir, &mut clients)?
    } else {
        spawn_clients(
            &infra,
            &split,
            &part,
            &model,
            &opts.output_dir,
            &mut clients,
        )?
    };
    let store = BlobStore::connect(&infra.server_store()?)?;
    let mqtt = infra.session(server::SERVER_ID);
    let report = serve(
        &cfg,
        &model,
        &split,
        store,
        mqtt,
        server_sec,
        strategy,
        Some(opts.output_dir.clone()),
        false,
        progress,
        cancel.clone(),
    )
    .await;
    let results = clients.join(CLIENT_GRACE).await;
    let broker = infra.broker_desc.clone();
    let store_desc = infra.s3.endpoint.clone();
    infra.shutdown().await;
    Ok(LocalReport {
        server: report?,
        clients: results,
        broker,
        store: store_desc,
    })
}

/// Starts the `client_num_in_total` clients of a flat local federation; returns the server's
/// security (every participant has a fresh identity).
fn spawn_clients(
    infra: &LocalInfra,
    split: &DataSplit,
    part: &Partition,
    model: &ModelRef,
    output_dir: &std::path::Path,
    clients: &mut LocalClients<ClientReport>,
) -> Result<Security> {
    let cfg = &infra.cfg;
    let client_ids: Vec<String> = (1..=cfg.train_args.client_num_in_total)
        .map(client::client_id)
        .collect();
    let (server_sec, mut client_secs) =
        Security::ephemeral(&client_ids, cfg.fedmq_args.encrypt_blobs)?;
    log_ephemeral(&server_sec);
    let n = cfg.train_args.client_num_in_total;
    let (slots, threads) = local_training(cfg, n);
    let (device, desc) = train::select_device(cfg.device_args.using_gpu, cfg.device_args.gpu_id);
    // `serve` warns when using_gpu falls back to the CPU.
    for (i, sec) in client_secs.iter_mut().enumerate().take(part.num_clients()) {
        let id = client::client_id(i + 1);
        let state_dir = output_dir.join("clients").join(&id);
        let trainer = client_trainer(
            cfg,
            model,
            i + 1,
            split,
            part,
            &state_dir,
            device.clone(),
            threads,
        )?;
        let sec = std::mem::take(sec);
        let local = LocalClient {
            run: &cfg.common_args.run_id,
            id: &id,
            device: &desc,
            slots: &slots,
        };
        local.spawn(infra, trainer, sec, clients)?;
    }
    Ok(server_sec)
}

/// One client of a local federation: its run, id, device description and training slots.
pub struct LocalClient<'a> {
    /// The run it joins.
    pub run: &'a str,
    /// Its participant id.
    pub id: &'a str,
    /// What it trains on (its capabilities).
    pub device: &'a str,
    /// The federation's training slots.
    pub slots: &'a Arc<Semaphore>,
}

impl LocalClient<'_> {
    /// Starts it into `clients` with `trainer` and its security `sec`, with its own MQTT
    /// session and store client.
    ///
    /// # Errors
    /// Its store options are unusable.
    pub fn spawn(
        &self,
        infra: &LocalInfra,
        trainer: Arc<dyn LocalTrainer>,
        sec: Security,
        clients: &mut LocalClients<ClientReport>,
    ) -> Result<()> {
        let copts = ClientOptions {
            run: self.run.to_string(),
            keys: BlobKeys::new(KEY_PREFIX, self.run),
            capabilities: capabilities(self.device, trainer.num_samples()),
            train_slots: Some(self.slots.clone()),
            connect_timeout: Duration::from_secs(30),
            keyring: sec.keyring,
            crypto: sec.crypto,
            link_timeout: None,
            id: self.id.to_string(),
        };
        // Each client signs with its own credential: the embedded store derives it from its
        // secret; an external one needs fedmq_args.store_credentials (or shares the run's).
        let store = BlobStore::connect(&infra.participant_store(self.id)?)?;
        let mut mqtt = infra.session(self.id);
        mqtt.signer = sec.signer;
        let client = client::run_client(copts, mqtt, store, trainer, clients.cancel_token());
        clients.spawn(async move { Ok(client.await?) });
        Ok(())
    }
}

/// Says how a local federation's participants are secured.
pub fn log_ephemeral(server_sec: &Security) {
    tracing::info!(
        sealed = server_sec.crypto.is_some(),
        "participants have fresh Ed25519 identities: messages are signed{}",
        if server_sec.crypto.is_some() {
            " and blobs sealed"
        } else {
            " (blobs not sealed: fedmq_args.encrypt_blobs is false)"
        }
    );
}

/// A fresh secret for an embedded store that lives as long as this process (48 hex digits).
pub fn random_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Participant `id`'s options for the embedded store whose root credential is in `root`: its
/// own credential, derived from the root secret ([`StoreCredential::for_participant`]), so the
/// store knows who sends each request and applies that participant's policy.
pub fn participant_store_options(root: &S3Options, id: &str) -> S3Options {
    let own = StoreCredential::for_participant(&root.secret_key, id);
    S3Options {
        access_key: own.access_key,
        secret_key: own.secret_key,
        ..root.clone()
    }
}

/// The clients of a federation run in this process, one task each: how `fedmq run` and the
/// round benchmark start them and wait for them.
pub struct LocalClients<T> {
    tasks: Vec<tokio::task::JoinHandle<Result<T>>>,
    cancel: CancellationToken,
}

impl<T: Send + 'static> LocalClients<T> {
    /// No clients yet; `cancel` stops them all.
    pub fn new(cancel: CancellationToken) -> Self {
        Self {
            tasks: Vec::new(),
            cancel,
        }
    }

    /// The token a client must stop on.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Starts the next client (rank `len() + 1`).
    pub fn spawn(&mut self, client: impl std::future::Future<Output = Result<T>> + Send + 'static) {
        self.tasks.push(tokio::spawn(client));
    }

    /// Clients started.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True before the first [`LocalClients::spawn`].
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Waits for the clients after the server has finished: they exit on its finish message;
    /// those still running after `grace` are cancelled. Each client's result by rank, a failure
    /// as its message (with causes).
    pub async fn join(self, grace: Duration) -> Vec<std::result::Result<T, String>> {
        let all = futures::future::join_all(self.tasks);
        tokio::pin!(all);
        let joined = match tokio::time::timeout(grace, &mut all).await {
            Ok(r) => r,
            Err(_) => {
                self.cancel.cancel();
                all.await
            }
        };
        self.cancel.cancel();
        joined
            .into_iter()
            .map(|r| match r {
                Ok(Ok(report)) => Ok(report),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(e) => Err(format!("client task failed: {e}")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distributed() -> Config {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/fedml_config_distributed.yaml"
        ))
        .unwrap();
        serde_yaml_ng::from_str(&text).unwrap()
    }

    #[test]
    fn a_participant_without_keys_or_certificate_is_warned_about() {
        let mut cfg = distributed();
        assert_eq!(
            unauthenticated_warning(&cfg, "server"),
            None,
            "shipped: signed"
        );
        cfg.fedmq_args.signing_key.clear();
        cfg.fedmq_args.trusted_keys.clear();
        let w = unauthenticated_warning(&cfg, "client-2").expect("unsigned: warned");
        assert!(
            w.contains("client-2") && w.contains("act as any participant"),
            "{w}"
        );
        assert!(w.contains("fedmq keys"), "names the fix: {w}");
        // An mTLS identity authenticates the participant to the broker.
        cfg.comm_args.customized_training_mqtt_config.mqtt_cert_path = "c.pem".into();
        assert_eq!(unauthenticated_warning(&cfg, "client-2"), None);
    }

    #[test]
    fn the_shipped_distributed_config_signs_and_seals_with_per_participant_keys() {
        let cfg = distributed();
        assert_eq!(signing_key_path(&cfg, "client-7"), "keys/client-7.key");
        assert_eq!(cfg.fedmq_args.trusted_keys, "keys");
        assert_eq!(cfg.fedmq_args.encrypt_blobs, Some(true));
        let dir = tempfile::tempdir().unwrap();
        Identity::generate("client-7").save(dir.path()).unwrap();
        let mut cfg = cfg;
        cfg.fedmq_args.signing_key = format!("{}/{{id}}.key", dir.path().display());
        let me = signer(&cfg, "client-7").unwrap().expect("loaded");
        assert_eq!(me.id(), "client-7");
    }
}
