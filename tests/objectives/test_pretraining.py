"""Objectives: each loss at the exact denoiser equals its analytic minimum.

Data: one Gaussian ``N(mu, S)`` in D = 2 with a full covariance. With ``x_t = a x + s noise`` and
``C = a^2 S + s^2 I`` (Bishop 2006, sec. 2.3.3):

- ``E[x | x_t] = mu + a S C^{-1} (x_t - a mu)`` (the exact denoiser, written here in closed form);
- for any target ``u = p x + q noise``:
  ``tr Var(u | x_t) = tr(p^2 S + q^2 I - K C^{-1} K)`` with ``K = p a S + q s I`` — the minimum of
  ``E||u_hat - u||^2`` at that t (eps: p=0, q=1; data: p=1, q=0; velocity: p=a', q=s');
- score matching: ``E[1/2 ||s||^2 + tr grad s] = -1/2 tr C^{-1}`` at the exact score.

The per-t minimum is integrated against each objective's own time / noise-level density
(scipy quad or an exact finite sum), divided by D (``reduction="mean"``), and compared with the
Monte-Carlo mean of the objective evaluated with the exact denoiser; the tolerance is
``Z = 5`` standard errors computed from the per-example losses (false-alarm rate < 1e-6 per
check). Quadrature errors are far below that (quad's epsabs 1e-10).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.integrate as si
import scipy.optimize as so
import scipy.stats as ss
import torch

import tiltflow
from tiltflow import objectives, schedules
from tiltflow.objectives import couplings, timesampling

Z = 5.0  # Monte-Carlo tolerance in standard errors
B = 100_000  # Monte-Carlo batch
D = 2
MU = np.array([0.5, -0.3])
S = np.array([[1.0, 0.6], [0.6, 0.8]])
I2 = np.eye(D)
MU_T = torch.tensor(MU, dtype=torch.float64)
S_T = torch.tensor(S, dtype=torch.float64)


# -- exact Gaussian quantities -----------------------------------------------------------------
def coeffs(schedule, t: float):
    c = schedule(torch.tensor(t, dtype=torch.float64))
    return float(c.alpha), float(c.sigma), float(c.d_alpha), float(c.d_sigma)


def cond_var_trace(p, q, a, s):
    """tr Var(p x + q noise | x_t) for x_t = a x + s noise."""
    C = a * a * S + s * s * I2
    K = p * a * S + q * s * I2
    return float(np.trace(p * p * S + q * q * I2 - K @ np.linalg.solve(C, K)))


def neg_half_fisher(a, s):
    """E[1/2 ||score||^2 + tr grad score] = -1/2 tr C^{-1} at the exact score of p_t."""
    return -0.5 * float(np.trace(np.linalg.inv(a * a * S + s * s * I2)))


def exact_fn(schedule, shift=None):
    """E[x | x_t] under ``schedule``; ``shift`` perturbs it by ``sigma(t) * shift``, which stays
    a bounded perturbation of every prediction kind (noise, velocity, weighted score)."""

    def fn(x_t, t, cond=None):
        c = schedule(t.to(torch.float64))
        a, s = c.alpha.to(x_t.dtype)[:, None, None], c.sigma.to(x_t.dtype)[:, None, None]
        cov = a**2 * S_T + s**2 * torch.eye(D, dtype=x_t.dtype)
        r = torch.linalg.solve(cov, (x_t - a[..., 0] * MU_T).unsqueeze(-1))
        out = MU_T + (a * S_T @ r).squeeze(-1)
        return out if shift is None else out + s[..., 0] * torch.as_tensor(shift, dtype=x_t.dtype)

    return fn


def exact_denoiser(schedule, shift=None):
    return tiltflow.Denoiser.from_fn(exact_fn(schedule, shift), schedule, prediction="data")


def data_batch(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=g, dtype=torch.float64)
    return {"x": MU_T + z @ torch.linalg.cholesky(S_T).T, "cond": None}


def mc_check(loss, expected, z=Z):
    loss = loss.detach().double()
    assert loss.shape == (B,)
    mean, se = float(loss.mean()), float(loss.std()) / math.sqrt(loss.numel())
    assert abs(mean - expected) <= z * se, (
        f"MC mean {mean:.5f} vs analytic {expected:.5f} (SE {se:.2e})"
    )
    return mean, se


def quad(f, lo, hi):
    return si.quad(f, lo, hi, limit=400, epsabs=1e-10, epsrel=1e-10)[0]


# -- analytic minima of each objective ---------------------------------------------------------
def ddpm_expected(obj, schedule):
    def eps_min(t):
        a, s, _, _ = coeffs(schedule, t)
        return cond_var_trace(0, 1, a, s) / D

    if isinstance(schedule, schedules.VPDiscrete):
        n = schedule.num_steps
        ac = schedule.alphas_cumprod.numpy()
        mins = np.array([cond_var_trace(0, 1, math.sqrt(v), math.sqrt(1 - v)) / D for v in ac])
        if obj.weighting == "simple":
            return float(mins.mean())
        snr = ac / (1 - ac)
        w = (n - 1) / 2 * (snr[:-1] / snr[1:] - 1)  # steps k = 1..N-1
        return float(np.mean(w * mins[1:]))
    lo, hi = obj.t_min, obj.t_max
    if obj.weighting == "simple":
        return quad(eps_min, lo, hi) / (hi - lo)

    def weighted(t):
        a, s, da, ds = coeffs(schedule, t)
        return (ds / s - da / a) * eps_min(t)

    return quad(weighted, lo, hi)


def ncsn_expected(obj, schedule):
    lo, hi = obj.levels(schedule)

    def at(sig):
        return 0.5 * cond_var_trace(0, 1, 1.0, sig) / D

    if obj.num_levels is None:
        return quad(lambda u: at(hi * (lo / hi) ** u), 0.0, 1.0)
    return float(np.mean([at(s) for s in np.geomspace(hi, lo, obj.num_levels)]))


def ssm_expected(obj, schedule):
    def f(t):
        a, s, _, _ = coeffs(schedule, t)
        return s * s * neg_half_fisher(a, s) / D

    return quad(f, obj.t_min, obj.t_max) / (obj.t_max - obj.t_min)


def edm_expected(obj, sigma_data):
    def f(z):
        sig = math.exp(obj.p_mean + obj.p_std * z)
        lam = (sig**2 + sigma_data**2) / (sig * sigma_data) ** 2
        return ss.norm.pdf(z) * lam * cond_var_trace(1, 0, 1.0, sig) / D

    return quad(f, -12, 12)


def fm_expected(schedule, density, target="velocity", eps=1e-5):
    def at(t):
        a, s, da, ds = coeffs(schedule, t)
        p, q = (da, ds) if target == "velocity" else (-1.0, 1.0)
        return cond_var_trace(p, q, a, s) / D

    # t is clamped to [eps, 1 - eps]: the clamped mass sits at the ends
    mass_lo, mass_hi = quad(density, 0, eps), quad(density, 1 - eps, 1)
    return (
        quad(lambda t: density(t) * at(t), eps, 1 - eps) + mass_lo * at(eps) + mass_hi * at(1 - eps)
    )


# independent formulas for the SD3 time densities (not the module's)
def logit_normal_pdf(m, s):
    return lambda t: ss.norm.pdf((math.log(t / (1 - t)) - m) / s) / (s * t * (1 - t))


def mode_map(u, s):
    return 1 - u - s * (math.cos(math.pi * u / 2) ** 2 - 1 + u)


def mode_cdf(s):
    """P(T <= t) = 1 - f^{-1}(t) (f decreasing), inverted with brentq."""
    return lambda t: 1 - so.brentq(lambda u: mode_map(u, s) - t, 0.0, 1.0, xtol=1e-14)


def mode_pdf(s):
    def pdf(t):
        u = so.brentq(lambda u: mode_map(u, s) - t, 0.0, 1.0, xtol=1e-14)
        return 1.0 / abs(-1 - s + s * math.pi / 2 * math.sin(math.pi * u))

    return pdf


# -- exact minimum: one test per objective / setting ------------------------------------------
@pytest.mark.parametrize(
    "spec, schedule",
    [
        ({"name": "ddpm"}, schedules.VPLinear()),
        ({"name": "ddpm"}, schedules.Cosine()),
        ({"name": "ddpm"}, schedules.VPDiscrete.linear()),
        (
            {"name": "ddpm", "weighting": "elbo", "t_min": 0.01, "t_max": 0.99},
            schedules.RectifiedFlow(),
        ),
        ({"name": "ddpm", "weighting": "elbo", "t_min": 0.01}, schedules.VPLinear()),
        ({"name": "ddpm", "weighting": "elbo"}, schedules.VPDiscrete.linear()),
    ],
    ids=["simple-vp", "simple-cos", "simple-discrete", "elbo-rf", "elbo-vp", "elbo-discrete"],
)
def test_ddpm_exact_minimum(spec, schedule):
    obj = objectives.get(spec)
    loss = obj(exact_denoiser(schedule), data_batch(), torch.Generator().manual_seed(1))
    mc_check(loss, ddpm_expected(obj, schedule))


@pytest.mark.parametrize(
    "spec, schedule",
    [
        ({"name": "ncsn"}, schedules.VE(0.01, 50.0)),
        ({"name": "ncsn", "num_levels": None}, schedules.VE(0.01, 50.0)),
        ({"name": "dsm", "num_levels": 10, "sigma_min": 0.01, "sigma_max": 1.0}, schedules.EDM()),
    ],
    ids=["levels-ve", "continuous-ve", "levels-edm"],
)
def test_ncsn_exact_minimum(spec, schedule):
    obj = objectives.get(spec)
    gen = torch.Generator().manual_seed(2)
    loss = obj(exact_denoiser(schedule), data_batch(), gen)
    mc_check(loss, ncsn_expected(obj, schedule))


def test_ncsn_levels_are_the_geometric_ladder():
    sched = schedules.VE(0.01, 50.0)
    obj = objectives.get("ncsn", num_levels=6)
    sig = obj.sample_sigma(sched, 60_000, torch.Generator().manual_seed(0), torch.zeros(1))
    ladder = torch.tensor(np.geomspace(50.0, 0.01, 6))
    idx = (sig[:, None] / ladder - 1).abs().argmin(1)
    assert torch.allclose(sig, ladder[idx], rtol=1e-12)
    counts = torch.bincount(idx, minlength=6).double()
    # each level has probability 1/6: counts ~ Binomial(n, 1/6)
    sd = math.sqrt(60_000 * (1 / 6) * (5 / 6))
    assert float((counts - 10_000).abs().max()) <= Z * sd
    t = sched.t_from_logsnr(-2 * torch.log(ladder))
    assert torch.allclose(sched.sigma(t), ladder, rtol=1e-12)


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_ssm_exact_minimum(projection):
    sched = schedules.Cosine()
    obj = objectives.get("ssm", projection=projection, t_min=0.02, t_max=0.98)
    loss = obj(exact_denoiser(sched), data_batch(), torch.Generator().manual_seed(3))
    mc_check(loss, ssm_expected(obj, sched))


def _preconditioned_exact(schedule, sigma_data):
    """A network F with c_skip x + c_out F = E[x | x_t] under EDM preconditioning."""
    exact = exact_fn(schedule)

    def net(x_in, c_noise, cond=None):
        s = torch.exp(4 * c_noise.to(torch.float64))[:, None]  # s = sigma / alpha
        c_in = torch.rsqrt(s**2 + sigma_data**2)
        x_scaled = x_in / c_in
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data * c_in
        t = schedule.t_from_logsnr(-2 * torch.log(s[:, 0]))
        alpha = schedule(t).alpha[:, None]
        return (exact(alpha * x_scaled, t) - c_skip * x_scaled) / c_out

    return tiltflow.Denoiser(net, schedule, "data", precondition=True, sigma_data=sigma_data)


@pytest.mark.parametrize("setting", ["edm-schedule", "edm-precond", "cosine-schedule", "ve-sd1"])
def test_edm_exact_minimum(setting):
    if setting == "edm-schedule":
        sched, sd, obj = schedules.EDM(), 0.5, objectives.get("edm")
        model = exact_denoiser(sched)
    elif setting == "edm-precond":
        sched, sd, obj = schedules.EDM(), 0.5, objectives.get("edm")
        model = _preconditioned_exact(sched, sd)
    elif setting == "cosine-schedule":  # any schedule: the same scale-free problem, same minimum
        sched, sd, obj = schedules.Cosine(), 0.5, objectives.get("edm")
        model = exact_denoiser(sched)
    else:
        sched, sd = schedules.VE(1e-4, 500.0), 1.0
        obj = objectives.get("edm", sigma_data=1.0, p_mean=0.0, p_std=1.0)
        model = exact_denoiser(sched)
    loss = obj(model, data_batch(), torch.Generator().manual_seed(4))
    # EDM schedule: levels above sigma_max = 80 (probability 2e-6) are clamped; their effect on
    # the mean (< 1e-5) is far below the MC error (~5e-3)
    mc_check(loss, edm_expected(obj, sd))


@pytest.mark.parametrize(
    "schedule",
    [schedules.Cosine(), schedules.RectifiedFlow(), schedules.VE(0.05, 5.0)],
    ids=["cosine", "rf", "ve"],
)
def test_flow_matching_exact_minimum(schedule):
    obj = objectives.get("flow_matching")
    loss = obj(exact_denoiser(schedule), data_batch(), torch.Generator().manual_seed(5))
    mc_check(loss, fm_expected(schedule, lambda t: 1.0))


@pytest.mark.parametrize(
    "sampling, density",
    [
        ("uniform", lambda t: 1.0),
        ({"name": "logit_normal", "m": 0.0, "s": 1.0}, logit_normal_pdf(0.0, 1.0)),
        ({"name": "logit_normal", "m": 0.5, "s": 0.6}, logit_normal_pdf(0.5, 0.6)),
        ({"name": "mode", "s": 1.29}, mode_pdf(1.29)),
    ],
    ids=["uniform", "lognorm-0-1", "lognorm-.5-.6", "mode-1.29"],
)
def test_rectified_flow_exact_minimum(sampling, density):
    sched = schedules.RectifiedFlow()
    obj = objectives.get("rectified_flow", time_sampling=sampling)
    loss = obj(exact_denoiser(sched), data_batch(), torch.Generator().manual_seed(6))
    mc_check(loss, fm_expected(sched, density, target="rf"))


def test_exact_minimum_with_analytic_module():
    """Cross-check with tiltflow.analytic's exact mixture denoiser."""
    from tiltflow.analytic import GaussianMixture

    gmm = GaussianMixture([1.0], MU_T[None], S_T[None])
    theirs = gmm.denoiser(schedules.RectifiedFlow())
    obj = objectives.get("rectified_flow")
    a = obj(theirs, data_batch(), torch.Generator().manual_seed(7))
    b = obj(
        exact_denoiser(schedules.RectifiedFlow()), data_batch(), torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# -- perturbing the exact denoiser increases the expected loss --------------------------------
@pytest.mark.parametrize(
    "spec, schedule",
    [
        ("ddpm", schedules.VPLinear()),
        ({"name": "ddpm", "weighting": "elbo", "t_min": 0.01}, schedules.Cosine()),
        ("ncsn", schedules.VE()),
        ({"name": "ssm", "t_min": 0.02}, schedules.Cosine()),
        ("edm", schedules.EDM()),
        ("flow_matching", schedules.Cosine()),
        ({"name": "rectified_flow", "time_sampling": "mode"}, schedules.RectifiedFlow()),
    ],
    ids=["ddpm", "elbo", "ncsn", "ssm", "edm", "fm", "rf"],
)
def test_perturbed_denoiser_has_larger_loss(spec, schedule):
    obj = objectives.get(spec)
    batch = data_batch(20_000)
    exact = obj(exact_denoiser(schedule), batch, torch.Generator().manual_seed(8))
    worse = obj(
        exact_denoiser(schedule, shift=[0.5, -0.5]), batch, torch.Generator().manual_seed(8)
    )
    diff = (worse - exact).detach()  # paired: same draws
    se = float(diff.std()) / math.sqrt(diff.numel())
    assert float(diff.mean()) > Z * se


# -- time sampling -----------------------------------------------------------------------------
KS_CRIT = 1.95  # sqrt(n) D_n exceeds 1.95 with probability 0.001 (Kolmogorov distribution)


@pytest.mark.parametrize(
    "spec, cdf",
    [
        ("uniform", lambda t: t),
        (
            {"name": "logit_normal", "m": 0.5, "s": 0.6},
            lambda t: ss.norm.cdf((math.log(t / (1 - t)) - 0.5) / 0.6),
        ),
        ({"name": "mode", "s": 1.29}, mode_cdf(1.29)),
        ({"name": "mode", "s": -0.8}, mode_cdf(-0.8)),
    ],
    ids=["uniform", "logit_normal", "mode", "mode-neg"],
)
def test_time_sampling_matches_its_distribution(spec, cdf):
    sampler = timesampling.get(spec)
    n = 4000
    t = sampler(n, torch.Generator().manual_seed(9)).numpy()
    assert t.dtype == np.float64 and ((t >= 0) & (t <= 1)).all()
    stat = ss.kstest(t, np.vectorize(cdf)).statistic
    assert math.sqrt(n) * stat < KS_CRIT
    # the module's density integrates to the same CDF (400-node Gauss-Legendre: smooth integrand)
    nodes, weights = np.polynomial.legendre.leggauss(400)
    for q in (0.1, 0.37, 0.8):
        u = torch.tensor(q / 2 * (nodes + 1))
        integral = float((sampler.density(u).numpy() * weights).sum() * q / 2)
        assert integral == pytest.approx(cdf(q), abs=1e-7)


def test_time_densities_match_formulas():
    grid = torch.linspace(0.01, 0.99, 41, dtype=torch.float64)
    ln = timesampling.logit_normal_density(grid, 0.3, 0.7)
    ref = [logit_normal_pdf(0.3, 0.7)(float(t)) for t in grid]
    np.testing.assert_allclose(ln.numpy(), ref, rtol=1e-10)
    md = timesampling.mode_density(grid, 1.29)
    np.testing.assert_allclose(md.numpy(), [mode_pdf(1.29)(float(t)) for t in grid], rtol=1e-8)
    # s = 0 is the uniform distribution
    g = torch.Generator().manual_seed(0)
    u = torch.rand(5, generator=g, dtype=torch.float64)
    assert torch.allclose(timesampling.mode(5, 0.0, torch.Generator().manual_seed(0)), 1 - u)
    assert torch.allclose(timesampling.mode_density(grid, 0.0), torch.ones_like(grid))


# -- couplings ---------------------------------------------------------------------------------
def _pair_cost(x, noise):
    return float(((x - noise) ** 2).sum(1).mean())


def test_minibatch_ot_identical_sets_is_identity():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(64, 3, generator=g)
    perm = torch.randperm(64, generator=g)
    out_x, out_noise = couplings.minibatch_ot(x, x[perm])
    assert out_x is x
    assert torch.equal(out_noise, x)


def test_minibatch_ot_is_optimal_and_beats_independent():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(128, 2, generator=g, dtype=torch.float64) * 2 + 1
    noise = torch.randn(128, 2, generator=g, dtype=torch.float64)
    _, paired = couplings.minibatch_ot(x, noise)
    # a permutation of the noise rows
    assert torch.equal(torch.sort(paired, 0).values, torch.sort(noise, 0).values)
    cost = (torch.cdist(x, noise) ** 2).numpy()
    rows, cols = so.linear_sum_assignment(cost)  # independent exact solver
    assert _pair_cost(x, paired) == pytest.approx(cost[rows, cols].mean(), rel=1e-12)
    assert _pair_cost(x, paired) < _pair_cost(x, noise)


def test_sinkhorn_approaches_ot_and_independent():
    g = torch.Generator().manual_seed(12)
    n = 48
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) + 2
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    cost = (torch.cdist(x, noise) ** 2).numpy()
    ot_cost = _pair_cost(x, couplings.minibatch_ot(x, noise)[1])
    gaps = []
    for reg in (1e-2, 1e-1, 1.0):
        plan = couplings.sinkhorn_plan(x, noise, reg=reg)
        np.testing.assert_allclose(plan.sum(1), 1 / n, rtol=1e-6)
        np.testing.assert_allclose(plan.sum(0), 1 / n, rtol=1e-6)
        # entropic optimality: <C, P_reg> - OT <= reg_abs (H(P_reg) - H(P_OT)) <= reg_abs log n,
        # with reg_abs = reg * mean(C) (the module divides the cost by its mean)
        gaps.append(float((plan * cost).sum()) - ot_cost)
        assert -1e-9 <= gaps[-1] <= reg * cost.mean() * math.log(n) + 1e-9
    assert gaps[0] < gaps[1] < gaps[2] < _pair_cost(x, noise) - ot_cost
    # sampled pairs: each row i draws j ~ P[i, :] / P[i, :].sum(); mean cost is <C, P> (+ noise)
    _, paired = couplings.sinkhorn(x, noise, torch.Generator().manual_seed(0), reg=1e-2)
    assert _pair_cost(x, paired) < ot_cost + 0.5 * (_pair_cost(x, noise) - ot_cost)
    # huge reg: the product coupling
    wide = couplings.sinkhorn_plan(x, noise, reg=1e4)
    np.testing.assert_allclose(wide, 1 / n**2, rtol=1e-3)
    # reproducible with a generator
    a = couplings.sinkhorn(x, noise, torch.Generator().manual_seed(5), reg=0.5)[1]
    b = couplings.sinkhorn(x, noise, torch.Generator().manual_seed(5), reg=0.5)[1]
    assert torch.equal(a, b)


def test_coupling_keeps_cond_with_x():
    seen = {}

    def fn(x_t, t, cond=None):
        seen["cond"] = cond.clone()
        return torch.zeros_like(x_t)

    den = tiltflow.Denoiser.from_fn(fn, schedules.RectifiedFlow(), "data")
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    cond = torch.arange(32)
    for spec in ("minibatch_ot", {"name": "sinkhorn", "reg": 0.1}):
        obj = objectives.get("rectified_flow", coupling=spec)
        obj(den, {"x": x, "cond": cond}, torch.Generator().manual_seed(1))
        assert torch.equal(seen["cond"], cond)


# -- label dropout, config, reproducibility, gradients, errors ---------------------------------
def _recording_denoiser(schedule=None):
    seen = {}

    def fn(x_t, t, cond=None):
        seen["cond"] = cond
        return torch.zeros_like(x_t)

    return tiltflow.Denoiser.from_fn(fn, schedule or schedules.RectifiedFlow(), "noise"), seen


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_label_dropout_rate(p):
    den, seen = _recording_denoiser()
    n = 50_000
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    obj = objectives.get("flow_matching", label_dropout=p)
    obj(den, {"x": torch.zeros(n, 2), "cond": labels}, torch.Generator().manual_seed(13))
    out = seen["cond"]
    dropped = out == -1
    assert torch.equal(out[~dropped], labels[~dropped])
    rate = float(dropped.double().mean())
    assert abs(rate - p) <= Z * math.sqrt(p * (1 - p) / n) + 1e-12
    obj(den, {"x": torch.zeros(4, 2), "cond": None})  # no labels: nothing to drop
    assert seen["cond"] is None


CONFIGS = [
    ("ddpm", schedules.VPLinear()),
    (
        {"name": "ddpm", "weighting": "elbo", "t_min": 0.01, "label_dropout": 0.1},
        schedules.Cosine(),
    ),
    ({"name": "ncsn", "num_levels": None}, schedules.VE()),
    ({"name": "ssm", "num_projections": 2, "projection": "rademacher"}, schedules.Cosine()),
    ({"name": "edm", "p_mean": -1.0, "sigma_data": 0.7, "reduction": "sum"}, schedules.EDM()),
    ({"name": "flow_matching", "coupling": "minibatch_ot"}, schedules.Cosine()),
    (
        {
            "name": "rectified_flow",
            "time_sampling": {"name": "logit_normal", "m": 0.2, "s": 1.1},
            "coupling": {"name": "sinkhorn", "reg": 0.2},
        },
        schedules.RectifiedFlow(),
    ),
]


@pytest.mark.parametrize("spec, schedule", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_config_round_trip_and_reproducible(spec, schedule):
    obj = objectives.get(spec)
    cfg = obj.config()
    assert json.loads(json.dumps(cfg)) == cfg
    again = objectives.get(cfg)
    assert again.config() == cfg and type(again) is type(obj)
    den = exact_denoiser(schedule)
    batch = {"x": data_batch(256)["x"], "cond": torch.randint(0, 3, (256,))}
    a = obj(den, batch, torch.Generator().manual_seed(14))
    b = again(den, batch, torch.Generator().manual_seed(14))
    assert torch.equal(a, b)
    assert objectives.get(spec["name"] if isinstance(spec, dict) else spec).name == obj.name


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(D + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, D)
        )
        self.embed = torch.nn.Embedding(4, D + 1)

    def forward(self, x, t, cond):
        h = torch.cat([x, t[:, None].to(x.dtype)], 1)
        if cond is not None:
            h = h + self.embed(cond + 1)
        return self.body(h)


@pytest.mark.parametrize("spec, schedule", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_gradients_flow_to_the_network(spec, schedule):
    torch.manual_seed(0)
    den = tiltflow.Denoiser(TinyNet(), schedule, "noise", precondition=False)
    batch = {"x": data_batch(128)["x"].float(), "cond": torch.randint(0, 3, (128,))}
    loss = objectives.get(spec)(den, batch, torch.Generator().manual_seed(15))
    assert loss.shape == (128,) and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    grads = [p.grad for p in den.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown objective"):
        objectives.get("nope")
    with pytest.raises(ValueError, match="label_dropout"):
        objectives.get("ddpm", label_dropout=1.5)
    with pytest.raises(ValueError, match="label_dropout"):
        objectives.get("edm", label_dropout=-0.1)
    with pytest.raises(ValueError, match="weighting"):
        objectives.get("ddpm", weighting="snr")
    with pytest.raises(ValueError, match="t_min > 0"):
        objectives.get("ddpm", weighting="elbo", t_min=0.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        objectives.get("ddpm", sigma=3)
    with pytest.raises(ValueError, match="unknown time sampling"):
        objectives.get("rectified_flow", time_sampling="cosmap")
    with pytest.raises(ValueError, match="mode sampling"):
        objectives.get("rectified_flow", time_sampling={"name": "mode", "s": 3.0})
    with pytest.raises(ValueError, match="logit_normal"):
        timesampling.get({"name": "logit_normal", "s": 0.0})
    with pytest.raises(ValueError, match="unknown coupling"):
        objectives.get("flow_matching", coupling="hungarian")
    with pytest.raises(ValueError, match="reg > 0"):
        couplings.get({"name": "sinkhorn", "reg": 0.0})
    batch = data_batch(8)
    with pytest.raises(TypeError, match="variance-exploding"):
        objectives.get("ncsn")(exact_denoiser(schedules.Cosine()), batch)
    with pytest.raises(ValueError, match="inside the schedule's range"):
        objectives.get("ncsn", sigma_min=1e-3, sigma_max=1.0)(exact_denoiser(schedules.VE()), batch)
    with pytest.raises(TypeError, match="RectifiedFlow"):
        objectives.get("rectified_flow")(exact_denoiser(schedules.Cosine()), batch)
    with pytest.raises(ValueError, match="p_std"):
        objectives.get("edm", p_std=0.0)
    with pytest.raises(TypeError, match="Denoiser"):
        objectives.get("ddpm")(lambda x: x, batch)
    with pytest.raises(TypeError, match="batch"):
        objectives.get("ddpm")(exact_denoiser(schedules.Cosine()), batch["x"])
    with pytest.raises(TypeError, match="integer class labels"):
        objectives.get("ddpm", label_dropout=0.5)(
            exact_denoiser(schedules.Cosine()), {"x": batch["x"], "cond": torch.zeros(8, 3)}
        )
    with pytest.raises(ValueError, match="same shape"):
        couplings.minibatch_ot(torch.zeros(3, 2), torch.zeros(4, 2))
    assert set(objectives.available()) == {
        "ddpm",
        "ncsn",
        "ssm",
        "edm",
        "flow_matching",
        "rectified_flow",
    }


@pytest.mark.parametrize("name", objectives.available())
def test_a_run_takes_its_defaults_from_the_objective(name):
    """A run config naming only the objective gets the schedule, prediction kind and
    preconditioning that objective declares (no per-name branching in runs.py)."""
    from tiltflow.runs import build_run

    obj = objectives.get(name)
    _, den, built = build_run({"data": {"name": "eight_gaussians", "n": 64},
                               "model": {"hidden": 8, "depth": 1}, "objective": name})
    assert type(built) is type(obj)
    assert den.schedule.name == obj.default_schedule
    assert den.prediction == obj.default_prediction
    assert den.precondition == obj.default_precondition
