"""Guidance: combine denoiser evaluations into a steered prediction.

A guidance object is called as ``guidance(denoiser, x_t, t, cond) -> Prediction``. Combinations
act on the hub pair ``(x_hat, eps_hat)``; since each prediction satisfies
``x_t = alpha x_hat + sigma eps_hat`` and the weights sum to one, so does the combination.
"""

from __future__ import annotations

import torch

from ..predictions import Prediction

__all__ = ["ClassifierFree", "as_guidance"]


class ClassifierFree:
    """Classifier-free guidance (Ho & Salimans 2022):
    ``eps = eps_c + w (eps_c - eps_u)``, so ``w = 0`` is the plain conditional model.

    The conditional and unconditional inputs go through the network as one batch of 2B (one
    call). ``interval=(t_lo, t_hi)`` applies guidance only for ``t_lo <= t <= t_hi``
    (Kynkäänniemi et al. 2024); elsewhere the conditional prediction is used, with one
    evaluation of batch B.
    """

    def __init__(self, scale: float, interval: tuple[float, float] | None = None):
        self.scale = float(scale)
        if interval is not None:
            lo, hi = interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {interval}")
        self.interval = interval

    def _active(self, t: torch.Tensor) -> bool:
        if self.interval is None:
            return True
        lo, hi = self.interval
        # t is a broadcast grid scalar; this reads a CPU float64 value, no device sync
        tt = float(t[0]) if t.device.type == "cpu" else None
        return tt is None or lo <= tt <= hi

    def __call__(self, denoiser, x_t, t, cond) -> Prediction:
        if cond is None:
            raise ValueError("classifier-free guidance needs `cond` (labels); got cond=None")
        if self.scale == 0.0 or not self._active(t):
            return denoiser(x_t, t, cond)
        null = torch.full_like(cond, -1)
        both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
        (xc, xu), (ec, eu) = both.data.chunk(2), both.noise.chunk(2)
        w = self.scale
        coeffs = denoiser.schedule(t).expand(x_t)
        return Prediction.from_hub(xc + w * (xc - xu), ec + w * (ec - eu), x_t, coeffs)


def as_guidance(guidance):
    """``None`` -> no guidance; a number ``w`` -> :class:`ClassifierFree(w)`; else as given."""
    if guidance is None:
        return None
    if isinstance(guidance, (int, float)):
        return ClassifierFree(float(guidance))
    if not callable(guidance):
        raise TypeError(f"guidance must be None, a number (CFG scale) or callable, got {guidance!r}")
    return guidance
