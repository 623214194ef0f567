"""tiltflow: train diffusion and flow-matching models, then make them fast and steerable.

Core objects are imported eagerly; the method families (``analytic``, ``objectives``,
``solvers``, ``metrics``, ``data``, ``nets``, ``train`` ...) load on first attribute access so
``import tiltflow`` stays fast.
"""

from __future__ import annotations

import importlib

from . import predictions, schedules
from .denoiser import Denoiser
from .predictions import Prediction
from .schedules import Coeffs, Schedule

__version__ = "0.1.0"

_LAZY = {
    "analytic", "objectives", "solvers", "metrics", "data", "nets", "train", "checkpoint",
    "config", "cli", "report", "rewards", "demo", "plots", "fewstep", "integrations",
}


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name == "sample":
        from .solvers import sample

        return sample
    raise AttributeError(f"module 'tiltflow' has no attribute {name!r}")


__all__ = ["Denoiser", "Prediction", "Coeffs", "Schedule", "schedules", "predictions", "sample"]
