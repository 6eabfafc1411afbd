//! `fedmq run` (the whole federation in one process), `fedmq server` and `fedmq client` (the
//! same roles as separate processes against any broker and S3 endpoint).

use super::{load_config_args, ConfigArg};
use anyhow::{bail, Context, Result};
use fedmq::config::{Config, LoadMode};
use fedmq::federation::{self, LocalOptions};
use fedmq::metrics::summary_table;
use fedmq::server::{Outcome, Progress, ServerReport};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Output directory for metrics.jsonl, metrics.csv, plot.svg, final_model.safetensors (and,
    /// with the embedded store, its data). Default: <tracking_args.log_file_dir>/<run_id>.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Override train_args.comm_round.
    #[arg(long)]
    rounds: Option<usize>,
    /// Override train_args.client_num_in_total (and client_num_per_round when it was equal).
    #[arg(long)]
    clients: Option<usize>,
    /// Override model_args.model.
    #[arg(long)]
    model: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Output directory (as for `fedmq run`).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Continue after the newest checkpoint of this run in the store.
    #[arg(long)]
    resume: bool,
    /// Answer GET /healthz, /readyz and /metrics here, e.g. 0.0.0.0:9464 (overrides
    /// fedmq_args.health_listen).
    #[arg(long)]
    health: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(Debug, clap::Args)]
pub struct EdgeArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// This edge (1..=train_args.group_num), or `auto`: from FEDMQ_SITE, a claim in
    /// FEDMQ_RANK_DIR, or a StatefulSet host name's ordinal + 1.
    #[arg(long, value_parser = super::parse_numbered)]
    site: super::Numbered,
    /// Output directory for the site's metrics (default: <log_file_dir>/<run_id>/<run_id>-edge-<site>).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Answer GET /healthz, /readyz and /metrics here, e.g. 0.0.0.0:9464 (overrides
    /// fedmq_args.health_listen).
    #[arg(long)]
    health: Option<String>,
}

fn output_dir(cfg: &Config, o: Option<PathBuf>) -> PathBuf {
    o.unwrap_or_else(|| {
        PathBuf::from(&cfg.tracking_args.log_file_dir).join(&cfg.common_args.run_id)
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Cancels `token` on Ctrl-C (a second Ctrl-C exits at once).
fn cancel_on_ctrl_c(token: CancellationToken) {
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: finishing the run (Ctrl-C again to exit at once)");
            token.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
}

pub fn run(a: RunArgs) -> Result<()> {
    let mut cfg = load_config_args(&a.config, LoadMode::Local)?;
    if let Some(r) = a.rounds {
        cfg.train_args.comm_round = r;
    }
    if let Some(n) = a.clients {
        if cfg.train_args.client_num_per_round == cfg.train_args.client_num_in_total
            || cfg.train_args.client_num_per_round > n
        {
            cfg.train_args.client_num_per_round = n;
        }
        cfg.train_args.client_num_in_total = n;
    }
    if let Some(m) = a.model {
        cfg.model_args.model = m;
    }
    cfg.validate()?;
    let out = output_dir(&cfg, a.output);
    let t = &cfg.train_args;
    let d = &cfg.data_args;
    eprintln!(
        "fedmq run: {} clients ({} per round), {} {} partitions{}, model {}, {} rounds of {} epoch(s); output {}",
        t.client_num_in_total,
        t.client_num_per_round,
        d.dataset,
        d.partition_method,
        if d.partition_method == "hetero" {
            format!(" (alpha {})", d.partition_alpha)
        } else {
            String::new()
        },
        cfg.model_args.model,
        t.comm_round,
        t.epochs,
        out.display()
    );
    let rt = runtime()?;
    let report = rt.block_on(async {
        let cancel = CancellationToken::new();
        cancel_on_ctrl_c(cancel.clone());
        let mut ui = Ui::new(&cfg);
        let opts = LocalOptions {
            fetch_progress: true,
            ..LocalOptions::new(out.clone())
        };
        federation::run_local(&cfg, &opts, |p| ui.on(p), cancel).await
    })?;
    let failed: Vec<String> = report
        .clients
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("client-{}: {e}", i + 1)))
        .collect();
    for f in &failed {
        eprintln!("warning: {f}");
    }
    eprintln!("broker: {}; store: {}", report.broker, report.store);
    finish(&report.server, &out)
}

pub fn server(a: ServerArgs) -> Result<()> {
    let mut cfg = load_config_args(&a.config, LoadMode::Distributed)?;
    if let Some(h) = a.health {
        cfg.fedmq_args.health_listen = h;
        cfg.validate()?;
    }
    let out = output_dir(&cfg, a.output);
    let rt = runtime()?;
    let report = rt.block_on(async {
        let cancel = CancellationToken::new();
        cancel_on_ctrl_c(cancel.clone());
        let mut ui = Ui::new(&cfg);
        federation::run_server_from_config(&cfg, Some(out.clone()), a.resume, |p| ui.on(p), cancel)
            .await
    })?;
    finish(&report, &out)
}

pub fn client(a: ClientArgs) -> Result<()> {
    let cfg = load_config_args(&a.config, LoadMode::Distributed)?;
    let rt = runtime()?;
    let report = rt.block_on(async {
        let cancel = CancellationToken::new();
        cancel_on_ctrl_c(cancel.clone());
        federation::run_client_from_config(&cfg, cancel).await
    })?;
    eprintln!(
        "client-{}: {} round(s) reported; {}",
        cfg.fedmq_args.rank, report.rounds_reported, report.reason
    );
    if report.reason.starts_with("aborted") {
        bail!("the run was aborted: {}", report.reason);
    }
    Ok(())
}

pub fn edge(a: EdgeArgs) -> Result<()> {
    let mut cfg = load_config_args(&a.config, LoadMode::Distributed)?;
    if let Some(h) = a.health {
        cfg.fedmq_args.health_listen = h;
        cfg.validate()?;
    }
    let site = match a.site {
        super::Numbered::Given(k) => k,
        super::Numbered::Auto => {
            use fedmq::deploy::{derive, Environment, Ordinal};
            let k = derive(
                Ordinal::Site,
                cfg.train_args.group_num.max(1),
                &Environment::current(Ordinal::Site),
            )?;
            tracing::info!(site = k, "site derived (--site auto)");
            k
        }
    };
    let out = a.output.unwrap_or_else(|| {
        output_dir(&cfg, None).join(fedmq::edge::edge_id(&cfg.common_args.run_id, site))
    });
    let rt = runtime()?;
    let report = rt.block_on(async {
        let cancel = CancellationToken::new();
        cancel_on_ctrl_c(cancel.clone());
        let id = fedmq::edge::edge_id(&cfg.common_args.run_id, site);
        fedmq::edge::run_edge_from_config(
            &cfg,
            site,
            Some(out.clone()),
            |p| {
                if let Progress::RoundClosed(r) = p {
                    eprintln!(
                        "{id}: site round {} closed: {} devices, {} failed, {:.1} s",
                        r.round, r.participants, r.failures, r.round_s
                    );
                }
            },
            cancel,
        )
        .await
    })?;
    let id = fedmq::edge::edge_id(&cfg.common_args.run_id, site);
    eprintln!(
        "{id}: {} site round(s); site {}; metrics in {}",
        report.site.records.len(),
        report.site.outcome.summary(),
        out.display()
    );
    match report.cloud {
        Ok(r) if r.reason.starts_with("aborted") => bail!("{id}: {}", r.reason),
        Ok(r) => {
            eprintln!(
                "{id}: {} cloud round(s) reported; {}",
                r.rounds_reported, r.reason
            );
            Ok(())
        }
        Err(e) => bail!("{id}: its cloud client failed: {e}"),
    }
}

fn finish(report: &ServerReport, out: &std::path::Path) -> Result<()> {
    if !report.records.is_empty() {
        println!("{}", summary_table(&report.records));
    }
    eprintln!(
        "wall time {:.1} s; metrics in {}/metrics.jsonl, metrics.csv, plot.svg{}",
        report.wall_s,
        out.display(),
        report
            .final_path
            .as_ref()
            .map(|p| format!("; final model {}", p.display()))
            .unwrap_or_default()
    );
    match &report.outcome {
        Outcome::Completed => Ok(()),
        Outcome::Aborted(r) => bail!("the run was aborted: {r}"),
        Outcome::Stopped(r) => {
            eprintln!("the run stopped early: {r}; the model so far is the final model");
            Ok(())
        }
    }
}

/// Progress bars: one for admission, then one per round (updates folded of clients asked).
struct Ui {
    multi: MultiProgress,
    bar: Option<ProgressBar>,
    rounds: usize,
    tty: bool,
}

impl Ui {
    fn new(cfg: &Config) -> Self {
        let tty = std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        Self {
            multi,
            bar: None,
            rounds: cfg.train_args.comm_round,
            tty,
        }
    }

    fn line(&self, s: String) {
        if self.tty {
            let _ = self.multi.println(s);
        } else {
            eprintln!("{s}");
        }
    }

    fn on(&mut self, p: &Progress) {
        match p {
            Progress::Admitting { online, needed } => {
                let bar = self.bar.get_or_insert_with(|| {
                    let b = self.multi.add(ProgressBar::new(*needed as u64));
                    b.set_style(
                        ProgressStyle::with_template("waiting for clients {bar:30} {pos}/{len}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    b
                });
                bar.set_position(*online as u64);
            }
            Progress::RoundStarted { round, selected } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                let b = self.multi.add(ProgressBar::new(*selected as u64));
                b.set_style(
                    ProgressStyle::with_template(
                        "round {prefix} {bar:30.cyan/blue} {pos}/{len} updates  {elapsed}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b.set_prefix(format!("{round}/{}", self.rounds));
                b.enable_steady_tick(std::time::Duration::from_millis(200));
                self.bar = Some(b);
            }
            Progress::UpdateFolded { .. } => {
                if let Some(b) = &self.bar {
                    b.inc(1);
                }
            }
            Progress::RoundClosed(r) => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                let acc = r
                    .test_accuracy
                    .map(|a| {
                        format!(
                            "test acc {:6.2}%  loss {:.4}",
                            a * 100.0,
                            r.test_loss.unwrap_or(f64::NAN)
                        )
                    })
                    .or_else(|| fedmq::metrics::client_eval_text(r))
                    .unwrap_or_else(|| "not evaluated".into());
                // What a defense or privacy adds to the round: the spent ε, the backdoor's
                // success.
                let mut extra = String::new();
                if let Some(e) = r.strategy.get("dp_epsilon") {
                    extra.push_str(&format!("  ε {e:.3}"));
                }
                if let Some(b) = r.strategy.get("backdoor_success") {
                    extra.push_str(&format!("  backdoor {:5.1}%", b * 100.0));
                }
                self.line(format!(
                    "round {:>3}/{}  {acc}{extra}  train loss {}  {:6.1} s  {} clients  {} failed{}",
                    r.round,
                    self.rounds,
                    r.train_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    r.round_s,
                    r.participants,
                    r.failures,
                    match r.failed_clients.as_slice() {
                        [] => String::new(),
                        few @ [_, ..] if few.len() <= 5 => format!(" ({})", few.join(", ")),
                        many => format!(
                            " ({} and {} more)",
                            many[..5].join(", "),
                            many.len() - 5
                        ),
                    }
                ));
            }
            Progress::Finished(_) => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
            }
        }
    }
}
