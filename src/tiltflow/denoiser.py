"""``Denoiser``: a network (or any callable) + a schedule + the kind of thing it predicts.

Every solver, objective and adaptation method talks to a ``Denoiser`` and reads whichever
prediction kind it needs from the returned :class:`~tiltflow.predictions.Prediction`.

Conditioning convention: ``cond`` is ``None`` or a tensor with leading dim ``B``. For class
labels it is a ``LongTensor[B]`` where ``-1`` means "no label" (the null token that classifier-
free guidance uses); ``cond=None`` means all-null.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .predictions import Prediction, check_kind, scale
from .schedules import Coeffs, Schedule, change_of_schedule, get_schedule

__all__ = ["Denoiser", "as_time"]


def as_time(t, x_t: torch.Tensor) -> torch.Tensor:
    """Validate/broadcast ``t`` to a float tensor of shape ``[B]`` for ``x_t`` of shape [B, ...]."""
    batch = x_t.shape[0]
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), dtype=torch.float64, device=x_t.device)
    if not t.is_floating_point():
        raise TypeError(f"t must be a float tensor, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape [B]=[{batch}] (or be a scalar), got {tuple(t.shape)}")
    return t


def _accepts_cond(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return "cond" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()) or (
        len([p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
        >= 3
    )


class Denoiser(nn.Module):
    """Wraps ``net(x_in, t_in, cond)`` that predicts ``prediction`` under ``schedule``.

    With ``precondition=True`` the network is wrapped in EDM preconditioning (Karras et al. 2022,
    Table 1), generalised to any schedule through the scaled state ``x_t / alpha`` with noise
    level ``s = sigma / alpha``: input ``c_in = 1/sqrt(s^2 + sd^2)``, time input
    ``c_noise = log(s) / 4``, output ``x_hat = c_skip x_t/alpha + c_out F`` with
    ``c_skip = sd^2/(s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``; the prediction kind is
    then ``"data"``.
    """

    def __init__(
        self,
        net: Callable,
        schedule: Schedule | str | dict,
        prediction: str = "noise",
        *,
        precondition: bool = False,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be callable net(x_t, t, cond), got {type(net).__name__}")
        self.net = net  # registered as a submodule when it is an nn.Module
        self.schedule = get_schedule(schedule)
        self.prediction = check_kind(prediction)
        if precondition and self.prediction != "data":
            raise ValueError('precondition=True makes the denoiser predict "data"; pass that')
        self.precondition = bool(precondition)
        self.sigma_data = float(sigma_data)
        self._takes_cond = _accepts_cond(net.forward if isinstance(net, nn.Module) else net)

    @classmethod
    def from_fn(cls, fn: Callable, schedule, prediction: str = "noise", **kwargs) -> Denoiser:
        """Wrap any callable ``fn(x_t, t, cond=None)`` (a user network, a diffusers model
        adapter, an analytic oracle) so every solver and method can use it."""
        return cls(fn, schedule, prediction, **kwargs)

    def coeffs(self, t: torch.Tensor, x_t: torch.Tensor) -> Coeffs:
        return self.schedule(t).expand(x_t)

    def _call_net(self, x, t, cond):
        if self._takes_cond:
            return self.net(x, t, cond)
        if cond is not None:
            raise ValueError("this denoiser's function takes no `cond`, but cond was given")
        return self.net(x, t)

    def forward(self, x_t: torch.Tensor, t, cond=None, coeffs: Coeffs | None = None) -> Prediction:
        """Evaluate at ``(x_t, t)``. ``coeffs``: the schedule's coefficients at ``t`` if the
        caller already has them (solvers pass precomputed scalars); computed otherwise."""
        if self.precondition:
            if coeffs is not None and coeffs.is_scalar:  # a solver's fast path: no schedule call
                return self._preconditioned_scalar(x_t, cond, coeffs)
            t = as_time(t, x_t)
            return self._preconditioned(x_t, cond, self.coeffs(t, x_t))
        if coeffs is None:
            t = as_time(t, x_t)
            coeffs = self.coeffs(t, x_t)
        # (on a solver's fast path t is already a [B] tensor in x_t's dtype)
        out = self._call_net(x_t, t if t.dtype == x_t.dtype else t.to(x_t.dtype), cond)
        if out.shape != x_t.shape:
            raise ValueError(f"network output shape {tuple(out.shape)} != input {tuple(x_t.shape)}")
        return Prediction(out, self.prediction, x_t, coeffs)

    def _preconditioned(self, x_t, cond, c: Coeffs) -> Prediction:
        """EDM preconditioning (class docstring) with coefficients broadcast to ``x_t``."""
        sd2 = self.sigma_data**2
        s = c.sigma / c.alpha
        x_scaled = x_t / c.alpha
        c_in = torch.rsqrt(s**2 + sd2)
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data * c_in
        c_noise = (torch.log(s) / 4).reshape(-1)
        out = self._call_net(c_in * x_scaled, c_noise, cond)
        return Prediction(c_skip * x_scaled + c_out * out, "data", x_t, c)

    def _preconditioned_scalar(self, x_t, cond, c: Coeffs) -> Prediction:
        """The same with a solver's scalar coefficients: float64 weights (cached per time)
        instead of a schedule evaluation and tensor arithmetic per call."""
        c_in, c_skip, c_out, c_noise = _precondition_weights(float(c.alpha), float(c.sigma),
                                                             self.sigma_data)
        t_in = torch.full((x_t.shape[0],), c_noise, dtype=x_t.dtype, device=x_t.device)
        out = self._call_net(scale(x_t, c_in), t_in, cond)
        return Prediction(scale(x_t, c_skip).add_(out, alpha=c_out), "data", x_t, c)

    def with_schedule(self, schedule) -> ScheduleChange:
        """This denoiser seen under another schedule (same log-SNR, rescaled state)."""
        return ScheduleChange(self, get_schedule(schedule))


@functools.lru_cache(maxsize=4096)
def _precondition_weights(alpha: float, sigma: float, sigma_data: float):
    """EDM's ``(c_in, c_skip, c_out, c_noise)`` at one time, in float64, with the ``1/alpha`` of
    the scaled state folded into ``c_in`` and ``c_skip`` (so ``x_in = c_in x_t``,
    ``x_hat = c_skip x_t + c_out F``). At ``alpha = 0`` they are nan/inf, as the tensor form."""
    sd2 = sigma_data**2
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.float64(alpha)
        s = np.float64(sigma) / a
        c_in = 1 / np.sqrt(s**2 + sd2)
        return (float(c_in / a), float(sd2 / (s**2 + sd2) / a), float(s * sigma_data * c_in),
                float(np.log(s) / 4))


class ScheduleChange(Denoiser):
    """A denoiser trained under ``base.schedule`` evaluated under ``schedule``: at ``(x_t, t)``
    it calls ``base(x_t / scale, s)`` with ``(s, scale)`` from
    :func:`~tiltflow.schedules.change_of_schedule`. ``E[x | x_t]`` and ``E[noise | x_t]`` do not
    change, so the hub pair passes through unchanged."""

    def __init__(self, base: Denoiser, schedule: Schedule):
        nn.Module.__init__(self)
        self.base = base
        self.schedule = schedule
        self.prediction = base.prediction
        self.precondition = False

    @property
    def net(self):
        return self.base.net

    def forward(self, x_t, t, cond=None, coeffs: Coeffs | None = None) -> Prediction:
        t = as_time(t, x_t)
        s, scale = change_of_schedule(self.base.schedule, self.schedule, t)
        scale = scale.reshape((-1,) + (1,) * (x_t.dim() - 1)).to(x_t.dtype)
        inner = self.base(x_t / scale, s, cond)
        return Prediction.from_hub(*inner.hub, x_t, coeffs if coeffs is not None else self.coeffs(t, x_t))
