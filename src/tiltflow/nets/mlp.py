"""Residual MLP for ``[B, D]`` data (2-D toy sets, tabular data).

Each block is pre-norm ``x + W2 SiLU(W1 SiLU(FiLM(LN(x))))`` where FiLM (Perez et al. 2018)
scales and shifts the normalised features with ``(1 + gamma, beta)`` computed from the
time + label embedding, the same scale-shift conditioning the UNet of Dhariwal & Nichol 2021
uses. The output layer is zero-initialised so the untrained network predicts 0 and training
starts from a stable point (the "zero-init" of Dhariwal & Nichol 2021 and Peebles & Xie 2023).
"""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import ConditionEmbedding

__all__ = ["MLP"]


class _FiLMBlock(nn.Module):
    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * hidden))
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()
        nn.init.zeros_(self.film[1].weight)
        nn.init.zeros_(self.film[1].bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, dim=1)
        z = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.act(self.fc1(self.act(z))))


class MLP(nn.Module):
    """``MLP(dim, hidden=256, depth=4, num_classes=0, time_embed_dim=128, num_times=1)``.

    ``forward(x [B, dim], t [B] (or [B, num_times]), cond=None) -> [B, dim]``. ``depth``
    residual FiLM blocks of
    width ``hidden``; ``time_embed_dim`` sinusoidal features of ``1000 t``
    (see :mod:`tiltflow.nets.embeddings`). ``num_classes=0`` is unconditional.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        num_classes: int = 0,
        time_embed_dim: int = 128,
        num_times: int = 1,
    ):
        super().__init__()
        for key, value, low in (("dim", dim, 1), ("hidden", hidden, 1), ("depth", depth, 1),
                                ("time_embed_dim", time_embed_dim, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"MLP {key} must be an integer >= {low}, got {value!r}")
        self.config = {"name": "mlp", "dim": dim, "hidden": hidden, "depth": depth,
                       "num_classes": num_classes, "time_embed_dim": time_embed_dim,
                       "num_times": num_times}
        self.dim = dim
        self.embed = ConditionEmbedding(hidden, num_classes, time_embed_dim, num_times)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_FiLMBlock(hidden, hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"MLP expects x of shape [B, {self.dim}], got {tuple(x.shape)}; "
                "build it with dim equal to the data's feature count"
            )
        emb = self.embed(t, cond, x.shape[0])
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(torch.nn.functional.silu(self.out_norm(h)))
