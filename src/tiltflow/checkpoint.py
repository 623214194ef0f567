"""Checkpoints: one directory per step, safetensors + JSON, written atomically, never pickled.

Layout of a run directory::

    run/
      latest                  # text file: "step_000123", replaced atomically
      step_000100/
      step_000123/
        model.safetensors     # network state_dict
        ema.safetensors       # EMA network state_dict (optional)
        optimizer.safetensors # the optimizer state's tensors, flattened by path
        optimizer.json        # the rest of the optimizer state dict (nesting, ints, floats)
        state.json            # step, RNG states, data position, config, metrics, file hashes

A checkpoint is first written into a hidden temporary directory next to its final place; every
file and the directory are fsynced, then the directory is renamed to ``step_NNNNNN`` (an atomic
operation on POSIX file systems) and ``latest`` is replaced the same way. A crash at any moment
leaves either the old checkpoint set or the new one, never a half-written ``step_*`` directory.
``state.json`` records the SHA-256 of every other file, so a damaged file is reported clearly.

Nothing is ever unpickled: tensors come back through safetensors, everything else through JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import UserError
from .fileio import atomic_write_text, fsync_dir, write_synced

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "find_latest",
    "clean_temporaries",
    "load_weights",
    "check_finite",
    "list_checkpoints",
    "step_dir_name",
    "capture_rng",
    "restore_rng",
    "generator_state",
    "set_generator_state",
    "flatten_state",
    "unflatten_state",
]

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{int(step):06d}"


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns. State dicts live on the CPU."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None
    state: dict = field(default_factory=dict)  # the whole state.json
    objective: dict | None = None  # an objective's own state (a target net, a second optimizer)

    @property
    def config(self) -> dict:
        return self.state.get("config") or {}

    @property
    def metrics(self) -> dict:
        return self.state.get("metrics") or {}

    @property
    def data_position(self) -> dict:
        return self.state.get("data_position") or {}

    @property
    def rng(self) -> dict:
        return self.state.get("rng") or {}


# -- nested structure <-> (tensors, JSON) --------------------------------------------------------

def flatten_state(obj) -> tuple[dict[str, torch.Tensor], object]:
    """Split a nested state (e.g. ``optimizer.state_dict()``) into a flat dict of tensors, keyed
    by their path, and a JSON-able skeleton that names them. Non-string dict keys, tuples and
    non-finite floats are tagged so that :func:`unflatten_state` restores them exactly."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(o, path):
        if torch.is_tensor(o):
            name = "/".join(path) or "tensor"
            tensors[name] = o.detach().to("cpu").contiguous()
            return {"__tensor__": name}
        if isinstance(o, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in o):
                return {k: enc(v, path + [k]) for k, v in o.items()}
            return {"__items__": [[enc(k, path + ["key"]), enc(v, path + [str(k)])]
                                  for k, v in o.items()]}
        if isinstance(o, tuple):
            return {"__tuple__": [enc(v, path + [str(i)]) for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [enc(v, path + [str(i)]) for i, v in enumerate(o)]
        if isinstance(o, float) and not math.isfinite(o):
            return {"__float__": repr(o)}
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot store {type(o).__name__} at {'/'.join(path)} in a checkpoint "
                        "(only tensors, numbers, strings, lists, tuples and dicts)")

    skeleton = enc(obj, [])
    return tensors, skeleton


def unflatten_state(skeleton, tensors: Mapping[str, torch.Tensor]):
    """Inverse of :func:`flatten_state`."""
    def dec(o):
        if isinstance(o, dict):
            if "__tensor__" in o:
                return tensors[o["__tensor__"]]
            if "__items__" in o:
                return {dec(k): dec(v) for k, v in o["__items__"]}
            if "__tuple__" in o:
                return tuple(dec(v) for v in o["__tuple__"])
            if "__float__" in o:
                return float(o["__float__"])
            return {k: dec(v) for k, v in o.items()}
        if isinstance(o, list):
            return [dec(v) for v in o]
        return o

    return dec(skeleton)


# -- RNG states as JSON ----------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def generator_state(gen: torch.Generator) -> dict:
    """A ``torch.Generator``'s state as JSON (its ByteTensor state, base64)."""
    return {"device": str(gen.device), "state": _b64(gen.get_state())}


def set_generator_state(gen: torch.Generator, data: dict) -> None:
    gen.set_state(_unb64(data["state"]))


def capture_rng() -> dict:
    """The global RNG states of torch (CPU and every CUDA device), numpy and Python, as JSON."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(data: dict) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when the device count matches)."""
    torch.set_rng_state(_unb64(data["torch"]))
    name, keys, pos, has_gauss, gauss = data["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = data["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = data.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])


# -- atomic file system helpers --------------------------------------------------------------------

def _write_file(path: Path, data: bytes) -> str:
    write_synced(path, data)
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(tensors: Mapping[str, torch.Tensor], what: str) -> bytes:
    # safetensors refuses tensors that share storage (tied weights): store a private copy.
    seen, out = set(), {}
    for k, v in tensors.items():
        if not torch.is_tensor(v):
            raise TypeError(f"{what}[{k!r}] is a {type(v).__name__}, not a tensor")
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel() > 0:
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return st_save(out, metadata={"tiltflow": what, "format": "pt"})


def _state_dict(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    return dict(obj)


def list_checkpoints(run_dir) -> list[Path]:
    """The ``step_*`` directories of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_latest(run_dir) -> Path | None:
    """The checkpoint ``latest`` points to; if that pointer is missing or stale, the newest
    ``step_*`` directory; ``None`` when the run has no checkpoint."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _STEP_RE.match(name) and (run_dir / name).is_dir():
            return run_dir / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


#: what a checkpoint write creates before its final rename: ``.tmp_step_NNNNNN_<8 hex>`` (the
#: checkpoint being written), ``.tmp_old_step_NNNNNN_<8 hex>`` (the previous copy of a step being
#: re-saved) and ``.latest.<8 hex>.tmp`` (the pointer being replaced, see tiltflow.fileio)
_TMP_DIR_RE = re.compile(r"^\.tmp_(old_)?(step_\d+)_[0-9a-f]{8}$")
_TMP_POINTER_RE = re.compile(r"^\.latest\.[0-9a-f]{8}\.tmp$")


def clean_temporaries(run_dir) -> list[Path]:
    """Remove what checkpoint writes killed midway left in ``run_dir``; return the removed paths.

    Only names this layout creates are touched (see ``_TMP_DIR_RE``), nothing else in the run
    directory. A ``.tmp_old_`` copy whose ``step_NNNNNN`` directory is missing (a re-save killed
    between its two renames) is renamed back instead, so no complete checkpoint is lost. Called
    by every :func:`save_checkpoint` and when training starts (one writer per run directory)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for p in sorted(run_dir.iterdir()):  # ".tmp_old_*" sorts before ".tmp_step_*"
        m = _TMP_DIR_RE.match(p.name)
        if m and p.is_dir() and not p.is_symlink():
            if m.group(1) and not (run_dir / m.group(2)).exists():
                os.rename(p, run_dir / m.group(2))
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif _TMP_POINTER_RE.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        fsync_dir(run_dir)
    return removed


def save_checkpoint(
    run_dir,
    step: int,
    *,
    model,
    ema=None,
    optimizer=None,
    rng: dict | None = None,
    data_position: dict | None = None,
    config: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    keep: int | None = 3,
    objective: dict | None = None,
) -> Path:
    """Write ``run_dir/step_NNNNNN`` atomically, point ``latest`` at it, keep the newest ``keep``.

    ``model`` / ``ema``: an ``nn.Module`` or a state dict. ``optimizer``: a
    ``torch.optim.Optimizer`` or its state dict. ``rng``: e.g. ``{"global": capture_rng(),
    "objective": generator_state(gen)}``; ``data_position``: ``{"epoch", "index", "seed"}``;
    ``config``/``metrics``/``extra``: JSON-able dicts. ``objective``: what an objective
    keeps between steps (a consistency model's EMA target, a fake-score network and its
    optimizer), its ``state_dict()``: nested dicts / lists of tensors and JSON-able values.
    Returns the checkpoint's path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = run_dir / name
    clean_temporaries(run_dir)  # left by a process killed mid-write
    tmp = run_dir / f".tmp_{name}_{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        hashes = {"model.safetensors": _write_file(
            tmp / "model.safetensors", _tensor_bytes(_state_dict(model), "model"))}
        if ema is not None:
            hashes["ema.safetensors"] = _write_file(
                tmp / "ema.safetensors", _tensor_bytes(_state_dict(ema), "ema"))
        if objective:
            tensors, skeleton = flatten_state(objective)
            hashes["objective.safetensors"] = _write_file(
                tmp / "objective.safetensors", _tensor_bytes(tensors, "objective"))
            hashes["objective.json"] = _write_file(
                tmp / "objective.json", json.dumps(skeleton).encode())
        if optimizer is not None:
            osd = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
            tensors, skeleton = flatten_state(osd)
            hashes["optimizer.safetensors"] = _write_file(
                tmp / "optimizer.safetensors", _tensor_bytes(tensors, "optimizer"))
            hashes["optimizer.json"] = _write_file(
                tmp / "optimizer.json", json.dumps(skeleton).encode())
        state = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "rng": rng or {},
            "data_position": data_position or {},
            "config": config or {},
            "metrics": metrics or {},
            "extra": extra or {},
            "files": hashes,
        }
        text = json.dumps(state, indent=1, allow_nan=False, default=_json_default)
        _write_file(tmp / "state.json", text.encode())
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): swap the old one out
            old = run_dir / f".tmp_old_{name}_{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(run_dir)
    except OSError as e:  # name the checkpoint, not the temporary directory that is gone now
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"{e.strerror or e} (writing checkpoint {name})",
                      str(run_dir)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(run_dir, name)
    if keep is not None and keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot store {type(o).__name__} in state.json; pass JSON-able values")


def _write_pointer(run_dir: Path, name: str) -> None:
    atomic_write_text(run_dir / "latest", name + "\n")


# -- loading -----------------------------------------------------------------------------------

_REBUILD = ("the weights belong to another network than the run config describes; restore the "
            "run's own files or retrain")


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def check_finite(tensors: Mapping[str, torch.Tensor], source) -> None:
    """Refuse tensors holding NaN or inf, naming ``source`` (the file) and the first bad tensor:
    training never saves a non-finite state, so such a file is damaged and would silently give
    NaN samples."""
    for key, value in tensors.items():
        if torch.is_tensor(value) and (value.is_floating_point() or value.is_complex()):
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                raise UserError(f"{str(source)!r}: tensor {key!r} holds {int(bad.sum())} NaN/inf "
                                f"value(s) of {value.numel()}; the file is damaged: use an "
                                "earlier step_NNNNNN directory or retrain")


def load_weights(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source) -> None:
    """Load ``state`` into ``module`` after checking that it fits: the same tensor names, the
    same shapes, finite values. A mismatch is a one-line :class:`UserError` naming ``source``
    (the file), the tensor, and the expected vs the stored shape, instead of
    ``load_state_dict``'s multi-line RuntimeError."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        k = missing[0]
        raise UserError(f"{str(source)!r} lacks tensor {k!r} (shape {list(expected[k].shape)})"
                        f"{_more(missing)}; {_REBUILD}")
    extra = [k for k in state if k not in expected]
    if extra:
        k = extra[0]
        raise UserError(f"{str(source)!r} holds tensor {k!r} (shape {list(state[k].shape)}) that "
                        f"the network does not have{_more(extra)}; {_REBUILD}")
    for k, value in state.items():
        if tuple(value.shape) != tuple(expected[k].shape):
            raise UserError(f"{str(source)!r}: tensor {k!r} has shape {list(value.shape)}, the "
                            f"network expects {list(expected[k].shape)}; {_REBUILD}")
    check_finite(state, source)
    module.load_state_dict(state)


def _resolve(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist; pass a run directory or one of "
                        "its step_NNNNNN directories")
    if (path / "state.json").exists() or _STEP_RE.match(path.name):
        return path
    latest = find_latest(path)
    if latest is None:
        raise UserError(f"no checkpoint in {str(path)!r} (no 'latest' file and no step_NNNNNN "
                        "directory); start a new run or pass the right directory")
    return latest


def _read(path: Path, expected: str | None) -> bytes:
    if not path.is_file():
        raise UserError(f"checkpoint file {str(path)!r} is missing; the checkpoint is incomplete, "
                        "resume from an earlier step_NNNNNN directory")
    data = path.read_bytes()
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise UserError(f"checkpoint file {str(path)!r} is corrupt (checksum mismatch); delete "
                        "this step directory and resume from an earlier one")
    return data


def _load_tensors(path: Path, expected: str | None) -> dict[str, torch.Tensor]:
    data = _read(path, expected)
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint file {str(path)!r} is corrupt ({e}); delete this step "
                        "directory and resume from an earlier one") from None


def load_checkpoint(path) -> Checkpoint:
    """Load a checkpoint: ``path`` is a run directory (its latest checkpoint) or a step directory.

    Uses only safetensors and JSON. A missing or damaged file raises
    :class:`~tiltflow.errors.UserError` naming it.
    """
    ckpt_dir = _resolve(path)
    state_path = ckpt_dir / "state.json"
    raw = _read(state_path, None)
    try:
        state = json.loads(raw)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no 'step' entry")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint file {str(state_path)!r} is corrupt ({e}); delete this step "
                        "directory and resume from an earlier one") from None
    hashes = state.get("files") or {}
    model = _load_tensors(ckpt_dir / "model.safetensors", hashes.get("model.safetensors"))
    ema = None
    if "ema.safetensors" in hashes or (ckpt_dir / "ema.safetensors").exists():
        ema = _load_tensors(ckpt_dir / "ema.safetensors", hashes.get("ema.safetensors"))
    objective = None
    if "objective.json" in hashes:
        tensors = _load_tensors(ckpt_dir / "objective.safetensors",
                                hashes.get("objective.safetensors"))
        text = _read(ckpt_dir / "objective.json", hashes["objective.json"])
        try:
            objective = unflatten_state(json.loads(text), tensors)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"checkpoint file {str(ckpt_dir / 'objective.json')!r} is corrupt "
                            f"({e}); resume from an earlier step directory") from None
    optimizer = None
    if "optimizer.json" in hashes or (ckpt_dir / "optimizer.json").exists():
        tensors = _load_tensors(ckpt_dir / "optimizer.safetensors",
                                hashes.get("optimizer.safetensors"))
        text = _read(ckpt_dir / "optimizer.json", hashes.get("optimizer.json"))
        try:
            optimizer = unflatten_state(json.loads(text), tensors)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"checkpoint file {str(ckpt_dir / 'optimizer.json')!r} is corrupt "
                            f"({e}); resume from an earlier step directory") from None
    return Checkpoint(path=ckpt_dir, step=int(state["step"]), model=model, ema=ema,
                      optimizer=optimizer, state=state, objective=objective)
