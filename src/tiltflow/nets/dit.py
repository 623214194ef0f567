"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Patchify ``[B, C, H, W]`` into ``(H/p)(W/p)`` tokens with a linear map, add fixed 2-D sin-cos
position embeddings (the MAE construction of He et al. 2022: half the channels encode the
row, half the column), run ``depth`` Transformer blocks conditioned by adaLN-Zero (each block
regresses shift, scale and a zero-initialised gate for its attention and MLP branches from the
time + label embedding), then a final adaLN layer and a linear map back to patches, and
unpatchify. At initialisation every block is the identity and the output is zero (sec. 3.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import ConditionEmbedding

__all__ = ["DiT", "sincos_2d"]


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = pos.reshape(-1, 1).double() * omega[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings ``[grid_h * grid_w, dim]`` (row-major tokens):
    the first ``dim/2`` channels are 1-D sin-cos features of the row index, the rest of the
    column index (He et al. 2022; Peebles & Xie 2023). ``dim`` must be divisible by 4."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, N, d/heads]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, Fig. 3)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1[:, None, :] * self.attn(_modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None, :] * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    """``DiT(in_channels=1, image_size=8, patch_size=2, hidden=128, depth=4, heads=4,
    num_classes=0, mlp_ratio=4.0, time_embed_dim=128, num_times=1)``.

    ``forward(x [B, C, image_size, image_size], t [B], cond=None) -> same shape``.
    ``hidden`` must be divisible by ``heads`` and by 4; ``image_size`` by ``patch_size``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        patch_size: int = 2,
        hidden: int = 128,
        depth: int = 4,
        heads: int = 4,
        num_classes: int = 0,
        mlp_ratio: float = 4.0,
        time_embed_dim: int = 128,
        num_times: int = 1,
    ):
        super().__init__()
        if min(in_channels, image_size, patch_size, hidden, depth, heads) < 1:
            raise ValueError("DiT sizes (channels, image_size, patch, hidden, ...) must be >= 1")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be divisible by patch {patch_size}")
        if hidden % heads or hidden % 4:
            raise ValueError(f"hidden {hidden} must be divisible by heads ({heads}) and by 4")
        self.config = {
            "name": "dit", "in_channels": in_channels, "image_size": image_size,
            "patch_size": patch_size, "hidden": hidden, "depth": depth, "heads": heads,
            "num_classes": num_classes, "mlp_ratio": mlp_ratio, "time_embed_dim": time_embed_dim,
            "num_times": num_times,
        }
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.grid = image_size // patch_size
        self.patch = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        # fixed, rebuilt from the config: not part of the state dict
        self.register_buffer("pos", sincos_2d(hidden, self.grid, self.grid)[None], persistent=False)
        self.embed = ConditionEmbedding(hidden, num_classes, time_embed_dim, num_times)
        self.blocks = nn.ModuleList(_Block(hidden, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, patch_size * patch_size * in_channels)
        self._init_weights()

    def _init_weights(self):
        # Peebles & Xie 2023, sec. 3.2 / their reference code: Xavier-uniform linear layers,
        # patch embedding as a linear map, N(0, 0.02) embeddings, adaLN-Zero and zero output.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch.bias)
        for emb in [self.embed.time, *self.embed.extra_times]:
            for lin in (emb.mlp[0], emb.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)
        for emb in self.embed.extra_times:  # extra times start at zero (ConditionEmbedding)
            nn.init.zeros_(emb.mlp[2].weight)
        if self.embed.label is not None:
            nn.init.normal_(self.embed.label.table.weight, std=0.02)
        for lin in [b.ada[1] for b in self.blocks] + [self.ada_out[1], self.out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        s, c = self.image_size, self.in_channels
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(
                f"DiT expects x of shape [B, {c}, {s}, {s}], got {tuple(x.shape)}; build it "
                "with in_channels and image_size matching the data"
            )
        b, p, g = x.shape[0], self.patch_size, self.grid
        emb = self.embed(t, cond, b)
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # [B, N, hidden]
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.ada_out(emb).chunk(2, dim=1)
        h = self.out(_modulate(self.norm_out(h), shift, scale))  # [B, N, p*p*C]
        # unpatchify: token (i, j) holds a p x p x C patch in (p, p, C) order
        h = h.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, c, g * p, g * p)
