//! Convolution helpers of the CPU engine.
//!
//! Design: activations between convolutions are kept channels-last (HWC): an im2col row of an
//! output position is then `k` runs of `k·C` contiguous values, pooling and its backward run
//! over contiguous channel vectors, and the engine never transposes an activation. The first
//! convolution reads the data set's CHW input through a CHW im2col (cheap: few channels). Weights
//! of convolutions with HWC input are stored `[co][ky][kx][ci]` inside the engine (and the first
//! dense layer after the last convolution has its columns in HWC order); [`Reorder`] converts
//! from and to PyTorch's layouts at the engine's boundary.

/// Geometry of a stride-1 "same" convolution (odd `k`, `pad = (k−1)/2`) on one sample, followed
/// by bias, ReLU and 2×2 max-pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    /// The input is HWC (an earlier convolution's output) rather than the data set's CHW.
    pub hwc_in: bool,
}

impl ConvGeom {
    pub fn pad(&self) -> usize {
        (self.k - 1) / 2
    }
    /// Rows of the im2col matrix: `cin·k·k`.
    pub fn patch(&self) -> usize {
        self.cin * self.k * self.k
    }
    /// Output positions (same size as the input).
    pub fn positions(&self) -> usize {
        self.h * self.w
    }
    /// Pooled output height and width (floor, as PyTorch).
    pub fn pooled(&self) -> (usize, usize) {
        (self.h / 2, self.w / 2)
    }
    pub fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }
    pub fn pooled_len(&self) -> usize {
        let (ph, pw) = self.pooled();
        self.cout * ph * pw
    }
    /// Values of the zero-padded HWC scratch image for `c` channels.
    pub fn padded_len(&self, c: usize) -> usize {
        (self.h + 2 * self.pad()) * (self.w + 2 * self.pad()) * c
    }
}

/// CHW im2col: `col[(c·k·k + ky·k + kx)·P + y·w + x] = x[c, y+ky−pad, x+kx−pad]` (0 outside),
/// `P = h·w`, for a same-size convolution.
pub(crate) fn im2col_chw(x: &[f32], c: usize, h: usize, w: usize, k: usize, col: &mut [f32]) {
    let pad = (k - 1) / 2;
    let p = h * w;
    assert!(x.len() >= c * h * w && col.len() >= c * k * k * p);
    for ci in 0..c {
        let xc = &x[ci * h * w..(ci + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * p..][..p];
                // Valid output columns: 0 ≤ x + kx − pad < w.
                let x0 = pad.saturating_sub(kx).min(w);
                let x1 = (w + pad).saturating_sub(kx).min(w).max(x0);
                for y in 0..h {
                    let out = &mut row[y * w..(y + 1) * w];
                    let yy = y + ky;
                    if yy < pad || yy - pad >= h {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &xc[(yy - pad) * w..(yy - pad + 1) * w];
                    out[..x0].fill(0.0);
                    out[x0..x1].copy_from_slice(&src[x0 + kx - pad..x1 + kx - pad]);
                    out[x1..].fill(0.0);
                }
            }
        }
    }
}

/// HWC im2col: `col[(y·w + x)·k·k·c + (ky·k + kx)·c + ci] = x[y+ky−pad, x+kx−pad, ci]` (0
/// outside), through the zero-padded copy `xpad` (borders must be zero on entry; only the
/// interior is written).
pub(crate) fn im2col_hwc(
    x: &[f32],
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    xpad: &mut [f32],
    col: &mut [f32],
) {
    let pad = (k - 1) / 2;
    let (hp, wp) = (h + 2 * pad, w + 2 * pad);
    let patch = k * k * c;
    assert!(x.len() >= h * w * c && xpad.len() >= hp * wp * c && col.len() >= h * w * patch);
    for y in 0..h {
        let dst = &mut xpad[((y + pad) * wp + pad) * c..][..w * c];
        dst.copy_from_slice(&x[y * w * c..(y + 1) * w * c]);
    }
    let run = k * c;
    for y in 0..h {
        for xx in 0..w {
            let row = &mut col[(y * w + xx) * patch..][..patch];
            for ky in 0..k {
                let src = &xpad[((y + ky) * wp + xx) * c..][..run];
                row[ky * run..(ky + 1) * run].copy_from_slice(src);
            }
        }
    }
}

/// Bias, ReLU and 2×2 max-pool (stride 2, floor) of a conv output `y` (HWC, before bias),
/// writing the pooled values (HWC) and, per pooled value, where its gradient goes: the index
/// (0..4, row-major in the window) of the first maximum, or −1 when ReLU clamped it to 0.
///
/// Design: the route is an f32 so that the backward pass is a branch-free compare-and-select
/// over channel vectors.
pub(crate) fn bias_relu_pool(
    g: &ConvGeom,
    y: &[f32],
    bias: &[f32],
    out: &mut [f32],
    route: &mut [f32],
) {
    let (c, w) = (g.cout, g.w);
    let (ph, pw) = g.pooled();
    let bias = &bias[..c];
    for py in 0..ph {
        for px in 0..pw {
            let at = |dy: usize, dx: usize| &y[((2 * py + dy) * w + 2 * px + dx) * c..][..c];
            let (v0, v1, v2, v3) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
            let o = &mut out[(py * pw + px) * c..][..c];
            let r = &mut route[(py * pw + px) * c..][..c];
            for i in 0..c {
                let (mut best, mut arg) = (v0[i], 0.0f32);
                if v1[i] > best {
                    best = v1[i];
                    arg = 1.0;
                }
                if v2[i] > best {
                    best = v2[i];
                    arg = 2.0;
                }
                if v3[i] > best {
                    best = v3[i];
                    arg = 3.0;
                }
                // max(relu(v + b)) = relu(max(v) + b): bias and ReLU are monotone. ReLU passes
                // the gradient only where its input was positive.
                let v = best + bias[i];
                o[i] = v.max(0.0);
                r[i] = if v > 0.0 { arg } else { -1.0 };
            }
        }
    }
}

/// Backward of [`bias_relu_pool`]: the gradient `dy` (HWC, every value written) of the conv
/// output from the gradient `dout` of the pooled output; adds the bias gradient to `db`.
pub(crate) fn bias_relu_pool_backward(
    g: &ConvGeom,
    route: &[f32],
    dout: &[f32],
    dy: &mut [f32],
    db: &mut [f32],
) {
    let (c, w) = (g.cout, g.w);
    let (ph, pw) = g.pooled();
    if !g.h.is_multiple_of(2) || !g.w.is_multiple_of(2) {
        // Rows and columns outside every window get no gradient.
        dy[..g.positions() * c].fill(0.0);
    }
    let db = &mut db[..c];
    for py in 0..ph {
        for px in 0..pw {
            let base = (py * pw + px) * c;
            let (r, d) = (&route[base..][..c], &dout[base..][..c]);
            for (q, (dy_, dx_)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
                let q = q as f32;
                let dst = &mut dy[((2 * py + dy_) * w + 2 * px + dx_) * c..][..c];
                for ((o, &ri), &di) in dst.iter_mut().zip(r).zip(d) {
                    *o = if ri == q { di } else { 0.0 };
                }
            }
            for ((b, &ri), &di) in db.iter_mut().zip(r).zip(d) {
                *b += if ri >= 0.0 { di } else { 0.0 };
            }
        }
    }
}

/// The kernel of the input-gradient convolution, for an engine-layout weight `w`
/// (`[co][ky][kx][ci]`): `wf[ci][ky'][kx'][co] = w[co][k−1−ky'][k−1−kx'][ci]`, so that
/// `dx = conv(dy, wf)` with the same padding.
pub(crate) fn flip_kernel(w: &[f32], cout: usize, cin: usize, k: usize, wf: &mut [f32]) {
    for co in 0..cout {
        for ky in 0..k {
            for kx in 0..k {
                let src = &w[((co * k + ky) * k + kx) * cin..][..cin];
                let (fy, fx) = (k - 1 - ky, k - 1 - kx);
                for (ci, &v) in src.iter().enumerate() {
                    wf[((ci * k + fy) * k + fx) * cout + co] = v;
                }
            }
        }
    }
}

/// How a parameter's values are ordered inside the engine relative to PyTorch's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reorder {
    /// Same order.
    Same,
    /// Conv weight: PyTorch `[co][ci][ky][kx]`, engine `[co][ky][kx][ci]`.
    ConvHwc { co: usize, ci: usize, k: usize },
    /// Dense weight reading a flattened conv output: PyTorch columns `c·hw + p` (CHW), engine
    /// columns `p·c + ch` (HWC).
    DenseHwc { rows: usize, c: usize, hw: usize },
}

impl Reorder {
    /// Engine index of each PyTorch index, applied as `engine[map(i)] = torch[i]`.
    fn engine_index(&self, i: usize) -> usize {
        match *self {
            Reorder::Same => i,
            Reorder::ConvHwc { ci, k, .. } => {
                let kk = k * k;
                let (co, rest) = (i / (ci * kk), i % (ci * kk));
                let (c, yx) = (rest / kk, rest % kk);
                (co * kk + yx) * ci + c
            }
            Reorder::DenseHwc { c, hw, .. } => {
                let cols = c * hw;
                let (r, col) = (i / cols, i % cols);
                let (ch, p) = (col / hw, col % hw);
                r * cols + p * c + ch
            }
        }
    }

    /// PyTorch order → engine order.
    pub fn to_engine(self, torch: &[f32]) -> Vec<f32> {
        if self == Reorder::Same {
            return torch.to_vec();
        }
        let mut out = vec![0.0; torch.len()];
        for (i, &v) in torch.iter().enumerate() {
            out[self.engine_index(i)] = v;
        }
        out
    }

    /// Engine order → PyTorch order.
    pub fn to_torch(self, engine: &[f32]) -> Vec<f32> {
        if self == Reorder::Same {
            return engine.to_vec();
        }
        (0..engine.len())
            .map(|i| engine[self.engine_index(i)])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn im2col_chw_small() {
        // 1 channel 2x2, k=3 → 2x2 outputs, 9 rows.
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut col = vec![f32::NAN; 9 * 4];
        im2col_chw(&x, 1, 2, 2, 3, &mut col);
        // Row (ky=1,kx=1) is the input itself.
        assert_eq!(&col[4 * 4..5 * 4], &x);
        // Row (ky=0,kx=0): x[y-1, x-1] → only output (1,1) sees x[0,0].
        assert_eq!(&col[0..4], &[0.0, 0.0, 0.0, 1.0]);
        // Row (ky=2,kx=2): x[y+1, x+1] → only output (0,0) sees x[1,1].
        assert_eq!(&col[8 * 4..9 * 4], &[4.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn im2col_hwc_matches_chw() {
        let (h, w, c, k) = (3, 4, 2, 3);
        let chw: Vec<f32> = (0..c * h * w).map(|v| v as f32 + 1.0).collect();
        let mut hwc = vec![0.0; c * h * w];
        for ch in 0..c {
            for p in 0..h * w {
                hwc[p * c + ch] = chw[ch * h * w + p];
            }
        }
        let patch = c * k * k;
        let mut a = vec![0.0; patch * h * w];
        im2col_chw(&chw, c, h, w, k, &mut a);
        let mut xpad = vec![0.0; (h + 2) * (w + 2) * c];
        let mut b = vec![f32::NAN; patch * h * w];
        im2col_hwc(&hwc, h, w, c, k, &mut xpad, &mut b);
        for p in 0..h * w {
            for ch in 0..c {
                for yx in 0..k * k {
                    assert_eq!(b[p * patch + yx * c + ch], a[(ch * k * k + yx) * h * w + p]);
                }
            }
        }
    }

    #[test]
    fn pool_and_backward() {
        let g = ConvGeom {
            cin: 1,
            cout: 1,
            h: 2,
            w: 3,
            k: 1,
            hwc_in: true,
        };
        // 2x3 output; pooling floors to 1x1 over the first 2x2 window.
        let y = [0.5, -1.0, 9.0, 2.0, 2.0, 9.0];
        let mut out = [0.0];
        let mut route = [0.0];
        bias_relu_pool(&g, &y, &[-1.0], &mut out, &mut route);
        assert_eq!(out, [1.0]);
        assert_eq!(route, [2.0]); // first of the tied maxima (1,0) and (1,1)
        let mut dy = [7.0; 6];
        let mut db = [0.0];
        bias_relu_pool_backward(&g, &route, &[3.0], &mut dy, &mut db);
        assert_eq!(dy, [0.0, 0.0, 0.0, 3.0, 0.0, 0.0]);
        assert_eq!(db, [3.0]);
        // A window clamped by ReLU passes no gradient.
        bias_relu_pool(&g, &y, &[-5.0], &mut out, &mut route);
        assert_eq!((out, route), ([0.0], [-1.0]));
        bias_relu_pool_backward(&g, &route, &[3.0], &mut dy, &mut db);
        assert_eq!(dy, [0.0; 6]);
        assert_eq!(db, [3.0]);
    }

    #[test]
    fn reorder_round_trips() {
        for r in [
            Reorder::Same,
            Reorder::ConvHwc { co: 3, ci: 2, k: 3 },
            Reorder::DenseHwc {
                rows: 2,
                c: 3,
                hw: 4,
            },
        ] {
            let n = match r {
                Reorder::ConvHwc { co, ci, k } => co * ci * k * k,
                _ => 24,
            };
            let torch: Vec<f32> = (0..n).map(|v| v as f32).collect();
            let engine = r.to_engine(&torch);
            assert_eq!(r.to_torch(&engine), torch);
        }
        // Conv: torch [co=0][ci=1][ky=0][kx=2] (index 1·9 + 2 = 11) → engine [0][0][2][1] = 2·2 + 1.
        let r = Reorder::ConvHwc { co: 1, ci: 2, k: 3 };
        assert_eq!(
            r.to_engine(&(0..18).map(|v| v as f32).collect::<Vec<_>>())[5],
            11.0
        );
    }
}
