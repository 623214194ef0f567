"""The precomputation that keeps the solvers' per-step overhead low gives the same numbers as
the plain formulas: VPDiscrete's single-lookup coefficients, fast scalar ``Coeffs``, UniPC's
weights computed for all steps at once, and the multistep / Runge–Kutta updates that read
``x_hat`` or the velocity straight from the network output."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import tiltflow as tf
from tiltflow import schedules
from tiltflow.solvers import dpm, multistep

F64 = torch.float64


def _net(x_t, t, cond=None):
    w = torch.tensor([[0.7, -0.3], [0.2, 0.9]], dtype=x_t.dtype)
    return torch.tanh(x_t @ w) * (1 + t[:, None]) + 0.3 * x_t * torch.cos(3 * t[:, None])


def test_vp_discrete_call_equals_per_coefficient_methods():
    sched = schedules.VPDiscrete.linear()
    for dtype in (F64, torch.float32):
        t = torch.cat([torch.tensor([0.0, 1e-4, 1.0]), torch.rand(50)]).to(dtype)
        c = sched(t)
        for got, want in zip(c.as_tuple(), (sched.alpha(t), sched.sigma(t), sched.d_alpha(t),
                                            sched.d_sigma(t)), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name", sorted(schedules.examples()))
def test_scalars_are_the_tensor_coefficients(name):
    sched = schedules.examples()[name]
    times = [1.0, 0.7, 0.31, 0.0]
    tensor = sched(torch.tensor(times, dtype=F64))
    scalars = sched.scalars(times)
    for i, c in enumerate(scalars):
        assert c.is_scalar and c.maps == {}
        assert c == schedules.Coeffs(*(v[i].numpy()[()] for v in tensor.as_tuple()))
        with pytest.raises(dataclasses.FrozenInstanceError):
            c.alpha = 0.0
    assert scalars[0].maps is not scalars[1].maps


def test_vandermonde_solve_on_arrays_leaves_b_unchanged():
    nodes = [np.array([0.3, -0.5]), np.array([0.8, 0.6]), 1.0]  # one system per element
    b = [np.array([1.0, 2.0]), np.array([0.5, -1.0]), np.array([0.25, 0.1])]
    kept = [v.copy() for v in b]
    a = multistep._solve_vandermonde(nodes, b)
    for v, w in zip(b, kept, strict=True):
        assert (v == w).all()
    for j in range(2):  # each element is the scalar solve
        col = multistep._solve_vandermonde([float(n) if isinstance(n, float) else float(n[j])
                                            for n in nodes], [float(v[j]) for v in b])
        assert [float(v[j]) for v in a] == pytest.approx(col, rel=1e-14)


def _unipc_plan_per_step(denoiser, grid, order, variant, use_corrector, lower_order_final):
    """The plan one step at a time in python floats (the vectorized plan's reference)."""
    alpha, sigma = multistep._alpha_sigma(denoiser, grid)
    lam = [multistep._half_logsnr(a, s) for a, s in zip(alpha, sigma, strict=True)]
    steps = len(grid) - 1
    plan = []
    for i in range(steps):
        if sigma[i + 1] == 0.0:
            plan.append((0.0, [alpha[i + 1]], None))
            continue
        p = 1
        while p < min(order, i + 1) and lam[i - p] > -math.inf:
            p += 1
        if lower_order_final and steps < 10:
            p = min(p, steps - i)
        plan.append(multistep._unipc_step_plan(
            alpha[i + 1], sigma[i + 1], sigma[i], [lam[i - k] for k in range(p)], lam[i + 1], p,
            variant, use_corrector and i < steps - 1))
    return plan


@pytest.mark.parametrize("name", ["vp_discrete_linear", "rectified_flow", "cosine", "edm"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("corrector", [True, False])
def test_unipc_vectorized_plan_equals_per_step_plan(name, order, variant, corrector):
    sched = schedules.examples()[name]
    den = tf.Denoiser.from_fn(_net, sched, "noise")
    for steps in (3, 8, 25):
        grid = tf.solvers.grids.uniform(steps)
        got = multistep._unipc_plan(den, grid, order, variant, corrector, True)
        want = _unipc_plan_per_step(den, grid, order, variant, corrector, True)
        for g, w in zip(got, want, strict=True):
            assert float(g[0]) == pytest.approx(float(w[0]), rel=1e-13)
            assert [float(v) for v in g[1]] == pytest.approx([float(v) for v in w[1]], rel=1e-12)
            assert (g[2] is None) == (w[2] is None)
            if g[2] is not None:
                assert [float(v) for v in g[2]] == pytest.approx([float(v) for v in w[2]],
                                                                 rel=1e-12)


def _multistep_reference(denoiser, x, grid, order):
    """DPM-Solver++(2M/3M) with the stored data predictions added term by term."""
    plan = dpm._multistep_plan(denoiser.schedule, grid, order, True)
    history = []
    for i, (A, c) in enumerate(plan):
        data = denoiser(x, torch.full((x.shape[0],), float(grid[i]), dtype=x.dtype)).data
        history = [data, *history]
        x = A * x + sum(cj * h for cj, h in zip(c, history, strict=False))
    return x


@pytest.mark.parametrize("solver,order", [("dpmpp_2m", 2), ("dpmpp_3m", 3)])
@pytest.mark.parametrize("kind", ["noise", "data", "velocity"])
@pytest.mark.parametrize("steps", [4, 20])
def test_multistep_equals_term_by_term_update(solver, order, kind, steps):
    den = tf.Denoiser.from_fn(_net, schedules.VPLinear(), kind)
    grid = tf.solvers.grids.uniform(steps)
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    got = tf.solvers.solve(den, x, grid, solver)
    want = _multistep_reference(den, x, grid, order)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max())


@pytest.mark.parametrize("kind", ["noise", "data", "velocity"])
def test_midpoint_and_rk4_equal_their_tableaux(kind):
    """Stages read as combinations of the network output give the textbook RK updates."""
    den = tf.Denoiser.from_fn(_net, schedules.Cosine(), kind)
    grid = torch.linspace(0.95, 0.05, 7, dtype=F64)
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(2))

    def v(x, t):
        return den(x, torch.full((x.shape[0],), t, dtype=F64)).velocity

    for solver in ("midpoint", "rk4"):
        want = x
        for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
            h = t_next - t
            if solver == "midpoint":
                want = want + h * v(want + h / 2 * v(want, t), t + h / 2)
            else:
                k1 = v(want, t)
                k2 = v(want + h / 2 * k1, t + h / 2)
                k3 = v(want + h / 2 * k2, t + h / 2)
                k4 = v(want + h * k3, t + h)
                want = want + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        got = tf.solvers.solve(den, x, grid, solver)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
