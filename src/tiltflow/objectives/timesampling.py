"""Training-time distributions for ``t`` in [0, 1] (t = 0 clean, t = 1 noise).

Small functions, each with its density, following Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis" (SD3), sec. 3.1:

- :func:`uniform`: ``t ~ U[0, 1]`` (Liu et al. 2022; Lipman et al. 2023).
- :func:`logit_normal`: ``t = sigmoid(m + s z)``, ``z ~ N(0, 1)``, density
  ``pi_ln(t; m, s) = exp(-(logit t - m)^2 / (2 s^2)) / (s sqrt(2 pi) t (1 - t))``.
- :func:`mode`: "mode sampling with heavy tails", ``t = f(u; s) = 1 - u - s (cos^2(pi u / 2)
  - 1 + u)``, ``u ~ U[0, 1]``; ``f`` is a decreasing bijection of [0, 1] for
  ``-1 <= s <= 2 / (pi - 2)``, and the density is ``1 / |f'(f^{-1}(t))|``. ``s = 0`` is uniform;
  ``s > 0`` puts more mass at mid times.

:class:`TimeSampler` bundles one of them with its parameters so an objective can store it in its
``config()``; :func:`get` builds one from a name or ``{"name": ..., **params}``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "uniform",
    "logit_normal",
    "mode",
    "uniform_density",
    "logit_normal_density",
    "mode_density",
    "mode_inverse",
    "TimeSampler",
    "get",
    "available",
]

_MODE_S_MAX = 2.0 / (math.pi - 2.0)


def _rand(n: int, generator, device, dtype=torch.float64) -> torch.Tensor:
    if generator is not None and device is None:
        device = generator.device
    return torch.rand(n, generator=generator, device=device, dtype=dtype)


def uniform(n: int, generator: torch.Generator | None = None, *, device=None) -> torch.Tensor:
    """``t ~ U[0, 1]``, float64 ``[n]``."""
    return _rand(n, generator, device)


def logit_normal(
    n: int, m: float = 0.0, s: float = 1.0, generator: torch.Generator | None = None, *, device=None
) -> torch.Tensor:
    """``t = sigmoid(m + s z)``, ``z ~ N(0, 1)`` (SD3, eq. 19). ``m > 0`` favours noisier t."""
    _check_logit_normal(m, s)
    if generator is not None and device is None:
        device = generator.device
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
    return torch.sigmoid(m + s * z)


def _mode_f(u: torch.Tensor, s: float) -> torch.Tensor:
    return 1 - u - s * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def mode(
    n: int, s: float = 1.29, generator: torch.Generator | None = None, *, device=None
) -> torch.Tensor:
    """SD3 mode sampling (eq. 20): ``t = 1 - u - s (cos^2(pi u / 2) - 1 + u)``, ``u ~ U[0, 1]``."""
    _check_mode(s)
    return _mode_f(_rand(n, generator, device), s)


def uniform_density(t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    return ((t >= 0) & (t <= 1)).to(t.dtype)


def logit_normal_density(t: torch.Tensor, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """``pi_ln(t; m, s)`` of SD3 eq. 19 (zero outside (0, 1))."""
    _check_logit_normal(m, s)
    t = torch.as_tensor(t, dtype=torch.float64)
    inside = (t > 0) & (t < 1)
    tc = t.clamp(1e-300, 1 - 1e-16)
    logit = torch.log(tc) - torch.log1p(-tc)
    pdf = torch.exp(-((logit - m) ** 2) / (2 * s * s)) / (
        s * math.sqrt(2 * math.pi) * tc * (1 - tc)
    )
    return torch.where(inside, pdf, torch.zeros_like(pdf))


def mode_inverse(t: torch.Tensor, s: float = 1.29) -> torch.Tensor:
    """``u = f^{-1}(t; s)`` by bisection (f is decreasing); ``P(T <= t) = 1 - u``."""
    _check_mode(s)
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, 1)
    lo, hi = torch.zeros_like(t), torch.ones_like(t)
    for _ in range(60):
        mid = (lo + hi) / 2
        later = _mode_f(mid, s) > t  # f decreasing: the root lies at larger u
        lo = torch.where(later, mid, lo)
        hi = torch.where(later, hi, mid)
    return (lo + hi) / 2


def mode_density(t: torch.Tensor, s: float = 1.29) -> torch.Tensor:
    """Density of :func:`mode`: ``1 / |f'(u)|`` at ``u = f^{-1}(t)``, with
    ``f'(u) = -1 - s + (pi s / 2) sin(pi u)``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    u = mode_inverse(t, s)
    pdf = 1.0 / (1 + s - math.pi * s / 2 * torch.sin(math.pi * u))
    return torch.where((t >= 0) & (t <= 1), pdf, torch.zeros_like(pdf))


def _check_logit_normal(m, s):
    if not (math.isfinite(m) and math.isfinite(s) and s > 0):
        raise ValueError(f"logit_normal needs a finite m and s > 0, got m={m}, s={s}")


def _check_mode(s):
    if not -1.0 <= s <= _MODE_S_MAX:
        raise ValueError(
            f"mode sampling needs -1 <= s <= 2/(pi-2) = {_MODE_S_MAX:.4f} (monotone t(u)), got {s}"
        )


_SAMPLERS = {
    "uniform": (uniform, uniform_density, {}),
    "logit_normal": (logit_normal, logit_normal_density, {"m": 0.0, "s": 1.0}),
    "mode": (mode, mode_density, {"s": 1.29}),
}


class TimeSampler:
    """A named time distribution with parameters: ``sampler(n, generator) -> t [n]`` (float64),
    ``sampler.density(t)``, ``sampler.config()``."""

    def __init__(self, name: str = "uniform", **params):
        if name not in _SAMPLERS:
            raise ValueError(f"unknown time sampling {name!r}; choose one of {available()}")
        defaults = _SAMPLERS[name][2]
        unknown = set(params) - set(defaults)
        if unknown:
            raise TypeError(
                f"time sampling {name!r} takes {sorted(defaults)}, got unknown {sorted(unknown)}"
            )
        self.name = name
        self.params = {k: float(params.get(k, v)) for k, v in defaults.items()}
        if name == "logit_normal":
            _check_logit_normal(**self.params)
        if name == "mode":
            _check_mode(**self.params)

    def __call__(
        self, n: int, generator: torch.Generator | None = None, *, device=None
    ) -> torch.Tensor:
        return _SAMPLERS[self.name][0](n, generator=generator, device=device, **self.params)

    def density(self, t) -> torch.Tensor:
        return _SAMPLERS[self.name][1](t, **self.params)

    def config(self) -> dict:
        return {"name": self.name, **self.params}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"TimeSampler({self.name!r}{', ' if args else ''}{args})"


def available() -> list[str]:
    return sorted(_SAMPLERS)


def get(spec) -> TimeSampler:
    """Build a :class:`TimeSampler` from a name, a ``{"name": ..., **params}`` dict or a sampler."""
    if isinstance(spec, TimeSampler):
        return spec
    if isinstance(spec, str):
        return TimeSampler(spec)
    if isinstance(spec, dict):
        spec = dict(spec)
        return TimeSampler(spec.pop("name", "uniform"), **spec)
    raise TypeError(
        f"time_sampling must be a name, a dict or a TimeSampler, got {type(spec).__name__}"
    )
