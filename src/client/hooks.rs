//! What a strategy changes on the client, written once for every trainer and engine: read from
//! the train command's [`StrategyInstruction`] and the `strategy/` tensors of the global blob,
//! applied around local training, and turned into what the update carries back.
//!
//! | instruction parameter | before training | after training |
//! |---|---|---|
//! | `proximal_mu` (FedProx) | the optimizer adds `μ·(w − w_global)` to every gradient | — |
//! | `control_variate` (SCAFFOLD) | every gradient gets `c − cᵢ` (`c` from `strategy/control/*`) | `Δcᵢ` sent as `strategy/delta_control/*`, `cᵢ` kept |
//! | `normalized_steps` (FedNova) | — | `local_steps` and `normalizer` reported |
//! | `dp_clip_norm` with `dp_gaussian_std` or `dp_laplace_scale` (ldp, ddp) | — | the update `x − g` clipped to the norm (L2; L1 for Laplace), noise added ([`privatize`]) |
//!
//! SCAFFOLD's `K` is the number of steps for plain SGD; with momentum `ρ` it is the total
//! weight with which the steps' gradients entered the model (FedNova's normalizer), so that
//! `(x − yᵢ)/(K·η)` stays the mean local gradient (with `K` steps, momentum would inflate it by
//! up to `1/(1 − ρ)` and the correction would overshoot).
//!
//! The client's own SCAFFOLD control variate `cᵢ` lives in [`ClientMemory`] for the life of the
//! client process; it starts at zero, as in the paper, and a client that restarts starts again
//! from zero (the server's `c` then over-counts that client's old `cᵢ` until it is refreshed).

use super::error::HookError;
use super::trainer::Trained;
use crate::proto::{StrategyInstruction, TrainConfig, STRATEGY_INSTRUCTION_VERSION};
use crate::strategy::scaffold::{CONTROL, DELTA_CONTROL};
use crate::strategy::{fednova_normalizer, Report};
use crate::tensor::{NamedTensor, ParamSet};
use std::sync::{Arc, Mutex};

/// Every instruction parameter this client implements.
const KNOWN: &str = "proximal_mu, control_variate, normalized_steps, dp_clip_norm, \
                     dp_gaussian_std, dp_laplace_scale";

/// What differential privacy asks of a client's update: clip, then add noise.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClientNoise {
    /// The clipping norm of the update `x − g`.
    pub clip: f64,
    /// Gaussian noise's standard deviation per parameter (0: none).
    pub gaussian_std: f64,
    /// Laplace noise's scale per parameter (0: none); the update is clipped in L1 then.
    pub laplace_scale: f64,
}

/// What a strategy changes in local training, read from a train command's
/// [`StrategyInstruction`]. Applied by the optimizer layer (`crate::train::optim`), so every
/// engine gets it the same way.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalHooks {
    /// FedProx's proximal coefficient `μ` (`proximal_mu`; 0 = none).
    pub proximal_mu: f64,
    /// SCAFFOLD (`control_variate`): correct gradients with control variates and return `Δcᵢ`.
    pub control_variate: bool,
    /// FedNova (`normalized_steps`): report the step count and normalizer.
    pub normalized_steps: bool,
    /// Added to every gradient (SCAFFOLD's `c − cᵢ`), set by [`prepare`].
    pub grad_offset: Option<Arc<ParamSet>>,
    /// Differential privacy's clipping and noise on the update (ldp, ddp).
    pub noise: Option<ClientNoise>,
    /// The round being trained (set by the client from its train command; an attacking
    /// trainer attacks only in its rounds).
    pub round: u64,
}

impl LocalHooks {
    /// The hooks an instruction asks for. An instruction of another schema version, or with a
    /// parameter this client does not implement, is refused: the client reports the round as
    /// failed instead of training differently than the strategy assumes.
    ///
    /// # Errors
    /// [`HookError`] naming the strategy and what is not understood.
    pub fn from_instruction(i: Option<&StrategyInstruction>) -> Result<Self, HookError> {
        let mut hooks = Self::default();
        let Some(i) = i else {
            return Ok(hooks);
        };
        if i.version != STRATEGY_INSTRUCTION_VERSION {
            return Err(HookError::Version {
                strategy: i.name.clone(),
                version: i.version,
            });
        }
        let bad = |name: &str, value: f64, expected: &'static str| HookError::Value {
            strategy: i.name.clone(),
            name: name.to_string(),
            value,
            expected,
        };
        let switch = |name: &str, value: f64| -> Result<bool, HookError> {
            match value {
                1.0 => Ok(true),
                0.0 => Ok(false),
                v => Err(bad(name, v, "neither 0 nor 1")),
            }
        };
        for (name, &value) in &i.params {
            match name.as_str() {
                "proximal_mu" if value.is_finite() && value >= 0.0 => hooks.proximal_mu = value,
                "proximal_mu" => return Err(bad(name, value, "not ≥ 0")),
                "control_variate" => hooks.control_variate = switch(name, value)?,
                "normalized_steps" => hooks.normalized_steps = switch(name, value)?,
                "dp_clip_norm" if value.is_finite() && value > 0.0 => {
                    hooks.noise.get_or_insert_with(ClientNoise::default).clip = value;
                }
                "dp_gaussian_std" | "dp_laplace_scale" if value.is_finite() && value >= 0.0 => {
                    let n = hooks.noise.get_or_insert_with(ClientNoise::default);
                    if name == "dp_gaussian_std" {
                        n.gaussian_std = value;
                    } else {
                        n.laplace_scale = value;
                    }
                }
                "dp_clip_norm" => return Err(bad(name, value, "not > 0")),
                "dp_gaussian_std" | "dp_laplace_scale" => return Err(bad(name, value, "not ≥ 0")),
                other => {
                    return Err(HookError::Unknown {
                        strategy: i.name.clone(),
                        name: other.to_string(),
                        known: KNOWN,
                    })
                }
            }
        }
        if hooks.noise.is_some_and(|n| n.clip <= 0.0) {
            return Err(bad("dp_clip_norm", 0.0, "missing beside the noise"));
        }
        Ok(hooks)
    }
}

/// Clips `trained − global` to the norm of `noise` (L2, or L1 with Laplace noise) and adds the
/// noise, drawn from the operating system's randomness; returns the update's norm before
/// clipping. Differential privacy's client side (`ldp`, and `ddp`'s share of the noise).
pub fn privatize(noise: &ClientNoise, global: &ParamSet, trained: &mut ParamSet) -> f64 {
    use rand_distr::{Distribution, Normal};
    let l1 = noise.laplace_scale > 0.0;
    let mut norm = 0f64;
    for (x, g) in trained.tensors().iter().zip(global.tensors()) {
        for (x, g) in x.data().iter().zip(g.data()) {
            let d = f64::from(x - g);
            norm += if l1 { d.abs() } else { d * d };
        }
    }
    if !l1 {
        norm = norm.sqrt();
    }
    let scale = if norm > noise.clip {
        noise.clip / norm
    } else {
        1.0
    };
    let mut rng = rand::rng();
    let gauss = Normal::new(0.0, noise.gaussian_std).ok();
    for (x, g) in trained.tensors_mut().zip(global.tensors()) {
        for (x, g) in x.data_mut().iter_mut().zip(g.data()) {
            let mut d = scale * f64::from(*x - g);
            if let Some(n) = gauss.filter(|_| noise.gaussian_std > 0.0) {
                d += n.sample(&mut rng);
            }
            if l1 {
                // Laplace(0, b) as the difference of two exponentials of mean b.
                let u: f64 = rand::Rng::random::<f64>(&mut rng);
                let v: f64 = rand::Rng::random::<f64>(&mut rng);
                d += noise.laplace_scale * ((1.0 - u).ln() - (1.0 - v).ln());
            }
            *x = g + d as f32;
        }
    }
    norm
}

/// What a client keeps between rounds for its strategy: SCAFFOLD's `cᵢ`.
#[derive(Debug, Default)]
pub struct ClientMemory {
    control: Mutex<Option<ParamSet>>,
}

impl ClientMemory {
    /// The client's control variate `cᵢ` (`None`: zero, nothing trained yet).
    pub fn control(&self) -> Option<ParamSet> {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A round prepared by [`prepare`]: what [`finish`] needs once the model is trained.
#[derive(Debug)]
pub struct Prepared {
    /// SCAFFOLD: the global model `x` and the server's `c`.
    scaffold: Option<(ParamSet, ParamSet)>,
}

/// What [`finish`] produced: tensors for the update blob (under `strategy/`), the report, and
/// the client state to keep once the update is stored.
#[derive(Debug, Default)]
pub struct Finished {
    /// Tensors sent with the model, named without the `strategy/` prefix.
    pub tensors: Option<ParamSet>,
    /// [`crate::proto::Update::report`].
    pub report: Report,
    /// The new `cᵢ`, to keep with [`commit`] once the update is stored.
    control: Option<ParamSet>,
}

/// Reads the strategy's tensors of the global blob (`extra`, the `strategy/` tensors with the
/// prefix removed) and sets what training needs in `hooks`.
///
/// # Errors
/// [`HookError::Tensors`]: tensors the instruction needs are missing or do not fit the model.
pub fn prepare(
    hooks: &mut LocalHooks,
    global: &ParamSet,
    mut extra: ParamSet,
    memory: &ClientMemory,
) -> Result<Prepared, HookError> {
    let mut prepared = Prepared { scaffold: None };
    if hooks.control_variate {
        let c = extra.split_prefix(CONTROL);
        c.check_same_layout(global)
            .map_err(|source| HookError::Tensors {
                strategy: "SCAFFOLD",
                what: "control variate (strategy/control/*)",
                source,
            })?;
        let ci = memory
            .control()
            .filter(|ci| ci.check_same_layout(global).is_ok())
            .unwrap_or_else(|| global.zeros_like());
        let mut offset = c.clone();
        for (o, ci) in offset.tensors_mut().zip(ci.tensors()) {
            for (o, &ci) in o.data_mut().iter_mut().zip(ci.data()) {
                *o -= ci;
            }
        }
        hooks.grad_offset = Some(Arc::new(offset));
        prepared.scaffold = Some((global.clone(), c));
    }
    Ok(prepared)
}

/// Turns a finished training run into what the update carries for the strategy.
///
/// # Errors
/// [`HookError::Unusable`]: SCAFFOLD without a step or learning rate to divide by, or with
/// another optimizer than SGD.
pub fn finish(
    hooks: &LocalHooks,
    prepared: Prepared,
    trained: &Trained,
    config: &TrainConfig,
    memory: &ClientMemory,
) -> Result<Finished, HookError> {
    let mut out = Finished::default();
    if hooks.normalized_steps {
        let momentum = if config.optimizer.eq_ignore_ascii_case("sgd") {
            config.momentum
        } else {
            0.0
        };
        out.report
            .insert("local_steps".into(), trained.steps as f64);
        out.report.insert(
            "normalizer".into(),
            fednova_normalizer(trained.steps, momentum),
        );
    }
    if let Some((x, c)) = prepared.scaffold {
        let (k, lr) = (trained.steps, config.learning_rate);
        let unusable = |detail: String| HookError::Unusable {
            strategy: "SCAFFOLD",
            detail,
        };
        if k == 0 || lr.is_nan() || lr <= 0.0 {
            return Err(unusable(format!(
                "needs at least one local step and a learning rate > 0 (steps {k}, learning \
                 rate {lr})"
            )));
        }
        if !config.optimizer.eq_ignore_ascii_case("sgd") {
            return Err(unusable(format!(
                "its control variates assume SGD local steps; the server asks for {}",
                config.optimizer
            )));
        }
        // Δcᵢ = (x − yᵢ)/(K·η) − c ;  cᵢ⁺ = cᵢ + Δcᵢ (option II). With momentum ρ the K
        // gradients enter the model with total weight a = Σₖ(1 − ρᵏ)/(1 − ρ) instead of K
        // (FedNova's normalizer), so (x − yᵢ)/(a·η) is the mean gradient either way.
        let a = fednova_normalizer(k, config.momentum);
        let scale = (1.0 / (a * lr)) as f32;
        let ci = memory
            .control()
            .filter(|ci| ci.check_same_layout(&x).is_ok())
            .unwrap_or_else(|| x.zeros_like());
        let mut delta = Vec::with_capacity(x.len());
        let mut next = Vec::with_capacity(x.len());
        for (((x, y), c), ci) in x
            .tensors()
            .iter()
            .zip(trained.params.tensors())
            .zip(c.tensors())
            .zip(ci.tensors())
        {
            let d: Vec<f32> = x
                .data()
                .iter()
                .zip(y.data())
                .zip(c.data())
                .map(|((&x, &y), &c)| (x - y) * scale - c)
                .collect();
            let n: Vec<f32> = ci.data().iter().zip(&d).map(|(&a, &b)| a + b).collect();
            let named = |prefix: &str, v: Vec<f32>| {
                NamedTensor::new(format!("{prefix}{}", x.name()), x.shape().to_vec(), v)
                    .expect("same shape as the model tensor")
            };
            delta.push(named(DELTA_CONTROL, d));
            next.push(named("", n));
        }
        let set = |tensors| {
            ParamSet::new(tensors).map_err(|e| unusable(format!("its control variate: {e}")))
        };
        out.tensors = Some(set(delta)?);
        out.control = Some(set(next)?);
    }
    Ok(out)
}

/// Keeps the client state of a round whose update was stored.
pub fn commit(finished: &mut Finished, memory: &ClientMemory) {
    if let Some(c) = finished.control.take() {
        *memory.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TrainMetrics;

    fn instruction(version: u32, params: &[(&str, f64)]) -> StrategyInstruction {
        StrategyInstruction {
            name: "FedProx".into(),
            version,
            params: params.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn privacy_clips_the_update_and_adds_noise_of_the_asked_size() {
        let hooks = LocalHooks::from_instruction(Some(&instruction(
            STRATEGY_INSTRUCTION_VERSION,
            &[("dp_clip_norm", 1.0), ("dp_gaussian_std", 0.0)],
        )))
        .unwrap();
        let noise = hooks.noise.unwrap();
        let global =
            ParamSet::new(vec![NamedTensor::new("w", vec![2], vec![1.0, 1.0]).unwrap()]).unwrap();
        let mut trained =
            ParamSet::new(vec![NamedTensor::new("w", vec![2], vec![4.0, 5.0]).unwrap()]).unwrap();
        // Δ = (3, 4), norm 5, cut to norm 1.
        assert_eq!(privatize(&noise, &global, &mut trained), 5.0);
        let w = trained.get("w").unwrap().data();
        assert!(
            (w[0] - 1.6).abs() < 1e-6 && (w[1] - 1.8).abs() < 1e-6,
            "{w:?}"
        );

        for (key, std) in [("dp_gaussian_std", 0.3), ("dp_laplace_scale", 0.3)] {
            let noise = ClientNoise {
                clip: 1.0,
                gaussian_std: if key == "dp_gaussian_std" { std } else { 0.0 },
                laplace_scale: if key == "dp_laplace_scale" { std } else { 0.0 },
            };
            let zeros = ParamSet::new(vec![NamedTensor::zeros("w", vec![20_000])]).unwrap();
            let mut x = zeros.clone();
            privatize(&noise, &zeros, &mut x);
            let v = x.get("w").unwrap().data();
            let var = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / v.len() as f64;
            // Gaussian σ², Laplace 2b².
            let expected = if key == "dp_gaussian_std" { 0.09 } else { 0.18 };
            assert!((var - expected).abs() < 0.1 * expected, "{key}: {var}");
        }
        for bad in [("dp_clip_norm", 0.0), ("dp_gaussian_std", -1.0)] {
            assert!(LocalHooks::from_instruction(Some(&instruction(
                STRATEGY_INSTRUCTION_VERSION,
                &[bad]
            )))
            .is_err());
        }
        // Noise without a clipping norm is refused.
        assert!(LocalHooks::from_instruction(Some(&instruction(
            STRATEGY_INSTRUCTION_VERSION,
            &[("dp_gaussian_std", 1.0)]
        )))
        .is_err());
    }

    #[test]
    fn instructions_are_read_or_refused_never_ignored() {
        assert_eq!(
            LocalHooks::from_instruction(None).unwrap(),
            LocalHooks::default()
        );
        let ok = instruction(STRATEGY_INSTRUCTION_VERSION, &[("proximal_mu", 0.5)]);
        assert_eq!(
            LocalHooks::from_instruction(Some(&ok)).unwrap().proximal_mu,
            0.5
        );
        let both = instruction(
            STRATEGY_INSTRUCTION_VERSION,
            &[("control_variate", 1.0), ("normalized_steps", 1.0)],
        );
        let h = LocalHooks::from_instruction(Some(&both)).unwrap();
        assert!(h.control_variate && h.normalized_steps);
        let newer = instruction(STRATEGY_INSTRUCTION_VERSION + 1, &[]);
        let e = LocalHooks::from_instruction(Some(&newer)).unwrap_err();
        assert!(
            matches!(e, HookError::Version { version, .. } if version == STRATEGY_INSTRUCTION_VERSION + 1)
        );
        assert!(e.to_string().contains("version"), "{e}");
        let unknown = instruction(STRATEGY_INSTRUCTION_VERSION, &[("clip_norm", 1.0)]);
        let e = LocalHooks::from_instruction(Some(&unknown)).unwrap_err();
        assert!(matches!(&e, HookError::Unknown { name, .. } if name == "clip_norm"));
        assert!(
            e.to_string().contains("clip_norm") && e.to_string().contains(KNOWN),
            "{e}"
        );
        let negative = instruction(STRATEGY_INSTRUCTION_VERSION, &[("proximal_mu", -1.0)]);
        let e = LocalHooks::from_instruction(Some(&negative)).unwrap_err();
        assert!(
            matches!(&e, HookError::Value { name, .. } if name == "proximal_mu"),
            "{e}"
        );
        let half = instruction(STRATEGY_INSTRUCTION_VERSION, &[("control_variate", 0.5)]);
        let e = LocalHooks::from_instruction(Some(&half)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "strategy FedProx: control_variate 0.5 is neither 0 nor 1"
        );
    }

    fn set(prefix: &str, w: &[f32]) -> ParamSet {
        ParamSet::new(vec![NamedTensor::new(
            format!("{prefix}w"),
            vec![w.len()],
            w.to_vec(),
        )
        .unwrap()])
        .unwrap()
    }

    fn config(lr: f64, optimizer: &str, momentum: f64) -> TrainConfig {
        TrainConfig {
            model: "lr".into(),
            epochs: 1,
            batch_size: 1,
            optimizer: optimizer.into(),
            learning_rate: lr,
            momentum,
            weight_decay: 0.0,
            seed: 0,
        }
    }

    fn trained(y: &[f32], steps: u64) -> Trained {
        Trained {
            params: set("", y),
            metrics: TrainMetrics::default(),
            steps,
        }
    }

    /// Option II by hand: x = [1, 2], c = [0.5, −1], cᵢ = 0, K = 4, η = 0.25, y = [0, 3]:
    /// Δcᵢ = (x − y)/(K·η) − c = [1, −1] − [0.5, −1] = [0.5, 0]; the next round's offset is
    /// c' − cᵢ⁺.
    #[test]
    fn scaffold_control_variates_as_computed_by_hand() {
        let memory = ClientMemory::default();
        let mut hooks = LocalHooks {
            control_variate: true,
            ..LocalHooks::default()
        };
        let x = set("", &[1.0, 2.0]);
        let extra = set(CONTROL, &[0.5, -1.0]);
        let p = prepare(&mut hooks, &x, extra, &memory).unwrap();
        // cᵢ = 0: the gradient offset is c.
        assert_eq!(
            hooks.grad_offset.as_ref().unwrap().get("w").unwrap().data(),
            &[0.5, -1.0]
        );
        let cfg = config(0.25, "sgd", 0.0);
        let mut f = finish(&hooks, p, &trained(&[0.0, 3.0], 4), &cfg, &memory).unwrap();
        let dc = f.tensors.as_ref().unwrap();
        assert_eq!(
            dc.get(&format!("{DELTA_CONTROL}w")).unwrap().data(),
            &[0.5, 0.0]
        );
        assert!(memory.control().is_none(), "kept only once stored");
        commit(&mut f, &memory);
        assert_eq!(
            memory.control().unwrap().get("w").unwrap().data(),
            &[0.5, 0.0]
        );
        // Next round: c = [1, 1] → offset c − cᵢ = [0.5, 1].
        let mut hooks2 = LocalHooks {
            control_variate: true,
            ..LocalHooks::default()
        };
        prepare(&mut hooks2, &x, set(CONTROL, &[1.0, 1.0]), &memory).unwrap();
        assert_eq!(
            hooks2.grad_offset.unwrap().get("w").unwrap().data(),
            &[0.5, 1.0]
        );
    }

    #[test]
    fn scaffold_without_its_tensors_or_steps_fails_with_a_reason() {
        let memory = ClientMemory::default();
        let mut hooks = LocalHooks {
            control_variate: true,
            ..LocalHooks::default()
        };
        let x = set("", &[1.0, 2.0]);
        let e = prepare(&mut hooks, &x, ParamSet::default(), &memory).unwrap_err();
        assert!(matches!(e, HookError::Tensors { .. }), "{e}");
        assert!(e.to_string().contains("control variate"), "{e}");
        let p = prepare(&mut hooks, &x, set(CONTROL, &[0.0, 0.0]), &memory).unwrap();
        let e = finish(
            &hooks,
            p,
            &trained(&[1.0, 2.0], 0),
            &config(0.1, "sgd", 0.0),
            &memory,
        )
        .unwrap_err();
        assert!(e.to_string().contains("at least one local step"), "{e}");
        let p = prepare(&mut hooks, &x, set(CONTROL, &[0.0, 0.0]), &memory).unwrap();
        let e = finish(
            &hooks,
            p,
            &trained(&[1.0, 2.0], 3),
            &config(0.1, "adam", 0.0),
            &memory,
        )
        .unwrap_err();
        assert!(e.to_string().contains("SGD"), "{e}");
    }

    #[test]
    fn fednova_reports_steps_and_the_momentum_normalizer() {
        let memory = ClientMemory::default();
        let hooks = LocalHooks {
            normalized_steps: true,
            ..LocalHooks::default()
        };
        let p = Prepared { scaffold: None };
        let f = finish(
            &hooks,
            p,
            &trained(&[0.0], 10),
            &config(0.1, "sgd", 0.9),
            &memory,
        )
        .unwrap();
        assert_eq!(f.report["local_steps"], 10.0);
        assert_eq!(f.report["normalizer"], fednova_normalizer(10, 0.9));
        assert!(f.tensors.is_none());
        // Adam has no momentum buffer of SGD's kind: plain step count.
        let p = Prepared { scaffold: None };
        let f = finish(
            &hooks,
            p,
            &trained(&[0.0], 10),
            &config(0.1, "adam", 0.9),
            &memory,
        )
        .unwrap();
        assert_eq!(f.report["normalizer"], 10.0);
    }
}
