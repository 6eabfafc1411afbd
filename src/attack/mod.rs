//! Attacking clients, to prove defenses against: what FedML's `attack_args` configure, run by
//! ordinary clients over the real broker and store.
//!
//! An attack changes two things a client controls: the data it trains on (label flipping, the
//! backdoor's triggered samples: [`PoisonedDataset`]) and the update it sends (Byzantine values,
//! a boosted or norm-bounded backdoor: [`Attack::tamper`]). [`AttackingTrainer`] puts both around
//! the honest [`DataTrainer`], so an attacking client runs the same client code as every other.
//!
//! | `attack_type` | data | update |
//! |---|---|---|
//! | `byzantine` (`attack_mode: zero`) | clean | every parameter 0 |
//! | `byzantine` (`random`) | clean | every parameter uniform in [−1, 1] |
//! | `byzantine` (`flip`) | clean | `g − (x − g)`: the update's sign flipped |
//! | `byzantine` (`scale`) | clean | `g + s·(x − g)` with `s = scale_factor` |
//! | `label_flipping` | `original_class_list[i]` labelled `target_class_list[i]` | as trained |
//! | `model_replacement` | `poison_frac` of samples get the trigger and `backdoor_target` | `g + γ·(x − g)`, `γ = client_num_per_round / server_lr` (or norm `scale_factor_S`) |
//! | `norm_constrained_backdoor` | as `model_replacement` | boosted, then projected to norm `norm_bound` |
//!
//! Any attacker may also lie about its sample count (`sample_boost`), which a sample-weighted
//! mean cannot check: it then weighs `sample_boost` times more in FedAvg.
//!
//! The backdoor trigger ([`Trigger`]) is a pixel pattern in the bottom-right corner of an image
//! (Gu et al. 2017, BadNets; Bagdasaryan et al. 2020 boost it to replace the global model; Sun et
//! al. 2019 constrain its norm to slip under norm clipping). The server measures the attack's
//! success as the fraction of triggered test images of other classes classified as the target
//! ([`backdoor_test_set`]).

mod poison;
mod trainer;

pub use poison::{backdoor_test_set, PoisonedDataset, Trigger};
pub use trainer::AttackingTrainer;

use crate::config::Config;
use crate::tensor::ParamSet;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The attack types `attack_args.attack_type` takes.
pub const ATTACK_TYPES: &[&str] = &[
    "byzantine",
    "label_flipping",
    "model_replacement",
    "norm_constrained_backdoor",
];

/// The Byzantine modes `attack_args.attack_mode` takes.
pub const BYZANTINE_MODES: &[&str] = &["zero", "random", "flip", "scale"];

/// What a Byzantine client sends instead of its trained model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Byzantine {
    /// Every parameter 0.
    Zero,
    /// Every parameter uniform in [−1, 1].
    Random,
    /// The update's sign flipped: `g − (x − g)`.
    Flip,
    /// The update scaled: `g + s·(x − g)`.
    Scale(f32),
}

/// One attack, as `attack_args` configure it.
#[derive(Debug, Clone, PartialEq)]
pub enum AttackKind {
    /// Byzantine updates.
    Byzantine(Byzantine),
    /// Label flipping: `(from, to)` pairs.
    LabelFlip(Vec<(u32, u32)>),
    /// A pixel-pattern backdoor, trained in and boosted to replace the global model.
    ModelReplacement {
        /// `Some(S)`: scale the update to L2 norm `S`; `None`: boost by `gamma`.
        norm: Option<f64>,
        /// The boost `client_num_per_round / server_lr`.
        gamma: f64,
    },
    /// The same backdoor, boosted and then projected to L2 norm at most `bound`.
    NormConstrained {
        /// The boost before projection.
        gamma: f64,
        /// The bound.
        bound: f64,
    },
}

/// An attack and the rounds it runs in.
#[derive(Debug, Clone, PartialEq)]
pub struct Attack {
    /// What the attacker does.
    pub kind: AttackKind,
    /// First round attacked.
    pub first_round: u64,
    /// Last round attacked.
    pub last_round: u64,
    /// Backdoors: the label triggered inputs should get.
    pub target: u32,
    /// Backdoors: the fraction of the attacker's samples trained with the trigger.
    pub poison_frac: f64,
    /// The factor by which the attacker inflates its sample count (1: honest).
    pub sample_boost: f64,
}

impl Attack {
    /// The attack `cfg.attack_args` configures; `None` when `enable_attack` is off.
    ///
    /// # Errors
    /// An unknown type or mode, mismatched class lists, or a value out of range: each names its
    /// key (`attack_args.<key>: ...`).
    pub fn from_config(cfg: &Config) -> Result<Option<Attack>, String> {
        let a = &cfg.attack_args;
        if !a.enable_attack {
            return Ok(None);
        }
        let classes = classes_of(cfg);
        let class_ok = |c: u32| classes.is_none_or(|n| (c as usize) < n);
        let gamma = cfg.train_args.client_num_per_round as f64
            / cfg.train_args.server_lr.unwrap_or(1.0).max(1e-12);
        let kind = match a.attack_type.to_ascii_lowercase().as_str() {
            "byzantine" => Attack::byzantine(&a.attack_mode, a.scale_factor)?,
            "label_flipping" => {
                if a.original_class_list.is_empty()
                    || a.original_class_list.len() != a.target_class_list.len()
                {
                    return Err(format!(
                        "attack_args.original_class_list and target_class_list must be non-empty \
                         lists of the same length (class i is relabelled as target i); got {:?} \
                         and {:?}",
                        a.original_class_list, a.target_class_list
                    ));
                }
                if let Some(c) = a
                    .original_class_list
                    .iter()
                    .chain(&a.target_class_list)
                    .find(|c| !class_ok(**c))
                {
                    return Err(format!(
                        "attack_args.original_class_list / target_class_list: class {c} is not a \
                         class of {} ({} classes)",
                        cfg.data_args.dataset,
                        classes.unwrap_or(0)
                    ));
                }
                AttackKind::LabelFlip(
                    a.original_class_list
                        .iter()
                        .copied()
                        .zip(a.target_class_list.iter().copied())
                        .collect(),
                )
            }
            "model_replacement" => {
                if let Some(s) = a.scale_factor_s {
                    if !(s.is_finite() && s > 0.0) {
                        return Err(format!(
                            "attack_args.scale_factor_S must be a positive norm, got {s}"
                        ));
                    }
                }
                AttackKind::ModelReplacement {
                    norm: a.scale_factor_s,
                    gamma,
                }
            }
            "norm_constrained_backdoor" => {
                if !(a.norm_bound.is_finite() && a.norm_bound > 0.0) {
                    return Err(format!(
                        "attack_args.norm_bound must be a positive number, got {}",
                        a.norm_bound
                    ));
                }
                AttackKind::NormConstrained {
                    gamma,
                    bound: a.norm_bound,
                }
            }
            other => {
                return Err(format!(
                    "attack_args.attack_type: {other:?} is not an attack fedmq runs; valid: {}",
                    ATTACK_TYPES.join(", ")
                ))
            }
        };
        if matches!(
            kind,
            AttackKind::ModelReplacement { .. } | AttackKind::NormConstrained { .. }
        ) {
            if !class_ok(a.backdoor_target) {
                return Err(format!(
                    "attack_args.backdoor_target: {} is not a class of {}",
                    a.backdoor_target, cfg.data_args.dataset
                ));
            }
            if !(a.poison_frac > 0.0 && a.poison_frac <= 1.0) {
                return Err(format!(
                    "attack_args.poison_frac must be in (0, 1], got {}",
                    a.poison_frac
                ));
            }
        }
        if !(a.sample_boost.is_finite() && a.sample_boost >= 1.0) {
            return Err(format!(
                "attack_args.sample_boost must be a number ≥ 1, got {}",
                a.sample_boost
            ));
        }
        let first_round = a.poison_start_round_id.unwrap_or(1).max(1);
        let last_round = a.poison_end_round_id.unwrap_or(u64::MAX);
        if last_round < first_round {
            return Err(format!(
                "attack_args.poison_end_round_id ({last_round}) is before poison_start_round_id \
                 ({first_round})"
            ));
        }
        let n = attacker_count(cfg)?;
        if n == 0 {
            return Err(
                "attack_args.enable_attack is on but no client attacks: set byzantine_client_num \
                 (or ratio_of_poisoned_client, or malicious_client_id)"
                    .into(),
            );
        }
        Ok(Some(Attack {
            kind,
            first_round,
            last_round,
            target: a.backdoor_target,
            poison_frac: a.poison_frac,
            sample_boost: a.sample_boost,
        }))
    }

    fn byzantine(mode: &str, scale: f64) -> Result<AttackKind, String> {
        Ok(AttackKind::Byzantine(
            match mode.to_ascii_lowercase().as_str() {
                "zero" => Byzantine::Zero,
                "random" => Byzantine::Random,
                "flip" => Byzantine::Flip,
                "scale" if scale.is_finite() && scale != 0.0 => Byzantine::Scale(scale as f32),
                "scale" => {
                    return Err(format!(
                        "attack_args.scale_factor must be a finite number other than 0, got \
                         {scale}"
                    ))
                }
                other => {
                    return Err(format!(
                        "attack_args.attack_mode: {other:?} is not a Byzantine mode; valid: {}",
                        BYZANTINE_MODES.join(", ")
                    ))
                }
            },
        ))
    }

    /// Whether the attack runs in `round`.
    pub fn active(&self, round: u64) -> bool {
        (self.first_round..=self.last_round).contains(&round)
    }

    /// Whether the attacker trains with the backdoor trigger.
    pub fn is_backdoor(&self) -> bool {
        matches!(
            self.kind,
            AttackKind::ModelReplacement { .. } | AttackKind::NormConstrained { .. }
        )
    }

    /// Turns the attacker's trained model `trained` (from `global`) into what it sends.
    /// `rng` draws the random mode's values.
    pub fn tamper(&self, global: &ParamSet, trained: &mut ParamSet, rng: &mut ChaCha8Rng) {
        let delta_norm = || {
            let mut sq = 0f64;
            for (g, x) in global.tensors().iter().zip(trained.tensors()) {
                for (g, x) in g.data().iter().zip(x.data()) {
                    let d = f64::from(x - g);
                    sq += d * d;
                }
            }
            sq.sqrt()
        };
        // `x ← g + s·(x − g)`.
        let rescale = |trained: &mut ParamSet, s: f32| {
            for (x, g) in trained.tensors_mut().zip(global.tensors()) {
                for (x, g) in x.data_mut().iter_mut().zip(g.data()) {
                    *x = g + s * (*x - g);
                }
            }
        };
        match &self.kind {
            AttackKind::Byzantine(Byzantine::Zero) => {
                for t in trained.tensors_mut() {
                    t.data_mut().fill(0.0);
                }
            }
            AttackKind::Byzantine(Byzantine::Random) => {
                for t in trained.tensors_mut() {
                    t.data_mut()
                        .iter_mut()
                        .for_each(|x| *x = rng.random_range(-1.0..=1.0));
                }
            }
            AttackKind::Byzantine(Byzantine::Flip) => rescale(trained, -1.0),
            AttackKind::Byzantine(Byzantine::Scale(s)) => rescale(trained, *s),
            AttackKind::LabelFlip(_) => {}
            AttackKind::ModelReplacement { norm, gamma } => {
                let s = match norm {
                    Some(target) => {
                        let n = delta_norm();
                        if n > 0.0 {
                            target / n
                        } else {
                            1.0
                        }
                    }
                    None => *gamma,
                };
                rescale(trained, s as f32);
            }
            AttackKind::NormConstrained { gamma, bound } => {
                let n = delta_norm() * gamma;
                // Boosted, but no longer than the bound (1‰ under it, so that rounding does
                // not push it over).
                let s = if n > bound * 0.999 {
                    gamma * bound * 0.999 / n
                } else {
                    *gamma
                };
                rescale(trained, s as f32);
            }
        }
    }
}

/// The number of classes of `cfg`'s data set, when the name is known.
fn classes_of(cfg: &Config) -> Option<usize> {
    cfg.data_args
        .dataset
        .parse::<crate::data::DatasetKind>()
        .ok()
        .map(|k| k.num_classes())
}

/// How many clients attack: `malicious_client_id` (one), else `byzantine_client_num`, else
/// `ratio_of_poisoned_client` of the clients (rounded down).
fn attacker_count(cfg: &Config) -> Result<usize, String> {
    let a = &cfg.attack_args;
    let n = cfg.train_args.client_num_in_total;
    let count = if a.malicious_client_id.is_some() {
        1
    } else if a.byzantine_client_num > 0 {
        a.byzantine_client_num
    } else if let Some(r) = a.ratio_of_poisoned_client {
        if !(0.0..=1.0).contains(&r) {
            return Err(format!(
                "attack_args.ratio_of_poisoned_client must be in [0, 1], got {r}"
            ));
        }
        (r * n as f64).floor() as usize
    } else {
        0
    };
    if count > n {
        return Err(format!(
            "attack_args.byzantine_client_num ({count}) exceeds client_num_in_total ({n})"
        ));
    }
    if let Some(id) = a.malicious_client_id {
        if id == 0 || id > n {
            return Err(format!(
                "attack_args.malicious_client_id must be a client rank in 1..={n}, got {id}"
            ));
        }
    }
    Ok(count)
}

/// The ranks (1-based, sorted) of the clients that attack under `cfg`: `malicious_client_id`,
/// or a sample of the count drawn with `common_args.random_seed`, so every process of a run (the
/// clients and the server measuring the attack) agrees. Empty when no attack is on.
pub fn attacker_ranks(cfg: &Config) -> Vec<usize> {
    let a = &cfg.attack_args;
    if !a.enable_attack {
        return Vec::new();
    }
    if let Some(id) = a.malicious_client_id {
        return vec![id];
    }
    let n = cfg.train_args.client_num_in_total;
    let count = attacker_count(cfg).unwrap_or(0).min(n);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.common_args.random_seed ^ 0xa77a_c4e5);
    let mut ranks: Vec<usize> = rand::seq::index::sample(&mut rng, n, count)
        .into_iter()
        .map(|i| i + 1)
        .collect();
    ranks.sort_unstable();
    ranks
}

#[cfg(test)]
mod tests;
