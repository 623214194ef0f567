"""DPM-Solver-v3 (tiltflow.solvers.dpm_v3) against closed forms.

Gaussian data ``N(mu, diag(s2))`` has the linear denoiser ``eps = e^lambda l (y - mu)`` with
``y = x/alpha`` and ``l(lambda) = 1 / (1 + s2 e^{2 lambda})``; so the EMS are known exactly:
``sigma d eps/d x = l`` (no sampling error: the Jacobian is constant), ``f = e^{-lambda} eps - l y
= -mu l`` is deterministic (``s`` has nothing to regress, ridge -> 0) and ``b = E f' = -mu l'``.
With them ``g`` is constant in lambda and the solver is exact up to the EMS grid resolution.
The PF-ODE flow is ``x_t = alpha_t mu + r_t (x_s - alpha_s mu) / r_s``, ``r = sqrt(alpha^2 s2 +
sigma^2)`` (tests/solvers/test_registry.py).
"""

import math

import numpy as np
import pytest
import torch
from gaussian_flow import MU, S2, exact_flow, gaussian_denoiser
from scipy.interpolate import CubicSpline

import tiltflow as tf
from tiltflow import schedules as S
from tiltflow.errors import UserError
from tiltflow.solvers import dpm, grids
from tiltflow.solvers.dpm_v3 import EMS, _plan, compute_ems

F64 = torch.float64


def noise(n=64, seed=0):
    return torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


def rms(a, b):
    return (a - b).pow(2).sum(1).mean().sqrt().item()


# -- degenerate statistics: DPM-Solver++ ------------------------------------------------------
def _dpmpp_exact_phi(den, x, grid, order):
    """Multistep DPM-Solver++ with *exact* exponential integrals (independent of dpm_v3):
    ``x_t = sigma_t/sigma_s x_s + alpha_t int_0^h e^{-(h-u)} P(u) du`` with ``P`` the polynomial
    in ``u = lambda - lambda_s`` through the last ``p`` data predictions; ``int e^{-(h-u)} u^k du``
    in closed form. Warm-up, lower-order-final (< 15 steps) and DDIM endpoints as dpm.py."""
    g = grid.tolist()
    n = len(g) - 1
    c = den.schedule(grid)
    alpha, sigma = c.alpha.tolist(), c.sigma.tolist()
    lam = (0.5 * den.schedule.logsnr(grid)).tolist()
    first = next(i for i, v in enumerate(lam) if v >= -dpm.LAMBDA_LIMIT)
    hist = []
    for i in range(n):
        x_hat = den(x, torch.tensor(g[i], dtype=F64)).data
        hist = [(lam[i], x_hat)] + hist[:2]
        a_t, s_t = alpha[i + 1], sigma[i + 1]
        if not (lam[i] >= -dpm.LAMBDA_LIMIT and lam[i + 1] <= dpm.LAMBDA_LIMIT):
            x = s_t / sigma[i] * x + (a_t - s_t * alpha[i] / sigma[i]) * x_hat
            continue
        p = min(order, i - first + 1, n - i if n < 15 else order)
        h = lam[i + 1] - lam[i]
        mom = [-math.expm1(-h), h - 1 + math.exp(-h), h * h - 2 * h + 2 - 2 * math.exp(-h)]
        z = np.array([hist[j][0] - lam[i] for j in range(p)])
        inv = np.linalg.inv(np.vander(z, p, increasing=True))  # coef_k = sum_j inv[k, j] m_j
        x = s_t / sigma[i] * x
        for k in range(p):
            for j in range(p):
                x = x + a_t * mom[k] * inv[k, j] * hist[j][1]
    return x


@pytest.mark.parametrize("schedule", [S.RectifiedFlow(), S.VPDiscrete.linear()],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_l1_s0_b0_is_dpmpp_multistep_with_exact_integrals(schedule, order):
    """l = 1, s = b = 0 makes f = -x_hat: DPM-Solver-v3's predictor is multistep DPM-Solver++
    with exact exponential integrals, to roundoff."""
    den = gaussian_denoiser(schedule)
    for n in (3, 6, 9):
        grid = grids.uniform(n)
        x0 = float(schedule(grid[:1]).sigma) * noise()
        got = tf.solvers.solve(den, x0, grid, "dpm_solver_v3",
                               options={"ems": EMS.constant(), "order": order,
                                        "use_corrector": False})
        want = _dpmpp_exact_phi(den, x0, grid, order)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_l1_coefficients_vs_dpmpp_2m_and_3m():
    """Against dpm.py coefficient by coefficient: third-order and first-order steps coincide
    with DPM-Solver++(3M) (its third-order step uses exact phi_2, phi_3); a second-order step
    differs exactly by DPM-Solver++(2M)'s approximation of ``alpha_t (h - 1 + e^{-h}) / h`` by
    ``alpha_t (1 - e^{-h}) / 2`` (Lu et al. 2022b, Algorithm 2), on the weights of
    ``(x_hat_s - x_hat_prev) / r``; x_hat = -f, so weights flip sign."""
    sched = S.VPDiscrete.linear()
    grid = grids.uniform(8)
    ref = [(float(A), [float(v) for v in c]) for A, c in dpm._multistep_plan(sched, grid, 3, True)]
    mine, _ = _plan(EMS.constant(), sched, grid, 3, False, False, False, True)
    lam = (0.5 * sched.logsnr(grid)).tolist()
    alpha = sched(grid).alpha.tolist()
    orders = []
    for i, ((A, c), st) in enumerate(zip(ref, mine, strict=True)):
        if st.kind == "ddim":  # the final step to sigma = 0: the same limit in both
            orders.append("ddim")
            assert (st.A, st.B) == pytest.approx((A, c[0]), rel=1e-13)
            continue
        assert np.asarray(st.A).item() == pytest.approx(A, rel=1e-13)
        w = [-np.asarray(v).item() for v in st.W]
        orders.append(len(w))
        if len(w) == 2:  # 2M: B (1 + 1/(2r)), -B/(2r)  vs exact
            h = lam[i + 1] - lam[i]
            r = (lam[i] - lam[i - 1]) / h
            delta = alpha[i + 1] * ((h - 1 + math.exp(-h)) / h + math.expm1(-h) / 2) / r
            assert w[0] - c[0] == pytest.approx(delta, rel=1e-9, abs=1e-13)
            assert w[1] - c[1] == pytest.approx(-delta, rel=1e-9, abs=1e-13)
        else:
            np.testing.assert_allclose(w, c, rtol=1e-10, atol=1e-13)
    assert orders == [1, 2, 3, 3, 3, 3, 2, "ddim"]


# -- EMS of Gaussian data --------------------------------------------------------------------
def test_ems_of_gaussian_data_match_closed_form():
    sched = S.VPLinear()
    n = 256
    ems = compute_ems(gaussian_denoiser(sched), noise(n, seed=1), num_lambdas=81)
    lam = ems.lambdas[:, None]
    l_true = 1 / (1 + S2 * torch.exp(2 * lam))
    torch.testing.assert_close(ems.l, l_true, rtol=0, atol=1e-12)
    # f = -mu l is deterministic: Cov(f, f') is roundoff and the ridge keeps s at that level
    assert ems.s.abs().max() < 1e-2
    # b = mean f' = -mu l' + (l' - l'_fd) mean(y): the second term is the error of l' (the
    # derivative of the not-a-knot cubic spline through l, as the solver interpolates l) times
    # the sample mean of y = x_0 + e^{-lambda} z (within 5 standard errors)
    lp_true = (-2 * S2 * torch.exp(2 * lam) * l_true**2).numpy()
    lp_fd = CubicSpline(ems.lambdas.numpy(), l_true.numpy(), axis=0).derivative()(ems.lambdas)
    y_bound = MU.abs() + 5 * torch.sqrt(S2 + torch.exp(-2 * lam)) / math.sqrt(n)
    tol = torch.from_numpy(np.abs(lp_true - lp_fd)) * y_bound + ems.s.abs() * (MU.abs() * l_true)
    err = (ems.b + MU * torch.from_numpy(lp_true)).abs()
    assert bool((err <= tol + 1e-9).all()), (err - tol).max()


def test_gaussian_ems_make_the_solver_exact_up_to_grid_resolution():
    """With its own EMS the Gaussian flow is integrated exactly except for the interpolated
    statistics (O(dlambda^4): cubic splines of l, b, and the spline's derivative for l' in b):
    halving the EMS spacing cuts the error ~14x at 4 steps (~4x with the piecewise-linear
    statistics and difference quotients of before); dpmpp_3m is far off."""
    sched = S.VPLinear()
    den = gaussian_denoiser(sched)
    t_s, t_e = 1.0, float(sched.t_from_logsnr(torch.tensor(8.0, dtype=F64)))
    grid = torch.linspace(t_s, t_e, 5, dtype=F64)
    x0 = float(sched(grid[:1]).sigma) * noise()
    ref = exact_flow(sched, x0, t_s, t_e)
    errs = []
    for k in (41, 81):
        ems = compute_ems(den, noise(64, seed=2), num_lambdas=k)
        errs.append(rms(tf.solvers.solve(den, x0, grid, "dpm_solver_v3", options={"ems": ems}),
                        ref))
    base = rms(tf.solvers.solve(den, x0, grid, "dpmpp_3m"), ref)
    # O(dlambda^4): halving the spacing cuts the error 2^4 = 16x; demand half of that
    assert errs[1] < errs[0] / 8, errs  # ~14 measured
    assert errs[1] < base / 1000, (errs, base)


# -- convergence -----------------------------------------------------------------------------
def _mismatched_ems(schedule):
    """EMS of another Gaussian: statistics that do not fit the model (l -> 1 at low SNR like
    every model's), so only consistency is tested."""
    other = gaussian_denoiser(schedule, mu=torch.tensor([-1.0, 0.5], dtype=F64),
                              s2=torch.tensor([1.0, 0.5], dtype=F64))
    return compute_ems(other, noise(32, seed=3), num_lambdas=41)


@pytest.mark.parametrize("schedule", [S.RectifiedFlow(), S.Cosine(), S.VPLinear(),
                                      S.VPDiscrete.linear(), S.EDM(), S.VE()],
                         ids=lambda s: s.name)
def test_converges_on_every_schedule(schedule):
    """Any EMS gives a consistent solver: 4x the steps cuts the error at least 3x. (The final
    step to sigma = 0 is the DDIM limit, whose O(sigma(t_{n-1})^2) error is first order in t
    on VP schedules; elsewhere the ratio is far larger.)"""
    den = gaussian_denoiser(schedule)
    ems = _mismatched_ems(schedule)
    errs = []
    for n in (16, 64):
        g = grids.get_grid("karras" if schedule.name in ("edm", "ve") else "uniform", n, schedule)
        x0 = float(schedule(g[:1]).sigma) * noise()
        x = tf.solvers.solve(den, x0, g, "dpm_solver_v3", options={"ems": ems})
        errs.append(rms(x, exact_flow(schedule, x0, float(g[0]), float(g[-1]))))
    assert errs[1] < errs[0] / 3, errs


@pytest.mark.parametrize("which", ["dpmpp", "mismatched"])
def test_empirical_order_three(which):
    """From t = 1 (low SNR, so the lower-order warm-up costs little) to a finite lambda, the
    slope of log error vs log steps is the order: 3 (within 0.5), for statistics constant in
    lambda and for statistics given on a grid, which the solver interpolates by C^2 cubic
    splines (tests/solvers/test_dpm_v3_spline.py checks the order below the EMS spacing)."""
    sched = S.VPLinear()
    den = gaussian_denoiser(sched)
    ems = EMS.constant() if which == "dpmpp" else _mismatched_ems(sched)
    x0 = float(sched(torch.ones((), dtype=F64)).sigma) * noise()
    ref = exact_flow(sched, x0, 1.0, 0.05)
    errs = [rms(tf.solvers.solve(den, x0, torch.linspace(1.0, 0.05, n + 1, dtype=F64),
                                 "dpm_solver_v3", options={"ems": ems}), ref)
            for n in (16, 64)]
    slope = math.log(errs[0] / errs[1]) / math.log(4)
    assert abs(slope - 3) < 0.5, (errs, slope)


# -- NFE, files, errors ----------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [S.RectifiedFlow(), S.VPDiscrete.linear()],
                         ids=lambda s: s.name)
def test_nfe_is_exact(schedule):
    calls = []
    base = gaussian_denoiser(schedule)

    def counting(x_t, t, cond=None):
        calls.append(1)
        return base(x_t, t).data

    den = tf.Denoiser.from_fn(counting, schedule, "data")
    ems = EMS.constant((2,), l=0.9, s=0.1, b=0.05)
    for nfe in (1, 2, 3, 4, 6, 10):
        for corr in (True, False):
            calls.clear()
            x = tf.sample(den, noise(4), "dpm_solver_v3", nfe=nfe,
                          options={"ems": ems, "use_corrector": corr})
            assert len(calls) == nfe and bool(torch.isfinite(x).all())


def test_save_load_round_trip_and_solver_reads_a_path(tmp_path):
    sched = S.RectifiedFlow()
    den = gaussian_denoiser(sched)
    ems = compute_ems(den, noise(32, seed=4), num_lambdas=21)
    path = ems.save(tmp_path / "sub" / "ems.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["ems.safetensors"]  # no temp left
    back = EMS.load(path)
    for k in ("lambdas", "l", "s", "b"):
        assert torch.equal(getattr(back, k), getattr(ems, k))
    assert back.schedule == sched.config() and back.info == ems.info
    a = tf.sample(den, noise(8), "dpm_solver_v3", nfe=5, options={"ems": ems})
    b = tf.sample(den, noise(8), "dpm_solver_v3", nfe=5, options={"ems": str(path)})
    assert torch.equal(a, b)


def test_bad_files_raise_user_error(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="does not exist"):
        EMS.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a safetensors file"):
        EMS.load(junk)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(UserError, match="not a tiltflow"):
        EMS.load(other)
    good = EMS.constant((2,)).save(tmp_path / "good.safetensors")
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = dict(tensors, l=tensors["l"].float())
    save_file(bad, str(tmp_path / "f32.safetensors"), metadata=meta)
    with pytest.raises(UserError, match="float64"):
        EMS.load(tmp_path / "f32.safetensors")
    bad = dict(tensors, s=tensors["s"][:1])
    save_file(bad, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(UserError, match="invalid"):
        EMS.load(tmp_path / "short.safetensors")
    bad = dict(tensors, b=torch.full_like(tensors["b"], float("nan")))
    save_file(bad, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(UserError, match="finite"):
        EMS.load(tmp_path / "nan.safetensors")


def test_bad_inputs():
    sched = S.RectifiedFlow()
    den = gaussian_denoiser(sched)
    with pytest.raises(ValueError, match="compute_ems"):
        tf.sample(den, noise(4), "dpm_solver_v3", nfe=4)
    with pytest.raises(ValueError, match="shape"):
        tf.sample(den, noise(4), "dpm_solver_v3", nfe=4, options={"ems": EMS.constant((3,))})
    with pytest.raises(ValueError, match="order"):
        tf.sample(den, noise(4), "dpm_solver_v3", nfe=4,
                  options={"ems": EMS.constant(), "order": 4})
    with pytest.raises(TypeError, match="ems"):
        tf.sample(den, noise(4), "dpm_solver_v3", nfe=4, options={"ems": 3})
    with pytest.raises(TypeError, match="bool"):
        tf.sample(den, noise(4), "dpm_solver_v3", nfe=4,
                  options={"ems": EMS.constant(), "use_corrector": "yes"})
    with pytest.raises(ValueError, match="no option"):
        tf.sample(den, noise(4), "dpm_solver_v3", nfe=4, options={"ems": EMS.constant(), "x": 1})
    with pytest.raises(ValueError, match="at least 2"):
        compute_ems(den, noise(1))
    with pytest.raises(ValueError, match="num_lambdas"):
        compute_ems(den, noise(8), num_lambdas=2)
    with pytest.raises(ValueError, match="range"):
        compute_ems(gaussian_denoiser(S.VPLinear()), noise(8), lambda_range=(-9.0, 2.0))
    with pytest.raises(ValueError, match="increasing"):
        EMS(torch.tensor([1.0, 0.0], dtype=F64), *[torch.zeros(2, 2)] * 3)
    with pytest.raises(ValueError, match="differentiable"):
        def frozen(x_t, t, cond=None):
            return x_t.detach() * 0.5

        compute_ems(tf.Denoiser.from_fn(frozen, S.VPLinear(), "noise"), noise(8), num_lambdas=5)
