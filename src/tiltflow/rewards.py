"""Rewards ``r(x, cond) -> [B]`` used to tilt a model's distribution: ``p(x) exp(r(x) / beta)``.

A reward is an ``nn.Module`` (so it moves with ``.to(device)`` and a learned reward model fits
the same interface) whose call ``reward(x, cond=None)`` returns one value per example. The flag
``differentiable`` says whether ``torch.autograd`` gives a meaningful ``grad_x r``; methods that
need gradients (reward backpropagation, adjoint matching, guidance) check it, black-box
methods (policy gradients, SMC steering) do not.

The two closed-form rewards here, linear and quadratic, are the ones for which the tilt of a
Gaussian mixture is again a Gaussian mixture (:meth:`tiltflow.analytic.GaussianMixture.tilt`),
which makes them the exact test targets for alignment and steering methods (the
"KL-regularised reward maximisation has the tilted optimum" view of Korbak et al. 2022,
"RL with KL penalties is better viewed as Bayesian inference"; Rafailov et al. 2023, DPO,
eq. 4).
"""

from __future__ import annotations

import abc

import torch
from torch import nn

__all__ = ["Reward", "LinearReward", "QuadraticReward"]


def _flat(x: torch.Tensor, dim: int, name: str) -> torch.Tensor:
    """``x`` of shape ``[B, ...]`` as ``[B, dim]``, with a clear error on a mismatch."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{name} expects a float tensor x of shape [B, {dim}]")
    if x.dim() < 2 or x[0].numel() != dim:
        raise ValueError(
            f"{name} expects x of shape [B, {dim}] (or [B, ...] with {dim} features), "
            f"got {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], dim)


def _float64(value, name: str) -> torch.Tensor:
    t = torch.as_tensor(value).detach()
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real array, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    return t


class Reward(nn.Module, abc.ABC):
    """Base class: ``reward(x, cond=None) -> Tensor[B]``.

    Subclasses implement ``forward(x, cond=None)`` and set ``differentiable`` (class or
    instance attribute): True when ``grad_x r`` is available through autograd.
    """

    differentiable: bool = False

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """The reward of each example, ``[B]``."""


class LinearReward(Reward):
    """``r(x) = w . x + b`` with ``w`` of shape ``[D]``; data ``x`` of shape ``[B, D]``.

    Tilting a Gaussian ``N(mu, S)`` by ``exp(r / beta)`` shifts its mean to ``mu + S w / beta``
    (the exponential-family identity used for exact tilted targets).
    """

    differentiable = True

    def __init__(self, w, b: float = 0.0):
        super().__init__()
        w = _float64(w, "LinearReward w")
        if w.dim() != 1 or w.numel() == 0:
            raise ValueError(f"LinearReward w must be a vector of shape [D], got {tuple(w.shape)}")
        self.register_buffer("w", w)
        self.b = float(b)

    @property
    def dim(self) -> int:
        return self.w.numel()

    def forward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        x = _flat(x, self.dim, "LinearReward")
        return x @ self.w.to(x) + self.b


class QuadraticReward(Reward):
    """``r(x) = -1/2 x^T A x + b^T x + c`` with ``A`` of shape ``[D, D]``, ``b`` of shape ``[D]``.

    Only the symmetric part of ``A`` enters ``x^T A x``, so ``A`` is stored symmetrised as
    ``(A + A^T) / 2``. ``A`` need not be positive definite; the tilt ``p(x) exp(r / beta)`` of a
    Gaussian with covariance ``S`` is normalisable iff ``S^{-1} + A / beta`` is.
    """

    differentiable = True

    def __init__(self, A, b=None, c: float = 0.0):
        super().__init__()
        A = _float64(A, "QuadraticReward A")
        if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
            raise ValueError(f"QuadraticReward A must be square [D, D], got {tuple(A.shape)}")
        dim = A.shape[0]
        b = torch.zeros(dim, dtype=torch.float64) if b is None else _float64(b, "QuadraticReward b")
        if b.shape != (dim,):
            raise ValueError(
                f"QuadraticReward b must have shape [D]=[{dim}] to match A, got {tuple(b.shape)}"
            )
        self.register_buffer("A", 0.5 * (A + A.T))
        self.register_buffer("b", b)
        self.c = float(c)

    @property
    def dim(self) -> int:
        return self.b.numel()

    def forward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        x = _flat(x, self.dim, "QuadraticReward")
        A, b = self.A.to(x), self.b.to(x)
        return -0.5 * ((x @ A) * x).sum(-1) + x @ b + self.c
