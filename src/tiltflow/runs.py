"""From a run config to the objects that train and sample, and back from a checkpoint.

A run config (see :mod:`tiltflow.config`) names the data, network, schedule and objective;
:func:`build_run` turns it into ``(dataset, denoiser, objective)`` with sensible defaults filled
in, and :func:`load_trained` rebuilds the EMA denoiser from a run directory or checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import data as data_mod
from . import memory, nets, objectives
from .checkpoint import load_checkpoint, load_weights
from .denoiser import Denoiser
from .errors import UserError, one_line
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
    _check_network_fits(spec)
    net = nets.build(spec)
    schedule = get_schedule(schedule_spec or objective.default_schedule)
    return Denoiser(net, schedule, prediction, precondition=precondition, sigma_data=sigma_data)


def _check_network_fits(spec: dict) -> None:
    """Refuse a network too large for this machine before building it: its parameters are
    counted on the ``meta`` device (nothing allocated), so ``model.hidden=10**6`` is one line
    naming the size instead of an allocator traceback or the kernel's OOM killer."""
    n = memory.count_parameters(lambda: nets.build(dict(spec)))
    memory.check_fits(n * memory.FLOAT_BYTES, f"the network ({spec['name']}, {n:,} parameters)",
                      "make it smaller (model.hidden, model.depth, model.base_channels, ...)")


def build_run(cfg: dict):
    """``(dataset, denoiser, objective)`` for a loaded run config.

    The network's initial weights are drawn with ``train.seed`` (the global RNG is restored
    afterwards): the same config gives the same run, so an interrupted and resumed run can be
    compared with an uninterrupted one bit for bit."""
    dataset = _load_data(cfg)
    obj_spec = _spec(cfg.get("objective"), "flow_matching")
    objective = objectives.get(obj_spec)
    seed = int((cfg.get("train") or {}).get("seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        den = build_denoiser(cfg.get("model"), cfg.get("schedule"), objective,
                             data_info(dataset))
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


#: what sampling reads from a checkpoint's ``run.data``: key -> (check, what it must be)
_DATA_KEYS = {
    "kind": (lambda v: v in ("tabular", "image"), "'tabular' or 'image'"),
    "shape": (lambda v: isinstance(v, list) and len(v) > 0
              and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v),
              "a list of positive integers"),
    "num_classes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                    "an integer >= 0"),
    "shift": (lambda v: _numbers(v), "a number or a list of numbers"),
    "scale": (lambda v: _numbers(v), "a number or a list of numbers"),
}


def _numbers(v) -> bool:
    items = v if isinstance(v, list) else [v]
    return len(items) > 0 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                  for x in items)


def _check_run_info(cfg, info, state_path) -> None:
    """The run config and data description in ``state.json`` hold what sampling needs, each of
    the right type; else one line naming the file and the key (not ``KeyError: 'shape'``)."""
    if not isinstance(cfg, dict) or not isinstance(info, dict):
        raise UserError(f"{str(state_path)!r} has no run config (run.config / run.data); it was "
                        "not written by `tiltflow train`: load it with tiltflow.checkpoint instead")
    for key, (ok, want) in _DATA_KEYS.items():
        if key not in info:
            raise UserError(f"{str(state_path)!r} lacks run.data.{key}, which sampling needs; "
                            "the file was edited or damaged: restore it or retrain")
        if not ok(info[key]):
            raise UserError(f"{str(state_path)!r}: run.data.{key} must be {want}, got "
                            f"{info[key]!r}; restore the file or retrain")


def load_trained(path, use_ema: bool = True) -> Trained:
    """Rebuild the (EMA) denoiser of a run directory or checkpoint directory.

    Every way the checkpoint can disagree with itself is one line naming the file: a run config
    missing a key, a network the config cannot build, weights of other names or shapes than
    that network's, non-finite weights (see :func:`tiltflow.checkpoint.load_weights`)."""
    ckpt = load_checkpoint(path)
    state_path = ckpt.path / "state.json"
    run = ckpt.config.get("run") or {}
    cfg, info = run.get("config"), run.get("data")
    _check_run_info(cfg, info, state_path)
    try:
        objective = objectives.get(_spec(cfg.get("objective"), "flow_matching"))
        den = build_denoiser(cfg.get("model"), cfg.get("schedule"), objective, info)
    except (UserError, TypeError, KeyError) as e:
        raise UserError(f"{str(state_path)!r}: the run config does not build a model "
                        f"({one_line(str(e))}); restore the file or retrain") from None
    ema = use_ema and ckpt.ema is not None
    state = ckpt.ema if ema else ckpt.model
    source = ckpt.path / ("ema.safetensors" if ema else "model.safetensors")
    target = den.net if not any(k.startswith("net.") for k in state) else den
    load_weights(target, state, source)
    den.eval()
    return Trained(den, info, cfg, ckpt.step, str(ckpt.path))
