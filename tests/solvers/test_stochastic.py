"""Stochastic samplers (EDM churn, DPM-Solver++(2M) SDE, predictor-corrector, annealed Langevin)
against exact targets.

Gaussian data ``N(mu, diag(s^2))`` has a closed-form denoiser on every schedule, so each
sampler's output moments are compared with the truth; tolerances are Monte-Carlo standard
errors plus the discretisation bias, bounded (first order) by the change when the step is
halved, as in ``tests/solvers/test_registry.py``.
"""

import math

import pytest
import torch
from gaussian_flow import MU, S2, gaussian_denoiser

import tiltflow as tf
import tiltflow.solvers.stochastic  # noqa: F401  (registers the samplers)
from tiltflow import analytic, metrics
from tiltflow import schedules as S
from tiltflow.solvers import grids

SAMPLERS = ["edm_sde", "dpmpp_2m_sde", "pc", "annealed_langevin"]
ALL = [S.RectifiedFlow(), S.Cosine(), S.VPLinear(), S.VPDiscrete.linear(), S.EDM(), S.VE()]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _moments(den, noise, solver, steps, grid, options, grid_options=None):
    x = tf.sample(den, noise, solver, steps=steps, grid=grid, grid_options=grid_options,
                  generator=gen(1), options=options)
    assert torch.isfinite(x).all()
    return x.mean(0), x.var(0)


def _check_moments(m, v, m2, v2, n, extra_v=0.0):
    """5 standard errors + the halving bias bound (+ a known stationary bias ``extra_v``)."""
    se_m, se_v = (S2 / n).sqrt(), S2 * math.sqrt(2 / (n - 1))
    assert ((m - MU).abs() <= 5 * se_m + (m - m2).abs()).all(), (m, m2, MU)
    assert ((v - S2).abs() <= 5 * se_v + (v - v2).abs() + extra_v).all(), (v, v2, S2)


# (solver, options, schedule, grid, steps): steps are the finer run; the check run has half
MOMENT_CASES = [
    ("edm_sde", {}, S.VPLinear(), "uniform", 100),
    ("edm_sde", {"s_tmin": 0.0, "s_tmax": math.inf}, S.RectifiedFlow(), "uniform", 100),
    ("dpmpp_2m_sde", {}, S.VPLinear(), "uniform", 200),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}, S.Cosine(), "uniform", 200),
    ("pc", {"snr": 0.05}, S.VPLinear(), "uniform", 100),
    ("pc", {"snr": 0.05, "predictor": "euler_maruyama"}, S.VE(), "karras", 100),
    ("annealed_langevin", {}, S.VE(), "karras", 400),
]


@pytest.mark.parametrize("solver,options,schedule,grid,steps", MOMENT_CASES,
                         ids=[f"{c[0]}-{c[2].name}" for c in MOMENT_CASES])
def test_samplers_reproduce_exact_moments(solver, options, schedule, grid, steps):
    """Mean and variance of 20k samples match N(mu, s^2). For pc the Langevin corrector has a
    stationary bias that no step refinement removes: for a Gaussian dimension of variance v,
    ULA with step e keeps variance v / (1 - e / 2v); with Song's step
    ``e = 2 snr^2 (E|z| / E|g|)^2``, ``(E|z|)^2 <= D = 2`` and ``(E|g|)^2 >= (2/pi) / v_min``
    give a relative inflation of at most ``pi snr^2`` (to first order)."""
    den = gaussian_denoiser(schedule)
    n = 20_000
    noise = torch.randn(n, 2, dtype=torch.float64, generator=gen(0))
    m, v = _moments(den, noise, solver, steps, grid, options)
    m2, v2 = _moments(den, noise, solver, steps // 2, grid, options)
    extra = math.pi * options["snr"] ** 2 * S2 if solver == "pc" else 0.0
    _check_moments(m, v, m2, v2, n, extra)


def test_langevin_corrector_repairs_a_wrong_start():
    """Started from a point mass at t = 0.5 (VE), 400 Langevin corrector moves reach
    p_t = N(mu, s^2 + sigma_t^2) (to 5 standard errors plus the ULA bias pi snr^2 v); the
    predictor's step to t = 0.4999 changes the variance by at most its noise variance
    g2 = sigma(0.5)^2 - sigma(0.4999)^2 (8.5e-4). Without the corrector the state stays collapsed:
    identical states plus the predictor's N(0, g2) noise, so its sample variance is g2 to 5
    standard errors."""
    sched = S.VE()
    den = gaussian_denoiser(sched)
    n, snr = 4000, 0.16
    grid = torch.tensor([0.5, 0.4999], dtype=torch.float64)
    x_init = torch.zeros(n, 2, dtype=torch.float64)
    x = tf.solvers.solve(den, x_init, grid, "pc", generator=gen(0),
                         options={"corrector_steps": 400, "snr": snr})
    sigma = sched(grid).sigma
    var_t = S2 + float(sigma[1]) ** 2
    g2 = float(sigma[0] ** 2 - sigma[1] ** 2)  # the reverse-diffusion predictor's noise variance
    se_m, se_v = (var_t / n).sqrt(), var_t * math.sqrt(2 / (n - 1))
    assert ((x.mean(0) - MU).abs() <= 5 * se_m).all(), x.mean(0)
    assert ((x.var(0) - var_t).abs() <= 5 * se_v + math.pi * snr**2 * var_t + g2).all(), x.var(0)
    still = tf.solvers.solve(den, x_init, grid, "pc", generator=gen(0),
                             options={"corrector_steps": 0})
    assert ((still.var(0) - g2).abs() <= 5 * g2 * math.sqrt(2 / (n - 1))).all(), (still.var(0), g2)


@pytest.mark.parametrize("solver", SAMPLERS)
def test_every_schedule(solver):
    """On every schedule (Karras grid from noise level 80, so alpha > 0 everywhere) the
    moments of 4k samples are right to 5 standard errors plus the halving bias."""
    n = 4000
    noise = torch.randn(n, 2, dtype=torch.float64, generator=gen(0))
    steps = 120 if solver == "annealed_langevin" else 40
    options = {"snr": 0.05} if solver == "pc" else {}
    for sched in ALL:
        den = gaussian_denoiser(sched)
        c1 = sched(torch.tensor(1.0, dtype=torch.float64))
        level_1 = float(c1.sigma / c1.alpha) if float(c1.alpha) > 1e-6 else math.inf
        go = {"level_max": min(level_1, 80.0)}
        m, v = _moments(den, noise, solver, steps, "karras", options, go)
        m2, v2 = _moments(den, noise, solver, steps // 2, "karras", options, go)
        extra = math.pi * 0.05**2 * S2 if solver == "pc" else 0.0
        _check_moments(m, v, m2, v2, n, extra)


@pytest.mark.parametrize("solver", ["edm_sde", "dpmpp_2m_sde"])
def test_samplers_start_at_pure_noise(solver):
    """edm_sde and dpmpp_2m_sde handle alpha = 0 (t = 1 of rectified flow and cosine)."""
    for sched in (S.RectifiedFlow(), S.Cosine()):
        for grid in grids.available():
            x = tf.sample(gaussian_denoiser(sched), torch.randn(64, 2, dtype=torch.float64),
                          solver, steps=8, grid=grid, generator=gen(0))
            assert torch.isfinite(x).all(), (sched.name, grid)


@pytest.mark.parametrize("solver", ["pc", "annealed_langevin"])
def test_singular_start_raises_clearly(solver):
    den = gaussian_denoiser(S.RectifiedFlow())
    noise = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular at t=1.0.*start later"):
        tf.sample(den, noise, solver, steps=10, generator=gen(0))
    x = tf.sample(den, noise, solver, steps=10, grid=grids.uniform(10, t_start=0.99),
                  generator=gen(0))
    assert torch.isfinite(x).all()


MIX_CASES = [  # (solver, schedule, grid, nfe)
    ("edm_sde", S.EDM(), "karras", 39),
    ("dpmpp_2m_sde", S.RectifiedFlow(), "uniform", 20),
    ("pc", S.VPLinear(), "uniform", 100),
    ("annealed_langevin", S.VE(), "karras", 200),
]


@pytest.mark.parametrize("solver,schedule,grid,nfe", MIX_CASES, ids=[c[0] for c in MIX_CASES])
def test_eight_gaussians_within_twice_the_noise_floor(solver, schedule, grid, nfe):
    gmm = analytic.eight_gaussians()
    n = 2000
    noise = torch.randn(n, 2, dtype=torch.float64, generator=gen(0))
    x = tf.sample(gmm.denoiser(schedule), noise, solver, nfe=nfe, grid=grid, generator=gen(1))
    res = metrics.compare(x, lambda m, g: gmm.sample(m, generator=g), ("sw2",))["sw2"]
    # an acceptance criterion (as in test_guidance.py): a bias of up to sqrt(3) floors
    assert res["value"] <= 2 * res["floor"], res


def _check_records(rec, x, expect_gaussian):
    assert torch.equal(rec[-1].x_next, x)
    for r, gaussian in zip(rec, expect_gaussian, strict=True):
        if not gaussian:
            assert r.log_prob is None and r.std is None
            continue
        normal = torch.distributions.Normal(r.mean, r.std.expand_as(r.mean))
        torch.testing.assert_close(r.log_prob, normal.log_prob(r.x_next).sum(1))


def test_record_log_probs():
    den = gaussian_denoiser(S.VPLinear())
    noise = torch.randn(5, 2, dtype=torch.float64)
    steps = 6

    rec = []
    x = tf.sample(den, noise, "dpmpp_2m_sde", steps=steps, generator=gen(0), record=rec)
    _check_records(rec, x, [True] * (steps - 1) + [False])  # the step to sigma = 0 is the mean
    for a, b in zip(rec[:-1], rec[1:], strict=True):
        assert torch.equal(a.x_next, b.x)

    rec = []
    x = tf.sample(den, noise, "pc", steps=steps, generator=gen(0), record=rec,
                  options={"corrector_steps": 2})
    # per step: two Langevin moves (step size depends on the noise drawn), then the predictor
    _check_records(rec, x, ([False, False, True] * steps)[:-1] + [False])
    assert [r.t == r.t_next for r in rec[:3]] == [True, True, False]

    rec = []
    x = tf.sample(den, noise, "annealed_langevin", steps=steps, generator=gen(0), record=rec,
                  options={"steps_per_level": 2})
    _check_records(rec, x, [True] * (2 * steps - 1) + [False])  # the last eval denoises

    rec = []
    x = tf.sample(den, noise, "edm_sde", steps=steps, generator=gen(0), record=rec)
    _check_records(rec, x, [False] * steps)  # noise enters before the network: not Gaussian


@pytest.mark.parametrize("solver", SAMPLERS)
def test_seeded_noise_is_reproducible(solver):
    den = gaussian_denoiser(S.VPLinear())
    noise = torch.randn(4, 2, dtype=torch.float64)
    a = tf.sample(den, noise, solver, steps=10, generator=gen(3))
    b = tf.sample(den, noise, solver, steps=10, generator=gen(3))
    c = tf.sample(den, noise, solver, steps=10, generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_nfe_is_exact():
    sched = S.VPLinear()
    calls = []
    base = gaussian_denoiser(sched)

    def counting(x_t, t, cond=None):
        calls.append(1)
        return base(x_t, t).data

    den = tf.Denoiser.from_fn(counting, sched, "data")
    noise = torch.randn(2, 2, dtype=torch.float64)
    for solver, nfe in [("edm_sde", 9), ("edm_sde", 1), ("dpmpp_2m_sde", 7), ("pc", 8),
                        ("annealed_langevin", 5)]:
        calls.clear()
        tf.sample(den, noise, solver, nfe=nfe, generator=gen(0))
        assert len(calls) == nfe, solver
    grid = grids.uniform(5)
    for solver, options, nfe in [("pc", {"corrector_steps": 3}, 20), ("pc", {"corrector_steps": 0}, 5),
                                 ("annealed_langevin", {"steps_per_level": 3}, 15),
                                 ("edm_sde", {"s_churn": 0.0}, 9)]:
        calls.clear()
        tf.solvers.solve(den, noise, grid, solver, generator=gen(0), options=options)
        assert len(calls) == nfe, (solver, options)
    with pytest.raises(ValueError, match="nfe=4"):
        tf.sample(den, noise, "edm_sde", nfe=4)


def test_edm_sde_without_churn_is_heun_on_edm_schedule():
    """With s_churn = 0 and alpha = 1, sigma = 80 t, EDM's sampler is Heun's method in t."""
    den = gaussian_denoiser(S.EDM())
    noise = torch.randn(16, 2, dtype=torch.float64)
    a = tf.sample(den, noise, "edm_sde", nfe=11, grid="karras", options={"s_churn": 0.0})
    b = tf.sample(den, noise, "heun", nfe=11, grid="karras")
    torch.testing.assert_close(a, b)


def test_dpmpp_2m_sde_eta_zero_is_deterministic_and_converges():
    """eta = 0 is DPM-Solver++(2M): no noise is drawn, and it is second order on the exact
    Gaussian flow (4x the steps cuts the error by more than 4x)."""
    sched = S.Cosine()
    den = gaussian_denoiser(sched)
    noise = torch.randn(64, 2, dtype=torch.float64, generator=gen(0))
    exact = MU + S2.sqrt() * noise  # the PF-ODE map of Gaussian data from pure noise
    g = gen(0)
    errs = []
    for steps in (16, 64):
        state = g.get_state()
        x = tf.sample(den, noise, "dpmpp_2m_sde", steps=steps, grid="logsnr", generator=g,
                      options={"eta": 0.0})
        assert torch.equal(g.get_state(), state)
        errs.append((x - exact).pow(2).sum(1).mean().sqrt().item())
    assert errs[1] < errs[0] / 4, errs


def test_bad_options():
    den = gaussian_denoiser(S.VPLinear())
    noise = torch.randn(3, 2, dtype=torch.float64)
    bad = [
        ("edm_sde", {"s_churn": -1.0}, "s_churn"),
        ("edm_sde", {"s_tmin": 2.0, "s_tmax": 1.0}, "s_tmin"),
        ("edm_sde", {"s_noise": -0.1}, "s_noise"),
        ("dpmpp_2m_sde", {"solver_type": "rk4"}, "solver_type"),
        ("dpmpp_2m_sde", {"eta": -1.0}, "eta"),
        ("pc", {"predictor": "ancestral"}, "predictor"),
        ("pc", {"corrector_steps": -1}, "corrector_steps"),
        ("pc", {"corrector_steps": 1.5}, "corrector_steps"),
        ("pc", {"snr": -0.1}, "snr"),
        ("annealed_langevin", {"steps_per_level": 0}, "steps_per_level"),
        ("annealed_langevin", {"eps": 0.0}, "eps"),
        ("annealed_langevin", {"churn": 1.0}, "no option"),
    ]
    for solver, options, match in bad:
        with pytest.raises(ValueError, match=match):
            tf.sample(den, noise, solver, steps=4, options=options)


def test_nfe_follows_options_for_corrector_and_langevin_steps():
    """``sample(nfe=N)`` counts the options that change the cost per step."""
    import tiltflow as tf
    from tiltflow import schedules as S

    calls = []
    sched = S.VPLinear()

    def fn(x_t, t, cond=None):
        calls.append(1)
        return torch.zeros_like(x_t)

    den = tf.Denoiser.from_fn(fn, sched, "noise")
    grid_options = {"level_max": 50.0}
    for solver, options, nfe in [("pc", {"corrector_steps": 2}, 12),
                                 ("annealed_langevin", {"steps_per_level": 3}, 12)]:
        calls.clear()
        tf.sample(den, torch.randn(3, 2, dtype=torch.float64), solver, nfe=nfe, grid="karras",
                  grid_options=grid_options, options=options,
                  generator=torch.Generator().manual_seed(0))
        assert len(calls) == nfe, solver
