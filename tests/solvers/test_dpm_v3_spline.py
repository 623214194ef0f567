"""DPM-Solver-v3's smooth statistics (tiltflow.solvers.dpm_v3._Spline / _Stats): the EMS are C^2
cubic splines in lambda and every integral of a step is a quadrature of them, so the solver keeps
order 3 at step sizes below the EMS spacing (Zheng et al. 2023, eq. 9: the order needs ``g'''``
bounded, which piecewise-linear statistics break at every grid point).
"""

import math

import numpy as np
import pytest
import torch
from gaussian_flow import exact_flow, gaussian_denoiser
from scipy.integrate import quad

import tiltflow as tf
from tiltflow import schedules as S
from tiltflow.solvers.dpm_v3 import EMS, _Spline, _Stats, compute_ems

F64 = torch.float64


def _smooth_ems(k=9, lo=-3.0, hi=3.0):
    """One-dimensional statistics, smooth and far from constant (so every term of a step is
    exercised): l in (0, 1) like a model's, s and b of either sign."""
    lam = np.linspace(lo, hi, k)
    l = 1 / (1 + 0.5 * np.exp(2 * lam)) + 0.05 * np.sin(3 * lam)  # noqa: E741
    s = 0.3 * np.cos(lam)
    b = 0.2 * lam - 0.1 * np.sin(2 * lam)
    return EMS(torch.from_numpy(lam), *(torch.from_numpy(v)[:, None] for v in (l, s, b)))


def _quad(fn, a, c, knots):
    inner = [p for p in knots if min(a, c) < p < max(a, c)]
    val, _ = quad(fn, min(a, c), max(a, c), points=inner or None, epsabs=0, epsrel=1e-13,
                  limit=200)
    return val if c >= a else -val


# -- the representation ----------------------------------------------------------------------
def test_spline_interpolates_is_c2_and_constant_beyond_the_grid():
    ems = _smooth_ems()
    lam, table = ems.lambdas.numpy(), ems.l.numpy()
    sp = _Spline(lam, table)
    np.testing.assert_allclose(sp.value(lam), table, rtol=0, atol=1e-15)
    inner, delta = lam[1:-1], 1e-9
    eps = np.finfo(np.float64).eps
    for nu in (0, 1, 2):  # continuous up to the second derivative at every interior knot
        left = sp.fun(inner - delta, nu)
        right = sp.fun(inner + delta, nu)
        # without a jump, |f^(nu)(x + delta) - f^(nu)(x - delta)| <= 2 delta max |f^(nu+1)| over
        # the two sides (for nu = 2 the piecewise-constant third derivative), plus the rounding
        # of two evaluations (a few eps of |f^(nu)|)
        slope = np.maximum(np.abs(sp.fun(inner - delta, nu + 1)),
                           np.abs(sp.fun(inner + delta, nu + 1)))
        tol = 2 * delta * slope + 32 * eps * (1 + np.abs(left))
        assert bool((np.abs(left - right) <= tol).all()), (nu, np.abs(left - right) - tol)
    out = np.array([lam[0] - 2.0, lam[-1] + 3.0])
    np.testing.assert_allclose(sp.value(out), table[[0, -1]], rtol=0, atol=1e-15)
    # the primitive: quadrature of the value, inside and beyond the grid
    for x in (-3.7, -1.234, 0.0, 2.9, 4.5):
        want = _quad(lambda u: sp.value([u])[0, 0], lam[0], x, lam)
        assert sp.prim([x])[0, 0] == pytest.approx(want, rel=1e-12, abs=1e-13)


def test_two_and_three_points_give_a_line_and_a_parabola():
    lam = np.array([-1.0, 2.0])
    sp = _Spline(lam, np.array([[1.0], [4.0]]))
    assert sp.value([0.5])[0, 0] == pytest.approx(2.5, rel=1e-14)
    lam = np.array([-1.0, 0.5, 2.0])
    sp = _Spline(lam, (lam**2)[:, None])
    assert sp.value([1.3])[0, 0] == pytest.approx(1.69, rel=1e-13)


# -- every integral of a step, against adaptive quadrature -----------------------------------
def _reference_step(ems, lam_s, lam_t, alpha_s, alpha_t, pts):
    """``(A, W, c)`` of one step from the smooth statistics by adaptive quadrature and the
    Lagrange basis ``ell_j`` through ``pts`` (independent of the Taylor/Vandermonde form):
    ``g ~ sum_j g_j ell_j`` with ``g_j = e^{-(S_j - S_s)} f_j - B_s(lambda_j)``, so
    ``W_j = -alpha_t e^{-(L_t - L_s)} e^{-(S_j - S_s)} I_j`` and
    ``c = alpha_t e^{-(L_t - L_s)} (sum_j I_j B_s(lambda_j) - int E B_s)``,
    ``I_j = int_s^t E ell_j``, ``E = e^{(L + S) - (L_s + S_s)}``."""
    knots = ems.lambdas.numpy()
    l, s, b = (_Spline(knots, v.numpy()) for v in (ems.l, ems.s, ems.b))  # noqa: E741

    def L(x):
        return l.prim([x])[0, 0]

    def S_(x):
        return s.prim([x])[0, 0]

    def E(x):
        return math.exp(L(x) + S_(x) - L(lam_s) - S_(lam_s))

    def B(y):
        return _quad(lambda u: math.exp(-(S_(u) - S_(lam_s))) * b.value([u])[0, 0], lam_s, y,
                     knots)

    def ell(j, x):
        return np.prod([(x - pts[m]) / (pts[j] - pts[m]) for m in range(len(pts)) if m != j])

    decay = math.exp(-(L(lam_t) - L(lam_s)))
    I = [_quad(lambda x, j=j: E(x) * ell(j, x), lam_s, lam_t, knots) for j in range(len(pts))]
    W = [-alpha_t * decay * math.exp(-(S_(p) - S_(lam_s))) * I[j] for j, p in enumerate(pts)]
    Q = _quad(lambda x: E(x) * B(x), lam_s, lam_t, knots)
    c = alpha_t * decay * (sum(I[j] * B(p) for j, p in enumerate(pts)) - Q)
    return alpha_t / alpha_s * decay, W, c


@pytest.mark.parametrize("pts_offsets", [(), (-0.4,), (-0.4, -0.9), ("t", -0.4)],
                         ids=["p1", "p2", "p3", "corrector"])
def test_step_coefficients_match_adaptive_quadrature(pts_offsets):
    """A step across several EMS grid points and panels (width 2.2 > _MAX_PANEL, knots every
    0.75): the Gauss-Legendre coefficients of the spline statistics agree with adaptive
    quadrature to ~1e-12."""
    ems = _smooth_ems()
    lam_s, lam_t, alpha_s, alpha_t = -1.3, 0.9, 0.4, 0.8
    pts = [lam_s] + [lam_t if o == "t" else lam_s + o for o in pts_offsets]
    A, W, c = _Stats(ems).step(lam_s, lam_t, alpha_s, alpha_t, pts, False)
    rA, rW, rc = _reference_step(ems, lam_s, lam_t, alpha_s, alpha_t, pts)
    assert np.asarray(A).item() == pytest.approx(rA, rel=1e-12)
    np.testing.assert_allclose([np.asarray(w).item() for w in W], rW, rtol=1e-11, atol=1e-13)
    assert np.asarray(c).item() == pytest.approx(rc, rel=1e-11, abs=1e-13)


# -- the order below the EMS spacing ---------------------------------------------------------
def _noise(n, seed):
    return torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("schedule", "t_start"), [(S.VPLinear(), 1.0),
                                                    (S.RectifiedFlow(), 0.999)],
                         ids=["vp_linear", "rectified_flow"])
def test_order_three_below_the_ems_spacing(schedule, t_start):
    """Steps uniform in lambda, all shorter than the EMS spacing (41 points), statistics of
    another Gaussian (so ``g`` is far from constant): the error falls at every refinement and the
    least-squares slope of log error vs log steps is >= 2.7 (order 3; measured 3.5 and 3.6).
    With piecewise-linear statistics both failed: the errors were erratic (each step across a
    kink of ``g`` loses O(h^2), its sign set by where the kink falls) and the slopes 2.3 and 2.1.
    Starts at low SNR so the order-1 first step of the multistep warm-up (uncorrected, an
    O(h^2) local error) is negligible, as in tests/solvers/test_dpm_v3.py::test_empirical_order_three."""
    den = gaussian_denoiser(schedule)
    other = gaussian_denoiser(schedule, mu=torch.tensor([-1.0, 0.5], dtype=F64),
                              s2=torch.tensor([1.0, 0.5], dtype=F64))
    ems = compute_ems(other, _noise(32, 3), num_lambdas=41)
    t_end = 0.05
    lam_0, lam_1 = (0.5 * schedule.logsnr(torch.tensor([t_start, t_end], dtype=F64))).tolist()
    x0 = float(schedule(torch.tensor(t_start, dtype=F64)).sigma) * _noise(64, 0)
    ref = exact_flow(schedule, x0, t_start, t_end)
    steps = (32, 48, 64, 96, 128, 192, 256)
    errs = []
    for n in steps:
        grid = schedule.t_from_logsnr(2 * torch.linspace(lam_0, lam_1, n + 1, dtype=F64)).to(F64)
        grid[0], grid[-1] = t_start, t_end
        assert (lam_1 - lam_0) / n < float(ems.lambdas[1] - ems.lambdas[0])
        x = tf.solvers.solve(den, x0, grid, "dpm_solver_v3", options={"ems": ems})
        errs.append((x - ref).pow(2).sum(1).mean().sqrt().item())
    assert all(a > b for a, b in zip(errs[:-1], errs[1:], strict=True)), errs
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    # order 3 less 0.3 for pre-asymptotic terms; order-2 (kinked) statistics measured 2.1-2.3
    assert slope >= 2.7, (slope, errs)


# -- files -----------------------------------------------------------------------------------
def test_a_version_1_file_written_by_hand_still_loads(tmp_path):
    """The file format is unchanged (grid values; the spline is built on load): a version-1
    file assembled without EMS.save loads and samples exactly as the in-memory statistics."""
    import json

    from safetensors.torch import save_file

    ems = _smooth_ems()
    cfg = {"format": 1, "shape": [1], "schedule": None, "info": {"kind": "by hand"}}
    path = tmp_path / "v1.safetensors"
    save_file({k: getattr(ems, k).contiguous() for k in ("lambdas", "l", "s", "b")}, str(path),
              metadata={"tiltflow": "dpm_solver_v3_ems", "config": json.dumps(cfg)})
    back = EMS.load(path)
    den = gaussian_denoiser(S.RectifiedFlow(), mu=torch.tensor([0.5], dtype=F64),
                            s2=torch.tensor([0.3], dtype=F64))
    noise = torch.randn(8, 1, dtype=F64, generator=torch.Generator().manual_seed(5))
    a = tf.sample(den, noise, "dpm_solver_v3", nfe=6, options={"ems": ems})
    b = tf.sample(den, noise, "dpm_solver_v3", nfe=6, options={"ems": str(path)})
    assert torch.equal(a, b) and back.info == {"kind": "by hand"}
