"""Networks: plain ``nn.Module``s called as ``net(x, t, cond=None)``.

- :class:`MLP` for ``[B, D]`` data, :class:`UNet` and :class:`DiT` for ``[B, C, H, W]`` images.
- ``t`` is a float tensor ``[B]`` of any real values (``[0, 1]`` or EDM's ``log(sigma)/4``);
  ``cond`` is ``None`` or a ``LongTensor[B]`` of labels in ``[-1, num_classes)``, ``-1`` = no
  label. See :mod:`tiltflow.nets.embeddings`.
- Each network keeps its constructor arguments in ``net.config`` (JSON-friendly, with
  ``"name"``), so ``build(net.config)`` rebuilds the same architecture for a checkpoint.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..errors import UserError
from .dit import DiT
from .mlp import MLP
from .unet import UNet

__all__ = ["MLP", "UNet", "DiT", "build", "available", "REGISTRY"]

REGISTRY: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": UNet, "dit": DiT}


def available() -> list[str]:
    """Names accepted by :func:`build`."""
    return sorted(REGISTRY)


def build(spec: dict) -> nn.Module:
    """Build a network from ``{"name": "mlp" | "unet" | "dit", **kwargs}`` (e.g. ``net.config``).

    Raises :class:`~tiltflow.errors.UserError` (a ``ValueError``) for a missing or unknown name
    or an unknown keyword, naming the valid choices.
    """
    if not isinstance(spec, dict):
        raise UserError(f"a network spec must be a dict like {{'name': 'mlp', 'dim': 2}}, "
                        f"got {type(spec).__name__}")
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name is None:
        raise UserError(f"network spec has no 'name'; add one of {available()}")
    cls = REGISTRY.get(str(name).lower())
    if cls is None:
        raise UserError(f"unknown network {name!r}; choose one of {available()}")
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise UserError(f"unknown option(s) {unknown} for network {name!r}; valid options: {valid}")
    missing = [p for p in valid if params[p].default is inspect.Parameter.empty
               and p not in kwargs]
    if missing:
        raise UserError(f"network {name!r} needs option(s) {missing}; add them to the spec")
    return cls(**kwargs)
