//! Linear plot axes with "nice" bounds and ticks.

/// A linear axis with "nice" bounds and ticks (steps of 1, 2 or 5 times a power of ten).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Axis {
    pub(super) lo: f64,
    pub(super) hi: f64,
    pub(super) ticks: Vec<f64>,
    /// Decimals of the tick labels.
    decimals: usize,
}

impl Axis {
    /// An axis covering `min..=max` with about `target` intervals and a step of at least `min_step`.
    pub(super) fn new(min: f64, max: f64, target: usize, min_step: f64) -> Axis {
        let fallback = || Axis {
            lo: 0.0,
            hi: 1.0,
            ticks: vec![0.0, 1.0],
            decimals: 0,
        };
        if !(min.is_finite() && max.is_finite()) || min > max {
            return fallback();
        }
        let (mut min, mut max) = (min, max);
        if max - min <= 1e-12 * min.abs().max(max.abs()).max(1e-300) {
            let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
            min -= pad;
            max += pad;
        }
        let raw = (max - min) / target.max(1) as f64;
        let mag = 10f64.powf(raw.log10().floor());
        let norm = raw / mag;
        let nice = if norm <= 1.0 {
            1.0
        } else if norm <= 2.0 {
            2.0
        } else if norm <= 5.0 {
            5.0
        } else {
            10.0
        };
        let step = (nice * mag).max(min_step);
        let lo = (min / step).floor() * step;
        let hi = (max / step).ceil() * step;
        if !(step.is_finite() && step > 0.0 && lo.is_finite() && hi.is_finite() && hi > lo) {
            return fallback();
        }
        let n = ((hi - lo) / step).round().clamp(1.0, 100.0) as usize;
        let ticks = (0..=n)
            .map(|i| {
                let t = lo + i as f64 * step;
                // Avoid "-0" and 0.30000000000000004-style labels at zero.
                if t.abs() < step * 1e-9 {
                    0.0
                } else {
                    t
                }
            })
            .collect();
        let decimals = if step >= 1.0 {
            0
        } else {
            (-(step.log10() + 1e-9).floor()).clamp(0.0, 12.0) as usize
        };
        Axis {
            lo,
            hi,
            ticks,
            decimals,
        }
    }

    /// Drops the ticks outside `lo..=hi` (after the bounds were narrowed).
    pub(super) fn retain_ticks(&mut self) {
        let eps = (self.hi - self.lo) * 1e-9;
        let (lo, hi) = (self.lo, self.hi);
        self.ticks.retain(|&t| t >= lo - eps && t <= hi + eps);
    }

    /// Position of `v` as a fraction of the axis length.
    pub(super) fn frac(&self, v: f64) -> f64 {
        let f = (v - self.lo) / (self.hi - self.lo);
        if f.is_finite() {
            f
        } else {
            0.5
        }
    }

    pub(super) fn label(&self, v: f64) -> String {
        format!("{v:.*}", self.decimals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_ticks_are_nice_and_cover_the_data() {
        let a = Axis::new(0.13, 0.87, 6, 0.0);
        assert_eq!(a.lo, 0.0);
        assert!((a.hi - 1.0).abs() < 1e-12, "{a:?}");
        assert_eq!(a.decimals, 1);
        assert_eq!(a.ticks.len(), 6);
        assert_eq!(a.label(a.ticks[1]), "0.2");

        // Rounds: integer steps only.
        let r = Axis::new(1.0, 3.0, 8, 1.0);
        assert_eq!(r.ticks, vec![1.0, 2.0, 3.0]);
        assert_eq!(r.decimals, 0);

        // A single value gets room around it.
        let s = Axis::new(5.0, 5.0, 6, 0.0);
        assert!(s.lo < 5.0 && s.hi > 5.0, "{s:?}");

        // Garbage falls back to 0..1.
        assert_eq!(Axis::new(f64::NAN, 1.0, 6, 0.0).ticks, vec![0.0, 1.0]);
        assert_eq!(Axis::new(2.0, 1.0, 6, 0.0).ticks, vec![0.0, 1.0]);
    }
}
