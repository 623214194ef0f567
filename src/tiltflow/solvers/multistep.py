"""Multistep exponential-integrator samplers: UniPC, DEIS and iPNDM (one evaluation per step).

Each reuses the model outputs of earlier steps to raise its order instead of spending extra
evaluations. All weights are computed in float64 from the grid before the loop (a plan of
python floats per step); the loop only forms linear combinations of stored predictions.

Endpoints (``lam = log(alpha / sigma)``, half the log-SNR):

- A grid starting where ``alpha = 0`` (``t = 1`` of rectified flow and cosine) has
  ``lam = -inf``: the first step is infinitely long in ``lam`` and the noise-prediction forms
  divide by ``alpha``. Every solver here takes that step in its data-prediction limit, the
  DDIM step ``x' = alpha' x_hat + sigma' eps_hat`` (``sigma'/sigma x + alpha' x_hat`` for UniPC,
  plus UniC's corrector, see :func:`unipc`); in later UniPC steps a ``lam = -inf`` history
  point drops out (its divided difference tends to 0). ``alpha/sigma < 1e-10`` counts as
  ``alpha = 0`` (cosine's ``alpha(1)`` is 6e-17 in float64). Consequence: on a uniform grid
  from ``alpha = 0`` the steps near the start are not short in ``lam``, and UniPC's error is
  ``O(steps^-2)`` whatever its order; log-SNR or Karras grids keep the order.
- Lower-order warm-up makes the first steps' error ``O(h^2)`` (UniPC: ``O(h^3)``) times
  ``d x_hat / d lam``, which is small when the grid starts at low SNR; started at moderate SNR
  the measured order of DEIS/UniP above 2 falls to 2.
- A step ending where ``sigma = 0`` (``t = 0``, ``lam = +inf``): UniPC's polynomial in ``lam``
  cannot be integrated to ``lam = inf`` (its higher-order weights diverge), so that step is the
  limiting first-order step ``x' = x_hat`` (as the paper's ``lower_order_final``); DEIS and
  iPNDM work in ``sigma/alpha``, which is finite there, and keep their order.
- VE's ``t = 0`` is not clean (``sigma_min > 0``), so nothing special happens there.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..predictions import scale
from .registry import Predictor, StepRecord, register

__all__ = ["unipc", "unipc_p", "deis", "ipndm"]


def _check_order(name: str, order, lo: int, hi: int) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or not lo <= order <= hi:
        raise ValueError(f"{name}: order must be an int in [{lo}, {hi}], got {order!r}")
    return order


def _alpha_sigma(denoiser, grid: torch.Tensor) -> tuple[list[float], list[float]]:
    c = denoiser.schedule(grid.to(torch.float64))
    return c.alpha.to(torch.float64).tolist(), c.sigma.to(torch.float64).tolist()


# alpha/sigma below this counts as pure noise (lam = -inf): cosine's alpha(1) = cos(pi/2) is
# 6e-17 in float64, and the exact step from there differs from its alpha = 0 limit by O(alpha)
_PURE_NOISE = 1e-10


def _pure_noise(a: float, s: float) -> bool:
    return a <= _PURE_NOISE * s


def _half_logsnr(a: float, s: float) -> float:
    if _pure_noise(a, s):
        return -math.inf
    if s <= 0:
        return math.inf
    return math.log(a) - math.log(s)


def _combine(coefs, tensors, out=None):
    """``out + sum_k coefs[k] * tensors[k]`` as a fresh tensor (python-float weights, zero
    weights skipped; extra tensors unused; ``out`` itself is left unchanged), one fused
    multiply-add per term: the first makes a new tensor, the others add into it in place."""
    fresh = False
    for c, v in zip(coefs, tensors, strict=False):
        if c == 0.0:
            continue
        if fresh:
            out.add_(v, alpha=c)
        else:
            out = scale(v, c) if out is None else torch.add(out, v, alpha=c)
            fresh = True
    return out


def _solve_vandermonde(nodes: list, b: list) -> list:
    """Solve ``sum_k nodes[k]**i a_k = b_i`` (``i < n``, distinct nodes) with the O(n^2)
    Björck–Pereyra algorithm (Golub & Van Loan, Algorithm 4.6.2): for the 1-3 unknowns of
    UniPC a few float operations, where ``np.linalg.solve``'s call overhead alone would cost
    more than a sampling step. Entries may be floats or numpy arrays (one system per element,
    all steps of a plan at once); never updated in place, so ``b`` is left unchanged."""
    n = len(nodes)
    a = list(b)
    for k in range(n - 1):
        for i in range(n - 1, k, -1):
            a[i] = a[i] - nodes[k] * a[i - 1]
    for k in range(n - 2, -1, -1):
        for i in range(k + 1, n):
            a[i] = a[i] / (nodes[i] - nodes[i - k - 1])
        for i in range(k, n - 1):
            a[i] = a[i] - a[i + 1]
    return a


# ----------------------------------------------------------------------------------------------
# UniPC
# ----------------------------------------------------------------------------------------------


def _unipc_step_plan(a_t, s_t, s_s, lams, t_lam, p, variant, corrector):
    """Weights of one UniPC step from ``s`` (history ``lams[0] = lam_s, lams[1], ...``, newest
    first) to ``t``: returns ``(c_x, pred_w, corr_w)`` with ``x_pred = c_x x + sum pred_w[k]
    m[k]`` and ``x_corr = c_x x + sum corr_w[k] m[k] + corr_w[-1] m_new``.

    Zhao et al. 2023, data prediction: eq. (7)/(8) with ``x~ = sigma_t/sigma_s x_s -
    alpha_t h phi_1(-h) m_s`` (UniPC's ``h_phi_1 = expm1(-h)``), UniP-p adds
    ``- alpha_t B(h) sum_k a_k D_k/r_k`` and UniC-p ``- alpha_t B(h) (sum_k a_k D_k/r_k +
    a_p D_p)`` with ``D_k = m_{k} - m_s``, ``r_k = (lam_k - lam_s)/h``; the weights ``a`` solve
    ``R_p(h) a = g_p(h) / B(h)`` (the order conditions of Theorems 3.1 / 3.3: ``R`` the
    Vandermonde matrix of the ``r_k``, ``g_k = k! h phi_{k+1}(-h)``-type terms from the
    recursion ``phi_{k+1} = (phi_k - 1/k!) / (-h)``, Algorithms 2-3 in data-prediction form),
    except ``a = 1/2`` for UniP-2 and UniC-1 (the paper's choice).

    Every argument but ``p``, ``variant`` and ``corrector`` may be a numpy array: the weights
    of all steps of one shape (``p``, corrector or not, out of pure noise or not) in one call.
    """
    lam_s = lams[0]
    if np.all(lam_s == -math.inf):
        # infinite step out of pure noise: e^{-h} = 0, h phi_1 = -1, and bh2's B(h) -> -1 (bh1's
        # B(h) = -h is infinite, so both variants use this limit). UniC-1 with a = 1/2 then
        # averages the two data predictions: x' = x_ + alpha_t (m_s + m_new) / 2 - alpha_t m_s.
        c_x = s_t / s_s
        pred_w = [a_t]
        corr_w = [0.5 * a_t, 0.5 * a_t] if corrector else None
        return c_x, pred_w, corr_w
    h = t_lam - lam_s
    hh = -h
    h_phi_1 = np.expm1(hh)
    c_x = s_t / s_s
    base = -a_t * h_phi_1  # weight of m_s in x~
    b_h = hh if variant == "bh1" else h_phi_1
    rks = [(lams[k] - lam_s) / h for k in range(1, p)] + [1.0]
    # R[i][k] = r_k^i (Vandermonde in the r_k), b[i] = h phi_{i+2}-type term * (i+1)! / B(h)
    b = [0.0] * p
    h_phi_k = h_phi_1 / hh - 1.0
    fact = 1.0
    for i in range(p):
        b[i] = h_phi_k * fact / b_h
        fact *= i + 2
        h_phi_k = h_phi_k / hh - 1.0 / fact
    coef = -a_t * b_h
    # predictor (UniP-p): uses the p - 1 older points
    pred_w = [base]
    if p >= 2:
        rhos_p = [0.5] if p == 2 else _solve_vandermonde(rks[: p - 1], b[: p - 1])
        pred_w = _plus_differences(base, coef, rhos_p, rks)
    corr_w = None
    if corrector:  # UniC-p: also D_t = m_new - m_s, at r = rks[-1] = 1
        rhos_c = [0.5] if p == 1 else _solve_vandermonde(rks, b)
        corr_w = _plus_differences(base, coef, rhos_c, rks)
    return c_x, pred_w, corr_w


def _plus_differences(base, coef, rhos, rks):
    """Weights of ``m_s, m_1, m_2, ...`` in ``base m_s + coef sum_k rhos_k D_k / r_k`` with
    ``D_k = m_k - m_s`` (``zip`` stops at the shorter of ``rhos``, ``rks``)."""
    w = [base]
    for rho, r in zip(rhos, rks):  # noqa: B905 - the predictor uses only the first p - 1 r_k
        d = coef * rho / r
        w.append(d)
        w[0] = w[0] - d  # not in place: ``base`` may be an array the caller reuses
    return w


def _unipc_plan(denoiser, grid, order, variant, use_corrector, lower_order_final):
    """Per step ``(c_x, pred_w, corr_w)`` of :func:`_unipc_step_plan`, as python floats."""
    alpha, sigma = _alpha_sigma(denoiser, grid)
    lam = [_half_logsnr(a, s) for a, s in zip(alpha, sigma, strict=True)]
    steps = len(grid) - 1
    plan: list = [None] * steps
    shapes: dict[tuple, list[int]] = {}  # (p, corrector, out of pure noise) -> steps
    for i in range(steps):
        if sigma[i + 1] == 0.0:
            # step to sigma = 0 (lam = +inf): the limiting first-order step x' = alpha_t x_hat
            plan[i] = (0.0, [alpha[i + 1]], None)
            continue
        # history points with finite lam, newest first (a lam = -inf point drops out of the
        # higher-order terms in the limit: its divided difference D_k / r_k -> 0)
        p = 1
        while p < min(order, i + 1) and lam[i - p] > -math.inf:
            p += 1
        if lower_order_final and steps < 10:
            p = min(p, steps - i)
        corrector = use_corrector and i < steps - 1
        shapes.setdefault((p, corrector, lam[i] == -math.inf), []).append(i)
    # the steps of one shape share one vectorized evaluation of the step formulas
    a, s, lam_a = np.array(alpha), np.array(sigma), np.array(lam)
    for (p, corrector, _), rows in shapes.items():
        i = np.array(rows)
        c_x, pred_w, corr_w = _unipc_step_plan(a[i + 1], s[i + 1], s[i],
                                               [lam_a[i - k] for k in range(p)], lam_a[i + 1],
                                               p, variant, corrector)
        n = len(rows)
        pred_rows = zip(*(_floats(w, n) for w in pred_w), strict=True)
        corr_rows = zip(*(_floats(w, n) for w in corr_w), strict=True) if corrector else [None] * n
        plan_rows = zip(rows, _floats(c_x, n), pred_rows, corr_rows, strict=True)
        for step, *weights in plan_rows:
            plan[step] = tuple(weights)
    return plan


def _floats(v, n: int) -> list[float]:
    """A scalar or ``[n]`` array of per-step values as ``n`` python floats."""
    return np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).tolist()


def _run_unipc(denoiser, x_init, grid, cond, guidance, record, order, variant, use_corrector,
               lower_order_final):
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc: variant must be 'bh1' or 'bh2', got {variant!r}")
    plan = _unipc_plan(denoiser, grid, order, variant, use_corrector, lower_order_final)
    predict = Predictor(denoiser, cond, guidance, times=grid, reads=("data",))
    ts = grid.tolist()
    x = x_init
    hist: list[torch.Tensor] = []  # data predictions, newest first
    pending = None  # model output at the current x (from the previous corrector)
    for i, (c_x, pred_w, corr_w) in enumerate(plan):
        if pending is None:
            pending = predict(x, ts[i]).data
        hist = [pending, *hist][: max(order, 1)]
        data = pending
        pending = None
        if corr_w is None:
            x_next = _combine([c_x, *pred_w], [x, *hist])
        else:
            # UniC: the model at the predicted point corrects this step and is reused by the
            # next; both updates share the term c_x x
            x_scaled = scale(x, c_x)
            x_pred = _combine(pred_w, hist, x_scaled)
            pending = predict(x_pred, ts[i + 1]).data
            x_next = _combine(corr_w, [*hist[: len(corr_w) - 1], pending], x_scaled)
        if record is not None:
            record.append(StepRecord(ts[i], ts[i + 1], x, x_next, data))
        x = x_next
    return x


@register("unipc", order=3)
def unipc(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
          order: int = 2, variant: str = "bh2", lower_order_final: bool = True):
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
    of Diffusion Models"): UniP-p predictor + UniC-p corrector, data prediction, multistep.

    ``order`` = p (1-3), the number of stored model outputs the predictor uses; UniC raises the
    order to p + 1 (Theorem 3.3) without a new evaluation, since the model output at the
    predicted point that UniC needs is the next step's history (eq. (8)): nfe = steps (no
    corrector after the last step). Warm-up uses lower orders (step 0 is UniPC-1, of order 2,
    so p = 3 is of order 3 once the warm-up error shows). ``variant`` picks B(h): ``"bh1"`` = h
    (the paper's advice for unconditional sampling under 10 steps), ``"bh2"`` = e^h - 1 (its
    advice for guided sampling). Default p = 2 with bh2, the paper's recommended guided
    setting: on tiltflow's 2-D mixtures p = 3 was no better at 4-10 evaluations and bh1 wins
    only at 4-6 evaluations (see the solvers benchmark). ``lower_order_final`` (the reference
    implementation's stabiliser for fewer than 10 steps) caps step i's order at ``steps - i``.
    A step to sigma = 0 is the limiting first-order step ``x' = x_hat``; the step out of
    alpha = 0 uses bh2's finite limit of B(h), so its corrector averages the two data
    predictions. See the module docstring.
    """
    order = _check_order("unipc", order, 1, 3)
    return _run_unipc(denoiser, x_init, grid, cond, guidance, record, order, variant, True,
                      lower_order_final)


@register("unipc_p", order=2)
def unipc_p(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
            order: int = 2, variant: str = "bh2", lower_order_final: bool = True):
    """UniP-p alone (Zhao et al. 2023, eq. (7)): UniPC's multistep predictor without the
    corrector, order p = ``order`` (1-3); nfe = steps. Options as in :func:`unipc`."""
    order = _check_order("unipc_p", order, 1, 3)
    return _run_unipc(denoiser, x_init, grid, cond, guidance, record, order, variant, False,
                      lower_order_final)


# ----------------------------------------------------------------------------------------------
# DEIS
# ----------------------------------------------------------------------------------------------

_QUAD_NODES = 48


def _deis_nodes() -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes in ``theta in (0, pi)`` of the DEIS integrals: weights ``w`` with
    ``d tau = (t_s - t_t) w`` and ramps ``(1 - cos theta) / 2`` (``tau = t_t + (t_s - t_t) ramp``)."""
    nodes, weights = np.polynomial.legendre.leggauss(_QUAD_NODES)
    theta = (nodes + 1) * (math.pi / 2)
    return weights * (math.pi / 2) * np.sin(theta) / 2, (1 - np.cos(theta)) / 2


def _deis_plan(denoiser, grid, order, lower_order_final):
    """Per step the weights ``[D_0, D_1, ...]`` of
    ``x' = alpha_t x_hat_s + sigma_t eps_s + sum_j D_j eps_{i-j}``.

    DEIS eq. (14) for the PF-ODE ``d(x/alpha) = eps d(sigma/alpha)`` (any schedule) reads
    ``x' = alpha_t/alpha_s x + sum_j C_j eps_{i-j}``, ``C_j = alpha_t int_{t_s}^{t_t}
    (sigma/alpha)'(tau) l_j(tau) dtau`` with ``l_j`` the Lagrange basis on the stored times.
    Substituting ``x = alpha_s x_hat_s + sigma_s eps_s`` gives the form above with
    ``D_j = alpha_t int (sigma/alpha)' (l_j - [j = 0]) dtau``: DDIM plus a correction, finite
    and well conditioned as ``alpha_s -> 0``. The integrals use Gauss-Legendre in ``theta``
    with ``tau = t_t + (t_s - t_t)(1 - cos theta)/2``, which also absorbs the integrable
    ``1/sqrt(t)`` singularity of VP schedules at ``t = 0``.
    """
    g = grid.to(torch.float64)
    alpha, sigma = _alpha_sigma(denoiser, g)
    times = g.tolist()
    steps = len(times) - 1
    w_theta, ramp = _deis_nodes()
    t_s, t_t = g[:-1].numpy(), g[1:].numpy()
    taus = t_t[:, None] + (t_s - t_t)[:, None] * ramp[None, :]  # [steps, nodes]
    c = denoiser.schedule(torch.from_numpy(taus))
    a, s = c.alpha.to(torch.float64).numpy(), c.sigma.to(torch.float64).numpy()
    da, ds = c.d_alpha.to(torch.float64).numpy(), c.d_sigma.to(torch.float64).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        drho = (a * ds - s * da) / (a * a)  # d(sigma/alpha)/dtau at the nodes
    final_cap = lower_order_final and steps < 10
    orders = [min(order, i + 1, steps - i) if final_cap else min(order, i + 1) for i in range(steps)]
    plan = [[0.0] * p for p in orders]
    # p = 1 is DDIM (also the step out of alpha = 0, where (sigma/alpha)' = inf); the steps of
    # each higher order p are integrated together, vectorized over steps
    t_all, a_next = g.numpy(), np.array(alpha[1:])
    for p in sorted(set(orders) - {1}):
        rows = np.array([i for i, q in enumerate(orders) if q == p])
        pts = t_all[rows[:, None] - np.arange(p)]  # [rows, p]: times[i - k], newest first
        tau = taus[rows]
        for j in range(p):
            lag = np.ones_like(tau)
            for k in range(p):
                if k != j:
                    lag *= (tau - pts[:, k, None]) / (pts[:, j, None] - pts[:, k, None])
            basis = lag - (1.0 if j == 0 else 0.0)
            integral = -(t_s[rows] - t_t[rows]) * np.sum(w_theta * drho[rows] * basis, axis=1)
            for i, v in zip(rows.tolist(), (a_next[rows] * integral).tolist(), strict=True):
                plan[i][j] = v
    return alpha, sigma, plan


@register("deis", order=3)
def deis(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
         order: int = 3, lower_order_final: bool = False):
    """DEIS, the tAB multistep exponential integrator (Zhang & Chen 2023, "Fast Sampling of
    Diffusion Models with Exponential Integrator", sec. 4, eq. (14)): the noise prediction is
    extrapolated by the polynomial in t through the last ``order`` evaluations (tAB-(order-1)
    in the paper's naming; ``order=1`` is DDIM) and the exponential integrator's weights are
    integrated numerically once, before the loop, in float64. Lower orders warm up; nfe =
    steps. Written as DDIM plus a correction (see :func:`_deis_plan`), so the step out of
    alpha = 0 is DDIM's data form and a step to t = 0 is finite. ``lower_order_final`` caps
    step i's order at ``steps - i`` for fewer than 10 steps.
    """
    order = _check_order("deis", order, 1, 4)
    alpha, sigma, plan = _deis_plan(denoiser, grid, order, lower_order_final)
    return _data_plus_eps_loop(denoiser, x_init, grid, cond, guidance, record, alpha, sigma,
                               plan, order)


def _data_plus_eps_loop(denoiser, x_init, grid, cond, guidance, record, alpha, sigma, plan,
                        order):
    """``x' = alpha_t x_hat + sigma_t eps + sum_j plan[i][j] eps_{i-j}`` (DEIS, iPNDM)."""
    predict = Predictor(denoiser, cond, guidance, times=grid, reads=("data", "noise"))
    ts = grid.tolist()
    x = x_init
    eps_hist: list[torch.Tensor] = []
    for i, coefs in enumerate(plan):
        pred = predict(x, ts[i])
        if order > 1:
            eps_hist = [pred.noise, *eps_hist[: order - 1]]
        # alpha_t x_hat + (sigma_t + D_0) eps from (raw, x) in two operations (a fresh tensor,
        # so the older eps add in place)
        x_next = pred.combine(data=alpha[i + 1], noise=sigma[i + 1] + coefs[0])
        for c, eps in zip(coefs[1:], eps_hist[1:], strict=False):
            if c != 0.0:
                x_next.add_(eps, alpha=c)
        if record is not None:
            record.append(StepRecord(ts[i], ts[i + 1], x, x_next, pred.data))
        x = x_next
    return x


# ----------------------------------------------------------------------------------------------
# iPNDM
# ----------------------------------------------------------------------------------------------

# Adams–Bashforth weights for equal steps, newest first (orders 1-4)
_AB = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


@register("ipndm", order=4)
def ipndm(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
          order: int = 4):
    """Improved PNDM (Zhang & Chen 2023, DEIS, appendix; from Liu et al. 2022's PNDM with
    lower-order multistep warm-up instead of Runge–Kutta): Adams–Bashforth of order
    ``order`` (default 4: ``(55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24``) on the
    PF-ODE written as ``d(x/alpha) = eps_hat d(sigma/alpha)`` (EDM's ODE in its sigma; the
    Karras-style form), one evaluation per step, equal-step weights whatever the grid. Its
    order is ``order`` on grids equally spaced in ``sigma/alpha`` and 2 on other smooth
    grids. The step out of alpha = 0 is the DDIM limit ``alpha' x_hat + sigma' eps_hat``.
    """
    order = _check_order("ipndm", order, 1, 4)
    alpha, sigma = _alpha_sigma(denoiser, grid)
    plan = []
    for i in range(len(grid) - 1):
        p = min(order, i + 1)
        if p == 1:  # Euler in sigma/alpha is DDIM: no correction (also out of alpha = 0)
            plan.append([0.0])
            continue
        # x' = alpha_t (x/alpha_s + d_rho sum_j b_j eps_j)
        #    = alpha_t x_hat_s + sigma_t eps_s + alpha_t d_rho (sum_j b_j eps_j - eps_s)
        d_rho = sigma[i + 1] / alpha[i + 1] - sigma[i] / alpha[i]
        ab = _AB[p - 1]
        plan.append([alpha[i + 1] * d_rho * (w - (1.0 if j == 0 else 0.0))
                     for j, w in enumerate(ab)])
    return _data_plus_eps_loop(denoiser, x_init, grid, cond, guidance, record, alpha, sigma,
                               plan, order)
