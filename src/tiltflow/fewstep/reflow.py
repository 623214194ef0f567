"""Rectified flow's reflow (Liu et al. 2022, "Flow Straight and Fast", Algorithm 1) and its
extension to any schedule and prediction kind (Wang et al. 2024, "Rectified Diffusion").

Reflow draws pairs ``(z, x)``: a noise ``z`` and the teacher's ODE solution ``x`` from it, then
retrains on the *coupled* pairs with the teacher's own objective, ``x_t = alpha_t x + sigma_t z``
and the target in the student's prediction kind (the velocity ``z - x`` for rectified flow, the
noise ``z`` for an epsilon model). The pairs' coupling is deterministic, so the retrained flow
has straighter paths and samples well with few Euler (or DDIM) steps; ``rounds = k`` repeats it
(k-rectified flow, each round's student the next round's teacher). ``one_step_steps > 0`` adds
InstaFlow's last stage (Liu et al. 2024, "InstaFlow", sec. 3.2): the reflowed model's own pairs
train it at ``t = 1`` only, where the velocity loss is the squared error of the one-step
endpoint ``z - v(z, 1)`` (the paper uses LPIPS on images; here the squared error), and the
student samples in exactly one step.

Piecewise rectified flow (``perflow``; Yan et al. 2024, "PeRFlow: Piecewise Rectified Flow as
Universal Plug-and-Play Accelerator", sec. 3): the time axis splits into ``windows``; a data
point noised to a window's start ``t_k`` is carried by the teacher's solver to its end
``t_{k-1}``, and the student (a velocity model) learns the straight line between the two, so
one Euler step per window follows the teacher (``nfe = windows``).

Pairs are written in chunks (``pairs/chunk_00000.pt`` ...), each from its own seed, so pair
generation resumes where it stopped and splits over ``accelerate`` processes (chunk ``i`` on
process ``i mod P``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..objectives import timesampling
from ..predictions import from_hub
from .base import fit, make_student, noisy, per_example, register, teacher_solve, trainable
from .student import Student

__all__ = ["ReflowLoss", "generate_pairs"]


class ReflowLoss:
    """The teacher's objective on coupled pairs: ``batch["x"]`` is ``[B, 2, ...]`` holding
    ``(z, x)``; the loss is the squared error of the student's own prediction kind."""

    def __init__(self, time_sampling="uniform", t_min: float = 0.0):
        self.times = timesampling.get(time_sampling)
        self.t_min = float(t_min)

    def __call__(self, model, batch, generator=None) -> torch.Tensor:
        pairs, cond = batch["x"], batch.get("cond")
        z, x = pairs[:, 0], pairs[:, 1]
        t = self.times(x.shape[0], generator, device=x.device)
        t = self.t_min + (1 - self.t_min) * t
        x_t, c = noisy(model, x, z, t)
        pred = model(x_t, t, cond)
        target = from_hub(pred.kind, x, z, c)
        return per_example((pred.raw - target) ** 2)

    def config(self) -> dict:
        return {"name": "reflow", "time_sampling": self.times.config(), "t_min": self.t_min}


def generate_pairs(teacher, shape, num: int, cfg: dict, directory: Path, num_classes: int = 0,
                   chunk: int = 2048) -> dict:
    """``num`` pairs ``(z, teacher ODE solution)`` as ``{"x": [num, 2, ...], "cond"}``, read from
    ``directory`` where present, else drawn and written chunk by chunk."""
    from accelerate import PartialState

    state = PartialState()
    directory.mkdir(parents=True, exist_ok=True)
    chunks = range((num + chunk - 1) // chunk)
    for i in chunks:
        path = directory / f"chunk_{i:05d}.pt"
        if path.exists() or i % state.num_processes != state.process_index:
            continue
        size = min(chunk, num - i * chunk)
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + i)
        z = torch.randn((size, *shape), generator=gen)
        cond = torch.randint(0, num_classes, (size,), generator=gen) if num_classes else None
        x = teacher_solve(teacher, z, cond, cfg)
        tmp = path.with_suffix(".tmp")
        torch.save({"z": z, "x": x, "cond": cond}, tmp)
        tmp.replace(path)  # a chunk is there whole or not at all
    state.wait_for_everyone()
    parts = [torch.load(directory / f"chunk_{i:05d}.pt", weights_only=True) for i in chunks]
    pairs = torch.cat([torch.stack([p["z"], p["x"]], dim=1) for p in parts])
    cond = torch.cat([p["cond"] for p in parts]) if num_classes else None
    return {"x": pairs, "cond": cond}


@register("reflow", defaults={"rounds": 1, "solver": "euler", "time_sampling": "uniform",
                              "t_min": 0.0, "one_step_steps": 0, "lr": 1e-4})
def reflow(job) -> Student:
    """Reflow / k-rectified flow / Rectified Diffusion: retrain on the teacher's (noise, sample)
    pairs; sampled with ``solver`` at any NFE."""
    cfg = job.config
    teacher = job.teacher
    student = None
    for k in range(1, cfg["rounds"] + 1):
        round_dir = job.out_dir / f"round_{k}"
        pairs = generate_pairs(teacher, job.shape, cfg["num_data"], cfg, round_dir / "pairs",
                               job.num_classes)
        model = make_student(job) if student is None else trainable(student.model)
        student = Student(model, "reflow", "solver", (1, None), {"solver": cfg["solver"]})
        student = fit(job, student, ReflowLoss(cfg["time_sampling"], cfg["t_min"]), pairs,
                      round_dir / "run")
        teacher = student.model
    if cfg["one_step_steps"] > 0:
        one_dir = job.out_dir / "one_step"
        pairs = generate_pairs(teacher, job.shape, cfg["num_data"], cfg, one_dir / "pairs",
                               job.num_classes)
        student = Student(trainable(student.model), "reflow", "solver", (1, 1), {"solver": "euler"})
        student = fit(job, student, ReflowLoss(t_min=1.0), pairs, one_dir / "run",
                      steps=cfg["one_step_steps"])
    job.point_to(student)
    return student


class PiecewiseReflowLoss:
    """PeRFlow's objective (module docstring of :func:`perflow`): in a random window
    ``[t_{k-1}, t_k]``, the straight line from ``x_{t_k} = alpha x + sigma z`` to the teacher's
    ODE solution ``x_{t_{k-1}}`` is the target path, its constant slope the target velocity."""

    def __init__(self, teacher, windows: int = 4, solver: str = "heun", window_steps: int = 4):
        self.teacher, self.solver = teacher, solver
        self.edges = torch.linspace(1.0, 0.0, windows + 1, dtype=torch.float64)
        # row k: the teacher's grid across window k (from edges[k] down to edges[k + 1])
        self.grids = torch.stack([torch.linspace(float(self.edges[k]), float(self.edges[k + 1]),
                                                 window_steps + 1, dtype=torch.float64)
                                  for k in range(windows)])

    def __call__(self, model, batch, generator=None) -> torch.Tensor:
        from .base import rand, randn_like, teacher_steps

        x, cond = batch["x"], batch.get("cond")
        n, windows = x.shape[0], len(self.grids)
        k = (rand(n, generator, "cpu") * windows).long().clamp(max=windows - 1)
        t_start, t_end = self.edges[k].to(x.device), self.edges[k + 1].to(x.device)
        x_start, _ = noisy(model, x, randn_like(x, generator), t_start)
        x_end = teacher_steps(self.teacher, x_start, k, self.grids, self.solver, cond)
        u = rand(n, generator, x.device)
        t = t_end + u * (t_start - t_end)
        shape = (-1,) + (1,) * (x.dim() - 1)
        frac = ((t_start - t) / (t_start - t_end)).to(x.dtype).reshape(shape)
        x_t = x_start + frac * (x_end - x_start)
        target = (x_end - x_start) / (t_end - t_start).to(x.dtype).reshape(shape)
        return per_example((model(x_t, t, cond).velocity - target) ** 2)

    def config(self) -> dict:
        return {"name": "perflow", "windows": len(self.grids), "solver": self.solver}


@register("perflow", needs_data=True, defaults={"windows": 4, "window_solver": "heun",
                                                "window_steps": 4, "lr": 1e-4})
def perflow(job) -> Student:
    """Piecewise rectified flow: straighten the teacher's flow window by window (Yan et al.)."""
    cfg = job.config
    loss = PiecewiseReflowLoss(job.teacher, cfg["windows"], cfg["window_solver"],
                               cfg["window_steps"])
    model = make_student(job, prediction="velocity", precondition=False)
    student = Student(model, "perflow", "solver", (cfg["windows"], cfg["windows"]),
                      {"solver": "euler", "grid": loss.edges.tolist()})
    return fit(job, student, loss, job.teacher_data())
