//! `fedmq broker` (run the embedded rumqttd broker) and `fedmq bench mqtt` (control-message
//! round-trip latency). Thin: the work is in `fedmq::transport`.

use anyhow::{bail, Context, Result};
use fedmq::bench::mqtt::{mqtt_rtt, RttOptions};
use fedmq::transport::{BrokerOptions, BrokerTls, EmbeddedBroker};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `fedmq broker`: an MQTT broker for a federation, on 127.0.0.1:1883 unless told otherwise.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// MQTT 3.1.1 listener address [default: 127.0.0.1:1883, or the [v4] listener of --config].
    /// Port 0 picks a free port (printed on start-up).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Also open an MQTT 5 listener here [default: the [v5] listener of --config, if any].
    #[arg(long)]
    pub listen_v5: Option<SocketAddr>,
    /// rumqttd configuration file (see broker/rumqttd.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Largest MQTT packet accepted, in bytes [default: 262144].
    #[arg(long)]
    pub max_payload: Option<usize>,
    /// Require this user name (with FEDMQ_MQTT_PWD as password); anonymous access otherwise.
    #[arg(long, env = "FEDMQ_MQTT_USER")]
    pub user: Option<String>,
    /// Mosquitto ACL file (e.g. broker/fedmq.acl): each client publishes and subscribes only
    /// where it grants. Needs authentication (--password-file, --user or --tls-client-ca).
    /// Runs the authorizing gateway in front of rumqttd (MQTT 3.1.1 only).
    #[arg(long)]
    pub acl_file: Option<PathBuf>,
    /// Mosquitto password file (mosquitto_passwd), the same one Mosquitto would use.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Serve MQTT over TLS with this certificate chain (PEM; e.g. certs/broker.pem).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: require client certificates signed by this CA (PEM); the certificate's
    /// Common Name is the client's user name. Needs TLS (--tls-cert/--tls-key or --config).
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// With the gateway: failures before CONNECT (malformed bytes, bad credentials, idle
    /// sockets) a source address may cause at once before its new connections get a 2 s CONNECT
    /// window and are shed first [default: 20]. Successful connections cost nothing. The same
    /// budget applies to wrong passwords per user name: beyond it, each wrong one is answered
    /// after 1 s.
    #[arg(long)]
    pub failure_burst: Option<u32>,
    /// With the gateway: failures per second a source address (or user name) regains after
    /// the burst [default: 10].
    #[arg(long)]
    pub failure_rate: Option<f64>,
    /// With the gateway: connections that may be waiting for their CONNECT at once; beyond it
    /// the oldest is closed [default: 10000].
    #[arg(long)]
    pub max_pending_connects: Option<usize>,
}

/// Starts the broker, prints its address(es) on stdout, and blocks until Ctrl-C.
pub fn run(a: BrokerArgs) -> Result<()> {
    let mut opts = match &a.config {
        Some(path) => BrokerOptions::from_toml(path)?,
        None => BrokerOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            ..Default::default()
        },
    };
    if let Some(l) = a.listen {
        opts.listen = l;
    }
    if a.listen_v5.is_some() {
        opts.listen_v5 = a.listen_v5;
    }
    if let Some(m) = a.max_payload {
        opts.max_payload_size = m;
    }
    if let Some(user) = a.user.filter(|u| !u.is_empty()) {
        let pwd = std::env::var("FEDMQ_MQTT_PWD")
            .context("--user / FEDMQ_MQTT_USER is set but FEDMQ_MQTT_PWD is not")?;
        opts.users = Some(HashMap::from([(user, pwd)]));
    }
    if let (Some(cert), Some(key)) = (a.tls_cert, a.tls_key) {
        opts.tls = Some(BrokerTls { cert, key });
    }
    if a.tls_client_ca.is_some() {
        opts.client_ca = a.tls_client_ca;
    }
    if a.acl_file.is_some() {
        opts.acl_file = a.acl_file;
    }
    if a.password_file.is_some() {
        opts.password_file = a.password_file;
    }
    if let Some(burst) = a.failure_burst {
        opts.failure_budget.burst = burst;
    }
    if let Some(rate) = a.failure_rate {
        opts.failure_budget.per_second = rate;
    }
    if let Some(n) = a.max_pending_connects {
        opts.max_pending_connects = n;
    }
    let authenticated =
        opts.users.is_some() || opts.password_file.is_some() || opts.client_ca.is_some();
    if !opts.listen.ip().is_loopback() && !authenticated {
        tracing::warn!(
            listen = %opts.listen,
            "listening beyond loopback without authentication: anyone who can reach this port \
             can publish commands (set --password-file, --tls-client-ca or FEDMQ_MQTT_USER / \
             FEDMQ_MQTT_PWD)"
        );
    }
    if !opts.listen.ip().is_loopback() && opts.acl_file.is_none() {
        tracing::warn!(
            listen = %opts.listen,
            "listening beyond loopback without an ACL: any authenticated client can publish on \
             any other participant's topics (set --acl-file broker/fedmq.acl)"
        );
    }
    let broker = EmbeddedBroker::start(opts).context("starting the embedded MQTT broker")?;
    // One line per listener on stdout: scripts (and tests) wait for it instead of sleeping.
    println!("fedmq broker listening on {} (MQTT 3.1.1)", broker.addr());
    if let Some(v5) = broker.addr_v5() {
        println!("fedmq broker listening on {v5} (MQTT 5)");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the signal runtime")?;
    rt.block_on(tokio::signal::ctrl_c())
        .context("waiting for Ctrl-C")?;
    tracing::info!("Ctrl-C: stopping the broker");
    Ok(())
}

/// `fedmq bench mqtt`: control-message round-trip latency through a broker.
#[derive(Debug, clap::Args)]
pub struct BenchMqttArgs {
    /// `embedded` (start rumqttd in this process on a free port) or `host:port` of a running
    /// broker (e.g. a Mosquitto started with broker/mosquitto.conf).
    #[arg(long, default_value = "embedded")]
    pub broker: String,
    /// Name of the broker in the report [default: rumqttd for embedded, else the address].
    #[arg(long)]
    pub name: Option<String>,
    /// Timed round trips.
    #[arg(long, default_value_t = 2000)]
    pub messages: usize,
    /// Untimed round trips first.
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
}

/// Runs the benchmark and prints one JSON object.
pub fn run_bench_mqtt(a: BenchMqttArgs) -> Result<()> {
    let (host, port, default_name) = if a.broker == "embedded" {
        let broker = EmbeddedBroker::start(BrokerOptions::default())
            .context("starting the embedded MQTT broker")?;
        let addr = broker.addr();
        (addr.ip().to_string(), addr.port(), "rumqttd".to_string())
    } else {
        let Some((host, port)) = a.broker.rsplit_once(':') else {
            bail!(
                "--broker must be `embedded` or host:port, got {:?}",
                a.broker
            );
        };
        let port: u16 = port
            .parse()
            .with_context(|| format!("bad port in --broker {:?}", a.broker))?;
        (
            host.trim_matches(['[', ']']).to_string(),
            port,
            a.broker.clone(),
        )
    };
    let opts = RttOptions {
        host,
        port,
        broker: a.name.unwrap_or(default_name),
        messages: a.messages,
        warmup: a.warmup,
        timeout: Duration::from_secs(10),
    };
    let rt = tokio::runtime::Runtime::new().context("building the tokio runtime")?;
    let report = rt.block_on(mqtt_rtt(&opts))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
