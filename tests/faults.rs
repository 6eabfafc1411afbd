//! Fault injection with real processes and real signals. Every test runs a whole federation as
//! separate processes — a broker (`fedmq broker` or Debian's Mosquitto), `fedmq store`,
//! `fedmq server` and 10 `fedmq client`s training `lr` on MNIST — and breaks one of them with
//! SIGKILL (SIGSTOP / SIGCONT to hold it still): clients killed mid-round, the server killed and
//! resumed (also under FedAdam, whose optimizer state must come back from the checkpoint), the
//! broker killed and restarted, the store down for 30 s, two runs sharing one
//! broker, and an update corrupted in the store. Each scenario runs against both brokers.
//!
//! An `lr` round lasts a fraction of a second, so to land a fault *inside* a round the test
//! holds the round open, in one of two ways:
//! - SIGSTOP: it polls the store's data directory for the round's global model and SIGSTOPs
//!   every client the moment it appears (before any of them can have trained), injects the
//!   fault, and SIGCONTs them;
//! - a proxy between the clients (or the server) and the store ([`S3Proxy`]) that sees every
//!   request line and can hold requests: e.g. all 10 clients' downloads of the round's global
//!   model (so each of them has its train command and nothing else has happened yet), or their
//!   uploads of their updates (they have trained). The fault is injected while they are held.
//!
//! The federations are serialized (one at a time: they need every core). Child processes log
//! at `RUST_LOG=$FEDMQ_TEST_CHILD_LOG` (default `warn`) to files in the test's temporary
//! directory; a failed assertion prints the tail of the server's log and of a client's log.
//! `FEDMQ_TEST_KEEP=1` keeps the directory (its path is printed).
//!
//! Mosquitto tests skip when the `mosquitto` binary is absent and `CI` is unset; with `CI` set
//! they fail instead.

mod common;
use common::{free_port, mosquitto_bin};

use fedmq::config::Config;
use fedmq::federation::KEY_PREFIX;
use fedmq::metrics::RoundRecord;
use fedmq::proto::BlobKeys;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const SECRET: &str = "faults-test-secret";
/// Rounds of every run.
const ROUNDS: u64 = 3;
/// Long enough that a recovery which only happens at the round's deadline is visibly slow.
const ROUND_TIMEOUT_S: f64 = 120.0;
/// Processes starting: a port answering, a first line on stdout.
const STARTUP: Duration = Duration::from_secs(30);
/// A run reaching a given point (round 2 started, the server's exit): healthy runs of this
/// suite take a few seconds.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// Clients exit once the server has finished.
const CLIENT_EXIT: Duration = Duration::from_secs(30);

/// One federation at a time: each one is a dozen processes on a 2-core machine.
static LOCK: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn child_log_level() -> String {
    std::env::var("FEDMQ_TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into())
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// A child process, SIGKILLed (and reaped) on drop.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child we have not reaped yet (reaping needs `&mut`).
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            r,
            0,
            "kill({}, {sig}) on {}: {}",
            self.pid(),
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// SIGKILL and reap.
    fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` as `name`, its stderr appended to `log` (after a header line: restarts append).
fn spawn(name: &str, mut cmd: Command, log: &Path, stdout: Stdio) -> Proc {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    writeln!(f, "==== {name}: {cmd:?}").unwrap();
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(f);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
    Proc {
        name: name.to_string(),
        child,
    }
}

/// The first line `child` prints on stdout (the rest is drained in the background, so the child
/// never blocks on a full pipe).
fn first_line(child: &mut Child, limit: Duration) -> Option<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    rx.recv_timeout(limit).ok()
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
fn wait_port(port: u16, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The last `lines` lines of the file at `path` (at most about 8 KB).
fn tail(path: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return format!("({} not readable)", path.display());
    };
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    if out.len() > 8000 {
        let mut cut = out.len() - 8000;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = format!("…{}", &out[cut..]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The broker.

#[derive(Debug, Clone, Copy, PartialEq)]
enum BrokerKind {
    /// `fedmq broker` (rumqttd).
    Embedded,
    /// Debian's Mosquitto.
    Mosquitto,
}

struct Broker {
    kind: BrokerKind,
    port: u16,
    /// Mosquitto's binary and config.
    mosquitto: Option<(PathBuf, PathBuf)>,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Broker {
    /// A broker of `kind` on a free port, files under `dir`; None (the test is skipped) when
    /// Mosquitto is wanted but not installed.
    fn start(kind: BrokerKind, dir: &Path) -> Option<Self> {
        let port = free_port();
        let mosquitto = match kind {
            BrokerKind::Embedded => None,
            BrokerKind::Mosquitto => {
                let bin = mosquitto_bin()?;
                let conf = dir.join("mosquitto.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                         max_packet_size 262144\nset_tcp_nodelay true\nlog_dest stderr\n\
                         log_timestamp_format %H:%M:%S\n"
                    ),
                )
                .unwrap();
                Some((bin, conf))
            }
        };
        let mut b = Self {
            kind,
            port,
            mosquitto,
            log: dir.join("broker.log"),
            proc: None,
        };
        b.restart();
        Some(b)
    }

    /// Starts the broker (again) on its port, with the same config; returns once it accepts
    /// connections.
    fn restart(&mut self) {
        assert!(self.proc.is_none(), "broker already running");
        let cmd = match &self.mosquitto {
            None => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_fedmq"));
                c.args(["broker", "--listen", &format!("127.0.0.1:{}", self.port)])
                    .env("RUST_LOG", child_log_level());
                c
            }
            Some((bin, conf)) => {
                let mut c = Command::new(bin);
                c.arg("-c").arg(conf);
                c
            }
        };
        self.proc = Some(spawn("broker", cmd, &self.log, Stdio::null()));
        assert!(
            wait_port(self.port, STARTUP),
            "{:?} broker not listening on {} within {STARTUP:?}:\n{}",
            self.kind,
            self.port,
            tail(&self.log, 30)
        );
    }

    fn kill(&mut self) {
        self.proc.take().expect("broker running").kill();
    }
}

// ---------------------------------------------------------------------------------------------
// A federation: store, server and clients as processes, against a broker.

struct Fed {
    run: String,
    clients: usize,
    keys: BlobKeys,
    bucket: String,
    logs: PathBuf,
    /// The store's config (and everyone's, unless a proxy is put in between).
    cfg_path: PathBuf,
    /// The server's config: `cfg_path`, or one naming a proxy as S3 endpoint.
    server_cfg_path: PathBuf,
    /// The clients' config: `cfg_path`, or one naming a proxy as S3 endpoint.
    client_cfg_path: PathBuf,
    broker_port: u16,
    out: PathBuf,
    data_dir: PathBuf,
    store_port: u16,
    store: Option<Proc>,
    /// `fedmq store --cache-mib` (None: its default).
    store_cache_mib: Option<usize>,
    server: Option<Proc>,
    /// By rank - 1; None once killed.
    client_procs: Vec<Option<Proc>>,
    /// Ranks killed on purpose (their exit status is not checked).
    killed: BTreeSet<usize>,
    /// Ranks currently SIGSTOPped.
    stopped: BTreeSet<usize>,
    /// More logs for the diagnostics (name, path): the broker's.
    extra_logs: Vec<(String, PathBuf)>,
    /// `train_args.federated_optimizer` of every config written.
    optimizer: String,
    /// Secure aggregation in every config written, with this `secagg_on_failure`.
    secure: Option<&'static str>,
    /// With `secure`: this `secure_aggregation_args.sa_method`.
    sa_method: &'static str,
}

/// A small, fast federation: `lr` on homo MNIST, every client every round.
fn config(run: &str, clients: usize, broker_port: u16, store_endpoint: &str) -> Config {
    let mut c = Config::default();
    c.common_args.run_id = run.into();
    c.model_args.model = "lr".into();
    c.data_args.dataset = "mnist".into();
    c.data_args.partition_method = "homo".into();
    c.train_args.client_num_in_total = clients;
    c.train_args.client_num_per_round = clients;
    c.train_args.comm_round = ROUNDS as usize;
    c.train_args.epochs = 1;
    c.train_args.batch_size = 32;
    c.train_args.client_optimizer = "adam".into();
    c.train_args.learning_rate = 0.001;
    c.validation_args.frequency_of_the_test = 1;
    c.fedmq_args.round_timeout_s = ROUND_TIMEOUT_S;
    c.fedmq_args.quorum = 0.5;
    c.fedmq_args.admission_timeout_s = 120.0;
    let m = &mut c.comm_args.customized_training_mqtt_config;
    m.broker_host = "127.0.0.1".into();
    m.broker_port = broker_port;
    let s3 = &mut c.comm_args.customized_training_s3_config;
    s3.cn_s3_endpoint = store_endpoint.into();
    s3.cn_s3_aki = "fedmq".into();
    s3.cn_s3_sak = SECRET.into();
    c.validate().expect("valid test config");
    // The secret travels in the environment (FEDMQ_S3_SAK), as in production.
    c.comm_args.customized_training_s3_config.cn_s3_sak = String::new();
    c
}

impl Fed {
    /// Writes the configs of run `run` (its files under `dir/run`) and starts its store.
    fn new(dir: &Path, run: &str, clients: usize, broker: &Broker) -> Self {
        let root = dir.join(run);
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let store_port = free_port();
        let endpoint = format!("http://127.0.0.1:{store_port}");
        let cfg = config(run, clients, broker.port, &endpoint);
        let cfg_path = root.join("fedml_config.yaml");
        std::fs::write(&cfg_path, serde_yaml_ng::to_string(&cfg).unwrap()).unwrap();
        let mut fed = Self {
            run: run.into(),
            clients,
            keys: BlobKeys::new(KEY_PREFIX, run),
            bucket: cfg
                .comm_args
                .customized_training_s3_config
                .bucket_name
                .clone(),
            logs,
            server_cfg_path: cfg_path.clone(),
            client_cfg_path: cfg_path.clone(),
            cfg_path,
            broker_port: broker.port,
            out: root.join("out"),
            data_dir: root.join("store"),
            store_port,
            store: None,
            store_cache_mib: None,
            server: None,
            client_procs: (0..clients).map(|_| None).collect(),
            killed: BTreeSet::new(),
            stopped: BTreeSet::new(),
            extra_logs: Vec::new(),
            optimizer: "FedAvg".into(),
            secure: None,
            sa_method: "secagg_plus",
        };
        fed.start_store();
        fed
    }

    fn fedmq(&self, args: &[&str], cfg: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fedmq"));
        c.args(args)
            .arg("-c")
            .arg(cfg)
            .env("FEDMQ_S3_SAK", SECRET)
            .env("RUST_LOG", child_log_level());
        c
    }

    /// A config like the store's naming 127.0.0.1:`port` as S3 endpoint, written as `file`.
    fn config_through(&self, port: u16, file: &str) -> PathBuf {
        let mut cfg = config(
            &self.run,
            self.clients,
            self.broker_port,
            &format!("http://127.0.0.1:{port}"),
        );
        cfg.train_args.federated_optimizer = self.optimizer.clone();
        if let Some(on_failure) = self.secure {
            cfg.secure_aggregation_args.enable_sa = true;
            cfg.secure_aggregation_args.sa_method = self.sa_method.into();
            cfg.fedmq_args.secagg_on_failure = on_failure.into();
            cfg.fedmq_args.secagg_stage_timeout_s = 30.0;
            // Local training long enough (about a second per client) that the test can act
            // between a client's share bundle and its masked input.
            cfg.train_args.epochs = 20;
        }
        let p = self.cfg_path.with_file_name(file);
        std::fs::write(&p, serde_yaml_ng::to_string(&cfg).unwrap()).unwrap();
        p
    }

    /// Every participant started from now on runs the strategy `name`.
    fn use_optimizer(&mut self, name: &str) {
        self.optimizer = name.into();
        let file = self
            .cfg_path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        self.cfg_path = self.config_through(self.store_port, &file);
        self.server_cfg_path = self.cfg_path.clone();
        self.client_cfg_path = self.cfg_path.clone();
    }

    /// The server (not the clients) reaches the store through the proxy on `port`.
    fn server_through(&mut self, port: u16) {
        self.server_cfg_path = self.config_through(port, "fedml_config_server.yaml");
    }

    /// The clients (not the server) reach the store through the proxy on `port`.
    fn clients_through(&mut self, port: u16) {
        self.client_cfg_path = self.config_through(port, "fedml_config_clients.yaml");
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    /// Starts (or restarts) `fedmq store` on the run's port and data directory.
    #[track_caller]
    fn start_store(&mut self) {
        assert!(self.store.is_none(), "store already running");
        let listen = format!("127.0.0.1:{}", self.store_port);
        let data_dir = self.data_dir.display().to_string();
        let mut args = vec!["store", "--listen", &listen, "--data-dir", &data_dir];
        let cache = self.store_cache_mib.map(|m| m.to_string());
        if let Some(m) = &cache {
            args.extend(["--cache-mib", m.as_str()]);
        }
        let cmd = self.fedmq(&args, &self.cfg_path);
        let mut p = spawn("store", cmd, &self.log("store"), Stdio::piped());
        let line = first_line(&mut p.child, STARTUP);
        self.store = Some(p);
        let want = format!("http://127.0.0.1:{}", self.store_port);
        self.check(
            line.as_deref() == Some(want.as_str()),
            format_args!("the store prints its endpoint {want} first; got {line:?}"),
        );
    }

    fn kill_store(&mut self) {
        self.store.take().expect("store running").kill();
    }

    fn start_clients(&mut self) {
        for rank in 1..=self.clients {
            let cmd = self.fedmq(
                &["client", "--rank", &rank.to_string()],
                &self.client_cfg_path,
            );
            let name = format!("client-{rank}");
            self.client_procs[rank - 1] = Some(spawn(&name, cmd, &self.log(&name), Stdio::null()));
        }
    }

    /// Starts `fedmq server` (with `--resume`: after the newest checkpoint), output in `out`.
    fn start_server(&mut self, resume: bool) {
        assert!(self.server.is_none(), "server already running");
        let out = self.out.display().to_string();
        let mut args = vec!["server", "-o", &out];
        if resume {
            args.push("--resume");
        }
        let cmd = self.fedmq(&args, &self.server_cfg_path);
        self.server = Some(spawn("server", cmd, &self.log("server"), Stdio::null()));
    }

    /// Starts the clients, then the server.
    fn launch(&mut self) {
        self.start_clients();
        self.start_server(false);
    }

    fn kill_server(&mut self) {
        self.server.take().expect("server running").kill();
    }

    fn kill_client(&mut self, rank: usize) {
        self.client_procs[rank - 1]
            .take()
            .expect("client running")
            .kill();
        self.killed.insert(rank);
        self.stopped.remove(&rank);
    }

    fn stop_clients(&mut self) {
        for (i, p) in self.client_procs.iter().enumerate() {
            if let Some(p) = p {
                p.signal(libc::SIGSTOP);
                self.stopped.insert(i + 1);
            }
        }
    }

    fn cont_clients(&mut self) {
        for rank in std::mem::take(&mut self.stopped) {
            if let Some(p) = &self.client_procs[rank - 1] {
                p.signal(libc::SIGCONT);
            }
        }
    }

    /// The object `key` of the run's bucket, as a file of the store.
    fn object(&self, key: &str) -> StoredObject {
        StoredObject::new(&self.data_dir, &self.bucket, key)
    }

    fn metrics_path(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }

    /// The complete records of metrics.jsonl so far (a line still being written is skipped).
    fn records(&self) -> Vec<RoundRecord> {
        let Ok(text) = std::fs::read_to_string(self.metrics_path()) else {
            return Vec::new();
        };
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("metrics.jsonl line {l:?}: {e}{}", self.diag()))
            })
            .collect()
    }

    fn rounds_closed(&self) -> usize {
        self.records().len()
    }

    /// The logs worth reading after a failure: the server's, a live client's, the store's.
    fn diag(&self) -> String {
        let client = (1..=self.clients)
            .find(|r| !self.killed.contains(r))
            .unwrap_or(1);
        let mut s = format!(
            "\n\n---- run {} (files in {}; FEDMQ_TEST_KEEP=1 keeps them, \
             FEDMQ_TEST_CHILD_LOG=info logs more); metrics.jsonl:\n{}",
            self.run,
            self.logs.parent().unwrap().display(),
            std::fs::read_to_string(self.metrics_path()).unwrap_or_else(|_| "(none)".into())
        );
        let mut logs: Vec<(String, PathBuf)> = [
            "server".to_string(),
            format!("client-{client}"),
            "store".into(),
        ]
        .into_iter()
        .map(|n| (n.clone(), self.log(&n)))
        .collect();
        logs.extend(self.extra_logs.iter().cloned());
        for (name, path) in logs {
            let _ = write!(s, "\n---- tail of {name}.log:\n{}\n", tail(&path, 40));
        }
        s
    }

    /// Panics with `msg` and the logs unless `ok`.
    #[track_caller]
    fn check(&self, ok: bool, msg: impl std::fmt::Display) {
        if !ok {
            panic!("{msg}{}", self.diag());
        }
    }

    /// Polls `cond` every `every` until it holds; panics with the logs after `limit`, or at once
    /// when the server exits first.
    #[track_caller]
    fn wait(
        &mut self,
        what: &str,
        limit: Duration,
        every: Duration,
        mut cond: impl FnMut(&Self) -> bool,
    ) {
        let start = Instant::now();
        loop {
            // Looked at before `cond`: a server that wrote its last record and exited is seen
            // with that record.
            let exited = self
                .server
                .as_mut()
                .and_then(|p| p.child.try_wait().ok().flatten());
            if cond(self) {
                return;
            }
            if let Some(status) = exited {
                self.server = None;
                panic!(
                    "{what}: fedmq server exited first ({status}){}",
                    self.diag()
                );
            }
            self.check(
                start.elapsed() < limit,
                format_args!("{what}: not within {limit:?}"),
            );
            std::thread::sleep(every);
        }
    }

    /// Holds round `round` open: waits until its global model is in the store (the round has
    /// started) and SIGSTOPs every client at once, before any of them can have trained it.
    /// Returns the ranks whose update of this round was already stored (normally none).
    #[track_caller]
    fn hold_round(&mut self, round: u64) -> BTreeSet<usize> {
        let global = self.object(&self.keys.global(round));
        self.wait(
            &format!("round {round} starting (its global model stored)"),
            RUN_LIMIT,
            Duration::from_millis(1),
            |_| global.exists(),
        );
        self.stop_clients();
        let closed = self.rounds_closed();
        self.check(
            closed == round as usize - 1,
            format_args!(
                "round {round} held open: the clients were stopped when its global model appeared, \
                 yet metrics.jsonl has {closed} rounds"
            ),
        );
        let uploaded: BTreeSet<usize> = (1..=self.clients)
            .filter(|&r| {
                self.object(&self.keys.update(round, &format!("client-{r}")))
                    .exists()
            })
            .collect();
        eprintln!(
            "[{}] round {round} held open; updates already stored: {uploaded:?}",
            self.run
        );
        uploaded
    }

    /// Waits (up to `limit`) until round `round` (or a later one) is in metrics.jsonl; returns
    /// when it appeared.
    #[track_caller]
    fn wait_round_closed(&mut self, round: u64, limit: Duration, what: &str) -> Instant {
        self.wait(what, limit, Duration::from_millis(20), |f| {
            f.records().iter().any(|r| r.round >= round)
        });
        Instant::now()
    }

    /// Waits for the server to exit successfully and every client not killed on purpose to
    /// exit successfully after it; returns metrics.jsonl, checked to hold rounds 1..=ROUNDS
    /// exactly once each, in order.
    #[track_caller]
    fn finish(&mut self) -> Vec<RoundRecord> {
        self.finish_by(Instant::now() + RUN_LIMIT)
    }

    /// [`finish`](Self::finish), the server exiting by `deadline`.
    #[track_caller]
    fn finish_by(&mut self, deadline: Instant) -> Vec<RoundRecord> {
        self.cont_clients();
        let status = loop {
            let p = self.server.as_mut().expect("server running");
            if let Some(s) = p.child.try_wait().unwrap() {
                break s;
            }
            self.check(
                Instant::now() < deadline,
                "fedmq server did not exit in time",
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        self.check(status.success(), format_args!("fedmq server: {status}"));
        let start = Instant::now();
        for rank in 1..=self.clients {
            let Some(p) = self.client_procs[rank - 1].as_mut() else {
                continue;
            };
            let status = loop {
                if let Some(s) = p.child.try_wait().unwrap() {
                    break s;
                }
                if start.elapsed() > CLIENT_EXIT {
                    break p.child.try_wait().unwrap().unwrap_or_else(|| {
                        panic!(
                            "client-{rank} still running {CLIENT_EXIT:?} after the server's exit{}\n---- client-{rank}.log:\n{}",
                            self.diag(),
                            tail(&self.log(&format!("client-{rank}")), 30)
                        )
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if !status.success() {
                panic!(
                    "fedmq client --rank {rank}: {status}{}\n---- client-{rank}.log:\n{}",
                    self.diag(),
                    tail(&self.log(&format!("client-{rank}")), 30)
                );
            }
        }
        let records = self.records();
        let rounds: Vec<u64> = records.iter().map(|r| r.round).collect();
        self.check(
            rounds == (1..=ROUNDS).collect::<Vec<_>>(),
            format_args!(
                "metrics.jsonl holds every round exactly once, in order: rounds {rounds:?}"
            ),
        );
        self.check(
            self.out.join("final_model.safetensors").is_file(),
            "final model written",
        );
        records
    }

    /// Asserts that `r` aggregated every client but `failed` and recorded each of those as a
    /// failure whose reason contains `reason`.
    #[track_caller]
    fn check_round(&self, r: &RoundRecord, failed: &BTreeMap<String, &str>) {
        let want_participants = self.clients - failed.len();
        self.check(
            r.participants == want_participants && r.failures == failed.len(),
            format_args!(
                "round {}: {want_participants} participants and failures {failed:?} expected; got {r:?}",
                r.round
            ),
        );
        for (client, reason) in failed {
            let prefix = format!("{client}: ");
            let f = r.failed_clients.iter().find(|f| f.starts_with(&prefix));
            self.check(
                f.is_some_and(|f| f.contains(reason)),
                format_args!(
                    "round {}: {client} recorded as failed ({reason:?}): {:?}",
                    r.round, r.failed_clients
                ),
            );
        }
    }
}

/// An object of the embedded store found by its file name,
/// `<data-dir>/buckets/<bucket>/<SHA-256 of the key>.<version>` (the version is not known
/// ahead, so the file is looked up each time).
struct StoredObject {
    dir: PathBuf,
    prefix: String,
}

impl StoredObject {
    fn new(data_dir: &Path, bucket: &str, key: &str) -> Self {
        use sha2::Digest as _;
        Self {
            dir: data_dir.join("buckets").join(bucket),
            prefix: format!("{}.", hex::encode(sha2::Sha256::digest(key.as_bytes()))),
        }
    }

    /// The file holding the object's current version, if it is stored.
    fn path(&self) -> Option<PathBuf> {
        std::fs::read_dir(&self.dir)
            .ok()?
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(&self.prefix))
            .map(|e| e.path())
    }

    fn exists(&self) -> bool {
        self.path().is_some()
    }
}

/// A temporary directory for one test (kept, and its path printed, with FEDMQ_TEST_KEEP set).
fn test_dir(name: &str) -> tempfile::TempDir {
    let mut d = tempfile::Builder::new()
        .prefix(&format!("fedmq-faults-{name}-"))
        .tempdir()
        .unwrap();
    if std::env::var_os("FEDMQ_TEST_KEEP").is_some() {
        d.disable_cleanup(true);
        eprintln!("{name}: files kept in {}", d.path().display());
    }
    d
}

fn tag(kind: BrokerKind) -> &'static str {
    match kind {
        BrokerKind::Embedded => "emb",
        BrokerKind::Mosquitto => "mosq",
    }
}

/// A broker of `kind` and one federation of `clients` clients with run id `<name>-<kind>`, its
/// store started. None: Mosquitto missing, skip.
fn start(kind: BrokerKind, dir: &Path, name: &str, clients: usize) -> Option<(Broker, Fed)> {
    let broker = Broker::start(kind, dir)?;
    let fed = Fed::new(dir, &format!("{name}-{}", tag(kind)), clients, &broker);
    Some((broker, fed))
}

fn none_failed() -> BTreeMap<String, &'static str> {
    BTreeMap::new()
}

// ---------------------------------------------------------------------------------------------
// 1. Three of ten clients SIGKILLed in round 2.

fn killed_clients(kind: BrokerKind) {
    let _serial = serial();
    let dir = test_dir("kill3");
    let Some((_broker, mut fed)) = start(kind, dir.path(), "kill3", 10) else {
        return;
    };
    fed.launch();
    let uploaded = fed.hold_round(2);
    let victims: Vec<usize> = (1..=10)
        .rev()
        .filter(|r| !uploaded.contains(r))
        .take(3)
        .collect();
    for &v in &victims {
        fed.kill_client(v);
    }
    let killed_at = Instant::now();
    fed.cont_clients();
    let closed = fed.wait_round_closed(2, RUN_LIMIT, "round 2 closing after the kills");
    eprintln!(
        "[{}] killed clients {victims:?}: round 2 closed {:.2} s after the SIGKILLs",
        fed.run,
        (closed - killed_at).as_secs_f64()
    );
    let records = fed.finish();
    fed.check_round(&records[0], &none_failed());
    let dead: BTreeMap<String, &str> = victims
        .iter()
        .map(|v| (format!("client-{v}"), "disconnected"))
        .collect();
    fed.check_round(&records[1], &dead);
    fed.check(
        records[1].round_s < ROUND_TIMEOUT_S / 2.0,
        format_args!(
            "round 2 closed on the last wills, not at its deadline: {:?}",
            records[1]
        ),
    );
    for r in &records[2..] {
        // The dead are offline: not selected, not failures.
        fed.check(
            r.participants == 7 && r.failures == 0,
            format_args!("round {}: the 7 survivors and no failures: {r:?}", r.round),
        );
    }
}

#[test]
fn three_clients_killed_mid_round_fail_that_round_and_the_run_completes_embedded_broker() {
    killed_clients(BrokerKind::Embedded);
}

#[test]
fn three_clients_killed_mid_round_fail_that_round_and_the_run_completes_mosquitto() {
    killed_clients(BrokerKind::Mosquitto);
}

// ---------------------------------------------------------------------------------------------
// A proxy in front of the store that sees (and can hold) every request.

/// Called with the method and key of every request for an object of the run, before the proxy
/// forwards it to the store: it may hold the request (block) or change the store's files.
type Hook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// A TCP proxy between some participants and the store. It reads the request lines going to
/// the store (`GET /<bucket>/<key>?x-id=GetObject HTTP/1.1`, path-style as fedmq addresses S3)
/// and calls its hook for every request for a key of the run before forwarding the bytes that
/// carry it. When the store is down, it accepts and at once closes connections.
struct S3Proxy {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl S3Proxy {
    fn start(store_port: u16, bucket: &str, keys: &BlobKeys, hook: Hook) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        // " /<bucket>/fedmq/<run>/": the path of every object of the run.
        let marker = format!(" /{bucket}/{}", keys.run_prefix()).into_bytes();
        let key_at = bucket.len() + 3; // " /<bucket>/"
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(e) => panic!("proxy accept: {e}"),
                };
                client.set_nonblocking(false).unwrap();
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", store_port)) else {
                    continue; // the store is down: the connection closes at once
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                // store -> participant: a plain copy.
                let (mut from, mut to) =
                    (upstream.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Both);
                });
                // participant -> store: request lines to the hook first.
                let (mut from, mut to) = (client, upstream);
                let (marker, hook) = (marker.clone(), hook.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    // The tail of what was forwarded, for a request line split between reads.
                    let mut carry: Vec<u8> = Vec::new();
                    // Stream offset of the window's start, and of the last request seen.
                    let mut window_at = 0usize;
                    let mut seen_up_to: Option<usize> = None;
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut window = std::mem::take(&mut carry);
                        window.extend_from_slice(&buf[..n]);
                        for i in find_all(&window, &marker) {
                            if seen_up_to.is_some_and(|s| window_at + i <= s) {
                                continue;
                            }
                            // The method, just before: a request follows a request's
                            // body directly, not always at the start of a line.
                            let Some(method) =
                                METHODS.iter().find(|m| window[..i].ends_with(m.as_bytes()))
                            else {
                                continue;
                            };
                            let rest = &window[i + key_at..];
                            let Some(end) = rest.iter().position(|&b| b == b'?' || b == b' ')
                            else {
                                // Cut off: seen again, whole, with the next read.
                                break;
                            };
                            seen_up_to = Some(window_at + i);
                            let Ok(key) = std::str::from_utf8(&rest[..end]) else {
                                continue;
                            };
                            hook(method, key);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let keep = window.len().min(1024);
                        window_at += window.len() - keep;
                        carry = window[window.len() - keep..].to_vec();
                    }
                    let _ = to.shutdown(Shutdown::Both);
                });
            }
        });
        Self { port, stop }
    }
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The HTTP methods of S3 requests.
const METHODS: [&str; 5] = ["GET", "PUT", "HEAD", "POST", "DELETE"];

/// Offsets of every occurrence of `needle` in `hay`.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// Holds the requests given to it until opened (and for good once opened).
#[derive(Default)]
struct Gate {
    /// (requests held so far, open).
    state: Mutex<(usize, bool)>,
    cv: Condvar,
}

impl Gate {
    fn hold(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 += 1;
        while !s.1 {
            s = self.cv.wait(s).unwrap();
        }
    }

    fn held(&self) -> usize {
        self.state.lock().unwrap().0
    }

    fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

/// Opens the gate when the test ends, passed or failed (nothing stays blocked on it).
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A federation of 10 clients whose requests to the store go through a proxy holding each one
/// for which `hold(method, key)` is true, every process started.
fn start_gated(
    kind: BrokerKind,
    dir: &Path,
    name: &str,
    optimizer: &str,
    hold: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
) -> Option<(Broker, Fed, S3Proxy, Arc<Gate>)> {
    let (broker, mut fed) = start(kind, dir, name, 10)?;
    fed.use_optimizer(optimizer);
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let proxy = S3Proxy::start(
        fed.store_port,
        &fed.bucket,
        &fed.keys,
        Arc::new(move |method, key| {
            if hold(method, key) {
                g.hold();
            }
        }),
    );
    fed.clients_through(proxy.port);
    fed.launch();
    Some((broker, fed, proxy, gate))
}

impl Fed {
    /// Waits until every client's update of `round` is stored.
    #[track_caller]
    fn wait_updates_stored(&mut self, round: u64, limit: Duration, what: &str) {
        let files: Vec<StoredObject> = (1..=self.clients)
            .map(|r| self.object(&self.keys.update(round, &format!("client-{r}"))))
            .collect();
        self.wait(what, limit, Duration::from_millis(10), |_| {
            files.iter().all(|f| f.exists())
        });
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The server SIGKILLed in round 2 and restarted with --resume.

/// With a stateful `optimizer` (FedAdam), the resumed server must go on from the checkpointed
/// optimizer state: its step count (`server_steps` in metrics.jsonl) continues, not restarts.
fn server_resumed(kind: BrokerKind, optimizer: &str) {
    let _serial = serial();
    let name = format!("resume{}", optimizer.to_ascii_lowercase());
    let dir = test_dir(&name);
    let keys = BlobKeys::new(KEY_PREFIX, &format!("{name}-{}", tag(kind)));
    let want = keys.global(2);
    let Some((_broker, mut fed, _proxy, gate)) =
        start_gated(kind, dir.path(), &name, optimizer, move |m, k| {
            m == "GET" && k == want
        })
    else {
        return;
    };
    let _open = OpenOnDrop(gate.clone());
    // Every client has its round-2 command and is fetching the global model.
    fed.wait(
        "all 10 clients fetching round 2's global model",
        RUN_LIMIT,
        Duration::from_millis(5),
        |_| gate.held() >= 10,
    );
    // The checkpoint of round 1 is written once round 2's global model is stored.
    let cp = fed.object(&fed.keys.checkpoint(1));
    fed.wait(
        "checkpoint of round 1 stored",
        STARTUP,
        Duration::from_millis(5),
        |_| cp.exists(),
    );
    fed.check(fed.rounds_closed() == 1, "round 2 open at the kill");
    fed.kill_server();
    let before = std::fs::read_to_string(fed.metrics_path()).unwrap_or_default();
    // The clients train and report round 2 while no server is connected.
    gate.open();
    fed.wait_updates_stored(
        2,
        Duration::from_secs(30),
        "every round-2 update stored while the server is down",
    );
    std::thread::sleep(Duration::from_millis(500));
    let restarted = Instant::now();
    fed.start_server(true);
    let closed = fed.wait_round_closed(
        2,
        Duration::from_secs(60),
        "round 2 closing after the server's restart with --resume",
    );
    let recovery = (closed - restarted).as_secs_f64();
    eprintln!(
        "[{}] server killed in round 2 and resumed: round 2 closed {recovery:.2} s after the restart",
        fed.run
    );
    let records = fed.finish();
    let after = std::fs::read_to_string(fed.metrics_path()).unwrap();
    fed.check(
        !before.is_empty() && after.starts_with(&before),
        "metrics.jsonl appended on resume, not rewritten",
    );
    for r in &records {
        fed.check_round(r, &none_failed());
        if optimizer != "FedAvg" {
            fed.check(
                r.strategy.get("server_steps") == Some(&(r.round as f64)),
                format_args!(
                    "round {}: {optimizer} at server step {} after the resume; its state was not \
                     restored ({:?})",
                    r.round, r.round, r.strategy
                ),
            );
        }
    }
    fed.check(
        recovery < 30.0,
        format_args!("round 2 closed {recovery:.1} s after the restart (< 30 s expected)"),
    );
}

#[test]
fn a_server_killed_mid_round_resumes_and_loses_no_round_embedded_broker() {
    server_resumed(BrokerKind::Embedded, "FedAvg");
}

#[test]
fn a_server_killed_mid_round_resumes_and_loses_no_round_mosquitto() {
    server_resumed(BrokerKind::Mosquitto, "FedAvg");
}

#[test]
fn a_fedadam_server_killed_mid_round_resumes_with_its_optimizer_state() {
    server_resumed(BrokerKind::Embedded, "FedAdam");
}

// ---------------------------------------------------------------------------------------------
// 3. The broker SIGKILLed in round 2, back on the same port 10 s later.

fn broker_restarted(kind: BrokerKind) {
    let _serial = serial();
    let dir = test_dir("broker");
    let keys = BlobKeys::new(KEY_PREFIX, &format!("broker-{}", tag(kind)));
    let want = keys.global(2);
    let Some((mut broker, mut fed, _proxy, gate)) =
        start_gated(kind, dir.path(), "broker", "FedAvg", move |m, k| {
            m == "GET" && k == want
        })
    else {
        return;
    };
    let _open = OpenOnDrop(gate.clone());
    fed.extra_logs.push(("broker".into(), broker.log.clone()));
    // Every client has its round-2 command and is fetching the global model.
    fed.wait(
        "all 10 clients fetching round 2's global model",
        RUN_LIMIT,
        Duration::from_millis(5),
        |_| gate.held() >= 10,
    );
    broker.kill();
    let killed = Instant::now();
    // The clients train, upload and announce their updates while the broker is away.
    gate.open();
    fed.wait_updates_stored(
        2,
        Duration::from_secs(9),
        "every round-2 update stored while the broker is down",
    );
    std::thread::sleep(Duration::from_secs(10).saturating_sub(killed.elapsed()));
    broker.restart();
    let back = Instant::now();
    let closed = fed.wait_round_closed(
        2,
        Duration::from_secs(20),
        "round 2 closing after the broker's return (a deadline-based recovery takes 120 s)",
    );
    let recovery = (closed - back).as_secs_f64();
    eprintln!(
        "[{}] broker down {:.1} s: round 2 closed {recovery:.2} s after its return",
        fed.run,
        (back - killed).as_secs_f64()
    );
    let records = fed.finish();
    for r in &records {
        fed.check_round(r, &none_failed());
    }
}

#[test]
fn a_broker_killed_mid_round_and_restarted_loses_no_update_embedded_broker() {
    broker_restarted(BrokerKind::Embedded);
}

#[test]
fn a_broker_killed_mid_round_and_restarted_loses_no_update_mosquitto() {
    broker_restarted(BrokerKind::Mosquitto);
}

// ---------------------------------------------------------------------------------------------
// 4. The store down for 30 s in round 2.

fn store_outage(kind: BrokerKind) {
    let _serial = serial();
    let dir = test_dir("store");
    let keys = BlobKeys::new(KEY_PREFIX, &format!("store-{}", tag(kind)));
    let updates = format!("{}updates/", keys.round_prefix(2));
    let Some((_broker, mut fed, _proxy, gate)) =
        start_gated(kind, dir.path(), "store", "FedAvg", move |m, k| {
            m == "PUT" && k.starts_with(&updates)
        })
    else {
        return;
    };
    let _open = OpenOnDrop(gate.clone());
    // Every client has trained round 2 and is uploading its update.
    fed.wait(
        "all 10 clients uploading their round-2 updates",
        RUN_LIMIT,
        Duration::from_millis(5),
        |_| gate.held() >= 10,
    );
    fed.kill_store();
    let killed = Instant::now();
    // The uploads go to a store that is gone.
    gate.open();
    std::thread::sleep(Duration::from_secs(30).saturating_sub(killed.elapsed()));
    fed.check(
        fed.rounds_closed() == 1,
        "round 2 cannot close while the store is down",
    );
    fed.start_store();
    let back = Instant::now();
    let closed = fed.wait_round_closed(
        2,
        Duration::from_secs(60),
        "round 2 closing after the store's return",
    );
    let recovery = (closed - back).as_secs_f64();
    eprintln!(
        "[{}] store down {:.1} s: round 2 closed {recovery:.2} s after its return",
        fed.run,
        (back - killed).as_secs_f64()
    );
    let records = fed.finish();
    for r in &records {
        fed.check_round(r, &none_failed());
    }
    fed.check(
        recovery < 30.0,
        format_args!("round 2 closed {recovery:.1} s after the store's return (< 30 s expected)"),
    );
}

#[test]
fn a_store_down_for_30_s_mid_round_delays_the_run_but_loses_nothing_embedded_broker() {
    store_outage(BrokerKind::Embedded);
}

#[test]
fn a_store_down_for_30_s_mid_round_delays_the_run_but_loses_nothing_mosquitto() {
    store_outage(BrokerKind::Mosquitto);
}

// ---------------------------------------------------------------------------------------------
// 5. Two runs sharing one broker.

fn two_runs(kind: BrokerKind) {
    let _serial = serial();
    let dir = test_dir("two");
    let Some(broker) = Broker::start(kind, dir.path()) else {
        return;
    };
    let mut a = Fed::new(dir.path(), &format!("two-a-{}", tag(kind)), 5, &broker);
    let mut b = Fed::new(dir.path(), &format!("two-b-{}", tag(kind)), 5, &broker);
    a.start_clients();
    b.start_clients();
    let started = Instant::now();
    a.start_server(false);
    b.start_server(false);
    // Both runs at once (one deadline for both).
    let deadline = Instant::now() + RUN_LIMIT;
    for fed in [&mut a, &mut b] {
        let records = fed.finish_by(deadline);
        for r in &records {
            fed.check_round(r, &none_failed());
        }
    }
    eprintln!(
        "two runs on one {kind:?} broker: both finished {:.1} s after their servers started",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn two_runs_share_one_broker_embedded_broker() {
    two_runs(BrokerKind::Embedded);
}

#[test]
fn two_runs_share_one_broker_mosquitto() {
    two_runs(BrokerKind::Mosquitto);
}

// ---------------------------------------------------------------------------------------------
// 6. client-3's update corrupted in the store before the server reads it.

/// Flips the low bit of the middle byte of the file at `path` (in place).
fn flip_byte(path: &Path) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {} to corrupt it: {e}", path.display()));
    let len = f.metadata().unwrap().len();
    assert!(len > 0, "{} is empty", path.display());
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(len / 2)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x01;
    f.seek(SeekFrom::Start(len / 2)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

/// The server reaches the store through a proxy that, before forwarding the server's first
/// GET of each update of client-3, flips one byte of that object's file in the store's data
/// directory. So every update of client-3 is damaged on disk, always before the server reads
/// it. The store runs without its object cache (so that it reads the damaged file), finds the
/// block that fails its CRC32 and refuses the object; the server records client-3's update as
/// bad.
fn corrupted_update(kind: BrokerKind) {
    let _serial = serial();
    let dir = test_dir("corrupt");
    let Some((_broker, mut fed)) = start(kind, dir.path(), "corrupt", 10) else {
        return;
    };
    fed.kill_store();
    fed.store_cache_mib = Some(0);
    fed.start_store();
    let corrupted = Arc::new(Mutex::new(Vec::<String>::new()));
    let victims: BTreeSet<String> = (1..=ROUNDS)
        .map(|r| fed.keys.update(r, "client-3"))
        .collect();
    let (c, data_dir, bucket) = (corrupted.clone(), fed.data_dir.clone(), fed.bucket.clone());
    let proxy = S3Proxy::start(
        fed.store_port,
        &fed.bucket,
        &fed.keys,
        Arc::new(move |method, key| {
            let mut done = c.lock().unwrap();
            if method == "GET" && victims.contains(key) && !done.iter().any(|k| k == key) {
                let file = StoredObject::new(&data_dir, &bucket, key).path();
                flip_byte(&file.unwrap_or_else(|| panic!("{key} is not stored")));
                done.push(key.to_string());
            }
        }),
    );
    fed.server_through(proxy.port);
    fed.launch();
    let records = fed.finish();
    let corrupted = corrupted.lock().unwrap().clone();
    eprintln!(
        "[{}] corrupted before the server's read: {corrupted:?}",
        fed.run
    );
    let want: Vec<String> = (1..=ROUNDS)
        .map(|r| fed.keys.update(r, "client-3"))
        .collect();
    fed.check(
        corrupted == want,
        format_args!("client-3's update corrupted in every round: {corrupted:?}"),
    );
    let bad: BTreeMap<String, &str> = [("client-3".to_string(), "changed on disk")].into();
    for r in &records {
        fed.check_round(r, &bad);
        fed.check(
            r.failed_clients[0].starts_with("client-3: bad update:"),
            format_args!("a bad update, named as such: {:?}", r.failed_clients),
        );
    }
}

#[test]
fn an_update_corrupted_in_the_store_fails_its_client_and_the_run_completes_embedded_broker() {
    corrupted_update(BrokerKind::Embedded);
}

#[test]
fn an_update_corrupted_in_the_store_fails_its_client_and_the_run_completes_mosquitto() {
    corrupted_update(BrokerKind::Mosquitto);
}

// ---------------------------------------------------------------------------------------------
// 9. Secure aggregation: clients killed at its stages.

/// A federation of 10 with secure aggregation (`secagg_on_failure: on_failure`) by `sa_method`:
/// SecAgg+ (`t = 6` of 10) or LightSecAgg (`U = 7` of 10, `T = 5`).
fn start_secure(
    dir: &Path,
    name: &str,
    on_failure: &'static str,
    sa_method: &'static str,
) -> (Broker, Fed) {
    let (broker, mut fed) = start(BrokerKind::Embedded, dir, name, 10).expect("embedded broker");
    fed.secure = Some(on_failure);
    fed.sa_method = sa_method;
    fed.use_optimizer("FedAvg");
    (broker, fed)
}

impl Fed {
    fn bundle(&self, round: u64, rank: usize) -> StoredObject {
        self.object(&self.keys.shares(round, &format!("client-{rank}")))
    }

    fn masked(&self, round: u64, rank: usize) -> StoredObject {
        self.object(&self.keys.update(round, &format!("client-{rank}")))
    }

    /// Waits until every client's share bundle of `round` is stored: every client has
    /// advertised its keys and shared them, and none can have masked yet (the server sends the
    /// neighbours' bundles only once all ten shared, and training takes about a second).
    #[track_caller]
    fn wait_all_shared(&mut self, round: u64) {
        let n = self.clients;
        self.wait(
            &format!("round {round}: every share bundle stored"),
            RUN_LIMIT,
            Duration::from_millis(1),
            |f| (1..=n).all(|r| f.bundle(round, r).exists()),
        );
    }

    fn record_metric(&self, r: &RoundRecord, key: &str) -> f64 {
        let v = r.strategy.get(key).copied();
        self.check(
            v.is_some(),
            format_args!("round {}: no {key}: {r:?}", r.round),
        );
        v.unwrap_or_default()
    }
}

/// Three of ten killed after sharing their keys, before their masked inputs: the round unmasks
/// the seven survivors' sum (SecAgg+: the dead's pairwise masks removed from their mask keys'
/// shares; LightSecAgg: the seven's aggregate mask decoded from their seven aggregate shares).
#[test]
fn secure_aggregation_survives_three_clients_killed_before_their_masked_input() {
    killed_before_masking("secagg_plus");
}

#[test]
fn lightsecagg_survives_three_clients_killed_before_their_masked_input() {
    killed_before_masking("lightsecagg");
}

fn killed_before_masking(sa_method: &'static str) {
    let _serial = serial();
    let name = format!("sa-before-{sa_method}");
    let dir = test_dir(&name);
    let (_broker, mut fed) = start_secure(dir.path(), &name, "abort", sa_method);
    fed.launch();
    fed.wait_all_shared(2);
    let victims = [8, 9, 10];
    for v in victims {
        fed.kill_client(v);
    }
    for v in victims {
        fed.check(
            !fed.masked(2, v).exists(),
            format_args!("client-{v} was killed before storing its masked input"),
        );
    }
    let records = fed.finish();
    let r2 = &records[1];
    let dead: BTreeMap<String, &str> = victims
        .iter()
        .map(|v| (format!("client-{v}"), "disconnected"))
        .collect();
    fed.check_round(r2, &dead);
    fed.check(
        fed.record_metric(r2, "secagg_survivors") == 7.0,
        format_args!("round 2 unmasked the 7 survivors: {r2:?}"),
    );
    fed.check(
        r2.round_s < ROUND_TIMEOUT_S / 2.0,
        format_args!("round 2 closed on the last wills, not at a deadline: {r2:?}"),
    );
    let r3 = &records[2];
    fed.check(
        r3.participants == 7 && fed.record_metric(r3, "secagg_survivors") == 7.0,
        format_args!("round 3: the 7 left, securely: {r3:?}"),
    );
}

/// Three of ten killed after storing and announcing their masked inputs, before unmasking: their
/// inputs are in the sum, and the survivors remove the masks (SecAgg+: their shares of the
/// self-mask seeds; LightSecAgg: their seven aggregate shares, all ten masks in them).
/// client-1 is held (SIGSTOP) after it shared and before it masked, so the unmask request cannot
/// go out before the kills.
#[test]
fn secure_aggregation_survives_three_clients_killed_after_their_masked_input() {
    killed_after_masking("secagg_plus");
}

#[test]
fn lightsecagg_survives_three_clients_killed_after_their_masked_input() {
    killed_after_masking("lightsecagg");
}

fn killed_after_masking(sa_method: &'static str) {
    let _serial = serial();
    let name = format!("sa-after-{sa_method}");
    let dir = test_dir(&name);
    let (_broker, mut fed) = start_secure(dir.path(), &name, "abort", sa_method);
    fed.launch();
    // Every bundle stored, and a moment for the `sa_shares` notice that follows each upload:
    // client-1 has shared (it is in the round's U1) and is still training.
    fed.wait_all_shared(2);
    std::thread::sleep(Duration::from_millis(300));
    let p = fed.client_procs[0].as_ref().expect("client-1 running");
    p.signal(libc::SIGSTOP);
    fed.stopped.insert(1);
    fed.check(
        !fed.masked(2, 1).exists(),
        "client-1 held before its masked input",
    );
    let victims = [8, 9, 10];
    fed.wait(
        "round 2: the victims' masked inputs stored",
        RUN_LIMIT,
        Duration::from_millis(5),
        |f| victims.iter().all(|&v| f.masked(2, v).exists()),
    );
    // Their `sa_masked` notices follow each upload at once.
    std::thread::sleep(Duration::from_millis(500));
    for v in victims {
        fed.kill_client(v);
    }
    fed.cont_clients();
    let records = fed.finish();
    let r2 = &records[1];
    fed.check_round(r2, &none_failed());
    fed.check(
        fed.record_metric(r2, "secagg_survivors") == 10.0,
        format_args!("round 2: all ten masked inputs in the sum: {r2:?}"),
    );
    let revealed = fed.record_metric(r2, "secagg_revealed");
    let expected = if sa_method == "lightsecagg" {
        7.0..=7.0
    } else {
        6.0..=7.0
    };
    fed.check(
        expected.contains(&revealed),
        format_args!(
            "round 2: shares from {expected:?} living clients, none from the dead: {r2:?}"
        ),
    );
}

/// Seven of ten killed after sharing: three masked inputs, fewer than t = 6 (SecAgg+) or U = 7
/// (LightSecAgg). The round fails with a reason, nothing is unmasked, and (with
/// `secagg_on_failure: abort`) the run aborts.
#[test]
fn secure_aggregation_below_the_threshold_aborts_the_run_with_the_reason() {
    seven_killed("secagg_plus", 6);
}

#[test]
fn lightsecagg_below_the_threshold_aborts_the_run_with_the_reason() {
    seven_killed("lightsecagg", 7);
}

fn seven_killed(sa_method: &'static str, needed: usize) {
    let _serial = serial();
    let name = format!("sa-seven-{sa_method}");
    let dir = test_dir(&name);
    let (_broker, mut fed) = start_secure(dir.path(), &name, "abort", sa_method);
    fed.launch();
    fed.wait_all_shared(2);
    for v in 4..=10 {
        fed.kill_client(v);
    }
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        let p = fed.server.as_mut().expect("server running");
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        fed.check(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    fed.check(
        !status.success(),
        "an aborted run exits with a failure status",
    );
    let log = std::fs::read_to_string(fed.log("server")).unwrap_or_default();
    fed.check(
        log.contains("secure aggregation failed in the masked input stage")
            && log.contains(&format!("only 3 masked inputs, {needed} needed"))
            && log.contains("nothing was unmasked"),
        "the server says why",
    );
    fed.check(fed.rounds_closed() == 1, "round 2 never closed");
}
