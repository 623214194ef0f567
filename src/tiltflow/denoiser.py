"""``Denoiser``: a network (or any callable) + a schedule + the kind of thing it predicts.

Every solver, objective and adaptation method talks to a ``Denoiser`` and reads whichever
prediction kind it needs from the returned :class:`~tiltflow.predictions.Prediction`.

Conditioning convention: ``cond`` is ``None`` or a tensor with leading dim ``B``. For class
labels it is a ``LongTensor[B]`` where ``-1`` means "no label" (the null token that classifier-
free guidance uses); ``cond=None`` means all-null.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from .predictions import Prediction, check_kind, from_hub
from .schedules import Coeffs, GridPoint, Schedule, change_of_schedule, get_schedule

__all__ = ["Denoiser", "ScheduleChange", "as_time", "batch_time"]


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

    def _call_net(self, x, t, cond):
        if self._takes_cond:
            return self.net(x, t, cond)
        if cond is not None:
            raise ValueError("this denoiser's function takes no `cond`, but cond was given")
        return self.net(x, t)

    def forward(self, x_t: torch.Tensor, t, cond=None) -> Prediction:
        """Evaluate at ``(x_t, t)``: ``t`` is a ``[B]`` tensor, a scalar, or a solver's
        :class:`~tiltflow.schedules.GridPoint` (coefficients already computed)."""
        if isinstance(t, GridPoint):
            c, t = t.coeffs, batch_time(t, x_t)
        else:
            t = as_time(t, x_t)
            c = self.schedule(t).expand(x_t)
        if self.precondition:
            return self._preconditioned(x_t, cond, c)
        out = self._call_net(x_t, t if t.dtype == x_t.dtype else t.to(x_t.dtype), cond)
        if out.shape != x_t.shape:
            raise ValueError(f"network output shape {tuple(out.shape)} != input {tuple(x_t.shape)}")
        return Prediction(out, self.prediction, x_t, c)

    def _preconditioned(self, x_t, cond, c: Coeffs) -> Prediction:
        """EDM preconditioning (class docstring)."""
        sd2 = self.sigma_data**2
        s = c.sigma / c.alpha
        x_scaled = x_t / c.alpha
        c_in = torch.rsqrt(s**2 + sd2)
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data * c_in
        c_noise = torch.log(s) / 4
        c_noise = batch_time(c_noise if c_noise.dim() == 0 else c_noise.reshape(-1), x_t)
        out = self._call_net(c_in * x_scaled, c_noise.to(x_t.dtype), cond)
        return Prediction(c_skip * x_scaled + c_out * out, "data", x_t, c)

    def with_schedule(self, schedule) -> Denoiser:
        """This denoiser seen under another schedule (same log-SNR, rescaled state)."""
        schedule = get_schedule(schedule)
        return Denoiser(ScheduleChange(self, schedule), schedule, self.prediction)


def batch_time(t, x_t: torch.Tensor) -> torch.Tensor:
    """``t`` as a ``[B]`` tensor for ``x_t``: a :class:`GridPoint`'s (or any 0-d CPU) time is
    filled on ``x_t``'s device (a host-side read, no device sync; differentiable)."""
    if isinstance(t, GridPoint):
        t = t.t
    if torch.is_tensor(t) and t.dim() == 0:
        return x_t.new_empty(x_t.shape[0]).fill_(t)
    return as_time(t, x_t)


class ScheduleChange(nn.Module):
    """The network of a denoiser trained under ``base.schedule``, evaluated under
    ``schedule``: at ``(x_t, t)`` it calls ``base(x_t / scale, s)`` with ``(s, scale)`` from
    :func:`~tiltflow.schedules.change_of_schedule`. ``E[x | x_t]`` and ``E[noise | x_t]`` do not
    change, so it returns the base's prediction kind formed from the same hub pair with
    ``schedule``'s coefficients. :meth:`Denoiser.with_schedule` wraps it."""

    def __init__(self, base: Denoiser, schedule: Schedule):
        super().__init__()
        self.base, self.schedule = base, schedule

    def forward(self, x_t, t, cond=None):
        s, scale = change_of_schedule(self.base.schedule, self.schedule, t)
        scale = scale.reshape((-1,) + (1,) * (x_t.dim() - 1)).to(x_t.dtype)
        inner = self.base(x_t / scale, s, cond)
        return from_hub(self.base.prediction, *inner.hub, self.schedule(t).expand(x_t))
