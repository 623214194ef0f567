"""Time and class-label embeddings shared by every network in :mod:`tiltflow.nets`.

Time. ``t`` is a float tensor ``[B]`` of *arbitrary* real values: usually ``t in [0, 1]``,
but EDM preconditioning (Karras et al. 2022, Table 1) feeds ``c_noise = log(sigma) / 4``,
roughly in ``[-2, 1.5]``. :func:`sinusoidal_embedding` multiplies ``t`` by ``time_scale=1000``
(so ``t in [0, 1]`` looks like the DDPM step index, Ho et al. 2020) and then applies the
Transformer sinusoids (Vaswani et al. 2017) with periods from ``2 pi`` to ``2 pi * 10^4``. The
frequencies therefore span ``1e-1 .. 1e3`` radians per unit of ``t``: the fastest features tell
apart times ``1e-3`` apart, the slowest vary smoothly and monotonically over several units, so
both the unit interval and the EDM ``c_noise`` range get distinct, well-conditioned codes.
An MLP then maps the features to the network's embedding width (Ho et al. 2020; Peebles & Xie
2023, "TimestepEmbedder").

Labels. ``cond`` is ``None`` or a ``LongTensor[B]`` with values in ``[-1, num_classes)``;
``-1`` is the null token used by classifier-free guidance (Ho & Salimans 2022) and
``cond=None`` means all-null. :class:`LabelEmbedding` keeps a learned vector for each class
plus one for "no label" (index ``num_classes``). Networks never drop labels themselves: the
training objective replaces labels by ``-1`` when it wants CFG dropout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "sinusoidal_embedding",
    "check_cond",
    "TimeEmbedding",
    "LabelEmbedding",
    "ConditionEmbedding",
]


def sinusoidal_embedding(
    t: torch.Tensor, dim: int, *, time_scale: float = 1000.0, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal features ``[B, dim]`` of ``time_scale * t`` (Vaswani et al. 2017, sec. 3.5).

    ``[cos(w_k s), sin(w_k s)]`` with ``s = time_scale * t`` and
    ``w_k = max_period ** (-k / (dim // 2))``, ``k = 0 .. dim//2 - 1``; an odd ``dim`` gets
    one zero column. Computed in float32 whatever the dtype of ``t``.
    """
    if t.dim() != 1:
        raise ValueError(f"t must have shape [B], got {tuple(t.shape)}")
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / max(half, 1))
    args = (t.float() * time_scale)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def check_cond(cond, num_classes: int, batch: int, device=None) -> torch.Tensor:
    """Validate ``cond`` and return a ``LongTensor[B]`` of labels with ``-1`` for "no label".

    Raises ``TypeError`` for a non-integer tensor and ``ValueError`` for a wrong shape, for a
    label outside ``[-1, num_classes)``, or for a real label given to an unconditional network.
    """
    if cond is None:
        return torch.full((batch,), -1, dtype=torch.long, device=device)
    if not torch.is_tensor(cond):
        raise TypeError(
            f"cond must be None or a LongTensor[B] of class labels, got {type(cond).__name__}"
        )
    if cond.is_floating_point() or cond.is_complex() or cond.dtype == torch.bool:
        raise TypeError(f"cond must be an integer (long) tensor of class labels, got {cond.dtype}")
    if cond.shape != (batch,):
        raise ValueError(f"cond must have shape [B]=[{batch}], got {tuple(cond.shape)}")
    cond = cond.long()
    if num_classes == 0:
        if bool((cond != -1).any()):
            raise ValueError(
                "this network is unconditional (num_classes=0) but got class labels; "
                "pass cond=None (or all -1), or build the network with num_classes > 0"
            )
        return cond
    bad = (cond < -1) | (cond >= num_classes)
    if bool(bad.any()):
        value = int(cond[bad][0])
        raise ValueError(
            f"class label {value} is out of range; labels must be in [0, {num_classes}) "
            "or -1 for 'no label'"
        )
    return cond


class TimeEmbedding(nn.Module):
    """``t [B] -> [B, dim]``: sinusoidal features of ``1000 t`` followed by a 2-layer SiLU MLP
    (Ho et al. 2020; Peebles & Xie 2023)."""

    def __init__(self, dim: int, freq_dim: int = 128, time_scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.time_scale = int(freq_dim), float(time_scale)
        self.mlp = nn.Sequential(nn.Linear(self.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = sinusoidal_embedding(t, self.freq_dim, time_scale=self.time_scale)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LabelEmbedding(nn.Module):
    """Learned class vectors plus a learned null vector for label ``-1`` (Ho & Salimans 2022;
    Peebles & Xie 2023, "LabelEmbedder")."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 for a label embedding, got {num_classes}")
        self.num_classes = int(num_classes)
        self.table = nn.Embedding(self.num_classes + 1, dim)  # last row: null token

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        idx = torch.where(cond < 0, torch.full_like(cond, self.num_classes), cond)
        return self.table(idx)


class ConditionEmbedding(nn.Module):
    """``(t, cond) -> [B, dim]``: time embedding plus (when ``num_classes > 0``) label embedding.

    ``num_times > 1`` embeds several times, ``t`` of shape ``[B, num_times]`` (a flow map's
    start time and step size, as in shortcut models and MeanFlow: Frans et al. 2024, Geng et
    al. 2025): one :class:`TimeEmbedding` per column, summed. The extra embeddings start at
    zero (zero last layer), so a network initialized from a one-time teacher's weights starts
    out as that teacher at every step size. Validates ``cond`` with :func:`check_cond`;
    ``None`` and all ``-1`` give identical outputs.
    """

    def __init__(self, dim: int, num_classes: int = 0, freq_dim: int = 128, num_times: int = 1):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        if not isinstance(num_times, int) or num_times < 1:
            raise ValueError(f"num_times must be an integer >= 1, got {num_times!r}")
        self.num_classes, self.num_times = int(num_classes), num_times
        self.time = TimeEmbedding(dim, freq_dim)
        self.extra_times = nn.ModuleList(TimeEmbedding(dim, freq_dim) for _ in range(num_times - 1))
        for emb in self.extra_times:
            nn.init.zeros_(emb.mlp[2].weight)
            nn.init.zeros_(emb.mlp[2].bias)
        self.label = LabelEmbedding(num_classes, dim) if num_classes > 0 else None

    def forward(self, t: torch.Tensor, cond, batch: int) -> torch.Tensor:
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise TypeError("t must be a float tensor of shape [B]")
        want = (batch,) if self.num_times == 1 else (batch, self.num_times)
        if t.shape != want:
            raise ValueError(f"t must have shape {list(want)}, got {tuple(t.shape)}")
        labels = check_cond(cond, self.num_classes, batch, device=t.device)
        if self.num_times == 1:
            emb = self.time(t)
        else:
            emb = self.time(t[:, 0])
            for k, extra in enumerate(self.extra_times, start=1):
                emb = emb + extra(t[:, k])
        if self.label is not None:
            emb = emb + self.label(labels)
        return emb
