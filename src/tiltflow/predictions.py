"""Prediction kinds and their conversions, all through one hub ``(x_hat, eps_hat)``.

With ``x_t = alpha x + sigma noise`` a network may predict

- ``"noise"``:    eps,
- ``"data"``:     x,
- ``"velocity"``: dx_t/dt = alpha' x + sigma' eps (flow matching),
- ``"v"``:        alpha eps - sigma x (Salimans & Ho 2022),
- ``"score"``:    grad log p_t(x_t) = -eps / sigma.

Each is a linear function of ``(x, eps)`` given ``x_t``, so :func:`to_hub` and
:func:`from_hub` are the only two conversions; any pair goes through them.
"""

from __future__ import annotations

import torch

from .schedules import Coeffs

KINDS = ("noise", "data", "velocity", "v", "score")

__all__ = ["KINDS", "check_kind", "to_data", "to_noise", "to_hub", "from_hub", "convert", "Prediction"]


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; choose one of {list(KINDS)}")
    return kind


def to_data(kind: str, out: torch.Tensor, x_t: torch.Tensor, c: Coeffs) -> torch.Tensor:
    """``x_hat`` from a ``kind`` prediction (``c`` broadcasts with ``x_t``, see
    :meth:`Coeffs.expand`)."""
    a, s, da, ds = c
    if kind == "data":
        return out
    if kind == "noise":
        return (x_t - s * out) / a
    if kind == "velocity":  # solve [a s; da ds] [x; eps] = [x_t; v]
        return (ds * x_t - s * out) / (a * ds - s * da)
    if kind == "v":
        return (a * x_t - s * out) / (a * a + s * s)
    if kind == "score":  # eps = -s score
        return (x_t + s * s * out) / a
    check_kind(kind)


def to_noise(kind: str, out: torch.Tensor, x_t: torch.Tensor, c: Coeffs) -> torch.Tensor:
    """``eps_hat`` from a ``kind`` prediction."""
    a, s, da, ds = c
    if kind == "noise":
        return out
    if kind == "data":
        return (x_t - a * out) / s
    if kind == "velocity":
        return (a * out - da * x_t) / (a * ds - s * da)
    if kind == "v":
        return (s * x_t + a * out) / (a * a + s * s)
    if kind == "score":
        return -s * out
    check_kind(kind)


def to_hub(kind: str, out: torch.Tensor, x_t: torch.Tensor, c: Coeffs):
    """Return ``(x_hat, eps_hat)`` from a ``kind`` prediction."""
    return to_data(kind, out, x_t, c), to_noise(kind, out, x_t, c)


def from_hub(kind: str, x_hat: torch.Tensor, eps_hat: torch.Tensor, c: Coeffs) -> torch.Tensor:
    """Return the ``kind`` prediction implied by ``(x_hat, eps_hat)``."""
    a, s, da, ds = c
    if kind == "noise":
        return eps_hat
    if kind == "data":
        return x_hat
    if kind == "velocity":
        return da * x_hat + ds * eps_hat
    if kind == "v":
        return a * eps_hat - s * x_hat
    if kind == "score":
        return -eps_hat / s
    check_kind(kind)


def convert(out: torch.Tensor, src: str, dst: str, x_t: torch.Tensor, c: Coeffs) -> torch.Tensor:
    """Convert a ``src`` prediction into a ``dst`` one."""
    check_kind(src), check_kind(dst)
    if src == dst:
        return out
    return from_hub(dst, *to_hub(src, out, x_t, c), c)


class Prediction:
    """A denoiser's output at ``(x_t, t)``, readable as any kind.

    ``pred.data``, ``pred.noise``, ``pred.velocity``, ``pred.v``, ``pred.score``; each half of
    the hub pair is computed on first use (a solver reading only ``data`` or only ``noise``
    pays for that half). ``coeffs`` broadcast against ``x_t``.
    """

    __slots__ = ("x_t", "coeffs", "kind", "raw", "_x_hat", "_eps_hat")

    def __init__(self, raw: torch.Tensor, kind: str, x_t: torch.Tensor, coeffs: Coeffs):
        self.raw, self.kind, self.x_t, self.coeffs = raw, check_kind(kind), x_t, coeffs
        self._x_hat = self._eps_hat = None

    @property
    def x_hat(self) -> torch.Tensor:
        if self._x_hat is None:
            self._x_hat = to_data(self.kind, self.raw, self.x_t, self.coeffs)
        return self._x_hat

    @property
    def eps_hat(self) -> torch.Tensor:
        if self._eps_hat is None:
            self._eps_hat = to_noise(self.kind, self.raw, self.x_t, self.coeffs)
        return self._eps_hat

    @property
    def hub(self):
        return self.x_hat, self.eps_hat

    def as_kind(self, kind: str) -> torch.Tensor:
        if kind == self.kind:
            return self.raw
        if kind == "data":
            return self.x_hat
        if kind in ("noise", "score"):
            return from_hub(kind, None, self.eps_hat, self.coeffs)
        return from_hub(check_kind(kind), self.x_hat, self.eps_hat, self.coeffs)

    data = property(lambda self: self.as_kind("data"), doc="E[x | x_t]")
    noise = property(lambda self: self.as_kind("noise"), doc="E[noise | x_t]")
    velocity = property(lambda self: self.as_kind("velocity"), doc="dx_t/dt of the PF-ODE")
    v = property(lambda self: self.as_kind("v"), doc="alpha eps - sigma x")
    score = property(lambda self: self.as_kind("score"), doc="grad log p_t(x_t)")

    @classmethod
    def from_hub(cls, x_hat, eps_hat, x_t, coeffs) -> Prediction:
        """Build from an ``(x_hat, eps_hat)`` pair, e.g. after combining two predictions."""
        p = cls(x_hat, "data", x_t, coeffs)
        p._eps_hat = eps_hat
        return p

    def __repr__(self) -> str:
        return f"Prediction(kind={self.kind!r}, shape={tuple(self.raw.shape)})"
