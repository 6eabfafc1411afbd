//! Hierarchical FL (FedML's `HierarchicalFL`): edges between the devices and the cloud server.
//!
//! To the cloud server an edge is one client (`<run>-edge-<k>`); to the devices of its site it is a
//! server. Each cloud round, the edge's [`SiteTrainer`] (the "local training" of its cloud
//! client) runs `group_comm_round` rounds of its site from the cloud's model, through a paced
//! [`RoundMachine`](crate::server::RoundMachine) ([`run_site_server`]), and the site's aggregate
//! goes up as the edge's update, weighted by the samples behind it. The site's rounds are the
//! server's own rounds: streaming aggregation, quorum and deadlines, secure aggregation when
//! configured, the same protocol on a run id of the site's own ([`site_run`]).
//!
//! A site may have its own broker bridged to the cloud broker (`broker/mosquitto-bridge.conf`)
//! or share the cloud's: the edge talks to one broker either way. While its cloud link is down
//! the edge keeps its site (the devices stay admitted, a round in progress finishes); after
//! `fedmq_args.edge_uplink_timeout_s` it stops and tells its devices.
//!
//! # Layout
//! - `mod.rs`: which devices belong to which edge ([`sites`]), each site's configuration
//!   ([`site_config`]), [`SiteTrainer`], and [`run_edge`] (`fedmq edge`).
//! - `local.rs`: the whole hierarchy in one process (`fedmq run` with `HierarchicalFL`).

pub mod local;

use crate::client::{self, ClientOptions, ClientReport, LocalHooks, LocalTrainer, Trained};
use crate::config::Config;
use crate::federation::{self, Security, KEY_PREFIX};
use crate::health::Health;
use crate::proto::{BlobKeys, ClientEval, TrainConfig, TrainMetrics};
use crate::server::{self, Progress, ServerReport, SiteCommand, SiteLink, SiteRound};
use crate::store::{BlobStore, S3Options};
use crate::strategy::Strategy;
use crate::tensor::ParamSet;
use crate::transport::SessionOptions;
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The participant id of edge `site` (1-based) of run `run`: `<run>-edge-<k>`, its id as the
/// cloud server's client and its MQTT user name.
pub fn edge_id(run: &str, site: usize) -> String {
    format!("{run}-edge-{site}")
}

/// The run id of edge `site`'s rounds with its devices: the edge's own id, so topics and blob
/// keys are the site's own, and a broker ACL can give each edge the server's rights over exactly
/// its site's topics with one pattern (`fedmq/v1/%u/cmd/+`, `broker/fedmq.acl`).
pub fn site_run(run: &str, site: usize) -> String {
    edge_id(run, site)
}

/// The device ranks of each edge (`sites(cfg)[k - 1]` for edge `k`): ranks 1..=N shuffled with
/// `common_args.random_seed`, then dealt to the edges in turn (sizes differ by at most one).
pub fn sites(cfg: &Config) -> Vec<Vec<usize>> {
    let t = &cfg.train_args;
    let n = t.client_num_in_total;
    let edges = t.group_num.clamp(1, n.max(1));
    let mut ranks: Vec<usize> = (1..=n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.common_args.random_seed ^ 0xed6e);
    ranks.shuffle(&mut rng);
    let mut out = vec![Vec::new(); edges];
    for (i, r) in ranks.into_iter().enumerate() {
        out[i % edges].push(r);
    }
    for s in &mut out {
        s.sort_unstable();
    }
    out
}

/// The edge (1-based) whose site device `rank` belongs to.
pub fn site_of(cfg: &Config, rank: usize) -> Option<usize> {
    sites(cfg)
        .iter()
        .position(|s| s.contains(&rank))
        .map(|i| i + 1)
}

/// `n · part / whole`, rounded up, between 1 and `part`.
fn share(n: usize, part: usize, whole: usize) -> usize {
    (n * part).div_ceil(whole.max(1)).clamp(1, part.max(1))
}

/// The configuration of edge `site`'s rounds with its devices, as the edge and each of its
/// devices use it: the site's run id; its share of `client_num_per_round` (and of
/// `min_clients`); a site round's deadline (`fedmq_args.edge_round_timeout_s`, or the cloud's
/// round time split over `group_comm_round` rounds with a fifth kept for the edge's upload);
/// key files from the subdirectory named by the edge's id (`<run>-edge-<k>`) of `trusted_keys`
/// and of `signing_key`'s and `store_credentials`' directories (in a site, `server` is the
/// edge; `fedmq keys --hierarchy` writes this layout).
pub fn site_config(cfg: &Config, site: usize) -> Config {
    let members = sites(cfg).get(site.saturating_sub(1)).map_or(0, Vec::len);
    let n = cfg.train_args.client_num_in_total;
    let mut c = cfg.clone();
    c.common_args.run_id = site_run(&cfg.common_args.run_id, site);
    // A site's rounds are plain FedAvg rounds (securely aggregated with enable_sa).
    c.train_args.federated_optimizer = "FedAvg".into();
    c.train_args.client_num_per_round = share(cfg.train_args.client_num_per_round, members, n);
    if cfg.fedmq_args.min_clients > 0 {
        c.fedmq_args.min_clients = share(cfg.fedmq_args.min_clients, members, n);
    }
    let f = &cfg.fedmq_args;
    c.fedmq_args.round_timeout_s = if f.edge_round_timeout_s > 0.0 {
        f.edge_round_timeout_s
    } else {
        f.round_timeout_s * 0.8 / cfg.train_args.group_comm_round.max(1) as f64
    };
    let dir = edge_id(&cfg.common_args.run_id, site);
    if !f.trusted_keys.is_empty() {
        c.fedmq_args.trusted_keys = Path::new(&f.trusted_keys)
            .join(&dir)
            .to_string_lossy()
            .into_owned();
    }
    // `keys/{id}.key` → `keys/<edge id>/{id}.key` (and the store credentials alike).
    let in_site = |template: &str| {
        let p = Path::new(template);
        let file = p.file_name().map(PathBuf::from).unwrap_or_default();
        let parent = p.parent().unwrap_or(Path::new(""));
        parent.join(&dir).join(file).to_string_lossy().into_owned()
    };
    if !f.signing_key.is_empty() {
        c.fedmq_args.signing_key = in_site(&f.signing_key);
    }
    if !f.store_credentials.is_empty() {
        c.fedmq_args.store_credentials = in_site(&f.store_credentials);
    }
    c
}

/// The site's server options: its run, its devices, the paced round policy.
fn site_server_options(
    cfg: &Config,
    site: usize,
    output_dir: Option<PathBuf>,
) -> server::ServerOptions {
    let sc = site_config(cfg, site);
    let mut o = federation::server_options(&sc, output_dir);
    o.expected_clients = sites(cfg)
        .get(site - 1)
        .map(|s| s.iter().map(|&r| client::client_id(r)).collect())
        .unwrap_or_default();
    // An edge runs as many site rounds as its upstream asks for.
    o.round.rounds = u64::MAX;
    o.round.paced = true;
    o
}

/// The "local training" of an edge's cloud client: `group_comm_round` rounds of its site from
/// the cloud's model. Blocks its (blocking) thread while the site's rounds run.
pub struct SiteTrainer {
    commands: mpsc::UnboundedSender<SiteCommand>,
    rounds: usize,
    /// Samples behind the latest site round (before the first: what the online devices
    /// announced).
    samples: AtomicU64,
    /// One cloud round at a time.
    busy: Mutex<()>,
}

impl SiteTrainer {
    /// A trainer driving the site server on the other end of `commands`, `rounds` site rounds
    /// per cloud round, claiming `samples` until its first round.
    pub fn new(commands: mpsc::UnboundedSender<SiteCommand>, rounds: usize, samples: u64) -> Self {
        Self {
            commands,
            rounds: rounds.max(1),
            samples: AtomicU64::new(samples),
            busy: Mutex::new(()),
        }
    }

    /// One site round: its result, or why there is none.
    fn site_round(
        &self,
        global: ParamSet,
        train: &TrainConfig,
        interrupt: &AtomicBool,
    ) -> Result<SiteRound, client::TrainError> {
        let (reply, result) = std::sync::mpsc::channel();
        let cmd = SiteCommand::Round {
            global,
            train: Some(train.clone()),
            reply,
        };
        if self.commands.send(cmd).is_err() {
            return Err(other("the edge's site server has stopped"));
        }
        loop {
            if interrupt.load(Ordering::Relaxed) {
                return Err(client::TrainError::Interrupted);
            }
            match result.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(why)) => return Err(other(&format!("the site's round failed: {why}"))),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(other("the edge's site server has stopped"))
                }
            }
        }
    }
}

fn other(msg: &str) -> client::TrainError {
    client::TrainError::Other(msg.to_string().into())
}

impl LocalTrainer for SiteTrainer {
    fn num_samples(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }

    fn train(
        &self,
        global: ParamSet,
        config: &TrainConfig,
        hooks: &LocalHooks,
        interrupt: &AtomicBool,
    ) -> Result<Trained, client::TrainError> {
        let plain = LocalHooks {
            round: hooks.round,
            ..LocalHooks::default()
        };
        if *hooks != plain {
            return Err(other(
                "an edge forwards plain FedAvg rounds to its devices; the cloud's strategy \
                 instruction (FedProx, SCAFFOLD, FedNova, local DP) is not forwarded: use \
                 federated_optimizer: HierarchicalFL",
            ));
        }
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let started = std::time::Instant::now();
        let mut model = global;
        let mut last = None;
        for _ in 0..self.rounds {
            let r = self.site_round(model, config, interrupt)?;
            model = r.global.clone();
            last = Some(r);
        }
        let Some(last) = last else {
            return Err(other("no site round ran"));
        };
        self.samples.store(last.num_samples, Ordering::Relaxed);
        // The devices' own evaluations (models with local parameters) travel up as sums.
        let m = &last.metrics;
        let eval = m.get("client_test_samples").map(|&n| ClientEval {
            samples: n as u64,
            loss_sum: m.get("client_test_loss").map_or(0.0, |l| l * n),
            correct: m
                .get("client_test_accuracy")
                .map(|a| (a * n).round() as u64),
            sq_err_sum: m.get("client_test_rmse").map(|r| r * r * n),
            abs_err_sum: m.get("client_test_mae").map(|a| a * n),
        });
        Ok(Trained {
            params: model,
            metrics: TrainMetrics {
                train_loss: if last.train_loss.is_finite() {
                    last.train_loss
                } else {
                    0.0
                },
                train_seconds: started.elapsed().as_secs_f64(),
                eval,
            },
            steps: self.rounds as u64,
        })
    }
}

/// What an edge needs to run: its site, stores, broker sessions and security on both sides.
pub struct EdgeParts {
    /// The edge (1-based).
    pub site: usize,
    /// The full configuration (the cloud's view).
    pub cfg: Config,
    /// The site server's store (its credential may write the site's global models).
    pub site_store: BlobStore,
    /// The cloud client's store.
    pub cloud_store: BlobStore,
    /// The site server's MQTT session (its signer set).
    pub site_mqtt: SessionOptions,
    /// The cloud client's MQTT session (its signer set).
    pub cloud_mqtt: SessionOptions,
    /// The site server's keyring and sealing (as the devices' server).
    pub site_security: Security,
    /// The cloud client's keyring and sealing (as the cloud server's client).
    pub cloud_security: Security,
    /// Where the site's metrics go.
    pub output_dir: Option<PathBuf>,
    /// Health and metrics of the edge.
    pub health: Option<Arc<Health>>,
}

/// How an edge's run went.
#[derive(Debug)]
pub struct EdgeReport {
    /// The site server's report (its rounds with its devices).
    pub site: ServerReport,
    /// The cloud client's report, or why it failed.
    pub cloud: std::result::Result<ClientReport, String>,
}

/// Runs edge `parts.site`: its site server, and, once enough devices are online, its client of
/// the cloud server. Returns when the cloud run finishes (the site's devices are told), when the
/// cloud link stays down past `edge_uplink_timeout_s`, or on `cancel`.
///
/// # Errors
/// Start-up problems (broker or store unreachable).
pub async fn run_edge(
    parts: EdgeParts,
    mut progress: impl FnMut(&Progress) + Send,
    cancel: CancellationToken,
) -> Result<EdgeReport> {
    let EdgeParts {
        site,
        cfg,
        site_store,
        cloud_store,
        site_mqtt,
        cloud_mqtt,
        site_security,
        cloud_security,
        output_dir,
        health,
    } = parts;
    if site == 0 || site > cfg.train_args.group_num {
        bail!(
            "edge {site} does not exist: train_args.group_num is {} (edges 1..={0})",
            cfg.train_args.group_num
        );
    }
    let id = edge_id(&cfg.common_args.run_id, site);
    let mut opts = site_server_options(&cfg, site, output_dir);
    opts.keyring = site_security.keyring;
    opts.crypto = site_security.crypto;
    opts.health = health;
    let mut site_mqtt = site_mqtt;
    site_mqtt.signer = site_security.signer;
    let (commands, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = watch::channel(None);
    let link = SiteLink {
        commands: rx,
        ready: ready_tx,
    };
    let strategy: Box<dyn Strategy> = Box::new(crate::strategy::FedAvg::default());
    let site_cancel = CancellationToken::new();
    let site_task = {
        let cancel = site_cancel.clone();
        async move {
            server::run_site_server(
                opts,
                site_mqtt,
                site_store,
                strategy,
                link,
                &mut progress,
                cancel,
            )
            .await
        }
    };
    tokio::pin!(site_task);

    // The cloud client joins once the site can train: it announces the samples of the devices
    // online (its bound on what it may claim).
    let samples = tokio::select! {
        r = &mut site_task => {
            let r = r.context("the edge's site server")?;
            bail!("{id}: the site ended before its devices came online: {}", r.outcome.summary());
        }
        () = cancel.cancelled() => {
            let _ = commands.send(SiteCommand::Finish(server::Outcome::Aborted("interrupted".into())));
            let site = site_task.await.context("the edge's site server")?;
            return Ok(EdgeReport { site, cloud: Err("cancelled while its devices were joining".into()) });
        }
        s = async {
            loop {
                if let Some(s) = *ready.borrow_and_update() {
                    break s;
                }
                if ready.changed().await.is_err() {
                    break 0;
                }
            }
        } => s,
    };
    tracing::info!(edge = %id, samples, "site ready; joining the cloud");
    let trainer = Arc::new(SiteTrainer::new(
        commands.clone(),
        cfg.train_args.group_comm_round,
        samples,
    ));
    let (_, desc) = federation::training_device(&cfg);
    let copts = ClientOptions {
        run: cfg.common_args.run_id.clone(),
        id: id.clone(),
        keys: BlobKeys::new(KEY_PREFIX, &cfg.common_args.run_id),
        capabilities: federation::capabilities(&format!("edge of {desc}"), samples),
        train_slots: None,
        connect_timeout: Duration::from_secs(30),
        keyring: cloud_security.keyring,
        crypto: cloud_security.crypto,
        link_timeout: Some(Duration::from_secs_f64(
            cfg.fedmq_args.edge_uplink_timeout_s,
        )),
    };
    let mut cloud_mqtt = cloud_mqtt;
    cloud_mqtt.signer = cloud_security.signer;
    let cloud = client::run_client(copts, cloud_mqtt, cloud_store, trainer, cancel.clone());
    tokio::pin!(cloud);
    let (cloud, site_report) = tokio::select! {
        c = &mut cloud => {
            let outcome = match &c {
                Ok(r) if r.reason.starts_with("aborted") => server::Outcome::Aborted(r.reason.clone()),
                Ok(r) if r.reason == "cancelled" => server::Outcome::Aborted("interrupted".into()),
                Ok(_) => server::Outcome::Completed,
                Err(e) => server::Outcome::Aborted(format!("the cloud link failed: {e}")),
            };
            let _ = commands.send(SiteCommand::Finish(outcome));
            (c, site_task.await)
        }
        s = &mut site_task => {
            // The site ended on its own (its devices were lost for good): the cloud client stops.
            site_cancel.cancel();
            (cloud.await, s)
        }
    };
    Ok(EdgeReport {
        site: site_report.context("the edge's site server")?,
        cloud: cloud.map_err(|e| format!("{e:#}")),
    })
}

/// Edge `site` as `fedmq edge` runs it: against the config's broker and store, with its key
/// files (the cloud side's as `edge-<k>`, the site side's from the site's key directory,
/// [`site_config`]), its site's metrics in `output_dir`, health endpoints where
/// `fedmq_args.health_listen` says.
///
/// # Errors
/// Not a hierarchical config, a site out of range, unusable keys, store or broker.
pub async fn run_edge_from_config(
    cfg: &Config,
    site: usize,
    output_dir: Option<PathBuf>,
    progress: impl FnMut(&Progress) + Send,
    cancel: CancellationToken,
) -> Result<EdgeReport> {
    if !cfg.hierarchical() {
        bail!(
            "fedmq edge needs a hierarchical config: train_args.federated_optimizer: \
             HierarchicalFL and group_num edges (got federated_optimizer {:?})",
            cfg.train_args.federated_optimizer
        );
    }
    federation::require_external(cfg, "fedmq edge")?;
    let id = edge_id(&cfg.common_args.run_id, site);
    if let Some(w) = federation::unauthenticated_warning(cfg, &id) {
        tracing::warn!("{w}");
    }
    let site_cfg = site_config(cfg, site);
    let (site_s3, cloud_s3) = edge_store_options(cfg, site)?;
    if let Some(w) = federation::shared_store_credential_warning(&cloud_s3, &id) {
        tracing::warn!("{w}");
    }
    let health_stop = CancellationToken::new();
    let _stop_health = health_stop.clone().drop_guard();
    let health = federation::start_health(cfg, "edge", health_stop).await?;
    let parts = EdgeParts {
        site,
        cfg: cfg.clone(),
        site_store: BlobStore::connect(&site_s3)?,
        cloud_store: BlobStore::connect(&cloud_s3)?,
        // Both sessions authenticate as the edge (user name, certificate): the broker's ACL
        // gives it the server's rights over its site's topics only.
        site_mqtt: federation::session_options(&site_cfg, &id, None),
        cloud_mqtt: federation::session_options(cfg, &id, None),
        site_security: Security::from_config(&site_cfg, server::SERVER_ID)
            .with_context(|| format!("the keys of {id}'s site"))?,
        cloud_security: Security::from_config(cfg, &id)?,
        output_dir,
        health,
    };
    run_edge(parts, progress, cancel).await
}

/// The store options of an edge's two sides from a distributed config: the site side with the
/// run's shared credential (it writes the site's global models, which a participant's own
/// credential may not), the cloud side as `<run>-edge-<k>` (its own credential when
/// `fedmq_args.store_credentials` is set).
///
/// # Errors
/// As [`federation::store_options`].
pub fn edge_store_options(cfg: &Config, site: usize) -> Result<(S3Options, S3Options)> {
    Ok((
        S3Options::from(&cfg.comm_args.customized_training_s3_config),
        federation::store_options(cfg, &edge_id(&cfg.common_args.run_id, site))?,
    ))
}

#[cfg(test)]
mod tests;
