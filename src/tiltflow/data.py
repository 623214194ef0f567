"""Datasets: built-in 2-D sets, scikit-learn digits, and the user's own data."""

from __future__ import annotations

import numpy as np
import torch

DIGITS_NUM_TRAIN = 1437  # 80 % of the 1,797 images; the rest is the test split


def digits_arrays(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(x [N, 1, 8, 8] float32 in [-1, 1], labels [N] int64)``.

    The split is fixed: a permutation by ``numpy.random.RandomState(0)``, the first 1,437
    images for ``"train"``, the remaining 360 for ``"test"``; ``"all"`` returns every image in
    the original order.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2 - 1
    y = torch.tensor(d.target, dtype=torch.int64)
    if split == "all":
        return x, y
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    idx = perm[:DIGITS_NUM_TRAIN] if split == "train" else perm[DIGITS_NUM_TRAIN:]
    return x[idx], y[idx]
