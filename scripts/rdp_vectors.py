#!/usr/bin/env python3
"""Generate reference vectors for the Rust RDP accountant.

The values come from an independent implementation: Google's `dp_accounting`
package (PyPI), which carries TensorFlow Privacy's RDP accountant.  Set up:

    python3 -m venv venv
    venv/bin/pip install dp-accounting mpmath
    venv/bin/python scripts/rdp_vectors.py > tests/data/rdp_vectors.json
    venv/bin/pip install --no-deps opacus && venv/bin/python scripts/rdp_vectors_opacus.py tests/data/rdp_vectors.json

Only the public API of the package is used: an `RdpAccountant` built with the
same order grid as the Rust `DEFAULT_ORDERS`, composed with a
`PoissonSampledDpEvent(q, GaussianDpEvent(sigma))` `steps` times, and read with
`get_epsilon(delta)`.  Noise calibration vectors use
`dp_accounting.calibrate_dp_mechanism`.

A second, series-free value is recorded as `epsilon_quadrature`: the RDP at
every fractional order is obtained by integrating the definition

    A_alpha = integral of N(z; 0, sigma^2) * (1 - q + q exp((2z - 1) / (2 sigma^2)))^alpha dz

numerically with mpmath (30 significant digits), integer orders keep
dp_accounting's exact finite binomial sum, and the same conversion
(`dp_accounting.rdp.compute_epsilon`) is applied.  dp_accounting 0.6.0 sums
the *absolute values* of the generalized binomial series for fractional
orders (an upper bound on A_alpha) and drops fractional orders whose series
has not converged after 1000 terms, so where the optimal order is fractional
and q*exp(1/sigma^2) is not small, its epsilon can sit a few percent above the
exact value; the quadrature column shows by how much.
"""

import importlib.metadata
import json
import logging
import math
import platform
import sys

import dp_accounting
import mpmath
from dp_accounting import rdp as dp_rdp

PACKAGE = "dp-accounting"


def orders():
    """The Rust DEFAULT_ORDERS grid, written as the nearest doubles to the
    decimal values 1.1, 1.2, ..., 10.9, then the integers 11..=63, then
    128, 256, 512, 1024 (the grid dp_accounting itself defaults to)."""
    fine = [round(1 + x / 10, 1) for x in range(1, 100)]
    ints = [float(a) for a in range(11, 64)]
    large = [128.0, 256.0, 512.0, 1024.0]
    return fine + ints + large


QS = [0.001, 0.01, 0.05, 0.1, 0.3, 1.0]
SIGMAS = [0.5, 0.8, 1.0, 1.5, 3.0, 10.0]
STEPS = [1, 10, 100, 1000, 10000]
DELTAS = [1e-5, 1e-3]
EPS_CAP = 1e4

# (target_epsilon, delta, q, steps) for noise calibration.
CALIBRATION = [
    (1.0, 1e-5, 0.01, 1000),
    (8.0, 1e-5, 0.01, 10000),
    (3.0, 1e-5, 0.1, 100),
    (0.5, 1e-5, 0.001, 1000),
    (2.0, 1e-3, 1.0, 10),
    (10.0, 1e-5, 0.3, 1000),
    (1.0, 1e-3, 0.05, 50),
]


def quadrature_rdp(q, sigma, alpha):
    """RDP of one sampled Gaussian step at order alpha by direct integration."""
    s2 = sigma * sigma
    z0 = s2 * math.log(1 / q - 1) + 0.5  # where q*mu1 = (1-q)*mu0
    cuts = sorted({-10 * sigma, 0.0, z0, alpha, alpha + 10 * sigma})

    def integrand(z):
        ratio = mpmath.exp((2 * z - 1) / (2 * s2))
        return mpmath.npdf(z, 0, sigma) * (1 - q + q * ratio) ** alpha

    a = mpmath.quad(integrand, [-mpmath.inf] + cuts + [mpmath.inf])
    return float(mpmath.log(a) / (alpha - 1))


def exact_rdp_per_step(q, sigma, grid):
    """Per-step RDP with quadrature at fractional orders and the exact finite
    sum (from dp_accounting) at integer orders."""
    series = dp_rdp.rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(
        q, sigma, grid
    )
    if q == 1.0:
        return [float(r) for r in series]
    out = []
    for alpha, r in zip(grid, series):
        out.append(float(r) if alpha.is_integer() else quadrature_rdp(q, sigma, alpha))
    return out


def check_quadrature(grid):
    """Largest relative gap between quadrature and the exact integer sum."""
    worst = 0.0
    for q in QS[:-1]:
        for sigma in SIGMAS:
            exact = dp_rdp.rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(
                q, sigma, [2.0, 5.0, 10.0]
            )
            for alpha, r in zip([2.0, 5.0, 10.0], exact):
                worst = max(worst, abs(quadrature_rdp(q, sigma, alpha) - r) / r)
    return worst


def event(q, sigma, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
        steps,
    )


def main():
    # dp_accounting logs a warning for every fractional order whose series has
    # not converged after 1000 terms (it then drops that order); there are
    # hundreds of them on this grid, so keep stderr readable.
    logging.disable(logging.WARNING)
    mpmath.mp.dps = 30
    grid = orders()
    quad_check = check_quadrature(grid)
    vectors = []
    for q in QS:
        for sigma in SIGMAS:
            exact = exact_rdp_per_step(q, sigma, grid)
            for steps in STEPS:
                acct = dp_rdp.RdpAccountant(grid)
                acct.compose(event(q, sigma, steps))
                for delta in DELTAS:
                    eps = float(acct.get_epsilon(delta))
                    if not math.isfinite(eps) or eps > EPS_CAP:
                        continue
                    eps_quad, _ = dp_rdp.rdp_privacy_accountant.compute_epsilon(
                        grid, [r * steps for r in exact], delta
                    )
                    vectors.append(
                        {
                            "q": q,
                            "sigma": sigma,
                            "steps": steps,
                            "delta": delta,
                            "epsilon": eps,
                            "epsilon_quadrature": float(eps_quad),
                        }
                    )

    calibration = []
    for target, delta, q, steps in CALIBRATION:
        sigma = dp_accounting.calibrate_dp_mechanism(
            lambda: dp_rdp.RdpAccountant(grid),
            lambda s, q=q, steps=steps: event(q, s, steps),
            target,
            delta,
        )
        calibration.append(
            {
                "target_epsilon": target,
                "delta": delta,
                "q": q,
                "steps": steps,
                "sigma": float(sigma),
            }
        )

    out = {
        "generator": {
            "package": PACKAGE,
            "version": importlib.metadata.version(PACKAGE),
            "function": "dp_accounting.rdp.RdpAccountant(orders).compose("
            "SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps))"
            ".get_epsilon(delta)",
            "calibration_function": "dp_accounting.calibrate_dp_mechanism"
            " (default bracket and tol=1e-6)",
            "quadrature": f"mpmath {mpmath.__version__}, mp.dps = 30, fractional orders only",
            "quadrature_vs_exact_integer_sum_max_rel": quad_check,
            "python": platform.python_version(),
            "script": "scripts/rdp_vectors.py",
            "dropped": f"combinations with infinite epsilon or epsilon > {EPS_CAP:g}",
        },
        "orders": grid,
        "vectors": vectors,
        "noise_multiplier": calibration,
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
