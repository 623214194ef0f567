"""Stochastic samplers. Each step's Gaussian transition can be recorded with its log-density
(policy-gradient fine-tuning needs it): pass ``record=[]``."""

from __future__ import annotations

import torch

from .registry import Predictor, StepRecord, gaussian_log_prob, register


def _randn_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _record_step(record, grid, i, x, x_next, pred, mean, std: float | None):
    """Append step ``i``'s Gaussian transition (``std=None``: a deterministic step). The std
    becomes a tensor only here, so a sampler without ``record`` copies nothing to the device."""
    if std is not None:
        std = torch.full((), std, dtype=x.dtype, device=x.device)
    lp = None if std is None else gaussian_log_prob(x_next, mean, std)
    record.append(StepRecord(float(grid[i]), float(grid[i + 1]), x, x_next, pred.data, mean, std, lp))


def posterior_coefficients(denoiser, grid: torch.Tensor, eta: float):
    """Per step: (alpha', coefficient of eps_hat, noise std), in float64, before the loop.

    With ``alpha_{t|t'} = alpha_t / alpha_t'`` and ``sigma^2_{t|t'} = sigma_t^2 -
    alpha_{t|t'}^2 sigma_t'^2``, the posterior q(x_t' | x_t, x) has variance
    ``sigma^2_{t|t'} sigma_t'^2 / sigma_t^2`` (Kingma et al. 2021, eq. 32, any schedule).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    c = denoiser.schedule(grid.to(torch.float64))
    a, s = c.alpha, c.sigma
    a_now, s_now, a_next, s_next = a[:-1], s[:-1], a[1:], s[1:]
    ratio = torch.where(a_next > 0, a_now / a_next, torch.zeros_like(a_now))
    var_cond = (s_now**2 - ratio**2 * s_next**2).clamp_min(0)
    var_post = var_cond * s_next**2 / s_now**2
    std = eta * var_post.sqrt()
    if bool((std > s_next * (1 + 1e-12)).any()):
        raise ValueError(f"eta={eta} asks for more noise than the step has; use eta <= 1")
    eps_coef = (s_next**2 - std**2).clamp_min(0).sqrt()
    return a_next, eps_coef, std


def posterior_steps(denoiser, x_init, grid, eta, cond, guidance, generator, record):
    """DDIM(eta) / DDPM ancestral loop shared by ``ddim`` and ``ddpm``."""
    predict = Predictor(denoiser, cond, guidance, times=grid, reads=("data", "noise"))
    ts = grid.tolist()
    a_next, eps_coef, std = posterior_coefficients(denoiser, grid, eta)
    a_next, eps_coef, std_list = a_next.tolist(), eps_coef.tolist(), std.tolist()
    x = x_init
    for i, std_i in enumerate(std_list):
        pred = predict(x, ts[i])
        mean = pred.combine(data=a_next[i], noise=eps_coef[i])
        x_next = _add_noise(mean, std_i, generator)
        if record is not None:
            _record_step(record, grid, i, x, x_next, pred, mean, std_i if std_i > 0 else None)
        x = x_next
    return x


def _add_noise(mean, std: float, generator):
    """``mean + std * z`` (one fused op), or ``mean`` itself when ``std`` is 0."""
    return torch.add(mean, _randn_like(mean, generator), alpha=std) if std > 0 else mean


@register("ddpm", order=1, stochastic=True)
def ddpm(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None):
    """DDPM ancestral sampling (Ho et al. 2020): sample q(x_t' | x_t, x = x_hat) each step."""
    return posterior_steps(denoiser, x_init, grid, 1.0, cond, guidance, generator, record)


@register("euler_maruyama", order=1, stochastic=True)
def euler_maruyama(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None,
                   record=None, noise_scale: float = 1.0):
    """Euler–Maruyama on the reverse-time SDE (Song et al. 2021, eq. 6) with adjustable noise:
    ``dx = [v - g~^2/2 * score] dt + g~ dW``, ``g~ = noise_scale * g`` and
    ``g^2 = 2 sigma^2 (sigma'/sigma - alpha'/alpha)`` (the forward SDE's diffusion). Every
    ``noise_scale`` has the same marginals; 0 is the PF-ODE (Euler), 1 the reverse SDE.
    The final step to t = 0 adds no noise (returns the mean, as Song et al.'s code does)."""
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    c = denoiser.schedule(grid.to(torch.float64))
    g2 = 2 * c.sigma**2 * (c.d_sigma / c.sigma - c.d_alpha / c.alpha) * noise_scale**2
    g2 = g2[:-1]
    if not bool(torch.isfinite(g2).all()) or float(c.alpha[0]) < 1e-6:
        raise ValueError(
            f"the reverse SDE of schedule {denoiser.schedule!r} has an infinite diffusion "
            f"coefficient at t={float(grid[0])} (alpha ~ 0 there); start later "
            "(e.g. t_start=0.99) or use solver='ddpm'"
        )
    dts = (grid[1:] - grid[:-1]).to(torch.float64)
    std = (g2 * dts.abs()).sqrt()
    std[grid[1:] == 0] = 0.0
    half_g2, dt_list, std_list = (0.5 * g2).tolist(), dts.tolist(), std.tolist()
    predict = Predictor(denoiser, cond, guidance, times=grid, reads=("velocity", "score"))
    ts = grid.tolist()
    x = x_init
    for i, dt in enumerate(dt_list):
        pred = predict(x, ts[i])
        mean = pred.combine(x_t=1.0, velocity=dt, score=-dt * half_g2[i])
        x_next = _add_noise(mean, std_list[i], generator)
        if record is not None:
            _record_step(record, grid, i, x, x_next, pred, mean, std_list[i] if std_list[i] > 0 else None)
        x = x_next
    return x
