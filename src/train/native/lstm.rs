//! The next-character LSTM of FedML's `RNN_OriginalFedAvg` (`rnn`, Shakespeare): embedding →
//! stacked LSTM (batch-first, zero initial state, PyTorch's gate order `i, f, g, o`) → the top
//! layer's hidden state at the last step → linear → softmax cross-entropy, with a hand-written
//! backward pass. Parameters keep PyTorch's layout (no reordering).
//!
//! # One step, in the engine's two phases
//! 1. *Per shard* (consecutive samples, one shard per thread), with no synchronisation between
//!    threads: the embedding lookup; per layer the input projection of all steps as one gemm
//!    (`[T·n, in] × [in, 4H]`), then the recurrence, per step one small gemm
//!    `G_t += h_{t−1}·W_hhᵀ` (`[n, H] × [H, 4H]`), the bias, the gate nonlinearities and the
//!    cell update; the logits, the loss and its gradient; then from the top layer down the
//!    backward pass through time (per step the element-wise gate derivatives and
//!    `dh_{t−1} += dG_t·W_hh`), keeping every step's gate gradients `dG`, and the gradient of the
//!    layer's input `dG·W_ih`, the lower layer's output gradient.
//! 2. *Per parameter slice* (rows of each tensor split over the threads): `dW_ih = dGᵀ·X` over
//!    the whole batch, `dW_hh = Σ_t dG_tᵀ·h_{t−1}` (one gemm per shard, a shard's steps being
//!    contiguous), the biases' column sums, the output layer's `dW = dZᵀ·h_T`, the embedding
//!    rows' scatter-add of the first layer's input gradient; then the optimizer update of the
//!    slice (shared with the image engine).
//!
//! Why shards rather than splitting each step's products over the threads: the threads then
//! meet twice per step instead of several times per time step and layer (hundreds of times at
//! T = 80), which matters on a shared machine where a descheduled thread stalls every barrier;
//! and gemm on a 5-row shard (batch 10 on 2 threads) is about as efficient per flop as on 64
//! rows.
//!
//! # Layout
//! Buffers indexed by (time step, sample) hold `T·B` rows, shard-major and time-major within a
//! shard: sample `first + j` of the shard starting at sample `first` with `n` samples is row
//! `first·T + t·n + j` at step `t`. A shard's rows are contiguous, and so are its rows at one
//! step (one gemm per step). Buffers grow to the largest batch seen and keep their size.

use super::act::{sigmoid_inplace, tanh, tanh_inplace};
use super::gemm::{matmul, Mat};
use super::{split_counts, split_rows, BatchStats, ParamChunk};
use crate::train::rnn::LstmDims;
use rayon::prelude::*;

/// Parameter index of layer `l`'s `weight_ih`; `weight_hh`, `bias_ih`, `bias_hh` follow (the
/// order of [`LstmDims::param_specs`]).
fn layer_param(l: usize) -> usize {
    1 + 4 * l
}

/// Width of layer `l`'s input.
fn input_width(d: &LstmDims, l: usize) -> usize {
    if l == 0 {
        d.embed
    } else {
        d.hidden
    }
}

/// Saved activations and gradients of one layer, `T·B` rows in the layout of the module docs.
#[derive(Default)]
struct LayerBufs {
    /// Gate pre-activations `[T·B, 4H]` (input projection, plus the recurrent product and the
    /// biases), then in place the activations `i, f, g, o`.
    gates: Vec<f32>,
    /// Cell state `[T·B, H]`.
    c: Vec<f32>,
    /// `tanh(c)` `[T·B, H]`.
    tc: Vec<f32>,
    /// Hidden state `[T·B, H]`: the next layer's input.
    h: Vec<f32>,
    /// Gradient of the gate pre-activations `[T·B, 4H]`.
    dg: Vec<f32>,
}

/// Per-thread scratch space of phase 1 (rows of the largest shard).
#[derive(Default)]
struct ThreadWork {
    /// Gradient of `h_t` at the current step `[n, H]`.
    dh: Vec<f32>,
    /// Gradient of the cell state carried backwards `[n, H]`.
    dc: Vec<f32>,
    /// Gradient of the top layer's last hidden state `[n, H]`.
    dh_last: Vec<f32>,
    /// Sum of the shard's losses and number of correct predictions.
    loss: f64,
    correct: usize,
}

/// The LSTM's scratch buffers; parameters and gradients are the [`super::NativeNet`]'s.
pub(super) struct LstmEngine {
    dims: LstmDims,
    /// The batch's token ids as `f32`, `[B, T]` (the caller fills it).
    input: Vec<f32>,
    /// The same ids, checked.
    tokens: Vec<u32>,
    /// Samples per shard of the last batch.
    counts: Vec<usize>,
    /// Batch capacity of the buffers below.
    cap: usize,
    /// Embedded input `[T·B, E]`.
    x0: Vec<f32>,
    layers: Vec<LayerBufs>,
    /// `b_ih + b_hh` per layer.
    bias: Vec<Vec<f32>>,
    /// `W_hhᵀ` `[H, 4H]` per layer. gemm reads a column-contiguous left operand (its view of
    /// `h·W_hhᵀ` after transposing to a column-major result) without packing it, so this copy,
    /// made once per layer and step, saves repacking `W_hh` at every time step.
    w_hh_t: Vec<Vec<f32>>,
    /// Gradient of a layer's input `[T·B, H]` (layers above the first), overwritten in place
    /// from the top layer down.
    dx: Vec<f32>,
    /// Gradient of the embedded input `[T·B, E]`.
    dx0: Vec<f32>,
    /// The top layer's last hidden state `[B, H]`, in sample order.
    h_last: Vec<f32>,
    /// Logits `[B, C]` and their gradient.
    logits: Vec<f32>,
    dlogits: Vec<f32>,
    tw: Vec<ThreadWork>,
}

/// One layer's rows of one shard.
struct ShardLayer<'a> {
    gates: &'a mut [f32],
    c: &'a mut [f32],
    tc: &'a mut [f32],
    h: &'a mut [f32],
    dg: &'a mut [f32],
}

/// The rows of every batch buffer that belong to one shard.
struct Shard<'a> {
    n: usize,
    tokens: &'a [u32],
    labels: &'a [u32],
    x0: &'a mut [f32],
    layers: Vec<ShardLayer<'a>>,
    dx: &'a mut [f32],
    dx0: &'a mut [f32],
    h_last: &'a mut [f32],
    logits: &'a mut [f32],
    dlogits: &'a mut [f32],
}

/// Read-only context of phase 1.
struct Ctx<'a> {
    d: LstmDims,
    params: &'a [Vec<f32>],
    bias: &'a [Vec<f32>],
    w_hh_t: &'a [Vec<f32>],
    inv_batch: f32,
    train: bool,
}

/// The next slice of a split, empty when there is none.
fn next<'a>(it: &mut impl Iterator<Item = &'a mut [f32]>) -> &'a mut [f32] {
    it.next().unwrap_or_default()
}

impl LstmEngine {
    /// Scratch space for `dims`, batches split over `threads` shards.
    pub(super) fn new(dims: LstmDims, threads: usize) -> Self {
        Self {
            dims,
            input: Vec::new(),
            tokens: Vec::new(),
            counts: Vec::new(),
            cap: 0,
            x0: Vec::new(),
            layers: (0..dims.layers).map(|_| LayerBufs::default()).collect(),
            bias: vec![vec![0.0; 4 * dims.hidden]; dims.layers],
            w_hh_t: vec![vec![0.0; 4 * dims.hidden * dims.hidden]; dims.layers],
            dx: Vec::new(),
            dx0: Vec::new(),
            h_last: Vec::new(),
            logits: Vec::new(),
            dlogits: Vec::new(),
            tw: (0..threads.max(1)).map(|_| ThreadWork::default()).collect(),
        }
    }

    /// Values per input sample: the sequence length.
    pub(super) fn input_len(&self) -> usize {
        self.dims.seq_len
    }

    /// The input buffer (token ids as `f32`, `seq_len` per sample).
    pub(super) fn input(&mut self) -> &mut Vec<f32> {
        &mut self.input
    }

    /// The logits of the last batch.
    #[cfg(test)]
    pub(super) fn logits(&self, batch: usize) -> &[f32] {
        &self.logits[..batch * self.dims.classes]
    }

    /// Grows the batch buffers to hold `batch` samples, and the per-thread ones for shards of
    /// `rows` samples.
    fn ensure_capacity(&mut self, batch: usize, rows: usize) {
        let d = self.dims;
        let (hd, h4) = (d.hidden, 4 * d.hidden);
        for tw in &mut self.tw {
            if tw.dh.len() < rows * hd {
                tw.dh.resize(rows * hd, 0.0);
                tw.dc.resize(rows * hd, 0.0);
                tw.dh_last.resize(rows * hd, 0.0);
            }
        }
        if batch <= self.cap {
            return;
        }
        self.cap = batch;
        let tn = d.seq_len * batch;
        self.x0.resize(tn * d.embed, 0.0);
        for lb in &mut self.layers {
            lb.gates.resize(tn * h4, 0.0);
            lb.c.resize(tn * hd, 0.0);
            lb.tc.resize(tn * hd, 0.0);
            lb.h.resize(tn * hd, 0.0);
            lb.dg.resize(tn * h4, 0.0);
        }
        self.dx.resize(tn * hd, 0.0);
        self.dx0.resize(tn * d.embed, 0.0);
        self.h_last.resize(batch * hd, 0.0);
        self.logits.resize(batch * d.classes, 0.0);
        self.dlogits.resize(batch * d.classes, 0.0);
    }

    /// Phase 1 on the batch in [`LstmEngine::input`] with `labels` (checked by the caller):
    /// forward, and backward when `train`.
    ///
    /// # Panics
    /// When an input value is not a token id below the vocabulary size.
    pub(super) fn run(&mut self, params: &[Vec<f32>], labels: &[u32], train: bool) -> BatchStats {
        let d = self.dims;
        let n = labels.len();
        let (tl, hd, h4, cl) = (d.seq_len, d.hidden, 4 * d.hidden, d.classes);
        self.tokens.clear();
        for &v in &self.input {
            assert!(
                v >= 0.0 && v.fract() == 0.0 && (v as usize) < d.vocab,
                "input {v} is not a token id below the vocabulary size {}",
                d.vocab
            );
            self.tokens.push(v as u32);
        }
        self.counts = split_counts(n, self.tw.len());
        self.ensure_capacity(n, self.counts.first().copied().unwrap_or(0));
        for l in 0..d.layers {
            let p = layer_param(l);
            let (w_hh, b_ih, b_hh) = (&params[p + 1], &params[p + 2], &params[p + 3]);
            for (s, (a, b)) in self.bias[l].iter_mut().zip(b_ih.iter().zip(b_hh)) {
                *s = a + b;
            }
            let w_hh_t = &mut self.w_hh_t[l];
            for (r, row) in w_hh.chunks_exact(hd).enumerate() {
                for (k, &w) in row.iter().enumerate() {
                    w_hh_t[k * h4 + r] = w;
                }
            }
        }
        let counts = &self.counts;
        let tcounts: Vec<usize> = counts.iter().map(|&c| c * tl).collect();
        let mut x0 = split_rows(&mut self.x0, d.embed, &tcounts).into_iter();
        let mut dx = split_rows(&mut self.dx, hd, &tcounts).into_iter();
        let mut dx0 = split_rows(&mut self.dx0, d.embed, &tcounts).into_iter();
        let mut h_last = split_rows(&mut self.h_last, hd, counts).into_iter();
        let mut logits = split_rows(&mut self.logits, cl, counts).into_iter();
        let mut dlogits = split_rows(&mut self.dlogits, cl, counts).into_iter();
        let mut layers: Vec<_> = self
            .layers
            .iter_mut()
            .map(|lb| {
                (
                    split_rows(&mut lb.gates, h4, &tcounts).into_iter(),
                    split_rows(&mut lb.c, hd, &tcounts).into_iter(),
                    split_rows(&mut lb.tc, hd, &tcounts).into_iter(),
                    split_rows(&mut lb.h, hd, &tcounts).into_iter(),
                    split_rows(&mut lb.dg, h4, &tcounts).into_iter(),
                )
            })
            .collect();
        let mut first = 0;
        let mut shards = Vec::with_capacity(counts.len());
        for &ns in counts {
            shards.push(Shard {
                n: ns,
                tokens: &self.tokens[first * tl..(first + ns) * tl],
                labels: &labels[first..first + ns],
                x0: next(&mut x0),
                layers: layers
                    .iter_mut()
                    .map(|(g, c, tc, h, dg)| ShardLayer {
                        gates: next(g),
                        c: next(c),
                        tc: next(tc),
                        h: next(h),
                        dg: next(dg),
                    })
                    .collect(),
                dx: next(&mut dx),
                dx0: next(&mut dx0),
                h_last: next(&mut h_last),
                logits: next(&mut logits),
                dlogits: next(&mut dlogits),
            });
            first += ns;
        }
        let ctx = Ctx {
            d,
            params,
            bias: &self.bias,
            w_hh_t: &self.w_hh_t,
            inv_batch: 1.0 / n.max(1) as f32,
            train,
        };
        shards
            .into_par_iter()
            .zip(self.tw.par_iter_mut())
            .for_each(|(mut shard, tw)| ctx.run_shard(&mut shard, tw));
        BatchStats::of_shards(n, self.tw.iter().map(|tw| (tw.loss, tw.correct)))
    }

    /// Phase 2's gradient of one parameter slice over the last batch (after a training
    /// [`LstmEngine::run`]).
    pub(super) fn chunk_grad(&self, c: &mut ParamChunk<'_>) {
        let d = self.dims;
        let (tl, e, hd, h4, cl) = (d.seq_len, d.embed, d.hidden, 4 * d.hidden, d.classes);
        let n: usize = self.counts.iter().sum();
        let tn = tl * n;
        let (r0, r1) = (c.r0, c.r1);
        let np = 1 + 4 * d.layers + 2;
        if n == 0 {
            c.grad.fill(0.0);
        } else if c.p == 0 {
            // Embedding rows r0..r1: scatter-add of the embedded input's gradient.
            c.grad.fill(0.0);
            let mut first = 0;
            for &ns in &self.counts {
                for j in 0..ns {
                    let toks = &self.tokens[(first + j) * tl..(first + j + 1) * tl];
                    for (t, &tok) in toks.iter().enumerate() {
                        let tok = tok as usize;
                        if (r0..r1).contains(&tok) {
                            let r = first * tl + t * ns + j;
                            let g = &mut c.grad[(tok - r0) * e..(tok - r0 + 1) * e];
                            for (g, &v) in g.iter_mut().zip(&self.dx0[r * e..(r + 1) * e]) {
                                *g += v;
                            }
                        }
                    }
                }
                first += ns;
            }
        } else if c.p == np - 2 {
            // fc.weight rows r0..r1 = dZ[:, r0..r1]ᵀ · h_T
            matmul(
                r1 - r0,
                hd,
                n,
                c.grad,
                hd,
                false,
                Mat::rows_t(&self.dlogits[r0..n * cl], cl),
                Mat::rows(&self.h_last[..n * hd], hd),
            );
        } else if c.p == np - 1 {
            column_sums(&self.dlogits[..n * cl], cl, r0, c.grad);
        } else {
            let l = (c.p - 1) / 4;
            let lb = &self.layers[l];
            let dg = &lb.dg[..tn * h4];
            match (c.p - 1) % 4 {
                0 => {
                    // weight_ih rows r0..r1 = dG[:, r0..r1]ᵀ · X
                    let inp = input_width(&d, l);
                    let x = if l == 0 {
                        &self.x0[..tn * e]
                    } else {
                        &self.layers[l - 1].h[..tn * hd]
                    };
                    matmul(
                        r1 - r0,
                        inp,
                        tn,
                        c.grad,
                        inp,
                        false,
                        Mat::rows_t(&dg[r0..], h4),
                        Mat::rows(x, inp),
                    );
                }
                1 if tl == 1 => c.grad.fill(0.0),
                1 => {
                    // weight_hh rows r0..r1 = Σ_t dG_t[:, r0..r1]ᵀ · h_{t−1}: per shard, steps
                    // 1.. against steps ..T−1.
                    let mut first = 0;
                    for &ns in self.counts.iter().filter(|&&ns| ns > 0) {
                        let off = first * tl;
                        matmul(
                            r1 - r0,
                            hd,
                            (tl - 1) * ns,
                            c.grad,
                            hd,
                            first > 0,
                            Mat::rows_t(&dg[(off + ns) * h4 + r0..], h4),
                            Mat::rows(&lb.h[off * hd..], hd),
                        );
                        first += ns;
                    }
                }
                // Both biases get the gate gradients' column sums.
                _ => column_sums(dg, h4, r0, c.grad),
            }
        }
    }
}

/// `out[j] = Σ_rows m[row, c0 + j]` for `j < out.len()`, `m` row-major with rows of `width`.
fn column_sums(m: &[f32], width: usize, c0: usize, out: &mut [f32]) {
    out.fill(0.0);
    let c1 = c0 + out.len();
    for row in m.chunks_exact(width) {
        for (o, &v) in out.iter_mut().zip(&row[c0..c1]) {
            *o += v;
        }
    }
}

impl Ctx<'_> {
    fn run_shard(&self, s: &mut Shard<'_>, tw: &mut ThreadWork) {
        tw.loss = 0.0;
        tw.correct = 0;
        let ns = s.n;
        if ns == 0 {
            return;
        }
        let d = self.d;
        let (tl, e, hd, h4, cl) = (d.seq_len, d.embed, d.hidden, 4 * d.hidden, d.classes);
        let np = self.params.len();
        let emb = &self.params[0];
        for j in 0..ns {
            for (t, &tok) in s.tokens[j * tl..(j + 1) * tl].iter().enumerate() {
                let (tok, r) = (tok as usize, t * ns + j);
                s.x0[r * e..(r + 1) * e].copy_from_slice(&emb[tok * e..(tok + 1) * e]);
            }
        }
        for l in 0..d.layers {
            let w_ih = &self.params[layer_param(l)];
            let inp = input_width(&d, l);
            let (below, rest) = s.layers.split_at_mut(l);
            let lb = &mut rest[0];
            let x: &[f32] = if l == 0 { &*s.x0 } else { &*below[l - 1].h };
            matmul(
                tl * ns,
                h4,
                inp,
                lb.gates,
                h4,
                false,
                Mat::rows(x, inp),
                Mat::rows_t(w_ih, inp),
            );
            let (bias, w_hh_t) = (&self.bias[l][..], &self.w_hh_t[l][..]);
            for t in 0..tl {
                let (h_prev, h_cur) = lb.h.split_at_mut(t * ns * hd);
                let g_t = &mut lb.gates[t * ns * h4..(t + 1) * ns * h4];
                if t > 0 {
                    let hp = Mat::rows(&h_prev[(t - 1) * ns * hd..], hd);
                    matmul(ns, h4, hd, g_t, h4, true, hp, Mat::rows(w_hh_t, h4));
                }
                let (c_prev, c_cur) = lb.c.split_at_mut(t * ns * hd);
                let tc_t = &mut lb.tc[t * ns * hd..(t + 1) * ns * hd];
                let rows = g_t.chunks_exact_mut(h4).zip(c_cur.chunks_exact_mut(hd));
                let rows = rows.zip(tc_t.chunks_exact_mut(hd).zip(h_cur.chunks_exact_mut(hd)));
                for (j, ((g, c), (tc, h))) in rows.take(ns).enumerate() {
                    for (gv, bv) in g.iter_mut().zip(bias) {
                        *gv += bv;
                    }
                    let cp = (t > 0).then(|| &c_prev[((t - 1) * ns + j) * hd..][..hd]);
                    cell_forward(hd, g, cp, c, tc, h);
                }
            }
        }
        // The top layer's last step: rows (T − 1)·n.. of its shard, in sample order.
        let top = &s.layers[d.layers - 1].h;
        s.h_last
            .copy_from_slice(&top[(tl - 1) * ns * hd..tl * ns * hd]);
        let (fc_w, fc_b) = (&self.params[np - 2], &self.params[np - 1]);
        for row in s.logits.chunks_exact_mut(cl) {
            row.copy_from_slice(fc_b);
        }
        matmul(
            ns,
            cl,
            hd,
            s.logits,
            cl,
            true,
            Mat::rows(&*s.h_last, hd),
            Mat::rows_t(fc_w, hd),
        );
        // Softmax cross-entropy, mean over the whole batch.
        for j in 0..ns {
            let logits = &s.logits[j * cl..(j + 1) * cl];
            let label = s.labels[j] as usize;
            let mut best = 0;
            for k in 1..cl {
                if logits[k] > logits[best] {
                    best = k;
                }
            }
            let max = logits[best];
            let sum: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
            let lse = max + sum.ln();
            tw.loss += (lse - logits[label]) as f64;
            tw.correct += usize::from(best == label);
            if self.train {
                let dz = &mut s.dlogits[j * cl..(j + 1) * cl];
                for (dj, &v) in dz.iter_mut().zip(logits) {
                    *dj = (v - lse).exp() * self.inv_batch;
                }
                dz[label] -= self.inv_batch;
            }
        }
        if !self.train {
            return;
        }
        let dh_last = &mut tw.dh_last[..ns * hd];
        matmul(
            ns,
            hd,
            cl,
            dh_last,
            hd,
            false,
            Mat::rows(&*s.dlogits, cl),
            Mat::rows(fc_w, hd),
        );
        let (dh, dc) = (&mut tw.dh[..ns * hd], &mut tw.dc[..ns * hd]);
        for l in (0..d.layers).rev() {
            let p = layer_param(l);
            let (w_ih, w_hh) = (&self.params[p], &self.params[p + 1]);
            let is_top = l + 1 == d.layers;
            let lb = &mut s.layers[l];
            dc.fill(0.0);
            for t in (0..tl).rev() {
                let r0 = t * ns;
                // dh_t = gradient from above + dG_{t+1}·W_hh.
                if !is_top {
                    dh.copy_from_slice(&s.dx[r0 * hd..(r0 + ns) * hd]);
                } else if t + 1 == tl {
                    dh.copy_from_slice(dh_last);
                } else {
                    dh.fill(0.0);
                }
                let (dg_t, dg_next) = lb.dg[r0 * h4..].split_at_mut(ns * h4);
                if t + 1 < tl {
                    let dgn = Mat::rows(&dg_next[..ns * h4], h4);
                    matmul(ns, hd, h4, dh, hd, true, dgn, Mat::rows(w_hh, hd));
                }
                for j in 0..ns {
                    let r = r0 + j;
                    let cp = (t > 0).then(|| &lb.c[(r - ns) * hd..][..hd]);
                    cell_backward(
                        hd,
                        &lb.gates[r * h4..(r + 1) * h4],
                        &lb.tc[r * hd..(r + 1) * hd],
                        cp,
                        &dh[j * hd..(j + 1) * hd],
                        &mut dc[j * hd..(j + 1) * hd],
                        &mut dg_t[j * h4..(j + 1) * h4],
                    );
                }
            }
            // The input's gradient: the lower layer's output gradient (in place: this layer's
            // was consumed above), or the embedded input's.
            let inp = input_width(&d, l);
            let dx: &mut [f32] = if l == 0 { &mut *s.dx0 } else { &mut *s.dx };
            matmul(
                tl * ns,
                inp,
                h4,
                dx,
                inp,
                false,
                Mat::rows(&*lb.dg, h4),
                Mat::rows(w_ih, inp),
            );
        }
    }
}

/// Applies the gate nonlinearities to one sample's `g = [i, f, g, o]` (pre-activations with
/// bias in, activations out) and updates the cell.
#[inline]
fn cell_forward(
    hd: usize,
    g: &mut [f32],
    c_prev: Option<&[f32]>,
    c: &mut [f32],
    tc: &mut [f32],
    h: &mut [f32],
) {
    let (ifg, o) = g.split_at_mut(3 * hd);
    let (i_f, gg) = ifg.split_at_mut(2 * hd);
    sigmoid_inplace(i_f);
    tanh_inplace(gg);
    sigmoid_inplace(o);
    let (i, f) = i_f.split_at(hd);
    let (c, tc, h, gg, o) = (
        &mut c[..hd],
        &mut tc[..hd],
        &mut h[..hd],
        &gg[..hd],
        &o[..hd],
    );
    match c_prev {
        Some(cp) => {
            let cp = &cp[..hd];
            for j in 0..hd {
                c[j] = f[j] * cp[j] + i[j] * gg[j];
            }
        }
        None => {
            for j in 0..hd {
                c[j] = i[j] * gg[j];
            }
        }
    }
    for j in 0..hd {
        tc[j] = tanh(c[j]);
        h[j] = o[j] * tc[j];
    }
}

/// Gate gradients `dg = [di, df, dg, do]` of one sample at one step from `dh` (output plus
/// recurrent gradient of `h_t`); `dc` is the cell gradient from step `t + 1` on entry and the
/// one for step `t − 1` on exit.
#[inline]
fn cell_backward(
    hd: usize,
    g: &[f32],
    tc: &[f32],
    c_prev: Option<&[f32]>,
    dh: &[f32],
    dc: &mut [f32],
    dg: &mut [f32],
) {
    let (i, rest) = g.split_at(hd);
    let (f, rest) = rest.split_at(hd);
    let (gg, o) = rest.split_at(hd);
    let (di, rest) = dg.split_at_mut(hd);
    let (df, rest) = rest.split_at_mut(hd);
    let (dgg, d_o) = rest.split_at_mut(hd);
    let (o, tc, dh, dc, gg, f, d_o) = (
        &o[..hd],
        &tc[..hd],
        &dh[..hd],
        &mut dc[..hd],
        &gg[..hd],
        &f[..hd],
        &mut d_o[..hd],
    );
    for j in 0..hd {
        let dcj = dc[j] + dh[j] * o[j] * (1.0 - tc[j] * tc[j]);
        d_o[j] = dh[j] * tc[j] * o[j] * (1.0 - o[j]);
        di[j] = dcj * gg[j] * i[j] * (1.0 - i[j]);
        dgg[j] = dcj * i[j] * (1.0 - gg[j] * gg[j]);
        dc[j] = dcj;
    }
    match c_prev {
        Some(cp) => {
            let cp = &cp[..hd];
            for j in 0..hd {
                df[j] = dc[j] * cp[j] * f[j] * (1.0 - f[j]);
                dc[j] *= f[j];
            }
        }
        None => df.fill(0.0),
    }
}
