//! Training throughput benchmark: forward + backward + optimizer step on one synthetic batch,
//! repeated, as the PyTorch reference (`scripts/torch_bench.py`) measures it. Any registered
//! model can be measured, on synthetic data shaped like the data set it trains on.
//!
//! ```no_run
//! use fedmq::bench::train::{bench_train, BenchOptions};
//! use fedmq::train::{ModelKind, ModelRef};
//! let report = bench_train(&ModelRef::from(ModelKind::Cnn), 32, BenchOptions::default())?;
//! println!("{}", serde_json::to_string(&report).unwrap());
//! # Ok::<(), fedmq::train::Error>(())
//! ```

use crate::data::{DataSpec, Dataset, DatasetKind, Input, Target};
use crate::train::trainer::{time_steps, Engine, TrainOptions};
use crate::train::{Error, Model, ModelRef, OptimizerConfig, Result};
use candle_core::Device;
use rand::{Rng, SeedableRng};

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
    /// Engine (the native CPU engine where the model has one; `candle` measures candle's CPU
    /// path).
    pub engine: Engine,
    /// The optimizer of each step (default: plain SGD, lr 0.01, as the PyTorch reference).
    pub optimizer: OptimizerConfig,
    /// The data set whose shape the synthetic batch takes; `None`: the first of MNIST,
    /// Shakespeare and MovieLens-100k the model takes.
    pub dataset: Option<DatasetKind>,
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
            dataset: None,
        }
    }
}

/// Benchmark result (the CLI prints it as one JSON object).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BenchReport {
    /// Model name (`lr`, `mlp`, `cnn`, `rnn`, `mf`, ...).
    pub model: String,
    /// The data set the batch is shaped like.
    pub dataset: DatasetKind,
    /// Engine asked for (`auto` = native on the CPU where the model has a native path).
    pub engine: Engine,
    /// Whether the native engine ran (false: candle).
    pub native: bool,
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

/// Measures training throughput of `model` at batch size `batch` on the CPU.
///
/// # Errors
/// [`Error::InvalidOption`] for a zero batch, runs or steps; [`Error::Unsupported`] when the
/// model does not take the data set; [`Error::ThreadPool`]; [`Error::Candle`] from the candle
/// engine.
pub fn bench_train(model: &ModelRef, batch: usize, opts: BenchOptions) -> Result<BenchReport> {
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
    let dataset = match opts.dataset {
        Some(kind) => kind,
        None => [
            DatasetKind::Mnist,
            DatasetKind::Shakespeare,
            DatasetKind::Movielens100k,
        ]
        .into_iter()
        .find(|k| model.params(&k.spec()).is_ok())
        .unwrap_or(DatasetKind::Mnist),
    };
    let data = Synthetic::new(dataset.spec(), batch, 1);
    let (model, varmap) = Model::init(model, &data.spec, 0, &Device::Cpu)?;
    let o = opts.optimizer;
    let train = TrainOptions {
        batch_size: batch,
        optimizer: o.kind,
        learning_rate: o.learning_rate,
        momentum: o.momentum,
        nesterov: o.nesterov,
        weight_decay: o.weight_decay,
        threads,
        engine: opts.engine,
        ..TrainOptions::default()
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("fedmq-bench-{i}"))
        .build()
        .map_err(|e| Error::ThreadPool {
            threads,
            reason: e.to_string(),
        })?;
    let runs = (opts.warmup, opts.runs, opts.steps_per_run);
    let seconds = pool.install(|| time_steps(&model, &varmap, &data, &train, runs))?;
    let mut rates: Vec<f64> = seconds
        .iter()
        .map(|s| (batch * opts.steps_per_run) as f64 / s.max(1e-12))
        .collect();
    rates.sort_by(f64::total_cmp);
    let median = if rates.len() % 2 == 1 {
        rates[rates.len() / 2]
    } else {
        (rates[rates.len() / 2 - 1] + rates[rates.len() / 2]) / 2.0
    };
    Ok(BenchReport {
        model: model.name().to_string(),
        dataset,
        engine: opts.engine,
        native: opts.engine == Engine::Auto && model.native_plan().is_some(),
        batch,
        samples_per_s: median,
        samples_per_s_min: rates[0],
        samples_per_s_max: rates[rates.len() - 1],
        runs: opts.runs,
        steps_per_run: opts.steps_per_run,
        threads,
        params: model.num_params(),
    })
}

/// `n` random samples shaped by a [`DataSpec`]: dense features in the range normalized pixels
/// take, token and id inputs below their vocabulary or cardinality, class labels, and whole
/// ratings for real targets.
struct Synthetic {
    spec: DataSpec,
    features: Vec<f32>,
    ids: Vec<u32>,
    labels: Vec<u32>,
    targets: Vec<f32>,
    classes: usize,
}

impl Synthetic {
    fn new(spec: DataSpec, n: usize, seed: u64) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let width: usize = spec.sample_shape.iter().product();
        let (features, ids): (Vec<f32>, Vec<u32>) = match &spec.input {
            Input::Dense => (
                (0..n * width)
                    .map(|_| rng.random_range(-0.5f32..2.8))
                    .collect(),
                Vec::new(),
            ),
            Input::Tokens { vocab } => {
                let ids: Vec<u32> = (0..n * width)
                    .map(|_| rng.random_range(0..*vocab as u32))
                    .collect();
                (ids.iter().map(|&t| t as f32).collect(), ids)
            }
            Input::Ids { cardinalities } => {
                let ids: Vec<u32> = (0..n * width)
                    .map(|j| rng.random_range(0..cardinalities[j % width].max(1) as u32))
                    .collect();
                (ids.iter().map(|&t| t as f32).collect(), ids)
            }
        };
        let (classes, labels, targets) = match &spec.target {
            Target::Classes { classes } => {
                let labels = (0..n)
                    .map(|_| rng.random_range(0..(*classes).max(1) as u32))
                    .collect();
                (*classes, labels, Vec::new())
            }
            Target::Real { min, max } => {
                let levels = (max - min).round().max(0.0) as u32 + 1;
                let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..levels)).collect();
                let targets = labels.iter().map(|&l| min + l as f32).collect();
                (levels as usize, labels, targets)
            }
        };
        Self {
            spec,
            features,
            ids,
            labels,
            targets,
            classes,
        }
    }

    fn width(&self) -> usize {
        self.spec.sample_shape.iter().product()
    }
}

impl Dataset for Synthetic {
    fn name(&self) -> &str {
        "synthetic"
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.classes
    }

    fn sample_shape(&self) -> &[usize] {
        &self.spec.sample_shape
    }

    fn labels(&self) -> &[u32] {
        &self.labels
    }

    fn gather_features(&self, idx: &[usize], out: &mut Vec<f32>) {
        let w = self.width();
        for &i in idx {
            out.extend_from_slice(&self.features[i * w..(i + 1) * w]);
        }
    }

    fn input(&self) -> Input {
        self.spec.input.clone()
    }

    fn target(&self) -> Target {
        self.spec.target.clone()
    }

    fn gather_ids(&self, idx: &[usize], out: &mut Vec<u32>) {
        let w = self.width();
        if !self.ids.is_empty() {
            for &i in idx {
                out.extend_from_slice(&self.ids[i * w..(i + 1) * w]);
            }
        }
    }

    fn gather_targets(&self, idx: &[usize], out: &mut Vec<f32>) {
        match &self.spec.target {
            Target::Real { .. } => out.extend(idx.iter().map(|&i| self.targets[i])),
            Target::Classes { .. } => out.extend(idx.iter().map(|&i| self.labels[i] as f32)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::ModelKind;

    fn small(engine: Engine) -> BenchOptions {
        BenchOptions {
            warmup: 0,
            runs: 2,
            steps_per_run: 2,
            threads: 2,
            engine,
            ..Default::default()
        }
    }

    #[test]
    fn small_bench_runs() {
        let mlp = ModelRef::from(ModelKind::Mlp);
        for engine in [Engine::Auto, Engine::Candle] {
            let r = bench_train(&mlp, 8, small(engine)).unwrap();
            assert!(r.samples_per_s > 0.0 && r.samples_per_s_min <= r.samples_per_s_max);
            assert_eq!((r.params, r.threads, r.runs), (199_210, 2, 2));
            assert_eq!(
                (r.dataset, r.native),
                (DatasetKind::Mnist, engine == Engine::Auto)
            );
        }
        assert!(bench_train(&mlp, 0, BenchOptions::default()).is_err());
    }

    #[test]
    fn models_beyond_images_get_their_data_shape() {
        let registry = crate::train::Registry::default();
        let mf = registry.get("mf").unwrap();
        let r = bench_train(&mf, 16, small(Engine::Candle)).unwrap();
        assert_eq!(
            (r.model.as_str(), r.dataset),
            ("mf", DatasetKind::Movielens100k)
        );
        assert!(r.samples_per_s > 0.0);
        // A model and a data set it does not take: the model's own error.
        let err = bench_train(
            &ModelRef::from(ModelKind::Cnn),
            4,
            BenchOptions {
                dataset: Some(DatasetKind::Movielens100k),
                ..small(Engine::Auto)
            },
        )
        .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }
}
