"""Couplings between a minibatch of data and a minibatch of noise, a step of their own.

A coupling is a callable ``coupling(x, noise, generator=None) -> (x, noise)`` that returns the
two batches paired row by row. Only the noise rows are reordered (or resampled), so ``x`` keeps
its row order and any conditioning (class labels) still belongs to its row.

- :func:`independent`: the product coupling; the pairs are returned as given.
- :func:`minibatch_ot`: exact optimal transport between the two empirical measures (uniform
  weights, squared Euclidean cost), solved by POT's network simplex ``ot.emd``. For two sets of
  equal size the optimal plan is a permutation (Birkhoff), so each data row gets exactly one
  noise row. Tong et al. 2023, "Improving and generalizing flow-based generative models with
  minibatch optimal transport" (OT-CFM); Pooladian et al. 2023, "Multisample flow matching:
  straightening flows with minibatch couplings".
- :func:`sinkhorn`: entropic OT (``ot.sinkhorn``, log-domain), the static Schroedinger-bridge
  coupling of Tong et al. 2023 (SB-CFM). For each data row ``i`` a noise row ``j`` is drawn from
  the plan's conditional ``P[i, :] / P[i, :].sum()`` with the generator; as ``reg -> 0`` this
  tends to the OT pairing, as ``reg -> inf`` to the independent one. The cost matrix is divided by
  its mean, so ``reg`` is relative to the typical squared distance and does not depend on the
  data scale or dimension.

:func:`get` builds a coupling from a name or ``{"name": ..., **params}``; every coupling built
that way has ``config()``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "independent",
    "minibatch_ot",
    "sinkhorn",
    "sinkhorn_plan",
    "ot_plan",
    "Coupling",
    "get",
    "available",
]


def _check(x: torch.Tensor, noise: torch.Tensor):
    if x.shape != noise.shape:
        raise ValueError(
            f"x and noise must have the same shape, got {tuple(x.shape)} and {tuple(noise.shape)}"
        )
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x and noise need a leading batch dimension B >= 1")


def _cost(x: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    """Squared Euclidean cost ``||x_i - noise_j||^2`` of the flattened rows, float64 numpy."""
    a = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    b = noise.detach().reshape(noise.shape[0], -1).to("cpu", torch.float64)
    return (torch.cdist(a, b) ** 2).numpy()


def independent(x: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None = None):
    """Independent coupling: pairs as given (both batches are already independent draws)."""
    _check(x, noise)
    return x, noise


def ot_plan(x: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    """Exact OT plan ``[B, B]`` (float64, sums to 1) with ``ot.emd``."""
    import ot

    _check(x, noise)
    n = x.shape[0]
    w = np.full(n, 1.0 / n)
    return ot.emd(w, w, _cost(x, noise))


def minibatch_ot(x: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None = None):
    """Exact minibatch OT pairing (Tong et al. 2023; Pooladian et al. 2023): returns
    ``(x, noise[perm])`` with ``perm`` minimising ``sum_i ||x_i - noise_perm(i)||^2``."""
    plan = ot_plan(x, noise)
    perm = torch.as_tensor(plan.argmax(axis=1), device=noise.device)
    return x, noise[perm]


def sinkhorn_plan(
    x: torch.Tensor, noise: torch.Tensor, reg: float = 0.05, num_iter: int = 10_000
) -> np.ndarray:
    """Entropic OT plan ``[B, B]`` for the cost divided by its mean, regularisation ``reg``."""
    import ot

    _check(x, noise)
    if not reg > 0:
        raise ValueError(f"sinkhorn needs reg > 0, got {reg}")
    n = x.shape[0]
    w = np.full(n, 1.0 / n)
    cost = _cost(x, noise)
    scale = cost.mean()
    cost = cost / scale if scale > 0 else cost
    return ot.sinkhorn(w, w, cost, reg, method="sinkhorn_log", numItermax=num_iter, stopThr=1e-9)


def sinkhorn(
    x: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    reg: float = 0.05,
    num_iter: int = 10_000,
):
    """Entropic-OT (Schroedinger-bridge) pairing (Tong et al. 2023): for each row ``i`` of ``x``
    draw ``j ~ P[i, :]`` from the Sinkhorn plan and return ``(x, noise[j])``. Noise rows may
    repeat; the data rows keep their order."""
    plan = torch.as_tensor(sinkhorn_plan(x, noise, reg, num_iter), dtype=torch.float64)
    rows = plan / plan.sum(dim=1, keepdim=True).clamp_min(1e-300)
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("sinkhorn plan is not finite; increase reg")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    idx = torch.multinomial(rows.to(gen_device), 1, generator=generator).squeeze(1)
    return x, noise[idx.to(noise.device)]


class Coupling:
    """A named coupling with parameters: ``coupling(x, noise, generator=None) -> (x, noise)``."""

    def __init__(self, name: str = "independent", **params):
        if name not in _COUPLINGS:
            raise ValueError(f"unknown coupling {name!r}; choose one of {available()}")
        allowed = _COUPLINGS[name][1]
        unknown = set(params) - set(allowed)
        if unknown:
            raise TypeError(
                f"coupling {name!r} takes {sorted(allowed)}, got unknown {sorted(unknown)}"
            )
        self.name = name
        self.params = {k: params.get(k, v) for k, v in allowed.items()}
        if name == "sinkhorn" and not self.params["reg"] > 0:
            raise ValueError(f"sinkhorn needs reg > 0, got {self.params['reg']}")

    def __call__(self, x, noise, generator=None):
        return _COUPLINGS[self.name][0](x, noise, generator, **self.params)

    def config(self) -> dict:
        return {"name": self.name, **self.params}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"Coupling({self.name!r}{', ' if args else ''}{args})"


_COUPLINGS = {
    "independent": (independent, {}),
    "minibatch_ot": (minibatch_ot, {}),
    "sinkhorn": (sinkhorn, {"reg": 0.05, "num_iter": 10_000}),
}


def available() -> list[str]:
    return sorted(_COUPLINGS)


def get(spec) -> Coupling:
    """Build a :class:`Coupling` from a name, a ``{"name": ..., **params}`` dict or a Coupling."""
    if isinstance(spec, Coupling):
        return spec
    if isinstance(spec, str):
        return Coupling(spec)
    if isinstance(spec, dict):
        spec = dict(spec)
        return Coupling(spec.pop("name", "independent"), **spec)
    raise TypeError(f"coupling must be a name, a dict or a Coupling, got {type(spec).__name__}")
