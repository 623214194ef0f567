"""Deterministic samplers for the probability-flow ODE ``dx_t/dt = alpha' x_hat + sigma' eps_hat``.

All step coefficients are computed in float64 from the grid before the loop; the loop itself
only does tensor arithmetic and network calls (no ``.item()``, no device sync). Each update is
one :meth:`~tiltflow.predictions.Prediction.combine`: the velocity is linear in the network's
output and ``x_t``, so ``x + dt v`` costs two tensor operations whatever the model predicts.
"""

from __future__ import annotations

import torch

from .registry import Predictor, StepRecord, register


def _steps(grid):
    """Grid times and step sizes ``t_{i+1} - t_i`` as python floats (float64)."""
    ts = grid.tolist()
    return ts, [b - a for a, b in zip(ts[:-1], ts[1:], strict=True)]


@register("euler", order=1)
def euler(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None):
    """Euler's method on the PF-ODE velocity in the schedule's own time t:
    ``x' = x + dt v(x, t)``."""
    predict = Predictor(denoiser, cond, guidance, times=grid, reads=("velocity",))
    ts, dts = _steps(grid)
    x = x_init
    for i, dt in enumerate(dts):
        pred = predict(x, ts[i])
        x_next = pred.combine(x_t=1.0, velocity=dt)
        if record is not None:
            record.append(StepRecord(ts[i], ts[i + 1], x, x_next, pred.data))
        x = x_next
    return x


@register("heun", order=2, evals_per_step=2, skips_last_eval=True)
def heun(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1) in the schedule's time t: an
    Euler predictor ``x~ = x + dt v``, then the trapezoidal corrector
    ``x' = x + dt/2 (v + v(x~, t'))``; the corrector is skipped on a final step to t = 0, where
    the velocity of VP schedules is singular (so nfe = 2 * steps - 1)."""
    predict = Predictor(denoiser, cond, guidance, times=grid, reads=("velocity",))
    ts, dts = _steps(grid)
    correct = [t > 0 for t in ts[1:]]
    x = x_init
    for i, dt in enumerate(dts):
        pred = predict(x, ts[i])
        x_next = pred.combine(x_t=1.0, velocity=dt)
        if correct[i]:
            half = torch.lerp(x, x_next, 0.5)  # x + dt/2 v, halfway to the Euler point
            x_next = predict(x_next, ts[i + 1]).combine(velocity=0.5 * dt, plus=half)
        if record is not None:
            record.append(StepRecord(ts[i], ts[i + 1], x, x_next, pred.data))
        x = x_next
    return x


@register("ddim", order=1)
def ddim(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
         eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12) for any schedule: ``x' = alpha' x_hat +
    sqrt(sigma'^2 - s^2) eps_hat + s z`` with ``s = eta * std(q(x_t' | x_t, x))``.
    ``eta = 0`` is the deterministic sampler (first-order exponential integrator of the PF-ODE);
    ``eta = 1`` is DDPM's ancestral sampler."""
    from .sde import posterior_steps

    return posterior_steps(denoiser, x_init, grid, eta, cond, guidance, generator, record)
