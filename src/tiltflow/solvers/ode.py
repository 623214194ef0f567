"""Deterministic samplers for the probability-flow ODE ``dx_t/dt = alpha' x_hat + sigma' eps_hat``.

All step coefficients are computed in float64 from the grid before the loop; the loop itself
only does tensor arithmetic and network calls (no ``.item()``, no device sync).
"""

from __future__ import annotations

import torch

from .registry import Predictor, StepRecord, register


@register("euler", order=1)
def euler(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None):
    """Euler's method on the PF-ODE velocity in the schedule's own time t."""
    predict = Predictor(denoiser, cond, guidance, times=grid)
    ts = grid.tolist()
    dts = (grid[1:] - grid[:-1]).tolist()
    x = x_init
    for i, dt in enumerate(dts):
        pred = predict(x, ts[i])
        x_next = torch.add(x, pred.velocity, alpha=dt)
        if record is not None:
            record.append(StepRecord(float(grid[i]), float(grid[i + 1]), x, x_next, pred.data))
        x = x_next
    return x


@register("heun", order=2, evals_per_step=2, skips_last_eval=True)
def heun(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1) in the schedule's time t: an
    Euler predictor, then the trapezoidal corrector; the corrector is skipped on a final step
    to t = 0, where the velocity of VP schedules is singular (so nfe = 2 * steps - 1)."""
    predict = Predictor(denoiser, cond, guidance, times=grid)
    ts = grid.tolist()
    dts = (grid[1:] - grid[:-1]).tolist()
    correct = (grid[1:] > 0).tolist()
    x = x_init
    for i, dt in enumerate(dts):
        pred = predict(x, ts[i])
        v = pred.velocity
        x_next = torch.add(x, v, alpha=dt)
        if correct[i]:
            x_next = torch.add(x, v + predict(x_next, ts[i + 1]).velocity, alpha=0.5 * dt)
        if record is not None:
            record.append(StepRecord(float(grid[i]), float(grid[i + 1]), x, x_next, pred.data))
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
