"""Noise schedules: ``x_t = alpha(t) * x + sigma(t) * noise`` with ``t in [0, 1]``.

t = 0 is clean data, t = 1 is (nearly) pure noise. A schedule is a small value object; calling
it returns the coefficients *and* their time derivatives, so every solver and objective reads
the same numbers. ``logsnr(t) = 2 log(alpha / sigma)`` is strictly decreasing in t and has an
inverse ``t_from_logsnr``; two schedules with the same log-SNR describe the same noisy state up
to a scale, which :func:`change_of_schedule` exposes (Karras et al. 2022, sec. 4; Shaul et al.
2023, "scale-time" transformation).

All methods accept a float tensor ``t`` of any shape and return tensors of the same shape and
dtype. Use float64 for solver grids.
"""

from __future__ import annotations

import abc
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Coeffs", "GridPoint", "Schedule", "RectifiedFlow", "Cosine", "VPLinear", "VPDiscrete",
           "VE", "EDM", "change_of_schedule", "examples", "get_schedule", "available"]


class Coeffs(NamedTuple):
    """``alpha(t)``, ``sigma(t)`` and their derivatives in t, each shaped like ``t``."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    d_alpha: torch.Tensor
    d_sigma: torch.Tensor

    def expand(self, x: torch.Tensor) -> Coeffs:
        """Reshape ``[B]`` coefficients to broadcast against ``x`` of shape ``[B, ...]`` (0-d
        coefficients broadcast as they are)."""
        if self.alpha.dim() == 0:
            return self
        shape = (-1,) + (1,) * (x.dim() - 1)
        return Coeffs(*(c.reshape(shape).to(x.dtype) for c in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(self)


class GridPoint(NamedTuple):
    """A time shared by the whole batch, as a solver passes it to a denoiser: ``t`` as a 0-d
    float64 CPU tensor (differentiable when the solver's grid is) and the schedule's
    coefficients there. A solver makes them for its whole grid in one schedule call
    (:meth:`Schedule.points`) before its loop, so a step evaluates no schedule and reads
    nothing back from the device."""

    t: torch.Tensor
    coeffs: Coeffs

    def __float__(self) -> float:
        return float(self.t.detach())


def _as_tensor(t) -> torch.Tensor:
    if not torch.is_tensor(t):
        t = torch.as_tensor(t, dtype=torch.float64)
    if not t.is_floating_point():
        raise TypeError(f"time t must be a float tensor, got dtype {t.dtype}")
    return t


class Schedule(abc.ABC):
    """Base class. Subclasses compute ``alpha``, ``sigma`` and their derivatives together in
    :meth:`coefficients`; ``logsnr`` and ``t_from_logsnr`` have generic implementations that
    subclasses override with closed forms where those are more accurate."""

    name = "schedule"

    def __call__(self, t) -> Coeffs:
        return self.coefficients(_as_tensor(t))

    @abc.abstractmethod
    def coefficients(self, t: torch.Tensor) -> Coeffs:
        """``Coeffs(alpha, sigma, d_alpha, d_sigma)`` at the float tensor ``t``."""

    def alpha(self, t) -> torch.Tensor:
        return self(t).alpha

    def sigma(self, t) -> torch.Tensor:
        return self(t).sigma

    def points(self, times: torch.Tensor) -> list[GridPoint]:
        """:class:`GridPoint` s at the float64 CPU ``times`` (1-D), from one schedule call."""
        c = self(times)
        return [GridPoint(t, Coeffs(*row))
                for t, *row in zip(times.unbind(), *(v.unbind() for v in c), strict=True)]

    # -- derived -----------------------------------------------------------------------------
    def logsnr(self, t) -> torch.Tensor:
        """``2 log(alpha / sigma)``; +inf at a clean endpoint, -inf at a pure-noise one."""
        c = self(t)
        return 2 * (torch.log(c.alpha) - torch.log(c.sigma))

    def t_from_logsnr(self, lam) -> torch.Tensor:
        """Inverse of :meth:`logsnr` by bisection (64 halvings: float64-exact)."""
        lam = _as_tensor(lam)
        lo = torch.zeros_like(lam)
        hi = torch.ones_like(lam)
        for _ in range(64):
            mid = (lo + hi) / 2
            above = self.logsnr(mid) > lam  # logsnr decreases in t: answer lies later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (lo + hi) / 2

    def prior_std(self, data_std: float = 1.0) -> float:
        """Standard deviation of ``x_1`` for data of the given std (the sampler's start scale)."""
        c = self(torch.ones((), dtype=torch.float64))
        return float(torch.sqrt(c.alpha**2 * data_std**2 + c.sigma**2))

    def config(self) -> dict:
        """JSON-able description, inverse of :func:`get_schedule`."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class RectifiedFlow(Schedule):
    """Linear interpolation ``x_t = (1 - t) x + t noise`` (Liu et al. 2022; Lipman et al. 2023)."""

    name = "rectified_flow"

    def coefficients(self, t):
        return Coeffs(1 - t, t, -torch.ones_like(t), torch.ones_like(t))

    def logsnr(self, t):
        t = _as_tensor(t)
        return 2 * (torch.log1p(-t) - torch.log(t))

    def t_from_logsnr(self, lam):
        return torch.sigmoid(-_as_tensor(lam) / 2)


class Cosine(Schedule):
    """Cosine schedule ``alpha = cos(pi t / 2)``, ``sigma = sigma_data sin(pi t / 2)``: variance
    preserving for ``sigma_data = 1`` (Nichol & Dhariwal 2021, without the offset); for data of
    standard deviation ``sigma_data`` it is TrigFlow (Lu & Song 2024, sec. 3: ``x_s = cos(s) x +
    sin(s) z``, ``z ~ N(0, sigma_data^2 I)``, ``s = pi t / 2``)."""

    name = "cosine"

    def __init__(self, sigma_data: float = 1.0):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def coefficients(self, t):
        cos, sin = torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)
        sd = self.sigma_data
        return Coeffs(cos, sd * sin, -math.pi / 2 * sin, math.pi / 2 * sd * cos)

    def logsnr(self, t):
        return -2 * torch.log(self.sigma_data * torch.tan(math.pi / 2 * _as_tensor(t)))

    def t_from_logsnr(self, lam):
        return 2 / math.pi * torch.atan(torch.exp(-_as_tensor(lam) / 2) / self.sigma_data)

    def config(self) -> dict:
        return {"name": self.name} if self.sigma_data == 1.0 else \
            {"name": self.name, "sigma_data": self.sigma_data}


class VPLinear(Schedule):
    """Continuous variance-preserving SDE with linear ``beta(t)`` (Song et al. 2021):
    ``log alpha(t) = -beta_min t / 2 - (beta_max - beta_min) t^2 / 4``, ``sigma^2 = 1 - alpha^2``.
    """

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _log_alpha(self, t):
        return -0.5 * self.beta_min * t - 0.25 * (self.beta_max - self.beta_min) * t**2

    def coefficients(self, t):
        la = self._log_alpha(t)
        alpha, sigma = torch.exp(la), torch.sqrt(-torch.expm1(2 * la))
        beta = self.beta_min + (self.beta_max - self.beta_min) * t
        # d sigma / dt = -alpha * d_alpha / sigma = beta alpha^2 / (2 sigma)
        return Coeffs(alpha, sigma, -0.5 * beta * alpha, 0.5 * beta * alpha**2 / sigma)

    def logsnr(self, t):
        la = self._log_alpha(_as_tensor(t))
        return 2 * la - torch.log(-torch.expm1(2 * la))

    def t_from_logsnr(self, lam):
        # -log alpha = softplus(-lam) / 2 solves a quadratic in t.
        m = 0.5 * F.softplus(-_as_tensor(lam))
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        return 2 * m / (b + torch.sqrt(b * b + 4 * a * m))  # stable root of a t^2 + b t = m

    def config(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


class VPDiscrete(Schedule):
    """Variance-preserving schedule from a discrete ``alphas_cumprod`` table of N steps, as in
    diffusers' DDPM schedulers. Step ``k`` (0-based) sits at ``t = (k + 1) / N``; ``t = 0`` is
    clean data; ``log alpha`` is linear in t between knots (Lu et al. 2022, DPM-Solver's
    discrete-time wrapper). A diffusers model's timestep is ``t * N - 1``.
    """

    name = "vp_discrete"

    def __init__(self, alphas_cumprod):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must have >= 2 entries, each strictly in (0, 1)")
        if not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = ac
        self.num_steps = ac.numel()
        self._knots_t = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
        self._knots_la = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(ac)])

    @classmethod
    def linear(cls, num_steps=1000, beta_start=0.0001, beta_end=0.02):
        """diffusers' ``beta_schedule="linear"`` (DDPM)."""
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, 0))

    @classmethod
    def scaled_linear(cls, num_steps=1000, beta_start=0.00085, beta_end=0.012):
        """diffusers' ``beta_schedule="scaled_linear"`` (Stable Diffusion)."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, 0))

    def _segment(self, t):
        knots = self._knots_t.to(t.device)
        t64 = t.detach().to(torch.float64).contiguous()
        return torch.clamp(torch.searchsorted(knots, t64) - 1, 0, self.num_steps - 1)

    def _log_alpha_and_slope(self, t):
        k = self._segment(t)
        kt, kla = self._knots_t.to(t.device), self._knots_la.to(t.device)
        t0, la0 = kt[k], kla[k]
        slope = ((kla[k + 1] - la0) / (kt[k + 1] - t0)).to(t.dtype)
        return la0.to(t.dtype) + slope * (t - t0.to(t.dtype)), slope

    def coefficients(self, t):
        la, slope = self._log_alpha_and_slope(t)
        alpha = torch.exp(la)
        # abs: expm1(0) is -0.0 at t = 0, and sqrt(-0.0) would give sigma = -0.0
        sigma = torch.sqrt((-torch.expm1(2 * la)).abs())
        return Coeffs(alpha, sigma, slope * alpha, -slope * torch.exp(2 * la) / sigma)

    def logsnr(self, t):
        la = self._log_alpha_and_slope(_as_tensor(t))[0]
        return 2 * la - torch.log(-torch.expm1(2 * la))

    def t_from_logsnr(self, lam):
        lam = _as_tensor(lam)
        la = (-0.5 * F.softplus(-lam.to(torch.float64))).to(lam.device)
        kla = -self._knots_la.to(lam.device)  # increasing
        k = torch.clamp(torch.searchsorted(kla, (-la).contiguous()) - 1, 0, self.num_steps - 1)
        kt = self._knots_t.to(lam.device)
        frac = (-la - kla[k]) / (kla[k + 1] - kla[k])
        return (kt[k] + frac * (kt[k + 1] - kt[k])).clamp(0, 1).to(lam.dtype)

    def config(self):
        return {"name": self.name, "alphas_cumprod": self.alphas_cumprod.tolist()}

    def __repr__(self) -> str:
        return f"VPDiscrete(num_steps={self.num_steps}, final_alpha_bar={float(self.alphas_cumprod[-1]):.3g})"


class VE(Schedule):
    """Variance-exploding, geometric noise levels ``sigma(t) = s_min (s_max / s_min)^t``
    (Song & Ermon 2019; Song et al. 2021). ``alpha = 1``; t = 0 has noise ``s_min``."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def coefficients(self, t):
        sigma = self.sigma_min * torch.exp(self._log_ratio * t)
        return Coeffs(torch.ones_like(t), sigma, torch.zeros_like(t), self._log_ratio * sigma)

    def logsnr(self, t):
        return -2 * torch.log(self(t).sigma)

    def t_from_logsnr(self, lam):
        return (-_as_tensor(lam) / 2 - math.log(self.sigma_min)) / self._log_ratio

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class EDM(Schedule):
    """EDM's probability-flow parameterization ``alpha = 1, sigma(t) = sigma_max * t``
    (Karras et al. 2022: sigma(t) = t, rescaled to t in [0, 1]). ``sigma_data`` is the data
    scale used by EDM preconditioning and loss weighting."""

    name = "edm"

    def __init__(self, sigma_max: float = 80.0, sigma_data: float = 0.5):
        if sigma_max <= 0 or sigma_data <= 0:
            raise ValueError("sigma_max and sigma_data must be positive")
        self.sigma_max, self.sigma_data = float(sigma_max), float(sigma_data)

    def coefficients(self, t):
        return Coeffs(torch.ones_like(t), self.sigma_max * t, torch.zeros_like(t),
                      torch.full_like(t, self.sigma_max))

    def logsnr(self, t):
        return -2 * torch.log(self.sigma_max * _as_tensor(t))

    def t_from_logsnr(self, lam):
        return torch.exp(-_as_tensor(lam) / 2) / self.sigma_max

    def config(self):
        return {"name": self.name, "sigma_max": self.sigma_max, "sigma_data": self.sigma_data}


def change_of_schedule(src: Schedule, dst: Schedule, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Map time ``t`` of schedule ``dst`` to ``(s, scale)`` of schedule ``src`` such that
    ``x_t(dst) = scale * x_s(src)`` for the same data and noise.

    Both states have the same log-SNR, so ``scale = alpha_dst(t) / alpha_src(s)
    = sigma_dst(t) / sigma_src(s)``; we use the root of the summed squares, which stays finite
    at either endpoint. ``s`` is clipped to [0, 1] where ``dst`` reaches noise levels ``src``
    never saw (e.g. the pure-noise end of rectified flow seen from a VP model).
    """
    t = _as_tensor(t)
    s = src.t_from_logsnr(dst.logsnr(t)).clamp(0.0, 1.0).to(t.dtype)
    a, b = dst(t), src(s)
    scale = torch.sqrt((a.alpha**2 + a.sigma**2) / (b.alpha**2 + b.sigma**2))
    return s, scale


_SCHEDULES = {cls.name: cls for cls in (RectifiedFlow, Cosine, VPLinear, VPDiscrete, VE, EDM)}


def examples() -> dict[str, Schedule]:
    """One default instance of every built-in schedule, by name (what tests and benchmarks
    sweep to check a method on every schedule)."""
    return {"rectified_flow": RectifiedFlow(), "cosine": Cosine(), "trigflow": Cosine(0.5),
            "vp_linear": VPLinear(),
            "vp_discrete_linear": VPDiscrete.linear(),
            "vp_discrete_scaled_linear": VPDiscrete.scaled_linear(), "ve": VE(), "edm": EDM()}


def available() -> list[str]:
    return sorted(_SCHEDULES) + ["trigflow", "vp_discrete_linear", "vp_discrete_scaled_linear"]


def get_schedule(spec) -> Schedule:
    """Build a schedule from a name or a ``{"name": ..., **kwargs}`` dict (see ``config()``)."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", None)
    if name == "trigflow":  # the cosine schedule for data of std sigma_data (default 0.5)
        return Cosine(**{"sigma_data": 0.5, **spec})
    if name == "vp_discrete_linear":
        return VPDiscrete.linear(**spec)
    if name == "vp_discrete_scaled_linear":
        return VPDiscrete.scaled_linear(**spec)
    if name == "vp_discrete" and "alphas_cumprod" not in spec:
        raise ValueError("vp_discrete needs alphas_cumprod=[...]; or use vp_discrete_linear / "
                         "vp_discrete_scaled_linear")
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {available()}")
    return _SCHEDULES[name](**spec)
