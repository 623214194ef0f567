"""A small convolutional UNet for ``[B, C, H, W]`` images.

The architecture of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", appendix B):
a residual encoder/decoder with skip connections, GroupNorm (Wu & He 2018), SiLU and
self-attention at low resolution, with the refinements of Dhariwal & Nichol 2021 ("Diffusion
Models Beat GANs", sec. 3): time/label conditioning by scale-shift of the normalised features
("adaptive group normalisation") and zero-initialised last convolutions in every residual
branch and at the output, so the untrained network is an identity-plus-zero map.

Layout for ``channel_mults=(1, 2)``: level 0 at full resolution with ``base_channels``
channels, level 1 at half resolution with ``2 * base_channels``; ``H`` and ``W`` must be
divisible by ``2 ** (len(channel_mults) - 1)``. ``attention_resolutions`` holds *downsampling
factors* (the ADM convention): ``(2,)`` puts self-attention after every residual block at
``H/2 x W/2``; the middle block (lowest resolution) always has attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import ConditionEmbedding

__all__ = ["UNet"]


def _groups(channels: int) -> int:
    """Largest group count <= 32 dividing ``channels`` with at least 4 channels per group."""
    for g in range(min(32, max(channels // 4, 1)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, scale-shift by the embedding, GroupNorm-SiLU-dropout-conv(zero)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out))
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions (Vaswani et al. 2017)."""

    def __init__(self, channels: int, head_dim: int):
        super().__init__()
        heads = max(channels // head_dim, 1)
        self.heads = heads if channels % heads == 0 else 1
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [B, heads, HW, d]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class _Down(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class _Up(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """``UNet(in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
    attention_resolutions=(2,), num_classes=0, dropout=0.0, attention_head_dim=32,
    time_embed_dim=128, num_times=1)``.

    ``forward(x [B, C, H, W], t [B] (or [B, num_times]), cond=None) -> [B, C, H, W]``. See
    the module docstring for
    the layout and the meaning of ``attention_resolutions`` (downsampling factors).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mults=(1, 2),
        num_res_blocks: int = 1,
        attention_resolutions=(2,),
        num_classes: int = 0,
        dropout: float = 0.0,
        attention_head_dim: int = 32,
        time_embed_dim: int = 128,
        num_times: int = 1,
    ):
        super().__init__()
        channel_mults = [int(m) for m in channel_mults]
        attention_resolutions = [int(r) for r in attention_resolutions]
        if not channel_mults or min(channel_mults) < 1:
            raise ValueError(f"channel_mults must be positive integers, got {channel_mults}")
        if in_channels < 1 or base_channels < 1 or num_res_blocks < 1:
            raise ValueError("in_channels, base_channels and num_res_blocks must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = {
            "name": "unet", "in_channels": in_channels, "base_channels": base_channels,
            "channel_mults": channel_mults, "num_res_blocks": num_res_blocks,
            "attention_resolutions": attention_resolutions, "num_classes": num_classes,
            "dropout": dropout, "attention_head_dim": attention_head_dim,
            "time_embed_dim": time_embed_dim, "num_times": num_times,
        }
        self.in_channels = in_channels
        self.levels = len(channel_mults)
        emb_dim = 4 * base_channels
        self.embed = ConditionEmbedding(emb_dim, num_classes, time_embed_dim, num_times)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # encoder: every module's output is pushed as a skip connection
        self.down = nn.ModuleList()
        skips = [base_channels]
        ch, ds = base_channels, 1
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                layers = [_ResBlock(ch, base_channels * mult, emb_dim, dropout)]
                ch = base_channels * mult
                if ds in attention_resolutions:
                    layers.append(_Attention(ch, attention_head_dim))
                self.down.append(nn.ModuleList(layers))
                skips.append(ch)
            if level < self.levels - 1:
                self.down.append(nn.ModuleList([_Down(ch)]))
                skips.append(ch)
                ds *= 2

        self.mid = nn.ModuleList([
            _ResBlock(ch, ch, emb_dim, dropout),
            _Attention(ch, attention_head_dim),
            _ResBlock(ch, ch, emb_dim, dropout),
        ])

        # decoder: num_res_blocks + 1 blocks per level, each eats one skip connection
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for i in range(num_res_blocks + 1):
                layers = [_ResBlock(ch + skips.pop(), base_channels * mult, emb_dim, dropout)]
                ch = base_channels * mult
                if ds in attention_resolutions:
                    layers.append(_Attention(ch, attention_head_dim))
                if level > 0 and i == num_res_blocks:
                    layers.append(_Up(ch))
                    ds //= 2
                self.up.append(nn.ModuleList(layers))

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}; "
                "build it with in_channels equal to the image's channel count"
            )
        factor = 2 ** (self.levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"UNet with {self.levels} levels needs H and W divisible by {factor}, got "
                f"{x.shape[2]}x{x.shape[3]}; pad/crop the images or use fewer channel_mults"
            )
        emb = self.embed(t, cond, x.shape[0])
        h = self.conv_in(x)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
