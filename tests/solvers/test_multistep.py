"""UniPC, DEIS and iPNDM against the closed-form probability-flow map of Gaussian data.

For data ``N(mu, diag(s^2))`` the PF-ODE flow from ``(x_T, T)`` to any ``t`` is
``x_t = alpha_t mu + r_t (x_T - alpha_T mu) / r_T`` with ``r_t = sqrt(alpha_t^2 s^2 + sigma_t^2)``
(see tests/solvers/test_registry.py), so endpoint errors are measured against ground truth.

Why the order tests use these grids. A multistep method warms up with lower orders: its first
step is first order (UniPC: UniP-1 + UniC-1, second order), so its starting error is
``O(h^2)`` (UniPC ``O(h^3)``) times ``d x_hat / d lam``, which scales like ``alpha / sigma`` at
the start. Starting at low SNR (VPLinear's ``t = 1`` has ``alpha/sigma = 0.007``; the log-SNR
grid starts at noise level ``sigma/alpha`` 150 or 1e4) keeps that term below the multistep
core's error for 32-128 steps, so the slope shows the method's order. The grids stop at
``t = 0.1`` / noise level 2e-3: the final step to ``sigma = 0`` is, by construction, UniPC's
first-order limit (tested separately, for convergence on every schedule).
"""

import math

import pytest
import torch
from gaussian_flow import MU, exact_flow, gaussian_denoiser

import tiltflow as tf
import tiltflow.solvers.multistep  # noqa: F401  (registers unipc, unipc_p, deis, ipndm)
from tiltflow import schedules as S
from tiltflow.solvers import grids

ALL = [S.RectifiedFlow(), S.Cosine(), S.VPLinear(), S.VPDiscrete.linear(), S.EDM(), S.VE()]
SOLVERS = ["unipc", "unipc_p", "deis", "ipndm"]


def endpoint_error(schedule, solver, t_grid, options=None):
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_init = float(schedule(t_grid[:1]).sigma) * noise
    x = tf.solvers.solve(gaussian_denoiser(schedule), x_init, t_grid, solver, options=options)
    ref = exact_flow(schedule, x_init, float(t_grid[0]), float(t_grid[-1]))
    return (x - ref).pow(2).sum(1).mean().sqrt().item()


def slope(schedule, solver, options, make_grid, steps=(32, 128)):
    errs = [endpoint_error(schedule, solver, make_grid(n), options) for n in steps]
    return math.log(errs[0] / errs[1]) / math.log(steps[1] / steps[0]), errs


# (solver, options, order): UniPC-p is of order p + 1, UniP-p and DEIS of order p; iPNDM's
# equal-step Adams-Bashforth weights make it second order on grids not uniform in sigma/alpha.
CORE = [
    ("unipc", {"order": 1}, 2), ("unipc", {"order": 2}, 3), ("unipc", {"order": 2, "variant": "bh1"}, 3),
    ("unipc_p", {"order": 1}, 1), ("unipc_p", {"order": 2}, 2),
    ("deis", {"order": 1}, 1), ("deis", {"order": 2}, 2), ("deis", {"order": 3}, 3),
    ("deis", {"order": 4}, 4), ("ipndm", {}, 2),
]
HIGH = [("unipc", {"order": 3}, 4), ("unipc", {"order": 3, "variant": "bh1"}, 4),
        ("unipc_p", {"order": 3}, 3)]


@pytest.mark.parametrize("solver,options,order", CORE + HIGH, ids=str)
def test_order_vplinear_uniform_grid(solver, options, order):
    """Uniform grid in t from 1 to 0.1 on VPLinear: slope of log error vs log steps = order."""
    sched = S.VPLinear()
    s, errs = slope(sched, solver, options, lambda n: grids.uniform(n, t_end=0.1))
    assert abs(s - order) < 0.3, (errs, s)


@pytest.mark.parametrize("schedule", [S.VPLinear(), S.Cosine()], ids=lambda s: s.name)
@pytest.mark.parametrize("solver,options,order", CORE, ids=str)
def test_order_logsnr_grid(schedule, solver, options, order):
    """Grid uniform in log-SNR (cosine: from alpha = 0, a pure-noise first step) down to noise
    level 2e-3. (UniPC-3 / UniP-3 are in the uniform-grid test: on this grid their error
    changes sign near 64 steps, and UniP-3 is superconvergent for Gaussian data.)"""
    s, errs = slope(schedule, solver, options, lambda n: grids.logsnr_uniform(n + 1, schedule)[:-1])
    assert abs(s - order) < 0.3, (errs, s)


def test_ipndm_is_high_order_on_a_grid_uniform_in_noise_level():
    """iPNDM's weights are Adams-Bashforth's for equal steps in sigma/alpha: on such a grid
    (Karras with rho = 1, levels 5 -> 0.05) its error falls at least as h^3 between 64 and
    256 steps (the first-order warm-up's h^2 term and a sign change keep the measured slope
    between 3 and 4), while the 2-step version is exactly second order."""
    sched = S.VPLinear()

    def grid(n):
        return grids.karras(n + 1, sched, rho=1.0, level_max=5.0, level_min=0.05)[:-1]

    s4, errs4 = slope(sched, "ipndm", {"order": 4}, grid, steps=(64, 256))
    s2, errs2 = slope(sched, "ipndm", {"order": 2}, grid, steps=(64, 256))
    assert s4 > 3.0, (errs4, s4)
    assert abs(s2 - 2) < 0.3, (errs2, s2)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
@pytest.mark.parametrize("solver", SOLVERS)
def test_converges_on_every_schedule_with_the_default_grid(schedule, solver):
    """With the default uniform grid down to t = 0 (alpha = 0 at the start of rectified flow
    and cosine; sigma = 0 at the end except VE) the error falls at least 2x when the steps
    grow 4x (half of first order's 4x: UniPC's last step to sigma = 0 is first order in the
    noise level, which on VP schedules makes the uniform grid's error O(1/steps)), and it is
    finite."""
    coarse = endpoint_error(schedule, solver, grids.uniform(16))
    fine = endpoint_error(schedule, solver, grids.uniform(64))
    assert math.isfinite(coarse) and fine < coarse / 2, (coarse, fine)
    for name in grids.available():
        err = endpoint_error(schedule, solver, grids.get_grid(name, 6, schedule))
        assert math.isfinite(err), name


@pytest.mark.parametrize("solver", ["unipc", "unipc_p"])
def test_unipc_is_exact_for_a_point_mass(solver):
    """A constant data prediction is integrated exactly by the data-prediction exponential
    integrator, so a delta at mu lands on mu on every schedule whose t = 0 is clean."""
    for sched in ALL[:-1]:
        den = gaussian_denoiser(sched, s2=torch.zeros(2, dtype=torch.float64) + 1e-30)
        x = tf.sample(den, torch.randn(8, 2, dtype=torch.float64), solver, nfe=5,
                      options={"order": 3})
        torch.testing.assert_close(x, MU.expand(8, 2))


def test_nfe_is_exact():
    calls = []
    for sched in (S.RectifiedFlow(), S.VPLinear()):
        base = gaussian_denoiser(sched)

        def counting(x_t, t, cond=None, base=base):
            calls.append(1)
            return base(x_t, t).data

        den = tf.Denoiser.from_fn(counting, sched, "data")
        for solver in SOLVERS:
            for nfe in (1, 2, 3, 5, 8):
                calls.clear()
                rec = []
                x = tf.sample(den, torch.randn(3, 2, dtype=torch.float64), solver, nfe=nfe,
                              record=rec)
                assert len(calls) == nfe and len(rec) == nfe, (solver, nfe, len(calls))
                assert torch.isfinite(x).all() and torch.equal(rec[-1].x_next, x)


def test_noise_prediction_denoiser_gives_the_same_answer():
    """The solvers read x_hat / eps_hat from the hub, so the prediction kind does not matter."""
    sched = S.VPLinear()
    data_den = gaussian_denoiser(sched)

    def eps_fn(x_t, t, cond=None):
        return data_den(x_t, t).noise

    eps_den = tf.Denoiser.from_fn(eps_fn, sched, "noise")
    noise = torch.randn(4, 2, dtype=torch.float64)
    for solver in SOLVERS:
        a = tf.sample(data_den, noise, solver, nfe=7)
        b = tf.sample(eps_den, noise, solver, nfe=7)
        torch.testing.assert_close(a, b)


def test_bad_options_raise():
    den = gaussian_denoiser(S.RectifiedFlow())
    noise = torch.randn(3, 2)
    bad = [("unipc", {"order": 0}), ("unipc", {"order": 4}), ("unipc", {"order": 2.0}),
           ("unipc_p", {"order": True}), ("deis", {"order": 5}), ("ipndm", {"order": 5}),
           ("deis", {"order": 0})]
    for solver, options in bad:
        with pytest.raises(ValueError, match="order must be an int"):
            tf.sample(den, noise, solver, nfe=4, options=options)
    with pytest.raises(ValueError, match="variant must be 'bh1' or 'bh2'"):
        tf.sample(den, noise, "unipc", nfe=4, options={"variant": "bh3"})
    with pytest.raises(ValueError, match="no option"):
        tf.sample(den, noise, "ipndm", nfe=4, options={"variant": "bh1"})
    with pytest.raises(ValueError, match="nfe=0"):
        tf.sample(den, noise, "deis", nfe=0)
