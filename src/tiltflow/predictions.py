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

import functools

import numpy as np
import torch

from .schedules import Coeffs

KINDS = ("noise", "data", "velocity", "v", "score")

__all__ = ["KINDS", "check_kind", "to_hub", "from_hub", "convert", "Prediction", "scale",
           "linear_maps"]


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; choose one of {list(KINDS)}")
    return kind


def to_hub(kind: str, out: torch.Tensor, x_t: torch.Tensor, c: Coeffs):
    """Return ``(x_hat, eps_hat)`` from a ``kind`` prediction. ``c`` must broadcast with
    ``x_t`` (see :meth:`Coeffs.expand`)."""
    a, s, da, ds = c.as_tuple()
    if kind == "noise":
        return (x_t - s * out) / a, out
    if kind == "data":
        return out, (x_t - a * out) / s
    if kind == "velocity":
        # solve [a s; da ds] [x; eps] = [x_t; v]
        det = a * ds - s * da
        return (ds * x_t - s * out) / det, (a * out - da * x_t) / det
    if kind == "v":
        norm = a * a + s * s
        return (a * x_t - s * out) / norm, (s * x_t + a * out) / norm
    if kind == "score":
        eps = -s * out
        return (x_t - s * eps) / a, eps
    check_kind(kind)


def from_hub(kind: str, x_hat: torch.Tensor, eps_hat: torch.Tensor, c: Coeffs) -> torch.Tensor:
    """Return the ``kind`` prediction implied by ``(x_hat, eps_hat)``."""
    a, s, da, ds = c.as_tuple()
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


def scale(x: torch.Tensor, a: float) -> torch.Tensor:
    """``a * x`` for a python float ``a``, as a fresh tensor.

    On CPU, written ``0 + a * x`` with a cached 0-d zero: exact (the same single rounding as
    ``x * a``) and about half the cost on the tiny tensors of a sampler's per-step overhead,
    because ``x * a`` first wraps ``a`` into a tensor. Other devices, and half-precision
    dtypes (``alpha`` would be rounded to the tensor's dtype), use ``x * a``.
    """
    zero = _CPU_ZEROS.get(x.dtype) if x.is_cpu else None
    return x * a if zero is None else torch.add(zero, x, alpha=a)


_CPU_ZEROS = {dt: torch.zeros((), dtype=dt) for dt in (torch.float32, torch.float64)}


def _linear_map(src: str, dst: str, c: Coeffs) -> tuple[float, float]:
    """``(p, q)`` with ``dst = p * raw + q * x_t`` for a ``src`` prediction ``raw``: the hub
    formulas evaluated on unit inputs, in numpy float64 (endpoint divisions give inf/nan).
    Cached on the coefficients: a solver asks for the same few maps at each grid time (see
    :func:`linear_maps` to fill them for a whole grid at once)."""
    found = c.maps.get((src, dst))
    if found is None:
        check_kind(dst)
        found = c.maps[(src, dst)] = _cached_linear_map(src, dst, *(float(v) for v in c.as_tuple()))
    return found


@functools.lru_cache(maxsize=8192)
def _cached_linear_map(src, dst, alpha, sigma, d_alpha, d_sigma):
    p, q = _map_arrays(src, dst, *(np.float64(v) for v in (alpha, sigma, d_alpha, d_sigma)))
    return float(p), float(q)


def _map_arrays(src, dst, alpha, sigma, d_alpha, d_sigma):
    """``(p, q)`` of :func:`_linear_map` for numpy float64 scalars or arrays of coefficients."""
    c = Coeffs(alpha, sigma, d_alpha, d_sigma)
    one, zero = np.float64(1.0), np.float64(0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xr, er = to_hub(src, one, zero, c)  # hub pair per unit raw
        xx, ex = to_hub(src, zero, one, c)  # hub pair per unit x_t
        a, b = from_hub(dst, one, zero, c), from_hub(dst, zero, one, c)
        return _times(a, xr) + _times(b, er), _times(a, xx) + _times(b, ex)


def _times(w, v):
    """``w * v`` with ``0 * v = 0`` also for infinite ``v``: a hub component that ``dst`` does not
    use (weight 0) may be undefined, e.g. ``x_hat`` of a score at alpha = 0, and must not turn the
    map into NaN (score -> noise there is ``-sigma * score``)."""
    return np.where(w == 0, 0.0, w * v)


def linear_maps(src: str, dsts, coeffs: list[Coeffs]) -> None:
    """Fill the ``src -> dst`` conversions, for each kind in ``dsts``, of every one of
    ``coeffs`` (scalar coefficients, e.g. a solver's grid from :meth:`Schedule.scalars`) in one
    vectorized float64 pass, so reading ``dst`` from a ``src`` prediction in the sampling loop
    is a cache hit."""
    check_kind(src)
    dsts = [check_kind(d) for d in dsts if d != src]
    if not dsts or not coeffs:
        return
    cols = np.array([c.as_tuple() for c in coeffs], dtype=np.float64).T
    for dst in dsts:
        p, q = _map_arrays(src, dst, *cols)
        for c, pq in zip(coeffs, zip(p.tolist(), q.tolist(), strict=True), strict=True):
            c.maps[(src, dst)] = pq


class Prediction:
    """A denoiser's output at ``(x_t, t)``, readable as any kind.

    ``pred.data``, ``pred.noise``, ``pred.velocity``, ``pred.v``, ``pred.score``; conversions
    are computed on first access from the hub pair. ``coeffs`` are broadcast to ``x_t``.
    """

    __slots__ = ("x_t", "coeffs", "kind", "raw", "_hub")

    def __init__(self, raw: torch.Tensor, kind: str, x_t: torch.Tensor, coeffs: Coeffs):
        self.raw, self.kind, self.x_t, self.coeffs = raw, check_kind(kind), x_t, coeffs
        self._hub = None

    @property
    def hub(self):
        if self._hub is None:
            self._hub = to_hub(self.kind, self.raw, self.x_t, self.coeffs)
        return self._hub

    def as_kind(self, kind: str) -> torch.Tensor:
        if kind == self.kind:
            return self.raw
        if self._hub is None and self.coeffs.is_scalar:
            # Every kind is linear in (raw, x_t): with scalar coefficients, two tensor ops.
            p, q = _linear_map(self.kind, kind, self.coeffs)
            out = scale(self.raw, p)
            return out.add_(self.x_t, alpha=q) if q else out
        return from_hub(check_kind(kind), *self.hub, self.coeffs)

    def combine(self, x_t: float = 0.0, plus: torch.Tensor | None = None, **weights: float
                ) -> torch.Tensor:
        """``plus + x_t * x_t + sum_k w_k * (kind k)`` as a fresh tensor, e.g.
        ``combine(data=a, noise=s)`` for a DDIM step; ``plus`` (a tensor, default none) lets a
        solver fold a partial sum in. Kinds with weight 0 are left out (not read).

        Every kind is linear in ``(raw, x_t)``, so with scalar coefficients the whole update
        costs two tensor operations however many kinds it mixes."""
        if self._hub is None and self.coeffs.is_scalar:
            p_all, q_all = 0.0, float(x_t)
            for kind, w in weights.items():
                if kind == self.kind:
                    p_all += w
                elif w:
                    p, q = _linear_map(self.kind, kind, self.coeffs)
                    p_all, q_all = p_all + w * p, q_all + w * q
                else:
                    check_kind(kind)
            out = scale(self.raw, p_all) if plus is None else torch.add(plus, self.raw,
                                                                         alpha=p_all)
            return out.add_(self.x_t, alpha=q_all) if q_all else out
        terms = [w * self.as_kind(k) for k, w in weights.items() if check_kind(k) and w]
        if x_t:
            terms.append(x_t * self.x_t)
        if plus is not None:
            terms.append(plus)
        return sum(terms[1:], terms[0]) if terms else torch.zeros_like(self.x_t)

    data = property(lambda self: self.as_kind("data"), doc="E[x | x_t]")
    noise = property(lambda self: self.as_kind("noise"), doc="E[noise | x_t]")
    velocity = property(lambda self: self.as_kind("velocity"), doc="dx_t/dt of the PF-ODE")
    v = property(lambda self: self.as_kind("v"), doc="alpha eps - sigma x")
    score = property(lambda self: self.as_kind("score"), doc="grad log p_t(x_t)")

    @classmethod
    def from_hub(cls, x_hat, eps_hat, x_t, coeffs) -> Prediction:
        """Build from an ``(x_hat, eps_hat)`` pair, e.g. after combining two predictions."""
        p = cls(x_hat, "data", x_t, coeffs)
        p._hub = (x_hat, eps_hat)
        return p

    def __repr__(self) -> str:
        return f"Prediction(kind={self.kind!r}, shape={tuple(self.raw.shape)})"
