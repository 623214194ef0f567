"""Solvers against the closed-form probability-flow map of Gaussian data.

For data ``N(mu, diag(s^2))`` the PF-ODE is linear and its flow is exact:
``x_t = alpha_t mu + r_t (x_T - alpha_T mu) / r_T`` with ``r_t = sqrt(alpha_t^2 s^2 + sigma_t^2)``,
so every solver's endpoint error is measured against ground truth, with no reference solver.
"""

import math

import pytest
import torch
from gaussian_flow import MU, S2, exact_flow, gaussian_denoiser

import tiltflow as tf
from tiltflow import schedules as S
from tiltflow.solvers import grids

SMOOTH = [S.RectifiedFlow(), S.Cosine()]
ALL = [S.RectifiedFlow(), S.Cosine(), S.VPLinear(), S.VPDiscrete.linear(), S.EDM(), S.VE()]


def endpoint_error(schedule, solver, steps, grid="uniform", **grid_options):
    torch.manual_seed(0)
    noise = torch.randn(64, 2, dtype=torch.float64)
    den = gaussian_denoiser(schedule)
    t_grid = grids.get_grid(grid, steps, schedule, **grid_options)
    x_init = float(schedule(t_grid[:1]).sigma) * noise
    x = tf.solvers.solve(den, x_init, t_grid, solver)
    ref = exact_flow(schedule, x_init, float(t_grid[0]))
    return (x - ref).pow(2).sum(1).mean().sqrt().item()


@pytest.mark.parametrize("schedule", SMOOTH, ids=lambda s: s.name)
@pytest.mark.parametrize("solver,order", [("euler", 1), ("ddim", 1), ("heun", 2)])
def test_empirical_convergence_order(schedule, solver, order):
    """Slope of log(error) vs log(steps) matches the method's order (within 0.25)."""
    steps = [16, 32, 64]
    errs = [endpoint_error(schedule, solver, n) for n in steps]
    slope = -(math.log(errs[-1]) - math.log(errs[0])) / (math.log(steps[-1]) - math.log(steps[0]))
    assert abs(slope - order) < 0.25, (errs, slope)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("ddim", 1)])
def test_every_ode_solver_converges_on_every_schedule(schedule, solver, order):
    """4x the steps cuts the error by at least half of the order's 4^order."""
    grid = "karras" if schedule.name in ("edm", "ve") else "uniform"
    coarse, fine = endpoint_error(schedule, solver, 32, grid), endpoint_error(schedule, solver, 128, grid)
    assert fine < coarse / (0.5 * 4**order), (coarse, fine)


def test_ddim_is_exact_for_a_point_mass():
    """With a delta at mu the DDIM update lands on mu in one step, on any schedule whose
    t = 0 is clean (VE's t = 0 keeps noise sigma_min)."""
    for sched in ALL[:-1]:
        den = gaussian_denoiser(sched, s2=torch.zeros(2, dtype=torch.float64) + 1e-30)
        x = tf.sample(den, torch.randn(8, 2, dtype=torch.float64), "ddim", nfe=1)
        torch.testing.assert_close(x, MU.expand(8, 2))


@pytest.mark.parametrize("solver,options", [("ddpm", {}), ("ddim", {"eta": 0.5}),
                                            ("euler_maruyama", {})])
def test_sde_samplers_reproduce_exact_moments(solver, options):
    """Mean and variance of 20k samples match N(mu, s^2): tolerance 5 standard errors plus the
    O(1/steps) discretisation bias, bounded by a second run at half the steps."""
    sched = S.VPLinear()
    den = gaussian_denoiser(sched)
    n = 20_000
    noise = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def moments(steps):
        g = torch.Generator().manual_seed(1)
        x = tf.sample(den, noise, solver, steps=steps, generator=g, options=options)
        return x.mean(0), x.var(0)

    m, v = moments(200)
    m2, v2 = moments(100)
    se_m, se_v = (S2 / n).sqrt(), S2 * math.sqrt(2 / (n - 1))
    bias_m, bias_v = (m - m2).abs(), (v - v2).abs()  # first order: error(200) ~ error(100) - error(200)
    assert ((m - MU).abs() <= 5 * se_m + bias_m).all(), (m, MU)
    assert ((v - S2).abs() <= 5 * se_v + bias_v).all(), (v, S2)


def test_sde_record_log_probs():
    sched = S.VPLinear()
    den = gaussian_denoiser(sched)
    rec = []
    x = tf.sample(den, torch.randn(5, 2, dtype=torch.float64), "ddpm", steps=10,
                  generator=torch.Generator().manual_seed(0), record=rec)
    assert len(rec) == 10 and torch.equal(rec[-1].x_next, x)
    for r in rec[:-1]:
        expected = torch.distributions.Normal(r.mean, r.std.expand_as(r.mean)).log_prob(r.x_next).sum(1)
        torch.testing.assert_close(r.log_prob, expected)
    assert rec[-1].log_prob is None  # the last step to t = 0 is deterministic


def test_seeded_noise_is_reproducible():
    den = gaussian_denoiser(S.VPLinear())
    noise = torch.randn(4, 2, dtype=torch.float64)
    a = tf.sample(den, noise, "ddpm", nfe=10, generator=torch.Generator().manual_seed(3))
    b = tf.sample(den, noise, "ddpm", nfe=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_classifier_free_guidance_zero_is_conditional_and_batched():
    sched = S.RectifiedFlow()
    calls = []

    def fn(x_t, t, cond):
        calls.append(x_t.shape[0])
        shift = torch.where(cond[:, None] >= 0, cond[:, None].double(), torch.zeros(1).double())
        return (x_t * 0.5 + shift).to(x_t.dtype)

    den = tf.Denoiser.from_fn(fn, sched, "data")
    noise = torch.randn(6, 2, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 0, 1, 2])
    plain = tf.sample(den, noise, "heun", nfe=5, cond=cond)
    guided0 = tf.sample(den, noise, "heun", nfe=5, cond=cond, guidance=0.0)
    torch.testing.assert_close(plain, guided0)
    calls.clear()
    tf.sample(den, noise, "euler", nfe=4, cond=cond, guidance=2.0)
    assert calls == [12] * 4  # conditional and unconditional in one batched call per step


def test_grids():
    for sched in ALL:
        for name in grids.available():
            g = grids.get_grid(name, 6, sched)
            assert g.dtype == torch.float64 and len(g) == 7 and g[-1] == 0
            assert (g[1:] < g[:-1]).all()
    g = grids.shifted(4, shift=3.0)
    assert torch.isclose(g[2], torch.tensor(0.75, dtype=torch.float64))  # 3*.5/(1+2*.5)


def test_bad_arguments():
    den = gaussian_denoiser(S.RectifiedFlow())
    noise = torch.randn(3, 2)
    with pytest.raises(ValueError, match="unknown solver 'eulr'.*did you mean 'euler'"):
        tf.sample(den, noise, "eulr", nfe=4)
    with pytest.raises(ValueError, match="nfe=4"):
        tf.sample(den, noise, "heun", nfe=4)
    with pytest.raises(ValueError, match="nfe=0"):
        tf.sample(den, noise, "euler", nfe=0)
    with pytest.raises(ValueError, match="exactly one of"):
        tf.sample(den, noise, "euler")
    with pytest.raises(ValueError, match="no option"):
        tf.sample(den, noise, "euler", nfe=2, options={"eta": 1})
    with pytest.raises(ValueError, match="leading dim 3"):
        tf.sample(den, noise, "euler", nfe=2, cond=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="strictly decreasing"):
        tf.sample(den, noise, "euler", nfe=2, grid=torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="batch first"):
        tf.sample(den, torch.randn(3), "euler", nfe=2)
    with pytest.raises(ValueError, match="infinite diffusion"):
        tf.sample(den, noise, "euler_maruyama", nfe=4)
    with pytest.raises(ValueError, match="unknown time grid"):
        tf.sample(den, noise, "euler", nfe=4, grid="linear")


def test_aliases_from_other_libraries():
    assert tf.solvers.get("dpm++2m").name == "dpmpp_2m"
    den = gaussian_denoiser(S.RectifiedFlow())
    noise = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(tf.sample(den, noise, "dpm++2m", nfe=4),
                               tf.sample(den, noise, "dpmpp_2m", nfe=4))
