//! `fedmq bench round`: whole federated rounds with a no-op trainer, one JSON line per
//! configuration; and the hidden `fedmq bench-round-client`, one client of the process mode.
//!
//! The in-process mode is [`fedmq::bench::round::bench_round_in_process`]. The process mode lives
//! here because it starts this binary: `fedmq broker` (or Mosquitto), `fedmq store`, and one
//! `fedmq bench-round-client` per client; this process is only the server. With several
//! configurations (comma lists), each one runs in a fresh `fedmq bench round` child, so that every
//! line's peak resident sets are its own (a process's peak never decreases).

use anyhow::{bail, Context, Result};
use fedmq::bench::round::{
    self as bench_round, kib_to_mib, proc_cpu_s, proc_status_kib, random_run_id, random_secret,
    round2, run_bench_client, run_bench_server, BenchEnv, BrokerKind, CpuSeconds, Mode,
    MosquittoBroker, RoundBenchConfig, RoundBenchReport, ScratchDir, ACCESS_KEY, BUCKET,
    CLIENT_SAMPLES,
};
use fedmq::client::NoopTrainer;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

/// Environment variable carrying the store's secret to child processes (never on argv).
const SECRET_ENV: &str = "FEDMQ_S3_SAK";

/// How long clients get to exit after the server's finish before they are killed.
const CLIENT_EXIT_GRACE: Duration = Duration::from_secs(15);

/// `fedmq bench round`.
///
/// Replaces training with a no-op (each client's update is the model it received plus a small
/// constant) and measures round time, bytes moved and peak memory. Prints one JSON object per
/// configuration (the cross product of --clients and --params).
#[derive(Debug, clap::Args)]
pub struct RoundArgs {
    /// Clients (all selected every round), comma-separated for several configurations.
    #[arg(long, value_delimiter = ',', default_value = "10")]
    pub clients: Vec<usize>,
    /// Model parameters (f32), comma-separated: integers or with k/M/G (100k, 1M, 10M).
    #[arg(long, value_delimiter = ',', default_value = "1M", value_parser = bench_round::parse_params)]
    pub params: Vec<usize>,
    /// Rounds per configuration (with 3 or more, round 1 is left out of the statistics).
    #[arg(long, default_value_t = 5)]
    pub rounds: u64,
    /// Every client, the broker and the store in its own process; this process is the server.
    #[arg(long)]
    pub processes: bool,
    /// `embedded` (rumqttd: in this process, or `fedmq broker` with --processes) or `mosquitto`
    /// (a child process; the binary must be installed).
    #[arg(long, default_value = "embedded")]
    pub broker: BrokerKind,
    /// Check that the final model is exactly the initial one plus rounds × delta.
    #[arg(long)]
    pub payload_check: bool,
    /// Update downloads the server runs at once (each holds one model in memory); 0: the
    /// server's default, as many as fit in 64 MiB (1 to 8).
    #[arg(long, default_value_t = 0)]
    pub fetch_concurrency: usize,
    /// What every client adds to every parameter.
    #[arg(long, default_value_t = 0.001)]
    pub delta: f32,
    /// Deadline of one round, in seconds.
    #[arg(long, default_value_t = 300.0)]
    pub round_timeout_s: f64,
    /// `off`, `on`, or `off,on` (both, one line each). `on`: MQTT over mutual TLS (client
    /// certificates; the embedded broker also applies broker/fedmq.acl), S3 over HTTPS, every
    /// message signed and checked, every blob sealed. In-process mode only.
    #[arg(long, value_delimiter = ',', default_value = "off", value_parser = parse_security)]
    pub security: Vec<bool>,
    /// With --processes: client sessions per client process, each with its own MQTT connection
    /// and S3 client (1,000–10,000 real sessions on a small machine). The server keeps its own
    /// process, so its memory and CPU are measured alone.
    #[arg(long, default_value_t = 1)]
    pub clients_per_process: usize,
    /// Server strategies, comma-separated, one line each (train_args.federated_optimizer names
    /// with default hyper-parameters: FedAvg, FedAdam, FedProx, ...).
    #[arg(long, value_delimiter = ',', default_value = "FedAvg")]
    pub strategy: Vec<String>,
    /// Secure aggregation (SecAgg+) on every round; the report adds when each stage closed.
    #[arg(long)]
    pub secure_aggregation: bool,
    /// With --secure-aggregation: the protocol, `secagg_plus` or `lightsecagg`.
    #[arg(long, default_value = "secagg_plus", value_parser = ["secagg_plus", "lightsecagg"])]
    pub sa_method: String,
    /// Fractions of the clients that drop out of every round (they fail `--dropout-after-ms`
    /// into training), comma-separated, one line each.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub dropout: Vec<f64>,
    /// When a dropping client fails, in milliseconds after its train command.
    #[arg(long, default_value_t = 50)]
    pub dropout_after_ms: u64,
    /// With --processes: hierarchical FL through this many `fedmq edge` processes (each the
    /// server of its share of the clients, one client of this process's server); 0: flat.
    #[arg(long, default_value_t = 0)]
    pub edges: usize,
}

fn parse_security(s: &str) -> std::result::Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: expected `on` or `off`")),
    }
}

/// `fedmq bench-round-client` (hidden): one client of `fedmq bench round --processes`. The store's
/// secret comes from FEDMQ_S3_SAK. Prints one JSON line when done, with its own peak resident set.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Rank (1-based) of the first client of this process.
    #[arg(long)]
    pub rank: usize,
    /// The ranks of this process's clients, comma-separated (instead of --rank and --count).
    #[arg(long, value_delimiter = ',')]
    pub ranks: Vec<usize>,
    /// Client sessions in this process: ranks `rank` … `rank + count − 1`.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub broker_host: String,
    /// Broker port.
    #[arg(long)]
    pub broker_port: u16,
    /// The store's endpoint URL.
    #[arg(long)]
    pub s3_endpoint: String,
    /// Run id.
    #[arg(long)]
    pub run: String,
    /// What to add to every parameter.
    #[arg(long)]
    pub delta: f32,
    /// Stop when stdin closes (the parent benchmark died).
    #[arg(long)]
    pub exit_with_parent: bool,
}

/// The last line a client process prints.
#[derive(Debug, Serialize, Deserialize)]
struct ClientLine {
    rank: usize,
    /// Rounds reported, per client session of the process.
    reported: Vec<u64>,
    /// The first client's (all clients' when they agree).
    rounds_reported: u64,
    reason: String,
    vm_hwm_kib: Option<u64>,
    cpu_s: Option<f64>,
}

/// Runs `fedmq bench round`.
pub fn run(a: RoundArgs) -> Result<()> {
    if a.clients.is_empty() || a.clients.contains(&0) {
        bail!("--clients needs counts of at least 1");
    }
    if a.params.is_empty() {
        bail!("--params needs at least one count");
    }
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if !(a.round_timeout_s > 0.0 && a.round_timeout_s.is_finite()) {
        bail!("--round-timeout-s must be a positive number of seconds");
    }
    if a.broker == BrokerKind::Mosquitto && bench_round::find_mosquitto().is_none() {
        bail!(
            "--broker mosquitto: the mosquitto binary is not on PATH nor in /usr/sbin or \
             /usr/local/sbin (install it, e.g. `apt-get install mosquitto`, or use \
             --broker embedded)"
        );
    }
    if a.dropout.iter().any(|d| !(0.0..1.0).contains(d)) {
        bail!("--dropout takes fractions in [0, 1)");
    }
    if a.processes && a.dropout.iter().any(|d| *d > 0.0) {
        bail!("--dropout runs in-process only; drop --processes");
    }
    if a.clients_per_process == 0 {
        bail!("--clients-per-process must be at least 1");
    }
    if a.clients_per_process > 1 && !a.processes {
        bail!("--clients-per-process needs --processes (in-process runs hold every client anyway)");
    }
    if a.edges > 0 && !a.processes {
        bail!("--edges needs --processes (each edge is a `fedmq edge` process)");
    }
    if a.edges > 0 && a.clients.iter().any(|&c| c < a.edges) {
        bail!(
            "--edges {}: every --clients count must be at least the number of edges",
            a.edges
        );
    }
    if a.edges > 0 && (a.secure_aggregation || a.strategy.iter().any(|s| s != "FedAvg")) {
        bail!("--edges runs FedAvg without secure aggregation");
    }
    if a.processes && a.security.contains(&true) {
        bail!(
            "--security on runs in-process only (child processes would need certificates and \
             keys on their command lines); drop --processes"
        );
    }
    let configs: Vec<RoundBenchConfig> = a
        .clients
        .iter()
        .flat_map(|&clients| a.params.iter().map(move |&params| (clients, params)))
        .flat_map(|(clients, params)| a.security.iter().map(move |&sec| (clients, params, sec)))
        .flat_map(|(c, p, sec)| a.strategy.iter().map(move |s| (c, p, sec, s.clone())))
        .flat_map(|(c, p, sec, s)| a.dropout.iter().map(move |&d| (c, p, sec, s.clone(), d)))
        .map(
            |(clients, params, secure, strategy, dropout)| RoundBenchConfig {
                clients,
                params,
                rounds: a.rounds,
                broker: a.broker,
                fetch_concurrency: a.fetch_concurrency,
                payload_check: a.payload_check,
                delta: a.delta,
                round_timeout: Duration::from_secs_f64(a.round_timeout_s),
                secure,
                clients_per_process: a.clients_per_process,
                strategy,
                secure_aggregation: a.secure_aggregation,
                light_secagg: a.sa_method == "lightsecagg",
                dropout,
                dropout_after: Duration::from_millis(a.dropout_after_ms),
                edges: a.edges,
                ..RoundBenchConfig::default()
            },
        )
        .collect();
    for s in &a.strategy {
        fedmq::bench::round::strategy_named(
            s,
            a.clients.first().copied().unwrap_or(10),
            &Default::default(),
        )?;
    }
    if let [cfg] = configs.as_slice() {
        let report = run_one(cfg, a.processes)?;
        print_line(&serde_json::to_string(&report)?);
        if !report.succeeded() {
            bail!("the run did not complete: {}", report.outcome);
        }
        return Ok(());
    }
    let mut failed = 0usize;
    for cfg in &configs {
        match run_child(cfg, a.processes) {
            Ok(line) => print_line(&line),
            Err(e) => {
                failed += 1;
                let err = serde_json::json!({
                    "clients": cfg.clients,
                    "params": cfg.params,
                    "rounds": cfg.rounds,
                    "mode": if a.processes { Mode::Processes } else { Mode::InProcess },
                    "broker": cfg.broker,
                    "error": format!("{e:#}"),
                });
                print_line(&err.to_string());
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} configurations failed", configs.len());
    }
    Ok(())
}

fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs one configuration in this process.
fn run_one(cfg: &RoundBenchConfig, processes: bool) -> Result<RoundBenchReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(async {
        let work = async {
            if processes {
                bench_processes(cfg).await
            } else {
                bench_round::bench_round_in_process(cfg).await
            }
        };
        // On Ctrl-C or SIGTERM the work is dropped: child processes are killed (kill-on-drop),
        // Mosquitto too, scratch directories removed.
        tokio::select! {
            r = work => r,
            () = interrupted() => bail!("interrupted"),
        }
    })
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM; never when signals cannot be watched.
async fn interrupted() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                () = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    ctrl_c.await;
}

/// Runs one configuration in a fresh `fedmq bench round` child and returns its JSON line.
fn run_child(cfg: &RoundBenchConfig, processes: bool) -> Result<String> {
    let exe = std::env::current_exe().context("locating the fedmq binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["bench", "round"])
        .arg(format!("--clients={}", cfg.clients))
        .arg(format!("--params={}", cfg.params))
        .arg(format!("--rounds={}", cfg.rounds))
        .arg(format!("--broker={}", cfg.broker))
        .arg(format!("--fetch-concurrency={}", cfg.fetch_concurrency))
        .arg(format!("--delta={}", cfg.delta))
        .arg(format!(
            "--round-timeout-s={}",
            cfg.round_timeout.as_secs_f64()
        ));
    if processes {
        cmd.arg("--processes")
            .arg(format!("--clients-per-process={}", cfg.clients_per_process));
    }
    cmd.arg(format!(
        "--security={}",
        if cfg.secure { "on" } else { "off" }
    ))
    .arg(format!("--strategy={}", cfg.strategy));
    if cfg.payload_check {
        cmd.arg("--payload-check");
    }
    if cfg.secure_aggregation {
        cmd.arg("--secure-aggregation");
        if cfg.light_secagg {
            cmd.arg("--sa-method=lightsecagg");
        }
    }
    cmd.arg(format!("--dropout={}", cfg.dropout)).arg(format!(
        "--dropout-after-ms={}",
        cfg.dropout_after.as_millis()
    ));
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .context("running a configuration in a child process")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .map(str::to_string);
    match line {
        Some(l) => Ok(l),
        None => bail!(
            "the child running {} clients × {} params printed no result ({})",
            cfg.clients,
            cfg.params,
            out.status
        ),
    }
}

/// The log filter children get unless RUST_LOG is set: their progress lines would drown the
/// parent's.
fn child_log_filter() -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,rumqttd=off".into())
}

/// Reads `child`'s stdout lines until `pick` accepts one (or EOF / the timeout).
async fn first_line<T>(
    out: &mut BufReader<ChildStdout>,
    what: &str,
    timeout: Duration,
    pick: impl Fn(&str) -> Option<T>,
) -> Result<T> {
    let read = async {
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).await? == 0 {
                bail!("{what} exited before it was ready");
            }
            if let Some(v) = pick(line.trim()) {
                return Ok(v);
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .with_context(|| format!("{what} not ready within {timeout:?}"))?
}

/// A child started by the process mode; killed on drop.
struct Proc {
    child: Child,
    /// Kept open so that late writes of the child do not fail.
    _stdout: Option<BufReader<ChildStdout>>,
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The child's peak resident set (KiB) and CPU seconds, read just before it is stopped.
    async fn stop(mut self) -> (Option<u64>, Option<f64>) {
        let peak = self.pid().and_then(|p| proc_status_kib(Some(p), "VmHWM"));
        let cpu = self.pid().and_then(|p| proc_cpu_s(Some(p)));
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        (peak, cpu)
    }
}

/// One configuration with every participant in its own process; this process is the server.
async fn bench_processes(cfg: &RoundBenchConfig) -> Result<RoundBenchReport> {
    let started = Instant::now();
    let exe = std::env::current_exe().context("locating the fedmq binary")?;
    let log = child_log_filter();

    // Broker.
    let (port, broker_proc, mosquitto) = match cfg.broker {
        BrokerKind::Embedded => {
            let mut child = Command::new(&exe)
                .args(["broker", "--listen", "127.0.0.1:0"])
                .env("RUST_LOG", &log)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting `fedmq broker`")?;
            let mut out = BufReader::new(child.stdout.take().context("broker stdout")?);
            let port = first_line(&mut out, "fedmq broker", Duration::from_secs(20), |l| {
                let rest = l.strip_prefix("fedmq broker listening on ")?;
                let addr: std::net::SocketAddr = rest.split_whitespace().next()?.parse().ok()?;
                Some(addr.port())
            })
            .await?;
            let p = Proc {
                child,
                _stdout: Some(out),
            };
            (port, Some(p), None)
        }
        BrokerKind::Mosquitto => {
            let m = tokio::task::block_in_place(MosquittoBroker::start)?;
            (m.port(), None, Some(m))
        }
    };

    // Store.
    let dir = ScratchDir::new("bench-round-store")?;
    let secret = random_secret();
    let mut child = Command::new(&exe)
        .args(["store", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", &log)
        .env("FEDMQ_S3_AKI", ACCESS_KEY)
        .env(SECRET_ENV, &secret)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting `fedmq store`")?;
    let mut out = BufReader::new(child.stdout.take().context("store stdout")?);
    let endpoint = first_line(&mut out, "fedmq store", Duration::from_secs(20), |l| {
        l.starts_with("http://").then(|| l.to_string())
    })
    .await?;
    let store_proc = Proc {
        child,
        _stdout: Some(out),
    };

    let env = BenchEnv {
        mqtt_host: "127.0.0.1".into(),
        mqtt_port: port,
        s3: BenchEnv::s3_options(&endpoint, &secret),
        run: random_run_id(),
        security: None,
    };

    // Hierarchical: the edges, each a `fedmq edge` of a config written for the run, and the
    // clients grouped by site (each client process on one site's run).
    let mut groups: Vec<(String, Vec<usize>)> =
        vec![(env.run.clone(), (1..=cfg.clients).collect())];
    let mut edges = Vec::new();
    let mut edge_stats = Vec::new();
    let mut edge_dir = None;
    if cfg.edges > 0 {
        let hcfg = edge_config(cfg, &env.run, port, &endpoint);
        let edge_dir = edge_dir.insert(ScratchDir::new("bench-round-edges")?);
        let path = edge_dir.path().join("edges.yaml");
        std::fs::write(&path, serde_yaml_ng::to_string(&hcfg)?)?;
        groups = (1..)
            .zip(fedmq::edge::sites(&hcfg))
            .map(|(k, members)| (fedmq::edge::site_run(&env.run, k), members))
            .collect();
        for k in 1..=cfg.edges {
            let child = Command::new(&exe)
                .args(["edge", "--site", &k.to_string(), "-c"])
                .arg(&path)
                .arg("-o")
                .arg(edge_dir.path().join(format!("edge-{k}")))
                .env("RUST_LOG", &log)
                .env(SECRET_ENV, &secret)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting edge {k}"))?;
            edge_stats.push(watch_stats(child.id()));
            edges.push(child);
        }
    }

    // Clients. Each watches its stdin: when this process dies, the pipes close and they stop.
    let per = cfg.clients_per_process.max(1);
    let mut clients = Vec::with_capacity(cfg.clients.div_ceil(per));
    let mut client_stdins = Vec::with_capacity(cfg.clients.div_ceil(per));
    let batches: Vec<(&String, &[usize])> = groups
        .iter()
        .flat_map(|(run, ranks)| ranks.chunks(per).map(move |c| (run, c)))
        .collect();
    let processes = batches.len();
    for (run, ranks) in batches {
        let rank = ranks[0];
        let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
        let mut child = Command::new(&exe)
            .arg("bench-round-client")
            .arg(format!("--rank={rank}"))
            .arg(format!("--ranks={}", list.join(",")))
            .arg(format!("--broker-port={port}"))
            .arg(format!("--s3-endpoint={endpoint}"))
            .arg(format!("--run={run}"))
            .arg(format!("--delta={}", cfg.delta))
            .arg("--exit-with-parent")
            .env("RUST_LOG", &log)
            .env(SECRET_ENV, &secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting client {rank}"))?;
        client_stdins.push(child.stdin.take());
        clients.push(child);
    }

    // The server, here.
    let server = run_bench_server(cfg, &env, CancellationToken::new()).await;

    // Clients exit on the finish message and print their peak; stragglers are killed (on drop).
    let waits = clients.into_iter().enumerate().map(|(i, c)| async move {
        match tokio::time::timeout(CLIENT_EXIT_GRACE, c.wait_with_output()).await {
            Ok(Ok(out)) => {
                let text = String::from_utf8_lossy(&out.stdout);
                let parsed = text
                    .lines()
                    .rev()
                    .find_map(|l| serde_json::from_str::<ClientLine>(l).ok());
                if parsed.is_none() {
                    tracing::warn!(rank = i + 1, status = %out.status, "client printed no result");
                }
                parsed
            }
            Ok(Err(e)) => {
                tracing::warn!(rank = i + 1, "waiting for a client: {e}");
                None
            }
            Err(_) => {
                tracing::warn!(rank = i + 1, "client did not exit in time; killed");
                None
            }
        }
    });
    let lines = futures::future::join_all(waits).await;
    drop(client_stdins);
    // The edges exit once the server's finish reached them; their last sampled figures count.
    for mut e in edges {
        if tokio::time::timeout(CLIENT_EXIT_GRACE, e.wait())
            .await
            .is_err()
        {
            tracing::warn!("an edge did not exit in time; killed");
        }
    }
    let edge_figures: Vec<(Option<u64>, Option<f64>)> = edge_stats
        .iter()
        .map(|s| *s.lock().unwrap_or_else(|p| p.into_inner()))
        .collect();
    let (broker_peak, broker_cpu) = match (broker_proc, &mosquitto) {
        (Some(p), _) => p.stop().await,
        (None, Some(m)) => (
            proc_status_kib(Some(m.pid()), "VmHWM"),
            proc_cpu_s(Some(m.pid())),
        ),
        (None, None) => (None, None),
    };
    drop(mosquitto);
    let (store_peak, store_cpu) = store_proc.stop().await;
    let server_cpu = proc_cpu_s(None);
    drop(dir);
    let server = server?;
    let wall_s = started.elapsed().as_secs_f64();

    let clients_ok = lines
        .iter()
        .flatten()
        .flat_map(|l| &l.reported)
        .filter(|&&r| r == cfg.rounds)
        .count();
    let client_peaks: Vec<u64> = lines
        .iter()
        .flatten()
        .filter_map(|l| l.vm_hwm_kib)
        .collect();
    let mut report =
        RoundBenchReport::from_server(cfg, Mode::Processes, &server, clients_ok, wall_s);
    report.broker_peak_rss_mib = broker_peak.map(kib_to_mib);
    report.store_peak_rss_mib = store_peak.map(kib_to_mib);
    report.client_peak_rss_mib_max = client_peaks.iter().max().copied().map(kib_to_mib);
    let edge_peaks: Vec<u64> = edge_figures.iter().filter_map(|f| f.0).collect();
    let edge_cpus: Vec<f64> = edge_figures.iter().filter_map(|f| f.1).collect();
    report.edge_peak_rss_mib_max = edge_peaks.iter().max().copied().map(kib_to_mib);
    let edges_known = edge_peaks.len() == cfg.edges;
    let all_known = client_peaks.len() == processes && edges_known;
    report.total_rss_mib = match (server.peak_rss_kib, broker_peak, store_peak, all_known) {
        (Some(s), Some(b), Some(st), true) => Some(kib_to_mib(
            s + b + st + client_peaks.iter().sum::<u64>() + edge_peaks.iter().sum::<u64>(),
        )),
        _ => None,
    };
    let client_cpus: Vec<f64> = lines.iter().flatten().filter_map(|l| l.cpu_s).collect();
    let clients_cpu = (client_cpus.len() == processes).then(|| round2(client_cpus.iter().sum()));
    let edges_cpu =
        (cfg.edges > 0 && edge_cpus.len() == cfg.edges).then(|| round2(edge_cpus.iter().sum()));
    report.cpu_s = CpuSeconds {
        total: match (server_cpu, broker_cpu, store_cpu, clients_cpu) {
            (Some(a), Some(b), Some(c), Some(d)) => {
                Some(round2(a + b + c + d + edges_cpu.unwrap_or(0.0)))
            }
            _ => None,
        },
        server: server_cpu,
        broker: broker_cpu,
        store: store_cpu,
        clients: clients_cpu,
        edges: edges_cpu,
    };
    report.note = Some(
        "processes: total_rss_mib sums the peak resident sets of the server (this process), the \
         broker, the store and every client process; idle_rss_mib is the server process before \
         the model was built"
            .into(),
    );
    Ok(report)
}

/// The configuration the edges of a hierarchical benchmark run with: `cfg.clients` devices over
/// `cfg.edges` edges, the benchmark's broker, store and round deadline, every device every round.
fn edge_config(
    cfg: &RoundBenchConfig,
    run: &str,
    port: u16,
    endpoint: &str,
) -> fedmq::config::Config {
    let mut c = fedmq::config::Config::default();
    c.common_args.run_id = run.to_string();
    c.train_args.federated_optimizer = "HierarchicalFL".into();
    c.train_args.client_num_in_total = cfg.clients;
    c.train_args.client_num_per_round = cfg.clients;
    c.train_args.comm_round = cfg.rounds as usize;
    c.train_args.group_num = cfg.edges;
    c.fedmq_args.round_timeout_s = cfg.round_timeout.as_secs_f64();
    c.fedmq_args.quorum = 1.0;
    let m = &mut c.comm_args.customized_training_mqtt_config;
    m.broker_host = "127.0.0.1".into();
    m.broker_port = port;
    let s = &mut c.comm_args.customized_training_s3_config;
    s.cn_s3_endpoint = endpoint.to_string();
    s.cn_s3_aki = ACCESS_KEY.into();
    s.bucket_name = BUCKET.into();
    // The secret travels in the environment (FEDMQ_S3_SAK), not in the file.
    s.cn_s3_sak.clear();
    c
}

/// Samples a process's peak resident set and CPU seconds every half second while it lives: the
/// last sample stands for the whole run (an edge exits on its own when the run is over).
fn watch_stats(pid: Option<u32>) -> std::sync::Arc<std::sync::Mutex<(Option<u64>, Option<f64>)>> {
    let last = std::sync::Arc::new(std::sync::Mutex::new((None, None)));
    let out = last.clone();
    // Without a pid (the process is gone already) the helpers would read this process.
    let Some(pid) = pid else {
        return out;
    };
    tokio::spawn(async move {
        loop {
            let hwm = proc_status_kib(Some(pid), "VmHWM");
            let cpu = proc_cpu_s(Some(pid));
            if hwm.is_none() {
                break;
            }
            *last.lock().unwrap_or_else(|p| p.into_inner()) = (hwm, cpu);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    out
}

/// Runs `fedmq bench-round-client`.
pub fn run_client(a: ClientArgs) -> Result<()> {
    let secret = std::env::var(SECRET_ENV)
        .with_context(|| format!("{SECRET_ENV} must hold the store's secret key"))?;
    let env = BenchEnv {
        mqtt_host: a.broker_host.clone(),
        mqtt_port: a.broker_port,
        s3: BenchEnv::s3_options(&a.s3_endpoint, &secret),
        run: a.run.clone(),
        security: None,
    };
    let cancel = CancellationToken::new();
    if a.exit_with_parent {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            // EOF (or an error): the parent is gone.
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            cancel.cancel();
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let ranks: Vec<usize> = if a.ranks.is_empty() {
        (a.rank..a.rank + a.count.max(1)).collect()
    } else {
        a.ranks.clone()
    };
    let reports = rt.block_on(async {
        let runs = ranks.into_iter().map(|r| {
            let (env, cancel) = (&env, cancel.clone());
            async move {
                let trainer = NoopTrainer {
                    num_samples: CLIENT_SAMPLES,
                    delta: a.delta,
                    steps: 1,
                    delay: Duration::ZERO,
                    fail: false,
                };
                run_bench_client(r, env, trainer, cancel).await
            }
        });
        futures::future::join_all(runs).await
    });
    let mut reported = Vec::with_capacity(reports.len());
    let mut reason = String::new();
    for r in reports {
        match r {
            Ok(rep) => {
                reported.push(rep.rounds_reported);
                if reason.is_empty() {
                    reason = rep.reason;
                }
            }
            Err(e) => {
                reported.push(0);
                reason = format!("{e:#}");
            }
        }
    }
    let line = ClientLine {
        rank: a.rank,
        rounds_reported: reported.iter().copied().min().unwrap_or(0),
        reported,
        reason,
        vm_hwm_kib: proc_status_kib(None, "VmHWM"),
        cpu_s: proc_cpu_s(None),
    };
    print_line(&serde_json::to_string(&line)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{bench::BenchCommand, Cli, Command};
    use super::*;
    use clap::Parser;

    fn round_args(argv: &[&str]) -> RoundArgs {
        let cli = Cli::try_parse_from(argv).expect("parses");
        match cli.command {
            Command::Bench(BenchCommand::Round(a)) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn comma_lists_and_suffixes_parse() {
        let a = round_args(&[
            "fedmq",
            "bench",
            "round",
            "--clients",
            "10,50",
            "--params",
            "1M,10000000,100k",
        ]);
        assert_eq!(a.clients, vec![10, 50]);
        assert_eq!(a.params, vec![1_000_000, 10_000_000, 100_000]);
        assert_eq!(a.rounds, 5);
        assert!(!a.processes && !a.payload_check);
        assert_eq!(a.broker, BrokerKind::Embedded);
        let a = round_args(&[
            "fedmq",
            "bench",
            "round",
            "--processes",
            "--broker",
            "mosquitto",
            "--payload-check",
        ]);
        assert!(a.processes && a.payload_check);
        assert_eq!(a.broker, BrokerKind::Mosquitto);
        assert!(Cli::try_parse_from(["fedmq", "bench", "round", "--params", "1X"]).is_err());
    }

    #[test]
    fn the_client_subcommand_is_hidden_but_parses() {
        let cli = Cli::try_parse_from([
            "fedmq",
            "bench-round-client",
            "--rank=3",
            "--broker-port=1883",
            "--s3-endpoint=http://127.0.0.1:9000",
            "--run=bench-1",
            "--delta=0.001",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::BenchRoundClient(ClientArgs { rank: 3, .. })
        ));
    }
}
