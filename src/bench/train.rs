//! Training throughput benchmark: forward + backward + SGD step on synthetic MNIST-shaped
//! batches, as the PyTorch reference measures it.
//!
//! ```no_run
//! use fedmq::bench::train::{bench_train, BenchOptions};
//! use fedmq::train::ModelKind;
//! let report = bench_train(ModelKind::Cnn, 32, BenchOptions::default())?;
//! println!("{}", serde_json::to_string(&report).unwrap());
//! # Ok::<(), fedmq::train::Error>(())
//! ```

use crate::train::trainer::{arch_for, Engine};
use crate::train::TensorOptimizer;
use crate::train::{init_params, Error, Model, ModelKind, NativeNet, OptimizerConfig, Result};
use candle_core::{Device, Module, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// MNIST's sample shape and classes.
const SHAPE: [usize; 3] = [1, 28, 28];
const CLASSES: usize = 10;

/// How to run the benchmark.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct BenchOptions {
    /// Runs before measuring (not reported).
    pub warmup: usize,
    /// Measured runs; the report gives their median, minimum and maximum.
    pub runs: usize,
    /// Training steps per run.
    pub steps_per_run: usize,
    /// Threads; 0 = rayon's default (`RAYON_NUM_THREADS` or the number of cores). The candle
    /// engine sizes its own element-wise pool from `RAYON_NUM_THREADS` only.
    pub threads: usize,
    /// Engine (the native CPU engine by default; `candle` measures candle's CPU path).
    pub engine: Engine,
    /// The optimizer of each step (default: plain SGD, lr 0.01, as the PyTorch reference).
    pub optimizer: OptimizerConfig,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            warmup: 2,
            runs: 5,
            steps_per_run: 50,
            threads: 0,
            engine: Engine::Auto,
            optimizer: OptimizerConfig::default(),
        }
    }
}

/// Benchmark result (the CLI prints it as one JSON object).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BenchReport {
    /// Model name (`lr`, `mlp`, `cnn`).
    pub model: ModelKind,
    /// Engine used (`auto` = native on the CPU).
    pub engine: Engine,
    /// Samples per step.
    pub batch: usize,
    /// Median over the measured runs.
    pub samples_per_s: f64,
    /// Slowest run.
    pub samples_per_s_min: f64,
    /// Fastest run.
    pub samples_per_s_max: f64,
    /// Measured runs.
    pub runs: usize,
    /// Steps per run.
    pub steps_per_run: usize,
    /// Threads used.
    pub threads: usize,
    /// Parameters of the model.
    pub params: usize,
}

/// Measures training throughput of `kind` at batch size `batch` on the CPU.
///
/// # Errors
/// [`Error::InvalidOption`] for a zero batch, runs or steps; [`Error::ThreadPool`];
/// [`Error::Candle`] from the candle engine.
pub fn bench_train(kind: ModelKind, batch: usize, opts: BenchOptions) -> Result<BenchReport> {
    for (field, v) in [
        ("batch", batch),
        ("runs", opts.runs),
        ("steps_per_run", opts.steps_per_run),
    ] {
        if v == 0 {
            return Err(Error::InvalidOption {
                field,
                reason: "must be at least 1".into(),
            });
        }
    }
    opts.optimizer.validate()?;
    let threads = if opts.threads == 0 {
        rayon::current_num_threads()
    } else {
        opts.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("fedmq-bench-{i}"))
        .build()
        .map_err(|e| Error::ThreadPool {
            threads,
            reason: e.to_string(),
        })?;
    let arch = arch_for(kind, &SHAPE, CLASSES)?;
    let params = init_params(kind, &SHAPE, CLASSES, 0)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let d: usize = SHAPE.iter().product();
    let features: Vec<f32> = (0..batch * d)
        .map(|_| rng.random_range(-0.5f32..2.8))
        .collect();
    let labels: Vec<u32> = (0..batch)
        .map(|_| rng.random_range(0..CLASSES as u32))
        .collect();

    let mut step: Box<dyn FnMut() -> Result<()> + Send> = match opts.engine {
        Engine::Auto => {
            let mut net = NativeNet::new(&arch, &params, threads)?;
            net.set_optimizer(opts.optimizer);
            net.input().extend_from_slice(&features);
            let labels = labels.clone();
            Box::new(move || {
                net.train_step(&labels);
                Ok(())
            })
        }
        Engine::Candle => {
            let dev = Device::Cpu;
            let varmap = params.to_varmap(&dev)?;
            let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev);
            let model = Model::new(kind, &SHAPE, CLASSES, vb)?;
            let vars = {
                let map = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
                model
                    .param_specs()
                    .iter()
                    .filter_map(|s| map.get(&s.name).cloned())
                    .collect()
            };
            let mut opt = TensorOptimizer::new(vars, opts.optimizer)?;
            let xs = Tensor::from_slice(&features, (batch, SHAPE[0], SHAPE[1], SHAPE[2]), &dev)?;
            let ys = Tensor::from_slice(&labels, batch, &dev)?;
            Box::new(move || {
                let loss = candle_nn::loss::cross_entropy(&model.forward(&xs)?, &ys)?;
                opt.step(&loss.backward()?)?;
                Ok(())
            })
        }
    };

    let mut rates = Vec::with_capacity(opts.runs);
    pool.install(|| -> Result<()> {
        for run in 0..opts.warmup + opts.runs {
            let start = Instant::now();
            for _ in 0..opts.steps_per_run {
                step()?;
            }
            let secs = start.elapsed().as_secs_f64();
            if run >= opts.warmup {
                rates.push((batch * opts.steps_per_run) as f64 / secs.max(1e-12));
            }
        }
        Ok(())
    })?;
    rates.sort_by(f64::total_cmp);
    let median = if rates.len() % 2 == 1 {
        rates[rates.len() / 2]
    } else {
        (rates[rates.len() / 2 - 1] + rates[rates.len() / 2]) / 2.0
    };
    Ok(BenchReport {
        model: kind,
        engine: opts.engine,
        batch,
        samples_per_s: median,
        samples_per_s_min: rates[0],
        samples_per_s_max: rates[rates.len() - 1],
        runs: opts.runs,
        steps_per_run: opts.steps_per_run,
        threads,
        params: params.num_params(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bench_runs() {
        for engine in [Engine::Auto, Engine::Candle] {
            let r = bench_train(
                ModelKind::Mlp,
                8,
                BenchOptions {
                    warmup: 0,
                    runs: 2,
                    steps_per_run: 2,
                    threads: 2,
                    engine,
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(r.samples_per_s > 0.0 && r.samples_per_s_min <= r.samples_per_s_max);
            assert_eq!((r.params, r.threads, r.runs), (199_210, 2, 2));
        }
        assert!(bench_train(ModelKind::Lr, 0, BenchOptions::default()).is_err());
    }
}
