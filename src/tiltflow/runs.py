"""From a run config to the objects that train and sample, and back from a checkpoint.

A run config (see :mod:`tiltflow.config`) names the data, network, schedule and objective;
:func:`build_run` turns it into ``(dataset, denoiser, objective)`` with sensible defaults filled
in, and :func:`load_trained` rebuilds the EMA denoiser from a run directory or checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import data as data_mod
from . import nets, objectives
from .checkpoint import load_checkpoint
from .denoiser import Denoiser
from .errors import UserError
from .schedules import get_schedule

__all__ = ["build_run", "load_trained", "Trained"]


def _spec(value, default_name: str | None = None) -> dict:
    if value is None:
        value = {}
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise UserError(f"expected a name or a mapping, got {value!r}")
    value = dict(value)
    if default_name and "name" not in value:
        value["name"] = default_name
    return value


def _load_data(cfg: dict):
    spec = _spec(cfg.get("data"), "eight_gaussians")
    name = spec.pop("name")
    return data_mod.load_dataset(name, **spec)


def data_info(dataset) -> dict:
    """What sampling needs to know about the data, stored with every checkpoint."""
    return {"name": dataset.name, "kind": dataset.kind, "shape": list(dataset.shape),
            "num_classes": dataset.num_classes, "class_names": dataset.class_names,
            "shift": dataset.shift.tolist(), "scale": dataset.scale.tolist()}


def build_denoiser(model_spec: dict, schedule_spec, objective, info: dict) -> Denoiser:
    """The run's denoiser; the objective supplies the schedule, prediction kind and
    preconditioning the config leaves out."""
    spec = _spec(model_spec)
    prediction = spec.pop("prediction", objective.default_prediction)
    precondition = bool(spec.pop("precondition", objective.default_precondition))
    sigma_data = float(spec.pop("sigma_data", 0.5))
    image = info["kind"] == "image"
    spec.setdefault("name", "unet" if image else "mlp")
    if image:
        spec.setdefault("in_channels", info["shape"][0])
        if spec["name"] == "dit":
            spec.setdefault("image_size", info["shape"][1])
    else:
        spec.setdefault("dim", info["shape"][0])
    spec.setdefault("num_classes", info["num_classes"])
    net = nets.build(spec)
    schedule = get_schedule(schedule_spec or objective.default_schedule)
    return Denoiser(net, schedule, prediction, precondition=precondition, sigma_data=sigma_data)


def build_run(cfg: dict):
    """``(dataset, denoiser, objective)`` for a loaded run config."""
    dataset = _load_data(cfg)
    obj_spec = _spec(cfg.get("objective"), "flow_matching")
    objective = objectives.get(obj_spec)
    den = build_denoiser(cfg.get("model"), cfg.get("schedule"), objective, data_info(dataset))
    return dataset, den, objective


@dataclass
class Trained:
    """A trained model loaded for sampling: the EMA denoiser and what the data looked like."""

    denoiser: Denoiser
    data: dict
    config: dict
    step: int
    path: str

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.data["kind"] == "image":
            return x
        return x * torch.tensor(self.data["scale"]) + torch.tensor(self.data["shift"])


def load_trained(path, use_ema: bool = True) -> Trained:
    """Rebuild the (EMA) denoiser of a run directory or checkpoint directory."""
    ckpt = load_checkpoint(path)
    run = (ckpt.config.get("run") or {})
    cfg, info = run.get("config"), run.get("data")
    if not cfg or not info:
        raise UserError(f"checkpoint {str(ckpt.path)!r} was not written by `tiltflow train` "
                        "(no run config inside); load it with tiltflow.checkpoint instead")
    objective = objectives.get(_spec(cfg.get("objective"), "flow_matching"))
    den = build_denoiser(cfg.get("model"), cfg.get("schedule"), objective, info)
    state = ckpt.ema if (use_ema and ckpt.ema is not None) else ckpt.model
    target = den.net if not any(k.startswith("net.") for k in state) else den
    target.load_state_dict(state)
    den.eval()
    return Trained(den, info, cfg, ckpt.step, str(ckpt.path))
