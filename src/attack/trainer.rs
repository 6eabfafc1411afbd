//! [`AttackingTrainer`]: an honest trainer with an attack around it.

use super::{Attack, AttackKind, PoisonedDataset, Trigger};
use crate::client::{DataTrainer, LocalHooks, LocalTrainer, TrainError, Trained};
use crate::data::Dataset;
use crate::proto::TrainConfig;
use crate::tensor::ParamSet;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A client's trainer that attacks in the rounds its [`Attack`] covers and trains honestly in
/// the others. The update it sends goes through the same client code as an honest one.
pub struct AttackingTrainer {
    attack: Attack,
    honest: DataTrainer,
    /// Training on poisoned data (label flipping, backdoors); `None`: clean data.
    poisoned: Option<DataTrainer>,
    rank: u64,
}

impl AttackingTrainer {
    /// Client `rank`'s trainer on its samples `indices` of `data`, attacking with `attack`;
    /// `trigger` is the backdoor's (for images normalized as `data` is), and `trainer` makes
    /// the honest trainer of a data set and samples (the model, device and threads).
    pub fn new(
        attack: Attack,
        rank: usize,
        data: Arc<dyn Dataset>,
        indices: Vec<usize>,
        trigger: Trigger,
        trainer: impl Fn(Arc<dyn Dataset>, Vec<usize>) -> DataTrainer,
    ) -> Self {
        let poisoned_data: Option<Arc<dyn Dataset>> = match &attack.kind {
            AttackKind::LabelFlip(pairs) => {
                Some(Arc::new(PoisonedDataset::label_flip(data.clone(), pairs)))
            }
            _ if attack.is_backdoor() => Some(Arc::new(PoisonedDataset::backdoor(
                data.clone(),
                &indices,
                attack.poison_frac,
                trigger,
                attack.target,
                rank as u64,
            ))),
            _ => None,
        };
        let poisoned = poisoned_data.map(|d| trainer(d, indices.clone()));
        Self {
            honest: trainer(data, indices),
            poisoned,
            attack,
            rank: rank as u64,
        }
    }
}

impl LocalTrainer for AttackingTrainer {
    /// The claim: the real count times `sample_boost` (announced when joining, and with every
    /// update, in every round: a claim that changed between rounds would stand out).
    fn num_samples(&self) -> u64 {
        (self.honest.num_samples() as f64 * self.attack.sample_boost).round() as u64
    }

    fn train(
        &self,
        global: ParamSet,
        config: &TrainConfig,
        hooks: &LocalHooks,
        interrupt: &AtomicBool,
    ) -> Result<Trained, TrainError> {
        if !self.attack.active(hooks.round) {
            return self.honest.train(global, config, hooks, interrupt);
        }
        let start = global.clone();
        let trainer = self.poisoned.as_ref().unwrap_or(&self.honest);
        let mut trained = trainer.train(global, config, hooks, interrupt)?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ self.rank.rotate_left(32));
        self.attack.tamper(&start, &mut trained.params, &mut rng);
        tracing::debug!(round = hooks.round, attack = ?self.attack.kind, "attacked");
        Ok(trained)
    }
}
