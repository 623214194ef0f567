"""Checks of ``tiltflow.schedules`` against autograd, definitions and independent formulas.

Tolerances: float64 closed forms agree to round-off; ``1e-10`` relative leaves room for the
``log``/``exp`` chains (condition numbers up to ~1e3 near the endpoints).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiltflow import schedules
from tiltflow.schedules import Schedule, change_of_schedule, get_schedule

F64 = torch.float64
RTOL = 1e-10
EPS = torch.finfo(F64).eps


def make_all():
    return schedules.examples()


ALL = make_all()
VP = ["cosine", "vp_linear", "vp_discrete_linear", "vp_discrete_scaled_linear"]


def interior(n=64, lo=0.02, hi=0.98, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, dtype=F64, generator=g)


def grad(f, t):
    """Elementwise d f / d t by autograd (zero where f does not depend on t, e.g. alpha = 1)."""
    y = f(t)
    if not y.requires_grad:
        return torch.zeros_like(t)
    return torch.autograd.grad(y.sum(), t)[0]


@pytest.mark.parametrize("name", list(ALL))
def test_derivatives_match_autograd(name):
    s = ALL[name]
    t = interior().requires_grad_(True)
    da, ds = grad(s.alpha, t), grad(s.sigma, t)
    c = s(t.detach())
    assert torch.allclose(c.d_alpha, da, rtol=RTOL, atol=RTOL * da.abs().max().clamp_min(1))
    assert torch.allclose(c.d_sigma, ds, rtol=RTOL, atol=RTOL * ds.abs().max())
    assert c.alpha.shape == t.shape and c.alpha.dtype == F64


@pytest.mark.parametrize("name", list(ALL))
def test_logsnr_definition_and_monotone(name):
    s = ALL[name]
    t = interior()
    lam = s.logsnr(t)
    assert torch.allclose(lam, 2 * torch.log(s.alpha(t) / s.sigma(t)), rtol=RTOL, atol=RTOL)
    grid = torch.linspace(1e-3, 1 - 1e-3, 2001, dtype=F64)
    assert bool((s.logsnr(grid).diff() < 0).all())


@pytest.mark.parametrize("name", list(ALL))
def test_t_from_logsnr_inverts_and_matches_bisection(name):
    s = ALL[name]
    t = interior()
    lam = s.logsnr(t)
    back = s.t_from_logsnr(lam)
    assert torch.allclose(back, t, rtol=RTOL, atol=RTOL)
    # the closed form agrees with the generic base-class bisection
    assert torch.allclose(Schedule.t_from_logsnr(s, lam), back, rtol=RTOL, atol=RTOL)
    assert s.t_from_logsnr(lam.float()).dtype == torch.float32


@pytest.mark.parametrize("name", VP)
def test_variance_preserving(name):
    c = ALL[name](interior())
    # alpha and sigma each carry a few ulps (one exp / sqrt / trig chain); squaring and adding
    # two numbers <= 1 keeps that: a few dozen eps (1e-14 = 45 eps)
    assert torch.allclose(c.alpha**2 + c.sigma**2, torch.ones_like(c.alpha), rtol=0, atol=1e-14)


def test_vp_discrete_knots_reproduce_alphas_cumprod():
    for ctor, (b0, b1, sq) in [
        (schedules.VPDiscrete.linear, (1e-4, 0.02, False)),
        (schedules.VPDiscrete.scaled_linear, (0.00085, 0.012, True)),
    ]:
        s = ctor()
        n = s.num_steps
        # diffusers' tables, rebuilt independently in numpy
        betas = np.linspace(b0**0.5, b1**0.5, n) ** 2 if sq else np.linspace(b0, b1, n)
        ac = np.cumprod(1 - betas)
        # two running products of n rounded factors differ by at most 2 n eps relative
        prod_tol = 2 * n * EPS
        assert np.allclose(s.alphas_cumprod.numpy(), ac, rtol=prod_tol, atol=0)
        # alpha(t)^2 = exp(2 * (0.5 log ac)) at the knots adds the rounding of log and exp,
        # ~ (|log ac| + 4) eps relative
        exp_tol = prod_tol + (abs(float(np.log(ac[-1]))) + 4) * EPS
        t = (torch.arange(n, dtype=F64) + 1) / n
        assert np.allclose((s.alpha(t) ** 2).numpy(), ac, rtol=exp_tol, atol=0)
        assert float(s.alpha(torch.zeros((), dtype=F64))) == 1.0


@pytest.mark.parametrize("dst_name", list(ALL))
def test_change_of_schedule_maps_states(dst_name):
    dst = ALL[dst_name]
    g = torch.Generator().manual_seed(1)
    lam = -4.5 + 13 * torch.rand(32, dtype=F64, generator=g)  # log-SNRs every schedule reaches
    t = dst.t_from_logsnr(lam)
    x = torch.randn(32, 3, dtype=F64, generator=g)
    noise = torch.randn(32, 3, dtype=F64, generator=g)
    cd = dst(t).expand(x)
    x_dst = cd.alpha * x + cd.sigma * noise
    for src in ALL.values():
        s, scale = change_of_schedule(src, dst, t)
        cs = src(s).expand(x)
        x_src = cs.alpha * x + cs.sigma * noise
        # a log/exp chain (logsnr, then t_from_logsnr) through two schedules: RTOL (module
        # docstring)
        assert torch.allclose(x_dst, scale[:, None] * x_src, rtol=RTOL, atol=RTOL), src.name
        assert bool(((s >= 0) & (s <= 1)).all())


@pytest.mark.parametrize("name", list(ALL))
def test_get_schedule_round_trips_config(name):
    s = ALL[name]
    r = get_schedule(s.config())
    assert type(r) is type(s) and r.config() == s.config()
    t = interior(8)
    assert torch.equal(r.alpha(t), s.alpha(t)) and torch.equal(r.sigma(t), s.sigma(t))
    assert get_schedule(s) is s


def test_get_schedule_by_name():
    for name in ["rectified_flow", "cosine", "vp_linear", "ve", "edm"]:
        assert get_schedule(name).name == name
    assert torch.equal(get_schedule("vp_discrete_linear").alphas_cumprod,
                       schedules.VPDiscrete.linear().alphas_cumprod)
    assert torch.equal(get_schedule({"name": "vp_discrete_scaled_linear"}).alphas_cumprod,
                       schedules.VPDiscrete.scaled_linear().alphas_cumprod)
    assert get_schedule({"name": "vp_linear", "beta_max": 10.0}).beta_max == 10.0
    assert set(schedules.available()) >= set(ALL)
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("nope")


def test_bad_arguments_raise():
    bad = [
        lambda: schedules.VPLinear(0.0, 20.0),
        lambda: schedules.VPLinear(5.0, 1.0),
        lambda: schedules.VE(0.0, 1.0),
        lambda: schedules.VE(2.0, 1.0),
        lambda: schedules.EDM(sigma_max=-1.0),
        lambda: schedules.EDM(sigma_data=0.0),
        lambda: schedules.VPDiscrete([0.5]),
        lambda: schedules.VPDiscrete([0.5, 0.7]),
        lambda: schedules.VPDiscrete([1.0, 0.5]),
        lambda: schedules.VPDiscrete([0.9, 0.0]),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()
    with pytest.raises(TypeError, match="float"):
        schedules.RectifiedFlow()(torch.tensor([1, 0]))


def test_coeffs_expand_and_prior_std():
    c = schedules.Cosine()(torch.tensor([0.1, 0.5], dtype=F64))
    e = c.expand(torch.zeros(2, 3, 4, 5, dtype=torch.float32))
    assert e.alpha.shape == (2, 1, 1, 1) and e.alpha.dtype == torch.float32
    assert schedules.RectifiedFlow().prior_std() == pytest.approx(1.0, abs=1e-15)
    assert schedules.VE().prior_std(2.0) == pytest.approx(math.sqrt(4 + 50.0**2), rel=1e-14)
    assert schedules.EDM().prior_std(0.5) == pytest.approx(math.sqrt(0.25 + 80.0**2), rel=1e-14)
