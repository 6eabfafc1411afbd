//! The native CPU engine: hand-written forward and backward passes of the built-in
//! architectures (the three image models and the next-character LSTM) over host buffers, `gemm`
//! called directly, parameters updated in place.
//!
//! # Why
//! candle's CPU path costs a heap allocation, a graph node and (for element-wise ops) a thread
//! barrier per op, which dominates a 32-sample step of a small model, and its matmul does not
//! get much from a second thread on small matrices (see `docs/BENCHMARKS.md`, "Why candle's CPU path is slow here"). This
//! engine computes the same function (tests compare its loss and gradients with candle's
//! autograd) with two parallel phases per step and no allocation after the first step.
//!
//! # One step on a batch of `B` samples with `T` threads
//! 1. *Per shard* (the batch split into `T` contiguous shards, one per thread): the forward
//!    pass, the loss and its gradient, and the backward pass of activations, all with
//!    single-threaded `gemm`. Convolutions also accumulate their weight gradients into
//!    per-thread buffers (small: 51k values for the CNN's `conv2`).
//! 2. *Per parameter slice* (every tensor split into `T` row ranges): the gradient of a dense
//!    layer's weight rows over the whole batch (`dW = dYᵀ·X`, so the large `fc1` gradient is
//!    never reduced across threads), the sum of the per-thread conv gradients, then the
//!    optimizer update of that slice, in place.
//!
//! Convolutions are im2col + gemm per sample; activations after the first convolution are
//! channels-last, and some parameters are stored in an engine layout converted at the boundary
//! (see `conv`). The LSTM follows the same two phases (see `lstm`). Measurements:
//! `docs/BENCHMARKS.md`, "Training throughput".

mod act;
mod conv;
mod gemm;
mod lstm;

use super::model::{Arch, CNN_CHANNELS, CNN_HIDDEN, CNN_KERNEL, CNN_PADDING};
use super::optim::{
    adam_update_with, add_offset, add_proximal, sgd_update, AdamStep, OptimizerConfig,
};
use super::registry::ParamSpec;
use super::rnn::LstmDims;
use super::Result;
use crate::tensor::{NamedTensor, ParamSet};
use conv::ConvGeom;
use conv::Reorder;
use gemm::{matmul, Mat};
use lstm::LstmEngine;
use rayon::prelude::*;

/// One layer of the engine.
#[derive(Clone, Copy, Debug)]
enum Layer {
    /// `y = x·Wᵀ + b`, then ReLU when `relu`; `w`, `b` index the parameters.
    Dense {
        inp: usize,
        out: usize,
        relu: bool,
        w: usize,
        b: usize,
    },
    /// Same-size convolution, bias, ReLU, 2×2 max-pool.
    Conv { g: ConvGeom, w: usize, b: usize },
}

impl Layer {
    fn in_len(&self) -> usize {
        match *self {
            Layer::Dense { inp, .. } => inp,
            Layer::Conv { g, .. } => g.in_len(),
        }
    }
    fn out_len(&self) -> usize {
        match *self {
            Layer::Dense { out, .. } => out,
            Layer::Conv { g, .. } => g.pooled_len(),
        }
    }
}

/// How a parameter tensor gets its gradient in phase 2.
#[derive(Clone, Copy, Debug)]
enum Role {
    /// Weight of dense layer `l`: `dW = dYᵀ·X` over the whole batch.
    DenseWeight(usize),
    /// Bias of dense layer `l`: column sums of `dY`.
    DenseBias(usize),
    /// Parameter of a conv layer: sum of the per-thread gradients.
    Conv,
}

/// Per-thread scratch space of phase 1.
#[derive(Default)]
struct ThreadWork {
    /// im2col matrix.
    col: Vec<f32>,
    /// Zero-padded HWC copies of a conv layer's input and output gradient (per layer; borders
    /// stay zero).
    xpad: Vec<Vec<f32>>,
    dpad: Vec<Vec<f32>>,
    /// One sample's conv output, and its gradient.
    y: Vec<f32>,
    dy: Vec<f32>,
    /// Gradients of conv parameters (indexed like the parameters; empty for dense ones).
    conv_grads: Vec<Vec<f32>>,
    /// Sum of the shard's losses and number of correct predictions.
    loss: f64,
    correct: usize,
}

/// The rows of every batch buffer that belong to one shard.
struct Shard<'a> {
    rows: usize,
    labels: &'a [u32],
    acts: Vec<&'a mut [f32]>,
    dacts: Vec<&'a mut [f32]>,
    routes: Vec<&'a mut [f32]>,
}

/// A slice of rows `r0..r1` of parameter `p`, with its gradient and optimizer state.
struct ParamChunk<'a> {
    p: usize,
    r0: usize,
    r1: usize,
    param: &'a mut [f32],
    grad: &'a mut [f32],
    state: Vec<&'a mut [f32]>,
}

/// Optimizer configuration and state (buffers per parameter, as many as the optimizer needs).
struct OptState {
    cfg: OptimizerConfig,
    t: u64,
    bufs: Vec<Vec<Vec<f32>>>,
    /// The parameters when the optimizer was set, when the proximal term is on.
    anchor: Option<Vec<Vec<f32>>>,
    /// A constant added to every gradient (SCAFFOLD's `c − cᵢ`), engine layout.
    offset: Option<Vec<Vec<f32>>>,
}

/// Which native engine trains a model (see [`crate::train::NativePlan`]).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Plan {
    /// The dense and convolution engine of this module.
    Image(Arch),
    /// The next-character LSTM (`lstm`).
    Lstm(LstmDims),
}

/// Loss sum, correct predictions and errors over one batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct BatchStats {
    /// Sum over the batch of the per-sample loss (cross-entropy, or squared error plus the
    /// model's penalty).
    pub loss_sum: f64,
    /// Correct predictions (classification).
    pub correct: usize,
    /// Sum of squared errors (a real target).
    pub sq_err: f64,
    /// Sum of absolute errors (a real target).
    pub abs_err: f64,
    pub samples: usize,
}

impl BatchStats {
    /// The stats of a classification batch of `samples` from its shards' (loss sum, correct).
    pub(crate) fn of_shards(samples: usize, shards: impl Iterator<Item = (f64, usize)>) -> Self {
        let mut stats = BatchStats {
            samples,
            ..Default::default()
        };
        for (loss, correct) in shards {
            stats.loss_sum += loss;
            stats.correct += correct;
        }
        stats
    }
}

/// A model's parameters, optimizer state and scratch buffers on the host.
pub(crate) struct NativeNet {
    specs: Vec<ParamSpec>,
    /// Engine layout of each parameter relative to PyTorch's.
    reorders: Vec<Reorder>,
    /// Parameters in `specs` (forward) order, engine layout.
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    threads: usize,
    num_classes: usize,
    opt: Option<OptState>,
    engine: Engine,
}

/// The architecture-specific part of a [`NativeNet`]: layers and scratch buffers.
enum Engine {
    Image(ImageEngine),
    Lstm(LstmEngine),
}

/// The dense and convolution engine's layers and scratch buffers.
struct ImageEngine {
    layers: Vec<Layer>,
    roles: Vec<Role>,
    /// Batch capacity of the buffers below.
    cap: usize,
    /// `acts[0]` is the input batch, `acts[l + 1]` the output of layer `l`.
    acts: Vec<Vec<f32>>,
    /// Gradients of `acts` (`dacts[0]` is never computed).
    dacts: Vec<Vec<f32>>,
    /// Pooling gradient routes per conv layer (empty for dense layers), see
    /// `conv::bias_relu_pool`.
    routes: Vec<Vec<f32>>,
    /// Flipped kernels for the input gradient of conv layers after the first.
    flips: Vec<Vec<f32>>,
    tw: Vec<ThreadWork>,
}

/// `params` in the order and engine layout of `specs` and `reorders`, after checking that it
/// has exactly `specs`' names and shapes.
fn engine_values(
    specs: &[ParamSpec],
    reorders: &[Reorder],
    params: &ParamSet,
) -> Result<Vec<Vec<f32>>> {
    let expected = ParamSet::new(
        specs
            .iter()
            .map(|s| NamedTensor::zeros(s.name.clone(), s.shape.clone()))
            .collect(),
    )?;
    expected.check_same_layout(params)?;
    Ok(specs
        .iter()
        .zip(reorders)
        .map(|(s, r)| {
            params
                .get(&s.name)
                .map(|t| r.to_engine(t.data()))
                .unwrap_or_default()
        })
        .collect())
}

impl NativeNet {
    /// An engine for `arch` holding a copy of `params`, splitting batches over `threads`.
    ///
    /// # Errors
    /// [`crate::train::Error::Tensor`] when `params` does not have the architecture's names and
    /// shapes.
    pub fn new(arch: &Arch, params: &ParamSet, threads: usize) -> Result<Self> {
        let specs = arch.param_specs();
        let layers = layers_of(arch);
        let reorders = reorders_of(&layers, specs.len());
        let values = engine_values(&specs, &reorders, params)?;
        let threads = threads.max(1);
        let engine = ImageEngine::new(layers, &values, threads);
        Ok(Self::with_engine(
            specs,
            reorders,
            values,
            threads,
            arch.num_classes(),
            Engine::Image(engine),
        ))
    }

    /// An engine for the next-character LSTM of `dims` holding a copy of `params` (PyTorch's
    /// layout, kept as is), splitting batches over `threads`. The input is `dims.seq_len` token
    /// ids per sample, as `f32`.
    ///
    /// # Errors
    /// [`crate::train::Error::Tensor`] when `params` does not have the model's names and shapes.
    pub fn new_lstm(dims: &LstmDims, params: &ParamSet, threads: usize) -> Result<Self> {
        let specs = dims.param_specs();
        let reorders = vec![Reorder::Same; specs.len()];
        let values = engine_values(&specs, &reorders, params)?;
        let threads = threads.max(1);
        Ok(Self::with_engine(
            specs,
            reorders,
            values,
            threads,
            dims.classes,
            Engine::Lstm(LstmEngine::new(*dims, threads)),
        ))
    }

    fn with_engine(
        specs: Vec<ParamSpec>,
        reorders: Vec<Reorder>,
        params: Vec<Vec<f32>>,
        threads: usize,
        num_classes: usize,
        engine: Engine,
    ) -> Self {
        Self {
            grads: params.iter().map(|p| vec![0.0; p.len()]).collect(),
            specs,
            reorders,
            params,
            threads,
            num_classes,
            opt: None,
            engine,
        }
    }

    /// Sets (or resets) the optimizer; its state starts at zero.
    pub fn set_optimizer(&mut self, cfg: OptimizerConfig) {
        let bufs = self
            .params
            .iter()
            .map(|p| vec![vec![0.0; p.len()]; cfg.state_buffers()])
            .collect();
        let anchor = (cfg.proximal_mu > 0.0).then(|| self.params.clone());
        self.opt = Some(OptState {
            cfg,
            t: 0,
            bufs,
            anchor,
            offset: None,
        });
    }

    /// Adds `offset` (named as the model's parameters) to every gradient from now on, as
    /// [`add_offset`]; cleared by [`NativeNet::set_optimizer`].
    ///
    /// # Errors
    /// [`crate::train::Error::Tensor`] when `offset` does not have the model's names and shapes.
    pub fn set_grad_offset(&mut self, offset: &ParamSet) -> Result<()> {
        let values = engine_values(&self.specs, &self.reorders, offset)?;
        if let Some(opt) = self.opt.as_mut() {
            opt.offset = Some(values);
        }
        Ok(())
    }

    /// Optimizer steps taken since [`NativeNet::set_optimizer`].
    pub fn steps(&self) -> u64 {
        self.opt.as_ref().map_or(0, |o| o.t)
    }

    /// Values per input sample.
    pub fn input_len(&self) -> usize {
        match &self.engine {
            Engine::Image(e) => e.layers[0].in_len(),
            Engine::Lstm(e) => e.input_len(),
        }
    }

    /// The input buffer: the caller appends a batch of samples to it (after clearing it).
    pub fn input(&mut self) -> &mut Vec<f32> {
        match &mut self.engine {
            Engine::Image(e) => &mut e.acts[0],
            Engine::Lstm(e) => e.input(),
        }
    }

    /// The current parameters.
    pub fn param_set(&self) -> ParamSet {
        let tensors = self
            .specs
            .iter()
            .zip(&self.params)
            .zip(&self.reorders)
            .map(|((s, p), r)| NamedTensor::new(s.name.clone(), s.shape.clone(), r.to_torch(p)))
            .collect::<std::result::Result<Vec<_>, _>>();
        // Names and lengths come from the architecture's specs, which are unique and consistent.
        match tensors.map(ParamSet::new) {
            Ok(Ok(set)) => set,
            Ok(Err(e)) | Err(e) => unreachable!("engine parameters match their specs: {e}"),
        }
    }

    /// The logits of the last batch (after [`NativeNet::train_step`] or [`NativeNet::eval`]).
    #[cfg(test)]
    pub fn logits(&self, batch: usize) -> &[f32] {
        match &self.engine {
            Engine::Image(e) => &e.acts[e.layers.len()][..batch * self.num_classes],
            Engine::Lstm(e) => e.logits(batch),
        }
    }

    /// The parameter gradients of the last training step, in spec order and PyTorch layout.
    #[cfg(test)]
    pub fn grads(&self) -> Vec<Vec<f32>> {
        self.grads
            .iter()
            .zip(&self.reorders)
            .map(|(g, r)| r.to_torch(g))
            .collect()
    }

    /// Forward, backward and optimizer step on the batch in [`NativeNet::input`] with `labels`.
    ///
    /// # Panics
    /// When no optimizer is set, or the input holds another number of samples than `labels`.
    pub fn train_step(&mut self, labels: &[u32]) -> BatchStats {
        let stats = self.run(labels, true);
        self.update(labels.len());
        stats
    }

    /// Forward pass and loss only.
    ///
    /// # Panics
    /// When the input holds another number of samples than `labels`.
    pub fn eval(&mut self, labels: &[u32]) -> BatchStats {
        self.run(labels, false)
    }

    /// Phase 1: forward (and backward when `train`) per shard.
    fn run(&mut self, labels: &[u32], train: bool) -> BatchStats {
        let batch = labels.len();
        assert_eq!(
            self.input().len(),
            batch * self.input_len(),
            "input buffer holds another number of samples than the labels"
        );
        if let Some(l) = labels.iter().find(|&&l| l as usize >= self.num_classes) {
            panic!("label {l} out of range for {} classes", self.num_classes);
        }
        match &mut self.engine {
            Engine::Image(e) => {
                e.run_shards(&self.params, self.threads, self.num_classes, labels, train)
            }
            Engine::Lstm(e) => e.run(&self.params, labels, train),
        }
    }

    /// Phase 2: gradients of parameter slices and the optimizer update.
    fn update(&mut self, batch: usize) {
        let Some(opt) = self.opt.as_mut() else {
            panic!("NativeNet::train_step needs an optimizer (set_optimizer)");
        };
        let (specs, params, grads, threads) =
            (&self.specs, &mut self.params, &mut self.grads, self.threads);
        match &self.engine {
            Engine::Image(e) => optimizer_step(opt, specs, params, grads, threads, |c| {
                e.chunk_grad(c, batch)
            }),
            Engine::Lstm(e) => {
                optimizer_step(opt, specs, params, grads, threads, |c| e.chunk_grad(c))
            }
        }
    }
}

/// Phase 2 over flat buffers: every parameter split into `threads` row ranges, one list of
/// ranges per thread; for each range `grad` writes its gradient (the engine's part), then the
/// proximal term, the gradient offset and the optimizer update of that range, in place.
fn optimizer_step(
    opt: &mut OptState,
    specs: &[ParamSpec],
    params: &mut [Vec<f32>],
    grads: &mut [Vec<f32>],
    threads: usize,
    grad: impl Fn(&mut ParamChunk<'_>) + Sync,
) {
    opt.t += 1;
    let cfg = opt.cfg;
    let adam = AdamStep::new(&cfg, opt.t);
    let anchor = opt.anchor.as_deref();
    let offset = opt.offset.as_deref();
    let mut per_thread: Vec<Vec<ParamChunk<'_>>> = (0..threads).map(|_| Vec::new()).collect();
    for (p, ((param, grad), state)) in params
        .iter_mut()
        .zip(grads.iter_mut())
        .zip(opt.bufs.iter_mut())
        .enumerate()
    {
        let rows = specs[p].shape[0];
        let width = param.len() / rows.max(1);
        let counts = split_counts(rows, threads);
        let mut states: Vec<std::vec::IntoIter<&mut [f32]>> = state
            .iter_mut()
            .map(|s| split_rows(s, width, &counts).into_iter())
            .collect();
        let mut r0 = 0;
        for (t, (pp, gg)) in split_rows(param, width, &counts)
            .into_iter()
            .zip(split_rows(grad, width, &counts))
            .enumerate()
        {
            let rows_t = counts[t];
            let state = states.iter_mut().filter_map(|it| it.next()).collect();
            if rows_t > 0 {
                per_thread[t].push(ParamChunk {
                    p,
                    r0,
                    r1: r0 + rows_t,
                    param: pp,
                    grad: gg,
                    state,
                });
            }
            r0 += rows_t;
        }
    }
    per_thread.into_par_iter().for_each(|chunks| {
        for mut c in chunks {
            grad(&mut c);
            if let Some(anchor) = anchor {
                let width = c.param.len() / (c.r1 - c.r0);
                let a = &anchor[c.p][c.r0 * width..c.r1 * width];
                add_proximal(cfg.proximal_mu as f32, c.param, a, c.grad);
            }
            if let Some(offset) = offset {
                let width = c.param.len() / (c.r1 - c.r0);
                add_offset(&offset[c.p][c.r0 * width..c.r1 * width], c.grad);
            }
            match c.state.as_mut_slice() {
                [] => sgd_update(&cfg, c.param, c.grad, &mut []),
                [buf] => sgd_update(&cfg, c.param, c.grad, buf),
                [m, v] => adam_update_with(&cfg, adam, c.param, c.grad, m, v),
                _ => unreachable!("optimizers keep at most two buffers"),
            }
        }
    });
}

impl ImageEngine {
    fn new(layers: Vec<Layer>, params: &[Vec<f32>], threads: usize) -> Self {
        let mut roles = vec![Role::Conv; params.len()];
        for (l, layer) in layers.iter().enumerate() {
            match *layer {
                Layer::Dense { w, b, .. } => {
                    roles[w] = Role::DenseWeight(l);
                    roles[b] = Role::DenseBias(l);
                }
                Layer::Conv { w, b, .. } => {
                    roles[w] = Role::Conv;
                    roles[b] = Role::Conv;
                }
            }
        }
        let mut e = Self {
            layers,
            roles,
            cap: 0,
            acts: Vec::new(),
            dacts: Vec::new(),
            routes: Vec::new(),
            flips: Vec::new(),
            tw: Vec::new(),
        };
        e.alloc_scratch(params, threads);
        e
    }

    fn alloc_scratch(&mut self, params: &[Vec<f32>], threads: usize) {
        let l = self.layers.len();
        self.acts.resize_with(l + 1, Vec::new);
        self.dacts.resize_with(l + 1, Vec::new);
        self.routes = self.layers.iter().map(|_| Vec::new()).collect();
        self.flips = self
            .layers
            .iter()
            .map(|layer| match *layer {
                Layer::Conv { g, .. } if g.hwc_in => vec![0.0; g.cout * g.patch()],
                _ => Vec::new(),
            })
            .collect();
        let (mut col, mut y) = (0, 0);
        for layer in &self.layers {
            if let Layer::Conv { g, .. } = *layer {
                col = col.max(g.patch() * g.positions());
                if g.hwc_in {
                    // im2col of the output gradient for the input gradient.
                    col = col.max(g.cout * g.k * g.k * g.positions());
                }
                y = y.max(g.cout * g.positions());
            }
        }
        let pads = |c: fn(&ConvGeom) -> usize| -> Vec<Vec<f32>> {
            self.layers
                .iter()
                .map(|layer| match layer {
                    Layer::Conv { g, .. } if g.hwc_in => vec![0.0; g.padded_len(c(g))],
                    _ => Vec::new(),
                })
                .collect()
        };
        let (xpad, dpad) = (pads(|g| g.cin), pads(|g| g.cout));
        self.tw = (0..threads)
            .map(|_| ThreadWork {
                xpad: xpad.clone(),
                dpad: dpad.clone(),
                col: vec![0.0; col],
                y: vec![0.0; y],
                dy: vec![0.0; y],
                conv_grads: self
                    .roles
                    .iter()
                    .zip(params)
                    .map(|(r, p)| match r {
                        Role::Conv => vec![0.0; p.len()],
                        _ => Vec::new(),
                    })
                    .collect(),
                loss: 0.0,
                correct: 0,
            })
            .collect();
    }

    /// Grows the batch buffers to hold `batch` samples.
    fn ensure_capacity(&mut self, batch: usize) {
        if batch <= self.cap {
            return;
        }
        self.cap = batch;
        for (l, layer) in self.layers.iter().enumerate() {
            self.acts[l + 1].resize(batch * layer.out_len(), 0.0);
            self.dacts[l + 1].resize(batch * layer.out_len(), 0.0);
            if l > 0 {
                self.dacts[l].resize(batch * layer.in_len(), 0.0);
            }
            if let Layer::Conv { g, .. } = layer {
                self.routes[l].resize(batch * g.pooled_len(), 0.0);
            }
        }
    }

    /// Phase 1: forward (and backward when `train`) per shard.
    fn run_shards(
        &mut self,
        params: &[Vec<f32>],
        threads: usize,
        classes: usize,
        labels: &[u32],
        train: bool,
    ) -> BatchStats {
        let batch = labels.len();
        self.ensure_capacity(batch);
        if train {
            for (l, layer) in self.layers.iter().enumerate() {
                if let Layer::Conv { g, w, .. } = *layer {
                    if g.hwc_in {
                        conv::flip_kernel(&params[w], g.cout, g.cin, g.k, &mut self.flips[l]);
                    }
                }
            }
        }
        let counts = split_counts(batch, threads);
        let mut shards: Vec<Shard<'_>> = counts
            .iter()
            .map(|&rows| Shard {
                rows,
                labels: &[],
                acts: Vec::new(),
                dacts: Vec::new(),
                routes: Vec::new(),
            })
            .collect();
        let mut rest_labels = labels;
        for (s, &rows) in shards.iter_mut().zip(&counts) {
            let (a, b) = rest_labels.split_at(rows);
            s.labels = a;
            rest_labels = b;
        }
        for (l, buf) in self.acts.iter_mut().enumerate() {
            let width = if l == 0 {
                self.layers[0].in_len()
            } else {
                self.layers[l - 1].out_len()
            };
            for (s, part) in shards.iter_mut().zip(split_rows(buf, width, &counts)) {
                s.acts.push(part);
            }
        }
        for (l, buf) in self.dacts.iter_mut().enumerate() {
            let width = if l == 0 {
                0
            } else {
                self.layers[l - 1].out_len()
            };
            let width = if buf.is_empty() { 0 } else { width };
            for (s, part) in shards.iter_mut().zip(split_rows(buf, width, &counts)) {
                s.dacts.push(part);
            }
        }
        for (l, buf) in self.routes.iter_mut().enumerate() {
            let width = match self.layers[l] {
                Layer::Conv { g, .. } => g.pooled_len(),
                Layer::Dense { .. } => 0,
            };
            for (s, part) in shards.iter_mut().zip(split_rows(buf, width, &counts)) {
                s.routes.push(part);
            }
        }
        let ctx = Ctx {
            layers: &self.layers,
            params,
            flips: &self.flips,
            classes,
            inv_batch: 1.0 / batch.max(1) as f32,
            train,
        };
        shards
            .into_par_iter()
            .zip(self.tw.par_iter_mut())
            .for_each(|(mut shard, tw)| ctx.run_shard(&mut shard, tw));
        BatchStats::of_shards(batch, self.tw.iter().map(|tw| (tw.loss, tw.correct)))
    }

    /// Phase 2's gradient of one parameter slice over the batch of `batch` samples.
    fn chunk_grad(&self, c: &mut ParamChunk<'_>, batch: usize) {
        let (layers, acts, dacts, tw) = (&self.layers, &self.acts, &self.dacts, &self.tw);
        match self.roles[c.p] {
            Role::DenseWeight(l) => {
                let Layer::Dense { inp, out, .. } = layers[l] else {
                    unreachable!("dense roles point at dense layers")
                };
                let dy = &dacts[l + 1][c.r0..batch * out];
                matmul(
                    c.r1 - c.r0,
                    inp,
                    batch,
                    c.grad,
                    inp,
                    false,
                    Mat::rows_t(dy, out),
                    Mat::rows(&acts[l][..batch * inp], inp),
                );
            }
            Role::DenseBias(l) => {
                let Layer::Dense { out, .. } = layers[l] else {
                    unreachable!("dense roles point at dense layers")
                };
                let dy = &dacts[l + 1][..batch * out];
                c.grad.fill(0.0);
                for row in dy.chunks_exact(out) {
                    for (g, &d) in c.grad.iter_mut().zip(&row[c.r0..c.r1]) {
                        *g += d;
                    }
                }
            }
            Role::Conv => {
                let width = c.grad.len() / (c.r1 - c.r0);
                let range = c.r0 * width..c.r1 * width;
                c.grad
                    .copy_from_slice(&tw[0].conv_grads[c.p][range.clone()]);
                for other in &tw[1..] {
                    for (g, &o) in c.grad.iter_mut().zip(&other.conv_grads[c.p][range.clone()]) {
                        *g += o;
                    }
                }
            }
        }
    }
}

/// Read-only context of phase 1.
struct Ctx<'a> {
    layers: &'a [Layer],
    params: &'a [Vec<f32>],
    flips: &'a [Vec<f32>],
    classes: usize,
    inv_batch: f32,
    train: bool,
}

impl Ctx<'_> {
    fn run_shard(&self, s: &mut Shard<'_>, tw: &mut ThreadWork) {
        tw.loss = 0.0;
        tw.correct = 0;
        if self.train {
            for g in tw.conv_grads.iter_mut() {
                g.fill(0.0);
            }
        }
        if s.rows == 0 {
            return;
        }
        let n = s.rows;
        for (l, layer) in self.layers.iter().enumerate() {
            let (lo, hi) = s.acts.split_at_mut(l + 1);
            let x: &[f32] = &lo[l][..n * layer.in_len()];
            let y: &mut [f32] = &mut hi[0][..n * layer.out_len()];
            match *layer {
                Layer::Dense {
                    inp,
                    out,
                    relu,
                    w,
                    b,
                } => {
                    matmul(
                        n,
                        out,
                        inp,
                        y,
                        out,
                        false,
                        Mat::rows(x, inp),
                        Mat::rows_t(&self.params[w], inp),
                    );
                    let bias = &self.params[b];
                    for row in y.chunks_exact_mut(out) {
                        if relu {
                            for (v, &bv) in row.iter_mut().zip(bias) {
                                *v = (*v + bv).max(0.0);
                            }
                        } else {
                            for (v, &bv) in row.iter_mut().zip(bias) {
                                *v += bv;
                            }
                        }
                    }
                }
                Layer::Conv { g, w, b } => {
                    let (pl, il, ol, patch) =
                        (g.positions(), g.in_len(), g.pooled_len(), g.patch());
                    for i in 0..n {
                        let xi = &x[i * il..(i + 1) * il];
                        // y[pos × cout] = col · Wᵀ
                        let col = if g.hwc_in {
                            conv::im2col_hwc(
                                xi,
                                g.h,
                                g.w,
                                g.cin,
                                g.k,
                                &mut tw.xpad[l],
                                &mut tw.col,
                            );
                            Mat::rows(&tw.col, patch)
                        } else {
                            conv::im2col_chw(xi, g.cin, g.h, g.w, g.k, &mut tw.col);
                            Mat::rows_t(&tw.col, pl)
                        };
                        matmul(
                            pl,
                            g.cout,
                            patch,
                            &mut tw.y,
                            g.cout,
                            false,
                            col,
                            Mat::rows_t(&self.params[w], patch),
                        );
                        conv::bias_relu_pool(
                            &g,
                            &tw.y,
                            &self.params[b],
                            &mut y[i * ol..(i + 1) * ol],
                            &mut s.routes[l][i * ol..(i + 1) * ol],
                        );
                    }
                }
            }
        }
        // Softmax cross-entropy, mean over the whole batch.
        let last = self.layers.len();
        let c = self.classes;
        for i in 0..n {
            let logits = &s.acts[last][i * c..(i + 1) * c];
            let label = s.labels[i] as usize;
            let mut best = 0;
            for j in 1..c {
                if logits[j] > logits[best] {
                    best = j;
                }
            }
            let max = logits[best];
            let sum: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
            let lse = max + sum.ln();
            tw.loss += (lse - logits[label]) as f64;
            tw.correct += usize::from(best == label);
            if self.train {
                let d = &mut s.dacts[last][i * c..(i + 1) * c];
                for (dj, &v) in d.iter_mut().zip(logits) {
                    *dj = (v - lse).exp() * self.inv_batch;
                }
                d[label] -= self.inv_batch;
            }
        }
        if !self.train {
            return;
        }
        for (l, layer) in self.layers.iter().enumerate().rev() {
            match *layer {
                Layer::Dense {
                    inp, out, relu, w, ..
                } => {
                    let (lo, hi) = s.dacts.split_at_mut(l + 1);
                    let dy: &mut [f32] = &mut hi[0][..n * out];
                    if relu {
                        for (d, &a) in dy.iter_mut().zip(&*s.acts[l + 1]) {
                            if a <= 0.0 {
                                *d = 0.0;
                            }
                        }
                    }
                    if l > 0 {
                        matmul(
                            n,
                            inp,
                            out,
                            &mut lo[l][..n * inp],
                            inp,
                            false,
                            Mat::rows(dy, out),
                            Mat::rows(&self.params[w], inp),
                        );
                    }
                }
                Layer::Conv { g, w, b } => {
                    let (pl, il, ol, patch) =
                        (g.positions(), g.in_len(), g.pooled_len(), g.patch());
                    let (gw, gb) = two_mut(&mut tw.conv_grads, w, b);
                    for i in 0..n {
                        conv::bias_relu_pool_backward(
                            &g,
                            &s.routes[l][i * ol..(i + 1) * ol],
                            &s.dacts[l + 1][i * ol..(i + 1) * ol],
                            &mut tw.dy,
                            gb,
                        );
                        // dW[cout × patch] += dyᵀ · col
                        let xi = &s.acts[l][i * il..(i + 1) * il];
                        let col = if g.hwc_in {
                            conv::im2col_hwc(
                                xi,
                                g.h,
                                g.w,
                                g.cin,
                                g.k,
                                &mut tw.xpad[l],
                                &mut tw.col,
                            );
                            Mat::rows(&tw.col, patch)
                        } else {
                            conv::im2col_chw(xi, g.cin, g.h, g.w, g.k, &mut tw.col);
                            Mat::rows_t(&tw.col, pl)
                        };
                        matmul(
                            g.cout,
                            patch,
                            pl,
                            gw,
                            patch,
                            true,
                            Mat::rows_t(&tw.dy, g.cout),
                            col,
                        );
                        if g.hwc_in {
                            // dx = conv(dy, flipped kernel), same padding, HWC like the input.
                            let kk = g.cout * g.k * g.k;
                            conv::im2col_hwc(
                                &tw.dy,
                                g.h,
                                g.w,
                                g.cout,
                                g.k,
                                &mut tw.dpad[l],
                                &mut tw.col,
                            );
                            matmul(
                                pl,
                                g.cin,
                                kk,
                                &mut s.dacts[l][i * il..(i + 1) * il],
                                g.cin,
                                false,
                                Mat::rows(&tw.col, kk),
                                Mat::rows_t(&self.flips[l], kk),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The layers of an architecture; parameter indices follow `Arch::param_specs`.
fn layers_of(arch: &Arch) -> Vec<Layer> {
    let dense = |inp, out, relu, first| Layer::Dense {
        inp,
        out,
        relu,
        w: first,
        b: first + 1,
    };
    match *arch {
        Arch::Lr { d, c } => vec![dense(d, c, false, 0)],
        Arch::Mlp { d, h, c } => vec![
            dense(d, h, true, 0),
            dense(h, h, true, 2),
            dense(h, c, false, 4),
        ],
        Arch::Cnn { ch, h, w, c } => {
            // The engine's convolutions are "same" convolutions, as the CNN's.
            debug_assert_eq!(CNN_PADDING, (CNN_KERNEL - 1) / 2);
            let g1 = ConvGeom {
                cin: ch,
                cout: CNN_CHANNELS[0],
                h,
                w,
                k: CNN_KERNEL,
                hwc_in: false,
            };
            let (h2, w2) = g1.pooled();
            let g2 = ConvGeom {
                cin: CNN_CHANNELS[0],
                cout: CNN_CHANNELS[1],
                h: h2,
                w: w2,
                k: CNN_KERNEL,
                hwc_in: true,
            };
            vec![
                Layer::Conv { g: g1, w: 0, b: 1 },
                Layer::Conv { g: g2, w: 2, b: 3 },
                dense(g2.pooled_len(), CNN_HIDDEN, true, 4),
                dense(CNN_HIDDEN, c, false, 6),
            ]
        }
    }
}

/// The engine layout of each parameter: HWC conv weights after the first convolution, and
/// HWC columns for the dense layer reading the last convolution's output.
fn reorders_of(layers: &[Layer], params: usize) -> Vec<Reorder> {
    let mut out = vec![Reorder::Same; params];
    let mut last_conv: Option<ConvGeom> = None;
    for layer in layers {
        match *layer {
            Layer::Conv { g, w, .. } => {
                if g.hwc_in {
                    out[w] = Reorder::ConvHwc {
                        co: g.cout,
                        ci: g.cin,
                        k: g.k,
                    };
                }
                last_conv = Some(g);
            }
            Layer::Dense { out: rows, w, .. } => {
                if let Some(g) = last_conv.take() {
                    let (ph, pw) = g.pooled();
                    out[w] = Reorder::DenseHwc {
                        rows,
                        c: g.cout,
                        hw: ph * pw,
                    };
                }
            }
        }
    }
    out
}

/// `n` split into `parts` near-equal counts (the first ones one larger).
fn split_counts(n: usize, parts: usize) -> Vec<usize> {
    let (base, rem) = (n / parts, n % parts);
    (0..parts).map(|i| base + usize::from(i < rem)).collect()
}

/// Splits the first `sum(counts)·width` values of `buf` into consecutive row blocks.
fn split_rows<'a, T>(buf: &'a mut [T], width: usize, counts: &[usize]) -> Vec<&'a mut [T]> {
    let mut rest = buf;
    let mut out = Vec::with_capacity(counts.len());
    for &c in counts {
        let take = (c * width).min(rest.len());
        let (a, b) = std::mem::take(&mut rest).split_at_mut(take);
        out.push(a);
        rest = b;
    }
    out
}

/// Two distinct elements of a slice, mutably.
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert!(a < b, "two_mut needs a < b");
    let (lo, hi) = v.split_at_mut(b);
    (&mut lo[a], &mut hi[0])
}

#[cfg(test)]
mod tests;
