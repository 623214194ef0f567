"""Training objectives: ``objective(model, batch, generator=None) -> per-example loss [B]``.

``objectives.get("ddpm", weighting="elbo")`` or ``objectives.get(obj.config())`` builds one by
name; ``objectives.available()`` lists the names. Couplings between data and noise live in
:mod:`.couplings`, training-time distributions in :mod:`.timesampling`.
"""

from __future__ import annotations

from . import couplings, timesampling
from .pretraining import (
    DDPMLoss,
    DSMLoss,
    EDMLoss,
    FlowMatchingLoss,
    Objective,
    RectifiedFlowLoss,
    SSMLoss,
    available,
    drop_labels,
    get,
)

__all__ = [
    "Objective",
    "DDPMLoss",
    "DSMLoss",
    "SSMLoss",
    "EDMLoss",
    "FlowMatchingLoss",
    "RectifiedFlowLoss",
    "drop_labels",
    "get",
    "available",
    "couplings",
    "timesampling",
]
