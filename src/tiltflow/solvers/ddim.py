"""DDIM and DDPM: steps that sample (or, for DDIM with eta = 0, follow the mean of) the
posterior ``q(x_t' | x_t, x = x_hat)`` of the forward process, for any schedule."""

from __future__ import annotations

import torch

from .registry import Predictor, plan_numbers, register


def posterior_coefficients(schedule, grid: torch.Tensor, eta: float):
    """Per step: (alpha', coefficient of eps_hat, noise std) from the float64 grid.

    With ``alpha_{t|t'} = alpha_t / alpha_t'`` and ``sigma^2_{t|t'} = sigma_t^2 -
    alpha_{t|t'}^2 sigma_t'^2``, the posterior q(x_t' | x_t, x) has variance
    ``sigma^2_{t|t'} sigma_t'^2 / sigma_t^2`` (Kingma et al. 2021, eq. 32, any schedule).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    c = schedule(grid)
    a, s = c.alpha, c.sigma
    a_now, s_now, a_next, s_next = a[:-1], s[:-1], a[1:], s[1:]
    std = torch.zeros_like(s_next)
    if eta > 0:
        ratio = torch.where(a_next > 0, a_now / a_next, torch.zeros_like(a_now))
        var_post = (s_now**2 - ratio**2 * s_next**2).clamp_min(0) * s_next**2 / s_now**2
        std = eta * var_post.sqrt()
        if bool((std > s_next * (1 + 1e-12)).any()):
            raise ValueError(f"eta={eta} asks for more noise than the step has; use eta <= 1")
    eps_coef = (s_next**2 - std**2).clamp_min(0).sqrt() if eta > 0 else s_next
    return a_next, eps_coef, std


def _posterior_steps(denoiser, x_init, grid, eta, cond, guidance, generator, record, hook):
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(grid)
    a_next, eps_coef, std = posterior_coefficients(denoiser.schedule, grid, eta)
    x = x_init
    coefficients = zip(*(plan_numbers(v) for v in (a_next, eps_coef, std)), strict=True)
    for i, (a, e, s) in enumerate(coefficients):
        pred = predict(x, points[i])
        mean = a * pred.data + e * pred.noise
        if s > 0:
            x_next = mean + s * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = predict.end_step(points[i], points[i + 1], x, x_next, pred, mean, s)
        else:
            x = predict.end_step(points[i], points[i + 1], x, mean, pred)
    return x


@register("ddim", order=1)
def ddim(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
         hook=None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12) for any schedule: ``x' = alpha' x_hat +
    sqrt(sigma'^2 - s^2) eps_hat + s z`` with ``s = eta * std(q(x_t' | x_t, x))``.
    ``eta = 0`` is the deterministic sampler (first-order exponential integrator of the PF-ODE);
    ``eta = 1`` is DDPM's ancestral sampler."""
    return _posterior_steps(denoiser, x_init, grid, eta, cond, guidance, generator, record, hook)


@register("ddpm", order=1, stochastic=True)
def ddpm(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
         hook=None):
    """DDPM ancestral sampling (Ho et al. 2020): sample q(x_t' | x_t, x = x_hat) each step."""
    return _posterior_steps(denoiser, x_init, grid, 1.0, cond, guidance, generator, record, hook)
