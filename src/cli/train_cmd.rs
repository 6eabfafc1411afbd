//! `fedmq train`: central training on the whole training set, the baseline for a federation.

use super::{load_config_args, ConfigArg};
use anyhow::{Context, Result};
use fedmq::config::LoadMode;
use fedmq::data::{self, DatasetKind, FetchOptions};
use fedmq::train::{self, Engine, OptimizerKind, TrainOptions};

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Override model_args.model (lr | mlp | cnn).
    #[arg(long)]
    model: Option<String>,
    /// Override data_args.dataset.
    #[arg(long)]
    dataset: Option<String>,
    /// Override train_args.epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override train_args.batch_size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Override train_args.learning_rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Override train_args.client_optimizer (sgd | adam).
    #[arg(long)]
    optimizer: Option<String>,
    /// Override train_args.momentum.
    #[arg(long)]
    momentum: Option<f64>,
    /// Override common_args.random_seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Train on the GPU (device_args.using_gpu); needs a build with --features cuda.
    #[arg(long)]
    gpu: bool,
    /// Print one JSON object per epoch instead of a table.
    #[arg(long)]
    json: bool,
    /// Training implementation on the CPU: `auto` (fedmq's native CPU engine) or `candle`.
    #[arg(long, default_value = "auto", value_parser = super::parse_engine)]
    engine: Engine,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let mut cfg = load_config_args(&a.config, LoadMode::Local)?;
    let t = &mut cfg.train_args;
    if let Some(v) = a.model {
        cfg.model_args.model = v;
    }
    if let Some(v) = a.dataset {
        cfg.data_args.dataset = v;
    }
    if let Some(v) = a.epochs {
        t.epochs = v;
    }
    if let Some(v) = a.batch_size {
        t.batch_size = v;
    }
    if let Some(v) = a.lr {
        t.learning_rate = v;
    }
    if let Some(v) = a.optimizer {
        t.client_optimizer = v;
    }
    if let Some(v) = a.momentum {
        t.momentum = v;
    }
    if let Some(v) = a.seed {
        cfg.common_args.random_seed = v;
    }
    if a.gpu {
        cfg.device_args.using_gpu = true;
    }
    cfg.validate()?;

    let kind: DatasetKind = cfg.data_args.dataset.parse()?;
    let model = fedmq::federation::model_def(&cfg, &train::Registry::default())?;
    let split = data::load(
        kind,
        &cfg.data_cache_dir(),
        cfg.data_args.auto_fetch,
        &FetchOptions { progress: !a.json },
    )?;
    let (device, device_desc) =
        train::select_device(cfg.device_args.using_gpu, cfg.device_args.gpu_id);
    let t = &cfg.train_args;
    let opts = TrainOptions {
        epochs: t.epochs,
        batch_size: t.batch_size,
        optimizer: t.client_optimizer.parse::<OptimizerKind>()?,
        learning_rate: t.learning_rate,
        momentum: t.momentum,
        weight_decay: t.weight_decay,
        seed: cfg.common_args.random_seed,
        engine: a.engine,
        ..TrainOptions::default()
    };
    if !a.json {
        eprintln!(
            "training {} on {} ({} train / {} test samples) on {device_desc} ({:?} engine): {} epochs, batch {}, {} lr {}",
            cfg.model_args.model,
            split.train.name(),
            split.train.len(),
            split.test.len(),
            opts.engine,
            opts.epochs,
            opts.batch_size,
            t.client_optimizer,
            opts.learning_rate
        );
    }
    let json = a.json;
    train::train_central(&split, &model, &opts, &device, |e| {
        if json {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
        } else if e.test_rmse.is_finite() {
            println!(
                "epoch {:>3}  train_loss {:.4}  test_rmse {:.4}  test_mae {:.4}  {:.1} s  {:.0} samples/s",
                e.epoch, e.train_loss, e.test_rmse, e.test_mae, e.seconds, e.samples_per_s
            );
        } else {
            println!(
                "epoch {:>3}  train_loss {:.4}  test_loss {:.4}  test_accuracy {:.2}%  {:.1} s  {:.0} samples/s",
                e.epoch,
                e.train_loss,
                e.test_loss,
                e.test_accuracy * 100.0,
                e.seconds,
                e.samples_per_s
            );
        }
    })
    .context("central training")?;
    Ok(())
}
