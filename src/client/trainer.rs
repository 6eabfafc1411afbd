//! What a client does with a global model: train it on local data ([`DataTrainer`]), or, for
//! benchmarks of the system around training, return it shifted by a constant ([`NoopTrainer`]).

use super::error::TrainError;
use super::hooks::LocalHooks;
use crate::data::Dataset;
use crate::proto::{TrainConfig, TrainMetrics};
use crate::tensor::ParamSet;
use crate::train::{self, Engine, Model, ModelKind, OptimizerKind, TrainOptions, TrainOutcome};
use candle_core::Device;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Local training, run in a blocking thread.
pub trait LocalTrainer: Send + Sync + 'static {
    /// Samples behind an update (its FedAvg weight).
    fn num_samples(&self) -> u64;

    /// Trains from `global` with `config` and what the strategy adds (`hooks`, from the train
    /// command's strategy instruction); checks `interrupt` between batches.
    ///
    /// # Errors
    /// [`TrainError`]; its text is sent to the server as the round's `failure`
    /// ([`TrainError::Other`] for a trainer's own errors), [`TrainError::Interrupted`] when
    /// `interrupt` stopped it.
    fn train(
        &self,
        global: ParamSet,
        config: &TrainConfig,
        hooks: &LocalHooks,
        interrupt: &AtomicBool,
    ) -> Result<Trained, TrainError>;
}

/// What local training produced.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The trained model.
    pub params: ParamSet,
    /// Loss and time.
    pub metrics: TrainMetrics,
    /// Optimizer steps taken (SCAFFOLD's `K`, FedNova's `τᵢ`).
    pub steps: u64,
}

/// Trains a model on this client's samples of a data set.
pub struct DataTrainer {
    kind: ModelKind,
    data: Arc<dyn Dataset>,
    indices: Vec<usize>,
    device: Device,
    threads: usize,
    engine: Engine,
}

impl DataTrainer {
    /// A trainer of `kind` on the samples `indices` of `data`, on `device`, with `threads` CPU
    /// threads for the native engine (0: all).
    pub fn new(
        kind: ModelKind,
        data: Arc<dyn Dataset>,
        indices: Vec<usize>,
        device: Device,
        threads: usize,
    ) -> Self {
        Self {
            kind,
            data,
            indices,
            device,
            threads,
            engine: Engine::Auto,
        }
    }

    /// The model this trainer trains.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }
}

impl LocalTrainer for DataTrainer {
    fn num_samples(&self) -> u64 {
        self.indices.len() as u64
    }

    fn train(
        &self,
        global: ParamSet,
        config: &TrainConfig,
        hooks: &LocalHooks,
        interrupt: &AtomicBool,
    ) -> Result<Trained, TrainError> {
        if config.model != self.kind.name() {
            return Err(TrainError::ModelMismatch {
                server: config.model.clone(),
                client: self.kind.name().to_string(),
            });
        }
        let optimizer: OptimizerKind = config.optimizer.parse().map_err(TrainError::Settings)?;
        let opts = TrainOptions {
            epochs: config.epochs as usize,
            batch_size: config.batch_size as usize,
            optimizer,
            learning_rate: config.learning_rate,
            momentum: config.momentum,
            weight_decay: config.weight_decay,
            seed: config.seed,
            threads: self.threads,
            engine: self.engine,
            proximal_mu: hooks.proximal_mu,
            grad_offset: hooks.grad_offset.clone(),
            ..TrainOptions::default()
        };
        let (model, varmap) = Model::from_params(
            self.kind,
            self.data.sample_shape(),
            self.data.num_classes(),
            &global,
            &self.device,
        )
        .map_err(TrainError::Layout)?;
        drop(global);
        let report = train::train_local(
            &model,
            &varmap,
            self.data.as_ref(),
            &self.indices,
            &opts,
            &self.device,
            interrupt,
            |_| {},
        )
        .map_err(TrainError::Failed)?;
        if report.outcome == TrainOutcome::Interrupted {
            return Err(TrainError::Interrupted);
        }
        let params = model.param_set().map_err(TrainError::ReadBack)?;
        Ok(Trained {
            params,
            metrics: TrainMetrics {
                train_loss: report.mean_loss,
                train_seconds: report.seconds,
            },
            steps: report.steps,
        })
    }
}

/// No training: the update is the received model plus `delta` in every parameter, reported
/// as `steps` local steps after `delay`. Used by `fedmq bench round` to measure everything but
/// training, and by tests of strategies whose server step depends on the clients' step counts
/// or speed.
#[derive(Debug, Clone)]
pub struct NoopTrainer {
    /// FedAvg weight reported.
    pub num_samples: u64,
    /// Added to every parameter.
    pub delta: f32,
    /// Local steps reported (at least 1).
    pub steps: u64,
    /// How long "training" takes (a slow device); an interrupt ends the wait.
    pub delay: Duration,
    /// Fail after the delay instead of training: a client that drops out mid-round.
    pub fail: bool,
}

impl LocalTrainer for NoopTrainer {
    fn num_samples(&self) -> u64 {
        self.num_samples
    }

    fn train(
        &self,
        mut global: ParamSet,
        _config: &TrainConfig,
        _hooks: &LocalHooks,
        interrupt: &AtomicBool,
    ) -> Result<Trained, TrainError> {
        let t = Instant::now();
        while t.elapsed() < self.delay {
            if interrupt.load(Ordering::Relaxed) {
                return Err(TrainError::Interrupted);
            }
            std::thread::sleep((self.delay - t.elapsed()).min(Duration::from_millis(10)));
        }
        if self.fail {
            return Err(TrainError::Other(
                "this no-op client drops out (bench --dropout)".into(),
            ));
        }
        for tensor in global.tensors_mut() {
            for x in tensor.data_mut() {
                *x += self.delta;
            }
        }
        Ok(Trained {
            params: global,
            metrics: TrainMetrics {
                train_loss: 0.0,
                train_seconds: t.elapsed().as_secs_f64(),
            },
            steps: self.steps.max(1),
        })
    }
}
