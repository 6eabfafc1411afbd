//! What a client does with a global model: train it on local data ([`DataTrainer`]), or, for
//! benchmarks of the system around training, return it shifted by a constant ([`NoopTrainer`]).

use super::error::TrainError;
use super::hooks::LocalHooks;
use crate::data::{DataSpec, Dataset};
use crate::proto::{ClientEval, TrainConfig, TrainMetrics};
use crate::tensor::{NamedTensor, ParamSet};
use crate::train::{
    self, Engine, Model, ModelRef, OptimizerKind, ParamSpec, Scope, TrainOptions, TrainOutcome,
};
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
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
///
/// A model with local parameters ([`Scope::Local`]) gets them from `local_dir` (written after
/// every round, atomically) or, the first time, from the run's seeded initialization; the
/// update it returns holds only the shared parameters. With held-out samples
/// ([`DataTrainer::with_eval`]) it measures the trained model on them and reports the sums in
/// [`TrainMetrics::eval`].
pub struct DataTrainer {
    model: ModelRef,
    data: Arc<dyn Dataset>,
    indices: Vec<usize>,
    device: Device,
    threads: usize,
    engine: Engine,
    local: Option<LocalParams>,
    eval: Option<(Arc<dyn Dataset>, Vec<usize>)>,
}

/// Where a client keeps its local parameters, and the seed of their first values.
struct LocalParams {
    file: PathBuf,
    seed: u64,
    /// Serializes rounds' reads and writes of the file.
    lock: Mutex<()>,
}

/// The file, under a client's state directory, holding its local parameters.
pub const LOCAL_PARAMS_FILE: &str = "local_params.safetensors";

impl DataTrainer {
    /// A trainer of `model` on the samples `indices` of `data`, on `device`, with `threads` CPU
    /// threads for the native engine (0: all).
    pub fn new(
        model: ModelRef,
        data: Arc<dyn Dataset>,
        indices: Vec<usize>,
        device: Device,
        threads: usize,
    ) -> Self {
        Self {
            model,
            data,
            indices,
            device,
            threads,
            engine: Engine::Auto,
            local: None,
            eval: None,
        }
    }

    /// Keeps the model's local parameters in `dir` (created when missing), starting from the
    /// seeded initialization with `seed` (the run's seed: the same values central training
    /// starts from).
    pub fn with_local_dir(mut self, dir: &Path, seed: u64) -> Self {
        self.local = Some(LocalParams {
            file: dir.join(LOCAL_PARAMS_FILE),
            seed,
            lock: Mutex::new(()),
        });
        self
    }

    /// Measures every trained model on the samples `indices` of `test` (this client's held-out
    /// samples).
    pub fn with_eval(mut self, test: Arc<dyn Dataset>, indices: Vec<usize>) -> Self {
        self.eval = (!indices.is_empty()).then_some((test, indices));
        self
    }

    /// The model this trainer trains.
    pub fn model(&self) -> &ModelRef {
        &self.model
    }

    /// The full parameters: `global` (shared) with this client's local ones.
    fn with_local(&self, global: ParamSet, spec: &DataSpec) -> Result<ParamSet, TrainError> {
        let specs = self.model.params(spec).map_err(TrainError::Failed)?;
        if specs.iter().all(|s| s.scope == Scope::Shared) {
            return Ok(global);
        }
        let Some(local) = &self.local else {
            return Err(TrainError::LocalState(format!(
                "model `{}` has local parameters but this client has no directory to keep them in",
                self.model.name()
            )));
        };
        let stored = match std::fs::read(&local.file) {
            Ok(bytes) => ParamSet::from_safetensors_bytes(&bytes).map_err(|e| {
                TrainError::LocalState(format!(
                    "{}: {e}; delete the file to start this client's local parameters afresh",
                    local.file.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let all = train::init_model(self.model.as_ref(), spec, local.seed)
                    .map_err(TrainError::Failed)?;
                split_scopes(all, &specs).1
            }
            Err(e) => {
                return Err(TrainError::LocalState(format!(
                    "cannot read {}: {e}",
                    local.file.display()
                )))
            }
        };
        let mut tensors: Vec<NamedTensor> = global.tensors().to_vec();
        tensors.extend(stored.tensors().iter().cloned());
        ParamSet::new(tensors).map_err(|e| TrainError::Layout(e.into()))
    }

    /// Writes the local parameters of `params` to the client's file (atomically) and returns
    /// the shared ones.
    fn keep_local(&self, params: ParamSet, spec: &DataSpec) -> Result<ParamSet, TrainError> {
        let specs = self.model.params(spec).map_err(TrainError::Failed)?;
        let (shared, local) = split_scopes(params, &specs);
        if local.is_empty() {
            return Ok(shared);
        }
        let Some(dest) = &self.local else {
            unreachable!("with_local refuses local parameters without a directory")
        };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = dest.file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = dest.file.with_extension("tmp");
            std::fs::write(&tmp, local.to_safetensors_bytes())?;
            std::fs::rename(&tmp, &dest.file)
        };
        write().map_err(|e| {
            TrainError::LocalState(format!(
                "cannot write the local parameters to {}: {e}",
                dest.file.display()
            ))
        })?;
        Ok(shared)
    }
}

/// Splits `params` into its shared and local tensors by `specs`' scopes (tensors the specs do
/// not name count as shared).
pub fn split_scopes(params: ParamSet, specs: &[ParamSpec]) -> (ParamSet, ParamSet) {
    let local: std::collections::HashSet<&str> = specs
        .iter()
        .filter(|s| s.scope == Scope::Local)
        .map(|s| s.name.as_str())
        .collect();
    let (l, s): (Vec<NamedTensor>, Vec<NamedTensor>) = params
        .tensors()
        .iter()
        .cloned()
        .partition(|t| local.contains(t.name()));
    let set = |t| ParamSet::new(t).expect("a subset of a valid set is valid");
    (set(s), set(l))
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
        if !config.model.eq_ignore_ascii_case(self.model.name()) {
            return Err(TrainError::ModelMismatch {
                server: config.model.clone(),
                client: self.model.name().to_string(),
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
        let spec = DataSpec::of(self.data.as_ref());
        let _guard = self
            .local
            .as_ref()
            .map(|l| l.lock.lock().unwrap_or_else(|e| e.into_inner()));
        let full = self.with_local(global, &spec)?;
        let (model, varmap) =
            Model::load(&self.model, &spec, &full, &self.device).map_err(TrainError::Layout)?;
        drop(full);
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
        let eval = match &self.eval {
            Some((test, indices)) => {
                let r = train::evaluate(&model, test.as_ref(), Some(indices), 500, &self.device)
                    .map_err(TrainError::Failed)?;
                let n = r.samples as f64;
                let real = spec.classes().is_none();
                Some(ClientEval {
                    samples: r.samples as u64,
                    loss_sum: r.loss * n,
                    correct: (!real).then(|| (r.accuracy * n).round() as u64),
                    sq_err_sum: real.then_some(r.rmse * r.rmse * n),
                    abs_err_sum: real.then_some(r.mae * n),
                })
            }
            None => None,
        };
        let params = model.param_set().map_err(TrainError::ReadBack)?;
        let params = self.keep_local(params, &spec)?;
        Ok(Trained {
            params,
            metrics: TrainMetrics {
                train_loss: report.mean_loss,
                train_seconds: report.seconds,
                eval,
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
                eval: None,
            },
            steps: self.steps.max(1),
        })
    }
}
