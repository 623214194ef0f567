"""First-order and trapezoidal samplers for the probability-flow ODE
``dx_t/dt = alpha' x_hat + sigma' eps_hat`` in the schedule's own time t."""

from __future__ import annotations

from .registry import Predictor, register


@register("euler", order=1)
def euler(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
          hook=None):
    """Euler's method on the PF-ODE velocity: ``x' = x + dt v(x, t)``."""
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(grid)
    x = x_init
    for t, t_next in zip(points[:-1], points[1:], strict=True):
        pred = predict(x, t)
        x = predict.end_step(t, t_next, x, x + (t_next.t - t.t) * pred.velocity, pred)
    return x


@register("heun", order=2, evals_per_step=2, skips_last_eval=True)
def heun(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
         hook=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1) in the schedule's time t: an
    Euler predictor ``x~ = x + dt v``, then the trapezoidal corrector
    ``x' = x + dt/2 (v + v(x~, t'))``; the corrector is skipped on a final step to t = 0, where
    the velocity of VP schedules is singular (so nfe = 2 * steps - 1)."""
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(grid)
    x = x_init
    for t, t_next in zip(points[:-1], points[1:], strict=True):
        dt = t_next.t - t.t
        pred = predict(x, t)
        v = pred.velocity
        x_next = x + dt * v
        if float(t_next) > 0:
            x_next = x + dt / 2 * (v + predict(x_next, t_next).velocity)
        x = predict.end_step(t, t_next, x, x_next, pred)
    return x
