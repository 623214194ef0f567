"""Exponential integrators in the half log-SNR ``lambda = log(alpha / sigma)``: DPM-Solver and
DPM-Solver++.

With ``x_t = alpha x + sigma noise`` the probability-flow ODE has an exact "variation of
constants" solution from ``s`` to ``t`` (``h = lambda_t - lambda_s > 0``):

- noise prediction (Lu et al. 2022, "DPM-Solver", NeurIPS, eq. 3.4)::

      x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps(lambda) dlambda

- data prediction (Lu et al. 2022b, "DPM-Solver++", eq. 8)::

      x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x_hat(lambda) dlambda

The solvers below Taylor-expand ``eps`` or ``x_hat`` in ``lambda`` and integrate the
exponentials exactly. All step coefficients are computed in float64 from the grid (torch operations,
differentiable in the grid); the loop only does tensor arithmetic and network calls.

**Endpoints.** ``lambda = -inf`` where ``alpha = 0`` (t = 1 of rectified flow; cosine's
``alpha(1)`` is 6e-17) and ``lambda = +inf`` where ``sigma = 0`` (t = 0 of every schedule but
VE). A step with ``lambda_s < -LAMBDA_LIMIT`` or ``lambda_t > LAMBDA_LIMIT`` is *singular*
(``h`` infinite or so large that the noise-prediction form cancels catastrophically). On such
a step every update here takes its mathematical limit, the first-order data-prediction step
``x_t = (sigma_t / sigma_s) x_s + (alpha_t - sigma_t alpha_s / sigma_s) x_hat_s`` (= DDIM,
exact limit of DPM-Solver++ at ``e^{-h} = 0``; the noise-prediction forms have no finite limit
at ``sigma_t = 0``: there ``eps -> 0`` is not smooth in lambda).

- Single-step solvers (``dpm_solver_k``, ``dpmpp_2s``) cost ``k`` evaluations on *every* grid
  step, so ``nfe = k * steps`` exactly. A singular step of budget ``k > 1`` is split at its
  midpoint in time ``m = (s + t) / 2``: the singular half is the DDIM limit step (1
  evaluation), the other half an order-``(k-1)`` step (k-1 evaluations) — the same as
  DPM-Solver's own practice of stopping at a small ``t_eps`` and then "denoising to zero" with
  one evaluation, with ``t_eps`` chosen inside the last step. A budget that is not a multiple
  of ``k`` raises a ``ValueError`` from :func:`tiltflow.sample` (we do not silently switch to
  DPM-Solver's "fast" order mix, which would change the method the user named).
- Multistep solvers (``dpmpp_2m``, ``dpmpp_3m``) cost 1 evaluation per step. They warm up with
  lower orders at the start (order ``min(order, i + 1)`` at step i, counting only evaluations
  at finite lambda), take the DDIM limit on singular steps, and with
  ``lower_order_final=True`` (default, as diffusers) use order 1 on the last step and at most
  order 2 on the one before when the grid has fewer than 15 steps.
"""

from __future__ import annotations

import torch

from .registry import Predictor, expm1, linear_combination, plan_numbers, register

__all__ = ["dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m",
           "LAMBDA_LIMIT"]

LAMBDA_LIMIT = 15.0  # |lambda| beyond which a step is treated as singular (sigma/alpha < 3e-7)


def _singular(lam_s, lam_t) -> bool:
    return not (lam_s >= -LAMBDA_LIMIT and lam_t <= LAMBDA_LIMIT)


def _half_logsnr(schedule, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * schedule.logsnr(t)


# -- single-step solvers ----------------------------------------------------------------------
_FRACTIONS = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}  # r1 (, r2) of Lu et al. 2022 / 2022b


def _split(schedule, s, t, k):
    """``[(s, t, k, singular)]`` for a singular step of budget ``k`` evaluations from time ``s``
    to ``t`` (0-d tensors): a budget k > 1 is split at the time midpoint into a DDIM-limit half
    (1 evaluation) and an order-(k-1) half (module docstring)."""
    lam_s, lam_t = _half_logsnr(schedule, torch.stack([s, t])).detach()
    if not _singular(lam_s, lam_t):
        return [(s, t, k, False)]
    if k == 1:
        return [(s, t, 1, True)]
    m = 0.5 * (s + t)
    if not lam_s >= -LAMBDA_LIMIT:
        return _split(schedule, s, m, 1) + _split(schedule, m, t, k - 1)
    return _split(schedule, s, m, k - 1) + _split(schedule, m, t, 1)


def _segments(schedule, grid, order):
    """Per grid step its updates ``[(s, t, k, singular)]``: one of order ``order``, or the split
    of :func:`_split` where the step touches an infinite log-SNR."""
    lam = _half_logsnr(schedule, grid).detach().tolist()
    ts = grid.unbind()
    return [_split(schedule, ts[i], ts[i + 1], order) if _singular(lam[i], lam[i + 1])
            else [(ts[i], ts[i + 1], order, False)] for i in range(len(ts) - 1)]


def _coefficients(schedule, s, t, k, singular, form):
    """Evaluation times ``[m, k]`` and coefficients (``[m]`` tensors) of ``m`` single-step
    updates of one shape from times ``s`` to ``t`` (``[m]``). Reading ``m_j`` = ``form`` at
    the j-th time:

    - order 1: ``(A, B)`` for ``x' = A x + B m0``;
    - order 2: ``(A1, B1, A, B, C)`` for ``u = A1 x + B1 m0``, ``x' = A x + B m0 + C (m1 - m0)``;
    - order 3: ``(A1, B1, A2, B2, C2, A, B, C)`` for ``u1 = A1 x + B1 m0``,
      ``u2 = A2 x + B2 m0 + C2 (m1 - m0)``, ``x' = A x + B m0 + C (m2 - m0)``.
    """
    cs, ct = schedule(s), schedule(t)
    a_s, s_s, a_t, s_t = cs.alpha, cs.sigma, ct.alpha, ct.sigma
    if singular:  # DDIM (data form): the limit of every update here at e^{-h} = 0
        return s[:, None], (s_t / s_s, a_t - s_t * a_s / s_s)
    lam_s, lam_t = _half_logsnr(schedule, s), _half_logsnr(schedule, t)
    h = lam_t - lam_s
    if k == 1 and form == "noise":  # DPM-Solver-1 (Lu et al. 2022, eq. 3.7)
        return s[:, None], (a_t / a_s, -s_t * torch.expm1(h))
    if k == 1:  # DPM-Solver++(1) (Lu et al. 2022b, eq. 9 with k = 1)
        return s[:, None], (s_t / s_s, -a_t * torch.expm1(-h))
    mids = schedule.t_from_logsnr(2 * (lam_s[:, None] + h[:, None] * torch.tensor(
        _FRACTIONS[k], dtype=h.dtype)))
    times = torch.cat([s[:, None], mids], 1)
    cm = schedule(mids)
    h_m = _half_logsnr(schedule, mids) - lam_s[:, None]
    if k == 2:
        a1, s1, h1 = cm.alpha[:, 0], cm.sigma[:, 0], h_m[:, 0]
        r1 = h1 / h  # 1/2 up to the rounding of t_from_logsnr
        if form == "noise":  # DPM-Solver-2 (Lu et al. 2022, Algorithm 1)
            B = -s_t * torch.expm1(h)
            return times, (a1 / a_s, -s1 * torch.expm1(h1), a_t / a_s, B, B / (2 * r1))
        # DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1)
        B = -a_t * torch.expm1(-h)
        return times, (s1 / s_s, -a1 * torch.expm1(-h1), s_t / s_s, B, B / (2 * r1))
    if k == 3 and form == "noise":  # DPM-Solver-3 (Lu et al. 2022, Algorithm 2)
        (a1, a2), (s1, s2), (h1, h2) = cm.alpha.unbind(1), cm.sigma.unbind(1), h_m.unbind(1)
        r1, r2 = h1 / h, h2 / h
        return times, (
            a1 / a_s, -s1 * torch.expm1(h1),
            a2 / a_s, -s2 * torch.expm1(h2), -s2 * (r2 / r1) * (torch.expm1(h2) / h2 - 1),
            a_t / a_s, -s_t * torch.expm1(h), -s_t / r2 * (torch.expm1(h) / h - 1),
        )
    raise ValueError(f"no single-step update of order {k} in {form!r} form")


def _single_step_plan(schedule, grid, order, form):
    """Per grid step ``[(kind, k, points, coefficients)]``: its updates, the coefficients of
    all updates of one shape computed together and every evaluation time's schedule
    coefficients in one call."""
    steps = _segments(schedule, grid, order)
    shapes: dict[tuple, list] = {}  # (k, singular) -> [(step, position)]
    for i, segs in enumerate(steps):
        for j, (_, _, k, singular) in enumerate(segs):
            shapes.setdefault((k, singular), []).append((i, j))
    plan = [[None] * len(segs) for segs in steps]
    for (k, singular), where in shapes.items():
        s = torch.stack([steps[i][j][0] for i, j in where])
        t = torch.stack([steps[i][j][1] for i, j in where])
        times, coefs = _coefficients(schedule, s, t, k, singular, form)
        points = schedule.points(times.flatten())
        width = times.shape[1]
        kind = "data" if singular else form
        for n, (i, j) in enumerate(where):
            plan[i][j] = (kind, 1 if singular else k, points[n * width:(n + 1) * width],
                          [c[n] for c in coefs])
    return plan


def _single_step(denoiser, x_init, grid, order, form, cond, guidance, record, hook):
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(grid)
    x = x_init
    for i, updates in enumerate(_single_step_plan(denoiser.schedule, grid, order, form)):
        x_start, first = x, None
        for kind, k, at, c in updates:
            pred = predict(x, at[0])
            if first is None:
                first = pred
            m0 = pred.as_kind(kind)
            if k == 1:
                x = c[0] * x + c[1] * m0
            elif k == 2:
                m1 = predict(c[0] * x + c[1] * m0, at[1]).as_kind(kind)
                x = c[2] * x + c[3] * m0 + c[4] * (m1 - m0)
            else:
                m1 = predict(c[0] * x + c[1] * m0, at[1]).as_kind(kind)
                m2 = predict(c[2] * x + c[3] * m0 + c[4] * (m1 - m0), at[2]).as_kind(kind)
                x = c[5] * x + c[6] * m0 + c[7] * (m2 - m0)
        x = predict.end_step(points[i], points[i + 1], x_start, x, first)
    return x


@register("dpm_solver_1", order=1)
def dpm_solver_1(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None,
                 record=None, hook=None):
    """DPM-Solver-1 (Lu et al. 2022, eq. 3.7): ``x_t = (alpha_t/alpha_s) x_s - sigma_t
    (e^h - 1) eps_s``, first-order exponential integrator with noise prediction; equal to DDIM
    (eta = 0). Singular steps (alpha_s = 0 or sigma_t = 0) take the DDIM limit."""
    return _single_step(denoiser, x_init, grid, 1, "noise", cond, guidance, record, hook)


@register("dpm_solver_2", order=2, evals_per_step=2)
def dpm_solver_2(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None,
                 record=None, hook=None):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1, r1 = 1/2): single-step, noise prediction,
    2 evaluations per step (the second at lambda_s + h/2). See the module docstring for steps
    touching alpha = 0 or sigma = 0."""
    return _single_step(denoiser, x_init, grid, 2, "noise", cond, guidance, record, hook)


@register("dpm_solver_3", order=3, evals_per_step=3)
def dpm_solver_3(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None,
                 record=None, hook=None):
    """DPM-Solver-3 (Lu et al. 2022, Algorithm 2, r1 = 1/3, r2 = 2/3): single-step, noise
    prediction, 3 evaluations per step. See the module docstring for singular steps."""
    return _single_step(denoiser, x_init, grid, 3, "noise", cond, guidance, record, hook)


@register("dpmpp_2s", order=2, evals_per_step=2)
def dpmpp_2s(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
             hook=None):
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, r = 1/2): single-step, data
    prediction, 2 evaluations per step: ``u = (sigma_u/sigma_s) x_s - alpha_u (e^{-h/2} - 1)
    x_hat_s``, ``x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) x_hat(u)``."""
    return _single_step(denoiser, x_init, grid, 2, "data", cond, guidance, record, hook)


# -- multistep solvers ------------------------------------------------------------------------
def _multistep_plan(schedule, grid, order: int, lower_order_final: bool):
    """Per step: ``(A, (c0, c1, c2)[:p])`` with ``x' = A x + sum_j c_j x_hat_{i-j}``."""
    if not isinstance(lower_order_final, bool):
        raise TypeError(f"lower_order_final must be a bool, got {lower_order_final!r}")
    n = len(grid) - 1
    c = schedule(grid)
    alpha, sigma = plan_numbers(c.alpha), plan_numbers(c.sigma)
    lam = plan_numbers(_half_logsnr(schedule, grid))
    first_finite = next((i for i, v in enumerate(lam) if v >= -LAMBDA_LIMIT), n)
    plan = []
    for i in range(n):
        a_s, s_s, l_s = alpha[i], sigma[i], lam[i]
        a_t, s_t, l_t = alpha[i + 1], sigma[i + 1], lam[i + 1]
        if _singular(l_s, l_t):  # DDIM limit (e^{-h} = 0)
            plan.append((s_t / s_s, (a_t - s_t * a_s / s_s,)))
            continue
        p = min(order, i - first_finite + 1)  # warm-up: only evaluations at finite lambda
        if lower_order_final and n < 15:
            p = min(p, n - i)  # last step order 1, the one before at most 2 (as diffusers)
        h = l_t - l_s
        A = s_t / s_s
        phi1 = expm1(-h)
        B = -a_t * phi1  # DPM-Solver++(1)
        if p == 1:
            plan.append((A, (B,)))
        elif p == 2:  # DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2)
            r0 = (l_s - lam[i - 1]) / h
            plan.append((A, (B * (1 + 1 / (2 * r0)), -B / (2 * r0))))
        else:  # DPM-Solver++(3M) (Lu et al. 2022b, sec. 4; third-order Taylor of x_hat)
            r0, r1 = (l_s - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            phi2 = phi1 / h + 1  # = (e^{-h} - 1 + h) / h
            phi3 = phi2 / h - 0.5  # = (e^{-h} - 1 + h - h^2/2) / h^2
            # D1 ~ h x_hat', D2 ~ h^2 x_hat'' / 2 (divided differences on the last 3 points):
            # D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1, D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1),
            # D2 = (D1_0 - D1_1)/(r0+r1); x' = A x + B m0 + alpha_t phi2 D1 - 2 alpha_t phi3 D2
            # (int_0^h e^{-(h-u)} u^2/2 du = -h^2 phi3, hence the factor 2 on D2).
            w1 = a_t * phi2
            w2 = -2 * a_t * phi3
            # = A x + B m0 + u D1_0 - v D1_1: expand into the weights of m0, m1, m2
            g = 1 / (r0 + r1)
            u = w1 * (1 + r0 * g) + w2 * g
            v = (w1 * r0 + w2) * g
            plan.append((A, (B + u / r0, -u / r0 - v / r1, v / r1)))
    return plan


def _multistep(denoiser, x_init, grid, order, lower_order_final, cond, guidance, record, hook):
    plan = _multistep_plan(denoiser.schedule, grid, order, lower_order_final)
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(grid)
    x, history = x_init, []  # data predictions, newest first
    for i, (A, weights) in enumerate(plan):
        pred = predict(x, points[i])
        history = [pred.data, *history][:order]
        x_next = A * x + linear_combination(weights, history)  # x' = A x + sum_j c_j x_hat_{i-j}
        x = predict.end_step(points[i], points[i + 1], x, x_next, pred)
    return x


@register("dpmpp_2m", order=2, history=True)
def dpmpp_2m(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
             hook=None, lower_order_final: bool = True):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep, data prediction, one
    evaluation per step: ``x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) D`` with
    ``D = (1 + 1/(2r)) x_hat_s - 1/(2r) x_hat_prev``, ``r = h_prev / h``. First step order 1;
    ``lower_order_final`` as in the module docstring."""
    return _multistep(denoiser, x_init, grid, 2, lower_order_final, cond, guidance, record, hook)


@register("dpmpp_3m", order=3, history=True)
def dpmpp_3m(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
             hook=None, lower_order_final: bool = True):
    """DPM-Solver++(3M) (Lu et al. 2022b, sec. 4 multistep of order 3): data prediction, one
    evaluation per step, ``x_hat`` extrapolated quadratically in lambda from the last three
    evaluations and the exponential integrals ``phi_1, phi_2, phi_3`` taken exactly. Warm-up
    with orders 1, 2; ``lower_order_final`` as in the module docstring.

    Note: with ``D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x_hat'' / 2`` the third-order term is
    ``-2 alpha_t phi_3 D2``; the weight ``-alpha_t phi_3`` found in widely used
    implementations (DPM-Solver's and diffusers' ``multistep_dpm_solver_third_order_update``)
    halves it and measures as order 2 (see tests/solvers/test_dpm.py)."""
    return _multistep(denoiser, x_init, grid, 3, lower_order_final, cond, guidance, record, hook)
