//! Training throughput (forward + backward + SGD step on synthetic MNIST-shaped batches), printed
//! as one JSON object, until `fedmq bench` exposes the same function.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example bench_train -- cnn 32 [native|candle] [threads] [steps_per_run]
//! ```

use anyhow::Result;
use fedmq::bench::train::{bench_train, BenchOptions};
use fedmq::train::{Engine, ModelKind};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let kind: ModelKind = arg(1).unwrap_or("cnn").parse()?;
    let batch: usize = arg(2).map(str::parse).transpose()?.unwrap_or(32);
    let engine = match arg(3) {
        Some("candle") => Engine::Candle,
        _ => Engine::Auto,
    };
    let threads: usize = arg(4).map(str::parse).transpose()?.unwrap_or(0);
    let steps_per_run: usize = arg(5).map(str::parse).transpose()?.unwrap_or(20);
    let report = bench_train(
        kind,
        batch,
        BenchOptions {
            threads,
            engine,
            steps_per_run,
            ..BenchOptions::default()
        },
    )?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
