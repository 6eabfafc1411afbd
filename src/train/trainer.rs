//! The local trainer, evaluation, central (non-federated) training and device selection.
//!
//! [`train_local`] is what a client runs each round: `epochs` passes over its samples in
//! mini-batches, shuffled per epoch from `(seed, epoch)`, minimizing the mean cross-entropy.
//! It checks an interrupt flag between batches and reports an interrupted run as an outcome,
//! not an error.

use super::model::{Model, ModelKind};
use super::native::{BatchStats, NativeNet, Plan};
use super::optim::{OptimizerConfig, OptimizerKind, TensorOptimizer};
use super::registry::ModelRef;
use super::{Error, Result};
use crate::data::{DataSpec, DataSplit, Dataset, Input, Target};
use crate::tensor::ParamSet;
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand_chacha::rand_core::SeedableRng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Which implementation trains and evaluates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// The native engine on the CPU, candle elsewhere.
    #[default]
    Auto,
    /// candle's autograd and [`TensorOptimizer`] on any device (slower on the CPU).
    Candle,
}

/// Hyper-parameters of local training (FedML's `train_args`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrainOptions {
    /// Passes over the samples (FedML `epochs`).
    pub epochs: usize,
    /// Samples per mini-batch; the last batch of an epoch may be smaller (FedML `batch_size`).
    pub batch_size: usize,
    /// FedML `client_optimizer`.
    pub optimizer: OptimizerKind,
    /// FedML `learning_rate`.
    pub learning_rate: f64,
    /// SGD momentum (FedML `momentum`, 0 = none).
    pub momentum: f64,
    /// L2 penalty added to the gradient (FedML `weight_decay`).
    pub weight_decay: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
    /// Seed of the per-epoch shuffles (and of the initial model in [`train_central`]).
    pub seed: u64,
    /// CPU threads for the native engine; 0 = rayon's default (`RAYON_NUM_THREADS` or the
    /// number of cores).
    pub threads: usize,
    /// Which implementation to use.
    pub engine: Engine,
    /// FedProx's proximal coefficient `μ` (0 = none): the loss gains `(μ/2)·‖w − w₀‖²`, `w₀`
    /// being the parameters training started from (the round's global model).
    pub proximal_mu: f64,
    /// A constant added to every gradient, named as the model's parameters (SCAFFOLD's
    /// `c − cᵢ`); `None` for none. Not part of a serialized configuration.
    #[serde(skip)]
    pub grad_offset: Option<std::sync::Arc<ParamSet>>,
}

impl Default for TrainOptions {
    /// The `cnn` recommendation ([`TrainOptions::recommended`]), one epoch, seed 0.
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            optimizer: OptimizerKind::Sgd,
            learning_rate: 0.01,
            momentum: 0.9,
            weight_decay: 0.0,
            nesterov: false,
            seed: 0,
            threads: 0,
            engine: Engine::Auto,
            proximal_mu: 0.0,
            grad_offset: None,
        }
    }
}

impl TrainOptions {
    /// Recommended hyper-parameters of `kind` for MNIST-like data: SGD with momentum 0.9 and
    ///
    /// | model | learning rate | batch |
    /// |---|---|---|
    /// | `lr`  | 0.01 | 64 |
    /// | `mlp` | 0.02 | 64 |
    /// | `cnn` | 0.01 | 32 |
    ///
    /// One epoch of MNIST with these reached 91.6 % (`lr`), 96.7 % (`mlp`) and 98.6 % (`cnn`)
    /// test accuracy (two seeds each; the current figures are in `docs/BENCHMARKS.md`, "Central training on MNIST").
    pub fn recommended(kind: ModelKind) -> Self {
        let base = Self::default();
        match kind {
            ModelKind::Lr => Self {
                learning_rate: 0.01,
                batch_size: 64,
                ..base
            },
            ModelKind::Mlp => Self {
                learning_rate: 0.02,
                batch_size: 64,
                ..base
            },
            ModelKind::Cnn => base,
        }
    }

    /// The optimizer these options describe (Adam uses PyTorch's default betas and epsilon).
    pub fn optimizer_config(&self) -> OptimizerConfig {
        OptimizerConfig {
            kind: self.optimizer,
            learning_rate: self.learning_rate,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            proximal_mu: self.proximal_mu,
            ..OptimizerConfig::default()
        }
    }

    /// Checks ranges.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::InvalidOption {
                field: "batch_size",
                reason: "must be at least 1".into(),
            });
        }
        self.optimizer_config().validate()
    }

    fn threads(&self) -> usize {
        if self.threads == 0 {
            rayon::current_num_threads()
        } else {
            self.threads
        }
    }
}

/// Statistics of one finished epoch of [`train_local`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EpochStats {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Samples trained on.
    pub samples: usize,
    /// Mean training loss over the epoch's samples (as computed before each step).
    pub mean_loss: f64,
    /// Training accuracy over the epoch's samples (before each step).
    pub accuracy: f64,
    /// Wall time of the epoch.
    pub seconds: f64,
}

/// How a local training run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainOutcome {
    /// All epochs ran.
    Completed,
    /// The interrupt flag was raised; training stopped between two batches.
    Interrupted,
}

/// Summary of a [`train_local`] run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TrainReport {
    /// Completed or interrupted.
    pub outcome: TrainOutcome,
    /// Epochs run to the end.
    pub epochs_completed: usize,
    /// Samples trained on (all epochs, the interrupted one included).
    pub samples_seen: usize,
    /// Mean training loss over the samples seen (NaN, serialized as `null`, when none).
    pub mean_loss: f64,
    /// Optimizer steps taken (mini-batches trained on).
    pub steps: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Loss and accuracy (classification) or errors (a real target) of a model on a set of
/// samples.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Mean loss: cross-entropy, or squared error (NaN, serialized as `null`, when there are no
    /// samples).
    pub loss: f64,
    /// Fraction of samples whose largest logit is their label (NaN for a real target or when
    /// there are no samples).
    pub accuracy: f64,
    /// Root mean squared error (a real target; NaN otherwise).
    pub rmse: f64,
    /// Mean absolute error (a real target; NaN otherwise).
    pub mae: f64,
    /// Samples evaluated.
    pub samples: usize,
}

impl EvalReport {
    /// The report of sums over `samples` samples of a model with target `target`.
    pub(crate) fn from_sums(
        target: &Target,
        samples: usize,
        loss_sum: f64,
        correct: usize,
        sq_err: f64,
        abs_err: f64,
    ) -> Self {
        let mean = |v: f64| {
            if samples == 0 {
                f64::NAN
            } else {
                v / samples as f64
            }
        };
        let real = matches!(target, Target::Real { .. });
        Self {
            loss: mean(loss_sum),
            accuracy: if real { f64::NAN } else { mean(correct as f64) },
            rmse: if real { mean(sq_err).sqrt() } else { f64::NAN },
            mae: if real { mean(abs_err) } else { f64::NAN },
            samples,
        }
    }
}

/// One epoch of [`train_central`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CentralEpoch {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Mean loss on the test set after the epoch.
    pub test_loss: f64,
    /// Accuracy on the test set after the epoch (NaN for a real target).
    pub test_accuracy: f64,
    /// RMSE on the test set after the epoch (NaN for a classification target).
    pub test_rmse: f64,
    /// MAE on the test set after the epoch (NaN for a classification target).
    pub test_mae: f64,
    /// Training time of the epoch (evaluation excluded).
    pub seconds: f64,
    /// Training throughput of the epoch.
    pub samples_per_s: f64,
}

/// Result of [`train_central`].
#[derive(Clone, Debug)]
pub struct CentralReport {
    /// Per-epoch statistics.
    pub epochs: Vec<CentralEpoch>,
    /// The trained parameters.
    pub params: ParamSet,
}

/// Picks the training device from FedML's `device_args` (`using_gpu`, `gpu_id`), with a line
/// describing the choice for logs.
///
/// Never fails: without a usable GPU it falls back to the CPU and says why.
pub fn select_device(using_gpu: bool, gpu_id: usize) -> (Device, String) {
    let cpu = || {
        format!(
            "CPU ({} threads; set RAYON_NUM_THREADS to change)",
            rayon::current_num_threads()
        )
    };
    if !using_gpu {
        return (Device::Cpu, cpu());
    }
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(gpu_id) {
            Ok(device) => (device, format!("CUDA GPU {gpu_id}")),
            Err(e) => (
                Device::Cpu,
                format!(
                    "using_gpu is true but CUDA GPU {gpu_id} cannot be opened ({e}); \
                     training on {}",
                    cpu()
                ),
            ),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = gpu_id;
        (
            Device::Cpu,
            format!(
                "using_gpu is true but this build has no CUDA support (build with --features \
                 cuda, see scripts/build-cuda.sh); training on {}",
                cpu()
            ),
        )
    }
}

/// Trains `model` (whose parameters are the variables of `varmap`) on the samples `indices` of
/// `dataset`, calling `on_epoch` after each epoch.
///
/// Epoch `e` (from 0) visits the samples in the order of a shuffle seeded by `ChaCha8Rng` with
/// seed `opts.seed` and stream `e`, in mini-batches of `opts.batch_size` (the last one keeps
/// the remainder). The optimizer starts fresh (zero momentum) on each call, as FedML's client
/// trainer does each round. `interrupt` is read before every batch; once raised, training
/// stops and returns [`TrainOutcome::Interrupted`]. In every case the parameters reached so far
/// are written back to `varmap`.
///
/// # Errors
/// [`Error::InvalidOption`], [`Error::DataMismatch`] when the data set's sample shape or class
/// count differ from the model's, [`Error::IndexOutOfRange`], [`Error::Tensor`] when `varmap`
/// does not hold exactly the model's parameters, [`Error::Candle`] for device failures.
#[allow(clippy::too_many_arguments)]
pub fn train_local(
    model: &Model,
    varmap: &VarMap,
    dataset: &dyn Dataset,
    indices: &[usize],
    opts: &TrainOptions,
    device: &Device,
    interrupt: &AtomicBool,
    mut on_epoch: impl FnMut(&EpochStats),
) -> Result<TrainReport> {
    opts.validate()?;
    check_data(model, dataset, Some(indices))?;
    let start = Instant::now();
    let mut session = Session::new(model, varmap, opts, device)?;
    let s = &mut session;
    let run = (|| -> Result<TrainReport> {
        let mut report = TrainReport {
            outcome: TrainOutcome::Completed,
            epochs_completed: 0,
            samples_seen: 0,
            mean_loss: f64::NAN,
            steps: 0,
            seconds: 0.0,
        };
        let mut loss_sum = 0.0;
        for epoch in 0..opts.epochs {
            let (stats, done) = s.run_epoch(epoch, dataset, indices, interrupt)?;
            report.samples_seen += stats.samples;
            loss_sum += stats.loss_sum;
            if !done {
                report.outcome = TrainOutcome::Interrupted;
                break;
            }
            report.epochs_completed += 1;
            on_epoch(&stats.epoch_stats(epoch));
        }
        if report.samples_seen > 0 {
            report.mean_loss = loss_sum / report.samples_seen as f64;
        }
        report.steps = s.steps();
        Ok(report)
    })();
    // Write back whatever was reached, also after an error in the loop.
    let finish = session.finish(varmap);
    let mut report = run?;
    finish?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Mean loss and accuracy of `model` on `indices` of `dataset` (all samples when `None`), in
/// batches of `batch_size`.
///
/// # Errors
/// As [`train_local`].
pub fn evaluate(
    model: &Model,
    dataset: &dyn Dataset,
    indices: Option<&[usize]>,
    batch_size: usize,
    device: &Device,
) -> Result<EvalReport> {
    check_data(model, dataset, indices)?;
    let opts = TrainOptions {
        batch_size: batch_size.max(1),
        ..TrainOptions::default()
    };
    Session::new_eval(model, &opts, device)?.evaluate(dataset, indices)
}

/// Trains a freshly initialized `model` (seed `opts.seed`) on the whole train set and
/// evaluates it on the test set after every epoch, calling `on_epoch` with each epoch's figures.
///
/// # Errors
/// As [`train_local`], and [`Error::DataMismatch`] when the train and test sets differ in
/// sample shape or classes.
pub fn train_central(
    split: &DataSplit,
    model: &ModelRef,
    opts: &TrainOptions,
    device: &Device,
    mut on_epoch: impl FnMut(&CentralEpoch),
) -> Result<CentralReport> {
    opts.validate()?;
    let (train, test) = (&*split.train, &*split.test);
    let (model, varmap) = Model::init(model, &DataSpec::of(train), opts.seed, device)?;
    check_data(&model, test, None)?;
    let indices: Vec<usize> = (0..train.len()).collect();
    let never = AtomicBool::new(false);
    let mut session = Session::new(&model, &varmap, opts, device)?;
    let s = &mut session;
    let epochs = (|| -> Result<Vec<CentralEpoch>> {
        let mut out = Vec::new();
        for epoch in 0..opts.epochs {
            let (stats, _) = s.run_epoch(epoch, train, &indices, &never)?;
            let eval = s.evaluate(test, None)?;
            let e = CentralEpoch {
                epoch: epoch + 1,
                train_loss: stats.mean_loss(),
                test_loss: eval.loss,
                test_accuracy: eval.accuracy,
                test_rmse: eval.rmse,
                test_mae: eval.mae,
                seconds: stats.seconds,
                samples_per_s: stats.samples as f64 / stats.seconds.max(1e-9),
            };
            on_epoch(&e);
            out.push(e);
        }
        Ok(out)
    })()?;
    session.finish(&varmap)?;
    Ok(CentralReport {
        epochs,
        params: model.param_set()?,
    })
}

/// Times training steps as `fedmq bench train` measures them: `model` (whose parameters are
/// the variables of `varmap`) takes `warmup + runs` runs of `steps` optimizer steps, each on
/// all the samples of `dataset` as one batch, on the engine `opts` selects. Returns the
/// measured runs' seconds.
///
/// # Errors
/// As [`train_local`].
pub(crate) fn time_steps(
    model: &Model,
    varmap: &VarMap,
    dataset: &dyn Dataset,
    opts: &TrainOptions,
    (warmup, runs, steps): (usize, usize, usize),
) -> Result<Vec<f64>> {
    check_data(model, dataset, None)?;
    let batch: Vec<usize> = (0..dataset.len()).collect();
    let mut session = Session::new(model, varmap, opts, &Device::Cpu)?;
    let mut seconds = Vec::with_capacity(runs);
    for run in 0..warmup + runs {
        let start = std::time::Instant::now();
        for _ in 0..steps {
            session.batch(dataset, &batch, true)?;
        }
        if run >= warmup {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(seconds)
}

fn check_data(model: &Model, dataset: &dyn Dataset, indices: Option<&[usize]>) -> Result<()> {
    let mismatch = |reason: String| Error::DataMismatch {
        dataset: dataset.name().to_string(),
        reason,
    };
    let spec = DataSpec::of(dataset);
    if spec.input != model.data().input {
        return Err(mismatch(format!(
            "its inputs are {}, the model `{}` was built for {}",
            spec.input.describe(),
            model.name(),
            model.data().input.describe()
        )));
    }
    if dataset.sample_shape() != model.sample_shape() {
        return Err(mismatch(format!(
            "samples have shape {:?}, the model takes {:?}",
            dataset.sample_shape(),
            model.sample_shape()
        )));
    }
    if spec.target != model.data().target {
        return Err(mismatch(format!(
            "its target is {:?}, the model predicts {:?}",
            spec.target,
            model.data().target
        )));
    }
    if let Some(indices) = indices {
        if let Some(&index) = indices.iter().find(|&&i| i >= dataset.len()) {
            return Err(Error::IndexOutOfRange {
                dataset: dataset.name().to_string(),
                index,
                len: dataset.len(),
            });
        }
    }
    if let Target::Classes { classes } = spec.target {
        if let Some((i, l)) = dataset
            .labels()
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= classes)
        {
            return Err(mismatch(format!(
                "sample {i} has label {l}, but there are {classes} classes"
            )));
        }
    }
    Ok(())
}

/// Sums over one epoch.
struct EpochSums {
    samples: usize,
    loss_sum: f64,
    correct: usize,
    seconds: f64,
}

impl EpochSums {
    fn mean_loss(&self) -> f64 {
        if self.samples == 0 {
            f64::NAN
        } else {
            self.loss_sum / self.samples as f64
        }
    }

    fn epoch_stats(&self, epoch: usize) -> EpochStats {
        EpochStats {
            epoch: epoch + 1,
            samples: self.samples,
            mean_loss: self.mean_loss(),
            accuracy: if self.samples == 0 {
                f64::NAN
            } else {
                self.correct as f64 / self.samples as f64
            },
            seconds: self.seconds,
        }
    }
}

/// A batch's inputs and targets, gathered into reused host buffers.
#[derive(Default)]
struct BatchBuf {
    /// Dense features (`Input::Dense`).
    features: Vec<f32>,
    /// Token or id inputs.
    ids: Vec<u32>,
    /// Class labels.
    labels: Vec<u32>,
    /// Real targets (`Target::Real`).
    targets: Vec<f32>,
}

impl BatchBuf {
    /// Gathers the ids, labels and real targets of `batch` (dense features are gathered where
    /// the engine wants them).
    fn gather(&mut self, dataset: &dyn Dataset, data: &DataSpec, batch: &[usize]) {
        self.labels.clear();
        let all_labels = dataset.labels();
        self.labels.extend(batch.iter().map(|&i| all_labels[i]));
        self.ids.clear();
        if data.input != Input::Dense {
            dataset.gather_ids(batch, &mut self.ids);
        }
        self.targets.clear();
        if matches!(data.target, Target::Real { .. }) {
            dataset.gather_targets(batch, &mut self.targets);
        }
    }
}

/// A training (or evaluation) session on one engine.
struct Session<'m> {
    model: &'m Model,
    opts: TrainOptions,
    buf: BatchBuf,
    backend: Backend,
}

enum Backend {
    Native {
        net: Box<NativeNet>,
        pool: rayon::ThreadPool,
    },
    Candle {
        device: Device,
        opt: Option<TensorOptimizer>,
    },
}

impl<'m> Session<'m> {
    fn new(
        model: &'m Model,
        varmap: &VarMap,
        opts: &TrainOptions,
        device: &Device,
    ) -> Result<Self> {
        let mut s = Self::new_eval(model, opts, device)?;
        match &mut s.backend {
            Backend::Native { net, .. } => {
                net.set_optimizer(opts.optimizer_config());
                if let Some(offset) = &opts.grad_offset {
                    net.set_grad_offset(offset)?;
                }
            }
            Backend::Candle { opt, device } => {
                let vars = model_vars(model, varmap)?;
                let mut o = TensorOptimizer::new(vars, opts.optimizer_config())?;
                if let Some(offset) = &opts.grad_offset {
                    offset.check_same_layout(&model.param_set()?)?;
                    let tensors = model
                        .param_specs()
                        .iter()
                        .map(|spec| {
                            let t = offset.get(&spec.name).expect("layout checked above");
                            Tensor::from_slice(t.data(), t.shape(), device)
                        })
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    o.set_offset(tensors)?;
                }
                *opt = Some(o);
            }
        }
        Ok(s)
    }

    /// Optimizer steps taken so far.
    fn steps(&self) -> u64 {
        match &self.backend {
            Backend::Native { net, .. } => net.steps(),
            Backend::Candle { opt, .. } => opt.as_ref().map_or(0, TensorOptimizer::steps),
        }
    }

    fn new_eval(model: &'m Model, opts: &TrainOptions, device: &Device) -> Result<Self> {
        let plan = model
            .native_plan()
            .filter(|_| device.is_cpu() && opts.engine == Engine::Auto);
        let backend = match plan {
            Some(plan) => {
                let threads = opts.threads();
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("fedmq-train-{i}"))
                    .build()
                    .map_err(|e| Error::ThreadPool {
                        threads,
                        reason: e.to_string(),
                    })?;
                let net = match &plan.0 {
                    Plan::Image(arch) => NativeNet::new(arch, &model.param_set()?, threads)?,
                    Plan::Lstm(dims) => NativeNet::new_lstm(dims, &model.param_set()?, threads)?,
                };
                Backend::Native {
                    net: Box::new(net),
                    pool,
                }
            }
            None => Backend::Candle {
                device: device.clone(),
                opt: None,
            },
        };
        Ok(Self {
            model,
            opts: opts.clone(),
            buf: BatchBuf::default(),
            backend,
        })
    }

    /// One batch: a training step when `train`, else evaluation only.
    fn batch(&mut self, dataset: &dyn Dataset, batch: &[usize], train: bool) -> Result<BatchStats> {
        let data = self.model.data();
        self.buf.gather(dataset, data, batch);
        Ok(match &mut self.backend {
            Backend::Native { net, pool } => {
                let input = net.input();
                input.clear();
                dataset.gather_features(batch, input);
                let labels = &self.buf.labels;
                // One hop into the pool per step: both parallel phases run on its threads.
                if train {
                    pool.install(|| net.train_step(labels))
                } else {
                    pool.install(|| net.eval(labels))
                }
            }
            Backend::Candle { device, opt } => {
                if data.input == Input::Dense {
                    self.buf.features.clear();
                    dataset.gather_features(batch, &mut self.buf.features);
                }
                let opt = if train {
                    let Some(opt) = opt.as_mut() else {
                        unreachable!("training sessions are built with an optimizer")
                    };
                    Some(opt)
                } else {
                    None
                };
                candle_step(self.model, device, &self.buf, opt)?
            }
        })
    }

    /// Runs one epoch; `false` when interrupted.
    fn run_epoch(
        &mut self,
        epoch: usize,
        dataset: &dyn Dataset,
        indices: &[usize],
        interrupt: &AtomicBool,
    ) -> Result<(EpochSums, bool)> {
        let start = Instant::now();
        let mut order = indices.to_vec();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.opts.seed);
        rng.set_stream(epoch as u64);
        order.shuffle(&mut rng);
        let mut sums = EpochSums {
            samples: 0,
            loss_sum: 0.0,
            correct: 0,
            seconds: 0.0,
        };
        let mut done = true;
        for batch in order.chunks(self.opts.batch_size) {
            if interrupt.load(Ordering::Relaxed) {
                done = false;
                break;
            }
            let stats = self.batch(dataset, batch, true)?;
            sums.samples += stats.samples;
            sums.loss_sum += stats.loss_sum;
            sums.correct += stats.correct;
        }
        sums.seconds = start.elapsed().as_secs_f64();
        Ok((sums, done))
    }

    fn evaluate(&mut self, dataset: &dyn Dataset, indices: Option<&[usize]>) -> Result<EvalReport> {
        let all: Vec<usize>;
        let indices = match indices {
            Some(i) => i,
            None => {
                all = (0..dataset.len()).collect();
                &all
            }
        };
        let mut t = BatchStats::default();
        for batch in indices.chunks(self.opts.batch_size) {
            let stats = self.batch(dataset, batch, false)?;
            t.samples += stats.samples;
            t.loss_sum += stats.loss_sum;
            t.correct += stats.correct;
            t.sq_err += stats.sq_err;
            t.abs_err += stats.abs_err;
        }
        Ok(EvalReport::from_sums(
            &self.model.data().target,
            t.samples,
            t.loss_sum,
            t.correct,
            t.sq_err,
            t.abs_err,
        ))
    }

    /// Writes the native engine's parameters back to `varmap` (candle updated it in place).
    fn finish(&mut self, varmap: &VarMap) -> Result<()> {
        if let Backend::Native { net, .. } = &self.backend {
            net.param_set().load_into(varmap)?;
        }
        Ok(())
    }
}

/// The model's variables, looked up in `varmap` by name.
fn model_vars(model: &Model, varmap: &VarMap) -> Result<Vec<Var>> {
    let vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for spec in model.param_specs() {
        match vars.get(&spec.name) {
            Some(v) => out.push(v.clone()),
            None => missing.push(spec.name),
        }
    }
    if !missing.is_empty() {
        return Err(
            crate::tensor::Error::Mismatch(Box::new(crate::tensor::LayoutMismatch {
                missing,
                ..Default::default()
            }))
            .into(),
        );
    }
    Ok(out)
}

/// One batch through candle: forward, loss, and (with an optimizer) backward and step.
///
/// Classification: mean cross-entropy. A real target: mean squared error. Either plus the
/// network's penalty in training (evaluation reports the task loss alone).
fn candle_step(
    model: &Model,
    device: &Device,
    buf: &BatchBuf,
    opt: Option<&mut TensorOptimizer>,
) -> Result<BatchStats> {
    let data = model.data();
    let n = buf.labels.len();
    let mut dims = vec![n];
    dims.extend_from_slice(&data.sample_shape);
    let xs = match data.input {
        Input::Dense => Tensor::from_slice(&buf.features, dims.as_slice(), device)?,
        Input::Tokens { .. } | Input::Ids { .. } => {
            Tensor::from_slice(&buf.ids, dims.as_slice(), device)?
        }
    };
    let net = model.network();
    let out = net.forward(&xs)?;
    let mut stats = BatchStats {
        samples: n,
        ..BatchStats::default()
    };
    let loss = match data.target {
        Target::Classes { .. } => {
            let ys = Tensor::from_slice(&buf.labels, n, device)?;
            // Counted in f32 (exact below 2²⁴ samples per batch), a sum every backend has.
            stats.correct = out
                .argmax(1)?
                .eq(&ys)?
                .to_dtype(candle_core::DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()? as usize;
            candle_nn::loss::cross_entropy(&out, &ys)?
        }
        Target::Real { .. } => {
            let ys = Tensor::from_slice(&buf.targets, n, device)?;
            let err = (&out - &ys)?;
            stats.sq_err = err.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            stats.abs_err = err.abs()?.sum_all()?.to_scalar::<f32>()? as f64;
            err.sqr()?.mean_all()?
        }
    };
    let loss = match (&opt, net.penalty(&xs)?) {
        (Some(_), Some(p)) => (loss + p)?,
        _ => loss,
    };
    if let Some(opt) = opt {
        opt.step(&loss.backward()?)?;
    }
    stats.loss_sum = loss.to_scalar::<f32>()? as f64 * n as f64;
    Ok(stats)
}
