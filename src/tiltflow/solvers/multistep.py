"""Multistep exponential-integrator samplers: UniPC, DEIS and iPNDM (one evaluation per step).

Each reuses the model outputs of earlier steps to raise its order instead of spending extra
evaluations. All weights are computed in float64 from the grid before the loop (torch operations,
differentiable in the grid, vectorized over the steps); the loop only forms linear
combinations of stored predictions.

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

import functools
import math

import numpy as np
import torch

from .registry import Predictor, linear_combination, plan_numbers, register

__all__ = ["unipc", "unipc_p", "deis", "ipndm"]

_F64 = torch.float64


def _check_order(name: str, order, lo: int, hi: int) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or not lo <= order <= hi:
        raise ValueError(f"{name}: order must be an int in [{lo}, {hi}], got {order!r}")
    return order


# alpha/sigma below this counts as pure noise (lam = -inf): cosine's alpha(1) = cos(pi/2) is
# 6e-17 in float64, and the exact step from there differs from its alpha = 0 limit by O(alpha)
_PURE_NOISE = 1e-10


def _half_logsnr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``log(alpha / sigma)``, -inf at (numerical) pure noise and +inf at sigma = 0."""
    lam = torch.log(alpha) - torch.log(sigma)
    return torch.where(alpha <= _PURE_NOISE * sigma, torch.full_like(lam, -math.inf), lam)


# ----------------------------------------------------------------------------------------------
# UniPC
# ----------------------------------------------------------------------------------------------


def _unipc_weights(a_t, s_t, s_s, lams, lam_t, p, variant, corrector):
    """Weights of UniPC steps from ``s`` (history ``lams[0] = lam_s, lams[1], ...``, newest
    first) to ``t``: returns ``(c_x, pred_w, corr_w)`` with ``x_pred = c_x x + sum pred_w[k]
    m[k]`` and ``x_corr = c_x x + sum corr_w[k] m[k] + corr_w[-1] m_new``. Every argument but
    ``p``, ``variant`` and ``corrector`` is a ``[rows]`` tensor: all steps of one shape at once.

    Zhao et al. 2023, data prediction: eq. (7)/(8) with ``x~ = sigma_t/sigma_s x_s -
    alpha_t h phi_1(-h) m_s`` (UniPC's ``h_phi_1 = expm1(-h)``), UniP-p adds
    ``- alpha_t B(h) sum_k a_k D_k/r_k`` and UniC-p ``- alpha_t B(h) (sum_k a_k D_k/r_k +
    a_p D_p)`` with ``D_k = m_{k} - m_s``, ``r_k = (lam_k - lam_s)/h``; the weights ``a`` solve
    ``R_p(h) a = g_p(h) / B(h)`` (the order conditions of Theorems 3.1 / 3.3: ``R`` the
    Vandermonde matrix of the ``r_k``, ``g_k = k! h phi_{k+1}(-h)``-type terms from the
    recursion ``phi_{k+1} = (phi_k - 1/k!) / (-h)``, Algorithms 2-3 in data-prediction form),
    except ``a = 1/2`` for UniP-2 and UniC-1 (the paper's choice).
    """
    lam_s = lams[0]
    c_x = s_t / s_s
    if bool((lam_s == -math.inf).all()):
        # infinite step out of pure noise: e^{-h} = 0, h phi_1 = -1, and bh2's B(h) -> -1 (bh1's
        # B(h) = -h is infinite, so both variants use this limit). UniC-1 with a = 1/2 then
        # averages the two data predictions: x' = x_ + alpha_t (m_s + m_new) / 2 - alpha_t m_s.
        return c_x, [a_t], [0.5 * a_t, 0.5 * a_t] if corrector else None
    h = lam_t - lam_s
    hh = -h
    h_phi_1 = torch.expm1(hh)
    base = -a_t * h_phi_1  # weight of m_s in x~
    b_h = hh if variant == "bh1" else h_phi_1
    rks = [(lams[k] - lam_s) / h for k in range(1, p)] + [torch.ones_like(h)]
    # b[i] = h phi_{i+2}-type term * (i+1)! / B(h), the right-hand side of R a = b
    b, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1.0
    for i in range(p):
        b.append(h_phi_k * fact / b_h)
        fact *= i + 2
        h_phi_k = h_phi_k / hh - 1.0 / fact
    coef = -a_t * b_h
    pred_w = [base]
    if p >= 2:  # UniP-p: uses the p - 1 older points
        rhos_p = [0.5] if p == 2 else _solve_vandermonde(rks[: p - 1], b[: p - 1])
        pred_w = _plus_differences(base, coef, rhos_p, rks)
    corr_w = None
    if corrector:  # UniC-p: also D_t = m_new - m_s, at r = rks[-1] = 1
        rhos_c = [0.5] if p == 1 else _solve_vandermonde(rks, b)
        corr_w = _plus_differences(base, coef, rhos_c, rks)
    return c_x, pred_w, corr_w


def _solve_vandermonde(nodes: list, rhs: list) -> list:
    """``a`` with ``sum_k nodes[k]**i a_k = rhs[i]`` (``[rows]`` tensors; one system a row)."""
    matrix = torch.stack([torch.stack([r**i for r in nodes], -1) for i in range(len(nodes))], -2)
    return list(torch.linalg.solve(matrix, torch.stack(rhs, -1)).unbind(-1))


def _plus_differences(base, coef, rhos, rks):
    """Weights of ``m_s, m_1, m_2, ...`` in ``base m_s + coef sum_k rhos_k D_k / r_k`` with
    ``D_k = m_k - m_s`` (``zip`` stops at the shorter of ``rhos``, ``rks``)."""
    w = [base]
    for rho, r in zip(rhos, rks):  # noqa: B905 - the predictor uses only the first p - 1 r_k
        d = coef * rho / r
        w.append(d)
        w[0] = w[0] - d
    return w


def _unipc_plan(denoiser, grid, order, variant, use_corrector, lower_order_final):
    """Per step ``(c_x, pred_w, corr_w)`` of :func:`_unipc_weights` (0-d tensors)."""
    c = denoiser.schedule(grid)
    alpha, sigma = c.alpha, c.sigma
    lam = _half_logsnr(alpha, sigma)
    finite, clean = (lam > -math.inf).tolist(), (sigma == 0).tolist()
    steps = len(grid) - 1
    plan: list = [None] * steps
    shapes: dict[tuple, list[int]] = {}  # (p, corrector, out of pure noise) -> steps
    for i in range(steps):
        if clean[i + 1]:
            # step to sigma = 0 (lam = +inf): the limiting first-order step x' = alpha_t x_hat
            plan[i] = (0.0, [alpha[i + 1]], None)
            continue
        # history points with finite lam, newest first (a lam = -inf point drops out of the
        # higher-order terms in the limit: its divided difference D_k / r_k -> 0)
        p = 1
        while p < min(order, i + 1) and finite[i - p]:
            p += 1
        if lower_order_final and steps < 10:
            p = min(p, steps - i)
        corrector = use_corrector and i < steps - 1
        shapes.setdefault((p, corrector, not finite[i]), []).append(i)
    # the steps of one shape share one vectorized evaluation of the step formulas
    for (p, corrector, _), rows in shapes.items():
        i = torch.tensor(rows)
        c_x, pred_w, corr_w = _unipc_weights(alpha[i + 1], sigma[i + 1], sigma[i],
                                             [lam[i - k] for k in range(p)], lam[i + 1],
                                             p, variant, corrector)
        c_x, pred_w = plan_numbers(c_x), [plan_numbers(w) for w in pred_w]
        corr_w = [plan_numbers(w) for w in corr_w] if corrector else None
        for n, step in enumerate(rows):
            plan[step] = (c_x[n], [w[n] for w in pred_w], [w[n] for w in corr_w] if corrector else None)
    return plan


def _run_unipc(denoiser, x_init, grid, cond, guidance, record, hook, order, variant,
               use_corrector, lower_order_final):
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc: variant must be 'bh1' or 'bh2', got {variant!r}")
    plan = _unipc_plan(denoiser, grid, order, variant, use_corrector, lower_order_final)
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(grid)
    x = x_init
    history: list[torch.Tensor] = []  # data predictions, newest first
    pred = None  # the model at the current x (from the previous step's corrector)
    for i, (c_x, pred_w, corr_w) in enumerate(plan):
        if pred is None:
            pred = predict(x, points[i])
        history = [pred.data, *history][: max(order, 1)]
        x_scaled = c_x * x
        x_next = x_scaled + linear_combination(pred_w, history)  # UniP
        first, pred = pred, None
        if corr_w is not None:
            # UniC: the model at the predicted point corrects this step and is the next
            # step's model output (no extra evaluation)
            pred = predict(x_next, points[i + 1])
            x_next = x_scaled + linear_combination(corr_w[:-1], history) + corr_w[-1] * pred.data
        x = predict.end_step(points[i], points[i + 1], x, x_next, first)
    return x


@register("unipc", order=3, history=True)
def unipc(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
          hook=None, order: int = 2, variant: str = "bh2", lower_order_final: bool = True):
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
    return _run_unipc(denoiser, x_init, grid, cond, guidance, record, hook, order, variant, True,
                      lower_order_final)


@register("unipc_p", order=2, history=True)
def unipc_p(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
            hook=None, order: int = 2, variant: str = "bh2", lower_order_final: bool = True):
    """UniP-p alone (Zhao et al. 2023, eq. (7)): UniPC's multistep predictor without the
    corrector, order p = ``order`` (1-3); nfe = steps. Options as in :func:`unipc`."""
    order = _check_order("unipc_p", order, 1, 3)
    return _run_unipc(denoiser, x_init, grid, cond, guidance, record, hook, order, variant,
                      False, lower_order_final)


# ----------------------------------------------------------------------------------------------
# DEIS
# ----------------------------------------------------------------------------------------------

_QUAD_NODES = 48


@functools.cache
def _deis_nodes() -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes in ``theta in (0, pi)`` of the DEIS integrals: weights ``w`` with
    ``d tau = (t_s - t_t) w`` and ramps ``(1 - cos theta) / 2`` (``tau = t_t + (t_s - t_t) ramp``)."""
    nodes, weights = np.polynomial.legendre.leggauss(_QUAD_NODES)
    theta = (nodes + 1) * (math.pi / 2)
    w, ramp = weights * (math.pi / 2) * np.sin(theta) / 2, (1 - np.cos(theta)) / 2
    return torch.from_numpy(w), torch.from_numpy(ramp)


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
    steps = len(grid) - 1
    final_cap = lower_order_final and steps < 10
    orders = [min(order, i + 1, steps - i) if final_cap else min(order, i + 1) for i in range(steps)]
    alpha = denoiser.schedule(grid).alpha
    plan = [[0.0] * p for p in orders]
    # p = 1 is DDIM (also the step out of alpha = 0, where (sigma/alpha)' = inf); the steps of
    # each higher order p are integrated together, vectorized over steps
    w_theta, ramp = _deis_nodes()
    for p in sorted(set(orders) - {1}):
        rows = torch.tensor([i for i, q in enumerate(orders) if q == p])
        t_s, t_t = grid[rows], grid[rows + 1]
        tau = t_t[:, None] + (t_s - t_t)[:, None] * ramp  # [rows, nodes]
        c = denoiser.schedule(tau)
        drho = (c.alpha * c.d_sigma - c.sigma * c.d_alpha) / c.alpha**2  # d(sigma/alpha)/dtau
        pts = grid[rows[:, None] - torch.arange(p)]  # [rows, p]: times[i - k], newest first
        for j in range(p):
            lag = torch.ones_like(tau)
            for k in range(p):
                if k != j:
                    lag = lag * (tau - pts[:, k, None]) / (pts[:, j, None] - pts[:, k, None])
            basis = lag - (1.0 if j == 0 else 0.0)
            integral = -(t_s - t_t) * (w_theta * drho * basis).sum(1)
            for i, w in zip(rows.tolist(), plan_numbers(alpha[rows + 1] * integral), strict=True):
                plan[i][j] = w
    return plan


@register("deis", order=3, history=True)
def deis(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
         hook=None, order: int = 3, lower_order_final: bool = False):
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
    plan = _deis_plan(denoiser, grid, order, lower_order_final)
    return _ddim_plus_noise_history(denoiser, x_init, grid, cond, guidance, record, hook, plan,
                                    order)


def _ddim_plus_noise_history(denoiser, x_init, grid, cond, guidance, record, hook, plan, order):
    """``x' = alpha_t x_hat + sigma_t eps + sum_j plan[i][j] eps_{i-j}`` (DEIS, iPNDM)."""
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(grid)
    x, history = x_init, []  # noise predictions, newest first
    for i, weights in enumerate(plan):
        pred = predict(x, points[i])
        c = points[i + 1].coeffs
        history = [pred.noise, *history][:order]
        x_next = c.alpha * pred.data + c.sigma * pred.noise + linear_combination(weights, history)
        x = predict.end_step(points[i], points[i + 1], x, x_next, pred)
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


@register("ipndm", order=4, history=True)
def ipndm(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
          hook=None, order: int = 4):
    """Improved PNDM (Zhang & Chen 2023, DEIS, appendix; from Liu et al. 2022's PNDM with
    lower-order multistep warm-up instead of Runge–Kutta): Adams–Bashforth of order
    ``order`` (default 4: ``(55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24``) on the
    PF-ODE written as ``d(x/alpha) = eps_hat d(sigma/alpha)`` (EDM's ODE in its sigma; the
    Karras-style form), one evaluation per step, equal-step weights whatever the grid. Its
    order is ``order`` on grids equally spaced in ``sigma/alpha`` and 2 on other smooth
    grids. The step out of alpha = 0 is the DDIM limit ``alpha' x_hat + sigma' eps_hat``.
    """
    order = _check_order("ipndm", order, 1, 4)
    c = denoiser.schedule(grid)
    alpha, rho = plan_numbers(c.alpha), plan_numbers(c.sigma / c.alpha)
    plan = []
    for i in range(len(grid) - 1):
        p = min(order, i + 1)
        if p == 1:  # Euler in sigma/alpha is DDIM: no correction (also out of alpha = 0)
            plan.append([0.0])
            continue
        # x' = alpha_t (x/alpha_s + d_rho sum_j b_j eps_j)
        #    = alpha_t x_hat_s + sigma_t eps_s + alpha_t d_rho (sum_j b_j eps_j - eps_s)
        d_rho = rho[i + 1] - rho[i]
        plan.append([alpha[i + 1] * d_rho * (w - (1.0 if j == 0 else 0.0))
                     for j, w in enumerate(_AB[p - 1])])
    return _ddim_plus_noise_history(denoiser, x_init, grid, cond, guidance, record, hook, plan,
                                    order)
