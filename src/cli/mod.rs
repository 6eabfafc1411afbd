//! The `fedmq` command line: argument definitions and dispatch to one module per subcommand.

mod bench;
mod bench_round_cmd;
mod broker_cmd;
mod certs_cmd;
mod config_cmd;
mod data_cmd;
mod keys_cmd;
mod run_cmd;
mod store_cmd;
mod train_cmd;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedmq::config::{Config, LoadMode};
use std::path::{Path, PathBuf};

/// Federated learning over MQTT (control) and S3 (model blobs), training with candle.
///
/// Configuration follows FedML's fedml_config.yaml (sections common_args, data_args, model_args,
/// train_args, ...). Secrets may come from the environment: FEDMQ_MQTT_USER, FEDMQ_MQTT_PWD,
/// FEDMQ_S3_AKI, FEDMQ_S3_SAK, FEDMQ_S3_ENDPOINT, FEDMQ_RUN_ID.
#[derive(Debug, Parser)]
#[command(name = "fedmq", version, about, long_about)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole federation in this process: embedded broker and store (unless the config names
    /// external ones), the server and client_num_in_total clients.
    Run(run_cmd::RunArgs),
    /// Run the server role against the configured broker and S3 endpoint.
    Server(run_cmd::ServerArgs),
    /// Run one client (--rank N, 1-based, or auto) against the configured broker and S3 endpoint.
    Client(run_cmd::ClientArgs),
    /// Run one edge of a hierarchical federation (--site K, or auto): a client of the server,
    /// and the server of its site's devices.
    Edge(run_cmd::EdgeArgs),
    /// Fetch data sets and inspect federated partitions.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Train centrally on the whole training set: the baseline to compare a federation against.
    Train(train_cmd::TrainArgs),
    /// Benchmarks that print one JSON object per configuration.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Validate a configuration file and print the effective configuration.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Run the embedded MQTT broker (rumqttd) on 127.0.0.1 unless told otherwise.
    Broker(broker_cmd::BrokerArgs),
    /// Run the embedded S3-compatible object store over a data directory.
    Store(store_cmd::StoreArgs),
    /// Create a local CA and TLS certificates for the participants, broker and store.
    Certs(certs_cmd::CertsArgs),
    /// Create Ed25519 signing keys for participants (signed control messages).
    Keys(keys_cmd::KeysArgs),
    /// One client of `fedmq bench round --processes` (internal).
    #[command(name = "bench-round-client", hide = true)]
    BenchRoundClient(bench_round_cmd::ClientArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run_cmd::run(a),
        Command::Server(a) => run_cmd::server(a),
        Command::Client(a) => run_cmd::client(a),
        Command::Edge(a) => run_cmd::edge(a),
        Command::Data(c) => data_cmd::run(c),
        Command::Train(a) => train_cmd::run(a),
        Command::Bench(c) => bench::run(c),
        Command::Config(c) => config_cmd::run(c),
        Command::Broker(a) => broker_cmd::run(a),
        Command::Store(a) => store_cmd::run(a),
        Command::Certs(a) => certs_cmd::run(a),
        Command::Keys(a) => keys_cmd::run(a),
        Command::BenchRoundClient(a) => bench_round_cmd::run_client(a),
    }
}

impl Cli {
    /// Whether the process only moves and aggregates model-sized buffers (server, store, broker,
    /// the server of `bench round --processes`) rather than training or hosting clients: then glibc is told to return such buffers to the
    /// OS (see `main.rs`). Training processes keep glibc's default, under which the trainers'
    /// per-batch buffers are recycled instead of page-faulted in afresh.
    pub fn moves_buffers_only(&self) -> bool {
        match &self.command {
            Command::Server(_) | Command::Edge(_) | Command::Store(_) | Command::Broker(_) => true,
            // With --processes this process is only the server; in-process it hosts clients too.
            Command::Bench(bench::BenchCommand::Round(a)) => a.processes,
            _ => false,
        }
    }

    /// Whether the command draws its own progress (`fedmq run`): then logs start at warnings.
    pub fn quiet_logs(&self) -> bool {
        matches!(self.command, Command::Run(_))
    }
}

/// The whole chain of an error on one line, "what failed: why: root cause", each cause once:
/// many errors already print their cause in their own message (`{path}: {source}`), so a cause
/// whose text the line already holds is not repeated (`{:#}` would print it twice).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Sets up logging to stderr; `RUST_LOG` wins over `-v`. With `quiet`, the default level is one
/// step lower (the command prints its own progress).
pub fn init_tracing(verbose: u8, quiet: bool) {
    let default = match (verbose, quiet) {
        (0, true) => "warn",
        (0, false) | (1, true) => "info",
        (1, false) | (2, true) => "debug",
        _ => "trace",
    };
    // rumqttd logs every client disconnect at ERROR ("no-connection id 0 is already gone",
    // "router-drop"): silence it unless -v is given.
    let default = if verbose == 0 {
        format!("{default},rumqttd=off")
    } else {
        default.to_string()
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// The config file used when `-c` is not given.
pub const DEFAULT_CONFIG: &str = "config/fedml_config.yaml";

/// Loads a config file for `mode` (or the defaults when `path` is the default and does not
/// exist), then applies environment overrides, then `--rank` / `--run-id`, and validates the
/// result.
pub fn load_config_args(a: &ConfigArg, mode: LoadMode) -> Result<Config> {
    let mut cfg = load_config(&a.config, mode)?;
    match a.rank {
        Some(Numbered::Given(r)) => cfg.fedmq_args.rank = r,
        Some(Numbered::Auto) => {
            use fedmq::deploy::{derive, Environment, Ordinal};
            let env = Environment::current(Ordinal::Rank);
            cfg.fedmq_args.rank = derive(Ordinal::Rank, cfg.train_args.client_num_in_total, &env)?;
            tracing::info!(rank = cfg.fedmq_args.rank, "rank derived (--rank auto)");
        }
        None => {}
    }
    if let Some(id) = &a.run_id {
        cfg.common_args.run_id = id.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Loads a config file for `mode` (or the defaults when `path` is the default and does not
/// exist), prints its warnings, then applies environment overrides. `fedmq run`, `data`, `train`
/// and `bench` load with [`LoadMode::Local`]; the commands of a distributed federation with
/// [`LoadMode::Distributed`].
pub fn load_config(path: &Path, mode: LoadMode) -> Result<Config> {
    let mut cfg = if path == Path::new(DEFAULT_CONFIG) && !path.exists() {
        tracing::info!("{DEFAULT_CONFIG} not found; using built-in defaults");
        Config::default()
    } else {
        Config::load_for(path, mode).with_context(|| format!("loading {}", path.display()))?
    };
    // One line per FedML key fedmq does not use or reads under its own name, and per setting a
    // local run leaves unused (stderr: `config check` prints YAML on stdout).
    for w in cfg.warnings() {
        eprintln!("warning: {w}");
    }
    cfg.apply_env();
    Ok(cfg)
}

/// `-c/--config` shared by subcommands.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Configuration file (FedML's fedml_config.yaml layout).
    #[arg(short, long = "config", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// This process's rank: 0 = server, 1.. = clients (overrides fedmq_args.rank); `auto`:
    /// from FEDMQ_RANK, a claim in FEDMQ_RANK_DIR, or a StatefulSet host name's ordinal + 1.
    #[arg(long, value_parser = parse_numbered)]
    pub rank: Option<Numbered>,
    /// Run id scoping MQTT topics and S3 keys (overrides common_args.run_id; env FEDMQ_RUN_ID).
    #[arg(long)]
    pub run_id: Option<String>,
}

/// A number given on the command line, or `auto` (derived where the process runs:
/// [`fedmq::deploy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbered {
    /// Derive it.
    Auto,
    /// This one.
    Given(usize),
}

/// Parses `--rank` and `--site`: a number or `auto`.
pub fn parse_numbered(s: &str) -> std::result::Result<Numbered, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Numbered::Auto);
    }
    s.parse()
        .map(Numbered::Given)
        .map_err(|_| format!("{s:?} is neither a number nor auto"))
}

/// Parses `--engine`.
pub fn parse_engine(s: &str) -> std::result::Result<fedmq::train::Engine, String> {
    match s.to_ascii_lowercase().as_str() {
        "auto" | "native" => Ok(fedmq::train::Engine::Auto),
        "candle" => Ok(fedmq::train::Engine::Candle),
        other => Err(format!("unknown engine {other:?}; valid: auto, candle")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Io {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(Io {
            path: "keys/a.key".into(),
            source: io,
        })
        .context("fedmq_args.signing_key");
        assert_eq!(format!("{e:#}").matches("No such file").count(), 2);
        assert_eq!(
            one_line(&e),
            "fedmq_args.signing_key: keys/a.key: No such file"
        );
    }
}
