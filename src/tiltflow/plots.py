"""Pictures of samples: an image grid or a 2-D scatter as a PNG, and the training callback
that writes one every ``sample_every`` steps."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_write_bytes

__all__ = ["save_grid", "grid_callback"]


def save_grid(samples: torch.Tensor, path, *, nrow: int | None = None, title: str | None = None):
    """Save samples as a PNG with matplotlib: images ``[B, C, H, W]`` in ``[-1, 1]`` as a grid,
    2-D points ``[B, 2]`` as a scatter plot. Written atomically (a failed write leaves no
    partial file). Returns the path."""
    from matplotlib.figure import Figure

    path = Path(path)
    s = samples.detach().float().cpu()
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    if s.dim() == 2 and s.shape[1] == 2:
        ax.scatter(s[:, 0].numpy(), s[:, 1].numpy(), s=2, alpha=0.5)
        ax.set_aspect("equal")
    elif s.dim() == 4 and s.shape[1] in (1, 3):
        b, c, h, w = s.shape
        nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
        ncol = int(math.ceil(b / nrow))
        img = ((s.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        grid = np.ones((ncol * (h + 1) + 1, nrow * (w + 1) + 1, c), dtype=np.float32)
        for i in range(b):
            r, q = divmod(i, nrow)
            grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img[i]
        ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    else:
        raise ValueError(f"save_grid takes images [B, 1|3, H, W] or points [B, 2], "
                         f"got shape {tuple(s.shape)}")
    if title:
        ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def grid_callback(make_samples: Callable, *, name: str = "samples",
                  nrow: int | None = None) -> Callable:
    """A callback for :func:`tiltflow.train.train` that writes ``run_dir/samples/<name>_step_NNNNNN.png`` from
    ``make_samples(info)`` (e.g. ``lambda info: tiltflow.sample(info.ema, noise)``)."""
    def callback(info) -> None:
        with torch.no_grad():
            samples = make_samples(info)
        save_grid(samples, Path(info.run_dir) / "samples" / f"{name}_step_{info.step:06d}.png",
                  nrow=nrow, title=f"step {info.step}")

    return callback
