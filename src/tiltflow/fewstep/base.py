"""The method registry and what every distillation shares: its config, its student network,
the teacher's samples when no data is given, the training run and loading a student back.

A method is a function ``run(job) -> Student`` registered with :func:`register`; ``job`` is a
:class:`Job` holding the teacher, the data (given or drawn from the teacher), the validated
config and the output directory. Each method trains through :func:`tiltflow.train.train`, so
checkpoints, resume, accelerate and logging are the common ones.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..denoiser import Denoiser
from ..errors import UserError
from .student import FlowMap, GuidanceEmbedded, Student

__all__ = ["register", "methods", "get_method", "distill", "load", "Job", "Method", "COMMON"]

# Keys every method accepts (its own defaults may override the values).
COMMON = {
    "steps": 2000,            # training steps (per round for progressive distillation)
    "batch_size": 256,
    "lr": 3e-4,
    "warmup_steps": 100,
    "ema_decay": 0.999,
    "grad_clip": 1.0,
    "seed": 0,
    "log_every": 50,
    "ckpt_every": 500,
    "mixed_precision": "no",
    "compile": "auto",
    "model": None,            # network spec for the student; default: the teacher's network
    "init": "auto",           # "teacher" (copy its weights), "fresh", or "auto"
    "shape": None,            # data shape when neither data nor teacher tells it
    "num_classes": 0,         # class labels to draw teacher samples for
    "num_data": 8192,         # teacher samples when no data is given
    "teacher_solver": "heun",  # how teacher samples / pairs are drawn
    "teacher_nfe": 63,
}


@dataclass
class Method:
    name: str
    run: Callable
    defaults: dict
    needs_data: bool
    description: str


_METHODS: dict[str, Method] = {}


def register(name: str, *, defaults: dict, needs_data: bool = False):
    """Register ``run(job) -> Student`` under ``name`` with its config ``defaults`` (on top of
    :data:`COMMON`). ``needs_data``: the method trains from data (consistency training,
    shortcut, MeanFlow); without data it draws the teacher's samples instead."""
    def deco(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        _METHODS[name] = Method(name, fn, dict(defaults), needs_data, doc[0] if doc else "")
        return fn

    return deco


def methods() -> list[str]:
    """Names of the registered few-step methods."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise UserError(f"unknown few-step method {name!r}; choose one of {methods()}")
    return _METHODS[name]


def check_config(method: Method, config: dict | None) -> dict:
    """``COMMON`` + the method's defaults, updated by ``config``; an unknown key is an error
    naming the valid ones."""
    cfg = {**COMMON, **method.defaults}
    config = dict(config or {})
    unknown = sorted(set(config) - set(cfg))
    if unknown:
        raise UserError(f"unknown config key(s) {unknown} for {method.name!r}; valid keys: "
                        f"{sorted(cfg)}")
    cfg.update(config)
    for key in ("steps", "batch_size", "num_data", "teacher_nfe"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise UserError(f"config {key!r} must be a positive integer, got {cfg[key]!r}")
    if cfg["init"] not in ("auto", "teacher", "fresh"):
        raise UserError(f"config 'init' must be 'auto', 'teacher' or 'fresh', got {cfg['init']!r}")
    return cfg


# -- the job -----------------------------------------------------------------------------------

@dataclass
class Job:
    """Everything a method's ``run`` needs."""

    method: Method
    teacher: Denoiser
    data: dict | None          # {"x": [N, ...], "cond": [N] | None}, or None
    config: dict
    out_dir: Path
    resume: bool
    shape: tuple[int, ...]
    num_classes: int
    data_info: dict = field(default_factory=dict)

    def teacher_data(self) -> dict:
        """The given data, else ``num_data`` teacher samples (drawn once, kept in ``out_dir``
        so a resumed run trains on the same set)."""
        if self.data is not None:
            return self.data
        path = self.out_dir / "teacher_samples.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg["seed"] + 7919)
        noise = torch.randn((cfg["num_data"], *self.shape), generator=gen)
        cond = (torch.randint(0, self.num_classes, (cfg["num_data"],), generator=gen)
                if self.num_classes else None)
        x = teacher_solve(self.teacher, noise, cond, cfg)
        data = {"x": x, "cond": cond}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(data, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # whole or not at all, for a resumed run
        return data

    def train_config(self, out_dir: Path | None = None, **overrides) -> dict:
        cfg = self.config
        keys = ("steps", "batch_size", "lr", "warmup_steps", "ema_decay", "grad_clip", "seed",
                "log_every", "ckpt_every", "mixed_precision", "compile")
        return {**{k: cfg[k] for k in keys}, "out_dir": str(out_dir or self.out_dir),
                **overrides}

    def point_to(self, student: Student) -> None:
        """Record which run holds the final student (methods with rounds train several), so
        :func:`load` on ``out_dir`` finds it."""
        from ..fileio import atomic_write_text

        run = Path(student.run_dir).resolve().relative_to(self.out_dir.resolve())
        atomic_write_text(self.out_dir / "student.json", json.dumps({"run": str(run)}) + "\n")

    def meta(self, student: Student) -> dict:
        return {"fewstep": student.describe(), "config": _jsonable(self.config),
                "data": self.data_info}


def teacher_solve(teacher: Denoiser, noise: torch.Tensor, cond, cfg: dict,
                  batch: int = 4096) -> torch.Tensor:
    """The teacher's ODE solutions from ``noise`` (batched, with a progress bar)."""
    from tqdm.auto import tqdm

    from ..solvers import sample

    out = []
    for i in tqdm(range(0, len(noise), batch), desc="teacher samples", leave=False,
                  disable=len(noise) <= batch):
        c = cond[i:i + batch] if cond is not None else None
        out.append(sample(teacher, noise[i:i + batch], cfg["teacher_solver"],
                          nfe=cfg["teacher_nfe"], cond=c))
    return torch.cat(out).float()


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _as_data(data) -> dict | None:
    if data is None:
        return None
    if isinstance(data, str):
        from ..data import load_dataset

        ds = load_dataset(data)
        return {"x": ds.x, "cond": ds.cond}
    if torch.is_tensor(data):
        return {"x": data, "cond": None}
    if isinstance(data, dict) and torch.is_tensor(data.get("x")):
        return {"x": data["x"], "cond": data.get("cond")}
    x = getattr(data, "x", None)
    if torch.is_tensor(x):
        return {"x": x, "cond": getattr(data, "cond", None)}
    raise UserError("data must be a tensor [N, ...], a dict {'x', 'cond'}, a dataset or a "
                    f"dataset name, got {type(data).__name__}")


def _shape(teacher, data, cfg, data_info) -> tuple[int, ...]:
    if data is not None:
        return tuple(data["x"].shape[1:])
    if cfg["shape"] is not None:
        return tuple(int(s) for s in cfg["shape"])
    if data_info and data_info.get("shape"):
        return tuple(data_info["shape"])
    shape = getattr(teacher, "data_shape", None)
    if shape is None:
        raise UserError("cannot tell the data shape: pass data=..., or config={'shape': [...]}")
    return tuple(shape)


# -- the student network -----------------------------------------------------------------------

def _fresh_spec(shape, num_classes: int) -> dict:
    if len(shape) == 1:
        return {"name": "mlp", "dim": shape[0], "hidden": 256, "depth": 4,
                "num_classes": num_classes}
    return {"name": "unet", "in_channels": shape[0], "num_classes": num_classes}


def make_student(job: Job, *, flow_map: bool = False, guided: bool = False,
                 prediction: str | None = None, precondition: bool | None = None,
                 schedule=None) -> Denoiser:
    """The student network: the config's ``model`` spec, else the teacher's architecture, else
    a default network for the data shape. It starts from the teacher's weights when ``init`` is
    "teacher", or "auto" and the student predicts what the teacher predicts under the same
    schedule (a flow map's extra
    time embedding starts at zero, so it starts as the teacher at every step size).
    ``prediction`` / ``precondition`` / ``schedule`` default to the teacher's."""
    from .. import nets

    teacher, cfg = job.teacher, job.config
    teacher_net = teacher.net if isinstance(teacher.net, nn.Module) else None
    teacher_spec = getattr(teacher_net, "config", None)
    spec = dict(cfg["model"] or teacher_spec or _fresh_spec(job.shape, job.num_classes))
    spec.setdefault("num_classes", job.num_classes)
    if flow_map or guided:  # the second input: a step size, or a guidance scale
        spec["num_times"] = 2
    schedule = schedule or teacher.schedule
    with torch.random.fork_rng(devices=[]):  # the same seed, the same initial student
        torch.manual_seed(cfg["seed"])
        net = nets.build(spec)
    if flow_map:
        student = FlowMap(net, schedule)
    else:
        prediction = prediction or teacher.prediction
        precondition = teacher.precondition if precondition is None else precondition
        # a preconditioned student of a teacher without preconditioning: EDM's sigma_data is
        # the data's standard deviation (Karras et al. 2022, sec. 5)
        sigma_data = (teacher.sigma_data if teacher.precondition or not precondition
                      else float(job.teacher_data()["x"].std()))
        cls = GuidanceEmbedded if guided else Denoiser
        student = cls(net, schedule, prediction, precondition=precondition,
                      sigma_data=sigma_data)
    same_kind = (student.prediction == teacher.prediction
                 and student.precondition == teacher.precondition
                 and student.schedule.config() == teacher.schedule.config())
    wants = cfg["init"] == "teacher" or (cfg["init"] == "auto" and same_kind)
    if wants and teacher_spec is not None and cfg["model"] is None:
        _copy_weights(teacher_net, student.net)
    elif cfg["init"] == "teacher":
        raise UserError("init='teacher' needs a teacher network of the same architecture and "
                        "prediction kind; this teacher has none (use init='fresh')")
    return student


def _copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Teacher weights into the student; only a flow map's extra time embedding may be absent
    from the teacher."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any(".extra_times." not in k for k in missing):
        raise UserError(f"the student network does not match the teacher's (missing {missing}, "
                        f"unexpected {unexpected}); give config['model'] or init='fresh'")


def frozen(module: nn.Module) -> nn.Module:
    """A detached, eval-mode copy (a target network)."""
    return copy.deepcopy(module).eval().requires_grad_(False)


def trainable(model: nn.Module) -> nn.Module:
    """A trainable copy of a (frozen, EMA) model: the next round's student."""
    return copy.deepcopy(model).train().requires_grad_(True)


def fit(job: Job, student: Student, objective, data: dict, out_dir: Path | None = None,
        **overrides) -> Student:
    """Train ``student.model`` on ``objective`` with the common loop; the student that comes
    back holds the EMA weights (what gets shipped)."""
    from ..train import train

    cfg = job.train_config(out_dir, **overrides)
    result = train(student.model, objective, data, cfg, resume=job.resume, meta=job.meta(student))
    student.model = result.ema
    student.run_dir = str(cfg["out_dir"])
    return student


# -- the entry points --------------------------------------------------------------------------

def distill(method: str, teacher: Denoiser, data=None, config: dict | None = None,
            out_dir=None, *, resume: bool = False, data_info: dict | None = None) -> Student:
    """Train a few-step student with ``method`` (see :func:`methods`) from ``teacher`` (any
    :class:`~tiltflow.Denoiser`, the exact ``GaussianMixture.denoiser(schedule)`` included).

    ``data``: a tensor ``[N, ...]``, a dict ``{"x", "cond"}``, a dataset or its name; needed
    only by the methods that train from data (without it they train on teacher samples).
    ``config``: the method's settings (:data:`COMMON` and its own; an unknown key is an error).
    ``out_dir``: the run directory (checkpoints, ``tiltflow sample`` reads it); ``None`` trains
    in a temporary directory removed afterwards. ``resume=True`` continues a stopped run.
    """
    spec = get_method(method)
    if not isinstance(teacher, Denoiser):
        raise UserError(f"teacher must be a tiltflow.Denoiser, got {type(teacher).__name__}")
    cfg = check_config(spec, config)
    data = _as_data(data)
    shape = _shape(teacher, data, cfg, data_info)
    num_classes = int(cfg["num_classes"])
    if data is not None and data.get("cond") is not None and not num_classes:
        num_classes = int(data["cond"].max()) + 1
    temp = out_dir is None
    root = Path(tempfile.mkdtemp(prefix="tiltflow_distill_") if temp else out_dir)
    info = dict(data_info or {"name": "custom", "kind": "image" if len(shape) == 3 else "points",
                              "shape": list(shape), "num_classes": num_classes,
                              "class_names": None, "shift": [0.0], "scale": [1.0]})
    job = Job(spec, teacher, data, cfg, root, bool(resume), shape, num_classes, info)
    teacher.eval().requires_grad_(False)
    try:
        return spec.run(job)
    finally:
        if temp:
            shutil.rmtree(root, ignore_errors=True)


def _student_path(path) -> Path:
    pointer = Path(path) / "student.json"
    return Path(path) / json.loads(pointer.read_text())["run"] if pointer.is_file() else Path(path)


def is_student(path) -> bool:
    """Whether ``path`` is a ``distill`` run (or checkpoint) directory: reads ``state.json``
    only."""
    from ..checkpoint import _resolve

    try:
        state = json.loads((_resolve(_student_path(path)) / "state.json").read_text())
    except (UserError, OSError, ValueError):
        return False
    if not isinstance(state, dict):
        return False  # a damaged state.json: the run loader reports it
    run = (state.get("config") or {}).get("run") if isinstance(state.get("config"), dict) else None
    return isinstance(run, dict) and bool(run.get("fewstep"))


def load(path, use_ema: bool = True) -> Student:
    """The student of a ``distill`` run directory (or one of its checkpoints)."""
    from .. import nets
    from ..checkpoint import load_checkpoint

    ckpt = load_checkpoint(_student_path(path))
    desc = ((ckpt.config.get("run") or {}).get("fewstep"))
    if not desc:
        raise UserError(f"{str(ckpt.path)!r} is not a few-step student (no 'fewstep' entry in "
                        "its run config); train one with `tiltflow distill`")
    den_cfg = ckpt.config.get("denoiser") or {}
    net = nets.build(dict(ckpt.config.get("model") or {}))
    if desc["model"] == "flow_map":
        model = FlowMap(net, den_cfg["schedule"])
    else:
        cls = GuidanceEmbedded if desc["model"] == "guidance_embedded" else Denoiser
        model = cls(net, den_cfg["schedule"], den_cfg["prediction"],
                    precondition=den_cfg.get("precondition", False),
                    sigma_data=den_cfg.get("sigma_data") or 0.5)
    state = ckpt.ema if (use_ema and ckpt.ema is not None) else ckpt.model
    try:
        model.net.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"weights in {str(ckpt.path)!r} do not fit the student network "
                        f"({str(e).splitlines()[0]})") from None
    model.eval()
    lo, hi = desc["nfe"]
    return Student(model, desc["method"], desc["sampler"], (lo, hi), desc.get("options") or {},
                   str(ckpt.path))


# -- shared by the objectives ------------------------------------------------------------------

def noisy(model: Denoiser, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor):
    """``(x_t, coeffs)`` with ``x_t = alpha(t) x + sigma(t) z`` under ``model``'s schedule, for
    per-example float64 times ``t [B]``."""
    c = model.schedule(t).expand(x)
    return c.alpha * x + c.sigma * z, c


def per_example(sq: torch.Tensor) -> torch.Tensor:
    """Mean over the non-batch dimensions (per-dimension losses, as the pre-training
    objectives report them)."""
    return sq.reshape(sq.shape[0], -1).mean(dim=1)


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def rand(n: int, generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def teacher_steps(teacher: Denoiser, x: torch.Tensor, index: torch.Tensor, grids: torch.Tensor,
                  solver: str, cond=None, options: dict | None = None) -> torch.Tensor:
    """Run the registered ``solver`` on the teacher from ``x[b]`` along the float64 grid
    ``grids[index[b]]``, one call per distinct index (a solver shares its grid over the batch,
    so examples at the same time go together). Any tiltflow solver can be the teacher's step."""
    from ..solvers import solve

    out = torch.empty_like(x)
    with torch.no_grad():
        for i in torch.unique(index).tolist():
            rows = (index == i).nonzero().flatten()
            c = cond[rows] if cond is not None else None
            out[rows] = solve(teacher, x[rows], grids[i], solver, cond=c, options=options)
    return out
