//! What a client does with a global model: train it on local data ([`DataTrainer`]), or, for
//! benchmarks of the system around training, return it shifted by a constant ([`NoopTrainer`]).

use crate::data::Dataset;
use crate::proto::{StrategyInstruction, TrainConfig, TrainMetrics, STRATEGY_INSTRUCTION_VERSION};
use crate::tensor::ParamSet;
use crate::train::{self, Engine, Model, ModelKind, OptimizerKind, TrainOptions, TrainOutcome};
use candle_core::Device;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Local training, run in a blocking thread.
pub trait LocalTrainer: Send + Sync + 'static {
    /// Samples behind an update (its FedAvg weight).
    fn num_samples(&self) -> u64;

    /// Trains from `global` with `config` and what the strategy adds (`hooks`, from the train
    /// command's strategy instruction); checks `interrupt` between batches.
    ///
    /// # Errors
    /// A message for the server (sent as the round's `failure`).
    fn train(
        &self,
        global: ParamSet,
        config: &TrainConfig,
        hooks: &LocalHooks,
        interrupt: &AtomicBool,
    ) -> Result<(ParamSet, TrainMetrics), String>;
}

/// What a strategy changes in local training, read from a train command's
/// [`StrategyInstruction`]. Applied by the optimizer layer (`crate::train::optim`), so every
/// engine gets it the same way.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalHooks {
    /// FedProx's proximal coefficient `μ` (`proximal_mu`; 0 = none).
    pub proximal_mu: f64,
}

impl LocalHooks {
    /// The hooks an instruction asks for. An instruction of another schema version, or with a
    /// parameter this client does not implement, is refused: the client reports the round as
    /// failed instead of training differently than the strategy assumes.
    ///
    /// # Errors
    /// A message naming the strategy and what is not understood.
    pub fn from_instruction(i: Option<&StrategyInstruction>) -> Result<Self, String> {
        let mut hooks = Self::default();
        let Some(i) = i else {
            return Ok(hooks);
        };
        if i.version != STRATEGY_INSTRUCTION_VERSION {
            return Err(format!(
                "strategy {} sent instruction version {}; this client reads version {}",
                i.name, i.version, STRATEGY_INSTRUCTION_VERSION
            ));
        }
        for (name, &value) in &i.params {
            match name.as_str() {
                "proximal_mu" if value.is_finite() && value >= 0.0 => hooks.proximal_mu = value,
                "proximal_mu" => {
                    return Err(format!(
                        "strategy {}: proximal_mu {value} is not ≥ 0",
                        i.name
                    ))
                }
                other => {
                    return Err(format!(
                        "strategy {} asks for {other:?}, which this client does not implement \
                         (known: proximal_mu)",
                        i.name
                    ))
                }
            }
        }
        Ok(hooks)
    }
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
    ) -> Result<(ParamSet, TrainMetrics), String> {
        if config.model != self.kind.name() {
            return Err(format!(
                "the server trains model {:?}, this client is set up for {:?}; use the same \
                 model_args.model on both",
                config.model,
                self.kind.name()
            ));
        }
        let optimizer: OptimizerKind = config.optimizer.parse().map_err(|e| format!("{e}"))?;
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
            ..TrainOptions::default()
        };
        let (model, varmap) = Model::from_params(
            self.kind,
            self.data.sample_shape(),
            self.data.num_classes(),
            &global,
            &self.device,
        )
        .map_err(|e| format!("the global model does not fit this client's model: {e}"))?;
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
        .map_err(|e| format!("local training failed: {e}"))?;
        if report.outcome == TrainOutcome::Interrupted {
            return Err("interrupted".into());
        }
        let params = model
            .param_set()
            .map_err(|e| format!("reading the trained model: {e}"))?;
        Ok((
            params,
            TrainMetrics {
                train_loss: report.mean_loss,
                train_seconds: report.seconds,
            },
        ))
    }
}

/// No training: the update is the received model plus `delta` in every parameter. Used by
/// `fedmq bench round` to measure everything but training.
pub struct NoopTrainer {
    /// FedAvg weight reported.
    pub num_samples: u64,
    /// Added to every parameter.
    pub delta: f32,
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
        _interrupt: &AtomicBool,
    ) -> Result<(ParamSet, TrainMetrics), String> {
        let t = Instant::now();
        for tensor in global.tensors_mut() {
            for x in tensor.data_mut() {
                *x += self.delta;
            }
        }
        Ok((
            global,
            TrainMetrics {
                train_loss: 0.0,
                train_seconds: t.elapsed().as_secs_f64(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instruction(version: u32, params: &[(&str, f64)]) -> StrategyInstruction {
        StrategyInstruction {
            name: "FedProx".into(),
            version,
            params: params.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn instructions_are_read_or_refused_never_ignored() {
        assert_eq!(
            LocalHooks::from_instruction(None),
            Ok(LocalHooks::default())
        );
        let ok = instruction(STRATEGY_INSTRUCTION_VERSION, &[("proximal_mu", 0.5)]);
        assert_eq!(
            LocalHooks::from_instruction(Some(&ok)).unwrap().proximal_mu,
            0.5
        );
        let newer = instruction(STRATEGY_INSTRUCTION_VERSION + 1, &[]);
        assert!(LocalHooks::from_instruction(Some(&newer))
            .unwrap_err()
            .contains("version"));
        let unknown = instruction(STRATEGY_INSTRUCTION_VERSION, &[("control_variate", 1.0)]);
        assert!(LocalHooks::from_instruction(Some(&unknown))
            .unwrap_err()
            .contains("control_variate"));
        let negative = instruction(STRATEGY_INSTRUCTION_VERSION, &[("proximal_mu", -1.0)]);
        assert!(LocalHooks::from_instruction(Some(&negative)).is_err());
    }
}
