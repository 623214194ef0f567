"""Runge–Kutta solvers (midpoint, rk4, dopri5) and ``reference_solve``.

Ground truth: for Gaussian data ``N(mu, diag(s^2))`` the PF-ODE is linear and its flow is
closed form, ``x_t1 = alpha_1 mu + r_1 (x_t0 - alpha_0 mu) / r_0`` with
``r = sqrt(alpha^2 s^2 + sigma^2)`` (any two times, any schedule, VE's noisy t = 0 included).
On a Gaussian mixture the reference is ``reference_solve``, itself checked against the closed form.
"""

import math

import pytest
import torch
from gaussian_flow import MU, S2, exact_flow, gaussian_denoiser

import tiltflow as tf
from tiltflow import analytic
from tiltflow import schedules as S
from tiltflow.solvers import grids, reference_solve, rk  # importing rk registers midpoint, rk4, dopri5

F64 = torch.float64
SMOOTH = [S.RectifiedFlow(), S.Cosine()]
ALL = [S.RectifiedFlow(), S.Cosine(), S.VPLinear(), S.VPDiscrete.linear(), S.EDM(), S.VE()]


def start(schedule, n=64, t=1.0, seed=0):
    noise = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return float(schedule(torch.tensor(t, dtype=F64)).sigma) * noise


def rms(a, b):
    return (a - b).pow(2).sum(1).mean().sqrt().item()


def endpoint_error(schedule, solver, steps, grid="uniform"):
    t_grid = grids.get_grid(grid, steps, schedule)
    x_init = start(schedule, t=float(t_grid[0]))
    x = tf.solvers.solve(gaussian_denoiser(schedule), x_init, t_grid, solver)
    return rms(x, exact_flow(schedule, x_init, float(t_grid[0]), float(t_grid[-1])))


def slope(steps, errs):
    return -(math.log(errs[-1]) - math.log(errs[0])) / (math.log(steps[-1]) - math.log(steps[0]))


# -- fixed-step solvers ------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SMOOTH, ids=lambda s: s.name)
@pytest.mark.parametrize("solver,order", [("midpoint", 2), ("rk4", 4), ("rk4_38", 4)])
def test_empirical_convergence_order_gaussian(schedule, solver, order):
    """Slope of log(error) vs log(steps) against the closed-form flow matches the order (within
    0.25). Exception: on rectified flow this linear problem makes the midpoint rule's h^2 error
    term vanish (measured slope 3.0, also at t_end = 0.3); the order is then only a lower bound
    and is measured on a mixture in the next test."""
    steps = [16, 32, 64]
    errs = [endpoint_error(schedule, solver, n) for n in steps]
    p = slope(steps, errs)
    if solver == "midpoint" and schedule.name == "rectified_flow":
        assert p > order - 0.25, (errs, p)
    else:
        assert abs(p - order) < 0.25, (errs, p)


@pytest.fixture(scope="module")
def mixture_rf():
    sched = S.RectifiedFlow()
    den = analytic.anisotropic_2d().denoiser(sched)
    x_init = start(sched, n=8, seed=1)
    return sched, den, x_init, reference_solve(den, x_init)


@pytest.mark.parametrize("solver,order", [("midpoint", 2), ("rk4", 4), ("rk4_38", 4)])
def test_empirical_convergence_order_mixture(mixture_rf, solver, order):
    """On the anisotropic mixture (rectified flow) against reference_solve: slope = order."""
    sched, den, x_init, ref = mixture_rf
    steps = [64, 128, 256]
    errs = [rms(tf.solvers.solve(den, x_init, grids.uniform(n), solver), ref) for n in steps]
    assert abs(slope(steps, errs) - order) < 0.25, errs


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
@pytest.mark.parametrize("solver,order", [("midpoint", 2), ("rk4", 4), ("rk4_38", 4)])
def test_converges_on_every_schedule(schedule, solver, order):
    """4x the steps cuts the error by at least half of 4^order. VPDiscrete's log alpha is
    piecewise linear in t, so the velocity jumps at each of its 1000 knots (by up to 20 % near
    t = 0, where beta_k is smallest) and any method stepping over them is first order there:
    for it the criterion is that of order 1 (measured floor ~1e-4 until h < 1e-3)."""
    grid = "karras" if schedule.name in ("edm", "ve") else "uniform"
    steps = (16, 64)
    if schedule.name == "vp_discrete":  # first order, and erratic while h straddles the knots
        order, steps = 1, (16, 1024)   # (rk4_38: 4.0e-4, 2.5e-4, 6.4e-5, 1.1e-5 at 16..1024)
    coarse, fine = (endpoint_error(schedule, solver, n, grid) for n in steps)
    assert fine < coarse / (0.5 * (steps[1] / steps[0]) ** order), (coarse, fine)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
@pytest.mark.parametrize("grid", grids.available())
def test_every_grid_is_finite_and_never_evaluates_at_a_clean_point(schedule, grid):
    """No stage lands on t = 0 (sigma = 0 there for all but VE; 0/0 for a data prediction)."""
    for solver in ("midpoint", "rk4", "rk4_38"):
        calls = []
        t_grid = grids.get_grid(grid, 3, schedule)
        x = tf.solvers.solve(gaussian_denoiser(schedule, calls=calls), start(schedule), t_grid, solver)
        assert bool(torch.isfinite(x).all()) and min(calls) > 0, (solver, min(calls))


# (c2, c3), stage rows and weights of the two textbook fourth-order tableaus (HNW Table II.1.2)
TEXTBOOK = {"rk4": ((0.5, 0.5), ((0.5,), (0, 0.5), (0, 0, 1)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
            "rk4_38": ((1 / 3, 2 / 3), ((1 / 3,), (-1 / 3, 1), (1, -1, 1)), (1 / 8, 3 / 8, 3 / 8, 1 / 8))}


@pytest.mark.parametrize("solver", sorted(TEXTBOOK))
def test_rk4_clean_end_is_exact_rk4_on_rectified_flow(solver):
    """On rectified flow the velocity at t = 0 is exactly -x (x_hat = x, eps_hat = E[noise] = 0),
    so rk4 / rk4_38 with 3 evaluations on the last step equal the textbook method evaluating a
    velocity model at t = 0 (flow_matching's rk4 — the 3/8 rule — with a velocity network)."""
    sched = S.RectifiedFlow()

    def velocity(x, t):  # closed-form E[noise - x | x_t]; finite at t = 0 where it is -x
        a, s = 1 - t, t
        x_hat = MU + a * S2 / (a * a * S2 + s * s) * (x - a * MU)
        eps_hat = s * (x - a * MU) / (a * a * S2 + s * s)
        return eps_hat - x_hat

    (c2, c3), rows, b = TEXTBOOK[solver]
    x_init = start(sched, n=16)
    x = x_init.clone()
    ts = grids.uniform(5).tolist()
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        h = t_next - t
        k1 = velocity(x, t)
        k2 = velocity(x + h * rows[0][0] * k1, t + c2 * h)
        k3 = velocity(x + h * (rows[1][0] * k1 + rows[1][1] * k2), t + c3 * h)
        k4 = velocity(x + h * (rows[2][0] * k1 + rows[2][1] * k2 + rows[2][2] * k3), t + h)
        x = x + h * (b[0] * k1 + b[1] * k2 + b[2] * k3 + b[3] * k4)
    ours = tf.solvers.solve(gaussian_denoiser(sched), x_init, grids.uniform(5), solver)
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)


def test_nfe_is_exact():
    sched = S.VPLinear()
    calls = []
    den = gaussian_denoiser(sched, calls=calls)
    noise = torch.randn(2, 2, dtype=F64)
    for solver, nfe in [("midpoint", 2), ("midpoint", 6), ("rk4", 3), ("rk4", 7), ("rk4", 11),
                        ("rk4_38", 7)]:
        calls.clear()
        x = tf.sample(den, noise, solver, nfe=nfe)
        assert len(calls) == nfe and bool(torch.isfinite(x).all()), (solver, nfe)
    for other in (S.RectifiedFlow(), S.VE()):  # exact-limit and Ralston final steps
        other_calls = []
        tf.sample(gaussian_denoiser(other, calls=other_calls), noise, "rk4", nfe=7)
        assert len(other_calls) == 7
    calls.clear()  # a grid not ending at t = 0: every step costs 4 (and 2)
    tf.solvers.solve(den, noise, torch.tensor([1.0, 0.6, 0.2], dtype=F64), "rk4")
    assert len(calls) == 8
    calls.clear()
    tf.solvers.solve(den, noise, torch.tensor([1.0, 0.6, 0.2], dtype=F64), "midpoint")
    assert len(calls) == 4


def test_record_and_guidance():
    sched = S.Cosine()
    rec = []
    x = tf.sample(gaussian_denoiser(sched), torch.randn(3, 2, dtype=F64), "rk4", nfe=7, record=rec)
    assert [(r.t, r.t_next) for r in rec] == [(1.0, 0.5), (0.5, 0.0)] and torch.equal(rec[-1].x_next, x)

    def fn(x_t, t, cond):
        return (0.5 * x_t + cond[:, None].clamp_min(0).to(x_t.dtype)).to(x_t.dtype)

    den = tf.Denoiser.from_fn(fn, S.RectifiedFlow(), "data")
    noise, cond = torch.randn(4, 2, dtype=F64), torch.tensor([0, 1, 2, 1])
    for solver, nfe in (("midpoint", 4), ("rk4", 7)):
        plain = tf.sample(den, noise, solver, nfe=nfe, cond=cond)
        torch.testing.assert_close(tf.sample(den, noise, solver, nfe=nfe, cond=cond, guidance=0.0), plain)


def test_fixed_step_bad_arguments():
    den = gaussian_denoiser(S.RectifiedFlow())
    noise = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"nfe=4.*valid values start \[3, 7"):
        tf.sample(den, noise, "rk4", nfe=4)
    with pytest.raises(ValueError, match="nfe=3"):
        tf.sample(den, noise, "midpoint", nfe=3)
    with pytest.raises(ValueError, match="no option"):
        tf.sample(den, noise, "rk4", nfe=3, options={"rtol": 1e-3})
    # an increasing grid that starts where a VP velocity is singular
    vp = gaussian_denoiser(S.VPLinear())
    with pytest.raises(ValueError, match="sigma = 0.*start at a small t"):
        rk.rk4(vp, noise, torch.tensor([0.0, 0.5], dtype=F64))


# -- dopri5 and the reference ------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
def test_dopri5_meets_its_tolerance(schedule):
    """Each accepted step's local error is <= tol * (1 + |z|) (z = x_t / sqrt(alpha^2 +
    sigma^2), = x at a clean t = 0); propagated by a flow that stretches by at most
    max(1, max s) = sqrt(2) in z, the global error is <= steps * sqrt(2) * tol * (1 + |x|).
    (Measured: below 1.2 tol; local extrapolation makes the 5th-order result much better than
    its 4th-order estimate.) NFE grows as tolerances tighten and is reported exactly."""
    calls = []
    den = gaussian_denoiser(schedule, calls=calls)
    x_init = start(schedule)
    exact = exact_flow(schedule, x_init, 1.0, 0.0)
    nfes = []
    for tol in (1e-4, 1e-6, 1e-8):
        stats = {}
        calls.clear()
        x = tf.sample(den, x_init / float(schedule(torch.ones(1, dtype=F64)).sigma), "dopri5",
                      steps=1, options={"rtol": tol, "atol": tol, "stats": stats})
        assert stats["nfe"] == len(calls)
        assert min(calls) > 0 or schedule.name == "ve"  # no call where sigma = 0 (VE's t = 0: 0.01)
        rel = ((x - exact).norm(dim=1) / (1 + exact.norm(dim=1))).max().item()
        assert rel <= stats["steps"] * math.sqrt(2) * tol, (tol, rel, stats)
        nfes.append(stats["nfe"])
    assert nfes[0] < nfes[1] < nfes[2]


def test_dopri5_output_times_and_record():
    sched = S.VPLinear()
    den = gaussian_denoiser(sched)
    x_init = start(sched, n=8)
    rec, stats = [], {}
    grid = torch.tensor([1.0, 0.5, 0.1, 0.0], dtype=F64)
    x = tf.solvers.solve(den, x_init, grid, "dopri5", record=rec, options={"stats": stats})
    assert len(rec) == stats["steps"] and torch.equal(rec[-1].x_next, x)
    times = [r.t_next for r in rec]
    assert {0.5, 0.1, 0.0} <= set(times)  # steps land exactly on the grid's interior points
    tol = 1e-5  # dopri5's default rtol = atol; VPLinear has alpha^2 + sigma^2 = 1, so z = x_t
    for k, r in enumerate(rec):
        if r.t_next in (0.5, 0.1):
            # the global bound of test_dopri5_meets_its_tolerance after the k + 1 steps so far
            exact = exact_flow(sched, x_init, 1.0, r.t_next)
            rel = ((r.x_next - exact).norm(dim=1) / (1 + exact.norm(dim=1))).max().item()
            assert rel <= (k + 1) * math.sqrt(2) * tol, (r.t_next, rel)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
def test_reference_solve_matches_the_closed_form(schedule):
    """To ~1e-8 (rtol = atol = 1e-10) from the noise end to t = 0 and back (t = 0 -> 0.7,
    inversion), and from an interior time."""
    den = gaussian_denoiser(schedule)
    x_init = start(schedule)
    exact = exact_flow(schedule, x_init, 1.0, 0.0)
    torch.testing.assert_close(reference_solve(den, x_init), exact, rtol=1e-8, atol=1e-8)
    back = reference_solve(den, exact, 0.0, 0.7)
    torch.testing.assert_close(back, exact_flow(schedule, exact, 0.0, 0.7), rtol=1e-8, atol=1e-8)
    mid = exact_flow(schedule, x_init, 1.0, 0.4)
    torch.testing.assert_close(reference_solve(den, mid, 0.4, 0.0), exact, rtol=1e-8, atol=1e-8)


def test_reference_solve_agrees_with_rk4_on_a_mixture(mixture_rf):
    """rk4's error at n steps is ~C n^-4, so rk4(n) - rk4(2n) ~ 15/16 C n^-4 and
    |rk4(2n) - ref| ~ |rk4(n) - rk4(2n)| / 15 (allow 2x for higher-order terms), plus the
    reference's own ~1e-9. Also on VPLinear, whose velocity is singular at t = 0."""
    sched, den, x_init, ref = mixture_rf
    cases = [(den, x_init, ref)]
    vp = S.VPLinear()
    den_vp = analytic.anisotropic_2d().denoiser(vp)
    x_vp = start(vp, n=8, seed=2)
    cases.append((den_vp, x_vp, reference_solve(den_vp, x_vp)))
    for d, x0, r in cases:
        coarse = tf.solvers.solve(d, x0, grids.uniform(128), "rk4")
        fine = tf.solvers.solve(d, x0, grids.uniform(256), "rk4")
        assert rms(fine, r) <= 2 * rms(coarse, fine) / 15 + 1e-9, (rms(fine, r), rms(coarse, fine))


def test_reference_solve_float64_and_stats():
    """A float32 start is solved in float64, to the float64 accuracy of
    test_reference_solve_matches_the_closed_form, and the stats count the network calls."""
    sched = S.EDM()
    calls = []
    den = gaussian_denoiser(sched, calls=calls)
    stats = {}
    x32 = start(sched, n=4).float()
    out = reference_solve(den, x32, stats=stats)
    assert out.dtype == F64 and stats["nfe"] == len(calls) and stats["steps"] >= 1
    torch.testing.assert_close(out, exact_flow(sched, x32.double(), 1.0, 0.0), rtol=1e-8,
                               atol=1e-8)


def test_dopri5_bad_arguments():
    den = gaussian_denoiser(S.RectifiedFlow())
    noise = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="adaptive.*steps=1.*max_nfe"):
        tf.sample(den, noise, "dopri5", nfe=20)
    with pytest.raises(ValueError, match="adaptive"):
        tf.sample(den, noise, "dopri5", nfe=20, grid=grids.uniform(3))
    with pytest.raises(ValueError, match="rtol must be a positive"):
        tf.sample(den, noise, "dopri5", steps=1, options={"rtol": 0.0})
    with pytest.raises(ValueError, match="atol must be a positive"):
        tf.sample(den, noise, "dopri5", steps=1, options={"atol": -1.0})
    with pytest.raises(ValueError, match="below what torch.float32 resolves"):
        tf.sample(den, noise.float(), "dopri5", steps=1, options={"rtol": 1e-9})
    with pytest.raises(ValueError, match="max_nfe must be"):
        tf.sample(den, noise, "dopri5", steps=1, options={"max_nfe": 1.5})
    with pytest.raises(RuntimeError, match="max_nfe=20.*loosen rtol/atol or raise max_nfe"):
        tf.sample(den, noise, "dopri5", steps=1, options={"rtol": 1e-10, "max_nfe": 20})
    with pytest.raises(TypeError, match="stats must be"):
        tf.sample(den, noise, "dopri5", steps=1, options={"stats": []})
    with pytest.raises(ValueError, match="no option"):
        tf.sample(den, noise, "dopri5", steps=1, options={"tol": 1e-3})
    with pytest.raises(ValueError, match="two different times"):
        reference_solve(den, noise, 0.5, 0.5)
    with pytest.raises(ValueError, match="two different times"):
        reference_solve(den, noise, 1.5, 0.0)
    with pytest.raises(ValueError, match="batch first"):
        reference_solve(den, torch.randn(2))


def test_float32_dopri5_runs():
    """In float32 the global bound of test_dopri5_meets_its_tolerance holds, plus float32
    rounding of each step's state (<~ 4 eps_32 relative per step, accumulated over the steps)."""
    sched = S.VPDiscrete.linear()
    den = gaussian_denoiser(sched)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    stats, tol = {}, 1e-4
    x = tf.sample(den, noise, "dopri5", steps=1,
                  options={"rtol": tol, "atol": tol, "stats": stats})
    exact = exact_flow(sched, noise.double() * float(sched(torch.ones(1, dtype=F64)).sigma), 1.0, 0.0)
    assert x.dtype == torch.float32
    rel = ((x.double() - exact).norm(dim=1) / (1 + exact.norm(dim=1))).max().item()
    eps32 = torch.finfo(torch.float32).eps
    assert rel <= stats["steps"] * (math.sqrt(2) * tol + 4 * eps32), (rel, stats)
