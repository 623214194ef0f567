"""Guidance: combine denoiser evaluations into a steered prediction.

A guidance object is called as ``guidance(denoiser, x_t, t, cond) -> Prediction``, with ``t`` as
a denoiser takes it (a solver's :class:`~tiltflow.schedules.GridPoint`, or a ``[B]`` tensor).
Combinations
act on the hub pair ``(x_hat, eps_hat)``; since each prediction satisfies
``x_t = alpha x_hat + sigma eps_hat`` and the weights sum to one, so does the combination.
"""

from __future__ import annotations

import torch

from ..denoiser import as_time, batch_time
from ..predictions import Prediction
from ..schedules import Coeffs, GridPoint

__all__ = ["ClassifierFree", "ClassifierGuidance", "TwoModel", "as_guidance"]


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

    def _active(self, t) -> bool:
        if self.interval is None:
            return True
        lo, hi = self.interval
        # a solver's grid point is on the host; a [B] tensor is read (a device sync on GPU)
        return lo <= float(t if not torch.is_tensor(t) else t.reshape(-1)[0]) <= hi

    def __call__(self, denoiser, x_t, t, cond) -> Prediction:
        if cond is None:
            raise ValueError("classifier-free guidance needs `cond` (labels); got cond=None")
        if self.scale == 0.0 or not self._active(t):
            return denoiser(x_t, t, cond)
        null = torch.full_like(cond, -1)
        if not isinstance(t, GridPoint):
            t = as_time(t, x_t)
            t = torch.cat([t, t])
        both = denoiser(torch.cat([x_t, x_t]), t, torch.cat([cond, null]))
        (xc, xu), (ec, eu) = both.data.chunk(2), both.noise.chunk(2)
        w = self.scale
        c = Coeffs(*(v if v.dim() == 0 else v[: len(x_t)] for v in both.coeffs.as_tuple()))
        return Prediction.from_hub(xc + w * (xc - xu), ec + w * (ec - eu), x_t, c)


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2; Song et al. 2021, eq. 14):
    ``score~ = score + w grad_{x_t} log p(cond | x_t)``, i.e. ``eps~ = eps - w sigma grad``.

    ``classifier(x_t, t)`` returns logits ``[B, C]`` of a classifier trained on noisy inputs
    (``cond`` picks the class), or pass ``log_prob(x_t, t, cond) -> [B]`` for any
    differentiable log-likelihood (e.g. the exact ``p(y | x_t)`` of tiltflow.analytic). The
    gradient is taken with autograd, so each step costs one backward pass through it.
    """

    def __init__(self, scale: float, classifier=None, log_prob=None):
        if (classifier is None) == (log_prob is None):
            raise ValueError("ClassifierGuidance needs exactly one of classifier= or log_prob=")
        self.scale = float(scale)
        self.classifier, self.log_prob = classifier, log_prob

    def _log_prob(self, x_t, t, cond):
        if self.log_prob is not None:
            return self.log_prob(x_t, t, cond)
        if cond is None:
            raise ValueError("classifier guidance needs `cond` (the class labels to steer to)")
        logits = self.classifier(x_t, t)
        return torch.log_softmax(logits, -1).gather(1, cond.long()[:, None]).squeeze(1)

    def __call__(self, denoiser, x_t, t, cond) -> Prediction:
        pred = denoiser(x_t, t, cond if self.classifier is None else None)
        if self.scale == 0.0:
            return pred
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            t_batch = batch_time(t, x_t).to(x_t.dtype)
            (grad,) = torch.autograd.grad(self._log_prob(x, t_batch, cond).sum(), x)
        c = pred.coeffs
        x_hat, eps = pred.hub
        step = self.scale * c.sigma * grad
        # At alpha = 0 (pure noise) x_t carries no information: grad = 0 and the data
        # correction sigma/alpha * step is 0 * inf; its limit is not computable there, use 0.
        ratio = torch.where(c.alpha > 0, c.sigma / c.alpha, torch.zeros_like(c.alpha))
        return Prediction.from_hub(x_hat + ratio * step, eps - step, x_t, c)


class TwoModel:
    """Guidance by a second model: ``eps = (w + 1) eps_pos - w eps_neg`` (Ho & Salimans 2022 with
    a separate unconditional model; the negative-preference form of Diffusion-NPO, Wang et al.
    2025). ``negative`` is a Denoiser trained under any schedule; it is evaluated under the
    main denoiser's schedule (exact scale-and-time change if they differ)."""

    def __init__(self, negative, scale: float):
        self.negative, self.scale = negative, float(scale)

    def __call__(self, denoiser, x_t, t, cond) -> Prediction:
        neg = self.negative
        if neg.schedule is not denoiser.schedule and neg.schedule.config() != denoiser.schedule.config():
            neg = neg.with_schedule(denoiser.schedule)
        pos = denoiser(x_t, t, cond)
        if self.scale == 0.0:
            return pos
        (xp, ep), (xn, en) = pos.hub, neg(x_t, t, cond).hub
        w = self.scale
        return Prediction.from_hub(xp + w * (xp - xn), ep + w * (ep - en), x_t, pos.coeffs)


def as_guidance(guidance):
    """``None`` -> no guidance; a number ``w`` -> :class:`ClassifierFree(w)`; else as given."""
    if guidance is None:
        return None
    if isinstance(guidance, (int, float)):
        return ClassifierFree(float(guidance))
    if not callable(guidance):
        raise TypeError(f"guidance must be None, a number (CFG scale) or callable, got {guidance!r}")
    return guidance
