"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2).

A student with ``N`` DDIM steps learns to do in one step what the teacher does in two: for
``t = i / N`` it regresses onto the clean image ``x~`` that makes one DDIM step from ``z_t``
land where two teacher DDIM steps ``t -> t - 1/(2N) -> t - 1/N`` land,

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

with the "truncated SNR" weight ``max(SNR(t), 1)`` on the squared error of ``x_hat``
(Salimans & Ho, sec. 4). The student then becomes the teacher and ``N`` halves, until
``nfe_min`` steps. Each round is a run directory ``round_NNNN`` (``N`` student steps); the
student of every round stays loadable, so one distillation gives students at every halving.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import (
    fit,
    make_student,
    noisy,
    per_example,
    rand,
    randn_like,
    register,
    teacher_steps,
    trainable,
)
from .student import Student

__all__ = ["ProgressiveLoss"]


class ProgressiveLoss:
    """One round's objective: ``student_steps`` student DDIM steps on a uniform grid."""

    def __init__(self, teacher, student_steps: int, solver: str = "ddim"):
        self.teacher, self.n, self.solver = teacher, int(student_steps), solver
        t = torch.linspace(1.0, 0.0, 2 * self.n + 1, dtype=torch.float64)
        # row i: the teacher's two steps from t_i = 1 - i/N, i = 0 .. N-1
        self.grids = torch.stack([t[2 * i:2 * i + 3] for i in range(self.n)])

    def target(self, model, x, cond, generator):
        """``(z_t, i, x~)``: noisy data at ``t_i`` and the clean image whose single DDIM step
        lands where the teacher's two steps do."""
        i = (rand(x.shape[0], generator, "cpu") * self.n).long().clamp(max=self.n - 1)
        t, t2 = self.grids[i, 0].to(x.device), self.grids[i, 2].to(x.device)
        z_t, c = noisy(model, x, randn_like(x, generator), t)
        z_t2 = teacher_steps(self.teacher, z_t, i, self.grids, self.solver, cond)
        c2 = model.schedule(t2).expand(x)
        ratio = c2.sigma / c.sigma
        return z_t, i, (z_t2 - ratio * z_t) / (c2.alpha - ratio * c.alpha)

    def __call__(self, model, batch, generator=None) -> torch.Tensor:
        x, cond = batch["x"], batch.get("cond")
        z_t, i, x_tilde = self.target(model, x, cond, generator)
        t = self.grids[i, 0].to(x.device)
        c = model.schedule(t).expand(x)
        x_hat = model(z_t, t, cond).data
        weight = torch.clamp((c.alpha / c.sigma) ** 2, min=1.0)  # truncated SNR
        return per_example(weight * (x_hat - x_tilde) ** 2)

    def config(self) -> dict:
        return {"name": "progressive_distillation", "student_steps": self.n,
                "solver": self.solver}


def _student_kind(teacher) -> str | None:
    # An epsilon model cannot make a one-step jump (x_hat = (z - sigma eps) / alpha blows up
    # at alpha -> 0); Salimans & Ho use x- or v-prediction for the student.
    return "v" if teacher.prediction in ("noise", "score") else None


@register("progressive_distillation",
          defaults={"teacher_steps": 64, "nfe_min": 1, "solver": "ddim", "lr": 1e-4})
def progressive_distillation(job) -> Student:
    """Progressive distillation: halve the DDIM step count round by round (Salimans & Ho)."""
    cfg = job.config
    n, low = cfg["teacher_steps"] // 2, cfg["nfe_min"]
    if n < low or cfg["teacher_steps"] & (cfg["teacher_steps"] - 1) or low & (low - 1):
        raise UserError("teacher_steps and nfe_min must be powers of two with nfe_min < "
                     f"teacher_steps, got {cfg['teacher_steps']} and {low}")
    data = job.teacher_data()
    teacher, model = job.teacher, None
    kind = _student_kind(job.teacher)
    while n >= low:
        model = make_student(job, prediction=kind) if model is None else trainable(teacher)
        student = Student(model, "progressive_distillation", "solver", (n, n),
                          {"solver": cfg["solver"]})
        student = fit(job, student, ProgressiveLoss(teacher, n, cfg["solver"]), data,
                      job.out_dir / f"round_{n:04d}")
        teacher, n = student.model, n // 2
    job.point_to(student)
    return student
