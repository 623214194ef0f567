"""Runge–Kutta solvers for the probability-flow ODE, and the float64 reference solution.

- ``midpoint`` (explicit midpoint, order 2, 2 evaluations a step), ``rk4`` (classic
  Runge–Kutta, order 4, 4 evaluations a step) and ``rk4_38`` (Kutta's 3/8 rule, the fixed-grid
  ``rk4`` of torchdiffeq / flow_matching) integrate ``dx_t/dt = alpha' x_hat + sigma' eps_hat``
  in the schedule's own time t, as flow_matching's ``ODESolver`` does.
- ``dopri5`` and :func:`~tiltflow.solvers.reference.reference_solve` (adaptive, in the angle
  variable ``atan(sigma/alpha)``) live in :mod:`.reference`.

The clean end (sigma = 0)
-------------------------
At a time where ``sigma = 0`` no network evaluation can give the velocity: a data prediction
gives ``eps_hat = (x_t - alpha x_hat) / sigma = 0/0``, and on VP schedules ``sigma ~ sqrt(t)`` so
``sigma'`` is infinite. What *is* known there without the network is the Bayes-optimal pair
``x_hat = x_t / alpha`` and ``eps_hat = E[noise | x_t = alpha x] = E[noise] = 0`` (the state
carries no information about the noise); for data with a smooth density it is also the limit,
since ``eps_hat = -sigma grad log p_t -> 0``. The solvers use this and never call the network at
sigma = 0:

- ``midpoint`` never evaluates at the end of a step, so it needs nothing special.
- ``rk4`` / ``rk4_38`` on a final step that ends at t = 0: where ``sigma'`` is finite there (rectified flow,
  cosine, EDM) the last stage is the exact velocity ``(alpha'/alpha) x`` (``-x`` for rectified
  flow, 0 for cosine and EDM), so the step is the full RK4 step at the price of three
  evaluations. On VP schedules the limit ``-(sigma^2)'/2 * grad log p_0(x)`` needs the data score,
  which no evaluation at or near t = 0 gives stably; there (and on VE, whose t = 0 is not clean,
  to keep one NFE rule) the final step is Ralston's third-order method (nodes 0, 1/2, 3/4). A
  single step with an O(h^4) local error leaves the global order at 4 (as Heun's final Euler
  step does in EDM). Either way a grid ending at t = 0 costs ``4 * steps - 1`` evaluations.
- ``dopri5`` / ``reference_solve`` integrate in ``phi = atan(sigma / alpha)``
  (:mod:`.reference`), where the field at sigma = 0 is exactly 0.
"""

from __future__ import annotations

import torch

from ..predictions import Prediction
from .registry import Predictor, linear_combination, register

__all__ = ["midpoint", "rk4", "rk4_38", "TABLEAUX", "clean_limit"]



# -- fixed-step Runge–Kutta in t -------------------------------------------------------------
# Explicit Runge-Kutta tableaux (c, a, b) (Hairer, Norsett & Wanner, "Solving ODEs I",
# Tables II.1.1-2): Euler; explicit midpoint and Heun (2nd order); Ralston's third-order method
# (Ralston 1962, "Runge-Kutta methods with minimum error bounds", Math. Comp. 16); classical
# RK4 and Kutta's 3/8 rule (Kutta 1901). The fixed-step solvers below and the likelihood ODE
# use them.
TABLEAUX = {
    "euler": ((0.0,), ((),), (1.0,)),
    "midpoint": ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "ralston3": ((0.0, 0.5, 0.75), ((), (0.5,), (0.0, 0.75)), (2 / 9, 1 / 3, 4 / 9)),
    "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
            (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
    "rk4_38": ((0.0, 1 / 3, 2 / 3, 1.0), ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
               (1 / 8, 3 / 8, 3 / 8, 1 / 8)),
}


def clean_limit(x: torch.Tensor, point) -> Prediction:
    """The Bayes-optimal prediction where sigma = 0 (module docstring), with no network call:
    ``x_hat = x_t / alpha``, ``eps_hat = 0``; its velocity is ``(alpha'/alpha) x_t`` (infinite
    where ``sigma'`` is, as on VP schedules)."""
    return Prediction.from_hub(x / point.coeffs.alpha, torch.zeros_like(x), x, point.coeffs)


def _clean(schedule, times: torch.Tensor) -> list[tuple[bool, bool]]:
    """Per time: (sigma = 0 there, the velocity's limit ``(alpha'/alpha) x`` is finite)."""
    c = schedule(times)
    finite = torch.isfinite(c.d_sigma) & torch.isfinite(c.d_alpha) & (c.alpha > 0)
    return list(zip((c.sigma == 0).tolist(), finite.tolist(), strict=True))


def _runge_kutta(tableau, denoiser, x_init, grid, cond, guidance, record, hook):
    """An explicit RK method of :data:`TABLEAUX` on the PF-ODE velocity in t, evaluated at the
    stage times ``t + c_s h``. A stage where sigma = 0 takes the exact :func:`clean_limit`; where
    that limit is infinite (VP schedules at t = 0) a final step that needs it is Ralston's
    third-order step instead (module docstring)."""
    predict = Predictor(denoiser, cond, guidance, record, hook)
    schedule = denoiser.schedule
    h = grid[1:] - grid[:-1]
    tableaux = [TABLEAUX[tableau]] * len(h)
    ((clean_end, finite_end),) = _clean(schedule, grid[-1:])
    ralston_last = (TABLEAUX[tableau][0][-1] == 1.0 and float(grid[-1]) == 0.0
                    and not (clean_end and finite_end))
    if ralston_last:  # (also on VE, whose t = 0 is not clean: one NFE rule)
        tableaux[-1] = TABLEAUX["ralston3"]
    # every stage's time and schedule coefficients, in one call before the loop
    nodes = torch.tensor(TABLEAUX[tableau][0], dtype=grid.dtype)
    stage_times = (grid[:-1, None] + h[:, None] * nodes).flatten()
    if ralston_last:
        last = grid[-2] + h[-1] * torch.tensor(tableaux[-1][0], dtype=grid.dtype)
        stage_times = torch.cat([stage_times[: -len(nodes)], last])
    stages = iter(zip(schedule.points(stage_times), _clean(schedule, stage_times), strict=True))
    points = schedule.points(grid)
    x = x_init
    for i, (h_i, (_, rows, weights)) in enumerate(zip(h.unbind(), tableaux, strict=True)):
        ks, first = [], None
        for row in rows:
            point, (clean, finite) = next(stages)
            x_stage = x + h_i * linear_combination(row, ks) if row else x
            if not clean:
                pred = predict(x_stage, point)
            elif finite:
                pred = clean_limit(x_stage, point)
            else:
                raise ValueError(
                    f"the grid starts a step at t={float(point):g}, where sigma = 0 and this "
                    "schedule's velocity is singular (sigma' = inf); start at a small t > 0 "
                    "(noise level ~1e-3), as inversion and likelihood do")
            if first is None:
                first = pred
            ks.append(pred.velocity)
        x_next = x + h_i * linear_combination(weights, ks)
        x = predict.end_step(points[i], points[i + 1], x, x_next, first)
    return x


@register("midpoint", order=2, evals_per_step=2)
def midpoint(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
             hook=None):
    """Explicit midpoint rule (Runge 1895; Hairer, Nørsett & Wanner, "Solving ODEs I", 2nd ed.
    1993, sec. II.1: ``k1 = v(t, x)``, ``k2 = v(t + h/2, x + h/2 k1)``, ``x' = x + h k2``) on
    the PF-ODE velocity in the schedule's time t. Its stages never fall on the end of a step,
    so it never evaluates at t = 0 (sigma = 0). 2 evaluations a step."""
    return _runge_kutta("midpoint", denoiser, x_init, grid, cond, guidance, record, hook)


@register("rk4", order=4, evals_per_step=4, skips_last_eval=True)
def rk4(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
        hook=None):
    """Classic fourth-order Runge–Kutta (Kutta 1901; Hairer, Nørsett & Wanner 1993, sec. II.1)
    on the PF-ODE velocity in the schedule's time t: ``k1 = v(t, x)``, ``k2 = v(t + h/2,
    x + h/2 k1)``, ``k3 = v(t + h/2, x + h/2 k2)``, ``k4 = v(t + h, x + h k3)``,
    ``x' = x + h/6 (k1 + 2 k2 + 2 k3 + k4)``.

    A final step to t = 0 never calls the network at t = 0 (see the module docstring): where
    sigma' is finite there (rectified flow, cosine, EDM) ``k4 = (alpha'/alpha) x`` exactly; on VP
    schedules (and VE) that step is Ralston's third-order method (``k2`` at ``h/2``,
    ``k3 = v(t + 3h/4, x + 3h/4 k2)``, ``x' = x + h (2 k1 + 3 k2 + 4 k3) / 9``), whose one
    O(h^4) local error keeps the global order 4. So ``nfe = 4 * steps - 1`` on a grid ending at
    t = 0, else ``4 * steps``."""
    return _runge_kutta("rk4", denoiser, x_init, grid, cond, guidance, record, hook)


@register("rk4_38", order=4, evals_per_step=4, skips_last_eval=True)
def rk4_38(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
           hook=None):
    """Kutta's 3/8 rule (Kutta 1901; Hairer, Nørsett & Wanner 1993, Table II.1.2), the other
    classical fourth-order method: ``k2 = v(t + h/3, x + h/3 k1)``, ``k3 = v(t + 2h/3,
    x + h (-k1/3 + k2))``, ``k4 = v(t + h, x + h (k1 - k2 + k3))``, ``x' = x + h/8 (k1 + 3 k2 +
    3 k3 + k4)``. Its error constants are smaller than the classic rule's; it is the method
    torchdiffeq's (and so flow_matching's) fixed-grid ``rk4`` uses. Same clean final step and
    NFE rule as :func:`rk4`."""
    return _runge_kutta("rk4_38", denoiser, x_init, grid, cond, guidance, record, hook)
