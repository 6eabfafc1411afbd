//! A bounds-checked wrapper over the `gemm` crate's single-threaded f32 matrix product.

/// A strided read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with rows of `ld` values.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with rows of `ld` values.
    pub fn rows_t(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: ld,
        }
    }

    fn check(&self, r: usize, c: usize, what: &str) {
        if r > 0 && c > 0 {
            let last = (r - 1) * self.rs + (c - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "gemm {what}: {r}x{c} view (rs {}, cs {}) overruns {} values",
                self.rs,
                self.cs,
                self.data.len()
            );
        }
    }
}

/// `dst[m×n] (row-major, rows of dst_ld) = A·B` (or `+= A·B` when `accumulate`), with `A` of
/// `m×k` and `B` of `k×n`, on the calling thread.
///
/// # Panics
/// When a view would read or write outside its slice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_ld: usize,
    accumulate: bool,
    a: Mat<'_>,
    b: Mat<'_>,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_ld + n <= dst.len() && n <= dst_ld,
        "gemm dst: {m}x{n} (ld {dst_ld}) overruns {} values",
        dst.len()
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_ld..r * dst_ld + n].fill(0.0);
            }
        }
        return;
    }
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    // SAFETY: the asserts above keep every element the product reads (A, B) or writes (dst)
    // inside its slice; `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_ld as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: Mat<'_>, b: Mat<'_>) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|l| a.data[i * a.rs + l * a.cs] * b.data[l * b.rs + j * b.cs])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matches_naive_for_all_layouts() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|v| v as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|v| (v as f32).sin()).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let av = if ta {
                Mat::rows_t(&a, m)
            } else {
                Mat::rows(&a, k)
            };
            let bv = if tb {
                Mat::rows_t(&b, k)
            } else {
                Mat::rows(&b, n)
            };
            let want = naive(m, n, k, av, bv);
            let mut got = vec![1.0; m * n];
            matmul(m, n, k, &mut got, n, false, av, bv);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4);
            }
            matmul(m, n, k, &mut got, n, true, av, bv);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - 2.0 * w).abs() < 1e-4);
            }
        }
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn out_of_bounds_panics() {
        let a = vec![0.0; 5];
        let mut d = vec![0.0; 4];
        matmul(
            2,
            2,
            3,
            &mut d,
            2,
            false,
            Mat::rows(&a, 3),
            Mat::rows(&a, 2),
        );
    }
}
