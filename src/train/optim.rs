//! Optimizers with PyTorch's exact update rules: SGD (momentum, dampening 0, optional Nesterov,
//! L2 weight decay) and Adam (`torch.optim.Adam`, L2 weight decay added to the gradient).
//!
//! Two implementations share one [`OptimizerConfig`]:
//! - host kernels ([`sgd_update`], [`adam_update`]) over `&mut [f32]` chunks, used by the CPU
//!   engine (any split of a tensor into chunks gives the same result, so threads can update
//!   disjoint ranges);
//! - [`TensorOptimizer`], the same rules in candle tensor ops over `Var`s, for other devices.
//!
//! With `g` the gradient and `p` the parameter, one step is (PyTorch's documentation of
//! `torch.optim.SGD` and `torch.optim.Adam`, `maximize=False`, `amsgrad=False`):
//!
//! ```text
//! SGD:  g ← g + wd·p
//!       b ← μ·b + g              (b starts at 0, so the first step gives b = g, as PyTorch)
//!       g ← g + μ·b if nesterov, else b        (only when μ ≠ 0)
//!       p ← p − lr·g
//! Adam: g ← g + wd·p
//!       m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²
//!       p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε)
//! ```
//!
//! Federated strategies change local training here, once for both engines: FedProx's proximal
//! term adds `μ·(p − p₀)` to every gradient before the step (`p₀`: the parameters when the
//! optimizer was created, i.e. the round's global model; [`add_proximal`]), and SCAFFOLD's
//! control-variate correction adds a constant `c − cᵢ` to every gradient ([`add_offset`]).

use super::{Error, Result};
use candle_core::{backprop::GradStore, Tensor, Var};
use std::fmt;
use std::str::FromStr;

/// Which optimizer, named as FedML's `train_args.client_optimizer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// `sgd`: `torch.optim.SGD`.
    Sgd,
    /// `adam`: `torch.optim.Adam`.
    Adam,
}

impl OptimizerKind {
    /// The accepted names.
    pub const NAMES: [&'static str; 2] = ["sgd", "adam"];

    /// FedML's name.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OptimizerKind {
    type Err = Error;

    /// Parses FedML's `client_optimizer` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adam" => Ok(OptimizerKind::Adam),
            _ => Err(Error::UnknownOptimizer {
                name: s.to_string(),
                valid: OptimizerKind::NAMES.join(", "),
            }),
        }
    }
}

/// Hyper-parameters of one optimizer.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimizerConfig {
    /// SGD or Adam.
    pub kind: OptimizerKind,
    /// Learning rate `lr`.
    pub learning_rate: f64,
    /// SGD momentum `μ` (0 disables the buffer). Ignored by Adam.
    pub momentum: f64,
    /// SGD Nesterov momentum (needs `μ > 0`). Ignored by Adam.
    pub nesterov: bool,
    /// L2 penalty `wd`, added to the gradient as `wd·p` (PyTorch's `weight_decay`).
    pub weight_decay: f64,
    /// Adam's `(β1, β2)`.
    pub betas: (f64, f64),
    /// Adam's `ε`.
    pub eps: f64,
    /// FedProx's `μ` (0 = none): `μ·(p − p₀)` is added to the gradient, `p₀` being the
    /// parameters when the optimizer was created.
    pub proximal_mu: f64,
}

impl Default for OptimizerConfig {
    /// PyTorch's defaults, with `lr = 0.01` (SGD has no default learning rate).
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Sgd,
            learning_rate: 0.01,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            proximal_mu: 0.0,
        }
    }
}

impl OptimizerConfig {
    /// Checks the ranges PyTorch checks.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::InvalidOption { field, reason });
        if !(self.learning_rate >= 0.0 && self.learning_rate.is_finite()) {
            return bad(
                "learning_rate",
                format!("{} is not a finite value ≥ 0", self.learning_rate),
            );
        }
        if !(self.momentum >= 0.0 && self.momentum.is_finite()) {
            return bad(
                "momentum",
                format!("{} is not a finite value ≥ 0", self.momentum),
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(
                "weight_decay",
                format!("{} is not a finite value ≥ 0", self.weight_decay),
            );
        }
        if !(self.proximal_mu >= 0.0 && self.proximal_mu.is_finite()) {
            return bad(
                "proximal_mu",
                format!("{} is not a finite value ≥ 0", self.proximal_mu),
            );
        }
        if self.kind == OptimizerKind::Sgd && self.nesterov && self.momentum <= 0.0 {
            return bad("nesterov", "Nesterov momentum needs momentum > 0".into());
        }
        if self.kind == OptimizerKind::Adam {
            let (b1, b2) = self.betas;
            if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
                return bad("betas", format!("({b1}, {b2}) must both be in [0, 1)"));
            }
            if self.eps.is_nan() || self.eps < 0.0 {
                return bad("eps", format!("{} is not ≥ 0", self.eps));
            }
        }
        Ok(())
    }

    /// Whether this optimizer keeps a per-parameter buffer (momentum) or two (Adam).
    pub(crate) fn state_buffers(&self) -> usize {
        match self.kind {
            OptimizerKind::Sgd if self.momentum != 0.0 => 1,
            OptimizerKind::Sgd => 0,
            OptimizerKind::Adam => 2,
        }
    }
}

/// FedProx's proximal term on a chunk: `g ← g + μ·(p − anchor)`, the gradient of
/// `(μ/2)·‖p − anchor‖²` (Li et al. 2020). `anchor` is the chunk's slice of the parameters the
/// optimizer started from.
pub fn add_proximal(mu: f32, p: &[f32], anchor: &[f32], g: &mut [f32]) {
    debug_assert!(p.len() == anchor.len() && p.len() == g.len());
    for ((g, &p), &a) in g.iter_mut().zip(p).zip(anchor) {
        *g += mu * (p - a);
    }
}

/// SCAFFOLD's correction on a chunk: `g ← g + offset`, with `offset = c − cᵢ` (the server's
/// control variate minus the client's, Karimireddy et al. 2020), the same for every step.
pub fn add_offset(offset: &[f32], g: &mut [f32]) {
    debug_assert_eq!(offset.len(), g.len());
    for (g, &o) in g.iter_mut().zip(offset) {
        *g += o;
    }
}

/// One SGD step on a chunk: `p`, `g` and the momentum buffer `buf` (empty when `μ = 0`) have
/// the same length, or `buf` is empty.
pub fn sgd_update(cfg: &OptimizerConfig, p: &mut [f32], g: &[f32], buf: &mut [f32]) {
    debug_assert_eq!(p.len(), g.len());
    let lr = cfg.learning_rate as f32;
    let wd = cfg.weight_decay as f32;
    let mu = cfg.momentum as f32;
    if buf.is_empty() || mu == 0.0 {
        if wd == 0.0 {
            for (p, &g) in p.iter_mut().zip(g) {
                *p -= lr * g;
            }
        } else {
            for (p, &g) in p.iter_mut().zip(g) {
                *p -= lr * (g + wd * *p);
            }
        }
        return;
    }
    debug_assert_eq!(p.len(), buf.len());
    if cfg.nesterov {
        for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
            let g = g + wd * *p;
            *b = mu * *b + g;
            *p -= lr * (g + mu * *b);
        }
    } else {
        for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
            let g = g + wd * *p;
            *b = mu * *b + g;
            *p -= lr * *b;
        }
    }
}

/// Step-dependent constants of Adam's step `t` (1-based).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamStep {
    step_size: f32,
    bias_correction2_sqrt: f32,
}

impl AdamStep {
    pub(crate) fn new(cfg: &OptimizerConfig, t: u64) -> Self {
        let (b1, b2) = cfg.betas;
        let t = t.min(i32::MAX as u64) as i32;
        Self {
            step_size: (cfg.learning_rate / (1.0 - b1.powi(t))) as f32,
            bias_correction2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
        }
    }
}

/// One Adam step `t` (1-based) on a chunk with its first (`m`) and second (`v`) moment buffers.
pub fn adam_update(
    cfg: &OptimizerConfig,
    t: u64,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    adam_update_with(cfg, AdamStep::new(cfg, t), p, g, m, v)
}

pub(crate) fn adam_update_with(
    cfg: &OptimizerConfig,
    s: AdamStep,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    debug_assert!(p.len() == g.len() && p.len() == m.len() && p.len() == v.len());
    let (b1, b2) = (cfg.betas.0 as f32, cfg.betas.1 as f32);
    let wd = cfg.weight_decay as f32;
    let eps = cfg.eps as f32;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g + wd * *p;
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        let denom = v.sqrt() / s.bias_correction2_sqrt + eps;
        *p -= s.step_size * *m / denom;
    }
}

/// The optimizers in candle tensor ops, over `Var`s on any device.
pub struct TensorOptimizer {
    cfg: OptimizerConfig,
    vars: Vec<Var>,
    /// Per var: momentum buffer (SGD with μ > 0) or `[m, v]` (Adam); created lazily as zeros.
    state: Vec<Vec<Tensor>>,
    /// The vars' values at creation, when the proximal term is on.
    anchor: Option<Vec<Tensor>>,
    /// A constant added to every gradient (SCAFFOLD's `c − cᵢ`), per var.
    offset: Option<Vec<Tensor>>,
    t: u64,
}

impl TensorOptimizer {
    /// An optimizer over `vars` (f32).
    ///
    /// # Errors
    /// [`Error::InvalidOption`] from [`OptimizerConfig::validate`].
    pub fn new(vars: Vec<Var>, cfg: OptimizerConfig) -> Result<Self> {
        cfg.validate()?;
        let state = vars.iter().map(|_| Vec::new()).collect();
        let anchor = if cfg.proximal_mu > 0.0 {
            Some(
                vars.iter()
                    .map(|v| v.as_tensor().copy())
                    .collect::<candle_core::Result<_>>()?,
            )
        } else {
            None
        };
        Ok(Self {
            cfg,
            vars,
            state,
            anchor,
            offset: None,
            t: 0,
        })
    }

    /// Adds `offset[i]` to the gradient of var `i` at every step, as [`add_offset`].
    ///
    /// # Errors
    /// [`Error::InvalidOption`] when the offsets do not have the vars' count and shapes.
    pub fn set_offset(&mut self, offset: Vec<Tensor>) -> Result<()> {
        let fits = offset.len() == self.vars.len()
            && offset
                .iter()
                .zip(&self.vars)
                .all(|(o, v)| o.dims() == v.as_tensor().dims());
        if !fits {
            return Err(Error::InvalidOption {
                field: "grad_offset",
                reason: "the gradient offsets do not have the model's shapes".into(),
            });
        }
        self.offset = Some(offset);
        Ok(())
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// Applies one step with the gradients of `grads`; vars without a gradient are left alone
    /// (PyTorch skips parameters whose `.grad` is `None`).
    ///
    /// # Errors
    /// [`Error::Candle`] when a tensor op fails.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let cfg = self.cfg;
        for (i, (var, state)) in self.vars.iter().zip(self.state.iter_mut()).enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let p = var.as_tensor();
            // The proximal term, as `add_proximal`.
            let g = match &self.anchor {
                Some(a) => (g + (p - &a[i])?.affine(cfg.proximal_mu, 0.0)?)?,
                None => g.clone(),
            };
            // SCAFFOLD's correction, as `add_offset`.
            let g = match &self.offset {
                Some(o) => (g + &o[i])?,
                None => g,
            };
            let g = if cfg.weight_decay != 0.0 {
                (g + p.affine(cfg.weight_decay, 0.0)?)?
            } else {
                g.clone()
            };
            let next = match cfg.kind {
                OptimizerKind::Sgd if cfg.momentum == 0.0 => {
                    (p - g.affine(cfg.learning_rate, 0.0)?)?
                }
                OptimizerKind::Sgd => {
                    if state.is_empty() {
                        state.push(p.zeros_like()?);
                    }
                    let b = (state[0].affine(cfg.momentum, 0.0)? + &g)?;
                    let upd = if cfg.nesterov {
                        (&g + b.affine(cfg.momentum, 0.0)?)?
                    } else {
                        b.clone()
                    };
                    state[0] = b;
                    (p - upd.affine(cfg.learning_rate, 0.0)?)?
                }
                OptimizerKind::Adam => {
                    if state.is_empty() {
                        state.push(p.zeros_like()?);
                        state.push(p.zeros_like()?);
                    }
                    let (b1, b2) = cfg.betas;
                    let s = AdamStep::new(&cfg, self.t);
                    let m = (state[0].affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
                    let v = (state[1].affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
                    let denom = v
                        .sqrt()?
                        .affine(1.0 / s.bias_correction2_sqrt as f64, cfg.eps)?;
                    let upd = (&m / denom)?.affine(s.step_size as f64, 0.0)?;
                    state[0] = m;
                    state[1] = v;
                    (p - upd)?
                }
            };
            var.set(&next)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    // Expected values: PyTorch's documented algorithms transcribed into float64 Python:
    //
    //   def sgd(p, grads, lr, mom, wd, nesterov):        # torch.optim.SGD, dampening=0
    //       buf = None
    //       for g in grads:
    //           g = [gi + wd*pi for gi, pi in zip(g, p)]
    //           if mom != 0:
    //               buf = list(g) if buf is None else [mom*b + gi for b, gi in zip(buf, g)]
    //               g = [gi + mom*b for gi, b in zip(g, buf)] if nesterov else buf
    //           p = [pi - lr*gi for pi, gi in zip(p, g)]
    //   def adam(p, grads, lr, b1, b2, eps, wd):          # torch.optim.Adam, amsgrad=False
    //       m = v = [0.0]*len(p)
    //       for t, g in enumerate(grads, 1):
    //           g = [gi + wd*pi for gi, pi in zip(g, p)]
    //           m = [b1*mi + (1-b1)*gi ...];  v = [b2*vi + (1-b2)*gi*gi ...]
    //           bc1, bc2 = 1 - b1**t, 1 - b2**t
    //           p = [pi - (lr/bc1)*mi/(sqrt(vi)/sqrt(bc2) + eps) ...]
    //
    // with P = [1.0, -2.0, 0.5] and G = [[0.5, 0.25, -1.0], [-0.1, 0.3, 2.0], [0.2, -0.4, 0.0]].
    const P: [f32; 3] = [1.0, -2.0, 0.5];
    const G: [[f32; 3]; 3] = [[0.5, 0.25, -1.0], [-0.1, 0.3, 2.0], [0.2, -0.4, 0.0]];

    fn cfg(
        kind: OptimizerKind,
        lr: f64,
        momentum: f64,
        wd: f64,
        nesterov: bool,
    ) -> OptimizerConfig {
        OptimizerConfig {
            kind,
            learning_rate: lr,
            momentum,
            weight_decay: wd,
            nesterov,
            ..Default::default()
        }
    }

    /// Runs the host kernels, with each tensor split into two chunks to exercise chunking.
    fn host(cfg: &OptimizerConfig) -> Vec<[f32; 3]> {
        let mut p = P;
        let mut s0 = [0f32; 3];
        let mut s1 = [0f32; 3];
        let mut out = Vec::new();
        for (t, g) in G.iter().enumerate() {
            let mut g = *g;
            if cfg.proximal_mu > 0.0 {
                for r in [0..1, 1..3] {
                    let (pc, gc) = (p[r.clone()].to_vec(), &mut g[r.clone()]);
                    add_proximal(cfg.proximal_mu as f32, &pc, &P[r], gc);
                }
            }
            for r in [0..1, 1..3] {
                match cfg.kind {
                    OptimizerKind::Sgd => {
                        let buf: &mut [f32] = if cfg.momentum != 0.0 {
                            &mut s0[r.clone()]
                        } else {
                            &mut []
                        };
                        sgd_update(cfg, &mut p[r.clone()], &g[r.clone()], buf)
                    }
                    OptimizerKind::Adam => adam_update(
                        cfg,
                        t as u64 + 1,
                        &mut p[r.clone()],
                        &g[r.clone()],
                        &mut s0[r.clone()],
                        &mut s1[r],
                    ),
                }
            }
            out.push(p);
        }
        out
    }

    /// Runs the candle-tensor optimizer, with gradients from `loss = sum(p · g)`.
    fn tensor(cfg: &OptimizerConfig) -> Vec<[f32; 3]> {
        let var = Var::new(&P, &Device::Cpu).unwrap();
        let mut opt = TensorOptimizer::new(vec![var.clone()], *cfg).unwrap();
        let mut out = Vec::new();
        for g in &G {
            let g = Tensor::new(g, &Device::Cpu).unwrap();
            let loss = (var.as_tensor() * &g).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            let v = var.as_tensor().to_vec1::<f32>().unwrap();
            out.push([v[0], v[1], v[2]]);
        }
        out
    }

    fn check(cfg: OptimizerConfig, expected: &[(usize, [f64; 3])]) {
        for (name, got) in [("host", host(&cfg)), ("tensor", tensor(&cfg))] {
            for (step, want) in expected {
                for i in 0..3 {
                    let (g, w) = (got[*step][i] as f64, want[i]);
                    assert!(
                        (g - w).abs() < 2e-6,
                        "{name} step {step} [{i}]: {g} vs {w} ({cfg:?})"
                    );
                }
            }
        }
    }

    // The proximal term: the same functions with `g ← g + mu·(p − P)` first (FedProx).
    #[test]
    fn proximal_term_sgd_momentum_and_adam() {
        check(
            OptimizerConfig {
                proximal_mu: 0.5,
                ..cfg(OptimizerKind::Sgd, 0.1, 0.9, 0.0, false)
            },
            &[
                (0, [0.95, -2.025, 0.6]),
                (1, [0.9175, -2.07625, 0.485]),
                (2, [0.872375, -2.0785625, 0.38225]),
            ],
        );
        check(
            OptimizerConfig {
                proximal_mu: 2.0,
                ..cfg(OptimizerKind::Adam, 0.1, 0.0, 0.0, false)
            },
            &[
                (0, [0.900000002, -2.099999996, 0.599999999]),
                (1, [0.880850198, -2.189857513, 0.55996619]),
                (2, [0.870269764, -2.152123065, 0.525889743]),
            ],
        );
    }

    #[test]
    fn gradient_offset_in_tensors_equals_the_host_kernel() {
        // SCAFFOLD's `g + (c − cᵢ)`: SGD with momentum, three steps, the same offset each step.
        let o = [0.3f32, -0.2, 0.05];
        let cfg = cfg(OptimizerKind::Sgd, 0.1, 0.9, 0.0, false);
        let mut p = P;
        let mut buf = [0f32; 3];
        for g in &G {
            let mut g = *g;
            add_offset(&o, &mut g);
            sgd_update(&cfg, &mut p, &g, &mut buf);
        }
        let var = Var::new(&P, &Device::Cpu).unwrap();
        let mut opt = TensorOptimizer::new(vec![var.clone()], cfg).unwrap();
        opt.set_offset(vec![Tensor::new(&o, &Device::Cpu).unwrap()])
            .unwrap();
        for g in &G {
            let g = Tensor::new(g, &Device::Cpu).unwrap();
            let loss = (var.as_tensor() * &g).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(&p) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {p:?}");
        }
        // By hand, first step: b = g + o = [0.8, 0.05, −0.95]; p − 0.1·b.
        let mut q = P;
        let mut b = [0f32; 3];
        let mut g0 = G[0];
        add_offset(&o, &mut g0);
        sgd_update(&cfg, &mut q, &g0, &mut b);
        for (a, b) in q.iter().zip([0.92f32, -2.005, 0.595]) {
            assert!((a - b).abs() < 1e-6, "{q:?}");
        }
        assert!(opt.set_offset(vec![]).is_err());
    }

    #[test]
    fn sgd_plain() {
        check(
            cfg(OptimizerKind::Sgd, 0.1, 0.0, 0.0, false),
            &[(2, [0.94, -2.015, 0.4])],
        );
    }

    #[test]
    fn sgd_momentum_weight_decay() {
        check(
            cfg(OptimizerKind::Sgd, 0.1, 0.9, 0.01, false),
            &[
                (0, [0.949, -2.023, 0.5995]),
                (1, [0.912151, -2.071677, 0.4884505]),
                (2, [0.858074749, -2.073414623, 0.3880174995]),
            ],
        );
    }

    #[test]
    fn sgd_nesterov() {
        check(
            cfg(OptimizerKind::Sgd, 0.1, 0.9, 0.01, true),
            &[(2, [0.809593358191, -2.074839223757, 0.29757533647049994])],
        );
    }

    #[test]
    fn adam() {
        check(
            cfg(OptimizerKind::Adam, 0.01, 0.0, 0.0, false),
            &[
                (0, [0.9900000002, -2.0099999996, 0.5099999999]),
                (
                    1,
                    [0.9848897395699324, -2.020006130383423, 0.5063389646527925],
                ),
                (
                    2,
                    [0.9788781402842311, -2.020834905189698, 0.5035089737999069],
                ),
            ],
        );
    }

    #[test]
    fn adam_weight_decay() {
        check(
            cfg(OptimizerKind::Adam, 0.01, 0.0, 0.1, false),
            &[(
                2,
                [0.9758370466703972, -2.014732564482075, 0.5028760185971386],
            )],
        );
    }

    #[test]
    fn names_and_validation() {
        assert_eq!("SGD".parse::<OptimizerKind>().unwrap(), OptimizerKind::Sgd);
        assert_eq!(
            "adam".parse::<OptimizerKind>().unwrap(),
            OptimizerKind::Adam
        );
        let err = "adagrad".parse::<OptimizerKind>().unwrap_err().to_string();
        assert!(
            err.contains("adagrad") && err.contains("sgd, adam"),
            "{err}"
        );
        let bad = OptimizerConfig {
            learning_rate: -1.0,
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(Error::InvalidOption {
                field: "learning_rate",
                ..
            })
        ));
        let bad = cfg(OptimizerKind::Sgd, 0.1, 0.0, 0.0, true);
        assert!(matches!(
            bad.validate(),
            Err(Error::InvalidOption {
                field: "nesterov",
                ..
            })
        ));
    }
}
