"""PF-ODE log-likelihood against exact log-densities of Gaussian mixtures.

The reference for the ODE alone is exact too: starting from ``alpha(t_eps) x`` at ``t_eps``,
the ODE's answer is ``log p_{t_eps}(alpha x) + D log alpha`` (the marginal at t_eps is a
mixture in closed form), which isolates the discretisation error from the O(level^2) start-time
error; that one is checked separately against ``log p_0``.
"""

import math

import pytest
import torch

import tiltflow as tf
from tiltflow import analytic
from tiltflow import schedules as S
from tiltflow.solvers.likelihood import bits_per_dim, default_t_eps, log_likelihood

F64 = torch.float64
MU = torch.tensor([1.0, -2.0], dtype=F64)
S2 = torch.tensor([0.25, 2.0], dtype=F64)
GAUSS = analytic.GaussianMixture(torch.ones(1, dtype=F64), MU[None], torch.diag(S2)[None])
ALL = [S.RectifiedFlow(), S.Cosine(), S.VPLinear(), S.VPDiscrete.linear(), S.EDM(), S.VE()]


def ode_reference(gmm, sched, x):
    """Exact answer of the ODE started at t_eps from alpha(t_eps) x."""
    te = default_t_eps(sched)
    a = float(sched(torch.tensor(te, dtype=F64)).alpha)
    return gmm.marginal(sched, te).log_prob(a * x) + gmm.dim * math.log(a)


@pytest.mark.parametrize("bed", ["eight_gaussians", "anisotropic_2d"])
@pytest.mark.parametrize("sched", [S.RectifiedFlow(), S.VPLinear()], ids=lambda s: s.name)
def test_matches_exact_log_density(bed, sched):
    """The issue's goal: |log p_model - log p_exact| <= 0.01 nats per dimension, at every point
    (256 samples), with RK4, 32 steps and the exact trace of the exact mixture's PF-ODE."""
    gmm = analytic.get_testbed(bed)
    x = gmm.sample(256, generator=torch.Generator().manual_seed(0))
    lp = log_likelihood(gmm.denoiser(sched), x, steps=32, solver="rk4", trace="exact",
                        prior=(gmm.mean, gmm.cov))
    err = (lp - gmm.log_prob(x)).abs() / gmm.dim
    assert err.max() <= 0.01, err.max()
    # the isotropic default-style prior (data variance only) also meets the goal
    lp_iso = log_likelihood(gmm.denoiser(sched), x, steps=32, trace="exact",
                            prior=float(gmm.cov.diagonal().mean()))
    assert ((lp_iso - gmm.log_prob(x)).abs() / gmm.dim).max() <= 0.01


@pytest.mark.parametrize("sched", ALL, ids=lambda s: s.name)
def test_every_schedule(sched):
    """Gaussian data on every schedule (default 'auto' grid): within 0.01 nats/dim of the ODE's
    exact answer, and the start-time error (level 1e-3) is O(level^2 / std^2) ~ 1e-5 per dim;
    VE's t = 0 keeps noise sigma_min = 0.01, so its answer is the log-density of that."""
    x = GAUSS.sample(64, generator=torch.Generator().manual_seed(1))
    lp = log_likelihood(GAUSS.denoiser(sched), x, steps=64, prior=(MU, torch.diag(S2)))
    ref = ode_reference(GAUSS, sched, x)
    assert ((lp - ref).abs() / 2).max() <= 0.01
    if sched.name != "ve":
        assert ((ref - GAUSS.log_prob(x)).abs() / 2).max() <= 1e-4


@pytest.mark.parametrize("sched", [S.RectifiedFlow(), S.Cosine(), S.VPLinear()],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("solver,order,steps", [("euler", 1, (32, 128)), ("heun", 2, (16, 64)),
                                                ("midpoint", 2, (16, 64)), ("rk4", 4, (16, 64))])
def test_convergence_order(sched, solver, order, steps):
    """Slope of log(max error) vs log(steps) matches the Runge-Kutta order (within 0.35)."""
    x = GAUSS.sample(32, generator=torch.Generator().manual_seed(2))
    ref = ode_reference(GAUSS, sched, x)
    den = GAUSS.denoiser(sched)
    errs = [(log_likelihood(den, x, steps=n, solver=solver, grid="uniform",
                            prior=(MU, torch.diag(S2))) - ref).abs().max().item() for n in steps]
    slope = -math.log(errs[1] / errs[0]) / math.log(steps[1] / steps[0])
    assert abs(slope - order) < 0.35, (errs, slope)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    """With fixed probes the trajectory does not depend on z, so the estimate is unbiased for
    the same discretisation with the exact trace: the mean over 400 independent probes per point
    is within 4.5 standard errors of it (8 points; Bonferroni over 8 at ~1e-5 each)."""
    gmm = analytic.anisotropic_2d()
    sched = S.RectifiedFlow()
    den = gmm.denoiser(sched)
    x = gmm.sample(8, generator=torch.Generator().manual_seed(3))
    exact = log_likelihood(den, x, steps=16, trace="exact")
    reps = 400
    hutch = log_likelihood(den, x.repeat(reps, 1), steps=16, trace="hutchinson", probe=probe,
                           generator=torch.Generator().manual_seed(4)).reshape(reps, 8)
    mean, se = hutch.mean(0), hutch.std(0) / math.sqrt(reps)
    assert (se > 0).all()
    assert ((mean - exact).abs() <= 4.5 * se).all(), ((mean - exact) / se)
    # several probes per call average them: 16 independent probes make the variance exactly
    # 1/16 of one probe's, so the std ratio is 1/4 up to the sampling spread of the two sample
    # stds; the SE of log(std) from n draws is sqrt((m4 / m2^2 - 1) / (4 n)) (delta method, with
    # the sample kurtosis: a single Rademacher probe in 2-D takes two values, kurtosis ~1)
    many = log_likelihood(den, x.repeat(50, 1), steps=16, trace="hutchinson", probe=probe,
                          num_probes=16, generator=torch.Generator().manual_seed(5)).reshape(50, 8)

    def log_std_var(v):
        c = v - v.mean(0)
        m2, m4 = c.pow(2).mean(0), c.pow(4).mean(0)
        return (m4 / m2**2 - 1).clamp_min(0) / (4 * v.shape[0])

    log_ratio = torch.log(many.std(0) / hutch.std(0) / 0.25)
    se_log = (log_std_var(many) + log_std_var(hutch)).sqrt()
    assert (log_ratio.abs() <= 5 * se_log).all(), (log_ratio, se_log)


def test_auto_trace_and_16d():
    """On the 16-D bed 'auto' uses the exact trace (D <= 64), and Hutchinson with 64 probes is
    within 5 standard errors of it; both are within 0.01 nats/dim of the exact density."""
    gmm = analytic.random_16d()
    sched = S.RectifiedFlow()
    x = gmm.sample(6, generator=torch.Generator().manual_seed(6))
    den = gmm.denoiser(sched)
    auto = log_likelihood(den, x, steps=24, trace="auto", prior=(gmm.mean, gmm.cov))
    exact = log_likelihood(den, x, steps=24, trace="exact", prior=(gmm.mean, gmm.cov))
    torch.testing.assert_close(auto, exact)
    assert ((exact - gmm.log_prob(x)).abs() / 16).max() <= 0.01
    reps = 8
    h = log_likelihood(den, x.repeat(reps, 1), steps=24, trace="hutchinson", num_probes=8,
                       prior=(gmm.mean, gmm.cov), generator=torch.Generator().manual_seed(7))
    h = h.reshape(reps, -1)
    se = h.std(0) / math.sqrt(reps)
    assert ((h.mean(0) - exact).abs() <= 5 * se + 1e-9).all()


def test_network_calls_and_cond():
    """steps * stages network calls; cond reaches the network."""
    sched = S.RectifiedFlow()
    seen = []
    base = GAUSS.denoiser(sched)

    def fn(x_t, t, cond=None):
        seen.append(cond)
        return base(x_t, t).data

    den = tf.Denoiser.from_fn(fn, sched, "data")
    x = GAUSS.sample(3, generator=torch.Generator().manual_seed(8))
    cond = torch.tensor([0, 1, 2])
    log_likelihood(den, x, steps=5, solver="rk4", cond=cond)
    assert len(seen) == 20 and all(c is cond for c in seen)
    seen.clear()
    log_likelihood(den, x, steps=5, solver="heun")
    assert len(seen) == 10


def test_bits_per_dim_arithmetic():
    """Uniform density on [-1, 1]^D is log p = -D log 2: exactly 8 bits with 256 bins of width
    1/128 (Song et al.'s +7 convention), 1 + log2(127.5) with Ho et al.'s k / 127.5 - 1."""
    D = 3072
    log_p = torch.tensor([-D * math.log(2)], dtype=F64)
    assert bits_per_dim(log_p, D, data_scale=128).item() == pytest.approx(8.0, abs=1e-12)
    assert bits_per_dim(log_p, D).item() == pytest.approx(1 + math.log2(127.5), abs=1e-12)
    # a standard normal at 0: -log p / (D ln 2) = 0.5 log2(2 pi) per dim, plus log2(scale)
    lp0 = torch.tensor([-0.5 * D * math.log(2 * math.pi)], dtype=F64)
    assert bits_per_dim(lp0, D, 1.0).item() == pytest.approx(0.5 * math.log2(2 * math.pi))
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(log_p, 0)


def test_bad_arguments():
    den = GAUSS.denoiser(S.RectifiedFlow())
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="unknown likelihood solver 'rk5'"):
        log_likelihood(den, x, solver="rk5")
    with pytest.raises(ValueError, match="unknown trace"):
        log_likelihood(den, x, trace="approx")
    with pytest.raises(ValueError, match="steps must be an int"):
        log_likelihood(den, x, steps=0)
    with pytest.raises(ValueError, match="num_probes"):
        log_likelihood(den, x, trace="hutchinson", num_probes=0)
    with pytest.raises(ValueError, match="batch first"):
        log_likelihood(den, torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="leading dim 4"):
        log_likelihood(den, x, cond=torch.zeros(3))
    with pytest.raises(ValueError, match="strictly increasing"):
        log_likelihood(den, x, grid=torch.tensor([0.5, 0.1]))
    with pytest.raises(ValueError, match="shape \\[B\\]"):
        log_likelihood(den, x, prior=lambda z: z)
    with pytest.raises(ValueError, match="t_start"):
        log_likelihood(den, x, t_end=0.0005)
