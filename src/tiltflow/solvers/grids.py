"""Time grids: float64 tensors of times, decreasing from ``t_start`` (noise) to ``t_end``.

A grid with ``n + 1`` points defines ``n`` solver steps. Grids that are spaced in noise level
(log-SNR, Karras) cannot include t = 0, where the log-SNR is infinite: they end at a small noise
level and append t = 0 as the final step, as EDM does.
"""

from __future__ import annotations

import math

import torch

from ..schedules import Schedule

__all__ = ["uniform", "logsnr_uniform", "karras", "shifted", "get_grid", "available"]


def _check_steps(steps: int) -> int:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"a time grid needs steps >= 1 (an int), got {steps!r}")
    return steps


def uniform(steps: int, t_start: float = 1.0, t_end: float = 0.0, schedule=None) -> torch.Tensor:
    """Equal steps in t (for ``VPDiscrete`` this is diffusers' "trailing" spacing)."""
    _check_steps(steps)
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def _level(schedule: Schedule, t: float) -> float:
    c = schedule(torch.tensor(t, dtype=torch.float64))
    return float(c.sigma / c.alpha)


def _noise_level_grid(schedule: Schedule, steps: int, hi: float, lo: float, spacing) -> torch.Tensor:
    """``steps + 1`` times. Noise levels ``sigma/alpha`` follow ``spacing(ramp, hi, lo)`` for
    ramp in [0, 1]; when t = 0 is clean the last level ``lo`` is followed by t = 0, and when
    t = 0 is itself noisy (VE) the levels end exactly at its level."""
    floor = _level(schedule, 0.0)
    if floor > 0:
        ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        levels = spacing(ramp, hi, max(lo, floor))
        t = schedule.t_from_logsnr(-2 * torch.log(levels)).clamp(0.0, 1.0)
        t[-1] = 0.0
        return t
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    t = schedule.t_from_logsnr(-2 * torch.log(spacing(ramp, hi, lo))).clamp(0.0, 1.0)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def logsnr_uniform(
    steps: int, schedule: Schedule, t_start: float = 1.0, level_min: float = 2e-3
) -> torch.Tensor:
    """Equal steps in log-SNR (DPM-Solver's "logSNR" spacing, Lu et al. 2022), from
    ``t_start`` down to noise level ``sigma/alpha = level_min``, then a final step to t = 0."""
    _check_steps(steps)
    if steps == 1:
        return torch.tensor([t_start, 0.0], dtype=torch.float64)
    hi = min(_level(schedule, t_start), 1e4)  # alpha = 0 (pure noise) has infinite level

    def geometric(ramp, hi, lo):
        return torch.exp(math.log(hi) + ramp * (math.log(lo) - math.log(hi)))

    grid = _noise_level_grid(schedule, steps, hi, level_min, geometric)
    grid[0] = t_start
    return grid


def karras(
    steps: int, schedule: Schedule, rho: float = 7.0, level_min: float = 2e-3,
    level_max: float | None = None,
) -> torch.Tensor:
    """EDM's schedule (Karras et al. 2022, eq. 5): noise levels
    ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, then t = 0."""
    _check_steps(steps)
    if steps == 1:
        return torch.tensor([1.0, 0.0], dtype=torch.float64)
    hi = level_max if level_max is not None else min(_level(schedule, 1.0), 1e4)

    def rho_spaced(ramp, hi, lo):
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho

    grid = _noise_level_grid(schedule, steps, hi, level_min, rho_spaced)
    if level_max is None:
        grid[0] = 1.0
    return grid


def shifted(steps: int, shift: float = 3.0, schedule=None) -> torch.Tensor:
    """SD3/Flux time shift (Esser et al. 2024, sec. 5.3.2): ``t' = s t / (1 + (s - 1) t)``
    applied to a uniform grid; ``shift > 1`` spends more steps at high noise."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    t = uniform(steps)
    return shift * t / (1 + (shift - 1) * t)


_GRIDS = {"uniform": uniform, "logsnr": logsnr_uniform, "karras": karras, "shifted": shifted}


def available() -> list[str]:
    return sorted(_GRIDS)


def get_grid(name: str, steps: int, schedule: Schedule, **options) -> torch.Tensor:
    """Build a named grid for ``schedule`` with ``steps`` steps."""
    if name not in _GRIDS:
        raise ValueError(f"unknown time grid {name!r}; choose one of {available()}")
    fn = _GRIDS[name]
    if fn in (logsnr_uniform, karras):
        return fn(steps, schedule, **options)
    return fn(steps, **options)
