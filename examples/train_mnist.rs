//! Central (non-federated) training on MNIST with the recommended hyper-parameters, printing one
//! JSON line per epoch: the check behind `TrainOptions::recommended`.
//!
//! ```text
//! cargo run --release --example train_mnist -- cnn [epochs] [seed]
//! ```
//!
//! Reads MNIST from fedmq's data cache (`~/.cache/fedmq/data/mnist`), fetching it if missing.

use anyhow::{Context, Result};
use fedmq::data::{default_cache_dir, load, DatasetKind, FetchOptions};
use fedmq::train::{select_device, train_central, ModelKind, TrainOptions};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let kind: ModelKind = args.get(1).map(String::as_str).unwrap_or("cnn").parse()?;
    let epochs: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let seed: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(0);

    let split = load(
        DatasetKind::Mnist,
        &default_cache_dir(),
        true,
        &FetchOptions::default(),
    )
    .context("loading MNIST")?;
    let (device, description) = select_device(false, 0);
    eprintln!("training {kind} on {description}");
    let opts = TrainOptions {
        epochs,
        seed,
        ..TrainOptions::recommended(kind)
    };
    eprintln!("{}", serde_json::to_string(&opts)?);
    train_central(&split, &kind.into(), &opts, &device, |e| {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
    })?;
    Ok(())
}
