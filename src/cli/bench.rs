//! `fedmq bench ...`: benchmarks printing one JSON object per configuration.

use anyhow::Result;
use clap::Subcommand;
use fedmq::bench::train::{bench_train, BenchOptions};
use fedmq::config::LoadMode;
use fedmq::data::DatasetKind;
use fedmq::train::{Engine, Registry};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Training throughput: forward + backward + SGD step on synthetic batches shaped like the
    /// model's data set (MNIST for the image models, Shakespeare for rnn, MovieLens-100k for
    /// mf). Prints {"model","batch","samples_per_s",...} with the median over timed runs after
    /// warm-up.
    Train {
        /// lr | mlp | cnn | rnn | mf (any registered model)
        #[arg(long, default_value = "cnn")]
        model: String,
        /// The data set whose shape the batches take (default: the model's own).
        #[arg(long)]
        dataset: Option<String>,
        /// Mini-batch size.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// Untimed warm-up runs.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Steps per timed run (0: the library default).
        #[arg(long, default_value_t = 0)]
        steps: usize,
        /// Compute threads (0: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// `auto` (fedmq's native CPU engine) or `candle` (candle's autograd on the CPU).
        #[arg(long, default_value = "auto", value_parser = super::parse_engine)]
        engine: Engine,
    },
    /// Blob put+get throughput against the embedded store (or an S3 endpoint).
    Blob(super::store_cmd::BenchBlobArgs),
    /// Control-message round-trip latency through a broker.
    Mqtt(super::broker_cmd::BenchMqttArgs),
    /// Whole federated rounds with a no-op trainer: round time, bytes and peak memory.
    Round(super::bench_round_cmd::RoundArgs),
    /// Learning quality of strategies side by side: a local federation per (strategy,
    /// partition) with real training; rounds to a target accuracy, final accuracy, and one
    /// figure (strategies.json, strategies.md, strategies.svg in --out).
    Strategies(StrategiesArgs),
    /// Every attack against every defense: a local federation per (attack, attackers,
    /// defense) with real training and real attacking clients; final accuracy and backdoor
    /// success as JSON, Markdown and a heat map (robustness.json, .md, .svg in --out).
    Robustness(RobustnessArgs),
}

#[derive(Debug, clap::Args)]
pub struct RobustnessArgs {
    #[command(flatten)]
    config: super::ConfigArg,
    /// Attacks as attack_type[:attack_mode], comma-separated (the clean run is added).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "byzantine:zero,byzantine:random,byzantine:flip,byzantine:scale,label_flipping,model_replacement,norm_constrained_backdoor"
    )]
    attacks: Vec<String>,
    /// Defenses (defense_args.defense_type names, none for plain aggregation), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,median,trimmed_mean,krum,multikrum,geo_median,norm_diff_clipping,cclip,foolsgold,fltrust,barfed,weak_dp"
    )]
    defenses: Vec<String>,
    /// Numbers of attacking clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,3")]
    malicious: Vec<usize>,
    /// Rounds per run (0: the config's comm_round).
    #[arg(long, default_value_t = 0)]
    rounds: usize,
    /// Output directory.
    #[arg(long, default_value = "out/bench-robustness")]
    out: std::path::PathBuf,
    /// Run nothing: merge these robustness.json files (a later file's cell replaces an
    /// earlier one's) and write the table, JSON and heat map to --out.
    #[arg(long, value_delimiter = ',')]
    merge: Vec<std::path::PathBuf>,
}

fn run_robustness(a: RobustnessArgs) -> Result<()> {
    let mut base = super::load_config_args(&a.config, LoadMode::Local)?;
    if a.rounds > 0 {
        base.train_args.comm_round = a.rounds;
    }
    let bench = fedmq::bench::robustness::RobustnessBench {
        base,
        attacks: a.attacks,
        defenses: a.defenses,
        malicious: a.malicious,
        out: a.out,
    };
    if !a.merge.is_empty() {
        let cells = fedmq::bench::robustness::merge(&a.merge)?;
        std::fs::create_dir_all(&bench.out)?;
        fedmq::bench::robustness::write_outputs(&bench, &cells)?;
        println!("{}", fedmq::bench::robustness::markdown(&cells));
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let stop = cancel.clone();
    rt.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stop.cancel();
        }
    });
    let cells = rt.block_on(fedmq::bench::robustness::run(&bench, cancel))?;
    eprintln!(
        "{}\n{} runs; table, JSON and heat map in {}",
        fedmq::bench::robustness::markdown(&cells),
        cells.len(),
        bench.out.display()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct StrategiesArgs {
    #[command(flatten)]
    config: super::ConfigArg,
    /// Strategies (train_args.federated_optimizer names), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "FedAvg,FedAvgM,FedProx,FedAdam,FedYogi,FedAdagrad,SCAFFOLD,FedNova,FedBuff"
    )]
    strategies: Vec<String>,
    /// Partitions: homo, pathological or hetero:<alpha>, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "hetero:0.1,hetero:0.5",
          value_parser = parse_partition)]
    partitions: Vec<fedmq::bench::strategies::Partition>,
    /// Rounds per run.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Target test accuracy, in percent.
    #[arg(long, default_value_t = 97.0)]
    target: f64,
    /// Output directory.
    #[arg(long, default_value = "out/bench-strategies")]
    out: std::path::PathBuf,
}

fn parse_partition(s: &str) -> Result<fedmq::bench::strategies::Partition, String> {
    fedmq::bench::strategies::Partition::parse(s)
}

fn run_strategies(a: StrategiesArgs) -> Result<()> {
    let base = super::load_config_args(&a.config, LoadMode::Local)?;
    let bench = fedmq::bench::strategies::StrategyBench {
        base,
        strategies: a.strategies,
        partitions: a.partitions,
        rounds: a.rounds,
        target: a.target / 100.0,
        out: a.out,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let runs = rt.block_on(fedmq::bench::strategies::run(&bench, cancel))?;
    eprintln!(
        "{}\n{} runs; table, JSON and figure in {}",
        fedmq::bench::strategies::markdown_table(&runs, bench.target),
        runs.len(),
        bench.out.display()
    );
    Ok(())
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train {
            model,
            dataset,
            batch,
            runs,
            warmup,
            steps,
            threads,
            engine,
        } => {
            let model = Registry::default().get(&model)?;
            let dataset = dataset.map(|d| d.parse::<DatasetKind>()).transpose()?;
            let defaults = BenchOptions::default();
            let report = bench_train(
                &model,
                batch,
                BenchOptions {
                    warmup,
                    runs,
                    steps_per_run: if steps == 0 {
                        defaults.steps_per_run
                    } else {
                        steps
                    },
                    threads,
                    engine,
                    dataset,
                    ..defaults
                },
            )?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        BenchCommand::Blob(a) => super::store_cmd::run_bench_blob(a),
        BenchCommand::Mqtt(a) => super::broker_cmd::run_bench_mqtt(a),
        BenchCommand::Round(a) => super::bench_round_cmd::run(a),
        BenchCommand::Strategies(a) => run_strategies(a),
        BenchCommand::Robustness(a) => run_robustness(a),
    }
}
