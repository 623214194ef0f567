"""Run configuration: a YAML file plus ``key=value`` overrides, and :class:`TrainConfig`.

A run config is a dict of sections::

    model:     {name: mlp, dim: 2, hidden: 256}      # -> tiltflow.nets.build
    data:      {name: eight_gaussians}               # -> tiltflow.data.load_dataset
    objective: {name: flow_matching}                 # -> tiltflow.objectives.get
    train:     {steps: 20000, lr: 3.0e-4}            # -> TrainConfig (checked here)

Overrides use dotted keys and YAML scalars: ``train.lr=3e-4 model.hidden=128 data=moons``.
The ``train`` section is checked key by key against :class:`TrainConfig`. The component
sections (``model``, ``data``, ``objective``, ``schedule``, ``sample``) accept any key, because
the builder of the named component (``nets.build``, ...) knows its own options and rejects the
unknown ones with the list of valid ones. A top-level key outside these sections is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError

__all__ = ["TrainConfig", "load_config", "apply_overrides", "parse_value", "SECTIONS"]

#: Top-level sections of a run config. ``train`` is strict; the others are "open" (see above).
SECTIONS = ("model", "data", "objective", "schedule", "sample", "train")


@dataclass
class TrainConfig:
    """Settings of :func:`tiltflow.train.train`. Every default sits next to its reason."""

    # Length and batch. 20k steps of batch 256 fit a 2-D toy set well on a laptop CPU.
    steps: int = 20_000
    batch_size: int = 256
    # AdamW. 3e-4 is the usual safe Adam step for small diffusion nets; larger nets want 1e-4.
    lr: float = 3e-4
    # 0: diffusion models are usually trained without decay (EDM, DiT); when > 0 it only applies
    # to weight matrices (dim >= 2), not to biases and norm gains (as in nanoGPT).
    weight_decay: float = 0.0
    # Adam's defaults; beta2 = 0.999 averages the noisy per-t gradient scale over ~1k steps.
    betas: tuple[float, float] = (0.9, 0.999)
    # Linear warm-up keeps the first Adam steps (noisy second moments) small.
    warmup_steps: int = 500
    # "constant" after warm-up (the EMA does the annealing), or "cosine" down to min_lr_ratio * lr.
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    # Clip the global gradient norm: rare huge gradients at t near 0/1 would blow up Adam.
    # 0 disables clipping (the norm is still computed: it is logged and checked for NaN).
    grad_clip: float = 1.0
    # EMA of the weights is what gets sampled; 0.999 ~ an average over the last 1k steps.
    ema_decay: float = 0.999
    # With warm-up the decay is min(ema_decay, (1 + n) / (10 + n)) at update n, so the EMA
    # forgets the random initialisation quickly in short runs.
    ema_warmup: bool = True
    seed: int = 0
    # Log (one device sync) every 50 steps: cheap, yet a NaN is reported with its exact step.
    log_every: int = 50
    # Call the sample callbacks every N steps; 0 = never.
    sample_every: int = 0
    # Checkpoint every N steps (and always at the end); 0 = only at the end.
    ckpt_every: int = 1000
    # Keep the newest 3 checkpoints: enough to step back past a bad one, small on disk.
    keep_checkpoints: int = 3
    # "no" | "bf16" | "fp16": only used on a GPU; on CPU training stays float32 (with a note).
    mixed_precision: str = "no"
    # torch.compile the network: "auto" = on a GPU only (on CPU the compile time dominates);
    # True forces it, False disables it.
    compile: bool | str = "auto"
    out_dir: str = "runs/default"

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_dict(cls, d: Mapping | None) -> TrainConfig:
        """Build from a dict (the ``train`` section), rejecting unknown keys with a suggestion."""
        d = dict(d or {})
        _check_keys(d, [f.name for f in dataclasses.fields(cls)], prefix="train.")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def validate(self) -> None:
        """Coerce types (YAML gives ``"3e-4"`` as a string) and check ranges, in place."""
        def positive_int(name, allow_zero=False):
            v = getattr(self, name)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()):
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                need = "a non-negative" if allow_zero else "a positive"
                raise UserError(f"train.{name} must be {need} integer, got {v!r}")
            setattr(self, name, v)

        def real(name, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
            v = _as_float(getattr(self, name), f"train.{name}")
            if not (lo < v if lo_open else lo <= v) or not (v < hi if hi_open else v <= hi):
                lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
                raise UserError(f"train.{name} must be in {lb}{lo}, {hi}{hb}, got {v!r}")
            setattr(self, name, v)

        for name in ("steps", "batch_size", "log_every", "keep_checkpoints"):
            positive_int(name)
        for name in ("warmup_steps", "sample_every", "ckpt_every", "seed"):
            positive_int(name, allow_zero=True)
        real("lr", 0, lo_open=True)
        real("weight_decay", 0)
        real("grad_clip", 0)
        real("ema_decay", 0, 1, hi_open=True)
        real("min_lr_ratio", 0, 1)
        b = self.betas
        if not isinstance(b, (list, tuple)) or len(b) != 2:
            raise UserError(f"train.betas must be two numbers like [0.9, 0.999], got {b!r}")
        b = tuple(_as_float(v, "train.betas") for v in b)
        if not all(0 <= v < 1 for v in b):
            raise UserError(f"train.betas must both lie in [0, 1), got {list(b)}")
        self.betas = b
        if self.lr_schedule not in ("constant", "cosine"):
            raise UserError(f"train.lr_schedule must be 'constant' or 'cosine', "
                            f"got {self.lr_schedule!r}")
        mp = self.mixed_precision
        if mp is False or mp is None:  # YAML 1.1 reads a bare `no` as False
            mp = "no"
        if mp not in ("no", "bf16", "fp16"):
            raise UserError(f"train.mixed_precision must be 'no', 'bf16' or 'fp16', got {mp!r}")
        self.mixed_precision = mp
        if self.compile not in (True, False, "auto"):
            raise UserError(f"train.compile must be true, false or 'auto', got {self.compile!r}")
        if not isinstance(self.ema_warmup, bool):
            raise UserError(f"train.ema_warmup must be true or false, got {self.ema_warmup!r}")
        if not isinstance(self.out_dir, (str, Path)) or not str(self.out_dir):
            raise UserError(f"train.out_dir must be a path, got {self.out_dir!r}")
        self.out_dir = str(self.out_dir)


def _as_float(v, name) -> float:
    if isinstance(v, bool):
        raise UserError(f"{name} must be a number, got {v!r}")
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise UserError(f"{name} must be a number, got {v!r}") from None
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _check_keys(d: Mapping, valid: list[str], prefix: str = "") -> None:
    for key in d:
        if key not in valid:
            raise UserError(_unknown_key_message(prefix + str(key), [prefix + v for v in valid]))


def _unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown config key {key!r}; {hint}valid keys: {', '.join(valid)}"


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def parse_value(text: str):
    """Parse an override value as a YAML scalar (``128``, ``3e-4``, ``true``, ``[0.9, 0.99]``,
    ``moons``). Unlike plain PyYAML, ``3e-4`` (no dot) is read as a float."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or "invalid YAML"
        raise UserError(f"cannot parse value {text!r}: {why}; quote it or fix it") from None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    return value


def parse_options(items: Iterable[str], example: str = "eta=0.5") -> dict:
    """Command-line ``KEY=VALUE`` items (``--option``) as a dict, each value parsed by
    :func:`parse_value`; a malformed item is a one-line :class:`UserError`."""
    options = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--option {item!r} is not KEY=VALUE (e.g. --option {example})")
        key, value = item.split("=", 1)
        options[key.strip()] = _no_nan(key.strip(), parse_value(value), "--option")
    return options


def _no_nan(key: str, value, where: str):
    """A command-line value that is NaN (anywhere in a list) is refused: no setting means NaN,
    and it would silently poison every number it touches (inf stays allowed: s_tmax=inf)."""
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and math.isnan(v) for v in items):
        raise UserError(f"{where} {key}={value!r}: NaN is not a valid value; give a number")
    return value


def _fix_numbers(obj):
    """PyYAML (YAML 1.1) reads ``1e-4`` as a string; turn such strings into floats."""
    if isinstance(obj, dict):
        return {k: _fix_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fix_numbers(v) for v in obj]
    if isinstance(obj, str) and _NUMBER.fullmatch(obj.strip()) and any(c in obj for c in "eE"):
        return float(obj)
    return obj


def apply_overrides(cfg: dict, overrides: Iterable[str], sections=SECTIONS) -> dict:
    """Apply ``key=value`` overrides (dotted keys) to a copy of ``cfg``."""
    import copy

    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value; write e.g. train.lr=3e-4")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise UserError(f"override key {key!r} is malformed; write e.g. train.lr=3e-4")
        value = _no_nan(key, parse_value(text), "override")
        if parts[0] not in sections:
            raise UserError(_unknown_key_message(parts[0], list(sections)))
        if parts[0] == "train":
            valid = [f.name for f in dataclasses.fields(TrainConfig)]
            if len(parts) != 2 or parts[1] not in valid:
                raise UserError(_unknown_key_message(key, ["train." + v for v in valid]))
        node = cfg
        for depth, p in enumerate(parts[:-1]):
            child = node.get(p)
            if isinstance(child, str):  # "data: moons" -> {"name": "moons"} to set an option
                child = {"name": child}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(f"cannot set {key!r}: {where!r} is {child!r}, not a section")
            node[p] = child
            node = child
        last = parts[-1]
        if isinstance(node.get(last), dict) and isinstance(value, str):
            node[last]["name"] = value  # `data=moons`: switch the component, keep its options
        else:
            node[last] = value
    return cfg


def load_config(source=None, overrides: Iterable[str] = (), *, sections=SECTIONS) -> dict:
    """Load a run config from a YAML path or a dict, apply ``key=value`` overrides, check keys.

    Returns a plain dict whose ``train`` section is complete (every :class:`TrainConfig` field,
    validated); build the loop's settings with ``TrainConfig.from_dict(cfg["train"])``.
    """
    if source is None:
        cfg = {}
    elif isinstance(source, Mapping):
        cfg = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} not found; pass a path to a YAML file")
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(cfg, dict):
            raise UserError(f"config file {str(path)!r} must hold a mapping of sections "
                            f"({', '.join(sections)})")
    cfg = _fix_numbers(cfg)
    _check_keys(cfg, list(sections))
    train = cfg.get("train") or {}
    if not isinstance(train, Mapping):
        raise UserError(f"config section 'train' must be a mapping, got {train!r}")
    cfg = apply_overrides(cfg, overrides, sections)
    cfg["train"] = TrainConfig.from_dict(cfg.get("train") or {}).to_dict()
    return cfg
